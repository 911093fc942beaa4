//! The Adam family's per-element math: `adam` (coupled L2), `adamw`
//! (decoupled decay, optional update clipping) and the direction of `lamb`.
//!
//! Every variant is `p_new = p*decay - lr*(u + wd_dir*p)` (with `l2*p` added
//! to the gradient for adam) with
//! `u = m_hat / (sqrt(v_hat) + eps)`; the variants differ only in the scalars:
//!
//! | kind | `l2` (added to g) | `decay` | `lr` | `wd_dir` | passes | bytes/param (f32) |
//! |---|---|---|---|---|---|---|
//! | adam | wd | 1 | lr | 0 | scan + 1 | 4 + 28 = 32 |
//! | adamw | 0 | 1 - lr*wd | lr | 0 | scan + 1 | 4 + 28 = 32 |
//! | adamw + update_clip_rms | 0 | 1 - lr*wd | lr*clip | 0 | scan + 2 | 4 + 20 + 16 = 40 |
//! | lamb | 0 | 1 | lr*trust | wd | scan + 2 | 4 + 24 + 16 = 44 |
//!
//! The scan pass reads the gradient once (non-finite check and global norm,
//! so a skipped step writes nothing). Under `on_nonfinite = "unchecked"`,
//! adam and adamw without update clipping or gradient clipping skip it: the
//! fused pass sums `g^2` as it goes (`sum_grad`), 28 bytes per parameter. Two-pass variants update `m, v` and
//! accumulate the per-tensor norm in pass A, then recompute `u` from the new
//! `m, v` in pass B instead of storing it: no tensor-sized temporary.

use crate::backend::reduce::{fused_norms, LaneSums, Sums, BLOCK};
use crate::clip::GradTransform;
use crate::real::{GradElem, Real};

/// Per-tensor scalars of one Adam-family step, cast to `T` once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamCoeffs<T> {
    b1: T,
    one_minus_b1: T,
    b2: T,
    one_minus_b2: T,
    inv_bc1: T,
    inv_sqrt_bc2: T,
    eps: T,
    /// Coupled L2 weight decay added to the gradient (adam).
    pub l2: T,
    /// Multiplies the parameter (decoupled decay).
    pub decay: T,
    /// Multiplies the direction (learning rate times trust ratio or clip).
    pub lr: T,
    /// Weight decay added to the direction (lamb).
    pub wd_dir: T,
}

impl<T: Real> AdamCoeffs<T> {
    /// Moments and bias corrections for 1-based step `t`; the caller sets the
    /// variant's scalars (they start as plain Adam without decay, `lr` 0).
    pub(crate) fn new(beta1: f64, beta2: f64, eps: f64, t: u64) -> Self {
        let bc1 = 1.0 - beta1.powf(t as f64);
        let bc2 = 1.0 - beta2.powf(t as f64);
        AdamCoeffs {
            b1: T::from_f64x(beta1),
            one_minus_b1: T::from_f64x(1.0 - beta1),
            b2: T::from_f64x(beta2),
            one_minus_b2: T::from_f64x(1.0 - beta2),
            inv_bc1: T::from_f64x(1.0 / bc1),
            inv_sqrt_bc2: T::from_f64x(1.0 / bc2.sqrt()),
            eps: T::from_f64x(eps),
            l2: T::zero(),
            decay: T::one(),
            lr: T::zero(),
            wd_dir: T::zero(),
        }
    }

    #[inline(always)]
    pub(crate) fn moments(&self, g: T, m: &mut T, v: &mut T) {
        *m = self.b1 * *m + self.one_minus_b1 * g;
        *v = self.b2 * *v + self.one_minus_b2 * g * g;
    }

    /// `u = m_hat / (sqrt(v_hat) + eps)`.
    #[inline(always)]
    pub(crate) fn direction(&self, m: T, v: T) -> T {
        (m * self.inv_bc1) / (v.sqrt() * self.inv_sqrt_bc2 + self.eps)
    }
}

/// One fused pass (adam, adamw): reads `p, g, m, v`, writes `p, m, v`.
/// `COUPLED` (adam with weight decay) adds `l2*p` to the gradient; otherwise
/// the parameter is multiplied by `decay` (adamw). Each variant compiles
/// without the other's operations.
#[inline(always)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>, const COUPLED: bool>(
    k: &AdamCoeffs<T>,
    prep: &P,
    p: &mut [T],
    g: &[G],
    m: &mut [T],
    v: &mut [T],
    sum_grad: bool,
) -> Sums {
    fused_norms(p, sum_grad.then_some(g), (g, (m, v)), |p, (g, (m, v))| {
        let g = prep.apply(g.get());
        let (g, kept) = if COUPLED {
            (g + k.l2 * p, p)
        } else {
            (g, p * k.decay)
        };
        k.moments(g, m, v);
        kept - k.lr * k.direction(*m, *v)
    })
}

/// Pass A of the two-pass variants: reads `g, m, v` (and `p` when given),
/// writes `m, v`, accumulates `sum((u + wd_dir*p)^2)` and `sum(p^2)`.
#[inline(always)]
pub(crate) fn moments<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    k: &AdamCoeffs<T>,
    prep: &P,
    p: Option<&[T]>,
    g: &[G],
    m: &mut [T],
    v: &mut [T],
) -> Sums {
    let mut sums = LaneSums::default();
    let mut dir = [T::zero(); BLOCK];
    let blocks = g
        .chunks(BLOCK)
        .zip(m.chunks_mut(BLOCK).zip(v.chunks_mut(BLOCK)));
    match p {
        Some(p) => {
            for ((gb, (mb, vb)), pb) in blocks.zip(p.chunks(BLOCK)) {
                sums.param_sq.add_sq(pb);
                let ub = &mut dir[..gb.len()];
                for ((g, p), ((m, v), u)) in gb
                    .iter()
                    .zip(pb)
                    .zip(mb.iter_mut().zip(vb.iter_mut()).zip(ub.iter_mut()))
                {
                    k.moments(prep.apply(g.get()), m, v);
                    *u = k.direction(*m, *v) + k.wd_dir * *p;
                }
                sums.direction_sq.add_sq(ub);
            }
        }
        None => {
            for (gb, (mb, vb)) in blocks {
                let ub = &mut dir[..gb.len()];
                for (g, ((m, v), u)) in gb
                    .iter()
                    .zip(mb.iter_mut().zip(vb.iter_mut()).zip(ub.iter_mut()))
                {
                    k.moments(prep.apply(g.get()), m, v);
                    *u = k.direction(*m, *v);
                }
                sums.direction_sq.add_sq(ub);
            }
        }
    }
    sums.sums()
}

/// Pass B of the two-pass variants: reads `p, m, v`, writes `p`.
#[inline(always)]
pub(crate) fn apply<T: Real>(k: &AdamCoeffs<T>, p: &mut [T], m: &[T], v: &[T]) -> Sums {
    fused_norms(p, None::<&[T]>, (m, v), |p, (m, v)| {
        p * k.decay - k.lr * (k.direction(*m, *v) + k.wd_dir * p)
    })
}

impl<T: Real> AdamCoeffs<T> {
    /// Whether the coupled-L2 variant of [`step`] is needed.
    pub(crate) fn coupled(&self) -> bool {
        self.l2 != T::zero()
    }
}
