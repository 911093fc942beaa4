//! The `keel` command line: the spike lab, GPT training and sampling,
//! conformance checks and step benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use keel::bench::{self, BenchDevice, BenchDtype, BenchModel, BenchOptions, BenchTarget};
use keel::conformance;
use keel::gpt::bench::{self as gpt_bench, GptBenchOptions};
use keel::gpt::data::Dataset;
use keel::gpt::lab::{self, LabOptions, Preset};
use keel::gpt::train::{self, ModelCheckpoint, Stress, TrainConfig, Trainer};
use keel::gpt::GptConfig;
use keel::{KeelError, OptimizerConfig};

/// `println!` that ends the process instead of panicking when standard output
/// fails: with status 141 (as a shell reports SIGPIPE) when the reader went
/// away (`keel sample ... | head`), with an error line and status 2 otherwise
/// (a full disk). Everything a command writes to files is written before its
/// summary is printed.
macro_rules! println {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))
    };
}

fn print_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        stdout_failed(e);
    }
}

/// Ends the process after a failed write to standard output (see
/// `println!` above).
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(2);
}

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
    /// Train a tiny GPT under spike-inducing settings with several optimizer
    /// and guard arms over several seeds; writes runs/spike-lab-<preset>/report.md
    /// (or <out>/report.md).
    #[command(allow_negative_numbers = true)]
    SpikeLab {
        /// default (a few minutes), smoke (< 60 s), full (4x128, 5 seeds),
        /// scale (three model sizes).
        #[arg(long, value_enum, default_value_t = LabPreset::Default)]
        preset: LabPreset,
        /// Output folder (default runs/spike-lab-<preset>); an earlier lab's
        /// report, figures and run folders there are replaced.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seeds per arm (default: the preset's).
        #[arg(long)]
        seeds: Option<usize>,
        /// Steps per run (default: the preset's).
        #[arg(long)]
        steps: Option<u64>,
        /// A UTF-8 text file to train on (default: Tiny Shakespeare).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Comma-separated arms (adamw, adamw+clip1, adamw+update-clip,
        /// adamw+zclip, adamw+guard, lamb, muon+adamw, shampoo).
        #[arg(long, value_delimiter = ',')]
        arms: Option<Vec<String>>,
        /// A TOML file of spike-inducing settings replacing the preset's
        /// (fields of keel::gpt::train::Stress).
        #[arg(long)]
        stress: Option<PathBuf>,
        /// The stress's lr multiplier.
        #[arg(long)]
        lr_mult: Option<f64>,
    },
    /// Train one GPT from flags or a TOML config, with checkpoints.
    Train(TrainArgs),
    /// Print text sampled from a checkpoint written by `keel train`.
    #[command(allow_negative_numbers = true)]
    Sample {
        /// The checkpoint folder (`<out>/checkpoint` of `keel train`; the
        /// run folder `<out>` or the model file inside also work).
        checkpoint: PathBuf,
        /// Characters to generate.
        #[arg(long, default_value_t = 300)]
        chars: usize,
        /// Softmax temperature (0: greedy).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Text to continue (characters must be in the vocabulary; `\n` is
        /// a newline). Default: a newline, or the vocabulary's first
        /// character if it has no newline.
        #[arg(long)]
        prompt: Option<String>,
    },
    /// Replay reference cases (files, or directories of *.json) on every
    /// backend and precision; exits non-zero if any case fails.
    Conformance {
        /// Case files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Time the step (median after warm-up) next to the memory floor.
    #[command(allow_negative_numbers = true)]
    Bench {
        /// Optimizer kind (sgd, adam, adamw, lamb, lars, lion, muon, shampoo,
        /// soap), lr 1e-3 and the reference defaults otherwise (sgd: momentum
        /// 0.9; muon and shampoo take tensors of a multiple of 1024
        /// elements, as 1024-wide matrices).
        #[arg(long, default_value = "adamw")]
        optimizer: String,
        /// A full optimizer config as JSON (instead of --optimizer).
        #[arg(long, conflicts_with = "optimizer")]
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
        /// Where to run: cpu, cuda (an error without a GPU), or auto (CUDA
        /// when available, else the CPU).
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Tensors of mixed sizes instead of equal ones.
        #[arg(long)]
        mixed_sizes: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Time a model's tensor set instead of `--params`/`--tensors`
        /// (steps amortize the precondition frequency; muon means Muon on
        /// the hidden matrices and AdamW on the rest).
        #[arg(long, value_enum, conflicts_with_all = ["params", "tensors", "dtype", "mixed_sizes"])]
        model: Option<Model>,
    },
    /// Time one GPT training step (forward + backward, f32) and report tokens/s.
    BenchGpt(GptBenchArgs),
}

