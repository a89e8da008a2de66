//! The Phi-3 driver against Hugging Face transformers: config parsing of published configs, the dense
//! f32 forward pass against transformers' logits (tests/fixtures, made by scripts/make_phi3_fixture.py),
//! the KV cache against full-sequence passes, greedy generation against transformers' greedy tokens,
//! LongRoPE on both sides of its switch, checkpoint errors, and the compressed path's divergence.

mod model_common;

use model_common::{fixture, reference, softmax, worst_row_rel_error, TempDir};
use upg::format::{Codec, Tensor};
use upg::model::rope::{self, FactorSet};
use upg::model::{Checkpoint, CodecPlan, Config, Cpu, HostWeights, ModelError, Phi3, Sampler};

/// transformers' fp32 logits are compared with a tolerance relative to each position's largest logit.
/// f32 accumulation-order differences over a 128-wide model are ~1e-6; RoPE angles computed in f64 here
/// and in f32 there differ by ~pos * 6e-8 rad. 1e-4 leaves room for both, and a real bug (a wrong
/// factor, a swapped half, an off-by-one position) shows up at 1e-2 or more.
const LOGIT_TOL: f64 = 1e-4;

fn load(name: &str, plan: &CodecPlan, ctx: usize) -> Phi3<Cpu> {
    let ckpt = Checkpoint::open(&fixture(name)).expect("fixture opens");
    let weights = HostWeights::from_checkpoint(&ckpt, plan).expect("weights load");
    Phi3::new(ckpt.config.clone(), weights, Cpu::new(), ctx).expect("model builds")
}

// ---------------------------------------------------------------------------------------------------
// Config

/// Comma-separated list of `n` factors 1.0, 1.0 + step, ...
fn factors(n: usize, step: f64) -> String {
    (0..n)
        .map(|i| format!("{}", 1.0 + step * i as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

const PHI4: &str = r#"{
  "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100265, "hidden_act": "silu",
  "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 17920,
  "max_position_embeddings": 16384, "model_type": "phi3", "num_attention_heads": 40,
  "num_hidden_layers": 40, "num_key_value_heads": 10, "original_max_position_embeddings": 16384,
  "pad_token_id": 100349, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 250000, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": true, "vocab_size": 100352
}"#;

fn phi4_mini() -> String {
    format!(
        r#"{{
  "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 199999, "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1,
  "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
  "interpolate_factor": 1, "lm_head_bias": false, "max_position_embeddings": 131072,
  "mlp_bias": false, "model_type": "phi3", "num_attention_heads": 24, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "original_max_position_embeddings": 4096, "pad_token_id": 199999,
  "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
  "rope_scaling": {{"long_factor": [{}], "short_factor": [{}], "type": "longrope"}},
  "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": true,
  "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": true, "vocab_size": 200064
}}"#,
        factors(48, 0.5),
        factors(48, 0.01)
    )
}

/// Phi-4-mini as transformers 5 saves it: RoPE settings under rope_parameters.
fn phi4_mini_transformers5() -> String {
    format!(
        r#"{{
  "architectures": ["Phi3ForCausalLM"], "bos_token_id": 199999, "eos_token_id": 199999,
  "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192,
  "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 24,
  "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
  "pad_token_id": 199999, "rms_norm_eps": 1e-05,
  "rope_parameters": {{"long_factor": [{}], "short_factor": [{}], "rope_type": "longrope",
    "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 4096}},
  "sliding_window": 262144, "tie_word_embeddings": true, "vocab_size": 200064
}}"#,
        factors(48, 0.5),
        factors(48, 0.01)
    )
}

fn phi35_mini() -> String {
    format!(
        r#"{{
  "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
  "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
  "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000,
  "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
  "rope_scaling": {{"long_factor": [{}], "short_factor": [{}], "type": "longrope"}},
  "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "use_cache": true, "attention_bias": false, "vocab_size": 32064
}}"#,
        factors(48, 0.7),
        factors(48, 0.02)
    )
}

