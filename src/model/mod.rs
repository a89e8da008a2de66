//! The Phi-3 family (Phi-4, Phi-4-mini, Phi-3/3.5-mini): config, checkpoint loading, the forward pass on
//! a compute backend, KV cache, sampler and tokenizer glue.
//!
//! - [`config`]: config.json as published and as transformers 5 writes it.
//! - [`checkpoint`]: a Hugging Face folder of safetensors, memory-mapped.
//! - [`convert`]: a model folder to one .upg file and back.
//! - [`weights`]: the model's tensors in per-tensor codecs ([`CodecPlan`]); [`synthetic`] random ones.
//! - [`backend`]: the [`Backend`] trait the forward pass runs on; [`cpu_backend`] and [`gpu_backend`]
//!   implement it.
//! - [`rope`]: RoPE / LongRoPE tables. [`phi3`]: the model, its KV cache and generation loop.
//! - [`sampler`], [`tokenizer`]: choosing tokens, text and chat templates.
//! - [`device_fit`]: whether a model fits a GPU, known before anything is uploaded.
//! - [`calibration`]: activation norms of the linear layers' inputs (Wanda pruning).
//! - [`perplexity`]: held-out perplexity over windows of a token stream, on any backend.

pub mod backend;
pub mod calibration;
pub mod checkpoint;
pub mod codec_choice;
pub mod config;
pub mod convert;
pub mod cpu_backend;
pub mod device_fit;
pub mod error;
pub mod gpu_backend;
mod gpu_profile;
pub mod perplexity;
pub mod phi3;
pub mod rope;
pub mod sampler;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use backend::{AttentionShape, Backend};
pub use checkpoint::Checkpoint;
pub use config::{Config, LongRope};
pub use cpu_backend::Cpu;
pub use error::{ModelError, Result, TokenizerError};
pub use gpu_backend::GpuBackend;
pub use phi3::{Generation, Phi3};
pub use sampler::{Sampler, SamplerConfig};
pub use synthetic::synthetic;
pub use tokenizer::{Message, TextTokenizer, TokenizerFiles};
pub use weights::{CodecPlan, HostWeights, Role, Weights};
