//! Every GPU kernel against the CPU reference, on fresh seeded inputs, in every variant the adapter
//! offers (f16 / f32, subgroups / none), with outputs poisoned with NaN before each launch.
//!
//! Tolerance for y = W x: the decoded weights are exact in f32 (an f16 scale times a 5-bit integer), so
//! the only error is f32 rounding in the sums. Any order of n additions and products is within
//! gamma(n) = n u / (1 - n u) (u = 2^-24) of the exact value, relative to sum |w_i x_i| (Higham,
//! Accuracy and Stability of Numerical Algorithms, 3.1). The kernels do at most cols + 64 operations
//! on any path to one output, so both the GPU and the CPU result must lie within gamma(cols + 64) of
//! the f64 dot product; a wrong weight, column or scale is off by far more.
//!
//! Without an adapter these tests print "skipped: no GPU adapter (reason)" and pass, unless
//! UPG_REQUIRE_GPU=1 (CI), where they fail.

use half::f16;
use upg::cpu::reference;
use upg::device::Device;
use upg::format::{Dense, DenseF16, DenseF32, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};
use upg::gpu::{gpu_or_skip, DenseKind, Gpu, GpuError, GpuOptions, GpuVector, LimitOverrides};
use upg::rng::{test_seed, Rng};

/// One context per variant the adapter offers: (f16, subgroups) in all four combinations.
fn variants(limits: LimitOverrides) -> Vec<Gpu> {
    variants_with(limits, &[])
}

/// [`variants`] with kernel override constants that replace the launchers' choices.
fn variants_with(limits: LimitOverrides, overrides: &[(&str, f64)]) -> Vec<Gpu> {
    let mut out = Vec::new();
    for (f16, subgroups) in [(false, false), (true, false), (false, true), (true, true)] {
        let Some(gpu) = gpu_or_skip(GpuOptions {
            f16,
            subgroups,
            limits,
            overrides: overrides.iter().map(|&(n, v)| (n.to_string(), v)).collect(),
            ..GpuOptions::default()
        }) else {
            return out;
        };
        let f = gpu.features();
        if f.f16 != f16 || f.subgroups != subgroups {
            println!(
                "{}: no variant f16={f16} subgroups={subgroups} (adapter lacks it)",
                gpu.describe()
            );
            continue;
        }
        out.push(gpu);
    }
    out
}

/// Odd shapes: one block, a block of fewer than 32 columns, partial blocks, several scale groups,
/// rows that are not a multiple of the 32-row tile.
const SHAPES: &[(usize, usize)] = &[(1, 64), (5, 20), (3, 100), (33, 130), (70, 448), (37, 1000)];

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * 2f64.powi(-24);
    nu / (1.0 - nu)
}

/// Exact y = W x (+ r) in f64 from the decoded weights, and the rounding bound per row.
fn reference_f64(w: &Tensor, x: &[f32], r: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let [rows, cols] = w.shape();
    let mut row = vec![0.0f32; cols];
    let (mut y, mut tol) = (Vec::new(), Vec::new());
    for i in 0..rows {
        w.decode_row(i, &mut row);
        let res = r.map_or(0.0, |r| r[i] as f64);
        let dot: f64 = row.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let abs: f64 = row
            .iter()
            .zip(x)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum::<f64>()
            + res.abs();
        y.push(dot + res);
        tol.push(gamma(cols + 64) * abs + f64::MIN_POSITIVE);
    }
    (y, tol)
}

fn check(what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(
            (g as f64 - w).abs() <= t,
            "{what}: row {i}: got {g}, exact {w}, allowed error {t:e}"
        );
    }
}

fn random_x(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normal_vec(n, 1.0)
}

/// y = W x (+ r) on the GPU with y poisoned first.
fn gpu_matvec(gpu: &Gpu, w: &Tensor, x: &[f32], r: Option<&[f32]>) -> Vec<f32> {
    let m = gpu.upload(w).unwrap();
    let xv = gpu.vector(x).unwrap();
    let y = gpu.vector(&vec![f32::NAN; m.rows]).unwrap();
    let rv: Option<GpuVector> = r.map(|r| gpu.vector(r).unwrap());
    gpu.run(|pass| gpu.matvec(pass, &m, &xv, &y, rv.as_ref()))
        .unwrap();
    gpu.read(&y).unwrap()
}

