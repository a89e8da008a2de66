//! The .upg file: one safetensors container for a whole model, so Python's `safetensors` (and any other
//! safetensors reader) opens it.
//!
//! | entry                     | container tensors (dtype, shape)                                         |
//! |---------------------------|--------------------------------------------------------------------------|
//! | matrix, codec sparse50_q4 | `NAME.masks` (U64, [rows, blocks]), `NAME.codes` (U8, [rows, blocks, 16]), `NAME.scales` (F16, [rows, groups]) |
//! | matrix, codec f32 / f16   | `NAME.values` (F32 / F16, [rows, cols])                                  |
//! | matrix, codec q4          | `NAME.codes` (U8, [rows, padded/2]), `NAME.scales` (F16, [rows, padded/group]) |
//! | matrix, codec q3          | `NAME.codes` (U8, [rows, padded/32*12]: per 32 columns three u32 bit planes, see [`Q3Matrix`]), `NAME.scales` (F16, [rows, padded/group]) |
//! | f32 array (norms, biases) | `NAME` (F32, any shape)                                                  |
//! | byte blob (tokenizer...)  | `NAME` (U8, [len])                                                       |
//!
//! safetensors' `__metadata__` string map holds `upg.format_version` = "1", one
//! `upg.tensor.NAME` = `{"codec":"sparse50_q4","shape":[rows,cols],"group":128}` per matrix (no `group`
//! for f32 and f16), `upg.checksums` = `{"NAME.masks":"1c291ca3",...,"__metadata__":"..."}` (the CRC-32
//! of every container tensor and of the header, so that a damaged copy is refused instead of giving
//! wrong weights: every single-bit error is caught), and the caller's own keys (such as `upg.config`).
//! The checksums are known only once the data is written: the header is laid out with zeros in their
//! place and rewritten, at the same length, by [`UpgWriter::finish`]. Version 1 files (before the
//! checksums) are still read.
//!
//! safetensors stores tensors back to back with no gaps, so alignment comes from the order: planes with
//! 8-byte elements first, then 4, 2 and 1, and the JSON header padded with spaces so the data section
//! starts at a multiple of 8. Every plane of a mapped file is then aligned for its element type and is
//! used in place ([`Plane::Mapped`]); a plane of a file from another writer that is not aligned is copied.
//!
//! The writer knows every size up front (they follow from the shapes), so it lays out the whole file
//! when it is created and then takes tensors one at a time in any order: converting a 29 GB checkpoint
//! never holds more than one tensor. It writes to `PATH.partial` and renames on [`UpgWriter::finish`];
//! a writer dropped before that deletes its temporary file, so no half-written .upg ever exists. (A
//! process killed outright, or stopped by Ctrl-C with no handler, skips the drop and leaves
//! `PATH.partial` behind, never `PATH`; the next writer for `PATH` overwrites it.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::dense::Q3_RUN_BYTES;
use super::error::{FormatError, Result};
use super::plane::Plane;
use super::sparse::{self, BLOCK_CODE_BYTES};
use super::{Codec, DenseF16, DenseF32, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};

// Planes are written and mapped in the host's byte order; safetensors is little-endian.
#[cfg(target_endian = "big")]
compile_error!(
    "the .upg file is little-endian and upg maps it in place: big-endian hosts are not supported"
);

/// The format version this build writes. It reads it and version 1, which had no checksums.
pub const FORMAT_VERSION: u32 = 2;
/// Metadata key of the format version.
pub const VERSION_KEY: &str = "upg.format_version";
/// Metadata key prefix of each matrix's description: `upg.tensor.NAME`.
pub const MATRIX_KEY_PREFIX: &str = "upg.tensor.";
/// Metadata key of the CRC-32s (IEEE, as zlib's `crc32`) of the file: a JSON object of 8 lowercase hex
/// digits by container tensor name, and under `__metadata__` (a name no tensor can have) the CRC-32 of
/// the JSON header as written with every digit of this object's values a 0. Version 2 files always
/// have it; version 1 files never do.
pub const CHECKSUMS_KEY: &str = "upg.checksums";
/// The name of the header's CRC-32 in the checksums.
const HEADER_CHECKSUM: &str = "__metadata__";
/// safetensors refuses longer headers (and so does Python's reader).
const MAX_HEADER_BYTES: usize = 100_000_000;
/// Bytes of the little-endian header length that starts every safetensors file.
const LEN_BYTES: usize = 8;

/// How a matrix is stored: codec, logical shape and scale group. Everything else (plane dtypes and
/// shapes, byte sizes) follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixSpec {
    pub codec: Codec,
    /// Outputs.
    pub rows: usize,
    /// Inputs.
    pub cols: usize,
    /// Input columns per scale for sparse50_q4 and q4; `None` for f32 and f16, which have no scales.
    pub group: Option<usize>,
}

