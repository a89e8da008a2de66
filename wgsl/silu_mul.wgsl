// silu_mul: out[t][i] = silu(gate_up[t][i]) * gate_up[t][width + i], silu(g) = g / (1 + exp(-g)).
// PAIRS == 1: gate_up rows come in the SwiGLU pairs order of src/gpu/matrix.rs (a gate_up matrix
// uploaded for spmv's SwiGLU epilogue): gate i at 32 (i / 16) + i % 16, its up 16 further.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      gate_up: array<f32>  [n, 2 * width]: gate columns, then up columns (or pairs)
//   2  storage, read_write out:     array<f32>  [n, width]
// Workgroup: 256 threads, one output each.
// Dispatch: ceil(n * width / 256) workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: none.

struct Params {
    width: u32,
    n: u32,
    _pad0: u32,
    _pad1: u32,
}

override PAIRS: u32 = 0u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = gid.x + gid.y * nwg.x * 256u;
    if id >= params.n * params.width {
        return;
    }
    let t = id / params.width;
    let i = id - t * params.width;
    var gi = i;
    var ui = params.width + i;
    if PAIRS == 1u {
        gi = (i / 16u) * 32u + i % 16u;
        ui = gi + 16u;
    }
    let g = gate_up[t * 2u * params.width + gi];
    let u = gate_up[t * 2u * params.width + ui];
    out[id] = g / (1.0 + exp(-g)) * u;
}
