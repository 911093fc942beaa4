//! The spike guards: planted loss spikes are found (and nothing else),
//! rollback is bit-exact, and ZClip, SPAM clipping and the loss scaler match
//! hand-computed numbers.

mod common;
use common::Rng;

use keel::guard::{
    analyze_losses, Decision, DynamicLossScaler, LossGuard, LossGuardConfig, LossScaleAction,
    LossScalerConfig, Spam, SpamConfig, SpikeAction, SpikeDetector, SpikeDetectorConfig, ZClip,
    ZClipConfig, ZClipMode,
};
use keel::{CpuOptimizer, KeelError, Optimizer, OptimizerConfig, ParamSpec, StateData, StateDict};

/// A decaying loss curve `2 + 3 exp(-t / 300)` with uniform noise of
/// half-width `noise`.
fn loss_curve(n: usize, noise: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|t| 2.0 + 3.0 * (-(t as f64) / 300.0).exp() + rng.uniform(-noise, noise))
        .collect()
}

fn field(err: KeelError) -> String {
    match err {
        KeelError::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn planted_spikes_are_found_with_their_extent_and_recovery() {
    let config = SpikeDetectorConfig::default();
    // Single-step spikes doubling the loss at 400, 900 and 1500; a 3-step one
    // at 1200.
    let planted = [(400, 400), (900, 900), (1200, 1202), (1500, 1500)];
    for seed in 1..=5 {
        let mut losses = loss_curve(2000, 0.05, seed);
        for &(start, end) in &planted {
            for l in &mut losses[start..=end] {
                *l *= 2.0;
            }
        }
        let events = analyze_losses(&losses, &config).unwrap();
        let found: Vec<(usize, usize)> = events.iter().map(|e| (e.start, e.end)).collect();
        assert_eq!(found, planted, "seed {seed}");

        let mut ema = vec![losses[0]];
        for &l in &losses[1..] {
            ema.push(0.9 * ema.last().unwrap() + 0.1 * l);
        }
        for e in &events {
            let window = &losses[e.start - 100..e.start];
            let mean = window.iter().sum::<f64>() / 100.0;
            let sd = (window.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 100.0).sqrt();
            assert!((e.pre_mean - mean).abs() < 1e-12 && (e.pre_sd - sd).abs() < 1e-12);
            let peak = losses[e.start..=e.end]
                .iter()
                .cloned()
                .fold(f64::MIN, f64::max);
            assert_eq!(e.peak_loss, peak);
            assert_eq!(losses[e.peak_step], peak);
            assert!((e.excursion - (peak - mean)).abs() < 1e-12);
            assert!(e.excursion > 0.8 * mean, "seed {seed}: {e:?}");
            // Recovery per the definition: the first step from the end on
            // whose EMA is within 1% of the pre-spike mean.
            let k = e.recovery_steps.expect("recovers");
            assert!(ema[e.start + k] <= 1.01 * mean);
            assert!((e.end..e.start + k).all(|t| ema[t] > 1.01 * mean));
            // Doubling lifts the EMA ~10% per spike step: about as slow as
            // on a flat curve (22 and 34 steps there, see below).
            assert!((5..=40).contains(&k), "seed {seed}: {e:?}");
        }
    }
}

#[test]
fn recovery_on_a_flat_curve_matches_the_ema_by_hand() {
    let config = SpikeDetectorConfig::default();
    let mut losses = vec![1.0; 400];
    losses[150] = 2.0;
    losses[300..303].fill(2.0);
    let events = analyze_losses(&losses, &config).unwrap();
    assert_eq!(events.len(), 2);
    // One step: the EMA is 1 + 0.1 * 0.9^k, within 1% from k = 22.
    assert_eq!(
        (events[0].excursion, events[0].recovery_steps),
        (1.0, Some(22))
    );
    // Three steps: the excess is 0.271 at the end, 0.271 * 0.9^j <= 0.01
    // from j = 32, so 2 + 32 steps from the start.
    assert_eq!((events[1].start, events[1].end), (300, 302));
    assert_eq!(events[1].recovery_steps, Some(34));
    // Cut the series short: no recovery within it.
    let events = analyze_losses(&losses[..170], &config).unwrap();
    assert_eq!(events[0].recovery_steps, None);
}

#[test]
fn no_spikes_in_smooth_or_noisy_series() {
    let config = SpikeDetectorConfig::default();
    for seed in 1..=5 {
        for noise in [0.0, 0.05, 0.15] {
            let losses = loss_curve(3000, noise, seed);
            assert_eq!(
                analyze_losses(&losses, &config).unwrap(),
                vec![],
                "noise {noise}"
            );
        }
    }
    // Flat and noisy: the 4-sd band is wide, the 1.1-mean bar holds it back.
    let mut rng = Rng(7);
    let flat: Vec<f64> = (0..3000).map(|_| 3.0 + rng.uniform(-0.1, 0.1)).collect();
    assert!(analyze_losses(&flat, &config).unwrap().is_empty());
}

#[test]
fn consecutive_spike_steps_merge_into_one_event() {
    let config = SpikeDetectorConfig {
        window: 10,
        warmup: 10,
        ..Default::default()
    };
    let mut d = SpikeDetector::new(config).unwrap();
    let mut losses = vec![1.0; 30];
    // Each spike widens the band for the next (they join the window).
    losses[15..19].copy_from_slice(&[5.0, 20.0, f64::NAN, 80.0]);
    losses[29] = 9.0;
    let spikes: Vec<(bool, bool)> = losses
        .iter()
        .map(|&l| {
            let c = d.observe(l);
            (c.spike, c.new_event)
        })
        .collect();
    for (t, &(spike, new)) in spikes.iter().enumerate() {
        assert_eq!(spike, (15..19).contains(&t) || t == 29, "step {t}");
        assert_eq!(new, t == 15 || t == 29, "step {t}");
    }
    assert_eq!(d.events(), 2);
    let events = analyze_losses(&losses, &config).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!((events[0].start, events[0].end), (15, 18));
    assert_eq!(
        (events[0].peak_step, events[0].peak_loss),
        (17, f64::INFINITY)
    );
    assert_eq!((events[1].start, events[1].end), (29, 29));
}

fn adamw() -> CpuOptimizer<f32> {
    let config = OptimizerConfig::from_json(
        r#"{"kind": "adamw", "lr": 0.01, "weight_decay": 0.1, "clip_global_norm": 1.0}"#,
    )
    .unwrap();
    let specs = vec![ParamSpec::new("w", [3, 4]), ParamSpec::new("b", [4])];
    CpuOptimizer::new(config, specs).unwrap()
}

fn step(opt: &mut CpuOptimizer<f32>, params: &mut [Vec<f32>], rng: &mut Rng) {
    let grads: Vec<Vec<f32>> = params.iter().map(|p| rng.vec(p.len(), -1.0, 1.0)).collect();
    let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| &mut x[..]).collect();
    let g: Vec<&[f32]> = grads.iter().map(|x| &x[..]).collect();
    assert!(opt.step(&mut p, &g).unwrap().skipped.is_none());
}

fn bits(params: &[Vec<f32>]) -> Vec<Vec<u32>> {
    params
        .iter()
        .map(|p| p.iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn state_bits(s: &StateDict) -> Vec<(String, Vec<u64>)> {
    s.tensors
        .iter()
        .map(|t| {
            let b = match &t.data {
                StateData::F32(v) => v.iter().map(|x| x.to_bits() as u64).collect(),
                StateData::F64(v) => v.iter().map(|x| x.to_bits()).collect(),
            };
            (t.name.clone(), b)
        })
        .collect()
}

#[test]
fn rollback_restores_bit_identical_params_and_state_and_resumes_exactly() {
    let mut rng = Rng(11);
    let init = vec![rng.vec::<f32>(12, -1.0, 1.0), rng.vec::<f32>(4, -1.0, 1.0)];
    let mut guard = LossGuard::<f32>::new(LossGuardConfig::default()).unwrap();

    // Run A: 3 steps, snapshot, 3 more, restore, then 4 steps.
    let (mut opt, mut params) = (adamw(), init.clone());
    let mut data = Rng(99);
    for _ in 0..3 {
        step(&mut opt, &mut params, &mut data);
    }
    guard.snapshot(&params, &opt).unwrap();
    let (want_params, want_state) = (bits(&params), opt.state_dict().unwrap());
    let mut detour = Rng(5);
    opt.set_lr(0.5).unwrap();
    for _ in 0..3 {
        step(&mut opt, &mut params, &mut detour);
    }
    assert_ne!(bits(&params), want_params);
    guard.restore(&mut params, &mut opt).unwrap();
    let state = opt.state_dict().unwrap();
    assert_eq!(bits(&params), want_params);
    assert_eq!(state_bits(&state), state_bits(&want_state));
    assert_eq!((state.step, state.config.lr()), (3, 0.01));
    assert_eq!(state, want_state);
    assert_eq!(guard.counts().rollbacks, 1);
    let mut tail = Rng(1234);
    for _ in 0..4 {
        step(&mut opt, &mut params, &mut tail);
    }

    // Run B never took the detour.
    let (mut opt_b, mut params_b) = (adamw(), init);
    let mut data = Rng(99);
    for _ in 0..3 {
        step(&mut opt_b, &mut params_b, &mut data);
    }
    let mut tail = Rng(1234);
    for _ in 0..4 {
        step(&mut opt_b, &mut params_b, &mut tail);
    }
    assert_eq!(bits(&params), bits(&params_b));
    assert_eq!(
        state_bits(&opt.state_dict().unwrap()),
        state_bits(&opt_b.state_dict().unwrap())
    );
    assert_eq!(opt.step_count(), 7);
}

#[test]
fn restore_refuses_bad_buffers_and_a_missing_snapshot() {
    let mut guard = LossGuard::<f32>::new(LossGuardConfig::default()).unwrap();
    let mut opt = adamw();
    let mut params = vec![vec![0.5f32; 12], vec![0.5f32; 4]];
    assert!(matches!(
        guard.restore(&mut params, &mut opt),
        Err(KeelError::State(_))
    ));
    guard.snapshot(&params, &opt).unwrap();
    let mut short = vec![vec![0.0f32; 12], vec![0.0f32; 3]];
    assert!(matches!(
        guard.restore(&mut short, &mut opt),
        Err(KeelError::Shape { .. })
    ));
    assert_eq!(short, vec![vec![0.0f32; 12], vec![0.0f32; 3]]);
    assert!(guard.snapshot(&params[..1], &opt).is_err());
}

/// Feeds `losses` to a guard over an SGD optimizer, stepping with gradient 1
/// on `Step`; returns the decisions and the snapshots taken.
fn drive(guard: &mut LossGuard<f64>, losses: &[f64]) -> (Vec<Decision>, Vec<usize>, Vec<f64>) {
    let config = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 1.0}"#).unwrap();
    let mut opt = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [1])]).unwrap();
    let mut w = vec![vec![0.0f64]];
    guard.snapshot(&w, &opt).unwrap();
    let (mut decisions, mut snaps, mut lr_factors) = (vec![], vec![], vec![]);
    for (t, &loss) in losses.iter().enumerate() {
        let d = guard.observe(t as u64, loss);
        decisions.push(d);
        match d {
            Decision::Step => {
                lr_factors.push(guard.lr_factor());
                opt.set_lr(guard.lr_factor()).unwrap();
                let mut p: Vec<&mut [f64]> = w.iter_mut().map(|x| &mut x[..]).collect();
                opt.step(&mut p, &[&[-1.0][..]]).unwrap();
                if guard.after_step(&w, &opt).unwrap() {
                    snaps.push(t);
                }
            }
            Decision::Skip => {}
            Decision::Rollback => guard.restore(&mut w, &mut opt).unwrap(),
        }
    }
    (decisions, snaps, lr_factors)
}

