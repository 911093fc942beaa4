//! A host emulation of [`MatrixDevice`] for the tests: memory as byte
//! vectors behind fake device addresses, each kernel of kernels/matrix.cu
//! restated in Rust, column-major GEMMs as plain loops, and faer's
//! eigensolver in place of cuSOLVER.
//!
//! It runs the CUDA backend's Muon and Shampoo step (layouts, transposes,
//! offsets, block plans, sequencing) on a machine without a GPU, against the
//! CPU backend. Every launch is also checked against the kernel's parameter
//! list parsed from kernels/matrix.cu itself, so an argument of the wrong
//! type or position fails here before it could corrupt a real launch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::kernels::SOURCES;
use super::matrix::{parts, Arg, Gemm, Grid, MatrixDevice};
use crate::error::{KeelError, Result};
use crate::optim::linalg;

/// A value stored in emulated memory.
pub(crate) trait Elem: Copy {
    const SIZE: usize;
    fn get(b: &[u8]) -> Self;
    fn put(self, b: &mut [u8]);
}

macro_rules! elem {
    ($t:ty) => {
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..Self::SIZE].try_into().expect("size"))
            }
            fn put(self, b: &mut [u8]) {
                b[..Self::SIZE].copy_from_slice(&self.to_le_bytes());
            }
        }
    };
}
elem!(f32);
elem!(f64);
elem!(i32);
elem!(u64);

/// Emulated device memory: region `k` lives at addresses `(k + 1) << 32`.
#[derive(Default)]
pub(crate) struct Memory {
    regions: Vec<Vec<u8>>,
}

impl Memory {
    fn at(&mut self, addr: u64, bytes: usize) -> &mut [u8] {
        let region = (addr >> 32) as usize;
        assert!(region >= 1, "address {addr:#x} is not emulated memory");
        let offset = (addr & 0xffff_ffff) as usize;
        let r = &mut self.regions[region - 1];
        assert!(
            offset + bytes <= r.len(),
            "out of bounds: {bytes} bytes at offset {offset} of a {}-byte buffer",
            r.len()
        );
        &mut r[offset..offset + bytes]
    }

    /// A zeroed buffer.
    pub(crate) fn alloc(&mut self, bytes: usize) -> u64 {
        self.regions.push(vec![0; bytes.max(1)]);
        (self.regions.len() as u64) << 32
    }

    /// `len` values at `addr`.
    pub(crate) fn read<T: Elem>(&mut self, addr: u64, len: usize) -> Vec<T> {
        let b = self.at(addr, len * T::SIZE);
        b.chunks(T::SIZE).map(T::get).collect()
    }

    /// Writes `values` at `addr`.
    pub(crate) fn write<T: Elem>(&mut self, addr: u64, values: &[T]) {
        let b = self.at(addr, values.len() * T::SIZE);
        for (v, c) in values.iter().zip(b.chunks_mut(T::SIZE)) {
            v.put(c);
        }
    }

    fn get<T: Elem>(&mut self, addr: u64, i: usize) -> T {
        T::get(self.at(addr + (i * T::SIZE) as u64, T::SIZE))
    }

    fn set<T: Elem>(&mut self, addr: u64, i: usize, v: T) {
        v.put(self.at(addr + (i * T::SIZE) as u64, T::SIZE));
    }
}

/// The parameter types of every kernel in kernels/matrix.cu, as [`Arg`]
/// variants' names, parsed from the source.
fn signatures() -> HashMap<String, Vec<&'static str>> {
    let text = SOURCES
        .iter()
        .find(|s| s.file == "matrix.cu")
        .expect("matrix.cu is a kernel source")
        .text;
    let mut out = HashMap::new();
    for decl in text.split("extern \"C\" __global__ void").skip(1) {
        // `__launch_bounds__(N)\nname(params) {`
        let decl = decl.trim_start();
        let decl = match decl.strip_prefix("__launch_bounds__(") {
            Some(rest) => &rest[rest.find(')').expect("bounds close") + 1..],
            None => decl,
        };
        let open = decl.find('(').expect("parameter list");
        let name = decl[..open].trim().to_string();
        let close = decl.find(')').expect("parameter list end");
        let types = decl[open + 1..close]
            .split(',')
            .map(|p| {
                let p = p.trim();
                if p.contains('*') || p.starts_with("u64") {
                    "U64"
                } else if p.starts_with("u32") {
                    "U32"
                } else if p.starts_with("int") {
                    "I32"
                } else if p.starts_with("float") {
                    "F32"
                } else if p.starts_with("double") {
                    "F64"
                } else {
                    panic!("unknown parameter type in `{p}` of {name}")
                }
            })
            .collect();
        out.insert(name, types);
    }
    out
}

