//! Optimizer state as safetensors files, written atomically, resumed
//! bit-exactly.
//!
//! Layout: one tensor per state buffer, named `{param}/{slot}` (e.g.
//! `h0.w/exp_avg`, `h0.w/master`), in its own dtype; the safetensors metadata
//! holds `format = keel-optimizer-state`, `format_version`, the config (in the
//! serde vocabulary of [`crate::config`]), the step count, the parameter specs
//! and groups, the element type, and a CRC-32 of all of it and of the tensor
//! bytes, so that a corrupted file is refused rather than silently resumed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};
use safetensors::SafeTensors;

use crate::config::OptimizerConfig;
use crate::error::{KeelError, Result};
use crate::group::ParamGroup;
use crate::real::Real;
use crate::tensor::ParamSpec;

/// The `format` metadata value of a keel optimizer state file.
pub const FORMAT: &str = "keel-optimizer-state";
/// The newest `format_version` this build reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;

/// The data of one state tensor, in its own dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum StateData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
}

impl StateData {
    /// A copy of `data` in its own dtype.
    pub fn from_slice<T: Real>(data: &[T]) -> Self {
        if T::DTYPE == "F32" {
            StateData::F32(data.iter().map(|x| x.to_f32x()).collect())
        } else {
            StateData::F64(data.iter().map(|x| x.to_f64x()).collect())
        }
    }

    fn dtype(&self) -> &'static str {
        match self {
            StateData::F32(_) => "F32",
            StateData::F64(_) => "F64",
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            StateData::F32(v) => v.len(),
            StateData::F64(v) => v.len(),
        }
    }

    fn values(&self) -> Values<'_> {
        match self {
            StateData::F32(v) => Values::F32(v),
            StateData::F64(v) => Values::F64(v),
        }
    }
}

/// Borrowed tensor values, in their own dtype.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl Values<'_> {
    fn le_bytes(self) -> Vec<u8> {
        match self {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// One named state tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct StateTensor {
    /// `{param}/{slot}`.
    pub name: String,
    /// The parameter's shape.
    pub shape: Vec<usize>,
    /// The values.
    pub data: StateData,
}

/// A backend-independent host copy of an optimizer's whole state.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDict {
    /// The configuration, including the current learning rate.
    pub config: OptimizerConfig,
    /// Steps taken.
    pub step: u64,
    /// The element type the optimizer computes in (`F32` or `F64`): a state
    /// loads only into an optimizer of the same type.
    pub dtype: String,
    /// The parameters, in buffer order.
    pub specs: Vec<ParamSpec>,
    /// The parameter groups.
    pub groups: Vec<ParamGroup>,
    /// Every state buffer.
    pub tensors: Vec<StateTensor>,
    /// Backend-specific extras (e.g. the master-weight rounding mode).
    pub extra: BTreeMap<String, String>,
}

impl StateDict {
    /// Errors unless `specs` equals the state's parameters (names, shapes, order).
    pub fn check_specs(&self, specs: &[ParamSpec]) -> Result<()> {
        if self.specs.len() != specs.len() {
            return Err(KeelError::State(format!(
                "state has {} parameters, optimizer has {}",
                self.specs.len(),
                specs.len()
            )));
        }
        for (a, b) in self.specs.iter().zip(specs) {
            if a != b {
                return Err(KeelError::State(format!(
                    "state has parameter `{}` {:?} where the optimizer has `{}` {:?}",
                    a.name, a.shape, b.name, b.shape
                )));
            }
        }
        Ok(())
    }

    /// The tensor `name` as a `Vec<T>` of length `len`; the dtype must be `T`'s.
    pub fn tensor<T: Real>(&self, name: &str, len: usize) -> Result<Vec<T>> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| KeelError::State(format!("missing state tensor `{name}`")))?;
        if t.data.len() != len {
            return Err(KeelError::State(format!(
                "state tensor `{name}` has {} elements, expected {len}",
                t.data.len()
            )));
        }
        if t.data.dtype() != T::DTYPE {
            return Err(KeelError::State(format!(
                "state tensor `{name}` is {}, the optimizer computes in {}",
                t.data.dtype(),
                T::DTYPE
            )));
        }
        Ok(match &t.data {
            StateData::F32(v) => v.iter().map(|&x| T::from_f64x(x as f64)).collect(),
            StateData::F64(v) => v.iter().map(|&x| T::from_f64x(x)).collect(),
        })
    }
}

