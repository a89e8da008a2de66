//! upg: large language models from compressed sparse weights, on any GPU (WGSL through wgpu) or on the
//! CPU (SIMD on all cores), with the same results.
//!
//! - [`format`]: the codecs (50% sparse 4-bit, f16, q4) and the .upg file.
//! - [`cpu`]: the scalar reference kernels and the fast CPU kernels.
//! - [`gpu`]: the wgpu context and one launcher per WGSL kernel.
//! - [`model`]: the Phi-3 family driver.
//! - [`device`]: y = W x on the GPU when there is one, else on the CPU.

// Input and the device reach library code: errors, never panics (tests may unwrap). Fuzzing
// (fuzz/, FUZZING.md) looks for the panics no lint sees: indexing, overflow, allocation.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

pub mod cpu;
pub mod device;
pub mod format;
pub mod gpu;
pub mod model;
pub mod rng;
