//! AVX2 + FMA + F16C kernels for x86-64, chosen at run time.
//!
//! Quantised rows are decoded in two passes. The first ([`Scratch::load`]) rewrites the row's packed
//! codes as one byte per code in line-aligned slots ([`expand_codes`]), computes each 8-column
//! chunk's source and table offsets with vector popcounts ([`chunk_descriptors`]) and the scale
//! pairs. The second walks the row 8 columns at a time: one 32-byte load, one `vpshufb` that puts
//! each kept code in its column (see [`super::lut`]), an XOR and an FMA for the weights, an FMA into
//! the accumulators. The first pass runs one row ahead of the second ([`for_each_row`]): a load
//! that straddles recent stores cannot be forwarded from them and would wait until they retire.
//!
//! q3 rows take the q4 path: [`expand_q3_codes`] writes each code `c` as the byte of the q4 code
//! `c + 4`, whose level `2 (c + 4) - 15` is q3's `2c - 7`, so the chunk loop is the same.
//!
//! Every function here is `unsafe` only because it needs the CPU features: callers check
//! [`available`] first. Slice lengths are checked by the caller (`cpu::check_tensor`) and by the
//! padded buffers allocated here, so a corrupt mask gives wrong values, never an out-of-bounds read.

use std::arch::x86_64::*;

use half::f16;

use super::lut::{MAGIC, SPLIT};
use super::scalar::{self, ACCS, CHUNK};
use super::Lines;
use crate::format::dense::Q3_RUN_BYTES;
use crate::format::sparse::{BLOCK, BLOCK_CODE_BYTES};
use crate::format::{DenseF16, Q3Matrix, Q4Matrix, Tensor};

pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("popcnt")
}

/// Expanded codes live in 64-byte, line-aligned slots, one per 16 bytes of packed codes (a sparse
/// block, or 32 q4 columns), the 32 code bytes at offset [`FRONT`]. A chunk's 32-byte source starts
/// at `slot + half` with `half <= 32` for a valid mask, so it never straddles two cache lines.
const SLOT: usize = 64;
const FRONT: usize = 16;
/// Bytes after the last slot a chunk load may touch: a corrupt mask can put `half` at 64.
const BACK: usize = 2 * SLOT;
/// Chunk descriptors keep a source offset in 19 bits: rows of up to 8190 blocks (524 160 columns).
/// Wider sparse rows take the scalar path.
const MAX_BLOCKS: usize = ((1 << 19) - BACK) / SLOT - 1;
const OFFSET_MASK: u32 = (1 << 19) - 1;

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
/// [`super::lut`]): each 16 bytes of codes become 32 bytes at `FRONT` in their [`SLOT`] of `out`.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn expand_codes(codes: &[u8], out: &mut [u8]) {
    assert!(codes.len().is_multiple_of(16) && out.len() >= codes.len() / 16 * SLOT);
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
            let d = dst.add(2 * SLOT * i + FRONT);
            _mm256_storeu_si256(d as *mut __m256i, _mm256_permute2x128_si256::<0x20>(a, b));
            let d = d.add(SLOT) as *mut __m256i;
            _mm256_storeu_si256(d, _mm256_permute2x128_si256::<0x31>(a, b));
        }
    }
    if !codes.len().is_multiple_of(32) {
        // SAFETY: the last 16 code bytes and their 32 output bytes are inside the slices.
        unsafe {
            let c = _mm256_castsi128_si256(_mm_loadu_si128(src.add(32 * pairs) as *const __m128i));
            let (a, b) = bytes(c);
            let d = dst.add(2 * SLOT * pairs + FRONT) as *mut __m256i;
            _mm256_storeu_si256(d, _mm256_permute2x128_si256::<0x20>(a, b));
        }
    }
}

