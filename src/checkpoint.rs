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
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, View};

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
        let t = self.checked_tensor::<T>(name, len)?;
        Ok(match &t.data {
            StateData::F32(v) => v.iter().map(|&x| T::from_f64x(x as f64)).collect(),
            StateData::F64(v) => v.iter().map(|&x| T::from_f64x(x)).collect(),
        })
    }

    /// [`StateDict::tensor`] moved out of the dict (left empty), without a
    /// copy.
    pub(crate) fn take_tensor<T: Real>(&mut self, name: &str, len: usize) -> Result<Vec<T>> {
        self.checked_tensor::<T>(name, len)?;
        let t = self
            .tensors
            .iter_mut()
            .find(|t| t.name == name)
            .expect("checked above");
        let data = std::mem::replace(&mut t.data, StateData::F32(Vec::new()));
        // The dtype is `T`'s (checked), so the downcast succeeds.
        let data: Box<dyn std::any::Any> = match data {
            StateData::F32(v) => Box::new(v),
            StateData::F64(v) => Box::new(v),
        };
        data.downcast::<Vec<T>>()
            .map(|v| *v)
            .map_err(|_| KeelError::State(format!("state tensor `{name}` changed type")))
    }

    /// The tensor `name`, checked to hold `len` elements of `T`'s dtype.
    fn checked_tensor<T: Real>(&self, name: &str, len: usize) -> Result<&StateTensor> {
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
        Ok(t)
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

/// The CRC-32 of a metadata map, every entry but `crc32` (sorted by key), as
/// 8 hex digits: how the GPT model file checks its metadata, which in turn
/// holds each tensor's [`tensor_checksum`].
pub(crate) fn metadata_checksum(meta: &HashMap<String, String>) -> String {
    format!("{:08x}", checksum_of_metadata(meta).finalize())
}

/// The CRC-32 of one tensor (its name, then its little-endian bytes), as 8
/// hex digits; the same value [`TensorReader::read`] computes into a fresh
/// hasher.
pub(crate) fn tensor_checksum(name: &str, values: Values<'_>) -> String {
    let mut h = crc32fast::Hasher::new();
    add_tensor(&mut h, name, &values.le_bytes());
    format!("{:08x}", h.finalize())
}

/// The CRC-32 a state file written by [`save`] stores in its header (read
/// without its tensors): what identifies the file's content.
pub(crate) fn stored_checksum(path: &Path) -> Result<String> {
    let file = fs::File::open(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let reader = TensorReader::new(file, path)?;
    reader
        .metadata()
        .and_then(|m| m.get("crc32"))
        .cloned()
        .ok_or_else(|| err(path, "metadata has no `crc32`"))
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
    let mut bytes = safetensors::serialize(views(state)?, Some(metadata(state)?))
        .map_err(|e| KeelError::State(format!("cannot serialize state: {e}")))?;
    let header = header_range(&bytes)
        .ok_or_else(|| KeelError::State("safetensors wrote no header".into()))?;
    let sorted = sorted_header(&bytes[header.clone()])
        .map_err(|e| KeelError::State(format!("cannot reorder the header: {e}")))?;
    bytes[header].copy_from_slice(&sorted);
    Ok(bytes)
}

/// Where the JSON header lies in safetensors `bytes` (after its 8-byte
/// little-endian length), if they hold one.
fn header_range(bytes: &[u8]) -> Option<std::ops::Range<usize>> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(len).ok()?.checked_add(8)?;
    (end <= bytes.len()).then_some(8..end)
}

/// The safetensors JSON `header` with every object's keys sorted, padded
/// with spaces to the same length. The safetensors writer takes metadata as a
/// `HashMap`, whose order differs from one map to the next; sorted, the same
/// state always gives the same bytes (same content, so never longer).
fn sorted_header(header: &[u8]) -> std::io::Result<Vec<u8>> {
    fn sort_keys(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let sorted: BTreeMap<String, serde_json::Value> =
                    map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
                serde_json::Value::Object(sorted.into_iter().collect())
            }
            other => other,
        }
    }
    let value: serde_json::Value = serde_json::from_slice(header)?;
    let mut out = serde_json::to_vec(&sort_keys(value))?;
    if out.len() > header.len() {
        return Err(std::io::Error::other("the sorted header is longer"));
    }
    out.resize(header.len(), b' ');
    Ok(out)
}

