//! Slim to ONNX: writes a model as an ONNX file.
//!
//! Every Slim node becomes one ONNX node (or a short fixed sequence) whose output value has
//! the node's name, and every parameter an initializer of the same name, so an exported model
//! reads like the Slim one and imports back to the same graph. Values keep Slim's shapes with
//! the batch axis in front (`GlobalAvgPool` is `GlobalAveragePool` then `Flatten`).
//!
//! An int8 model is written in QDQ form, laid out as runtimes fuse it ([`qdq`]): each
//! quantized weight is an int8 initializer (`<name>_quantized`) with its scales (per output
//! channel when it has several) and a `DequantizeLinear` giving the float weight, its bias an
//! int32 one; each `FakeQuant` node is a `QuantizeLinear`/`DequantizeLinear` pair, moved up to
//! the output of the layer before it. ONNX Runtime, TensorRT and OpenVINO recognise the
//! pattern and run the layers in integers.

mod qdq;

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use slim_core::graph::{
    CoordMode, Float8, NearestRounding, Node, Op, PadMode, ReduceKind, ResizeMode, UnaryKind,
};
use slim_core::Model;

use crate::proto::{
    attribute_type, data_type, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TensorTypeProto,
    TypeProto, ValueInfoProto,
};
use crate::{OnnxError, Result};
pub use qdq::{ActivationType, QParams};

/// Options of an export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The ONNX opset (17 by default; 12 to 21 are written). Per-channel weight scales in QDQ
    /// form need 13 or newer; before 14, HardSwish is written as `x * HardSigmoid(x)`.
    pub opset: i64,
    /// The integer type of an int8 model's activations (`u8` by default).
    pub activations: ActivationType,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: 17,
            activations: ActivationType::default(),
        }
    }
}

/// Writes a model as an ONNX file (atomically: a failure leaves no file); gives the notes of
/// [`export_with_notes`].
pub fn export_file(
    model: &Model,
    path: impl AsRef<Path>,
    opts: &ExportOptions,
) -> Result<Vec<String>> {
    let (bytes, notes) = export_with_notes(model, opts)?;
    slim_core::io::write_atomic(path.as_ref(), &bytes)?;
    Ok(notes)
}

/// A model's ONNX bytes.
pub fn export(model: &Model, opts: &ExportOptions) -> Result<Vec<u8>> {
    export_with_notes(model, opts).map(|(bytes, _)| bytes)
}

/// A model's ONNX bytes, and a note for each part of an int8 model that deployed runtimes
/// will run in float (a quantized layer with no quantizer after its output).
pub fn export_with_notes(model: &Model, opts: &ExportOptions) -> Result<(Vec<u8>, Vec<String>)> {
    if !(12..=21).contains(&opts.opset) {
        return Err(OnnxError::Model(format!(
            "opset {} is not supported for export (12 to 21)",
            opts.opset
        )));
    }
    let plan = qdq::plan(model, opts.activations)?;
    let notes = plan
        .float_outputs
        .iter()
        .map(|l| {
            format!(
                "`{l}` runs in float where deployed: no quantizer follows its output \
                 (quantize the model again to calibrate one)"
            )
        })
        .collect();
    let mut w = Writer {
        opset: opts.opset,
        graph: GraphProto::default(),
        model,
        plan,
        alias: HashMap::new(),
    };
    w.graph.name = model
        .provenance
        .get("zoo")
        .cloned()
        .unwrap_or_else(|| "slim".to_string());
    for (id, node) in model.graph.nodes().iter().enumerate() {
        w.node(id, node)?;
    }
    for o in model.graph.outputs() {
        let n = model.graph.node(o);
        w.graph.output.push(value_info(&n.name, &n.shape));
    }
    let mut metadata: Vec<StringStringEntryProto> = model
        .provenance
        .iter()
        .map(|(k, v)| StringStringEntryProto {
            key: format!("slim.{k}"),
            value: v.clone(),
        })
        .collect();
    metadata.sort_by(|a, b| a.key.cmp(&b.key));
    let proto = ModelProto {
        ir_version: if opts.opset >= 21 { 10 } else { 7 },
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opts.opset,
        }],
        producer_name: "slim".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(w.graph),
        metadata_props: metadata,
        ..Default::default()
    };
    Ok((proto.encode_to_vec(), notes))
}

struct Writer<'a> {
    opset: i64,
    graph: GraphProto,
    model: &'a Model,
    plan: qdq::Plan,
    /// The value that stands for a node written as its input.
    alias: HashMap<String, String>,
}

fn value_info(name: &str, shape: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension {
        dim_value: None,
        dim_param: Some("batch".into()),
    }];
    dim.extend(shape.iter().map(|&d| Dimension {
        dim_value: Some(d as i64),
        dim_param: None,
    }));
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        doc_string: String::new(),
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i: v,
        ..Default::default()
    }
}
fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::STRING,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}
fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f: v,
        ..Default::default()
    }
}

