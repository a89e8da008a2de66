//! The codecs against their specification: which weights the sparse encoder keeps, how close decoded
//! values are to the originals (a bound that follows from the scale), and what bad input gets.

use half::{bf16, f16};
use upg::format::sparse::{self, BLOCK, KEEP};
use upg::format::{
    Codec, Dense, DenseData, DenseF16, FormatError, Q3Matrix, Q4Matrix, SparseMatrix, Tensor,
};
use upg::rng::{test_seed, Rng};

/// Odd shapes: one block, a partial block, a block with fewer than 32 real columns, several groups
/// with an odd block count, and a Phi-4 width.
const SHAPES: &[(usize, usize)] = &[(1, 64), (3, 100), (5, 20), (7, 130), (4, 448), (2, 5120)];

/// The nearest level of the 4-bit grid to `w` for scale `s`, computed in f64 by trying all 16.
fn nearest_on_grid(w: f32, s: f32) -> f64 {
    (-15..=15)
        .step_by(2)
        .map(|l| l as f64 * s as f64)
        .min_by(|a, b| (a - w as f64).abs().total_cmp(&(b - w as f64).abs()))
        .unwrap()
}

fn check_sparse(m: &SparseMatrix, w: &[f32], norms: Option<&[f32]>) {
    let (rows, cols) = (m.rows, m.cols);
    let nb = m.blocks_per_row();
    let mut decoded = vec![0.0f32; cols];
    for r in 0..rows {
        m.decode_row(r, &mut decoded);
        for b in 0..nb {
            let mask = m.masks[r * nb + b];
            let start = b * BLOCK;
            let n = (cols - start).min(BLOCK);
            // Exactly 32 kept per block (all real columns when fewer than 32 remain), none in padding.
            assert_eq!(mask.count_ones() as usize, n.min(KEEP), "row {r} block {b}");
            if n < 64 {
                assert_eq!(mask >> n, 0, "row {r} block {b}: padding kept");
            }
            // The kept set is the top-32 by saliency: no dropped weight beats a kept one.
            let sal = |c: usize| w[r * cols + c].abs() * norms.map_or(1.0, |n| n[c]);
            let kept = (0..n)
                .filter(|i| mask >> i & 1 == 1)
                .map(|i| sal(start + i));
            let dropped = (0..n)
                .filter(|i| mask >> i & 1 == 0)
                .map(|i| sal(start + i));
            let min_kept = kept.fold(f32::INFINITY, f32::min);
            let max_dropped = dropped.fold(0.0f32, f32::max);
            assert!(
                min_kept >= max_dropped,
                "row {r} block {b}: kept {min_kept} < dropped {max_dropped}"
            );
        }
        for c in 0..cols {
            let keptbit = m.masks[r * nb + c / BLOCK] >> (c % BLOCK) & 1 == 1;
            let got = decoded[c] as f64;
            if !keptbit {
                assert_eq!(got, 0.0, "row {r} col {c}: pruned weight decodes to {got}");
                continue;
            }
            // A kept weight decodes to the grid level nearest to it: the error is at most one scale
            // (half a step) inside the grid, and the clipping distance outside it.
            let s = m.scales[r * m.groups_per_row() + c / m.group].to_f32();
            let want = nearest_on_grid(w[r * cols + c], s);
            let tie = (want - w[r * cols + c] as f64).abs();
            assert!(
                ((got - w[r * cols + c] as f64).abs() - tie).abs() <= 1e-6 * s as f64,
                "row {r} col {c}: w {} decodes to {got}, nearest level is {want} (scale {s})",
                w[r * cols + c]
            );
        }
    }
}

#[test]
fn sparse_encoder_keeps_the_top_half_and_decodes_to_the_nearest_level() {
    let mut rng = Rng::new(test_seed("sparse_encoder"));
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        let m = SparseMatrix::encode(&Dense::f32(rows, cols, &w).unwrap(), 128, None).unwrap();
        m.validate().unwrap();
        check_sparse(&m, &w, None);
    }
}

