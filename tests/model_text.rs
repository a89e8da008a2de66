//! Text and token choice: the tokenizer and chat template against transformers' output for the fixture
//! (tests/fixtures/phi3-tiny/chat_reference.json), and the sampler against its definition (transformers'
//! logits processors), on fresh random logits each run.

mod model_common;

use model_common::fixture;
use upg::model::sampler::{apply_repetition_penalty, argmax};
use upg::model::tokenizer::render_chat_template;
use upg::model::{Config, Message, Sampler, SamplerConfig, TextTokenizer};
use upg::rng::{test_seed, Rng};

fn tokenizer() -> TextTokenizer {
    let dir = fixture("phi3-tiny");
    let config = Config::from_file(&dir.join("config.json")).unwrap();
    TextTokenizer::from_dir(&dir, &config).unwrap()
}

fn chat_reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("phi3-tiny/chat_reference.json")).unwrap(),
    )
    .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Tokenizer and chat template

#[test]
fn encode_decode_match_transformers() {
    let tok = tokenizer();
    let r = chat_reference();
    let sample = r["sample"].as_str().unwrap();
    let got = tok.encode(sample, true).unwrap();
    assert_eq!(got, ids(&r["sample_ids"]));
    assert_eq!(
        tok.decode(&got, false).unwrap(),
        r["sample_decoded"].as_str().unwrap()
    );
    // Byte-level BPE round-trips any text, including characters it never saw in training.
    for text in [
        sample,
        "  leading spaces, tabs\tand\nnewlines ",
        "Ünïcödé ✓ 漢字 🙂",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // Streaming decode gives the same text piece by piece.
        let mut stream = tok.stream(false);
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(piece) = stream.step(id).unwrap() {
                streamed.push_str(&piece);
            }
        }
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_matches_transformers() {
    let tok = tokenizer();
    let r = chat_reference();
    let text = tok
        .apply_chat_template(&messages(&r["messages"]), true)
        .unwrap();
    assert_eq!(text, r["text"].as_str().unwrap());
    assert_eq!(tok.encode(&text, false).unwrap(), ids(&r["ids"]));
    let text = tok
        .apply_chat_template(&messages(&r["messages_no_generation_prompt"]), false)
        .unwrap();
    assert_eq!(text, r["text_no_generation_prompt"].as_str().unwrap());
}

#[test]
fn stop_tokens_come_from_every_source() {
    let tok = tokenizer();
    // config.json eos 3 (<|im_end|>), generation_config.json [3, 4], <|end|> = 4 and <|im_end|> = 3 by name.
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(3));
    assert_eq!(tok.token_to_id("<|end|>"), Some(4));
    assert_eq!(tok.stop_tokens(), &[3, 4]);
}

#[test]
fn chat_templates_render_as_jinja_does() {
    // trim_blocks / lstrip_blocks (transformers' settings), Python string methods, raise_exception.
    let special = vec![("eos_token".to_string(), "</s>".to_string())];
    let msgs = [
        Message::new("user", "  hi  "),
        Message::new("assistant", "yo"),
    ];
    let src = "{% for m in messages %}\n  {% if m['role'].startswith('u') %}\n<u>{{ m['content'].strip() }}\n  {% else %}\n<a>{{ m.content.upper() }}{{ eos_token }}\n  {% endif %}\n{% endfor %}";
    let out = render_chat_template(src, &msgs, false, &special).unwrap();
    assert_eq!(out, "<u>hi\n<a>YO</s>\n");
    let src =
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}";
    let err = render_chat_template(src, &msgs, false, &special).unwrap_err();
    assert!(err.to_string().contains("system first"), "{err}");
    let err = render_chat_template("{% for %}", &msgs, false, &special).unwrap_err();
    assert!(err.to_string().contains("does not compile"), "{err}");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let config = Config::from_file(&fixture("phi3-tiny-longrope/config.json")).unwrap();
    let err = TextTokenizer::from_dir(&fixture("phi3-tiny-longrope"), &config)
        .err()
        .unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

// ---------------------------------------------------------------------------------------------------
// Sampler

fn random_logits(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.normal_vec(n, 2.0)
}

/// Token ids sorted by logit, largest first (ties: lower id), computed independently in f64.
fn ranking(logits: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| {
        (logits[b] as f64)
            .total_cmp(&(logits[a] as f64))
            .then(a.cmp(&b))
    });
    idx
}

fn sampler(temperature: f32, top_k: usize, top_p: f32, repeat_penalty: f32, seed: u64) -> Sampler {
    Sampler::new(SamplerConfig {
        temperature,
        top_k,
        top_p,
        repeat_penalty,
        seed,
    })
    .unwrap()
}

#[test]
fn temperature_gives_softmax_of_scaled_logits() {
    let mut rng = Rng::new(test_seed("temperature_gives_softmax_of_scaled_logits"));
    for t in [0.3f32, 1.0, 2.5] {
        let logits = random_logits(&mut rng, 300);
        let dist = sampler(t, 0, 1.0, 1.0, 1).distribution(&logits, &[]);
        assert_eq!(dist.len(), logits.len());
        let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / t as f64).collect();
        let want = model_common::softmax(&scaled);
        for &(id, p) in &dist {
            assert!(
                (p as f64 - want[id as usize]).abs() <= 1e-6,
                "token {id}: {p} vs {}",
                want[id as usize]
            );
        }
    }
}