fn err(path: &Path, message: impl Into<String>) -> KeelError {
    KeelError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The CRC-32 of a file: every metadata entry but the checksum itself
/// (sorted by key), then every tensor (sorted by name, fed one at a time
/// with [`add_tensor`]): any flipped byte is caught.
fn checksum_of_metadata(meta: &HashMap<String, String>) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    let mut keys: Vec<&String> = meta.keys().filter(|k| k.as_str() != "crc32").collect();
    keys.sort();
    for k in keys {
        h.update(k.as_bytes());
        h.update(&[0]);
        h.update(meta[k].as_bytes());
        h.update(&[0]);
    }
    h
}

/// Adds one tensor to a checksum begun by [`checksum_of_metadata`].
fn add_tensor(h: &mut crc32fast::Hasher, name: &str, bytes: &[u8]) {
    h.update(name.as_bytes());
    h.update(bytes);
}

/// A tensor as the safetensors writer sees it: its little-endian bytes are
/// made only when the writer reaches it, so that at most one tensor's bytes
/// exist besides the values themselves.
pub(crate) struct LeBytesView<'a> {
    pub(crate) values: Values<'a>,
    pub(crate) shape: &'a [usize],
}

impl<'a> LeBytesView<'a> {
    /// A view of `f32` values of `shape`.
    pub(crate) fn f32(values: &'a [f32], shape: &'a [usize]) -> Self {
        LeBytesView {
            values: Values::F32(values),
            shape,
        }
    }
}

impl View for LeBytesView<'_> {
    fn dtype(&self) -> Dtype {
        match self.values {
            Values::F32(_) => Dtype::F32,
            Values::F64(_) => Dtype::F64,
        }
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.values.le_bytes())
    }

    fn data_len(&self) -> usize {
        match self.values {
            Values::F32(v) => 4 * v.len(),
            Values::F64(v) => 8 * v.len(),
        }
    }
}

/// The metadata of a state file, its checksum included (which converts
/// every tensor to bytes once, one at a time).
fn metadata(state: &StateDict) -> Result<HashMap<String, String>> {
    let json = |what: &str, v: serde_json::Result<String>| {
        v.map_err(|e| KeelError::State(format!("cannot serialize {what}: {e}")))
    };
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    meta.insert(
        "config".to_string(),
        json("config", serde_json::to_string(&state.config))?,
    );
    meta.insert("step".to_string(), state.step.to_string());
    meta.insert("dtype".to_string(), state.dtype.clone());
    meta.insert(
        "specs".to_string(),
        json("specs", serde_json::to_string(&state.specs))?,
    );
    meta.insert(
        "groups".to_string(),
        json("groups", serde_json::to_string(&state.groups))?,
    );
    meta.insert(
        "extra".to_string(),
        json("extra", serde_json::to_string(&state.extra))?,
    );
    let mut by_name: Vec<&StateTensor> = state.tensors.iter().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    let mut crc = checksum_of_metadata(&meta);
    for t in by_name {
        add_tensor(&mut crc, &t.name, &t.data.values().le_bytes());
    }
    meta.insert("crc32".to_string(), format!("{:08x}", crc.finalize()));
    Ok(meta)
}

/// The tensors of `state` as lazily converted views, checked against their
/// shapes.
fn views(state: &StateDict) -> Result<Vec<(&str, LeBytesView<'_>)>> {
    state
        .tensors
        .iter()
        .map(|t| {
            let numel = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let len = t.data.len();
            if numel != Some(len) {
                return Err(KeelError::State(format!(
                    "tensor `{}`: {len} values do not fill shape {:?}",
                    t.name, t.shape
                )));
            }
            let view = LeBytesView {
                values: t.data.values(),
                shape: &t.shape,
            };
            Ok((t.name.as_str(), view))
        })
        .collect()
}

/// Serializes a state dict to safetensors bytes (the same bytes [`save`]
/// writes).
pub fn to_bytes(state: &StateDict) -> Result<Vec<u8>> {
    safetensors::serialize(views(state)?, Some(metadata(state)?))
        .map_err(|e| KeelError::State(format!("cannot serialize state: {e}")))
}

