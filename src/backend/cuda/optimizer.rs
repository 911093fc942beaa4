//! [`CudaOptimizer`] and [`CudaMixedPrecisionOptimizer`]: the step of the CPU
//! backend as a fixed sequence of kernel launches on one stream (Muon and
//! Shampoo hand their matrix work to [`MatrixEngine`] after the scan).
//!
//! A step is
//! 1. `keel_scan` (one block per chunk) → `keel_tensor_sums` (one block per
//!    tensor) → `keel_global_finalize` (one block): per-tensor and global
//!    gradient norms, the non-finite flag and the clip factor (and LARS's
//!    trust ratios), left in device memory;
//! 2. the update: one fused launch over all tensors (sgd, adam, adamw, lion,
//!    lars), or pass A, per-tensor norms and pass B (lamb, adamw with
//!    `update_clip_rms`); every update kernel returns early when the skip
//!    flag is set, so a non-finite gradient writes nothing;
//! 3. `keel_tensor_sums` for `||p||` and `||Δp||`, then one read-back of the
//!    statistics (the step's only host synchronization).
//!
//! Coefficients are computed on the host in f64 and rounded once to f32, as
//! the CPU backend does, and the kernels are compiled without FMA
//! contraction: away from clipping and trust ratios (whose norms are summed
//! in a different order) a CUDA f32 step rounds exactly like a CPU f32 step.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};
use half::bf16;

use super::kernels::{self, Kernels};
use super::matrix::{GradPrep, MatrixEngine, TensorBuffers};
use super::{driver_error, open, DeviceInfo};
use crate::backend::cpu::{build_state_dict, check_buffer_lens, check_muon_shapes, read_state};
use crate::backend::mixed::{read_master, save_master, Rounding};
use crate::checkpoint::{StateData, StateDict};
use crate::config::{NonFinitePolicy, OptimizerConfig, OptimizerKind};
use crate::error::{KeelError, Result};
use crate::group::{assign_groups, ParamGroup};
use crate::optim::{initial_state, state_slots, Optimizer};
use crate::stats::{SkipReason, StepStats, TensorStats};
use crate::tensor::ParamSpec;

/// Elements per chunk (one thread block) of the chunk table.
const CHUNK: usize = 1 << 14;
/// Threads per block of the chunked kernels (`KEEL_BLOCK` in common.cuh).
const BLOCK: u32 = 256;
/// Layout constants shared with `kernels/common.cuh`.
const COEF_LEN: usize = 12;
const T_LEN: usize = 8;
const P_LEN: usize = 4;
const G_LEN: usize = 4;
const PTRS_LEN: usize = 5;
/// `keel_tensor_sums` modes.
const SUMS_STORE: i32 = 0;
const SUMS_LAMB: i32 = 1;
const SUMS_UCLIP: i32 = 2;
/// Where the trust ratio or update clip factor goes in the coefficients.
const ADAM_LR: i32 = 9;
const LARS_LR: i32 = 1;
/// Per-tensor statistics slots.
const T_PARAM_SQ: i32 = 4;

/// The state and buffers both CUDA optimizers share.
struct Core {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    info: DeviceInfo,
    config: OptimizerConfig,
    specs: Vec<ParamSpec>,
    groups: Vec<ParamGroup>,
    group_of: Vec<usize>,
    /// `state[tensor][slot]`, slots as [`state_slots`] names them.
    state: Vec<Vec<CudaSlice<f32>>>,
    /// The length of each state buffer (Shampoo's factor slots are not the
    /// parameter's size; empty buffers hold one unused element).
    state_lens: Vec<Vec<usize>>,
    /// Muon's and Shampoo's GEMMs and eigendecompositions (`None` for the
    /// elementwise optimizers).
    matrix: Option<MatrixEngine>,
    step: u64,
    nchunks: usize,
    // Buffers only kernels read (through `addr`), held so they live as long
    // as the optimizer. Per chunk: `tensor | len << 32`, then the offset.
    _chunks: CudaSlice<u64>,
    /// Tensor `i`'s chunks are `chunk_start[i]..chunk_start[i + 1]`.
    _chunk_start: CudaSlice<i32>,
    /// The step's host inputs, uploaded in one copy: per tensor the five
    /// buffer addresses, then the f32 coefficients (two per word), then the
    /// f64 per-tensor inputs.
    inputs: CudaSlice<u64>,
    /// Per-chunk partial sums (four doubles per chunk).
    _partials: CudaSlice<f64>,
    /// Per-tensor statistics, then the global scalars: read back in one copy.
    outputs: CudaSlice<f64>,
    /// The device addresses of the buffers above, passed to kernels as plain
    /// values: they live on this stream only, so cudarc's per-argument event
    /// tracking (microseconds per launch) buys nothing for them.
    addr: Addrs,
}

/// Device addresses of [`Core`]'s own buffers.
#[derive(Debug, Clone, Copy)]
struct Addrs {
    chunks: u64,
    chunk_start: u64,
    ptrs: u64,
    coef: u64,
    tparam: u64,
    partials: u64,
    tstats: u64,
    global: u64,
}

