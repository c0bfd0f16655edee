//! `slim distill teacher` and `slim distill --teacher-service`: a teacher served from other
//! processes through Redis (a private server started for the test). The knowledge is the same
//! as offline (dumped) and in-process; a teacher killed mid-epoch while a second instance runs
//! costs nothing but a delay; without any teacher the student stops with a clear error.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{json_of, slim, trained_lenet, weights};
use std::time::{Duration, Instant};

use slim_dist::testing::RedisServer;

/// A process serving `model` as `name`, started once it has announced itself.
fn serve(url: &str, name: &str, server: &str, model: &Path, limit: usize) -> Child {
    let mut c = slim()
        .args([
            "distill",
            "teacher",
            "--redis",
            url,
            "--name",
            name,
            "--server-name",
            server,
        ])
        .arg("--model")
        .arg(model)
        .args(["--limit", &limit.to_string(), "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut con = slim_dist::RedisUrl::parse(url).unwrap().connect().unwrap();
    let started = Instant::now();
    loop {
        let info: Option<String> = redis::cmd("GET")
            .arg(format!("slim:teacher:{name}:info"))
            .query(&mut con)
            .unwrap();
        if info.is_some() {
            return c;
        }
        if let Ok(Some(s)) = c.try_wait() {
            panic!("the teacher process ended: {s}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the teacher did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const STUDENT: [&str; 12] = [
    "--student-model",
    "lenet",
    "--width",
    "0.5",
    "--loss",
    "soft_label:temperature=4",
    "--lr",
    "0.003",
    "--json",
    "-q",
    "--seed",
    "3",
];

fn student(teacher: &[&str], limit: usize, epochs: usize, out: &Path) -> Command {
    let mut c = slim();
    c.arg("distill")
        .args(teacher)
        .args(STUDENT)
        .args([
            "--limit",
            &limit.to_string(),
            "--epochs",
            &epochs.to_string(),
        ])
        .arg("--out")
        .arg(out);
    c
}

#[test]
fn online_offline_and_in_process_teachers_teach_the_same() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let t = trained_lenet(dir.path());
    let limit = 1024;
    let know = dir.path().join("knowledge");
    let o = slim()
        .args(["distill", "dump", "--teacher"])
        .arg(&t)
        .args(["--limit", &limit.to_string(), "-q", "--out"])
        .arg(&know)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut served = serve(&url, "T1", "only", &t, limit);
    // A malformed request, one for a sample that is not served and one for an unknown node
    // are dropped; the teacher goes on serving.
    let mut con = slim_dist::RedisUrl::parse(&url).unwrap().connect().unwrap();
    for msg in [
        "{not json".to_string(),
        r#"{"format":"slim-teacher-request/1","id":"x.1","indices":[5000],"nodes":["fc3"],"deadline_ms":99999999999999}"#.to_string(),
        r#"{"format":"slim-teacher-request/1","id":"x.2","indices":[1],"nodes":["nope"],"deadline_ms":99999999999999}"#.to_string(),
    ] {
        redis::cmd("XADD")
            .arg("slim:teacher:T1:requests")
            .arg("*")
            .arg("msg")
            .arg(msg)
            .query::<String>(&mut con)
            .unwrap();
    }
    let (a, b, c) = (
        dir.path().join("online.safetensors"),
        dir.path().join("offline.safetensors"),
        dir.path().join("inproc.safetensors"),
    );
    let online = json_of(
        &student(&["--teacher-service", "T1", "--redis", &url], limit, 2, &a)
            .output()
            .unwrap(),
    );
    let offline = json_of(
        &student(&["--teacher", know.to_str().unwrap()], limit, 2, &b)
            .output()
            .unwrap(),
    );
    let inproc = json_of(
        &student(&["--teacher", t.to_str().unwrap()], limit, 2, &c)
            .output()
            .unwrap(),
    );
    // Two teachers for one student: the served one and a local one, a loss each.
    let both = json_of(
        &slim()
            .arg("distill")
            .args([
                "--teacher",
                t.to_str().unwrap(),
                "--teacher-service",
                "T1",
                "--redis",
                &url,
            ])
            .args(["--student-model", "lenet", "--width", "0.5", "--json", "-q"])
            .args(["--loss", "soft_label:temperature=4,teacher_index=0"])
            .args([
                "--loss",
                "l2:teacher=pool2,student=pool2,adapter=true,teacher_index=1",
            ])
            .args(["--limit", &limit.to_string(), "--epochs", "1", "--out"])
            .arg(dir.path().join("both.safetensors"))
            .output()
            .unwrap(),
    );
    assert_eq!(both["teachers"].as_array().unwrap().len(), 2, "{both}");
    assert_eq!(both["losses"].as_object().unwrap().len(), 2, "{both}");
    served.kill().unwrap();
    served.wait().unwrap();
    for v in [&offline, &inproc] {
        assert_eq!(v["losses"], online["losses"], "{v}\n{online}");
        assert_eq!(v["top1"], online["top1"]);
    }
    let w = weights(&a);
    assert_eq!(
        w,
        weights(&b),
        "online and offline knowledge train the same student"
    );
    assert_eq!(
        w,
        weights(&c),
        "online and in-process teachers train the same student"
    );
    // Nothing was left unread for this student (the stray requests went nowhere).
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("slim:teacher:T1:answer:*")
        .query(&mut con)
        .unwrap();
    assert!(
        keys.iter()
            .all(|k| k.contains(":answer:x.") || k.is_empty()),
        "{keys:?}"
    );
}

#[test]
fn a_teacher_killed_mid_epoch_is_replaced_by_its_twin() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let t = trained_lenet(dir.path());
    let limit = 2048;
    // The reference: one teacher, never killed.
    let mut lone = serve(&url, "ref", "lone", &t, limit);
    let reference = json_of(
        &student(
            &["--teacher-service", "ref", "--redis", &url],
            limit,
            3,
            &dir.path().join("ref.safetensors"),
        )
        .output()
        .unwrap(),
    );
    lone.kill().unwrap();
    lone.wait().unwrap();
    // Two instances of one teacher; one is killed with SIGKILL once the student is under way.
    let mut a = serve(&url, "T2", "a", &t, limit);
    let mut b = serve(&url, "T2", "b", &t, limit);
    // A third "server" takes one request and never answers, as a process that died while
    // computing would: the student must ask again.
    let zombie_url = url.clone();
    let zombie = std::thread::spawn(move || {
        let mut con = slim_dist::RedisUrl::parse(&zombie_url)
            .unwrap()
            .connect()
            .unwrap();
        let v: redis::Value = redis::cmd("XREADGROUP")
            .arg(&["GROUP", "servers", "zombie", "COUNT", "1", "BLOCK", "60000"][..])
            .arg(&["STREAMS", "slim:teacher:T2:requests", ">"][..])
            .query(&mut con)
            .unwrap();
        v != redis::Value::Nil
    });
    let out = dir.path().join("twin.safetensors");
    let s = student(
        &[
            "--teacher-service",
            "T2",
            "--redis",
            &url,
            "--teacher-retry",
            "1",
            "--prefetch",
            "2",
        ],
        limit,
        3,
        &out,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut con = slim_dist::RedisUrl::parse(&url).unwrap().connect().unwrap();
    let started = Instant::now();
    loop {
        let sent: usize = redis::cmd("XLEN")
            .arg("slim:teacher:T2:requests")
            .query(&mut con)
            .unwrap();
        if sent >= 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the student did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    a.kill().unwrap();
    a.wait().unwrap();
    let o = s.wait_with_output().unwrap();
    b.kill().unwrap();
    b.wait().unwrap();
    let v = json_of(&o);
    assert!(zombie.join().unwrap(), "the silent server took a request");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("asking again"), "{err}");
    // 3 epochs of 32 batches: the kill came mid-way, and the student's result is the one an
    // undisturbed teacher gives.
    assert_eq!(v["losses"], reference["losses"], "{v}");
    assert_eq!(v["top1"], reference["top1"]);
    assert_eq!(weights(&out), weights(&dir.path().join("ref.safetensors")));
}

#[test]
fn without_a_teacher_the_student_stops_within_the_timeout() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.safetensors");
    let started = Instant::now();
    let o = student(
        &[
            "--teacher-service",
            "ghost",
            "--redis",
            &url,
            "--teacher-timeout",
            "2",
        ],
        512,
        1,
        &out,
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no process serves the teacher `ghost`"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!out.exists());

    // A teacher that dies with no twin: the student stops, naming it, within the timeout.
    let t = trained_lenet(dir.path());
    let mut only = serve(&url, "T3", "only", &t, 2048);
    let s = student(
        &[
            "--teacher-service",
            "T3",
            "--redis",
            &url,
            "--teacher-timeout",
            "3",
            "--teacher-retry",
            "1",
        ],
        2048,
        50,
        &out,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    only.kill().unwrap();
    only.wait().unwrap();
    let killed = Instant::now();
    let o = s.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no process serving the teacher `T3`"), "{err}");
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    assert!(!out.exists());

    // Bad settings are input errors.
    for (extra, needle) in [
        (&["--teacher-service", "a b"][..], "teacher name `a b`"),
        (
            &["--teacher-service", "x", "--prefetch", "0"][..],
            "--prefetch",
        ),
        (
            &["--teacher-service", "x", "--teacher-timeout", "0"][..],
            "--teacher-timeout",
        ),
        (
            &["--teacher-service", "x", "--redis", "http://x"][..],
            "not a Redis URL",
        ),
    ] {
        let o = student(extra, 512, 1, &out).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}
