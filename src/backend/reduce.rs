//! Vectorizable reductions for the CPU passes.
//!
//! A plain `for` loop that adds into one float accumulator cannot be
//! vectorized (float addition is not associative, so LLVM keeps the order).
//! These helpers sum into eight independent `f64` lanes instead; the update
//! loops write per-element values into a small stack block and call them, so
//! the update loop itself stays free of reductions and vectorizes too.

use crate::real::Real;

/// Elements per stack block in the fused passes (fits in L1 with room to spare).
pub(crate) const BLOCK: usize = 256;
const LANES: usize = 8;

/// `sum(x^2)`, accumulated in `f64`.
#[inline]
pub(crate) fn sum_sq<T: Real>(x: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            let v = c[l].to_f64x();
            acc[l] += v * v;
        }
    }
    let tail: f64 = it.remainder().iter().map(|v| v.to_f64x() * v.to_f64x()).sum();
    acc.iter().sum::<f64>() + tail
}

/// `sum(a * b)`, accumulated in `f64`.
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0f64; LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..LANES {
            acc[l] += ca[l].to_f64x() * cb[l].to_f64x();
        }
    }
    let tail: f64 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(x, y)| x.to_f64x() * y.to_f64x())
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Per-tensor sums a pass accumulates (which ones depends on the pass).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Sums {
    /// `sum(p^2)` over the parameter before the step.
    pub param_sq: f64,
    /// `sum((p_new - p)^2)`.
    pub update_sq: f64,
    /// `sum(g^2)` over the clamped, unscaled gradient.
    pub grad_sq: f64,
    /// `sum(g * p)` over the clamped, unscaled gradient.
    pub grad_dot_param: f64,
    /// `sum(u^2)` over the optimizer's direction before the trust ratio or
    /// update clipping.
    pub direction_sq: f64,
}

impl Sums {
    pub(crate) fn add(&mut self, o: &Sums) {
        self.param_sq += o.param_sq;
        self.update_sq += o.update_sq;
        self.grad_sq += o.grad_sq;
        self.grad_dot_param += o.grad_dot_param;
        self.direction_sq += o.direction_sq;
    }
}
