//! AVX2 + FMA + F16C kernels for x86-64, chosen at run time.
//!
//! Sparse rows are decoded in two passes. The first rewrites the row's packed codes as one byte per
//! code ([`expand_codes`]); the second walks the row 8 columns at a time and expands the kept bytes
//! into their columns with one `vpshufb` (see [`super::lut`]). Expanding the codes a whole row ahead
//! keeps the second pass's loads away from the stores that produced them: a load that straddles
//! two recent stores cannot be forwarded and would stall until they retire.
//!
//! Every function here is `unsafe` only because it needs the CPU features: callers check
//! [`available`] first. Slice lengths are checked by the caller (`cpu::check_tensor`) and by the
//! padded buffers allocated here, so a corrupt mask gives wrong values, never an out-of-bounds read.

use std::arch::x86_64::*;

use half::f16;

use super::lut::{MAGIC, SHUFFLE};
use super::scalar::{self, ACCS, CHUNK};
use crate::format::sparse::{BLOCK, BLOCK_CODE_BYTES};
use crate::format::{DenseF16, Q4Matrix, SparseMatrix, Tensor};

pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("popcnt")
}

/// Bytes past the last block a chunk load may touch: a corrupt mask can put the running rank at 64,
/// and the load is 16 bytes wide.
const EXPANDED_SLACK: usize = 2 * BLOCK + 16;

/// `acc[k % 4] += w * x`, with constant register indices after inlining.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn fma_at(acc: &mut [__m256; ACCS], k: usize, w: __m256, x: __m256) {
    match k % ACCS {
        0 => acc[0] = _mm256_fmadd_ps(w, x, acc[0]),
        1 => acc[1] = _mm256_fmadd_ps(w, x, acc[1]),
        2 => acc[2] = _mm256_fmadd_ps(w, x, acc[2]),
        _ => acc[3] = _mm256_fmadd_ps(w, x, acc[3]),
    }
}

/// The shared reduction order (see [`scalar::reduce`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn reduce(acc: &[__m256; ACCS]) -> f32 {
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let u = _mm_add_ps(t, _mm_movehl_ps(t, t));
    _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u)))
}

/// Loads 8 f32 at `p`, or the first `n < 8` of them with zeros after.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn load_partial(p: *const f32, n: usize) -> __m256 {
    const MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];
    let mask = _mm256_loadu_si256(MASKS.as_ptr().add(CHUNK - n) as *const __m256i);
    _mm256_maskload_ps(p, mask)
}

/// Converts f16 scales to f32.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn scales_f32(h: &[f16], out: &mut [f32]) {
    let mut hc = h.chunks_exact(CHUNK);
    let mut oc = out.chunks_exact_mut(CHUNK);
    for (src, dst) in (&mut hc).zip(&mut oc) {
        // SAFETY: both chunks hold exactly 8 elements.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr() as *const __m128i));
            _mm256_storeu_ps(dst.as_mut_ptr(), v);
        }
    }
    for (src, dst) in hc.remainder().iter().zip(oc.into_remainder()) {
        *dst = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(src.to_bits() as i32)));
    }
}

/// Rewrites packed 4-bit codes (low nibble first) as one byte per code, `2c ^ 0x11`
/// ([`super::lut::code_byte`]). `codes.len()` is a multiple of 16; `out` holds twice as many bytes.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn expand_codes(codes: &[u8], out: &mut [u8]) {
    let low = _mm_set1_epi8(0x1E);
    let flip = _mm_set1_epi8(0x11);
    for (src, dst) in codes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
        // SAFETY: `src` holds 16 bytes and `dst` 32.
        unsafe {
            let c = _mm_loadu_si128(src.as_ptr() as *const __m128i);
            // Shifting 16-bit lanes moves a neighbour's bit into each byte; the mask drops it.
            let lo = _mm_xor_si128(_mm_and_si128(_mm_slli_epi16::<1>(c), low), flip);
            let hi = _mm_xor_si128(_mm_and_si128(_mm_srli_epi16::<3>(c), low), flip);
            let p = dst.as_mut_ptr() as *mut __m128i;
            _mm_storeu_si128(p, _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128(p.add(1), _mm_unpackhi_epi8(lo, hi));
        }
    }
}

