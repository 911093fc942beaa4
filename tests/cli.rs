//! The `keel` binary answers bad sizes and flags with an error line and exit
//! status 2, not an abort, an out-of-memory kill or a silent default.

use std::process::Command;

/// Runs `keel` with the whitespace-separated words of `command_line`;
/// returns the exit status and stderr.
fn keel(command_line: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(command_line.split_whitespace())
        .output()
        .expect("the keel binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_refused(command_line: &str, needles: &[&str]) {
    let (code, stderr) = keel(command_line);
    assert_eq!(code, Some(2), "keel {command_line}: {stderr}");
    assert!(
        stderr.starts_with("error: "),
        "keel {command_line}: {stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "keel {command_line}: {stderr:?} lacks {n:?}"
        );
    }
}

/// The memory checks read /proc/meminfo. Runs that get past their check
/// would fail on the missing output folder, never write.
#[cfg(target_os = "linux")]
#[test]
fn runs_larger_than_memory_are_refused_up_front() {
    // 10^14 AdamW parameters: 2.1 PiB with the floor loop's buffers.
    assert_refused(
        "bench --optimizer adamw --params 100000000000000 --steps 2",
        &[
            "not enough memory for a benchmark of 100000000000000 parameters",
            "PiB",
            "available",
        ],
    );
    // 10^5 x 10^4 positions: the attention probabilities alone are TiBs.
    assert_refused(
        "bench-gpt --batch 100000 --seq-len 10000 --steps 1",
        &[
            "not enough memory for a GPT step at batch 100000 x 10000 tokens",
            "TiB",
        ],
    );
    assert_refused(
        "train --n-embd 200000 --n-layer 8 --steps 1 --warmup 0 --out /nonexistent/keel-cli",
        &["not enough memory for this training run", "TiB"],
    );
}

#[test]
fn bad_counts_name_the_flag() {
    assert_refused(
        "bench-gpt --steps 0",
        &["`--steps`: must be in 1..=1000000, got 0"],
    );
    assert_refused(
        "bench --optimizer adamw --params 10 --steps 0",
        &["`--steps`: must be in 1..=1000000, got 0"],
    );
    // Each timed step's time is kept: a count past any useful median is
    // refused before anything is allocated.
    assert_refused(
        "bench --optimizer adamw --params 10 --steps 18446744073709551615",
        &["`--steps`: must be in 1..=1000000, got 18446744073709551615"],
    );
    assert_refused(
        "bench --model gpt-small --optimizer soap --steps 4000000000",
        &["`--steps`: must be in 1..=1000000"],
    );
    assert_refused(
        "bench-gpt --steps 4000000000",
        &["`--steps`: must be in 1..=1000000, got 4000000000"],
    );
    for threads in ["0", "100000"] {
        assert_refused(
            &format!("bench --optimizer adamw --params 10 --steps 1 --threads {threads}"),
            &["`--threads`", "is not in 1..=1024"],
        );
    }
    assert_refused(
        "spike-lab --seeds 18446744073709551615 --out /nonexistent/keel-cli",
        &["`--seeds`: must be in 1..=1000, got 18446744073709551615"],
    );
    assert_refused(
        "spike-lab --arms adamw,lamb,adamw --out /nonexistent/keel-cli",
        &["`--arms`: names `adamw` twice"],
    );
    // The library's own field names become the flags that set them.
    assert_refused(
        "bench --optimizer adamw --params 10 --tensors 11 --steps 1",
        &["`--params, --tensors`: need 0 < tensors <= params, got 11 tensors, 10 params"],
    );
    assert_refused(
        "bench --optimizer shampoo --params 1000 --steps 1",
        &["`--params`: shampoo times matrices of"],
    );
    assert_refused(
        "bench-gpt --seq-len 0",
        &["`--seq-len`: must be at least 1"],
    );
    assert_refused("bench-gpt --batch 0", &["`--batch`: must be at least 1"]);
    assert_refused(
        "train --lr NaN --steps 2 --warmup 0 --out /nonexistent/keel-cli",
        &["`--lr`: must be finite and >= 0, got NaN (as `adamw.lr`)"],
    );
    // `train`'s flags name themselves too (the library says `block_size`,
    // `batch`, ...), and the model's fixed head count is explained.
    for (flags, needle) in [
        ("--seq-len 0", "`--seq-len`: must be at least 1"),
        ("--batch 0", "`--batch`: must be at least 1"),
        ("--grad-accum 0", "`--grad-accum`: must be at least 1"),
        ("--ema 1", "`--ema`: must lie in [0, 1), got 1"),
        ("--clip 0", "`--clip`: must be finite and > 0, got 0"),
        (
            "--warmup 5 --steps 3",
            "`--warmup`: 5 is longer than steps 3",
        ),
        (
            "--n-embd 15",
            "`--n-embd`: 15 is not divisible by n_head = 4 (the heads of the flags' \
             model; a --config file sets n_head)",
        ),
    ] {
        assert_refused(
            &format!("train {flags} --out /nonexistent/keel-cli"),
            &[needle],
        );
    }
    assert_refused(
        "bench --optimizer adamw --params 10 --steps 1 --warmup 100000000",
        &["`--warmup`: must be at most 1000000, got 100000000"],
    );
    assert_refused(
        "bench-gpt --warmup 100000000",
        &["`--warmup`: must be at most 1000000, got 100000000"],
    );
    assert_refused(
        "spike-lab --lr-mult 1e300 --out /nonexistent/keel-cli",
        &["`--lr-mult`", "(as `adamw.lr`)"],
    );
    assert_refused(
        "spike-lab --stress /nonexistent/keel-stress.toml --out /nonexistent/keel-cli",
        &["`--stress`: /nonexistent/keel-stress.toml"],
    );
    assert_refused("bench --config {bad", &["`--config`"]);
    // A spike lab too short for the detector to judge any step.
    assert_refused(
        "spike-lab --steps 119 --out /nonexistent/keel-cli",
        &[
            "`--steps`: must be at least 120, got 119",
            "100-step warm-up",
        ],
    );
}

