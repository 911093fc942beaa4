//! The reference trainer: one GPT run driven only through keel's public
//! [`Optimizer`] trait and guard API, as any other trainer would use them.
//!
//! Per step, top to bottom: pick the batch (seeded by `(seed, step)` so a
//! resumed run sees the same data), inject an outlier batch if the stress
//! settings ask for one, forward and backward (accumulated over
//! `grad_accum` micro-batches), emulate fp16 gradients, let the loss guard
//! judge the loss, clip with ZClip, set every optimizer's lr from the
//! schedule, step, update the EMA, and write one JSON line of metrics.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::cpu::CpuOptimizer;
use crate::checkpoint::{
    metadata_checksum, stored_checksum, tensor_checksum, LeBytesView, StateData, TensorReader,
};
use crate::config::{AdamWConfig, OptimizerConfig, OptimizerKind};
use crate::error::{KeelError, Result};
use crate::group::ParamGroup;
use crate::guard::{
    DynamicLossScaler, LossGuard, LossGuardConfig, LossScalerConfig, ZClip, ZClipConfig,
};
use crate::optim::{state_bytes, Optimizer};
use crate::schedule::Schedule;
use crate::stats::StepStats;
use crate::tensor::ParamSpec;

use super::data::{Batch, Dataset};
use super::{Gpt, GptConfig, Norm, SplitMix64};

/// A kind of outlier batch injected by the stress settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutlierKind {
    /// Every input and target is the same character.
    RepeatedChar,
    /// Inputs and targets drawn uniformly from the vocabulary.
    RandomChars,
    /// An ordinary batch whose gradient is multiplied by 100.
    GradX100,
}

/// One injected outlier batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// The 0-based step it replaces: before the run's last step, or
    /// [`Trainer::new`] refuses it.
    pub step: u64,
    /// What it is.
    pub kind: OutlierKind,
}

/// Spike-inducing settings applied on top of a [`TrainConfig`] (each
/// field left at its default changes nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stress {
    /// Multiplier on every optimizer's peak lr.
    pub lr_mult: f64,
    /// Replaces the warmup length.
    pub warmup_steps: Option<u64>,
    /// Post-LN blocks instead of pre-LN.
    pub post_ln: bool,
    /// Replaces qk-norm on/off.
    pub qk_norm: Option<bool>,
    /// Multiplier on the init standard deviation.
    pub init_scale: f64,
    /// Drops every gradient clipping of the optimizers (`clip_global_norm`,
    /// `clip_value`, `update_clip_rms`) and ZClip.
    pub no_clip: bool,
    /// Replaces the Adam-family epsilon.
    pub eps: Option<f64>,
    /// Replaces the Adam-family beta2.
    pub beta2: Option<f64>,
    /// Outlier batches at given steps.
    pub outliers: Vec<Outlier>,
    /// Rounds gradients to f16 before the step (values past 65504 become
    /// Inf, tiny ones 0), as an fp16 run without master gradients would.
    pub fp16_grads: bool,
}

impl Default for Stress {
    fn default() -> Self {
        Stress {
            lr_mult: 1.0,
            warmup_steps: None,
            post_ln: false,
            qk_norm: None,
            init_scale: 1.0,
            no_clip: false,
            eps: None,
            beta2: None,
            outliers: Vec::new(),
            fp16_grads: false,
        }
    }
}

impl Stress {
    /// Reads stress settings from a TOML file; errors name the file and field.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .map_err(|e| KeelError::config("stress", format!("{}: {e}", path.display())))?;
        crate::config::refuse_non_finite_toml(&text, "stress")?;
        toml::from_str(&text)
            .map_err(|e| KeelError::config("stress", format!("{}: {e}", path.display())))
    }

    /// Writes these settings into `config` (the stress fields become part of
    /// the config itself, so a run records what it really trained with); on
    /// an error, `config` is left as it was.
    pub fn apply(&self, config: &mut TrainConfig) -> Result<()> {
        // On a copy: an error leaves `config` as it was.
        let mut stressed = config.clone();
        self.apply_to(&mut stressed)?;
        *config = stressed;
        Ok(())
    }

    fn apply_to(&self, config: &mut TrainConfig) -> Result<()> {
        if !(self.lr_mult.is_finite() && self.lr_mult > 0.0) {
            return Err(KeelError::config(
                "stress.lr_mult",
                format!("must be finite and > 0, got {}", self.lr_mult),
            ));
        }
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return Err(KeelError::config(
                "stress.init_scale",
                format!("must be finite and > 0, got {}", self.init_scale),
            ));
        }
        if let Some(w) = self.warmup_steps {
            config.warmup_steps = w;
        }
        if self.post_ln {
            config.model.norm = Norm::Post;
        }
        if let Some(q) = self.qk_norm {
            config.model.qk_norm = q;
        }
        config.model.init_std *= self.init_scale;
        if self.no_clip {
            config.zclip = None;
        }
        for opt in std::iter::once(&mut config.optimizer).chain(config.matrix_optimizer.as_mut()) {
            let lr = opt.lr() * self.lr_mult;
            opt.set_lr(lr)?;
            if self.no_clip {
                opt.clip_global_norm = None;
                opt.clip_value = None;
                if let OptimizerKind::AdamW(c) = &mut opt.kind {
                    c.update_clip_rms = None;
                }
            }
            let (eps, beta2) = match &mut opt.kind {
                OptimizerKind::Adam(c) => (&mut c.eps, &mut c.beta2),
                OptimizerKind::AdamW(c) => (&mut c.eps, &mut c.beta2),
                OptimizerKind::Lamb(c) => (&mut c.eps, &mut c.beta2),
                _ => continue,
            };
            if let Some(e) = self.eps {
                *eps = e;
            }
            if let Some(b) = self.beta2 {
                *beta2 = b;
            }
        }
        config.fp16_grads |= self.fp16_grads;
        refuse_outliers_past("stress.outliers", &self.outliers, config.steps)?;
        config.outliers.extend(self.outliers.iter().copied());
        config.validate_before_data()
    }
}

/// The learning-rate schedule's shape; its peak is each optimizer's lr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to `final_lr_frac` of the peak.
    #[default]
    Cosine,
    /// Linear warmup, then the peak.
    Constant,
    /// Linear warmup, the peak, then a linear decay over the last 20%.
    Wsd,
}

