//! Shampoo with DistributedShampoo's semantics for one tensor (see
//! `tests/data/conformance/SHAMPOO.md`, mirrored here step by step).
//!
//! The tensor is reshaped (dims of size 1 dropped, neighbours merged while
//! their product stays <= `max_preconditioner_dim`) and cut into blocks of at
//! most that size per dim. Each block of order k keeps one factor
//! `L_j = sum G_(j) G_(j)^T` per dim and its inverse root `P_j = L_j^(-1/2k)`,
//! recomputed every `precondition_frequency` steps from an f64 symmetric
//! eigendecomposition (faer); the update is `G x_1 P_1 ... x_k P_k`, grafted
//! to the norm of an Adagrad or Adam step, plus decoupled weight decay.
//!
//! State per tensor: `exp_avg` and `graft` (the tensor's size), `factors` and
//! `roots` (every block's `n_j x n_j` matrices, concatenated in block order).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use super::linalg;

use crate::backend::reduce::Sums;
use crate::clip::GradTransform;
use crate::config::{Grafting, RootDtype, ShampooConfig};
use crate::real::{GradElem, Real};

/// State slot indices.
const M: usize = 0;
const V: usize = 1;
const FACTORS: usize = 2;
const ROOTS: usize = 3;

/// The merged shape of a parameter (SHAMPOO.md §1.1).
pub fn merged_dims(shape: &[usize], max_dim: usize) -> Vec<usize> {
    let dims: Vec<usize> = shape.iter().copied().filter(|&d| d != 1).collect();
    let Some((&last, rest)) = dims.split_last() else {
        return vec![1];
    };
    let mut out = vec![last];
    for &d in rest.iter().rev() {
        let back = out.last_mut().expect("out starts non-empty");
        if *back * d <= max_dim {
            *back *= d;
        } else {
            out.push(d);
        }
    }
    out.reverse();
    out
}

/// One block: its dims, the flat index of its first element and the
/// tensor strides of its dims (the last dim is contiguous), so its elements
/// are runs of `dims[k-1]` contiguous values.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub dims: Vec<usize>,
    start: usize,
    strides: Vec<usize>,
}

impl Block {
    /// Number of elements.
    pub(crate) fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Flat tensor index of the first element of each contiguous run, in
    /// row-major block order.
    pub(crate) fn runs(&self) -> impl Iterator<Item = usize> + '_ {
        let k = self.dims.len();
        let count: usize = self.dims[..k - 1].iter().product();
        (0..count).map(move |r| {
            let mut rem = r;
            let mut flat = self.start;
            for j in (0..k - 1).rev() {
                flat += (rem % self.dims[j]) * self.strides[j];
                rem /= self.dims[j];
            }
            flat
        })
    }

    /// Length of each contiguous run (the block's last dim).
    fn run_len(&self) -> usize {
        self.dims[self.dims.len() - 1]
    }

    /// Number of contiguous runs.
    fn run_count(&self) -> usize {
        self.numel() / self.run_len()
    }

    /// Writes the block's elements of `x`, mapped by `f`, into `out`, in
    /// row-major block order.
    fn gather_into<A: Copy, B>(&self, x: &[A], out: &mut [B], f: impl Fn(A) -> B) {
        let len = self.run_len();
        for (at, o) in self.runs().zip(out.chunks_exact_mut(len)) {
            for (o, &v) in o.iter_mut().zip(&x[at..at + len]) {
                *o = f(v);
            }
        }
    }

    /// Length of the block's factors (and roots): `sum_j n_j^2`.
    pub(crate) fn factor_len(&self) -> usize {
        self.dims.iter().map(|d| d * d).sum()
    }
}

/// The blocks of a parameter (SHAMPOO.md §1.2), in row-major block order.
pub(crate) fn blocks(shape: &[usize], max_dim: usize) -> Vec<Block> {
    let merged = merged_dims(shape, max_dim);
    let k = merged.len();
    let mut strides = vec![1usize; k];
    for j in (0..k.saturating_sub(1)).rev() {
        strides[j] = strides[j + 1] * merged[j + 1];
    }
    let counts: Vec<usize> = merged.iter().map(|&d| d.div_ceil(max_dim)).collect();
    let total: usize = counts.iter().product();
    (0..total)
        .map(|b| {
            // Block coordinates, row-major over `counts`.
            let mut rem = b;
            let mut corner = vec![0usize; k];
            for j in (0..k).rev() {
                corner[j] = (rem % counts[j]) * max_dim;
                rem /= counts[j];
            }
            Block {
                dims: (0..k)
                    .map(|j| (merged[j] - corner[j]).min(max_dim))
                    .collect(),
                start: (0..k).map(|j| corner[j] * strides[j]).sum(),
                strides: strides.clone(),
            }
        })
        .collect()
}

