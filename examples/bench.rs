//! The cross-GPU bench: every adapter wgpu finds (plus the CPU path), and for the chosen one(s) the
//! achievable copy bandwidth and the matrix kernels at LLM shapes.
//!
//! ```sh
//! cargo run --release --example bench -- --list
//! cargo run --release --example bench -- --ops copy,spmv,gemv_f16,decompress --shapes square,phi4 --json out.json
//! cargo run --release --example bench -- --ops gemv_q4 --shapes 100352x5120 --spmv-set "QUADS=1;QUADS=2"
//! cargo run --release --example bench -- --ops copy,gemv_q3,spmv --shapes phi4 --spmv-set "ROWS=2;ROWS=4"
//! ```
//!
//! Times are GPU timestamps around each dispatch (its own compute pass) where the adapter has
//! timestamp queries, wall clock over a batch otherwise (the `timing` column says which); the figure is
//! the median of `--runs`. Weight copies are rotated so that each run reads weights that are not in
//! the cache (at least 256 MB of them, at most 256 copies). GB/s counts the codec's stored bytes (spmv:
//! the file's 25 bytes per 64 weights; gemv_f16: 2 bytes a weight; gemv_q4: 4.5 bits a weight, the
//! scale per 32 included; gemv_q3: 3.125 bits a weight, the scale per 128 included; decompress: compressed bytes read plus f16 bytes written; copy: bytes read
//! plus written). % copy compares with the copy kernel.
//!
//! `spmv_norm` and `spmv_swiglu` are the fused products of a decode step: RMSNorm of x staged with it
//! (qkv, gate_up), and silu(gate) * up of a 2 * cols input staged with it plus the residual add in
//! place (down). `spmv_norm_glu` is gate_up as the model runs it: RMSNorm prologue, rows in SwiGLU
//! pairs and silu(gate) * up written by the epilogue (then down is a plain `spmv`). spmv splits the
//! columns of products with few row tiles (`COL_SPLIT=N` in `--spmv-set` forces N parts, 1 none;
//! `SPLIT_TILES` / `SPLIT_GROUPS` change the rule). `UPG_OVERRIDES="NAME=V,..."` applies the same
//! to every GPU context, the pp / tg model's included (e.g. `SPLIT_TILES=0,SWIGLU_EPILOGUE=0` for the
//! products as before). `gemv_q4` is the q4 codec (group 32), Phi-4's lm_head at 100352 x 5120; `gemv_q3` the
//! dense 3-bit codec (group 128), the sparse codec's equal in bits.
//!
//! `spmm` is the batched product of prefill at `--batch` x rows (tok/s: rows of x per second).
//! `pp` and `tg` (ops `pp`, `tg`) are prompt processing and token generation on a synthetic model
//! (`--model-size tiny|phi-4-mini|phi-4`), like llama-bench's pp512 / tg128: tok/s in `tok_s`.
//! `--merge a.json b.json ...` prints one table from the JSON files of several machines, all their rows
//! or those that `--ops` and `--shapes`, when given, select (copy, pp and tg rows have no matrix shape).
//!
//! Device limits: the copy buffers are capped at the adapter's largest storage binding (lavapipe: 128
//! MiB; the row's variant says so), and an op whose buffers the device cannot hold (a vector over the
//! binding limit, a matrix the upload cannot split, out of memory) is skipped with a note under the
//! table instead of ending the run. `--max-binding-kib` lowers the limit to try this on any machine.

use std::time::{Duration, Instant};

use clap::Parser;
use half::f16;
use rayon::prelude::*;
use upg::format::{Codec, DenseF16, SparseMatrix, Tensor};
use upg::gpu::{DenseKind, Gpu, GpuMatrix, GpuOptions, GpuVector, Prologue};
use upg::model::synthetic::random_tensor;
use upg::model::CodecPlan;
use upg::rng::Rng;

