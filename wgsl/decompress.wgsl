// decompress: dense copy of a UPG sparse matrix chunk (GPU layout, see spmv.wgsl), f16 or f32.
//
//   out[i, c] = scale(i, c / group) * (2 code - 15) for a kept weight, computed as one
//               fma(code, 2 scale, -15 scale) like the CPU decoder; 0 for pruned weights and for the
//               padding columns cols <= c < stride.
//
// Output: rows of `stride` columns (cols rounded up to 8), row-major; f16 values packed two per u32
// (low half first) when OUT_F32 is false, f32 values otherwise. This is the dense layout that
// gemv_f16.wgsl and gemv_f32.wgsl read.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      masks:  array<vec2<u32>>  as in spmv.wgsl
//   2  storage, read      codes:  array<vec4<u32>>  as in spmv.wgsl
//   3  storage, read      rots:   array<u32>        as in spmv.wgsl
//   4  storage, read      scales: array<u32>        as in spmv.wgsl
//   5  storage, read_write out:   array<vec4<u32>>  f16: 8 values per vec4; f32: 4 values per vec4 (bitcast)
// Workgroup: 256 threads, one half tile (16 rows) x 4 blocks (256 columns). Its 64 records are 4 runs
// of 16 consecutive records in the GPU layout (record (t * blocks + b) * 32 + l): thread k < 64 loads
// record (row k % 16, block k / 16) and walks its kept weights (firstLeadingBit per weight, as spmv
// does), writing each value into a zeroed 16 x 256 f32 tile in workgroup memory (16 KiB, the WebGPU
// minimum); then all threads write the tile out as rows of 8-column units, consecutive threads along a
// row (whole lines). The walk costs ~12 instructions per kept weight, ~6 per output value.
// Dispatch: half tiles x ceil(blocks / 4) workgroups over the half tiles holding rows in_row0 .. in_row0
// + rows, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none (f16 output goes through pack2x16float: naga 30 mistypes bitcast<u32>(vec2<f16>)).

struct Params {
    rows: u32,     // rows to write
    cols: u32,     // real columns
    blocks: u32,   // 64-column blocks per row
    groups: u32,   // scale groups per row
    in_row0: u32,  // first row to write, counted inside the sparse chunk
    out_row0: u32, // the same row, counted inside the output buffer
    stride: u32,   // output row length in values (multiple of 8)
    tile0: u32,    // first half tile (16 rows) of the launch: in_row0 / 16
}

override GROUP_BLOCKS: u32 = 2u;
override OUT_F32: bool = false;
const LANES: u32 = 32u;
const TILE_BLOCKS: u32 = 4u;
const HALF: u32 = 16u;  // rows per workgroup
const ROW: u32 = 256u;  // tile row length (a warp reads one row at a time: no bank conflicts)

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> masks: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rots: array<u32>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<u32>>;

var<workgroup> tile: array<f32, 4096>; // HALF * ROW

fn pack_pair(a: f32, b: f32) -> u32 {
    return pack2x16float(vec2<f32>(a, b));
}

// Writes the kept weights of one rotated mask half (bit q = block column (rot + q0 + q) mod 64) into
// the tile row at `at` (the block's first column): step s, highest set bit first, takes nibble
// (s % 8) / 2 + 4 (s % 2) of code word s / 8 of the half (lo, hi).
fn walk(half_mask: u32, lo: u32, hi: u32, rot: u32, at: u32, s2: f32, s15: f32) {
    var h = half_mask;
    for (var s = 0u; s < 16u; s++) {
        if h == 0u {
            break; // a partial last block keeps fewer
        }
        let q = firstLeadingBit(h);
        h ^= 1u << q;
        let word = select(lo, hi, s >= 8u);
        let code = f32((word >> (4u * (((s & 7u) >> 1u) + ((s & 1u) << 2u)))) & 15u);
        tile[at + ((rot + q) & 63u)] = fma(code, s2, -s15);
    }
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) k: u32,
) {
    let id = wg.x + wg.y * nwg.x;
    let bgroups = (params.blocks + TILE_BLOCKS - 1u) / TILE_BLOCKS;
    let t = params.tile0 + id / bgroups;
    let b0 = (id % bgroups) * TILE_BLOCKS;
    let first = params.in_row0;
    let end = params.in_row0 + params.rows;
    if t * HALF >= end {
        return; // past the last half tile (the 2D grid's tail): uniform over the workgroup
    }
    for (var i = k; i < HALF * ROW; i += 256u) {
        tile[i] = 0.0;
    }
    workgroupBarrier();

    // Walk: thread k < 64 takes row k % 16 of the half tile at block b0 + k / 16.
    let il = k % HALF;
    let row = t * HALF + il; // chunk row
    let l = row % LANES;     // lane of the row in its 32-row tile
    let bl = k / HALF;
    let b = b0 + bl;
    if k < HALF * TILE_BLOCKS && b < params.blocks {
        let rec = ((row / LANES) * params.blocks + b) * LANES + l;
        let m = masks[rec];
        let cw = codes[rec];
        let rot = (rots[rec >> 2u] >> ((rec & 3u) * 8u)) & 31u;
        let si = ((row / LANES) * params.groups + b / GROUP_BLOCKS) * LANES + l;
        let sc = unpack2x16float(scales[si >> 1u])[si & 1u];
        let at = il * ROW + bl * 64u;
        walk(m.x, cw.x, cw.y, rot, at, 2.0 * sc, 15.0 * sc);
        walk(m.y, cw.z, cw.w, rot + 32u, at, 2.0 * sc, 15.0 * sc);
    }
    workgroupBarrier();

    // Write: 16 rows x 32 units of 8 columns, 256 units per round, row-major.
    let per_row = params.stride / 8u;
    for (var r = 0u; r < 2u; r++) {
        let u = r * 256u + k;
        let il = u / 32u;
        let ul = u % 32u;
        let row = t * HALF + il;
        let col0 = b0 * 64u + ul * 8u;
        if row < first || row >= end || col0 >= params.stride {
            continue;
        }
        let at = il * ROW + ul * 8u;
        var v: array<f32, 8>;
        for (var j = 0u; j < 8u; j++) {
            v[j] = tile[at + j];
        }
        let o = (params.out_row0 + row - first) * per_row + col0 / 8u;
        if OUT_F32 {
            out[2u * o] = bitcast<vec4<u32>>(vec4<f32>(v[0], v[1], v[2], v[3]));
            out[2u * o + 1u] = bitcast<vec4<u32>>(vec4<f32>(v[4], v[5], v[6], v[7]));
        } else {
            out[o] = vec4<u32>(pack_pair(v[0], v[1]), pack_pair(v[2], v[3]), pack_pair(v[4], v[5]), pack_pair(v[6], v[7]));
        }
    }
}