#[test]
fn guard_skips_rolls_back_lowers_lr_and_counts() {
    use Decision::{Rollback, Skip, Step};
    let config = LossGuardConfig {
        detector: SpikeDetectorConfig {
            window: 5,
            warmup: 5,
            ..Default::default()
        },
        action: SpikeAction::Rollback,
        snapshot_every: 3,
        lr_factor: 0.25,
        lr_steps: 2,
        skip_after_rollback: 1,
    };
    let mut guard = LossGuard::new(config).unwrap();
    let mut losses = vec![1.0; 24];
    losses[8] = 3.0; // rolls back, then skips the next batch
    losses[9] = 10.0; // same event: skipped (counts as the post-rollback skip)
    losses[16] = f64::NAN; // non-finite: rolls back
    let (d, snaps, lr) = drive(&mut guard, &losses);
    let want = [
        Step, Step, Step, Step, Step, Step, Step, Step, Rollback, Skip, Step, Step, Step, Step,
        Step, Step, Rollback, Skip, Step, Step, Step, Step, Step, Step,
    ];
    assert_eq!(d, want);
    // Snapshots every 3 steps while the window is clean: none from the spike
    // at 9 until 5 clean losses (14), then none from the NaN at 16 until
    // 5 finite losses after it (21).
    assert_eq!(snaps, vec![2, 5, 14, 21]);
    // Two lowered steps after each rollback.
    assert_eq!(lr[8..10], [0.25, 0.25]);
    assert_eq!(lr[10], 1.0);
    assert_eq!(guard.snapshot_step(), Some(21));
    let c = guard.counts();
    assert_eq!(
        (
            c.spikes,
            c.spike_steps,
            c.nonfinite,
            c.skips,
            c.rollbacks,
            c.snapshots
        ),
        (2, 3, 1, 2, 2, 5)
    );

    // Skip action: every spike step is skipped; NaN still rolls back.
    let mut guard = LossGuard::new(LossGuardConfig {
        action: SpikeAction::Skip,
        skip_after_rollback: 0,
        ..config
    })
    .unwrap();
    let (d, _, _) = drive(&mut guard, &losses);
    assert_eq!(
        (d[8], d[9], d[10], d[16], d[17]),
        (Skip, Skip, Step, Rollback, Step)
    );
    assert_eq!((guard.counts().skips, guard.counts().rollbacks), (2, 1));

    // No snapshot yet: a non-finite loss can only be skipped.
    let mut bare = LossGuard::<f64>::new(config).unwrap();
    assert_eq!(bare.observe(0, f64::INFINITY), Skip);
}

