//! End-to-end tests of `slim quant ptq`.

use std::process::Command;

fn slim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slim"))
}

#[test]
fn ptq_writes_an_int8_file_that_eval_reads() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("lenet.safetensors");
    let t = slim()
        .args([
            "train", "--model", "lenet", "--epochs", "1", "--limit", "1500", "--quiet", "--out",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let out = dir.path().join("lenet-int8.safetensors");
    let o = slim()
        .arg("quant")
        .arg("ptq")
        .arg(&model)
        .args([
            "--calib-batches",
            "4",
            "--activations",
            "mse",
            "--json",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (b, a) = (&v["before"], &v["after"]);
    assert!(
        a["bytes"].as_u64().unwrap() * 10 < b["bytes"].as_u64().unwrap() * 3,
        "{v}"
    );
    assert!(
        a["top1"].as_f64().unwrap() > b["top1"].as_f64().unwrap() - 0.02,
        "{v}"
    );
    let e = slim().arg("eval").arg(&out).arg("--json").output().unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(ev["top1"], a["top1"]);

    // Quantization-aware training writes an int8 file too.
    let qat = dir.path().join("lenet-qat.safetensors");
    let o = slim()
        .arg("quant")
        .arg("qat")
        .arg(&model)
        .args(["--epochs", "1", "--quiet", "--json", "--out"])
        .arg(&qat)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        q["after"]["top1"].as_f64().unwrap() > b["top1"].as_f64().unwrap() - 0.03,
        "{q}"
    );
    let e = slim().arg("eval").arg(&qat).arg("--json").output().unwrap();
    let ev: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(ev["top1"], q["after"]["top1"]);
    assert_eq!(ev["runtime"], "int8");

    // Bad choices: status 2, nothing written.
    let never = dir.path().join("never.safetensors");
    for (flag, value, needle) in [
        ("--weights", "abs_min", "abs_min"),
        ("--activations", "magic", "magic"),
        ("--bits-weights", "12", "12 bits"),
    ] {
        let o = slim()
            .arg("quant")
            .arg("ptq")
            .arg(&model)
            .args([flag, value, "--out"])
            .arg(&never)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains(needle), "{flag}: {err}");
        assert!(!never.exists());
    }
}
