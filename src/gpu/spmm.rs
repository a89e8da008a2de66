//! The batched product of prefill: y[t] = W x[t] for n rows of x at once. Sparse matrices go to the
//! matrix units (wgsl/spmm_coop.wgsl) where the device has cooperative matrices, everything else to
//! f32 FMA tiles (wgsl/spmm.wgsl), any codec.

use super::buffers::GpuVector;
use super::context::Gpu;
use super::error::{GpuError, Result};
use super::kernels::split_scratch_len;
use super::matrix::{GpuMatrix, Layout, TILE_ROWS};
use super::shader::Kernel;
use crate::format::{Codec, MatrixSpec};

/// Rows of W and of x per workgroup (spmm.wgsl's BM and BN).
const ROW_TILE: usize = 128;
const BATCH_TILE: usize = 128;
/// Workgroup memory of spmm.wgsl: the W tile and the x tile, 16 KiB each.
const TILE_BYTES: u32 = 32 << 10;
/// spmm_coop.wgsl splits the columns in two for products of fewer workgroups (row groups x token
/// tiles) than this, twice an H100's 132 SMs (the adapter does not say how many it has), and rows of
/// at least `COOP_SPLIT_BLOCKS` blocks. H100, n = 512: 5120 x 17920 (280 blocks) 2177 -> 1651 us;
/// 5120 x 5120 (80) 582 -> 748 us, so shorter rows stay whole.
const COOP_SPLIT_BELOW: usize = 264;
const COOP_SPLIT_BLOCKS: usize = 160;
/// spmm_coop.wgsl: 128 rows of W by 128 tokens a workgroup (46 KiB of workgroup memory). Its BN = 64
/// (a bench and test knob) gives twice the workgroups, which would fill an H100's 132 SMs better at
/// 5120 rows, but it decodes each block for half the tokens: slower at every Phi-4 shape (H100, n =
/// 512: 7680 x 5120 855 vs 620 us, 5120 x 5120 607 vs 578, 5120 x 17920 2441 vs 2170).
const COOP_BATCH_TILE: usize = 128;
const COOP_TILE_BYTES: u32 = 47104;

fn word(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        GpuError::Shape(format!(
            "{what} ({v}) does not fit a 32-bit index: use smaller batches"
        ))
    })
}

/// How a batched product runs on the matrix units: tokens a workgroup, column parts, and the bytes of
/// its two scratch buffers (x in f16 parts; the second column part, 0 without a split).
#[derive(Clone, Copy)]
struct CoopPlan {
    tile: usize,
    split: usize,
    x_bytes: u64,
    part_bytes: u64,
}

impl Gpu {
    /// Whether the device runs [`Gpu::matmat`]: it needs 32 KiB of workgroup memory.
    pub fn has_batched_product(&self) -> bool {
        self.limits().max_workgroup_storage_bytes >= TILE_BYTES
    }

