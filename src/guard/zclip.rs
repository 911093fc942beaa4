//! ZClip: adaptive clipping of the global gradient norm at a z-score
//! threshold (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
//! Pre-Training", arXiv 2504.02507).

use serde::{Deserialize, Serialize};

use super::{check_open, check_positive, global_norm, scale_grads};
use crate::error::{KeelError, Result};
use crate::real::Real;

/// How far an outlier norm is clipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZClipMode {
    /// To the threshold itself, `mean + z_thresh * std`.
    #[default]
    ZScore,
    /// The paper's reciprocal variant: `mean + (z_thresh^2 / z) * std`, which
    /// clips larger outliers harder (to below the threshold).
    Reciprocal,
}

/// ZClip's settings; the defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZClipConfig {
    /// EMA factor of the mean and variance of the norm, in (0, 1).
    pub alpha: f64,
    /// z-score above which the norm is clipped (> 0).
    pub z_thresh: f64,
    /// Finite norms collected before clipping starts (>= 1); their mean and
    /// variance initialize the EMAs.
    pub warmup_steps: u64,
    /// Added to the standard deviation in the z-score, so a constant norm
    /// history (std 0) does not divide by zero (>= 0).
    pub eps: f64,
    /// How far an outlier is clipped.
    pub mode: ZClipMode,
    /// An optional fixed ceiling on the norm on top of the adaptive one
    /// (applied in warm-up too).
    pub max_norm: Option<f64>,
}

impl Default for ZClipConfig {
    fn default() -> Self {
        ZClipConfig {
            alpha: 0.97,
            z_thresh: 2.5,
            warmup_steps: 25,
            eps: 1e-6,
            mode: ZClipMode::ZScore,
            max_norm: None,
        }
    }
}

impl ZClipConfig {
    /// Errors, naming the field, on a setting outside its range.
    pub fn validate(&self) -> Result<()> {
        check_open("zclip.alpha", self.alpha, 0.0, 1.0)?;
        check_positive("zclip.z_thresh", self.z_thresh)?;
        if self.warmup_steps == 0 {
            return Err(KeelError::config("zclip.warmup_steps", "must be >= 1"));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(KeelError::config(
                "zclip.eps",
                format!("must be finite and >= 0, got {}", self.eps),
            ));
        }
        if let Some(m) = self.max_norm {
            check_positive("zclip.max_norm", m)?;
        }
        Ok(())
    }
}

/// What [`ZClip`] decided for one gradient norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZClipOutcome {
    /// The norm observed.
    pub norm: f64,
    /// The norm after clipping (`factor * norm`).
    pub clipped_norm: f64,
    /// The factor to multiply every gradient by (1 when not clipped or when
    /// the norm is not finite).
    pub factor: f64,
    /// The z-score of the norm against the EMAs (`None` in warm-up, while
    /// the EMAs have no spread yet, or when the norm is not finite).
    pub z: Option<f64>,
}

/// Z-score clipping of the global gradient norm.
///
/// The mean `μ` and variance `σ²` of the norm are tracked as EMAs. The first
/// `warmup_steps` finite norms are only collected (no clipping); their mean
/// and (population) variance start the EMAs. Afterwards a norm `g` with
/// `z = (g - μ) / (σ + eps) > z_thresh` is clipped to `μ + z_thresh σ`
/// ([`ZClipMode::ZScore`]) or `μ + (z_thresh² / z) σ`
/// ([`ZClipMode::Reciprocal`]).
///
/// The EMAs are then updated with the **clipped** norm `x`, as in the paper:
/// `μ ← α μ + (1-α) x`, then `σ² ← α σ² + (1-α) (x - μ)²` with the updated
/// `μ`. Updating with the raw norm would let one outlier inflate `σ` and hide
/// the next one; the clipped norm still lets a lasting shift in scale raise
/// the threshold gradually. Non-finite norms change nothing (the optimizer's
/// own non-finite policy deals with those gradients).
///
/// ```
/// use keel::guard::{ZClip, ZClipConfig};
///
/// let mut z = ZClip::new(ZClipConfig { warmup_steps: 4, ..ZClipConfig::default() })?;
/// for n in [1.0, 2.0, 1.0, 2.0] {
///     assert_eq!(z.observe(n).factor, 1.0); // warm-up: statistics only
/// }
/// assert_eq!((z.mean(), z.variance()), (Some(1.5), Some(0.25)));
/// let out = z.observe(10.0); // z = 17: clipped to 1.5 + 2.5 * 0.5
/// assert!((out.clipped_norm - 2.75).abs() < 1e-5);
/// assert!((out.factor - 0.275).abs() < 1e-6);
/// # Ok::<(), keel::KeelError>(())
/// ```
///
/// Serializable with serde: saved beside the optimizer's checkpoint, it lets
/// a resumed run continue exactly; a loaded one is checked as
/// [`ZClip::new`] checks its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ZClip {
    config: ZClipConfig,
    /// Norms collected in warm-up (emptied once the EMAs start).
    warmup: Vec<f64>,
    /// `(mean, variance)` once warm-up is over.
    ema: Option<(f64, f64)>,
    clipped: u64,
}

