//! The GPT's building blocks on flat row-major buffers: Linear layers (faer
//! matmuls), LayerNorm, GELU, causal attention, and the tied-head loss.
//!
//! Each forward kernel stores exactly what its backward needs (LayerNorm:
//! input, mean and rstd; GELU: its input; attention: the probabilities), so
//! the backward recomputes the cheap parts instead of keeping them.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::real::Real;

/// Rows per rayon task for row-wise kernels: enough work to amortize a task.
const ROWS_PER_TASK: usize = 16;
/// Elements per rayon task for elementwise kernels.
const ELEMS_PER_TASK: usize = 8192;

#[inline(always)]
fn c<T: Real>(x: f64) -> T {
    T::from_f64x(x)
}

fn rm<T: Real>(s: &[T], rows: usize, cols: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(s, rows, cols)
}

fn rm_mut<T: Real>(s: &mut [T], rows: usize, cols: usize) -> MatMut<'_, T> {
    MatMut::from_row_major_slice_mut(s, rows, cols)
}

/// All threads for the large products; faer itself falls back to one thread
/// where a product is too small to split.
pub(crate) fn par() -> Par {
    Par::rayon(0)
}

/// `out[n, o] = inp[n, i] w[o, i]^T + bias[o]` (torch Linear layout).
pub(crate) fn linear_forward<T: Real>(
    out: &mut [T],
    inp: &[T],
    w: &[T],
    bias: Option<&[T]>,
    (n, i, o): (usize, usize, usize),
) {
    // Seeding the output with the bias lets the matmul accumulate onto it,
    // saving a separate bias pass.
    let accum = match bias {
        Some(b) => {
            out.par_chunks_mut(o)
                .with_min_len(ROWS_PER_TASK)
                .for_each(|row| row.copy_from_slice(b));
            Accum::Add
        }
        None => Accum::Replace,
    };
    matmul(
        rm_mut(out, n, o),
        accum,
        rm(inp, n, i),
        rm(w, o, i).transpose(),
        T::one(),
        par(),
    );
}

/// Backward of [`linear_forward`]: `dinp (=|+=) dout w`, `dw += dout^T inp`,
/// `dbias += 1^T dout` (the column sums, as a product with a ones vector so it
/// runs through the same tuned kernel).
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward<T: Real>(
    dinp: Option<(&mut [T], Accum)>,
    dw: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    w: &[T],
    ones: &[T],
    (n, i, o): (usize, usize, usize),
) {
    if let Some((dinp, accum)) = dinp {
        matmul(
            rm_mut(dinp, n, i),
            accum,
            rm(dout, n, o),
            rm(w, o, i),
            T::one(),
            par(),
        );
    }
    matmul(
        rm_mut(dw, o, i),
        Accum::Add,
        rm(dout, n, o).transpose(),
        rm(inp, n, i),
        T::one(),
        par(),
    );
    if let Some(db) = dbias {
        matmul(
            rm_mut(db, 1, o),
            Accum::Add,
            rm(&ones[..n], 1, n),
            rm(dout, n, o),
            T::one(),
            par(),
        );
    }
}

/// LayerNorm of one row (eps 1e-5, biased variance); returns `(mean, rstd)`.
#[inline]
fn ln_row<T: Real>(out: &mut [T], x: &[T], w: &[T], b: &[T]) -> (T, T) {
    let inv_n = c::<T>(1.0 / x.len() as f64);
    let mean = x.iter().fold(T::zero(), |a, &v| a + v) * inv_n;
    let var = x
        .iter()
        .fold(T::zero(), |a, &v| a + (v - mean) * (v - mean))
        * inv_n;
    let rstd = T::one() / (var + c::<T>(1e-5)).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * rstd * w + b;
    }
    (mean, rstd)
}

