//! The optimizer trait and the per-element math of each optimizer.
//!
//! Each file holds one optimizer family's math as small fused kernels over a
//! chunk of a tensor; [`crate::backend::cpu`] runs them in parallel over
//! chunks and decides the passes. LAMB is the Adam direction plus weight decay
//! scaled by [`trust_ratio`] (two passes of `adam`); LARS is
//! `lars` with the same trust ratio.

use std::path::Path;

use crate::checkpoint::{self, StateDict};
use crate::config::{OptimizerConfig, OptimizerKind};
use crate::error::Result;
use crate::stats::StepStats;
use crate::tensor::ParamSpec;

pub(crate) mod adam;
pub(crate) mod lars;
pub(crate) mod linalg;
pub(crate) mod lion;
pub mod muon;
pub(crate) mod sgd;
pub mod shampoo;
pub(crate) mod soap;

/// One optimizer over named flat parameter buffers, whatever the backend.
///
/// `Param` and `Grad` are the buffer types the backend updates: `[f32]` or
/// `[f64]` host slices for [`crate::CpuOptimizer`], `[bf16]` for
/// [`crate::MixedPrecisionOptimizer`] (and device buffers for a GPU backend).
/// Buffers are passed in the order of [`Optimizer::specs`], one per parameter.
pub trait Optimizer {
    /// The parameter buffer type.
    type Param: ?Sized;
    /// The gradient buffer type.
    type Grad: ?Sized;

    /// The registered parameters, in buffer order.
    fn specs(&self) -> &[ParamSpec];

    /// The configuration (its `lr` is the current base learning rate).
    fn config(&self) -> &OptimizerConfig;

    /// The current base learning rate.
    fn lr(&self) -> f64 {
        self.config().lr()
    }

    /// Sets the base learning rate for the following steps (e.g. from a
    /// [`crate::Schedule`]); negative or non-finite values are an error.
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// Steps taken so far (skipped steps do not count).
    fn step_count(&self) -> u64;

    /// Updates every parameter from its gradient and returns the statistics.
    ///
    /// Non-finite gradients skip the step (nothing is written) or return an
    /// error, per [`crate::NonFinitePolicy`] (under its `Unchecked`, a step
    /// without the gradient scan applies them and reports them in the
    /// statistics). Buffers whose count or lengths do
    /// not match [`Optimizer::specs`] are an error and nothing is written.
    fn step(&mut self, params: &mut [&mut Self::Param], grads: &[&Self::Grad])
        -> Result<StepStats>;

    /// A host copy of the whole optimizer state (config, step count, groups,
    /// moments), the same for every backend.
    fn state_dict(&self) -> Result<StateDict>;

    /// Restores a state from [`Optimizer::state_dict`]: parameters must match
    /// by name and shape, and the kind and dtype must match. Everything else
    /// comes from the state, as a resumed run needs it: the step count, the
    /// moments, and also the config (learning rate, betas, weight decay,
    /// clipping) and the parameter groups, replacing this optimizer's. A
    /// state that does not fit changes nothing.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;

    /// [`Optimizer::load_state_dict`] for a state the caller no longer
    /// needs: backends that can move its buffers in instead of copying them
    /// (the CPU ones) do, so loading holds one copy of the state.
    fn load_state_dict_owned(&mut self, state: StateDict) -> Result<()> {
        self.load_state_dict(&state)
    }

    /// Writes the state as a safetensors file, atomically.
    fn save_state(&self, path: &Path) -> Result<()> {
        checkpoint::save(path, &self.state_dict()?)
    }

    /// Reads a state written by [`Optimizer::save_state`]; a state that does
    /// not fit is an error naming the file ([`checkpoint::in_file`]).
    /// The file is read one tensor at a time
    /// ([`Optimizer::load_state_dict_owned`] then takes the buffers).
    fn load_state(&mut self, path: &Path) -> Result<()> {
        let state = checkpoint::load(path)?;
        self.load_state_dict_owned(state)
            .map_err(|e| checkpoint::in_file(path, e))
    }
}

