//! Shampoo with DistributedShampoo's semantics for one tensor (see
//! `tests/data/conformance/SHAMPOO.md`, mirrored here step by step).
//!
//! The tensor is reshaped (dims of size 1 dropped, neighbours merged while
//! their product stays <= `max_preconditioner_dim`) and cut into blocks of at
//! most that size per dim. Each block of order k keeps one factor
//! `L_j = sum G_(j) G_(j)^T` per dim and its inverse root `P_j = L_j^(-1/2k)`,
//! recomputed every `precondition_frequency` steps from an f64 symmetric
//! eigendecomposition (faer); the update is `G x_1 P_1 ... x_k P_k`, grafted
//! to the norm of an Adagrad or Adam step, plus decoupled weight decay.
//!
//! State per tensor: `exp_avg` and `graft` (the tensor's size), `factors` and
//! `roots` (every block's `n_j x n_j` matrices, concatenated in block order).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::backend::reduce::Sums;
use crate::clip::GradTransform;
use crate::config::{Grafting, ShampooConfig};
use crate::real::{GradElem, Real};

/// State slot indices.
const M: usize = 0;
const V: usize = 1;
const FACTORS: usize = 2;
const ROOTS: usize = 3;

/// The merged shape of a parameter (SHAMPOO.md §1.1).
pub fn merged_dims(shape: &[usize], max_dim: usize) -> Vec<usize> {
    let dims: Vec<usize> = shape.iter().copied().filter(|&d| d != 1).collect();
    let Some((&last, rest)) = dims.split_last() else {
        return vec![1];
    };
    let mut out = vec![last];
    for &d in rest.iter().rev() {
        let back = out.last_mut().expect("out starts non-empty");
        if *back * d <= max_dim {
            *back *= d;
        } else {
            out.push(d);
        }
    }
    out.reverse();
    out
}

/// One block: its dims and the flat tensor index of each of its elements in
/// row-major block order.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub dims: Vec<usize>,
    pub index: Vec<usize>,
}

/// The blocks of a parameter (SHAMPOO.md §1.2), in row-major block order.
pub(crate) fn blocks(shape: &[usize], max_dim: usize) -> Vec<Block> {
    let merged = merged_dims(shape, max_dim);
    let k = merged.len();
    let mut strides = vec![1usize; k];
    for j in (0..k.saturating_sub(1)).rev() {
        strides[j] = strides[j + 1] * merged[j + 1];
    }
    let counts: Vec<usize> = merged.iter().map(|&d| d.div_ceil(max_dim)).collect();
    let total: usize = counts.iter().product();
    let mut out = Vec::with_capacity(total);
    for b in 0..total {
        // Block coordinates, row-major over `counts`.
        let mut rem = b;
        let mut start = vec![0usize; k];
        for j in (0..k).rev() {
            start[j] = (rem % counts[j]) * max_dim;
            rem /= counts[j];
        }
        let dims: Vec<usize> = (0..k)
            .map(|j| (merged[j] - start[j]).min(max_dim))
            .collect();
        let n: usize = dims.iter().product();
        let mut index = Vec::with_capacity(n);
        for e in 0..n {
            let mut rem = e;
            let mut flat = 0;
            for j in (0..k).rev() {
                flat += (start[j] + rem % dims[j]) * strides[j];
                rem /= dims[j];
            }
            index.push(flat);
        }
        out.push(Block { dims, index });
    }
    out
}

/// Length of the `factors` (and `roots`) slot of a parameter.
pub(crate) fn factor_len(shape: &[usize], max_dim: usize) -> usize {
    blocks(shape, max_dim)
        .iter()
        .map(|b| b.dims.iter().map(|d| d * d).sum::<usize>())
        .sum()
}

/// Initial state of a parameter: zero moments and factors, identity roots.
pub(crate) fn initial_state<T: Real>(shape: &[usize], max_dim: usize) -> Vec<Vec<T>> {
    let numel: usize = shape.iter().product();
    let mut roots = Vec::with_capacity(factor_len(shape, max_dim));
    for b in blocks(shape, max_dim) {
        for &n in &b.dims {
            roots.extend((0..n * n).map(|i| {
                if i % (n + 1) == 0 {
                    T::one()
                } else {
                    T::zero()
                }
            }));
        }
    }
    vec![
        vec![T::zero(); numel],
        vec![T::zero(); numel],
        vec![T::zero(); roots.len()],
        roots,
    ]
}

