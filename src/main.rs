//! The `keel` command line: conformance checks and step benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use keel::bench::{self, BenchDtype, BenchModel, BenchOptions};
use keel::conformance;
use keel::gpt::bench::{self as gpt_bench, GptBenchOptions};
use keel::gpt::GptConfig;
use keel::{KeelError, OptimizerConfig};

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Spike-resistant optimizers for LLM training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay reference cases (files, or directories of *.json) on every
    /// backend and precision; exits non-zero if any case fails.
    Conformance {
        /// Case files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Time the CPU step (median after warm-up) next to the memory floor.
    Bench {
        /// Optimizer kind (sgd, adam, adamw, lamb, lars, lion), lr 1e-3 and
        /// the reference defaults otherwise (sgd: momentum 0.9).
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        /// A full optimizer config as JSON (overrides --optimizer).
        #[arg(long)]
        config: Option<String>,
        /// Total parameters.
        #[arg(long, default_value_t = 10_000_000)]
        params: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// Warm-up steps (not timed).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Tensors the parameters are split into.
        #[arg(long, default_value_t = 1)]
        tensors: usize,
        /// Parameter storage.
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Time a model's tensor set instead of `--params`/`--tensors`
        /// (steps amortize the precondition frequency; muon means Muon on
        /// the hidden matrices and AdamW on the rest).
        #[arg(long, value_enum)]
        model: Option<Model>,
    },
    /// Time one GPT training step (forward + backward, f32) and report tokens/s.
    BenchGpt(GptBenchArgs),
}

/// `keel bench-gpt` options: the model and batch shape (defaults: the
/// llm.c comparison config, B=12, T=64, C=128, L=4, H=4, V=65).
#[derive(clap::Args)]
struct GptBenchArgs {
    /// Batch size B.
    #[arg(long, default_value_t = 12)]
    batch: usize,
    /// Sequence length T (also the block size).
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Embedding width C.
    #[arg(long, default_value_t = 128)]
    n_embd: usize,
    /// Blocks L.
    #[arg(long, default_value_t = 4)]
    n_layer: usize,
    /// Heads H.
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Vocabulary V.
    #[arg(long, default_value_t = 65)]
    vocab_size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Warm-up steps (not timed).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    /// 6 layers, 384 wide, vocabulary 65, context 256 (10.8M parameters).
    GptSmall,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, KeelError> {
    match cli.command {
        Command::Conformance { paths } => conformance_command(&paths),
        Command::BenchGpt(args) => bench_gpt_command(args),
        Command::Bench {
            optimizer,
            config,
            params,
            steps,
            warmup,
            tensors,
            dtype,
            threads,
            json,
            model,
        } => {
            let config = match config {
                Some(text) => OptimizerConfig::from_json(&text)?,
                None => {
                    let extra = if optimizer == "sgd" {
                        r#", "momentum": 0.9"#
                    } else {
                        ""
                    };
                    OptimizerConfig::from_json(&format!(
                        r#"{{"kind": "{optimizer}", "lr": 0.001{extra}}}"#
                    ))?
                }
            };
            if let Some(t) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build_global()
                    .map_err(|e| KeelError::config("threads", e.to_string()))?;
            }
            if let Some(model) = model {
                let model = match model {
                    Model::GptSmall => BenchModel::GptSmall,
                };
                let r = bench::run_model(&config, model, steps, warmup)?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&r).map_err(|e| KeelError::State(e.to_string()))?
                    );
                } else {
                    println!(
                        "{} on {}: {} params in {} tensors, {} threads, {} steps, precondition frequency {}",
                        r.optimizer, r.model.name(), r.params, r.tensors, r.threads, r.steps,
                        r.precondition_frequency
                    );
                    println!("  amortized step  {:10.2} ms", r.ms_per_step);
                    if let Some(ms) = r.plain_ms {
                        println!("  plain step      {ms:10.2} ms (median)");
                    }
                    if let Some(ms) = r.precondition_ms {
                        println!("  recompute step  {ms:10.2} ms (mean)");
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let opts = BenchOptions {
                config,
                params,
                tensors,
                steps,
                warmup,
                dtype: match dtype {
                    Dtype::F32 => BenchDtype::F32,
                    Dtype::Bf16 => BenchDtype::Bf16,
                },
            };
            let r = bench::run(&opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&r).map_err(|e| KeelError::State(e.to_string()))?
                );
            } else {
                println!(
                    "{} {:?}: {} params in {} tensor(s), {} threads, median of {} steps",
                    r.optimizer, r.dtype, r.params, r.tensors, r.threads, r.steps
                );
                println!(
                    "  step   {:9.3} ms  (min {:.3} ms)",
                    r.ms_per_step, r.min_ms
                );
                println!(
                    "  bytes  {} B/param moved ({} B/param minimum)  {:.1} GB/s",
                    r.bytes_per_param, r.min_bytes_per_param, r.gb_per_s
                );
                println!(
                    "  floor  {:9.3} ms  ({} B/param, {:.1} GB/s): step at {:.1}% of floor",
                    r.floor_ms, r.min_bytes_per_param, r.floor_gb_per_s, r.pct_of_floor
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn conformance_command(paths: &[PathBuf]) -> Result<ExitCode, KeelError> {
    let results = conformance::run_paths(paths)?;
    if results.is_empty() {
        eprintln!("no case files found");
        return Ok(ExitCode::FAILURE);
    }
    let id_w = results.iter().map(|r| r.id.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<id_w$}  {:<7}  {:<6}  {:>5}  {:>11}  {:>9}  result",
        "case", "backend", "kind", "steps", "worst rel", "tolerance"
    );
    for r in &results {
        let verdict = if r.passed {
            "PASS".to_string()
        } else {
            format!("FAIL  {}", r.reason)
        };
        println!(
            "{:<id_w$}  {:<7}  {:<6}  {:>5}  {:>11.3e}  {:>9.0e}  {verdict}",
            r.id, r.backend, r.kind, r.steps, r.worst_rel_err, r.tolerance
        );
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!("{} passed, {} failed", results.len() - failed, failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench_gpt_command(a: GptBenchArgs) -> Result<ExitCode, KeelError> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| KeelError::config("threads", e.to_string()))?;
    }
    let config = GptConfig::new(a.vocab_size, a.seq_len, a.n_layer, a.n_head, a.n_embd);
    let r = gpt_bench::run(&GptBenchOptions {
        config,
        batch: a.batch,
        seq_len: a.seq_len,
        steps: a.steps,
        warmup: a.warmup,
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| KeelError::State(e.to_string()))?
        );
    } else {
        println!(
            "gpt f32 B={} T={} C={} L={} H={} V={} ({} params), {} threads, median of {} steps",
            r.batch,
            r.seq_len,
            a.n_embd,
            a.n_layer,
            a.n_head,
            a.vocab_size,
            r.params,
            r.threads,
            r.steps
        );
        println!(
            "  step {:8.2} ms (min {:.2} ms)  {:.0} tokens/s",
            r.ms_per_step, r.min_ms, r.tokens_per_s
        );
    }
    Ok(ExitCode::SUCCESS)
}
