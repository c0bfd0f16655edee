//! The SA search: limits hold for every evaluated candidate, rejected ones are recorded with
//! the limit they broke, a killed search resumes to the same result, impossible limits and
//! unpriceable candidates are clear errors, and the training reward really trains.

use std::cell::Cell;

use candle_core::Device;
use slim_core::analysis::analyze;
use slim_core::data::load_spec;
use slim_core::search::CostModel;
use slim_core::train::TrainConfig;
use slim_core::zoo::ZooConfig;
use slim_core::{CoreError, Graph, GraphBuilder};
use slim_nas::{
    candidates, sa_search, Limits, Reward, SaConfig, SearchSpace, Spaces, Token, TrainReward,
};

/// A cheap reward with a known preference: as many parameters as possible (so the limit is
/// what stops the search), counted on each call.
struct MoreParams<'a>(&'a Cell<usize>);

impl Reward for MoreParams<'_> {
    fn key(&self) -> serde_json::Value {
        "more-params".into()
    }
    fn reward(&mut self, _: &[usize], g: &Graph) -> slim_core::Result<f64> {
        self.0.set(self.0.get() + 1);
        Ok(analyze(g).params as f64 / 1e6)
    }
}

/// A search with the `MoreParams` reward and no progress display.
fn search(
    space: &dyn SearchSpace,
    limits: &Limits<'_>,
    calls: &Cell<usize>,
    cfg: &SaConfig,
    history: Option<&std::path::Path>,
) -> slim_nas::Result<slim_nas::SaResult> {
    sa_search(
        space,
        limits,
        &mut MoreParams(calls),
        cfg,
        history,
        &mut |_| {},
    )
}

/// Latency as a made-up linear function of MACs, so that the test knows every cost.
struct FakeLatency;

impl CostModel for FakeLatency {
    fn unit(&self) -> String {
        "ms (fake)".into()
    }
    fn cost(&self, g: &Graph) -> slim_core::Result<f64> {
        Ok(0.1 + analyze(g).macs as f64 / 1e7)
    }
}

fn space(name: &str) -> Box<dyn SearchSpace> {
    Spaces::builtin()
        .build(name, &ZooConfig::new([1, 28, 28]).with_width(0.5))
        .unwrap()
}

#[test]
fn every_evaluated_candidate_meets_the_limits() {
    let s = space("mobilenet_v2");
    let baseline = analyze(&s.graph(&s.initial()).unwrap());
    let fake = FakeLatency;
    let base_ms = fake.cost(&s.graph(&s.initial()).unwrap()).unwrap();
    let max_ms = 0.8 * base_ms;
    let max_params = baseline.params;
    let limits = Limits {
        max_params: Some(max_params),
        latency: Some((&fake, max_ms)),
        ..Default::default()
    };
    let calls = Cell::new(0);
    let cfg = SaConfig {
        iterations: 25,
        seed: 3,
        init_temperature: 0.05,
        ..Default::default()
    };
    let mut starts = 0;
    let r = sa_search(
        s.as_ref(),
        &limits,
        &mut MoreParams(&calls),
        &cfg,
        None,
        &mut |p| {
            if let slim_nas::NasProgress::Start { .. } = p {
                starts += 1
            }
        },
    )
    .unwrap();
    assert!(!r.baseline_feasible, "the baseline breaks the 80% limit");
    assert_eq!(starts, 1, "the start was shrunk to fit");
    let evaluated: Vec<_> = r
        .candidates
        .iter()
        .filter(|c| c.status == "evaluated")
        .collect();
    assert_eq!(evaluated.len(), 25);
    let distinct: std::collections::HashSet<_> = evaluated.iter().map(|c| &c.tokens).collect();
    assert_eq!(
        calls.get(),
        distinct.len(),
        "only evaluated candidates are scored, each once"
    );
    for c in &evaluated {
        // Measured again from scratch, not trusted from the record.
        let g = s.graph(&c.tokens).unwrap();
        let ms = fake.cost(&g).unwrap();
        assert!(ms <= max_ms, "{} costs {ms} > {max_ms}", c.arch);
        assert!(analyze(&g).params <= max_params);
        assert_eq!(c.measure.latency_ms, Some(ms));
    }
    let rejected: Vec<_> = r
        .candidates
        .iter()
        .filter(|c| c.status == "rejected")
        .collect();
    assert!(
        !rejected.is_empty(),
        "a search on the edge meets rejections"
    );
    for c in &rejected {
        let g = s.graph(&c.tokens).unwrap();
        assert!(
            fake.cost(&g).unwrap() > max_ms || analyze(&g).params > max_params,
            "{} was rejected but meets the limits",
            c.arch
        );
        assert!(c.reason.as_deref().is_some_and(|r| r.contains('>')));
        assert!(c.reward.is_none());
    }
    // The best is the best evaluated, and it is near the limit (the reward wants size).
    let best = r.best.reward.unwrap();
    assert!(evaluated.iter().all(|c| c.reward.unwrap() <= best));
    assert!(r.best.measure.latency_ms.unwrap() > 0.6 * base_ms);
    // The JSON form.
    let j = r.to_json();
    assert_eq!(j["history"].as_array().unwrap().len(), r.candidates.len());
    assert!(j["best"]["tokens"].is_array() && j["best"]["latency_ms"].is_number());
    assert_eq!(j["history"][0]["status"], "rejected");
    // Plots.
    let (over_time, vs_cost) = slim_nas::plots(&r.candidates, Some(max_ms));
    assert!(over_time.contains("<circle") && vs_cost.contains("limit"));
}

