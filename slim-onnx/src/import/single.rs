//! Graphs of one sample ([`ImportOptions::single_sample`]): the ONNX input's whole shape is
//! one sample, and Slim's model applies the graph to each sample of a batch.
//!
//! Each node that reads data is rewritten for a value with a leading batch axis of one before
//! the importer reads it: its axes move one place right, its permutation keeps the batch
//! first, the shapes it is given (a Reshape's target, an Expand's shape, a Resize's scales and
//! sizes, a Pad's pads) gain the batch entry, and a `Shape` reads the sample's axes alone.
//! Constants broadcast against data from the right, so they need no change. Ops that read the
//! first axis as the batch (convolutions, pooling, batch norm, LRN) are refused: their graph
//! has a batch axis and imports without this option.

use super::*;
use crate::proto::attribute_type;

impl Builder {
    /// `n` as it reads data with a batch axis of one in front; `n` itself when no input is
    /// data (constants are folded as they are).
    pub(super) fn lift(&mut self, n: &NodeProto) -> Result<NodeProto> {
        let Some(r) = n.input.iter().find_map(|i| match self.values.get(i) {
            Some(Value::Node(x)) => Some(x.onnx.len()),
            _ => None,
        }) else {
            return Ok(n.clone());
        };
        let a = Attrs(&n.attribute);
        let mut out = n.clone();
        match n.op_type.as_str() {
            "Conv"
            | "ConvTranspose"
            | "BatchNormalization"
            | "MaxPool"
            | "AveragePool"
            | "GlobalAveragePool"
            | "GlobalMaxPool"
            | "LRN"
            | "InstanceNormalization"
            | "GroupNormalization"
            | "DepthToSpace"
            | "SpaceToDepth" => {
                return err(format!(
                    "{} reads the first axis of its input as the batch; a graph of one sample \
                     (--single-sample) cannot use it",
                    n.op_type
                ))
            }
            // A quantizer of one scale has no axis to move.
            "QuantizeLinear" | "DequantizeLinear"
                if self.opt_const(n, 1)?.is_some_and(|s| s.numel() == 1) => {}
            "Concat" | "Split" | "Softmax" | "Gather" | "LayerNormalization" | "QuantizeLinear"
            | "DequantizeLinear" | "ArgMax" | "ArgMin" => {
                let default = match n.op_type.as_str() {
                    "Split" | "Gather" | "ArgMax" | "ArgMin" => 0,
                    "Softmax" if self.opset < 13 => 1,
                    "Softmax" | "LayerNormalization" => -1,
                    _ => 1,
                };
                let axis = a.int("axis").unwrap_or(default);
                set_ints(&mut out, "axis", &[lift_axis(axis, r)?], true);
            }
            "Flatten" => self.lift_flatten(n, &a, r, &mut out)?,
            "Squeeze" | "Unsqueeze" => self.lift_squeeze(n, &a, r, &mut out)?,
            "ReduceMean" | "ReduceMax" | "ReduceSum" | "ReduceMin" | "ReduceL1" | "ReduceL2"
            | "ReduceSumSquare" => {
                let as_input = self.opset >= 18 || (n.op_type == "ReduceSum" && self.opset >= 13);
                let axes = if as_input {
                    self.opt_const(n, 1)?.map(|c| c.ints())
                } else {
                    a.ints("axes")
                };
                let axes = match axes {
                    Some(v) if !v.is_empty() => v,
                    _ if a.int("noop_with_empty_axes").unwrap_or(0) != 0 => return Ok(out),
                    _ => (0..r as i64).collect(),
                };
                self.set_axes(&mut out, 1, as_input, &lift_axes(&axes, r)?);
            }
            "Slice" => self.lift_slice(n, &a, r, &mut out)?,
            "Transpose" => {
                let perm = a
                    .ints("perm")
                    .unwrap_or_else(|| (0..r as i64).rev().collect());
                let lifted: Vec<i64> = std::iter::once(0)
                    .chain(perm.iter().map(|&p| if p >= 0 { p + 1 } else { p }))
                    .collect();
                set_ints(&mut out, "perm", &lifted, false);
            }
            "Reshape" | "Expand" => {
                let c = self.konst(n, 1)?;
                self.set_input(&mut out, 1, prepend(&c, 1.0));
            }
            "Shape" => {
                let (s, e) = shape_range(&a, r);
                set_ints(&mut out, "start", &[s as i64 + 1], true);
                set_ints(&mut out, "end", &[e as i64 + 1], true);
            }
            "Pad" => self.lift_pad(n, &a, r, &mut out)?,
            "Resize" | "Upsample" => self.lift_resize(n, &a, r, &mut out)?,
            _ => {}
        }
        Ok(out)
    }

