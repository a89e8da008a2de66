// spmm_coop: Y = X W^T (+ R) for a batch of n rows of x (prefill), W sparse (spmv.wgsl's GPU layout), on
// the matrix units (tensor cores) through cooperative matrices: f16 operands, f32 accumulation.
//
//   y[t * y_cols + row0 + i] = sum_c W[i, c] * x[t * cols + c]   for t < n and the chunk's rows i
//                              (+ res[same index] when RESIDUAL == 1, + y[same index] when RESIDUAL == 2)
//
// Same job as spmm.wgsl (its FMA tiles reach ~30% of the f32 rate; an H100's f16 matrix units do ~6x
// that rate). x comes split into two f16 parts by split_f16.wgsl: x = xh + xl keeps about 22 bits, so
// the error is the weights' f16 rounding alone. A workgroup owns 128 rows of the chunk and BN tokens
// (128; 64 is a bench and test knob).
// For each 64-column block of W it
//   1. zeroes ws, then decodes W[its rows][the block] into it as [row][column], f16 scale * (2 code -
//      15), zeros included: thread (r = li % 128, h = li / 128) walks half h of row r's rotated mask
//      (columns (rot + 32 h + p) & 63, its 16 kept weights in spmv's walk order) and stores them. The
//      block is decoded once for BN tokens: decoding is what the matrix units leave to the ALUs;
//   2. for each 32-column half of the block: stages xh and xl [its tokens][the half's columns] (tokens
//      >= n and columns >= cols as 0), then subgroup s (of 8) adds, for the two 16-column steps,
//      ws[its 32 rows][step] * (xh + xl)[step][its BN / 2 tokens] into 2 x BN / 32 16 x 16 f32
//      accumulators (rows 32 (s % 4) .., tokens BN / 2 (s / 4) ..; two products a tile and step: xh
//      and xl).
// At the end each subgroup stores its accumulators, one at a time, through its 16 x 16 slice of cs, and
// its lanes write the rows and tokens in range (adding the residual).
// Error: |y~ - y| <= 2^-11 sum |W x| (f16 rounding of each weight; f16 subnormal weights add at most
// 2^-25 |x| each) plus f32 accumulation. An x beyond f16's range (|x| > 65504) becomes infinite, and so
// do the sums it enters (model activations stay far below; `UPG_COOPERATIVE_MATRIX=0` avoids the f16
// path altogether).
//
// Bindings (group 0), as spmm.wgsl but for x:
//   0  uniform            params: Params (below)
//   1  storage, read      p0:  array<u32>  masks (2 words a record, spmv.wgsl's layout)
//   2  storage, read      p1:  array<u32>  codes (4 words a record)
//   3  storage, read      p2:  array<u32>  rotations (one byte a record)
//   4  storage, read      p3:  array<u32>  f16 scale pairs, [(tile * params.b + g) * 32 + lane]
//   5  storage, read      x:   array<f16>  [2, n, cols]: the high parts of x, then the low parts
//   6  storage, read_write y:   array<f32>  [n, y_cols]; the chunk's rows at row0 ..
//   7  storage, read      res: array<f32>  like y, read only when RESIDUAL == 1
//   8  storage, read_write part: array<f32> like y: column part 1's sums when SPLIT == 2 (the launcher
//                                          then adds it to y with add.wgsl)
// Workgroup: 256 threads in subgroups of 32 (the launcher checks the adapter's subgroup size);
// 46 KiB of workgroup memory at BN = 128.
// Dispatch: row_groups * ceil(n / BN) * SPLIT workgroups, (x, y) with id = x + y * num_workgroups.x
// when over 65535; row group id % row_groups, then token tile, then column part. SPLIT = 2 halves the
// blocks of each workgroup and doubles the workgroups, for products of few row groups (5120 rows
// x 512 tokens: 160 workgroups for an H100's 132 SMs).
// Every loop runs a count fixed before it starts and every index stays inside its binding (the launcher
// checks the shapes), so the launcher builds this kernel without wgpu's loop bounding.
// Features: shader-f16 and wgpu's experimental cooperative matrices (16 x 16 x 16, f16 -> f32): Vulkan
// with VK_KHR_cooperative_matrix. Where they are missing the launcher uses spmm.wgsl.

enable f16;
enable wgpu_cooperative_matrix;

