//! Long jobs killed with SIGKILL mid-work and resumed: automatic pruning and SA search (from
//! their history files); training, pruning's fine-tuning, distillation and quantization-aware
//! training (from their step checkpoints, killed at seeded random moments). Each resumed run
//! must end exactly where an unbroken one does, keep what the killed run finished, and never
//! leave a half-written output.

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

/// Runs `cmd` until `ready()` holds, lets it run on for a seeded random part of `span` (up to
/// half of it: `span` is how long the unbroken job took), then kills it with SIGKILL. The kill
/// must land while the job runs: a job that finished first fails the test.
fn kill_at_random(mut cmd: Command, ready: impl Fn() -> bool, seed: u64, span: Duration) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before its first checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the job never got there"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SplitMix64 of the seed: a fraction in [0, 0.5).
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let fraction = ((z ^ (z >> 31)) % 1000) as f64 / 2000.0;
    std::thread::sleep(span.mul_f64(fraction));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the job finished before the kill ({:.0}% of the unbroken run's {:.2} s after its first \
         checkpoint)",
        100.0 * fraction,
        span.as_secs_f64()
    );
    eprintln!(
        "seed {seed}: killed {:.2} s in, {:.0}% of the unbroken run after the first checkpoint",
        started.elapsed().as_secs_f64(),
        100.0 * fraction
    );
}

/// A training-loop job (`args` + `--out OUT`), checkpointing every 2 steps, killed at a seeded
/// random moment for each of `seeds` and resumed with `--resume`: the same weights as an
/// unbroken run, bit for bit, and no checkpoint left behind.
fn checkpointed_job_resumes(dir: &Path, args: &[String], seeds: &[u64]) {
    let cmd = |out: &Path| {
        let mut c = slim();
        c.args(args)
            .args(["--checkpoint-every", "2", "-q", "--json", "--out"])
            .arg(out);
        c
    };
    let unbroken = dir.join("unbroken.safetensors");
    let started = Instant::now();
    let a = json_of(&cmd(&unbroken).output().unwrap());
    let span = started.elapsed();
    assert!(!dir.join("unbroken.safetensors.ckpt").exists());
    for &seed in seeds {
        let killed = dir.join(format!("killed-{seed}.safetensors"));
        let ckpt = dir.join(format!("killed-{seed}.safetensors.ckpt"));
        kill_at_random(cmd(&killed), || ckpt.exists(), seed, span);
        assert!(!killed.exists(), "a killed run wrote its model");
        let mut resume = cmd(&killed);
        resume.arg("--resume");
        let b = json_of(&resume.output().unwrap());
        let (epochs, steps) = (
            b["resumed_from"].as_u64().unwrap(),
            b["resumed_at_step"].as_u64().unwrap(),
        );
        assert!((epochs, steps) != (0, 0), "it resumed from nothing: {b}");
        eprintln!("seed {seed}: resumed after epoch {epochs}, step {steps}");
        assert_eq!(weights(&unbroken), weights(&killed), "{a}\n{b}");
        // A finished job removes its checkpoint: the model file holds what it was kept for.
        assert!(!ckpt.exists(), "the resumed job left its checkpoint");
    }
}

#[test]
fn training_killed_at_random_moments_resumes_to_the_unbroken_model() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "train",
        "--model",
        "lenet",
        "--epochs",
        "3",
        "--limit",
        "2048",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--schedule",
        "cosine",
        "--seed",
        "7",
    ]
    .map(String::from)
    .to_vec();
    checkpointed_job_resumes(dir.path(), &args, &[11, 12, 13]);
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
    checkpointed_job_resumes(dir.path(), &args, &[21]);
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
    checkpointed_job_resumes(dir.path(), &args, &[31]);
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
        .args(["--checkpoint-every", "2", "--json", "--out"])
        .arg(out);
        c
    };
    let started = Instant::now();
    let a = json_of(&cmd(&dir.path().join("unbroken")).output().unwrap());
    let span = started.elapsed();
    for seed in [41, 42] {
        let out = dir.path().join(format!("killed-{seed}"));
        let supernet = out.join("supernet.safetensors");
        // Killed at a seeded moment after the supernet's first write (every 2 steps, within
        // epochs too): the rerun in the same folder resumes from it.
        kill_at_random(cmd(&out), || supernet.exists(), seed, span);
        let run = cmd(&out).output().unwrap();
        let said = String::from_utf8_lossy(&run.stderr).into_owned();
        let resumed = said
            .lines()
            .find(|l| l.contains("read back from the output folder"))
            .unwrap_or_else(|| panic!("it did not resume: {said}"));
        eprintln!("seed {seed}: {resumed}");
        let b = json_of(&run);
        assert_eq!(a["history"], b["history"]);
        assert_eq!(a["best"], b["best"]);
        assert_eq!(
            weights(&dir.path().join("unbroken/supernet.safetensors")),
            weights(&supernet)
        );
    }
}

#[test]
fn pruning_killed_while_fine_tuning_resumes_to_the_unbroken_model() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher(dir.path());
    let args: Vec<String> = [
        "prune",
        t.to_str().unwrap(),
        "--ratio",
        "0.3",
        "--finetune-epochs",
        "2",
        "--seed",
        "3",
    ]
    .map(String::from)
    .to_vec();
    checkpointed_job_resumes(dir.path(), &args, &[41]);
}
