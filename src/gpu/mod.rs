//! GPU kernels through wgpu: the context (adapter, device, limits, features), device buffers, and one
//! launcher per WGSL op in `wgsl/`.
//!
//! ```no_run
//! # fn main() -> upg::gpu::Result<()> {
//! # let tensor: upg::format::Tensor = unimplemented!();
//! use upg::gpu::{Gpu, GpuOptions};
//! let gpu = Gpu::new(&GpuOptions::from_env()?)?;
//! let w = gpu.upload(&tensor)?;
//! let x = gpu.vector(&vec![1.0; w.cols])?;
//! let y = gpu.zeros(w.rows)?;
//! gpu.run(|pass| gpu.matvec(pass, &w, &x, &y, None))?;
//! let y = gpu.read(&y)?;
//! # Ok(()) }
//! ```

mod buffers;
mod context;
mod error;
mod kernels;
mod matrix;
pub mod shader;
mod spmm;
mod transformer;

pub use buffers::GpuVector;
pub use context::{
    parse_overrides, AdapterSummary, Allocations, DeviceMemory, Features, Gpu, GpuOptions,
    LimitOverrides, Limits,
};
pub use error::{GpuError, Result};
pub use kernels::Prologue;
pub use matrix::{DenseKind, GpuMatrix};
pub use transformer::AttentionDims;

/// The GPU for a test or benchmark from `UPG_BACKEND` / `UPG_ADAPTER` and `opts`, or `None` after
/// printing why there is none. With `UPG_REQUIRE_GPU=1` (CI sets it) a missing adapter is a failure:
/// this panics, which is how a test fails.
#[allow(clippy::panic)] // a test helper: panicking is how a test fails
pub fn gpu_or_skip(opts: GpuOptions) -> Option<Gpu> {
    let reason = match GpuOptions::from_env().and_then(|env| {
        Gpu::new(&GpuOptions {
            backends: env.backends,
            adapter: env.adapter,
            ..opts
        })
    }) {
        Ok(gpu) => return Some(gpu),
        Err(GpuError::NoAdapter(r)) => r,
        Err(e) => panic!("the GPU adapter failed to open: {e}"),
    };
    if std::env::var("UPG_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("UPG_REQUIRE_GPU=1 but there is no GPU adapter ({reason})");
    }
    println!("skipped: no GPU adapter ({reason})");
    None
}
