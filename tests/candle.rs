//! keel inside candle: equivalence with candle-nn's AdamW, the non-finite
//! skip policy, and a bit-exact state checkpoint round trip.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW, VarMap};
use keel::adapters::candle::KeelCandle;
use keel::{OptimizerConfig, SkipReason};

type Res = Result<(), Box<dyn std::error::Error>>;

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

/// A 4-16-1 tanh MLP's Vars, named as candle-nn names them.
fn mlp_vars() -> candle_core::Result<Vec<(String, Var)>> {
    let dev = &Device::Cpu;
    Ok(vec![
        (
            "fc1.weight".into(),
            Var::from_vec(values(64, 1), (16, 4), dev)?,
        ),
        ("fc1.bias".into(), Var::from_vec(values(16, 2), 16, dev)?),
        (
            "fc2.weight".into(),
            Var::from_vec(values(16, 3), (1, 16), dev)?,
        ),
        ("fc2.bias".into(), Var::from_vec(values(1, 4), 1, dev)?),
    ])
}

/// A copy of `vars` with fresh storage.
fn copy(vars: &[(String, Var)]) -> candle_core::Result<Vec<(String, Var)>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect()
}

fn batch(step: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let x = Tensor::from_vec(values(32 * 4, 100 + step as u64), (32, 4), &Device::Cpu)?;
    let y = x.sum_keepdim(1)?.sin()?;
    Ok((x, y))
}

fn loss(vars: &[(String, Var)], step: usize) -> candle_core::Result<Tensor> {
    let (x, y) = batch(step)?;
    let h = x
        .broadcast_matmul(&vars[0].1.t()?)?
        .broadcast_add(&vars[1].1)?
        .tanh()?;
    let pred = h
        .broadcast_matmul(&vars[2].1.t()?)?
        .broadcast_add(&vars[3].1)?;
    (pred - y)?.sqr()?.mean_all()
}

fn flat(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.as_tensor().flatten_all()?.to_vec1::<f32>()
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
fn adamw_matches_candle_nn_adamw() -> Res {
    let (lr, beta1, beta2, eps, wd) = (1e-2, 0.9, 0.99, 1e-8, 0.1);
    let theirs = mlp_vars()?;
    let ours = copy(&theirs)?;
    let mut reference = AdamW::new(
        theirs.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay: wd,
        },
    )?;
    // Same hyperparameters: candle-nn's AdamW is torch's (eps added to
    // sqrt(v_hat), decoupled decay p *= 1 - lr*wd), as keel's adamw is.
    let config = OptimizerConfig::from_json(&format!(
        r#"{{"kind": "adamw", "lr": {lr}, "beta1": {beta1}, "beta2": {beta2}, "eps": {eps}, "weight_decay": {wd}}}"#
    ))?;
    let mut keel = KeelCandle::with_names(ours.clone(), config, None)?;
    let mut max_rel = 0f64;
    for step in 0..20 {
        reference.backward_step(&loss(&theirs, step)?)?;
        keel.backward_step(&loss(&ours, step)?)?;
        for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
            let rel = relative_difference(&flat(a)?, &flat(b)?);
            assert!(
                rel <= 1e-5,
                "step {step} {name}: relative difference {rel:e}"
            );
            max_rel = max_rel.max(rel);
        }
    }
    assert_eq!(keel.step_count(), 20);
    eprintln!("keel vs candle-nn AdamW, 20 steps: max relative difference {max_rel:.3e}");
    Ok(())
}

