//! `keel spike-lab`: train a tiny GPT under spike-inducing settings with
//! several optimizer and guard arms over several seeds, and write a report a
//! person opens (Markdown table, loss curves, update-ratio heatmap) plus
//! every run's `metrics.jsonl`.
//!
//! Spikes and recoveries are those of [`analyze_losses`] with the default
//! [`SpikeDetectorConfig`] (window 100, 4 sd and 1.1x the mean, after 100
//! steps); a run diverges when a loss or its final validation loss is not
//! finite, or that loss is at least `ln(V) - 0.1` (no better than chance).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{
    AdjustLr, Grafting, LambConfig, MuonConfig, OptimizerConfig, OptimizerKind, RootDtype,
    ShampooConfig,
};
use crate::error::{KeelError, Result};
use crate::guard::{
    analyze_losses, LossGuardConfig, SpikeAction, SpikeDetectorConfig, SpikeEvent, ZClipConfig,
};

use super::data::Dataset;
use super::plot;
use super::train::{Outlier, OutlierKind, RunSummary, Stress, TrainConfig, Trainer};
use super::GptConfig;

/// A named set of lab settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 2 layers, 64 wide, context 32, 3 seeds, every arm (a few minutes on
    /// two cores).
    #[default]
    Default,
    /// A short check that everything runs and writes its files (< 60 s).
    Smoke,
    /// 4 layers, 128 wide, context 64, 5 seeds, longer.
    Full,
    /// The default stress at three model sizes, spike rate against size.
    Scale,
}

impl Preset {
    /// The preset's name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Default => "default",
            Preset::Smoke => "smoke",
            Preset::Full => "full",
            Preset::Scale => "scale",
        }
    }
}

/// One arm of the lab: how it changes the stressed base config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// Plain AdamW, no clipping (the baseline every other arm is judged against).
    AdamW,
    /// AdamW with global-norm clipping at 1.0.
    AdamWClip,
    /// AdamW with update clipping (`update_clip_rms` 1.0, StableAdamW-like).
    AdamWUpdateClip,
    /// AdamW with ZClip (z-score mode, defaults).
    AdamWZClip,
    /// AdamW with the loss-spike guard (rollback to a snapshot, lr halved).
    AdamWGuard,
    /// LAMB at the same lr.
    Lamb,
    /// Muon (update RMS matched to AdamW) on the hidden matrices, AdamW on
    /// the rest.
    Muon,
    /// Shampoo with Adam grafting (blocks of 32, roots every 10 steps).
    Shampoo,
}

impl Arm {
    /// Every arm, baseline first.
    pub const ALL: [Arm; 8] = [
        Arm::AdamW,
        Arm::AdamWClip,
        Arm::AdamWUpdateClip,
        Arm::AdamWZClip,
        Arm::AdamWGuard,
        Arm::Lamb,
        Arm::Muon,
        Arm::Shampoo,
    ];

