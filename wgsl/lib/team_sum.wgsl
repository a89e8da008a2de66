// team_sum: the end of a gemv launch, shared by gemv_f16/f32/q4 through `// #include team_sum.wgsl`.
// The 32 lanes of team li / TEAM each hold a part of row i's dot product in `v`; they are summed (a
// butterfly inside aligned groups of min(32, subgroup size) lanes where there are subgroups, then
// workgroup memory, always in the same order) and the team's lane 0 stores row i with the residual
// option. Uses the including kernel's params.rows, params.row0, partial, y, res, TEAM and RESIDUAL.
// It has a barrier: call it from uniform control flow, with sg_size 1 when there are no subgroups.
fn team_store(v_in: f32, li: u32, i: u32, sg_size: u32) {
    var v = v_in;
// #if subgroups
    let width = min(TEAM, sg_size);
    for (var off = width / 2u; off > 0u; off >>= 1u) {
        v += subgroupShuffleXor(v, off);
    }
// #else
    let width = 1u;
// #endif
    partial[li] = v;
    workgroupBarrier();
    if li % TEAM == 0u && i < params.rows {
        var sum = 0.0;
        for (var k = 0u; k < TEAM; k += width) {
            sum += partial[li + k];
        }
        let out = params.row0 + i;
        if RESIDUAL == 1u {
            sum += res[out];
        } else if RESIDUAL == 2u {
            sum += y[out];
        }
        y[out] = sum;
    }
}
