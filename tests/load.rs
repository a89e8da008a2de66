//! Load: 1,000 consecutive generate calls through the library on one loaded model, on the CPU and on
//! the GPU (lavapipe in CI). Resident memory must not grow by more than `RSS_BOUND` over the calls,
//! and the device's live allocations must come back to exactly where they were (with the GPU's
//! bounded caches of kernel parameters and bind groups cleared at both counts): a leak of one buffer
//! per call would show as 1,000 of them. The figures are printed. The two tests take turns, since
//! resident memory is the whole process's.

mod model_common;

use model_common::fixture;
use upg::gpu::{gpu_or_skip, GpuOptions};
use upg::model::{
    Backend, Checkpoint, CodecPlan, Cpu, GpuBackend, HostWeights, Phi3, Sampler, SamplerConfig,
};
use upg::rng::{test_seed, Rng};

const CALLS: usize = 1000;
/// Calls before the first measurement: caches (kernel parameters, bind groups, the allocator's and
/// wgpu's pools) fill in the first calls and are then reused.
const WARM_UP: usize = 50;
/// Growth of resident memory allowed over `CALLS` calls after the warm-up. A leak of one 4 KiB page
/// per call would exceed it; the allocator's free lists stay under it.
const RSS_BOUND: u64 = 4 << 20;

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Resident set size of this process, from /proc (Linux); `None` elsewhere.
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn load<B: Backend>(backend: B) -> Phi3<B> {
    let ckpt = Checkpoint::open(&fixture("phi3-tiny")).unwrap();
    let weights = HostWeights::from_checkpoint(&ckpt, &CodecPlan::compressed()).unwrap();
    Phi3::new(ckpt.config.clone(), weights, backend, 16).unwrap()
}

/// Call `i`: a short random prompt and a few tokens, greedy on even calls and sampled on odd ones
/// (the GPU decodes greedy picks ahead on the device and reads sampled logits back: both paths).
fn call<B: Backend>(model: &mut Phi3<B>, rng: &mut Rng, i: usize) -> usize {
    model.reset();
    let prompt: Vec<u32> = (0..3).map(|_| rng.below(384) as u32).collect();
    let mut sampler = if i.is_multiple_of(2) {
        Sampler::greedy()
    } else {
        Sampler::new(SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.1,
            seed: rng.next_u64(),
        })
        .unwrap()
    };
    let out = model.generate(&prompt, 3, &mut sampler, &[], |_| {});
    out.unwrap().tokens.len()
}

/// Runs `WARM_UP` then `CALLS` calls, checks resident memory over the latter, and returns what
/// `measure` says after the warm-up and at the end.
fn run<B: Backend, T>(model: &mut Phi3<B>, what: &str, measure: impl Fn(&Phi3<B>) -> T) -> (T, T) {
    let mut rng = Rng::new(test_seed(what));
    let mut tokens = 0;
    for i in 0..WARM_UP {
        tokens += call(model, &mut rng, i);
    }
    let first = measure(model);
    let before = rss();
    let started = std::time::Instant::now();
    for i in 0..CALLS {
        tokens += call(model, &mut rng, i);
    }
    let after = rss();
    let last = measure(model);
    assert_eq!(tokens, 3 * (WARM_UP + CALLS), "every call made its tokens");
    let (Some(before), Some(after)) = (before, after) else {
        println!("{what}: no /proc/self/status here: resident memory not checked");
        return (first, last);
    };
    let growth = after as i64 - before as i64;
    println!(
        "{what}: {CALLS} generate calls ({tokens} tokens with the warm-up) in {:.1}s; resident memory {:.1} MiB -> {:.1} MiB ({:+} KiB, bound {} KiB)",
        started.elapsed().as_secs_f64(),
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        growth / 1024,
        RSS_BOUND / 1024
    );
    assert!(
        growth <= RSS_BOUND as i64,
        "{what}: resident memory grew by {growth} bytes over {CALLS} calls (bound {RSS_BOUND})"
    );
    (first, last)
}

#[test]
fn a_thousand_generate_calls_on_the_cpu_hold_memory_steady() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut model = load(Cpu::new());
    run(&mut model, "cpu", |_| ());
}

#[test]
fn a_thousand_generate_calls_on_the_gpu_hold_memory_and_device_buffers_steady() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = gpu_or_skip(GpuOptions::default()) else {
        return;
    };
    let mut model = load(GpuBackend::new(gpu, true).unwrap());
    let (before, after) = run(&mut model, "gpu", |m| {
        let gpu = m.backend().gpu();
        gpu.clear_caches();
        gpu.allocations()
    });
    println!("gpu: live device allocations {before:?} -> {after:?}");
    match (before, after) {
        (Some(b), Some(a)) => assert_eq!(a, b, "device allocations after {CALLS} calls"),
        _ => println!("gpu: this backend reports no allocations: device buffers not checked"),
    }
}