/// `--config` replaces `--optimizer` in `bench`: both together are refused
/// (clap's conflict, status 2), not one silently dropped.
#[test]
fn bench_refuses_an_optimizer_and_a_config_together() {
    let (code, stderr) =
        keel(r#"bench --optimizer lion --config {"kind":"sgd","lr":0.1} --params 10 --steps 1"#);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--config") && stderr.contains("--optimizer"),
        "{stderr}"
    );
}

/// A negative number is a value, not a flag: it reaches keel's own checks,
/// which name the field, instead of clap's "unexpected argument '-1'".
#[test]
fn negative_values_reach_the_field_checks() {
    // A refused lab leaves no output folder.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lab");
    assert_refused(
        &format!("spike-lab --lr-mult -1 --out {}", out.display()),
        &["`--lr-mult`: must be finite and > 0, got -1"],
    );
    assert!(!out.exists());
    // From a stress file, the error names the file's key.
    let stress = dir.path().join("stress.toml");
    std::fs::write(&stress, "lr_mult = -2.0\n").unwrap();
    assert_refused(
        &format!(
            "spike-lab --stress {} --out {}",
            stress.display(),
            out.display()
        ),
        &["`stress.lr_mult`: must be finite and > 0, got -2"],
    );
    assert!(!out.exists());
    assert_refused(
        "train --lr -0.5 --steps 2 --warmup 0 --out /nonexistent/keel-cli",
        &["`--lr`: must be finite and >= 0, got -0.5"],
    );
}

/// A failing standard output is an error line and status 2, not a panic
/// (status 101).
#[cfg(target_os = "linux")]
#[test]
fn a_full_standard_output_is_an_error_not_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["conformance", "tests/data/conformance"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .expect("the keel binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: cannot write to standard output"),
        "{stderr}"
    );
}