    /// The per-sample shape of `n`'s first data input.
    fn data_shape(&self, n: &NodeProto) -> Result<Vec<usize>> {
        Ok(self.node_in(n, 0)?.onnx)
    }

    /// Makes input `i` of `out` a new constant holding `c` (of the original input's type).
    fn set_input(&mut self, out: &mut NodeProto, i: usize, c: Const) {
        let from = out.input.get(i).cloned().unwrap_or_default();
        let stem = if from.is_empty() {
            format!("{}.input{i}", display_name(out))
        } else {
            from.clone()
        };
        let name = (0..)
            .map(|k| format!("{stem}.one_sample{k}"))
            .find(|s| !self.values.contains_key(s))
            .unwrap_or_default();
        if from.is_empty() || self.ints.contains(&from) {
            self.ints.insert(name.clone());
        }
        if let Some(&t) = self.types.get(&from) {
            self.types.insert(name.clone(), t);
        }
        self.values.insert(name.clone(), Value::Const(c));
        while out.input.len() <= i {
            out.input.push(String::new());
        }
        out.input[i] = name;
    }

    /// Sets `axes`: as input `i` from the opsets that take it so, else as the attribute.
    fn set_axes(&mut self, out: &mut NodeProto, i: usize, as_input: bool, axes: &[i64]) {
        if as_input {
            let c = Const {
                dims: vec![axes.len()],
                values: axes.iter().map(|&v| v as f64).collect(),
            };
            self.set_input(out, i, c);
        } else {
            set_ints(out, "axes", axes, false);
        }
    }

    /// Flatten of a sample: a Reshape to `[1, rows, cols]`.
    fn lift_flatten(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        r: usize,
        out: &mut NodeProto,
    ) -> Result<()> {
        // [prod(S[..k]), prod(S[k..])] for each sample: a Reshape.
        let k = a.int("axis").unwrap_or(1);
        let k = if k < 0 { k + r as i64 } else { k };
        if !(0..=r as i64).contains(&k) {
            return err(format!("Flatten from axis {k} of a rank-{r} value"));
        }
        let dims = self.data_shape(n)?;
        let rows: usize = dims[..k as usize].iter().product();
        let cols: usize = dims[k as usize..].iter().product();
        out.op_type = "Reshape".into();
        out.attribute.clear();
        out.input.truncate(1);
        let shape = Const {
            dims: vec![3],
            values: vec![1.0, rows as f64, cols as f64],
        };
        self.set_input(out, 1, shape);
        Ok(())
    }

    fn lift_squeeze(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        r: usize,
        out: &mut NodeProto,
    ) -> Result<()> {
        let as_input = self.opset >= 13;
        let axes = self.axes(n, a)?;
        let axes = match (n.op_type.as_str(), axes) {
            ("Squeeze", None) => {
                let dims = self.data_shape(n)?;
                (0..r).filter(|&i| dims[i] == 1).map(|i| i as i64).collect()
            }
            (_, axes) => axes.unwrap_or_default(),
        };
        let rank = if n.op_type == "Squeeze" {
            r
        } else {
            r + axes.len()
        };
        let lifted = lift_axes(&axes, rank)?;
        self.set_axes(out, 1, as_input, &lifted);
        Ok(())
    }

    fn lift_slice(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        r: usize,
        out: &mut NodeProto,
    ) -> Result<()> {
        let (count, axes) = if self.opset < 10 {
            (a.ints("starts").unwrap_or_default().len(), a.ints("axes"))
        } else {
            let axes = self.opt_const(n, 3)?.map(|c| c.ints());
            (self.konst(n, 1)?.numel(), axes)
        };
        let axes = axes.unwrap_or_else(|| (0..count as i64).collect());
        let lifted = lift_axes(&axes, r)?;
        self.set_axes(out, 3, self.opset >= 10, &lifted);
        Ok(())
    }

