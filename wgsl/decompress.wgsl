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
// Workgroup: 256 threads, one tile of 32 rows x 8 blocks (512 columns). Both sides of memory move in
// whole lines: the tile's 256 records are consecutive in the GPU layout (record (t * blocks + b) * 32 + l),
// so thread k loads record k into workgroup memory; then each thread writes 8 "units" of 8 consecutive
// columns, consecutive threads along a row (64 units = 1 KB of f16 per row). A kept column finds its
// code from the number of kept columns above it in its rotated half (countOneBits), its step in the
// spmv walk.
// Dispatch: tiles x ceil(blocks / 8) workgroups over the tiles holding rows in_row0 .. in_row0 + rows,
// (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none (f16 output goes through pack2x16float: naga 30 mistypes bitcast<u32>(vec2<f16>)).

struct Params {
    rows: u32,     // rows to write
    cols: u32,     // real columns
    blocks: u32,   // 64-column blocks per row
    groups: u32,   // scale groups per row
    in_row0: u32,  // first row to write, counted inside the sparse chunk
    out_row0: u32, // the same row, counted inside the output buffer
    stride: u32,   // output row length in values (multiple of 8)
    tile0: u32,    // first tile of the launch: in_row0 / 32
}

override GROUP_BLOCKS: u32 = 2u;
override OUT_F32: bool = false;
const LANES: u32 = 32u;
const TILE_BLOCKS: u32 = 8u;
// Records in workgroup memory at block * 33 + row: the pad puts the 4 blocks a warp reads at once
// in different banks.
const SLOT_BLOCK: u32 = 33u;
const SLOTS: u32 = 264u; // 8 * 33

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> masks: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rots: array<u32>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<u32>>;

var<workgroup> s_masks: array<vec2<u32>, SLOTS>;
var<workgroup> s_codes: array<vec4<u32>, SLOTS>;
// rot in bits 0..5, the scale's f16 bits in 16..31.
var<workgroup> s_meta: array<u32, SLOTS>;

fn pack_pair(a: f32, b: f32) -> u32 {
    return pack2x16float(vec2<f32>(a, b));
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
    if t * LANES >= end {
        return; // past the last tile (the 2D grid's tail): uniform over the workgroup
    }

    // Load: thread k takes record k of the tile's 8 blocks (row k % 32, block b0 + k / 32).
    let l = k % LANES;
    let bl = k / LANES;
    let b = b0 + bl;
    if b < params.blocks {
        let rec = (t * params.blocks + b) * LANES + l;
        let slot = bl * SLOT_BLOCK + l;
        s_masks[slot] = masks[rec];
        s_codes[slot] = codes[rec];
        let rot = (rots[rec >> 2u] >> ((rec & 3u) * 8u)) & 31u;
        let si = (t * params.groups + b / GROUP_BLOCKS) * LANES + l;
        let pair = scales[si >> 1u];
        let sbits = select(pair & 0xffffu, pair >> 16u, (si & 1u) == 1u);
        s_meta[slot] = rot | (sbits << 16u);
    }
    workgroupBarrier();

    // Write: 32 rows x 64 units of 8 columns, 256 units per round, row-major.
    let per_row = params.stride / 8u;
    for (var r = 0u; r < 8u; r++) {
        let u = r * 256u + k;
        let il = u / 64u;
        let ul = u % 64u;
        let row = t * LANES + il;
        let col0 = (b0 * 8u + ul) * 8u;
        if row < first || row >= end || col0 >= params.stride {
            continue;
        }
        let ub = ul / 8u;
        let slot = ub * SLOT_BLOCK + il;
        let m = s_masks[slot];
        let cw = s_codes[slot];
        let info = s_meta[slot];
        let rot = info & 63u;
        let s = unpack2x16float(info >> 16u).x;
        let base = (b0 + ub) * 64u;
        var v: array<f32, 8>;
        for (var j = 0u; j < 8u; j++) {
            let q = (col0 + j - base - rot) & 63u;
            let upper = q >= 32u;
            let half_mask = select(m.x, m.y, upper);
            let tb = q & 31u;
            let kept = ((half_mask >> tb) & 1u) == 1u && col0 + j < params.cols;
            let step = countOneBits((half_mask >> tb) >> 1u);
            let word = select(select(cw.x, cw.y, step >= 8u), select(cw.z, cw.w, step >= 8u), upper);
            let nib = ((step & 7u) >> 1u) + ((step & 1u) << 2u);
            let code = f32((word >> (4u * nib)) & 15u);
            v[j] = select(0.0, fma(code, 2.0 * s, -15.0 * s), kept);
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
