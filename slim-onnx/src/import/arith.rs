//! Element-wise arithmetic at import: constants folded into the layer before or kept as a
//! per-channel affine or a constant tensor, broadcasting between data, and the activations
//! exporters write out (hardswish, hardsigmoid, SiLU, GELU, layer norm) recognized.

use super::*;

impl Builder {
    /// Arithmetic of data and a constant that is no per-channel vector: the constant is kept
    /// as a tensor that broadcasts against the value.
    pub(super) fn const_binary(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        c: &Const,
        kind: BinaryKind,
        reversed: bool,
    ) -> Result<()> {
        // A scale or shift after a layer norm that nothing else reads is its weight and bias.
        let value = n
            .input
            .iter()
            .find(|i| matches!(self.values.get(*i), Some(Value::Node(r)) if r.node == x.node))
            .cloned();
        let foldable = matches!(kind, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul)
            && !reversed
            && self.sole_producer(x, value.as_ref()).is_some_and(|id| {
                matches!(&self.nodes[id].op, Op::LayerNorm { shape, .. }
                    if c.numel() == 1 || (c.dims.iter().skip_while(|&&d| d == 1).copied().collect::<Vec<_>>() == *shape))
            });
        // A bias added to (or a scale of) a dense layer's outputs goes into the layer.
        let dense = matches!(kind, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul)
            && !reversed
            && self.sole_producer(x, value.as_ref()).is_some_and(|id| {
                matches!(&self.nodes[id].op, Op::Dense(l)
                    if c.numel() == 1 || (c.dims.iter().skip_while(|&&d| d == 1).copied().collect::<Vec<_>>() == [l.out_features]))
            });
        if dense {
            return self.fold_into_dense(n, x, c, kind, value.as_ref());
        }
        if foldable {
            return self.fold_into_layer_norm(n, x, c, kind, value.as_ref());
        }
        let r = self.const_arith(&sanitize(&display_name(n)), x, c, kind, reversed)?;
        self.bind(n, r)
    }

    /// A Slim node computing `x kind c` (`c kind x` when `reversed`) with the constant `c`
    /// kept as a tensor that broadcasts against the value.
    pub(super) fn const_arith(
        &mut self,
        base: &str,
        x: &NodeRef,
        c: &Const,
        kind: BinaryKind,
        reversed: bool,
    ) -> Result<NodeRef> {
        let mut dims = c.dims.clone();
        // A constant of the value's full rank carries a batch axis of one.
        if dims.len() == x.onnx.len() + 1 {
            if dims[0] != 1 {
                return err(format!(
                    "a constant of shape {:?} spans the batch axis",
                    c.dims
                ));
            }
            dims.remove(0);
        }
        if dims.is_empty() {
            dims.push(1);
        }
        let node = self.materialize(x)?;
        let name = self.fresh_name(base, "arith");
        let mut p = BTreeMap::new();
        p.insert(
            "value",
            Const {
                dims: dims.clone(),
                values: c.values.clone(),
            },
        );
        let op = Op::ConstBinary {
            kind,
            shape: dims,
            reversed,
        };
        let shape = self.push(&name, op, &[&node], p)?;
        Ok(NodeRef::plain(name, &shape))
    }

    /// A bias added to (or a scale of) the outputs of the dense layer that computes `x`,
    /// folded into the layer: its bias (and with a scale its weights) change.
    fn fold_into_dense(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        c: &Const,
        kind: BinaryKind,
        value: Option<&String>,
    ) -> Result<()> {
        let id = self.by_name[&x.node];
        if let Some(v) = value {
            self.values.remove(v);
        }
        let node = &mut self.nodes[id];
        let Op::Dense(l) = &mut node.op else {
            return err("a dense layer changed under the importer");
        };
        l.bias = true;
        let (out, inp) = (l.out_features, l.in_features);
        let at = |i: usize| {
            if c.numel() == 1 {
                c.values[0]
            } else {
                c.values[i]
            }
        };
        let bias = node.params.entry("bias").or_insert_with(|| Const {
            dims: vec![out],
            values: vec![0.0; out],
        });
        for (o, b) in bias.values.iter_mut().enumerate() {
            *b = match kind {
                BinaryKind::Mul => *b * at(o),
                BinaryKind::Add => *b + at(o),
                _ => *b - at(o),
            };
        }
        if kind == BinaryKind::Mul {
            if let Some(w) = node.params.get_mut("weight") {
                for (i, v) in w.values.iter_mut().enumerate() {
                    *v *= at(i / inp);
                }
            }
        }
        self.bind(n, x.clone())
    }