/// LayerNorm backward of one row, in place: `d` holds the gradient of the
/// output on entry and of the input on exit (`w` is the weight, `x` the
/// input). With `xhat = (x - mean) rstd` and `g = d w`:
/// `dx = rstd (g - mean(g) - xhat mean(g xhat))`.
#[inline]
fn ln_row_backward_in_place<T: Real>(d: &mut [T], x: &[T], mean: T, rstd: T, w: &[T]) {
    let (mg, mgx) = ln_row_grad_means(d, x, mean, rstd, w);
    for ((dv, &xv), &wv) in d.iter_mut().zip(x).zip(w) {
        let xhat = (xv - mean) * rstd;
        *dv = rstd * (*dv * wv - mg - xhat * mgx);
    }
}

/// `(mean(g), mean(g xhat))` with `g = dout w`: the two row means of the
/// LayerNorm backward.
#[inline]
fn ln_row_grad_means<T: Real>(dout: &[T], x: &[T], mean: T, rstd: T, w: &[T]) -> (T, T) {
    let inv_n = c::<T>(1.0 / x.len() as f64);
    let (mut sg, mut sgx) = (T::zero(), T::zero());
    for ((&dv, &xv), &wv) in dout.iter().zip(x).zip(w) {
        let g = dv * wv;
        sg += g;
        sgx += g * (xv - mean) * rstd;
    }
    (sg * inv_n, sgx * inv_n)
}

/// LayerNorm backward of one row into `dx` (`+=` when `add`).
#[inline]
fn ln_row_backward<T: Real>(
    dx: &mut [T],
    dout: &[T],
    x: &[T],
    mean: T,
    rstd: T,
    w: &[T],
    add: bool,
) {
    let (mg, mgx) = ln_row_grad_means(dout, x, mean, rstd, w);
    for (((o, &dv), &xv), &wv) in dx.iter_mut().zip(dout).zip(x).zip(w) {
        let v = rstd * (dv * wv - mg - (xv - mean) * rstd * mgx);
        *o = if add { *o + v } else { v };
    }
}

/// Adds one row's contribution to the LayerNorm weight and bias gradients.
#[inline]
fn ln_row_param_grads<T: Real>(dw: &mut [T], db: &mut [T], dout: &[T], x: &[T], mean: T, rstd: T) {
    for (((gw, gb), &dv), &xv) in dw.iter_mut().zip(db.iter_mut()).zip(dout).zip(x) {
        *gw += dv * (xv - mean) * rstd;
        *gb += dv;
    }
}

/// LayerNorm over rows of width `cols`: writes `out`, `mean`, `rstd`.
pub(crate) fn layernorm_forward<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    w: &[T],
    b: &[T],
    cols: usize,
) {
    out.par_chunks_mut(cols)
        .zip(inp.par_chunks(cols))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, x), (m, r))| (*m, *r) = ln_row(o, x, w, b));
}

/// Backward of [`layernorm_forward`]: `dinp (=|+=) ...`, `dw += ...`, `db += ...`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward<T: Real>(
    dinp: &mut [T],
    add: bool,
    dw: &mut [T],
    db: &mut [T],
    dout: &[T],
    inp: &[T],
    mean: &[T],
    rstd: &[T],
    w: &[T],
    cols: usize,
) {
    dinp.par_chunks_mut(cols)
        .zip(dout.par_chunks(cols))
        .zip(inp.par_chunks(cols))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(((dx, d), x), (&m, &r))| ln_row_backward(dx, d, x, m, r, w, add));
    // The weight gradients reduce over rows: one sequential, vectorizable
    // pass (a few flops per element) rather than per-thread partial buffers.
    for ((d, x), (&m, &r)) in dout
        .chunks(cols)
        .zip(inp.chunks(cols))
        .zip(mean.iter().zip(rstd))
    {
        ln_row_param_grads(dw, db, d, x, m, r);
    }
}

