//! Backends that implement [`crate::Optimizer`]: the CPU (always), its
//! mixed-precision wrapper, and CUDA (feature `cuda`). Every backend shares
//! the config, the statistics and the [`crate::StateDict`] format, so
//! checkpoints move between them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod mixed;
pub(crate) mod reduce;
