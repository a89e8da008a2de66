// attention: causal grouped-query attention of n query rows over the KV cache (batched passes; one
// decoded row goes through attention_split.wgsl + attention_combine.wgsl).
//
// For row t (position p = start + t) and head h, with kv head g = h / (heads / kv_heads):
//   out[t][h] = sum_j softmax_j(q . k_j * scale) v_j  over keys j in first(p) ..= p,
//   first(p) = p + 1 - window when a sliding window is set (window > 0), else 0.
//
// Flash attention. A workgroup owns ROWS "query rows" of one kv head, a query row being a (token,
// head) pair with the heads that share the kv head fastest (Phi-4, 4 heads a kv head: 8 tokens x 4
// heads), so every key and value it stages serves all of them; before, each (token, head) read the
// whole prefix on its own. Keys go by in tiles of KT = 64, from the window start of the block's first
// token to its last token's position (causal: nothing later is read):
//   1. scores: the tile's keys are staged 32 dimensions at a time (8 lanes read one key's 32, so the
//      loads are coalesced) and each thread sums the scores of 4 rows x 4 keys in registers;
//   2. softmax: the scores go to workgroup memory, where WG / ROWS threads per row find the tile's
//      max, keep the row's running max m and sum l, and turn the scores into weights exp(s - m); the
//      output is rescaled by exp(m_old - m_new) when the max grows (online softmax, any context);
//   3. values: staged ROWS / 2 keys at a time (whole rows, coalesced), each thread adds the weighted
//      values into 4 rows x 8 dimensions held in registers.
// Workgroup memory is 32 KiB: the scaled queries [ROWS][hd'] (hd' = head_dim rounded up to 32;
// ROWS * hd' <= 4096), the scores [KT][ROWS], and one key chunk [KT][32] or value chunk
// [ROWS / 2][hd'], which also holds the softmax's partial sums between the two.
// Workgroups run the latest blocks (the most keys) first, so that the short ones fill the tail.
//
// Bindings (group 0):
//   0  uniform            params:  Params (below); count = n
//   1  storage, read      qkv:     array<f32>  [n, qkv_dim]; q head h at h * head_dim
//   2  storage, read      k_cache: array<u32>  [ctx, kv_dim] as f16 pairs (KV_F16 == 1) or f32 bits
//   3  storage, read      v_cache: array<u32>  same
//   4  storage, read_write out:     array<f32>  [n, heads * head_dim]
//   5  storage, read      step:    array<u32>  [1]: start (written once per pass)
// Workgroup: 128 threads. Overrides: KV_F16; ROWS = 32 (head_dim <= 128) or 16 (<= 256).
// Dispatch: kv_heads * ceil(n * (heads / kv_heads) / ROWS) workgroups as (x, y),
// index = x + y * num_workgroups.x, kv head fastest; the extra ones of the grid return.
// Features: none.

// #include attention_params.wgsl

override KV_F16: u32 = 1u;
override ROWS: u32 = 32u;
const WG: u32 = 128u;
const KT: u32 = 64u; // keys a tile
const DC: u32 = 32u; // dimensions a key chunk
const NEG_INF: f32 = -3.4028235e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> step: array<u32>;

// Row r's dimensions 4i .. 4i + 4 at qs[r * hd' / 4 + i], times scale; zero past head_dim.
var<workgroup> qs: array<vec4<f32>, 1024>;
// Scores, then weights: key k's rows 4i .. 4i + 4 at ps[k * ROWS / 4 + (i ^ (k % (ROWS / 4)))]
// (the swizzle spreads both the score writes, a key a lane, and the softmax's reads over the banks).
var<workgroup> ps: array<vec4<f32>, 512>;
// A key chunk: key k's dimensions 4i .. 4i + 4 of the chunk at kv[8k + (i ^ (k % 8))] (spread over
// the banks for the score loop, which reads 16 keys at once); or a value chunk: key k's dimensions
// 4i .. 4i + 4 at kv[k * hd' / 4 + i]; or the softmax's scalars (see `scratch`).
var<workgroup> kv: array<vec4<f32>, 512>;

fn scratch(i: u32) -> f32 {
    return kv[i / 4u][i % 4u];
}

fn set_scratch(i: u32, x: f32) {
    kv[i / 4u][i % 4u] = x;
}

fn cache_word(keys: bool, i: u32) -> u32 {
    if keys {
        return k_cache[i];
    }
    return v_cache[i];
}

