//! One launcher per WGSL op. Each records into a compute pass the caller owns, so that a model's
//! forward pass can put many launches in one submission.

use super::buffers::GpuVector;
use super::context::Gpu;
use super::error::{GpuError, Result};
use super::matrix::{GpuMatrix, Layout, Q4_QUADS, Q4_WORKGROUP_ROWS, TILE_ROWS};
use super::shader::Kernel;
use super::transformer::word;

/// Words of workgroup memory spmv needs besides the x tile (the per-slice partial sums).
const SPMV_PARTIAL_BYTES: u32 = 4 * 32 * 32;
/// Workgroup memory of gemv_q3 with its x staging (STAGE_X): the staged x and the team sums.
const Q3_STAGE_BYTES: u32 = 288 * 16 + 256 * 4;

/// spmv splits the rows of a tile over ROW_LANES = 2 workgroups up to this many tiles (6144 rows):
/// 5120 rows (down_proj of Phi-4) are 160 tiles for the 132 SMs of an H100, too few workgroups of 512
/// threads to keep every SM's memory pipe busy. There (H100, BENCHMARKS.md) 5120 x 17920 took 52.9 ->
/// 49.9 us, with the SwiGLU prologue 55.6 -> 54.4; at 7680 rows (240 tiles) 2 were slower (18.5 ->
/// 20.8 us), and 4 workgroups a tile were slower at every Phi-4 shape.
const SPMV_SPLIT_TILES: usize = 192;

/// Blocks a share must have on average for spmv to split the rows: at 5120 columns (80 blocks, 2.5 a
/// share) the bench was within its noise (18.1 -> 17.7 us) and o_proj in the decode pass was slower
/// (22.6 -> 23.3 us each).
const SPMV_SPLIT_SHARE_BLOCKS: usize = 4;

/// spmv cuts rows into column parts ([`Gpu::spmv_parts`]) in products of fewer row tiles than this:
/// twice the 132 SMs of an H100 (the adapter does not say how many SMs it has). Launcher knob
/// `SPLIT_TILES` (an override; 0 turns the split off).
const SPMV_COL_SPLIT_TILES: usize = 264;

/// Workgroups a column-split product aims at: four of 512 threads per SM of an H100. Launcher knob
/// `SPLIT_GROUPS`.
const SPMV_COL_SPLIT_GROUPS: usize = 528;

/// Fewest blocks a column part gets from the rule; a `COL_SPLIT` override ignores it. 64 leaves the
/// 80-block rows of Phi-4's qkv and o_proj whole and cuts down_proj's 280 into 4: on an H100 (decode
/// profile, per layer) the split took down 60.8 -> 43.8 us but qkv 24.1 -> 30.0 and o_proj 22.8 ->
/// 24.3, the combine launch costing more than the 80-block products gain.
const SPMV_PART_BLOCKS: usize = 64;

/// f32 values of the smallest column-split scratch buffer (it grows to a power of two when needed).
const SPLIT_SCRATCH_MIN: usize = 1 << 16;

/// f32 values of the split scratch buffer made for `len` (grown in powers of two, so that a few sizes
/// serve every product, unless that would pass `max_binding_bytes`).
pub(crate) fn split_scratch_len(len: usize, max_binding_bytes: u64) -> usize {
    let n = len.max(SPLIT_SCRATCH_MIN).next_power_of_two();
    if 4 * n as u64 <= max_binding_bytes {
        n
    } else {
        len
    }
}

/// What a product does to its input while loading it (see wgsl/spmv.wgsl), in place of a launch
/// before it.
#[derive(Clone, Copy, Debug)]
pub enum Prologue<'a> {
    /// x as it is.
    None,
    /// RMSNorm of x with this weight (as long as x) and epsilon.
    Norm { weight: &'a GpuVector, eps: f32 },
    /// x is [gate | up], each as long as a row of W; the product takes silu(gate) * up.
    SwiGlu,
}

