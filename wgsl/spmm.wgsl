// spmm: Y = X W^T (+ R) for a batch of n rows of x (prefill), W in any codec (CODEC), f32 accumulation.
//
//   y[t * y_cols + row0 + i] = sum_c W[i, c] * x[t * cols + c]   for t < n and the chunk's rows i
//                              (+ res[same index] when RESIDUAL == 1, + y[same index] when RESIDUAL == 2)
//
// Why dense tiles of a sparse matrix: walking only the kept weights needs one x value from workgroup
// memory per kept weight and token, and workgroup memory gives an SM 32 words per clock against 128
// FMAs: a kept-weight walk stays under a quarter of the FMA rate whatever it does in registers. Here a
// workgroup decodes a [128 rows, 32 columns] tile of W, zeros included, into workgroup memory once for
// 128 tokens, and each thread multiplies 8 rows by 8 tokens in registers: per column four 16-byte loads
// feed 64 FMAs. That is twice the FMAs of the kept weights, at close to the full FMA rate.
//
// A workgroup owns 128 rows of the chunk and 128 tokens. For each 32-column half c of each 64-column
// block b of W (blocks = ceil(cols / 64)) it
//   1. stages x[its tokens][the 32 columns] in xs as [column][token], vec4s of 4 tokens: thread li loads
//      column li % 32 (32 lanes read 128 contiguous bytes) of token vec4s u = li / 32 + 8 j and stores
//      vec4 u of column k at slot k * 32 + (u ^ (k & 7)), so that 8 neighbouring lanes hit 8 different
//      banks both here and in the product; tokens >= n and columns >= cols are staged as 0;
//   2. decodes W[its rows][the 32 columns] into ws as [column][row]: thread (r = li % 128, h = li / 128).
//      Sparse (CODEC 0): ws is zeroed first (16-byte stores, then a barrier); the thread walks half h of
//      row r's rotated block mask in spmv.wgsl's GPU layout (columns (rot + 32 h + p) & 63, 16 kept
//      weights in spmv's walk order, value = scale * (2 code - 15), exact in f32) and stores the weights
//      that fall in half c (each block is walked twice). Dense: columns 16 h .. 16 h + 15 of half c;
//   3. multiplies: thread (m = li / 16, q = li % 16) accumulates rows 4 m .. 4 m + 3 and 64 + 4 m ..
//      64 + 4 m + 3 for tokens 4 q .. 4 q + 3 and 64 + 4 q .. 64 + 4 q + 3, in column order
//      (deterministic).
// W values of padding columns (sparse top-up weights, q4 padding) meet staged zeros.
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
// Workgroup: 256 threads; 32 KiB of workgroup memory (xs and ws, 16 KiB each).
// Dispatch: row_groups * ceil(n / 128) workgroups, (x, y) with id = x + y * num_workgroups.x when over
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
    row_groups: u32, // workgroups along the chunk's rows: ceil(rows / 128)
    blocks: u32,     // 64-column blocks: ceil(cols / 64)
    a: u32,          // sparse: 32-row tiles in the chunk; f32 / f16: stored row length; q4: chunks a row
    b: u32,          // sparse: scale groups a row; q4: scale words a row
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override CODEC: u32 = 0u;        // 0 sparse, 1 f32, 2 f16, 3 q4
override GROUP_BLOCKS: u32 = 2u; // sparse: 64-column blocks per scale group
override GROUP_CHUNKS: u32 = 1u; // q4: 32-column chunks per scale group
override RESIDUAL: u32 = 0u;
const BM: u32 = 128u;            // rows per workgroup
const BN: u32 = 128u;            // tokens per workgroup
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> p0: array<u32>;
@group(0) @binding(2) var<storage, read> p1: array<u32>;
@group(0) @binding(3) var<storage, read> p2: array<u32>;
@group(0) @binding(4) var<storage, read> p3: array<u32>;
@group(0) @binding(5) var<storage, read> x: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;

var<workgroup> xs: array<vec4<f32>, 1024>; // [32 columns][32 token vec4s], swizzled (see the top)
var<workgroup> ws: array<vec4<f32>, 1024>; // [32 columns][32 row vec4s]

