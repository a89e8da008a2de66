// rope: rotates the query and key heads of qkv rows in place (Hugging Face's rotate-half convention):
// in each head, dimension i < half pairs with i + half, where half = rotary_dim / 2; dimensions past
// rotary_dim pass through (partial rotary).
//
//   a' = a cos - b sin,  b' = b cos + a sin,  cos/sin = table[start + t][i]
//
// The tables hold cos and sin already multiplied by LongRoPE's attention scaling (src/model/rope.rs).
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read_write qkv: array<f32>  [n, qkv_dim]; row = [q heads | k heads | v heads]
//   2  storage, read      cos: array<f32>  [ctx, half]
//   3  storage, read      sin: array<f32>  [ctx, half]
//   4  storage, read      step: array<u32> [1]: start, the position of row 0 (written once per pass, so
//                                          the bind group and params stay the same from token to token)
// Workgroup: 64 threads, one (row, head, pair) each; q and k heads are contiguous, so head hh < heads +
// kv_heads starts at hh * head_dim.
// Dispatch: ceil(n * (heads + kv_heads) * half / 64) workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: none.

struct Params {
    heads: u32,    // query heads + key heads
    head_dim: u32,
    half: u32,
    qkv_dim: u32,
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> cos_table: array<f32>;
@group(0) @binding(3) var<storage, read> sin_table: array<f32>;
@group(0) @binding(4) var<storage, read> step: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let id = gid.x + gid.y * nwg.x * 64u;
    let per_row = params.heads * params.half;
    if id >= params.n * per_row {
        return;
    }
    let t = id / per_row;
    let r = id - t * per_row;
    let head = r / params.half;
    let i = r - head * params.half;
    let base = t * params.qkv_dim + head * params.head_dim + i;
    let tab = (step[0] + t) * params.half + i;
    let c = cos_table[tab];
    let s = sin_table[tab];
    let a = qkv[base];
    let b = qkv[base + params.half];
    qkv[base] = a * c - b * s;
    qkv[base + params.half] = b * c + a * s;
}
