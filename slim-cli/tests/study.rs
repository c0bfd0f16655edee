//! `slim nas worker`: a search shared through Redis (a private server started for the test).
//! Three workers produce one valid history; a worker killed with SIGKILL mid-candidate loses
//! nothing (its candidate completes in another worker); a worker of another search is refused.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use slim_dist::testing::RedisServer;

mod common;

const LIMIT: u64 = 1_500_000;

fn worker(redis: &str, study: &str, name: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_slim"));
    c.args(["nas", "worker", "--redis", redis, "--study", study])
        .args(["--worker-name", name, "--out"])
        .arg(out)
        .args([
            "--space",
            "resnet",
            "--width",
            "0.25",
            "--train-images",
            "512",
        ])
        .args([
            "--eval-images",
            "256",
            "--epochs",
            "1",
            "--batch-size",
            "64",
        ])
        .args(["--seed", "2", "--max-macs", &LIMIT.to_string(), "--json"])
        .args(extra);
    c
}

fn json_of(child: Child) -> serde_json::Value {
    let o = child.wait_with_output().expect("the worker ends");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// The candidates' ids, each once, and every candidate within the limit.
fn check_history(v: &serde_json::Value, n: usize) -> Vec<serde_json::Value> {
    let evaluated: Vec<serde_json::Value> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "evaluated")
        .cloned()
        .collect();
    assert_eq!(evaluated.len(), n, "{v}");
    for c in &evaluated {
        assert!(c["macs"].as_u64().unwrap() <= LIMIT, "{c}");
        assert!((0.0..=1.0).contains(&c["reward"].as_f64().unwrap()), "{c}");
    }
    evaluated
}

fn trial_infos(out: &Path) -> Vec<serde_json::Value> {
    let h: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("history.json")).unwrap()).unwrap();
    h["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["info"].clone())
        .collect()
}

