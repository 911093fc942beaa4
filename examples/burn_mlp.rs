//! Train a small MLP in burn with keel's LAMB: y = sin(x0 + x1 + x2 + x3).
//!
//! `cargo run --release --features burn --example burn_mlp`
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use keel::adapters::burn::KeelBurn;
use keel::OptimizerConfig;

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(4, 64).init(device),
            fc2: LinearConfig::new(64, 1).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.fc1.forward(x).tanh())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::default().autodiff();
    let mut model = Mlp::new(&device);

    let config =
        OptimizerConfig::from_json(r#"{"kind": "lamb", "lr": 0.02, "weight_decay": 0.01}"#)?;
    // keel's LAMB as burn's module optimizer; burn passes the learning rate.
    let mut optim = KeelBurn::new(config)?.init();

    for step in 0..=200 {
        let x = Tensor::<2>::random([256, 4], Distribution::Uniform(-1.0, 1.0), &device);
        let y = x.clone().sum_dim(1).sin();
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        if step % 20 == 0 {
            println!(
                "step {step:3}  loss {:.5}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.02, model, grads);
    }
    Ok(())
}
