//! The .upg file against its specification: what is written reads back bit for bit (here and in
//! Python's `safetensors`), every plane of a written file is mapped in place, and every kind of damage
//! is refused with an error that names the file, the tensor and the field, never a panic.
//!
//! Bad files are assembled by hand (`assemble`), independently of the writer, so that the writer's own
//! checks do not stop us from making them; the same helper makes a good file first, which must open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use serde_json::{json, Map, Value};
use upg::format::file::{self, Entry, MatrixSpec, Plan, UpgFile, UpgWriter};
use upg::format::{
    Codec, Dense, DenseF16, DenseF32, FormatError, Plane, Q3Matrix, Q4Matrix, SparseMatrix, Tensor,
};
use upg::rng::{test_seed, Rng};

/// A folder under the system's temp dir, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("upg-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn encode(rng: &mut Rng, codec: Codec, group: usize, rows: usize, cols: usize) -> Tensor {
    let w = rng.weights(rows * cols);
    let d = Dense::f32(rows, cols, &w).unwrap();
    match codec {
        Codec::Sparse => Tensor::Sparse(SparseMatrix::encode(&d, group, None).unwrap()),
        Codec::F32 => Tensor::F32(DenseF32::encode(&d).unwrap()),
        Codec::F16 => Tensor::F16(DenseF16::encode(&d).unwrap()),
        Codec::Q4 => Tensor::Q4(Q4Matrix::encode(&d, group).unwrap()),
        Codec::Q3 => Tensor::Q3(Q3Matrix::encode(&d, group).unwrap()),
    }
}

/// The container tensors of a matrix, as the format's table specifies them:
/// (suffix, dtype, shape, bytes).
fn planes(t: &Tensor) -> Vec<(&'static str, &'static str, Vec<usize>, &[u8])> {
    match t {
        Tensor::Sparse(m) => {
            let (nb, ng) = (m.blocks_per_row(), m.groups_per_row());
            vec![
                ("masks", "U64", vec![m.rows, nb], m.masks.as_bytes()),
                ("codes", "U8", vec![m.rows, nb, 16], m.codes.as_bytes()),
                ("scales", "F16", vec![m.rows, ng], m.scales.as_bytes()),
            ]
        }
        Tensor::F32(m) => vec![("values", "F32", vec![m.rows, m.cols], m.values.as_bytes())],
        Tensor::F16(m) => vec![("values", "F16", vec![m.rows, m.cols], m.values.as_bytes())],
        Tensor::Q4(m) => {
            let padded = m.cols.div_ceil(m.group) * m.group;
            vec![
                ("codes", "U8", vec![m.rows, padded / 2], m.codes.as_bytes()),
                (
                    "scales",
                    "F16",
                    vec![m.rows, padded / m.group],
                    m.scales.as_bytes(),
                ),
            ]
        }
        // Per 32 columns, three u32 bit planes (12 bytes).
        Tensor::Q3(m) => {
            let padded = m.cols.div_ceil(m.group) * m.group;
            vec![
                (
                    "codes",
                    "U8",
                    vec![m.rows, padded / 32 * 12],
                    m.codes.as_bytes(),
                ),
                (
                    "scales",
                    "F16",
                    vec![m.rows, padded / m.group],
                    m.scales.as_bytes(),
                ),
            ]
        }
    }
}

/// The `upg.tensor.NAME` description of a matrix, written out by hand.
fn description(t: &Tensor) -> String {
    let [rows, cols] = t.shape();
    match t {
        Tensor::Sparse(m) => {
            json!({"codec": "sparse50_q4", "shape": [rows, cols], "group": m.group}).to_string()
        }
        Tensor::Q4(m) => {
            json!({"codec": "q4", "shape": [rows, cols], "group": m.group}).to_string()
        }
        Tensor::Q3(m) => {
            json!({"codec": "q3", "shape": [rows, cols], "group": m.group}).to_string()
        }
        Tensor::F32(_) => json!({"codec": "f32", "shape": [rows, cols]}).to_string(),
        Tensor::F16(_) => json!({"codec": "f16", "shape": [rows, cols]}).to_string(),
    }
}

fn assert_same_matrix(name: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.codec(), b.codec(), "{name}");
    assert_eq!(a.shape(), b.shape(), "{name}");
    assert_eq!(MatrixSpec::of(a), MatrixSpec::of(b), "{name}");
    let (pa, pb) = (planes(a), planes(b));
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(x.2, y.2, "{name}.{} shape", x.0);
        assert!(x.3 == y.3, "{name}.{} differs", x.0);
    }
}

fn is_mapped<T: bytemuck::Pod>(p: &Plane<T>) -> bool {
    matches!(p, Plane::Mapped { .. })
}

fn all_mapped(t: &Tensor) -> bool {
    match t {
        Tensor::Sparse(m) => is_mapped(&m.masks) && is_mapped(&m.codes) && is_mapped(&m.scales),
        Tensor::F32(m) => is_mapped(&m.values),
        Tensor::F16(m) => is_mapped(&m.values),
        Tensor::Q4(m) => is_mapped(&m.codes) && is_mapped(&m.scales),
        Tensor::Q3(m) => is_mapped(&m.codes) && is_mapped(&m.scales),
    }
}

