//! The reference GPT against PyTorch's golden cases (f64 and f32), a
//! finite-difference gradient check, and bad inputs (errors, never panics).

mod common;

use std::path::{Path, PathBuf};

use common::Rng;
use keel::conformance::{self, Backend};
use keel::gpt::golden::load_golden;
use keel::gpt::{Gpt, GptConfig, Norm};
use keel::KeelError;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gpt-golden")
}

#[test]
fn golden_cases_pass_in_f64_and_f32() {
    let results = conformance::run_paths(&[golden_dir()]).unwrap();
    assert_eq!(results.len(), 6, "3 cases x 2 backends");
    for r in &results {
        assert_eq!(r.kind, "gpt");
        assert!(
            r.passed,
            "{} on {}: {:e} > {:e} ({})",
            r.id, r.backend, r.worst_rel_err, r.tolerance, r.reason
        );
        // f64 lands at rounding level, far inside 1e-9.
        if r.backend == Backend::CpuF64.name() {
            assert!(r.worst_rel_err < 1e-12, "{}: {:e}", r.id, r.worst_rel_err);
        }
    }
}

#[test]
fn golden_loss_cross_entropy_and_logits_match() {
    for id in [
        "gpt_preln_public",
        "gpt_postln_public",
        "gpt_qknorm_zloss_public",
    ] {
        let case = load_golden(&golden_dir().join(format!("{id}.json"))).unwrap();
        let mut model = Gpt::<f64>::new(case.meta.config.clone()).unwrap();
        let (b, t) = (case.meta.batch, case.meta.seq_len);
        let stats = model
            .forward(&case.params, &case.tokens, Some(&case.targets), b, t)
            .unwrap();
        assert!((stats.loss - case.meta.loss).abs() < 1e-12, "{id}");
        assert!(
            (stats.cross_entropy - case.meta.cross_entropy).abs() < 1e-12,
            "{id}"
        );
        assert_eq!(stats.max_attn_logit.len(), case.meta.config.n_layer);
        assert!(stats.max_attn_logit.iter().all(|x| x.is_finite()));
        // z-loss = z * mean(lse^2) >= z * mean(lse)^2.
        let z = case.meta.config.z_loss;
        assert!(stats.loss - stats.cross_entropy >= z * stats.mean_log_z.powi(2) - 1e-15);
        assert_eq!(model.logits().len(), b * t * case.meta.config.vocab_size);
    }
}

#[test]
fn a_perturbed_golden_gradient_fails() {
    // The checker must be able to fail: one expected gradient element moved.
    let mut case = load_golden(&golden_dir().join("gpt_preln_public.json")).unwrap();
    case.grads[3][0] += 1e-3;
    let r = case.check::<f64>().unwrap();
    assert!(r.worst_rel_err > 1e-6, "{:e}", r.worst_rel_err);
    assert_eq!(r.worst, "transformer.h.0.ln_1.bias");
}

#[test]
fn param_names_and_shapes_follow_gpt2() {
    let mut cfg = GptConfig::new(65, 16, 2, 4, 32);
    cfg.qk_norm = true;
    let model = Gpt::<f32>::new(cfg).unwrap();
    let specs = model.param_specs();
    assert_eq!(specs[0].name, "transformer.wte.weight");
    assert_eq!(specs[0].shape, [65, 32]);
    let attn = specs
        .iter()
        .find(|s| s.name == "transformer.h.1.attn.c_attn.weight")
        .unwrap();
    assert_eq!(attn.shape, [96, 32]);
    let qn = specs
        .iter()
        .find(|s| s.name == "transformer.h.0.attn.q_norm.weight")
        .unwrap();
    assert_eq!(qn.shape, [8]);
    assert_eq!(specs.last().unwrap().name, "transformer.ln_f.bias");
    let mut post = GptConfig::new(65, 16, 2, 4, 32);
    post.norm = Norm::Post;
    let post = Gpt::<f32>::new(post).unwrap();
    assert!(post.param_specs().iter().all(|s| !s.name.contains("ln_f")));
}