/// The sizes of a parameter's factor matrices (each `n x n`), in slot order.
pub(crate) fn factor_dims(shape: &[usize], max_dim: usize) -> Vec<usize> {
    blocks(shape, max_dim)
        .into_iter()
        .flat_map(|b| b.dims)
        .collect()
}

/// Elements of a parameter's `factors` slot (`roots` has as many), from the
/// block counts alone: every mode's pieces (`max_dim`-sized, then the rest)
/// meet every piece of the other modes once. `numel` must not overflow.
pub(crate) fn factor_elements(shape: &[usize], max_dim: usize) -> u128 {
    let merged = merged_dims(shape, max_dim);
    let m = max_dim as u128;
    let counts: Vec<u128> = merged.iter().map(|&d| (d as u128).div_ceil(m)).collect();
    merged
        .iter()
        .enumerate()
        .map(|(j, &d)| {
            let d = d as u128;
            let squares = (d / m) * m * m + (d % m) * (d % m);
            let others: u128 = (0..counts.len())
                .filter(|&k| k != j)
                .map(|k| counts[k])
                .product();
            squares * others
        })
        .sum()
}

/// Initial state of a parameter: zero moments and factors, identity roots.
/// `numel` is the checked element count of `shape`.
pub(crate) fn initial_state<T: Real>(
    shape: &[usize],
    numel: usize,
    max_dim: usize,
    what: &str,
) -> crate::Result<Vec<Vec<T>>> {
    let moments = linalg::moment_buffers(numel, what)?;
    linalg::matrix_state(moments, &factor_dims(shape, max_dim), what)
}

/// Each block's share of a factor-length slot (factors or roots), in block
/// order.
fn per_block<'a, T>(blocks: &[Block], mut slot: &'a mut [T]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        let (mine, rest) = slot.split_at_mut(b.factor_len());
        out.push(mine);
        slot = rest;
    }
    out
}

/// Every run of every block as `(flat start, block, run)`, by start. The
/// blocks tile the tensor, so consecutive runs are disjoint.
fn run_order(blocks: &[Block]) -> Vec<(usize, usize, usize)> {
    let mut order: Vec<(usize, usize, usize)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(b, block)| block.runs().enumerate().map(move |(r, at)| (at, b, r)))
        .collect();
    order.sort_unstable();
    order
}

/// `x` split into each block's contiguous runs (`order` from
/// [`run_order`]), in block order and, within a block, run order, so every
/// block can update its own elements in parallel.
fn block_runs<'a, A>(
    blocks: &[Block],
    order: &[(usize, usize, usize)],
    x: &'a mut [A],
) -> Vec<Vec<&'a mut [A]>> {
    let mut out: Vec<Vec<Option<&'a mut [A]>>> = blocks
        .iter()
        .map(|b| (0..b.run_count()).map(|_| None).collect())
        .collect();
    let (mut rest, mut pos) = (x, 0);
    for &(at, b, r) in order {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - pos);
        let (run, tail) = tail.split_at_mut(blocks[b].run_len());
        out[b][r] = Some(run);
        rest = tail;
        pos = at + blocks[b].run_len();
    }
    out.into_iter()
        .map(|runs| {
            runs.into_iter()
                .map(|r| r.expect("the blocks tile the tensor"))
                .collect()
        })
        .collect()
}

