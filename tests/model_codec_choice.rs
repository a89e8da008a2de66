//! The codec choice of `convert --bits`: the errors it reports against an f64 recomputation from the
//! reference decoder, its pick against the argmin of those errors within the budget, the bits per
//! parameter against the codecs' documented layouts, and a whole conversion at a budget: every matrix
//! within it, the file loading and running like the same codecs encoded directly.

mod model_common;

use std::collections::HashMap;

use model_common::{fixture, TempDir};
use upg::cpu::reference;
use upg::format::{Codec, Dense, Tensor};
use upg::model::calibration::ActivationNorms;
use upg::model::codec_choice::{candidates, choose, measure, Candidate, Measured};
use upg::model::convert::{convert_budget, load, Budget};
use upg::model::{Checkpoint, CodecPlan, Cpu, HostWeights, Phi3, Role, Weights};
use upg::rng::{test_seed, Rng};

/// Bits per parameter of `c` at [rows, cols] from the layouts in README.md and format/dense.rs:
/// sparse 8 mask + 16 code bytes per 64-column block and an f16 scale per group; q3 12 bytes per 32
/// columns, q4 one byte per 2, each with an f16 scale per group of the padded columns; f16, f32.
fn layout_bits(c: &Candidate, cols: usize) -> f64 {
    let g = c.group.unwrap_or(1);
    let padded = cols.div_ceil(g) * g;
    let row_bytes = match c.codec {
        Codec::Sparse => cols.div_ceil(64) * 24 + 2 * cols.div_ceil(g),
        Codec::Q3 => padded / 32 * 12 + 2 * padded / g,
        Codec::Q4 => padded / 2 + 2 * padded / g,
        Codec::F16 => 2 * cols,
        Codec::F32 => 4 * cols,
    };
    row_bytes as f64 * 8.0 / cols as f64
}

/// ||(W - W') X^T||_F / ||W X^T||_F (or the weight error without inputs) in f64, W' from the
/// reference decoder.
fn error_f64(w: &[f32], rows: usize, cols: usize, t: &Tensor, x: Option<&[f32]>) -> f64 {
    let decoded = reference::decompress_f32(t);
    let e: Vec<f64> = w
        .iter()
        .zip(&decoded)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    let w64: Vec<f64> = w.iter().map(|&a| a as f64).collect();
    let norm2 = |m: &[f64]| -> f64 {
        match x {
            None => m.iter().map(|v| v * v).sum(),
            Some(x) => x
                .chunks(cols)
                .map(|xr| {
                    (0..rows)
                        .map(|r| {
                            let y: f64 = (0..cols).map(|c| m[r * cols + c] * xr[c] as f64).sum();
                            y * y
                        })
                        .sum::<f64>()
                })
                .sum(),
        }
    };
    (norm2(&e) / norm2(&w64)).sqrt()
}

/// Weights with uneven rows and columns, and inputs whose columns have uneven norms (as in LLM
/// activations), so that the codecs and saliencies differ measurably.
fn matrix_and_inputs(rng: &mut Rng, rows: usize, cols: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    let col_scale: Vec<f32> = (0..cols).map(|_| (2.0 * rng.normal()).exp()).collect();
    let mut w = rng.normal_vec(rows * cols, 0.02);
    for (i, v) in w.iter_mut().enumerate() {
        if rng.below(50) == 0 {
            *v *= 8.0; // a few outlier weights
        }
        *v *= 1.0 + (i / cols) as f32 / rows as f32;
    }
    let mut x = rng.normal_vec(n * cols, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        *v *= col_scale[i % cols];
    }
    (w, x)
}

fn check_choice(measured: &[Measured], errors64: &[f64], what: &str) {
    let least = measured
        .iter()
        .map(|m| m.bits)
        .fold(f64::INFINITY, f64::min);
    for bits in [least - 0.01, least, 3.2, 3.25, 3.5, 4.3, 4.5, 16.0, 40.0] {
        let Some(i) = choose(measured, bits) else {
            assert!(bits < least, "{what}: nothing chosen at {bits} bits");
            continue;
        };
        assert!(measured[i].bits <= bits, "{what}: {bits} bits exceeded");
        for (j, m) in measured.iter().enumerate() {
            if m.bits <= bits {
                assert!(
                    errors64[i] <= errors64[j] * (1.0 + 1e-3),
                    "{what} at {bits} bits: chose {} (error {}) over {} (error {})",
                    measured[i].candidate,
                    errors64[i],
                    m.candidate,
                    errors64[j]
                );
            }
        }
    }
}

