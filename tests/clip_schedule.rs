//! Gradient clipping, per-group options, learning-rate schedules and bf16
//! rounding, each checked against values computed here by hand.

mod common;
use common::Rng;

use half::bf16;
use keel::real::Real;
use keel::{
    CpuOptimizer, MixedPrecisionOptimizer, Optimizer, OptimizerConfig, ParamGroup, ParamSpec,
    Rounding, Schedule, StepStats,
};

fn parse(json: &str) -> OptimizerConfig {
    OptimizerConfig::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn specs(sizes: &[usize]) -> Vec<ParamSpec> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| ParamSpec::new(format!("t{i}"), [n]))
        .collect()
}

fn step<T: Real>(opt: &mut CpuOptimizer<T>, params: &mut [Vec<T>], grads: &[Vec<T>]) -> StepStats {
    let mut ps: Vec<&mut [T]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
    let stats = opt.step(&mut ps, &gs).unwrap();
    assert!(stats.skipped.is_none());
    stats
}

fn norm(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn same_bits<T: Real>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_f64x().to_bits() == y.to_f64x().to_bits())
}

#[track_caller]
fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs(),
        "{what}: got {got:e}, want {want:e}"
    );
}

/// Tensor sizes that cover one partial block, several blocks, and the
/// lengths between one and four blocks (257..1023) where a scan work item is
/// neither one block nor four streams.
const SIZES: [usize; 5] = [5, 256, 300, 700, 1500];

// ---------------------------------------------------------------- clip_value

