//! SOAP has no external reference vectors: it is checked against keel's
//! AdamW (identity bases) and against an independent dense f64
//! implementation of the steps documented in `src/optim/soap.rs`.

mod common;
use common::{grads, step, values, Rng};

use faer::{Mat, Side};
use keel::real::Real;
use keel::{checkpoint, CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec, SkipReason};

fn config(kind: &str, extra: &str) -> OptimizerConfig {
    OptimizerConfig::from_json(&format!(
        r#"{{"kind": "{kind}", "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1{extra}}}"#
    ))
    .unwrap()
}

/// Runs `steps` steps with gradients from `seed`, returning the parameters.
fn train<T: Real>(
    c: OptimizerConfig,
    specs: &[ParamSpec],
    steps: u64,
) -> (Vec<Vec<T>>, CpuOptimizer<T>) {
    let mut opt = CpuOptimizer::<T>::new(c, specs.to_vec()).unwrap();
    let mut rng = Rng(7);
    let mut p: Vec<Vec<T>> = specs
        .iter()
        .map(|s| rng.vec(s.numel(), -1.0, 1.0))
        .collect();
    for k in 0..steps {
        step(&mut opt, &mut p, &grads(specs, k, 31));
    }
    (p, opt)
}

fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("w", [5, 3]),
        ParamSpec::new("b", [4]),
        ParamSpec::new("t", [2, 3, 2]),
    ]
}

#[test]
fn with_identity_bases_soap_is_adamw_bit_for_bit() {
    // The basis is first computed at step 1000: ten steps are plain AdamW.
    let soap = config("soap", r#", "start_preconditioning_step": 1000"#);
    let (a, _) = train::<f32>(soap, &specs(), 10);
    let (b, _) = train::<f32>(config("adamw", ""), &specs(), 10);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert_eq!(x.to_bits(), y.to_bits());
    }
}