/// A device copy of `host`; at least one element, as the driver refuses
/// empty allocations (tensors with no elements keep a one-element buffer that
/// no kernel touches).
fn to_device(stream: &Arc<CudaStream>, host: &[f32]) -> Result<CudaSlice<f32>> {
    if host.is_empty() {
        stream.alloc_zeros::<f32>(1).map_err(cuda_err)
    } else {
        stream.clone_htod(host).map_err(cuda_err)
    }
}

/// The first `len` elements of `dev` on the host (see [`to_device`]).
fn to_host(stream: &Arc<CudaStream>, dev: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
    let mut v = stream.clone_dtoh(dev).map_err(cuda_err)?;
    v.truncate(len);
    Ok(v)
}

/// Words of [`Core::inputs`] for `n` tensors.
fn input_words(n: usize) -> usize {
    n * PTRS_LEN + (n * COEF_LEN).div_ceil(2) + n * P_LEN
}

/// The device address of `slice` (valid while it lives).
fn addr<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (ptr, _sync) = slice.device_ptr(stream);
    ptr
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaOptimizer")
            .field("device", &self.info)
            .field("config", &self.config)
            .field("specs", &self.specs)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// The buffers of one step, as device addresses.
struct StepBuffers {
    /// Per tensor: p, g, s0, s1, bf16 out.
    ptrs: Vec<u64>,
    bf16_grads: bool,
    rounding: Option<Rounding>,
}

fn cuda_err(e: cudarc::driver::DriverError) -> KeelError {
    driver_error(e)
}

