//! Device matrices: a `format::Tensor`'s planes in storage buffers, in row chunks that each fit one
//! storage binding.
//!
//! Dense codecs keep their file layout, rows zero-padded to a multiple of 8 columns (f16, f32) so that
//! a lane reads 16 bytes at a time. The sparse codec is re-laid out at upload (see spmv.wgsl for the
//! layout and why): rows in tiles of 32 interleaved block by block, each block mask rotated so that its
//! two 32-bit halves keep 16 weights each, codes in the order the kernel walks them, one rotation byte
//! per block. That is 26 bytes per 64 weights instead of the file's 25. The q3 codec's bit planes are
//! re-laid out too, at the same size (see gemv_q3.wgsl and [`q3_run_words`]): whole codes in a word, so
//! that a weight decodes with one mask instead of three bit extractions.

use half::f16;
use rayon::prelude::*;

use super::context::Gpu;
use super::error::{GpuError, Result};
use crate::format::dense::Q3_RUN_BYTES;
use crate::format::sparse::{nibble, BLOCK, BLOCK_CODE_BYTES, KEEP};
use crate::format::{sparse, Codec, MatrixSpec, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};

/// Rows per tile of the sparse GPU layout (a warp's worth of rows at one block).
pub(crate) const TILE_ROWS: usize = 32;

/// Rows of a gemv_q4 workgroup: 8 teams of 32 lanes, 8 rows a team (the `ROWS` of gemv_q4.wgsl).
pub(crate) const Q4_WORKGROUP_ROWS: usize = 64;

/// gemv_q4's QUADS: 16-byte code chunks per row that a lane loads per step of its main loop, on top of
/// the 8 rows that each step already covers. On an H100 at 100352 x 5120, 1: 138.4 us, 2: 141.7 us.
pub(crate) const Q4_QUADS: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Sparse {
        blocks: usize,
        groups: usize,
        group_blocks: usize,
    },
    /// Dense f16 or f32, `stride` values per row (cols rounded up to 8).
    F16 {
        stride: usize,
    },
    F32 {
        stride: usize,
    },
    Q4 {
        group: usize,
        /// vec4<u32> (32 columns) per row.
        n32: usize,
        /// u32 scale words (f16 pairs) per row.
        ns2: usize,
    },
    Q3 {
        group: usize,
        /// Runs of 32 columns per row on the device: ceil(cols / 32), padding runs dropped.
        n32: usize,
        /// u32 scale words (f16 pairs) per row.
        ns2: usize,
    },
}

/// Rows `row0 .. row0 + rows` of a matrix: one buffer per plane, and the kernel parameters of a
/// matrix-vector product over them.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub row0: usize,
    pub rows: usize,
    pub planes: Vec<wgpu::Buffer>,
    pub params: wgpu::Buffer,
}

/// A weight matrix on the device.
#[derive(Debug)]
pub struct GpuMatrix {
    pub codec: Codec,
    pub rows: usize,
    pub cols: usize,
    pub(crate) layout: Layout,
    pub(crate) chunks: Vec<Chunk>,
    /// Rows in SwiGLU pairs order ([`Gpu::upload_gate_up`]): device row 32 t + j is gate row 16 t + j
    /// and 32 t + 16 + j its up row, so that spmv's epilogue finds both in one tile.
    pub(crate) swiglu_pairs: bool,
}

/// Element type of a dense device matrix (the output of decompress).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseKind {
    F16,
    F32,
}

impl GpuMatrix {
    /// Whether the rows are in SwiGLU pairs order (see [`Gpu::upload_gate_up`]): products give their
    /// outputs in that order, and [`Gpu::matvec_swiglu`] takes the matrix.
    pub fn swiglu_pairs(&self) -> bool {
        self.swiglu_pairs
    }

    /// Number of row chunks (separate bindings and launches).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Bytes of all device buffers.
    pub fn device_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .flat_map(|c| &c.planes)
            .map(|b| b.size())
            .sum()
    }
}

/// Columns of a dense row on the device.
pub(crate) fn dense_stride(cols: usize) -> usize {
    cols.div_ceil(8).max(1) * 8
}

/// The sparse GPU layout of rows `row0 .. row0 + rows` (rows rounded up to whole tiles).
pub(crate) struct SparsePlanes {
    pub masks: Vec<u32>,
    pub codes: Vec<u32>,
    pub rots: Vec<u8>,
    pub scales: Vec<u16>,
}