#[derive(Parser, Debug)]
#[command(about = "Bench the upg kernels on every GPU adapter (and the CPU path)")]
struct Args {
    /// List the adapters and exit.
    #[arg(long)]
    list: bool,
    /// Adapter name substring, `all` for every adapter, or `cpu` for the CPU path.
    #[arg(long)]
    adapter: Option<String>,
    /// Comma-separated: copy, spmv, spmv_norm, spmv_swiglu, spmv_norm_glu, gemv_f16, gemv_q4, gemv_q3,
    /// decompress, spmm, pp, tg.
    #[arg(long, default_value = "copy,spmv,gemv_f16,decompress,pp,tg")]
    ops: String,
    /// Comma-separated batch sizes (rows of x) of the spmm op.
    #[arg(long, default_value = "64,512")]
    batch: String,
    /// Synthetic model of the pp / tg rows: tiny, phi-4-mini or phi-4.
    #[arg(long, default_value = "tiny")]
    model_size: String,
    /// Prompt tokens of the pp row.
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Generated tokens of the tg row.
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Print one table from these JSON files (from --json runs on any machines) and exit; --ops and
    /// --shapes, when given, select rows.
    #[arg(long, num_args = 1..)]
    merge: Vec<std::path::PathBuf>,
    /// Comma-separated shapes: N (N x N), RxC (rows x cols), `square` (512..5120), `phi4`.
    #[arg(long, default_value = "square,phi4")]
    shapes: String,
    /// Timed runs per measurement (median reported), after warm-up runs.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Turn off wgpu's shader bounds checks and loop bounding.
    #[arg(long)]
    unchecked: bool,
    /// Configurations to compare in the spmv, spmv_norm, spmv_swiglu, gemv_q4, gemv_q3 and spmm rows,
    /// `;`-separated, each a `,`-separated list of NAME=VALUE override constants of spmv.wgsl,
    /// gemv_q4.wgsl, gemv_q3.wgsl or spmm_coop.wgsl (e.g. "SLICES=4;SLICES=8,ROW_LANES=2;X_LO=0"),
    /// each applied where declared; empty = the launcher's.
    #[arg(long)]
    spmv_set: Option<String>,
    /// Size of the copy buffers in MiB (capped at the device's largest storage binding; 256 on the
    /// CPU path).
    #[arg(long, default_value_t = 1024)]
    copy_mib: u64,
    /// Lower the GPU's largest storage binding to this many KiB (what a smaller device would allow).
    #[arg(long)]
    max_binding_kib: Option<u64>,
    /// Milliseconds of warm-up with the same workload before each timed batch.
    #[arg(long, default_value_t = 300)]
    warm_ms: u64,
    /// RNG seed for the weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Whether --ops and --shapes were on the command line (--merge filters only then).
    #[arg(skip)]
    given: (bool, bool),
}

const PHI4: &[(usize, usize)] = &[
    (7680, 5120),
    (5120, 5120),
    (35840, 5120),
    (5120, 17920),
    (100352, 5120),
];
const SQUARE: &[usize] = &[512, 1024, 2048, 5120];
/// The ops that `--spmv-set` configurations apply to.
const SET_OPS: &[&str] = &[
    "spmv",
    "spmv_norm",
    "spmv_swiglu",
    "spmv_norm_glu",
    "gemv_q4",
    "gemv_q3",
    "spmm",
];
/// Weight bytes each measurement rotates through, so that the 50 MB L2 of an H100 serves none.
const ROTATE_BYTES: usize = 256 << 20;

fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "square" => out.extend(SQUARE.iter().map(|&n| (n, n))),
            "phi4" => out.extend_from_slice(PHI4),
            _ => {
                let (r, c) = part.split_once('x').unwrap_or((part, part));
                let num = |v: &str| {
                    v.parse::<usize>()
                        .map_err(|_| format!("bad shape '{part}': use N, RxC, square or phi4"))
                };
                out.push((num(r)?, num(c)?));
            }
        }
    }
    Ok(out)
}

/// One measurement: the JSON record of `--json`, the same fields on every machine so files merge.
#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Row {
    adapter: String,
    backend: String,
    device_type: String,
    driver: String,
    op: String,
    variant: String,
    /// "RxC", or the token count of pp / tg rows, or "-" for copy.
    shape: String,
    rows: usize,
    cols: usize,
    /// "gpu-timestamp" or "wall".
    timer: String,
    runs: usize,
    copies: usize,
    median_us: f64,
    min_us: f64,
    max_us: f64,
    p10_us: f64,
    p90_us: f64,
    bytes: u64,
    gbps: f64,
    pct_of_copy: Option<f64>,
    /// pp / tg rows: tokens per second.
    tok_s: Option<f64>,
    /// The seed project's time for the same op and shape divided by ours (> 1: faster), where the seed
    /// measured one (see [`seed_us`]).
    vs_seed: Option<f64>,
}

/// The seed project's published figures, microseconds: CPU SpMV at 5120 x 5120 (13.3 ms), CPU
/// decompression of 5120 x 5120 (16.3 ms, to f32; compared with our f16 output, which writes half the
/// bytes), and its projected Phi-4 decode of 55 tok/s.
fn seed_us(backend: &str, op: &str, shape: &str, model: &str) -> Option<f64> {
    match (backend == "cpu", op, shape) {
        (true, "spmv", "5120x5120") => Some(13_300.0),
        (true, "decompress", "5120x5120") => Some(16_300.0),
        (_, "tg", _) if model == "phi-4" => Some(1e6 / 55.0),
        _ => None,
    }
}

/// Where a row was measured.
#[derive(Clone)]
struct Device {
    adapter: String,
    backend: String,
    device_type: String,
    driver: String,
}

impl Device {
    fn of(gpu: &Gpu) -> Self {
        let i = gpu.info();
        Self {
            adapter: i.name.clone(),
            backend: format!("{:?}", i.backend),
            device_type: format!("{:?}", i.device_type),
            driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
        }
    }

