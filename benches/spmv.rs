//! y = W x with W in the sparse codec, on the CPU path (`upg::cpu`: the SIMD path of `Simd::detect()`,
//! `UPG_CPU_SIMD` forces one; all rayon threads) and on the first GPU adapter, each beside its dense
//! baseline on the same shape: the f32 gemv on the CPU, the f16 gemv on the GPU.
//!
//! `cargo bench --bench spmv` runs the groups `cpu_square` and `gpu_square` (512 to 5120 square);
//! `UPG_BENCH_PHI4=1` adds `cpu_phi4` and `gpu_phi4`; criterion's filter picks among them
//! (`-- gpu_phi4`), and `--warm-up-time` / `--measurement-time` shorten a run. Throughput is the bytes of
//! weights each product reads (sparse: the stored 25 bytes per 64 weights), so criterion prints GB/s.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use half::f16;
use rayon::prelude::*;
use upg::cpu;
use upg::format::{DenseF16, Tensor};
use upg::gpu::Gpu;
use upg::rng::Rng;

use common::Lazy;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Normal weights (std 0.02) made row by row in parallel: the Phi-4 shapes hold up to 514M of them.
fn dense_rows<T: Send + Copy + Default>(
    rows: usize,
    cols: usize,
    f: impl Fn(f32) -> T + Send + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); rows * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut rng = Rng::new(r as u64 ^ 0x5EED);
            row.iter_mut().for_each(|v| *v = f(rng.normal() * 0.02));
        });
    out
}

fn cpu_shape(group: &mut Group<'_>, rows: usize, cols: usize) {
    let name = format!("{rows}x{cols}");
    let x = Rng::new(1).normal_vec(cols, 1.0);
    let mut y = vec![0.0f32; rows];
    let w = Lazy::new(|| common::sparse(rows, cols));
    group.throughput(Throughput::Bytes((rows * cols * 25 / 64) as u64));
    group.bench_function(format!("spmv/{name}"), |b| {
        let w = w.get();
        b.iter(|| cpu::spmv(black_box(w), black_box(&x), &mut y).expect("spmv"))
    });
    let dense = Lazy::new(|| dense_rows(rows, cols, |v| v));
    group.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    group.bench_function(format!("dense_f32_gemv/{name}"), |b| {
        let w = dense.get();
        b.iter(|| cpu::gemv_f32(black_box(w), rows, cols, black_box(&x), &mut y).expect("gemv"))
    });
}

fn gpu_matvec(
    group: &mut Group<'_>,
    gpu: &Gpu,
    name: &str,
    rows: usize,
    cols: usize,
    bytes: usize,
    make: impl Fn() -> Tensor,
) {
    let m = Lazy::new(|| gpu.upload(&make()).expect("upload"));
    let x = gpu.vector(&Rng::new(1).normal_vec(cols, 1.0)).expect("x");
    let y = gpu.zeros(rows).expect("y");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(format!("{name}/{rows}x{cols}"), |b| {
        let m = m.get();
        b.iter_custom(|iters| common::timed(gpu, iters, &|pass| gpu.matvec(pass, m, &x, &y, None)))
    });
}

fn products(c: &mut Criterion) {
    let gpu = common::gpu();
    for (set, shapes) in common::shape_sets() {
        let mut group = c.benchmark_group(format!("cpu_{set}"));
        group.sample_size(10);
        for &(rows, cols) in shapes {
            cpu_shape(&mut group, rows, cols);
        }
        group.finish();
        let Some(gpu) = &gpu else { continue };
        let mut group = c.benchmark_group(format!("gpu_{set}"));
        group.sample_size(10);
        for &(rows, cols) in shapes {
            gpu_matvec(
                &mut group,
                gpu,
                "spmv",
                rows,
                cols,
                rows * cols * 25 / 64,
                || common::sparse(rows, cols),
            );
            gpu_matvec(
                &mut group,
                gpu,
                "gemv_f16",
                rows,
                cols,
                rows * cols * 2,
                || {
                    Tensor::F16(DenseF16 {
                        rows,
                        cols,
                        values: dense_rows(rows, cols, f16::from_f32).into(),
                    })
                },
            );
        }
        group.finish();
    }
}

criterion_group!(benches, products);
criterion_main!(benches);