#[test]
fn sparse_encoder_with_activation_norms_ranks_by_wanda_saliency() {
    let mut rng = Rng::new(test_seed("sparse_wanda"));
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        let norms: Vec<f32> = (0..cols).map(|_| rng.range(0.0, 4.0)).collect();
        let m =
            SparseMatrix::encode(&Dense::f32(rows, cols, &w).unwrap(), 64, Some(&norms)).unwrap();
        check_sparse(&m, &w, Some(&norms));
        // Norms must change the choice somewhere at this size, or the option would be a no-op.
        let plain = SparseMatrix::encode(&Dense::f32(rows, cols, &w).unwrap(), 64, None).unwrap();
        if cols >= 128 {
            assert_ne!(&plain.masks[..], &m.masks[..]);
        }
    }
}

#[test]
fn scales_minimise_error_better_than_max_abs() {
    let mut rng = Rng::new(test_seed("scales_minimise_error"));
    let (rows, cols) = (16, 1024);
    let w = rng.weights(rows * cols);
    let m = SparseMatrix::encode(&Dense::f32(rows, cols, &w).unwrap(), 128, None).unwrap();
    let mut decoded = vec![0.0f32; cols];
    let (mut err_best, mut err_maxabs) = (0.0f64, 0.0f64);
    for r in 0..rows {
        m.decode_row(r, &mut decoded);
        for g in 0..m.groups_per_row() {
            let cols_g: Vec<usize> = (g * 128..(g + 1) * 128)
                .filter(|&c| m.masks[r * m.blocks_per_row() + c / 64] >> (c % 64) & 1 == 1)
                .collect();
            let amax = cols_g
                .iter()
                .map(|&c| w[r * cols + c].abs())
                .fold(0.0, f32::max);
            let naive = f16::from_f32(amax / 15.0).to_f32();
            for &c in &cols_g {
                let x = w[r * cols + c];
                err_best += (decoded[c] as f64 - x as f64).powi(2);
                err_maxabs += (nearest_on_grid(x, naive) - x as f64).powi(2);
            }
        }
    }
    println!("kept-weight SSE: chosen scales {err_best:.3e}, max-abs scales {err_maxabs:.3e}");
    assert!(
        err_best < err_maxabs,
        "scale search gained nothing: {err_best} vs {err_maxabs}"
    );
}

#[test]
fn all_input_dtypes_encode_alike() {
    let mut rng = Rng::new(test_seed("input_dtypes"));
    let (rows, cols) = (6, 200);
    // Multiples of 2^-10 with magnitude below 256 * 2^-10 fit 8 significant bits, so they are exact in
    // bf16 and in f16 (no subnormals): all three dtypes hold the same values and must encode alike.
    let w32: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.below(511) as f32 - 255.0) / 1024.0)
        .collect();
    let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
    let w_exact: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
    let wh: Vec<f16> = w_exact.iter().map(|&v| f16::from_f32(v)).collect();
    assert!(wh.iter().zip(&w_exact).all(|(h, f)| h.to_f32() == *f));
    let a = SparseMatrix::encode(&Dense::f32(rows, cols, &w_exact).unwrap(), 128, None).unwrap();
    let b = SparseMatrix::encode(
        &Dense::new(rows, cols, DenseData::BF16(&wb)).unwrap(),
        128,
        None,
    )
    .unwrap();
    let c = SparseMatrix::encode(
        &Dense::new(rows, cols, DenseData::F16(&wh)).unwrap(),
        128,
        None,
    )
    .unwrap();
    for other in [&b, &c] {
        assert_eq!(&a.masks[..], &other.masks[..]);
        assert_eq!(&a.codes[..], &other.codes[..]);
        assert_eq!(&a.scales[..], &other.scales[..]);
    }
}