    fn cpu() -> Self {
        Self {
            adapter: format!(
                "CPU path ({})",
                upg::cpu::Simd::detect().map_or("scalar", |s| s.name())
            ),
            backend: "cpu".into(),
            device_type: "Cpu".into(),
            driver: format!("{} threads", rayon::current_num_threads()),
        }
    }

    /// A row from sorted times `t` (microseconds).
    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        op: &str,
        variant: String,
        (rows, cols): (usize, usize),
        timer: &str,
        copies: usize,
        t: &mut [f64],
        bytes: u64,
        copy_gbps: Option<f64>,
    ) -> Row {
        let (median, min, max, p10, p90) = stats(t);
        let gbps = bytes as f64 / median / 1e3;
        let pct_of_copy = copy_gbps.filter(|_| op != "copy").map(|c| 100.0 * gbps / c);
        eprintln!(
            "{:<24} {op:<11} {variant:<16} {rows:>6} x {cols:<6} {median:>10.1} us {gbps:>8.1} GB/s {}",
            self.adapter,
            pct_of_copy.map_or(String::new(), |p| format!("{p:5.1}% of copy"))
        );
        Row {
            adapter: self.adapter.clone(),
            backend: self.backend.clone(),
            device_type: self.device_type.clone(),
            driver: self.driver.clone(),
            op: op.into(),
            variant,
            shape: if op == "copy" {
                "-".into()
            } else {
                format!("{rows}x{cols}")
            },
            rows,
            cols,
            timer: timer.into(),
            runs: t.len(),
            copies,
            median_us: median,
            min_us: min,
            max_us: max,
            p10_us: p10,
            p90_us: p90,
            bytes,
            gbps,
            pct_of_copy,
            tok_s: None,
            vs_seed: seed_us(&self.backend, op, &format!("{rows}x{cols}"), "").map(|s| s / median),
        }
    }
}

/// Median, minimum, maximum, 10th and 90th percentiles of `t`.
fn stats(t: &mut [f64]) -> (f64, f64, f64, f64, f64) {
    t.sort_by(f64::total_cmp);
    let q = |f: f64| t[((t.len() - 1) as f64 * f) as usize];
    (q(0.5), t[0], t[t.len() - 1], q(0.1), q(0.9))
}

/// `bytes` in MiB, or KiB when not a whole number of MiB.
fn size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// A buffer of an op that the device cannot bind: the op is skipped, not the run.
#[derive(Debug)]
struct OverLimit(String);

impl std::fmt::Display for OverLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OverLimit {}

/// Fails with [`OverLimit`] when one of `buffers` (name, bytes) is larger than one binding may be.
fn check_fits(gpu: &Gpu, buffers: &[(&str, u64)]) -> Result<(), OverLimit> {
    let max = gpu.limits().max_binding_bytes;
    match buffers.iter().find(|(_, b)| *b > max) {
        Some((name, b)) => Err(OverLimit(format!(
            "the {name} buffer ({b} bytes) exceeds the device's largest storage binding ({max} bytes)"
        ))),
        None => Ok(()),
    }
}

/// Why `e` means "this device cannot hold the op" (skip it) rather than a failure of the bench: a
/// buffer over a limit, a matrix the upload cannot split into bindings, or the device out of memory.
fn skip_reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use upg::gpu::GpuError;
    if let Some(o) = e.downcast_ref::<OverLimit>() {
        return Some(o.0.clone());
    }
    let gpu = e.downcast_ref::<GpuError>().or(match e.downcast_ref() {
        Some(upg::model::ModelError::Gpu(g)) => Some(g),
        _ => None,
    })?;
    match gpu {
        GpuError::Layout(_) => Some(gpu.to_string()),
        GpuError::Wgpu { reason, .. } if reason.to_lowercase().contains("out of memory") => {
            Some(gpu.to_string())
        }
        _ => None,
    }
}

/// Times `runs` dispatches recorded by `record(pass, i)`, each in its own pass: GPU timestamps when the
/// adapter has them, else wall clock over one batch (every run then gets the mean).
fn time_runs(
    gpu: &Gpu,
    runs: usize,
    mut record: impl FnMut(&mut wgpu::ComputePass<'_>, usize) -> upg::gpu::Result<()>,
) -> upg::gpu::Result<(Vec<f64>, &'static str)> {
    let dev = gpu.device();
    let mut enc = dev.create_command_encoder(&Default::default());
    if gpu.features().timestamps {
        let qs = dev.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * runs as u32,
        });
        for i in 0..runs {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &qs,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            record(&mut pass, i)?;
        }
        let resolved = dev.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16 * runs as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        enc.resolve_query_set(&qs, 0..2 * runs as u32, &resolved, 0);
        gpu.submit_and_wait(enc.finish())?;
        let ticks: Vec<u64> =
            bytemuck::pod_collect_to_vec(&gpu.read_bytes(&resolved, 0, 16 * runs as u64)?);
        let period = gpu.queue().get_timestamp_period() as f64;
        let t = ticks
            .chunks_exact(2)
            .map(|p| p[1].saturating_sub(p[0]) as f64 * period / 1e3)
            .collect();
        Ok((t, "gpu-timestamp"))
    } else {
        for i in 0..runs {
            let mut pass = enc.begin_compute_pass(&Default::default());
            record(&mut pass, i)?;
        }
        let start = Instant::now();
        gpu.submit_and_wait(enc.finish())?;
        let each = start.elapsed().as_secs_f64() * 1e6 / runs as f64;
        Ok((vec![each; runs], "wall"))
    }
}