/// `clip_value = c` with plain SGD (lr 1, no momentum, no decay) moves every
/// element by exactly `-clamp(g, -c, c)`, as `torch.nn.utils.clip_grad_value_`
/// followed by `p -= g` would; the reported norms are the clamped gradient's.
fn clip_value_case<T: Real>() {
    let c = 0.3;
    let cfg = parse(r#"{"kind":"sgd","lr":1,"clip_value":0.3}"#);
    let mut rng = Rng(11);
    let p0: Vec<Vec<T>> = SIZES.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    let grads: Vec<Vec<T>> = SIZES.iter().map(|&n| rng.vec(n, -1.0, 1.0)).collect();
    let mut opt = CpuOptimizer::<T>::new(cfg, specs(&SIZES)).unwrap();
    let mut params = p0.clone();
    let stats = step(&mut opt, &mut params, &grads);
    let cc = T::from_f64x(c);
    let mut all = Vec::new();
    for (i, ((p, p0), g)) in params.iter().zip(&p0).zip(&grads).enumerate() {
        let clamped: Vec<T> = g
            .iter()
            .map(|&x| {
                if x > cc {
                    cc
                } else if x < -cc {
                    -cc
                } else {
                    x
                }
            })
            .collect();
        let want: Vec<T> = p0.iter().zip(&clamped).map(|(&p, &g)| p - g).collect();
        assert!(
            same_bits(p, &want),
            "{} tensor {i}: p != p0 - clamp(g)",
            T::DTYPE
        );
        let n = norm(clamped.iter().map(|x| x.to_f64x()));
        assert_close(
            stats.tensors[i].grad_norm,
            n,
            1e-6,
            "per-tensor norm of the clamped gradient",
        );
        all.extend(clamped.iter().map(|x| x.to_f64x()));
    }
    assert_close(stats.global_grad_norm, norm(all), 1e-6, "global norm");
    assert_eq!(stats.clip_factor, 1.0);
}

#[test]
fn clip_value_clamps_each_element_f64() {
    clip_value_case::<f64>();
}

#[test]
fn clip_value_clamps_each_element_f32() {
    clip_value_case::<f32>();
}

/// The same through mixed precision (bf16 gradients, f32 master weights).
#[test]
fn clip_value_clamps_each_element_bf16() {
    let cfg = parse(r#"{"kind":"sgd","lr":1,"clip_value":0.25}"#);
    let s = specs(&SIZES);
    let mut rng = Rng(12);
    let p0: Vec<Vec<bf16>> = SIZES
        .iter()
        .map(|&n| {
            rng.vec::<f32>(n, -2.0, 2.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        })
        .collect();
    let grads: Vec<Vec<bf16>> = SIZES
        .iter()
        .map(|&n| {
            rng.vec::<f32>(n, -1.0, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect()
        })
        .collect();
    let init: Vec<&[bf16]> = p0.iter().map(|p| &p[..]).collect();
    let mut opt = MixedPrecisionOptimizer::new(
        cfg,
        s.clone(),
        vec![ParamGroup::all(&s)],
        &init,
        Rounding::Nearest,
    )
    .unwrap();
    let mut params = p0.clone();
    let mut ps: Vec<&mut [bf16]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[bf16]> = grads.iter().map(|g| &g[..]).collect();
    let stats = opt.step(&mut ps, &gs).unwrap();
    for (i, (p0, g)) in p0.iter().zip(&grads).enumerate() {
        let want: Vec<f32> = p0
            .iter()
            .zip(g)
            .map(|(p, g)| p.to_f32() - g.to_f32().clamp(-0.25, 0.25))
            .collect();
        assert_eq!(opt.master(i), &want[..], "tensor {i}");
        let rounded: Vec<bf16> = want.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(params[i], rounded, "tensor {i}");
        let n = norm(g.iter().map(|g| (g.to_f32().clamp(-0.25, 0.25)) as f64));
        assert_close(stats.tensors[i].grad_norm, n, 1e-6, "clamped norm");
    }
}

/// `clip_value` first, then `clip_global_norm` on the clamped gradients.
#[test]
fn clip_value_then_global_norm() {
    let (c, max_norm) = (0.3, 1.0);
    let cfg = parse(r#"{"kind":"sgd","lr":1,"clip_value":0.3,"clip_global_norm":1.0}"#);
    let mut rng = Rng(13);
    let p0: Vec<Vec<f64>> = SIZES.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    for scale in [1e-3, 1.0] {
        let grads: Vec<Vec<f64>> = SIZES.iter().map(|&n| rng.vec(n, -scale, scale)).collect();
        let clamped: Vec<Vec<f64>> = grads
            .iter()
            .map(|g| g.iter().map(|x| x.clamp(-c, c)).collect())
            .collect();
        let n = norm(clamped.iter().flatten().copied());
        let factor = if n > max_norm { max_norm / n } else { 1.0 };
        assert_eq!(
            n > max_norm,
            scale == 1.0,
            "the test data clips exactly when meant to"
        );
        let mut opt = CpuOptimizer::<f64>::new(cfg.clone(), specs(&SIZES)).unwrap();
        let mut params = p0.clone();
        let stats = step(&mut opt, &mut params, &grads);
        assert_close(
            stats.global_grad_norm,
            n,
            1e-12,
            "global norm of the clamped gradients",
        );
        assert_close(stats.clip_factor, factor, 1e-12, "clip factor");
        assert_close(
            stats.global_grad_norm_clipped,
            n.min(max_norm),
            1e-12,
            "clipped norm",
        );
        let moved = norm(
            params
                .iter()
                .flatten()
                .zip(p0.iter().flatten())
                .map(|(a, b)| a - b),
        );
        assert_close(moved, n.min(max_norm), 1e-12, "norm of the applied update");
        for ((p, p0), g) in params
            .iter()
            .flatten()
            .zip(p0.iter().flatten())
            .zip(clamped.iter().flatten())
        {
            let want = p0 - factor * g;
            assert!(
                (p - want).abs() <= 1e-15 * (p0.abs() + 1.0),
                "{p} vs {want}"
            );
        }
    }
}

/// LARS is invariant to the gradient's scale (`r*u` does not depend on
/// `||g||` when wd = 0), so a huge but finite gradient spike must move the
/// parameters exactly as a normal one; with `clip_global_norm` the clipped
/// gradient is ordinary anyway. Reference: `r = tc*||p||/||g||`, `p -= lr*r*g`.
fn lars_huge_gradient_case<T: Real>(clip: bool) {
    let n = 64;
    let json = if clip {
        r#"{"kind":"lars","lr":1,"momentum":0,"trust_coefficient":0.001,"clip_global_norm":1.0}"#
    } else {
        r#"{"kind":"lars","lr":1,"momentum":0,"trust_coefficient":0.001}"#
    };
    let mut opt = CpuOptimizer::<T>::new(parse(json), specs(&[n])).unwrap();
    let mut params = vec![vec![T::one(); n]];
    let mut g = vec![T::zero(); n];
    g[0] = T::from_f64x(1e20);
    let stats = step(&mut opt, &mut params, &[g]);
    // ||p|| = 8, u = g (or g clipped to norm 1): r*u[0] = 0.001 * 8 either way.
    let r_times_u0 = 0.001 * 8.0;
    let r = if clip { 0.008 } else { 0.008 / 1e20f32 as f64 };
    let what = format!("lars {} clip={clip}", T::DTYPE);
    assert_close(stats.tensors[0].trust_ratio.unwrap(), r, 1e-5, &what);
    assert_close(params[0][0].to_f64x(), 1.0 - r_times_u0, 1e-6, &what);
    assert!(params[0][1..].iter().all(|&x| x == T::one()), "{what}");
}

#[test]
fn lars_huge_gradient_f64() {
    lars_huge_gradient_case::<f64>(false);
    lars_huge_gradient_case::<f64>(true);
}

/// BUG (src/backend/reduce.rs `sum_sq`/`dot` accumulate in `T` lanes, used by
/// the scan in src/backend/cpu.rs for LARS's `grad_sq`/`grad_dot_param`): in
/// f32 a finite gradient element above ~1.8e19 overflows `sum(g^2)` to inf,
/// so `lars::direction_norm` is inf, the trust ratio 0 and the step does
/// nothing — even with `clip_global_norm`, whose clipped gradient has norm 1.
/// (The global norm itself is rescued by `overflow_safe_norm`; the LARS
/// sums are not. `real.rs` says reductions accumulate in f64.)
#[test]
fn lars_huge_gradient_f32() {
    lars_huge_gradient_case::<f32>(true);
    lars_huge_gradient_case::<f32>(false);
}

/// The clipped gradient `s * clamp(g)` is what LARS's and LAMB's trust ratios
/// see: `clip_value` first, then `clip_global_norm`, then the optimizer.
#[test]
fn trust_ratios_use_the_clipped_gradient() {
    let (c, max_norm, wd) = (0.3, 1.0, 0.01);
    let sizes = [64, 300];
    let mut rng = Rng(14);
    let p0: Vec<Vec<f64>> = sizes.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    let g: Vec<Vec<f64>> = sizes.iter().map(|&n| rng.vec(n, -1.0, 1.0)).collect();
    let n = norm(g.iter().flatten().map(|x| x.clamp(-c, c)));
    assert!(n > max_norm);
    let cg: Vec<Vec<f64>> = g
        .iter()
        .map(|g| g.iter().map(|x| x.clamp(-c, c) * max_norm / n).collect())
        .collect();

    // LARS: u = cg + wd*p, r = tc*||p||/(||u|| + eps), p -= lr*r*u.
    let (lr, tc, eps) = (0.1, 0.02, 1e-6);
    let lars = parse(
        r#"{"kind":"lars","lr":0.1,"momentum":0,"weight_decay":0.01,"trust_coefficient":0.02,"eps":1e-6,
            "clip_value":0.3,"clip_global_norm":1.0}"#,
    );
    let mut opt = CpuOptimizer::<f64>::new(lars, specs(&sizes)).unwrap();
    let mut params = p0.clone();
    let stats = step(&mut opt, &mut params, &g);
    for i in 0..2 {
        let u: Vec<f64> = cg[i].iter().zip(&p0[i]).map(|(g, p)| g + wd * p).collect();
        let r = tc * norm(p0[i].iter().copied()) / (norm(u.iter().copied()) + eps);
        assert_close(
            stats.tensors[i].trust_ratio.unwrap(),
            r,
            1e-10,
            "lars trust ratio",
        );
        for ((got, p), u) in params[i].iter().zip(&p0[i]).zip(&u) {
            assert_close(*got, p - lr * r * u, 1e-12, "lars update");
        }
    }

    // LAMB at t = 1: m_hat = cg, v_hat = cg^2, u = cg/(|cg| + eps) + wd*p.
    let (lr, eps) = (0.01, 1e-6);
    let lamb = parse(
        r#"{"kind":"lamb","lr":0.01,"weight_decay":0.01,"eps":1e-6,"clip_value":0.3,"clip_global_norm":1.0}"#,
    );
    let mut opt = CpuOptimizer::<f64>::new(lamb, specs(&sizes)).unwrap();
    let mut params = p0.clone();
    let stats = step(&mut opt, &mut params, &g);
    for i in 0..2 {
        let u: Vec<f64> = cg[i]
            .iter()
            .zip(&p0[i])
            .map(|(g, p)| g / (g.abs() + eps) + wd * p)
            .collect();
        let r = norm(p0[i].iter().copied()) / norm(u.iter().copied());
        assert_close(
            stats.tensors[i].trust_ratio.unwrap(),
            r,
            1e-10,
            "lamb trust ratio",
        );
        for ((got, p), u) in params[i].iter().zip(&p0[i]).zip(&u) {
            assert_close(*got, p - lr * r * u, 1e-12, "lamb update");
        }
    }
}

/// AdamW's `update_clip_rms = d`: per tensor, the Adam direction is scaled by
/// `d / max(rms(u), d)` before the decoupled decay, over several steps,
/// against an f64 AdamW written out here.
#[test]
fn update_clip_rms_scales_the_adam_direction() {
    let (lr, b1, b2, eps, wd, d) = (0.01, 0.9f64, 0.999f64, 0.1, 0.1, 0.5);
    let cfg = parse(
        r#"{"kind":"adamw","lr":0.01,"beta1":0.9,"beta2":0.999,"eps":0.1,"weight_decay":0.1,"update_clip_rms":0.5}"#,
    );
    let sizes = [64, 300];
    let mut rng = Rng(15);
    let mut want: Vec<Vec<f64>> = sizes.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    let mut opt = CpuOptimizer::<f64>::new(cfg, specs(&sizes)).unwrap();
    let mut params = want.clone();
    let mut m: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut v = m.clone();
    for t in 1..=4 {
        // Tensor 0 has large gradients (rms(u) > d: clipped), tensor 1 small
        // ones (rms(u) < d: untouched).
        let g = vec![rng.vec(64, 0.2, 1.0), rng.vec(300, -0.02, 0.02)];
        let stats = step(&mut opt, &mut params, &g);
        for i in 0..2 {
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let mut u = Vec::new();
            for j in 0..sizes[i] {
                m[i][j] = b1 * m[i][j] + (1.0 - b1) * g[i][j];
                v[i][j] = b2 * v[i][j] + (1.0 - b2) * g[i][j] * g[i][j];
                u.push((m[i][j] / bc1) / ((v[i][j] / bc2).sqrt() + eps));
            }
            let rms = (u.iter().map(|x| x * x).sum::<f64>() / u.len() as f64).sqrt();
            let factor = d / rms.max(d);
            assert_eq!(
                factor < 1.0,
                i == 0,
                "step {t}: the data clips tensor 0 only"
            );
            assert_close(
                stats.tensors[i].update_clip_factor.unwrap(),
                factor,
                1e-12,
                "update clip factor",
            );
            for (p, u) in want[i].iter_mut().zip(&u) {
                *p -= lr * (factor * u + wd * *p);
            }
            for (got, w) in params[i].iter().zip(&want[i]) {
                assert_close(
                    *got,
                    *w,
                    1e-12,
                    &format!("adamw + update_clip_rms step {t} tensor {i}"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------- groups

const VARIANTS: &[(&str, &str)] = &[
    ("sgd", r#"{"kind":"sgd","lr":0.1}"#),
    (
        "sgd_nesterov",
        r#"{"kind":"sgd","lr":0.1,"momentum":0.9,"nesterov":true,"weight_decay":0.01}"#,
    ),
    ("adam", r#"{"kind":"adam","lr":0.01,"weight_decay":0.01}"#),
    ("adamw", r#"{"kind":"adamw","lr":0.01,"weight_decay":0.1}"#),
    (
        "adamw_update_clip",
        r#"{"kind":"adamw","lr":0.01,"weight_decay":0.1,"update_clip_rms":0.5}"#,
    ),
    ("lamb", r#"{"kind":"lamb","lr":0.01,"weight_decay":0.01}"#),
    (
        "lars",
        r#"{"kind":"lars","lr":0.1,"weight_decay":0.01,"trust_coefficient":0.02}"#,
    ),
    ("lion", r#"{"kind":"lion","lr":0.001,"weight_decay":0.1}"#),
];

fn lr_scale_zero_case<T: Real>() {
    let sizes = [40, 300, 7];
    let s = specs(&sizes);
    let groups = vec![
        ParamGroup::new("live", ["t0", "t2"]),
        ParamGroup::new("frozen", ["t1"]).with_lr_scale(0.0),
    ];
    let mut rng = Rng(21);
    let p0: Vec<Vec<T>> = sizes.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    for (name, json) in VARIANTS {
        let mut opt =
            CpuOptimizer::<T>::with_groups(parse(json), s.clone(), groups.clone()).unwrap();
        let mut params = p0.clone();
        for _ in 0..3 {
            let grads: Vec<Vec<T>> = sizes.iter().map(|&n| rng.vec(n, -1.0, 1.0)).collect();
            step(&mut opt, &mut params, &grads);
        }
        assert!(
            same_bits(&params[1], &p0[1]),
            "{name} {}: the frozen group moved",
            T::DTYPE
        );
        for i in [0, 2] {
            assert!(
                params[i].iter().zip(&p0[i]).all(|(a, b)| a != b),
                "{name} {}: live tensor {i} did not move",
                T::DTYPE
            );
        }
    }
}

#[test]
fn lr_scale_zero_freezes_a_group() {
    lr_scale_zero_case::<f32>();
    lr_scale_zero_case::<f64>();
}

/// `lr_scale` multiplies the rate: SGD moves the scaled group by exactly
/// `lr * scale * g`.
#[test]
fn lr_scale_multiplies_the_rate() {
    let s = specs(&[10, 10]);
    let groups = vec![
        ParamGroup::new("full", ["t0"]),
        ParamGroup::new("quarter", ["t1"]).with_lr_scale(0.25),
    ];
    let mut opt =
        CpuOptimizer::<f64>::with_groups(parse(r#"{"kind":"sgd","lr":0.5}"#), s, groups).unwrap();
    let mut params = vec![vec![1.0; 10], vec![1.0; 10]];
    let g = vec![vec![0.5; 10], vec![0.5; 10]];
    step(&mut opt, &mut params, &g);
    assert!(params[0].iter().all(|&x| x == 1.0 - 0.5 * 0.5));
    assert!(params[1].iter().all(|&x| x == 1.0 - 0.5 * 0.25 * 0.5));
}

/// With a zero gradient, decoupled decay multiplies the decayed group by
/// exactly `1 - lr*wd` per step and leaves the no-decay group alone.
fn weight_decay_off_case<T: Real>() {
    let (lr, wd) = (0.1, 0.2);
    let sizes = [50, 300];
    let s = specs(&sizes);
    let groups = vec![
        ParamGroup::new("decay", ["t0"]),
        ParamGroup::new("no_decay", ["t1"]).with_weight_decay(false),
    ];
    let mut rng = Rng(31);
    let p0: Vec<Vec<T>> = sizes.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    let zero: Vec<Vec<T>> = sizes.iter().map(|&n| vec![T::zero(); n]).collect();
    let factor = T::from_f64x(1.0 - lr * wd);
    for json in [
        r#"{"kind":"adamw","lr":0.1,"weight_decay":0.2}"#,
        r#"{"kind":"lion","lr":0.1,"weight_decay":0.2}"#,
    ] {
        let mut opt =
            CpuOptimizer::<T>::with_groups(parse(json), s.clone(), groups.clone()).unwrap();
        let mut params = p0.clone();
        let mut want = p0[0].clone();
        for k in 0..3 {
            step(&mut opt, &mut params, &zero);
            want.iter_mut().for_each(|x| *x *= factor);
            assert!(
                same_bits(&params[0], &want),
                "{json} {} step {k}: not p*(1-lr*wd)",
                T::DTYPE
            );
            assert!(
                same_bits(&params[1], &p0[1]),
                "{json} {} step {k}: no-decay group moved",
                T::DTYPE
            );
        }
    }
}

#[test]
fn weight_decay_off_for_a_group() {
    weight_decay_off_case::<f32>();
    weight_decay_off_case::<f64>();
}

/// The coupled kinds with a zero gradient: the decay group moves by its own
/// formula, the no-decay group does not move.
#[test]
fn coupled_weight_decay_off_for_a_group() {
    let (lr, wd) = (0.1, 0.2);
    let s = specs(&[50, 30]);
    let groups = vec![
        ParamGroup::new("decay", ["t0"]),
        ParamGroup::new("no_decay", ["t1"]).with_weight_decay(false),
    ];
    let mut rng = Rng(32);
    let p0: Vec<Vec<f64>> = vec![rng.vec(50, -2.0, 2.0), rng.vec(30, -2.0, 2.0)];
    let zero = vec![vec![0.0; 50], vec![0.0; 30]];
    let pn = norm(p0[0].iter().copied());
    type Expected = Box<dyn Fn(f64) -> f64>;
    let cases: Vec<(&str, Expected)> = vec![
        // torch SGD: g = wd*p; p -= lr*g.
        (
            r#"{"kind":"sgd","lr":0.1,"weight_decay":0.2}"#,
            Box::new(move |p| p - lr * wd * p),
        ),
        // torch Adam, t = 1: g = wd*p, u = g/(|g| + eps).
        (
            r#"{"kind":"adam","lr":0.1,"weight_decay":0.2,"eps":1e-3}"#,
            Box::new(move |p: f64| p - lr * (wd * p) / ((wd * p).abs() + 1e-3)),
        ),
        // optax LAMB: u = 0 + wd*p, r = ||p||/||wd*p|| = 1/wd.
        (
            r#"{"kind":"lamb","lr":0.1,"weight_decay":0.2}"#,
            Box::new(move |p| p - lr * p),
        ),
        // optax LARS: u = wd*p, r = tc*||p||/(wd*||p|| + eps).
        (
            r#"{"kind":"lars","lr":0.1,"weight_decay":0.2,"trust_coefficient":0.5,"eps":1e-3,"momentum":0}"#,
            Box::new(move |p| p - lr * (0.5 * pn / (wd * pn + 1e-3)) * wd * p),
        ),
    ];
    for (json, f) in cases {
        let mut opt =
            CpuOptimizer::<f64>::with_groups(parse(json), s.clone(), groups.clone()).unwrap();
        let mut params = p0.clone();
        step(&mut opt, &mut params, &zero);
        for (got, p) in params[0].iter().zip(&p0[0]) {
            assert_close(*got, f(*p), 1e-14, json);
        }
        assert!(
            same_bits(&params[1], &p0[1]),
            "{json}: no-decay group moved"
        );
    }
}

/// A LAMB group with the trust ratio off reports `None` and moves by plain
/// `lr*u`; the other group reports and applies `||p||/||u||`. Same for LARS
/// (`lr*(g + wd*p)`).
#[test]
fn trust_ratio_off_for_a_group() {
    let (lr, wd, eps) = (0.01, 0.01, 1e-6);
    let sizes = [64, 300];
    let s = specs(&sizes);
    let groups = vec![
        ParamGroup::new("trusted", ["t0"]),
        ParamGroup::new("plain", ["t1"]).with_trust_ratio(false),
    ];
    let mut rng = Rng(41);
    let p0: Vec<Vec<f64>> = sizes.iter().map(|&n| rng.vec(n, -2.0, 2.0)).collect();
    let g: Vec<Vec<f64>> = sizes.iter().map(|&n| rng.vec(n, -1.0, 1.0)).collect();

    let lamb = parse(r#"{"kind":"lamb","lr":0.01,"weight_decay":0.01,"eps":1e-6}"#);
    let mut opt = CpuOptimizer::<f64>::with_groups(lamb, s.clone(), groups.clone()).unwrap();
    let mut params = p0.clone();
    let stats = step(&mut opt, &mut params, &g);
    for i in 0..2 {
        // t = 1: m_hat = g, v_hat = g^2.
        let u: Vec<f64> = g[i]
            .iter()
            .zip(&p0[i])
            .map(|(g, p)| g / (g.abs() + eps) + wd * p)
            .collect();
        let r = norm(p0[i].iter().copied()) / norm(u.iter().copied());
        let applied = if i == 0 {
            assert_close(
                stats.tensors[0].trust_ratio.unwrap(),
                r,
                1e-12,
                "lamb trust ratio",
            );
            r
        } else {
            assert_eq!(stats.tensors[1].trust_ratio, None);
            1.0
        };
        for ((got, p), u) in params[i].iter().zip(&p0[i]).zip(&u) {
            assert_close(*got, p - lr * applied * u, 1e-14, "lamb update");
        }
    }

    let (tc, lr) = (0.02, 0.1);
    let lars = parse(r#"{"kind":"lars","lr":0.1,"weight_decay":0.01,"trust_coefficient":0.02}"#);
    let mut opt = CpuOptimizer::<f64>::with_groups(lars, s, groups).unwrap();
    let mut params = p0.clone();
    let stats = step(&mut opt, &mut params, &g);
    for i in 0..2 {
        let u: Vec<f64> = g[i].iter().zip(&p0[i]).map(|(g, p)| g + wd * p).collect();
        let r = tc * norm(p0[i].iter().copied()) / norm(u.iter().copied());
        let applied = if i == 0 {
            assert_close(
                stats.tensors[0].trust_ratio.unwrap(),
                r,
                1e-12,
                "lars trust ratio",
            );
            r
        } else {
            assert_eq!(stats.tensors[1].trust_ratio, None);
            1.0
        };
        for ((got, p), u) in params[i].iter().zip(&p0[i]).zip(&u) {
            assert_close(*got, p - lr * applied * u, 1e-14, "lars update");
        }
    }
}

// ---------------------------------------------------------------- schedules

#[track_caller]
fn assert_lr(s: &Schedule, step: u64, want: f64) {
    let got = s.lr_at(step);
    assert!(
        (got - want).abs() <= 1e-12 * want.abs().max(1e-300),
        "{s:?} at step {step}: {got:e} != {want:e}"
    );
}

#[test]
fn constant_schedule() {
    let s = Schedule::Constant { lr: 3e-4 };
    s.validate().unwrap();
    for step in [0, 1, 1000, u64::MAX] {
        assert_eq!(s.lr_at(step), 3e-4);
    }
}

#[test]
fn warmup_cosine_schedule() {
    let (peak, fin) = (1e-3, 1e-4);
    let s = Schedule::WarmupCosine {
        peak_lr: peak,
        warmup_steps: 10,
        total_steps: 110,
        final_lr: fin,
    };
    s.validate().unwrap();
    assert_lr(&s, 0, peak / 10.0); // first step: 1/10 of the peak
    assert_lr(&s, 4, peak * 5.0 / 10.0); // linear
    assert_lr(&s, 9, peak); // end of warmup
    assert_lr(&s, 10, peak); // start of the decay
    assert_lr(&s, 60, (peak + fin) / 2.0); // midpoint of the decay
                                           // A quarter into the decay: cos(pi/4) = sqrt(2)/2.
    assert_lr(&s, 35, fin + (peak - fin) * (0.5 + 0.25 * 2f64.sqrt()));
    assert_lr(&s, 110, fin); // end
    assert_lr(&s, 111, fin);
    assert_lr(&s, 1_000_000, fin); // after the end
                                   // Monotone: up through warmup, down through the decay.
    for k in 0..9 {
        assert!(s.lr_at(k) < s.lr_at(k + 1));
    }
    for k in 10..110 {
        assert!(s.lr_at(k) > s.lr_at(k + 1), "step {k}");
    }
    // No warmup: the peak at step 0.
    let s = Schedule::WarmupCosine {
        peak_lr: peak,
        warmup_steps: 0,
        total_steps: 100,
        final_lr: 0.0,
    };
    assert_lr(&s, 0, peak);
    assert_lr(&s, 50, peak / 2.0);
    assert_eq!(s.lr_at(100), 0.0);
}

#[test]
fn wsd_schedule() {
    let (peak, fin) = (1e-3, 1e-5);
    let s = Schedule::Wsd {
        peak_lr: peak,
        warmup_steps: 10,
        stable_steps: 20,
        decay_steps: 10,
        final_lr: fin,
    };
    s.validate().unwrap();
    // Warmup: steps 0..10 reach the peak at step 9, like warmup-cosine.
    assert_lr(&s, 0, peak / 10.0);
    assert_lr(&s, 9, peak);
    // Stable: steps 10..30.
    for k in 10..30 {
        assert_eq!(s.lr_at(k), peak, "stable step {k}");
    }
    // Decay: 10 linear steps 30..40 whose last reaches the floor.
    for j in 0..10u64 {
        let want = peak + (fin - peak) * (j + 1) as f64 / 10.0;
        assert_lr(&s, 30 + j, want);
    }
    assert_lr(&s, 34, (peak + fin) / 2.0);
    assert_lr(&s, 39, fin);
    // Floor after the decay.
    for k in [40, 41, 1000] {
        assert_lr(&s, k, fin);
    }
    // No decay phase: straight to the floor after the stable phase.
    let s = Schedule::Wsd {
        peak_lr: peak,
        warmup_steps: 0,
        stable_steps: 5,
        decay_steps: 0,
        final_lr: fin,
    };
    assert_eq!(s.lr_at(0), peak);
    assert_eq!(s.lr_at(4), peak);
    assert_lr(&s, 5, fin);
}

#[test]
fn schedule_validation_names_the_field() {
    let bad = [
        (Schedule::Constant { lr: -1.0 }, "schedule.lr"),
        (Schedule::Constant { lr: f64::NAN }, "schedule.lr"),
        (
            Schedule::WarmupCosine {
                peak_lr: f64::INFINITY,
                warmup_steps: 1,
                total_steps: 10,
                final_lr: 0.0,
            },
            "schedule.peak_lr",
        ),
        (
            Schedule::WarmupCosine {
                peak_lr: 1.0,
                warmup_steps: 1,
                total_steps: 10,
                final_lr: -0.1,
            },
            "schedule.final_lr",
        ),
        (
            Schedule::WarmupCosine {
                peak_lr: 1.0,
                warmup_steps: 20,
                total_steps: 10,
                final_lr: 0.0,
            },
            "schedule.total_steps",
        ),
        (
            Schedule::Wsd {
                peak_lr: -1.0,
                warmup_steps: 1,
                stable_steps: 1,
                decay_steps: 1,
                final_lr: 0.0,
            },
            "schedule.peak_lr",
        ),
        (
            Schedule::Wsd {
                peak_lr: 1.0,
                warmup_steps: 1,
                stable_steps: 1,
                decay_steps: 1,
                final_lr: f64::NAN,
            },
            "schedule.final_lr",
        ),
    ];
    for (s, field) in bad {
        let e = s.validate().unwrap_err();
        assert!(e.to_string().contains(field), "{s:?}: {e}");
    }
}

#[test]
fn schedules_parse_from_json() {
    let s: Schedule = serde_json::from_str(
        r#"{"kind":"warmup_cosine","peak_lr":0.001,"warmup_steps":10,"total_steps":110,"final_lr":0.0001}"#,
    )
    .unwrap();
    assert_eq!(
        s,
        Schedule::WarmupCosine {
            peak_lr: 0.001,
            warmup_steps: 10,
            total_steps: 110,
            final_lr: 0.0001
        }
    );
    let s: Schedule = serde_json::from_str(
        r#"{"kind":"wsd","peak_lr":1,"warmup_steps":0,"stable_steps":3,"decay_steps":2,"final_lr":0}"#,
    )
    .unwrap();
    assert_eq!(s.lr_at(3), 0.5);
    assert!(serde_json::from_str::<Schedule>(r#"{"kind":"constant","lr":1,"extra":2}"#).is_err());
}

/// A trainer's loop: `set_lr(schedule.lr_at(step))`; the stats report it
/// and SGD moves by exactly it.
#[test]
fn schedule_drives_the_optimizer() {
    let sched = Schedule::Wsd {
        peak_lr: 0.5,
        warmup_steps: 2,
        stable_steps: 2,
        decay_steps: 2,
        final_lr: 0.125,
    };
    let mut opt = CpuOptimizer::<f64>::new(parse(r#"{"kind":"sgd","lr":1}"#), specs(&[3])).unwrap();
    let mut params = vec![vec![0.0; 3]];
    let g = vec![vec![1.0; 3]];
    let mut want = 0.0;
    for k in 0..8 {
        let lr = sched.lr_at(k);
        opt.set_lr(lr).unwrap();
        let stats = step(&mut opt, &mut params, &g);
        assert_eq!(stats.lr, lr);
        want -= lr;
        assert!(params[0].iter().all(|&x| x == want), "step {k}");
    }
    assert_eq!(
        want,
        -(0.25 + 0.5 + 0.5 + 0.5 + 0.3125 + 0.125 + 0.125 + 0.125)
    );
}

// ---------------------------------------------------------------- bf16

fn mixed(json: &str, init: &[Vec<bf16>], rounding: Rounding) -> MixedPrecisionOptimizer {
    let sizes: Vec<usize> = init.iter().map(|p| p.len()).collect();
    let s = specs(&sizes);
    let refs: Vec<&[bf16]> = init.iter().map(|p| &p[..]).collect();
    MixedPrecisionOptimizer::new(
        parse(json),
        s.clone(),
        vec![ParamGroup::all(&s)],
        &refs,
        rounding,
    )
    .unwrap()
}

fn step_mixed(opt: &mut MixedPrecisionOptimizer, params: &mut [Vec<bf16>], grads: &[Vec<bf16>]) {
    let mut ps: Vec<&mut [bf16]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[bf16]> = grads.iter().map(|g| &g[..]).collect();
    assert!(opt.step(&mut ps, &gs).unwrap().skipped.is_none());
}

fn random_bf16(rng: &mut Rng, sizes: &[usize], lo: f64, hi: f64) -> Vec<Vec<bf16>> {
    sizes
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| bf16::from_f64(rng.uniform(lo, hi)))
                .collect()
        })
        .collect()
}

#[test]
fn nearest_rounding_is_bf16_from_f32_of_the_master() {
    let sizes = [300, 17000, 1];
    let mut rng = Rng(51);
    let init = random_bf16(&mut rng, &sizes, -2.0, 2.0);
    let mut opt = mixed(
        r#"{"kind":"adamw","lr":0.01,"weight_decay":0.1}"#,
        &init,
        Rounding::Nearest,
    );
    let mut params = init.clone();
    for _ in 0..4 {
        let g = random_bf16(&mut rng, &sizes, -1.0, 1.0);
        step_mixed(&mut opt, &mut params, &g);
        for (i, p) in params.iter().enumerate() {
            let want: Vec<bf16> = opt.master(i).iter().map(|&x| bf16::from_f32(x)).collect();
            assert!(
                p.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "tensor {i}"
            );
        }
    }
    // The master weights carry what bf16 cannot hold.
    assert!(opt
        .master(1)
        .iter()
        .zip(&params[1])
        .any(|(m, p)| *m != p.to_f32()));
}

/// Stochastic rounding is unbiased: updates far below half a bf16 ulp move
/// the mean of many bf16 parameters by the f32 update, where round-to-nearest
/// leaves every one of them where it was.
fn stochastic_mean_case(update: f64, steps: usize) {
    let n = 500_000;
    let init = vec![vec![bf16::ONE; n]];
    // SGD with a constant gradient of ±1: the master moves by `update` a step.
    let g = vec![vec![
        bf16::from_f64(if update < 0.0 { 1.0 } else { -1.0 });
        n
    ]];
    let json = format!(r#"{{"kind":"sgd","lr":{:e}}}"#, update.abs());
    let mut sto = mixed(&json, &init, Rounding::Stochastic { seed: 2024 });
    let mut near = mixed(&json, &init, Rounding::Nearest);
    let (mut p_sto, mut p_near) = (init.clone(), init.clone());
    // The two bf16 neighbours of 1.0: ulp 2^-8 below, 2^-7 above.
    let other = if update < 0.0 {
        1.0 - 1.0 / 256.0
    } else {
        1.0 + 1.0 / 128.0
    };
    for k in 1..=steps {
        step_mixed(&mut sto, &mut p_sto, &g);
        step_mixed(&mut near, &mut p_near, &g);
        let master = sto.master(0)[0] as f64;
        assert!(sto.master(0).iter().all(|&m| m as f64 == master));
        let moved = master - 1.0;
        assert!(
            (moved - update * k as f64).abs() < 1e-6,
            "the f32 master moved {moved}"
        );
        let half_ulp = if update < 0.0 {
            1.0 / 512.0
        } else {
            1.0 / 256.0
        };
        assert!(
            moved.abs() < half_ulp / 2.0,
            "the test needs updates far below half an ulp"
        );
        assert!(
            p_near[0].iter().all(|&x| x == bf16::ONE),
            "nearest rounding moved"
        );
        assert!(
            p_sto[0]
                .iter()
                .all(|&x| x == bf16::ONE || x.to_f64() == other),
            "stochastic rounding left the two neighbours"
        );
        let mean = p_sto[0].iter().map(|x| x.to_f64()).sum::<f64>() / n as f64;
        let rel = ((mean - 1.0) - moved).abs() / moved.abs();
        assert!(
            rel < 0.05,
            "step {k}: mean moved {:e}, master {moved:e} ({:.1}% off)",
            mean - 1.0,
            rel * 100.0
        );
    }
}

#[test]
fn stochastic_rounding_is_unbiased_downwards() {
    stochastic_mean_case(-1e-4, 5);
}

#[test]
fn stochastic_rounding_is_unbiased_upwards() {
    stochastic_mean_case(3e-4, 3);
}

/// The same seed rounds the same way; another seed does not; and every value
/// is one of the two bf16 neighbours of its master weight.
#[test]
fn stochastic_rounding_is_deterministic_per_seed() {
    let sizes = [1000, 300];
    let mut rng = Rng(61);
    let init = random_bf16(&mut rng, &sizes, -2.0, 2.0);
    let grads: Vec<Vec<Vec<bf16>>> = (0..3)
        .map(|_| random_bf16(&mut rng, &sizes, -1.0, 1.0))
        .collect();
    let json = r#"{"kind":"adamw","lr":0.001,"weight_decay":0.1}"#;
    let run = |seed: u64| {
        let mut opt = mixed(json, &init, Rounding::Stochastic { seed });
        let mut params = init.clone();
        for g in &grads {
            step_mixed(&mut opt, &mut params, g);
            for (i, p) in params.iter().enumerate() {
                for (x, &m) in p.iter().zip(opt.master(i)) {
                    // Truncation toward zero, or one bf16 ulp further from zero.
                    let down = (m.to_bits() >> 16) as u16;
                    assert!(
                        x.to_bits() == down || x.to_bits() == down + 1,
                        "{x} is not a neighbour of {m}"
                    );
                    if m == bf16::from_f32(m).to_f32() {
                        assert_eq!(x.to_f32(), m, "an exact value must stay exact");
                    }
                }
            }
        }
        params
    };
    let a = run(7);
    let b = run(7);
    let c = run(8);
    let bits =
        |p: &Vec<Vec<bf16>>| -> Vec<u16> { p.iter().flatten().map(|x| x.to_bits()).collect() };
    assert_eq!(bits(&a), bits(&b), "same seed, different rounding");
    assert_ne!(bits(&a), bits(&c), "different seeds, same rounding");
}

#[test]
fn schedules_hold_their_end_value_up_to_the_last_step_index() {
    // The step counter may run far past a schedule; the rate stays at its
    // end value, without overflow, up to u64::MAX.
    let schedules = [
        (
            Schedule::Wsd {
                peak_lr: 1.0,
                warmup_steps: 0,
                stable_steps: 0,
                decay_steps: 1,
                final_lr: 0.1,
            },
            0.1,
        ),
        (
            Schedule::WarmupCosine {
                peak_lr: 1.0,
                warmup_steps: 10,
                total_steps: 100,
                final_lr: 0.1,
            },
            0.1,
        ),
        (Schedule::Constant { lr: 0.5 }, 0.5),
    ];
    for (s, end) in schedules {
        for step in [1000, u64::MAX - 1, u64::MAX] {
            assert!((s.lr_at(step) - end).abs() < 1e-15, "{s:?} at {step}");
        }
    }
}