    /// A scale or shift after the layer norm that computes `x` (nothing else reads it): its
    /// weight and bias.
    fn fold_into_layer_norm(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        c: &Const,
        kind: BinaryKind,
        value: Option<&String>,
    ) -> Result<()> {
        let id = self.by_name[&x.node];
        if let Some(v) = value {
            self.values.remove(v);
        }
        let node = &mut self.nodes[id];
        let numel = node.params["weight"].numel();
        let at = |i: usize| {
            if c.numel() == 1 {
                c.values[0]
            } else {
                c.values[i]
            }
        };
        for i in 0..numel {
            let (w, b) = (
                node.params["weight"].values[i],
                node.params["bias"].values[i],
            );
            let (w, b) = match kind {
                BinaryKind::Mul => (w * at(i), b * at(i)),
                BinaryKind::Add => (w, b + at(i)),
                _ => (w, b - at(i)),
            };
            if let Some(p) = node.params.get_mut("weight") {
                p.values[i] = w;
            }
            if let Some(p) = node.params.get_mut("bias") {
                p.values[i] = b;
            }
        }
        self.bind(n, x.clone())
    }

    /// `(input, from, shape, eps)` when `d / s` is a layer norm written out (PyTorch's export):
    /// `d = x - mean(x)`, `s = sqrt(mean(d²) + eps)`, both means over the trailing axes.
    pub(super) fn layer_norm_parts(
        &self,
        d: &str,
        s: &str,
    ) -> Option<(String, usize, Vec<usize>, f64)> {
        let node = |name: &str| self.by_name.get(name).map(|&i| &self.nodes[i]);
        let (dn, sn) = (node(d)?, node(s)?);
        let (Op::Binary(BinaryKind::Sub), Op::Sqrt) = (&dn.op, &sn.op) else {
            return None;
        };
        let (x, mean) = (&dn.inputs[0], &dn.inputs[1]);
        let trailing = |n: &Pending| -> Option<usize> {
            match &n.op {
                Op::Reduce {
                    kind: ReduceKind::Mean,
                    axes,
                    keep: true,
                } => {
                    let rank = n.shape.len();
                    let from = axes[0];
                    (*axes == (from..rank).collect::<Vec<_>>()).then_some(from)
                }
                _ => None,
            }
        };
        let mn = node(mean)?;
        let from = trailing(mn)?;
        if mn.inputs[0] != *x {
            return None;
        }
        let (one, eps, var) = self.scalar_affine(&sn.inputs[0])?;
        let vn = node(&var)?;
        if one != 1.0 || trailing(vn)? != from {
            return None;
        }
        let sq = node(&vn.inputs[0])?;
        let squares = matches!(
            &sq.op,
            Op::ConstBinary {
                kind: BinaryKind::Pow,
                reversed: false,
                ..
            }
        ) && sq.params.get("value").is_some_and(|c| c.values == [2.0])
            && sq.inputs[0] == d;
        let shape = node(x)?.shape[from..].to_vec();
        (squares && eps >= 0.0).then(|| (x.clone(), from, shape, eps))
    }

