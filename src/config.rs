//! Optimizer configuration: the vocabulary of the conformance cases, used as
//! the serde format everywhere (CLI, TOML/JSON files, checkpoints).
//!
//! A config is one flat map with a `kind` tag:
//!
//! ```
//! # use keel::OptimizerConfig;
//! let c: OptimizerConfig = serde_json::from_str(
//!     r#"{"kind": "lamb", "lr": 0.01, "weight_decay": 0.01, "clip_global_norm": 1.0}"#,
//! ).unwrap();
//! assert_eq!(c.kind.name(), "lamb");
//! assert_eq!(c.clip_global_norm, Some(1.0));
//! // Unknown keys and kinds are errors that name them.
//! let e = serde_json::from_str::<OptimizerConfig>(r#"{"kind": "adamw", "lr": 1, "betta1": 0.9}"#);
//! assert!(e.unwrap_err().to_string().contains("betta1"));
//! ```
//!
//! Keys shared by every kind: `clip_global_norm` (optax `clip_by_global_norm`
//! over all tensors, no epsilon), `clip_value` (elementwise clamp to `[-c, c]`
//! before everything else, as `torch.nn.utils.clip_grad_value_`), and
//! `on_nonfinite` (`"skip"`, the default, `"error"`, or `"unchecked"`). Unset keys take the
//! reference library's defaults; `lr` is always required.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{KeelError, Result};

/// What a step does when a gradient holds NaN or Inf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Skip the step: parameters and state stay bit-identical, the step count
    /// does not advance, and [`crate::StepStats::skipped`] names the tensors.
    #[default]
    Skip,
    /// Refuse the step with [`KeelError::NonFiniteGradient`] (nothing is written).
    Error,
    /// For callers that keep their gradients finite themselves (a loss
    /// scaler's unscale, a trainer that checks the norm): the step does not
    /// read the gradients an extra time to check them when nothing else needs
    /// that pass, which is the case for `sgd`, `adam`, `adamw` without
    /// `update_clip_rms`, and `lion`, without `clip_global_norm` or
    /// `clip_value`, on the CPU (see [`OptimizerConfig::skips_scan`]). There
    /// the fused pass takes the gradient norms as it goes: 28 instead of 32
    /// bytes per `adamw` parameter, as torch's fused step (which does no
    /// check). A non-finite gradient is then applied, so NaN reaches the
    /// parameters and state; the statistics report it
    /// ([`crate::TensorStats::finite`] false, with
    /// [`crate::StepStats::skipped`] `None`). In every other case the step
    /// checks anyway and skips as under [`NonFinitePolicy::Skip`].
    Unchecked,
}

/// A complete optimizer configuration: the kind with its hyperparameters, and
/// the gradient clipping and non-finite policy shared by every kind.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    /// The optimizer and its hyperparameters.
    pub kind: OptimizerKind,
    /// Clip the global L2 norm of all gradients to this value (`clip_global_norm`).
    pub clip_global_norm: Option<f64>,
    /// Clamp each gradient element to `[-c, c]` first (`clip_value`).
    pub clip_value: Option<f64>,
    /// What to do with non-finite gradients (`on_nonfinite`).
    pub on_nonfinite: NonFinitePolicy,
}

/// torch.optim.SGD: `g += wd*p`; `b = g` at the first step, else
/// `b = momentum*b + (1-dampening)*g`; `d = g + momentum*b` if nesterov else `b`;
/// `p -= lr*d`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 keeps no state).
    #[serde(default)]
    pub momentum: f64,
    /// Dampening of the momentum's gradient term.
    #[serde(default)]
    pub dampening: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Coupled L2 weight decay, added to the gradient.
    #[serde(default)]
    pub weight_decay: f64,
}

/// torch.optim.Adam with coupled L2 weight decay (`g += wd*p`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Coupled L2 weight decay.
    #[serde(default)]
    pub weight_decay: f64,
}

/// torch.optim.AdamW / optax.adamw (decoupled weight decay), with optional
/// Adafactor-style update clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay: `p -= lr*wd*p`.
    #[serde(default = "default_adamw_wd")]
    pub weight_decay: f64,
    /// Clip the Adam direction per tensor to this RMS before weight decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_clip_rms: Option<f64>,
}

