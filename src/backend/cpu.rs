//! The CPU backend: every optimizer as fused, chunked, parallel passes.
//!
//! A step is
//! 1. a **scan** over the gradients (one read): non-finite check, per-tensor
//!    and global norms (and for LARS the sums its trust ratio needs). Nothing
//!    is written before it, so a skipped step leaves everything bit-identical.
//!    [`crate::NonFinitePolicy::Unchecked`] waives it where nothing else
//!    needs it ([`OptimizerConfig::skips_scan`]); the fused pass then sums
//!    the gradient's squares itself;
//! 2. one **fused pass** per tensor that reads parameter, gradient and state
//!    once and writes parameter and state once — or, where a per-tensor norm
//!    of the new direction is needed first (LAMB, AdamW with
//!    `update_clip_rms`), two passes that recompute the direction instead of
//!    storing it.
//!
//! Work is split into fixed 16K-element chunks across all tensors (so one huge
//! tensor and hundreds of small ones both use every core), run with rayon,
//! and per-chunk sums are added in chunk order: results do not depend on the
//! number of threads.

use std::path::Path;

use faer::Par;
use half::bf16;
use rayon::prelude::*;

use crate::backend::mixed::Rounding;
use crate::backend::reduce::{prefetch_ahead, run_simd, LaneSums, Lanes, SimdTask, Sums, BLOCK};
use crate::checkpoint::{self, StateData, StateDict, StateTensor};
use crate::clip::{global_clip_factor, update_clip_factor, GradPrep};
use crate::config::{NonFinitePolicy, OptimizerConfig, OptimizerKind};
use crate::error::{KeelError, Result};
use crate::group::{assign_groups, ParamGroup};
use crate::optim::{
    adam, initial_state, lars, lion, muon, sgd, shampoo, soap, state_lens, state_slots,
    trust_ratio, Optimizer,
};
use crate::real::{GradElem, Real};
use crate::stats::{SkipReason, StepStats, TensorStats};
use crate::tensor::ParamSpec;

/// Elements per parallel work item.
pub(crate) const CHUNK: usize = 1 << 14;

/// An optimizer whose parameters, gradients and state are host buffers of
/// `T` (`f32` for speed, `f64` for conformance).
#[derive(Debug, Clone)]
pub struct CpuOptimizer<T: Real> {
    config: OptimizerConfig,
    specs: Vec<ParamSpec>,
    groups: Vec<ParamGroup>,
    group_of: Vec<usize>,
    /// `state[tensor][slot]`, slots as [`state_slots`] names them.
    state: Vec<Vec<Vec<T>>>,
    step: u64,
}

/// Where a mixed-precision step writes its rounded parameters.
pub(crate) struct Bf16Out<'a, 'b> {
    pub params: &'a mut [&'b mut [bf16]],
    pub rounding: Rounding,
}

/// One parallel work item: a chunk of one tensor and of its state.
struct Chunk<'a, T, G> {
    tensor: usize,
    offset: usize,
    p: &'a mut [T],
    g: &'a [G],
    s0: &'a mut [T],
    s1: &'a mut [T],
    out: Option<&'a mut [bf16]>,
}

impl<T: Real> CpuOptimizer<T> {
    /// An optimizer over `specs`, all in one group.
    pub fn new(config: OptimizerConfig, specs: Vec<ParamSpec>) -> Result<Self> {
        let group = ParamGroup::all(&specs);
        Self::with_groups(config, specs, vec![group])
    }

    /// An optimizer over `specs` in parameter groups; every parameter must be
    /// in exactly one group.
    pub fn with_groups(
        config: OptimizerConfig,
        specs: Vec<ParamSpec>,
        groups: Vec<ParamGroup>,
    ) -> Result<Self> {
        config.validate()?;
        let group_of = assign_groups(&specs, &groups)?;
        check_muon_shapes(&config.kind, &specs)?;
        let state = specs
            .iter()
            .map(|s| initial_state(&config.kind, s))
            .collect::<Result<_>>()?;
        Ok(CpuOptimizer {
            config,
            specs,
            groups,
            group_of,
            state,
            step: 0,
        })
    }

    /// Rebuilds an optimizer from a state dict (e.g. a loaded checkpoint):
    /// its config, parameter specs, groups, step count and state.
    pub fn from_state_dict(state: &StateDict) -> Result<Self> {
        let (kind, specs) = (&state.config.kind, &state.specs);
        let (group_of, slots) = read_state::<T>(state, kind, T::DTYPE, "this one", specs)?;
        Self::rebuilt(state, group_of, slots)
    }

    /// [`from_state_dict`](Self::from_state_dict) that moves the buffers out
    /// of `state` instead of copying them.
    pub fn from_state_dict_owned(mut state: StateDict) -> Result<Self> {
        let (kind, specs) = (state.config.kind.clone(), state.specs.clone());
        let (group_of, slots) = take_state::<T>(&mut state, &kind, T::DTYPE, "this one", &specs)?;
        Self::rebuilt(&state, group_of, slots)
    }

