// argmax: the index of the largest of logits[offset .. offset + len] (greedy sampling on the device, so
// a decode step reads back 4 bytes). Ties go to the lowest index; NaN never wins.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      logits: array<f32>
//   2  storage, read_write token:  array<u32>  [1]
// Workgroup: 256 threads; each scans a strided slice, then a tree reduction in workgroup memory.
// Dispatch: (1, 1, 1).
// Features: none.

struct Params {
    len: u32,
    offset: u32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> token: array<u32>;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;

// Whether (v, i) beats (w, j): larger value, or equal value and lower index.
fn beats(v: f32, i: u32, w: f32, j: u32) -> bool {
    return v > w || (v == w && i < j);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32) {
    var v = -3.4028235e38;
    var idx = 0xFFFFFFFFu;
    for (var i = li; i < params.len; i += WG) {
        let w = logits[params.offset + i];
        // `w >= v` is false for NaN, so NaN is skipped; strided order keeps the first of equals.
        if w > v || (w == v && idx == 0xFFFFFFFFu) {
            v = w;
            idx = i;
        }
    }
    best_value[li] = v;
    best_index[li] = idx;
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if li < stride && beats(best_value[li + stride], best_index[li + stride], best_value[li], best_index[li]) {
            best_value[li] = best_value[li + stride];
            best_index[li] = best_index[li + stride];
        }
    }
    if li == 0u {
        token[0] = select(best_index[0], 0u, best_index[0] == 0xFFFFFFFFu);
    }
}