fn arg_type(a: &Arg) -> &'static str {
    match a {
        Arg::U64(_) => "U64",
        Arg::U32(_) => "U32",
        Arg::I32(_) => "I32",
        Arg::F32(_) => "F32",
        Arg::F64(_) => "F64",
    }
}

/// Typed access to a launch's arguments (already checked against the
/// signature).
struct Args<'a>(&'a [Arg]);

impl Args<'_> {
    fn u(&self, i: usize) -> u64 {
        match self.0[i] {
            Arg::U64(v) => v,
            Arg::U32(v) => v as u64,
            _ => unreachable!("checked"),
        }
    }
    fn n(&self, i: usize) -> usize {
        self.u(i) as usize
    }
    fn i(&self, i: usize) -> i32 {
        match self.0[i] {
            Arg::I32(v) => v,
            _ => unreachable!("checked"),
        }
    }
    fn f(&self, i: usize) -> f32 {
        match self.0[i] {
            Arg::F32(v) => v,
            _ => unreachable!("checked"),
        }
    }
    fn d(&self, i: usize) -> f64 {
        match self.0[i] {
            Arg::F64(v) => v,
            _ => unreachable!("checked"),
        }
    }
}

/// keel_prep of common.cuh.
fn prep(g: f32, lo: f32, hi: f32, s: f32) -> f32 {
    g.max(lo).min(hi) * s
}

/// The emulated device (a handle: clones share the memory).
#[derive(Clone, Default)]
pub(crate) struct Emulator {
    pub(crate) mem: Arc<Mutex<Memory>>,
}

impl Emulator {
    fn mem(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.mem.lock().expect("emulator memory")
    }