/// One training run: model, data shape, optimizers, schedule, guards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The model (`vocab_size` is replaced by the data's).
    pub model: GptConfig,
    /// Sequences per micro-batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Micro-batches summed per step.
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// Seed of the init and the batches.
    #[serde(default)]
    pub seed: u64,
    /// The optimizer of every tensor, or of the non-matrix tensors when
    /// `matrix_optimizer` is set; its lr is the peak lr.
    pub optimizer: OptimizerConfig,
    /// An optimizer (e.g. Muon) for the hidden 2-D matrices (all Linear
    /// weights of the blocks; not the embeddings).
    #[serde(default)]
    pub matrix_optimizer: Option<OptimizerConfig>,
    /// The schedule's shape.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Linear warmup steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// The schedule's floor as a fraction of the peak.
    #[serde(default = "default_final_lr_frac")]
    pub final_lr_frac: f64,
    /// Weight decay on biases, LayerNorm gains and embeddings too (off by
    /// default: decaying them only pulls scales toward 0).
    #[serde(default)]
    pub decay_all: bool,
    /// lr multiplier of the embeddings (`wte`, `wpe`).
    #[serde(default = "one")]
    pub embedding_lr_scale: f64,
    /// Layer-wise lr decay: block `l` of `L` gets `decay^(L-1-l)`, the
    /// embeddings `decay^L` (1 = off; 0 freezes all but the last block).
    #[serde(default = "one")]
    pub layer_lr_decay: f64,
    /// Decay of an exponential moving average of the parameters used for
    /// validation (none: validate the raw parameters).
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// ZClip adaptive gradient clipping.
    #[serde(default)]
    pub zclip: Option<ZClipConfig>,
    /// The loss-spike guard (skip or rollback); single optimizer only.
    #[serde(default)]
    pub guard: Option<LossGuardConfig>,
    /// Round gradients to f16 before the step.
    #[serde(default)]
    pub fp16_grads: bool,
    /// Dynamic loss scaling around the f16 rounding (the control arm of
    /// `fp16_grads`).
    #[serde(default)]
    pub loss_scaler: Option<LossScalerConfig>,
    /// Outlier batches.
    #[serde(default)]
    pub outliers: Vec<Outlier>,
    /// Validate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Validation batches (fixed by the data).
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
}

fn default_batch() -> usize {
    8
}
fn one_usize() -> usize {
    1
}
fn one() -> f64 {
    1.0
}
fn default_final_lr_frac() -> f64 {
    0.1
}
fn default_eval_batches() -> usize {
    8
}

impl TrainConfig {
    /// A small char-level run: AdamW lr 3e-3 (betas 0.9/0.95, weight decay
    /// 0.1), cosine schedule with 20 warmup steps, batch 8.
    pub fn new(model: GptConfig, steps: u64) -> Self {
        let adamw = AdamWConfig {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            update_clip_rms: None,
        };
        TrainConfig {
            model,
            batch: 8,
            grad_accum: 1,
            steps,
            seed: 0,
            optimizer: OptimizerConfig::new(OptimizerKind::AdamW(adamw)),
            matrix_optimizer: None,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 20,
            final_lr_frac: 0.1,
            decay_all: false,
            embedding_lr_scale: 1.0,
            layer_lr_decay: 1.0,
            ema_decay: None,
            zclip: None,
            guard: None,
            fp16_grads: false,
            loss_scaler: None,
            outliers: Vec::new(),
            eval_every: 0,
            eval_batches: 8,
        }
    }

    /// Reads a TOML config and checks it ([`validate_before_data`]); errors
    /// name the file and the field.
    ///
    /// [`validate_before_data`]: Self::validate_before_data
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let c = Self::parse_toml_file(path)?;
        c.validate_before_data()?;
        Ok(c)
    }

    /// Reads a TOML config without checking how its fields fit together, for
    /// callers that change some first (as `keel train`'s flags do: a file's
    /// `warmup_steps` may exceed its own `steps` when `--steps` raises them).
    /// Malformed TOML, unknown keys and non-finite numbers are still errors.
    pub fn parse_toml_file(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .map_err(|e| KeelError::config("config", format!("{}: {e}", path.display())))?;
        crate::config::refuse_non_finite_toml(&text, "")?;
        toml::from_str(&text)
            .map_err(|e| KeelError::config("config", format!("{}: {e}", path.display())))
    }

    /// [`validate`](Self::validate) for a config whose data is not read yet:
    /// the data sets the vocabulary ([`Trainer::new`]), so `vocab_size` may
    /// still be 0 (left out of a file); everything else is checked.
    pub fn validate_before_data(&self) -> Result<()> {
        let mut sized = self.clone();
        sized.model.vocab_size = sized.model.vocab_size.max(1);
        sized.validate()
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.optimizer.validate()?;
        if let Some(m) = &self.matrix_optimizer {
            m.validate()
                .map_err(|e| KeelError::config("matrix_optimizer", e.to_string()))?;
        }
        for (field, v) in [("batch", self.batch), ("grad_accum", self.grad_accum)] {
            if v == 0 {
                return Err(KeelError::config(field, "must be at least 1"));
            }
        }
        if self.steps == 0 {
            return Err(KeelError::config("steps", "must be at least 1"));
        }
        if self.eval_batches == 0 {
            return Err(KeelError::config("eval_batches", "must be at least 1"));
        }
        if self.warmup_steps > self.steps {
            return Err(KeelError::config(
                "warmup_steps",
                format!("{} is longer than steps {}", self.warmup_steps, self.steps),
            ));
        }
        // A decay that ends above its peak is a typo, not a schedule.
        if !(0.0..=1.0).contains(&self.final_lr_frac) {
            return Err(KeelError::config(
                "final_lr_frac",
                format!("must lie in [0, 1], got {}", self.final_lr_frac),
            ));
        }
        let fracs = [
            ("embedding_lr_scale", self.embedding_lr_scale),
            ("layer_lr_decay", self.layer_lr_decay),
        ];
        for (field, v) in fracs {
            if !(v.is_finite() && v >= 0.0) {
                return Err(KeelError::config(
                    field,
                    format!("must be finite and >= 0, got {v}"),
                ));
            }
        }
        if let Some(d) = self.ema_decay {
            if !(0.0..1.0).contains(&d) {
                return Err(KeelError::config(
                    "ema_decay",
                    format!("must lie in [0, 1), got {d}"),
                ));
            }
        }
        if let Some(z) = &self.zclip {
            z.validate()?;
        }
        if let Some(g) = &self.guard {
            g.validate()?;
            if self.matrix_optimizer.is_some() {
                return Err(KeelError::config(
                    "guard",
                    "the loss guard snapshots one optimizer; drop matrix_optimizer",
                ));
            }
        }
        if let Some(s) = &self.loss_scaler {
            s.validate()?;
            if !self.fp16_grads {
                return Err(KeelError::config(
                    "loss_scaler",
                    "scales the loss around the f16 rounding of `fp16_grads`, which is off: \
                     set fp16_grads = true or drop loss_scaler",
                ));
            }
        }
        Ok(())
    }

    /// The schedule of a unit peak (each optimizer multiplies it by its lr).
    pub fn unit_schedule(&self) -> Schedule {
        let (peak_lr, final_lr) = (1.0, self.final_lr_frac);
        match self.schedule {
            ScheduleKind::Cosine => Schedule::WarmupCosine {
                peak_lr,
                warmup_steps: self.warmup_steps,
                total_steps: self.steps,
                final_lr,
            },
            ScheduleKind::Constant => Schedule::Wsd {
                peak_lr,
                warmup_steps: self.warmup_steps,
                stable_steps: u64::MAX / 2,
                decay_steps: 1,
                final_lr: peak_lr,
            },
            ScheduleKind::Wsd => {
                let decay = (self.steps / 5).max(1);
                Schedule::Wsd {
                    peak_lr,
                    warmup_steps: self.warmup_steps,
                    stable_steps: self
                        .steps
                        .saturating_sub(self.warmup_steps.saturating_add(decay)),
                    decay_steps: decay,
                    final_lr,
                }
            }
        }
    }
}