    /// Rebuilds an optimizer from a state file written by
    /// [`Optimizer::save_state`], reading each buffer once: unlike
    /// [`new`](Self::new) followed by [`Optimizer::load_state`], no fresh
    /// state is allocated first, so the peak memory is one state. Errors name
    /// the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let state = checkpoint::load(path)?;
        Self::from_state_dict_owned(state).map_err(|e| checkpoint::in_file(path, e))
    }

    /// The optimizer of a checked state (see [`read_state`]).
    fn rebuilt(sd: &StateDict, group_of: Vec<usize>, state: SlotState<T>) -> Result<Self> {
        check_muon_shapes(&sd.config.kind, &sd.specs)?;
        Ok(CpuOptimizer {
            config: sd.config.clone(),
            specs: sd.specs.clone(),
            groups: sd.groups.clone(),
            group_of,
            state,
            step: sd.step,
        })
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// A state buffer of parameter `tensor` by slot name (e.g. `exp_avg`).
    pub fn state_buffer(&self, tensor: usize, slot: &str) -> Option<&[T]> {
        let i = state_slots(&self.config.kind)
            .iter()
            .position(|s| *s == slot)?;
        self.state.get(tensor).map(|s| &s[i][..])
    }

    /// Puts every state buffer back to its fresh value: moments, momentum
    /// and factor statistics zero, Shampoo's inverse roots and SOAP's
    /// eigenbases identities (so the next steps precondition with the
    /// identity until the next recompute, instead of updating by zero). The
    /// step count is kept, so bias corrections continue: a momentum reset
    /// after a spike.
    pub fn reset_state(&mut self) {
        for (spec, state) in self.specs.iter().zip(&mut self.state) {
            crate::optim::reset_state_in_place(&self.config.kind, spec, state);
        }
    }

    /// The fused passes of the elementwise optimizers.
    #[allow(clippy::too_many_arguments)]
    fn elementwise_passes<G: GradElem<T>>(
        specs: &[ParamSpec],
        kind: &OptimizerKind,
        chunks: &mut [Chunk<'_, T, G>],
        n: usize,
        t: u64,
        (lr_of, wd_of, trust_on): (&[f64], &[f64], &[bool]),
        s: f64,
        scan: &[Scan],
        (prep, sum_grad): (GradPrep<T>, bool),
        (step, rounding): (u64, Option<Rounding>),
        (trust, uclip): (&mut [Option<f64>], &mut [Option<f64>]),
    ) -> Vec<Sums> {
        match kind {
            OptimizerKind::Sgd(c) => {
                let k: Vec<sgd::SgdCoeffs<T>> = (0..n)
                    .map(|i| {
                        sgd::SgdCoeffs::new(
                            lr_of[i],
                            wd_of[i],
                            c.momentum,
                            c.dampening,
                            c.nesterov,
                            t == 1,
                        )
                    })
                    .collect();
                if c.momentum == 0.0 {
                    apply_pass(
                        chunks,
                        n,
                        (step, rounding),
                        &SgdPlain::new(&k, prep, sum_grad),
                    )
                } else {
                    apply_pass(
                        &mut *chunks,
                        n,
                        (step, rounding),
                        &SgdMomentum::new(&k, prep, sum_grad),
                    )
                }
            }
            OptimizerKind::Adam(c) => {
                let k: Vec<adam::AdamCoeffs<T>> = (0..n)
                    .map(|i| {
                        let mut k = adam::AdamCoeffs::new(c.beta1, c.beta2, c.eps, t);
                        k.l2 = T::from_f64x(wd_of[i]);
                        k.lr = T::from_f64x(lr_of[i]);
                        k
                    })
                    .collect();
                apply_pass(
                    chunks,
                    n,
                    (step, rounding),
                    &AdamStep::new(&k, prep, sum_grad),
                )
            }
            OptimizerKind::AdamW(c) => {
                let mut k: Vec<adam::AdamCoeffs<T>> = (0..n)
                    .map(|i| {
                        let mut k = adam::AdamCoeffs::new(c.beta1, c.beta2, c.eps, t);
                        k.decay = T::from_f64x(1.0 - lr_of[i] * wd_of[i]);
                        k.lr = T::from_f64x(lr_of[i]);
                        k
                    })
                    .collect();
                match c.update_clip_rms {
                    None => apply_pass(
                        chunks,
                        n,
                        (step, rounding),
                        &AdamStep::new(&k, prep, sum_grad),
                    ),
                    Some(max_rms) => {
                        let dir = moment_pass(chunks, n, &AdamMoments::new(&k, prep, false));
                        for i in 0..n {
                            let f =
                                update_clip_factor(dir[i].direction_sq, specs[i].numel(), max_rms);
                            uclip[i] = Some(f);
                            k[i].lr = T::from_f64x(lr_of[i] * f);
                        }
                        apply_pass(
                            chunks,
                            n,
                            (step, rounding),
                            &AdamApply::new(&k, prep, false),
                        )
                    }
                }
            }
            OptimizerKind::Lamb(c) => {
                let mut k: Vec<adam::AdamCoeffs<T>> = (0..n)
                    .map(|i| {
                        let mut k = adam::AdamCoeffs::new(c.beta1, c.beta2, c.eps, t);
                        k.wd_dir = T::from_f64x(wd_of[i]);
                        k
                    })
                    .collect();
                let dir = moment_pass(chunks, n, &AdamMomentsWithParams::new(&k, prep, false));
                for i in 0..n {
                    let r = if trust_on[i] {
                        let r = trust_ratio(
                            dir[i].param_sq.sqrt(),
                            dir[i].direction_sq.sqrt(),
                            1.0,
                            0.0,
                        );
                        trust[i] = Some(r);
                        r
                    } else {
                        1.0
                    };
                    k[i].lr = T::from_f64x(lr_of[i] * r);
                }
                apply_pass(
                    chunks,
                    n,
                    (step, rounding),
                    &AdamApply::new(&k, prep, false),
                )
            }
            OptimizerKind::Lars(c) => {
                let k: Vec<lars::LarsCoeffs<T>> = (0..n)
                    .map(|i| {
                        let r = if trust_on[i] {
                            let u = lars::direction_norm(&scan[i].sums, s, wd_of[i]);
                            let r = trust_ratio(
                                scan[i].sums.param_sq.sqrt(),
                                u,
                                c.trust_coefficient,
                                c.eps,
                            );
                            trust[i] = Some(r);
                            r
                        } else {
                            1.0
                        };
                        lars::LarsCoeffs::new(lr_of[i] * r, wd_of[i], c.momentum, c.nesterov)
                    })
                    .collect();
                apply_pass(chunks, n, (step, rounding), &LarsStep::new(&k, prep, false))
            }
            OptimizerKind::Lion(c) => {
                let k: Vec<lion::LionCoeffs<T>> = (0..n)
                    .map(|i| lion::LionCoeffs::new(lr_of[i], c.beta1, c.beta2, wd_of[i]))
                    .collect();
                apply_pass(
                    chunks,
                    n,
                    (step, rounding),
                    &LionStep::new(&k, prep, sum_grad),
                )
            }
            // Handled by `muon_pass`, before any chunks are made.
            OptimizerKind::Muon(_) | OptimizerKind::Shampoo(_) | OptimizerKind::Soap(_) => {
                vec![Sums::default(); n]
            }
        }
    }

    fn check_buffers<P, G>(&self, params: &[&mut [P]], grads: &[&[G]]) -> Result<()> {
        check_buffer_lens(
            &self.specs,
            params.iter().map(|p| p.len()),
            grads.iter().map(|g| g.len()),
        )
    }

    /// The step, generic over the gradient element type and with an optional
    /// bf16 copy of the updated parameters (mixed precision).
    pub(crate) fn step_with<G: GradElem<T>>(
        &mut self,
        params: &mut [&mut [T]],
        grads: &[&[G]],
        out: Option<Bf16Out<'_, '_>>,
    ) -> Result<StepStats> {
        self.check_buffers(params, grads)?;
        if let Some(o) = &out {
            self.check_buffers(o.params, grads)?;
        }
        let kind = self.config.kind.clone();
        let lr = kind.lr();
        let n = self.specs.len();

        // 1. Scan: read every gradient before anything is written, unless
        // the policy waives the check and nothing else needs the scan.
        let with_params = matches!(kind, OptimizerKind::Lars(_));
        let scan_prep = GradPrep::<T>::new(self.config.clip_value, 1.0);
        let unchecked = self.config.skips_scan();
        let mut scan = if unchecked {
            vec![Scan::default(); n]
        } else {
            scan(params, grads, &scan_prep, with_params)
        };
        let mut finite = vec![true; n];
        for (i, g) in grads.iter().enumerate() {
            if !unchecked && !scan[i].raw_sq.is_finite() {
                match recheck(g, params[i], &scan_prep, with_params) {
                    Some(sums) => scan[i].sums = sums,
                    None => finite[i] = false,
                }
            }
        }
        let mut grad_norms: Vec<f64> = scan
            .iter()
            .zip(&finite)
            .map(|(s, &ok)| if ok { s.sums.grad_sq.sqrt() } else { f64::NAN })
            .collect();
        let mut global_norm = grad_norms.iter().map(|x| x * x).sum::<f64>().sqrt();

        if finite.iter().any(|ok| !ok) {
            let bad: Vec<String> = finite
                .iter()
                .zip(&self.specs)
                .filter(|(ok, _)| !**ok)
                .map(|(_, s)| s.name.clone())
                .collect();
            if self.config.on_nonfinite == NonFinitePolicy::Error {
                return Err(KeelError::NonFiniteGradient { tensors: bad });
            }
            let tensors = grad_norms
                .iter()
                .zip(&finite)
                .map(|(&grad_norm, &finite)| TensorStats {
                    grad_norm,
                    update_norm: 0.0,
                    param_norm: f64::NAN,
                    trust_ratio: None,
                    update_clip_factor: None,
                    finite,
                })
                .collect();
            return Ok(StepStats {
                step: self.step,
                lr,
                global_grad_norm: global_norm,
                global_grad_norm_clipped: global_norm,
                clip_factor: 1.0,
                skipped: Some(SkipReason::NonFiniteGradient { tensors: bad }),
                preconditioner_failures: 0,
                tensors,
            });
        }

        // 2. Coefficients per tensor, then the fused pass(es).
        let s = global_clip_factor(global_norm, self.config.clip_global_norm);
        let prep = GradPrep::<T>::new(self.config.clip_value, s);
        let t = self
            .step
            .checked_add(1)
            .ok_or_else(|| KeelError::State(format!("the step count {} cannot grow", self.step)))?;
        let wd = kind.weight_decay();
        let group = |i: usize| &self.groups[self.group_of[i]];
        let lr_of: Vec<f64> = (0..n).map(|i| lr * group(i).lr_scale).collect();
        let wd_of: Vec<f64> = (0..n)
            .map(|i| if group(i).weight_decay { wd } else { 0.0 })
            .collect();
        // Finite in f64 is not finite in f32: a coefficient that overflows
        // `T` would turn every parameter it touches into inf.
        for (&l, &w) in lr_of.iter().zip(&wd_of) {
            for (what, x) in [("lr", l), ("lr x weight_decay", l * w)] {
                if !T::from_f64x(x).is_finite() {
                    return Err(KeelError::config(
                        format!("{}.lr", self.config.kind.name()),
                        format!("{what} = {x:e} overflows {}", T::DTYPE),
                    ));
                }
            }
        }
        let trust_on: Vec<bool> = (0..n).map(|i| group(i).trust_ratio).collect();
        let mut trust = vec![None; n];
        let mut uclip = vec![None; n];
        let step = self.step;
        let rounding = out.as_ref().map(|o| o.rounding);
        let mut preconditioner_failures = 0;
        let matrix_kind = matches!(
            kind,
            OptimizerKind::Muon(_) | OptimizerKind::Shampoo(_) | OptimizerKind::Soap(_)
        );
        let sums = if matrix_kind {
            let specs = &self.specs;
            // The clipping variant is a type parameter of each step.
            macro_rules! with_prep {
                (|$pr:ident| $body:expr) => {
                    match &prep {
                        GradPrep::Scale($pr) => $body,
                        GradPrep::ClampScale($pr) => $body,
                    }
                };
            }
            // Shampoo's factors first, then every due inverse root of every
            // tensor in one longest-first queue (the eigendecompositions are
            // most of a recomputing step, and balancing them across tensors
            // keeps both cores busy to the end), then the preconditioned
            // updates below.
            let mut root_failures = 0;
            if let OptimizerKind::Shampoo(c) = &kind {
                with_prep!(|pr| self
                    .state
                    .par_iter_mut()
                    .zip(grads.par_iter())
                    .zip(specs.par_iter())
                    .for_each(|((st, g), spec)| shampoo::accumulate(c, pr, &spec.shape, g, st)));
                let jobs = self
                    .state
                    .iter_mut()
                    .zip(specs)
                    .flat_map(|(st, spec)| shampoo::root_jobs(c, t, &spec.shape, st))
                    .collect();
                root_failures = shampoo::run_root_jobs(jobs);
            }
            let (sums, failures) = whole_tensor_pass(
                params,
                grads,
                &mut self.state,
                out,
                step,
                |i, p, g, st, par| {
                    let (lw, shape) = ((lr_of[i], wd_of[i]), &specs[i].shape[..]);
                    if p.is_empty() {
                        // Nothing to update, and no matrix to decompose (a
                        // 3x0 Gram matrix is 3x3 zeros, a 0x3 one empty).
                        return (Sums::default(), 0);
                    }
                    match &kind {
                        OptimizerKind::Muon(c) => {
                            let dims = (shape[0], shape[1]);
                            let b = &mut st[0];
                            (
                                with_prep!(|pr| muon::step(c, lw, pr, dims, p, g, b, par)),
                                0,
                            )
                        }
                        OptimizerKind::Shampoo(c) => (
                            with_prep!(|pr| shampoo::step(c, t, lw, pr, shape, p, g, st)),
                            0,
                        ),
                        OptimizerKind::Soap(c) => {
                            with_prep!(|pr| soap::step(c, t, lw, pr, shape, p, g, st, par))
                        }
                        _ => unreachable!("matrix kinds only"),
                    }
                },
            );
            preconditioner_failures = failures + root_failures;
            sums
        } else {
            let mut chunks = make_chunks(params, grads, &mut self.state, out);
            Self::elementwise_passes(
                &self.specs,
                &kind,
                &mut chunks,
                n,
                t,
                (&lr_of, &wd_of, &trust_on),
                s,
                &scan,
                (prep, unchecked),
                (step, rounding),
                (&mut trust, &mut uclip),
            )
        };
        self.step = t;
        if unchecked {
            // The norms came from the fused pass; a non-finite one means a
            // non-finite gradient was applied (reported, not undone), or, rarely,
            // squares that overflowed `T`.
            for (i, g) in grads.iter().enumerate() {
                let mut sq = sums[i].grad_sq;
                if !sq.is_finite() {
                    sq = match recheck(g, params[i], &scan_prep, false) {
                        Some(sums) => sums.grad_sq,
                        None => {
                            finite[i] = false;
                            f64::NAN
                        }
                    };
                }
                grad_norms[i] = sq.sqrt();
            }
            global_norm = grad_norms.iter().map(|x| x * x).sum::<f64>().sqrt();
        }

        let tensors = (0..n)
            .map(|i| TensorStats {
                grad_norm: grad_norms[i],
                update_norm: sums[i].update_sq.sqrt(),
                param_norm: sums[i].param_sq.sqrt(),
                trust_ratio: trust[i],
                update_clip_factor: uclip[i],
                finite: finite[i],
            })
            .collect();
        Ok(StepStats {
            step: t,
            lr,
            global_grad_norm: global_norm,
            global_grad_norm_clipped: global_norm * s,
            clip_factor: s,
            skipped: None,
            preconditioner_failures,
            tensors,
        })
    }
}

/// The scan pass: per tensor, `sum(g^2)` over the raw gradient (non-finite
/// exactly when some element is, barring overflow, which the caller rechecks);
/// with `clip_value`, also `sum(clamp(g)^2)`; with `with_params`, `sum(p^2)`
/// and `sum(clamp(g)*p)`.
fn scan<T: Real, G: GradElem<T>>(
    params: &[&mut [T]],
    grads: &[&[G]],
    prep: &GradPrep<T>,
    with_params: bool,
) -> Vec<Scan> {
    let work: Vec<(usize, &[G], &[T])> = grads
        .iter()
        .zip(params)
        .enumerate()
        .flat_map(|(i, (g, p))| {
            g.chunks(SCAN_CHUNK)
                .zip(p.chunks(SCAN_CHUNK))
                .map(move |(gc, pc)| (i, gc, pc))
        })
        .collect();
    let partial: Vec<(usize, Scan)> = work
        .into_par_iter()
        .map(|(i, g, p)| {
            let task = ScanChunk {
                g,
                p,
                prep,
                with_params,
            };
            (i, run_simd(task))
        })
        .collect();
    let mut out = vec![Scan::default(); params.len()];
    for (i, s) in &partial {
        out[*i].raw_sq += s.raw_sq;
        out[*i].sums.add(&s.sums);
    }
    out
}

/// The scan of one chunk.
struct ScanChunk<'a, T, G> {
    g: &'a [G],
    p: &'a [T],
    prep: &'a GradPrep<T>,
    with_params: bool,
}

