//! The CUDA backend against the CPU backend and the conformance cases.
//!
//! Every test first probes for a device; where there is none (no driver, no
//! NVRTC, no GPU) it prints `skipped: no CUDA device` and passes, so this
//! file runs everywhere and means something on a GPU machine
//! (`scripts/gpu-check.sh`).
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;

use half::bf16;
use keel::backend::cuda::{cuda_available, CudaMixedPrecisionOptimizer, CudaOptimizer};
use keel::conformance;
use keel::{
    CpuOptimizer, KeelError, MixedPrecisionOptimizer, Optimizer, OptimizerConfig, ParamGroup,
    ParamSpec, Rounding, StepStats,
};

use common::Rng;

/// Whether a device is present; prints the skip line when not.
fn have_device() -> bool {
    match cuda_available(0) {
        Ok(info) => {
            println!(
                "device: {} ({}, {} MiB)",
                info.name,
                info.arch,
                info.total_memory >> 20
            );
            true
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            false
        }
    }
}

fn config(json: &str) -> OptimizerConfig {
    OptimizerConfig::from_json(json).expect("valid config")
}

/// `||a - b|| / ||b||` in f64.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    if n == 0.0 {
        d.sqrt()
    } else {
        (d / n).sqrt()
    }
}

#[test]
fn every_conformance_case_on_cuda_f32() {
    if !have_device() {
        return;
    }
    // On a GPU machine the binary runs away from its source tree
    // (scripts/gpu-check.sh): KEEL_CASE_DIR says where the cases are.
    let dir = match std::env::var_os("KEEL_CASE_DIR") {
        Some(d) => d.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance"),
    };
    let files = conformance::case_files(&[dir]).unwrap();
    let mut ran = 0;
    for file in files {
        let case = conformance::load_case(&file).unwrap();
        let config: OptimizerConfig = serde_json::from_value(case.optimizer.clone()).unwrap();
        let specs: Vec<ParamSpec> = case
            .params
            .iter()
            .map(|p| ParamSpec::new(&p.name, &p.shape))
            .collect();
        let mut opt = CudaOptimizer::new(config, specs).unwrap();
        let mut params: Vec<_> = case
            .params
            .iter()
            .map(|p| {
                let host: Vec<f32> = p.init.iter().map(|&x| x as f32).collect();
                opt.upload(&host).unwrap()
            })
            .collect();
        let mut worst = 0.0f64;
        for step in &case.steps {
            let grads: Vec<_> = step
                .grads
                .iter()
                .map(|g| {
                    let host: Vec<f32> = g.iter().map(|&x| x as f32).collect();
                    opt.upload(&host).unwrap()
                })
                .collect();
            let g: Vec<_> = grads.iter().collect();
            let mut p: Vec<_> = params.iter_mut().collect();
            let stats = opt.step(&mut p, &g).unwrap();
            assert!(stats.skipped.is_none(), "{}: skipped", case.id);
            for (dev, want) in params.iter().zip(&step.params_after) {
                let ours: Vec<f64> = opt
                    .download(dev)
                    .unwrap()
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                worst = worst.max(conformance::relative_error(&ours, want));
            }
        }
        assert!(
            worst <= case.tolerance.f32,
            "{} on cuda-f32: worst relative error {worst:e} > {:e}",
            case.id,
            case.tolerance.f32
        );
        println!("{}: cuda-f32 worst relative error {worst:.3e}", case.id);
        ran += 1;
    }
    assert_eq!(
        ran, 12,
        "the twelve public cases: elementwise, muon, shampoo"
    );
}

/// Mixed tensor sizes: tiny, odd, one chunk, one chunk and one element,
/// large; as many as fit, then the rest of `total` in one more tensor.
fn mixed_specs(total: usize) -> Vec<ParamSpec> {
    let mut sizes = Vec::new();
    let mut used = 0;
    for n in [1, 3, 255, 16_384, 16_385, 100_003, 1 << 20] {
        if used + n >= total {
            break;
        }
        sizes.push(n);
        used += n;
    }
    sizes.push(total - used);
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| ParamSpec::new(format!("t{i}"), [n]))
        .collect()
}

