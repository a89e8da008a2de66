//! Writes the seed inputs of the fuzz targets into seeds/: small .upg files with every codec (one
//! with checksums, one made a version 1 file without them so that mutated data reaches the content
//! checks),
//! and the config.json files of the test fixtures and the built-in model.
//!
//! `cargo run --release --example make_seeds` (from fuzz/)

use std::path::Path;

use upg::format::file::{self, Entry};
use upg::format::{Dense, DenseF16, DenseF32, Q3Matrix, Q4Matrix, SparseMatrix, Tensor};
use upg::rng::Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = fuzz.join("..");
    let seeds = fuzz.join("seeds");
    std::fs::create_dir_all(seeds.join("upg_file"))?;
    std::fs::create_dir_all(seeds.join("config"))?;

    let mut rng = Rng::new(1);
    let mut dense = |rows: usize, cols: usize| (rows, cols, rng.weights(rows * cols));
    let (sr, sc, sw) = dense(3, 130);
    let (qr, qc, qw) = dense(2, 40);
    let (tr, tc, tw) = dense(2, 70);
    let (hr, hc, hw) = dense(2, 5);
    let (fr, fc, fw) = dense(1, 3);
    let sparse = Tensor::Sparse(SparseMatrix::encode(&Dense::f32(sr, sc, &sw)?, 128, None)?);
    let q4 = Tensor::Q4(Q4Matrix::encode(&Dense::f32(qr, qc, &qw)?, 32)?);
    let q3 = Tensor::Q3(Q3Matrix::encode(&Dense::f32(tr, tc, &tw)?, Q3Matrix::DEFAULT_GROUP)?);
    let f16 = Tensor::F16(DenseF16::encode(&Dense::f32(hr, hc, &hw)?)?);
    let f32 = Tensor::F32(DenseF32::encode(&Dense::f32(fr, fc, &fw)?)?);
    let norm = [1.0f32, -2.0, 0.5, 4.0];
    let entries = [
        ("up", Entry::Matrix(&sparse)),
        ("head", Entry::Matrix(&q4)),
        ("q3", Entry::Matrix(&q3)),
        ("embed", Entry::Matrix(&f16)),
        ("tiny", Entry::Matrix(&f32)),
        ("norm", Entry::F32 { shape: &[2, 2], data: &norm }),
        ("tokenizer.json", Entry::Bytes(b"{}")),
    ];
    let metadata = [("upg.model.config".to_string(), "{}".to_string())].into();
    let path = seeds.join("upg_file/all_codecs.upg");
    file::write(&path, &entries, &metadata)?;
    let bytes = std::fs::read(&path)?;
    let text = String::from_utf8_lossy(&bytes[..64.min(bytes.len())]).into_owned();
    println!("{}: {} bytes ({text:?}...)", path.display(), bytes.len());
    // As a version 1 file (no checksums): the same length, so the layout stands, and mutated data
    // reaches the content checks and the decoders instead of stopping at a checksum.
    let unchecked = replace(&bytes, b"\"upg.checksums\"", b"\"upg.checksumz\"");
    let unchecked = replace(
        &unchecked,
        b"\"upg.format_version\":\"2\"",
        b"\"upg.format_version\":\"1\"",
    );
    std::fs::write(seeds.join("upg_file/all_codecs_unchecked.upg"), unchecked)?;
    file::write(seeds.join("upg_file/empty.upg"), &[], &Default::default())?;

    for (from, to) in [
        ("tests/fixtures/phi3-tiny/config.json", "phi3-tiny.json"),
        ("tests/fixtures/phi3-tiny/config_transformers5.json", "phi3-tiny-t5.json"),
        ("tests/fixtures/phi3-tiny-longrope/config.json", "longrope.json"),
        ("tests/fixtures/phi3-tiny-longrope/config_transformers5.json", "longrope-t5.json"),
        ("models/tiny-fortunes/config.json", "tiny-fortunes.json"),
    ] {
        std::fs::copy(root.join(from), seeds.join("config").join(to))?;
    }
    Ok(())
}

fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if let Some(at) = bytes.windows(from.len()).position(|w| w == from) {
        out[at..at + to.len()].copy_from_slice(to);
    }
    out
}