#[test]
fn top_k_never_leaves_the_top_k() {
    let mut rng = Rng::new(test_seed("top_k_never_leaves_the_top_k"));
    for k in [1usize, 3, 10] {
        let logits = random_logits(&mut rng, 200);
        let top: Vec<usize> = ranking(&logits)[..k].to_vec();
        let mut s = sampler(1.5, k, 1.0, 1.0, rng.next_u64());
        assert_eq!(s.distribution(&logits, &[]).len(), k);
        for _ in 0..2000 {
            let t = s.sample(&logits, &[]) as usize;
            assert!(top.contains(&t), "k {k}: sampled {t}, outside the top {k}");
        }
    }
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let mut rng = Rng::new(test_seed("top_p_keeps_the_smallest_set_reaching_p"));
    for p in [0.1f32, 0.5, 0.9, 0.99] {
        let logits = random_logits(&mut rng, 100);
        let probs = model_common::softmax(&logits.iter().map(|&l| l as f64).collect::<Vec<_>>());
        // The shortest prefix of the ranking whose mass reaches p (transformers keeps the token that
        // crosses p).
        let order = ranking(&logits);
        let mut mass = 0.0;
        let mut keep = 0;
        for &i in &order {
            mass += probs[i];
            keep += 1;
            if mass >= p as f64 {
                break;
            }
        }
        let mut s = sampler(1.0, 0, p, 1.0, rng.next_u64());
        let dist = s.distribution(&logits, &[]);
        let got: Vec<usize> = dist.iter().map(|d| d.0 as usize).collect();
        assert_eq!(got, order[..keep].to_vec(), "p {p}");
        let total: f64 = dist.iter().map(|d| d.1 as f64).sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "p {p}: renormalised mass {total}"
        );
        for (&(id, q), &i) in dist.iter().zip(&order) {
            assert!(
                (q as f64 - probs[i] / mass).abs() < 1e-5,
                "p {p}: token {id}"
            );
        }
        for _ in 0..500 {
            let t = s.sample(&logits, &[]) as usize;
            assert!(
                order[..keep].contains(&t),
                "p {p}: sampled {t} outside the nucleus"
            );
        }
    }
}

#[test]
fn draws_follow_the_distribution() {
    let seed = test_seed("draws_follow_the_distribution");
    let mut rng = Rng::new(seed);
    let logits = random_logits(&mut rng, 50);
    let mut s = sampler(1.0, 5, 1.0, 1.0, seed);
    let dist = s.distribution(&logits, &[]);
    let n = 20_000;
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[s.sample(&logits, &[]) as usize] += 1;
    }
    for &(id, p) in &dist {
        // Binomial: 5 standard deviations.
        let (want, sd) = (
            n as f64 * p as f64,
            (n as f64 * p as f64 * (1.0 - p as f64)).sqrt(),
        );
        let got = counts[id as usize] as f64;
        assert!(
            (got - want).abs() <= 5.0 * sd + 1.0,
            "token {id}: {got} draws, expected {want:.0} ± {sd:.0}"
        );
    }
}

#[test]
fn same_seed_same_tokens() {
    let seed = test_seed("same_seed_same_tokens");
    let mut rng = Rng::new(seed);
    let logits = random_logits(&mut rng, 500);
    let draw = |seed: u64| {
        let mut s = sampler(1.0, 40, 0.95, 1.1, seed);
        (0..200)
            .map(|i| s.sample(&logits, &[i % 7]))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(seed), draw(seed));
    assert_ne!(
        draw(seed),
        draw(seed.wrapping_add(1)),
        "different seeds gave the same 200 tokens"
    );
}

#[test]
fn repetition_penalty_follows_transformers() {
    let mut rng = Rng::new(test_seed("repetition_penalty_follows_transformers"));
    let logits = random_logits(&mut rng, 64);
    let history: Vec<u32> = (0..20).map(|_| rng.below(64) as u32).collect();
    for penalty in [0.8f32, 1.3, 2.0] {
        let mut got = logits.clone();
        apply_repetition_penalty(&mut got, &history, penalty);
        for (i, (&g, &l)) in got.iter().zip(&logits).enumerate() {
            // RepetitionPenaltyLogitsProcessor: score < 0 ? score * penalty : score / penalty, once per
            // distinct token of the sequence.
            let want = if history.contains(&(i as u32)) {
                if l < 0.0 {
                    l * penalty
                } else {
                    l / penalty
                }
            } else {
                l
            };
            assert_eq!(g, want, "token {i}, penalty {penalty}");
        }
        // Greedy takes the argmax of the penalised logits.
        let mut s = sampler(0.0, 0, 1.0, penalty, 0);
        assert_eq!(s.sample(&logits, &history), argmax(&got));
    }
}

#[test]
fn greedy_takes_the_first_maximum() {
    let logits = [0.5f32, 2.0, -1.0, 2.0, f32::NAN];
    assert_eq!(Sampler::greedy().sample(&logits, &[]), 1);
}

#[test]
fn bad_sampler_settings_are_refused() {
    for (t, p, r, what) in [
        (-1.0f32, 1.0f32, 1.0f32, "temperature"),
        (f32::NAN, 1.0, 1.0, "temperature"),
        (1.0, 0.0, 1.0, "top-p"),
        (1.0, 1.5, 1.0, "top-p"),
        (1.0, 1.0, 0.0, "repetition penalty"),
    ] {
        let err = Sampler::new(SamplerConfig {
            temperature: t,
            top_k: 0,
            top_p: p,
            repeat_penalty: r,
            seed: 0,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains(what), "{err}");
    }
}
