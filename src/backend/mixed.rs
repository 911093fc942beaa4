//! bf16 parameters with f32 master weights.
//!
//! The trainer's parameters (and gradients) are `bf16`; the optimizer keeps an
//! `f32` master copy and its `f32` state, runs the ordinary fused `f32` step on
//! the master weights, and rounds each chunk back to `bf16` while it is still
//! in cache — to nearest even, or stochastically so that updates smaller than
//! half a bf16 ulp still move the parameter in expectation.

use half::bf16;
use serde::{Deserialize, Serialize};

use crate::backend::cpu::{Bf16Out, CpuOptimizer};
use crate::checkpoint::{StateData, StateDict, StateTensor};
use crate::config::OptimizerConfig;
use crate::error::{KeelError, Result};
use crate::group::ParamGroup;
use crate::optim::Optimizer;
use crate::real::{GradElem, Real};
use crate::stats::StepStats;
use crate::tensor::ParamSpec;

/// How master weights are rounded to bf16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rounding {
    /// Round to nearest, ties to even.
    Nearest,
    /// Stochastic rounding: round up with probability equal to the discarded
    /// fraction. The random bits are a hash of (seed, step, tensor, element),
    /// so a resumed run rounds exactly as an uninterrupted one.
    Stochastic {
        /// The hash seed.
        seed: u64,
    },
}

/// splitmix64's finalizer: a cheap, well-mixed 64-bit hash.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rounds `x` to bf16, up in magnitude with probability equal to the 16
/// discarded mantissa bits' fraction (`noise` supplies 16 random bits).
#[inline(always)]
pub(crate) fn stochastic_bf16(x: f32, noise: u64) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    let bits = x.to_bits().wrapping_add((noise & 0xffff) as u32);
    let y = bf16::from_bits((bits >> 16) as u16);
    // A carry past the largest finite value would round to infinity.
    if y.is_infinite() {
        bf16::from_f32(x)
    } else {
        y
    }
}

impl Rounding {
    /// Writes `src` rounded to bf16 into `out` (element `offset` of `tensor`).
    #[inline(always)]
    pub(crate) fn write<T: Real>(
        &self,
        out: &mut [bf16],
        src: &[T],
        step: u64,
        tensor: usize,
        offset: usize,
    ) {
        match *self {
            Rounding::Nearest => {
                for (o, x) in out.iter_mut().zip(src) {
                    *o = x.to_bf16();
                }
            }
            Rounding::Stochastic { seed } => {
                let base = mix(seed ^ mix((step << 24) ^ tensor as u64));
                for (j, (o, x)) in out.iter_mut().zip(src).enumerate() {
                    *o = stochastic_bf16(x.to_f32x(), mix(base.wrapping_add((offset + j) as u64)));
                }
            }
        }
    }
}

/// An optimizer over bf16 parameters that keeps f32 master weights.
///
/// ```
/// use half::bf16;
/// use keel::{MixedPrecisionOptimizer, Optimizer, OptimizerConfig, ParamGroup, ParamSpec, Rounding};
///
/// let config = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.01}"#)?;
/// let specs = vec![ParamSpec::new("w", [3])];
/// let mut w = vec![bf16::from_f32(1.0); 3];
/// let groups = vec![ParamGroup::all(&specs)];
/// let mut opt = MixedPrecisionOptimizer::new(config, specs, groups, &[&w[..]], Rounding::Nearest)?;
/// let g = vec![bf16::from_f32(0.5); 3];
/// opt.step(&mut [&mut w[..]], &[&g[..]])?;
/// assert!(opt.master(0)[0] < 1.0);
/// # Ok::<(), keel::KeelError>(())
/// ```
#[derive(Debug, Clone)]
pub struct MixedPrecisionOptimizer {
    inner: CpuOptimizer<f32>,
    master: Vec<Vec<f32>>,
    rounding: Rounding,
}

impl MixedPrecisionOptimizer {
    /// An optimizer whose master weights start as the f32 values of `initial`.
    pub fn new(
        config: OptimizerConfig,
        specs: Vec<ParamSpec>,
        groups: Vec<ParamGroup>,
        initial: &[&[bf16]],
        rounding: Rounding,
    ) -> Result<Self> {
        let inner = CpuOptimizer::with_groups(config, specs, groups)?;
        if initial.len() != inner.specs().len() {
            return Err(KeelError::shape(
                "initial",
                format!(
                    "expected {} buffers, got {}",
                    inner.specs().len(),
                    initial.len()
                ),
            ));
        }
        let mut master = Vec::with_capacity(initial.len());
        for (spec, p) in inner.specs().iter().zip(initial) {
            if p.len() != spec.numel() {
                return Err(KeelError::shape(
                    &spec.name,
                    format!(
                        "shape {:?} needs {} elements, got {}",
                        spec.shape,
                        spec.numel(),
                        p.len()
                    ),
                ));
            }
            master.push(p.iter().map(|x| x.to_f32()).collect());
        }
        Ok(MixedPrecisionOptimizer {
            inner,
            master,
            rounding,
        })
    }

