//! Convert a Hugging Face Phi-3 family folder into one .upg file.
//!
//! ```text
//! cargo run --release --example convert -- ~/phi-4 phi-4.upg                 # sparse linear, q4 embeddings
//! cargo run --release --example convert -- ~/phi-4 phi-4.upg --linear q4 --embed f16
//! cargo run --release --example convert -- models/tiny-fortunes tiny.upg \
//!     --calibrate models/tiny-fortunes/calibration.txt                      # Wanda pruning
//! cargo run --release --example convert -- models/tiny-fortunes tiny.upg --bits 3.2 \
//!     --calibrate models/tiny-fortunes/calibration.txt                      # codecs by measured error
//! ```
//!
//! `--bits B` gives every matrix (linear layers, embedding, lm_head; except roles pinned with
//! `--linear`, `--embed`, `--lm-head`) the candidate codec of lowest measured error among those of at
//! most B bits per parameter, and prints the choice per tensor. The error is the relative output
//! error ||(W - W') X|| / ||W X|| on inputs X sampled from the calibration run (`--calibrate`), else
//! the relative weight error ||W - W'|| / ||W||.
//!
//! Tensors are read from the memory-mapped checkpoint and written one at a time; the output appears only
//! when every tensor is in (an interrupted run leaves no .upg).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use upg::format::Codec;
use upg::model::calibration::ActivationNorms;
use upg::model::codec_choice::TensorChoice;
use upg::model::convert::{convert_budget, convert_calibrated, Budget, Converted};
use upg::model::perplexity::document_stream;
use upg::model::{Checkpoint, CodecPlan, Role, TextTokenizer};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CodecArg {
    Sparse,
    Q4,
    /// Dense 3-bit, group 128.
    Q3,
    F16,
    F32,
}