    /// Arithmetic of two data values whose shapes broadcast.
    pub(super) fn data_binary(
        &mut self,
        n: &NodeProto,
        base: &str,
        x: &NodeRef,
        y: &NodeRef,
        kind: BinaryKind,
    ) -> Result<()> {
        if kind == BinaryKind::Div {
            if let Some((input, from, shape, eps)) = self.layer_norm_parts(&x.node, &y.node) {
                let name = self.fresh_name(base, "layernorm");
                let numel: usize = shape.iter().product();
                let p = BTreeMap::from([
                    (
                        "weight",
                        Const {
                            dims: shape.clone(),
                            values: vec![1.0; numel],
                        },
                    ),
                    (
                        "bias",
                        Const {
                            dims: shape.clone(),
                            values: vec![0.0; numel],
                        },
                    ),
                ]);
                let op = Op::LayerNorm { from, shape, eps };
                let out = self.push(&name, op, &[&input], p)?;
                return self.bind(n, NodeRef::plain(name, &out));
            }
        }
        let (a, b) = (self.materialize(x)?, self.materialize(y)?);
        let name = self.fresh_name(base, kind.onnx());
        let shape = self.push(&name, Op::Binary(kind), &[&a, &b], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn pow(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        match (self.value(n, 0)?.clone(), self.value(n, 1)?.clone()) {
            (Value::Node(x), Value::Const(c)) if c.numel() == 1 && c.values[0] == 1.0 => {
                self.bind(n, x)
            }
            (Value::Node(x), Value::Const(c)) => {
                self.const_binary(n, &x, &c, BinaryKind::Pow, false)
            }
            (Value::Const(c), Value::Node(x)) => {
                self.const_binary(n, &x, &c, BinaryKind::Pow, true)
            }
            (Value::Node(x), Value::Node(y)) => self.data_binary(n, base, &x, &y, BinaryKind::Pow),
            _ => err("a Pow of two constants"),
        }
    }

    /// ONNX's Max and Min, of one value or more: pairwise from the left, a constant operand
    /// as a constant binary op, two data operands as a binary op.
    pub(super) fn extreme(&mut self, n: &NodeProto, base: &str, kind: BinaryKind) -> Result<()> {
        let Some(first) = n.input.first() else {
            return err(format!("{} of no values", kind.onnx()));
        };
        let mut acc = first.clone();
        for (i, next) in n.input.iter().enumerate().skip(1) {
            let last = i + 1 == n.input.len();
            let out = match last {
                true => n.output.first().cloned().unwrap_or_default(),
                false => format!(
                    "{}#{}{i}",
                    n.output.first().map_or("", |o| o.as_str()),
                    kind.onnx()
                ),
            };
            let step = NodeProto {
                input: vec![acc, next.clone()],
                output: vec![out.clone()],
                ..n.clone()
            };
            match (self.value(&step, 0)?.clone(), self.value(&step, 1)?.clone()) {
                (Value::Node(x), Value::Const(c)) => {
                    self.const_binary(&step, &x, &c, kind, false)?
                }
                (Value::Const(c), Value::Node(x)) => {
                    self.const_binary(&step, &x, &c, kind, true)?
                }
                (Value::Node(x), Value::Node(y)) => self.data_binary(&step, base, &x, &y, kind)?,
                (Value::Const(_), Value::Const(_)) => {
                    let c = self.binary_const(&step)?;
                    self.bind_const(&step, c)?
                }
            }
            acc = out;
        }
        if n.input.len() == 1 {
            let x = self.node_in(n, 0)?;
            return self.bind(n, x);
        }
        Ok(())
    }

    pub(super) fn add(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let vals: Vec<Value> = (0..n.input.len())
            .map(|i| self.value(n, i).cloned())
            .collect::<Result<_>>()?;
        let nodes: Vec<NodeRef> = vals
            .iter()
            .filter_map(|v| match v {
                Value::Node(r) => Some(r.clone()),
                Value::Const(_) => None,
            })
            .collect();
        let consts: Vec<Const> = vals
            .iter()
            .filter_map(|v| match v {
                Value::Const(c) => Some(c.clone()),
                Value::Node(_) => None,
            })
            .collect();
        if let ([x], []) = (nodes.as_slice(), consts.as_slice()) {
            // A Sum of one value.
            return self.bind(n, x.clone());
        }
        if consts.is_empty() {
            return self.sum(n, base, &nodes);
        }
        if nodes.len() != 1 {
            return err("an Add of several data values and constants");
        }
        // The constants of a Sum added up first.
        let mut c = consts[0].clone();
        for more in &consts[1..] {
            let dims = slim_core::graph::broadcast_shape(&c.dims, &more.dims).ok_or_else(|| {
                OnnxError::Model(format!(
                    "constants of shapes {:?} and {:?} do not broadcast",
                    c.dims, more.dims
                ))
            })?;
            let (p, q) = (broadcast_values(&c, &dims), broadcast_values(more, &dims));
            let values = p
                .iter()
                .zip(&q)
                .map(|(a, b)| f64::from((a + b) as f32))
                .collect();
            c = Const { dims, values };
        }
        let (x, c) = (nodes[0].clone(), &c);
        match self.per_channel_of(&x, c, "adds") {
            Ok(shift) => self.affine(n, x, vec![1.0], shift),
            Err(_) => self.const_binary(n, &x, c, BinaryKind::Add, false),
        }
    }

    /// The element-wise sum of data values of one shape.
    pub(super) fn sum(&mut self, n: &NodeProto, base: &str, nodes: &[NodeRef]) -> Result<()> {
        if let [x, y] = nodes {
            if x.onnx != y.onnx {
                return self.data_binary(n, base, x, y, BinaryKind::Add);
            }
        }
        if nodes.iter().any(|r| r.onnx != nodes[0].onnx) {
            return err("an Add of different shapes (broadcasting between data is not supported)");
        }
        let names: Vec<&str> = nodes.iter().map(|r| r.node.as_str()).collect();
        let name = self.fresh_name(base, "add");
        self.push(&name, Op::Add, &names, BTreeMap::new())?;
        let onnx = nodes[0].onnx.clone();
        self.bind(n, NodeRef { node: name, onnx })
    }

    pub(super) fn sub(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        match (self.value(n, 0)?.clone(), self.value(n, 1)?.clone()) {
            (Value::Node(x), Value::Const(c)) => match self.per_channel_of(&x, &c, "subtracts") {
                Ok(shift) => self.affine(n, x, vec![1.0], shift.iter().map(|v| -v).collect()),
                Err(_) => self.const_binary(n, &x, &c, BinaryKind::Sub, false),
            },
            (Value::Const(c), Value::Node(x)) => {
                match self.per_channel_of(&x, &c, "subtracts from") {
                    Ok(shift) => self.affine(n, x, vec![-1.0], shift),
                    Err(_) => self.const_binary(n, &x, &c, BinaryKind::Sub, true),
                }
            }
            (Value::Node(x), Value::Node(y)) if x.onnx != y.onnx || self.shape_of(&y) != y.onnx => {
                self.data_binary(n, base, &x, &y, BinaryKind::Sub)
            }
            (Value::Node(x), Value::Node(y)) => {
                // x - y as x + (-1 · y).
                let neg = self.fresh_name(&format!("{base}.neg"), "neg");
                let channels = y.onnx[0];
                let params = affine_params(channels, &[-1.0], &[0.0]);
                self.push(&neg, Op::ChannelAffine { channels }, &[&y.node], params)?;
                let y = NodeRef {
                    node: neg,
                    onnx: y.onnx,
                };
                self.sum(n, base, &[x, y])
            }
            _ => err("a Sub of two constants"),
        }
    }

    pub(super) fn div(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        match (self.value(n, 0)?.clone(), self.value(n, 1)?.clone()) {
            (Value::Node(x), Value::Const(c)) => match self.per_channel_of(&x, &c, "divides by") {
                Ok(d) => {
                    if d.iter().any(|&v| v == 0.0 || !v.is_finite()) {
                        return err("it divides by zero or by a value that is not finite");
                    }
                    self.affine(n, x, d.iter().map(|v| 1.0 / v).collect(), vec![0.0])
                }
                Err(_) => self.const_binary(n, &x, &c, BinaryKind::Div, false),
            },
            (Value::Const(c), Value::Node(x)) => {
                self.const_binary(n, &x, &c, BinaryKind::Div, true)
            }
            (Value::Node(x), Value::Node(y)) => self.data_binary(n, base, &x, &y, BinaryKind::Div),
            _ => err("a Div of two constants"),
        }
    }

    pub(super) fn mul(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let (a, b) = (self.value(n, 0)?.clone(), self.value(n, 1)?.clone());
        match (a, b) {
            (Value::Node(x), Value::Node(y)) => {
                if let Some(done) = self.recognize_product(n, base, &x, &y)? {
                    return Ok(done);
                }
                // The gate (the per-channel vector) goes second.
                let (x, y) = if x.onnx.len() == 3
                    && y.onnx.len() == 3
                    && x.onnx[1..] == [1, 1]
                    && y.onnx[1..] != [1, 1]
                {
                    (y, x)
                } else {
                    (x, y)
                };
                let (sa, sb) = (self.shape_of(&x), self.shape_of(&y));
                let gate = sa.len() == 3 && (sb == [sa[0]] || sb == [sa[0], 1, 1]);
                if !((sa == sb && x.onnx == y.onnx) || gate) {
                    return self.data_binary(n, base, &x, &y, BinaryKind::Mul);
                }
                let name = self.fresh_name(base, "mul");
                self.push(&name, Op::Mul, &[&x.node, &y.node], BTreeMap::new())?;
                let onnx = x.onnx.clone();
                self.bind(n, NodeRef { node: name, onnx })
            }
            (Value::Node(x), Value::Const(c)) | (Value::Const(c), Value::Node(x)) => {
                match self.per_channel_of(&x, &c, "multiplies") {
                    Ok(scale) => self.affine(n, x, scale, vec![0.0]),
                    Err(_) => self.const_binary(n, &x, &c, BinaryKind::Mul, false),
                }
            }
            _ => err("a Mul of two constants"),
        }
    }

    /// A constant as one value per channel of `x` (a scalar stays one value).
    pub(super) fn per_channel_of(&self, x: &NodeRef, c: &Const, what: &str) -> Result<Vec<f64>> {
        if c.numel() == 1 {
            return Ok(vec![c.values[0]]);
        }
        let Some(&channels) = x.onnx.first() else {
            return err(format!(
                "it {what} a constant, and its input has no channel axis"
            ));
        };
        c.per_channel(channels, x.onnx.len()).ok_or_else(|| {
            OnnxError::Model(format!(
                "it {what} a constant of shape {:?} that is not one value or one per channel of a [{}] value",
                c.dims,
                join(&x.onnx)
            ))
        })
    }

    /// The pending node that computes `r`, when nothing but the ONNX value `value` reads it.
    pub(super) fn sole_producer(&self, r: &NodeRef, value: Option<&String>) -> Option<usize> {
        let shared = value.is_none_or(|o| self.uses.get(o).copied().unwrap_or(0) > 1)
            || self.nodes.iter().any(|p| p.inputs.contains(&r.node))
            || self
                .values
                .values()
                .filter(|v| matches!(v, Value::Node(o) if o.node == r.node))
                .count()
                > 1;
        (!shared).then(|| self.by_name[&r.node])
    }

    /// Binds `n`'s output to `x * scale + shift` (each one value, or one per channel): folded
    /// into the layer that computes `x` when nothing else reads it (a convolution, linear
    /// layer, batch norm or per-channel affine), recognized as a hard sigmoid after a ReLU6,
    /// else a new per-channel affine node.
    pub(super) fn affine(
        &mut self,
        n: &NodeProto,
        x: NodeRef,
        scale: Vec<f64>,
        shift: Vec<f64>,
    ) -> Result<()> {
        if scale.iter().all(|&s| s == 1.0) && shift.iter().all(|&b| b == 0.0) {
            return self.bind(n, x);
        }
        let Some(&channels) = x.onnx.first() else {
            return err("an arithmetic constant on a value with no channel axis");
        };
        let expand = |v: &[f64]| -> Vec<f64> {
            if v.len() == 1 {
                vec![v[0]; channels]
            } else {
                v.to_vec()
            }
        };
        let (scale_c, shift_c) = (expand(&scale), expand(&shift));
        let value = n
            .input
            .iter()
            .find(|i| matches!(self.values.get(*i), Some(Value::Node(r)) if r.node == x.node));
        if let Some(id) = self.sole_producer(&x, value) {
            // The value read here is read nowhere else: once folded, it is gone.
            if let Some(v) = value.cloned() {
                self.values.remove(&v);
            }
            if self.affine_into_layer(n, &x, id, &scale_c, &shift_c)? {
                return Ok(());
            }
        }
        // s · relu6(z) with 6s = 1 is a hard sigmoid (a scalar affine before the ReLU6 goes
        // into it): exporters write PyTorch's hardsigmoid as Add 3, Clip 0..6, Div 6.
        if let (&[s], &[0.0]) = (&scale[..], &shift[..]) {
            if self.affine_hardsigmoid(n, &x, s)? {
                return Ok(());
            }
        }
        let name = self.fresh_name(&sanitize(&display_name(n)), "affine");
        let params = affine_params(channels, &scale_c, &shift_c);
        self.push(&name, Op::ChannelAffine { channels }, &[&x.node], params)?;
        self.bind(
            n,
            NodeRef {
                node: name,
                onnx: x.onnx,
            },
        )
    }

    /// Folds `x * scale + shift` (one per channel) into the layer `id` that computes `x` when it
    /// is a convolution, linear layer, batch norm or per-channel affine; `false` otherwise.
    fn affine_into_layer(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        id: usize,
        scale_c: &[f64],
        shift_c: &[f64],
    ) -> Result<bool> {
        let channels = scale_c.len();
        let node = &mut self.nodes[id];
        if matches!(
            node.op,
            Op::Conv2d(_) | Op::Linear(_) | Op::BatchNorm2d(_) | Op::ChannelAffine { .. }
        ) {
            match &mut node.op {
                Op::Conv2d(s) => s.bias = true,
                Op::Linear(s) => s.bias = true,
                _ => {}
            }
            if let Some(w) = node.params.get_mut("weight") {
                let per = (w.numel() / channels).max(1);
                for (i, v) in w.values.iter_mut().enumerate() {
                    *v *= scale_c[i / per];
                }
            }
            let bias = node.params.entry("bias").or_insert_with(|| Const {
                dims: vec![channels],
                values: vec![0.0; channels],
            });
            for ((b, s), t) in bias.values.iter_mut().zip(scale_c).zip(shift_c) {
                *b = *b * s + t;
            }
            // An affine that became the identity is passed over.
            if let Op::ChannelAffine { .. } = node.op {
                // (within f32 rounding: 6 · 0.16666667 is not quite 1)
                let one = |w: f64| (w - 1.0).abs() <= 2.0 * f64::from(f32::EPSILON);
                let identity = node.params["weight"].values.iter().all(|&w| one(w))
                    && node.params["bias"].values.iter().all(|&b| b == 0.0);
                if identity {
                    let input = node.inputs[0].clone();
                    let onnx = x.onnx.clone();
                    self.bind(n, NodeRef { node: input, onnx })?;
                    return Ok(true);
                }
            }
            self.bind(n, x.clone())?;
            return Ok(true);
        }
        Ok(false)
    }

    /// `s · relu6(z)` with `6s = 1`, bound as a hard sigmoid (a scalar affine before the ReLU6
    /// goes into it): exporters write PyTorch's hardsigmoid as Add 3, Clip 0..6, Div 6.
    fn affine_hardsigmoid(&mut self, n: &NodeProto, x: &NodeRef, s: f64) -> Result<bool> {
        let producer = &self.nodes[self.by_name[&x.node]];
        if matches!(producer.op, Op::Relu6) && close(6.0 * s, 1.0) {
            let z = producer.inputs[0].clone();
            let (alpha, beta, z) = match self.scalar_affine(&z) {
                Some((s1, t1, w)) => (s * s1, s * t1, w),
                None => (s, 0.0, z),
            };
            let name = self.fresh_name(&sanitize(&display_name(n)), "hardsigmoid");
            let op = Op::HardSigmoid {
                alpha: alpha as f32,
                beta: beta as f32,
            };
            self.push(&name, op, &[&z], BTreeMap::new())?;
            self.bind(
                n,
                NodeRef {
                    node: name,
                    onnx: x.onnx.clone(),
                },
            )?;
            return Ok(true);
        }
        Ok(false)
    }

    /// `(scale, shift, input)` of a per-channel affine node with one scale and one shift.
    pub(super) fn scalar_affine(&self, node: &str) -> Option<(f64, f64, String)> {
        let p = &self.nodes[*self.by_name.get(node)?];
        if !matches!(p.op, Op::ChannelAffine { .. }) {
            return None;
        }
        let (w, b) = (
            &p.params.get("weight")?.values,
            &p.params.get("bias")?.values,
        );
        let same = |v: &[f64]| v.iter().all(|&a| a == v[0]);
        (same(w) && same(b)).then(|| (w[0], b[0], p.inputs[0].clone()))
    }

    /// The op of the pending node `node` and its first input.
    pub(super) fn op_of(&self, node: &str) -> Option<(&Op, &str)> {
        let p = &self.nodes[*self.by_name.get(node)?];
        Some((&p.op, p.inputs.first().map(|s| s.as_str()).unwrap_or("")))
    }

    /// Recognizes the products exporters write for named activations: `x · sigmoid(x)`
    /// (SiLU), `x · hardsigmoid(x)` (hardswish), `x · relu6(x + 3)` (6 · hardswish),
    /// `x · (1 + erf(x / √2))` (2 · GELU). Returns `Some` when it bound the output.
    pub(super) fn recognize_product(
        &mut self,
        n: &NodeProto,
        base: &str,
        a: &NodeRef,
        b: &NodeRef,
    ) -> Result<Option<()>> {
        for (x, g) in [(a, b), (b, a)] {
            let Some((op, input)) = self.op_of(&g.node) else {
                continue;
            };
            let reads_x = input == x.node;
            let found = match op {
                Op::Sigmoid if reads_x => Some((Op::Silu, 1.0)),
                Op::HardSigmoid { alpha, beta }
                    if reads_x
                        && close(f64::from(*alpha) * 6.0, 1.0)
                        && close(f64::from(*beta), 0.5) =>
                {
                    Some((Op::HardSwish, 1.0))
                }
                Op::Relu6 => match self.scalar_affine(input) {
                    Some((s, t, z)) if z == x.node && s == 1.0 && t == 3.0 => {
                        Some((Op::HardSwish, 6.0))
                    }
                    _ => None,
                },
                Op::ChannelAffine { .. } => match self.scalar_affine(&g.node) {
                    Some((1.0, 1.0, e)) => match self.op_of(&e) {
                        Some((Op::Erf, inner)) => match self.scalar_affine(inner) {
                            Some((s, 0.0, z))
                                if z == x.node && close(s, std::f64::consts::FRAC_1_SQRT_2) =>
                            {
                                Some((Op::Gelu, 2.0))
                            }
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            };
            let Some((op, factor)) = found else {
                continue;
            };
            let name = self.fresh_name(base, op.kind());
            self.push(&name, op, &[&x.node], BTreeMap::new())?;
            let r = NodeRef {
                node: name,
                onnx: x.onnx.clone(),
            };
            if factor == 1.0 {
                self.bind(n, r)?;
            } else {
                let channels = r.onnx[0];
                let scaled = self.fresh_name(&format!("{base}.scale"), "scale");
                let params = affine_params(channels, &[factor], &[0.0]);
                self.push(&scaled, Op::ChannelAffine { channels }, &[&r.node], params)?;
                self.bind(
                    n,
                    NodeRef {
                        node: scaled,
                        onnx: r.onnx,
                    },
                )?;
            }
            return Ok(Some(()));
        }
        Ok(None)
    }
}

/// The `weight` and `bias` of a per-channel affine node (one value repeated, or one per
/// channel).
pub(super) fn affine_params(
    channels: usize,
    scale: &[f64],
    shift: &[f64],
) -> BTreeMap<&'static str, Const> {
    let full = |v: &[f64]| Const {
        dims: vec![channels],
        values: if v.len() == 1 {
            vec![v[0]; channels]
        } else {
            v.to_vec()
        },
    };
    BTreeMap::from([("weight", full(scale)), ("bias", full(shift))])
}

/// Equal up to f32 rounding: constants such as 1/6 and 1/√2 come as f32.
pub(super) fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// Node kinds the importer dispatches here (from [`Builder::dispatch`]).
impl Builder {
    pub(super) fn clip(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let (lo, hi) = if self.opset < 11 {
            (a.float("min").map(f64::from), a.float("max").map(f64::from))
        } else {
            let one = |c: Option<Const>| -> Result<Option<f64>> {
                match c {
                    None => Ok(None),
                    Some(c) if c.numel() == 1 => Ok(Some(c.values[0])),
                    Some(_) => err("Clip bounds must be scalars"),
                }
            };
            (one(self.opt_const(n, 1)?)?, one(self.opt_const(n, 2)?)?)
        };
        let big = |v: Option<f64>| v.is_none_or(|v| v >= 3.0e38);
        let small = |v: Option<f64>| v.is_none_or(|v| v <= -3.0e38);
        match lo {
            // ONNX clips to the upper bound when the bounds cross: every value is it.
            Some(l) if hi.is_some_and(|h| l > h) => {
                let x = self.node_in(n, 0)?;
                let fill = Const {
                    values: vec![hi.unwrap_or(l); x.onnx.iter().product()],
                    dims: x.onnx.clone(),
                };
                let r = self.constant_node(base, &fill, x.onnx.len() + 1)?;
                self.bind(n, r)
            }
            Some(l) if l == 0.0 && hi == Some(6.0) => self.unary(n, base, Op::Relu6),
            Some(l) if l == 0.0 && big(hi) => self.unary(n, base, Op::Relu),
            _ => {
                let bound =
                    |v: Option<f64>, open: bool| (!open).then(|| v.map(|v| v as f32)).flatten();
                let op = Op::Clip {
                    min: bound(lo, small(lo)),
                    max: bound(hi, big(hi)),
                };
                self.unary(n, base, op)
            }
        }
    }

    pub(super) fn prelu(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let slope = self.konst(n, 1)?;
        let channels = x.onnx[0];
        let Some(v) = slope.per_channel(channels, x.onnx.len()) else {
            return self.prelu_broadcast(n, base, &x, &slope);
        };
        let mut p = BTreeMap::new();
        p.insert(
            "weight",
            Const {
                dims: vec![channels],
                values: v,
            },
        );
        self.emit_keep(n, base, Op::PRelu { channels }, &[&x], p)
    }

    /// PRelu whose slope broadcasts over other axes than the channels (a slope per position):
    /// `relu(x) + slope · (x − relu(x))`.
    fn prelu_broadcast(
        &mut self,
        n: &NodeProto,
        base: &str,
        x: &NodeRef,
        slope: &Const,
    ) -> Result<()> {
        let mut dims = slope.dims.clone();
        // A slope of the value's full rank carries a batch axis of one.
        if dims.len() == x.onnx.len() + 1 && dims[0] == 1 {
            dims.remove(0);
        }
        let fits = dims.len() <= x.onnx.len()
            && slim_core::graph::broadcast_shape(&x.onnx, &dims).as_deref() == Some(&x.onnx[..]);
        if !fits {
            return err(format!(
                "its slope of shape {:?} does not broadcast over a [N, {}] value",
                slope.dims,
                join(&x.onnx)
            ));
        }
        let src = self.materialize(x)?;
        let relu = self.fresh_name(&format!("{base}.relu"), "relu");
        self.push(&relu, Op::Relu, &[&src], BTreeMap::new())?;
        let below = self.fresh_name(&format!("{base}.below"), "sub");
        let op = Op::Binary(BinaryKind::Sub);
        self.push(&below, op, &[&src, &relu], BTreeMap::new())?;
        let scaled = self.fresh_name(&format!("{base}.scaled"), "mul");
        let value = Const {
            dims: dims.clone(),
            values: slope.values.clone(),
        };
        let op = Op::ConstBinary {
            kind: BinaryKind::Mul,
            shape: dims,
            reversed: false,
        };
        self.push(&scaled, op, &[&below], BTreeMap::from([("value", value)]))?;
        let name = self.fresh_name(base, "prelu");
        let shape = self.push(&name, Op::Add, &[&relu, &scaled], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }
}