fn launch_cfg(blocks: usize, threads: u32) -> Result<LaunchConfig> {
    let grid = u32::try_from(blocks)
        .map_err(|_| KeelError::Cuda(format!("{blocks} blocks exceed one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Core {
    fn new(
        config: OptimizerConfig,
        specs: Vec<ParamSpec>,
        groups: Vec<ParamGroup>,
        ordinal: usize,
    ) -> Result<Self> {
        config.validate()?;
        if matches!(config.kind, OptimizerKind::Soap(_)) {
            return Err(KeelError::Cuda(format!(
                "{} is not yet supported on cuda; use the CPU backend for it",
                config.kind.name()
            )));
        }
        let group_of = assign_groups(&specs, &groups)?;
        check_muon_shapes(&config.kind, &specs)?;
        let (ctx, info) = open(ordinal)?;
        let kernels = kernels::load(&ctx, &info.arch)?;
        let stream = ctx.default_stream();

        let mut table = Vec::new();
        let mut chunk_start = vec![0i32];
        for (i, spec) in specs.iter().enumerate() {
            let n = spec.checked_numel().ok_or_else(|| {
                KeelError::shape(
                    &spec.name,
                    format!(
                        "shape {:?} has more elements than fit in memory",
                        spec.shape
                    ),
                )
            })?;
            let tensor = u32::try_from(i)
                .map_err(|_| KeelError::Cuda("too many tensors for one optimizer".into()))?;
            for offset in (0..n).step_by(CHUNK) {
                let len = (n - offset).min(CHUNK) as u64;
                table.push(tensor as u64 | len << 32);
                table.push(offset as u64);
            }
            let count = i32::try_from(table.len() / 2)
                .map_err(|_| KeelError::Cuda("too many chunks for one optimizer".into()))?;
            chunk_start.push(count);
        }
        let nchunks = table.len() / 2;
        let n = specs.len();
        let alloc_f64 = |len: usize| stream.alloc_zeros::<f64>(len.max(1)).map_err(cuda_err);
        let mut state = Vec::with_capacity(n);
        let mut state_lens = Vec::with_capacity(n);
        for spec in &specs {
            // Zeros, except Shampoo's roots and SOAP's bases, which start as
            // identities.
            let initial: Vec<Vec<f32>> = initial_state(&config.kind, spec)?;
            let mut slots = Vec::with_capacity(initial.len());
            for buf in &initial {
                slots.push(to_device(&stream, buf)?);
            }
            state_lens.push(initial.iter().map(Vec::len).collect());
            state.push(slots);
        }
        let matrix = MatrixEngine::new(&config.kind, &specs, &stream, &kernels)?;
        table.resize(table.len().max(2), 0);
        let chunks = stream.clone_htod(&table).map_err(cuda_err)?;
        let chunk_start = stream.clone_htod(&chunk_start).map_err(cuda_err)?;
        let inputs = stream
            .alloc_zeros::<u64>(input_words(n).max(1))
            .map_err(cuda_err)?;
        let partials = alloc_f64(nchunks * 4)?;
        let outputs = alloc_f64(n * T_LEN + G_LEN)?;
        let (input_base, output_base) = (addr(&inputs, &stream), addr(&outputs, &stream));
        let coef = input_base + 8 * (n * PTRS_LEN) as u64;
        let addr = Addrs {
            chunks: addr(&chunks, &stream),
            chunk_start: addr(&chunk_start, &stream),
            ptrs: input_base,
            coef,
            tparam: coef + 8 * (n * COEF_LEN).div_ceil(2) as u64,
            partials: addr(&partials, &stream),
            tstats: output_base,
            global: output_base + 8 * (n * T_LEN) as u64,
        };
        Ok(Core {
            _chunks: chunks,
            _chunk_start: chunk_start,
            inputs,
            _partials: partials,
            outputs,
            addr,
            nchunks,
            ctx,
            stream,
            kernels,
            info,
            config,
            specs,
            groups,
            group_of,
            state,
            state_lens,
            matrix,
            step: 0,
        })
    }

    /// Per-tensor host inputs and f32 coefficients for step `t`.
    fn coefficients(&self, t: u64) -> (Vec<f64>, Vec<f32>) {
        let kind = &self.config.kind;
        let (lr, wd) = (kind.lr(), kind.weight_decay());
        let n = self.specs.len();
        let mut tparam = Vec::with_capacity(n * P_LEN);
        let mut coef = vec![0f32; n * COEF_LEN];
        for (i, spec) in self.specs.iter().enumerate() {
            let group = &self.groups[self.group_of[i]];
            let lr_i = lr * group.lr_scale;
            let wd_i = if group.weight_decay { wd } else { 0.0 };
            tparam.extend([
                lr_i,
                wd_i,
                if group.trust_ratio { 1.0 } else { 0.0 },
                spec.numel() as f64,
            ]);
            let k: Vec<f64> = match kind {
                OptimizerKind::Sgd(c) => {
                    let (keep, take) = if t == 1 {
                        (0.0, 1.0)
                    } else {
                        (c.momentum, 1.0 - c.dampening)
                    };
                    let (g_in_d, b_in_d) = if c.nesterov {
                        (1.0, c.momentum)
                    } else {
                        (0.0, 1.0)
                    };
                    vec![lr_i, wd_i, keep, take, g_in_d, b_in_d]
                }
                OptimizerKind::Adam(c) => {
                    adam_coef(c.beta1, c.beta2, c.eps, t, wd_i, 1.0, lr_i, 0.0)
                }
                OptimizerKind::AdamW(c) => adam_coef(
                    c.beta1,
                    c.beta2,
                    c.eps,
                    t,
                    0.0,
                    1.0 - lr_i * wd_i,
                    lr_i,
                    0.0,
                ),
                OptimizerKind::Lamb(c) => {
                    adam_coef(c.beta1, c.beta2, c.eps, t, 0.0, 1.0, lr_i, wd_i)
                }
                OptimizerKind::Lars(c) => {
                    let (u_in_d, b_in_d) = if c.nesterov {
                        (1.0, c.momentum)
                    } else {
                        (0.0, 1.0)
                    };
                    vec![wd_i, lr_i, c.momentum, u_in_d, b_in_d]
                }
                OptimizerKind::Lion(c) => vec![
                    c.beta1,
                    1.0 - c.beta1,
                    c.beta2,
                    1.0 - c.beta2,
                    lr_i,
                    1.0 - lr_i * wd_i,
                ],
                OptimizerKind::Muon(_) | OptimizerKind::Shampoo(_) | OptimizerKind::Soap(_) => {
                    Vec::new()
                }
            };
            for (dst, x) in coef[i * COEF_LEN..].iter_mut().zip(k) {
                *dst = x as f32;
            }
        }
        (tparam, coef)
    }

    /// Runs one step on the buffers in `bufs` (device addresses the caller
    /// keeps borrowed until this returns).
    fn step(&mut self, bufs: StepBuffers) -> Result<StepStats> {
        let n = self.specs.len();
        let t = self
            .step
            .checked_add(1)
            .ok_or_else(|| KeelError::State(format!("the step count {} cannot grow", self.step)))?;
        let kind = self.config.kind.clone();
        let (tparam, coef) = self.coefficients(t);
        // Each tensor's parameter and gradient addresses, which the matrix
        // step hands to cuBLAS (the elementwise step needs no copy of them).
        let tensor_ptrs: Vec<(u64, u64)> = if self.matrix.is_some() {
            bufs.ptrs.chunks(PTRS_LEN).map(|c| (c[0], c[1])).collect()
        } else {
            Vec::new()
        };
        if self.matrix.is_some() && bufs.bf16_grads {
            return Err(KeelError::Cuda(format!(
                "{} on cuda takes f32 parameters and gradients (CudaOptimizer)",
                kind.name()
            )));
        }
        let stream = self.stream.clone();
        let s = &stream;
        if n > 0 {
            // One upload (each copy from pageable memory waits for the stream).
            let mut words = bufs.ptrs;
            words.extend(coef.chunks(2).map(|c| {
                c[0].to_bits() as u64 | (c.get(1).map_or(0, |x| x.to_bits()) as u64) << 32
            }));
            words.extend(tparam.iter().map(|x| x.to_bits()));
            if words.len() != input_words(n) {
                return Err(KeelError::Cuda(format!(
                    "internal: {} input words for {n} tensors, expected {}",
                    words.len(),
                    input_words(n)
                )));
            }
            s.memcpy_htod(&words, &mut self.inputs).map_err(cuda_err)?;
        }
        let (lo, hi) = match self.config.clip_value {
            Some(c) => (-c as f32, c as f32),
            None => (f32::NEG_INFINITY, f32::INFINITY),
        };
        let clip_norm = self.config.clip_global_norm.unwrap_or(-1.0);
        let suffix = if bufs.bf16_grads { "bf16" } else { "f32" };
        let chunk_cfg = launch_cfg(self.nchunks, BLOCK)?;
        let tensor_cfg = launch_cfg(n, BLOCK)?;
        let k = self.kernels.clone();
        let a = self.addr;
        let has_chunks = self.nchunks > 0;

        // 1. Scan, per-tensor sums, global norm / clip factor / skip flag.
        let is_lars = matches!(kind, OptimizerKind::Lars(_));
        let with_params = i32::from(is_lars);
        if has_chunks {
            let f = k.get(&format!("keel_scan_{suffix}"))?;
            let mut b = s.launch_builder(f);
            b.arg(&a.chunks)
                .arg(&a.ptrs)
                .arg(&a.partials)
                .arg(&lo)
                .arg(&hi)
                .arg(&with_params);
            // SAFETY: the argument list matches keel_scan's signature; the
            // table's addresses are live buffers of the right lengths.
            unsafe { b.launch(chunk_cfg) }.map_err(cuda_err)?;
        }
        self.tensor_sums(&k, tensor_cfg, 4, 0, SUMS_STORE, 0, 0.0)?;
        {
            let (lars, tc, eps) = match &kind {
                OptimizerKind::Lars(c) => (1i32, c.trust_coefficient, c.eps),
                _ => (0i32, 0.0, 0.0),
            };
            let n_i32 = n as i32;
            let f = k.get("keel_global_finalize")?;
            let mut b = s.launch_builder(f);
            b.arg(&a.tstats)
                .arg(&n_i32)
                .arg(&clip_norm)
                .arg(&lars)
                .arg(&tc)
                .arg(&eps)
                .arg(&a.tparam)
                .arg(&a.coef)
                .arg(&LARS_LR)
                .arg(&a.global);
            // SAFETY: matches keel_global_finalize's signature.
            unsafe { b.launch(launch_cfg(1, 1024)?) }.map_err(cuda_err)?;
        }

        if self.matrix.is_some() {
            return self.matrix_step(t, &tensor_ptrs, lo, hi);
        }

        // 2. The update.
        let stochastic = i32::from(matches!(bufs.rounding, Some(Rounding::Stochastic { .. })));
        let seed = match bufs.rounding {
            Some(Rounding::Stochastic { seed }) => seed,
            _ => 0,
        };
        let round_step = self.step;
        if has_chunks {
            let fused = match &kind {
                OptimizerKind::Sgd(c) if c.momentum == 0.0 => Some("keel_sgd_plain"),
                OptimizerKind::Sgd(_) => Some("keel_sgd"),
                OptimizerKind::Adam(_) => Some("keel_adam"),
                OptimizerKind::AdamW(c) if c.update_clip_rms.is_none() => Some("keel_adam"),
                OptimizerKind::Lion(_) => Some("keel_lion"),
                OptimizerKind::Lars(_) => Some("keel_lars"),
                _ => None,
            };
            match fused {
                Some(name) => {
                    let f = k.get(&format!("{name}_{suffix}"))?;
                    let mut b = s.launch_builder(f);
                    b.arg(&a.chunks)
                        .arg(&a.ptrs)
                        .arg(&a.coef)
                        .arg(&a.global)
                        .arg(&a.partials)
                        .arg(&lo)
                        .arg(&hi)
                        .arg(&stochastic)
                        .arg(&seed)
                        .arg(&round_step);
                    // SAFETY: matches the KEEL_ELEMENTWISE_KERNELS signature.
                    unsafe { b.launch(chunk_cfg) }.map_err(cuda_err)?;
                }
                None => {
                    let (moments, mode, max_rms) = match &kind {
                        OptimizerKind::Lamb(_) => ("keel_lamb_moments", SUMS_LAMB, 0.0),
                        OptimizerKind::AdamW(c) => (
                            "keel_adam_moments",
                            SUMS_UCLIP,
                            c.update_clip_rms.unwrap_or(f64::INFINITY),
                        ),
                        other => {
                            return Err(KeelError::Cuda(format!(
                                "{} is not yet supported on cuda",
                                other.name()
                            )))
                        }
                    };
                    let f = k.get(&format!("{moments}_{suffix}"))?;
                    let mut b = s.launch_builder(f);
                    b.arg(&a.chunks)
                        .arg(&a.ptrs)
                        .arg(&a.coef)
                        .arg(&a.global)
                        .arg(&a.partials)
                        .arg(&lo)
                        .arg(&hi);
                    // SAFETY: matches the KEEL_MOMENT_KERNELS signature.
                    unsafe { b.launch(chunk_cfg) }.map_err(cuda_err)?;
                    self.tensor_sums(&k, tensor_cfg, 2, T_PARAM_SQ, mode, ADAM_LR, max_rms)?;
                    let f = k.get("keel_adam_apply")?;
                    let mut b = self.stream.launch_builder(f);
                    b.arg(&a.chunks)
                        .arg(&a.ptrs)
                        .arg(&a.coef)
                        .arg(&a.global)
                        .arg(&a.partials)
                        .arg(&stochastic)
                        .arg(&seed)
                        .arg(&round_step);
                    // SAFETY: matches keel_adam_apply's signature.
                    unsafe { b.launch(chunk_cfg) }.map_err(cuda_err)?;
                }
            }
        }
        // 3. ||p||, ||Δp||, then the one read-back.
        if has_chunks {
            self.tensor_sums(&k, tensor_cfg, 2, T_PARAM_SQ, SUMS_STORE, 0, 0.0)?;
        }
        let out = self.stream.clone_dtoh(&self.outputs).map_err(cuda_err)?;
        let (tstats, global) = out.split_at(n * T_LEN);
        self.stats(tstats, global, has_chunks, 0)
    }

    /// The rest of a Muon or Shampoo step after the scan (see
    /// [`MatrixEngine`]): one read-back for the skip flag and clip factor,
    /// the matrix work, then the read-back of the statistics.
    fn matrix_step(&mut self, t: u64, ptrs: &[(u64, u64)], lo: f32, hi: f32) -> Result<StepStats> {
        let n = self.specs.len();
        let out = self.stream.clone_dtoh(&self.outputs).map_err(cuda_err)?;
        let (tstats, global) = out.split_at(n * T_LEN);
        if global[2] != 0.0 {
            return self.stats(tstats, global, false, 0);
        }
        let prep = GradPrep {
            lo,
            hi,
            scale: global[1] as f32,
        };
        let kind = self.config.kind.clone();
        let (lr, wd) = (kind.lr(), kind.weight_decay());
        let lr_wd: Vec<(f64, f64)> = self
            .group_of
            .iter()
            .map(|&g| {
                let group = &self.groups[g];
                (
                    lr * group.lr_scale,
                    if group.weight_decay { wd } else { 0.0 },
                )
            })
            .collect();
        let stream = self.stream.clone();
        let tensors: Vec<TensorBuffers> = (0..n)
            .map(|i| TensorBuffers {
                p: ptrs[i].0,
                g: ptrs[i].1,
                state: self.state[i].iter().map(|s| addr(s, &stream)).collect(),
                sums: self.addr.tstats + 8 * (i * T_LEN + T_PARAM_SQ as usize) as u64,
            })
            .collect();
        let engine = self
            .matrix
            .as_mut()
            .ok_or_else(|| KeelError::Cuda("internal: no matrix engine".into()))?;
        engine.step(&kind, t, &self.specs, &lr_wd, &tensors, prep)?;
        let failures = engine.failures()?;
        let out = self.stream.clone_dtoh(&self.outputs).map_err(cuda_err)?;
        let (tstats, global) = out.split_at(n * T_LEN);
        self.stats(tstats, global, true, failures)
    }

    /// Launches `keel_tensor_sums` (see reduce.cu).
    #[allow(clippy::too_many_arguments)]
    fn tensor_sums(
        &mut self,
        k: &Kernels,
        cfg: LaunchConfig,
        width: i32,
        slot: i32,
        mode: i32,
        lr_slot: i32,
        max_rms: f64,
    ) -> Result<()> {
        if self.specs.is_empty() {
            return Ok(());
        }
        let f = k.get("keel_tensor_sums")?;
        let a = self.addr;
        let mut b = self.stream.launch_builder(f);
        b.arg(&a.partials)
            .arg(&width)
            .arg(&a.chunk_start)
            .arg(&a.tstats)
            .arg(&slot)
            .arg(&mode)
            .arg(&a.tparam)
            .arg(&a.coef)
            .arg(&lr_slot)
            .arg(&max_rms)
            .arg(&a.global);
        // SAFETY: matches keel_tensor_sums's signature.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }

    /// The step's statistics from the read-back buffers; counts the step
    /// unless it was skipped.
    fn stats(
        &mut self,
        tstats: &[f64],
        global: &[f64],
        has_chunks: bool,
        preconditioner_failures: usize,
    ) -> Result<StepStats> {
        let lr = self.config.kind.lr();
        let n = self.specs.len();
        let ts = |i: usize, k: usize| tstats[i * T_LEN + k];
        let finite: Vec<bool> = (0..n).map(|i| ts(i, 0).is_finite()).collect();
        let grad_norms: Vec<f64> = (0..n)
            .map(|i| if finite[i] { ts(i, 1).sqrt() } else { f64::NAN })
            .collect();
        let (norm, s) = (global[0], global[1]);
        if global[2] != 0.0 {
            let bad: Vec<String> = (0..n)
                .filter(|&i| !finite[i])
                .map(|i| self.specs[i].name.clone())
                .collect();
            if self.config.on_nonfinite == NonFinitePolicy::Error {
                return Err(KeelError::NonFiniteGradient { tensors: bad });
            }
            let tensors = (0..n)
                .map(|i| TensorStats {
                    grad_norm: grad_norms[i],
                    update_norm: 0.0,
                    param_norm: f64::NAN,
                    trust_ratio: None,
                    update_clip_factor: None,
                    finite: finite[i],
                })
                .collect();
            return Ok(StepStats {
                step: self.step,
                lr,
                global_grad_norm: norm,
                global_grad_norm_clipped: norm,
                clip_factor: 1.0,
                skipped: Some(SkipReason::NonFiniteGradient { tensors: bad }),
                preconditioner_failures: 0,
                tensors,
            });
        }
        self.step += 1; // checked in `step`
        let some = |x: f64| if x.is_nan() { None } else { Some(x) };
        let tensors = (0..n)
            .map(|i| {
                let (psq, usq) = if has_chunks {
                    (ts(i, 4), ts(i, 5))
                } else {
                    (0.0, 0.0)
                };
                TensorStats {
                    grad_norm: grad_norms[i],
                    update_norm: usq.sqrt(),
                    param_norm: psq.sqrt(),
                    trust_ratio: some(ts(i, 6)),
                    update_clip_factor: some(ts(i, 7)),
                    finite: true,
                }
            })
            .collect();
        Ok(StepStats {
            step: self.step,
            lr,
            global_grad_norm: norm,
            global_grad_norm_clipped: norm * s,
            clip_factor: s,
            skipped: None,
            preconditioner_failures,
            tensors,
        })
    }

    fn state_dict(&self) -> Result<StateDict> {
        // Each buffer with its true length (empty ones hold one element).
        let sized: Vec<Vec<(&CudaSlice<f32>, usize)>> = self
            .state
            .iter()
            .zip(&self.state_lens)
            .map(|(bufs, lens)| bufs.iter().zip(lens.iter().copied()).collect())
            .collect();
        build_state_dict(
            &self.config,
            self.step,
            "F32",
            &self.specs,
            &self.groups,
            &sized,
            |&(data, len), _spec| Ok(StateData::F32(to_host(&self.stream, data, len)?)),
        )
    }

    fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        // Read everything on the host first, so a bad state changes nothing.
        let (group_of, host) = read_state::<f32>(
            sd,
            &self.config.kind,
            "F32",
            "the CUDA backend",
            &self.specs,
        )?;
        let mut state = Vec::with_capacity(host.len());
        for bufs in &host {
            let mut dev = Vec::with_capacity(bufs.len());
            for b in bufs {
                dev.push(to_device(&self.stream, b)?);
            }
            state.push(dev);
        }
        // The loaded config may block Shampoo's tensors differently.
        let matrix = MatrixEngine::new(&sd.config.kind, &self.specs, &self.stream, &self.kernels)?;
        self.state_lens = host
            .iter()
            .map(|bufs| bufs.iter().map(Vec::len).collect())
            .collect();
        self.matrix = matrix;
        self.config = sd.config.clone();
        self.groups = sd.groups.clone();
        self.group_of = group_of;
        self.state = state;
        self.step = sd.step;
        Ok(())
    }

    /// Checks the buffers, then runs one step on them: on `params` in place,
    /// or, with `master`, on the f32 master weights, writing `params` as
    /// their bf16 copy with the given rounding (bf16 gradients).
    fn step_on<P, G>(
        &mut self,
        params: &mut [&mut CudaSlice<P>],
        grads: &[&CudaSlice<G>],
        master: Option<(&mut [CudaSlice<f32>], Rounding)>,
    ) -> Result<StepStats> {
        check_buffer_lens(
            &self.specs,
            params.iter().map(|p| p.len()),
            grads.iter().map(|g| g.len()),
        )?;
        let stream = self.stream.clone();
        let mut state_ptrs = Vec::new();
        for i in 0..params.len() {
            self.state_ptrs(i, &mut state_ptrs);
        }
        let mut syncs: Vec<SyncOnDrop<'_>> = Vec::with_capacity(3 * params.len());
        let mut master_ptrs = Vec::new();
        let rounding = master.map(|(master, rounding)| {
            for m in master.iter_mut() {
                let (mp, sm) = m.device_ptr_mut(&stream);
                master_ptrs.push(mp);
                syncs.push(sm);
            }
            rounding
        });
        let mut ptrs = Vec::with_capacity(params.len() * PTRS_LEN);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (pp, sp) = p.device_ptr_mut(&stream);
            let (gp, sg) = g.device_ptr(&stream);
            syncs.extend([sp, sg]);
            // Mixed precision: the kernels update the master weight and
            // write the parameter as its bf16 copy.
            let (target, out) = match master_ptrs.get(i) {
                Some(&mp) => (mp, pp),
                None => (pp, 0),
            };
            ptrs.extend([target, gp, state_ptrs[2 * i], state_ptrs[2 * i + 1], out]);
        }
        let stats = self.step(StepBuffers {
            ptrs,
            bf16_grads: rounding.is_some(),
            rounding,
        });
        drop(syncs);
        stats
    }

    /// Addresses of tensor `i`'s state slots (0 where absent).
    fn state_ptrs(&mut self, i: usize, out: &mut Vec<u64>) {
        let stream = self.stream.clone();
        let mut slots = self.state[i].iter_mut();
        for _ in 0..2 {
            let ptr = match slots.next() {
                Some(slot) => {
                    let (ptr, _sync) = slot.device_ptr_mut(&stream);
                    ptr
                }
                None => 0,
            };
            out.push(ptr);
        }
    }
}

/// The Adam family's coefficients in `KeelAdamCoef` order (src/optim/adam.rs
/// `AdamCoeffs`): b1, 1-b1, b2, 1-b2, 1/bc1, 1/sqrt(bc2), eps, l2, decay,
/// lr, wd_dir.
#[allow(clippy::too_many_arguments)]
fn adam_coef(
    beta1: f64,
    beta2: f64,
    eps: f64,
    t: u64,
    l2: f64,
    decay: f64,
    lr: f64,
    wd_dir: f64,
) -> Vec<f64> {
    let bc1 = 1.0 - beta1.powf(t as f64);
    let bc2 = 1.0 - beta2.powf(t as f64);
    vec![
        beta1,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        1.0 / bc1,
        1.0 / bc2.sqrt(),
        eps,
        l2,
        decay,
        lr,
        wd_dir,
    ]
}

/// The [`Optimizer`] methods both CUDA optimizers answer from their `core`.
macro_rules! core_optimizer_methods {
    () => {
        fn specs(&self) -> &[ParamSpec] {
            &self.core.specs
        }

        fn config(&self) -> &OptimizerConfig {
            &self.core.config
        }

        fn set_lr(&mut self, lr: f64) -> Result<()> {
            self.core.config.set_lr(lr)
        }

        fn step_count(&self) -> u64 {
            self.core.step
        }
    };
}

/// An optimizer whose f32 parameters, gradients and state live on a CUDA
/// device.
///
/// Parameters and gradients are `CudaSlice<f32>` buffers (allocate them on
/// [`CudaOptimizer::stream`], or synchronize them with it); each step queues
/// a fixed sequence of kernels on that stream and reads its statistics back
/// once (Muon and Shampoo: twice, the first right after the scan). SGD,
/// Adam, AdamW, Lion, LAMB, LARS, Muon and Shampoo are supported; SOAP is
/// not yet (constructing one returns [`KeelError::Cuda`]).
///
/// ```no_run
/// use keel::backend::cuda::CudaOptimizer;
/// use keel::{Optimizer, OptimizerConfig, ParamSpec};
///
/// let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#)?;
/// let mut opt = CudaOptimizer::new(config, vec![ParamSpec::new("w", [4])])?;
/// let mut w = opt.upload(&[1.0f32; 4])?;
/// let g = opt.upload(&[0.5f32; 4])?;
/// opt.step(&mut [&mut w], &[&g])?;
/// assert!(opt.download(&w)?[0] < 1.0);
/// # Ok::<(), keel::KeelError>(())
/// ```
#[derive(Debug)]
pub struct CudaOptimizer {
    core: Core,
}

impl CudaOptimizer {
    /// An optimizer over `specs`, all in one group, on device 0.
    pub fn new(config: OptimizerConfig, specs: Vec<ParamSpec>) -> Result<Self> {
        let group = ParamGroup::all(&specs);
        Self::with_groups(config, specs, vec![group], 0)
    }

    /// An optimizer over `specs` in parameter groups, on device `ordinal`.
    pub fn with_groups(
        config: OptimizerConfig,
        specs: Vec<ParamSpec>,
        groups: Vec<ParamGroup>,
        ordinal: usize,
    ) -> Result<Self> {
        Ok(CudaOptimizer {
            core: Core::new(config, specs, groups, ordinal)?,
        })
    }

    /// Rebuilds an optimizer from a state dict (e.g. one saved by
    /// [`crate::CpuOptimizer`]`<f32>`), on device `ordinal`.
    pub fn from_state_dict(state: &StateDict, ordinal: usize) -> Result<Self> {
        let mut opt = Self::with_groups(
            state.config.clone(),
            state.specs.clone(),
            state.groups.clone(),
            ordinal,
        )?;
        opt.load_state_dict(state)?;
        Ok(opt)
    }

    /// The device.
    pub fn device(&self) -> &DeviceInfo {
        &self.core.info
    }

    /// The stream every step runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.core.stream
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.core.groups
    }

    /// Copies host values to a new device buffer on the optimizer's stream.
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.core.stream.clone_htod(host).map_err(cuda_err)
    }

    /// Copies a device buffer back to the host (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.core.stream.clone_dtoh(dev).map_err(cuda_err)
    }

    /// A host copy of a state buffer of parameter `tensor` by slot name.
    pub fn state_buffer(&self, tensor: usize, slot: &str) -> Result<Option<Vec<f32>>> {
        let Some(i) = state_slots(&self.core.config.kind)
            .iter()
            .position(|s| *s == slot)
        else {
            return Ok(None);
        };
        match self.core.state.get(tensor) {
            Some(s) => to_host(&self.core.stream, &s[i], self.core.state_lens[tensor][i]).map(Some),
            None => Ok(None),
        }
    }

    /// The CUDA context (for allocating on the same device).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.core.ctx
    }
}

