// gemv_q3: y = W x (+ r) for the dense 3-bit codec (format::Q3Matrix), f32 accumulation.
//
//   y[row0 + i] = sum_g scale(i, g) * sum_{c in group g} (2 code(i, c) - 7) * x[c]
//                 (+ res[row0 + i] when RESIDUAL == 1, + y[row0 + i] when 2)
//
// Layout on the device (src/gpu/matrix.rs re-lays the file's bit planes out at upload, same size):
// a row is n32 runs of 32 columns, three u32 words a run, stored [row][word t][run] so that the lanes
// of a team, which take consecutive runs, load consecutive words. Word t of a run holds the codes of
// its columns 10 t + j, j = 0..9, at bits 1 + 3 j; bit 0 of word t is bit t of column 30's code, bit 31
// bit t of column 31's. Runs past the last real column are not
// stored; padding columns inside the last run meet x's zero padding.
//
// Decoding without conversions: a code c at bits p..p+2 of a word (1 <= p <= 20), masked in place and
// given the exponent field of 2^(24 - p), is the f32 2^(24 - p) + 2c exactly; subtracting the
// constant 2^(24 - p) + 7 (exact: p >= 1) leaves the level 2c - 7 exactly. Per weight: an and-or (one
// three-input logic op on NVIDIA), an add and an fma; per word one shift brings bits 22..30 down to
// 1..9, and the two split codes take a few more. The levels are exact, so f32 rounding in the sums is
// the only error, as in the other gemv kernels.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      codes:  array<u32>        [rows, 3, n32] in the layout above
//   2  storage, read      scales: array<u32>        [rows, ns2]: f16 scale pairs, low half first, rows
//                                                   padded to an even number of groups
//   3  storage, read      x:      array<vec4<f32>>  zero-padded to a multiple of 64 entries
//   4  storage, read_write y:      array<f32>
//   5  storage, read      res:    array<f32>        read only when RESIDUAL == 1
// Workgroup: 256 threads = 8 teams of 32; team = ROWS consecutive rows, lane k takes runs k, k + 32, ...
// of all of them, so each x value it holds serves ROWS rows. With STAGE_X, 5632 bytes of workgroup
// memory (x staging and the team sums), else 1024.
// Team sums: team_store from wgsl/lib/team_sum.wgsl (subgroup butterfly, then workgroup memory), once
// per row of the team.
// Dispatch: ceil(rows / (8 ROWS)) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none (the f16 variants are the same code: f16 arithmetic would round x); subgroups: shuffle
// reduction.

