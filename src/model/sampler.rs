//! Choosing the next token from logits, in transformers' order: repetition penalty, then temperature,
//! top-k and top-p, then a draw from the remaining distribution. Temperature 0 is greedy (argmax of the
//! penalised logits, the first on ties, as torch.argmax). Draws use the crate's seeded [`Rng`]: the
//! same seed and logits give the same tokens.

use super::error::{ModelError, Result};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the most likely tokens whose mass reaches top_p; 1 = off.
    pub top_p: f32,
    /// transformers' RepetitionPenaltyLogitsProcessor: every token already in the sequence has its logit
    /// divided by the penalty when positive, multiplied when negative; 1 = off.
    pub repeat_penalty: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    pub config: SamplerConfig,
    rng: Rng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Result<Self> {
        let c = &config;
        if !(c.temperature.is_finite() && c.temperature >= 0.0) {
            return Err(ModelError::Sampler(format!(
                "temperature {} must be >= 0 (0 = greedy)",
                c.temperature
            )));
        }
        if !(c.top_p > 0.0 && c.top_p <= 1.0) {
            return Err(ModelError::Sampler(format!(
                "top-p {} must be in (0, 1] (1 = off)",
                c.top_p
            )));
        }
        if !(c.repeat_penalty.is_finite() && c.repeat_penalty > 0.0) {
            return Err(ModelError::Sampler(format!(
                "repetition penalty {} must be > 0 (1 = off)",
                c.repeat_penalty
            )));
        }
        Ok(Self {
            config,
            rng: Rng::new(config.seed),
        })
    }

    pub fn greedy() -> Self {
        Self {
            config: SamplerConfig::default(),
            rng: Rng::new(0),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.config.temperature == 0.0
    }

    /// The tokens that can be drawn and their probabilities, most likely first (ties: lower id first).
    /// Greedy gives the argmax with probability 1.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        let mut l = logits.to_vec();
        apply_repetition_penalty(&mut l, history, self.config.repeat_penalty);
        if self.is_greedy() {
            return vec![(argmax(&l), 1.0)];
        }
        let inv_t = 1.0 / self.config.temperature;
        let mut cand: Vec<(u32, f32)> = l
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i as u32, v * inv_t))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_k > 0 {
            cand.truncate(self.config.top_k);
        }
        // Softmax over the survivors (shifted by the maximum for range).
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut total = 0.0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1 as f64;
        }
        for c in cand.iter_mut() {
            c.1 = (c.1 as f64 / total) as f32;
        }
        if self.config.top_p < 1.0 {
            // transformers removes the tokens whose cumulative mass, counted from the least likely, is
            // <= 1 - top_p: what is kept is the shortest most-likely prefix whose mass reaches top_p.
            let mut mass = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                mass += c.1 as f64;
                if mass >= self.config.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
            let kept: f64 = cand.iter().map(|c| c.1 as f64).sum();
            for c in cand.iter_mut() {
                c.1 = (c.1 as f64 / kept) as f32;
            }
        }
        cand
    }

    /// The next token for `logits` after the tokens in `history`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let dist = self.distribution(logits, history);
        if dist.len() == 1 {
            return dist[0].0;
        }
        let u = self.rng.uniform() as f64;
        let mut acc = 0.0f64;
        for &(id, p) in &dist {
            acc += p as f64;
            if u < acc {
                return id;
            }
        }
        // Rounding left the total just under 1: the last candidate takes the remainder.
        dist[dist.len() - 1].0
    }
}

/// transformers' repetition penalty: each distinct token of `history` has its logit divided by `penalty`
/// when positive and multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let v = logits[t];
            logits[t] = if v < 0.0 { v * penalty } else { v / penalty };
        }
    }
}

/// Index of the largest value, the first on ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}
