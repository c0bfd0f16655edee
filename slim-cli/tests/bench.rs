//! `slim bench`: the JSON contract, and the two runtimes.

use std::process::Command;

fn slim(args: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn bench_times_float_and_int8_files_at_every_batch_and_thread_count() {
    let dir = tempfile::tempdir().expect("tmp");
    let float = dir.path().join("lenet.safetensors");
    let int8 = dir.path().join("lenet-int8.safetensors");
    let (f, q) = (float.to_str().unwrap(), int8.to_str().unwrap());
    slim(&[
        "train", "--model", "lenet", "--epochs", "1", "--limit", "128", "-q", "--out", f,
    ]);
    slim(&["quant", "ptq", f, "--calib-batches", "1", "-q", "--out", q]);
    for (file, runtime) in [(f, "f32"), (q, "int8")] {
        let o = slim(&[
            "bench",
            file,
            "--batch",
            "1",
            "--batch",
            "8",
            "--threads",
            "1",
            "--threads",
            "2",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--warmup-ms",
            "0",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(v["runtime"], runtime, "{v}");
        let runs = v["runs"].as_array().expect("runs");
        let seen: Vec<(u64, u64)> = runs
            .iter()
            .map(|r| (r["batch"].as_u64().unwrap(), r["threads"].as_u64().unwrap()))
            .collect();
        assert_eq!(seen, [(1, 1), (8, 1), (1, 2), (8, 2)], "{v}");
        for r in runs {
            let (min, med, max) = (
                r["min_ms"].as_f64().unwrap(),
                r["median_ms"].as_f64().unwrap(),
                r["max_ms"].as_f64().unwrap(),
            );
            assert!(0.0 < min && min <= med && med <= max, "{r}");
            let ips = r["images_per_sec"].as_f64().unwrap();
            let want = r["batch"].as_f64().unwrap() * 1e3 / med;
            assert!((ips - want).abs() <= 1e-6 * want, "{r}");
        }
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
    }
}

#[test]
fn slim_cpu_caps_the_kernels_and_an_unknown_level_is_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let float = dir.path().join("lenet.safetensors");
    let f = float.to_str().unwrap();
    slim(&[
        "train", "--model", "lenet", "--epochs", "1", "--limit", "64", "-q", "--out", f,
    ]);
    let bench = |cpu: &str| {
        Command::new(env!("CARGO_BIN_EXE_slim"))
            .args([
                "bench",
                f,
                "--runs",
                "1",
                "--warmup",
                "0",
                "--warmup-ms",
                "0",
                "--json",
            ])
            .env("SLIM_CPU", cpu)
            .output()
            .expect("slim runs")
    };
    let o = bench("portable");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["cpu"], "portable", "{v}");
    let o = bench("avx2");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v["cpu"] == "avx2" || v["cpu"] == "portable", "{v}");
    let o = bench("sse9");
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("SLIM_CPU=sse9"), "{err}");
}