// Dimensions d .. d + 4 (d a multiple of 4) of cache row `row` from element offset `off`, 0 past the
// head (head_dim is even: a quad is whole, half, or past it).
fn cache4(keys: bool, row: u32, off: u32, d: u32) -> vec4<f32> {
    let hd = params.head_dim;
    if d >= hd {
        return vec4<f32>(0.0);
    }
    let e = row * params.kv_dim + off + d;
    var lo: vec2<f32>;
    var hi = vec2<f32>(0.0);
    if KV_F16 == 1u {
        lo = unpack2x16float(cache_word(keys, e / 2u));
        if d + 2u < hd {
            hi = unpack2x16float(cache_word(keys, e / 2u + 1u));
        }
    } else {
        lo = vec2<f32>(bitcast<f32>(cache_word(keys, e)), bitcast<f32>(cache_word(keys, e + 1u)));
        if d + 2u < hd {
            hi = vec2<f32>(bitcast<f32>(cache_word(keys, e + 2u)),
                bitcast<f32>(cache_word(keys, e + 3u)));
        }
    }
    return vec4<f32>(lo, hi);
}

fn first_key(pos: u32) -> u32 {
    if params.window > 0u && pos + 1u > params.window {
        return pos + 1u - params.window;
    }
    return 0u;
}