/// Random f16 weights (sign, exponent in a typical range, random mantissa), fast for 500M values.
fn random_f16(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut values = vec![f16::ZERO; rows * cols];
    values
        .par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let mut rng = Rng::new(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for v in row.iter_mut() {
                let b = rng.next_u64();
                let exp = 6 + (b >> 11) % 7; // 2^-9 .. 2^-3
                *v = f16::from_bits(
                    ((b >> 15) as u16 & 0x8000) | ((exp as u16) << 10) | (b as u16 & 0x3FF),
                );
            }
        });
    Tensor::F16(DenseF16 {
        rows,
        cols,
        values: values.into(),
    })
}

struct Bench<'a> {
    args: &'a Args,
    device: Device,
    copy_gbps: Option<f64>,
    rows: Vec<Row>,
    /// Ops skipped because the device cannot hold their buffers, one line each.
    notes: Vec<String>,
}

impl Bench<'_> {
    #[allow(clippy::too_many_arguments)]
    fn measure(
        &mut self,
        gpu: &Gpu,
        op: &str,
        variant: String,
        (rows, cols): (usize, usize),
        bytes: u64,
        copies: usize,
        mut record: impl FnMut(&mut wgpu::ComputePass<'_>, usize) -> upg::gpu::Result<()>,
    ) -> upg::gpu::Result<()> {
        // Warm-up by time, right before the timed batch: an idle GPU drops its SM clock, and the host
        // spends seconds uploading weights between measurements. With a 10-run warm-up, batches on an
        // H100 ran at whatever clock the GPU was in: identical kernels differed up to 4x.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(self.args.warm_ms) {
            time_runs(gpu, 20, &mut record)?;
        }
        let (mut t, timer) = time_runs(gpu, self.args.runs, &mut record)?;
        let row = self.device.row(
            op,
            variant,
            (rows, cols),
            timer,
            copies,
            &mut t,
            bytes,
            self.copy_gbps,
        );
        self.rows.push(row);
        Ok(())
    }

    /// Keeps going after an op that the device cannot hold (a note says why); other errors end the run.
    fn settle(
        &mut self,
        what: &str,
        done: Result<(), Box<dyn std::error::Error>>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        match done {
            Err(e) => match skip_reason(e.as_ref()) {
                Some(why) => {
                    let note = format!("{}: {what} skipped: {why}", self.device.adapter);
                    eprintln!("{note}");
                    self.notes.push(note);
                    Ok(())
                }
                None => Err(e),
            },
            ok => ok,
        }
    }

    fn copy(&mut self, gpu: &Gpu) -> Result<(), Box<dyn std::error::Error>> {
        // Both buffers are bound whole, so neither may exceed the largest storage binding; the copy
        // kernel moves 16 bytes a thread.
        let want = self.args.copy_mib << 20;
        let bytes = want.min(gpu.limits().max_binding_bytes / 16 * 16);
        if bytes == 0 {
            return Err(
                OverLimit("the device's largest storage binding is under 16 bytes".into()).into(),
            );
        }
        let variant = if bytes < want {
            format!(
                "{} (device binding limit; asked {})",
                size(bytes),
                size(want)
            )
        } else {
            size(bytes)
        };
        let oom = gpu
            .device()
            .push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let make = |label| {
            gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let (a, b) = (make("copy a"), make("copy b"));
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(upg::gpu::GpuError::Wgpu {
                what: format!("allocating two copy buffers of {}", size(bytes)),
                reason: e.to_string(),
            }
            .into());
        }
        self.measure(gpu, "copy", variant, (0, 0), 2 * bytes, 1, |pass, i| {
            // Alternate direction so that no run reads what the last one wrote into the cache.
            let (s, d) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
            gpu.copy(pass, s, d, bytes)
        })?;
        self.copy_gbps = self.rows.last().map(|r| r.gbps);
        Ok(())
    }

    fn op(
        &mut self,
        gpu: &Gpu,
        op: &str,
        (rows, cols): (usize, usize),
        sparse: &Tensor,
        label: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        // Every op here reads x (cols) and writes y (rows), padded to 64-value blocks.
        let vec_bytes = |n: usize| (n.div_ceil(64).max(1) * 64 * 4) as u64;
        check_fits(gpu, &[("x", vec_bytes(cols)), ("y", vec_bytes(rows))])?;
        let mut rng = Rng::new(self.args.seed ^ 0xA5A5);
        let x: GpuVector = gpu.vector(&rng.normal_vec(cols, 1.0))?;
        let y = gpu.zeros(rows)?;
        let shape = (rows, cols);
        match op {
            // RMSNorm prologue: qkv as it runs in the model; with `_glu`, gate_up as it runs in the
            // model (rows in SwiGLU pairs, silu(gate) * up written: rows / 2 values).
            "spmv_norm" | "spmv_norm_glu" => {
                let glu = op == "spmv_norm_glu";
                let ws = if glu {
                    let ws = (0..uploads_count(sparse))
                        .map(|_| gpu.upload_gate_up(sparse))
                        .collect::<upg::gpu::Result<Vec<_>>>()?;
                    if !ws[0].swiglu_pairs() {
                        return Err(OverLimit(format!(
                            "{rows} rows cannot be SwiGLU pairs (a multiple of 32 rows is needed)"
                        ))
                        .into());
                    }
                    ws
                } else {
                    uploads(gpu, sparse)?
                };
                let n = ws.len();
                let h = gpu.zeros(rows / 2)?;
                let g = gpu.vector(&(0..cols).map(|_| rng.range(0.5, 1.5)).collect::<Vec<_>>())?;
                let prologue = Prologue::Norm {
                    weight: &g,
                    eps: 1e-5,
                };
                self.measure(
                    gpu,
                    op,
                    split_label(gpu, &ws[0], label),
                    shape,
                    sparse.stored_bytes() as u64,
                    n,
                    |pass, i| {
                        if glu {
                            gpu.matvec_swiglu(pass, &ws[i % n], &x, &h, prologue)
                        } else {
                            gpu.matvec_fused(pass, &ws[i % n], &x, &y, None, prologue)
                        }
                    },
                )?;
                Ok(())
            }
            "spmv_swiglu" => {
                check_fits(gpu, &[("gate_up", vec_bytes(2 * cols))])?;
                let ws = uploads(gpu, sparse)?;
                let n = ws.len();
                let gate_up = gpu.vector(&rng.normal_vec(2 * cols, 1.0))?;
                self.measure(
                    gpu,
                    op,
                    split_label(gpu, &ws[0], label),
                    shape,
                    sparse.stored_bytes() as u64,
                    n,
                    |pass, i| {
                        gpu.matvec_fused(pass, &ws[i % n], &gate_up, &y, Some(&y), Prologue::SwiGlu)
                    },
                )?;
                Ok(())
            }
            // The plain products: the sparse matrix of the shape, or a dense one made for the op.
            "spmv" | "gemv_f16" | "gemv_q4" | "gemv_q3" => {
                let dense;
                let w = match op {
                    "spmv" => sparse,
                    "gemv_f16" => {
                        dense = random_f16(rows, cols, self.args.seed);
                        &dense
                    }
                    _ => {
                        let codec = if op == "gemv_q4" {
                            Codec::Q4
                        } else {
                            Codec::Q3
                        };
                        let plan = CodecPlan::compressed();
                        dense = random_tensor(rows, cols, codec, 0.02, self.args.seed, &plan);
                        &dense
                    }
                };
                let ws = uploads(gpu, w)?;
                let n = ws.len();
                self.measure(
                    gpu,
                    op,
                    split_label(gpu, &ws[0], label),
                    shape,
                    w.stored_bytes() as u64,
                    n,
                    |pass, i| gpu.matvec(pass, &ws[i % n], &x, &y, None),
                )?;
                Ok(())
            }
            "decompress" => {
                let ws = uploads(gpu, sparse)?;
                let n = ws.len();
                let out = gpu.dense_zeros(rows, cols, DenseKind::F16)?;
                let bytes = sparse.stored_bytes() as u64 + (rows * cols * 2) as u64;
                self.measure(
                    gpu,
                    op,
                    format!("{label} f16"),
                    shape,
                    bytes,
                    n,
                    |pass, i| gpu.decompress(pass, &ws[i % n], &out),
                )?;
                Ok(())
            }
            "spmm" => {
                let ws = uploads(gpu, sparse)?;
                let n = ws.len();
                for batch in self
                    .args
                    .batch
                    .split(',')
                    .map(|b| b.trim().parse::<usize>())
                {
                    let batch =
                        batch.map_err(|e| upg::gpu::GpuError::Shape(format!("--batch: {e}")))?;
                    let x = gpu.vector(&rng.normal_vec(batch * cols, 1.0))?;
                    let y = gpu.zeros(batch * rows)?;
                    self.measure(
                        gpu,
                        op,
                        format!("{label} n={batch}"),
                        shape,
                        sparse.stored_bytes() as u64,
                        n,
                        |pass, i| gpu.matmat(pass, &ws[i % n], &x, &y, batch, None),
                    )?;
                    if let Some(r) = self.rows.last_mut() {
                        r.tok_s = Some(batch as f64 * 1e6 / r.median_us);
                        // Kept weights (half) times rows of x, two flops each.
                        let tflops = (rows * cols * batch) as f64 / r.median_us / 1e6;
                        eprintln!("    spmm n={batch}: {tflops:.2} TFLOP/s of kept weights");
                    }
                }
                Ok(())
            }
            other => {
                eprintln!("unknown op '{other}' (use copy, spmv, spmv_norm, spmv_swiglu, spmv_norm_glu, gemv_f16, gemv_q4, gemv_q3, decompress, spmm, pp, tg)");
                Ok(())
            }
        }
    }
}