/// qk-norm forward: LayerNorm over each head's slice of q and k. `qkv` rows
/// are `[q | k | v]` (width 3C), `qkn` rows `[q | k]` (width 2C); `stats`
/// holds `(mean, rstd)` per row and per head slot `j` in `0..2H` (q heads
/// first). Weights `[hs]` are shared by all heads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_norm_forward<T: Real>(
    qkn: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    qkv: &[T],
    (qw, qb, kw, kb): (&[T], &[T], &[T], &[T]),
    n_embd: usize,
    n_head: usize,
) {
    let hs = n_embd / n_head;
    qkn.par_chunks_mut(2 * n_embd)
        .zip(qkv.par_chunks(3 * n_embd))
        .zip(
            mean.par_chunks_mut(2 * n_head)
                .zip(rstd.par_chunks_mut(2 * n_head)),
        )
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, x), (m, r))| {
            for j in 0..2 * n_head {
                let (w, b) = if j < n_head { (qw, qb) } else { (kw, kb) };
                let s = j * hs..(j + 1) * hs;
                (m[j], r[j]) = ln_row(&mut o[s.clone()], &x[s], w, b);
            }
        });
}

/// Backward of [`qk_norm_forward`], in place on the q and k parts of `dqkv`
/// (gradient of the normalized q, k on entry; of the raw ones on exit), plus
/// the shared weight gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_norm_backward<T: Real>(
    dqkv: &mut [T],
    (dqw, dqb): (&mut [T], &mut [T]),
    (dkw, dkb): (&mut [T], &mut [T]),
    qkv: &[T],
    mean: &[T],
    rstd: &[T],
    (qw, kw): (&[T], &[T]),
    n_embd: usize,
    n_head: usize,
) {
    let hs = n_embd / n_head;
    // Weight gradients first: they need the output gradient, which the
    // in-place pass below overwrites.
    for ((d, x), (m, r)) in dqkv
        .chunks(3 * n_embd)
        .zip(qkv.chunks(3 * n_embd))
        .zip(mean.chunks(2 * n_head).zip(rstd.chunks(2 * n_head)))
    {
        for j in 0..2 * n_head {
            let s = j * hs..(j + 1) * hs;
            if j < n_head {
                ln_row_param_grads(dqw, dqb, &d[s.clone()], &x[s], m[j], r[j]);
            } else {
                ln_row_param_grads(dkw, dkb, &d[s.clone()], &x[s], m[j], r[j]);
            }
        }
    }
    dqkv.par_chunks_mut(3 * n_embd)
        .zip(qkv.par_chunks(3 * n_embd))
        .zip(mean.par_chunks(2 * n_head).zip(rstd.par_chunks(2 * n_head)))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((d, x), (m, r))| {
            for j in 0..2 * n_head {
                let w = if j < n_head { qw } else { kw };
                let s = j * hs..(j + 1) * hs;
                ln_row_backward_in_place(&mut d[s.clone()], &x[s], m[j], r[j], w);
            }
        });
}

const GELU_K: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const GELU_A: f64 = 0.044715;

/// GELU, tanh approximation: `0.5 x (1 + tanh(u))`, `u = k (x + a x^3)`,
/// computed as `x / (1 + exp(-2u))` (the same function): one `exp` instead
/// of libm's `tanh`, which costs several times more and dominated the step.
pub(crate) fn gelu_forward<T: Real>(out: &mut [T], inp: &[T]) {
    let (k2, a) = (c::<T>(-2.0 * GELU_K), c::<T>(GELU_A));
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = x / (T::one() + (k2 * (x + a * x * x * x)).exp());
            }
        });
}

