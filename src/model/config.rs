//! The Phi-3 family's config.json, as published (Phi-3/3.5-mini, Phi-4, Phi-4-mini) and as transformers 5
//! writes it.
//!
//! Published checkpoints keep RoPE settings at the top level (`rope_theta`, `partial_rotary_factor`,
//! `rope_scaling` = null or `{"type": "longrope", "short_factor", "long_factor"}`,
//! `original_max_position_embeddings`); transformers 5 moves them into `rope_parameters`
//! (`{"rope_type": "default" | "longrope", "rope_theta", "partial_rotary_factor", ...}`). Both are read,
//! with transformers' precedence: `rope_scaling` over `rope_parameters`, values inside the RoPE dict over
//! top-level ones, and a top-level `original_max_position_embeddings` over the dict's (Phi-3's own rule).

use std::path::Path;

use serde::Deserialize;

use super::error::{ModelError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// hidden_size / num_attention_heads.
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    /// Fraction of each head that RoPE rotates (Phi-4-mini: 0.75); the rest passes through.
    pub partial_rotary_factor: f64,
    pub rope_scaling: Option<LongRope>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (config.json allows one id or a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Attention sees at most this many most recent positions (transformers: kv > q - window).
    pub sliding_window: Option<usize>,
}

/// LongRoPE (Phi-3.5-mini, Phi-4-mini): per-frequency divisors, `short_factor` while the sequence fits
/// `original_max_position_embeddings`, `long_factor` beyond, and cos/sin scaled by `attention_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    /// `factor` from the config; transformers derives max_position_embeddings / original when absent.
    pub factor: Option<f64>,
    /// `attention_factor` from the config; derived from the factor when absent.
    pub attention_factor: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_act: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    original_max_position_embeddings: Option<usize>,
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
    sliding_window: Option<usize>,
    attention_bias: Option<bool>,
}

#[derive(Deserialize, Default)]
struct RawRope {
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
    original_max_position_embeddings: Option<usize>,
    factor: Option<f64>,
    attention_factor: Option<f64>,
}

/// `eos_token_id`: one id or a list of ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

fn bad(msg: String) -> ModelError {
    ModelError::Config(msg)
}

