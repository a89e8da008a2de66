//! Whether a model fits a GPU, known from the host weights (shapes and codecs, as read from a file or
//! a checkpoint) before anything is uploaded: every buffer the GPU backend will make, against the
//! device's memory and its largest storage binding. A model that cannot fit is refused with the
//! numbers and what to change, instead of failing half-way through an upload of gigabytes (or being
//! killed by the driver).

use super::config::Config;
use super::error::{ModelError, Result};
use super::weights::HostWeights;
use crate::format::{MatrixSpec, Tensor};
use crate::gpu::{AttentionDims, Gpu, GpuVector};

const MIB: f64 = (1u64 << 20) as f64;

/// Device bytes a model will take, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Weight matrices in their GPU layout, and the norm vectors.
    pub weights: u64,
    /// K and V of every layer for the context.
    pub kv_cache: u64,
    /// Activation buffers, RoPE tables, and the scratch buffers of the products.
    pub activations: u64,
    /// The largest buffer that is not a weight chunk (weights are split to fit a binding), by name.
    pub largest: (String, u64),
}

/// Every weight matrix of `weights`.
pub(crate) fn matrices(weights: &HostWeights) -> impl Iterator<Item = &Tensor> {
    let layers = weights
        .layers
        .iter()
        .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]);
    std::iter::once(&weights.embed)
        .chain(weights.lm_head.as_ref())
        .chain(layers)
}

/// f32 values of the scratch buffer of the decode attention, made at the first decoded token.
fn attention_partials(c: &Config, ctx: usize, kv_f16: bool) -> usize {
    let dims = AttentionDims {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        window: c.sliding_window.unwrap_or(0),
        kv_f16,
    };
    Gpu::attention_partials_len(&dims, Gpu::attention_chunks(ctx))
}

impl Footprint {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.activations
    }

    /// What [`Phi3`](super::Phi3) on [`GpuBackend`](super::GpuBackend) will allocate for `weights`
    /// with a KV cache of `ctx` positions (f16 pairs when `kv_f16`) and activations for `rows`
    /// positions, once it has decoded a token. Mirrors the buffers of `Phi3::with_batch` and the sizes
    /// of `GpuBackend`.
    pub fn of(
        gpu: &Gpu,
        config: &Config,
        weights: &HostWeights,
        ctx: usize,
        rows: usize,
        kv_f16: bool,
    ) -> Result<Self> {
        let vector = GpuVector::device_bytes_for;
        let mut norms = vec![weights.final_norm.len()];
        for l in &weights.layers {
            norms.extend([l.attn_norm.len(), l.mlp_norm.len()]);
        }
        let mut weight_bytes = norms.iter().map(|&n| vector(n)).sum::<u64>();
        let specs: Vec<MatrixSpec> = matrices(weights).map(MatrixSpec::of).collect();
        for spec in &specs {
            weight_bytes += gpu.matrix_device_bytes(spec)?;
        }

        let c = config;
        let kv_len = if kv_f16 {
            ctx * c.kv_dim() / 2
        } else {
            ctx * c.kv_dim()
        };
        let half = c.rotary_dim() / 2;
        let tables = if c.rope_scaling.is_some() { 2 } else { 1 };
        let mut buffers: Vec<(String, u64)> = vec![(
            format!("the K (and the V) cache of one layer for a context of {ctx}"),
            vector(kv_len),
        )];
        for _ in 0..tables {
            buffers.push((
                format!("a RoPE table for a context of {ctx}"),
                2 * vector(ctx * half),
            ));
        }
        for (name, len) in [
            ("the residual stream", rows * c.hidden_size),
            ("the normed input", rows * c.hidden_size),
            ("the qkv activations", rows * c.qkv_dim()),
            ("the attention output", rows * c.q_dim()),
            ("the gate_up activations", rows * 2 * c.intermediate_size),
            ("the MLP activations", rows * c.intermediate_size),
            ("the last hidden state", c.hidden_size),
            ("the logits", rows * c.vocab_size),
            (
                "the split attention's partial results",
                attention_partials(c, ctx, kv_f16),
            ),
        ] {
            buffers.push((name.to_string(), vector(len)));
        }

        // The products' scratch buffers (column splits, x in f16 parts): each fits a binding by
        // construction, so they count toward the total only.
        let activations =
            buffers[1..].iter().map(|b| b.1).sum::<u64>() + gpu.scratch_estimate(&specs, rows)?;
        let largest = buffers
            .iter()
            .max_by_key(|b| b.1)
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            weights: weight_bytes,
            kv_cache: 2 * c.num_hidden_layers as u64 * vector(kv_len),
            activations,
            largest,
        })
    }

    /// Refuses a footprint the device cannot hold: a buffer over its largest binding, or a total over
    /// its memory (where the driver or `UPG_DEVICE_MEMORY_MIB` says how much there is).
    pub fn check(&self, gpu: &Gpu, ctx: usize) -> Result<()> {
        let adapter = gpu.info().name.clone();
        let max = gpu.limits().max_binding_bytes;
        let (name, bytes) = &self.largest;
        if *bytes > max {
            return Err(ModelError::DoesNotFit {
                adapter,
                reason: format!(
                    "{name} takes {bytes} bytes, over the device's largest storage binding of {max} bytes: use a smaller --ctx (now {ctx}) or prompt batch (--batch)"
                ),
            });
        }
        let Some(memory) = gpu.memory() else {
            return Ok(());
        };
        if self.total() > memory.bytes {
            return Err(ModelError::DoesNotFit {
                adapter,
                reason: format!(
                    "it needs an estimated {:.1} MiB of device memory ({:.1} MiB of weights, {:.1} MiB of KV cache for a context of {ctx}, {:.1} MiB of activations) and the device has {:.1} MiB ({}): use a smaller --ctx, more compressed weights (the sparse and q4 codecs), or the CPU (--backend cpu)",
                    self.total() as f64 / MIB,
                    self.weights as f64 / MIB,
                    self.kv_cache as f64 / MIB,
                    self.activations as f64 / MIB,
                    memory.bytes as f64 / MIB,
                    memory.source
                ),
            });
        }
        Ok(())
    }
}