/// optax.lamb: the AdamW direction plus weight decay, scaled per tensor by the
/// trust ratio `||p|| / ||u||`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LambConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Added to the bias-corrected root of the second moment.
    #[serde(default = "default_lamb_eps")]
    pub eps: f64,
    /// Weight decay added to the direction before the trust ratio.
    #[serde(default)]
    pub weight_decay: f64,
}

/// optax.lars: `u = g + wd*p` scaled by `tc*||p||/(||u||+eps)`, then the
/// learning rate, then (Nesterov) momentum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LarsConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum, applied after the learning rate as optax does.
    #[serde(default = "default_lars_momentum")]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Weight decay added to the gradient before the trust ratio.
    #[serde(default)]
    pub weight_decay: f64,
    /// Trust coefficient `tc`.
    #[serde(default = "default_trust_coefficient")]
    pub trust_coefficient: f64,
    /// Added to `||u||` in the trust ratio's denominator.
    #[serde(default)]
    pub eps: f64,
}

/// optax.lion: `p -= lr*(sign(b1*m + (1-b1)*g) + wd*p)`, `m = b2*m + (1-b2)*g`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LionConfig {
    /// Learning rate.
    pub lr: f64,
    /// Interpolation factor of the update direction.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Decay of the momentum.
    #[serde(default = "default_lion_beta2")]
    pub beta2: f64,
    /// Decoupled weight decay.
    #[serde(default = "default_lion_wd")]
    pub weight_decay: f64,
}

/// How Muon scales its orthogonalized update for the matrix shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustLr {
    /// `sqrt(max(1, rows/cols))` (Keller Jordan's original Muon).
    Original,
    /// `0.2 * sqrt(max(rows, cols))`, so the update RMS matches AdamW's.
    MatchRmsAdamw,
}

/// torch.optim.Muon, for 2-D parameters: momentum (optionally Nesterov),
/// then the update orthogonalized by `ns_steps` Newton–Schulz iterations,
/// scaled per [`AdjustLr`], with decoupled weight decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MuonConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor.
    #[serde(default = "default_muon_momentum")]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default = "yes")]
    pub nesterov: bool,
    /// Decoupled weight decay: `p *= 1 - lr*wd`.
    #[serde(default = "default_muon_wd")]
    pub weight_decay: f64,
    /// Floor of the Frobenius norm the update is divided by.
    #[serde(default = "default_muon_eps")]
    pub eps: f64,
    /// Newton–Schulz iterations.
    #[serde(default = "default_ns_steps")]
    pub ns_steps: u32,
    /// Newton–Schulz polynomial coefficients `[a, b, c]`.
    #[serde(default = "default_ns_coefficients")]
    pub ns_coefficients: [f64; 3],
    /// Shape-dependent scale of the update.
    #[serde(default = "default_adjust_lr")]
    pub adjust_lr: AdjustLr,
}

/// Shampoo's grafting: the per-block norm of this simpler optimizer's
/// direction is given to Shampoo's direction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Grafting {
    /// No grafting: Shampoo's own direction.
    #[default]
    None,
    /// Adagrad: `v += g^2`, direction `m_hat / (sqrt(v) + eps)`.
    Adagrad {
        /// Added to the root of the accumulator.
        #[serde(default = "default_graft_eps")]
        eps: f64,
    },
    /// Adam: `v = beta2*v + (1-beta2)*g^2`, direction
    /// `m_hat / (sqrt(v / (1-beta2^t)) + eps)`.
    Adam {
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Added to the bias-corrected root.
        #[serde(default = "default_graft_eps")]
        eps: f64,
    },
}

fn default_graft_eps() -> f64 {
    1e-10
}

