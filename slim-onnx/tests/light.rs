//! The ONNX model zoo's classic CNNs, as the `onnx` package ships them
//! (`onnx/backend/test/data/light/light_*.onnx`): each imports as shipped; Slim's forward of
//! the same graph with random weights matches ONNX Runtime's on every output; pruned, its
//! export runs in ONNX Runtime; quantized, Slim's int8 runtime and ONNX Runtime (QDQ) run it.
//!
//! The light networks fill each weight with one value, so `tests/ort/light.py` gives the
//! weights seeded random values and adds the logits as a second output before the comparison.
//! The `onnx` package is Apache-2.0; the networks come from the ONNX model zoo, each under its
//! original license (BVLC AlexNet and GoogLeNet: BSD-style BVLC terms; ResNet-50, ShuffleNet
//! and ZFNet-512 from Caffe2's zoo: Apache-2.0 or MIT; VGG-19: CC BY 4.0; SqueezeNet:
//! BSD 2-Clause; DenseNet-121 and Inception v2: BSD 3-Clause). Nothing of them is copied
//! into the repository: the tests read them from the installed package.

mod common;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use slim_core::data::{ImageSet, Normalize};
use slim_core::exec::ForwardOptions;
use slim_core::{Mode, Model};
use slim_onnx::{export, import_file, ExportOptions, ImportOptions};
use slim_prune::criterion::Criterion;
use slim_prune::pruner::Pruner;
use slim_quant::ptq::{quantize, PtqConfig};

use common::{max_rel, ort_output, python, read_f32, workspace};

const LIGHT: [&str; 9] = [
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

/// The nine networks, prepared once and kept under `target/` (they take 1.3 GB and a minute
/// to make): in a folder named by a hash of `light.py`, so that a changed script prepares them
/// again and the folders of older scripts are removed. Each network is written beside its
/// place and renamed into it, so a run that stops half-way leaves nothing that looks complete.
fn prepared(py: &Path) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script =
            std::fs::read(workspace().join("slim-onnx/tests/ort/light.py")).expect("light.py");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        script.hash(&mut h);
        let stamp = format!("light-{:016x}", h.finish());
        let root = workspace().join("target/test-fixtures");
        std::fs::create_dir_all(&root).expect("target/test-fixtures");
        for old in std::fs::read_dir(&root)
            .expect("target/test-fixtures")
            .flatten()
        {
            let n = old.file_name().to_string_lossy().into_owned();
            if n.starts_with("light-") && n != stamp {
                let _ = std::fs::remove_dir_all(old.path());
            }
        }
        let dir = root.join(stamp);
        std::fs::create_dir_all(&dir).expect("fixture folder");
        for name in LIGHT {
            let done = dir.join(name);
            if done.join("outputs.txt").is_file() {
                continue;
            }
            let partial = dir.join(format!("{name}.partial"));
            let _ = std::fs::remove_dir_all(&partial);
            prepare(py, name, &partial);
            std::fs::rename(&partial, &done).expect("a prepared network renamed into place");
        }
        dir
    })
    .as_path()
}

/// The network with random weights, imported.
fn random(py: &Path, name: &str) -> Model {
    import_file(
        prepared(py).join(name).join("random.onnx"),
        &ImportOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{name} with random weights: {e}"))
}

/// The same random input as ONNX Runtime's reference outputs were computed on.
fn input(py: &Path, name: &str) -> Tensor {
    let values = read_f32(&prepared(py).join(name).join("input.bin"));
    Tensor::from_vec(values, (1, 3, 224, 224), &Device::Cpu).expect("input")
}

fn flat(y: &Tensor) -> Vec<f32> {
    y.flatten_all().and_then(|t| t.to_vec1()).expect("values")
}

/// The logits (the second output that `light.py` added): unlike the probabilities after the
/// softmax, they do not saturate.
fn logits(m: &Model, x: &Tensor) -> Vec<f32> {
    let out = m
        .forward_with(
            std::slice::from_ref(x),
            Mode::Eval,
            ForwardOptions::default(),
        )
        .expect("forward");
    flat(&out.outputs[1])
}

fn macs(m: &Model) -> u64 {
    slim_core::analysis::analyze(&m.graph).macs
}

#[test]
fn light_networks_import_and_match_onnx_runtime() {
    let Some(py) = python() else { return };
    let mut rows = Vec::new();
    for name in LIGHT {
        let dir = prepared(py).join(name);
        let started = Instant::now();
        let shipped = import_file(dir.join("model.onnx"), &ImportOptions::default())
            .unwrap_or_else(|e| panic!("{name} as shipped: {e}"));
        let import_ms = started.elapsed().as_secs_f64() * 1e3;
        let m = random(py, name);
        // The same nodes; the random file has the logits as a second output.
        assert!(
            m.graph.nodes() == shipped.graph.nodes(),
            "{name}: the two files' graphs differ"
        );
        let ys = m
            .forward_with(&[input(py, name)], Mode::Eval, ForwardOptions::default())
            .unwrap_or_else(|e| panic!("{name}: forward: {e}"))
            .outputs;
        let listed = std::fs::read_to_string(dir.join("outputs.txt")).expect("outputs");
        assert_eq!(ys.len(), listed.lines().count(), "{name}: outputs");
        let mut worst = 0f32;
        for (k, y) in ys.iter().enumerate() {
            let want = read_f32(&dir.join(format!("output_{k}.bin")));
            let err = max_rel(&flat(y), &want);
            assert!(
                err <= 1e-4,
                "{name}: output {k} differs from ONNX Runtime's by {err:e} (relative to its largest value)"
            );
            worst = worst.max(err);
        }
        rows.push(format!(
            "| {name} | {} | {:.2}G | {import_ms:.0} ms | {worst:.1e} |",
            m.graph.len(),
            macs(&m) as f64 / 1e9
        ));
    }
    eprintln!("| network | nodes | MACs | import (as shipped) | largest relative error |");
    eprintln!("|---|---:|---:|---:|---:|");
    for r in rows {
        eprintln!("{r}");
    }
}

/// Pruned by 30% of MACs (uniformly, L1 norm, no calibration), each network's export runs
/// in ONNX Runtime and computes what Slim's pruned model computes (AlexNet through its
/// grouped convolutions, every group alike; ShuffleNet through its channel shuffles, each
/// shuffle's blocks alike).
#[test]
fn light_networks_prune_and_their_exports_run_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let mut rows = Vec::new();
    for name in LIGHT {
        let m = random(py, name);
        let pruner = Pruner::new(&m, Criterion::L1Norm, &[]);
        let plan = pruner.and_then(|p| Ok((p.uniform_for_reduction(0.3)?, p)));
        let (plan, pruner) = plan.unwrap_or_else(|e| panic!("{name}: {e}"));
        let pruned = pruner.apply(&plan.ratios).expect("prune");
        let reduction = 1.0 - macs(&pruned) as f64 / macs(&m) as f64;
        assert!(reduction >= 0.25, "{name}: MACs reduced by {reduction}");
        let bytes = export(&pruned, &ExportOptions::default()).expect("export");
        let x = input(py, name);
        let ours = logits(&pruned, &x);
        let theirs = ort_output(py, &bytes, &x, 1);
        let err = max_rel(&theirs, &ours);
        assert!(err <= 1e-4, "{name}: the pruned export differs by {err:e}");
        rows.push(format!(
            "| {name} | {:.1}% of MACs removed, ONNX Runtime within {err:.1e} |",
            reduction * 100.0
        ));
    }
    eprintln!("| network | pruned |\n|---|---|");
    for r in rows {
        eprintln!("{r}");
    }
}