/// Backward of [`gelu_forward`], in place: `d` holds the output gradient on
/// entry and the input gradient on exit. With `s = sigmoid(2u)`:
/// `d/dx [x s] = s + 2 x s (1 - s) u'`, `u' = k (1 + 3 a x^2)`.
pub(crate) fn gelu_backward<T: Real>(d: &mut [T], inp: &[T]) {
    let (k2, a) = (c::<T>(-2.0 * GELU_K), c::<T>(GELU_A));
    let (two_k, a3) = (c::<T>(2.0 * GELU_K), c::<T>(3.0 * GELU_A));
    d.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK))
        .for_each(|(d, x)| {
            for (d, &x) in d.iter_mut().zip(x) {
                let s = T::one() / (T::one() + (k2 * (x + a * x * x * x)).exp());
                let du = two_k * (T::one() + a3 * x * x);
                *d *= s + x * s * (T::one() - s) * du;
            }
        });
}

/// Sizes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct AttnShape {
    /// Sequence length.
    pub t: usize,
    /// Width `C`.
    pub c: usize,
    /// Heads.
    pub h: usize,
}

/// Causal self-attention forward, parallel over the batch.
///
/// `qk` holds q at columns `0..C` and k at `C..2C` of rows of width
/// `qk_stride` (the raw `qkv`, or the qk-normed copy); `qkv` holds v at
/// `2C..3C`. Writes the probabilities `att` `[B, H, T, T]` (zero above the
/// diagonal) and the heads' outputs `y` `[B, T, C]`; `max_logit[b]` gets the
/// largest unmasked `q.k / sqrt(hs)` of batch row `b`.
pub(crate) fn attention_forward<T: Real>(
    y: &mut [T],
    att: &mut [T],
    max_logit: &mut [T],
    qk: &[T],
    qk_stride: usize,
    qkv: &[T],
    s: AttnShape,
) {
    let AttnShape { t, c: ch, h, .. } = s;
    let hs = ch / h;
    let scale = c::<T>(1.0 / (hs as f64).sqrt());
    y.par_chunks_mut(t * ch)
        .zip(att.par_chunks_mut(h * t * t))
        .zip(max_logit.par_iter_mut())
        .zip(qk.par_chunks(t * qk_stride).zip(qkv.par_chunks(t * 3 * ch)))
        .for_each(|(((y, att), mx), (qk, qkv))| {
            let qk = rm(qk, t, qk_stride);
            let v = rm(qkv, t, 3 * ch);
            let mut y = rm_mut(y, t, ch);
            let mut best = T::neg_infinity();
            for (hd, p) in att.chunks_mut(t * t).enumerate() {
                let q = qk.subcols(hd * hs, hs);
                let k = qk.subcols(ch + hd * hs, hs);
                // Scores for every (query, key) pair; the masked half is
                // computed too, since one dense product beats a triangular loop.
                matmul(
                    rm_mut(p, t, t),
                    Accum::Replace,
                    q,
                    k.transpose(),
                    scale,
                    Par::Seq,
                );
                for (i, row) in p.chunks_mut(t).enumerate() {
                    let (live, masked) = row.split_at_mut(i + 1);
                    let m = live.iter().fold(T::neg_infinity(), |a, &x| a.max(x));
                    best = best.max(m);
                    let mut sum = T::zero();
                    for x in live.iter_mut() {
                        *x = (*x - m).exp();
                        sum += *x;
                    }
                    let inv = T::one() / sum;
                    live.iter_mut().for_each(|x| *x *= inv);
                    masked.iter_mut().for_each(|x| *x = T::zero());
                }
                matmul(
                    y.as_mut().subcols_mut(hd * hs, hs),
                    Accum::Replace,
                    rm(p, t, t),
                    v.subcols(2 * ch + hd * hs, hs),
                    T::one(),
                    Par::Seq,
                );
            }
            *mx = best;
        });
}