    /// The arm's name in tables and folder names.
    pub fn name(self) -> &'static str {
        match self {
            Arm::AdamW => "adamw",
            Arm::AdamWClip => "adamw+clip1",
            Arm::AdamWUpdateClip => "adamw+update-clip",
            Arm::AdamWZClip => "adamw+zclip",
            Arm::AdamWGuard => "adamw+guard",
            Arm::Lamb => "lamb",
            Arm::Muon => "muon+adamw",
            Arm::Shampoo => "shampoo",
        }
    }

    /// The arm's config from the stressed AdamW base (whose lr, betas, eps
    /// and weight decay every arm reuses where it has them).
    pub fn apply(self, base: &TrainConfig) -> Result<TrainConfig> {
        let mut c = base.clone();
        let OptimizerKind::AdamW(adamw) = base.optimizer.kind.clone() else {
            return Err(KeelError::config(
                "optimizer",
                "the lab's base optimizer must be adamw",
            ));
        };
        let with = |kind| OptimizerConfig::new(kind);
        match self {
            Arm::AdamW => {}
            Arm::AdamWClip => c.optimizer.clip_global_norm = Some(1.0),
            Arm::AdamWUpdateClip => {
                if let OptimizerKind::AdamW(a) = &mut c.optimizer.kind {
                    a.update_clip_rms = Some(1.0);
                }
            }
            Arm::AdamWZClip => c.zclip = Some(ZClipConfig::default()),
            Arm::AdamWGuard => {
                c.guard = Some(LossGuardConfig {
                    detector: SpikeDetectorConfig {
                        window: 50,
                        warmup: 50,
                        ..SpikeDetectorConfig::default()
                    },
                    action: SpikeAction::Rollback,
                    snapshot_every: 25,
                    lr_factor: 0.5,
                    lr_steps: 50,
                    skip_after_rollback: 0,
                })
            }
            Arm::Lamb => {
                c.optimizer = with(OptimizerKind::Lamb(LambConfig {
                    lr: adamw.lr,
                    beta1: adamw.beta1,
                    beta2: adamw.beta2,
                    eps: adamw.eps,
                    weight_decay: adamw.weight_decay,
                }))
            }
            Arm::Muon => {
                c.matrix_optimizer = Some(with(OptimizerKind::Muon(MuonConfig {
                    lr: adamw.lr,
                    momentum: 0.95,
                    nesterov: true,
                    weight_decay: adamw.weight_decay,
                    eps: 1e-7,
                    ns_steps: 5,
                    ns_coefficients: [3.4445, -4.7750, 2.0315],
                    adjust_lr: AdjustLr::MatchRmsAdamw,
                })))
            }
            Arm::Shampoo => {
                c.optimizer = with(OptimizerKind::Shampoo(ShampooConfig {
                    lr: adamw.lr,
                    beta1: adamw.beta1,
                    beta2: adamw.beta2,
                    epsilon: 1e-12,
                    weight_decay: adamw.weight_decay,
                    max_preconditioner_dim: 32,
                    precondition_frequency: 10,
                    start_preconditioning_step: -1,
                    use_bias_correction: true,
                    grafting: Grafting::Adam {
                        beta2: adamw.beta2,
                        eps: adamw.eps,
                    },
                    root_dtype: RootDtype::F64,
                }))
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// Everything a lab run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabConfig {
    /// The preset it came from.
    pub preset: Preset,
    /// The unstressed base run (AdamW); `steps`, sizes and batch are the lab's.
    pub base: TrainConfig,
    /// The spike-inducing settings applied to every arm.
    pub stress: Stress,
    /// The arms.
    pub arms: Vec<Arm>,
    /// Seeds per arm (seeds 0..n).
    pub seeds: usize,
    /// Model sizes `(n_layer, n_embd)` (one for every preset but `scale`).
    pub sizes: Vec<(usize, usize)>,
}

impl LabConfig {
    /// The settings of a preset.
    pub fn preset(preset: Preset) -> Self {
        let model = |l, c, t| GptConfig::new(65, t, l, 4, c);
        // The stress found by experiment on the default model (3 seeds x
        // 400 steps: plain AdamW spiked in 3/3 seeds, AdamW clipped at 1.0
        // in none): a 3x lr (9e-3 peak), 10 warmup steps, no clipping, beta2
        // 0.999 with a tiny epsilon (a large gradient meets a second moment
        // that remembers small ones), and three outlier batches after the
        // detector's warm-up.
        let outliers = |at: [u64; 3]| -> Vec<Outlier> {
            [
                OutlierKind::RepeatedChar,
                OutlierKind::GradX100,
                OutlierKind::RandomChars,
            ]
            .into_iter()
            .zip(at)
            .map(|(kind, step)| Outlier { step, kind })
            .collect()
        };
        let stress = Stress {
            lr_mult: 3.0,
            warmup_steps: Some(10),
            no_clip: true,
            eps: Some(1e-12),
            beta2: Some(0.999),
            outliers: outliers([150, 200, 250]),
            ..Stress::default()
        };
        let mut base = TrainConfig::new(model(2, 64, 32), 300);
        base.schedule = super::train::ScheduleKind::Constant;
        base.eval_batches = 4;
        let mut lab = LabConfig {
            preset,
            base,
            stress,
            arms: Arm::ALL.to_vec(),
            seeds: 3,
            sizes: vec![(2, 64)],
        };
        match preset {
            Preset::Default => {}
            Preset::Smoke => {
                lab.base.steps = 150;
                lab.base.model.block_size = 16;
                lab.base.batch = 4;
                lab.base.eval_batches = 2;
                lab.seeds = 1;
                lab.stress.outliers = vec![Outlier {
                    step: 120,
                    kind: OutlierKind::GradX100,
                }];
                lab.stress.warmup_steps = Some(5);
            }
            Preset::Full => {
                lab.base.model = model(4, 128, 64);
                lab.base.steps = 1200;
                lab.seeds = 5;
                lab.sizes = vec![(4, 128)];
                lab.stress.outliers = outliers([500, 700, 900]);
            }
            Preset::Scale => {
                lab.arms = vec![Arm::AdamW, Arm::AdamWClip, Arm::AdamWZClip];
                lab.sizes = vec![(1, 32), (2, 64), (3, 96)];
            }
        }
        lab
    }
}

/// Options of [`run_lab`] (what the command-line flags set).
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// The preset.
    pub preset: Preset,
    /// Output folder (default `runs/spike-lab-<preset>`).
    pub out: Option<PathBuf>,
    /// Seeds per arm (default: the preset's).
    pub seeds: Option<usize>,
    /// A text file to train on instead of Tiny Shakespeare.
    pub data: Option<PathBuf>,
    /// Steps per run (default: the preset's).
    pub steps: Option<u64>,
    /// Only these arms (default: the preset's).
    pub arms: Option<Vec<Arm>>,
    /// Replaces the preset's stress settings.
    pub stress: Option<Stress>,
    /// Replaces the stress's lr multiplier.
    pub lr_mult: Option<f64>,
    /// Show progress bars.
    pub progress: bool,
}

/// One run's outcome and its spike analysis.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// The arm.
    pub arm: Arm,
    /// Model size `(n_layer, n_embd)`.
    pub size: (usize, usize),
    /// The seed.
    pub seed: u64,
    /// What the trainer measured.
    pub summary: RunSummary,
    /// Spike events of the training loss.
    pub events: Vec<SpikeEvent>,
    /// Non-finite, or final validation loss >= ln(V) - 0.1.
    pub diverged: bool,
    /// Rows of [`RunSummary::layer_update_ratio`].
    pub layer_names: Vec<String>,
}