/// `keel bench-gpt` options: the model and batch shape (defaults: the
/// llm.c comparison config, B=12, T=64, C=128, L=4, H=4, V=65).
#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
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

/// `keel train` options; flags override the TOML config's fields.
#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
struct TrainArgs {
    /// A TOML file holding a full TrainConfig (see docs/spike-lab.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate of every optimizer (`matrix_optimizer` too).
    #[arg(long)]
    lr: Option<f64>,
    /// Optimizer kind for every tensor (adamw, lamb, shampoo, ...) at the
    /// same lr, clipping and non-finite policy; a kind other than the
    /// config's gets its other hyperparameters at their defaults (the
    /// config's own kind keeps them). `muon` means Muon on hidden matrices
    /// and AdamW on the rest.
    #[arg(long)]
    optimizer: Option<String>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches per step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Blocks.
    #[arg(long)]
    n_layer: Option<usize>,
    /// Width.
    #[arg(long)]
    n_embd: Option<usize>,
    /// Context length.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Warmup steps, at most --steps (default 20, or with --config the
    /// file's `warmup_steps`, which defaults to 0).
    #[arg(long)]
    warmup: Option<u64>,
    /// Global-norm gradient clipping (with Muon, each optimizer clips the
    /// norm of its own tensors).
    #[arg(long)]
    clip: Option<f64>,
    /// Seed of init and batches.
    #[arg(long)]
    seed: Option<u64>,
    /// EMA decay of the parameters used for validation.
    #[arg(long)]
    ema: Option<f64>,
    /// Layer-wise lr decay (1 = off).
    #[arg(long)]
    layer_lr_decay: Option<f64>,
    /// Validate every this many steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// A UTF-8 text file (default: Tiny Shakespeare).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder: metrics.jsonl and the checkpoint/ folder.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Save a checkpoint every this many steps (0: only at the end; a run
    /// interrupted with Ctrl-C or SIGTERM also saves one before it stops).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Continue from <out>/checkpoint with its config; only --steps (more
    /// than the checkpoint's step), --data and --checkpoint-every apply.
    /// metrics.jsonl is cut back to the checkpoint's step, then appended to.
    #[arg(long, conflicts_with_all = [
        "config", "lr", "optimizer", "batch", "grad_accum", "n_layer", "n_embd",
        "seq_len", "warmup", "clip", "seed", "ema", "layer_lr_decay", "eval_every", "stress",
    ])]
    resume: bool,
    /// Start a new run in an --out folder that holds one (its metrics and
    /// checkpoint are replaced); without it, such a folder is refused.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// A TOML file of spike-inducing settings applied on top of the config
    /// (the fields of keel::gpt::train::Stress, as in `spike-lab --stress`).
    #[arg(long)]
    stress: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LabPreset {
    Default,
    Smoke,
    Full,
    Scale,
}

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    /// 6 layers, 384 wide, vocabulary 65, context 256 (10.8M parameters).
    GptSmall,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
    Auto,
}

