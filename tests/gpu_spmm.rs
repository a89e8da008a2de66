//! The batched product of prefill (wgsl/spmm.wgsl through `Gpu::matmat`) against an exact f64 product
//! of the decoded weights, on fresh seeded inputs, with outputs poisoned (NaN) before each launch.
//!
//! Tolerance: the decoded weights are exact in f32, so the only error is f32 rounding in the sums. The
//! kernel adds the products of one output in column order over whole 64-column blocks (pruned weights
//! and padding columns add exact zeros): at most cols + 64 operations, so within gamma(cols + 64) of
//! the f64 value relative to sum |w x| (Higham 3.1), as in tests/gpu_kernels.rs. A wrong weight,
//! column, row or token is off by far more.
//!
//! On the matrix units (spmm_coop.wgsl, sparse matrices where the device has cooperative matrices) each
//! weight is rounded to f16 (relative error 2^-11, or 2^-25 absolute below f16's normal range) and x is
//! carried as two f16 parts (relative error 2^-22, with the same floor): the bound adds
//! 2^-11 sum |w x| + 2^-22 sum |w x| + 2^-24 sum |x| (2^-25 per weight and per x part, doubled for
//! the cross terms) to the f32 rounding above.
//!
//! Without an adapter these tests print "skipped: no GPU adapter (reason)" and pass, unless
//! UPG_REQUIRE_GPU=1 (CI), where they fail.

use upg::format::{Dense, DenseF16, DenseF32, Q4Matrix, SparseMatrix, Tensor};
use upg::gpu::{gpu_or_skip, Gpu, GpuError, GpuOptions, LimitOverrides};
use upg::model::{Backend, GpuBackend};
use upg::rng::{test_seed, Rng};

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * 2f64.powi(-24);
    nu / (1.0 - nu)
}

/// What is added to the product.
#[derive(Clone, Copy)]
enum Residual<'a> {
    None,
    /// y = W x + r, r in its own buffer.
    Separate(&'a [f32]),
    /// y += W x, y holding r before the launch.
    InPlace(&'a [f32]),
}

impl<'a> Residual<'a> {
    fn values(self) -> Option<&'a [f32]> {
        match self {
            Residual::None => None,
            Residual::Separate(r) | Residual::InPlace(r) => Some(r),
        }
    }
}

/// Exact y[t] = W x[t] (+ r[t]) in f64 from the decoded weights, and the rounding bound per entry
/// (`f16`: operands rounded to f16 as on the matrix units, see the top).
fn reference_f64(w: &Tensor, x: &[f32], n: usize, r: Residual, f16: bool) -> (Vec<f64>, Vec<f64>) {
    let [rows, cols] = w.shape();
    let mut decoded = vec![0.0f32; rows * cols];
    for (i, row) in decoded.chunks_mut(cols.max(1)).enumerate().take(rows) {
        w.decode_row(i, row);
    }
    let (mut y, mut tol) = (vec![0.0; n * rows], vec![0.0; n * rows]);
    for t in 0..n {
        let xt = &x[t * cols..][..cols];
        for i in 0..rows {
            let o = t * rows + i;
            let res = r.values().map_or(0.0, |r| r[o] as f64);
            let row = &decoded[i * cols..][..cols];
            let dot: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            let abs: f64 = row
                .iter()
                .zip(xt)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum::<f64>()
                + res.abs();
            y[o] = dot + res;
            tol[o] = gamma(cols + 64) * abs + f64::MIN_POSITIVE;
            if f16 {
                let x_abs: f64 = xt.iter().map(|&v| (v as f64).abs()).sum();
                tol[o] += (2f64.powi(-11) + 2f64.powi(-22)) * abs + 2f64.powi(-24) * x_abs;
            }
        }
    }
    (y, tol)
}

fn check(what: &str, got: &[f32], want: &[f64], tol: &[f64], rows: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(
            (g as f64 - w).abs() <= t,
            "{what}: token {}, row {}: got {g}, exact {w}, allowed error {t:e}",
            i / rows,
            i % rows
        );
    }
}

/// y = W x (+ r) for n rows of x on the GPU, y poisoned first (unless it holds the residual).
fn gpu_matmat(gpu: &Gpu, w: &Tensor, x: &[f32], n: usize, r: Residual) -> Vec<f32> {
    let m = gpu.upload(w).unwrap();
    let xv = gpu.vector(x).unwrap();
    let y = match r {
        Residual::InPlace(r) => gpu.vector(r).unwrap(),
        _ => gpu.vector(&vec![f32::NAN; n * m.rows]).unwrap(),
    };
    let rv = match r {
        Residual::Separate(r) => Some(gpu.vector(r).unwrap()),
        _ => None,
    };
    let residual = match r {
        Residual::None => None,
        Residual::Separate(_) => rv.as_ref(),
        Residual::InPlace(_) => Some(&y),
    };
    gpu.run(|pass| gpu.matmat(pass, &m, &xv, &y, n, residual))
        .unwrap();
    gpu.read(&y).unwrap()
}

