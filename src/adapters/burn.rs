//! keel as a burn optimizer: [`KeelBurn`] implements
//! [`burn::optim::Optimizer`] (burn's per-parameter optimizer trait), so
//! `KeelBurn::new(config)?.init()` is a [`burn::optim::ModuleOptimizer`] that
//! steps any burn module.
//!
//! burn steps one parameter at a time and owns each parameter's state, so
//! each parameter gets its own one-tensor keel optimizer, kept in burn's
//! state slot ([`KeelBurnState`]) and saved in burn's optimizer record (the
//! slot names are keel's: `exp_avg`, `exp_avg_sq`, …, plus the step count).
//! Consequences of that per-parameter structure:
//! - `clip_global_norm` clips each parameter's gradient by its own norm, as
//!   burn's own `GradientClipping` does: neither clips module-wide (for that,
//!   scale the `GradientsParams` by the global norm before the step);
//! - a non-finite gradient skips that parameter's update only (under
//!   `on_nonfinite = "unchecked"` it is applied, and not counted below);
//! - parameter groups are burn's: give a second `KeelBurn` (e.g. with
//!   `weight_decay` 0) to [`burn::optim::ModuleOptimizer::with_group`].
//!
//! burn's trait cannot return errors, so a parameter step keel skips (a
//! non-finite gradient) or refuses (the same under `on_nonfinite = "error"`,
//! a non-`f32` parameter) leaves the parameter and its state unchanged and is
//! counted in [`KeelBurn::skipped_steps`], with [`KeelBurn::last_skip_reason`].
//! A loaded record that does not fit the optimizer (another kind, other
//! slots or shape) is refused the same way, and dropped: that parameter's
//! next step starts from a fresh state.
//!
//! ```
//! use burn::optim::GradientsParams;
//! use burn::tensor::{Device, Tensor};
//! use keel::adapters::burn::KeelBurn;
//! use keel::OptimizerConfig;
//!
//! let device = Device::default().autodiff();
//! let linear = burn::nn::LinearConfig::new(3, 1).init(&device);
//! let config = OptimizerConfig::from_json(r#"{"kind": "lamb", "lr": 0.01}"#)?;
//! let mut optim = KeelBurn::new(config)?.init();
//! let x = Tensor::<2>::ones([4, 3], &device);
//! let loss = linear.forward(x).powi_scalar(2).mean();
//! let grads = GradientsParams::from_grads(loss.backward(), &linear);
//! let _linear = optim.step(0.01, linear, grads);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use burn::optim::{LearningRate, ModuleOptimizer, RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_pack::Scalar;

use crate::backend::cpu::CpuOptimizer;
use crate::checkpoint::{StateData, StateDict, StateTensor};
use crate::config::{OptimizerConfig, KINDS};
use crate::error::{KeelError, Result};
use crate::group::ParamGroup;
use crate::optim::{state_slots, Optimizer as _};
use crate::tensor::ParamSpec;

/// The name of the one parameter in each per-parameter keel optimizer.
const PARAM: &str = "param";
/// The record scalar holding the kind (its index in [`KINDS`]), so a
/// record is not loaded into an optimizer of another kind.
const RECORD_KIND: &str = "kind";

/// A keel optimizer for burn modules; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct KeelBurn {
    config: OptimizerConfig,
    skipped: Arc<AtomicU64>,
    last_skip: Arc<Mutex<Option<String>>>,
}

impl KeelBurn {
    /// A burn optimizer running keel's `config` (its `lr` is replaced by the
    /// learning rate burn passes to each step).
    pub fn new(config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        if state_slots(&config.kind).len() > 2
            || matches!(
                config.kind,
                crate::OptimizerKind::Muon(_) | crate::OptimizerKind::Soap(_)
            )
        {
            return Err(KeelError::config(
                "kind",
                format!(
                    "`{}` is not available through the burn adapter yet",
                    config.kind.name()
                ),
            ));
        }
        Ok(KeelBurn {
            config,
            skipped: Arc::new(AtomicU64::new(0)),
            last_skip: Arc::new(Mutex::new(None)),
        })
    }

