//! Converting a Hugging Face folder into one .upg file and loading it back: the file must give the same
//! model as encoding the folder directly (same planes, same logits bit for bit), the exact path must
//! still match transformers, and a failed conversion must leave nothing behind.

mod model_common;

use model_common::{fixture, reference, worst_row_rel_error, TempDir};
use upg::model::convert::{convert, load};
use upg::model::{Checkpoint, CodecPlan, Cpu, HostWeights, Phi3, TextTokenizer};

fn convert_fixture(name: &str, plan: &CodecPlan, dir: &TempDir) -> std::path::PathBuf {
    let out = dir.0.join(format!("{name}.upg"));
    let mut last = 0;
    let c = convert(&fixture(name), &out, plan, |p| {
        assert!(
            p.done > last && p.done <= p.total,
            "progress must advance: {} after {last} of {}",
            p.done,
            p.total
        );
        last = p.done;
    })
    .expect("conversion succeeds");
    assert!(c.tokenizer || name != "phi3-tiny");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), c.file_bytes);
    out
}

#[test]
fn converted_file_gives_the_same_model_as_the_folder() {
    let dir = TempDir::new("convert-same");
    let plan = CodecPlan::compressed();
    for name in ["phi3-tiny", "phi3-tiny-longrope"] {
        let path = convert_fixture(name, &plan, &dir);
        let loaded = load(&path).unwrap();
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        assert_eq!(format!("{:?}", loaded.config), format!("{:?}", ckpt.config));
        let direct = HostWeights::from_checkpoint(&ckpt, &plan).unwrap();
        assert_eq!(loaded.weights.stored_bytes(), direct.stored_bytes());

        let tokens = reference(&fixture(name))[if name == "phi3-tiny" {
            "tokens"
        } else {
            "short_tokens"
        }]
        .ids();
        let mut a = Phi3::new(loaded.config.clone(), loaded.weights, Cpu::new(), 64).unwrap();
        let mut b = Phi3::new(ckpt.config.clone(), direct, Cpu::new(), 64).unwrap();
        let (la, lb) = (
            a.forward_all(&tokens).unwrap(),
            b.forward_all(&tokens).unwrap(),
        );
        assert!(
            la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: logits differ"
        );
    }
}

#[test]
fn exact_file_matches_transformers_and_keeps_the_tokenizer() {
    let dir = TempDir::new("convert-exact");
    let path = convert_fixture("phi3-tiny", &CodecPlan::exact(), &dir);
    let m = load(&path).unwrap();
    let r = reference(&fixture("phi3-tiny"));
    let files = m.tokenizer.clone().expect("tokenizer stored");
    let from_file = TextTokenizer::from_files(&files, &path, &m.config).unwrap();
    let from_dir = TextTokenizer::from_dir(&fixture("phi3-tiny"), &m.config).unwrap();
    let text = "The little robot counts 123 stars.";
    assert_eq!(
        from_file.encode(text, true).unwrap(),
        from_dir.encode(text, true).unwrap()
    );
    assert_eq!(from_file.stop_tokens(), from_dir.stop_tokens());

    let vocab = m.config.vocab_size;
    let mut model = Phi3::new(m.config, m.weights, Cpu::new(), 64).unwrap();
    let logits = model.forward_all(&r["tokens"].ids()).unwrap();
    let (err, pos) = worst_row_rel_error(&logits, &r["logits"].values, vocab);
    println!("exact .upg vs transformers: worst relative error {err:.2e} at {pos}");
    assert!(err <= 1e-4);
}

#[test]
fn failed_conversions_leave_nothing_behind() {
    let dir = TempDir::new("convert-fail");
    // A checkpoint whose config asks for a layer the weights lack.
    let broken = TempDir::copy_of("phi3-tiny");
    let config = std::fs::read_to_string(broken.0.join("config.json")).unwrap();
    let config = config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    assert!(
        config.contains("\"num_hidden_layers\": 3"),
        "fixture config layout changed"
    );
    std::fs::write(broken.0.join("config.json"), config).unwrap();
    let out = dir.0.join("broken.upg");
    let err = convert(&broken.0, &out, &CodecPlan::compressed(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.2"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "a failed conversion left {left:?}");

    let err = convert(
        &fixture("phi3-tiny"),
        &dir.0.join("no/such/dir/x.upg"),
        &CodecPlan::compressed(),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("could not create the output file"), "{err}");
    assert!(
        load(&fixture("phi3-tiny").join("model.safetensors")).is_err(),
        "a plain checkpoint is not a .upg model"
    );
}
