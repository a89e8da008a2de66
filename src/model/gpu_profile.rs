//! Per-op GPU time of [`super::GpuBackend`]'s passes, opt in with `UPG_PROFILE=1` on an adapter with
//! timestamps inside compute passes: a timestamp when a pass opens and one after every recorded op, so
//! op i's time is stamp i + 1 - stamp i (its dispatches and the barrier wait before the next). Read back
//! after each pass with a second small submission, which slows the wall clock a little but not the GPU
//! figures. Without `UPG_PROFILE` nothing here is created and the passes carry no timestamps.

use std::collections::BTreeMap;

use crate::gpu::{Gpu, GpuError};

/// Timestamps one pass may hold; a longer pass is left out of the table.
const CAPACITY: u32 = 4096;

pub(crate) struct Profiler {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    /// Label of the op that ends at stamp i + 1 of the pass being recorded (stamp 0 opens it).
    labels: Vec<String>,
    /// Whether stamp 0 of the pass being recorded is written.
    open: bool,
    /// Per label over all profiled passes: ops, nanoseconds.
    totals: BTreeMap<String, (usize, f64)>,
    /// Profiled passes and their GPU time (first stamp to last) in nanoseconds.
    passes: usize,
    pass_ns: f64,
    period_ns: f64,
}

impl Profiler {
    /// A profiler when `UPG_PROFILE` is set to something other than 0 and the adapter can time ops
    /// inside a pass; `None` (and a note on stderr when asked for but impossible) otherwise.
    pub(crate) fn from_env(gpu: &Gpu) -> Option<Self> {
        let on = std::env::var("UPG_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
        if !on {
            return None;
        }
        if !gpu.features().timestamps_in_passes {
            eprintln!(
                "UPG_PROFILE: {} has no timestamp queries inside passes; no per-op profile",
                gpu.describe()
            );
            return None;
        }
        let device = gpu.device();
        let queries = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: CAPACITY,
        });
        let resolved = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile stamps"),
            size: 8 * CAPACITY as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(Self {
            queries,
            resolved,
            labels: Vec::new(),
            open: false,
            totals: BTreeMap::new(),
            passes: 0,
            pass_ns: 0.0,
            period_ns: gpu.queue().get_timestamp_period() as f64,
        })
    }

    /// Stamp 0: call right after the pass of a fresh recording opens.
    pub(crate) fn start(&mut self, pass: &mut wgpu::ComputePass<'static>) {
        self.labels.clear();
        self.open = true;
        pass.write_timestamp(&self.queries, 0);
    }

    /// The stamp that ends op `label` (a later pass of the same recording continues the count).
    pub(crate) fn stamp(&mut self, pass: &mut wgpu::ComputePass<'static>, label: String) {
        let i = self.labels.len() as u32 + 1;
        if self.open && i < CAPACITY {
            pass.write_timestamp(&self.queries, i);
        }
        self.labels.push(label);
    }

    /// Forgets the recording (it was submitted without a read-back, e.g. between prefill positions).
    pub(crate) fn discard(&mut self) {
        self.labels.clear();
        self.open = false;
    }

    /// Resolves the stamps into `encoder` (call before it is submitted); false when there are none.
    pub(crate) fn resolve(&mut self, encoder: &mut wgpu::CommandEncoder) -> bool {
        let n = self.labels.len() as u32 + 1;
        if !self.open || n >= CAPACITY {
            self.discard();
            return false;
        }
        encoder.resolve_query_set(&self.queries, 0..n, &self.resolved, 0);
        true
    }

    /// Reads the resolved stamps of the submitted pass and adds them to the totals.
    pub(crate) fn collect(&mut self, gpu: &Gpu) -> Result<(), GpuError> {
        let n = self.labels.len() + 1;
        let bytes = gpu.read_bytes(&self.resolved, 0, 8 * n as u64)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        for (i, label) in self.labels.drain(..).enumerate() {
            let ns = ticks[i + 1].saturating_sub(ticks[i]) as f64 * self.period_ns;
            let e = self.totals.entry(label).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ns;
        }
        self.pass_ns += ticks[n - 1].saturating_sub(ticks[0]) as f64 * self.period_ns;
        self.passes += 1;
        self.open = false;
        Ok(())
    }

    /// A markdown table per op label: ops per pass, microseconds per pass, share of the pass time.
    pub(crate) fn table(&self) -> String {
        if self.passes == 0 {
            return "profile: no pass was timed".into();
        }
        let p = self.passes as f64;
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut s = format!(
            "per-op GPU time, mean of {} passes: {:.1} us per pass (first to last timestamp)\n\n\
             | op | per pass | us per pass | us each | % |\n|---|---:|---:|---:|---:|\n",
            self.passes,
            self.pass_ns / p / 1e3
        );
        for (label, &(count, ns)) in rows {
            s += &format!(
                "| {label} | {:.0} | {:.1} | {:.2} | {:.1} |\n",
                count as f64 / p,
                ns / p / 1e3,
                ns / count as f64 / 1e3,
                100.0 * ns / self.pass_ns
            );
        }
        s
    }
}
