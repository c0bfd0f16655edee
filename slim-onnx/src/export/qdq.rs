//! The QDQ form of an int8 model, laid out as runtimes fuse it.
//!
//! ONNX Runtime (like TensorRT and OpenVINO) runs a convolution or matrix product in
//! integers when it finds the node between `DequantizeLinear`s (its input, its int8 weight,
//! an int32 bias) and directly before a `QuantizeLinear`. A Slim int8 model holds a
//! fake-quantization node before every quantized layer and after every quantized output that
//! no quantized layer reads ([`slim_quant`'s PTQ](https://docs.rs/slim-quant)); between a
//! layer and the next quantizer there may be a ReLU or ReLU6, max pooling and flattening
//! ([`slim_core::Graph::quantized_chain`]). The plan moves that quantizer up to the layer's
//! output and drops the activation, which its range then does: an activation after a ReLU is
//! written unsigned (`u8`, zero point 0, or `s8` with zero point -128) over `[0, max]`, where
//! `max` is the fake quantizer's clamp (and at most 6 after a ReLU6), so values below zero
//! (and above 6) cannot be represented. Max pooling and flattening keep the quantizer's
//! parameters on both sides, which runtimes run in integers as they are. Other activations
//! are `u8` with zero point 128 (or `s8` with zero point 0) on the fake quantizer's own scale,
//! the same grid. Biases are int32 on the scale `input scale × weight scale`.

use std::collections::{HashMap, HashSet};

use slim_core::{Model, Node, Op};

/// The integer type of activations in the exported QDQ graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationType {
    /// Unsigned bytes (the default; what ONNX Runtime's quantizer writes for x86).
    #[default]
    U8,
    /// Signed bytes.
    S8,
}

impl std::str::FromStr for ActivationType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "u8" | "uint8" => Ok(ActivationType::U8),
            "s8" | "int8" => Ok(ActivationType::S8),
            _ => Err(format!("activation type `{s}` is not u8 or s8")),
        }
    }
}

/// A quantizer's parameters in the exported graph.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    /// The zero point, within the type's range.
    pub zero: i32,
    pub unsigned: bool,
}

/// How each node of an int8 model is written.
#[derive(Default)]
pub struct Plan {
    /// Every fake quantizer's parameters.
    pub params: HashMap<usize, QParams>,
    /// Nodes whose output is quantized right after them, with the quantizer's parameters:
    /// quantized layers and the max pooling and flattening after them.
    pub requant: HashMap<usize, QParams>,
    /// Nodes written as their input: activations the quantizer's range does, and quantizers
    /// whose input is already on their grid.
    pub passed: HashSet<usize>,
    /// Convolutions and linear layers whose input is quantized and weight int8: their bias
    /// is int32.
    pub integer: HashSet<usize>,
    /// Integer layers whose output no quantizer follows: they run in float where deployed.
    pub float_outputs: Vec<String>,
    /// Values read by a quantizer: their other readers (written after it) read the quantized
    /// value instead, so that additions and concatenations of quantized values find every
    /// input dequantized, and an activation before the quantizer has it as its only reader.
    pub quantized: HashMap<usize, usize>,
}

impl Plan {
    /// The node whose value reader `reader` reads in place of node `input`.
    pub fn source(&self, input: usize, reader: usize) -> usize {
        match self.quantized.get(&input) {
            Some(&q) if q < reader => q,
            _ => input,
        }
    }
}

/// The largest value node `id` can output when it cannot be negative, from the activations
/// that bound it (through pooling, flattening and quantizers); `None` where it can be
/// negative.
fn upper_bound(model: &Model, id: usize) -> Option<f32> {
    let g = &model.graph;
    let node = g.node(id);
    match &node.op {
        Op::Relu => Some(f32::INFINITY),
        Op::Relu6 => Some(6.0),
        Op::Clip { min: Some(lo), max } if *lo >= 0.0 => Some(max.unwrap_or(f32::INFINITY)),
        Op::Sigmoid | Op::HardSigmoid { .. } => Some(1.0),
        Op::MaxPool2d(_)
        | Op::AvgPool2d(_)
        | Op::GlobalAvgPool
        | Op::Flatten
        | Op::Dropout { .. }
        | Op::Identity
        | Op::FakeQuant(_) => upper_bound(model, node.inputs[0]),
        Op::Concat => node
            .inputs
            .iter()
            .map(|&i| upper_bound(model, i))
            .try_fold(0f32, |m, b| b.map(|b| m.max(b))),
        _ => None,
    }
}

/// The parameters of fake quantizer `node` (scale `s`, clamping to `[-qmax·s, qmax·s]`).
fn quantizer_params(model: &Model, node: &Node, s: f32, qmax: f32, ty: ActivationType) -> QParams {
    let unsigned = ty == ActivationType::U8;
    match upper_bound(model, node.inputs[0]) {
        Some(bound) => QParams {
            scale: (qmax * s).min(bound) / 255.0,
            zero: if unsigned { 0 } else { -128 },
            unsigned,
        },
        None => QParams {
            scale: s,
            zero: if unsigned { 128 } else { 0 },
            unsigned,
        },
    }
}

/// The plan of an int8 model's QDQ graph (empty for a float model).
pub fn plan(model: &Model, ty: ActivationType) -> slim_core::Result<Plan> {
    let g = &model.graph;
    let mut plan = Plan::default();
    for id in g.eval_order() {
        let node = g.node(id);
        if let Op::FakeQuant(q) = &node.op {
            if q.bits != 8 {
                return Err(slim_core::CoreError::Node {
                    node: node.name.clone(),
                    msg: format!("{}-bit quantization has no QDQ form (8 bits only)", q.bits),
                });
            }
            let s = model
                .params
                .tensor(&node.param_name("scale"))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let s = s.first().copied().unwrap_or(0.0);
            let params = quantizer_params(model, node, s, q.qmax(), ty);
            plan.params.insert(id, params);
            // A second quantizer of a value with the same grid is the first one.
            let first = *plan.quantized.entry(node.inputs[0]).or_insert(id);
            if first != id && plan.params[&first] == params {
                plan.passed.insert(id);
            }
        }
    }
    let is_quantizer = |n: &Node| matches!(n.op, Op::FakeQuant(_));
    for id in g.eval_order() {
        let node = g.node(id);
        let integer = matches!(node.op, Op::Conv2d(_) | Op::Linear(_))
            && model.int8.contains_key(&node.param_name("weight"))
            && node
                .inputs
                .first()
                .is_some_and(|&i| is_quantizer(g.node(i)));
        if !integer {
            continue;
        }
        plan.integer.insert(id);
        let (chain, quantizer) = g.quantized_chain(id, is_quantizer);
        let Some(q) = quantizer else {
            if !g.outputs().contains(&id) {
                plan.float_outputs.push(node.name.clone());
            }
            continue;
        };
        let params = plan.params[&q];
        plan.requant.insert(id, params);
        for &c in &chain {
            match g.node(c).op {
                Op::Relu | Op::Relu6 => {
                    plan.passed.insert(c);
                }
                _ => {
                    plan.requant.insert(c, params);
                }
            }
        }
        plan.passed.insert(q);
    }
    Ok(plan)
}