/// 8 decoded weights: the kept code bytes starting at `t`, placed by mask byte `mb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn chunk(t: *const u8, mb: usize, s128: __m256, s144: __m256) -> __m256 {
    let src = _mm256_broadcastsi128_si256(_mm_loadu_si128(t as *const __m128i));
    let idx = _mm256_load_si256(SHUFFLE.0.as_ptr().add(mb) as *const __m256i);
    let lanes = _mm256_xor_si256(
        _mm256_shuffle_epi8(src, idx),
        _mm256_set1_epi32(MAGIC as i32),
    );
    _mm256_fmsub_ps(_mm256_castsi256_ps(lanes), s128, s144)
}

/// A row's data in the form the chunk loop reads.
struct Row<'a> {
    /// Expanded code bytes, 32 per block (64 per q4 block of 64 columns), plus slack.
    bytes: &'a [u8],
    /// f32 scales.
    scales: &'a [f32],
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a sparse row, in column order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_sparse_chunks(
    masks: &[u64],
    row: &Row,
    blocks_per_group: usize,
    mut sink: impl FnMut(usize, __m256),
) {
    assert!(row.bytes.len() >= masks.len() * 32 + EXPANDED_SLACK);
    for (g, &s) in row.scales.iter().enumerate() {
        let s128 = _mm256_set1_ps(128.0 * s);
        let s144 = _mm256_set1_ps(144.0 * s);
        let blocks = g * blocks_per_group..((g + 1) * blocks_per_group).min(masks.len());
        for b in blocks {
            let m = masks[b];
            // SAFETY: the running rank is at most 64, within the slack asserted above.
            let t = unsafe { row.bytes.as_ptr().add(32 * b) };
            let mut rank = 0usize;
            for j in 0..8 {
                let mb = ((m >> (8 * j)) & 0xFF) as usize;
                sink(8 * b + j, unsafe { chunk(t.add(rank), mb, s128, s144) });
                rank += mb.count_ones() as usize;
            }
        }
    }
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a q4 row (all padded columns).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_q4_chunks(row: &Row, group: usize, mut sink: impl FnMut(usize, __m256)) {
    let per_group = group / CHUNK;
    assert!(row.bytes.len() >= row.scales.len() * group + 16);
    for (g, &s) in row.scales.iter().enumerate() {
        let s128 = _mm256_set1_ps(128.0 * s);
        let s144 = _mm256_set1_ps(144.0 * s);
        for j in 0..per_group {
            let c = g * per_group + j;
            // SAFETY: `c * 8 + 16 <= bytes.len()`, asserted above.
            sink(c, unsafe {
                chunk(row.bytes.as_ptr().add(CHUNK * c), 0xFF, s128, s144)
            });
        }
    }
}

/// Scratch for one rayon task: a row's expanded codes and its scales.
struct Scratch {
    bytes: Vec<u8>,
    scales: Vec<f32>,
}

impl Scratch {
    fn new(w: &Tensor) -> Self {
        let cols = w.shape()[1];
        let (bytes, scales) = match w {
            Tensor::Sparse(m) => (m.blocks_per_row() * 32 + EXPANDED_SLACK, m.groups_per_row()),
            Tensor::Q4(m) => {
                let padded = Q4Matrix::padded_cols(cols, m.group);
                (padded + 16, padded / m.group)
            }
            _ => (0, 0),
        };
        Self {
            bytes: vec![0; bytes],
            scales: vec![0.0; scales],
        }
    }

    /// Expands row `r` of a sparse matrix.
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    fn sparse(&mut self, m: &SparseMatrix, r: usize) -> Row<'_> {
        let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
        let n = nb * BLOCK_CODE_BYTES;
        expand_codes(&m.codes[r * n..][..n], &mut self.bytes);
        scales_f32(&m.scales[r * ng..][..ng], &mut self.scales);
        Row {
            bytes: &self.bytes,
            scales: &self.scales,
        }
    }

    /// Expands row `r` of a q4 matrix.
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    fn q4(&mut self, m: &Q4Matrix, r: usize) -> Row<'_> {
        let padded = Q4Matrix::padded_cols(m.cols, m.group);
        let ng = padded / m.group;
        expand_codes(&m.codes[r * padded / 2..][..padded / 2], &mut self.bytes);
        scales_f32(&m.scales[r * ng..][..ng], &mut self.scales);
        Row {
            bytes: &self.bytes,
            scales: &self.scales,
        }
    }
}

