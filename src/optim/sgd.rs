//! torch.optim.SGD's per-element math.
//!
//! `g += wd*p`; `b = g` at the first step, else `b = momentum*b + (1-dampening)*g`;
//! `d = g + momentum*b` if nesterov else `b`; `p -= lr*d`.
//! Bytes per f32 parameter: scan 4 + read `p, g, b` and write `p, b` 20 = 24;
//! without momentum (no buffer) 4 + 12 = 16.

use crate::backend::reduce::{fused_norms, fused_one_state, Sums};
use crate::clip::GradTransform;
use crate::real::{GradElem, Real};

/// Per-tensor scalars of one SGD step. The first-step and Nesterov choices
/// become coefficients so the loop has no branches:
/// `b = keep*b + take*g`, `d = g_in_d*g + b_in_d*b`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdCoeffs<T> {
    lr: T,
    wd: T,
    keep: T,
    take: T,
    g_in_d: T,
    b_in_d: T,
}

impl<T: Real> SgdCoeffs<T> {
    pub(crate) fn new(
        lr: f64,
        wd: f64,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        first: bool,
    ) -> Self {
        let (keep, take) = if first {
            (0.0, 1.0)
        } else {
            (momentum, 1.0 - dampening)
        };
        let (g_in_d, b_in_d) = if nesterov {
            (1.0, momentum)
        } else {
            (0.0, 1.0)
        };
        SgdCoeffs {
            lr: T::from_f64x(lr),
            wd: T::from_f64x(wd),
            keep: T::from_f64x(keep),
            take: T::from_f64x(take),
            g_in_d: T::from_f64x(g_in_d),
            b_in_d: T::from_f64x(b_in_d),
        }
    }
}

/// SGD with a momentum buffer: reads `p, g, b`, writes `p, b`.
#[inline(always)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    k: &SgdCoeffs<T>,
    prep: &P,
    p: &mut [T],
    g: &[G],
    b: &mut [T],
    sum_grad: bool,
) -> Sums {
    fused_one_state(p, g, b, sum_grad, |p, g, b| {
        let g = prep.apply(g.get()) + k.wd * p;
        *b = k.keep * *b + k.take * g;
        p - k.lr * (k.g_in_d * g + k.b_in_d * *b)
    })
}

/// SGD without momentum: reads `p, g`, writes `p`.
#[inline(always)]
pub(crate) fn step_plain<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    k: &SgdCoeffs<T>,
    prep: &P,
    p: &mut [T],
    g: &[G],
    sum_grad: bool,
) -> Sums {
    fused_norms(p, sum_grad.then_some(g), g, |p, g| {
        p - k.lr * (prep.apply(g.get()) + k.wd * p)
    })
}
