// embed: out[out_offset ..][.. cols] = row `row` of a dense weight matrix, decoded to f32 (the token
// embedding lookup; the table stays on the device in its codec).
//
// FROM_TOKEN == 1 takes the row from the device instead: the token id in token[0] (what argmax.wgsl
// wrote), so the next decode pass can be recorded and submitted before that id is read back. The table
// may be split in chunks (binding limit): the launcher runs every chunk, and only the one holding the id
// (row0 <= id < row0 + rows) writes.
//
//   CODEC 0 (f32): w[row * stride + c]
//   CODEC 1 (f16): f16 c of row `row`, rows of `stride` values (two per u32, low half first)
//   CODEC 2 (q4):  scale(row, c / group) * (2 code(row, c) - 15), code c at nibble c % 8 of word c / 8
//   CODEC 3 (q3):  scale(row, c / group) * (2 code(row, c) - 7), codes in gemv_q3.wgsl's layout: `stride`
//                  = 3 n32 words a row, word t of run k at t n32 + k
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      w:      array<u32>  the table chunk holding `row`, in src/gpu/matrix.rs's layout
//   2  storage, read      scales: array<u32>  q4 and q3 only: f16 scale pairs, `scale_words` per row
//   3  storage, read_write out:    array<f32>
//   4  storage, read      token:  array<u32>  FROM_TOKEN only: [0] the token id
// Workgroup: 256 threads, one column each.
// Dispatch: (ceil(cols / 256), 1, 1); cols is a model width, far below 65535 * 256.
// Features: none.

struct Params {
    row: u32,         // row inside this chunk
    cols: u32,
    stride: u32,      // values per row (f32, f16) or u32 code words per row (q4, q3)
    scale_words: u32, // q4, q3: u32 words of scales per row
    group: u32,       // q4, q3: columns per scale
    out_offset: u32,
    row0: u32,        // FROM_TOKEN: first table row of this chunk
    rows: u32,        // FROM_TOKEN: rows in this chunk
}

override CODEC: u32 = 0u;
override FROM_TOKEN: u32 = 0u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> token: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    var row = params.row;
    if FROM_TOKEN == 1u {
        // Unsigned: an id below row0 wraps to a large value and fails the test too.
        row = token[0] - params.row0;
        if row >= params.rows {
            return;
        }
    }
    if c >= params.cols {
        return;
    }
    var v = 0.0;
    if CODEC == 0u {
        v = bitcast<f32>(w[row * params.stride + c]);
    } else if CODEC == 1u {
        let e = row * params.stride + c;
        v = unpack2x16float(w[e / 2u])[e & 1u];
    } else {
        var level = 0.0;
        if CODEC == 2u {
            let word = w[row * params.stride + c / 8u];
            level = 2.0 * f32((word >> (4u * (c % 8u))) & 15u) - 15.0;
        } else {
            let n32 = params.stride / 3u;
            let i = c % 32u;
            let t = select(i / 10u, 0u, i >= 30u);
            let word = w[row * params.stride + t * n32 + c / 32u];
            var code = 0u;
            if i >= 30u {
                // Split codes: bit b in bit 0 (column 30) or 31 (column 31) of word b.
                let bit = select(0u, 31u, i == 31u);
                for (var b = 0u; b < 3u; b++) {
                    code |= ((w[row * params.stride + b * n32 + c / 32u] >> bit) & 1u) << b;
                }
            } else {
                code = (word >> (1u + 3u * (i % 10u))) & 7u;
            }
            level = 2.0 * f32(code) - 7.0;
        }
        let g = c / params.group;
        let s = unpack2x16float(scales[row * params.scale_words + g / 2u])[g & 1u];
        v = s * level;
    }
    out[params.out_offset + c] = v;
}
