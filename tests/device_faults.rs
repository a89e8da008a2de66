//! Device limits and faults on the GPU backend (lavapipe in CI). A model that does not fit the device
//! is refused before anything is uploaded, with the numbers and what to change, and the estimate it is
//! judged by is exactly what the upload makes (an upper bound on a GPU with matrix units, whose batched
//! products keep scratch sized for a whole batch). A device lost during generation, and errors that escape
//! wgpu's error scopes, come back to the caller as errors from the next call: never a hang, a panic or
//! an abort.

mod model_common;

use std::sync::mpsc;
use std::time::Duration;

use model_common::fixture;
use upg::gpu::{gpu_or_skip, GpuError, GpuOptions, LimitOverrides};
use upg::model::device_fit::Footprint;
use upg::model::{
    Backend, Checkpoint, CodecPlan, Config, GpuBackend, HostWeights, ModelError, Phi3, Sampler,
    SamplerConfig,
};

/// The fixture's config and weights in `plan`'s codecs.
fn fixture_weights(plan: &CodecPlan) -> (Config, HostWeights) {
    let ckpt = Checkpoint::open(&fixture("phi3-tiny")).unwrap();
    let weights = HostWeights::from_checkpoint(&ckpt, plan).unwrap();
    (ckpt.config, weights)
}

fn prompt() -> Vec<u32> {
    vec![1, 17, 42, 5]
}

/// The footprint of the fixture on `backend` as `Phi3::with_batch` will lay it out: q3 matrices
/// have no batched product, so a model with them takes one position a pass.
fn footprint(
    backend: &GpuBackend,
    config: &Config,
    weights: &HostWeights,
    ctx: usize,
    batch: usize,
    kv_f16: bool,
) -> Footprint {
    let q3 = weights.layers[0].qkv.codec() == upg::format::Codec::Q3;
    let max = if q3 { 1 } else { backend.max_batch() };
    let rows = ctx.min(batch).min(max);
    Footprint::of(backend.gpu(), config, weights, ctx, rows, kv_f16).unwrap()
}

fn q3_linear() -> CodecPlan {
    CodecPlan {
        linear: upg::format::Codec::Q3,
        ..CodecPlan::compressed()
    }
}

#[test]
fn the_fit_estimate_is_what_the_upload_makes() {
    // (plan, f16 KV cache, ctx, prompt batch (None: the backend's), largest binding): the small
    // binding splits every matrix into chunks (and takes only one position a pass).
    let cases = [
        (CodecPlan::compressed(), true, 64, None, None),
        (CodecPlan::exact(), false, 37, Some(5), None),
        (CodecPlan::compressed(), false, 16, Some(1), Some(4096)),
        (CodecPlan::exact(), true, 20, Some(1), Some(4096)),
        // q3 has no batched product: one position a pass whatever the batch asked for.
        (q3_linear(), true, 40, None, None),
        (q3_linear(), false, 16, Some(8), Some(4096)),
    ];
    for (plan, kv_f16, ctx, batch, binding) in cases {
        let opts = GpuOptions {
            limits: LimitOverrides {
                max_binding_bytes: binding,
                ..Default::default()
            },
            ..GpuOptions::default()
        };
        let Some(gpu) = gpu_or_skip(opts) else {
            return;
        };
        let (config, weights) = fixture_weights(&plan);
        let backend = GpuBackend::new(gpu, kv_f16).unwrap();
        let batch = batch.unwrap_or(backend.prefill_batch());
        let fp = footprint(&backend, &config, &weights, ctx, batch, kv_f16);
        let mut model = Phi3::with_batch(config, weights, backend, ctx, batch).unwrap();
        let loaded = model.backend().device_bytes();
        // The decode attention's scratch is made at the first decoded token.
        let out = model.generate(&prompt(), 4, &mut Sampler::greedy(), &[], |_| {});
        assert_eq!(out.unwrap().tokens.len(), 4);
        let made = model.backend().device_bytes();
        println!(
            "{:?} linear, kv f16 {kv_f16}, ctx {ctx}, batch {batch}, binding {binding:?}: {fp:?}; {loaded} bytes made at load, {made} after a generation",
            plan.linear
        );
        assert!(loaded <= made);
        if model.backend().gpu().features().cooperative_matrix {
            // The matrix units' scratch is sized for a whole batch; this prompt is shorter.
            assert!(made <= fp.total(), "{made} made, {} estimated", fp.total());
        } else {
            assert_eq!(fp.total(), made);
        }
    }
}

