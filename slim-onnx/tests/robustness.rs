//! The importer on damaged models: thousands of seeded mutations of the fixtures (bytes
//! flipped and cut, and structural edits: attributes, dimensions, inputs, op types, tensor
//! contents) must each give a model or an error, never a panic.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use prost::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};
use slim_onnx::proto::ModelProto;
use slim_onnx::{import, ImportOptions, SUPPORTED_OPS};

use common::fixture;

fn fixtures() -> Vec<Vec<u8>> {
    ["mnist-conv/model.onnx", "exporter-style/model.onnx"]
        .iter()
        .map(|p| std::fs::read(fixture(p)).expect("fixture"))
        .collect()
}

fn no_panic(bytes: &[u8], what: &str) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| {
        import(bytes, &ImportOptions::default())
    }));
    match r {
        Ok(Ok(m)) => {
            // An imported model also runs (or says why not).
            let x = candle_core::Tensor::zeros(
                [vec![1], m.input_shape()].concat(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            );
            if let Ok(x) = x {
                let _ = m.forward(&x, slim_core::Mode::Eval);
            }
            true
        }
        Ok(Err(e)) => {
            assert!(!e.to_string().is_empty(), "{what}: empty error");
            false
        }
        Err(_) => panic!("import panicked on {what}"),
    }
}

#[test]
fn byte_damage_never_panics() {
    let mut rng = StdRng::seed_from_u64(1);
    for base in fixtures() {
        for i in 0..400 {
            let mut b = base.clone();
            match i % 3 {
                0 => b.truncate(rng.random_range(0..b.len())),
                1 => {
                    for _ in 0..rng.random_range(1..8) {
                        let j = rng.random_range(0..b.len());
                        b[j] = rng.random();
                    }
                }
                _ => {
                    let (j, k) = (rng.random_range(0..b.len()), rng.random_range(0..b.len()));
                    let chunk = b[j.min(k)..j.max(k)].to_vec();
                    let at = rng.random_range(0..b.len());
                    b.splice(at..at, chunk);
                }
            }
            no_panic(&b, &format!("byte mutation {i}"));
        }
    }
}

#[test]
fn structural_damage_never_panics() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut imported = 0;
    for base in fixtures() {
        let model = ModelProto::decode(base.as_slice()).expect("decode");
        for i in 0..1500 {
            let mut m = model.clone();
            for _ in 0..rng.random_range(1..4) {
                let g = m.graph.as_mut().expect("graph");
                let n = g.node.len();
                match rng.random_range(0..9) {
                    0 if n > 0 => {
                        // An attribute's integers or float changed.
                        let node = &mut g.node[rng.random_range(0..n)];
                        if let Some(a) = node.attribute.first_mut() {
                            let v = [-3i64, -1, 0, 1, 2, 3, 7, 1 << 40][rng.random_range(0..8)];
                            a.i = v;
                            a.f = v as f32;
                            for x in a.ints.iter_mut() {
                                *x = v;
                            }
                            if rng.random() {
                                a.ints.pop();
                            }
                        }
                    }
                    1 if !g.initializer.is_empty() => {
                        // A tensor's dimensions changed (its data no longer fits them).
                        let j = rng.random_range(0..g.initializer.len());
                        let t = &mut g.initializer[j];
                        match rng.random_range(0..3) {
                            0 => t.dims.clear(),
                            1 => t.dims.push(rng.random_range(-2..4)),
                            _ => {
                                if let Some(d) = t.dims.first_mut() {
                                    *d = rng.random_range(-1..40);
                                }
                            }
                        }
                    }
                    2 if !g.initializer.is_empty() => {
                        // A tensor emptied, or given another element type.
                        let j = rng.random_range(0..g.initializer.len());
                        let t = &mut g.initializer[j];
                        if rng.random() {
                            t.raw_data.clear();
                            t.float_data.clear();
                            t.int64_data.clear();
                        } else {
                            t.data_type = rng.random_range(0..17);
                        }
                    }
                    3 if n > 0 => {
                        // An input dropped, or pointed elsewhere.
                        let node = &mut g.node[rng.random_range(0..n)];
                        if !node.input.is_empty() {
                            let j = rng.random_range(0..node.input.len());
                            if rng.random() {
                                node.input.remove(j);
                            } else {
                                node.input[j] = ["", "nothing", "Input3", "input"]
                                    [rng.random_range(0..4)]
                                .into();
                            }
                        }
                    }
                    4 if n > 0 => {
                        // Another supported op in its place.
                        let node = &mut g.node[rng.random_range(0..n)];
                        node.op_type =
                            SUPPORTED_OPS[rng.random_range(0..SUPPORTED_OPS.len())].into();
                    }
                    5 if n > 1 => {
                        // Nodes out of order.
                        let (a, b) = (rng.random_range(0..n), rng.random_range(0..n));
                        g.node.swap(a, b);
                    }
                    6 => {
                        // The input's declared shape changed.
                        if let Some(d) = g
                            .input
                            .first_mut()
                            .and_then(|i| i.r#type.as_mut())
                            .and_then(|t| t.tensor_type.as_mut())
                            .and_then(|t| t.shape.as_mut())
                        {
                            let j = rng.random_range(0..d.dim.len().max(1));
                            if let Some(x) = d.dim.get_mut(j) {
                                x.dim_value = Some(rng.random_range(-1..64));
                            }
                        }
                    }
                    7 => {
                        g.output.clear();
                    }
                    _ => {
                        let v = rng.random_range(0..25);
                        m.opset_import.iter_mut().for_each(|o| o.version = v);
                    }
                }
            }
            if no_panic(&m.encode_to_vec(), &format!("structural mutation {i}")) {
                imported += 1;
            }
        }
    }
    // Some mutations leave a valid model (a changed opset, a harmless attribute).
    assert!(imported > 0);
}

/// A few hundred bytes that ask ConstantOfShape for a huge tensor are refused before the
/// values are made: beyond the import's budget (`max_generated`), or beyond Slim's limit on
/// one tensor.
#[test]
fn small_files_cannot_generate_huge_constants() {
    use slim_onnx::proto::{
        data_type, Dimension, GraphProto, NodeProto, OperatorSetIdProto, TensorProto,
        TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
    };
    let info = |name: &str| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: [1, 4]
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: Some(d),
                            dim_param: None,
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    };
    let model = |side: i64| {
        ModelProto {
            ir_version: 7,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                node: vec![
                    NodeProto {
                        input: vec!["shape".into()],
                        output: vec!["w".into()],
                        op_type: "ConstantOfShape".into(),
                        ..Default::default()
                    },
                    NodeProto {
                        input: vec!["x".into(), "w".into()],
                        output: vec!["y".into()],
                        op_type: "Add".into(),
                        ..Default::default()
                    },
                ],
                initializer: vec![TensorProto {
                    name: "shape".into(),
                    dims: vec![2],
                    data_type: data_type::INT64,
                    int64_data: vec![side, side],
                    ..Default::default()
                }],
                input: vec![info("x")],
                output: vec![info("y")],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let small = ImportOptions {
        max_generated: Some(1 << 20),
        ..Default::default()
    };
    let bytes = model(1 << 13);
    assert!(bytes.len() < 300, "{} bytes", bytes.len());
    let e = import(&bytes, &small)
        .expect_err("over the budget")
        .to_string();
    assert!(
        e.contains("ConstantOfShape") && e.contains("may still generate"),
        "{e}"
    );
    let e = import(&model(1 << 15), &ImportOptions::default())
        .expect_err("over the limit")
        .to_string();
    assert!(e.contains("beyond Slim's limits"), "{e}");
}