/// Runs `steps` steps of `config` on the CPU (f32) and on CUDA from the same
/// random start and gradients; returns both final parameters and the last
/// statistics of each.
fn cpu_and_cuda(
    config: &OptimizerConfig,
    specs: &[ParamSpec],
    steps: usize,
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, StepStats, StepStats) {
    let mut rng = Rng(seed);
    let init: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| rng.vec(s.numel(), -1.0, 1.0))
        .collect();
    let mut cpu = CpuOptimizer::<f32>::new(config.clone(), specs.to_vec()).unwrap();
    let mut gpu = CudaOptimizer::new(config.clone(), specs.to_vec()).unwrap();
    let mut host = init.clone();
    let mut dev: Vec<_> = init.iter().map(|p| gpu.upload(p).unwrap()).collect();
    let (mut cs, mut gs) = (None, None);
    for k in 0..steps {
        let scale = if k == 1 { 100.0 } else { 0.01 };
        let grads: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -scale, scale))
            .collect();
        let g: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| &mut p[..]).collect();
        cs = Some(cpu.step(&mut p, &g).unwrap());
        let gd: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let gr: Vec<_> = gd.iter().collect();
        let mut pr: Vec<_> = dev.iter_mut().collect();
        gs = Some(gpu.step(&mut pr, &gr).unwrap());
    }
    let dev_host = dev.iter().map(|d| gpu.download(d).unwrap()).collect();
    (host, dev_host, cs.unwrap(), gs.unwrap())
}

const RANDOM_CONFIGS: [&str; 9] = [
    r#"{"kind": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}"#,
    r#"{"kind": "sgd", "lr": 0.01, "nesterov": true, "momentum": 0.9}"#,
    r#"{"kind": "sgd", "lr": 0.01}"#,
    r#"{"kind": "adam", "lr": 0.001, "weight_decay": 0.01}"#,
    r#"{"kind": "adamw", "lr": 0.001, "weight_decay": 0.1, "clip_global_norm": 1.0}"#,
    r#"{"kind": "adamw", "lr": 0.001, "weight_decay": 0.1, "update_clip_rms": 1.0, "clip_value": 0.5}"#,
    r#"{"kind": "lamb", "lr": 0.001, "weight_decay": 0.01}"#,
    r#"{"kind": "lars", "lr": 0.1, "weight_decay": 0.0001, "momentum": 0.9}"#,
    r#"{"kind": "lion", "lr": 0.0001, "weight_decay": 0.1}"#,
];

#[test]
fn random_10m_elements_match_the_cpu_f32_path() {
    if !have_device() {
        return;
    }
    let specs = mixed_specs(10_000_000);
    for (i, json) in RANDOM_CONFIGS.iter().enumerate() {
        let config = config(json);
        let (cpu, gpu, cs, gs) = cpu_and_cuda(&config, &specs, 3, 100 + i as u64);
        for (t, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            // Same formulas, same f32 rounding, no FMA: only the order of
            // the norm sums differs (clip factors, trust ratios).
            let e = rel(g, c);
            assert!(e <= 1e-5, "{json}: tensor {t} relative error {e:e}");
        }
        let ge = (gs.global_grad_norm - cs.global_grad_norm).abs() / cs.global_grad_norm;
        assert!(
            ge <= 1e-5,
            "{json}: global norm {} vs {}",
            gs.global_grad_norm,
            cs.global_grad_norm
        );
        assert!((gs.clip_factor - cs.clip_factor).abs() <= 1e-5 * cs.clip_factor);
        for (a, b) in gs.tensors.iter().zip(&cs.tensors) {
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-4 * y.abs().max(1e-30);
            assert!(close(a.param_norm, b.param_norm), "{json}: param norm");
            assert!(
                close(a.update_norm, b.update_norm) || b.update_norm < 1e-12,
                "{json}: update norm {} vs {}",
                a.update_norm,
                b.update_norm
            );
            assert_eq!(a.trust_ratio.is_some(), b.trust_ratio.is_some(), "{json}");
            if let (Some(x), Some(y)) = (a.trust_ratio, b.trust_ratio) {
                assert!(close(x, y), "{json}: trust {x} vs {y}");
            }
            assert_eq!(
                a.update_clip_factor.is_some(),
                b.update_clip_factor.is_some()
            );
        }
    }
}

