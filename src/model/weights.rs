//! The weights of a Phi-3 model in the codecs chosen per tensor, generic over where they live: host
//! [`Tensor`]s as loaded, or a backend's own matrices and buffers once uploaded.

use super::calibration::ActivationNorms;
use super::checkpoint::Checkpoint;
use super::config::Config;
use super::error::{ModelError, Result};
use crate::format::{sparse, Codec, DenseF16, DenseF32, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};

/// Which codec each kind of tensor gets. Norm weights are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecPlan {
    /// qkv_proj, o_proj, gate_up_proj, down_proj.
    pub linear: Codec,
    pub embed: Codec,
    /// Ignored when the config ties lm_head to the embedding: the embedding's tensor is used.
    pub lm_head: Codec,
    /// Scale group of the sparse codec (a multiple of 64 columns).
    pub sparse_group: usize,
    /// Scale group of q4 (32 or 64).
    pub q4_group: usize,
}

impl CodecPlan {
    /// Everything dense f32: the exact path that must match Hugging Face.
    pub fn exact() -> Self {
        Self {
            linear: Codec::F32,
            embed: Codec::F32,
            lm_head: Codec::F32,
            sparse_group: sparse::DEFAULT_GROUP,
            q4_group: 32,
        }
    }

    /// The compressed default: sparse linear layers, q4 embedding and lm_head.
    pub fn compressed() -> Self {
        Self {
            linear: Codec::Sparse,
            embed: Codec::Q4,
            lm_head: Codec::Q4,
            ..Self::exact()
        }
    }
}

impl Default for CodecPlan {
    fn default() -> Self {
        Self::compressed()
    }
}

pub struct LayerWeights<M, V> {
    pub attn_norm: V,
    /// [q_dim + 2 kv_dim, hidden]: queries, keys, values.
    pub qkv: M,
    pub o: M,
    pub mlp_norm: V,
    /// [2 intermediate, hidden]: gate rows, then up rows.
    pub gate_up: M,
    pub down: M,
}

pub struct Weights<M, V> {
    /// [vocab, hidden]; a token's embedding is its row.
    pub embed: M,
    pub layers: Vec<LayerWeights<M, V>>,
    pub final_norm: V,
    /// [vocab, hidden]; `None` when tied to the embedding.
    pub lm_head: Option<M>,
}

/// Weights on the host, as loaded or generated.
pub type HostWeights = Weights<Tensor, Vec<f32>>;

impl<M, V> Weights<M, V> {
    pub fn lm_head(&self) -> &M {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Converts every matrix with `m` (gate_up with `gate_up`) and every vector with `v`, all given
    /// `ctx` (a backend's upload).
    pub fn convert<C, M2, V2, E>(
        self,
        ctx: &mut C,
        m: impl Fn(&mut C, M) -> std::result::Result<M2, E>,
        gate_up: impl Fn(&mut C, M) -> std::result::Result<M2, E>,
        v: impl Fn(&mut C, V) -> std::result::Result<V2, E>,
    ) -> std::result::Result<Weights<M2, V2>, E> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            layers.push(LayerWeights {
                attn_norm: v(ctx, l.attn_norm)?,
                qkv: m(ctx, l.qkv)?,
                o: m(ctx, l.o)?,
                mlp_norm: v(ctx, l.mlp_norm)?,
                gate_up: gate_up(ctx, l.gate_up)?,
                down: m(ctx, l.down)?,
            });
        }
        Ok(Weights {
            embed: m(ctx, self.embed)?,
            layers,
            final_norm: v(ctx, self.final_norm)?,
            lm_head: self.lm_head.map(|t| m(ctx, t)).transpose()?,
        })
    }
}

/// What a matrix is for: decides its codec in a [`CodecPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// qkv_proj, o_proj, gate_up_proj, down_proj.
    Linear,
    Embed,
    LmHead,
}

impl CodecPlan {
    pub fn codec(&self, role: Role) -> Codec {
        match role {
            Role::Linear => self.linear,
            Role::Embed => self.embed,
            Role::LmHead => self.lm_head,
        }
    }
}