/// Enough copies of `w` on the device that cycling through them defeats the cache.
fn uploads(gpu: &Gpu, w: &Tensor) -> upg::gpu::Result<Vec<GpuMatrix>> {
    (0..uploads_count(w)).map(|_| gpu.upload(w)).collect()
}

/// `label`, plus the column parts where spmv splits `w` (the launcher's rule or a COL_SPLIT set).
fn split_label(gpu: &Gpu, w: &GpuMatrix, label: &str) -> String {
    match gpu.spmv_parts(w) {
        Ok(p) if p > 1 => format!("{label} (split {p})"),
        _ => label.to_string(),
    }
}

fn uploads_count(w: &Tensor) -> usize {
    ROTATE_BYTES.div_ceil(w.stored_bytes().max(1)).clamp(1, 256)
}

/// The adapter to open: a name substring, and one backend when the name alone is ambiguous (the same
/// device can be offered through Vulkan and GL).
type Pick = (String, Option<wgpu::Backend>);

fn options(
    args: &Args,
    (adapter, backend): &Pick,
    spmv: &[(String, f64)],
) -> Result<GpuOptions, upg::gpu::GpuError> {
    let mut env = GpuOptions::from_env()?;
    if let Some(b) = backend {
        env.backends = wgpu::Backends::from(*b);
    }
    Ok(GpuOptions {
        adapter: (!adapter.is_empty())
            .then(|| adapter.to_string())
            .or(env.adapter),
        runtime_checks: !args.unchecked,
        // UPG_OVERRIDES first, so that a set of --spmv-set wins where both name a constant.
        overrides: [env.overrides.clone(), spmv.to_vec()].concat(),
        limits: upg::gpu::LimitOverrides {
            max_binding_bytes: args
                .max_binding_kib
                .map(|k| k << 10)
                .or(env.limits.max_binding_bytes),
            ..env.limits
        },
        ..env
    })
}