/// Elements per scan work item: long enough that the stream runs for a
/// while once the prefetches have picked it up.
const SCAN_CHUNK: usize = 4 * CHUNK;

impl<T: Real, G: GradElem<T>> SimdTask for ScanChunk<'_, T, G> {
    type Output = Scan;
    #[inline(always)]
    fn run(self) -> Scan {
        let mut s = ScanLanes::default();
        let mut buf = [T::zero(); BLOCK];
        for (g, p) in self.g.chunks(BLOCK).zip(self.p.chunks(BLOCK)) {
            prefetch_ahead(g);
            if self.with_params {
                prefetch_ahead(p);
            }
            self.block(g, p, &mut buf, &mut s);
        }
        let raw_sq = s.raw_sq.total();
        let mut sums = s.sums.sums();
        if !self.prep.clamps() {
            sums.grad_sq = raw_sq;
        }
        Scan { raw_sq, sums }
    }
}

/// [`Scan`] while the scan of one chunk runs.
#[derive(Default)]
struct ScanLanes {
    raw_sq: Lanes,
    sums: LaneSums,
}

impl<T: Real, G: GradElem<T>> ScanChunk<'_, T, G> {
    #[inline(always)]
    fn block(&self, g: &[G], p: &[T], buf: &mut [T; BLOCK], s: &mut ScanLanes) {
        let raw = match G::as_native(g) {
            Some(native) => native,
            None => {
                for (c, g) in buf.iter_mut().zip(g) {
                    *c = g.get();
                }
                &buf[..g.len()]
            }
        };
        s.raw_sq.add_sq(raw);
        let clamped = if self.prep.clamps() {
            let mut out = [T::zero(); BLOCK];
            for (c, g) in out.iter_mut().zip(raw) {
                *c = self.prep.clamp(*g);
            }
            s.sums.grad_sq.add_sq(&out[..g.len()]);
            if self.with_params {
                s.sums.grad_dot_param.add_dot(&out[..g.len()], p);
            }
            true
        } else {
            false
        };
        if self.with_params {
            s.sums.param_sq.add_sq(p);
            if !clamped {
                s.sums.grad_dot_param.add_dot(raw, p);
            }
        }
    }
}

