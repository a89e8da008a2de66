//! The fast CPU kernels against independent references, on every codec and every SIMD path this CPU
//! has: products against an f64 product of the reference-decoded matrix, decoders against the
//! reference decoder bit for bit, and the errors that bad shapes get.
//!
//! Tolerance for products: each output is a sum of n <= 1000 products accumulated in f32 (unit
//! roundoff u = 6e-8) in 32 interleaved partial sums, so its error is at most about (n/32 + 5) u
//! times sum_c |w_c x_c| (2.2e-6 of it at n = 1000; the scalar reference's plain running sum, n u,
//! is looser in theory but a random walk, about sqrt(n) u, in practice). We therefore measure
//! max_r |y_r - y64_r| against max_r sum_c |w_rc x_c| and accept 1e-5. (Dividing by max|y64| instead
//! fails on a lone row whose terms cancel: a 1x64 q4 case came out at 1.1e-5 of it.) A single wrong
//! or misplaced weight moves y by about |w x|, at least 1e-3 of that scale at these sizes.

use half::f16;
use upg::cpu::{self, reference, CpuError, Simd};
use upg::format::{Dense, DenseF16, DenseF32, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};
use upg::rng::{test_seed, Rng};

/// One block; a partial block; a padded last block with an odd group count; several groups; a
/// partial last block over many groups; and a few hundred rows, which span several rayon runs.
const SHAPES: &[(usize, usize)] = &[
    (1, 64),
    (3, 100),
    (37, 130),
    (64, 448),
    (129, 1000),
    (300, 520),
];

const TOLERANCE: f64 = 1e-5;

/// The matrix in every codec: sparse with groups of 1, 2 and 3 blocks, f32, f16, q4 with both groups,
/// q3 with groups 32 and 128.
fn all_codecs(w: &[f32], rows: usize, cols: usize) -> Vec<(String, Tensor)> {
    let d = Dense::f32(rows, cols, w).unwrap();
    let mut out = Vec::new();
    for group in [64, 128, 192] {
        out.push((
            format!("sparse/g{group}"),
            Tensor::Sparse(SparseMatrix::encode(&d, group, None).unwrap()),
        ));
    }
    out.push(("f32".into(), Tensor::F32(DenseF32::encode(&d).unwrap())));
    out.push(("f16".into(), Tensor::F16(DenseF16::encode(&d).unwrap())));
    for group in [32, 64] {
        out.push((
            format!("q4/g{group}"),
            Tensor::Q4(Q4Matrix::encode(&d, group).unwrap()),
        ));
    }
    for group in [32, 128] {
        out.push((
            format!("q3/g{group}"),
            Tensor::Q3(Q3Matrix::encode(&d, group).unwrap()),
        ));
    }
    out
}

/// y64 = W x in f64, W as the reference decodes it, and the error scale max_r sum_c |w_rc x_c|.
fn product_f64(decoded: &[f32], rows: usize, cols: usize, x: &[f32]) -> (Vec<f64>, f64) {
    let mut scale = 0.0f64;
    let y = (0..rows)
        .map(|r| {
            let terms = decoded[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(&w, &v)| w as f64 * v as f64);
            scale = scale.max(terms.clone().map(f64::abs).sum());
            terms.sum()
        })
        .collect();
    (y, scale)
}

/// max|got - want| / scale, after checking that every output was written (no NaN poison left).
fn relative_error(got: &[f32], want: &[f64], scale: f64, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: output {i} is {} (never written?)", got[i]);
    }
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    if scale == 0.0 {
        err
    } else {
        err / scale
    }
}

fn assert_bitwise<T: Copy + PartialEq + std::fmt::Debug>(
    got: &[T],
    want: &[T],
    bits: impl Fn(T) -> u32,
    what: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| bits(got[i]) != bits(want[i])) {
        panic!(
            "{what}: element {i} is {:?}, reference {:?}",
            got[i], want[i]
        );
    }
}

#[test]
fn scalar_is_always_available_and_detect_picks_an_available_path() {
    let available = Simd::available();
    assert_eq!(available[0], Simd::Scalar);
    if std::env::var("UPG_CPU_SIMD").is_err() {
        assert_eq!(Simd::detect().unwrap(), Simd::best());
    }
    assert!(available.contains(&Simd::detect().unwrap()));
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        Simd::Avx2.is_available(),
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    );
    println!("available: {available:?}");
}