fn run_case(gpu: &Gpu, rng: &mut Rng, w: &Tensor, n: usize, r: bool) {
    let [rows, cols] = w.shape();
    let x = rng.normal_vec(n * cols, 1.0);
    let f16 = gpu.features().cooperative_matrix && matches!(w, Tensor::Sparse(_));
    let what = format!(
        "{} {:?} [{rows}, {cols}] x {n}{}",
        gpu.describe(),
        w.codec(),
        if f16 { " (matrix units)" } else { "" }
    );
    let (want, tol) = reference_f64(w, &x, n, Residual::None, f16);
    check(
        &what,
        &gpu_matmat(gpu, w, &x, n, Residual::None),
        &want,
        &tol,
        rows,
    );
    if r {
        let res = rng.normal_vec(n * rows, 1.0);
        for mode in [Residual::Separate(&res), Residual::InPlace(&res)] {
            let (want, tol) = reference_f64(w, &x, n, mode, f16);
            let got = gpu_matmat(gpu, w, &x, n, mode);
            check(&format!("{what} + r"), &got, &want, &tol, rows);
        }
    }
}

fn sparse(rng: &mut Rng, rows: usize, cols: usize, group: usize, encoded: bool) -> Tensor {
    if encoded {
        let d = rng.normal_vec(rows * cols, 0.02);
        Tensor::Sparse(
            SparseMatrix::encode(&Dense::f32(rows, cols, &d).unwrap(), group, None).unwrap(),
        )
    } else {
        Tensor::Sparse(SparseMatrix::random(rows, cols, group, rng).unwrap())
    }
}

/// Rows not a multiple of the 32-row tile nor of a workgroup's 128 rows, a block of fewer than 64
/// columns, partial blocks, several scale groups; batches of 1, under one 128-token tile, exactly one,
/// and over one. On the FMA kernel (spmm.wgsl) everywhere.
#[test]
fn sparse_batches_match_the_reference() {
    let Some(gpu) = gpu_or_skip(GpuOptions {
        cooperative_matrix: false,
        ..GpuOptions::default()
    }) else {
        return;
    };
    sparse_cases(&gpu, "sparse_batches_match_the_reference");
}

/// The same cases on the matrix units (spmm_coop.wgsl), where the device has cooperative matrices:
/// workgroups of 64 and of 128 tokens, columns whole (the launcher's choice for these short rows) and
/// in two parts.
#[test]
fn sparse_batches_on_the_matrix_units_match_the_reference() {
    for set in [
        vec![("BN", 64.0)],
        vec![("BN", 128.0)],
        vec![("BN", 128.0), ("SPLIT", 2.0)],
    ] {
        let Some(gpu) = gpu_or_skip(GpuOptions {
            overrides: set.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
            ..GpuOptions::default()
        }) else {
            return;
        };
        if !gpu.features().cooperative_matrix {
            println!(
                "skipped: {} has no 16x16x16 f16 cooperative matrices in 32-lane subgroups",
                gpu.describe()
            );
            return;
        }
        sparse_cases(&gpu, &format!("sparse_batches_on_the_matrix_units {set:?}"));
    }
}

fn sparse_cases(gpu: &Gpu, name: &str) {
    let mut rng = Rng::new(test_seed(name));
    let shapes = [
        (1, 64),
        (5, 20),
        (33, 100),
        (70, 448),
        (130, 130),
        (37, 1000),
    ];
    for (s, &(rows, cols)) in shapes.iter().enumerate() {
        for (b, &n) in [1, 3, 17, 64, 128, 130].iter().enumerate() {
            let group = [64, 128][(s + b) % 2];
            let w = sparse(&mut rng, rows, cols, group, (s + b) % 3 == 0);
            run_case(gpu, &mut rng, &w, n, b == 2);
        }
    }
    // Several token tiles and row groups at once.
    let w = sparse(&mut rng, 300, 200, 128, true);
    run_case(gpu, &mut rng, &w, 260, true);
}

