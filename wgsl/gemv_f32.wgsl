// gemv_f32: y = W x (+ r) for dense f32 weights (the exact reference codec, and decompress.wgsl's f32
// output), f32 accumulation.
//
//   y[row0 + i] = sum_c W[i, c] * x[c]   (+ res[row0 + i] when RESIDUAL == 1, + y[row0 + i] when 2)
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      w:   array<vec4<f32>>  [rows, stride / 4]; rows zero-padded to `stride` (a
//                                                multiple of 8) columns
//   2  storage, read      x:   array<vec4<f32>>  zero-padded to a multiple of 64 entries
//   3  storage, read_write y:   array<f32>
//   4  storage, read      res: array<f32>        read only when RESIDUAL == 1
// Workgroup: 256 threads = 8 teams of 32; team = one row, its lanes read consecutive 16-byte chunks.
// Team sums: team_store from wgsl/lib/team_sum.wgsl (subgroup butterfly, then workgroup memory).
// Dispatch: ceil(rows / 8) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none; subgroups: shuffle reduction.

struct Params {
    rows: u32,   // rows of this chunk
    n4: u32,     // vec4<f32> per row = stride / 4
    row0: u32,   // index in y of the chunk's first row
    groups: u32, // workgroups needed
}

override RESIDUAL: u32 = 0u;
const TEAM: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> res: array<f32>;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
// #if subgroups
    @builtin(subgroup_size) sg_size: u32,
// #endif
) {
    let group = wg.x + wg.y * nwg.x;
    if group >= params.groups {
        return;
    }
    let lane = li % TEAM;
    let i = group * 8u + li / TEAM;
    var acc0 = 0.0;
    var acc1 = 0.0;
    if i < params.rows {
        let base = i * params.n4;
        var k = lane;
        for (; k + TEAM < params.n4; k += 2u * TEAM) {
            acc0 += dot(w[base + k], x[k]);
            acc1 += dot(w[base + k + TEAM], x[k + TEAM]);
        }
        if k < params.n4 {
            acc0 += dot(w[base + k], x[k]);
        }
    }
    var v = acc0 + acc1;
// #if subgroups
    team_store(v, li, i, sg_size);
// #else
    team_store(v, li, i, 1u);
// #endif
}

// #include team_sum.wgsl