#[test]
fn non_finite_weights_are_refused_with_their_position() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = vec![0.5f32; 3 * 70];
        w[70 + 17] = bad;
        let d = Dense::f32(3, 70, &w).unwrap();
        for result in [
            SparseMatrix::encode(&d, 128, None).map(|_| ()),
            Q4Matrix::encode(&d, 32).map(|_| ()),
            Q3Matrix::encode(&d, 128).map(|_| ()),
            DenseF16::encode(&d).map(|_| ()),
        ] {
            match result {
                Err(FormatError::NonFinite {
                    row: 1, col: 17, ..
                }) => {}
                other => panic!("expected NonFinite at row 1, col 17, got {other:?}"),
            }
        }
        let msg = SparseMatrix::encode(&d, 128, None).unwrap_err().to_string();
        assert!(msg.contains("row 1, column 17"), "{msg}");
    }
    let w = vec![0.5f32; 128];
    let mut norms = vec![1.0f32; 128];
    norms[5] = f32::NAN;
    let err =
        SparseMatrix::encode(&Dense::f32(1, 128, &w).unwrap(), 128, Some(&norms)).unwrap_err();
    assert!(
        matches!(err, FormatError::BadNorm { col: 5, .. }),
        "{err:?}"
    );
    assert!(Dense::f32(3, 3, &w).is_err());
    assert!(SparseMatrix::encode(&Dense::f32(1, 128, &w).unwrap(), 96, None).is_err());
}

#[test]
fn dense_codecs_decode_within_their_bounds() {
    let mut rng = Rng::new(test_seed("dense_codecs"));
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        let d = Dense::f32(rows, cols, &w).unwrap();
        let f = Tensor::F16(DenseF16::encode(&d).unwrap());
        for group in [32, 64] {
            let q = Q4Matrix::encode(&d, group).unwrap();
            q.validate().unwrap();
            let q = Tensor::Q4(q);
            let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
            for r in 0..rows {
                f.decode_row(r, &mut a);
                q.decode_row(r, &mut b);
                let Tensor::Q4(qm) = &q else { unreachable!() };
                for c in 0..cols {
                    let x = w[r * cols + c];
                    assert_eq!(a[c], f16::from_f32(x).to_f32());
                    let s = qm.scales[r * cols.div_ceil(group) + c / group].to_f32();
                    let want = nearest_on_grid(x, s);
                    assert!(
                        ((b[c] as f64 - x as f64).abs() - (want - x as f64).abs()).abs()
                            <= 1e-6 * s as f64,
                        "q4 row {r} col {c}: {x} -> {} (nearest {want})",
                        b[c]
                    );
                }
            }
        }
    }
}

#[test]
fn phi4_linear_shapes_fit_the_bit_budget() {
    // Bits per parameter do not depend on the row count: encode a few rows at each Phi-4 width and
    // count the planes' bytes. (rows, cols) as out x in.
    let mut rng = Rng::new(test_seed("phi4_bits"));
    for (rows, cols) in [(7680, 5120), (5120, 5120), (35840, 5120), (5120, 17920)] {
        let w = rng.weights(4 * cols);
        let m = Tensor::Sparse(
            SparseMatrix::encode(&Dense::f32(4, cols, &w).unwrap(), 128, None).unwrap(),
        );
        let bits = m.bits_per_param();
        println!(
            "{rows}x{cols}: {bits:.4} bits/param, {:.2}:1 vs fp32",
            32.0 / bits
        );
        assert!((bits - 3.125).abs() < 1e-9, "{bits}");
    }
    assert_eq!(sparse::groups_per_row(5120, 128), 40);
}

/// The nearest of the 3-bit grid's levels (-7s, -5s, ..., 7s) to `w`, in f64 by trying all 8.
fn nearest_on_q3_grid(w: f32, s: f32) -> f64 {
    (-7..=7)
        .step_by(2)
        .map(|l| l as f64 * s as f64)
        .min_by(|a, b| (a - w as f64).abs().total_cmp(&(b - w as f64).abs()))
        .unwrap()
}

/// Squared error of a group of weights quantised to the nearest q3 level of scale `s`, in f64.
fn q3_sse(w: &[f32], s: f32) -> f64 {
    w.iter()
        .map(|&x| (nearest_on_q3_grid(x, s) - x as f64).powi(2))
        .sum()
}

