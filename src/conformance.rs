//! The conformance checker: replays reference cases (PyTorch, optax; float64)
//! and measures how far keel's parameters land from the reference's.
//!
//! A case (schema `keel-conformance-v1`, see `tests/data/conformance/README.md`)
//! gives initial parameters, a gradient per step and the reference parameters
//! after each step. The check per tensor and step is
//! `||ours - expected|| / ||expected|| <= tolerance` (absolute when the
//! expectation is zero), in f64 against `tolerance.f64` and in f32 against
//! `tolerance.f32`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::cpu::CpuOptimizer;
use crate::config::OptimizerConfig;
use crate::error::{KeelError, Result};
use crate::gpt::golden::{is_golden_json, load_golden};
use crate::optim::Optimizer;
use crate::real::Real;
use crate::tensor::ParamSpec;

/// The schema tag of an optimizer case.
pub const SCHEMA: &str = "keel-conformance-v1";

/// One reference case.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    /// Schema tag (`keel-conformance-v1`).
    pub schema: String,
    /// Case name.
    pub id: String,
    /// The reference implementation that produced it.
    #[serde(default)]
    pub reference: String,
    /// The optimizer config, kept raw so an unsupported kind is a failed row,
    /// not an unreadable file.
    pub optimizer: serde_json::Value,
    /// Parameters and their initial values.
    pub params: Vec<CaseParam>,
    /// Gradients fed and parameters expected, per step.
    pub steps: Vec<CaseStep>,
    /// Relative-error tolerances.
    pub tolerance: Tolerance,
}

/// One parameter of a case.
#[derive(Debug, Clone, Deserialize)]
pub struct CaseParam {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Initial values, row-major.
    pub init: Vec<f64>,
}

/// One step of a case.
#[derive(Debug, Clone, Deserialize)]
pub struct CaseStep {
    /// Gradient per parameter.
    pub grads: Vec<Vec<f64>>,
    /// Expected parameters after the step.
    pub params_after: Vec<Vec<f64>>,
}

/// Tolerances per precision.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Tolerance {
    /// For a float64 run.
    pub f64: f64,
    /// For a float32 run.
    pub f32: f64,
}

/// Where a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU backend in f64.
    CpuF64,
    /// The CPU backend in f32.
    CpuF32,
}

impl Backend {
    /// Every backend available in this build.
    pub fn available() -> Vec<Backend> {
        vec![Backend::CpuF64, Backend::CpuF32]
    }

    /// Its name in reports (`cpu-f64`).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::CpuF64 => "cpu-f64",
            Backend::CpuF32 => "cpu-f32",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of one case on one backend.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case file.
    pub file: PathBuf,
    /// The case id (the file name when unreadable).
    pub id: String,
    /// Backend name.
    pub backend: &'static str,
    /// Optimizer kind (as written in the case).
    pub kind: String,
    /// Steps replayed.
    pub steps: usize,
    /// Worst relative error over every tensor and step (NaN when not run).
    pub worst_rel_err: f64,
    /// The tolerance it was held to.
    pub tolerance: f64,
    /// Whether the case passed.
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reason: String,
}

/// Reads a case file.
pub fn load_case(path: &Path) -> Result<Case> {
    let err = |message: String| KeelError::Case {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let case: Case =
        serde_json::from_str(&text).map_err(|e| err(format!("not a conformance case: {e}")))?;
    if case.schema != SCHEMA {
        return Err(err(format!("schema `{}` is not `{SCHEMA}`", case.schema)));
    }
    let n = case.params.len();
    for p in &case.params {
        let numel = p.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if numel != Some(p.init.len()) {
            return Err(err(format!(
                "param `{}`: init length does not match shape {:?}",
                p.name, p.shape
            )));
        }
    }
    // A case must check something, and every value it lists: an empty or
    // short expectation would otherwise pass unchecked.
    if case.steps.is_empty() {
        return Err(err("has no steps".into()));
    }
    for (k, s) in case.steps.iter().enumerate() {
        if s.grads.len() != n || s.params_after.len() != n {
            return Err(err(format!(
                "step {k}: expected {n} grads and params_after"
            )));
        }
        for (i, p) in case.params.iter().enumerate() {
            let numel = p.init.len();
            for (what, v) in [("grads", &s.grads[i]), ("params_after", &s.params_after[i])] {
                if v.len() != numel {
                    return Err(err(format!(
                        "step {k}: {what} of `{}` has {} values, the param {numel}",
                        p.name,
                        v.len()
                    )));
                }
            }
        }
    }
    Ok(case)
}

/// The case files under `paths`: files as given, and the `*.json` files in
/// directories and their subfolders, in name order; each file once.
pub fn case_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            json_files_under(path, &mut files)?;
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(KeelError::Case {
                path: path.clone(),
                message: "no such file or directory".into(),
            });
        }
    }
    // A file named twice (or inside a folder also named) runs once.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    Ok(files)
}