/// What the scan pass finds in one tensor.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// `sum(g^2)` of the raw gradient: finite iff every element is (or the
    /// f64 sum overflowed).
    raw_sq: f64,
    /// Norms of the clamped gradient (and LARS's parameter sums).
    sums: Sums,
}

/// The rare path after a non-finite sum of squares (from the scan or the
/// fused pass): `None` when some gradient element is NaN/Inf, else the sums
/// redone in f64 (the squares overflowed `T`).
fn recheck<T: Real, G: GradElem<T>>(
    g: &[G],
    p: &[T],
    prep: &GradPrep<T>,
    with_params: bool,
) -> Option<Sums> {
    g.iter()
        .all(|x| x.get().is_finite())
        .then(|| rescan_f64(g, p, prep, with_params))
}

/// The scan's sums of one tensor, accumulated element by element in f64:
/// the slow path for finite gradients whose squares overflow `T`.
fn rescan_f64<T: Real, G: GradElem<T>>(
    g: &[G],
    p: &[T],
    prep: &GradPrep<T>,
    with_params: bool,
) -> Sums {
    let mut sums = Sums::default();
    for (g, p) in g.iter().zip(p) {
        let g = prep.clamp(g.get()).to_f64x();
        sums.grad_sq += g * g;
        if with_params {
            let p = p.to_f64x();
            sums.param_sq += p * p;
            sums.grad_dot_param += g * p;
        }
    }
    sums
}

