//! Property tests of the CPU optimizers: f32 agrees with f64, clipping never
//! increases the global norm, the LAMB/LARS trust ratios match their
//! definitions, lr = 0 changes nothing, and a non-finite gradient leaves
//! everything bit-identical.
//!
//! Expectations are computed here in f64 from the documented semantics
//! (tests/data/conformance/README.md), never by calling keel's own math.

use half::bf16;
use keel::config::NonFinitePolicy;
use keel::real::Real;
use keel::{
    CpuOptimizer, KeelError, MixedPrecisionOptimizer, Optimizer, OptimizerConfig, ParamGroup,
    ParamSpec, Rounding, SkipReason, StateData, StateDict, StepStats,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Every optimizer kind, with the options that change its code path. `lr` is
/// set per test.
const VARIANTS: &[(&str, &str)] = &[
    ("sgd", r#"{"kind":"sgd","lr":1}"#),
    (
        "sgd_momentum",
        r#"{"kind":"sgd","lr":1,"momentum":0.9,"dampening":0.1,"weight_decay":0.01}"#,
    ),
    (
        "sgd_nesterov",
        r#"{"kind":"sgd","lr":1,"momentum":0.9,"nesterov":true,"weight_decay":0.01}"#,
    ),
    ("adam", r#"{"kind":"adam","lr":1,"weight_decay":0.01}"#),
    ("adamw", r#"{"kind":"adamw","lr":1,"weight_decay":0.1}"#),
    (
        "adamw_update_clip",
        r#"{"kind":"adamw","lr":1,"weight_decay":0.1,"update_clip_rms":0.5}"#,
    ),
    (
        "adamw_clipped",
        r#"{"kind":"adamw","lr":1,"weight_decay":0.1,"clip_value":0.5,"clip_global_norm":2.0}"#,
    ),
    ("lamb", r#"{"kind":"lamb","lr":1,"weight_decay":0.01}"#),
    (
        "lars",
        r#"{"kind":"lars","lr":1,"weight_decay":0.01,"trust_coefficient":0.02,"eps":1e-9}"#,
    ),
    (
        "lars_nesterov",
        r#"{"kind":"lars","lr":1,"momentum":0.8,"nesterov":true,"weight_decay":0.01,"trust_coefficient":0.02}"#,
    ),
    ("lion", r#"{"kind":"lion","lr":1,"weight_decay":0.01}"#),
];

fn config(json: &str, lr: f64) -> OptimizerConfig {
    let mut c = OptimizerConfig::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"));
    c.set_lr(lr).unwrap();
    c
}

/// Random parameters and `steps` gradients for 1..=4 tensors of 1..=max_len elements.
#[derive(Debug, Clone)]
struct Case {
    params: Vec<Vec<f32>>,
    /// `grads[step][tensor]`.
    grads: Vec<Vec<Vec<f32>>>,
}

impl Case {
    fn specs(&self) -> Vec<ParamSpec> {
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| ParamSpec::new(format!("t{i}"), [p.len()]))
            .collect()
    }

    /// Lion's `sign(c)` flips between f32 and f64 when `c` is near 0. Give
    /// every element one sign across all steps so that `c` keeps that sign
    /// and stays away from 0.
    fn sign_consistent(&self) -> Case {
        let mut out = self.clone();
        for step in out.grads.iter_mut() {
            for (t, g) in step.iter_mut().enumerate() {
                for (j, x) in g.iter_mut().enumerate() {
                    let s = if self.grads[0][t][j] < 0.0 { -1.0 } else { 1.0 };
                    *x = s * x.abs().max(1e-3);
                }
            }
        }
        out
    }
}

fn case(steps: usize, max_len: usize) -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(1usize..=max_len, 1..=4),
        prop::sample::select(vec![1e-3f32, 0.1, 1.0, 10.0]),
    )
        .prop_flat_map(move |(sizes, scale)| {
            let params: Vec<_> = sizes
                .iter()
                .map(|&n| prop::collection::vec(-2.0f32..2.0, n))
                .collect();
            let grads: Vec<Vec<_>> = (0..steps)
                .map(|_| {
                    sizes
                        .iter()
                        .map(|&n| prop::collection::vec(-1.0f32..1.0, n))
                        .collect()
                })
                .collect();
            (params, grads).prop_map(move |(params, mut grads)| {
                for x in grads.iter_mut().flatten().flatten() {
                    *x *= scale;
                }
                Case { params, grads }
            })
        })
}

fn to_t<T: Real>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64x(x as f64)).collect()
}

fn to_f64<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64x()).collect()
}

fn step<T: Real>(
    opt: &mut CpuOptimizer<T>,
    params: &mut [Vec<T>],
    grads: &[Vec<T>],
) -> keel::Result<StepStats> {
    let mut ps: Vec<&mut [T]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
    opt.step(&mut ps, &gs)
}