/// One block in the GPU layout: rotated mask halves, codes in walk order, rotation.
fn gpu_block(m: &SparseMatrix, row: usize, b: usize) -> Result<([u32; 2], [u32; 4], u8)> {
    let nb = m.blocks_per_row();
    let mut mask = m.masks[row * nb + b];
    let codes = &m.codes[(row * nb + b) * BLOCK_CODE_BYTES..][..BLOCK_CODE_BYTES];
    let real = (m.cols - b * BLOCK).min(BLOCK);
    let kept = mask.count_ones() as usize;
    // Every walk takes exactly 32 steps: a block with fewer kept weights is topped up with weights in
    // its padding columns, whose x entries are zero. Only a full block with fewer than 32 cannot be.
    if kept + (BLOCK - real) < KEEP {
        return Err(GpuError::Layout(format!(
            "row {row}, block {b} keeps {kept} weights of {real} columns; the GPU kernels need {KEEP} in every full block (as upg's encoder writes): re-encode the tensor"
        )));
    }
    let mut col = BLOCK;
    while (mask.count_ones() as usize) < KEEP {
        col -= 1;
        mask |= 1 << col;
    }
    // The rank of a column among kept columns is its code index; top-up weights get code 0.
    let code_of = |c: usize| -> u32 {
        let k = (mask & ((1u64 << c) - 1)).count_ones() as usize;
        if k < kept {
            nibble(codes, k) as u32
        } else {
            0
        }
    };
    // A rotation with 16 kept in each half exists: the count in the window [r, r + 32) moves by at most
    // one per step of r and the windows at r and r + 32 are complements.
    let rot = (0..32)
        .find(|&r| (mask.rotate_right(r) as u32).count_ones() == 16)
        .ok_or_else(|| GpuError::Layout(format!("row {row}, block {b}: no balanced rotation")))?;
    let rm = mask.rotate_right(rot);
    let halves = [rm as u32, (rm >> 32) as u32];
    let mut words = [0u32; 4];
    for (h, &half) in halves.iter().enumerate() {
        for (step, q) in (0..32).rev().filter(|q| half >> q & 1 == 1).enumerate() {
            let c = (rot as usize + 32 * h + q) % BLOCK;
            let nib = (step % 8) / 2 + 4 * (step % 2);
            words[2 * h + step / 8] |= code_of(c) << (4 * nib);
        }
    }
    Ok((halves, words, rot as u8))
}

/// Device row `r` of a gate_up matrix of `rows` rows in SwiGLU pairs order: its row in the file.
fn pairs_source(r: usize, rows: usize) -> usize {
    let (t, j) = (r / TILE_ROWS, r % TILE_ROWS);
    let half = TILE_ROWS / 2;
    if j < half {
        t * half + j
    } else {
        rows / 2 + t * half + j - half
    }
}

/// The sparse GPU layout of device rows `row0 .. row0 + rows`, device row r holding file row
/// `source(r)`.
pub(crate) fn sparse_planes(
    m: &SparseMatrix,
    row0: usize,
    rows: usize,
    source: impl Fn(usize) -> usize + Sync,
) -> Result<SparsePlanes> {
    let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
    let tiles = rows.div_ceil(TILE_ROWS);
    let recs = tiles * nb * TILE_ROWS;
    let mut p = SparsePlanes {
        masks: vec![0; 2 * recs],
        codes: vec![0; 4 * recs],
        rots: vec![0; recs.div_ceil(4) * 4],
        scales: vec![0; (tiles * ng * TILE_ROWS).div_ceil(2) * 2],
    };
    let per_tile = nb * TILE_ROWS;
    p.masks
        .par_chunks_mut(2 * per_tile.max(1))
        .zip(p.codes.par_chunks_mut(4 * per_tile.max(1)))
        .zip(p.rots.par_chunks_mut(per_tile.max(1)))
        .enumerate()
        .try_for_each(|(t, ((masks, codes), rots))| {
            for b in 0..nb {
                for l in 0..TILE_ROWS {
                    let i = b * TILE_ROWS + l;
                    let r = t * TILE_ROWS + l;
                    // Rows past the end walk a harmless full pattern; their sums are never stored.
                    let (h, w, rot) = if r < rows {
                        gpu_block(m, source(row0 + r), b)?
                    } else {
                        ([0xFFFF, 0xFFFF], [0; 4], 0)
                    };
                    masks[2 * i..2 * i + 2].copy_from_slice(&h);
                    codes[4 * i..4 * i + 4].copy_from_slice(&w);
                    rots[i] = rot;
                }
            }
            Ok::<(), GpuError>(())
        })?;
    for t in 0..tiles {
        for g in 0..ng {
            for l in 0..TILE_ROWS {
                let r = t * TILE_ROWS + l;
                if r < rows {
                    p.scales[(t * ng + g) * TILE_ROWS + l] =
                        m.scales[source(row0 + r) * ng + g].to_bits();
                }
            }
        }
    }
    Ok(p)
}