/// Runs `keel` with `args`; panics with its stderr unless it succeeds.
fn keel_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .output()
        .expect("the keel binary runs");
    assert!(
        out.status.success(),
        "keel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny `keel train` run (one layer, 16 wide, context 16) into `out`,
/// with `extra` flags.
fn train_tiny(out: &str, steps: &str, warmup: &str, extra: &[&str]) {
    let mut args = vec![
        "train",
        "--steps",
        steps,
        "--warmup",
        warmup,
        "--seq-len",
        "16",
        "--n-embd",
        "16",
        "--n-layer",
        "1",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    keel_ok(&args);
}

/// The steps recorded in a metrics.jsonl.
fn recorded_steps(metrics: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// `--resume` takes the checkpoint's config (here a context of 16 that the
/// flags do not repeat), refuses a step count it has already reached, and
/// cuts metrics.jsonl back to the checkpoint, so records a killed run wrote
/// after its last checkpoint are not repeated.
#[test]
fn resuming_continues_the_checkpointed_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    train_tiny(out_s, "8", "2", &[]);
    let metrics = out.join("metrics.jsonl");
    assert_eq!(recorded_steps(&metrics), (0..8).collect::<Vec<_>>());
    // A run killed after its checkpoint at step 8 had written steps 8 and 9.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last = text.lines().last().unwrap();
    let mut extra = String::new();
    for step in [8, 9] {
        let mut v: serde_json::Value = serde_json::from_str(last).unwrap();
        v["step"] = step.into();
        extra.push_str(&format!("{v}\n"));
    }
    std::fs::write(&metrics, text + &extra).unwrap();
    for steps in ["8", "5"] {
        assert_refused(
            &format!("train --resume --steps {steps} --out {out_s}"),
            &["`--steps`: the checkpoint is at step 8"],
        );
    }
    keel_ok(&["train", "--resume", "--steps", "12", "--out", out_s]);
    assert_eq!(recorded_steps(&metrics), (0..12).collect::<Vec<_>>());
    // A finished run has nothing to resume without more steps.
    assert_refused(
        &format!("train --resume --out {out_s}"),
        &["`--steps`: the checkpoint's run is complete (12 of 12 steps)"],
    );
    // A new run into the folder must say it replaces the old one.
    assert_refused(
        &format!("train --steps 4 --warmup 1 --out {out_s}"),
        &["`--out`", "holds a run", "--resume", "--overwrite"],
    );
    assert_eq!(recorded_steps(&metrics).len(), 12, "a refused run wrote");
    train_tiny(out_s, "4", "1", &["--overwrite"]);
    assert_eq!(recorded_steps(&metrics), (0..4).collect::<Vec<_>>());
    keel_ok(&["train", "--resume", "--steps", "6", "--out", out_s]);
    assert_eq!(recorded_steps(&metrics), (0..6).collect::<Vec<_>>());
}

/// A checkpoint location that cannot work is refused before the first step,
/// and a default warmup longer than the run names the flag to pass.
#[test]
fn train_refuses_what_would_fail_later() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("checkpoint"), "").unwrap();
    let out = dir.path().to_str().unwrap();
    assert_refused(
        &format!("train --steps 2 --warmup 1 --out {out}"),
        &["`--out`", "checkpoint is a file"],
    );
    assert!(!dir.path().join("metrics.jsonl").exists());
    assert_refused(
        &format!("train --steps 5 --out {out}/new"),
        &["`--warmup`: the warmup (20 steps by default) is longer than the run (5 steps)"],
    );
    assert!(
        !dir.path().join("new").exists(),
        "a refused run left a folder"
    );
}

