//! SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using
//! Adam", arXiv 2409.11321): AdamW run in the eigenbasis of Shampoo's factors.
//!
//! keel's definition, for a tensor seen as a `rows x cols` matrix `G` (a 1-D
//! tensor is `n x 1`; higher ranks are `shape[0] x rest`), at step `t`:
//! 1. factors `L = sb*L + (1-sb) G G^T` (when the left side is
//!    preconditioned: `rows <= max_preconditioner_dim`, and for 1-D tensors
//!    only with `precondition_1d`) and `R = sb*R + (1-sb) G^T G` (when
//!    `cols <= max_preconditioner_dim`, 2-D and up);
//! 2. before `start_preconditioning_step`, or with neither side
//!    preconditioned: keel's `adamw` step, bit for bit;
//! 3. at `start_preconditioning_step` and every `precondition_frequency`
//!    steps after it, the bases `Q_L, Q_R` become the eigenvectors of `L, R`
//!    (f64 eigendecomposition, columns by descending eigenvalue) and the first
//!    moment, kept in rotated coordinates, is rotated from the old bases into
//!    the new ones (`M = Q_L'^T Q_L M Q_R^T Q_R'`); the second moment is kept
//!    as it is (its coordinates follow the eigenvalue order). A failed or
//!    non-finite eigendecomposition keeps the old basis and is counted;
//! 4. AdamW in the rotated space: `G' = Q_L^T G Q_R`,
//!    `m = b1*m + (1-b1) G'`, `v = b2*v + (1-b2) G'^2`,
//!    `N' = m_hat / (sqrt(v_hat) + eps)`, then `N = Q_L N' Q_R^T` and
//!    `p = p*(1 - lr*wd) - lr*N`.
//!
//! The paper's reference code differs in small ways that keel does not
//! follow: it skips the update on the first step, refreshes the bases with
//! one power-iteration + QR step instead of a full eigendecomposition, and
//! applies weight decay after the update. No external reference vectors
//! exist for SOAP; its tests check it against Adam (identity bases) and
//! against an independent dense implementation of the steps above.
//!
//! State per tensor: `exp_avg` and `exp_avg_sq` (the tensor's size),
//! `factors` and `bases` (`L` then `R`, each present only for a
//! preconditioned side, row-major; bases start as identities).

use faer::linalg::matmul::matmul;
use faer::{Accum, MatRef, Par};

use super::adam::{self, AdamCoeffs};
use super::linalg::{self, view, view_mut};
use crate::backend::reduce::Sums;
use crate::clip::GradTransform;
use crate::config::SoapConfig;
use crate::real::{GradElem, Real};

/// State slot indices.
const M: usize = 0;
const V: usize = 1;
const FACTORS: usize = 2;
const BASES: usize = 3;

/// How SOAP sees a tensor: a `rows x cols` matrix and which sides it rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sides {
    rows: usize,
    cols: usize,
    left: bool,
    right: bool,
}

impl Sides {
    pub(crate) fn of(shape: &[usize], c: &SoapConfig) -> Sides {
        let max = c.max_preconditioner_dim;
        match shape {
            [] => Sides {
                rows: 1,
                cols: 1,
                left: false,
                right: false,
            },
            [n] => Sides {
                rows: *n,
                cols: 1,
                left: c.precondition_1d && *n <= max,
                right: false,
            },
            [rows, rest @ ..] => {
                let cols = rest.iter().product();
                Sides {
                    rows: *rows,
                    cols,
                    left: *rows <= max,
                    right: cols <= max,
                }
            }
        }
    }

    /// Splits a factor-shaped slot into its `(L, R)` parts.
    fn split<'a, T>(&self, x: &'a mut [T]) -> (Option<&'a mut [T]>, Option<&'a mut [T]>) {
        let l_len = if self.left { self.rows * self.rows } else { 0 };
        let (l, r) = x.split_at_mut(l_len);
        (self.left.then_some(l), self.right.then_some(r))
    }
}

/// The sizes of a parameter's factor matrices (each `n x n`), in slot order.
pub(crate) fn factor_dims(shape: &[usize], c: &SoapConfig) -> Vec<usize> {
    let sides = Sides::of(shape, c);
    [(sides.left, sides.rows), (sides.right, sides.cols)]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect()
}

/// Initial state of a parameter: zero moments and factors, identity bases.
/// `numel` is the checked element count of `shape`.
pub(crate) fn initial_state<T: Real>(
    shape: &[usize],
    numel: usize,
    c: &SoapConfig,
    what: &str,
) -> crate::Result<Vec<Vec<T>>> {
    let moments = linalg::moment_buffers(numel, what)?;
    linalg::matrix_state(moments, &factor_dims(shape, c), what)
}

/// Which way [`rotate`] turns a matrix.
#[derive(Clone, Copy)]
enum Direction {
    /// `Q_L^T X Q_R`: into the eigenbasis.
    Into,
    /// `Q_L X Q_R^T`: back to parameter coordinates.
    Back,
}

/// `x` rotated by the bases present (`rows x cols`, row-major).
fn rotate<T: Real>(
    x: &[T],
    (rows, cols): (usize, usize),
    ql: Option<&[T]>,
    qr: Option<&[T]>,
    dir: Direction,
    par: Par,
) -> Vec<T> {
    let mut out = x.to_vec();
    let mut tmp = vec![T::zero(); x.len()];
    // `out = Q_L' out` then `out = out Q_R'`, each side only if present.
    let mut multiply = |q: MatRef<'_, T>, from_left: bool| {
        let o = view(&out, rows, cols);
        let (a, b) = if from_left { (q, o) } else { (o, q) };
        matmul(
            view_mut(&mut tmp, rows, cols),
            Accum::Replace,
            a,
            b,
            T::one(),
            par,
        );
        std::mem::swap(&mut out, &mut tmp);
    };
    let into = matches!(dir, Direction::Into);
    if let Some(q) = ql {
        let q = view(q, rows, rows);
        multiply(if into { q.transpose() } else { q }, true);
    }
    if let Some(q) = qr {
        let q = view(q, cols, cols);
        multiply(if into { q } else { q.transpose() }, false);
    }
    out
}