/// Rewrites q3 codes (runs of 32 columns, three bit planes of 4 bytes; see [`Q3Matrix`]) as the
/// bytes [`expand_codes`] makes of q4 codes `c + 4`: each run becomes 32 bytes at `FRONT` in its
/// [`SLOT`] of `out`. A byte shuffle gives every column the plane bytes holding its bits, a compare
/// against the column's bit tests them, and a table maps `2c` to the output byte.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn expand_q3_codes(codes: &[u8], out: &mut [u8]) {
    assert!(
        codes.len().is_multiple_of(Q3_RUN_BYTES) && out.len() >= codes.len() / Q3_RUN_BYTES * SLOT
    );
    // Column i (byte i; each 128-bit lane sees the whole run) takes byte i / 8 of plane b.
    let plane = |b: i8| {
        _mm256_setr_epi8(
            4 * b,
            4 * b,
            4 * b,
            4 * b,
            4 * b,
            4 * b,
            4 * b,
            4 * b,
            4 * b + 1,
            4 * b + 1,
            4 * b + 1,
            4 * b + 1,
            4 * b + 1,
            4 * b + 1,
            4 * b + 1,
            4 * b + 1,
            4 * b + 2,
            4 * b + 2,
            4 * b + 2,
            4 * b + 2,
            4 * b + 2,
            4 * b + 2,
            4 * b + 2,
            4 * b + 2,
            4 * b + 3,
            4 * b + 3,
            4 * b + 3,
            4 * b + 3,
            4 * b + 3,
            4 * b + 3,
            4 * b + 3,
            4 * b + 3,
        )
    };
    let (p0, p1, p2) = (plane(0), plane(1), plane(2));
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    // Byte 2c -> (2 (c + 4)) ^ 0x11, the q4 byte of code c + 4.
    let to_q4 = _mm256_setr_epi8(
        0x19, 0, 0x1B, 0, 0x1D, 0, 0x1F, 0, 0x01, 0, 0x03, 0, 0x05, 0, 0x07, 0, 0x19, 0, 0x1B, 0,
        0x1D, 0, 0x1F, 0, 0x01, 0, 0x03, 0, 0x05, 0, 0x07, 0,
    );
    let weight = |v: __m256i, idx: __m256i, value: i8| {
        let b = _mm256_and_si256(_mm256_shuffle_epi8(v, idx), bit);
        _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(value))
    };
    let runs = codes.len() / Q3_RUN_BYTES;
    for k in 0..runs {
        let run = &codes[k * Q3_RUN_BYTES..];
        let mut tail = [0u8; 16];
        let src = if run.len() >= 16 {
            run.as_ptr()
        } else {
            tail[..Q3_RUN_BYTES].copy_from_slice(&run[..Q3_RUN_BYTES]);
            tail.as_ptr()
        };
        // SAFETY: 16 readable bytes at `src` (the run and what follows it, or `tail`); 32 bytes
        // stored at `SLOT k + FRONT`, inside `out` (asserted).
        unsafe {
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(src as *const __m128i));
            let two_c = _mm256_or_si256(
                _mm256_or_si256(weight(v, p0, 2), weight(v, p1, 4)),
                weight(v, p2, 8),
            );
            let bytes = _mm256_shuffle_epi8(to_q4, two_c);
            let d = out.as_mut_ptr().add(SLOT * k + FRONT);
            _mm256_storeu_si256(d as *mut __m256i, bytes);
        }
    }
}

/// 8 decoded weights from a 32-byte source at `src` whose halves meet at the chunk's half-chunk rank,
/// placed by the [`SPLIT`] entry at `idx`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn chunk(src: *const u8, idx: *const u8, s128: __m256, s144: __m256) -> __m256 {
    let src = _mm256_loadu_si256(src as *const __m256i);
    let idx = _mm256_load_si256(idx as *const __m256i);
    let lanes = _mm256_xor_si256(
        _mm256_shuffle_epi8(src, idx),
        _mm256_set1_epi32(MAGIC as i32),
    );
    _mm256_fmsub_ps(_mm256_castsi256_ps(lanes), s128, s144)
}

/// One row prepared for the chunk loops: expanded code bytes in [`SLOT`]s, the pair
/// `[128 s, 144 s]` per scale group, and for sparse rows the per-chunk source offsets.
struct Scratch {
    bytes: Lines,
    scales: Vec<[f32; 2]>,
    chunks: Vec<u32>,
    /// Some scale of the row is zero: the decoders then use the scalar path (see [`super::lut`]).
    zero_scale: bool,
}

impl Scratch {
    fn new(w: &Tensor) -> Self {
        let cols = w.shape()[1];
        let (slots, scales, chunks) = match w {
            Tensor::Sparse(m) => {
                let nb = m.blocks_per_row();
                (nb, m.groups_per_row(), nb.next_multiple_of(4) * 8)
            }
            Tensor::Q4(m) => {
                let padded = Q4Matrix::padded_cols(cols, m.group);
                (padded / 32, padded / m.group, 0)
            }
            Tensor::Q3(m) => {
                let padded = Q3Matrix::padded_cols(cols, m.group);
                (padded / 32, padded / m.group, 0)
            }
            _ => (0, 0, 0),
        };
        Self {
            bytes: Lines::zeroed(slots * SLOT + BACK),
            scales: vec![[0.0; 2]; scales],
            chunks: vec![0; chunks],
            zero_scale: false,
        }
    }

