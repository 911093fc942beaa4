//! The GPT's shape and architecture switches, plus the trainer's init options.

use serde::{Deserialize, Serialize};

use crate::error::{KeelError, Result};

/// Where each block's LayerNorms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`, then a final `ln_f`.
    #[default]
    Pre,
    /// `x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))`, no final LayerNorm.
    Post,
}

/// A GPT-2 style model: sizes, architecture switches and init options.
///
/// The architecture keys are those of the golden cases
/// (`tests/data/gpt-golden/README.md`); `init_std` and `scale_residual_init`
/// only affect [`crate::gpt::Gpt::init_params`].
///
/// ```
/// use keel::gpt::{GptConfig, Norm};
/// let c: GptConfig = serde_json::from_str(
///     r#"{"vocab_size": 65, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128}"#,
/// ).unwrap();
/// assert_eq!(c.norm, Norm::Pre);
/// assert_eq!(c.head_size(), 32);
/// c.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Vocabulary size `V`. It may be left out of a training config, whose
    /// data sets it ([`crate::gpt::train::Trainer::new`]); elsewhere a missing one
    /// reads as 0, which [`GptConfig::validate`] refuses.
    #[serde(default)]
    pub vocab_size: usize,
    /// Longest sequence `T` the position embedding covers.
    pub block_size: usize,
    /// Number of transformer blocks `L`.
    pub n_layer: usize,
    /// Attention heads per block `H`.
    pub n_head: usize,
    /// Embedding width `C` (a multiple of `n_head`).
    pub n_embd: usize,
    /// Pre-LN (default) or post-LN blocks.
    #[serde(default)]
    pub norm: Norm,
    /// LayerNorm over the head size on queries and keys (weights shared by heads).
    #[serde(default)]
    pub qk_norm: bool,
    /// Weight of `mean(logsumexp(logits)^2)` added to the loss.
    #[serde(default)]
    pub z_loss: f64,
    /// Factor on `wte[token] + wpe[pos]`.
    #[serde(default = "one")]
    pub embed_scale: f64,
    /// Standard deviation of the normal init of embeddings and Linear weights.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
    /// Scale the init of residual-output projections (`c_proj`) by `1/sqrt(2L)`.
    #[serde(default = "yes")]
    pub scale_residual_init: bool,
}

fn one() -> f64 {
    1.0
}

fn default_init_std() -> f64 {
    0.02
}

fn yes() -> bool {
    true
}

impl GptConfig {
    /// A config with the given sizes and every other option at its default
    /// (pre-LN, no qk-norm, no z-loss, embed scale 1, init std 0.02, scaled
    /// residual init).
    pub fn new(
        vocab_size: usize,
        block_size: usize,
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
    ) -> Self {
        GptConfig {
            vocab_size,
            block_size,
            n_layer,
            n_head,
            n_embd,
            norm: Norm::Pre,
            qk_norm: false,
            z_loss: 0.0,
            embed_scale: 1.0,
            init_std: default_init_std(),
            scale_residual_init: true,
        }
    }

    /// Head size `C / H`.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(KeelError::config(field, "must be at least 1"));
            }
        }
        // The MLP's hidden width is 4C.
        if self.n_embd.checked_mul(4).is_none() {
            return Err(KeelError::config(
                "n_embd",
                format!("{} is too large", self.n_embd),
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(KeelError::config(
                "n_embd",
                format!(
                    "{} is not divisible by n_head = {}",
                    self.n_embd, self.n_head
                ),
            ));
        }
        // Token ids travel as u32.
        if self.vocab_size > u32::MAX as usize {
            return Err(KeelError::config("vocab_size", "must fit in u32"));
        }
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            return Err(KeelError::config(
                "z_loss",
                format!("must be finite and >= 0, got {}", self.z_loss),
            ));
        }
        if !(self.embed_scale.is_finite() && self.embed_scale > 0.0) {
            return Err(KeelError::config(
                "embed_scale",
                format!("must be finite and > 0, got {}", self.embed_scale),
            ));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(KeelError::config(
                "init_std",
                format!("must be finite and > 0, got {}", self.init_std),
            ));
        }
        Ok(())
    }
}