/// One row of the report's table: an arm (at one size) over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct ArmRow {
    /// Arm name.
    pub arm: String,
    /// Model size `(n_layer, n_embd)`.
    pub size: (usize, usize),
    /// Seeds run.
    pub seeds: usize,
    /// Seeds with at least one spike.
    pub seeds_with_spikes: usize,
    /// Spike events over all seeds.
    pub spikes: usize,
    /// Largest excursion (loss above the pre-spike mean) of any event.
    pub max_excursion: f64,
    /// Median recovery steps of the events that recovered.
    pub median_recovery: Option<f64>,
    /// Events that never recovered.
    pub unrecovered: usize,
    /// Diverged seeds.
    pub diverged: usize,
    /// Mean final validation loss of the seeds that did not diverge.
    pub final_val_loss: f64,
}

/// What [`run_lab`] wrote.
#[derive(Debug, Clone)]
pub struct LabReport {
    /// The output folder.
    pub dir: PathBuf,
    /// `dir/report.md`.
    pub report: PathBuf,
    /// The table as printed.
    pub table: String,
    /// The rows.
    pub rows: Vec<ArmRow>,
}

/// The most seeds per arm the lab takes (every run is listed before the
/// first one starts).
pub const MAX_SEEDS: usize = 1000;

/// Runs the lab and writes its report; see the module docs.
pub fn run_lab(options: &LabOptions) -> Result<LabReport> {
    let mut lab = LabConfig::preset(options.preset);
    if let Some(n) = options.seeds {
        if !(1..=MAX_SEEDS).contains(&n) {
            return Err(KeelError::config(
                "--seeds",
                format!("must be in 1..={MAX_SEEDS}, got {n}"),
            ));
        }
        lab.seeds = n;
    }
    let detector = SpikeDetectorConfig::default();
    // The preset's outlier batches a shorter run never reaches (the report
    // names them).
    let mut dropped_outliers = Vec::new();
    if let Some(s) = options.steps {
        // At least 20 steps past the detector's warm-up, or no step of the
        // run could be judged a spike.
        let least = detector.warmup + 20;
        if s < least {
            return Err(KeelError::config(
                "--steps",
                format!(
                    "must be at least {least}, got {s} (the spike detector judges only the \
                     steps after its {}-step warm-up)",
                    detector.warmup
                ),
            ));
        }
        lab.base.steps = s;
        (lab.stress.outliers, dropped_outliers) =
            lab.stress.outliers.iter().partition(|o| o.step < s);
    }
    if let Some(arms) = &options.arms {
        if arms.is_empty() {
            return Err(KeelError::config("--arms", "names no arm"));
        }
        // Two runs of one arm and seed would write one metrics file at once.
        for (i, arm) in arms.iter().enumerate() {
            if arms[..i].contains(arm) {
                return Err(KeelError::config(
                    "--arms",
                    format!("names `{}` twice", arm.name()),
                ));
            }
        }
        lab.arms = arms.clone();
    }
    if let Some(stress) = &options.stress {
        lab.stress = stress.clone();
        dropped_outliers.clear();
    }
    if let Some(m) = options.lr_mult {
        lab.stress.lr_mult = m;
    }
    let t = lab.base.model.block_size;
    let data = match &options.data {
        Some(path) => Dataset::from_file(path, t)?,
        None => Dataset::tiny_shakespeare(t)?,
    };
    let dir = options
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/spike-lab-{}", options.preset.name())));

    let mut jobs = Vec::new();
    for &size in &lab.sizes {
        let mut base = lab.base.clone();
        (base.model.n_layer, base.model.n_embd) = size;
        base.model.vocab_size = data.vocab().len();
        lab.stress.apply(&mut base)?;
        for &arm in &lab.arms {
            for seed in 0..lab.seeds as u64 {
                let mut c = arm.apply(&base)?;
                c.seed = seed;
                jobs.push((arm, size, seed, c));
            }
        }
    }
    // Only now that every run's config is checked: a lab refused by its
    // settings leaves no output folder behind.
    fs::create_dir_all(&dir)
        .map_err(|e| KeelError::config("out", format!("cannot create `{}`: {e}", dir.display())))?;
    let run_names: Vec<String> = jobs
        .iter()
        .map(|(arm, size, seed, _)| run_name(*arm, *size, *seed, lab.sizes.len() > 1))
        .collect();
    let total: u64 = jobs.iter().map(|j| j.3.steps).sum();
    let bar = if options.progress {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} steps, eta {eta} {msg}",
            )
            .map_err(|e| KeelError::Data(e.to_string()))?
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let done = Mutex::new(0usize);
    let n_jobs = jobs.len();
    let ln_v = (data.vocab().len() as f64).ln();
    let outlier_steps: Vec<usize> = lab
        .stress
        .outliers
        .iter()
        .map(|o| o.step as usize)
        .collect();
    // Runs go two at a time (one per core): the tiny model's matmuls do not
    // keep two threads busy, so arms in parallel finish sooner.
    let results: Vec<Result<RunResult>> = jobs
        .into_par_iter()
        .zip(&run_names)
        .map(|((arm, size, seed, config), name)| {
            let run_dir = dir.join(name);
            fs::create_dir_all(&run_dir).map_err(|e| io_err(&run_dir, e))?;
            let mut trainer = Trainer::new(config, &data)?;
            trainer.write_tensor_names(&run_dir.join("tensors.json"))?;
            let layer_names = trainer.layer_names();
            let summary =
                trainer.run(&data, Some(&run_dir.join("metrics.jsonl")), |_| bar.inc(1))?;
            let events =
                analyze_losses(&judged_losses(&summary.losses, &outlier_steps), &detector)?;
            let diverged = summary.non_finite || summary.final_val_loss >= ln_v - 0.1;
            let mut d = done
                .lock()
                .map_err(|_| KeelError::Data("progress lock".into()))?;
            *d += 1;
            bar.set_message(format!("{}/{n_jobs} runs done", *d));
            Ok(RunResult {
                arm,
                size,
                seed,
                summary,
                events,
                diverged,
                layer_names,
            })
        })
        .collect();
    bar.finish_and_clear();
    let results: Vec<RunResult> = results.into_iter().collect::<Result<_>>()?;
    // Only once every run is done: a lab that fails leaves the earlier one.
    clear_earlier_lab(&dir, &run_names)?;
    let rows = table_rows(&lab, &results);
    let table = markdown_table(&rows, lab.sizes.len() > 1);
    let report = write_report(&lab, &dir, &results, &rows, &table, ln_v, &dropped_outliers)?;
    Ok(LabReport {
        dir,
        report,
        table,
        rows,
    })
}