    /// The f32 master weights of parameter `tensor`.
    ///
    /// # Panics
    ///
    /// If `tensor` is not below the number of parameters, as slice indexing
    /// does (an index is the caller's, not input data).
    pub fn master(&self, tensor: usize) -> &[f32] {
        &self.master[tensor]
    }

    /// The inner f32 optimizer (state buffers, groups).
    pub fn inner(&self) -> &CpuOptimizer<f32> {
        &self.inner
    }

    /// The inner f32 optimizer, to change its state (e.g. SPAM's momentum
    /// reset, `Spam::after_step`). Stepping it directly would bypass the
    /// master weights and the bf16 copies: step through `self`.
    pub fn inner_mut(&mut self) -> &mut CpuOptimizer<f32> {
        &mut self.inner
    }

    /// A step with gradients of any supported element type (bf16 or f32).
    pub fn step_with_grads<G: GradElem<f32>>(
        &mut self,
        params: &mut [&mut [bf16]],
        grads: &[&[G]],
    ) -> Result<StepStats> {
        let mut master: Vec<&mut [f32]> = self.master.iter_mut().map(|m| &mut m[..]).collect();
        let out = Bf16Out {
            params,
            rounding: self.rounding,
        };
        self.inner.step_with(&mut master, grads, Some(out))
    }
}

impl Optimizer for MixedPrecisionOptimizer {
    type Param = [bf16];
    type Grad = [bf16];

    fn specs(&self) -> &[ParamSpec] {
        self.inner.specs()
    }

    fn config(&self) -> &OptimizerConfig {
        self.inner.config()
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.inner.set_lr(lr)
    }

    fn step_count(&self) -> u64 {
        self.inner.step_count()
    }

    fn step(&mut self, params: &mut [&mut [bf16]], grads: &[&[bf16]]) -> Result<StepStats> {
        self.step_with_grads(params, grads)
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = self.inner.state_dict()?;
        save_master(&mut sd, self.specs(), self.rounding, |i, _| {
            Ok(self.master[i].clone())
        })?;
        Ok(sd)
    }

    fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let (master, rounding) = read_master(sd, self.inner.specs())?;
        self.inner.load_state_dict(sd)?;
        self.master = master;
        self.rounding = rounding;
        Ok(())
    }

    /// Moves the master weights and the moments out of `sd` (one copy of
    /// the state in memory).
    fn load_state_dict_owned(&mut self, mut sd: StateDict) -> Result<()> {
        let (master, rounding) = take_master(&mut sd, self.inner.specs())?;
        self.inner.load_state_dict_owned(sd)?;
        self.master = master;
        self.rounding = rounding;
        Ok(())
    }
}

/// Adds the f32 master weights (`master(i, spec)` reads tensor `i`'s) and the
/// rounding mode to the state dict of the inner f32 optimizer: the state
/// both mixed-precision optimizers (CPU and CUDA) save.
pub(crate) fn save_master(
    sd: &mut StateDict,
    specs: &[ParamSpec],
    rounding: Rounding,
    master: impl Fn(usize, &ParamSpec) -> Result<Vec<f32>>,
) -> Result<()> {
    for (i, spec) in specs.iter().enumerate() {
        sd.tensors.push(StateTensor {
            name: format!("{}/master", spec.name),
            shape: spec.shape.clone(),
            data: StateData::F32(master(i, spec)?),
        });
    }
    let rounding = serde_json::to_string(&rounding).map_err(|e| KeelError::State(e.to_string()))?;
    sd.extra.insert("rounding".into(), rounding);
    Ok(())
}

/// The master weights and rounding mode [`save_master`] saved.
pub(crate) fn read_master(
    sd: &StateDict,
    specs: &[ParamSpec],
) -> Result<(Vec<Vec<f32>>, Rounding)> {
    let mut master = Vec::with_capacity(specs.len());
    for spec in specs {
        master.push(sd.tensor::<f32>(&format!("{}/master", spec.name), spec.numel())?);
    }
    Ok((master, saved_rounding(sd)?))
}

/// [`read_master`] that moves the master weights out of `sd`.
fn take_master(sd: &mut StateDict, specs: &[ParamSpec]) -> Result<(Vec<Vec<f32>>, Rounding)> {
    let rounding = saved_rounding(sd)?;
    let mut master = Vec::with_capacity(specs.len());
    for spec in specs {
        master.push(sd.take_tensor::<f32>(&format!("{}/master", spec.name), spec.numel())?);
    }
    Ok((master, rounding))
}

/// The master-weight rounding mode a mixed-precision state was saved with.
fn saved_rounding(sd: &StateDict) -> Result<Rounding> {
    let rounding = match sd.extra.get("rounding") {
        Some(r) => {
            serde_json::from_str(r).map_err(|e| KeelError::State(format!("rounding: {e}")))?
        }
        None => {
            return Err(KeelError::State(
                "no master-weight rounding mode in state".into(),
            ))
        }
    };
    Ok(rounding)
}
