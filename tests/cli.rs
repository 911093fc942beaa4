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
