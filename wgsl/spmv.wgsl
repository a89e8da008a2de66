// spmv: y = W x (+ r) for a UPG sparse matrix (50% balanced sparsity, 4-bit codes) in the GPU layout
// that src/gpu/matrix.rs derives from the file planes at upload. f32 accumulation.
//
//   y[row0 + i] = sum over blocks b of scale(i, b) * sum over kept k of (2 c_k - 15) * x'[col_k]
//                 (+ res[row0 + i] when RESIDUAL == 1, + y[row0 + i] when RESIDUAL == 2)
//
// x' is x (PROLOGUE == 0), or made from x while it is staged, so that the op before the product needs no
// launch of its own: PROLOGUE == 1, RMSNorm: x' = norm * x / sqrt(mean(x^2) + EPS), staged as norm * x
// while the sum of squares is taken, and the row sums scaled by the one factor at the end (every
// workgroup computes it: x is small); PROLOGUE == 2, SwiGLU: x holds [gate | up] of params.cols each
// (cols a multiple of 4) and x' = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
//
// GPU layout. Rows go in tiles of 32; record(t, b, l) = (t * blocks + b) * 32 + l is row 32 t + l of the
// chunk at block b, so the 32 rows of a tile at one block are 32 consecutive records (one warp load).
// Each block mask is rotated right by `rot` (0..31), chosen at upload so that both 32-bit halves keep
// exactly 16 weights: bit q of half A is block column (rot + q) mod 64, bit q of half B (rot + 32 + q) mod 64.
// A half is walked from its highest set bit down (firstLeadingBit, no loop-carried search); step s of a
// half uses code word s / 8 of that half, nibble (s % 8) / 2 + 4 (s % 2), so that the two codes of steps
// 2j and 2j + 1 come out of one packed-f16 unpack.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      masks:  array<vec2<u32>>  [record] rotated mask: .x half A, .y half B
//   2  storage, read      codes:  array<vec4<u32>>  [record] .xy half A codes, .zw half B codes (step order)
//   3  storage, read      rots:   array<u32>        byte (record % 4) of word record / 4: rot
//   4  storage, read      scales: array<u32>        f16 pairs (low half first), [(t * groups + g) * 32 + l]
//   5  storage, read      x:      array<vec4<f32>>  zero-padded to a multiple of 64 entries
//   6  storage, read_write y:     array<f32>
//   7  storage, read      res:    array<f32>        read only when RESIDUAL == 1
//   8  storage, read      norm:   array<vec4<f32>>  the RMSNorm weight, zero-padded like x; read only
//                                                   when PROLOGUE == 1
// Workgroup: 32 * SLICES threads over R = 32 / ROW_LANES rows of one tile: ROW_LANES workgroups a tile,
// workgroup index i taking rows (i % ROW_LANES) * R .. + R. Thread (lane = index % 32, slice = index / 32)
// sums row lane % R of them over share slice * ROW_LANES + lane / R of the SLICES * ROW_LANES equal runs
// of blocks; a row's shares are added in share order (deterministic). ROW_LANES > 1 spreads a product
// with few row tiles and long rows (5120 x 17920: 160 tiles for 132 SMs on an H100) over more
// workgroups, each staging the whole x for a part of the rows (so the norm factor still sees all of x).
// x is staged in workgroup memory TILE_BLOCKS blocks at a time, block k of the tile at xs[64 k ..]; half
// B's columns wrap inside the block ((rot + 32 + p) & 63). A warp's 32 lanes read at most 2 distinct
// words per bank. (Blocks of 96 or 128 words, x repeated so that no column wraps, save one integer op
// per weight but cost occupancy: 30% slower on an H100 at 128.)
// Every index stays inside its binding by construction (records below tiles * blocks * 32, x below
// blocks * 64, xs below TILE_BLOCKS * 64) and every loop runs a count fixed before it starts, so the
// launcher builds this kernel without wgpu's loop bounding (`Kernel::loops_end`).
// COL_SPLIT > 1 cuts each row's blocks into COL_SPLIT contiguous parts, blocks part * blocks /
// COL_SPLIT .. (part + 1) * blocks / COL_SPLIT, one workgroup each (times ROW_LANES), staging only its
// part of x' (and doing only its part of the prologue): a product of few row tiles (Phi-4's 5120 rows
// are 160 tiles for 132 SMs on an H100) gets more, lighter workgroups. Then y is not written: each
// part's row sums, unscaled and without the residual, go to y[part * params.stride + row0 + row] (the
// launcher binds a scratch buffer as y), and with PROLOGUE == 1 the part's sum of squares of x to
// y[COL_SPLIT * params.stride + part] (from the workgroup of tile 0, rows 0.., of the first chunk);
// spmv_combine.wgsl adds the parts in order, applies the norm factor, the epilogue and the residual.
// EPILOGUE == 1 (SwiGLU pairs, COL_SPLIT == 1 and ROW_LANES == 1 only): the upload put gate rows
// 16 t .. 16 t + 15 at rows 0..15 of tile t and their up rows at 16..31 (src/gpu/matrix.rs), and the
// kernel writes y[row0 / 2 + 16 t + j] = silu(g_j) * u_j instead of the 32 rows.
// Dispatch: ROW_LANES * COL_SPLIT workgroups per row tile, (x, y) with index = x + y *
// num_workgroups.x when over 65535 (tile = index / (ROW_LANES * COL_SPLIT), part = index / ROW_LANES
// % COL_SPLIT).
// Features: none. (An f16 variant would turn codes into values with f16 arithmetic, but naga 30 types
// bitcast<vec2<f16>>(u32) wrongly, so every build uses unpack2x16float, which is as exact.)

