// spmv: y = W x (+ r) for a UPG sparse matrix (50% balanced sparsity, 4-bit codes) in the GPU layout
// that src/gpu/matrix.rs derives from the file planes at upload. f32 accumulation.
//
//   y[row0 + i] = sum over blocks b of scale(i, b) * sum over kept k of (2 c_k - 15) * x[col_k]
//                 (+ res[row0 + i] when RESIDUAL == 1, + y[row0 + i] when RESIDUAL == 2)
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
// Workgroup: 32 * SLICES threads, one row tile; thread (l = index % 32, slice = index / 32) sums its slice
// of the blocks of row 32 t + l; slices are added in slice order (deterministic).
// x is staged in workgroup memory TILE_BLOCKS blocks at a time: block k of the tile at xs[96 k ..], its 64
// columns followed by its first 32 again, so a rotated half reads 32 consecutive entries.
// Dispatch: one workgroup per row tile, (x, y) with tile = x + y * num_workgroups.x when over 65535.
// Features: none. (An f16 variant would turn codes into values with f16 arithmetic, but naga 30 types
// bitcast<vec2<f16>>(u32) wrongly, so every build uses unpack2x16float, which is as exact.)

struct Params {
    rows: u32,   // rows of this chunk
    blocks: u32, // 64-column blocks per row
    groups: u32, // scale groups per row
    row0: u32,   // index in y of the chunk's first row
    tiles: u32,  // row tiles of 32 in this chunk
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override SLICES: u32 = 8u;
override TILE_BLOCKS: u32 = 64u;
override GROUP_BLOCKS: u32 = 2u;
override RESIDUAL: u32 = 0u;
// Bench experiments (results are wrong unless both are 0): DIAG 1 replaces the mask walk by fixed
// columns, DIAG 2 skips all per-weight work; CODES 1 converts each code alone with an f32 trick.
override DIAG: u32 = 0u;
override CODES: u32 = 0u;
const LANES: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> masks: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rots: array<u32>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;

var<workgroup> xs: array<f32, TILE_BLOCKS * 96u>;
var<workgroup> partial: array<f32, LANES * SLICES>;

// The levels 2c - 15 of codes j and j + 4 of word w. Each nibble lands in bits 1..4 of an f16 whose
// exponent makes it 1024 + 2c; converting to f32 and subtracting 1039 are exact.
fn levels(w: u32, j: u32) -> vec2<f32> {
    if CODES == 1u {
        // 2^23 + 2c as f32 bits, minus 2^23 + 15: exact.
        let a = bitcast<f32>((((w >> (4u * j)) << 1u) & 0x1Eu) | 0x4B000000u) - 8388623.0;
        let b = bitcast<f32>((((w >> (4u * j + 16u)) << 1u) & 0x1Eu) | 0x4B000000u) - 8388623.0;
        return vec2<f32>(a, b);
    }
    let h = (((w >> (4u * j)) << 1u) & 0x001E001Eu) | 0x64006400u;
    return unpack2x16float(h) - vec2<f32>(1039.0);
}

fn top(m: u32, fixed: u32) -> u32 {
    return select(firstLeadingBit(m), fixed, DIAG == 1u);
}

struct Walk {
    ma: u32,
    mb: u32,
    sa: f32,
    sb: f32,
}

// Eight steps of both halves: codes from words wa (half A) and wb (half B), x from xs[base + column].
fn walk8(st: Walk, wa: u32, wb: u32, base: u32) -> Walk {
    var w = st;
    for (var j = 0u; j < 4u; j++) {
        let va = levels(wa, j);
        let vb = levels(wb, j);
        var p = top(w.ma, 2u * j);
        w.ma ^= 1u << p;
        w.sa = fma(va.x, xs[base + p], w.sa);
        var q = top(w.mb, 2u * j);
        w.mb ^= 1u << q;
        w.sb = fma(vb.x, xs[base + 32u + q], w.sb);
        p = top(w.ma, 2u * j + 1u);
        w.ma ^= 1u << p;
        w.sa = fma(va.y, xs[base + p], w.sa);
        q = top(w.mb, 2u * j + 1u);
        w.mb ^= 1u << q;
        w.sb = fma(vb.y, xs[base + 32u + q], w.sb);
    }
    return w;
}

fn block_sum(m: vec2<u32>, c: vec4<u32>, base: u32) -> f32 {
    if DIAG == 2u {
        return f32(m.x ^ m.y ^ c.x ^ c.y ^ c.z ^ c.w) * xs[base];
    }
    var w = Walk(m.x, m.y, 0.0, 0.0);
    w = walk8(w, c.x, c.z, base);
    w = walk8(w, c.y, c.w, base);
    return w.sa + w.sb;
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
    let tile = wg.x + wg.y * nwg.x;
    if tile >= params.tiles {
        return;
    }
    let lane = li % LANES;
    let slice = li / LANES;
    var acc = 0.0;
    for (var t0 = 0u; t0 < params.blocks; t0 += TILE_BLOCKS) {
        let nb = min(TILE_BLOCKS, params.blocks - t0);
        workgroupBarrier();
        for (var i = li; i < nb * 24u; i += LANES * SLICES) {
            let k = i / 24u;
            let o = i - k * 24u;
            let v = x[(t0 + k) * 16u + (o & 15u)];
            let d = k * 96u + o * 4u;
            xs[d] = v.x;
            xs[d + 1u] = v.y;
            xs[d + 2u] = v.z;
            xs[d + 3u] = v.w;
        }
        workgroupBarrier();
        let per = (nb + SLICES - 1u) / SLICES;
        let k0 = min(slice * per, nb);
        let k1 = min(k0 + per, nb);
        if k0 < k1 {
            // One block ahead in registers: the next block's loads are in flight while this one is walked.
            var rec = (tile * params.blocks + t0 + k0) * LANES + lane;
            var m = masks[rec];
            var c = codes[rec];
            var r = rot(rec);
            for (var k = k0; k < k1; k++) {
                let next = rec + select(0u, LANES, k + 1u < k1);
                let m_next = masks[next];
                let c_next = codes[next];
                let r_next = rot(next);
                let s = scale(tile, (t0 + k) / GROUP_BLOCKS, lane);
                acc = fma(s, block_sum(m, c, k * 96u + r), acc);
                rec = next;
                m = m_next;
                c = c_next;
                r = r_next;
            }
        }
    }
    partial[li] = acc;
    workgroupBarrier();
    let row = tile * LANES + lane;
    if slice == 0u && row < params.rows {
        var sum = 0.0;
        for (var s = 0u; s < SLICES; s++) {
            sum += partial[s * LANES + lane];
        }
        let out = params.row0 + row;
        if RESIDUAL == 1u {
            sum += res[out];
        } else if RESIDUAL == 2u {
            sum += y[out];
        }
        y[out] = sum;
    }
}