impl Prologue<'_> {
    /// Override value of spmv's PROLOGUE.
    fn mode(&self) -> f64 {
        match self {
            Prologue::None => 0.0,
            Prologue::Norm { .. } => 1.0,
            Prologue::SwiGlu => 2.0,
        }
    }

    /// spmv's STAGE_ROUNDS: x staged four rounds at a time only where a round has SwiGLU's work
    /// (measured in wgsl/spmv.wgsl).
    fn stage_rounds(&self) -> f64 {
        match self {
            Prologue::SwiGlu => 4.0,
            _ => 1.0,
        }
    }
}

impl GpuMatrix {
    /// Whether [`Gpu::matvec_fused`] takes `prologue` with this matrix: the sparse codec, and for SwiGLU
    /// rows of a multiple of 4 columns (the kernel finds `up` a whole vec4 index after `gate`).
    pub fn takes(&self, prologue: &Prologue) -> bool {
        match prologue {
            Prologue::None => true,
            _ if !matches!(self.layout, Layout::Sparse { .. }) => false,
            Prologue::Norm { .. } => true,
            Prologue::SwiGlu => self.cols.is_multiple_of(4),
        }
    }
}

/// spmv's ROW_LANES: 2 for a product of at most [`SPMV_SPLIT_TILES`] row tiles whose rows have blocks
/// enough for each of the 2 * `slices` shares to walk [`SPMV_SPLIT_SHARE_BLOCKS`], else 1.
fn spmv_row_lanes(tiles: usize, blocks: usize, slices: u32) -> u32 {
    if tiles <= SPMV_SPLIT_TILES && blocks >= SPMV_SPLIT_SHARE_BLOCKS * 2 * slices as usize {
        2
    } else {
        1
    }
}

impl Gpu {
    /// y = W x, or y = W x + r with `residual` (which may be y itself: y += W x). Any codec.
    pub fn matvec(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        w: &GpuMatrix,
        x: &GpuVector,
        y: &GpuVector,
        residual: Option<&GpuVector>,
    ) -> Result<()> {
        self.matvec_fused(pass, w, x, y, residual, Prologue::None)
    }

    /// [`Gpu::matvec`] of x' = `prologue` applied to x, in the same launch (the sparse codec; see
    /// [`GpuMatrix::takes`]). A matrix in SwiGLU pairs order gives y in that order.
    pub fn matvec_fused(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        w: &GpuMatrix,
        x: &GpuVector,
        y: &GpuVector,
        residual: Option<&GpuVector>,
        prologue: Prologue,
    ) -> Result<()> {
        self.product(pass, w, x, y, residual, prologue, false)
    }

