// kv_store: copies the key and value parts of n qkv rows into the KV cache rows start..start + n.
//
// The cache holds f16 pairs (pack2x16float, two dimensions per u32: half the memory and half the
// attention traffic) when KV_F16 == 1, or f32 bit patterns (one per u32: the exact path that is
// compared with Hugging Face) when KV_F16 == 0. pack2x16float needs no shader-f16 feature.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      qkv:     array<f32>  [n, qkv_dim]; k at q_dim, v at q_dim + kv_dim
//   2  storage, read_write k_cache: array<u32>  [ctx, kv_dim] (f16 pairs: [ctx, kv_dim / 2])
//   3  storage, read_write v_cache: array<u32>  same
//   4  storage, read      step:    array<u32>  [1]: start (written once per pass)
// Workgroup: 64 threads, one pair of dimensions of one row each.
// Dispatch: ceil(n * kv_dim / 2 / 64) workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: none.

struct Params {
    q_dim: u32,
    kv_dim: u32,
    qkv_dim: u32,
    n: u32,
}

override KV_F16: u32 = 1u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(4) var<storage, read> step: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = gid.x + gid.y * nwg.x * 64u;
    let pairs = params.kv_dim / 2u;
    if id >= params.n * pairs {
        return;
    }
    let t = id / pairs;
    let d = (id - t * pairs) * 2u;
    let src = t * params.qkv_dim + params.q_dim + d;
    let k = vec2<f32>(qkv[src], qkv[src + 1u]);
    let v = vec2<f32>(qkv[src + params.kv_dim], qkv[src + params.kv_dim + 1u]);
    let row = step[0] + t;
    if KV_F16 == 1u {
        let dst = (row * params.kv_dim + d) / 2u;
        k_cache[dst] = pack2x16float(k);
        v_cache[dst] = pack2x16float(v);
    } else {
        let dst = row * params.kv_dim + d;
        k_cache[dst] = bitcast<u32>(k.x);
        k_cache[dst + 1u] = bitcast<u32>(k.y);
        v_cache[dst] = bitcast<u32>(v.x);
        v_cache[dst + 1u] = bitcast<u32>(v.y);
    }
}