/// Every codec and group the format knows.
const CODECS: &[(Codec, usize)] = &[
    (Codec::Sparse, 64),
    (Codec::Sparse, 128),
    (Codec::F32, 0),
    (Codec::F16, 0),
    (Codec::Q4, 32),
    (Codec::Q4, 64),
    (Codec::Q3, 32),
    (Codec::Q3, 128),
];

/// One row; a partial block; fewer than 32 real columns; odd block counts; several groups.
const SHAPES: &[(usize, usize)] = &[(1, 64), (3, 100), (5, 20), (7, 130), (2, 1), (4, 448)];

#[test]
fn every_codec_round_trips_bit_for_bit_at_odd_shapes() {
    let mut rng = Rng::new(test_seed("file_round_trip"));
    let dir = TempDir::new("round-trip");
    let mut tensors = Vec::new();
    for &(codec, group) in CODECS {
        for &(rows, cols) in SHAPES {
            let name = format!("{}.g{group}.{rows}x{cols}", codec.name());
            tensors.push((name, encode(&mut rng, codec, group, rows, cols)));
        }
    }
    let mut plan = Plan::new();
    for (name, t) in &tensors {
        plan.matrix(name.as_str(), MatrixSpec::of(t));
    }
    plan.metadata("upg.config", r#"{"hidden_size": 64}"#);
    let path = dir.path("codecs.upg");
    let mut w = UpgWriter::create(&path, &plan).unwrap();
    // Any order: the writer places each tensor at its planned offset.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for &i in &order {
        w.put_matrix(&tensors[i].0, &tensors[i].1).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(dir.files(), ["codecs.upg"]);

    let f = UpgFile::open(&path).unwrap();
    let names: Vec<&str> = f.matrix_names().collect();
    let mut want: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, t) in &tensors {
        let back = f.matrix(name).unwrap();
        assert_same_matrix(name, t, &back);
        assert!(all_mapped(&back), "{name}: a plane was copied, not mapped");
        assert_eq!(f.matrix_spec(name).unwrap(), MatrixSpec::of(t));
    }
    assert_eq!(
        f.metadata(),
        &BTreeMap::from([(
            "upg.config".to_string(),
            r#"{"hidden_size": 64}"#.to_string()
        )])
    );
}

/// A small model: matrices in every codec, norm weights and a bias, blobs (one empty), and metadata
/// with characters that need escaping.
struct Model {
    matrices: Vec<(String, Tensor)>,
    arrays: Vec<(String, Vec<usize>, Vec<f32>)>,
    blobs: Vec<(String, Vec<u8>)>,
    metadata: BTreeMap<String, String>,
}

fn model(rng: &mut Rng) -> Model {
    let matrices = vec![
        ("model.embed_tokens.weight", Codec::F16, 0, 11, 96),
        (
            "model.layers.0.self_attn.qkv_proj.weight",
            Codec::Sparse,
            128,
            9,
            96,
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            Codec::Sparse,
            64,
            3,
            130,
        ),
        ("model.layers.0.mlp.down_proj.weight", Codec::F32, 0, 4, 7),
        ("lm_head.weight", Codec::Q4, 32, 11, 96),
    ]
    .into_iter()
    .map(|(n, c, g, r, k)| (n.to_string(), encode(rng, c, g, r, k)))
    .collect();
    let arrays = vec![
        ("model.norm.weight", vec![96]),
        ("model.layers.0.input_layernorm.weight", vec![96]),
        ("model.layers.0.bias", vec![3, 5]),
    ]
    .into_iter()
    .map(|(n, shape): (&str, Vec<usize>)| {
        let len = shape.iter().product();
        (n.to_string(), shape, rng.normal_vec(len, 1.0))
    })
    .collect();
    let tokenizer: Vec<u8> = (0..rng.below(300) + 1)
        .map(|_| rng.below(256) as u8)
        .collect();
    let blobs = vec![
        ("tokenizer.json".to_string(), tokenizer),
        ("empty".to_string(), Vec::new()),
    ];
    let metadata = BTreeMap::from([
        (
            "upg.config".to_string(),
            r#"{"architectures": ["Phi3ForCausalLM"], "hidden_size": 96}"#.to_string(),
        ),
        (
            "upg.chat_template".to_string(),
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n\"{{ m.content }}\" é ✓{% endfor %}"
                .to_string(),
        ),
    ]);
    Model {
        matrices,
        arrays,
        blobs,
        metadata,
    }
}

fn write_model(m: &Model, path: &Path) {
    let mut entries: Vec<(&str, Entry)> = Vec::new();
    for (n, t) in &m.matrices {
        entries.push((n, Entry::Matrix(t)));
    }
    for (n, shape, data) in &m.arrays {
        entries.push((n, Entry::F32 { shape, data }));
    }
    for (n, b) in &m.blobs {
        entries.push((n, Entry::Bytes(b)));
    }
    file::write(path, &entries, &m.metadata).unwrap();
}

