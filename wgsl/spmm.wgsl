// spmm: Y = X W^T (+ R) for a batch of n rows of x (prefill), W in any codec (CODEC), f32 accumulation.
//
//   y[t * y_cols + row0 + i] = sum_c W[i, c] * x[t * cols + c]   for t < n and the chunk's rows i
//                              (+ res[same index] when RESIDUAL == 1, + y[same index] when RESIDUAL == 2)
//
// Why dense tiles of a sparse matrix: walking only the kept weights needs one x value from workgroup
// memory per kept weight and token, and workgroup memory gives an SM 32 words per clock against 128
// FMAs: a kept-weight walk stays under a quarter of the FMA rate whatever it does in registers. Here a
// workgroup decodes a [BM, 64] tile of W, zeros included, into workgroup memory once for 64 tokens, and
// each thread multiplies TM rows by 4 tokens in registers: per column, 1 + TM / 4 16-byte loads feed
// 4 TM FMAs. That is twice the FMAs of the kept weights, at close to the full FMA rate.
//
// Per 64-column block b of W (blocks = ceil(cols / 64)), a workgroup
//   1. stages x[its 64 tokens][block b] in xs as [column][token], vec4s of 4 tokens: thread li stages
//      token vec4 li % 16 of columns li / 16 + 16 j, so that 8 neighbouring lanes write one 128-byte row
//      of xs (no bank conflict) and the product reads it the same way; tokens >= n and columns >= cols
//      are staged as 0;
//   2. decodes W[its BM rows][block b] into ws as [column][row]: thread (r = li % BM, h = li / BM), h < 2,
//      writes the 32 columns of half h of row r. Sparse (CODEC 0): ws is zeroed first (16-byte stores,
//      then a barrier), then the thread stores the 16 kept weights of the rotated mask half h of
//      spmv.wgsl's GPU layout (columns (rot + 32 h + p) & 63) in spmv's walk order, value = scale *
//      (2 code - 15), exact in f32. Dense: columns 32 h .. 32 h + 31, zeros included;
//   3. multiplies: thread (m = li / 16, q = li % 16) accumulates rows TM m .. TM m + TM - 1 of the tile
//      for tokens 4 q .. 4 q + 3 over the block's 64 columns, in column order (deterministic): per
//      column one 16-byte x load and TM / 4 W loads at fixed offsets, and 4 TM FMAs.
// The sparse records and the x values of block b + 1 are loaded into registers before the product of
// block b, so that their memory latency overlaps it. W values of padding columns (sparse top-up
// weights, q4 padding) meet staged zeros.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      p0:  array<u32>  sparse: masks (2 words a record, spmv.wgsl's layout); f32 / f16:
//                                          the weights, rows of params.a values (f16 in pairs, low half
//                                          first); q4: the code rows, params.a 32-column chunks (4 words)
//   2  storage, read      p1:  array<u32>  sparse: codes (4 words a record); q4: f16 scale pairs,
//                                          params.b words a row
//   3  storage, read      p2:  array<u32>  sparse: rotations (one byte a record)
//   4  storage, read      p3:  array<u32>  sparse: f16 scale pairs, [(tile * params.b + g) * 32 + lane]
//   5  storage, read      x:   array<f32>  [n, cols]
//   6  storage, read_write y:   array<f32>  [n, y_cols]; the chunk's rows at row0 ..
//   7  storage, read      res: array<f32>  like y, read only when RESIDUAL == 1
// Unused planes are bound to any buffer.
// Workgroup: 256 threads; workgroup memory 16 KiB (xs) + 4 KiB * TM (ws): 48 KiB at TM = 8, 32 KiB at 4.
// Dispatch: row_groups * ceil(n / 64) workgroups, (x, y) with id = x + y * num_workgroups.x when over
// 65535; row group id % row_groups, token tile id / row_groups (neighbours share the x tile).
// Every loop runs a count fixed before it starts and every index stays inside its binding (the launcher
// checks the shapes), so the launcher builds this kernel without wgpu's loop bounding.
// Features: none.