#[test]
fn published_configs_parse() {
    let c = Config::from_json(PHI4).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (5120, 40, 40, 10)
    );
    assert_eq!(
        (c.head_dim, c.rotary_dim(), c.intermediate_size),
        (128, 128, 17920)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (100352, 16384));
    assert_eq!(c.rope_theta, 250000.0);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.eos_token_ids, vec![100265]);
    assert_eq!(
        (c.bos_token_id, c.pad_token_id),
        (Some(100257), Some(100349))
    );
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.qkv_dim(), 5120 + 2 * 1280);
    // 14.7B parameters (published: "14B").
    assert_eq!(c.parameters(), 14_659_507_200);
    assert_eq!(rope::attention_scaling(&c), 1.0);

    let m = Config::from_json(&phi4_mini()).unwrap();
    assert_eq!(
        (
            m.hidden_size,
            m.num_hidden_layers,
            m.num_attention_heads,
            m.num_key_value_heads
        ),
        (3072, 32, 24, 8)
    );
    assert_eq!((m.head_dim, m.rotary_dim()), (128, 96));
    assert!(m.tie_word_embeddings);
    let s = m.rope_scaling.as_ref().expect("longrope");
    assert_eq!(s.original_max_position_embeddings, 4096);
    assert_eq!(s.short_factor.len(), 48);
    assert_eq!(s.long_factor[47], 1.0 + 0.5 * 47.0);
    // Published formula: sqrt(1 + ln(131072 / 4096) / ln(4096)).
    let want = (1.0 + (32.0f64).ln() / (4096.0f64).ln()).sqrt();
    assert!((rope::attention_scaling(&m) - want).abs() < 1e-12);
    assert_eq!(FactorSet::for_len(&m, 4096), FactorSet::Short);
    assert_eq!(FactorSet::for_len(&m, 4097), FactorSet::Long);

    let p = Config::from_json(&phi35_mini()).unwrap();
    assert_eq!(
        (
            p.hidden_size,
            p.num_attention_heads,
            p.num_key_value_heads,
            p.head_dim
        ),
        (3072, 32, 32, 96)
    );
    assert_eq!(p.rotary_dim(), 96);
    assert_eq!(p.rope_scaling.as_ref().unwrap().long_factor.len(), 48);
    assert_eq!(
        (p.vocab_size, p.eos_token_ids.clone()),
        (32064, vec![32000])
    );
    assert_eq!(p.sliding_window, Some(262144));
}

#[test]
fn both_rope_layouts_read_the_same() {
    assert_eq!(
        Config::from_json(&phi4_mini()).unwrap(),
        Config::from_json(&phi4_mini_transformers5()).unwrap()
    );
    // The fixtures: config.json as published, config_transformers5.json as transformers 5.17 wrote it.
    for name in ["phi3-tiny", "phi3-tiny-longrope"] {
        let dir = fixture(name);
        let published = Config::from_file(&dir.join("config.json")).unwrap();
        let tf5 = Config::from_file(&dir.join("config_transformers5.json")).unwrap();
        assert_eq!(published, tf5, "{name}");
    }
    let lr = Config::from_file(&fixture("phi3-tiny-longrope/config.json")).unwrap();
    assert_eq!(
        lr.rope_scaling
            .as_ref()
            .unwrap()
            .original_max_position_embeddings,
        32
    );
    assert_eq!(lr.partial_rotary_factor, 0.75);
    assert_eq!(lr.eos_token_ids, vec![3, 4]);
    // transformers' own count, in the index it wrote.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("phi3-tiny-longrope/model.safetensors.index.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        lr.parameters() as u64,
        index["metadata"]["total_parameters"].as_u64().unwrap()
    );
}

