//! Dense codecs for tensors that should not be pruned (embeddings, lm_head, small projections):
//! f32 (exact; the reference path that must match Hugging Face), plain f16, and q4 (4 bits per weight on the same grid as the sparse codec, one f16 scale per 32 or
//! 64 input columns).
//!
//! | codec | plane    | type | shape                  | bits per weight     |
//! |-------|----------|------|------------------------|---------------------|
//! | f32   | `values` | f32  | [rows, cols]           | 32                  |
//! | f16   | `values` | f16  | [rows, cols]           | 16                  |
//! | q4    | `codes`  | u8   | [rows, padded_cols/2]  | 4 + 16/group        |
//! | q4    | `scales` | f16  | [rows, padded_cols/group] |                  |
//!
//! q4 column `c` of a row is the nibble `c % 2` (low first) of byte `c / 2`; columns are padded to a
//! multiple of the group and the padding codes are never read.

use half::f16;
use rayon::prelude::*;

use super::error::{FormatError, Result};
use super::plane::Plane;
use super::quant::Grid;
use super::sparse::nibble;
use super::Dense;

/// The `values` plane of a dense codec must hold exactly rows x cols elements.
fn check_len(
    len: usize,
    rows: usize,
    cols: usize,
) -> std::result::Result<(), (&'static str, String)> {
    if len != rows * cols {
        return Err((
            "values",
            format!(
                "has {len} elements, shape [{rows}, {cols}] needs {}",
                rows * cols
            ),
        ));
    }
    Ok(())
}

/// The `scales` plane of a grouped codec: one finite f16 per `group` of the `padded` columns of a row.
fn check_scales(
    scales: &[f16],
    rows: usize,
    cols: usize,
    padded: usize,
    group: usize,
) -> std::result::Result<(), (&'static str, String)> {
    let want = rows * padded / group;
    if scales.len() != want {
        return Err((
            "scales",
            format!(
                "has {} elements, shape [{rows}, {cols}] with group {group} needs {want}",
                scales.len()
            ),
        ));
    }
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(("scales", format!("scale {i} is {}", scales[i])));
    }
    Ok(())
}

#[derive(Debug)]
pub struct DenseF32 {
    pub rows: usize,
    pub cols: usize,
    pub values: Plane<f32>,
}

impl DenseF32 {
    pub fn encode(w: &Dense) -> Result<Self> {
        let mut values = Vec::with_capacity(w.rows * w.cols);
        let mut row = Vec::new();
        for r in 0..w.rows {
            w.row_f32(r, &mut row)?;
            values.extend_from_slice(&row);
        }
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            values: values.into(),
        })
    }

    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        check_len(self.values.len(), self.rows, self.cols)
    }

    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        out[..self.cols].copy_from_slice(&self.values[r * self.cols..][..self.cols]);
    }
}

#[derive(Debug)]
pub struct DenseF16 {
    pub rows: usize,
    pub cols: usize,
    pub values: Plane<f16>,
}

impl DenseF16 {
    /// Converts to f16; weights beyond f16's range are refused rather than turned into infinities.
    pub fn encode(w: &Dense) -> Result<Self> {
        let mut values = vec![f16::ZERO; w.rows * w.cols];
        if w.cols > 0 {
            values
                .par_chunks_mut(w.cols)
                .enumerate()
                .try_for_each_init(Vec::new, |row, (r, out)| {
                    w.row_f32(r, row)?;
                    for (c, (o, &v)) in out.iter_mut().zip(row.iter()).enumerate() {
                        *o = f16::from_f32(v);
                        if o.is_infinite() {
                            return Err(FormatError::Parameter(format!(
                                "weight at row {r}, column {c} is {v}, beyond f16's range (65504): use the q4 or sparse codec, or rescale"
                            )));
                        }
                    }
                    Ok(())
                })?;
        }
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            values: values.into(),
        })
    }

    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        check_len(self.values.len(), self.rows, self.cols)
    }

    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        for (o, v) in out[..self.cols]
            .iter_mut()
            .zip(&self.values[r * self.cols..][..self.cols])
        {
            *o = v.to_f32();
        }
    }
}