#[test]
fn zclip_matches_hand_computed_emas_and_clips_an_outlier() {
    let mut z = ZClip::new(ZClipConfig {
        warmup_steps: 3,
        ..Default::default()
    })
    .unwrap();
    // Warm-up: no clipping, however large; non-finite norms are not counted.
    for n in [1.0, f64::NAN, 2.0, f64::INFINITY] {
        let out = z.observe(n);
        assert_eq!((out.factor, out.z), (1.0, None));
        assert_eq!(z.mean(), None);
    }
    assert_eq!(z.observe(3.0).factor, 1.0);
    // mean 2, population variance 2/3.
    assert_eq!(z.mean(), Some(2.0));
    assert!((z.variance().unwrap() - 2.0 / 3.0).abs() < 1e-15);

    let out = z.observe(2.5); // z = 0.61: kept
    assert_eq!(out.factor, 1.0);
    assert!((z.mean().unwrap() - 2.015).abs() < 1e-14);
    assert!((z.variance().unwrap() - 0.653_723_416_666_666_6).abs() < 1e-14);

    let out = z.observe(10.0); // z = 9.876: clipped to mean + 2.5 sd
    assert!((out.z.unwrap() - 9.875_915_432_282_717).abs() < 1e-9);
    assert!((out.clipped_norm - 4.036_329_105_852_549).abs() < 1e-12);
    assert!((out.factor - 0.403_632_910_585_254_9).abs() < 1e-13);
    // The EMAs absorb the clipped norm, not 10.
    assert!((z.mean().unwrap() - 2.075_639_873_175_576_5).abs() < 1e-13);
    assert!((z.variance().unwrap() - 0.749_440_782_180_729_1).abs() < 1e-13);
    assert_eq!(z.clipped_count(), 1);

    // Non-finite after warm-up: factor 1, statistics untouched.
    let before = (z.mean(), z.variance());
    assert_eq!(z.observe(f64::NAN).factor, 1.0);
    assert_eq!((z.mean(), z.variance()), before);

    // The helper scales the gradients in place.
    let mut g = [vec![60.0f64, 80.0]]; // norm 100
    let mut views: Vec<&mut [f64]> = g.iter_mut().map(|x| &mut x[..]).collect();
    let out = z.clip(&mut views);
    assert!((g[0][0].hypot(g[0][1]) - out.clipped_norm).abs() < 1e-12);
    assert!(out.factor < 0.05);
}

