//! Launchers of the transformer ops around the matrix products (wgsl/rmsnorm.wgsl, rope.wgsl,
//! kv_store.wgsl, attention.wgsl, attention_split.wgsl + attention_combine.wgsl, silu_mul.wgsl,
//! add.wgsl, argmax.wgsl, embed.wgsl). Each records one
//! dispatch into a compute pass the caller owns; buffers are f32 unless said otherwise, and the KV cache
//! is u32 words (f16 pairs, or f32 bits for the exact path).

use super::context::Gpu;
use super::error::{GpuError, Result};
use super::matrix::{GpuMatrix, Layout};
use super::shader::Kernel;

/// Attention dimensions of one launch (see wgsl/attention.wgsl).
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys a query sees (sliding window); 0 = all earlier positions.
    pub window: usize,
    /// KV cache in f16 pairs (true) or f32 (false).
    pub kv_f16: bool,
}

impl AttentionDims {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
}

/// Widest head the attention kernels hold in workgroup memory.
const MAX_HEAD_DIM: usize = 256;

/// Most chunks the split attention cuts the keys into: attention_combine.wgsl gives each a thread.
const MAX_CHUNKS: usize = 128;

/// Keys per chunk the split attention aims at on a full cache: a chunk is one 16-key tile of
/// attention_split.wgsl, and a 2048-row cache of 10 kv heads gives 1280 workgroups (an H100 has 132
/// multiprocessors), while the partials stay a quarter of the f16 keys and values.
const CHUNK_KEYS: usize = 16;

/// Workgroup memory of attention.wgsl: the queries (16 KiB), the scores (8 KiB), a key or value
/// chunk (8 KiB).
const ATTENTION_TILE_BYTES: u32 = 32 << 10;

/// Query rows ((token, head) pairs) a workgroup of attention.wgsl takes: its queries are 4096 f32s
/// of heads padded to 32 dimensions.
fn attention_rows(head_dim: usize) -> usize {
    if head_dim.next_multiple_of(32) <= 128 {
        32
    } else {
        16
    }
}

/// The Params of the attention kernels (wgsl/lib/attention_params.wgsl); `count` is the rows
/// (attention) or the chunks (split).
fn attention_params(dims: &AttentionDims, count: usize) -> Result<[u32; 8]> {
    Ok([
        word(dims.heads)?,
        word(dims.kv_heads)?,
        word(dims.head_dim)?,
        word(dims.qkv_dim())?,
        word(dims.kv_dim())?,
        word(count)?,
        word(dims.window)?,
        (1.0 / (dims.head_dim as f32).sqrt()).to_bits(),
    ])
}

/// The attention kernels' shape limits: head size and the grouping of query heads.
fn check_attention(dims: &AttentionDims) -> Result<()> {
    if dims.head_dim > MAX_HEAD_DIM || !dims.head_dim.is_multiple_of(2) || dims.head_dim == 0 {
        return Err(GpuError::Shape(format!(
            "the attention kernels take even head dimensions up to {MAX_HEAD_DIM}, not {}",
            dims.head_dim
        )));
    }
    if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(GpuError::Shape(format!(
            "{} query heads cannot share {} kv heads",
            dims.heads, dims.kv_heads
        )));
    }
    Ok(())
}

pub(super) fn word(v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| GpuError::Shape(format!("{v} does not fit a 32-bit kernel parameter")))
}

/// Logits per workgroup of argmax.wgsl's first phase (its WG * PER).
const ARGMAX_CHUNK: usize = 1024;

impl Gpu {
    /// One dispatch of `kernel` over `groups` workgroups (2D when over the per-dimension limit).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        kernel: Kernel,
        constants: &[(&'static str, f64)],
        params: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: usize,
    ) -> Result<()> {
        if groups == 0 {
            return Ok(());
        }
        let params = self.uniform(params)?;
        let (pipeline, layout) = self.pipeline(kernel, constants)?;
        let mut all = vec![&params];
        all.extend_from_slice(buffers);
        let bind = self.bind(&layout, &all)?;
        let (gx, gy) = self.grid(groups as u64)?;
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(gx, gy, 1);
        Ok(())
    }

    /// out[t] = weight * x[x_offset + t width ..] / rms, for n rows of `width`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &wgpu::Buffer,
        x_offset: usize,
        weight: &wgpu::Buffer,
        out: &wgpu::Buffer,
        eps: f32,
        n: usize,
        width: usize,
    ) -> Result<()> {
        if n > self.limits().max_workgroups_per_dim as usize {
            return Err(GpuError::Shape(format!(
                "rmsnorm of {n} rows in one launch"
            )));
        }
        let p = [word(width)?, word(n)?, eps.to_bits(), word(x_offset)?];
        self.launch(pass, Kernel::Rmsnorm, &[], &p, &[x, weight, out], n)
    }