struct Params {
    rows: u32,   // rows of this chunk
    n32: u32,    // runs of 32 columns per row (ceil(cols / 32))
    ns2: u32,    // u32 scale words per row
    row0: u32,   // index in y of the chunk's first row
    groups: u32, // workgroups needed
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override GROUP_RUNS: u32 = 4u; // runs per scale group: 1, 2 or 4 (groups of 32, 64, 128 columns)
override ROWS: u32 = 4u;       // rows per team: 1, 2 or 4
override RESIDUAL: u32 = 0u;
// 1: the workgroup stages each iteration's x in workgroup memory with coalesced loads (one vec4 a
// thread), and lanes read their run's 32 values from there; 0: each lane reads them from x itself,
// 8 vec4 at a 128-byte stride from its neighbours' (32 cache lines per warp-wide load).
override STAGE_X: u32 = 1u;
const TEAM: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> codes: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> res: array<f32>;

var<workgroup> partial: array<f32, 256>;
// STAGE_X: the x of one iteration, 32 runs of 32 columns, run r at vec4 9 r. The stride of 36 words puts
// the 8 lanes of each quarter-warp on distinct banks for their 16-byte reads.
var<workgroup> xs: array<vec4<f32>, 288>;

// Vec4 `li` of the 1024 x values of iteration `it` (zero past the row's last run).
fn x_chunk(it: u32, li: u32) -> vec4<f32> {
    let v = it * 256u + li;
    if v < 8u * params.n32 {
        return x[v];
    }
    return vec4<f32>();
}

// The level 2c - 7 of the code at bits p..p+2 of q; p is a literal at every call, so the masks and
// constants fold.
fn lv(q: u32, p: u32) -> f32 {
    let e = (151u - p) << 23u; // exponent field of 2^(24 - p)
    return bitcast<f32>((q & (7u << p)) | e) - (bitcast<f32>(e) + 7.0);
}

// Sum over the 10 codes of word q of level * x, the columns' x in a, b, c. Two chains of fmas.
fn word_dot(q: u32, a: vec4<f32>, b: vec4<f32>, c: vec2<f32>) -> f32 {
    let h = q >> 21u;
    var s0 = lv(q, 1u) * a.x;
    var s1 = lv(q, 4u) * a.y;
    s0 = fma(lv(q, 7u), a.z, s0);
    s1 = fma(lv(q, 10u), a.w, s1);
    s0 = fma(lv(q, 13u), b.x, s0);
    s1 = fma(lv(q, 16u), b.y, s1);
    s0 = fma(lv(q, 19u), b.z, s0);
    s1 = fma(lv(h, 1u), b.w, s1);
    s0 = fma(lv(h, 4u), c.x, s0);
    s1 = fma(lv(h, 7u), c.y, s1);
    return s0 + s1;
}

// scale * sum over run k of `row` of level * x; the run's x in x0..x7.
fn run_dot(row: u32, k: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, x4: vec4<f32>,
           x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>) -> f32 {
    let base = row * 3u * params.n32 + k;
    let q0 = codes[base];
    let q1 = codes[base + params.n32];
    let q2 = codes[base + 2u * params.n32];
    let g = k / GROUP_RUNS;
    let s = unpack2x16float(scales[row * params.ns2 + g / 2u])[g & 1u];
    // Columns 30 and 31: bit t of their codes at bits 0 and 31 of word t, gathered as 2c at bits 1..3.
    let c30 = ((q0 << 1u) & 2u) | ((q1 << 2u) & 4u) | ((q2 << 3u) & 8u);
    let c31 = ((q0 >> 30u) & 2u) | ((q1 >> 29u) & 4u) | ((q2 >> 28u) & 8u);
    let sum = word_dot(q0, x0, x1, x2.xy) + word_dot(q1, vec4<f32>(x2.zw, x3.xy), vec4<f32>(x3.zw, x4.xy), x4.zw)
        + word_dot(q2, x5, x6, x7.xy) + fma(lv(c30, 1u), x7.z, lv(c31, 1u) * x7.w);
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
    let first = (group * 8u + li / TEAM) * ROWS;
    // Rows past the end re-read the last row; their sums are never stored.
    let last = params.rows - 1u;
    let r1 = min(first + 1u, last);
    let r2 = min(first + 2u, last);
    let r3 = min(first + 3u, last);
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    // Every team walks the same runs (lane k: run 32 it + k), so the iteration count is the
    // workgroup's, as the barriers of the staging need.
    let iters = (params.n32 + TEAM - 1u) / TEAM;
    var next = vec4<f32>();
    if STAGE_X == 1u {
        next = x_chunk(0u, li);
    }
    for (var it = 0u; it < iters; it++) {
        let k = it * TEAM + lane;
        var x0 = vec4<f32>();
        var x1 = vec4<f32>();
        var x2 = vec4<f32>();
        var x3 = vec4<f32>();
        var x4 = vec4<f32>();
        var x5 = vec4<f32>();
        var x6 = vec4<f32>();
        var x7 = vec4<f32>();
        if STAGE_X == 1u {
            workgroupBarrier();
            xs[(li / 8u) * 9u + li % 8u] = next;
            workgroupBarrier();
            if it + 1u < iters {
                next = x_chunk(it + 1u, li);
            }
            let b = lane * 9u;
            x0 = xs[b];
            x1 = xs[b + 1u];
            x2 = xs[b + 2u];
            x3 = xs[b + 3u];
            x4 = xs[b + 4u];
            x5 = xs[b + 5u];
            x6 = xs[b + 6u];
            x7 = xs[b + 7u];
        } else if k < params.n32 {
            x0 = x[8u * k];
            x1 = x[8u * k + 1u];
            x2 = x[8u * k + 2u];
            x3 = x[8u * k + 3u];
            x4 = x[8u * k + 4u];
            x5 = x[8u * k + 5u];
            x6 = x[8u * k + 6u];
            x7 = x[8u * k + 7u];
        }
        if first < params.rows && k < params.n32 {
            acc0 += run_dot(first, k, x0, x1, x2, x3, x4, x5, x6, x7);
            if ROWS > 1u {
                acc1 += run_dot(r1, k, x0, x1, x2, x3, x4, x5, x6, x7);
            }
            if ROWS > 2u {
                acc2 += run_dot(r2, k, x0, x1, x2, x3, x4, x5, x6, x7);
                acc3 += run_dot(r3, k, x0, x1, x2, x3, x4, x5, x6, x7);
            }
        }
    }
// #if subgroups
    let sg = sg_size;
// #else
    let sg = 1u;
// #endif
    team_store(acc0, li, first, sg);
    // Each team_store reads `partial` after its barrier; the next may overwrite it only after another.
    if ROWS > 1u {
        workgroupBarrier();
        team_store(acc1, li, first + 1u, sg);
    }
    if ROWS > 2u {
        workgroupBarrier();
        team_store(acc2, li, first + 2u, sg);
        workgroupBarrier();
        team_store(acc3, li, first + 3u, sg);
    }
}

// #include team_sum.wgsl
