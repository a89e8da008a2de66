//! The Phi-3 family forward pass (Phi3ForCausalLM: Phi-3/3.5-mini, Phi-4, Phi-4-mini), on any [`Backend`].
//!
//! Per token: embedding row; per layer RMSNorm, fused qkv projection, RoPE on q and k, K/V appended to the
//! cache, grouped-query attention, o_proj and residual, RMSNorm, fused gate_up projection, SiLU(gate) * up,
//! down projection and residual; final RMSNorm and lm_head. The backend may run each norm inside the
//! product after it, SiLU * up inside down's, and RoPE with the K/V append (6 launches a layer on the GPU). A prompt runs as a batch of positions
//! (prefill), generation one position at a time, both through the same [`Phi3::pass`].

use std::time::{Duration, Instant};

use super::backend::{AttentionShape, Backend};
use super::config::Config;
use super::error::{ModelError, Result};
use super::rope::{FactorSet, RopeTable};
use super::sampler::Sampler;
use super::weights::{HostWeights, Weights};

/// Positions per prefill batch unless the backend says otherwise ([`Backend::prefill_batch`]): bounds
/// the activation buffers (the logits of a batch are [PREFILL_BATCH, vocab]).
pub const PREFILL_BATCH: usize = 64;

/// Keys and values of every layer for positions 0..len, and the tokens they came from.
pub struct KvCache<Buf> {
    /// Per layer, [ctx, kv_dim].
    pub k: Vec<Buf>,
    pub v: Vec<Buf>,
    /// The tokens whose keys and values are cached, in order.
    pub tokens: Vec<u32>,
    /// The LongRoPE factors the cached keys were rotated with.
    pub factors: FactorSet,
}

/// Activations for up to `rows` positions.
struct Activations<Buf> {
    rows: usize,
    /// Residual stream [rows, hidden].
    x: Buf,
    /// Normed input of a block [rows, hidden], where the backend does not norm inside the product (the
    /// blocks' outputs are added into `x` by their last product).
    xb: Buf,
    qkv: Buf,
    /// Attention output [rows, q_dim].
    att: Buf,
    gate_up: Buf,
    /// SiLU(gate) * up [rows, intermediate], where the backend does not fuse it into down.
    mlp: Buf,
    /// The last position's normed hidden state, when only its logits are wanted [hidden].
    last: Buf,
    /// [rows, vocab] (all positions) or [1, vocab] (last position) of the latest pass.
    logits: Buf,
}

/// Which positions of a pass need logits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Logits {
    None,
    Last,
    All,
}

/// What a pass embeds: token ids from the host, or the one token the last queued greedy pick left on
/// the device ([`Backend::embed_queued`]).
#[derive(Clone, Copy)]
enum Feed<'a> {
    Tokens(&'a [u32]),
    Queued,
}

pub struct Phi3<B: Backend> {
    pub config: Config,
    backend: B,
    weights: Weights<B::Matrix, B::Buffer>,
    shape: AttentionShape,
    /// cos and sin tables: default RoPE or LongRoPE short factors, and LongRoPE long factors.
    short: (B::Buffer, B::Buffer),
    long: Option<(B::Buffer, B::Buffer)>,
    cache: KvCache<B::Buffer>,
    act: Activations<B::Buffer>,
}

/// The outcome of [`Phi3::generate`].
#[derive(Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prefill, including the first sampled token.
    pub prompt_time: Duration,
    /// Every later token.
    pub decode_time: Duration,
    /// Whether a stop token ended generation (it is the last of `tokens`).
    pub stopped: bool,
}

impl<B: Backend> Phi3<B> {
    /// A model with a KV cache of `ctx` positions (at most max_position_embeddings), prompts fed
    /// [`Backend::prefill_batch`] positions at a time.
    pub fn new(config: Config, weights: HostWeights, backend: B, ctx: usize) -> Result<Self> {
        let batch = backend.prefill_batch();
        Self::with_batch(config, weights, backend, ctx, batch)
    }