/// `w . x` over `len` columns in the shared order; `x` readable to the next multiple of 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn dot(w: *const f32, x: *const f32, len: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); ACCS];
    let full = len / CHUNK;
    let mut c = 0;
    while c + ACCS <= full {
        for k in 0..ACCS {
            let o = CHUNK * (c + k);
            fma_at(
                &mut acc,
                k,
                _mm256_loadu_ps(w.add(o)),
                _mm256_loadu_ps(x.add(o)),
            );
        }
        c += ACCS;
    }
    while c < full {
        let o = CHUNK * c;
        fma_at(
            &mut acc,
            c,
            _mm256_loadu_ps(w.add(o)),
            _mm256_loadu_ps(x.add(o)),
        );
        c += 1;
    }
    if !len.is_multiple_of(CHUNK) {
        let o = CHUNK * c;
        let wv = load_partial(w.add(o), len % CHUNK);
        fma_at(&mut acc, c, wv, _mm256_loadu_ps(x.add(o)));
    }
    reduce(&acc)
}

/// Two rows against one `x`, sharing its loads; same order per row as [`dot`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn dot2(w0: *const f32, w1: *const f32, x: *const f32, len: usize) -> (f32, f32) {
    let mut a = [_mm256_setzero_ps(); ACCS];
    let mut b = [_mm256_setzero_ps(); ACCS];
    let full = len / CHUNK;
    let mut c = 0;
    while c + ACCS <= full {
        for k in 0..ACCS {
            let o = CHUNK * (c + k);
            let xv = _mm256_loadu_ps(x.add(o));
            fma_at(&mut a, k, _mm256_loadu_ps(w0.add(o)), xv);
            fma_at(&mut b, k, _mm256_loadu_ps(w1.add(o)), xv);
        }
        c += ACCS;
    }
    while c < full {
        let o = CHUNK * c;
        let xv = _mm256_loadu_ps(x.add(o));
        fma_at(&mut a, c, _mm256_loadu_ps(w0.add(o)), xv);
        fma_at(&mut b, c, _mm256_loadu_ps(w1.add(o)), xv);
        c += 1;
    }
    if !len.is_multiple_of(CHUNK) {
        let o = CHUNK * c;
        let xv = _mm256_loadu_ps(x.add(o));
        fma_at(&mut a, c, load_partial(w0.add(o), len % CHUNK), xv);
        fma_at(&mut b, c, load_partial(w1.add(o), len % CHUNK), xv);
    }
    (reduce(&a), reduce(&b))
}