#[derive(Debug)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Input columns per scale: 32 or 64.
    pub group: usize,
    pub codes: Plane<u8>,
    pub scales: Plane<f16>,
}

pub const Q4_GRID: Grid = Grid::Q4;

impl Q4Matrix {
    pub fn padded_cols(cols: usize, group: usize) -> usize {
        cols.div_ceil(group) * group
    }

    pub fn check_group(group: usize) -> Result<()> {
        if group != 32 && group != 64 {
            return Err(FormatError::Parameter(format!(
                "q4 group {group} is not supported: use 32 or 64"
            )));
        }
        Ok(())
    }

    pub fn encode(w: &Dense, group: usize) -> Result<Self> {
        Self::check_group(group)?;
        let padded = Self::padded_cols(w.cols, group);
        let mut codes = vec![0u8; w.rows * padded / 2];
        let mut scales = vec![f16::ZERO; w.rows * padded / group];
        if w.cols > 0 {
            codes
                .par_chunks_mut(padded / 2)
                .zip(scales.par_chunks_mut(padded / group))
                .enumerate()
                .try_for_each_init(Vec::new, |row, (r, (codes, scales))| {
                    w.row_f32(r, row)?;
                    for (g, scale) in scales.iter_mut().enumerate() {
                        let vals = &row[g * group..((g + 1) * group).min(w.cols)];
                        *scale = Q4_GRID.best_scale(vals);
                        let s = scale.to_f32();
                        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
                        for (i, &v) in vals.iter().enumerate() {
                            let c = g * group + i;
                            codes[c / 2] |= Q4_GRID.nearest(v * inv) << ((c & 1) * 4);
                        }
                    }
                    Ok::<(), FormatError>(())
                })?;
        }
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            group,
            codes: codes.into(),
            scales: scales.into(),
        })
    }

    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        Self::check_group(self.group).map_err(|e| ("group", e.to_string()))?;
        let padded = Self::padded_cols(self.cols, self.group);
        if self.codes.len() != self.rows * padded / 2 {
            return Err((
                "codes",
                format!(
                    "has {} bytes, shape [{}, {}] needs {}",
                    self.codes.len(),
                    self.rows,
                    self.cols,
                    self.rows * padded / 2
                ),
            ));
        }
        check_scales(&self.scales, self.rows, self.cols, padded, self.group)
    }

    pub fn stored_bytes(&self) -> usize {
        self.codes.len() + self.scales.as_bytes().len()
    }

    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let padded = Self::padded_cols(self.cols, self.group);
        let codes = &self.codes[r * padded / 2..][..padded / 2];
        let scales = &self.scales[r * padded / self.group..][..padded / self.group];
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            *o = scales[c / self.group].to_f32() * Q4_GRID.level(nibble(codes, c));
        }
    }
}

/// Dense 3-bit weights: codes on [`Grid::Q3`] (levels -7s, -5s, ..., 7s), one f16 scale per `group`
/// input columns. At group 128 that is 3.125 bits per weight, the sparse codec's budget.
///
/// The `codes` plane is bit-sliced: each run of 32 columns is 12 bytes, three little-endian u32 words,
/// word `b` holding bit `b` of the 32 codes (column `32k + i` at bit `i`). A decoder reads whole words
/// and never a code that straddles two; columns are padded to a multiple of the group and the padding
/// codes are never read.
///
/// | plane    | type | shape                        |
/// |----------|------|------------------------------|
/// | `codes`  | u8   | [rows, padded_cols / 32 * 12] |
/// | `scales` | f16  | [rows, padded_cols / group]  |
#[derive(Debug)]
pub struct Q3Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Input columns per scale: 32, 64 or 128.
    pub group: usize,
    pub codes: Plane<u8>,
    pub scales: Plane<f16>,
}

