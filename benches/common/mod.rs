//! What the benchmarks share.

/// `n` fixed pseudo-random values in `[-scale/2, scale/2)` (a hash of the
/// index and `seed`: the same inputs every run, no RNG dependency).
pub fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            ((h >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}