/// Whether a tensor of this name is a hidden matrix (a block's Linear weight).
pub fn is_hidden_matrix(spec: &ParamSpec) -> bool {
    spec.shape.len() == 2 && spec.name.contains(".h.")
}

/// The block index of a tensor (`None`: embeddings or the final LayerNorm).
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = name.split(".h.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// The parameter groups of `specs` under `config`: one per (lr scale,
/// weight decay) pair, named after the layer.
pub fn param_groups(config: &TrainConfig, specs: &[ParamSpec]) -> Vec<ParamGroup> {
    let n_layer = config.model.n_layer as i32;
    let mut groups: BTreeMap<String, ParamGroup> = BTreeMap::new();
    for s in specs {
        let name = s.name.as_str();
        let embedding = name.contains(".wte.") || name.contains(".wpe.");
        let (label, depth_scale) = match layer_of(name) {
            Some(l) => (
                format!("h{l}"),
                config.layer_lr_decay.powi(n_layer - 1 - l as i32),
            ),
            None if embedding => ("embed".to_string(), config.layer_lr_decay.powi(n_layer)),
            None => ("head".to_string(), 1.0),
        };
        let lr_scale = depth_scale
            * if embedding {
                config.embedding_lr_scale
            } else {
                1.0
            };
        let decay = config.decay_all || (s.shape.len() == 2 && !embedding);
        let key = format!("{label}.{}", if decay { "decay" } else { "no_decay" });
        groups
            .entry(key.clone())
            .or_insert_with(|| {
                ParamGroup::new(key, Vec::<String>::new())
                    .with_lr_scale(lr_scale)
                    .with_weight_decay(decay)
            })
            .params
            .push(s.name.clone());
    }
    groups.into_values().collect()
}

/// One optimizer and the indices of the tensors it owns.
struct Part {
    opt: CpuOptimizer<f32>,
    peak_lr: f64,
    tensors: Vec<usize>,
}

/// What one step measured (one line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    /// 0-based step.
    pub step: u64,
    /// Training loss of the batch (before the step).
    pub loss: f64,
    /// Schedule multiplier times the guard's lr factor (the base lr of each
    /// optimizer is its peak times this).
    pub lr_factor: f64,
    /// Global gradient norm (after f16 rounding, before clipping).
    pub grad_norm: f64,
    /// Per-tensor gradient norms, in parameter order.
    pub tensor_grad_norm: Vec<f64>,
    /// Per-tensor `||Δw|| / ||w||`.
    pub update_ratio: Vec<f64>,
    /// Per-tensor trust ratios (LAMB), null elsewhere.
    pub trust_ratio: Vec<Option<f64>>,
    /// Per-tensor cosine of the gradient with the previous step's.
    pub grad_cos: Vec<f64>,
    /// Per-layer largest attention logit.
    pub max_attn_logit: Vec<f64>,
    /// Mean log-partition of the logits.
    pub mean_log_z: f64,
    /// The step did not change the parameters (guard, non-finite gradient,
    /// loss-scaler overflow).
    pub skipped: bool,
    /// The guard rolled back to its snapshot on this step.
    pub rolled_back: bool,
    /// An outlier batch was injected.
    pub outlier: Option<OutlierKind>,
    /// Validation loss, on evaluation steps.
    pub val_loss: Option<f64>,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Training loss per step (NaN/Inf kept).
    pub losses: Vec<f64>,
    /// `(step, validation loss)` at each evaluation.
    pub val_losses: Vec<(u64, f64)>,
    /// The last validation loss (NaN when the run blew up).
    pub final_val_loss: f64,
    /// A loss or the final validation loss was not finite.
    pub non_finite: bool,
    /// Per step, per group of [`Trainer::layer_names`], `||Δw|| / ||w||`.
    pub layer_update_ratio: Vec<Vec<f64>>,
    /// Steps that changed nothing.
    pub skipped: u64,
    /// Guard rollbacks.
    pub rollbacks: u64,
    /// Parameters of the model.
    pub param_count: usize,
}

/// A GPT, its parameters and optimizers, and the guards of one run.
pub struct Trainer {
    config: TrainConfig,
    model: Gpt<f32>,
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    prev_grads: Vec<Vec<f32>>,
    ema: Option<Vec<Vec<f32>>>,
    parts: Vec<Part>,
    schedule: Schedule,
    zclip: Option<ZClip>,
    guard: Option<LossGuard<f32>>,
    scaler: Option<DynamicLossScaler>,
    step: u64,
    skipped: u64,
}