#[test]
fn bad_configs_are_refused() {
    let base: serde_json::Value = serde_json::from_str(&phi4_mini()).unwrap();
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("num_attention_heads", 0.into(), "num_attention_heads is 0"),
        ("num_attention_heads", 25.into(), "not a positive multiple"),
        (
            "num_key_value_heads",
            7.into(),
            "must be positive and divide",
        ),
        (
            "num_key_value_heads",
            0.into(),
            "must be positive and divide",
        ),
        ("hidden_size", 0.into(), "not a positive multiple"),
        ("vocab_size", 0.into(), "vocab_size is 0"),
        ("vocab_size", 1000.into(), "_token_id 199999 is outside"),
        ("partial_rotary_factor", 0.0.into(), "partial_rotary_factor"),
        ("partial_rotary_factor", 1.5.into(), "partial_rotary_factor"),
        ("rms_norm_eps", (-1.0).into(), "rms_norm_eps"),
        ("model_type", "llama".into(), "model_type 'llama'"),
        ("hidden_act", "gelu".into(), "hidden_act 'gelu'"),
        ("head_dim", 96.into(), "head_dim 96"),
        ("sliding_window", 0.into(), "sliding_window is 0"),
        (
            "rope_scaling",
            serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
            "short_factor has 1 entries; rotary dimension 96 needs 48",
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "dynamic", "factor": 2.0}),
            "RoPE type 'dynamic'",
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "longrope", "short_factor": vec![1.0; 48]}),
            "longrope needs rope_scaling.long_factor",
        ),
    ];
    for (key, value, expect) in cases {
        let mut cfg = base.clone();
        cfg[*key] = value.clone();
        let err = Config::from_json(&cfg.to_string())
            .expect_err(key)
            .to_string();
        assert!(
            err.contains(expect),
            "{key} = {value}: error '{err}' lacks '{expect}'"
        );
    }
    let mut cfg = base.clone();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    let err = Config::from_json(&cfg.to_string()).unwrap_err().to_string();
    assert!(err.contains("hidden_size"), "{err}");
}

// ---------------------------------------------------------------------------------------------------
// Forward pass against transformers

#[test]
fn dense_logits_match_transformers() {
    let r = reference(&fixture("phi3-tiny"));
    let tokens = r["tokens"].ids();
    let mut model = load("phi3-tiny", &CodecPlan::exact(), 64);
    let vocab = model.config.vocab_size;
    let logits = model.forward_all(&tokens).unwrap();
    for want in ["logits", "logits_f64"] {
        let (err, pos) = worst_row_rel_error(&logits, &r[want].values, vocab);
        println!(
            "phi3-tiny vs transformers {want}: worst relative error {err:.2e} at position {pos}"
        );
        assert!(
            err <= LOGIT_TOL,
            "position {pos}: relative error {err:.2e} > {LOGIT_TOL:.0e}"
        );
    }
}

#[test]
fn longrope_logits_match_transformers_on_both_sides_of_the_switch() {
    let r = reference(&fixture("phi3-tiny-longrope"));
    let mut model = load("phi3-tiny-longrope", &CodecPlan::exact(), 64);
    let vocab = model.config.vocab_size;
    for (seq, set) in [("short", FactorSet::Short), ("long", FactorSet::Long)] {
        model.reset();
        let tokens = r[&format!("{seq}_tokens")].ids();
        assert_eq!(FactorSet::for_len(&model.config, tokens.len()), set);
        let logits = model.forward_all(&tokens).unwrap();
        let (err, pos) = worst_row_rel_error(&logits, &r[&format!("{seq}_logits")].values, vocab);
        println!(
            "longrope {seq} ({} tokens): worst relative error {err:.2e} at {pos}",
            tokens.len()
        );
        assert!(err <= LOGIT_TOL, "{seq}: position {pos}: {err:.2e}");
    }
}

#[test]
fn kv_cache_decode_equals_full_sequence() {
    let r = reference(&fixture("phi3-tiny"));
    let tokens = r["tokens"].ids();
    let mut model = load("phi3-tiny", &CodecPlan::exact(), 32);
    let vocab = model.config.vocab_size;
    let full = model.forward_all(&tokens).unwrap();
    // One token at a time, and a prefill of 5 followed by single tokens.
    for prefill in [1, 5] {
        model.reset();
        let mut got = model.forward_all(&tokens[..prefill]).unwrap();
        for &t in &tokens[prefill..] {
            model.forward(&[t]).unwrap();
            got.extend(model.logits().unwrap());
        }
        let want: Vec<f64> = full.iter().map(|&v| v as f64).collect();
        let (err, pos) = worst_row_rel_error(&got, &want, vocab);
        println!(
            "prefill {prefill} + decode vs full pass: worst relative error {err:.2e} at {pos}"
        );
        // Same kernels, same accumulation order per row: only the batch split differs.
        assert!(err <= 1e-6, "prefill {prefill}: position {pos}: {err:.2e}");
    }
}