#[test]
fn q3_decodes_to_the_nearest_level_of_an_mse_optimal_scale() {
    let mut rng = Rng::new(test_seed("q3_codec"));
    for &(rows, cols) in SHAPES {
        let w = rng.weights(rows * cols);
        let d = Dense::f32(rows, cols, &w).unwrap();
        for group in [32, 64, 128] {
            let m = Q3Matrix::encode(&d, group).unwrap();
            m.validate().unwrap();
            let ng = cols.div_ceil(group);
            let mut out = vec![f32::NAN; cols];
            for r in 0..rows {
                m.decode_row(r, &mut out);
                for c in 0..cols {
                    let x = w[r * cols + c];
                    let s = m.scales[r * ng + c / group].to_f32();
                    let want = nearest_on_q3_grid(x, s);
                    // Equal distance, not equal value: a weight half-way between two levels may go
                    // either way.
                    assert!(
                        ((out[c] as f64 - x as f64).abs() - (want - x as f64).abs()).abs()
                            <= 1e-6 * s as f64,
                        "q3/g{group} row {r} col {c}: {x} -> {} (nearest {want}, scale {s})",
                        out[c]
                    );
                }
                // The scale search never does worse than the max-abs scale, which never clips.
                for g in 0..ng {
                    let vals = &w[r * cols + g * group..r * cols + ((g + 1) * group).min(cols)];
                    let amax = vals.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let naive = f16::from_f32(amax / 7.0).to_f32();
                    let s = m.scales[r * ng + g].to_f32();
                    assert!(
                        q3_sse(vals, s) <= q3_sse(vals, naive) * (1.0 + 1e-9),
                        "q3/g{group} row {r} group {g}: scale {s} worse than max-abs {naive}"
                    );
                }
            }
        }
    }
}

#[test]
fn q3_bit_planes_follow_the_documented_layout() {
    // Column c of a row: bit (c % 32) of the little-endian u32 words 3 (c / 32) + b, b = 0, 1, 2,
    // hold bits b of its code; the code's level is 2 code - 7.
    let mut rng = Rng::new(test_seed("q3_layout"));
    let (rows, cols, group) = (3, 200, 64);
    let w = rng.weights(rows * cols);
    let m = Q3Matrix::encode(&Dense::f32(rows, cols, &w).unwrap(), group).unwrap();
    let row_bytes = cols.div_ceil(group) * group / 32 * 12;
    assert_eq!(m.codes.len(), rows * row_bytes);
    let mut out = vec![0.0f32; cols];
    for r in 0..rows {
        m.decode_row(r, &mut out);
        let bytes = &m.codes[r * row_bytes..][..row_bytes];
        for (c, &got) in out.iter().enumerate() {
            let word = |b: usize| {
                let at = (c / 32 * 3 + b) * 4;
                u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
            };
            let code = (0..3).fold(0u32, |acc, b| acc | ((word(b) >> (c % 32)) & 1) << b);
            let s = m.scales[r * cols.div_ceil(group) + c / group].to_f32();
            assert_eq!(got, s * (2.0 * code as f32 - 7.0), "row {r} col {c}");
        }
    }
}

#[test]
fn q3_meets_the_sparse_codecs_bit_budget() {
    let mut rng = Rng::new(test_seed("q3_bits"));
    for cols in [5120, 17920, 256, 768] {
        let w = rng.weights(2 * cols);
        let d = Dense::f32(2, cols, &w).unwrap();
        let q3 = Tensor::Q3(Q3Matrix::encode(&d, Q3Matrix::DEFAULT_GROUP).unwrap());
        let sp = Tensor::Sparse(SparseMatrix::encode(&d, 128, None).unwrap());
        assert_eq!(q3.codec(), Codec::Q3);
        assert!((q3.bits_per_param() - 3.125).abs() < 1e-9, "{cols}");
        assert_eq!(q3.stored_bytes(), sp.stored_bytes(), "{cols}");
    }
    for bad in [0, 16, 96, 256] {
        assert!(Q3Matrix::encode(&Dense::f32(1, 64, &[0.1; 64]).unwrap(), bad).is_err());
    }
    assert_eq!(Codec::from_name("q3"), Some(Codec::Q3));
}
