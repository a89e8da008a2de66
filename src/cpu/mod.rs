//! CPU kernels: the plain scalar reference, and the fast SIMD + multi-core kernels the library uses
//! when no GPU is there.
//!
//! Every kernel works on every codec of [`Tensor`] and takes its SIMD path from [`Simd`]: AVX2+FMA on
//! x86-64, NEON on aarch64, or the portable scalar code, picked at run time ([`Simd::detect`];
//! `UPG_CPU_SIMD=scalar|avx2|neon` forces one). The `*_with` variants take the path explicitly, so that
//! tests can compare every path in one process. Rows are split across the rayon pool.
//!
//! All paths accumulate a dot product the same way (8-column chunks into 4 accumulators, chunk `c`
//! into `c % 4`, then one fixed reduction; see `scalar::reduce`), in f32. The SIMD paths round each
//! multiply-add once (FMA), the scalar path twice, so they agree to a few ulps of the row's sum of
//! |w x|, and `spmm` equals `spmv` bit for bit on the same path. The decoders reproduce the reference
//! decode bit for bit.

pub mod reference;

mod lut;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::OnceLock;

use half::f16;
use rayon::prelude::*;

use crate::format::sparse::{self, BLOCK, BLOCK_CODE_BYTES};
use crate::format::{Q3Matrix, Q4Matrix, Tensor};

/// Errors of the CPU kernels: what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("shape mismatch: {0}")]
    Shape(String),

    #[error("tensor planes do not fit its shape ({0}): the tensor is corrupt; Tensor::validate names the plane")]
    Tensor(String),

    #[error("the {wanted} SIMD path is not available on this CPU (available: {available})")]
    Unavailable {
        wanted: &'static str,
        available: String,
    },

    #[error("UPG_CPU_SIMD={0:?} names no SIMD path: use scalar, avx2 or neon, or unset it")]
    UnknownSimd(String),
}

pub type Result<T> = std::result::Result<T, CpuError>;