fn x_at(t: u32, c: u32) -> f32 {
    if t < params.n && c < params.cols {
        return x[t * params.cols + c];
    }
    return 0.0;
}

fn stage_x(tok0: u32, col0: u32, li: u32) {
    let c = li % 32u;
    let col = col0 + c;
    for (var j = 0u; j < 4u; j++) {
        let u = li / 32u + 8u * j;
        let t = tok0 + 4u * u;
        let v = vec4<f32>(x_at(t, col), x_at(t + 1u, col), x_at(t + 2u, col), x_at(t + 3u, col));
        xs[c * 32u + (u ^ (c & 7u))] = v;
    }
}

// Row r, column k of ws.
fn put(k: u32, r: u32, v: f32) {
    ws[k * 32u + r / 4u][r % 4u] = v;
}

// Block column `col` (0 .. 127, wrapped here) of row r, stored when it lies in half `half`.
fn put_kept(col: u32, r: u32, v: f32, half: u32) {
    let c = col & 63u;
    if c / 32u == half {
        put(c % 32u, r, v);
    }
}

// Eight steps of the walk (codes of word w), from the mask's highest set bit down.
fn walk8(mask: u32, w: u32, base: u32, r: u32, scale: f32, half: u32) -> u32 {
    var m = mask;
    for (var j = 0u; j < 4u; j++) {
        let v = levels(w, j) * scale;
        var p = firstLeadingBit(m);
        m ^= 1u << p;
        put_kept(base + p, r, v.x, half);
        p = firstLeadingBit(m);
        m ^= 1u << p;
        put_kept(base + p, r, v.y, half);
    }
    return m;
}

// The kept weights of the thread's mask half that lie in block half `half`, into the zeroed ws.
fn decode_sparse(rec: Record, r: u32, h: u32, half: u32) {
    if rec.live {
        let base = rec.rot + 32u * h;
        let m = walk8(rec.mask, rec.c0, base, r, rec.scale, half);
        walk8(m, rec.c1, base, r, rec.scale, half);
    }
}

// Dense codecs: columns 16 h .. 16 h + 15 of half `half` of block b, row r of the tile, from memory.
fn decode_dense(rg: u32, b: u32, half: u32, r: u32, h: u32) {
    let row = rg * BM + r;
    let k0 = 16u * h;
    let c0 = b * 64u + 32u * half + k0;
    if CODEC == 3u {
        // The q4 32-column chunk is this half; thread h takes its words 2 h and 2 h + 1.
        let k32 = 2u * b + half;
        var w0 = 0u;
        var w1 = 0u;
        var scale = 0.0;
        if row < params.rows && k32 < params.a {
            let i = (row * params.a + k32) * 4u + 2u * h;
            w0 = p0[i];
            w1 = p0[i + 1u];
            let g = k32 / GROUP_CHUNKS;
            scale = unpack2x16float(p1[row * params.b + g / 2u])[g % 2u];
        }
        for (var p = 0u; p < 8u; p++) {
            let lo = (w0 >> (4u * p)) & 15u;
            let hi = (w1 >> (4u * p)) & 15u;
            put(k0 + p, r, scale * (2.0 * f32(lo) - 15.0));
            put(k0 + 8u + p, r, scale * (2.0 * f32(hi) - 15.0));
        }
        return;
    }
    for (var p = 0u; p < 16u; p += 2u) {
        let c = c0 + p;
        var v = vec2<f32>(0.0);
        if row < params.rows && c < params.cols {
            let i = row * params.a + c;
            if CODEC == 2u {
                v = unpack2x16float(p0[i / 2u]);
            } else {
                // Stored rows hold a multiple of 8 values: c + 1 is inside the row (padding is 0).
                v = vec2<f32>(bitcast<f32>(p0[i]), bitcast<f32>(p0[i + 1u]));
            }
        }
        put(k0 + p, r, v.x);
        put(k0 + p + 1u, r, v.y);
    }
}

fn store(t: u32, r: u32, v: f32) {
    if t < params.n {
        let i = t * params.y_cols + params.row0 + r;
        var s = v;
        if RESIDUAL == 1u {
            s += res[i];
        } else if RESIDUAL == 2u {
            s += y[i];
        }
        y[i] = s;
    }
}