/// The LAMB/LARS trust ratio `coefficient * ||p|| / (||u|| + eps)`, or 1 when
/// either norm is 0 (optax `scale_by_trust_ratio`).
///
/// ```
/// assert_eq!(keel::optim::trust_ratio(2.0, 4.0, 1.0, 0.0), 0.5);
/// assert_eq!(keel::optim::trust_ratio(0.0, 4.0, 1.0, 0.0), 1.0);
/// ```
pub fn trust_ratio(param_norm: f64, update_norm: f64, coefficient: f64, eps: f64) -> f64 {
    if param_norm == 0.0 || update_norm == 0.0 {
        1.0
    } else {
        coefficient * param_norm / (update_norm + eps)
    }
}

/// Names of the per-parameter state buffers of a kind, in storage order
/// (torch's names where torch has the optimizer).
pub fn state_slots(kind: &OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Sgd(c) if c.momentum == 0.0 => &[],
        OptimizerKind::Sgd(_) => &["momentum_buffer"],
        OptimizerKind::Adam(_) | OptimizerKind::AdamW(_) | OptimizerKind::Lamb(_) => {
            &["exp_avg", "exp_avg_sq"]
        }
        OptimizerKind::Lars(_) => &["momentum_buffer"],
        OptimizerKind::Lion(_) => &["exp_avg"],
        OptimizerKind::Muon(_) => &["momentum_buffer"],
        OptimizerKind::Shampoo(_) => &["exp_avg", "graft", "factors", "roots"],
        OptimizerKind::Soap(_) => &["exp_avg", "exp_avg_sq", "factors", "bases"],
    }
}

/// Puts the state of one parameter back to its fresh value in place (see
/// [`initial_state`]): zero, but Shampoo's roots and SOAP's eigenbases
/// identities again. `state` must have the lengths of a fresh state.
pub(crate) fn reset_state_in_place<T: crate::real::Real>(
    kind: &OptimizerKind,
    spec: &ParamSpec,
    state: &mut [Vec<T>],
) {
    match kind {
        OptimizerKind::Shampoo(c) => linalg::reset_matrix_state(
            state,
            &shampoo::factor_dims(&spec.shape, c.max_preconditioner_dim),
        ),
        OptimizerKind::Soap(c) => {
            linalg::reset_matrix_state(state, &soap::factor_dims(&spec.shape, c))
        }
        _ => state.iter_mut().for_each(|slot| slot.fill(T::zero())),
    }
}

/// A fresh state for one parameter: one buffer per [`state_slots`] name,
/// zero (Shampoo's inverse roots and SOAP's eigenbases start as identities,
/// and their factor slots hold every block's `n x n` matrices, so their
/// lengths differ).
///
/// A shape whose element count overflows is a [`crate::KeelError::Shape`]
/// error and a buffer the allocator refuses a [`crate::KeelError::Memory`]
/// error, not an abort.
pub(crate) fn initial_state<T: crate::real::Real>(
    kind: &OptimizerKind,
    spec: &ParamSpec,
) -> crate::Result<Vec<Vec<T>>> {
    let numel = checked_numel(spec)?;
    let what = format!("the optimizer state of `{}`", spec.name);
    match kind {
        OptimizerKind::Shampoo(c) => {
            shampoo::initial_state(&spec.shape, numel, c.max_preconditioner_dim, &what)
        }
        OptimizerKind::Soap(c) => soap::initial_state(&spec.shape, numel, c, &what),
        _ => state_slots(kind)
            .iter()
            .map(|_| crate::memory::try_zeros(numel, &what))
            .collect(),
    }
}

