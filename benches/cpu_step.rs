//! Criterion benchmarks of each optimizer's CPU step (f32, all cores) at 1M
//! and 10M parameters, as one tensor and as 100 tensors. Throughput is the
//! bytes keel moves per step (`keel::optim::bytes_per_param`), so criterion
//! reports GB/s directly comparable with the machine's memory bandwidth.
//!
//! `adamw-unchecked` is AdamW under `on_nonfinite = "unchecked"`, without the
//! gradient scan.
//!
//! Run: `cargo bench --bench cpu_step` (or filter, e.g. `-- adamw/10M`).

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel::optim::bytes_per_param;
use keel::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};

use common::values;

const KINDS: [&str; 7] = [
    r#"{"kind": "sgd", "lr": 0.001, "momentum": 0.9}"#,
    r#"{"kind": "adam", "lr": 0.001}"#,
    r#"{"kind": "adamw", "lr": 0.001}"#,
    r#"{"kind": "lamb", "lr": 0.001, "weight_decay": 0.01}"#,
    r#"{"kind": "lars", "lr": 0.001}"#,
    r#"{"kind": "lion", "lr": 0.0001}"#,
    // The step without the gradient scan (torch's fused step has none).
    r#"{"kind": "adamw", "lr": 0.001, "on_nonfinite": "unchecked"}"#,
];

fn cpu_step(c: &mut Criterion) {
    for kind in KINDS {
        let config = OptimizerConfig::from_json(kind).expect("valid config");
        let name = match config.skips_scan() {
            true => format!("{}-unchecked", config.kind.name()),
            false => config.kind.name().to_string(),
        };
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for (label, params) in [("1M", 1_000_000usize), ("10M", 10_000_000)] {
            for tensors in [1usize, 100] {
                let size = params / tensors;
                let specs: Vec<ParamSpec> = (0..tensors)
                    .map(|i| ParamSpec::new(format!("t{i}"), [size]))
                    .collect();
                let mut opt =
                    CpuOptimizer::<f32>::new(config.clone(), specs).expect("valid optimizer");
                let mut p: Vec<Vec<f32>> =
                    (0..tensors).map(|i| values(size, i as u32, 2.0)).collect();
                let g: Vec<Vec<f32>> = (0..tensors)
                    .map(|i| values(size, 1000 + i as u32, 0.02))
                    .collect();
                let grads: Vec<&[f32]> = g.iter().map(|x| &x[..]).collect();
                let (bytes, _) = bytes_per_param(&config, 4);
                group.throughput(Throughput::Bytes((bytes * size * tensors) as u64));
                group.bench_function(BenchmarkId::new(label, format!("{tensors}_tensors")), |b| {
                    b.iter(|| {
                        let mut params: Vec<&mut [f32]> =
                            p.iter_mut().map(|x| &mut x[..]).collect();
                        opt.step(&mut params, &grads).expect("step")
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, cpu_step);
criterion_main!(benches);
