//! Activation statistics for activation-aware pruning (Wanda: saliency |w_ij| * ||x_j||).
//!
//! The exact model runs over calibration text on the CPU through [`Recorder`], a backend that forwards
//! every op to [`Cpu`] and, in `matmul`, adds the squares of each input column to that matrix's running
//! sums. So the forward pass stays the one in [`super::phi3`]: the inputs recorded are exactly what the
//! linear layers see there (qkv and gate_up: the RMS-normed hidden state; o_proj: the attention output;
//! down: SiLU(gate) * up). The fused ops (`matmul_norm`, `matmul_swiglu_add`) keep the trait's
//! composed defaults here, so their products' inputs are recorded normed and SiLU'd like the rest.
//!
//! On request it also keeps a sample of whole input rows per linear layer, spread evenly over the
//! calibration positions: the X of the output error ||(W - W') X|| that the codec choice measures
//! ([`super::codec_choice`]).

use std::collections::HashMap;

use super::backend::{AttentionShape, Backend};
use super::checkpoint::Checkpoint;
use super::cpu_backend::Cpu;
use super::error::{ModelError, Result};
use super::phi3::Phi3;
use super::sampler::Sampler;
use super::weights::{CodecPlan, HostWeights, Role, Weights};
use crate::format::Tensor;

/// Per linear layer (by Hugging Face tensor name), the L2 norm of each input column over all
/// calibration positions.
#[derive(Clone, Debug, Default)]
pub struct ActivationNorms {
    pub norms: HashMap<String, Vec<f32>>,
    /// Positions the norms were summed over.
    pub positions: usize,
    /// Per linear layer, sampled input rows, row-major [samples, cols] (empty unless asked for).
    pub inputs: HashMap<String, Vec<f32>>,
}

impl ActivationNorms {
    /// Runs the checkpoint's exact (f32) model over `tokens` in consecutive windows of `ctx`, each from
    /// position 0, and returns the input norms of every linear layer over all those positions.
    pub fn collect(ckpt: &Checkpoint, tokens: &[u32], ctx: usize) -> Result<Self> {
        Self::collect_sampled(ckpt, tokens, ctx, 0)
    }

    /// [`Self::collect`], also keeping up to `samples` input rows of every linear layer: the
    /// positions `0, s, 2s, ...` of the run, `s = max(1, tokens / samples)`.
    pub fn collect_sampled(
        ckpt: &Checkpoint,
        tokens: &[u32],
        ctx: usize,
        samples: usize,
    ) -> Result<Self> {
        let weights = HostWeights::from_checkpoint(ckpt, &CodecPlan::exact())?;
        let c = &ckpt.config;
        let recorder = Recorder {
            samples,
            stride: (tokens.len() / samples.max(1)).max(1),
            ..Recorder::default()
        };
        let mut model = Phi3::with_batch(c.clone(), weights, recorder, ctx, ctx)?;
        // Windows as in evaluation, every token fed (only the last position's logits are computed).
        for window in tokens.chunks(ctx.max(1)) {
            model.reset();
            model.forward(window)?;
        }
        let rec = model.backend();
        // Backend::matrix sees the matrices in `Weights::convert`'s order; `Weights::build` names them
        // in the same order, so the n-th recorded matrix is the n-th linear name.
        let mut names = Vec::new();
        Weights::<(), ()>::build(
            c,
            |m| {
                names.push((m.name.to_string(), m.role));
                Ok::<(), ModelError>(())
            },
            |_, _| Ok(()),
        )?;
        let layer_order = c.num_hidden_layers * 4;
        let (mut norms, mut inputs) = (HashMap::new(), HashMap::new());
        let linear = names.iter().filter(|(_, r)| *r == Role::Linear);
        for (i, (name, _)) in linear.enumerate().take(layer_order) {
            norms.insert(
                name.clone(),
                rec.sums[i].iter().map(|&s| s.sqrt() as f32).collect(),
            );
            if samples > 0 {
                inputs.insert(name.clone(), rec.kept[i].clone());
            }
        }
        Ok(Self {
            norms,
            positions: rec.positions,
            inputs,
        })
    }

    /// The norms of the matrix `name`, if it is a recorded linear layer.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.norms.get(name).map(Vec::as_slice)
    }

    /// The sampled input rows of the matrix `name` ([`Self::collect_sampled`]), row-major.
    pub fn inputs(&self, name: &str) -> Option<&[f32]> {
        self.inputs
            .get(name)
            .map(Vec::as_slice)
            .filter(|v| !v.is_empty())
    }
}

