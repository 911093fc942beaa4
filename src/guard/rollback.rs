//! The loss-spike guard: skip the batch, or roll back to an in-memory
//! snapshot and continue at a lower lr (PaLM, Chowdhery et al. 2022,
//! arXiv 2204.02311, section 5.1: restart from a checkpoint ~100 steps before
//! the spike and skip ~200-500 batches).

use serde::{Deserialize, Serialize};

use super::check_positive;
use super::spike::{SpikeDetector, SpikeDetectorConfig};
use crate::checkpoint::StateDict;
use crate::error::{KeelError, Result};
use crate::optim::Optimizer;

/// What the guard does on a loss spike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpikeAction {
    /// Do not step on the spiking batch. A non-finite loss still rolls back
    /// (to the last snapshot, which the guard keeps taking every
    /// `snapshot_every` steps in this mode too), or skips without one.
    #[default]
    Skip,
    /// Restore the last snapshot (once per spike event; the event's later
    /// spike steps are skipped).
    Rollback,
}

/// The guard's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossGuardConfig {
    /// The spike definition.
    pub detector: SpikeDetectorConfig,
    /// What to do on a spike of a finite loss (a non-finite loss always rolls
    /// back, or skips while there is no snapshot).
    pub action: SpikeAction,
    /// Steps between automatic snapshots (>= 1); one is taken only when none
    /// of the last `detector.window` losses spiked.
    pub snapshot_every: u64,
    /// The lr multiplier after a rollback, in (0, 1].
    pub lr_factor: f64,
    /// Steps the lowered lr lasts after a rollback.
    pub lr_steps: u64,
    /// Batches skipped right after a rollback (PaLM skipped the data around
    /// the spike).
    pub skip_after_rollback: u64,
}

impl Default for LossGuardConfig {
    fn default() -> Self {
        LossGuardConfig {
            detector: SpikeDetectorConfig::default(),
            action: SpikeAction::Skip,
            snapshot_every: 100,
            lr_factor: 0.5,
            lr_steps: 100,
            skip_after_rollback: 0,
        }
    }
}

impl LossGuardConfig {
    /// Errors, naming the field, on a setting outside its range.
    pub fn validate(&self) -> Result<()> {
        self.detector.validate()?;
        if self.snapshot_every == 0 {
            return Err(KeelError::config("guard.snapshot_every", "must be >= 1"));
        }
        check_positive("guard.lr_factor", self.lr_factor)?;
        if self.lr_factor > 1.0 {
            return Err(KeelError::config(
                "guard.lr_factor",
                format!("must lie in (0, 1], got {}", self.lr_factor),
            ));
        }
        Ok(())
    }
}

/// What the trainer does with the current batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Step as usual, at `lr * guard.lr_factor()`, then call
    /// [`LossGuard::after_step`].
    Step,
    /// Do not step on this batch.
    Skip,
    /// Do not step; call [`LossGuard::restore`] now, then go on with the next
    /// batch.
    Rollback,
}

/// What the guard has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardCounts {
    /// Spike events (consecutive spike steps count once).
    pub spikes: u64,
    /// Steps whose loss spiked.
    pub spike_steps: u64,
    /// Non-finite losses.
    pub nonfinite: u64,
    /// Batches skipped.
    pub skips: u64,
    /// Rollbacks performed by [`LossGuard::restore`].
    pub rollbacks: u64,
    /// Snapshots taken.
    pub snapshots: u64,
}

/// An in-memory copy of the parameters and the optimizer's state.
#[derive(Debug, Clone)]
struct Snapshot<T> {
    params: Vec<Vec<T>>,
    state: StateDict,
    step: Option<u64>,
}

