//! Quickstart: fit a small linear model with a hand-written gradient, using
//! AdamW, a parameter group without weight decay for the bias, and a
//! warmup-cosine schedule. Prints the loss falling.
//!
//! Run: `cargo run --release --example quickstart`

use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamGroup, ParamSpec, Schedule};

fn main() -> Result<(), keel::KeelError> {
    // Data: y = X w* + b* with 4 features, 256 samples.
    let (n, d) = (256usize, 4usize);
    let true_w = [1.5f32, -2.0, 0.5, 3.0];
    let true_b = 0.7f32;
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let y: Vec<f32> = (0..n)
        .map(|i| (0..d).map(|j| x[i * d + j] * true_w[j]).sum::<f32>() + true_b)
        .collect();

    // Parameters: weights decay, the bias does not.
    let specs = vec![
        ParamSpec::new("linear.w", [d]),
        ParamSpec::new("linear.b", [1]),
    ];
    let groups = vec![
        ParamGroup::new("decay", ["linear.w"]),
        ParamGroup::new("no_decay", ["linear.b"]).with_weight_decay(false),
    ];
    let config =
        OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.05, "weight_decay": 0.01}"#)?;
    let mut opt = CpuOptimizer::<f32>::with_groups(config, specs, groups)?;
    let schedule = Schedule::WarmupCosine {
        peak_lr: 0.05,
        warmup_steps: 20,
        total_steps: 300,
        final_lr: 0.001,
    };

    let (mut w, mut b) = (vec![0.0f32; d], vec![0.0f32; 1]);
    for step in 0..300u64 {
        // Forward and the gradient of the mean squared error, by hand.
        let (mut gw, mut gb, mut loss) = (vec![0.0f32; d], vec![0.0f32; 1], 0.0f32);
        for i in 0..n {
            let pred: f32 = (0..d).map(|j| x[i * d + j] * w[j]).sum::<f32>() + b[0];
            let err = pred - y[i];
            loss += err * err / n as f32;
            for j in 0..d {
                gw[j] += 2.0 * err * x[i * d + j] / n as f32;
            }
            gb[0] += 2.0 * err / n as f32;
        }
        opt.set_lr(schedule.lr_at(step))?;
        let stats = opt.step(&mut [&mut w[..], &mut b[..]], &[&gw[..], &gb[..]])?;
        if step % 30 == 0 || step == 299 {
            // The ratio is undefined while w is still all zeros (step 0).
            let ratio = stats.tensors[0].update_ratio();
            let ratio = match ratio.is_finite() {
                true => format!("{ratio:.2e}"),
                false => "-".to_string(),
            };
            println!(
                "step {step:3}  lr {:.4}  loss {loss:.6}  |g| {:.4}  |dw|/|w| {ratio}",
                stats.lr, stats.global_grad_norm,
            );
        }
    }
    println!(
        "learned w = {w:.3?}, b = {:.3}  (true {true_w:?}, {true_b})",
        b[0]
    );
    Ok(())
}