impl From<CodecArg> for Codec {
    fn from(c: CodecArg) -> Self {
        match c {
            CodecArg::Sparse => Codec::Sparse,
            CodecArg::Q4 => Codec::Q4,
            CodecArg::Q3 => Codec::Q3,
            CodecArg::F16 => Codec::F16,
            CodecArg::F32 => Codec::F32,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Convert a Hugging Face Phi-3 family model folder into one .upg file")]
struct Args {
    /// Model folder: config.json, model.safetensors or model-*.safetensors + index, tokenizer files.
    model: PathBuf,
    /// Output .upg file.
    out: PathBuf,
    /// Codec of the linear layers (qkv, o, gate_up, down) [default: sparse; with --bits: chosen].
    #[arg(long, value_enum)]
    linear: Option<CodecArg>,
    /// Codec of the token embedding [default: q4; with --bits: chosen].
    #[arg(long, value_enum)]
    embed: Option<CodecArg>,
    /// Codec of lm_head, ignored when tied to the embedding [default: q4; with --bits: chosen].
    #[arg(long, value_enum)]
    lm_head: Option<CodecArg>,
    /// Bits per parameter: each matrix not pinned by --linear / --embed / --lm-head gets the codec
    /// of lowest measured error within this budget (e.g. 3.2).
    #[arg(long)]
    bits: Option<f64>,
    /// Calibration positions whose inputs each linear layer keeps for the output error of --bits.
    #[arg(long, default_value_t = 256)]
    choice_samples: usize,
    /// Input columns per scale of the sparse codec (a multiple of 64).
    #[arg(long, default_value_t = 128)]
    sparse_group: usize,
    /// Input columns per scale of q4 (32 or 64).
    #[arg(long, default_value_t = 32)]
    q4_group: usize,
    /// %-separated calibration text (training-side, not held-out): the sparse codec then prunes by
    /// Wanda saliency |w| * ||x_col||, with activation norms from the exact model run over it on the
    /// CPU (slow for large models: each calibration token is a full f32 forward pass).
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// Calibration tokens to run (from the start of the text's token stream).
    #[arg(long, default_value_t = 16384)]
    calibration_tokens: usize,
    /// Window length of the calibration run.
    #[arg(long, default_value_t = 256)]
    calibration_ctx: usize,
    /// List every tensor with its codec and bits per parameter.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = CodecPlan {
        linear: args.linear.unwrap_or(CodecArg::Sparse).into(),
        embed: args.embed.unwrap_or(CodecArg::Q4).into(),
        lm_head: args.lm_head.unwrap_or(CodecArg::Q4).into(),
        sparse_group: args.sparse_group,
        q4_group: args.q4_group,
    };
    let budget = args.bits.map(|bits| Budget {
        bits,
        roles: [
            (args.linear, Role::Linear),
            (args.embed, Role::Embed),
            (args.lm_head, Role::LmHead),
        ]
        .into_iter()
        .filter(|(pinned, _)| pinned.is_none())
        .map(|(_, role)| role)
        .collect(),
    });
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% {elapsed}<{eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let samples = if budget.is_some() {
        args.choice_samples
    } else {
        0
    };
    let norms = match &args.calibrate {
        Some(path) => match calibration_norms(&args, path, samples) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("error: calibration: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let on_progress = |p: upg::model::convert::Progress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} ({})", p.tensor, p.codec.name()));
    };
    let result: Result<Converted, upg::model::ModelError> = match &budget {
        None => convert_calibrated(&args.model, &args.out, &plan, norms.as_ref(), on_progress),
        Some(b) => {
            let mut header = false;
            let report = |c: &TensorChoice| {
                if !header {
                    header = true;
                    bar.suspend(|| {
                        println!(
                            "codec choice at {} bits/param; error: 'out' = relative output error ||(W - W') X|| / ||W X|| on calibration inputs, 'w' = relative weight error ||W - W'|| / ||W||",
                            b.bits
                        );
                        println!(
                            "{:<44} {:>10} {:<18} {:>6} {:>12}   runner-up within the budget",
                            "tensor", "shape", "codec", "bits", "error"
                        );
                    });
                }
                bar.suspend(|| println!("{}", choice_line(c, b.bits)));
            };
            convert_budget(
                &args.model,
                &args.out,
                &plan,
                b,
                norms.as_ref(),
                report,
                on_progress,
            )
            .map(|(c, _)| c)
        }
    };
    bar.finish_and_clear();
    match result {
        Ok(c) => {
            if args.verbose {
                for (name, codec, [r, k], bits) in &c.matrices {
                    println!(
                        "{name:<48} {:<12} {r:>6} x {k:<6} {bits:6.3} bits/param",
                        codec.name()
                    );
                }
            }
            let bits = c.file_bytes as f64 * 8.0 / c.params as f64;
            let (mbits, mparams) = c
                .matrices
                .iter()
                .fold((0.0, 0usize), |(b, n), (_, _, [r, k], bpp)| {
                    (b + bpp * (r * k) as f64, n + r * k)
                });
            println!(
                "{}: {} parameters, {:.2} GB, {bits:.3} bits/param all-in, file with tokenizer ({:.1}:1 vs fp32), matrices {:.3} bits/param, {} tensors, tokenizer {}, in {:.1}s",
                args.out.display(),
                c.params,
                c.file_bytes as f64 / 1e9,
                32.0 / bits,
                mbits / mparams.max(1) as f64,
                c.matrices.len(),
                if c.tokenizer { "stored" } else { "not found" },
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One row of the choice table: the chosen codec, and the best other candidate within the budget.
fn choice_line(c: &TensorChoice, bits: f64) -> String {
    let m = c.chosen();
    let runner_up = c
        .measured
        .iter()
        .enumerate()
        .filter(|&(i, o)| i != c.chosen && o.bits <= bits)
        .min_by(|a, b| a.1.error.total_cmp(&b.1.error))
        .map_or("-".to_string(), |(_, o)| {
            format!("{} {:.3} bits, {:.5}", o.candidate, o.bits, o.error)
        });
    format!(
        "{:<44} {:>10} {:<18} {:>6.3} {:>8.5} {:<3}   {runner_up}",
        c.name,
        format!("{}x{}", c.shape[0], c.shape[1]),
        m.candidate.to_string(),
        m.bits,
        m.error,
        if c.output_error { "out" } else { "w" }
    )
}

/// Wanda's activation norms (and `samples` input rows per linear layer, for --bits): the exact
/// model over the first tokens of the calibration text.
fn calibration_norms(
    args: &Args,
    path: &std::path::Path,
    samples: usize,
) -> Result<ActivationNorms, Box<dyn std::error::Error>> {
    let ckpt = Checkpoint::open(&args.model)?;
    let tokenizer = TextTokenizer::from_dir(&args.model, &ckpt.config)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tokens = document_stream(&tokenizer, &text)?;
    tokens.truncate(args.calibration_tokens);
    let ctx = args
        .calibration_ctx
        .min(ckpt.config.max_position_embeddings);
    let t0 = Instant::now();
    let norms = ActivationNorms::collect_sampled(&ckpt, &tokens, ctx, samples)?;
    eprintln!(
        "calibration: {} tokens of {} in {:.1}s",
        norms.positions,
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(norms)
}