    fn lift_pad(&mut self, n: &NodeProto, a: &Attrs, r: usize, out: &mut NodeProto) -> Result<()> {
        if self.opset >= 18 {
            if let Some(axes) = self.opt_const(n, 3)? {
                let lifted = lift_axes(&axes.ints(), r)?;
                self.set_axes(out, 3, true, &lifted);
                return Ok(());
            }
        }
        let pads = if self.opset < 11 {
            a.ints("pads").unwrap_or_default()
        } else {
            self.konst(n, 1)?.ints()
        };
        if pads.len() != 2 * r {
            return err(format!("{} pads for a rank-{r} value", pads.len()));
        }
        let mut lifted = vec![0];
        lifted.extend(&pads[..r]);
        lifted.push(0);
        lifted.extend(&pads[r..]);
        if self.opset < 11 {
            set_ints(out, "pads", &lifted, false);
        } else {
            let c = Const {
                dims: vec![lifted.len()],
                values: lifted.iter().map(|&v| v as f64).collect(),
            };
            self.set_input(out, 1, c);
        }
        Ok(())
    }

    fn lift_resize(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        r: usize,
        out: &mut NodeProto,
    ) -> Result<()> {
        if let Some(axes) = a.ints("axes") {
            set_ints(out, "axes", &lift_axes(&axes, r)?, false);
            return Ok(());
        }
        if n.op_type == "Upsample" && self.opset < 9 {
            let scales = a
                .get("scales")
                .map(|s| s.floats.clone())
                .unwrap_or_default();
            let mut lifted = vec![1.0];
            lifted.extend(scales);
            set_floats(out, "scales", &lifted);
            return Ok(());
        }
        // Upsample and Resize of opset 10 take the scales second; Resize from opset 11 takes
        // the region, the scales and the sizes.
        let (roi, scales, sizes) = if n.op_type == "Upsample" || self.opset < 11 {
            (None, 1, None)
        } else {
            (Some(1), 2, Some(3))
        };
        if let Some(c) = self.opt_const(n, scales)?.filter(|c| c.numel() > 0) {
            self.set_input(out, scales, prepend(&c, 1.0));
        }
        if let Some(i) = sizes {
            if let Some(c) = self.opt_const(n, i)?.filter(|c| c.numel() > 0) {
                self.set_input(out, i, prepend(&c, 1.0));
            }
        }
        if let Some(i) = roi {
            if let Some(c) = self.opt_const(n, i)?.filter(|c| c.numel() == 2 * r) {
                let mut values = vec![0.0];
                values.extend(&c.values[..r]);
                values.push(1.0);
                values.extend(&c.values[r..]);
                let lifted = Const {
                    dims: vec![values.len()],
                    values,
                };
                self.set_input(out, i, lifted);
            }
        }
        Ok(())
    }
}

/// An axis of a rank-`rank` value, checked, as the axis of the value with a batch axis in
/// front.
fn lift_axis(axis: i64, rank: usize) -> Result<i64> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if !(0..r).contains(&a) {
        return err(format!("axis {axis} of a rank-{rank} value"));
    }
    Ok(a + 1)
}

fn lift_axes(axes: &[i64], rank: usize) -> Result<Vec<i64>> {
    axes.iter().map(|&v| lift_axis(v, rank)).collect()
}

/// A 1-D constant with `v` in front.
fn prepend(c: &Const, v: f64) -> Const {
    let mut values = vec![v];
    values.extend(&c.values);
    Const {
        dims: vec![values.len()],
        values,
    }
}

fn set_ints(n: &mut NodeProto, name: &str, v: &[i64], one: bool) {
    n.attribute.retain(|a| a.name != name);
    let mut attr = AttributeProto {
        name: name.into(),
        ..Default::default()
    };
    if one {
        attr.r#type = attribute_type::INT;
        attr.i = v[0];
    } else {
        attr.r#type = attribute_type::INTS;
        attr.ints = v.to_vec();
    }
    n.attribute.push(attr);
}

fn set_floats(n: &mut NodeProto, name: &str, v: &[f32]) {
    n.attribute.retain(|a| a.name != name);
    n.attribute.push(AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOATS,
        floats: v.to_vec(),
        ..Default::default()
    });
}