checked_serde!(ZClip, |g| {
    g.config.validate()?;
    let (mean, var) = g.ema.unwrap_or((0.0, 0.0));
    if !(mean >= 0.0 && var >= 0.0 && g.warmup.iter().all(|x| *x >= 0.0)) {
        return Err(KeelError::config(
            "zclip",
            "a saved norm or its EMAs are negative",
        ));
    }
    Ok(())
});

impl ZClip {
    /// A fresh clipper; errors on an invalid config.
    pub fn new(config: ZClipConfig) -> Result<Self> {
        config.validate()?;
        Ok(ZClip {
            config,
            warmup: Vec::new(),
            ema: None,
            clipped: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &ZClipConfig {
        &self.config
    }

    /// The EMA of the norm (`None` in warm-up).
    pub fn mean(&self) -> Option<f64> {
        self.ema.map(|(m, _)| m)
    }

    /// The EMA of the variance of the norm (`None` in warm-up).
    pub fn variance(&self) -> Option<f64> {
        self.ema.map(|(_, v)| v)
    }

    /// How many norms were clipped by the z-score rule so far.
    pub fn clipped_count(&self) -> u64 {
        self.clipped
    }

    /// Judges one global gradient norm, updates the statistics, and returns
    /// the factor to scale the gradients by.
    pub fn observe(&mut self, norm: f64) -> ZClipOutcome {
        if !(norm.is_finite() && norm >= 0.0) {
            return ZClipOutcome {
                norm,
                clipped_norm: norm,
                factor: 1.0,
                z: None,
            };
        }
        let c = self.config;
        let (target, z) = match self.ema {
            None => {
                self.warmup.push(norm);
                if self.warmup.len() as u64 >= c.warmup_steps {
                    let n = self.warmup.len() as f64;
                    let mean = self.warmup.iter().sum::<f64>() / n;
                    let var = self.warmup.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                    self.ema = Some((mean, var));
                    self.warmup = Vec::new();
                }
                (norm, None)
            }
            Some((mean, var)) if var.is_nan() || var <= 0.0 => {
                // No spread yet (equal norms in the warm-up, e.g. all 0): a
                // z-score means nothing, and clipping to the mean would keep
                // the spread at 0 for good. The norm passes and is learned.
                let m = c.alpha * mean + (1.0 - c.alpha) * norm;
                let v = (1.0 - c.alpha) * (norm - m).powi(2);
                self.ema = Some((m, v));
                (norm, None)
            }
            Some((mean, var)) => {
                let sd = var.sqrt();
                let z = (norm - mean) / (sd + c.eps);
                let x = if z > c.z_thresh {
                    self.clipped += 1;
                    match c.mode {
                        ZClipMode::ZScore => mean + c.z_thresh * sd,
                        ZClipMode::Reciprocal => mean + c.z_thresh * c.z_thresh / z * sd,
                    }
                } else {
                    norm
                };
                let m = c.alpha * mean + (1.0 - c.alpha) * x;
                let v = c.alpha * var + (1.0 - c.alpha) * (x - m).powi(2);
                self.ema = Some((m, v));
                (x, Some(z))
            }
        };
        let target = match c.max_norm {
            Some(max) => target.min(max),
            None => target,
        };
        // `target <= norm` always; a zero norm has nothing to clip.
        let factor = if target < norm { target / norm } else { 1.0 };
        ZClipOutcome {
            norm,
            clipped_norm: norm * factor,
            factor,
            z,
        }
    }

    /// Measures the global norm of `grads`, judges it with
    /// [`ZClip::observe`], and scales the gradients in place by the factor.
    pub fn clip<T: Real>(&mut self, grads: &mut [&mut [T]]) -> ZClipOutcome {
        let views: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
        let out = self.observe(global_norm(&views));
        scale_grads(grads, out.factor);
        out
    }
}