#[test]
fn unclipped_adamw_is_bit_identical_to_the_cpu() {
    if !have_device() {
        return;
    }
    let specs = mixed_specs(2_000_000);
    let config = config(r#"{"kind": "adamw", "lr": 0.001, "weight_decay": 0.1}"#);
    let (cpu, gpu, _, _) = cpu_and_cuda(&config, &specs, 3, 7);
    for (c, g) in cpu.iter().zip(&gpu) {
        let diff = c
            .iter()
            .zip(g)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(diff, 0, "{diff} elements differ");
    }
}

#[test]
fn bf16_path_matches_the_cpu_mixed_precision_path() {
    if !have_device() {
        return;
    }
    let specs = mixed_specs(3_000_000);
    for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 42 }] {
        for json in [RANDOM_CONFIGS[4], RANDOM_CONFIGS[6], RANDOM_CONFIGS[8]] {
            let config = config(json);
            let mut rng = Rng(9);
            let init: Vec<Vec<bf16>> = specs
                .iter()
                .map(|s| {
                    rng.vec::<f32>(s.numel(), -1.0, 1.0)
                        .iter()
                        .map(|&x| bf16::from_f32(x))
                        .collect()
                })
                .collect();
            let groups = vec![ParamGroup::all(&specs)];
            let init_refs: Vec<&[bf16]> = init.iter().map(|p| &p[..]).collect();
            let mut cpu = MixedPrecisionOptimizer::new(
                config.clone(),
                specs.clone(),
                groups.clone(),
                &init_refs,
                rounding,
            )
            .unwrap();
            let probe = CudaOptimizer::new(config.clone(), vec![]).unwrap();
            let mut dev: Vec<_> = init.iter().map(|p| probe.upload(p).unwrap()).collect();
            let dev_refs: Vec<_> = dev.iter().collect();
            let mut gpu = CudaMixedPrecisionOptimizer::new(
                config.clone(),
                specs.clone(),
                groups,
                &dev_refs,
                rounding,
                0,
            )
            .unwrap();
            let mut host = init.clone();
            for _ in 0..3 {
                let grads: Vec<Vec<bf16>> = specs
                    .iter()
                    .map(|s| {
                        rng.vec::<f32>(s.numel(), -0.01, 0.01)
                            .iter()
                            .map(|&x| bf16::from_f32(x))
                            .collect()
                    })
                    .collect();
                let g: Vec<&[bf16]> = grads.iter().map(|g| &g[..]).collect();
                let mut p: Vec<&mut [bf16]> = host.iter_mut().map(|p| &mut p[..]).collect();
                cpu.step(&mut p, &g).unwrap();
                let gd: Vec<_> = grads.iter().map(|g| probe.upload(g).unwrap()).collect();
                let gr: Vec<_> = gd.iter().collect();
                let mut pr: Vec<_> = dev.iter_mut().collect();
                gpu.step(&mut pr, &gr).unwrap();
            }
            for (t, (c, d)) in host.iter().zip(&dev).enumerate() {
                let d = probe.download(d).unwrap();
                let differ = c
                    .iter()
                    .zip(&d)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                // Identical master weights round identically; allow a few
                // where clip factors summed in another order moved a value
                // across a rounding boundary.
                assert!(
                    differ as f64 <= 1e-4 * c.len() as f64 + 1.0,
                    "{json} {rounding:?} tensor {t}: {differ} of {} bf16 values differ",
                    c.len()
                );
                let master = gpu.master(t).unwrap();
                assert!(rel(&master, cpu.master(t)) <= 1e-5);
            }
        }
    }
}