/// `sample` streams: a practically endless `--chars` shows text at once,
/// in bounded memory, and ends with status 141 when the reader goes away
/// (as `keel sample ... | head` does), not with a panic.
#[test]
fn sample_streams_and_stops_when_the_reader_goes() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train_tiny(out.to_str().unwrap(), "2", "1", &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["sample", out.join("checkpoint").to_str().unwrap()])
        .args(["--chars", "18446744073709551615"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe is closed here; the next write fails.
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `--optimizer` replaces the config file's optimizers as its help says,
/// keeping the settings every kind has: `muon` is Muon on the matrices and
/// AdamW on the rest, any other kind covers every tensor.
#[test]
fn the_optimizer_flag_keeps_the_shared_settings() {
    use keel::gpt::train::ModelCheckpoint;
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        r#"
steps = 2
warmup_steps = 1
batch = 2
# No vocab_size: the data sets it.
[model]
block_size = 16
n_layer = 1
n_head = 2
n_embd = 16
[optimizer]
kind = "lamb"
lr = 0.003
clip_global_norm = 1.0
on_nonfinite = "error"
[matrix_optimizer]
kind = "muon"
lr = 0.003
"#,
    )
    .unwrap();
    let out = dir.path().join("run");
    let run = |kind: &str| {
        keel_ok(&[
            "train",
            "--config",
            toml.to_str().unwrap(),
            "--optimizer",
            kind,
            "--out",
            out.to_str().unwrap(),
            "--overwrite",
        ]);
        ModelCheckpoint::read(&out.join("checkpoint"))
            .unwrap()
            .config
    };
    let c = run("muon");
    let m = c.matrix_optimizer.as_ref().unwrap();
    assert_eq!((c.optimizer.kind.name(), m.kind.name()), ("adamw", "muon"));
    for o in [&c.optimizer, m] {
        assert_eq!(o.clip_global_norm, Some(1.0), "{o:?}");
        assert_eq!(o.on_nonfinite, keel::NonFinitePolicy::Error, "{o:?}");
        assert_eq!(o.lr(), 0.003, "{o:?}");
    }
    let c = run("lion");
    assert_eq!(c.optimizer.kind.name(), "lion");
    assert!(c.matrix_optimizer.is_none(), "{:?}", c.matrix_optimizer);
    assert_eq!(c.optimizer.clip_global_norm, Some(1.0));
}

/// Cutting metrics.jsonl back on `--resume` rewrites it whenever a line is
/// dropped, even when the kept text happens to be as long as before (a
/// blank line dropped, a last line missing its newline).
#[test]
fn resuming_rewrites_metrics_whenever_a_line_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    train_tiny(out_s, "1", "1", &[]);
    let metrics = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line = text.trim_end();
    std::fs::write(&metrics, format!("\n{line}")).unwrap();
    keel_ok(&["train", "--resume", "--steps", "2", "--out", out_s]);
    assert_eq!(recorded_steps(&metrics), [0, 1]);
}

/// A config file is checked once the flags are in: its outlier batch and its
/// warmup past the file's own `steps` are fine when `--steps` extends the run
/// (and the outlier is injected), and an outlier the run would never reach
/// is refused by the field it came from.
#[test]
fn outliers_are_checked_against_the_final_step_count() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        r#"
steps = 2
warmup_steps = 3
batch = 2
outliers = [{step = 3, kind = "grad_x100"}]
[model]
block_size = 16
n_layer = 1
n_head = 2
n_embd = 16
[optimizer]
kind = "adamw"
lr = 0.003
"#,
    )
    .unwrap();
    let stress = dir.path().join("stress.toml");
    std::fs::write(
        &stress,
        "outliers = [{step = 4, kind = \"repeated_char\"}]\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let (toml_s, stress_s, out_s) = (
        toml.to_str().unwrap(),
        stress.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    assert_refused(
        &format!("train --config {toml_s} --steps 3 --out {out_s}"),
        &["`outliers[0].step`: 3 is past the last step (the run's steps are 0..3)"],
    );
    assert_refused(
        &format!("train --config {toml_s} --steps 4 --stress {stress_s} --out {out_s}"),
        &["`stress.outliers[0].step`: 4 is past the last step (the run's steps are 0..4)"],
    );
    assert!(!out.exists(), "a refused run wrote");
    keel_ok(&[
        "train", "--config", toml_s, "--steps", "5", "--stress", stress_s, "--out", out_s,
    ]);
    let outliers: Vec<(u64, String)> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let kind = v["outlier"].as_str()?.to_string();
            Some((v["step"].as_u64().unwrap(), kind))
        })
        .collect();
    assert_eq!(
        outliers,
        [
            (3, "grad_x100".to_string()),
            (4, "repeated_char".to_string())
        ]
    );
}