/// The loss series the spike analysis judges: an injected outlier batch's
/// own loss measures that batch, not the model, so it is replaced by the
/// previous step's loss (what follows the outlier is judged as usual).
pub fn judged_losses(losses: &[f64], outlier_steps: &[usize]) -> Vec<f64> {
    let mut out = losses.to_vec();
    for &s in outlier_steps {
        if s > 0 && s < out.len() {
            out[s] = out[s - 1];
        }
    }
    out
}

impl std::str::FromStr for Arm {
    type Err = KeelError;

    fn from_str(s: &str) -> Result<Self> {
        // "adamw, lamb" splits into " lamb": spaces are not part of a name.
        let s = s.trim();
        Arm::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Arm::ALL.iter().map(|a| a.name()).collect();
            KeelError::config(
                "--arms",
                format!("unknown arm `{s}` (one of {})", names.join(", ")),
            )
        })
    }
}

fn run_name(arm: Arm, size: (usize, usize), seed: u64, sized: bool) -> String {
    let arm = arm.name().replace('+', "_");
    if sized {
        format!("L{}C{}-{arm}-seed{seed}", size.0, size.1)
    } else {
        format!("{arm}-seed{seed}")
    }
}

/// The first line of every report starts so: the mark of an earlier lab.
const REPORT_HEADING: &str = "# keel spike lab";

