//! The bench tool (examples/bench.rs) on the smallest shapes: it runs on the CPU path and on the GPU
//! adapter, writes one JSON record per row with the fields the merge and BENCHMARKS.md rely on, and its
//! GB/s is the bytes it says it moved divided by the median time. `--merge` reads its own output back.

use std::path::PathBuf;
use std::process::Command;

use upg::gpu::{gpu_or_skip, GpuOptions};

/// target/<profile>/examples/bench, built by `cargo test` beside this test's binary in deps/.
fn bench_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    dir.join("examples")
        .join(format!("bench{}", std::env::consts::EXE_SUFFIX))
}

fn run(args: &[&str]) -> String {
    let out = Command::new(bench_binary())
        .args(args)
        .output()
        .expect("bench runs");
    assert!(
        out.status.success(),
        "bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bench_writes_consistent_json_for_cpu_and_gpu() {
    let dir = std::env::temp_dir().join(format!("upg-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let common = [
        "--shapes",
        "64x100",
        "--runs",
        "3",
        "--copy-mib",
        "4",
        "--warm-ms",
        "5",
        "--pp",
        "8",
        "--tg",
        "4",
    ];
    let mut adapters = vec!["cpu"];
    if gpu_or_skip(GpuOptions::default()).is_some() {
        adapters.push("");
    }
    let mut files = Vec::new();
    for adapter in adapters {
        let json = dir.join(format!(
            "rows-{}.json",
            if adapter.is_empty() { "gpu" } else { adapter }
        ));
        let mut args = vec!["--json", json.to_str().unwrap()];
        if !adapter.is_empty() {
            args.extend(["--adapter", adapter]);
        }
        args.extend(common);
        run(&args);
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
        for op in ["copy", "spmv", "gemv_f16", "decompress", "pp", "tg"] {
            assert!(ops.contains(&op), "{adapter:?}: no {op} row in {ops:?}");
        }
        for r in &rows {
            for field in [
                "adapter",
                "backend",
                "device_type",
                "driver",
                "op",
                "shape",
                "bytes",
                "median_us",
                "min_us",
                "max_us",
                "gbps",
                "pct_of_copy",
                "timer",
            ] {
                assert!(
                    r.get(field).is_some(),
                    "{adapter:?}: row without '{field}': {r}"
                );
            }
            let (median, min, max) = (
                r["median_us"].as_f64().unwrap(),
                r["min_us"].as_f64().unwrap(),
                r["max_us"].as_f64().unwrap(),
            );
            assert!(min <= median && median <= max && min > 0.0, "{r}");
            let want = r["bytes"].as_f64().unwrap() / median / 1e3;
            let gbps = r["gbps"].as_f64().unwrap();
            assert!(
                (gbps - want).abs() <= 1e-9 * want.max(1.0),
                "GB/s {gbps} vs bytes/time {want}: {r}"
            );
            if matches!(r["op"].as_str(), Some("pp" | "tg")) {
                assert!(r["tok_s"].as_f64().unwrap() > 0.0, "{r}");
            }
        }
        files.push(json);
    }
    // A machine with no GPU (UPG_BACKEND=cpu hides the adapters): the default run gives CPU rows only.
    let json = dir.join("no-gpu.json");
    let mut args = vec!["--json", json.to_str().unwrap()];
    args.extend(common);
    let out = Command::new(bench_binary())
        .args(&args)
        .env("UPG_BACKEND", "cpu")
        .output()
        .expect("bench runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["backend"] == "cpu"),
        "{rows:?}"
    );

    let mut merge = vec!["--merge"];
    merge.extend(files.iter().map(|f| f.to_str().unwrap()));
    let table = run(&merge);
    assert!(
        table.contains("| spmv |") && table.contains("CPU path"),
        "{table}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
