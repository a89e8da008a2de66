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
// Workgroup: 256 threads = 8 teams of 32 lanes; a team takes 8 consecutive rows (64 a workgroup:
// Q4_WORKGROUP_ROWS in src/gpu/matrix.rs), lane k the 32-column chunks k, k + 32, ... of all 8. A lane
// loads the 32 x values of a chunk once into registers and uses them for the 8 rows: one row a team
// read x 8 times over (4 bytes of x from L1 per 0.5 byte of weights) and took 522 us for Phi-4's
// 100352 x 5120 lm_head on an H100. QUADS chunks per row are loaded per step of the main loop.
// Per weight: half a shift and a mask-or (two codes per f16 pair), one f16-to-f32 conversion, one
// subtraction, one fma; per row and chunk a 16-byte code load and a scale. On an H100 this takes
// 139 us there (74% of copy); codes as f32 bit patterns (2^23 + c, no conversion but a shift and a
// mask-or per code) took 148 us.
// Row sums: every lane writes its 8 partial sums to workgroup memory; thread i < 64 adds row i's 32
// in lane order (the same order in every variant; subgroups are not used).
// Rows past the end of the chunk read the last row again and are never stored.
// Every loop runs a count fixed before it starts (the launcher builds it without wgpu's loop bounding).
// Dispatch: ceil(rows / 64) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none. (An f16 build could subtract the offset in f16, but naga 30 cannot bitcast u32 to
// vec2<f16>; unpack2x16float is exact here.)

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
override QUADS: u32 = 1u; // chunks per row in flight per step (Q4_QUADS in src/gpu/matrix.rs)
const TEAM: u32 = 32u;
const TEAM_ROWS: u32 = 8u;
const ROWS: u32 = 64u;
// Row stride of `partial`: odd, so that the 32 lanes writing one row and the 32 threads reading one
// column of rows each hit 32 different banks.
const STRIDE: u32 = 33u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> res: array<f32>;

var<workgroup> partial: array<f32, ROWS * STRIDE>;

// x of one chunk: columns 4i .. 4i + 3 in .xi (registers, not an array: a dynamically indexed array
// may live in slow local memory).
struct Chunk {
    x0: vec4<f32>,
    x1: vec4<f32>,
    x2: vec4<f32>,
    x3: vec4<f32>,
    x4: vec4<f32>,
    x5: vec4<f32>,
    x6: vec4<f32>,
    x7: vec4<f32>,
}

fn load_chunk(k: u32) -> Chunk {
    let b = 8u * k;
    return Chunk(x[b], x[b + 1u], x[b + 2u], x[b + 3u], x[b + 4u], x[b + 5u], x[b + 6u], x[b + 7u]);
}

// The levels 2c - 15 of the codes in bits 0..3 and 16..19 of w. Masked and or-ed with 0x6800, each
// half is an f16 of exponent 11, whose step is 2: 2048 + 2c; the conversion and the subtraction are exact.
fn levels(w: u32) -> vec2<f32> {
    return unpack2x16float((w & 0x000F000Fu) | 0x68006800u) - vec2<f32>(2063.0);
}

// acc + sum over the 8 columns of word w of level * x; a holds x of the word's columns 0..3, b of 4..7
// (codes j and j + 4 share a pair).
fn word_dot(w: u32, a: vec4<f32>, b: vec4<f32>, acc: f32) -> f32 {
    let l0 = levels(w);
    let l1 = levels(w >> 4u);
    let l2 = levels(w >> 8u);
    let l3 = levels(w >> 12u);
    var s = fma(l0.x, a.x, acc);
    s = fma(l1.x, a.y, s);
    s = fma(l2.x, a.z, s);
    s = fma(l3.x, a.w, s);
    s = fma(l0.y, b.x, s);
    s = fma(l1.y, b.y, s);
    s = fma(l2.y, b.z, s);
    return fma(l3.y, b.w, s);
}

// Chunk k of `row` against x.
fn row_dot(row: u32, k: u32, c: Chunk) -> f32 {
    let q = codes[row * params.n32 + k];
    let g = k / GROUP_CHUNKS;
    let s = unpack2x16float(scales[row * params.ns2 + g / 2u])[g & 1u];
    var t = word_dot(q.x, c.x0, c.x1, 0.0);
    t = word_dot(q.y, c.x2, c.x3, t);
    t = word_dot(q.z, c.x4, c.x5, t);
    t = word_dot(q.w, c.x6, c.x7, t);
    return s * t;
}

// The sums of the team's 8 rows: rows lo.x .. lo.w, hi.x .. hi.w.
struct Sums {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn team_chunk(lo: vec4<u32>, hi: vec4<u32>, k: u32, acc: Sums) -> Sums {
    let c = load_chunk(k);
    let a = vec4<f32>(row_dot(lo.x, k, c), row_dot(lo.y, k, c), row_dot(lo.z, k, c), row_dot(lo.w, k, c));
    let b = vec4<f32>(row_dot(hi.x, k, c), row_dot(hi.y, k, c), row_dot(hi.z, k, c), row_dot(hi.w, k, c));
    return Sums(acc.lo + a, acc.hi + b);
}

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
    let lane = li % TEAM;
    let team = li / TEAM;
    let first = group * ROWS + team * TEAM_ROWS;
    let last = vec4<u32>(params.rows - 1u);
    let lo = min(vec4<u32>(first) + vec4<u32>(0u, 1u, 2u, 3u), last);
    let hi = min(vec4<u32>(first) + vec4<u32>(4u, 5u, 6u, 7u), last);
    var acc = Sums(vec4<f32>(0.0), vec4<f32>(0.0));
    var k = lane;
    // Steps of QUADS chunks with no bounds test between their loads, then the remaining chunks.
    for (; k + (QUADS - 1u) * TEAM < params.n32; k += QUADS * TEAM) {
        for (var q = 0u; q < QUADS; q++) {
            acc = team_chunk(lo, hi, k + q * TEAM, acc);
        }
    }
    for (; k < params.n32; k += TEAM) {
        acc = team_chunk(lo, hi, k, acc);
    }
    let base = team * TEAM_ROWS * STRIDE + lane;
    partial[base] = acc.lo.x;
    partial[base + STRIDE] = acc.lo.y;
    partial[base + 2u * STRIDE] = acc.lo.z;
    partial[base + 3u * STRIDE] = acc.lo.w;
    partial[base + 4u * STRIDE] = acc.hi.x;
    partial[base + 5u * STRIDE] = acc.hi.y;
    partial[base + 6u * STRIDE] = acc.hi.z;
    partial[base + 7u * STRIDE] = acc.hi.w;
    workgroupBarrier();
    let i = group * ROWS + li;
    if li < ROWS && i < params.rows {
        var sum = 0.0;
        for (var l = 0u; l < TEAM; l++) {
            sum += partial[li * STRIDE + l];
        }
        let out = params.row0 + i;
        if RESIDUAL == 1u {
            sum += res[out];
        } else if RESIDUAL == 2u {
            sum += y[out];
        }
        y[out] = sum;
    }
}
