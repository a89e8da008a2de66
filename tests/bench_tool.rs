//! The bench tool (examples/bench.rs) on the smallest shapes: it runs on the CPU path and on the GPU
//! adapter, writes one JSON record per row with the fields the merge and BENCHMARKS.md rely on, and its
//! GB/s is the bytes it says it moved divided by the median time, those bytes are what each op must move
//! (from the codec's published layout), and % of copy is against the copy row. `--merge` reads its own
//! output back. A second test lowers the GPU's binding limit: the copy is capped, the ops that cannot
//! fit are skipped with a note, and the run still succeeds.

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

/// Bytes an op must move at `rows` x `cols` (the shapes here are small enough that no op is padded
/// beyond the codec's own padding): the sparse codec stores each 128 columns (one scale group, padded)
/// of a row as 2 masks of 8 bytes, 32 bytes of codes and one f16 scale; f16 is 2 bytes a weight.
fn expected_bytes(op: &str, rows: u64, cols: u64) -> Option<u64> {
    let sparse = rows * cols.div_ceil(128) * 50;
    match op {
        "spmv" => Some(sparse),
        "gemv_f16" => Some(rows * cols * 2),
        "decompress" => Some(sparse + rows * cols * 2),
        _ => None,
    }
}

fn read_rows(json: &std::path::Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
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
        let rows = read_rows(&json);
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
            assert!(close(gbps, want), "GB/s {gbps} vs bytes/time {want}: {r}");
            assert!(
                matches!(r["timer"].as_str(), Some("gpu-timestamp" | "wall")),
                "{r}"
            );
            let op = r["op"].as_str().unwrap();
            let bytes = r["bytes"].as_u64().unwrap();
            match op {
                // 4 MiB read and 4 MiB written.
                "copy" => assert_eq!(bytes, 8 << 20, "{r}"),
                "pp" | "tg" => {
                    let n = if op == "pp" { 8 } else { 4 };
                    assert_eq!(r["shape"].as_str(), Some(format!("{op}{n}").as_str()));
                    // tok/s and the time per token are the same measurement.
                    let tok_s = r["tok_s"].as_f64().unwrap();
                    assert!(tok_s > 0.0 && close(tok_s * median, 1e6), "{r}");
                }
                _ => {
                    assert_eq!(r["shape"], "64x100", "{r}");
                    // Ops added to the bench later need their own line in expected_bytes.
                    if let Some(want) = expected_bytes(op, 64, 100) {
                        assert_eq!(bytes, want, "{r}");
                    }
                    let copy = rows.iter().find(|c| c["op"] == "copy").unwrap();
                    let pct = 100.0 * gbps / copy["gbps"].as_f64().unwrap();
                    assert!(close(r["pct_of_copy"].as_f64().unwrap(), pct), "{r}");
                }
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
    let rows = read_rows(&json);
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
    // Every row of every file, then only those --ops and --shapes select.
    let all: Vec<serde_json::Value> = files.iter().flat_map(|f| read_rows(f)).collect();
    let body = |t: &str| t.lines().skip(2).filter(|l| l.starts_with('|')).count();
    assert_eq!(body(&table), all.len(), "{table}");
    merge.extend(["--ops", "copy,spmv,tg", "--shapes", "64x100"]);
    let picked = run(&merge);
    let want = all
        .iter()
        .filter(|r| matches!(r["op"].as_str(), Some("copy" | "spmv" | "tg")))
        .count();
    assert_eq!(body(&picked), want, "{picked}");
    *merge.last_mut().unwrap() = "512";
    let picked = run(&merge);
    assert!(!picked.contains("| spmv |"), "{picked}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_caps_copy_and_skips_ops_over_a_small_binding_limit() {
    if gpu_or_skip(GpuOptions::default()).is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("upg-bench-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("rows.json");
    // With 64 KiB per binding: 64x100 fits every op; at 64x9000 the sparse upload's 32-row tile
    // (32 rows of 141 blocks x 16 code bytes = 72192) does not, the f16 matrix (18000 bytes a row) does; at
    // 64x20000 x itself (80128 bytes with its padding) does not.
    let table = run(&[
        "--json",
        json.to_str().unwrap(),
        "--max-binding-kib",
        "64",
        "--ops",
        "copy,spmv,gemv_f16,decompress",
        "--shapes",
        "64x100,64x9000,64x20000",
        "--runs",
        "3",
        "--copy-mib",
        "4",
        "--warm-ms",
        "5",
    ]);
    let rows = read_rows(&json);
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap().into(),
                r["shape"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("copy", "-"),
        ("spmv", "64x100"),
        ("gemv_f16", "64x100"),
        ("decompress", "64x100"),
        ("gemv_f16", "64x9000"),
    ]
    .iter()
    .map(|&(o, s)| (o.into(), s.into()))
    .collect();
    assert_eq!(got, want, "{table}");
    let copy = &rows[0];
    assert_eq!(copy["bytes"].as_u64(), Some(2 * 65536), "{copy}");
    assert!(
        copy["variant"].as_str().unwrap().contains("binding limit"),
        "the capped copy must say so: {copy}"
    );
    for r in &rows[1..] {
        let [rows_, cols] = [r["rows"].as_u64().unwrap(), r["cols"].as_u64().unwrap()];
        assert_eq!(
            r["bytes"].as_u64(),
            expected_bytes(r["op"].as_str().unwrap(), rows_, cols)
        );
    }
    for (op, shape, why) in [
        ("spmv", "64x9000", "32 rows of 2256 bytes"),
        ("decompress", "64x9000", "32 rows of 2256 bytes"),
        ("spmv", "64x20000", "80128"),
        ("gemv_f16", "64x20000", "80128"),
        ("decompress", "64x20000", "80128"),
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.contains(&format!("{op} {shape} skipped")) && l.contains(why)),
            "no note for {op} {shape}:\n{table}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
