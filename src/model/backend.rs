//! The compute a Phi-3 forward pass needs, behind one trait, so the model code never says "CPU" or
//! "GPU". [`crate::model::cpu_backend::Cpu`] implements it now; the wgpu backend implements the same
//! trait.
//!
//! # Contract: ops are recorded, not run
//!
//! A forward pass is a fixed sequence of op calls. A backend may run each op as it is called (the CPU)
//! or only RECORD it, e.g. as one compute dispatch into a single command buffer per token (the GPU), and
//! submit at the end. Therefore:
//! - Ops return nothing and never read results back; bad shapes are the caller's bug (the model checks
//!   its inputs before the pass), and device failures surface at the next [`Backend::sample`] or
//!   [`Backend::read`].
//! - Only [`Backend::sample`] and [`Backend::read`] end a pass: they submit what was recorded and wait.
//!   In generation the sampled token id is the only value that comes back per token. A GPU backend runs
//!   greedy sampling on the device; for temperature / top-k / top-p it may read back the one row of
//!   logits and run [`Sampler`] on the host. [`Backend::read`] is for tests and logit dumps.
//! - Host data goes in only through arguments known before the pass (token ids, positions), written
//!   with the commands, never computed from a previous op's output on the host.
//!
//! # Layouts
//!
//! Activations are f32, row-major `[n, width]`, one row per position; the positions of a call are
//! `start..start + n`. Buffers may be longer than an op uses (they are sized for the largest batch).
//! `qkv` rows are `[q_dim | kv_dim | kv_dim]` as qkv_proj produces them; K and V caches are
//! `[ctx, kv_dim]` per layer, row = position.

use super::config::Config;
use super::error::{ModelError, Result};
use super::sampler::Sampler;
use super::weights::HostWeights;
use crate::format::Tensor;

/// Attention dimensions, fixed for a model and context size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each q/k head that RoPE rotates (rotate-half pairs i and i + rotary_dim/2).
    pub rotary_dim: usize,
    /// Positions a query sees: keys in (pos - window, pos]; `None` = all earlier positions.
    pub window: Option<usize>,
    /// Rows of the KV cache and of the RoPE tables.
    pub ctx: usize,
}

