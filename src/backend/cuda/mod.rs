//! The CUDA backend (feature `cuda`): the elementwise optimizers (SGD, Adam,
//! AdamW, Lion, LAMB, LARS) as fused multi-tensor kernels over device
//! buffers, and Muon and Shampoo through cuBLAS and cuSOLVER.
//!
//! - [`cuda_available`] probes for a driver, NVRTC and a device without ever
//!   panicking (cudarc panics when a library is missing, so it is probed
//!   first).
//! - [`CudaOptimizer`] implements [`crate::Optimizer`] over `CudaSlice<f32>`
//!   parameters and gradients; [`CudaMixedPrecisionOptimizer`] over
//!   `CudaSlice<bf16>` with f32 master weights on the device.
//! - Both read and write the same [`crate::StateDict`] as
//!   [`crate::CpuOptimizer`]`<f32>` and [`crate::MixedPrecisionOptimizer`]:
//!   checkpoints move between the backends in both directions.
//! - Kernels live in `kernels/` and are compiled by NVRTC for the device's
//!   compute capability at first use, once per process ([`kernels`]).
//!
//! - Muon and Shampoo (f32 parameters) run the CPU backend's math as GEMMs,
//!   f64 eigendecompositions and small kernels (`matrix`); their device
//!   step is also run, in the tests, on a host emulation of the device
//!   (`emulator`) against the CPU backend.
//!
//! SOAP is not yet supported on CUDA: constructing a CUDA optimizer for it
//! returns [`crate::KeelError::Cuda`] (use the CPU backend for it).

pub mod bench;
#[cfg(test)]
mod emulator;
pub mod kernels;
mod matrix;
mod optimizer;

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::{KeelError, Result};

pub use optimizer::{CudaMixedPrecisionOptimizer, CudaOptimizer};

/// What [`cuda_available`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device ordinal.
    pub ordinal: usize,
    /// The device name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// The NVRTC architecture option value, e.g. `sm_90`.
    pub arch: String,
    /// Total device memory in bytes.
    pub total_memory: usize,
}

/// Whether a CUDA device `ordinal` can run keel's kernels: the driver
/// library and NVRTC load, and the device exists. Never panics; the error
/// says what is missing.
pub fn cuda_available(ordinal: usize) -> Result<DeviceInfo> {
    open(ordinal).map(|(_, info)| info)
}

/// Opens device `ordinal` (primary context) after probing the libraries.
pub(crate) fn open(ordinal: usize) -> Result<(Arc<CudaContext>, DeviceInfo)> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KeelError::Cuda(
            "no CUDA driver: libcuda could not be loaded (no NVIDIA driver on this machine)".into(),
        ));
    }
    if !kernels::nvrtc_available() {
        return Err(KeelError::Cuda(
            "libnvrtc could not be loaded: install the CUDA toolkit (or the \
             nvidia-cuda-nvrtc wheel) and put its lib/ folder on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    // cudarc panics on some driver states it does not expect; keep the
    // promise of never panicking.
    let opened = std::panic::catch_unwind(|| -> Result<_> {
        let count = CudaContext::device_count().map_err(driver_error)?;
        if count <= 0 || ordinal >= count as usize {
            return Err(KeelError::Cuda(format!(
                "no CUDA device {ordinal}: the driver reports {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_error)?;
        let (major, minor) = ctx.compute_capability().map_err(driver_error)?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(driver_error)?,
            compute_capability: (major, minor),
            arch: format!("sm_{major}{minor}"),
            total_memory: ctx.total_mem().map_err(driver_error)?,
        };
        Ok((ctx, info))
    });
    opened.unwrap_or_else(|_| {
        Err(KeelError::Cuda(
            "the CUDA driver failed to initialize".into(),
        ))
    })
}

/// A driver error as a keel error.
pub(crate) fn driver_error(e: cudarc::driver::DriverError) -> KeelError {
    KeelError::Cuda(format!("CUDA driver: {e}"))
}
