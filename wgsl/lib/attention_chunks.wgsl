// attention_chunks: the keys one decoded row sees and their split into chunks, shared by
// attention_split and attention_combine through `// #include attention_chunks.wgsl` so that both
// kernels cut the keys at the same places. Uses the including kernel's params.window and params.count.
//
// Row position pos sees keys first ..= pos (first = pos + 1 - window with a sliding window, else 0).
// They are cut into `count` chunks of `per` keys (the last one shorter), `per` a multiple of CHUNK_TILE
// and at least ceil(keys / params.count), so count <= params.count. The dispatch is sized by
// params.count, fixed for a cache, so that the params and bind groups stay the same from token to
// token; workgroups of chunks past `count` have nothing to do.

const CHUNK_TILE: u32 = 16u;

struct Chunks {
    first: u32,
    end: u32,
    per: u32,
    count: u32,
}

fn chunks_of(pos: u32) -> Chunks {
    var first = 0u;
    if params.window > 0u && pos + 1u > params.window {
        first = pos + 1u - params.window;
    }
    let keys = pos + 1u - first;
    let per = (keys + params.count - 1u) / params.count;
    let per_tiles = ((per + CHUNK_TILE - 1u) / CHUNK_TILE) * CHUNK_TILE;
    return Chunks(first, pos + 1u, per_tiles, (keys + per_tiles - 1u) / per_tiles);
}