#[test]
fn spmv_matches_the_f64_product_and_the_scalar_reference() {
    let mut rng = Rng::new(test_seed("spmv"));
    let (mut worst64, mut worst_ref) = (0.0f64, 0.0f64);
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        let x = rng.normal_vec(cols, 1.0);
        for (codec, t) in all_codecs(&w, rows, cols) {
            let decoded = reference::decompress_f32(&t);
            let (y64, scale) = product_f64(&decoded, rows, cols, &x);
            let mut y_ref = vec![f32::NAN; rows];
            reference::spmv(&t, &x, &mut y_ref);
            let y_ref64: Vec<f64> = y_ref.iter().map(|&v| v as f64).collect();
            for simd in Simd::available() {
                let what = format!("spmv {codec} {rows}x{cols} {simd:?}");
                let mut y = vec![f32::NAN; rows];
                cpu::spmv_with(simd, &t, &x, &mut y).unwrap();
                let e64 = relative_error(&y, &y64, scale, &what);
                assert!(e64 <= TOLERANCE, "{what}: {e64:.2e} from the f64 product");
                let eref = relative_error(&y, &y_ref64, scale, &what);
                assert!(eref <= TOLERANCE, "{what}: {eref:.2e} from the reference");
                worst64 = worst64.max(e64);
                worst_ref = worst_ref.max(eref);
            }
        }
    }
    println!("worst error: {worst64:.2e} from f64, {worst_ref:.2e} from the reference");
}

