// argmax: the index of the largest of logits[offset .. offset + len] (greedy sampling on the device, so
// a decode step reads back 4 bytes). Ties go to the lowest index; NaN never wins.
//
// Two launches of this file. PHASE 0: workgroup g takes logits g * CHUNK .. (g + 1) * CHUNK and writes its
// winner to best[1 + 2 g] (value bits) and best[2 + 2 g] (index, or 0xFFFFFFFF when the chunk has no
// number). PHASE 1: one workgroup reduces params.groups such pairs and writes the index to best[0]. (One
// workgroup over all of Phi-4's 100352 logits took 155 us on an H100: a thread had ~400 dependent loads.)
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      logits: array<f32>
//   2  storage, read_write best:   array<u32>  [1 + 2 * groups]: the token id, then the chunk winners
// Workgroup: 256 threads; each scans a strided slice of PER values, then a tree reduction in workgroup memory.
// Dispatch: PHASE 0 (ceil(len / CHUNK), 1, 1) or 2D when over 65535; PHASE 1 (1, 1, 1).
// Features: none.

struct Params {
    len: u32,
    offset: u32,
    groups: u32, // chunks of PHASE 0
    _pad0: u32,
}

override PHASE: u32 = 0u;
const WG: u32 = 256u;
const PER: u32 = 4u;
const CHUNK: u32 = WG * PER;
const NONE: u32 = 0xFFFFFFFFu;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> best: array<u32>;

var<workgroup> best_value: array<f32, WG>;
var<workgroup> best_index: array<u32, WG>;

// Whether (v, i) beats (w, j): a number beats NONE; else the larger value, or the lower index of equals.
fn beats(v: f32, i: u32, w: f32, j: u32) -> bool {
    return i != NONE && (j == NONE || v > w || (v == w && i < j));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    var v = 0.0;
    var idx = NONE;
    if PHASE == 0u {
        let g = wg.x + wg.y * nwg.x;
        if g >= params.groups {
            return;
        }
        // Increasing indices per thread, so the first of equal values is kept; NaN fails `beats`'s
        // comparisons only when something is held, so a NaN is replaced by the first number after it.
        for (var k = 0u; k < PER; k++) {
            let i = g * CHUNK + k * WG + li;
            if i < params.len {
                let w = logits[params.offset + i];
                if w == w && beats(w, i, v, idx) {
                    v = w;
                    idx = i;
                }
            }
        }
    } else {
        for (var g = li; g < params.groups; g += WG) {
            let w = bitcast<f32>(best[1u + 2u * g]);
            let i = best[2u + 2u * g];
            if beats(w, i, v, idx) {
                v = w;
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
        if PHASE == 0u {
            let g = wg.x + wg.y * nwg.x;
            best[1u + 2u * g] = bitcast<u32>(best_value[0]);
            best[2u + 2u * g] = best_index[0];
        } else {
            best[0] = select(best_index[0], 0u, best_index[0] == NONE);
        }
    }
}