#[test]
fn longrope_decode_across_the_switch_recomputes_the_cache() {
    let r = reference(&fixture("phi3-tiny-longrope"));
    let long = r["long_tokens"].ids();
    let want = &r["long_logits"].values;
    let mut model = load("phi3-tiny-longrope", &CodecPlan::exact(), 64);
    let vocab = model.config.vocab_size;
    // Prefill 28 (short factors), then decode one at a time past position 32: from the first position
    // beyond original_max_position_embeddings on, every logit must be the long-factor one.
    model.forward(&long[..28]).unwrap();
    for (p, &t) in long.iter().enumerate().skip(28) {
        model.forward(&[t]).unwrap();
        if p + 1 > 32 {
            let got = model.logits().unwrap();
            let (err, _) = worst_row_rel_error(&got, &want[p * vocab..][..vocab], vocab);
            assert!(err <= LOGIT_TOL, "position {p}: {err:.2e}");
        }
    }
}

#[test]
fn prompts_longer_than_a_batch_match_transformers() {
    let r = reference(&fixture("phi3-tiny-longrope"));
    let long = r["long_tokens"].ids();
    let want = &r["long_logits"].values;
    let ckpt = Checkpoint::open(&fixture("phi3-tiny-longrope")).unwrap();
    let vocab = ckpt.config.vocab_size;
    for batch in [1, 7, 40] {
        let w = HostWeights::from_checkpoint(&ckpt, &CodecPlan::exact()).unwrap();
        let mut model = Phi3::with_batch(ckpt.config.clone(), w, Cpu::new(), 64, batch).unwrap();
        let got = model.forward_all(&long).unwrap();
        let (err, pos) = worst_row_rel_error(&got, want, vocab);
        assert!(err <= LOGIT_TOL, "batch {batch}: position {pos}: {err:.2e}");
        // 28 short-factor positions, then 12 that cross the switch: the cache is recomputed in batches
        // and only the 12 new positions' logits come back.
        model.reset();
        model.forward(&long[..28]).unwrap();
        let got = model.forward_all(&long[28..]).unwrap();
        let (err, pos) = worst_row_rel_error(&got, &want[28 * vocab..], vocab);
        assert!(
            err <= LOGIT_TOL,
            "batch {batch}, across the switch: position {}: {err:.2e}",
            28 + pos
        );
        assert_eq!(model.tokens(), &long[..]);
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    let r = reference(&fixture("phi3-tiny"));
    let mut model = load("phi3-tiny", &CodecPlan::exact(), 32);
    let out = model
        .generate(&r["tokens"].ids(), 8, &mut Sampler::greedy(), &[], |_| {})
        .unwrap();
    assert_eq!(out.tokens, r["greedy"].ids());

    let r = reference(&fixture("phi3-tiny-longrope"));
    let mut model = load("phi3-tiny-longrope", &CodecPlan::exact(), 64);
    let out = model
        .generate(
            &r["cross_prompt"].ids(),
            10,
            &mut Sampler::greedy(),
            &[],
            |_| {},
        )
        .unwrap();
    assert_eq!(out.tokens, r["cross_greedy"].ids());
}

/// Sampling is a function of the seed: the same seed gives the same tokens again on one loaded model
/// (after a reset) and on a freshly loaded one, and another seed other tokens. (The GPU's side is
/// model_gpu.rs `gpu_sampling_with_a_seed_repeats`; greedy GPU against CPU is
/// `gpu_greedy_tokens_equal_cpu_and_transformers` there.)
#[test]
fn sampling_with_a_seed_repeats_on_the_cpu() {
    let seed = upg::rng::test_seed("sampling_with_a_seed_repeats_on_the_cpu");
    let prompt = reference(&fixture("phi3-tiny"))["tokens"].ids();
    let run = |model: &mut Phi3<Cpu>, seed: u64| {
        model.reset();
        let mut sampler = Sampler::new(upg::model::SamplerConfig {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.1,
            seed,
        })
        .unwrap();
        model
            .generate(&prompt, 24, &mut sampler, &[], |_| {})
            .unwrap()
            .tokens
    };
    let mut model = load("phi3-tiny", &CodecPlan::compressed(), 64);
    let first = run(&mut model, seed);
    assert_eq!(run(&mut model, seed), first, "same model, same seed");
    let mut fresh = load("phi3-tiny", &CodecPlan::compressed(), 64);
    assert_eq!(run(&mut fresh, seed), first, "fresh model, same seed");
    let other = run(&mut model, seed.wrapping_add(1));
    println!("seed {seed}: {first:?}\nseed + 1: {other:?}");
    assert_ne!(other, first, "another seed gave the same 24 sampled tokens");
}

#[test]
fn compressed_path_divergence() {
    let r = reference(&fixture("phi3-tiny"));
    let tokens = r["tokens"].ids();
    let mut dense = load("phi3-tiny", &CodecPlan::exact(), 32);
    let vocab = dense.config.vocab_size;
    let want = dense.forward_all(&tokens).unwrap();
    for plan in [
        CodecPlan::compressed(),
        CodecPlan {
            linear: Codec::Sparse,
            embed: Codec::F16,
            lm_head: Codec::F16,
            ..CodecPlan::exact()
        },
        CodecPlan {
            linear: Codec::Q4,
            ..CodecPlan::exact()
        },
    ] {
        let mut model = load("phi3-tiny", &plan, 32);
        let got = model.forward_all(&tokens).unwrap();
        // KL(dense || compressed) per position, in nats, averaged.
        let mut kl = 0.0;
        let mut agree = 0;
        for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
            let p = softmax(&w.iter().map(|&v| v as f64).collect::<Vec<_>>());
            let q = softmax(&g.iter().map(|&v| v as f64).collect::<Vec<_>>());
            kl += p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum::<f64>();
            agree += usize::from(upg::model::sampler::argmax(g) == upg::model::sampler::argmax(w));
        }
        kl /= tokens.len() as f64;
        println!(
            "phi3-tiny linear {:?} embed {:?} lm_head {:?}: mean KL(dense || compressed) = {kl:.4} nats, top-1 agreement {agree}/{}",
            plan.linear,
            plan.embed,
            plan.lm_head,
            tokens.len()
        );
        assert!(kl.is_finite() && kl >= 0.0, "KL {kl}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Checkpoints

#[test]
fn f32_checkpoint_tensors_are_mapped_not_copied() {
    let ckpt = Checkpoint::open(&fixture("phi3-tiny")).unwrap();
    let c = &ckpt.config;
    let view = ckpt
        .matrix(
            "model.layers.0.self_attn.qkv_proj.weight",
            c.qkv_dim(),
            c.hidden_size,
        )
        .unwrap();
    assert!(view.is_borrowed());
    let w = HostWeights::from_checkpoint(&ckpt, &CodecPlan::exact()).unwrap();
    match &w.layers[1].down {
        Tensor::F32(t) => assert!(matches!(t.values, upg::format::Plane::Mapped { .. })),
        other => panic!("expected f32, got {:?}", other.codec()),
    }
    // Sharded and tied: the longrope fixture has no lm_head.
    let ckpt = Checkpoint::open(&fixture("phi3-tiny-longrope")).unwrap();
    assert!(!ckpt.contains("lm_head.weight"));
    let w = HostWeights::from_checkpoint(&ckpt, &CodecPlan::exact()).unwrap();
    assert!(w.lm_head.is_none());
}

/// Writes `tensors` (name, dtype, shape, little-endian bytes) as `file` in `dir`.
fn write_safetensors(
    dir: &std::path::Path,
    file: &str,
    tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(file)).unwrap();
}

/// Every tensor of the f32 fixture, converted by `f`.
fn fixture_tensors(
    f: impl Fn(&str, &[f32], &[usize]) -> (String, safetensors::Dtype, Vec<usize>, Vec<u8>),
) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixture("phi3-tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let vals: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            f(&name, &vals, v.shape())
        })
        .collect()
}

