//! Backends that implement [`crate::Optimizer`]: the CPU (always) and its
//! mixed-precision wrapper. Every backend shares the config, the statistics
//! and the [`crate::StateDict`] format, so checkpoints move between them.

pub mod cpu;
pub mod mixed;
pub(crate) mod reduce;