/// facebookresearch/optimizers `DistributedShampoo` (single device,
/// root-inverse preconditioners from an f64 eigendecomposition, decoupled
/// weight decay); `tests/data/conformance/SHAMPOO.md` is the exact algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShampooConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay (0: no momentum).
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Factor decay (1: plain sums).
    #[serde(default = "default_shampoo_beta2")]
    pub beta2: f64,
    /// Added to each factor's diagonal before its inverse root.
    #[serde(default = "default_shampoo_epsilon")]
    pub epsilon: f64,
    /// Decoupled weight decay (not grafted).
    #[serde(default)]
    pub weight_decay: f64,
    /// Dims are merged up to and blocked at this size.
    #[serde(default = "default_max_preconditioner_dim")]
    pub max_preconditioner_dim: usize,
    /// Inverse roots are recomputed every this many steps.
    #[serde(default = "one_u64")]
    pub precondition_frequency: u64,
    /// First step that preconditions (-1: `precondition_frequency`).
    #[serde(default = "minus_one")]
    pub start_preconditioning_step: i64,
    /// Bias-correct the first moment and the factors.
    #[serde(default = "yes")]
    pub use_bias_correction: bool,
    /// Grafting.
    #[serde(default)]
    pub grafting: Grafting,
    /// Precision of the eigendecompositions behind the inverse roots.
    #[serde(default)]
    pub root_dtype: RootDtype,
}

/// Precision of Shampoo's eigendecompositions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootDtype {
    /// Always f64 (SHAMPOO.md; the conformance cases).
    #[default]
    F64,
    /// The factors' precision (f32 for f32 parameters), retried in f64 when
    /// it fails: DistributedShampoo's default with its float32 factors.
    /// About half the time of f64 on the CPU, with roots accurate to f32.
    /// The CUDA backend computes its roots in f64 either way.
    Factor,
}

impl ShampooConfig {
    /// The first preconditioning step `S`.
    pub fn start_step(&self) -> u64 {
        if self.start_preconditioning_step < 0 {
            self.precondition_frequency
        } else {
            self.start_preconditioning_step as u64
        }
    }

    /// Whether 1-based step `t` recomputes the inverse roots: at `S` and at
    /// every multiple of `precondition_frequency` after it.
    pub fn recomputes(&self, t: u64) -> bool {
        let s = self.start_step();
        t == s || (t > s && t.is_multiple_of(self.precondition_frequency))
    }
}

/// SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam run in the eigenbasis of
/// Shampoo's two factors. keel's definition (no external reference vectors
/// exist; `src/optim/soap.rs` states every step):
/// factors `L = sb*L + (1-sb) G G^T`, `R = sb*R + (1-sb) G^T G` every step;
/// at `start_preconditioning_step` and every `precondition_frequency` steps
/// after, the bases `Q_L, Q_R` become the factors' f64 eigenvectors (by
/// descending eigenvalue) and the first moment is rotated into them; AdamW
/// (keel's `adamw`, decoupled decay) runs on `Q_L^T G Q_R` and its direction
/// is rotated back. While no basis has been computed, SOAP is AdamW exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoapConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    #[serde(default = "default_soap_beta")]
    pub beta1: f64,
    /// Second-moment decay.
    #[serde(default = "default_soap_beta")]
    pub beta2: f64,
    /// Factor decay `sb` (default: `beta2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shampoo_beta: Option<f64>,
    /// Added to the root of the second moment.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay: `p *= 1 - lr*wd`.
    #[serde(default)]
    pub weight_decay: f64,
    /// Steps between eigenbasis recomputations.
    #[serde(default = "default_soap_frequency")]
    pub precondition_frequency: u64,
    /// First step that computes the eigenbasis (before it: plain AdamW).
    #[serde(default = "one_u64")]
    pub start_preconditioning_step: u64,
    /// A side longer than this keeps the identity basis (Adam on that side).
    #[serde(default = "default_soap_max_dim")]
    pub max_preconditioner_dim: usize,
    /// Rotate 1-D tensors too (default: plain AdamW for them, as the paper).
    #[serde(default)]
    pub precondition_1d: bool,
}

impl SoapConfig {
    /// The first step that computes the eigenbasis.
    pub fn start_step(&self) -> u64 {
        self.start_preconditioning_step
    }

    /// Whether 1-based step `t` recomputes the eigenbases: at the start step
    /// and every `precondition_frequency` steps after it.
    pub fn recomputes(&self, t: u64) -> bool {
        let s = self.start_step();
        t >= s && (t - s).is_multiple_of(self.precondition_frequency)
    }

    /// The factor decay.
    pub fn factor_beta(&self) -> f64 {
        self.shampoo_beta.unwrap_or(self.beta2)
    }
}

