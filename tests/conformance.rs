//! Every public reference case (torch, optax; float64) replayed in f64 and f32.

use std::path::{Path, PathBuf};

use keel::conformance::{self, Backend};

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance")
}

#[test]
fn every_case_passes_in_f64_and_f32() {
    let results = conformance::run_paths(&[case_dir()]).unwrap();
    // 12 public cases of eight kinds, two backends each.
    assert_eq!(results.len(), 24);
    let kinds: std::collections::BTreeSet<&str> = results.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["adam", "adamw", "lamb", "lars", "lion", "muon", "sgd", "shampoo"]
    );
    for r in &results {
        assert!(
            r.passed,
            "{} on {}: worst relative error {:e} > {:e} ({})",
            r.id, r.backend, r.worst_rel_err, r.tolerance, r.reason
        );
        assert!(r.worst_rel_err.is_finite());
        // f64 must be far tighter than its tolerance, f32 within its own.
        // (Shampoo's reference keeps lr in float32: ~1e-8 differences.)
        if r.backend == Backend::CpuF64.name() && r.kind != "shampoo" {
            assert!(r.worst_rel_err < 1e-12, "{}: {:e}", r.id, r.worst_rel_err);
        }
    }
}

#[test]
fn a_perturbed_expectation_fails() {
    // The checker must be able to fail: shift one expected value.
    let path = case_dir().join("adamw_torch_public.json");
    let mut case = conformance::load_case(&path).unwrap();
    case.steps[2].params_after[1][0] += 1e-3;
    let r = conformance::run_case(&path, &case, Backend::CpuF64);
    assert!(!r.passed);
    assert!(r.worst_rel_err > 1e-5);
}

#[test]
fn unknown_kind_is_a_failed_row_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(case_dir().join("adamw_torch_public.json")).unwrap();
    let mut case: serde_json::Value = serde_json::from_str(&text).unwrap();
    case["optimizer"]["kind"] = "adamax".into();
    let text = case.to_string();
    std::fs::write(dir.path().join("adamax.json"), text).unwrap();
    std::fs::write(dir.path().join("broken.json"), "{ not json").unwrap();
    let results = conformance::run_paths(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(results.len(), 4);
    for r in &results {
        assert!(!r.passed);
    }
    let adamax = results.iter().find(|r| r.kind == "adamax").unwrap();
    assert!(adamax.reason.contains("adamax"), "{}", adamax.reason);
    let broken = results.iter().find(|r| r.id == "broken").unwrap();
    assert!(
        broken.reason.contains("not a conformance case"),
        "{}",
        broken.reason
    );
}

#[test]
fn missing_path_is_an_error() {
    let err = conformance::run_paths(&[PathBuf::from("/no/such/case.json")]).unwrap_err();
    assert!(err.to_string().contains("no such file"));
}

/// A case that lists too few (or too many) values, or no steps, is a failed
/// row naming what is wrong, never a PASS that checked nothing.
#[test]
fn cases_that_check_too_little_fail() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(case_dir().join("adamw_torch_public.json")).unwrap();
    let case: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut variants = Vec::new();
    let mut empty = case.clone();
    for step in empty["steps"].as_array_mut().unwrap() {
        for p in step["params_after"].as_array_mut().unwrap() {
            *p = serde_json::json!([]);
        }
    }
    variants.push(("empty", empty, "params_after of"));
    let mut longer = case.clone();
    longer["steps"][0]["params_after"][0]
        .as_array_mut()
        .unwrap()
        .push(0.5.into());
    variants.push(("longer", longer, "params_after of"));
    let mut short_grad = case.clone();
    short_grad["steps"][1]["grads"][1]
        .as_array_mut()
        .unwrap()
        .pop();
    variants.push(("short_grad", short_grad, "step 1: grads of"));
    let mut no_steps = case.clone();
    no_steps["steps"] = serde_json::json!([]);
    variants.push(("no_steps", no_steps, "has no steps"));
    for (name, value, _) in &variants {
        std::fs::write(dir.path().join(format!("{name}.json")), value.to_string()).unwrap();
    }
    let results = conformance::run_paths(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!(results.len(), 2 * variants.len());
    for (name, _, needle) in &variants {
        let rows: Vec<_> = results.iter().filter(|r| r.id == *name).collect();
        assert_eq!(rows.len(), 2, "{name}");
        for r in rows {
            assert!(!r.passed, "{name} on {} passed", r.backend);
            assert!(r.reason.contains(needle), "{name}: {}", r.reason);
        }
    }
    // The metric itself refuses to compare vectors of different lengths.
    assert_eq!(conformance::relative_error(&[1.0], &[]), f64::INFINITY);
    assert_eq!(conformance::relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
}

/// A folder is searched with its subfolders (`tests/data` holds the
/// optimizer cases and the GPT golden files), and a file named twice, or
/// also inside a named folder, is listed once.
#[test]
fn case_files_walk_subfolders_once_each() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let one = case_dir().join("adamw_torch_public.json");
    let files = conformance::case_files(&[data.clone(), one.clone(), one]).unwrap();
    let mut expected = conformance::case_files(&[case_dir()]).unwrap();
    expected.extend(conformance::case_files(&[data.join("gpt-golden")]).unwrap());
    assert!(expected
        .iter()
        .any(|f| f.starts_with(data.join("gpt-golden"))));
    assert_eq!(files, expected);
}
