//! Random weights of a given shape, written straight into each codec's planes (no dense copy), for
//! throughput runs of models that are not on disk (`--synthetic phi-4`). Values are scaled like a trained
//! model's (each projection keeps activations near unit size), so the forward pass stays finite, but the
//! model is of course meaningless.
//!
//! The gpu branch may bring its own `SparseMatrix::random`; this generator is the model's, seeded per
//! tensor and row so that the same seed gives the same weights on any number of threads.

use half::f16;
use rayon::prelude::*;

use super::config::Config;
use super::weights::{CodecPlan, HostWeights, LayerWeights};
use crate::format::sparse::{self, BLOCK, BLOCK_CODE_BYTES, KEEP};
use crate::format::{Codec, DenseF16, DenseF32, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};
use crate::rng::Rng;

/// Root mean square of the 4-bit grid's levels (odd integers -15..15): sqrt(680 / 8).
const LEVEL_RMS: f32 = 9.219_544;

/// Random weights for `config` in the codecs of `plan`; the same `seed` gives the same model.
pub fn synthetic(config: &Config, seed: u64, plan: &CodecPlan) -> HostWeights {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut id = 0u64;
    let mut next = |rows: usize, cols: usize, codec: Codec, std: f32| {
        id += 1;
        random_tensor(
            rows,
            cols,
            codec,
            std,
            seed ^ id.wrapping_mul(0xA24B_AED4_963E_E407),
            plan,
        )
    };
    let linear = |cols: usize| 1.0 / (cols as f32).sqrt();
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for _ in 0..config.num_hidden_layers {
        layers.push(LayerWeights {
            attn_norm: vec![1.0; h],
            qkv: next(config.qkv_dim(), h, plan.linear, linear(h)),
            o: next(h, config.q_dim(), plan.linear, linear(config.q_dim())),
            mlp_norm: vec![1.0; h],
            gate_up: next(2 * i, h, plan.linear, linear(h)),
            down: next(h, i, plan.linear, linear(i)),
        });
    }
    let embed = next(config.vocab_size, h, plan.embed, 1.0);
    let lm_head =
        (!config.tie_word_embeddings).then(|| next(config.vocab_size, h, plan.lm_head, linear(h)));
    HostWeights {
        embed,
        layers,
        final_norm: vec![1.0; h],
        lm_head,
    }
}

fn row_rng(seed: u64, row: usize) -> Rng {
    let mut r = Rng::new(seed ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64();
    r
}

/// A random tensor in `codec` whose decoded weights have roughly standard deviation `std`.
pub fn random_tensor(
    rows: usize,
    cols: usize,
    codec: Codec,
    std: f32,
    seed: u64,
    plan: &CodecPlan,
) -> Tensor {
    match codec {
        Codec::F32 => {
            let mut values = vec![0.0f32; rows * cols];
            fill_rows(&mut values, cols, seed, |rng, row| {
                row.iter_mut().for_each(|v| *v = rng.normal() * std)
            });
            Tensor::F32(DenseF32 {
                rows,
                cols,
                values: values.into(),
            })
        }
        Codec::F16 => {
            let mut values = vec![f16::ZERO; rows * cols];
            fill_rows(&mut values, cols, seed, |rng, row| {
                row.iter_mut()
                    .for_each(|v| *v = f16::from_f32(rng.normal() * std))
            });
            Tensor::F16(DenseF16 {
                rows,
                cols,
                values: values.into(),
            })
        }
        Codec::Q3 => {
            let group = Q3Matrix::DEFAULT_GROUP;
            let padded = Q3Matrix::padded_cols(cols, group);
            let rb = Q3Matrix::row_bytes(cols, group);
            let mut codes = vec![0u8; rows * rb];
            fill_rows(&mut codes, rb, seed, random_bytes);
            // Level RMS of the 3-bit grid: sqrt(mean of (2c - 7)^2) = sqrt(21).
            let scales = vec![f16::from_f32(std / 21f32.sqrt()); rows * padded / group];
            Tensor::Q3(Q3Matrix {
                rows,
                cols,
                group,
                codes: codes.into(),
                scales: scales.into(),
            })
        }
        Codec::Q4 => {
            let group = plan.q4_group;
            let padded = Q4Matrix::padded_cols(cols, group);
            let mut codes = vec![0u8; rows * padded / 2];
            fill_rows(&mut codes, padded / 2, seed, random_bytes);
            let scales = vec![f16::from_f32(std / LEVEL_RMS); rows * padded / group];
            Tensor::Q4(Q4Matrix {
                rows,
                cols,
                group,
                codes: codes.into(),
                scales: scales.into(),
            })
        }
        Codec::Sparse => {
            let group = plan.sparse_group;
            let (nb, ng) = (
                sparse::blocks_per_row(cols),
                sparse::groups_per_row(cols, group),
            );
            let mut masks = vec![0u64; rows * nb];
            // Half the weights are zero, so kept ones are sqrt(2) larger for the same row variance.
            let scale = f16::from_f32(std * std::f32::consts::SQRT_2 / LEVEL_RMS);
            fill_rows(&mut masks, nb, seed, |rng, row| {
                for (b, m) in row.iter_mut().enumerate() {
                    *m = balanced_mask(rng, (cols - b * BLOCK).min(BLOCK));
                }
            });
            let mut codes = vec![0u8; rows * nb * BLOCK_CODE_BYTES];
            fill_rows(&mut codes, nb * BLOCK_CODE_BYTES, seed ^ 1, random_bytes);
            Tensor::Sparse(SparseMatrix {
                rows,
                cols,
                group,
                masks: masks.into(),
                codes: codes.into(),
                scales: vec![scale; rows * ng].into(),
            })
        }
    }
}

fn fill_rows<T: Send>(
    data: &mut [T],
    width: usize,
    seed: u64,
    f: impl Fn(&mut Rng, &mut [T]) + Sync,
) {
    if width == 0 {
        return;
    }
    data.par_chunks_mut(width)
        .enumerate()
        .for_each(|(r, row)| f(&mut row_rng(seed, r), row));
}

fn random_bytes(rng: &mut Rng, row: &mut [u8]) {
    for chunk in row.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A mask keeping 32 of the block's `n` real columns (all of them when n <= 32), as the encoder would.
fn balanced_mask(rng: &mut Rng, n: usize) -> u64 {
    if n <= KEEP {
        return !0u64 >> (64 - n);
    }
    // Partial Fisher-Yates: the first KEEP entries of a random permutation of 0..n.
    let mut cols: [u8; BLOCK] = std::array::from_fn(|i| i as u8);
    let mut mask = 0u64;
    for k in 0..KEEP {
        let j = k + rng.below(n - k);
        cols.swap(k, j);
        mask |= 1 << cols[k];
    }
    mask
}