fn default_soap_beta() -> f64 {
    0.95
}
fn default_soap_frequency() -> u64 {
    10
}
fn default_soap_max_dim() -> usize {
    10_000
}

fn default_shampoo_beta2() -> f64 {
    1.0
}
fn default_shampoo_epsilon() -> f64 {
    1e-12
}
fn default_max_preconditioner_dim() -> usize {
    1024
}
fn one_u64() -> u64 {
    1
}
fn minus_one() -> i64 {
    -1
}

fn yes() -> bool {
    true
}
fn default_muon_momentum() -> f64 {
    0.95
}
fn default_muon_wd() -> f64 {
    0.1
}
fn default_muon_eps() -> f64 {
    1e-7
}
fn default_ns_steps() -> u32 {
    5
}
fn default_ns_coefficients() -> [f64; 3] {
    [3.4445, -4.775, 2.0315]
}
fn default_adjust_lr() -> AdjustLr {
    AdjustLr::Original
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_adamw_wd() -> f64 {
    0.01
}
fn default_lamb_eps() -> f64 {
    1e-6
}
fn default_lars_momentum() -> f64 {
    0.9
}
fn default_trust_coefficient() -> f64 {
    0.001
}
fn default_lion_beta2() -> f64 {
    0.99
}
fn default_lion_wd() -> f64 {
    1e-3
}

/// The optimizer kind and its own hyperparameters (the `kind` tag selects it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    /// `sgd`.
    Sgd(SgdConfig),
    /// `adam`.
    Adam(AdamConfig),
    /// `adamw`.
    AdamW(AdamWConfig),
    /// `lamb`.
    Lamb(LambConfig),
    /// `lars`.
    Lars(LarsConfig),
    /// `lion`.
    Lion(LionConfig),
    /// `muon` (2-D parameters only).
    Muon(MuonConfig),
    /// `shampoo`.
    Shampoo(ShampooConfig),
    /// `soap`.
    Soap(SoapConfig),
}

/// Every `kind` this build implements.
pub const KINDS: [&str; 9] = [
    "sgd", "adam", "adamw", "lamb", "lars", "lion", "muon", "shampoo", "soap",
];

impl OptimizerKind {
    /// The `kind` tag.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerKind::Sgd(_) => "sgd",
            OptimizerKind::Adam(_) => "adam",
            OptimizerKind::AdamW(_) => "adamw",
            OptimizerKind::Lamb(_) => "lamb",
            OptimizerKind::Lars(_) => "lars",
            OptimizerKind::Lion(_) => "lion",
            OptimizerKind::Muon(_) => "muon",
            OptimizerKind::Shampoo(_) => "shampoo",
            OptimizerKind::Soap(_) => "soap",
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerKind::Sgd(c) => c.lr,
            OptimizerKind::Adam(c) => c.lr,
            OptimizerKind::AdamW(c) => c.lr,
            OptimizerKind::Lamb(c) => c.lr,
            OptimizerKind::Lars(c) => c.lr,
            OptimizerKind::Lion(c) => c.lr,
            OptimizerKind::Muon(c) => c.lr,
            OptimizerKind::Shampoo(c) => c.lr,
            OptimizerKind::Soap(c) => c.lr,
        }
    }

    fn lr_mut(&mut self) -> &mut f64 {
        match self {
            OptimizerKind::Sgd(c) => &mut c.lr,
            OptimizerKind::Adam(c) => &mut c.lr,
            OptimizerKind::AdamW(c) => &mut c.lr,
            OptimizerKind::Lamb(c) => &mut c.lr,
            OptimizerKind::Lars(c) => &mut c.lr,
            OptimizerKind::Lion(c) => &mut c.lr,
            OptimizerKind::Muon(c) => &mut c.lr,
            OptimizerKind::Shampoo(c) => &mut c.lr,
            OptimizerKind::Soap(c) => &mut c.lr,
        }
    }

    /// The weight decay hyperparameter (coupled or decoupled, per kind).
    pub fn weight_decay(&self) -> f64 {
        match self {
            OptimizerKind::Sgd(c) => c.weight_decay,
            OptimizerKind::Adam(c) => c.weight_decay,
            OptimizerKind::AdamW(c) => c.weight_decay,
            OptimizerKind::Lamb(c) => c.weight_decay,
            OptimizerKind::Lars(c) => c.weight_decay,
            OptimizerKind::Lion(c) => c.weight_decay,
            OptimizerKind::Muon(c) => c.weight_decay,
            OptimizerKind::Shampoo(c) => c.weight_decay,
            OptimizerKind::Soap(c) => c.weight_decay,
        }
    }
}