    /// Prepares row `r` of a sparse, q4 or q3 tensor (nothing for dense ones).
    #[target_feature(enable = "avx2,fma,f16c,popcnt")]
    fn load(&mut self, w: &Tensor, r: usize) {
        let (codes, scales) = match w {
            Tensor::Sparse(m) => {
                let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
                chunk_descriptors(&m.masks[r * nb..][..nb], &mut self.chunks);
                let n = nb * BLOCK_CODE_BYTES;
                (&m.codes[r * n..][..n], &m.scales[r * ng..][..ng])
            }
            Tensor::Q4(m) => {
                let padded = Q4Matrix::padded_cols(m.cols, m.group);
                let ng = padded / m.group;
                (
                    &m.codes[r * padded / 2..][..padded / 2],
                    &m.scales[r * ng..][..ng],
                )
            }
            Tensor::Q3(m) => {
                let ng = Q3Matrix::padded_cols(m.cols, m.group) / m.group;
                let rb = Q3Matrix::row_bytes(m.cols, m.group);
                expand_q3_codes(&m.codes[r * rb..][..rb], self.bytes.bytes_mut());
                self.zero_scale = scale_pairs(&m.scales[r * ng..][..ng], &mut self.scales);
                return;
            }
            _ => return,
        };
        expand_codes(codes, self.bytes.bytes_mut());
        self.zero_scale = scale_pairs(scales, &mut self.scales);
    }
}

/// `[128 s, 144 s]` for each f16 scale `s`; returns whether any scale is zero.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn scale_pairs(h: &[f16], out: &mut [[f32; 2]]) -> bool {
    let (k128, k144) = (_mm256_set1_ps(128.0), _mm256_set1_ps(144.0));
    let mut zero = 0;
    let mut hc = h.chunks_exact(8);
    let mut oc = out.chunks_exact_mut(8);
    for (src, dst) in (&mut hc).zip(&mut oc) {
        // SAFETY: 8 scales in, 8 pairs (64 bytes) out.
        unsafe {
            let s = _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr() as *const __m128i));
            zero |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(s, _mm256_setzero_ps()));
            let (a, b) = (_mm256_mul_ps(s, k128), _mm256_mul_ps(s, k144));
            // In-lane unpacks give pairs 0, 1, 4, 5 and 2, 3, 6, 7.
            let (lo, hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let p = dst.as_mut_ptr() as *mut f32;
            _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(lo, hi));
            _mm256_storeu_ps(p.add(8), _mm256_permute2f128_ps::<0x31>(lo, hi));
        }
    }
    for (src, dst) in hc.remainder().iter().zip(oc.into_remainder()) {
        let s = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(src.to_bits() as i32)));
        zero |= (s == 0.0) as i32;
        *dst = [128.0 * s, 144.0 * s];
    }
    zero != 0
}

/// Calls `body(i, scratch)` for rows `r0 + i`, `i < n`, each prepared by [`Scratch::load`] one row
/// ahead, in the other of two scratch buffers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_each_row(w: &Tensor, r0: usize, n: usize, mut body: impl FnMut(usize, &Scratch)) {
    if n == 0 {
        return;
    }
    let (mut cur, mut next) = (Scratch::new(w), Scratch::new(w));
    cur.load(w, r0);
    for i in 0..n {
        if i + 1 < n {
            next.load(w, r0 + i + 1);
        }
        body(i, &cur);
        std::mem::swap(&mut cur, &mut next);
    }
}

