//! The GPU context: instance, adapter choice, device with the adapter's real limits and the optional
//! features it has, error capture, and the pipeline cache.
//!
//! Adapter choice: all backends, highest performance first (discrete, integrated, virtual, software);
//! `UPG_BACKEND=vulkan|metal|dx12|gl|cpu` restricts the backend (`cpu` asks for the CPU path: no GPU),
//! `UPG_ADAPTER=<substring>` picks an adapter by name, `UPG_DEVICE_MEMORY_MIB=<n>` plans with n MiB of
//! device memory instead of what the driver reports (to see how a model fits a smaller GPU),
//! `UPG_COOPERATIVE_MATRIX=0` leaves the matrix units (cooperative matrices) unused.
//!
//! Faults: errors that no error scope catches (they would otherwise abort inside wgpu) and the loss of
//! the device are kept and returned by the next call that submits or waits, so a caller always gets
//! an error value, never a hang or an abort.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::error::{GpuError, Result};
use super::shader::{Binding, Kernel, Variant};

/// Test and bench knobs that lower the device's limits, so that the code paths for large tensors
/// (binding splits, 2D dispatch, x staged in several tiles) run at small sizes.
#[derive(Clone, Copy, Debug, Default)]
pub struct LimitOverrides {
    pub max_binding_bytes: Option<u64>,
    pub max_workgroups_per_dim: Option<u32>,
    pub max_workgroup_storage_bytes: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub backends: wgpu::Backends,
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Use shader-f16 / subgroups / timestamp queries when the adapter has them.
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// Use the matrix units (wgpu's experimental cooperative matrices, 16 x 16 x 16 f16 -> f32) for
    /// the batched product when the adapter has them with 32-lane subgroups.
    pub cooperative_matrix: bool,
    /// wgpu's shader bounds checks and loop bounding; off skips them in kernels whose indices are in
    /// range by construction of the upload layout.
    pub runtime_checks: bool,
    pub limits: LimitOverrides,
    /// Bench and test knob: override constants of the matrix-vector kernels (spmv.wgsl: SLICES,
    /// TILE_BLOCKS, ROW_LANES, COL_SPLIT, ...; gemv_q4.wgsl: QUADS; gemv_q3.wgsl: ROWS, STAGE_X) that replace the launcher's choice or add to
    /// it, each in the kernels that declare it; and launcher knobs: SPLIT_TILES and SPLIT_GROUPS
    /// (spmv's column split rule, [`Gpu::spmv_parts`]), SWIGLU_EPILOGUE=0 (the model's gate_up
    /// uploaded as it is, SiLU * up in down's prologue instead of gate_up's epilogue).
    pub overrides: Vec<(String, f64)>,
    /// Device memory to plan with instead of what the driver reports (`UPG_DEVICE_MEMORY_MIB`).
    pub memory_bytes: Option<u64>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::all(),
            adapter: None,
            f16: true,
            subgroups: true,
            timestamps: true,
            cooperative_matrix: true,
            runtime_checks: true,
            limits: LimitOverrides::default(),
            overrides: Vec::new(),
            memory_bytes: None,
        }
    }
}

/// `NAME=NUMBER` pairs separated by commas (empty entries skipped); `None` when one is not.
pub fn parse_overrides(set: &str) -> Option<Vec<(String, f64)>> {
    set.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_string(), v.trim().parse::<f64>().ok()?))
        })
        .collect()
}

