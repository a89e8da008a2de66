// attention_split: first half of the attention of one decoded row (n = 1) over a long KV cache, split
// over the keys (flash-decoding): each workgroup takes one chunk of keys of one kv head and writes, for
// each query head that shares the kv head, the chunk's partial softmax: its max score m, its sum
// l = sum_j exp(s_j - m) and the unnormalised output o = sum_j exp(s_j - m) v_j.
// attention_combine.wgsl merges the chunks. Keys and chunks as in wgsl/lib/attention_chunks.wgsl
// (sliding window included); s_j = q . k_j * scale.
//
// One workgroup serves up to GROUP = 4 query heads of one kv head (the lanes of a vec4), so each key
// and value of a chunk is read once for all of them (Phi-4: 40 heads on 10 kv heads).
//
// ROPE_HALF > 0 (rotary_dim / 2) fuses rope_kv.wgsl's work for the row, saving its launch: q is
// rotated as it is staged, the row's own key and value (position pos, in the last chunk) come from
// qkv (the key rotated) instead of the cache, and the workgroup of the last chunk and a kv head's
// first query group writes them to cache row pos for the next steps. No other workgroup reads row
// pos, so no ordering between workgroups is needed. qkv itself is left unrotated.
//
// Bindings (group 0):
//   0  uniform            params:   Params (below)
//   1  storage, read      qkv:      array<f32>  [qkv_dim]; q head h at h * head_dim
//   2  storage, read_write k_cache:  array<u32>  [ctx, kv_dim] as f16 pairs (KV_F16 == 1) or f32 bits;
//                                               row pos written when ROPE_HALF > 0
//   3  storage, read_write v_cache:  array<u32>  same
//   4  storage, read_write partials: array<f32>  o: [heads, chunks, head_dim], then (m, l): [heads, chunks, 2]
//   5  storage, read      step:     array<u32>  [1]: the row's position (written once per pass)
//   6  storage, read      cos:      array<f32>  [ctx, ROPE_HALF], read only when ROPE_HALF > 0
//   7  storage, read      sin:      array<f32>  same
// Workgroup: 128 threads. Scores: 8 lanes per key, 16 keys a tile, the 8 partial dot products summed
// in workgroup memory. Values: thread i owns dimension pair i % (head_dim / 2) and every
// (128 / (head_dim / 2))-th key of the tile (head_dim <= 256, even); the key subsets are summed at the end.
// Dispatch: kv_heads * ceil((heads / kv_heads) / 4) * chunks workgroups as (x, y),
// index = x + y * num_workgroups.x, chunk fastest.
// Features: none.

// #include attention_params.wgsl

override KV_F16: u32 = 1u;
override ROPE_HALF: u32 = 0u;
const WG: u32 = 128u;
const LANES: u32 = 8u;
const GROUP: u32 = 4u;
const MAX_HEAD_DIM: u32 = 256u;
const NEG_INF: f32 = -3.4028235e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
@group(0) @binding(5) var<storage, read> step: array<u32>;
@group(0) @binding(6) var<storage, read> cos_t: array<f32>;
@group(0) @binding(7) var<storage, read> sin_t: array<f32>;

// The row's position (step[0]).
var<private> pos: u32;

// q[d]: dimension d of the workgroup's query heads, scaled; lanes past its heads are 0.
var<workgroup> q: array<vec4<f32>, MAX_HEAD_DIM>;
// Partial dot products of the scores, then the output sums of the key subsets (x and y of a pair).
var<workgroup> part_x: array<vec4<f32>, WG>;
var<workgroup> part_y: array<vec4<f32>, WG>;
var<workgroup> scores: array<vec4<f32>, CHUNK_TILE>;
var<workgroup> probs: array<vec4<f32>, CHUNK_TILE>;

// Dimension d of the head at qkv[base ..], rotated for position pos (rotate-half: pairs (i, i + half)
// for i < half; dimensions past 2 half pass through).
fn rotated(base: u32, d: u32) -> f32 {
    let v = qkv[base + d];
    if d < ROPE_HALF {
        let i = pos * ROPE_HALF + d;
        return v * cos_t[i] - qkv[base + d + ROPE_HALF] * sin_t[i];
    }
    if d < 2u * ROPE_HALF {
        let i = pos * ROPE_HALF + d - ROPE_HALF;
        return v * cos_t[i] + qkv[base + d - ROPE_HALF] * sin_t[i];
    }
    return v;
}

// The row's own key and value, dimensions d and d + 1 of the kv head at element offset `off`.
fn own_key2(off: u32, d: u32) -> vec2<f32> {
    let base = params.heads * params.head_dim + off;
    return vec2<f32>(rotated(base, d), rotated(base, d + 1u));
}

fn own_value2(off: u32, d: u32) -> vec2<f32> {
    let base = (params.heads + params.kv_heads) * params.head_dim + off + d;
    return vec2<f32>(qkv[base], qkv[base + 1u]);
}

// Dimensions d and d + 1 (d even) of cache row `row` from element offset `off`.
fn key2(row: u32, off: u32, d: u32) -> vec2<f32> {
    if ROPE_HALF > 0u && row == pos {
        return own_key2(off, d);
    }
    let e = row * params.kv_dim + off + d;
    if KV_F16 == 1u {
        return unpack2x16float(k_cache[e / 2u]);
    }
    return vec2<f32>(bitcast<f32>(k_cache[e]), bitcast<f32>(k_cache[e + 1u]));
}

