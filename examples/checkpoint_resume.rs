//! Save the optimizer state mid-run, load it into a fresh optimizer, and
//! check that the resumed run is bit-identical to an uninterrupted one.
//!
//! Run: `cargo run --release --example checkpoint_resume`

use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};

fn grad(step: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 31 + step * 17) % 97) as f32 / 97.0 - 0.5)
        .collect()
}

fn main() -> Result<(), keel::KeelError> {
    let n = 1000;
    let config =
        OptimizerConfig::from_json(r#"{"kind": "lamb", "lr": 0.01, "weight_decay": 0.01}"#)?;
    let specs = vec![ParamSpec::new("w", [n])];

    // Ten steps straight.
    let mut straight = vec![0.1f32; n];
    let mut opt = CpuOptimizer::<f32>::new(config.clone(), specs.clone())?;
    for step in 0..10 {
        opt.step(&mut [&mut straight[..]], &[&grad(step, n)[..]])?;
    }

    // Five steps, save, load into a fresh optimizer, five more.
    let dir = std::env::temp_dir().join(format!("keel-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| keel::KeelError::State(e.to_string()))?;
    let path = dir.join("optimizer.safetensors");
    let mut resumed = vec![0.1f32; n];
    let mut first = CpuOptimizer::<f32>::new(config.clone(), specs.clone())?;
    for step in 0..5 {
        first.step(&mut [&mut resumed[..]], &[&grad(step, n)[..]])?;
    }
    first.save_state(&path)?;
    let mut second = CpuOptimizer::<f32>::new(config, specs)?;
    second.load_state(&path)?;
    // The file alone holds enough to rebuild the optimizer, too.
    let rebuilt = CpuOptimizer::<f32>::from_file(&path)?;
    assert_eq!(rebuilt.state_dict()?, second.state_dict()?);
    for step in 5..10 {
        second.step(&mut [&mut resumed[..]], &[&grad(step, n)[..]])?;
    }
    let identical = straight
        .iter()
        .zip(&resumed)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    println!(
        "checkpoint {} ({} bytes): resumed run bit-identical to the straight run: {identical}",
        path.display(),
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(identical);
    Ok(())
}