fn step_bf16(
    opt: &mut MixedPrecisionOptimizer,
    params: &mut [Vec<bf16>],
    grads: &[Vec<bf16>],
) -> keel::Result<StepStats> {
    let mut ps: Vec<&mut [bf16]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[bf16]> = grads.iter().map(|g| &g[..]).collect();
    opt.step(&mut ps, &gs)
}

/// Runs `case` through a fresh `CpuOptimizer<T>`; returns the parameters after
/// every step, in f64.
fn run<T: Real>(cfg: &OptimizerConfig, case: &Case) -> Vec<Vec<Vec<f64>>> {
    let mut opt = CpuOptimizer::<T>::new(cfg.clone(), case.specs()).unwrap();
    let mut params: Vec<Vec<T>> = case.params.iter().map(|p| to_t(p)).collect();
    let mut out = Vec::new();
    for g in &case.grads {
        let grads: Vec<Vec<T>> = g.iter().map(|g| to_t(g)).collect();
        let stats = step(&mut opt, &mut params, &grads).unwrap();
        assert!(stats.skipped.is_none());
        out.push(params.iter().map(|p| to_f64(p)).collect());
    }
    out
}

fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn diff_norm(a: &[f64], b: &[f64]) -> f64 {
    norm(a.iter().zip(b).map(|(x, y)| x - y))
}

fn same_bits<T: Real>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_f64x().to_bits() == y.to_f64x().to_bits())
}

/// `StateDict` equality with tensors compared bit for bit.
fn assert_state_eq(a: &StateDict, b: &StateDict) {
    assert_eq!(a.config, b.config);
    assert_eq!(a.step, b.step);
    assert_eq!(a.specs, b.specs);
    assert_eq!(a.groups, b.groups);
    assert_eq!(a.extra, b.extra);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.shape, y.shape);
        let same = match (&x.data, &y.data) {
            (StateData::F32(u), StateData::F32(v)) => same_bits(u, v),
            (StateData::F64(u), StateData::F64(v)) => same_bits(u, v),
            _ => false,
        };
        assert!(same, "state tensor {} differs", x.name);
    }
}