#[test]
fn a_non_finite_gradient_skips_the_step_and_writes_nothing() {
    if !have_device() {
        return;
    }
    let specs = mixed_specs(300_000);
    for json in RANDOM_CONFIGS {
        let config = config(json);
        let mut opt = CudaOptimizer::new(config.clone(), specs.clone()).unwrap();
        let mut rng = Rng(3);
        let init: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -1.0, 1.0))
            .collect();
        let mut dev: Vec<_> = init.iter().map(|p| opt.upload(p).unwrap()).collect();
        let mut grads: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -1.0, 1.0))
            .collect();
        // One good step, so the state is not all zeros.
        {
            let gd: Vec<_> = grads.iter().map(|g| opt.upload(g).unwrap()).collect();
            let gr: Vec<_> = gd.iter().collect();
            let mut pr: Vec<_> = dev.iter_mut().collect();
            opt.step(&mut pr, &gr).unwrap();
        }
        let before_params: Vec<Vec<f32>> = dev.iter().map(|d| opt.download(d).unwrap()).collect();
        let before_state = opt.state_dict().unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            grads[5][12_345] = bad;
            let gd: Vec<_> = grads.iter().map(|g| opt.upload(g).unwrap()).collect();
            let gr: Vec<_> = gd.iter().collect();
            let mut pr: Vec<_> = dev.iter_mut().collect();
            let stats = opt.step(&mut pr, &gr).unwrap();
            let skipped = stats.skipped.expect("skipped");
            assert_eq!(
                skipped,
                keel::SkipReason::NonFiniteGradient {
                    tensors: vec!["t5".into()]
                }
            );
            assert!(!stats.tensors[5].finite && stats.tensors[4].finite);
            assert_eq!(opt.step_count(), 1);
            let after: Vec<Vec<f32>> = dev.iter().map(|d| opt.download(d).unwrap()).collect();
            for (a, b) in after.iter().zip(&before_params) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{json}"
                );
            }
            assert_eq!(opt.state_dict().unwrap(), before_state, "{json}");
        }
        // The error policy refuses instead.
        let mut strict = config.clone();
        strict.on_nonfinite = keel::NonFinitePolicy::Error;
        let mut opt = CudaOptimizer::new(strict, specs.clone()).unwrap();
        let gd: Vec<_> = grads.iter().map(|g| opt.upload(g).unwrap()).collect();
        let gr: Vec<_> = gd.iter().collect();
        let mut pr: Vec<_> = dev.iter_mut().collect();
        let err = opt.step(&mut pr, &gr).unwrap_err();
        assert!(matches!(err, KeelError::NonFiniteGradient { .. }), "{err}");
    }
}

#[test]
fn state_round_trips_cpu_cuda_cpu_bit_identically() {
    if !have_device() {
        return;
    }
    let specs = mixed_specs(400_000);
    for json in RANDOM_CONFIGS {
        let config = config(json);
        let mut cpu = CpuOptimizer::<f32>::new(config.clone(), specs.clone()).unwrap();
        let mut rng = Rng(11);
        let mut host: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -1.0, 1.0))
            .collect();
        for _ in 0..2 {
            let grads: Vec<Vec<f32>> = specs
                .iter()
                .map(|s| rng.vec(s.numel(), -0.1, 0.1))
                .collect();
            let g: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
            let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| &mut p[..]).collect();
            cpu.step(&mut p, &g).unwrap();
        }
        let sd = cpu.state_dict().unwrap();
        // Through a file too: the same safetensors bytes.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        cpu.save_state(&path).unwrap();
        let mut gpu = CudaOptimizer::from_state_dict(&sd, 0).unwrap();
        assert_eq!(gpu.state_dict().unwrap(), sd, "{json}: CPU -> CUDA");
        gpu.load_state(&path).unwrap();
        let back = CpuOptimizer::<f32>::from_state_dict(&gpu.state_dict().unwrap()).unwrap();
        assert_eq!(back.state_dict().unwrap(), sd, "{json}: CUDA -> CPU");
        // And both continue alike.
        let grads: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -0.1, 0.1))
            .collect();
        let mut dev: Vec<_> = host.iter().map(|p| gpu.upload(p).unwrap()).collect();
        let g: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| &mut p[..]).collect();
        cpu.step(&mut p, &g).unwrap();
        let gd: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let gr: Vec<_> = gd.iter().collect();
        let mut pr: Vec<_> = dev.iter_mut().collect();
        gpu.step(&mut pr, &gr).unwrap();
        assert_eq!(gpu.step_count(), cpu.step_count());
        for (h, d) in host.iter().zip(&dev) {
            assert!(rel(&gpu.download(d).unwrap(), h) <= 1e-5, "{json}");
        }
    }
}

