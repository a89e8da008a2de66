// spmv_combine: the end of a column-split spmv (COL_SPLIT > 1 in spmv.wgsl). Adds each output's part
// sums in part order (deterministic), scales them by the RMSNorm factor of the whole x when PROLOGUE ==
// 1, and writes y with the residual option or the SwiGLU pairs epilogue:
//
//   s[r] = sum over parts p of parts[p * params.stride + r]
//   factor = 1 / sqrt(sum over p of parts[params.parts * params.stride + p] / params.cols + EPS)
//            (PROLOGUE == 1; else 1)
//   EPILOGUE == 0: y[r] = factor * s[r] (+ res[r] when RESIDUAL == 1, + y[r] when RESIDUAL == 2)
//   EPILOGUE == 1: y[i] = silu(g) * u, g = factor * s[32 t + j], u = factor * s[32 t + 16 + j]
//                  (i = 16 t + j: rows in the SwiGLU pairs order of src/gpu/matrix.rs)
//
// A second launch, not the last workgroup of spmv: WGSL has no device-scope fence, so one workgroup
// cannot know that the others' stores are visible.
//
// Bindings (group 0):
//   0  uniform            params: Params (below)
//   1  storage, read      parts: array<f32>  [params.parts * params.stride] sums, then params.parts
//                                            sums of squares (PROLOGUE == 1)
//   2  storage, read_write y:     array<f32>  [params.outputs]
//   3  storage, read      res:   array<f32>  read only when RESIDUAL == 1
// Workgroup: 256 threads, one output each.
// Dispatch: ceil(params.outputs / 256) workgroups as (x, y), index = x + y * num_workgroups.x.
// Features: none.

struct Params {
    outputs: u32, // entries of y
    parts: u32,   // COL_SPLIT of the product
    stride: u32,  // rows of the matrix: the distance between parts
    cols: u32,    // columns of the matrix (the norm's mean)
}

override RESIDUAL: u32 = 0u;
override PROLOGUE: u32 = 0u;
override EPILOGUE: u32 = 0u;
override EPS: f32 = 1e-5;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> parts: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> res: array<f32>;

fn row_sum(r: u32) -> f32 {
    var s = 0.0;
    for (var p = 0u; p < params.parts; p++) {
        s += parts[p * params.stride + r];
    }
    return s;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if i >= params.outputs {
        return;
    }
    var factor = 1.0;
    if PROLOGUE == 1u {
        var squares = 0.0;
        for (var p = 0u; p < params.parts; p++) {
            squares += parts[params.parts * params.stride + p];
        }
        factor = inverseSqrt(squares / f32(params.cols) + EPS);
    }
    if EPILOGUE == 1u {
        let r = (i / 16u) * 32u + i % 16u;
        let g = factor * row_sum(r);
        y[i] = g / (1.0 + exp(-g)) * (factor * row_sum(r + 16u));
        return;
    }
    var v = factor * row_sum(i);
    if RESIDUAL == 1u {
        v += res[i];
    } else if RESIDUAL == 2u {
        v += y[i];
    }
    y[i] = v;
}
