//! The .upg reader and the decoders over arbitrary bytes. Opening gives a file or an error, never a
//! panic; every tensor of a file that opens decodes (row by row, and through the CPU kernels on every
//! SIMD path this machine has) without a panic or an out-of-bounds access (AddressSanitizer), and the
//! kernels accept every tensor the reader accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use upg::cpu::{self, Simd};
use upg::format::{Codec, UpgFile};

/// Decoding is linear in the weights; this keeps one input's work small (a shape cannot lie about its
/// size anyway: the planes must hold every byte it implies).
const MAX_WEIGHTS: usize = 1 << 18;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = UpgFile::from_bytes(data, "fuzz.upg") else {
        return;
    };
    let names: Vec<String> = file.matrix_names().map(String::from).collect();
    for name in &names {
        let t = file.matrix(name).expect("a listed matrix opens");
        let [rows, cols] = t.shape();
        if rows.saturating_mul(cols) > MAX_WEIGHTS {
            continue;
        }
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            t.decode_row(r, &mut row);
            // Scaled codes of finite scales are finite (dense f32 and f16 are stored as given).
            if !matches!(t.codec(), Codec::F32 | Codec::F16) {
                assert!(row.iter().all(|v| v.is_finite()), "{name} row {r}");
            }
        }
        let x = vec![0.5f32; 3 * cols];
        for simd in Simd::available() {
            let mut y = vec![0.0f32; rows];
            cpu::spmv_with(simd, &t, &x[..cols], &mut y).expect("spmv takes a file's tensor");
            let mut ys = vec![0.0f32; 3 * rows];
            cpu::spmm_with(simd, &t, &x, 3, &mut ys).expect("spmm takes a file's tensor");
            let mut dense = vec![0.0f32; rows * cols];
            cpu::decompress_f32_with(simd, &t, &mut dense).expect("decompress takes it");
        }
    }
    for name in file.f32_names() {
        let values = file.f32(name).expect("a listed array opens");
        let shape = file.f32_shape(name).expect("a listed array has a shape");
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
    }
    for name in file.bytes_names() {
        file.bytes(name).expect("a listed blob opens");
    }
});