impl AttentionShape {
    pub fn new(config: &Config, ctx: usize) -> Self {
        Self {
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            rotary_dim: config.rotary_dim(),
            window: config.sliding_window,
            ctx,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// First key position that query position `pos` attends to.
    pub fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

pub trait Backend {
    /// An f32 buffer (CPU: `Vec<f32>`; GPU: a storage buffer).
    type Buffer;
    /// A weight matrix in the backend's form of its codec (CPU: the host [`Tensor`]).
    type Matrix;

    /// Adapter / device description for reports.
    fn name(&self) -> String;

    /// Takes a host weight matrix (CPU: as is; GPU: uploads its planes).
    fn matrix(&mut self, host: Tensor) -> Result<Self::Matrix>;
    /// Takes gate_up_proj ([2 width, hidden]: gate rows, then up rows). A backend may keep its rows in
    /// another order, since only [`Self::mlp`] is given it. Default: [`Self::matrix`].
    fn gate_up_matrix(&mut self, host: Tensor) -> Result<Self::Matrix> {
        self.matrix(host)
    }

    /// A buffer holding `values`.
    fn buffer(&mut self, values: &[f32]) -> Result<Self::Buffer>;
    /// A buffer of `len` values whose contents are undefined until an op writes them.
    fn scratch(&mut self, len: usize) -> Result<Self::Buffer>;

    /// One layer's K or V cache: `ctx` rows of `kv_dim` values, in whatever precision the backend
    /// keeps its cache (f32 by default).
    fn kv_cache(&mut self, ctx: usize, kv_dim: usize) -> Result<Self::Buffer> {
        self.scratch(ctx * kv_dim)
    }

    /// A line of figures for reports (device memory, launches per pass); empty when there are none.
    fn stats(&self) -> String {
        String::new()
    }

    /// The most positions one pass may take (activation buffers are sized for it).
    fn max_batch(&self) -> usize {
        usize::MAX
    }

    /// Refuses, before anything is uploaded, a model that the device cannot hold: `weights` with a
    /// KV cache of `ctx` positions and activations for up to `batch` positions a pass (fewer where
    /// [`Self::max_batch`] will be lower for these weights). Host memory is not checked (the CPU
    /// backend's allocations fail with an error of their own).
    fn check_fit(
        &self,
        _config: &Config,
        _weights: &HostWeights,
        _ctx: usize,
        _batch: usize,
    ) -> Result<()> {
        Ok(())
    }

    /// Positions per prompt pass of [`crate::model::Phi3::new`].
    fn prefill_batch(&self) -> usize {
        crate::model::phi3::PREFILL_BATCH
    }

    /// out[t] = row `tokens[t]` of `table` [vocab, width]. Token ids are < vocab (checked by the model).
    fn embed(&mut self, table: &Self::Matrix, tokens: &[u32], out: &mut Self::Buffer);

    /// y[t] = W x[t] for t < n: W [rows, cols], x [n, cols], y [n, rows]. The one matrix op.
    fn matmul(&mut self, w: &Self::Matrix, x: &Self::Buffer, y: &mut Self::Buffer, n: usize);

    /// y[t] += W x[t] for t < n: the residual add fused into the product (one launch, and the block's
    /// output never makes a round trip through memory).
    fn matmul_add(&mut self, w: &Self::Matrix, x: &Self::Buffer, y: &mut Self::Buffer, n: usize);

    /// out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps) for rows of `width`.
    fn rmsnorm(
        &mut self,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f32,
        out: &mut Self::Buffer,
        n: usize,
        width: usize,
    );

    /// Rotates the q and k heads of `qkv` rows in place for positions start..start+n, with `cos` and `sin`
    /// tables [ctx, rotary_dim / 2] (see [`crate::model::rope`]).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &mut self,
        qkv: &mut Self::Buffer,
        cos: &Self::Buffer,
        sin: &Self::Buffer,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    );

    /// Copies the k and v parts of `qkv` rows into cache rows start..start+n.
    fn store_kv(
        &mut self,
        qkv: &Self::Buffer,
        k_cache: &mut Self::Buffer,
        v_cache: &mut Self::Buffer,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    );

    /// Causal grouped-query attention: for row t (position p = start + t) and head h, softmax over keys
    /// first_key(p)..=p of (q . k) / sqrt(head_dim), using kv head h / (heads / kv_heads); the weighted
    /// sum of values goes to out[t][h * head_dim..]. out is [n, q_dim].
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        qkv: &Self::Buffer,
        k_cache: &Self::Buffer,
        v_cache: &Self::Buffer,
        out: &mut Self::Buffer,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    );

    /// out[t][i] = silu(gate_up[t][i]) * gate_up[t][width + i]: rows of gate_up are [2 width].
    fn silu_mul(&mut self, gate_up: &Self::Buffer, out: &mut Self::Buffer, width: usize, n: usize);

    /// x[..len] += y[..len].
    fn add(&mut self, x: &mut Self::Buffer, y: &Self::Buffer, len: usize);

    /// dst[dst_offset..][..len] = src[src_offset..][..len].
    fn copy(
        &mut self,
        src: &Self::Buffer,
        src_offset: usize,
        dst: &mut Self::Buffer,
        dst_offset: usize,
        len: usize,
    );

    /// y[t] = W rmsnorm(x[t]) (`weight`, `eps`, rows of `width`): the norm fused into the product where
    /// the backend can (one launch instead of two); otherwise the normed rows go through `normed`
    /// ([n, width] scratch, undefined afterwards).
    #[allow(clippy::too_many_arguments)]
    fn matmul_norm(
        &mut self,
        w: &Self::Matrix,
        x: &Self::Buffer,
        weight: &Self::Buffer,
        eps: f32,
        normed: &mut Self::Buffer,
        y: &mut Self::Buffer,
        n: usize,
        width: usize,
    ) {
        self.rmsnorm(x, weight, eps, normed, n, width);
        self.matmul(w, normed, y, n);
    }

    /// y[t] += W (silu(gate) * up) for gate_up rows [gate | up] of 2 `width`: [`Self::silu_mul`] fused
    /// into the product (and its residual add) where the backend can; otherwise through `mlp` ([n,
    /// width] scratch, undefined afterwards).
    fn matmul_swiglu_add(
        &mut self,
        w: &Self::Matrix,
        gate_up: &Self::Buffer,
        mlp: &mut Self::Buffer,
        y: &mut Self::Buffer,
        width: usize,
        n: usize,
    ) {
        self.silu_mul(gate_up, mlp, width, n);
        self.matmul_add(w, mlp, y, n);
    }

    /// The MLP block: x[t] += down (silu(gate) * up) with [gate | up] = gate_up rmsnorm(x[t]) (`weight`,
    /// `eps`, rows of `hidden`; gate and up of `width`), for t < n; `gate_up` from
    /// [`Self::gate_up_matrix`]. `normed` [n, hidden], `gate_up_out` [n, 2 width] and `mlp` [n, width]
    /// are scratch, undefined afterwards. Default: [`Self::matmul_norm`] then
    /// [`Self::matmul_swiglu_add`].
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &mut self,
        gate_up: &Self::Matrix,
        down: &Self::Matrix,
        x: &mut Self::Buffer,
        weight: &Self::Buffer,
        eps: f32,
        normed: &mut Self::Buffer,
        gate_up_out: &mut Self::Buffer,
        mlp: &mut Self::Buffer,
        (n, hidden, width): (usize, usize, usize),
    ) {
        self.matmul_norm(gate_up, x, weight, eps, normed, gate_up_out, n, hidden);
        self.matmul_swiglu_add(down, gate_up_out, mlp, x, width, n);
    }

