//! Bad input is an error that names what is wrong, never a panic, and never
//! a partial write: configurations, buffers, parameter groups, state dicts.

use half::bf16;
use keel::config::{AdamWConfig, LambConfig, SgdConfig};
use keel::{
    CpuOptimizer, KeelError, MixedPrecisionOptimizer, Optimizer, OptimizerConfig, OptimizerKind,
    ParamGroup, ParamSpec, Rounding, StateData, StateDict,
};

fn specs() -> Vec<ParamSpec> {
    vec![ParamSpec::new("w", [3, 2]), ParamSpec::new("b", [2])]
}

fn parse(json: &str) -> OptimizerConfig {
    OptimizerConfig::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// Asserts that `result` is an error whose message contains every `needle`.
#[track_caller]
fn assert_err_mentions<T: std::fmt::Debug>(result: keel::Result<T>, needles: &[&str]) -> KeelError {
    let e = match result {
        Ok(v) => panic!("expected an error mentioning {needles:?}, got Ok({v:?})"),
        Err(e) => e,
    };
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
    e
}

/// A config that parses but must be refused: `validate`, `CpuOptimizer::new`
/// (f32 and f64) and `MixedPrecisionOptimizer::new` all name `field`.
#[track_caller]
fn assert_invalid(config: OptimizerConfig, field: &str) {
    let e = assert_err_mentions(config.validate(), &[field]);
    assert!(matches!(e, KeelError::Config { .. }), "{e:?}");
    assert_err_mentions(CpuOptimizer::<f32>::new(config.clone(), specs()), &[field]);
    assert_err_mentions(CpuOptimizer::<f64>::new(config.clone(), specs()), &[field]);
    let s = specs();
    let w = [bf16::ONE; 6];
    let b = [bf16::ONE; 2];
    let groups = vec![ParamGroup::all(&s)];
    assert_err_mentions(
        MixedPrecisionOptimizer::new(config, s, groups, &[&w[..], &b[..]], Rounding::Nearest),
        &[field],
    );
}

#[test]
fn negative_lr_is_refused() {
    for kind in keel::config::KINDS {
        assert_invalid(
            parse(&format!(r#"{{"kind":"{kind}","lr":-0.1}}"#)),
            &format!("{kind}.lr"),
        );
    }
}

#[test]
fn nan_lr_is_refused_via_set_lr_and_in_a_rust_config() {
    let mut c = parse(r#"{"kind":"adamw","lr":0.01}"#);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1e-9] {
        assert_err_mentions(c.set_lr(bad), &["adamw.lr"]);
        assert_eq!(c.lr(), 0.01, "a refused set_lr must not change the rate");
    }
    c.set_lr(0.0).unwrap();
    assert_eq!(c.lr(), 0.0);

    // Through the Optimizer trait, on every backend.
    let mut opt = CpuOptimizer::<f32>::new(parse(r#"{"kind":"lion","lr":0.01}"#), specs()).unwrap();
    assert_err_mentions(opt.set_lr(f64::NAN), &["lion.lr"]);
    assert_eq!(opt.lr(), 0.01);
    let s = specs();
    let (w, b) = (vec![bf16::ONE; 6], vec![bf16::ONE; 2]);
    let groups = vec![ParamGroup::all(&s)];
    let mut mixed = MixedPrecisionOptimizer::new(
        parse(r#"{"kind":"sgd","lr":0.5}"#),
        s,
        groups,
        &[&w[..], &b[..]],
        Rounding::Nearest,
    )
    .unwrap();
    assert_err_mentions(mixed.set_lr(f64::NAN), &["sgd.lr"]);
    assert_eq!(mixed.lr(), 0.5);

    // A config built in Rust never went through serde.
    let adamw = OptimizerConfig::new(OptimizerKind::AdamW(AdamWConfig {
        lr: f64::NAN,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        update_clip_rms: None,
    }));
    assert_invalid(adamw, "adamw.lr");
    let sgd = OptimizerConfig::new(OptimizerKind::Sgd(SgdConfig {
        lr: f64::NAN,
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    }));
    assert_invalid(sgd, "sgd.lr");
    let lamb = OptimizerConfig::new(OptimizerKind::Lamb(LambConfig {
        lr: 1e-3,
        beta1: f64::NAN,
        beta2: 0.999,
        eps: 1e-6,
        weight_decay: 0.0,
    }));
    assert_invalid(lamb, "lamb.beta1");
}

#[test]
fn betas_outside_unit_interval_are_refused() {
    for kind in ["adam", "adamw", "lamb", "lion"] {
        for beta in ["beta1", "beta2"] {
            for bad in ["1.0", "-0.1", "1.5"] {
                let c = parse(&format!(r#"{{"kind":"{kind}","lr":0.1,"{beta}":{bad}}}"#));
                assert_invalid(c, &format!("{kind}.{beta}"));
            }
            // The closed end is fine.
            parse(&format!(r#"{{"kind":"{kind}","lr":0.1,"{beta}":0.0}}"#))
                .validate()
                .unwrap();
        }
    }
}

#[test]
fn other_out_of_range_hyperparameters_are_refused() {
    for kind in ["adam", "adamw", "lamb", "lars"] {
        assert_invalid(
            parse(&format!(r#"{{"kind":"{kind}","lr":0.1,"eps":-1e-8}}"#)),
            &format!("{kind}.eps"),
        );
    }
    // An eps that divides: 0 would turn a zero gradient into 0 / 0.
    for kind in ["adam", "adamw", "lamb", "muon", "soap"] {
        let e = parse(&format!(r#"{{"kind":"{kind}","lr":0.1,"eps":0.0}}"#))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("`{kind}.eps`")) && e.contains("0 / 0"),
            "{e}"
        );
    }
    // LARS's trust ratio is 1 where a norm is 0, so its eps may be 0.
    parse(r#"{"kind":"lars","lr":0.1,"eps":0.0}"#)
        .validate()
        .unwrap();
    for kind in keel::config::KINDS {
        let c = parse(&format!(
            r#"{{"kind":"{kind}","lr":0.1,"weight_decay":-0.1}}"#
        ));
        assert_invalid(c, &format!("{kind}.weight_decay"));
    }
    assert_invalid(
        parse(r#"{"kind":"sgd","lr":0.1,"momentum":1.0}"#),
        "sgd.momentum",
    );
    assert_invalid(
        parse(r#"{"kind":"sgd","lr":0.1,"momentum":0.9,"dampening":1.5}"#),
        "sgd.dampening",
    );
    assert_invalid(
        parse(r#"{"kind":"sgd","lr":0.1,"nesterov":true}"#),
        "sgd.nesterov",
    );
    assert_invalid(
        parse(r#"{"kind":"sgd","lr":0.1,"momentum":0.9,"dampening":0.1,"nesterov":true}"#),
        "sgd.nesterov",
    );
    assert_invalid(
        parse(r#"{"kind":"lars","lr":0.1,"momentum":-0.5}"#),
        "lars.momentum",
    );
    assert_invalid(
        parse(r#"{"kind":"lars","lr":0.1,"trust_coefficient":0}"#),
        "lars.trust_coefficient",
    );
}

#[test]
fn clipping_thresholds_must_be_positive() {
    for bad in ["0", "-1", "-0.0"] {
        assert_invalid(
            parse(&format!(
                r#"{{"kind":"adamw","lr":0.1,"clip_global_norm":{bad}}}"#
            )),
            "clip_global_norm",
        );
        assert_invalid(
            parse(&format!(r#"{{"kind":"sgd","lr":0.1,"clip_value":{bad}}}"#)),
            "clip_value",
        );
        assert_invalid(
            parse(&format!(
                r#"{{"kind":"adamw","lr":0.1,"update_clip_rms":{bad}}}"#
            )),
            "adamw.update_clip_rms",
        );
    }
    let mut c = parse(r#"{"kind":"lamb","lr":0.1}"#);
    c.clip_global_norm = Some(f64::NAN);
    assert_invalid(c.clone(), "clip_global_norm");
    c.clip_global_norm = None;
    c.clip_value = Some(f64::INFINITY);
    assert_invalid(c, "clip_value");
}

#[test]
fn unparsable_configs_name_the_problem() {
    let e = assert_err_mentions(
        OptimizerConfig::from_json(r#"{"kind":"adamax","lr":1}"#),
        &["adamax"],
    );
    assert!(matches!(e, KeelError::Config { .. }), "{e:?}");
    assert_err_mentions(
        OptimizerConfig::from_json(r#"{"kind":"adamw","lr":1,"betta1":0.9}"#),
        &["betta1"],
    );
    assert_err_mentions(
        OptimizerConfig::from_json(r#"{"kind":"adamw","beta1":0.9}"#),
        &["lr"],
    );
    assert_err_mentions(OptimizerConfig::from_json(r#"{"lr":0.1}"#), &["kind"]);
    assert_err_mentions(
        OptimizerConfig::from_json(r#"{"kind":"adamw","lr":0.1,"clip_global_norm":"big"}"#),
        &["clip_global_norm"],
    );
    assert_err_mentions(
        OptimizerConfig::from_json(r#"{"kind":"adamw","lr":0.1,"on_nonfinite":"ignore"}"#),
        &["on_nonfinite"],
    );
    // A key of another kind is an unknown key here.
    assert_err_mentions(
        OptimizerConfig::from_json(r#"{"kind":"lion","lr":0.1,"eps":1e-8}"#),
        &["unknown field `eps`", "(the settings of `lion`)"],
    );
    assert_err_mentions(OptimizerConfig::from_json("not json"), &["optimizer"]);
    // serde_json directly gives the same messages.
    let e = serde_json::from_str::<OptimizerConfig>(r#"{"kind":"adamax","lr":1}"#).unwrap_err();
    assert!(e.to_string().contains("adamax"), "{e}");
    // TOML too.
    assert_err_mentions(
        OptimizerConfig::from_toml("kind = \"adamw\"\nlr = 1\nbetta1 = 0.9\n"),
        &["betta1"],
    );
    assert_err_mentions(
        OptimizerConfig::from_toml("kind = \"adamax\"\nlr = 1\n"),
        &["adamax"],
    );
}

/// A value of the wrong type names its key (serde alone says only what it
/// expected), in JSON, in TOML, and inside arrays and nested settings.
#[test]
fn wrongly_typed_values_name_their_key() {
    for (json, needles) in [
        (
            r#"{"kind":"adamw","lr":"fast"}"#,
            &["`lr`", "string \"fast\""][..],
        ),
        (r#"{"kind":"sgd","lr":0.1,"nesterov":1}"#, &["`nesterov`"]),
        (
            r#"{"kind":"muon","lr":0.1,"ns_coefficients":[3.4,-4.7,"x"]}"#,
            &["`ns_coefficients[2]`"],
        ),
        (
            r#"{"kind":"shampoo","lr":0.1,"grafting":{"kind":"adam","eps":"tiny"}}"#,
            &["`grafting`", "string \"tiny\""],
        ),
        (r#"{"kind":7,"lr":0.1}"#, &["`kind` must be a string"]),
    ] {
        assert_err_mentions(OptimizerConfig::from_json(json), needles);
    }
    assert_err_mentions(
        OptimizerConfig::from_toml("kind = \"lamb\"\nlr = 0.1\nweight_decay = \"some\"\n"),
        &["`weight_decay`"],
    );
}

#[test]
fn toml_and_json_configs_agree() {
    let toml = r#"
kind = "adamw"
lr = 0.001
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1
update_clip_rms = 1.0
clip_global_norm = 1.0
clip_value = 5
on_nonfinite = "error"
"#;
    let json = r#"{"kind":"adamw","lr":0.001,"beta1":0.9,"beta2":0.95,"eps":1e-8,"weight_decay":0.1,
        "update_clip_rms":1.0,"clip_global_norm":1.0,"clip_value":5.0,"on_nonfinite":"error"}"#;
    let a = OptimizerConfig::from_toml(toml).unwrap();
    let b = OptimizerConfig::from_json(json).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.clip_value, Some(5.0));
    assert_eq!(a.on_nonfinite, keel::NonFinitePolicy::Error);
    match &a.kind {
        OptimizerKind::AdamW(c) => {
            assert_eq!(
                (c.lr, c.beta1, c.beta2, c.eps, c.weight_decay),
                (0.001, 0.9, 0.95, 1e-8, 0.1)
            );
            assert_eq!(c.update_clip_rms, Some(1.0));
        }
        other => panic!("{other:?}"),
    }
    // Defaults fill in the same way from both formats, integers read as floats.
    for kind in keel::config::KINDS {
        let t = OptimizerConfig::from_toml(&format!("kind = \"{kind}\"\nlr = 1\n")).unwrap();
        let j = OptimizerConfig::from_json(&format!(r#"{{"kind":"{kind}","lr":1.0}}"#)).unwrap();
        assert_eq!(t, j, "{kind}");
    }
    let t =
        OptimizerConfig::from_toml("kind = \"sgd\"\nlr = 0.1\nmomentum = 0.9\nnesterov = true\n")
            .unwrap();
    let j = OptimizerConfig::from_json(r#"{"kind":"sgd","lr":0.1,"momentum":0.9,"nesterov":true}"#)
        .unwrap();
    assert_eq!(t, j);
}

#[test]
fn configs_round_trip_through_json() {
    for json in [
        r#"{"kind":"sgd","lr":0.1,"momentum":0.9,"dampening":0.0,"nesterov":true,"weight_decay":1e-4}"#,
        r#"{"kind":"adam","lr":3e-4,"beta1":0.8,"weight_decay":0.01,"clip_value":1.5}"#,
        r#"{"kind":"adamw","lr":0.1,"update_clip_rms":1.0,"clip_global_norm":0.3,"on_nonfinite":"error"}"#,
        r#"{"kind":"lamb","lr":0.01,"eps":1e-9}"#,
        r#"{"kind":"lars","lr":0.1,"nesterov":true,"trust_coefficient":0.02,"eps":1e-9}"#,
        r#"{"kind":"lion","lr":1e-4,"beta2":0.98}"#,
        r#"{"kind":"adamw","lr":1e-3,"on_nonfinite":"unchecked"}"#,
    ] {
        let c = parse(json);
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(parse(&text), c, "{text}");
    }
}

/// Buffers that do not match the specs are an error naming the tensor, and
/// nothing (parameters, state, step count) is written.
#[test]
fn mismatched_buffers_are_refused_without_writing() {
    for json in [
        r#"{"kind":"adamw","lr":0.1}"#,
        r#"{"kind":"sgd","lr":0.1,"momentum":0.9}"#,
        r#"{"kind":"lars","lr":0.1}"#,
    ] {
        let mut opt = CpuOptimizer::<f32>::new(parse(json), specs()).unwrap();
        let mut w = vec![1.0f32; 6];
        let mut b = vec![2.0f32; 2];
        let gw = [0.5f32; 6];
        let gb = [0.5f32; 2];
        opt.step(&mut [&mut w[..], &mut b[..]], &[&gw[..], &gb[..]])
            .unwrap();
        let (w0, b0) = (w.clone(), b.clone());
        let state = opt.state_dict().unwrap();

        let mut long_w = vec![1.0f32; 7];
        let mut short_b = vec![1.0f32; 1];
        let long_gw = [0.5f32; 7];
        let short_gb = [0.5f32; 1];
        let cases: Vec<(keel::Result<keel::StepStats>, &[&str])> = vec![
            (
                opt.step(&mut [&mut w[..]], &[&gw[..], &gb[..]]),
                &["expected 2"],
            ),
            (
                opt.step(&mut [&mut w[..], &mut b[..]], &[&gw[..]]),
                &["expected 2"],
            ),
            (opt.step(&mut [], &[]), &["expected 2"]),
            (
                opt.step(&mut [&mut long_w[..], &mut b[..]], &[&gw[..], &gb[..]]),
                &["`w`"],
            ),
            (
                opt.step(&mut [&mut w[..], &mut short_b[..]], &[&gw[..], &gb[..]]),
                &["`b`"],
            ),
            (
                opt.step(&mut [&mut w[..], &mut b[..]], &[&long_gw[..], &gb[..]]),
                &["`w`"],
            ),
            (
                opt.step(&mut [&mut w[..], &mut b[..]], &[&gw[..], &short_gb[..]]),
                &["`b`"],
            ),
        ];
        for (result, needles) in cases {
            let e = assert_err_mentions(result, needles);
            assert!(matches!(e, KeelError::Shape { .. }), "{e:?}");
        }
        assert_eq!(w, w0);
        assert_eq!(b, b0);
        assert_eq!(long_w, vec![1.0f32; 7]);
        assert_eq!(short_b, vec![1.0f32; 1]);
        assert_eq!(opt.step_count(), 1);
        assert_eq!(opt.state_dict().unwrap(), state);
    }
}

#[test]
fn mixed_precision_buffers_are_checked() {
    let s = specs();
    let groups = vec![ParamGroup::all(&s)];
    let cfg = parse(r#"{"kind":"adamw","lr":0.1}"#);
    let (w, b) = (vec![bf16::ONE; 6], vec![bf16::ONE; 2]);
    let short = vec![bf16::ONE; 5];
    // Wrong initial buffers.
    for (init, needle) in [
        (vec![&w[..]], "initial"),
        (vec![&w[..], &b[..], &b[..]], "initial"),
        (vec![&short[..], &b[..]], "`w`"),
        (vec![&w[..], &w[..]], "`b`"),
    ] {
        let r = MixedPrecisionOptimizer::new(
            cfg.clone(),
            s.clone(),
            groups.clone(),
            &init,
            Rounding::Nearest,
        );
        assert_err_mentions(r, &[needle]);
    }
    // Wrong step buffers write nothing, master weights included.
    let mut opt = MixedPrecisionOptimizer::new(
        cfg,
        s,
        groups,
        &[&w[..], &b[..]],
        Rounding::Stochastic { seed: 1 },
    )
    .unwrap();
    let (mut pw, mut pb) = (w.clone(), b.clone());
    let (gw, gb) = (vec![bf16::from_f32(0.5); 6], vec![bf16::from_f32(0.5); 2]);
    let mut short_p = short.clone();
    let short_g = [bf16::ONE; 5];
    assert_err_mentions(
        opt.step(&mut [&mut short_p[..], &mut pb[..]], &[&gw[..], &gb[..]]),
        &["`w`"],
    );
    assert_err_mentions(
        opt.step(&mut [&mut pw[..], &mut pb[..]], &[&short_g[..], &gb[..]]),
        &["`w`"],
    );
    assert_err_mentions(
        opt.step(&mut [&mut pw[..]], &[&gw[..], &gb[..]]),
        &["expected 2"],
    );
    assert_err_mentions(
        opt.step_with_grads::<f32>(&mut [&mut pw[..], &mut pb[..]], &[&[0.5f32; 6][..]]),
        &["expected 2"],
    );
    assert_eq!(opt.step_count(), 0);
    assert!(opt.master(0).iter().all(|&x| x == 1.0));
    assert_eq!(pw, w);
    assert_eq!(short_p, short);
}

#[test]
fn bad_groups_are_refused() {
    let cfg = parse(r#"{"kind":"adamw","lr":0.1}"#);
    let s = specs();
    let cases: Vec<(Vec<ParamSpec>, Vec<ParamGroup>, Vec<&str>)> = vec![
        (
            s.clone(),
            vec![
                ParamGroup::all(&s),
                ParamGroup::new("empty", Vec::<String>::new()),
            ],
            vec!["groups.empty", "no parameters"],
        ),
        (
            s.clone(),
            vec![ParamGroup::new("g", ["w", "b", "nope"])],
            vec!["groups.g", "unknown parameter `nope`"],
        ),
        (
            s.clone(),
            vec![
                ParamGroup::new("a", ["w", "b"]),
                ParamGroup::new("c", ["b"]),
            ],
            vec!["groups.c", "`b`", "already in group `a`"],
        ),
        (
            s.clone(),
            vec![ParamGroup::new("a", ["w"])],
            vec!["groups", "`b`", "in no group"],
        ),
        (s.clone(), vec![], vec!["groups"]),
        (
            s.clone(),
            vec![ParamGroup::new("a", ["w"]), ParamGroup::new("a", ["b"])],
            vec!["groups.a", "duplicate group name"],
        ),
        (
            s.clone(),
            vec![ParamGroup::all(&s).with_lr_scale(-1.0)],
            vec!["groups.all.lr_scale"],
        ),
        (
            s.clone(),
            vec![ParamGroup::all(&s).with_lr_scale(f64::NAN)],
            vec!["groups.all.lr_scale"],
        ),
        (
            vec![ParamSpec::new("w", [2]), ParamSpec::new("w", [3])],
            vec![ParamGroup::new("all", ["w"])],
            vec!["params", "duplicate parameter name `w`"],
        ),
        (
            vec![],
            vec![ParamGroup::new("all", ["w"])],
            vec!["params", "no parameters"],
        ),
    ];
    for (specs, groups, needles) in cases {
        let e = assert_err_mentions(
            CpuOptimizer::<f32>::with_groups(cfg.clone(), specs.clone(), groups.clone()),
            &needles,
        );
        assert!(matches!(e, KeelError::Config { .. }), "{e:?}");
        assert_err_mentions(
            CpuOptimizer::<f64>::with_groups(cfg.clone(), specs.clone(), groups.clone()),
            &needles,
        );
        let init: Vec<Vec<bf16>> = specs.iter().map(|s| vec![bf16::ONE; s.numel()]).collect();
        let init: Vec<&[bf16]> = init.iter().map(|v| &v[..]).collect();
        assert_err_mentions(
            MixedPrecisionOptimizer::new(cfg.clone(), specs, groups, &init, Rounding::Nearest),
            &needles,
        );
    }
    // `new` with no parameters at all.
    assert_err_mentions(CpuOptimizer::<f32>::new(cfg, vec![]), &["params"]);
}

fn stepped(json: &str, specs: Vec<ParamSpec>) -> CpuOptimizer<f64> {
    let mut opt = CpuOptimizer::<f64>::new(parse(json), specs.clone()).unwrap();
    let mut params: Vec<Vec<f64>> = specs.iter().map(|s| vec![1.0; s.numel()]).collect();
    let grads: Vec<Vec<f64>> = specs.iter().map(|s| vec![0.25; s.numel()]).collect();
    let mut ps: Vec<&mut [f64]> = params.iter_mut().map(|p| &mut p[..]).collect();
    let gs: Vec<&[f64]> = grads.iter().map(|g| &g[..]).collect();
    opt.step(&mut ps, &gs).unwrap();
    opt
}

/// A state dict that does not fit is refused, and the optimizer it was
/// loaded into is left as it was.
#[test]
fn mismatched_state_dicts_are_refused() {
    let adamw = r#"{"kind":"adamw","lr":0.1}"#;
    let source = stepped(adamw, specs()).state_dict().unwrap();
    // (state, what the error names, whether the state is consistent in itself)
    let mut bad: Vec<(StateDict, Vec<&str>, bool)> = Vec::new();

    let other_kind = stepped(r#"{"kind":"lamb","lr":0.1}"#, specs())
        .state_dict()
        .unwrap();
    bad.push((other_kind, vec!["lamb", "adamw"], true));
    let fewer = stepped(adamw, vec![ParamSpec::new("w", [3, 2])])
        .state_dict()
        .unwrap();
    bad.push((fewer, vec!["1 parameters"], true));
    let reshaped = stepped(
        adamw,
        vec![ParamSpec::new("w", [2, 3]), ParamSpec::new("b", [2])],
    )
    .state_dict()
    .unwrap();
    bad.push((reshaped, vec!["`w`"], true));
    let renamed = stepped(
        adamw,
        vec![ParamSpec::new("w", [3, 2]), ParamSpec::new("bias", [2])],
    )
    .state_dict()
    .unwrap();
    bad.push((renamed, vec!["`bias`"], true));
    let reordered = stepped(
        adamw,
        vec![ParamSpec::new("b", [2]), ParamSpec::new("w", [3, 2])],
    )
    .state_dict()
    .unwrap();
    bad.push((reordered, vec!["`b`"], true));
    let mut missing = source.clone();
    missing.tensors.retain(|t| t.name != "b/exp_avg_sq");
    bad.push((missing, vec!["b/exp_avg_sq"], false));
    let mut short = source.clone();
    for t in short.tensors.iter_mut().filter(|t| t.name == "w/exp_avg") {
        t.data = StateData::F64(vec![0.0; 5]);
    }
    bad.push((short, vec!["w/exp_avg", "5"], false));
    let mut negative = source.clone();
    for t in negative
        .tensors
        .iter_mut()
        .filter(|t| t.name == "w/exp_avg_sq")
    {
        if let StateData::F64(v) = &mut t.data {
            v[4] = -1e-9;
        }
    }
    bad.push((
        negative,
        vec!["w/exp_avg_sq", "element 4", "negative"],
        false,
    ));
    let mut f32_data = source.clone();
    for t in f32_data.tensors.iter_mut() {
        if let StateData::F64(v) = &t.data {
            t.data = StateData::F32(v.iter().map(|&x| x as f32).collect());
        }
    }
    bad.push((f32_data, vec!["F32"], false));
    let mut bad_config = source.clone();
    bad_config.config = parse(r#"{"kind":"adamw","lr":0.1,"beta2":1.0}"#);
    bad.push((bad_config, vec!["adamw.beta2"], false));
    let mut bad_groups = source.clone();
    bad_groups.groups = vec![ParamGroup::new("g", ["w"])];
    bad.push((bad_groups, vec!["`b`", "no group"], false));

    let mut target = stepped(adamw, specs());
    // Make the target differ from `source` so a partial load would show.
    target.set_lr(0.5).unwrap();
    let before = target.state_dict().unwrap();
    for (sd, needles, consistent) in bad {
        assert_err_mentions(target.load_state_dict(&sd), &needles);
        assert_eq!(
            target.state_dict().unwrap(),
            before,
            "a failed load changed the optimizer"
        );
        // `from_state_dict` takes specs, groups and kind from the dict itself,
        // so only a dict that contradicts itself is an error there.
        let rebuilt = CpuOptimizer::<f64>::from_state_dict(&sd);
        assert_eq!(rebuilt.is_ok(), consistent, "{:?}", rebuilt.map(|_| ()));
        let owned = CpuOptimizer::<f64>::from_state_dict_owned(sd.clone());
        assert_eq!(owned.is_ok(), consistent, "{:?}", owned.map(|_| ()));
    }
    // A state without master weights cannot resume mixed precision.
    let s = specs();
    let (w, b) = (vec![bf16::ONE; 6], vec![bf16::ONE; 2]);
    let groups = vec![ParamGroup::all(&s)];
    let mut mixed = MixedPrecisionOptimizer::new(
        parse(adamw),
        s,
        groups,
        &[&w[..], &b[..]],
        Rounding::Nearest,
    )
    .unwrap();
    let f32_state = {
        let mut o = CpuOptimizer::<f32>::new(parse(adamw), specs()).unwrap();
        let (mut pw, mut pb) = (vec![1.0f32; 6], vec![1.0f32; 2]);
        o.step(
            &mut [&mut pw[..], &mut pb[..]],
            &[&[0.5f32; 6][..], &[0.5f32; 2][..]],
        )
        .unwrap();
        o.state_dict().unwrap()
    };
    assert_err_mentions(mixed.load_state_dict(&f32_state), &["master"]);
    assert_eq!(mixed.step_count(), 0);
    assert_err_mentions(mixed.load_state_dict(&source), &[]);
    assert!(mixed.master(0).iter().all(|&x| x == 1.0));
}

#[test]
fn impossible_sizes_are_errors_not_aborts() {
    // Every kind that keeps per-element state: sizes no machine holds are a
    // shape error (the element count overflows) or a memory error (the
    // buffer's bytes overflow, so the allocator is never even asked).
    for kind in [
        r#"{"kind": "sgd", "lr": 0.1, "momentum": 0.9}"#,
        r#"{"kind": "adam", "lr": 0.001}"#,
        r#"{"kind": "adamw", "lr": 0.001}"#,
        r#"{"kind": "lamb", "lr": 0.001}"#,
        r#"{"kind": "lars", "lr": 0.1}"#,
        r#"{"kind": "lion", "lr": 0.0001}"#,
        r#"{"kind": "muon", "lr": 0.02}"#,
        r#"{"kind": "shampoo", "lr": 0.01}"#,
        r#"{"kind": "soap", "lr": 0.003}"#,
    ] {
        let config = parse(kind);
        let overflow = vec![
            ParamSpec::new("b", [2, 2]),
            ParamSpec::new("w", [1usize << 32, 1 << 32]),
        ];
        let e = assert_err_mentions(
            CpuOptimizer::<f32>::new(config.clone(), overflow),
            &[
                "`w`",
                "[4294967296, 4294967296]",
                "more elements than fit in memory",
            ],
        );
        assert!(matches!(e, KeelError::Shape { .. }), "{kind}: {e:?}");

        // 2^62 elements of 4 bytes: 16 EiB.
        let huge = vec![
            ParamSpec::new("b", [2, 2]),
            ParamSpec::new("w", [1usize << 31, 1 << 31]),
        ];
        let e = assert_err_mentions(
            CpuOptimizer::<f32>::new(config.clone(), huge.clone()),
            &["not enough memory", "optimizer state of `w`", "16.0 EiB"],
        );
        match e {
            KeelError::Memory { needed, .. } => assert_eq!(needed, 1u128 << 64, "{kind}"),
            other => panic!("{kind}: expected a memory error, got {other:?}"),
        }
        // f64 state doubles it.
        let e = assert_err_mentions(CpuOptimizer::<f64>::new(config, huge), &["32.0 EiB"]);
        assert!(matches!(e, KeelError::Memory { needed, .. } if needed == 1u128 << 65));
    }
}

/// TOML can say `nan` and `inf`; a config refuses them by name instead of
/// reading an optional setting as absent (clipping silently off).
#[test]
fn toml_nan_and_inf_name_the_key() {
    for (line, key) in [
        ("clip_global_norm = nan", "clip_global_norm"),
        ("clip_value = inf", "clip_value"),
        ("lr = -inf", "lr"),
        ("weight_decay = nan", "weight_decay"),
    ] {
        let text = format!(
            "kind = \"adamw\"\n{}\n{line}\n",
            if key == "lr" { "" } else { "lr = 0.1" }
        );
        match OptimizerConfig::from_toml(&text) {
            Ok(c) => panic!("{line} was read as {c:?}"),
            Err(KeelError::Config { field, message }) => {
                assert_eq!(field, key, "{line}");
                assert!(message.contains("must be finite"), "{line}: {message}");
            }
            Err(e) => panic!("{line}: {e}"),
        }
    }
    let ok = OptimizerConfig::from_toml("kind = \"adamw\"\nlr = 0.1\nclip_global_norm = 1.0\n");
    assert_eq!(ok.unwrap().clip_global_norm, Some(1.0));
}

/// Every kind's config writes to TOML and reads back equal, as it does in
/// JSON: one vocabulary for both.
#[test]
fn configs_round_trip_through_toml() {
    for json in [
        r#"{"kind": "adamw", "lr": 0.001, "weight_decay": 0.1, "update_clip_rms": 1.0, "clip_global_norm": 1.0, "on_nonfinite": "error"}"#,
        r#"{"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": true, "clip_value": 2.0}"#,
        r#"{"kind": "lamb", "lr": 0.01}"#,
        r#"{"kind": "lars", "lr": 0.01, "momentum": 0.9}"#,
        r#"{"kind": "lion", "lr": 0.0001}"#,
        r#"{"kind": "muon", "lr": 0.02}"#,
        r#"{"kind": "shampoo", "lr": 0.01, "grafting": {"kind": "adagrad", "eps": 1e-8}}"#,
        r#"{"kind": "soap", "lr": 0.01}"#,
        r#"{"kind": "soap", "lr": 0.01, "shampoo_beta": 0.9}"#,
    ] {
        let config = OptimizerConfig::from_json(json).unwrap();
        let text = toml::to_string(&config).unwrap_or_else(|e| panic!("{json}: {e}"));
        let back = OptimizerConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(back, config, "{text}");
    }
}

/// Zero-size matrices step (they have nothing to update) and leave the
/// other tensors' updates as they are without them, for every matrix kind
/// (a 0x3 Gram matrix once reached the eigensolver and overflowed there).
#[test]
fn matrix_kinds_step_zero_size_tensors() {
    for json in [
        r#"{"kind": "muon", "lr": 0.02}"#,
        r#"{"kind": "soap", "lr": 0.01, "precondition_frequency": 1}"#,
        r#"{"kind": "soap", "lr": 0.01, "precondition_frequency": 1, "precondition_1d": true}"#,
        r#"{"kind": "shampoo", "lr": 0.01, "precondition_frequency": 1, "start_preconditioning_step": 1}"#,
    ] {
        let config = OptimizerConfig::from_json(json).unwrap();
        let mut empties = vec![ParamSpec::new("a", [3, 0]), ParamSpec::new("b", [0, 3])];
        if !json.contains("muon") {
            empties.push(ParamSpec::new("c", [0]));
        }
        let mut specs = empties.clone();
        specs.push(ParamSpec::new("w", [2, 3]));
        let mut with = CpuOptimizer::<f64>::new(config.clone(), specs).unwrap();
        let mut alone =
            CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [2, 3])]).unwrap();
        let (mut w1, mut w2) = (vec![0.5f64; 6], vec![0.5f64; 6]);
        for step in 0..3 {
            let g: Vec<f64> = (0..6)
                .map(|i| ((i * 7 + step * 3) % 5) as f64 - 2.0)
                .collect();
            let mut nothing: Vec<Vec<f64>> = empties.iter().map(|_| Vec::new()).collect();
            let mut params: Vec<&mut [f64]> = nothing.iter_mut().map(|v| &mut v[..]).collect();
            params.push(&mut w1);
            let mut grads: Vec<&[f64]> = empties.iter().map(|_| &[][..]).collect();
            grads.push(&g);
            let stats = with
                .step(&mut params, &grads)
                .unwrap_or_else(|e| panic!("{json}: {e}"));
            assert!(stats.global_grad_norm.is_finite(), "{json}");
            alone.step(&mut [&mut w2[..]], &[&g[..]]).unwrap();
            assert_eq!(w1, w2, "{json}: step {step}");
        }
    }
}

/// A state whose step count cannot grow is an error at the step, not an
/// overflow: nothing is written.
#[test]
fn a_step_count_at_its_limit_is_an_error() {
    let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.1}"#).unwrap();
    let mut opt = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [2])]).unwrap();
    let mut sd = opt.state_dict().unwrap();
    sd.step = u64::MAX;
    opt.load_state_dict(&sd).unwrap();
    let mut w = [1.0, 2.0];
    let e = opt.step(&mut [&mut w[..]], &[&[0.5, 0.5][..]]).unwrap_err();
    assert!(e.to_string().contains("step count"), "{e}");
    assert_eq!(w, [1.0, 2.0]);
    assert!(opt.state_dict().unwrap() == sd);
}

/// A learning rate finite in f64 but not in f32 (or one whose product with
/// the weight decay is not) is an error at an f32 step, naming the field,
/// and writes nothing; in f64 the same step runs.
#[test]
fn coefficients_that_overflow_f32_are_errors() {
    for (json, lr, needle) in [
        (
            r#"{"kind": "adamw", "lr": 0.1}"#,
            1e300,
            "lr = 1e300 overflows F32",
        ),
        (
            r#"{"kind": "lion", "lr": 0.1}"#,
            1e39,
            "lr = 1e39 overflows F32",
        ),
        (
            r#"{"kind": "adamw", "lr": 0.1, "weight_decay": 1e300}"#,
            1e-3,
            "lr x weight_decay = 1e297 overflows F32",
        ),
    ] {
        let config = OptimizerConfig::from_json(json).unwrap();
        let mut opt =
            CpuOptimizer::<f32>::new(config.clone(), vec![ParamSpec::new("w", [3])]).unwrap();
        opt.set_lr(lr).unwrap();
        let before = opt.state_dict().unwrap();
        let mut w = [1.0f32, 2.0, 3.0];
        match opt.step(&mut [&mut w[..]], &[&[0.1, 0.1, 0.1][..]]) {
            Ok(_) => panic!("{json} at lr {lr}: stepped to {w:?}"),
            Err(KeelError::Config { field, message }) => {
                assert!(field.ends_with(".lr"), "{field}");
                assert!(message.contains(needle), "{message}");
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(w, [1.0, 2.0, 3.0]);
        assert!(opt.state_dict().unwrap() == before);
        let mut opt64 = CpuOptimizer::<f64>::new(config, vec![ParamSpec::new("w", [3])]).unwrap();
        opt64.set_lr(lr).unwrap();
        let mut w64 = [1.0f64, 2.0, 3.0];
        opt64
            .step(&mut [&mut w64[..]], &[&[0.1, 0.1, 0.1][..]])
            .unwrap();
    }
}

/// A key given twice is an error naming it, not "the last one wins".
#[test]
fn duplicate_config_keys_are_refused() {
    for (json, key) in [
        (
            r#"{"kind": "adamw", "lr": 0.1, "kind": "sgd"}"#,
            "`kind` is given twice",
        ),
        (
            r#"{"kind": "adamw", "lr": 0.1, "lr": 1.0}"#,
            "`lr` is given twice",
        ),
        (
            r#"{"kind": "adamw", "lr": 0.1, "clip_global_norm": 1, "clip_global_norm": 2}"#,
            "`clip_global_norm` is given twice",
        ),
        // Nested maps too: Shampoo's grafting.
        (
            r#"{"kind": "shampoo", "lr": 0.1, "grafting": {"kind": "adam", "eps": 1e-8, "eps": 1}}"#,
            "`grafting.eps` is given twice",
        ),
    ] {
        let e = OptimizerConfig::from_json(json).unwrap_err();
        assert!(e.to_string().contains(key), "{json}: {e}");
    }
}

/// Shampoo's grafting accumulator is a sum of squares too: a negative one
/// is refused on load, by name; its other buffers may hold negatives.
#[test]
fn negative_graft_accumulators_are_refused() {
    let shampoo = r#"{"kind":"shampoo","lr":0.1,"grafting":{"kind":"adagrad","eps":1e-8}}"#;
    let source = stepped(shampoo, specs()).state_dict().unwrap();
    let negated = |slot: &str| {
        let mut sd = source.clone();
        for t in sd.tensors.iter_mut().filter(|t| t.name == slot) {
            if let StateData::F64(v) = &mut t.data {
                v[0] = -v[0].abs() - 1.0;
            }
        }
        sd
    };
    assert_err_mentions(
        CpuOptimizer::<f64>::from_state_dict(&negated("b/graft")),
        &["b/graft", "element 0", "negative"],
    );
    CpuOptimizer::<f64>::from_state_dict(&negated("b/exp_avg")).unwrap();
}

/// Newton–Schulz coefficients that blow up instead of orthogonalizing are
/// refused (the step would write ±inf or NaN from finite gradients); the
/// published sets pass at any step count.
#[test]
fn diverging_newton_schulz_coefficients_are_refused() {
    for coeffs in [
        "[3.4445, 4.775, 2.0315]",
        "[1e200, 0, 0]",
        "[3.0, 0.0, 0.0]",
    ] {
        let c = parse(&format!(
            r#"{{"kind":"muon","lr":0.02,"ns_coefficients":{coeffs}}}"#
        ));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("`muon.ns_coefficients`") && e.contains("do not orthogonalize"),
            "{coeffs}: {e}"
        );
    }
    for coeffs in [
        "[3.4445, -4.775, 2.0315]",
        "[1.5, -0.5, 0.0]",
        "[2.0, -1.5, 0.5]",
    ] {
        for steps in [1, 5, 100] {
            parse(&format!(
                r#"{{"kind":"muon","lr":0.02,"ns_steps":{steps},"ns_coefficients":{coeffs}}}"#
            ))
            .validate()
            .unwrap();
        }
    }
}
