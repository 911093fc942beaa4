//! Causal loss-spike detection, and the after-the-fact analysis of a loss
//! series, as the spike lab defines them: step `t` spikes when
//! `loss_t > mean + sigma * sd` and `loss_t > ratio * mean` of the previous
//! `window` losses (4, 1.1 and 100 by default), after a warm-up; consecutive
//! spike steps form one event.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::check_positive;
use crate::error::{KeelError, Result};

/// The spike definition's parameters; the defaults are the spike lab's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpikeDetectorConfig {
    /// How many previous losses the mean and sd are taken over (>= 2).
    pub window: usize,
    /// Standard deviations above the mean (>= 0).
    pub sigma: f64,
    /// Multiple of the mean the loss must also exceed (> 0).
    pub ratio: f64,
    /// Finite losses seen before any step can be a spike (the fast early
    /// descent is not judged; >= 2).
    pub warmup: u64,
}

impl Default for SpikeDetectorConfig {
    fn default() -> Self {
        SpikeDetectorConfig {
            window: 100,
            sigma: 4.0,
            ratio: 1.1,
            warmup: 100,
        }
    }
}

impl SpikeDetectorConfig {
    /// Errors, naming the field, on a setting outside its range.
    pub fn validate(&self) -> Result<()> {
        // The window is held in memory, one loss per step.
        if !(2..=1 << 24).contains(&self.window) {
            return Err(KeelError::config(
                "spike.window",
                format!("must be in 2..=16777216, got {}", self.window),
            ));
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return Err(KeelError::config(
                "spike.sigma",
                format!("must be finite and >= 0, got {}", self.sigma),
            ));
        }
        check_positive("spike.ratio", self.ratio)?;
        if self.warmup < 2 {
            return Err(KeelError::config(
                "spike.warmup",
                format!("must be >= 2, got {}", self.warmup),
            ));
        }
        Ok(())
    }
}

/// The verdict on one loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpikeCheck {
    /// The loss spikes (always for a non-finite loss).
    pub spike: bool,
    /// It is the first spike step of an event (the previous step was not a
    /// spike).
    pub new_event: bool,
    /// Mean of the window the loss was judged against (NaN in warm-up).
    pub mean: f64,
    /// Population standard deviation of that window (NaN in warm-up).
    pub sd: f64,
}

/// The causal spike detector: feed it each loss in order.
///
/// Every finite loss joins the window after it is judged, spikes included,
/// exactly as the definition reads ("the previous 100 losses"); non-finite
/// losses are spikes and never join it.
///
/// ```
/// use keel::guard::{SpikeDetector, SpikeDetectorConfig};
///
/// let mut d = SpikeDetector::new(SpikeDetectorConfig { window: 4, warmup: 4, ..Default::default() })?;
/// for loss in [2.0, 2.1, 1.9, 2.0] {
///     assert!(!d.observe(loss).spike); // warm-up
/// }
/// let c = d.observe(3.0); // mean 2, sd 0.0707: 3 > 2.28 and 3 > 2.2
/// assert!(c.spike && c.new_event);
/// assert!(d.observe(f64::NAN).spike && d.events() == 1); // merged
/// # Ok::<(), keel::KeelError>(())
/// ```
///
/// Serializable with serde: saved beside the optimizer's checkpoint, it lets
/// a resumed run continue exactly; a loaded one is checked as
/// [`SpikeDetector::new`] checks its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SpikeDetector {
    config: SpikeDetectorConfig,
    history: VecDeque<f64>,
    finite_seen: u64,
    in_event: bool,
    events: u64,
}

checked_serde!(SpikeDetector, |g| {
    g.config.validate()?;
    if g.history.len() > g.config.window {
        return Err(KeelError::config(
            "spike.window",
            format!("{} saved losses, more than the window", g.history.len()),
        ));
    }
    Ok(())
});

