//! # keel — spike-resistant optimizers for training large language models
//!
//! keel updates named flat parameter buffers with their gradients through one
//! [`Optimizer`] trait, whatever the backend. The CPU backend
//! ([`CpuOptimizer`]) runs every elementwise optimizer as one fused, parallel,
//! vectorizable pass per tensor (two where the math needs a per-tensor norm
//! first), in `f32` for speed or `f64` for conformance, and keeps `bf16`
//! parameters with `f32` master weights ([`MixedPrecisionOptimizer`]).
//!
//! Every optimizer follows the exact semantics of its reference (PyTorch or
//! optax) — see [`config`] for the vocabulary and [`conformance`] for the
//! checker — and every step returns [`StepStats`] (global and per-tensor norms,
//! trust ratios, clip factors, skipped steps) so a trainer can log them without
//! another pass over memory. [`guard`] holds the spike guards a trainer
//! composes around any optimizer: ZClip, SPAM clipping and momentum reset,
//! dynamic loss scaling, and loss-spike skip/rollback.
//!
//! ```
//! use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};
//!
//! let config =
//!     OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01, "weight_decay": 0.1}"#)?;
//! let specs = vec![ParamSpec::new("w", [2, 2]), ParamSpec::new("b", [2])];
//! let mut opt = CpuOptimizer::<f32>::new(config, specs)?;
//! let (mut w, mut b) = (vec![1.0f32; 4], vec![0.0f32; 2]);
//! let (gw, gb) = (vec![0.5f32; 4], vec![-0.5f32; 2]);
//! let stats = opt.step(&mut [&mut w[..], &mut b[..]], &[&gw[..], &gb[..]])?;
//! assert!(stats.skipped.is_none());
//! assert!(w[0] < 1.0 && b[0] > 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

#[cfg(any(feature = "candle", feature = "burn"))]
pub mod adapters;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod conformance;
pub mod error;
pub mod gpt;
pub mod group;
pub mod guard;
pub mod memory;
pub mod optim;
pub mod real;
pub mod schedule;
pub mod stats;
pub mod tensor;

pub use backend::cpu::CpuOptimizer;
pub use backend::mixed::{MixedPrecisionOptimizer, Rounding};
pub use checkpoint::{StateData, StateDict, StateTensor};
pub use config::{NonFinitePolicy, OptimizerConfig, OptimizerKind};
pub use error::{KeelError, Result};
pub use group::ParamGroup;
/// The `half` crate keel's bf16 parameters come from (`half::bf16`), so a
/// caller needs no version of its own to match.
pub use half;
pub use optim::Optimizer;
pub use schedule::Schedule;
pub use stats::{SkipReason, StepStats, TensorStats};
pub use tensor::ParamSpec;