struct Params {
    rows: u32,   // rows of this chunk
    blocks: u32, // 64-column blocks per row
    groups: u32, // scale groups per row
    row0: u32,   // index in y of the chunk's first row
    tiles: u32,  // row tiles of 32 in this chunk
    cols: u32,   // columns of W (the width of x' before padding)
    stride: u32, // rows of the whole matrix: the distance between parts in the COL_SPLIT scratch
    _pad2: u32,
}

override SLICES: u32 = 8u;
override TILE_BLOCKS: u32 = 64u;
override GROUP_BLOCKS: u32 = 2u;
override RESIDUAL: u32 = 0u;
override PROLOGUE: u32 = 0u;
override ROW_LANES: u32 = 1u; // 1, 2, 4, ..., 32 (the launcher checks)
override STAGE_ROUNDS: u32 = 1u; // 1 or 4 staging rounds at a time (see the staging in main)
override COL_SPLIT: u32 = 1u;
override EPILOGUE: u32 = 0u;
override EPS: f32 = 1e-5;
const LANES: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> masks: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rots: array<u32>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;
@group(0) @binding(8) var<storage, read> norm: array<vec4<f32>>;

var<workgroup> xs: array<f32, TILE_BLOCKS * 64u>;
var<workgroup> partial: array<f32, LANES * SLICES>;

// The levels 2c - 15 of codes j and j + 4 of word w. Each nibble lands in the low mantissa bits of an
// f16 of exponent 11, whose step is 2: 2048 + 2c; converting to f32 and subtracting 2063 are exact. One
// shift and one mask-or a pair (the shift is gone for j = 0). (An f32 bit trick per code,
// 2^23 + 2c - (2^23 + 15), measured 3-8% slower on an H100.)
fn levels(w: u32, j: u32) -> vec2<f32> {
    let h = ((w >> (4u * j)) & 0x000F000Fu) | 0x68006800u;
    return unpack2x16float(h) - vec2<f32>(2063.0);
}

struct Walk {
    ma: u32,
    mb: u32,
    sa: f32,
    sb: f32,
}