#[test]
fn bf16_checkpoint_loads_the_rounded_weights() {
    let dir = TempDir::new("bf16");
    std::fs::copy(fixture("phi3-tiny/config.json"), dir.0.join("config.json")).unwrap();
    let tensors = fixture_tensors(|name, vals, shape| {
        let b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        (name.into(), safetensors::Dtype::BF16, shape.to_vec(), b)
    });
    write_safetensors(&dir.0, "model.safetensors", tensors);
    let ckpt = Checkpoint::open(&dir.0).unwrap();
    let w = HostWeights::from_checkpoint(&ckpt, &CodecPlan::exact()).unwrap();
    let orig = Checkpoint::open(&fixture("phi3-tiny")).unwrap();
    let c = &orig.config;
    let want = orig
        .matrix(
            "model.layers.1.mlp.gate_up_proj.weight",
            2 * c.intermediate_size,
            c.hidden_size,
        )
        .unwrap();
    let mut row = vec![0.0f32; c.hidden_size];
    let mut want_row = Vec::new();
    for r in 0..2 * c.intermediate_size {
        w.layers[1].gate_up.decode_row(r, &mut row);
        want.dense().row_f32(r, &mut want_row).unwrap();
        for (got, &v) in row.iter().zip(&want_row) {
            assert_eq!(*got, half::bf16::from_f32(v).to_f32());
        }
    }
}

