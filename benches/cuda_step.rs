//! Criterion benchmarks of the CUDA step (feature `cuda`): AdamW, LAMB, LARS
//! and Lion at 1M and 100M parameters in one tensor and on 500 tensors, with
//! the bytes each moves per step as throughput (GB/s comparable with the
//! device's copy bandwidth); Muon and Shampoo on the gpt-small shapes. Each
//! step reads its statistics back, so a timed step has finished on the
//! device. Without a device it prints why and measures nothing.
//!
//! Run: `cargo bench --features cuda --bench cuda_step` (or filter, e.g.
//! `-- adamw/100M`). `scripts/gpu-check.sh` records the same sizes with
//! `keel bench --device cuda`, next to torch.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel::backend::cuda::{cuda_available, CudaOptimizer};
use keel::bench::BenchModel;
use keel::optim::bytes_per_param;
use keel::{Optimizer, OptimizerConfig, ParamSpec};

use common::values;

const KINDS: [&str; 4] = [
    r#"{"kind": "adamw", "lr": 0.001, "weight_decay": 0.1}"#,
    r#"{"kind": "lamb", "lr": 0.001, "weight_decay": 0.01}"#,
    r#"{"kind": "lars", "lr": 0.001}"#,
    r#"{"kind": "lion", "lr": 0.0001}"#,
];

const MATRIX: [&str; 3] = [
    r#"{"kind": "muon", "lr": 0.02}"#,
    r#"{"kind": "shampoo", "lr": 0.001, "precondition_frequency": 1, "grafting": {"kind": "adam"}}"#,
    r#"{"kind": "shampoo", "lr": 0.001, "precondition_frequency": 100, "grafting": {"kind": "adam"}}"#,
];

/// Times `config` over `specs` on device 0.
fn bench_specs(
    c: &mut Criterion,
    group: &str,
    id: BenchmarkId,
    config: &OptimizerConfig,
    specs: Vec<ParamSpec>,
    bytes: Option<u64>,
) {
    let mut opt = CudaOptimizer::new(config.clone(), specs.clone()).expect("optimizer");
    let mut p: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            opt.upload(&values(s.numel(), i as u32, 0.04))
                .expect("upload")
        })
        .collect();
    let g: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            opt.upload(&values(s.numel(), 1000 + i as u32, 0.02))
                .expect("upload")
        })
        .collect();
    let grads: Vec<_> = g.iter().collect();
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    if let Some(b) = bytes {
        group.throughput(Throughput::Bytes(b));
    }
    group.bench_function(id, |b| {
        b.iter(|| {
            let mut params: Vec<_> = p.iter_mut().collect();
            opt.step(&mut params, &grads).expect("step")
        })
    });
    group.finish();
}

fn cuda_step(c: &mut Criterion) {
    match cuda_available(0) {
        Ok(info) => println!("device: {} ({})", info.name, info.arch),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    }
    for kind in KINDS {
        let config = OptimizerConfig::from_json(kind).expect("valid config");
        let (bytes, _) = bytes_per_param(&config, 4);
        for (label, params) in [("1M", 1_000_000usize), ("100M", 100_000_000)] {
            for tensors in [1usize, 500] {
                let size = params / tensors;
                let specs = (0..tensors)
                    .map(|i| ParamSpec::new(format!("t{i}"), [size]))
                    .collect();
                let id = BenchmarkId::new(label, format!("{tensors}_tensors"));
                let total = (bytes * size * tensors) as u64;
                bench_specs(c, config.kind.name(), id, &config, specs, Some(total));
            }
        }
    }
    // Matrix optimizers over every 2-D (Muon: hidden) matrix of gpt-small.
    let model = BenchModel::GptSmall.specs();
    for json in MATRIX {
        let config = OptimizerConfig::from_json(json).expect("valid config");
        let specs: Vec<ParamSpec> = match config.kind.name() {
            "muon" => model
                .iter()
                .filter(|s| keel::bench::is_hidden_matrix(s))
                .cloned()
                .collect(),
            _ => model.clone(),
        };
        let label = match &config.kind {
            keel::OptimizerKind::Shampoo(s) => format!("gpt-small_f{}", s.precondition_frequency),
            _ => "gpt-small".to_string(),
        };
        bench_specs(
            c,
            config.kind.name(),
            BenchmarkId::new(label, specs.len()),
            &config,
            specs,
            None,
        );
    }
}

criterion_group!(benches, cuda_step);
criterion_main!(benches);
