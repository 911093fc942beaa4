//! Train a small MLP in candle with keel's LAMB: y = sin(x0 + x1 + x2 + x3).
//!
//! `cargo run --release --features candle --example candle_mlp`
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
use keel::adapters::{candle::KeelCandle, no_decay_for_bias_and_norm};
use keel::OptimizerConfig;

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: linear(4, 64, vb.pp("fc1"))?,
            fc2: linear(64, 1, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.tanh()?)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;

    let config = OptimizerConfig::from_json(
        r#"{"kind": "lamb", "lr": 0.02, "weight_decay": 0.01, "clip_global_norm": 1.0}"#,
    )?;
    // Biases get no weight decay; every other Var does.
    let mut opt = KeelCandle::from_varmap_with(&varmap, config, no_decay_for_bias_and_norm)?;

    for step in 0..=200 {
        let x = Tensor::rand(-1f32, 1f32, (256, 4), &device)?;
        let y = x.sum_keepdim(1)?.sin()?;
        let loss = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        if step % 20 == 0 {
            let stats = opt.last_stats().expect("a step was taken");
            println!(
                "step {step:3}  loss {:.5}  grad norm {:.4}",
                loss.to_scalar::<f32>()?,
                stats.global_grad_norm
            );
        }
    }
    Ok(())
}