    /// h = silu(gate) * up of [gate | up] = W x' (x' = `prologue` applied to x) for a gate_up matrix
    /// in SwiGLU pairs order ([`Gpu::upload_gate_up`]): the product's epilogue, so that h (half of
    /// W's rows) is what gets written, and the product after it stages h as it is.
    pub fn matvec_swiglu(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        w: &GpuMatrix,
        x: &GpuVector,
        h: &GpuVector,
        prologue: Prologue,
    ) -> Result<()> {
        if !w.swiglu_pairs {
            return Err(GpuError::Shape(
                "the SwiGLU epilogue needs a gate_up matrix uploaded by upload_gate_up in pairs order"
                    .into(),
            ));
        }
        self.product(pass, w, x, h, None, prologue, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        w: &GpuMatrix,
        x: &GpuVector,
        y: &GpuVector,
        residual: Option<&GpuVector>,
        prologue: Prologue,
        epilogue: bool,
    ) -> Result<()> {
        let x_len = match prologue {
            Prologue::SwiGlu => 2 * w.cols,
            _ => w.cols,
        };
        let y_len = if epilogue { w.rows / 2 } else { w.rows };
        if x.len != x_len || y.len != y_len {
            return Err(GpuError::Shape(format!(
                "W is [{}, {}], x has {} entries (wanted {x_len}) and y {} (wanted {y_len})",
                w.rows, w.cols, x.len, y.len
            )));
        }
        if !w.takes(&prologue) {
            return Err(GpuError::Shape(format!(
                "{prologue:?} prologue in a product with a {:?} matrix of {} columns (the sparse codec takes one; SwiGLU needs a multiple of 4 columns)",
                w.codec,
                w.cols
            )));
        }
        let norm = match prologue {
            Prologue::Norm { weight, .. } if weight.len != w.cols => {
                return Err(GpuError::Shape(format!(
                    "norm weight of {} entries for a matrix of {} columns",
                    weight.len, w.cols
                )))
            }
            Prologue::Norm { weight, .. } => &weight.buffer,
            _ => &self.dummy,
        };
        if x.buffer == y.buffer {
            return Err(GpuError::Shape("x and y must be different vectors".into()));
        }
        let (mode, res) = match residual {
            None => (0.0, &self.dummy),
            Some(r) if r.buffer == y.buffer => (2.0, &self.dummy),
            Some(r) if r.len != w.rows => {
                return Err(GpuError::Shape(format!(
                    "residual has {} entries, W has {} rows",
                    r.len, w.rows
                )))
            }
            Some(r) => (1.0, &r.buffer),
        };
        // Column parts: their sums go to a scratch buffer, and a second launch combines them into y.
        let parts = self.spmv_parts(w)?;
        let scratch = match parts {
            1 => None,
            _ => Some(self.split_scratch(parts * (w.rows + 1))?),
        };
        for c in &w.chunks {
            if c.rows == 0 || w.cols == 0 && !matches!(w.layout, Layout::Sparse { .. }) {
                continue;
            }
            let (kernel, mut constants, groups): (Kernel, Vec<(&str, f64)>, usize) = match w.layout
            {
                Layout::Sparse {
                    blocks,
                    group_blocks,
                    ..
                } => {
                    let tiles = c.rows.div_ceil(TILE_ROWS);
                    let part_blocks = blocks.div_ceil(parts);
                    let (slices, tile_blocks) = self.spmv_shape(part_blocks)?;
                    (
                        Kernel::Spmv,
                        vec![
                            ("GROUP_BLOCKS", group_blocks as f64),
                            ("RESIDUAL", mode),
                            ("SLICES", slices as f64),
                            ("TILE_BLOCKS", tile_blocks as f64),
                            ("PROLOGUE", prologue.mode()),
                            (
                                "ROW_LANES",
                                spmv_row_lanes(tiles, part_blocks, slices) as f64,
                            ),
                            ("STAGE_ROUNDS", prologue.stage_rounds()),
                        ],
                        tiles,
                    )
                }
                Layout::F16 { .. } => (
                    Kernel::GemvF16,
                    vec![("RESIDUAL", mode)],
                    c.rows.div_ceil(8),
                ),
                Layout::F32 { .. } => (
                    Kernel::GemvF32,
                    vec![("RESIDUAL", mode)],
                    c.rows.div_ceil(8),
                ),
                Layout::Q4 { group, .. } => (
                    Kernel::GemvQ4,
                    vec![
                        ("GROUP_CHUNKS", (group / 32) as f64),
                        ("RESIDUAL", mode),
                        ("QUADS", Q4_QUADS as f64),
                    ],
                    c.rows.div_ceil(Q4_WORKGROUP_ROWS),
                ),
                Layout::Q3 { group, .. } => {
                    let rows = self.q3_rows();
                    (
                        Kernel::GemvQ3,
                        vec![
                            ("GROUP_RUNS", (group / 32) as f64),
                            ("ROWS", rows as f64),
                            ("RESIDUAL", mode),
                            ("STAGE_X", self.q3_stage_x() as u32 as f64),
                        ],
                        c.rows.div_ceil(8 * rows),
                    )
                }
            };
            // gemv_q3's ROWS was applied by `q3_rows`, which its workgroup count follows.
            if matches!(kernel, Kernel::Spmv | Kernel::GemvQ4 | Kernel::GemvQ3) {
                for (name, v) in self.overrides.iter().filter(|o| {
                    kernel.declares(&o.0) && !(kernel == Kernel::GemvQ3 && o.0 == "ROWS")
                }) {
                    match constants.iter_mut().find(|c| c.0 == name) {
                        Some(c) => c.1 = *v,
                        None => constants.push((name, *v)),
                    }
                }
            }
            let mut groups = groups;
            if kernel == Kernel::Spmv {
                // The split is the launcher's (`spmv_parts`, which reads a COL_SPLIT override), and
                // the epilogue pairs rows inside one workgroup.
                constants.retain(|c| c.0 != "COL_SPLIT" && c.0 != "EPILOGUE");
                constants.push(("COL_SPLIT", parts as f64));
                if epilogue && parts == 1 {
                    constants.retain(|c| c.0 != "ROW_LANES");
                    constants.push(("ROW_LANES", 1.0));
                    constants.push(("EPILOGUE", 1.0));
                }
                // A workgroup takes 32 / ROW_LANES rows of a tile and one column part.
                let lanes = constants
                    .iter()
                    .find(|c| c.0 == "ROW_LANES")
                    .map_or(1.0, |c| c.1);
                if !(1.0..=32.0).contains(&lanes)
                    || lanes.fract() != 0.0
                    || !(lanes as usize).is_power_of_two()
                {
                    return Err(GpuError::Shape(format!(
                        "spmv ROW_LANES {lanes}: use 1, 2, 4, 8, 16 or 32"
                    )));
                }
                groups *= lanes as usize * parts;
            }
            if let Prologue::Norm { eps, .. } = prologue {
                constants.push(("EPS", eps as f64));
            }
            let (pipeline, layout) = self.pipeline(kernel, &constants)?;
            let mut buffers: Vec<&wgpu::Buffer> = vec![&c.params];
            buffers.extend(&c.planes);
            buffers.extend([&x.buffer, scratch.as_ref().unwrap_or(&y.buffer), res]);
            if kernel == Kernel::Spmv {
                buffers.push(norm);
            }
            let bind = self.bind(&layout, &buffers)?;
            let (gx, gy) = self.grid(groups as u64)?;
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        if let Some(scratch) = &scratch {
            // The norm factor is the combine's to apply; SiLU * up was applied while staging.
            let norm = matches!(prologue, Prologue::Norm { .. });
            let mut constants = vec![
                ("RESIDUAL", mode),
                ("PROLOGUE", norm as u32 as f64),
                ("EPILOGUE", epilogue as u32 as f64),
            ];
            if let Prologue::Norm { eps, .. } = prologue {
                constants.push(("EPS", eps as f64));
            }
            let p = [word(y_len)?, word(parts)?, word(w.rows)?, word(w.cols)?];
            self.launch(
                pass,
                Kernel::SpmvCombine,
                &constants,
                &p,
                &[scratch, &y.buffer, res],
                y_len.div_ceil(256),
            )?;
        }
        Ok(())
    }

    /// The value of a launcher knob or kernel override given in [`super::GpuOptions::overrides`]
    /// (the last one of that name).
    pub(crate) fn knob(&self, name: &str) -> Option<f64> {
        self.overrides
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|o| o.1)
    }

    /// Column parts spmv cuts `w`'s rows into (1: no split; other codecs: 1). A `COL_SPLIT` override
    /// sets it for every sparse product; otherwise a product of fewer than [`SPMV_COL_SPLIT_TILES`]
    /// row tiles (`SPLIT_TILES`) gets parts enough for [`SPMV_COL_SPLIT_GROUPS`] workgroups
    /// (`SPLIT_GROUPS`), each part at least [`SPMV_PART_BLOCKS`] blocks. Not where the scratch buffer
    /// would exceed a storage binding.
    pub fn spmv_parts(&self, w: &GpuMatrix) -> Result<usize> {
        let Layout::Sparse { blocks, .. } = w.layout else {
            return Ok(1);
        };
        self.spmv_parts_of(w.rows, blocks)
    }

    /// [`Gpu::spmv_parts`] of a sparse matrix of `rows` rows of `blocks` blocks.
    pub(crate) fn spmv_parts_of(&self, rows: usize, blocks: usize) -> Result<usize> {
        let tiles = rows.div_ceil(TILE_ROWS).max(1);
        let parts = match self.knob("COL_SPLIT") {
            Some(v) if !(1.0..=256.0).contains(&v) || v.fract() != 0.0 => {
                return Err(GpuError::Shape(format!(
                    "spmv COL_SPLIT {v}: use a whole number of column parts from 1 to 256"
                )))
            }
            Some(v) => v as usize,
            None => {
                let below = self
                    .knob("SPLIT_TILES")
                    .map_or(SPMV_COL_SPLIT_TILES, |v| v.max(0.0) as usize);
                let aim = self
                    .knob("SPLIT_GROUPS")
                    .map_or(SPMV_COL_SPLIT_GROUPS, |v| v.max(1.0) as usize);
                if tiles < below {
                    aim.div_ceil(tiles).min(blocks / SPMV_PART_BLOCKS).max(1)
                } else {
                    1
                }
            }
        };
        let fits = 4 * (parts * (rows + 1)) as u64 <= self.limits().max_binding_bytes;
        Ok(if fits { parts } else { 1 })
    }

    /// The column-split scratch buffer, at least `len` f32 values: one for every product, since the
    /// products of a pass run one after another (each combine reads it before the next product
    /// writes it).
    fn split_scratch(&self, len: usize) -> Result<wgpu::Buffer> {
        let len = split_scratch_len(len, self.limits().max_binding_bytes);
        self.kept(&self.split_scratch, 4 * len as u64, "spmv's column parts")
    }

    /// Rows per team of gemv_q3: 4, so that each x load serves 4 rows (on an H100 at the Phi-4 shapes
    /// 4 beat 2 and 1 everywhere, by 1.06-1.6x and 1.4-3x; BENCHMARKS.md); a `ROWS` override (bench)
    /// of 1 or 2 wins.
    pub(crate) fn q3_rows(&self) -> usize {
        match self.knob("ROWS") {
            Some(1.0) => 1,
            Some(2.0) => 2,
            _ => 4,
        }
    }

    /// Whether gemv_q3 stages x in workgroup memory: where the (possibly lowered) limit holds it.
    fn q3_stage_x(&self) -> bool {
        self.limits().max_workgroup_storage_bytes >= Q3_STAGE_BYTES
    }

    /// Slices per row tile and x-tile width (in blocks) for spmv: 16 slices (512 threads) where the
    /// device and the row's block count allow, and an x tile that fits workgroup memory. On an H100
    /// (Phi-4 shapes, steady clock) 16 slices matched or beat 8 and 32 at every shape: 8 leaves too few
    /// warps to hide memory latency, 1024-thread workgroups fit only two to an SM.
    fn spmv_shape(&self, blocks: usize) -> Result<(u32, u32)> {
        let lim = self.limits();
        let max_slices = (lim.max_invocations_per_workgroup / 32).clamp(1, 32);
        let mut slices = 1u32;
        while slices < 16 && slices < max_slices && (slices as usize) < blocks {
            slices *= 2;
        }
        let slices = slices.min(max_slices);
        let room = lim
            .max_workgroup_storage_bytes
            .saturating_sub(SPMV_PARTIAL_BYTES)
            / (64 * 4);
        if room == 0 {
            return Err(GpuError::Layout(format!(
                "spmv needs at least {} bytes of workgroup memory, the device has {}",
                SPMV_PARTIAL_BYTES + 64 * 4,
                lim.max_workgroup_storage_bytes
            )));
        }
        Ok((slices, room.min(blocks.max(1) as u32)))
    }

    /// Writes the dense form of sparse `w` into `out` (from [`Gpu::dense_zeros`], same shape).
    pub fn decompress(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        w: &GpuMatrix,
        out: &GpuMatrix,
    ) -> Result<()> {
        let Layout::Sparse {
            blocks,
            groups,
            group_blocks,
        } = w.layout
        else {
            return Err(GpuError::Shape("decompress takes a sparse matrix".into()));
        };
        let (stride, f32_out) = match out.layout {
            Layout::F16 { stride } => (stride, false),
            Layout::F32 { stride } => (stride, true),
            _ => {
                return Err(GpuError::Shape(
                    "decompress writes a dense f16 or f32 matrix".into(),
                ))
            }
        };
        if (out.rows, out.cols) != (w.rows, w.cols) {
            return Err(GpuError::Shape(format!(
                "decompressing [{}, {}] into [{}, {}]",
                w.rows, w.cols, out.rows, out.cols
            )));
        }
        let constants = [
            ("GROUP_BLOCKS", group_blocks as f64),
            ("OUT_F32", f32_out as u32 as f64),
        ];
        let (pipeline, layout) = self.pipeline(Kernel::Decompress, &constants)?;
        // Launch over each overlap of an input chunk and an output chunk.
        for i in &w.chunks {
            for o in &out.chunks {
                let a = i.row0.max(o.row0);
                let b = (i.row0 + i.rows).min(o.row0 + o.rows);
                if a >= b || w.cols == 0 {
                    continue;
                }
                // A workgroup per tile of 32 rows and 8 blocks (see decompress.wgsl).
                let (first, end) = (a - i.row0, b - i.row0);
                let tile0 = first / TILE_ROWS;
                let tiles = end.div_ceil(TILE_ROWS) - tile0;
                let groups_wg = (tiles * blocks.div_ceil(8)) as u64;
                let params = self.uniform(&[
                    word(b - a)?,
                    word(w.cols)?,
                    word(blocks)?,
                    word(groups)?,
                    word(first)?,
                    word(a - o.row0)?,
                    word(stride)?,
                    word(tile0)?,
                ])?;
                let mut buffers: Vec<&wgpu::Buffer> = vec![&params];
                buffers.extend(&i.planes);
                buffers.push(&o.planes[0]);
                let bind = self.bind(&layout, &buffers)?;
                let (gx, gy) = self.grid(groups_wg)?;
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        Ok(())
    }

    /// dst = src over `bytes` (a multiple of 16): the bench's bandwidth yardstick.
    pub fn copy(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<()> {
        if !bytes.is_multiple_of(16)
            || bytes > src.size()
            || bytes > dst.size()
            || bytes / 16 > u32::MAX as u64
        {
            return Err(GpuError::Shape(format!(
                "cannot copy {bytes} bytes between these buffers"
            )));
        }
        let n = bytes / 16;
        let groups = n.div_ceil(1024);
        let params = self.uniform(&[n as u32, groups as u32, 0, 0])?;
        let (pipeline, layout) = self.pipeline(Kernel::Copy, &[])?;
        let bind = self.bind(&layout, &[&params, src, dst])?;
        let (gx, gy) = self.grid(groups)?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
        Ok(())
    }

    /// y = W x on the device, from and to host memory: upload x, launch, read y back.
    pub fn matvec_host(&self, w: &GpuMatrix, x: &[f32]) -> Result<Vec<f32>> {
        let xv = self.vector(x)?;
        let y = self.zeros(w.rows)?;
        self.run(|pass| self.matvec(pass, w, &xv, &y, None))?;
        self.read(&y)
    }
}