/// One array of the container: its name, dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PlaneSpec {
    /// `masks`, `codes`, `scales` or `values`: the field named in errors.
    field: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl MatrixSpec {
    /// The spec of an encoded tensor.
    pub fn of(t: &Tensor) -> Self {
        let [rows, cols] = t.shape();
        let group = match t {
            Tensor::Sparse(m) => Some(m.group),
            Tensor::Q4(m) => Some(m.group),
            Tensor::Q3(m) => Some(m.group),
            Tensor::F32(_) | Tensor::F16(_) => None,
        };
        Self {
            codec: t.codec(),
            rows,
            cols,
            group,
        }
    }

    /// Checks shape and group; the error names the field.
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.rows == 0 || self.cols == 0 {
            return Err((
                "shape",
                format!(
                    "[{}, {}]: a matrix needs at least one row and one column",
                    self.rows, self.cols
                ),
            ));
        }
        let codec = self.codec.name();
        match (self.codec, self.group) {
            (Codec::Sparse | Codec::Q4 | Codec::Q3, None) => Err((
                "group",
                format!("the {codec} codec needs a scale group, none given"),
            )),
            (Codec::Sparse, Some(g)) => {
                sparse::check_group(g).map_err(|e| ("group", e.to_string()))
            }
            (Codec::Q4, Some(g)) => Q4Matrix::check_group(g).map_err(|e| ("group", e.to_string())),
            (Codec::Q3, Some(g)) => Q3Matrix::check_group(g).map_err(|e| ("group", e.to_string())),
            (Codec::F32 | Codec::F16, Some(g)) => Err((
                "group",
                format!("the {codec} codec has no scales, but group {g} was given"),
            )),
            (Codec::F32 | Codec::F16, None) => Ok(()),
        }
    }

    /// The planes of this matrix in the order [`tensor_planes`] yields their data.
    fn planes(&self) -> std::result::Result<Vec<PlaneSpec>, (&'static str, String)> {
        self.check()?;
        let (rows, cols) = (self.rows, self.cols);
        let group = self.group.unwrap_or(0);
        let plane = |field, dtype, shape: Vec<usize>| PlaneSpec {
            field,
            dtype,
            shape,
        };
        Ok(match self.codec {
            Codec::Sparse => {
                let nb = sparse::blocks_per_row(cols);
                vec![
                    plane("masks", Dtype::U64, vec![rows, nb]),
                    plane("codes", Dtype::U8, vec![rows, nb, BLOCK_CODE_BYTES]),
                    plane(
                        "scales",
                        Dtype::F16,
                        vec![rows, sparse::groups_per_row(cols, group)],
                    ),
                ]
            }
            Codec::F32 => vec![plane("values", Dtype::F32, vec![rows, cols])],
            Codec::F16 => vec![plane("values", Dtype::F16, vec![rows, cols])],
            Codec::Q4 => {
                let padded = cols
                    .div_ceil(group)
                    .checked_mul(group)
                    .ok_or(("shape", format!("{cols} columns overflow when padded")))?;
                vec![
                    plane("codes", Dtype::U8, vec![rows, padded / 2]),
                    plane("scales", Dtype::F16, vec![rows, padded / group]),
                ]
            }
            Codec::Q3 => {
                let padded = cols
                    .div_ceil(group)
                    .checked_mul(group)
                    .ok_or(("shape", format!("{cols} columns overflow when padded")))?;
                vec![
                    plane("codes", Dtype::U8, vec![rows, padded / 32 * Q3_RUN_BYTES]),
                    plane("scales", Dtype::F16, vec![rows, padded / group]),
                ]
            }
        })
    }

    fn describe(&self) -> String {
        match self.group {
            Some(g) => format!(
                "codec {} at shape [{}, {}] with group {g}",
                self.codec.name(),
                self.rows,
                self.cols
            ),
            None => format!(
                "codec {} at shape [{}, {}]",
                self.codec.name(),
                self.rows,
                self.cols
            ),
        }
    }
}

/// The data of a tensor's planes, in the order of [`MatrixSpec::planes`].
fn tensor_planes(t: &Tensor) -> Vec<&[u8]> {
    match t {
        Tensor::Sparse(m) => vec![m.masks.as_bytes(), m.codes.as_bytes(), m.scales.as_bytes()],
        Tensor::F32(m) => vec![m.values.as_bytes()],
        Tensor::F16(m) => vec![m.values.as_bytes()],
        Tensor::Q4(m) => vec![m.codes.as_bytes(), m.scales.as_bytes()],
        Tensor::Q3(m) => vec![m.codes.as_bytes(), m.scales.as_bytes()],
    }
}

/// A matrix's description as stored under `upg.tensor.NAME`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixMeta {
    codec: String,
    shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<usize>,
}

fn json<T: Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v)
        .map_err(|e| FormatError::Parameter(format!("cannot encode the header: {e}")))
}

/// The `upg.checksums` value: a JSON object of 8-digit hex CRC-32s by tensor name.
fn checksums_json<'a>(crcs: impl Iterator<Item = (&'a str, u32)>) -> Result<String> {
    let map: BTreeMap<&str, String> = crcs.map(|(n, c)| (n, format!("{c:08x}"))).collect();
    json(&map)
}

fn dtype_bytes(d: Dtype) -> usize {
    d.bitsize().div_ceil(8)
}

/// Bytes of a tensor of `shape` and `dtype`, or `None` on overflow or a size that is not whole bytes.
fn byte_size(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let bits = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))?
        .checked_mul(dtype.bitsize())?;
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// What the writer is told to expect for one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Planned {
    Matrix(MatrixSpec),
    F32 { shape: Vec<usize> },
    Bytes { len: usize },
}

impl Planned {
    fn kind(&self) -> &'static str {
        match self {
            Planned::Matrix(_) => "a matrix",
            Planned::F32 { .. } => "an f32 array",
            Planned::Bytes { .. } => "a byte blob",
        }
    }
}

/// Every entry of a file and its metadata, known before any data is written.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    entries: Vec<(String, Planned)>,
    metadata: BTreeMap<String, String>,
}

impl Plan {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn matrix(&mut self, name: impl Into<String>, spec: MatrixSpec) -> &mut Self {
        self.entries.push((name.into(), Planned::Matrix(spec)));
        self
    }

    pub fn f32(&mut self, name: impl Into<String>, shape: &[usize]) -> &mut Self {
        self.entries.push((
            name.into(),
            Planned::F32 {
                shape: shape.to_vec(),
            },
        ));
        self
    }

    pub fn bytes(&mut self, name: impl Into<String>, len: usize) -> &mut Self {
        self.entries.push((name.into(), Planned::Bytes { len }));
        self
    }

