//! Held-out perplexity with our own forward pass, windowed the way the built-in model's training script
//! measured it (models/tiny-fortunes/perplexity.json): the document stream is cut into consecutive,
//! non-overlapping windows of `ctx` tokens, each fed from position 0, and every token but a window's
//! first is predicted. Works on any [`Backend`], so the CPU and GPU paths and every codec plan are
//! measured by the same code.

use super::backend::Backend;
use super::error::Result;
use super::phi3::Phi3;
use super::tokenizer::TextTokenizer;
use super::weights::HostWeights;

/// The separator of fortunes (and of documents in general) in a %-separated text file.
pub const DOCUMENT_SEPARATOR: &str = "\n%\n";

/// Summed negative log-likelihood (nats) over the predicted tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Perplexity {
    pub nll: f64,
    pub predicted: usize,
}

impl Perplexity {
    pub fn mean_nll(&self) -> f64 {
        self.nll / self.predicted.max(1) as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// The token stream of a %-separated text: each non-empty document encoded with its BOS, concatenated
/// (as the training script's `encode(fortune, add_special_tokens=True)`).
pub fn document_stream(tokenizer: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for doc in text.split(DOCUMENT_SEPARATOR).filter(|d| !d.is_empty()) {
        out.extend(tokenizer.encode(doc, true)?);
    }
    Ok(out)
}

/// -log softmax(row)[target], accumulated in f64 (the row is one position's logits).
pub fn token_nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Perplexity of `tokens` in consecutive windows of `ctx` tokens (a last window shorter than 2 tokens
/// predicts nothing and is skipped). `model`'s context must hold `ctx` positions.
pub fn windowed<B: Backend>(model: &mut Phi3<B>, tokens: &[u32], ctx: usize) -> Result<Perplexity> {
    let vocab = model.config.vocab_size;
    let mut out = Perplexity::default();
    for window in tokens.chunks(ctx.max(2)).filter(|w| w.len() >= 2) {
        model.reset();
        // The last token's logits predict nothing inside the window.
        let logits = model.forward_all(&window[..window.len() - 1])?;
        for (row, &next) in logits.chunks(vocab).zip(&window[1..]) {
            out.nll += token_nll(row, next);
            out.predicted += 1;
        }
    }
    model.reset();
    Ok(out)
}

/// Storage cost of a model's weights, in bits per parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BitsPerParam {
    /// qkv, o, gate_up, down.
    pub linear: f64,
    /// Every matrix and norm vector (a tied lm_head counted once).
    pub all: f64,
}

impl BitsPerParam {
    pub fn of(w: &HostWeights) -> Self {
        let (mut bytes, mut params) = (0usize, 0usize);
        for l in &w.layers {
            for t in [&l.qkv, &l.o, &l.gate_up, &l.down] {
                bytes += t.stored_bytes();
                let [r, c] = t.shape();
                params += r * c;
            }
        }
        let mut all_params = params + w.final_norm.len();
        for l in &w.layers {
            all_params += l.attn_norm.len() + l.mlp_norm.len();
        }
        for t in std::iter::once(&w.embed).chain(w.lm_head.as_ref()) {
            let [r, c] = t.shape();
            all_params += r * c;
        }
        Self {
            linear: bytes as f64 * 8.0 / params.max(1) as f64,
            all: w.stored_bytes() as f64 * 8.0 / all_params.max(1) as f64,
        }
    }
}
