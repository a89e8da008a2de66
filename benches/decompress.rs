//! Decompression of the sparse codec to dense weights: on the CPU path (`upg::cpu`, to f16 and to f32,
//! streaming stores, all rayon threads) and on the first GPU adapter (to f16, the layout the dense
//! kernels read).
//!
//! `cargo bench --bench decompress` runs the groups `cpu_square` and `gpu_square` (512 to 5120 square);
//! `UPG_BENCH_PHI4=1` adds `cpu_phi4` and `gpu_phi4` (outputs up to 2 GB); criterion's filter picks
//! among them. Throughput is the bytes moved: the compressed matrix read plus the dense one written,
//! as in the bench tool's decompress rows.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use upg::cpu;
use upg::gpu::DenseKind;

use common::Lazy;

fn decompress(c: &mut Criterion) {
    let gpu = common::gpu();
    for (set, shapes) in common::shape_sets() {
        let mut group = c.benchmark_group(format!("cpu_{set}"));
        group.sample_size(10);
        for &(rows, cols) in shapes {
            let w = Lazy::new(|| common::sparse(rows, cols));
            let stored = rows * cols * 25 / 64;
            group.throughput(Throughput::Bytes((stored + rows * cols * 2) as u64));
            group.bench_function(format!("f16/{rows}x{cols}"), |b| {
                let (w, mut out) = (w.get(), vec![f16::ZERO; rows * cols]);
                b.iter(|| cpu::decompress_f16(black_box(w), &mut out).expect("decompress"))
            });
            group.throughput(Throughput::Bytes((stored + rows * cols * 4) as u64));
            group.bench_function(format!("f32/{rows}x{cols}"), |b| {
                let (w, mut out) = (w.get(), vec![0.0f32; rows * cols]);
                b.iter(|| cpu::decompress_f32(black_box(w), &mut out).expect("decompress"))
            });
        }
        group.finish();
        let Some(gpu) = &gpu else { continue };
        let mut group = c.benchmark_group(format!("gpu_{set}"));
        group.sample_size(10);
        for &(rows, cols) in shapes {
            let io = Lazy::new(|| {
                let w = gpu.upload(&common::sparse(rows, cols)).expect("upload");
                let out = gpu.dense_zeros(rows, cols, DenseKind::F16).expect("output");
                (w, out)
            });
            group.throughput(Throughput::Bytes(
                (rows * cols * 25 / 64 + rows * cols * 2) as u64,
            ));
            group.bench_function(format!("f16/{rows}x{cols}"), |b| {
                let (w, out) = io.get();
                b.iter_custom(|iters| {
                    common::timed(gpu, iters, &|pass| gpu.decompress(pass, w, out))
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, decompress);
criterion_main!(benches);