impl Optimizer for CudaOptimizer {
    type Param = CudaSlice<f32>;
    type Grad = CudaSlice<f32>;

    core_optimizer_methods!();

    fn step(
        &mut self,
        params: &mut [&mut CudaSlice<f32>],
        grads: &[&CudaSlice<f32>],
    ) -> Result<StepStats> {
        self.core.step_on(params, grads, None)
    }

    fn state_dict(&self) -> Result<StateDict> {
        self.core.state_dict()
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.core.load_state_dict(state)
    }
}

/// bf16 parameters and gradients on a CUDA device, with f32 master weights
/// and f32 state on the device: the CUDA counterpart of
/// [`crate::MixedPrecisionOptimizer`], with the same rounding (nearest, or
/// stochastic with the same hash, so both backends round identically) and
/// the same state dict.
#[derive(Debug)]
pub struct CudaMixedPrecisionOptimizer {
    core: Core,
    master: Vec<CudaSlice<f32>>,
    rounding: Rounding,
}

impl CudaMixedPrecisionOptimizer {
    /// An optimizer whose master weights start as the f32 values of
    /// `initial`, on device `ordinal`.
    pub fn new(
        config: OptimizerConfig,
        specs: Vec<ParamSpec>,
        groups: Vec<ParamGroup>,
        initial: &[&CudaSlice<bf16>],
        rounding: Rounding,
        ordinal: usize,
    ) -> Result<Self> {
        if matches!(
            config.kind,
            OptimizerKind::Muon(_) | OptimizerKind::Shampoo(_)
        ) {
            return Err(KeelError::Cuda(format!(
                "{} on cuda takes f32 parameters (CudaOptimizer); bf16 with master weights \
                 covers the elementwise optimizers",
                config.kind.name()
            )));
        }
        let core = Core::new(config, specs, groups, ordinal)?;
        let lens = || initial.iter().map(|p| p.len());
        check_buffer_lens(&core.specs, lens(), lens())?;
        let mut master = Vec::with_capacity(initial.len());
        for p in initial {
            let host: Vec<f32> = core
                .stream
                .clone_dtoh(*p)
                .map_err(cuda_err)?
                .iter()
                .map(|x| x.to_f32())
                .collect();
            master.push(to_device(&core.stream, &host)?);
        }
        Ok(CudaMixedPrecisionOptimizer {
            core,
            master,
            rounding,
        })
    }

