//! Spike guards: small, orthogonal pieces a trainer composes around any
//! [`crate::Optimizer`] (SPAM reads and resets the state of a
//! [`crate::CpuOptimizer`]: a bf16 optimizer's through
//! [`crate::MixedPrecisionOptimizer::inner_mut`]; [`LossGuard`] snapshots one
//! optimizer, so a Muon + AdamW split needs one guard per optimizer). Each
//! guard's statistics serialize with serde, to be saved with a checkpoint.
//!
//! | piece | what it does | paper |
//! |---|---|---|
//! | [`ZClip`] | clips the global gradient norm at an adaptive z-score threshold | Kumar et al. 2025, arXiv 2504.02507 |
//! | [`Spam`], [`spike_clip`] | clips gradient elements far above the second moment; periodic momentum reset with lr re-warmup | Huang et al. 2025, arXiv 2501.06842 |
//! | [`DynamicLossScaler`] | fp16 loss scaling with growth and backoff | Micikevicius et al. 2018, arXiv 1710.03740 |
//! | [`SpikeDetector`], [`LossGuard`], [`analyze_losses`] | detects loss spikes causally; skips the batch or rolls back to an in-memory snapshot | PaLM, Chowdhery et al. 2022, arXiv 2204.02311 |
//!
//! None of them owns the training loop: each returns a factor, a count or a
//! [`Decision`] and the trainer acts on it, so they combine freely (e.g.
//! loss scaling, then ZClip, then SPAM clipping, then the optimizer step under
//! a [`LossGuard`]).
//!
//! ```
//! use keel::guard::{global_norm, scale_grads, ZClip, ZClipConfig};
//!
//! let mut zclip = ZClip::new(ZClipConfig { warmup_steps: 2, ..ZClipConfig::default() })?;
//! let mut grads = vec![vec![3.0f32, 4.0]]; // norm 5
//! for _ in 0..3 {
//!     let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
//!     let out = zclip.clip(&mut views);
//!     assert_eq!(out.factor, 1.0); // steady norms are never clipped
//! }
//! let views: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
//! assert_eq!(global_norm(&views), 5.0);
//! # Ok::<(), keel::KeelError>(())
//! ```

use crate::real::Real;

/// Serde for a guard whose fields derive it with `remote = "Self"`: saved
/// with a checkpoint, and a loaded one must pass `$check` (on `$g`, the
/// loaded guard), as `new` checks its settings.
macro_rules! checked_serde {
    ($ty:ident, |$g:ident| $check:block) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                $ty::serialize(self, s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                fn check($g: &$ty) -> crate::error::Result<()> $check
                let loaded = $ty::deserialize(d)?;
                check(&loaded).map_err(serde::de::Error::custom)?;
                Ok(loaded)
            }
        }
    };
}

mod loss_scale;
mod rollback;
mod spam;
mod spike;
mod zclip;

pub use loss_scale::{DynamicLossScaler, LossScaleAction, LossScalerConfig};
pub use rollback::{Decision, GuardCounts, LossGuard, LossGuardConfig, SpikeAction};
pub use spam::{spike_clip, Spam, SpamConfig};
pub use spike::{analyze_losses, SpikeCheck, SpikeDetector, SpikeDetectorConfig, SpikeEvent};
pub use zclip::{ZClip, ZClipConfig, ZClipMode, ZClipOutcome};

/// The global L2 norm of a set of gradient buffers, accumulated in `f64` so
/// that `f32` squares cannot overflow (NaN or Inf when an element is not
/// finite).
///
/// ```
/// let (a, b) = (vec![3.0f32], vec![0.0f32, 4.0]);
/// assert_eq!(keel::guard::global_norm(&[&a[..], &b[..]]), 5.0);
/// ```
pub fn global_norm<T: Real>(grads: &[&[T]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|x| {
            let x = x.to_f64x();
            x * x
        })
        .sum::<f64>()
        .sqrt()
}

/// Multiplies every gradient element by `factor` in place (a clip factor from
/// [`ZClip`] or `1 / scale` from [`DynamicLossScaler`]); a factor of exactly
/// 1 touches nothing.
///
/// ```
/// let mut g = vec![2.0f64, -4.0];
/// keel::guard::scale_grads(&mut [&mut g[..]], 0.5);
/// assert_eq!(g, [1.0, -2.0]);
/// ```
pub fn scale_grads<T: Real>(grads: &mut [&mut [T]], factor: f64) {
    if factor == 1.0 {
        return;
    }
    let f = T::from_f64x(factor);
    for g in grads.iter_mut() {
        for x in g.iter_mut() {
            *x *= f;
        }
    }
}

/// Whether every gradient element is finite.
///
/// ```
/// assert!(keel::guard::all_finite(&[&[1.0f32, 2.0][..]]));
/// assert!(!keel::guard::all_finite(&[&[1.0f32, f32::NAN][..]]));
/// ```
pub fn all_finite<T: Real>(grads: &[&[T]]) -> bool {
    grads.iter().all(|g| g.iter().all(|x| x.is_finite()))
}

/// Errors unless `x` is finite and `> 0`.
pub(crate) fn check_positive(field: &str, x: f64) -> crate::Result<()> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(crate::KeelError::config(
            field,
            format!("must be finite and > 0, got {x}"),
        ))
    }
}

/// Errors unless `lo < x < hi`.
pub(crate) fn check_open(field: &str, x: f64, lo: f64, hi: f64) -> crate::Result<()> {
    if x > lo && x < hi {
        Ok(())
    } else {
        Err(crate::KeelError::config(
            field,
            format!("must lie in ({lo}, {hi}), got {x}"),
        ))
    }
}