/// Sorts the header of the safetensors file `path` in place (see
/// [`sorted_header`]).
fn sort_header_in_file(path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(std::io::Error::other)?;
    if len > file.metadata()?.len().saturating_sub(8) as usize {
        return Err(std::io::Error::other("safetensors wrote a truncated file"));
    }
    let mut header = vec![0u8; len];
    file.read_exact(&mut header)?;
    let sorted = sorted_header(&header)?;
    file.seek(SeekFrom::Start(8))?;
    file.write_all(&sorted)
}

/// Parses safetensors bytes written by [`to_bytes`]; `path` is for messages.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<StateDict> {
    from_reader(std::io::Cursor::new(bytes), path)
}

/// The largest header keel reads (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes read at a time while decoding a tensor (a multiple of 8).
const READ_PIECE: usize = 1 << 20;

/// A safetensors file read tensor by tensor: the header is parsed (and its
/// offsets checked, by safetensors' `Metadata`) up front, and each tensor's
/// bytes are read in [`READ_PIECE`]s when asked for, decoded as they arrive.
/// Reading a file thus holds the decoded tensors and one piece, not the
/// file's bytes besides.
pub(crate) struct TensorReader<R> {
    r: R,
    path: PathBuf,
    header: Metadata,
    data_start: u64,
    piece: Vec<u8>,
}

impl<R: Read + Seek> TensorReader<R> {
    /// Reads and checks the header of the safetensors file in `r` (`path`
    /// names it in errors): a file whose length differs from what the header
    /// describes is an error here, before any tensor is read.
    pub(crate) fn new(mut r: R, path: &Path) -> Result<Self> {
        let io = |e: std::io::Error| err(path, format!("cannot read: {e}"));
        let unreadable = |why: String| {
            err(
                path,
                format!("not a readable safetensors file (truncated or corrupted?): {why}"),
            )
        };
        let file_len = r.seek(SeekFrom::End(0)).map_err(io)?;
        r.seek(SeekFrom::Start(0)).map_err(io)?;
        if file_len < 8 {
            return Err(unreadable(format!("{file_len} bytes, no header")));
        }
        let mut len_bytes = [0u8; 8];
        r.read_exact(&mut len_bytes).map_err(io)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
            return Err(unreadable(format!(
                "a header of {header_len} bytes in a file of {file_len}"
            )));
        }
        let mut header_bytes = vec![0u8; header_len as usize];
        r.read_exact(&mut header_bytes).map_err(io)?;
        let header: Metadata = serde_json::from_slice(&header_bytes)
            .map_err(|e| unreadable(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = header
            .tensors()
            .values()
            .map(|t| t.data_offsets.1)
            .max()
            .unwrap_or(0) as u64;
        if data_start.checked_add(data_len) != Some(file_len) {
            return Err(unreadable(format!(
                "the header describes {data_len} bytes of tensors, the file holds {}",
                file_len - data_start
            )));
        }
        Ok(TensorReader {
            r,
            path: path.to_path_buf(),
            header,
            data_start,
            piece: Vec::new(),
        })
    }

    /// The header's `__metadata__` map.
    pub(crate) fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.header.metadata().as_ref()
    }

    /// Every tensor's name, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.header.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// The dtype and shape of tensor `name`, if the file has it.
    pub(crate) fn info(&self, name: &str) -> Option<(Dtype, &[usize])> {
        self.header.info(name).map(|t| (t.dtype, &t.shape[..]))
    }