/// Removes what an earlier lab wrote to `dir`, so the folder shows this lab
/// alone: its report and figures, and the files of its run folders other
/// than `keep` (this lab's). Only where `dir/report.md` is a lab's report;
/// files keel did not write stay, so does a run folder holding any, and
/// symbolic links are not followed.
fn clear_earlier_lab(dir: &Path, keep: &[String]) -> Result<()> {
    let earlier = fs::read_to_string(dir.join("report.md"))
        .is_ok_and(|text| text.starts_with(REPORT_HEADING));
    if !earlier {
        return Ok(());
    }
    let remove_err = |path: &Path, e: std::io::Error| {
        KeelError::Data(format!(
            "cannot remove `{}` of an earlier lab: {e}",
            path.display()
        ))
    };
    let figures = [
        "report.md",
        "loss_curves.svg",
        "loss_curves.png",
        "update_ratio_heatmap.svg",
        "update_ratio_heatmap.png",
    ];
    for entry in fs::read_dir(dir).map_err(|e| remove_err(dir, e))? {
        let entry = entry.map_err(|e| remove_err(dir, e))?;
        let (path, kind) = (
            entry.path(),
            entry.file_type().map_err(|e| remove_err(dir, e))?,
        );
        let name = entry.file_name().to_string_lossy().into_owned();
        if figures.contains(&name.as_str()) && kind.is_file() {
            fs::remove_file(&path).map_err(|e| remove_err(&path, e))?;
        } else if kind.is_dir() && is_run_name(&name) && !keep.contains(&name) {
            for file in ["metrics.jsonl", "tensors.json"] {
                let file = path.join(file);
                if fs::symlink_metadata(&file).is_ok_and(|m| m.is_file()) {
                    fs::remove_file(&file).map_err(|e| remove_err(&file, e))?;
                }
            }
            // Fails, and is meant to, when the folder holds other files.
            let _ = fs::remove_dir(&path);
        }
    }
    Ok(())
}

/// Whether `name` is a folder name [`run_name`] gives: `[L<l>C<c>-]<arm>-seed<k>`.
fn is_run_name(name: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((head, seed)) = name.rsplit_once("-seed") else {
        return false;
    };
    let arm = match head.split_once('-') {
        Some((size, arm))
            if size
                .strip_prefix('L')
                .and_then(|s| s.split_once('C'))
                .is_some_and(|(l, c)| digits(l) && digits(c)) =>
        {
            arm
        }
        _ => head,
    };
    digits(seed) && Arm::ALL.iter().any(|a| a.name().replace('+', "_") == arm)
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> KeelError {
    KeelError::Data(format!("cannot write `{}`: {e}", path.display()))
}

fn table_rows(lab: &LabConfig, results: &[RunResult]) -> Vec<ArmRow> {
    let mut rows = Vec::new();
    for &size in &lab.sizes {
        for &arm in &lab.arms {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.arm == arm && r.size == size)
                .collect();
            let events: Vec<&SpikeEvent> = runs.iter().flat_map(|r| &r.events).collect();
            let mut rec: Vec<f64> = events
                .iter()
                .filter_map(|e| e.recovery_steps.map(|s| s as f64))
                .collect();
            rec.sort_by(f64::total_cmp);
            let median_recovery = (!rec.is_empty()).then(|| {
                let m = rec.len() / 2;
                if rec.len() % 2 == 1 {
                    rec[m]
                } else {
                    0.5 * (rec[m - 1] + rec[m])
                }
            });
            let ok: Vec<f64> = runs
                .iter()
                .filter(|r| !r.diverged)
                .map(|r| r.summary.final_val_loss)
                .collect();
            rows.push(ArmRow {
                arm: arm.name().to_string(),
                size,
                seeds: runs.len(),
                seeds_with_spikes: runs.iter().filter(|r| !r.events.is_empty()).count(),
                spikes: events.len(),
                max_excursion: events.iter().map(|e| e.excursion).fold(0.0, f64::max),
                median_recovery,
                unrecovered: events.iter().filter(|e| e.recovery_steps.is_none()).count(),
                diverged: runs.iter().filter(|r| r.diverged).count(),
                final_val_loss: if ok.is_empty() {
                    f64::NAN
                } else {
                    ok.iter().sum::<f64>() / ok.len() as f64
                },
            });
        }
    }
    rows
}

