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
    #[inline(always)]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
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