struct Params {
    rows: u32,       // rows of this chunk
    cols: u32,       // columns of W = length of an x row
    row0: u32,       // index of the chunk's first row in a y row
    y_cols: u32,     // length of a y row (all rows of W)
    n: u32,          // x rows (tokens)
    row_groups: u32, // workgroups along the chunk's rows: ceil(rows / 128)
    blocks: u32,     // 64-column blocks: ceil(cols / 64)
    a: u32,          // 32-row tiles in the chunk
    b: u32,          // scale groups a row
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override GROUP_BLOCKS: u32 = 2u; // 64-column blocks per scale group
override RESIDUAL: u32 = 0u;
override X_LO: u32 = 1u;         // 0: x as f16 alone (one product per step instead of two)
const BM: u32 = 128u;            // rows per workgroup
override BN: u32 = 128u;         // tokens per workgroup: 128 or 64
override SPLIT: u32 = 1u;        // column parts: 1, or 2 (part 1 into `part`, added to y after)
const WG: u32 = 256u;
// Row strides of ws (64 columns) and of xh, xl (32): 8 more, so that the 16-byte rows of a matrix
// load fall in different banks.
const LD: u32 = 72u;
const LDX: u32 = 40u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> p0: array<u32>;
@group(0) @binding(2) var<storage, read> p1: array<u32>;
@group(0) @binding(3) var<storage, read> p2: array<u32>;
@group(0) @binding(4) var<storage, read> p3: array<u32>;
@group(0) @binding(5) var<storage, read> x: array<f16>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;
@group(0) @binding(8) var<storage, read_write> part: array<f32>;

var<workgroup> ws: array<f16, 9216>; // [128 rows][LD]
var<workgroup> xh: array<f16, BN * LDX>; // [BN tokens][LDX]
var<workgroup> xl: array<f16, BN * LDX>;
var<workgroup> cs: array<f32, 2048>; // [8 subgroups][16 x 16], column-major

// Eight steps of the walk (codes of word w), from the mask's highest set bit down, into row `at` of ws.
fn walk8(mask: u32, w: u32, base: u32, at: u32, scale: f32) -> u32 {
    var m = mask;
    for (var j = 0u; j < 4u; j++) {
        let v = vec2<f16>(levels(w, j) * scale);
        var p = firstLeadingBit(m);
        m ^= 1u << p;
        ws[at + ((base + p) & 63u)] = v.x;
        p = firstLeadingBit(m);
        m ^= 1u << p;
        ws[at + ((base + p) & 63u)] = v.y;
    }
    return m;
}

// Columns col0 .. + 31 of the block for the workgroup's tokens into xh and xl: column li % 32 of
// tokens li / 32 + 8 j (32 lanes read 64 contiguous bytes of each part).
fn stage_x(tok0: u32, col0: u32, li: u32) {
    let k = li % 32u;
    let c = col0 + k;
    let lo = params.n * params.cols;
    for (var j = 0u; j < BN / 8u; j++) {
        let t = li / 32u + 8u * j;
        var h = 0.0h;
        var l = 0.0h;
        if tok0 + t < params.n && c < params.cols {
            let i = (tok0 + t) * params.cols + c;
            h = x[i];
            l = x[lo + i];
        }
        xh[t * LDX + k] = h;
        xl[t * LDX + k] = l;
    }
}

// Column part sp of y[t][row0 + r]: part 0 into y (with the residual), part 1 into `part`.
fn store(t: u32, r: u32, v: f32, sp: u32) {
    if t < params.n && r < params.rows {
        let i = t * params.y_cols + params.row0 + r;
        if sp == 1u {
            part[i] = v;
            return;
        }
        var s = v;
        if RESIDUAL == 1u {
            s += res[i];
        } else if RESIDUAL == 2u {
            s += y[i];
        }
        y[i] = s;
    }
}

// Accumulator c (rows r0 .. + 15, tokens t0 .. + 15) out through subgroup s's slice of cs. Call from
// uniform control flow.
fn put(c: coop_mat16x16<f32, C>, s: u32, lane: u32, r0: u32, t0: u32, sp: u32) {
    coopStore(c, &cs[256u * s], 16u);
    workgroupBarrier();
    for (var e = 0u; e < 8u; e++) {
        let i = lane + 32u * e;
        store(t0 + i / 16u, r0 + i % 16u, cs[256u * s + i], sp);
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let id = wg.x + wg.y * nwg.x;
    let token_tiles = (params.n + BN - 1u) / BN;
    if id >= params.row_groups * token_tiles * SPLIT {
        return;
    }
    let rg = id % params.row_groups;
    let tok0 = ((id / params.row_groups) % token_tiles) * BN;
    // Column part sp of SPLIT: blocks b0 .. b1.
    let sp = id / (params.row_groups * token_tiles);
    let per = (params.blocks + SPLIT - 1u) / SPLIT;
    let b0 = min(sp * per, params.blocks);
    let b1 = min(b0 + per, params.blocks);
    let r = li % BM;
    let h = li / BM;
    let s = li / 32u;
    let rs = 32u * (s % 4u); // the subgroup's rows and tokens in the tile
    let ts = (BN / 2u) * (s / 4u);

    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c02 = coop_mat16x16<f32, C>();
    var c03 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var c12 = coop_mat16x16<f32, C>();
    var c13 = coop_mat16x16<f32, C>();

    for (var b = b0; b < b1; b++) {
        let rec = load_record(rg, b, r, h);
        workgroupBarrier();
        // 1. zero ws (36 entries a thread), then this thread's 16 kept weights of the block
        for (var j = 0u; j < 36u; j++) {
            ws[li + WG * j] = 0.0h;
        }
        stage_x(tok0, b * 64u, li);
        workgroupBarrier();
        if rec.live {
            let base = rec.rot + 32u * h;
            let m = walk8(rec.mask, rec.c0, base, r * LD, rec.scale);
            walk8(m, rec.c1, base, r * LD, rec.scale);
        }
        workgroupBarrier();
        // 2. the two 32-column halves (the first one's x was staged with the zeroing)
        for (var half = 0u; half < 2u; half++) {
            if half == 1u {
                workgroupBarrier();
                stage_x(tok0, b * 64u + 32u, li);
                workgroupBarrier();
            }
            for (var kk = 0u; kk < 32u; kk += 16u) {
                let a0 = coopLoadT<coop_mat16x16<f16, A>>(&ws[rs * LD + 32u * half + kk], LD);
                let a1 = coopLoadT<coop_mat16x16<f16, A>>(&ws[(rs + 16u) * LD + 32u * half + kk], LD);
                // Written out for both parts of x and both token halves: a loop over the parts (one
                // array for both) measured 2-3% slower on an H100 (5120 x 17920 at 512 tokens: 1700
                // against 1660 us; 35840 x 5120 2846 against 2788).
                let b0 = coopLoad<coop_mat16x16<f16, B>>(&xh[ts * LDX + kk], LDX);
                let b1 = coopLoad<coop_mat16x16<f16, B>>(&xh[(ts + 16u) * LDX + kk], LDX);
                c00 = coopMultiplyAdd(a0, b0, c00);
                c01 = coopMultiplyAdd(a0, b1, c01);
                c10 = coopMultiplyAdd(a1, b0, c10);
                c11 = coopMultiplyAdd(a1, b1, c11);
                if X_LO == 1u {
                    let l0 = coopLoad<coop_mat16x16<f16, B>>(&xl[ts * LDX + kk], LDX);
                    let l1 = coopLoad<coop_mat16x16<f16, B>>(&xl[(ts + 16u) * LDX + kk], LDX);
                    c00 = coopMultiplyAdd(a0, l0, c00);
                    c01 = coopMultiplyAdd(a0, l1, c01);
                    c10 = coopMultiplyAdd(a1, l0, c10);
                    c11 = coopMultiplyAdd(a1, l1, c11);
                }
                if BN == 128u {
                    let b2 = coopLoad<coop_mat16x16<f16, B>>(&xh[(ts + 32u) * LDX + kk], LDX);
                    let b3 = coopLoad<coop_mat16x16<f16, B>>(&xh[(ts + 48u) * LDX + kk], LDX);
                    c02 = coopMultiplyAdd(a0, b2, c02);
                    c03 = coopMultiplyAdd(a0, b3, c03);
                    c12 = coopMultiplyAdd(a1, b2, c12);
                    c13 = coopMultiplyAdd(a1, b3, c13);
                    if X_LO == 1u {
                        let l2 = coopLoad<coop_mat16x16<f16, B>>(&xl[(ts + 32u) * LDX + kk], LDX);
                        let l3 = coopLoad<coop_mat16x16<f16, B>>(&xl[(ts + 48u) * LDX + kk], LDX);
                        c02 = coopMultiplyAdd(a0, l2, c02);
                        c03 = coopMultiplyAdd(a0, l3, c03);
                        c12 = coopMultiplyAdd(a1, l2, c12);
                        c13 = coopMultiplyAdd(a1, l3, c13);
                    }
                }
            }
        }
    }

    let lane = li % 32u;
    let r0 = rg * BM + rs;
    let t0 = tok0 + ts;
    put(c00, s, lane, r0, t0, sp);
    put(c01, s, lane, r0, t0 + 16u, sp);
    put(c10, s, lane, r0 + 16u, t0, sp);
    put(c11, s, lane, r0 + 16u, t0 + 16u, sp);
    if BN == 128u {
        put(c02, s, lane, r0, t0 + 32u, sp);
        put(c03, s, lane, r0, t0 + 48u, sp);
        put(c12, s, lane, r0 + 16u, t0 + 32u, sp);
        put(c13, s, lane, r0 + 16u, t0 + 48u, sp);
    }
}

// #include sparse_record.wgsl
