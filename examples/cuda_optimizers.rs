//! keel's optimizers on a CUDA device (feature `cuda`): AdamW for a bias,
//! Muon for a weight matrix and Shampoo for a second one, all with their
//! parameters, gradients and state in device memory. Fits each to a fixed
//! target (loss `0.5 ||w - target||^2`, gradient `w - target`, computed on the
//! host here for brevity) and prints the distance falling, then moves
//! Shampoo's state to the CPU backend and continues there.
//!
//! Without a GPU (or driver, NVRTC, cuBLAS) it prints what is missing and
//! exits cleanly.
//!
//! Run: `cargo run --release --features cuda --example cuda_optimizers`

use keel::backend::cuda::{cuda_available, CudaOptimizer};
use keel::{CpuOptimizer, KeelError, Optimizer, OptimizerConfig, ParamSpec};

/// A smooth target of `n` values.
fn target(n: usize, phase: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect()
}

/// `||a - b||`.
fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt()
}

/// Fits one device tensor to `goal` for `steps` steps with `opt`, printing
/// the distance every few steps; returns the final host values.
fn fit(
    opt: &mut CudaOptimizer,
    init: &[f32],
    goal: &[f32],
    steps: usize,
) -> Result<Vec<f32>, KeelError> {
    let mut w = opt.upload(init)?;
    for t in 0..steps {
        let host = opt.download(&w)?;
        if t % 10 == 0 {
            println!("    step {t:3}: distance {:.4}", distance(&host, goal));
        }
        let grad: Vec<f32> = host.iter().zip(goal).map(|(x, y)| x - y).collect();
        let g = opt.upload(&grad)?;
        opt.step(&mut [&mut w], &[&g])?;
    }
    let host = opt.download(&w)?;
    println!("    step {steps:3}: distance {:.4}", distance(&host, goal));
    Ok(host)
}

fn main() -> Result<(), KeelError> {
    let info = match cuda_available(0) {
        Ok(info) => info,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return Ok(());
        }
    };
    println!("device: {} ({})", info.name, info.arch);

    println!("adamw, bias [256]:");
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.05}"#)?;
    let mut adamw = CudaOptimizer::new(config, vec![ParamSpec::new("b", [256])])?;
    fit(&mut adamw, &vec![0.0; 256], &target(256, 0.0), 40)?;

    println!("muon, weight [64, 128]:");
    let config =
        OptimizerConfig::from_json(r#"{"kind": "muon", "lr": 0.05, "weight_decay": 0.0}"#)?;
    let mut muon = CudaOptimizer::new(config, vec![ParamSpec::new("w1", [64, 128])])?;
    fit(&mut muon, &vec![0.0; 64 * 128], &target(64 * 128, 1.0), 40)?;

    println!("shampoo (adam grafting), weight [96, 48]:");
    let config = OptimizerConfig::from_json(
        r#"{"kind": "shampoo", "lr": 0.05, "epsilon": 1e-6, "grafting": {"kind": "adam"}}"#,
    )?;
    let spec = ParamSpec::new("w2", [96, 48]);
    let goal = target(96 * 48, 2.0);
    let mut shampoo = CudaOptimizer::new(config, vec![spec.clone()])?;
    let mut w = fit(&mut shampoo, &vec![0.0; 96 * 48], &goal, 30)?;

    // The same state dict on the CPU backend: continue there.
    let mut cpu = CpuOptimizer::<f32>::from_state_dict(&shampoo.state_dict()?)?;
    for _ in 0..10 {
        let grad: Vec<f32> = w.iter().zip(&goal).map(|(x, y)| x - y).collect();
        cpu.step(&mut [&mut w[..]], &[&grad[..]])?;
    }
    println!(
        "    10 more steps on the CPU from the CUDA state: distance {:.4}",
        distance(&w, &goal)
    );
    Ok(())
}