impl OptimizerConfig {
    /// A config of `kind` with no clipping and the default (skip) policy.
    pub fn new(kind: OptimizerKind) -> Self {
        OptimizerConfig {
            kind,
            clip_global_norm: None,
            clip_value: None,
            on_nonfinite: NonFinitePolicy::Skip,
        }
    }

    /// Parses a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| KeelError::config("optimizer", e.to_string()))
    }

    /// Parses a config from TOML text (the same flat keys).
    pub fn from_toml(text: &str) -> Result<Self> {
        refuse_non_finite_toml(text, "")?;
        toml::from_str(text).map_err(|e| KeelError::config("optimizer", e.to_string()))
    }

    /// Whether a CPU step under this config skips the scan of the gradients:
    /// [`NonFinitePolicy::Unchecked`] where nothing but the check needs it.
    pub fn skips_scan(&self) -> bool {
        let single_pass = match &self.kind {
            OptimizerKind::Sgd(_) | OptimizerKind::Adam(_) | OptimizerKind::Lion(_) => true,
            OptimizerKind::AdamW(c) => c.update_clip_rms.is_none(),
            _ => false,
        };
        self.on_nonfinite == NonFinitePolicy::Unchecked
            && single_pass
            && self.clip_global_norm.is_none()
            && self.clip_value.is_none()
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        self.kind.lr()
    }

    /// Sets the base learning rate after checking it.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(self.kind.name(), lr)?;
        *self.kind.lr_mut() = lr;
        Ok(())
    }

    /// Checks every value; the error names the first invalid field.
    pub fn validate(&self) -> Result<()> {
        let k = self.kind.name();
        check_lr(k, self.lr())?;
        let f = |field: &str| format!("{k}.{field}");
        let adam_like = |beta1, beta2, eps, weight_decay| -> Result<()> {
            unit_interval(&f("beta1"), beta1)?;
            unit_interval(&f("beta2"), beta2)?;
            divisor_eps(&f("eps"), eps)?;
            non_negative(&f("weight_decay"), weight_decay)
        };
        match &self.kind {
            OptimizerKind::Sgd(c) => {
                unit_interval(&f("momentum"), c.momentum)?;
                closed_unit(&f("dampening"), c.dampening)?;
                non_negative(&f("weight_decay"), c.weight_decay)?;
                if c.nesterov && (c.momentum <= 0.0 || c.dampening != 0.0) {
                    return Err(KeelError::config(
                        f("nesterov"),
                        "Nesterov momentum needs momentum > 0 and dampening = 0",
                    ));
                }
            }
            OptimizerKind::Adam(c) => adam_like(c.beta1, c.beta2, c.eps, c.weight_decay)?,
            OptimizerKind::AdamW(c) => {
                adam_like(c.beta1, c.beta2, c.eps, c.weight_decay)?;
                if let Some(d) = c.update_clip_rms {
                    positive(&f("update_clip_rms"), d)?;
                }
            }
            OptimizerKind::Lamb(c) => adam_like(c.beta1, c.beta2, c.eps, c.weight_decay)?,
            OptimizerKind::Lars(c) => {
                unit_interval(&f("momentum"), c.momentum)?;
                non_negative(&f("weight_decay"), c.weight_decay)?;
                positive(&f("trust_coefficient"), c.trust_coefficient)?;
                non_negative(&f("eps"), c.eps)?;
            }
            OptimizerKind::Lion(c) => {
                unit_interval(&f("beta1"), c.beta1)?;
                unit_interval(&f("beta2"), c.beta2)?;
                non_negative(&f("weight_decay"), c.weight_decay)?;
            }
            OptimizerKind::Muon(c) => {
                unit_interval(&f("momentum"), c.momentum)?;
                non_negative(&f("weight_decay"), c.weight_decay)?;
                divisor_eps(&f("eps"), c.eps)?;
                require(
                    &f("ns_steps"),
                    c.ns_steps as f64,
                    (1..=100).contains(&c.ns_steps),
                    "in 1..=100",
                )?;
                for (i, x) in c.ns_coefficients.iter().enumerate() {
                    require(
                        &format!("{k}.ns_coefficients[{i}]"),
                        *x,
                        x.is_finite(),
                        "finite",
                    )?;
                }
                if let Some((sigma, out)) = ns_divergence(c.ns_coefficients, c.ns_steps) {
                    return Err(KeelError::config(
                        f("ns_coefficients"),
                        format!(
                            "{:?} do not orthogonalize: {} Newton–Schulz steps take the \
                             singular value {sigma} of the normalized momentum to {out:e} \
                             (they should end near 1; a sign typo?)",
                            c.ns_coefficients, c.ns_steps
                        ),
                    ));
                }
            }
            OptimizerKind::Shampoo(c) => {
                unit_interval(&f("beta1"), c.beta1)?;
                require(
                    &f("beta2"),
                    c.beta2,
                    c.beta2 > 0.0 && c.beta2 <= 1.0,
                    "in (0, 1]",
                )?;
                positive(&f("epsilon"), c.epsilon)?;
                non_negative(&f("weight_decay"), c.weight_decay)?;
                let d = c.max_preconditioner_dim as f64;
                require(&f("max_preconditioner_dim"), d, d >= 1.0, ">= 1")?;
                let freq = c.precondition_frequency as f64;
                require(&f("precondition_frequency"), freq, freq >= 1.0, ">= 1")?;
                let start = c.start_preconditioning_step;
                require(
                    &f("start_preconditioning_step"),
                    start as f64,
                    start == -1 || start >= c.precondition_frequency as i64,
                    "-1 or >= precondition_frequency",
                )?;
                match c.grafting {
                    Grafting::None => {}
                    // The grafted norm divides by sqrt(acc) + eps: a tensor
                    // whose gradient is all zero would get 0/0 (as
                    // DistributedShampoo, eps must be > 0).
                    Grafting::Adagrad { eps } => positive(&f("grafting.eps"), eps)?,
                    Grafting::Adam { beta2, eps } => {
                        unit_interval(&f("grafting.beta2"), beta2)?;
                        positive(&f("grafting.eps"), eps)?;
                    }
                }
            }
            OptimizerKind::Soap(c) => {
                adam_like(c.beta1, c.beta2, c.eps, c.weight_decay)?;
                if let Some(sb) = c.shampoo_beta {
                    unit_interval(&f("shampoo_beta"), sb)?;
                }
                let freq = c.precondition_frequency as f64;
                require(&f("precondition_frequency"), freq, freq >= 1.0, ">= 1")?;
                let start = c.start_preconditioning_step as f64;
                require(
                    &f("start_preconditioning_step"),
                    start,
                    start >= 1.0,
                    ">= 1",
                )?;
                let d = c.max_preconditioner_dim as f64;
                require(&f("max_preconditioner_dim"), d, d >= 1.0, ">= 1")?;
            }
        }
        if let Some(c) = self.clip_global_norm {
            positive("clip_global_norm", c)?;
        }
        if let Some(c) = self.clip_value {
            positive("clip_value", c)?;
        }
        Ok(())
    }
}