#[test]
fn zclip_reciprocal_and_max_norm() {
    let mut z = ZClip::new(ZClipConfig {
        warmup_steps: 2,
        eps: 0.0,
        mode: ZClipMode::Reciprocal,
        ..Default::default()
    })
    .unwrap();
    z.observe(1.0);
    z.observe(3.0); // mean 2, sd 1
    let out = z.observe(12.0); // z = 10: 2 + 2.5^2 / 10 * 1
    assert!((out.clipped_norm - 2.625).abs() < 1e-12);

    let mut z = ZClip::new(ZClipConfig {
        max_norm: Some(1.5),
        ..Default::default()
    })
    .unwrap();
    let out = z.observe(3.0); // warm-up, but the fixed ceiling applies
    assert_eq!(out.factor, 0.5);
}

#[test]
fn spam_clips_against_the_second_moment_and_resets() {
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.001}"#).unwrap();
    let mut opt = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [5])]).unwrap();
    let mut spam = Spam::new(SpamConfig {
        reset_interval: Some(2),
        warmup_steps: 4,
        ..Default::default()
    })
    .unwrap();
    let mut w = [0.0f64; 5];

    // Step 1: v is zero, nothing is clipped.
    let mut g = [1.0, 2.0, -3.0, 0.5, 0.0];
    assert_eq!(spam.clip_grads(&opt, &mut [&mut g[..]]).unwrap(), 0);
    opt.step(&mut [&mut w[..]], &[&g[..]]).unwrap();
    assert!(!spam.after_step(&mut opt));
    // v = 0.001 g², so theta v = 5 g_1²: [5, 20, 45, 1.25, 0].
    let mut g = vec![3.0, -5.0, 7.0, 1.0, 100.0];
    assert_eq!(spam.clip_grads(&opt, &mut [&mut g[..]]).unwrap(), 3);
    let want = [5f64.sqrt(), -(20f64.sqrt()), 45f64.sqrt(), 1.0, 100.0];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{g:?}");
    }
    assert_eq!(spam.lr_factor(), 1.0);
    opt.step(&mut [&mut w[..]], &[&g[..]]).unwrap();
    assert!(spam.after_step(&mut opt)); // step 2: reset
    assert!(opt
        .state_buffer(0, "exp_avg_sq")
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    assert!(opt
        .state_buffer(0, "exp_avg")
        .unwrap()
        .iter()
        .all(|&v| v == 0.0));
    assert_eq!(opt.step_count(), 2);

    // Cosine re-warmup over 4 steps.
    let mut factors = vec![];
    for _ in 0..5 {
        factors.push(spam.lr_factor());
        let mut g = [1.0; 5];
        spam.clip_grads(&opt, &mut [&mut g[..]]).unwrap();
        opt.step(&mut [&mut w[..]], &[&g[..]]).unwrap();
        spam.after_step(&mut opt);
    }
    // Steps 3..7 reset again after 4 and 6, restarting the ramp.
    let ramp0 = 0.5 * (1.0 - std::f64::consts::FRAC_PI_4.cos());
    assert!((factors[0] - ramp0).abs() < 1e-15);
    assert!((factors[1] - 0.5).abs() < 1e-15);
    assert!((factors[2] - ramp0).abs() < 1e-15);
    assert_eq!((spam.resets(), spam.clipped_total()), (3, 3));

    // SGD keeps no second moment.
    let sgd = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 0.1}"#).unwrap();
    let sgd = CpuOptimizer::<f64>::new(sgd, vec![ParamSpec::new("w", [1])]).unwrap();
    let mut g = [1.0];
    let err = spam.clip_grads(&sgd, &mut [&mut g[..]]).unwrap_err();
    assert_eq!(field(err), "spam");
    // SOAP keeps an `exp_avg_sq`, but in its eigenbasis: refused as well.
    let soap = OptimizerConfig::from_json(r#"{"kind": "soap", "lr": 0.01}"#).unwrap();
    let mut soap = CpuOptimizer::<f64>::new(soap, vec![ParamSpec::new("w", [3, 2])]).unwrap();
    let mut w = [0.5; 6];
    let mut g = [1.0, -2.0, 3.0, 0.5, 0.1, -0.7];
    soap.step(&mut [&mut w[..]], &[&g[..]]).unwrap();
    let err = spam.clip_grads(&soap, &mut [&mut g[..]]).unwrap_err();
    assert!(err.to_string().contains("not soap"), "{err}");
    // One gradient per tensor.
    let adamw = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.1}"#).unwrap();
    let two = vec![ParamSpec::new("a", [1]), ParamSpec::new("b", [1])];
    let adamw = CpuOptimizer::<f64>::new(adamw, two).unwrap();
    let mut g = [1.0];
    let err = spam.clip_grads(&adamw, &mut [&mut g[..]]).unwrap_err();
    assert!(matches!(err, KeelError::Shape { .. }), "{err}");
}

