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