// Eight steps of both halves: codes from words wa (half A) and wb (half B). Half A's bit p is column
// ra + p of the block at xs[kb ..] (ra = rot <= 31, so it never wraps), half B's (ra + 32 + p) & 63.
// Per kept weight: find the top bit, clear it (2), the x index (1, half B 2), the load, the fma, and a
// half of one code-pair split (2, 1 at j = 0), of the two conversions and of the two subtractions:
// about 10.
fn walk8(st: Walk, wa: u32, wb: u32, kb: u32, ra: u32) -> Walk {
    var w = st;
    let rb = ra + 32u;
    for (var j = 0u; j < 4u; j++) {
        let va = levels(wa, j);
        let vb = levels(wb, j);
        var p = firstLeadingBit(w.ma);
        w.ma ^= 1u << p;
        w.sa = fma(va.x, xs[kb + ra + p], w.sa);
        var q = firstLeadingBit(w.mb);
        w.mb ^= 1u << q;
        w.sb = fma(vb.x, xs[kb | ((rb + q) & 63u)], w.sb);
        p = firstLeadingBit(w.ma);
        w.ma ^= 1u << p;
        w.sa = fma(va.y, xs[kb + ra + p], w.sa);
        q = firstLeadingBit(w.mb);
        w.mb ^= 1u << q;
        w.sb = fma(vb.y, xs[kb | ((rb + q) & 63u)], w.sb);
    }
    return w;
}

fn block_sum(m: vec2<u32>, c: vec4<u32>, kb: u32, ra: u32) -> f32 {
    var w = Walk(m.x, m.y, 0.0, 0.0);
    w = walk8(w, c.x, c.z, kb, ra);
    w = walk8(w, c.y, c.w, kb, ra);
    return w.sa + w.sb;
}

// This thread's part of the sum of squares of x (PROLOGUE == 1).
var<private> squares: f32 = 0.0;

// Entries 4q .. 4q + 3 of x' (see the top).
fn stage(q: u32) -> vec4<f32> {
    if PROLOGUE == 1u {
        let v = x[q];
        squares += dot(v, v);
        return v * norm[q];
    }
    if PROLOGUE == 2u {
        // Branch-free, so that the loads of several rounds can be in flight: columns past cols (the
        // block padding) read the last ones again and stage zeros.
        let half = params.cols / 4u;
        let qq = min(q, max(half, 1u) - 1u);
        let g = x[qq];
        let v = g / (vec4<f32>(1.0) + exp(-g)) * x[qq + half];
        return select(vec4<f32>(0.0), v, q < half);
    }
    return x[q];
}

fn put(i: u32, v: vec4<f32>) {
    xs[4u * i] = v.x;
    xs[4u * i + 1u] = v.y;
    xs[4u * i + 2u] = v.z;
    xs[4u * i + 3u] = v.w;
}

// The sum of every thread's `squares`, the same in every workgroup that staged the same columns: lanes
// of the first slice add their column of `partial`, then each sums the 32 columns in order. Uses
// `partial`; call from uniform control flow.
fn square_total(li: u32) -> f32 {
    partial[li] = squares;
    workgroupBarrier();
    if li < LANES {
        var s = 0.0;
        for (var k = 0u; k < SLICES; k++) {
            s += partial[k * LANES + li];
        }
        partial[li] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var l = 0u; l < LANES; l++) {
        total += partial[l];
    }
    workgroupBarrier();
    return total;
}

fn scale(tile: u32, g: u32, lane: u32) -> f32 {
    let i = (tile * params.groups + g) * LANES + lane;
    return unpack2x16float(scales[i >> 1u])[i & 1u];
}

fn rot(rec: u32) -> u32 {
    return (rots[rec >> 2u] >> ((rec & 3u) * 8u)) & 31u;
}