/// `reset_state` puts every kind's state back to a fresh optimizer's, the
/// step count aside: zero moments, but Shampoo's inverse roots and SOAP's
/// eigenbases identities, so the next steps still move the parameters.
#[test]
fn reset_state_returns_every_kind_to_a_fresh_state() {
    let kinds = [
        r#"{"kind": "adamw", "lr": 0.01, "weight_decay": 0.1}"#,
        r#"{"kind": "sgd", "lr": 0.01, "momentum": 0.9}"#,
        r#"{"kind": "lamb", "lr": 0.01}"#,
        r#"{"kind": "lars", "lr": 0.01, "momentum": 0.9}"#,
        r#"{"kind": "lion", "lr": 0.01}"#,
        r#"{"kind": "muon", "lr": 0.02}"#,
        r#"{"kind": "shampoo", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "precondition_frequency": 10}"#,
        r#"{"kind": "soap", "lr": 0.01, "precondition_frequency": 10}"#,
    ];
    let mut rng = Rng(7);
    for json in kinds {
        let config = OptimizerConfig::from_json(json).unwrap();
        let mut opt = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [6, 5])]).unwrap();
        let fresh = opt.state_dict().unwrap();
        let mut w: Vec<f64> = (0..30).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut step = |opt: &mut CpuOptimizer<f64>, w: &mut Vec<f64>| {
            let g: Vec<f64> = (0..30).map(|_| rng.uniform(-1.0, 1.0)).collect();
            opt.step(&mut [&mut w[..]], &[&g[..]]).unwrap()
        };
        for _ in 0..11 {
            step(&mut opt, &mut w);
        }
        assert!(opt.state_dict().unwrap().tensors != fresh.tensors, "{json}");
        opt.reset_state();
        assert!(
            opt.state_dict().unwrap().tensors == fresh.tensors,
            "{json}: the reset state is not the fresh one"
        );
        assert_eq!(opt.step_count(), 11, "{json}");
        for _ in 0..3 {
            let stats = step(&mut opt, &mut w);
            let u = stats.tensors[0].update_norm;
            assert!(
                u.is_finite() && u > 0.0,
                "{json}: update norm {u} after a reset"
            );
        }
    }
}

#[test]
fn loss_scaler_grows_backs_off_and_stays_in_bounds() {
    use LossScaleAction::{Apply, Skip};
    let mut s = DynamicLossScaler::new(LossScalerConfig {
        init_scale: 8.0,
        growth_factor: 2.0,
        backoff_factor: 0.5,
        growth_interval: 3,
        min_scale: 1.0,
        max_scale: 32.0,
    })
    .unwrap();
    let overflow = [
        false, false, false, true, false, false, true, false, false, false, false, false, false,
        false, false, false, true, true, true, true, true, true,
    ];
    let mut scales = vec![];
    for &o in &overflow {
        assert_eq!(s.update(o), if o { Skip } else { Apply });
        scales.push(s.scale());
    }
    let want = [
        8.0, 8.0, 16.0, 8.0, 8.0, 8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 16.0,
        8.0, 4.0, 2.0, 1.0, 1.0,
    ];
    assert_eq!(scales, want);
    assert_eq!(s.skipped(), 8);

    let mut g = vec![8.0f32, -2.0];
    assert!(!s.unscale(&mut [&mut g[..]]));
    assert_eq!(g, [8.0, -2.0]); // scale 1
    let mut s = DynamicLossScaler::new(LossScalerConfig::default()).unwrap();
    assert_eq!((s.scale(), s.scale_loss(0.5)), (65536.0, 32768.0));
    let mut g = vec![65536.0f32, -32768.0];
    assert!(!s.unscale(&mut [&mut g[..]]));
    assert_eq!(g, [1.0, -0.5]);
    let mut g = [1.0f32, f32::NAN];
    assert!(s.unscale(&mut [&mut g[..]]));
    assert_eq!(g[0], 1.0); // untouched
    assert_eq!(s.update(true), Skip);
    assert_eq!(s.scale(), 32768.0);
}