    /// A free-form metadata entry (for example `upg.config` holding the model's config JSON). Keys
    /// `upg.format_version` and `upg.tensor.*` belong to the format and are refused by
    /// [`UpgWriter::create`].
    pub fn metadata(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// A tensor with its data, for [`write`].
#[derive(Clone, Copy, Debug)]
pub enum Entry<'a> {
    Matrix(&'a Tensor),
    F32 { shape: &'a [usize], data: &'a [f32] },
    Bytes(&'a [u8]),
}

/// Writes a whole file from tensors held in memory: for small models and tests. Conversion of a large
/// checkpoint uses [`UpgWriter`] directly, one tensor at a time.
pub fn write(
    path: impl AsRef<Path>,
    entries: &[(&str, Entry)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut plan = Plan::new();
    for (name, entry) in entries {
        match entry {
            Entry::Matrix(t) => plan.matrix(*name, MatrixSpec::of(t)),
            Entry::F32 { shape, .. } => plan.f32(*name, shape),
            Entry::Bytes(b) => plan.bytes(*name, b.len()),
        };
    }
    for (k, v) in metadata {
        plan.metadata(k, v);
    }
    let mut w = UpgWriter::create(path, &plan)?;
    for (name, entry) in entries {
        match entry {
            Entry::Matrix(t) => w.put_matrix(name, t)?,
            Entry::F32 { data, .. } => w.put_f32(name, data)?,
            Entry::Bytes(b) => w.put_bytes(name, b)?,
        }
    }
    w.finish()
}

/// Where an entry's planes go, and whether they have been written.
#[derive(Debug)]
struct Slot {
    planned: Planned,
    /// Byte range of each plane inside the data section, in the order of [`MatrixSpec::planes`].
    ranges: Vec<(u64, usize)>,
    /// Container tensor name and CRC-32 of each plane (the CRC once written), in the same order.
    checksums: Vec<(String, u32)>,
    written: bool,
}

/// Writes a .upg file tensor by tensor; see the module documentation.
#[derive(Debug)]
pub struct UpgWriter {
    path: PathBuf,
    partial: PathBuf,
    /// `None` once closed by `finish`.
    file: Option<File>,
    data_start: u64,
    slots: HashMap<String, Slot>,
    /// Where the placeholder of the `upg.checksums` value (a JSON string) lies in the file.
    checksums_at: (u64, usize),
    /// CRC-32 of the header as laid out (checksums zero).
    header_crc: u32,
    finished: bool,
}

fn access(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> FormatError {
    let path = path.to_path_buf();
    move |source| FormatError::Access {
        path,
        action,
        source,
    }
}

impl UpgWriter {
    /// Lays out the file for `plan`, creates `PATH.partial` at its full size and writes the header.
    pub fn create(path: impl AsRef<Path>, plan: &Plan) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let field = |tensor: &str, field: &str, reason: String| FormatError::Field {
            path: path.clone(),
            tensor: tensor.to_string(),
            field: field.to_string(),
            reason,
        };

        let mut metadata = BTreeMap::new();
        metadata.insert(VERSION_KEY.to_string(), FORMAT_VERSION.to_string());
        for (k, v) in &plan.metadata {
            if k == VERSION_KEY || k == CHECKSUMS_KEY || k.starts_with(MATRIX_KEY_PREFIX) {
                return Err(FormatError::Parameter(format!(
                    "metadata key '{k}' is reserved for the format (upg.format_version, upg.checksums, upg.tensor.*): choose another key"
                )));
            }
            metadata.insert(k.clone(), v.clone());
        }

        // Every container tensor: (name, dtype, shape, bytes, entry index, plane index).
        let mut tensors = Vec::new();
        let mut names = BTreeSet::new();
        let mut entry_names = BTreeSet::new();
        for (index, (name, planned)) in plan.entries.iter().enumerate() {
            if name.is_empty() || name == "__metadata__" {
                return Err(field(name, "name", "is not usable as a tensor name".into()));
            }
            if !entry_names.insert(name.as_str()) {
                return Err(field(name, "name", "is planned twice".into()));
            }
            let planes = match planned {
                Planned::Matrix(spec) => {
                    let planes = spec
                        .planes()
                        .map_err(|(f, reason)| field(name, f, reason))?;
                    let meta = MatrixMeta {
                        codec: spec.codec.name().to_string(),
                        shape: vec![spec.rows, spec.cols],
                        group: spec.group,
                    };
                    metadata.insert(format!("{MATRIX_KEY_PREFIX}{name}"), json(&meta)?);
                    planes
                        .into_iter()
                        .map(|p| (format!("{name}.{}", p.field), p.dtype, p.shape))
                        .collect()
                }
                Planned::F32 { shape } => vec![(name.clone(), Dtype::F32, shape.clone())],
                Planned::Bytes { len } => vec![(name.clone(), Dtype::U8, vec![*len])],
            };
            for (p, (tensor, dtype, shape)) in planes.into_iter().enumerate() {
                let bytes = byte_size(dtype, &shape)
                    .ok_or_else(|| field(name, "shape", format!("{shape:?} is too large")))?;
                if !names.insert(tensor.clone()) {
                    return Err(field(
                        &tensor,
                        "name",
                        "is planned twice (a matrix NAME also takes NAME.masks, NAME.codes, NAME.scales or NAME.values)".into(),
                    ));
                }
                tensors.push((tensor, dtype, shape, bytes, index, p));
            }
        }

        // Widest elements first: each plane's size is a multiple of its element size, so every plane
        // starts aligned for its type once the data section starts at a multiple of 8.
        tensors.sort_by(|a, b| {
            dtype_bytes(b.1)
                .cmp(&dtype_bytes(a.1))
                .then_with(|| a.0.cmp(&b.0))
        });

        // Zeros where the checksums go: finish() writes them over, at the same length.
        let placeholder = checksums_json(
            tensors
                .iter()
                .map(|t| (t.0.as_str(), 0))
                .chain([(HEADER_CHECKSUM, 0)]),
        )?;
        metadata.insert(CHECKSUMS_KEY.to_string(), placeholder.clone());
        let too_large = || FormatError::Parameter("the planned file is too large".into());
        let mut header = String::from("{\"__metadata__\":");
        header += &json(&metadata)?;
        // A key followed by `:"` is a metadata entry (a value holding it would have its quotes
        // escaped), and keys are unique: the first match is the placeholder.
        let needle = format!("{}:{}", json(CHECKSUMS_KEY)?, json(&placeholder)?);
        let checksums_at = header
            .find(&needle)
            .map(|at| {
                let value = at + json(CHECKSUMS_KEY).map_or(0, |k| k.len()) + 1;
                ((LEN_BYTES + value) as u64, needle.len() - (value - at))
            })
            .ok_or_else(|| FormatError::Parameter("cannot place the checksums".into()))?;
        let mut ranges = vec![Vec::new(); plan.entries.len()];
        let mut checksums = vec![Vec::new(); plan.entries.len()];
        let mut offset = 0usize;
        for (tensor, dtype, shape, bytes, index, p) in tensors {
            let end = offset.checked_add(bytes).ok_or_else(too_large)?;
            let info = TensorInfo {
                dtype,
                shape,
                data_offsets: (offset, end),
            };
            header.push(',');
            header += &json(&tensor)?;
            header.push(':');
            header += &json(&info)?;
            let r: &mut Vec<(u64, usize)> = &mut ranges[index];
            if r.len() <= p {
                r.resize(p + 1, (0, 0));
            }
            r[p] = (offset as u64, bytes);
            let c: &mut Vec<(String, u32)> = &mut checksums[index];
            if c.len() <= p {
                c.resize(p + 1, (String::new(), 0));
            }
            c[p] = (tensor.clone(), 0);
            offset = end;
        }
        header.push('}');
        while !(LEN_BYTES + header.len()).is_multiple_of(8) {
            header.push(' ');
        }
        if header.len() > MAX_HEADER_BYTES {
            return Err(FormatError::Parameter(format!(
                "the header would be {} bytes, over safetensors' limit of {MAX_HEADER_BYTES}: store large metadata as a byte blob instead",
                header.len()
            )));
        }
        let header_crc = crc32fast::hash(header.as_bytes());
        let data_start = (LEN_BYTES + header.len()) as u64;
        let total = data_start
            .checked_add(offset as u64)
            .ok_or_else(too_large)?;

        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(access(&partial, "create the output file"))?;
        let mut w = Self {
            path,
            partial,
            file: Some(file),
            data_start,
            slots: plan
                .entries
                .iter()
                .zip(ranges.into_iter().zip(checksums))
                .map(|((name, planned), (ranges, checksums))| {
                    let slot = Slot {
                        planned: planned.clone(),
                        ranges,
                        checksums,
                        written: false,
                    };
                    (name.clone(), slot)
                })
                .collect(),
            checksums_at,
            header_crc,
            finished: false,
        };
        // From here on, an error drops `w`, which deletes the partial file.
        let mut prefix = (header.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(header.as_bytes());
        w.file()?
            .set_len(total)
            .map_err(access(&w.partial, "set the file size (is the disk full?)"))?;
        w.write_at(0, &prefix)?;
        Ok(w)
    }

    fn file(&mut self) -> Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| FormatError::Parameter("the writer is already finished".into()))
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let partial = self.partial.clone();
        let file = self.file()?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(data))
            .map_err(access(&partial, "write (is the disk full?)"))
    }

    fn field(&self, tensor: &str, field: &str, reason: String) -> FormatError {
        FormatError::Field {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            field: field.to_string(),
            reason,
        }
    }

    /// The planned slot of `name`, checked to be of the kind being written and not yet written.
    fn slot(&self, name: &str, kind: &'static str) -> Result<&Slot> {
        let Some(slot) = self.slots.get(name) else {
            return Err(self.field(
                name,
                "name",
                format!("{kind} that is not in the plan given to UpgWriter::create"),
            ));
        };
        if slot.planned.kind() != kind {
            return Err(self.field(
                name,
                "kind",
                format!("planned as {}, but given {kind}", slot.planned.kind()),
            ));
        }
        if slot.written {
            return Err(self.field(name, "data", "written twice".into()));
        }
        Ok(slot)
    }

    /// Writes an encoded matrix; it must match its plan (codec, shape, group) and pass
    /// [`Tensor::validate`].
    pub fn put_matrix(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let slot = self.slot(name, "a matrix")?;
        let Planned::Matrix(spec) = slot.planned else {
            return Err(self.field(name, "kind", "not planned as a matrix".into()));
        };
        let given = MatrixSpec::of(t);
        let mismatch = if given.codec != spec.codec {
            Some((
                "codec",
                format!(
                    "planned {}, given {}",
                    spec.codec.name(),
                    given.codec.name()
                ),
            ))
        } else if [given.rows, given.cols] != [spec.rows, spec.cols] {
            Some((
                "shape",
                format!(
                    "planned [{}, {}], given [{}, {}]",
                    spec.rows, spec.cols, given.rows, given.cols
                ),
            ))
        } else if given.group != spec.group {
            Some((
                "group",
                format!("planned {:?}, given {:?}", spec.group, given.group),
            ))
        } else {
            None
        };
        if let Some((f, reason)) = mismatch {
            return Err(self.field(name, f, reason));
        }
        t.validate()
            .map_err(|(f, reason)| self.field(name, f, reason))?;
        let planes = tensor_planes(t);
        self.write_entry(name, &planes)
    }

    /// Writes an f32 array; its length must be the product of the planned shape.
    pub fn put_f32(&mut self, name: &str, data: &[f32]) -> Result<()> {
        self.slot(name, "an f32 array")?;
        self.write_entry(name, &[bytemuck::cast_slice(data)])
    }

    /// Writes a byte blob of the planned length.
    pub fn put_bytes(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.slot(name, "a byte blob")?;
        self.write_entry(name, &[data])
    }

    fn write_entry(&mut self, name: &str, planes: &[&[u8]]) -> Result<()> {
        let ranges = self
            .slots
            .get(name)
            .map(|s| s.ranges.clone())
            .unwrap_or_default();
        if ranges.len() != planes.len() {
            return Err(self.field(
                name,
                "data",
                format!("{} planes given, {} planned", planes.len(), ranges.len()),
            ));
        }
        for (&(_, len), data) in ranges.iter().zip(planes) {
            if data.len() != len {
                let reason = match self.slots.get(name).map(|s| &s.planned) {
                    Some(Planned::F32 { shape }) => format!(
                        "planned shape {shape:?} holds {} values, given {}",
                        len / 4,
                        data.len() / 4
                    ),
                    _ => format!("planned {len} bytes, given {}", data.len()),
                };
                return Err(self.field(name, "shape", reason));
            }
        }
        for (&(offset, _), data) in ranges.iter().zip(planes) {
            self.write_at(self.data_start + offset, data)?;
        }
        if let Some(slot) = self.slots.get_mut(name) {
            for ((_, crc), data) in slot.checksums.iter_mut().zip(planes) {
                *crc = crc32fast::hash(data);
            }
            slot.written = true;
        }
        Ok(())
    }

    /// Checks that every planned entry was written, flushes to disk and renames the file into place.
    /// On error nothing is left behind.
    pub fn finish(mut self) -> Result<()> {
        let mut missing: Vec<&str> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.written)
            .map(|(n, _)| n.as_str())
            .collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            let count = missing.len();
            let names = missing
                .iter()
                .take(5)
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ");
            let more = if count > 5 { ", ..." } else { "" };
            return Err(FormatError::Unwritten {
                path: self.path.clone(),
                count,
                names: format!("{names}{more}"),
            });
        }
        let checksums = checksums_json(
            self.slots
                .values()
                .flat_map(|s| &s.checksums)
                .map(|(n, c)| (n.as_str(), *c))
                .chain([(HEADER_CHECKSUM, self.header_crc)]),
        )?;
        let text = json(&checksums)?;
        let (at, len) = self.checksums_at;
        if text.len() != len {
            return Err(FormatError::Parameter(format!(
                "the checksums take {} bytes, {len} were laid out",
                text.len()
            )));
        }
        self.write_at(at, text.as_bytes())?;
        let partial = self.partial.clone();
        let file = self.file.take();
        if let Some(file) = file {
            file.sync_all()
                .map_err(access(&partial, "flush the file to disk"))?;
        }
        std::fs::rename(&self.partial, &self.path)
            .map_err(access(&self.path, "move the finished file into place"))?;
        self.finished = true;
        // Make the rename itself durable. Best effort: not every platform can open a directory.
        #[cfg(unix)]
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for UpgWriter {
    fn drop(&mut self) {
        if !self.finished {
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// One tensor of the container: dtype, shape and byte range inside the mapped file.
#[derive(Clone, Debug)]
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

#[derive(Debug)]
struct StoredMatrix {
    spec: MatrixSpec,
    /// In the order of [`MatrixSpec::planes`], with their field names.
    planes: Vec<Stored>,
    fields: Vec<&'static str>,
}

/// A tensor's entry in the safetensors header.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// An open .upg file, memory-mapped and validated; see the module documentation.
///
/// The file must not be modified while it is open: its planes are read in place.
#[derive(Debug)]
pub struct UpgFile {
    path: PathBuf,
    map: Arc<Mmap>,
    matrices: BTreeMap<String, StoredMatrix>,
    arrays: BTreeMap<String, Stored>,
    blobs: BTreeMap<String, Stored>,
    metadata: BTreeMap<String, String>,
}

fn field_error(path: &Path, tensor: &str, field: &str, reason: String) -> FormatError {
    FormatError::Field {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        field: field.to_string(),
        reason,
    }
}

/// Parses and checks the safetensors layer: header length, JSON, every tensor's dtype, shape and
/// offsets, and that the tensors fill the data section exactly. Returns the tensors with absolute
/// byte ranges, and the `__metadata__` map.
fn parse_container(
    path: &Path,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Stored>, BTreeMap<String, String>)> {
    let header_error = |reason: String| FormatError::Header {
        path: path.to_path_buf(),
        reason,
    };
    let Some(len_field) = bytes.first_chunk::<LEN_BYTES>() else {
        return Err(header_error(format!(
            "the file is {} bytes, too short for a safetensors header (truncated?)",
            bytes.len()
        )));
    };
    let n = u64::from_le_bytes(*len_field);
    if n > MAX_HEADER_BYTES as u64 {
        return Err(header_error(format!(
            "the header length field says {n} bytes, over safetensors' limit of {MAX_HEADER_BYTES}: not a safetensors file, or a corrupt one"
        )));
    }
    let header_end = LEN_BYTES + n as usize;
    let Some(text) = bytes.get(LEN_BYTES..header_end) else {
        return Err(header_error(format!(
            "the header length field says {n} bytes, but only {} follow: the file is truncated or not a safetensors file",
            bytes.len() - LEN_BYTES
        )));
    };
    let text = std::str::from_utf8(text)
        .map_err(|e| header_error(format!("the JSON header is not UTF-8: {e}")))?;
    let mut root: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| header_error(format!("the header is not a JSON object: {e}")))?;
    let metadata: BTreeMap<String, String> = match root.remove("__metadata__") {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| header_error(format!("__metadata__ must map strings to strings: {e}")))?,
        None => BTreeMap::new(),
    };

    let mut tensors = Vec::with_capacity(root.len());
    for (name, value) in root {
        let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| {
            field_error(
                path,
                &name,
                "header",
                format!("not a safetensors tensor entry: {e}"),
            )
        })?;
        let (start, end) = entry.data_offsets;
        let size = byte_size(entry.dtype, &entry.shape).ok_or_else(|| {
            field_error(
                path,
                &name,
                "shape",
                format!(
                    "{:?} of {} overflows or is not a whole number of bytes",
                    entry.shape, entry.dtype
                ),
            )
        })?;
        if end.checked_sub(start) != Some(size) {
            return Err(field_error(
                path,
                &name,
                "data_offsets",
                format!(
                    "[{start}, {end}] does not span the {size} bytes that shape {:?} of {} needs",
                    entry.shape, entry.dtype
                ),
            ));
        }
        tensors.push((name, entry));
    }
    // Back to back from offset 0, as safetensors requires; zero-sized tensors sort before their
    // neighbour at the same offset.
    tensors.sort_by_key(|(_, e)| e.data_offsets);
    let mut expected = 0;
    for (name, e) in &tensors {
        if e.data_offsets.0 != expected {
            return Err(field_error(
                path,
                name,
                "data_offsets",
                format!(
                    "starts at {}, but the tensor before it ends at {expected}: tensors must be stored back to back",
                    e.data_offsets.0
                ),
            ));
        }
        expected = e.data_offsets.1;
    }
    let held = bytes.len() - header_end;
    if expected != held {
        let reason = if expected > held {
            format!("the tensors need {expected} bytes of data but the file holds {held} after the header: the file is truncated (was the copy or download complete?)")
        } else {
            format!(
                "{} bytes follow the last tensor: the file is corrupt or not a safetensors file",
                held - expected
            )
        };
        return Err(header_error(reason));
    }
    // The checks above give errors that name the tensor; the safetensors crate has the last word,
    // so that whatever opens here also opens in Python.
    SafeTensors::read_metadata(bytes)
        .map_err(|e| header_error(format!("rejected by the safetensors reader: {e}")))?;

    let stored = tensors
        .into_iter()
        .map(|(name, e)| {
            let stored = Stored {
                dtype: e.dtype,
                shape: e.shape,
                start: header_end + e.data_offsets.0,
                end: header_end + e.data_offsets.1,
            };
            (name, stored)
        })
        .collect();
    Ok((stored, metadata))
}

impl UpgFile {
    /// Maps the file and validates every field: the safetensors layer, the format version, each
    /// matrix's description and planes (dtype and exact shape), and each matrix's contents
    /// ([`Tensor::validate`]). Errors name the file, the tensor and the field.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(access(&path, "open the file"))?;
        let len = file
            .metadata()
            .map_err(access(&path, "read the file's size"))?
            .len();
        if len < LEN_BYTES as u64 {
            return Err(FormatError::Header {
                path,
                reason: format!(
                    "the file is {len} bytes, too short for a safetensors header (truncated?)"
                ),
            });
        }
        // SAFETY: the map is only read, and only within its length. Another process truncating or
        // rewriting the file while it is open would change what we read (or fault); that is
        // documented on `UpgFile`, as for every memory-mapped model format.
        let map = unsafe { Mmap::map(&file) }.map_err(access(&path, "memory-map the file"))?;
        Self::from_map(path, map)
    }

    /// A file held in memory (received over a network, or a fuzzer's input), validated exactly as
    /// [`UpgFile::open`] validates a file on disk; `origin` names it in errors. The bytes are copied
    /// into page-aligned anonymous memory, so planes are used in place as in a mapped file.
    pub fn from_bytes(bytes: &[u8], origin: impl Into<PathBuf>) -> Result<Self> {
        let path = origin.into();
        let mut anon =
            memmap2::MmapMut::map_anon(bytes.len()).map_err(access(&path, "allocate memory"))?;
        anon.copy_from_slice(bytes);
        let map = anon
            .make_read_only()
            .map_err(access(&path, "protect the copy"))?;
        Self::from_map(path, map)
    }

    fn from_map(path: PathBuf, map: Mmap) -> Result<Self> {
        let (mut tensors, mut metadata) = parse_container(&path, &map)?;

        let checksums = metadata.remove(CHECKSUMS_KEY);
        match (metadata.get(VERSION_KEY).map(String::as_str), &checksums) {
            (None, _) => {
                return Err(FormatError::Header {
                    path,
                    reason: format!("no '{VERSION_KEY}' in the metadata: a safetensors file, but not a .upg file; convert the checkpoint with upg"),
                })
            }
            (Some("2"), None) => {
                return Err(FormatError::Header {
                    path,
                    reason: format!("no '{CHECKSUMS_KEY}' in the metadata, which every version 2 file has: the header is damaged; copy or convert the file again"),
                })
            }
            (Some("1"), Some(_)) => {
                return Err(FormatError::Header {
                    path,
                    reason: format!("'{CHECKSUMS_KEY}' in a version 1 file, which has none: the header is damaged; copy or convert the file again"),
                })
            }
            (Some("1" | "2"), _) => {}
            (Some(v), _) => {
                return Err(FormatError::Version {
                    path,
                    found: v.to_string(),
                    supported: FORMAT_VERSION,
                })
            }
        }

        let mut matrices = BTreeMap::new();
        let keys: Vec<String> = metadata
            .keys()
            .filter(|k| k.starts_with(MATRIX_KEY_PREFIX))
            .cloned()
            .collect();
        for key in keys {
            let json = metadata.remove(&key).unwrap_or_default();
            let name = &key[MATRIX_KEY_PREFIX.len()..];
            let matrix = Self::describe_matrix(&path, name, &json, &mut tensors)?;
            matrices.insert(name.to_string(), matrix);
        }
        metadata.remove(VERSION_KEY);

        let (mut arrays, mut blobs) = (BTreeMap::new(), BTreeMap::new());
        for (name, t) in tensors {
            match (t.dtype, t.shape.len()) {
                (Dtype::F32, _) => arrays.insert(name, t),
                (Dtype::U8, 1) => blobs.insert(name, t),
                _ => {
                    return Err(field_error(
                        &path,
                        &name,
                        "dtype",
                        format!(
                            "{} with shape {:?} belongs to no matrix, and is neither an f32 array nor a 1-D U8 byte blob (is its '{MATRIX_KEY_PREFIX}*' metadata missing?)",
                            t.dtype, t.shape
                        ),
                    ))
                }
            };
        }

        let file = Self {
            path,
            map: Arc::new(map),
            matrices,
            arrays,
            blobs,
            metadata,
        };
        if let Some(text) = checksums {
            file.verify_checksums(&text)?;
        }
        // Contents last, all matrices in parallel: the masks and scales of a large model are a lot
        // of pages to read. The first failing matrix in name order is reported.
        let failures: Vec<FormatError> = file
            .matrices
            .par_iter()
            .filter_map(|(name, m)| {
                file.build(m)
                    .validate()
                    .err()
                    .map(|(field, reason)| field_error(&file.path, name, field, reason))
            })
            .collect();
        match failures.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(file),
        }
    }