impl GpuOptions {
    /// Defaults with `UPG_BACKEND`, `UPG_ADAPTER`, `UPG_DEVICE_MEMORY_MIB` and `UPG_OVERRIDES` (kernel
    /// overrides and launcher knobs as in [`GpuOptions::overrides`], `NAME=VALUE,...`) applied. `UPG_BACKEND=cpu` gives
    /// [`GpuError::NoAdapter`], which callers that can fall back treat as "use the CPU".
    pub fn from_env() -> Result<Self> {
        let mut opts = Self::default();
        if let Ok(b) = std::env::var("UPG_BACKEND") {
            opts.backends = match b.to_ascii_lowercase().as_str() {
                "vulkan" => wgpu::Backends::VULKAN,
                "metal" => wgpu::Backends::METAL,
                "dx12" => wgpu::Backends::DX12,
                "gl" => wgpu::Backends::GL,
                "cpu" => {
                    return Err(GpuError::NoAdapter(
                        "UPG_BACKEND=cpu asks for the CPU path".into(),
                    ))
                }
                _ => return Err(GpuError::BadBackend(b)),
            };
        }
        opts.adapter = std::env::var("UPG_ADAPTER").ok().filter(|s| !s.is_empty());
        if let Ok(v) = std::env::var("UPG_COOPERATIVE_MATRIX") {
            opts.cooperative_matrix = match v.trim() {
                "0" => false,
                "1" => true,
                _ => {
                    return Err(GpuError::BadEnv {
                        var: "UPG_COOPERATIVE_MATRIX",
                        value: v.clone(),
                        expected: "0 (leave the matrix units unused) or 1",
                    })
                }
            };
        }
        if let Ok(mib) = std::env::var("UPG_DEVICE_MEMORY_MIB") {
            let bytes = mib
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|m| m.checked_mul(1 << 20))
                .filter(|&b| b > 0)
                .ok_or_else(|| GpuError::BadEnv {
                    var: "UPG_DEVICE_MEMORY_MIB",
                    value: mib.clone(),
                    expected: "a positive number of MiB",
                })?;
            opts.memory_bytes = Some(bytes);
        }
        if let Ok(set) = std::env::var("UPG_OVERRIDES") {
            opts.overrides = parse_overrides(&set).ok_or_else(|| GpuError::BadEnv {
                var: "UPG_OVERRIDES",
                value: set.clone(),
                expected: "comma-separated NAME=NUMBER pairs, e.g. COL_SPLIT=1,SWIGLU_EPILOGUE=0",
            })?;
        }
        Ok(opts)
    }
}

/// An adapter as listed by [`Gpu::adapters`].
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// 16 x 16 x 16 f16 -> f32 cooperative matrices in 32-lane subgroups (the batched product's
    /// matrix-unit kernel).
    pub cooperative_matrix: bool,
}

/// The limits the launchers plan with: the device's, lowered by any [`LimitOverrides`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest storage binding (and buffer) in bytes.
    pub max_binding_bytes: u64,
    pub max_workgroups_per_dim: u32,
    pub max_workgroup_storage_bytes: u32,
    pub max_invocations_per_workgroup: u32,
}

/// How much memory the device has for buffers, and who says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    pub bytes: u64,
    /// "the driver's device-local heaps", or the override that set it.
    pub source: &'static str,
}

/// Live allocations of the device's memory allocator: buffers (and any textures) not yet freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocations {
    pub count: usize,
    pub bytes: u64,
}

/// Optional features in use.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// Timestamps between the dispatches of a compute pass (the per-op profile of GpuBackend).
    pub timestamps_in_passes: bool,
    /// Cooperative matrices of 16 x 16 x 16, f16 -> f32, in 32-lane subgroups (spmm_coop.wgsl).
    pub cooperative_matrix: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    kernel: Kernel,
    /// Override constants by name, values as f64 bits (all are small integers or booleans).
    constants: Vec<(String, u64)>,
}

pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    features: Features,
    limits: Limits,
    runtime_checks: bool,
    pub(crate) overrides: Vec<(String, f64)>,
    layouts: Mutex<HashMap<Kernel, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>>,
    modules: Mutex<HashMap<Kernel, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// Errors that no error scope caught (they would otherwise panic inside wgpu).
    uncaptured: Arc<Mutex<Vec<Uncaptured>>>,
    /// Why the device was lost, once it is.
    lost: Arc<Mutex<Option<String>>>,
    memory: Option<DeviceMemory>,
    /// A small zeroed storage buffer bound where a kernel's optional input is not used.
    pub(crate) dummy: wgpu::Buffer,
    /// The column parts of split spmv launches, shared by all of them (see `Gpu::split_scratch`).
    pub(crate) split_scratch: Mutex<Option<wgpu::Buffer>>,
    /// Uniform parameter buffers by content, and bind groups by layout and buffers: a forward pass
    /// repeats the same launches every token, so after the first token it allocates nothing.
    pub(crate) uniforms: Mutex<HashMap<Vec<u32>, wgpu::Buffer>>,
    binds: Mutex<HashMap<(wgpu::BindGroupLayout, Vec<wgpu::Buffer>), wgpu::BindGroup>>,
    /// The batched product's x in two f16 parts (spmm_coop.wgsl), grown to the largest batch seen.
    pub(crate) split_x: Mutex<Option<wgpu::Buffer>>,
    /// Its column part 1 when it splits the columns in two.
    pub(crate) coop_part: Mutex<Option<wgpu::Buffer>>,
}