    fn run(&mut self, name: &str, grid: Grid, a: Args<'_>) {
        let mut m = self.mem();
        match name {
            "keel_sumsq_partials" => {
                let (x, y, n, out) = (a.u(0), a.u(1), a.n(2), a.u(3));
                let xs: Vec<f32> = m.read(x, n);
                let sx: f64 = xs.iter().map(|&v| v as f64 * v as f64).sum();
                let sy: f64 = if y == 0 {
                    0.0
                } else {
                    m.read::<f32>(y, n)
                        .iter()
                        .map(|&v| v as f64 * v as f64)
                        .sum()
                };
                let Grid::Parts(len) = grid else {
                    panic!("{name} is a reduction launch")
                };
                let mut partials = vec![0.0f64; 2 * parts(len)];
                partials[0] = sx;
                partials[1] = sy;
                m.write(out, &partials);
            }
            "keel_norm_finalize" => {
                let p: Vec<f64> = m.read(a.u(0), 2 * a.i(1) as usize);
                let (mode, eps, out) = (a.i(2), a.d(3), a.u(4));
                let sx: f64 = p.iter().step_by(2).sum();
                let sy: f64 = p.iter().skip(1).step_by(2).sum();
                let (nx, ny) = (sx.sqrt(), sy.sqrt());
                let v = if mode == 0 {
                    1.0 / nx.max(eps)
                } else {
                    nx / (ny + eps)
                };
                m.set(out, 0, v as f32);
            }
            "keel_sums_finalize" => {
                let p: Vec<f64> = m.read(a.u(0), 2 * a.i(1) as usize);
                let s0: f64 = p.iter().step_by(2).sum();
                let s1: f64 = p.iter().skip(1).step_by(2).sum();
                m.write(a.u(2), &[s0, s1]);
            }
            "keel_scale_by" => {
                let (x, n) = (a.u(0), a.n(1));
                let f: f32 = m.get(a.u(2), 0);
                let v: Vec<f32> = m.read::<f32>(x, n).iter().map(|&v| v * f).collect();
                m.write(x, &v);
            }
            "keel_muon_momentum" => {
                let (g, buf, u, n) = (a.u(0), a.u(1), a.u(2), a.n(3));
                let (lo, hi, s, keep, mom, nesterov) =
                    (a.f(4), a.f(5), a.f(6), a.f(7), a.f(8), a.i(9));
                let gs: Vec<f32> = m.read(g, n);
                let mut bs: Vec<f32> = m.read(buf, n);
                let mut us = vec![0f32; n];
                for i in 0..n {
                    let gi = prep(gs[i], lo, hi, s);
                    bs[i] = bs[i] + keep * (gi - bs[i]);
                    us[i] = if nesterov != 0 {
                        gi + mom * (bs[i] - gi)
                    } else {
                        bs[i]
                    };
                }
                m.write(buf, &bs);
                m.write(u, &us);
            }
            "keel_shampoo_moments" => {
                let (g, mm, v, gh, dg, n) = (a.u(0), a.u(1), a.u(2), a.u(3), a.u(4), a.n(5));
                let (lo, hi, s, graft) = (a.f(6), a.f(7), a.f(8), a.i(9));
                let (b2, bc2, geps, use_m, beta1, bc1) =
                    (a.f(10), a.f(11), a.f(12), a.i(13), a.f(14), a.f(15));
                let gs: Vec<f32> = m.read(g, n);
                let mut ms: Vec<f32> = m.read(mm, n);
                let mut vs: Vec<f32> = m.read(v, n);
                let mut ghs = vec![0f32; n];
                let mut dgs: Vec<f32> = m.read(dg, n);
                for i in 0..n {
                    let gi = prep(gs[i], lo, hi, s);
                    let mut vi = vs[i];
                    match graft {
                        1 => vi += gi * gi,
                        2 => vi = b2 * vi + (1.0 - b2) * gi * gi,
                        _ => {}
                    }
                    let mut h = gi;
                    if use_m != 0 {
                        ms[i] = beta1 * ms[i] + (1.0 - beta1) * gi;
                        h = ms[i] / bc1;
                    }
                    ghs[i] = h;
                    match graft {
                        1 => {
                            vs[i] = vi;
                            dgs[i] = h / (vi.sqrt() + geps);
                        }
                        2 => {
                            vs[i] = vi;
                            dgs[i] = h / ((vi / bc2).sqrt() + geps);
                        }
                        _ => {}
                    }
                }
                m.write(mm, &ms);
                m.write(v, &vs);
                m.write(gh, &ghs);
                m.write(dg, &dgs);
            }
            "keel_matrix_apply" => {
                let (p, d, n, mode, ca, cb, out) =
                    (a.u(0), a.u(1), a.n(2), a.i(3), a.f(4), a.f(5), a.u(6));
                let mut ps: Vec<f32> = m.read(p, n);
                let ds: Vec<f32> = m.read(d, n);
                let (mut psq, mut usq) = (0.0f64, 0.0f64);
                for i in 0..n {
                    let old = ps[i];
                    let new = if mode == 0 {
                        old * ca - cb * ds[i]
                    } else {
                        old - ca * (ds[i] + cb * old)
                    };
                    ps[i] = new;
                    psq += old as f64 * old as f64;
                    usq += ((new - old) as f64).powi(2);
                }
                m.write(p, &ps);
                let mut partials = vec![0.0f64; 2 * parts(n)];
                partials[0] = psq;
                partials[1] = usq;
                m.write(out, &partials);
            }
            "keel_gather" | "keel_scatter" => {
                let gather = name == "keel_gather";
                let (src, dst, runs, nruns, len) = (a.u(0), a.u(1), a.u(2), a.n(3), a.n(4));
                let runs: Vec<u64> = m.read(runs, nruns);
                for (r, &at) in runs.iter().enumerate() {
                    if gather {
                        let (on, lo, hi, s) = (a.i(5), a.f(6), a.f(7), a.f(8));
                        let v: Vec<f32> = m.read(src + 4 * at, len);
                        let v: Vec<f32> = v
                            .iter()
                            .map(|&x| if on != 0 { prep(x, lo, hi, s) } else { x })
                            .collect();
                        m.write(dst + 4 * (r * len) as u64, &v);
                    } else {
                        let v: Vec<f32> = m.read(src + 4 * (r * len) as u64, len);
                        m.write(dst + 4 * at, &v);
                    }
                }
            }
            "keel_mirror_lower" => {
                let (l, n) = (a.u(0), a.n(1));
                let mut v: Vec<f32> = m.read(l, n * n);
                for j in 0..n {
                    for i in 0..j {
                        v[i + j * n] = v[j + i * n];
                    }
                }
                m.write(l, &v);
            }
            "keel_root_input" => {
                let (l, out, n, bias2, eps, bad) = (a.u(0), a.u(1), a.n(2), a.d(3), a.d(4), a.u(5));
                let ls: Vec<f32> = m.read(l, n * n);
                let mut v = vec![0f64; n * n];
                let mut flag = false;
                for idx in 0..n * n {
                    let (i, j) = (idx % n, idx / n);
                    v[idx] = ls[idx] as f64 / bias2 + if i == j { eps } else { 0.0 };
                    flag |= !v[idx].is_finite();
                }
                m.write(out, &v);
                if flag {
                    m.set(bad, 0, 1i32);
                }
            }
            "keel_root_guard" => {
                let (q, n, bad) = (a.u(0), a.n(1), a.u(2));
                if m.get::<i32>(bad, 0) != 0 {
                    let v: Vec<f64> = (0..n * n)
                        .map(|idx| if idx % n == idx / n { 1.0 } else { 0.0 })
                        .collect();
                    m.write(q, &v);
                }
            }
            "keel_root_scale" => {
                let (q, w, qs, n, eps, exponent, bad) =
                    (a.u(0), a.u(1), a.u(2), a.n(3), a.d(4), a.d(5), a.u(6));
                let ws: Vec<f64> = m.read(w, n);
                let shift = if ws[0] < eps { eps - ws[0] } else { 0.0 };
                let mut v: Vec<f64> = m.read(q, n * n);
                let mut flag = false;
                for (idx, x) in v.iter_mut().enumerate() {
                    let f = (ws[idx / n] + shift).powf(exponent);
                    flag |= !f.is_finite();
                    *x *= f;
                }
                m.write(qs, &v);
                if flag {
                    m.set(bad, 0, 1i32);
                }
            }
            "keel_root_commit" => {
                let (r, root, n, info, bad, failures) =
                    (a.u(0), a.u(1), a.n(2), a.u(3), a.u(4), a.u(5));
                let rs: Vec<f64> = m.read(r, n * n);
                let lower = |idx: usize| {
                    let (i, j) = (idx % n, idx / n);
                    if i >= j {
                        rs[idx]
                    } else {
                        rs[j + i * n]
                    }
                };
                let ok = m.get::<i32>(info, 0) == 0
                    && m.get::<i32>(bad, 0) == 0
                    && (0..n * n).all(|idx| (lower(idx) as f32).is_finite());
                if ok {
                    let v: Vec<f32> = (0..n * n).map(|idx| lower(idx) as f32).collect();
                    m.write(root, &v);
                } else {
                    let f: i32 = m.get(failures, 0);
                    m.set(failures, 0, f + 1);
                }
            }
            other => panic!("the emulator has no kernel `{other}`"),
        }
    }
}

