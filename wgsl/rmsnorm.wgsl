// rmsnorm: out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps) for n rows of `width` f32 values.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      x:      array<f32>  [n, width], row t at x_offset + t * width
//   2  storage, read      weight: array<f32>  [width]
//   3  storage, read_write out:   array<f32>  [n, width]
// Workgroup: 256 threads, one row; each thread sums a strided slice of the squares, then a tree
// reduction in workgroup memory (fixed order: the result does not depend on scheduling).
// Dispatch: (n, 1, 1); the launcher keeps n <= 65535 (rows are one prefill batch).
// Features: none.

struct Params {
    width: u32,
    n: u32,
    eps: f32,
    x_offset: u32,
}

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) li: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let t = wg.x;
    if t >= params.n {
        return;
    }
    let src = params.x_offset + t * params.width;
    var sum = 0.0;
    for (var i = li; i < params.width; i += WG) {
        let v = x[src + i];
        sum = fma(v, v, sum);
    }
    partial[li] = sum;
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if li < stride {
            partial[li] += partial[li + stride];
        }
    }
    workgroupBarrier();
    let inv = inverseSqrt(partial[0] / f32(params.width) + params.eps);
    let dst = t * params.width;
    for (var i = li; i < params.width; i += WG) {
        out[dst + i] = weight[i] * (x[src + i] * inv);
    }
}