/// A matrix of the [`Recorder`]: its order of arrival, and the host tensor.
pub struct Recorded {
    id: usize,
    tensor: Tensor,
}

/// The CPU backend, recording the sum of squares of every matmul input column per matrix.
#[derive(Default)]
pub struct Recorder {
    cpu: Cpu,
    /// Per matrix (in order of [`Backend::matrix`] calls), per input column.
    sums: Vec<Vec<f64>>,
    /// Positions seen by the first matrix (every linear layer sees each position once).
    positions: usize,
    /// Input rows to keep per matrix, and every how many positions.
    samples: usize,
    stride: usize,
    /// Per matrix: positions seen, and the input rows kept (row-major).
    seen: Vec<usize>,
    kept: Vec<Vec<f32>>,
}

impl Recorder {
    /// Adds the squares of the input columns of a product with `w` (the inputs of o_proj and down_proj
    /// arrive through `matmul_add`, the others through `matmul`).
    fn record(&mut self, w: &Recorded, x: &[f32], n: usize) {
        let cols = w.tensor.shape()[1];
        let sums = &mut self.sums[w.id];
        for row in x[..n * cols].chunks(cols) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += (v as f64) * (v as f64);
            }
        }
        if w.id == 0 {
            self.positions += n;
        }
        for row in x[..n * cols].chunks(cols) {
            let pos = self.seen[w.id];
            self.seen[w.id] += 1;
            if pos.is_multiple_of(self.stride.max(1)) && self.kept[w.id].len() < self.samples * cols
            {
                self.kept[w.id].extend_from_slice(row);
            }
        }
    }
}

impl Backend for Recorder {
    type Buffer = Vec<f32>;
    type Matrix = Recorded;

    fn name(&self) -> String {
        format!("recording {}", self.cpu.name())
    }

    fn matrix(&mut self, host: Tensor) -> Result<Recorded> {
        self.sums.push(vec![0.0; host.shape()[1]]);
        self.seen.push(0);
        self.kept.push(Vec::new());
        Ok(Recorded {
            id: self.sums.len() - 1,
            tensor: host,
        })
    }

    fn buffer(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        self.cpu.buffer(values)
    }

    fn scratch(&mut self, len: usize) -> Result<Vec<f32>> {
        self.cpu.scratch(len)
    }

    fn embed(&mut self, table: &Recorded, tokens: &[u32], out: &mut Vec<f32>) {
        self.cpu.embed(&table.tensor, tokens, out)
    }

    fn matmul(&mut self, w: &Recorded, x: &Vec<f32>, y: &mut Vec<f32>, n: usize) {
        self.record(w, x, n);
        self.cpu.matmul(&w.tensor, x, y, n)
    }

    fn matmul_add(&mut self, w: &Recorded, x: &Vec<f32>, y: &mut Vec<f32>, n: usize) {
        self.record(w, x, n);
        self.cpu.matmul_add(&w.tensor, x, y, n)
    }

    fn rmsnorm(
        &mut self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
        n: usize,
        width: usize,
    ) {
        self.cpu.rmsnorm(x, weight, eps, out, n, width)
    }

    fn rope(
        &mut self,
        qkv: &mut Vec<f32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        self.cpu.rope(qkv, cos, sin, shape, start, n)
    }

    fn store_kv(
        &mut self,
        qkv: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        self.cpu.store_kv(qkv, k_cache, v_cache, shape, start, n)
    }

    fn attention(
        &mut self,
        qkv: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        out: &mut Vec<f32>,
        shape: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        self.cpu
            .attention(qkv, k_cache, v_cache, out, shape, start, n)
    }

    fn silu_mul(&mut self, gate_up: &Vec<f32>, out: &mut Vec<f32>, width: usize, n: usize) {
        self.cpu.silu_mul(gate_up, out, width, n)
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        self.cpu.add(x, y, len)
    }

    fn copy(
        &mut self,
        src: &Vec<f32>,
        src_offset: usize,
        dst: &mut Vec<f32>,
        dst_offset: usize,
        len: usize,
    ) {
        self.cpu.copy(src, src_offset, dst, dst_offset, len)
    }

    fn sample(
        &mut self,
        logits: &Vec<f32>,
        vocab: usize,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<u32> {
        self.cpu.sample(logits, vocab, sampler, history)
    }

    fn read(&mut self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        self.cpu.read(buf, len)
    }
}