impl From<Device> for BenchDevice {
    fn from(d: Device) -> Self {
        match d {
            Device::Cpu => BenchDevice::Cpu,
            Device::Cuda => BenchDevice::Cuda,
            Device::Auto => BenchDevice::Auto,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Asks glibc's malloc to keep freed memory in the process. The matrix
/// optimizers allocate and free megabytes of block buffers every step;
/// by default glibc hands the top of its heaps back to the kernel and
/// faults the pages in again on the next step (a quarter of a Shampoo
/// step at frequency 100 in an A/B run). Other C libraries: nothing to do.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 25);
    }
}

fn run(cli: Cli) -> Result<ExitCode, KeelError> {
    match cli.command {
        Command::Conformance { paths } => conformance_command(&paths),
        Command::BenchGpt(args) => bench_gpt_command(args),
        Command::SpikeLab {
            preset,
            out,
            seeds,
            steps,
            data,
            arms,
            stress,
            lr_mult,
        } => {
            let arms = arms
                .map(|a| {
                    a.iter()
                        .map(|s| s.parse::<lab::Arm>())
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            let stress = stress
                .map(|p| Stress::from_toml_file(&p))
                .transpose()
                .map_err(|e| named_by_flags(e, &[("stress", "--stress")]))?;
            let preset = match preset {
                LabPreset::Default => Preset::Default,
                LabPreset::Smoke => Preset::Smoke,
                LabPreset::Full => Preset::Full,
                LabPreset::Scale => Preset::Scale,
            };
            let r = lab::run_lab(&LabOptions {
                preset,
                out,
                seeds,
                steps,
                data,
                arms,
                stress,
                lr_mult,
                progress: true,
            })
            .map_err(|e| match (lr_mult, e) {
                // The multiplier, or an lr it took out of range, is the flag's.
                (Some(_), KeelError::Config { field, message })
                    if field == "stress.lr_mult" || field.ends_with(".lr") =>
                {
                    flag_error("--lr-mult", KeelError::Config { field, message })
                }
                (_, e) => named_by_flags(e, &[("out", "--out")]),
            })?;
            println!("{}", r.table);
            println!("report: {}", r.report.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => train_command(args),
        Command::Sample {
            checkpoint,
            chars,
            temperature,
            seed,
            prompt,
        } => {
            let mut ckpt = ModelCheckpoint::read(&checkpoint_folder(&checkpoint))?;
            let mut model = keel::gpt::Gpt::<f32>::new(ckpt.config.model.clone())?;
            let params = ckpt.tensors(&model.param_specs(), "")?;
            let vocab: Vec<char> = ckpt.vocab.chars().collect();
            let prompt = match prompt {
                Some(p) => p.replace("\\n", "\n"),
                None if vocab.contains(&'\n') => "\n".to_string(),
                None => vocab.first().map(|c| c.to_string()).unwrap_or_default(),
            };
            let ids: Vec<u32> = prompt
                .chars()
                .map(|c| {
                    vocab
                        .iter()
                        .position(|&v| v == c)
                        .map(|i| i as u32)
                        .ok_or_else(|| {
                            KeelError::config(
                                "--prompt",
                                format!("character {c:?} is not in the vocabulary"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            // Streamed, a line at a time: any --chars runs in bounded memory
            // and shows its text as it comes.
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut utf8 = [0u8; 4];
            train::sample_with(&mut model, &params, &ids, chars, temperature, seed, |id| {
                let c = vocab[id as usize];
                let written = out.write_all(c.encode_utf8(&mut utf8).as_bytes());
                let flushed = written.and_then(|()| if c == '\n' { out.flush() } else { Ok(()) });
                flushed.unwrap_or_else(|e| stdout_failed(e));
                Ok(())
            })
            .map_err(|e| {
                named_by_flags(e, &[("temperature", "--temperature"), ("chars", "--chars")])
            })?;
            out.write_all(b"\n")
                .and_then(|()| out.flush())
                .unwrap_or_else(|e| stdout_failed(e));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            optimizer,
            config,
            params,
            steps,
            warmup,
            tensors,
            dtype,
            device,
            mixed_sizes,
            threads,
            json,
            model,
        } => {
            let config = match config {
                Some(text) => OptimizerConfig::from_json(&text)
                    .map_err(|e| named_by_flags(e, &[("optimizer", "--config")]))?,
                None => {
                    let mut json = serde_json::json!({ "kind": optimizer, "lr": 0.001 });
                    if optimizer == "sgd" {
                        json["momentum"] = 0.9.into();
                    }
                    OptimizerConfig::from_json(&json.to_string())
                        .map_err(|e| flag_error("--optimizer", e))?
                }
            };
            if let Some(t) = threads {
                set_threads(t)?;
            }
            if let Some(model) = model {
                let model = match model {
                    Model::GptSmall => BenchModel::GptSmall,
                };
                let r = bench::run_model_on(&config, model, steps, warmup, device.into())
                    .map_err(|e| named_by_flags(e, BENCH_FLAGS))?;
                if json {
                    print_json(&r)?;
                } else {
                    println!(
                        "{} on {} ({}): {} params in {} tensors, {} threads, {} steps, precondition frequency {}",
                        r.optimizer, r.model.name(), r.device, r.params, r.tensors, r.threads, r.steps,
                        r.precondition_frequency
                    );
                    println!("  amortized step  {:10.2} ms", r.ms_per_step);
                    if let Some(ms) = r.plain_ms {
                        println!("  plain step      {ms:10.2} ms (median)");
                    }
                    if let Some(ms) = r.precondition_ms {
                        println!("  recompute step  {ms:10.2} ms (mean)");
                    }
                    if let (Some(ms), Some(ratio)) = (r.adamw_ms_per_step, r.ratio_to_adamw) {
                        println!("  adamw step      {ms:10.2} ms (same shapes): ratio {ratio:.1}x");
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
            let target = BenchTarget {
                device: device.into(),
                mixed_sizes,
            };
            let r = bench::run_with(&opts, &target).map_err(|e| named_by_flags(e, BENCH_FLAGS))?;
            if json {
                print_json(&r)?;
            } else {
                let check = if r.grad_check {
                    ""
                } else {
                    " (on_nonfinite unchecked: no gradient scan)"
                };
                println!(
                    "{} {} on {}{check}: {} params in {} tensor(s), {} threads, median of {} step{}",
                    r.optimizer,
                    r.dtype.name(),
                    r.device,
                    r.params,
                    r.tensors,
                    r.threads,
                    r.steps,
                    if r.steps == 1 { "" } else { "s" }
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

fn train_command(a: TrainArgs) -> Result<ExitCode, KeelError> {
    let ckpt_dir = a.out.join("checkpoint");
    let dataset = |block_size: usize| match &a.data {
        Some(path) => Dataset::from_file(path, block_size),
        None => Dataset::tiny_shakespeare(block_size),
    };
    let metrics = a.out.join("metrics.jsonl");
    let out_err = |path: &std::path::Path, e: std::io::Error| {
        KeelError::config("--out", format!("{}: {e}", path.display()))
    };
    let has_checkpoint = ckpt_dir.join("model.safetensors").exists();
    let (mut trainer, data) = if a.resume {
        if !has_checkpoint {
            return Err(KeelError::config(
                "--resume",
                format!(
                    "{} holds no checkpoint to continue from (a run saves one at its end, \
                     every --checkpoint-every steps, and when stopped by Ctrl-C); pass \
                     --overwrite to start the run over",
                    ckpt_dir.display()
                ),
            ));
        }
        // The checkpoint's config decides everything but the step count.
        let (block_size, at, total) = {
            let ckpt = ModelCheckpoint::read(&ckpt_dir)?;
            (ckpt.config.model.block_size, ckpt.step, ckpt.config.steps)
        };
        if a.steps.is_none() && at >= total {
            return Err(KeelError::config(
                "--steps",
                format!(
                    "the checkpoint's run is complete ({at} of {total} steps); give more \
                     steps to continue it"
                ),
            ));
        }
        if let Some(s) = a.steps.filter(|&s| s <= at) {
            return Err(KeelError::config(
                "--steps",
                format!("the checkpoint is at step {at}; give more steps to continue, got {s}"),
            ));
        }
        let data = dataset(block_size)?;
        let mut t = Trainer::load(&ckpt_dir, &data).map_err(|e| match e {
            KeelError::Config { field, message } if field == "data" && a.data.is_none() => {
                KeelError::config(
                    field,
                    format!("{message}; pass the --data file the run was trained on"),
                )
            }
            other => other,
        })?;
        if let Some(s) = a.steps {
            let (old_steps, before) = (t.config().steps, t.config().unit_schedule().lr_at(at));
            t.set_steps(s)?;
            let after = t.config().unit_schedule().lr_at(at);
            // A decaying schedule restretched over the new length: say so
            // (the lr may rise again where the old one had decayed).
            if (after - before).abs() > 1e-9 * before.abs().max(1e-12) {
                eprintln!(
                    "note: the lr schedule now spans {s} steps: its factor at step {at} is \
                     {after:.4} (the {old_steps}-step schedule had {before:.4})"
                );
            }
        }
        cut_metrics(&metrics, t.step()).map_err(|e| out_err(&metrics, e))?;
        (t, data)
    } else {
        let config = train_config(&a)?;
        if !a.overwrite {
            let refused = |what: String| Err(KeelError::config("--out", what));
            if has_checkpoint {
                return refused(format!(
                    "{} holds a run (its checkpoint is in {}); pass --resume to continue \
                     it or --overwrite to replace it",
                    a.out.display(),
                    ckpt_dir.display()
                ));
            }
            if metrics.exists() {
                return refused(format!(
                    "{} holds the metrics of a run that stopped before saving a checkpoint \
                     ({}); pass --overwrite to replace it",
                    a.out.display(),
                    metrics.display()
                ));
            }
        }
        let data = dataset(config.model.block_size)?;
        let (given, symbols) = (config.model.vocab_size, data.vocab().len());
        if given != 0 && given != symbols {
            return Err(KeelError::config(
                "model.vocab_size",
                format!(
                    "{given}, but the data has {symbols} distinct characters; leave \
                     `vocab_size` out (the data sets it)"
                ),
            ));
        }
        let trainer = Trainer::new(config, &data)?;
        if a.overwrite {
            // The old checkpoint goes now: if the new run stopped before its
            // first save, it would otherwise be resumed under the new
            // run's metrics.
            remove_checkpoint(&ckpt_dir).map_err(|e| out_err(&ckpt_dir, e))?;
        }
        (trainer, data)
    };
    // Where the checkpoint goes is known to work before the first step.
    if ckpt_dir.exists() && !ckpt_dir.is_dir() {
        return Err(KeelError::config(
            "--out",
            format!(
                "{} is a file; the checkpoint folder goes there",
                ckpt_dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(&ckpt_dir).map_err(|e| out_err(&ckpt_dir, e))?;
    trainer.write_tensor_names(&a.out.join("tensors.json"))?;
    let total = trainer.config().steps;
    let (stop, saving) = stop_on_signals();
    // A save in progress finishes before a second Ctrl-C exits.
    let save = |trainer: &Trainer| {
        let _saving = saving.lock().unwrap_or_else(|e| e.into_inner());
        trainer.save(&ckpt_dir, &data)
    };
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps, eta {eta} {msg}",
        )
        .map_err(|e| KeelError::State(e.to_string()))?
        .progress_chars("=> "),
    );
    bar.set_position(trainer.step());
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(a.resume)
        .write(true)
        .truncate(!a.resume)
        .open(&metrics)
        .map_err(|e| out_err(&metrics, e))?;
    let first_step = trainer.step();
    let mut skipped = 0u64;
    while trainer.step() < total && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let rec = trainer.train_step(&data)?;
        skipped += u64::from(rec.skipped);
        use std::io::Write;
        let line = serde_json::to_string(&rec).map_err(|e| KeelError::State(e.to_string()))?;
        writeln!(log, "{line}").map_err(|e| out_err(&metrics, e))?;
        bar.inc(1);
        bar.set_message(format!("loss {:.3}", rec.loss));
        if let Some(v) = rec.val_loss {
            let line = format!("step {} val loss {v:.4}", rec.step + 1);
            // A hidden bar (stderr not a terminal) drops its println.
            if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
        }
        if a.checkpoint_every > 0 && trainer.step() % a.checkpoint_every == 0 {
            save(&trainer)?;
        }
    }
    bar.finish_and_clear();
    save(&trainer)?;
    let ran = trainer.step() - first_step;
    if skipped > 0 {
        eprintln!(
            "warning: {skipped} of the {ran} steps of this run changed nothing (a \
             non-finite gradient, the loss guard or a loss-scale overflow; `skipped` in {})",
            metrics.display()
        );
    }
    if trainer.step() < total {
        eprintln!(
            "stopped at step {} of {total}; checkpoint {}; continue with --resume",
            trainer.step(),
            ckpt_dir.display()
        );
        // 128 + SIGINT, as a shell reports a run stopped by Ctrl-C.
        return Ok(ExitCode::from(130));
    }
    let val = trainer.evaluate(&data)?;
    println!(
        "{} steps, final val loss {val:.4}; checkpoint {}",
        trainer.step(),
        ckpt_dir.display()
    );
    // Uniform guessing scores ln(vocabulary): a model worse than that (or
    // not finite) has diverged rather than learned.
    let uniform = (data.vocab().len() as f64).ln();
    if val.is_nan() || val > uniform {
        eprintln!(
            "warning: the final val loss is worse than a uniform guess (ln {} = \
             {uniform:.4}): the run diverged; try a lower --lr or --clip",
            data.vocab().len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes Ctrl-C (SIGINT) and SIGTERM set the returned flag, so a run stops
/// after the step in flight with a checkpoint; a second signal exits at
/// once (status 130), but only once the save holding the returned lock, if
/// any, is complete, so no checkpoint is left half written. SIGHUP, which
/// the handler also catches, stays ignored when it was (`nohup`).
fn stop_on_signals() -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::Mutex<()>>,
) {
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saving = std::sync::Arc::new(std::sync::Mutex::new(()));
    let (flag, lock) = (stop.clone(), saving.clone());
    #[cfg(unix)]
    let hangup_ignored = {
        // SAFETY: a query (no new action) into a zeroed sigaction.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        let queried = unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) };
        queried == 0 && old.sa_sigaction == libc::SIG_IGN
    };
    let handler = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            let _saved = lock.lock();
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)");
    });
    match handler {
        Err(e) => eprintln!("warning: Ctrl-C will stop the run without a checkpoint: {e}"),
        #[cfg(unix)]
        // SAFETY: restores the ignore disposition the process started with.
        Ok(()) if hangup_ignored => unsafe {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
        },
        Ok(()) => {}
    }
    (stop, saving)
}

/// The checkpoint folder `path` names: the folder itself, the run folder of
/// `keel train` holding it (`<out>`), or the model file inside it.
fn checkpoint_folder(path: &std::path::Path) -> PathBuf {
    let inside = path.join("checkpoint");
    if path.is_file() {
        path.parent().map(PathBuf::from).unwrap_or_default()
    } else if !path.join("model.safetensors").exists() && inside.join("model.safetensors").exists()
    {
        inside
    } else {
        path.to_path_buf()
    }
}

/// Removes the files of a `keel train` checkpoint from `dir` (its model file
/// first: without it the folder names no checkpoint); other files stay.
fn remove_checkpoint(dir: &std::path::Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let model = dir.join("model.safetensors");
    if model.exists() {
        std::fs::remove_file(&model)?;
    }
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        // Only the files keel writes: optimizer<k>.safetensors.
        let index = name
            .strip_prefix("optimizer")
            .and_then(|n| n.strip_suffix(".safetensors"));
        if index.is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit())) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Keeps the records of `metrics` (JSON lines) of the steps before `step`,
/// the checkpoint a run resumes from, so the resumed run's records follow
/// without repeats (a run killed after its last checkpoint wrote records
/// of steps it will now redo). A missing file stays missing.
fn cut_metrics(metrics: &std::path::Path, step: u64) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(metrics) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let before = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step")?.as_u64())
            .is_some_and(|s| s < step)
    };
    let kept: String = text
        .lines()
        .filter(|l| before(l))
        .flat_map(|l| [l, "\n"])
        .collect();
    if kept != text {
        keel::checkpoint::write_atomic(metrics, kept.as_bytes())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// The config of a new `keel train` run: the TOML file (or the default),
/// then the flags.
fn train_config(a: &TrainArgs) -> Result<TrainConfig, KeelError> {
    let mut config = match &a.config {
        // Checked once the flags are in (below).
        Some(path) => TrainConfig::parse_toml_file(path)?,
        // Vocabulary 0: the data sets it.
        None => TrainConfig::new(GptConfig::new(0, 64, 2, 4, 64), 1000),
    };
    if let Some(n) = a.n_layer {
        config.model.n_layer = n;
    }
    if let Some(c) = a.n_embd {
        config.model.n_embd = c;
    }
    if let Some(t) = a.seq_len {
        config.model.block_size = t;
    }
    config.steps = a.steps.unwrap_or(config.steps);
    if let Some(kind) = &a.optimizer {
        let old = config.optimizer.clone();
        // The kind at the config's lr, with the settings every kind has.
        let with_shared = |json: serde_json::Value| -> Result<OptimizerConfig, KeelError> {
            let mut c = OptimizerConfig::from_json(&json.to_string())
                .map_err(|e| flag_error("--optimizer", e))?;
            c.clip_global_norm = old.clip_global_norm;
            c.clip_value = old.clip_value;
            c.on_nonfinite = old.on_nonfinite;
            Ok(c)
        };
        let lr = old.lr();
        if kind == "muon" {
            // AdamW on the rest: the config's own, if it is AdamW already.
            if old.kind.name() != "adamw" {
                config.optimizer = with_shared(serde_json::json!({ "kind": "adamw", "lr": lr }))?;
            }
            config.matrix_optimizer = Some(with_shared(serde_json::json!({
                "kind": "muon", "lr": lr, "adjust_lr": "match_rms_adamw"
            }))?);
        } else {
            // Naming the config's own kind keeps its settings.
            if old.kind.name() != kind.as_str() {
                config.optimizer = with_shared(serde_json::json!({ "kind": kind, "lr": lr }))?;
            }
            config.matrix_optimizer = None;
        }
    }
    if let Some(lr) = a.lr {
        config
            .optimizer
            .set_lr(lr)
            .map_err(|e| flag_error("--lr", e))?;
        if let Some(m) = config.matrix_optimizer.as_mut() {
            m.set_lr(lr).map_err(|e| flag_error("--lr", e))?;
        }
    }
    config.batch = a.batch.unwrap_or(config.batch);
    config.grad_accum = a.grad_accum.unwrap_or(config.grad_accum);
    config.warmup_steps = a.warmup.unwrap_or(config.warmup_steps);
    config.seed = a.seed.unwrap_or(config.seed);
    config.layer_lr_decay = a.layer_lr_decay.unwrap_or(config.layer_lr_decay);
    config.eval_every = a.eval_every.unwrap_or(config.eval_every);
    if a.clip.is_some() {
        config.optimizer.clip_global_norm = a.clip;
        if let Some(m) = config.matrix_optimizer.as_mut() {
            m.clip_global_norm = a.clip;
        }
    }
    if a.ema.is_some() {
        config.ema_decay = a.ema;
    }
    if let Some(path) = &a.stress {
        Stress::from_toml_file(path)?.apply(&mut config)?;
    }
    if a.warmup.is_none() && config.warmup_steps > config.steps {
        return Err(KeelError::config(
            "--warmup",
            format!(
                "the warmup ({} steps{}) is longer than the run ({} steps); pass --warmup",
                config.warmup_steps,
                if a.config.is_some() {
                    ", from the config file"
                } else {
                    " by default"
                },
                config.steps
            ),
        ));
    }
    config.validate_before_data().map_err(|e| {
        // A bad value a flag set is named by the flag.
        let given = [
            ("block_size", "--seq-len", a.seq_len.is_some()),
            ("n_layer", "--n-layer", a.n_layer.is_some()),
            ("n_embd", "--n-embd", a.n_embd.is_some()),
            ("steps", "--steps", a.steps.is_some()),
            ("batch", "--batch", a.batch.is_some()),
            ("grad_accum", "--grad-accum", a.grad_accum.is_some()),
            ("warmup_steps", "--warmup", a.warmup.is_some()),
            ("ema_decay", "--ema", a.ema.is_some()),
            ("clip_global_norm", "--clip", a.clip.is_some()),
            (
                "layer_lr_decay",
                "--layer-lr-decay",
                a.layer_lr_decay.is_some(),
            ),
        ];
        let flags: Vec<(&str, &str)> = given
            .iter()
            .filter(|g| g.2)
            .map(|&(field, flag, _)| (field, flag))
            .collect();
        match named_by_flags(e, &flags) {
            // The flags' model has 4 heads, which no flag changes.
            KeelError::Config { field, message }
                if field == "--n-embd" && a.config.is_none() && message.contains("n_head") =>
            {
                KeelError::config(
                    field,
                    format!(
                        "{message} (the heads of the flags' model; a --config file sets n_head)"
                    ),
                )
            }
            other => other,
        }
    })?;
    Ok(config)
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

/// The library's names of the fields `keel bench` flags set.
const BENCH_FLAGS: &[(&str, &str)] = &[
    ("bench.steps", "--steps"),
    ("bench.warmup", "--warmup"),
    ("bench.params", "--params"),
    ("bench", "--params, --tensors"),
];

fn bench_gpt_command(a: GptBenchArgs) -> Result<ExitCode, KeelError> {
    if let Some(t) = a.threads {
        set_threads(t)?;
    }
    let config = GptConfig::new(a.vocab_size, a.seq_len, a.n_layer, a.n_head, a.n_embd);
    let r = gpt_bench::run(&GptBenchOptions {
        config,
        batch: a.batch,
        seq_len: a.seq_len,
        steps: a.steps,
        warmup: a.warmup,
    })
    .map_err(|e| {
        named_by_flags(
            e,
            &[
                ("bench-gpt.steps", "--steps"),
                ("bench-gpt.warmup", "--warmup"),
                ("block_size", "--seq-len"),
                ("vocab_size", "--vocab-size"),
                ("n_layer", "--n-layer"),
                ("n_head", "--n-head"),
                ("n_embd", "--n-embd"),
                ("batch", "--batch"),
            ],
        )
    })?;
    if a.json {
        print_json(&r)?;
    } else {
        println!(
            "gpt f32 B={} T={} C={} L={} H={} V={} ({} params), {} threads, median of {} step(s)",
            r.batch,
            r.seq_len,
            r.n_embd,
            r.n_layer,
            r.n_head,
            r.vocab_size,
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

/// Prints one report as a JSON line.
fn print_json(report: &impl serde::Serialize) -> Result<(), KeelError> {
    let line = serde_json::to_string(report).map_err(|e| KeelError::State(e.to_string()))?;
    println!("{line}");
    Ok(())
}

/// Sizes rayon's global pool (once per process).
fn set_threads(threads: usize) -> Result<(), KeelError> {
    // Each worker is an OS thread with its own stack: far past the cores,
    // more threads only slow the run down (or never finish starting).
    const MAX_THREADS: usize = 1024;
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(KeelError::config(
            "--threads",
            format!("{threads} is not in 1..={MAX_THREADS} (leave it out to use every core)"),
        ));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| KeelError::config("threads", e.to_string()))
}

/// A configuration error about a field that a command-line flag set names
/// the flag instead (the library names its own fields); other errors pass
/// through unchanged.
fn named_by_flags(e: KeelError, flags: &[(&str, &str)]) -> KeelError {
    match e {
        KeelError::Config { field, message } => match flags.iter().find(|(f, _)| *f == field) {
            Some((_, flag)) => KeelError::config(*flag, message),
            None => KeelError::Config { field, message },
        },
        other => other,
    }
}

/// An error about a command-line flag: a configuration error inside names
/// the flag, with the config field it landed in.
fn flag_error(flag: &str, e: KeelError) -> KeelError {
    match e {
        KeelError::Config { field, message } => {
            KeelError::config(flag, format!("{message} (as `{field}`)"))
        }
        other => KeelError::config(flag, other.to_string()),
    }
}
