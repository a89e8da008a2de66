//! Opening a .upg file: `UpgFile::open` reads the header and verifies the CRC-32 of every tensor and
//! of the header (format version 2), so its cost grows with the file. The file holds copies of one
//! sparse 35840 x 5120 matrix (Phi-4's gate_up, 71.7 MB) under different names, `UPG_BENCH_OPEN_MIB`
//! MiB in all (default 256; Phi-4 in UPG is ~5900). It is written once to the system's temporary
//! folder and is in the page cache when timed: the figure is the verification's cost, not the disk's.
//!
//! `cargo bench --bench open`; `UPG_BENCH_OPEN_MIB=5900 cargo bench --bench open` for Phi-4's size.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use upg::format::file::{MatrixSpec, Plan, UpgFile, UpgWriter};
use upg::format::{SparseMatrix, Tensor};
use upg::rng::Rng;

fn open(c: &mut Criterion) {
    let mib: usize = std::env::var("UPG_BENCH_OPEN_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let path = std::env::temp_dir().join(format!("upg-bench-open-{mib}.upg"));
    if !path.exists() {
        let w = Tensor::Sparse(
            SparseMatrix::random(35840, 5120, 128, &mut Rng::new(1)).expect("valid shape"),
        );
        let copies = (mib << 20).div_ceil(w.stored_bytes()).max(1);
        let mut plan = Plan::new();
        for i in 0..copies {
            plan.matrix(format!("m{i}"), MatrixSpec::of(&w));
        }
        let mut writer = UpgWriter::create(&path, &plan).expect("create the file");
        for i in 0..copies {
            writer
                .put_matrix(&format!("m{i}"), &w)
                .expect("write a matrix");
        }
        writer.finish().expect("finish the file");
    }
    let bytes = std::fs::metadata(&path).expect("the file").len();
    let mut group = c.benchmark_group("open");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(format!("{}MB", bytes / 1_000_000), |b| {
        b.iter(|| UpgFile::open(black_box(&path)).expect("open"))
    });
    group.finish();
}

criterion_group!(benches, open);
criterion_main!(benches);
