//! Errors of the format layer: encoding dense weights and reading or writing .upg files.
//! Each message says what is wrong, where, and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("weight at row {row}, column {col} is {value}: the encoder only takes finite weights; check the checkpoint for corruption or overflow")]
    NonFinite { row: usize, col: usize, value: f32 },

    #[error("activation norm of input column {col} is {value}: norms must be finite and >= 0; recompute the calibration statistics")]
    BadNorm { col: usize, value: f32 },

    #[error("shape mismatch: {0}")]
    Shape(String),

    #[error("invalid parameter: {0}")]
    Parameter(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: could not {action}: {source}")]
    Access {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {count} planned tensors were never written ({names}); nothing was saved: write every tensor of the plan before finish()")]
    Unwritten {
        path: PathBuf,
        count: usize,
        names: String,
    },

    #[error("{path}: not a readable .upg file: {reason}")]
    Header { path: PathBuf, reason: String },

    #[error("{path}: format version {found} is not supported (this build reads versions 1 to {supported}); convert the model again with this version of upg")]
    Version {
        path: PathBuf,
        found: String,
        supported: u32,
    },

    #[error("{path}: tensor '{tensor}', field '{field}': {reason}")]
    Field {
        path: PathBuf,
        tensor: String,
        field: String,
        reason: String,
    },

    #[error("{path}: no tensor named '{tensor}'{hint}")]
    Missing {
        path: PathBuf,
        tensor: String,
        hint: String,
    },
}

pub type Result<T> = std::result::Result<T, FormatError>;