fn bench_gpu(
    args: &Args,
    adapter: &Pick,
    ops: &[&str],
    shapes: &[(usize, usize)],
    notes: &mut Vec<String>,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let gpu = Gpu::new(&options(args, adapter, &[])?)?;
    eprintln!("adapter: {} ({:?})", gpu.describe(), gpu.features());
    let mut others: Vec<(String, Gpu)> = Vec::new();
    for set in args.spmv_set.iter().flat_map(|s| s.split(';')) {
        let mut spmv = Vec::new();
        for kv in set.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or(format!("'{kv}' is not NAME=VALUE"))?;
            spmv.push((k.to_string(), v.parse::<f64>()?));
        }
        others.push((
            set.trim().to_string(),
            Gpu::new(&options(args, adapter, &spmv)?)?,
        ));
    }
    let checks = if args.unchecked {
        "unchecked"
    } else {
        "checked"
    };
    let mut bench = Bench {
        args,
        device: Device::of(&gpu),
        copy_gbps: None,
        rows: Vec::new(),
        notes: Vec::new(),
    };
    if ops.contains(&"copy") {
        let done = bench.copy(&gpu);
        bench.settle("copy", done)?;
    }
    for &shape in shapes {
        let mut rng = Rng::new(args.seed);
        let sparse = Tensor::Sparse(SparseMatrix::random(shape.0, shape.1, 128, &mut rng)?);
        for &op in ops.iter().filter(|&&o| !matches!(o, "copy" | "pp" | "tg")) {
            let what = format!("{op} {}x{}", shape.0, shape.1);
            if SET_OPS.contains(&op) && !others.is_empty() {
                for (set, g) in &others {
                    let done = bench.op(g, op, shape, &sparse, &format!("{checks} {set}"));
                    bench.settle(&what, done)?;
                }
            } else {
                let done = bench.op(&gpu, op, shape, &sparse, checks);
                bench.settle(&what, done)?;
            }
        }
    }
    if ops.iter().any(|o| matches!(*o, "pp" | "tg")) {
        let device = bench.device.clone();
        let model = upg::model::GpuBackend::new(gpu, true)
            .map_err(Into::into)
            .and_then(|backend| bench_model(args, ops, &device, backend));
        let done = model.map(|rows| bench.rows.extend(rows));
        bench.settle(&format!("pp/tg ({})", args.model_size), done)?;
    }
    notes.extend(bench.notes);
    Ok(bench.rows)
}

