//! Every op of the model's [`Backend`] trait against a plain f64 implementation written here, on fresh
//! random inputs, with outputs poisoned (NaN) before the op writes them. The checks are generic over the
//! backend so that the GPU backend runs the same table. Also: RoPE tables against the published
//! formulas, and synthetic weights.

mod model_common;

use upg::cpu::{reference, Simd};
use upg::format::{Codec, Dense, Tensor};
use upg::model::backend::{AttentionShape, Backend};
use upg::model::cpu_backend::linear;
use upg::model::rope::{self, FactorSet, RopeTable};
use upg::model::weights::encode;
use upg::model::{synthetic, CodecPlan, Config, Cpu, Phi3, Sampler};
use upg::rng::{test_seed, Rng};

/// |got - want| <= tol * scale for every element, with a message naming the op and index.
fn close(op: &str, got: &[f32], want: &[f64], tol: f64, scale: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{op}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let bound = tol * scale(i);
        assert!(
            (g as f64 - w).abs() <= bound,
            "{op}: element {i}: got {g}, want {w} (bound {bound:.2e})"
        );
    }
}

/// Reads a backend buffer holding `len` values; poisoned scratch buffers stand for outputs.
fn poisoned<B: Backend>(b: &mut B, len: usize) -> B::Buffer {
    b.buffer(&vec![f32::NAN; len]).unwrap()
}

fn check_matmul<B: Backend>(b: &mut B, rng: &mut Rng) {
    // Shapes: a row count that is not a multiple of the parallel task size, Phi-like widths, batches.
    for &(rows, cols, n) in &[(1, 64, 1), (37, 100, 1), (70, 256, 3), (33, 128, 17)] {
        if n > b.max_batch() {
            continue;
        }
        for codec in [Codec::F32, Codec::F16, Codec::Q4, Codec::Q3, Codec::Sparse] {
            let w = rng.normal_vec(rows * cols, 0.1);
            let t = encode(
                &Dense::f32(rows, cols, &w).unwrap(),
                codec,
                &CodecPlan::exact(),
            )
            .unwrap();
            let decoded = reference::decompress_f32(&t);
            let x = rng.normal_vec(n * cols, 1.0);
            let mut want = vec![0.0f64; n * rows];
            let mut scale = vec![0.0f64; n * rows];
            for tt in 0..n {
                for r in 0..rows {
                    for c in 0..cols {
                        let p = decoded[r * cols + c] as f64 * x[tt * cols + c] as f64;
                        want[tt * rows + r] += p;
                        scale[tt * rows + r] += p.abs();
                    }
                }
            }
            let m = b.matrix(t).unwrap();
            let xb = b.buffer(&x).unwrap();
            let mut y = poisoned(b, n * rows);
            b.matmul(&m, &xb, &mut y, n);
            let got = b.read(&y, n * rows).unwrap();
            // f32 accumulation of `cols` products: error <= cols * eps * sum |products|.
            close(
                &format!("matmul {codec:?} [{rows}, {cols}] x {n}"),
                &got,
                &want,
                cols as f64 * f32::EPSILON as f64,
                |i| scale[i],
            );
            // The fused residual: y += W x on top of a random y.
            let r = rng.normal_vec(n * rows, 1.0);
            let mut y = b.buffer(&r).unwrap();
            b.matmul_add(&m, &xb, &mut y, n);
            let got = b.read(&y, n * rows).unwrap();
            let want: Vec<f64> = want.iter().zip(&r).map(|(w, &r)| w + r as f64).collect();
            close(
                &format!("matmul_add {codec:?} [{rows}, {cols}] x {n}"),
                &got,
                &want,
                (cols + 1) as f64 * f32::EPSILON as f64,
                |i| scale[i] + (r[i] as f64).abs(),
            );
        }
    }
}

fn check_rmsnorm<B: Backend>(b: &mut B, rng: &mut Rng) {
    let (n, width, eps) = (5, 96, 1e-5f32);
    let x = rng.normal_vec(n * width, 3.0);
    let w: Vec<f32> = (0..width).map(|_| rng.range(0.5, 1.5)).collect();
    let want: Vec<f64> = x
        .chunks(width)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / width as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            row.iter()
                .zip(&w)
                .map(move |(&v, &g)| v as f64 * inv * g as f64)
                .collect::<Vec<_>>()
        })
        .collect();
    let (xb, wb) = (b.buffer(&x).unwrap(), b.buffer(&w).unwrap());
    let mut out = poisoned(b, n * width);
    b.rmsnorm(&xb, &wb, eps, &mut out, n, width);
    close(
        "rmsnorm",
        &b.read(&out, n * width).unwrap(),
        &want,
        1e-5,
        |i| want[i].abs() + 1e-3,
    );
}

/// A small GQA shape: 4 query heads sharing 2 kv heads, head_dim 16, 12 of them rotated.
fn attention_shape(window: Option<usize>) -> AttentionShape {
    AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        rotary_dim: 12,
        window,
        ctx: 24,
    }
}

fn check_rope<B: Backend>(b: &mut B, rng: &mut Rng) {
    let s = attention_shape(None);
    let (start, n, half) = (5, 3, s.rotary_dim / 2);
    // Angles computed here, in f64, from theta = 500 (cos/sin tables are an input of the op).
    let angle =
        |pos: usize, i: usize| pos as f64 / 500f64.powf(2.0 * i as f64 / s.rotary_dim as f64);
    let cos: Vec<f32> = (0..s.ctx * half)
        .map(|k| angle(k / half, k % half).cos() as f32)
        .collect();
    let sin: Vec<f32> = (0..s.ctx * half)
        .map(|k| angle(k / half, k % half).sin() as f32)
        .collect();
    let qkv = rng.normal_vec(n * s.qkv_dim(), 1.0);
    let mut want: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
    for t in 0..n {
        // q heads and k heads rotate, v passes; in each head pairs (i, i + half), dims past rotary_dim pass.
        for h in 0..s.heads + s.kv_heads {
            let base = t * s.qkv_dim() + h * s.head_dim;
            for i in 0..half {
                let (c, sn) = (
                    cos[(start + t) * half + i] as f64,
                    sin[(start + t) * half + i] as f64,
                );
                let (a, bb) = (qkv[base + i] as f64, qkv[base + i + half] as f64);
                want[base + i] = a * c - bb * sn;
                want[base + i + half] = bb * c + a * sn;
            }
        }
    }
    let (cb, sb) = (b.buffer(&cos).unwrap(), b.buffer(&sin).unwrap());
    let mut buf = b.buffer(&qkv).unwrap();
    b.rope(&mut buf, &cb, &sb, &s, start, n);
    close(
        "rope",
        &b.read(&buf, qkv.len()).unwrap(),
        &want,
        1e-6,
        |i| want[i].abs() + 1.0,
    );
}

