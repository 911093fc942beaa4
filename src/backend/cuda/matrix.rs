//! Muon and Shampoo on the device: the CPU backend's math (src/optim/muon.rs,
//! src/optim/shampoo.rs) as cuBLAS GEMMs, cuSOLVER eigendecompositions and
//! the small kernels of `kernels/matrix.cu`, queued on the optimizer's
//! stream.
//!
//! - **Muon** runs torch.optim.Muon's literal Newton–Schulz iteration in f32
//!   (`A = X X^T; B = b A + c A A; X = a X + B X`, three GEMMs per
//!   iteration). The CPU evaluates the same polynomial spectrally (one
//!   eigendecomposition of the Gram matrix), which is cheaper on a CPU; on a
//!   GPU the GEMMs are the fast path and the literal iteration is the
//!   reference's own.
//! - **Shampoo** keeps the CPU's blocking and state layout. Per block: the
//!   gradient is gathered into a contiguous buffer, each factor gains its
//!   mode Gram matrix (GEMM, then a mirror of the lower triangle so factors
//!   stay exactly symmetric), due inverse roots come from cuSOLVER's f64
//!   `syevd` with the epsilon shift of SHAMPOO.md (E3), and the
//!   preconditioned direction is a chain of mode products (GEMMs), grafted to
//!   the graft direction's norm on the device. Roots are always computed in
//!   f64 here (`root_dtype` only changes the CPU backend's speed).
//!
//! Row-major tensors are handed to cuBLAS (column-major) as their
//! transposes, so no tensor is ever transposed in memory: a row-major
//! `rows x cols` buffer is the column-major `cols x rows` matrix `M = X^T`.

use std::ffi::c_int;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::cusolver::{sys as solver_sys, DnHandle};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::driver_error;
use super::kernels::Kernels;
use crate::config::{Grafting, MuonConfig, OptimizerKind, ShampooConfig};
use crate::error::{KeelError, Result};
use crate::optim::linalg::around;
use crate::optim::{muon, shampoo};
use crate::tensor::ParamSpec;

/// Threads per block of the grid-stride kernels.
const BLOCK: u32 = 256;
/// Most blocks of a grid-stride launch.
const MAX_GRID: usize = 8192;
/// Most blocks (and partial sums) of a reduction.
const MAX_PARTS: usize = 512;
/// `keel_norm_finalize` modes.
const NORM_INV: i32 = 0;
const NORM_RATIO: i32 = 1;
/// `keel_matrix_apply` modes.
const APPLY_MUON: i32 = 0;
const APPLY_SHAMPOO: i32 = 1;
/// `keel_shampoo_moments` graft kinds.
const GRAFT_NONE: i32 = 0;
const GRAFT_ADAGRAD: i32 = 1;
const GRAFT_ADAM: i32 = 2;
/// Slots of the flag buffer: syevd's info, the root's failure flag, the
/// step's failure count.
const FLAG_INFO: u64 = 0;
const FLAG_BAD: u64 = 1;
const FLAG_FAILURES: u64 = 2;

/// One kernel argument, by the kernel parameter's exact type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Arg {
    /// A device address or a 64-bit count.
    U64(u64),
    /// `unsigned int`.
    U32(u32),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// `Arg` from each kernel parameter type.
macro_rules! arg_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Arg {
            fn from(v: $t) -> Self {
                Arg::$v(v)
            }
        }
    )*};
}
arg_from!(u64 => U64, u32 => U32, i32 => I32, f32 => F32, f64 => F64);

/// The shape of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grid {
    /// A grid-stride loop over this many elements.
    Stride(usize),
    /// A reduction over this many elements: [`parts`] blocks.
    Parts(usize),
    /// One block of this many threads.
    One(u32),
}

/// `C = alpha op(A) op(B) + beta C`, column-major, in f32 or f64: the
/// matrices as (address, leading dimension).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Gemm {
    /// f64 (else f32) matrices.
    pub f64: bool,
    /// Transpose A, B.
    pub trans: (bool, bool),
    /// The product's sizes: C is m x n, the inner dimension k.
    pub mnk: (usize, usize, usize),
    /// Scale of the product.
    pub alpha: f64,
    /// A.
    pub a: (u64, usize),
    /// B.
    pub b: (u64, usize),
    /// Scale of C's old value.
    pub beta: f64,
    /// C.
    pub c: (u64, usize),
}

