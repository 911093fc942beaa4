//! `keel bench --device cuda`: the median time of a CUDA step next to the
//! device's copy bandwidth (the floor no memory-bound step can beat).

use std::time::Instant;

use half::bf16;

use super::{CudaMixedPrecisionOptimizer, CudaOptimizer};
use crate::bench::{
    fill, median, step_bytes, BenchDtype, BenchOptions, BenchReport, ModelParts, ModelStepper,
};
use crate::error::{KeelError, Result};
use crate::group::ParamGroup;
use crate::optim::Optimizer;
use crate::tensor::ParamSpec;

/// Bytes per buffer of the copy-bandwidth measurement.
const COPY_BYTES: usize = 1 << 30;

/// Device-to-device copy bandwidth on `opt_stream`'s device in GB/s (bytes
/// read plus bytes written per second), best of several 1 GiB copies.
pub fn copy_bandwidth(opt_stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<f64> {
    let n = COPY_BYTES / 4;
    let err = super::driver_error;
    let src = opt_stream.alloc_zeros::<f32>(n).map_err(err)?;
    let mut dst = opt_stream.alloc_zeros::<f32>(n).map_err(err)?;
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        opt_stream.synchronize().map_err(err)?;
        let t0 = Instant::now();
        opt_stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
        opt_stream.synchronize().map_err(err)?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * COPY_BYTES as f64 / best / 1e9)
}

/// Runs `opts.warmup + opts.steps` steps of `opt` on `p` and `g`, pushing
/// the milliseconds of each timed step to `times`.
fn time_steps<O: Optimizer>(
    opt: &mut O,
    p: &mut [O::Param],
    g: &[O::Grad],
    opts: &BenchOptions,
    times: &mut Vec<f64>,
) -> Result<()>
where
    O::Param: Sized,
    O::Grad: Sized,
{
    let g: Vec<_> = g.iter().collect();
    for k in 0..opts.warmup + opts.steps {
        let mut pr: Vec<_> = p.iter_mut().collect();
        let t0 = Instant::now();
        // The step reads its statistics back: it has finished when it
        // returns.
        opt.step(&mut pr, &g)?;
        if k >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(())
}

/// Times `opts` on device 0 with tensors of `sizes`.
pub fn run(opts: &BenchOptions, sizes: &[usize]) -> Result<BenchReport> {
    crate::bench::check_options(opts)?;
    let specs: Vec<ParamSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| ParamSpec::new(format!("t{i}"), [n]))
        .collect();
    let mut times = Vec::with_capacity(opts.steps);
    let (device, bandwidth) = match opts.dtype {
        BenchDtype::F32 => {
            let mut opt = CudaOptimizer::new(opts.config.clone(), specs)?;
            let mut p = Vec::with_capacity(sizes.len());
            let mut g = Vec::with_capacity(sizes.len());
            for (i, &n) in sizes.iter().enumerate() {
                p.push(opt.upload(&fill(n, 2 * i as u64 + 1, 1.0))?);
                g.push(opt.upload(&fill(n, 2 * i as u64 + 2, 0.01))?);
            }
            time_steps(&mut opt, &mut p, &g, opts, &mut times)?;
            let bw = copy_bandwidth(opt.stream())?;
            (opt.device().name.clone(), bw)
        }
        BenchDtype::Bf16 => {
            let probe = CudaOptimizer::new(opts.config.clone(), Vec::new())?;
            let mut p = Vec::with_capacity(sizes.len());
            let mut g = Vec::with_capacity(sizes.len());
            let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
            for (i, &n) in sizes.iter().enumerate() {
                p.push(probe.upload(&to_bf16(fill(n, 2 * i as u64 + 1, 1.0)))?);
                g.push(probe.upload(&to_bf16(fill(n, 2 * i as u64 + 2, 0.01)))?);
            }
            let init: Vec<_> = p.iter().collect();
            let groups = vec![ParamGroup::all(&specs)];
            let mut opt = CudaMixedPrecisionOptimizer::new(
                opts.config.clone(),
                specs,
                groups,
                &init,
                crate::Rounding::Nearest,
                0,
            )?;
            time_steps(&mut opt, &mut p, &g, opts, &mut times)?;
            let bw = copy_bandwidth(opt.stream())?;
            (opt.device().name.clone(), bw)
        }
    };
    if times.is_empty() {
        return Err(KeelError::config("bench.steps", "must be at least 1"));
    }
    let (bytes, min_bytes) = step_bytes(opts, true);
    let ms = median(times.clone());
    let gb = |b: usize, ms: f64| b as f64 * opts.params as f64 / (ms * 1e-3) / 1e9;
    let floor_ms = min_bytes as f64 * opts.params as f64 / (bandwidth * 1e9) * 1e3;
    Ok(BenchReport {
        optimizer: opts.config.kind.name().to_string(),
        grad_check: true,
        device: format!("cuda:{device}"),
        params: opts.params,
        tensors: sizes.len(),
        dtype: opts.dtype,
        threads: 0,
        steps: times.len(),
        ms_per_step: ms,
        min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
        bytes_per_param: bytes,
        min_bytes_per_param: min_bytes,
        gb_per_s: gb(bytes, ms),
        floor_ms,
        floor_gb_per_s: bandwidth,
        pct_of_floor: 100.0 * floor_ms / ms,
    })
}

/// The CUDA optimizers of a model bench (`keel bench --model ... --device
/// cuda`), with `params` and `grads` uploaded to device 0; also the device
/// name.
pub(crate) fn model_stepper(
    parts: ModelParts,
    specs: &[ParamSpec],
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
) -> Result<(ModelStepper, String)> {
    let mut sets = Vec::with_capacity(parts.len());
    let mut name = String::new();
    for (config, idx) in parts {
        let part_specs = idx.iter().map(|&i| specs[i].clone()).collect();
        let opt = CudaOptimizer::new(config, part_specs)?;
        let mut p = Vec::with_capacity(idx.len());
        let mut g = Vec::with_capacity(idx.len());
        for &i in &idx {
            p.push(opt.upload(&params[i])?);
            g.push(opt.upload(&grads[i])?);
        }
        name = opt.device().name.clone();
        sets.push((opt, p, g));
    }
    let step: ModelStepper = Box::new(move || {
        for (opt, p, g) in sets.iter_mut() {
            let mut pr: Vec<_> = p.iter_mut().collect();
            let gr: Vec<_> = g.iter().collect();
            opt.step(&mut pr, &gr)?;
        }
        Ok(())
    });
    Ok((step, format!("cuda:{name}")))
}
