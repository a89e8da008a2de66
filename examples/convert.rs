//! Convert a Hugging Face Phi-3 family folder into one .upg file.
//!
//! ```text
//! cargo run --release --example convert -- ~/phi-4 phi-4.upg                 # sparse linear, q4 embeddings
//! cargo run --release --example convert -- ~/phi-4 phi-4.upg --linear q4 --embed f16
//! cargo run --release --example convert -- models/tiny-fortunes tiny.upg \
//!     --calibrate models/tiny-fortunes/calibration.txt                      # Wanda pruning
//! ```
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
use upg::model::convert::convert_calibrated;
use upg::model::perplexity::document_stream;
use upg::model::{Checkpoint, CodecPlan, TextTokenizer};

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
    /// Codec of the linear layers (qkv, o, gate_up, down).
    #[arg(long, value_enum, default_value = "sparse")]
    linear: CodecArg,
    /// Codec of the token embedding.
    #[arg(long, value_enum, default_value = "q4")]
    embed: CodecArg,
    /// Codec of lm_head (ignored when tied to the embedding).
    #[arg(long, value_enum, default_value = "q4")]
    lm_head: CodecArg,
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
        linear: args.linear.into(),
        embed: args.embed.into(),
        lm_head: args.lm_head.into(),
        sparse_group: args.sparse_group,
        q4_group: args.q4_group,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% {elapsed}<{eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let norms = match &args.calibrate {
        Some(path) => match calibration_norms(&args, path) {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("error: calibration: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let result = convert_calibrated(&args.model, &args.out, &plan, norms.as_ref(), |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} ({})", p.tensor, p.codec.name()));
    });
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
            println!(
                "{}: {} parameters, {:.2} GB, {bits:.3} bits/param all-in ({:.1}:1 vs fp32), {} tensors, tokenizer {}, in {:.1}s",
                args.out.display(),
                c.params,
                c.file_bytes as f64 / 1e9,
                32.0 / bits,
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

/// Wanda's activation norms: the exact model over the first tokens of the calibration text.
fn calibration_norms(
    args: &Args,
    path: &std::path::Path,
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
    let norms = ActivationNorms::collect(&ckpt, &tokens, ctx)?;
    eprintln!(
        "calibration: {} tokens of {} in {:.1}s",
        norms.positions,
        path.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(norms)
}
