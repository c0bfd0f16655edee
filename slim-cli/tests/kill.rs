//! Long jobs killed with SIGKILL mid-work and resumed: automatic pruning and SA search (from
//! their history files), distillation and quantization-aware training (from their
//! checkpoints). Each resumed run must end exactly where an unbroken one does, keep what the
//! killed run finished, and never leave a half-written output.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{auto_prune, json_of, slim, trained_lenet as teacher, weights};
use std::time::{Duration, Instant};

/// Runs `cmd` until `ready()` holds, then kills it with SIGKILL. False when the job finished
/// first (nothing to resume: the machine was faster than the test expects).
fn kill_when(mut cmd: Command, ready: impl Fn() -> bool) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !ready() {
        if let Ok(Some(_)) = child.try_wait() {
            slim_core::note_skipped(
                "a kill test: the job finished before the kill, nothing to resume",
            );
            return false;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the job never got there"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let killed = !child.wait().unwrap().success();
    eprintln!(
        "killed after {:.2} s: {killed}",
        started.elapsed().as_secs_f64()
    );
    killed
}

/// The trials in a search history file (0 while it does not exist).
fn trials(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read(path)
        .ok()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_slice(&b).expect("a whole history file");
            v["trials"].as_array().cloned().unwrap_or_default()
        })
        .unwrap_or_default()
}

#[test]
fn automatic_pruning_killed_resumes_to_the_unbroken_result() {
    let dir = tempfile::tempdir().unwrap();
    let model = teacher(dir.path());
    let cmd = |out: &Path| {
        let mut c = auto_prune(&model, 8);
        c.args(["--reward-finetune-images", "256", "--out"])
            .arg(out);
        c
    };
    let unbroken = dir.path().join("unbroken.safetensors");
    let a = json_of(&cmd(&unbroken).output().unwrap());
    let killed = dir.path().join("killed.safetensors");
    let history = dir.path().join("killed.safetensors.search.json");
    if !kill_when(cmd(&killed), || trials(&history).len() >= 2) {
        return;
    }
    assert!(!killed.exists(), "a killed search wrote its model");
    let done = trials(&history);
    let b = json_of(&cmd(&killed).output().unwrap());
    assert_eq!(
        a["search"]["best_reward"], b["search"]["best_reward"],
        "{a}\n{b}"
    );
    assert_eq!(a["after"], b["after"]);
    assert_eq!(weights(&unbroken), weights(&killed));
    // What the killed run finished is kept, as it was.
    let all = trials(&history);
    assert_eq!(all.len(), 8);
    assert_eq!(&all[..done.len()], done.as_slice());
}

#[test]
fn an_sa_search_killed_resumes_to_the_unbroken_history() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = |out: &Path| {
        let mut c = slim();
        c.args(["nas", "sa", "--space", "resnet", "--width", "0.25"])
            .args([
                "--train-images",
                "512",
                "--eval-images",
                "256",
                "--epochs",
                "1",
            ])
            .args(["--batch-size", "64", "--seed", "2", "--max-macs", "1500000"])
            .args(["--iterations", "6", "--json", "-q", "--out"])
            .arg(out);
        c
    };
    let a = json_of(&cmd(&dir.path().join("unbroken")).output().unwrap());
    let out = dir.path().join("killed");
    let history = out.join("history.json");
    if !kill_when(cmd(&out), || trials(&history).len() >= 2) {
        return;
    }
    let done = trials(&history);
    let b = json_of(&cmd(&out).output().unwrap());
    assert_eq!(a["history"], b["history"]);
    assert_eq!(a["best"], b["best"]);
    assert_eq!(&trials(&history)[..done.len()], done.as_slice());
}

/// A training-loop job (`args` + `--out OUT`) killed once OUT.ckpt exists, resumed with
/// `--resume`: the same weights as an unbroken run.
fn checkpointed_job_resumes(dir: &Path, args: &[String]) {
    let cmd = |out: &Path| {
        let mut c = slim();
        c.args(args).args(["-q", "--json", "--out"]).arg(out);
        c
    };
    let unbroken = dir.join("unbroken.safetensors");
    let a = json_of(&cmd(&unbroken).output().unwrap());
    let killed = dir.join("killed.safetensors");
    let ckpt = dir.join("killed.safetensors.ckpt");
    if !kill_when(cmd(&killed), || ckpt.exists()) {
        return;
    }
    assert!(!killed.exists(), "a killed run wrote its model");
    let mut resume = cmd(&killed);
    resume.arg("--resume");
    let b = json_of(&resume.output().unwrap());
    assert!(b["resumed_from"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(weights(&unbroken), weights(&killed), "{a}\n{b}");
    // A finished job removes its checkpoint: the model file holds what it was kept for.
    assert!(!ckpt.exists(), "the resumed job left its checkpoint");
    assert!(!dir.join("unbroken.safetensors.ckpt").exists());
}

#[test]
fn distillation_killed_resumes_to_the_unbroken_student() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(dir.path());
    let args: Vec<String> = [
        "distill",
        "--teacher",
        t.to_str().unwrap(),
        "--student-model",
        "lenet",
        "--width",
        "0.5",
        "--loss",
        "soft_label:temperature=4",
        "--limit",
        "2048",
        "--epochs",
        "3",
        "--seed",
        "5",
    ]
    .map(String::from)
    .to_vec();
    checkpointed_job_resumes(dir.path(), &args);
}

#[test]
fn quantization_aware_training_killed_resumes_to_the_unbroken_model() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(dir.path());
    let args: Vec<String> = [
        "quant",
        "qat",
        t.to_str().unwrap(),
        "--epochs",
        "2",
        "--seed",
        "4",
    ]
    .map(String::from)
    .to_vec();
    checkpointed_job_resumes(dir.path(), &args);
}

#[test]
fn a_one_shot_search_killed_resumes_to_the_unbroken_result() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = |out: &Path| {
        let mut c = slim();
        c.args([
            "nas",
            "oneshot",
            "--space",
            "mobilenet_v1",
            "--width",
            "0.25",
        ])
        .args(["--train-images", "768", "--eval-images", "256"])
        .args(["--calibration-images", "128", "--supernet-epochs", "3"])
        .args(["--lr", "0.01", "--max-macs", "1500000", "--iterations", "4"])
        .args(["--json", "-q", "--out"])
        .arg(out);
        c
    };
    let a = json_of(&cmd(&dir.path().join("unbroken")).output().unwrap());
    let out = dir.path().join("killed");
    let supernet = out.join("supernet.safetensors");
    // Killed once the first epoch of the supernet is saved: the second resumes from it.
    if !kill_when(cmd(&out), || supernet.exists()) {
        return;
    }
    let b = json_of(&cmd(&out).output().unwrap());
    assert_eq!(a["history"], b["history"]);
    assert_eq!(a["best"], b["best"]);
    assert_eq!(
        weights(&dir.path().join("unbroken/supernet.safetensors")),
        weights(&supernet)
    );
}