fn dense(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    rng.normal_vec(rows * cols, 0.02)
}

/// y = W x + r with r in its own buffer, then in place (y holding r: y += W x), against f64.
fn check_residual_modes(gpu: &Gpu, w: &Tensor, x: &[f32], r: &[f32], what: &str) {
    let (want, tol) = reference_f64(w, x, Some(r));
    check(
        &format!("{what} + r"),
        &gpu_matvec(gpu, w, x, Some(r)),
        &want,
        &tol,
    );
    check_in_place(gpu, w, x, r, &want, &tol, what);
}

/// y += W x with y holding r before the launch, against `want`.
fn check_in_place(
    gpu: &Gpu,
    w: &Tensor,
    x: &[f32],
    r: &[f32],
    want: &[f64],
    tol: &[f64],
    what: &str,
) {
    let m = gpu.upload(w).unwrap();
    let (xv, y) = (gpu.vector(x).unwrap(), gpu.vector(r).unwrap());
    gpu.run(|pass| gpu.matvec(pass, &m, &xv, &y, Some(&y)))
        .unwrap();
    check(
        &format!("{what}, y += W x"),
        &gpu.read(&y).unwrap(),
        want,
        tol,
    );
}

/// The error of a product of `w` (zero inputs) on `gpu`, which must refuse it.
fn refusal(gpu: &Gpu, w: &Tensor) -> String {
    let m = gpu.upload(w).unwrap();
    let (x, y) = (gpu.zeros(m.cols).unwrap(), gpu.zeros(m.rows).unwrap());
    gpu.run(|pass| gpu.matvec(pass, &m, &x, &y, None))
        .unwrap_err()
        .to_string()
}

#[test]
fn spmv_matches_the_reference() {
    let gpus = variants(LimitOverrides::default());
    let mut rng = Rng::new(test_seed("spmv_matches_the_reference"));
    for gpu in &gpus {
        for &(rows, cols) in SHAPES {
            for group in [64, 128] {
                // Both a random matrix and one written by the encoder.
                let random =
                    Tensor::Sparse(SparseMatrix::random(rows, cols, group, &mut rng).unwrap());
                let d = dense(&mut rng, rows, cols);
                let encoded = Tensor::Sparse(
                    SparseMatrix::encode(&Dense::f32(rows, cols, &d).unwrap(), group, None)
                        .unwrap(),
                );
                for w in [&random, &encoded] {
                    let x = random_x(&mut rng, cols);
                    let (want, tol) = reference_f64(w, &x, None);
                    let what = format!("{} spmv [{rows}, {cols}] group {group}", gpu.describe());
                    check(&what, &gpu_matvec(gpu, w, &x, None), &want, &tol);
                    let mut cpu = vec![f32::NAN; rows];
                    reference::spmv(w, &x, &mut cpu);
                    check("cpu reference", &cpu, &want, &tol);
                }
            }
        }
    }
}

