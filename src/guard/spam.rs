//! SPAM-style spike-aware clipping and momentum reset (Huang et al. 2025,
//! "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
//! arXiv 2501.06842).

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::check_positive;
use crate::backend::cpu::CpuOptimizer;
use crate::error::{KeelError, Result};
use crate::optim::Optimizer;
use crate::real::Real;

/// Replaces every gradient element with `g² > theta * v` by
/// `sign(g) * sqrt(theta * v)` and returns how many were replaced.
///
/// `v` is the optimizer's second moment (`exp_avg_sq`, as stored: before
/// this step's update and without bias correction). Elements whose `v` is
/// zero (before the first step, or after a momentum reset) are left alone:
/// there is no history to call them a spike against. Non-finite gradients
/// are left for the optimizer's non-finite policy.
///
/// ```
/// let mut g = vec![10.0f64, -10.0, 1.0, 10.0];
/// let v = vec![0.01, 0.01, 0.01, 0.0];
/// // theta * v = 4: 100 > 4 clips to ±2; 1 < 4 stays; v = 0 is skipped.
/// assert_eq!(keel::guard::spike_clip(&mut g, &v, 400.0)?, 2);
/// assert_eq!(g, [2.0, -2.0, 1.0, 10.0]);
/// # Ok::<(), keel::KeelError>(())
/// ```
pub fn spike_clip<T: Real>(grad: &mut [T], v: &[T], theta: f64) -> Result<usize> {
    check_positive("spam.theta", theta)?;
    if grad.len() != v.len() {
        return Err(KeelError::shape(
            "spike_clip",
            format!(
                "gradient has {} elements, second moment {}",
                grad.len(),
                v.len()
            ),
        ));
    }
    let theta = T::from_f64x(theta);
    let mut clipped = 0;
    for (g, &v) in grad.iter_mut().zip(v) {
        let limit = theta * v;
        if v > T::zero() && *g * *g > limit {
            let s = limit.sqrt();
            *g = if *g < T::zero() { -s } else { s };
            clipped += 1;
        }
    }
    Ok(clipped)
}

/// SPAM's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpamConfig {
    /// Spike threshold on `g² / v` (> 0; the paper uses 5000).
    pub theta: f64,
    /// Reset the optimizer's moments every this many steps (`None`: never;
    /// the paper uses 500).
    pub reset_interval: Option<u64>,
    /// Steps of cosine lr re-warmup after each reset (0: none; the paper uses
    /// 150).
    pub warmup_steps: u64,
}

impl Default for SpamConfig {
    fn default() -> Self {
        SpamConfig {
            theta: 5000.0,
            reset_interval: None,
            warmup_steps: 150,
        }
    }
}

impl SpamConfig {
    /// Errors, naming the field, on a setting outside its range.
    pub fn validate(&self) -> Result<()> {
        check_positive("spam.theta", self.theta)?;
        if self.reset_interval == Some(0) {
            return Err(KeelError::config("spam.reset_interval", "must be >= 1"));
        }
        Ok(())
    }
}

/// Spike-aware clipping against a [`CpuOptimizer`]'s second moment, plus
/// periodic momentum reset with an lr re-warmup factor.
///
/// Per step: [`Spam::clip_grads`] before `opt.step` (with the lr multiplied
/// by [`Spam::lr_factor`]), then [`Spam::after_step`]. A reset zeroes the
/// moments but keeps the step count (see [`CpuOptimizer::reset_state`]), so
/// Adam's bias correction no longer compensates the empty `v`: the first
/// updates after a reset are large, which is why SPAM re-warms the lr.
///
/// ```
/// use keel::guard::{Spam, SpamConfig};
/// use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};
///
/// let config = OptimizerConfig::from_json(r#"{"kind": "adam", "lr": 0.1}"#)?;
/// let mut opt = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [2])])?;
/// let mut spam = Spam::new(SpamConfig {
///     reset_interval: Some(2),
///     warmup_steps: 2,
///     ..SpamConfig::default()
/// })?;
/// let mut w = vec![0.0f64; 2];
/// for g0 in [1.0, 1.0, 1000.0] {
///     let mut g = vec![g0, 1.0];
///     spam.clip_grads(&opt, &mut [&mut g[..]])?;
///     opt.step(&mut [&mut w[..]], &[&g[..]])?;
///     spam.after_step(&mut opt);
/// }
/// // The 1000 met v = 0 (reset after step 2) so it passed; no clip so far.
/// assert_eq!((spam.resets(), spam.clipped_total()), (1, 0));
/// assert_eq!(spam.lr_factor(), 1.0); // one step after the reset, warm-up of 2 done
/// # Ok::<(), keel::KeelError>(())
/// ```
///
/// Serializable with serde: saved beside the optimizer's checkpoint, it lets
/// a resumed run continue exactly; a loaded one is checked as
/// [`Spam::new`] checks its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Spam {
    config: SpamConfig,
    steps: u64,
    /// Steps taken since the last reset (`None` before the first).
    since_reset: Option<u64>,
    resets: u64,
    clipped: u64,
}