/// What the matrix step needs from a device: zeroed buffers, kernel
/// launches, GEMMs, a symmetric eigensolver, copies. The CUDA backend is
/// [`CudaDevice`]; the tests also run the whole step through a host
/// emulation of these operations (src/backend/cuda/emulator.rs), which
/// checks the layouts, offsets and sequencing against the CPU backend on a
/// machine without a GPU.
pub(super) trait MatrixDevice: Send {
    /// A zeroed buffer of `bytes` bytes (at least one).
    fn alloc(&mut self, bytes: usize) -> Result<u64>;
    /// A buffer holding `data`.
    fn upload_u64(&mut self, data: &[u64]) -> Result<u64>;
    /// Launches kernel `name` of kernels/matrix.cu.
    fn launch(&mut self, name: &'static str, grid: Grid, args: &[Arg]) -> Result<()>;
    /// One GEMM.
    fn gemm(&mut self, g: Gemm) -> Result<()>;
    /// Workspace (in doubles) of [`MatrixDevice::syevd`] for order `n`, with
    /// the buffers it will use.
    fn syevd_workspace(&mut self, n: usize, a: u64, w: u64) -> Result<usize>;
    /// f64 symmetric eigendecomposition of the column-major `n x n` matrix
    /// at `a` (lower triangle read): eigenvectors overwrite it (columns),
    /// eigenvalues ascending in `w`, the solver's status in the int `info`.
    fn syevd(&mut self, n: usize, a: u64, w: u64, work: (u64, usize), info: u64) -> Result<()>;
    /// Copies `bytes` bytes.
    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Sets `bytes` bytes to `value`.
    fn fill(&mut self, at: u64, value: u8, bytes: usize) -> Result<()>;
    /// Reads one int (after everything queued before has run).
    fn read_i32(&mut self, at: u64) -> Result<i32>;
}

fn blas_err(e: blas::CublasError) -> KeelError {
    KeelError::Cuda(format!("cuBLAS: {e:?}"))
}

fn solver_err(e: cudarc::cusolver::result::CusolverError) -> KeelError {
    KeelError::Cuda(format!("cuSOLVER: {e:?}"))
}

/// `x` as a cuBLAS/cuSOLVER dimension.
fn dim(x: usize) -> Result<c_int> {
    c_int::try_from(x)
        .map_err(|_| KeelError::Cuda(format!("matrix dimension {x} exceeds cuBLAS's int range")))
}

/// Blocks (and partial sums) of a reduction over `n` elements: fixed for a
/// given `n`, so the sums are deterministic.
pub(super) fn parts(n: usize) -> usize {
    n.div_ceil(4 * BLOCK as usize).clamp(1, MAX_PARTS)
}

/// The launch configuration of `grid`.
fn launch_config(grid: Grid) -> LaunchConfig {
    let (blocks, threads) = match grid {
        Grid::Stride(n) => (n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID), BLOCK),
        Grid::Parts(n) => (parts(n), BLOCK),
        Grid::One(threads) => (1, threads),
    };
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether the cuBLAS (and, for Shampoo, cuSOLVER) libraries load; an error
/// naming the missing one otherwise.
fn probe_libraries(solver: bool) -> Result<()> {
    // SAFETY: only tries to dlopen the libraries by their usual names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(KeelError::Cuda(
            "libcublas could not be loaded (Muon and Shampoo need cuBLAS): install the \
             CUDA toolkit or the nvidia-cublas wheel and put its lib/ folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    // SAFETY: as above.
    if solver && !unsafe { cudarc::cusolver::sys::is_culib_present() } {
        return Err(KeelError::Cuda(
            "libcusolver could not be loaded (Shampoo's inverse roots need cuSOLVER): install \
             the CUDA toolkit or the nvidia-cusolver wheel and put its lib/ folder on \
             LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// [`MatrixDevice`] on a CUDA stream: NVRTC kernels, cuBLAS, cuSOLVER.
pub(super) struct CudaDevice {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    blas: CudaBlas,
    solver: Option<DnHandle>,
    /// Every buffer handed out, held as long as the device.
    buffers: Vec<CudaSlice<u8>>,
    tables: Vec<CudaSlice<u64>>,
}

impl CudaDevice {
    /// The device of `stream`, with cuSOLVER when `solver`.
    pub(super) fn new(
        stream: &Arc<CudaStream>,
        kernels: &Arc<Kernels>,
        solver: bool,
    ) -> Result<Self> {
        probe_libraries(solver)?;
        // cudarc panics where a library misbehaves on load; keep the
        // never-panic promise.
        let blas = std::panic::catch_unwind(|| CudaBlas::new(stream.clone()))
            .map_err(|_| KeelError::Cuda("cuBLAS failed to initialize".into()))?
            .map_err(blas_err)?;
        let solver = if solver {
            let handle = std::panic::catch_unwind(|| DnHandle::new(stream.clone()))
                .map_err(|_| KeelError::Cuda("cuSOLVER failed to initialize".into()))?
                .map_err(solver_err)?;
            Some(handle)
        } else {
            None
        };
        Ok(CudaDevice {
            stream: stream.clone(),
            kernels: kernels.clone(),
            blas,
            solver,
            buffers: Vec::new(),
            tables: Vec::new(),
        })
    }

    fn solver(&self) -> Result<&DnHandle> {
        self.solver
            .as_ref()
            .ok_or_else(|| KeelError::Cuda("internal: no cuSOLVER handle".into()))
    }
}

impl MatrixDevice for CudaDevice {
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(driver_error)?;
        let addr = {
            let (addr, _sync) = slice.device_ptr(&self.stream);
            addr
        };
        self.buffers.push(slice);
        Ok(addr)
    }

    fn upload_u64(&mut self, data: &[u64]) -> Result<u64> {
        let slice = if data.is_empty() {
            self.stream.alloc_zeros::<u64>(1)
        } else {
            self.stream.clone_htod(data)
        }
        .map_err(driver_error)?;
        let addr = {
            let (addr, _sync) = slice.device_ptr(&self.stream);
            addr
        };
        self.tables.push(slice);
        Ok(addr)
    }

    fn launch(&mut self, name: &'static str, grid: Grid, args: &[Arg]) -> Result<()> {
        let f = self.kernels.get(name)?;
        let mut b = self.stream.launch_builder(f);
        for arg in args {
            match arg {
                Arg::U64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::F64(v) => b.arg(v),
            };
        }
        // SAFETY: the engine passes each kernel's parameters in the order
        // and types of its signature in kernels/matrix.cu (the emulator's
        // tests check the same lists), and every address is a live buffer of
        // the length the kernel reads.
        unsafe { b.launch(launch_config(grid)) }.map_err(driver_error)?;
        Ok(())
    }

    fn gemm(&mut self, g: Gemm) -> Result<()> {
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (m, n, k) = (dim(g.mnk.0)?, dim(g.mnk.1)?, dim(g.mnk.2)?);
        let (lda, ldb, ldc) = (dim(g.a.1)?, dim(g.b.1)?, dim(g.c.1)?);
        let handle = *self.blas.handle();
        // SAFETY: the engine passes buffers that hold the matrices the sizes
        // and leading dimensions describe, all on this handle's stream.
        unsafe {
            if g.f64 {
                blas::dgemm(
                    handle,
                    op(g.trans.0),
                    op(g.trans.1),
                    m,
                    n,
                    k,
                    &g.alpha,
                    g.a.0 as *const f64,
                    lda,
                    g.b.0 as *const f64,
                    ldb,
                    &g.beta,
                    g.c.0 as *mut f64,
                    ldc,
                )
            } else {
                let (alpha, beta) = (g.alpha as f32, g.beta as f32);
                blas::sgemm(
                    handle,
                    op(g.trans.0),
                    op(g.trans.1),
                    m,
                    n,
                    k,
                    &alpha,
                    g.a.0 as *const f32,
                    lda,
                    g.b.0 as *const f32,
                    ldb,
                    &beta,
                    g.c.0 as *mut f32,
                    ldc,
                )
            }
        }
        .map_err(blas_err)
    }

    fn syevd_workspace(&mut self, n: usize, a: u64, w: u64) -> Result<usize> {
        let handle = self.solver()?.cu();
        let n = dim(n.max(1))?;
        let mut lwork: c_int = 0;
        // SAFETY: queries the workspace size only; `a` and `w` are large
        // enough for n.
        unsafe {
            solver_sys::cusolverDnDsyevd_bufferSize(
                handle,
                solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                n,
                a as *const f64,
                n,
                w as *const f64,
                &mut lwork,
            )
        }
        .result()
        .map_err(solver_err)?;
        Ok(lwork.max(1) as usize)
    }

    fn syevd(&mut self, n: usize, a: u64, w: u64, work: (u64, usize), info: u64) -> Result<()> {
        let handle = self.solver()?.cu();
        let (nn, lwork) = (dim(n)?, dim(work.1)?);
        // SAFETY: `a` holds n*n doubles, `w` n, the workspace `lwork`
        // doubles (sized for the largest n: syevd's workspace grows with n),
        // `info` one int; all on this stream.
        unsafe {
            solver_sys::cusolverDnDsyevd(
                handle,
                solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                nn,
                a as *mut f64,
                nn,
                w as *mut f64,
                work.0 as *mut f64,
                lwork,
                info as *mut c_int,
            )
        }
        .result()
        .map_err(solver_err)
    }

    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: both buffers hold at least `bytes` bytes.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .map_err(driver_error)
    }

    fn fill(&mut self, at: u64, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: the engine fills inside its own buffers.
        unsafe {
            cudarc::driver::result::memset_d8_async(at, value, bytes, self.stream.cu_stream())
        }
        .map_err(driver_error)
    }

    fn read_i32(&mut self, at: u64) -> Result<i32> {
        self.stream.synchronize().map_err(driver_error)?;
        let mut v = [0i32];
        // SAFETY: `at` is an int inside one of the engine's buffers; the
        // stream has finished writing it.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, at) }.map_err(driver_error)?;
        Ok(v[0])
    }
}

/// Device addresses of one tensor's buffers for a matrix step.
pub(super) struct TensorBuffers {
    /// The parameter.
    pub p: u64,
    /// The gradient.
    pub g: u64,
    /// The state slots, as [`crate::optim::state_slots`] names them.
    pub state: Vec<u64>,
    /// Where the tensor's `||p||^2` and `||dp||^2` statistics go (two
    /// doubles).
    pub sums: u64,
}

/// The step's inputs the scan computed: the gradient clamp and clip factor.
#[derive(Debug, Clone, Copy)]
pub(super) struct GradPrep {
    /// `clip_value`'s bounds (infinite when unset).
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
    /// The global clip factor.
    pub scale: f32,
}

/// One Shampoo block on the device: its dims, the run table of its elements
/// in the tensor, and where its factors start in the tensor's factor slot.
struct BlockPlan {
    dims: Vec<usize>,
    numel: usize,
    runs: u64,
    run_len: usize,
    factor_offset: usize,
}

/// The f64 buffers of Shampoo's inverse roots.
struct RootBuffers {
    /// The solver's input, overwritten with the eigenvectors.
    a: u64,
    /// The scaled eigenvectors.
    qs: u64,
    /// The root before rounding.
    r: u64,
    /// Eigenvalues.
    w: u64,
    /// The solver's workspace and its length in doubles.
    work: (u64, usize),
}

/// The matrix work of a CUDA optimizer: per-tensor plans and scratch
/// buffers sized for the largest tensor, on a [`MatrixDevice`].
pub(super) struct MatrixEngine {
    dev: Box<dyn MatrixDevice>,
    roots: Option<RootBuffers>,
    /// Shampoo's blocks, per tensor (empty for Muon).
    plans: Vec<Vec<BlockPlan>>,
    /// Three tensor-sized f32 buffers.
    big: [u64; 3],
    /// Three block-sized f32 buffers (Shampoo) or Gram-sized ones (Muon).
    small: [u64; 3],
    partials: u64,
    scalar: u64,
    flags: u64,
}

impl std::fmt::Debug for MatrixEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatrixEngine").finish_non_exhaustive()
    }
}

/// Launches kernel `$name` on `$self.dev` over `$grid` with the arguments
/// (plain values whose Rust types are the kernel parameters' types).
macro_rules! launch {
    ($self:ident, $name:expr, $grid:expr; $($arg:expr),* $(,)?) => {
        $self.dev.launch($name, $grid, &[$(Arg::from($arg)),*])?
    };
}

impl MatrixEngine {
    /// The engine for `kind` (Muon or Shampoo) over `specs` on the CUDA
    /// stream; `None` for the elementwise kinds.
    pub(super) fn new(
        kind: &OptimizerKind,
        specs: &[ParamSpec],
        stream: &Arc<CudaStream>,
        kernels: &Arc<Kernels>,
    ) -> Result<Option<Self>> {
        if !matches!(kind, OptimizerKind::Muon(_) | OptimizerKind::Shampoo(_)) {
            return Ok(None);
        }
        let shampoo = matches!(kind, OptimizerKind::Shampoo(_));
        let dev = CudaDevice::new(stream, kernels, shampoo)?;
        Self::on(Box::new(dev), kind, specs).map(Some)
    }

