//! Errors of the GPU layer. Each message says what is wrong, where, and what to do.

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable adapter; the string says why (none found, filtered out, or the CPU path was asked for).
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    #[error("UPG_BACKEND={0} is not a backend: use vulkan, metal, dx12, gl or cpu")]
    BadBackend(String),

    #[error("could not open a device on adapter '{adapter}': {reason}")]
    Device { adapter: String, reason: String },

    #[error("shape mismatch: {0}")]
    Shape(String),

    /// A tensor that the GPU layout cannot hold; the message names the tensor part and the fix.
    #[error("cannot upload the matrix: {0}")]
    Layout(String),

    /// An error reported by wgpu (validation, out of memory, lost device) while doing `what`.
    #[error("GPU error while {what}: {reason}")]
    Wgpu { what: String, reason: String },

    #[error("a WGSL kernel failed to build ({kernel}): {reason}")]
    Shader { kernel: String, reason: String },
}

pub type Result<T> = std::result::Result<T, GpuError>;
