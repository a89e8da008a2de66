// sparse_record: one 64-column block of a sparse matrix in spmv.wgsl's GPU layout as the batched
// products (spmm.wgsl, spmm_coop.wgsl) read it, included by both through `// #include
// sparse_record.wgsl`. Uses the including kernel's params.a (32-row tiles of the chunk), params.blocks,
// params.b (scale groups a row), the planes p0 (masks) .. p3 (scales), BM and GROUP_BLOCKS.

// One block for thread (r, h): its mask half, the half's two code words, the block's rotation and
// scale. `live` is false for rows past the chunk's last tile.
struct Record {
    mask: u32,
    c0: u32,
    c1: u32,
    rot: u32,
    scale: f32,
    live: bool,
}

// Block b of row r of row group rg, mask half h.
fn load_record(rg: u32, b: u32, r: u32, h: u32) -> Record {
    let tile = rg * (BM / 32u) + r / 32u;
    if tile >= params.a {
        return Record(0u, 0u, 0u, 0u, 0.0, false);
    }
    let lane = r % 32u;
    let rec = (tile * params.blocks + b) * 32u + lane;
    let rot = (p2[rec / 4u] >> ((rec % 4u) * 8u)) & 31u;
    let si = (tile * params.b + b / GROUP_BLOCKS) * 32u + lane;
    let scale = unpack2x16float(p3[si / 2u])[si % 2u];
    return Record(p0[2u * rec + h], p1[4u * rec + 2u * h], p1[4u * rec + 2u * h + 1u], rot, scale, true);
}

// The levels 2c - 15 of codes j and j + 4 of word w (each nibble doubled into the mantissa of an f16
// of exponent 10, 1024 + 2c, exact in f32), as spmv.wgsl's walk orders them.
fn levels(w: u32, j: u32) -> vec2<f32> {
    let l = (((w >> (4u * j)) << 1u) & 0x001E001Eu) | 0x64006400u;
    return unpack2x16float(l) - vec2<f32>(1039.0);
}
