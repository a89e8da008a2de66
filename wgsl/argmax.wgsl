// argmax: the index of the largest of logits[offset .. offset + len] (greedy sampling on the device, so
// a decode step reads back 4 bytes). Ties go to the lowest index; NaN never wins.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      logits: array<f32>
//   2  storage, read_write token:  array<u32>  [1]
// Workgroup: 256 threads; each scans a strided slice, then a tree reduction in workgroup memory. The scan
// loads UNROLL values before comparing any of them: one workgroup is latency-bound, and a loop with one
// load in flight per thread took 155 us over Phi-4's 100352 logits on an H100.
// Dispatch: (1, 1, 1).
// Features: none.

struct Params {
    len: u32,
    offset: u32,
    _pad0: u32,
    _pad1: u32,
}

const WG: u32 = 256u;
const UNROLL: u32 = 16u;

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
    // Thread li visits i = li + WG * k in increasing order, so the first of equal values is kept.
    for (var base = 0u; base < params.len; base += WG * UNROLL) {
        var w: array<f32, UNROLL>;
        for (var k = 0u; k < UNROLL; k++) {
            let i = base + li + WG * k;
            w[k] = select(-3.4028235e38, logits[params.offset + min(i, params.len - 1u)], i < params.len);
        }
        for (var k = 0u; k < UNROLL; k++) {
            let i = base + li + WG * k;
            // `w > v` is false for NaN, so NaN is skipped; the padding value never beats a real one
            // because ties keep the lower index and padding has higher ones.
            if i < params.len && (w[k] > v || (w[k] == v && idx == 0xFFFFFFFFu)) {
                v = w[k];
                idx = i;
            }
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