/// The table as Markdown (also what the command prints).
pub fn markdown_table(rows: &[ArmRow], sized: bool) -> String {
    let mut s = String::new();
    let size_col = if sized { "| size " } else { "" };
    let _ = writeln!(
        s,
        "{size_col}| arm | seeds with spikes | spikes | max excursion | median recovery (steps) | unrecovered | diverged | final val loss |"
    );
    let _ = writeln!(
        s,
        "{}|---|---|---|---|---|---|---|---|",
        if sized { "|---" } else { "" }
    );
    for r in rows {
        let size = if sized {
            format!("| L{} C{} ", r.size.0, r.size.1)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{size}| {} | {}/{} | {} | {} | {} | {} | {}/{} | {} |",
            r.arm,
            r.seeds_with_spikes,
            r.seeds,
            r.spikes,
            if r.spikes == 0 {
                "-".to_string()
            } else {
                format!("{:.2}", r.max_excursion)
            },
            r.median_recovery
                .map_or("-".to_string(), |m| format!("{m:.0}")),
            r.unrecovered,
            r.diverged,
            r.seeds,
            if r.final_val_loss.is_finite() {
                format!("{:.3}", r.final_val_loss)
            } else {
                "-".to_string()
            }
        );
    }
    s
}

/// How an arm compares with plain AdamW at the same size, in words.
fn verdict(row: &ArmRow, base: &ArmRow) -> (&'static str, String) {
    const TOL: f64 = 0.02;
    let val = |r: &ArmRow| {
        if r.final_val_loss.is_finite() {
            r.final_val_loss
        } else {
            f64::INFINITY
        }
    };
    let (v, bv) = (val(row), val(base));
    let better_val = v < bv - TOL;
    let worse_val = v > bv + TOL;
    let verdict = if row.diverged != base.diverged {
        if row.diverged < base.diverged {
            "better than"
        } else {
            "worse than"
        }
    } else if (row.spikes < base.spikes && !worse_val) || (better_val && row.spikes <= base.spikes)
    {
        "better than"
    } else if (row.spikes > base.spikes && !better_val) || (worse_val && row.spikes >= base.spikes)
    {
        "worse than"
    } else if row.spikes == base.spikes && !better_val && !worse_val {
        "about the same as"
    } else {
        "mixed against"
    };
    let fmt = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "n/a".into()
        }
    };
    // The deciding reason first, so a reader sees why without applying the rule.
    let reason = if row.diverged != base.diverged {
        "diverged seeds decide"
    } else if row.spikes < base.spikes && worse_val {
        "fewer spike events, but a final val loss more than 0.02 worse"
    } else if row.spikes > base.spikes && better_val {
        "more spike events, but a final val loss more than 0.02 better"
    } else if row.spikes != base.spikes {
        "spike events decide"
    } else if better_val || worse_val {
        "as many spike events; final val loss decides"
    } else if row.diverged == row.seeds && base.diverged == base.seeds {
        "as many spike events, every seed of both diverged"
    } else {
        "as many spike events, val loss within 0.02"
    };
    let recovery = match (row.median_recovery, base.median_recovery) {
        (Some(a), Some(b)) => format!(", median recovery {a:.0} vs {b:.0} steps"),
        _ => String::new(),
    };
    (
        verdict,
        format!(
            "({reason}): {} vs {}, {}/{} diverged vs {}/{}, final val loss {} vs {}{recovery}",
            spike_events(row.spikes),
            base.spikes,
            row.diverged,
            row.seeds,
            base.diverged,
            base.seeds,
            fmt(row.final_val_loss),
            fmt(bv)
        ),
    )
}

/// "1 spike event", "2 spike events".
fn spike_events(n: usize) -> String {
    format!("{n} spike event{}", if n == 1 { "" } else { "s" })
}