/// `(outer, inner)` sizes around mode `j` of a row-major block.
fn around(dims: &[usize], j: usize) -> (usize, usize) {
    (dims[..j].iter().product(), dims[j + 1..].iter().product())
}

/// `y = x x_j p` (mode-j product): for each outer slice, `Y_o = P X_o` with
/// `X_o` the `n_j x inner` row-major slice.
fn mode_product(x: &[f64], dims: &[usize], j: usize, p: MatRef<'_, f64>, par: Par) -> Vec<f64> {
    let (outer, inner) = around(dims, j);
    let n = dims[j];
    let mut y = vec![0.0; x.len()];
    for o in 0..outer {
        let xo = MatRef::from_row_major_slice(&x[o * n * inner..(o + 1) * n * inner], n, inner);
        let mut yo = Mat::<f64>::zeros(n, inner);
        matmul(&mut yo, Accum::Replace, p, xo, 1.0, par);
        for a in 0..n {
            for i in 0..inner {
                y[(o * n + a) * inner + i] = yo[(a, i)];
            }
        }
    }
    y
}

/// What one tensor's step reports besides its norms.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ShampooReport {
    /// Eigendecompositions that failed or met a non-finite factor (the
    /// previous root was kept).
    pub root_failures: usize,
}

/// One Shampoo step of one tensor (`t` is the 1-based step). Reads and writes
/// `p` and the four state slots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    c: &ShampooConfig,
    t: u64,
    (lr, wd): (f64, f64),
    prep: &P,
    shape: &[usize],
    p: &mut [T],
    g: &[G],
    state: &mut [Vec<T>],
    par: Par,
) -> (Sums, ShampooReport) {
    let s = c.start_step();
    let amortize = t == s || (t > s && t % c.precondition_frequency == 0);
    let graft_only = t < s && c.grafting != Grafting::None;
    let mut sums = Sums::default();
    let mut report = ShampooReport::default();
    let mut offset = 0;
    for block in blocks(shape, c.max_preconditioner_dim) {
        let k = block.dims.len();
        let gb: Vec<f64> = block
            .index
            .iter()
            .map(|&i| prep.apply(g[i].get()).to_f64x())
            .collect();
        let wb: Vec<f64> = block.index.iter().map(|&i| p[i].to_f64x()).collect();

        // (E1) factors, from the raw gradient.
        let w = if c.beta2 == 1.0 { 1.0 } else { 1.0 - c.beta2 };
        let mut factor_at = offset;
        let mut roots: Vec<Mat<f64>> = Vec::with_capacity(k);
        for j in 0..k {
            let n = block.dims[j];
            let (outer, inner) = around(&block.dims, j);
            let mut gram = Mat::<f64>::zeros(n, n);
            for o in 0..outer {
                let xo =
                    MatRef::from_row_major_slice(&gb[o * n * inner..(o + 1) * n * inner], n, inner);
                matmul(&mut gram, Accum::Add, xo, xo.transpose(), 1.0, par);
            }
            let l = &mut state[FACTORS][factor_at..factor_at + n * n];
            for a in 0..n {
                for b in 0..n {
                    let old = l[a * n + b].to_f64x();
                    let new = if c.beta2 == 1.0 {
                        old + gram[(a, b)]
                    } else {
                        c.beta2 * old + w * gram[(a, b)]
                    };
                    l[a * n + b] = T::from_f64x(new);
                }
            }
            // (E2)-(E4) inverse root, when amortizing.
            if amortize {
                let c2 = if c.use_bias_correction && c.beta2 < 1.0 {
                    1.0 - c.beta2.powf(t as f64)
                } else {
                    1.0
                };
                let a_mat = Mat::<f64>::from_fn(n, n, |a, b| {
                    l[a * n + b].to_f64x() / c2 + if a == b { c.epsilon } else { 0.0 }
                });
                match inverse_root(&a_mat, c.epsilon, 2 * k) {
                    Some(root) => {
                        let r = &mut state[ROOTS][factor_at..factor_at + n * n];
                        for a in 0..n {
                            for b in 0..n {
                                r[a * n + b] = T::from_f64x(root[(a, b)]);
                            }
                        }
                    }
                    None => report.root_failures += 1,
                }
            }
            let r = &state[ROOTS][factor_at..factor_at + n * n];
            roots.push(Mat::<f64>::from_fn(n, n, |a, b| r[a * n + b].to_f64x()));
            factor_at += n * n;
        }
        offset = factor_at;

        // (E3) graft accumulator, (E5) first moment.
        let mut g_hat = Vec::with_capacity(gb.len());
        for (e, &i) in block.index.iter().enumerate() {
            let gi = gb[e];
            let v = state[V][i].to_f64x();
            let v = match c.grafting {
                Grafting::None => v,
                Grafting::Adagrad { .. } => v + gi * gi,
                Grafting::Adam { beta2, .. } => beta2 * v + (1.0 - beta2) * gi * gi,
            };
            state[V][i] = T::from_f64x(v);
            if c.beta1 == 0.0 {
                g_hat.push(gi);
            } else {
                let m = c.beta1 * state[M][i].to_f64x() + (1.0 - c.beta1) * gi;
                state[M][i] = T::from_f64x(m);
                let bc1 = if c.use_bias_correction {
                    1.0 - c.beta1.powf(t as f64)
                } else {
                    1.0
                };
                g_hat.push(m / bc1);
            }
        }
        // (E6) graft direction.
        let graft: Option<Vec<f64>> = match c.grafting {
            Grafting::None => None,
            Grafting::Adagrad { eps } => Some(
                block
                    .index
                    .iter()
                    .zip(&g_hat)
                    .map(|(&i, gh)| gh / (state[V][i].to_f64x().sqrt() + eps))
                    .collect(),
            ),
            Grafting::Adam { beta2, eps } => {
                let bc2 = 1.0 - beta2.powf(t as f64);
                Some(
                    block
                        .index
                        .iter()
                        .zip(&g_hat)
                        .map(|(&i, gh)| gh / ((state[V][i].to_f64x() / bc2).sqrt() + eps))
                        .collect(),
                )
            }
        };
        // (E7)-(E8) direction.
        let mut delta = match (&graft, graft_only) {
            (Some(dg), true) => dg.clone(),
            _ => {
                let mut d = g_hat;
                for (j, root) in roots.iter().enumerate() {
                    d = mode_product(&d, &block.dims, j, root.as_ref(), par);
                }
                if let Some(dg) = &graft {
                    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
                    let scale = norm(dg) / (norm(&d) + 1e-16);
                    d.iter_mut().for_each(|x| *x *= scale);
                }
                d
            }
        };
        // (E9)-(E10) decoupled weight decay and the update.
        for ((d, &wi), &i) in delta.iter_mut().zip(&wb).zip(&block.index) {
            *d += wd * wi;
            let new = T::from_f64x(wi - lr * *d);
            let change = (new - p[i]).to_f64x();
            sums.param_sq += wi * wi;
            sums.update_sq += change * change;
            p[i] = new;
        }
    }
    (sums, report)
}