    /// [`Self::rope`] then [`Self::store_kv`], in one launch where the backend can.
    #[allow(clippy::too_many_arguments)]
    fn rope_store_kv(
        &mut self,
        qkv: &mut Self::Buffer,
        cos: &Self::Buffer,
        sin: &Self::Buffer,
        k_cache: &mut Self::Buffer,
        v_cache: &mut Self::Buffer,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        self.rope(qkv, cos, sin, shape, start, n);
        self.store_kv(qkv, k_cache, v_cache, shape, start, n);
    }

    /// [`Self::rope_store_kv`] then [`Self::attention`] over the updated cache, in fewer launches where
    /// the backend can (the GPU's decode step folds RoPE and the K/V append into its attention). qkv
    /// may be left rotated or not: nothing reads it afterwards.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &mut self,
        qkv: &mut Self::Buffer,
        cos: &Self::Buffer,
        sin: &Self::Buffer,
        k_cache: &mut Self::Buffer,
        v_cache: &mut Self::Buffer,
        out: &mut Self::Buffer,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        self.rope_store_kv(qkv, cos, sin, k_cache, v_cache, shape, start, n);
        self.attention(qkv, k_cache, v_cache, out, shape, start, n);
    }

    /// Ends the pass: the token `sampler` picks from logits[..vocab] after the tokens in `history`.
    fn sample(
        &mut self,
        logits: &Self::Buffer,
        vocab: usize,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<u32>;

    /// Ends the pass and reads buf[..len] back (tests, logit dumps).
    fn read(&mut self, buf: &Self::Buffer, len: usize) -> Result<Vec<f32>>;

    /// Whether greedy decoding can run ahead: [`Self::queue_greedy`], [`Self::embed_queued`] and
    /// [`Self::wait_greedy`] work, so the pass that feeds a token is recorded and submitted before that
    /// token is read back, and the host's recording overlaps the GPU's run.
    fn can_queue_greedy(&self) -> bool {
        false
    }

    /// Ends the pass with the greedy token of logits[..vocab] picked on the device, and submits it
    /// without waiting. The id stays on the device for [`Self::embed_queued`]; [`Self::wait_greedy`]
    /// returns the queued ids in order.
    fn queue_greedy(&mut self, _logits: &Self::Buffer, _vocab: usize) -> Result<()> {
        Err(ModelError::Backend(format!(
            "{}: no queued greedy decoding (check can_queue_greedy)",
            self.name()
        )))
    }

    /// out[0] = row of `table` of the token of the latest [`Self::queue_greedy`], without reading it.
    fn embed_queued(&mut self, _table: &Self::Matrix, _out: &mut Self::Buffer) {}

    /// Waits for the oldest token of [`Self::queue_greedy`] not yet returned, and returns it.
    fn wait_greedy(&mut self) -> Result<u32> {
        Err(ModelError::Backend(format!(
            "{}: no queued greedy decoding (check can_queue_greedy)",
            self.name()
        )))
    }
}