#[test]
fn mixed_precision_state_moves_between_backends() {
    if !have_device() {
        return;
    }
    let specs = vec![ParamSpec::new("w", [1000]), ParamSpec::new("b", [10])];
    let config = config(RANDOM_CONFIGS[4]);
    let init: Vec<Vec<bf16>> = specs
        .iter()
        .map(|s| vec![bf16::from_f32(0.5); s.numel()])
        .collect();
    let refs: Vec<&[bf16]> = init.iter().map(|p| &p[..]).collect();
    let groups = vec![ParamGroup::all(&specs)];
    let cpu = MixedPrecisionOptimizer::new(
        config.clone(),
        specs.clone(),
        groups.clone(),
        &refs,
        Rounding::Stochastic { seed: 5 },
    )
    .unwrap();
    let sd = cpu.state_dict().unwrap();
    let probe = CudaOptimizer::new(config.clone(), vec![]).unwrap();
    let dev: Vec<_> = init.iter().map(|p| probe.upload(p).unwrap()).collect();
    let dev_refs: Vec<_> = dev.iter().collect();
    let mut gpu =
        CudaMixedPrecisionOptimizer::new(config, specs, groups, &dev_refs, Rounding::Nearest, 0)
            .unwrap();
    gpu.load_state_dict(&sd).unwrap();
    assert_eq!(gpu.state_dict().unwrap(), sd);
}

