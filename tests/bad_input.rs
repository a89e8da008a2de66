//! The catalogue of bad inputs: each one gives an error value (never a panic or an abort) whose
//! message names the problem (the file, and the tensor, field or setting) and says what to do. Where a
//! case is tested next to the code it belongs to, the catalogue names that test, and
//! `every_catalogued_test_exists` keeps the names true.
//!
//! | bad input                                              | test |
//! |--------------------------------------------------------|------|
//! | a truncated .upg file (every kind of cut), trailing bytes | format_file.rs `truncated_files_are_refused` |
//! | a .upg file with any single bit flipped                | here: `every_single_bit_flip_of_a_upg_file_is_refused` |
//! | a header claiming more bytes than the file has, or terabytes | format_file.rs `impossible_header_lengths_are_refused`; here: `sizes_claiming_terabytes_are_errors_not_allocations` |
//! | planes whose sizes disagree with the shape, damaged planes | format_file.rs `damaged_files_are_refused_naming_tensor_and_field` |
//! | an unknown format version or codec                     | format_file.rs `files_without_a_supported_version_are_refused`, `damaged_files_are_refused_naming_tensor_and_field` |
//! | a checkpoint folder with a missing shard, a missing tensor, a tensor of the wrong shape or dtype | model_phi3.rs `checkpoint_errors_name_the_problem` |
//! | config.json with missing or absurd fields (0 heads, heads not dividing hidden, ...) | model_phi3.rs `bad_configs_are_refused`; here: `absurd_config_sizes_are_refused`, `a_bad_config_json_names_its_file` |
//! | a missing or corrupt tokenizer.json                    | model_text.rs `missing_tokenizer_is_a_clear_error`; here: `a_corrupt_tokenizer_json_names_its_file` |
//! | a prompt longer than --ctx                             | model_phi3.rs `model_input_errors`; here: `the_generate_example_refuses_what_does_not_fit` |
//! | NaN or infinite weights at conversion                  | here: `non_finite_weights_stop_conversion_and_leave_nothing` |
//! | an output path that cannot be written                  | model_convert.rs `failed_conversions_leave_nothing_behind`, format_file.rs `unusable_paths_give_clear_errors`; here: `a_conversion_that_cannot_be_moved_into_place_leaves_nothing` |
//! | a model larger than the device, a buffer over its largest binding | device_faults.rs `a_model_larger_than_the_device_is_refused_before_upload`, `a_buffer_over_the_largest_binding_is_refused_before_upload`; here: `the_generate_example_refuses_what_does_not_fit` |

mod model_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use model_common::{fixture, TempDir};
use serde_json::{json, Value};
use upg::format::file::{self, Entry};
use upg::format::{Dense, DenseF16, DenseF32, FormatError, Q3Matrix, Q4Matrix, SparseMatrix};
use upg::format::{Tensor, UpgFile};
use upg::model::convert::convert;
use upg::model::{Checkpoint, CodecPlan, Config, ModelError, TextTokenizer, TokenizerError};
use upg::rng::{test_seed, Rng};

/// The test files of this crate that the catalogue names, and the tests it names in each.
const CATALOGUE: &[(&str, &[&str])] = &[
    (
        "format_file.rs",
        &[
            "truncated_files_are_refused",
            "impossible_header_lengths_are_refused",
            "damaged_files_are_refused_naming_tensor_and_field",
            "files_without_a_supported_version_are_refused",
            "unusable_paths_give_clear_errors",
        ],
    ),
    (
        "model_phi3.rs",
        &[
            "checkpoint_errors_name_the_problem",
            "bad_configs_are_refused",
            "model_input_errors",
        ],
    ),
    ("model_text.rs", &["missing_tokenizer_is_a_clear_error"]),
    (
        "model_convert.rs",
        &["failed_conversions_leave_nothing_behind"],
    ),
    (
        "device_faults.rs",
        &[
            "a_model_larger_than_the_device_is_refused_before_upload",
            "a_buffer_over_the_largest_binding_is_refused_before_upload",
        ],
    ),
];

