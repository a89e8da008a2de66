//! Generate text with a Phi-3 family model.
//!
//! ```text
//! cargo run --release --example generate                       # the built-in model, models/tiny-fortunes
//! cargo run --release --example generate -- --model ~/phi-4 --prompt "Why is the sky blue?"
//! cargo run --release --example generate -- --synthetic phi-4 --max-tokens 16   # random weights, speed
//! ```
//!
//! Tokens are printed as they are produced; prompt and generation speed go to stderr at the end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use upg::gpu::{Gpu, GpuError, GpuOptions};
use upg::model::{
    synthetic, Backend, Checkpoint, CodecPlan, Config, Cpu, GpuBackend, HostWeights, Message, Phi3,
    Sampler, SamplerConfig, TextTokenizer,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    /// A hardware GPU when there is one (UPG_BACKEND / UPG_ADAPTER narrow the choice), else the CPU.
    Auto,
    Cpu,
    /// Any GPU adapter, a software one (lavapipe) included.
    Gpu,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Codecs {
    /// Sparse linear layers, q4 embedding and lm_head.
    Compressed,
    /// Dense f32 everywhere: the reference path.
    Exact,
    /// Dense q3 linear layers (group 128, the sparse codec's 3.125 bits), q4 embedding and lm_head.
    Q3,
}

#[derive(Parser, Debug)]
#[command(about = "Generate text with a Phi-3 family model (Phi-4, Phi-4-mini, Phi-3.5-mini)")]
struct Args {
    /// Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or a .upg file from
    /// `convert`. Default: the built-in models/tiny-fortunes, a 3.9M-parameter Phi-3 trained on the
    /// fortune cookies of Debian's `fortunes` package (scripts/train_tiny_model.py). It has only seen
    /// plain text, so its prompt is always fed raw: it continues the prompt as a fortune.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random weights of a built-in shape instead of a checkpoint: phi-4, phi-4-mini or tiny.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
    /// The start of a fortune for the built-in model; a question or instruction for chat models.
    #[arg(long, default_value = "A man who")]
    prompt: String,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt as is, without the chat template (always so for the built-in model).
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// KV cache positions; default: prompt + max tokens.
    #[arg(long)]
    ctx: Option<usize>,
    #[arg(long, value_enum, default_value = "compressed")]
    codecs: Codecs,
    /// Prompt length in tokens for --synthetic runs (random ids).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Prompt positions per pass (the backend may allow fewer); default: the backend's choice.
    #[arg(long)]
    batch: Option<usize>,
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

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let plan = match args.codecs {
        Codecs::Compressed => CodecPlan::compressed(),
        Codecs::Exact => CodecPlan::exact(),
        Codecs::Q3 => CodecPlan {
            linear: upg::format::Codec::Q3,
            ..CodecPlan::compressed()
        },
    };
    let t0 = Instant::now();
    let (config, weights, tokenizer, prompt) = match &args.synthetic {
        Some(name) => {
            let config = Config::preset(name)?;
            let weights = synthetic(&config, args.seed, &plan);
            let mut rng = upg::rng::Rng::new(args.seed);
            let prompt: Vec<u32> = (0..args.prompt_len.max(1))
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect();
            eprintln!("synthetic {name}: random weights, prompt of {} random token ids; output is token ids", prompt.len());
            (config, weights, None, prompt)
        }
        None => {
            let builtin = args.model.is_none();
            let dir = args.model.clone().unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-fortunes")
            });
            let (config, weights, tokenizer) = if dir.is_file() {
                let m = upg::model::convert::load(&dir)?;
                let files = m.tokenizer.ok_or_else(|| {
                    format!(
                        "{}: the file holds no tokenizer (its folder had no tokenizer.json)",
                        dir.display()
                    )
                })?;
                let tokenizer = TextTokenizer::from_files(&files, &dir, &m.config)?;
                (m.config, m.weights, tokenizer)
            } else {
                let ckpt = Checkpoint::open(&dir)?;
                let tokenizer = TextTokenizer::from_dir(&dir, &ckpt.config)?;
                let weights = HostWeights::from_checkpoint(&ckpt, &plan)?;
                (ckpt.config.clone(), weights, tokenizer)
            };
            let prompt = if args.raw || builtin {
                // A raw prompt is the start of the text: print it so the output reads whole.
                print!("{}", args.prompt);
                tokenizer.encode(&args.prompt, true)?
            } else {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(Message::new("system", system));
                }
                messages.push(Message::new("user", &args.prompt));
                let text = tokenizer.apply_chat_template(&messages, true)?;
                tokenizer.encode(&text, false)?
            };
            eprintln!("model: {}", dir.display());
            (config, weights, Some(tokenizer), prompt)
        }
    };
    eprintln!(
        "{} layers, hidden {}, {:.3}M parameters, {:.1} MB stored ({:?}), loaded in {:.1}s",
        config.num_hidden_layers,
        config.hidden_size,
        config.parameters() as f64 / 1e6,
        weights.stored_bytes() as f64 / 1e6,
        args.codecs,
        t0.elapsed().as_secs_f64()
    );

    let ctx = args
        .ctx
        .unwrap_or(prompt.len() + args.max_tokens)
        .min(config.max_position_embeddings);
    let stop: Vec<u32> = tokenizer
        .as_ref()
        .map(|t| t.stop_tokens().to_vec())
        .unwrap_or_default();
    let mut sampler = Sampler::new(SamplerConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
    })?;
    let kv_f16 = !matches!(args.codecs, Codecs::Exact);
    match pick_gpu(args.backend)? {
        Some(gpu) => {
            let backend = GpuBackend::new(gpu, kv_f16)?;
            let batch = args.batch.unwrap_or(backend.prefill_batch());
            let model = Phi3::with_batch(config, weights, backend, ctx, batch)?;
            decode(
                model,
                &args,
                &prompt,
                &mut sampler,
                &stop,
                tokenizer.as_ref(),
            )
        }
        None => {
            let backend = Cpu::new();
            let batch = args.batch.unwrap_or(backend.prefill_batch());
            let model = Phi3::with_batch(config, weights, backend, ctx, batch)?;
            decode(
                model,
                &args,
                &prompt,
                &mut sampler,
                &stop,
                tokenizer.as_ref(),
            )
        }
    }
}

