// attention_combine: second half of the split attention of one decoded row: merges the per-chunk
// partial softmaxes that attention_split.wgsl wrote into each head's output,
//   M = max_c m_c,  out[h] = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c,
// over the non-empty chunks of wgsl/lib/attention_chunks.wgsl (the same cut as the split's).
//
// Bindings (group 0):
//   0  uniform            params:   Params (below; the same words as attention_split's)
//   1  storage, read      partials: array<f32>  o: [heads, chunks, head_dim], then (m, l): [heads, chunks, 2]
//   2  storage, read_write out:      array<f32>  [heads * head_dim]
//   3  storage, read      step:     array<u32>  [1]: the row's position
// Workgroup: 128 threads, one head: thread i loads chunk i's (m, l) (chunks <= 128), then owns output
// dimensions i and i + 128 (head_dim <= 256).
// Dispatch: heads workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: none.

// #include attention_params.wgsl

const WG: u32 = REDUCE_WG; // one chunk a thread, summed by reduce_all
const NEG_INF: f32 = -3.4028235e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;

var<workgroup> weights: array<f32, WG>;

// #include workgroup_reduce.wgsl

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let h = wg.x + wg.y * nwg.x;
    if h >= params.heads {
        return;
    }
    let count = chunks_of(step[0]).count;
    let hd = params.head_dim;
    let ml = params.heads * params.count * hd;
    let row0 = h * params.count;
    var m = NEG_INF;
    var l = 0.0;
    if li < count {
        m = partials[ml + 2u * (row0 + li)];
        l = partials[ml + 2u * (row0 + li) + 1u];
    }
    let m_all = reduce_all(li, m, true);
    let w = select(0.0, exp(m - m_all), li < count);
    weights[li] = w;
    let l_all = reduce_all(li, w * l, false);
    // Four chunks a step, so that four loads are in flight; past `count` the index stays on the last
    // chunk and the weight is 0.
    for (var d = li; d < hd; d += WG) {
        var acc = vec4<f32>(0.0);
        for (var c = 0u; c < count; c += 4u) {
            let i = min(vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(count - 1u));
            let x = vec4<f32>(partials[(row0 + i.x) * hd + d], partials[(row0 + i.y) * hd + d],
                partials[(row0 + i.z) * hd + d], partials[(row0 + i.w) * hd + d]);
            let w = vec4<f32>(weights[c], select(0.0, weights[i.y], c + 1u < count),
                select(0.0, weights[i.z], c + 2u < count), select(0.0, weights[i.w], c + 3u < count));
            acc = fma(w, x, acc);
        }
        out[h * hd + d] = (acc.x + acc.y + acc.z + acc.w) / l_all;
    }
}

// #include attention_chunks.wgsl