/// Bytes a [`Trainer`] of `config` holds at its peak, roughly. Held all
/// along: parameters, gradients (this step's, the last step's, and the
/// micro-batch sum when accumulating), the EMA copy, every optimizer's state
/// (Shampoo's and SOAP's factors included), the loss guard's snapshot of
/// parameters and state, and the activations of one micro-batch. On top, at
/// a checkpoint: the optimizer's state dict (a copy of its state, while
/// saving; on resume the state dict read from the file is moved into the
/// optimizer, and the files are written and read one tensor at a time).
/// Also counted: the batches of an evaluation, held at once.
/// Scratch inside a step (e.g. Shampoo's eigendecompositions) is not counted.
fn memory_needed(config: &TrainConfig, model: &Gpt<f32>) -> u128 {
    let f32_bytes = std::mem::size_of::<f32>();
    let param_bytes = model.num_params() as u128 * f32_bytes as u128;
    let specs = model.param_specs();
    let state: u128 = specs
        .iter()
        .map(|s| {
            let kind = match &config.matrix_optimizer {
                Some(m) if is_hidden_matrix(s) => &m.kind,
                _ => &config.optimizer.kind,
            };
            state_bytes(kind, s, f32_bytes)
        })
        .fold(0, u128::saturating_add);
    let ema = u128::from(config.ema_decay.is_some());
    let copies = 3 + ema + u128::from(config.grad_accum > 1);
    let snapshot = if config.guard.is_some() {
        param_bytes.saturating_add(state)
    } else {
        0
    };
    let checkpoint = state;
    // An evaluation holds all its batches' tokens and targets (u32).
    let eval_batches = (config.eval_batches as u128)
        .saturating_mul(config.batch as u128)
        .saturating_mul(config.model.block_size as u128)
        .saturating_mul(8);
    [
        copies * param_bytes,
        state,
        snapshot,
        checkpoint,
        model.activation_bytes(config.batch, config.model.block_size),
        eval_batches,
    ]
    .into_iter()
    .fold(0, u128::saturating_add)
}

impl Trainer {
    /// A fresh run of `config` on `data` (its vocabulary sets the model's).
    ///
    /// Fails with [`KeelError::Memory`] when the run would need more memory
    /// than the machine has available (see [`crate::memory`]), and on an
    /// outlier batch at or past the last step, which would never be injected.
    pub fn new(config: TrainConfig, data: &Dataset) -> Result<Self> {
        refuse_outliers_past("outliers", &config.outliers, config.steps)?;
        Self::build(config, data)
    }

    /// [`Trainer::new`] without the outlier check: a resumed run's outliers
    /// are checked against the steps it had when it started, and its step
    /// count may still be raised ([`Trainer::set_steps`]).
    fn build(mut config: TrainConfig, data: &Dataset) -> Result<Self> {
        config.model.vocab_size = data.vocab().len();
        config.validate()?;
        // Found now, not after the steps at the first evaluation.
        let t = config.model.block_size;
        data.check_window(t).map_err(|e| match e {
            KeelError::Data(m) => KeelError::config(
                "model.block_size",
                format!("{t} does not fit the data: {m}"),
            ),
            other => other,
        })?;
        let model = Gpt::<f32>::new(config.model.clone())?;
        crate::memory::ensure_fits(
            "this training run (parameters, gradients, optimizer state and activations)",
            memory_needed(&config, &model),
        )?;
        let specs = model.param_specs().to_vec();
        let params = model.init_params(config.seed);
        let groups = param_groups(&config, &specs);
        let mut parts = Vec::new();
        let split: Vec<bool> = specs
            .iter()
            .map(|s| config.matrix_optimizer.is_some() && is_hidden_matrix(s))
            .collect();
        for (opt_config, matrix) in std::iter::once((&config.optimizer, false))
            .chain(config.matrix_optimizer.as_ref().map(|m| (m, true)))
        {
            let tensors: Vec<usize> = (0..specs.len()).filter(|&i| split[i] == matrix).collect();
            if tensors.is_empty() {
                continue;
            }
            let part_specs: Vec<ParamSpec> = tensors.iter().map(|&i| specs[i].clone()).collect();
            let part_groups: Vec<ParamGroup> = groups
                .iter()
                .filter_map(|g| {
                    let mut g = g.clone();
                    g.params.retain(|n| part_specs.iter().any(|s| &s.name == n));
                    (!g.params.is_empty()).then_some(g)
                })
                .collect();
            let opt = CpuOptimizer::with_groups(opt_config.clone(), part_specs, part_groups)?;
            parts.push(Part {
                peak_lr: opt_config.lr(),
                opt,
                tensors,
            });
        }
        Ok(Trainer {
            schedule: config.unit_schedule(),
            zclip: config.zclip.map(ZClip::new).transpose()?,
            guard: config.guard.map(LossGuard::new).transpose()?,
            scaler: config.loss_scaler.map(DynamicLossScaler::new).transpose()?,
            grads: model.zeros_like_params(),
            prev_grads: model.zeros_like_params(),
            ema: config.ema_decay.map(|_| params.clone()),
            params,
            model,
            parts,
            config,
            step: 0,
            skipped: 0,
        })
    }

    /// The configuration (with the data's vocabulary size).
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The current parameters, in [`Gpt::param_specs`] order.
    pub fn params(&self) -> &[Vec<f32>] {
        &self.params
    }

    /// The model.
    pub fn model(&self) -> &Gpt<f32> {
        &self.model
    }

    /// Steps done so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Writes the parameter names, in the order of the per-tensor arrays of
    /// a [`StepRecord`] (`tensor_grad_norm`, `update_ratio`, ...), to `path`
    /// as a JSON array: the key to a run's `metrics.jsonl`.
    pub fn write_tensor_names(&self, path: &Path) -> Result<()> {
        let names: Vec<String> = self
            .model
            .param_specs()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let text = serde_json::to_string(&names).map_err(|e| KeelError::Data(e.to_string()))?;
        fs::write(path, text + "\n")
            .map_err(|e| KeelError::Data(format!("cannot write `{}`: {e}", path.display())))
    }

    /// Names of the layer rows of [`RunSummary::layer_update_ratio`]:
    /// `embed`, `h0`..`h{L-1}`, then `head` (final LayerNorm) if present.
    pub fn layer_names(&self) -> Vec<String> {
        let mut names = vec!["embed".to_string()];
        names.extend((0..self.config.model.n_layer).map(|l| format!("h{l}")));
        if self.config.model.norm == Norm::Pre {
            names.push("head".into());
        }
        names
    }

    fn layer_row(&self, name: &str) -> usize {
        match layer_of(name) {
            Some(l) => l + 1,
            None if name.contains(".wte.") || name.contains(".wpe.") => 0,
            None => self.config.model.n_layer + 1,
        }
    }

    /// The batch of step `step`: a function of the seed and the step alone,
    /// so a resumed run draws exactly the batches of a straight one.
    fn batch(
        &self,
        data: &Dataset,
        step: u64,
        micro: usize,
    ) -> Result<(Batch, Option<OutlierKind>)> {
        // Hash (seed, step, micro) into the generator's start: nearby raw
        // starts would make consecutive steps' streams overlap (splitmix64
        // advances its state by a constant), repeating windows across steps.
        let key =
            self.config.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((micro as u64) << 48);
        let mut rng = SplitMix64::new(SplitMix64::new(key).next_u64());
        let (b, t) = (self.config.batch, self.config.model.block_size);
        let mut batch = data.train_batch(&mut rng, b, t)?;
        let outlier = self
            .config
            .outliers
            .iter()
            .find(|o| o.step == step)
            .map(|o| o.kind);
        let v = self.config.model.vocab_size as u64;
        match outlier {
            Some(OutlierKind::RepeatedChar) => {
                let id = rng.below(v) as u32;
                batch.tokens.fill(id);
                batch.targets.fill(id);
            }
            Some(OutlierKind::RandomChars) => {
                for x in batch.tokens.iter_mut().chain(batch.targets.iter_mut()) {
                    *x = rng.below(v) as u32;
                }
            }
            _ => {}
        }
        Ok((batch, outlier))
    }

