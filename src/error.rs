//! The one error type of keel: every fallible call returns [`Result`].

use std::path::PathBuf;

/// Everything that can go wrong in keel, with the field, tensor or file named.
#[derive(Debug, thiserror::Error)]
pub enum KeelError {
    /// A configuration value is invalid; `field` names it (e.g. `adamw.beta2`).
    #[error("invalid configuration `{field}`: {message}")]
    Config {
        /// The offending field, as written in the config vocabulary.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Buffers do not match the registered parameters.
    #[error("shape mismatch for `{tensor}`: {message}")]
    Shape {
        /// The tensor whose buffer is wrong.
        tensor: String,
        /// What was expected and what was given.
        message: String,
    },
    /// A gradient held NaN or Inf and the policy is [`crate::NonFinitePolicy::Error`].
    #[error("non-finite gradient in {}", tensors.join(", "))]
    NonFiniteGradient {
        /// The tensors whose gradients were not finite.
        tensors: Vec<String>,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint `{}`: {message}", path.display())]
    Checkpoint {
        /// The file involved.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A state dict does not fit the optimizer it is loaded into.
    #[error("state does not match the optimizer: {0}")]
    State(String),
    /// The CUDA backend is unavailable or failed (no driver, no device, a
    /// kernel that did not compile, an unsupported optimizer on CUDA).
    #[error("cuda: {0}")]
    Cuda(String),
    /// A conformance case file could not be read or understood.
    #[error("conformance case `{}`: {message}", path.display())]
    Case {
        /// The case file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Training text could not be read or is unusable (missing, empty, too short).
    #[error("data: {0}")]
    Data(String),
    /// Memory for `what` could not be had: the allocator refused it, the size
    /// overflows, or (for the command line's runs) it exceeds what the
    /// machine has free. Returned instead of aborting the process.
    #[error(
        "not enough memory for {what}: needs {}{}",
        crate::memory::human_bytes(*needed),
        available.map(|a| format!(", {} available", crate::memory::human_bytes(a as u128))).unwrap_or_default()
    )]
    Memory {
        /// What the memory was for (a buffer, a model, a run).
        what: String,
        /// Bytes needed (at least; `u128::MAX` when the size overflows).
        needed: u128,
        /// Bytes the machine had available (RAM plus free swap), where known.
        available: Option<u64>,
    },
}

impl KeelError {
    /// Shorthand for a [`KeelError::Config`] error.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        KeelError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Shorthand for a [`KeelError::Shape`] error.
    pub fn shape(tensor: impl Into<String>, message: impl Into<String>) -> Self {
        KeelError::Shape {
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}

/// keel's result type.
pub type Result<T, E = KeelError> = std::result::Result<T, E>;
