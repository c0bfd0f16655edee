//! End-to-end tests of `slim import` and `slim export`, and of ONNX files given to the other
//! commands: the ONNX model zoo's MNIST network imported with its raw-pixel preprocessing,
//! evaluated on the bundled digits, pruned straight from its .onnx file, quantized and
//! exported again.

use std::path::{Path, PathBuf};
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

fn zoo_onnx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../slim-onnx/tests/fixtures/mnist-conv/model.onnx")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn import_eval_prune_quantize_export() {
    let dir = tempfile::tempdir().expect("tmp");
    let onnx = zoo_onnx();
    let model = dir.path().join("mnist.safetensors");
    let r = ok(&slim(&[
        "import",
        s(&onnx),
        "--out",
        s(&model),
        "--preprocess",
        "raw",
        "--json",
    ]));
    assert_eq!(r["input"], serde_json::json!([1, 28, 28]));
    assert_eq!(
        r["preprocess"]["std"][0]
            .as_f64()
            .map(|v| (v * 255.0).round()),
        Some(1.0)
    );

    // The imported model on the bundled digits, fed raw pixels as it expects.
    let e = ok(&slim(&["eval", s(&model), "--json"]));
    let top1 = e["top1"].as_f64().expect("top1");
    assert!(top1 > 0.98, "imported model top-1 {top1}");
    // `slim info` and `slim prune` take the .onnx file directly.
    let info = ok(&slim(&["info", s(&onnx), "--json"]));
    // Two 5x5 convolutions (8 and 16 filters) and a 256x10 layer: 786,560 multiply-adds.
    assert_eq!(info["macs"], 786_560, "{info}");
    let pruned = dir.path().join("pruned.safetensors");
    let p = ok(&slim(&[
        "prune",
        s(&model),
        "--flops-reduction",
        "0.3",
        "--out",
        s(&pruned),
        "--json",
        "-q",
    ]));
    assert!(p.is_object());

    // Quantize (PTQ) and export both as ONNX: the int8 one in QDQ form, smaller.
    let q = dir.path().join("q.safetensors");
    ok(&slim(&[
        "quant",
        "ptq",
        s(&pruned),
        "--out",
        s(&q),
        "--json",
        "-q",
    ]));
    let (fo, qo) = (dir.path().join("pruned.onnx"), dir.path().join("q.onnx"));
    let f = ok(&slim(&["export", s(&pruned), "--out", s(&fo), "--json"]));
    let i = ok(&slim(&["export", s(&q), "--out", s(&qo), "--json"]));
    assert_eq!(f["form"], "f32");
    assert_eq!(i["form"], "int8 QDQ");
    assert!(i["bytes"].as_u64() < f["bytes"].as_u64(), "{i} {f}");
    // The exported pruned model evaluates like the pruned file: its preprocessing travels in
    // the ONNX metadata.
    let a = ok(&slim(&["eval", s(&pruned), "--json"]));
    let b = ok(&slim(&["eval", s(&fo), "--json"]));
    assert_eq!(a["top1"], b["top1"]);
}

#[test]
fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\x08\x07\x12garbage").expect("write");
    let out = dir.path().join("m.safetensors");
    fails(&slim(&["import", s(&junk), "--out", s(&out)]), "junk.onnx");
    assert!(!out.exists(), "nothing written");
    let onnx = zoo_onnx();
    fails(
        &slim(&[
            "import",
            s(&onnx),
            "--out",
            s(&out),
            "--preprocess",
            "0.5/-1",
        ]),
        "--preprocess",
    );
    fails(
        &slim(&[
            "import",
            s(&onnx),
            "--out",
            s(&out),
            "--input-shape",
            "3x28",
        ]),
        "--input-shape",
    );
    fails(
        &slim(&[
            "import",
            s(&onnx),
            "--out",
            s(&out),
            "--input-shape",
            "3x28x28",
        ]),
        "does not match",
    );
    fails(&slim(&["eval", s(&junk)]), "not an ONNX model");
    let m = dir.path().join("lenet.safetensors");
    ok(&slim(&["import", s(&onnx), "--out", s(&m), "--json"]));
    fails(
        &slim(&[
            "export",
            s(&m),
            "--out",
            s(&dir.path().join("x.onnx")),
            "--opset",
            "9",
        ]),
        "opset 9",
    );
    fails(
        &slim(&["export", s(&m), "--out", "/no/such/dir/x.onnx"]),
        "does not exist",
    );
}

