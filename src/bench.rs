//! Step timing for `keel bench`: the median time of a CPU step, the bytes it
//! moves, and the same traffic through a trivial loop (the memory floor).
//!
//! The floor loop reads and writes exactly the optimizer's minimum streams
//! (parameter, gradient and state read once; parameter and state written
//! once) with the same chunking and threads, and does next to no arithmetic:
//! no implementation of the step can beat it, so `floor_ms / ms_per_step` is
//! how close keel gets to the machine's limit.

use std::time::Instant;

use half::bf16;
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::cpu::CHUNK;
use crate::config::{OptimizerConfig, OptimizerKind};
use crate::error::{KeelError, Result};
use crate::group::ParamGroup;
use crate::optim::{bytes_per_param, state_bytes, state_slots, Optimizer};
use crate::tensor::ParamSpec;
use crate::{CpuOptimizer, MixedPrecisionOptimizer, Rounding};

/// Parameter storage of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchDtype {
    /// f32 parameters and gradients.
    F32,
    /// bf16 parameters and gradients, f32 master weights and state.
    Bf16,
}

impl BenchDtype {
    /// The name `keel bench --dtype` takes: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            BenchDtype::F32 => "f32",
            BenchDtype::Bf16 => "bf16",
        }
    }
}

/// Where `keel bench` runs the step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchDevice {
    /// The CPU backend.
    #[default]
    Cpu,
    /// The CUDA backend (feature `cuda`); an error without a device.
    Cuda,
    /// CUDA when a device is available, else the CPU.
    Auto,
}

/// Where, and over which tensor sizes, [`run_with`] times the step.
#[derive(Debug, Clone, Copy, Default)]
pub struct BenchTarget {
    /// The device.
    pub device: BenchDevice,
    /// Split the parameters into tensors of mixed sizes (a spread of 1 to
    /// 2048 relative sizes, like a model's matrices, norms and biases)
    /// instead of equal ones.
    pub mixed_sizes: bool,
}

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The optimizer.
    pub config: OptimizerConfig,
    /// Total parameters.
    pub params: usize,
    /// Number of tensors the parameters are split into (equal sizes).
    pub tensors: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Parameter storage.
    pub dtype: BenchDtype,
}

/// Timing results (all times are medians over the timed steps).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Optimizer kind.
    pub optimizer: String,
    /// Whether the step read the gradients before writing (the non-finite
    /// check); false for [`crate::NonFinitePolicy::Unchecked`] where it
    /// skips that pass.
    pub grad_check: bool,
    /// Where it ran: `cpu`, or `cuda:<device name>`.
    pub device: String,
    /// Total parameters.
    pub params: usize,
    /// Tensors.
    pub tensors: usize,
    /// Parameter storage.
    pub dtype: BenchDtype,
    /// rayon worker threads.
    pub threads: usize,
    /// Timed steps.
    pub steps: usize,
    /// Median milliseconds per step.
    pub ms_per_step: f64,
    /// Fastest step, milliseconds.
    pub min_ms: f64,
    /// Bytes keel moves per parameter (every pass counted).
    pub bytes_per_param: usize,
    /// The minimum bytes per parameter any implementation moves.
    pub min_bytes_per_param: usize,
    /// `bytes_per_param * params / ms_per_step`, in GB/s.
    pub gb_per_s: f64,
    /// Median milliseconds of the floor loop (the minimum traffic, no math).
    pub floor_ms: f64,
    /// The floor loop's GB/s.
    pub floor_gb_per_s: f64,
    /// `floor_ms / ms_per_step` in percent.
    pub pct_of_floor: f64,
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// Deterministic pseudo-random values in [-scale, scale).
pub(crate) fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn sizes(params: usize, tensors: usize) -> Vec<usize> {
    let base = params / tensors;
    let mut v = vec![base; tensors];
    v[tensors - 1] += params - base * tensors;
    v
}

/// `tensors` sizes summing to `params`: equal, or (mixed) proportional to
/// `2^(i mod 12)`, each at least 1.
pub(crate) fn size_list(params: usize, tensors: usize, mixed: bool) -> Vec<usize> {
    if !mixed {
        return sizes(params, tensors);
    }
    let weight = |i: usize| 1usize << (i % 12);
    let total: usize = (0..tensors).map(weight).sum();
    let mut v: Vec<usize> = (0..tensors)
        .map(|i| ((params as u128 * weight(i) as u128 / total as u128) as usize).max(1))
        .collect();
    let used: usize = v.iter().sum();
    // Rounding leaves a remainder (or, with many size-1 tensors, an excess):
    // settle it on the largest tensor.
    let big = (0..tensors).max_by_key(|&i| v[i]).unwrap_or(0);
    v[big] = (v[big] + params).saturating_sub(used).max(1);
    v
}