impl SpikeDetector {
    /// A detector with an empty history; errors on an invalid config.
    pub fn new(config: SpikeDetectorConfig) -> Result<Self> {
        config.validate()?;
        Ok(SpikeDetector {
            config,
            history: VecDeque::with_capacity(config.window + 1),
            finite_seen: 0,
            in_event: false,
            events: 0,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SpikeDetectorConfig {
        &self.config
    }

    /// Spike events so far (consecutive spike steps count once).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Whether the last loss observed was a spike.
    pub fn in_event(&self) -> bool {
        self.in_event
    }

    /// Judges `loss` against the window, then adds it to the window.
    pub fn observe(&mut self, loss: f64) -> SpikeCheck {
        let c = self.config;
        let (mean, sd) = if self.finite_seen >= c.warmup {
            let n = self.history.len() as f64;
            let mean = self.history.iter().sum::<f64>() / n;
            let var = self.history.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        } else {
            (f64::NAN, f64::NAN)
        };
        let spike = if loss.is_finite() {
            // NaN statistics (warm-up) compare false: no spike.
            let spike = loss > mean + c.sigma * sd && loss > c.ratio * mean;
            self.history.push_back(loss);
            if self.history.len() > c.window {
                self.history.pop_front();
            }
            self.finite_seen += 1;
            spike
        } else {
            true
        };
        let new_event = spike && !self.in_event;
        self.in_event = spike;
        if new_event {
            self.events += 1;
        }
        SpikeCheck {
            spike,
            new_event,
            mean,
            sd,
        }
    }
}

/// One spike event of a loss series, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpikeEvent {
    /// Index of its first spike step.
    pub start: usize,
    /// Index of its last spike step (inclusive).
    pub end: usize,
    /// Index of its highest loss.
    pub peak_step: usize,
    /// Its highest loss (Inf when a loss was not finite).
    pub peak_loss: f64,
    /// Mean of the window before `start` (the pre-spike mean).
    pub pre_mean: f64,
    /// Standard deviation of that window.
    pub pre_sd: f64,
    /// `peak_loss - pre_mean`.
    pub excursion: f64,
    /// Steps from `start` until the 0.9-EMA of the loss is back within 1% of
    /// `pre_mean` (`ema <= 1.01 * pre_mean`, looked for from `end` on);
    /// `None` if it never is within the series.
    pub recovery_steps: Option<usize>,
}

/// Finds every spike event of a whole loss series (index = step) with the
/// causal [`SpikeDetector`], and measures each one's peak excursion and
/// recovery.
///
/// The recovery EMA is `e_0 = loss_0`, `e_t = 0.9 e_{t-1} + 0.1 loss_t`
/// (a non-finite loss leaves it unchanged).
///
/// ```
/// use keel::guard::{analyze_losses, SpikeDetectorConfig};
///
/// let mut losses = vec![1.0; 40];
/// losses[10] = 2.0;
/// let config = SpikeDetectorConfig { window: 5, warmup: 5, ..Default::default() };
/// let events = analyze_losses(&losses, &config)?;
/// assert_eq!(events.len(), 1);
/// let e = events[0];
/// assert_eq!((e.start, e.end, e.excursion), (10, 10, 1.0));
/// // The EMA is 1.1 at step 10, then 1 + 0.1 * 0.9^k: within 1% at k = 22.
/// assert_eq!(e.recovery_steps, Some(22));
/// # Ok::<(), keel::KeelError>(())
/// ```
pub fn analyze_losses(losses: &[f64], config: &SpikeDetectorConfig) -> Result<Vec<SpikeEvent>> {
    let mut detector = SpikeDetector::new(*config)?;
    let mut ema = Vec::with_capacity(losses.len());
    let mut e = f64::NAN;
    for &l in losses {
        if l.is_finite() {
            e = if e.is_finite() { 0.9 * e + 0.1 * l } else { l };
        }
        ema.push(e);
    }
    let mut events: Vec<SpikeEvent> = Vec::new();
    for (t, &loss) in losses.iter().enumerate() {
        let check = detector.observe(loss);
        if !check.spike {
            continue;
        }
        let peak = if loss.is_finite() {
            loss
        } else {
            f64::INFINITY
        };
        if check.new_event {
            events.push(SpikeEvent {
                start: t,
                end: t,
                peak_step: t,
                peak_loss: peak,
                // A non-finite loss in warm-up has no window: NaN statistics.
                pre_mean: check.mean,
                pre_sd: check.sd,
                excursion: peak - check.mean,
                recovery_steps: None,
            });
        } else if let Some(last) = events.last_mut() {
            last.end = t;
            if peak > last.peak_loss {
                last.peak_loss = peak;
                last.peak_step = t;
                last.excursion = peak - last.pre_mean;
            }
        }
    }
    for ev in &mut events {
        let target = ev.pre_mean + 0.01 * ev.pre_mean.abs();
        ev.recovery_steps = (ev.end..losses.len())
            .find(|&t| ema[t] <= target)
            .map(|t| t - ev.start);
    }
    Ok(events)
}
