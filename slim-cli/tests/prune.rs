//! End-to-end tests of `slim prune` and `slim sensitivity`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn slim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slim"))
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// A LeNet trained for one epoch on part of the bundled data.
fn trained_lenet(dir: &Path, seed: u32) -> PathBuf {
    let path = dir.join(format!("lenet{seed}.safetensors"));
    let out = slim()
        .args([
            "train", "--model", "lenet", "--epochs", "1", "--limit", "1500", "--quiet",
        ])
        .args(["--seed", &seed.to_string(), "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn info_macs(path: &Path) -> u64 {
    let v = json_of(&slim().arg("info").arg(path).arg("--json").output().unwrap());
    v["total"]["macs"]
        .as_u64()
        .or_else(|| v["macs"].as_u64())
        .expect("info reports MACs")
}

#[test]
fn uniform_pruning_needs_no_data_and_info_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_lenet(dir.path(), 0);
    let out = dir.path().join("pruned.safetensors");
    let v = json_of(
        &slim()
            .arg("prune")
            .arg(&model)
            .args(["--ratio", "0.5", "--json", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    assert!(v["before"]["top1"].is_null(), "no data, no accuracy: {v}");
    let (before, after) = (
        v["before"]["macs"].as_u64().unwrap(),
        v["after"]["macs"].as_u64().unwrap(),
    );
    assert!(after < before);
    assert_eq!(info_macs(&out), after);
    assert_eq!(info_macs(&model), before);
    assert_eq!(
        v["after"]["bytes"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    // The classifier's output group is reported, not pruned.
    assert!(v["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["group"] == "fc3"));
}

#[test]
fn flops_target_with_fine_tuning_keeps_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_lenet(dir.path(), 0);
    let out = dir.path().join("pruned.safetensors");
    let v = json_of(
        &slim()
            .arg("prune")
            .arg(&model)
            .args([
                "--flops-reduction",
                "0.5",
                "--finetune-epochs",
                "1",
                "--quiet",
            ])
            .args(["--data", "builtin:mnist-10k", "--json", "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    let red = v["flops_reduction"].as_f64().unwrap();
    assert!((red - 0.5).abs() <= 0.01, "{red}");
    let (b, a) = (
        v["before"]["top1"].as_f64().unwrap(),
        v["after"]["top1"].as_f64().unwrap(),
    );
    assert!(a > b - 0.02, "fine-tuned top-1 {a} against {b}");
    let e = json_of(&slim().arg("eval").arg(&out).arg("--json").output().unwrap());
    assert_eq!(e["top1"].as_f64(), Some(a));
}

#[test]
fn sensitivity_then_sensitivity_based_and_automatic_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_lenet(dir.path(), 0);
    let sens = dir.path().join("sens.json");
    let plot = dir.path().join("sens.svg");
    let s = json_of(
        &slim()
            .arg("sensitivity")
            .arg(&model)
            .args([
                "--ratios",
                "0.3,0.6,0.9",
                "--eval-samples",
                "300",
                "--quiet",
                "--json",
            ])
            .arg("--out")
            .arg(&sens)
            .arg("--plot")
            .arg(&plot)
            .output()
            .unwrap(),
    );
    // Four prunable groups (conv1, conv2, fc1, fc2), three ratios each.
    assert_eq!(s["points"], 12, "{s}");
    assert!(std::fs::read_to_string(&plot).unwrap().contains("conv2"));
    // Running again finds every point done.
    let again = json_of(
        &slim()
            .arg("sensitivity")
            .arg(&model)
            .args([
                "--ratios",
                "0.3,0.6,0.9",
                "--eval-samples",
                "300",
                "--quiet",
                "--json",
            ])
            .arg("--out")
            .arg(&sens)
            .output()
            .unwrap(),
    );
    assert_eq!(again["groups"], s["groups"]);

    let out = dir.path().join("sens-pruned.safetensors");
    let v = json_of(
        &slim()
            .arg("prune")
            .arg(&model)
            .args([
                "--flops-reduction",
                "0.5",
                "--method",
                "sensitivity",
                "--json",
            ])
            .arg("--sensitivity")
            .arg(&sens)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap(),
    );
    let red = v["flops_reduction"].as_f64().unwrap();
    assert!((0.5..=0.51).contains(&red), "{red}");

    let auto_out = dir.path().join("auto.safetensors");
    let a = json_of(
        &slim()
            .arg("prune")
            .arg(&model)
            .args([
                "--flops-reduction",
                "0.5",
                "--method",
                "auto",
                "--trials",
                "4",
            ])
            .args(["--eval-samples", "300", "--quiet", "--json", "--out"])
            .arg(&auto_out)
            .output()
            .unwrap(),
    );
    assert!(a["flops_reduction"].as_f64().unwrap() >= 0.5 - 1e-9, "{a}");
    assert_eq!(a["search"]["trials"], 4);
    let best = a["search"]["best_reward"].as_f64().unwrap();
    assert!(best >= a["search"]["initial_reward"].as_f64().unwrap());
    let mut hist = auto_out.clone().into_os_string();
    hist.push(".search.json");
    assert!(Path::new(&hist).exists());
}

#[test]
fn bad_input_is_refused_with_status_2_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_lenet(dir.path(), 0);
    let other = trained_lenet(dir.path(), 1);
    let out = dir.path().join("never.safetensors");
    let sens = dir.path().join("other.json");
    let s = slim()
        .arg("sensitivity")
        .arg(&other)
        .args([
            "--ratios",
            "0.5",
            "--eval-samples",
            "50",
            "--quiet",
            "--out",
        ])
        .arg(&sens)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--ratio".into(), "1.5".into()], "(0, 1)"),
        (vec!["--ratio".into(), "0".into()], "(0, 1)"),
        (vec!["--flops-reduction".into(), "0".into()], "(0, 1)"),
        (vec!["--flops-reduction".into(), "1".into()], "(0, 1)"),
        (
            vec![
                "--ratio".into(),
                "0.5".into(),
                "--scope".into(),
                "nothing*".into(),
            ],
            "nothing*",
        ),
        (
            vec![
                "--flops-reduction".into(),
                "0.99".into(),
                "--scope".into(),
                "conv1".into(),
            ],
            "the most they can remove",
        ),
        (
            vec![
                "--flops-reduction".into(),
                "0.5".into(),
                "--method".into(),
                "sensitivity".into(),
                "--sensitivity".into(),
                sens.display().to_string(),
            ],
            "another model",
        ),
        (
            vec![
                "--ratio".into(),
                "0.5".into(),
                "--criterion".into(),
                "l3".into(),
            ],
            "unknown criterion",
        ),
    ];
    for (args, needle) in cases {
        let o = slim()
            .arg("prune")
            .arg(&model)
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote a model");
    }
    // A sensitivity run on another model's file is refused and leaves the file as it was.
    let before = std::fs::read(&sens).unwrap();
    let o = slim()
        .arg("sensitivity")
        .arg(&model)
        .args([
            "--ratios",
            "0.5",
            "--eval-samples",
            "50",
            "--quiet",
            "--out",
        ])
        .arg(&sens)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another model"));
    assert_eq!(std::fs::read(&sens).unwrap(), before);
}

#[test]
fn a_sensitivity_analysis_killed_midway_resumes_without_losing_a_point() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let model = trained_lenet(dir.path(), 3);
    let run = |out: &Path| {
        let mut c = slim();
        c.arg("sensitivity")
            .arg(&model)
            .args(["--eval-samples", "1996", "--quiet", "--json", "--out"])
            .arg(out);
        c
    };
    let unbroken = dir.path().join("unbroken.json");
    json_of(&run(&unbroken).output().unwrap());
    let groups = |p: &Path| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).expect("a whole file");
        v["groups"].clone()
    };
    let points = |p: &Path| -> usize {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v["groups"].as_object().map(|g| {
                    g.values()
                        .map(|c| c["points"].as_array().map_or(0, |a| a.len()))
                        .sum()
                })
            })
            .unwrap_or(0)
    };
    let killed = dir.path().join("killed.json");
    let mut child = run(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while points(&killed) == 0 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    if child.wait().unwrap().success() {
        return; // finished before the kill
    }
    let done = points(&killed);
    assert!(done > 0 && done < 36, "{done} points before the kill");
    // What the killed run wrote is whole, and the resumed run measures only what is missing.
    groups(&killed);
    let r = json_of(&run(&killed).output().unwrap());
    assert_eq!(r["points"], 36, "{r}");
    assert_eq!(groups(&killed), groups(&unbroken));
}