/// (E1) for one tensor: every block's factors decay by `beta2` and gain the
/// mode Gram matrices of the block's (clipped) gradient, weighted by
/// `1 - beta2` (or 1 when `beta2 == 1`). Blocks and their factors run in
/// parallel. The first phase of a step: then [`root_jobs`] when the roots
/// are due, then [`step`].
pub(crate) fn accumulate<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    c: &ShampooConfig,
    prep: &P,
    shape: &[usize],
    g: &[G],
    state: &mut [Vec<T>],
) {
    let blocks = blocks(shape, c.max_preconditioner_dim);
    let weight = T::from_f64x(if c.beta2 == 1.0 { 1.0 } else { 1.0 - c.beta2 });
    let beta2 = T::from_f64x(c.beta2);
    blocks
        .par_iter()
        .zip(per_block(&blocks, &mut state[FACTORS]).into_par_iter())
        .for_each(|(block, l)| {
            // The gathered block lives in the thread's reused workspace: a
            // fresh megabyte-sized allocation per block and step would be
            // mapped and faulted in again every time.
            let numel = block.numel();
            linalg::with_workspace(linalg::buffer_scratch::<T>(numel), |stack| {
                let (mut gb, _) = linalg::buffer_in(numel, stack, |_| T::zero());
                block.gather_into(g, &mut gb, |x| prep.apply(x.get()));
                let gb = &*gb;
                let dims = &block.dims;
                let mut factors = Vec::with_capacity(dims.len());
                let mut rest = l;
                for &n in dims {
                    let (lj, r) = rest.split_at_mut(n * n);
                    factors.push(lj);
                    rest = r;
                }
                factors.par_iter_mut().enumerate().for_each(|(j, lj)| {
                    if c.beta2 != 1.0 {
                        lj.iter_mut().for_each(|x| *x *= beta2);
                    }
                    linalg::mode_gram_add(lj, gb, dims, j, weight);
                });
            });
        });
}

/// One factor's inverse root to recompute (E2-E4): its spec, the factor and
/// the root it replaces.
pub(crate) struct RootJob<'a, T> {
    spec: RootSpec,
    in_factor_precision: bool,
    factor: &'a [T],
    root: &'a mut [T],
}

impl<T: Real> RootJob<'_, T> {
    /// Recomputes the root; `false` when it failed and the old root stays.
    fn run(self) -> bool {
        let RootJob {
            spec,
            in_factor_precision,
            factor,
            root,
        } = self;
        (in_factor_precision && spec.compute::<T, T>(factor, root))
            || spec.compute::<f64, T>(factor, root)
    }
}

/// The inverse roots of one tensor due at step `t` (none unless
/// `c.recomputes(t)`), after [`accumulate`] added step `t`'s gradient.
pub(crate) fn root_jobs<'a, T: Real>(
    c: &ShampooConfig,
    t: u64,
    shape: &[usize],
    state: &'a mut [Vec<T>],
) -> Vec<RootJob<'a, T>> {
    if !c.recomputes(t) {
        return Vec::new();
    }
    let bias2 = if c.use_bias_correction && c.beta2 < 1.0 {
        1.0 - c.beta2.powf(t as f64)
    } else {
        1.0
    };
    let in_factor_precision =
        c.root_dtype == RootDtype::Factor && std::mem::size_of::<T>() < std::mem::size_of::<f64>();
    let blocks = blocks(shape, c.max_preconditioner_dim);
    let (factors, roots) = state[FACTORS..].split_at_mut(ROOTS - FACTORS);
    let (mut factors, mut roots) = (&factors[0][..], &mut roots[0][..]);
    let mut jobs = Vec::new();
    for block in &blocks {
        let order = block.dims.len();
        for &n in &block.dims {
            let (factor, f_rest) = factors.split_at(n * n);
            let (root, r_rest) = roots.split_at_mut(n * n);
            jobs.push(RootJob {
                spec: RootSpec {
                    n,
                    bias2,
                    epsilon: c.epsilon,
                    r: 2 * order,
                },
                in_factor_precision,
                factor,
                root,
            });
            (factors, roots) = (f_rest, r_rest);
        }
    }
    jobs
}

/// Runs root jobs (of any number of tensors) on all of rayon's threads,
/// largest first: each thread takes the next job when it finishes one, so
/// the few big eigendecompositions start early and the small ones fill the
/// gaps at the end (list scheduling, longest first). Returns the failures.
pub(crate) fn run_root_jobs<T: Real>(mut jobs: Vec<RootJob<'_, T>>) -> usize {
    jobs.sort_by_key(|job| std::cmp::Reverse(job.spec.n));
    let queue = Mutex::new(jobs.into_iter());
    let failures = AtomicUsize::new(0);
    rayon::scope(|s| {
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|_| loop {
                let next = queue.lock().map(|mut q| q.next());
                match next {
                    Ok(Some(job)) => {
                        if !job.run() {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // A poisoned queue means a job panicked; the scope
                    // re-raises that panic.
                    Ok(None) | Err(_) => break,
                }
            });
        }
    });
    failures.into_inner()
}

