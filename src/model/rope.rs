//! Rotary position embedding tables, as transformers' Phi3RotaryEmbedding defines them.
//!
//! Frequency i (0 <= i < rotary_dim / 2) is `inv_freq[i] = 1 / (f[i] * theta^(2i / rotary_dim))`, with
//! `f` = 1 for default RoPE and the short or long LongRoPE factors otherwise. A position's table row holds
//! `cos(pos * inv_freq[i]) * s` and `sin(...) * s`, where `s` is LongRoPE's attention scaling
//! `sqrt(1 + ln(factor) / ln(original_max_position_embeddings))` (1 for default RoPE and factor <= 1).
//! Rotation is HF's rotate-half: dimension i pairs with i + rotary_dim / 2, and dimensions past
//! rotary_dim pass through (partial rotary).
//!
//! Tables are computed in f64 and rounded once; transformers computes the angles in f32, which differs by
//! about pos * 6e-8 radians, far inside the tolerance of the comparison tests.

use super::config::Config;

/// Which LongRoPE factor set a sequence uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorSet {
    /// Default RoPE, or LongRoPE's short factors (the sequence fits original_max_position_embeddings).
    Short,
    /// LongRoPE's long factors.
    Long,
}

/// cos and sin for positions 0..ctx, each [ctx, rotary_dim / 2] row-major.
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl FactorSet {
    /// transformers' rule: long factors once the sequence (positions 0..len) is longer than
    /// original_max_position_embeddings; always `Short` without LongRoPE.
    pub fn for_len(config: &Config, len: usize) -> Self {
        match &config.rope_scaling {
            Some(s) if len > s.original_max_position_embeddings => FactorSet::Long,
            _ => FactorSet::Short,
        }
    }
}

/// The attention scaling LongRoPE applies to cos and sin (1 without LongRoPE).
pub fn attention_scaling(config: &Config) -> f64 {
    let Some(s) = &config.rope_scaling else {
        return 1.0;
    };
    if let Some(a) = s.attention_factor {
        return a;
    }
    let orig = s.original_max_position_embeddings as f64;
    let factor = s
        .factor
        .unwrap_or(config.max_position_embeddings as f64 / orig);
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / orig.ln()).sqrt()
    }
}

/// The inverse frequencies of `set`.
pub fn inv_freq(config: &Config, set: FactorSet) -> Vec<f64> {
    let dim = config.rotary_dim();
    (0..dim / 2)
        .map(|i| {
            let f = match (&config.rope_scaling, set) {
                (None, _) => 1.0,
                (Some(s), FactorSet::Short) => s.short_factor[i],
                (Some(s), FactorSet::Long) => s.long_factor[i],
            };
            1.0 / (f * config.rope_theta.powf((2 * i) as f64 / dim as f64))
        })
        .collect()
}

/// Why `config`'s tables would not be finite at some position below max_position_embeddings, if so:
/// a theta or factor so extreme that an angle or LongRoPE's scaling overflows.
pub(crate) fn check(config: &Config) -> Option<String> {
    let scale = attention_scaling(config);
    if !(scale.is_finite() && scale > 0.0 && (scale as f32).is_finite()) {
        return Some(format!(
            "rope_scaling gives an attention scaling of {scale}: check factor, attention_factor and original_max_position_embeddings (> 1)"
        ));
    }
    let last = config.max_position_embeddings.saturating_sub(1) as f64;
    for set in [FactorSet::Short, FactorSet::Long] {
        for (i, f) in inv_freq(config, set).into_iter().enumerate() {
            if !(f.is_finite() && (last * f).is_finite()) {
                return Some(format!(
                    "RoPE frequency {i} ({set:?} factors) is {f}: rope_theta or the rope_scaling factors are out of range"
                ));
            }
        }
    }
    None
}

impl RopeTable {
    pub fn new(config: &Config, set: FactorSet, ctx: usize) -> Self {
        let freqs = inv_freq(config, set);
        let scale = attention_scaling(config);
        let half = freqs.len();
        let mut cos = Vec::with_capacity(ctx * half);
        let mut sin = Vec::with_capacity(ctx * half);
        for pos in 0..ctx {
            for f in &freqs {
                let (s, c) = (pos as f64 * f).sin_cos();
                cos.push((c * scale) as f32);
                sin.push((s * scale) as f32);
            }
        }
        Self { cos, sin, half }
    }
}