/// An instruction set for the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Simd {
    /// Portable Rust, no intrinsics: runs everywhere.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Simd {
    pub const ALL: [Simd; 3] = [Simd::Scalar, Simd::Avx2, Simd::Neon];

    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Neon => "neon",
        }
    }

    /// The path named `name` (as `UPG_CPU_SIMD` takes it), if this CPU has it.
    pub fn from_name(name: &str) -> Result<Simd> {
        let simd = Simd::ALL
            .into_iter()
            .find(|s| s.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| CpuError::UnknownSimd(name.to_string()))?;
        simd.check()?;
        Ok(simd)
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            Simd::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => avx2::available(),
            #[cfg(target_arch = "aarch64")]
            Simd::Neon => neon::available(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every path this CPU can run, scalar first.
    pub fn available() -> Vec<Simd> {
        Simd::ALL.into_iter().filter(|s| s.is_available()).collect()
    }

    /// The fastest path this CPU can run.
    pub fn best() -> Simd {
        Simd::available().last().copied().unwrap_or(Simd::Scalar)
    }

    /// The path the plain kernels use: `UPG_CPU_SIMD` when set, otherwise [`Simd::best`]. Read once.
    pub fn detect() -> Result<Simd> {
        static CHOICE: OnceLock<std::result::Result<Simd, String>> = OnceLock::new();
        let choice = CHOICE.get_or_init(|| match std::env::var("UPG_CPU_SIMD") {
            Ok(name) if !name.is_empty() => Simd::from_name(&name).map_err(|_| name),
            _ => Ok(Simd::best()),
        });
        match choice {
            Ok(simd) => Ok(*simd),
            Err(name) => Simd::from_name(name),
        }
    }

    fn check(self) -> Result<()> {
        if self.is_available() {
            return Ok(());
        }
        let available = Simd::available()
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ");
        Err(CpuError::Unavailable {
            wanted: self.name(),
            available,
        })
    }

    /// The kernels of this path; errors when the CPU lacks it, so the unsafe entry points below only
    /// ever run on CPUs that have their features.
    fn kernels(self) -> Result<&'static Kernels> {
        self.check()?;
        match self {
            Simd::Scalar => Ok(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => Ok(&AVX2),
            #[cfg(target_arch = "aarch64")]
            Simd::Neon => Ok(&NEON),
            // check() refuses a path this build lacks.
            #[allow(unreachable_patterns)]
            other => Err(CpuError::Unavailable {
                wanted: other.name(),
                available: Simd::Scalar.name().into(),
            }),
        }
    }
}

/// One path's row kernels. Each works on a run of rows starting at `r0`; `x` is padded with zeros to
/// a multiple of 64 columns. The decoders' flag asks for streaming (non-temporal) stores where the
/// path has them. The pointers are `unsafe fn` because the SIMD ones need their CPU
/// features: [`Simd::kernels`] hands them out only after checking.
struct Kernels {
    spmv_rows: unsafe fn(&Tensor, usize, &[f32], &mut [f32]),
    decode_rows: unsafe fn(&Tensor, usize, &mut [f32], usize, bool),
    decode_rows_f16: unsafe fn(&Tensor, usize, &mut [f16], bool),
    dot_rows: unsafe fn(&[f32], usize, &[f32], &mut [f32]),
    gemv_rows: unsafe fn(&[f32], usize, &[f32], &mut [f32]),
}

static SCALAR: Kernels = Kernels {
    spmv_rows: scalar::spmv_rows,
    decode_rows: scalar::decode_rows,
    decode_rows_f16: scalar::decode_rows_f16,
    dot_rows: scalar::dot_rows,
    gemv_rows: scalar::gemv_rows,
};

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = Kernels {
    spmv_rows: avx2::spmv_rows,
    decode_rows: avx2::decode_rows,
    decode_rows_f16: avx2::decode_rows_f16,
    dot_rows: avx2::dot_rows,
    gemv_rows: avx2::gemv_rows,
};

#[cfg(target_arch = "aarch64")]
static NEON: Kernels = Kernels {
    spmv_rows: neon::spmv_rows,
    decode_rows: neon::decode_rows,
    decode_rows_f16: neon::decode_rows_f16,
    dot_rows: neon::dot_rows,
    gemv_rows: neon::gemv_rows,
};

/// y = W x (`x`: one value per input column, `y`: one per output row), f32 accumulation.
pub fn spmv(w: &Tensor, x: &[f32], y: &mut [f32]) -> Result<()> {
    spmv_with(Simd::detect()?, w, x, y)
}

/// [`spmv`] on the given SIMD path.
pub fn spmv_with(simd: Simd, w: &Tensor, x: &[f32], y: &mut [f32]) -> Result<()> {
    let [rows, cols] = w.shape();
    expect_len("x", x.len(), cols, "one per input column of W", rows, cols)?;
    expect_len("y", y.len(), rows, "one per output row of W", rows, cols)?;
    let k = simd.kernels()?;
    check_tensor(w)?;
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let x = padded(x, 1, cols);
    for_row_runs(y, 1, rows, cols, |r0, y| {
        // SAFETY: `k` came from `Simd::kernels`, which checked the CPU; shapes checked above.
        unsafe { (k.spmv_rows)(w, r0, x.f32(), y) }
    });
    Ok(())
}

/// Y = W X for `n` input vectors at once (prompt prefill, perplexity): `xs` holds them row-major,
/// vector `i` at `xs[i * cols..]`, and vector `i`'s output goes to `ys[i * rows..]`. Each row is
/// decoded once for all `n` vectors; the result equals `n` calls of [`spmv`] bit for bit.
pub fn spmm(w: &Tensor, xs: &[f32], n: usize, ys: &mut [f32]) -> Result<()> {
    spmm_with(Simd::detect()?, w, xs, n, ys)
}

/// Rows decoded at once by `spmm` before the dot products run over them.
const SPMM_TILE: usize = 8;

/// [`spmm`] on the given SIMD path.
pub fn spmm_with(simd: Simd, w: &Tensor, xs: &[f32], n: usize, ys: &mut [f32]) -> Result<()> {
    let [rows, cols] = w.shape();
    let n_cols = n.checked_mul(cols).ok_or_else(|| overflow("xs", n, cols))?;
    let n_rows = n.checked_mul(rows).ok_or_else(|| overflow("ys", n, rows))?;
    expect_len(
        "xs",
        xs.len(),
        n_cols,
        "n vectors of one value per input column",
        rows,
        cols,
    )?;
    expect_len(
        "ys",
        ys.len(),
        n_rows,
        "n vectors of one value per output row",
        rows,
        cols,
    )?;
    let k = simd.kernels()?;
    check_tensor(w)?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        ys.fill(0.0);
        return Ok(());
    }
    let pc = cols.next_multiple_of(BLOCK);
    let xp = padded(xs, n, cols);
    // Row-major [rows, n] so that each task owns a contiguous run; transposed into `ys` after.
    let mut yt = vec![0.0f32; rows * n];
    for_row_runs(&mut yt, n, rows, cols.saturating_mul(n), |r0, yt| {
        let run = yt.len() / n;
        let mut tile = Lines::zeroed(SPMM_TILE.min(run) * pc * 4);
        let mut dots = [0.0f32; SPMM_TILE];
        for t0 in (0..run).step_by(SPMM_TILE) {
            let tr = SPMM_TILE.min(run - t0);
            let tile = &mut tile.f32_mut()[..tr * pc];
            // SAFETY: as in `spmv_with`.
            unsafe { (k.decode_rows)(w, r0 + t0, tile, pc, false) };
            for (i, x) in xp.f32().chunks_exact(pc).take(n).enumerate() {
                unsafe { (k.dot_rows)(tile, pc, x, &mut dots[..tr]) };
                for (j, &d) in dots[..tr].iter().enumerate() {
                    yt[(t0 + j) * n + i] = d;
                }
            }
        }
    });
    for (r, yr) in yt.chunks_exact(n).enumerate() {
        for (i, &v) in yr.iter().enumerate() {
            ys[i * rows + r] = v;
        }
    }
    Ok(())
}