fn query(t: u32, h: u32, d: u32) -> f32 {
    if d >= params.head_dim {
        return 0.0;
    }
    return qkv[t * params.qkv_dim + h * params.head_dim + d] * params.scale;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(local_invocation_index) li: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let id = wg.x + wg.y * nwg.x;
    let group = params.heads / params.kv_heads;
    let total = params.count * group; // query rows of one kv head
    let blocks = (total + ROWS - 1u) / ROWS;
    // Uniform per workgroup: whole workgroups leave before any barrier.
    if id >= blocks * params.kv_heads {
        return;
    }
    let g = id % params.kv_heads;
    let r0 = (blocks - 1u - id / params.kv_heads) * ROWS;
    let start = step[0];
    let hd = params.head_dim;
    let off = g * hd;
    let qw = ((hd + DC - 1u) / DC) * (DC / 4u); // vec4s of a padded head
    let rq = ROWS / 4u; // vec4s of rows a key
    let lo = first_key(start + r0 / group);
    let hi = start + (min(r0 + ROWS, total) - 1u) / group;

    for (var i = li; i < ROWS * qw; i += WG) {
        let r = r0 + i / qw;
        let d = (i % qw) * 4u;
        var q = vec4<f32>(0.0);
        if r < total {
            let t = r / group;
            let h = g * group + r % group;
            q = vec4<f32>(query(t, h, d), query(t, h, d + 1u), query(t, h, d + 2u),
                query(t, h, d + 3u));
        }
        qs[i] = q;
    }

    // Scores: rows 4 rg .. 4 rg + 4, keys kg + 16 j (j < 4).
    let kg = li % 16u;
    let rg = li / 16u;
    // Softmax: row sr, keys sc + tpr i.
    let tpr = WG / ROWS;
    let sr = li / tpr;
    let sc = li % tpr;
    let s_pos = start + (r0 + sr) / group;
    let s_first = first_key(s_pos);
    let s_live = r0 + sr < total;
    var m = NEG_INF;
    var l = 0.0;
    // Values: rows 4 vr .. 4 vr + 4, dimension vec4s vd and vd + qw / 2.
    let half = qw / 2u;
    let vd = li % half;
    let vr = li / half;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);

    for (var tile0 = lo; tile0 <= hi; tile0 += KT) {
        var s0 = vec4<f32>(0.0);
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        var s3 = vec4<f32>(0.0);
        for (var c = 0u; c < qw / 8u; c++) {
            workgroupBarrier();
            for (var i = li; i < KT * 8u; i += WG) {
                let k = i / 8u;
                let d4 = i % 8u;
                var x = vec4<f32>(0.0);
                if tile0 + k <= hi {
                    x = cache4(true, tile0 + k, off, c * DC + d4 * 4u);
                }
                kv[k * 8u + (d4 ^ (k % 8u))] = x;
            }
            workgroupBarrier();
            if rg < rq {
                for (var d4 = 0u; d4 < 8u; d4++) {
                    let kd = kg * 8u + (d4 ^ (kg % 8u));
                    let k0 = kv[kd];
                    let k1 = kv[kd + 128u];
                    let k2 = kv[kd + 256u];
                    let k3 = kv[kd + 384u];
                    let qi = rg * 4u * qw + c * 8u + d4;
                    let q0 = qs[qi];
                    let q1 = qs[qi + qw];
                    let q2 = qs[qi + 2u * qw];
                    let q3 = qs[qi + 3u * qw];
                    s0 += vec4<f32>(dot(q0, k0), dot(q0, k1), dot(q0, k2), dot(q0, k3));
                    s1 += vec4<f32>(dot(q1, k0), dot(q1, k1), dot(q1, k2), dot(q1, k3));
                    s2 += vec4<f32>(dot(q2, k0), dot(q2, k1), dot(q2, k2), dot(q2, k3));
                    s3 += vec4<f32>(dot(q3, k0), dot(q3, k1), dot(q3, k2), dot(q3, k3));
                }
            }
        }
        if rg < rq {
            for (var j = 0u; j < 4u; j++) {
                let k = kg + 16u * j;
                ps[k * rq + (rg ^ (k % rq))] = vec4<f32>(s0[j], s1[j], s2[j], s3[j]);
            }
        }
        workgroupBarrier();

        var tile_max = NEG_INF;
        for (var k = sc; k < KT; k += tpr) {
            let j = tile0 + k;
            if s_live && j >= s_first && j <= s_pos {
                tile_max = max(tile_max, ps[k * rq + ((sr / 4u) ^ (k % rq))][sr % 4u]);
            }
        }
        set_scratch(li, tile_max);
        workgroupBarrier();
        var m_new = m;
        for (var i = 0u; i < tpr; i++) {
            m_new = max(m_new, scratch(sr * tpr + i));
        }
        var sum = 0.0;
        for (var k = sc; k < KT; k += tpr) {
            let j = tile0 + k;
            let at = k * rq + ((sr / 4u) ^ (k % rq));
            var p = 0.0;
            if s_live && j >= s_first && j <= s_pos {
                p = exp(ps[at][sr % 4u] - m_new);
            }
            ps[at][sr % 4u] = p;
            sum += p;
        }
        set_scratch(WG + li, sum);
        workgroupBarrier();
        let corr = exp(m - m_new);
        l *= corr;
        for (var i = 0u; i < tpr; i++) {
            l += scratch(WG + sr * tpr + i);
        }
        m = m_new;
        if sc == 0u {
            set_scratch(2u * WG + sr, corr);
        }
        workgroupBarrier();
        if vr < rq {
            let c0 = scratch(2u * WG + 4u * vr);
            let c1 = scratch(2u * WG + 4u * vr + 1u);
            let c2 = scratch(2u * WG + 4u * vr + 2u);
            let c3 = scratch(2u * WG + 4u * vr + 3u);
            a0 *= c0;
            b0 *= c0;
            a1 *= c1;
            b1 *= c1;
            a2 *= c2;
            b2 *= c2;
            a3 *= c3;
            b3 *= c3;
        }

        let chunk = ROWS / 2u; // keys a value chunk: chunk * qw <= 512
        for (var v0 = 0u; v0 < KT && tile0 + v0 <= hi; v0 += chunk) {
            workgroupBarrier();
            for (var i = li; i < chunk * qw; i += WG) {
                let k = i / qw;
                var x = vec4<f32>(0.0);
                if tile0 + v0 + k <= hi {
                    x = cache4(false, tile0 + v0 + k, off, (i % qw) * 4u);
                }
                kv[i] = x;
            }
            workgroupBarrier();
            if vr < rq {
                for (var k = 0u; k < chunk; k++) {
                    let kk = v0 + k;
                    let p = ps[kk * rq + (vr ^ (kk % rq))];
                    let x = kv[k * qw + vd];
                    let y = kv[k * qw + vd + half];
                    a0 = fma(vec4<f32>(p.x), x, a0);
                    b0 = fma(vec4<f32>(p.x), y, b0);
                    a1 = fma(vec4<f32>(p.y), x, a1);
                    b1 = fma(vec4<f32>(p.y), y, b1);
                    a2 = fma(vec4<f32>(p.z), x, a2);
                    b2 = fma(vec4<f32>(p.z), y, b2);
                    a3 = fma(vec4<f32>(p.w), x, a3);
                    b3 = fma(vec4<f32>(p.w), y, b3);
                }
            }
        }
    }

    workgroupBarrier();
    if sc == 0u {
        set_scratch(sr, l);
    }
    workgroupBarrier();
    if vr < rq {
        for (var i = 0u; i < 4u; i++) {
            let r = r0 + 4u * vr + i;
            if r >= total {
                break;
            }
            var x = a0;
            var y = b0;
            if i == 1u {
                x = a1;
                y = b1;
            } else if i == 2u {
                x = a2;
                y = b2;
            } else if i == 3u {
                x = a3;
                y = b3;
            }
            let inv = 1.0 / scratch(4u * vr + i);
            let t = r / group;
            let h = g * group + r % group;
            let dst = t * params.heads * hd + h * hd;
            for (var e = 0u; e < 4u; e++) {
                let d = vd * 4u + e;
                if d < hd {
                    out[dst + d] = x[e] * inv;
                }
                if d + half * 4u < hd {
                    out[dst + d + half * 4u] = y[e] * inv;
                }
            }
        }
    }
}
