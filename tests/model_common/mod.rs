//! Shared helpers of the model tests: fixture paths, reading the reference outputs that
//! scripts/make_phi3_fixture.py wrote with transformers, temporary folders, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A tensor of reference.safetensors as f64 values with its shape.
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl RefTensor {
    pub fn ids(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }
}

pub fn reference(dir: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("readable reference");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            )
        })
        .collect()
}

/// A fresh folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "upg-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A copy of fixture folder `name`.
    pub fn copy_of(name: &str) -> Self {
        let t = Self::new(name);
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), t.0.join(e.file_name())).unwrap();
        }
        t
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Per row of `width`: max |got - want| / max |want|, the error relative to the row's scale (elementwise
/// relative error is meaningless for logits near zero). Returns the worst row's value and index.
pub fn worst_row_rel_error(got: &[f32], want: &[f64], width: usize) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut worst = (0.0f64, 0usize);
    for (r, (g, w)) in got.chunks(width).zip(want.chunks(width)).enumerate() {
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = g
            .iter()
            .zip(w)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        let rel = if err.is_nan() {
            f64::INFINITY
        } else {
            err / scale
        };
        if rel > worst.0 || rel.is_infinite() {
            worst = (rel, r);
        }
    }
    worst
}

/// Softmax of one row in f64.
pub fn softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}