proptest! {
    // 32 cases each keeps the file at a few seconds in debug; no failure
    // persistence so that a failing run writes no files into the tree.
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// The f32 path lands where the f64 path does: per tensor,
    /// `||p32 - p64|| <= 1e-4 * ||p64 - p0|| + 1e-6 * ||p64||` after each of
    /// 3 steps (the second term covers rounding the parameter itself to f32).
    #[test]
    fn f32_agrees_with_f64(case in case(3, 300), lr in 1e-4f64..1e-2) {
        for (name, json) in VARIANTS {
            let cfg = config(json, lr);
            let case = if name.starts_with("lion") { case.sign_consistent() } else { case.clone() };
            let r32 = run::<f32>(&cfg, &case);
            let r64 = run::<f64>(&cfg, &case);
            for (s, (a, b)) in r32.iter().zip(&r64).enumerate() {
                for (t, (p32, p64)) in a.iter().zip(b).enumerate() {
                    let p0: Vec<f64> = case.params[t].iter().map(|&x| x as f64).collect();
                    let err = diff_norm(p32, p64);
                    let moved = diff_norm(p64, &p0);
                    let bound = 1e-4 * moved + 1e-6 * norm(p64.iter().copied());
                    prop_assert!(
                        err <= bound,
                        "{name} step {s} tensor {t}: ||p32 - p64|| = {err:e} > {bound:e} (moved {moved:e})"
                    );
                }
            }
        }
    }

    /// With `clip_global_norm = c`: the reported global norm is the norm of the
    /// (clamped) gradients, the clipped norm never exceeds `min(norm, c)`, the
    /// factor is at most 1, and SGD (lr 1) moves the parameters by exactly
    /// the clipped gradient.
    #[test]
    fn clipping_never_increases_the_global_norm(
        case in case(1, 300),
        c in 1e-3f64..10.0,
        exp in -3i32..=3,
    ) {
        let scale = 10f64.powi(exp);
        let grads: Vec<Vec<f64>> = case.grads[0].iter().map(|g| g.iter().map(|&x| x as f64 * scale).collect()).collect();
        for (name, json) in VARIANTS {
            let mut cfg = config(json, 1e-3);
            cfg.clip_global_norm = Some(c);
            let clamp = cfg.clip_value.unwrap_or(f64::INFINITY);
            let expected = norm(grads.iter().flatten().map(|&x| x.clamp(-clamp, clamp)));
            let mut opt = CpuOptimizer::<f64>::new(cfg, case.specs()).unwrap();
            let mut params: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
            let stats = step(&mut opt, &mut params, &grads).unwrap();
            prop_assert!((stats.global_grad_norm - expected).abs() <= 1e-12 * expected, "{name}: {} vs {expected}", stats.global_grad_norm);
            prop_assert!(stats.clip_factor <= 1.0 && stats.clip_factor > 0.0, "{name}: factor {}", stats.clip_factor);
            prop_assert!(
                stats.global_grad_norm_clipped <= stats.global_grad_norm.min(c) * (1.0 + 1e-12),
                "{name}: clipped {} > min({}, {c})", stats.global_grad_norm_clipped, stats.global_grad_norm
            );
            let want = expected.min(c);
            prop_assert!((stats.global_grad_norm_clipped - want).abs() <= 1e-12 * want);
            if expected <= c {
                prop_assert_eq!(stats.clip_factor, 1.0);
            }
        }
        // The applied gradient, seen through SGD with lr 1 (f64 and f32).
        let sgd = config(r#"{"kind":"sgd","lr":1}"#, 1.0);
        let mut cfg = sgd.clone();
        cfg.clip_global_norm = Some(c);
        let n = norm(grads.iter().flatten().copied());
        let factor = if n > c { c / n } else { 1.0 };
        let mut opt = CpuOptimizer::<f64>::new(cfg.clone(), case.specs()).unwrap();
        let p0: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
        let mut params = p0.clone();
        step(&mut opt, &mut params, &grads).unwrap();
        let moved = norm(params.iter().flatten().zip(p0.iter().flatten()).map(|(a, b)| a - b));
        prop_assert!(moved <= c * (1.0 + 1e-9), "moved {moved} > c = {c}");
        for ((p, p0), g) in params.iter().flatten().zip(p0.iter().flatten()).zip(grads.iter().flatten()) {
            let want = p0 - factor * g;
            prop_assert!((p - want).abs() <= 1e-14 * (p0.abs() + (factor * g).abs()) + 1e-300);
        }
        let mut opt = CpuOptimizer::<f32>::new(cfg, case.specs()).unwrap();
        let g32: Vec<Vec<f32>> = grads.iter().map(|g| g.iter().map(|&x| x as f32).collect()).collect();
        let mut params: Vec<Vec<f32>> = case.params.clone();
        let stats = step(&mut opt, &mut params, &g32).unwrap();
        prop_assert!(stats.global_grad_norm_clipped <= stats.global_grad_norm.min(c) * (1.0 + 1e-12));
        prop_assert!(stats.clip_factor <= 1.0);
    }

    /// LAMB's reported trust ratio is `||p|| / ||u||` with, at t = 1,
    /// `u = g / (|g| + eps) + wd * p` (1 when either norm is 0), and the
    /// update is `lr * r * u`.
    #[test]
    fn lamb_trust_ratio_matches_its_definition(
        case in case(1, 300),
        wd in prop::sample::select(vec![0.0, 1e-4, 0.01, 0.1]),
        eps in prop::sample::select(vec![1e-8, 1e-6, 1e-3]),
        zero_p in prop::collection::vec(prop::bool::weighted(0.15), 4),
        zero_g in prop::collection::vec(prop::bool::weighted(0.15), 4),
    ) {
        let lr = 1e-3;
        let cfg = OptimizerConfig::from_json(&format!(
            r#"{{"kind":"lamb","lr":{lr},"beta1":0.9,"beta2":0.999,"eps":{eps:e},"weight_decay":{wd:e}}}"#
        )).unwrap();
        let mut p0: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
        let mut grads: Vec<Vec<f64>> = case.grads[0].iter().map(|g| to_t(g)).collect();
        for i in 0..p0.len() {
            if zero_p[i] { p0[i].iter_mut().for_each(|x| *x = 0.0); }
            if zero_g[i] { grads[i].iter_mut().for_each(|x| *x = 0.0); }
        }
        let mut opt = CpuOptimizer::<f64>::new(cfg, case.specs()).unwrap();
        let mut params = p0.clone();
        let stats = step(&mut opt, &mut params, &grads).unwrap();
        for (i, ((p, g), new)) in p0.iter().zip(&grads).zip(&params).enumerate() {
            // The stored first-step moments: m = (1-b1) g, v = (1-b2) g^2.
            let m = opt.state_buffer(i, "exp_avg").unwrap();
            let v = opt.state_buffer(i, "exp_avg_sq").unwrap();
            for ((m, v), g) in m.iter().zip(v).zip(g) {
                prop_assert!((m - 0.1 * g).abs() <= 1e-15 * g.abs());
                prop_assert!((v - 0.001 * g * g).abs() <= 1e-15 * g * g);
            }
            let u: Vec<f64> = p.iter().zip(g).map(|(p, g)| g / (g.abs() + eps) + wd * p).collect();
            let (pn, un) = (norm(p.iter().copied()), norm(u.iter().copied()));
            let r = if pn == 0.0 || un == 0.0 { 1.0 } else { pn / un };
            let got = stats.tensors[i].trust_ratio.expect("lamb reports a trust ratio");
            prop_assert!((got - r).abs() <= 1e-10 * r, "tensor {i}: trust ratio {got} vs {r}");
            let want: Vec<f64> = p.iter().zip(&u).map(|(p, u)| p - lr * r * u).collect();
            let err = diff_norm(new, &want);
            prop_assert!(err <= 1e-14 * pn + 1e-10 * lr * r * un + 1e-300, "tensor {i}: update off by {err:e}");
        }
    }

    /// LARS's reported trust ratio is `tc * ||p|| / (||g + wd*p|| + eps)`
    /// (1 when either norm is 0), and the first step moves `p` by
    /// `lr * r * u` (times `1 + momentum` with Nesterov).
    #[test]
    fn lars_trust_ratio_matches_its_definition(
        case in case(1, 300),
        wd in prop::sample::select(vec![0.0, 1e-4, 0.01, 0.1]),
        eps in prop::sample::select(vec![0.0, 1e-8, 1e-3]),
        tc in 1e-3f64..1.0,
        momentum in 0.0f64..0.95,
        nesterov in any::<bool>(),
        zero_p in prop::collection::vec(prop::bool::weighted(0.15), 4),
        zero_g in prop::collection::vec(prop::bool::weighted(0.15), 4),
    ) {
        let lr = 0.1;
        let cfg = OptimizerConfig::from_json(&format!(
            r#"{{"kind":"lars","lr":{lr},"momentum":{momentum:e},"nesterov":{nesterov},"weight_decay":{wd:e},"trust_coefficient":{tc:e},"eps":{eps:e}}}"#
        )).unwrap();
        let mut p0: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
        let mut grads: Vec<Vec<f64>> = case.grads[0].iter().map(|g| to_t(g)).collect();
        for i in 0..p0.len() {
            if zero_p[i] { p0[i].iter_mut().for_each(|x| *x = 0.0); }
            if zero_g[i] { grads[i].iter_mut().for_each(|x| *x = 0.0); }
        }
        let mut opt = CpuOptimizer::<f64>::new(cfg, case.specs()).unwrap();
        let mut params = p0.clone();
        let stats = step(&mut opt, &mut params, &grads).unwrap();
        for (i, ((p, g), new)) in p0.iter().zip(&grads).zip(&params).enumerate() {
            let u: Vec<f64> = p.iter().zip(g).map(|(p, g)| g + wd * p).collect();
            let (pn, un) = (norm(p.iter().copied()), norm(u.iter().copied()));
            let r = if pn == 0.0 || un == 0.0 { 1.0 } else { tc * pn / (un + eps) };
            // keel may compute ||u|| from sum(g^2), sum(g*p), sum(p^2):
            // allow for the cancellation that costs when g ~ -wd*p.
            let gg: f64 = g.iter().map(|x| x * x).sum();
            let cond = if un == 0.0 { 1.0 } else { (gg + wd * wd * pn * pn) / (un * un) };
            let got = stats.tensors[i].trust_ratio.expect("lars reports a trust ratio");
            prop_assert!((got - r).abs() <= 1e-12 * (1.0 + cond) * r, "tensor {i}: trust ratio {got} vs {r}");
            let k = if nesterov { 1.0 + momentum } else { 1.0 };
            let want: Vec<f64> = p.iter().zip(&u).map(|(p, u)| p - k * lr * r * u).collect();
            let err = diff_norm(new, &want);
            prop_assert!(err <= 1e-14 * pn + 1e-10 * (1.0 + cond) * k * lr * r * un + 1e-300, "tensor {i}: update off by {err:e}");
        }
    }

    /// lr = 0 leaves the parameters bit-identical, for every kind, in f32,
    /// f64 and bf16 (eps > 0 everywhere, so no 0/0).
    #[test]
    fn zero_lr_changes_nothing(case in case(3, 300)) {
        for (name, json) in VARIANTS {
            let cfg = config(json, 0.0);
            let mut opt = CpuOptimizer::<f32>::new(cfg.clone(), case.specs()).unwrap();
            let mut params = case.params.clone();
            for g in &case.grads {
                step(&mut opt, &mut params, g).unwrap();
            }
            prop_assert!(params.iter().zip(&case.params).all(|(a, b)| same_bits(a, b)), "{name} f32 moved");

            let mut opt = CpuOptimizer::<f64>::new(cfg.clone(), case.specs()).unwrap();
            let p0: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
            let mut params = p0.clone();
            for g in &case.grads {
                let g: Vec<Vec<f64>> = g.iter().map(|g| to_t(g)).collect();
                step(&mut opt, &mut params, &g).unwrap();
            }
            prop_assert!(params.iter().zip(&p0).all(|(a, b)| same_bits(a, b)), "{name} f64 moved");

            for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 7 }] {
                let specs = case.specs();
                let b0: Vec<Vec<bf16>> = case.params.iter().map(|p| p.iter().map(|&x| bf16::from_f32(x)).collect()).collect();
                let init: Vec<&[bf16]> = b0.iter().map(|p| &p[..]).collect();
                let mut opt = MixedPrecisionOptimizer::new(cfg.clone(), specs.clone(), vec![ParamGroup::all(&specs)], &init, rounding).unwrap();
                let mut params = b0.clone();
                for g in &case.grads {
                    let g: Vec<Vec<bf16>> = g.iter().map(|g| g.iter().map(|&x| bf16::from_f32(x)).collect()).collect();
                    step_bf16(&mut opt, &mut params, &g).unwrap();
                }
                prop_assert!(
                    params.iter().zip(&b0).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())),
                    "{name} bf16 {rounding:?} moved"
                );
            }
        }
    }

    /// A NaN or Inf anywhere skips the step: parameters, state and step count
    /// bit-identical, the stats name exactly the offending tensors, and the
    /// next good step continues as if the bad one never happened. With
    /// `on_nonfinite = "error"` the step is an error and nothing changes.
    #[test]
    fn nonfinite_gradient_changes_nothing(
        case in case(5, 300),
        warm in 0usize..=3,
        bad in prop::collection::vec((any::<Index>(), any::<Index>()), 1..=3),
        value in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
    ) {
        let n = case.params.len();
        let mut bad_grads = case.grads[warm].clone();
        let mut bad_tensors = vec![false; n];
        for (t, e) in &bad {
            let t = t.index(n);
            let e = e.index(bad_grads[t].len());
            bad_grads[t][e] = value;
            bad_tensors[t] = true;
        }
        let names: Vec<String> = (0..n).filter(|&i| bad_tensors[i]).map(|i| format!("t{i}")).collect();
        for (name, json) in VARIANTS {
            let cfg = config(json, 1e-2);
            check_skip::<f32>(name, &cfg, &case, warm, &bad_grads, &names);
            check_skip::<f64>(name, &cfg, &case, warm, &bad_grads, &names);
        }
        // Mixed precision: bf16 parameters and f32 master weights stay too.
        let cfg = config(r#"{"kind":"adamw","lr":1,"weight_decay":0.1}"#, 1e-2);
        let specs = case.specs();
        let to_bf = |v: &Vec<Vec<f32>>| -> Vec<Vec<bf16>> { v.iter().map(|p| p.iter().map(|&x| bf16::from_f32(x)).collect()).collect() };
        let mut params = to_bf(&case.params);
        let init: Vec<&[bf16]> = params.iter().map(|p| &p[..]).collect();
        let mut opt = MixedPrecisionOptimizer::new(cfg, specs.clone(), vec![ParamGroup::all(&specs)], &init, Rounding::Stochastic { seed: 3 }).unwrap();
        for g in &case.grads[..warm] {
            step_bf16(&mut opt, &mut params, &to_bf(g)).unwrap();
        }
        let before = params.clone();
        let state = opt.state_dict().unwrap();
        let stats = step_bf16(&mut opt, &mut params, &to_bf(&bad_grads)).unwrap();
        prop_assert_eq!(stats.skipped, Some(SkipReason::NonFiniteGradient { tensors: names.clone() }));
        prop_assert!(params.iter().zip(&before).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())));
        assert_state_eq(&opt.state_dict().unwrap(), &state);
        prop_assert_eq!(opt.step_count(), warm as u64);
    }
}

