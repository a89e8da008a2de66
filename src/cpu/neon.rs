//! NEON (Advanced SIMD) kernels for aarch64, chosen at run time.
//!
//! The same decode as the AVX2 path (see [`super::lut`]), with one difference: `tbl` looks bytes up in
//! a 32-byte table held in two registers, so a block's expanded codes never go through memory and
//! the running rank is added to the shuffle index (saturating, so pruned lanes stay out of range).
//! An 8-column chunk is two 4-lane registers; accumulation order and reduction match the other paths.
//!
//! Every function here is `unsafe` only because it needs NEON: callers check [`available`] first.

use std::arch::aarch64::*;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::lut::{MAGIC, SHUFFLE};
use super::scalar::{self, ACCS, CHUNK};
use crate::format::sparse::{BLOCK, BLOCK_CODE_BYTES};
use crate::format::{Q4Matrix, Tensor};

pub fn available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

/// Eight f32 lanes: columns 0-3 and 4-7 of a chunk.
#[derive(Clone, Copy)]
struct F8(float32x4_t, float32x4_t);

#[inline]
#[target_feature(enable = "neon")]
fn zero8() -> F8 {
    F8(vdupq_n_f32(0.0), vdupq_n_f32(0.0))
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn load8(p: *const f32) -> F8 {
    F8(vld1q_f32(p), vld1q_f32(p.add(4)))
}

/// Loads 8 f32 at `p`, or the first `n < 8` of them with zeros after.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn load_partial(p: *const f32, n: usize) -> F8 {
    let mut tmp = [0.0f32; CHUNK];
    std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), n.min(CHUNK));
    load8(tmp.as_ptr())
}

/// `acc[k % 4] += w * x`, one rounding per lane.
#[inline]
#[target_feature(enable = "neon")]
fn fma_at(acc: &mut [F8; ACCS], k: usize, w: F8, x: F8) {
    let a = &mut acc[k % ACCS];
    *a = F8(vfmaq_f32(a.0, w.0, x.0), vfmaq_f32(a.1, w.1, x.1));
}

/// The shared reduction order (see [`scalar::reduce`]).
#[inline]
#[target_feature(enable = "neon")]
fn reduce(acc: &[F8; ACCS]) -> f32 {
    let lo = vaddq_f32(vaddq_f32(acc[0].0, acc[1].0), vaddq_f32(acc[2].0, acc[3].0));
    let hi = vaddq_f32(vaddq_f32(acc[0].1, acc[1].1), vaddq_f32(acc[2].1, acc[3].1));
    let t = vaddq_f32(lo, hi);
    let u = vadd_f32(vget_low_f32(t), vget_high_f32(t));
    vpadds_f32(u)
}

/// One block's 16 bytes of packed codes as 32 bytes `2c ^ 0x11`, in order, in two registers.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn expand_block(codes: *const u8) -> uint8x16x2_t {
    let c = vld1q_u8(codes);
    let low = vdupq_n_u8(0x1E);
    let flip = vdupq_n_u8(0x11);
    let lo = veorq_u8(vandq_u8(vshlq_n_u8::<1>(c), low), flip);
    let hi = veorq_u8(vandq_u8(vshrq_n_u8::<3>(c), low), flip);
    uint8x16x2_t(vzip1q_u8(lo, hi), vzip2q_u8(lo, hi))
}

/// 8 decoded weights: the expanded codes from `rank` on, placed by mask byte `mb`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn chunk(t: uint8x16x2_t, mb: usize, rank: u8, s128: float32x4_t, ns144: float32x4_t) -> F8 {
    let idx = SHUFFLE.0[mb].as_ptr();
    let r = vdupq_n_u8(rank);
    let magic = vdupq_n_u32(MAGIC);
    let lane = |i: uint8x16_t| {
        let bits = veorq_u32(vreinterpretq_u32_u8(vqtbl2q_u8(t, vqaddq_u8(i, r))), magic);
        vfmaq_f32(ns144, vreinterpretq_f32_u32(bits), s128)
    };
    F8(lane(vld1q_u8(idx)), lane(vld1q_u8(idx.add(16))))
}