    /// A host copy of the f32 master weights of parameter `tensor`.
    pub fn master(&self, tensor: usize) -> Result<Vec<f32>> {
        let m = self
            .master
            .get(tensor)
            .ok_or_else(|| KeelError::shape("master", format!("no parameter {tensor}")))?;
        to_host(&self.core.stream, m, self.core.specs[tensor].numel())
    }

    /// The stream every step runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.core.stream
    }

    /// The device.
    pub fn device(&self) -> &DeviceInfo {
        &self.core.info
    }
}

impl Optimizer for CudaMixedPrecisionOptimizer {
    type Param = CudaSlice<bf16>;
    type Grad = CudaSlice<bf16>;

    core_optimizer_methods!();

    fn step(
        &mut self,
        params: &mut [&mut CudaSlice<bf16>],
        grads: &[&CudaSlice<bf16>],
    ) -> Result<StepStats> {
        self.core
            .step_on(params, grads, Some((&mut self.master, self.rounding)))
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = self.core.state_dict()?;
        save_master(&mut sd, &self.core.specs, self.rounding, |i, spec| {
            to_host(&self.core.stream, &self.master[i], spec.numel())
        })?;
        Ok(sd)
    }

    fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let (master, rounding) = read_master(sd, &self.core.specs)?;
        self.core.load_state_dict(sd)?;
        let mut dev = Vec::with_capacity(master.len());
        for m in &master {
            dev.push(to_device(&self.core.stream, m)?);
        }
        self.master = dev;
        self.rounding = rounding;
        Ok(())
    }
}