impl MatrixDevice for Emulator {
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        Ok(self.mem().alloc(bytes))
    }

    fn upload_u64(&mut self, data: &[u64]) -> Result<u64> {
        let mut m = self.mem();
        let at = m.alloc(8 * data.len());
        m.write(at, data);
        Ok(at)
    }

    fn launch(&mut self, name: &'static str, grid: Grid, args: &[Arg]) -> Result<()> {
        static SIGNATURES: std::sync::OnceLock<HashMap<String, Vec<&'static str>>> =
            std::sync::OnceLock::new();
        let want = SIGNATURES
            .get_or_init(signatures)
            .get(name)
            .ok_or_else(|| KeelError::Cuda(format!("no kernel `{name}` in matrix.cu")))?;
        let got: Vec<&str> = args.iter().map(arg_type).collect();
        if &got != want {
            return Err(KeelError::Cuda(format!(
                "{name}: launched with {got:?}, the kernel takes {want:?}"
            )));
        }
        self.run(name, grid, Args(args));
        Ok(())
    }

    fn gemm(&mut self, g: Gemm) -> Result<()> {
        let mut m = self.mem();
        let (rows, cols, k) = g.mnk;
        // Element (i, j) of op(X) for a column-major X with leading dim ld.
        let at = |t: bool, ld: usize, i: usize, j: usize| if t { j + i * ld } else { i + j * ld };
        let (ta, tb) = g.trans;
        // Elements spanned by a column-major matrix of `r x c` with `ld`.
        let span = |r: usize, c: usize, ld: usize| {
            if r == 0 || c == 0 {
                0
            } else {
                ld * (c - 1) + r
            }
        };
        let a_span = if ta {
            span(k, rows, g.a.1)
        } else {
            span(rows, k, g.a.1)
        };
        let b_span = if tb {
            span(cols, k, g.b.1)
        } else {
            span(k, cols, g.b.1)
        };
        let c_span = span(rows, cols, g.c.1);
        let (a, b, c): (Vec<f64>, Vec<f64>, Vec<f64>) = if g.f64 {
            (
                m.read(g.a.0, a_span),
                m.read(g.b.0, b_span),
                m.read(g.c.0, c_span),
            )
        } else {
            let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
            (
                f(m.read(g.a.0, a_span)),
                f(m.read(g.b.0, b_span)),
                f(m.read(g.c.0, c_span)),
            )
        };
        let mut out = c.clone();
        for j in 0..cols {
            for i in 0..rows {
                let mut acc = 0.0;
                for l in 0..k {
                    acc += a[at(ta, g.a.1, i, l)] * b[at(tb, g.b.1, l, j)];
                }
                // As BLAS: with beta == 0, C is not read (NaN there stays out).
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta * c[i + j * g.c.1]
                };
                out[i + j * g.c.1] = g.alpha * acc + old;
            }
        }
        if g.f64 {
            m.write(g.c.0, &out);
        } else {
            let v: Vec<f32> = out.iter().map(|&x| x as f32).collect();
            m.write(g.c.0, &v);
        }
        Ok(())
    }

    fn syevd_workspace(&mut self, n: usize, _a: u64, _w: u64) -> Result<usize> {
        Ok(1 + 6 * n + 2 * n * n)
    }

    fn syevd(&mut self, n: usize, a: u64, w: u64, _work: (u64, usize), info: u64) -> Result<()> {
        let mut m = self.mem();
        let v: Vec<f64> = m.read(a, n * n);
        // The lower triangle, as LAPACK reads it.
        let mat = faer::Mat::<f64>::from_fn(
            n,
            n,
            |i, j| {
                if i >= j {
                    v[i + j * n]
                } else {
                    v[j + i * n]
                }
            },
        );
        let solved = linalg::with_workspace(linalg::sym_eigen_scratch::<f64>(n), |stack| {
            linalg::sym_eigen(mat.as_ref(), stack).0.map(|eig| {
                // Column-major, as LAPACK writes it.
                let q = eig.vectors();
                let q: Vec<f64> = (0..n).flat_map(|j| q.col(j).iter().copied()).collect();
                (q, eig.values)
            })
        });
        match solved {
            Some((q, values)) => {
                m.write(a, &q);
                m.write(w, &values);
                m.set(info, 0, 0i32);
            }
            None => m.set(info, 0, 1i32),
        }
        Ok(())
    }

    fn copy(&mut self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let mut m = self.mem();
        let v: Vec<u8> = m.at(src, bytes).to_vec();
        m.at(dst, bytes).copy_from_slice(&v);
        Ok(())
    }

    fn fill(&mut self, at: u64, value: u8, bytes: usize) -> Result<()> {
        self.mem().at(at, bytes).fill(value);
        Ok(())
    }

    fn read_i32(&mut self, at: u64) -> Result<i32> {
        Ok(self.mem().get(at, 0))
    }
}

