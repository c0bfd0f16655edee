//! How exporters spell activations and arithmetic (`tests/ort/spellings.py` writes one small
//! model per spelling, with ONNX Runtime's outputs): each imports into the named op that it
//! decomposes (hardswish as Add/Clip/Mul/Div, GELU as Div/Erf/Add/Mul/Mul, ...), nothing of
//! the decomposition is left behind, Slim's forward matches ONNX Runtime's on every output, so
//! does its re-export's, and quantized, its int8 runtime stays close to float.

mod common;

use std::process::Command;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use slim_core::data::{ImageSet, Normalize};
use slim_core::exec::ForwardOptions;
use slim_core::{Mode, Model};
use slim_onnx::{export, import_file, ExportOptions, ImportOptions};
use slim_quant::ptq::{quantize, PtqConfig};

use common::{max_rel, ort_output, python, read_f32, workspace};

/// The op kinds a case must import to, and those that must not be left in the graph.
fn expected(case: &str) -> (&'static [&'static str], &'static [&'static str]) {
    const PARTS: &[&str] = &["relu6", "clip", "channelaffine", "erf", "mul", "sigmoid"];
    match case {
        c if c.starts_with("hardswish") => (&["hardswish"], PARTS),
        c if c.starts_with("hardsigmoid") => {
            (&["hardsigmoid", "mul"], &["relu6", "clip", "channelaffine"])
        }
        c if c.starts_with("relu6") => (&["relu6"], &["clip"]),
        "clip_general" => (&["clip"], &[]),
        "silu" => (&["silu"], PARTS),
        "gelu_tanh" => (&["gelutanh"], PARTS),
        c if c.starts_with("gelu") => (&["gelu"], PARTS),
        "leaky_relu" => (&["leakyrelu"], &[]),
        "prelu" => (&["prelu"], &[]),
        "tanh" => (&["tanh"], &[]),
        "scalar_arith" | "channel_affine_shared" | "sub_from_const" => (&["channelaffine"], &[]),
        "bn_after_gap" => (&["batchnorm2d"], &[]),
        // A Pad of zeros before a convolution joins its padding; what stays asymmetric is a
        // Pad node of its own.
        "conv_same_upper_s2" | "conv_pads_asymmetric" | "pad_then_conv" => (&["pad"], &[]),
        "pad_opset9" | "pad_reflect" | "pad_edge" => (&["pad"], &[]),
        c if c.starts_with("resize") || c.starts_with("upsample") => (&["resize"], &[]),
        c if c.starts_with("convtranspose") => (&["convtranspose2d"], &[]),
        // Both layer norms (one written out, one native) and the erf GELU become named ops.
        "recognizer" => (
            &["layernorm", "gelu", "matmul", "softmaxat", "dense"],
            &["sqrt", "erf", "constbinary"],
        ),
        "segmenter" => (&["resize", "convtranspose2d", "concat", "softmax"], &[]),
        "gather_token" => (&["slice", "concatat"], &[]),
        // Pools of any window are Slim's pools (a zero Pad where an average counts padding
        // but not ceil mode's last window); 1-D and 3-D ones pool reshaped planes.
        "pool_windows" => (&["maxpool2d", "avgpool2d", "pad"], &[]),
        "pool_1d_3d" => (&["maxpool2d", "avgpool2d", "reshape"], &[]),
        "smooth_activations" => (&["unary", "constbinary"], &[]),
        "mish_l2_norm" => (&["unary", "binary", "reduce"], &[]),
        "conv_strides_per_axis" => (&["conv2d", "slice"], &[]),
        "argmax_head" => (&["reduce", "resize"], &[]),
        "flips_and_norms" => (&["slice", "layernorm", "channelaffine", "transpose"], &[]),
        "vit_front" => (&["constant", "concatat", "layernorm", "matmul"], &[]),
        _ => (&[], &[]),
    }
}