#[test]
fn a_model_file_round_trips_and_every_plane_is_aligned() {
    let mut rng = Rng::new(test_seed("file_model"));
    let dir = TempDir::new("model");
    let m = model(&mut rng);
    let path = dir.path("model.upg");
    write_model(&m, &path);

    let f = UpgFile::open(&path).unwrap();
    for (name, t) in &m.matrices {
        let back = f.matrix(name).unwrap();
        assert_same_matrix(name, t, &back);
        assert!(all_mapped(&back), "{name}");
    }
    for (name, shape, data) in &m.arrays {
        let back = f.f32(name).unwrap();
        assert!(is_mapped(&back), "{name}");
        assert_eq!(f.f32_shape(name).unwrap(), shape.as_slice());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(data), "{name}");
    }
    for (name, b) in &m.blobs {
        assert_eq!(f.bytes(name).unwrap(), b.as_slice(), "{name}");
    }
    assert_eq!(f.metadata(), &m.metadata);
    assert_eq!(f.f32_names().count(), m.arrays.len());
    assert_eq!(f.bytes_names().count(), m.blobs.len());

    // The safetensors crate reads the same file on its own; every tensor starts at a file offset
    // that is a multiple of its element size, so a mapped file serves every plane in place.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(data_start % 8, 0);
    let mut expected: Vec<String> = Vec::new();
    for (n, t) in &m.matrices {
        for (suffix, dtype, shape, data) in planes(t) {
            let name = format!("{n}.{suffix}");
            let view = st.tensor(&name).unwrap();
            assert_eq!(view.dtype().to_string(), dtype, "{name}");
            assert_eq!(view.shape(), shape.as_slice(), "{name}");
            assert_eq!(view.data(), data, "{name}");
            let size = view.dtype().bitsize() / 8;
            let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!((offset - data_start) % size, 0, "{name} misaligned");
            expected.push(name);
        }
    }
    for (n, _, _) in &m.arrays {
        expected.push(n.clone());
    }
    for (n, _) in &m.blobs {
        expected.push(n.clone());
    }
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["upg.format_version"], "2");
    for (n, t) in &m.matrices {
        let stored: Value = serde_json::from_str(&meta[&format!("upg.tensor.{n}")]).unwrap();
        let want: Value = serde_json::from_str(&description(t)).unwrap();
        assert_eq!(stored, want, "{n}");
    }
}

/// A tensor of a hand-assembled safetensors file.
#[derive(Clone)]
struct Raw {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The pieces of a hand-assembled file: metadata, tensors in storage order, and a last edit of the
/// JSON header.
#[derive(Clone)]
struct Parts {
    metadata: BTreeMap<String, String>,
    tensors: Vec<Raw>,
    edit: Option<fn(&mut Map<String, Value>)>,
}

impl Parts {
    fn tensor(&mut self, name: &str) -> &mut Raw {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    /// A safetensors file: 8-byte header length, JSON header padded with spaces to a multiple of 8,
    /// tensors back to back in the order given.
    fn assemble(&self) -> Vec<u8> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!(self.metadata));
        let mut offset = 0;
        for t in &self.tensors {
            let end = offset + t.data.len();
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        if let Some(edit) = self.edit {
            edit(&mut header);
        }
        let mut text = Value::Object(header).to_string();
        while !(8 + text.len()).is_multiple_of(8) {
            text.push(' ');
        }
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        for t in &self.tensors {
            bytes.extend_from_slice(&t.data);
        }
        bytes
    }
}

/// A good file made by hand: a blob first, so that the planes after it are not aligned. Format version
/// 1, which has no checksums, so that each damage below reaches the check it is for.
fn hand_made(rng: &mut Rng) -> (Parts, Vec<(String, Tensor)>) {
    let matrices = vec![
        ("mlp.up".to_string(), encode(rng, Codec::Sparse, 64, 3, 100)),
        ("lm_head".to_string(), encode(rng, Codec::Q4, 32, 2, 40)),
        ("embed".to_string(), encode(rng, Codec::F16, 0, 2, 5)),
    ];
    let mut parts = Parts {
        metadata: BTreeMap::from([
            ("upg.format_version".into(), "1".into()),
            ("upg.config".into(), "{}".into()),
        ]),
        tensors: vec![Raw {
            name: "tokenizer.json".into(),
            dtype: "U8".into(),
            shape: vec![3],
            data: b"{}\n".to_vec(),
        }],
        edit: None,
    };
    for (name, t) in &matrices {
        parts
            .metadata
            .insert(format!("upg.tensor.{name}"), description(t));
        for (suffix, dtype, shape, data) in planes(t) {
            parts.tensors.push(Raw {
                name: format!("{name}.{suffix}"),
                dtype: dtype.into(),
                shape,
                data: data.to_vec(),
            });
        }
    }
    let norm: Vec<f32> = rng.normal_vec(100, 1.0);
    parts.tensors.push(Raw {
        name: "norm".into(),
        dtype: "F32".into(),
        shape: vec![100],
        data: bytemuck::cast_slice(&norm).to_vec(),
    });
    (parts, matrices)
}

#[test]
fn a_hand_made_file_opens_and_misaligned_planes_are_copied() {
    let mut rng = Rng::new(test_seed("file_hand_made"));
    let dir = TempDir::new("hand-made");
    let (parts, matrices) = hand_made(&mut rng);
    let path = dir.path("hand.upg");
    std::fs::write(&path, parts.assemble()).unwrap();
    let f = UpgFile::open(&path).unwrap();
    for (name, t) in &matrices {
        assert_same_matrix(name, t, &f.matrix(name).unwrap());
    }
    // The 3-byte blob shifts everything after it off its alignment: the U64 masks cannot be mapped.
    let Tensor::Sparse(m) = f.matrix("mlp.up").unwrap() else {
        panic!("mlp.up is not sparse")
    };
    assert!(!is_mapped(&m.masks));
    assert!(is_mapped(&m.codes), "U8 planes are always aligned");
    assert_eq!(f.bytes("tokenizer.json").unwrap(), b"{}\n");
    assert_eq!(f.f32_shape("norm").unwrap(), &[100]);
    let norm = parts.tensors.iter().find(|t| t.name == "norm").unwrap();
    assert_eq!(f.f32("norm").unwrap().as_bytes(), norm.data.as_slice());
    assert_eq!(f.metadata().len(), 1);
}

/// Opens `bytes` as a file and returns the error, checking it names the file.
fn refuse(dir: &TempDir, bytes: &[u8]) -> FormatError {
    let path = dir.path("bad.upg");
    std::fs::write(&path, bytes).unwrap();
    let err = UpgFile::open(&path).expect_err("a bad file was accepted");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "no path in: {msg}"
    );
    err
}

