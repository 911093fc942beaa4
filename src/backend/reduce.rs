//! Vectorizable reductions for the CPU passes.
//!
//! A plain `for` loop that adds into one float accumulator cannot be
//! vectorized (float addition is not associative, so LLVM keeps the order).
//! These helpers sum into 32 independent lanes instead; the update
//! loops write per-element values into a small stack block and call them, so
//! the update loop itself stays free of reductions and vectorizes too.

use crate::real::Real;

/// A unit of work whose loops should be compiled for the best SIMD level.
///
/// A task is a plain type (not a closure) whose `run` is `#[inline(always)]`,
/// so that it, and the `#[inline(always)]` kernels it calls, are compiled
/// inside [`run_simd`]'s AVX2 function with 256-bit vectors.
pub(crate) trait SimdTask {
    /// What the task returns.
    type Output;
    /// Does the work.
    fn run(self) -> Self::Output;
}

/// Runs `task` compiled for AVX2 when the CPU has it (detected at run time and
/// cached by std), else for the baseline. No FMA is enabled, so both paths
/// give bit-identical results.
#[inline(always)]
pub(crate) fn run_simd<K: SimdTask>(task: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked on the line above.
            return unsafe { run_avx2(task) };
        }
    }
    task.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<K: SimdTask>(task: K) -> K::Output {
    task.run()
}

/// Elements per stack block in the fused passes (fits in L1 with room to spare).
pub(crate) const BLOCK: usize = 256;
const LANES: usize = 32;

/// `sum(x^2)` over one block (at most [`BLOCK`] elements), in 32 lanes of
/// `T` (four independent AVX2 accumulators for f32, so the adds do not wait
/// on each other), returned as `f64` for the caller to accumulate across
/// blocks. Lanes in `T` avoid widening every element to `f64`; with at most 8
/// terms per lane the relative rounding error stays below `8 * eps(T)`.
#[inline(always)]
pub(crate) fn sum_sq<T: Real>(x: &[T]) -> f64 {
    let mut acc = [T::zero(); LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] += c[l] * c[l];
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|v| v.to_f64x() * v.to_f64x())
        .sum();
    acc.iter().map(|a| a.to_f64x()).sum::<f64>() + tail
}

/// `sum(a * b)` over one block, like [`sum_sq`].
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [T::zero(); LANES];
    let mut ia = a.chunks_exact(LANES);
    let mut ib = b.chunks_exact(LANES);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f64 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(x, y)| x.to_f64x() * y.to_f64x())
        .sum();
    acc.iter().map(|a| a.to_f64x()).sum::<f64>() + tail
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

/// The loop of every fused kernel with one state buffer (sgd with momentum,
/// lars, lion): in blocks of [`BLOCK`], `sum(p^2)` before the update, then
/// `new = update(p, g, &mut state)` per element, then `sum((new - p)^2)`.
/// `update` is the optimizer's per-element math; it inlines into this loop.
#[inline(always)]
pub(crate) fn fused_one_state<T: Real, G: Copy>(
    p: &mut [T],
    g: &[G],
    state: &mut [T],
    update: impl Fn(T, G, &mut T) -> T,
) -> Sums {
    let mut sums = Sums::default();
    let mut delta = [T::zero(); BLOCK];
    for ((pb, gb), sb) in p
        .chunks_mut(BLOCK)
        .zip(g.chunks(BLOCK))
        .zip(state.chunks_mut(BLOCK))
    {
        sums.param_sq += sum_sq(pb);
        let db = &mut delta[..pb.len()];
        for (((p, g), s), d) in pb.iter_mut().zip(gb).zip(sb.iter_mut()).zip(db.iter_mut()) {
            let new = update(*p, *g, s);
            *d = new - *p;
            *p = new;
        }
        sums.update_sq += sum_sq(db);
    }
    sums
}
