//! Errors of the model layer (config, checkpoint, sampler, generation, the device's fit) and of its
//! tokenizer (the tokenizer files and the chat template). Each message says what is wrong, where, and
//! what to do.

use std::path::PathBuf;

use crate::format::FormatError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid config: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A config value that the Phi-3 family cannot have; the message names the field.
    #[error("config: {0}")]
    Config(String),

    /// Something the config asks for that this driver does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),

    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("{path}: no tensor named '{tensor}'{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },

    #[error("{path}: tensor '{tensor}' has shape {found:?}, but config.json implies {expected:?}; the checkpoint and its config.json do not belong together")]
    Shape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("{path}: tensor '{tensor}' is stored as {dtype}; only F32, F16 and BF16 weights can be read (dequantise the checkpoint first)")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("tensor '{tensor}': {source}")]
    Encode {
        tensor: String,
        #[source]
        source: FormatError,
    },

    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),

    #[error("token id {id} is outside the model's vocabulary of {vocab} entries")]
    Token { id: u32, vocab: usize },

    #[error("{needed} positions are needed but the KV cache holds {ctx}: raise --ctx (at most max_position_embeddings = {max}) or shorten the prompt / --max-tokens")]
    ContextFull {
        needed: usize,
        ctx: usize,
        max: usize,
    },

    /// A model the GPU cannot hold, found before anything was uploaded.
    #[error("the model does not fit the GPU '{adapter}': {reason}")]
    DoesNotFit { adapter: String, reason: String },

    /// `convert --bits`: no codec fits the budget, or an error could not be measured.
    #[error("codec choice: {0}")]
    Choice(String),

    #[error("sampler: {0}")]
    Sampler(String),

    #[error("backend: {0}")]
    Backend(String),

    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),

    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Errors of the tokenizer: its files (tokenizer.json, tokenizer_config.json, generation_config.json,
/// chat_template.jinja) and the chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{path}: missing: the model folder needs its tokenizer.json (download it with the weights)"
    )]
    Missing { path: PathBuf },

    /// A file that cannot be read or decoded, or a token it cannot decode; the reason says which.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },

    #[error("chat template: {0}")]
    Template(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
