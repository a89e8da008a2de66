//! The portable path: plain Rust, no intrinsics. It decodes a row into a dense buffer and takes a dot
//! product in the accumulation order that every CPU path shares ([`dot`]), so that the SIMD paths
//! differ from it only by fused versus separate multiply-add rounding.
//!
//! Unlike the reference decoder it never panics on a corrupt mask (more than 32 kept weights): code
//! indices wrap inside the block, giving wrong weights but no out-of-bounds access.

use half::f16;

use crate::format::dense::{Q3_GRID, Q3_RUN_BYTES};
use crate::format::sparse::{BLOCK, BLOCK_CODE_BYTES};
use crate::format::{Q3Matrix, Q4Matrix, SparseMatrix, Tensor};

/// Columns per accumulator lane group (one AVX2 register).
pub const CHUNK: usize = 8;
/// Independent accumulators: chunk `c` of 8 columns is added into accumulator `c % 4`.
pub const ACCS: usize = 4;

/// The shared reduction: the 4 accumulators pairwise, then lanes `i + 4`, `i + 2`, `i + 1` folded onto
/// lane `i` (what AVX2's extract/movehl/shuffle sequence and NEON's pairwise adds do).
pub fn reduce(acc: &[[f32; CHUNK]; ACCS]) -> f32 {
    let v: [f32; CHUNK] =
        std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    let t: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (t[0] + t[2]) + (t[1] + t[3])
}

/// `w . x` over `w.len()` columns (`x` may be longer) in the shared order. A partial last chunk
/// leaves the missing lanes untouched, which equals the SIMD paths adding `0 * 0`.
pub fn dot(w: &[f32], x: &[f32]) -> f32 {
    let x = &x[..w.len()];
    let mut acc = [[0.0f32; CHUNK]; ACCS];
    let mut wc = w.chunks_exact(CHUNK * ACCS);
    let mut xc = x.chunks_exact(CHUNK * ACCS);
    for (a, b) in (&mut wc).zip(&mut xc) {
        for (k, acc) in acc.iter_mut().enumerate() {
            for (l, v) in acc.iter_mut().enumerate() {
                *v += a[CHUNK * k + l] * b[CHUNK * k + l];
            }
        }
    }
    for (k, (a, b)) in wc
        .remainder()
        .chunks(CHUNK)
        .zip(xc.remainder().chunks(CHUNK))
        .enumerate()
    {
        for (l, (p, q)) in a.iter().zip(b).enumerate() {
            acc[k][l] += p * q;
        }
    }
    reduce(&acc)
}

/// Row `r` of a sparse matrix into `out`: columns past `cols` (when `out` is padded) are zero.
/// Same arithmetic as the reference decoder (`scale * level`), so bit-identical to it.
pub fn decode_sparse_row(m: &SparseMatrix, r: usize, out: &mut [f32]) {
    let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
    let bpg = m.group / BLOCK;
    let width = out.len().min(nb * BLOCK);
    out.fill(0.0);
    let out = &mut out[..width];
    for b in 0..nb {
        let scale = m.scales[r * ng + b / bpg].to_f32();
        let codes = &m.codes[(r * nb + b) * BLOCK_CODE_BYTES..][..BLOCK_CODE_BYTES];
        let mut mask = m.masks[r * nb + b];
        let mut k = 0usize;
        while mask != 0 {
            let col = b * BLOCK + mask.trailing_zeros() as usize;
            let code = (codes[(k / 2) % BLOCK_CODE_BYTES] >> ((k & 1) * 4)) & 0xF;
            if let Some(o) = out.get_mut(col) {
                *o = scale * (2 * code as i32 - 15) as f32;
            }
            k += 1;
            mask &= mask - 1;
        }
    }
}

/// Row `r` of a q4 matrix into `out`, zero past `cols`.
pub fn decode_q4_row(m: &Q4Matrix, r: usize, out: &mut [f32]) {
    let padded = Q4Matrix::padded_cols(m.cols, m.group);
    let codes = &m.codes[r * padded / 2..][..padded / 2];
    let scales = &m.scales[r * padded / m.group..][..padded / m.group];
    let (real, pad) = out.split_at_mut(m.cols);
    pad.fill(0.0);
    for (g, chunk) in real.chunks_mut(m.group).enumerate() {
        let scale = scales[g].to_f32();
        for (i, o) in chunk.iter_mut().enumerate() {
            let c = g * m.group + i;
            let code = (codes[c / 2] >> ((c & 1) * 4)) & 0xF;
            *o = scale * (2 * code as i32 - 15) as f32;
        }
    }
}