struct Params {
    rows: u32,       // rows of this chunk
    cols: u32,       // columns of W = length of an x row
    row0: u32,       // index of the chunk's first row in a y row
    y_cols: u32,     // length of a y row (all rows of W)
    n: u32,          // x rows (tokens)
    row_groups: u32, // workgroups along the chunk's rows: ceil(rows / BM)
    blocks: u32,     // 64-column blocks: ceil(cols / 64)
    a: u32,          // sparse: 32-row tiles in the chunk; f32 / f16: stored row length; q4: chunks a row
    b: u32,          // sparse: scale groups a row; q4: scale words a row
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override CODEC: u32 = 0u;        // 0 sparse, 1 f32, 2 f16, 3 q4
override TM: u32 = 8u;           // rows per thread: 4 or 8
override GROUP_BLOCKS: u32 = 2u; // sparse: 64-column blocks per scale group
override GROUP_CHUNKS: u32 = 1u; // q4: 32-column chunks per scale group
override RESIDUAL: u32 = 0u;
const BN: u32 = 64u;             // tokens per workgroup
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> p0: array<u32>;
@group(0) @binding(2) var<storage, read> p1: array<u32>;
@group(0) @binding(3) var<storage, read> p2: array<u32>;
@group(0) @binding(4) var<storage, read> p3: array<u32>;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;

var<workgroup> xs: array<vec4<f32>, 1024>;     // [64 columns][16 token vec4s]
var<workgroup> ws: array<vec4<f32>, TM * 256u>; // [64 columns][BM rows] as vec4s of 4 rows

// One block of the sparse layout for thread (r, h): its mask half, the half's two code words, the
// block's rotation and scale. `live` is false for rows past the chunk's last tile.
struct Record {
    mask: u32,
    c0: u32,
    c1: u32,
    rot: u32,
    scale: f32,
    live: bool,
}

// x[the thread's 4 staging tokens][its staging column li / 16 + 16 j] for j = 0 .. 3.
struct Staged {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
}

// Where the thread's 4 staging tokens start in x (their rows times cols), and which of them exist.
struct Tokens {
    base: vec4<u32>,
    live: vec4<bool>,
}

fn bm() -> u32 {
    return 16u * TM;
}

fn staging_tokens(tok0: u32, li: u32) -> Tokens {
    let t = vec4<u32>(tok0 + 4u * (li % 16u)) + vec4<u32>(0u, 1u, 2u, 3u);
    let live = t < vec4<u32>(params.n);
    return Tokens(select(vec4<u32>(0u), t * params.cols, live), live);
}

fn x_vec(tk: Tokens, c: u32) -> vec4<f32> {
    if c >= params.cols {
        return vec4<f32>(0.0);
    }
    let v = vec4<f32>(x[tk.base.x + c], x[tk.base.y + c], x[tk.base.z + c], x[tk.base.w + c]);
    return select(vec4<f32>(0.0), v, tk.live);
}

fn load_x(tk: Tokens, b: u32, li: u32) -> Staged {
    let c = b * 64u + li / 16u;
    return Staged(x_vec(tk, c), x_vec(tk, c + 16u), x_vec(tk, c + 32u), x_vec(tk, c + 48u));
}

fn store_x(s: Staged, li: u32) {
    xs[li] = s.v0;
    xs[li + 256u] = s.v1;
    xs[li + 512u] = s.v2;
    xs[li + 768u] = s.v3;
}

fn put(col: u32, r: u32, v: f32) {
    let i = col * bm() + r;
    ws[i / 4u][i % 4u] = v;
}

fn load_record(rg: u32, b: u32, r: u32, h: u32) -> Record {
    let tile = rg * (bm() / 32u) + r / 32u;
    if h >= 2u || tile >= params.a {
        return Record(0u, 0u, 0u, 0u, 0.0, false);
    }
    let lane = r % 32u;
    let rec = (tile * params.blocks + b) * 32u + lane;
    let rot = (p2[rec / 4u] >> ((rec % 4u) * 8u)) & 31u;
    let si = (tile * params.b + b / GROUP_BLOCKS) * 32u + lane;
    let scale = unpack2x16float(p3[si / 2u])[si % 2u];
    return Record(p0[2u * rec + h], p1[4u * rec + 2u * h], p1[4u * rec + 2u * h + 1u], rot, scale, true);
}

// The levels 2c - 15 of codes j and j + 4 of word w, as in spmv.wgsl.
fn levels(w: u32, j: u32) -> vec2<f32> {
    let l = (((w >> (4u * j)) << 1u) & 0x001E001Eu) | 0x64006400u;
    return unpack2x16float(l) - vec2<f32>(1039.0);
}

// Eight steps of the walk (codes of word w), from the mask's highest set bit down.
fn walk8(mask: u32, w: u32, base: u32, r: u32, scale: f32) -> u32 {
    var m = mask;
    for (var j = 0u; j < 4u; j++) {
        let v = levels(w, j) * scale;
        var p = firstLeadingBit(m);
        m ^= 1u << p;
        put((base + p) & 63u, r, v.x);
        p = firstLeadingBit(m);
        m ^= 1u << p;
        put((base + p) & 63u, r, v.y);
    }
    return m;
}

// The kept weights of the thread's half into the zeroed ws.
fn decode_sparse(rec: Record, r: u32, h: u32) {
    if h < 2u && rec.live {
        let base = rec.rot + 32u * h;
        let m = walk8(rec.mask, rec.c0, base, r, rec.scale);
        walk8(m, rec.c1, base, r, rec.scale);
    }
}

// Dense codecs: the 32 columns of half h of block b, row r of the tile, straight from memory.
fn decode_dense(rg: u32, b: u32, r: u32, h: u32) {
    if h >= 2u {
        return;
    }
    let row = rg * bm() + r;
    let c0 = b * 64u + 32u * h;
    if CODEC == 3u {
        let k32 = c0 / 32u;
        var words = vec4<u32>(0u);
        var scale = 0.0;
        if row < params.rows && k32 < params.a {
            let i = (row * params.a + k32) * 4u;
            words = vec4<u32>(p0[i], p0[i + 1u], p0[i + 2u], p0[i + 3u]);
            let g = k32 / GROUP_CHUNKS;
            scale = unpack2x16float(p1[row * params.b + g / 2u])[g % 2u];
        }
        for (var p = 0u; p < 32u; p++) {
            let code = (words[p / 8u] >> (4u * (p % 8u))) & 15u;
            put(32u * h + p, r, scale * (2.0 * f32(code) - 15.0));
        }
        return;
    }
    for (var p = 0u; p < 32u; p += 2u) {
        let c = c0 + p;
        var v = vec2<f32>(0.0);
        if row < params.rows && c < params.cols {
            let i = row * params.a + c;
            if CODEC == 2u {
                v = unpack2x16float(p0[i / 2u]);
            } else {
                // f32 rows hold a multiple of 8 values: c + 1 is inside the row (padding is 0).
                v = vec2<f32>(bitcast<f32>(p0[i]), bitcast<f32>(p0[i + 1u]));
            }
        }
        put(32u * h + p, r, v.x);
        put(32u * h + p + 1u, r, v.y);
    }
}

fn store_row(r: u32, t0: u32, v: vec4<f32>) {
    if r >= params.rows {
        return;
    }
    for (var e = 0u; e < 4u; e++) {
        let t = t0 + e;
        if t < params.n {
            let i = t * params.y_cols + params.row0 + r;
            var s = v[e];
            if RESIDUAL == 1u {
                s += res[i];
            } else if RESIDUAL == 2u {
                s += y[i];
            }
            y[i] = s;
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let id = wg.x + wg.y * nwg.x;
    if id >= params.row_groups * ((params.n + BN - 1u) / BN) {
        return;
    }
    let rg = id % params.row_groups;
    let tok0 = (id / params.row_groups) * BN;
    let r = li % bm();
    let h = li / bm();
    let m = li / 16u;
    let q = li % 16u;
    let wrow = bm() / 4u; // vec4s of ws per column
    let wq = m * (TM / 4u);

    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0);

    var rec = Record(0u, 0u, 0u, 0u, 0.0, false);
    if CODEC == 0u && params.blocks > 0u {
        rec = load_record(rg, 0u, r, h);
    }
    let tk = staging_tokens(tok0, li);
    var staged = load_x(tk, 0u, li);
    for (var b = 0u; b < params.blocks; b++) {
        workgroupBarrier();
        store_x(staged, li);
        if CODEC == 0u {
            for (var j = 0u; j < TM; j++) {
                ws[li + 256u * j] = vec4<f32>(0.0);
            }
            workgroupBarrier();
            decode_sparse(rec, r, h);
        } else {
            decode_dense(rg, b, r, h);
        }
        if b + 1u < params.blocks {
            staged = load_x(tk, b + 1u, li);
            if CODEC == 0u {
                rec = load_record(rg, b + 1u, r, h);
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < 64u; k++) {
            let xv = xs[k * 16u + q];
            let wa = ws[k * wrow + wq];
            a0 = fma(vec4<f32>(wa.x), xv, a0);
            a1 = fma(vec4<f32>(wa.y), xv, a1);
            a2 = fma(vec4<f32>(wa.z), xv, a2);
            a3 = fma(vec4<f32>(wa.w), xv, a3);
            if TM == 8u {
                let wb = ws[k * wrow + wq + 1u];
                a4 = fma(vec4<f32>(wb.x), xv, a4);
                a5 = fma(vec4<f32>(wb.y), xv, a5);
                a6 = fma(vec4<f32>(wb.z), xv, a6);
                a7 = fma(vec4<f32>(wb.w), xv, a7);
            }
        }
    }

    let row = rg * bm() + m * TM;
    let t0 = tok0 + 4u * q;
    store_row(row, t0, a0);
    store_row(row + 1u, t0, a1);
    store_row(row + 2u, t0, a2);
    store_row(row + 3u, t0, a3);
    if TM == 8u {
        store_row(row + 4u, t0, a4);
        store_row(row + 5u, t0, a5);
        store_row(row + 6u, t0, a6);
        store_row(row + 7u, t0, a7);
    }
}