    /// The engine for `kind` (Muon or Shampoo) over `specs` on `dev`.
    pub(super) fn on(
        mut dev: Box<dyn MatrixDevice>,
        kind: &OptimizerKind,
        specs: &[ParamSpec],
    ) -> Result<Self> {
        let max_numel = specs.iter().map(ParamSpec::numel).max().unwrap_or(0);
        let mut plans = Vec::with_capacity(specs.len());
        let (small_len, roots) = match kind {
            OptimizerKind::Muon(_) => {
                // Gram matrices: the smaller side squared.
                let r = specs
                    .iter()
                    .map(|s| s.shape.iter().copied().min().unwrap_or(0))
                    .max()
                    .unwrap_or(0);
                (r * r, None)
            }
            OptimizerKind::Shampoo(c) => {
                let (mut max_block, mut max_n) = (0, 0);
                for spec in specs {
                    let mut tensor_plan = Vec::new();
                    let mut offset = 0;
                    for block in shampoo::blocks(&spec.shape, c.max_preconditioner_dim) {
                        let runs: Vec<u64> = block.runs().map(|r| r as u64).collect();
                        max_block = max_block.max(block.numel());
                        max_n = max_n.max(block.dims.iter().copied().max().unwrap_or(0));
                        tensor_plan.push(BlockPlan {
                            run_len: *block.dims.last().expect("blocks have a dim"),
                            numel: block.numel(),
                            runs: dev.upload_u64(&runs)?,
                            factor_offset: offset,
                            dims: block.dims.clone(),
                        });
                        offset += block.factor_len();
                    }
                    plans.push(tensor_plan);
                }
                let nn = max_n * max_n;
                let (a, w) = (dev.alloc(8 * nn)?, dev.alloc(8 * max_n)?);
                // The largest workspace any factor order needs.
                let mut orders: Vec<usize> = plans
                    .iter()
                    .flatten()
                    .flat_map(|p: &BlockPlan| p.dims.iter().copied())
                    .collect();
                orders.sort_unstable();
                orders.dedup();
                let mut lwork = 1;
                for n in orders {
                    lwork = lwork.max(dev.syevd_workspace(n, a, w)?);
                }
                let roots = RootBuffers {
                    a,
                    qs: dev.alloc(8 * nn)?,
                    r: dev.alloc(8 * nn)?,
                    w,
                    work: (dev.alloc(8 * lwork)?, lwork),
                };
                (max_block, Some(roots))
            }
            other => {
                return Err(KeelError::Cuda(format!(
                    "internal: {} is not a matrix optimizer",
                    other.name()
                )))
            }
        };
        let big = [
            dev.alloc(4 * max_numel)?,
            dev.alloc(4 * max_numel)?,
            dev.alloc(4 * max_numel)?,
        ];
        let small = [
            dev.alloc(4 * small_len)?,
            dev.alloc(4 * small_len)?,
            dev.alloc(4 * small_len)?,
        ];
        Ok(MatrixEngine {
            partials: dev.alloc(16 * MAX_PARTS)?,
            scalar: dev.alloc(4)?,
            flags: dev.alloc(16)?,
            dev,
            roots,
            plans,
            big,
            small,
        })
    }