/// A model whose down_proj rows are long enough for spmv's column split (128 rows x 8192 columns: 2
/// parts): the estimate counts the split's scratch buffer, which decoding makes, and still equals what
/// the backend made.
#[test]
fn the_fit_estimate_counts_the_products_scratch() {
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut config = Config::preset("tiny").unwrap();
    config.intermediate_size = 8192;
    let weights = upg::model::synthetic(&config, 7, &CodecPlan::compressed());
    let backend = GpuBackend::new(gpu, true).unwrap();
    let (ctx, batch) = (32, backend.prefill_batch());
    let fp = footprint(&backend, &config, &weights, ctx, batch, true);
    let mut model = Phi3::with_batch(config, weights, backend, ctx, batch).unwrap();
    let out = model.generate(&prompt(), 4, &mut Sampler::greedy(), &[], |_| {});
    assert_eq!(out.unwrap().tokens.len(), 4);
    let scratch = model.backend().gpu().scratch_bytes();
    println!("{fp:?}; scratch {scratch} bytes");
    assert!(scratch >= 4 << 16, "the split made no scratch buffer");
    let made = model.backend().device_bytes();
    if model.backend().gpu().features().cooperative_matrix {
        assert!(made <= fp.total(), "{made} made, {} estimated", fp.total());
    } else {
        assert_eq!(fp.total(), made);
    }
}

#[test]
fn a_model_larger_than_the_device_is_refused_before_upload() {
    let Some(probe) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    println!("the driver's device memory: {:?}", probe.memory());
    let (config, weights) = fixture_weights(&CodecPlan::compressed());
    let ctx = 64;
    let backend = GpuBackend::new(probe, true).unwrap();
    let batch = backend.prefill_batch();
    let need = footprint(&backend, &config, &weights, ctx, batch, true).total();
    // One byte short of the estimate is refused; the estimate itself fits.
    for (memory, fits) in [(need - 1, false), (need, true)] {
        let gpu = gpu_or_skip(GpuOptions {
            memory_bytes: Some(memory),
            ..GpuOptions::default()
        })
        .unwrap();
        let backend = GpuBackend::new(gpu, true).unwrap();
        let weights = fixture_weights(&CodecPlan::compressed()).1;
        match Phi3::new(config.clone(), weights, backend, ctx) {
            Ok(_) => assert!(fits, "{memory} bytes: accepted"),
            Err(e) => {
                let msg = e.to_string();
                println!("{memory} bytes: {msg}");
                assert!(!fits, "{memory} bytes: {msg}");
                assert!(matches!(e, ModelError::DoesNotFit { .. }), "{e:?}");
                for words in ["MiB", "KV cache", "--ctx", "UPG_DEVICE_MEMORY_MIB"] {
                    assert!(msg.contains(words), "'{words}' not in: {msg}");
                }
            }
        }
    }
}