#[test]
fn nonfinite_gradient_skips_the_step() -> Res {
    let vars = mlp_vars()?;
    let config =
        OptimizerConfig::from_json(r#"{"kind": "lamb", "lr": 0.01, "weight_decay": 0.01}"#)?;
    let mut opt = KeelCandle::with_names(vars.clone(), config, None)?;
    opt.backward_step(&loss(&vars, 0)?)?;
    let before: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| flat(v))
        .collect::<Result<_, _>>()?;
    let state_before = opt.state_dict()?;

    let poisoned = (loss(&vars, 1)? * f64::NAN)?;
    opt.backward_step(&poisoned)?;

    let stats = opt.last_stats().ok_or("no stats")?;
    match &stats.skipped {
        Some(SkipReason::NonFiniteGradient { tensors }) => assert_eq!(tensors.len(), 4),
        other => panic!("expected a skip, got {other:?}"),
    }
    for ((_, v), b) in vars.iter().zip(&before) {
        let after = flat(v)?;
        assert!(after.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    assert_eq!(opt.state_dict()?, state_before);
    assert_eq!(opt.step_count(), 1);
    Ok(())
}

#[test]
fn state_checkpoint_round_trip_is_bit_exact() -> Res {
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#)?;
    let a_vars = mlp_vars()?;
    let mut a = KeelCandle::with_names(a_vars.clone(), config.clone(), None)?;
    for step in 0..3 {
        a.backward_step(&loss(&a_vars, step)?)?;
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("opt.safetensors");
    a.save_state(&path)?;

    let b_vars = copy(&a_vars)?;
    let mut b = KeelCandle::with_names(b_vars.clone(), config, None)?;
    b.load_state(&path)?;
    assert_eq!(b.state_dict()?, a.state_dict()?);
    for step in 3..6 {
        a.backward_step(&loss(&a_vars, step)?)?;
        b.backward_step(&loss(&b_vars, step)?)?;
    }
    for ((_, x), (_, y)) in a_vars.iter().zip(&b_vars) {
        let (x, y) = (flat(x)?, flat(y)?);
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    assert_eq!(b.state_dict()?, a.state_dict()?);
    Ok(())
}

#[test]
fn varmap_groups_and_f64() -> Res {
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let lin = candle_nn::linear(3, 2, vb.pp("fc"))?;
    let ln = vb
        .pp("ln")
        .get_with_hints(2, "weight", candle_nn::Init::Const(1.0))?;
    let config =
        OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.1, "weight_decay": 0.5}"#)?;
    let mut opt =
        KeelCandle::from_varmap_with(&varmap, config, keel::adapters::no_decay_for_bias_and_norm)?;
    let names: Vec<_> = opt.specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["fc.bias", "fc.weight", "ln.weight"]);
    let groups = opt.state_dict()?.groups;
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0].params, ["fc.bias", "ln.weight"]);
    assert!(!groups[0].weight_decay);

    let x = Tensor::new(&[[1f64, 2.0, 3.0]], &Device::Cpu)?;
    let y = candle_core::Module::forward(&lin, &x)?;
    let loss = (y.sum_all()? + ln.sum_all()?)?;
    opt.backward_step(&loss)?;
    assert_eq!(opt.step_count(), 1);
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> Res {
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#)?;
    let ints = Var::from_vec(vec![1u32, 2], 2, &Device::Cpu)?;
    let err = KeelCandle::new(vec![ints], config.clone()).unwrap_err();
    assert!(err.to_string().contains("U32"), "{err}");

    let mixed = vec![
        Var::from_vec(vec![1f32, 2.0], 2, &Device::Cpu)?,
        Var::from_vec(vec![1f64, 2.0], 2, &Device::Cpu)?,
    ];
    assert!(KeelCandle::new(mixed, config.clone()).is_err());

    // A Var the loss does not use has no gradient: keel says which.
    let used = Var::from_vec(vec![1f32, 2.0], 2, &Device::Cpu)?;
    let unused = Var::from_vec(vec![3f32], 1, &Device::Cpu)?;
    let mut opt = KeelCandle::new(vec![used.clone(), unused], config)?;
    let err = opt.backward_step(&used.as_tensor().sum_all()?).unwrap_err();
    assert!(err.to_string().contains("var1"), "{err}");

    opt.set_learning_rate(-1.0);
    assert_eq!(opt.learning_rate(), -1.0, "the rate set, though refused");
    assert!(opt.backward_step(&used.as_tensor().sum_all()?).is_err());
    opt.set_learning_rate(0.5);
    assert_eq!(opt.learning_rate(), 0.5);

    // The same Var twice would be stepped twice: refused by name up front.
    let twice = Var::from_vec(vec![1f32, 2.0], 2, &Device::Cpu)?;
    let config = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 0.1}"#)?;
    let err = KeelCandle::new(vec![twice.clone(), twice], config).unwrap_err();
    assert!(
        err.to_string()
            .contains("`var0` and `var1` share one storage"),
        "{err}"
    );
    Ok(())
}

/// A model's worth of Vars steps (the Vars are locked in nested frames; a
/// few hundred used to overflow a test thread's stack and abort), and each
/// Var gets its own update: with SGD, lr 0.5, and `loss = sum_i k_i *
/// sum(v_i)`, Var `i` moves by `-0.5 * k_i` in every element.
#[test]
fn thousands_of_vars_step() -> Res {
    let n = 3000;
    let vars: Vec<(String, Var)> = (0..n)
        .map(|i| {
            Ok((
                format!("v{i}"),
                Var::from_vec(vec![1.0f32, 2.0], 2, &Device::Cpu)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let weight = |i: usize| (i % 7 + 1) as f32;
    // A balanced sum, so candle's own backward pass stays shallow.
    let mut terms: Vec<Tensor> = vars
        .iter()
        .enumerate()
        .map(|(i, (_, v))| v.as_tensor().sum_all()? * weight(i) as f64)
        .collect::<candle_core::Result<_>>()?;
    while terms.len() > 1 {
        terms = terms
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => a + b,
                [a] => Ok(a.clone()),
                _ => unreachable!(),
            })
            .collect::<candle_core::Result<_>>()?;
    }
    let grads = terms[0].backward()?;
    let config = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 0.5}"#)?;
    let mut opt = KeelCandle::with_names(vars.clone(), config, None)?;
    let stats = opt.step_with_stats(&grads)?;
    assert_eq!(stats.skipped, None);
    for (i, (_, v)) in vars.iter().enumerate() {
        let k = weight(i);
        assert_eq!(
            v.as_tensor().to_vec1::<f32>()?,
            [1.0 - 0.5 * k, 2.0 - 0.5 * k],
            "Var {i}"
        );
    }
    Ok(())
}