checked_serde!(Spam, |g| { g.config.validate() });

impl Spam {
    /// A fresh guard; errors on an invalid config.
    pub fn new(config: SpamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Spam {
            config,
            steps: 0,
            since_reset: None,
            resets: 0,
            clipped: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SpamConfig {
        &self.config
    }

    /// Clips each gradient against the optimizer's `exp_avg_sq` with
    /// [`spike_clip`] and returns the number of elements clipped. Errors when
    /// the optimizer keeps no `exp_avg_sq` (Adam, AdamW and LAMB do) or the
    /// buffers do not match its parameters.
    pub fn clip_grads<T: Real>(
        &mut self,
        opt: &CpuOptimizer<T>,
        grads: &mut [&mut [T]],
    ) -> Result<usize> {
        use crate::config::OptimizerKind;
        let kind = &opt.config().kind;
        // SOAP keeps an `exp_avg_sq` too, but in its rotated eigenbasis:
        // not comparable with the raw gradient.
        if !matches!(
            kind,
            OptimizerKind::Adam(_) | OptimizerKind::AdamW(_) | OptimizerKind::Lamb(_)
        ) {
            return Err(KeelError::config(
                "spam",
                format!(
                    "SPAM needs adam, adamw or lamb (whose `exp_avg_sq` is the raw \
                     gradient's second moment), not {}",
                    kind.name()
                ),
            ));
        }
        if grads.len() != opt.specs().len() {
            return Err(KeelError::Shape {
                tensor: "spam".into(),
                message: format!(
                    "{} gradients for an optimizer over {} tensors",
                    grads.len(),
                    opt.specs().len()
                ),
            });
        }
        // Every tensor is checked before any is clipped: an error leaves
        // all gradients as they were.
        let mut moments = Vec::with_capacity(grads.len());
        for (i, g) in grads.iter().enumerate() {
            let v = opt.state_buffer(i, "exp_avg_sq").ok_or_else(|| {
                KeelError::config(
                    "spam",
                    format!(
                        "the optimizer has no second moment `exp_avg_sq` for tensor {i} \
                         (SPAM needs adam, adamw or lamb)"
                    ),
                )
            })?;
            if g.len() != v.len() {
                return Err(KeelError::shape(
                    &opt.specs()[i].name,
                    format!(
                        "gradient has {} elements, second moment {}",
                        g.len(),
                        v.len()
                    ),
                ));
            }
            moments.push(v);
        }
        let mut clipped = 0;
        for (g, v) in grads.iter_mut().zip(moments) {
            clipped += spike_clip(g, v, self.config.theta)?;
        }
        self.clipped += clipped as u64;
        Ok(clipped)
    }

    /// Call after each step the optimizer took: counts it, and resets the
    /// optimizer's moments when the interval is due. Returns whether it
    /// reset.
    pub fn after_step<T: Real>(&mut self, opt: &mut CpuOptimizer<T>) -> bool {
        self.steps += 1;
        if let Some(k) = self.since_reset.as_mut() {
            *k += 1;
        }
        match self.config.reset_interval {
            Some(n) if self.steps.is_multiple_of(n) => {
                opt.reset_state();
                self.resets += 1;
                self.since_reset = Some(0);
                true
            }
            _ => false,
        }
    }

    /// The lr multiplier for the next step: 1 before any reset; after one,
    /// a cosine ramp `(1 - cos(π k / W)) / 2` over `W = warmup_steps`, with
    /// `k` the steps taken since the reset plus one (so the first step after
    /// a reset is not wasted at lr 0).
    pub fn lr_factor(&self) -> f64 {
        let w = self.config.warmup_steps;
        match self.since_reset {
            Some(k) if k < w => 0.5 * (1.0 - (PI * (k + 1) as f64 / w as f64).cos()),
            _ => 1.0,
        }
    }

    /// Momentum resets so far.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Gradient elements clipped so far.
    pub fn clipped_total(&self) -> u64 {
        self.clipped
    }
}
