//! The UPG sparse codec: 50% balanced sparsity with 4-bit codes.
//!
//! A matrix W [rows = outputs, cols = inputs] is cut, row by row, into blocks of 64 consecutive input
//! columns. Every block keeps exactly 32 weights (all of them when fewer than 32 real columns remain
//! in a padded last block), so every block has the same size and a GPU thread finds block `b` of row
//! `r` at `r * blocks + b` without row pointers:
//!
//! | plane    | type | shape                   | per 64 weights | content                                  |
//! |----------|------|-------------------------|----------------|------------------------------------------|
//! | `masks`  | u64  | [rows, blocks]          | 64 bits        | bit i set = column 64b + i kept           |
//! | `codes`  | u8   | [rows, blocks, 16]      | 128 bits       | 32 4-bit codes, kept weights in column order; code k in byte k/2, low nibble first |
//! | `scales` | f16  | [rows, groups]          | 16 * 64/group  | one scale per `group` input columns       |
//!
//! With `group` = 128 that is 3.125 bits per parameter all-in. A kept weight decodes to
//! `scale * (2 * code - 15)` (see [`Grid`]). Columns past `cols` in the last block are padding: their
//! mask bits are always clear, so no decoder ever reads them.

use half::f16;
use rayon::prelude::*;

use super::error::{FormatError, Result};
use super::plane::Plane;
use super::quant::Grid;
use super::Dense;
use crate::rng::Rng;

/// Input columns per block.
pub const BLOCK: usize = 64;
/// Weights kept per full block.
pub const KEEP: usize = 32;
/// Bytes of codes per block (32 codes of 4 bits).
pub const BLOCK_CODE_BYTES: usize = KEEP / 2;
/// The default scale group, in input columns: 3.125 bits per parameter.
pub const DEFAULT_GROUP: usize = 128;
/// The grid of the sparse codec's kept weights.
pub const GRID: Grid = Grid::Q4;

#[derive(Debug)]
pub struct SparseMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Input columns per scale: a multiple of [`BLOCK`].
    pub group: usize,
    pub masks: Plane<u64>,
    pub codes: Plane<u8>,
    pub scales: Plane<f16>,
}

