// add: x[i] += y[i] for i < len (the residual stream).
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read_write x: array<f32>
//   2  storage, read      y: array<f32>
// Workgroup: 256 threads, one element each.
// Dispatch: ceil(len / 256) workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: none.

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = gid.x + gid.y * nwg.x * 256u;
    if id < params.len {
        x[id] += y[id];
    }
}