    /// Rotates q and k heads of n qkv rows in place with cos/sin tables [ctx, half]; row 0 is at
    /// position `step[0]` (see [`Gpu::write_step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        qkv: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
        step: &wgpu::Buffer,
        dims: &AttentionDims,
        half: usize,
        n: usize,
    ) -> Result<()> {
        let heads = dims.heads + dims.kv_heads;
        let p = [
            word(heads)?,
            word(dims.head_dim)?,
            word(half)?,
            word(dims.qkv_dim())?,
            word(n)?,
            0,
            0,
            0,
        ];
        let groups = (n * heads * half).div_ceil(64);
        self.launch(pass, Kernel::Rope, &[], &p, &[qkv, cos, sin, step], groups)
    }

    /// Whether [`Gpu::rope_kv`] takes these dimensions: even head_dim and even `half` (each thread
    /// writes whole f16 pairs of the cache, including its rotation partner's).
    pub fn rope_kv_fits(dims: &AttentionDims, half: usize) -> bool {
        dims.head_dim.is_multiple_of(2) && half.is_multiple_of(2) && 2 * half <= dims.head_dim
    }

    /// [`Gpu::rope`] then [`Gpu::kv_store`] in one launch (wgsl/rope_kv.wgsl); see
    /// [`Gpu::rope_kv_fits`].
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        qkv: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        step: &wgpu::Buffer,
        dims: &AttentionDims,
        half: usize,
        n: usize,
    ) -> Result<()> {
        if !Self::rope_kv_fits(dims, half) {
            return Err(GpuError::Shape(format!(
                "rope_kv.wgsl takes an even head_dim and rotary half, not {} and {half}",
                dims.head_dim
            )));
        }
        let p = [
            word(dims.heads)?,
            word(dims.kv_heads)?,
            word(dims.head_dim)?,
            word(half)?,
            word(dims.qkv_dim())?,
            word(n)?,
            0,
            0,
        ];
        let groups = (n * dims.qkv_dim() / 2).div_ceil(64);
        let c = [("KV_F16", dims.kv_f16 as u32 as f64)];
        self.launch(
            pass,
            Kernel::RopeKv,
            &c,
            &p,
            &[qkv, cos, sin, k_cache, v_cache, step],
            groups,
        )
    }

    /// Copies the k and v parts of n qkv rows into cache rows step[0]..step[0] + n.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        qkv: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        step: &wgpu::Buffer,
        dims: &AttentionDims,
        n: usize,
    ) -> Result<()> {
        let p = [
            word(dims.q_dim())?,
            word(dims.kv_dim())?,
            word(dims.qkv_dim())?,
            word(n)?,
        ];
        let groups = (n * dims.kv_dim() / 2).div_ceil(64);
        let c = [("KV_F16", dims.kv_f16 as u32 as f64)];
        self.launch(
            pass,
            Kernel::KvStore,
            &c,
            &p,
            &[qkv, k_cache, v_cache, step],
            groups,
        )
    }

    /// Causal grouped-query attention of n query rows (positions step[0]..step[0] + n) over the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        qkv: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        out: &wgpu::Buffer,
        step: &wgpu::Buffer,
        dims: &AttentionDims,
        n: usize,
    ) -> Result<()> {
        check_attention(dims)?;
        let have = self.limits().max_workgroup_storage_bytes;
        if have < ATTENTION_TILE_BYTES {
            return Err(GpuError::Layout(format!(
                "the batched attention needs {ATTENTION_TILE_BYTES} bytes of workgroup memory, the \
                 device has {have}: feed one position at a time"
            )));
        }
        let rows = attention_rows(dims.head_dim);
        let group = dims.heads / dims.kv_heads;
        word(n * dims.qkv_dim())?;
        let groups = (n * group).div_ceil(rows) * dims.kv_heads;
        let p = attention_params(dims, n)?;
        let c = [("KV_F16", dims.kv_f16 as u32 as f64), ("ROWS", rows as f64)];
        self.launch(
            pass,
            Kernel::Attention,
            &c,
            &p,
            &[qkv, k_cache, v_cache, out, step],
            groups,
        )
    }

    /// Chunks [`Gpu::attention_decode`] cuts the keys of a cache of `ctx` rows into: about
    /// [`CHUNK_KEYS`] keys each when the cache is full, at most [`MAX_CHUNKS`]. It depends on the
    /// cache only, not on the position, so that a decode pass is the same launches every token.
    pub fn attention_chunks(ctx: usize) -> usize {
        ctx.div_ceil(CHUNK_KEYS).clamp(1, MAX_CHUNKS)
    }

    /// f32 values of the `partials` scratch buffer of [`Gpu::attention_decode`] with `chunks` chunks.
    pub fn attention_partials_len(dims: &AttentionDims, chunks: usize) -> usize {
        dims.heads * chunks * (dims.head_dim + 2)
    }

    /// Attention of one query row (position step[0]) over the cache, split over the keys: per chunk
    /// of keys and kv head a partial softmax into `partials` (attention_split.wgsl), then one merge per
    /// head into `out` (attention_combine.wgsl). Reads each key and value once for all query heads of
    /// a kv head, and fills the GPU at long contexts where [`Gpu::attention`] has one workgroup per head.
    /// With `rope` (the cos and sin tables, [ctx, half], and half = rotary_dim / 2) it also does
    /// [`Gpu::rope_kv`]'s work for the row, one launch fewer: q and the row's key rotated, the key and
    /// value written to cache row step[0]; qkv stays unrotated.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        qkv: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        partials: &wgpu::Buffer,
        out: &wgpu::Buffer,
        step: &wgpu::Buffer,
        dims: &AttentionDims,
        chunks: usize,
        rope: Option<(&wgpu::Buffer, &wgpu::Buffer, usize)>,
    ) -> Result<()> {
        check_attention(dims)?;
        if let Some((_, _, half)) = rope {
            if half == 0 || 2 * half > dims.head_dim {
                return Err(GpuError::Shape(format!(
                    "a rotary half of {half} does not fit heads of {} dimensions",
                    dims.head_dim
                )));
            }
        }
        if !(1..=MAX_CHUNKS).contains(&chunks) {
            return Err(GpuError::Shape(format!(
                "split attention into {chunks} chunks; it takes 1 to {MAX_CHUNKS}"
            )));
        }
        let need = 4 * Self::attention_partials_len(dims, chunks) as u64;
        if partials.size() < need {
            return Err(GpuError::Shape(format!(
                "split attention of {} heads in {chunks} chunks needs {need} bytes of partials, the \
                 buffer has {}",
                dims.heads,
                partials.size()
            )));
        }
        let p = attention_params(dims, chunks)?;
        let (cos, sin, half) = rope.unwrap_or((&self.dummy, &self.dummy, 0));
        let c = [
            ("KV_F16", dims.kv_f16 as u32 as f64),
            ("ROPE_HALF", half as f64),
        ];
        // Query heads of one kv head, 4 to a workgroup (attention_split.wgsl's GROUP).
        let qgroups = (dims.heads / dims.kv_heads).div_ceil(4);
        self.launch(
            pass,
            Kernel::AttentionSplit,
            &c,
            &p,
            &[qkv, k_cache, v_cache, partials, step, cos, sin],
            dims.kv_heads * qgroups * chunks,
        )?;
        self.launch(
            pass,
            Kernel::AttentionCombine,
            &[],
            &p,
            &[partials, out, step],
            dims.heads,
        )
    }

    /// out[t][i] = silu(gate_up[t][i]) * gate_up[t][width + i]; with `pairs`, of gate_up rows in the
    /// SwiGLU pairs order of a gate_up matrix from [`Gpu::upload_gate_up`] (width a multiple of 16).
    pub fn silu_mul(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        gate_up: &wgpu::Buffer,
        out: &wgpu::Buffer,
        width: usize,
        n: usize,
        pairs: bool,
    ) -> Result<()> {
        if pairs && !width.is_multiple_of(16) {
            return Err(GpuError::Shape(format!(
                "silu_mul of SwiGLU pairs of width {width}: pairs come 16 at a time"
            )));
        }
        let p = [word(width)?, word(n)?, 0, 0];
        self.launch(
            pass,
            Kernel::SiluMul,
            &[("PAIRS", pairs as u32 as f64)],
            &p,
            &[gate_up, out],
            (n * width).div_ceil(256),
        )
    }

    /// A one-word storage buffer for the `step` binding of rope, kv_store and attention.
    pub fn step_buffer(&self) -> Result<wgpu::Buffer> {
        self.buffer_with("step", &[0; 16], wgpu::BufferUsages::STORAGE)
    }

    /// Sets the position of row 0 for the next submission's rope, kv_store and attention launches.
    /// Written through the queue, so it lands before any later submission and the bind groups and
    /// params of those launches stay the same from token to token.
    pub fn write_step(&self, step: &wgpu::Buffer, start: usize) -> Result<()> {
        self.queue
            .write_buffer(step, 0, bytemuck::bytes_of(&word(start)?));
        Ok(())
    }

    /// x[..len] += y[..len].
    pub fn add(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        len: usize,
    ) -> Result<()> {
        let p = [word(len)?, 0, 0, 0];
        self.launch(pass, Kernel::Add, &[], &p, &[x, y], len.div_ceil(256))
    }

    /// best[0] = argmax of logits[offset..offset + len] (lowest index on ties), in two launches; `best`
    /// holds [`Gpu::argmax_words`] words (the per-chunk winners after the token).
    pub fn argmax(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        logits: &wgpu::Buffer,
        offset: usize,
        len: usize,
        best: &wgpu::Buffer,
    ) -> Result<()> {
        let groups = len.div_ceil(ARGMAX_CHUNK);
        if best.size() < 4 * Self::argmax_words(len) as u64 {
            return Err(GpuError::Shape(format!(
                "argmax over {len} values needs {} words of scratch, the buffer has {} bytes",
                Self::argmax_words(len),
                best.size()
            )));
        }
        let p = [word(len)?, word(offset)?, word(groups)?, 0];
        self.launch(
            pass,
            Kernel::Argmax,
            &[("PHASE", 0.0)],
            &p,
            &[logits, best],
            groups,
        )?;
        self.launch(
            pass,
            Kernel::Argmax,
            &[("PHASE", 1.0)],
            &p,
            &[logits, best],
            1,
        )
    }

    /// Words of the `best` buffer that [`Gpu::argmax`] over `len` values needs.
    pub fn argmax_words(len: usize) -> usize {
        1 + 2 * len.div_ceil(ARGMAX_CHUNK).max(1)
    }

    /// out[out_offset..][..cols] = row `row` of a dense table (f32, f16 or q4), as f32.
    pub fn embed(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        table: &GpuMatrix,
        row: usize,
        out: &wgpu::Buffer,
        out_offset: usize,
    ) -> Result<()> {
        if row >= table.rows {
            return Err(GpuError::Shape(format!(
                "row {row} of a table of {} rows",
                table.rows
            )));
        }
        let Some(chunk) = table
            .chunks
            .iter()
            .find(|c| (c.row0..c.row0 + c.rows).contains(&row))
        else {
            return Err(GpuError::Shape(format!("no chunk holds row {row}")));
        };
        self.embed_chunk(pass, table, chunk, row - chunk.row0, None, out, out_offset)
    }

    /// [`Gpu::embed`] of the row whose id is `token[0]` on the device (argmax's output), read by the
    /// kernel: the pass that needs a sampled token can be submitted before the token is read back. An
    /// id outside the table writes nothing.
    pub fn embed_token(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        table: &GpuMatrix,
        token: &wgpu::Buffer,
        out: &wgpu::Buffer,
        out_offset: usize,
    ) -> Result<()> {
        for chunk in &table.chunks {
            self.embed_chunk(pass, table, chunk, 0, Some(token), out, out_offset)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn embed_chunk(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        table: &GpuMatrix,
        chunk: &super::matrix::Chunk,
        local: usize,
        token: Option<&wgpu::Buffer>,
        out: &wgpu::Buffer,
        out_offset: usize,
    ) -> Result<()> {
        let cols = word(table.cols)?;
        let (codec, stride, scale_words, group) =
            match table.layout {
                Layout::F32 { stride } => (0, stride, 0, 1),
                Layout::F16 { stride } => (1, stride, 0, 1),
                Layout::Q4 { group, n32, ns2 } => (2, n32 * 4, ns2, group),
                Layout::Q3 { group, n32, ns2 } => (3, n32 * 3, ns2, group),
                Layout::Sparse { .. } => return Err(GpuError::Shape(
                    "an embedding table in the sparse codec: convert it with q3, q4, f16 or f32"
                        .into(),
                )),
            };
        let scales = chunk.planes.get(1).unwrap_or(&self.dummy);
        let p = [
            word(local)?,
            cols,
            word(stride)?,
            word(scale_words)?,
            word(group)?,
            word(out_offset)?,
            word(chunk.row0)?,
            word(chunk.rows)?,
        ];
        let c = [
            ("CODEC", codec as f64),
            ("FROM_TOKEN", token.is_some() as u32 as f64),
        ];
        self.launch(
            pass,
            Kernel::Embed,
            &c,
            &p,
            &[&chunk.planes[0], scales, out, token.unwrap_or(&self.dummy)],
            table.cols.div_ceil(256),
        )
    }
}