#[test]
fn bad_configuration_is_an_error_naming_the_field() {
    let z = |c: ZClipConfig| field(ZClip::new(c).unwrap_err());
    assert_eq!(
        z(ZClipConfig {
            alpha: 1.0,
            ..Default::default()
        }),
        "zclip.alpha"
    );
    assert_eq!(
        z(ZClipConfig {
            alpha: f64::NAN,
            ..Default::default()
        }),
        "zclip.alpha"
    );
    assert_eq!(
        z(ZClipConfig {
            z_thresh: 0.0,
            ..Default::default()
        }),
        "zclip.z_thresh"
    );
    assert_eq!(
        z(ZClipConfig {
            warmup_steps: 0,
            ..Default::default()
        }),
        "zclip.warmup_steps"
    );
    assert_eq!(
        z(ZClipConfig {
            max_norm: Some(-1.0),
            ..Default::default()
        }),
        "zclip.max_norm"
    );

    let s = |c: SpamConfig| field(Spam::new(c).unwrap_err());
    assert_eq!(
        s(SpamConfig {
            theta: 0.0,
            ..Default::default()
        }),
        "spam.theta"
    );
    assert_eq!(
        s(SpamConfig {
            reset_interval: Some(0),
            ..Default::default()
        }),
        "spam.reset_interval"
    );
    let mut g = vec![1.0f32];
    assert_eq!(
        field(keel::guard::spike_clip(&mut g, &[1.0], -5.0).unwrap_err()),
        "spam.theta"
    );
    assert!(matches!(
        keel::guard::spike_clip(&mut g, &[1.0, 2.0], 5.0),
        Err(KeelError::Shape { .. })
    ));

    let l = |c: LossScalerConfig| field(DynamicLossScaler::new(c).unwrap_err());
    let d = LossScalerConfig::default();
    assert_eq!(
        l(LossScalerConfig {
            growth_factor: 1.0,
            ..d
        }),
        "loss_scale.growth_factor"
    );
    assert_eq!(
        l(LossScalerConfig {
            backoff_factor: 1.0,
            ..d
        }),
        "loss_scale.backoff_factor"
    );
    assert_eq!(
        l(LossScalerConfig {
            growth_interval: 0,
            ..d
        }),
        "loss_scale.growth_interval"
    );
    assert_eq!(
        l(LossScalerConfig {
            init_scale: 1e9,
            ..d
        }),
        "loss_scale.init_scale"
    );
    assert_eq!(
        l(LossScalerConfig {
            min_scale: 0.0,
            ..d
        }),
        "loss_scale.min_scale"
    );
    // Scales whose reciprocal is no normal f32 (unscaling gives inf or 0).
    assert_eq!(
        l(LossScalerConfig {
            min_scale: 1e-300,
            init_scale: 1e-300,
            ..d
        }),
        "loss_scale.min_scale"
    );
    assert_eq!(
        l(LossScalerConfig {
            max_scale: 1e300,
            ..d
        }),
        "loss_scale.max_scale"
    );
    // A scale below 1 that overflows the gradients while unscaling says so.
    let s = DynamicLossScaler::new(LossScalerConfig {
        min_scale: 1e-3,
        init_scale: 1e-3,
        ..d
    })
    .unwrap();
    let mut big = [1e37f32, 1.0];
    assert!(s.unscale(&mut [&mut big[..]]));
    let mut fine = [1e30f32, 1.0];
    assert!(!s.unscale(&mut [&mut fine[..]]));
    assert_eq!(fine, [1e33, 1e3]);

    let g = |c: LossGuardConfig| field(LossGuard::<f32>::new(c).unwrap_err());
    let d = LossGuardConfig::default();
    assert_eq!(
        g(LossGuardConfig {
            snapshot_every: 0,
            ..d
        }),
        "guard.snapshot_every"
    );
    assert_eq!(
        g(LossGuardConfig {
            lr_factor: 1.5,
            ..d
        }),
        "guard.lr_factor"
    );
    let det = |c: SpikeDetectorConfig| g(LossGuardConfig { detector: c, ..d });
    let dd = SpikeDetectorConfig::default();
    assert_eq!(det(SpikeDetectorConfig { window: 1, ..dd }), "spike.window");
    assert_eq!(
        det(SpikeDetectorConfig {
            window: usize::MAX,
            ..dd
        }),
        "spike.window"
    );
    assert_eq!(
        det(SpikeDetectorConfig { sigma: -1.0, ..dd }),
        "spike.sigma"
    );
    assert_eq!(det(SpikeDetectorConfig { ratio: 0.0, ..dd }), "spike.ratio");
    assert_eq!(det(SpikeDetectorConfig { warmup: 1, ..dd }), "spike.warmup");
    assert!(analyze_losses(&[1.0], &SpikeDetectorConfig { window: 0, ..dd }).is_err());
}