#[test]
fn checkpoint_errors_name_the_problem() {
    let expect = |dir: &std::path::Path, what: &str| {
        let err = Checkpoint::open(dir)
            .and_then(|c| HostWeights::from_checkpoint(&c, &CodecPlan::exact()).map(|_| ()))
            .expect_err(what);
        let msg = err.to_string();
        println!("{what}: {msg}");
        (err, msg)
    };

    let (_, msg) = expect(&fixture("no-such-model"), "missing folder");
    assert!(msg.contains("not a folder"), "{msg}");

    let dir = TempDir::copy_of("phi3-tiny-longrope");
    std::fs::remove_file(dir.0.join("model-00002-of-00003.safetensors")).unwrap();
    let (_, msg) = expect(&dir.0, "missing shard");
    assert!(
        msg.contains("model-00002-of-00003.safetensors") && msg.contains("missing"),
        "{msg}"
    );

    let dir = TempDir::new("noweights");
    std::fs::copy(fixture("phi3-tiny/config.json"), dir.0.join("config.json")).unwrap();
    let (_, msg) = expect(&dir.0, "no weights");
    assert!(msg.contains("no model.safetensors"), "{msg}");

    // A tensor left out, one with the wrong shape, one with an unsupported dtype.
    let cases: [(&str, &str); 3] = [
        ("model.layers.1.mlp.down_proj.weight", "drop"),
        ("model.layers.0.self_attn.qkv_proj.weight", "shape"),
        ("model.norm.weight", "dtype"),
    ];
    for (target, how) in cases {
        std::fs::remove_file(dir.0.join("model.safetensors")).ok();
        let tensors = fixture_tensors(|name, vals, shape| {
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            if name == target && how == "shape" {
                return (
                    name.into(),
                    safetensors::Dtype::F32,
                    vec![shape[1], shape[0]],
                    bytes,
                );
            }
            if name == target && how == "dtype" {
                return (name.into(), safetensors::Dtype::I32, shape.to_vec(), bytes);
            }
            (name.into(), safetensors::Dtype::F32, shape.to_vec(), bytes)
        })
        .into_iter()
        .filter(|t| !(t.0 == target && how == "drop"))
        .collect();
        write_safetensors(&dir.0, "model.safetensors", tensors);
        let (err, msg) = expect(&dir.0, how);
        assert!(msg.contains(target), "{how}: {msg}");
        match how {
            "drop" => assert!(matches!(err, ModelError::MissingTensor { .. }), "{msg}"),
            "shape" => assert!(matches!(err, ModelError::Shape { .. }), "{msg}"),
            _ => assert!(matches!(err, ModelError::Dtype { .. }), "{msg}"),
        }
    }
}

#[test]
fn model_input_errors() {
    let mut model = load("phi3-tiny", &CodecPlan::exact(), 8);
    let err = model.forward(&[384]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::Token {
                id: 384,
                vocab: 384
            }
        ),
        "{err}"
    );
    let err = model.forward(&[1; 9]).unwrap_err();
    assert!(err.to_string().contains("--ctx"), "{err}");
    let err = model
        .generate(&[1, 2, 3], 7, &mut Sampler::greedy(), &[], |_| {})
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextFull {
                needed: 9,
                ctx: 8,
                ..
            }
        ),
        "{err}"
    );
    // Exactly full is fine: the last sampled token needs no cache row.
    model
        .generate(&[1, 2, 3], 6, &mut Sampler::greedy(), &[], |_| {})
        .unwrap();
    let ckpt = Checkpoint::open(&fixture("phi3-tiny")).unwrap();
    let w = HostWeights::from_checkpoint(&ckpt, &CodecPlan::exact()).unwrap();
    let err = Phi3::new(ckpt.config.clone(), w, Cpu::new(), 1000)
        .err()
        .unwrap();
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
}