/// One 32-column run of q3 codes, the file's three bit planes (word b = bit b of every code), as the
/// three words gemv_q3.wgsl and embed.wgsl read.
pub(crate) fn q3_run_words(run: &[u8]) -> [u32; 3] {
    let plane =
        |b: usize| u32::from_le_bytes([run[4 * b], run[4 * b + 1], run[4 * b + 2], run[4 * b + 3]]);
    let planes = [plane(0), plane(1), plane(2)];
    let code = |i: usize| (0..3).fold(0, |c, b| c | ((planes[b] >> i) & 1) << b);
    let mut words = [0u32; 3];
    for (t, word) in words.iter_mut().enumerate() {
        // Column 10 t + j at bits 1 + 3 j.
        for j in 0..10 {
            *word |= code(10 * t + j) << (1 + 3 * j);
        }
        // Bit t of columns 30 and 31 is bit 30 and 31 of plane t.
        *word |= (planes[t] >> 30) & 1 | (planes[t] >> 31) << 31;
    }
    words
}

/// Row counts of the chunks when a row costs `row_bytes` in the largest plane and chunks must hold a
/// multiple of `multiple` rows.
fn plan(gpu: &Gpu, rows: usize, row_bytes: usize, multiple: usize) -> Result<Vec<(usize, usize)>> {
    let max = gpu.limits().max_binding_bytes;
    let fit = (max / row_bytes.max(1) as u64) as usize / multiple * multiple;
    if fit == 0 {
        return Err(GpuError::Layout(format!(
            "{multiple} rows of {row_bytes} bytes exceed the device's largest storage binding ({max} bytes)"
        )));
    }
    let mut out = Vec::new();
    let mut row0 = 0;
    while row0 < rows || out.is_empty() {
        let n = fit.min(rows - row0);
        out.push((row0, n));
        row0 += n;
        if n == 0 {
            break;
        }
    }
    Ok(out)
}

/// Size of a buffer made by [`Gpu::buffer_with`] from `len` bytes.
fn stored(len: usize) -> u64 {
    (len.max(4).div_ceil(4) * 4) as u64
}