#[test]
fn a_killed_search_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.json");
    let s = space("resnet");
    let limits = Limits {
        max_macs: Some(6_000_000),
        ..Default::default()
    };
    let cfg = |iterations| SaConfig {
        iterations,
        seed: 1,
        ..Default::default()
    };
    let calls = Cell::new(0);
    let full = search(s.as_ref(), &limits, &calls, &cfg(16), None).unwrap();
    search(s.as_ref(), &limits, &calls, &cfg(7), Some(&path)).unwrap();
    let before = calls.get();
    let resumed = search(s.as_ref(), &limits, &calls, &cfg(16), Some(&path)).unwrap();
    assert_eq!(
        calls.get() - before,
        9,
        "only the missing candidates are evaluated"
    );
    assert_eq!(resumed.candidates, full.candidates, "rejections included");
    assert_eq!(resumed.best, full.best);
    let on_disk = slim_core::search::History::load(&path).unwrap();
    assert_eq!(candidates(&on_disk).unwrap(), full.candidates);
    // Other limits: another search.
    let other = Limits {
        max_macs: Some(5_000_000),
        ..Default::default()
    };
    let e = search(s.as_ref(), &other, &calls, &cfg(16), Some(&path)).unwrap_err();
    assert!(e.to_string().contains("another search"), "{e}");
}

#[test]
fn evolution_also_keeps_the_limits_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.json");
    let s = space("mobilenet_v1");
    let limits = Limits {
        max_macs: Some(5_000_000),
        ..Default::default()
    };
    let cfg = |iterations| SaConfig {
        iterations,
        evolution: Some(slim_nas::Evolve {
            population: 4,
            mutation: 0.2,
        }),
        ..Default::default()
    };
    let calls = Cell::new(0);
    let full = search(s.as_ref(), &limits, &calls, &cfg(12), None).unwrap();
    for c in full.candidates.iter().filter(|c| c.status == "evaluated") {
        assert!(
            analyze(&s.graph(&c.tokens).unwrap()).macs <= 5_000_000,
            "{}",
            c.arch
        );
    }
    search(s.as_ref(), &limits, &calls, &cfg(5), Some(&path)).unwrap();
    let resumed = search(s.as_ref(), &limits, &calls, &cfg(12), Some(&path)).unwrap();
    assert_eq!(resumed.candidates, full.candidates);
    // The annealing's history is another search's.
    let e = search(
        s.as_ref(),
        &limits,
        &calls,
        &SaConfig {
            iterations: 12,
            ..Default::default()
        },
        Some(&path),
    )
    .unwrap_err();
    assert!(e.to_string().contains("another search"), "{e}");
}