mod tests {
    use std::path::Path;

    use super::*;
    use crate::backend::cuda::matrix::{GradPrep, MatrixEngine, TensorBuffers};
    use crate::bench::fill;
    use crate::conformance;
    use crate::optim::{initial_state, state_slots};
    use crate::{CpuOptimizer, Optimizer, OptimizerConfig, ParamSpec, StepStats};

    /// Muon and Shampoo settings covering every path of the device step
    /// (the GPU tests in tests/cuda.rs use the first four too). The Shampoo
    /// epsilons keep the roots well conditioned, so f32 and f64 agree.
    const CONFIGS: [&str; 5] = [
        r#"{"kind": "muon", "lr": 0.02, "weight_decay": 0.01, "clip_global_norm": 1.0}"#,
        r#"{"kind": "muon", "lr": 0.02, "nesterov": false, "adjust_lr": "match_rms_adamw", "clip_value": 0.05}"#,
        r#"{"kind": "shampoo", "lr": 0.01, "epsilon": 1e-4, "max_preconditioner_dim": 48, "precondition_frequency": 2, "grafting": {"kind": "adam"}, "weight_decay": 0.01, "clip_global_norm": 1.0}"#,
        r#"{"kind": "shampoo", "lr": 0.01, "epsilon": 1e-4, "beta1": 0.0, "beta2": 1.0, "max_preconditioner_dim": 64, "start_preconditioning_step": 2, "grafting": {"kind": "adagrad"}, "clip_value": 0.05}"#,
        r#"{"kind": "shampoo", "lr": 0.003, "max_preconditioner_dim": 32, "epsilon": 1e-3}"#,
    ];