/// The element count of `spec`, or a [`crate::KeelError::Shape`] error when
/// it overflows.
fn checked_numel(spec: &ParamSpec) -> crate::Result<usize> {
    spec.checked_numel().ok_or_else(|| {
        crate::KeelError::shape(
            &spec.name,
            format!(
                "shape {:?} has more elements than fit in memory",
                spec.shape
            ),
        )
    })
}

/// The length of each buffer [`initial_state`] gives `spec`, without
/// allocating them (loading a state needs the lengths only; Shampoo's and
/// SOAP's fresh identities would cost real memory).
pub(crate) fn state_lens(kind: &OptimizerKind, spec: &ParamSpec) -> crate::Result<Vec<usize>> {
    let numel = checked_numel(spec)?;
    let factors = match kind {
        OptimizerKind::Shampoo(c) => {
            shampoo::factor_elements(&spec.shape, c.max_preconditioner_dim)
        }
        OptimizerKind::Soap(c) => soap::factor_dims(&spec.shape, c)
            .iter()
            .map(|&n| (n as u128).pow(2))
            .sum(),
        _ => return Ok(vec![numel; state_slots(kind).len()]),
    };
    let factors = usize::try_from(factors).map_err(|_| {
        crate::KeelError::shape(
            &spec.name,
            format!(
                "the preconditioner factors of shape {:?} do not fit in memory",
                spec.shape
            ),
        )
    })?;
    Ok(vec![numel, numel, factors, factors])
}

/// Bytes of the state [`initial_state`] gives `spec` at `elem_bytes` per
/// element (saturating at `u128::MAX`): what an optimizer holds beyond the
/// parameters and gradients.
pub(crate) fn state_bytes(kind: &OptimizerKind, spec: &ParamSpec, elem_bytes: usize) -> u128 {
    let Some(numel) = spec.checked_numel() else {
        return u128::MAX;
    };
    let numel = numel as u128;
    if numel * elem_bytes as u128 > isize::MAX as u128 {
        // No buffer of it can exist; do not walk its blocks either.
        return u128::MAX;
    }
    // Two moments, then the factor matrices twice (factors, and roots or
    // bases). Shampoo's are counted without listing its blocks, which may be
    // many.
    let elements = match kind {
        OptimizerKind::Shampoo(c) => {
            2 * numel + 2 * shampoo::factor_elements(&spec.shape, c.max_preconditioner_dim)
        }
        OptimizerKind::Soap(c) => {
            let dims = soap::factor_dims(&spec.shape, c);
            2 * numel + 2 * dims.iter().map(|&n| (n as u128).pow(2)).sum::<u128>()
        }
        _ => state_slots(kind).len() as u128 * numel,
    };
    elements.saturating_mul(elem_bytes as u128)
}