/// Blocks per row for `cols` input columns.
pub fn blocks_per_row(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// Scale groups per row for `cols` input columns.
pub fn groups_per_row(cols: usize, group: usize) -> usize {
    blocks_per_row(cols).div_ceil(group / BLOCK)
}

/// Checks that `group` is a positive multiple of the block width.
pub fn check_group(group: usize) -> Result<()> {
    if group == 0 || !group.is_multiple_of(BLOCK) {
        return Err(FormatError::Parameter(format!(
            "sparse scale group {group} must be a positive multiple of {BLOCK} columns (try 128)"
        )));
    }
    Ok(())
}

impl SparseMatrix {
    /// Prunes and quantises dense weights.
    ///
    /// `norms`, when given, holds one activation norm per input column (||x_col|| over calibration
    /// data) and turns the saliency from |w| into |w| * ||x_col||, as Wanda does. In each block the 32
    /// most salient weights are kept, ties going to the lower column.
    pub fn encode(w: &Dense, group: usize, norms: Option<&[f32]>) -> Result<Self> {
        check_group(group)?;
        if let Some(norms) = norms {
            if norms.len() != w.cols {
                return Err(FormatError::Shape(format!(
                    "{} activation norms given for a matrix with {} input columns",
                    norms.len(),
                    w.cols
                )));
            }
            if let Some((col, &value)) = norms
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite() || **v < 0.0)
            {
                return Err(FormatError::BadNorm { col, value });
            }
        }
        let (nb, ng) = (blocks_per_row(w.cols), groups_per_row(w.cols, group));
        let mut masks = vec![0u64; w.rows * nb];
        let mut codes = vec![0u8; w.rows * nb * BLOCK_CODE_BYTES];
        let mut scales = vec![f16::ZERO; w.rows * ng];
        if w.cols > 0 {
            masks
                .par_chunks_mut(nb)
                .zip(codes.par_chunks_mut(nb * BLOCK_CODE_BYTES))
                .zip(scales.par_chunks_mut(ng))
                .enumerate()
                .try_for_each_init(Vec::new, |row, (r, ((m, c), s))| {
                    w.row_f32(r, row)?;
                    encode_row(row, norms, group, m, c, s);
                    Ok::<(), FormatError>(())
                })?;
        }
        Ok(Self {
            rows: w.rows,
            cols: w.cols,
            group,
            masks: masks.into(),
            codes: codes.into(),
            scales: scales.into(),
        })
    }

    /// A random matrix in the form the encoder writes: every block keeps `min(32, real columns)`
    /// weights at random columns, random codes, scales near 0.02 / 15 (weights of a typical LLM
    /// layer). For benchmarks and synthetic models, where encoding dense weights would be slow.
    pub fn random(rows: usize, cols: usize, group: usize, rng: &mut Rng) -> Result<Self> {
        check_group(group)?;
        let (nb, ng) = (blocks_per_row(cols), groups_per_row(cols, group));
        let mut masks = vec![0u64; rows * nb];
        let mut codes = vec![0u8; rows * nb * BLOCK_CODE_BYTES];
        let mut scales = vec![f16::ZERO; rows * ng];
        // One seed per row from `rng`, so the result does not depend on the thread count.
        let seeds: Vec<u64> = (0..rows).map(|_| rng.next_u64()).collect();
        if cols > 0 {
            masks
                .par_chunks_mut(nb)
                .zip(codes.par_chunks_mut(nb * BLOCK_CODE_BYTES))
                .zip(scales.par_chunks_mut(ng))
                .zip(seeds.par_iter())
                .for_each(|(((m, c), s), &seed)| {
                    let mut rng = Rng::new(seed);
                    for (b, mask) in m.iter_mut().enumerate() {
                        let n = (cols - b * BLOCK).min(BLOCK);
                        let keep = n.min(KEEP);
                        // Floyd's sampling of `keep` distinct columns out of `n`.
                        for j in n - keep..n {
                            let t = rng.below(j + 1);
                            *mask |= if *mask >> t & 1 == 1 { 1 << j } else { 1 << t };
                        }
                        let bits = [rng.next_u64(), rng.next_u64()];
                        for k in 0..keep {
                            c[b * BLOCK_CODE_BYTES + k / 2] |=
                                ((bits[k / 16] >> (4 * (k % 16))) as u8 & 0xF) << (4 * (k % 2));
                        }
                    }
                    for v in s.iter_mut() {
                        *v = f16::from_f32(rng.range(0.5, 1.5) * 0.02 / 15.0);
                    }
                });
        }
        Ok(Self {
            rows,
            cols,
            group,
            masks: masks.into(),
            codes: codes.into(),
            scales: scales.into(),
        })
    }

    pub fn blocks_per_row(&self) -> usize {
        blocks_per_row(self.cols)
    }

    pub fn groups_per_row(&self) -> usize {
        groups_per_row(self.cols, self.group)
    }

    /// Bytes of all planes together.
    pub fn stored_bytes(&self) -> usize {
        self.masks.as_bytes().len() + self.codes.len() + self.scales.as_bytes().len()
    }

    /// Checks that the planes have the sizes the shape implies and that every mask keeps at most 32
    /// weights and none in the padding. Errors name the failing plane.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        check_group(self.group).map_err(|e| ("group", e.to_string()))?;
        let (nb, ng) = (self.blocks_per_row(), self.groups_per_row());
        let expect = [
            ("masks", self.masks.len(), self.rows * nb),
            ("codes", self.codes.len(), self.rows * nb * BLOCK_CODE_BYTES),
            ("scales", self.scales.len(), self.rows * ng),
        ];
        for (name, got, want) in expect {
            if got != want {
                return Err((
                    name,
                    format!(
                        "has {got} elements, but shape [{}, {}] with group {} needs {want}",
                        self.rows, self.cols, self.group
                    ),
                ));
            }
        }
        let tail = self.cols % BLOCK;
        let pad_mask = if tail == 0 { 0 } else { !0u64 << tail };
        for (i, &m) in self.masks.iter().enumerate() {
            if m.count_ones() as usize > KEEP {
                return Err((
                    "masks",
                    format!(
                        "block {i} keeps {} weights, at most {KEEP} allowed",
                        m.count_ones()
                    ),
                ));
            }
            if i % nb == nb - 1 && m & pad_mask != 0 {
                return Err((
                    "masks",
                    format!(
                        "block {i} keeps a weight in the padding past column {}",
                        self.cols
                    ),
                ));
            }
        }
        if let Some(i) = self.scales.iter().position(|s| !s.is_finite()) {
            return Err(("scales", format!("scale {i} is {}", self.scales[i])));
        }
        Ok(())
    }

    /// Decodes row `r` into `out[..cols]` (pruned weights are zero). The plain scalar decoder: the
    /// definition every other decoder is tested against.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let (nb, ng) = (self.blocks_per_row(), self.groups_per_row());
        let out = &mut out[..self.cols];
        out.fill(0.0);
        let blocks_per_group = self.group / BLOCK;
        for b in 0..nb {
            let scale = self.scales[r * ng + b / blocks_per_group].to_f32();
            let codes = &self.codes[(r * nb + b) * BLOCK_CODE_BYTES..][..BLOCK_CODE_BYTES];
            let mut mask = self.masks[r * nb + b];
            let mut k = 0;
            while mask != 0 {
                let col = b * BLOCK + mask.trailing_zeros() as usize;
                out[col] = scale * GRID.level(nibble(codes, k));
                k += 1;
                mask &= mask - 1;
            }
        }
    }
}