/// Entries each cache keeps before it starts over (a bound on what one-off launches can pin).
pub(crate) const CACHE_ENTRIES: usize = 4096;

/// An error that escaped the error scopes: out of memory, or any other (validation, internal).
struct Uncaptured {
    out_of_memory: bool,
    message: String,
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

fn summary(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let f = a.features();
    AdapterSummary {
        name: info.name,
        backend: info.backend,
        device_type: info.device_type,
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        f16: f.contains(wgpu::Features::SHADER_F16),
        subgroups: f.contains(wgpu::Features::SUBGROUP),
        timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        cooperative_matrix: has_coop(a),
    }
}

/// Whether the adapter multiplies 16 x 16 x 16 f16 matrices into f32 cooperatively in subgroups of
/// exactly 32 lanes (spmm_coop.wgsl assigns its work by 32-lane subgroup).
fn has_coop(a: &wgpu::Adapter) -> bool {
    let info = a.get_info();
    a.features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
        && a.cooperative_matrix_properties().iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
}

impl Gpu {
    /// Every adapter of `backends`, best first.
    pub fn adapters(backends: wgpu::Backends) -> Vec<AdapterSummary> {
        let mut list = pollster::block_on(instance(backends).enumerate_adapters(backends));
        list.sort_by_key(|a| rank(a.get_info().device_type));
        list.iter().map(summary).collect()
    }

    /// Opens the best adapter that `opts` allows.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let inst = instance(opts.backends);
        let mut list = pollster::block_on(inst.enumerate_adapters(opts.backends));
        let found = list.len();
        if let Some(want) = &opts.adapter {
            let want = want.to_lowercase();
            list.retain(|a| a.get_info().name.to_lowercase().contains(&want));
            if list.is_empty() {
                return Err(GpuError::NoAdapter(format!(
                    "none of the {found} adapters has '{want}' in its name (UPG_ADAPTER); `cargo run --release --example bench -- --list` lists them"
                )));
            }
        }
        let adapter = list
            .into_iter()
            .min_by_key(|a| rank(a.get_info().device_type))
            .ok_or_else(|| {
                GpuError::NoAdapter(format!(
                    "wgpu found no adapter for backends {:?} (no driver installed? on Linux, mesa-vulkan-drivers gives a software Vulkan device)",
                    opts.backends
                ))
            })?;
        Self::open(adapter, opts)
    }

