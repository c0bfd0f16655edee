//! End-to-end tests of `slim info`: the binary, its tables, its JSON and its exit statuses.

use std::process::Command;

fn slim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs")
}

#[test]
fn info_json_on_a_zoo_model() {
    let out = slim(&[
        "info",
        "--model",
        "mobilenet_v1",
        "--input",
        "3x224x224",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let macs = v["macs"].as_u64().unwrap() as f64;
    assert!((macs / 569e6 - 1.0).abs() < 0.02, "{macs}");
    let params = v["params"].as_u64().unwrap() as f64;
    assert!((params / 4.2e6 - 1.0).abs() < 0.02, "{params}");
    // The file slim would write holds every f32 tensor plus a header.
    assert!(v["bytes"].as_u64().unwrap() > 4 * v["params"].as_u64().unwrap());
    let groups = v["groups"].as_array().unwrap();
    assert!(groups.iter().any(|g| g["prunable"] == true));
    assert!(groups.iter().any(|g| g["blocked_by"]["node"] == "fc"));
}

#[test]
fn info_table_on_a_saved_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lenet.safetensors");
    let cfg = slim_core::zoo::ZooConfig::new([1, 28, 28]);
    slim_core::zoo::model("lenet", &cfg, 0, &candle_core::Device::Cpu)
        .unwrap()
        .save(&path)
        .unwrap();
    let out = slim(&["info", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("conv1") && text.contains("117.6K"), "{text}");
    assert!(text.contains("channel groups: 4 prunable"), "{text}");
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(text.contains(&format!("{size} bytes on disk")), "{text}");
}

#[test]
fn bad_input_is_status_2_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.safetensors");
    std::fs::write(&path, b"definitely not a model").unwrap();
    for args in [
        vec!["info", path.to_str().unwrap()],
        vec!["info", "--model", "resnet7"],
        vec!["info", "--model", "lenet", "--input", "28x28"],
        vec!["info", "--nonsense"],
    ] {
        let out = slim(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.is_empty() && out.stdout.is_empty(), "{args:?}: {err}");
    }
    let out = slim(&["info", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.safetensors"));
}

#[test]
fn a_closed_stdout_ends_quietly() {
    // `slim info ... | head -1`: the reader goes away before the table is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(["info", "--model", "resnet56", "--input", "3x32x32"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("slim runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("slim ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
