//! Gradient and update clipping, as scalar factors the fused passes consume.
//!
//! Order inside a step: `clip_value` clamps each gradient element first; the
//! global norm of the clamped gradients decides the `clip_global_norm` factor;
//! `update_clip_rms` (AdamW) scales each tensor's Adam direction before weight
//! decay. None of them materializes a clipped copy of a tensor.

use crate::real::Real;

/// optax `clip_by_global_norm`: the factor `c / n` when the global norm `n`
/// exceeds `max_norm`, else 1 (no epsilon).
///
/// ```
/// assert_eq!(keel::clip::global_clip_factor(10.0, Some(1.0)), 0.1);
/// assert_eq!(keel::clip::global_clip_factor(0.5, Some(1.0)), 1.0);
/// assert_eq!(keel::clip::global_clip_factor(10.0, None), 1.0);
/// ```
pub fn global_clip_factor(global_norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(c) if global_norm > c => c / global_norm,
        _ => 1.0,
    }
}

/// Adafactor-style update clipping: `d / max(rms(u), d)` where
/// `rms(u) = sqrt(sum_sq / numel)`.
///
/// ```
/// // rms 2 clipped to 1 halves the update.
/// assert_eq!(keel::clip::update_clip_factor(16.0, 4, 1.0), 0.5);
/// ```
pub fn update_clip_factor(sum_sq: f64, numel: usize, max_rms: f64) -> f64 {
    let rms = (sum_sq / numel.max(1) as f64).sqrt();
    max_rms / rms.max(max_rms)
}

/// The per-element gradient transform a fused kernel applies. Two types, so
/// that the common case (no `clip_value`) compiles without the clamp.
pub(crate) trait GradTransform<T>: Copy + Sync {
    /// The gradient the optimizer uses.
    fn apply(&self, g: T) -> T;
}

/// Multiply by the global clip factor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale<T>(T);

/// Clamp to `[lo, hi]` (`clip_value`), then multiply by the global clip factor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClampScale<T> {
    lo: T,
    hi: T,
    scale: T,
}

impl<T: Real> GradTransform<T> for Scale<T> {
    #[inline(always)]
    fn apply(&self, g: T) -> T {
        g * self.0
    }
}

impl<T: Real> GradTransform<T> for ClampScale<T> {
    #[inline(always)]
    fn apply(&self, g: T) -> T {
        g.max(self.lo).min(self.hi) * self.scale
    }
}

/// The gradient transform of one step.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GradPrep<T> {
    /// No `clip_value`.
    Scale(Scale<T>),
    /// With `clip_value`.
    ClampScale(ClampScale<T>),
}

impl<T: Real> GradPrep<T> {
    pub(crate) fn new(clip_value: Option<f64>, scale: f64) -> Self {
        let scale = T::from_f64x(scale);
        match clip_value {
            None => GradPrep::Scale(Scale(scale)),
            Some(c) => GradPrep::ClampScale(ClampScale {
                lo: T::from_f64x(-c),
                hi: T::from_f64x(c),
                scale,
            }),
        }
    }

    /// Whether `clip_value` is set.
    pub(crate) fn clamps(&self) -> bool {
        matches!(self, GradPrep::ClampScale(_))
    }

    /// The clamped gradient, unscaled (what norms are measured on). `max` and
    /// `min` map NaN to a bound, so non-finite checks must look at the
    /// unclamped gradient.
    #[inline(always)]
    pub(crate) fn clamp(&self, g: T) -> T {
        match self {
            GradPrep::Scale(_) => g,
            GradPrep::ClampScale(c) => g.max(c.lo).min(c.hi),
        }
    }
}