/// The GPU to run on, or `None` for the CPU path.
fn pick_gpu(kind: BackendKind) -> Result<Option<Gpu>, Box<dyn std::error::Error>> {
    if let BackendKind::Cpu = kind {
        return Ok(None);
    }
    match Gpu::new(&GpuOptions::from_env()?) {
        Ok(gpu) => {
            let software = gpu.info().device_type == wgpu::DeviceType::Cpu;
            if software && matches!(kind, BackendKind::Auto) {
                eprintln!(
                    "only a software GPU ({}) is available: using the CPU kernels (--backend gpu forces it)",
                    gpu.describe()
                );
                return Ok(None);
            }
            Ok(Some(gpu))
        }
        Err(GpuError::NoAdapter(reason)) if matches!(kind, BackendKind::Auto) => {
            eprintln!("no GPU adapter ({reason}): using the CPU kernels");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Feeds the prompt, streams the generated text, and reports speed.
fn decode<B: Backend>(
    mut model: Phi3<B>,
    args: &Args,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &[u32],
    tokenizer: Option<&TextTokenizer>,
) -> Result<(), Box<dyn std::error::Error>> {
    let ctx = model.ctx();
    eprintln!("backend: {}, context {ctx}", model.backend().name());

    let mut stream = tokenizer.map(|t| t.stream(true));
    let mut stdout = std::io::stdout();
    let mut failed = None;
    let out = model.generate(prompt, args.max_tokens, sampler, stop, |id| {
        let piece = match stream.as_mut() {
            Some(s) => match s.step(id) {
                Ok(p) => p.unwrap_or_default(),
                Err(e) => {
                    failed.get_or_insert(e);
                    String::new()
                }
            },
            None => format!("{id} "),
        };
        // A closed stdout (piped into `head`) is not worth an error.
        let _ = write!(stdout, "{piece}").and_then(|_| stdout.flush());
    })?;
    println!();
    let stats = model.backend().stats();
    if !stats.is_empty() {
        eprintln!("{stats}");
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    let prompt_s = out.prompt_time.as_secs_f64();
    let decode_s = out.decode_time.as_secs_f64();
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tok/s)",
        out.prompt_tokens,
        prompt_s,
        out.prompt_tokens as f64 / prompt_s
    );
    let later = out.tokens.len().saturating_sub(1);
    eprintln!(
        "generation: {} tokens, {} after the first in {:.3}s ({:.2} tok/s){}",
        out.tokens.len(),
        later,
        decode_s,
        if later > 0 {
            later as f64 / decode_s
        } else {
            0.0
        },
        if out.stopped {
            ", ended by a stop token"
        } else {
            ""
        }
    );
    Ok(())
}