/// Guards a training loop against loss spikes, for any [`Optimizer`] whose
/// parameters are host slices `[T]`.
///
/// Per batch: compute the loss, then `match guard.observe(step, loss)`:
/// [`Decision::Step`] → set the lr times [`LossGuard::lr_factor`], step, call
/// [`LossGuard::after_step`] (which snapshots every `snapshot_every` steps
/// when the window is clean); [`Decision::Skip`] → nothing;
/// [`Decision::Rollback`] → [`LossGuard::restore`]. Take a first snapshot
/// with [`LossGuard::snapshot`] before training, so a rollback is possible
/// from the start (without one the guard skips instead).
///
/// ```
/// use keel::guard::{Decision, LossGuard, LossGuardConfig, SpikeAction, SpikeDetectorConfig};
/// use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};
///
/// let config = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 0.1}"#)?;
/// let mut opt = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [1])])?;
/// let mut guard = LossGuard::new(LossGuardConfig {
///     detector: SpikeDetectorConfig { window: 3, warmup: 3, ..Default::default() },
///     action: SpikeAction::Rollback,
///     ..Default::default()
/// })?;
/// let mut w = vec![vec![1.0f64]];
/// guard.snapshot(&w, &opt)?;
/// for (step, loss) in [1.0, 1.01, 0.99, 50.0].into_iter().enumerate() {
///     match guard.observe(step as u64, loss) {
///         Decision::Step => {
///             let mut p: Vec<&mut [f64]> = w.iter_mut().map(|x| &mut x[..]).collect();
///             opt.step(&mut p, &[&[1.0][..]])?;
///             guard.after_step(&w, &opt)?;
///         }
///         Decision::Skip => {}
///         Decision::Rollback => guard.restore(&mut w, &mut opt)?,
///     }
/// }
/// assert_eq!(w[0][0], 1.0); // back at the snapshot
/// assert_eq!((guard.counts().rollbacks, guard.lr_factor()), (1, 0.5));
/// # Ok::<(), keel::KeelError>(())
/// ```
#[derive(Debug, Clone)]
pub struct LossGuard<T> {
    config: LossGuardConfig,
    detector: SpikeDetector,
    snapshot: Option<Snapshot<T>>,
    counts: GuardCounts,
    last_step: Option<u64>,
    /// Losses observed since the last spike step (`None`: no spike yet).
    since_spike: Option<u64>,
    steps_since_snapshot: u64,
    /// The current event already rolled back once.
    event_rolled_back: bool,
    lr_steps_left: u64,
    skips_left: u64,
}