fn set_u64(data: &mut [u8], i: usize, v: u64) {
    data[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(data: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap())
}

/// One way to damage the hand-made file, and the tensor, field and words the error must have.
struct Damage {
    what: &'static str,
    tensor: &'static str,
    field: &'static str,
    says: &'static str,
    apply: fn(&mut Parts),
}

const DAMAGES: &[Damage] = &[
    Damage {
        what: "a plane with the wrong dtype",
        tensor: "mlp.up",
        field: "masks",
        says: "U32",
        apply: |p| {
            let t = p.tensor("mlp.up.masks");
            t.dtype = "U32".into();
            t.shape[1] *= 2;
        },
    },
    Damage {
        what: "a plane with one column too many",
        tensor: "mlp.up",
        field: "scales",
        says: "shape",
        apply: |p| {
            // One more scale per row: [3, 3] instead of [3, 2].
            let t = p.tensor("mlp.up.scales");
            t.shape[1] += 1;
            t.data.extend(std::iter::repeat_n(0, 2 * t.shape[0]));
        },
    },
    Damage {
        what: "a plane with one row too few",
        tensor: "lm_head",
        field: "codes",
        says: "shape",
        apply: |p| {
            let t = p.tensor("lm_head.codes");
            let row = t.data.len() / t.shape[0];
            t.shape[0] -= 1;
            t.data.truncate(t.data.len() - row);
        },
    },
    Damage {
        what: "a mask keeping 33 weights",
        tensor: "mlp.up",
        field: "masks",
        says: "33",
        apply: |p| set_u64(&mut p.tensor("mlp.up.masks").data, 0, (1 << 33) - 1),
    },
    Damage {
        what: "a mask keeping a weight in the padding",
        tensor: "mlp.up",
        field: "masks",
        says: "padding",
        apply: |p| {
            // Block 1 of row 0 covers columns 64..100: bit 40 is column 104, past the end. Clear
            // one kept bit so that only the padding rule is broken.
            let data = &mut p.tensor("mlp.up.masks").data;
            let m = get_u64(data, 1);
            set_u64(data, 1, (m & (m - 1)) | 1 << 40);
        },
    },
    Damage {
        what: "a NaN scale",
        tensor: "lm_head",
        field: "scales",
        says: "NaN",
        apply: |p| {
            let data = &mut p.tensor("lm_head.scales").data;
            data[2..4].copy_from_slice(&f16::NAN.to_le_bytes());
        },
    },
    Damage {
        what: "an unknown codec",
        tensor: "mlp.up",
        field: "codec",
        says: "sparse50_q3",
        apply: |p| {
            let d = p.metadata.get_mut("upg.tensor.mlp.up").unwrap();
            *d = d.replace("sparse50_q4", "sparse50_q3");
        },
    },
    Damage {
        what: "metadata with more columns than the planes hold",
        tensor: "mlp.up",
        field: "masks",
        says: "[3, 2]",
        apply: |p| {
            let d = p.metadata.get_mut("upg.tensor.mlp.up").unwrap();
            *d = d.replace("[3,100]", "[3,200]");
        },
    },
    Damage {
        what: "metadata with fewer rows than the plane holds",
        tensor: "embed",
        field: "values",
        says: "[1, 5]",
        apply: |p| {
            let d = p.metadata.get_mut("upg.tensor.embed").unwrap();
            *d = d.replace("[2,5]", "[1,5]");
        },
    },
    Damage {
        what: "a shape that is not [rows, cols]",
        tensor: "embed",
        field: "shape",
        says: "[2, 5, 1]",
        apply: |p| {
            let d = p.metadata.get_mut("upg.tensor.embed").unwrap();
            *d = d.replace("[2,5]", "[2,5,1]");
        },
    },
    Damage {
        what: "an empty matrix",
        tensor: "embed",
        field: "shape",
        says: "at least one row",
        apply: |p| {
            let d = p.metadata.get_mut("upg.tensor.embed").unwrap();
            *d = d.replace("[2,5]", "[0,5]");
        },
    },
    Damage {
        what: "a sparse group that is not a multiple of 64",
        tensor: "mlp.up",
        field: "group",
        says: "96",
        apply: |p| {
            let d = p.metadata.get_mut("upg.tensor.mlp.up").unwrap();
            *d = d.replace("\"group\":64", "\"group\":96");
        },
    },
    Damage {
        what: "a group on a codec without scales",
        tensor: "embed",
        field: "group",
        says: "no scales",
        apply: |p| {
            p.metadata.insert(
                "upg.tensor.embed".into(),
                r#"{"codec":"f16","shape":[2,5],"group":32}"#.into(),
            );
        },
    },
    Damage {
        what: "a description that is not JSON",
        tensor: "lm_head",
        field: "metadata",
        says: "not a valid description",
        apply: |p| {
            p.metadata
                .insert("upg.tensor.lm_head".into(), "{codec: q4".into());
        },
    },
    Damage {
        what: "a description with an unknown field",
        tensor: "lm_head",
        field: "metadata",
        says: "bits",
        apply: |p| {
            p.metadata.insert(
                "upg.tensor.lm_head".into(),
                r#"{"codec":"q4","shape":[2,40],"group":32,"bits":3}"#.into(),
            );
        },
    },
    Damage {
        what: "a missing plane",
        tensor: "mlp.up",
        field: "codes",
        says: "missing",
        apply: |p| p.tensors.retain(|t| t.name != "mlp.up.codes"),
    },
    Damage {
        what: "a matrix whose description is missing",
        tensor: "mlp.up.codes",
        field: "dtype",
        says: "belongs to no matrix",
        apply: |p| {
            p.metadata.remove("upg.tensor.mlp.up");
        },
    },
    Damage {
        what: "a dtype safetensors does not know",
        tensor: "norm",
        field: "header",
        says: "F31",
        apply: |p| p.tensor("norm").dtype = "F31".into(),
    },
    Damage {
        what: "a claimed size that overflows",
        tensor: "norm",
        field: "shape",
        says: "overflows",
        apply: |p| {
            p.edit = Some(|h| {
                h["norm"]["shape"] = json!([1u64 << 40, 1u64 << 40, 1u64 << 40]);
            })
        },
    },
    Damage {
        what: "offsets that do not match the shape",
        tensor: "norm",
        field: "data_offsets",
        says: "400 bytes",
        apply: |p| p.edit = Some(|h| h["norm"]["data_offsets"][1] = json!(u64::MAX)),
    },
    Damage {
        what: "a gap between tensors",
        tensor: "norm",
        field: "data_offsets",
        says: "back to back",
        apply: |p| {
            // 8 bytes before the data of the last tensor, which now starts after them.
            let t = p.tensors.last_mut().unwrap();
            t.data.splice(0..0, [0; 8]);
            p.edit = Some(|h| {
                let v = h["norm"]["data_offsets"][0].as_u64().unwrap();
                h["norm"]["data_offsets"][0] = json!(v + 8);
            })
        },
    },
];

#[test]
fn damaged_files_are_refused_naming_tensor_and_field() {
    let mut rng = Rng::new(test_seed("file_damage"));
    let dir = TempDir::new("damage");
    let (good, _) = hand_made(&mut rng);
    for d in DAMAGES {
        let mut parts = good.clone();
        (d.apply)(&mut parts);
        let err = refuse(&dir, &parts.assemble());
        let msg = err.to_string();
        match &err {
            FormatError::Field { tensor, field, .. } => {
                assert_eq!(
                    (tensor.as_str(), field.as_str()),
                    (d.tensor, d.field),
                    "{}: {msg}",
                    d.what
                );
            }
            other => panic!("{}: expected a Field error, got {other:?}", d.what),
        }
        assert!(
            msg.contains(d.says),
            "{}: '{}' not in: {msg}",
            d.what,
            d.says
        );
        println!("{}: {msg}", d.what);
    }
}

#[test]
fn files_without_a_supported_version_are_refused() {
    let mut rng = Rng::new(test_seed("file_version"));
    let dir = TempDir::new("version");
    let (good, _) = hand_made(&mut rng);
    let mut parts = good.clone();
    parts.metadata.remove("upg.format_version");
    let err = refuse(&dir, &parts.assemble());
    assert!(
        matches!(&err, FormatError::Header { reason, .. } if reason.contains("upg.format_version")),
        "{err:?}"
    );
    // A plain safetensors file with no metadata at all.
    let plain = Parts {
        metadata: BTreeMap::new(),
        tensors: good.tensors.clone(),
        edit: Some(|h| {
            h.remove("__metadata__");
        }),
    };
    assert!(matches!(
        refuse(&dir, &plain.assemble()),
        FormatError::Header { .. }
    ));
    for v in ["3", "0", "one", ""] {
        let mut parts = good.clone();
        parts.metadata.insert("upg.format_version".into(), v.into());
        match refuse(&dir, &parts.assemble()) {
            FormatError::Version {
                found, supported, ..
            } => {
                assert_eq!((found.as_str(), supported), (v, 2));
            }
            other => panic!("version {v:?}: {other:?}"),
        }
    }
    // Version 2 always has checksums (the hand-made file is version 1, which has none).
    let mut parts = good.clone();
    parts
        .metadata
        .insert("upg.format_version".into(), "2".into());
    let err = refuse(&dir, &parts.assemble());
    assert!(
        matches!(&err, FormatError::Header { reason, .. } if reason.contains("upg.checksums")),
        "{err:?}"
    );
}

#[test]
fn truncated_files_are_refused() {
    let mut rng = Rng::new(test_seed("file_truncated"));
    let dir = TempDir::new("truncated");
    let m = model(&mut rng);
    let path = dir.path("model.upg");
    write_model(&m, &path);
    let bytes = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut cuts = vec![0, 1, 7, 8, 9, header_end / 2, header_end - 1, header_end];
    cuts.extend([
        header_end + 1,
        (header_end + bytes.len()) / 2,
        bytes.len() - 1,
    ]);
    cuts.extend((0..8).map(|_| rng.below(bytes.len())));
    for cut in cuts {
        let err = refuse(&dir, &bytes[..cut]);
        assert!(
            matches!(err, FormatError::Header { .. }),
            "cut at {cut}: {err:?}"
        );
        if cut >= header_end {
            assert!(err.to_string().contains("truncated"), "{err}");
        }
    }
    // Trailing bytes are damage too.
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    assert!(matches!(refuse(&dir, &longer), FormatError::Header { .. }));
}

#[test]
fn impossible_header_lengths_are_refused() {
    let dir = TempDir::new("header-length");
    for n in [u64::MAX, 1 << 40, 100_000_001, 64] {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}      ");
        assert!(matches!(refuse(&dir, &bytes), FormatError::Header { .. }));
    }
    // Valid JSON that is not an object, and an object with no tensors and no version.
    for text in ["[1, 2, 3]", "\"x\"", "{}"] {
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        assert!(matches!(refuse(&dir, &bytes), FormatError::Header { .. }));
    }
}

