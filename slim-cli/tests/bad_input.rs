//! Every command that reads a model file, given bad ones: an empty file, a text file, a file
//! that is not there, a truncated model, an int8 model where a float one is needed, and
//! impossible numbers. Each must exit with status 2 and a message that names the problem,
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
    assert!(!f.out.exists(), "something was written");
}
