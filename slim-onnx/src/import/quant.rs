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

use slim_core::graph::{BinaryKind, FakeQuantSpec, Float8, Op, UnaryKind};
use slim_core::model::Int8Tensor;

use super::{display_name, err, sanitize, Attrs, Builder, Const, NodeRef, Value};
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

/// The range of an integer type a quantizer may write (8, 16 or 32 bits).
fn integer_range(ty: i32) -> Option<(f64, f64)> {
    match ty {
        data_type::UINT16 => Some((0.0, 65535.0)),
        data_type::INT16 => Some((-32768.0, 32767.0)),
        data_type::INT32 => Some((-2147483648.0, 2147483647.0)),
        _ => range(ty),
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
        let declared = Attrs(&n.attribute).int("output_dtype").unwrap_or(0) as i32;
        match (has_zero, declared) {
            (true, _) => self.type_of(n, 2).unwrap_or(data_type::UINT8),
            (false, 0) => data_type::UINT8,
            (false, t) => t,
        }
    }

    /// Whether every reader of `n`'s output is a `DequantizeLinear` (and no graph output):
    /// an activation's quantizer pair.
    fn paired(&self, n: &NodeProto) -> bool {
        n.output.first().is_some_and(|o| {
            let uses = self.uses.get(o).copied().unwrap_or(0);
            uses > 0 && self.dequantized_uses.get(o).copied().unwrap_or(0) == uses
        })
    }

    /// A quantizer's scales and zero points as constants that broadcast against the value
    /// `x` (of the full rank, the batch axis one): one of each, one per slice along the
    /// axis, or one per block of `block_size` positions along it (repeated to cover them).
    fn broadcast_params(
        &self,
        x: &NodeRef,
        scale: &Const,
        zero: Option<&Const>,
        a: &Attrs,
    ) -> Result<(Const, Option<Const>)> {
        let full: Vec<usize> = std::iter::once(1).chain(x.onnx.iter().copied()).collect();
        let rank = full.len();
        let zero = zero.filter(|z| z.values.iter().any(|&v| v != 0.0));
        if scale.numel() == 1 && zero.is_none_or(|z| z.numel() == 1) {
            let one = |c: &Const| Const::scalar(c.values[0]);
            return Ok((one(scale), zero.map(one)));
        }
        let axis = a.int("axis").unwrap_or(1);
        let axis = if axis < 0 { axis + rank as i64 } else { axis };
        if !(1..rank as i64).contains(&axis) {
            return err(format!(
                "a quantizer with {} scales along axis {axis} of a rank-{rank} value (one                  per sample, or outside it)",
                scale.numel()
            ));
        }
        let axis = axis as usize;
        let block = a.int("block_size").unwrap_or(0).max(0) as usize;
        let expand = |c: &Const| -> Result<Const> {
            if block == 0 {
                if c.numel() != full[axis] {
                    return err(format!(
                        "{} scales (or zero points) for the {} slices of axis {axis}",
                        c.numel(),
                        full[axis]
                    ));
                }
                let mut dims = vec![1; rank];
                dims[axis] = full[axis];
                return Ok(Const {
                    dims,
                    values: c.values.clone(),
                });
            }
            // Blocks: the constant has the value's shape but along the axis, where it has
            // one entry per block; right-aligned against the value, its batch entry one.
            let mut dims = vec![1; rank.saturating_sub(c.dims.len())];
            dims.extend(&c.dims);
            let fits = dims.len() == rank
                && dims[0] == 1
                && (1..rank).all(|i| {
                    if i == axis {
                        dims[i] == full[i].div_ceil(block)
                    } else {
                        dims[i] == full[i]
                    }
                });
            if !fits {
                return err(format!(
                    "scales (or zero points) of shape {:?} do not block axis {axis} of {:?}                      by {block}",
                    c.dims, full
                ));
            }
            let mut out_dims = dims.clone();
            out_dims[axis] = full[axis];
            let inner: usize = out_dims[axis + 1..].iter().product();
            let outer: usize = out_dims[..axis].iter().product();
            let mut values = Vec::with_capacity(outer * full[axis] * inner);
            for o in 0..outer {
                for i in 0..full[axis] {
                    let row = (o * dims[axis] + i / block) * inner;
                    values.extend_from_slice(&c.values[row..row + inner]);
                }
            }
            Ok(Const {
                dims: out_dims,
                values,
            })
        };
        Ok((expand(scale)?, zero.map(expand).transpose()?))
    }

    /// `QuantizeLinear` of data in general: the integers (or 8-bit floats) themselves,
    /// `saturate(round(x / scale) + zero)`, as Slim element-wise nodes.
    fn quantize_values(&mut self, n: &NodeProto, a: &Attrs, base: &str, ty: i32) -> Result<()> {
        let x: NodeRef = self.node_in(n, 0)?;
        let (scale, zero) = (self.konst(n, 1)?, self.opt_const(n, 2)?);
        if let Some(s) = scale.values.iter().find(|&&s| !(s > 0.0 && s.is_finite())) {
            return err(format!("scale {s} is not a positive number"));
        }
        let (s, z) = self.broadcast_params(&x, &scale, zero.as_ref(), a)?;
        let mut r = self.const_arith(base, &x, &s, BinaryKind::Div, false)?;
        let unary = |b: &mut Builder, r: &NodeRef, op: Op, what: &str| -> Result<NodeRef> {
            let name = b.fresh_name(&format!("{base}_{what}"), what);
            let shape = b.push(&name, op, &[&r.node], BTreeMap::new())?;
            Ok(NodeRef::plain(name, &shape))
        };
        if let Some(format) = Float8::of_onnx(ty) {
            if let Some(z) = &z {
                r = self.const_arith(base, &r, z, BinaryKind::Add, false)?;
            }
            let saturate = a.int("saturate").unwrap_or(1) != 0;
            let op = Op::Unary(UnaryKind::Float8 { format, saturate });
            r = unary(self, &r, op, "float8")?;
            return self.bind(n, r);
        }
        let Some((qmin, qmax)) = integer_range(ty) else {
            return err(format!("quantization to {}", data_type::name(ty)));
        };
        r = unary(self, &r, Op::Unary(UnaryKind::Round), "round")?;
        if let Some(z) = &z {
            r = self.const_arith(base, &r, z, BinaryKind::Add, false)?;
        }
        let clip = Op::Clip {
            min: Some(qmin as f32),
            max: Some(qmax as f32),
        };
        r = unary(self, &r, clip, "saturate")?;
        self.bind(n, r)
    }

    /// `DequantizeLinear` of data that no quantizer pair produced: `(x - zero) · scale`.
    fn dequantize_values(&mut self, n: &NodeProto, a: &Attrs, x: NodeRef) -> Result<()> {
        let (scale, zero) = (self.konst(n, 1)?, self.opt_const(n, 2)?);
        let (s, z) = self.broadcast_params(&x, &scale, zero.as_ref(), a)?;
        let base = sanitize(&display_name(n));
        let mut r = x;
        if let Some(z) = &z {
            r = self.const_arith(&base, &r, z, BinaryKind::Sub, false)?;
        }
        let r = self.const_arith(&base, &r, &s, BinaryKind::Mul, false)?;
        self.bind(n, r)
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
                return self.dequantize_values(n, a, r);
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
        let ty = self.zero_type(n, zero.is_some());
        // An activation's pair of one scale and 8 bits is a fake quantizer, which the int8
        // runtime runs; any other quantizer computes its integers.
        let one_scale = scale.numel() == 1 && zero.as_ref().is_none_or(|z| z.numel() == 1);
        let (Some((qmin, qmax)), true, true) = (range(ty), one_scale, self.paired(n)) else {
            return self.quantize_values(n, a, base, ty);
        };
        let s = scale.values[0];
        if !(s > 0.0 && s.is_finite()) {
            return err(format!("scale {s} is not a positive number"));
        }
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
