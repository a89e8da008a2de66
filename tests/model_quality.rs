//! Measuring quality on the built-in model (models/tiny-fortunes): the windowed held-out perplexity
//! against the figure transformers computed (perplexity.json), and the activation norms Wanda pruning
//! ranks weights by, against an independent f64 computation.

use std::path::{Path, PathBuf};

use serde_json::Value;
use upg::format::{Codec, SparseMatrix, Tensor};
use upg::model::calibration::ActivationNorms;
use upg::model::perplexity::{document_stream, windowed, BitsPerParam};
use upg::model::{Checkpoint, CodecPlan, Cpu, HostWeights, Phi3, TextTokenizer};
use upg::rng::{test_seed, Rng};

fn builtin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fortunes")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(builtin().join("perplexity.json")).expect("perplexity.json");
    serde_json::from_str(&text).expect("perplexity.json parses")
}

fn stream(ckpt: &Checkpoint, file: &str) -> Vec<u32> {
    let tokenizer = TextTokenizer::from_dir(&builtin(), &ckpt.config).unwrap();
    let text = std::fs::read_to_string(builtin().join(file)).unwrap();
    document_stream(&tokenizer, &text).unwrap()
}

/// The whole held-out set (46k tokens, ~20 s on 2 cores in release) on the dense f32 path, windowed
/// as the training script did: the same figure as transformers to well within 3 significant digits.
#[test]
fn full_heldout_perplexity_matches_transformers() {
    let r = &reference()["heldout"];
    let ckpt = Checkpoint::open(&builtin()).unwrap();
    let tokens = stream(&ckpt, "heldout.txt");
    assert_eq!(tokens.len() as u64, r["stream_tokens"].as_u64().unwrap());
    let ctx = r["context"].as_u64().unwrap() as usize;
    let weights = HostWeights::from_checkpoint(&ckpt, &CodecPlan::exact()).unwrap();
    let bits = BitsPerParam::of(&weights);
    assert_eq!((bits.linear, bits.all), (32.0, 32.0));
    let mut model = Phi3::with_batch(ckpt.config.clone(), weights, Cpu::new(), ctx, ctx).unwrap();
    let ppl = windowed(&mut model, &tokens, ctx).unwrap();
    assert_eq!(
        ppl.predicted as u64,
        r["predicted_tokens"].as_u64().unwrap()
    );
    let theirs = r["perplexity"].as_f64().unwrap();
    let rel = (ppl.perplexity() - theirs).abs() / theirs;
    println!(
        "held-out perplexity: ours {:.4}, transformers {theirs:.4}, relative {rel:.1e}",
        ppl.perplexity()
    );
    // Same weights on both sides; f32 accumulation order differs (~1e-6 relative on the slice test).
    assert!(rel < 1e-4, "{} vs {theirs}", ppl.perplexity());
}

/// Layer 0's qkv_proj input is RMSNorm(embedding row) * input_layernorm.weight: computable in f64
/// straight from the checkpoint, without the forward pass. The other layers' norms must exist, fit
/// their matrices and be positive.
#[test]
fn activation_norms_match_an_independent_computation() {
    let ckpt = Checkpoint::open(&builtin()).unwrap();
    let c = &ckpt.config;
    let calib = stream(&ckpt, "calibration.txt");
    let mut rng = Rng::new(test_seed("activation_norms"));
    let start = rng.below(calib.len() - 100);
    let tokens = &calib[start..start + 40 + rng.below(40)];
    let ctx = 16 + rng.below(16);
    let norms = ActivationNorms::collect(&ckpt, tokens, ctx).unwrap();
    assert_eq!(norms.positions, tokens.len());

    let h = c.hidden_size;
    let embed = ckpt
        .matrix("model.embed_tokens.weight", c.vocab_size, h)
        .unwrap();
    let embed = embed.dense();
    let gamma = ckpt
        .vector("model.layers.0.input_layernorm.weight", h)
        .unwrap();
    let mut sums = vec![0.0f64; h];
    let mut row = Vec::new();
    for &t in tokens {
        embed.row_f32(t as usize, &mut row).unwrap();
        let ms = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + c.rms_norm_eps as f64).sqrt();
        for (s, (&x, &g)) in sums.iter_mut().zip(row.iter().zip(&gamma)) {
            *s += (x as f64 * inv * g as f64).powi(2);
        }
    }
    let got = norms
        .get("model.layers.0.self_attn.qkv_proj.weight")
        .unwrap();
    for (col, (&g, s)) in got.iter().zip(&sums).enumerate() {
        let want = s.sqrt();
        assert!(
            (g as f64 - want).abs() <= 1e-5 * want,
            "column {col}: {g} vs {want}"
        );
    }

    assert_eq!(norms.norms.len(), 4 * c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (name, cols) in [
            ("self_attn.qkv_proj.weight", h),
            ("self_attn.o_proj.weight", c.q_dim()),
            ("mlp.gate_up_proj.weight", h),
            ("mlp.down_proj.weight", c.intermediate_size),
        ] {
            let n = norms.get(&format!("{p}{name}")).unwrap();
            assert_eq!(n.len(), cols, "{p}{name}");
            assert!(
                n.iter().all(|v| v.is_finite() && *v > 0.0),
                "{p}{name}: {n:?}"
            );
        }
    }
    // The sparse codec gets these norms: the stored tensor is Wanda's, not magnitude's.
    let plan = CodecPlan {
        linear: Codec::Sparse,
        ..CodecPlan::exact()
    };
    let weights = HostWeights::from_checkpoint_calibrated(&ckpt, &plan, Some(&norms)).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    let dense = ckpt.matrix(name, h, c.intermediate_size).unwrap();
    let wanda = SparseMatrix::encode(&dense.dense(), 128, norms.get(name)).unwrap();
    let magnitude = SparseMatrix::encode(&dense.dense(), 128, None).unwrap();
    let Tensor::Sparse(stored) = &weights.layers[1].down else {
        panic!("down_proj is not sparse")
    };
    assert_eq!(&stored.masks[..], &wanda.masks[..]);
    assert_eq!(&stored.codes[..], &wanda.codes[..]);
    assert_ne!(&stored.masks[..], &magnitude.masks[..]);
}
