//! Int8 models in QDQ form: `DequantizeLinear` of int8 initializers (weights, int32 biases)
//! and `QuantizeLinear`/`DequantizeLinear` pairs on activations, as Slim's export and ONNX
//! Runtime's `quantize_static` write them.
//!
//! A dequantized constant is folded to its float values, and remembered with its integers when
//! it is int8 with zero points 0 and one scale per tensor or per slice along axis 0: a
//! convolution or linear layer whose weight it becomes, reading a quantizer, holds it as int8
//! ([`slim_core::Model::int8`]), so the model runs on Slim's int8 runtime. An activation's pair
//! becomes a fake quantizer, which is symmetric: a zero point in the middle of its type (128
//! for `u8`, 0 for `s8`) keeps the scale (the grid is the same, the lowest level aside); a zero
//! point at the bottom of its type (0 for `u8`, -128 for `s8`, what follows a ReLU) becomes a
//! ReLU and a quantizer over the same range `[0, 255·s]` with steps `255·s / 127` (Slim's own
//! exports come back to the grid they were written from); any other zero point, a quantizer
//! over the larger side of its range.

use std::collections::BTreeMap;

use slim_core::graph::{FakeQuantSpec, Op};
use slim_core::model::Int8Tensor;

use super::{err, Attrs, Builder, Const, NodeRef, Value};
use crate::proto::{data_type, NodeProto};
use crate::Result;

/// The integer range of a quantized ONNX type.
fn range(ty: i32) -> Option<(f64, f64)> {
    match ty {
        data_type::UINT8 => Some((0.0, 255.0)),
        data_type::INT8 => Some((-128.0, 127.0)),
        _ => None,
    }
}