/// Bytes moved per parameter by one CPU step of `config` at element size
/// `elem` (4 for f32), counting every pass, and the minimum any
/// implementation must move (read parameter, gradient and state once, write
/// parameter and state once).
///
/// ```
/// # use keel::OptimizerConfig;
/// let c = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.001}"#).unwrap();
/// assert_eq!(keel::optim::bytes_per_param(&c, 4), (32, 28));
/// // Without the gradient scan (see `NonFinitePolicy::Unchecked`):
/// let c = OptimizerConfig::from_json(
///     r#"{"kind": "adamw", "lr": 0.001, "on_nonfinite": "unchecked"}"#,
/// ).unwrap();
/// assert_eq!(keel::optim::bytes_per_param(&c, 4), (28, 28));
/// ```
pub fn bytes_per_param(config: &OptimizerConfig, elem: usize) -> (usize, usize) {
    // Buffers the size of the parameter (Shampoo's factors are per block).
    let slots = match &config.kind {
        OptimizerKind::Shampoo(_) | OptimizerKind::Soap(_) => 2,
        kind => state_slots(kind).len(),
    };
    let minimum = (2 + slots + 1 + slots) * elem;
    let streams = match &config.kind {
        // scan reads g, and (LARS) p; then one fused pass.
        OptimizerKind::Lars(_) => 2 + minimum / elem,
        // scan g; pass A reads g, m, v (+p for lamb) and writes m, v; pass B
        // reads p, m, v and writes p.
        OptimizerKind::AdamW(c) if c.update_clip_rms.is_some() => 1 + 5 + 4,
        OptimizerKind::Lamb(_) => 1 + 6 + 4,
        // scan g; momentum reads g, b and writes b; Newton–Schulz works on a
        // copy of the matrix (counted once read, once written); the update
        // reads p and writes p.
        OptimizerKind::Muon(_) => 1 + 3 + 2 + 2,
        // scan g; read p, g, m, v and write p, m, v (factors and roots are
        // per block, not per parameter).
        OptimizerKind::Shampoo(_) => 1 + 7,
        // scan g; copy g (r, w); rotate it (r, w); m, v (r, w); the rotated
        // direction (w, r) and its rotation back (w, r); p (r, w).
        OptimizerKind::Soap(_) => 1 + 2 + 2 + 4 + 2 + 2 + 2,
        // one fused pass, after a scan of g unless the CPU step skips it.
        _ => usize::from(!config.skips_scan()) + minimum / elem,
    };
    (streams * elem, minimum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OptimizerConfig;

    /// Bytes of the state `initial_state` allocates.
    fn allocated_bytes<T: crate::real::Real>(kind: &OptimizerKind, spec: &ParamSpec) -> u128 {
        let state = initial_state::<T>(kind, spec).unwrap();
        let len: usize = state.iter().map(Vec::len).sum();
        (len * std::mem::size_of::<T>()) as u128
    }

    #[test]
    fn state_bytes_match_the_allocated_state() {
        let kinds = [
            r#"{"kind": "sgd", "lr": 0.1}"#,
            r#"{"kind": "sgd", "lr": 0.1, "momentum": 0.9}"#,
            r#"{"kind": "adamw", "lr": 0.001}"#,
            r#"{"kind": "lion", "lr": 0.0001}"#,
            r#"{"kind": "muon", "lr": 0.02}"#,
            r#"{"kind": "shampoo", "lr": 0.01, "max_preconditioner_dim": 16}"#,
            r#"{"kind": "shampoo", "lr": 0.01}"#,
            r#"{"kind": "soap", "lr": 0.003, "max_preconditioner_dim": 16}"#,
            r#"{"kind": "soap", "lr": 0.003}"#,
        ];
        // Shapes that block (40 > 16), stay whole, merge, or are vectors.
        let shapes: [&[usize]; 4] = [&[40, 12], &[7, 5], &[3, 4, 5], &[33]];
        for json in kinds {
            let kind = OptimizerConfig::from_json(json).unwrap().kind;
            for shape in shapes {
                if matches!(kind, OptimizerKind::Muon(_)) && shape.len() != 2 {
                    continue;
                }
                let spec = ParamSpec::new("w", shape);
                let lens: Vec<usize> = initial_state::<f32>(&kind, &spec)
                    .unwrap()
                    .iter()
                    .map(Vec::len)
                    .collect();
                assert_eq!(state_lens(&kind, &spec).unwrap(), lens, "{json} {shape:?}");
                assert_eq!(
                    state_bytes(&kind, &spec, 4),
                    allocated_bytes::<f32>(&kind, &spec),
                    "{json} {shape:?}"
                );
                assert_eq!(
                    state_bytes(&kind, &spec, 8),
                    allocated_bytes::<f64>(&kind, &spec),
                    "{json} {shape:?}"
                );
            }
        }
        let adamw = OptimizerConfig::from_json(r#"{"kind": "adamw", "lr": 0.001}"#).unwrap();
        let huge = ParamSpec::new("w", [1usize << 32, 1 << 32]);
        assert_eq!(state_bytes(&adamw.kind, &huge, 4), u128::MAX);
    }
}
