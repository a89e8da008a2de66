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
// Workgroup: 256 threads; thread = 8 consecutive columns of one row (a "unit"), consecutive threads
// along the row so that the stores are contiguous. A kept column finds its code from the number of kept
// columns above it in its rotated half (countOneBits), which is its step in the spmv walk.
// Dispatch: ceil(units / 256) workgroups, (x, y) with id = x + y * num_workgroups.x when over 65535.
// Features: none (f16 output goes through pack2x16float: naga 30 mistypes bitcast<u32>(vec2<f16>)).

struct Params {
    rows: u32,    // rows to write
    cols: u32,    // real columns
    blocks: u32,  // 64-column blocks per row
    groups: u32,  // scale groups per row
    in_row0: u32, // first row to write, counted inside the sparse chunk
    out_row0: u32, // the same row, counted inside the output buffer
    stride: u32,  // output row length in values (multiple of 8)
    units: u32,   // rows * stride / 8
}

override GROUP_BLOCKS: u32 = 2u;
override OUT_F32: bool = false;
const LANES: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> masks: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> rots: array<u32>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<u32>>;

fn pack_pair(a: f32, b: f32) -> u32 {
    return pack2x16float(vec2<f32>(a, b));
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let unit = gid.x + gid.y * nwg.x * 256u;
    if unit >= params.units {
        return;
    }
    let per_row = params.stride / 8u;
    let i = unit / per_row;
    let col0 = (unit - i * per_row) * 8u;
    let b = col0 / 64u;
    let row = params.in_row0 + i;
    let rec = ((row / LANES) * params.blocks + b) * LANES + row % LANES;
    let m = masks[rec];
    let cw = codes[rec];
    let rot = (rots[rec >> 2u] >> ((rec & 3u) * 8u)) & 31u;
    let si = ((row / LANES) * params.groups + b / GROUP_BLOCKS) * LANES + row % LANES;
    let s = unpack2x16float(scales[si >> 1u])[si & 1u];
    var v: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        let q = (col0 + j - b * 64u - rot) & 63u;
        let upper = q >= 32u;
        let half_mask = select(m.x, m.y, upper);
        let t = q & 31u;
        let kept = ((half_mask >> t) & 1u) == 1u && col0 + j < params.cols;
        let step = countOneBits((half_mask >> t) >> 1u);
        let word = select(select(cw.x, cw.y, step >= 8u), select(cw.z, cw.w, step >= 8u), upper);
        let nib = ((step & 7u) >> 1u) + ((step & 1u) << 2u);
        let code = f32((word >> (4u * nib)) & 15u);
        v[j] = select(0.0, fma(code, 2.0 * s, -15.0 * s), kept);
    }
    let o = (params.out_row0 + i) * per_row + col0 / 8u;
    if OUT_F32 {
        out[2u * o] = bitcast<vec4<u32>>(vec4<f32>(v[0], v[1], v[2], v[3]));
        out[2u * o + 1u] = bitcast<vec4<u32>>(vec4<f32>(v[4], v[5], v[6], v[7]));
    } else {
        out[o] = vec4<u32>(pack_pair(v[0], v[1]), pack_pair(v[2], v[3]), pack_pair(v[4], v[5]), pack_pair(v[6], v[7]));
    }
}