#[test]
fn every_catalogued_test_exists() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    for (file, tests) in CATALOGUE {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for test in *tests {
            assert!(
                text.contains(&format!("#[test]\nfn {test}()")),
                "the catalogue names {file} {test}, which is not a test there"
            );
        }
    }
}

/// A small .upg file with every codec, an f32 array and a byte blob, as the writer makes it.
fn small_file(rng: &mut Rng) -> Vec<u8> {
    let mut weights = |rows: usize, cols: usize| (rows, cols, rng.weights(rows * cols));
    let (s, q, t, h, f) = (
        weights(3, 130),
        weights(2, 40),
        weights(2, 70),
        weights(2, 5),
        weights(1, 3),
    );
    fn d(m: &(usize, usize, Vec<f32>)) -> Dense<'_> {
        Dense::f32(m.0, m.1, &m.2).unwrap()
    }
    let tensors = [
        Tensor::Sparse(SparseMatrix::encode(&d(&s), 64, None).unwrap()),
        Tensor::Q4(Q4Matrix::encode(&d(&q), 32).unwrap()),
        Tensor::Q3(Q3Matrix::encode(&d(&t), Q3Matrix::DEFAULT_GROUP).unwrap()),
        Tensor::F16(DenseF16::encode(&d(&h)).unwrap()),
        Tensor::F32(DenseF32::encode(&d(&f)).unwrap()),
    ];
    let norm = [1.0f32, -2.0, 0.5];
    let names = ["up", "head", "q3", "embed", "tiny"];
    let mut entries: Vec<(&str, Entry)> = names
        .iter()
        .zip(&tensors)
        .map(|(n, t)| (*n, Entry::Matrix(t)))
        .collect();
    entries.push((
        "norm",
        Entry::F32 {
            shape: &[3],
            data: &norm,
        },
    ));
    entries.push(("tokenizer.json", Entry::Bytes(b"{\"model\": {}}")));
    let metadata = [("upg.model.config".to_string(), "{\"a\": 1}".to_string())].into();
    let dir = TempDir::new("small-file");
    let path = dir.0.join("small.upg");
    file::write(&path, &entries, &metadata).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn every_single_bit_flip_of_a_upg_file_is_refused() {
    let mut rng = Rng::new(test_seed("every_single_bit_flip_of_a_upg_file_is_refused"));
    let bytes = small_file(&mut rng);
    let origin = "flipped.upg";
    UpgFile::from_bytes(&bytes, origin).expect("the undamaged file opens");
    // Every bit of the file, header and data: the checksums (CRC-32, which catches every single-bit
    // error) cover the header as well as every tensor.
    let mut damaged = bytes.clone();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for pos in 0..bytes.len() {
        for bit in 0..8 {
            damaged[pos] ^= 1 << bit;
            let err = match UpgFile::from_bytes(&damaged, origin) {
                Ok(_) => panic!("byte {pos} bit {bit} flipped: the file still opens"),
                Err(e) => e,
            };
            damaged[pos] ^= 1 << bit;
            let msg = err.to_string();
            assert!(msg.starts_with(origin), "byte {pos} bit {bit}: {msg}");
            let kind = match &err {
                FormatError::Field { field, .. } => format!("field {field}"),
                FormatError::Header { reason, .. } if reason.contains("checksum") => {
                    "header checksum".into()
                }
                FormatError::Header { .. } => "header".into(),
                FormatError::Version { .. } => "version".into(),
                other => format!("{other:?}"),
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    println!(
        "{} flips of {} bytes refused: {kinds:?}",
        bytes.len() * 8,
        bytes.len()
    );
    // A flip in the data is reported as damage to the tensor it hit.
    let last = bytes.len() - 1;
    damaged[last] ^= 1;
    let msg = UpgFile::from_bytes(&damaged, origin)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("tensor '") && msg.contains("do not match their checksum"),
        "{msg}"
    );
}

/// A safetensors container: the 8-byte header length, the JSON header, then `data`.
fn container(header: &Value, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn sizes_claiming_terabytes_are_errors_not_allocations() {
    const TB: u64 = 1 << 40;
    let meta = json!({"upg.format_version": "1"});
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a header length of a terabyte",
            {
                let mut b = TB.to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            "header length",
        ),
        (
            "a tensor of a terabyte in a file of 8 bytes of data",
            container(
                &json!({"__metadata__": meta, "w": {"dtype": "F32", "shape": [TB / 4], "data_offsets": [0, TB]}}),
                &[0; 8],
            ),
            "truncated",
        ),
        (
            "a shape whose size overflows",
            container(
                &json!({"__metadata__": meta, "w": {"dtype": "F32", "shape": [TB, TB, TB], "data_offsets": [0, 8]}}),
                &[0; 8],
            ),
            "overflows",
        ),
        (
            "a matrix description of a terabyte rows over planes of a few bytes",
            container(
                &json!({
                    "__metadata__": {"upg.format_version": "1", "upg.tensor.w": format!("{{\"codec\":\"f32\",\"shape\":[{TB},2]}}")},
                    "w.values": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
                }),
                &[0; 8],
            ),
            "values",
        ),
        (
            "a sparse matrix of a terabyte columns",
            container(
                &json!({
                    "__metadata__": {"upg.format_version": "1", "upg.tensor.w": format!("{{\"codec\":\"sparse50_q4\",\"shape\":[1,{TB}],\"group\":128}}")},
                    "w.masks": {"dtype": "U64", "shape": [1, 1], "data_offsets": [0, 8]},
                }),
                &[0; 8],
            ),
            "masks",
        ),
    ];
    for (what, bytes, says) in cases {
        let err = UpgFile::from_bytes(&bytes, "lying.upg")
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        let msg = err.to_string();
        println!("{what}: {msg}");
        assert!(
            msg.starts_with("lying.upg") && msg.contains(says),
            "{what}: '{says}' not in {msg}"
        );
    }
}

/// Config fields of impossible size, and RoPE settings whose tables would overflow: errors that name
/// the field, before any size is multiplied or allocated from them.
#[test]
fn absurd_config_sizes_are_refused() {
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("phi3-tiny/config.json")).unwrap())
            .unwrap();
    let huge = json!(1u64 << 50);
    // The fixture rotates 24 of each head's 32 dimensions: 12 factors.
    let longrope = |short: f64| json!({"type": "longrope", "short_factor": vec![short; 12], "long_factor": vec![1.0; 12]});
    let cases: Vec<(Vec<(&str, Value)>, &str)> = vec![
        (vec![("hidden_size", huge.clone())], "hidden_size"),
        (
            vec![("intermediate_size", huge.clone())],
            "intermediate_size",
        ),
        (
            vec![("num_hidden_layers", huge.clone())],
            "num_hidden_layers",
        ),
        (vec![("vocab_size", huge.clone())], "vocab_size"),
        (
            vec![("max_position_embeddings", huge.clone())],
            "max_position_embeddings",
        ),
        (
            vec![("num_attention_heads", huge.clone())],
            "num_attention_heads",
        ),
        (vec![("rope_scaling", longrope(1e-310))], "rope_scaling"),
        (
            vec![
                ("rope_scaling", longrope(1.0)),
                ("original_max_position_embeddings", json!(1)),
            ],
            "original_max_position_embeddings",
        ),
    ];
    for (edits, says) in cases {
        let mut cfg = base.clone();
        for (key, value) in &edits {
            cfg[*key] = value.clone();
        }
        let err = Config::from_json(&cfg.to_string())
            .err()
            .unwrap_or_else(|| panic!("{edits:?}: accepted"));
        let msg = err.to_string();
        println!("{edits:?}: {msg}");
        assert!(msg.contains(says), "{edits:?}: '{says}' not in {msg}");
    }
    // The same settings at sane values are accepted.
    let mut cfg = base.clone();
    cfg["rope_scaling"] = longrope(1.0);
    Config::from_json(&cfg.to_string()).unwrap();
}