fn check_lr(kind: &str, lr: f64) -> Result<()> {
    non_negative(&format!("{kind}.lr"), lr)
}

/// `Ok` when `ok`, else an error naming `field`, what it must be, and `x`.
fn require(field: &str, x: f64, ok: bool, must_be: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(KeelError::config(
            field,
            format!("must be {must_be}, got {x}"),
        ))
    }
}

fn unit_interval(field: &str, x: f64) -> Result<()> {
    require(field, x, (0.0..1.0).contains(&x), "in [0, 1)")
}

fn closed_unit(field: &str, x: f64) -> Result<()> {
    require(field, x, (0.0..=1.0).contains(&x), "in [0, 1]")
}

/// Refuses a TOML `nan` or `inf` anywhere in `text`, naming its key (after
/// `prefix`). Configs pass through JSON values, which have no non-finite
/// numbers: there a NaN would become "absent" and, for an optional setting
/// like `clip_global_norm`, silently turn it off. Text that is not TOML is
/// left to the caller's parser and its message.
pub(crate) fn refuse_non_finite_toml(text: &str, prefix: &str) -> Result<()> {
    fn walk(v: &toml::Value, path: &str) -> Result<()> {
        let join = |k: &str| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        };
        match v {
            toml::Value::Float(x) if !x.is_finite() => {
                Err(KeelError::config(path, format!("must be finite, got {x}")))
            }
            toml::Value::Table(t) => t.iter().try_for_each(|(k, v)| walk(v, &join(k))),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| walk(v, &format!("{path}[{i}]"))),
            _ => Ok(()),
        }
    }
    match toml::from_str::<toml::Table>(text) {
        Ok(table) => walk(&toml::Value::Table(table), prefix),
        Err(_) => Ok(()),
    }
}

