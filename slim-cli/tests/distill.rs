//! End-to-end tests of `slim distill` and `slim distill dump`.

use std::path::Path;
use std::process::{Command, Output};

fn slim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slim"))
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn distill(teacher: &Path, losses: &[&str], limit: &str, out: &Path) -> Output {
    let mut c = slim();
    c.arg("distill").arg("--teacher").arg(teacher);
    for l in losses {
        c.args(["--loss", l]);
    }
    c.args([
        "--student-model",
        "lenet",
        "--width",
        "0.5",
        "--epochs",
        "1",
        "--quiet",
        "--json",
    ])
    .args(["--limit", limit, "--out"])
    .arg(out)
    .output()
    .unwrap()
}

#[test]
fn distill_online_and_from_dumped_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.safetensors");
    let t = slim()
        .args([
            "train", "--model", "lenet", "--epochs", "1", "--limit", "1500", "--quiet", "--out",
        ])
        .arg(&teacher)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));

    let student = dir.path().join("student.safetensors");
    let v = ok(&distill(
        &teacher,
        &[
            "soft_label:temperature=4",
            "l2:teacher=pool2,student=pool2,adapter=true,weight=0.1",
        ],
        "1500",
        &student,
    ));
    assert!(v["top1"].as_f64().unwrap() > 0.5, "{v}");
    assert!(v["teachers"][0]["top1"].as_f64().unwrap() > 0.5, "{v}");
    assert_eq!(v["losses"].as_object().unwrap().len(), 2, "{v}");
    let e = ok(&slim()
        .arg("eval")
        .arg(&student)
        .arg("--json")
        .output()
        .unwrap());
    assert_eq!(e["top1"], v["top1"]);

    let k = dir.path().join("knowledge");
    let d = ok(&slim()
        .args(["distill", "dump", "--teacher"])
        .arg(&teacher)
        .args([
            "--node",
            "fc3",
            "--node",
            "pool2",
            "--limit",
            "1500",
            "--shard-size",
            "512",
            "--quiet",
            "--json",
            "--out",
        ])
        .arg(&k)
        .output()
        .unwrap());
    assert_eq!(d["shards"], 3, "{d}");
    let from_files = dir.path().join("from-files.safetensors");
    let v = ok(&distill(
        &k,
        &["soft_label:temperature=4"],
        "1500",
        &from_files,
    ));
    assert!(v["top1"].as_f64().unwrap() > 0.5, "{v}");
    assert!(v["teachers"][0]["top1"].is_null(), "{v}");

    // Knowledge of 1500 images does not serve a run on 1000.
    let refused = dir.path().join("refused.safetensors");
    let o = distill(&k, &["soft_label"], "1000", &refused);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("dump it again"));
    assert!(!refused.exists());
}

#[test]
fn bad_losses_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.safetensors");
    // An untrained teacher is enough: nothing trains.
    let t = slim()
        .args([
            "train", "--model", "lenet", "--epochs", "1", "--limit", "64", "--quiet", "--out",
        ])
        .arg(&teacher)
        .output()
        .unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let out = dir.path().join("s.safetensors");
    for (loss, says) in [
        ("l2:teacher=pool2,student=pool_2", "close names: pool2"),
        ("l2:teacher=pool2,student=pool2", "adapter=true"),
        ("soft_label:temperature=0", "must be positive"),
        ("fsp:teacher=conv1-relu1,student=conv1-relu1", "6x6"),
        ("mse:teacher=fc3", "unknown loss `mse`"),
    ] {
        let o = distill(&teacher, &[loss], "64", &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{loss}: {err}");
        assert!(err.contains(says), "{loss}: {err}");
        assert!(!out.exists());
    }
    let o = slim()
        .args([
            "distill",
            "--student-model",
            "lenet",
            "--loss",
            "soft_label",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--teacher"));
}
