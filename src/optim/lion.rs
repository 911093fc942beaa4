//! optax.lion's per-element math.
//!
//! `c = b1*m + (1-b1)*g`; `m = b2*m + (1-b2)*g`; `p -= lr*(sign(c) + wd*p)`
//! with `sign(0) = 0`. Bytes per f32 parameter: scan 4 + read `p, g, m` and
//! write `p, m` 20 = 24.

use crate::backend::reduce::{fused_one_state, Sums};
use crate::clip::GradTransform;
use crate::real::{GradElem, Real};

/// Per-tensor scalars of one Lion step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LionCoeffs<T> {
    b1: T,
    one_minus_b1: T,
    b2: T,
    one_minus_b2: T,
    lr: T,
    decay: T,
}

impl<T: Real> LionCoeffs<T> {
    pub(crate) fn new(lr: f64, beta1: f64, beta2: f64, wd: f64) -> Self {
        LionCoeffs {
            b1: T::from_f64x(beta1),
            one_minus_b1: T::from_f64x(1.0 - beta1),
            b2: T::from_f64x(beta2),
            one_minus_b2: T::from_f64x(1.0 - beta2),
            lr: T::from_f64x(lr),
            decay: T::from_f64x(1.0 - lr * wd),
        }
    }
}

/// `sign` with `sign(0) = 0` (num-traits' `signum(0.0)` is 1).
#[inline(always)]
fn sign<T: Real>(x: T) -> T {
    if x > T::zero() {
        T::one()
    } else if x < T::zero() {
        -T::one()
    } else {
        T::zero()
    }
}

/// Reads `p, g, m`, writes `p, m`.
#[inline(always)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    k: &LionCoeffs<T>,
    prep: &P,
    p: &mut [T],
    g: &[G],
    m: &mut [T],
    sum_grad: bool,
) -> Sums {
    fused_one_state(p, g, m, sum_grad, |p, g, m| {
        let g = prep.apply(g.get());
        let c = k.b1 * *m + k.one_minus_b1 * g;
        *m = k.b2 * *m + k.one_minus_b2 * g;
        p * k.decay - k.lr * sign(c)
    })
}