/// Backward of [`attention_forward`]: writes the q, k, v gradients into
/// `dqkv` (`[B, T, 3C]`, replacing), using `dscores` (`[B, T, T]`) as
/// scratch. The q and k gradients are those of whatever `qk` held.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward<T: Real>(
    dqkv: &mut [T],
    dscores: &mut [T],
    dy: &[T],
    att: &[T],
    qk: &[T],
    qk_stride: usize,
    qkv: &[T],
    s: AttnShape,
) {
    let AttnShape { t, c: ch, h, .. } = s;
    let hs = ch / h;
    let scale = c::<T>(1.0 / (hs as f64).sqrt());
    dqkv.par_chunks_mut(t * 3 * ch)
        .zip(dscores.par_chunks_mut(t * t))
        .zip(dy.par_chunks(t * ch).zip(att.par_chunks(h * t * t)))
        .zip(qk.par_chunks(t * qk_stride).zip(qkv.par_chunks(t * 3 * ch)))
        .for_each(|(((dqkv, ds), (dy, att)), (qk, qkv))| {
            let qk = rm(qk, t, qk_stride);
            let v = rm(qkv, t, 3 * ch);
            let dy = rm(dy, t, ch);
            let mut dqkv = rm_mut(dqkv, t, 3 * ch);
            for (hd, p) in att.chunks(t * t).enumerate() {
                let dyh = dy.subcols(hd * hs, hs);
                let vh = v.subcols(2 * ch + hd * hs, hs);
                let pm = rm(p, t, t);
                // dP = dY V^T, then the softmax backward turns it into dS.
                matmul(
                    rm_mut(ds, t, t),
                    Accum::Replace,
                    dyh,
                    vh.transpose(),
                    T::one(),
                    Par::Seq,
                );
                for (i, (drow, prow)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                    let dot = drow[..=i]
                        .iter()
                        .zip(&prow[..=i])
                        .fold(T::zero(), |a, (&d, &p)| a + d * p);
                    for (d, &p) in drow[..=i].iter_mut().zip(&prow[..=i]) {
                        *d = p * (*d - dot) * scale;
                    }
                    drow[i + 1..].iter_mut().for_each(|d| *d = T::zero());
                }
                let dsm = rm(ds, t, t);
                matmul(
                    dqkv.as_mut().subcols_mut(2 * ch + hd * hs, hs),
                    Accum::Replace,
                    pm.transpose(),
                    dyh,
                    T::one(),
                    Par::Seq,
                );
                matmul(
                    dqkv.as_mut().subcols_mut(hd * hs, hs),
                    Accum::Replace,
                    dsm,
                    qk.subcols(ch + hd * hs, hs),
                    T::one(),
                    Par::Seq,
                );
                matmul(
                    dqkv.as_mut().subcols_mut(ch + hd * hs, hs),
                    Accum::Replace,
                    dsm.transpose(),
                    qk.subcols(hd * hs, hs),
                    T::one(),
                    Par::Seq,
                );
            }
        });
}

/// Row-wise log-sum-exp of `logits` `[N, V]` into `lse` `[N]`.
pub(crate) fn logsumexp_rows<T: Real>(lse: &mut [T], logits: &[T], v: usize) {
    lse.par_iter_mut()
        .zip(logits.par_chunks(v))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(l, row)| {
            let m = row.iter().fold(T::neg_infinity(), |a, &x| a.max(x));
            let s = row.iter().fold(T::zero(), |a, &x| a + (x - m).exp());
            *l = m + s.ln();
        });
}

/// Gradient of `mean CE + z mean(lse^2)` with respect to the logits:
/// `(p (1 + 2 z lse) - onehot(target)) / N`, with `p = exp(logit - lse)`.
pub(crate) fn loss_backward<T: Real>(
    dlogits: &mut [T],
    logits: &[T],
    lse: &[T],
    targets: &[u32],
    z_loss: f64,
    v: usize,
) {
    let n = lse.len();
    let inv_n = c::<T>(1.0 / n as f64);
    let two_z = c::<T>(2.0 * z_loss);
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(lse.par_iter().zip(targets.par_iter()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((d, row), (&l, &tgt))| {
            let f = (T::one() + two_z * l) * inv_n;
            for (d, &x) in d.iter_mut().zip(row) {
                *d = (x - l).exp() * f;
            }
            d[tgt as usize] -= inv_n;
        });
}