/// The `k`-th 4-bit code of a packed code array (low nibble first).
#[inline]
pub fn nibble(codes: &[u8], k: usize) -> u8 {
    (codes[k / 2] >> ((k & 1) * 4)) & 0xF
}

fn encode_row(
    row: &[f32],
    norms: Option<&[f32]>,
    group: usize,
    masks: &mut [u64],
    codes: &mut [u8],
    scales: &mut [f16],
) {
    let cols = row.len();
    for (b, mask) in masks.iter_mut().enumerate() {
        let start = b * BLOCK;
        let n = (cols - start).min(BLOCK);
        *mask = if n <= KEEP {
            (!0u64) >> (64 - n)
        } else {
            let saliency = |i: usize| {
                let w = row[start + i].abs();
                norms.map_or(w, |norms| w * norms[start + i])
            };
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_unstable_by(|&a, &b| saliency(b).total_cmp(&saliency(a)).then(a.cmp(&b)));
            order[..KEEP].iter().fold(0u64, |m, &i| m | 1 << i)
        };
    }
    let blocks_per_group = group / BLOCK;
    let mut kept = Vec::with_capacity(KEEP * blocks_per_group);
    for (g, scale) in scales.iter_mut().enumerate() {
        let blocks = g * blocks_per_group..((g + 1) * blocks_per_group).min(masks.len());
        kept.clear();
        for b in blocks.clone() {
            let mut m = masks[b];
            while m != 0 {
                kept.push(row[b * BLOCK + m.trailing_zeros() as usize]);
                m &= m - 1;
            }
        }
        *scale = GRID.best_scale(&kept);
        let s = scale.to_f32();
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        let mut it = kept.iter();
        for b in blocks {
            let block_codes = &mut codes[b * BLOCK_CODE_BYTES..][..BLOCK_CODE_BYTES];
            for k in 0..masks[b].count_ones() as usize {
                let code = GRID.nearest(it.next().copied().unwrap_or(0.0) * inv);
                block_codes[k / 2] |= code << ((k & 1) * 4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_matrices_are_in_encoder_form() {
        let mut rng = Rng::new(crate::rng::test_seed("random_matrices_are_in_encoder_form"));
        for (rows, cols, group) in [(3, 20, 64), (5, 100, 128), (2, 5120, 128), (4, 130, 192)] {
            let m = SparseMatrix::random(rows, cols, group, &mut rng).unwrap();
            m.validate().unwrap();
            let nb = m.blocks_per_row();
            for r in 0..rows {
                for b in 0..nb {
                    let real = (cols - b * BLOCK).min(BLOCK);
                    let mask = m.masks[r * nb + b];
                    assert_eq!(
                        mask.count_ones() as usize,
                        real.min(KEEP),
                        "row {r} block {b}"
                    );
                    let codes = &m.codes[(r * nb + b) * BLOCK_CODE_BYTES..][..BLOCK_CODE_BYTES];
                    // Nibbles past the kept count stay zero, as the encoder leaves them.
                    for k in real.min(KEEP)..KEEP {
                        assert_eq!(nibble(codes, k), 0);
                    }
                }
            }
            assert!(m.scales.iter().all(|s| s.to_f32() > 0.0));
        }
        // Same seed, same matrix, whatever the thread count.
        let a = SparseMatrix::random(7, 300, 128, &mut Rng::new(9)).unwrap();
        let b = SparseMatrix::random(7, 300, 128, &mut Rng::new(9)).unwrap();
        assert_eq!(&a.masks[..], &b.masks[..]);
        assert_eq!(&a.codes[..], &b.codes[..]);
    }
}