@compute @workgroup_size(LANES * SLICES)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let index = wg.x + wg.y * nwg.x;
    let tile = index / (ROW_LANES * COL_SPLIT);
    if tile >= params.tiles {
        return;
    }
    // This workgroup's blocks.
    let part = index / ROW_LANES % COL_SPLIT;
    let b0 = part * params.blocks / COL_SPLIT;
    let b1 = (part + 1u) * params.blocks / COL_SPLIT;
    let part_rows = LANES / ROW_LANES;
    let lane = li % LANES;
    // This thread's row in the tile and share of the blocks.
    let l = (index % ROW_LANES) * part_rows + lane % part_rows;
    let shares = SLICES * ROW_LANES;
    let share = (li / LANES) * ROW_LANES + lane / part_rows;
    var acc = 0.0;
    for (var t0 = b0; t0 < b1; t0 += TILE_BLOCKS) {
        let nb = min(TILE_BLOCKS, b1 - t0);
        let per = (nb + shares - 1u) / shares;
        let k0 = min(share * per, nb);
        let k1 = min(k0 + per, nb);
        // The first block's loads go out before the x tile is staged, so that their memory latency
        // overlaps the staging (a share without blocks loads the tile's first block and ignores it).
        var rec = (tile * params.blocks + t0 + min(k0, nb - 1u)) * LANES + l;
        var m = masks[rec];
        var c = codes[rec];
        var r = rot(rec);
        workgroupBarrier();
        // STAGE_ROUNDS 4: four rounds of the staging at a time, all their loads before any of them is
        // used. For the 17920-wide SwiGLU input (2 loads, 4 exps and 4 divisions a round, ~9 rounds a
        // thread) that took 60.0 -> 55.4 us on an H100; for plain and RMSNorm inputs it cost 0.5-2 us
        // (more registers for the whole kernel), so the launcher asks for it with SwiGLU only.
        let n = nb * 16u;
        let step = LANES * SLICES;
        var i = li;
        if STAGE_ROUNDS == 4u {
            for (; i + 3u * step < n; i += 4u * step) {
                let v0 = stage(t0 * 16u + i);
                let v1 = stage(t0 * 16u + i + step);
                let v2 = stage(t0 * 16u + i + 2u * step);
                let v3 = stage(t0 * 16u + i + 3u * step);
                put(i, v0);
                put(i + step, v1);
                put(i + 2u * step, v2);
                put(i + 3u * step, v3);
            }
        }
        for (; i < n; i += step) {
            put(i, stage(t0 * 16u + i));
        }
        workgroupBarrier();
        // One block ahead in registers: the next block's loads are in flight while this one is walked.
        for (var k = k0; k < k1; k++) {
            let next = rec + select(0u, LANES, k + 1u < k1);
            let m_next = masks[next];
            let c_next = codes[next];
            let r_next = rot(next);
            let s = scale(tile, (t0 + k) / GROUP_BLOCKS, l);
            acc = fma(s, block_sum(m, c, k * 64u, r), acc);
            rec = next;
            m = m_next;
            c = c_next;
            r = r_next;
        }
    }
    var factor = 1.0;
    if PROLOGUE == 1u {
        let total = square_total(li);
        factor = inverseSqrt(total / f32(params.cols) + EPS);
        if COL_SPLIT > 1u && tile == 0u && index % ROW_LANES == 0u && li == 0u && params.row0 == 0u {
            y[COL_SPLIT * params.stride + part] = total;
        }
    }
    // Thread li holds share li / part_rows of row li % part_rows of the part.
    partial[li] = acc;
    workgroupBarrier();
    let row = tile * LANES + l;
    var sum = 0.0;
    if li < part_rows {
        for (var s = 0u; s < shares; s++) {
            sum += partial[s * part_rows + li];
        }
    }
    if COL_SPLIT > 1u {
        if li < part_rows && row < params.rows {
            y[part * params.stride + params.row0 + row] = sum;
        }
        return;
    }
    sum *= factor;
    if EPILOGUE == 1u {
        // Row j < 16 of the tile is gate j, row 16 + j its up (ROW_LANES == 1: l == li here).
        workgroupBarrier();
        if li < LANES {
            partial[li] = sum;
        }
        workgroupBarrier();
        if li < 16u && row < params.rows {
            let g = partial[li];
            y[params.row0 / 2u + tile * 16u + li] = g / (1.0 + exp(-g)) * partial[li + 16u];
        }
        return;
    }
    if li < part_rows && row < params.rows {
        let out = params.row0 + row;
        if RESIDUAL == 1u {
            sum += res[out];
        } else if RESIDUAL == 2u {
            sum += y[out];
        }
        y[out] = sum;
    }
}