#[test]
fn three_workers_share_one_search() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let n = 6;
    let its = n.to_string();
    let children: Vec<Child> = (0..3)
        .map(|i| {
            worker(
                &server.url(),
                "three",
                &format!("w{i}"),
                &dir.path().join(format!("w{i}")),
                &["--iterations", &its, "-q"],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let results: Vec<serde_json::Value> = children.into_iter().map(json_of).collect();
    // Every worker prints the whole study, the same, in the form `slim nas sa` prints.
    let first = check_history(&results[0], n);
    for r in &results[1..] {
        assert_eq!(check_history(r, n), first);
        assert_eq!(r["best"], results[0]["best"]);
    }
    let infos = trial_infos(&dir.path().join("w0"));
    let ids: BTreeSet<u64> = infos
        .iter()
        .map(|i| i["candidate"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (0..n as u64).collect());
    let workers: BTreeSet<&str> = infos
        .iter()
        .map(|i| i["worker"].as_str().unwrap())
        .collect();
    assert!(workers.len() >= 2, "the work was shared: {workers:?}");
    // The study's history exports like a search's.
    let model = dir.path().join("best.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(["nas", "export"])
        .arg(dir.path().join("w1"))
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(model.exists());

    // A worker with other settings is refused, naming the study.
    let o = worker(
        &server.url(),
        "three",
        "odd",
        &dir.path().join("odd"),
        &["--iterations", &its, "-q", "--max-params", "9000"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("study `three`") && err.contains("another search"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn a_worker_killed_mid_candidate_loses_nothing() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let n = 4;
    let its = n.to_string();
    let common = ["--iterations", its.as_str(), "--lease-seconds", "2"];
    // The first worker takes a candidate and is killed while it trains it.
    let mut doomed = worker(
        &server.url(),
        "kill",
        "doomed",
        &dir.path().join("a"),
        &common,
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(doomed.stderr.take().unwrap()).lines();
    let taken = loop {
        let line = lines.next().expect("the worker reports").unwrap();
        if let Some(rest) = line.strip_prefix("candidate #") {
            if rest.ends_with(": taken") {
                break rest.trim_end_matches(": taken").parse::<u64>().unwrap();
            }
        }
    };
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    assert_eq!(taken, 0);
    // Another worker finishes the study: the dead worker's candidate among them.
    let o = worker(
        &server.url(),
        "kill",
        "rescuer",
        &dir.path().join("b"),
        &common,
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("candidate #0: taken over from doomed"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    check_history(&v, n);
    let infos = trial_infos(&dir.path().join("b"));
    let ids: BTreeSet<u64> = infos
        .iter()
        .map(|i| i["candidate"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (0..n as u64).collect());
    let zero = infos.iter().find(|i| i["candidate"] == 0).unwrap();
    assert_eq!(
        (zero["worker"].as_str(), zero["attempts"].as_u64()),
        (Some("rescuer"), Some(2))
    );
}

#[test]
fn bad_study_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let cases: [(&str, &str, &[&str], &str, i32); 5] = [
        ("http://h:1", "s", &[], "not a Redis URL", 2),
        (
            "rediss://:pw@h:1",
            "s",
            &["--redis-ca", "/no/such.pem"],
            "/no/such.pem",
            2,
        ),
        ("redis://127.0.0.1:1", "a b", &[], "study name `a b`", 2),
        (
            "redis://127.0.0.1:1",
            "s",
            &["--lease-seconds", "0"],
            "--lease-seconds",
            2,
        ),
        (
            "redis://:pw@127.0.0.1:1",
            "s",
            &[],
            "cannot reach Redis at redis://:***@127.0.0.1:1",
            1,
        ),
    ];
    for (redis, study, extra, needle, code) in cases {
        let o = worker(redis, study, "w", &out, extra).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{redis} {study}: {err}");
        assert!(err.contains(needle), "expected `{needle}` in {err}");
        assert!(!err.contains("pw@"), "the password is never shown: {err}");
    }
}

#[test]
fn automatic_pruning_shared_by_two_workers() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = common::trained_lenet(dir.path());
    let prune = |name: &str| {
        let mut c = common::auto_prune(&model, 6);
        c.args([
            "--redis",
            &server.url(),
            "--study",
            "prune",
            "--worker-name",
            name,
        ])
        .arg("--out")
        .arg(dir.path().join(format!("{name}.safetensors")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (prune("a"), prune("b"));
    let (a, b) = (json_of(a), json_of(b));
    // Both end with the study's best, and both wrote it.
    for v in [&a, &b] {
        assert_eq!(v["search"]["trials"], 6, "{v}");
        assert!(v["flops_reduction"].as_f64().unwrap() >= 0.5 - 1e-9, "{v}");
        assert!(v["search"]["history"]
            .as_str()
            .unwrap()
            .contains("study `prune`"));
    }
    assert_eq!(a["search"]["best_reward"], b["search"]["best_reward"]);
    assert_eq!(a["after"]["macs"], b["after"]["macs"]);
    let best = a["search"]["best_reward"].as_f64().unwrap();
    assert!(best >= a["search"]["initial_reward"].as_f64().unwrap());
    for n in ["a", "b"] {
        assert!(dir.path().join(format!("{n}.safetensors")).exists());
    }
    // --study is for --method auto only.
    let o = Command::new(env!("CARGO_BIN_EXE_slim"))
        .arg("prune")
        .arg(&model)
        .args(["--ratio", "0.3", "--study", "x", "--out"])
        .arg(dir.path().join("never.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--method auto"), "{err}");
    assert!(!dir.path().join("never.safetensors").exists());
}

#[test]
fn over_tls_with_a_password() {
    let Some(server) = RedisServer::start_with(slim_dist::testing::Setup {
        password: Some("pa55word".into()),
        tls: true,
    }) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = server.ca.clone().unwrap();
    let ca = ca.to_str().unwrap();
    let o = worker(
        &server.url(),
        "tls",
        "w",
        &dir.path().join("w"),
        &["--iterations", "2", "-q", "--redis-ca", ca],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    check_history(&v, 2);
    // Without the authority the server's certificate is not trusted.
    let o = worker(
        &server.url(),
        "tls",
        "w",
        &dir.path().join("x"),
        &["--iterations", "2"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach Redis at rediss://:***@localhost"),
        "{err}"
    );
    assert!(!err.contains("pa55word"), "{err}");
    // A student reaches the server too (and finds no teacher there).
    let o = Command::new(env!("CARGO_BIN_EXE_slim"))
        .args([
            "distill",
            "--teacher-service",
            "ghost",
            "--redis",
            &server.url(),
        ])
        .args(["--redis-ca", ca, "--teacher-timeout", "1"])
        .args([
            "--student-model",
            "lenet",
            "--loss",
            "soft_label",
            "--limit",
            "256",
        ])
        .arg("--out")
        .arg(dir.path().join("s.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no process serves the teacher `ghost` at rediss://:***@localhost"),
        "{err}"
    );
}