#[test]
fn a_buffer_over_the_largest_binding_is_refused_before_upload() {
    // The f32 KV cache of one layer at ctx 64 is 64 x 64 x 4 = 16 KiB; one position a pass keeps the
    // activations under 8 KiB.
    let opts = GpuOptions {
        limits: LimitOverrides {
            max_binding_bytes: Some(8192),
            ..Default::default()
        },
        ..GpuOptions::default()
    };
    let Some(gpu) = gpu_or_skip(opts) else {
        return;
    };
    let (config, weights) = fixture_weights(&CodecPlan::compressed());
    let backend = GpuBackend::new(gpu, false).unwrap();
    let err = Phi3::with_batch(config, weights, backend, 64, 1)
        .err()
        .unwrap();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, ModelError::DoesNotFit { .. }), "{err:?}");
    assert!(
        msg.contains("K (and the V) cache") && msg.contains("8192") && msg.contains("--ctx"),
        "{msg}"
    );
}

/// Runs `f` on another thread and waits at most a minute for it: a hang fails the test.
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: no answer within a minute (a hang)"))
}

fn gpu_model(kv_f16: bool) -> Option<Phi3<GpuBackend>> {
    let gpu = gpu_or_skip(GpuOptions::default())?;
    let (config, weights) = fixture_weights(&CodecPlan::compressed());
    let backend = GpuBackend::new(gpu, kv_f16).unwrap();
    Some(Phi3::new(config, weights, backend, 64).unwrap())
}

#[test]
fn a_device_lost_during_generation_is_an_error_on_every_later_call() {
    // Greedy (decoded one pass ahead on the device) and sampled (logits read back every token).
    let sampled = SamplerConfig {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        repeat_penalty: 1.0,
        seed: 7,
    };
    for config in [SamplerConfig::default(), sampled] {
        let Some(mut model) = gpu_model(true) else {
            return;
        };
        let device = model.backend().gpu().device().clone();
        let result = within_a_minute("generation on a lost device", move || {
            let mut sampler = Sampler::new(config).unwrap();
            let mut seen = 0;
            let first = model.generate(&prompt(), 20, &mut sampler, &[], |_| {
                seen += 1;
                // The driver resetting mid-generation, as wgpu reports it.
                if seen == 3 {
                    device.destroy();
                }
            });
            model.reset();
            let second = model.generate(&prompt(), 5, &mut sampler, &[], |_| {});
            (first.map(|g| g.tokens), second.map(|g| g.tokens), seen)
        });
        let (first, second, seen) = result;
        println!(
            "temperature {}: {seen} tokens, then {first:?}; next call {second:?}",
            config.temperature
        );
        for (call, r) in [
            ("the call it happened in", first),
            ("the next call", second),
        ] {
            let err = r.expect_err(call);
            let msg = err.to_string();
            assert!(
                matches!(err, ModelError::Gpu(GpuError::DeviceLost { .. })),
                "{call}: {err:?}"
            );
            assert!(
                msg.contains("was lost") && msg.contains("--backend cpu"),
                "{msg}"
            );
        }
    }
}

#[test]
fn errors_that_escape_the_error_scopes_reach_the_caller() {
    let Some(mut model) = gpu_model(true) else {
        return;
    };
    let want = model
        .generate(&prompt(), 6, &mut Sampler::greedy(), &[], |_| {})
        .unwrap()
        .tokens;
    model.reset();
    // A buffer mapped at creation must have a size that is a multiple of 4: a validation error that
    // no scope of ours catches, made on the model's device by someone else.
    let device = model.backend().gpu().device().clone();
    let _bad = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("not a multiple of 4"),
        size: 6,
        usage: wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: true,
    });
    let err = model
        .generate(&prompt(), 6, &mut Sampler::greedy(), &[], |_| {})
        .expect_err("the escaped error");
    let msg = err.to_string();
    println!("{msg}");
    assert!(
        matches!(err, ModelError::Gpu(GpuError::Wgpu { .. })),
        "{err:?}"
    );
    assert!(
        msg.contains("not a multiple of 4") || msg.contains("multiple of"),
        "{msg}"
    );
    // Reported once: the device is still good, and the next call runs as before.
    model.reset();
    let again = model
        .generate(&prompt(), 6, &mut Sampler::greedy(), &[], |_| {})
        .unwrap()
        .tokens;
    assert_eq!(again, want);
}
