// rope_kv: rope.wgsl and kv_store.wgsl in one launch: rotates the query and key heads of n qkv rows
// (rotate-half, dimensions past rotary_dim pass through) and writes the rotated keys and the values to the
// KV cache rows start..start + n, in f16 pairs (KV_F16 == 1) or f32 bits (KV_F16 == 0).
//
//   a' = a cos - b sin,  b' = b cos + a sin,  a = head[i], b = head[i + half], i < half,
//   cos/sin = table[start + t][i]
//
// Each thread owns one pair of adjacent dimensions (2j, 2j + 1) of one head: the cache's f16 words. A
// pair below half rotates itself and its partner pair (2j + half, 2j + 1 + half), so half must be even;
// pairs in [half, rotary_dim) are written by their partner; q heads are rotated in place in qkv, k heads
// too (so qkv holds what rope.wgsl leaves there) and into the cache, v heads are copied.
//
// Bindings (group 0):
//   0  uniform            params:  Params (below)
//   1  storage, read_write qkv:     array<f32>  [n, qkv_dim]; row = [q heads | k heads | v heads]
//   2  storage, read      cos:     array<f32>  [ctx, half]
//   3  storage, read      sin:     array<f32>  [ctx, half]
//   4  storage, read_write k_cache: array<u32>  [ctx, kv_dim] (f16 pairs: [ctx, kv_dim / 2])
//   5  storage, read_write v_cache: array<u32>  same
//   6  storage, read      step:    array<u32>  [1]: start (written once per pass)
// Workgroup: 64 threads, one (row, head, pair) each.
// Dispatch: ceil(n * (heads + 2 kv_heads) * head_dim / 2 / 64) workgroups as (x, y), index = x + y *
// num_workgroups.x.
// Features: none.

struct Params {
    heads: u32,    // query heads
    kv_heads: u32,
    head_dim: u32,
    half: u32,     // rotary_dim / 2, even
    qkv_dim: u32,
    n: u32,
    _pad0: u32,
    _pad1: u32,
}

override KV_F16: u32 = 1u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cos_table: array<f32>;
@group(0) @binding(3) var<storage, read> sin_table: array<f32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(6) var<storage, read> step: array<u32>;

// Dimensions (d, d + 1) of cache row `row` at offset `off` in the row (even).
fn store(is_k: bool, row: u32, off: u32, v: vec2<f32>) {
    let i = row * params.kv_heads * params.head_dim + off;
    if KV_F16 == 1u {
        if is_k {
            k_cache[i / 2u] = pack2x16float(v);
        } else {
            v_cache[i / 2u] = pack2x16float(v);
        }
    } else if is_k {
        k_cache[i] = bitcast<u32>(v.x);
        k_cache[i + 1u] = bitcast<u32>(v.y);
    } else {
        v_cache[i] = bitcast<u32>(v.x);
        v_cache[i + 1u] = bitcast<u32>(v.y);
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = gid.x + gid.y * nwg.x * 64u;
    let pairs = params.head_dim / 2u;
    let rotated = params.heads + params.kv_heads;
    let per_row = (rotated + params.kv_heads) * pairs;
    if id >= params.n * per_row {
        return;
    }
    let t = id / per_row;
    let r = id - t * per_row;
    let head = r / pairs;
    let d = 2u * (r - head * pairs);
    let base = t * params.qkv_dim + head * params.head_dim;
    let row = step[0] + t;
    let is_k = head >= params.heads && head < rotated;
    // The head's offset inside a cache row (k heads and v heads each start at 0).
    let kv_head = select(head - rotated, head - params.heads, is_k);
    let off = kv_head * params.head_dim + d;
    let half = params.half;
    if head < rotated && d < half {
        let tab = row * half + d;
        let c = vec2<f32>(cos_table[tab], cos_table[tab + 1u]);
        let s = vec2<f32>(sin_table[tab], sin_table[tab + 1u]);
        let a = vec2<f32>(qkv[base + d], qkv[base + d + 1u]);
        let b = vec2<f32>(qkv[base + d + half], qkv[base + d + half + 1u]);
        let a2 = a * c - b * s;
        let b2 = b * c + a * s;
        qkv[base + d] = a2.x;
        qkv[base + d + 1u] = a2.y;
        qkv[base + d + half] = b2.x;
        qkv[base + d + half + 1u] = b2.y;
        if is_k {
            store(true, row, off, a2);
            store(true, row, off + half, b2);
        }
        return;
    }
    // Left: pairs past rotary_dim of k heads (q heads keep theirs in place) and every pair of v heads.
    if head < params.heads || (is_k && d < 2u * half) {
        return;
    }
    store(is_k, row, off, vec2<f32>(qkv[base + d], qkv[base + d + 1u]));
}
