//! GPU kernels through wgpu: the context (adapter, device, limits, features), device buffers, and one
//! launcher per WGSL op in `wgsl/`.