#[test]
fn missing_names_get_a_hint() {
    let mut rng = Rng::new(test_seed("file_missing"));
    let dir = TempDir::new("missing");
    let m = model(&mut rng);
    let path = dir.path("model.upg");
    write_model(&m, &path);
    let f = UpgFile::open(&path).unwrap();
    let err = f
        .matrix("model.layers.0.self_attn.qkv_prj.weight")
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FormatError::Missing { .. }), "{err:?}");
    assert!(
        msg.contains("'model.layers.0.self_attn.qkv_proj.weight'") && msg.contains("close names"),
        "{msg}"
    );
    let msg = f.matrix("model.norm.weight").unwrap_err().to_string();
    assert!(msg.contains("f32 array"), "{msg}");
    let msg = f.f32("lm_head.weight").unwrap_err().to_string();
    assert!(msg.contains("a matrix"), "{msg}");
    let msg = f
        .bytes("zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("5 matrices, 3 f32 arrays and 2 byte blobs"),
        "{msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

fn field_of(err: FormatError) -> (String, String) {
    match err {
        FormatError::Field { tensor, field, .. } => (tensor, field),
        other => panic!("expected a Field error, got {other:?}"),
    }
}

#[test]
fn the_writer_refuses_what_does_not_match_its_plan() {
    let mut rng = Rng::new(test_seed("file_writer_plan"));
    let dir = TempDir::new("writer-plan");
    let up = encode(&mut rng, Codec::Sparse, 128, 4, 130);
    let mut plan = Plan::new();
    plan.matrix("up", MatrixSpec::of(&up))
        .f32("norm", &[2, 3])
        .bytes("blob", 4);
    let path = dir.path("plan.upg");
    let mut w = UpgWriter::create(&path, &plan).unwrap();

    let f16 = encode(&mut rng, Codec::F16, 0, 4, 130);
    let narrower = encode(&mut rng, Codec::Sparse, 128, 4, 129);
    let group64 = encode(&mut rng, Codec::Sparse, 64, 4, 130);
    let cases: Vec<(FormatError, &str, &str)> = vec![
        (w.put_matrix("up", &f16).unwrap_err(), "up", "codec"),
        (w.put_matrix("up", &narrower).unwrap_err(), "up", "shape"),
        (w.put_matrix("up", &group64).unwrap_err(), "up", "group"),
        (w.put_matrix("down", &up).unwrap_err(), "down", "name"),
        (w.put_f32("up", &[0.0; 6]).unwrap_err(), "up", "kind"),
        (w.put_f32("norm", &[0.0; 5]).unwrap_err(), "norm", "shape"),
        (w.put_bytes("blob", b"abc").unwrap_err(), "blob", "shape"),
    ];
    for (err, tensor, field) in cases {
        let msg = err.to_string();
        assert_eq!(field_of(err), (tensor.into(), field.into()), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
    // An invalid tensor of the right shape: a mask keeping 33 weights.
    let Tensor::Sparse(mut bad) = encode(&mut rng, Codec::Sparse, 128, 4, 130) else {
        unreachable!()
    };
    let mut masks = bad.masks.to_vec();
    masks[2] = (1 << 33) - 1;
    bad.masks = masks.into();
    let err = w.put_matrix("up", &Tensor::Sparse(bad)).unwrap_err();
    assert_eq!(field_of(err), ("up".into(), "masks".into()));

    // Refusals leave the writer usable.
    let norm = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    w.put_matrix("up", &up).unwrap();
    w.put_f32("norm", &norm).unwrap();
    let err = w.put_f32("norm", &norm).unwrap_err();
    assert_eq!(field_of(err), ("norm".into(), "data".into()));
    w.put_bytes("blob", b"abcd").unwrap();
    w.finish().unwrap();
    let f = UpgFile::open(&path).unwrap();
    assert_same_matrix("up", &up, &f.matrix("up").unwrap());
    assert_eq!(&f.f32("norm").unwrap()[..], &norm);
    assert_eq!(f.bytes("blob").unwrap(), b"abcd");
}

#[test]
fn bad_plans_are_refused_before_any_file_is_made() {
    let dir = TempDir::new("bad-plans");
    let path = dir.path("plan.upg");
    let spec = |codec, rows, cols, group| MatrixSpec {
        codec,
        rows,
        cols,
        group,
    };
    let sparse = spec(Codec::Sparse, 4, 130, Some(128));
    let cases: Vec<(Plan, &str, &str)> = vec![
        (
            Plan::new()
                .matrix("a", spec(Codec::Sparse, 4, 130, Some(96)))
                .clone(),
            "a",
            "group",
        ),
        (
            Plan::new()
                .matrix("a", spec(Codec::Sparse, 4, 130, None))
                .clone(),
            "a",
            "group",
        ),
        (
            Plan::new()
                .matrix("a", spec(Codec::F32, 4, 130, Some(32)))
                .clone(),
            "a",
            "group",
        ),
        (
            Plan::new()
                .matrix("a", spec(Codec::Q4, 4, 130, Some(128)))
                .clone(),
            "a",
            "group",
        ),
        (
            Plan::new()
                .matrix("a", spec(Codec::F16, 0, 130, None))
                .clone(),
            "a",
            "shape",
        ),
        (
            Plan::new().matrix("a", sparse).f32("a", &[3]).clone(),
            "a",
            "name",
        ),
        (
            Plan::new().matrix("a", sparse).f32("a.masks", &[3]).clone(),
            "a.masks",
            "name",
        ),
        (Plan::new().bytes("b", 3).bytes("b", 4).clone(), "b", "name"),
        (
            Plan::new().bytes("__metadata__", 3).clone(),
            "__metadata__",
            "name",
        ),
        (Plan::new().f32("x", &[usize::MAX, 2]).clone(), "x", "shape"),
    ];
    for (plan, tensor, field) in cases {
        let err = UpgWriter::create(&path, &plan).unwrap_err();
        let msg = err.to_string();
        assert_eq!(field_of(err), (tensor.into(), field.into()), "{msg}");
    }
    for key in ["upg.format_version", "upg.checksums", "upg.tensor.a"] {
        let err = UpgWriter::create(&path, Plan::new().metadata(key, "1")).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
    assert!(dir.files().is_empty(), "{:?}", dir.files());
}

#[test]
fn an_unfinished_writer_leaves_no_file() {
    let mut rng = Rng::new(test_seed("file_unfinished"));
    let dir = TempDir::new("unfinished");
    let a = encode(&mut rng, Codec::Sparse, 128, 3, 200);
    let b = encode(&mut rng, Codec::Q4, 64, 3, 200);
    let mut plan = Plan::new();
    plan.matrix("a", MatrixSpec::of(&a))
        .matrix("b", MatrixSpec::of(&b))
        .bytes("c", 10);
    let path = dir.path("model.upg");

    // Dropped half-way (an error or a panic unwinding in the converter).
    let mut w = UpgWriter::create(&path, &plan).unwrap();
    w.put_matrix("a", &a).unwrap();
    assert_eq!(dir.files(), ["model.upg.partial"]);
    drop(w);
    assert!(dir.files().is_empty(), "{:?}", dir.files());

    // finish() with entries never written: refused, naming them, and nothing is left.
    let mut w = UpgWriter::create(&path, &plan).unwrap();
    w.put_matrix("b", &b).unwrap();
    let err = w.finish().unwrap_err();
    assert!(
        matches!(err, FormatError::Unwritten { count: 2, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("'a'") && msg.contains("'c'"), "{msg}");
    assert!(dir.files().is_empty(), "{:?}", dir.files());

    // An existing file survives an unfinished rewrite untouched.
    let mut w = UpgWriter::create(&path, &plan).unwrap();
    w.put_matrix("a", &a).unwrap();
    w.put_matrix("b", &b).unwrap();
    w.put_bytes("c", &[7; 10]).unwrap();
    w.finish().unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut w = UpgWriter::create(&path, &plan).unwrap();
    w.put_bytes("c", &[9; 10]).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(dir.files(), ["model.upg"]);
}

#[test]
fn unusable_paths_give_clear_errors() {
    let dir = TempDir::new("paths");
    let mut plan = Plan::new();
    plan.bytes("c", 1);
    let path = dir.path("no-such-folder").join("model.upg");
    let err = UpgWriter::create(&path, &plan).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FormatError::Access { .. }), "{err:?}");
    assert!(
        msg.contains("no-such-folder") && msg.contains("could not create"),
        "{msg}"
    );
    let err = UpgFile::open(dir.path("absent.upg")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("absent.upg") && msg.contains("could not open"),
        "{msg}"
    );
    // A folder where the file should be.
    std::fs::create_dir(dir.path("model.upg")).unwrap();
    let mut w = UpgWriter::create(dir.path("model.upg"), &plan).unwrap();
    w.put_bytes("c", b"x").unwrap();
    let err = w.finish().unwrap_err();
    assert!(err.to_string().contains("could not move"), "{err}");
    assert_eq!(dir.files(), ["model.upg"]);
}

/// Prints, for each tensor, dtype, shape, every value (repr round-trips floats exactly) and zlib's
/// CRC-32 of its bytes, and the metadata, as JSON.
const PYTHON_READER: &str = r#"
import json, sys, zlib
from safetensors import safe_open
from safetensors.numpy import load_file
path = sys.argv[1]
tensors = load_file(path)
with safe_open(path, framework="np") as f:
    metadata = f.metadata()
# The header's CRC-32 as the format defines it: the JSON header with every checksum digit a 0.
raw = open(path, "rb").read()
header = raw[8:8 + int.from_bytes(raw[:8], "little")]
key = json.dumps("upg.checksums")
value = metadata["upg.checksums"]
zeros = json.dumps({k: "0" * 8 for k in json.loads(value)}, separators=(",", ":"), sort_keys=True)
written, laid_out = ((key + ":" + json.dumps(v)).encode() for v in (value, zeros))
header_crc = "%08x" % zlib.crc32(header.replace(written, laid_out, 1))
print(json.dumps({
    "header_crc32": header_crc,
    "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape),
                    "values": [repr(x) for x in v.ravel().tolist()],
                    "crc32": "%08x" % zlib.crc32(v.tobytes())} for k, v in tensors.items()},
    "metadata": metadata,
}))
"#;

/// Runs python3 on `script`, or says why it cannot: a skip, unless UPG_REQUIRE_PYTHON=1.
fn python(args: &[&str]) -> Option<std::process::Output> {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output();
    let why = match &probe {
        Err(e) => format!("python3 did not start: {e}"),
        Ok(o) if !o.status.success() => format!(
            "python3 lacks numpy or safetensors ({}); pip install safetensors numpy",
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        ),
        Ok(_) => {
            return Some(
                std::process::Command::new("python3")
                    .args(args)
                    .output()
                    .unwrap(),
            )
        }
    };
    if std::env::var("UPG_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("UPG_REQUIRE_PYTHON=1 but {why}");
    }
    println!("SKIPPED: {why}");
    None
}

#[test]
fn python_safetensors_reads_the_file() {
    let mut rng = Rng::new(test_seed("file_python"));
    let dir = TempDir::new("python");
    let m = model(&mut rng);
    let path = dir.path("model.upg");
    write_model(&m, &path);
    let Some(out) = python(&["-c", PYTHON_READER, path.to_str().unwrap()]) else {
        return;
    };
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tensors = got["tensors"].as_object().unwrap();

    // What Python must see: (name, numpy dtype, shape, values as f64 or u64).
    enum Values {
        Float(Vec<f64>),
        Int(Vec<u64>),
    }
    let mut want: Vec<(String, &str, Vec<usize>, Values)> = Vec::new();
    for (n, t) in &m.matrices {
        for (suffix, dtype, shape, data) in planes(t) {
            let (np, values) = match dtype {
                "U64" => (
                    "uint64",
                    Values::Int(bytemuck::pod_collect_to_vec::<u8, u64>(data)),
                ),
                "U8" => (
                    "uint8",
                    Values::Int(data.iter().map(|&b| b as u64).collect()),
                ),
                "F16" => (
                    "float16",
                    Values::Float(
                        bytemuck::pod_collect_to_vec::<u8, f16>(data)
                            .iter()
                            .map(|v| v.to_f64())
                            .collect(),
                    ),
                ),
                "F32" => (
                    "float32",
                    Values::Float(
                        bytemuck::pod_collect_to_vec::<u8, f32>(data)
                            .iter()
                            .map(|&v| v as f64)
                            .collect(),
                    ),
                ),
                other => panic!("{other}"),
            };
            want.push((format!("{n}.{suffix}"), np, shape, values));
        }
    }
    for (n, shape, data) in &m.arrays {
        let values = Values::Float(data.iter().map(|&v| v as f64).collect());
        want.push((n.clone(), "float32", shape.clone(), values));
    }
    for (n, b) in &m.blobs {
        let values = Values::Int(b.iter().map(|&v| v as u64).collect());
        want.push((n.clone(), "uint8", vec![b.len()], values));
    }
    assert_eq!(tensors.len(), want.len());
    for (name, dtype, shape, values) in &want {
        let t = &tensors[name.as_str()];
        assert_eq!(t["dtype"], *dtype, "{name}");
        assert_eq!(t["shape"], json!(shape), "{name}");
        let strs: Vec<&str> = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        match values {
            Values::Int(v) => {
                let got: Vec<u64> = strs.iter().map(|s| s.parse().unwrap()).collect();
                assert_eq!(&got, v, "{name}");
            }
            Values::Float(v) => {
                let got: Vec<u64> = strs
                    .iter()
                    .map(|s| s.parse::<f64>().unwrap().to_bits())
                    .collect();
                let v: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, v, "{name}");
            }
        }
    }
    let meta = got["metadata"].as_object().unwrap();
    assert_eq!(meta["upg.format_version"], "2");
    // The checksums the writer stored are zlib's CRC-32 of each tensor's bytes and of the header.
    let crcs: Value = serde_json::from_str(meta["upg.checksums"].as_str().unwrap()).unwrap();
    assert_eq!(crcs.as_object().unwrap().len(), tensors.len() + 1);
    for (name, t) in tensors {
        assert_eq!(crcs[name.as_str()], t["crc32"], "{name}");
    }
    assert_eq!(crcs["__metadata__"], got["header_crc32"], "the header");
    for (k, v) in &m.metadata {
        assert_eq!(meta[k.as_str()], *v.as_str(), "{k}");
    }
    for (n, t) in &m.matrices {
        let stored: Value =
            serde_json::from_str(meta[&format!("upg.tensor.{n}")].as_str().unwrap()).unwrap();
        assert_eq!(
            stored,
            serde_json::from_str::<Value>(&description(t)).unwrap()
        );
    }
    println!("python safetensors read {} tensors", want.len());
}
