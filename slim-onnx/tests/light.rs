//! The ONNX model zoo's classic CNNs, as the `onnx` package ships them
//! (`onnx/backend/test/data/light/light_*.onnx`): each imports as shipped, and Slim's forward
//! of the same graph with random weights matches ONNX Runtime's on every output.
//!
//! The light networks fill each weight with one value, so `tests/ort/light.py` gives the
//! weights seeded random values and adds the logits as a second output before the comparison.
//! The `onnx` package is Apache-2.0; the networks come from the ONNX model zoo, each under its
//! original license (BVLC AlexNet and GoogLeNet: BSD-style BVLC terms; ResNet-50, ShuffleNet
//! and ZFNet-512 from Caffe2's zoo: Apache-2.0 or MIT; VGG-19: CC BY 4.0; SqueezeNet:
//! BSD 2-Clause; DenseNet-121 and Inception v2: BSD 3-Clause). Nothing of them is copied
//! into the repository: the tests read them from the installed package.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor};
use slim_core::exec::ForwardOptions;
use slim_core::Mode;
use slim_onnx::{import_file, ImportOptions};

use common::{max_rel, python, workspace};

pub const LIGHT: [&str; 9] = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
];

/// Writes the light network `name` (as shipped, and with random weights) and ONNX Runtime's
/// outputs into `dir`.
fn prepare(py: &Path, name: &str, dir: &Path) {
    let out = Command::new(py)
        .arg(workspace().join("slim-onnx/tests/ort/light.py"))
        .arg(name)
        .arg(dir)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "light.py {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .expect("read")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn light_networks_import_and_match_onnx_runtime() {
    let Some(py) = python() else { return };
    let mut rows = Vec::new();
    for name in LIGHT {
        let dir = tempfile::tempdir().expect("tmp");
        prepare(py, name, dir.path());
        let started = Instant::now();
        let shipped = import_file(dir.path().join("model.onnx"), &ImportOptions::default())
            .unwrap_or_else(|e| panic!("{name} as shipped: {e}"));
        let import_ms = started.elapsed().as_secs_f64() * 1e3;
        let m = import_file(dir.path().join("random.onnx"), &ImportOptions::default())
            .unwrap_or_else(|e| panic!("{name} with random weights: {e}"));
        // The same nodes; the random file has the logits as a second output.
        assert!(
            m.graph.nodes() == shipped.graph.nodes(),
            "{name}: the two files' graphs differ"
        );

        let x = Tensor::from_vec(
            read_f32(&dir.path().join("input.bin")),
            (1, 3, 224, 224),
            &Device::Cpu,
        )
        .expect("input");
        let ys = m
            .forward_with(&[x], Mode::Eval, ForwardOptions::default())
            .unwrap_or_else(|e| panic!("{name}: forward: {e}"))
            .outputs;
        let listed = std::fs::read_to_string(dir.path().join("outputs.txt")).expect("outputs");
        assert_eq!(ys.len(), listed.lines().count(), "{name}: outputs");
        let mut worst = 0f32;
        for (k, y) in ys.iter().enumerate() {
            let want = read_f32(&dir.path().join(format!("output_{k}.bin")));
            let got: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("output");
            let err = max_rel(&got, &want);
            assert!(
                err <= 1e-4,
                "{name}: output {k} differs from ONNX Runtime's by {err:e} (relative to its largest value)"
            );
            worst = worst.max(err);
        }
        let macs = slim_core::analysis::analyze(&m.graph).macs;
        rows.push(format!(
            "| {name} | {} | {:.2}G | {import_ms:.0} ms | {worst:.1e} |",
            m.graph.len(),
            macs as f64 / 1e9
        ));
    }
    eprintln!("| network | nodes | MACs | import (as shipped) | largest relative error |");
    eprintln!("|---|---:|---:|---:|---:|");
    for r in rows {
        eprintln!("{r}");
    }
}