/// f16 row `h` (any length) against `x` (readable to the next multiple of 8).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn dot_f16(h: &[f16], x: *const f32) -> f32 {
    let mut acc = [_mm256_setzero_ps(); ACCS];
    let mut chunks = h.chunks_exact(CHUNK);
    let mut c = 0;
    for ch in &mut chunks {
        let wv = _mm256_cvtph_ps(_mm_loadu_si128(ch.as_ptr() as *const __m128i));
        fma_at(&mut acc, c, wv, _mm256_loadu_ps(x.add(CHUNK * c)));
        c += 1;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut tail = [f16::ZERO; CHUNK];
        tail[..rest.len()].copy_from_slice(rest);
        let wv = _mm256_cvtph_ps(_mm_loadu_si128(tail.as_ptr() as *const __m128i));
        fma_at(&mut acc, c, wv, _mm256_loadu_ps(x.add(CHUNK * c)));
    }
    reduce(&acc)
}

/// `y[i] = W[r0 + i] . x`, `x` padded to a multiple of 64 columns.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
pub unsafe fn spmv_rows(w: &Tensor, r0: usize, x: &[f32], y: &mut [f32]) {
    let cols = w.shape()[1];
    let xp = x.as_ptr();
    match w {
        Tensor::Sparse(m) => {
            assert!(x.len() >= m.blocks_per_row() * BLOCK);
            let nb = m.blocks_per_row();
            let bpg = m.group / BLOCK;
            let mut scratch = Scratch::new(w);
            for (i, yi) in y.iter_mut().enumerate() {
                let r = r0 + i;
                let row = scratch.sparse(m, r);
                let mut acc = [_mm256_setzero_ps(); ACCS];
                for_sparse_chunks(&m.masks[r * nb..][..nb], &row, bpg, |c, wv| {
                    fma_at(&mut acc, c, wv, _mm256_loadu_ps(xp.add(CHUNK * c)));
                });
                *yi = reduce(&acc);
            }
        }
        Tensor::Q4(m) => {
            assert!(x.len() >= Q4Matrix::padded_cols(cols, m.group));
            let mut scratch = Scratch::new(w);
            for (i, yi) in y.iter_mut().enumerate() {
                let row = scratch.q4(m, r0 + i);
                let mut acc = [_mm256_setzero_ps(); ACCS];
                for_q4_chunks(&row, m.group, |c, wv| {
                    fma_at(&mut acc, c, wv, _mm256_loadu_ps(xp.add(CHUNK * c)));
                });
                *yi = reduce(&acc);
            }
        }
        Tensor::F16(DenseF16 { values, .. }) => {
            assert!(x.len() >= cols.next_multiple_of(CHUNK));
            for (i, yi) in y.iter_mut().enumerate() {
                *yi = dot_f16(&values[(r0 + i) * cols..][..cols], xp);
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

/// Stores decoded chunk `c` of a row into `out` (the row, `out.len()` columns), clipping the last one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn store_chunk(out: &mut [f32], c: usize, w: __m256) {
    let o = CHUNK * c;
    if o + CHUNK <= out.len() {
        // SAFETY: 8 values fit at `o`.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(o), w) };
    } else if o < out.len() {
        let mut tmp = [0.0f32; CHUNK];
        // SAFETY: `tmp` holds 8 values.
        unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), w) };
        let n = out.len() - o;
        out[o..].copy_from_slice(&tmp[..n]);
    }
}

/// As [`store_chunk`], rounding to f16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn store_chunk_f16(out: &mut [f16], c: usize, w: __m256) {
    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(w);
    let o = CHUNK * c;
    if o + CHUNK <= out.len() {
        // SAFETY: 8 values fit at `o`.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().add(o) as *mut __m128i, h) };
    } else if o < out.len() {
        let mut tmp = [f16::ZERO; CHUNK];
        // SAFETY: `tmp` holds 8 values.
        unsafe { _mm_storeu_si128(tmp.as_mut_ptr() as *mut __m128i, h) };
        let n = out.len() - o;
        out[o..].copy_from_slice(&tmp[..n]);
    }
}