#[test]
fn one_dimensional_tensors_stay_adamw_unless_asked() {
    let specs = vec![ParamSpec::new("b", [6])];
    let (a, _) = train::<f64>(config("soap", ""), &specs, 8);
    let (b, _) = train::<f64>(config("adamw", ""), &specs, 8);
    assert_eq!(a, b);
    let (c, _) = train::<f64>(config("soap", r#", "precondition_1d": true"#), &specs, 8);
    assert_ne!(a, c);
}

/// The steps of `src/optim/soap.rs`, written densely and independently.
struct DenseSoap {
    l: Mat<f64>,
    r: Mat<f64>,
    ql: Mat<f64>,
    qr: Mat<f64>,
    m: Mat<f64>,
    v: Mat<f64>,
    t: u64,
}

/// Eigenvectors by descending eigenvalue.
fn eigenvectors(a: &Mat<f64>) -> Mat<f64> {
    let e = a.self_adjoint_eigen(Side::Lower).unwrap();
    let n = a.nrows();
    let mut order: Vec<usize> = (0..n).collect();
    let s = e.S().column_vector();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    Mat::from_fn(n, n, |i, j| e.U()[(i, order[j])])
}

impl DenseSoap {
    fn new(rows: usize, cols: usize) -> Self {
        DenseSoap {
            l: Mat::zeros(rows, rows),
            r: Mat::zeros(cols, cols),
            ql: Mat::identity(rows, rows),
            qr: Mat::identity(cols, cols),
            m: Mat::zeros(rows, cols),
            v: Mat::zeros(rows, cols),
            t: 0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step(&mut self, w: &mut Mat<f64>, g: &Mat<f64>, lr: f64, wd: f64, start: u64, freq: u64) {
        let (b1, b2, eps): (f64, f64, f64) = (0.9, 0.99, 1e-8);
        self.t += 1;
        let t = self.t;
        self.l = &self.l * b2 + (g * g.transpose()) * (1.0 - b2);
        self.r = &self.r * b2 + (g.transpose() * g) * (1.0 - b2);
        if t >= start && (t - start).is_multiple_of(freq) {
            let m_params = &self.ql * &self.m * self.qr.transpose();
            self.ql = eigenvectors(&self.l);
            self.qr = eigenvectors(&self.r);
            self.m = self.ql.transpose() * m_params * &self.qr;
        }
        let gr = self.ql.transpose() * g * &self.qr;
        let (rows, cols) = (g.nrows(), g.ncols());
        let (bc1, bc2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        let mut n = Mat::<f64>::zeros(rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                self.m[(i, j)] = b1 * self.m[(i, j)] + (1.0 - b1) * gr[(i, j)];
                self.v[(i, j)] = b2 * self.v[(i, j)] + (1.0 - b2) * gr[(i, j)] * gr[(i, j)];
                n[(i, j)] = (self.m[(i, j)] / bc1) / ((self.v[(i, j)] / bc2).sqrt() + eps);
            }
        }
        let n = &self.ql * n * self.qr.transpose();
        *w = &*w * (1.0 - lr * wd) - n * lr;
    }
}

#[test]
fn rotated_steps_match_a_dense_reference() {
    let (rows, cols) = (5, 3);
    for (start, freq) in [(1, 1), (2, 3), (4, 2)] {
        let c = config(
            "soap",
            &format!(
                r#", "start_preconditioning_step": {start}, "precondition_frequency": {freq}"#
            ),
        );
        let specs = vec![ParamSpec::new("w", [rows, cols])];
        let mut opt = CpuOptimizer::<f64>::new(c, specs).unwrap();
        let mut rng = Rng(3);
        let mut p: Vec<f64> = rng.vec(rows * cols, -1.0, 1.0);
        let mut w = Mat::from_fn(rows, cols, |i, j| p[i * cols + j]);
        let mut dense = DenseSoap::new(rows, cols);
        for k in 0..9 {
            let g = values(rows * cols, 11 * k + 5);
            let gm = Mat::from_fn(rows, cols, |i, j| g[i * cols + j]);
            let stats = opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
            assert_eq!(stats.preconditioner_failures, 0);
            dense.step(&mut w, &gm, 0.01, 0.1, start, freq);
            let err = (0..rows * cols)
                .map(|e| (p[e] - w[(e / cols, e % cols)]).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "start {start} freq {freq} step {k}: {err:e}");
        }
        // The rotated path really moved away from AdamW.
        let mut adamw =
            CpuOptimizer::<f64>::new(config("adamw", ""), vec![ParamSpec::new("w", [rows, cols])])
                .unwrap();
        let mut q: Vec<f64> = Rng(3).vec(rows * cols, -1.0, 1.0);
        for k in 0..9 {
            let g = values(rows * cols, 11 * k + 5);
            adamw.step(&mut [&mut q[..]], &[&g[..]]).unwrap();
        }
        let gap = p
            .iter()
            .zip(&q)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap > 1e-4, "{gap}");
    }
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    let c = config(
        "soap",
        r#", "precondition_frequency": 3, "precondition_1d": true"#,
    );
    let specs = specs();
    let (straight, opt) = train::<f32>(c.clone(), &specs, 10);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("soap.safetensors");
    // Replays steps 0..5, saves, and continues in a fresh optimizer.
    let mut first = CpuOptimizer::<f32>::new(c, specs.clone()).unwrap();
    let mut rng = Rng(7);
    let mut p: Vec<Vec<f32>> = specs
        .iter()
        .map(|s| rng.vec(s.numel(), -1.0, 1.0))
        .collect();
    for k in 0..5 {
        step(&mut first, &mut p, &grads(&specs, k, 31));
    }
    first.save_state(&path).unwrap();
    let mut second =
        CpuOptimizer::<f32>::from_state_dict(&checkpoint::load(&path).unwrap()).unwrap();
    for k in 5..10 {
        step(&mut second, &mut p, &grads(&specs, k, 31));
    }
    for (a, b) in straight.iter().flatten().zip(p.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
    assert_eq!(opt.state_dict().unwrap(), second.state_dict().unwrap());
}

#[test]
fn a_nan_gradient_leaves_bases_and_moments_untouched() {
    let specs = vec![ParamSpec::new("w", [4, 6])];
    let mut opt = CpuOptimizer::<f64>::new(config("soap", ""), specs).unwrap();
    let mut p = vec![0.5f64; 24];
    let g = values(24, 1);
    opt.step(&mut [&mut p[..]], &[&g[..]]).unwrap();
    let before = (opt.state_dict().unwrap(), p.clone());
    let mut bad = values(24, 2);
    bad[3] = f64::INFINITY;
    let stats = opt.step(&mut [&mut p[..]], &[&bad[..]]).unwrap();
    assert!(matches!(
        stats.skipped,
        Some(SkipReason::NonFiniteGradient { .. })
    ));
    assert_eq!(opt.state_dict().unwrap(), before.0);
    assert_eq!(p, before.1);
}

#[test]
fn bases_are_orthonormal_eigenvectors_of_the_factors() {
    let specs = vec![ParamSpec::new("w", [4, 3])];
    let (_, opt) = train::<f64>(config("soap", ""), &specs, 1);
    let bases = opt.state_buffer(0, "bases").unwrap();
    let factors = opt.state_buffer(0, "factors").unwrap();
    for (off, n) in [(0, 4), (16, 3)] {
        let q = Mat::from_fn(n, n, |i, j| bases[off + i * n + j]);
        let l = Mat::from_fn(n, n, |i, j| factors[off + i * n + j]);
        let qtq = q.transpose() * &q;
        assert!((qtq - Mat::<f64>::identity(n, n)).norm_l2() < 1e-12);
        // Q^T L Q is diagonal with descending entries.
        let d = q.transpose() * &l * &q;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    assert!(d[(i, j)].abs() < 1e-12, "{d:?}");
                }
            }
            if i + 1 < n {
                assert!(d[(i, i)] >= d[(i + 1, i + 1)] - 1e-15);
            }
        }
    }
}

#[test]
fn bad_soap_config_names_the_field() {
    for (extra, field) in [
        (r#", "beta1": 1.0"#, "soap.beta1"),
        (r#", "shampoo_beta": -0.1"#, "soap.shampoo_beta"),
        (
            r#", "precondition_frequency": 0"#,
            "soap.precondition_frequency",
        ),
        (
            r#", "start_preconditioning_step": 0"#,
            "soap.start_preconditioning_step",
        ),
        (
            r#", "max_preconditioner_dim": 0"#,
            "soap.max_preconditioner_dim",
        ),
        (r#", "grafting": {"kind": "adam"}"#, "grafting"),
    ] {
        let text = format!(r#"{{"kind": "soap", "lr": 0.01{extra}}}"#);
        let msg = match OptimizerConfig::from_json(&text) {
            Err(e) => e.to_string(),
            Ok(c) => c.validate().unwrap_err().to_string(),
        };
        assert!(msg.contains(field), "{extra}: {msg}");
    }
}