    /// Queues one step of `kind` (t is 1-based) for every tensor. An error
    /// here is a device or library failure (a launch, cuBLAS): tensors
    /// before the failing one may already be updated, so the optimizer's
    /// state should be reloaded from a checkpoint.
    pub(super) fn step(
        &mut self,
        kind: &OptimizerKind,
        t: u64,
        specs: &[ParamSpec],
        lr_wd: &[(f64, f64)],
        tensors: &[TensorBuffers],
        prep: GradPrep,
    ) -> Result<()> {
        self.dev.fill(self.flags + 4 * FLAG_FAILURES, 0, 4)?;
        for (i, (spec, bufs)) in specs.iter().zip(tensors).enumerate() {
            let numel = spec.numel();
            if numel == 0 {
                launch!(self, "keel_sums_finalize", Grid::One(BLOCK); self.partials, 0i32, bufs.sums);
                continue;
            }
            match kind {
                OptimizerKind::Muon(c) => {
                    self.muon(c, lr_wd[i], (spec.shape[0], spec.shape[1]), bufs, prep)?
                }
                OptimizerKind::Shampoo(c) => {
                    let plans = std::mem::take(&mut self.plans[i]);
                    let done = self.shampoo(c, t, lr_wd[i], &plans, numel, bufs, prep);
                    self.plans[i] = plans;
                    done?
                }
                other => {
                    return Err(KeelError::Cuda(format!(
                        "internal: {} is not a matrix optimizer",
                        other.name()
                    )))
                }
            }
        }
        Ok(())
    }