#[test]
fn bad_buffers_and_unsupported_kinds_are_errors() {
    if !have_device() {
        return;
    }
    let specs = vec![ParamSpec::new("w", [4, 4])];
    let soap = config(r#"{"kind": "soap", "lr": 0.003}"#);
    let err = CudaOptimizer::new(soap, specs.clone()).unwrap_err();
    assert!(
        err.to_string()
            .contains("soap is not yet supported on cuda"),
        "{err}"
    );
    // Muon takes matrices only, as on the CPU.
    let muon = config(r#"{"kind": "muon", "lr": 0.02}"#);
    let err = CudaOptimizer::new(muon.clone(), vec![ParamSpec::new("c", [2, 3, 4])]).unwrap_err();
    assert!(matches!(err, KeelError::Shape { .. }), "{err}");
    // The matrix optimizers take f32 parameters.
    let probe = CudaOptimizer::new(muon.clone(), specs.clone()).unwrap();
    let bf = probe.upload(&[bf16::from_f32(0.5); 16]).unwrap();
    let err = CudaMixedPrecisionOptimizer::new(
        muon,
        specs.clone(),
        vec![ParamGroup::all(&specs)],
        &[&bf],
        Rounding::Nearest,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("f32 parameters"), "{err}");
    let mut opt = CudaOptimizer::new(config(RANDOM_CONFIGS[4]), specs).unwrap();
    let mut p = opt.upload(&[0.0f32; 16]).unwrap();
    let g = opt.upload(&[0.0f32; 15]).unwrap();
    let err = opt.step(&mut [&mut p], &[&g]).unwrap_err();
    assert!(matches!(err, KeelError::Shape { .. }), "{err}");
    assert_eq!(opt.step_count(), 0);
}

/// Muon and Shampoo settings that exercise every path: clipping (norm and
/// value), Nesterov on and off, both shape scales; Shampoo blocking (2-D,
/// 3-D and 1-D blocks), both graftings, plain sums, momentum off, a delayed
/// start and roots recomputed every other step.
const MATRIX_CONFIGS: [&str; 4] = [
    r#"{"kind": "muon", "lr": 0.02, "weight_decay": 0.01, "clip_global_norm": 1.0}"#,
    r#"{"kind": "muon", "lr": 0.02, "nesterov": false, "adjust_lr": "match_rms_adamw", "clip_value": 0.05}"#,
    r#"{"kind": "shampoo", "lr": 0.01, "epsilon": 1e-4, "max_preconditioner_dim": 48, "precondition_frequency": 2, "grafting": {"kind": "adam"}, "weight_decay": 0.01, "clip_global_norm": 1.0}"#,
    r#"{"kind": "shampoo", "lr": 0.01, "epsilon": 1e-4, "beta1": 0.0, "beta2": 1.0, "max_preconditioner_dim": 64, "start_preconditioning_step": 2, "grafting": {"kind": "adagrad"}, "clip_value": 0.05}"#,
];

/// Shapes for `config`: wide, tall and square matrices for Muon; for
/// Shampoo also a 3-D block (`[7, 9, 11]` stays 3-D at 48) and a long 1-D
/// tensor cut into many blocks.
fn matrix_specs(config: &OptimizerConfig) -> Vec<ParamSpec> {
    let mut specs = vec![
        ParamSpec::new("wide", [64, 96]),
        ParamSpec::new("tall", [200, 48]),
        ParamSpec::new("square", [33, 33]),
    ];
    if config.kind.name() == "shampoo" {
        specs.push(ParamSpec::new("cube", [7, 9, 11]));
        specs.push(ParamSpec::new("long", [1500]));
    }
    specs
}

/// `after - init`, per tensor.
fn deltas(init: &[Vec<f32>], after: &[Vec<f32>]) -> Vec<Vec<f32>> {
    init.iter()
        .zip(after)
        .map(|(a, b)| b.iter().zip(a).map(|(x, y)| x - y).collect())
        .collect()
}

#[test]
fn matrix_optimizers_match_the_cpu_within_f32_rounding() {
    if !have_device() {
        return;
    }
    for (i, json) in MATRIX_CONFIGS.iter().enumerate() {
        let config = config(json);
        let specs = matrix_specs(&config);
        let mut rng = Rng(500 + i as u64);
        let init: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -1.0, 1.0))
            .collect();
        let mut cpu64 = CpuOptimizer::<f64>::new(config.clone(), specs.clone()).unwrap();
        let mut cpu32 = CpuOptimizer::<f32>::new(config.clone(), specs.clone()).unwrap();
        let mut gpu = CudaOptimizer::new(config.clone(), specs.clone()).unwrap();
        let mut h64: Vec<Vec<f64>> = init
            .iter()
            .map(|p| p.iter().map(|&x| x as f64).collect())
            .collect();
        let mut h32 = init.clone();
        let mut dev: Vec<_> = init.iter().map(|p| gpu.upload(p).unwrap()).collect();
        for k in 0..5 {
            let scale = if k == 1 { 100.0 } else { 0.1 };
            let grads: Vec<Vec<f32>> = specs
                .iter()
                .map(|s| rng.vec(s.numel(), -scale, scale))
                .collect();
            let g64: Vec<Vec<f64>> = grads
                .iter()
                .map(|g| g.iter().map(|&x| x as f64).collect())
                .collect();
            let r64: Vec<&[f64]> = g64.iter().map(|g| &g[..]).collect();
            let mut p64: Vec<&mut [f64]> = h64.iter_mut().map(|p| &mut p[..]).collect();
            let s64 = cpu64.step(&mut p64, &r64).unwrap();
            let r32: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
            let mut p32: Vec<&mut [f32]> = h32.iter_mut().map(|p| &mut p[..]).collect();
            let s32 = cpu32.step(&mut p32, &r32).unwrap();
            let gd: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
            let gr: Vec<_> = gd.iter().collect();
            let mut pr: Vec<_> = dev.iter_mut().collect();
            let sg = gpu.step(&mut pr, &gr).unwrap();
            assert!(sg.skipped.is_none(), "{json}: step {k} skipped");
            assert_eq!(sg.preconditioner_failures, 0, "{json}: step {k}");
            assert!(
                (sg.clip_factor - s64.clip_factor).abs() <= 1e-5 * s64.clip_factor,
                "{json}: clip factor {} vs {}",
                sg.clip_factor,
                s64.clip_factor
            );
            // Norms against the f64 CPU: as close as the f32 CPU (10x), or
            // 1e-4.
            for (t, ((a, f), b)) in sg
                .tensors
                .iter()
                .zip(&s32.tensors)
                .zip(&s64.tensors)
                .enumerate()
            {
                let err = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-12);
                for (what, got, f32_cpu, want) in [
                    ("param", a.param_norm, f.param_norm, b.param_norm),
                    ("update", a.update_norm, f.update_norm, b.update_norm),
                ] {
                    assert!(
                        err(got, want) <= (10.0 * err(f32_cpu, want)).max(1e-4),
                        "{json}: tensor {t} step {k} {what} norm {got} vs {want} (cpu-f32 {f32_cpu})"
                    );
                }
            }
        }
        assert_eq!(gpu.step_count(), 5);
        // The change of every tensor, against the f64 CPU path: the CUDA
        // f32 path may be off by what f32 rounding costs the CPU f32 path
        // (10x, for the different summation orders of cuBLAS and faer, and
        // Muon's literal iteration against the CPU's spectral one), or 1e-4.
        let want: Vec<Vec<f32>> = h64
            .iter()
            .zip(&init)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (*x - *y as f64) as f32)
                    .collect()
            })
            .collect();
        let cpu_d = deltas(&init, &h32);
        let dev_host: Vec<Vec<f32>> = dev.iter().map(|d| gpu.download(d).unwrap()).collect();
        let gpu_d = deltas(&init, &dev_host);
        for (t, spec) in specs.iter().enumerate() {
            let e32 = rel(&cpu_d[t], &want[t]);
            let eg = rel(&gpu_d[t], &want[t]);
            println!("{json} {}: cpu-f32 {e32:.2e}, cuda-f32 {eg:.2e}", spec.name);
            assert!(
                eg <= (10.0 * e32).max(1e-4),
                "{json} {}: cuda-f32 off by {eg:e} (cpu-f32 {e32:e})",
                spec.name
            );
        }
    }
}

