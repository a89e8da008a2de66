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

pub use buffers::GpuVector;
pub use context::{AdapterSummary, Features, Gpu, GpuOptions, LimitOverrides, Limits};
pub use error::{GpuError, Result};
pub use matrix::{DenseKind, GpuMatrix};