    /// Parses a matrix's `upg.tensor.NAME` description and takes its planes out of `tensors`,
    /// checking each plane's dtype and shape against what the codec implies.
    fn describe_matrix(
        path: &Path,
        name: &str,
        json: &str,
        tensors: &mut BTreeMap<String, Stored>,
    ) -> Result<StoredMatrix> {
        let err = |field: &str, reason: String| field_error(path, name, field, reason);
        let meta: MatrixMeta = serde_json::from_str(json).map_err(|e| {
            err(
                "metadata",
                format!("'{MATRIX_KEY_PREFIX}{name}' = {json:?} is not a valid description: {e}"),
            )
        })?;
        let codec = Codec::from_name(&meta.codec).ok_or_else(|| {
            err(
                "codec",
                format!(
                    "unknown codec '{}' (this build reads sparse50_q4, f32, f16 and q4; a newer upg may have written the file)",
                    meta.codec
                ),
            )
        })?;
        let &[rows, cols] = meta.shape.as_slice() else {
            return Err(err(
                "shape",
                format!("{:?} is not [rows, cols]", meta.shape),
            ));
        };
        let spec = MatrixSpec {
            codec,
            rows,
            cols,
            group: meta.group,
        };
        let planes = spec.planes().map_err(|(f, reason)| err(f, reason))?;
        let mut stored = Vec::with_capacity(planes.len());
        let fields = planes.iter().map(|p| p.field).collect();
        for p in planes {
            let tensor = format!("{name}.{}", p.field);
            let Some(t) = tensors.remove(&tensor) else {
                return Err(err(
                    p.field,
                    format!("plane '{tensor}' is missing from the file"),
                ));
            };
            if t.dtype != p.dtype {
                return Err(err(
                    p.field,
                    format!(
                        "plane '{tensor}' is {}, but the {} codec stores it as {}",
                        t.dtype,
                        codec.name(),
                        p.dtype
                    ),
                ));
            }
            if t.shape != p.shape {
                return Err(err(
                    p.field,
                    format!(
                        "plane '{tensor}' has shape {:?}, but {} needs {:?}: the plane or the metadata is wrong",
                        t.shape,
                        spec.describe(),
                        p.shape
                    ),
                ));
            }
            stored.push(t);
        }
        Ok(StoredMatrix {
            spec,
            planes: stored,
            fields,
        })
    }