    /// The number of inverse roots the last step failed to recompute (waits
    /// for the step to finish).
    pub(super) fn failures(&mut self) -> Result<usize> {
        let n = self.dev.read_i32(self.flags + 4 * FLAG_FAILURES)?;
        Ok(n.max(0) as usize)
    }

    /// One Muon step of a row-major `rows x cols` tensor.
    fn muon(
        &mut self,
        c: &MuonConfig,
        (lr, wd): (f64, f64),
        (rows, cols): (usize, usize),
        bufs: &TensorBuffers,
        prep: GradPrep,
    ) -> Result<()> {
        let n = rows * cols;
        let (mut x, mut next) = (self.big[0], self.big[1]);
        let (gram, poly) = (self.small[0], self.small[1]);
        launch!(self, "keel_muon_momentum", Grid::Stride(n);
            bufs.g, bufs.state[0], x, n as u64, prep.lo, prep.hi, prep.scale,
            (1.0 - c.momentum) as f32, c.momentum as f32, i32::from(c.nesterov));
        // X /= max(||X||_F, eps), the factor staying on the device.
        self.norm_factor(x, 0, n, NORM_INV, c.eps)?;
        launch!(self, "keel_scale_by", Grid::Stride(n); x, n as u64, self.scalar);
        // The buffer is the column-major `cols x rows` matrix M = X^T. The
        // Gram matrix is of the smaller side: M^T M for a wide tensor
        // (rows <= cols), M M^T for a tall one.
        let wide = rows <= cols;
        let r = rows.min(cols);
        let [ca, cb, cc] = c.ns_coefficients.map(|v| v as f32 as f64);
        for _ in 0..c.ns_steps {
            if wide {
                self.sgemm(
                    (true, false),
                    (r, r, cols),
                    1.0,
                    (x, cols),
                    (x, cols),
                    0.0,
                    (gram, r),
                )?;
            } else {
                self.sgemm(
                    (false, true),
                    (r, r, rows),
                    1.0,
                    (x, cols),
                    (x, cols),
                    0.0,
                    (gram, r),
                )?;
            }
            // poly = b A + c A A
            self.dev.copy(poly, gram, 4 * r * r)?;
            self.sgemm(
                (false, false),
                (r, r, r),
                cc,
                (gram, r),
                (gram, r),
                cb,
                (poly, r),
            )?;
            // X_next = a X + poly X (M poly in the wide view, poly M in the
            // tall one).
            self.dev.copy(next, x, 4 * n)?;
            if wide {
                self.sgemm(
                    (false, false),
                    (cols, r, r),
                    1.0,
                    (x, cols),
                    (poly, r),
                    ca,
                    (next, cols),
                )?;
            } else {
                self.sgemm(
                    (false, false),
                    (r, rows, r),
                    1.0,
                    (poly, r),
                    (x, cols),
                    ca,
                    (next, cols),
                )?;
            }
            std::mem::swap(&mut x, &mut next);
        }
        let step = (lr * muon::shape_scale(c.adjust_lr, rows, cols)) as f32;
        let decay = (1.0 - lr * wd) as f32;
        self.apply(bufs, x, n, APPLY_MUON, decay, step)
    }