    /// Mean validation loss over the fixed validation batches (on the EMA
    /// parameters when there is one).
    pub fn evaluate(&mut self, data: &Dataset) -> Result<f64> {
        let (b, t) = (self.config.batch, self.config.model.block_size);
        let batches = data.val_batches(self.config.eval_batches, b, t)?;
        let params = self.ema.as_ref().unwrap_or(&self.params);
        let mut sum = 0.0;
        for batch in &batches {
            let s = self
                .model
                .forward(params, &batch.tokens, Some(&batch.targets), b, t)?;
            sum += s.cross_entropy;
        }
        Ok(sum / batches.len() as f64)
    }

    /// Runs one step and returns its record.
    pub fn train_step(&mut self, data: &Dataset) -> Result<StepRecord> {
        let step = self.step;
        let (b, t) = (self.config.batch, self.config.model.block_size);
        let accum = self.config.grad_accum;
        let mut loss = 0.0;
        let mut mean_log_z = 0.0;
        let mut max_attn: Vec<f64> = Vec::new();
        let mut outlier = None;
        let mut micro_grads = (accum > 1).then(|| self.model.zeros_like_params());
        for micro in 0..accum {
            let (batch, o) = self.batch(data, step, micro)?;
            outlier = outlier.or(o);
            let s = self.model.forward_backward(
                &self.params,
                &mut self.grads,
                &batch.tokens,
                &batch.targets,
                b,
                t,
            )?;
            loss += s.loss / accum as f64;
            mean_log_z += s.mean_log_z / accum as f64;
            if max_attn.is_empty() {
                max_attn = s.max_attn_logit.clone();
            }
            for (m, x) in max_attn.iter_mut().zip(&s.max_attn_logit) {
                *m = m.max(*x);
            }
            if let Some(acc) = micro_grads.as_mut() {
                let w = 1.0 / accum as f32;
                for (a, g) in acc.iter_mut().zip(&self.grads) {
                    a.iter_mut().zip(g).for_each(|(a, g)| *a += w * g);
                }
            }
        }
        if let Some(acc) = micro_grads {
            self.grads = acc;
        }
        if outlier == Some(OutlierKind::GradX100) {
            self.grads.iter_mut().flatten().for_each(|g| *g *= 100.0);
        }
        let mut skipped = false;
        if self.config.fp16_grads {
            skipped |= !self.round_grads_f16();
        }

        let mut rolled_back = false;
        let mut guard_factor = 1.0;
        if let Some(guard) = self.guard.as_mut() {
            use crate::guard::Decision;
            match guard.observe(step, loss) {
                Decision::Step => guard_factor = guard.lr_factor(),
                Decision::Skip => skipped = true,
                Decision::Rollback => {
                    guard.restore(&mut self.params, &mut self.parts[0].opt)?;
                    rolled_back = true;
                    skipped = true;
                }
            }
        } else if !loss.is_finite() {
            skipped = true;
        }

        let grad_norm = {
            let g: Vec<&[f32]> = self.grads.iter().map(|g| &g[..]).collect();
            crate::guard::global_norm(&g)
        };
        let grad_cos: Vec<f64> = self
            .grads
            .iter()
            .zip(&self.prev_grads)
            .map(|(g, p)| cosine(g, p))
            .collect();
        let lr_factor = self.schedule.lr_at(step) * guard_factor;
        let n = self.params.len();
        let mut tensor_stats = vec![None; n];
        if !skipped {
            if let Some(z) = self.zclip.as_mut() {
                let mut g: Vec<&mut [f32]> = self.grads.iter_mut().map(|g| &mut g[..]).collect();
                z.clip(&mut g);
            }
            let mut taken = 0;
            for part in &mut self.parts {
                part.opt.set_lr(part.peak_lr * lr_factor)?;
                let mut p: Vec<&mut [f32]> = Vec::with_capacity(part.tensors.len());
                let mut rest: &mut [Vec<f32>] = &mut self.params;
                let mut offset = 0;
                for &i in &part.tensors {
                    let (_, tail) = rest.split_at_mut(i - offset);
                    let (head, tail) = tail.split_at_mut(1);
                    p.push(&mut head[0][..]);
                    rest = tail;
                    offset = i + 1;
                }
                let g: Vec<&[f32]> = part.tensors.iter().map(|&i| &self.grads[i][..]).collect();
                let stats: StepStats = part.opt.step(&mut p, &g)?;
                if stats.skipped.is_none() {
                    taken += 1;
                }
                for (&i, ts) in part.tensors.iter().zip(&stats.tensors) {
                    tensor_stats[i] = Some(*ts);
                }
            }
            skipped = taken == 0;
            if let Some(guard) = self.guard.as_mut() {
                if !skipped {
                    guard.after_step(&self.params, &self.parts[0].opt)?;
                }
            }
            if let (Some(ema), Some(d), false) = (self.ema.as_mut(), self.config.ema_decay, skipped)
            {
                let d = d as f32;
                for (e, p) in ema.iter_mut().zip(&self.params) {
                    e.iter_mut()
                        .zip(p)
                        .for_each(|(e, p)| *e = d * *e + (1.0 - d) * p);
                }
            }
        }
        if skipped {
            self.skipped += 1;
        }
        std::mem::swap(&mut self.prev_grads, &mut self.grads);
        self.step += 1;
        let val_loss =
            if self.config.eval_every > 0 && self.step.is_multiple_of(self.config.eval_every) {
                Some(self.evaluate(data)?)
            } else {
                None
            };
        Ok(StepRecord {
            step,
            loss,
            lr_factor,
            grad_norm,
            tensor_grad_norm: tensor_stats
                .iter()
                .zip(&grad_cos)
                .map(|(s, _)| s.map_or(f64::NAN, |s| s.grad_norm))
                .collect(),
            update_ratio: tensor_stats
                .iter()
                .map(|s| s.map_or(0.0, |s| s.update_ratio()))
                .collect(),
            trust_ratio: tensor_stats
                .iter()
                .map(|s| s.and_then(|s| s.trust_ratio))
                .collect(),
            grad_cos,
            max_attn_logit: max_attn,
            mean_log_z,
            skipped,
            rolled_back,
            outlier,
            val_loss,
        })
    }