#[test]
fn impossible_limits_and_unpriceable_candidates_are_errors() {
    let s = space("mobilenet_v1");
    let calls = Cell::new(0);
    let cfg = SaConfig {
        iterations: 5,
        ..Default::default()
    };
    // No candidate has fewer than 1000 parameters.
    let tiny = Limits {
        max_params: Some(1000),
        ..Default::default()
    };
    let e = search(s.as_ref(), &tiny, &calls, &cfg, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("even the cheapest") && e.contains("params > 1000"),
        "{e}"
    );
    assert_eq!(calls.get(), 0, "nothing was trained");

    // Only the cheapest candidate fits: every move from it is rejected, and the search says
    // so after --max-rejections instead of looping.
    let all = s.ranges();
    let cheapest = analyze(&s.graph(&vec![0; all.len()]).unwrap()).macs;
    let edge = Limits {
        max_macs: Some(cheapest),
        ..Default::default()
    };
    let e = search(
        s.as_ref(),
        &edge,
        &calls,
        &SaConfig {
            max_rejections: 50,
            ..cfg.clone()
        },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("50 candidates in a row") && e.contains("MACs >"),
        "{e}"
    );
    assert_eq!(calls.get(), 1, "only the start was evaluated");

    // A cost model that cannot price a candidate (a table without its ops).
    struct Lacking;
    impl CostModel for Lacking {
        fn unit(&self) -> String {
            "ms".into()
        }
        fn cost(&self, _: &Graph) -> slim_core::Result<f64> {
            Err(CoreError::Invalid(
                "the table has no time for conv2d 1x28x28".into(),
            ))
        }
    }
    let lacking = Limits {
        latency: Some((&Lacking, 1.0)),
        ..Default::default()
    };
    let e = search(s.as_ref(), &lacking, &calls, &cfg, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot price") && e.contains("no time for conv2d"),
        "{e}"
    );
    let bad = Limits {
        latency: Some((&FakeLatency, -1.0)),
        ..Default::default()
    };
    assert!(sa_search(
        s.as_ref(),
        &bad,
        &mut MoreParams(&calls),
        &cfg,
        None,
        &mut |_| {}
    )
    .is_err());
}

/// A space a user defines: the width of one hidden layer of an MLP.
struct Mlp;

impl SearchSpace for Mlp {
    fn name(&self) -> String {
        "mlp".into()
    }
    fn key(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn tokens(&self) -> Vec<Token> {
        vec![Token {
            name: "hidden".into(),
            choices: ["8", "16", "32", "64"].map(String::from).to_vec(),
        }]
    }
    fn initial(&self) -> Vec<usize> {
        vec![3]
    }
    fn graph(&self, t: &[usize]) -> slim_nas::Result<Graph> {
        slim_nas::space::check_tokens(self, t)?;
        let hidden = 8 << t[0];
        Ok(GraphBuilder::new([1, 28, 28])
            .flatten("flatten")
            .linear("fc1", hidden)
            .relu("relu")
            .linear("fc2", 10)
            .build()?)
    }
}

#[test]
fn a_registered_space_is_searched_with_a_training_reward() {
    let mut spaces = Spaces::builtin();
    spaces.register(
        "mlp",
        Box::new(|_| Ok(Box::new(Mlp) as Box<dyn SearchSpace>)),
    );
    assert!(spaces.names().contains(&"mlp".to_string()));
    let s = spaces.build("mlp", &ZooConfig::new([1, 28, 28])).unwrap();
    let mut data = load_spec("builtin:mnist-10k").unwrap();
    data.train = data.train.take(1024);
    data.test = data.test.take(512);
    let mut reward = TrainReward {
        data,
        cfg: TrainConfig::default()
            .with_epochs(1)
            .with_batch_size(64)
            .with_lr(0.003),
        device: Device::Cpu,
        teacher: None,
    };
    // At most 32 hidden units: the initial 64 is shrunk to fit.
    let limits = Limits {
        max_params: Some(26_000),
        ..Default::default()
    };
    let r = sa_search(
        s.as_ref(),
        &limits,
        &mut reward,
        &SaConfig {
            iterations: 3,
            ..Default::default()
        },
        None,
        &mut |_| {},
    )
    .unwrap();
    assert!(r.best.measure.params <= 26_000);
    // A space without tokens is refused when it is built.
    struct Empty;
    impl SearchSpace for Empty {
        fn name(&self) -> String {
            "empty".into()
        }
        fn key(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn tokens(&self) -> Vec<Token> {
            Vec::new()
        }
        fn initial(&self) -> Vec<usize> {
            Vec::new()
        }
        fn graph(&self, _: &[usize]) -> slim_nas::Result<Graph> {
            Err(slim_nas::NasError::Invalid("no graph".into()))
        }
    }
    spaces.register(
        "empty",
        Box::new(|_| Ok(Box::new(Empty) as Box<dyn SearchSpace>)),
    );
    let e = spaces
        .build("empty", &ZooConfig::new([1, 28, 28]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`empty` has no tokens"), "{e}");
    // A trained MLP on MNIST: far above chance.
    assert!(r.best.reward.unwrap() > 0.6, "{:?}", r.best);
}
