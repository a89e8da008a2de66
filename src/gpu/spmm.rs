//! The batched product of prefill: y[t] = W x[t] for n rows of x at once. Sparse matrices go to the
//! matrix units (wgsl/spmm_coop.wgsl) where the device has cooperative matrices, everything else to
//! f32 FMA tiles (wgsl/spmm.wgsl), any codec.

use super::buffers::GpuVector;
use super::context::Gpu;
use super::error::{GpuError, Result};
use super::matrix::{GpuMatrix, Layout, TILE_ROWS};
use super::shader::Kernel;

/// Rows of W and of x per workgroup (spmm.wgsl's BM and BN).
const ROW_TILE: usize = 128;
const BATCH_TILE: usize = 128;
/// Workgroup memory of spmm.wgsl: the W tile and the x tile, 16 KiB each.
const TILE_BYTES: u32 = 32 << 10;
/// spmm_coop.wgsl: 128 rows of W by 64 tokens a workgroup, 44 KiB of workgroup memory.
const COOP_BATCH_TILE: usize = 64;
const COOP_TILE_BYTES: u32 = 45056;

fn word(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        GpuError::Shape(format!(
            "{what} ({v}) does not fit a 32-bit index: use smaller batches"
        ))
    })
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
        let coop = self.features().cooperative_matrix
            && matches!(w.layout, Layout::Sparse { .. })
            && self.limits().max_workgroup_storage_bytes >= COOP_TILE_BYTES;
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
        let (kernel, batch_tile, mut constants) = if coop {
            (
                Kernel::SpmmCoop,
                COOP_BATCH_TILE,
                vec![(group.0, group.1 as f64)],
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
            buffers.extend([&x.buffer, &y.buffer, res]);
            let bind = self.bind(&layout, &buffers)?;
            let groups = row_groups as u64 * n.div_ceil(batch_tile) as u64;
            let (gx, gy) = self.grid(groups)?;
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        Ok(())
    }
}
