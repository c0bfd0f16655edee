//! End-to-end tests of `slim latency`: a table built, used and validated, on both runtimes,
//! and the refusals.

use std::process::Command;

fn slim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs")
}

fn ok(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

#[test]
fn build_validate_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    for runtime in ["f32", "int8"] {
        let table = dir.path().join(format!("{runtime}.json"));
        let t = table.to_str().unwrap();
        let v = ok(&slim(&[
            "latency",
            "build",
            "--out",
            t,
            "--zoo",
            "lenet",
            "--runtime",
            runtime,
            "--runs",
            "3",
            "--warmup",
            "1",
            "--json",
            "-q",
        ]));
        assert!(v["entries"].as_u64().unwrap() > 5, "{v}");
        let v = ok(&slim(&[
            "latency", "validate", "--table", t, "--zoo", "lenet", "--runs", "3", "--json", "-q",
        ]));
        let models = v["models"].as_array().unwrap();
        assert_eq!(models.len(), 1);
        assert!(models[0]["measured_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["mape"].as_f64().unwrap().is_finite(), "{v}");
        // Another input size gives ops the table lacks: listed, exit 2; with the fallback, estimated.
        let o = slim(&[
            "latency",
            "validate",
            "--table",
            t,
            "--zoo",
            "lenet@1x32x32",
            "--runs",
            "1",
            "-q",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains("no time for") && err.contains("conv2d"),
            "{err}"
        );
        let v = ok(&slim(&[
            "latency",
            "validate",
            "--table",
            t,
            "--zoo",
            "lenet@1x32x32",
            "--runs",
            "1",
            "--fallback",
            "--json",
            "-q",
        ]));
        assert!(v["models"][0]["fallback_ops"].as_u64().unwrap() > 0, "{v}");
    }
    // A table of the other runtime, or of other threads, is refused when added to.
    let f32_table = dir.path().join("f32.json");
    let o = slim(&[
        "latency",
        "build",
        "--out",
        f32_table.to_str().unwrap(),
        "--zoo",
        "lenet",
        "--runtime",
        "int8",
        "-q",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("f32 runtime"), "{err}");
    // A float model file against the f32 table: estimated.
    let model = dir.path().join("lenet.safetensors");
    ok(&slim(&[
        "train",
        "--model",
        "lenet",
        "--epochs",
        "1",
        "--limit",
        "128",
        "--batch-size",
        "32",
        "--out",
        model.to_str().unwrap(),
        "--json",
        "-q",
    ]));
    let v = ok(&slim(&[
        "latency",
        "estimate",
        model.to_str().unwrap(),
        "--table",
        f32_table.to_str().unwrap(),
        "--json",
    ]));
    assert!(v["total_ms"].as_f64().unwrap() > 0.0, "{v}");
    // A damaged table.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{").unwrap();
    let o = slim(&[
        "latency",
        "estimate",
        model.to_str().unwrap(),
        "--table",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.json"), "{err}");
}
