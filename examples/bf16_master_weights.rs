//! bf16 parameters with f32 master weights: what stochastic rounding buys.
//!
//! Near 1.0 a bf16 ulp is 2^-8..2^-7 (0.004..0.008); 50 updates of 1e-4 move
//! the f32 master weights by 0.005. Rounding the masters to nearest gives
//! every bf16 weight the same value, up to half an ulp away from the master
//! and all in the same direction (a bias the model sees); stochastic rounding
//! makes each bf16 weight one of the two neighbours of its master, so that
//! their mean is the master's value.
//!
//! Run: `cargo run --release --example bf16_master_weights`

use half::bf16;
use keel::{MixedPrecisionOptimizer, Optimizer, OptimizerConfig, ParamGroup, ParamSpec, Rounding};

fn main() -> Result<(), keel::KeelError> {
    let n = 100_000;
    // Plain SGD with lr 1e-4 and a constant gradient of 1: each step moves
    // every parameter by -1e-4.
    let config = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 0.0001}"#)?;
    let grads = vec![bf16::from_f32(1.0); n];
    for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 7 }] {
        let specs = vec![ParamSpec::new("w", [n])];
        let groups = vec![ParamGroup::all(&specs)];
        let mut w = vec![bf16::from_f32(1.0); n];
        let mut opt =
            MixedPrecisionOptimizer::new(config.clone(), specs, groups, &[&w[..]], rounding)?;
        for _ in 0..50 {
            opt.step(&mut [&mut w[..]], &[&grads[..]])?;
        }
        let mean: f64 = w.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64;
        println!(
            "{rounding:?}: mean bf16 weight {mean:.5}, f32 master {:.5} (exact: {:.5})",
            opt.master(0)[0],
            1.0 - 50.0 * 1e-4
        );
    }
    Ok(())
}
