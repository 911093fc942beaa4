//! Shampoo beyond the conformance cases: blocking, checkpoints, robustness,
//! bad configuration.

mod common;
use common::{grads, step, values};

use keel::optim::shampoo::merged_dims;
use keel::{checkpoint, CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec, SkipReason};

/// Shampoo's base settings with the keys of `extra` (`, "key": value, ...`)
/// replacing or adding to them.
fn config(extra: &str) -> OptimizerConfig {
    let mut base: serde_json::Value = serde_json::from_str(
        r#"{"kind": "shampoo", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}"#,
    )
    .unwrap();
    let extra: serde_json::Value =
        serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
    for (key, value) in extra.as_object().unwrap() {
        base[key] = value.clone();
    }
    OptimizerConfig::from_json(&base.to_string()).unwrap()
}

#[test]
fn dims_merge_as_distributed_shampoo_does() {
    // The examples of SHAMPOO.md §1.
    assert_eq!(merged_dims(&[6, 4], 1024), vec![24]);
    assert_eq!(merged_dims(&[6, 4], 4), vec![6, 4]);
    assert_eq!(merged_dims(&[1], 1024), vec![1]);
    assert_eq!(merged_dims(&[1, 1], 8), vec![1]);
    assert_eq!(merged_dims(&[5, 1, 11], 5), vec![5, 11]);
    // Walk from the last dim: 4*3 fits in 12, then 2 does not.
    assert_eq!(merged_dims(&[2, 3, 4], 12), vec![2, 12]);
    assert_eq!(merged_dims(&[2, 3, 4], 24), vec![24]);
}

#[test]
fn blocks_have_the_documented_state_sizes() {
    // (5, 11) with D = 5: blocks (5,5), (5,5), (5,1): factors 3*25 + 3*25 + 25 + 1.
    let c = config(r#", "max_preconditioner_dim": 5"#);
    let opt = CpuOptimizer::<f64>::new(c, vec![ParamSpec::new("w", [5, 11])]).unwrap();
    assert_eq!(opt.state_buffer(0, "factors").unwrap().len(), 50 + 50 + 26);
    let roots = opt.state_buffer(0, "roots").unwrap();
    // Identity roots: the first block's 5x5 factor.
    for a in 0..5 {
        for b in 0..5 {
            assert_eq!(roots[a * 5 + b], if a == b { 1.0 } else { 0.0 });
        }
    }
    assert_eq!(opt.state_buffer(0, "exp_avg").unwrap().len(), 55);
}

fn run(
    opt: &mut CpuOptimizer<f32>,
    p: &mut [Vec<f32>],
    specs: &[ParamSpec],
    steps: std::ops::Range<u64>,
) {
    for k in steps {
        step(opt, p, &grads(specs, k, 100));
    }
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    let specs = vec![
        ParamSpec::new("w", [6, 10]),
        ParamSpec::new("b", [7]),
        ParamSpec::new("t", [3, 4, 5]),
    ];
    for extra in [
        r#", "max_preconditioner_dim": 4, "precondition_frequency": 2, "start_preconditioning_step": 3, "grafting": {"kind": "adagrad", "eps": 1e-8}"#,
        r#", "grafting": {"kind": "adam", "beta2": 0.99, "eps": 1e-8}, "weight_decay": 0.01"#,
        r#", "beta1": 0.0, "beta2": 1.0"#,
    ] {
        let init: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.5f32; s.numel()]).collect();
        let mut straight = init.clone();
        let mut opt = CpuOptimizer::<f32>::new(config(extra), specs.clone()).unwrap();
        run(&mut opt, &mut straight, &specs, 0..10);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shampoo.safetensors");
        let mut resumed = init;
        let mut first = CpuOptimizer::<f32>::new(config(extra), specs.clone()).unwrap();
        run(&mut first, &mut resumed, &specs, 0..5);
        first.save_state(&path).unwrap();
        let mut second =
            CpuOptimizer::<f32>::from_state_dict(&checkpoint::load(&path).unwrap()).unwrap();
        run(&mut second, &mut resumed, &specs, 5..10);
        for (a, b) in straight.iter().flatten().zip(resumed.iter().flatten()) {
            assert_eq!(a.to_bits(), b.to_bits(), "{extra}");
        }
        assert_eq!(opt.state_dict().unwrap(), second.state_dict().unwrap());
    }
}

#[test]
fn a_nan_gradient_leaves_factors_and_roots_untouched() {
    let specs = vec![ParamSpec::new("w", [4, 6])];
    let mut opt = CpuOptimizer::<f64>::new(config(""), specs.clone()).unwrap();
    let mut p = vec![0.5f64; 24];
    let g = values(24, 1);
    opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    let before = (opt.state_dict().unwrap(), p.clone());
    let mut bad = values(24, 2);
    bad[7] = f64::NAN;
    let stats = opt.step(&mut [&mut p[..]], &[&bad[..]]).unwrap();
    assert!(matches!(
        stats.skipped,
        Some(SkipReason::NonFiniteGradient { .. })
    ));
    assert_eq!(opt.state_dict().unwrap(), before.0);
    assert_eq!(p, before.1);
}