#[test]
fn spmv_with_rows_split_over_workgroups_matches_the_reference() {
    // ROW_LANES forced (the launcher splits only products of few row tiles with wide rows, such as
    // Phi-4's 5120 x 17920): a tile's rows over 2, 4 or 32 workgroups, each row's blocks cut into
    // SLICES * ROW_LANES shares, from several blocks a share (up to 16 blocks over 4 shares) down to
    // shares without blocks, x staged whole or 3 blocks at a time; with each residual mode. At most 16
    // workgroups per dimension: 32 workgroups a tile need a 2D grid.
    let limits = LimitOverrides {
        max_workgroups_per_dim: Some(16),
        ..LimitOverrides::default()
    };
    let mut rng = Rng::new(test_seed("spmv_with_rows_split_over_workgroups"));
    for (lanes, slices, tile_blocks) in [(2.0, 2.0, 16.0), (4.0, 1.0, 3.0), (32.0, 4.0, 16.0)] {
        let overrides = [
            ("ROW_LANES", lanes),
            ("SLICES", slices),
            ("TILE_BLOCKS", tile_blocks),
        ];
        for gpu in &variants_with(limits, &overrides) {
            for &(rows, cols) in SHAPES {
                let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
                let x = random_x(&mut rng, cols);
                let r = random_x(&mut rng, rows);
                let what = format!("{} spmv ROW_LANES={lanes} [{rows}, {cols}]", gpu.describe());
                let (want, tol) = reference_f64(&w, &x, None);
                check(&what, &gpu_matvec(gpu, &w, &x, None), &want, &tol);
                let mut cpu = vec![f32::NAN; rows];
                reference::spmv(&w, &x, &mut cpu);
                check("cpu reference", &cpu, &want, &tol);
                check_residual_modes(gpu, &w, &x, &r, &what);
            }
        }
    }
    // A value the kernel cannot take is refused with what to use.
    if let Some(gpu) = variants_with(LimitOverrides::default(), &[("ROW_LANES", 3.0)]).first() {
        let w = Tensor::Sparse(SparseMatrix::random(4, 64, 64, &mut rng).unwrap());
        let e = refusal(gpu, &w);
        assert!(
            e.contains("ROW_LANES 3") && e.contains("use 1, 2, 4"),
            "{e}"
        );
    }
}

#[test]
fn spmv_with_columns_split_over_workgroups_matches_the_reference() {
    // COL_SPLIT forced: each row's blocks cut into 2, 3 or 7 contiguous parts (not dividing the
    // block counts of SHAPES; 7 leaves parts without blocks at 1 to 6 blocks), each a workgroup whose
    // sums a second launch adds; with ROW_LANES 2 on top, x staged 2 blocks at a time, and 8 KiB
    // bindings that cut the larger matrices into row chunks. Each residual mode, y poisoned.
    let mut rng = Rng::new(test_seed("spmv_with_columns_split_over_workgroups"));
    for (parts, extra) in [
        (2.0, vec![]),
        (3.0, vec![("ROW_LANES", 2.0), ("TILE_BLOCKS", 2.0)]),
        (7.0, vec![("SLICES", 2.0)]),
    ] {
        let limits = LimitOverrides {
            max_binding_bytes: Some(8192),
            ..LimitOverrides::default()
        };
        let mut overrides = vec![("COL_SPLIT", parts)];
        overrides.extend(extra);
        for gpu in &variants_with(limits, &overrides) {
            for &(rows, cols) in SHAPES {
                let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
                let x = random_x(&mut rng, cols);
                let r = random_x(&mut rng, rows);
                let what = format!("{} spmv COL_SPLIT={parts} [{rows}, {cols}]", gpu.describe());
                let m = gpu.upload(&w).unwrap();
                assert_eq!(gpu.spmv_parts(&m).unwrap(), parts as usize, "{what}");
                let (want, tol) = reference_f64(&w, &x, None);
                check(&what, &gpu_matvec(gpu, &w, &x, None), &want, &tol);
                check_residual_modes(gpu, &w, &x, &r, &what);
            }
        }
    }
    // The launcher's rule: few row tiles and rows of at least 2 x 64 blocks get split, many tiles or
    // shorter rows not; SPLIT_TILES=0 turns it off.
    let Some(gpu) = variants(LimitOverrides::default()).into_iter().next() else {
        return;
    };
    let (rows, cols) = (40, 8200);
    let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
    let m = gpu.upload(&w).unwrap();
    assert_eq!(gpu.spmv_parts(&m).unwrap(), 2, "2 tiles of 129 blocks");
    let x = random_x(&mut rng, cols);
    let (want, tol) = reference_f64(&w, &x, None);
    check(
        "spmv split by the rule",
        &gpu_matvec(&gpu, &w, &x, None),
        &want,
        &tol,
    );
    let short = gpu
        .upload(&Tensor::Sparse(
            SparseMatrix::random(rows, 5120, 128, &mut rng).unwrap(),
        ))
        .unwrap();
    assert_eq!(gpu.spmv_parts(&short).unwrap(), 1, "80 blocks stay whole");
    let off = variants_with(LimitOverrides::default(), &[("SPLIT_TILES", 0.0)]);
    if let Some(g) = off.first() {
        assert_eq!(g.spmv_parts(&g.upload(&w).unwrap()).unwrap(), 1);
    }
    // A count the kernel cannot take is refused with what to use.
    if let Some(g) = variants_with(LimitOverrides::default(), &[("COL_SPLIT", 0.5)]).first() {
        let e = refusal(g, &w);
        assert!(
            e.contains("COL_SPLIT 0.5") && e.contains("from 1 to 256"),
            "{e}"
        );
    }
}

