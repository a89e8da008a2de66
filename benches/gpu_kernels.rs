//! Criterion benches of the GPU kernels on the first adapter (`UPG_BACKEND` / `UPG_ADAPTER` choose
//! another): spmv and the dense f16 gemv baseline at the seed's square sizes, decompress to f16, and the
//! Phi-4 shapes in groups named `phi4`, which run only with `UPG_BENCH_PHI4=1` (they upload gigabytes:
//! `UPG_BENCH_PHI4=1 cargo bench --bench gpu_kernels -- phi4`).
//!
//! Each sample records `iters` launches in one compute pass and submits once, so the ~0.1 ms of a
//! submission is spread over the launches; the time is wall clock (criterion's), which includes the GPU's
//! dispatch gaps. For GPU-timestamp figures and % of copy bandwidth use `examples/bench.rs`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use upg::format::{DenseF16, SparseMatrix, Tensor};
use upg::gpu::{gpu_or_skip, DenseKind, Gpu, GpuMatrix, GpuOptions};
use upg::rng::Rng;

const SQUARE: &[(usize, usize)] = &[(512, 512), (1024, 1024), (2048, 2048), (5120, 5120)];
const PHI4: &[(usize, usize)] = &[
    (7680, 5120),
    (5120, 5120),
    (35840, 5120),
    (5120, 17920),
    (100352, 5120),
];

/// Times `iters` launches recorded by `launch` in one pass and one submission.
fn timed(
    gpu: &Gpu,
    iters: u64,
    launch: &dyn Fn(&mut wgpu::ComputePass<'_>) -> upg::gpu::Result<()>,
) -> Duration {
    let start = Instant::now();
    gpu.run(|pass| {
        for _ in 0..iters {
            launch(pass)?;
        }
        Ok(())
    })
    .expect("GPU launches");
    start.elapsed()
}

fn sparse(rows: usize, cols: usize) -> Tensor {
    let mut rng = Rng::new(7);
    Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).expect("valid shape"))
}

fn dense_f16(rows: usize, cols: usize) -> Tensor {
    let mut rng = Rng::new(8);
    let w = rng.normal_vec(rows * cols, 0.02);
    let d = upg::format::Dense::f32(rows, cols, &w).expect("shape");
    Tensor::F16(DenseF16::encode(&d).expect("finite"))
}

fn matvec(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    gpu: &Gpu,
    name: &str,
    w: &Tensor,
) {
    let [rows, cols] = w.shape();
    let m: GpuMatrix = gpu.upload(w).expect("upload");
    let x = gpu.vector(&vec![0.5; cols]).expect("x");
    let y = gpu.zeros(rows).expect("y");
    group.throughput(Throughput::Bytes(w.stored_bytes() as u64));
    group.bench_function(format!("{name} {rows}x{cols}"), |b| {
        b.iter_custom(|iters| timed(gpu, iters, &|pass| gpu.matvec(pass, &m, &x, &y, None)))
    });
}

fn products(c: &mut Criterion, group_name: &str, shapes: &[(usize, usize)]) {
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    for &(rows, cols) in shapes {
        matvec(&mut group, &gpu, "spmv", &sparse(rows, cols));
        matvec(&mut group, &gpu, "gemv_f16", &dense_f16(rows, cols));
    }
    group.finish();
}

fn decompress(c: &mut Criterion, group_name: &str, shapes: &[(usize, usize)]) {
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut group = c.benchmark_group(group_name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    for &(rows, cols) in shapes {
        let w = sparse(rows, cols);
        let m = gpu.upload(&w).expect("upload");
        let out = gpu.dense_zeros(rows, cols, DenseKind::F16).expect("output");
        // Bytes read (compressed) plus written (f16).
        group.throughput(Throughput::Bytes(
            (w.stored_bytes() + rows * cols * 2) as u64,
        ));
        group.bench_function(format!("f16 {rows}x{cols}"), |b| {
            b.iter_custom(|iters| timed(&gpu, iters, &|pass| gpu.decompress(pass, &m, &out)))
        });
    }
    group.finish();
}

fn square(c: &mut Criterion) {
    products(c, "gpu_square", SQUARE);
}

fn phi4_enabled() -> bool {
    std::env::var("UPG_BENCH_PHI4").is_ok_and(|v| v == "1")
}

fn phi4(c: &mut Criterion) {
    if phi4_enabled() {
        products(c, "gpu_phi4", PHI4);
    }
}

fn decompress_small(c: &mut Criterion) {
    decompress(c, "gpu_decompress", &[(1024, 1024), (5120, 5120)]);
}

fn decompress_phi4(c: &mut Criterion) {
    if phi4_enabled() {
        decompress(c, "gpu_decompress_phi4", &[(5120, 5120), (35840, 5120)]);
    }
}

criterion_group!(benches, square, decompress_small, phi4, decompress_phi4);
criterion_main!(benches);
