//! Muon beyond the conformance case: Newton–Schulz properties, shape errors,
//! momentum state, checkpoints.

mod common;
use common::values;

use faer::{Mat, Par};
use keel::optim::muon::{newton_schulz, newton_schulz_spectral};
use keel::{checkpoint, CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec};
use proptest::prelude::*;

const NS: [f64; 3] = [3.4445, -4.775, 2.0315];

fn config(extra: &str) -> OptimizerConfig {
    OptimizerConfig::from_json(&format!(r#"{{"kind": "muon", "lr": 0.02{extra}}}"#)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// A random wide matrix (well conditioned) comes out of five Newton–Schulz
    /// steps, literal or spectral, with every singular value in roughly
    /// [0.5, 1.5].
    #[test]
    fn newton_schulz_singular_values_near_one(rows in 1usize..24, extra in 0usize..40, seed in any::<u64>()) {
        let cols = 2 * rows + extra;
        let v = values(rows * cols, seed);
        let x = Mat::<f64>::from_fn(rows, cols, |i, j| v[i * cols + j]);
        let (mut literal, mut spectral) = (x.clone(), x);
        newton_schulz(&mut literal, 5, NS, 1e-7, Par::Seq);
        newton_schulz_spectral(&mut spectral, 5, NS, 1e-7, Par::Seq);
        for out in [literal, spectral] {
            for sv in out.singular_values().unwrap() {
                prop_assert!((0.5..1.5).contains(&sv), "singular value {sv} for {rows}x{cols}");
            }
        }
    }

    /// f32 Newton–Schulz agrees with f64 on the same matrix.
    #[test]
    fn newton_schulz_f32_matches_f64(rows in 1usize..16, extra in 0usize..20, seed in any::<u64>()) {
        let cols = 2 * rows + extra;
        let v = values(rows * cols, seed);
        let mut x64 = Mat::<f64>::from_fn(rows, cols, |i, j| v[i * cols + j]);
        let mut x32 = Mat::<f32>::from_fn(rows, cols, |i, j| v[i * cols + j] as f32);
        newton_schulz(&mut x64, 5, NS, 1e-7, Par::Seq);
        newton_schulz(&mut x32, 5, NS, 1e-7, Par::Seq);
        let mut diff = 0.0f64;
        let mut norm = 0.0f64;
        for i in 0..rows {
            for j in 0..cols {
                diff += (x32[(i, j)] as f64 - x64[(i, j)]).powi(2);
                norm += x64[(i, j)].powi(2);
            }
        }
        prop_assert!(diff.sqrt() <= 1e-4 * norm.sqrt(), "{} vs {}", diff.sqrt(), norm.sqrt());
    }

    /// The spectral evaluation (what Muon's step uses) is the literal
    /// iteration: to 1e-10 in f64, and its f32 result within 1e-3 of it.
    /// Tall, square and wide shapes, including rank-deficient ones.
    #[test]
    fn spectral_newton_schulz_is_the_iteration(rows in 1usize..20, cols in 1usize..40, rank_cut in 0usize..3, seed in any::<u64>()) {
        let (rows, cols) = (rows.min(cols), rows.max(cols));
        let v = values(rows * cols, seed);
        // Repeating rows lowers the rank (zero singular values).
        let x = Mat::<f64>::from_fn(rows, cols, |i, j| v[(i % (rows - rows.min(rank_cut)).max(1)) * cols + j]);
        let (mut literal, mut spectral) = (x.clone(), x.clone());
        newton_schulz(&mut literal, 5, NS, 1e-7, Par::Seq);
        newton_schulz_spectral(&mut spectral, 5, NS, 1e-7, Par::Seq);
        let scale = literal.norm_l2().max(1e-300);
        prop_assert!((&literal - &spectral).norm_l2() <= 1e-10 * scale, "{rows}x{cols}");

        // In f32 the spectral path is less exact on near-singular inputs
        // (its Gram matrix squares the condition number): within 1e-3 of
        // the f64 iteration, against ~4e-3 for torch's default bf16 one.
        let mut x32 = Mat::<f32>::from_fn(rows, cols, |i, j| x[(i, j)] as f32);
        newton_schulz_spectral(&mut x32, 5, NS, 1e-7, Par::Seq);
        let err = Mat::<f64>::from_fn(rows, cols, |i, j| x32[(i, j)] as f64 - literal[(i, j)]).norm_l2();
        prop_assert!(err <= 1e-3 * scale, "f32 {err} for {rows}x{cols}");
    }
}

#[test]
fn non_matrix_parameters_are_refused() {
    for shape in [vec![6], vec![2, 3, 4], vec![]] {
        let err = CpuOptimizer::<f32>::new(config(""), vec![ParamSpec::new("bad.w", &shape)])
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bad.w") && msg.contains("2-D"), "{msg}");
    }
}

#[test]
fn bad_muon_config_names_the_field() {
    for (extra, field) in [
        (r#", "momentum": 1.0"#, "muon.momentum"),
        (r#", "ns_steps": 0"#, "muon.ns_steps"),
        (r#", "ns_steps": 4000000000"#, "muon.ns_steps"),
        (r#", "eps": -1"#, "muon.eps"),
        (r#", "adjust_lr": "sideways""#, "sideways"),
    ] {
        let text = format!(r#"{{"kind": "muon", "lr": 0.02{extra}}}"#);
        let msg = match OptimizerConfig::from_json(&text) {
            Err(e) => e.to_string(),
            Ok(c) => c.validate().unwrap_err().to_string(),
        };
        assert!(msg.contains(field), "{extra}: {msg}");
    }
}

/// After one step from zero momentum, `b = (1 - momentum) * g`, and with
/// Nesterov the update direction is orthogonalized `g + m*(b - g)`; the
/// parameter moves by `lr * s * NS(u)` plus weight decay.
#[test]
fn first_step_matches_a_hand_computation() {
    let (rows, cols) = (4usize, 7usize);
    let g: Vec<f64> = values(rows * cols, 3);
    let p0: Vec<f64> = values(rows * cols, 4);
    let c = config(r#", "momentum": 0.9, "weight_decay": 0.1"#);
    let mut opt = CpuOptimizer::<f64>::new(c, vec![ParamSpec::new("w", [rows, cols])]).unwrap();
    let mut p = p0.clone();
    opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    let b = opt.state_buffer(0, "momentum_buffer").unwrap();
    for (b, g) in b.iter().zip(&g) {
        assert!((b - 0.1 * g).abs() < 1e-15);
    }
    // u = g + 0.9 * (0.1 g - g) = 0.19 g; NS normalizes, so NS(u) = NS(g).
    let mut x = Mat::<f64>::from_fn(rows, cols, |i, j| g[i * cols + j]);
    newton_schulz(&mut x, 5, NS, 1e-7, Par::Seq);
    for i in 0..rows {
        for j in 0..cols {
            let want = p0[i * cols + j] * (1.0 - 0.02 * 0.1) - 0.02 * x[(i, j)];
            assert!((p[i * cols + j] - want).abs() < 1e-12, "({i},{j})");
        }
    }
}

#[test]
fn tall_matrices_are_orthogonalized_through_the_transpose() {
    // rows > cols: the result must be the transpose of the wide case.
    let (rows, cols) = (9usize, 4usize);
    let g: Vec<f64> = values(rows * cols, 5);
    let gt: Vec<f64> = (0..cols * rows)
        .map(|k| g[(k % rows) * cols + k / rows])
        .collect();
    let c = config(r#", "weight_decay": 0.0, "adjust_lr": "match_rms_adamw""#);
    let mut tall =
        CpuOptimizer::<f64>::new(c.clone(), vec![ParamSpec::new("w", [rows, cols])]).unwrap();
    let mut wide = CpuOptimizer::<f64>::new(c, vec![ParamSpec::new("w", [cols, rows])]).unwrap();
    let (mut pt, mut pw) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
    tall.step(&mut [&mut pt[..]], &[&g[..]]).unwrap();
    wide.step(&mut [&mut pw[..]], &[&gt[..]]).unwrap();
    for i in 0..rows {
        for j in 0..cols {
            assert!((pt[i * cols + j] - pw[j * rows + i]).abs() < 1e-14);
        }
    }
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    let specs = vec![ParamSpec::new("a", [5, 8]), ParamSpec::new("b", [12, 3])];
    let grad = |k: u64| -> Vec<Vec<f32>> {
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                values(s.numel(), 10 * k + i as u64)
                    .iter()
                    .map(|&x| x as f32)
                    .collect()
            })
            .collect()
    };
    let init: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.3f32; s.numel()]).collect();
    let run = |opt: &mut CpuOptimizer<f32>, p: &mut Vec<Vec<f32>>, steps: std::ops::Range<u64>| {
        for k in steps {
            let g = grad(k);
            let gr: Vec<&[f32]> = g.iter().map(|x| &x[..]).collect();
            let mut pr: Vec<&mut [f32]> = p.iter_mut().map(|x| &mut x[..]).collect();
            opt.step(&mut pr, &gr).unwrap();
        }
    };
    let mut straight = init.clone();
    let mut opt = CpuOptimizer::<f32>::new(config(""), specs.clone()).unwrap();
    run(&mut opt, &mut straight, 0..10);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("muon.safetensors");
    let mut resumed = init;
    let mut first = CpuOptimizer::<f32>::new(config(""), specs.clone()).unwrap();
    run(&mut first, &mut resumed, 0..5);
    first.save_state(&path).unwrap();
    let mut second =
        CpuOptimizer::<f32>::from_state_dict(&checkpoint::load(&path).unwrap()).unwrap();
    run(&mut second, &mut resumed, 5..10);
    for (a, b) in straight.iter().flatten().zip(resumed.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
    assert_eq!(opt.state_dict().unwrap(), second.state_dict().unwrap());
}
