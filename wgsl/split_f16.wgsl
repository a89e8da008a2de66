// split_f16: x as two f16 parts, out[i] = f16(x[i]) and out[len + i] = f16(x[i] - out[i]) for i < len,
// so that out[i] + out[len + i] keeps about 22 significant bits of x (the input of spmm_coop.wgsl, whose
// workgroups then copy x instead of each converting it again).
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      x:   array<f32>
//   2  storage, read_write out: array<f16>  [2 * len]: the high parts, then the low parts
// Workgroup: 256 threads, one element each.
// Dispatch: ceil(len / 256) workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: shader-f16 (built only with it).

enable f16;

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f16>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i < params.len {
        let v = x[i];
        let hi = f16(v);
        out[i] = hi;
        out[params.len + i] = f16(v - f32(hi));
    }
}
