//! The GPT trains through keel's public optimizer trait, as an outside
//! trainer would: specs from the model, buffers shared with the optimizer.

use keel::gpt::data::Dataset;
use keel::gpt::{Gpt, GptConfig, SplitMix64};
use keel::{CpuOptimizer, Optimizer, OptimizerConfig};

#[test]
fn adamw_lowers_the_validation_loss_on_tiny_shakespeare() {
    let (b, t) = (8, 32);
    let data = Dataset::tiny_shakespeare(t).unwrap();
    let mut cfg = GptConfig::new(data.vocab().len(), t, 2, 4, 32);
    cfg.qk_norm = true;
    let mut model = Gpt::<f32>::new(cfg).unwrap();
    let mut params = model.init_params(0);
    let mut grads = model.zeros_like_params();
    let opt_cfg = OptimizerConfig::from_json(
        r#"{"kind": "adamw", "lr": 0.003, "weight_decay": 0.0, "clip_global_norm": 1.0}"#,
    )
    .unwrap();
    let mut opt = CpuOptimizer::<f32>::new(opt_cfg, model.param_specs()).unwrap();
    let val = data.val_batches(2, b, t).unwrap();
    let val_loss = |model: &mut Gpt<f32>, params: &[Vec<f32>]| {
        val.iter()
            .map(|v| {
                model
                    .forward(params, &v.tokens, Some(&v.targets), b, t)
                    .unwrap()
                    .loss
            })
            .sum::<f64>()
            / val.len() as f64
    };
    let before = val_loss(&mut model, &params);
    assert!((before - 65f64.ln()).abs() < 0.1, "{before}");
    let mut rng = SplitMix64::new(1);
    for _ in 0..80 {
        let batch = data.train_batch(&mut rng, b, t).unwrap();
        let stats = model
            .forward_backward(&params, &mut grads, &batch.tokens, &batch.targets, b, t)
            .unwrap();
        assert!(stats.loss.is_finite());
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|x| &mut x[..]).collect();
        let g: Vec<&[f32]> = grads.iter().map(|x| &x[..]).collect();
        let step = opt.step(&mut p, &g).unwrap();
        assert!(step.skipped.is_none());
    }
    let after = val_loss(&mut model, &params);
    // Unigram statistics alone take a char model to ~3.3 nats.
    assert!(after < 3.4, "validation loss {before} -> {after}");
}

/// The reference sampler: the whole history kept, the context its last
/// `block` ids, greedy or the inverse-CDF draw with `SplitMix64`.
fn sample_reference(
    model: &mut Gpt<f32>,
    params: &[Vec<f32>],
    prompt: &[u32],
    n: usize,
    temperature: f64,
    seed: u64,
) -> Vec<u32> {
    let (block, v) = (model.config().block_size, model.config().vocab_size);
    let mut ids = prompt.to_vec();
    let mut rng = SplitMix64::new(seed);
    for _ in 0..n {
        let ctx = &ids[ids.len().saturating_sub(block)..];
        let t = ctx.len();
        model.forward(params, ctx, None, 1, t).unwrap();
        let logits = &model.logits()[(t - 1) * v..t * v];
        let next = if temperature == 0.0 {
            let mut best = 0;
            for (i, &l) in logits.iter().enumerate() {
                if l > logits[best] {
                    best = i;
                }
            }
            best
        } else {
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let w: Vec<f64> = logits
                .iter()
                .map(|&l| ((l as f64 - m) / temperature).exp())
                .collect();
            let mut u = rng.uniform() * w.iter().sum::<f64>();
            let mut pick = v - 1;
            for (i, wi) in w.iter().enumerate() {
                if u < *wi {
                    pick = i;
                    break;
                }
                u -= wi;
            }
            pick
        };
        ids.push(next as u32);
    }
    ids
}

/// Sampling streams through a window of the context (bounded memory) and
/// gives exactly the ids of a sampler that keeps the whole history, far
/// past the window, greedy and at a temperature.
#[test]
fn sampling_streams_the_same_ids_as_the_full_history() {
    let cfg = GptConfig::new(65, 8, 1, 2, 16);
    let mut model = Gpt::<f32>::new(cfg).unwrap();
    let params = model.init_params(3);
    let prompt = [5u32, 17, 40];
    for temperature in [0.0, 0.9] {
        let want = sample_reference(&mut model, &params, &prompt, 50, temperature, 11);
        let got =
            keel::gpt::train::sample(&mut model, &params, &prompt, 50, temperature, 11).unwrap();
        assert_eq!(got, want, "temperature {temperature}");
        let mut streamed = Vec::new();
        keel::gpt::train::sample_with(&mut model, &params, &prompt, 50, temperature, 11, |id| {
            streamed.push(id);
            Ok(())
        })
        .unwrap();
        assert_eq!(streamed, want, "temperature {temperature}");
        // At a temperature the draw is not constant (greedy on an untrained
        // model repeats one token).
        if temperature > 0.0 {
            assert!(want[3..].iter().any(|&i| i != want[3]), "{want:?}");
        }
    }
    // An error from the consumer stops the sampling there.
    let mut seen = 0;
    let r = keel::gpt::train::sample_with(&mut model, &params, &prompt, 50, 0.9, 11, |_| {
        seen += 1;
        if seen == 10 {
            Err(keel::KeelError::Data("closed".into()))
        } else {
            Ok(())
        }
    });
    assert!(r.is_err());
    assert_eq!(seen, 10);

    // A diverged run's parameters are refused by name, before any id.
    let mut bad = params.clone();
    bad[2][7] = f32::NAN;
    let name = model.param_specs()[2].name.clone();
    let mut emitted = 0;
    let e = keel::gpt::train::sample_with(&mut model, &bad, &prompt, 5, 0.9, 11, |_| {
        emitted += 1;
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("`{name}`")) && e.contains("NaN at element 7"),
        "{e}"
    );
    assert_eq!(emitted, 0);
    // Finite parameters whose logits overflow f32 are refused too.
    let mut huge = params.clone();
    for p in huge.iter_mut() {
        p.iter_mut().for_each(|x| *x *= 1e12);
    }
    let e = keel::gpt::train::sample(&mut model, &huge, &prompt, 5, 0.0, 11).unwrap_err();
    assert!(e.to_string().contains("logit"), "{e}");
}