/// (E3)-(E10) for one tensor (`t` is the 1-based step), after
/// [`accumulate`] and any due [`root_jobs`]: graft accumulator, first
/// moment, preconditioned and grafted direction, decoupled weight decay.
/// Reads and writes `p` and the moment slots, reads the roots. Blocks run
/// in parallel (rayon); their matrix work is GEMMs in `T`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    c: &ShampooConfig,
    t: u64,
    (lr, wd): (f64, f64),
    prep: &P,
    shape: &[usize],
    p: &mut [T],
    g: &[G],
    state: &mut [Vec<T>],
) -> Sums {
    let blocks = blocks(shape, c.max_preconditioner_dim);
    let (moments, matrices) = state.split_at_mut(FACTORS);
    let roots = per_block(&blocks, &mut matrices[ROOTS - FACTORS]);
    let (m, v) = moments.split_at_mut(V);
    let order = run_order(&blocks);
    let runs = block_runs(&blocks, &order, p)
        .into_iter()
        .zip(block_runs(&blocks, &order, &mut m[M]))
        .zip(block_runs(&blocks, &order, &mut v[0]));
    let per_block_sums: Vec<Sums> = blocks
        .par_iter()
        .zip(roots.into_par_iter())
        .zip(runs.collect::<Vec<_>>().into_par_iter())
        .map(|((block, r), ((p, m), v))| {
            block_step(c, t, (lr, wd), block, (prep, g), BlockRuns { p, m, v }, r)
        })
        .collect();
    let mut sums = Sums::default();
    for s in per_block_sums {
        sums.param_sq += s.param_sq;
        sums.update_sq += s.update_sq;
    }
    sums
}

/// One block's runs of the parameter, first moment and graft accumulator.
struct BlockRuns<'a, T> {
    p: Vec<&'a mut [T]>,
    m: Vec<&'a mut [T]>,
    v: Vec<&'a mut [T]>,
}

/// SHAMPOO.md (E3)-(E10) for one block, in place on its runs of the
/// parameter and moments: `g` is the tensor's gradient and `prep` its clip;
/// `r` the block's inverse roots, one `n_j x n_j` matrix per dim. The
/// block-sized buffers (the direction and its mode products) live in the
/// thread's workspace.
fn block_step<T: Real, G: GradElem<T>, P: GradTransform<T>>(
    c: &ShampooConfig,
    t: u64,
    (lr, wd): (f64, f64),
    block: &Block,
    (prep, g): (&P, &[G]),
    runs: BlockRuns<'_, T>,
    r: &[T],
) -> Sums {
    let BlockRuns {
        p: mut p_runs,
        m: mut m_runs,
        v: mut v_runs,
    } = runs;
    let graft_only = t < c.start_step() && c.grafting != Grafting::None;
    let dims = &block.dims;
    let (numel, len) = (block.numel(), block.run_len());
    let mut roots: Vec<&[T]> = Vec::with_capacity(dims.len());
    let mut rest = r;
    for &n in dims {
        let (rj, rr) = rest.split_at(n * n);
        roots.push(rj);
        rest = rr;
    }
    let buffer = linalg::buffer_scratch::<T>(numel);
    let req = buffer.and(buffer).and(buffer);
    linalg::with_workspace(req, |stack| {
        // (E3) graft accumulator, (E5) first moment; `g_hat` in block order.
        let one = T::one();
        let bc1 = T::from_f64x(if c.use_bias_correction {
            1.0 - c.beta1.powf(t as f64)
        } else {
            1.0
        });
        let beta1 = T::from_f64x(c.beta1);
        let (mut g_hat, stack) = linalg::buffer_in(numel, stack, |_| T::zero());
        let g_runs = block.runs().map(|at| &g[at..at + len]);
        let out = g_hat.chunks_exact_mut(len);
        for (((gr, mr), vr), out) in g_runs.zip(&mut m_runs).zip(&mut v_runs).zip(out) {
            for (((gx, m), v), gh) in gr.iter().zip(mr.iter_mut()).zip(vr.iter_mut()).zip(out) {
                let gi = prep.apply(gx.get());
                match c.grafting {
                    Grafting::None => {}
                    Grafting::Adagrad { .. } => *v += gi * gi,
                    Grafting::Adam { beta2, .. } => {
                        let b2 = T::from_f64x(beta2);
                        *v = b2 * *v + (one - b2) * gi * gi;
                    }
                }
                if c.beta1 == 0.0 {
                    *gh = gi;
                } else {
                    *m = beta1 * *m + (one - beta1) * gi;
                    *gh = *m / bc1;
                }
            }
        }
        // (E6) graft direction.
        let graft_len = if c.grafting == Grafting::None {
            0
        } else {
            numel
        };
        let (mut graft, stack) = linalg::buffer_in(graft_len, stack, |_| T::zero());
        let (eps, bc2) = match c.grafting {
            Grafting::None => (0.0, 1.0),
            Grafting::Adagrad { eps } => (eps, 1.0),
            Grafting::Adam { beta2, eps } => (eps, 1.0 - beta2.powf(t as f64)),
        };
        // Adagrad's `bc2` is 1, and `v / 1` is `v` exactly.
        let (eps, bc2) = (T::from_f64x(eps), T::from_f64x(bc2));
        for ((vr, gh), dg) in v_runs
            .iter()
            .zip(g_hat.chunks_exact(len))
            .zip(graft.chunks_exact_mut(len))
        {
            for ((&v, &gh), dg) in vr.iter().zip(gh).zip(dg) {
                *dg = gh / ((v / bc2).sqrt() + eps);
            }
        }
        // (E7)-(E8) direction.
        let (mut scratch, _) = linalg::buffer_in(numel, stack, |_| T::zero());
        let delta: &[T] = if graft_only {
            &graft
        } else {
            let (mut d, mut spare) = (&mut g_hat[..], &mut scratch[..]);
            for (j, rj) in roots.iter().enumerate() {
                let n = dims[j];
                linalg::mode_product(spare, d, dims, j, linalg::view(rj, n, n));
                std::mem::swap(&mut d, &mut spare);
            }
            if graft_len > 0 {
                let norm = |x: &[T]| {
                    x.iter()
                        .map(|v| v.to_f64x() * v.to_f64x())
                        .sum::<f64>()
                        .sqrt()
                };
                let scale = T::from_f64x(norm(&graft) / (norm(d) + 1e-16));
                d.iter_mut().for_each(|x| *x *= scale);
            }
            d
        };
        // (E9)-(E10) decoupled weight decay and the update.
        let (lr, wd) = (T::from_f64x(lr), T::from_f64x(wd));
        let mut sums = Sums::default();
        for (pr, dr) in p_runs.iter_mut().zip(delta.chunks_exact(len)) {
            for (w, &d) in pr.iter_mut().zip(dr) {
                let old = *w;
                *w = old - lr * (d + wd * old);
                let change = (*w - old).to_f64x();
                sums.param_sq += old.to_f64x() * old.to_f64x();
                sums.update_sq += change * change;
            }
        }
        sums
    })
}

