//! Set-up shared by the criterion benches `spmv` and `decompress`: the shapes, random inputs made on
//! first use, the GPU and how its launches are timed.
//!
//! Shapes: the seed's square sizes (512 to 5120) always; the Phi-4 shapes (qkv, o, gate_up, down and
//! the lm_head, up to 100352 x 5120: gigabytes of inputs) only with `UPG_BENCH_PHI4=1`. Criterion's own
//! filter then picks groups: `-- cpu`, `-- gpu`, `-- phi4`.

use std::cell::OnceCell;
use std::time::{Duration, Instant};

use upg::format::{SparseMatrix, Tensor};
use upg::gpu::{gpu_or_skip, Gpu, GpuOptions};
use upg::rng::Rng;

pub const SQUARE: &[(usize, usize)] = &[(512, 512), (1024, 1024), (2048, 2048), (5120, 5120)];
/// Phi-4 matrices as [out, in]: qkv, o, gate_up, down, lm_head.
pub const PHI4: &[(usize, usize)] = &[
    (7680, 5120),
    (5120, 5120),
    (35840, 5120),
    (5120, 17920),
    (100352, 5120),
];

/// The shape sets to run, by name: `square`, and `phi4` when `UPG_BENCH_PHI4=1`.
pub fn shape_sets() -> Vec<(&'static str, &'static [(usize, usize)])> {
    let mut sets = vec![("square", SQUARE)];
    if std::env::var("UPG_BENCH_PHI4").is_ok_and(|v| v == "1") {
        sets.push(("phi4", PHI4));
    } else {
        println!("Phi-4 shapes skipped: set UPG_BENCH_PHI4=1 to run them");
    }
    sets
}

/// A random matrix in the sparse codec (group 128: 3.125 bits a weight), as the encoder lays it out.
pub fn sparse(rows: usize, cols: usize) -> Tensor {
    let mut rng = Rng::new((rows * cols) as u64);
    Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).expect("valid shape"))
}

/// A value made on first use: criterion skips a filtered-out benchmark without calling it, and the
/// Phi-4 inputs take seconds and gigabytes to make.
pub struct Lazy<T, F: Fn() -> T> {
    cell: OnceCell<T>,
    make: F,
}

impl<T, F: Fn() -> T> Lazy<T, F> {
    pub fn new(make: F) -> Self {
        Self {
            cell: OnceCell::new(),
            make,
        }
    }

    pub fn get(&self) -> &T {
        self.cell.get_or_init(&self.make)
    }
}

/// The first GPU adapter (`UPG_BACKEND` / `UPG_ADAPTER` choose another), or None with a note.
pub fn gpu() -> Option<Gpu> {
    gpu_or_skip(GpuOptions::default())
}

/// Wall time of `iters` launches recorded by `launch` in one compute pass and one submission, so the
/// ~0.1 ms a submission costs is spread over the launches (criterion's `iter_custom`). It includes the
/// GPU's gaps between dispatches; the bench tool (examples/bench.rs) times each with GPU timestamps.
pub fn timed(
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