    /// One Shampoo step (SHAMPOO.md E1-E10) of a tensor with `plans`.
    #[allow(clippy::too_many_arguments)]
    fn shampoo(
        &mut self,
        c: &ShampooConfig,
        t: u64,
        (lr, wd): (f64, f64),
        plans: &[BlockPlan],
        numel: usize,
        bufs: &TensorBuffers,
        prep: GradPrep,
    ) -> Result<()> {
        let [m, v, factors, roots] = bufs.state[..] else {
            return Err(KeelError::Cuda(
                "internal: shampoo has four state slots".into(),
            ));
        };
        let [blk0, blk1, blk2] = self.small;
        // (E1) factors: L_j = beta2 L_j + w * (mode-j Gram of the block).
        let weight = if c.beta2 == 1.0 { 1.0 } else { 1.0 - c.beta2 } as f32 as f64;
        let decay = c.beta2 as f32 as f64;
        for plan in plans {
            self.gather(bufs.g, blk0, plan, Some(prep))?;
            let mut offset = plan.factor_offset;
            for (j, &n) in plan.dims.iter().enumerate() {
                let l = factors + 4 * offset as u64;
                let (outer, _, inner) = around(&plan.dims, j);
                if inner == 1 {
                    // The block as the column-major n x outer matrix M: M M^T.
                    self.sgemm(
                        (false, true),
                        (n, n, outer),
                        weight,
                        (blk0, n),
                        (blk0, n),
                        decay,
                        (l, n),
                    )?;
                } else {
                    // Slice o is the column-major inner x n matrix M_o: M_o^T M_o.
                    for o in 0..outer {
                        let xo = blk0 + 4 * (o * n * inner) as u64;
                        let beta = if o == 0 { decay } else { 1.0 };
                        self.sgemm(
                            (true, false),
                            (n, n, inner),
                            weight,
                            (xo, inner),
                            (xo, inner),
                            beta,
                            (l, n),
                        )?;
                    }
                }
                launch!(self, "keel_mirror_lower", Grid::Stride(n * n); l, n as u32);
                offset += n * n;
            }
        }
        // (E2)-(E4) inverse roots, when due.
        if c.recomputes(t) {
            let bias2 = if c.use_bias_correction && c.beta2 < 1.0 {
                1.0 - c.beta2.powf(t as f64)
            } else {
                1.0
            };
            for plan in plans {
                let exponent = -1.0 / (2 * plan.dims.len()) as f64;
                let mut offset = plan.factor_offset;
                for &n in &plan.dims {
                    let at = 4 * offset as u64;
                    self.root(factors + at, roots + at, n, (bias2, c.epsilon, exponent))?;
                    offset += n * n;
                }
            }
        }
        // (E3), (E5), (E6) over the whole tensor.
        let [g_hat, dg, dir] = self.big;
        let (graft, graft_beta2, graft_eps) = match c.grafting {
            Grafting::None => (GRAFT_NONE, 0.0, 0.0),
            Grafting::Adagrad { eps } => (GRAFT_ADAGRAD, 0.0, eps),
            Grafting::Adam { beta2, eps } => (GRAFT_ADAM, beta2, eps),
        };
        let graft_bc2 = 1.0 - graft_beta2.powf(t as f64);
        let bc1 = if c.use_bias_correction {
            1.0 - c.beta1.powf(t as f64)
        } else {
            1.0
        };
        launch!(self, "keel_shampoo_moments", Grid::Stride(numel);
            bufs.g, m, v, g_hat, dg, numel as u64, prep.lo, prep.hi, prep.scale,
            graft, graft_beta2 as f32, graft_bc2 as f32, graft_eps as f32,
            i32::from(c.beta1 != 0.0), c.beta1 as f32, bc1 as f32);
        // (E7)-(E8) the direction: the graft direction alone before
        // preconditioning starts, else the preconditioned g_hat per block,
        // grafted to the graft direction's block norm.
        let graft_only = t < c.start_step() && c.grafting != Grafting::None;
        let direction = if graft_only {
            dg
        } else {
            for plan in plans {
                self.gather(g_hat, blk0, plan, None)?;
                let (mut d, mut scratch) = (blk0, blk1);
                let mut offset = plan.factor_offset;
                for (j, &n) in plan.dims.iter().enumerate() {
                    self.mode_product(scratch, d, &plan.dims, j, roots + 4 * offset as u64)?;
                    std::mem::swap(&mut d, &mut scratch);
                    offset += n * n;
                }
                if c.grafting != Grafting::None {
                    self.gather(dg, blk2, plan, None)?;
                    self.norm_factor(blk2, d, plan.numel, NORM_RATIO, 1e-16)?;
                    launch!(self, "keel_scale_by", Grid::Stride(plan.numel);
                        d, plan.numel as u64, self.scalar);
                }
                launch!(self, "keel_scatter", Grid::Stride(plan.numel);
                    d, dir, plan.runs, (plan.numel / plan.run_len) as u64, plan.run_len as u32);
            }
            dir
        };
        // (E9)-(E10) decoupled weight decay and the update.
        self.apply(bufs, direction, numel, APPLY_SHAMPOO, lr as f32, wd as f32)
    }