/// pp and tg rows: prompt processing and generation speed of a synthetic model on `backend`.
fn bench_model<B: upg::model::Backend>(
    args: &Args,
    ops: &[&str],
    device: &Device,
    backend: B,
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    use upg::model::{synthetic, Config, Phi3, Sampler};
    let config = Config::preset(&args.model_size)?;
    let weights = synthetic(&config, args.seed, &CodecPlan::compressed());
    let bytes = weights.stored_bytes() as u64;
    let ctx = (args.pp + args.tg).min(config.max_position_embeddings);
    let mut model = Phi3::new(config.clone(), weights, backend, ctx)?;
    let mut rng = Rng::new(args.seed);
    let mut tokens = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.below(config.vocab_size) as u32)
            .collect()
    };
    let mut rows = Vec::new();
    let push = |op: &str, n: usize, secs: f64, rows: &mut Vec<Row>| {
        let mut t = [secs * 1e6 / n as f64];
        let mut r = device.row(
            op,
            args.model_size.clone(),
            (0, 0),
            "wall",
            1,
            &mut t,
            bytes,
            None,
        );
        r.shape = format!("{op}{n}");
        r.tok_s = Some(n as f64 / secs);
        r.vs_seed = seed_us(&r.backend, op, "", &args.model_size).map(|s| s / t[0]);
        eprintln!(
            "{:<24} {op}{n}: {:.1} tok/s",
            device.adapter,
            n as f64 / secs
        );
        rows.push(r);
    };
    // Untimed passes build the pipelines of a batch and of a single position.
    model.forward(&tokens(2))?;
    model.sample(&mut Sampler::greedy())?;
    model.forward(&tokens(1))?;
    model.sample(&mut Sampler::greedy())?;
    if ops.contains(&"pp") {
        model.reset();
        let prompt = tokens(args.pp.min(ctx));
        let start = Instant::now();
        model.forward(&prompt)?;
        model.sample(&mut Sampler::greedy())?;
        push("pp", prompt.len(), start.elapsed().as_secs_f64(), &mut rows);
    }
    if ops.contains(&"tg") {
        model.reset();
        let first = tokens(1);
        let n = args.tg.min(ctx - 1);
        let out = model.generate(&first, n + 1, &mut Sampler::greedy(), &[], |_| {})?;
        push("tg", n, out.decode_time.as_secs_f64(), &mut rows);
    }
    Ok(rows)
}

/// The CPU path: the same ops through `upg::cpu` (SIMD, all cores), timed by wall clock.
fn bench_cpu(
    args: &Args,
    ops: &[&str],
    shapes: &[(usize, usize)],
) -> Result<Vec<Row>, Box<dyn std::error::Error>> {
    let device = Device::cpu();
    let runs = args.runs.clamp(1, 20);
    let mut out = Vec::new();
    let time = |f: &mut dyn FnMut() -> Result<(), upg::cpu::CpuError>| -> Result<Vec<f64>, upg::cpu::CpuError> {
        f()?;
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                f().map(|()| start.elapsed().as_secs_f64() * 1e6)
            })
            .collect()
    };
    let mut copy_gbps = None;
    if ops.contains(&"copy") {
        // Larger buffers measure the same DRAM bandwidth and only take memory.
        let n = (args.copy_mib.min(256) << 20) as usize;
        let (a, mut b) = (vec![1u8; n], vec![0u8; n]);
        let mut t = time(&mut || {
            b.par_chunks_mut(1 << 20)
                .zip(a.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            Ok(())
        })?;
        let mut variant = size(n as u64);
        if args.copy_mib > 256 {
            variant += &format!(" (CPU cap; asked {})", size(args.copy_mib << 20));
        }
        let r = device.row(
            "copy",
            variant,
            (0, 0),
            "wall",
            1,
            &mut t,
            2 * n as u64,
            None,
        );
        copy_gbps = Some(r.gbps);
        out.push(r);
    }
    for &(rows, cols) in shapes {
        let mut rng = Rng::new(args.seed);
        let sparse = Tensor::Sparse(SparseMatrix::random(rows, cols, 128, &mut rng)?);
        let x = rng.normal_vec(cols, 1.0);
        let mut y = vec![0.0; rows];
        for &op in ops {
            let (mut t, bytes) = match op {
                "spmv" => (
                    time(&mut || upg::cpu::spmv(&sparse, &x, &mut y))?,
                    sparse.stored_bytes() as u64,
                ),
                "gemv_f16" | "gemv_q3" => {
                    let w = match op {
                        "gemv_q3" => {
                            let plan = CodecPlan::compressed();
                            random_tensor(rows, cols, Codec::Q3, 0.02, args.seed, &plan)
                        }
                        _ => random_f16(rows, cols, args.seed),
                    };
                    (
                        time(&mut || upg::cpu::spmv(&w, &x, &mut y))?,
                        w.stored_bytes() as u64,
                    )
                }
                "decompress" => {
                    let mut d = vec![f16::ZERO; rows * cols];
                    let t = time(&mut || upg::cpu::decompress_f16(&sparse, &mut d))?;
                    (t, (sparse.stored_bytes() + rows * cols * 2) as u64)
                }
                _ => continue,
            };
            let variant = if op == "decompress" { "f16" } else { "" };
            out.push(device.row(
                op,
                variant.into(),
                (rows, cols),
                "wall",
                1,
                &mut t,
                bytes,
                copy_gbps,
            ));
        }
    }
    if ops.iter().any(|o| matches!(*o, "pp" | "tg")) {
        out.extend(bench_model(args, ops, &device, upg::model::Cpu::new())?);
    }
    Ok(out)
}