impl<T: Copy> LossGuard<T> {
    /// A guard with no history and no snapshot; errors on an invalid config.
    pub fn new(config: LossGuardConfig) -> Result<Self> {
        config.validate()?;
        Ok(LossGuard {
            config,
            detector: SpikeDetector::new(config.detector)?,
            snapshot: None,
            counts: GuardCounts::default(),
            last_step: None,
            since_spike: None,
            steps_since_snapshot: 0,
            event_rolled_back: false,
            lr_steps_left: 0,
            skips_left: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LossGuardConfig {
        &self.config
    }

    /// What the guard has done so far.
    pub fn counts(&self) -> GuardCounts {
        self.counts
    }

    /// The spike detector (its window and events).
    pub fn detector(&self) -> &SpikeDetector {
        &self.detector
    }

    /// Whether a snapshot is held.
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// The `step` last passed to [`LossGuard::observe`] when the snapshot was
    /// taken (`None` with no snapshot, or one taken before any observation).
    pub fn snapshot_step(&self) -> Option<u64> {
        self.snapshot.as_ref().and_then(|s| s.step)
    }

    /// The lr multiplier for the next step: `lr_factor` for `lr_steps` steps
    /// after a rollback, else 1.
    pub fn lr_factor(&self) -> f64 {
        if self.lr_steps_left > 0 {
            self.config.lr_factor
        } else {
            1.0
        }
    }

    /// Judges the loss of the batch about to be stepped on, and says what to
    /// do with it. `step` labels the batch (it is recorded with snapshots).
    pub fn observe(&mut self, step: u64, loss: f64) -> Decision {
        self.last_step = Some(step);
        let check = self.detector.observe(loss);
        if check.spike {
            self.counts.spike_steps += 1;
            self.since_spike = Some(0);
        } else if let Some(k) = self.since_spike.as_mut() {
            *k += 1;
        }
        if check.new_event {
            self.counts.spikes += 1;
            self.event_rolled_back = false;
        }
        let decision = if !loss.is_finite() {
            self.counts.nonfinite += 1;
            self.rollback_if_possible()
        } else if self.skips_left > 0 {
            self.skips_left -= 1;
            Decision::Skip
        } else if check.spike {
            match self.config.action {
                SpikeAction::Skip => Decision::Skip,
                SpikeAction::Rollback if self.event_rolled_back => Decision::Skip,
                SpikeAction::Rollback => self.rollback_if_possible(),
            }
        } else {
            Decision::Step
        };
        if decision == Decision::Skip {
            self.counts.skips += 1;
        }
        decision
    }

    fn rollback_if_possible(&mut self) -> Decision {
        if self.snapshot.is_some() {
            self.event_rolled_back = true;
            Decision::Rollback
        } else {
            Decision::Skip
        }
    }

    /// Call after each step the optimizer took: advances the lowered-lr
    /// countdown and takes a snapshot when one is due (`snapshot_every` steps
    /// since the last, and no spike among the last `window` losses). Returns
    /// whether it took one.
    pub fn after_step<P, O>(&mut self, params: &[P], opt: &O) -> Result<bool>
    where
        P: AsRef<[T]>,
        O: Optimizer<Param = [T]> + ?Sized,
    {
        self.lr_steps_left = self.lr_steps_left.saturating_sub(1);
        self.steps_since_snapshot += 1;
        let clean = self
            .since_spike
            .is_none_or(|k| k >= self.config.detector.window as u64);
        if self.steps_since_snapshot >= self.config.snapshot_every && clean {
            self.snapshot(params, opt)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Copies the parameters and the optimizer's state (via
    /// [`Optimizer::state_dict`]) into memory, replacing the previous
    /// snapshot; the parameters must be in the optimizer's order.
    pub fn snapshot<P, O>(&mut self, params: &[P], opt: &O) -> Result<()>
    where
        P: AsRef<[T]>,
        O: Optimizer<Param = [T]> + ?Sized,
    {
        check_params(opt, params.iter().map(|p| p.as_ref().len()))?;
        let state = opt.state_dict()?;
        self.snapshot = Some(Snapshot {
            params: params.iter().map(|p| p.as_ref().to_vec()).collect(),
            state,
            step: self.last_step,
        });
        self.steps_since_snapshot = 0;
        self.counts.snapshots += 1;
        Ok(())
    }

    /// Restores the parameters and optimizer state of the last snapshot
    /// (bit-identical), then lowers the lr for `lr_steps` steps and skips the
    /// next `skip_after_rollback` batches. Errors, writing nothing, when
    /// there is no snapshot or the buffers do not match it.
    pub fn restore<P, O>(&mut self, params: &mut [P], opt: &mut O) -> Result<()>
    where
        P: AsMut<[T]>,
        O: Optimizer<Param = [T]> + ?Sized,
    {
        let snap = self
            .snapshot
            .as_ref()
            .ok_or_else(|| KeelError::State("the guard holds no snapshot to restore".into()))?;
        check_params(opt, params.iter_mut().map(|p| p.as_mut().len()))?;
        // The optimizer could differ from the one snapshotted: its state load
        // below checks the specs, this checks the copies cannot panic.
        if params
            .iter_mut()
            .zip(&snap.params)
            .any(|(p, s)| p.as_mut().len() != s.len())
            || params.len() != snap.params.len()
        {
            return Err(KeelError::shape(
                "guard",
                "the parameter buffers do not match the snapshot",
            ));
        }
        opt.load_state_dict(&snap.state)?;
        for (p, s) in params.iter_mut().zip(&snap.params) {
            p.as_mut().copy_from_slice(s);
        }
        self.steps_since_snapshot = 0;
        self.lr_steps_left = self.config.lr_steps;
        self.skips_left = self.config.skip_after_rollback;
        self.counts.rollbacks += 1;
        Ok(())
    }
}

/// Errors unless the buffer lengths match the optimizer's parameters.
fn check_params<T, O>(opt: &O, lens: impl ExactSizeIterator<Item = usize>) -> Result<()>
where
    O: Optimizer<Param = [T]> + ?Sized,
{
    let specs = opt.specs();
    if lens.len() != specs.len() {
        return Err(KeelError::shape(
            "guard",
            format!(
                "expected {} parameter buffers, got {}",
                specs.len(),
                lens.len()
            ),
        ));
    }
    for (spec, len) in specs.iter().zip(lens) {
        if len != spec.numel() {
            return Err(KeelError::shape(
                &spec.name,
                format!("expected {} elements, got {len}", spec.numel()),
            ));
        }
    }
    Ok(())
}
