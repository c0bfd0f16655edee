//! End-to-end tests of `slim compress`: a small pipeline, its report, resuming, and the
//! configuration errors.

use std::path::Path;
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

const SMALL: &str = r#"
[model]
zoo = "lenet"

[data]
spec = "builtin:mnist-10k"
limit = 1500

[train]
epochs = 1
lr = 0.003

[[strategy]]
kind = "prune.uniform"
flops_reduction = 0.5
finetune_epochs = 1

[[strategy]]
kind = "quant.ptq"
calib_batches = 4
"#;

fn compress(config: &Path, out: &Path, extra: &[&str]) -> Output {
    slim()
        .args(["compress", "--quiet", "--json", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_pipeline_runs_reports_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small.toml");
    std::fs::write(&config, SMALL).unwrap();
    let out = dir.path().join("out");
    let v = json_of(&compress(&config, &out, &[]));
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    assert_eq!(stages[0]["name"], "baseline");
    assert_eq!(stages[1]["name"], "prune.uniform");
    assert_eq!(stages[2]["name"], "quant.ptq");
    let q = &stages[2];
    assert!(
        q["bytes"].as_u64().unwrap() * 10 < stages[1]["bytes"].as_u64().unwrap() * 3,
        "{q}"
    );
    assert!(
        q["top1"].as_f64().unwrap() > stages[1]["top1"].as_f64().unwrap() - 0.03,
        "{q}"
    );
    let (b, p) = (&stages[0], &stages[1]);
    let ratio = p["macs"].as_f64().unwrap() / b["macs"].as_f64().unwrap();
    assert!((ratio - 0.5).abs() <= 0.01, "{ratio}");
    assert!(b["top1"].as_f64().unwrap() > 0.7, "{b}");
    assert!(p["top1"].as_f64().unwrap() > 0.7, "{p}");
    for s in stages {
        let f = Path::new(s["file"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(f).unwrap().len(),
            s["bytes"].as_u64().unwrap()
        );
    }
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("prune.uniform"));
    assert!(std::fs::read_to_string(out.join("accuracy-size.svg"))
        .unwrap()
        .contains("prune.uniform"));

    // Every stage's batch-1 forward is timed, in this sitting.
    for s in stages {
        assert!(s["measured_ms"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The same finished pipeline again: nothing is redone, the results are reported (the
    // stages timed again).
    let again = json_of(&compress(&config, &out, &[]));
    assert_eq!(untimed(&again["stages"]), untimed(&v["stages"]));

    // A pipeline stopped after its baseline continues with the next stages only.
    let state_path = out.join("pipeline.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["stages"].as_array_mut().unwrap().truncate(1);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let stopped = compress(&config, &out, &[]);
    assert_eq!(stopped.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("--resume"));
    let base_file = stages[0]["file"].as_str().unwrap();
    let before = std::fs::metadata(base_file).unwrap().modified().unwrap();
    let r = json_of(&compress(&config, &out, &["--resume"]));
    assert_eq!(untimed(&r["stages"])[0], untimed(&v["stages"])[0]);
    assert_eq!(r["stages"][1]["macs"], v["stages"][1]["macs"]);
    assert_eq!(r["stages"].as_array().unwrap().len(), 3);
    assert_eq!(
        std::fs::metadata(base_file).unwrap().modified().unwrap(),
        before
    );

    // Another configuration in that folder is refused.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, SMALL.replace("0.5", "0.4")).unwrap();
    let o = compress(&other, &out, &["--resume"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another pipeline"));
}

#[test]
fn a_pruned_model_learns_from_the_baseline_in_a_distill_stage() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hybrid.toml");
    let text = SMALL
        .replace("finetune_epochs = 1", "finetune_epochs = 0")
        .replace(
            "[[strategy]]\nkind = \"quant.ptq\"",
            "[[strategy]]\nkind = \"distill\"\nloss = [\"soft_label:temperature=4\", \
             \"l2:teacher=pool2,student=pool2,adapter=true\"]\nepochs = 1\n\n\
             [[strategy]]\nkind = \"quant.ptq\"",
        );
    std::fs::write(&config, &text).unwrap();
    let out = dir.path().join("out");
    let v = json_of(&compress(&config, &out, &[]));
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "prune.uniform", "distill", "quant.ptq"]);
    let (p, d) = (&stages[1], &stages[2]);
    // The student keeps its pruned shape (the adapter is not saved) and learns.
    assert_eq!(p["macs"], d["macs"]);
    assert_eq!(p["params"], d["params"]);
    assert!(
        d["top1"].as_f64().unwrap() > p["top1"].as_f64().unwrap() - 0.02,
        "{v}"
    );
    assert!(d["top1"].as_f64().unwrap() > 0.7, "{d}");
    assert_eq!(d["info"]["losses"].as_object().unwrap().len(), 2, "{d}");

    // A teacher from the zoo, trained in the stage's folder first.
    let zoo = dir.path().join("zoo.toml");
    std::fs::write(
        &zoo,
        text.replace(
            "kind = \"distill\"",
            "kind = \"distill\"\nteacher = \"zoo:lenet\"\nteacher_epochs = 1",
        ),
    )
    .unwrap();
    let zoo_out = dir.path().join("zoo-out");
    let v = json_of(&compress(&zoo, &zoo_out, &[]));
    let d = &v["stages"][2];
    assert!(d["info"]["teacher_top1"].as_f64().unwrap() > 0.5, "{d}");
    assert!(zoo_out
        .join("02-distill/teacher-lenet-w1-e1.safetensors")
        .is_file());

    // A loss naming a node the student lacks stops the stage with the names close to it.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text.replace("student=pool2", "student=pool_2")).unwrap();
    let o = compress(&bad, &dir.path().join("bad-out"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        err.contains("pool_2") && err.contains("close names: pool2"),
        "{err}"
    );
}

/// Two branches from one baseline, as in a table of hybrid methods: pruned then int8, and
/// int8 alone; plus a network of the baseline's shape starting afresh.
const BRANCHES: &str = r#"
[model]
zoo = "lenet"

[data]
spec = "builtin:mnist-10k"
limit = 1500

[train]
epochs = 1
lr = 0.003

[[strategy]]
kind = "prune.uniform"
name = "pruned"
flops_reduction = 0.5
finetune_epochs = 1

[[strategy]]
kind = "quant.ptq"
name = "pruned + int8"
calib_batches = 4

[[strategy]]
kind = "quant.ptq"
name = "int8"
from = "baseline"
calib_batches = 4

[[strategy]]
kind = "quant.ptq"
name = "untrained int8"
from = "init"
calib_batches = 4
"#;

#[test]
fn stages_branch_from_any_earlier_stage_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("branches.toml");
    std::fs::write(&config, BRANCHES).unwrap();
    let out = dir.path().join("out");
    let v = json_of(&compress(&config, &out, &[]));
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "pruned",
            "pruned + int8",
            "int8",
            "untrained int8"
        ]
    );
    let (base, pruned, pruned8, int8, fresh) =
        (&stages[0], &stages[1], &stages[2], &stages[3], &stages[4]);
    // The pruned branch keeps the pruned shape; the other starts from the unpruned baseline.
    assert_eq!(pruned8["macs"], pruned["macs"]);
    assert_eq!(int8["macs"], base["macs"]);
    assert!(pruned["macs"].as_u64().unwrap() * 10 < base["macs"].as_u64().unwrap() * 6);
    assert!(pruned8.get("from").is_none(), "{pruned8}");
    assert_eq!(int8["from"], "baseline");
    assert_eq!(fresh["from"], "init");
    // Quantizing the trained baseline keeps its accuracy; fresh weights know nothing.
    let top1 = |s: &serde_json::Value| s["top1"].as_f64().unwrap();
    assert!(top1(int8) > top1(base) - 0.03, "{v}");
    assert!(top1(pruned8) > 0.7, "{v}");
    assert!(top1(fresh) < 0.4, "{v}");
    assert_eq!(fresh["macs"], base["macs"]);
    // Names with spaces become file names with underscores.
    assert!(out.join("02-pruned_+_int8.safetensors").is_file());
    // The report says where each stage started.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in [
        "| stage | from |",
        "| pruned + int8 | pruned |",
        "| int8 | baseline |",
        "| untrained int8 | init |",
    ] {
        assert!(report.contains(row), "{row}: {report}");
    }

    // Stopped after the pruned stage, the pipeline resumes both branches to the same results.
    let state_path = out.join("pipeline.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["stages"].as_array_mut().unwrap().truncate(2);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let r = json_of(&compress(&config, &out, &["--resume"]));
    for (a, b) in r["stages"].as_array().unwrap().iter().zip(stages) {
        for key in ["name", "top1", "top5", "macs", "params", "bytes", "from"] {
            assert_eq!(a.get(key), b.get(key), "{key}: {a} against {b}");
        }
    }
}

#[test]
fn a_search_stage_hands_on_a_smaller_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nas.toml");
    std::fs::write(
        &config,
        r#"
[model]
zoo = "resnet20"
width = 0.25

[data]
spec = "builtin:mnist-10k"
limit = 2000

[train]
epochs = 1
lr = 0.01

[[strategy]]
kind = "nas.sa"
space = "resnet"
width = 0.25
max_macs_ratio = 0.7
iterations = 3
train_images = 512
eval_images = 256

[[strategy]]
kind = "quant.ptq"
calib_batches = 2
"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let v = json_of(&compress(&config, &out, &[]));
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages[1]["name"], "nas.sa");
    let (b, n) = (&stages[0], &stages[1]);
    assert!(
        n["macs"].as_f64().unwrap() <= 0.7 * b["macs"].as_f64().unwrap(),
        "{n}"
    );
    assert!(
        n["info"]["arch"].is_string() && n["info"]["evaluated"] == 3,
        "{n}"
    );
    // Trained with the pipeline's recipe: far above chance.
    assert!(n["top1"].as_f64().unwrap() > 0.3, "{n}");
    assert!(out.join("01-nas.sa/history.json").is_file());
    assert!(out.join("01-nas.sa/reward.svg").is_file());
    assert_eq!(stages[2]["name"], "quant.ptq");
}

#[test]
fn the_report_estimates_latency_from_the_tables_given() {
    let dir = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    for runtime in ["f32", "int8"] {
        let t = dir.path().join(format!("{runtime}.json"));
        let o = slim()
            .args([
                "latency",
                "build",
                "--zoo",
                "lenet",
                "--runs",
                "2",
                "-q",
                "--runtime",
            ])
            .arg(runtime)
            .arg("--out")
            .arg(&t)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        tables.push(format!("{:?}", t.to_str().unwrap()));
    }
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "{SMALL}\n[output]\nlatency_tables = [{}]\n",
            tables.join(", ")
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let v = json_of(&compress(&config, &out, &[]));
    let stages = v["stages"].as_array().unwrap();
    let ms: Vec<f64> = stages
        .iter()
        .map(|s| s["latency_ms"].as_f64().unwrap())
        .collect();
    // The baseline is the model the f32 table was built from: no fallback. The pruned one has
    // other shapes (fallback); the int8 one is priced from the int8 table.
    assert!(
        stages[0].get("latency_fallback_ops").is_none(),
        "{}",
        stages[0]
    );
    assert!(stages[1]["latency_fallback_ops"].as_u64().unwrap() > 0);
    assert!(ms.iter().all(|&m| m > 0.0), "{ms:?}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("est. latency") && md.contains(" ms*"), "{md}");
    // Two tables of one runtime: refused.
    std::fs::write(
        &config,
        format!(
            "{SMALL}\n[output]\nlatency_tables = [{}, {}]\n",
            tables[0], tables[0]
        ),
    )
    .unwrap();
    let o = slim()
        .args(["compress", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("two tables of the f32 runtime"));
}

#[test]
fn configuration_errors_name_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            SMALL.replace("finetune_epochs = 1", "finetune_epoch = 1"),
            "finetune_epoch",
            Some(16),
        ),
        (
            SMALL.replace("prune.uniform", "prune.magic"),
            "prune.magic",
            Some(14),
        ),
        (
            SMALL.replace("limit = 1500", "limit = \"many\""),
            "limit",
            Some(7),
        ),
        (
            SMALL.replace("flops_reduction = 0.5", "flops_reduction = 1.5"),
            "(0, 1)",
            None,
        ),
        (
            SMALL.replace("zoo = \"lenet\"", "file = \"missing.safetensors\""),
            "missing.safetensors",
            None,
        ),
        (
            SMALL.replace("[train]", "[train]\ncolour = 3"),
            "colour",
            None,
        ),
        (
            SMALL.replace(
                "kind = \"quant.ptq\"\ncalib_batches = 4",
                "kind = \"distill\"\nloss = [\"kl:t=2\"]",
            ),
            "unknown loss `kl`",
            None,
        ),
        (
            SMALL.replace(
                "kind = \"quant.ptq\"\ncalib_batches = 4",
                "kind = \"distill\"\nteacher = \"nowhere.safetensors\"",
            ),
            "nowhere.safetensors",
            None,
        ),
        (
            SMALL.replace(
                "kind = \"quant.ptq\"\ncalib_batches = 4",
                "kind = \"distill\"\nteacher = \"zoo:resnet21\"",
            ),
            "zoo:resnet21",
            None,
        ),
        (
            SMALL.replace(
                "kind = \"quant.ptq\"\ncalib_batches = 4",
                "kind = \"nas.sa\"\nspace = \"darts\"",
            ),
            "unknown search space `darts`",
            None,
        ),
        (
            SMALL.replace(
                "kind = \"quant.ptq\"\ncalib_batches = 4",
                "kind = \"nas.oneshot\"\nspace = \"resnet\"\nmax_latency_ms = 2.0",
            ),
            "go together",
            None,
        ),
        (
            SMALL.replace(
                "kind = \"quant.ptq\"\ncalib_batches = 4",
                "kind = \"nas.sa\"\nspace = \"resnet\"\nmax_macs_ratio = 1.5",
            ),
            "max_macs_ratio",
            None,
        ),
        (
            BRANCHES.replace("from = \"baseline\"", "from = \"untrained int8\""),
            "names no earlier stage",
            Some(27),
        ),
        (
            BRANCHES.replace("name = \"int8\"", "name = \"pruned\""),
            "two stages are named \"pruned\"",
            Some(26),
        ),
        (
            BRANCHES.replace("name = \"int8\"", "name = \"init\""),
            "is reserved",
            Some(26),
        ),
        (
            BRANCHES.replace("name = \"int8\"", "name = \"int8/x\""),
            "`name` must be",
            Some(26),
        ),
        (
            BRANCHES.replace("from = \"baseline\"", "from = 3"),
            "`from` must be a string",
            Some(27),
        ),
        (
            // (the configuration itself stands in for an existing model file)
            BRANCHES.replace(
                "zoo = \"lenet\"",
                &format!("file = \"{}\"", dir.path().join("c.toml").display()),
            ),
            "needs a zoo model",
            Some(33),
        ),
    ];
    for (text, needle, line) in cases {
        let config = dir.path().join("c.toml");
        std::fs::write(&config, &text).unwrap();
        let o = slim()
            .args(["compress", "--check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{needle}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
        if let Some(l) = line {
            assert!(err.contains(&format!("line {l}")), "{needle}: {err}");
        }
    }
    // The default pipeline checks out.
    let o = slim().args(["compress", "--check"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_example_configurations_check_out() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let o = slim()
                .args(["compress", "--check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            n += 1;
        }
    }
    assert!(n >= 2);
}

#[test]
fn a_qat_stage_trains_and_writes_an_int8_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("qat.toml");
    let text = SMALL
        .replace("finetune_epochs = 1", "finetune_epochs = 0")
        .replace(
            "kind = \"quant.ptq\"\ncalib_batches = 4",
            "kind = \"quant.qat\"\nweights = \"abs_max\"\nepochs = 1\nlr = 0.0005",
        );
    assert!(text.contains("quant.qat"));
    std::fs::write(&config, &text).unwrap();
    let out = dir.path().join("out");
    let v = json_of(&compress(&config, &out, &[]));
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "prune.uniform", "quant.qat"]);
    let (p, q) = (&stages[1], &stages[2]);
    assert_eq!(q["info"]["weights"], "abs_max", "{q}");
    assert!(
        q["bytes"].as_u64().unwrap() * 10 < p["bytes"].as_u64().unwrap() * 3,
        "{q}"
    );
    assert!(
        q["top1"].as_f64().unwrap() > p["top1"].as_f64().unwrap() - 0.03,
        "{q} after {p}"
    );
    // A bad option is refused before any work.
    std::fs::write(&config, text.replace("lr = 0.0005", "lr = -1")).unwrap();
    let o = compress(&config, &dir.path().join("bad"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("lr"));
}

#[test]
fn a_pipeline_killed_mid_stage_resumes_to_the_unbroken_result() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small.toml");
    std::fs::write(&config, SMALL).unwrap();
    let unbroken = json_of(&compress(&config, &dir.path().join("unbroken"), &[]));

    // The same pipeline, killed with SIGKILL once its baseline is recorded (so, inside the
    // pruning stage's fine-tuning or later).
    let out = dir.path().join("killed");
    let mut child = slim()
        .args(["compress", "--quiet", "--json", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let state = out.join("pipeline.json");
    let start = Instant::now();
    let recorded = || {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| !v["stages"].as_array().is_none_or(|s| s.is_empty()))
    };
    while !recorded() && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(recorded(), "the baseline was never recorded");
    child.kill().unwrap();
    if child.wait().unwrap().success() {
        return; // finished before the kill: nothing to resume
    }
    // Whatever the kill interrupted, every recorded stage's file is whole.
    let text = std::fs::read_to_string(&state).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("the state file is whole");
    for s in v["stages"].as_array().unwrap() {
        let f = s["file"].as_str().unwrap();
        slim_core::Model::load(f, &candle_core::Device::Cpu).expect("a whole model file");
    }
    let resumed = json_of(&compress(&config, &out, &["--resume"]));
    let (a, b) = (
        unbroken["stages"].as_array().unwrap(),
        resumed["stages"].as_array().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for key in ["name", "top1", "macs", "params", "bytes"] {
            assert_eq!(x[key], y[key], "{key} of {}", x["name"]);
        }
    }
}

/// A report's stages without their timings, which every run measures again.
fn untimed(stages: &serde_json::Value) -> Vec<serde_json::Value> {
    stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.as_object_mut().unwrap().remove("measured_ms");
            s
        })
        .collect()
}
