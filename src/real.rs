//! The floating-point element types the CPU backend computes in.

use half::bf16;
use num_traits::Float;

/// A float the optimizers compute in: `f32` (fast path) or `f64` (conformance).
///
/// Hyperparameters and per-tensor coefficients are computed in `f64` and cast
/// once per step. Norms accumulate per block in `Self` and across blocks in
/// `f64`; a gradient whose squares overflow `Self` is detected and its sums
/// are redone element by element in `f64`, so it still has a finite norm.
pub trait Real:
    Float + faer::traits::RealField + Send + Sync + Default + std::fmt::Debug + 'static
{
    /// The safetensors dtype name of this type (`F32` or `F64`).
    const DTYPE: &'static str;
    /// Lossless widening to `f64`.
    fn to_f64x(self) -> f64;
    /// Rounding (to nearest) from `f64`.
    fn from_f64x(x: f64) -> Self;
    /// Rounding to `bf16`, to nearest even.
    fn to_bf16(self) -> bf16;
    /// The `f32` value nearest to `self` (exact for `f32`).
    fn to_f32x(self) -> f32;
}

impl Real for f32 {
    const DTYPE: &'static str = "F32";
    #[inline(always)]
    fn to_f64x(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64x(x: f64) -> Self {
        x as f32
    }
    /// Bit for bit `bf16::from_f32`, without branches, so that a loop of
    /// it vectorizes (the mixed-precision step rounds every master weight).
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        let bits = self.to_bits();
        // Adding 0x7fff plus the kept part's lowest bit carries into the kept
        // part exactly when the discarded half is above one half, or is one
        // half and the kept part is odd: round to nearest, ties to even.
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
        // A NaN keeps its sign and high payload bits, made quiet.
        let nan = (bits >> 16) | 0x40;
        let is_nan = bits & 0x7fff_ffff > 0x7f80_0000;
        bf16::from_bits(if is_nan { nan } else { rounded } as u16)
    }
    #[inline(always)]
    fn to_f32x(self) -> f32 {
        self
    }
}

impl Real for f64 {
    const DTYPE: &'static str = "F64";
    #[inline(always)]
    fn to_f64x(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64x(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        bf16::from_f64(self)
    }
    #[inline(always)]
    fn to_f32x(self) -> f32 {
        self as f32
    }
}

/// A gradient element that can be read as the optimizer's compute type `T`.
///
/// Implemented for `T` itself and for `bf16` gradients feeding `f32` or `f64`
/// master weights, so mixed-precision steps convert in registers rather than
/// through a tensor-sized temporary.
pub trait GradElem<T: Real>: Copy + Send + Sync + 'static {
    /// The value as `T`.
    fn get(self) -> T;

    /// The slice itself when it already holds `T` (no conversion needed).
    #[inline(always)]
    fn as_native(_: &[Self]) -> Option<&[T]> {
        None
    }
}

impl<T: Real> GradElem<T> for T {
    #[inline(always)]
    fn get(self) -> T {
        self
    }

    #[inline(always)]
    fn as_native(g: &[T]) -> Option<&[T]> {
        Some(g)
    }
}

impl GradElem<f32> for bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
}

impl GradElem<f64> for bf16 {
    #[inline(always)]
    fn get(self) -> f64 {
        self.to_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branch-free rounding equals `half`'s on every class of input:
    /// ties either way, carries into the exponent and to infinity, NaN
    /// payloads, subnormals, signs, and a sweep of random bit patterns.
    #[test]
    fn f32_to_bf16_matches_half_bit_for_bit() {
        let mut cases: Vec<u32> = vec![
            0x0000_0000,
            0x8000_0000,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x0000_7fff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3fff_ffff,
            0x7f7f_ffff,
            0x7f7f_8000,
            0x7f7f_7fff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffff_ffff,
            0x7fbf_ffff,
            0x807f_ffff,
            0x0080_0000,
            0x007f_ffff,
        ];
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            cases.push((s >> 32) as u32);
        }
        for bits in cases {
            let x = f32::from_bits(bits);
            assert_eq!(
                x.to_bf16().to_bits(),
                bf16::from_f32(x).to_bits(),
                "{bits:#010x}"
            );
        }
    }
}
