//! The CPU backend: every op runs when called, in f32, on all cores (rayon) where the work is large.
//!
//! Matrix products go to the crate's CPU kernels ([`crate::cpu::spmv`] for one position,
//! [`crate::cpu::spmm`] for a batch, which decodes each weight row once for all positions and equals
//! `spmv` bit for bit, so prefill and token-by-token decoding give identical logits). The kernels
//! report errors (a corrupt tensor, an unknown `UPG_CPU_SIMD`) as values; following the backend
//! contract, the first one is kept and returned by the next `sample` or `read`.

use rayon::prelude::*;

use super::backend::{AttentionShape, Backend};
use super::error::{ModelError, Result};
use super::sampler::Sampler;
use crate::cpu::{self, Simd};
use crate::format::Tensor;

#[derive(Default)]
pub struct Cpu {
    /// The SIMD path of the matrix kernels; `None` = [`Simd::detect`].
    simd: Option<Simd>,
    /// The first op failure since the last `sample` / `read`.
    failed: Option<String>,
    /// Products of `matmul_add` before they are added (kept to avoid an allocation per call).
    product: Vec<f32>,
}

impl Cpu {
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend whose matrix kernels use `simd` (for comparing paths).
    pub fn with_simd(simd: Simd) -> Self {
        Self {
            simd: Some(simd),
            ..Self::default()
        }
    }

    fn finish(&mut self) -> Result<()> {
        match self.failed.take() {
            Some(e) => Err(ModelError::Backend(e)),
            None => Ok(()),
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// y[t] = W x[t] for t < n; x is [n, cols] (or longer), y is [n, rows] (or longer).
pub fn linear(
    simd: Option<Simd>,
    w: &Tensor,
    x: &[f32],
    y: &mut [f32],
    n: usize,
) -> cpu::Result<()> {
    let [rows, cols] = w.shape();
    let simd = match simd {
        Some(s) => s,
        None => Simd::detect()?,
    };
    let (x, y) = (&x[..n * cols], &mut y[..n * rows]);
    if n == 1 {
        cpu::spmv_with(simd, w, x, y)
    } else {
        cpu::spmm_with(simd, w, x, n, y)
    }
}

impl Backend for Cpu {
    type Buffer = Vec<f32>;
    type Matrix = Tensor;

    fn name(&self) -> String {
        let simd = self.simd.map(Ok).unwrap_or_else(Simd::detect);
        format!(
            "cpu ({}, {} threads)",
            simd.map_or("no usable SIMD path", |s| s.name()),
            rayon::current_num_threads()
        )
    }

    fn matrix(&mut self, host: Tensor) -> Result<Tensor> {
        Ok(host)
    }

    fn buffer(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn scratch(&mut self, len: usize) -> Result<Vec<f32>> {
        // Reserved first: a request the machine cannot hold (a huge --ctx) is an error, not an abort.
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| {
            ModelError::Backend(format!(
                "cannot allocate {:.1} MiB of host memory for a buffer of {len} values: use a smaller --ctx",
                len as f64 * 4.0 / (1u64 << 20) as f64
            ))
        })?;
        // NaN, so that a value read before any op wrote it shows up in the output.
        v.resize(len, f32::NAN);
        Ok(v)
    }

    fn embed(&mut self, table: &Tensor, tokens: &[u32], out: &mut Vec<f32>) {
        let width = table.shape()[1];
        for (t, &tok) in tokens.iter().enumerate() {
            table.decode_row(tok as usize, &mut out[t * width..][..width]);
        }
    }

    fn matmul(&mut self, w: &Tensor, x: &Vec<f32>, y: &mut Vec<f32>, n: usize) {
        if let Err(e) = linear(self.simd, w, x, y, n) {
            let [rows, cols] = w.shape();
            self.failed.get_or_insert(format!(
                "matrix product with a [{rows}, {cols}] weight: {e}"
            ));
        }
    }

    fn matmul_add(&mut self, w: &Tensor, x: &Vec<f32>, y: &mut Vec<f32>, n: usize) {
        let mut product = std::mem::take(&mut self.product);
        product.resize(n * w.shape()[0], 0.0);
        self.matmul(w, x, &mut product, n);
        for (a, b) in y.iter_mut().zip(&product) {
            *a += b;
        }
        self.product = product;
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
        self.finish()?;
        Ok(sampler.sample(&logits[..vocab], history))
    }

    fn read(&mut self, buf: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        self.finish()?;
        Ok(buf[..len].to_vec())
    }
}