/// Outputs at least this large are written with streaming stores: they would not stay in the cache
/// anyway (32 MiB of L3 on the machine the figures in BENCHMARKS.md come from), and streaming skips
/// reading each line before overwriting it.
const STREAM_BYTES: usize = 16 << 20;

/// Dense row-major f32 copy of `w` (`out`: rows * cols), bit-identical to the reference decode.
pub fn decompress_f32(w: &Tensor, out: &mut [f32]) -> Result<()> {
    decompress_f32_with(Simd::detect()?, w, out)
}

/// [`decompress_f32`] on the given SIMD path.
pub fn decompress_f32_with(simd: Simd, w: &Tensor, out: &mut [f32]) -> Result<()> {
    let cols = w.shape()[1];
    decompress_into(simd, w, out, |k, r0, out, stream| {
        // SAFETY: as in `spmv_with`.
        unsafe { (k.decode_rows)(w, r0, out, cols, stream) }
    })
}

/// Dense row-major f16 copy of `w`: each reference-decoded value rounded to the nearest f16.
pub fn decompress_f16(w: &Tensor, out: &mut [f16]) -> Result<()> {
    decompress_f16_with(Simd::detect()?, w, out)
}

/// [`decompress_f16`] on the given SIMD path.
pub fn decompress_f16_with(simd: Simd, w: &Tensor, out: &mut [f16]) -> Result<()> {
    decompress_into(simd, w, out, |k, r0, out, stream| {
        // SAFETY: as in `spmv_with`.
        unsafe { (k.decode_rows_f16)(w, r0, out, stream) }
    })
}