    fn specs(config: &OptimizerConfig) -> Vec<ParamSpec> {
        let mut specs = vec![
            ParamSpec::new("wide", [24, 40]),
            ParamSpec::new("tall", [70, 20]),
            ParamSpec::new("square", [17, 17]),
        ];
        if config.kind.name() == "shampoo" {
            // [7, 9, 11] stays a 3-D block at 48 and 32; [150] is cut into
            // blocks; [1, 5, 1] merges to one dim.
            specs.push(ParamSpec::new("cube", [7, 9, 11]));
            specs.push(ParamSpec::new("long", [150]));
            specs.push(ParamSpec::new("thin", [1, 5, 1]));
        }
        specs
    }

    /// `||a - b|| / ||b||`.
    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let d: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        if n == 0.0 {
            d.sqrt()
        } else {
            (d / n).sqrt()
        }
    }

    /// The CUDA backend's matrix step on the emulated device, with buffers
    /// laid out as `Core` lays them out.
    struct Emulated {
        emu: Emulator,
        engine: MatrixEngine,
        config: OptimizerConfig,
        specs: Vec<ParamSpec>,
        tensors: Vec<TensorBuffers>,
        state_lens: Vec<Vec<usize>>,
        t: u64,
    }

    impl Emulated {
        fn new(config: &OptimizerConfig, specs: &[ParamSpec], init: &[Vec<f32>]) -> Self {
            let emu = Emulator::default();
            let engine = MatrixEngine::on(Box::new(emu.clone()), &config.kind, specs).unwrap();
            let mut m = emu.mem.lock().unwrap();
            let mut tensors = Vec::new();
            let mut state_lens = Vec::new();
            for (spec, p) in specs.iter().zip(init) {
                let pa = m.alloc(4 * p.len());
                m.write(pa, p);
                let initial: Vec<Vec<f32>> = initial_state(&config.kind, spec).unwrap();
                let state = initial
                    .iter()
                    .map(|b| {
                        let at = m.alloc(4 * b.len());
                        m.write(at, b);
                        at
                    })
                    .collect();
                state_lens.push(initial.iter().map(Vec::len).collect());
                tensors.push(TensorBuffers {
                    p: pa,
                    g: m.alloc(4 * p.len()),
                    state,
                    sums: m.alloc(16),
                });
            }
            drop(m);
            Emulated {
                emu,
                engine,
                config: config.clone(),
                specs: specs.to_vec(),
                tensors,
                state_lens,
                t: 0,
            }
        }

        /// One step with `grads` and the scan's clip factor; returns the
        /// per-tensor (||p||^2, ||dp||^2) sums.
        fn step(&mut self, grads: &[Vec<f32>], clip_factor: f64) -> Vec<[f64; 2]> {
            self.t += 1;
            {
                let mut m = self.emu.mem.lock().unwrap();
                for (tensor, g) in self.tensors.iter().zip(grads) {
                    m.write(tensor.g, g);
                }
            }
            let (lo, hi) = match self.config.clip_value {
                Some(v) => (-v as f32, v as f32),
                None => (f32::NEG_INFINITY, f32::INFINITY),
            };
            let prep = GradPrep {
                lo,
                hi,
                scale: clip_factor as f32,
            };
            let kind = &self.config.kind;
            let lr_wd = vec![(kind.lr(), kind.weight_decay()); self.specs.len()];
            self.engine
                .step(kind, self.t, &self.specs, &lr_wd, &self.tensors, prep)
                .unwrap_or_else(|e| panic!("step {}: {e}", self.t));
            assert_eq!(self.engine.failures().unwrap(), 0, "step {}", self.t);
            let mut m = self.emu.mem.lock().unwrap();
            self.tensors
                .iter()
                .map(|t| {
                    let v: Vec<f64> = m.read(t.sums, 2);
                    [v[0], v[1]]
                })
                .collect()
        }

        fn params(&self, i: usize) -> Vec<f32> {
            let mut m = self.emu.mem.lock().unwrap();
            m.read(self.tensors[i].p, self.specs[i].numel())
        }

        fn state(&self, i: usize, slot: usize) -> Vec<f32> {
            let mut m = self.emu.mem.lock().unwrap();
            m.read(self.tensors[i].state[slot], self.state_lens[i][slot])
        }
    }

    /// Steps a CPU optimizer of either precision with f32 gradients.
    fn cpu_step<T: crate::real::Real>(
        cpu: &mut CpuOptimizer<T>,
        host: &mut [Vec<T>],
        grads: &[Vec<f32>],
    ) -> StepStats {
        let g: Vec<Vec<T>> = grads
            .iter()
            .map(|g| g.iter().map(|&x| T::from_f64x(x as f64)).collect())
            .collect();
        let r: Vec<&[T]> = g.iter().map(|g| &g[..]).collect();
        let mut p: Vec<&mut [T]> = host.iter_mut().map(|p| &mut p[..]).collect();
        cpu.step(&mut p, &r).unwrap()
    }

    /// Against the f64 CPU backend, the emulated device must be as close as
    /// the f32 CPU backend is (3x), or within 1e-4.
    fn assert_close(what: &str, emulated: f64, cpu_f32: f64) {
        assert!(
            emulated <= (3.0 * cpu_f32).max(1e-4),
            "{what}: off by {emulated:e} (the f32 CPU backend by {cpu_f32:e})"
        );
    }

    #[test]
    fn the_device_step_matches_the_cpu_backend() {
        for (c, json) in CONFIGS.iter().enumerate() {
            let config = OptimizerConfig::from_json(json).unwrap();
            let specs = specs(&config);
            let init: Vec<Vec<f32>> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| fill(s.numel(), 100 * c as u64 + i as u64 + 1, 1.0))
                .collect();
            let mut dev = Emulated::new(&config, &specs, &init);
            let mut cpu = CpuOptimizer::<f32>::new(config.clone(), specs.clone()).unwrap();
            let mut cpu64 = CpuOptimizer::<f64>::new(config.clone(), specs.clone()).unwrap();
            let mut host = init.clone();
            let mut host64: Vec<Vec<f64>> = init
                .iter()
                .map(|p| p.iter().map(|&x| x as f64).collect())
                .collect();
            for t in 1..=5u64 {
                // Step 2's gradient is clipped (norm or value).
                let scale = if t == 2 { 100.0 } else { 0.1 };
                let grads: Vec<Vec<f32>> = specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| fill(s.numel(), 1000 * t + i as u64, scale))
                    .collect();
                let s32 = cpu_step(&mut cpu, &mut host, &grads);
                let s64 = cpu_step(&mut cpu64, &mut host64, &grads);
                let sums = dev.step(&grads, s32.clip_factor);
                for (i, spec) in specs.iter().enumerate() {
                    let (want, f32_cpu) = (&s64.tensors[i], &s32.tensors[i]);
                    let err = |x: f64, y: f64| (x - y).abs() / y.abs().max(1e-12);
                    for (what, got, f, w) in [
                        (
                            "||p||",
                            sums[i][0].sqrt(),
                            f32_cpu.param_norm,
                            want.param_norm,
                        ),
                        (
                            "||dp||",
                            sums[i][1].sqrt(),
                            f32_cpu.update_norm,
                            want.update_norm,
                        ),
                    ] {
                        let what = format!("{json} step {t} {} {what}", spec.name);
                        assert_close(&what, err(got, w), err(f, w));
                    }
                }
            }
            // Parameters (as changes from the start) and every state buffer.
            let slots = state_slots(&config.kind);
            let (sd, sd64) = (cpu.state_dict().unwrap(), cpu64.state_dict().unwrap());
            for (i, spec) in specs.iter().enumerate() {
                let change = |after: Vec<f32>| -> Vec<f32> {
                    after.iter().zip(&init[i]).map(|(a, b)| a - b).collect()
                };
                let want = change(host64[i].iter().map(|&x| x as f32).collect());
                let (d_dev, d_cpu) = (change(dev.params(i)), change(host[i].clone()));
                let (e, e32) = (rel(&d_dev, &want), rel(&d_cpu, &want));
                println!("{json} {}: update {e:.2e} (cpu-f32 {e32:.2e})", spec.name);
                assert_close(&format!("{json} {} update", spec.name), e, e32);
                for (k, slot) in slots.iter().enumerate() {
                    let (key, len) = (format!("{}/{slot}", spec.name), dev.state_lens[i][k]);
                    let f32_cpu: Vec<f32> = sd.tensor::<f32>(&key, len).unwrap();
                    let want: Vec<f32> = sd64
                        .tensor::<f64>(&key, len)
                        .unwrap()
                        .iter()
                        .map(|&x| x as f32)
                        .collect();
                    let (e, e32) = (rel(&dev.state(i, k), &want), rel(&f32_cpu, &want));
                    println!("{json} {key}: {e:.2e} (cpu-f32 {e32:.2e})");
                    assert_close(&format!("{json} {key}"), e, e32);
                }
            }
        }
    }

    #[test]
    fn the_device_step_passes_the_muon_and_shampoo_conformance_cases() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
        let mut ran = 0;
        for file in conformance::case_files(&[dir]).unwrap() {
            let case = conformance::load_case(&file).unwrap();
            let config: OptimizerConfig = serde_json::from_value(case.optimizer.clone()).unwrap();
            if !matches!(config.kind.name(), "muon" | "shampoo") {
                continue;
            }
            let specs: Vec<ParamSpec> = case
                .params
                .iter()
                .map(|p| ParamSpec::new(&p.name, &p.shape))
                .collect();
            let init: Vec<Vec<f32>> = case
                .params
                .iter()
                .map(|p| p.init.iter().map(|&x| x as f32).collect())
                .collect();
            let mut dev = Emulated::new(&config, &specs, &init);
            // The scan's clip factor, from the CPU backend.
            let mut cpu = CpuOptimizer::<f32>::new(config.clone(), specs.clone()).unwrap();
            let mut host = init.clone();
            let mut worst = 0.0f64;
            for step in &case.steps {
                let grads: Vec<Vec<f32>> = step
                    .grads
                    .iter()
                    .map(|g| g.iter().map(|&x| x as f32).collect())
                    .collect();
                let stats = cpu_step(&mut cpu, &mut host, &grads);
                dev.step(&grads, stats.clip_factor);
                for (i, want) in step.params_after.iter().enumerate() {
                    let ours: Vec<f64> = dev.params(i).iter().map(|&x| x as f64).collect();
                    worst = worst.max(conformance::relative_error(&ours, want));
                }
            }
            println!(
                "{}: emulated cuda-f32 worst relative error {worst:.3e}",
                case.id
            );
            assert!(
                worst <= case.tolerance.f32,
                "{}: {worst:e} > {:e}",
                case.id,
                case.tolerance.f32
            );
            ran += 1;
        }
        assert_eq!(ran, 3, "one muon and two shampoo public cases");
    }

    #[test]
    fn kernel_signatures_are_parsed_from_the_source() {
        let sigs = signatures();
        assert_eq!(sigs.len(), 14, "{:?}", sigs.keys());
        assert_eq!(
            sigs["keel_gather"],
            ["U64", "U64", "U64", "U64", "U32", "I32", "F32", "F32", "F32"]
        );
        assert_eq!(
            sigs["keel_root_commit"],
            ["U64", "U64", "U32", "U64", "U64", "U64"]
        );
        // A launch with a wrong argument type is refused.
        let mut emu = Emulator::default();
        let x = emu.alloc(16).unwrap();
        let err = emu
            .launch(
                "keel_scale_by",
                Grid::Stride(4),
                &[Arg::U64(x), Arg::U32(4), Arg::U64(x)],
            )
            .unwrap_err();
        assert!(err.to_string().contains("the kernel takes"), "{err}");
    }
}