#[test]
fn dense_batches_match_the_reference() {
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut rng = Rng::new(test_seed("dense_batches_match_the_reference"));
    for &(rows, cols) in &[(5, 20), (70, 100), (130, 448)] {
        let values = rng.normal_vec(rows * cols, 0.02);
        let d = Dense::f32(rows, cols, &values).unwrap();
        let tensors = [
            Tensor::F32(DenseF32::encode(&d).unwrap()),
            Tensor::F16(DenseF16::encode(&d).unwrap()),
            Tensor::Q4(Q4Matrix::encode(&d, 32).unwrap()),
            Tensor::Q4(Q4Matrix::encode(&d, 64).unwrap()),
        ];
        for w in &tensors {
            for n in [3, 130] {
                run_case(&gpu, &mut rng, w, n, n == 3);
            }
        }
    }
}

/// 64 KiB bindings: a sparse [700, 1000] matrix (256 bytes of codes a row) goes in 3 row chunks and its
/// f16 copy (2000 bytes a row) in 22, each its own launch. At most 4 workgroups per dimension: 2D
/// grids (2 row groups x 2 token tiles in a chunk of 256 rows).
#[test]
fn lowered_limits_split_bindings_and_dispatch_in_2d() {
    let limits = LimitOverrides {
        max_binding_bytes: Some(64 << 10),
        max_workgroups_per_dim: Some(3),
        max_workgroup_storage_bytes: Some(32 << 10),
    };
    let Some(gpu) = gpu_or_skip(GpuOptions {
        limits,
        ..GpuOptions::default()
    }) else {
        return;
    };
    assert!(gpu.has_batched_product());
    let mut rng = Rng::new(test_seed("spmm_lowered_limits"));
    let (rows, cols) = (700, 1000);
    let w = sparse(&mut rng, rows, cols, 128, false);
    assert_eq!(gpu.upload(&w).unwrap().chunks(), 3);
    run_case(&gpu, &mut rng, &w, 130, true);
    let values = rng.normal_vec(rows * cols, 0.02);
    let d = Dense::f32(rows, cols, &values).unwrap();
    let f16 = Tensor::F16(DenseF16::encode(&d).unwrap());
    assert!(gpu.upload(&f16).unwrap().chunks() > 3);
    run_case(&gpu, &mut rng, &f16, 5, false);
}

#[test]
fn too_little_workgroup_memory_means_one_position_a_pass() {
    let limits = LimitOverrides {
        max_workgroup_storage_bytes: Some(31 << 10),
        ..Default::default()
    };
    let Some(gpu) = gpu_or_skip(GpuOptions {
        limits,
        ..GpuOptions::default()
    }) else {
        return;
    };
    assert!(!gpu.has_batched_product());
    let mut rng = Rng::new(test_seed("too_little_workgroup_memory"));
    let m = gpu.upload(&sparse(&mut rng, 8, 64, 64, false)).unwrap();
    let (x, y) = (gpu.zeros(2 * 64).unwrap(), gpu.zeros(2 * 8).unwrap());
    let e = gpu
        .run(|pass| gpu.matmat(pass, &m, &x, &y, 2, None))
        .unwrap_err();
    assert!(e.to_string().contains("workgroup memory"), "{e}");
    // The batched attention needs the same 32 KiB.
    let dims = upg::gpu::AttentionDims {
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        window: 0,
        kv_f16: false,
    };
    let storage = || {
        gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4096,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        })
    };
    let b = [storage(), storage(), storage(), storage(), storage()];
    let e = gpu
        .run(|pass| gpu.attention(pass, &b[0], &b[1], &b[2], &b[3], &b[4], &dims, 2))
        .unwrap_err();
    assert!(e.to_string().contains("workgroup memory"), "{e}");
    assert_eq!(GpuBackend::new(gpu, false).unwrap().max_batch(), 1);
}

#[test]
fn bad_batch_shapes_get_a_clear_error() {
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut rng = Rng::new(test_seed("bad_batch_shapes_get_a_clear_error"));
    let m = gpu.upload(&sparse(&mut rng, 8, 64, 64, false)).unwrap();
    let (x, y) = (gpu.zeros(3 * 64).unwrap(), gpu.zeros(3 * 8).unwrap());
    for (n, r) in [(2, None), (3, Some(&x))] {
        let e = gpu
            .run(|pass| gpu.matmat(pass, &m, &x, &y, n, r))
            .unwrap_err();
        assert!(matches!(e, GpuError::Shape(_)), "{e}");
    }
    // In place (x is y) for a square matrix: the shapes fit, the aliasing does not.
    let square = gpu.upload(&sparse(&mut rng, 64, 64, 64, false)).unwrap();
    let e = gpu
        .run(|pass| gpu.matmat(pass, &square, &x, &x, 3, None))
        .unwrap_err();
    assert!(e.to_string().contains("different buffers"), "{e}");
}