fn non_negative(field: &str, x: f64) -> Result<()> {
    require(field, x, x.is_finite() && x >= 0.0, "finite and >= 0")
}

fn positive(field: &str, x: f64) -> Result<()> {
    require(field, x, x.is_finite() && x > 0.0, "finite and > 0")
}

/// Where Muon's iteration `X <- aX + b(XXᵀ)X + c(XXᵀ)²X` sends a singular
/// value `σ` in [0, 1] (the momentum is normalized first) past 100, or to a
/// non-finite value, after `steps` steps: `Some((σ, image))` of the first
/// such `σ` on a grid of 1001, `None` when the coefficients keep every one
/// bounded. (Orthogonalizing coefficients end near 1; a diverging set would
/// turn the step into ±inf or NaN from finite gradients.)
fn ns_divergence([a, b, c]: [f64; 3], steps: u32) -> Option<(f64, f64)> {
    (0..=1000).map(|i| i as f64 / 1000.0).find_map(|sigma| {
        let mut x: f64 = sigma;
        for _ in 0..steps {
            let s = x * x;
            x *= a + b * s + c * s * s;
        }
        (x.is_nan() || x.abs() > 100.0).then_some((sigma, x))
    })
}

/// An epsilon added to a divisor that is 0 where the gradient is (Adam's
/// `sqrt(v)`, Muon's matrix norm): at 0 such an element would be 0 / 0.
fn divisor_eps(field: &str, x: f64) -> Result<()> {
    require(
        field,
        x,
        x.is_finite() && x > 0.0,
        "finite and > 0 (at 0, an element whose gradient is 0 would become 0 / 0 = NaN)",
    )
}

const SHARED_KEYS: [&str; 3] = ["clip_global_norm", "clip_value", "on_nonfinite"];

/// Reads a config's map of settings, refusing a key given twice at any
/// depth (JSON parsers would otherwise keep the last one silently). `path`
/// names the map in errors: empty at the top, `grafting` below it.
struct UniqueKeys {
    path: String,
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = serde_json::Map<String, serde_json::Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map of optimizer settings")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut access: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::new();
        while let Some(key) = access.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let value = access.next_value_seed(ValueAt { path: path.clone() })?;
            if map.contains_key(&key) {
                return Err(A::Error::custom(format!("`{path}` is given twice")));
            }
            map.insert(key, value);
        }
        Ok(map)
    }
}

/// Reads the setting's value at `path` in the config, with [`UniqueKeys`]
/// for nested maps too (Shampoo's `grafting`), so a key given twice is
/// refused at every depth.
struct ValueAt {
    path: String,
}

impl<'de> serde::de::DeserializeSeed<'de> for ValueAt {
    type Value = serde_json::Value;

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<serde_json::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ValueAt {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a setting's value")
    }

    fn visit_bool<E>(self, v: bool) -> std::result::Result<serde_json::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> std::result::Result<serde_json::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> std::result::Result<serde_json::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<serde_json::Value, E> {
        // JSON values hold no NaN or infinity: refuse one here rather than
        // let it turn into `null`, which reads as "not set".
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom(format!("`{}` must be finite, got {v}", self.path)))
    }

    fn visit_str<E>(self, v: &str) -> std::result::Result<serde_json::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> std::result::Result<serde_json::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> std::result::Result<serde_json::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> std::result::Result<serde_json::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<serde_json::Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut access: A,
    ) -> std::result::Result<serde_json::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = access.next_element_seed(ValueAt {
            path: format!("{}[{}]", self.path, items.len()),
        })? {
            items.push(v);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        access: A,
    ) -> std::result::Result<serde_json::Value, A::Error> {
        UniqueKeys { path: self.path }
            .visit_map(access)
            .map(serde_json::Value::Object)
    }
}