    /// [`Self::new`] with prompts processed `batch` positions at a time.
    pub fn with_batch(
        config: Config,
        weights: HostWeights,
        mut backend: B,
        ctx: usize,
        batch: usize,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(ModelError::Config("prefill batch 0: use at least 1".into()));
        }
        if ctx == 0 || ctx > config.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "context {ctx} must be in 1..={} (max_position_embeddings)",
                config.max_position_embeddings
            )));
        }
        weights.check(&config)?;
        let c = &config;
        backend.check_fit(c, &weights, ctx, batch)?;
        let shape = AttentionShape::new(c, ctx);
        let weights = weights.convert(
            &mut backend,
            |b, m| b.matrix(m),
            |b, m| b.gate_up_matrix(m),
            |b, v| b.buffer(&v),
        )?;
        let mut table = |set| -> Result<(B::Buffer, B::Buffer)> {
            let t = RopeTable::new(c, set, ctx);
            Ok((backend.buffer(&t.cos)?, backend.buffer(&t.sin)?))
        };
        let short = table(FactorSet::Short)?;
        let long = match &c.rope_scaling {
            Some(_) => Some(table(FactorSet::Long)?),
            None => None,
        };
        let mut k = Vec::with_capacity(c.num_hidden_layers);
        let mut v = Vec::with_capacity(c.num_hidden_layers);
        for _ in 0..c.num_hidden_layers {
            k.push(backend.kv_cache(ctx, c.kv_dim())?);
            v.push(backend.kv_cache(ctx, c.kv_dim())?);
        }
        let rows = ctx.min(batch).min(backend.max_batch());
        let act = Activations {
            rows,
            x: backend.scratch(rows * c.hidden_size)?,
            xb: backend.scratch(rows * c.hidden_size)?,
            qkv: backend.scratch(rows * c.qkv_dim())?,
            att: backend.scratch(rows * c.q_dim())?,
            gate_up: backend.scratch(rows * 2 * c.intermediate_size)?,
            mlp: backend.scratch(rows * c.intermediate_size)?,
            last: backend.scratch(c.hidden_size)?,
            logits: backend.scratch(rows * c.vocab_size)?,
        };
        let mut model = Self {
            shape,
            short,
            long,
            cache: KvCache {
                k,
                v,
                tokens: Vec::new(),
                factors: FactorSet::Short,
            },
            act,
            weights,
            backend,
            config,
        };
        if model.backend.can_queue_greedy() {
            model.warm_up()?;
        }
        Ok(model)
    }

    /// Runs the decode steps once, so that a GPU builds their pipelines now and not inside the first
    /// generated tokens (with a cold shader cache that took 0.4 s of the first decode on an H100):
    /// a pass at position 0 and a queued one at position 1, whose cache rows the first real tokens
    /// overwrite before anything reads them.
    fn warm_up(&mut self) -> Result<()> {
        let vocab = self.config.vocab_size;
        self.pass(Feed::Tokens(&[0]), 0, Logits::Last);
        self.backend.queue_greedy(&self.act.logits, vocab)?;
        if self.shape.ctx > 1 {
            self.pass(Feed::Queued, 1, Logits::Last);
            self.backend.queue_greedy(&self.act.logits, vocab)?;
            self.backend.wait_greedy()?;
        }
        self.backend.wait_greedy()?;
        Ok(())
    }

    pub fn ctx(&self) -> usize {
        self.shape.ctx
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The tokens fed so far (the cached positions).
    pub fn tokens(&self) -> &[u32] {
        &self.cache.tokens
    }

    /// Forgets the sequence; the next token is position 0.
    pub fn reset(&mut self) {
        self.cache.tokens.clear();
        self.cache.factors = FactorSet::Short;
    }

    /// Appends `tokens` to the sequence; the logits of the last one are then ready for [`Self::sample`].
    pub fn forward(&mut self, tokens: &[u32]) -> Result<()> {
        self.append(tokens, Logits::Last).map(|_| ())
    }

    /// Appends `tokens` and reads back the logits of each of them, [tokens.len(), vocab] row-major.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.append(tokens, Logits::All)
    }

    /// The next token after the sequence, from the last logits.
    pub fn sample(&mut self, sampler: &mut Sampler) -> Result<u32> {
        self.backend.sample(
            &self.act.logits,
            self.config.vocab_size,
            sampler,
            &self.cache.tokens,
        )
    }

    /// Reads back the last position's logits.
    pub fn logits(&mut self) -> Result<Vec<f32>> {
        self.backend.read(&self.act.logits, self.config.vocab_size)
    }

    fn append(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        let vocab = self.config.vocab_size;
        if tokens.is_empty() {
            return Err(ModelError::Config("no tokens to feed".into()));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Token { id, vocab });
        }
        let end = self.cache.tokens.len() + tokens.len();
        if end > self.shape.ctx {
            return Err(ModelError::ContextFull {
                needed: end,
                ctx: self.shape.ctx,
                max: self.config.max_position_embeddings,
            });
        }
        // LongRoPE picks its factors from the whole sequence's length. When the sequence outgrows
        // original_max_position_embeddings the cached keys were rotated with the short factors; like
        // transformers' Phi-3 generation, recompute the whole cache with the long ones.
        let factors = FactorSet::for_len(&self.config, end);
        let mut start = self.cache.tokens.len();
        let mut feed = tokens.to_vec();
        let mut skip = 0;
        if factors != self.cache.factors && start > 0 {
            skip = start;
            feed = std::mem::take(&mut self.cache.tokens);
            feed.extend_from_slice(tokens);
            start = 0;
        }
        self.cache.factors = factors;
        let mut all = Vec::new();
        let batches = feed.len().div_ceil(self.act.rows);
        for (b, chunk) in feed.chunks(self.act.rows).enumerate() {
            let chunk_start = start + b * self.act.rows;
            let last_batch = b + 1 == batches;
            let mode = match want {
                // Positions re-fed for a factor switch need no logits.
                Logits::All if chunk_start + chunk.len() > skip => Logits::All,
                Logits::Last if last_batch => Logits::Last,
                _ => Logits::None,
            };
            self.pass(Feed::Tokens(chunk), chunk_start, mode);
            self.cache.tokens.extend_from_slice(chunk);
            if mode == Logits::All {
                let rows = self.backend.read(&self.act.logits, chunk.len() * vocab)?;
                let from = skip.saturating_sub(chunk_start);
                all.extend_from_slice(&rows[from * vocab..]);
            }
        }
        Ok(all)
    }

    /// One forward pass over the fed tokens at positions start..start + n (n <= the activation rows).
    fn pass(&mut self, feed: Feed, start: usize, want: Logits) {
        let c = &self.config;
        let (b, w, a, s) = (&mut self.backend, &self.weights, &mut self.act, &self.shape);
        let (n, hidden, inter, eps) = (
            match feed {
                Feed::Tokens(t) => t.len(),
                Feed::Queued => 1,
            },
            c.hidden_size,
            c.intermediate_size,
            c.rms_norm_eps,
        );
        let (cos, sin) = match (self.cache.factors, &self.long) {
            (super::rope::FactorSet::Long, Some(long)) => (&long.0, &long.1),
            _ => (&self.short.0, &self.short.1),
        };

        match feed {
            Feed::Tokens(t) => b.embed(&w.embed, t, &mut a.x),
            Feed::Queued => b.embed_queued(&w.embed, &mut a.x),
        }
        for (l, layer) in w.layers.iter().enumerate() {
            let (k, v) = (&mut self.cache.k[l], &mut self.cache.v[l]);
            // Attention block: RMSNorm inside the qkv projection; RoPE, the K/V append and attention
            // (in one launch for a decode step on the GPU).
            let norm = &layer.attn_norm;
            b.matmul_norm(
                &layer.qkv, &a.x, norm, eps, &mut a.xb, &mut a.qkv, n, hidden,
            );
            b.rope_attention(&mut a.qkv, cos, sin, k, v, &mut a.att, s, start, n);
            b.matmul_add(&layer.o, &a.att, &mut a.x, n);

            // MLP block: RMSNorm inside the gate_up projection, SiLU(gate) * up inside gate_up's
            // epilogue or down's prologue.
            b.mlp(
                &layer.gate_up,
                &layer.down,
                &mut a.x,
                &layer.mlp_norm,
                eps,
                &mut a.xb,
                &mut a.gate_up,
                &mut a.mlp,
                (n, hidden, inter),
            );
        }

        match want {
            Logits::None => {}
            Logits::Last => {
                // The last row is x itself when there is one.
                let last = if n == 1 {
                    &a.x
                } else {
                    b.copy(&a.x, (n - 1) * hidden, &mut a.xb, 0, hidden);
                    &a.xb
                };
                let norm = &w.final_norm;
                b.matmul_norm(
                    w.lm_head(),
                    last,
                    norm,
                    eps,
                    &mut a.last,
                    &mut a.logits,
                    1,
                    hidden,
                );
            }
            Logits::All => {
                let norm = &w.final_norm;
                b.matmul_norm(
                    w.lm_head(),
                    &a.x,
                    norm,
                    eps,
                    &mut a.xb,
                    &mut a.logits,
                    n,
                    hidden,
                );
            }
        }
    }

    /// Feeds `prompt`, then samples up to `max_tokens` tokens, calling `on_token` with each as it is
    /// produced; stops after a token in `stop`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        // The last sampled token is never fed back, so it needs no cache row.
        let needed = self.cache.tokens.len() + prompt.len() + max_tokens.saturating_sub(1);
        if needed > self.shape.ctx {
            return Err(ModelError::ContextFull {
                needed,
                ctx: self.shape.ctx,
                max: self.config.max_position_embeddings,
            });
        }
        let mut out = Generation {
            tokens: Vec::new(),
            prompt_tokens: prompt.len(),
            prompt_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            stopped: false,
        };
        if max_tokens == 0 {
            return Ok(out);
        }
        let t0 = Instant::now();
        self.forward(prompt)?;
        let mut next = self.sample(sampler)?;
        out.prompt_time = t0.elapsed();
        let t1 = Instant::now();
        // Greedy on the device, with RoPE factors that stay as they are to the end: run ahead.
        let last = self.cache.tokens.len() + max_tokens;
        if self.backend.can_queue_greedy()
            && sampler.is_greedy()
            && sampler.config.repeat_penalty == 1.0
            && FactorSet::for_len(&self.config, last) == self.cache.factors
        {
            self.decode_queued(next, max_tokens, stop, &mut out, on_token)?;
            out.decode_time = t1.elapsed();
            return Ok(out);
        }
        loop {
            out.tokens.push(next);
            on_token(next);
            if stop.contains(&next) {
                out.stopped = true;
                break;
            }
            if out.tokens.len() == max_tokens {
                break;
            }
            self.forward(&[next])?;
            next = self.sample(sampler)?;
        }
        out.decode_time = t1.elapsed();
        Ok(out)
    }

    /// The decode loop of [`Self::generate`] for greedy picks on the device, one pass ahead: the pass
    /// that feeds token i + 1 is recorded and submitted before token i + 1 is read back, so recording
    /// and reading overlap the GPU's run of the previous pass. `next` is the first token, already
    /// picked, and still the device's latest pick. A pass queued for a token that turns out to end the
    /// generation is waited for and its cache row forgotten.
    fn decode_queued(
        &mut self,
        mut next: u32,
        max_tokens: usize,
        stop: &[u32],
        out: &mut Generation,
        mut on_token: impl FnMut(u32),
    ) -> Result<()> {
        // Whether a pass feeding `next` has been queued (and `next` appended to the cache's tokens).
        let mut fed = false;
        loop {
            out.tokens.push(next);
            on_token(next);
            out.stopped = stop.contains(&next);
            if out.stopped || out.tokens.len() == max_tokens {
                if fed {
                    self.backend.wait_greedy()?;
                    self.cache.tokens.pop();
                }
                return Ok(());
            }
            if !fed {
                self.queue_pass()?;
                self.cache.tokens.push(next);
            }
            // The pass after: it feeds the token the queued one picks, needed unless that is the last.
            let ahead = out.tokens.len() + 1 < max_tokens;
            if ahead {
                self.queue_pass()?;
            }
            next = self.backend.wait_greedy()?;
            if ahead {
                self.cache.tokens.push(next);
            }
            fed = ahead;
        }
    }

    /// Records a pass over the device's latest greedy pick at the next free position, and queues its
    /// own greedy pick.
    fn queue_pass(&mut self) -> Result<()> {
        let start = self.cache.tokens.len();
        self.pass(Feed::Queued, start, Logits::Last);
        self.backend
            .queue_greedy(&self.act.logits, self.config.vocab_size)
    }
}
