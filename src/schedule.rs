//! Learning-rate schedules: constant, linear warmup then cosine decay, and
//! warmup-stable-decay (WSD). A trainer calls
//! `opt.set_lr(schedule.lr_at(step))` before each step; per-group multipliers
//! ([`crate::ParamGroup::lr_scale`]) apply on top.

use serde::{Deserialize, Serialize};

use crate::error::{KeelError, Result};

/// A learning-rate schedule over 0-based step indices.
///
/// ```
/// # use keel::Schedule;
/// let s = Schedule::WarmupCosine { peak_lr: 1e-3, warmup_steps: 10, total_steps: 110, final_lr: 1e-4 };
/// assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);   // 1/10 of the peak on the first step
/// assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);   // peak at the end of warmup
/// assert!((s.lr_at(110) - 1e-4).abs() < 1e-12); // floor after the decay
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The same rate every step.
    Constant {
        /// The rate.
        lr: f64,
    },
    /// Linear warmup from `peak_lr / warmup_steps` to `peak_lr`, then cosine
    /// decay to `final_lr` at `total_steps`, then `final_lr`.
    WarmupCosine {
        /// Rate at the end of warmup.
        peak_lr: f64,
        /// Warmup length in steps (0: start at the peak).
        warmup_steps: u64,
        /// Step at which the decay reaches `final_lr`.
        total_steps: u64,
        /// The floor.
        final_lr: f64,
    },
    /// Warmup-stable-decay: linear warmup, `stable_steps` at the peak, then a
    /// linear decay to `final_lr` over `decay_steps`, then `final_lr`.
    Wsd {
        /// Rate of the stable phase.
        peak_lr: f64,
        /// Warmup length.
        warmup_steps: u64,
        /// Length of the stable phase.
        stable_steps: u64,
        /// Length of the decay.
        decay_steps: u64,
        /// The floor.
        final_lr: f64,
    },
}

impl Schedule {
    /// The rate for the step with 0-based index `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::WarmupCosine {
                peak_lr,
                warmup_steps,
                total_steps,
                final_lr,
            } => {
                if step < warmup_steps {
                    return warmup(peak_lr, step, warmup_steps);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let progress = ((step - warmup_steps) as f64 / span).min(1.0);
                final_lr
                    + (peak_lr - final_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Wsd {
                peak_lr,
                warmup_steps,
                stable_steps,
                decay_steps,
                final_lr,
            } => {
                if step < warmup_steps {
                    return warmup(peak_lr, step, warmup_steps);
                }
                let into_decay = step - warmup_steps;
                if into_decay < stable_steps {
                    return peak_lr;
                }
                let progress = ((into_decay - stable_steps).saturating_add(1) as f64
                    / decay_steps.max(1) as f64)
                    .min(1.0);
                peak_lr + (final_lr - peak_lr) * progress
            }
        }
    }

    /// Checks the schedule; the error names the first invalid field.
    pub fn validate(&self) -> Result<()> {
        let rate = |field: &str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(())
            } else {
                Err(KeelError::config(
                    format!("schedule.{field}"),
                    format!("must be finite and >= 0, got {x}"),
                ))
            }
        };
        match *self {
            Schedule::Constant { lr } => rate("lr", lr),
            Schedule::WarmupCosine {
                peak_lr,
                warmup_steps,
                total_steps,
                final_lr,
            } => {
                rate("peak_lr", peak_lr)?;
                rate("final_lr", final_lr)?;
                if total_steps < warmup_steps {
                    return Err(KeelError::config(
                        "schedule.total_steps",
                        format!("{total_steps} is shorter than warmup_steps {warmup_steps}"),
                    ));
                }
                Ok(())
            }
            Schedule::Wsd {
                peak_lr, final_lr, ..
            } => {
                rate("peak_lr", peak_lr)?;
                rate("final_lr", final_lr)
            }
        }
    }
}

fn warmup(peak_lr: f64, step: u64, warmup_steps: u64) -> f64 {
    peak_lr * (step + 1) as f64 / warmup_steps as f64
}
