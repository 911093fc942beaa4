//! keel as a [`candle_nn::Optimizer`]: any keel optimizer over candle `Var`s.
//!
//! [`KeelCandle`] updates contiguous `f32` or `f64` CPU `Var`s in place with
//! keel's fused step: it write-locks every `Var`'s storage (through candle's
//! in-place op hook) and read-locks every gradient, so a step allocates no
//! tensor-sized temporaries. The math, clipping, non-finite policy and
//! checkpoint format are keel's.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Optimizer as _, VarBuilder, VarMap};
//! use keel::adapters::candle::KeelCandle;
//! use keel::OptimizerConfig;
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let lin = candle_nn::linear(2, 1, vb.pp("fc"))?;
//! let config = OptimizerConfig::from_json(r#"{"kind": "lamb", "lr": 0.01}"#)?;
//! let mut opt = KeelCandle::from_varmap_with(&varmap, config, keel::adapters::no_decay_for_bias_and_norm)?;
//! let x = Tensor::new(&[[1f32, 2.0]], &Device::Cpu)?;
//! let loss = candle_core::Module::forward(&lin, &x)?.sqr()?.sum_all()?;
//! opt.backward_step(&loss)?;
//! assert!(opt.last_stats().unwrap().skipped.is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cell::RefCell;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};
use candle_nn::VarMap;

use crate::backend::cpu::CpuOptimizer;
use crate::checkpoint::StateDict;
use crate::config::OptimizerConfig;
use crate::error::KeelError;
use crate::group::ParamGroup;
use crate::optim::Optimizer;
use crate::real::Real;
use crate::stats::StepStats;
use crate::tensor::ParamSpec;

/// A keel optimizer over candle `Var`s, usable wherever candle expects a
/// [`candle_nn::Optimizer`].
///
/// Every `Var` must be a contiguous CPU tensor, all of one dtype (`f32` or
/// `f64`; the optimizer computes in that dtype). Each step needs a gradient
/// for every `Var`. A non-finite gradient follows the config's
/// `on_nonfinite` policy: by default the step is skipped, `Var`s and state
/// stay bit-identical, and [`KeelCandle::last_stats`] says why.
#[derive(Debug)]
pub struct KeelCandle {
    vars: Vec<Var>,
    inner: Inner,
    last_stats: Option<StepStats>,
    /// An invalid learning rate from [`candle_nn::Optimizer::set_learning_rate`]
    /// (which cannot fail), reported by the next step.
    bad_lr: Option<f64>,
}

/// The keel optimizer in the `Var`s' dtype.
#[derive(Debug)]
enum Inner {
    F32(CpuOptimizer<f32>),
    F64(CpuOptimizer<f64>),
}

/// Runs `$body` with `$opt` bound to the inner optimizer, whatever its dtype.
macro_rules! with_inner {
    ($inner:expr, $opt:ident => $body:expr) => {
        match $inner {
            Inner::F32($opt) => $body,
            Inner::F64($opt) => $body,
        }
    };
}

fn wrap(e: KeelError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text)
}