/// A matrix of the model as the builder asks for it: Hugging Face name, shape [rows, cols], role.
#[derive(Clone, Copy, Debug)]
pub struct MatrixName<'a> {
    pub name: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub role: Role,
}

impl<M, V> Weights<M, V> {
    /// Builds every tensor of a model of `config` in order, asking `matrix` for each weight matrix and
    /// `vector` for each norm weight (by Hugging Face name and length). The one place that knows the
    /// tensor names of Phi3ForCausalLM: loading a checkpoint, converting it and loading a .upg file all
    /// go through here.
    pub fn build<E>(
        c: &Config,
        mut matrix: impl FnMut(MatrixName) -> std::result::Result<M, E>,
        mut vector: impl FnMut(&str, usize) -> std::result::Result<V, E>,
    ) -> std::result::Result<Self, E> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut m = |name: &str, rows, cols, role| {
            matrix(MatrixName {
                name,
                rows,
                cols,
                role,
            })
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}.");
            layers.push(LayerWeights {
                attn_norm: vector(&format!("{p}input_layernorm.weight"), h)?,
                qkv: m(
                    &format!("{p}self_attn.qkv_proj.weight"),
                    c.qkv_dim(),
                    h,
                    Role::Linear,
                )?,
                o: m(
                    &format!("{p}self_attn.o_proj.weight"),
                    h,
                    c.q_dim(),
                    Role::Linear,
                )?,
                mlp_norm: vector(&format!("{p}post_attention_layernorm.weight"), h)?,
                gate_up: m(
                    &format!("{p}mlp.gate_up_proj.weight"),
                    2 * i,
                    h,
                    Role::Linear,
                )?,
                down: m(&format!("{p}mlp.down_proj.weight"), h, i, Role::Linear)?,
            });
        }
        let embed = m("model.embed_tokens.weight", c.vocab_size, h, Role::Embed)?;
        let lm_head = match c.tie_word_embeddings {
            true => None,
            false => Some(m("lm_head.weight", c.vocab_size, h, Role::LmHead)?),
        };
        Ok(Self {
            embed,
            layers,
            final_norm: vector("model.norm.weight", h)?,
            lm_head,
        })
    }
}

impl HostWeights {
    /// Reads and encodes every tensor of a checkpoint; f32 tensors under [`Codec::F32`] stay in the map.
    pub fn from_checkpoint(ckpt: &Checkpoint, plan: &CodecPlan) -> Result<Self> {
        Self::from_checkpoint_calibrated(ckpt, plan, None)
    }

    /// [`Self::from_checkpoint`], the sparse codec ranking weights by |w| * ||x_col|| with the
    /// activation norms of `norms` (Wanda) where it has them.
    pub fn from_checkpoint_calibrated(
        ckpt: &Checkpoint,
        plan: &CodecPlan,
        norms: Option<&ActivationNorms>,
    ) -> Result<Self> {
        Self::build(
            &ckpt.config,
            |m| encode_from_checkpoint(ckpt, m, plan, norms.and_then(|n| n.get(m.name))),
            |name, len| ckpt.vector(name, len),
        )
    }