/// Runs `keel` with `args`; panics with its stderr unless it succeeds, and
/// returns stdout and stderr.
fn keel_output(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .output()
        .expect("the keel binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "keel {args:?}: {stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// Ctrl-C (SIGINT) stops `keel train` after the step in flight with a
/// checkpoint of exactly the steps in metrics.jsonl, and status 130; the
/// folder then names `--resume`, which continues the run. A folder with
/// metrics but no checkpoint says there is nothing to resume.
#[cfg(unix)]
#[test]
fn an_interrupted_run_saves_a_checkpoint_to_resume_from() {
    use keel::gpt::train::ModelCheckpoint;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "train",
            "--steps",
            "1000000",
            "--warmup",
            "1",
            "--seq-len",
            "16",
        ])
        .args(["--n-embd", "16", "--n-layer", "1", "--out", out_s])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "no steps recorded");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's pid, which it still holds (not reaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("continue with --resume"), "{stderr}");
    let at = ModelCheckpoint::read(&out.join("checkpoint")).unwrap().step;
    assert_eq!(recorded_steps(&metrics), (0..at).collect::<Vec<_>>());
    assert_refused(
        &format!("train --steps 4 --warmup 1 --out {out_s}"),
        &["`--out`", "its checkpoint is in", "--resume"],
    );
    // A longer run stretches the schedule, and says so.
    let more = (at + 2).to_string();
    let (_, stderr) = keel_output(&["train", "--resume", "--steps", &more, "--out", out_s]);
    assert!(
        stderr.contains(&format!("note: the lr schedule now spans {more} steps")),
        "{stderr}"
    );
    assert_eq!(recorded_steps(&metrics), (0..at + 2).collect::<Vec<_>>());

    // Metrics of a run that never saved: no `--resume` to offer.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("metrics.jsonl"), "").unwrap();
    let bare_s = bare.to_str().unwrap();
    assert_refused(
        &format!("train --steps 4 --warmup 1 --out {bare_s}"),
        &["stopped before saving a checkpoint", "--overwrite"],
    );
    assert_refused(
        &format!("train --resume --out {bare_s}"),
        &["`--resume`", "holds no checkpoint", "--overwrite"],
    );
}

/// `keel train` names the per-tensor entries of metrics.jsonl in
/// tensors.json, `sample` takes the run folder or the model file as well as
/// the checkpoint folder, and `--optimizer` naming the config's own kind
/// keeps its settings.
#[test]
fn train_writes_its_tensor_names_and_sample_finds_the_checkpoint() {
    use keel::gpt::train::ModelCheckpoint;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    train_tiny(out_s, "2", "1", &[]);
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(out.join("tensors.json")).unwrap()).unwrap();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["tensor_grad_norm"].as_array().unwrap().len(),
        names.len()
    );
    let ckpt = out.join("checkpoint");
    let model =
        keel::gpt::Gpt::<f32>::new(ModelCheckpoint::read(&ckpt).unwrap().config.model).unwrap();
    let want: Vec<String> = model.param_specs().into_iter().map(|s| s.name).collect();
    assert_eq!(names, want);

    let sample = |path: &std::path::Path| {
        keel_output(&[
            "sample",
            path.to_str().unwrap(),
            "--chars",
            "20",
            "--seed",
            "3",
        ])
        .0
    };
    let text = sample(&ckpt);
    assert_eq!(sample(&out), text);
    assert_eq!(sample(&ckpt.join("model.safetensors")), text);

    // The default optimizer is AdamW (beta2 0.95, weight decay 0.1): naming
    // it changes nothing.
    let named = dir.path().join("named");
    train_tiny(named.to_str().unwrap(), "2", "1", &["--optimizer", "adamw"]);
    let config = |run: &std::path::Path| {
        ModelCheckpoint::read(&run.join("checkpoint"))
            .unwrap()
            .config
            .optimizer
    };
    assert_eq!(config(&named), config(&out));
}

/// A config file's `vocab_size` that the data contradicts is refused (it
/// used to be replaced silently), and a run that blew up says so.
#[test]
fn train_flags_a_contradicting_vocabulary_and_a_diverged_run() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    let body = "steps = 3\nbatch = 2\n[model]\nvocab_size = 30\nblock_size = 16\n\
                n_layer = 1\nn_head = 2\nn_embd = 16\n[optimizer]\nkind = \"adamw\"\nlr = 0.001\n";
    std::fs::write(&toml, body).unwrap();
    let out = dir.path().join("run");
    assert_refused(
        &format!("train --config {} --out {}", toml.display(), out.display()),
        &["`model.vocab_size`: 30, but the data has 65 distinct characters"],
    );
    let (stdout, stderr) = keel_output(&[
        "train",
        "--optimizer",
        "sgd",
        "--lr",
        "1000",
        "--steps",
        "30",
        "--warmup",
        "1",
        "--seq-len",
        "16",
        "--n-embd",
        "16",
        "--n-layer",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stdout.contains("30 steps, final val loss"), "{stdout}");
    assert!(
        stderr.contains("of the 30 steps of this run changed nothing"),
        "{stderr}"
    );
    assert!(
        stderr.contains("worse than a uniform guess (ln 65"),
        "{stderr}"
    );
}

