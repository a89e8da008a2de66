//! Held-out perplexity of a model with our own forward pass, in any codec plan.
//!
//! ```text
//! cargo run --release --example perplexity                                  # built-in model, exact f32
//! cargo run --release --example perplexity -- --codecs sparse-wanda --max-tokens 4096
//! cargo run --release --example perplexity -- --table                      # QUALITY.md's table
//! cargo run --release --example perplexity -- --norm-stats                 # Wanda's activation norms
//! ```
//!
//! Windowing as models/tiny-fortunes/perplexity.json: the %-separated text is tokenized fortune by
//! fortune (each with its BOS), concatenated, and cut into non-overlapping windows of `--ctx` tokens,
//! each fed from position 0; every token but a window's first is predicted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use upg::format::Codec;
use upg::gpu::{Gpu, GpuOptions};
use upg::model::calibration::ActivationNorms;
use upg::model::perplexity::{document_stream, windowed, BitsPerParam, Perplexity};
use upg::model::{
    Checkpoint, CodecPlan, Config, Cpu, GpuBackend, HostWeights, Phi3, TextTokenizer,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Codecs {
    /// Dense f32 everywhere: the reference path.
    Exact,
    /// Dense f16 everywhere.
    F16,
    /// q4 linear layers (group 32), f16 embedding.
    Q4,
    /// 50% sparse linear layers, magnitude saliency; f16 embedding.
    Sparse,
    /// 50% sparse linear layers, Wanda saliency from the calibration text; f16 embedding.
    SparseWanda,
    /// Dense 3-bit linear layers (group 128: 3.125 bits, the sparse codec's budget); f16 embedding.
    Q3,
    /// The library's default plan: sparse linear layers (magnitude), q4 embedding and lm_head.
    Compressed,
}

impl Codecs {
    fn plan(self) -> CodecPlan {
        let f16 = |linear| CodecPlan {
            linear,
            embed: Codec::F16,
            lm_head: Codec::F16,
            ..CodecPlan::exact()
        };
        match self {
            Codecs::Exact => CodecPlan::exact(),
            Codecs::F16 => f16(Codec::F16),
            Codecs::Q4 => f16(Codec::Q4),
            Codecs::Sparse | Codecs::SparseWanda => f16(Codec::Sparse),
            Codecs::Q3 => f16(Codec::Q3),
            Codecs::Compressed => CodecPlan::compressed(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Codecs::Exact => "dense f32 (the f16 checkpoint, exactly)",
            Codecs::F16 => "dense f16",
            Codecs::Q4 => "dense q4, group 32",
            Codecs::Sparse => "50% sparse (32 of every 64), magnitude saliency",
            Codecs::SparseWanda => "50% sparse, Wanda saliency (magnitude x input-column norm)",
            Codecs::Q3 => "dense q3, group 128 (equal bits to sparse)",
            Codecs::Compressed => "default plan: sparse (magnitude) + q4 embed",
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    Cpu,
    /// Any GPU adapter, a software one (lavapipe) included.
    Gpu,
}

#[derive(Parser, Debug)]
#[command(about = "Held-out perplexity of a Phi-3 family model with upg's forward pass")]
struct Args {
    /// Hugging Face model folder, or a .upg file (then its stored codecs are used and --codecs is ignored).
    #[arg(long)]
    model: Option<PathBuf>,
    /// %-separated text (documents split by a line holding only '%'). Default: the model's heldout.txt.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Training-side text for Wanda's activation norms. Default: the model's calibration.txt.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Calibration tokens to run (from the start of the calibration stream).
    #[arg(long, default_value_t = 16384)]
    calibration_tokens: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Use only the first N tokens of the stream (quick runs).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long, value_enum, default_value = "exact")]
    codecs: Codecs,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Every codec plan in turn, printed as QUALITY.md's markdown table.
    #[arg(long)]
    table: bool,
    /// Print how uneven the calibration activation norms are per linear layer (max and 99th
    /// percentile over the median of its input columns), then stop.
    #[arg(long)]
    norm_stats: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error>;

/// Where the model comes from: a checkpoint folder (encoded per plan) or a .upg file (as stored).
enum Source {
    Folder(Box<Checkpoint>),
    File(PathBuf),
}

struct Measured {
    ppl: Perplexity,
    bits: BitsPerParam,
    seconds: f64,
}

fn run(args: Args) -> Result<(), Error> {
    let builtin = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fortunes");
    let model = args.model.clone().unwrap_or_else(|| builtin.clone());
    let (source, config, tokenizer) = if model.is_file() {
        let m = upg::model::convert::load(&model)?;
        let files = m
            .tokenizer
            .ok_or_else(|| format!("{}: the file holds no tokenizer", model.display()))?;
        let tokenizer = TextTokenizer::from_files(&files, &model, &m.config)?;
        (Source::File(model.clone()), m.config, tokenizer)
    } else {
        let ckpt = Checkpoint::open(&model)?;
        let tokenizer = TextTokenizer::from_dir(&model, &ckpt.config)?;
        let config = ckpt.config.clone();
        (Source::Folder(Box::new(ckpt)), config, tokenizer)
    };
    let dir = if model.is_file() {
        model.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        model.clone()
    };
    let text_path = args.text.clone().unwrap_or_else(|| dir.join("heldout.txt"));
    let text = std::fs::read_to_string(&text_path)
        .map_err(|e| format!("{}: {e} (give the text with --text)", text_path.display()))?;
    let mut tokens = document_stream(&tokenizer, &text)?;
    if let Some(n) = args.max_tokens {
        tokens.truncate(n);
    }
    let ctx = args.ctx.min(config.max_position_embeddings);
    eprintln!(
        "model {}, text {} ({} tokens), windows of {ctx}",
        model.display(),
        text_path.display(),
        tokens.len()
    );

    // Wanda's norms come from the exact model on the calibration text, once.
    let mut norms: Option<ActivationNorms> = None;
    let mut norms_for = |ckpt: &Checkpoint| -> Result<ActivationNorms, Error> {
        if let Some(n) = &norms {
            return Ok(n.clone());
        }
        let path = args
            .calibration
            .clone()
            .unwrap_or_else(|| dir.join("calibration.txt"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e} (give one with --calibration)", path.display()))?;
        let mut calib = document_stream(&tokenizer, &text)?;
        calib.truncate(args.calibration_tokens);
        let t0 = Instant::now();
        let n = ActivationNorms::collect(ckpt, &calib, ctx)?;
        eprintln!(
            "calibration: {} tokens of {} in {:.1}s",
            calib.len(),
            path.display(),
            t0.elapsed().as_secs_f64()
        );
        norms = Some(n.clone());
        Ok(n)
    };

    if args.norm_stats {
        let Source::Folder(ckpt) = &source else {
            return Err("--norm-stats runs the checkpoint: give a model folder".into());
        };
        let n = norms_for(ckpt)?;
        let mut names: Vec<&String> = n.norms.keys().collect();
        names.sort();
        println!("| linear layer input | max / median | p99 / median |");
        println!("|---|---:|---:|");
        for name in names {
            let mut v = n.norms[name].clone();
            v.sort_by(f32::total_cmp);
            let median = v[v.len() / 2];
            println!(
                "| {name} | {:.1} | {:.1} |",
                v[v.len() - 1] / median,
                v[v.len() * 99 / 100] / median
            );
        }
        return Ok(());
    }

    let mut measure = |codecs: Codecs| -> Result<Measured, Error> {
        let weights = match &source {
            Source::File(path) => upg::model::convert::load(path)?.weights,
            Source::Folder(ckpt) => {
                let n = match codecs {
                    Codecs::SparseWanda => Some(norms_for(ckpt)?),
                    _ => None,
                };
                HostWeights::from_checkpoint_calibrated(ckpt, &codecs.plan(), n.as_ref())?
            }
        };
        let bits = BitsPerParam::of(&weights);
        let t0 = Instant::now();
        let ppl = perplexity(&config, weights, &tokens, ctx, args.backend)?;
        Ok(Measured {
            ppl,
            bits,
            seconds: t0.elapsed().as_secs_f64(),
        })
    };

    if !args.table {
        let m = measure(args.codecs)?;
        println!(
            "perplexity {:.3} over {} predicted tokens (mean nll {:.4} nats); {} ; linear layers {:.3} bits/param, all weights {:.3}; {:.1}s",
            m.ppl.perplexity(),
            m.ppl.predicted,
            m.ppl.mean_nll(),
            match &source {
                Source::File(_) => "codecs as stored in the file",
                Source::Folder(_) => args.codecs.describe(),
            },
            m.bits.linear,
            m.bits.all,
            m.seconds
        );
        return Ok(());
    }
    if let Source::File(_) = source {
        return Err("--table encodes the checkpoint in every plan: give a model folder".into());
    }
    println!("| linear layers | perplexity | bits/param (linear) | bits/param (all) |");
    println!("|---|---:|---:|---:|");
    for codecs in [
        Codecs::Exact,
        Codecs::F16,
        Codecs::Q4,
        Codecs::Sparse,
        Codecs::SparseWanda,
        Codecs::Q3,
        Codecs::Compressed,
    ] {
        let m = measure(codecs)?;
        eprintln!(
            "{codecs:?}: {:.3} ({} tokens, {:.1}s)",
            m.ppl.perplexity(),
            m.ppl.predicted,
            m.seconds
        );
        println!(
            "| {} | {:.2} | {:.3} | {:.3} |",
            codecs.describe(),
            m.ppl.perplexity(),
            m.bits.linear,
            m.bits.all
        );
    }
    Ok(())
}

fn perplexity(
    config: &Config,
    weights: HostWeights,
    tokens: &[u32],
    ctx: usize,
    backend: BackendKind,
) -> Result<Perplexity, Error> {
    // One batch per window: the whole window is one prefill pass.
    Ok(match backend {
        BackendKind::Cpu => {
            let mut model = Phi3::with_batch(config.clone(), weights, Cpu::new(), ctx, ctx)?;
            windowed(&mut model, tokens, ctx)?
        }
        BackendKind::Gpu => {
            let gpu = Gpu::new(&GpuOptions::from_env()?)?;
            eprintln!("gpu: {}", gpu.describe());
            let mut model = Phi3::new(config.clone(), weights, GpuBackend::new(gpu, false)?, ctx)?;
            windowed(&mut model, tokens, ctx)?
        }
    })
}