fn reduce_in_order(partial: Vec<(usize, Sums)>, n: usize) -> Vec<Sums> {
    let mut out = vec![Sums::default(); n];
    for (i, s) in &partial {
        out[*i].add(s);
    }
    out
}

fn make_chunks<'a, T: Real, G>(
    params: &'a mut [&mut [T]],
    grads: &'a [&[G]],
    state: &'a mut [Vec<Vec<T>>],
    out: Option<Bf16Out<'a, '_>>,
) -> Vec<Chunk<'a, T, G>> {
    let mut outs: Vec<Option<&'a mut [bf16]>> = match out {
        Some(o) => o.params.iter_mut().map(|b| Some(&mut **b)).collect(),
        None => (0..params.len()).map(|_| None).collect(),
    };
    let mut chunks = Vec::new();
    for (i, ((p, g), st)) in params
        .iter_mut()
        .zip(grads)
        .zip(state.iter_mut())
        .enumerate()
    {
        let len = p.len();
        let mut slots = st.iter_mut();
        let mut s0 = slot_chunks(slots.next(), len);
        let mut s1 = slot_chunks(slots.next(), len);
        let mut o = match outs[i].take() {
            Some(b) => b.chunks_mut(CHUNK).map(Some).collect::<Vec<_>>(),
            None => Vec::new(),
        }
        .into_iter();
        for (j, (pc, gc)) in p.chunks_mut(CHUNK).zip(g.chunks(CHUNK)).enumerate() {
            chunks.push(Chunk {
                tensor: i,
                offset: j * CHUNK,
                p: pc,
                g: gc,
                s0: s0.next().unwrap_or_default(),
                s1: s1.next().unwrap_or_default(),
                out: o.next().flatten(),
            });
        }
    }
    chunks
}

fn slot_chunks<T>(slot: Option<&mut Vec<T>>, len: usize) -> std::vec::IntoIter<&mut [T]> {
    match slot {
        Some(v) if v.len() == len => v.chunks_mut(CHUNK).collect::<Vec<_>>().into_iter(),
        _ => Vec::new().into_iter(),
    }
}

/// A fused kernel over one chunk, as a plain type so that [`run_simd`] can
/// compile it for AVX-512 or AVX2 (see [`SimdTask`]).
trait ChunkKernel<T: Real, G>: Sync {
    fn run(&self, c: &mut Chunk<'_, T, G>) -> Sums;
}

/// Defines a [`ChunkKernel`] holding per-tensor coefficients, the gradient
/// transform and whether to sum the gradient's squares (a step without a
/// scan), whose body sees the tensor's coefficients `k`, the transform
/// `prep`, the chunk `c` and that choice `sg`.
macro_rules! chunk_kernel {
    ($name:ident, $coeffs:ident, |$k:ident, $prep:ident, $c:ident, $sg:ident| $body:expr) => {
        struct $name<'a, T> {
            k: &'a [$coeffs<T>],
            prep: GradPrep<T>,
            sum_grad: bool,
        }
        impl<'a, T> $name<'a, T> {
            fn new(k: &'a [$coeffs<T>], prep: GradPrep<T>, sum_grad: bool) -> Self {
                $name { k, prep, sum_grad }
            }
        }
        impl<T: Real, G: GradElem<T>> ChunkKernel<T, G> for $name<'_, T> {
            #[inline(always)]
            fn run(&self, $c: &mut Chunk<'_, T, G>) -> Sums {
                let $k = &self.k[$c.tensor];
                let $sg = self.sum_grad;
                // One copy of the loop per gradient transform.
                match &self.prep {
                    GradPrep::Scale($prep) => $body,
                    GradPrep::ClampScale($prep) => $body,
                }
            }
        }
    };
}

use adam::AdamCoeffs;
use lars::LarsCoeffs;
use lion::LionCoeffs;
use sgd::SgdCoeffs;

chunk_kernel!(SgdPlain, SgdCoeffs, |k, prep, c, sg| sgd::step_plain(
    k, prep, c.p, c.g, sg
));
chunk_kernel!(SgdMomentum, SgdCoeffs, |k, prep, c, sg| sgd::step(
    k, prep, c.p, c.g, c.s0, sg
));
chunk_kernel!(AdamStep, AdamCoeffs, |k, prep, c, sg| if k.coupled() {
    adam::step::<_, _, _, true>(k, prep, c.p, c.g, c.s0, c.s1, sg)
} else {
    adam::step::<_, _, _, false>(k, prep, c.p, c.g, c.s0, c.s1, sg)
});
chunk_kernel!(AdamMoments, AdamCoeffs, |k, prep, c, _sg| adam::moments(
    k, prep, None, c.g, c.s0, c.s1
));
chunk_kernel!(AdamMomentsWithParams, AdamCoeffs, |k, prep, c, _sg| {
    adam::moments(k, prep, Some(&*c.p), c.g, c.s0, c.s1)
});
chunk_kernel!(AdamApply, AdamCoeffs, |k, _prep, c, _sg| adam::apply(
    k, c.p, c.s0, c.s1
));
chunk_kernel!(LarsStep, LarsCoeffs, |k, prep, c, _sg| lars::step(
    k, prep, c.p, c.g, c.s0
));
chunk_kernel!(LionStep, LionCoeffs, |k, prep, c, sg| lion::step(
    k, prep, c.p, c.g, c.s0, sg
));