    fn open(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Self> {
        let info = adapter.get_info();
        let have = adapter.features();
        let mut want = wgpu::Features::empty();
        for (on, f) in [
            (opts.f16, wgpu::Features::SHADER_F16),
            (opts.subgroups, wgpu::Features::SUBGROUP),
            (opts.timestamps, wgpu::Features::TIMESTAMP_QUERY),
        ] {
            if on && have.contains(f) {
                want |= f;
            }
        }
        let inside = wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        if want.contains(wgpu::Features::TIMESTAMP_QUERY) && have.contains(inside) {
            want |= inside;
        }
        let coop = opts.cooperative_matrix
            && want.contains(wgpu::Features::SHADER_F16)
            && has_coop(&adapter);
        if coop {
            want |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let experimental = if coop {
            // SAFETY: wgpu's experimental features may have bugs; the one used, cooperative matrices,
            // runs only spmm_coop.wgsl, whose results the tests check against the CPU on a device
            // that has them, and UPG_COOPERATIVE_MATRIX=0 turns it off.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("upg"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::Device {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(Uncaptured {
                    out_of_memory: matches!(e, wgpu::Error::OutOfMemory { .. }),
                    message: e.to_string(),
                });
            }
        }));
        let lost = Arc::new(Mutex::new(None));
        let sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = sink.lock() {
                let message = if message.is_empty() {
                    format!("{reason:?}")
                } else {
                    format!("{reason:?}: {message}")
                };
                l.get_or_insert(message);
            }
        });
        let memory = match opts.memory_bytes {
            Some(bytes) => Some(DeviceMemory {
                bytes,
                source: "UPG_DEVICE_MEMORY_MIB / GpuOptions::memory_bytes",
            }),
            // A software adapter (lavapipe) draws on host memory, which the OS overcommits: its
            // heap size is a nominal figure, not a limit.
            None if info.device_type == wgpu::DeviceType::Cpu => None,
            None => driver_memory(&adapter).map(|bytes| DeviceMemory {
                bytes,
                source: "the driver's device-local memory heaps",
            }),
        };
        let o = opts.limits;
        let lower = |dev: u64, knob: Option<u64>| knob.map_or(dev, |k| k.min(dev));
        let limits = Limits {
            max_binding_bytes: lower(
                limits
                    .max_storage_buffer_binding_size
                    .min(limits.max_buffer_size),
                o.max_binding_bytes,
            ),
            max_workgroups_per_dim: lower(
                limits.max_compute_workgroups_per_dimension as u64,
                o.max_workgroups_per_dim.map(u64::from),
            ) as u32,
            max_workgroup_storage_bytes: lower(
                limits.max_compute_workgroup_storage_size as u64,
                o.max_workgroup_storage_bytes.map(u64::from),
            ) as u32,
            max_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        };
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused input"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Self {
            features: Features {
                f16: want.contains(wgpu::Features::SHADER_F16),
                subgroups: want.contains(wgpu::Features::SUBGROUP),
                timestamps: want.contains(wgpu::Features::TIMESTAMP_QUERY),
                timestamps_in_passes: want.contains(inside),
                cooperative_matrix: coop,
            },
            device,
            queue,
            info,
            limits,
            runtime_checks: opts.runtime_checks,
            overrides: opts.overrides.clone(),
            layouts: Mutex::default(),
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            uncaptured,
            lost,
            memory,
            dummy,
            split_scratch: Mutex::new(None),
            uniforms: Mutex::new(HashMap::new()),
            binds: Mutex::new(HashMap::new()),
            split_x: Mutex::new(None),
            coop_part: Mutex::new(None),
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn features(&self) -> Features {
        self.features
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// "name (backend, driver)" for logs and tables.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {} {})",
            self.info.name, self.info.backend, self.info.driver, self.info.driver_info
        )
        .replace(" )", ")")
    }

    /// The memory buffers can take, where the driver tells it (Vulkan, hardware adapters) or an
    /// override sets it.
    pub fn memory(&self) -> Option<DeviceMemory> {
        self.memory
    }

    /// What the device's allocator holds now, where the backend reports it (Vulkan, DX12): finished
    /// work is cleaned up first, so freed buffers are not counted.
    pub fn allocations(&self) -> Option<Allocations> {
        let _ = self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        });
        self.device
            .generate_allocator_report()
            .map(|r| Allocations {
                count: r.allocations.len(),
                bytes: r.total_allocated_bytes,
            })
    }

    /// Drops the cached kernel parameters and bind groups (made again when next needed); the buffers
    /// they alone held are freed. Their sizes are bounded (`CACHE_ENTRIES`), but they grow with what
    /// has been run (a parameter buffer per embedded token id): leak checks clear them first.
    pub fn clear_caches(&self) {
        if let Ok(mut u) = self.uniforms.lock() {
            u.clear();
        }
        if let Ok(mut b) = self.binds.lock() {
            b.clear();
        }
        for slot in [&self.split_x, &self.coop_part] {
            if let Ok(mut b) = slot.lock() {
                b.take();
            }
        }
    }

    /// The error for a device that is lost, if it is.
    fn lost(&self) -> Option<GpuError> {
        let reason = self.lost.lock().ok()?.clone()?;
        Some(GpuError::DeviceLost {
            adapter: self.info.name.clone(),
            reason,
        })
    }

    /// The error to report for a failure: the device's loss when it is lost, else `other`. A driver's
    /// loss is known at once; a destroyed device says so only at a poll once its queue is idle, and
    /// until then its calls fail with validation errors that would hide the cause.
    pub(crate) fn fault(&self, other: GpuError) -> GpuError {
        if self.lost().is_none() {
            let _ = self.device.poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(std::time::Duration::from_secs(5)),
            });
        }
        self.lost().unwrap_or(other)
    }

    pub fn variant(&self) -> Variant {
        Variant {
            f16: self.features.f16,
            subgroups: self.features.subgroups,
        }
    }

    /// Runs `f`, turning any validation or out-of-memory error it causes into `GpuError::Wgpu`.
    pub(crate) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let e1 = pollster::block_on(validation.pop());
        let e2 = pollster::block_on(oom.pop());
        match (e1, e2) {
            (_, Some(_)) => Err(self.fault(GpuError::OutOfMemory {
                what: what.to_string(),
            })),
            (Some(e), None) => Err(self.fault(GpuError::Wgpu {
                what: what.to_string(),
                reason: e.to_string(),
            })),
            (None, None) => self.take_uncaptured(what).map(|()| out),
        }
    }

    /// Fails if the device is lost, or with the first error that escaped the error scopes since the
    /// last call.
    pub(crate) fn take_uncaptured(&self, what: &str) -> Result<()> {
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        let mut v = self.uncaptured.lock().map_err(|_| GpuError::Wgpu {
            what: what.into(),
            reason: "error log poisoned".into(),
        })?;
        let first = v.drain(..).next();
        drop(v);
        match first {
            Some(e) if e.out_of_memory => {
                Err(self.fault(GpuError::OutOfMemory { what: what.into() }))
            }
            Some(e) => Err(self.fault(GpuError::Wgpu {
                what: what.into(),
                reason: e.message,
            })),
            None => Ok(()),
        }
    }

    /// Submits and blocks until the GPU is done.
    /// Submits `cmd` without waiting; errors of earlier work surface here.
    pub(crate) fn submit(&self, cmd: wgpu::CommandBuffer) -> Result<wgpu::SubmissionIndex> {
        let index = self.queue.submit([cmd]);
        self.take_uncaptured("submitting kernels")?;
        Ok(index)
    }

    pub fn submit_and_wait(&self, cmd: wgpu::CommandBuffer) -> Result<()> {
        let index = self.queue.submit([cmd]);
        let waited = self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        });
        // A failed submission reports its cause through the uncaptured-error handler, and the wait
        // only says the index was never submitted: give the cause first.
        self.take_uncaptured("running kernels")?;
        waited.map_err(|e| {
            self.fault(GpuError::Wgpu {
                what: "waiting for the GPU".into(),
                reason: e.to_string(),
            })
        })?;
        Ok(())
    }

    /// Records one compute pass with `f`, submits it and waits.
    pub fn run<T>(&self, f: impl FnOnce(&mut wgpu::ComputePass<'_>) -> Result<T>) -> Result<T> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        let out = {
            let mut pass = enc.begin_compute_pass(&Default::default());
            f(&mut pass)?
        };
        self.submit_and_wait(enc.finish())?;
        Ok(out)
    }

    fn layout(&self, kernel: Kernel) -> Result<(wgpu::BindGroupLayout, wgpu::PipelineLayout)> {
        let mut map = self.layouts.lock().map_err(|_| poisoned())?;
        if let Some(l) = map.get(&kernel) {
            return Ok(l.clone());
        }
        let entries: Vec<_> = kernel
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: match b {
                    Binding::Uniform => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    Binding::Read | Binding::ReadWrite => wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: *b == Binding::Read,
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                },
                count: None,
            })
            .collect();
        let l = self.scoped("creating a bind group layout", || {
            let bgl = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(kernel.file()),
                    entries: &entries,
                });
            let pl = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(kernel.file()),
                    bind_group_layouts: &[Some(&bgl)],
                    immediate_size: 0,
                });
            (bgl, pl)
        })?;
        map.insert(kernel, l.clone());
        Ok(l)
    }

    fn module(&self, kernel: Kernel) -> Result<wgpu::ShaderModule> {
        let mut map = self.modules.lock().map_err(|_| poisoned())?;
        if let Some(m) = map.get(&kernel) {
            return Ok(m.clone());
        }
        let src = kernel
            .variant_source(self.variant())
            .map_err(|reason| GpuError::Shader {
                kernel: kernel.file().into(),
                reason,
            })?;
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(kernel.file()),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        let m = self
            .scoped(&format!("compiling {}", kernel.file()), || {
                let base = if self.runtime_checks {
                    wgpu::ShaderRuntimeChecks::checked()
                } else {
                    wgpu::ShaderRuntimeChecks::unchecked()
                };
                let checks = wgpu::ShaderRuntimeChecks {
                    force_loop_bounding: base.force_loop_bounding && !kernel.loops_end(),
                    ..base
                };
                if checks.bounds_checks && checks.force_loop_bounding {
                    self.device.create_shader_module(desc)
                } else {
                    // SAFETY: the kernels index only inside their bindings and workgroup arrays for
                    // every layout the launchers in this module create (the upload checks the shapes),
                    // and the loops of `loops_end` kernels run a count fixed before they start.
                    unsafe { self.device.create_shader_module_trusted(desc, checks) }
                }
            })
            .map_err(|e| GpuError::Shader {
                kernel: kernel.file().into(),
                reason: e.to_string(),
            })?;
        map.insert(kernel, m.clone());
        Ok(m)
    }

    /// The pipeline of `kernel` with these override constants, built once and cached.
    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        constants: &[(&str, f64)],
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroupLayout)> {
        let key = PipelineKey {
            kernel,
            constants: constants
                .iter()
                .map(|&(n, v)| (n.to_string(), v.to_bits()))
                .collect(),
        };
        let (bgl, layout) = self.layout(kernel)?;
        if let Some(p) = self.pipelines.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok((p.clone(), bgl));
        }
        let module = self.module(kernel)?;
        let p = self.scoped(&format!("building the {} pipeline", kernel.file()), || {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.file()),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        // Every kernel writes the workgroup memory it reads.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
        })?;
        self.pipelines
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, p.clone());
        Ok((p, bgl))
    }

    /// A bind group of whole buffers, binding i = `buffers[i]`, made once per layout and buffers.
    pub(crate) fn bind(
        &self,
        layout: &wgpu::BindGroupLayout,
        buffers: &[&wgpu::Buffer],
    ) -> Result<wgpu::BindGroup> {
        let key = (
            layout.clone(),
            buffers.iter().map(|&b| b.clone()).collect::<Vec<_>>(),
        );
        let mut cache = self.binds.lock().map_err(|_| poisoned())?;
        if let Some(b) = cache.get(&key) {
            return Ok(b.clone());
        }
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        let entries: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout,
            entries: &entries,
        });
        cache.insert(key, group.clone());
        Ok(group)
    }

    /// Workgroup counts for `groups` workgroups: one dimension while it fits, else two; the kernels
    /// rebuild the linear index as x + y * num_workgroups.x and skip indices past the end.
    pub(crate) fn grid(&self, groups: u64) -> Result<(u32, u32)> {
        let max = self.limits.max_workgroups_per_dim as u64;
        if groups <= max {
            return Ok((groups as u32, 1));
        }
        let y = groups.div_ceil(max);
        if y > max {
            return Err(GpuError::Shape(format!(
                "{groups} workgroups exceed {max} x {max}: split the launch"
            )));
        }
        Ok((max as u32, y as u32))
    }
}

/// Bytes of the adapter's device-local memory heaps, where the backend can say (Vulkan); `None`
/// elsewhere. wgpu has no portable query for it.
#[cfg(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
))]
fn driver_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: only reads the physical device's memory properties through the raw Vulkan handles;
    // nothing wgpu tracks is created or changed.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let props = unsafe {
        hal.shared_instance()
            .raw_instance()
            .get_physical_device_memory_properties(hal.raw_physical_device())
    };
    // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
    const DEVICE_LOCAL: u32 = 1;
    let heaps = props.memory_heaps.get(..props.memory_heap_count as usize)?;
    let bytes: u64 = heaps
        .iter()
        .filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0)
        .map(|h| h.size)
        .sum();
    (bytes > 0).then_some(bytes)
}

#[cfg(not(any(
    windows,
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
)))]
fn driver_memory(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

fn poisoned() -> GpuError {
    GpuError::Wgpu {
        what: "using the pipeline cache".into(),
        reason: "a thread panicked while holding it".into(),
    }
}
