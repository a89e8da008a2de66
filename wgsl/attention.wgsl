// attention: causal grouped-query attention of n query rows over the KV cache.
//
// For row t (position p = start + t) and head h, with kv head g = h / (heads / kv_heads):
//   out[t][h] = sum_j softmax_j(q . k_j * scale) v_j  over keys j in first(p) ..= p,
//   first(p) = p + 1 - window when a sliding window is set (window > 0), else 0.
// Keys are visited in tiles of 128 with an online softmax (running max m and sum l; the accumulator is
// rescaled by exp(m_old - m_new) when the max grows), so no score array of context length is needed
// and any context fits.
//
// Bindings (group 0):
//   0  uniform            params:  Params (below)
//   1  storage, read      qkv:     array<f32>  [n, qkv_dim]; q head h at h * head_dim
//   2  storage, read      k_cache: array<u32>  [ctx, kv_dim] as f16 pairs (KV_F16 == 1) or f32 bits
//   3  storage, read      v_cache: array<u32>  same
//   4  storage, read_write out:     array<f32>  [n, heads * head_dim]
//   5  storage, read      step:    array<u32>  [1]: start (written once per pass)
// Workgroup: 128 threads, one (row, head): thread i scores key tile0 + i, then owns output dimensions
// i and i + 128 (head_dim <= 256) while the tile's values are summed.
// Dispatch: (n * heads, 1, 1); the launcher keeps it <= 65535.
// Features: none.

// #include attention_params.wgsl

override KV_F16: u32 = 1u;
const TILE: u32 = REDUCE_WG; // keys per tile: one a thread, summed by reduce_all
const MAX_HEAD_DIM: u32 = 256u;
const NEG_INF: f32 = -3.4028235e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> step: array<u32>;

var<workgroup> q: array<f32, MAX_HEAD_DIM>;
var<workgroup> weights: array<f32, TILE>;

// Dimensions d and d + 1 (d even) of cache row `row` from element offset `off`.
fn key2(row: u32, off: u32, d: u32) -> vec2<f32> {
    let e = row * params.kv_dim + off + d;
    if KV_F16 == 1u {
        return unpack2x16float(k_cache[e / 2u]);
    }
    return vec2<f32>(bitcast<f32>(k_cache[e]), bitcast<f32>(k_cache[e + 1u]));
}

fn value(row: u32, off: u32, d: u32) -> f32 {
    let e = row * params.kv_dim + off + d;
    if KV_F16 == 1u {
        return unpack2x16float(v_cache[e / 2u])[e & 1u];
    }
    return bitcast<f32>(v_cache[e]);
}

// #include workgroup_reduce.wgsl

@compute @workgroup_size(TILE)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x / params.heads;
    let h = wg.x - t * params.heads;
    if t >= params.count {
        return;
    }
    let hd = params.head_dim;
    let off = (h / (params.heads / params.kv_heads)) * hd;
    let pos = step[0] + t;
    var first = 0u;
    if params.window > 0u && pos + 1u > params.window {
        first = pos + 1u - params.window;
    }
    for (var d = li; d < hd; d += TILE) {
        q[d] = qkv[t * params.qkv_dim + h * hd + d];
    }

    var m = NEG_INF;
    var l = 0.0;
    var acc0 = 0.0;
    var acc1 = 0.0;
    for (var tile0 = first; tile0 <= pos; tile0 += TILE) {
        workgroupBarrier();
        let j = tile0 + li;
        var s = NEG_INF;
        if j <= pos {
            var dot = 0.0;
            for (var d = 0u; d < hd; d += 2u) {
                let k = key2(j, off, d);
                dot = fma(q[d], k.x, fma(q[d + 1u], k.y, dot));
            }
            s = dot * params.scale;
        }
        let m_new = max(m, reduce_all(li, s, true));
        let p = select(0.0, exp(s - m_new), j <= pos);
        weights[li] = p;
        let corr = exp(m - m_new);
        l = l * corr + reduce_all(li, p, false);
        m = m_new;
        let keys = min(TILE, pos + 1u - tile0);
        acc0 *= corr;
        acc1 *= corr;
        for (var i = 0u; i < keys; i++) {
            let w = weights[i];
            if li < hd {
                acc0 = fma(w, value(tile0 + i, off, li), acc0);
            }
            if li + TILE < hd {
                acc1 = fma(w, value(tile0 + i, off, li + TILE), acc1);
            }
        }
    }
    let dst = t * params.heads * hd + h * hd;
    if li < hd {
        out[dst + li] = acc0 / l;
    }
    if li + TILE < hd {
        out[dst + li + TILE] = acc1 / l;
    }
}
