//! Spike guard: train a noisy quadratic with AdamW under a `LossGuard` that
//! rolls back to its last in-memory snapshot on a loss spike, then skips two
//! batches and halves the lr for 20 steps. An outlier batch (loss x10,
//! gradient x100) is injected at step 150 and a NaN loss at step 250.
//!
//! Run: `cargo run --release --example spike_guard`

use keel::guard::{Decision, LossGuard, LossGuardConfig, SpikeAction};
use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};

fn main() -> Result<(), keel::KeelError> {
    let d = 8;
    let target: Vec<f32> = (0..d).map(|i| i as f32 / 4.0 - 1.0).collect();
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.05}"#)?;
    let mut opt = CpuOptimizer::<f32>::new(config, vec![ParamSpec::new("w", [d])])?;
    let mut guard = LossGuard::<f32>::new(LossGuardConfig {
        action: SpikeAction::Rollback,
        snapshot_every: 50,
        lr_factor: 0.5,
        lr_steps: 20,
        skip_after_rollback: 2,
        ..LossGuardConfig::default()
    })?;
    let mut w = vec![vec![0.0f32; d]];
    guard.snapshot(&w, &opt)?;
    let mut seed = 1u64;
    let mut noise = move || {
        // A small LCG: batch noise in [-0.5, 0.5).
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };

    for step in 0..400u64 {
        // Loss 1 + |w - w*|^2 / 2 with batch noise; its gradient w - w* + noise.
        let mut grad: Vec<f32> = (0..d)
            .map(|i| w[0][i] - target[i] + 0.1 * noise())
            .collect();
        let dist: f32 = (0..d).map(|i| (w[0][i] - target[i]).powi(2)).sum();
        let mut loss = (1.0 + 0.5 * dist + 0.02 * noise()) as f64;
        if step == 150 {
            loss *= 10.0;
            grad.iter_mut().for_each(|g| *g *= 100.0);
        }
        if step == 250 {
            loss = f64::NAN;
        }
        let decision = guard.observe(step, loss);
        match decision {
            Decision::Step => {
                opt.set_lr(0.05 * guard.lr_factor())?;
                let mut params: Vec<&mut [f32]> = w.iter_mut().map(|p| &mut p[..]).collect();
                opt.step(&mut params, &[&grad[..]])?;
                if guard.after_step(&w, &opt)? {
                    println!("step {step:3}  loss {loss:.4}  snapshot taken");
                }
            }
            Decision::Skip => println!("step {step:3}  loss {loss:.4}  skipped"),
            Decision::Rollback => {
                guard.restore(&mut w, &mut opt)?;
                let at = guard.snapshot_step().unwrap_or(0);
                println!("step {step:3}  loss {loss:.4}  rolled back to the snapshot of step {at}");
            }
        }
    }
    let c = guard.counts();
    println!(
        "spikes {}  spike steps {}  non-finite {}  skips {}  rollbacks {}  snapshots {}",
        c.spikes, c.spike_steps, c.nonfinite, c.skips, c.rollbacks, c.snapshots
    );
    let err: f32 = (0..d)
        .map(|i| (w[0][i] - target[i]).abs())
        .fold(0.0, f32::max);
    println!("max |w - w*| = {err:.3}");
    Ok(())
}