/// A fresh optimizer under `cfg` and the case's parameters, after the
/// case's first `warm` steps.
fn warmed_up<T: Real>(
    cfg: &OptimizerConfig,
    case: &Case,
    warm: usize,
) -> (CpuOptimizer<T>, Vec<Vec<T>>) {
    let conv = |v: &[Vec<f32>]| -> Vec<Vec<T>> { v.iter().map(|g| to_t(g)).collect() };
    let mut opt = CpuOptimizer::<T>::new(cfg.clone(), case.specs()).unwrap();
    let mut params = conv(&case.params);
    for g in &case.grads[..warm] {
        step(&mut opt, &mut params, &conv(g)).unwrap();
    }
    (opt, params)
}

fn check_skip<T: Real>(
    name: &str,
    cfg: &OptimizerConfig,
    case: &Case,
    warm: usize,
    bad: &[Vec<f32>],
    names: &[String],
) {
    let conv = |v: &[Vec<f32>]| -> Vec<Vec<T>> { v.iter().map(|g| to_t(g)).collect() };
    let bad = conv(bad);
    for policy in [
        NonFinitePolicy::Skip,
        NonFinitePolicy::Error,
        NonFinitePolicy::Unchecked,
    ] {
        let mut cfg = cfg.clone();
        cfg.on_nonfinite = policy;
        if cfg.skips_scan() {
            check_unchecked::<T>(name, &cfg, case, warm, &bad, names);
            continue;
        }
        let (mut opt, mut params) = warmed_up::<T>(&cfg, case, warm);
        let p_before = params.clone();
        let s_before = opt.state_dict().unwrap();
        let twin = opt.clone();
        let result = step(&mut opt, &mut params, &bad);
        match policy {
            // Where the scan runs anyway, `unchecked` skips as `skip` does.
            NonFinitePolicy::Skip | NonFinitePolicy::Unchecked => {
                let stats = result.unwrap_or_else(|e| panic!("{name}: skip policy returned {e}"));
                assert_eq!(
                    stats.skipped,
                    Some(SkipReason::NonFiniteGradient {
                        tensors: names.to_vec()
                    }),
                    "{name}"
                );
                assert_eq!(stats.step, warm as u64, "{name}");
                for (i, t) in stats.tensors.iter().enumerate() {
                    assert_eq!(
                        t.finite,
                        !names.contains(&format!("t{i}")),
                        "{name} tensor {i}"
                    );
                    assert_eq!(t.update_norm, 0.0, "{name} tensor {i}");
                }
            }
            NonFinitePolicy::Error => match result {
                Err(KeelError::NonFiniteGradient { tensors }) => {
                    assert_eq!(tensors, names, "{name}")
                }
                other => panic!("{name}: error policy returned {other:?}"),
            },
        }
        assert!(
            params.iter().zip(&p_before).all(|(a, b)| same_bits(a, b)),
            "{name} {}: parameters changed",
            T::DTYPE
        );
        assert_state_eq(&opt.state_dict().unwrap(), &s_before);
        assert_eq!(opt.step_count(), warm as u64, "{name}");
        // The next good step matches an optimizer that never saw the bad one.
        let mut twin = twin;
        let mut twin_params = p_before;
        let next = conv(&case.grads[warm + 1]);
        step(&mut opt, &mut params, &next).unwrap();
        step(&mut twin, &mut twin_params, &next).unwrap();
        assert!(
            params
                .iter()
                .zip(&twin_params)
                .all(|(a, b)| same_bits(a, b)),
            "{name} {}: the step after the skip differs",
            T::DTYPE
        );
        assert_state_eq(&opt.state_dict().unwrap(), &twin.state_dict().unwrap());
    }
}

