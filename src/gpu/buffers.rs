//! Device buffers: creating them filled, vectors of f32, and reading results back.

use super::context::Gpu;
use super::error::{GpuError, Result};

/// An f32 vector on the device. Its buffer holds `len` values and zeros up to the next multiple of 64,
/// so that kernels may read whole 64-column blocks of x.
#[derive(Debug)]
pub struct GpuVector {
    pub(crate) buffer: wgpu::Buffer,
    pub len: usize,
}

/// Entries a vector of `len` values occupies on the device.
pub(crate) fn padded_len(len: usize) -> usize {
    len.div_ceil(64).max(1) * 64
}

impl GpuVector {
    /// Bytes of the device buffer of a vector of `len` values (see [`Gpu::vector`]).
    pub fn device_bytes_for(len: usize) -> u64 {
        padded_len(len) as u64 * 4
    }
}

impl Gpu {
    /// A buffer kept in `slot` of at least `bytes` (made again, larger, when it is smaller).
    pub(crate) fn kept(
        &self,
        slot: &std::sync::Mutex<Option<wgpu::Buffer>>,
        bytes: u64,
        what: &str,
    ) -> Result<wgpu::Buffer> {
        let mut kept = slot.lock().map_err(|_| GpuError::Wgpu {
            what: what.into(),
            reason: "lock poisoned".into(),
        })?;
        if let Some(b) = kept.as_ref().filter(|b| b.size() >= bytes) {
            return Ok(b.clone());
        }
        let b = self.scoped(&format!("allocating {what}"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        *kept = Some(b.clone());
        Ok(b)
    }

    /// A storage buffer holding `bytes` (padded with zeros to a multiple of 4 bytes).
    pub(crate) fn buffer_with(
        &self,
        label: &str,
        bytes: &[u8],
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let size = (bytes.len().max(4).div_ceil(4) * 4) as u64;
        self.buffer_filled(label, size, usage, |dst| {
            dst[..bytes.len()].copy_from_slice(bytes)
        })
    }

    /// A buffer of `size` bytes (a multiple of 4) whose contents `fill` writes, zeroed first.
    pub(crate) fn buffer_filled(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<wgpu::Buffer> {
        let what = format!("allocating {label} ({size} bytes)");
        let buf = self.scoped(&what, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: usage | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: true,
            })
        })?;
        // Mapped memory is write-only: the contents are built on the host, then copied in once.
        let mut data = vec![0u8; size as usize];
        fill(&mut data);
        buf.get_mapped_range_mut(..)
            .map_err(|e| {
                self.fault(GpuError::Wgpu {
                    what: what.clone(),
                    reason: e.to_string(),
                })
            })?
            .copy_from_slice(&data);
        buf.unmap();
        Ok(buf)
    }

    /// A uniform buffer holding `words`.
    /// A uniform buffer holding `words`, made once per distinct content (never written after).
    pub(crate) fn uniform(&self, words: &[u32]) -> Result<wgpu::Buffer> {
        let poisoned = || GpuError::Wgpu {
            what: "caching kernel parameters".into(),
            reason: "cache lock poisoned".into(),
        };
        if let Some(b) = self.uniforms.lock().map_err(|_| poisoned())?.get(words) {
            return Ok(b.clone());
        }
        let b = self.buffer_with(
            "params",
            bytemuck::cast_slice(words),
            wgpu::BufferUsages::UNIFORM,
        )?;
        let mut cache = self.uniforms.lock().map_err(|_| poisoned())?;
        if cache.len() >= super::context::CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(words.to_vec(), b.clone());
        Ok(b)
    }

    /// Uploads `x`.
    pub fn vector(&self, x: &[f32]) -> Result<GpuVector> {
        let buffer = self.buffer_filled(
            "vector",
            padded_len(x.len()) as u64 * 4,
            wgpu::BufferUsages::STORAGE,
            |dst| dst[..x.len() * 4].copy_from_slice(bytemuck::cast_slice(x)),
        )?;
        Ok(GpuVector {
            buffer,
            len: x.len(),
        })
    }

    /// A vector of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<GpuVector> {
        self.vector(&vec![0.0; len])
    }

    /// Overwrites the values of `v` (not its zero padding) with `values`.
    pub fn write(&self, v: &GpuVector, values: &[f32]) -> Result<()> {
        if values.len() != v.len {
            return Err(GpuError::Shape(format!(
                "{} values written to a vector of {}",
                values.len(),
                v.len
            )));
        }
        if !values.is_empty() {
            self.queue
                .write_buffer(&v.buffer, 0, bytemuck::cast_slice(values));
        }
        Ok(())
    }

    /// Reads `v` back.
    pub fn read(&self, v: &GpuVector) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(&v.buffer, 0, v.len as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Reads `size` bytes of `buf` from `offset` (both multiples of 4) through a staging buffer.
    pub fn read_bytes(&self, buf: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let enc = self.device.create_command_encoder(&Default::default());
        self.submit_and_read(enc, buf, offset, size)
    }

    /// Submits `enc` (work already recorded in it) with a copy of `size` bytes of `buf` at `offset`
    /// appended, waits, and returns those bytes: one submission for a pass and its read-back.
    pub(crate) fn submit_and_read(
        &self,
        mut enc: wgpu::CommandEncoder,
        buf: &wgpu::Buffer,
        offset: u64,
        size: u64,
    ) -> Result<Vec<u8>> {
        if size == 0 {
            self.submit_and_wait(enc.finish())?;
            return Ok(Vec::new());
        }
        let staging = self.readback_buffer(size)?;
        enc.copy_buffer_to_buffer(buf, offset, &staging, 0, size);
        let index = self.submit(enc.finish())?;
        self.read_after(index, &staging)
    }

    /// A buffer the host can map for reading, the target of read-back copies.
    pub(crate) fn readback_buffer(&self, size: u64) -> Result<wgpu::Buffer> {
        self.scoped("allocating a read-back buffer", || {
            self.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("read-back"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// Waits for submission `index`, which copied into `staging` (a [`Gpu::readback_buffer`]), and
    /// returns the buffer's bytes. Later submissions may still be running.
    pub(crate) fn read_after(
        &self,
        index: wgpu::SubmissionIndex,
        staging: &wgpu::Buffer,
    ) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        let fail = |reason: String| {
            self.fault(GpuError::Wgpu {
                what: "reading results back".into(),
                reason,
            })
        };
        let waited = self.device().poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        });
        // A failed submission reports its cause through the uncaptured-error handler.
        self.take_uncaptured("running kernels")?;
        waited.map_err(|e| fail(e.to_string()))?;
        let mapped = match rx.try_recv() {
            Ok(r) => r,
            // The mapping resolves at a poll after the copy's submission is done; if the wait above
            // returned before handling it, one more poll does.
            Err(_) => {
                self.device()
                    .poll(wgpu::PollType::Wait {
                        submission_index: None,
                        timeout: None,
                    })
                    .map_err(|e| fail(e.to_string()))?;
                rx.recv().map_err(|e| fail(e.to_string()))?
            }
        };
        mapped.map_err(|e| fail(e.to_string()))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| fail(e.to_string()))?
            .to_vec();
        staging.unmap();
        Ok(data)
    }
}
