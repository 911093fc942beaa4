//! The reference trainer and the spike lab, end to end (fast settings).

use keel::gpt::data::Dataset;
use keel::gpt::lab::{run_lab, Arm, LabOptions, Preset};
use keel::gpt::train::{TrainConfig, Trainer};
use keel::gpt::GptConfig;
use keel::OptimizerConfig;

#[test]
fn short_training_run_validation_loss_falls_below_2_5() {
    let data = Dataset::tiny_shakespeare(32).unwrap();
    let mut c = TrainConfig::new(GptConfig::new(65, 32, 2, 4, 64), 400);
    c.batch = 16;
    c.optimizer.set_lr(3e-3).unwrap();
    c.eval_batches = 8;
    let mut t = Trainer::new(c, &data).unwrap();
    let s = t.run(&data, None, |_| {}).unwrap();
    assert!(!s.non_finite);
    assert!(
        s.final_val_loss < 2.5,
        "final val loss {}",
        s.final_val_loss
    );
}

/// A config touching every piece of state a resume must restore: two
/// optimizers (Muon + AdamW), layer-wise lr decay, an EMA, accumulation,
/// ZClip's statistics (past its warm-up at the save) and a loss scaler's
/// scale (grown by then).
fn resume_config(steps: u64) -> TrainConfig {
    let mut c = TrainConfig::new(GptConfig::new(65, 16, 2, 2, 32), steps);
    c.batch = 4;
    c.warmup_steps = 4;
    c.grad_accum = 2;
    c.ema_decay = Some(0.9);
    c.layer_lr_decay = 0.8;
    c.zclip = Some(keel::guard::ZClipConfig {
        warmup_steps: 3,
        z_thresh: 1.0,
        ..Default::default()
    });
    c.fp16_grads = true;
    c.loss_scaler = Some(keel::guard::LossScalerConfig {
        init_scale: 1.0,
        growth_interval: 2,
        ..Default::default()
    });
    c.matrix_optimizer = Some(
        OptimizerConfig::from_json(
            r#"{"kind": "muon", "lr": 0.003, "adjust_lr": "match_rms_adamw"}"#,
        )
        .unwrap(),
    );
    c
}

#[test]
fn resume_continues_bit_exactly() {
    let data = Dataset::tiny_shakespeare(16).unwrap();
    let mut straight = Trainer::new(resume_config(12), &data).unwrap();
    straight.run(&data, None, |_| {}).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(resume_config(12), &data).unwrap();
    for _ in 0..6 {
        first.train_step(&data).unwrap();
    }
    first.save(dir.path(), &data).unwrap();
    drop(first);
    let mut resumed = Trainer::load(dir.path(), &data).unwrap();
    assert_eq!(resumed.step(), 6);
    resumed.run(&data, None, |_| {}).unwrap();

    for (a, b) in straight.params().iter().zip(resumed.params()) {
        let (a, b): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|x| x.to_bits()).collect(),
            b.iter().map(|x| x.to_bits()).collect(),
        );
        assert_eq!(a, b);
    }
    assert_eq!(
        straight.evaluate(&data).unwrap().to_bits(),
        resumed.evaluate(&data).unwrap().to_bits()
    );
}

