//! The usual Muon setup: Muon for hidden weight matrices, AdamW for
//! everything else (embeddings, output head, gains, biases) — two keel
//! optimizers over a split of the parameters. Trains a one-hidden-layer MLP
//! on a synthetic regression task with a hand-written backward pass.
//!
//! Run: `cargo run --release --example muon_hybrid`

use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamGroup, ParamSpec};

const D_IN: usize = 8;
const HIDDEN: usize = 32;
const N: usize = 256;

fn main() -> Result<(), keel::KeelError> {
    // Data: y = sin(sum of x) from fixed pseudo-random inputs.
    let x: Vec<f32> = (0..N * D_IN)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0)
        .collect();
    let y: Vec<f32> = (0..N)
        .map(|n| x[n * D_IN..(n + 1) * D_IN].iter().sum::<f32>().sin())
        .collect();

    // Hidden matrix -> Muon. Head, biases -> AdamW (biases without decay).
    let mut w1: Vec<f32> = (0..HIDDEN * D_IN)
        .map(|i| ((i * 31 % 17) as f32 / 17.0 - 0.5) * 0.5)
        .collect();
    let (mut b1, mut w2, mut b2) = (vec![0.0f32; HIDDEN], vec![0.01f32; HIDDEN], vec![0.0f32; 1]);
    let muon_cfg =
        OptimizerConfig::from_json(r#"{"kind": "muon", "lr": 0.02, "weight_decay": 0.01}"#)?;
    let mut muon =
        CpuOptimizer::<f32>::new(muon_cfg, vec![ParamSpec::new("fc1.w", [HIDDEN, D_IN])])?;
    let adam_specs = vec![
        ParamSpec::new("head.w", [1, HIDDEN]),
        ParamSpec::new("fc1.b", [HIDDEN]),
        ParamSpec::new("head.b", [1]),
    ];
    let adam_groups = vec![
        ParamGroup::new("head", ["head.w"]),
        ParamGroup::new("biases", ["fc1.b", "head.b"]).with_weight_decay(false),
    ];
    let adam_cfg =
        OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.005, "weight_decay": 0.01}"#)?;
    let mut adamw = CpuOptimizer::<f32>::with_groups(adam_cfg, adam_specs, adam_groups)?;

    for step in 0..400 {
        let (mut gw1, mut gb1) = (vec![0.0f32; HIDDEN * D_IN], vec![0.0f32; HIDDEN]);
        let (mut gw2, mut gb2, mut loss) = (vec![0.0f32; HIDDEN], vec![0.0f32; 1], 0.0f32);
        for n in 0..N {
            let xn = &x[n * D_IN..(n + 1) * D_IN];
            let h: Vec<f32> = (0..HIDDEN)
                .map(|j| {
                    (b1[j] + (0..D_IN).map(|k| w1[j * D_IN + k] * xn[k]).sum::<f32>()).max(0.0)
                })
                .collect();
            let err = b2[0] + (0..HIDDEN).map(|j| w2[j] * h[j]).sum::<f32>() - y[n];
            loss += err * err / N as f32;
            let d = 2.0 * err / N as f32;
            gb2[0] += d;
            for j in 0..HIDDEN {
                gw2[j] += d * h[j];
                if h[j] > 0.0 {
                    gb1[j] += d * w2[j];
                    for k in 0..D_IN {
                        gw1[j * D_IN + k] += d * w2[j] * xn[k];
                    }
                }
            }
        }
        let m = muon.step(&mut [&mut w1[..]], &[&gw1[..]])?;
        adamw.step(
            &mut [&mut w2[..], &mut b1[..], &mut b2[..]],
            &[&gw2[..], &gb1[..], &gb2[..]],
        )?;
        if step % 50 == 0 || step == 399 {
            println!(
                "step {step:3}  loss {loss:.5}  fc1 |dW|/|W| {:.2e}",
                m.tensors[0].update_ratio()
            );
        }
    }
    Ok(())
}