/// A spike lab into a folder that holds an earlier one (its report) replaces
/// that lab's files (a run folder of an arm not run now, a heatmap not drawn
/// now) and nothing else; arms may be listed with spaces; a report without plain
/// AdamW says so; and the preset's outliers past `--steps` are named.
#[test]
fn spike_lab_replaces_an_earlier_lab_and_reports_what_it_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lab");
    for run in ["adamw-seed0", "shampoo-seed0", "L2C64-lamb-seed1"] {
        std::fs::create_dir_all(out.join(run)).unwrap();
        std::fs::write(out.join(run).join("metrics.jsonl"), "{}\n").unwrap();
    }
    std::fs::write(out.join("shampoo-seed0").join("mine.txt"), "keep").unwrap();
    std::fs::write(out.join("update_ratio_heatmap.png"), "old").unwrap();
    std::fs::write(out.join("notes.txt"), "keep").unwrap();
    std::fs::write(out.join("report.md"), "# keel spike lab: preset `smoke`\n").unwrap();
    let lab = |out: &std::path::Path| {
        keel_output(&[
            "spike-lab",
            "--preset",
            "smoke",
            "--steps",
            "120",
            "--arms",
            "lamb, adamw+clip1",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    lab(&out);
    let mut left: Vec<String> = walk(&out);
    left.sort();
    assert_eq!(
        left,
        [
            "adamw_clip1-seed0/metrics.jsonl",
            "adamw_clip1-seed0/tensors.json",
            "lamb-seed0/metrics.jsonl",
            "lamb-seed0/tensors.json",
            "loss_curves.png",
            "loss_curves.svg",
            "notes.txt",
            "report.md",
            "shampoo-seed0/mine.txt",
        ]
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    // Without an earlier lab's report, a folder's run-like folders are not
    // the lab's to remove.
    let other = dir.path().join("other");
    std::fs::create_dir_all(other.join("adamw-seed0")).unwrap();
    std::fs::write(other.join("adamw-seed0").join("metrics.jsonl"), "{}\n").unwrap();
    lab(&other);
    assert!(other.join("adamw-seed0").join("metrics.jsonl").is_file());
    for needle in [
        "Plain AdamW was not among the arms: nothing to compare with.",
        "Plain AdamW was not among the arms: no heatmap.",
        "The preset's outlier batches at or past step 120 were left out: GradX100 at 120.",
        "no outlier batches.",
    ] {
        assert!(report.contains(needle), "{needle:?} missing:\n{report}");
    }
}

/// The files under `dir`, as paths relative to it.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            found.extend(walk(&path).into_iter().map(|f| format!("{name}/{f}")));
        } else {
            found.push(name);
        }
    }
    found
}

/// `train --data` takes any text's vocabulary (the flags' model has none
/// of its own), and `sample` decodes with it.
#[test]
fn train_takes_the_vocabulary_of_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("abc.txt");
    let body: String = (0..3000).map(|i| ["ab ", "ca\n", "bba "][i % 3]).collect();
    std::fs::write(&text, body).unwrap();
    let out = dir.path().join("run");
    train_tiny(
        out.to_str().unwrap(),
        "2",
        "1",
        &["--data", text.to_str().unwrap()],
    );
    let ckpt = keel::gpt::train::ModelCheckpoint::read(&out.join("checkpoint")).unwrap();
    assert_eq!(ckpt.config.model.vocab_size, 5);
    let (sampled, _) = keel_output(&["sample", out.to_str().unwrap(), "--chars", "30"]);
    assert!(sampled.chars().all(|c| "abc \n".contains(c)), "{sampled:?}");
}