#[test]
fn matrix_optimizers_skip_non_finite_steps_and_move_state_between_backends() {
    if !have_device() {
        return;
    }
    for json in MATRIX_CONFIGS {
        let config = config(json);
        let specs = matrix_specs(&config);
        let mut rng = Rng(77);
        let mut host: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -1.0, 1.0))
            .collect();
        let mut cpu = CpuOptimizer::<f32>::new(config.clone(), specs.clone()).unwrap();
        for _ in 0..3 {
            let grads: Vec<Vec<f32>> = specs
                .iter()
                .map(|s| rng.vec(s.numel(), -0.1, 0.1))
                .collect();
            let g: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
            let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| &mut p[..]).collect();
            cpu.step(&mut p, &g).unwrap();
        }
        // CPU -> CUDA -> CPU: the same state, bit for bit (factors and
        // roots included).
        let sd = cpu.state_dict().unwrap();
        let mut gpu = CudaOptimizer::from_state_dict(&sd, 0).unwrap();
        assert_eq!(gpu.state_dict().unwrap(), sd, "{json}: CPU -> CUDA");
        let back = CpuOptimizer::<f32>::from_state_dict(&gpu.state_dict().unwrap()).unwrap();
        assert_eq!(back.state_dict().unwrap(), sd, "{json}: CUDA -> CPU");
        // A non-finite gradient skips the step and writes nothing.
        let mut dev: Vec<_> = host.iter().map(|p| gpu.upload(p).unwrap()).collect();
        let mut grads: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| rng.vec(s.numel(), -0.1, 0.1))
            .collect();
        let good = grads.clone();
        grads[1][17] = f32::NAN;
        {
            let gd: Vec<_> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
            let gr: Vec<_> = gd.iter().collect();
            let mut pr: Vec<_> = dev.iter_mut().collect();
            let stats = gpu.step(&mut pr, &gr).unwrap();
            assert!(stats.skipped.is_some(), "{json}: not skipped");
        }
        assert_eq!(gpu.state_dict().unwrap(), sd, "{json}: state written");
        for (d, h) in dev.iter().zip(&host) {
            let after = gpu.download(d).unwrap();
            assert!(
                after.iter().zip(h).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{json}: params written"
            );
        }
        // Both backends continue alike from the same state.
        let g: Vec<&[f32]> = good.iter().map(|g| &g[..]).collect();
        let before = host.clone();
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| &mut p[..]).collect();
        cpu.step(&mut p, &g).unwrap();
        let gd: Vec<_> = good.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let gr: Vec<_> = gd.iter().collect();
        let mut pr: Vec<_> = dev.iter_mut().collect();
        gpu.step(&mut pr, &gr).unwrap();
        assert_eq!(gpu.step_count(), 4);
        for ((d, h), b) in dev.iter().zip(&host).zip(&before) {
            let dg: Vec<f32> = gpu
                .download(d)
                .unwrap()
                .iter()
                .zip(b)
                .map(|(x, y)| x - y)
                .collect();
            let dc: Vec<f32> = h.iter().zip(b).map(|(x, y)| x - y).collect();
            let e = rel(&dg, &dc);
            assert!(e <= 1e-3, "{json}: update differs by {e:e}");
        }
    }
}