#[test]
fn resize_feeds_a_32x32_model_the_28x28_digits() {
    use slim_core::zoo::{build, ZooConfig};
    let dir = tempfile::tempdir().expect("tmp");
    let g = build("lenet", &ZooConfig::new([1, 32, 32])).expect("zoo");
    let m = slim_core::Model::init(g, 1, &candle_core::Device::Cpu).expect("init");
    let onnx = dir.path().join("lenet32.onnx");
    slim_onnx::export_file(&m, &onnx, &Default::default()).expect("export");
    let (plain, resized) = (
        dir.path().join("plain.safetensors"),
        dir.path().join("resized.safetensors"),
    );
    ok(&slim(&["import", s(&onnx), "--out", s(&plain), "--json"]));
    let r = ok(&slim(&[
        "import",
        s(&onnx),
        "--out",
        s(&resized),
        "--resize",
        "--json",
    ]));
    assert_eq!(r["resize"], true);
    let e = ok(&slim(&["eval", s(&resized), "--json"]));
    assert_eq!(e["samples"], 1996);
    let out = slim(&["eval", s(&plain)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("28") && err.contains("32"), "{err}");
}

/// A graph of one sample (a [3, 2] table: each column's softmax down its rows, after the
/// row mean is taken away): refused as a batch without `--single-sample`, naming the flag;
/// with it, imported, and `slim run` gives each sample of a batch the graph's result on it
/// alone (a hand computation).
#[test]
fn single_sample_graph_imports_and_runs_per_sample() {
    use prost::Message;
    use slim_onnx::proto::{
        AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
    };
    let value = |name: &str| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: [3, 2]
                        .map(|d| Dimension {
                            dim_value: Some(d),
                            dim_param: None,
                        })
                        .to_vec(),
                }),
            }),
        }),
        ..Default::default()
    };
    let int = |name: &str, v: i64| AttributeProto {
        name: name.into(),
        r#type: 2,
        i: v,
        ..Default::default()
    };
    let axes = AttributeProto {
        name: "axes".into(),
        r#type: 7,
        ints: vec![1],
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], out: &str, attribute: Vec<AttributeProto>| NodeProto {
        name: out.into(),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute,
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(GraphProto {
            name: "table".into(),
            node: vec![
                node("ReduceMean", &["x"], "mean", vec![axes, int("keepdims", 1)]),
                node("Sub", &["x", "mean"], "c", vec![]),
                node("Softmax", &["c"], "y", vec![int("axis", 0)]),
            ],
            input: vec![value("x")],
            output: vec![value("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("tmp");
    let onnx = dir.path().join("table.onnx");
    std::fs::write(&onnx, model.encode_to_vec()).expect("write");
    let out = dir.path().join("table.safetensors");
    fails(
        &slim(&["import", s(&onnx), "--out", s(&out)]),
        "--single-sample",
    );
    assert!(!out.exists(), "nothing written on refusal");
    ok(&slim(&[
        "import",
        s(&onnx),
        "--out",
        s(&out),
        "--single-sample",
        "--json",
    ]));
    let xs: Vec<f32> = (0..12).map(|i| ((i * 5 % 7) as f32 - 3.0) / 2.0).collect();
    let input = dir.path().join("x.npy");
    std::fs::write(&input, slim_core::npy::to_bytes(&[2, 3, 2], &xs)).expect("npy");
    let ran = dir.path().join("ran");
    ok(&slim(&[
        "run",
        s(&out),
        "--input",
        s(&input),
        "--out",
        s(&ran),
        "--json",
    ]));
    let y = slim_core::npy::read(&ran.join("y.npy")).expect("y.npy");
    assert_eq!(y.shape, [2, 3, 2]);
    for (sample, x) in xs.chunks(6).enumerate() {
        // Rows r, columns c: x[r * 2 + c].
        let mut want = [0f32; 6];
        for r in 0..3 {
            let mean = (x[r * 2] + x[r * 2 + 1]) / 2.0;
            want[r * 2] = x[r * 2] - mean;
            want[r * 2 + 1] = x[r * 2 + 1] - mean;
        }
        for c in 0..2 {
            let total: f32 = (0..3).map(|r| want[r * 2 + c].exp()).sum();
            for r in 0..3 {
                want[r * 2 + c] = want[r * 2 + c].exp() / total;
            }
        }
        for (k, w) in want.iter().enumerate() {
            let got = y.data[sample * 6 + k];
            assert!(
                (got - w).abs() < 1e-5,
                "sample {sample}, value {k}: {got} vs {w}"
            );
        }
    }
}