    /// y[t] = W x[t] for t < n (x: n rows of `w.cols` values, y: n rows of `w.rows`), or with `residual`
    /// y[t] = W x[t] + r[t] (`residual` may be y itself: y += W x). Any codec.
    pub fn matmat(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        w: &GpuMatrix,
        x: &GpuVector,
        y: &GpuVector,
        n: usize,
        residual: Option<&GpuVector>,
    ) -> Result<()> {
        if x.len != n * w.cols || y.len != n * w.rows {
            return Err(GpuError::Shape(format!(
                "W is [{}, {}] and n = {n}: x has {} entries (wanted {}) and y {} (wanted {})",
                w.rows,
                w.cols,
                x.len,
                n * w.cols,
                y.len,
                n * w.rows
            )));
        }
        if x.buffer == y.buffer {
            return Err(GpuError::Shape("x and y must be different buffers".into()));
        }
        let (mode, res) = match residual {
            None => (0.0, &self.dummy),
            Some(r) if r.buffer == y.buffer => (2.0, &self.dummy),
            Some(r) if r.len != y.len => {
                return Err(GpuError::Shape(format!(
                    "residual has {} entries, y {}",
                    r.len, y.len
                )))
            }
            Some(r) => (1.0, &r.buffer),
        };
        if n == 0 {
            return Ok(());
        }
        if !self.has_batched_product() {
            return Err(GpuError::Layout(format!(
                "the batched product needs {TILE_BYTES} bytes of workgroup memory, the device has {}: feed one position at a time",
                self.limits().max_workgroup_storage_bytes
            )));
        }
        word(n * w.cols.max(w.rows), "n x row length")?;
        let blocks = w.cols.div_ceil(64);
        let row_groups: usize = w.chunks.iter().map(|c| c.rows.div_ceil(ROW_TILE)).sum();
        let sparse = matches!(w.layout, Layout::Sparse { .. });
        let coop = self.coop_plan(sparse, w.rows, w.cols, row_groups, n)?;
        let (codec, a, b, group) = match w.layout {
            Layout::Sparse {
                groups,
                group_blocks,
                ..
            } => (0.0, 0, groups, ("GROUP_BLOCKS", group_blocks)),
            Layout::F32 { stride } => (1.0, stride, 0, ("GROUP_CHUNKS", 1)),
            Layout::F16 { stride } => (2.0, stride, 0, ("GROUP_CHUNKS", 1)),
            Layout::Q4 { group, n32, ns2 } => (3.0, n32, ns2, ("GROUP_CHUNKS", group / 32)),
            Layout::Q3 { .. } => {
                return Err(GpuError::Layout(
                    "no batched product for q3 matrices yet: feed one position at a time".into(),
                ))
            }
        };
        let ksplit = coop.map_or(1, |p| p.split);
        let (kernel, batch_tile, mut constants) = if let Some(p) = coop {
            (
                Kernel::SpmmCoop,
                p.tile,
                vec![
                    (group.0, group.1 as f64),
                    ("BN", p.tile as f64),
                    ("SPLIT", p.split as f64),
                ],
            )
        } else {
            (
                Kernel::Spmm,
                BATCH_TILE,
                vec![("CODEC", codec), (group.0, group.1 as f64)],
            )
        };
        constants.push(("RESIDUAL", mode));
        // Bench knob: spmm_coop's X_LO.
        for (name, v) in self.overrides.iter().filter(|o| kernel.declares(&o.0)) {
            if !constants.iter().any(|c| c.0 == name) {
                constants.push((name, *v));
            }
        }
        let (pipeline, layout) = self.pipeline(kernel, &constants)?;
        let split = match coop {
            Some(p) => Some(self.split_x(pass, x, p.x_bytes)?),
            None => None,
        };
        // spmm_coop's column part 1 (bound, unused, at its smallest without a split).
        let part = match coop {
            Some(p) => Some(self.kept(
                &self.coop_part,
                p.part_bytes.max(256),
                "the batched product's column part",
            )?),
            None => None,
        };
        for c in &w.chunks {
            if c.rows == 0 {
                continue;
            }
            let row_groups = c.rows.div_ceil(ROW_TILE);
            // Sparse chunks: `a` is the chunk's row tiles.
            let a = if codec == 0.0 {
                c.rows.div_ceil(TILE_ROWS)
            } else {
                a
            };
            let params = self.uniform(&[
                word(c.rows, "rows")?,
                word(w.cols, "cols")?,
                word(c.row0, "row0")?,
                word(w.rows, "rows")?,
                word(n, "n")?,
                word(row_groups, "row groups")?,
                word(blocks, "blocks")?,
                word(a, "row length")?,
                word(b, "scale words")?,
                0,
                0,
                0,
            ])?;
            let mut buffers: Vec<&wgpu::Buffer> = vec![&params];
            buffers.extend(
                c.planes
                    .iter()
                    .chain(std::iter::repeat(&self.dummy))
                    .take(4),
            );
            buffers.extend([split.as_ref().unwrap_or(&x.buffer), &y.buffer, res]);
            buffers.extend(part.as_ref());
            let bind = self.bind(&layout, &buffers)?;
            let groups = (row_groups * n.div_ceil(batch_tile) * ksplit) as u64;
            let (gx, gy) = self.grid(groups)?;
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        if let (2, Some(part)) = (ksplit, &part) {
            self.add(pass, &y.buffer, part, n * w.rows)?;
        }
        Ok(())
    }

    /// Whether and how [`Gpu::matmat`] runs a product of `rows` x `cols` over `n` rows of x (in
    /// `row_groups` groups of 128 rows, counted over its binding chunks) on the matrix units.
    fn coop_plan(
        &self,
        sparse: bool,
        rows: usize,
        cols: usize,
        row_groups: usize,
        n: usize,
    ) -> Result<Option<CoopPlan>> {
        // x in two f16 parts: 4 bytes a value, in one binding.
        let x_bytes = (4 * n * cols) as u64;
        if !(self.features().cooperative_matrix
            && sparse
            && self.limits().max_workgroup_storage_bytes >= COOP_TILE_BYTES
            && x_bytes <= self.limits().max_binding_bytes)
        {
            return Ok(None);
        }
        let tile = match self.knob("BN") {
            // Bench and test knob.
            Some(v) if v == 64.0 || v == 128.0 => v as usize,
            Some(v) => {
                return Err(GpuError::Shape(format!(
                    "override BN={v}: spmm_coop.wgsl takes 64 or 128 tokens a workgroup"
                )))
            }
            None => COOP_BATCH_TILE,
        };
        let blocks = cols.div_ceil(64);
        let mut split = match self.knob("SPLIT") {
            Some(v) if v == 1.0 || v == 2.0 => v as usize,
            Some(v) => {
                return Err(GpuError::Shape(format!(
                    "override SPLIT={v}: spmm_coop.wgsl takes 1 or 2 column parts"
                )))
            }
            None if row_groups * n.div_ceil(tile) < COOP_SPLIT_BELOW
                && blocks >= COOP_SPLIT_BLOCKS =>
            {
                2
            }
            None => 1,
        };
        let part_bytes = (4 * n * rows) as u64;
        if part_bytes > self.limits().max_binding_bytes {
            split = 1;
        }
        Ok(Some(CoopPlan {
            tile,
            split,
            x_bytes,
            part_bytes: if split == 2 { part_bytes } else { 0 },
        }))
    }

    /// Bytes of the scratch buffers the products of these matrices make, kept by the device from
    /// call to call: spmv's column-split sums (decode) and, with batches of `batch` > 1 rows on
    /// the matrix units, x in f16 parts and the second column part. What [`Gpu::scratch_bytes`] reports
    /// once they have all run (an upper bound where batches stay smaller than `batch`).
    pub fn scratch_estimate(&self, specs: &[MatrixSpec], batch: usize) -> Result<u64> {
        let (mut spmv, mut x, mut part) = (0, 0, 0);
        for spec in specs.iter().filter(|s| s.codec == Codec::Sparse) {
            let blocks = spec.cols.div_ceil(64);
            let parts = self.spmv_parts_of(spec.rows, blocks)?;
            if parts > 1 {
                let max = self.limits().max_binding_bytes;
                spmv = spmv.max(4 * split_scratch_len(parts * (spec.rows + 1), max) as u64);
            }
            if batch > 1 {
                let row_groups = self
                    .sparse_chunk_rows(spec)?
                    .iter()
                    .map(|r| r.div_ceil(ROW_TILE))
                    .sum();
                let plan = self.coop_plan(true, spec.rows, spec.cols, row_groups, batch)?;
                if let Some(p) = plan {
                    x = x.max(p.x_bytes);
                    part = part.max(p.part_bytes.max(256));
                }
            }
        }
        Ok(spmv + x + part)
    }

    /// Bytes of the scratch buffers made so far (see [`Gpu::scratch_estimate`]).
    pub fn scratch_bytes(&self) -> u64 {
        [&self.split_scratch, &self.split_x, &self.coop_part]
            .iter()
            .filter_map(|slot| slot.lock().ok()?.as_ref().map(|b| b.size()))
            .sum()
    }

    /// Records split_f16.wgsl: x into its two f16 parts in the kept buffer (grown to `bytes` when
    /// smaller), which it returns for spmm_coop.wgsl.
    fn split_x(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &GpuVector,
        bytes: u64,
    ) -> Result<wgpu::Buffer> {
        let buffer = self.kept(&self.split_x, bytes, "the batched product's x in f16 parts")?;
        let (pipeline, layout) = self.pipeline(Kernel::SplitF16, &[])?;
        let params = self.uniform(&[word(x.len, "x length")?, 0, 0, 0])?;
        let bind = self.bind(&layout, &[&params, &x.buffer, &buffer])?;
        let (gx, gy) = self.grid(x.len.div_ceil(256) as u64)?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use crate::gpu::gpu_or_skip;
    use crate::rng::{test_seed, Rng};

    /// split_f16.wgsl (which only the matrix-unit path runs, so no device without cooperative
    /// matrices would otherwise run it): hi is within one f16 step of x (WGSL lets the conversion
    /// round either way), and hi + lo is x within 2^-21 |x| plus half of f16's subnormal step.
    #[test]
    fn x_splits_into_two_f16_parts() {
        let Some(gpu) = gpu_or_skip(Default::default()) else {
            return;
        };
        if !gpu.features().f16 {
            println!("skipped: {} has no shader-f16", gpu.describe());
            return;
        }
        let mut rng = Rng::new(test_seed("x_splits_into_two_f16_parts"));
        let mut x = rng.normal_vec(1000, 3.0);
        x.extend([0.0, 1e-9, -3e-6, 65000.0, 1.0 / 3.0]);
        let v = gpu.vector(&x).unwrap();
        let bytes = (4 * x.len()) as u64;
        let buffer = gpu.run(|pass| gpu.split_x(pass, &v, bytes)).unwrap();
        let raw = gpu.read_bytes(&buffer, 0, bytes).unwrap();
        let parts: Vec<f16> = raw
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
            .collect();
        for (i, &want) in x.iter().enumerate() {
            let (hi, lo) = (parts[i], parts[x.len() + i]);
            let near = f16::from_f32(want).to_f64();
            let step = (f16::from_f64(near.abs()).to_bits() + 1) as f64;
            let step = f16::from_bits(step as u16).to_f64() - near.abs();
            assert!(
                (hi.to_f64() - want as f64).abs() <= step,
                "x[{i}] = {want}: high part {hi}"
            );
            let err = (hi.to_f64() + lo.to_f64() - want as f64).abs();
            assert!(
                err <= 2f64.powi(-21) * (want as f64).abs() + 2f64.powi(-25),
                "x[{i}] = {want}: {hi} + {lo} is off by {err:e}"
            );
        }
    }
}
