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

use super::lut::{MAGIC, SPLIT};
use super::scalar::{self, ACCS, CHUNK};
use crate::format::sparse::{BLOCK, BLOCK_CODE_BYTES};
use crate::format::{DenseF16, Q4Matrix, SparseMatrix, Tensor};

pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("popcnt")
}

/// Expanded-code buffers start this many bytes before the first code: a chunk's 32-byte source
/// begins up to 16 bytes before its block.
const FRONT: usize = 16;
/// Bytes after the last block's codes a chunk load may touch: a corrupt mask can put the half-chunk
/// rank at 64, and the source is 16 bytes past it.
const BACK: usize = 2 * BLOCK;

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

/// Rewrites packed 4-bit codes (low nibble first) as one byte per code, `2c ^ 0x11` (see
/// [`super::lut`]). `codes.len()` is a multiple of 16; `out` holds twice as many bytes.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn expand_codes(codes: &[u8], out: &mut [u8]) {
    assert!(codes.len() % 16 == 0 && out.len() >= 2 * codes.len());
    let low = _mm256_set1_epi8(0x1E);
    let flip = _mm256_set1_epi8(0x11);
    // Shifting 16-bit lanes moves a neighbour's bit into each byte; the mask drops it.
    let bytes = |c: __m256i| {
        let lo = _mm256_xor_si256(_mm256_and_si256(_mm256_slli_epi16::<1>(c), low), flip);
        let hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16::<3>(c), low), flip);
        (_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi))
    };
    let pairs = codes.len() / 32;
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    for i in 0..pairs {
        // SAFETY: 32 code bytes at 32 i, 64 output bytes at 64 i, within the lengths asserted above.
        unsafe {
            let (a, b) = bytes(_mm256_loadu_si256(src.add(32 * i) as *const __m256i));
            // Within each 128-bit lane the unpacks hold one block's codes 0-15 and 16-31.
            let d = dst.add(64 * i) as *mut __m256i;
            _mm256_storeu_si256(d, _mm256_permute2x128_si256::<0x20>(a, b));
            _mm256_storeu_si256(d.add(1), _mm256_permute2x128_si256::<0x31>(a, b));
        }
    }
    if codes.len() % 32 != 0 {
        // SAFETY: the last 16 code bytes and their 32 output bytes are inside the slices.
        unsafe {
            let c = _mm256_castsi128_si256(_mm_loadu_si128(src.add(32 * pairs) as *const __m128i));
            let (a, b) = bytes(c);
            let d = dst.add(64 * pairs) as *mut __m256i;
            _mm256_storeu_si256(d, _mm256_permute2x128_si256::<0x20>(a, b));
        }
    }
}

/// 8 decoded weights from a 32-byte source at `src` whose halves meet at the chunk's half-chunk rank,
/// placed by the [`SPLIT`] entry of mask byte `mb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn chunk(src: *const u8, mb: usize, s128: __m256, s144: __m256) -> __m256 {
    let src = _mm256_loadu_si256(src as *const __m256i);
    let idx = _mm256_load_si256(SPLIT.0.as_ptr().add(mb) as *const __m256i);
    let lanes = _mm256_xor_si256(
        _mm256_shuffle_epi8(src, idx),
        _mm256_set1_epi32(MAGIC as i32),
    );
    _mm256_fmsub_ps(_mm256_castsi256_ps(lanes), s128, s144)
}

/// A row in the form the chunk loops read: expanded code bytes (after [`FRONT`] bytes of padding)
/// and, per block (sparse) or group (q4), the pair `[128 s, 144 s]`.
struct Row<'a> {
    bytes: &'a [u8],
    scales: &'a [[f32; 2]],
    /// Some scale is zero: the decoders then use the scalar path (see [`super::lut`]).
    zero_scale: bool,
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a sparse row, in column order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_sparse_chunks(masks: &[u64], row: &Row, mut sink: impl FnMut(usize, __m256)) {
    assert!(row.bytes.len() >= FRONT + masks.len() * 32 + BACK && row.scales.len() == masks.len());
    for (b, (&m, s)) in masks.iter().zip(row.scales).enumerate() {
        let s128 = _mm256_set1_ps(s[0]);
        let s144 = _mm256_set1_ps(s[1]);
        // The block's codes start at FRONT + 32 b; a chunk's source starts 16 bytes before its
        // half-chunk rank, the number of kept columns before column 8 j + 4.
        let base = row.bytes.as_ptr().wrapping_add(32 * b);
        for j in 0..8 {
            let half = (m << (60 - 8 * j)).count_ones() as usize;
            let mb = ((m >> (8 * j)) & 0xFF) as usize;
            // SAFETY: `half <= 64`, so the 32 bytes read stay inside the length asserted above.
            sink(8 * b + j, unsafe { chunk(base.add(half), mb, s128, s144) });
        }
    }
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a q4 row (all padded columns): a sparse row
/// whose every mask byte is 0xFF.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_q4_chunks(row: &Row, group: usize, mut sink: impl FnMut(usize, __m256)) {
    let per_group = group / CHUNK;
    assert!(row.bytes.len() >= FRONT + row.scales.len() * group + 16);
    for (g, s) in row.scales.iter().enumerate() {
        let s128 = _mm256_set1_ps(s[0]);
        let s144 = _mm256_set1_ps(s[1]);
        for j in 0..per_group {
            let c = g * per_group + j;
            // SAFETY: the source starts at FRONT + 8 c + 4 - 16, its 32 bytes within the assert.
            sink(c, unsafe {
                chunk(row.bytes.as_ptr().add(CHUNK * c + 4), 0xFF, s128, s144)
            });
        }
    }
}