#[test]
fn an_overflowing_factor_keeps_the_previous_root_and_is_counted() {
    // f32 factors overflow on a finite gradient of 1e30: the root cannot be
    // recomputed, the previous one is kept, and parameters stay finite.
    let specs = vec![ParamSpec::new("w", [3, 5])];
    let c = config(r#", "grafting": {"kind": "adam", "beta2": 0.999, "eps": 1e-8}"#);
    let mut opt = CpuOptimizer::<f32>::new(c, specs).unwrap();
    let mut p = vec![0.5f32; 15];
    let g: Vec<f32> = values(15, 3).iter().map(|&x| x as f32).collect();
    let first = opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    assert_eq!(first.preconditioner_failures, 0);
    let roots_before = opt.state_buffer(0, "roots").unwrap().to_vec();
    let huge: Vec<f32> = g.iter().map(|x| x * 1e30).collect();
    let stats = opt.step(&mut [&mut p[..]], &[&huge[..]]).unwrap();
    assert!(stats.preconditioner_failures >= 1, "{stats:?}");
    assert_eq!(opt.state_buffer(0, "roots").unwrap(), &roots_before[..]);
    assert!(p.iter().all(|x| x.is_finite()), "{p:?}");
}

#[test]
fn bad_shampoo_config_names_the_field() {
    for (extra, field) in [
        (
            r#", "precondition_frequency": 10, "start_preconditioning_step": 3"#,
            "shampoo.start_preconditioning_step",
        ),
        (r#", "beta2": 0.0"#, "shampoo.beta2"),
        (r#", "beta2": 1.5"#, "shampoo.beta2"),
        (r#", "epsilon": 0.0"#, "shampoo.epsilon"),
        (
            r#", "max_preconditioner_dim": 0"#,
            "shampoo.max_preconditioner_dim",
        ),
        (
            r#", "precondition_frequency": 0"#,
            "shampoo.precondition_frequency",
        ),
        (
            r#", "grafting": {"kind": "adam", "beta2": 1.0}"#,
            "shampoo.grafting.beta2",
        ),
        (r#", "grafting": {"kind": "sgd"}"#, "sgd"),
        (
            r#", "grafting": {"kind": "adagrad", "eps": 0.0}"#,
            "shampoo.grafting.eps",
        ),
        (
            r#", "grafting": {"kind": "adam", "eps": 0.0}"#,
            "shampoo.grafting.eps",
        ),
    ] {
        let text = format!(r#"{{"kind": "shampoo", "lr": 0.01{extra}}}"#);
        let msg = match OptimizerConfig::from_json(&text) {
            Err(e) => e.to_string(),
            Ok(c) => c.validate().unwrap_err().to_string(),
        };
        assert!(msg.contains(field), "{extra}: {msg}");
    }
}

/// Trains `specs` for `steps` steps and returns the parameters.
fn trained<T: keel::real::Real>(
    c: OptimizerConfig,
    specs: &[ParamSpec],
    steps: u64,
) -> Vec<Vec<T>> {
    let mut opt = CpuOptimizer::<T>::new(c, specs.to_vec()).unwrap();
    let mut p: Vec<Vec<T>> = specs
        .iter()
        .map(|s| vec![T::from_f64x(0.5); s.numel()])
        .collect();
    for k in 0..steps {
        let stats = step(&mut opt, &mut p, &grads(specs, k, 100));
        assert_eq!(stats.preconditioner_failures, 0);
    }
    p
}

#[test]
fn roots_in_factor_precision_follow_the_f64_roots() {
    let specs = vec![ParamSpec::new("w", [12, 9]), ParamSpec::new("b", [7])];
    let graft = r#", "grafting": {"kind": "adam", "beta2": 0.999, "eps": 1e-8}, "epsilon": 1e-6"#;
    let f64_roots = config(graft);
    let factor_roots = config(&format!(r#"{graft}, "root_dtype": "factor""#));
    // With f64 parameters the option changes nothing.
    assert_eq!(
        trained::<f64>(f64_roots.clone(), &specs, 6),
        trained::<f64>(factor_roots.clone(), &specs, 6)
    );
    // With f32 parameters, f32 eigendecompositions stay close to f64 ones.
    let a = trained::<f32>(f64_roots, &specs, 6);
    let b = trained::<f32>(factor_roots, &specs, 6);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        diff += (*x as f64 - *y as f64).powi(2);
        norm += (*x as f64 - 0.5).powi(2);
    }
    assert!(
        diff.sqrt() < 1e-3 * norm.sqrt(),
        "{} vs {}",
        diff.sqrt(),
        norm.sqrt()
    );
    assert!(diff > 0.0, "the f32 path was not taken");
}