    /// Rounds every gradient to f16, with dynamic loss scaling around it
    /// when configured; returns false when the step must be skipped (a
    /// non-finite gradient after scaling).
    fn round_grads_f16(&mut self) -> bool {
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale()) as f32;
        for g in self.grads.iter_mut().flatten() {
            *g = half::f16::from_f32(*g * scale).to_f32();
        }
        match self.scaler.as_mut() {
            Some(scaler) => {
                let mut g: Vec<&mut [f32]> = self.grads.iter_mut().map(|g| &mut g[..]).collect();
                let overflow = scaler.unscale(&mut g);
                scaler.update(overflow);
                !overflow
            }
            None => true,
        }
    }

    /// Trains to `config.steps`, writing one JSON line per step to
    /// `metrics` when given, calling `progress` after each step; stops
    /// early when the loss is no longer finite for 10 steps in a row.
    pub fn run(
        &mut self,
        data: &Dataset,
        metrics: Option<&Path>,
        mut progress: impl FnMut(&StepRecord),
    ) -> Result<RunSummary> {
        let mut out = match metrics {
            Some(path) => Some(BufWriter::new(fs::File::create(path).map_err(|e| {
                KeelError::Data(format!("cannot create `{}`: {e}", path.display()))
            })?)),
            None => None,
        };
        let names = self.layer_names();
        let rows: Vec<usize> = self
            .model
            .param_specs()
            .iter()
            .map(|s| self.layer_row(&s.name))
            .collect();
        let mut summary = RunSummary {
            losses: Vec::new(),
            val_losses: Vec::new(),
            final_val_loss: f64::NAN,
            non_finite: false,
            layer_update_ratio: Vec::new(),
            skipped: 0,
            rollbacks: 0,
            param_count: self.model.num_params(),
        };
        let mut bad_run = 0;
        while self.step < self.config.steps {
            let rec = self.train_step(data)?;
            // Per layer: sqrt(sum ||Δw||^2) / sqrt(sum ||w||^2), from the
            // per-tensor ratios and the current parameter norms.
            let mut upd = vec![0.0; names.len()];
            let mut par = vec![0.0; names.len()];
            for (i, p) in self.params.iter().enumerate() {
                let pn: f64 = p.iter().map(|&x| (x as f64) * (x as f64)).sum();
                let r = rec.update_ratio[i];
                upd[rows[i]] += if r.is_finite() { r * r * pn } else { 0.0 };
                par[rows[i]] += pn;
            }
            summary.layer_update_ratio.push(
                upd.iter()
                    .zip(&par)
                    .map(|(u, p)| if *p > 0.0 { (u / p).sqrt() } else { 0.0 })
                    .collect(),
            );
            summary.losses.push(rec.loss);
            summary.rollbacks += rec.rolled_back as u64;
            summary.skipped += rec.skipped as u64;
            if let Some(v) = rec.val_loss {
                summary.val_losses.push((rec.step + 1, v));
            }
            if let Some(w) = out.as_mut() {
                serde_json::to_writer(&mut *w, &rec)
                    .map_err(|e| KeelError::Data(format!("metrics: {e}")))?;
                w.write_all(b"\n")
                    .map_err(|e| KeelError::Data(format!("metrics: {e}")))?;
            }
            progress(&rec);
            bad_run = if rec.loss.is_finite() { 0 } else { bad_run + 1 };
            if bad_run >= 10 {
                summary.non_finite = true;
                break;
            }
        }
        if let Some(mut w) = out {
            w.flush()
                .map_err(|e| KeelError::Data(format!("metrics: {e}")))?;
        }
        summary.final_val_loss = if summary.non_finite {
            f64::NAN
        } else {
            self.evaluate(data)?
        };
        summary.non_finite |= !summary.final_val_loss.is_finite();
        if summary.val_losses.last().map(|v| v.0) != Some(self.step) {
            summary.val_losses.push((self.step, summary.final_val_loss));
        }
        Ok(summary)
    }

    /// Writes a checkpoint into the folder `dir`: `model.safetensors`
    /// (parameters, EMA, step, config, vocabulary, and the statistics of
    /// ZClip and the loss scaler; not the loss guard's snapshot) and one
    /// `optimizer{k}.safetensors` per optimizer, each written atomically;
    /// the model file goes last, so it only names a complete checkpoint. The
    /// model file holds a CRC-32 of every tensor and of its metadata, and the
    /// checksum of every optimizer file it goes with.
    pub fn save(&self, dir: &Path, data: &Dataset) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| checkpoint_err(dir, e.to_string()))?;
        for (k, part) in self.parts.iter().enumerate() {
            part.opt
                .save_state(&dir.join(format!("optimizer{k}.safetensors")))?;
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "keel-gpt-checkpoint".to_string());
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("skipped".to_string(), self.skipped.to_string());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&self.config).map_err(|e| checkpoint_err(dir, e.to_string()))?,
        );
        meta.insert("vocab".to_string(), data.vocab().chars().iter().collect());
        // The guards' statistics, so a resumed run clips and scales as the
        // uninterrupted one (the loss guard's snapshot is not kept).
        let guards = SavedGuards {
            zclip: self.zclip.clone(),
            loss_scaler: self.scaler.clone(),
        };
        meta.insert(
            "guards".to_string(),
            serde_json::to_string(&guards).map_err(|e| checkpoint_err(dir, e.to_string()))?,
        );
        // Each optimizer file's own checksum: the model file names exactly
        // the files it goes with (step counts can repeat after a rollback).
        let optimizer_crcs = (0..self.parts.len())
            .map(|k| stored_checksum(&dir.join(format!("optimizer{k}.safetensors"))))
            .collect::<Result<Vec<String>>>()?;
        meta.insert(
            "optimizer_crc32".to_string(),
            serde_json::to_string(&optimizer_crcs)
                .map_err(|e| checkpoint_err(dir, e.to_string()))?,
        );
        let specs = self.model.param_specs();
        // Written tensor by tensor: no copy of the model is held in memory.
        let mut views: Vec<(String, LeBytesView)> = Vec::new();
        for (s, p) in specs.iter().zip(&self.params) {
            views.push((s.name.clone(), LeBytesView::f32(p, &s.shape)));
        }
        if let Some(ema) = &self.ema {
            for (s, p) in specs.iter().zip(ema) {
                views.push((format!("ema.{}", s.name), LeBytesView::f32(p, &s.shape)));
            }
        }
        // The gradient of the last step feeds the next step's cosine metric.
        for (s, p) in specs.iter().zip(&self.prev_grads) {
            views.push((
                format!("prev_grad.{}", s.name),
                LeBytesView::f32(p, &s.shape),
            ));
        }
        let tensor_crcs: BTreeMap<&str, String> = views
            .iter()
            .map(|(name, view)| (name.as_str(), tensor_checksum(name, view.values)))
            .collect();
        meta.insert(
            "tensor_crc32".to_string(),
            serde_json::to_string(&tensor_crcs).map_err(|e| checkpoint_err(dir, e.to_string()))?,
        );
        meta.insert("crc32".to_string(), metadata_checksum(&meta));
        crate::checkpoint::serialize_atomic(&dir.join("model.safetensors"), views, meta)
    }

    /// Restores a run saved by [`Trainer::save`]: the config comes from the
    /// checkpoint (`steps` may be raised by the caller afterwards with
    /// [`Trainer::set_steps`]).
    pub fn load(dir: &Path, data: &Dataset) -> Result<Self> {
        let mut ckpt = ModelCheckpoint::read(dir)?;
        if ckpt.vocab != data.vocab().chars().iter().collect::<String>() {
            return Err(KeelError::config(
                "data",
                "the data's vocabulary differs from the checkpoint's",
            ));
        }
        let mut trainer = Trainer::build(ckpt.config.clone(), data)?;
        trainer.params = ckpt.tensors(&trainer.model.param_specs(), "")?;
        if trainer.ema.is_some() {
            trainer.ema = Some(ckpt.tensors(&trainer.model.param_specs(), "ema.")?);
        }
        trainer.prev_grads = ckpt.tensors(&trainer.model.param_specs(), "prev_grad.")?;
        let parts = trainer.parts.len();
        for (k, part) in trainer.parts.iter_mut().enumerate() {
            let path = dir.join(format!("optimizer{k}.safetensors"));
            // A crash between writing the optimizer files and the model file
            // leaves files of two checkpoints side by side.
            if let Some(crcs) = &ckpt.optimizer_crcs {
                let got = stored_checksum(&path)?;
                if crcs.len() != parts || crcs[k] != got {
                    return Err(checkpoint_err(
                        &path,
                        format!(
                            "is not the optimizer file {} was saved with (checksum {got}, \
                             expected {}): the files come from different checkpoints",
                            ckpt.path.display(),
                            crcs.get(k).map_or("none", |c| c.as_str())
                        ),
                    ));
                }
            }
            part.opt.load_state(&path)?;
        }
        trainer.step = ckpt.step;
        trainer.skipped = ckpt.skipped;
        // Checkpoints written before the guards were saved restart them.
        if let Some(saved) = ckpt.guards {
            if trainer.zclip.is_some() {
                trainer.zclip = saved.zclip;
            }
            if trainer.scaler.is_some() {
                trainer.scaler = saved.loss_scaler;
            }
        }
        Ok(trainer)
    }

    /// Changes the total step count (the schedule follows); on an error
    /// nothing changes.
    pub fn set_steps(&mut self, steps: u64) -> Result<()> {
        let mut config = self.config.clone();
        config.steps = steps;
        config.validate()?;
        self.config = config;
        self.schedule = self.config.unit_schedule();
        Ok(())
    }
}