/// Scratch for one rayon task: a row's expanded codes and scale pairs.
struct Scratch {
    bytes: Vec<u8>,
    scales: Vec<[f32; 2]>,
}

impl Scratch {
    fn new(w: &Tensor) -> Self {
        let cols = w.shape()[1];
        let (bytes, scales) = match w {
            Tensor::Sparse(m) => (m.blocks_per_row() * 32, m.blocks_per_row()),
            Tensor::Q4(m) => {
                let padded = Q4Matrix::padded_cols(cols, m.group);
                (padded, padded / m.group)
            }
            _ => (0, 0),
        };
        Self {
            bytes: vec![0; FRONT + bytes + BACK],
            scales: vec![[0.0; 2]; scales],
        }
    }

    /// Expands row `r` of a sparse matrix.
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    fn sparse(&mut self, m: &SparseMatrix, r: usize) -> Row<'_> {
        let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
        let n = nb * BLOCK_CODE_BYTES;
        expand_codes(&m.codes[r * n..][..n], &mut self.bytes[FRONT..]);
        let per_group = m.group / BLOCK;
        let mut zero_scale = false;
        for (pairs, h) in self
            .scales
            .chunks_mut(per_group)
            .zip(&m.scales[r * ng..][..ng])
        {
            let s = h.to_f32();
            zero_scale |= s == 0.0;
            pairs.fill([128.0 * s, 144.0 * s]);
        }
        Row {
            bytes: &self.bytes,
            scales: &self.scales,
            zero_scale,
        }
    }

    /// Expands row `r` of a q4 matrix.
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    fn q4(&mut self, m: &Q4Matrix, r: usize) -> Row<'_> {
        let padded = Q4Matrix::padded_cols(m.cols, m.group);
        let ng = padded / m.group;
        expand_codes(
            &m.codes[r * padded / 2..][..padded / 2],
            &mut self.bytes[FRONT..],
        );
        let mut zero_scale = false;
        for (pair, h) in self.scales.iter_mut().zip(&m.scales[r * ng..][..ng]) {
            let s = h.to_f32();
            zero_scale |= s == 0.0;
            *pair = [128.0 * s, 144.0 * s];
        }
        Row {
            bytes: &self.bytes,
            scales: &self.scales,
            zero_scale,
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
    if len % CHUNK != 0 {
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
    if len % CHUNK != 0 {
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
            let mut scratch = Scratch::new(w);
            for (i, yi) in y.iter_mut().enumerate() {
                let r = r0 + i;
                let row = scratch.sparse(m, r);
                let mut acc = [_mm256_setzero_ps(); ACCS];
                for_sparse_chunks(&m.masks[r * nb..][..nb], &row, |c, wv| {
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
                let expanded = scratch.sparse(m, r);
                if expanded.zero_scale {
                    scalar::decode_sparse_row(m, r, row);
                    continue;
                }
                let (real, pad) = row.split_at_mut(cols);
                for_sparse_chunks(&m.masks[r * nb..][..nb], &expanded, |c, wv| {
                    store_chunk(real, c, wv)
                });
                pad.fill(0.0);
            }
            Tensor::Q4(m) => {
                let expanded = scratch.q4(m, r);
                if expanded.zero_scale {
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
                let fast = !expanded.zero_scale;
                if fast {
                    let masks = &m.masks[r * nb..][..nb];
                    for_sparse_chunks(masks, &expanded, |c, wv| store_chunk_f16(row, c, wv));
                }
                fast
            }
            Tensor::Q4(m) => {
                let expanded = scratch.q4(m, r);
                let fast = !expanded.zero_scale;
                if fast {
                    for_q4_chunks(&expanded, m.group, |c, wv| store_chunk_f16(row, c, wv));
                }
                fast
            }
            Tensor::F16(m) => {
                row.copy_from_slice(&m.values[r * cols..][..cols]);
                true
            }
            Tensor::F32(_) => false,
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