#[test]
fn a_bad_config_json_names_its_file() {
    // (what, how config.json's text changes (None: removed), what the error says)
    type Edit = fn(&str) -> Option<String>;
    let cases: [(&str, Edit, &str); 4] = [
        ("missing", |_| None, "config.json"),
        (
            "not JSON",
            |_| Some("{\"hidden_size\": 128,".into()),
            "not a valid config",
        ),
        (
            "a missing field",
            |t| Some(t.replace("\"vocab_size\"", "\"vocab_sighs\"")),
            "vocab_size",
        ),
        (
            "heads that do not divide hidden",
            |t| Some(t.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 3")),
            "num_attention_heads 3",
        ),
    ];
    for (what, edit, says) in cases {
        let dir = TempDir::copy_of("phi3-tiny");
        let path = dir.0.join("config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        match edit(&text) {
            Some(t) => {
                assert_ne!(t, text, "{what}: the fixture's config changed");
                std::fs::write(&path, t).unwrap();
            }
            None => std::fs::remove_file(&path).unwrap(),
        }
        let err = Checkpoint::open(&dir.0).err().unwrap();
        let msg = err.to_string();
        println!("{what}: {msg}");
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(says),
            "{what}: {msg}"
        );
    }
}

#[test]
fn a_corrupt_tokenizer_json_names_its_file() {
    let config = Config::from_file(&fixture("phi3-tiny/config.json")).unwrap();
    let good = std::fs::read(fixture("phi3-tiny/tokenizer.json")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("cut in half", good[..good.len() / 2].to_vec()),
        ("not UTF-8", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("empty", Vec::new()),
        ("a JSON object of another kind", b"{\"model\": 3}".to_vec()),
    ];
    for (what, bytes) in cases {
        let dir = TempDir::copy_of("phi3-tiny");
        let path = dir.0.join("tokenizer.json");
        std::fs::write(&path, bytes).unwrap();
        let err = TextTokenizer::from_dir(&dir.0, &config).err().unwrap();
        let msg = err.to_string();
        println!("{what}: {msg}");
        assert!(
            matches!(err, ModelError::Tokenizer(TokenizerError::Invalid { .. })),
            "{what}: {err:?}"
        );
        assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
    }
}

/// The fixture folder with one value of `tensor` replaced by `value`.
fn checkpoint_with(dir: &Path, tensor: &str, index: usize, value: f32) {
    let bytes = std::fs::read(fixture("phi3-tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let t = tensors.iter_mut().find(|t| t.0 == tensor).unwrap();
    t.2[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d);
            (n.clone(), v.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn non_finite_weights_stop_conversion_and_leave_nothing() {
    let mut rng = Rng::new(test_seed("non_finite_weights_stop_conversion"));
    let c = Config::from_file(&fixture("phi3-tiny/config.json")).unwrap();
    let cases = [
        (
            "model.layers.1.mlp.down_proj.weight",
            c.intermediate_size,
            f32::NAN,
        ),
        (
            "model.layers.0.self_attn.qkv_proj.weight",
            c.hidden_size,
            f32::INFINITY,
        ),
        (
            "model.embed_tokens.weight",
            c.hidden_size,
            f32::NEG_INFINITY,
        ),
        ("model.norm.weight", c.hidden_size, f32::NAN),
    ];
    for (tensor, cols, value) in cases {
        let dir = TempDir::copy_of("phi3-tiny");
        let rows = if tensor.ends_with("norm.weight") {
            1
        } else {
            3
        };
        let (row, col) = (rng.below(rows), rng.below(cols));
        checkpoint_with(&dir.0, tensor, row * cols + col, value);
        let out_dir = TempDir::new("non-finite-out");
        for plan in [CodecPlan::compressed(), CodecPlan::exact()] {
            let out = out_dir.0.join("model.upg");
            let err = convert(&dir.0, &out, &plan, |_| {}).err().unwrap();
            let msg = err.to_string();
            println!(
                "{tensor} [{row}, {col}] = {value}, {:?}: {msg}",
                plan.linear
            );
            assert!(
                msg.contains(tensor)
                    && msg.contains(&format!("row {row}, column {col}"))
                    && msg.contains(&format!("{value}")),
                "{msg}"
            );
            let left: Vec<_> = std::fs::read_dir(&out_dir.0).unwrap().collect();
            assert!(left.is_empty(), "a failed conversion left {left:?}");
        }
    }
}

#[test]
fn a_conversion_that_cannot_be_moved_into_place_leaves_nothing() {
    // A folder where the output file should go, and a path through a file: neither can be written
    // (even by root, which file permissions do not stop).
    let dir = TempDir::new("unwritable");
    let folder = dir.0.join("model.upg");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(dir.0.join("a-file"), b"x").unwrap();
    for (out, says) in [
        (
            folder.clone(),
            "could not move the finished file into place",
        ),
        (
            dir.0.join("a-file/model.upg"),
            "could not create the output file",
        ),
    ] {
        let err = convert(
            &fixture("phi3-tiny"),
            &out,
            &CodecPlan::compressed(),
            |_| {},
        )
        .err()
        .unwrap();
        let msg = err.to_string();
        println!("{}: {msg}", out.display());
        assert!(
            msg.contains(&out.display().to_string()) && msg.contains(says),
            "{msg}"
        );
        let mut left: Vec<String> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a-file", "model.upg"], "nothing but what was there");
        assert!(std::fs::read_dir(&folder).unwrap().next().is_none());
    }
}

/// target/<profile>/examples/NAME, which `cargo test` builds beside this test's binary in deps/.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples (or `cargo build --release --example {name}`)",
        path.display()
    );
    path
}

/// Runs the generate example; returns whether it succeeded and its stderr.
fn generate(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(example("generate"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_generate_example_refuses_what_does_not_fit() {
    let model = fixture("phi3-tiny");
    let model = model.to_str().unwrap();
    let common = [
        "--model",
        model,
        "--raw",
        "--prompt",
        "one two three four five six",
    ];
    // The prompt is longer than the context.
    let (ok, err) = generate(
        &[&common[..], &["--ctx", "4", "--backend", "cpu"]].concat(),
        &[],
    );
    println!("--ctx 4: {err}");
    assert!(
        !ok && err.contains("--ctx") && err.contains("KV cache holds 4"),
        "{err}"
    );
    // The model needs more device memory than there is.
    let gpu = [&common[..], &["--backend", "gpu", "--max-tokens", "2"]].concat();
    if upg::gpu::gpu_or_skip(upg::gpu::GpuOptions::default()).is_some() {
        let (ok, err) = generate(&gpu, &[("UPG_DEVICE_MEMORY_MIB", "0")]);
        println!("0 MiB: {err}");
        assert!(!ok && err.contains("UPG_DEVICE_MEMORY_MIB"), "{err}");
        let (ok, err) = generate(&gpu, &[("UPG_DEVICE_MEMORY_MIB", "lots")]);
        assert!(
            !ok && err.contains("UPG_DEVICE_MEMORY_MIB=\"lots\""),
            "{err}"
        );
        // A device of 1 MiB is smaller than the fixture's f32 weights (1.5 MiB).
        let exact = [&gpu[..], &["--codecs", "exact"]].concat();
        let (ok, err) = generate(&exact, &[("UPG_DEVICE_MEMORY_MIB", "1")]);
        println!("1 MiB: {err}");
        assert!(
            !ok && err.contains("does not fit") && err.contains("UPG_DEVICE_MEMORY_MIB"),
            "{err}"
        );
        let (ok, err) = generate(&exact, &[("UPG_DEVICE_MEMORY_MIB", "64")]);
        assert!(ok, "64 MiB: {err}");
    }
}
