//! Helpers shared by the CLI tests of long jobs, shared searches and served teachers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn slim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slim"))
}

/// The one JSON object a successful command prints.
pub fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// A LeNet trained for one epoch on part of the bundled data, as `DIR/lenet.safetensors`.
pub fn trained_lenet(dir: &Path) -> PathBuf {
    let path = dir.join("lenet.safetensors");
    json_of(
        &slim()
            .args([
                "train", "--model", "lenet", "--epochs", "1", "--limit", "1500",
            ])
            .args(["-q", "--json", "--out"])
            .arg(&path)
            .output()
            .unwrap(),
    );
    path
}

/// `slim prune MODEL --method auto --flops-reduction 0.5 --trials N --eval-samples 300 -q
/// --json`, to which a test adds the rest.
pub fn auto_prune(model: &Path, trials: usize) -> Command {
    let mut c = slim();
    c.arg("prune")
        .arg(model)
        .args(["--method", "auto", "--flops-reduction", "0.5"])
        .args([
            "--trials",
            &trials.to_string(),
            "--eval-samples",
            "300",
            "-q",
            "--json",
        ]);
    c
}

/// A model file's weights, by name.
pub fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let m = slim_core::Model::load(path, &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = m
        .params
        .names()
        .map(|n| {
            let t = m.params.tensor(n).unwrap();
            let t = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap();
            (n.to_string(), t.to_vec1::<f32>().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
