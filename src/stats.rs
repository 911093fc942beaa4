//! What a step reports: computed inside the fused passes, so logging them
//! costs no extra pass over memory.

use serde::{Deserialize, Serialize};

/// Why a step did not change anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SkipReason {
    /// These tensors' gradients held NaN or Inf.
    NonFiniteGradient {
        /// Names of the offending tensors, in parameter order.
        tensors: Vec<String>,
    },
}

/// Per-tensor statistics of one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TensorStats {
    /// L2 norm of the gradient (after `clip_value`, before global-norm clipping).
    pub grad_norm: f64,
    /// L2 norm of the change applied to the parameter, `||p_new - p||`
    /// (0 when the step was skipped).
    pub update_norm: f64,
    /// L2 norm of the parameter before the step (NaN when skipped: not measured).
    pub param_norm: f64,
    /// The trust ratio applied (LAMB, LARS), if any.
    pub trust_ratio: Option<f64>,
    /// The update clipping factor applied (`update_clip_rms`), if any.
    pub update_clip_factor: Option<f64>,
    /// Whether every gradient element was finite. False with a step that was
    /// not skipped happens only under [`crate::NonFinitePolicy::Unchecked`]:
    /// the non-finite gradient was applied to this tensor.
    pub finite: bool,
}

impl TensorStats {
    /// `||Δw|| / ||w||`, the update-to-parameter ratio (NaN when `||w|| = 0`).
    pub fn update_ratio(&self) -> f64 {
        if self.param_norm == 0.0 {
            f64::NAN
        } else {
            self.update_norm / self.param_norm
        }
    }
}

/// Statistics of one call to [`crate::Optimizer::step`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// The optimizer's step count after this call (unchanged when skipped).
    pub step: u64,
    /// The base learning rate used.
    pub lr: f64,
    /// Global L2 norm of all gradients before global-norm clipping.
    pub global_grad_norm: f64,
    /// Global L2 norm after clipping (`clip_factor * global_grad_norm`).
    pub global_grad_norm_clipped: f64,
    /// The factor every gradient was multiplied by (1 when not clipped).
    pub clip_factor: f64,
    /// `Some` when the step changed nothing, with the reason.
    pub skipped: Option<SkipReason>,
    /// Shampoo inverse roots that could not be recomputed this step (the
    /// eigendecomposition failed or met a non-finite factor); each kept its
    /// previous value.
    pub preconditioner_failures: usize,
    /// One entry per parameter, in registration order.
    pub tensors: Vec<TensorStats>,
}
