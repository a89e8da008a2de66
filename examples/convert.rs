//! Convert a Hugging Face Phi-3 family folder into one .upg file.
//!
//! ```text
//! cargo run --release --example convert -- ~/phi-4 phi-4.upg                 # sparse linear, q4 embeddings
//! cargo run --release --example convert -- ~/phi-4 phi-4.upg --linear q4 --embed f16
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
use upg::model::convert::convert;
use upg::model::CodecPlan;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CodecArg {
    Sparse,
    Q4,
    F16,
    F32,
}

impl From<CodecArg> for Codec {
    fn from(c: CodecArg) -> Self {
        match c {
            CodecArg::Sparse => Codec::Sparse,
            CodecArg::Q4 => Codec::Q4,
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
    let result = convert(&args.model, &args.out, &plan, |p| {
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
