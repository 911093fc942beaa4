//! The CUDA C sources of `kernels/`, compiled at run time by NVRTC.
//!
//! Each `.cu` file is one module; `#include "x.cuh"` lines are replaced by
//! the embedded header text before compiling (so NVRTC needs no include path
//! and no CUDA headers). PTX is compiled once per architecture and process;
//! modules are loaded once per device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::error::{KeelError, Result};

/// The embedded headers, by the name `#include` uses.
const HEADERS: [(&str, &str); 2] = [
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    (
        "elementwise.cuh",
        include_str!("../../../kernels/elementwise.cuh"),
    ),
];

/// One kernel source file and the entry points it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The file name under `kernels/`.
    pub file: &'static str,
    /// The file's text (headers not yet inlined).
    pub text: &'static str,
    /// The `extern "C"` kernels it defines.
    pub kernels: &'static [&'static str],
}

/// Every kernel source, in load order.
pub const SOURCES: [KernelSource; 4] = [
    KernelSource {
        file: "reduce.cu",
        text: include_str!("../../../kernels/reduce.cu"),
        kernels: &[
            "keel_scan_f32",
            "keel_scan_bf16",
            "keel_tensor_sums",
            "keel_global_finalize",
        ],
    },
    KernelSource {
        file: "step.cu",
        text: include_str!("../../../kernels/step.cu"),
        kernels: &[
            "keel_sgd_f32",
            "keel_sgd_bf16",
            "keel_sgd_plain_f32",
            "keel_sgd_plain_bf16",
            "keel_adam_f32",
            "keel_adam_bf16",
            "keel_lion_f32",
            "keel_lion_bf16",
        ],
    },
    KernelSource {
        file: "trust.cu",
        text: include_str!("../../../kernels/trust.cu"),
        kernels: &[
            "keel_lars_f32",
            "keel_lars_bf16",
            "keel_adam_apply",
            "keel_lamb_moments_f32",
            "keel_lamb_moments_bf16",
            "keel_adam_moments_f32",
            "keel_adam_moments_bf16",
        ],
    },
    KernelSource {
        file: "matrix.cu",
        text: include_str!("../../../kernels/matrix.cu"),
        kernels: &[
            "keel_sumsq_partials",
            "keel_norm_finalize",
            "keel_sums_finalize",
            "keel_scale_by",
            "keel_muon_momentum",
            "keel_shampoo_moments",
            "keel_matrix_apply",
            "keel_gather",
            "keel_scatter",
            "keel_mirror_lower",
            "keel_root_input",
            "keel_root_guard",
            "keel_root_scale",
            "keel_root_commit",
        ],
    },
];

/// The source with every `#include "…"` of an embedded header replaced by
/// the header's text (each header once; later includes of it are dropped).
pub fn expand(text: &str) -> Result<String> {
    let mut out = String::with_capacity(text.len() + 8192);
    let mut seen = Vec::new();
    expand_into(text, &mut out, &mut seen)?;
    Ok(out)
}

fn expand_into(text: &str, out: &mut String, seen: &mut Vec<&'static str>) -> Result<()> {
    for line in text.lines() {
        let include = line
            .trim()
            .strip_prefix("#include")
            .map(|rest| rest.trim().trim_matches('"'));
        match include {
            Some(name) => {
                let (name, header) = HEADERS
                    .iter()
                    .find(|(h, _)| *h == name)
                    .ok_or_else(|| KeelError::Cuda(format!("unknown kernel header `{name}`")))?;
                if !seen.contains(name) {
                    seen.push(name);
                    expand_into(header, out, seen)?;
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// Whether libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC options of every kernel: the target architecture (`sm_90`);
/// no fused multiply-add contraction, so each formula rounds exactly as the
/// CPU backend's (which enables no FMA either); and unannotated functions
/// (the kernels' local lambdas) compiled for the device.
fn options(arch: &str) -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--device-as-default-execution-space".into(),
        ],
        name: None,
        ..Default::default()
    }
}

/// Compiles one source for `arch` (e.g. `sm_90`) and returns its PTX text;
/// a compile error carries NVRTC's log.
pub fn compile(source: &KernelSource, arch: &str) -> Result<String> {
    if !nvrtc_available() {
        return Err(KeelError::Cuda(
            "libnvrtc not found: install the CUDA toolkit or the nvidia-cuda-nvrtc wheel \
             and put its lib/ folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let text = expand(source.text)?;
    let mut opts = options(arch);
    opts.name = Some(source.file.to_string());
    match cudarc::nvrtc::compile_ptx_with_opts(text, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, options, .. }) => Err(KeelError::Cuda(format!(
            "NVRTC could not compile kernels/{} for {arch} (options {options:?}):\n{}",
            source.file,
            log.to_string_lossy()
        ))),
        Err(e) => Err(KeelError::Cuda(format!(
            "NVRTC failed on kernels/{} for {arch}: {e}",
            source.file
        ))),
    }
}

/// PTX of every source for `arch`, compiled once per process.
pub fn ptx_for_arch(arch: &str) -> Result<Arc<Vec<String>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Vec<String>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = lock(cache)?.get(arch) {
        return Ok(p.clone());
    }
    // Compiled outside the lock: NVRTC takes a while, and a racing thread at
    // worst compiles the same text twice.
    let ptx = SOURCES
        .iter()
        .map(|s| compile(s, arch))
        .collect::<Result<Vec<_>>>()?;
    let ptx = Arc::new(ptx);
    lock(cache)?.insert(arch.to_string(), ptx.clone());
    Ok(ptx)
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| KeelError::Cuda("kernel cache lock poisoned".into()))
}

/// The loaded kernels of one device, by name.
#[derive(Debug)]
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
}

impl Kernels {
    /// The kernel `name` (one of [`SOURCES`]' entry points).
    pub(crate) fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| KeelError::Cuda(format!("kernel `{name}` is not loaded")))
    }
}

/// The kernels of the device of `ctx`, compiled for `arch` and loaded once
/// per process and device.
pub(crate) fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Arc<Kernels>> {
    static LOADED: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(Default::default);
    let mut map = lock(loaded)?;
    if let Some(k) = map.get(&ctx.ordinal()) {
        return Ok(k.clone());
    }
    let ptx = ptx_for_arch(arch)?;
    let mut functions = HashMap::new();
    let mut modules = Vec::new();
    for (source, text) in SOURCES.iter().zip(ptx.iter()) {
        let module = ctx
            .load_module(Ptx::from_src(text.clone()))
            .map_err(|e| KeelError::Cuda(format!("loading kernels/{}: {e}", source.file)))?;
        for &name in source.kernels {
            let f = module
                .load_function(name)
                .map_err(|e| KeelError::Cuda(format!("kernel `{name}`: {e}")))?;
            functions.insert(name, f);
        }
        modules.push(module);
    }
    let k = Arc::new(Kernels {
        functions,
        _modules: modules,
    });
    map.insert(ctx.ordinal(), k.clone());
    Ok(k)
}