/// Causal grouped-query attention of n qkv rows (positions start..start + n) over caches k and v
/// ([ctx, kv_dim]), in f64: the definition that attention.wgsl and the split kernels implement.
fn attention_f64(
    s: &AttentionShape,
    qkv: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    n: usize,
) -> Vec<f64> {
    let (kvd, qd, hd) = (s.kv_dim(), s.q_dim(), s.head_dim);
    let mut want = vec![0.0f64; n * qd];
    for t in 0..n {
        let pos = start + t;
        let lo = s.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in 0..s.heads {
            let kvh = h / (s.heads / s.kv_heads);
            let q = &qkv[t * s.qkv_dim() + h * hd..][..hd];
            let scores: Vec<f64> = (lo..=pos)
                .map(|j| {
                    let kj = &k[j * kvd + kvh * hd..][..hd];
                    q.iter()
                        .zip(kj)
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let p = model_common::softmax(&scores);
            for (jj, j) in (lo..=pos).enumerate() {
                for d in 0..hd {
                    want[t * qd + h * hd + d] += p[jj] * v[j * kvd + kvh * hd + d] as f64;
                }
            }
        }
    }
    want
}

/// Attention of one decoded row over long caches, the case the GPU splits over the keys
/// (attention_split.wgsl + attention_combine.wgsl; chunks of 16 keys up to 128 chunks, so a cache over
/// 2048 rows has chunks of several 16-key tiles). Cases: chunk ends and window starts off the tile
/// grid, the last chunk short, 1 to 6 query heads per kv head (6: two workgroups per kv head), head
/// sizes 64 to 256, Phi-4's shape, and one key. The cache is filled through the backend's own
/// `kv_cache` and `store_kv` (f16 pairs on an f16 backend) with values exact in f16, so the
/// reference holds for both cache precisions.
fn check_decode_attention<B: Backend>(b: &mut B, rng: &mut Rng) {
    // (heads, kv heads, head_dim, window, ctx, position)
    let cases = [
        (8, 2, 64, None, 700, 650),
        (6, 1, 128, None, 2600, 2500),
        (8, 2, 64, Some(300), 2600, 2599),
        (4, 4, 96, None, 5000, 4321),
        (4, 4, 96, Some(1000), 5000, 4321),
        (40, 10, 128, None, 2048, 1900),
        (2, 1, 256, None, 40, 0),
    ];
    let f16_exact = |x: Vec<f32>| -> Vec<f32> {
        x.into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect()
    };
    for (case, (heads, kv_heads, head_dim, window, ctx, pos)) in cases.into_iter().enumerate() {
        let s = AttentionShape {
            heads,
            kv_heads,
            head_dim,
            // Every other case rotates only half of each head (as Phi-4-mini does 3/4).
            rotary_dim: if case % 2 == 0 {
                head_dim
            } else {
                head_dim / 2
            },
            window,
            ctx,
        };
        let (kvd, qd, width) = (s.kv_dim(), s.q_dim(), s.qkv_dim());
        // Rows 0..=pos of qkv: their k and v parts fill the cache, the last row's q asks.
        let rows = f16_exact(rng.normal_vec((pos + 1) * width, 1.0));
        let (mut k, mut v) = (vec![0.0f32; ctx * kvd], vec![0.0f32; ctx * kvd]);
        for (t, row) in rows.chunks(width).enumerate() {
            k[t * kvd..][..kvd].copy_from_slice(&row[qd..][..kvd]);
            v[t * kvd..][..kvd].copy_from_slice(&row[qd + kvd..][..kvd]);
        }
        let all = b.buffer(&rows).unwrap();
        let (mut kb, mut vb) = (b.kv_cache(ctx, kvd).unwrap(), b.kv_cache(ctx, kvd).unwrap());
        b.store_kv(&all, &mut kb, &mut vb, &s, 0, pos + 1);
        let last = &rows[pos * width..];
        let want = attention_f64(&s, last, &k, &v, pos, 1);
        let qb = b.buffer(last).unwrap();
        let mut out = poisoned(b, qd);
        b.attention(&qb, &kb, &vb, &mut out, &s, pos, 1);
        // f32 sums in another order than the reference's: errors under 2e-7 seen (outputs ~0.1); a
        // key left out or counted twice moves the outputs of its heads by about |v_j - out| / keys
        // (~1e-4 at 5000 keys).
        let what = format!(
            "decode attention {heads}/{kv_heads} heads of {head_dim}, window {window:?}, \
             position {pos} of {ctx}"
        );
        close(&what, &b.read(&out, qd).unwrap(), &want, 2e-6, |_| 1.0);

        // The same row through rope_attention (the GPU's decode step: one launch): q and the row's
        // key rotated for position pos (random tables), the key and value written over other
        // values in cache row pos, then attention. Then plain attention of the rotated q reads row
        // pos back from the cache: its f16 copy on an f16 cache (rounding 2^-11: 5e-3 allowed).
        let half = s.rotary_dim / 2;
        let cos: Vec<f32> = (0..ctx * half).map(|_| rng.range(-1.0, 1.0)).collect();
        let sin: Vec<f32> = (0..ctx * half).map(|_| rng.range(-1.0, 1.0)).collect();
        let mut rotated = last[..width].to_vec();
        for h in 0..heads + kv_heads {
            let base = h * head_dim;
            for i in 0..half {
                let (c, sn) = (cos[pos * half + i] as f64, sin[pos * half + i] as f64);
                let (x, y) = (last[base + i] as f64, last[base + i + half] as f64);
                rotated[base + i] = (x * c - y * sn) as f32;
                rotated[base + i + half] = (y * c + x * sn) as f32;
            }
        }
        k[pos * kvd..][..kvd].copy_from_slice(&rotated[qd..][..kvd]);
        let want = attention_f64(&s, &rotated, &k, &v, pos, 1);
        let mut other = rows.clone();
        for e in &mut other[pos * width + qd..][..2 * kvd] {
            *e = rng.range(-3.0, 3.0);
        }
        let other = b.buffer(&other).unwrap();
        b.store_kv(&other, &mut kb, &mut vb, &s, 0, pos + 1);
        let (cb, sb) = (b.buffer(&cos).unwrap(), b.buffer(&sin).unwrap());
        let mut qkvb = b.buffer(&last[..width]).unwrap();
        let mut out = poisoned(b, qd);
        b.rope_attention(&mut qkvb, &cb, &sb, &mut kb, &mut vb, &mut out, &s, pos, 1);
        let what = format!("{what}, rotary_dim {}, rope_attention", s.rotary_dim);
        close(&what, &b.read(&out, qd).unwrap(), &want, 2e-6, |_| 1.0);
        let qb = b.buffer(&rotated).unwrap();
        let mut out = poisoned(b, qd);
        b.attention(&qb, &kb, &vb, &mut out, &s, pos, 1);
        close(
            &format!("{what}: cache row {pos} read back"),
            &b.read(&out, qd).unwrap(),
            &want,
            5e-3,
            |_| 1.0,
        );
    }
}

/// Batched attention (prefill) over caches that already hold earlier positions: attention.wgsl on
/// the GPU, where a workgroup takes 32 (head_dim <= 128) or 16 query (token, head) rows of one kv
/// head and 64-key tiles. Cases: row counts off the block grid, blocks that end inside a token (3
/// heads a kv head), 1 to 4 heads a kv head, several tiles, windows shorter than the batch and
/// starting off the tile grid, heads of 2 to 256 dimensions (130 and 2: a half-used quad; over
/// 128: the 16-row blocks), Phi-4's shape, and start 0. Cache rows past the batch hold NaN, which
/// reach the outputs if a later value is read. The cache is filled through the backend's own
/// `kv_cache` and `store_kv` with values exact in f16, so the reference holds for both precisions.
fn check_batched_attention<B: Backend>(b: &mut B, rng: &mut Rng) {
    // (heads, kv heads, head_dim, window, ctx, start, n)
    let cases = [
        (8, 2, 64, None, 200, 90, 37),
        (6, 2, 64, None, 90, 3, 29),
        (4, 4, 32, Some(20), 100, 5, 70),
        (6, 3, 96, Some(50), 160, 41, 45),
        (4, 1, 130, None, 80, 10, 19),
        (2, 1, 256, Some(33), 100, 30, 21),
        (40, 10, 128, None, 150, 70, 40),
        (2, 1, 2, None, 10, 0, 5),
    ];
    let f16_exact = |x: Vec<f32>| -> Vec<f32> {
        x.into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect()
    };
    for (heads, kv_heads, head_dim, window, ctx, start, n) in cases {
        let s = AttentionShape {
            heads,
            kv_heads,
            head_dim,
            rotary_dim: head_dim,
            window,
            ctx,
        };
        let (kvd, qd, width) = (s.kv_dim(), s.q_dim(), s.qkv_dim());
        // Rows 0..start + n of qkv fill the cache, the last n ask; the rows after them are NaN.
        let rows = f16_exact(rng.normal_vec((start + n) * width, 1.0));
        let (mut k, mut v) = (vec![0.0f32; ctx * kvd], vec![0.0f32; ctx * kvd]);
        for (t, row) in rows.chunks(width).enumerate() {
            k[t * kvd..][..kvd].copy_from_slice(&row[qd..][..kvd]);
            v[t * kvd..][..kvd].copy_from_slice(&row[qd + kvd..][..kvd]);
        }
        let (mut kb, mut vb) = (b.kv_cache(ctx, kvd).unwrap(), b.kv_cache(ctx, kvd).unwrap());
        let later = ctx - start - n;
        let nan = b.buffer(&vec![f32::NAN; later * width]).unwrap();
        b.store_kv(&nan, &mut kb, &mut vb, &s, start + n, later);
        let all = b.buffer(&rows).unwrap();
        b.store_kv(&all, &mut kb, &mut vb, &s, 0, start + n);
        let asked = &rows[start * width..];
        let want = attention_f64(&s, asked, &k, &v, start, n);
        let qb = b.buffer(asked).unwrap();
        let mut out = poisoned(b, n * qd);
        b.attention(&qb, &kb, &vb, &mut out, &s, start, n);
        // f32 sums in another order than the reference's (outputs are ~0.1 to 1).
        close(
            &format!(
                "batched attention {heads}/{kv_heads} heads of {head_dim}, window {window:?}, \
                 rows {start}..{} of {ctx}",
                start + n
            ),
            &b.read(&out, n * qd).unwrap(),
            &want,
            1e-5,
            |_| 1.0,
        );
    }
}

fn check_kv_and_attention<B: Backend>(b: &mut B, rng: &mut Rng) {
    for window in [None, Some(4)] {
        let s = attention_shape(window);
        let (start, n) = (7, 4);
        let (kvd, qd) = (s.kv_dim(), s.q_dim());
        // Cache rows before `start` hold earlier positions; the new rows come from qkv.
        let mut k = rng.normal_vec(s.ctx * kvd, 1.0);
        let mut v = rng.normal_vec(s.ctx * kvd, 1.0);
        let qkv = rng.normal_vec(n * s.qkv_dim(), 1.0);
        let (mut kb, mut vb) = (b.buffer(&k).unwrap(), b.buffer(&v).unwrap());
        let qkvb = b.buffer(&qkv).unwrap();
        b.store_kv(&qkvb, &mut kb, &mut vb, &s, start, n);
        for t in 0..n {
            let row = &qkv[t * s.qkv_dim()..];
            k[(start + t) * kvd..][..kvd].copy_from_slice(&row[qd..][..kvd]);
            v[(start + t) * kvd..][..kvd].copy_from_slice(&row[qd + kvd..][..kvd]);
        }
        assert_eq!(b.read(&kb, k.len()).unwrap(), k, "store_kv keys");
        assert_eq!(b.read(&vb, v.len()).unwrap(), v, "store_kv values");

        let want = attention_f64(&s, &qkv, &k, &v, start, n);
        let mut out = poisoned(b, n * qd);
        b.attention(&qkvb, &kb, &vb, &mut out, &s, start, n);
        close(
            &format!("attention window {window:?}"),
            &b.read(&out, n * qd).unwrap(),
            &want,
            1e-5,
            |_| 1.0,
        );
    }
}

fn check_elementwise<B: Backend>(b: &mut B, rng: &mut Rng) {
    let (n, width) = (3, 40);
    let gu = rng.normal_vec(n * 2 * width, 2.0);
    let want: Vec<f64> = gu
        .chunks(2 * width)
        .flat_map(|r| {
            (0..width)
                .map(|i| {
                    let g = r[i] as f64;
                    g / (1.0 + (-g).exp()) * r[width + i] as f64
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let gub = b.buffer(&gu).unwrap();
    let mut out = poisoned(b, n * width);
    b.silu_mul(&gub, &mut out, width, n);
    close(
        "silu_mul",
        &b.read(&out, n * width).unwrap(),
        &want,
        1e-6,
        |i| want[i].abs() + 1e-3,
    );

    let x = rng.normal_vec(50, 1.0);
    let y = rng.normal_vec(50, 1.0);
    let (mut xb, yb) = (b.buffer(&x).unwrap(), b.buffer(&y).unwrap());
    b.add(&mut xb, &yb, 50);
    let want: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&a, &c)| a as f64 + c as f64)
        .collect();
    close("add", &b.read(&xb, 50).unwrap(), &want, 1e-7, |i| {
        want[i].abs() + 1e-7
    });

    let mut dst = poisoned(b, 20);
    b.copy(&yb, 10, &mut dst, 5, 15);
    let got = b.read(&dst, 20).unwrap();
    assert_eq!(&got[5..], &y[10..25], "copy");
    assert!(
        got[..5].iter().all(|v| v.is_nan()),
        "copy wrote outside its range"
    );

    // Embedding rows of a q4 or q3 table are its decoded rows (100 columns: a partial last run of
    // 32, and q3's split codes of columns 30 and 31 in the others).
    let (vocab, hidden) = (30, 100);
    for codec in [Codec::Q4, Codec::Q3] {
        let table = encode(
            &Dense::f32(vocab, hidden, &rng.normal_vec(vocab * hidden, 1.0)).unwrap(),
            codec,
            &CodecPlan::exact(),
        )
        .unwrap();
        let decoded = reference::decompress_f32(&table);
        let tokens = [3u32, 29, 0, 3];
        let m = b.matrix(table).unwrap();
        let mut out = poisoned(b, tokens.len() * hidden);
        b.embed(&m, &tokens, &mut out);
        let got = b.read(&out, tokens.len() * hidden).unwrap();
        for (t, &tok) in tokens.iter().enumerate() {
            assert_eq!(
                &got[t * hidden..][..hidden],
                &decoded[tok as usize * hidden..][..hidden],
                "embed {codec:?} token {tok}"
            );
        }
    }
}

/// Greedy sampling: the first index of the largest value, NaN skipped, over lengths around the GPU
/// kernel's unrolled scan (256 threads x 16 values) and with the maximum repeated.
fn check_greedy<B: Backend>(b: &mut B, rng: &mut Rng) {
    for len in [1, 255, 4096, 4097, 9000, 100_352] {
        let mut logits = rng.normal_vec(len, 3.0);
        for _ in 0..len / 100 {
            let i = rng.below(len);
            logits[i] = f32::NAN;
        }
        // The maximum three times, twice in one GPU thread's slice: the lowest index must win.
        let a = rng.below(len);
        for i in [a, (a + 256 * (1 + rng.below(20))) % len, rng.below(len)] {
            logits[i] = 50.0;
        }
        let want = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0;
        let buf = b.buffer(&logits).unwrap();
        let got = b.sample(&buf, len, &mut Sampler::greedy(), &[]).unwrap();
        assert_eq!(got as usize, want, "greedy over {len} logits");
    }
}

/// The fused ops (norm inside a product, SiLU * up inside a product with its residual, RoPE with the
/// K/V append) against f64 compositions of their parts. Widths that the GPU cannot fuse (a SwiGLU width
/// not a multiple of 4, dense codecs, an odd rotary half) take the composed path and must agree too.
fn check_fused<B: Backend>(b: &mut B, rng: &mut Rng) {
    let eps = 1e-5f32;
    for &(rows, cols, n) in &[
        (37, 100, 1),
        (70, 256, 1),
        (33, 90, 1),
        (40, 960, 1),
        (9, 64, 3),
    ] {
        if n > b.max_batch() {
            continue;
        }
        for codec in [Codec::Sparse, Codec::Q4, Codec::Q3, Codec::F32] {
            let w = rng.normal_vec(rows * cols, 0.1);
            let t = encode(
                &Dense::f32(rows, cols, &w).unwrap(),
                codec,
                &CodecPlan::exact(),
            )
            .unwrap();
            let decoded = reference::decompress_f32(&t);
            let m = b.matrix(t).unwrap();
            // y = W x' (+ r) in f64, and sum |W x'| (+ |r|) per output.
            let product = |xs: &[f64], r: &[f32]| {
                let mut want = vec![0.0f64; n * rows];
                let mut scale = vec![0.0f64; n * rows];
                for tt in 0..n {
                    for row in 0..rows {
                        let o = tt * rows + row;
                        want[o] = r.get(o).map_or(0.0, |&v| v as f64);
                        scale[o] = want[o].abs();
                        for c in 0..cols {
                            let p = decoded[row * cols + c] as f64 * xs[tt * cols + c];
                            want[o] += p;
                            scale[o] += p.abs();
                        }
                    }
                }
                (want, scale)
            };

            // matmul_norm: x' = g * x / sqrt(mean(x^2) + eps), row by row.
            let x = rng.normal_vec(n * cols, 2.0);
            let g: Vec<f32> = (0..cols).map(|_| rng.range(0.5, 1.5)).collect();
            let xs: Vec<f64> = x
                .chunks(cols)
                .flat_map(|row| {
                    let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
                    let inv = 1.0 / (ms + eps as f64).sqrt();
                    row.iter()
                        .zip(&g)
                        .map(move |(&v, &g)| v as f64 * inv * g as f64)
                        .collect::<Vec<_>>()
                })
                .collect();
            let (want, scale) = product(&xs, &[]);
            let (xb, gb) = (b.buffer(&x).unwrap(), b.buffer(&g).unwrap());
            let mut normed = poisoned(b, n * cols);
            let mut y = poisoned(b, n * rows);
            b.matmul_norm(&m, &xb, &gb, eps, &mut normed, &mut y, n, cols);
            // The products' rounding, the sum of squares' (relative, all terms positive) and the norm
            // factor's few ulps.
            close(
                &format!("matmul_norm {codec:?} [{rows}, {cols}] x {n}"),
                &b.read(&y, n * rows).unwrap(),
                &want,
                (2 * cols + 16) as f64 * f32::EPSILON as f64,
                |i| scale[i],
            );

            // matmul_swiglu_add: y = r + W (silu(gate) * up), gate_up rows [gate | up].
            let gu = rng.normal_vec(n * 2 * cols, 2.0);
            let xs: Vec<f64> = gu
                .chunks(2 * cols)
                .flat_map(|row| {
                    (0..cols).map(|i| {
                        let g = row[i] as f64;
                        g / (1.0 + (-g).exp()) * row[cols + i] as f64
                    })
                })
                .collect();
            let r = rng.normal_vec(n * rows, 1.0);
            let (want, scale) = product(&xs, &r);
            let gub = b.buffer(&gu).unwrap();
            let mut mlp = poisoned(b, n * cols);
            let mut y = b.buffer(&r).unwrap();
            b.matmul_swiglu_add(&m, &gub, &mut mlp, &mut y, cols, n);
            // The products' rounding and a few ulps of exp in each x'.
            close(
                &format!("matmul_swiglu_add {codec:?} [{rows}, {cols}] x {n}"),
                &b.read(&y, n * rows).unwrap(),
                &want,
                (cols + 64) as f64 * f32::EPSILON as f64,
                |i| scale[i],
            );
        }
    }

    // rope_store_kv: rope (as check_rope computes it) then the rotated k and the v into the caches.
    for rotary_dim in [12, 10, 16] {
        let s = AttentionShape {
            rotary_dim,
            ..attention_shape(None)
        };
        let (start, n, half) = (5, 3.min(b.max_batch()), rotary_dim / 2);
        let (kvd, qd) = (s.kv_dim(), s.q_dim());
        let cos: Vec<f32> = (0..s.ctx * half).map(|_| rng.range(-1.0, 1.0)).collect();
        let sin: Vec<f32> = (0..s.ctx * half).map(|_| rng.range(-1.0, 1.0)).collect();
        let qkv = rng.normal_vec(n * s.qkv_dim(), 1.0);
        let mut want: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();
        for t in 0..n {
            for h in 0..s.heads + s.kv_heads {
                let base = t * s.qkv_dim() + h * s.head_dim;
                for i in 0..half {
                    let tab = (start + t) * half + i;
                    let (c, sn) = (cos[tab] as f64, sin[tab] as f64);
                    let (a, bb) = (qkv[base + i] as f64, qkv[base + i + half] as f64);
                    want[base + i] = a * c - bb * sn;
                    want[base + i + half] = bb * c + a * sn;
                }
            }
        }
        let k0 = rng.normal_vec(s.ctx * kvd, 1.0);
        let v0 = rng.normal_vec(s.ctx * kvd, 1.0);
        let mut want_k: Vec<f64> = k0.iter().map(|&v| v as f64).collect();
        let mut want_v: Vec<f64> = v0.iter().map(|&v| v as f64).collect();
        for t in 0..n {
            let row = &want[t * s.qkv_dim()..];
            want_k[(start + t) * kvd..][..kvd].copy_from_slice(&row[qd..][..kvd]);
            want_v[(start + t) * kvd..][..kvd].copy_from_slice(&row[qd + kvd..][..kvd]);
        }
        let (cb, sb) = (b.buffer(&cos).unwrap(), b.buffer(&sin).unwrap());
        let (mut kb, mut vb) = (b.buffer(&k0).unwrap(), b.buffer(&v0).unwrap());
        let mut qkvb = b.buffer(&qkv).unwrap();
        b.rope_store_kv(&mut qkvb, &cb, &sb, &mut kb, &mut vb, &s, start, n);
        let what = format!("rope_store_kv rotary_dim {rotary_dim}");
        let got = b.read(&qkvb, qkv.len()).unwrap();
        close(&format!("{what}: qkv"), &got, &want, 1e-6, |i| {
            want[i].abs() + 1.0
        });
        let got = b.read(&kb, k0.len()).unwrap();
        close(&format!("{what}: k"), &got, &want_k, 1e-6, |i| {
            want_k[i].abs() + 1.0
        });
        let got = b.read(&vb, v0.len()).unwrap();
        close(&format!("{what}: v"), &got, &want_v, 0.0, |_| 1.0);
    }
}

/// The MLP block (gate_up from `gate_up_matrix`, whose rows a GPU keeps in SwiGLU pairs where it can)
/// against f64: x += W_down (silu(g) * u), [g | u] = W_gate_up rmsnorm(x). Widths that are and are not
/// a multiple of 16 (pairs or not), one position and batches, sparse and q4 weights.
fn check_mlp<B: Backend>(b: &mut B, rng: &mut Rng) {
    let eps = 1e-5f32;
    let e = f32::EPSILON as f64;
    for &(hidden, width, n) in &[
        (100, 48, 1),
        (130, 80, 1),
        (64, 36, 1),
        (90, 48, 3),
        (200, 16, 2),
    ] {
        if n > b.max_batch() {
            continue;
        }
        for codec in [Codec::Sparse, Codec::Q4] {
            let make = |rng: &mut Rng, rows: usize, cols: usize| {
                let w = rng.normal_vec(rows * cols, 0.1);
                encode(
                    &Dense::f32(rows, cols, &w).unwrap(),
                    codec,
                    &CodecPlan::exact(),
                )
                .unwrap()
            };
            let (gu_t, down_t) = (make(rng, 2 * width, hidden), make(rng, hidden, width));
            let (wgu, wd) = (
                reference::decompress_f32(&gu_t),
                reference::decompress_f32(&down_t),
            );
            let x = rng.normal_vec(n * hidden, 2.0);
            let g: Vec<f32> = (0..hidden).map(|_| rng.range(0.5, 1.5)).collect();
            let (mut want, mut bound) = (vec![0.0f64; n * hidden], vec![0.0f64; n * hidden]);
            for t in 0..n {
                let row = &x[t * hidden..][..hidden];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hidden as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                let xs: Vec<f64> = row
                    .iter()
                    .zip(&g)
                    .map(|(&v, &g)| v as f64 * inv * g as f64)
                    .collect();
                // Each gate_up output with its bound (as matmul_norm's in check_fused), then h.
                let out = |k: usize| {
                    let w = &wgu[k * hidden..][..hidden];
                    let v: f64 = w.iter().zip(&xs).map(|(&a, &b)| a as f64 * b).sum();
                    let s: f64 = w.iter().zip(&xs).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                    (v, (2 * hidden + 16) as f64 * e * s)
                };
                let (mut h, mut dh) = (vec![0.0; width], vec![0.0; width]);
                for j in 0..width {
                    let ((gv, dg), (uv, du)) = (out(j), out(width + j));
                    let silu = gv / (1.0 + (-gv).exp());
                    h[j] = silu * uv;
                    dh[j] = 1.1 * uv.abs() * dg + silu.abs() * du + 8.0 * e * h[j].abs();
                }
                for i in 0..hidden {
                    let w = &wd[i * width..][..width];
                    let o = t * hidden + i;
                    want[o] =
                        x[o] as f64 + w.iter().zip(&h).map(|(&a, &b)| a as f64 * b).sum::<f64>();
                    let s: f64 = w.iter().zip(&h).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                    bound[o] = (width + 64) as f64 * e * (s + (x[o] as f64).abs())
                        + w.iter()
                            .zip(&dh)
                            .map(|(&a, &b)| (a as f64).abs() * b)
                            .sum::<f64>();
                }
            }
            let gate_up = b.gate_up_matrix(gu_t).unwrap();
            let down = b.matrix(down_t).unwrap();
            let (mut xb, gb) = (b.buffer(&x).unwrap(), b.buffer(&g).unwrap());
            let mut normed = poisoned(b, n * hidden);
            let mut gu_out = poisoned(b, n * 2 * width);
            let mut mlp = poisoned(b, n * width);
            b.mlp(
                &gate_up,
                &down,
                &mut xb,
                &gb,
                eps,
                &mut normed,
                &mut gu_out,
                &mut mlp,
                (n, hidden, width),
            );
            close(
                &format!("mlp {codec:?} hidden {hidden} width {width} x {n}"),
                &b.read(&xb, n * hidden).unwrap(),
                &want,
                1.0,
                |i| bound[i] + f64::MIN_POSITIVE,
            );
        }
    }
}

#[test]
fn cpu_ops_match_f64() {
    let mut rng = Rng::new(test_seed("cpu_ops_match_f64"));
    let mut cpu = Cpu::new();
    check_matmul(&mut cpu, &mut rng);
    check_rmsnorm(&mut cpu, &mut rng);
    check_rope(&mut cpu, &mut rng);
    check_kv_and_attention(&mut cpu, &mut rng);
    check_batched_attention(&mut cpu, &mut rng);
    check_decode_attention(&mut cpu, &mut rng);
    check_elementwise(&mut cpu, &mut rng);
    check_greedy(&mut cpu, &mut rng);
    check_fused(&mut cpu, &mut rng);
    check_mlp(&mut cpu, &mut rng);
}

#[test]
fn gpu_ops_match_f64() {
    let Some(gpu) = upg::gpu::gpu_or_skip(upg::gpu::GpuOptions::default()) else {
        return;
    };
    let mut rng = Rng::new(test_seed("gpu_ops_match_f64"));
    // An f32 KV cache: the checks hold every backend to f32 rounding.
    let mut b = upg::model::GpuBackend::new(gpu, false).unwrap();
    check_matmul(&mut b, &mut rng);
    check_rmsnorm(&mut b, &mut rng);
    check_rope(&mut b, &mut rng);
    check_kv_and_attention(&mut b, &mut rng);
    check_elementwise(&mut b, &mut rng);
    check_greedy(&mut b, &mut rng);
    check_fused(&mut b, &mut rng);
    check_mlp(&mut b, &mut rng);
}

/// The batched attention with both cache precisions; the f32 run on a device of at most 48
/// workgroups per dimension, so that launches go in 2D grids with workgroups to spare.
#[test]
fn gpu_batched_attention_matches_f64() {
    let mut rng = Rng::new(test_seed("gpu_batched_attention_matches_f64"));
    for kv_f16 in [true, false] {
        let opts = upg::gpu::GpuOptions {
            limits: upg::gpu::LimitOverrides {
                max_workgroups_per_dim: (!kv_f16).then_some(48),
                ..Default::default()
            },
            ..Default::default()
        };
        let Some(gpu) = upg::gpu::gpu_or_skip(opts) else {
            return;
        };
        let mut b = upg::model::GpuBackend::new(gpu, kv_f16).unwrap();
        check_batched_attention(&mut b, &mut rng);
    }
}

/// The split decode attention with both cache precisions (the table above, f32 KV, also runs in
/// gpu_ops_match_f64's backend through n = 1 rows of the model tests).
#[test]
fn gpu_decode_attention_matches_f64_at_long_contexts() {
    let mut rng = Rng::new(test_seed(
        "gpu_decode_attention_matches_f64_at_long_contexts",
    ));
    for kv_f16 in [true, false] {
        let Some(gpu) = upg::gpu::gpu_or_skip(upg::gpu::GpuOptions::default()) else {
            return;
        };
        let mut b = upg::model::GpuBackend::new(gpu, kv_f16).unwrap();
        check_decode_attention(&mut b, &mut rng);
    }
}

/// Greedy picks queued on the device: the pass after one embeds the picked row without the host
/// knowing it (every chunk of a split table launched, only the one holding the id writing), and the
/// picks come back in order while a later pass is already submitted.
#[test]
fn gpu_queued_greedy_embeds_the_pick_on_the_device() {
    // 1 KiB bindings split the 64-column q4 table (36 bytes a row) into chunks of a few rows.
    let opts = upg::gpu::GpuOptions {
        limits: upg::gpu::LimitOverrides {
            max_binding_bytes: Some(1024),
            ..Default::default()
        },
        ..upg::gpu::GpuOptions::default()
    };
    let Some(gpu) = upg::gpu::gpu_or_skip(opts) else {
        return;
    };
    let mut rng = Rng::new(test_seed("gpu_queued_greedy_embeds_the_pick_on_the_device"));
    let mut b = upg::model::GpuBackend::new(gpu, false).unwrap();
    assert!(b.can_queue_greedy());
    let (vocab, hidden) = (150, 64);
    let table = encode(
        &Dense::f32(vocab, hidden, &rng.normal_vec(vocab * hidden, 1.0)).unwrap(),
        Codec::Q4,
        &CodecPlan::exact(),
    )
    .unwrap();
    let decoded = reference::decompress_f32(&table);
    let m = b.matrix(table).unwrap();
    assert!(
        m.chunks() > 4,
        "the table must be split: {} chunk(s)",
        m.chunks()
    );
    let picks: Vec<usize> = (0..5).map(|_| rng.below(vocab)).collect();
    let logits: Vec<_> = picks
        .iter()
        .map(|&p| {
            let mut l = rng.normal_vec(vocab, 1.0);
            l[p] = 10.0;
            b.buffer(&l).unwrap()
        })
        .collect();
    let mut rows = Vec::new();
    for (i, l) in logits.iter().enumerate() {
        if i > 0 {
            let mut out = poisoned(&mut b, hidden);
            b.embed_queued(&m, &mut out);
            rows.push(out);
        }
        b.queue_greedy(l, vocab).unwrap();
        if i > 0 {
            // One pass in flight behind the one waited for.
            assert_eq!(
                b.wait_greedy().unwrap() as usize,
                picks[i - 1],
                "pick {}",
                i - 1
            );
        }
    }
    assert_eq!(b.wait_greedy().unwrap() as usize, picks[4], "pick 4");
    assert!(b.wait_greedy().is_err(), "nothing left to wait for");
    for (i, out) in rows.iter().enumerate() {
        let got = b.read(out, hidden).unwrap();
        assert_eq!(
            got,
            &decoded[picks[i] * hidden..][..hidden],
            "row embedded after pick {i} (token {})",
            picks[i]
        );
    }
}

#[test]
fn gpu_fused_ops_match_f64_over_x_tiles_and_slices() {
    // x staged 2 blocks at a time by 4 slices: the norm's sum of squares spans several x tiles; 8 KiB
    // bindings split the larger matrices into row chunks, each its own launch with its own norm factor.
    // With ROW_LANES 2 and 4, each tile's rows go to several workgroups, each with its own norm factor
    // over all of x, and each row's blocks to 2 or 8 shares. One slice of 32 threads stages up to 16
    // blocks (240 vec4 at 960 columns) four rounds at a time and then the rest; STAGE_ROUNDS 1 one
    // round at a time.
    let mut rng = Rng::new(test_seed("gpu_fused_ops_match_f64_over_x_tiles_and_slices"));
    // COL_SPLIT 3 and 5: each row's blocks in column parts (some without blocks at 2 and 4 blocks),
    // each part's squares and SiLU * up over its columns only, the norm factor, the residual and the
    // sums put together by spmv_combine.wgsl.
    for (lanes, slices, tile_blocks, rounds, parts) in [
        (1.0, 4.0, 2.0, 4.0, 1.0),
        (2.0, 1.0, 16.0, 4.0, 1.0),
        (4.0, 2.0, 8.0, 1.0, 1.0),
        (1.0, 4.0, 2.0, 4.0, 3.0),
        (2.0, 16.0, 64.0, 1.0, 5.0),
    ] {
        let opts = upg::gpu::GpuOptions {
            overrides: vec![
                ("TILE_BLOCKS".into(), tile_blocks),
                ("SLICES".into(), slices),
                ("ROW_LANES".into(), lanes),
                ("STAGE_ROUNDS".into(), rounds),
                ("COL_SPLIT".into(), parts),
            ],
            limits: upg::gpu::LimitOverrides {
                max_binding_bytes: Some(8192),
                ..Default::default()
            },
            ..upg::gpu::GpuOptions::default()
        };
        let Some(gpu) = upg::gpu::gpu_or_skip(opts) else {
            return;
        };
        let mut b = upg::model::GpuBackend::new(gpu, false).unwrap();
        check_fused(&mut b, &mut rng);
        check_mlp(&mut b, &mut rng);
    }
}

#[test]
fn cpu_ops_match_f64_on_every_simd_path() {
    let mut rng = Rng::new(test_seed("cpu_ops_match_f64_on_every_simd_path"));
    for simd in Simd::available() {
        check_matmul(&mut Cpu::with_simd(simd), &mut rng);
    }
}

/// Prefill (a batch) and decoding (one position) must give the same logits: the batched product equals
/// the single one bit for bit.
#[test]
fn cpu_linear_batched_equals_single_bit_for_bit() {
    let mut rng = Rng::new(test_seed("cpu_linear_batched_equals_single_bit_for_bit"));
    let (rows, cols, n) = (45, 192, 6);
    for codec in [Codec::F32, Codec::F16, Codec::Q4, Codec::Q3, Codec::Sparse] {
        let w = rng.normal_vec(rows * cols, 0.05);
        let t = encode(
            &Dense::f32(rows, cols, &w).unwrap(),
            codec,
            &CodecPlan::exact(),
        )
        .unwrap();
        let x = rng.normal_vec(n * cols, 1.0);
        let mut batched = vec![f32::NAN; n * rows];
        linear(None, &t, &x, &mut batched, n).unwrap();
        for tt in 0..n {
            let mut single = vec![f32::NAN; rows];
            linear(None, &t, &x[tt * cols..][..cols], &mut single, 1).unwrap();
            assert_eq!(
                &batched[tt * rows..][..rows],
                &single[..],
                "{codec:?}, input {tt}"
            );
        }
    }
}

#[test]
fn cpu_op_failures_surface_at_the_end_of_the_pass() {
    // A tensor whose planes do not fit its shape: the product fails, `read` reports it.
    let mut t = encode(
        &Dense::f32(4, 64, &[0.1; 256]).unwrap(),
        Codec::F32,
        &CodecPlan::exact(),
    )
    .unwrap();
    if let Tensor::F32(m) = &mut t {
        m.rows = 5;
    }
    let mut cpu = Cpu::new();
    let m = cpu.matrix(t).unwrap();
    let x = cpu.buffer(&[1.0; 64]).unwrap();
    let mut y = cpu.scratch(5).unwrap();
    cpu.matmul(&m, &x, &mut y, 1);
    let err = cpu.read(&y, 5).unwrap_err().to_string();
    assert!(err.contains("[5, 64]"), "{err}");
    // Reported once: the next pass starts clean.
    assert!(cpu.read(&y, 5).is_ok());
}

// ---------------------------------------------------------------------------------------------------
// RoPE tables

#[test]
fn rope_tables_follow_the_published_formulas() {
    let seed = test_seed("rope_tables_follow_the_published_formulas");
    let mut rng = Rng::new(seed);
    let short: Vec<f64> = (0..6).map(|_| rng.range(1.0, 3.0) as f64).collect();
    let long: Vec<f64> = (0..6).map(|_| rng.range(1.0, 20.0) as f64).collect();
    let json = format!(
        r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 10, "partial_rotary_factor": 0.75,
            "max_position_embeddings": 256, "original_max_position_embeddings": 32,
            "rope_theta": 5000.0, "rope_scaling": {{"type": "longrope",
            "short_factor": {short:?}, "long_factor": {long:?}}}}}"#
    );
    let c = Config::from_json(&json).unwrap();
    // LongRoPE paper / transformers: s = sqrt(1 + ln(256 / 32) / ln(32)).
    let s = (1.0 + 8f64.ln() / 32f64.ln()).sqrt();
    for (set, f) in [(FactorSet::Short, &short), (FactorSet::Long, &long)] {
        let t = RopeTable::new(&c, set, 40);
        assert_eq!(t.half, 6);
        for pos in [0usize, 1, 17, 39] {
            for (i, fi) in f.iter().enumerate() {
                let a = pos as f64 / (fi * 5000f64.powf(2.0 * i as f64 / 12.0));
                let (got_c, got_s) = (t.cos[pos * 6 + i] as f64, t.sin[pos * 6 + i] as f64);
                assert!(
                    (got_c - a.cos() * s).abs() < 1e-6,
                    "{set:?} pos {pos} i {i} cos"
                );
                assert!(
                    (got_s - a.sin() * s).abs() < 1e-6,
                    "{set:?} pos {pos} i {i} sin"
                );
            }
        }
    }
    // Explicit attention_factor and factor override the derived ones.
    let with = json.replace(
        r#""type": "longrope","#,
        r#""type": "longrope", "attention_factor": 1.7,"#,
    );
    assert_eq!(
        rope::attention_scaling(&Config::from_json(&with).unwrap()),
        1.7
    );
    let with = json.replace(
        r#""type": "longrope","#,
        r#""type": "longrope", "factor": 1.0,"#,
    );
    assert_eq!(
        rope::attention_scaling(&Config::from_json(&with).unwrap()),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------------
// Synthetic weights

#[test]
fn synthetic_weights_are_valid_seeded_and_run() {
    let seed = test_seed("synthetic_weights_are_valid_seeded_and_run");
    let c = Config::preset("tiny").unwrap();
    let plan = CodecPlan::compressed();
    let w = synthetic(&c, seed, &plan);
    w.check(&c).unwrap();
    let all: Vec<&Tensor> = w
        .layers
        .iter()
        .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
        .chain([&w.embed])
        .chain(w.lm_head.as_ref())
        .collect();
    for t in &all {
        t.validate().unwrap();
    }
    assert_eq!(w.layers[0].qkv.codec(), Codec::Sparse);
    assert_eq!(w.embed.codec(), Codec::Q4);
    // Decoded linear weights have about the intended spread, 1 / sqrt(fan_in), half of them zero.
    for t in [&w.layers[0].gate_up, &w.layers[1].down] {
        let d = reference::decompress_f32(t);
        let cols = t.shape()[1];
        let rms = (d.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        let want = 1.0 / (cols as f64).sqrt();
        assert!((rms / want - 1.0).abs() < 0.15, "rms {rms}, want {want}");
        let zeros = d.iter().filter(|&&v| v == 0.0).count() as f64 / d.len() as f64;
        assert!((zeros - 0.5).abs() < 1e-9, "zero fraction {zeros}");
    }
    // The same seed gives the same model and the same tokens.
    let run = |w| {
        let mut m = Phi3::new(c.clone(), w, Cpu::new(), 16).unwrap();
        let out = m
            .generate(&[1, 2, 3], 6, &mut Sampler::greedy(), &[], |_| {})
            .unwrap();
        assert!(m.logits().unwrap().iter().all(|v| v.is_finite()));
        out.tokens
    };
    let again = synthetic(&c, seed, &plan);
    assert_eq!(
        w.layers[1].qkv.stored_bytes(),
        again.layers[1].qkv.stored_bytes()
    );
    let (a, b) = (
        reference::decompress_f32(&w.layers[1].qkv),
        reference::decompress_f32(&again.layers[1].qkv),
    );
    assert_eq!(a, b);
    assert_eq!(run(w), run(again));
}
