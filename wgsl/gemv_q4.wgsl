// gemv_q4: y = W x (+ r) for the dense 4-bit codec (format::Q4Matrix), f32 accumulation.
//
//   y[row0 + i] = sum_g scale(i, g) * sum_{c in group g} (2 code(i, c) - 15) * x[c]
//                 (+ res[row0 + i] when RESIDUAL == 1, + y[row0 + i] when 2)
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      codes:  array<vec4<u32>>  [rows, n32]: the file's code rows (column c at nibble
//                                                   c % 8 of word c / 8, low nibble first), 32 columns per vec4
//   2  storage, read      scales: array<u32>        [rows, ns2]: f16 scale pairs, low half first, rows
//                                                   padded to an even number of groups
//   3  storage, read      x:      array<vec4<f32>>  zero-padded to a multiple of 64 entries
//   4  storage, read_write y:      array<f32>
//   5  storage, read      res:    array<f32>        read only when RESIDUAL == 1
// Workgroup: 256 threads = 8 teams of 32; team = one row, lane k reads the 32-column chunks k, k + 32, ...
// Team sums: team_store from wgsl/lib/team_sum.wgsl (subgroup butterfly, then workgroup memory).
// Dispatch: ceil(rows / 8) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none; subgroups: shuffle reduction.

struct Params {
    rows: u32,   // rows of this chunk
    n32: u32,    // 32-column chunks per row (padded columns / 32)
    ns2: u32,    // u32 scale words per row
    row0: u32,   // index in y of the chunk's first row
    groups: u32, // workgroups needed
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override GROUP_CHUNKS: u32 = 1u; // 32-column chunks per scale group: 1 (group 32) or 2 (group 64)
override RESIDUAL: u32 = 0u;
const TEAM: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> res: array<f32>;

var<workgroup> partial: array<f32, 256>;

// sum over the 8 columns of word `q` (columns 8 k .. 8 k + 7 of the row) of (2 code - 15) x; codes j and
// j + 4 are unpacked together as f16 1024 + 2c (exact), as in spmv.wgsl. Written out rather than looped
// over a local array: a dynamically indexed array may live in (slow) local memory.
fn word_dot(q: u32, k: u32) -> f32 {
    let a = x[2u * k];
    let b = x[2u * k + 1u];
    let v0 = levels(q, 0u);
    let v1 = levels(q, 1u);
    let v2 = levels(q, 2u);
    let v3 = levels(q, 3u);
    return dot(v0, vec2<f32>(a.x, b.x)) + dot(v1, vec2<f32>(a.y, b.y)) + dot(v2, vec2<f32>(a.z, b.z))
        + dot(v3, vec2<f32>(a.w, b.w));
}

// The levels 2c - 15 of codes j and j + 4 of word q.
fn levels(q: u32, j: u32) -> vec2<f32> {
    let h = (((q >> (4u * j)) << 1u) & 0x001E001Eu) | 0x64006400u;
    return unpack2x16float(h) - vec2<f32>(1039.0);
}

fn chunk_dot(row: u32, k: u32) -> f32 {
    let q = codes[row * params.n32 + k];
    let g = k / GROUP_CHUNKS;
    let sw = scales[row * params.ns2 + g / 2u];
    let s = unpack2x16float(sw)[g & 1u];
    let sum = word_dot(q.x, 4u * k) + word_dot(q.y, 4u * k + 1u) + word_dot(q.z, 4u * k + 2u) + word_dot(q.w, 4u * k + 3u);
    return s * sum;
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
        // Two chunks per step, so two code loads are in flight per lane.
        var k = lane;
        for (; k + TEAM < params.n32; k += 2u * TEAM) {
            acc0 += chunk_dot(i, k);
            acc1 += chunk_dot(i, k + TEAM);
        }
        if k < params.n32 {
            acc0 += chunk_dot(i, k);
        }
    }
    let v = acc0 + acc1;
// #if subgroups
    team_store(v, li, i, sg_size);
// #else
    team_store(v, li, i, 1u);
// #endif
}

// #include team_sum.wgsl