impl Gpu {
    /// Rows of each binding chunk the upload cuts a sparse matrix of `spec`'s shape into.
    pub(crate) fn sparse_chunk_rows(&self, spec: &MatrixSpec) -> Result<Vec<usize>> {
        let nb = sparse::blocks_per_row(spec.cols);
        Ok(plan(self, spec.rows, nb * 16, TILE_ROWS)?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }

    /// Bytes of device buffers that [`Gpu::upload`] makes for a matrix of `spec`, chunk by chunk as
    /// it lays them out, without making any; fails where the upload would fail for its shape or
    /// codec. This is how a model's fit is known before anything is uploaded.
    pub fn matrix_device_bytes(&self, spec: &MatrixSpec) -> Result<u64> {
        let (rows, cols) = (spec.rows, spec.cols);
        let group = spec.group.unwrap_or(0);
        let mut total = 0;
        match spec.codec {
            Codec::Q3 => {
                let padded = Q3Matrix::padded_cols(cols, group.max(1));
                let ng = padded / group.max(1);
                let (n32, ns2) = (cols.div_ceil(32), ng.div_ceil(2));
                for (_, n) in plan(self, rows, (3 * n32 * 4).max(ns2 * 4), 1)? {
                    total += (n * 3 * n32 * 4).max(4) as u64 + (n * ns2 * 4).max(4) as u64;
                }
            }
            Codec::Sparse => {
                let nb = sparse::blocks_per_row(cols);
                let ng = sparse::groups_per_row(cols, group.max(1));
                for (_, n) in plan(self, rows, nb * 16, TILE_ROWS)? {
                    // As `sparse_planes` sizes them.
                    let tiles = n.div_ceil(TILE_ROWS);
                    let recs = tiles * nb * TILE_ROWS;
                    total += stored(2 * recs * 4)
                        + stored(4 * recs * 4)
                        + stored(recs.div_ceil(4) * 4)
                        + stored((tiles * ng * TILE_ROWS).div_ceil(2) * 2 * 2);
                }
            }
            Codec::F16 | Codec::F32 => {
                let elem = if spec.codec == Codec::F16 { 2 } else { 4 };
                let stride = dense_stride(cols);
                for (_, n) in plan(self, rows, stride * elem, 1)? {
                    total += (n * stride * elem).max(16) as u64;
                }
            }
            Codec::Q4 => {
                let padded = Q4Matrix::padded_cols(cols, group.max(1));
                let (row_bytes, ng) = (padded / 2, padded / group.max(1));
                let ns2 = ng.div_ceil(2);
                for (_, n) in plan(self, rows, row_bytes.max(ns2 * 4), 1)? {
                    total += stored(n * row_bytes) + (n * ns2 * 4).max(4) as u64;
                }
            }
        }
        Ok(total)
    }

    /// A chunk of q4 or q3 rows row0 .. row0 + n: its code and scale planes and the parameters its
    /// gemv launch reads (rows, 32-column runs and scale pairs a row, first row, workgroups).
    #[allow(clippy::too_many_arguments)]
    fn code_chunk(
        &self,
        row0: usize,
        n: usize,
        n32: usize,
        ns2: usize,
        groups: usize,
        codes: wgpu::Buffer,
        scales: wgpu::Buffer,
    ) -> Result<Chunk> {
        let params = self.uniform(&[
            n as u32,
            n32 as u32,
            ns2 as u32,
            row0 as u32,
            groups as u32,
            0,
            0,
            0,
        ])?;
        Ok(Chunk {
            row0,
            rows: n,
            planes: vec![codes, scales],
            params,
        })
    }

    /// Rows row0 .. row0 + n of a dense codec's f16 scales (`ng` a row), each row padded to an even
    /// count so that a row starts a u32 (the layout gemv_q4.wgsl and gemv_q3.wgsl read).
    fn dense_scales(
        &self,
        label: &str,
        scales: &[half::f16],
        ng: usize,
        row0: usize,
        n: usize,
    ) -> Result<wgpu::Buffer> {
        let ns2 = ng.div_ceil(2);
        self.buffer_filled(
            label,
            (n * ns2 * 4).max(4) as u64,
            wgpu::BufferUsages::STORAGE,
            |dst| {
                let dst: &mut [u16] = bytemuck::cast_slice_mut(dst);
                for r in 0..n {
                    for (o, s) in dst[r * 2 * ns2..][..ng]
                        .iter_mut()
                        .zip(&scales[(row0 + r) * ng..][..ng])
                    {
                        *o = s.to_bits();
                    }
                }
            },
        )
    }

    /// Uploads a tensor in any codec.
    pub fn upload(&self, w: &Tensor) -> Result<GpuMatrix> {
        self.upload_rows(w, false)
    }

    /// Uploads gate_up_proj ([2 I, cols]: I gate rows, then I up rows) for spmv's SwiGLU epilogue:
    /// in SwiGLU pairs order (see [`GpuMatrix::swiglu_pairs`]) where the codec is sparse and I a
    /// multiple of 16, else as [`Gpu::upload`] does.
    pub fn upload_gate_up(&self, w: &Tensor) -> Result<GpuMatrix> {
        let pairs = matches!(w, Tensor::Sparse(_)) && w.shape()[0].is_multiple_of(TILE_ROWS);
        self.upload_rows(w, pairs)
    }

    fn upload_rows(&self, w: &Tensor, pairs: bool) -> Result<GpuMatrix> {
        if let Err((plane, msg)) = w.validate() {
            return Err(GpuError::Layout(format!("plane '{plane}' {msg}")));
        }
        let [rows, cols] = w.shape();
        let storage = wgpu::BufferUsages::STORAGE;
        let (layout, chunks) = match w {
            Tensor::Q3(q) => {
                let padded = Q3Matrix::padded_cols(cols, q.group);
                let (file_row, ng) = (Q3Matrix::row_bytes(cols, q.group), padded / q.group);
                let (n32, ns2) = (cols.div_ceil(32), ng.div_ceil(2));
                let mut chunks = Vec::new();
                for (row0, n) in plan(self, rows, (3 * n32 * 4).max(ns2 * 4), 1)? {
                    let codes = self.buffer_filled(
                        "q3 codes",
                        (n * 3 * n32 * 4).max(4) as u64,
                        storage,
                        |dst| {
                            let dst: &mut [u32] = bytemuck::cast_slice_mut(dst);
                            if n32 == 0 {
                                return;
                            }
                            dst.par_chunks_mut(3 * n32)
                                .take(n)
                                .enumerate()
                                .for_each(|(r, out)| {
                                    let src = &q.codes[(row0 + r) * file_row..][..file_row];
                                    for (k, run) in
                                        src.chunks_exact(Q3_RUN_BYTES).take(n32).enumerate()
                                    {
                                        for (t, w) in q3_run_words(run).into_iter().enumerate() {
                                            out[t * n32 + k] = w;
                                        }
                                    }
                                });
                        },
                    )?;
                    let scales = self.dense_scales("q3 scales", &q.scales, ng, row0, n)?;
                    let groups = n.div_ceil(8 * self.q3_rows());
                    chunks.push(self.code_chunk(row0, n, n32, ns2, groups, codes, scales)?);
                }
                (
                    Layout::Q3 {
                        group: q.group,
                        n32,
                        ns2,
                    },
                    chunks,
                )
            }
            Tensor::Sparse(m) => {
                let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
                let layout = Layout::Sparse {
                    blocks: nb,
                    groups: ng,
                    group_blocks: m.group / BLOCK,
                };
                let mut chunks = Vec::new();
                for (row0, n) in plan(self, rows, nb * 16, TILE_ROWS)? {
                    let p = if pairs {
                        sparse_planes(m, row0, n, |r| pairs_source(r, rows))?
                    } else {
                        sparse_planes(m, row0, n, |r| r)?
                    };
                    let planes = vec![
                        self.buffer_with("masks", bytemuck::cast_slice(&p.masks), storage)?,
                        self.buffer_with("codes", bytemuck::cast_slice(&p.codes), storage)?,
                        self.buffer_with("rots", &p.rots, storage)?,
                        self.buffer_with("scales", bytemuck::cast_slice(&p.scales), storage)?,
                    ];
                    let tiles = n.div_ceil(TILE_ROWS) as u32;
                    let params = self.uniform(&[
                        n as u32,
                        nb as u32,
                        ng as u32,
                        row0 as u32,
                        tiles,
                        cols as u32,
                        rows as u32,
                        0,
                    ])?;
                    chunks.push(Chunk {
                        row0,
                        rows: n,
                        planes,
                        params,
                    });
                }
                (layout, chunks)
            }
            Tensor::F16(d) => {
                let stride = dense_stride(cols);
                let mut chunks = Vec::new();
                for (row0, n) in plan(self, rows, stride * 2, 1)? {
                    let buf = self.buffer_filled(
                        "f16 weights",
                        (n * stride * 2).max(16) as u64,
                        storage,
                        |dst| {
                            let dst: &mut [u16] = bytemuck::cast_slice_mut(dst);
                            for r in 0..n {
                                for (o, v) in dst[r * stride..][..cols]
                                    .iter_mut()
                                    .zip(&d.values[(row0 + r) * cols..][..cols])
                                {
                                    *o = v.to_bits();
                                }
                            }
                        },
                    )?;
                    chunks.push(self.dense_chunk(row0, n, stride / 8, buf)?);
                }
                (Layout::F16 { stride }, chunks)
            }
            Tensor::F32(d) => {
                let stride = dense_stride(cols);
                let mut chunks = Vec::new();
                for (row0, n) in plan(self, rows, stride * 4, 1)? {
                    let buf = self.buffer_filled(
                        "f32 weights",
                        (n * stride * 4).max(16) as u64,
                        storage,
                        |dst| {
                            let dst: &mut [f32] = bytemuck::cast_slice_mut(dst);
                            for r in 0..n {
                                dst[r * stride..][..cols]
                                    .copy_from_slice(&d.values[(row0 + r) * cols..][..cols]);
                            }
                        },
                    )?;
                    chunks.push(self.dense_chunk(row0, n, stride / 4, buf)?);
                }
                (Layout::F32 { stride }, chunks)
            }
            Tensor::Q4(q) => {
                let padded = Q4Matrix::padded_cols(cols, q.group);
                let (row_bytes, ng) = (padded / 2, padded / q.group);
                let (n32, ns2) = (padded / 32, ng.div_ceil(2));
                let mut chunks = Vec::new();
                for (row0, n) in plan(self, rows, row_bytes.max(ns2 * 4), 1)? {
                    let codes = self.buffer_with(
                        "q4 codes",
                        &q.codes[row0 * row_bytes..(row0 + n) * row_bytes],
                        storage,
                    )?;
                    let scales = self.dense_scales("q4 scales", &q.scales, ng, row0, n)?;
                    let groups = n.div_ceil(Q4_WORKGROUP_ROWS);
                    chunks.push(self.code_chunk(row0, n, n32, ns2, groups, codes, scales)?);
                }
                (
                    Layout::Q4 {
                        group: q.group,
                        n32,
                        ns2,
                    },
                    chunks,
                )
            }
        };
        Ok(GpuMatrix {
            codec: w.codec(),
            rows,
            cols,
            layout,
            chunks,
            swiglu_pairs: pairs,
        })
    }

    fn dense_chunk(
        &self,
        row0: usize,
        rows: usize,
        vec4s: usize,
        buf: wgpu::Buffer,
    ) -> Result<Chunk> {
        let groups = rows.div_ceil(8) as u32;
        let params = self.uniform(&[rows as u32, vec4s as u32, row0 as u32, groups])?;
        Ok(Chunk {
            row0,
            rows,
            planes: vec![buf],
            params,
        })
    }

    /// A dense matrix of zeros on the device, for [`Gpu::decompress`] to write.
    pub fn dense_zeros(&self, rows: usize, cols: usize, kind: DenseKind) -> Result<GpuMatrix> {
        let stride = dense_stride(cols);
        let (elem, layout, codec) = match kind {
            DenseKind::F16 => (2, Layout::F16 { stride }, Codec::F16),
            DenseKind::F32 => (4, Layout::F32 { stride }, Codec::F32),
        };
        let mut chunks = Vec::new();
        for (row0, n) in plan(self, rows, stride * elem, 1)? {
            let size = (n * stride * elem).max(16) as u64;
            let buf =
                self.buffer_filled("dense matrix", size, wgpu::BufferUsages::STORAGE, |_| {})?;
            chunks.push(self.dense_chunk(row0, n, stride * elem / 16, buf)?);
        }
        Ok(GpuMatrix {
            codec,
            rows,
            cols,
            layout,
            chunks,
            swiglu_pairs: false,
        })
    }

    /// Fills every value of a dense matrix (padding included) with NaN: tests poison outputs with it.
    pub fn poison(&self, m: &GpuMatrix) -> Result<()> {
        let word = match m.layout {
            Layout::F16 { .. } => 0x7E00_7E00u32,
            Layout::F32 { .. } => f32::NAN.to_bits(),
            _ => {
                return Err(GpuError::Shape(
                    "only dense matrices can be poisoned".into(),
                ))
            }
        };
        for c in &m.chunks {
            let data = vec![word; (c.planes[0].size() / 4) as usize];
            self.queue
                .write_buffer(&c.planes[0], 0, bytemuck::cast_slice(&data));
        }
        Ok(())
    }

    /// Reads a dense matrix back as f32 (f16 values convert exactly), row-major [rows, cols].
    pub fn read_dense(&self, m: &GpuMatrix) -> Result<Vec<f32>> {
        let (stride, elem) = match m.layout {
            Layout::F16 { stride } => (stride, 2),
            Layout::F32 { stride } => (stride, 4),
            _ => {
                return Err(GpuError::Shape(
                    "read_dense reads f16 and f32 matrices".into(),
                ))
            }
        };
        let mut out = Vec::with_capacity(m.rows * m.cols);
        for c in &m.chunks {
            let bytes = self.read_bytes(
                &c.planes[0],
                0,
                (c.rows * stride * elem).div_ceil(4) as u64 * 4,
            )?;
            for r in 0..c.rows {
                let row = &bytes[r * stride * elem..][..m.cols * elem];
                if elem == 2 {
                    out.extend(
                        row.chunks_exact(2)
                            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
                    );
                } else {
                    out.extend(
                        row.chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                }
            }
        }
        Ok(out)
    }
}
