//! Plain scalar kernels, written for clarity: the reference every fast kernel (SIMD, GPU) is tested
//! against. They decode each row with the codec's own `decode_row` and accumulate in f32 in column
//! order.

use half::f16;

use crate::format::Tensor;

/// Dense f32 copy of `w`, row-major [rows, cols].
pub fn decompress_f32(w: &Tensor) -> Vec<f32> {
    let [rows, cols] = w.shape();
    let mut out = vec![0.0f32; rows * cols];
    if cols > 0 {
        for (r, row) in out.chunks_mut(cols).enumerate() {
            w.decode_row(r, row);
        }
    }
    out
}

/// Dense f16 copy of `w` (each decoded f32 rounded to nearest f16).
pub fn decompress_f16(w: &Tensor) -> Vec<f16> {
    decompress_f32(w).into_iter().map(f16::from_f32).collect()
}

/// y = W x with f32 accumulation in column order.
pub fn spmv(w: &Tensor, x: &[f32], y: &mut [f32]) {
    let [rows, cols] = w.shape();
    assert_eq!(
        x.len(),
        cols,
        "x has {} entries, W has {cols} columns",
        x.len()
    );
    assert_eq!(
        y.len(),
        rows,
        "y has {} entries, W has {rows} rows",
        y.len()
    );
    let mut row = vec![0.0f32; cols];
    for (r, yr) in y.iter_mut().enumerate() {
        w.decode_row(r, &mut row);
        *yr = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}