/// Row `r` of a q3 matrix into `out`, zero past `cols`: a run's three bit planes read as words, bit
/// `i` of plane `b` being bit `b` of column `i`'s code.
pub fn decode_q3_row(m: &Q3Matrix, r: usize, out: &mut [f32]) {
    let rb = Q3Matrix::row_bytes(m.cols, m.group);
    let ng = Q3Matrix::padded_cols(m.cols, m.group) / m.group;
    let codes = &m.codes[r * rb..][..rb];
    let scales = &m.scales[r * ng..][..ng];
    let (real, pad) = out.split_at_mut(m.cols);
    pad.fill(0.0);
    for ((k, cols), run) in real
        .chunks_mut(32)
        .enumerate()
        .zip(codes.chunks_exact(Q3_RUN_BYTES))
    {
        let plane = |b: usize| {
            u32::from_le_bytes([run[4 * b], run[4 * b + 1], run[4 * b + 2], run[4 * b + 3]])
        };
        let (p0, p1, p2) = (plane(0), plane(1), plane(2));
        // A group holds whole runs (32, 64 or 128 columns).
        let scale = scales[32 * k / m.group].to_f32();
        for (i, o) in cols.iter_mut().enumerate() {
            let code = (p0 >> i & 1) | (p1 >> i & 1) << 1 | (p2 >> i & 1) << 2;
            *o = scale * Q3_GRID.level(code as u8);
        }
    }
}

/// Row `r` of any tensor into `out` (`out.len() >= cols`), zero past `cols`.
pub fn decode_row(w: &Tensor, r: usize, out: &mut [f32]) {
    let cols = w.shape()[1];
    match w {
        Tensor::Sparse(m) => decode_sparse_row(m, r, out),
        Tensor::Q4(m) => decode_q4_row(m, r, out),
        Tensor::Q3(m) => decode_q3_row(m, r, out),
        Tensor::F32(m) => {
            out[..cols].copy_from_slice(&m.values[r * cols..][..cols]);
            out[cols..].fill(0.0);
        }
        Tensor::F16(m) => {
            for (o, v) in out.iter_mut().zip(&m.values[r * cols..][..cols]) {
                *o = v.to_f32();
            }
            out[cols..].fill(0.0);
        }
    }
}

/// `y[i] = W[r0 + i] . x`, with `x` padded to a multiple of 64 columns.
pub fn spmv_rows(w: &Tensor, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = w.shape()[1];
    if let Tensor::F32(m) = w {
        for (i, yi) in y.iter_mut().enumerate() {
            *yi = dot(&m.values[(r0 + i) * cols..][..cols], x);
        }
        return;
    }
    let mut row = vec![0.0f32; x.len()];
    for (i, yi) in y.iter_mut().enumerate() {
        decode_row(w, r0 + i, &mut row);
        *yi = dot(&row, x);
    }
}

/// Rows `r0..` of `w` into `out`, `stride` values per row (`stride >= cols`, zero past `cols`).
pub fn decode_rows(w: &Tensor, r0: usize, out: &mut [f32], stride: usize, _stream: bool) {
    for (i, row) in out.chunks_exact_mut(stride).enumerate() {
        decode_row(w, r0 + i, row);
    }
}

/// Rows `r0..` of `w` into `out` as f16 (round to nearest even), `cols` values per row.
pub fn decode_rows_f16(w: &Tensor, r0: usize, out: &mut [f16], _stream: bool) {
    let cols = w.shape()[1];
    let mut row = vec![0.0f32; cols];
    for (i, o) in out.chunks_exact_mut(cols).enumerate() {
        decode_row(w, r0 + i, &mut row);
        for (h, &v) in o.iter_mut().zip(&row) {
            *h = f16::from_f32(v);
        }
    }
}

/// `y[i] = rows[i * stride..][..stride] . x`.
pub fn dot_rows(rows: &[f32], stride: usize, x: &[f32], y: &mut [f32]) {
    for (yi, row) in y.iter_mut().zip(rows.chunks_exact(stride)) {
        *yi = dot(row, x);
    }
}

/// Dense row-major `y = W x` for the rows in `y`, `x` padded to a multiple of 64.
pub fn gemv_rows(w: &[f32], cols: usize, x: &[f32], y: &mut [f32]) {
    for (yi, row) in y.iter_mut().zip(w.chunks_exact(cols)) {
        *yi = dot(row, x);
    }
}