    /// Checks the header and every tensor's bytes against the CRC-32s of `upg.checksums` (all in
    /// parallel), and that the checksums name exactly the file's tensors. The first failure in name
    /// order is reported.
    fn verify_checksums(&self, text: &str) -> Result<()> {
        let path = &self.path;
        let damaged = |what: String| {
            FormatError::Header {
            path: path.clone(),
            reason: format!("{what}: the header is damaged (or was rewritten by another tool); copy or convert the file again"),
        }
        };
        let mut stored: BTreeMap<String, String> = serde_json::from_str(text).map_err(|e| {
            damaged(format!(
                "'{CHECKSUMS_KEY}' is not a map of tensor names to CRC-32s ({e})"
            ))
        })?;
        let parse = |hex: &str| {
            // Lowercase only: an upper-case digit would be a second spelling that a flipped bit
            // (0x20) makes, and the header's checksum treats every digit as 0.
            (hex.len() == 8 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then(|| u32::from_str_radix(hex, 16).ok())
                .flatten()
        };
        // The header as it was laid out: this value with zeros for digits, as `UpgWriter` wrote it.
        let header_crc = stored
            .remove(HEADER_CHECKSUM)
            .and_then(|hex| parse(&hex))
            .ok_or_else(|| damaged(format!("no CRC-32 of the header in '{CHECKSUMS_KEY}'")))?;
        let zeros = checksums_json(
            stored
                .keys()
                .map(|k| (k.as_str(), 0))
                .chain([(HEADER_CHECKSUM, 0)]),
        )?;
        let key = json(CHECKSUMS_KEY)?;
        let (written, laid_out) = (
            format!("{key}:{}", json(text)?),
            format!("{key}:{}", json(&zeros)?),
        );
        let header = self.header_text();
        let at = header
            .windows(written.len())
            .position(|w| w == written.as_bytes())
            .filter(|_| written.len() == laid_out.len())
            .ok_or_else(|| damaged(format!("'{CHECKSUMS_KEY}' is not where upg writes it")))?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[..at]);
        hasher.update(laid_out.as_bytes());
        hasher.update(&header[at + written.len()..]);
        let got = hasher.finalize();
        if got != header_crc {
            return Err(damaged(format!(
                "the header does not match its checksum (CRC-32 {got:08x}, stored {header_crc:08x})"
            )));
        }
        // (entry, field, container tensor, bytes) of every tensor in the file.
        let mut parts: Vec<(&str, &str, String, &Stored)> = Vec::new();
        for (name, m) in &self.matrices {
            for (field, s) in m.fields.iter().zip(&m.planes) {
                parts.push((name, field, format!("{name}.{field}"), s));
            }
        }
        for (name, s) in self.arrays.iter().chain(&self.blobs) {
            parts.push((name, "data", name.clone(), s));
        }
        let failures: Vec<FormatError> = parts
            .par_iter()
            .filter_map(|(entry, field, tensor, s)| {
                let reason = match stored.get(tensor) {
                    None => format!("'{tensor}' has no checksum in '{CHECKSUMS_KEY}', though the file has checksums: the header is damaged"),
                    Some(hex) => {
                        let want = parse(hex);
                        let got = crc32fast::hash(self.map.get(s.start..s.end).unwrap_or(&[]));
                        match want {
                            None => format!("checksum '{hex}' of '{tensor}' is not 8 hex digits: the header is damaged"),
                            Some(w) if w != got => format!("the {} bytes of '{tensor}' do not match their checksum (CRC-32 {got:08x}, stored {w:08x}): the file is damaged (an incomplete copy or download, or a bad disk); copy or convert it again", s.end - s.start),
                            Some(_) => return None,
                        }
                    }
                };
                Some(field_error(path, entry, field, reason))
            })
            .collect();
        if let Some(e) = failures.into_iter().next() {
            return Err(e);
        }
        let known: BTreeSet<&str> = parts.iter().map(|p| p.2.as_str()).collect();
        match stored.keys().find(|k| !known.contains(k.as_str())) {
            Some(extra) => Err(field_error(
                path,
                extra,
                "checksum",
                format!("listed in '{CHECKSUMS_KEY}' but not in the file: the header is damaged"),
            )),
            None => Ok(()),
        }
    }