    /// Reads tensor `name` (F32 or F64), feeding its name and then its bytes
    /// to `crc`.
    pub(crate) fn read(&mut self, name: &str, crc: &mut crc32fast::Hasher) -> Result<StateData> {
        let path = self.path.clone();
        let io = |e: std::io::Error| err(&path, format!("cannot read: {e}"));
        let info = self
            .header
            .info(name)
            .ok_or_else(|| err(&path, format!("no tensor `{name}`")))?;
        let (begin, end) = info.data_offsets;
        let dtype = info.dtype;
        self.r
            .seek(SeekFrom::Start(self.data_start + begin as u64))
            .map_err(io)?;
        if self.piece.is_empty() {
            self.piece = vec![0u8; READ_PIECE];
        }
        let (r, piece) = (&mut self.r, &mut self.piece);
        // Reads the tensor's bytes piece by piece into `decode`.
        let mut read = |decode: &mut dyn FnMut(&[u8])| -> Result<()> {
            crc.update(name.as_bytes());
            let mut left = end - begin;
            while left > 0 {
                let bytes = &mut piece[..left.min(READ_PIECE)];
                r.read_exact(bytes).map_err(io)?;
                crc.update(bytes);
                decode(bytes);
                left -= bytes.len();
            }
            Ok(())
        };
        let what = format!("tensor `{name}` of {}", path.display());
        Ok(match dtype {
            Dtype::F32 => {
                let mut v = crate::memory::try_with_capacity::<f32>((end - begin) / 4, &what)?;
                read(&mut |b| {
                    v.extend(
                        b.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    )
                })?;
                StateData::F32(v)
            }
            Dtype::F64 => {
                let mut v = crate::memory::try_with_capacity::<f64>((end - begin) / 8, &what)?;
                read(&mut |b| {
                    v.extend(b.chunks_exact(8).map(|b| {
                        f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                    }))
                })?;
                StateData::F64(v)
            }
            other => {
                return Err(err(
                    &path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        })
    }
}

/// Reads a state file from `r` with a [`TensorReader`], checking the CRC as
/// the tensors arrive.
fn from_reader<R: Read + Seek>(r: R, path: &Path) -> Result<StateDict> {
    let mut reader = TensorReader::new(r, path)?;
    let meta = reader
        .metadata()
        .ok_or_else(|| err(path, "no metadata: not a keel optimizer state file"))?
        .clone();
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

    let mut crc = checksum_of_metadata(&meta);
    let names = reader.names();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let data = reader.read(&name, &mut crc)?;
        let shape = reader
            .info(&name)
            .map(|(_, s)| s.to_vec())
            .unwrap_or_default();
        tensors.push(StateTensor { name, shape, data });
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
        sort_header_in_file(tmp)?;
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

/// `e`, from loading the state file `path` into an optimizer, as an error
/// that names the file: a state that does not fit the optimizer (or a
/// config it cannot take) becomes a [`KeelError::Checkpoint`]; other errors
/// pass unchanged.
pub fn in_file(path: &Path, e: KeelError) -> KeelError {
    match e {
        KeelError::State(m) => err(path, format!("does not match the optimizer: {m}")),
        KeelError::Config { field, message } => err(
            path,
            format!("holds a config the optimizer cannot take: `{field}`: {message}"),
        ),
        other => other,
    }
}

/// Reads a state file written by [`save`], tensor by tensor: loading holds
/// the decoded state, not the file's bytes besides.
pub fn load(path: &Path) -> Result<StateDict> {
    let cannot = |e: std::io::Error| err(path, format!("cannot read: {e}"));
    let file = fs::File::open(path).map_err(cannot)?;
    if !file.metadata().map_err(cannot)?.is_file() {
        // A pipe or device cannot seek: read it whole, as before.
        return from_bytes(&fs::read(path).map_err(cannot)?, path);
    }
    from_reader(file, path)
}