/// The largest difference (relative to the largest value) between the int8 runtime's first
/// output and the float one, on the random images it was calibrated on.
fn int8_error(m: &Model, x: &Tensor) -> f32 {
    let [c, h, w] = x.dims()[1..] else {
        panic!("a [N, C, H, W] input")
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let n = 8;
    let set = ImageSet {
        shape: [c, h, w],
        classes: 1,
        images: (0..n * c * h * w).map(|_| rng.random()).collect(),
        labels: vec![0; n],
    };
    // Pixels to -4..4, about the spread of the test input.
    let norm = Normalize {
        mean: vec![0.5; c],
        std: vec![0.125; c],
    };
    let cfg = PtqConfig {
        batches: 1,
        batch_size: n,
        ..Default::default()
    };
    let (q, _) = quantize(m, &set, &norm, &cfg).expect("ptq");
    let pixels: Vec<f32> = set
        .images
        .as_memory()
        .unwrap()
        .iter()
        .map(|&p| (f32::from(p) / 255.0 - 0.5) / 0.125)
        .collect();
    let xs = Tensor::from_vec(pixels, (n, c, h, w), &Device::Cpu).expect("x");
    let values = |y: Tensor| -> Vec<f32> { y.flatten_all().and_then(|t| t.to_vec1()).expect("y") };
    let float = values(m.forward(&xs, Mode::Eval).expect("float"));
    let int8 = values(slim_quant::runtime::forward(&q, &xs).expect("int8"));
    max_rel(&int8, &float)
}

#[test]
fn exporters_spellings_import_as_named_ops_and_match_onnx_runtime() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(py)
        .arg(workspace().join("slim-onnx/tests/ort/spellings.py"))
        .arg(dir.path())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "spellings.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases = std::fs::read_to_string(dir.path().join("cases.txt")).expect("cases");
    let mut rows = Vec::new();
    for case in cases.lines().filter(|l| !l.is_empty()) {
        let d = dir.path().join(case);
        let m = import_file(d.join("model.onnx"), &ImportOptions::default())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let kinds: Vec<&str> = m.graph.nodes().iter().map(|n| n.op.kind()).collect();
        let (want, gone) = expected(case);
        for k in want {
            assert!(kinds.contains(k), "{case}: no {k} in {kinds:?}");
        }
        for k in gone {
            assert!(!kinds.contains(k), "{case}: {k} left in {kinds:?}");
        }
        let dims: Vec<usize> = std::fs::read_to_string(d.join("input.txt"))
            .expect("input.txt")
            .split_whitespace()
            .map(|v| v.parse().expect("dim"))
            .collect();
        let x = Tensor::from_vec(read_f32(&d.join("input.bin")), dims, &Device::Cpu).expect("x");
        let ys = m
            .forward_with(
                std::slice::from_ref(&x),
                Mode::Eval,
                ForwardOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{case}: forward: {e}"))
            .outputs;
        let listed = std::fs::read_to_string(d.join("outputs.txt")).expect("outputs");
        assert_eq!(ys.len(), listed.lines().count(), "{case}: outputs");
        let mut worst = 0f32;
        for (k, y) in ys.iter().enumerate() {
            let got: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("y");
            let err = max_rel(&got, &read_f32(&d.join(format!("output_{k}.bin"))));
            assert!(err <= 1e-5, "{case}: output {k} differs by {err:e}");
            worst = worst.max(err);
        }
        // Slim's own export of the imported model runs in ONNX Runtime too (at the default
        // opset, or the file's own where that is newer: antialiased resizing needs 18).
        let opset = m
            .provenance
            .get("onnx.opset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(17)
            .max(17);
        let opts = ExportOptions {
            opset,
            ..Default::default()
        };
        let bytes = export(&m, &opts).expect("export");
        let mut round = 0f32;
        for (k, y) in ys.iter().enumerate() {
            let again = ort_output(py, &bytes, &x, k);
            let ours: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("y");
            let err = max_rel(&again, &ours);
            assert!(
                err <= 1e-5,
                "{case}: output {k} of the re-export differs by {err:e}"
            );
            round = round.max(err);
        }
        // Quantized, the int8 runtime runs it, close to float.
        let int8 = int8_error(&m, &x);
        assert!(int8 <= 0.1, "{case}: int8 differs by {int8}");
        rows.push(format!(
            "| {case} | {} | {worst:.1e} | {round:.1e} | {int8:.3} |",
            kinds[1..].join(" ")
        ));
    }
    eprintln!(
        "| spelling | imported as | against ONNX Runtime | re-exported | int8 against float |"
    );
    eprintln!("|---|---|---:|---:|---:|");
    for r in rows {
        eprintln!("{r}");
    }
}

/// A value computed from the batch size (unknown at import) may only be a Reshape's batch
/// entry: arithmetic with it is refused rather than computed with a batch of one; Shape's
/// `start` and `end` (opset 15) select the dimensions they name.
#[test]
fn batch_size_values_are_refused_and_shape_ranges_honoured() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let script = r#"
import sys, onnx
from onnx import helper as h, TensorProto as T
def save(name, nodes, inits=()):
    g = h.make_graph(nodes, name, [h.make_tensor_value_info("x", T.FLOAT, [2, 2, 3])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], list(inits))
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 15)]), sys.argv[1] + f"/{name}.onnx")
zero = h.make_tensor("zero", T.INT64, [1], [0])
save("batch_div", [h.make_node("Shape", ["x"], ["s"]),
                   h.make_node("Gather", ["s", "zero"], ["b"], axis=0),
                   h.make_node("Cast", ["b"], ["bf"], to=T.FLOAT),
                   h.make_node("Div", ["x", "bf"], ["y"])], [zero])
save("shape_range", [h.make_node("Shape", ["x"], ["s"], start=2, end=3),
                     h.make_node("Cast", ["s"], ["sf"], to=T.FLOAT),
                     h.make_node("Div", ["x", "sf"], ["y"])])
minus = h.make_tensor("minus", T.INT64, [1], [-1])
first = h.make_tensor("first", T.INT64, [], [0])
save("batch_reshape", [h.make_node("Shape", ["x"], ["s"]),
                       h.make_node("Gather", ["s", "first"], ["b"], axis=0),
                       h.make_node("Unsqueeze", ["b", "zero"], ["bu"]),
                       h.make_node("Concat", ["bu", "minus"], ["shape"], axis=0),
                       h.make_node("Reshape", ["x", "shape"], ["y"])], [zero, minus, first])
"#;
    let out = Command::new(py)
        .args(["-c", script])
        .arg(dir.path())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let load = |name: &str| {
        import_file(
            dir.path().join(format!("{name}.onnx")),
            &ImportOptions::default(),
        )
    };
    let e = load("batch_div").expect_err("batch arithmetic").to_string();
    assert!(e.contains("batch size"), "{e}");
    // x / 3 (the size of the last axis), not x / [1, 2, 3].
    let m = load("shape_range").expect("shape range");
    let x = Tensor::ones((2, 2, 3), candle_core::DType::F32, &Device::Cpu).expect("x");
    let y: Vec<f32> = m
        .forward(&x, Mode::Eval)
        .and_then(|y| Ok(y.flatten_all()?.to_vec1()?))
        .expect("y");
    assert!(y.iter().all(|&v| (v - 1.0 / 3.0).abs() < 1e-6), "{y:?}");
    // The exporters' flatten through the batch size imports.
    let m = load("batch_reshape").expect("batch reshape");
    assert_eq!(m.graph.node(m.graph.outputs()[0]).shape, [6]);
}
