//! torch.optim.Muon's math for one 2-D tensor.
//!
//! `b += (1-momentum)*(g-b)`; `u = g + momentum*(b-g)` (Nesterov) or `b`;
//! `X = u` (transposed when rows > cols, so `X X^T` is the smaller Gram
//! matrix), `X /= max(||X||_F, eps)`, then `ns_steps` Newton–Schulz
//! iterations `A = X X^T; B = b*A + c*A A; X = a*X + B X`, which drive the
//! singular values of `X` towards 1 (an approximate orthogonalization of the
//! update); finally `p = p*(1 - lr*wd) - lr*s*X` with the shape scale `s`.
//! The matrix products go through faer (cache-blocked, SIMD, multi-threaded).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

use crate::backend::reduce::Sums;
use crate::clip::GradTransform;
use crate::config::{AdjustLr, MuonConfig};
use crate::real::{GradElem, Real};

/// The shape scale `s` of the update.
pub fn shape_scale(adjust: AdjustLr, rows: usize, cols: usize) -> f64 {
    let (r, c) = (rows as f64, cols as f64);
    match adjust {
        AdjustLr::Original => (r / c).max(1.0).sqrt(),
        AdjustLr::MatchRmsAdamw => 0.2 * r.max(c).sqrt(),
    }
}

/// Newton–Schulz orthogonalization of `x` (rows <= cols), in place: divides
/// `x` by `max(||x||_F, eps)`, then runs `steps` iterations of
/// `A = X X^T; B = b*A + c*A A; X = a*X + B X` with `[a, b, c]`. With Muon's
/// coefficients the singular values of the result land near 1 (roughly
/// within [0.7, 1.2]), which is what "orthogonalized update" means here.
///
/// ```
/// use faer::{Mat, Par};
/// let mut x = Mat::<f64>::from_fn(3, 5, |i, j| if i == j { 1.0 } else { 0.1 * ((i + 2 * j) as f64).sin() });
/// keel::optim::muon::newton_schulz(&mut x, 5, [3.4445, -4.775, 2.0315], 1e-7, Par::Seq);
/// let s = x.singular_values().unwrap();
/// assert!(s.iter().all(|&v| v > 0.5 && v < 1.5));
/// ```
pub fn newton_schulz<T: Real>(x: &mut Mat<T>, steps: u32, [a, b, c]: [f64; 3], eps: f64, par: Par) {
    let norm = x.norm_l2().to_f64x();
    let inv = T::from_f64x(1.0 / norm.max(eps));
    let (r, n) = (x.nrows(), x.ncols());
    for j in 0..n {
        for i in 0..r {
            x[(i, j)] *= inv;
        }
    }
    let (a, b, c) = (T::from_f64x(a), T::from_f64x(b), T::from_f64x(c));
    let mut gram = Mat::<T>::zeros(r, r);
    let mut poly = Mat::<T>::zeros(r, r);
    let mut next = Mat::<T>::zeros(r, n);
    for _ in 0..steps {
        matmul(&mut gram, Accum::Replace, &*x, x.transpose(), T::one(), par);
        matmul(&mut poly, Accum::Replace, &gram, &gram, c, par);
        for j in 0..r {
            for i in 0..r {
                poly[(i, j)] += b * gram[(i, j)];
            }
        }
        for j in 0..n {
            for i in 0..r {
                next[(i, j)] = a * x[(i, j)];
            }
        }
        matmul(&mut next, Accum::Add, &poly, &*x, T::one(), par);
        std::mem::swap(x, &mut next);
    }
}

/// One Muon step of a `[rows, cols]` row-major tensor: reads `p, g, b`,
/// writes `p, b`. `lr` already includes the group's scale, `wd` its decay.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    c: &MuonConfig,
    lr: f64,
    wd: f64,
    prep: &P,
    (rows, cols): (usize, usize),
    p: &mut [T],
    g: &[G],
    b: &mut [T],
    par: Par,
) -> Sums {
    let momentum = T::from_f64x(c.momentum);
    let keep = T::from_f64x(1.0 - c.momentum);
    let transpose = rows > cols;
    let mut x = if transpose {
        Mat::<T>::zeros(cols, rows)
    } else {
        Mat::<T>::zeros(rows, cols)
    };
    for i in 0..rows {
        for j in 0..cols {
            let at = i * cols + j;
            let g = prep.apply(g[at].get());
            b[at] = b[at] + keep * (g - b[at]);
            let u = if c.nesterov {
                g + momentum * (b[at] - g)
            } else {
                b[at]
            };
            if transpose {
                x[(j, i)] = u;
            } else {
                x[(i, j)] = u;
            }
        }
    }
    newton_schulz(&mut x, c.ns_steps, c.ns_coefficients, c.eps, par);
    let step = T::from_f64x(lr * shape_scale(c.adjust_lr, rows, cols));
    let decay = T::from_f64x(1.0 - lr * wd);
    let mut sums = Sums::default();
    for i in 0..rows {
        for j in 0..cols {
            let at = i * cols + j;
            let o = if transpose { x[(j, i)] } else { x[(i, j)] };
            let old = p[at];
            let new = old * decay - step * o;
            sums.param_sq += old.to_f64x() * old.to_f64x();
            sums.update_sq += (new - old).to_f64x() * (new - old).to_f64x();
            p[at] = new;
        }
    }
    sums
}
