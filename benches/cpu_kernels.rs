//! CPU kernel throughput: sparse spmv against the dense f32 gemv on the same shapes, and decompression.
//!
//! `cargo bench --bench cpu_kernels` runs everything; `-- phi4` selects the Phi-4 projection shapes,
//! `-- square` the square ones, `-- decompress` the decoders. Throughput is in bytes of weights read
//! (spmv, gemv) or written (decompress), so criterion prints GB/s. The SIMD path is `Simd::detect()`
//! (`UPG_CPU_SIMD` forces one).

use std::cell::OnceCell;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use half::f16;
use upg::cpu;
use upg::format::{Dense, SparseMatrix, Tensor};
use upg::rng::Rng;

/// Phi-4 projections as [out, in]: qkv, o, gate_up, down.
const PHI4: &[(usize, usize)] = &[(7680, 5120), (5120, 5120), (35840, 5120), (5120, 17920)];
const SQUARE: &[usize] = &[512, 1024, 2048, 5120];

fn random_weights(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normal_vec(n, 0.02)
}

/// The sparse codec with the default group (3.125 bits per weight).
fn encode(w: &[f32], rows: usize, cols: usize) -> Tensor {
    Tensor::Sparse(SparseMatrix::encode(&Dense::f32(rows, cols, w).unwrap(), 128, None).unwrap())
}

/// Inputs are made on first use: criterion's filter skips a benchmark without calling it, and
/// encoding the largest shape takes seconds.
fn bench_shape(
    group: &mut BenchmarkGroup<criterion::measurement::WallTime>,
    seed: u64,
    rows: usize,
    cols: usize,
) {
    let dense = OnceCell::new();
    let dense = || {
        dense.get_or_init(|| {
            let mut rng = Rng::new(seed);
            (
                random_weights(&mut rng, rows * cols),
                rng.normal_vec(cols, 1.0),
            )
        })
    };
    let sparse = OnceCell::new();
    let sparse = || sparse.get_or_init(|| encode(&dense().0, rows, cols));
    let mut y = vec![0.0f32; rows];
    let name = format!("{rows}x{cols}");
    // 3.125 bits per weight: the stored size without encoding first.
    group.throughput(Throughput::Bytes((rows * cols * 25 / 64) as u64));
    group.bench_function(format!("sparse_spmv/{name}"), |b| {
        let (w, x) = (sparse(), &dense().1);
        assert_eq!(w.stored_bytes(), rows * cols * 25 / 64);
        b.iter(|| cpu::spmv(black_box(w), black_box(x), &mut y).unwrap())
    });
    group.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    group.bench_function(format!("dense_f32_gemv/{name}"), |b| {
        let (w, x) = dense();
        b.iter(|| cpu::gemv_f32(black_box(w), rows, cols, black_box(x), &mut y).unwrap())
    });
}

fn square(c: &mut Criterion) {
    let mut group = c.benchmark_group("square");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for &n in SQUARE {
        bench_shape(&mut group, n as u64, n, n);
    }
    group.finish();
}

fn phi4(c: &mut Criterion) {
    let mut group = c.benchmark_group("phi4");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &(rows, cols) in PHI4 {
        bench_shape(&mut group, (rows * cols) as u64, rows, cols);
    }
    group.finish();
}

fn decompress(c: &mut Criterion) {
    let (rows, cols) = (5120, 5120);
    let sparse = OnceCell::new();
    let sparse = || {
        sparse.get_or_init(|| {
            let w = random_weights(&mut Rng::new(3), rows * cols);
            encode(&w, rows, cols)
        })
    };
    let mut group = c.benchmark_group("decompress");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    group.bench_function("sparse_to_f32/5120x5120", |b| {
        let (w, mut out) = (sparse(), vec![0.0f32; rows * cols]);
        b.iter(|| cpu::decompress_f32(black_box(w), &mut out).unwrap())
    });
    group.throughput(Throughput::Bytes((rows * cols * 2) as u64));
    group.bench_function("sparse_to_f16/5120x5120", |b| {
        let (w, mut out) = (sparse(), vec![f16::ZERO; rows * cols]);
        b.iter(|| cpu::decompress_f16(black_box(w), &mut out).unwrap())
    });
    group.finish();
}

criterion_group!(benches, square, phi4, decompress);
criterion_main!(benches);
