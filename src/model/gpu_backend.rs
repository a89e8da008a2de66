//! The [`Backend`] on a GPU through wgpu: every op of a pass is recorded as a dispatch into one compute
//! pass of one command encoder, and the pass is submitted once, at [`Backend::sample`] or
//! [`Backend::read`], together with the copy of what is read back (4 bytes for a greedy token).
//!
//! Op failures (a shape the kernels cannot take, a wgpu error) are kept and returned by the next
//! `sample` or `read`, as the trait's contract says.

use super::backend::{AttentionShape, Backend};
use super::error::{ModelError, Result};
use super::gpu_profile::Profiler;
use super::sampler::Sampler;
use crate::format::Tensor;
use crate::gpu::{AttentionDims, Gpu, GpuError, GpuMatrix, GpuVector, Prologue};

/// The most positions one pass takes (see [`Backend::max_batch`]), and the prompt positions a pass
/// takes by default: spmm.wgsl works on 128 positions at a time, and the 5120-row products of Phi-4
/// fill an H100 only with several such tiles (pp512 by `generate` on an H100: 406 tok/s in batches of
/// 512, 386 in batches of 256; BENCHMARKS.md). The cap keeps the one-dimensional launches over rows
/// (rmsnorm, attention's rows x heads for up to 127 heads) inside 65535 workgroups.
const MAX_BATCH: usize = 512;

pub struct GpuBackend {
    gpu: Gpu,
    /// KV cache as f16 pairs (half the memory and traffic) or f32 (the exact path).
    kv_f16: bool,
    /// Whether a q3 matrix was uploaded (no batched product for q3: see `max_batch`).
    q3_weights: bool,
    /// Whether a decode step's RoPE and K/V append run inside its attention launch (knob
    /// `FUSED_ROPE=0` turns it off), read once here rather than every layer of every token.
    fused_rope: bool,
    recording: Option<Recording>,
    error: Option<GpuError>,
    /// The greedy token id, written by argmax.wgsl.
    token: wgpu::Buffer,
    /// Position of the pass's first row, read by rope, kv_store and attention; `start` is what the
    /// recorded pass expects in it.
    step: wgpu::Buffer,
    start: Option<usize>,
    /// Per-chunk partial softmaxes of the split decode attention, shared by all layers; sized on
    /// first use.
    attention_partials: Option<wgpu::Buffer>,
    /// Ops recorded since the last read-back, and in the pass that ended with it.
    ops: usize,
    last_ops: usize,
    /// Host time spent recording the ops of the current pass, and of the last finished one.
    recording_time: std::time::Duration,
    last_recording_time: std::time::Duration,
    /// Host time from the end of the last pass's recording to its read-back: wgpu's encoding of the
    /// pass, the submission, the GPU's run and the copy back.
    last_finish_time: std::time::Duration,
    /// Bytes of the device buffers this backend made (weights, activations, caches).
    device_bytes: u64,
    /// Per-op timestamps (`UPG_PROFILE=1`); `None` records the passes without any.
    profile: Option<Profiler>,
    /// Read-back buffers of queued greedy tokens, used in turn (the pass after a queued token copies
    /// its own token while the first is being read), and the submissions in flight with the index of
    /// their buffer, oldest first.
    token_readback: [wgpu::Buffer; 2],
    queued: std::collections::VecDeque<(wgpu::SubmissionIndex, usize)>,
    next_readback: usize,
    vocab_of_queued: usize,
}

/// The command encoder of the pass being recorded, and its open compute pass.
struct Recording {
    pass: wgpu::ComputePass<'static>,
    encoder: wgpu::CommandEncoder,
}