impl KeelCandle {
    /// An optimizer over named `Var`s in parameter groups (`None`: one group).
    /// The names are the ones keel's statistics and checkpoints use.
    pub fn with_names(
        vars: Vec<(String, Var)>,
        config: OptimizerConfig,
        groups: Option<Vec<ParamGroup>>,
    ) -> candle_core::Result<Self> {
        let mut specs = Vec::with_capacity(vars.len());
        let mut dtype = None;
        for (name, var) in &vars {
            check_cpu_contiguous(name, var.as_tensor(), "parameter")?;
            match (dtype, var.dtype()) {
                (_, d) if d != DType::F32 && d != DType::F64 => {
                    return Err(msg(format!(
                        "keel: `{name}` is {d:?}; keel steps f32 or f64 Vars"
                    )))
                }
                (Some(first), d) if first != d => {
                    return Err(msg(format!(
                        "keel: `{name}` is {d:?} but earlier Vars are {first:?}; \
                         one optimizer steps one dtype"
                    )))
                }
                (_, d) => dtype = Some(d),
            }
            specs.push(ParamSpec::new(name.clone(), var.dims()));
        }
        // A Var given twice (or two views of one buffer) would be stepped
        // twice per step; the step refuses it too, but say so here, by name.
        let mut keys: Vec<(usize, &str)> = vars
            .iter()
            .map(|(name, var)| (storage_key(var.as_tensor()), name.as_str()))
            .collect();
        keys.sort_unstable();
        if let Some(w) = keys.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(msg(format!(
                "keel: `{}` and `{}` share one storage (the same Var twice?)",
                w[0].1, w[1].1
            )));
        }
        let groups = groups.unwrap_or_else(|| vec![ParamGroup::all(&specs)]);
        let inner = match dtype {
            Some(DType::F64) => {
                Inner::F64(CpuOptimizer::with_groups(config, specs, groups).map_err(wrap)?)
            }
            // f32, or no Vars at all (keel then reports "no parameters").
            _ => Inner::F32(CpuOptimizer::with_groups(config, specs, groups).map_err(wrap)?),
        };
        Ok(KeelCandle {
            vars: vars.into_iter().map(|(_, v)| v).collect(),
            inner,
            last_stats: None,
            bad_lr: None,
        })
    }

    /// An optimizer over every `Var` of `varmap` (sorted by name), in one group.
    pub fn from_varmap(varmap: &VarMap, config: OptimizerConfig) -> candle_core::Result<Self> {
        Self::from_varmap_with(varmap, config, |_| {
            ParamGroup::new("all", Vec::<String>::new())
        })
    }

    /// An optimizer over every `Var` of `varmap` (sorted by name), grouped by
    /// `rule`: it returns the group template (name and options, e.g.
    /// [`crate::adapters::no_decay_for_bias_and_norm`]) of each `Var` name;
    /// templates of the same name form one group.
    pub fn from_varmap_with(
        varmap: &VarMap,
        config: OptimizerConfig,
        rule: impl FnMut(&str) -> ParamGroup,
    ) -> candle_core::Result<Self> {
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| msg("keel: the VarMap's lock is poisoned".into()))?
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        // HashMap order is random; checkpoints need a stable order.
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let groups = super::collect_groups(&names, rule);
        Self::with_names(named, config, Some(groups))
    }

    /// The statistics of the last step (`None` before the first).
    pub fn last_stats(&self) -> Option<&StepStats> {
        self.last_stats.as_ref()
    }

    /// The `Var`s, in keel's parameter order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The registered parameters (names and shapes), in `Var` order.
    pub fn specs(&self) -> &[ParamSpec] {
        with_inner!(&self.inner, opt => opt.specs())
    }

    /// The keel configuration (its `lr` is the last valid learning rate set;
    /// a refused one is kept aside and makes every step an error).
    pub fn config(&self) -> &OptimizerConfig {
        with_inner!(&self.inner, opt => opt.config())
    }

    /// Steps taken (skipped steps do not count).
    pub fn step_count(&self) -> u64 {
        with_inner!(&self.inner, opt => opt.step_count())
    }

    /// A host copy of the optimizer state (see [`Optimizer::state_dict`]).
    pub fn state_dict(&self) -> crate::Result<StateDict> {
        with_inner!(&self.inner, opt => opt.state_dict())
    }

    /// Restores a state from [`KeelCandle::state_dict`].
    pub fn load_state_dict(&mut self, state: &StateDict) -> crate::Result<()> {
        with_inner!(&mut self.inner, opt => opt.load_state_dict(state))
    }

    /// Writes the optimizer state as keel's safetensors checkpoint, atomically
    /// (the `Var`s themselves are saved by candle, e.g. `VarMap::save`).
    pub fn save_state(&self, path: &Path) -> crate::Result<()> {
        with_inner!(&self.inner, opt => opt.save_state(path))
    }

    /// Reads a state written by [`KeelCandle::save_state`].
    pub fn load_state(&mut self, path: &Path) -> crate::Result<()> {
        with_inner!(&mut self.inner, opt => opt.load_state(path))
    }

    /// One keel step from `grads`; the statistics are also kept for
    /// [`KeelCandle::last_stats`].
    pub fn step_with_stats(&mut self, grads: &GradStore) -> candle_core::Result<&StepStats> {
        if let Some(lr) = self.bad_lr {
            return Err(msg(format!(
                "keel: learning rate {lr} is invalid (must be finite and >= 0)"
            )));
        }
        let stats = match &mut self.inner {
            Inner::F32(opt) => step_typed(opt, &self.vars, grads)?,
            Inner::F64(opt) => step_typed(opt, &self.vars, grads)?,
        };
        Ok(self.last_stats.insert(stats))
    }
}

