//! keel inside other frameworks: [`candle`] (feature `candle`) and [`burn`]
//! (feature `burn`).
//!
//! Both adapters run keel's fused CPU step on the framework's own parameter
//! buffers; the optimizer math, clipping, non-finite policy and checkpoint
//! format are keel's, whatever the framework.

#[cfg(feature = "burn")]
pub mod burn;
#[cfg(feature = "candle")]
pub mod candle;

use crate::group::ParamGroup;

/// The usual grouping rule for transformer weights: no weight decay for
/// biases and normalization gains (names ending in `bias` or containing
/// `ln`/`norm`), weight decay for everything else.
///
/// Returns the group (with its options, no parameters yet) that the
/// parameter named `name` belongs to; the adapters' `*_with` constructors
/// merge the groups of the same name.
///
/// ```
/// use keel::adapters::no_decay_for_bias_and_norm;
/// assert!(!no_decay_for_bias_and_norm("h0.ln1.weight").weight_decay);
/// assert!(!no_decay_for_bias_and_norm("fc1.bias").weight_decay);
/// assert!(no_decay_for_bias_and_norm("fc1.weight").weight_decay);
/// ```
pub fn no_decay_for_bias_and_norm(name: &str) -> ParamGroup {
    if name.ends_with("bias") || name.contains("ln") || name.contains("norm") {
        ParamGroup::new("no_decay", Vec::<String>::new()).with_weight_decay(false)
    } else {
        ParamGroup::new("decay", Vec::<String>::new())
    }
}

/// Groups `names` by the rule's group templates, merging templates of the
/// same name (the first one's options win), in order of first appearance.
pub(crate) fn collect_groups(
    names: &[String],
    mut rule: impl FnMut(&str) -> ParamGroup,
) -> Vec<ParamGroup> {
    let mut groups: Vec<ParamGroup> = Vec::new();
    for name in names {
        let template = rule(name);
        match groups.iter_mut().find(|g| g.name == template.name) {
            Some(g) => g.params.push(name.clone()),
            None => groups.push(ParamGroup {
                params: vec![name.clone()],
                ..template
            }),
        }
    }
    groups
}
