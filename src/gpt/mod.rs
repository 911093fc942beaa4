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
//!
//! ## Architecture (GPT-2 layout; torch `Linear` weights `[out, in]`)
//!
//! 1. `x = (wte[tokens] + wpe[0..T]) * embed_scale`.
//! 2. Per block `transformer.h.{l}.`: attention `c_attn` (C -> 3C, q|k|v),
//!    heads are contiguous slices of `hs = C / H`; with `qk_norm` a LayerNorm
//!    over `hs` on q and on k (`attn.q_norm`, `attn.k_norm`, shared by the
//!    heads); causal softmax of `q k^T / sqrt(hs)`; heads concatenated;
//!    `c_proj`. MLP `c_fc` (C -> 4C), GELU (tanh approximation), `c_proj`.
//!    Pre-LN: `x += attn(ln_1(x)); x += mlp(ln_2(x))`. Post-LN:
//!    `x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))`.
//! 3. Pre-LN only: `x = ln_f(x)`.
//! 4. `logits = x wte^T` (tied head).
//! 5. `loss = mean CE + z_loss * mean(logsumexp(logits)^2)`.
//!
//! LayerNorm: eps 1e-5, biased variance. Matrix products go through faer
//! (`matmul` on row-major views of the flat buffers); row-wise and
//! elementwise kernels and attention (per batch row) run on rayon.

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
