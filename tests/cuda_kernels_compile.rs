//! Every CUDA kernel compiles with NVRTC for sm_80 and sm_90, and ptxas
//! assembles it with zero register spills — checked without a GPU.
//!
//! Needs libnvrtc on the library path and ptxas (`$KEEL_PTXAS`, else
//! `ptxas` on `PATH`); `.ci/run` fetches both from the pinned PyPI wheels.
//! Without them the test prints why and passes, unless `KEEL_REQUIRE_NVRTC=1`
//! (CI sets it), where their absence fails it. Prints registers per kernel;
//! with `KEEL_REGISTER_TABLE=path` also writes them there as a Markdown table,
//! and with `KEEL_PTX_DIR=dir` keeps the PTX there.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::process::Command;

use keel::backend::cuda::kernels::{self, SOURCES};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Per kernel: registers, spill stores, spill loads, stack frame bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output: a "Function properties for NAME" line followed
/// by the stack/spill line, and a "Compiling entry function 'NAME'" line
/// followed by a "Used N registers" line.
fn parse_ptxas(log: &str) -> BTreeMap<String, Usage> {
    let mut out: BTreeMap<String, Usage> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = rest.split('\'').next().map(str::to_string);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            current = Some(rest.trim().to_string());
        }
        let Some(name) = current.clone() else {
            continue;
        };
        let u = out.entry(name).or_default();
        if let Some(r) = number_before(line, "registers") {
            u.registers = r;
        }
        if line.contains("spill stores") {
            u.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
    }
    out
}

#[test]
fn every_source_expands() {
    for s in &SOURCES {
        let text = kernels::expand(s.text).expect("headers resolve");
        assert!(!text.contains("#include"), "{} keeps an include", s.file);
        for k in s.kernels {
            assert!(text.contains(k) || text.contains("KEEL_"), "{k}");
        }
    }
}

#[test]
fn kernels_compile_without_spills() {
    let required = std::env::var("KEEL_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if !kernels::nvrtc_available() {
        assert!(!required, "libnvrtc not found but KEEL_REQUIRE_NVRTC=1");
        println!("skipped: libnvrtc not found (set LD_LIBRARY_PATH)");
        return;
    }
    let ptxas = std::env::var("KEEL_PTXAS").unwrap_or_else(|_| "ptxas".into());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut table = String::from(
        "| kernel | file | sm_80 registers | sm_80 spills (st/ld B) | sm_90 registers | sm_90 spills (st/ld B) |\n|---|---|---|---|---|---|\n",
    );
    let mut rows: BTreeMap<(usize, &str), Vec<Usage>> = BTreeMap::new();
    let mut failures = Vec::new();
    for arch in ARCHS {
        for (si, source) in SOURCES.iter().enumerate() {
            let ptx = match kernels::compile(source, arch) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{e}"));
                    continue;
                }
            };
            let path = dir.path().join(format!("{}.{arch}.ptx", source.file));
            std::fs::write(&path, &ptx).expect("write ptx");
            if let Ok(keep) = std::env::var("KEEL_PTX_DIR") {
                std::fs::create_dir_all(&keep).expect("create KEEL_PTX_DIR");
                std::fs::copy(
                    &path,
                    std::path::Path::new(&keep).join(path.file_name().expect("name")),
                )
                .expect("copy ptx");
            }
            let out = match Command::new(&ptxas)
                .arg(format!("-arch={arch}"))
                .arg("-v")
                .arg("-o")
                .arg(dir.path().join("out.cubin"))
                .arg(&path)
                .output()
            {
                Ok(o) => o,
                Err(e) => {
                    assert!(!required, "cannot run ptxas `{ptxas}`: {e}");
                    println!("skipped: cannot run ptxas `{ptxas}` ({e}); set KEEL_PTXAS");
                    return;
                }
            };
            let log = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                failures.push(format!(
                    "ptxas failed on {} for {arch}:\n{log}",
                    source.file
                ));
                continue;
            }
            let usage = parse_ptxas(&log);
            for &k in source.kernels {
                match usage.get(k) {
                    Some(u) => {
                        if u.spill_stores > 0 || u.spill_loads > 0 {
                            failures.push(format!(
                                "{k} spills on {arch}: {} B stores, {} B loads",
                                u.spill_stores, u.spill_loads
                            ));
                        }
                        rows.entry((si, k)).or_default().push(*u);
                    }
                    None => failures.push(format!(
                        "ptxas reported nothing for {k} ({arch}); log:\n{log}"
                    )),
                }
            }
        }
    }
    for ((si, k), us) in &rows {
        let cell = |u: Option<&Usage>| match u {
            Some(u) => (
                u.registers.to_string(),
                format!("{}/{}", u.spill_stores, u.spill_loads),
            ),
            None => ("-".into(), "-".into()),
        };
        let (r80, s80) = cell(us.first());
        let (r90, s90) = cell(us.get(1));
        table.push_str(&format!(
            "| `{k}` | {} | {r80} | {s80} | {r90} | {s90} |\n",
            SOURCES[*si].file
        ));
    }
    println!("{table}");
    if let Ok(path) = std::env::var("KEEL_REGISTER_TABLE") {
        std::fs::write(&path, &table).expect("write register table");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ptxas_log_parses() {
    let log = "ptxas info    : Compiling entry function 'keel_scan_f32' for 'sm_90'\n\
               ptxas info    : Function properties for keel_scan_f32\n\
               \x20   8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
               ptxas info    : Used 30 registers, used 1 barriers, 256 bytes smem\n";
    let u = parse_ptxas(log)["keel_scan_f32"];
    assert_eq!(
        (u.registers, u.stack, u.spill_stores, u.spill_loads),
        (30, 8, 4, 4)
    );
}

#[test]
fn a_compile_error_carries_nvrtcs_log() {
    if !kernels::nvrtc_available() {
        println!("skipped: libnvrtc not found");
        return;
    }
    let broken = kernels::KernelSource {
        file: "broken.cu",
        text: "#include \"common.cuh\"\nextern \"C\" __global__ void k() { keel_no_such_function(); }\n",
        kernels: &["k"],
    };
    let err = kernels::compile(&broken, "sm_90").unwrap_err().to_string();
    assert!(
        err.contains("broken.cu") && err.contains("keel_no_such_function"),
        "{err}"
    );
}
