//! Every command that reads a model file, given bad ones: an empty file, a text file, a file
//! that is not there, a truncated model, an int8 model where a float one is needed, and
//! impossible numbers; and the commands that read sensitivity files, latency tables,
//! knowledge shards and pipeline configs, given empty, text, truncated and foreign ones. Each must exit with status 2 and a message that names the problem,
//! write nothing, and never show a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn slim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Status 2, each needle in the message, no panic.
fn refused(args: &[&str], needles: &[&str]) {
    let o = slim(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected `{n}` in: {err}");
    }
}

struct Files {
    _dir: tempfile::TempDir,
    empty: PathBuf,
    text: PathBuf,
    missing: PathBuf,
    truncated: PathBuf,
    float: PathBuf,
    int8: PathBuf,
    out: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("tmp");
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("empty.safetensors"), b"").expect("write");
    std::fs::write(p("text.safetensors"), b"this is not a model\n").expect("write");
    let float = p("lenet.safetensors");
    let o = slim(&[
        "train",
        "--model",
        "lenet",
        "--epochs",
        "1",
        "--limit",
        "256",
        "--quiet",
        "--out",
        s(&float),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&float).expect("model");
    std::fs::write(p("truncated.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    let int8 = p("lenet-int8.safetensors");
    let o = slim(&[
        "quant",
        "ptq",
        s(&float),
        "--calib-batches",
        "1",
        "--quiet",
        "--out",
        s(&int8),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Files {
        empty: p("empty.safetensors"),
        text: p("text.safetensors"),
        missing: p("missing.safetensors"),
        truncated: p("truncated.safetensors"),
        float,
        int8,
        out: p("out.safetensors"),
        _dir: dir,
    }
}

#[test]
fn every_model_reading_command_refuses_bad_files() {
    let f = files();
    let bad = [
        (&f.empty, "empty.safetensors"),
        (&f.text, "text.safetensors"),
        (&f.missing, "missing.safetensors"),
        (&f.truncated, "truncated.safetensors"),
    ];
    let out = s(&f.out);
    for (file, name) in bad {
        let m = s(file);
        let commands: Vec<Vec<&str>> = vec![
            vec!["eval", m],
            vec!["info", m],
            vec!["prune", m, "--ratio", "0.5", "--out", out],
            vec!["sensitivity", m, "--out", out],
            vec!["quant", "ptq", m, "--out", out],
            vec!["quant", "qat", m, "--out", out],
            vec!["train", "--model", m, "--epochs", "1", "--out", out],
            vec![
                "distill",
                "--teacher",
                m,
                "--student-model",
                "lenet",
                "--loss",
                "soft_label",
                "--out",
                out,
            ],
            vec!["export", m, "--out", out],
            vec!["bench", m, "--runs", "1"],
            vec!["latency", "estimate", "--table", m, m],
        ];
        for args in commands {
            refused(&args, &[name]);
            assert!(!f.out.exists(), "{args:?} wrote {out}");
        }
    }
}

#[test]
fn wrong_kinds_of_model_and_impossible_numbers_are_refused() {
    let f = files();
    let (m, q, out) = (s(&f.float), s(&f.int8), s(&f.out));
    // An int8 model where a float one is needed.
    refused(
        &["train", "--model", q, "--epochs", "1", "--out", out],
        &["int8"],
    );
    refused(&["quant", "ptq", q, "--out", out], &["already quantized"]);
    refused(&["quant", "qat", q, "--out", out], &["already quantized"]);
    refused(&["prune", q, "--ratio", "0.5", "--out", out], &["int8"]);
    // Impossible numbers.
    refused(&["prune", m, "--ratio", "1.5", "--out", out], &["1.5"]);
    refused(
        &["prune", m, "--flops-reduction=-0.2", "--out", out],
        &["-0.2"],
    );
    refused(
        &["quant", "ptq", m, "--bits-weights", "1", "--out", out],
        &["bits"],
    );
    refused(
        &["quant", "ptq", m, "--calib-batches", "0", "--out", out],
        &["calib"],
    );
    refused(
        &["eval", m, "--data", "mnist:/no/such/dir"],
        &["/no/such/dir"],
    );
    refused(&["eval", m, "--data", "imagenet:/x"], &["imagenet"]);
    refused(
        &["train", "--model", "lenet", "--lr=-1", "--out", out],
        &["learning rate -1"],
    );
    refused(
        &["train", "--model", "nosuchnet", "--out", out],
        &["nosuchnet"],
    );
    refused(&["export", m, "--out", out, "--opset", "99"], &["opset 99"]);
    refused(
        &["export", q, "--out", out, "--activations-type", "u4"],
        &["--activations-type", "u4"],
    );
    refused(&["bench", m, "--batch", "0"], &["--batch 0"]);
    refused(&["bench", m, "--threads", "0"], &["--threads 0"]);
    // Numbers whose products overflow, and sizes no memory holds.
    refused(
        &[
            "train",
            "--model",
            "lenet",
            "--warmup-epochs",
            "18446744073709551615",
            "--out",
            out,
        ],
        &["warm-up epochs 18446744073709551615"],
    );
    refused(
        &[
            "train",
            "--model",
            "lenet",
            "--epochs",
            "18446744073709551615",
            "--out",
            out,
        ],
        &["epochs 18446744073709551615"],
    );
    refused(
        &[
            "info",
            "--model",
            "lenet",
            "--input",
            "1x4294967296x4294967296",
        ],
        &["--input", "4294967296"],
    );
    refused(
        &["info", "--model", "lenet", "--input", "1x100000x100000"],
        &["--input", "exceeds"],
    );
    // A model with fewer outputs than the data has classes.
    let five = f.float.with_file_name("five.safetensors");
    let cfg = slim_core::zoo::ZooConfig::new([1, 28, 28]).with_classes(5);
    slim_core::zoo::model("lenet", &cfg, 0, &candle_core::Device::Cpu)
        .expect("a 5-class lenet")
        .save(&five)
        .expect("saved");
    refused(&["eval", s(&five)], &["[5]", "10 classes"]);
    refused(
        &["quant", "ptq", s(&five), "--out", out],
        &["[5]", "10 classes"],
    );
    assert!(!f.out.exists(), "something was written");
}

#[test]
fn nonfinite_values_are_refused_by_name_unless_allowed() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("nan.safetensors");
    let out = dir.path().join("out.safetensors");
    let (nan, out) = (s(&path), s(&out));
    // A LeNet with one NaN in a bias.
    let m = slim_core::zoo::model(
        "lenet",
        &slim_core::zoo::ZooConfig::new([1, 28, 28]),
        0,
        &candle_core::Device::Cpu,
    )
    .expect("lenet");
    let bias = m
        .params
        .names()
        .find(|n| n.ends_with(".bias"))
        .expect("a bias")
        .to_string();
    let t = m.params.tensor(&bias).expect("bias");
    let mut v = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values");
    v[3] = f32::NAN;
    let t = candle_core::Tensor::from_vec(v, t.dims(), &candle_core::Device::Cpu).expect("nan");
    m.params.set(&bias, &t).expect("set");
    m.save(&path).expect("saved");

    let names = format!("tensor `{bias}` holds 1 NaN value (first at index 3)");
    let needles = ["nan.safetensors", names.as_str(), "--allow-nonfinite"];
    for args in [
        vec!["eval", nan],
        vec!["info", nan],
        vec!["bench", nan, "--runs", "1"],
        vec!["export", nan, "--out", out],
        vec!["quant", "ptq", nan, "--out", out],
        vec!["prune", nan, "--ratio", "0.5", "--out", out],
    ] {
        refused(&args, &needles);
    }

    // With the flag the model loads, and a warning names the tensor.
    let o = slim(&["eval", nan, "--allow-nonfinite", "--quiet"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains(&names) && err.contains("loaded anyway"),
        "{err}"
    );
    let o = slim(&["info", nan, "--allow-nonfinite"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Quantizing it still fails, naming the parameter.
    refused(
        &[
            "quant",
            "ptq",
            nan,
            "--allow-nonfinite",
            "--quiet",
            "--out",
            out,
        ],
        &[&format!("parameter `{bias}`"), "NaN"],
    );
    assert!(!Path::new(out).exists(), "something was written");
}

/// `name`'s bad copies in `dir`: empty, text, the first half of `real`, and JSON of another
/// kind.
fn bad_copies(dir: &Path, name: &str, real: &[u8]) -> Vec<PathBuf> {
    let variants: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("text", b"this is not it\n"),
        ("truncated", &real[..real.len() / 2]),
        ("other", br#"{"format": "something-else", "version": 1}"#),
    ];
    variants
        .iter()
        .map(|(v, bytes)| {
            let p = dir.join(format!("{v}-{name}"));
            std::fs::write(&p, bytes).expect("write");
            p
        })
        .collect()
}

#[test]
fn bad_sensitivity_files_tables_knowledge_and_configs_are_refused() {
    let f = files();
    let dir = f.out.parent().expect("a folder").to_path_buf();
    let (m, out) = (s(&f.float), s(&f.out));
    let p = |n: &str| dir.join(n);
    // Real files of each kind, made by Slim.
    let sens = p("sens.json");
    let table = p("table.json");
    let know = p("knowledge");
    for args in [
        vec![
            "sensitivity",
            m,
            "--ratios",
            "0.5",
            "--eval-samples",
            "64",
            "-q",
            "--out",
            s(&sens),
        ],
        vec![
            "latency",
            "build",
            "--zoo",
            "lenet",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--warmup-ms",
            "1",
            "-q",
            "--out",
            s(&table),
        ],
        vec![
            "distill",
            "dump",
            "--teacher",
            m,
            "--limit",
            "256",
            "-q",
            "--out",
            s(&know),
        ],
    ] {
        let o = slim(&args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for bad in bad_copies(&dir, "sens.json", &std::fs::read(&sens).expect("read")) {
        refused(
            &[
                "prune",
                m,
                "--method",
                "sensitivity",
                "--flops-reduction",
                "0.3",
                "--sensitivity",
                s(&bad),
                "--out",
                out,
            ],
            &[s(&bad)],
        );
    }
    for bad in bad_copies(&dir, "table.json", &std::fs::read(&table).expect("read")) {
        refused(&["latency", "estimate", m, "--table", s(&bad)], &[s(&bad)]);
        let nas_out = p("nas");
        refused(
            &[
                "nas",
                "sa",
                "--space",
                "resnet",
                "--latency-table",
                s(&bad),
                "--max-latency-ms",
                "1",
                "--out",
                s(&nas_out),
            ],
            &[s(&bad)],
        );
        assert!(!nas_out.exists());
    }
    // A knowledge directory with one damaged shard, and one with none.
    let shard = know.join("shard-00000.safetensors");
    let real = std::fs::read(&shard).expect("read");
    let student = [
        "--student-model",
        "lenet",
        "--loss",
        "soft_label",
        "--limit",
        "256",
        "--out",
        out,
    ];
    for bad in bad_copies(&dir, "shard", &real) {
        std::fs::copy(&bad, &shard).expect("copy");
        let mut args = vec!["distill", "--teacher", s(&know)];
        args.extend(student);
        refused(&args, &["shard-00000.safetensors"]);
    }
    // Shards made by hand: a fingerprint with a character across byte 16, and a node of
    // impossible shape.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (name, needle) in [
        ("knowledge-odd-fingerprint", "holds knowledge of the data"),
        ("knowledge-huge-node", "damaged shape for node `fc`"),
    ] {
        let dir = fixtures.join(name);
        let mut args = vec!["distill", "--teacher", s(&dir)];
        args.extend(student);
        refused(&args, &[name, needle]);
    }
    std::fs::remove_file(&shard).expect("remove");
    let mut args = vec!["distill", "--teacher", s(&know)];
    args.extend(student);
    refused(&args, &[s(&know)]);
    // Pipeline configs.
    let config = br#"model = "lenet"
[[stage]]
kind = "prune.uniform"
ratio = 0.3
"#;
    for bad in bad_copies(&dir, "config.toml", config) {
        refused(
            &["compress", "--config", s(&bad), "--out", s(&p("c"))],
            &[s(&bad)],
        );
        assert!(!p("c").exists());
    }
    assert!(!f.out.exists(), "a refused command wrote its output");
}
