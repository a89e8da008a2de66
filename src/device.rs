//! One call for y = W x that runs on the GPU when there is one and on the CPU otherwise, with the same
//! results within f32 rounding.

use crate::format::Tensor;
use crate::gpu::{Gpu, GpuError, GpuOptions, Result};

/// Where matrix-vector products run.
pub enum Device {
    Gpu(Box<Gpu>),
    Cpu,
}

/// The CPU kernel used when there is no GPU (SIMD, all cores).
fn cpu_matvec(w: &Tensor, x: &[f32], y: &mut [f32]) -> Result<()> {
    crate::cpu::spmv(w, x, y).map_err(|e| GpuError::Shape(e.to_string()))
}

impl Device {
    /// The GPU that `UPG_BACKEND` / `UPG_ADAPTER` allow, or the CPU when there is none (or
    /// `UPG_BACKEND=cpu`). Errors only for a malformed `UPG_BACKEND` or a device that fails to open.
    pub fn auto() -> Result<Self> {
        match GpuOptions::from_env().and_then(|o| Gpu::new(&o)) {
            Ok(gpu) => Ok(Device::Gpu(Box::new(gpu))),
            Err(GpuError::NoAdapter(_)) => Ok(Device::Cpu),
            Err(e) => Err(e),
        }
    }

    /// "GPU: name (backend, driver)" or "CPU".
    pub fn describe(&self) -> String {
        match self {
            Device::Gpu(g) => format!("GPU: {}", g.describe()),
            Device::Cpu => "CPU".into(),
        }
    }

    /// y = W x for a matrix in any codec. On the GPU this uploads W and x each call: for repeated
    /// products keep a [`crate::gpu::GpuMatrix`] instead.
    pub fn matvec(&self, w: &Tensor, x: &[f32]) -> Result<Vec<f32>> {
        let [rows, cols] = w.shape();
        if x.len() != cols {
            return Err(GpuError::Shape(format!(
                "x has {} entries, W has {cols} columns",
                x.len()
            )));
        }
        match self {
            Device::Gpu(gpu) => gpu.matvec_host(&gpu.upload(w)?, x),
            Device::Cpu => {
                if let Err((plane, msg)) = w.validate() {
                    return Err(GpuError::Layout(format!("plane '{plane}' {msg}")));
                }
                let mut y = vec![0.0; rows];
                cpu_matvec(w, x, &mut y)?;
                Ok(y)
            }
        }
    }
}
