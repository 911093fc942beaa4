//! keel inside burn: equivalence with burn's AdamW, the non-finite skip
//! policy, and a bit-exact optimizer-record round trip.
#![cfg(feature = "burn")]

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use keel::adapters::burn::KeelBurn;
use keel::OptimizerConfig;

type Res = Result<(), Box<dyn std::error::Error>>;

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.fc1.forward(x).tanh())
    }
}

/// Deterministic values in [-0.5, 0.5) (a small LCG; no RNG dependency).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn linear(d_in: usize, d_out: usize, seed: u64, device: &Device) -> Linear {
    Linear {
        weight: Param::from_data(
            TensorData::new(values(d_in * d_out, seed), [d_in, d_out]),
            device,
        ),
        bias: Some(Param::from_data(
            TensorData::new(values(d_out, seed + 1), [d_out]),
            device,
        )),
    }
}

fn mlp(device: &Device) -> Mlp {
    Mlp {
        fc1: linear(4, 16, 1, device),
        fc2: linear(16, 1, 3, device),
    }
}

fn train(model: Mlp, optim: &mut ModuleOptimizer, steps: std::ops::Range<usize>, lr: f64) -> Mlp {
    let device = Device::default().autodiff();
    let mut model = model;
    for step in steps {
        let x = Tensor::<2>::from_data(
            TensorData::new(values(32 * 4, 100 + step as u64), [32, 4]),
            &device,
        );
        let y = x.clone().sum_dim(1).sin();
        let loss = (model.forward(x) - y).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    model
}

fn params(model: &Mlp) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for l in [&model.fc1, &model.fc2] {
        out.push(l.weight.val().into_data().try_into_vec::<f32>().unwrap());
        out.push(
            l.bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap(),
        );
    }
    out
}

/// `max |a - b| / max |b|` over a tensor: elementwise ratios are meaningless
/// for the elements that pass near zero.
fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    (diff / scale.max(f32::MIN_POSITIVE)) as f64
}

#[test]
fn adamw_matches_burn_adamw() -> Res {
    let device = Device::default().autodiff();
    let (lr, beta1, beta2, eps, wd) = (1e-2, 0.9f32, 0.99f32, 1e-8f32, 0.1f32);
    let mut reference = AdamWConfig::new()
        .with_beta_1(beta1)
        .with_beta_2(beta2)
        .with_epsilon(eps)
        .with_weight_decay(wd)
        .init();
    // burn's AdamW is torch's (eps added to sqrt(v_hat), decoupled decay
    // p *= 1 - lr*wd) with f32 hyperparameters: give keel the same f32
    // values widened, so only rounding in the arithmetic differs.
    let config = OptimizerConfig::from_json(&format!(
        r#"{{"kind": "adamw", "lr": {lr}, "beta1": {}, "beta2": {}, "eps": {}, "weight_decay": {}}}"#,
        beta1 as f64, beta2 as f64, eps as f64, wd as f64
    ))?;
    let mut keel = KeelBurn::new(config)?.init();
    let mut max_rel = 0f64;
    let (mut theirs, mut ours) = (mlp(&device), mlp(&device));
    for step in 0..20 {
        theirs = train(theirs, &mut reference, step..step + 1, lr);
        ours = train(ours, &mut keel, step..step + 1, lr);
        for (a, b) in params(&ours).iter().zip(params(&theirs)) {
            let rel = relative_difference(a, &b);
            assert!(rel <= 1e-5, "step {step}: relative difference {rel:e}");
            max_rel = max_rel.max(rel);
        }
    }
    eprintln!("keel vs burn AdamW, 20 steps: max relative difference {max_rel:.3e}");
    Ok(())
}

#[test]
fn nonfinite_gradient_skips_each_parameter() -> Res {
    let device = Device::default().autodiff();
    let config = OptimizerConfig::from_json(r#"{"kind": "lamb", "lr": 0.01}"#)?;
    let keel = KeelBurn::new(config)?;
    let mut optim = keel.clone().init();
    let model = train(mlp(&device), &mut optim, 0..1, 0.01);
    let before = params(&model);
    let x = Tensor::<2>::ones([2, 4], &device);
    let loss = model.forward(x).mean().mul_scalar(f32::NAN);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optim.step(0.01, model, grads);
    assert_eq!(keel.skipped_steps(), 4);
    assert!(keel.last_skip_reason().unwrap().contains("NonFinite"));
    let after = params(&model);
    for (a, b) in after.iter().zip(&before) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    Ok(())
}

#[test]
fn optimizer_record_round_trip_is_bit_exact() -> Res {
    let device = Device::default().autodiff();
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#)?;
    let mut a = KeelBurn::new(config.clone())?.init();
    let model = train(mlp(&device), &mut a, 0..3, 0.01);
    let bytes = a.into_bytes()?;
    let mut b = KeelBurn::new(config)?.init().from_bytes(bytes)?;
    let model_a = train(model.clone(), &mut a, 3..6, 0.01);
    let model_b = train(model, &mut b, 3..6, 0.01);
    for (x, y) in params(&model_a).iter().zip(params(&model_b)) {
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    Ok(())
}

#[test]
fn unsupported_kinds_are_an_error() -> Res {
    let config = OptimizerConfig::from_json(r#"{"kind": "shampoo", "lr": 0.01}"#)?;
    assert!(KeelBurn::new(config).is_err());
    Ok(())
}

/// A record of another kind is refused, not loaded (AdamW's `exp_avg` used
/// to become Lion's, unnoticed): each parameter's step is counted as
/// skipped, with the kinds in the reason, and the next step starts afresh,
/// as a fresh Lion's does.
#[test]
fn a_record_of_another_kind_is_refused() -> Res {
    let device = Device::default().autodiff();
    let adamw = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#)?;
    let lion = OptimizerConfig::from_json(r#"{"kind": "lion", "lr": 0.01}"#)?;
    let mut a = KeelBurn::new(adamw)?.init();
    let model = train(mlp(&device), &mut a, 0..3, 0.01);
    let keel = KeelBurn::new(lion.clone())?;
    let mut b = keel.clone().init().from_bytes(a.into_bytes()?)?;
    let refused = train(model.clone(), &mut b, 3..4, 0.01);
    assert_eq!(keel.skipped_steps(), 4);
    let reason = keel.last_skip_reason().unwrap();
    assert!(
        reason.contains("`adamw`") && reason.contains("`lion`"),
        "{reason}"
    );
    for (x, y) in params(&refused).iter().zip(params(&model)) {
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    // The next step is a fresh Lion's first.
    let after = train(refused, &mut b, 4..5, 0.01);
    let mut fresh = KeelBurn::new(lion)?.init();
    let expected = train(model, &mut fresh, 4..5, 0.01);
    for (x, y) in params(&after).iter().zip(params(&expected)) {
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    assert_eq!(keel.skipped_steps(), 4);
    Ok(())
}
