//! Parameter descriptions: a name and a shape per flat buffer.

use serde::{Deserialize, Serialize};

/// One named parameter tensor, stored as a flat row-major buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Unique name, e.g. `h0.attn.w`.
    pub name: String,
    /// Shape; the buffer holds `shape.iter().product()` elements.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// A spec from a name and a shape.
    pub fn new(name: impl Into<String>, shape: impl AsRef<[usize]>) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.as_ref().to_vec(),
        }
    }

    /// Number of elements (1 for a scalar of shape `[]`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of elements, or `None` when the product of the shape does not
    /// fit in `usize` (no buffer could hold it).
    pub fn checked_numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}