#[test]
fn spmm_equals_spmv_per_vector_bit_for_bit() {
    let mut rng = Rng::new(test_seed("spmm"));
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        for (codec, t) in all_codecs(&w, rows, cols) {
            for n in [1, 5] {
                let xs = rng.normal_vec(n * cols, 1.0);
                for simd in Simd::available() {
                    let what = format!("spmm {codec} {rows}x{cols} n={n} {simd:?}");
                    let mut ys = vec![f32::NAN; n * rows];
                    cpu::spmm_with(simd, &t, &xs, n, &mut ys).unwrap();
                    for i in 0..n {
                        let mut y = vec![f32::NAN; rows];
                        cpu::spmv_with(simd, &t, &xs[i * cols..(i + 1) * cols], &mut y).unwrap();
                        assert!(y.iter().all(|v| v.is_finite()), "{what}: spmv left NaN");
                        assert_bitwise(
                            &ys[i * rows..(i + 1) * rows],
                            &y,
                            f32::to_bits,
                            &format!("{what} vector {i}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn decompress_reproduces_the_reference_decode_bit_for_bit() {
    let mut rng = Rng::new(test_seed("decompress"));
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        for (codec, t) in all_codecs(&w, rows, cols) {
            let want32 = reference::decompress_f32(&t);
            let want16: Vec<f16> = want32.iter().map(|&v| f16::from_f32(v)).collect();
            for simd in Simd::available() {
                let what = format!("{codec} {rows}x{cols} {simd:?}");
                let mut out32 = vec![f32::NAN; rows * cols];
                cpu::decompress_f32_with(simd, &t, &mut out32).unwrap();
                assert_bitwise(
                    &out32,
                    &want32,
                    f32::to_bits,
                    &format!("decompress_f32 {what}"),
                );
                let mut out16 = vec![f16::NAN; rows * cols];
                cpu::decompress_f16_with(simd, &t, &mut out16).unwrap();
                assert_bitwise(
                    &out16,
                    &want16,
                    |h| h.to_bits() as u32,
                    &format!("decompress_f16 {what}"),
                );
            }
        }
    }
}

/// A zero scale makes the reference produce -0 for negative levels (and +0 for pruned weights);
/// the decoders must keep those signs, and the products must stay right around such groups. 600
/// columns give 10 and 19 groups per row, so the 8-wide scale conversion sees zeros too.
#[test]
fn zero_scales_keep_the_reference_signed_zeros() {
    let mut rng = Rng::new(test_seed("zero_scales"));
    let (rows, cols) = (9, 600);
    let w = rng.weights(rows * cols);
    let d = Dense::f32(rows, cols, &w).unwrap();
    let zero_some = |scales: &[f16], rng: &mut Rng| -> Vec<f16> {
        scales
            .iter()
            .map(|&s| match rng.below(4) {
                0 => f16::ZERO,
                1 => f16::NEG_ZERO,
                _ => s,
            })
            .collect()
    };
    let s = SparseMatrix::encode(&d, 64, None).unwrap();
    let q = Q4Matrix::encode(&d, 32).unwrap();
    let tensors = [
        Tensor::Sparse(SparseMatrix {
            scales: zero_some(&s.scales, &mut rng).into(),
            ..s
        }),
        Tensor::Q4(Q4Matrix {
            scales: zero_some(&q.scales, &mut rng).into(),
            ..q
        }),
    ];
    let x = rng.normal_vec(cols, 1.0);
    for t in &tensors {
        let want32 = reference::decompress_f32(t);
        assert!(
            want32.iter().any(|v| v.to_bits() == 0x8000_0000),
            "no -0 to check"
        );
        let want16: Vec<f16> = want32.iter().map(|&v| f16::from_f32(v)).collect();
        let (y64, scale) = product_f64(&want32, rows, cols, &x);
        for simd in Simd::available() {
            let what = format!("{:?} {simd:?}", t.codec());
            let mut out32 = vec![f32::NAN; rows * cols];
            cpu::decompress_f32_with(simd, t, &mut out32).unwrap();
            assert_bitwise(&out32, &want32, f32::to_bits, &what);
            let mut out16 = vec![f16::NAN; rows * cols];
            cpu::decompress_f16_with(simd, t, &mut out16).unwrap();
            assert_bitwise(&out16, &want16, |h| h.to_bits() as u32, &what);
            let mut y = vec![f32::NAN; rows];
            cpu::spmv_with(simd, t, &x, &mut y).unwrap();
            assert!(
                relative_error(&y, &y64, scale, &what) <= TOLERANCE,
                "{what}"
            );
        }
    }
}

#[test]
fn gemv_f32_matches_the_f64_product() {
    let mut rng = Rng::new(test_seed("gemv_f32"));
    for &(rows, cols) in SHAPES.iter().chain(&[(5, 7), (2, 9)]) {
        let w = rng.weights(rows * cols);
        let x = rng.normal_vec(cols, 1.0);
        let (y64, scale) = product_f64(&w, rows, cols, &x);
        for simd in Simd::available() {
            let what = format!("gemv_f32 {rows}x{cols} {simd:?}");
            let mut y = vec![f32::NAN; rows];
            cpu::gemv_f32_with(simd, &w, rows, cols, &x, &mut y).unwrap();
            let e = relative_error(&y, &y64, scale, &what);
            assert!(e <= TOLERANCE, "{what}: {e:.2e} from the f64 product");
        }
    }
}

fn expect_shape_error(result: Result<(), CpuError>, names: &str, what: &str) {
    match result {
        Err(CpuError::Shape(msg)) => assert!(msg.starts_with(names), "{what}: {msg}"),
        other => panic!("{what}: expected a shape error about {names}, got {other:?}"),
    }
}

#[test]
fn wrong_lengths_are_refused_with_a_shape_error() {
    let mut rng = Rng::new(test_seed("shape_errors"));
    let (rows, cols) = (3, 100);
    let w = rng.weights(rows * cols);
    let x = vec![1.0f32; cols];
    for (codec, t) in all_codecs(&w, rows, cols) {
        for simd in Simd::available() {
            let what = format!("{codec} {simd:?}");
            let mut y = vec![0.0f32; rows];
            expect_shape_error(
                cpu::spmv_with(simd, &t, &x[..cols - 1], &mut y),
                "x has 99",
                &what,
            );
            let long = vec![1.0f32; cols + 1];
            expect_shape_error(cpu::spmv_with(simd, &t, &long, &mut y), "x has 101", &what);
            let mut short_y = vec![0.0f32; rows - 1];
            expect_shape_error(cpu::spmv_with(simd, &t, &x, &mut short_y), "y has 2", &what);

            let mut ys = vec![0.0f32; 2 * rows];
            expect_shape_error(
                cpu::spmm_with(simd, &t, &x, 2, &mut ys),
                "xs has 100",
                &what,
            );
            let xs = vec![1.0f32; 2 * cols];
            expect_shape_error(cpu::spmm_with(simd, &t, &xs, 2, &mut y), "ys has 3", &what);

            let mut out = vec![0.0f32; rows * cols + 1];
            expect_shape_error(
                cpu::decompress_f32_with(simd, &t, &mut out),
                "out has 301",
                &what,
            );
            let mut out16 = vec![f16::ZERO; rows * cols - 1];
            expect_shape_error(
                cpu::decompress_f16_with(simd, &t, &mut out16),
                "out has 299",
                &what,
            );
        }
    }
    for simd in Simd::available() {
        let what = format!("gemv_f32 {simd:?}");
        let mut y = vec![0.0f32; rows];
        expect_shape_error(
            cpu::gemv_f32_with(simd, &w[1..], rows, cols, &x, &mut y),
            "W has 299",
            &what,
        );
        expect_shape_error(
            cpu::gemv_f32_with(simd, &w, rows, cols, &x[1..], &mut y),
            "x has 99",
            &what,
        );
        expect_shape_error(
            cpu::gemv_f32_with(simd, &w, rows, cols, &x, &mut y[1..]),
            "y has 2",
            &what,
        );
        let err = cpu::gemv_f32_with(simd, &w, usize::MAX, 2, &x, &mut y).unwrap_err();
        assert!(matches!(err, CpuError::Shape(_)), "{what}: {err:?}");
    }
}

#[test]
fn corrupt_tensors_and_missing_paths_are_refused_or_survived() {
    let mut rng = Rng::new(test_seed("corrupt"));
    let (rows, cols) = (4, 256);
    let w = rng.weights(rows * cols);
    let d = Dense::f32(rows, cols, &w).unwrap();
    let x = rng.normal_vec(cols, 1.0);
    let mut y = vec![f32::NAN; rows];

    // A plane shorter than the shape needs: refused before any kernel reads it.
    let m = SparseMatrix::encode(&d, 128, None).unwrap();
    let short = Tensor::Sparse(SparseMatrix {
        codes: m.codes[..m.codes.len() - 1].to_vec().into(),
        ..m
    });
    for simd in Simd::available() {
        match cpu::spmv_with(simd, &short, &x, &mut y) {
            Err(CpuError::Tensor(msg)) => assert!(msg.contains("codes"), "{msg}"),
            other => panic!("{simd:?}: expected a tensor error, got {other:?}"),
        }
    }

    // Masks that keep all 64 weights (twice the codes there are): wrong values, but no crash.
    let m = SparseMatrix::encode(&d, 128, None).unwrap();
    let full = Tensor::Sparse(SparseMatrix {
        masks: vec![u64::MAX; m.masks.len()].into(),
        ..m
    });
    assert!(full.validate().is_err());
    for simd in Simd::available() {
        let mut y = vec![f32::NAN; rows];
        cpu::spmv_with(simd, &full, &x, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "{simd:?}: {y:?}");
        let mut out = vec![f32::NAN; rows * cols];
        cpu::decompress_f32_with(simd, &full, &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{simd:?}");
    }

    // A path this CPU lacks is refused, naming the ones it has.
    let t = Tensor::F32(DenseF32::encode(&d).unwrap());
    for simd in Simd::ALL.into_iter().filter(|s| !s.is_available()) {
        match cpu::spmv_with(simd, &t, &x, &mut y) {
            Err(CpuError::Unavailable { wanted, available }) => {
                assert_eq!(wanted, simd.name());
                assert!(available.contains("scalar"), "{available}");
            }
            other => panic!("{simd:?}: expected Unavailable, got {other:?}"),
        }
    }
    assert!(matches!(
        Simd::from_name("avx512"),
        Err(CpuError::UnknownSimd(_))
    ));
    assert_eq!(Simd::from_name("Scalar").unwrap(), Simd::Scalar);
}