/// Parses safetensors bytes written by [`to_bytes`]; `path` is for messages.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<StateDict> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
        err(
            path,
            format!("not a readable safetensors file (truncated or corrupted?): {e}"),
        )
    })?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        err(
            path,
            format!("not a readable safetensors file (truncated or corrupted?): {e}"),
        )
    })?;
    let meta = header
        .metadata()
        .as_ref()
        .ok_or_else(|| err(path, "no metadata: not a keel optimizer state file"))?;
    let get = |key: &str| {
        meta.get(key).ok_or_else(|| {
            err(
                path,
                format!("metadata has no `{key}`: not a keel optimizer state file"),
            )
        })
    };
    if get("format")? != FORMAT {
        return Err(err(
            path,
            format!("format is `{}`, expected `{FORMAT}`", get("format")?),
        ));
    }
    let version: u32 = get("format_version")?
        .parse()
        .map_err(|_| err(path, "format_version is not a number"))?;
    if version > FORMAT_VERSION {
        return Err(err(
            path,
            format!("format_version {version} is newer than this keel reads ({FORMAT_VERSION})"),
        ));
    }
    let parse = |key: &str| -> Result<serde_json::Value> {
        serde_json::from_str(get(key)?).map_err(|e| err(path, format!("metadata `{key}`: {e}")))
    };
    let config: OptimizerConfig = serde_json::from_value(parse("config")?)
        .map_err(|e| err(path, format!("metadata `config`: {e}")))?;
    let specs: Vec<ParamSpec> = serde_json::from_value(parse("specs")?)
        .map_err(|e| err(path, format!("metadata `specs`: {e}")))?;
    let groups: Vec<ParamGroup> = serde_json::from_value(parse("groups")?)
        .map_err(|e| err(path, format!("metadata `groups`: {e}")))?;
    let extra: BTreeMap<String, String> = serde_json::from_value(parse("extra")?)
        .map_err(|e| err(path, format!("metadata `extra`: {e}")))?;
    let dtype = get("dtype")?.clone();
    let step: u64 = get("step")?
        .parse()
        .map_err(|_| err(path, "metadata `step` is not a number"))?;

    let mut crc = checksum_of_metadata(meta);
    let mut tensors = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| err(path, format!("tensor `{name}`: {e}")))?;
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::F32 => StateData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F64 => StateData::F64(
                bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect(),
            ),
            other => {
                return Err(err(
                    path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        add_tensor(&mut crc, &name, bytes);
        tensors.push(StateTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    let want = get("crc32")?;
    let got = format!("{:08x}", crc.finalize());
    if *want != got {
        return Err(err(
            path,
            format!("checksum mismatch (stored {want}, computed {got}): the file is corrupted"),
        ));
    }
    Ok(StateDict {
        config,
        step,
        dtype,
        specs,
        groups,
        tensors,
        extra,
    })
}

/// Writes `state` to `path` atomically: a temporary file in the same folder,
/// flushed to disk, then renamed over `path`.
///
/// The file is written tensor by tensor, so saving holds at most one
/// tensor's bytes besides the state itself.
pub fn save(path: &Path, state: &StateDict) -> Result<()> {
    serialize_atomic(path, views(state)?, metadata(state)?)
}

/// Writes safetensors `views` and `meta` to `path` as [`write_atomic`] does,
/// one tensor at a time, with the permissions a plain file creation gives
/// (safetensors writes through a private temporary file of its own).
pub(crate) fn serialize_atomic<S, V>(
    path: &Path,
    views: Vec<(S, V)>,
    meta: HashMap<String, String>,
) -> Result<()>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: View,
{
    write_atomic_with(path, |tmp| {
        let permissions = fs::File::create(tmp)?.metadata()?.permissions();
        safetensors::serialize_to_file(views, Some(meta), tmp).map_err(std::io::Error::other)?;
        fs::set_permissions(tmp, permissions)
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| fs::File::create(tmp)?.write_all(bytes))
}

/// [`write_atomic`] where `write` creates and fills the temporary file at the
/// path it is given; the file is then flushed to disk and renamed over
/// `path`.
fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| err(path, "path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp: PathBuf = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let write_then_rename = || -> std::io::Result<()> {
        write(&tmp)?;
        fs::File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, path)
    };
    write_then_rename().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(path, format!("cannot write: {e}"))
    })
}

/// Reads a state file written by [`save`].
pub fn load(path: &Path) -> Result<StateDict> {
    let bytes = fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    from_bytes(&bytes, path)
}