/// Quantized after calibration on random images, each network runs in Slim's int8 runtime,
/// and its QDQ export in ONNX Runtime; both stay close to the float model.
#[test]
fn light_networks_quantize_and_onnx_runtime_runs_their_qdq_exports() {
    let Some(py) = python() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let set = ImageSet {
        shape: [3, 224, 224],
        classes: 1000,
        images: (0..4 * 3 * 224 * 224).map(|_| rng.random()).collect(),
        labels: vec![0; 4],
    };
    let norm = Normalize {
        mean: vec![0.5; 3],
        std: vec![0.25; 3],
    };
    let cfg = PtqConfig {
        batches: 1,
        batch_size: 4,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for name in LIGHT {
        let m = random(py, name);
        let (q, _) = quantize(&m, &set, &norm, &cfg).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = input(py, name);
        let float = logits(&m, &x);
        let kernels = slim_quant::runtime::Int8Kernels::new(&q);
        let opts = ForwardOptions {
            kernels: Some(&kernels),
            ..Default::default()
        };
        let int8 = q
            .forward_with(std::slice::from_ref(&x), Mode::Eval, opts)
            .unwrap_or_else(|e| panic!("{name}: int8: {e}"));
        let ours = flat(&int8.outputs[1]);
        let bytes = export(&q, &ExportOptions::default()).expect("export");
        let theirs = ort_output(py, &bytes, &x, 1);
        let (to_float, to_ort) = (max_rel(&ours, &float), max_rel(&ours, &theirs));
        rows.push(format!(
            "| {name} | {to_float:.3} | {to_ort:.3} | {} MB |",
            bytes.len() >> 20
        ));
        assert!(
            to_float < 0.15 && to_ort < 0.1,
            "{name}: int8 {to_float} from float, {to_ort} from ONNX Runtime"
        );
    }
    eprintln!("| network | int8 against float | int8 against ONNX Runtime's QDQ | QDQ file |");
    eprintln!("|---|---:|---:|---:|");
    for r in rows {
        eprintln!("{r}");
    }
}

/// A model saved with its tensors in an external data file (as exporters write models over
/// 2 GB) imports from its file and equals the one-file model; a location that leaves the
/// model's folder is refused.
#[test]
fn external_data_files_are_read_beside_the_model() {
    let Some(py) = python() else { return };
    let src = prepared(py).join("squeezenet").join("random.onnx");
    let dir = tempfile::tempdir().expect("tmp");
    let script = r#"
import sys, onnx
m = onnx.load(sys.argv[1])
onnx.save_model(m, sys.argv[2] + "/model.onnx", save_as_external_data=True,
                all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
for t in m.graph.initializer:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
onnx.save_model(m, sys.argv[2] + "/escape.onnx")
"#;
    let out = Command::new(py)
        .args(["-c", script])
        .arg(&src)
        .arg(dir.path())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let one = random(py, "squeezenet");
    let split = import_file(dir.path().join("model.onnx"), &ImportOptions::default())
        .expect("external data");
    assert!(split.graph.nodes() == one.graph.nodes());
    for (name, p) in one.params.iter() {
        let a = flat(p.var.as_tensor());
        let b = flat(&split.params.tensor(name).expect("param"));
        assert_eq!(a, b, "{name}");
    }
    let bytes = std::fs::read(dir.path().join("model.onnx")).expect("read");
    let e = slim_onnx::import(&bytes, &ImportOptions::default()).expect_err("no folder");
    assert!(e.to_string().contains("external"), "{e}");
    let e =
        import_file(dir.path().join("escape.onnx"), &ImportOptions::default()).expect_err("escape");
    assert!(e.to_string().contains("inside the model's folder"), "{e}");
}