/// Times the step on `target.device` (see [`BenchDevice`]); [`run`] is the
/// CPU with equal tensor sizes.
pub fn run_with(opts: &BenchOptions, target: &BenchTarget) -> Result<BenchReport> {
    let cuda = match target.device {
        BenchDevice::Cpu => false,
        BenchDevice::Cuda => true,
        BenchDevice::Auto => cuda_usable(),
    };
    if cuda {
        return run_cuda(opts, target.mixed_sizes);
    }
    run_cpu(opts, target.mixed_sizes)
}

#[cfg(feature = "cuda")]
fn cuda_usable() -> bool {
    crate::backend::cuda::cuda_available(0).is_ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn run_cuda(opts: &BenchOptions, mixed: bool) -> Result<BenchReport> {
    crate::backend::cuda::bench::run(opts, &size_list(opts.params, opts.tensors, mixed))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &BenchOptions, _: bool) -> Result<BenchReport> {
    Err(KeelError::Cuda(
        "this keel was built without the `cuda` feature (cargo build --features cuda)".into(),
    ))
}

/// Times `step` and `floor` alternately in runs of [`RUN`] (so both see the
/// same drifts in machine load, while each run keeps its own working set in
/// cache where it fits): warm-up, then `steps` of each.
fn time_alternating(
    opts: &BenchOptions,
    floor: &mut impl FnMut(),
    mut step: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    for _ in 0..opts.warmup {
        step()?;
        floor();
    }
    let ms = |t0: Instant| t0.elapsed().as_secs_f64() * 1e3;
    let (mut steps, mut floors) = (
        Vec::with_capacity(opts.steps),
        Vec::with_capacity(opts.steps),
    );
    while steps.len() < opts.steps {
        let run = RUN.min(opts.steps - steps.len());
        for _ in 0..run {
            let t0 = Instant::now();
            step()?;
            steps.push(ms(t0));
        }
        for _ in 0..run {
            let t0 = Instant::now();
            floor();
            floors.push(ms(t0));
        }
    }
    Ok((steps, floors))
}

/// Columns of the benchmark matrices of matrix optimizers (Muon).
const MATRIX_COLS: usize = 1024;

/// Consecutive repetitions of the step (then of the floor) in the alternation.
const RUN: usize = 5;

/// The floor loop for `slots` state buffers: reads `p, g, state`, writes
/// `p, state`, with trivial arithmetic.
fn floor_step(p: &mut [Vec<f32>], g: &[Vec<f32>], state: &mut [Vec<Vec<f32>>]) {
    let mut work = Vec::new();
    for ((p, g), st) in p.iter_mut().zip(g).zip(state.iter_mut()) {
        let mut slots = st.iter_mut();
        let s0 = slots.next();
        let s1 = slots.next();
        let mut s0 = s0
            .map(|v| v.chunks_mut(CHUNK).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter();
        let mut s1 = s1
            .map(|v| v.chunks_mut(CHUNK).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter();
        for (pc, gc) in p.chunks_mut(CHUNK).zip(g.chunks(CHUNK)) {
            work.push((pc, gc, s0.next(), s1.next()));
        }
    }
    work.into_par_iter()
        .for_each(|(p, g, s0, s1)| match (s0, s1) {
            (Some(a), Some(b)) => {
                for (((p, g), a), b) in p.iter_mut().zip(g).zip(a.iter_mut()).zip(b.iter_mut()) {
                    *a = 0.5 * *a + *g;
                    *b = 0.5 * *b + *g;
                    *p -= 1e-6 * (*a + *b);
                }
            }
            (Some(a), None) => {
                for ((p, g), a) in p.iter_mut().zip(g).zip(a.iter_mut()) {
                    *a = 0.5 * *a + *g;
                    *p -= 1e-6 * *a;
                }
            }
            _ => {
                for (p, g) in p.iter_mut().zip(g) {
                    *p -= 1e-6 * *g;
                }
            }
        });
}

/// Times the optimizer step and the floor loop on the same sizes (CPU).
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    run_cpu(opts, false)
}

/// Bytes per parameter a step of `opts` moves and the least any step could
/// ([`bytes_per_param`]), on either backend; `scans` says whether the step
/// reads the gradient first (the CUDA step always does).
pub(crate) fn step_bytes(opts: &BenchOptions, scans: bool) -> (usize, usize) {
    let (mut bytes, min_bytes) = bytes_per_param(&opts.config, 4);
    let counted_scan = !opts.config.skips_scan();
    if scans && !counted_scan {
        bytes += 4;
    }
    if opts.dtype == BenchDtype::Bf16 {
        // The gradient is read at 2 bytes instead of 4 (twice with the scan);
        // the bf16 copy of the parameter is written (2 bytes).
        let grad_reads = 1 + usize::from(scans);
        bytes = bytes - 2 * grad_reads + 2;
    }
    (bytes, min_bytes)
}

/// Checks the sizes of a benchmark.
/// The most timed steps a benchmark takes: each one's time is kept for the
/// median, and a million steps is far past any useful median.
pub const MAX_TIMED_STEPS: usize = 1_000_000;

/// Checks a benchmark's timed step count (`field` names it in the error).
pub(crate) fn check_steps(field: &str, steps: usize) -> Result<()> {
    if !(1..=MAX_TIMED_STEPS).contains(&steps) {
        return Err(KeelError::config(
            field,
            format!("must be in 1..={MAX_TIMED_STEPS}, got {steps}"),
        ));
    }
    Ok(())
}

/// Checks a benchmark's warm-up step count (`field` names it in the error):
/// 0 is fine, more than [`MAX_TIMED_STEPS`] is a typo.
pub(crate) fn check_warmup(field: &str, warmup: usize) -> Result<()> {
    if warmup > MAX_TIMED_STEPS {
        return Err(KeelError::config(
            field,
            format!("must be at most {MAX_TIMED_STEPS}, got {warmup}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_options(opts: &BenchOptions) -> Result<()> {
    if opts.params == 0 || opts.tensors == 0 || opts.tensors > opts.params {
        return Err(KeelError::config(
            "bench",
            format!(
                "need 0 < tensors <= params, got {} tensors, {} params",
                opts.tensors, opts.params
            ),
        ));
    }
    check_steps("bench.steps", opts.steps)?;
    check_warmup("bench.warmup", opts.warmup)?;
    // The per-tensor lists (sizes, names and shapes) come before the buffers.
    let per_tensor = std::mem::size_of::<ParamSpec>() as u128 + 64;
    crate::memory::ensure_fits(
        &format!("the list of {} tensors", opts.tensors),
        per_tensor * opts.tensors as u128,
    )?;
    opts.config.validate()
}

/// Bytes a CPU benchmark of `opts` over `specs` holds: parameters,
/// gradients, the optimizer's state, the floor loop's state buffers, and for
/// bf16 the bf16 copies and the f32 master weights.
fn host_bytes(opts: &BenchOptions, specs: &[ParamSpec]) -> u128 {
    let n = opts.params as u128;
    let floor_slots = state_slots(&opts.config.kind).len() as u128;
    let mut bytes = (4 + 4 + 4 * floor_slots) * n;
    if opts.dtype == BenchDtype::Bf16 {
        bytes += (2 + 2 + 4) * n;
    }
    specs
        .iter()
        .map(|s| state_bytes(&opts.config.kind, s, 4))
        .fold(bytes, u128::saturating_add)
}

fn run_cpu(opts: &BenchOptions, mixed: bool) -> Result<BenchReport> {
    check_options(opts)?;
    let sizes = size_list(opts.params, opts.tensors, mixed);
    // Matrix optimizers get [n / MATRIX_COLS, MATRIX_COLS] matrices (a long
    // vector would give Shampoo one D x D factor per D elements).
    let matrix = matches!(
        opts.config.kind,
        OptimizerKind::Muon(_) | OptimizerKind::Shampoo(_)
    );
    if matrix && sizes.iter().any(|n| n % MATRIX_COLS != 0) {
        return Err(KeelError::config(
            "bench.params",
            format!(
                "{} times matrices of {MATRIX_COLS} columns: every tensor's size (params / tensors, or each of --mixed-sizes) must be a multiple of {MATRIX_COLS}",
                opts.config.kind.name()
            ),
        ));
    }
    let specs: Vec<ParamSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| match matrix {
            true => ParamSpec::new(format!("t{i}"), [n / MATRIX_COLS, MATRIX_COLS]),
            false => ParamSpec::new(format!("t{i}"), [n]),
        })
        .collect();
    crate::memory::ensure_fits(
        &format!("a benchmark of {} parameters", opts.params),
        host_bytes(opts, &specs),
    )?;
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| fill(n, 2 * i as u64 + 1, 1.0))
        .collect();
    let grads: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| fill(n, 2 * i as u64 + 2, 0.01))
        .collect();

    // The step and the floor loop alternate, so that drifts in machine load
    // hit both alike and their ratio stays meaningful on a noisy machine. The
    // floor updates the same parameters with the same gradients, through its
    // own state buffers.
    let slots = state_slots(&opts.config.kind).len();
    let mut floor_state: Vec<Vec<Vec<f32>>> = sizes
        .iter()
        .map(|&n| (0..slots).map(|_| vec![0.0f32; n]).collect())
        .collect();
    let params = std::cell::RefCell::new(params);
    let mut floor = || floor_step(&mut params.borrow_mut(), &grads, &mut floor_state);
    let (times, floor_times) = match opts.dtype {
        BenchDtype::F32 => {
            let mut opt = CpuOptimizer::<f32>::new(opts.config.clone(), specs)?;
            let g: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
            time_alternating(opts, &mut floor, || {
                let mut params = params.borrow_mut();
                let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
                opt.step(&mut p, &g).map(|_| ())
            })?
        }
        BenchDtype::Bf16 => {
            let mut pb: Vec<Vec<bf16>> = params
                .borrow()
                .iter()
                .map(|p| p.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect();
            let gb: Vec<Vec<bf16>> = grads
                .iter()
                .map(|g| g.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect();
            let init: Vec<&[bf16]> = pb.iter().map(|p| &p[..]).collect();
            let groups = vec![ParamGroup::all(&specs)];
            let mut opt = MixedPrecisionOptimizer::new(
                opts.config.clone(),
                specs,
                groups,
                &init,
                Rounding::Nearest,
            )?;
            let g: Vec<&[bf16]> = gb.iter().map(|g| &g[..]).collect();
            time_alternating(opts, &mut floor, || {
                let mut p: Vec<&mut [bf16]> = pb.iter_mut().map(|p| &mut p[..]).collect();
                opt.step(&mut p, &g).map(|_| ())
            })?
        }
    };

    let (bytes, min_bytes) = step_bytes(opts, !opts.config.skips_scan());
    let ms = median(times.clone());
    let floor_ms = median(floor_times);
    let gb = |b: usize, ms: f64| b as f64 * opts.params as f64 / (ms * 1e-3) / 1e9;
    Ok(BenchReport {
        optimizer: opts.config.kind.name().to_string(),
        grad_check: !opts.config.skips_scan(),
        device: "cpu".to_string(),
        params: opts.params,
        tensors: opts.tensors,
        dtype: opts.dtype,
        threads: rayon::current_num_threads(),
        steps: opts.steps,
        ms_per_step: ms,
        min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
        bytes_per_param: bytes,
        min_bytes_per_param: min_bytes,
        gb_per_s: gb(bytes, ms),
        floor_ms,
        floor_gb_per_s: gb(min_bytes, floor_ms),
        pct_of_floor: 100.0 * floor_ms / ms,
    })
}

/// A realistic tensor set for `keel bench --model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchModel {
    /// The parameter shapes of a 6-layer, 384-wide GPT-2 with vocabulary 65
    /// and context 256 (10.8M parameters, 76 tensors; the head is tied).
    GptSmall,
}

impl BenchModel {
    /// The model's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            BenchModel::GptSmall => "gpt-small",
        }
    }

    /// The parameter shapes, GPT-2 names (torch `Linear` weights `[out, in]`).
    pub fn specs(&self) -> Vec<ParamSpec> {
        let (vocab, context, layers, c) = match self {
            BenchModel::GptSmall => (65, 256, 6, 384),
        };
        let mut specs = vec![
            ParamSpec::new("transformer.wte.weight", [vocab, c]),
            ParamSpec::new("transformer.wpe.weight", [context, c]),
        ];
        for l in 0..layers {
            let h = |name: &str| format!("transformer.h.{l}.{name}");
            specs.extend([
                ParamSpec::new(h("ln_1.weight"), [c]),
                ParamSpec::new(h("ln_1.bias"), [c]),
                ParamSpec::new(h("attn.c_attn.weight"), [3 * c, c]),
                ParamSpec::new(h("attn.c_attn.bias"), [3 * c]),
                ParamSpec::new(h("attn.c_proj.weight"), [c, c]),
                ParamSpec::new(h("attn.c_proj.bias"), [c]),
                ParamSpec::new(h("ln_2.weight"), [c]),
                ParamSpec::new(h("ln_2.bias"), [c]),
                ParamSpec::new(h("mlp.c_fc.weight"), [4 * c, c]),
                ParamSpec::new(h("mlp.c_fc.bias"), [4 * c]),
                ParamSpec::new(h("mlp.c_proj.weight"), [c, 4 * c]),
                ParamSpec::new(h("mlp.c_proj.bias"), [c]),
            ]);
        }
        specs.push(ParamSpec::new("transformer.ln_f.weight", [c]));
        specs.push(ParamSpec::new("transformer.ln_f.bias", [c]));
        specs
    }
}

/// Timing of an optimizer on a model's tensor set.
#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    /// Optimizer kind (`muon` means Muon on the hidden matrices and AdamW on
    /// the rest).
    pub optimizer: String,
    /// The tensor set.
    pub model: BenchModel,
    /// Total parameters.
    pub params: usize,
    /// Tensors.
    pub tensors: usize,
    /// Where it ran: `cpu`, or `cuda:<device name>`.
    pub device: String,
    /// rayon worker threads (the CPU's; 0 on CUDA).
    pub threads: usize,
    /// Timed consecutive steps (a multiple of the precondition frequency).
    pub steps: usize,
    /// Steps between preconditioner recomputations (1 for first-order
    /// optimizers and Muon).
    pub precondition_frequency: u64,
    /// Mean milliseconds per step over the timed steps: the cost amortized
    /// over `precondition_frequency`.
    pub ms_per_step: f64,
    /// Median milliseconds of the steps that did not recompute
    /// preconditioners (every step at frequency 1).
    pub plain_ms: Option<f64>,
    /// Mean milliseconds of the steps that recomputed them (frequency > 1).
    pub precondition_ms: Option<f64>,
    /// AdamW's mean milliseconds per step on the same shapes, timed right
    /// after (absent when the optimizer is AdamW).
    pub adamw_ms_per_step: Option<f64>,
    /// `ms_per_step / adamw_ms_per_step`.
    pub ratio_to_adamw: Option<f64>,
}

/// Is a hidden matrix of a GPT (what Muon updates in the usual setup: 2-D,
/// not an embedding).
pub fn is_hidden_matrix(spec: &ParamSpec) -> bool {
    spec.shape.len() == 2 && !spec.name.contains(".wte.") && !spec.name.contains(".wpe.")
}

/// One optimizer step over a whole model's tensors (parameters, gradients
/// and optimizers owned by the closure).
pub(crate) type ModelStepper = Box<dyn FnMut() -> Result<()>>;

/// The optimizers of a model bench: each config with the indices of the
/// tensors it updates.
pub(crate) type ModelParts = Vec<(OptimizerConfig, Vec<usize>)>;

/// Times `steps` consecutive optimizer steps (rounded up to a multiple of
/// the precondition frequency) on `model`'s shapes with fixed pseudo-random
/// gradients, after `warmup` steps and after preconditioning has started,
/// on the CPU.
pub fn run_model(
    config: &OptimizerConfig,
    model: BenchModel,
    steps: usize,
    warmup: usize,
) -> Result<ModelBenchReport> {
    run_model_on(config, model, steps, warmup, BenchDevice::Cpu)
}

/// [`run_model`] on `device` (CUDA needs feature `cuda` and a device; AdamW
/// for the ratio runs on the same device).
pub fn run_model_on(
    config: &OptimizerConfig,
    model: BenchModel,
    steps: usize,
    warmup: usize,
    device: BenchDevice,
) -> Result<ModelBenchReport> {
    check_steps("bench.steps", steps)?;
    check_warmup("bench.warmup", warmup)?;
    config.validate()?;
    let specs = model.specs();
    let (frequency, start) = match &config.kind {
        OptimizerKind::Shampoo(c) => (c.precondition_frequency, c.start_step()),
        OptimizerKind::Soap(c) => (c.precondition_frequency, c.start_step()),
        _ => (1, 1),
    };
    let recomputes = |t: u64| match &config.kind {
        OptimizerKind::Shampoo(c) => c.recomputes(t),
        OptimizerKind::Soap(c) => c.recomputes(t),
        _ => false,
    };
    let params: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| fill(s.numel(), 2 * i as u64 + 1, 0.02))
        .collect();
    let grads: Vec<Vec<f32>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| fill(s.numel(), 2 * i as u64 + 2, 0.01))
        .collect();
    // Muon's usual setup: Muon for hidden matrices, AdamW for the rest.
    let parts: ModelParts = match &config.kind {
        OptimizerKind::Muon(_) => {
            let (hidden, rest): (Vec<usize>, Vec<usize>) =
                (0..specs.len()).partition(|&i| is_hidden_matrix(&specs[i]));
            let adamw = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.001}"#)?;
            vec![(config.clone(), hidden), (adamw, rest)]
        }
        _ => vec![(config.clone(), (0..specs.len()).collect())],
    };
    let cuda = match device {
        BenchDevice::Cpu => false,
        BenchDevice::Cuda => true,
        BenchDevice::Auto => cuda_usable(),
    };
    let (mut step, device_name) = if cuda {
        cuda_model_stepper(parts, &specs, params, grads)?
    } else {
        (
            cpu_model_stepper(parts, &specs, params, grads)?,
            "cpu".to_string(),
        )
    };
    let mut t = 0u64;
    while (t as usize) < warmup || t + 1 < start {
        step()?;
        t += 1;
    }
    let steps = steps.div_ceil(frequency as usize) * frequency as usize;
    let (mut plain, mut precondition, mut total) = (Vec::new(), Vec::new(), 0.0);
    for _ in 0..steps {
        t += 1;
        let t0 = Instant::now();
        // Every step reads its statistics back: on CUDA too it has finished
        // when it returns.
        step()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        total += ms;
        match recomputes(t) && frequency > 1 {
            true => precondition.push(ms),
            false => plain.push(ms),
        }
    }
    // AdamW on the same shapes, for the ratio.
    let adamw_ms_per_step = match config.kind {
        OptimizerKind::AdamW(_) => None,
        _ => {
            let adamw = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.001}"#)?;
            Some(run_model_on(&adamw, model, steps.max(10), 2, device)?.ms_per_step)
        }
    };
    let ms_per_step = total / steps as f64;
    Ok(ModelBenchReport {
        optimizer: config.kind.name().to_string(),
        model,
        params: specs.iter().map(ParamSpec::numel).sum(),
        tensors: specs.len(),
        threads: if cuda {
            0
        } else {
            rayon::current_num_threads()
        },
        device: device_name,
        steps,
        precondition_frequency: frequency,
        ms_per_step,
        adamw_ms_per_step,
        ratio_to_adamw: adamw_ms_per_step.map(|a| ms_per_step / a),
        plain_ms: (!plain.is_empty()).then(|| median(plain)),
        precondition_ms: (!precondition.is_empty())
            .then(|| precondition.iter().sum::<f64>() / precondition.len() as f64),
    })
}