/// The guard statistics a checkpoint keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedGuards {
    zclip: Option<ZClip>,
    loss_scaler: Option<DynamicLossScaler>,
}

/// Refuses an outlier of `outliers` (the field `field`) at or past step
/// `steps`: the run would end before injecting it.
fn refuse_outliers_past(field: &str, outliers: &[Outlier], steps: u64) -> Result<()> {
    match outliers.iter().position(|o| o.step >= steps) {
        None => Ok(()),
        Some(i) => Err(KeelError::config(
            format!("{field}[{i}].step"),
            format!(
                "{} is past the last step (the run's steps are 0..{steps})",
                outliers[i].step
            ),
        )),
    }
}

/// The model part of a checkpoint folder: parameters and what `keel sample`
/// needs to decode.
pub struct ModelCheckpoint {
    /// The run's config.
    pub config: TrainConfig,
    /// The vocabulary's characters, in id order.
    pub vocab: String,
    /// Steps done.
    pub step: u64,
    skipped: u64,
    path: PathBuf,
    /// Each tensor's CRC-32 (files written before checksums: none).
    tensor_crcs: Option<BTreeMap<String, String>>,
    /// The checksums of the optimizer files that go with this one.
    optimizer_crcs: Option<Vec<String>>,
    /// ZClip's and the loss scaler's statistics (older files: none).
    guards: Option<SavedGuards>,
    /// The file, open: the tensors come from the file the metadata came
    /// from, even if a run saves a new checkpoint over it meanwhile.
    reader: TensorReader<fs::File>,
}

