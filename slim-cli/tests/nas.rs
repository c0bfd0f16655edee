//! End-to-end tests of `slim nas`: a search under a MACs limit and one under a latency limit
//! from a table built for the space, resumed from its history, the best exported and trained,
//! and the refusals.

use std::path::Path;
use std::process::Command;

fn slim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs")
}

fn ok(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

fn fails(o: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

const SMALL: [&str; 14] = [
    "--width",
    "0.25",
    "--train-images",
    "512",
    "--eval-images",
    "256",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--json",
    "-q",
    "--seed",
    "2",
];

fn sa(space: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "nas",
        "sa",
        "--space",
        space,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(SMALL);
    args.extend(extra);
    slim(&args)
}

#[test]
fn search_under_a_macs_limit_resume_export_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("search");
    let limit = 1_500_000u64;
    let lim = limit.to_string();
    let extra = ["--max-macs", lim.as_str(), "--iterations", "5"];
    let v = ok(&sa("resnet", &out, &extra));
    let history = v["history"].as_array().unwrap();
    let evaluated: Vec<_> = history
        .iter()
        .filter(|c| c["status"] == "evaluated")
        .collect();
    assert_eq!(evaluated.len(), 5, "{v}");
    for c in &evaluated {
        assert!(c["macs"].as_u64().unwrap() <= limit, "{c}");
        let r = c["reward"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{c}");
        assert!(c["params"].as_u64().unwrap() > 0 && c["tokens"].is_array());
    }
    // ResNet-20 at width 0.25 needs about 2M MACs: the search started below it, and what
    // it met above the limit is recorded as rejected, never scored.
    assert_eq!(v["baseline"]["meets_limits"], false, "{v}");
    let rejected: Vec<_> = history
        .iter()
        .filter(|c| c["status"] == "rejected")
        .collect();
    assert!(!rejected.is_empty());
    for c in &rejected {
        assert!(
            c["macs"].as_u64().unwrap() > limit && c["reward"].is_null(),
            "{c}"
        );
    }
    let best = &v["best"];
    assert!(evaluated
        .iter()
        .all(|c| c["reward"].as_f64() <= best["reward"].as_f64()));
    for f in [
        "history.json",
        "reward.svg",
        "reward-macs.svg",
        "results.md",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let svg = std::fs::read_to_string(out.join("reward-macs.svg")).unwrap();
    assert!(svg.contains("limit") && svg.contains("<circle"));

    // The same command again: every candidate comes from the history, none is trained.
    let again = ok(&sa("resnet", &out, &extra));
    assert_eq!(again["history"], v["history"]);
    assert!(again["seconds"].as_f64().unwrap() < v["seconds"].as_f64().unwrap());
    // Other limits on the same folder: refused.
    let o = sa(
        "resnet",
        &out,
        &["--max-macs", "1400000", "--iterations", "5"],
    );
    fails(&o, "another search");

    // The best, as a model file of the same architecture, trainable by `slim train`.
    let model = dir.path().join("best.safetensors");
    let e = ok(&slim(&[
        "nas",
        "export",
        out.to_str().unwrap(),
        "--rank",
        "1",
        "--out",
        model.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(e["candidate"]["tokens"], best["tokens"]);
    let info = ok(&slim(&["info", model.to_str().unwrap(), "--json"]));
    assert_eq!(info["macs"], best["macs"], "{info}");
    let trained = dir.path().join("trained.safetensors");
    let t = ok(&slim(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--epochs",
        "1",
        "--limit",
        "256",
        "--out",
        trained.to_str().unwrap(),
        "--json",
        "-q",
    ]));
    assert!(t["top1"].as_f64().is_some_and(|x| x > 0.0), "{t}");
    let o = slim(&[
        "nas",
        "export",
        out.to_str().unwrap(),
        "--rank",
        "6",
        "--out",
        model.to_str().unwrap(),
    ]);
    fails(&o, "5 distinct candidates");
}

#[test]
fn search_under_a_latency_limit_from_a_table_of_the_space() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("cpu.json");
    let t = table.to_str().unwrap();
    ok(&slim(&[
        "latency",
        "build",
        "--out",
        t,
        "--space",
        "mobilenet_v1",
        "--space-width",
        "0.25",
        "--space-samples",
        "4",
        "--runs",
        "3",
        "--warmup-ms",
        "0",
        "--json",
        "-q",
    ]));
    // The hand-made network's estimate, and a limit of 80% of it.
    let base = dir.path().join("base");
    let v = ok(&sa(
        "mobilenet_v1",
        &base,
        &[
            "--latency-table",
            t,
            "--max-latency-ms",
            "1000",
            "--iterations",
            "1",
        ],
    ));
    let base_ms = v["baseline"]["measure"]["latency_ms"].as_f64().unwrap();
    let limit = 0.8 * base_ms;
    let lim = format!("{limit}");
    let out = dir.path().join("search");
    let v = ok(&sa(
        "mobilenet_v1",
        &out,
        &[
            "--latency-table",
            t,
            "--max-latency-ms",
            &lim,
            "--fallback",
            "--iterations",
            "4",
        ],
    ));
    assert_eq!(v["baseline"]["meets_limits"], false);
    for c in v["history"].as_array().unwrap() {
        let ms = c["latency_ms"].as_f64().unwrap();
        if c["status"] == "evaluated" {
            assert!(ms <= limit, "{c}");
        } else {
            assert!(ms > limit, "{c}");
        }
    }
    assert!(out.join("reward-latency.svg").is_file());

    // A table without the space's ops: the missing signatures are listed.
    let lenet = dir.path().join("lenet.json");
    ok(&slim(&[
        "latency",
        "build",
        "--out",
        lenet.to_str().unwrap(),
        "--zoo",
        "lenet",
        "--runs",
        "1",
        "--json",
        "-q",
    ]));
    let o = sa(
        "mobilenet_v1",
        &dir.path().join("x"),
        &[
            "--latency-table",
            lenet.to_str().unwrap(),
            "--max-latency-ms",
            "5",
        ],
    );
    fails(&o, "cannot price candidate");
    fails(&o, "conv2d");
}

#[test]
fn bad_requests_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    fails(&sa("darts", &out, &[]), "unknown search space `darts`");
    fails(
        &sa("resnet", &out, &["--max-latency-ms", "2"]),
        "--max-latency-ms needs --latency-table",
    );
    fails(
        &sa("resnet", &out, &["--max-params", "10"]),
        "even the cheapest",
    );
    assert!(
        !out.exists(),
        "a search that found nothing left its output folder"
    );
    fails(
        &slim(&[
            "nas",
            "sa",
            "--space",
            "resnet",
            "--train-images",
            "7000",
            "--eval-images",
            "2000",
            "--out",
            out.to_str().unwrap(),
        ]),
        "training images",
    );
    let table = dir.path().join("int8.json");
    ok(&slim(&[
        "latency",
        "build",
        "--out",
        table.to_str().unwrap(),
        "--zoo",
        "lenet",
        "--runtime",
        "int8",
        "--runs",
        "1",
        "--json",
        "-q",
    ]));
    fails(
        &sa(
            "resnet",
            &out,
            &[
                "--latency-table",
                table.to_str().unwrap(),
                "--max-latency-ms",
                "2",
            ],
        ),
        "int8",
    );
    fails(
        &slim(&[
            "nas",
            "export",
            dir.path().to_str().unwrap(),
            "--out",
            dir.path().join("m.safetensors").to_str().unwrap(),
        ]),
        "no search history",
    );
}

#[test]
fn one_shot_search_trains_a_supernet_once_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("oneshot");
    let args = |iterations: &'static str| {
        vec![
            "nas",
            "oneshot",
            "--space",
            "mobilenet_v1",
            "--width",
            "0.25",
            "--train-images",
            "768",
            "--eval-images",
            "256",
            "--calibration-images",
            "128",
            "--supernet-epochs",
            "1",
            "--lr",
            "0.01",
            "--max-macs",
            "1500000",
            "--iterations",
            iterations,
            "--out",
            out.to_str().unwrap(),
            "--json",
            "-q",
        ]
    };
    let v = ok(&slim(&args("4")));
    assert!(out.join("supernet.safetensors").is_file());
    let evaluated: Vec<_> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "evaluated")
        .collect();
    assert_eq!(evaluated.len(), 4);
    for c in &evaluated {
        assert!(c["macs"].as_u64().unwrap() <= 1_500_000, "{c}");
    }
    // More iterations: the supernet is read back, the first four come from the history.
    let more = ok(&slim(&args("6")));
    let h = more["history"].as_array().unwrap();
    assert_eq!(
        &h[..v["history"].as_array().unwrap().len()],
        v["history"].as_array().unwrap().as_slice()
    );
    assert_eq!(h.iter().filter(|c| c["status"] == "evaluated").count(), 6);
    assert!(more["seconds"].as_f64().unwrap() < 3.0 * v["seconds"].as_f64().unwrap());
    // The best exports like an SA search's.
    let model = dir.path().join("best.safetensors");
    ok(&slim(&[
        "nas",
        "export",
        out.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--json",
    ]));
    assert!(model.is_file());
    // Or with the weights it was scored with: evaluated on the search's own images, the
    // exported model earns exactly the candidate's reward.
    let e = ok(&slim(&[
        "nas",
        "export",
        out.to_str().unwrap(),
        "--inherit",
        "--calibration-images",
        "128",
        "--out",
        model.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(e["inherited"]["same_calibration"], true, "{e}");
    let m = slim_core::Model::load(&model, &candle_core::Device::Cpu).unwrap();
    assert_eq!(m.provenance["nas_weights"], "inherited from the supernet");
    let data = slim_core::data::load_spec(slim_core::data::DEFAULT_SPEC).unwrap();
    let eval = data.train.take_last(256);
    let top1 = slim_core::train::evaluate(&m, &eval, &data.normalize, 256)
        .unwrap()
        .top1;
    let reward = e["candidate"]["reward"].as_f64().unwrap();
    assert!(
        (top1 - reward).abs() < 1e-9,
        "{top1} against the reward {reward}"
    );
    // A search without a supernet has nothing to inherit.
    let sa = dir.path().join("sa-none");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::copy(out.join("history.json"), sa.join("history.json")).unwrap();
    fails(
        &slim(&[
            "nas",
            "export",
            sa.to_str().unwrap(),
            "--inherit",
            "--out",
            dir.path().join("x.safetensors").to_str().unwrap(),
        ]),
        "holds no supernet",
    );
}
