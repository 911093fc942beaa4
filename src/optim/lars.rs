//! optax.lars's per-element math.
//!
//! `u = g + wd*p`; `r = tc*||p||/(||u|| + eps)` (1 if either norm is 0);
//! `u = lr*r*u`; `b = u + momentum*b`; `d = u + momentum*b` if nesterov else
//! `b`; `p -= d`.
//!
//! The trust ratio needs `||u||` before any write, and the scan pass (which
//! must read every gradient before anything is written, for the non-finite
//! check) already reads `g`: it also reads `p` and accumulates `sum(g^2)`,
//! `sum(g*p)` and `sum(p^2)`, from which
//! `||s*g + wd*p||^2 = s^2*gg + 2*s*wd*gp + wd^2*pp` for any global clip
//! factor `s`. So LARS moves scan 8 + read `p, g, b` and write `p, b` 20 =
//! 28 bytes per f32 parameter, its minimum.

use crate::backend::reduce::{fused_one_state, Sums};
use crate::clip::GradTransform;
use crate::real::{GradElem, Real};

/// `||s*g + wd*p||` from the scan's sums.
pub(crate) fn direction_norm(scan: &Sums, clip_factor: f64, wd: f64) -> f64 {
    let s = clip_factor;
    let sq = s * s * scan.grad_sq + 2.0 * s * wd * scan.grad_dot_param + wd * wd * scan.param_sq;
    sq.max(0.0).sqrt()
}

/// Per-tensor scalars of one LARS step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LarsCoeffs<T> {
    wd: T,
    lr_trust: T,
    momentum: T,
    u_in_d: T,
    b_in_d: T,
}

impl<T: Real> LarsCoeffs<T> {
    pub(crate) fn new(lr_trust: f64, wd: f64, momentum: f64, nesterov: bool) -> Self {
        let (u_in_d, b_in_d) = if nesterov {
            (1.0, momentum)
        } else {
            (0.0, 1.0)
        };
        LarsCoeffs {
            wd: T::from_f64x(wd),
            lr_trust: T::from_f64x(lr_trust),
            momentum: T::from_f64x(momentum),
            u_in_d: T::from_f64x(u_in_d),
            b_in_d: T::from_f64x(b_in_d),
        }
    }
}

/// Reads `p, g, b`, writes `p, b`.
#[inline(always)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    k: &LarsCoeffs<T>,
    prep: &P,
    p: &mut [T],
    g: &[G],
    b: &mut [T],
) -> Sums {
    fused_one_state(p, g, b, false, |p, g, b| {
        let u = k.lr_trust * (prep.apply(g.get()) + k.wd * p);
        *b = u + k.momentum * *b;
        p - (k.u_in_d * u + k.b_in_d * *b)
    })
}