/// The key a weight's float values are found by at the end of the import.
pub(super) fn bits_key(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Whether a (de)quantization has one scale per slice, along which axis, and each value's
/// slice, checking the scales and zero points against the tensor.
#[allow(clippy::type_complexity)]
fn slices<'a>(
    x: &'a Const,
    scale: &Const,
    zero: Option<&Const>,
    a: &Attrs,
) -> Result<(bool, i64, Box<dyn Fn(usize) -> usize + 'a>)> {
    let rank = x.dims.len();
    let axis = a.int("axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    let per_axis = scale.values.len() > 1;
    if per_axis && !(0..rank as i64).contains(&axis) {
        return err(format!("axis {axis} is outside a tensor of rank {rank}"));
    }
    let count = if per_axis { x.dims[axis as usize] } else { 1 };
    if scale.values.len() != count || zero.is_some_and(|z| z.values.len() != count) {
        return err(format!(
            "{} scales (and zero points) for {count} slices",
            scale.values.len()
        ));
    }
    let inner: usize = x.dims[(axis.max(0) as usize + 1).min(rank)..]
        .iter()
        .product();
    Ok((
        per_axis,
        axis,
        Box::new(move |i| {
            if per_axis {
                (i / inner.max(1)) % count
            } else {
                0
            }
        }),
    ))
}

impl Builder {
    /// The integer type of a quantization: its zero point's, uint8 without one.
    fn zero_type(&self, n: &NodeProto, has_zero: bool) -> i32 {
        if has_zero {
            self.type_of(n, 2).unwrap_or(data_type::UINT8)
        } else {
            data_type::UINT8
        }
    }

    /// The element type of a constant input (an initializer or a `Constant` node's tensor).
    fn type_of(&self, n: &NodeProto, i: usize) -> Option<i32> {
        n.input
            .get(i)
            .and_then(|name| self.types.get(name))
            .copied()
    }

    pub(super) fn dequantize_linear(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        if let Value::Node(r) = self.value(n, 0)?.clone() {
            // The second half of an activation's pair: the quantizer already stands for both.
            let made = self.by_name.get(&r.node).map(|&i| &self.nodes[i].op);
            if !matches!(made, Some(Op::FakeQuant(_))) {
                return err(
                    "a DequantizeLinear of values that no QuantizeLinear produced (Slim reads quantized activations only as QuantizeLinear/DequantizeLinear pairs)",
                );
            }
            return self.bind(n, r);
        }
        let x = self.konst(n, 0)?;
        let (scale, zero) = (self.konst(n, 1)?, self.opt_const(n, 2)?);
        let (per_axis, axis, slice) = slices(&x, &scale, zero.as_ref(), a)?;
        let mut values = Vec::with_capacity(x.values.len());
        for (i, &q) in x.values.iter().enumerate() {
            let k = slice(i);
            let z = zero.as_ref().map_or(0.0, |z| z.values[k]);
            // In f32, as Slim reads int8 weights back (`q * scale`).
            values.push(f64::from((q - z) as f32 * scale.values[k] as f32));
        }
        let int8 = self.type_of(n, 0) == Some(data_type::INT8)
            && zero
                .as_ref()
                .is_none_or(|z| z.values.iter().all(|&v| v == 0.0))
            && (!per_axis || axis == 0)
            && scale.values.iter().all(|&s| s > 0.0 && s.is_finite());
        if int8 {
            let f32s: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            self.int8_consts.insert(
                bits_key(&f32s),
                Int8Tensor {
                    values: x.values.iter().map(|&q| q as i8).collect(),
                    scales: scale.values.iter().map(|&s| s as f32).collect(),
                },
            );
        }
        self.bind_const(
            n,
            Const {
                dims: x.dims.clone(),
                values,
            },
        )
    }

    pub(super) fn quantize_linear(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        if let Value::Const(x) = self.value(n, 0)?.clone() {
            // A constant (a float weight some exporters quantize in the graph): its integers.
            let (scale, zero) = (self.konst(n, 1)?, self.opt_const(n, 2)?);
            let ty = self.zero_type(n, zero.is_some());
            let Some((qmin, qmax)) = range(ty) else {
                return err(format!("quantization to {}", data_type::name(ty)));
            };
            let (_, _, slice) = slices(&x, &scale, zero.as_ref(), a)?;
            let values = x
                .values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let k = slice(i);
                    let z = zero.as_ref().map_or(0.0, |z| z.values[k]);
                    // Halves to even, as ONNX rounds.
                    ((v / scale.values[k]).round_ties_even() + z).clamp(qmin, qmax)
                })
                .collect();
            if let Some(out) = n.output.first() {
                self.types.insert(out.clone(), ty);
            }
            return self.bind_const(
                n,
                Const {
                    dims: x.dims.clone(),
                    values,
                },
            );
        }
        let x: NodeRef = self.node_in(n, 0)?;
        let scale = self.konst(n, 1)?;
        let zero = self.opt_const(n, 2)?;
        if scale.values.len() != 1 || zero.as_ref().is_some_and(|z| z.values.len() != 1) {
            return err("a per-channel quantizer of activations (Slim's have one scale)");
        }
        let s = scale.values[0];
        if !(s > 0.0 && s.is_finite()) {
            return err(format!("scale {s} is not a positive number"));
        }
        let ty = self.zero_type(n, zero.is_some());
        let Some((qmin, qmax)) = range(ty) else {
            return err(format!(
                "quantization to {} (Slim's activations are 8-bit)",
                data_type::name(ty)
            ));
        };
        let z = zero.map_or(0.0, |z| z.values[0]);
        let (lo, hi) = ((qmin - z) * s, (qmax - z) * s);
        let mut input = x.node.clone();
        let slim_scale = if z == (qmin + qmax + 1.0) / 2.0 {
            s
        } else if lo >= 0.0 {
            // Nothing below zero passes: a ReLU (unless one came just before), then steps
            // over the same range.
            let made = &self.nodes[self.by_name[&x.node]].op;
            if !matches!(made, Op::Relu | Op::Relu6) {
                let relu = self.fresh_name(&format!("{base}_relu"), "relu");
                self.push(&relu, Op::Relu, &[&x.node], BTreeMap::new())?;
                input = relu;
            }
            hi / 127.0
        } else {
            lo.abs().max(hi) / 127.0
        };
        let mut params = BTreeMap::new();
        params.insert("scale", Const::scalar(f64::from(slim_scale as f32)));
        let op = Op::FakeQuant(FakeQuantSpec {
            bits: 8,
            moving_rate: 0.0,
            window: 0,
        });
        let name = self.fresh_name(base, "quantize");
        let shape = self.push(&name, op, &[&input], params)?;
        let mut r = NodeRef::plain(name, &shape);
        r.onnx = x.onnx;
        self.bind(n, r)
    }
}
