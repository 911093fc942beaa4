//! Helpers shared by the integration tests (each test crate uses a subset).
#![allow(dead_code)]

use keel::real::Real;

/// Deterministic pseudo-random values in [-1, 1) (xorshift64).
pub fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// splitmix64: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// `n` uniform values in [lo, hi) as `T`.
    pub fn vec<T: Real>(&mut self, n: usize, lo: f64, hi: f64) -> Vec<T> {
        (0..n).map(|_| T::from_f64x(self.uniform(lo, hi))).collect()
    }
}

/// The gradients of step `k`: tensor `i` gets `values(numel, stride*k + i)`.
pub fn grads<T: Real>(specs: &[keel::ParamSpec], k: u64, stride: u64) -> Vec<Vec<T>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            values(s.numel(), stride * k + i as u64)
                .iter()
                .map(|&x| T::from_f64x(x))
                .collect()
        })
        .collect()
}

/// One optimizer step over owned buffers.
pub fn step<T: Real, O: keel::Optimizer<Param = [T], Grad = [T]>>(
    opt: &mut O,
    p: &mut [Vec<T>],
    g: &[Vec<T>],
) -> keel::StepStats {
    let gr: Vec<&[T]> = g.iter().map(|x| &x[..]).collect();
    let mut pr: Vec<&mut [T]> = p.iter_mut().map(|x| &mut x[..]).collect();
    opt.step(&mut pr, &gr).unwrap()
}
