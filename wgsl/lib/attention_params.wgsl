// attention_params: the Params of the three attention kernels (attention, attention_split,
// attention_combine), included by each through `// #include attention_params.wgsl`; the launchers fill
// it from one builder (src/gpu/transformer.rs, attention_params). `count` is the query rows of
// attention.wgsl and the key chunks of the split kernels.

struct Params {
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    qkv_dim: u32,
    kv_dim: u32,
    count: u32,
    window: u32,
    scale: f32,
}