impl candle_nn::Optimizer for KeelCandle {
    type Config = OptimizerConfig;

    /// Names the `Var`s `var0`, `var1`, … in order; use
    /// [`KeelCandle::from_varmap`] for real names and groups.
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> candle_core::Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("var{i}"), v))
            .collect();
        Self::with_names(named, config, None)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_with_stats(grads).map(|_| ())
    }

    /// The rate last set, even one refused (then every step errors until a
    /// valid one is set).
    fn learning_rate(&self) -> f64 {
        self.bad_lr.unwrap_or_else(|| self.config().lr())
    }

    fn set_learning_rate(&mut self, lr: f64) {
        let ok = with_inner!(&mut self.inner, opt => opt.set_lr(lr)).is_ok();
        self.bad_lr = (!ok).then_some(lr);
    }
}

/// The float types a candle `Var` can hold for keel.
trait CandleReal: Real + candle_core::WithDType {
    fn vec_mut(storage: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

impl CandleReal for f32 {
    fn vec_mut(storage: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CandleReal for f64 {
    fn vec_mut(storage: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

fn check_cpu_contiguous(name: &str, t: &Tensor, what: &str) -> candle_core::Result<()> {
    if !t.device().is_cpu() {
        return Err(msg(format!(
            "keel: {what} `{name}` is on {:?}; only CPU tensors are supported yet",
            t.device().location()
        )));
    }
    if !t.is_contiguous() {
        return Err(msg(format!("keel: {what} `{name}` is not contiguous")));
    }
    Ok(())
}

/// The address of a tensor's storage: equal for tensors sharing one buffer.
fn storage_key(t: &Tensor) -> usize {
    let (storage, _) = t.storage_and_layout();
    &*storage as *const Storage as usize
}

/// The elements of a contiguous tensor within its storage.
fn contiguous_range(layout: &Layout, name: &str) -> candle_core::Result<std::ops::Range<usize>> {
    layout
        .contiguous_offsets()
        .map(|(start, end)| start..end)
        .ok_or_else(|| msg(format!("keel: `{name}` is not contiguous")))
}

fn step_typed<T: CandleReal>(
    opt: &mut CpuOptimizer<T>,
    vars: &[Var],
    grads: &GradStore,
) -> candle_core::Result<StepStats> {
    let specs = opt.specs();
    if vars.len() != specs.len() {
        return Err(msg("keel: Var count changed".into()));
    }
    let mut grad_tensors = Vec::with_capacity(vars.len());
    for (var, spec) in vars.iter().zip(specs) {
        let g = grads.get(var.as_tensor()).ok_or_else(|| {
            msg(format!(
                "keel: no gradient for `{}`; keel steps every Var together (global \
                 norm, non-finite check), so build it over the Vars the loss uses",
                spec.name
            ))
        })?;
        check_cpu_contiguous(&spec.name, g, "gradient")?;
        if g.dtype() != var.dtype() || g.dims() != var.dims() {
            return Err(msg(format!(
                "keel: gradient of `{}` is {:?} {:?}, the Var is {:?} {:?}",
                spec.name,
                g.dtype(),
                g.dims(),
                var.dtype(),
                var.dims()
            )));
        }
        grad_tensors.push(g);
    }
    // Locking one storage twice would deadlock (or alias a &mut): refuse
    // Vars that share a buffer with each other or with a gradient.
    let mut keys: Vec<usize> = vars.iter().map(|v| storage_key(v.as_tensor())).collect();
    keys.extend(grad_tensors.iter().map(|g| storage_key(g)));
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(msg(
            "keel: Vars share storage with each other or with their gradients".into(),
        ));
    }
    let guards: Vec<_> = grad_tensors
        .iter()
        .map(|g| g.storage_and_layout())
        .collect();
    let mut grad_slices: Vec<&[T]> = Vec::with_capacity(guards.len());
    for ((storage, layout), spec) in guards.iter().zip(specs) {
        let range = contiguous_range(layout, &spec.name)?;
        match &**storage {
            Storage::Cpu(cpu) => grad_slices.push(&cpu.as_slice::<T>()?[range]),
            _ => {
                return Err(msg(format!(
                    "keel: gradient of `{}` is not on the CPU",
                    spec.name
                )))
            }
        }
    }
    let mut run = |params: &mut [&mut [T]]| opt.step(params, &grad_slices);
    if vars.len() <= NESTED_ON_CALLER {
        return with_var_slices(vars, Vec::with_capacity(vars.len()), &mut run)?.map_err(wrap);
    }
    // The locks nest one stack frame per Var: a model's worth of them would
    // overflow the caller's stack (an abort, not an error), so they run on a
    // thread whose stack grows with the count.
    let stack = NESTED_STACK_BASE.saturating_add(vars.len().saturating_mul(NESTED_STACK_PER_VAR));
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("keel-candle-step".into())
            .stack_size(stack)
            .spawn_scoped(scope, || {
                with_var_slices(vars, Vec::with_capacity(vars.len()), &mut run)
            })
            .map_err(|e| msg(format!("keel: cannot start the step's thread: {e}")))?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?
    .map_err(wrap)
}

/// Vars whose nested locks run on the caller's stack (a few KiB each).
const NESTED_ON_CALLER: usize = 64;
/// The step thread's stack: this much for the step itself (rayon's workers
/// have their own stacks) ...
const NESTED_STACK_BASE: usize = 4 << 20;
/// ... plus this much per nested lock, well above the ~5 KiB a level takes in
/// a debug build (untouched stack pages are never committed).
const NESTED_STACK_PER_VAR: usize = 32 << 10;

type StepFn<'f, T> = dyn FnMut(&mut [&mut [T]]) -> crate::Result<StepStats> + 'f;

/// Write-locks each `Var`'s storage in turn (candle exposes one storage per
/// in-place op, so the locks nest) and calls `f` with all of them at once.
fn with_var_slices<T: CandleReal>(
    vars: &[Var],
    mut acc: Vec<&mut [T]>,
    f: &mut StepFn<'_, T>,
) -> candle_core::Result<crate::Result<StepStats>> {
    let Some((var, rest)) = vars.split_first() else {
        return Ok(f(&mut acc));
    };
    let nest = Nest {
        acc: RefCell::new(Some(acc)),
        rest,
        f: RefCell::new(f),
        out: RefCell::new(None),
    };
    var.inplace_op1(&nest)?;
    nest.out
        .into_inner()
        .ok_or_else(|| msg("keel: candle did not run the in-place step".into()))?
}

/// One level of [`with_var_slices`]: adds this `Var`'s buffer and recurses.
struct Nest<'a, 'r, 'f, 'g, T> {
    acc: RefCell<Option<Vec<&'a mut [T]>>>,
    rest: &'r [Var],
    f: RefCell<&'f mut StepFn<'g, T>>,
    out: RefCell<Option<candle_core::Result<crate::Result<StepStats>>>>,
}

impl<T: CandleReal> candle_core::InplaceOp1 for Nest<'_, '_, '_, '_, T> {
    fn name(&self) -> &'static str {
        "keel-step"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let range = contiguous_range(layout, "Var")?;
        let data = T::vec_mut(storage)
            .ok_or_else(|| msg("keel: a Var changed dtype since the optimizer was built".into()))?;
        let slice = data
            .get_mut(range)
            .ok_or_else(|| msg("keel: a Var's layout is outside its storage".into()))?;
        let mut acc = self.acc.borrow_mut().take().unwrap_or_default();
        acc.push(slice);
        let mut f = self.f.borrow_mut();
        let out = with_var_slices(self.rest, acc, &mut **f);
        *self.out.borrow_mut() = Some(out);
        Ok(())
    }
}