/// f32 scales of one row.
fn scales_f32(h: &[f16], out: &mut Vec<f32>) {
    out.clear();
    out.extend(h.iter().map(|s| s.to_f32()));
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a sparse row, in column order.
#[inline]
#[target_feature(enable = "neon")]
fn for_sparse_chunks(
    masks: &[u64],
    codes: &[u8],
    scales: &[f32],
    blocks_per_group: usize,
    mut sink: impl FnMut(usize, F8),
) {
    assert!(codes.len() >= masks.len() * BLOCK_CODE_BYTES);
    for (g, &s) in scales.iter().enumerate() {
        let s128 = vdupq_n_f32(128.0 * s);
        let ns144 = vdupq_n_f32(-144.0 * s);
        let blocks = g * blocks_per_group..((g + 1) * blocks_per_group).min(masks.len());
        for b in blocks {
            let m = masks[b];
            // SAFETY: block `b` has 16 bytes of codes, asserted above.
            let t = unsafe { expand_block(codes.as_ptr().add(BLOCK_CODE_BYTES * b)) };
            let mut rank = 0u8;
            for j in 0..8 {
                let mb = ((m >> (8 * j)) & 0xFF) as usize;
                sink(8 * b + j, unsafe { chunk(t, mb, rank, s128, ns144) });
                rank += mb.count_ones() as u8;
            }
        }
    }
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a q4 row (all padded columns).
#[inline]
#[target_feature(enable = "neon")]
fn for_q4_chunks(codes: &[u8], scales: &[f32], group: usize, mut sink: impl FnMut(usize, F8)) {
    // 16 code bytes hold 32 columns: one expanded table feeds 4 chunks.
    let per_group = group / 32;
    assert!(codes.len() >= scales.len() * group / 2);
    for (g, &s) in scales.iter().enumerate() {
        let s128 = vdupq_n_f32(128.0 * s);
        let ns144 = vdupq_n_f32(-144.0 * s);
        for q in 0..per_group {
            let k = g * per_group + q;
            // SAFETY: 16 bytes at `16 k` are inside the row, asserted above.
            let t = unsafe { expand_block(codes.as_ptr().add(16 * k)) };
            for j in 0..4 {
                sink(4 * k + j, unsafe {
                    chunk(t, 0xFF, 8 * j as u8, s128, ns144)
                });
            }
        }
    }
}

/// `w . x` over `len` columns in the shared order; `x` readable to the next multiple of 8.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot(w: *const f32, x: *const f32, len: usize) -> f32 {
    let mut acc = [zero8(); ACCS];
    let full = len / CHUNK;
    for c in 0..full {
        fma_at(
            &mut acc,
            c,
            load8(w.add(CHUNK * c)),
            load8(x.add(CHUNK * c)),
        );
    }
    if !len.is_multiple_of(CHUNK) {
        let o = CHUNK * full;
        fma_at(
            &mut acc,
            full,
            load_partial(w.add(o), len % CHUNK),
            load8(x.add(o)),
        );
    }
    reduce(&acc)
}

/// Two rows against one `x`, sharing its loads; same order per row as [`dot`].
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dot2(w0: *const f32, w1: *const f32, x: *const f32, len: usize) -> (f32, f32) {
    let mut a = [zero8(); ACCS];
    let mut b = [zero8(); ACCS];
    let full = len / CHUNK;
    for c in 0..full {
        let o = CHUNK * c;
        let xv = load8(x.add(o));
        fma_at(&mut a, c, load8(w0.add(o)), xv);
        fma_at(&mut b, c, load8(w1.add(o)), xv);
    }
    if !len.is_multiple_of(CHUNK) {
        let o = CHUNK * full;
        let xv = load8(x.add(o));
        fma_at(&mut a, full, load_partial(w0.add(o), len % CHUNK), xv);
        fma_at(&mut b, full, load_partial(w1.add(o), len % CHUNK), xv);
    }
    (reduce(&a), reduce(&b))
}

/// `y[i] = W[r0 + i] . x`, `x` padded to a multiple of 64 columns.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "neon")]
pub unsafe fn spmv_rows(w: &Tensor, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = w.shape()[1];
    let xp = x.as_ptr();
    let mut scales = Vec::new();
    match w {
        Tensor::Sparse(m) => {
            let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
            assert!(x.len() >= nb * BLOCK);
            for (i, yi) in y.iter_mut().enumerate() {
                let r = r0 + i;
                scales_f32(&m.scales[r * ng..][..ng], &mut scales);
                let codes = &m.codes[r * nb * BLOCK_CODE_BYTES..][..nb * BLOCK_CODE_BYTES];
                let mut acc = [zero8(); ACCS];
                let masks = &m.masks[r * nb..][..nb];
                for_sparse_chunks(masks, codes, &scales, m.group / BLOCK, |c, wv| {
                    fma_at(&mut acc, c, wv, load8(xp.add(CHUNK * c)));
                });
                *yi = reduce(&acc);
            }
        }
        Tensor::Q4(m) => {
            let padded = Q4Matrix::padded_cols(cols, m.group);
            let ng = padded / m.group;
            assert!(x.len() >= padded);
            for (i, yi) in y.iter_mut().enumerate() {
                let r = r0 + i;
                scales_f32(&m.scales[r * ng..][..ng], &mut scales);
                let codes = &m.codes[r * padded / 2..][..padded / 2];
                let mut acc = [zero8(); ACCS];
                for_q4_chunks(codes, &scales, m.group, |c, wv| {
                    fma_at(&mut acc, c, wv, load8(xp.add(CHUNK * c)));
                });
                *yi = reduce(&acc);
            }
        }
        Tensor::F16(m) => {
            assert!(x.len() >= cols.next_multiple_of(CHUNK));
            let mut row = vec![0.0f32; cols];
            for (i, yi) in y.iter_mut().enumerate() {
                m.values[(r0 + i) * cols..][..cols].convert_to_f32_slice(&mut row);
                *yi = dot(row.as_ptr(), xp, cols);
            }
        }
        Tensor::Q3(_) => {
            // No SIMD decoder for q3 yet: the reference decode, then the shared dot product.
            assert!(x.len() >= cols.next_multiple_of(CHUNK));
            let mut row = vec![0.0f32; cols.next_multiple_of(CHUNK)];
            for (i, yi) in y.iter_mut().enumerate() {
                scalar::decode_row(w, r0 + i, &mut row);
                *yi = dot(row.as_ptr(), xp, cols);
            }
        }
        Tensor::F32(m) => gemv_rows(&m.values[r0 * cols..], cols, x, y),
    }
}

/// Stores decoded chunk `c` of a row into `out` (the row), clipping the last one.
#[inline]
#[target_feature(enable = "neon")]
fn store_chunk(out: &mut [f32], c: usize, w: F8) {
    let mut tmp = [0.0f32; CHUNK];
    let o = CHUNK * c;
    if o + CHUNK <= out.len() {
        // SAFETY: 8 values fit at `o`.
        unsafe {
            vst1q_f32(out.as_mut_ptr().add(o), w.0);
            vst1q_f32(out.as_mut_ptr().add(o + 4), w.1);
        }
    } else if o < out.len() {
        // SAFETY: `tmp` holds 8 values.
        unsafe {
            vst1q_f32(tmp.as_mut_ptr(), w.0);
            vst1q_f32(tmp.as_mut_ptr().add(4), w.1);
        }
        let n = out.len() - o;
        out[o..].copy_from_slice(&tmp[..n]);
    }
}

/// Decodes row `r` into `row` (`row.len()` >= cols, zero past cols) if no scale of the row is zero;
/// returns false otherwise (a zero scale gives +0 here but -0 for negative levels in the reference).
#[target_feature(enable = "neon")]
fn decode_row_fast(w: &Tensor, r: usize, row: &mut [f32], scales: &mut Vec<f32>) -> bool {
    let cols = w.shape()[1];
    let (real, pad) = row.split_at_mut(cols);
    match w {
        Tensor::Sparse(m) => {
            let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
            scales_f32(&m.scales[r * ng..][..ng], scales);
            if scales.contains(&0.0) {
                return false;
            }
            let codes = &m.codes[r * nb * BLOCK_CODE_BYTES..][..nb * BLOCK_CODE_BYTES];
            let masks = &m.masks[r * nb..][..nb];
            for_sparse_chunks(masks, codes, scales, m.group / BLOCK, |c, wv| {
                store_chunk(real, c, wv)
            });
        }
        Tensor::Q4(m) => {
            let padded = Q4Matrix::padded_cols(cols, m.group);
            let ng = padded / m.group;
            scales_f32(&m.scales[r * ng..][..ng], scales);
            if scales.contains(&0.0) {
                return false;
            }
            let codes = &m.codes[r * padded / 2..][..padded / 2];
            for_q4_chunks(codes, scales, m.group, |c, wv| store_chunk(real, c, wv));
        }
        _ => return false,
    }
    pad.fill(0.0);
    true
}

/// Rows `r0..` of `w` into `out`, `stride` values per row (zero past `cols`). Bit-identical to the
/// reference decoder.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "neon")]
pub unsafe fn decode_rows(w: &Tensor, r0: usize, out: &mut [f32], stride: usize, _stream: bool) {
    let mut scales = Vec::new();
    for (i, row) in out.chunks_exact_mut(stride).enumerate() {
        if !decode_row_fast(w, r0 + i, row, &mut scales) {
            scalar::decode_row(w, r0 + i, row);
        }
    }
}

/// Rows `r0..` of `w` into `out` as f16 (round to nearest even), `cols` values per row.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "neon")]
pub unsafe fn decode_rows_f16(w: &Tensor, r0: usize, out: &mut [f16], _stream: bool) {
    let cols = w.shape()[1];
    let mut scales = Vec::new();
    let mut row = vec![0.0f32; cols];
    for (i, o) in out.chunks_exact_mut(cols).enumerate() {
        let r = r0 + i;
        if let Tensor::F16(m) = w {
            o.copy_from_slice(&m.values[r * cols..][..cols]);
            continue;
        }
        if !decode_row_fast(w, r, &mut row, &mut scales) {
            scalar::decode_row(w, r, &mut row);
        }
        o.convert_from_f32_slice(&row);
    }
}

/// `y[i] = rows[i * stride..][..stride] . x`.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "neon")]
pub unsafe fn dot_rows(rows: &[f32], stride: usize, x: &[f32], y: &mut [f32]) {
    gemv_rows(rows, stride, x, y)
}

/// Dense row-major `y = W x` for the rows in `y`, `x` readable to the next multiple of 8 columns.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "neon")]
pub unsafe fn gemv_rows(w: &[f32], cols: usize, x: &[f32], y: &mut [f32]) {
    assert!(w.len() >= y.len() * cols && x.len() >= cols.next_multiple_of(CHUNK));
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut pairs = y.chunks_exact_mut(2);
    let mut r = 0;
    for pair in &mut pairs {
        let (a, b) = dot2(wp.add(r * cols), wp.add((r + 1) * cols), xp, cols);
        pair[0] = a;
        pair[1] = b;
        r += 2;
    }
    if let [last] = pairs.into_remainder() {
        *last = dot(wp.add(r * cols), xp, cols);
    }
}