    /// `y = x x_j P` for a row-major block with `dims` (P symmetric `n x n`).
    fn mode_product(&mut self, y: u64, x: u64, dims: &[usize], j: usize, p: u64) -> Result<()> {
        let (outer, n, inner) = around(dims, j);
        if inner == 1 {
            // Y = X P^T row-major, i.e. Y^T = P X^T column-major.
            return self.sgemm(
                (false, false),
                (n, outer, n),
                1.0,
                (p, n),
                (x, n),
                0.0,
                (y, n),
            );
        }
        for o in 0..outer {
            // Y_o = P X_o row-major, i.e. Y_o^T = X_o^T P column-major.
            let at = 4 * (o * n * inner) as u64;
            self.sgemm(
                (false, false),
                (inner, n, n),
                1.0,
                (x + at, inner),
                (p, n),
                0.0,
                (y + at, inner),
            )?;
        }
        Ok(())
    }

    /// The inverse root of the factor at `l` (f32, `n x n`) into `root`,
    /// with the factor's bias correction, epsilon and the root's exponent;
    /// when it fails the old root stays and the step's failure count goes
    /// up.
    fn root(
        &mut self,
        l: u64,
        root: u64,
        n: usize,
        (bias2, eps, exponent): (f64, f64, f64),
    ) -> Result<()> {
        let (info, bad, failures) = (
            self.flags + 4 * FLAG_INFO,
            self.flags + 4 * FLAG_BAD,
            self.flags + 4 * FLAG_FAILURES,
        );
        let Some(r) = &self.roots else {
            return Err(KeelError::Cuda("internal: no eigensolver buffers".into()));
        };
        let (a, qs, rr, w, work) = (r.a, r.qs, r.r, r.w, r.work);
        self.dev.fill(bad, 0, 4)?;
        launch!(self, "keel_root_input", Grid::Stride(n * n); l, a, n as u32, bias2, eps, bad);
        // A non-finite factor never reaches the solver (cuSOLVER may fail
        // on one instead of reporting it): it gets the identity, and the
        // raised flag makes the commit keep the old root.
        launch!(self, "keel_root_guard", Grid::Stride(n * n); a, n as u32, bad);
        if self.dev.syevd(n, a, w, work, info).is_err() {
            // A solver error counts as a failed root, as on the CPU (-1).
            self.dev.fill(info, 0xff, 4)?;
        }
        launch!(self, "keel_root_scale", Grid::Stride(n * n); a, w, qs, n as u32, eps, exponent, bad);
        // R = Qs Q^T in f64.
        self.dev.gemm(Gemm {
            f64: true,
            trans: (false, true),
            mnk: (n, n, n),
            alpha: 1.0,
            a: (qs, n),
            b: (a, n),
            beta: 0.0,
            c: (rr, n),
        })?;
        launch!(self, "keel_root_commit", Grid::One(1024); rr, root, n as u32, info, bad, failures);
        Ok(())
    }