/// The eigenvectors of the `n x n` factor `l` as columns by descending
/// eigenvalue, written row-major into `basis`; `false` (basis untouched)
/// when the eigendecomposition fails or is not finite.
fn eigenbasis<T: Real>(l: &[T], n: usize, basis: &mut [T]) -> bool {
    let req = linalg::square_scratch::<f64>(n).and(linalg::sym_eigen_scratch::<f64>(n));
    linalg::with_workspace(req, |stack| {
        let (a, stack) = linalg::square_in(n, stack, |j, column| {
            linalg::symmetric_column(l, j, column, |x| x.to_f64x())
        });
        let Some(eig) = linalg::sym_eigen(a, stack).0 else {
            return false;
        };
        // faer returns ascending eigenvalues: reverse the columns.
        let q = eig.vectors();
        for i in 0..n {
            for j in 0..n {
                basis[i * n + j] = T::from_f64x(q[(i, n - 1 - j)]);
            }
        }
        true
    })
}

/// One SOAP step of one tensor (`t` is the 1-based step); returns its sums
/// and the number of eigenbases it failed to recompute.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    c: &SoapConfig,
    t: u64,
    (lr, wd): (f64, f64),
    prep: &P,
    shape: &[usize],
    p: &mut [T],
    g: &[G],
    state: &mut [Vec<T>],
    par: Par,
) -> (Sums, usize) {
    let sides = Sides::of(shape, c);
    let dims = (sides.rows, sides.cols);
    let mut k = AdamCoeffs::<T>::new(c.beta1, c.beta2, c.eps, t);
    k.decay = T::from_f64x(1.0 - lr * wd);
    k.lr = T::from_f64x(lr);
    let (moments, matrices) = state.split_at_mut(FACTORS);
    let (m, v) = moments.split_at_mut(V);
    let (m, v) = (&mut m[M][..], &mut v[0][..]);
    let (factors, bases) = matrices.split_at_mut(BASES - FACTORS);
    let (l, r) = sides.split(&mut factors[0][..]);
    let (ql, qr) = sides.split(&mut bases[0][..]);

    // 1. Factors, from the (clipped) gradient.
    let gm: Vec<T> = if sides.left || sides.right {
        g.iter().map(|x| prep.apply(x.get())).collect()
    } else {
        Vec::new()
    };
    let sb = c.factor_beta();
    for (factor, left) in [(l, true), (r, false)] {
        let Some(f) = factor else { continue };
        f.iter_mut().for_each(|x| *x *= T::from_f64x(sb));
        let x = view(&gm, sides.rows, sides.cols);
        let (n, a, b) = match left {
            true => (sides.rows, x, x.transpose()),
            false => (sides.cols, x.transpose(), x),
        };
        linalg::matmul_lower(
            view_mut(f, n, n),
            Accum::Add,
            a,
            b,
            T::from_f64x(1.0 - sb),
            par,
        );
        linalg::mirror_lower(f, n);
    }

    // 2. Plain AdamW until the first basis exists.
    if t < c.start_step() || !(sides.left || sides.right) {
        return (adam::step::<T, G, P, false>(&k, prep, p, g, m, v, false), 0);
    }

    // 3. New bases when due; the first moment follows them.
    let (l, r) = sides.split(&mut factors[0][..]);
    let (mut ql, mut qr) = (ql, qr);
    let mut failures = 0;
    if c.recomputes(t) {
        let mut fresh: Vec<(Vec<T>, bool)> = Vec::new();
        for (f, n) in [(l.as_deref(), sides.rows), (r.as_deref(), sides.cols)] {
            if let Some(f) = f {
                let mut q = vec![T::zero(); n * n];
                let ok = eigenbasis(f, n, &mut q);
                failures += usize::from(!ok);
                fresh.push((q, ok));
            } else {
                fresh.push((Vec::new(), false));
            }
        }
        let in_params = rotate(m, dims, ql.as_deref(), qr.as_deref(), Direction::Back, par);
        for (slot, (q, ok)) in [ql.as_deref_mut(), qr.as_deref_mut()]
            .into_iter()
            .zip(fresh)
        {
            if let (Some(slot), true) = (slot, ok) {
                slot.copy_from_slice(&q);
            }
        }
        m.copy_from_slice(&rotate(
            &in_params,
            dims,
            ql.as_deref(),
            qr.as_deref(),
            Direction::Into,
            par,
        ));
    }

    // 4. AdamW in the eigenbasis, rotated back.
    let g_rot = rotate(
        &gm,
        dims,
        ql.as_deref(),
        qr.as_deref(),
        Direction::Into,
        par,
    );
    let mut n_rot = vec![T::zero(); g_rot.len()];
    for (((&gr, m), v), n) in g_rot
        .iter()
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .zip(&mut n_rot)
    {
        k.moments(gr, m, v);
        *n = k.direction(*m, *v);
    }
    let n = rotate(
        &n_rot,
        dims,
        ql.as_deref(),
        qr.as_deref(),
        Direction::Back,
        par,
    );
    let mut sums = Sums::default();
    for (w, &d) in p.iter_mut().zip(&n) {
        let old = *w;
        *w = old * k.decay - k.lr * d;
        let change = (*w - old).to_f64x();
        sums.param_sq += old.to_f64x() * old.to_f64x();
        sums.update_sq += change * change;
    }
    (sums, failures)
}