/// `on_nonfinite = "unchecked"` where the step has no scan: the bad gradient
/// is applied and reported, not skipped. The bad tensors end with a
/// non-finite parameter or state element, the stats flag exactly them, and
/// every good tensor gets the same bits as a step on the good gradient.
fn check_unchecked<T: Real>(
    name: &str,
    cfg: &OptimizerConfig,
    case: &Case,
    warm: usize,
    bad: &[Vec<T>],
    names: &[String],
) {
    let conv = |v: &[Vec<f32>]| -> Vec<Vec<T>> { v.iter().map(|g| to_t(g)).collect() };
    let (mut opt, mut params) = warmed_up::<T>(cfg, case, warm);
    let mut twin = opt.clone();
    let mut twin_params = params.clone();
    let stats = step(&mut opt, &mut params, bad).unwrap();
    step(&mut twin, &mut twin_params, &conv(&case.grads[warm])).unwrap();
    assert_eq!(stats.skipped, None, "{name}");
    assert_eq!(stats.step, warm as u64 + 1, "{name}");
    assert_eq!(opt.step_count(), warm as u64 + 1, "{name}");
    assert!(stats.global_grad_norm.is_nan(), "{name}");
    let slots = keel::optim::state_slots(&cfg.kind);
    let finite = |v: &[T]| v.iter().all(|x| x.to_f64x().is_finite());
    for (i, t) in stats.tensors.iter().enumerate() {
        let is_bad = names.contains(&format!("t{i}"));
        assert_eq!(t.finite, !is_bad, "{name} tensor {i}");
        assert_eq!(t.grad_norm.is_nan(), is_bad, "{name} tensor {i}");
        if is_bad {
            let state_finite = slots
                .iter()
                .all(|s| finite(opt.state_buffer(i, s).unwrap()));
            assert!(
                !(finite(&params[i]) && state_finite),
                "{name} tensor {i}: the bad gradient left no trace"
            );
        } else {
            assert!(same_bits(&params[i], &twin_params[i]), "{name} tensor {i}");
            for s in slots {
                let (a, b) = (opt.state_buffer(i, s), twin.state_buffer(i, s));
                assert!(same_bits(a.unwrap(), b.unwrap()), "{name} tensor {i} {s}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// With finite gradients `on_nonfinite = "unchecked"` changes nothing but
    /// the passes: parameters and state bit-identical to the default for
    /// every kind (f32, and bf16 with f32 master weights), and the gradient
    /// norms, taken in the fused pass instead of the scan, equal within
    /// rounding (in f64 as `stats_describe_the_step` checks them).
    #[test]
    fn unchecked_matches_the_checked_step(case in case(3, 300)) {
        for (name, json) in VARIANTS {
            let checked = config(json, 1e-2);
            let mut unchecked = checked.clone();
            unchecked.on_nonfinite = NonFinitePolicy::Unchecked;
            let mut a = CpuOptimizer::<f32>::new(checked.clone(), case.specs()).unwrap();
            let mut b = CpuOptimizer::<f32>::new(unchecked.clone(), case.specs()).unwrap();
            let mut pa: Vec<Vec<f32>> = case.params.clone();
            let mut pb = pa.clone();
            for g in &case.grads {
                let sa = step(&mut a, &mut pa, g).unwrap();
                let sb = step(&mut b, &mut pb, g).unwrap();
                prop_assert!(pa.iter().zip(&pb).all(|(x, y)| same_bits(x, y)), "{} params", name);
                for (x, y) in sa.tensors.iter().zip(&sb.tensors) {
                    prop_assert!((x.grad_norm - y.grad_norm).abs() <= 1e-6 * x.grad_norm, "{} grad_norm {} vs {}", name, x.grad_norm, y.grad_norm);
                    prop_assert_eq!(x.update_norm.to_bits(), y.update_norm.to_bits(), "{}", name);
                    prop_assert_eq!(x.param_norm.to_bits(), y.param_norm.to_bits(), "{}", name);
                    prop_assert!(y.finite);
                }
                prop_assert!((sa.global_grad_norm - sb.global_grad_norm).abs() <= 1e-6 * sa.global_grad_norm);
            }
            let (sa, sb) = (a.state_dict().unwrap(), b.state_dict().unwrap());
            prop_assert_eq!(&sb.config, &unchecked);
            prop_assert_eq!(sa.tensors.len(), sb.tensors.len());
            for (x, y) in sa.tensors.iter().zip(&sb.tensors) {
                let same = match (&x.data, &y.data) {
                    (StateData::F32(u), StateData::F32(v)) => same_bits(u, v),
                    _ => false,
                };
                prop_assert!(same, "{} state {}", name, x.name);
            }
            let mut opt = CpuOptimizer::<f64>::new(unchecked.clone(), case.specs()).unwrap();
            let mut params: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
            let clamp = unchecked.clip_value.unwrap_or(f64::INFINITY);
            for g in &case.grads {
                let g: Vec<Vec<f64>> = g.iter().map(|g| to_t(g)).collect();
                let stats = step(&mut opt, &mut params, &g).unwrap();
                for (i, t) in stats.tensors.iter().enumerate() {
                    let gn = norm(g[i].iter().map(|x| x.clamp(-clamp, clamp)));
                    prop_assert!((t.grad_norm - gn).abs() <= 1e-12 * gn, "{} grad_norm {} vs {}", name, t.grad_norm, gn);
                }
            }
        }
        // Mixed precision: the same bf16 parameters and master weights.
        let specs = case.specs();
        let to_bf = |v: &Vec<Vec<f32>>| -> Vec<Vec<bf16>> { v.iter().map(|p| p.iter().map(|&x| bf16::from_f32(x)).collect()).collect() };
        let mut outs = Vec::new();
        for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Unchecked] {
            let mut cfg = config(r#"{"kind":"adamw","lr":1,"weight_decay":0.1}"#, 1e-2);
            cfg.on_nonfinite = policy;
            let mut params = to_bf(&case.params);
            let init: Vec<&[bf16]> = params.iter().map(|p| &p[..]).collect();
            let mut opt = MixedPrecisionOptimizer::new(cfg, specs.clone(), vec![ParamGroup::all(&specs)], &init, Rounding::Stochastic { seed: 3 }).unwrap();
            for g in &case.grads {
                step_bf16(&mut opt, &mut params, &to_bf(g)).unwrap();
            }
            outs.push((params, opt.state_dict().unwrap()));
        }
        let ((pa, sa), (pb, sb)) = (&outs[0], &outs[1]);
        prop_assert!(pa.iter().zip(pb).all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())));
        for (x, y) in sa.tensors.iter().zip(&sb.tensors) {
            let same = match (&x.data, &y.data) {
                (StateData::F32(u), StateData::F32(v)) => same_bits(u, v),
                _ => false,
            };
            prop_assert!(same, "bf16 state {}", x.name);
        }
    }

    /// Per-tensor stats describe what the step did: `param_norm = ||p||`
    /// before the step, `update_norm = ||p_new - p||`, `grad_norm` of the
    /// clamped gradient, a trust ratio exactly for LAMB/LARS and an update
    /// clip factor exactly with `update_clip_rms`.
    #[test]
    fn stats_describe_the_step(case in case(2, 300)) {
        for (name, json) in VARIANTS {
            let cfg = config(json, 1e-2);
            let clamp = cfg.clip_value.unwrap_or(f64::INFINITY);
            let kind = cfg.kind.name();
            let uclip = json.contains("update_clip_rms");
            let mut opt = CpuOptimizer::<f64>::new(cfg, case.specs()).unwrap();
            let mut params: Vec<Vec<f64>> = case.params.iter().map(|p| to_t(p)).collect();
            for (k, g) in case.grads.iter().enumerate() {
                let g: Vec<Vec<f64>> = g.iter().map(|g| to_t(g)).collect();
                let before = params.clone();
                let stats = step(&mut opt, &mut params, &g).unwrap();
                prop_assert_eq!(stats.step, k as u64 + 1);
                prop_assert_eq!(stats.lr, 1e-2);
                for (i, t) in stats.tensors.iter().enumerate() {
                    let pn = norm(before[i].iter().copied());
                    let un = diff_norm(&params[i], &before[i]);
                    let gn = norm(g[i].iter().map(|x| x.clamp(-clamp, clamp)));
                    prop_assert!((t.param_norm - pn).abs() <= 1e-12 * pn, "{} param_norm {} vs {}", name, t.param_norm, pn);
                    prop_assert!((t.update_norm - un).abs() <= 1e-12 * un, "{} update_norm {} vs {}", name, t.update_norm, un);
                    prop_assert!((t.grad_norm - gn).abs() <= 1e-12 * gn, "{} grad_norm {} vs {}", name, t.grad_norm, gn);
                    prop_assert!(t.finite);
                    prop_assert_eq!(t.trust_ratio.is_some(), kind == "lamb" || kind == "lars", "{}", name);
                    prop_assert_eq!(t.update_clip_factor.is_some(), uclip, "{}", name);
                    if pn > 0.0 {
                        prop_assert!((t.update_ratio() - un / pn).abs() <= 1e-12 * (un / pn) + 1e-300);
                    }
                }
            }
        }
    }
}

/// Under `unchecked`, finite gradients whose squares overflow f32 are still
/// finite: the fused pass's sum is non-finite, the exact recheck finds every
/// element finite, and the norm is redone in f64 (as the scan does).
#[test]
fn unchecked_finite_gradients_whose_squares_overflow() {
    let specs = vec![ParamSpec::new("a", [1000]), ParamSpec::new("b", [70])];
    let grads: Vec<Vec<f32>> = vec![
        (0..1000)
            .map(|i| if i % 7 == 0 { 3e20 } else { 0.5 })
            .collect(),
        vec![0.25; 70],
    ];
    for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Unchecked] {
        let mut cfg = config(r#"{"kind":"adamw","lr":1,"weight_decay":0.1}"#, 1e-3);
        cfg.on_nonfinite = policy;
        let mut opt = CpuOptimizer::<f32>::new(cfg, specs.clone()).unwrap();
        let mut params = vec![vec![1.0f32; 1000], vec![1.0f32; 70]];
        let stats = step(&mut opt, &mut params, &grads).unwrap();
        assert_eq!(stats.skipped, None, "{policy:?}");
        for (t, g) in stats.tensors.iter().zip(&grads) {
            let exact = norm(g.iter().map(|&x| x as f64));
            assert!(t.finite, "{policy:?}");
            assert!(
                (t.grad_norm - exact).abs() <= 1e-12 * exact,
                "{policy:?}: {} vs {exact}",
                t.grad_norm
            );
        }
        assert!(params.iter().flatten().all(|p| p.is_finite()), "{policy:?}");
    }
}

/// Under `unchecked`, mixed precision applies a NaN gradient as the f32
/// optimizer does: the step is taken, the stats flag exactly the bad tensor,
/// its master weights turn non-finite, and the other tensor is updated.
#[test]
fn unchecked_mixed_precision_applies_and_reports_a_nan() {
    let specs = vec![ParamSpec::new("a", [300]), ParamSpec::new("b", [40])];
    let mut cfg = config(r#"{"kind":"adamw","lr":1,"weight_decay":0.1}"#, 1e-2);
    cfg.on_nonfinite = NonFinitePolicy::Unchecked;
    let mut params: Vec<Vec<bf16>> = vec![
        vec![bf16::from_f32(0.5); 300],
        vec![bf16::from_f32(0.5); 40],
    ];
    let init: Vec<&[bf16]> = params.iter().map(|p| &p[..]).collect();
    let mut opt = MixedPrecisionOptimizer::new(
        cfg,
        specs.clone(),
        vec![ParamGroup::all(&specs)],
        &init,
        Rounding::Nearest,
    )
    .unwrap();
    let mut grads = vec![
        vec![bf16::from_f32(0.1); 300],
        vec![bf16::from_f32(0.1); 40],
    ];
    grads[0][123] = bf16::NAN;
    let stats = step_bf16(&mut opt, &mut params, &grads).unwrap();
    assert_eq!(stats.skipped, None);
    assert_eq!(opt.step_count(), 1);
    assert_eq!(
        stats.tensors.iter().map(|t| t.finite).collect::<Vec<_>>(),
        [false, true]
    );
    assert!(!opt.master(0).iter().all(|x| x.is_finite()));
    assert!(opt.master(1).iter().all(|x| x.is_finite() && *x != 0.5));
}