/// The shape checks and the row split shared by both decompressions: `decode(kernels, first_row,
/// rows_out, stream)` fills whole rows of `out`.
fn decompress_into<T: Send>(
    simd: Simd,
    w: &Tensor,
    out: &mut [T],
    decode: impl Fn(&Kernels, usize, &mut [T], bool) + Sync,
) -> Result<()> {
    let [rows, cols] = w.shape();
    expect_len(
        "out",
        out.len(),
        rows * cols,
        "rows * cols values",
        rows,
        cols,
    )?;
    let k = simd.kernels()?;
    check_tensor(w)?;
    if cols == 0 {
        return Ok(());
    }
    let stream = std::mem::size_of_val(out) >= STREAM_BYTES;
    for_row_runs(out, cols, rows, cols, |r0, out| decode(k, r0, out, stream));
    Ok(())
}

/// Dense y = W x for a row-major f32 matrix `w` [rows, cols]: the baseline the compressed kernels are
/// measured against.
pub fn gemv_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) -> Result<()> {
    gemv_f32_with(Simd::detect()?, w, rows, cols, x, y)
}

/// [`gemv_f32`] on the given SIMD path.
pub fn gemv_f32_with(
    simd: Simd,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    let size = rows
        .checked_mul(cols)
        .ok_or_else(|| overflow("W", rows, cols))?;
    expect_len("W", w.len(), size, "rows * cols values", rows, cols)?;
    expect_len("x", x.len(), cols, "one per input column of W", rows, cols)?;
    expect_len("y", y.len(), rows, "one per output row of W", rows, cols)?;
    let k = simd.kernels()?;
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let x = padded(x, 1, cols);
    for_row_runs(y, 1, rows, cols, |r0, y| {
        // SAFETY: as in `spmv_with`.
        unsafe { (k.gemv_rows)(&w[r0 * cols..], cols, x.f32(), y) }
    });
    Ok(())
}

fn expect_len(
    what: &str,
    got: usize,
    want: usize,
    meaning: &str,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(CpuError::Shape(format!(
        "{what} has {got} values, but W is [{rows}, {cols}] and needs {want} ({meaning})"
    )))
}

fn overflow(what: &str, a: usize, b: usize) -> CpuError {
    CpuError::Shape(format!(
        "{what} would hold {a} x {b} values, more than memory can address"
    ))
}

/// Zeroed memory that starts on a 64-byte cache line. Vector loads at multiples of 32 bytes from it
/// never straddle two lines; a split load costs about two, and callers' vectors are usually only
/// 16-byte aligned.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

pub(crate) struct Lines(Vec<Line>);

impl Lines {
    pub(crate) fn zeroed(bytes: usize) -> Self {
        Lines(vec![Line([0; 64]); bytes.div_ceil(64)])
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }

    pub(crate) fn f32(&self) -> &[f32] {
        bytemuck::cast_slice(&self.0)
    }