/// What the export of one node works with.
struct Emit<'a> {
    id: usize,
    node: &'a Node,
    /// Its inputs' ONNX names.
    x: Vec<&'a str>,
    /// The name its value is written under.
    out: &'a str,
    /// Whether its layer computes in integers.
    integer: bool,
}

impl Emit<'_> {
    fn unsupported(&self, why: &str) -> Result<bool> {
        Err(OnnxError::Model(format!(
            "node `{}` ({}): {why}",
            self.node.name,
            self.node.op.kind()
        )))
    }
}

/// Sizes as ONNX's int64 values.
fn i64s(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&d| d as i64).collect()
}

fn f32_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: i64s(dims),
        data_type: data_type::FLOAT,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn i8_tensor(name: &str, dims: &[usize], values: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: i64s(dims),
        data_type: data_type::INT8,
        raw_data: values.iter().map(|&v| v as u8).collect(),
        ..Default::default()
    }
}

fn q_tensor(name: &str, q: &QParams) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![],
        data_type: if q.unsigned {
            data_type::UINT8
        } else {
            data_type::INT8
        },
        raw_data: vec![q.zero as u8],
        ..Default::default()
    }
}

fn i32_tensor(name: &str, values: &[i32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: data_type::INT32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn i64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![values.len() as i64],
        data_type: data_type::INT64,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

impl Writer<'_> {
    fn op(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<AttributeProto>,
    ) {
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: name.to_string(),
            op_type: op_type.to_string(),
            attribute,
            ..Default::default()
        });
    }

    /// Adds a parameter as an initializer (in QDQ form when it is held as int8) and returns
    /// the name of the float value that carries it.
    fn param(&mut self, node: &Node, role: &str) -> Result<String> {
        let name = node.param_name(role);
        let t = self.model.params.tensor(&name)?;
        let dims = t.dims().to_vec();
        if let Some(q) = self.model.int8.get(&name) {
            let qname = format!("{name}_quantized");
            let sname = format!("{name}_scale");
            let zname = format!("{name}_zero_point");
            self.graph
                .initializer
                .push(i8_tensor(&qname, &dims, &q.values));
            let mut attrs = Vec::new();
            if q.scales.len() > 1 {
                if self.opset < 13 {
                    return Err(OnnxError::Model(format!(
                        "`{name}` has per-channel scales, which need opset 13 or newer"
                    )));
                }
                self.graph
                    .initializer
                    .push(f32_tensor(&sname, &[q.scales.len()], &q.scales));
                self.graph.initializer.push(i8_tensor(
                    &zname,
                    &[q.scales.len()],
                    &vec![0; q.scales.len()],
                ));
                attrs.push(int("axis", 0));
            } else {
                self.graph
                    .initializer
                    .push(f32_tensor(&sname, &[], &q.scales));
                self.graph.initializer.push(i8_tensor(&zname, &[], &[0]));
            }
            self.op(
                "DequantizeLinear",
                &format!("{name}_dequantize"),
                &[&qname, &sname, &zname],
                &name,
                attrs,
            );
        } else {
            let values = t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(slim_core::CoreError::from)?;
            self.graph
                .initializer
                .push(f32_tensor(&name, &dims, &values));
        }
        Ok(name)
    }

    /// The bias of an integer layer: int32 on the scales `input scale × weight scale` (per
    /// output channel), read back by a `DequantizeLinear`.
    fn int32_bias(&mut self, node: &Node) -> Result<String> {
        let input = &self.plan.params[&node.inputs[0]];
        let name = node.param_name("bias");
        let wq = &self.model.int8[&node.param_name("weight")];
        let bias = self
            .model
            .params
            .tensor(&name)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(slim_core::CoreError::from)?;
        let per = bias.len() / wq.scales.len().max(1);
        let scales: Vec<f32> = (0..bias.len())
            .map(|o| input.scale * wq.scales[o / per.max(1)])
            .collect();
        let values: Vec<i32> = bias
            .iter()
            .zip(&scales)
            .map(|(b, s)| (b / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
            .collect();
        let (qname, sname) = (format!("{name}_quantized"), format!("{name}_scale"));
        self.graph.initializer.push(i32_tensor(&qname, &values));
        self.graph
            .initializer
            .push(f32_tensor(&sname, &[scales.len()], &scales));
        self.op(
            "DequantizeLinear",
            &format!("{name}_dequantize"),
            &[&qname, &sname],
            &name,
            vec![int("axis", 0)],
        );
        Ok(name)
    }

    /// A layer's inputs: `x`, its weight, and its bias when it has one (int32 for an integer
    /// layer).
    fn layer_inputs(
        &mut self,
        node: &Node,
        x: &str,
        bias: bool,
        integer: bool,
    ) -> Result<Vec<String>> {
        let mut inputs = vec![x.to_string(), self.param(node, "weight")?];
        if bias && integer {
            inputs.push(self.int32_bias(node)?);
        } else if bias {
            inputs.push(self.param(node, "bias")?);
        }
        Ok(inputs)
    }

    /// `QuantizeLinear` then `DequantizeLinear` of value `x` with `q`, the result named `out`.
    fn quant_pair(&mut self, x: &str, q: &QParams, out: &str) {
        let (s, z, q8) = (
            format!("{out}_scale"),
            format!("{out}_zero_point"),
            format!("{out}_quantized"),
        );
        self.graph.initializer.push(f32_tensor(&s, &[], &[q.scale]));
        self.graph.initializer.push(q_tensor(&z, q));
        self.op("QuantizeLinear", &q8, &[x, &s, &z], &q8, vec![]);
        self.op("DequantizeLinear", out, &[&q8, &s, &z], out, vec![]);
    }

    /// A per-channel parameter as an initializer that broadcasts over the node's output:
    /// `[C, 1, 1]` for feature maps, `[C]` for vectors.
    fn per_channel(&mut self, node: &Node, role: &str) -> Result<String> {
        let name = node.param_name(role);
        let values = self
            .model
            .params
            .tensor(&name)?
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(slim_core::CoreError::from)?;
        let mut dims = vec![1; node.shape.len()];
        dims[0] = values.len();
        self.graph
            .initializer
            .push(f32_tensor(&name, &dims, &values));
        Ok(name)
    }

    fn node(&mut self, id: usize, node: &Node) -> Result<()> {
        let g = &self.model.graph;
        let ins: Vec<String> = node
            .inputs
            .iter()
            .map(|&i| {
                let i = self.plan.source(i, id);
                let name = &g.node(i).name;
                self.alias.get(name).unwrap_or(name).clone()
            })
            .collect();
        if self.plan.passed.contains(&id) {
            // Already done by the quantizer before it: the node stands for its input.
            if g.outputs().contains(&id) {
                self.op("Identity", &node.name, &[&ins[0]], &node.name, vec![]);
            } else {
                self.alias.insert(node.name.clone(), ins[0].clone());
            }
            return Ok(());
        }
        let requant = self.plan.requant.get(&id).copied();
        let integer = self.plan.integer.contains(&id);
        let x: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
        // A node quantized right after computes into a value of its own first.
        let float_out = format!("{}_float", node.name);
        let out = if requant.is_some() {
            float_out.as_str()
        } else {
            node.name.as_str()
        };
        let e = Emit {
            id,
            node,
            x,
            out,
            integer,
        };
        let handled = self.layer_node(&e)?
            || self.other_layer_node(&e)?
            || self.activation_node(&e)?
            || self.gelu_softmax_node(&e)?
            || self.arithmetic_node(&e)?
            || self.shape_node(&e)?
            || self.spatial_node(&e)?
            || self.resize_node(&e)?;
        if !handled {
            e.unsupported("it has no ONNX form")?;
        }
        if let Some(q) = requant {
            self.quant_pair(out, &q, &node.name);
        }
        Ok(())
    }

    /// The input, and layers with weights: convolutions, linear and dense layers, batch norms, per-channel affines. `Ok(false)` when the op is not of them.
    fn layer_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let integer = e.integer;
        let x = e.x.clone();
        let unsupported = |why: &str| e.unsupported(why);
        match &node.op {
            Op::Input { shape } => {
                if shape.len() != 3 && shape.len() != 1 {
                    return unsupported("inputs are [C, H, W] or [F]");
                }
                self.graph.input.push(value_info(out, shape));
            }
            Op::Conv2d(c) => {
                let inputs = self.layer_inputs(node, x[0], c.bias, integer)?;
                let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
                let (p, s, d) = (c.padding as i64, c.stride as i64, c.dilation as i64);
                self.op(
                    "Conv",
                    out,
                    &inputs,
                    out,
                    vec![
                        ints("kernel_shape", &[c.kernel[0] as i64, c.kernel[1] as i64]),
                        ints("strides", &[s, s]),
                        ints("pads", &[p, p, p, p]),
                        ints("dilations", &[d, d]),
                        int("group", c.groups as i64),
                    ],
                );
            }
            Op::Linear(l) => {
                let inputs = self.layer_inputs(node, x[0], l.bias, integer)?;
                let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
                self.op("Gemm", out, &inputs, out, vec![int("transB", 1)]);
            }
            Op::BatchNorm2d(b) => {
                let p: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
                    .iter()
                    .map(|r| self.param(node, r))
                    .collect::<Result<_>>()?;
                let inputs = [x[0], &p[0], &p[1], &p[2], &p[3]];
                self.op(
                    "BatchNormalization",
                    out,
                    &inputs,
                    out,
                    vec![
                        float("epsilon", b.eps as f32),
                        float("momentum", (1.0 - b.momentum) as f32),
                    ],
                );
            }
            Op::ChannelAffine { .. } => {
                let (w, b) = (
                    self.per_channel(node, "weight")?,
                    self.per_channel(node, "bias")?,
                );
                let scaled = format!("{out}_scaled");
                self.op("Mul", &scaled, &[x[0], &w], &scaled, vec![]);
                self.op("Add", out, &[&scaled, &b], out, vec![]);
            }
            Op::Dense(l) => {
                // x · Wᵀ + b as MatMul by the transposed weight, then Add.
                let w = self.model.params.tensor(&node.param_name("weight"))?;
                let wt = w
                    .t()
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(slim_core::CoreError::from)?;
                let wname = format!("{out}_weight_t");
                self.graph.initializer.push(f32_tensor(
                    &wname,
                    &[l.in_features, l.out_features],
                    &wt,
                ));
                if l.bias {
                    let b = self.param(node, "bias")?;
                    let product = format!("{out}_product");
                    self.op("MatMul", &product, &[x[0], &wname], &product, vec![]);
                    self.op("Add", out, &[&product, &b], out, vec![]);
                } else {
                    self.op("MatMul", out, &[x[0], &wname], out, vec![]);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Activations and other one-input functions. `Ok(false)` when the op is not of them.
    fn activation_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let x = e.x.clone();
        match &node.op {
            Op::Relu => self.op("Relu", out, &x, out, vec![]),
            Op::Relu6 => {
                let (lo, hi) = (format!("{out}_min"), format!("{out}_max"));
                self.graph.initializer.push(f32_tensor(&lo, &[], &[0.0]));
                self.graph.initializer.push(f32_tensor(&hi, &[], &[6.0]));
                self.op("Clip", out, &[x[0], &lo, &hi], out, vec![]);
            }
            Op::HardSwish if self.opset >= 14 => self.op("HardSwish", out, &x, out, vec![]),
            Op::HardSwish => {
                let gate = format!("{out}_gate");
                self.op(
                    "HardSigmoid",
                    &gate,
                    &x,
                    &gate,
                    vec![float("alpha", 1.0 / 6.0), float("beta", 0.5)],
                );
                self.op("Mul", out, &[x[0], &gate], out, vec![]);
            }
            Op::HardSigmoid { alpha, beta } => self.op(
                "HardSigmoid",
                out,
                &x,
                out,
                vec![float("alpha", *alpha), float("beta", *beta)],
            ),
            Op::Sigmoid => self.op("Sigmoid", out, &x, out, vec![]),
            Op::Clip { min, max } => {
                let mut inputs = vec![x[0].to_string()];
                for (bound, v) in [("min", min), ("max", max)] {
                    match v {
                        Some(v) => {
                            let name = format!("{out}_{bound}");
                            self.graph.initializer.push(f32_tensor(&name, &[], &[*v]));
                            inputs.push(name);
                        }
                        None => inputs.push(String::new()),
                    }
                }
                while inputs.last().is_some_and(|i| i.is_empty()) {
                    inputs.pop();
                }
                let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
                self.op("Clip", out, &inputs, out, vec![]);
            }
            Op::LeakyRelu { alpha } => {
                self.op("LeakyRelu", out, &x, out, vec![float("alpha", *alpha)])
            }
            Op::PRelu { .. } => {
                let slope = self.per_channel(node, "weight")?;
                self.op("PRelu", out, &[x[0], &slope], out, vec![]);
            }
            Op::Tanh => self.op("Tanh", out, &x, out, vec![]),
            Op::Erf => self.op("Erf", out, &x, out, vec![]),
            Op::Silu => {
                let gate = format!("{out}_sigmoid");
                self.op("Sigmoid", &gate, &x, &gate, vec![]);
                self.op("Mul", out, &[x[0], &gate], out, vec![]);
            }
            Op::Sqrt => self.op("Sqrt", out, &x, out, vec![]),
            Op::Reciprocal => self.op("Reciprocal", out, &x, out, vec![]),
            Op::Unary(UnaryKind::Mish) if self.opset < 18 => {
                // x · tanh(softplus(x)), as exporters write it before opset 18.
                let (soft, tanh) = (format!("{out}_softplus"), format!("{out}_tanh"));
                self.op("Softplus", &soft, &x, &soft, vec![]);
                self.op("Tanh", &tanh, &[&soft], &tanh, vec![]);
                self.op("Mul", out, &[x[0], &tanh], out, vec![]);
            }
            Op::Unary(UnaryKind::Float8 { format, saturate }) => {
                self.float8(out, x[0], *format, *saturate)?
            }
            Op::Unary(kind) => {
                let attrs = match *kind {
                    UnaryKind::Elu { alpha } => vec![float("alpha", alpha)],
                    UnaryKind::Selu { alpha, gamma } => {
                        vec![float("alpha", alpha), float("gamma", gamma)]
                    }
                    _ => vec![],
                };
                self.op(kind.onnx(), out, &x, out, attrs);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Rounding to an 8-bit float: a Cast to it and back, which opset 19 has.
    fn float8(&mut self, out: &str, x: &str, format: Float8, saturate: bool) -> Result<()> {
        if self.opset < 19 {
            return Err(OnnxError::Model(format!(
                "`{out}` rounds to 8-bit floats, which ONNX has from opset 19 (export with \
                 opset 19 or newer)"
            )));
        }
        let narrow = format!("{out}_float8");
        let to = vec![
            int("to", i64::from(format.onnx_type())),
            int("saturate", i64::from(saturate)),
        ];
        self.op("Cast", &narrow, &[x], &narrow, to);
        self.op("Cast", out, &[&narrow], out, vec![int("to", 1)]);
        Ok(())
    }

    /// GELU (written out before opset 20) and softmaxes. `Ok(false)` when the op is not of them.
    fn gelu_softmax_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let x = e.x.clone();
        let unsupported = |why: &str| e.unsupported(why);
        match &node.op {
            Op::Gelu if self.opset >= 20 => self.op("Gelu", out, &x, out, vec![]),
            Op::Gelu => {
                // 0.5 * x * (1 + erf(x / √2)), as PyTorch writes it before opset 20.
                let names = ["scale", "scaled", "erf", "one", "plus", "half", "times"]
                    .map(|s| format!("{out}_{s}"));
                let [scale, scaled, erf, one, plus, half, times] = &names;
                self.graph.initializer.push(f32_tensor(
                    scale,
                    &[],
                    &[std::f32::consts::FRAC_1_SQRT_2],
                ));
                self.graph.initializer.push(f32_tensor(one, &[], &[1.0]));
                self.graph.initializer.push(f32_tensor(half, &[], &[0.5]));
                self.op("Mul", scaled, &[x[0], scale], scaled, vec![]);
                self.op("Erf", erf, &[scaled], erf, vec![]);
                self.op("Add", plus, &[erf, one], plus, vec![]);
                self.op("Mul", times, &[x[0], plus], times, vec![]);
                self.op("Mul", out, &[times, half], out, vec![]);
            }
            Op::GeluTanh if self.opset >= 20 => {
                self.op("Gelu", out, &x, out, vec![string("approximate", "tanh")])
            }
            Op::GeluTanh => {
                // 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³))), written out.
                let names = [
                    "cube", "three", "c", "cubed", "sum", "k", "inner", "tanh", "one", "plus",
                    "half", "times",
                ]
                .map(|s| format!("{out}_{s}"));
                let [cube, three, c, cubed, sum, k, inner, tanh, one, plus, half, times] = &names;
                for (name, v) in [
                    (three, 3.0),
                    (c, 0.044715),
                    (k, (2.0 / std::f32::consts::PI).sqrt()),
                    (one, 1.0),
                    (half, 0.5),
                ] {
                    self.graph.initializer.push(f32_tensor(name, &[], &[v]));
                }
                self.op("Pow", cube, &[x[0], three], cube, vec![]);
                self.op("Mul", cubed, &[cube, c], cubed, vec![]);
                self.op("Add", sum, &[x[0], cubed], sum, vec![]);
                self.op("Mul", inner, &[sum, k], inner, vec![]);
                self.op("Tanh", tanh, &[inner], tanh, vec![]);
                self.op("Add", plus, &[tanh, one], plus, vec![]);
                self.op("Mul", times, &[x[0], plus], times, vec![]);
                self.op("Mul", out, &[times, half], out, vec![]);
            }
            Op::SoftmaxAt { axis } => {
                if self.opset < 13 {
                    return unsupported("a softmax over one axis needs opset 13 or newer");
                }
                self.op("Softmax", out, &x, out, vec![int("axis", *axis as i64 + 1)]);
            }
            Op::Softmax => {
                if node.shape.len() > 1 && self.opset < 13 {
                    return unsupported(
                        "a softmax over the channels of a feature map needs opset 13 or newer",
                    );
                }
                self.op("Softmax", out, &x, out, vec![int("axis", 1)]);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Arithmetic, products, reductions and layer norms. `Ok(false)` when the op is not of them.
    fn arithmetic_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let x = e.x.clone();
        let unsupported = |why: &str| e.unsupported(why);
        let g = &self.model.graph;
        match &node.op {
            Op::Add if x.len() == 2 => self.op("Add", out, &x, out, vec![]),
            Op::Add => self.op("Sum", out, &x, out, vec![]),
            Op::Mul => {
                let (a, b) = (&g.node(node.inputs[0]).shape, &g.node(node.inputs[1]).shape);
                if a == b {
                    self.op("Mul", out, &x, out, vec![]);
                } else {
                    // A per-channel gate: reshape it to [N, C, 1, 1] so it broadcasts.
                    let shape = format!("{out}_gate_shape");
                    let gate = format!("{out}_gate");
                    self.graph
                        .initializer
                        .push(i64_tensor(&shape, &[-1, a[0] as i64, 1, 1]));
                    self.op("Reshape", &gate, &[x[1], &shape], &gate, vec![]);
                    self.op("Mul", out, &[x[0], &gate], out, vec![]);
                }
            }
            Op::MatMul => self.op("MatMul", out, &x, out, vec![]),
            Op::Binary(kind) => self.op(kind.onnx(), out, &x, out, vec![]),
            Op::ConstBinary { kind, reversed, .. } => {
                let c = self.param(node, "value")?;
                let inputs = if *reversed {
                    [c.as_str(), x[0]]
                } else {
                    [x[0], c.as_str()]
                };
                self.op(kind.onnx(), out, &inputs, out, vec![]);
            }
            Op::Reduce { kind, axes, keep } if kind.is_index() => {
                // ONNX's index is int64; Slim's values are floats: a Cast follows.
                let index = format!("{out}_index");
                let last = matches!(kind, ReduceKind::ArgMaxLast | ReduceKind::ArgMinLast);
                let mut attrs = vec![
                    int("axis", axes[0] as i64 + 1),
                    int("keepdims", i64::from(*keep)),
                ];
                if last {
                    attrs.push(int("select_last_index", 1));
                }
                self.op(kind.onnx(), out, &x, &index, attrs);
                let to = int("to", i64::from(data_type::FLOAT));
                self.op("Cast", &format!("{out}_float"), &[&index], out, vec![to]);
            }
            Op::Reduce { kind, axes, keep } => {
                let name = kind.onnx();
                let axes: Vec<i64> = axes.iter().map(|&a| a as i64 + 1).collect();
                let keep = int("keepdims", i64::from(*keep));
                // ReduceSum takes its axes as an input from opset 13, the others from 18.
                let as_input = self.opset >= 18 || (*kind == ReduceKind::Sum && self.opset >= 13);
                if as_input {
                    let a = format!("{out}_axes");
                    self.graph.initializer.push(i64_tensor(&a, &axes));
                    self.op(name, out, &[x[0], &a], out, vec![keep]);
                } else {
                    self.op(name, out, &x, out, vec![ints("axes", &axes), keep]);
                }
            }
            Op::LayerNorm { from, eps, .. } => {
                if self.opset < 17 {
                    return unsupported("layer normalization needs opset 17 or newer");
                }
                let (w, b) = (self.param(node, "weight")?, self.param(node, "bias")?);
                self.op(
                    "LayerNormalization",
                    out,
                    &[x[0], &w, &b],
                    out,
                    vec![int("axis", *from as i64 + 1), float("epsilon", *eps as f32)],
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Concatenation, reshaping, transposes, slices and channel shuffles. `Ok(false)` when the op is not of them.
    fn shape_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let x = e.x.clone();
        let unsupported = |why: &str| e.unsupported(why);
        match &node.op {
            Op::Concat => self.op("Concat", out, &x, out, vec![int("axis", 1)]),
            Op::Flatten => self.op("Flatten", out, &x, out, vec![int("axis", 1)]),
            Op::Reshape { shape } => {
                let s = format!("{out}_shape");
                let mut dims = vec![-1i64];
                dims.extend(shape.iter().map(|&d| d as i64));
                self.graph.initializer.push(i64_tensor(&s, &dims));
                self.op("Reshape", out, &[x[0], &s], out, vec![]);
            }
            Op::Transpose { perm } => {
                let mut p = vec![0i64];
                p.extend(perm.iter().map(|&a| a as i64 + 1));
                self.op("Transpose", out, &x, out, vec![ints("perm", &p)]);
            }
            Op::ConcatAt { axis } => {
                self.op("Concat", out, &x, out, vec![int("axis", *axis as i64 + 1)])
            }
            Op::Slice {
                axis,
                start,
                end,
                step,
                backward,
            } => {
                let names = ["starts", "ends", "axes", "steps"].map(|s| format!("{out}_{s}"));
                let (start, end, step) = (*start as i64, *end as i64, *step as i64);
                // Backward from end - 1 down to start: an end of -1 would count from the back,
                // so the axis's start is passed by any end far enough below it.
                let range = match backward {
                    true => [
                        end - 1,
                        if start == 0 { i64::MIN } else { start - 1 },
                        -step,
                    ],
                    false => [start, end, step],
                };
                let values = [range[0], range[1], *axis as i64 + 1, range[2]];
                for (n, v) in names.iter().zip(values) {
                    self.graph.initializer.push(i64_tensor(n, &[v]));
                }
                let inputs = [x[0], &names[0], &names[1], &names[2], &names[3]];
                self.op("Slice", out, &inputs, out, vec![]);
            }
            Op::ChannelShuffle { groups } => {
                // Reshape to [N, g, C/g, H, W], swap the two channel axes, reshape back.
                let [c, h, w] = node.shape[..] else {
                    return unsupported("a channel shuffle needs a [C, H, W] value");
                };
                let g = *groups as i64;
                let (grid, swapped) = (format!("{out}_grid"), format!("{out}_swapped"));
                let (grid_shape, back_shape) =
                    (format!("{out}_grid_shape"), format!("{out}_shape"));
                let (c, h, w) = (c as i64, h as i64, w as i64);
                self.graph
                    .initializer
                    .push(i64_tensor(&grid_shape, &[-1, g, c / g, h, w]));
                self.graph
                    .initializer
                    .push(i64_tensor(&back_shape, &[-1, c, h, w]));
                self.op("Reshape", &grid, &[x[0], &grid_shape], &grid, vec![]);
                self.op(
                    "Transpose",
                    &swapped,
                    &[&grid],
                    &swapped,
                    vec![ints("perm", &[0, 2, 1, 3, 4])],
                );
                self.op("Reshape", out, &[&swapped, &back_shape], out, vec![]);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Pooling and padding. `Ok(false)` when the op is not of them.
    fn spatial_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let x = e.x.clone();
        match &node.op {
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                let mut attrs = vec![
                    ints("kernel_shape", &i64s(&p.kernel)),
                    ints("strides", &i64s(&p.stride)),
                    ints("pads", &i64s(&p.pads)),
                ];
                let max = matches!(node.op, Op::MaxPool2d(_));
                if p.dilation != [1, 1] {
                    // MaxPool takes dilations from opset 10, AveragePool from 19.
                    if !max && self.opset < 19 {
                        return e.unsupported("dilated average pooling needs opset 19 or newer");
                    }
                    attrs.push(ints("dilations", &i64s(&p.dilation)));
                }
                let kind = if max {
                    "MaxPool"
                } else {
                    attrs.push(int("count_include_pad", i64::from(!p.exclude_pad)));
                    "AveragePool"
                };
                self.op(kind, out, &x, out, attrs);
            }
            Op::GlobalAvgPool => {
                // The pooling node keeps the Slim name (the importer names nodes after ONNX
                // nodes); the flatten that follows is folded away on import.
                let pooled = format!("{out}_pooled");
                self.op("GlobalAveragePool", out, &x, &pooled, vec![]);
                self.op(
                    "Flatten",
                    &format!("{out}_flatten"),
                    &[&pooled],
                    out,
                    vec![int("axis", 1)],
                );
            }
            Op::Pad { pads, mode } => {
                let [t, l, b, r] = pads.map(|p| p as i64);
                let (p, v) = (format!("{out}_pads"), format!("{out}_value"));
                self.graph
                    .initializer
                    .push(i64_tensor(&p, &[0, 0, t, l, 0, 0, b, r]));
                let (name, value) = match mode {
                    PadMode::Constant(value) => ("constant", *value),
                    PadMode::Edge => ("edge", 0.0),
                    PadMode::Reflect => ("reflect", 0.0),
                };
                self.graph.initializer.push(f32_tensor(&v, &[], &[value]));
                self.op("Pad", out, &[x[0], &p, &v], out, vec![string("mode", name)]);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Transposed convolutions, LRN, constants, quantizers, dropout and identities. `Ok(false)` when the op is not of them.
    fn other_layer_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let id = e.id;
        let out = e.out;
        let integer = e.integer;
        let x = e.x.clone();
        let unsupported = |why: &str| e.unsupported(why);
        match &node.op {
            Op::Dropout { p } => {
                // Dropout does nothing at inference; the ratio is kept for training after import.
                let ratio = format!("{out}_ratio");
                self.graph.initializer.push(f32_tensor(&ratio, &[], &[*p]));
                self.op("Dropout", out, &[x[0], &ratio], out, vec![]);
            }
            Op::Identity => self.op("Identity", out, &x, out, vec![]),
            Op::Constant { shape } => {
                // The value expanded to [N, ...shape], N read from the input's shape.
                let value = self.param(node, "value")?;
                let names = ["shape", "starts", "ends", "batch", "dims", "sizes"]
                    .map(|s| format!("{out}_{s}"));
                let [full, starts, ends, batch, dims, sizes] = &names;
                self.graph.initializer.push(i64_tensor(starts, &[0]));
                self.graph.initializer.push(i64_tensor(ends, &[1]));
                let per_sample = i64s(shape);
                self.graph.initializer.push(i64_tensor(dims, &per_sample));
                self.op("Shape", full, &[x[0]], full, vec![]);
                self.op("Slice", batch, &[full, starts, ends], batch, vec![]);
                self.op("Concat", sizes, &[batch, dims], sizes, vec![int("axis", 0)]);
                self.op("Expand", out, &[&value, sizes], out, vec![]);
            }
            Op::Lrn(l) => self.op(
                "LRN",
                out,
                &x,
                out,
                vec![
                    int("size", l.size as i64),
                    float("alpha", l.alpha),
                    float("beta", l.beta),
                    float("bias", l.bias),
                ],
            ),
            Op::ConvTranspose2d(c) => {
                let inputs = self.layer_inputs(node, x[0], c.bias, integer)?;
                let inputs: Vec<&str> = inputs.iter().map(|s| s.as_str()).collect();
                let d = c.dilation as i64;
                self.op(
                    "ConvTranspose",
                    out,
                    &inputs,
                    out,
                    vec![
                        ints("kernel_shape", &i64s(&c.kernel)),
                        ints("strides", &i64s(&c.stride)),
                        ints("pads", &i64s(&c.pads)),
                        ints("dilations", &[d, d]),
                        ints("output_padding", &i64s(&c.output_padding)),
                        int("group", c.groups as i64),
                    ],
                );
            }
            Op::FakeQuant(q) => {
                if q.bits != 8 {
                    return unsupported(&format!(
                        "{}-bit quantization has no QDQ form (8 bits only)",
                        q.bits
                    ));
                }
                let q = self.plan.params[&id];
                self.quant_pair(x[0], &q, out);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Resizing, with its scales (and region). `Ok(false)` when the op is not of them.
    fn resize_node(&mut self, e: &Emit<'_>) -> Result<bool> {
        let node = e.node;
        let out = e.out;
        let x = e.x.clone();
        let unsupported = |why: &str| e.unsupported(why);
        let g = &self.model.graph;
        match &node.op {
            Op::Resize(r) => {
                // ONNX takes scales or sizes: the scales where they give the output size
                // (the coordinates then map with them, as in Slim), else the sizes.
                let (roi, scales) = (format!("{out}_roi"), format!("{out}_scales"));
                // The region of a crop-and-resize (the batch and channel axes whole).
                match &r.crop {
                    Some(c) if r.coord == CoordMode::TfCropAndResize => {
                        let [h0, w0, h1, w1] = c.roi;
                        let values = [0.0, 0.0, h0, w0, 1.0, 1.0, h1, w1];
                        self.graph.initializer.push(f32_tensor(&roi, &[8], &values));
                    }
                    _ => self.graph.initializer.push(f32_tensor(&roi, &[0], &[])),
                }
                self.graph.initializer.push(f32_tensor(
                    &scales,
                    &[4],
                    &[1.0, 1.0, r.scale[0], r.scale[1]],
                ));
                let coord = match r.coord {
                    CoordMode::HalfPixel => "half_pixel",
                    CoordMode::PytorchHalfPixel => "pytorch_half_pixel",
                    CoordMode::AlignCorners => "align_corners",
                    CoordMode::Asymmetric => "asymmetric",
                    CoordMode::HalfPixelSymmetric if self.opset < 19 => {
                        return unsupported(
                            "half_pixel_symmetric resizing needs opset 19 or newer",
                        );
                    }
                    CoordMode::HalfPixelSymmetric => "half_pixel_symmetric",
                    CoordMode::TfCropAndResize => "tf_crop_and_resize",
                };
                let mut attrs = vec![string("coordinate_transformation_mode", coord)];
                if let Some(c) = r.crop.as_ref().filter(|_| coord == "tf_crop_and_resize") {
                    attrs.push(float("extrapolation_value", c.extrapolation));
                }
                if r.antialias && !matches!(r.mode, ResizeMode::Nearest(_)) {
                    if self.opset < 18 {
                        return unsupported("antialiased resizing needs opset 18 or newer");
                    }
                    attrs.push(int("antialias", 1));
                }
                match r.mode {
                    ResizeMode::Linear => attrs.push(string("mode", "linear")),
                    ResizeMode::Cubic { a, exclude_outside } => {
                        attrs.push(string("mode", "cubic"));
                        attrs.push(float("cubic_coeff_a", a));
                        attrs.push(int("exclude_outside", i64::from(exclude_outside)));
                    }
                    ResizeMode::Nearest(rounding) => {
                        attrs.push(string("mode", "nearest"));
                        let rounding = match rounding {
                            NearestRounding::RoundPreferFloor => "round_prefer_floor",
                            NearestRounding::RoundPreferCeil => "round_prefer_ceil",
                            NearestRounding::Floor => "floor",
                            NearestRounding::Ceil => "ceil",
                        };
                        attrs.push(string("nearest_mode", rounding));
                    }
                }
                let input = &g.node(node.inputs[0]).shape;
                let exact = (0..2).all(|i| {
                    (input[i + 1] as f64 * f64::from(r.scale[i])).floor() as usize == r.out[i]
                });
                if exact {
                    self.op("Resize", out, &[x[0], &roi, &scales], out, attrs);
                } else {
                    // `sizes` spans the batch axis too: the input's [N, C], then [H, W].
                    let names = ["shape", "starts", "ends", "batch", "plane", "sizes"]
                        .map(|s| format!("{out}_{s}"));
                    let [shape, starts, ends, batch, plane, sizes] = &names;
                    self.graph.initializer.push(i64_tensor(starts, &[0]));
                    self.graph.initializer.push(i64_tensor(ends, &[2]));
                    self.graph
                        .initializer
                        .push(i64_tensor(plane, &[r.out[0] as i64, r.out[1] as i64]));
                    self.op("Shape", shape, &[x[0]], shape, vec![]);
                    self.op("Slice", batch, &[shape, starts, ends], batch, vec![]);
                    self.op(
                        "Concat",
                        sizes,
                        &[batch, plane],
                        sizes,
                        vec![int("axis", 0)],
                    );
                    self.op("Resize", out, &[x[0], &roi, "", sizes], out, attrs);
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}