/// The CPU optimizers of a model bench, stepping `params` with `grads`.
fn cpu_model_stepper(
    parts: ModelParts,
    specs: &[ParamSpec],
    mut params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
) -> Result<ModelStepper> {
    let mut optimizers = parts
        .iter()
        .map(|(c, idx)| {
            let s = idx.iter().map(|&i| specs[i].clone()).collect();
            CpuOptimizer::<f32>::new(c.clone(), s)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Box::new(move || {
        let mut slots: Vec<Option<&mut Vec<f32>>> = params.iter_mut().map(Some).collect();
        for ((_, idx), opt) in parts.iter().zip(optimizers.iter_mut()) {
            let mut p: Vec<&mut [f32]> = idx
                .iter()
                .map(|&i| &mut slots[i].take().expect("each tensor in one part")[..])
                .collect();
            let g: Vec<&[f32]> = idx.iter().map(|&i| &grads[i][..]).collect();
            opt.step(&mut p, &g)?;
        }
        Ok(())
    }))
}

#[cfg(feature = "cuda")]
fn cuda_model_stepper(
    parts: ModelParts,
    specs: &[ParamSpec],
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
) -> Result<(ModelStepper, String)> {
    crate::backend::cuda::bench::model_stepper(parts, specs, params, grads)
}

#[cfg(not(feature = "cuda"))]
fn cuda_model_stepper(
    _parts: ModelParts,
    _specs: &[ParamSpec],
    _params: Vec<Vec<f32>>,
    _grads: Vec<Vec<f32>>,
) -> Result<(ModelStepper, String)> {
    Err(KeelError::Cuda(
        "this keel was built without the `cuda` feature".into(),
    ))
}