/// Per-chunk sources of a sparse row: for chunk `j` of block `b`, the u32 `off | mb << 24`, where
/// `off = SLOT b + half` is the chunk's source in the expanded-code buffer (`half` counts the block's
/// kept columns before column `8 j + 4`; the block's codes start at `FRONT = 16` in its slot and
/// the source 16 bytes before `half`) and `mb` is the mask byte. The chunk loop takes
/// `d & OFFSET_MASK` as the source and `d >> 19 = 32 mb` as the byte offset of the [`SPLIT`] entry:
/// two integer operations and two-register addresses. Computing them for the whole row with vector
/// popcounts (nibble table, then a prefix sum inside each u64) keeps the rest out of the chunk loop.
/// `out` holds 8 per block, rounded up to 4 blocks; at most [`MAX_BLOCKS`] blocks.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn chunk_descriptors(masks: &[u64], out: &mut [u32]) {
    assert!(out.len() >= masks.len().next_multiple_of(4) * 8 && masks.len() <= MAX_BLOCKS);
    let pop4 = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let nibble = _mm256_set1_epi8(0x0F);
    let quads = masks.len().div_ceil(4);
    for (q, dst) in out.chunks_exact_mut(32).take(quads).enumerate() {
        let v = if 4 * q + 4 <= masks.len() {
            // SAFETY: 4 masks at 4 q.
            unsafe { _mm256_loadu_si256(masks.as_ptr().add(4 * q) as *const __m256i) }
        } else {
            let mut four = [0u64; 4];
            four[..masks.len() - 4 * q].copy_from_slice(&masks[4 * q..]);
            // SAFETY: `four` holds 32 bytes.
            unsafe { _mm256_loadu_si256(four.as_ptr() as *const __m256i) }
        };
        // Shifting 16-bit lanes moves a neighbour's bits into each byte; the masks drop them.
        let low = _mm256_shuffle_epi8(pop4, _mm256_and_si256(v, nibble));
        let high = _mm256_shuffle_epi8(pop4, _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble));
        let count = _mm256_add_epi8(low, high);
        let mut incl = _mm256_add_epi8(count, _mm256_slli_epi64::<8>(count));
        incl = _mm256_add_epi8(incl, _mm256_slli_epi64::<16>(incl));
        incl = _mm256_add_epi8(incl, _mm256_slli_epi64::<32>(incl));
        let half = _mm256_sub_epi8(incl, high);
        let zero = _mm256_setzero_si256();
        // u16 lanes `half` and `mb << 8`, then u32 lanes `half | mb << 24`.
        let (h0, h1) = (
            _mm256_unpacklo_epi8(half, zero),
            _mm256_unpackhi_epi8(half, zero),
        );
        let (l0, l1) = (_mm256_unpacklo_epi8(zero, v), _mm256_unpackhi_epi8(zero, v));
        // Unpacks stay inside 128-bit lanes: lane 0 holds blocks 0 and 1, lane 1 blocks 2 and 3, so
        // `a`, `b` hold blocks 4q and 4q + 2 (chunks 0-3, 4-7), `c`, `d` blocks 4q + 1 and 4q + 3.
        let slot = |k: i32| (SLOT * 4 * q) as i32 + SLOT as i32 * k;
        let even = _mm256_setr_epi32(
            slot(0),
            slot(0),
            slot(0),
            slot(0),
            slot(2),
            slot(2),
            slot(2),
            slot(2),
        );
        let odd = _mm256_add_epi32(even, _mm256_set1_epi32(SLOT as i32));
        let a = _mm256_add_epi32(_mm256_unpacklo_epi16(h0, l0), even);
        let b = _mm256_add_epi32(_mm256_unpackhi_epi16(h0, l0), even);
        let c = _mm256_add_epi32(_mm256_unpacklo_epi16(h1, l1), odd);
        let d = _mm256_add_epi32(_mm256_unpackhi_epi16(h1, l1), odd);
        let p = dst.as_mut_ptr() as *mut __m256i;
        // SAFETY: `dst` holds 32 u32, four 32-byte stores.
        unsafe {
            _mm256_storeu_si256(p, _mm256_permute2x128_si256::<0x20>(a, b));
            _mm256_storeu_si256(p.add(1), _mm256_permute2x128_si256::<0x20>(c, d));
            _mm256_storeu_si256(p.add(2), _mm256_permute2x128_si256::<0x31>(a, b));
            _mm256_storeu_si256(p.add(3), _mm256_permute2x128_si256::<0x31>(c, d));
        }
    }
}

/// Calls `sink(c, w)` for every 8-column chunk `c` of a prepared sparse row, in column order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_sparse_chunks(
    row: &Scratch,
    blocks: usize,
    blocks_per_group: usize,
    mut sink: impl FnMut(usize, __m256),
) {
    assert!(row.bytes.bytes().len() >= blocks * SLOT + BACK && row.chunks.len() >= blocks * 8);
    assert!(row.scales.len() * blocks_per_group >= blocks);
    let table = SPLIT.0.as_ptr() as *const u8;
    let bytes = row.bytes.bytes().as_ptr();
    let mut descs = row.chunks[..blocks * 8].chunks_exact(8).enumerate();
    for s in &row.scales {
        let s128 = _mm256_set1_ps(s[0]);
        let s144 = _mm256_set1_ps(s[1]);
        for (b, desc) in descs.by_ref().take(blocks_per_group) {
            for (j, &d) in desc.iter().enumerate() {
                // SAFETY: `off <= SLOT b + 64` (`half` counts 8 bytes of mask at most), so the 32
                // bytes read stay inside the length asserted above; `d >> 19` is the offset of one
                // of the table's 256 entries.
                sink(8 * b + j, unsafe {
                    let src = bytes.add((d & OFFSET_MASK) as usize);
                    chunk(src, table.add((d >> 19) as usize), s128, s144)
                });
            }
        }
    }
}