    /// The module optimizer burn trains with (`optim.step(lr, module, grads)`).
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }

    /// The keel configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Parameter steps skipped or refused (parameter and state left
    /// unchanged), counted across every clone of this optimizer (the
    /// `ModuleOptimizer` holds one).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Why the last skipped parameter step was skipped.
    pub fn last_skip_reason(&self) -> Option<String> {
        self.last_skip.lock().ok().and_then(|e| e.clone())
    }

    fn skip(&self, reason: String) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_skip.lock() {
            *last = Some(reason);
        }
    }

    /// The parameter's keel optimizer: its live one, one rebuilt from a
    /// loaded record, or a fresh one.
    fn tensor_optimizer(
        &self,
        state: Option<KeelTensorOptimizer>,
        shape: Vec<usize>,
    ) -> Result<CpuOptimizer<f32>> {
        match state {
            Some(KeelTensorOptimizer::Live(opt)) => Ok(opt),
            Some(KeelTensorOptimizer::Loaded(mut state)) => {
                // Records written since the kind was recorded name it.
                if let Some(kind) = state.extra.remove(RECORD_KIND) {
                    if kind != self.config.kind.name() {
                        return Err(KeelError::State(format!(
                            "the recorded state is for `{kind}`, this optimizer is `{}`",
                            self.config.kind.name()
                        )));
                    }
                }
                let mut opt = self.fresh(shape.clone())?;
                let spec = ParamSpec::new(PARAM, shape);
                let state = StateDict {
                    config: self.config.clone(),
                    groups: vec![ParamGroup::all(std::slice::from_ref(&spec))],
                    specs: vec![spec],
                    ..state
                };
                opt.load_state_dict_owned(state)?;
                Ok(opt)
            }
            None => self.fresh(shape),
        }
    }

    fn fresh(&self, shape: Vec<usize>) -> Result<CpuOptimizer<f32>> {
        let spec = ParamSpec::new(PARAM, shape);
        let group = ParamGroup::all(std::slice::from_ref(&spec));
        CpuOptimizer::with_groups(self.config.clone(), vec![spec], vec![group])
    }
}

/// The keel state of one parameter, kept by burn between steps.
///
/// The rank parameter is burn's; keel stores every rank the same way.
#[derive(Clone, Debug)]
pub struct KeelBurnState<const D: usize> {
    opt: KeelTensorOptimizer,
}

impl<const D: usize> KeelBurnState<D> {
    /// The keel state (config, step count, moments) of this parameter.
    pub fn state_dict(&self) -> Result<StateDict> {
        match &self.opt {
            KeelTensorOptimizer::Live(opt) => opt.state_dict(),
            KeelTensorOptimizer::Loaded(state) => Ok(state.clone()),
        }
    }
}

/// A parameter's one-tensor keel optimizer, or (just after loading a burn
/// record, where the config is not at hand) its state waiting for one.
#[derive(Clone, Debug)]
enum KeelTensorOptimizer {
    Live(CpuOptimizer<f32>),
    Loaded(StateDict),
}

impl burn::optim::Optimizer for KeelBurn {
    type State<const D: usize> = KeelBurnState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if tensor.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            self.skip(format!(
                "keel steps f32 burn parameters, got {:?} with a {:?} gradient",
                tensor.dtype(),
                grad.dtype()
            ));
            return (tensor, state);
        }
        let device = tensor.device();
        let Ok(grad) = grad.try_into_data() else {
            self.skip("could not read the gradient".into());
            return (tensor, state);
        };
        // burn deprecates ndarray in favour of flex, but it is the CPU
        // backend keel's `burn` feature builds and tests with.
        #[allow(deprecated)]
        let on_ndarray = device == Device::ndarray();
        let mut param = if on_ndarray {
            // ndarray hands over a tensor it holds alone without a copy, but
            // copies a shared one element by element (a 10M-parameter step
            // took 430 ms that way), and its reads cannot fail.
            match tensor.try_into_data() {
                Ok(p) => p,
                Err(e) => unreachable!("ndarray reads are infallible: {e:?}"),
            }
        } else {
            // Elsewhere a read can fail: read through a handle clone, so the
            // parameter can be given back unchanged.
            match tensor.clone().try_into_data() {
                Ok(p) => p,
                Err(e) => {
                    self.skip(format!("could not read the parameter: {e:?}"));
                    return (tensor, state);
                }
            }
        };
        let mut opt = match self.tensor_optimizer(state.map(|s| s.opt), param.shape().to_vec()) {
            Ok(opt) => opt,
            Err(e) => {
                // A recorded state that does not fit: this step is refused
                // (counted) and the record dropped, so the next one starts
                // from a fresh state.
                self.skip(e.to_string());
                return (Tensor::from_data(param, &device), None);
            }
        };
        // keel writes nothing when it errors or skips, so `opt` and `param`
        // are as they were in those cases.
        match step_f32(&mut opt, lr, &mut param, &grad) {
            Ok(stats) => {
                if let Some(reason) = stats.skipped {
                    self.skip(format!("{reason:?}"));
                }
            }
            Err(e) => self.skip(e.to_string()),
        }
        (
            Tensor::from_data(param, &device),
            Some(KeelBurnState {
                opt: KeelTensorOptimizer::Live(opt),
            }),
        )
    }

    fn to_device<const D: usize>(state: Self::State<D>, _device: &Device) -> Self::State<D> {
        // keel's state lives in host memory whatever the parameter's device.
        state
    }
}

