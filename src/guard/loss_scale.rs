//! Dynamic loss scaling for fp16 training (Micikevicius et al. 2018, "Mixed
//! Precision Training", arXiv 1710.03740).

use serde::{Deserialize, Serialize};

use super::{all_finite, check_open, check_positive, scale_grads};
use crate::error::{KeelError, Result};
use crate::real::Real;

/// The loss scaler's settings; the defaults are PyTorch's `GradScaler`'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossScalerConfig {
    /// The first scale (> 0).
    pub init_scale: f64,
    /// Multiplier after `growth_interval` clean steps (> 1).
    pub growth_factor: f64,
    /// Multiplier on overflow, in (0, 1).
    pub backoff_factor: f64,
    /// Consecutive clean steps before the scale grows (>= 1).
    pub growth_interval: u64,
    /// The scale never falls below this (> 0).
    pub min_scale: f64,
    /// The scale never grows above this (>= `init_scale`).
    pub max_scale: f64,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        LossScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0,
            max_scale: 16_777_216.0,
        }
    }
}

impl LossScalerConfig {
    /// Errors, naming the field, on a setting outside its range.
    pub fn validate(&self) -> Result<()> {
        check_positive("loss_scale.init_scale", self.init_scale)?;
        check_positive("loss_scale.growth_factor", self.growth_factor)?;
        if self.growth_factor <= 1.0 {
            return Err(KeelError::config(
                "loss_scale.growth_factor",
                format!("must be > 1, got {}", self.growth_factor),
            ));
        }
        check_open("loss_scale.backoff_factor", self.backoff_factor, 0.0, 1.0)?;
        if self.growth_interval == 0 {
            return Err(KeelError::config(
                "loss_scale.growth_interval",
                "must be >= 1",
            ));
        }
        check_positive("loss_scale.min_scale", self.min_scale)?;
        check_positive("loss_scale.max_scale", self.max_scale)?;
        // Gradients are f32 or f64: past these, the scale or its reciprocal
        // is not a normal f32 (unscaling would give inf or 0).
        let (lo, hi) = (
            f64::from(f32::MIN_POSITIVE),
            1.0 / f64::from(f32::MIN_POSITIVE),
        );
        for (field, v) in [
            ("loss_scale.min_scale", self.min_scale),
            ("loss_scale.max_scale", self.max_scale),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(KeelError::config(
                    field,
                    format!(
                        "must lie in [2^-126, 2^126], where it and its reciprocal are normal \
                         f32 numbers, got {v}"
                    ),
                ));
            }
        }
        if !(self.min_scale <= self.init_scale && self.init_scale <= self.max_scale) {
            return Err(KeelError::config(
                "loss_scale.init_scale",
                format!(
                    "must lie in [min_scale, max_scale] = [{}, {}], got {}",
                    self.min_scale, self.max_scale, self.init_scale
                ),
            ));
        }
        Ok(())
    }
}

/// What the trainer does with this step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossScaleAction {
    /// The gradients are finite: unscale them and step.
    Apply,
    /// They overflowed: do not step (the scale was lowered).
    Skip,
}

/// Dynamic loss scaling: multiply the loss by [`DynamicLossScaler::scale`]
/// before the backward pass so small fp16 gradients do not flush to zero,
/// divide the gradients by it afterwards, and adapt the scale: on overflow
/// (a non-finite gradient) the step is skipped and the scale backs off; after
/// `growth_interval` clean steps in a row it grows.
///
/// ```
/// use keel::guard::{DynamicLossScaler, LossScaleAction, LossScalerConfig};
///
/// let mut s = DynamicLossScaler::new(LossScalerConfig { growth_interval: 2, ..Default::default() })?;
/// let mut g = vec![65536.0f32, f32::INFINITY];
/// let nonfinite = s.unscale(&mut [&mut g[..]]);
/// assert_eq!(s.update(nonfinite), LossScaleAction::Skip);
/// assert_eq!(s.scale(), 32768.0);
/// assert_eq!(s.update(false), LossScaleAction::Apply);
/// assert_eq!(s.update(false), LossScaleAction::Apply);
/// assert_eq!(s.scale(), 65536.0); // two clean steps: grown
/// # Ok::<(), keel::KeelError>(())
/// ```
///
/// Serializable with serde: saved beside the optimizer's checkpoint, it lets
/// a resumed run continue exactly; a loaded one is checked as
/// [`DynamicLossScaler::new`] checks its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct DynamicLossScaler {
    config: LossScalerConfig,
    scale: f64,
    clean_steps: u64,
    skipped: u64,
}

checked_serde!(DynamicLossScaler, |g| {
    g.config.validate()?;
    let c = g.config;
    if !(c.min_scale..=c.max_scale).contains(&g.scale) {
        return Err(KeelError::config(
            "loss_scale",
            format!(
                "a saved scale of {} is outside [min_scale, max_scale]",
                g.scale
            ),
        ));
    }
    Ok(())
});

impl DynamicLossScaler {
    /// A scaler at `init_scale`; errors on an invalid config.
    pub fn new(config: LossScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(DynamicLossScaler {
            config,
            scale: config.init_scale,
            clean_steps: 0,
            skipped: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LossScalerConfig {
        &self.config
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `loss * scale`, the value to differentiate.
    pub fn scale_loss(&self, loss: f64) -> f64 {
        loss * self.scale
    }

    /// Divides the gradients by the scale in place and returns whether any
    /// element is non-finite, before or after (pass it to
    /// [`DynamicLossScaler::update`], which then skips the step).
    pub fn unscale<T: Real>(&self, grads: &mut [&mut [T]]) -> bool {
        let views: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
        if !all_finite(&views) {
            return true;
        }
        scale_grads(grads, 1.0 / self.scale);
        // Dividing by a scale below 1 multiplies, and may overflow. The
        // caller's `update(true)` then skips the step and backs the scale
        // off further; such a gradient is past f32 at any scale in range.
        if self.scale < 1.0 {
            let views: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
            return !all_finite(&views);
        }
        false
    }

    /// Adapts the scale after a backward pass: backs off and says
    /// [`LossScaleAction::Skip`] on overflow, else counts a clean step (and
    /// grows the scale every `growth_interval` of them).
    pub fn update(&mut self, found_nonfinite: bool) -> LossScaleAction {
        let c = self.config;
        if found_nonfinite {
            self.scale = (self.scale * c.backoff_factor).max(c.min_scale);
            self.clean_steps = 0;
            self.skipped += 1;
            return LossScaleAction::Skip;
        }
        self.clean_steps += 1;
        if self.clean_steps == c.growth_interval {
            self.scale = (self.scale * c.growth_factor).min(c.max_scale);
            self.clean_steps = 0;
        }
        LossScaleAction::Apply
    }

    /// Steps skipped for overflow so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}