/// Calls `sink(c, w)` for the 8-column chunks of the first `runs` 32-column runs of a prepared q4 or
/// q3 row (at most all padded columns): a sparse row whose every mask byte is 0xFF. The four chunks
/// of a run are a loop of constant length, so `c % 4` (the accumulator) is known after unrolling.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn for_q4_chunks(row: &Scratch, group: usize, runs: usize, mut sink: impl FnMut(usize, __m256)) {
    let per_group = group / 32;
    assert!(row.bytes.bytes().len() >= row.scales.len() * per_group * SLOT);
    let idx = SPLIT.0[0xFF].as_ptr();
    let bytes = row.bytes.bytes().as_ptr();
    for (g, s) in row.scales.iter().enumerate() {
        let s128 = _mm256_set1_ps(s[0]);
        let s144 = _mm256_set1_ps(s[1]);
        for q in g * per_group..((g + 1) * per_group).min(runs) {
            for j in 0..4 {
                // Chunk j of run q: its half-chunk rank is 8 j + 4, so its source starts at
                // slot + 8 j + 4, inside the slot (asserted above).
                let src = SLOT * q + CHUNK * j + 4;
                sink(4 * q + j, unsafe { chunk(bytes.add(src), idx, s128, s144) });
            }
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
    if too_wide(w) {
        return scalar::spmv_rows(w, r0, x, y);
    }
    let cols = w.shape()[1];
    let xp = x.as_ptr();
    match w {
        Tensor::Sparse(m) => {
            let nb = m.blocks_per_row();
            assert!(x.len() >= nb * BLOCK);
            for_each_row(w, r0, y.len(), |i, row| {
                let mut acc = [_mm256_setzero_ps(); ACCS];
                for_sparse_chunks(row, nb, m.group / BLOCK, |c, wv| {
                    fma_at(&mut acc, c, wv, _mm256_loadu_ps(xp.add(CHUNK * c)));
                });
                y[i] = reduce(&acc);
            });
        }
        Tensor::Q4(Q4Matrix { group, .. }) | Tensor::Q3(Q3Matrix { group, .. }) => {
            let width = decoded_width(w);
            assert!(x.len() >= width);
            for_each_row(w, r0, y.len(), |i, row| {
                let mut acc = [_mm256_setzero_ps(); ACCS];
                for_q4_chunks(row, *group, width / 32, |c, wv| {
                    fma_at(&mut acc, c, wv, _mm256_loadu_ps(xp.add(CHUNK * c)));
                });
                y[i] = reduce(&acc);
            });
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

/// Sparse rows wider than the chunk descriptors can address (see [`MAX_BLOCKS`]).
fn too_wide(w: &Tensor) -> bool {
    matches!(w, Tensor::Sparse(m) if m.blocks_per_row() > MAX_BLOCKS)
}

/// Columns a prepared row decodes to: whole blocks (sparse), whole q4 groups, or q3 columns up to
/// the next multiple of 64 (x's padding; a q3 group of 128 may reach past it).
fn decoded_width(w: &Tensor) -> usize {
    match w {
        Tensor::Sparse(m) => m.blocks_per_row() * BLOCK,
        Tensor::Q4(m) => Q4Matrix::padded_cols(m.cols, m.group),
        Tensor::Q3(m) => Q3Matrix::padded_cols(m.cols, m.group).min(m.cols.next_multiple_of(BLOCK)),
        _ => 0,
    }
}

/// Decodes prepared row `r` into `out[..decoded_width]` with whole-chunk stores (zero past `cols`
/// for sparse rows, whose padding is pruned; q4 and q3 padding is garbage the caller must not keep).
/// Returns false, writing nothing, for dense tensors and rows with a zero scale, which the scalar
/// decoder handles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn decode_prepared(w: &Tensor, row: &Scratch, out: &mut [f32]) -> bool {
    if row.zero_scale || !matches!(w, Tensor::Sparse(_) | Tensor::Q4(_) | Tensor::Q3(_)) {
        return false;
    }
    assert!(out.len() >= decoded_width(w));
    let o = out.as_mut_ptr();
    // SAFETY: every chunk index is below decoded_width / 8, inside `out` (asserted).
    let store = |c: usize, wv: __m256| unsafe { _mm256_storeu_ps(o.add(CHUNK * c), wv) };
    match w {
        Tensor::Sparse(m) => for_sparse_chunks(row, m.blocks_per_row(), m.group / BLOCK, store),
        Tensor::Q4(Q4Matrix { group, .. }) | Tensor::Q3(Q3Matrix { group, .. }) => {
            for_q4_chunks(row, *group, decoded_width(w) / 32, store)
        }
        _ => return false,
    }
    true
}

/// Copies `src` to `dst` (same length) with 32-byte streaming stores, which write whole lines to
/// memory without reading them first; the unaligned head and tail are copied plainly.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    let head = dst.as_ptr().align_offset(32).min(dst.len());
    let body = (dst.len() - head) / 32 * 32;
    dst[..head].copy_from_slice(&src[..head]);
    for i in (head..head + body).step_by(32) {
        // SAFETY: 32 bytes at `i` in both slices (`i + 32 <= head + body <= len`), `dst + i` aligned.
        unsafe {
            let v = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            _mm256_stream_si256(dst.as_mut_ptr().add(i) as *mut __m256i, v);
        }
    }
    dst[head + body..].copy_from_slice(&src[head + body..]);
}

/// Rows `r0..` of `w` into `out`, `stride` values per row (`cols` or the 64-padded width; zero past
/// `cols`). Bit-identical to the reference decoder. Each row is decoded into a line-aligned buffer
/// that stays in L1, then copied out; with `stream`, by [`stream_copy`].
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
pub unsafe fn decode_rows(w: &Tensor, r0: usize, out: &mut [f32], stride: usize, stream: bool) {
    if too_wide(w) {
        return scalar::decode_rows(w, r0, out, stride, stream);
    }
    let cols = w.shape()[1];
    let width = decoded_width(w).max(cols);
    let mut buf = Lines::zeroed(width * 4);
    for_each_row(w, r0, out.len() / stride, |i, prepared| {
        let dst = &mut out[i * stride..][..stride];
        let row = &mut buf.f32_mut()[..width];
        if !decode_prepared(w, prepared, row) {
            scalar::decode_row(w, r0 + i, row);
        }
        let (real, pad) = dst.split_at_mut(cols);
        if stream {
            stream_copy(
                bytemuck::cast_slice_mut(real),
                bytemuck::cast_slice(&row[..cols]),
            );
        } else {
            real.copy_from_slice(&row[..cols]);
        }
        pad.fill(0.0);
    });
    // Streaming stores are weakly ordered: make them visible before the caller's join says done.
    _mm_sfence();
}

/// Rows `r0..` of `w` into `out` as f16 (round to nearest even), `cols` values per row; `stream` as
/// in [`decode_rows`].
///
/// # Safety
/// [`available`] must be true.
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
pub unsafe fn decode_rows_f16(w: &Tensor, r0: usize, out: &mut [f16], stream: bool) {
    if too_wide(w) {
        return scalar::decode_rows_f16(w, r0, out, stream);
    }
    let cols = w.shape()[1];
    if let Tensor::F16(m) = w {
        out.copy_from_slice(&m.values[r0 * cols..][..out.len()]);
        return;
    }
    let width = decoded_width(w).max(cols).next_multiple_of(CHUNK);
    let mut buf = Lines::zeroed(width * 4);
    let mut half = Lines::zeroed(width * 2);
    for_each_row(w, r0, out.len() / cols, |i, prepared| {
        let row = &mut buf.f32_mut()[..width];
        if !decode_prepared(w, prepared, row) {
            scalar::decode_row(w, r0 + i, row);
        }
        let h: &mut [f16] = &mut bytemuck::cast_slice_mut(half.bytes_mut())[..width];
        for (src, dst) in row.chunks_exact(CHUNK).zip(h.chunks_exact_mut(CHUNK)) {
            // SAFETY: 8 values each.
            unsafe {
                let v = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr()));
                _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, v);
            }
        }
        let dst = &mut out[i * cols..][..cols];
        if stream {
            stream_copy(
                bytemuck::cast_slice_mut(dst),
                bytemuck::cast_slice(&h[..cols]),
            );
        } else {
            dst.copy_from_slice(&h[..cols]);
        }
    });
    _mm_sfence();
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