    /// Bytes of all stored tensors and norm vectors.
    pub fn stored_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.stored_bytes()
                    + l.o.stored_bytes()
                    + l.gate_up.stored_bytes()
                    + l.down.stored_bytes()
                    + 4 * (l.attn_norm.len() + l.mlp_norm.len())
            })
            .sum();
        layers
            + self.embed.stored_bytes()
            + self.lm_head.as_ref().map_or(0, |t| t.stored_bytes())
            + 4 * self.final_norm.len()
    }

    /// Checks every tensor's shape against `config`: weights made elsewhere (a file, a generator) must
    /// fit the model they are given to.
    pub fn check(&self, c: &Config) -> Result<()> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut expect: Vec<(String, [usize; 2], [usize; 2])> = vec![
            ("embed".into(), self.embed.shape(), [c.vocab_size, h]),
            ("final_norm".into(), [1, self.final_norm.len()], [1, h]),
        ];
        match (&self.lm_head, c.tie_word_embeddings) {
            (Some(t), false) => expect.push(("lm_head".into(), t.shape(), [c.vocab_size, h])),
            (None, true) => {}
            (Some(_), true) | (None, false) => {
                return Err(ModelError::Config(format!(
                    "tie_word_embeddings is {} but the weights {} an lm_head",
                    c.tie_word_embeddings,
                    if self.lm_head.is_some() {
                        "have"
                    } else {
                        "lack"
                    }
                )))
            }
        }
        if self.layers.len() != c.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "the weights have {} layers, num_hidden_layers is {}",
                self.layers.len(),
                c.num_hidden_layers
            )));
        }
        for (n, l) in self.layers.iter().enumerate() {
            expect.extend([
                (
                    format!("layer {n} attn_norm"),
                    [1, l.attn_norm.len()],
                    [1, h],
                ),
                (format!("layer {n} qkv"), l.qkv.shape(), [c.qkv_dim(), h]),
                (format!("layer {n} o"), l.o.shape(), [h, c.q_dim()]),
                (format!("layer {n} mlp_norm"), [1, l.mlp_norm.len()], [1, h]),
                (format!("layer {n} gate_up"), l.gate_up.shape(), [2 * i, h]),
                (format!("layer {n} down"), l.down.shape(), [h, i]),
            ]);
        }
        for (name, found, want) in expect {
            if found != want {
                return Err(ModelError::Config(format!(
                    "{name} has shape {found:?}, the config needs {want:?}"
                )));
            }
        }
        Ok(())
    }
}

/// Reads matrix `m` of a checkpoint and encodes it with the codec `plan` gives its role; `norms` are
/// its input columns' activation norms for the sparse codec's saliency (ignored by other codecs).
pub fn encode_from_checkpoint(
    ckpt: &Checkpoint,
    m: MatrixName,
    plan: &CodecPlan,
    norms: Option<&[f32]>,
) -> Result<Tensor> {
    let (name, rows, cols, codec) = (m.name, m.rows, m.cols, plan.codec(m.role));
    if codec == Codec::F32 {
        // Zero copy when the checkpoint already holds aligned f32.
        if let (Ok(_), Some(values)) = (ckpt.matrix(name, rows, cols), ckpt.mapped_f32(name)) {
            let t = DenseF32 { rows, cols, values };
            if let Some(at) = t.values.iter().position(|v| !v.is_finite()) {
                return Err(ModelError::Encode {
                    tensor: name.into(),
                    source: crate::format::FormatError::NonFinite {
                        row: at / cols,
                        col: at % cols,
                        value: t.values[at],
                    },
                });
            }
            return Ok(Tensor::F32(t));
        }
    }
    let view = ckpt.matrix(name, rows, cols)?;
    encode_calibrated(&view.dense(), codec, plan, norms).map_err(|source| ModelError::Encode {
        tensor: name.into(),
        source,
    })
}

/// Encodes dense weights with `codec`.
pub fn encode(
    w: &crate::format::Dense,
    codec: Codec,
    plan: &CodecPlan,
) -> crate::format::Result<Tensor> {
    encode_calibrated(w, codec, plan, None)
}

/// [`encode`] with optional activation norms of the input columns (used by the sparse codec only).
pub fn encode_calibrated(
    w: &crate::format::Dense,
    codec: Codec,
    plan: &CodecPlan,
    norms: Option<&[f32]>,
) -> crate::format::Result<Tensor> {
    Ok(match codec {
        Codec::F32 => Tensor::F32(DenseF32::encode(w)?),
        Codec::F16 => Tensor::F16(DenseF16::encode(w)?),
        Codec::Q4 => Tensor::Q4(Q4Matrix::encode(w, plan.q4_group)?),
        Codec::Q3 => Tensor::Q3(Q3Matrix::encode(w, Q3Matrix::DEFAULT_GROUP)?),
        Codec::Sparse => Tensor::Sparse(SparseMatrix::encode(w, plan.sparse_group, norms)?),
    })
}