// Row r of the chunk for tokens t0 .. t0 + 3 (lo) and t0 + 64 .. t0 + 67 (hi).
fn store_rows(r: u32, lo: vec4<f32>, hi: vec4<f32>, t0: u32) {
    if r < params.rows {
        for (var e = 0u; e < 4u; e++) {
            store(t0 + e, r, lo[e]);
            store(t0 + 64u + e, r, hi[e]);
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
    let r = li % BM;
    let h = li / BM;
    let m = li / 16u;
    let q = li % 16u;

    var a00 = vec4<f32>(0.0);
    var a01 = vec4<f32>(0.0);
    var a10 = vec4<f32>(0.0);
    var a11 = vec4<f32>(0.0);
    var a20 = vec4<f32>(0.0);
    var a21 = vec4<f32>(0.0);
    var a30 = vec4<f32>(0.0);
    var a31 = vec4<f32>(0.0);
    var a40 = vec4<f32>(0.0);
    var a41 = vec4<f32>(0.0);
    var a50 = vec4<f32>(0.0);
    var a51 = vec4<f32>(0.0);
    var a60 = vec4<f32>(0.0);
    var a61 = vec4<f32>(0.0);
    var a70 = vec4<f32>(0.0);
    var a71 = vec4<f32>(0.0);

    for (var b = 0u; b < params.blocks; b++) {
        var rec = Record(0u, 0u, 0u, 0u, 0.0, false);
        if CODEC == 0u {
            rec = load_record(rg, b, r, h);
        }
        for (var half = 0u; half < 2u; half++) {
            workgroupBarrier();
            stage_x(tok0, b * 64u + 32u * half, li);
            if CODEC == 0u {
                for (var j = 0u; j < 4u; j++) {
                    ws[li + 256u * j] = vec4<f32>(0.0);
                }
                workgroupBarrier();
                decode_sparse(rec, r, h, half);
            } else {
                decode_dense(rg, b, half, r, h);
            }
            workgroupBarrier();
            for (var k = 0u; k < 32u; k++) {
                let sw = q ^ (k & 7u);
                let xa = xs[k * 32u + sw];
                let xb = xs[k * 32u + 16u + sw];
                let wa = ws[k * 32u + m];
                let wb = ws[k * 32u + 16u + m];
            a00 = fma(vec4<f32>(wa.x), xa, a00);
            a01 = fma(vec4<f32>(wa.x), xb, a01);
            a10 = fma(vec4<f32>(wa.y), xa, a10);
            a11 = fma(vec4<f32>(wa.y), xb, a11);
            a20 = fma(vec4<f32>(wa.z), xa, a20);
            a21 = fma(vec4<f32>(wa.z), xb, a21);
            a30 = fma(vec4<f32>(wa.w), xa, a30);
            a31 = fma(vec4<f32>(wa.w), xb, a31);
            a40 = fma(vec4<f32>(wb.x), xa, a40);
            a41 = fma(vec4<f32>(wb.x), xb, a41);
            a50 = fma(vec4<f32>(wb.y), xa, a50);
            a51 = fma(vec4<f32>(wb.y), xb, a51);
            a60 = fma(vec4<f32>(wb.z), xa, a60);
            a61 = fma(vec4<f32>(wb.z), xb, a61);
            a70 = fma(vec4<f32>(wb.w), xa, a70);
            a71 = fma(vec4<f32>(wb.w), xb, a71);
            }
        }
    }

    let row0 = rg * BM;
    let t0 = tok0 + 4u * q;
    store_rows(row0 + 4u * m + 0u, a00, a01, t0);
    store_rows(row0 + 4u * m + 1u, a10, a11, t0);
    store_rows(row0 + 4u * m + 2u, a20, a21, t0);
    store_rows(row0 + 4u * m + 3u, a30, a31, t0);
    store_rows(row0 + 64u + 4u * m + 0u, a40, a41, t0);
    store_rows(row0 + 64u + 4u * m + 1u, a50, a51, t0);
    store_rows(row0 + 64u + 4u * m + 2u, a60, a61, t0);
    store_rows(row0 + 64u + 4u * m + 3u, a70, a71, t0);
}

// #include sparse_record.wgsl