/// Appends the `*.json` files under `dir` and its subfolders (not linked
/// ones), in name order.
fn json_files_under(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| KeelError::Case {
        path: dir.to_path_buf(),
        message: format!("cannot list: {e}"),
    })?;
    // Linked folders are not followed (a link to a parent would never end).
    let mut found: Vec<(PathBuf, bool)> = entries
        .filter_map(|e| e.ok())
        .map(|e| (e.path(), e.file_type().is_ok_and(|t| t.is_dir())))
        .collect();
    found.sort();
    for (path, is_dir) in found {
        if is_dir {
            json_files_under(&path, files)?;
        } else if path.extension().is_some_and(|x| x == "json") {
            files.push(path);
        }
    }
    Ok(())
}

/// `||a - b|| / ||b||` (or `||a - b||` when `b` is zero); infinite when the
/// lengths differ, so a short or missing expectation never passes.
pub fn relative_error(ours: &[f64], expected: &[f64]) -> f64 {
    if ours.len() != expected.len() {
        return f64::INFINITY;
    }
    let diff: f64 = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = expected.iter().map(|b| b * b).sum::<f64>().sqrt();
    if norm == 0.0 {
        diff
    } else {
        diff / norm
    }
}

/// The worse of two errors, NaN being worst of all and staying so
/// (`f64::max` would drop a NaN for any later number).
fn worse(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Replays a case in `T`; returns the worst relative error.
fn replay<T: Real>(case: &Case, config: OptimizerConfig) -> Result<f64> {
    let specs: Vec<ParamSpec> = case
        .params
        .iter()
        .map(|p| ParamSpec::new(&p.name, &p.shape))
        .collect();
    let mut opt = CpuOptimizer::<T>::new(config, specs)?;
    let mut params: Vec<Vec<T>> = case
        .params
        .iter()
        .map(|p| p.init.iter().map(|&x| T::from_f64x(x)).collect())
        .collect();
    let mut worst = 0.0f64;
    for (k, step) in case.steps.iter().enumerate() {
        let grads: Vec<Vec<T>> = step
            .grads
            .iter()
            .map(|g| g.iter().map(|&x| T::from_f64x(x)).collect())
            .collect();
        let grad_refs: Vec<&[T]> = grads.iter().map(|g| &g[..]).collect();
        let mut param_refs: Vec<&mut [T]> = params.iter_mut().map(|p| &mut p[..]).collect();
        let stats = opt.step(&mut param_refs, &grad_refs)?;
        if let Some(reason) = stats.skipped {
            return Err(KeelError::State(format!(
                "step {k} was skipped: {reason:?}"
            )));
        }
        for (p, want) in params.iter().zip(&step.params_after) {
            let ours: Vec<f64> = p.iter().map(|x| x.to_f64x()).collect();
            let e = relative_error(&ours, want);
            worst = worse(worst, e);
        }
    }
    Ok(worst)
}

/// Runs one case on one backend.
pub fn run_case(file: &Path, case: &Case, backend: Backend) -> CaseResult {
    let kind = case
        .optimizer
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("?")
        .to_string();
    let tolerance = match backend {
        Backend::CpuF64 => case.tolerance.f64,
        Backend::CpuF32 => case.tolerance.f32,
    };
    let mut result = CaseResult {
        file: file.to_path_buf(),
        id: case.id.clone(),
        backend: backend.name(),
        kind,
        steps: case.steps.len(),
        worst_rel_err: f64::NAN,
        tolerance,
        passed: false,
        reason: String::new(),
    };
    let config: OptimizerConfig = match serde_json::from_value(case.optimizer.clone()) {
        Ok(c) => c,
        Err(e) => {
            result.reason = format!("unsupported optimizer: {e}");
            return result;
        }
    };
    let outcome = match backend {
        Backend::CpuF64 => replay::<f64>(case, config),
        Backend::CpuF32 => replay::<f32>(case, config),
    };
    match outcome {
        Ok(worst) => {
            result.worst_rel_err = worst;
            result.passed = worst <= tolerance;
            if !result.passed {
                result.reason = format!("relative error {worst:.3e} exceeds {tolerance:.0e}");
            }
        }
        Err(e) => result.reason = e.to_string(),
    }
    result
}

/// Runs every case under `paths` on every available backend. An unreadable
/// case is one failed row per backend, with the reason.
pub fn run_paths(paths: &[PathBuf]) -> Result<Vec<CaseResult>> {
    let mut results = Vec::new();
    for file in case_files(paths)? {
        let golden = std::fs::read_to_string(&file).is_ok_and(|t| is_golden_json(&t));
        if golden {
            results.extend(run_golden(&file));
            continue;
        }
        match load_case(&file) {
            Ok(case) => {
                for backend in Backend::available() {
                    results.push(run_case(&file, &case, backend));
                }
            }
            Err(e) => {
                let id = file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                for backend in Backend::available() {
                    results.push(CaseResult {
                        file: file.clone(),
                        id: id.clone(),
                        backend: backend.name(),
                        kind: "?".into(),
                        steps: 0,
                        worst_rel_err: f64::NAN,
                        tolerance: f64::NAN,
                        passed: false,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(results)
}

/// Runs one golden GPT case (schema `keel-gpt-golden-v1`) forward and
/// backward on every available backend: one row each, whose worst error is
/// over the loss and every gradient.
pub fn run_golden(file: &Path) -> Vec<CaseResult> {
    let loaded = load_golden(file);
    Backend::available()
        .into_iter()
        .map(|backend| {
            let mut result = CaseResult {
                file: file.to_path_buf(),
                id: file
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                backend: backend.name(),
                kind: "gpt".into(),
                steps: 1,
                worst_rel_err: f64::NAN,
                tolerance: f64::NAN,
                passed: false,
                reason: String::new(),
            };
            let case = match &loaded {
                Ok(case) => case,
                Err(e) => {
                    result.reason = e.to_string();
                    return result;
                }
            };
            result.id = case.meta.id.clone();
            result.tolerance = match backend {
                Backend::CpuF64 => case.meta.tolerance.f64_rel,
                Backend::CpuF32 => case.meta.tolerance.f32_rel,
            };
            let report = match backend {
                Backend::CpuF64 => case.check::<f64>(),
                Backend::CpuF32 => case.check::<f32>(),
            };
            match report {
                Ok(r) => {
                    result.worst_rel_err = r.worst_rel_err;
                    result.passed = r.worst_rel_err <= result.tolerance;
                    if !result.passed {
                        result.reason = format!(
                            "`{}`: relative error {:.3e} exceeds {:.0e}",
                            r.worst, r.worst_rel_err, result.tolerance
                        );
                    }
                }
                Err(e) => result.reason = e.to_string(),
            }
            result
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::worse;

    #[test]
    fn a_nan_error_stays_the_worst() {
        assert_eq!(worse(1e-9, 1e-3), 1e-3);
        assert!(worse(f64::NAN, 1e-3).is_nan());
        assert!(worse(1e-3, f64::NAN).is_nan());
        // Folded over a case: one NaN tensor early, finite ones after.
        let folded = [0.0, f64::NAN, 1e-12, 1e-15].into_iter().fold(0.0, worse);
        assert!(folded.is_nan());
    }
}