impl<'de> Deserialize<'de> for OptimizerConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        // Go through a generic map so the shared keys can be split off and the
        // kind's own struct can still reject unknown keys (serde's `flatten`
        // cannot be combined with `deny_unknown_fields`).
        let mut map = deserializer.deserialize_map(UniqueKeys {
            path: String::new(),
        })?;
        let mut take = |key: &str| map.remove(key);
        let shared: Vec<Option<serde_json::Value>> = SHARED_KEYS.iter().map(|k| take(k)).collect();
        let number = |i: usize| -> std::result::Result<Option<f64>, D::Error> {
            match &shared[i] {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    D::Error::custom(format!("`{}` must be a number", SHARED_KEYS[i]))
                }),
            }
        };
        let clip_global_norm = number(0)?;
        let clip_value = number(1)?;
        let on_nonfinite = match &shared[2] {
            None => NonFinitePolicy::Skip,
            Some(v) => NonFinitePolicy::deserialize(v)
                .map_err(|e| D::Error::custom(format!("`on_nonfinite`: {e}")))?,
        };
        let kind = kind_from_map(map).map_err(D::Error::custom)?;
        Ok(OptimizerConfig {
            kind,
            clip_global_norm,
            clip_value,
            on_nonfinite,
        })
    }
}

/// The kind named by `kind` in `map`, with its settings from the rest of
/// `map`. Dispatched here rather than through serde's tagged enum, which
/// buffers the settings and so loses which key a type error is about.
fn kind_from_map(
    mut map: serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<OptimizerKind, String> {
    fn settings<T: serde::de::DeserializeOwned>(
        map: serde_json::Map<String, serde_json::Value>,
        kind: &str,
    ) -> std::result::Result<T, String> {
        serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                inner
            } else if inner.contains(&format!("`{path}`")) {
                // An unknown key names itself; say whose settings it is not
                // among (it is often another kind's).
                format!("{inner} (the settings of `{kind}`)")
            } else {
                format!("`{path}`: {inner}")
            }
        })
    }
    let name = match map.remove("kind") {
        Some(serde_json::Value::String(name)) => name,
        Some(other) => return Err(format!("`kind` must be a string, got {other}")),
        None => return Err(format!("missing `kind` (one of {})", KINDS.join(", "))),
    };
    Ok(match name.as_str() {
        "sgd" => OptimizerKind::Sgd(settings(map, "sgd")?),
        "adam" => OptimizerKind::Adam(settings(map, "adam")?),
        "adamw" => OptimizerKind::AdamW(settings(map, "adamw")?),
        "lamb" => OptimizerKind::Lamb(settings(map, "lamb")?),
        "lars" => OptimizerKind::Lars(settings(map, "lars")?),
        "lion" => OptimizerKind::Lion(settings(map, "lion")?),
        "muon" => OptimizerKind::Muon(settings(map, "muon")?),
        "shampoo" => OptimizerKind::Shampoo(settings(map, "shampoo")?),
        "soap" => OptimizerKind::Soap(settings(map, "soap")?),
        other => {
            return Err(format!(
                "unknown kind `{other}` (one of {})",
                KINDS.join(", ")
            ))
        }
    })
}

impl Serialize for OptimizerConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let mut value = serde_json::to_value(&self.kind).map_err(S::Error::custom)?;
        let map = value
            .as_object_mut()
            .ok_or_else(|| S::Error::custom("optimizer kind did not serialize to a map"))?;
        if let Some(c) = self.clip_global_norm {
            map.insert("clip_global_norm".into(), c.into());
        }
        if let Some(c) = self.clip_value {
            map.insert("clip_value".into(), c.into());
        }
        if self.on_nonfinite != NonFinitePolicy::Skip {
            let policy = serde_json::to_value(self.on_nonfinite).map_err(S::Error::custom)?;
            map.insert("on_nonfinite".into(), policy);
        }
        value.serialize(serializer)
    }
}