/// Rows `r0..` of `w` into `out`, `stride` values per row (`cols` or the 64-padded width; zero past
/// `cols`). Bit-identical to the reference decoder.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
pub unsafe fn decode_rows(w: &Tensor, r0: usize, out: &mut [f32], stride: usize) {
    let cols = w.shape()[1];
    let mut scratch = Scratch::new(w);
    for (i, row) in out.chunks_exact_mut(stride).enumerate() {
        let r = r0 + i;
        match w {
            Tensor::Sparse(m) => {
                let nb = m.blocks_per_row();
                let bpg = m.group / BLOCK;
                let expanded = scratch.sparse(m, r);
                // A zero scale decodes to +0 here but to -0 for negative levels in the reference.
                if expanded.scales.contains(&0.0) {
                    scalar::decode_sparse_row(m, r, row);
                    continue;
                }
                let (real, pad) = row.split_at_mut(cols);
                for_sparse_chunks(&m.masks[r * nb..][..nb], &expanded, bpg, |c, wv| {
                    store_chunk(real, c, wv)
                });
                pad.fill(0.0);
            }
            Tensor::Q4(m) => {
                let expanded = scratch.q4(m, r);
                if expanded.scales.contains(&0.0) {
                    scalar::decode_q4_row(m, r, row);
                    continue;
                }
                let (real, pad) = row.split_at_mut(cols);
                for_q4_chunks(&expanded, m.group, |c, wv| store_chunk(real, c, wv));
                pad.fill(0.0);
            }
            _ => scalar::decode_row(w, r, row),
        }
    }
}

/// Rows `r0..` of `w` into `out` as f16 (round to nearest even), `cols` values per row.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
pub unsafe fn decode_rows_f16(w: &Tensor, r0: usize, out: &mut [f16]) {
    let cols = w.shape()[1];
    let mut scratch = Scratch::new(w);
    let mut f32_row = vec![0.0f32; cols];
    for (i, row) in out.chunks_exact_mut(cols).enumerate() {
        let r = r0 + i;
        // Zero scales go through the scalar decoder, as in `decode_rows`.
        let done = match w {
            Tensor::Sparse(m) => {
                let nb = m.blocks_per_row();
                let expanded = scratch.sparse(m, r);
                let fast = !expanded.scales.contains(&0.0);
                if fast {
                    let masks = &m.masks[r * nb..][..nb];
                    for_sparse_chunks(masks, &expanded, m.group / BLOCK, |c, wv| {
                        store_chunk_f16(row, c, wv)
                    });
                }
                fast
            }
            Tensor::Q4(m) => {
                let expanded = scratch.q4(m, r);
                let fast = !expanded.scales.contains(&0.0);
                if fast {
                    for_q4_chunks(&expanded, m.group, |c, wv| store_chunk_f16(row, c, wv));
                }
                fast
            }
            Tensor::F16(m) => {
                row.copy_from_slice(&m.values[r * cols..][..cols]);
                true
            }
            Tensor::F32(_) | Tensor::Q3(_) => false,
        };
        if !done {
            scalar::decode_row(w, r, &mut f32_row);
            for c in 0..cols.div_ceil(CHUNK) {
                store_chunk_f16(row, c, load_partial_row(&f32_row, c));
            }
        }
    }
}

/// Chunk `c` of `row`, zero-filled past its end.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn load_partial_row(row: &[f32], c: usize) -> __m256 {
    let o = CHUNK * c;
    let n = (row.len() - o).min(CHUNK);
    // SAFETY: `n` values are readable at `o`.
    unsafe { load_partial(row.as_ptr().add(o), n) }
}

/// `y[i] = rows[i * stride..][..stride] . x`.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
pub unsafe fn dot_rows(rows: &[f32], stride: usize, x: &[f32], y: &mut [f32]) {
    assert!(rows.len() >= y.len() * stride && x.len() >= stride.next_multiple_of(CHUNK));
    gemv_rows(rows, stride, x, y)
}

/// Dense row-major `y = W x` for the rows in `y`, `x` readable to the next multiple of 8 columns.
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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