fn write_report(
    lab: &LabConfig,
    dir: &Path,
    results: &[RunResult],
    rows: &[ArmRow],
    table: &str,
    ln_v: f64,
    dropped_outliers: &[Outlier],
) -> Result<PathBuf> {
    let sized = lab.sizes.len() > 1;
    let mut md = String::new();
    let _ = writeln!(md, "{REPORT_HEADING}: preset `{}`\n", lab.preset.name());
    let m = &lab.base.model;
    let _ = writeln!(
        md,
        "Char-level GPT, context {}, batch {}, {} steps per run, {} seed(s) per arm; \
         sizes {}. Stress on every arm: {}.\n",
        m.block_size,
        lab.base.batch,
        lab.base.steps,
        lab.seeds,
        lab.sizes
            .iter()
            .map(|(l, c)| format!("{l} layers x {c} wide"))
            .collect::<Vec<_>>()
            .join(", "),
        describe_stress(&lab.stress, &lab.base)
    );
    if !dropped_outliers.is_empty() {
        let _ = writeln!(
            md,
            "The preset's outlier batches at or past step {} were left out: {}.\n",
            lab.base.steps,
            describe_outliers(dropped_outliers)
        );
    }
    let _ = writeln!(
        md,
        "A spike is a step whose training loss exceeds the mean of the previous 100 losses \
         by 4 sd and by 10% (after 100 steps), consecutive steps merged; excursion = peak \
         minus that mean; recovery = steps until the 0.9-EMA of the loss is back within 1% \
         of it. Diverged = NaN/Inf or final val loss >= ln(V) - 0.1 = {:.3}. Final val loss \
         is the mean over the seeds that did not diverge.\n",
        ln_v - 0.1
    );
    let _ = writeln!(md, "## Results\n\n{table}");
    let _ = writeln!(md, "## Compared with plain AdamW\n");
    if !lab.arms.contains(&Arm::AdamW) {
        let _ = writeln!(
            md,
            "Plain AdamW was not among the arms: nothing to compare with."
        );
    }
    for &size in &lab.sizes {
        let Some(base) = rows
            .iter()
            .find(|r| r.arm == Arm::AdamW.name() && r.size == size)
        else {
            continue;
        };
        if sized {
            let _ = writeln!(md, "\nAt {} layers x {} wide:\n", size.0, size.1);
        }
        let _ = writeln!(
            md,
            "- plain AdamW spiked in {}/{} seeds ({}) and diverged in {}/{}.",
            base.seeds_with_spikes,
            base.seeds,
            spike_events(base.spikes),
            base.diverged,
            base.seeds
        );
        for r in rows.iter().filter(|r| r.size == size && r.arm != base.arm) {
            let (word, why) = verdict(r, base);
            let _ = writeln!(md, "- **{}**: {word} plain AdamW {why}.", r.arm);
        }
    }
    let _ = writeln!(
        md,
        "\n(better/worse: fewer/more diverged seeds first; then fewer/more spike events \
         without a final val loss more than 0.02 worse/better; with as many spike events, \
         a final val loss more than 0.02 better/worse.)\n"
    );
    if sized {
        let _ = writeln!(md, "## Spike rate against model size\n");
        let _ = writeln!(
            md,
            "| arm | size | params | spikes per seed | diverged |\n|---|---|---|---|---|"
        );
        for r in rows {
            let params = results
                .iter()
                .find(|x| x.size == r.size)
                .map_or(0, |x| x.summary.param_count);
            let _ = writeln!(
                md,
                "| {} | L{} C{} | {} | {:.2} | {}/{} |",
                r.arm,
                r.size.0,
                r.size.1,
                params,
                r.spikes as f64 / r.seeds.max(1) as f64,
                r.diverged,
                r.seeds
            );
        }
        md.push('\n');
    }

    // Plots use the first size and seed 0 of every arm.
    let size0 = lab.sizes[0];
    let curves: Vec<(String, Vec<f64>)> = lab
        .arms
        .iter()
        .filter_map(|&arm| {
            results
                .iter()
                .find(|r| r.arm == arm && r.size == size0 && r.seed == 0)
                .map(|r| (arm.name().to_string(), r.summary.losses.clone()))
        })
        .collect();
    let ylim = ln_v + 1.0;
    plot::loss_curves(
        &dir.join("loss_curves.svg"),
        &curves,
        ylim,
        plot::Format::Svg,
    )?;
    plot::loss_curves(
        &dir.join("loss_curves.png"),
        &curves,
        ylim,
        plot::Format::Png,
    )?;
    let outliers = if lab.stress.outliers.is_empty() {
        "no outlier batches".to_string()
    } else {
        format!(
            "outlier batches at steps {}",
            lab.stress
                .outliers
                .iter()
                .map(|o| format!("{} ({:?})", o.step, o.kind))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let _ = writeln!(
        md,
        "## Loss curves (seed 0)\n\nTraining loss per step, 5-step mean (NaN/Inf dropped), clipped at ln(V) + 1; \
         {outliers}.\n\n![loss curves](loss_curves.svg)\n\n\
         ([PNG](loss_curves.png); legend order: {})\n",
        curves
            .iter()
            .enumerate()
            .map(|(i, (n, _))| format!("{} = {}", plot::color_name(i), n))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let first_spike = results
        .iter()
        .filter(|r| r.arm == Arm::AdamW && r.size == size0)
        .filter_map(|r| r.events.first().map(|e| (e.start, r)))
        .min_by_key(|(s, r)| (*s, r.seed));
    let _ = writeln!(md, "## Update ratio around the first AdamW spike\n");
    match first_spike {
        Some((start, r)) => {
            let lo = start.saturating_sub(30);
            let hi = (start + 30).min(r.summary.layer_update_ratio.len());
            plot::heatmap(
                &dir.join("update_ratio_heatmap.svg"),
                &r.layer_names,
                &r.summary.layer_update_ratio[lo..hi],
                lo,
                start,
                plot::Format::Svg,
            )?;
            plot::heatmap(
                &dir.join("update_ratio_heatmap.png"),
                &r.layer_names,
                &r.summary.layer_update_ratio[lo..hi],
                lo,
                start,
                plot::Format::Png,
            )?;
            let _ = writeln!(
                md,
                "Seed {}, steps {lo}..{hi} (spike at step {start}): log10 of each layer's \
                 ||Δw|| / ||w|| per step (rows: {} from the bottom; dark = small, bright = \
                 large; the spike step is marked). Does the shallow layer move first?\n\n\
                 ![update-ratio heatmap](update_ratio_heatmap.svg)\n\n([PNG](update_ratio_heatmap.png))\n",
                r.seed,
                r.layer_names.join(", ")
            );
            let _ = writeln!(
                md,
                "{}",
                heatmap_table(&r.layer_names, &r.summary.layer_update_ratio, start)
            );
        }
        None if !lab.arms.contains(&Arm::AdamW) => {
            let _ = writeln!(md, "Plain AdamW was not among the arms: no heatmap.\n");
        }
        None => {
            let _ = writeln!(md, "Plain AdamW did not spike in any seed: no heatmap.\n");
        }
    }
    // Folder names as `run_name` writes them, with a real one for example.
    let pattern = if sized {
        "L<layers>C<width>-<arm>-seed<k>"
    } else {
        "<arm>-seed<k>"
    };
    let arm = lab.arms.iter().find(|a| a.name().contains('+'));
    let example = match (arm.or(lab.arms.first()), results.first()) {
        (Some(&arm), Some(r)) => run_name(arm, r.size, 0, sized),
        _ => pattern.to_string(),
    };
    let _ = writeln!(
        md,
        "## Files\n\nEach run's per-step metrics are in `{pattern}/metrics.jsonl`, with `+` in \
         an arm's name written `_` (e.g. `{example}/`) \
         (loss, lr factor, global and per-tensor grad norm, per-tensor update/param ratio, \
         trust ratios, gradient cosine with the previous step, max attention logit per layer, \
         mean log Z, skipped and rolled-back steps, outliers, validation loss)."
    );
    let path = dir.join("report.md");
    fs::write(&path, md).map_err(|e| io_err(&path, e))?;
    Ok(path)
}

/// Per-layer update ratio a few steps before, at, and after the spike.
fn heatmap_table(names: &[String], ratios: &[Vec<f64>], start: usize) -> String {
    let steps: Vec<usize> = [
        start.saturating_sub(5),
        start.saturating_sub(1),
        start,
        start + 1,
        start + 5,
    ]
    .into_iter()
    .filter(|&s| s < ratios.len())
    .collect();
    let mut s = String::from("| layer |");
    for st in &steps {
        let _ = write!(s, " step {st} |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(steps.len()));
    s.push('\n');
    for (i, n) in names.iter().enumerate() {
        let _ = write!(s, "| {n} |");
        for &st in &steps {
            let _ = write!(s, " {:.2e} |", ratios[st][i]);
        }
        s.push('\n');
    }
    s
}

fn describe_stress(s: &Stress, base: &TrainConfig) -> String {
    let mut parts = vec![format!(
        "AdamW peak lr {:.0e} x {} (betas {}/{}), constant schedule",
        base.optimizer.lr(),
        s.lr_mult,
        0.9,
        s.beta2.map_or("0.95".into(), |b| b.to_string())
    )];
    if let Some(w) = s.warmup_steps {
        parts.push(format!("{w} warmup steps"));
    }
    if s.post_ln {
        parts.push("post-LN".into());
    }
    if s.no_clip {
        parts.push("no clipping".into());
    }
    if let Some(e) = s.eps {
        parts.push(format!("eps {e:e}"));
    }
    if s.init_scale != 1.0 {
        parts.push(format!("init std x {}", s.init_scale));
    }
    if s.fp16_grads {
        parts.push("fp16 gradients".into());
    }
    if !s.outliers.is_empty() {
        parts.push(format!(
            "outlier batches: {}",
            describe_outliers(&s.outliers)
        ));
    }
    parts.join(", ")
}

/// "GradX100 at 150, RandomChars at 200".
fn describe_outliers(outliers: &[Outlier]) -> String {
    outliers
        .iter()
        .map(|o| format!("{:?} at {}", o.kind, o.step))
        .collect::<Vec<_>>()
        .join(", ")
}