/// One kernel on one chunk, as a [`SimdTask`].
struct KernelCall<'k, 'c, 'a, K, T, G> {
    kernel: &'k K,
    chunk: &'c mut Chunk<'a, T, G>,
    /// For mixed precision, the rounding and the step: the chunk's new
    /// master weights are rounded to its bf16 output right after the kernel,
    /// while they are still in cache, and in the same SIMD code.
    round: Option<(Rounding, u64)>,
}

impl<K: ChunkKernel<T, G>, T: Real, G> SimdTask for KernelCall<'_, '_, '_, K, T, G> {
    type Output = Sums;
    #[inline(always)]
    fn run(self) -> Sums {
        let sums = self.kernel.run(self.chunk);
        let c = self.chunk;
        if let (Some(out), Some((rounding, step))) = (c.out.as_deref_mut(), self.round) {
            rounding.write(out, c.p, step, c.tensor, c.offset);
        }
        sums
    }
}

/// Runs the final pass (the one that writes parameters) on every chunk, then,
/// for mixed precision, rounds the chunk's new master weights to bf16 while
/// they are still in cache.
fn apply_pass<T: Real, G: Sync, K: ChunkKernel<T, G>>(
    chunks: &mut [Chunk<'_, T, G>],
    n: usize,
    (step, rounding): (u64, Option<Rounding>),
    kernel: &K,
) -> Vec<Sums> {
    let round = rounding.map(|r| (r, step));
    let partial = chunks
        .par_iter_mut()
        .map(|chunk| {
            let tensor = chunk.tensor;
            (
                tensor,
                run_simd(KernelCall {
                    kernel,
                    chunk,
                    round,
                }),
            )
        })
        .collect();
    reduce_in_order(partial, n)
}

/// Runs pass A of a two-pass optimizer (writes state only, so there is no
/// bf16 copy to round).
fn moment_pass<T: Real, G: Sync, K: ChunkKernel<T, G>>(
    chunks: &mut [Chunk<'_, T, G>],
    n: usize,
    kernel: &K,
) -> Vec<Sums> {
    apply_pass(chunks, n, (0, None), kernel)
}

impl<T: Real> Optimizer for CpuOptimizer<T> {
    type Param = [T];
    type Grad = [T];

    fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.config.set_lr(lr)
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn step(&mut self, params: &mut [&mut [T]], grads: &[&[T]]) -> Result<StepStats> {
        self.step_with(params, grads, None)
    }

    fn state_dict(&self) -> Result<StateDict> {
        build_state_dict(
            &self.config,
            self.step,
            T::DTYPE,
            &self.specs,
            &self.groups,
            &self.state,
            |data, _| Ok(StateData::from_slice(data)),
        )
    }

    fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let (group_of, state) =
            read_state::<T>(sd, &self.config.kind, T::DTYPE, "this one", &self.specs)?;
        self.install(sd, group_of, state);
        Ok(())
    }

    /// Moves the buffers out of `sd` instead of copying them.
    fn load_state_dict_owned(&mut self, mut sd: StateDict) -> Result<()> {
        let (group_of, state) = take_state::<T>(
            &mut sd,
            &self.config.kind,
            T::DTYPE,
            "this one",
            &self.specs,
        )?;
        self.install(&sd, group_of, state);
        Ok(())
    }
}

impl<T: Real> CpuOptimizer<T> {
    /// Takes a checked state: `sd`'s config, groups and step, and `state`.
    fn install(&mut self, sd: &StateDict, group_of: Vec<usize>, state: SlotState<T>) {
        self.config = sd.config.clone();
        self.groups = sd.groups.clone();
        self.group_of = group_of;
        self.state = state;
        self.step = sd.step;
    }
}

/// Checks that there is one parameter and one gradient buffer per spec, each
/// with the spec's element count (`params` and `gradients` are the buffers'
/// lengths): the step's input check, shared with the CUDA backend.
pub(crate) fn check_buffer_lens(
    specs: &[ParamSpec],
    params: impl ExactSizeIterator<Item = usize>,
    grads: impl ExactSizeIterator<Item = usize>,
) -> Result<()> {
    let n = specs.len();
    if params.len() != n || grads.len() != n {
        return Err(KeelError::shape(
            "step",
            format!(
                "expected {n} parameter and gradient buffers, got {} and {}",
                params.len(),
                grads.len()
            ),
        ));
    }
    for ((spec, p), g) in specs.iter().zip(params).zip(grads) {
        let want = spec.numel();
        if p != want || g != want {
            return Err(KeelError::shape(
                &spec.name,
                format!(
                    "shape {:?} has {want} elements; parameter has {p}, gradient {g}",
                    spec.shape
                ),
            ));
        }
    }
    Ok(())
}

/// Muon updates 2-D matrices only: an error naming the first parameter of
/// another rank. Shared with the CUDA backend.
pub(crate) fn check_muon_shapes(kind: &OptimizerKind, specs: &[ParamSpec]) -> Result<()> {
    if !matches!(kind, OptimizerKind::Muon(_)) {
        return Ok(());
    }
    match specs.iter().find(|s| s.shape.len() != 2) {
        Some(s) => Err(KeelError::shape(
            &s.name,
            format!(
                "muon updates 2-D matrices only, this parameter has shape {:?}; \
                 give it to a second optimizer (e.g. adamw)",
                s.shape
            ),
        )),
        None => Ok(()),
    }
}

/// The state dict of an optimizer whose state is `state[tensor][slot]` (slots
/// as [`state_slots`] names them), computing in `dtype`; `data(buffer, spec)`
/// reads a buffer. Per-parameter buffers keep the parameter's shape; others
/// (Shampoo's factors) are flat. Shared with the CUDA backend.
pub(crate) fn build_state_dict<B>(
    config: &OptimizerConfig,
    step: u64,
    dtype: &str,
    specs: &[ParamSpec],
    groups: &[ParamGroup],
    state: &[Vec<B>],
    data: impl Fn(&B, &ParamSpec) -> Result<StateData>,
) -> Result<StateDict> {
    let slots = state_slots(&config.kind);
    let mut tensors = Vec::with_capacity(specs.len() * slots.len());
    for (spec, state) in specs.iter().zip(state) {
        for (slot, buffer) in slots.iter().zip(state) {
            let data = data(buffer, spec)?;
            tensors.push(StateTensor {
                name: format!("{}/{}", spec.name, slot),
                shape: if data.len() == spec.numel() {
                    spec.shape.clone()
                } else {
                    vec![data.len()]
                },
                data,
            });
        }
    }
    Ok(StateDict {
        config: config.clone(),
        step,
        dtype: dtype.to_string(),
        specs: specs.to_vec(),
        groups: groups.to_vec(),
        tensors,
        extra: Default::default(),
    })
}

/// Optimizer state: `state[tensor][slot]`, one buffer each.
pub(crate) type SlotState<T> = Vec<Vec<Vec<T>>>;

/// Checks that `sd` fits an optimizer of `kind` over `specs` computing in
/// `dtype` (`this` names that optimizer in the error), and reads its state,
/// each buffer as long as a fresh one: the group assignment and
/// `state[tensor][slot]`. Changes nothing, so a bad state changes nothing.
/// Shared with the CUDA backend.
pub(crate) fn read_state<T: Real>(
    sd: &StateDict,
    kind: &OptimizerKind,
    dtype: &str,
    this: &str,
    specs: &[ParamSpec],
) -> Result<(Vec<usize>, SlotState<T>)> {
    let group_of = check_state(sd, kind, dtype, this, specs)?;
    let state = collect_state(&sd.config.kind, specs, |name, len| {
        sd.tensor::<T>(name, len)
    })?;
    Ok((group_of, state))
}

/// [`read_state`] that moves the buffers out of `sd` (which a failure leaves
/// partly emptied; the optimizer is not touched either way).
pub(crate) fn take_state<T: Real>(
    sd: &mut StateDict,
    kind: &OptimizerKind,
    dtype: &str,
    this: &str,
    specs: &[ParamSpec],
) -> Result<(Vec<usize>, SlotState<T>)> {
    let group_of = check_state(sd, kind, dtype, this, specs)?;
    let saved_kind = sd.config.kind.clone();
    let state = collect_state(&saved_kind, specs, |name, len| {
        sd.take_tensor::<T>(name, len)
    })?;
    Ok((group_of, state))
}

/// The checks of [`read_state`]; returns the group assignment.
fn check_state(
    sd: &StateDict,
    kind: &OptimizerKind,
    dtype: &str,
    this: &str,
    specs: &[ParamSpec],
) -> Result<Vec<usize>> {
    if sd.config.kind.name() != kind.name() {
        return Err(KeelError::State(format!(
            "state is for `{}`, optimizer is `{}`",
            sd.config.kind.name(),
            kind.name()
        )));
    }
    if sd.dtype != dtype {
        return Err(KeelError::State(format!(
            "state was saved by an optimizer computing in {}, {this} computes in {dtype}",
            sd.dtype
        )));
    }
    sd.check_specs(specs)?;
    sd.config.validate()?;
    assign_groups(specs, &sd.groups)
}

/// Every buffer of a state of `kind` over `specs`, each from `buffer(name,
/// len)` with the length of a fresh one ([`state_lens`]).
fn collect_state<T: Real>(
    kind: &OptimizerKind,
    specs: &[ParamSpec],
    mut buffer: impl FnMut(&str, usize) -> Result<Vec<T>>,
) -> Result<SlotState<T>> {
    let slots = state_slots(kind);
    let mut state = Vec::with_capacity(specs.len());
    for spec in specs {
        let lens = state_lens(kind, spec)?;
        let mut bufs = Vec::with_capacity(slots.len());
        for (slot, len) in slots.iter().zip(lens) {
            let name = format!("{}/{}", spec.name, slot);
            let buf = buffer(&name, len)?;
            if SUMS_OF_SQUARES.contains(slot) {
                refuse_negative(&name, &buf)?;
            }
            bufs.push(buf);
        }
        state.push(bufs);
    }
    Ok(state)
}

/// State slots that hold (averages of) squared gradients: Adam's, LAMB's and
/// SOAP's second moment and Shampoo's grafting accumulator.
const SUMS_OF_SQUARES: [&str; 2] = ["exp_avg_sq", "graft"];

/// Refuses a loaded second moment with a negative element: no step writes
/// one, and its square root would turn the parameters to NaN at the next
/// step, far from the file that caused it.
fn refuse_negative<T: Real>(name: &str, buf: &[T]) -> Result<()> {
    match buf.iter().position(|x| *x < T::zero()) {
        None => Ok(()),
        Some(i) => Err(KeelError::State(format!(
            "`{name}` holds {} at element {i}: a second moment is never negative \
             (the state is damaged, or was not written by keel)",
            buf[i].to_f64x()
        ))),
    }
}

/// The step of a matrix optimizer (Muon, Shampoo, SOAP): each tensor whole
/// (its math needs the matrix), tensors in parallel; a lone tensor
/// parallelizes its matrix products instead. `tensor_step(i, p, g, state,
/// par)` updates tensor `i` and returns its sums and the eigendecompositions
/// it failed to recompute (Shampoo's roots are computed before this pass);
/// the bf16 copy (mixed precision) is written right after.
fn whole_tensor_pass<T: Real, G: GradElem<T>>(
    params: &mut [&mut [T]],
    grads: &[&[G]],
    state: &mut [Vec<Vec<T>>],
    out: Option<Bf16Out<'_, '_>>,
    step: u64,
    tensor_step: impl Fn(usize, &mut [T], &[G], &mut [Vec<T>], Par) -> (Sums, usize) + Sync,
) -> (Vec<Sums>, usize) {
    let par = if params.len() == 1 {
        Par::rayon(0)
    } else {
        Par::Seq
    };
    let rounding = out.as_ref().map(|o| o.rounding);
    let mut outs: Vec<Option<&mut [bf16]>> = match out {
        Some(o) => o.params.iter_mut().map(|b| Some(&mut **b)).collect(),
        None => (0..params.len()).map(|_| None).collect(),
    };
    let results: Vec<(Sums, usize)> = params
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(state.par_iter_mut())
        .zip(outs.par_iter_mut())
        .enumerate()
        .map(|(i, (((p, g), st), o))| {
            let r = tensor_step(i, p, g, st, par);
            if let (Some(o), Some(rounding)) = (o.as_deref_mut(), rounding) {
                rounding.write(o, p, step, i, 0);
            }
            r
        })
        .collect();
    let failures = results.iter().map(|(_, f)| f).sum();
    (results.into_iter().map(|(s, _)| s).collect(), failures)
}

#[cfg(test)]
mod tests {
    //! Every SIMD level of this CPU gives the same bits, kernel by kernel:
    //! the other tests and the conformance run exercise only the best level.
    use super::*;
    use crate::backend::reduce::{levels, run_at, Level};
    use crate::bench::fill as values;

    fn sum_bits(s: &Sums) -> [u64; 5] {
        [
            s.param_sq,
            s.update_sq,
            s.grad_sq,
            s.grad_dot_param,
            s.direction_sq,
        ]
        .map(f64::to_bits)
    }

    /// The bits of `p, s0, s1`, of `p` rounded to bf16 by `rounding` and of
    /// the sums after `kernel` on one chunk of `n` elements at `level`.
    fn kernel_bits<K: ChunkKernel<f32, f32>>(
        kernel: &K,
        rounding: Rounding,
        level: Level,
        n: usize,
    ) -> Vec<u64> {
        let mut p = values(n, 1, 1.0);
        let g = values(n, 2, 0.3);
        let mut s0 = values(n, 3, 0.01);
        let mut s1: Vec<f32> = values(n, 4, 1e-3).iter().map(|x| x.abs()).collect();
        let mut out = vec![bf16::ZERO; n];
        let mut chunk = Chunk {
            tensor: 0,
            offset: 0,
            p: &mut p,
            g: &g,
            s0: &mut s0,
            s1: &mut s1,
            out: Some(&mut out),
        };
        let task = KernelCall {
            kernel,
            chunk: &mut chunk,
            round: Some((rounding, 7)),
        };
        let sums = run_at(level, task);
        let buffers = p.iter().chain(&s0).chain(&s1).map(|x| x.to_bits() as u64);
        let rounded = out.iter().map(|x| x.to_bits() as u64);
        buffers.chain(rounded).chain(sum_bits(&sums)).collect()
    }

    /// The bits of the scan's sums over `n` elements at `level`.
    fn scan_bits(prep: &GradPrep<f32>, level: Level, n: usize) -> Vec<u64> {
        let (g, p) = (values(n, 5, 0.3), values(n, 6, 1.0));
        let task = ScanChunk {
            g: &g,
            p: &p,
            prep,
            with_params: true,
        };
        let scan = run_at(level, task);
        let mut bits = vec![scan.raw_sq.to_bits()];
        bits.extend(sum_bits(&scan.sums));
        bits
    }

    #[test]
    fn simd_levels_agree_bit_for_bit() {
        let mut adamw = adam::AdamCoeffs::<f32>::new(0.9, 0.999, 1e-8, 3);
        adamw.decay = 0.999;
        adamw.lr = 1e-2;
        let mut adam_l2 = adamw;
        adam_l2.decay = 1.0;
        adam_l2.l2 = 0.1;
        let mut lamb = adam::AdamCoeffs::<f32>::new(0.9, 0.999, 1e-6, 3);
        lamb.wd_dir = 0.01;
        lamb.lr = 1e-3;
        let sgd = [sgd::SgdCoeffs::<f32>::new(0.1, 0.01, 0.9, 0.1, true, false)];
        let lion = [lion::LionCoeffs::<f32>::new(1e-3, 0.9, 0.99, 0.1)];
        let lars = [lars::LarsCoeffs::<f32>::new(0.05, 1e-4, 0.9, false)];
        let (adamw, adam_l2, lamb) = ([adamw], [adam_l2], [lamb]);
        // With and without `clip_value`, with and without the gradient's sum
        // (the step without a scan); lengths with partial blocks and lanes.
        let preps = [GradPrep::new(None, 0.7), GradPrep::new(Some(0.15), 0.7)];
        for (prep, sum_grad) in preps.into_iter().flat_map(|p| [(p, false), (p, true)]) {
            for n in [5, 1037, 3 * BLOCK + 40] {
                let (near, stoch) = (Rounding::Nearest, Rounding::Stochastic { seed: 11 });
                let sg = sum_grad;
                let off = false;
                let bits = |level| {
                    vec![
                        kernel_bits(&AdamStep::new(&adamw, prep, sg), near, level, n),
                        kernel_bits(&AdamStep::new(&adamw, prep, sg), stoch, level, n),
                        kernel_bits(&AdamStep::new(&adam_l2, prep, sg), near, level, n),
                        kernel_bits(&AdamMoments::new(&lamb, prep, off), near, level, n),
                        kernel_bits(
                            &AdamMomentsWithParams::new(&lamb, prep, off),
                            near,
                            level,
                            n,
                        ),
                        kernel_bits(&AdamApply::new(&lamb, prep, off), near, level, n),
                        kernel_bits(&SgdPlain::new(&sgd, prep, sg), near, level, n),
                        kernel_bits(&SgdMomentum::new(&sgd, prep, sg), near, level, n),
                        kernel_bits(&LionStep::new(&lion, prep, sg), near, level, n),
                        kernel_bits(&LarsStep::new(&lars, prep, off), near, level, n),
                        scan_bits(&prep, level, n),
                    ]
                };
                let baseline = bits(Level::Baseline);
                for level in levels() {
                    assert!(
                        bits(level) == baseline,
                        "{level:?} differs from the baseline at n = {n}, {prep:?}, sum_grad {sg}"
                    );
                }
            }
        }
    }
}