impl GpuBackend {
    pub fn new(gpu: Gpu, kv_f16: bool) -> Result<Self> {
        let token = gpu.zeros(4)?.buffer;
        let step = gpu.step_buffer()?;
        let profile = Profiler::from_env(&gpu);
        let token_readback = [gpu.readback_buffer(4)?, gpu.readback_buffer(4)?];
        Ok(Self {
            fused_rope: gpu.knob("FUSED_ROPE") != Some(0.0),
            gpu,
            kv_f16,
            q3_weights: false,
            recording: None,
            error: None,
            token,
            step,
            start: None,
            attention_partials: None,
            ops: 0,
            last_ops: 0,
            recording_time: std::time::Duration::ZERO,
            last_recording_time: std::time::Duration::ZERO,
            last_finish_time: std::time::Duration::ZERO,
            device_bytes: 0,
            profile,
            token_readback,
            queued: Default::default(),
            next_readback: 0,
            vocab_of_queued: 0,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Positions one pass may take with or without q3 matrices: batches go through spmm.wgsl, where
    /// the device has its workgroup memory and the codecs have a decoder there (q3 has none).
    fn batch_limit(&self, q3: bool) -> usize {
        if self.gpu.has_batched_product() && !q3 {
            MAX_BATCH
        } else {
            1
        }
    }

    /// Bytes of the device buffers this backend made (weights, activations, caches).
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes + self.gpu.scratch_bytes()
    }

    fn dims(&self, s: &AttentionShape) -> AttentionDims {
        AttentionDims {
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            window: s.window.unwrap_or(0),
            kv_f16: self.kv_f16,
        }
    }

    /// Records one launch into the open pass (opening one if needed), keeping the first error.
    /// `label` names the op in the profile (called only when profiling).
    fn record(
        &mut self,
        label: impl FnOnce(&Gpu) -> String,
        f: impl FnOnce(&Gpu, &mut wgpu::ComputePass<'static>) -> crate::gpu::Result<()>,
    ) {
        if self.error.is_some() {
            return;
        }
        self.ops += 1;
        let started = std::time::Instant::now();
        let gpu = &self.gpu;
        let profile = &mut self.profile;
        let rec = self.recording.get_or_insert_with(|| {
            let mut encoder = gpu.device().create_command_encoder(&Default::default());
            let mut pass = encoder
                .begin_compute_pass(&Default::default())
                .forget_lifetime();
            if let Some(p) = profile.as_mut() {
                p.start(&mut pass);
            }
            Recording { pass, encoder }
        });
        if let Err(e) = f(gpu, &mut rec.pass) {
            self.error = Some(e);
        }
        if let Some(p) = profile.as_mut() {
            p.stamp(&mut rec.pass, label(gpu));
        }
        self.recording_time += started.elapsed();
    }

    /// Makes `start` the position the recorded pass reads from the step buffer. Passes of different
    /// positions (prefill without a read in between) go in separate submissions, because the step
    /// word is written through the queue, between submissions.
    fn set_start(&mut self, start: usize) {
        if self.start == Some(start) || self.error.is_some() {
            return;
        }
        if self.start.is_some() {
            // Waiting keeps at most one pass in flight (thousands of queued prefill passes are
            // refused by some drivers); a wait costs ~0.1 ms against a pass of several.
            let encoder = self.encoder();
            if let Some(p) = self.profile.as_mut() {
                p.discard();
            }
            if let Err(e) = self.gpu.submit_and_wait(encoder.finish()) {
                self.error = Some(e);
                return;
            }
        }
        if let Err(e) = self.gpu.write_step(&self.step, start) {
            self.error = Some(e);
        }
        self.start = Some(start);
    }

    /// Closes the open pass and hands back its encoder (a fresh one when nothing was recorded).
    fn encoder(&mut self) -> wgpu::CommandEncoder {
        self.start = None;
        match self.recording.take() {
            Some(Recording { pass, encoder }) => {
                drop(pass);
                encoder
            }
            None => self
                .gpu
                .device()
                .create_command_encoder(&Default::default()),
        }
    }

    /// Records argmax of logits[..vocab] into the token buffer (id in word 0) and returns that buffer.
    fn record_argmax(&mut self, logits: &GpuVector, vocab: usize) -> Result<wgpu::Buffer> {
        let words = Gpu::argmax_words(vocab);
        if self.token.size() < 4 * words as u64 {
            // Sized on first use: the chunk winners of argmax's first launch follow the token id.
            self.token = self.gpu.zeros(words)?.buffer;
        }
        let token = self.token.clone();
        self.record(
            |_| "argmax".into(),
            |gpu, pass| gpu.argmax(pass, &logits.buffer, 0, vocab, &token),
        );
        Ok(token)
    }

    /// Submits everything recorded plus a copy of `bytes` bytes of `buf`, and returns them.
    fn finish_and_read(&mut self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let mut encoder = self.encoder();
        self.last_ops = std::mem::take(&mut self.ops);
        self.last_recording_time = std::mem::take(&mut self.recording_time);
        if let Some(e) = self.error.take() {
            if let Some(p) = self.profile.as_mut() {
                p.discard();
            }
            return Err(e.into());
        }
        let timed = self
            .profile
            .as_mut()
            .is_some_and(|p| p.resolve(&mut encoder));
        let started = std::time::Instant::now();
        let out = self.gpu.submit_and_read(encoder, buf, 0, bytes)?;
        self.last_finish_time = started.elapsed();
        if let (true, Some(p)) = (timed, self.profile.as_mut()) {
            p.collect(&self.gpu)?;
        }
        Ok(out)
    }

    /// [`Gpu::attention_decode`] of the one row of a decode step, with the partials buffer kept
    /// from step to step; `rope`: cos, sin and the rotary half, to rotate and append the row too.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &mut self,
        qkv: &GpuVector,
        k: &GpuVector,
        v: &GpuVector,
        out: &GpuVector,
        dims: &AttentionDims,
        ctx: usize,
        rope: Option<(&GpuVector, &GpuVector, usize)>,
    ) {
        let chunks = Gpu::attention_chunks(ctx);
        let len = Gpu::attention_partials_len(dims, chunks);
        let partials = match self.attention_partials.take() {
            Some(b) if b.size() >= 4 * len as u64 => b,
            // NaN, not zeros: a chunk the combine reads before the split writes it shows in the
            // output (every attention test would fail) instead of passing as a stale finite value.
            _ => match self.gpu.vector(&vec![f32::NAN; len]) {
                Ok(v) => {
                    self.device_bytes += v.buffer.size();
                    v.buffer
                }
                Err(e) => {
                    self.error.get_or_insert(e);
                    return;
                }
            },
        };
        self.attention_partials = Some(partials.clone());
        let step = self.step.clone();
        let label = if rope.is_some() {
            "rope+kv_store+attention"
        } else {
            "attention"
        };
        let rope = rope.map(|(c, s, half)| (c.buffer.clone(), s.buffer.clone(), half));
        self.record(
            |_| label.into(),
            |gpu, pass| {
                let (q, k, v, o) = (&qkv.buffer, &k.buffer, &v.buffer, &out.buffer);
                let rope = rope.as_ref().map(|(c, s, half)| (c, s, *half));
                gpu.attention_decode(pass, q, k, v, &partials, o, &step, dims, chunks, rope)
            },
        );
    }
}

/// The profile's name of a product: codec and shape (the shape tells Phi-4's projections apart), and
/// for one position the column parts of a split spmv.
fn product_label(gpu: &Gpu, what: &str, w: &GpuMatrix, n: usize) -> String {
    let parts = match gpu.spmv_parts(w) {
        Ok(p) if p > 1 && n == 1 => format!(" split {p}"),
        _ => String::new(),
    };
    batch_label(
        &format!("{what} {:?} {}x{}{parts}", w.codec, w.rows, w.cols),
        n,
    )
}

/// A batch (prefill) says its size, so that its rows stay apart from decode's in the profile.
fn batch_label(what: &str, n: usize) -> String {
    if n == 1 {
        what.to_string()
    } else {
        format!("{what} (batch of {n})")
    }
}

/// y = W x for n rows (y += W x with `add`): one vector through the decode kernels, a batch through
/// spmm.wgsl.
fn product(
    gpu: &Gpu,
    pass: &mut wgpu::ComputePass<'static>,
    w: &GpuMatrix,
    x: &GpuVector,
    y: &GpuVector,
    n: usize,
    add: bool,
) -> crate::gpu::Result<()> {
    let (x, y) = (view(x, n * w.cols), view(y, n * w.rows));
    let residual = add.then_some(&y);
    if n == 1 {
        gpu.matvec(pass, w, &x, &y, residual)
    } else {
        gpu.matmat(pass, w, &x, &y, n, residual)
    }
}

/// A view of `len` values of a device buffer (the kernels check lengths against matrix shapes).
fn view(v: &GpuVector, len: usize) -> GpuVector {
    GpuVector {
        buffer: v.buffer.clone(),
        len,
    }
}

impl Backend for GpuBackend {
    type Buffer = GpuVector;
    type Matrix = GpuMatrix;

    fn name(&self) -> String {
        self.gpu.describe()
    }

    fn matrix(&mut self, host: Tensor) -> Result<GpuMatrix> {
        // spmm.wgsl has no q3 decoder: a model with q3 matrices feeds one position a pass.
        self.q3_weights |= host.codec() == crate::format::Codec::Q3;
        let m = self.gpu.upload(&host)?;
        self.device_bytes += m.device_bytes();
        Ok(m)
    }

    fn gate_up_matrix(&mut self, host: Tensor) -> Result<GpuMatrix> {
        // Rows in SwiGLU pairs order (spmv's epilogue writes silu(gate) * up) unless the
        // SWIGLU_EPILOGUE=0 knob (GpuOptions::overrides, UPG_OVERRIDES) asks for the file's order.
        if self.gpu.knob("SWIGLU_EPILOGUE") == Some(0.0) {
            return self.matrix(host);
        }
        self.q3_weights |= host.codec() == crate::format::Codec::Q3;
        let m = self.gpu.upload_gate_up(&host)?;
        self.device_bytes += m.device_bytes();
        Ok(m)
    }

    fn buffer(&mut self, values: &[f32]) -> Result<GpuVector> {
        let v = self.gpu.vector(values)?;
        self.device_bytes += v.buffer.size();
        Ok(v)
    }

    fn scratch(&mut self, len: usize) -> Result<GpuVector> {
        // Zeroed: the matrix kernels read x in whole 64-column blocks, so padding must be zero.
        let v = self.gpu.zeros(len)?;
        self.device_bytes += v.buffer.size();
        Ok(v)
    }

    fn kv_cache(&mut self, ctx: usize, kv_dim: usize) -> Result<GpuVector> {
        let len = if self.kv_f16 {
            ctx * kv_dim / 2
        } else {
            ctx * kv_dim
        };
        self.scratch(len)
    }

    fn stats(&self) -> String {
        let mut s = format!(
            "{:.1} MB of device buffers, {} ops in the last pass (one submission), recorded in {:.2} ms, \
             then encoded, run and read back in {:.2} ms",
            self.device_bytes as f64 / 1e6,
            self.last_ops,
            self.last_recording_time.as_secs_f64() * 1e3,
            self.last_finish_time.as_secs_f64() * 1e3
        );
        if let Some(p) = &self.profile {
            s += "\n";
            s += &p.table();
        }
        s
    }

    fn check_fit(
        &self,
        config: &super::Config,
        weights: &super::HostWeights,
        ctx: usize,
        batch: usize,
    ) -> Result<()> {
        let q3 =
            super::device_fit::matrices(weights).any(|m| m.codec() == crate::format::Codec::Q3);
        let rows = ctx.min(batch).min(self.batch_limit(self.q3_weights || q3));
        super::device_fit::Footprint::of(&self.gpu, config, weights, ctx, rows, self.kv_f16)?
            .check(&self.gpu, ctx)
    }

    fn max_batch(&self) -> usize {
        self.batch_limit(self.q3_weights)
    }

    fn prefill_batch(&self) -> usize {
        self.max_batch()
    }

    fn embed(&mut self, table: &GpuMatrix, tokens: &[u32], out: &mut GpuVector) {
        let cols = table.cols;
        self.record(
            |_| "embed".into(),
            |gpu, pass| {
                for (t, &id) in tokens.iter().enumerate() {
                    gpu.embed(pass, table, id as usize, &out.buffer, t * cols)?;
                }
                Ok(())
            },
        );
    }

    fn matmul(&mut self, w: &GpuMatrix, x: &GpuVector, y: &mut GpuVector, n: usize) {
        self.record(
            |gpu| product_label(gpu, "matmul", w, n),
            |gpu, pass| product(gpu, pass, w, x, y, n, false),
        );
    }

    fn matmul_add(&mut self, w: &GpuMatrix, x: &GpuVector, y: &mut GpuVector, n: usize) {
        self.record(
            |gpu| product_label(gpu, "matmul+add", w, n),
            |gpu, pass| product(gpu, pass, w, x, y, n, true),
        );
    }

    fn rmsnorm(
        &mut self,
        x: &GpuVector,
        weight: &GpuVector,
        eps: f32,
        out: &mut GpuVector,
        n: usize,
        width: usize,
    ) {
        self.record(
            |_| batch_label("rmsnorm", n),
            |gpu, pass| {
                gpu.rmsnorm(
                    pass,
                    &x.buffer,
                    0,
                    &weight.buffer,
                    &out.buffer,
                    eps,
                    n,
                    width,
                )
            },
        );
    }

    fn rope(
        &mut self,
        qkv: &mut GpuVector,
        cos: &GpuVector,
        sin: &GpuVector,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let dims = self.dims(s);
        self.set_start(start);
        let step = self.step.clone();
        self.record(
            |_| "rope".into(),
            |gpu, pass| {
                let half = s.rotary_dim / 2;
                gpu.rope(
                    pass,
                    &qkv.buffer,
                    &cos.buffer,
                    &sin.buffer,
                    &step,
                    &dims,
                    half,
                    n,
                )
            },
        );
    }

    fn store_kv(
        &mut self,
        qkv: &GpuVector,
        k: &mut GpuVector,
        v: &mut GpuVector,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let dims = self.dims(s);
        self.set_start(start);
        let step = self.step.clone();
        self.record(
            |_| "kv_store".into(),
            |gpu, pass| gpu.kv_store(pass, &qkv.buffer, &k.buffer, &v.buffer, &step, &dims, n),
        );
    }

    fn attention(
        &mut self,
        qkv: &GpuVector,
        k: &GpuVector,
        v: &GpuVector,
        out: &mut GpuVector,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let dims = self.dims(s);
        self.set_start(start);
        if n == 1 {
            return self.attention_decode(qkv, k, v, out, &dims, s.ctx, None);
        }
        let step = self.step.clone();
        self.record(
            |_| batch_label("attention", n),
            |gpu, pass| {
                gpu.attention(
                    pass,
                    &qkv.buffer,
                    &k.buffer,
                    &v.buffer,
                    &out.buffer,
                    &step,
                    &dims,
                    n,
                )
            },
        );
    }

    fn matmul_norm(
        &mut self,
        w: &GpuMatrix,
        x: &GpuVector,
        weight: &GpuVector,
        eps: f32,
        normed: &mut GpuVector,
        y: &mut GpuVector,
        n: usize,
        width: usize,
    ) {
        let prologue = Prologue::Norm { weight, eps };
        if n != 1 || !w.takes(&prologue) {
            self.rmsnorm(x, weight, eps, normed, n, width);
            return self.matmul(w, normed, y, n);
        }
        self.record(
            |gpu| product_label(gpu, "norm+matmul", w, 1),
            |gpu, pass| {
                let prologue = Prologue::Norm { weight, eps };
                let (x, y) = (view(x, w.cols), view(y, w.rows));
                gpu.matvec_fused(pass, w, &x, &y, None, prologue)
            },
        );
    }

    fn matmul_swiglu_add(
        &mut self,
        w: &GpuMatrix,
        gate_up: &GpuVector,
        mlp: &mut GpuVector,
        y: &mut GpuVector,
        width: usize,
        n: usize,
    ) {
        if n != 1 || width != w.cols || !w.takes(&Prologue::SwiGlu) {
            self.silu_mul(gate_up, mlp, width, n);
            return self.matmul_add(w, mlp, y, n);
        }
        self.record(
            |gpu| product_label(gpu, "swiglu+matmul+add", w, 1),
            |gpu, pass| {
                let (x, y) = (view(gate_up, 2 * w.cols), view(y, w.rows));
                gpu.matvec_fused(pass, w, &x, &y, Some(&y), Prologue::SwiGlu)
            },
        );
    }

    fn mlp(
        &mut self,
        gate_up: &GpuMatrix,
        down: &GpuMatrix,
        x: &mut GpuVector,
        weight: &GpuVector,
        eps: f32,
        normed: &mut GpuVector,
        gate_up_out: &mut GpuVector,
        mlp: &mut GpuVector,
        (n, hidden, width): (usize, usize, usize),
    ) {
        if !gate_up.swiglu_pairs() || gate_up.rows != 2 * width {
            self.matmul_norm(gate_up, x, weight, eps, normed, gate_up_out, n, hidden);
            return self.matmul_swiglu_add(down, gate_up_out, mlp, x, width, n);
        }
        if n == 1 {
            // The SwiGLU epilogue: gate_up writes h = silu(gate) * up, down stages h as it is.
            self.record(
                |gpu| product_label(gpu, "norm+matmul+swiglu", gate_up, 1),
                |gpu, pass| {
                    let prologue = Prologue::Norm { weight, eps };
                    let (x, h) = (view(x, hidden), view(mlp, width));
                    gpu.matvec_swiglu(pass, gate_up, &x, &h, prologue)
                },
            );
            return self.matmul_add(down, mlp, x, 1);
        }
        // A batch: gate_up's rows come out in pairs order, which silu_mul reads.
        self.matmul_norm(gate_up, x, weight, eps, normed, gate_up_out, n, hidden);
        self.record(
            |_| batch_label("silu_mul", n),
            |gpu, pass| gpu.silu_mul(pass, &gate_up_out.buffer, &mlp.buffer, width, n, true),
        );
        self.matmul_add(down, mlp, x, n);
    }

    fn rope_store_kv(
        &mut self,
        qkv: &mut GpuVector,
        cos: &GpuVector,
        sin: &GpuVector,
        k: &mut GpuVector,
        v: &mut GpuVector,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let dims = self.dims(s);
        let half = s.rotary_dim / 2;
        if !Gpu::rope_kv_fits(&dims, half) {
            self.rope(qkv, cos, sin, s, start, n);
            return self.store_kv(qkv, k, v, s, start, n);
        }
        self.set_start(start);
        let step = self.step.clone();
        self.record(
            |_| "rope+kv_store".into(),
            |gpu, pass| {
                let (q, c, si) = (&qkv.buffer, &cos.buffer, &sin.buffer);
                gpu.rope_kv(pass, q, c, si, &k.buffer, &v.buffer, &step, &dims, half, n)
            },
        );
    }

    fn rope_attention(
        &mut self,
        qkv: &mut GpuVector,
        cos: &GpuVector,
        sin: &GpuVector,
        k: &mut GpuVector,
        v: &mut GpuVector,
        out: &mut GpuVector,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let half = s.rotary_dim / 2;
        if n != 1 || half == 0 || !self.fused_rope {
            self.rope_store_kv(qkv, cos, sin, k, v, s, start, n);
            return self.attention(qkv, k, v, out, s, start, n);
        }
        let dims = self.dims(s);
        self.set_start(start);
        self.attention_decode(qkv, k, v, out, &dims, s.ctx, Some((cos, sin, half)));
    }

    fn silu_mul(&mut self, gate_up: &GpuVector, out: &mut GpuVector, width: usize, n: usize) {
        self.record(
            |_| "silu_mul".into(),
            |gpu, pass| gpu.silu_mul(pass, &gate_up.buffer, &out.buffer, width, n, false),
        );
    }

    fn add(&mut self, x: &mut GpuVector, y: &GpuVector, len: usize) {
        self.record(
            |_| "add".into(),
            |gpu, pass| gpu.add(pass, &x.buffer, &y.buffer, len),
        );
    }

    fn copy(
        &mut self,
        src: &GpuVector,
        src_offset: usize,
        dst: &mut GpuVector,
        dst_offset: usize,
        len: usize,
    ) {
        if self.error.is_some() {
            return;
        }
        // A buffer copy cannot sit inside a compute pass: close it, copy, and let the next op open another.
        let fresh = self.recording.is_none();
        let mut encoder = self.encoder();
        encoder.copy_buffer_to_buffer(
            &src.buffer,
            4 * src_offset as u64,
            &dst.buffer,
            4 * dst_offset as u64,
            4 * len as u64,
        );
        let mut pass = encoder
            .begin_compute_pass(&Default::default())
            .forget_lifetime();
        if let Some(p) = self.profile.as_mut() {
            if fresh {
                p.start(&mut pass);
            } else {
                p.stamp(&mut pass, "copy".into());
            }
        }
        self.recording = Some(Recording { pass, encoder });
    }

    fn sample(
        &mut self,
        logits: &GpuVector,
        vocab: usize,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<u32> {
        if sampler.is_greedy() && sampler.config.repeat_penalty == 1.0 {
            if self.can_queue_greedy() && self.queued.is_empty() {
                // Through the kept read-back buffers: no allocation per token.
                self.queue_greedy(logits, vocab)?;
                return self.wait_greedy();
            }
            let token = self.record_argmax(logits, vocab)?;
            let bytes = self.finish_and_read(&token, 4)?;
            return token_id(&bytes, vocab);
        }
        let bytes = self.finish_and_read(&logits.buffer, 4 * vocab as u64)?;
        let row: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        Ok(sampler.sample(&row, history))
    }

    fn read(&mut self, buf: &GpuVector, len: usize) -> Result<Vec<f32>> {
        let bytes = self.finish_and_read(&buf.buffer, 4 * len as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn can_queue_greedy(&self) -> bool {
        // Profiling reads its timestamps back after every pass.
        self.profile.is_none()
    }

    fn queue_greedy(&mut self, logits: &GpuVector, vocab: usize) -> Result<()> {
        let token = self.record_argmax(logits, vocab)?;
        let mut encoder = self.encoder();
        self.last_ops = std::mem::take(&mut self.ops);
        self.last_recording_time = std::mem::take(&mut self.recording_time);
        if let Some(e) = self.error.take() {
            return Err(e.into());
        }
        let slot = self.next_readback;
        if self.queued.iter().any(|&(_, s)| s == slot) {
            return Err(ModelError::Backend(
                "more than two greedy tokens queued: wait for one first".into(),
            ));
        }
        self.next_readback = (slot + 1) % self.token_readback.len();
        encoder.copy_buffer_to_buffer(&token, 0, &self.token_readback[slot], 0, 4);
        let index = self.gpu.submit(encoder.finish())?;
        self.queued.push_back((index, slot));
        self.vocab_of_queued = vocab;
        Ok(())
    }

    fn embed_queued(&mut self, table: &GpuMatrix, out: &mut GpuVector) {
        let token = self.token.clone();
        self.record(
            |_| "embed".into(),
            |gpu, pass| gpu.embed_token(pass, table, &token, &out.buffer, 0),
        );
    }

    fn wait_greedy(&mut self) -> Result<u32> {
        let Some((index, slot)) = self.queued.pop_front() else {
            return Err(ModelError::Backend("no greedy token is queued".into()));
        };
        let started = std::time::Instant::now();
        let bytes = self.gpu.read_after(index, &self.token_readback[slot])?;
        self.last_finish_time = started.elapsed();
        token_id(&bytes, self.vocab_of_queued)
    }
}

/// The token id in the first 4 bytes of `bytes`, checked against the vocabulary.
fn token_id(bytes: &[u8], vocab: usize) -> Result<u32> {
    let id = match bytes {
        [a, b, c, d, ..] => u32::from_le_bytes([*a, *b, *c, *d]),
        _ => {
            return Err(ModelError::Backend(
                "a token read-back of under 4 bytes".into(),
            ))
        }
    };
    if (id as usize) < vocab {
        Ok(id)
    } else {
        Err(ModelError::Backend(format!(
            "the GPU sampled token {id}, outside the vocabulary of {vocab}"
        )))
    }
}
