//! A study in a real Redis server (started privately for the test): workers in threads, each
//! with its own connection, share one annealing search; a dead worker's candidate is handed
//! over; a damaged study is refused or its damaged entries left out.

use std::collections::BTreeSet;
use std::time::Duration;

use slim_core::search::{Annealing, Controller, Trial};
use slim_core::study::{StudyController, StudyStore, StudyTask, Worker, WorkerOptions};
use slim_dist::testing::RedisServer;
use slim_dist::{RedisStudy, RedisUrl};

const TARGET: [usize; 3] = [4, 1, 6];

fn reward(t: &[usize]) -> f64 {
    -t.iter()
        .zip(TARGET)
        .map(|(&a, b)| (a as f64 - b as f64).powi(2))
        .sum::<f64>()
}

struct Toy(usize);

impl StudyTask for Toy {
    fn feasible(&mut self, t: &[usize]) -> bool {
        t.iter().sum::<usize>() <= 12
    }
    fn proposed(&mut self, _t: &[usize]) -> slim_core::Result<serde_json::Value> {
        Ok(serde_json::json!({}))
    }
    fn evaluate(
        &mut self,
        t: &[usize],
        _p: &serde_json::Value,
        _k: &[Trial],
    ) -> slim_core::Result<(f64, serde_json::Value)> {
        self.0 += 1;
        std::thread::sleep(Duration::from_millis(3));
        Ok((reward(t), serde_json::json!({})))
    }
}

fn annealing() -> slim_core::Result<StudyController> {
    Ok(StudyController::Annealing(Annealing::new(
        vec![8; 3],
        vec![0; 3],
        1.0,
        0.95,
        1,
    )?))
}

fn opts(name: &str, lease_ms: u64) -> WorkerOptions {
    WorkerOptions {
        name: name.into(),
        lease: Duration::from_millis(lease_ms),
        poll: Duration::from_millis(10),
    }
}

fn key() -> serde_json::Value {
    serde_json::json!({"toy": 1})
}

#[test]
fn three_workers_share_a_study_in_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = RedisUrl::parse(&server.url()).unwrap();
    let n = 60;
    let make = annealing;
    let runs: Vec<(Vec<Trial>, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let url = &url;
                s.spawn(move || {
                    let store = RedisStudy::open(url, "toy").unwrap();
                    let w =
                        Worker::new(&store, key(), n, &make, opts(&format!("w{i}"), 5000)).unwrap();
                    let mut task = Toy(0);
                    (w.run(&mut task, &mut |_| {}).unwrap().trials, task.0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let trials = &runs[0].0;
    assert_eq!(trials.len(), n);
    assert!(runs.iter().all(|(t, _)| t == trials));
    assert_eq!(
        runs.iter().map(|(_, e)| e).sum::<usize>(),
        n,
        "each evaluated once"
    );
    let ids: BTreeSet<u64> = trials
        .iter()
        .map(|t| t.info["candidate"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), n);
    for t in trials {
        assert!(t.tokens.iter().sum::<usize>() <= 12);
        assert_eq!(t.reward, reward(&t.tokens));
    }
    let store = RedisStudy::open(&url, "toy").unwrap();
    let mut state = None;
    store
        .transact(&mut |s| {
            state = s;
            Ok(None)
        })
        .unwrap();
    let state = state.unwrap();
    assert_eq!((state.done, state.pending.len()), (n, 0));
    let best = trials
        .iter()
        .max_by(|a, b| a.reward.total_cmp(&b.reward))
        .unwrap();
    assert_eq!(state.controller.best().unwrap().1, best.reward);
    assert!(best.reward >= -2.0, "{best:?}");
}

#[test]
fn a_dead_workers_candidate_goes_to_another_and_damage_is_named() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = RedisUrl::parse(&server.url()).unwrap();
    let make = annealing;
    let store = RedisStudy::open(&url, "handover").unwrap();
    let dead = Worker::new(&store, key(), 5, &make, opts("dead", 300)).unwrap();
    let lost = dead.take_and_abandon(&mut Toy(0)).unwrap().unwrap();
    let store2 = RedisStudy::open(&url, "handover").unwrap();
    let live = Worker::new(&store2, key(), 5, &make, opts("live", 300)).unwrap();
    let mut took_over = Vec::new();
    let h = live
        .run(&mut Toy(0), &mut |p| {
            if let slim_core::study::WorkerProgress::Took {
                from: Some(f),
                tokens,
                ..
            } = p
            {
                took_over.push((f.to_string(), tokens.to_vec()));
            }
        })
        .unwrap();
    assert_eq!(h.trials.len(), 5);
    assert_eq!(took_over, vec![("dead".to_string(), lost.clone())]);
    let t0 = h.trials.iter().find(|t| t.info["candidate"] == 0).unwrap();
    assert_eq!(
        (t0.tokens.clone(), t0.info["attempts"].as_u64()),
        (lost, Some(2))
    );

    // A damaged trial entry is left out; a damaged state stops a worker, naming the key.
    let mut con = url.connect().unwrap();
    redis::cmd("RPUSH")
        .arg("slim:study:handover:trials")
        .arg("{not json")
        .query::<()>(&mut con)
        .unwrap();
    assert_eq!(store.trials().unwrap().len(), 5);
    redis::cmd("SET")
        .arg("slim:study:handover:state")
        .arg("[1, 2]")
        .query::<()>(&mut con)
        .unwrap();
    let e = live.run(&mut Toy(0), &mut |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("slim:study:handover:state is not a Slim study's state"),
        "{e}"
    );
    store.delete().unwrap();
    let fresh = Worker::new(&store, key(), 2, &make, opts("x", 300)).unwrap();
    assert_eq!(fresh.run(&mut Toy(0), &mut |_| {}).unwrap().trials.len(), 2);
}

#[test]
fn a_study_over_tls_with_a_password() {
    let Some(server) = RedisServer::start_with(slim_dist::testing::Setup {
        password: Some("s3cret-pw".into()),
        tls: true,
    }) else {
        return;
    };
    let url = server.redis_url();
    let store = RedisStudy::open(&url, "tls").unwrap();
    let make = annealing;
    let w = Worker::new(&store, key(), 4, &make, opts("t", 5000)).unwrap();
    assert_eq!(w.run(&mut Toy(0), &mut |_| {}).unwrap().trials.len(), 4);
    // The wrong password, plain text to a TLS port, and the system's roots (which do not
    // know the test's authority) are refused, and the password never shows.
    let port = server.port;
    for (u, ca) in [
        (
            format!("rediss://:wrong@localhost:{port}"),
            server.ca.clone(),
        ),
        (format!("redis://:s3cret-pw@127.0.0.1:{port}"), None),
        (format!("rediss://:s3cret-pw@localhost:{port}"), None),
    ] {
        let e = RedisUrl::parse_with_ca(&u, ca.as_deref())
            .and_then(|u| RedisStudy::open(&u, "tls"))
            .err()
            .unwrap_or_else(|| panic!("{u} was accepted"))
            .to_string();
        assert!(!e.contains("s3cret-pw") && !e.contains("wrong@"), "{e}");
        assert!(
            e.contains(&format!("localhost:{port}")) || e.contains(&format!("127.0.0.1:{port}")),
            "{e}"
        );
    }
}