    pub(crate) fn f32_mut(&mut self) -> &mut [f32] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// `n` vectors of `cols` values, each copied to a line-aligned run of `cols` rounded up to a
/// multiple of 64 and zero-filled after it: every kernel reads whole blocks.
fn padded(xs: &[f32], n: usize, cols: usize) -> Lines {
    let pc = cols.next_multiple_of(BLOCK);
    let mut lines = Lines::zeroed(n * pc * 4);
    for (dst, src) in lines
        .f32_mut()
        .chunks_exact_mut(pc)
        .zip(xs.chunks_exact(cols))
    {
        dst[..cols].copy_from_slice(src);
    }
    lines
}

/// Checks that the planes have the lengths the shape implies: the SIMD kernels index them without
/// further checks. (Contents, such as a mask keeping too many weights, give wrong values at worst.)
fn check_tensor(w: &Tensor) -> Result<()> {
    let [rows, cols] = w.shape();
    let fits =
        |got: usize, per_row: Option<usize>| per_row.and_then(|p| p.checked_mul(rows)) == Some(got);
    let ok = match w {
        Tensor::Sparse(m) => {
            sparse::check_group(m.group).is_ok() && {
                let nb = m.blocks_per_row();
                fits(m.masks.len(), Some(nb))
                    && fits(m.codes.len(), nb.checked_mul(BLOCK_CODE_BYTES))
                    && fits(m.scales.len(), Some(m.groups_per_row()))
            }
        }
        Tensor::F32(m) => fits(m.values.len(), Some(cols)),
        Tensor::F16(m) => fits(m.values.len(), Some(cols)),
        Tensor::Q3(m) => {
            Q3Matrix::check_group(m.group).is_ok() && {
                let padded = Q3Matrix::padded_cols(cols, m.group);
                fits(m.codes.len(), Some(Q3Matrix::row_bytes(cols, m.group)))
                    && fits(m.scales.len(), Some(padded / m.group))
            }
        }
        Tensor::Q4(m) => {
            Q4Matrix::check_group(m.group).is_ok() && {
                let padded = Q4Matrix::padded_cols(cols, m.group);
                fits(m.codes.len(), Some(padded / 2))
                    && fits(m.scales.len(), Some(padded / m.group))
            }
        }
    };
    if ok {
        return Ok(());
    }
    let detail = match w.validate() {
        Err((plane, msg)) => format!("plane '{plane}' {msg}"),
        Ok(()) => format!("{:?} [{rows}, {cols}]", w.codec()),
    };
    Err(CpuError::Tensor(detail))
}

/// Weights per rayon task: large enough that scheduling (about a microsecond) is noise.
const TASK_WEIGHTS: usize = 1 << 18;
/// Below this many weights a call runs on the calling thread.
const SERIAL_WEIGHTS: usize = 1 << 15;

/// Calls `f(r0, out_run)` on runs of consecutive rows across the rayon pool; `out` holds `per_row`
/// values per row, `work_per_row` sizes the runs. Runs are capped so every thread gets about four.
fn for_row_runs<T: Send>(
    out: &mut [T],
    per_row: usize,
    rows: usize,
    work_per_row: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if rows == 0 || per_row == 0 {
        return;
    }
    let work_per_row = work_per_row.max(1);
    if rows.saturating_mul(work_per_row) <= SERIAL_WEIGHTS {
        return f(0, out);
    }
    let by_size = (TASK_WEIGHTS / work_per_row).max(1);
    let by_balance = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let run = by_size.min(by_balance);
    out.par_chunks_mut(run * per_row)
        .enumerate()
        .for_each(|(i, chunk)| f(i * run, chunk));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Dense, SparseMatrix};
    use crate::rng::{test_seed, Rng};

    /// The streaming-store path of the decoders (taken only for outputs of 16 MiB and more by the
    /// public functions) against the reference decode, on small shapes, at both alignments a row
    /// can start at.
    #[test]
    fn streaming_decoders_match_the_reference() {
        let mut rng = Rng::new(test_seed("streaming_decoders"));
        for (rows, cols) in [(5, 200), (4, 64), (3, 100)] {
            let w = rng.normal_vec(rows * cols, 0.02);
            let d = Dense::f32(rows, cols, &w).unwrap();
            let t = Tensor::Sparse(SparseMatrix::encode(&d, 128, None).unwrap());
            let want = reference::decompress_f32(&t);
            for simd in Simd::available() {
                let k = simd.kernels().unwrap();
                for shift in 0..2 {
                    let mut out = Lines::zeroed((rows * cols + 4) * 4);
                    let out = &mut out.f32_mut()[4 * shift..][..rows * cols];
                    out.fill(f32::NAN);
                    // SAFETY: the kernels come from `Simd::kernels`.
                    unsafe { (k.decode_rows)(&t, 0, out, cols, true) };
                    assert!(out
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                    let mut out16 = vec![f16::NAN; rows * cols + 8];
                    let out16 = &mut out16[shift * 4..][..rows * cols];
                    unsafe { (k.decode_rows_f16)(&t, 0, out16, true) };
                    let want16 = want.iter().map(|&v| f16::from_f32(v).to_bits());
                    assert!(out16.iter().map(|h| h.to_bits()).eq(want16), "{simd:?}");
                }
            }
        }
    }
}
