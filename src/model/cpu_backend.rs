//! The CPU backend: every op runs when called, in f32, on all cores (rayon) where the work is large.
//!
//! [`linear`] is the one matrix op. It has the reference kernel's semantics (decode each weight row with
//! the codec's `decode_row`, accumulate in f32 in column order, bit for bit what
//! `cpu::reference::spmv` gives) but runs rows in parallel and, for a batch of positions, decodes each
//! weight row once for all of them. The fast `cpu::spmv` / `cpu::spmm` kernels replace its body when
//! they land.

use rayon::prelude::*;

use super::backend::{AttentionShape, Backend};
use super::error::Result;
use super::sampler::Sampler;
use crate::format::Tensor;

/// Output rows per parallel task of [`linear`]: enough work per task to hide scheduling.
const ROWS_PER_TASK: usize = 16;

#[derive(Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y[t] = W x[t] for t < n; x is [n, cols], y is [n, rows].
pub fn linear(w: &Tensor, x: &[f32], y: &mut [f32], n: usize) {
    let [rows, cols] = w.shape();
    let (x, y) = (&x[..n * cols], &mut y[..n * rows]);
    if n == 1 {
        y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each_init(
            || vec![0.0f32; cols],
            |row, (c, ys)| {
                for (i, yr) in ys.iter_mut().enumerate() {
                    w.decode_row(c * ROWS_PER_TASK + i, row);
                    *yr = dot(row, x);
                }
            },
        );
        return;
    }
    // Batched: decode each weight row once, dot it with every input row; results land transposed
    // ([rows, n]) so each task writes one contiguous range.
    let mut yt = vec![0.0f32; rows * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; cols],
            |row, (c, out)| {
                for (i, o) in out.chunks_mut(n).enumerate() {
                    w.decode_row(c * ROWS_PER_TASK + i, row);
                    for (t, v) in o.iter_mut().enumerate() {
                        *v = dot(row, &x[t * cols..][..cols]);
                    }
                }
            },
        );
    y.par_chunks_mut(rows).enumerate().for_each(|(t, yr)| {
        for (r, v) in yr.iter_mut().enumerate() {
            *v = yt[r * n + t];
        }
    });
}

impl Backend for Cpu {
    type Buffer = Vec<f32>;
    type Matrix = Tensor;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn matrix(&mut self, host: Tensor) -> Result<Tensor> {
        Ok(host)
    }

    fn buffer(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn scratch(&mut self, len: usize) -> Result<Vec<f32>> {
        // NaN, so that a value read before any op wrote it shows up in the output.
        Ok(vec![f32::NAN; len])
    }

    fn embed(&mut self, table: &Tensor, tokens: &[u32], out: &mut Vec<f32>) {
        let width = table.shape()[1];
        for (t, &tok) in tokens.iter().enumerate() {
            table.decode_row(tok as usize, &mut out[t * width..][..width]);
        }
    }

    fn matmul(&mut self, w: &Tensor, x: &Vec<f32>, y: &mut Vec<f32>, n: usize) {
        linear(w, x, y, n);
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
        for (xr, or) in x[..n * width]
            .chunks(width)
            .zip(out[..n * width].chunks_mut(width))
        {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
                *o = w * (v * inv);
            }
        }
    }

    fn rope(
        &mut self,
        qkv: &mut Vec<f32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let half = s.rotary_dim / 2;
        let qk_heads = s.heads + s.kv_heads;
        for (t, row) in qkv.chunks_mut(s.qkv_dim()).take(n).enumerate() {
            let (c, sn) = (
                &cos[(start + t) * half..][..half],
                &sin[(start + t) * half..][..half],
            );
            // q heads then k heads are contiguous at the start of the row.
            for head in row[..qk_heads * s.head_dim].chunks_mut(s.head_dim) {
                let (x1, rest) = head.split_at_mut(half);
                let x2 = &mut rest[..half];
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * sn[i];
                    x2[i] = b * c[i] + a * sn[i];
                }
            }
        }
    }

    fn store_kv(
        &mut self,
        qkv: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let (qd, kvd) = (s.q_dim(), s.kv_dim());
        for (t, row) in qkv.chunks(s.qkv_dim()).take(n).enumerate() {
            let p = start + t;
            k_cache[p * kvd..][..kvd].copy_from_slice(&row[qd..][..kvd]);
            v_cache[p * kvd..][..kvd].copy_from_slice(&row[qd + kvd..][..kvd]);
        }
    }

    fn attention(
        &mut self,
        qkv: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        out: &mut Vec<f32>,
        s: &AttentionShape,
        start: usize,
        n: usize,
    ) {
        let (hd, kvd, qkvd) = (s.head_dim, s.kv_dim(), s.qkv_dim());
        let group = s.heads / s.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        out[..n * s.q_dim()]
            .par_chunks_mut(hd)
            .enumerate()
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, o)| {
                let (t, h) = (i / s.heads, i % s.heads);
                let pos = start + t;
                let q = &qkv[t * qkvd + h * hd..][..hd];
                let kv_off = (h / group) * hd;
                let keys = s.first_key(pos)..pos + 1;
                scores.clear();
                scores.extend(
                    keys.clone()
                        .map(|j| dot(q, &k_cache[j * kvd + kv_off..][..hd]) * scale),
                );
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut total = 0.0f32;
                for v in scores.iter_mut() {
                    *v = (*v - max).exp();
                    total += *v;
                }
                o.fill(0.0);
                for (j, &p) in keys.zip(scores.iter()) {
                    let w = p / total;
                    for (acc, &v) in o.iter_mut().zip(&v_cache[j * kvd + kv_off..][..hd]) {
                        *acc += w * v;
                    }
                }
            });
    }

    fn silu_mul(&mut self, gate_up: &Vec<f32>, out: &mut Vec<f32>, width: usize, n: usize) {
        for (gu, o) in gate_up.chunks(2 * width).zip(out.chunks_mut(width)).take(n) {
            let (g, u) = gu.split_at(width);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        for (a, b) in x[..len].iter_mut().zip(&y[..len]) {
            *a += b;
        }
    }

    fn copy(
        &mut self,
        src: &Vec<f32>,
        src_offset: usize,
        dst: &mut Vec<f32>,
        dst_offset: usize,
        len: usize,
    ) {
        dst[dst_offset..][..len].copy_from_slice(&src[src_offset..][..len]);
    }

    fn sample(
        &mut self,
        logits: &Vec<f32>,
        vocab: usize,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<u32> {
        Ok(sampler.sample(&logits[..vocab], history))
    }

    fn read(&mut self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        Ok(buf[..len].to_vec())
    }
}