fn value2(row: u32, off: u32, d: u32) -> vec2<f32> {
    if ROPE_HALF > 0u && row == pos {
        return own_value2(off, d);
    }
    let e = row * params.kv_dim + off + d;
    if KV_F16 == 1u {
        return unpack2x16float(v_cache[e / 2u]);
    }
    return vec2<f32>(bitcast<f32>(v_cache[e]), bitcast<f32>(v_cache[e + 1u]));
}

fn query(h: u32, last: u32, d: u32) -> f32 {
    if h >= last {
        return 0.0;
    }
    if ROPE_HALF > 0u {
        return rotated(h * params.head_dim, d) * params.scale;
    }
    return qkv[h * params.head_dim + d] * params.scale;
}

// Cache row pos of kv head offset `off`: the row's rotated key and its value (ROPE_HALF > 0).
fn store_own(off: u32, li: u32) {
    for (var d = 2u * li; d < params.head_dim; d += 2u * WG) {
        let k = own_key2(off, d);
        let v = own_value2(off, d);
        let e = pos * params.kv_dim + off + d;
        if KV_F16 == 1u {
            k_cache[e / 2u] = pack2x16float(k);
            v_cache[e / 2u] = pack2x16float(v);
        } else {
            k_cache[e] = bitcast<u32>(k.x);
            k_cache[e + 1u] = bitcast<u32>(k.y);
            v_cache[e] = bitcast<u32>(v.x);
            v_cache[e + 1u] = bitcast<u32>(v.y);
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let id = wg.x + wg.y * nwg.x;
    let group = params.heads / params.kv_heads;
    let qgroups = (group + GROUP - 1u) / GROUP;
    let c = id % params.count;
    let rest = id / params.count;
    let g = rest / qgroups;
    let h0 = g * group + (rest % qgroups) * GROUP;
    pos = step[0];
    let plan = chunks_of(pos);
    // Uniform per workgroup: whole workgroups leave before any barrier.
    if g >= params.kv_heads || c >= plan.count {
        return;
    }
    if ROPE_HALF > 0u && c + 1u == plan.count && rest % qgroups == 0u {
        store_own(g * params.head_dim, li);
    }
    let last = min(h0 + GROUP, (g + 1u) * group);
    let begin = plan.first + c * plan.per;
    let end = min(begin + plan.per, plan.end);
    let hd = params.head_dim;
    let off = g * hd;
    for (var d = li; d < hd; d += WG) {
        q[d] = vec4<f32>(query(h0, last, d), query(h0 + 1u, last, d), query(h0 + 2u, last, d),
            query(h0 + 3u, last, d));
    }

    let pairs = hd / 2u;
    let pair = li % pairs;
    let subset = li / pairs;
    let subsets = WG / pairs;
    let key = li / LANES;
    let lane = li % LANES;
    var m = vec4<f32>(NEG_INF);
    var l = vec4<f32>(0.0);
    var acc_x = vec4<f32>(0.0);
    var acc_y = vec4<f32>(0.0);
    for (var tile0 = begin; tile0 < end; tile0 += CHUNK_TILE) {
        workgroupBarrier();
        let j = tile0 + key;
        var dot = vec4<f32>(0.0);
        if j < end {
            for (var w = lane; w < pairs; w += LANES) {
                let k = key2(j, off, 2u * w);
                dot = fma(q[2u * w], vec4<f32>(k.x), fma(q[2u * w + 1u], vec4<f32>(k.y), dot));
            }
        }
        part_x[li] = dot;
        workgroupBarrier();
        if lane == 0u {
            var s = part_x[li];
            for (var i = 1u; i < LANES; i++) {
                s += part_x[li + i];
            }
            scores[key] = select(vec4<f32>(NEG_INF), s, j < end);
        }
        workgroupBarrier();
        var tile_max = scores[0];
        for (var i = 1u; i < CHUNK_TILE; i++) {
            tile_max = max(tile_max, scores[i]);
        }
        let m_new = max(m, tile_max);
        if li < CHUNK_TILE {
            probs[li] = select(vec4<f32>(0.0), exp(scores[li] - m_new), tile0 + li < end);
        }
        let corr = exp(m - m_new);
        m = m_new;
        l *= corr;
        acc_x *= corr;
        acc_y *= corr;
        workgroupBarrier();
        let keys = min(CHUNK_TILE, end - tile0);
        for (var i = 0u; i < keys; i++) {
            l += probs[i];
        }
        if subset < subsets {
            for (var i = subset; i < keys; i += subsets) {
                let p = probs[i];
                let v = value2(tile0 + i, off, 2u * pair);
                acc_x = fma(p, vec4<f32>(v.x), acc_x);
                acc_y = fma(p, vec4<f32>(v.y), acc_y);
            }
        }
    }

    workgroupBarrier();
    part_x[li] = acc_x;
    part_y[li] = acc_y;
    workgroupBarrier();
    let ml = params.heads * params.count * hd;
    for (var h = h0; h < last; h++) {
        let lane_h = h - h0;
        let row = h * params.count + c;
        if subset == 0u {
            var x = 0.0;
            var y = 0.0;
            for (var s = 0u; s < subsets; s++) {
                x += part_x[s * pairs + pair][lane_h];
                y += part_y[s * pairs + pair][lane_h];
            }
            partials[row * hd + 2u * pair] = x;
            partials[row * hd + 2u * pair + 1u] = y;
        }
        if li == 0u {
            partials[ml + 2u * row] = m[lane_h];
            partials[ml + 2u * row + 1u] = l[lane_h];
        }
    }
}

// #include attention_chunks.wgsl