/// The largest sizes accepted, far above any published model (Phi-4: hidden 5120, MLP 17920, 40
/// layers, vocabulary 100352; Phi-4-mini: 131072 positions). Below them every size the driver derives
/// (parameters, buffer lengths, table sizes) fits in 64 bits; above them a config is damaged.
const MAX_SIZES: [(&str, usize); 5] = [
    ("hidden_size", 1 << 20),
    ("intermediate_size", 1 << 22),
    ("num_hidden_layers", 1 << 12),
    ("vocab_size", 1 << 24),
    ("max_position_embeddings", 1 << 24),
];

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_owned(),
            source,
        })?;
        Self::from_raw(raw).map_err(|e| match e {
            ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: "config.json".into(),
            source,
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        if let Some(t) = raw.model_type.as_deref() {
            if t != "phi3" {
                return Err(ModelError::Unsupported(format!(
                    "model_type '{t}': this driver runs the Phi-3 family (model_type 'phi3': Phi-3/3.5-mini, Phi-4, Phi-4-mini)"
                )));
            }
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!(
                    "hidden_act '{act}': Phi-3 models use 'silu'"
                )));
            }
        }
        if raw.attention_bias == Some(true) {
            return Err(ModelError::Unsupported(
                "attention_bias = true: Phi-3 projections have no bias".into(),
            ));
        }
        let heads = raw.num_attention_heads;
        if heads == 0 {
            return Err(bad("num_attention_heads is 0".into()));
        }
        let hidden = raw.hidden_size;
        if hidden == 0 || !hidden.is_multiple_of(heads) {
            return Err(bad(format!(
                "hidden_size {hidden} is not a positive multiple of num_attention_heads {heads}"
            )));
        }
        let head_dim = hidden / heads;
        if let Some(h) = raw.head_dim {
            if h != head_dim {
                return Err(ModelError::Unsupported(format!(
                    "head_dim {h} differs from hidden_size / num_attention_heads = {head_dim}"
                )));
            }
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_key_value_heads {kv_heads} must be positive and divide num_attention_heads {heads}"
            )));
        }
        for (name, v) in [
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("vocab_size", raw.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0")));
            }
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-5);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(bad(format!("rms_norm_eps {rms_norm_eps} must be positive")));
        }
        let max_pos = raw.max_position_embeddings.unwrap_or(4096);
        if max_pos == 0 {
            return Err(bad("max_position_embeddings is 0".into()));
        }
        let sizes = [
            hidden,
            raw.intermediate_size,
            raw.num_hidden_layers,
            raw.vocab_size,
            max_pos,
        ];
        for ((name, max), v) in MAX_SIZES.into_iter().zip(sizes) {
            if v > max {
                return Err(bad(format!(
                    "{name} {v} is larger than any model this driver runs (at most {max}): the config is damaged or not a Phi-3 family config"
                )));
            }
        }

        // transformers: `rope_parameters = rope_scaling or rope_parameters`, then top-level values fill the
        // keys the dict lacks.
        let rope = raw.rope_scaling.or(raw.rope_parameters).unwrap_or_default();
        let rope_theta = rope.rope_theta.or(raw.rope_theta).unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(bad(format!("rope_theta {rope_theta} must be > 1")));
        }
        let partial = rope
            .partial_rotary_factor
            .or(raw.partial_rotary_factor)
            .unwrap_or(1.0);
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(bad(format!(
                "partial_rotary_factor {partial} must be in (0, 1]"
            )));
        }
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} * partial_rotary_factor {partial} gives {rotary_dim} rotary dimensions; RoPE needs a positive even number"
            )));
        }
        let kind = rope.rope_type.clone().or(rope.kind.clone());
        let rope_scaling = match kind.as_deref() {
            None | Some("default") => None,
            // Early Phi-3 configs say "su" (and some "yarn") for what transformers runs as longrope.
            Some("longrope") | Some("su") | Some("yarn") => {
                let half = rotary_dim / 2;
                let mut factors = Vec::new();
                for (name, f) in [
                    ("short_factor", rope.short_factor),
                    ("long_factor", rope.long_factor),
                ] {
                    let f = f.ok_or_else(|| bad(format!("longrope needs rope_scaling.{name}")))?;
                    if f.len() != half {
                        return Err(bad(format!(
                            "rope_scaling.{name} has {} entries; rotary dimension {rotary_dim} needs {half}",
                            f.len()
                        )));
                    }
                    if let Some(v) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                        return Err(bad(format!(
                            "rope_scaling.{name} holds {v}; factors must be positive"
                        )));
                    }
                    factors.push(f);
                }
                let long_factor = factors.pop().unwrap_or_default();
                let short_factor = factors.pop().unwrap_or_default();
                let original = raw
                    .original_max_position_embeddings
                    .or(rope.original_max_position_embeddings)
                    .unwrap_or(max_pos);
                if original == 0 {
                    return Err(bad("original_max_position_embeddings is 0".into()));
                }
                for (name, v) in [
                    ("factor", rope.factor),
                    ("attention_factor", rope.attention_factor),
                ] {
                    if let Some(v) = v {
                        if !(v.is_finite() && v > 0.0) {
                            return Err(bad(format!("rope_scaling.{name} {v} must be positive")));
                        }
                    }
                }
                Some(LongRope {
                    short_factor,
                    long_factor,
                    original_max_position_embeddings: original,
                    factor: rope.factor,
                    attention_factor: rope.attention_factor,
                })
            }
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "RoPE type '{other}': Phi-3 models use 'default' or 'longrope'"
                )))
            }
        };

        let vocab = raw.vocab_size;
        let eos_token_ids = raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default();
        for (name, id) in raw
            .bos_token_id
            .iter()
            .map(|&id| ("bos_token_id", id))
            .chain(eos_token_ids.iter().map(|&id| ("eos_token_id", id)))
        {
            if id as usize >= vocab {
                return Err(bad(format!(
                    "{name} {id} is outside the vocabulary of {vocab} entries"
                )));
            }
        }
        if raw.sliding_window == Some(0) {
            return Err(bad("sliding_window is 0".into()));
        }
        let config = Config {
            hidden_size: hidden,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            partial_rotary_factor: partial,
            rope_scaling,
            max_position_embeddings: max_pos,
            vocab_size: vocab,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            sliding_window: raw.sliding_window,
        };
        if let Some(why) = super::rope::check(&config) {
            return Err(bad(why));
        }
        Ok(config)
    }

    /// Dimensions of each head that RoPE rotates (transformers: int(head_dim * partial_rotary_factor)).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Rows of the fused qkv_proj: queries, then keys, then values.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }

    /// Parameters of the model: embedding, projections, norms, lm_head unless tied (as the checkpoint's
    /// safetensors index counts them).
    pub fn parameters(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let layer = self.qkv_dim() * h + h * self.q_dim() + 2 * i * h + h * i + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + self.num_hidden_layers * layer + h
    }

    /// Built-in configs for synthetic runs: "phi-4", "phi-4-mini" (published shapes) and "tiny" (the test
    /// fixture's shape). Phi-4-mini's longrope factors here are placeholders, not the published values.
    pub fn preset(name: &str) -> Result<Self> {
        let json = match name {
            "phi-4" => PHI4.to_string(),
            "phi-4-mini" => {
                let short = vec!["1.0"; 48].join(", ");
                let long = (0..48)
                    .map(|i| format!("{:.3}", 1.0 + i as f64 * 1.5))
                    .collect::<Vec<_>>()
                    .join(", ");
                PHI4_MINI.replace("SHORT", &short).replace("LONG", &long)
            }
            "tiny" => TINY.to_string(),
            other => {
                return Err(ModelError::Config(format!(
                    "no built-in config named '{other}': use phi-4, phi-4-mini or tiny"
                )))
            }
        };
        Self::from_json(&json)
    }
}

const PHI4: &str = r#"{
  "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
  "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
  "num_attention_heads": 40, "num_key_value_heads": 10, "rms_norm_eps": 1e-05,
  "max_position_embeddings": 16384, "original_max_position_embeddings": 16384,
  "rope_theta": 250000, "rope_scaling": null, "sliding_window": null,
  "vocab_size": 100352, "tie_word_embeddings": false,
  "bos_token_id": 100257, "eos_token_id": 100265, "pad_token_id": 100349
}"#;

const PHI4_MINI: &str = r#"{
  "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu",
  "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
  "num_attention_heads": 24, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
  "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
  "rope_scaling": {"type": "longrope", "short_factor": [SHORT], "long_factor": [LONG]},
  "sliding_window": 262144, "vocab_size": 200064, "tie_word_embeddings": true,
  "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999
}"#;

const TINY: &str = r#"{
  "model_type": "phi3", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
  "max_position_embeddings": 256, "partial_rotary_factor": 0.75, "rope_theta": 10000.0,
  "rope_scaling": null, "vocab_size": 384, "tie_word_embeddings": false,
  "bos_token_id": 0, "eos_token_id": 3, "pad_token_id": 5
}"#;
