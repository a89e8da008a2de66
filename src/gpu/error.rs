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

    /// An error reported by wgpu (validation, internal) while doing `what`.
    #[error("GPU error while {what}: {reason}")]
    Wgpu { what: String, reason: String },

    #[error("the GPU ran out of memory while {what}: use a smaller --ctx or a more compressed codec, close other programs that use the GPU, or run on the CPU (--backend cpu)")]
    OutOfMemory { what: String },

    /// The driver reset or removed the device (or the program destroyed it); nothing on it survives.
    #[error("the GPU device '{adapter}' was lost ({reason}): its driver reset or the device was removed; start again (the model must be loaded anew), or run on the CPU (--backend cpu)")]
    DeviceLost { adapter: String, reason: String },

    #[error("{var}={value:?} is not valid: expected {expected}")]
    BadEnv {
        var: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("a WGSL kernel failed to build ({kernel}): {reason}")]
    Shader { kernel: String, reason: String },
}

pub type Result<T> = std::result::Result<T, GpuError>;