pub const Q3_GRID: Grid = Grid::Q3;

/// Bytes of codes per 32 columns.
pub const Q3_RUN_BYTES: usize = 12;

impl Q3Matrix {
    /// 3.125 bits per weight.
    pub const DEFAULT_GROUP: usize = 128;

    pub fn padded_cols(cols: usize, group: usize) -> usize {
        cols.div_ceil(group) * group
    }

    /// Code bytes per row.
    pub fn row_bytes(cols: usize, group: usize) -> usize {
        Self::padded_cols(cols, group) / 32 * Q3_RUN_BYTES
    }

    pub fn check_group(group: usize) -> Result<()> {
        if ![32, 64, 128].contains(&group) {
            return Err(FormatError::Parameter(format!(
                "q3 group {group} is not supported: use 32, 64 or 128"
            )));
        }
        Ok(())
    }

    pub fn encode(w: &Dense, group: usize) -> Result<Self> {
        Self::check_group(group)?;
        let padded = Self::padded_cols(w.cols, group);
        let rb = Self::row_bytes(w.cols, group);
        let mut codes = vec![0u8; w.rows * rb];
        let mut scales = vec![f16::ZERO; w.rows * padded / group];
        if w.cols > 0 {
            codes
                .par_chunks_mut(rb)
                .zip(scales.par_chunks_mut(padded / group))
                .enumerate()
                .try_for_each_init(Vec::new, |row, (r, (codes, scales))| {
                    w.row_f32(r, row)?;
                    for (g, scale) in scales.iter_mut().enumerate() {
                        let vals = &row[g * group..((g + 1) * group).min(w.cols)];
                        *scale = Q3_GRID.best_scale(vals);
                        let s = scale.to_f32();
                        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
                        for (i, &v) in vals.iter().enumerate() {
                            let c = g * group + i;
                            let code = Q3_GRID.nearest(v * inv);
                            for b in 0..3 {
                                if code >> b & 1 == 1 {
                                    let byte = c / 32 * Q3_RUN_BYTES + b * 4 + (c % 32) / 8;
                                    codes[byte] |= 1 << (c % 8);
                                }
                            }
                        }
                    }
                    Ok::<(), FormatError>(())
                })?;
        }
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            group,
            codes: codes.into(),
            scales: scales.into(),
        })
    }

    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        Self::check_group(self.group).map_err(|e| ("group", e.to_string()))?;
        let padded = Self::padded_cols(self.cols, self.group);
        let rb = Self::row_bytes(self.cols, self.group);
        if self.codes.len() != self.rows * rb {
            return Err((
                "codes",
                format!(
                    "has {} bytes, shape [{}, {}] needs {}",
                    self.codes.len(),
                    self.rows,
                    self.cols,
                    self.rows * rb
                ),
            ));
        }
        check_scales(&self.scales, self.rows, self.cols, padded, self.group)
    }

    pub fn stored_bytes(&self) -> usize {
        self.codes.len() + self.scales.as_bytes().len()
    }

    /// The code of column `c` in a row's code bytes.
    #[inline]
    pub fn code(codes: &[u8], c: usize) -> u8 {
        let run = &codes[c / 32 * Q3_RUN_BYTES..][..Q3_RUN_BYTES];
        let (byte, bit) = ((c % 32) / 8, c % 8);
        (0..3).fold(0, |code, b| code | ((run[b * 4 + byte] >> bit) & 1) << b)
    }

    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let padded = Self::padded_cols(self.cols, self.group);
        let rb = Self::row_bytes(self.cols, self.group);
        let codes = &self.codes[r * rb..][..rb];
        let scales = &self.scales[r * padded / self.group..][..padded / self.group];
        for (c, o) in out[..self.cols].iter_mut().enumerate() {
            *o = scales[c / self.group].to_f32() * Q3_GRID.level(Self::code(codes, c));
        }
    }
}