impl ModelCheckpoint {
    /// Reads `dir/model.safetensors`; errors name the file.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model.safetensors");
        let file = fs::File::open(&path)
            .map_err(|e| checkpoint_err(&path, format!("cannot read: {e}")))?;
        let reader = TensorReader::new(file, &path)?;
        let meta = reader.metadata().cloned().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| checkpoint_err(&path, format!("metadata has no `{k}`")))
        };
        if get("format")? != "keel-gpt-checkpoint" {
            return Err(checkpoint_err(&path, "not a keel GPT checkpoint"));
        }
        let parse = |k: &str| -> Result<u64> {
            get(k)?
                .parse()
                .map_err(|_| checkpoint_err(&path, format!("bad `{k}`")))
        };
        // Files written before checksums have none of these keys; a file
        // with some of them is damaged; one with all must match them.
        const CHECKED: [&str; 3] = ["crc32", "tensor_crc32", "optimizer_crc32"];
        let present = CHECKED.iter().filter(|k| meta.contains_key(**k)).count();
        if present != 0 && present != CHECKED.len() {
            return Err(checkpoint_err(
                &path,
                "its checksums are incomplete: the file is corrupted",
            ));
        }
        let (tensor_crcs, optimizer_crcs) = match meta.get("crc32") {
            None => (None, None),
            Some(want) => {
                let got = metadata_checksum(&meta);
                if *want != got {
                    return Err(checkpoint_err(
                        &path,
                        format!(
                            "metadata checksum mismatch (stored {want}, computed {got}): \
                             the file is corrupted"
                        ),
                    ));
                }
                let json = |k: &str| -> Result<serde_json::Value> {
                    serde_json::from_str(&get(k)?)
                        .map_err(|e| checkpoint_err(&path, format!("bad `{k}`: {e}")))
                };
                let crcs = serde_json::from_value(json("tensor_crc32")?)
                    .map_err(|e| checkpoint_err(&path, format!("bad `tensor_crc32`: {e}")))?;
                let optimizers = serde_json::from_value(json("optimizer_crc32")?)
                    .map_err(|e| checkpoint_err(&path, format!("bad `optimizer_crc32`: {e}")))?;
                (Some(crcs), Some(optimizers))
            }
        };
        let config: TrainConfig = serde_json::from_str(&get("config")?)
            .map_err(|e| checkpoint_err(&path, format!("config: {e}")))?;
        let vocab = get("vocab")?;
        // Token ids index the vocabulary when decoding.
        if vocab.chars().count() != config.model.vocab_size {
            return Err(checkpoint_err(
                &path,
                format!(
                    "its vocabulary has {} characters, its model {} tokens",
                    vocab.chars().count(),
                    config.model.vocab_size
                ),
            ));
        }
        let guards = match meta.get("guards") {
            None => None,
            Some(text) => {
                let saved: SavedGuards = serde_json::from_str(text)
                    .map_err(|e| checkpoint_err(&path, format!("bad `guards`: {e}")))?;
                // A guard the config has must come with its statistics.
                let missing = (config.zclip.is_some() && saved.zclip.is_none())
                    || (config.loss_scaler.is_some() && saved.loss_scaler.is_none());
                if missing {
                    return Err(checkpoint_err(
                        &path,
                        "`guards` lacks a guard of its config",
                    ));
                }
                Some(saved)
            }
        };
        Ok(ModelCheckpoint {
            guards,
            step: parse("step")?,
            skipped: parse("skipped")?,
            vocab,
            config,
            path,
            tensor_crcs,
            optimizer_crcs,
            reader,
        })
    }

    /// The tensors named `prefix + spec.name`, checked against `specs`, read
    /// from the file one at a time.
    pub fn tensors(&mut self, specs: &[ParamSpec], prefix: &str) -> Result<Vec<Vec<f32>>> {
        let reader = &mut self.reader;
        specs
            .iter()
            .map(|s| {
                let name = format!("{prefix}{}", s.name);
                match reader.info(&name) {
                    None => Err(checkpoint_err(&self.path, format!("no tensor `{name}`"))),
                    Some((safetensors::Dtype::F32, shape)) if shape == s.shape.as_slice() => {
                        let mut crc = crc32fast::Hasher::new();
                        let data = reader.read(&name, &mut crc)?;
                        if let Some(crcs) = &self.tensor_crcs {
                            let got = format!("{:08x}", crc.finalize());
                            if crcs.get(&name) != Some(&got) {
                                return Err(checkpoint_err(
                                    &self.path,
                                    format!(
                                        "checksum mismatch in `{name}` (stored {}, computed \
                                         {got}): the file is corrupted",
                                        crcs.get(&name).map_or("none", |c| c.as_str())
                                    ),
                                ));
                            }
                        }
                        match data {
                            StateData::F32(v) => Ok(v),
                            StateData::F64(_) => {
                                Err(checkpoint_err(&self.path, format!("`{name}` read as f64")))
                            }
                        }
                    }
                    Some(_) => Err(checkpoint_err(
                        &self.path,
                        format!("`{name}` is not f32 of shape {:?}", s.shape),
                    )),
                }
            })
            .collect()
    }
}

fn checkpoint_err(path: &Path, message: impl Into<String>) -> KeelError {
    KeelError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Cosine similarity of two vectors (0 when either is 0 or non-finite).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    let c = ab / (aa.sqrt() * bb.sqrt());
    if c.is_finite() {
        c
    } else {
        0.0
    }
}

/// Text generated from `params` after `prompt` ids: `n` characters sampled
/// at `temperature` (0: greedy) with `seed`. Returns the prompt's ids (`[0]`
/// for an empty prompt), then the sampled ones; [`sample_with`] streams
/// them instead. Errors on a parameter that is NaN or infinite (a diverged
/// run's checkpoint) and on a logit that overflows.
pub fn sample(
    model: &mut Gpt<f32>,
    params: &[Vec<f32>],
    prompt: &[u32],
    n: usize,
    temperature: f64,
    seed: u64,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    sample_with(model, params, prompt, n, temperature, seed, |id| {
        out.push(id);
        Ok(())
    })?;
    Ok(out)
}

/// [`sample`] that hands each id to `emit` as soon as it is known, holding
/// only the model's context window: any `n` runs in bounded memory, and an
/// error from `emit` (say, a closed pipe) stops it.
pub fn sample_with(
    model: &mut Gpt<f32>,
    params: &[Vec<f32>],
    prompt: &[u32],
    n: usize,
    temperature: f64,
    seed: u64,
    mut emit: impl FnMut(u32) -> Result<()>,
) -> Result<()> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(KeelError::config(
            "temperature",
            format!("must be finite and >= 0, got {temperature}"),
        ));
    }
    // A diverged run's checkpoint would sample one fixed token forever.
    for (spec, p) in model.param_specs().iter().zip(params) {
        if let Some(i) = p.iter().position(|x| !x.is_finite()) {
            return Err(KeelError::Data(format!(
                "parameter `{}` holds {} at element {i}: the checkpoint is of a run that \
                 diverged",
                spec.name, p[i]
            )));
        }
    }
    let (block, v) = (model.config().block_size, model.config().vocab_size);
    let mut ids = if prompt.is_empty() {
        vec![0]
    } else {
        prompt.to_vec()
    };
    for &id in &ids {
        emit(id)?;
    }
    let mut rng = SplitMix64::new(seed);
    for _ in 0..n {
        let ctx = &ids[ids.len().saturating_sub(block)..];
        let t = ctx.len();
        model.forward(params, ctx, None, 1, t)?;
        let logits = &model.logits()[(t - 1) * v..t * v];
        if let Some(l) = logits.iter().find(|l| !l.is_finite()) {
            return Err(KeelError::Data(format!(
                "a next-token logit is {l}: the parameters are too large for f32"
            )));
        }
        let next = if temperature == 0.0 {
            argmax(logits)
        } else {
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let w: Vec<f64> = logits
                .iter()
                .map(|&l| ((l as f64 - m) / temperature).exp())
                .collect();
            let mut u = rng.uniform() * w.iter().sum::<f64>();
            let mut pick = v - 1;
            for (i, wi) in w.iter().enumerate() {
                if u < *wi {
                    pick = i;
                    break;
                }
                u -= wi;
            }
            pick
        };
        ids.push(next as u32);
        emit(next as u32)?;
        // Only the last `block` ids are ever read again.
        if ids.len() >= 2 * block.max(1) {
            ids.drain(..ids.len() - block);
        }
    }
    Ok(())
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &v)| if v > a.1 { (i, v) } else { a },
        )
        .0
}