/// One keel step of a one-tensor optimizer on host buffers.
fn step_f32(
    opt: &mut CpuOptimizer<f32>,
    lr: f64,
    param: &mut TensorData,
    grad: &TensorData,
) -> Result<crate::StepStats> {
    opt.set_lr(lr)?;
    let p = param
        .as_mut_slice::<f32>()
        .map_err(|e| KeelError::shape(PARAM, format!("{e:?}")))?;
    let g = grad
        .as_slice::<f32>()
        .map_err(|e| KeelError::shape(PARAM, format!("{e:?}")))?;
    opt.step(&mut [p], &[g])
}

impl<const D: usize> RecordState for KeelBurnState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        let Ok(state) = self.state_dict() else {
            return;
        };
        out.push_scalar(prefix, "step", Scalar::from(state.step));
        // burn records hold numbers and tensors: the kind goes as its index.
        if let Some(i) = KINDS.iter().position(|k| *k == state.config.kind.name()) {
            out.push_scalar(prefix, RECORD_KIND, Scalar::from(i as u64));
        }
        for t in &state.tensors {
            let slot = t.name.rsplit('/').next().unwrap_or(&t.name);
            let data = match &t.data {
                StateData::F32(v) => TensorData::new(v.clone(), t.shape.clone()),
                StateData::F64(v) => TensorData::new(v.clone(), t.shape.clone()),
            };
            out.push_tensor(prefix, slot, data);
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, _device: &Device) -> Option<Self> {
        let step = u64::try_from(src.take_scalar(prefix, "step")?).ok()?;
        let mut extra = BTreeMap::new();
        if let Some(i) = src.take_scalar(prefix, RECORD_KIND) {
            let kind = usize::try_from(u64::try_from(i).ok()?).ok()?;
            extra.insert(RECORD_KIND.to_string(), KINDS.get(kind)?.to_string());
        }
        // The kind (hence the slot names) is the optimizer's, unknown here:
        // take whichever of keel's slot names were recorded.
        let mut tensors = Vec::new();
        let mut shape = None;
        for slot in ["exp_avg", "exp_avg_sq", "momentum_buffer"] {
            if let Some(data) = src.take_tensor(prefix, slot) {
                let dims = data.shape().to_vec();
                let values = data.try_into_vec::<f32>().ok()?;
                shape = Some(dims.clone());
                tensors.push(StateTensor {
                    name: format!("{PARAM}/{slot}"),
                    shape: dims,
                    data: StateData::F32(values),
                });
            }
        }
        // Stateless kinds (plain SGD) have no tensors: their state is the step.
        let spec = ParamSpec::new(PARAM, shape.unwrap_or_default());
        let config = OptimizerConfig::from_json(r#"{"kind": "sgd", "lr": 0}"#).ok()?;
        Some(KeelBurnState {
            opt: KeelTensorOptimizer::Loaded(StateDict {
                config,
                step,
                dtype: "F32".into(),
                groups: vec![ParamGroup::all(std::slice::from_ref(&spec))],
                specs: vec![spec],
                tensors,
                extra,
            }),
        })
    }
}