#[test]
fn init_is_seeded_and_scales_residual_projections() {
    let cfg = GptConfig::new(65, 16, 8, 4, 64);
    let model = Gpt::<f64>::new(cfg).unwrap();
    let a = model.init_params(3);
    assert_eq!(a, model.init_params(3));
    assert_ne!(a, model.init_params(4));
    let std_of = |name: &str| {
        let i = model
            .param_specs()
            .iter()
            .position(|s| s.name == name)
            .unwrap();
        let v = &a[i];
        (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
    };
    let fc = std_of("transformer.h.0.mlp.c_fc.weight");
    let proj = std_of("transformer.h.0.mlp.c_proj.weight");
    assert!((fc - 0.02).abs() < 0.001, "{fc}");
    assert!((proj - 0.02 / 4.0).abs() < 0.0005, "{proj}");
}

/// Central differences of the loss against the analytic gradient, in f64,
/// on a few coordinates of every tensor.
fn finite_difference_check(cfg: GptConfig, seed: u64) {
    let mut model = Gpt::<f64>::new(cfg.clone()).unwrap();
    let mut rng = Rng(seed);
    // Larger-than-default weights so every path carries signal.
    let mut params: Vec<Vec<f64>> = model
        .param_specs()
        .iter()
        .map(|s| rng.vec::<f64>(s.numel(), -0.5, 0.5))
        .collect();
    for (s, p) in model.param_specs().iter().zip(params.iter_mut()) {
        if s.name.ends_with("norm.weight") || s.name.contains("ln_") && s.name.ends_with("weight") {
            p.iter_mut().for_each(|x| *x += 1.0);
        }
    }
    let (b, t) = (2, 5);
    let v = cfg.vocab_size as u64;
    let tokens: Vec<u32> = (0..b * t).map(|_| (rng.next() % v) as u32).collect();
    let targets: Vec<u32> = (0..b * t).map(|_| (rng.next() % v) as u32).collect();
    let mut grads = model.zeros_like_params();
    model
        .forward_backward(&params, &mut grads, &tokens, &targets, b, t)
        .unwrap();
    let h = 1e-5;
    for k in 0..params.len() {
        let n = params[k].len();
        let name = model.param_specs()[k].name.clone();
        for j in [0, n / 2, n - 1] {
            let x0 = params[k][j];
            params[k][j] = x0 + h;
            let up = model
                .forward(&params, &tokens, Some(&targets), b, t)
                .unwrap()
                .loss;
            params[k][j] = x0 - h;
            let down = model
                .forward(&params, &tokens, Some(&targets), b, t)
                .unwrap()
                .loss;
            params[k][j] = x0;
            let fd = (up - down) / (2.0 * h);
            let an = grads[k][j];
            assert!(
                (fd - an).abs() <= 1e-6 * (1.0 + an.abs()),
                "{name}[{j}]: finite difference {fd:e} vs analytic {an:e} ({cfg:?})"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let base = GptConfig::new(7, 6, 2, 2, 8);
    finite_difference_check(base.clone(), 1);
    let mut post = base.clone();
    post.norm = Norm::Post;
    finite_difference_check(post.clone(), 2);
    let mut qk = base.clone();
    qk.qk_norm = true;
    qk.z_loss = 0.1;
    qk.embed_scale = 1.7;
    finite_difference_check(qk, 3);
    let mut post_qk = post;
    post_qk.qk_norm = true;
    post_qk.z_loss = 0.05;
    finite_difference_check(post_qk, 4);
}

#[test]
fn f32_and_f64_agree_on_a_random_model() {
    let mut cfg = GptConfig::new(11, 8, 2, 2, 16);
    cfg.qk_norm = true;
    let m64 = Gpt::<f64>::new(cfg.clone()).unwrap();
    let params = m64.init_params(9);
    let p32: Vec<Vec<f32>> = params
        .iter()
        .map(|p| p.iter().map(|&x| x as f32).collect())
        .collect();
    let tokens: Vec<u32> = (0..16).map(|i| (i * 7 % 11) as u32).collect();
    let targets: Vec<u32> = (0..16).map(|i| (i * 5 % 11) as u32).collect();
    let mut m64 = m64;
    let mut m32 = Gpt::<f32>::new(cfg).unwrap();
    let mut g64 = m64.zeros_like_params();
    let mut g32 = m32.zeros_like_params();
    let s64 = m64
        .forward_backward(&params, &mut g64, &tokens, &targets, 2, 8)
        .unwrap();
    let s32 = m32
        .forward_backward(&p32, &mut g32, &tokens, &targets, 2, 8)
        .unwrap();
    assert!((s64.loss - s32.loss).abs() < 1e-5);
    for ((spec, a), b) in m64.param_specs().iter().zip(&g64).zip(&g32) {
        // Zero in exact arithmetic (softmax ignores a shift of all keys):
        // only rounding noise to compare.
        if spec.name.ends_with("k_norm.bias") {
            continue;
        }
        let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let e = conformance::relative_error(&b, a);
        assert!(e < 1e-3, "{}: {e:e}", spec.name);
    }
}

fn tiny() -> (Gpt<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let model = Gpt::<f32>::new(GptConfig::new(5, 4, 1, 2, 4)).unwrap();
    let params = model.init_params(0);
    let grads = model.zeros_like_params();
    (model, params, grads)
}

fn config_field(e: KeelError) -> String {
    match e {
        KeelError::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn token_id_at_or_above_vocab_is_an_error() {
    let (mut model, params, mut grads) = tiny();
    let e = model
        .forward_backward(&params, &mut grads, &[0, 1, 5, 2], &[0, 1, 2, 3], 1, 4)
        .unwrap_err();
    assert!(
        matches!(e, KeelError::Shape { ref tensor, .. } if tensor == "tokens"),
        "{e}"
    );
    let e = model
        .forward(&params, &[0, 1, 2, 3], Some(&[0, 9, 2, 3]), 1, 4)
        .unwrap_err();
    assert!(e.to_string().contains("targets"), "{e}");
}

#[test]
fn sequence_longer_than_block_size_is_an_error() {
    let (mut model, params, mut grads) = tiny();
    let ids = [0u32; 5];
    let e = model
        .forward_backward(&params, &mut grads, &ids, &ids, 1, 5)
        .unwrap_err();
    assert_eq!(config_field(e), "seq_len");
    let e = model.forward(&params, &[], None, 1, 0).unwrap_err();
    assert_eq!(config_field(e), "seq_len");
    let e = model.forward(&params, &[], None, 0, 4).unwrap_err();
    assert_eq!(config_field(e), "batch");
    // Ids not matching B*T.
    let e = model.forward(&params, &[0, 1, 2], None, 1, 4).unwrap_err();
    assert!(e.to_string().contains("tokens"), "{e}");
}

#[test]
fn bad_configs_are_errors_naming_the_field() {
    let e = Gpt::<f64>::new(GptConfig::new(65, 16, 2, 3, 32)).unwrap_err();
    assert_eq!(config_field(e), "n_embd");
    for (field, cfg) in [
        ("vocab_size", GptConfig::new(0, 16, 2, 4, 32)),
        ("block_size", GptConfig::new(65, 0, 2, 4, 32)),
        ("n_layer", GptConfig::new(65, 16, 0, 4, 32)),
        ("n_head", GptConfig::new(65, 16, 2, 0, 32)),
        ("n_embd", GptConfig::new(65, 16, 2, 4, 0)),
    ] {
        assert_eq!(config_field(Gpt::<f32>::new(cfg).unwrap_err()), field);
    }
    let mut cfg = GptConfig::new(65, 16, 2, 4, 32);
    cfg.z_loss = f64::NAN;
    assert_eq!(config_field(cfg.validate().unwrap_err()), "z_loss");
    cfg.z_loss = 0.0;
    cfg.embed_scale = 0.0;
    assert_eq!(config_field(cfg.validate().unwrap_err()), "embed_scale");
    cfg.embed_scale = 1.0;
    cfg.init_std = -1.0;
    assert_eq!(config_field(cfg.validate().unwrap_err()), "init_std");
    // serde: a missing size is an error, options default.
    assert!(serde_json::from_str::<GptConfig>(r#"{"vocab_size": 3}"#).is_err());
    // Except the vocabulary, which a training config takes from its data:
    // left out, it is 0, and the model refuses that by name.
    let no_vocab: GptConfig =
        serde_json::from_str(r#"{"block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}"#)
            .unwrap();
    assert_eq!(no_vocab.vocab_size, 0);
    assert_eq!(config_field(no_vocab.validate().unwrap_err()), "vocab_size");
}

#[test]
fn wrong_buffers_are_errors_naming_the_tensor() {
    let (mut model, mut params, mut grads) = tiny();
    let ids = [0u32; 4];
    params[1].pop();
    let e = model.forward(&params, &ids, None, 1, 4).unwrap_err();
    assert!(matches!(e, KeelError::Shape { ref tensor, .. } if tensor == "transformer.wpe.weight"));
    params.pop();
    assert!(model.forward(&params, &ids, None, 1, 4).is_err());
    let (mut model, params, _) = tiny();
    grads.truncate(2);
    assert!(model
        .forward_backward(&params, &mut grads, &ids, &ids, 1, 4)
        .is_err());
}

#[test]
fn golden_loader_rejects_a_missing_tensor_file() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("case.json");
    std::fs::copy(golden_dir().join("gpt_preln_public.json"), &json).unwrap();
    let e = load_golden(&json).unwrap_err();
    assert!(e.to_string().contains("safetensors"), "{e}");
    // And the conformance command reports it as failed rows, not a panic.
    let rows = conformance::run_paths(&[json]).unwrap();
    assert!(rows.iter().all(|r| !r.passed && r.kind == "gpt"));
}