    /// The JSON header (its length was checked when the file was opened).
    fn header_text(&self) -> &[u8] {
        let len = self
            .map
            .first_chunk::<LEN_BYTES>()
            .map_or(0, |n| u64::from_le_bytes(*n) as usize);
        self.map.get(LEN_BYTES..LEN_BYTES + len).unwrap_or(&[])
    }

    /// A plane in place when aligned for `T`, otherwise an owned copy.
    fn plane<T: Pod>(&self, s: &Stored) -> Plane<T> {
        let size = std::mem::size_of::<T>();
        let len = (s.end - s.start) / size;
        Plane::mapped(self.map.clone(), s.start, len).unwrap_or_else(|| {
            let mut v = vec![T::zeroed(); len];
            bytemuck::cast_slice_mut::<T, u8>(&mut v)
                .copy_from_slice(&self.map[s.start..s.start + len * size]);
            Plane::Owned(v)
        })
    }

    fn build(&self, m: &StoredMatrix) -> Tensor {
        let MatrixSpec {
            rows, cols, group, ..
        } = m.spec;
        let p = &m.planes;
        // `describe_matrix` stored exactly the planes of `MatrixSpec::planes`, so these indices exist.
        match m.spec.codec {
            Codec::Sparse => Tensor::Sparse(SparseMatrix {
                rows,
                cols,
                group: group.unwrap_or(0),
                masks: self.plane(&p[0]),
                codes: self.plane(&p[1]),
                scales: self.plane(&p[2]),
            }),
            Codec::F32 => Tensor::F32(DenseF32 {
                rows,
                cols,
                values: self.plane(&p[0]),
            }),
            Codec::F16 => Tensor::F16(DenseF16 {
                rows,
                cols,
                values: self.plane(&p[0]),
            }),
            Codec::Q4 => Tensor::Q4(Q4Matrix {
                rows,
                cols,
                group: group.unwrap_or(0),
                codes: self.plane(&p[0]),
                scales: self.plane(&p[1]),
            }),
            Codec::Q3 => Tensor::Q3(Q3Matrix {
                rows,
                cols,
                group: group.unwrap_or(0),
                codes: self.plane(&p[0]),
                scales: self.plane(&p[1]),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The caller's metadata (`upg.format_version` and `upg.tensor.*` are the format's and not here).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn matrix_names(&self) -> impl Iterator<Item = &str> {
        self.matrices.keys().map(String::as_str)
    }

    pub fn f32_names(&self) -> impl Iterator<Item = &str> {
        self.arrays.keys().map(String::as_str)
    }

    pub fn bytes_names(&self) -> impl Iterator<Item = &str> {
        self.blobs.keys().map(String::as_str)
    }

    pub fn matrix_spec(&self, name: &str) -> Result<MatrixSpec> {
        self.matrices
            .get(name)
            .map(|m| m.spec)
            .ok_or_else(|| self.missing(name))
    }

    /// A matrix with its planes in place in the mapped file (validated when the file was opened).
    pub fn matrix(&self, name: &str) -> Result<Tensor> {
        self.matrices
            .get(name)
            .map(|m| self.build(m))
            .ok_or_else(|| self.missing(name))
    }

    /// An f32 array (flattened; see [`UpgFile::f32_shape`]).
    pub fn f32(&self, name: &str) -> Result<Plane<f32>> {
        self.arrays
            .get(name)
            .map(|s| self.plane(s))
            .ok_or_else(|| self.missing(name))
    }

    pub fn f32_shape(&self, name: &str) -> Result<&[usize]> {
        self.arrays
            .get(name)
            .map(|s| s.shape.as_slice())
            .ok_or_else(|| self.missing(name))
    }

    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        self.blobs
            .get(name)
            .map(|s| &self.map[s.start..s.end])
            .ok_or_else(|| self.missing(name))
    }

    /// The error for a name that is not there (or not of the kind asked for), with a hint.
    fn missing(&self, name: &str) -> FormatError {
        let kinds = [
            ("a matrix", "matrix", self.matrices.contains_key(name)),
            ("an f32 array", "f32", self.arrays.contains_key(name)),
            ("a byte blob", "bytes", self.blobs.contains_key(name)),
        ];
        let hint = if let Some((kind, method, _)) = kinds.iter().find(|k| k.2) {
            format!(" of that kind: it is {kind}, read it with UpgFile::{method}")
        } else {
            let mut close: Vec<(usize, &str)> = self
                .matrix_names()
                .chain(self.f32_names())
                .chain(self.bytes_names())
                .map(|n| (edit_distance(name, n), n))
                .filter(|&(d, _)| d <= (name.chars().count() / 3).max(2))
                .collect();
            close.sort_unstable();
            if close.is_empty() {
                format!(
                    "; the file holds {} matrices, {} f32 arrays and {} byte blobs",
                    self.matrices.len(),
                    self.arrays.len(),
                    self.blobs.len()
                )
            } else {
                let names: Vec<String> = close
                    .iter()
                    .take(3)
                    .map(|(_, n)| format!("'{n}'"))
                    .collect();
                format!("; close names: {}", names.join(", "))
            }
        };
        FormatError::Missing {
            path: self.path.clone(),
            tensor: name.to_string(),
            hint,
        }
    }
}

/// Levenshtein distance in characters, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::edit_distance;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("layers.0.q", "layers.0.q"), 0);
        assert_eq!(edit_distance("layers.0.q", "layers.1.q"), 1);
        assert_eq!(edit_distance("ab", "ba"), 2);
    }
}