#[test]
fn configs_read_from_json_with_defaults() {
    let c: LossGuardConfig = serde_json::from_str(
        r#"{"action": "rollback", "lr_steps": 50, "detector": {"window": 50}}"#,
    )
    .unwrap();
    assert_eq!(c.action, SpikeAction::Rollback);
    assert_eq!((c.lr_steps, c.snapshot_every, c.lr_factor), (50, 100, 0.5));
    assert_eq!(
        (c.detector.window, c.detector.sigma, c.detector.ratio),
        (50, 4.0, 1.1)
    );
    let z: ZClipConfig = serde_json::from_str(r#"{"mode": "reciprocal"}"#).unwrap();
    assert_eq!(
        (z.mode, z.alpha, z.z_thresh, z.warmup_steps),
        (ZClipMode::Reciprocal, 0.97, 2.5, 25)
    );
    assert!(serde_json::from_str::<SpamConfig>(r#"{"thetaa": 1}"#).is_err());
}

#[test]
fn rollback_works_for_bf16_params_with_f32_master_weights() {
    use half::bf16;
    use keel::{MixedPrecisionOptimizer, ParamGroup, Rounding};

    let specs = vec![ParamSpec::new("w", [16])];
    let mut rng = Rng(3);
    let mut w: Vec<Vec<bf16>> = vec![rng
        .vec::<f32>(16, -1.0, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect()];
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#).unwrap();
    let mut opt = MixedPrecisionOptimizer::new(
        config,
        specs.clone(),
        vec![ParamGroup::all(&specs)],
        &[&w[0][..]],
        Rounding::Stochastic { seed: 7 },
    )
    .unwrap();
    let step = |opt: &mut MixedPrecisionOptimizer, w: &mut [Vec<bf16>], rng: &mut Rng| {
        let g: Vec<bf16> = rng
            .vec::<f32>(16, -1.0, 1.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut p: Vec<&mut [bf16]> = w.iter_mut().map(|x| &mut x[..]).collect();
        opt.step(&mut p, &[&g[..]]).unwrap();
    };
    for _ in 0..2 {
        step(&mut opt, &mut w, &mut rng);
    }
    let mut guard = LossGuard::<bf16>::new(LossGuardConfig::default()).unwrap();
    guard.snapshot(&w, &opt).unwrap();
    let want_w: Vec<u16> = w[0].iter().map(|x| x.to_bits()).collect();
    let want_master: Vec<u32> = opt.master(0).iter().map(|x| x.to_bits()).collect();
    let want_state = state_bits(&opt.state_dict().unwrap());
    for _ in 0..2 {
        step(&mut opt, &mut w, &mut rng);
    }
    guard.restore(&mut w, &mut opt).unwrap();
    assert_eq!(w[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want_w);
    let master: Vec<u32> = opt.master(0).iter().map(|x| x.to_bits()).collect();
    assert_eq!(master, want_master);
    assert_eq!(state_bits(&opt.state_dict().unwrap()), want_state);
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn zclip_with_no_spread_after_warmup_passes_norms_until_it_has_one() {
    // Five zero norms: mean 0, variance 0. A z-score rule would clip every
    // later norm to 0 (factor 0) and keep the variance at 0 for good.
    let mut z = ZClip::new(ZClipConfig {
        warmup_steps: 5,
        ..Default::default()
    })
    .unwrap();
    for _ in 0..5 {
        z.observe(0.0);
    }
    let first = z.observe(6.0);
    assert_eq!((first.factor, first.z), (1.0, None));
    // alpha 0.97: mean 0.03 * 6 = 0.18, variance 0.03 * 5.82^2.
    let (mean, var) = (z.mean().unwrap(), z.variance().unwrap());
    assert!((mean - 0.18).abs() < 1e-12, "{mean}");
    assert!((var - 0.03 * 5.82f64.powi(2)).abs() < 1e-12, "{var}");
    // With a spread, the z-score rule is back: a huge norm is clipped to
    // mean + 2.5 sd, a small one passes.
    let big = z.observe(1e3);
    let target = 0.18 + 2.5 * var.sqrt();
    assert!((big.clipped_norm - target).abs() < 1e-9, "{big:?}");
    assert!(big.z.unwrap() > 2.5);
    assert_eq!(z.observe(0.1).factor, 1.0);
}

#[test]
fn spam_with_a_mismatched_gradient_clips_none() {
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.001}"#).unwrap();
    let specs = vec![ParamSpec::new("a", [3]), ParamSpec::new("b", [3])];
    let mut opt = CpuOptimizer::<f64>::new(config, specs).unwrap();
    let (mut a, mut b) = ([0.0f64; 3], [0.0f64; 3]);
    opt.step(
        &mut [&mut a[..], &mut b[..]],
        &[&[1.0; 3][..], &[1.0; 3][..]],
    )
    .unwrap();
    let mut spam = Spam::new(SpamConfig::default()).unwrap();
    // `a`'s gradient would be clipped (1e6² far above theta v), but `b`'s
    // has 2 elements against 3: nothing may be written.
    let (mut ga, mut gb) = ([1e6f64; 3], [1.0f64; 2]);
    let e = spam
        .clip_grads(&opt, &mut [&mut ga[..], &mut gb[..]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`b`") && e.contains("2 elements"), "{e}");
    assert_eq!(ga, [1e6; 3]);
    assert_eq!(spam.clipped_total(), 0);
}

/// The guards' statistics survive a serde round trip mid-run: a restored
/// guard judges every later input exactly as the one that kept running (the
/// key to a bit-exact resume of a guarded run), and a saved state with an
/// invalid setting is refused as `new` would refuse it.
#[test]
fn guards_resume_exactly_from_their_saved_state() {
    fn round_trip<G: serde::Serialize + serde::de::DeserializeOwned>(g: &G) -> G {
        serde_json::from_str(&serde_json::to_string(g).unwrap()).unwrap()
    }
    let wave =
        |i: usize| 1.0 + 0.3 * ((i * 7919) % 13) as f64 / 13.0 + (i == 45) as u8 as f64 * 9.0;

    let mut z = ZClip::new(ZClipConfig {
        warmup_steps: 10,
        ..Default::default()
    })
    .unwrap();
    let mut d = SpikeDetector::new(SpikeDetectorConfig {
        window: 20,
        warmup: 10,
        ..Default::default()
    })
    .unwrap();
    let mut s = DynamicLossScaler::new(LossScalerConfig {
        growth_interval: 3,
        ..Default::default()
    })
    .unwrap();
    for i in 0..30 {
        z.observe(wave(i));
        d.observe(wave(i));
        s.update(i % 7 == 0);
    }
    let (mut z2, mut d2, mut s2) = (round_trip(&z), round_trip(&d), round_trip(&s));
    assert_eq!((&z2, &d2, &s2), (&z, &d, &s));
    let mut clipped = 0;
    for i in 30..60 {
        let (a, b) = (z.observe(wave(i)), z2.observe(wave(i)));
        assert_eq!(a, b, "zclip at {i}");
        clipped += usize::from(a.factor < 1.0);
        assert_eq!(d.observe(wave(i)), d2.observe(wave(i)), "detector at {i}");
        assert_eq!(s.update(i % 5 == 0), s2.update(i % 5 == 0), "scaler at {i}");
        assert_eq!(s.scale(), s2.scale());
    }
    // The 10x norm at step 45 was judged by the restored EMAs.
    assert_eq!(clipped, 1);
    assert_eq!(d.events(), d2.events());

    let spam = Spam::new(SpamConfig {
        reset_interval: Some(4),
        warmup_steps: 3,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(round_trip(&spam), spam);

    // Invalid settings in a saved state are refused, naming the field.
    let mut json: serde_json::Value = serde_json::to_value(&z).unwrap();
    json["config"]["alpha"] = 1.5.into();
    let e = serde_json::from_value::<ZClip>(json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zclip.alpha"), "{e}");
    let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
    json["scale"] = 1e30.into();
    let e = serde_json::from_value::<DynamicLossScaler>(json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside [min_scale, max_scale]"), "{e}");
}

/// SPAM's momentum reset reaches a bf16 optimizer's f32 state through
/// `inner_mut`, and the next step restarts from fresh moments.
#[test]
fn spam_resets_a_mixed_precision_optimizer() {
    use keel::half::bf16;
    use keel::{MixedPrecisionOptimizer, ParamGroup, Rounding};
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#).unwrap();
    let specs = vec![ParamSpec::new("w", [3])];
    let mut w = [bf16::from_f32(1.0); 3];
    let groups = vec![ParamGroup::all(&specs)];
    let mut opt =
        MixedPrecisionOptimizer::new(config, specs, groups, &[&w[..]], Rounding::Nearest).unwrap();
    let mut spam = Spam::new(SpamConfig {
        reset_interval: Some(1),
        ..Default::default()
    })
    .unwrap();
    let g = [bf16::from_f32(0.5); 3];
    opt.step(&mut [&mut w[..]], &[&g[..]]).unwrap();
    assert!(opt.inner().state_buffer(0, "exp_avg").unwrap()[0] != 0.0);
    assert!(spam.after_step(opt.inner_mut()));
    for slot in ["exp_avg", "exp_avg_sq"] {
        assert!(opt
            .inner()
            .state_buffer(0, slot)
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }
    assert_eq!(spam.resets(), 1);
}