#[test]
fn spmv_swiglu_epilogue_matches_the_reference() {
    // gate_up uploaded in SwiGLU pairs order: h = silu(g) * u of W x straight from the product, whole
    // or in 3 column parts, against f64 from the file's rows; rows 2 I with I = 16 k, k odd, and
    // columns that leave partial blocks; 8 KiB bindings cut the larger ones into row chunks.
    let mut rng = Rng::new(test_seed("spmv_swiglu_epilogue_matches_the_reference"));
    let limits = LimitOverrides {
        max_binding_bytes: Some(8192),
        ..LimitOverrides::default()
    };
    for overrides in [vec![], vec![("COL_SPLIT", 3.0)], vec![("ROW_LANES", 4.0)]] {
        for gpu in &variants_with(limits, &overrides) {
            for (inter, cols) in [(16, 64), (48, 130), (80, 1000)] {
                let w =
                    Tensor::Sparse(SparseMatrix::random(2 * inter, cols, 128, &mut rng).unwrap());
                let x = random_x(&mut rng, cols);
                let (gu, tol) = reference_f64(&w, &x, None);
                let m = gpu.upload_gate_up(&w).unwrap();
                assert!(m.swiglu_pairs());
                let xv = gpu.vector(&x).unwrap();
                let h = gpu.vector(&vec![f32::NAN; inter]).unwrap();
                gpu.run(|pass| gpu.matvec_swiglu(pass, &m, &xv, &h, upg::gpu::Prologue::None))
                    .unwrap();
                let got = gpu.read(&h).unwrap();
                for i in 0..inter {
                    let (g, u) = (gu[i], gu[inter + i]);
                    let sig = 1.0 / (1.0 + (-g).exp());
                    let want = g * sig * u;
                    // silu'(g) <= 1.1; a few ulps of exp, the division and the products.
                    let bound = 1.1 * u.abs() * tol[i]
                        + (g * sig).abs() * tol[inter + i]
                        + 8.0 * f32::EPSILON as f64 * want.abs()
                        + f64::MIN_POSITIVE;
                    assert!(
                        (got[i] as f64 - want).abs() <= bound,
                        "{} {overrides:?} I={inter} cols={cols}: h[{i}] = {}, exact {want}, allowed {bound:e}",
                        gpu.describe(),
                        got[i]
                    );
                }
            }
            // The plain product of a pairs matrix gives its rows in pairs order.
            let w = Tensor::Sparse(SparseMatrix::random(64, 100, 128, &mut rng).unwrap());
            let x = random_x(&mut rng, 100);
            let (want, tol) = reference_f64(&w, &x, None);
            let m = gpu.upload_gate_up(&w).unwrap();
            let (xv, y) = (
                gpu.vector(&x).unwrap(),
                gpu.vector(&[f32::NAN; 64]).unwrap(),
            );
            gpu.run(|pass| gpu.matvec(pass, &m, &xv, &y, None)).unwrap();
            let got = gpu.read(&y).unwrap();
            let order: Vec<usize> = (0..64)
                .map(|r| {
                    if r % 32 < 16 {
                        r / 32 * 16 + r % 32
                    } else {
                        32 + r / 32 * 16 + r % 32 - 16
                    }
                })
                .collect();
            let (want, tol): (Vec<f64>, Vec<f64>) =
                order.iter().map(|&r| (want[r], tol[r])).unzip();
            check("pairs order", &got, &want, &tol);
        }
    }
    // Not a pairs matrix: refused with what to do; rows of no whole tiles stay in file order.
    if let Some(gpu) = variants(LimitOverrides::default()).first() {
        let w = Tensor::Sparse(SparseMatrix::random(40, 64, 64, &mut rng).unwrap());
        let m = gpu.upload_gate_up(&w).unwrap();
        assert!(!m.swiglu_pairs());
        let (x, h) = (gpu.zeros(64).unwrap(), gpu.zeros(20).unwrap());
        let e = gpu
            .run(|pass| gpu.matvec_swiglu(pass, &m, &x, &h, upg::gpu::Prologue::None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("upload_gate_up"), "{e}");
    }
}

#[test]
fn spmv_fuses_the_residual_add() {
    let gpus = variants(LimitOverrides::default());
    let mut rng = Rng::new(test_seed("spmv_fuses_the_residual_add"));
    for gpu in &gpus {
        let (rows, cols) = (45, 200);
        let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
        let x = random_x(&mut rng, cols);
        let r = random_x(&mut rng, rows);
        let (want, tol) = reference_f64(&w, &x, Some(&r));
        check(
            "y = W x + r",
            &gpu_matvec(gpu, &w, &x, Some(&r)),
            &want,
            &tol,
        );
        // In place: y += W x.
        let m = gpu.upload(&w).unwrap();
        let (xv, y) = (gpu.vector(&x).unwrap(), gpu.vector(&r).unwrap());
        gpu.run(|pass| gpu.matvec(pass, &m, &xv, &y, Some(&y)))
            .unwrap();
        check("y += W x", &gpu.read(&y).unwrap(), &want, &tol);
    }
}

#[test]
fn dense_gemv_matches_the_reference() {
    let gpus = variants(LimitOverrides::default());
    let mut rng = Rng::new(test_seed("dense_gemv_matches_the_reference"));
    for gpu in &gpus {
        for &(rows, cols) in SHAPES {
            let d = dense(&mut rng, rows, cols);
            let dw = Dense::f32(rows, cols, &d).unwrap();
            let tensors = [
                Tensor::F16(DenseF16::encode(&dw).unwrap()),
                Tensor::F32(DenseF32::encode(&dw).unwrap()),
                Tensor::Q4(Q4Matrix::encode(&dw, 32).unwrap()),
                Tensor::Q4(Q4Matrix::encode(&dw, 64).unwrap()),
                Tensor::Q3(Q3Matrix::encode(&dw, 32).unwrap()),
                Tensor::Q3(Q3Matrix::encode(&dw, 64).unwrap()),
                Tensor::Q3(Q3Matrix::encode(&dw, 128).unwrap()),
            ];
            for w in &tensors {
                let x = random_x(&mut rng, cols);
                let r = random_x(&mut rng, rows);
                let what = format!("{} {:?} [{rows}, {cols}]", gpu.describe(), w.codec());
                let (want, tol) = reference_f64(w, &x, None);
                check(&what, &gpu_matvec(gpu, w, &x, None), &want, &tol);
                let (want, tol) = reference_f64(w, &x, Some(&r));
                check(
                    &format!("{what} + r"),
                    &gpu_matvec(gpu, w, &x, Some(&r)),
                    &want,
                    &tol,
                );
            }
        }
    }
}

/// gemv_q3 with 1, 2 and 4 rows per team (the launcher's choice is 4), x staged in workgroup memory
/// or read by each lane: odd row counts leave teams with rows past the end, rows of more than 32 runs
/// take several staging rounds, the last one partial, and y is updated in place too.
#[test]
fn gemv_q3_matches_the_reference_at_every_rows_per_team() {
    let mut rng = Rng::new(test_seed("gemv_q3_rows_per_team"));
    for (rows_per_team, stage) in [(1.0, 1.0), (2.0, 0.0), (2.0, 1.0), (4.0, 0.0), (4.0, 1.0)] {
        let gpus = variants_with(
            LimitOverrides::default(),
            &[("ROWS", rows_per_team), ("STAGE_X", stage)],
        );
        for gpu in &gpus {
            for &(rows, cols) in &[(1, 32), (7, 250), (45, 333), (70, 448), (9, 2100)] {
                let d = dense(&mut rng, rows, cols);
                let w = Tensor::Q3(
                    Q3Matrix::encode(&Dense::f32(rows, cols, &d).unwrap(), 128).unwrap(),
                );
                let x = random_x(&mut rng, cols);
                let r = random_x(&mut rng, rows);
                let what = format!(
                    "{} q3 rows/team {rows_per_team} staged {stage} [{rows}, {cols}]",
                    gpu.describe()
                );
                let (want, tol) = reference_f64(&w, &x, None);
                check(&what, &gpu_matvec(gpu, &w, &x, None), &want, &tol);
                let (want, tol) = reference_f64(&w, &x, Some(&r));
                check_in_place(gpu, &w, &x, &r, &want, &tol, &what);
            }
        }
    }
}

#[test]
fn gemv_q4_matches_the_reference_with_any_chunks_in_flight() {
    // QUADS (chunks a lane loads per row and step) replaced: a main loop of 2 or 3 chunks a step and
    // the remainder loop after it; rows not a multiple of a workgroup's 64, both scale groups.
    let mut rng = Rng::new(test_seed(
        "gemv_q4_matches_the_reference_with_any_chunks_in_flight",
    ));
    for quads in [1.0, 2.0, 3.0] {
        for gpu in &variants_with(LimitOverrides::default(), &[("QUADS", quads)]) {
            for &(rows, cols) in &[(1, 64), (65, 200), (130, 2100), (3, 1000)] {
                let d = dense(&mut rng, rows, cols);
                let dw = Dense::f32(rows, cols, &d).unwrap();
                for group in [32, 64] {
                    let w = Tensor::Q4(Q4Matrix::encode(&dw, group).unwrap());
                    let x = random_x(&mut rng, cols);
                    let r = random_x(&mut rng, rows);
                    let what = format!(
                        "{} gemv_q4 QUADS={quads} [{rows}, {cols}] group {group}",
                        gpu.describe()
                    );
                    let (want, tol) = reference_f64(&w, &x, Some(&r));
                    check(&what, &gpu_matvec(gpu, &w, &x, Some(&r)), &want, &tol);
                }
            }
        }
    }
}

/// The two f16 values adjacent to `v` (equal when `v` is an f16): WGSL leaves the rounding direction of
/// an f32 to f16 conversion to the implementation.
fn f16_neighbours(v: f32) -> [f32; 2] {
    let h = f16::from_f32(v);
    if h.to_f32() == v {
        return [v, v];
    }
    let step = |h: f16, up: bool| {
        let b = h.to_bits();
        let toward_larger_magnitude = up == (h.to_f32() >= 0.0);
        f16::from_bits(if toward_larger_magnitude {
            b + 1
        } else {
            b - 1
        })
    };
    let other = step(h, v > h.to_f32());
    [h.to_f32(), other.to_f32()]
}

#[test]
fn decompress_matches_the_reference() {
    let gpus = variants(LimitOverrides::default());
    let mut rng = Rng::new(test_seed("decompress_matches_the_reference"));
    for gpu in &gpus {
        for &(rows, cols) in SHAPES {
            let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
            let exact = reference::decompress_f32(&w);
            let m = gpu.upload(&w).unwrap();
            for kind in [DenseKind::F32, DenseKind::F16] {
                let out = gpu.dense_zeros(rows, cols, kind).unwrap();
                gpu.poison(&out).unwrap();
                gpu.run(|pass| gpu.decompress(pass, &m, &out)).unwrap();
                let got = gpu.read_dense(&out).unwrap();
                for (i, (&g, &e)) in got.iter().zip(&exact).enumerate() {
                    let ok = match kind {
                        DenseKind::F32 => g == e,
                        DenseKind::F16 => f16_neighbours(e).contains(&g),
                    };
                    assert!(
                        ok,
                        "{} decompress {kind:?} [{rows}, {cols}] at ({}, {}): got {g}, exact {e}",
                        gpu.describe(),
                        i / cols,
                        i % cols
                    );
                }
                // The dense result feeds the dense kernels: its zero padding must be there (NaN
                // padding times x's zero padding would poison y).
                let x = random_x(&mut rng, cols);
                let (xv, y) = (
                    gpu.vector(&x).unwrap(),
                    gpu.vector(&vec![f32::NAN; rows]).unwrap(),
                );
                gpu.run(|pass| gpu.matvec(pass, &out, &xv, &y, None))
                    .unwrap();
                let dense_w = match kind {
                    DenseKind::F32 => Tensor::F32(DenseF32 {
                        rows,
                        cols,
                        values: got.clone().into(),
                    }),
                    DenseKind::F16 => Tensor::F16(DenseF16 {
                        rows,
                        cols,
                        values: got
                            .iter()
                            .map(|&v| f16::from_f32(v))
                            .collect::<Vec<_>>()
                            .into(),
                    }),
                };
                let (want, tol) = reference_f64(&dense_w, &x, None);
                check(
                    "gemv of the decompressed matrix",
                    &gpu.read(&y).unwrap(),
                    &want,
                    &tol,
                );
            }
        }
    }
}

#[test]
fn decompress_into_chunks_that_cut_row_tiles() {
    // 40 KiB bindings: the f16 copy of [300, 1000] (2000 bytes a row) goes in chunks of 20 rows, so
    // most output chunks start and end inside a 32-row tile of the sparse layout, and a workgroup's
    // tile is only partly written by each launch.
    let limits = LimitOverrides {
        max_binding_bytes: Some(40 << 10),
        ..Default::default()
    };
    let gpu = &variants(limits)[..1];
    let mut rng = Rng::new(test_seed("decompress_into_chunks_that_cut_row_tiles"));
    for gpu in gpu {
        let (rows, cols) = (300, 1000);
        let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
        let m = gpu.upload(&w).unwrap();
        for kind in [DenseKind::F16, DenseKind::F32] {
            let out = gpu.dense_zeros(rows, cols, kind).unwrap();
            assert!(out.chunks() >= 8, "{} output chunks", out.chunks());
            gpu.poison(&out).unwrap();
            gpu.run(|pass| gpu.decompress(pass, &m, &out)).unwrap();
            let got = gpu.read_dense(&out).unwrap();
            for (i, (&g, e)) in got.iter().zip(reference::decompress_f32(&w)).enumerate() {
                let ok = match kind {
                    DenseKind::F32 => g == e,
                    DenseKind::F16 => f16_neighbours(e).contains(&g),
                };
                assert!(
                    ok,
                    "{kind:?} at ({}, {}): got {g}, exact {e}",
                    i / cols,
                    i % cols
                );
            }
        }
    }
}

#[test]
fn lowered_limits_split_bindings_dispatch_in_2d_and_tile_x() {
    // 64 KiB bindings: the sparse [600, 1000] matrix (256 bytes of codes a row) goes in 3 chunks of
    // 8 row tiles, and its f16 copy (2000 bytes a row) in 19 chunks. At most 4 workgroups per
    // dimension: 8 tiles and the 16 decompress workgroups of a chunk need 2D grids. Workgroup memory
    // for 3 blocks of x: 16 blocks are staged in 6 tiles.
    let limits = LimitOverrides {
        max_binding_bytes: Some(64 << 10),
        max_workgroups_per_dim: Some(4),
        max_workgroup_storage_bytes: Some(4096 + 3 * 64 * 4),
    };
    let gpus = variants(limits);
    let mut rng = Rng::new(test_seed("lowered_limits"));
    for gpu in &gpus {
        let (rows, cols) = (600, 1000);
        let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
        let m = gpu.upload(&w).unwrap();
        assert_eq!(m.chunks(), 3);
        let x = random_x(&mut rng, cols);
        let (want, tol) = reference_f64(&w, &x, None);
        check("spmv, split", &gpu_matvec(gpu, &w, &x, None), &want, &tol);
        let out = gpu.dense_zeros(rows, cols, DenseKind::F16).unwrap();
        assert!(out.chunks() > 3);
        gpu.poison(&out).unwrap();
        gpu.run(|pass| gpu.decompress(pass, &m, &out)).unwrap();
        let got = gpu.read_dense(&out).unwrap();
        for (g, e) in got.iter().zip(reference::decompress_f32(&w)) {
            assert!(
                f16_neighbours(e).contains(g),
                "decompress, split: got {g}, exact {e}"
            );
        }
        let d = Tensor::F16(DenseF16 {
            rows,
            cols,
            values: got
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect::<Vec<_>>()
                .into(),
        });
        let (want, tol) = reference_f64(&d, &x, None);
        check(
            "gemv_f16, split",
            &gpu_matvec(gpu, &d, &x, None),
            &want,
            &tol,
        );
        // q3: 384 bytes of codes a row (32 runs), so 170 rows a chunk; each chunk's 6 workgroups
        // need a 2D grid, and the lowered workgroup memory leaves x unstaged.
        let dq = dense(&mut rng, rows, cols);
        let q = Tensor::Q3(Q3Matrix::encode(&Dense::f32(rows, cols, &dq).unwrap(), 128).unwrap());
        assert_eq!(gpu.upload(&q).unwrap().chunks(), 4);
        let (want, tol) = reference_f64(&q, &x, None);
        check(
            "gemv_q3, split",
            &gpu_matvec(gpu, &q, &x, None),
            &want,
            &tol,
        );
        // q4: 512 bytes of codes a row at 1000 columns, so 5 chunks of 128 rows (the last 88); at 64
        // columns one chunk of 10 workgroups of 64 rows, in a 4 x 3 grid.
        for (rows, cols, chunks) in [(600, 1000, 5), (600, 64, 1)] {
            let d = dense(&mut rng, rows, cols);
            let dw = Dense::f32(rows, cols, &d).unwrap();
            let q = Tensor::Q4(Q4Matrix::encode(&dw, 32).unwrap());
            assert_eq!(gpu.upload(&q).unwrap().chunks(), chunks);
            let x = random_x(&mut rng, cols);
            let (want, tol) = reference_f64(&q, &x, None);
            check(
                &format!("gemv_q4 [{rows}, {cols}], split"),
                &gpu_matvec(gpu, &q, &x, None),
                &want,
                &tol,
            );
        }
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut rng = Rng::new(test_seed("bad_input_gets_a_clear_error"));
    let mut m = SparseMatrix::random(4, 128, 128, &mut rng).unwrap();
    // A full block keeping 31 weights: valid for the file, not for the GPU walk.
    let mut masks = m.masks.to_vec();
    masks[5] &= masks[5] - 1;
    m.masks = masks.into();
    let e = gpu.upload(&Tensor::Sparse(m)).unwrap_err().to_string();
    assert!(
        e.contains("row 2, block 1") && e.contains("re-encode"),
        "{e}"
    );

    let mut m = SparseMatrix::random(4, 128, 128, &mut rng).unwrap();
    m.codes = vec![0u8; 3].into();
    let e = gpu.upload(&Tensor::Sparse(m)).unwrap_err().to_string();
    assert!(e.contains("codes"), "{e}");

    let w = gpu
        .upload(&Tensor::Sparse(
            SparseMatrix::random(4, 128, 128, &mut rng).unwrap(),
        ))
        .unwrap();
    let (x, y) = (gpu.zeros(100).unwrap(), gpu.zeros(4).unwrap());
    let e = gpu
        .run(|pass| gpu.matvec(pass, &w, &x, &y, None))
        .unwrap_err();
    assert!(matches!(e, GpuError::Shape(_)), "{e}");
}

#[test]
fn backend_gives_the_same_results_on_gpu_and_cpu() {
    if gpu_or_skip(GpuOptions::default()).is_none() {
        return;
    }
    let gpu = Device::auto().unwrap();
    assert!(matches!(gpu, Device::Gpu(_)), "{}", gpu.describe());
    let mut rng = Rng::new(test_seed("backend_gives_the_same_results"));
    let (rows, cols) = (50, 300);
    let w = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng).unwrap());
    let x = random_x(&mut rng, cols);
    let (want, tol) = reference_f64(&w, &x, None);
    check("backend GPU", &gpu.matvec(&w, &x).unwrap(), &want, &tol);
    check(
        "backend CPU",
        &Device::Cpu.matvec(&w, &x).unwrap(),
        &want,
        &tol,
    );
    assert!(matches!(
        Device::Cpu.matvec(&w, &x[1..]),
        Err(GpuError::Shape(_))
    ));
}