fn print_table(rows: &[Row]) {
    println!("| adapter | backend | type | op | variant | shape | timer | median us | min-max us | GB/s | % of copy | tok/s | vs seed |");
    println!("|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|");
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".to_string(), f);
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1}-{:.1} | {:.3} | {} | {} | {} |",
            r.adapter,
            r.backend,
            r.device_type,
            r.op,
            r.variant,
            r.shape,
            r.timer,
            r.median_us,
            r.min_us,
            r.max_us,
            r.gbps,
            opt(r.pct_of_copy, &|p| format!("{p:.0}%")),
            opt(r.tok_s, &|t| format!("{t:.1}")),
            opt(r.vs_seed, &|v| format!("{v:.2}x")),
        );
    }
}

fn op_list(args: &Args) -> Vec<&str> {
    args.ops.split(',').map(str::trim).collect()
}

fn main() {
    use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let mut args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = |name| matches.value_source(name) == Some(ValueSource::CommandLine);
    args.given = (given("ops"), given("shapes"));
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    if !args.merge.is_empty() {
        let mut rows: Vec<Row> = Vec::new();
        for path in &args.merge {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let more: Vec<Row> = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a bench JSON file: {e}", path.display()))?;
            rows.extend(more);
        }
        let (ops, shapes) = (op_list(args), parse_shapes(&args.shapes)?);
        let (ops_given, shapes_given) = args.given;
        rows.retain(|r| {
            (!ops_given || ops.contains(&r.op.as_str()))
                && (!shapes_given
                    || matches!(r.op.as_str(), "copy" | "pp" | "tg")
                    || shapes.contains(&(r.rows, r.cols)))
        });
        print_table(&rows);
        return Ok(());
    }
    // UPG_BACKEND=cpu (or a machine with no GPU) leaves the CPU path alone.
    let backends = GpuOptions::from_env()
        .map(|o| o.backends)
        .unwrap_or(wgpu::Backends::empty());
    let adapters = Gpu::adapters(backends);
    println!(
        "| # | adapter | backend | type | driver | f16 | subgroups | timestamps | matrix units |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, a) in adapters.iter().enumerate() {
        println!(
            "| {i} | {} | {:?} | {:?} | {} | {} | {} | {} | {} |",
            a.name,
            a.backend,
            a.device_type,
            a.driver,
            a.f16,
            a.subgroups,
            a.timestamps,
            a.cooperative_matrix
        );
    }
    println!("| - | CPU path (upg::cpu) | - | - | - | - | - | - | - |\n");
    if args.list {
        return Ok(());
    }
    let shapes = parse_shapes(&args.shapes)?;
    let ops = op_list(args);
    let which = args.adapter.clone().unwrap_or_default().to_lowercase();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let names: Vec<Option<Pick>> = match which.as_str() {
        "all" => adapters
            .iter()
            .map(|a| Some((a.name.clone(), Some(a.backend))))
            .chain([None])
            .collect(),
        "cpu" => vec![None],
        "" => vec![Some((String::new(), None))],
        _ => vec![Some((which.clone(), None))],
    };
    for name in names {
        match name {
            // No adapter and none asked for by name: the CPU rows alone, so the tool runs anywhere.
            Some(name) if name.0.is_empty() && adapters.is_empty() => {
                eprintln!("no GPU adapter: measuring the CPU path only");
                rows.extend(bench_cpu(args, &ops, &shapes)?)
            }
            Some(name) => rows.extend(bench_gpu(args, &name, &ops, &shapes, &mut notes)?),
            None => rows.extend(bench_cpu(args, &ops, &shapes)?),
        }
    }
    print_table(&rows);
    if !notes.is_empty() {
        println!("\nSkipped (the device cannot hold their buffers):\n");
        for n in &notes {
            println!("- {n}");
        }
    }
    if let Some(path) = &args.json {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&rows)?)?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}
