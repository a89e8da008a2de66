// gemv_f16: y = W x (+ r) for dense f16 weights, f32 accumulation. The baseline that the sparse codec is
// measured against, and the path for tensors kept dense in f16 (and for decompress.wgsl's f16 output).
//
//   y[row0 + i] = sum_c f32(W[i, c]) * x[c]   (+ res[row0 + i] when RESIDUAL == 1, + y[row0 + i] when 2)
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      w:   array<vec4<u32>>  [rows, stride / 8], 8 f16 per vec4, low half first;
//                                                rows padded with zeros to `stride` (a multiple of 8) columns;
//                                                declared array<vec4<f16>> (two per 16 bytes) with f16
//   2  storage, read      x:   array<vec4<f32>>  zero-padded to a multiple of 64 entries
//   3  storage, read_write y:   array<f32>
//   4  storage, read      res: array<f32>        read only when RESIDUAL == 1
// Workgroup: 256 threads = 8 teams of 32; team = one row, its lanes read consecutive 16-byte chunks.
// Team sums: team_store from wgsl/lib/team_sum.wgsl (subgroup butterfly, then workgroup memory).
// Dispatch: ceil(rows / 8) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none. f16: weights are loaded as f16 vectors (no unpacking); subgroups: shuffle reduction.
// #if f16
enable f16;
// #endif

struct Params {
    rows: u32,   // rows of this chunk
    n8: u32,     // vec4<u32> per row = stride / 8
    row0: u32,   // index in y of the chunk's first row
    groups: u32, // workgroups needed
}

override RESIDUAL: u32 = 0u;
const TEAM: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
// #if f16
@group(0) @binding(1) var<storage, read> w: array<vec4<f16>>;
// #else
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
// #endif
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> res: array<f32>;

var<workgroup> partial: array<f32, 256>;

// The 8 weights of chunk k of the row that starts at chunk `base`, dotted with x[8 k .. 8 k + 8].
fn dot8(base: u32, k: u32) -> f32 {
    let a = x[2u * k];
    let b = x[2u * k + 1u];
// #if f16
    let lo = vec4<f32>(w[2u * (base + k)]);
    let hi = vec4<f32>(w[2u * (base + k) + 1u]);
    return dot(lo, a) + dot(hi, b);
// #else
    let q = w[base + k];
    return dot(unpack2x16float(q.x), a.xy) + dot(unpack2x16float(q.y), a.zw) + dot(unpack2x16float(q.z), b.xy)
        + dot(unpack2x16float(q.w), b.zw);
// #endif
}

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
        let base = i * params.n8;
        var k = lane;
        // Two chunks per pass keep two loads in flight per lane.
        for (; k + TEAM < params.n8; k += 2u * TEAM) {
            acc0 += dot8(base, k);
            acc1 += dot8(base, k + TEAM);
        }
        if k < params.n8 {
            acc0 += dot8(base, k);
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
