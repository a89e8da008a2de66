// workgroup_reduce: a tree reduction over a workgroup of REDUCE_WG threads, shared by attention and
// attention_combine through `// #include workgroup_reduce.wgsl`. It has barriers: call it from uniform
// control flow.

const REDUCE_WG: u32 = 128u;

var<workgroup> reduce: array<f32, REDUCE_WG>;

// The max (is_max) or sum of x over the workgroup; every thread gets the result.
fn reduce_all(li: u32, x: f32, is_max: bool) -> f32 {
    workgroupBarrier();
    reduce[li] = x;
    for (var stride = REDUCE_WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if li < stride {
            let o = reduce[li + stride];
            reduce[li] = select(reduce[li] + o, max(reduce[li], o), is_max);
        }
    }
    workgroupBarrier();
    return reduce[0];
}
