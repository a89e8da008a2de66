//! A Hugging Face model folder: config.json plus model.safetensors, or model-*.safetensors shards listed in
//! model.safetensors.index.json. Shards are memory-mapped; tensors are handed out as [`Dense`] views that
//! borrow the map (copied only when a tensor's offset is not aligned for its dtype), so a large checkpoint
//! is read once, row by row, while it is encoded.
//!
//! Tensor names are those of transformers' Phi3ForCausalLM, fused projections as stored:
//! `model.layers.N.self_attn.qkv_proj.weight` [q + 2 kv, hidden] and `model.layers.N.mlp.gate_up_proj.weight`
//! [2 intermediate, hidden] (gate rows first).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::config::Config;
use super::error::{ModelError, Result};
use crate::format::{Dense, DenseData, Plane};

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
}

#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the shard's map.
    start: usize,
    end: usize,
}

/// A checkpoint tensor as f32 / f16 / bf16 values, borrowed from the map where alignment allows.
pub struct DenseView<'a> {
    pub rows: usize,
    pub cols: usize,
    values: Values<'a>,
}

enum Values<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [f16]>),
    BF16(Cow<'a, [bf16]>),
}

impl DenseView<'_> {
    pub fn dense(&self) -> Dense<'_> {
        let data = match &self.values {
            Values::F32(v) => DenseData::F32(v),
            Values::F16(v) => DenseData::F16(v),
            Values::BF16(v) => DenseData::BF16(v),
        };
        Dense {
            rows: self.rows,
            cols: self.cols,
            data,
        }
    }

    /// True when the values are read straight from the mapped file.
    pub fn is_borrowed(&self) -> bool {
        matches!(
            &self.values,
            Values::F32(Cow::Borrowed(_))
                | Values::F16(Cow::Borrowed(_))
                | Values::BF16(Cow::Borrowed(_))
        )
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only; a checkpoint changed on disk while it is open is outside our
    // control, as for every memory-mapped loader.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}

impl Checkpoint {
    /// Opens `dir`: reads config.json and maps every shard.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Checkpoint {
                path: dir.to_owned(),
                reason:
                    "not a folder; give the Hugging Face model folder (config.json, *.safetensors)"
                        .into(),
            });
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: Index = serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                path: index_path.clone(),
                reason: format!("not a valid safetensors index: {e}"),
            })?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(ModelError::Checkpoint {
                path: dir.to_owned(),
                reason: "no model.safetensors and no model.safetensors.index.json: download the weights (*.safetensors) too".into(),
            });
        };
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            if !path.exists() {
                return Err(ModelError::Checkpoint {
                    path,
                    reason: "shard listed in model.safetensors.index.json is missing: download it"
                        .into(),
                });
            }
            let map = map_file(&path)?;
            let (header, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| ModelError::Checkpoint {
                    path: path.clone(),
                    reason: format!("not a readable safetensors file: {e}"),
                })?;
            let base = 8 + header;
            for (tname, info) in meta.tensors() {
                let entry = Entry {
                    shard: shards.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if tensors.insert(tname.clone(), entry).is_some() {
                    return Err(ModelError::Checkpoint {
                        path: path.clone(),
                        reason: format!("tensor '{tname}' appears in more than one shard"),
                    });
                }
            }
            shards.push(Shard {
                path,
                map: Arc::new(map),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            config,
            shards,
            tensors,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| {
            let near: Vec<&str> = self
                .names()
                .filter(|n| {
                    let tail = name.rsplit('.').nth(1).unwrap_or(name);
                    n.contains(tail)
                })
                .take(3)
                .collect();
            ModelError::MissingTensor {
                path: self.dir.clone(),
                tensor: name.into(),
                hint: if near.is_empty() {
                    " (is this a Phi3ForCausalLM checkpoint?)".into()
                } else {
                    format!(" (similar: {})", near.join(", "))
                },
            }
        })
    }

    /// Tensor `name` as a [rows, cols] matrix (a 1-D tensor reads as [1, len]); checks shape and dtype.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<DenseView<'_>> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        let expected = if rows == 1 && e.shape.len() == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        if e.shape != expected {
            return Err(ModelError::Shape {
                path: shard.path.clone(),
                tensor: name.into(),
                found: e.shape.clone(),
                expected,
            });
        }
        let bytes = &shard.map[e.start..e.end];
        let values = match e.dtype {
            Dtype::F32 => Values::F32(cast(bytes)),
            Dtype::F16 => Values::F16(cast(bytes)),
            Dtype::BF16 => Values::BF16(cast(bytes)),
            other => {
                return Err(ModelError::Dtype {
                    path: shard.path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(DenseView { rows, cols, values })
    }

    /// A 1-D tensor of `len` values (norm weights) as f32; refuses NaN and infinities.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let view = self.matrix(name, 1, len)?;
        let mut out = Vec::new();
        view.dense()
            .row_f32(0, &mut out)
            .map_err(|source| ModelError::Encode {
                tensor: name.into(),
                source,
            })?;
        Ok(out)
    }

    /// An f32 tensor as a plane borrowed from the map (no copy), when it is stored as f32 at an aligned
    /// offset; `None` otherwise.
    pub fn mapped_f32(&self, name: &str) -> Option<Plane<f32>> {
        let e = self.tensors.get(name)?;
        if e.dtype != Dtype::F32 {
            return None;
        }
        Plane::mapped(
            self.shards[e.shard].map.clone(),
            e.start,
            (e.end - e.start) / 4,
        )
    }
}

/// Little-endian values of a safetensors payload: borrowed when aligned, copied otherwise.
fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(v) => Cow::Borrowed(v),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}