/// One inverse root to compute (SHAMPOO.md E2-E4): factor order `n`, the
/// factor's bias correction, epsilon and the root `r`.
struct RootSpec {
    n: usize,
    bias2: f64,
    epsilon: f64,
    r: usize,
}

impl RootSpec {
    /// Writes `Q diag((mu + shift)^(-1/r)) Q^T` of `A = L / bias2 + eps*I`
    /// (eigendecomposition in precision `E`, the epsilon shift of E3) into
    /// `root`; `false`, leaving `root` as it was, when the eigendecomposition
    /// fails or a value is not finite.
    fn compute<E: Real, T: Real>(&self, l: &[T], root: &mut [T]) -> bool {
        let n = self.n;
        let req = linalg::square_scratch::<E>(n)
            .and(linalg::sym_eigen_scratch::<E>(n))
            .and(linalg::spectral_apply_scratch::<T>(n));
        linalg::with_workspace(req, |stack| {
            let (a, stack) = linalg::square_in(n, stack, |j, column| {
                linalg::symmetric_column(l, j, column, |x| E::from_f64x(x.to_f64x() / self.bias2));
                // Rounded once, as `l / bias2 + epsilon` in f64.
                column[j] = E::from_f64x(l[j * n + j].to_f64x() / self.bias2 + self.epsilon);
            });
            let (eig, stack) = linalg::sym_eigen(a, stack);
            let Some(eig) = eig else {
                return false;
            };
            let min = eig.values.iter().copied().fold(f64::INFINITY, f64::min);
            let shift = if min < self.epsilon {
                self.epsilon - min
            } else {
                0.0
            };
            let exponent = -1.0 / self.r as f64;
            // Written in place: `spectral_apply` leaves `root` untouched
            // when it fails.
            linalg::spectral_apply(&eig, |m| (m + shift).powf(exponent), root, stack)
        })
    }
}
