//! Ops over any axes at import: reductions, layer norms, splits and slices.

use super::*;

impl Builder {
    pub(super) fn reduce(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        // The axes are an input from opset 18 (ReduceSum: 13), an attribute before.
        let as_input = self.opset >= 18 || (n.op_type == "ReduceSum" && self.opset >= 13);
        let axes = if as_input {
            self.opt_const(n, 1)?.map(|c| c.ints())
        } else {
            a.ints("axes")
        };
        let keep = a.int("keepdims").unwrap_or(1) != 0;
        let axes: Vec<i64> = match axes {
            Some(v) if !v.is_empty() => v,
            _ if a.int("noop_with_empty_axes").unwrap_or(0) != 0 => {
                // No reduction, but the element-wise part stays (ONNX's reference): |x| for
                // L1 and L2, x² for the sum of squares.
                return match n.op_type.as_str() {
                    "ReduceL1" | "ReduceL2" => self.unary(n, base, Op::Unary(UnaryKind::Abs)),
                    "ReduceSumSquare" => {
                        let node = self.materialize(&x)?;
                        let name = self.fresh_name(base, "mul");
                        let op = Op::Binary(BinaryKind::Mul);
                        let shape = self.push(&name, op, &[&node, &node], BTreeMap::new())?;
                        self.bind(n, NodeRef::plain(name, &shape))
                    }
                    _ => self.bind(n, x),
                };
            }
            _ => {
                return err(format!(
                    "{} without axes reduces the batch axis too; Slim keeps each sample apart",
                    n.op_type
                ))
            }
        };
        let mut axes = axes
            .iter()
            .map(|&v| self.sample_axis(v, rank))
            .collect::<Result<Vec<usize>>>()?;
        axes.sort_unstable();
        axes.dedup();
        // A mean over the plane of a feature map is global average pooling (SE blocks).
        let plane = x.onnx.len() == 3 && axes == [1, 2] && self.shape_of(&x).len() == 3;
        if n.op_type == "ReduceMean" && plane {
            let name = self.fresh_name(base, "gap");
            let shape = self.push(&name, Op::GlobalAvgPool, &[&x.node], BTreeMap::new())?;
            let mut onnx = shape.clone();
            if keep {
                onnx.extend([1, 1]);
            }
            return self.bind(n, NodeRef { node: name, onnx });
        }
        let kind = match n.op_type.as_str() {
            "ReduceMean" => ReduceKind::Mean,
            "ReduceMax" => ReduceKind::Max,
            "ReduceMin" => ReduceKind::Min,
            "ReduceL1" => ReduceKind::L1,
            "ReduceL2" => ReduceKind::L2,
            "ReduceSumSquare" => ReduceKind::SumSquare,
            _ => ReduceKind::Sum,
        };
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "reduce");
        let op = Op::Reduce { kind, axes, keep };
        let shape = self.push(&name, op, &[&node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    /// ArgMax and ArgMin along one per-sample axis: the index as a float (exact up to 2^24).
    pub(super) fn arg_extreme(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let axis = self.sample_axis(a.int("axis").unwrap_or(0), rank)?;
        let keep = a.int("keepdims").unwrap_or(1) != 0;
        let last = a.int("select_last_index").unwrap_or(0) != 0;
        let kind = match (n.op_type.as_str(), last) {
            ("ArgMax", false) => ReduceKind::ArgMax,
            ("ArgMax", true) => ReduceKind::ArgMaxLast,
            (_, false) => ReduceKind::ArgMin,
            (_, true) => ReduceKind::ArgMinLast,
        };
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "reduce");
        let op = Op::Reduce {
            kind,
            axes: vec![axis],
            keep,
        };
        let shape = self.push(&name, op, &[&node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn layer_norm(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let from = self.sample_axis(a.int("axis").unwrap_or(-1), rank)?;
        let shape = x.onnx[from..].to_vec();
        let numel: usize = shape.iter().product();
        let full = |c: Option<Const>, fill: f64, what: &str| -> Result<Const> {
            match c {
                None => Ok(Const {
                    dims: shape.clone(),
                    values: vec![fill; numel],
                }),
                Some(c) if c.numel() == numel => Ok(Const {
                    dims: shape.clone(),
                    values: c.values,
                }),
                Some(c) if c.numel() == 1 => Ok(Const {
                    dims: shape.clone(),
                    values: vec![c.values[0]; numel],
                }),
                Some(c) => err(format!(
                    "its {what} of shape {:?} for normalized axes {shape:?}",
                    c.dims
                )),
            }
        };
        let weight = full(self.opt_const(n, 1)?, 1.0, "scale")?;
        let bias = full(self.opt_const(n, 2)?, 0.0, "bias")?;
        let eps = decimal(a.float("epsilon").unwrap_or(1e-5));
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "layernorm");
        let p = BTreeMap::from([("weight", weight), ("bias", bias)]);
        let op = Op::LayerNorm {
            from,
            shape: shape.clone(),
            eps,
        };
        let out = self.push(&name, op, &[&node], p)?;
        self.bind(n, NodeRef::plain(name, &out))?;
        let used = |k: usize| {
            n.output
                .get(k)
                .is_some_and(|o| self.uses.get(o).copied().unwrap_or(0) > 0)
        };
        if used(1) || used(2) {
            self.layer_norm_statistics(n, &x, &node, from, eps)?;
        }
        Ok(())
    }

    /// LayerNormalization's second and third outputs, the mean and the inverse standard
    /// deviation over the normalized axes (kept as ones), computed beside the layer norm:
    /// `mean(x)` and `1 / sqrt(mean((x - mean(x))²) + eps)`.
    fn layer_norm_statistics(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        node: &str,
        from: usize,
        eps: f64,
    ) -> Result<()> {
        let base = sanitize(&display_name(n));
        let axes: Vec<usize> = (from..x.onnx.len()).collect();
        let mut onnx = x.onnx.clone();
        onnx[from..].fill(1);
        let step = |this: &mut Self, what: &str, op: Op, inputs: &[&str], p| {
            let name = this.fresh_name(&format!("{base}.{what}"), what);
            this.push(&name, op, inputs, p).map(|_| name)
        };
        let mean_op = |axes: &Vec<usize>| Op::Reduce {
            kind: ReduceKind::Mean,
            axes: axes.clone(),
            keep: true,
        };
        let mean = step(self, "mean", mean_op(&axes), &[node], BTreeMap::new())?;
        let d = step(
            self,
            "centered",
            Op::Binary(BinaryKind::Sub),
            &[node, &mean],
            BTreeMap::new(),
        )?;
        let sq = step(
            self,
            "squared",
            Op::Binary(BinaryKind::Mul),
            &[&d, &d],
            BTreeMap::new(),
        )?;
        let var = step(self, "variance", mean_op(&axes), &[&sq], BTreeMap::new())?;
        let add = Op::ConstBinary {
            kind: BinaryKind::Add,
            shape: vec![1],
            reversed: false,
        };
        let p = BTreeMap::from([("value", Const::scalar(eps))]);
        let ve = step(self, "plus_eps", add, &[&var], p)?;
        let sd = step(self, "deviation", Op::Sqrt, &[&ve], BTreeMap::new())?;
        let inv = step(self, "inverse", Op::Reciprocal, &[&sd], BTreeMap::new())?;
        for (k, name) in [(1, mean), (2, inv)] {
            if let Some(out) = n.output.get(k).filter(|o| !o.is_empty()) {
                let r = NodeRef::plain(name, &onnx);
                self.values.insert(out.clone(), Value::Node(r));
            }
        }
        Ok(())
    }

    /// Binds ONNX output `k` of `n` to a slice of `x` along a per-sample axis.
    pub(super) fn bind_slice(
        &mut self,
        n: &NodeProto,
        k: usize,
        x: &str,
        axis: usize,
        range: (usize, usize, usize),
    ) -> Result<()> {
        let (start, end, step) = range;
        let base = sanitize(n.output.get(k).map(|s| s.as_str()).unwrap_or(""));
        let name = self.fresh_name(&base, "slice");
        let op = Op::Slice {
            axis,
            start,
            end,
            step,
            backward: false,
        };
        let shape = self.push(&name, op, &[x], BTreeMap::new())?;
        let out = n.output[k].clone();
        self.values
            .insert(out, Value::Node(NodeRef::plain(name, &shape)));
        Ok(())
    }

    pub(super) fn split(&mut self, n: &NodeProto, a: &Attrs, _base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let axis = self.sample_axis(a.int("axis").unwrap_or(0), rank)?;
        let len = x.onnx[axis];
        let parts = n.output.len();
        let given = if self.opset >= 13 {
            self.opt_const(n, 1)?.map(|c| c.ints())
        } else {
            a.ints("split")
        };
        let sizes: Vec<usize> = match given {
            Some(v) => sizes("split", &v, 0)?,
            None if parts > 0 => {
                // Equal parts, the last one smaller when the length does not divide.
                let each = len.div_ceil(parts);
                (0..parts)
                    .map(|i| each.min(len.saturating_sub(i * each)))
                    .collect()
            }
            None => return err("a Split without outputs"),
        };
        if sizes.len() != parts || sizes.iter().sum::<usize>() != len {
            return err(format!(
                "split sizes {sizes:?} of {len} values into {parts} outputs"
            ));
        }
        let node = self.materialize(&x)?;
        let mut start = 0;
        for (k, size) in sizes.into_iter().enumerate() {
            if size == 0 {
                // An empty part (the rest of a rotary embedding that rotates everything):
                // only a Concat may read it, and it adds nothing there.
                let mut dims = x.onnx.clone();
                dims[axis] = 0;
                let empty = Const {
                    dims,
                    values: vec![],
                };
                self.values.insert(n.output[k].clone(), Value::Const(empty));
                continue;
            }
            self.bind_slice(n, k, &node, axis, (start, start + size, 1))?;
            start += size;
        }
        Ok(())
    }

    pub(super) fn slice(&mut self, n: &NodeProto, a: &Attrs, _base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let [starts, ends, axes, steps] = self.slice_args(n, a)?;
        let mut cur = self.materialize(&x)?;
        let mut shape = x.onnx.clone();
        for i in 0..starts.len() {
            let axis = self.sample_axis(axes[i], rank)?;
            let len = shape[axis] as i64;
            let step = steps[i];
            if step == 0 {
                return err("Slice with step 0");
            }
            let from_end = |v: i64| if v < 0 { v.saturating_add(len) } else { v };
            let (s, e, backward) = if step > 0 {
                let clamp = |v: i64| from_end(v).clamp(0, len);
                (clamp(starts[i]), clamp(ends[i]), false)
            } else {
                // Backward from start down to (not reaching) end: as the positions from
                // end + 1 to start + 1, read from the top.
                let s = from_end(starts[i]).clamp(0, len - 1);
                let e = from_end(ends[i]).clamp(-1, len - 1);
                (e + 1, s + 1, true)
            };
            if s >= e {
                return err(format!(
                    "Slice {}..{} of axis {} leaves nothing",
                    starts[i], ends[i], axes[i]
                ));
            }
            if (s, e, step) == (0, len, 1) {
                continue;
            }
            let name = self.fresh_name(&sanitize(&display_name(n)), "slice");
            let op = Op::Slice {
                axis,
                start: s as usize,
                end: e as usize,
                step: step.unsigned_abs() as usize,
                backward,
            };
            shape = self.push(&name, op, &[&cur], BTreeMap::new())?;
            cur = name;
        }
        let r = NodeRef::plain(cur, &shape);
        self.bind(n, r)
    }
}

impl Builder {
    /// Gather on data with constant indices along a per-sample axis (a transformer's class
    /// token, `x[:, 0]`): a slice of the axis for each run of evenly stepped indices, the runs
    /// concatenated, then reshaped so that the indices' shape takes the axis's place.
    pub(super) fn gather(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let axis = self.sample_axis(a.int("axis").unwrap_or(0), rank)?;
        let indices = self.konst(n, 1)?;
        let len = x.onnx[axis];
        let picks = indices
            .ints()
            .iter()
            .map(|&i| {
                let j = if i < 0 { i + len as i64 } else { i };
                usize::try_from(j)
                    .ok()
                    .filter(|&j| j < len)
                    .ok_or_else(|| OnnxError::Model(format!("index {i} of an axis of {len}")))
            })
            .collect::<Result<Vec<usize>>>()?;
        if picks.is_empty() {
            return err("Gather of no indices");
        }
        let mut shape: Vec<usize> = x.onnx[..axis].to_vec();
        shape.extend(&indices.dims);
        shape.extend(&x.onnx[axis + 1..]);
        if shape.is_empty() {
            return err("Gather leaves one number per sample; Slim keeps at least one axis");
        }
        let cur = self.materialize(&x)?;
        let stem = sanitize(&display_name(n));
        let mut parts = Vec::new();
        for (start, count, step) in runs(&picks) {
            if (start, count, step) == (0, len, 1) {
                parts.push(cur.clone());
                continue;
            }
            let op = Op::Slice {
                axis,
                start,
                end: start + (count - 1) * step + 1,
                step,
                backward: false,
            };
            let name = self.fresh_name(&stem, "slice");
            self.push(&name, op, &[&cur], BTreeMap::new())?;
            parts.push(name);
        }
        let mut out = parts[0].clone();
        if parts.len() > 1 {
            let names: Vec<&str> = parts.iter().map(String::as_str).collect();
            out = self.fresh_name(base, "concat");
            self.push(&out, Op::ConcatAt { axis }, &names, BTreeMap::new())?;
        }
        let mut gathered = x.onnx.clone();
        gathered[axis] = picks.len();
        if gathered != shape {
            out = self.reshape_to(base, &out, shape.clone())?;
        }
        self.bind(n, NodeRef::plain(out, &shape))
    }
}

/// Indices as runs `(start, count, step)` of evenly stepped, increasing positions.
fn runs(picks: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for &p in picks {
        if let Some((start, count, step)) = out.last_mut() {
            let last = *start + (*count - 1) * *step;
            if *count == 1 && p > last {
                *step = p - last;
                *count = 2;
                continue;
            }
            if *count > 1 && p > last && p - last == *step {
                *count += 1;
                continue;
            }
        }
        out.push((p, 1, 1));
    }
    out
}

/// Node kinds the importer dispatches here (from [`Builder::dispatch`]).
impl Builder {
    pub(super) fn constant_value(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let c = if let Some(t) = a.tensor("value") {
            Const::from_proto(t)?
        } else if let Some(f) = a.get("value_float") {
            Const::scalar(f64::from(f.f))
        } else if let Some(f) = a.get("value_floats") {
            Const {
                dims: vec![f.floats.len()],
                values: f.floats.iter().map(|&v| f64::from(v)).collect(),
            }
        } else if let Some(i) = a.get("value_int") {
            Const::scalar(i.i as f64)
        } else if let Some(i) = a.get("value_ints") {
            Const {
                dims: vec![i.ints.len()],
                values: i.ints.iter().map(|&v| v as f64).collect(),
            }
        } else {
            return err("a Constant without a supported value attribute");
        };
        self.bind_const(n, c)
    }

    pub(super) fn pass_through(&mut self, n: &NodeProto) -> Result<()> {
        if n.output.len() > 1 && self.uses.get(&n.output[1]).copied().unwrap_or(0) > 0 {
            return err("the dropout mask output is used, which Slim does not compute");
        }
        let v = self.value(n, 0)?.clone();
        let Some(out) = n.output.first().cloned() else {
            return err("it has no output");
        };
        self.values.insert(out, v);
        Ok(())
    }

    pub(super) fn shape(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        self.ints.extend(n.output.iter().cloned());
        let r = self.node_in(n, 0)?;
        // The batch size is not known at import: its entry is marked, and only a
        // Reshape's batch position may read it.
        let mut dims = vec![1.0];
        dims.extend(r.onnx.iter().map(|&d| d as f64));
        let (s, e) = shape_range(a, dims.len());
        let flags: Vec<bool> = (s..e).map(|i| i == 0).collect();
        if let (Some(out), true) = (n.output.first(), flags.contains(&true)) {
            self.batchy.insert(out.clone(), flags);
        }
        let values = dims[s..e].to_vec();
        self.bind_const(
            n,
            Const {
                dims: vec![values.len()],
                values,
            },
        )
    }

    pub(super) fn concat(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        // Empty parts (a split's empty rest) add nothing.
        let mut kept = n.clone();
        kept.input
            .retain(|i| !matches!(self.values.get(i), Some(Value::Const(c)) if c.numel() == 0));
        let n = &kept;
        if n.input.len() == 1 {
            let v = self.value(n, 0)?.clone();
            let out = n.output.first().cloned().unwrap_or_default();
            self.values.insert(out, v);
            return Ok(());
        }
        let xs = self.data_or_constants(n)?;
        let rank = xs[0].onnx.len() as i64 + 1;
        let axis = a.int("axis").unwrap_or(1);
        let axis = if axis < 0 { axis + rank } else { axis };
        let same = xs.iter().all(|x| self.shape_of(x) == x.onnx);
        if axis != 1 || xs[0].onnx.len() != 3 || !same {
            let axis = self.sample_axis(axis, rank)?;
            let names: Vec<String> = xs
                .iter()
                .map(|x| self.materialize(x))
                .collect::<Result<_>>()?;
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let name = self.fresh_name(base, "concat");
            let shape = self.push(&name, Op::ConcatAt { axis }, &names, BTreeMap::new())?;
            return self.bind(n, NodeRef::plain(name, &shape));
        }
        let names: Vec<&str> = xs.iter().map(|x| x.node.as_str()).collect();
        let name = self.fresh_name(base, "concat");
        let shape = self.push(&name, Op::Concat, &names, BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn flatten_op(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let axis = a.int("axis").unwrap_or(1);
        let axis = if axis < 0 { axis + rank } else { axis };
        if axis == 1 {
            return self.flatten(n, base, x);
        }
        err(format!(
            "Flatten from axis {axis} of a rank-{rank} value merges the batch axis into its rows; Slim keeps each sample apart"
        ))
    }

    pub(super) fn unshuffle(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let x = self.view_in(n, 0)?;
        let groups = self.swapped[&n.input[0]];
        let target = resolve_reshape(&x.onnx, &self.konst(n, 1)?.ints())?;
        if target != self.shape_of(&x) {
            return err(format!(
                "reshape of a swapped channel grid [N, {}] to [N, {}]; a channel shuffle reshapes it back to [N, C, H, W]",
                join(&x.onnx),
                join(&target)
            ));
        }
        let name = self.fresh_name(base, "shuffle");
        let op = Op::ChannelShuffle { groups };
        let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn transpose_op(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.view_in(n, 0)?;
        let rank = x.onnx.len() + 1;
        let perm: Vec<i64> = a
            .ints("perm")
            .unwrap_or_else(|| (0..rank as i64).rev().collect());
        let identity: Vec<i64> = (0..rank as i64).collect();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if sorted != identity {
            return err(format!(
                "Transpose with perm {perm:?} is not a permutation of the {rank} axes of a [N, {}] value",
                join(&x.onnx)
            ));
        }
        let slim = self.shape_of(&x);
        if perm == identity {
            return self.bind(n, x);
        }
        let grid = slim.len() == 3
            && x.onnx.len() == 4
            && x.onnx[2..] == slim[1..]
            && !self.swapped.contains_key(&n.input[0]);
        if grid && perm == [0, 2, 1, 3, 4] {
            let groups = x.onnx[0];
            let onnx = vec![x.onnx[1], x.onnx[0], x.onnx[2], x.onnx[3]];
            let out = n.output.first().cloned().unwrap_or_default();
            self.swapped.insert(out, groups);
            return self.bind(n, NodeRef { node: x.node, onnx });
        }
        if perm.first() != Some(&0) || self.swapped.contains_key(&n.input[0]) {
            return err(format!(
                "Transpose with perm {perm:?} of a [N, {}] value moves the batch axis",
                join(&x.onnx)
            ));
        }
        let node = self.materialize(&x)?;
        let perm: Vec<usize> = perm[1..].iter().map(|&p| p as usize - 1).collect();
        let name = self.fresh_name(base, "transpose");
        let shape = self.push(&name, Op::Transpose { perm }, &[&node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn reshape_op(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let total = slim_core::graph::elements(&x.onnx)
            .ok_or_else(|| OnnxError::Model(format!("a value of shape {:?}", x.onnx)))?;
        let target: Vec<usize> = match n.op_type.as_str() {
            "Reshape" => {
                let shape = self.konst(n, 1)?.ints();
                resolve_reshape(&x.onnx, &shape)?
            }
            "Squeeze" => {
                let axes = self.axes(n, a)?;
                let full: Vec<usize> = std::iter::once(1).chain(x.onnx.iter().copied()).collect();
                squeeze_dims(&full, axes.as_deref())?
                    .into_iter()
                    .skip(1)
                    .collect()
            }
            _ => {
                let axes = self.axes(n, a)?.unwrap_or_default();
                let rank = (x.onnx.len() + 1 + axes.len()) as i64;
                let mut axes: Vec<i64> = axes
                    .iter()
                    .map(|&v| if v < 0 { v + rank } else { v })
                    .collect();
                axes.sort_unstable();
                let mut full = vec![1usize];
                full.extend(&x.onnx);
                for ax in axes {
                    if ax < 1 || ax as usize > full.len() {
                        return err(format!(
                            "Unsqueeze at axis {ax}: Slim keeps the batch axis first"
                        ));
                    }
                    full.insert(ax as usize, 1);
                }
                full[1..].to_vec()
            }
        };
        if target.is_empty() {
            return err(format!(
                "it makes each sample of [N, {}] a scalar; Slim values keep an axis",
                join(&x.onnx)
            ));
        }
        let strip = |v: &[usize]| -> Vec<usize> {
            let keep = v.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
            v[..keep].to_vec()
        };
        let slim = self.shape_of(&x);
        let grid = n.op_type == "Reshape"
            && slim.len() == 3
            && target.len() == 4
            && target[2..] == slim[1..]
            && target[0] * target[1] == slim[0];
        if target == x.onnx {
            self.bind(n, x)
        } else if target == slim || grid {
            // Channels viewed as a [g, C/g] grid (a channel shuffle's first step), or
            // such a view turned back: the same Slim value.
            self.bind(
                n,
                NodeRef {
                    node: x.node,
                    onnx: target,
                },
            )
        } else if self.shape_of(&x).len() == 1 && strip(&target) == strip(&x.onnx) {
            // A vector viewed as [C, 1, 1] (or back): the same Slim value.
            self.bind(
                n,
                NodeRef {
                    node: x.node,
                    onnx: target,
                },
            )
        } else if target == [total] {
            self.flatten(n, base, x)
        } else {
            self.reshape(n, base, &x, target)
        }
    }

    pub(super) fn softmax(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let default = if self.opset < 13 { 1 } else { -1 };
        let axis = a.int("axis").unwrap_or(default);
        let axis = if axis < 0 { axis + rank } else { axis };
        // Before opset 13 the softmax runs over everything from `axis` on, which is
        // the channels when the spatial axes are ones (a pooled [N, C, 1, 1]).
        let flat_ok = x.onnx.iter().skip(1).all(|&d| d == 1);
        let last = axis == rank - 1;
        if axis == 1 && (self.opset >= 13 || rank <= 2 || flat_ok) {
            return self.unary(n, base, Op::Softmax);
        }
        if self.opset < 13 && !last {
            return err(format!(
                "Softmax (before opset 13) over the axes from {axis} on of a rank-{rank} value; Slim takes one axis"
            ));
        }
        let axis = self.sample_axis(axis, rank)?;
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "softmax");
        let shape = self.push(&name, Op::SoftmaxAt { axis }, &[&node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }
}