/// A checkpoint folder with a truncated or mismatched file is an error that
/// names the file, never a panic or a half-loaded trainer; the intact folder
/// still loads.
#[test]
fn broken_checkpoints_are_errors_naming_the_file() {
    let data = Dataset::tiny_shakespeare(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(resume_config(4), &data).unwrap();
    t.train_step(&data).unwrap();
    t.save(dir.path(), &data).unwrap();
    for file in ["model.safetensors", "optimizer0.safetensors"] {
        let path = dir.path().join(file);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 7, 100, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let msg = match Trainer::load(dir.path(), &data) {
                Ok(_) => panic!("{file} cut at {cut} of {} loaded", bytes.len()),
                Err(e) => e.to_string(),
            };
            assert!(msg.contains(file), "{file} cut at {cut}: {msg}");
            assert!(msg.contains("truncated"), "{file} cut at {cut}: {msg}");
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    // A model file from a wider run names other optimizer files; without its
    // checksums (as files of older builds), the optimizer state no longer
    // fits. Either way the error names the optimizer's file.
    let other = dir.path().join("other");
    let mut wide = resume_config(4);
    wide.model = GptConfig::new(65, 16, 2, 2, 48);
    Trainer::new(wide, &data)
        .unwrap()
        .save(&other, &data)
        .unwrap();
    std::fs::copy(
        other.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let msg = Trainer::load(dir.path(), &data).err().unwrap().to_string();
    assert!(
        msg.contains("optimizer0.safetensors") && msg.contains("different checkpoints"),
        "{msg}"
    );
    let (mut header, body) =
        split_safetensors(&std::fs::read(other.join("model.safetensors")).unwrap());
    let meta = header["__metadata__"].as_object_mut().unwrap();
    for key in ["crc32", "tensor_crc32", "optimizer_crc32"] {
        meta.remove(key);
    }
    std::fs::write(
        dir.path().join("model.safetensors"),
        join_safetensors(&header, &body),
    )
    .unwrap();
    let msg = Trainer::load(dir.path(), &data).err().unwrap().to_string();
    assert!(
        msg.contains("optimizer0.safetensors") && msg.contains("does not match"),
        "{msg}"
    );
    // The intact files load.
    t.save(dir.path(), &data).unwrap();
    assert_eq!(Trainer::load(dir.path(), &data).unwrap().step(), 1);
}

/// The header of safetensors `bytes`, as JSON, and the data after it.
fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Safetensors bytes of `header` and `data`.
fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// The model file checks itself: a flipped tensor byte, an edited metadata
/// value, and an optimizer file of another checkpoint are each refused,
/// naming the file; a file without checksums (an older keel) still loads,
/// but not with a vocabulary that does not fit its model.
#[test]
fn model_files_carry_checksums_and_name_their_optimizer_files() {
    let data = Dataset::tiny_shakespeare(16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    let mut t = Trainer::new(resume_config(4), &data).unwrap();
    t.train_step(&data).unwrap();
    t.save(dir.path(), &data).unwrap();
    let step1_optimizer = std::fs::read(dir.path().join("optimizer0.safetensors")).unwrap();
    t.train_step(&data).unwrap();
    t.save(dir.path(), &data).unwrap();
    let good = std::fs::read(&model).unwrap();
    let load_err = || match Trainer::load(dir.path(), &data) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };

    // Every tensor is checked: flip one bit at the start, middle and end
    // of the data.
    let (header, body) = split_safetensors(&good);
    let data_start = good.len() - body.len();
    for at in [data_start, (data_start + good.len()) / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x08;
        std::fs::write(&model, &bad).unwrap();
        let msg = load_err();
        assert!(
            msg.contains("model.safetensors") && msg.contains("checksum mismatch in `"),
            "byte {at}: {msg}"
        );
    }

    // The metadata is checked: a changed step count.
    let mut edited = header.clone();
    edited["__metadata__"]["step"] = "7".into();
    std::fs::write(&model, join_safetensors(&edited, &body)).unwrap();
    let msg = load_err();
    assert!(msg.contains("metadata checksum mismatch"), "{msg}");

    // A model file missing one of its checksum keys is damaged, not old.
    for key in ["crc32", "tensor_crc32", "optimizer_crc32"] {
        let mut partial = header.clone();
        partial["__metadata__"].as_object_mut().unwrap().remove(key);
        std::fs::write(&model, join_safetensors(&partial, &body)).unwrap();
        let msg = load_err();
        assert!(msg.contains("checksums are incomplete"), "{key}: {msg}");
    }

    // The optimizer file of the step-1 checkpoint next to the step-2 model.
    let mismatch = |msg: &str| {
        msg.contains("optimizer0.safetensors")
            && msg.contains("is not the optimizer file")
            && msg.contains("different checkpoints")
    };
    std::fs::write(&model, &good).unwrap();
    std::fs::write(dir.path().join("optimizer0.safetensors"), &step1_optimizer).unwrap();
    let msg = load_err();
    assert!(mismatch(&msg), "{msg}");
    // And one at the same step count but of another run (as a rollback can
    // repeat a step count): checksums tell them apart.
    let other = tempfile::tempdir().unwrap();
    let mut config = resume_config(4);
    config.seed += 1;
    let mut u = Trainer::new(config, &data).unwrap();
    u.train_step(&data).unwrap();
    u.train_step(&data).unwrap();
    u.save(other.path(), &data).unwrap();
    std::fs::copy(
        other.path().join("optimizer0.safetensors"),
        dir.path().join("optimizer0.safetensors"),
    )
    .unwrap();
    let msg = load_err();
    assert!(mismatch(&msg), "{msg}");
    t.save(dir.path(), &data).unwrap();
    assert_eq!(Trainer::load(dir.path(), &data).unwrap().step(), 2);

    // A file without checksums loads (as files of older builds do) ...
    let mut old = header.clone();
    let meta = old["__metadata__"].as_object_mut().unwrap();
    for key in ["crc32", "tensor_crc32", "optimizer_crc32"] {
        assert!(meta.remove(key).is_some(), "{key}");
    }
    std::fs::write(&model, join_safetensors(&old, &body)).unwrap();
    let resumed = Trainer::load(dir.path(), &data).unwrap();
    assert_eq!(resumed.step(), 2);
    assert_eq!(resumed.params(), t.params());
    // ... but a vocabulary shorter than its model's is refused, not indexed.
    old["__metadata__"]["vocab"] = "abc".into();
    std::fs::write(&model, join_safetensors(&old, &body)).unwrap();
    let msg = match keel::gpt::train::ModelCheckpoint::read(dir.path()) {
        Ok(_) => panic!("a 3-character vocabulary for 65 tokens was read"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("vocabulary has 3 characters, its model 65 tokens"),
        "{msg}"
    );
}

#[test]
fn spike_lab_smoke_writes_report_plots_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lab");
    let r = run_lab(&LabOptions {
        preset: Preset::Smoke,
        out: Some(out.clone()),
        ..LabOptions::default()
    })
    .unwrap();
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for arm in Arm::ALL {
        assert!(report.contains(arm.name()), "{} missing", arm.name());
        let metrics = out
            .join(format!("{}-seed0", arm.name().replace('+', "_")))
            .join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for key in [
            "loss",
            "grad_norm",
            "update_ratio",
            "grad_cos",
            "max_attn_logit",
        ] {
            assert!(first.get(key).is_some(), "{key} missing in {metrics:?}");
        }
    }
    assert!(report.contains("plain AdamW"));
    // The folder the report gives as its example is one the lab wrote.
    let example = report
        .split("(e.g. `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("the report names an example run folder");
    assert_eq!(example, "adamw_clip1-seed0/");
    assert!(out.join(example).join("metrics.jsonl").is_file());
    for f in ["loss_curves.svg", "loss_curves.png"] {
        assert!(std::fs::metadata(out.join(f)).unwrap().len() > 0, "{f}");
    }
    assert_eq!(r.rows.len(), Arm::ALL.len());
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let missing = std::path::Path::new("/nonexistent/keel-data.txt");
    let e = run_lab(&LabOptions {
        preset: Preset::Smoke,
        data: Some(missing.into()),
        out: Some(tempfile::tempdir().unwrap().path().join("x")),
        ..LabOptions::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("keel-data.txt"), "{e}");
    let e = run_lab(&LabOptions {
        seeds: Some(0),
        ..LabOptions::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("--seeds"), "{e}");
    let short = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(short.path(), "abc").unwrap();
    assert!(Dataset::from_file(short.path(), 16).is_err());
    let mut c = TrainConfig::new(GptConfig::new(65, 16, 1, 1, 8), 10);
    c.batch = 0;
    let e = Trainer::new(c, &Dataset::tiny_shakespeare(16).unwrap())
        .err()
        .unwrap();
    assert!(e.to_string().contains("batch"), "{e}");

    // A model no machine holds (2^16 wide, 64 blocks: 3.3e12 parameters) is
    // an error before anything is allocated, not an abort (the check reads
    // /proc/meminfo, so Linux only).
    #[cfg(target_os = "linux")]
    {
        let mut c = TrainConfig::new(GptConfig::new(65, 16, 64, 1, 1 << 16), 10);
        c.warmup_steps = 0;
        let e = Trainer::new(c, &Dataset::tiny_shakespeare(16).unwrap())
            .err()
            .unwrap();
        assert!(matches!(e, keel::KeelError::Memory { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("not enough memory for this training run"),
            "{e}"
        );
        assert!(e.to_string().contains("TiB"), "{e}");
    }

    // A misspelt model key is an error naming it, not a silent default.
    let toml = tempfile::NamedTempFile::new().unwrap();
    let text = "steps = 10\n[optimizer]\nkind = \"adamw\"\nlr = 0.001\n\
        [model]\nvocab_size = 65\nblock_size = 16\nn_layer = 1\nn_head = 1\nn_embd = 8\nqk_norms = true\n";
    std::fs::write(toml.path(), text).unwrap();
    let e = TrainConfig::from_toml_file(toml.path()).unwrap_err();
    assert!(e.to_string().contains("qk_norms"), "{e}");
    std::fs::write(toml.path(), text.replace("qk_norms", "qk_norm")).unwrap();
    assert!(
        TrainConfig::from_toml_file(toml.path())
            .unwrap()
            .model
            .qk_norm
    );
}

/// A cosine decay that ends above its peak (or below zero) is refused by
/// name.
#[test]
fn final_lr_frac_lies_in_the_unit_interval() {
    for bad in [2.0, -0.1, f64::NAN] {
        let mut c = resume_config(4);
        c.final_lr_frac = bad;
        match c.validate() {
            Err(keel::KeelError::Config { field, .. }) => assert_eq!(field, "final_lr_frac"),
            other => panic!("final_lr_frac {bad}: {other:?}"),
        }
    }
    for good in [0.0, 0.1, 1.0] {
        let mut c = resume_config(4);
        c.final_lr_frac = good;
        c.validate().unwrap();
    }
}

/// An outlier batch at or past the last step would never be injected: a
/// fresh run refuses it by its index (the last step itself is fine), and a
/// stress names its own list. `validate` leaves it alone, since a run's step
/// count may still change (a config file before `--steps`, a resume).
#[test]
fn outliers_past_the_last_step_are_refused() {
    use keel::gpt::train::{Outlier, OutlierKind, Stress};
    let at = |step| Outlier {
        step,
        kind: OutlierKind::GradX100,
    };
    let field = |r: keel::Result<()>| match r {
        Err(keel::KeelError::Config { field, message }) => {
            assert!(message.contains("0..4"), "{message}");
            field
        }
        other => panic!("an outlier at step 4 of 4: {other:?}"),
    };
    let data = Dataset::tiny_shakespeare(16).unwrap();
    let mut c = resume_config(4);
    c.outliers = vec![at(1), at(3)];
    Trainer::new(c.clone(), &data).unwrap();
    c.outliers = vec![at(1), at(4)];
    c.validate().unwrap();
    assert_eq!(
        field(Trainer::new(c, &data).map(|_| ())),
        "outliers[1].step"
    );
    let stress = Stress {
        outliers: vec![at(4)],
        ..Stress::default()
    };
    assert_eq!(
        field(stress.apply(&mut resume_config(4))),
        "stress.outliers[0].step"
    );
}

/// Settings that used to fail late, or change the config while failing,
/// are refused up front and leave everything as it was.
#[test]
fn late_failures_are_refused_up_front() {
    use keel::gpt::train::Stress;
    use keel::guard::LossScalerConfig;
    // A validation split shorter than the context: refused by `Trainer::new`,
    // not at the first evaluation after every step was trained.
    let small = Dataset::from_text(&keel::gpt::data::TINY_SHAKESPEARE[..400], 16).unwrap();
    let mut c = TrainConfig::new(GptConfig::new(0, 64, 1, 2, 8), 3);
    c.warmup_steps = 0;
    let e = Trainer::new(c.clone(), &small).err().unwrap().to_string();
    assert!(
        e.contains("`model.block_size`") && e.contains("validation split has 40 tokens"),
        "{e}"
    );

    // A failed `set_steps` keeps the step count and schedule.
    let data = Dataset::tiny_shakespeare(16).unwrap();
    let mut c = TrainConfig::new(GptConfig::new(65, 16, 1, 2, 8), 30);
    c.warmup_steps = 10;
    let mut t = Trainer::new(c.clone(), &data).unwrap();
    assert!(t.set_steps(5).is_err());
    assert_eq!(t.config().steps, 30);
    t.set_steps(40).unwrap();
    assert_eq!(t.config().steps, 40);

    // A loss scaler without f16 gradients would do nothing.
    let mut scaled = c.clone();
    scaled.loss_scaler = Some(LossScalerConfig::default());
    let e = scaled.validate().unwrap_err().to_string();
    assert!(
        e.contains("`loss_scaler`") && e.contains("fp16_grads"),
        "{e}"
    );
    scaled.fp16_grads = true;
    scaled.validate().unwrap();

    // A stress refused at its last check leaves the config untouched.
    let stress = Stress {
        lr_mult: 2.0,
        warmup_steps: Some(100),
        ..Stress::default()
    };
    let mut target = c.clone();
    assert!(stress.apply(&mut target).is_err());
    assert_eq!(target, c);

    // Evaluation batches are counted in the memory check: 2^40 of them
    // (2^40 x 16 x 16 x 8 bytes) are refused before training.
    #[cfg(target_os = "linux")]
    {
        let mut many = c.clone();
        many.eval_batches = 1 << 40;
        let e = Trainer::new(many, &data).err().unwrap();
        assert!(matches!(e, keel::KeelError::Memory { .. }), "{e:?}");
    }
}
