//! Parameter groups: per-group learning-rate multiplier, weight decay on/off
//! and trust ratio on/off.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{KeelError, Result};
use crate::tensor::ParamSpec;

/// A named set of parameters that share step options.
///
/// ```
/// # use keel::{ParamGroup, ParamSpec};
/// let specs = [ParamSpec::new("fc.w", [4, 4]), ParamSpec::new("fc.b", [4])];
/// // The usual split: no weight decay on biases and gains.
/// let (no_decay, decay): (Vec<_>, Vec<_>) = specs.iter().map(|s| s.name.clone())
///     .partition(|n| n.ends_with(".b"));
/// let groups = vec![
///     ParamGroup::new("decay", decay),
///     ParamGroup::new("no_decay", no_decay).with_weight_decay(false),
/// ];
/// assert!(!groups[1].weight_decay);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamGroup {
    /// Group name (for messages and checkpoints).
    pub name: String,
    /// Names of the parameters in this group.
    pub params: Vec<String>,
    /// Multiplier on the optimizer's learning rate (0 freezes the group).
    #[serde(default = "one")]
    pub lr_scale: f64,
    /// Apply the optimizer's weight decay to this group.
    #[serde(default = "yes")]
    pub weight_decay: bool,
    /// Scale by the LAMB/LARS trust ratio (off: ratio 1). Ignored by other kinds.
    #[serde(default = "yes")]
    pub trust_ratio: bool,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl ParamGroup {
    /// A group with default options (lr scale 1, weight decay and trust ratio on).
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        params: impl IntoIterator<Item = S>,
    ) -> Self {
        ParamGroup {
            name: name.into(),
            params: params.into_iter().map(Into::into).collect(),
            lr_scale: 1.0,
            weight_decay: true,
            trust_ratio: true,
        }
    }

    /// One group holding every parameter of `specs`.
    pub fn all(specs: &[ParamSpec]) -> Self {
        ParamGroup::new("all", specs.iter().map(|s| s.name.clone()))
    }

    /// Sets the learning-rate multiplier.
    pub fn with_lr_scale(mut self, lr_scale: f64) -> Self {
        self.lr_scale = lr_scale;
        self
    }

    /// Turns weight decay on or off.
    pub fn with_weight_decay(mut self, on: bool) -> Self {
        self.weight_decay = on;
        self
    }

    /// Turns the trust ratio on or off.
    pub fn with_trust_ratio(mut self, on: bool) -> Self {
        self.trust_ratio = on;
        self
    }
}

/// Checks specs and groups together and returns each tensor's group index.
///
/// Errors name the offender: duplicate parameter names, empty groups, unknown
/// names, a parameter in two groups or in none, an invalid `lr_scale`.
pub(crate) fn assign_groups(specs: &[ParamSpec], groups: &[ParamGroup]) -> Result<Vec<usize>> {
    if specs.is_empty() {
        return Err(KeelError::config("params", "no parameters to optimize"));
    }
    if groups.is_empty() {
        return Err(KeelError::config("groups", "no parameter groups"));
    }
    let mut index = HashMap::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        if index.insert(s.name.as_str(), i).is_some() {
            return Err(KeelError::config(
                "params",
                format!("duplicate parameter name `{}`", s.name),
            ));
        }
    }
    let mut group_of = vec![usize::MAX; specs.len()];
    for (gi, g) in groups.iter().enumerate() {
        let field = format!("groups.{}", g.name);
        if g.params.is_empty() {
            return Err(KeelError::config(field, "group has no parameters"));
        }
        if !g.lr_scale.is_finite() || g.lr_scale < 0.0 {
            return Err(KeelError::config(
                format!("{field}.lr_scale"),
                format!("must be finite and >= 0, got {}", g.lr_scale),
            ));
        }
        if groups[..gi].iter().any(|other| other.name == g.name) {
            return Err(KeelError::config(field, "duplicate group name"));
        }
        for name in &g.params {
            let i = *index
                .get(name.as_str())
                .ok_or_else(|| KeelError::config(&field, format!("unknown parameter `{name}`")))?;
            if group_of[i] != usize::MAX {
                return Err(KeelError::config(
                    &field,
                    format!(
                        "parameter `{name}` is already in group `{}`",
                        groups[group_of[i]].name
                    ),
                ));
            }
            group_of[i] = gi;
        }
    }
    if let Some(i) = group_of.iter().position(|&g| g == usize::MAX) {
        return Err(KeelError::config(
            "groups",
            format!("parameter `{}` is in no group", specs[i].name),
        ));
    }
    Ok(group_of)
}