/// `Q diag(mu^(-1/r)) Q^T` of a symmetric `a` (after the epsilon shift of
/// SHAMPOO.md E3), or `None` when the eigendecomposition fails or is not finite.
fn inverse_root(a: &Mat<f64>, epsilon: f64, r: usize) -> Option<Mat<f64>> {
    let n = a.nrows();
    if (0..n).any(|i| (0..n).any(|j| !a[(i, j)].is_finite())) {
        return None;
    }
    let eig = a.self_adjoint_eigen(Side::Lower).ok()?;
    let q = eig.U();
    let mu: Vec<f64> = (0..n).map(|i| eig.S().column_vector()[i]).collect();
    let min = mu.iter().copied().fold(f64::INFINITY, f64::min);
    let shift = if min < epsilon { epsilon - min } else { 0.0 };
    let scale: Vec<f64> = mu
        .iter()
        .map(|m| (m + shift).powf(-1.0 / r as f64))
        .collect();
    let q_scaled = Mat::<f64>::from_fn(n, n, |a, i| q[(a, i)] * scale[i]);
    let mut root = Mat::<f64>::zeros(n, n);
    matmul(
        &mut root,
        Accum::Replace,
        &q_scaled,
        q.transpose(),
        1.0,
        Par::Seq,
    );
    if (0..n).any(|i| (0..n).any(|j| !root[(i, j)].is_finite())) {
        return None;
    }
    Some(root)
}
