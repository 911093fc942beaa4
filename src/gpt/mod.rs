//! The reference GPT: a GPT-2 style model written by hand (forward and
//! backward, like llm.c's `train_gpt2.c`), generic over `f32` (training) and
//! `f64` (the golden check against PyTorch), with matrix products in faer.
//!
//! - [`GptConfig`]: sizes and architecture switches (pre/post-LN, qk-norm,
//!   z-loss, embedding scale) plus init options.
//! - [`Gpt`]: parameter specs in GPT-2 naming, init, forward, backward and
//!   the per-step diagnostics a trainer logs ([`GptStats`]).
//! - [`golden`]: the `keel-gpt-golden-v1` conformance cases.
//! - [`data`]: char-level corpora (Tiny Shakespeare embedded) and batches.

pub mod bench;
pub mod config;
pub mod data;
pub mod golden;
mod kernels;
pub mod lab;
pub mod model;
pub mod plot;
pub mod rng;
pub mod train;

pub use config::{GptConfig, Norm};
pub use model::{Gpt, GptStats};
pub use rng::SplitMix64;