#[test]
fn chosen_codec_is_the_argmin_of_independently_measured_errors() {
    let mut rng = Rng::new(test_seed("codec_choice_argmin"));
    for &(rows, cols, n) in &[(24, 200, 40), (9, 130, 17), (16, 64, 8)] {
        let (w, x) = matrix_and_inputs(&mut rng, rows, cols, n);
        let norms: Vec<f32> = (0..cols)
            .map(|c| x.chunks(cols).map(|r| r[c] * r[c]).sum::<f32>().sqrt())
            .collect();
        let d = Dense::f32(rows, cols, &w).unwrap();
        for role in [Role::Linear, Role::Embed] {
            let cands = candidates(role, true);
            assert_eq!(
                cands.iter().any(|c| c.codec == Codec::Sparse),
                role == Role::Linear,
                "sparse tables are for linear layers only"
            );
            for inputs in [Some(x.as_slice()), None] {
                let what = format!(
                    "[{rows}, {cols}] {role:?} {}",
                    if inputs.is_some() { "output" } else { "weight" }
                );
                let measured = measure(&d, &cands, Some(&norms), inputs).unwrap();
                assert_eq!(measured.len(), cands.len());
                let mut errors64 = Vec::new();
                for (m, c) in measured.iter().zip(&cands) {
                    assert_eq!(m.candidate, *c);
                    let want_bits = layout_bits(c, cols);
                    assert!(
                        (m.bits - want_bits).abs() < 1e-9,
                        "{what} {c}: {} bits, layout says {want_bits}",
                        m.bits
                    );
                    let t = c.encode(&d, Some(&norms)).unwrap();
                    let e = error_f64(&w, rows, cols, &t, inputs);
                    // The module forms W - W' in f32 and sums products in f32: 1e-4 of the error
                    // is far above that rounding and far below the gaps between codecs.
                    assert!(
                        (m.error - e).abs() <= 1e-4 * e + 1e-12,
                        "{what} {c}: error {} reported, {e} recomputed",
                        m.error
                    );
                    errors64.push(e);
                }
                // The errors mean something: f32 is exact, f16 nearly, q4 beats q3.
                let err = |name: &str| {
                    errors64[cands.iter().position(|c| c.to_string() == name).unwrap()]
                };
                assert_eq!(err("f32"), 0.0, "{what}");
                assert!(err("f16") < 1e-3 && err("q4/g32") < err("q3/g32"), "{what}");
                check_choice(&measured, &errors64, &what);
            }
        }
    }
}

#[test]
fn conversion_at_a_budget_stays_within_it_and_the_file_runs() {
    let dir = TempDir::new("codec-choice");
    let path = fixture("phi3-tiny");
    let ckpt = Checkpoint::open(&path).unwrap();
    let c = &ckpt.config;
    let mut rng = Rng::new(test_seed("codec_choice_conversion"));
    let tokens: Vec<u32> = (0..96).map(|_| rng.below(c.vocab_size) as u32).collect();
    let calib = ActivationNorms::collect_sampled(&ckpt, &tokens, 32, 32).unwrap();
    assert_eq!(calib.positions, 96);
    let qkv = "model.layers.0.self_attn.qkv_proj.weight";
    assert_eq!(
        calib.inputs(qkv).unwrap().len(),
        32 * c.hidden_size,
        "every third position"
    );

    let roles = vec![Role::Linear, Role::Embed, Role::LmHead];
    for bits in [3.2, 3.3, 4.6] {
        let out = dir.0.join(format!("tiny-{bits}.upg"));
        let budget = Budget {
            bits,
            roles: roles.clone(),
        };
        let mut reported = Vec::new();
        let (converted, choices) = convert_budget(
            &path,
            &out,
            &CodecPlan::compressed(),
            &budget,
            Some(&calib),
            |t| reported.push(t.name.clone()),
            |_| {},
        )
        .unwrap();
        assert_eq!(
            reported,
            choices.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
        );
        assert_eq!(
            choices.len(),
            converted.matrices.len(),
            "every matrix chosen"
        );
        // Each matrix, and so all of them, within the budget; each the argmin of its errors.
        let (mut stored, mut params) = (0.0, 0usize);
        for ((name, codec, [r, k], b), t) in converted.matrices.iter().zip(&choices) {
            assert_eq!(name, &t.name);
            assert_eq!(*codec, t.chosen().candidate.codec);
            assert!(*b <= bits, "{name}: {b} bits at a budget of {bits}");
            assert_eq!(Some(t.chosen), choose(&t.measured, bits));
            assert_eq!(t.output_error, t.name.contains("layers"), "{name}");
            stored += b * (r * k) as f64;
            params += r * k;
        }
        println!(
            "{bits} bits: matrices {:.3} bits/param; {:?}",
            stored / params as f64,
            choices
                .iter()
                .map(|t| t.chosen().candidate.to_string())
                .collect::<Vec<_>>()
        );
        assert!(stored / params as f64 <= bits);

        // The file gives the model that the chosen codecs give when encoded directly.
        let chosen: HashMap<&str, Candidate> = choices
            .iter()
            .map(|t| (t.name.as_str(), t.chosen().candidate))
            .collect();
        let direct: HostWeights = Weights::build(
            c,
            |m| {
                let view = ckpt.matrix(m.name, m.rows, m.cols)?;
                Ok::<_, upg::model::ModelError>(
                    chosen[m.name].encode(&view.dense(), calib.get(m.name))?,
                )
            },
            |name, len| ckpt.vector(name, len),
        )
        .unwrap();
        let loaded = load(&out).unwrap();
        assert_eq!(loaded.weights.stored_bytes(), direct.stored_bytes());
        let prompt = &tokens[..12];
        let mut a = Phi3::new(c.clone(), loaded.weights, Cpu::new(), 32).unwrap();
        let mut b = Phi3::new(c.clone(), direct, Cpu::new(), 32).unwrap();
        let (la, lb) = (
            a.forward_all(prompt).unwrap(),
            b.forward_all(prompt).unwrap(),
        );
        assert!(la.iter().all(|v| v.is_finite()));
        assert!(
            la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{bits} bits: logits of the file differ from the directly encoded model"
        );
    }

    let e = convert_budget(
        &path,
        &dir.0.join("too-small.upg"),
        &CodecPlan::compressed(),
        &Budget { bits: 2.5, roles },
        None,
        |_| {},
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no codec fits 2.5 bits") && e.contains("--bits"),
        "{e}"
    );
    assert!(!dir.0.join("too-small.upg").exists());
}