    /// Leaves `||x||` and `||y||` combined per `mode` (see matrix.cu) in the
    /// device scalar; `y == 0` means no second vector.
    fn norm_factor(&mut self, x: u64, y: u64, n: usize, mode: i32, eps: f64) -> Result<()> {
        launch!(self, "keel_sumsq_partials", Grid::Parts(n); x, y, n as u64, self.partials);
        launch!(self, "keel_norm_finalize", Grid::One(BLOCK);
            self.partials, parts(n) as i32, mode, eps, self.scalar);
        Ok(())
    }

    /// The update of `p` along direction `d`, with the statistics sums.
    fn apply(
        &mut self,
        bufs: &TensorBuffers,
        d: u64,
        n: usize,
        mode: i32,
        a: f32,
        b: f32,
    ) -> Result<()> {
        launch!(self, "keel_matrix_apply", Grid::Parts(n); bufs.p, d, n as u64, mode, a, b, self.partials);
        launch!(self, "keel_sums_finalize", Grid::One(BLOCK); self.partials, parts(n) as i32, bufs.sums);
        Ok(())
    }

    /// Copies block `plan` of tensor buffer `x` into `out` (row-major block
    /// order), preparing gradients on the way when `prep` is given.
    fn gather(&mut self, x: u64, out: u64, plan: &BlockPlan, prep: Option<GradPrep>) -> Result<()> {
        let on = i32::from(prep.is_some());
        let p = prep.unwrap_or(GradPrep {
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
            scale: 1.0,
        });
        launch!(self, "keel_gather", Grid::Stride(plan.numel);
            x, out, plan.runs, (plan.numel / plan.run_len) as u64, plan.run_len as u32,
            on, p.lo, p.hi, p.scale);
        Ok(())
    }

    /// An f32 GEMM (see [`Gemm`]).
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &mut self,
        trans: (bool, bool),
        mnk: (usize, usize, usize),
        alpha: f64,
        a: (u64, usize),
        b: (u64, usize),
        beta: f64,
        c: (u64, usize),
    ) -> Result<()> {
        self.dev.gemm(Gemm {
            f64: false,
            trans,
            mnk,
            alpha,
            a,
            b,
            beta,
            c,
        })
    }
}
