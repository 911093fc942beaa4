//! Timing of one GPT training step (forward + backward) for `keel bench-gpt`.

use std::time::Instant;

use serde::Serialize;

use super::config::GptConfig;
use super::model::Gpt;
use super::rng::SplitMix64;
use crate::error::Result;

/// What to time.
#[derive(Debug, Clone)]
pub struct GptBenchOptions {
    /// The model (its `block_size` must cover `seq_len`).
    pub config: GptConfig,
    /// Batch size `B`.
    pub batch: usize,
    /// Sequence length `T`.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
}

/// Timing of a forward + backward step in f32.
#[derive(Debug, Clone, Serialize)]
pub struct GptBenchReport {
    /// Width C.
    pub n_embd: usize,
    /// Blocks L.
    pub n_layer: usize,
    /// Heads H.
    pub n_head: usize,
    /// Vocabulary V.
    pub vocab_size: usize,
    /// Parameters of the model.
    pub params: usize,
    /// Batch size.
    pub batch: usize,
    /// Sequence length.
    pub seq_len: usize,
    /// rayon worker threads.
    pub threads: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median milliseconds per step.
    pub ms_per_step: f64,
    /// Fastest step, milliseconds.
    pub min_ms: f64,
    /// `B * T / median step time`.
    pub tokens_per_s: f64,
}

/// Times `forward_backward` in f32 on random tokens (the step's cost does
/// not depend on the values).
///
/// Fails with [`crate::KeelError::Memory`] when the model's parameters,
/// gradients and activations exceed the memory the machine has available.
pub fn run(opts: &GptBenchOptions) -> Result<GptBenchReport> {
    crate::bench::check_steps("bench-gpt.steps", opts.steps)?;
    crate::bench::check_warmup("bench-gpt.warmup", opts.warmup)?;
    let mut model = Gpt::<f32>::new(opts.config.clone())?;
    let param_bytes = 2 * model.num_params() as u128 * std::mem::size_of::<f32>() as u128;
    crate::memory::ensure_fits(
        &format!(
            "a GPT step at batch {} x {} tokens",
            opts.batch, opts.seq_len
        ),
        param_bytes.saturating_add(model.activation_bytes(opts.batch, opts.seq_len)),
    )?;
    let params = model.init_params(1);
    let mut grads = model.zeros_like_params();
    let (b, t) = (opts.batch, opts.seq_len);
    let mut rng = SplitMix64::new(2);
    let v = opts.config.vocab_size as u64;
    let tokens: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
    for _ in 0..opts.warmup {
        model.forward_backward(&params, &mut grads, &tokens, &targets, b, t)?;
    }
    let mut times = Vec::with_capacity(opts.steps);
    for _ in 0..opts.steps {
        let start = Instant::now();
        model.forward_backward(&params, &mut grads, &tokens, &targets, b, t)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    Ok(GptBenchReport {
        n_embd: opts.config.n_embd,
        n_layer: opts.config.n_layer,
        n_head: opts.config.n_head,
        vocab_size: opts.config.vocab_size,
        params: model.num_params(),
        batch: b,
        seq_len: t,
        threads: rayon::current_num_threads(),
        steps: times.len(),
        ms_per_step: ms,
        min_ms: times[0],
        tokens_per_s: (b * t) as f64 / (ms / 1e3),
    })
}
