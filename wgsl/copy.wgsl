// copy: dst = src, 16 bytes per invocation step. The bench's measure of achievable memory bandwidth
// (bytes read + bytes written) that the other kernels are compared with.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      src: array<vec4<u32>>
//   2  storage, read_write dst: array<vec4<u32>>
// Workgroup: 256 threads; each workgroup copies 4 * 256 consecutive vec4 (16 KiB), four coalesced
// loads in flight per thread before the stores.
// Dispatch: ceil(n / 1024) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none.

struct Params {
    n: u32,      // vec4s to copy
    groups: u32, // workgroups needed
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let group = wg.x + wg.y * nwg.x;
    if group >= params.groups {
        return;
    }
    let base = group * 1024u + li;
    var v: array<vec4<u32>, 4>;
    for (var k = 0u; k < 4u; k++) {
        let i = base + k * 256u;
        if i < params.n {
            v[k] = src[i];
        }
    }
    for (var k = 0u; k < 4u; k++) {
        let i = base + k * 256u;
        if i < params.n {
            dst[i] = v[k];
        }
    }
}
