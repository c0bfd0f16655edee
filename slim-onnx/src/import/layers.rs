//! Layers with windows and weights at import: convolutions (plain and transposed), linear
//! layers, pooling, padding and resizing.

use super::*;

impl Builder {
    pub(super) fn conv(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let w = self.konst(n, 1)?;
        let b = self.opt_const(n, 2)?;
        if w.dims.len() == 3 && x.onnx.len() == 2 {
            return self.conv1d(n, a, &x, &w);
        }
        if w.dims.len() != 4 {
            return err(format!(
                "weight of shape {:?}; Slim convolutions are 1-D or 2-D",
                w.dims
            ));
        }
        let (o, ipg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let groups = sizes("group", &[a.int("group").unwrap_or(1)], 1)?[0];
        let name = self.layer_name(n, 1);
        let strides = sizes("strides", &a.ints("strides").unwrap_or(vec![1, 1]), 1)?;
        let dil = sizes("dilations", &a.ints("dilations").unwrap_or(vec![1, 1]), 1)?;
        if x.onnx.len() == 1
            || x.onnx.len() == 3 && x.onnx[1..] == [1, 1] && self.shape_of(&x).len() == 1
        {
            return self.conv_on_vector(n, &x, w, b, groups);
        }
        if x.onnx.len() != 3 {
            return err(format!(
                "input of per-sample shape {:?}; Slim convolutions take [C, H, W]",
                x.onnx
            ));
        }
        let [sh, sw] = strides[..] else {
            return err(format!("strides {strides:?} for a 2-D convolution"));
        };
        if dil.len() != 2 || dil[0] != dil[1] {
            return err(format!(
                "dilations {dil:?}; Slim needs one dilation for both axes"
            ));
        }
        let d = dil[0];
        let (x, pads) = self.conv_padding(n, a, x, [kh, kw], [sh, sw], d)?;
        // Unequal strides (a text recognizer's (2, 1)): the convolution at the smaller one
        // where it divides the larger, else at 1, then the rows or columns taken stepwise.
        let s = match sh.min(sw) {
            m if sh.max(sw) % m == 0 => m,
            _ => 1,
        };
        let spec = Conv2dSpec {
            in_channels: ipg * groups,
            out_channels: o,
            kernel: [kh, kw],
            stride: s,
            padding: pads,
            dilation: d,
            groups,
            bias: b.is_some(),
        };
        if let Some(b) = &b {
            if b.numel() != o {
                return err(format!(
                    "bias has {} values for {o} output channels",
                    b.numel()
                ));
            }
        }
        let mut p = BTreeMap::new();
        p.insert("weight", w);
        if let Some(b) = b {
            p.insert(
                "bias",
                Const {
                    dims: vec![o],
                    values: b.values,
                },
            );
        }
        if [sh, sw] == [s, s] {
            return self.emit(n, &name, Op::Conv2d(spec), &[&x.node], p);
        }
        let conv = self.fresh_name(&name, "conv");
        let mut shape = self.push(&conv, Op::Conv2d(spec), &[&x.node], p)?;
        let mut cur = conv;
        for (axis, stride) in [(1, sh), (2, sw)] {
            if stride == s {
                continue;
            }
            let name = self.fresh_name(&format!("{cur}.every_{}", stride / s), "slice");
            let op = Op::Slice {
                axis,
                start: 0,
                end: shape[axis],
                step: stride / s,
                backward: false,
            };
            shape = self.push(&name, op, &[&cur], BTreeMap::new())?;
            cur = name;
        }
        self.bind(n, NodeRef::plain(cur, &shape))
    }

    /// A convolution on a pooled `[C]` (or `[C, 1, 1]`) vector: a 1x1 convolution is a linear
    /// layer, so squeeze-and-excite blocks stay prunable.
    fn conv_on_vector(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        w: Const,
        b: Option<Const>,
        groups: usize,
    ) -> Result<()> {
        let (o, ipg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let name = self.layer_name(n, 1);
        if kh == 1 && kw == 1 && groups == 1 {
            let weight = Const {
                dims: vec![o, ipg],
                values: w.values.clone(),
            };
            let name_ok = name.clone();
            let xs = NodeRef {
                node: x.node.clone(),
                onnx: vec![x.onnx[0]],
            };
            self.linear(n, &name_ok, xs, weight, b)?;
            if let Some(Value::Node(r)) = self.values.get_mut(&n.output[0]) {
                r.onnx = vec![o, 1, 1];
            }
            return Ok(());
        }
        err("a convolution other than 1x1 on a pooled [C, 1, 1] value")
    }

    /// A convolution's input and its padding on every side: a zero Pad before it (tf2onnx)
    /// joins its own, and what one side has beyond the others becomes a Pad node.
    fn conv_padding(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        mut x: NodeRef,
        [kh, kw]: [usize; 2],
        strides: [usize; 2],
        d: usize,
    ) -> Result<(NodeRef, usize)> {
        let (h, wd) = (x.onnx[1], x.onnx[2]);
        let axes = pads_of_axes(a, &[h, wd], &[kh, kw], &strides, &[d, d])?;
        let mut sides = [axes[0].0, axes[1].0, axes[0].1, axes[1].1];
        // Zero padding written as a Pad before the convolution (tf2onnx) joins its own.
        if let Some((
            &Op::Pad {
                pads,
                mode: PadMode::Constant(v),
            },
            input,
        )) = self.op_of(&x.node)
        {
            if v == 0.0 {
                let input = input.to_string();
                let shape = self.nodes[self.by_name[&input]].shape.clone();
                for (side, extra) in sides.iter_mut().zip(pads) {
                    *side += extra;
                }
                x = NodeRef::plain(input, &shape);
            }
        }
        // One padding on every side; what one side has beyond it is a Pad node.
        let pads = *sides.iter().min().unwrap_or(&0);
        let extra = sides.map(|p| p - pads);
        if extra != [0; 4] {
            let name = self.fresh_name(&format!("{}.pad", self.layer_name(n, 1)), "pad");
            let op = Op::Pad {
                pads: extra,
                mode: PadMode::Constant(0.0),
            };
            let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
            x = NodeRef::plain(name, &shape);
        }
        Ok((x, pads))
    }

    /// A 1-D convolution of `[C, L]` values: a 2-D one of height one (kernel `[1, k]`)
    /// between reshapes, its padding a Pad of the width.
    fn conv1d(&mut self, n: &NodeProto, a: &Attrs, x: &NodeRef, w: &Const) -> Result<()> {
        let (c, len) = (x.onnx[0], x.onnx[1]);
        let stem = sanitize(&display_name(n));
        let shape = vec![c, 1, len];
        let plane = self.reshape_to(&format!("{stem}.as_2d"), &x.node, shape.clone())?;
        let one = |name: &str| -> Result<Option<i64>> {
            match a.ints(name).as_deref() {
                None => Ok(None),
                Some([v]) => Ok(Some(*v)),
                Some(v) => err(format!("{name} {v:?} for a 1-D convolution")),
            }
        };
        let (stride, dil) = (one("strides")?.unwrap_or(1), one("dilations")?.unwrap_or(1));
        let mut n2 = n.clone();
        let mut attrs: Vec<AttributeProto> = n
            .attribute
            .iter()
            .filter(|at| {
                !matches!(
                    at.name.as_str(),
                    "kernel_shape" | "strides" | "dilations" | "pads"
                )
            })
            .cloned()
            .collect();
        let ints = |name: &str, v: Vec<i64>| AttributeProto {
            name: name.into(),
            r#type: crate::proto::attribute_type::INTS,
            ints: v,
            ..Default::default()
        };
        attrs.push(ints("strides", vec![stride, stride]));
        attrs.push(ints("dilations", vec![dil, dil]));
        if let Some(p) = a.ints("pads") {
            let [p0, p1] = p[..] else {
                return err(format!("pads {p:?} for a 1-D convolution"));
            };
            attrs.push(ints("pads", vec![0, p0, 0, p1]));
        }
        n2.attribute = attrs;
        let (x2, w2) = (format!("{stem}#plane"), format!("{}#plane", n.input[1]));
        self.values
            .insert(x2.clone(), Value::Node(NodeRef::plain(plane, &shape)));
        let w4 = Const {
            dims: vec![w.dims[0], w.dims[1], 1, w.dims[2]],
            values: w.values.clone(),
        };
        self.values.insert(w2.clone(), Value::Const(w4));
        n2.input[0] = x2;
        n2.input[1] = w2;
        let y2 = format!("{stem}#conv_plane");
        n2.output = vec![y2.clone()];
        self.conv(&n2, &Attrs(&n2.attribute))?;
        let Some(Value::Node(y)) = self.values.get(&y2).cloned() else {
            return err("the 1-D convolution computed nothing");
        };
        let out = vec![y.onnx[0], y.onnx[2]];
        self.reshape(n, &format!("{stem}.as_1d"), &y, out)
    }

    pub(super) fn conv_transpose(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let w = self.konst(n, 1)?;
        let b = self.opt_const(n, 2)?;
        // A 1-D transposed convolution is a 2-D one of height one between reshapes.
        let spatial = x.onnx.len().saturating_sub(1);
        if !matches!(spatial, 1 | 2) || w.dims.len() != spatial + 2 {
            return err(format!(
                "input [N, {}] and weight {:?}; Slim's transposed convolutions are 1-D or 2-D",
                join(&x.onnx),
                w.dims
            ));
        }
        let (ci, opg) = (w.dims[0], w.dims[1]);
        let groups = sizes("group", &[a.int("group").unwrap_or(1)], 1)?[0];
        let geometry = transpose_geometry(a, &x.onnx[1..], &w.dims[2..])?;
        let lift = |v: &[usize], unit: usize| -> [usize; 2] {
            match v {
                [one] => [unit, *one],
                _ => [v[0], v[1]],
            }
        };
        let (before, after): (Vec<usize>, Vec<usize>) = geometry.pads.iter().copied().unzip();
        let ([top, left], [bottom, right]) = (lift(&before, 0), lift(&after, 0));
        let spec = ConvTransposeSpec {
            in_channels: ci,
            out_channels: opg * groups,
            kernel: lift(&w.dims[2..], 1),
            stride: lift(&geometry.stride, 1),
            pads: [top, left, bottom, right],
            output_padding: lift(&geometry.output_padding, 0),
            dilation: geometry.dilation,
            groups,
            bias: b.is_some(),
        };
        let w = Const {
            dims: vec![ci, opg, spec.kernel[0], spec.kernel[1]],
            values: w.values,
        };
        let mut p = BTreeMap::new();
        p.insert("weight", w);
        if let Some(b) = b {
            if b.numel() != opg * groups {
                return err(format!(
                    "bias has {} values for {} outputs",
                    b.numel(),
                    opg * groups
                ));
            }
            p.insert(
                "bias",
                Const {
                    dims: vec![opg * groups],
                    values: b.values,
                },
            );
        }
        let name = self.layer_name(n, 1);
        if spatial == 2 {
            return self.emit(n, &name, Op::ConvTranspose2d(spec), &[&x.node], p);
        }
        let (c, len) = (x.onnx[0], x.onnx[1]);
        let stem = sanitize(&display_name(n));
        let plane = self.reshape_to(&format!("{stem}.as_2d"), &x.node, vec![c, 1, len])?;
        let name = self.fresh_name(&name, "convtranspose");
        let shape = self.push(&name, Op::ConvTranspose2d(spec), &[&plane], p)?;
        let y = NodeRef::plain(name, &shape);
        self.reshape(n, &format!("{stem}.as_1d"), &y, vec![shape[0], shape[2]])
    }

    pub(super) fn linear(
        &mut self,
        n: &NodeProto,
        name: &str,
        x: NodeRef,
        weight: Const,
        bias: Option<Const>,
    ) -> Result<()> {
        let (out, inp) = (weight.dims[0], weight.dims[1]);
        if x.onnx != [inp] {
            return err(format!(
                "a [{out}, {inp}] weight on an input of per-sample shape {:?}",
                x.onnx
            ));
        }
        let mut p = BTreeMap::new();
        p.insert("weight", weight);
        let has_bias = bias.is_some();
        if let Some(b) = bias {
            let v = b.per_channel(out, 1).ok_or_else(|| {
                OnnxError::Model(format!("bias of shape {:?} for {out} outputs", b.dims))
            })?;
            p.insert(
                "bias",
                Const {
                    dims: vec![out],
                    values: v,
                },
            );
        }
        let spec = LinearSpec {
            in_features: inp,
            out_features: out,
            bias: has_bias,
        };
        self.emit(n, name, Op::Linear(spec), &[&x.node], p)
    }

    pub(super) fn gemm(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let b = self.konst(n, 1)?;
        let c = self.opt_const(n, 2)?;
        if self.single {
            return self.gemm_of_sample(n, a, &x, &b, c);
        }
        if a.int("transA").unwrap_or(0) != 0 {
            return err("transA=1 is not supported (its rows are the batch)");
        }
        if b.dims.len() != 2 {
            return err(format!("B of shape {:?} is not a matrix", b.dims));
        }
        let alpha = f64::from(a.float("alpha").unwrap_or(1.0));
        let beta = f64::from(a.float("beta").unwrap_or(1.0));
        let mut w = if a.int("transB").unwrap_or(0) != 0 {
            b
        } else {
            transpose(&b)
        };
        w.values.iter_mut().for_each(|v| *v *= alpha);
        let c = c.map(|mut c| {
            c.values.iter_mut().for_each(|v| *v *= beta);
            c
        });
        let name = self.layer_name(n, 1);
        self.linear(n, &name, x, w, c)
    }

    /// Gemm in a graph of one sample: `A` (`[M, K]`, or `[K, M]` with transA) is the sample,
    /// a dense layer over its last axis computes `alpha · A · B`, and `beta · C` is its bias
    /// (one per output) or an added constant (a matrix).
    fn gemm_of_sample(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        x: &NodeRef,
        b: &Const,
        c: Option<Const>,
    ) -> Result<()> {
        if x.onnx.len() != 2 || b.dims.len() != 2 {
            return err(format!(
                "Gemm of A {:?} and B {:?}; both must be matrices",
                x.onnx, b.dims
            ));
        }
        let stem = sanitize(&display_name(n));
        let mut node = self.materialize(x)?;
        if a.int("transA").unwrap_or(0) != 0 {
            let name = self.fresh_name(&format!("{stem}.a_t"), "transpose");
            let op = Op::Transpose { perm: vec![1, 0] };
            self.push(&name, op, &[&node], BTreeMap::new())?;
            node = name;
        }
        let alpha = f64::from(a.float("alpha").unwrap_or(1.0));
        let beta = f64::from(a.float("beta").unwrap_or(1.0));
        // The dense layer's weight is [N, K].
        let mut w = if a.int("transB").unwrap_or(0) != 0 {
            b.clone()
        } else {
            transpose(b)
        };
        w.values.iter_mut().for_each(|v| *v *= alpha);
        let (out, k) = (w.dims[0], w.dims[1]);
        let c = c.map(|mut c| {
            c.values.iter_mut().for_each(|v| *v *= beta);
            c
        });
        // A bias of one value per output (or one for all) goes into the layer.
        let vector = c.as_ref().filter(|c| {
            c.numel() == 1 || c.dims.iter().rev().skip(1).all(|&d| d == 1) && c.numel() == out
        });
        let mut p = BTreeMap::from([("weight", w)]);
        if let Some(c) = vector {
            let values = if c.numel() == 1 {
                vec![c.values[0]; out]
            } else {
                c.values.clone()
            };
            p.insert(
                "bias",
                Const {
                    dims: vec![out],
                    values,
                },
            );
        }
        let spec = LinearSpec {
            in_features: k,
            out_features: out,
            bias: vector.is_some(),
        };
        let name = self.fresh_name(&self.layer_name(n, 1), "dense");
        let shape = self.push(&name, Op::Dense(spec), &[&node], p)?;
        let y = NodeRef::plain(name, &shape);
        match c {
            Some(c) if vector.is_none() => self.const_binary(n, &y, &c, BinaryKind::Add, false),
            _ => self.bind(n, y),
        }
    }

    pub(super) fn pad(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if x.onnx.len() != 3 || self.shape_of(&x).len() != 3 {
            return err(format!(
                "Pad of a [N, {}] value; Slim pads [N, C, H, W] feature maps",
                join(&x.onnx)
            ));
        }
        let (pads, value) = if self.opset < 11 {
            (
                a.ints("pads").unwrap_or_default(),
                a.float("value").unwrap_or(0.0),
            )
        } else {
            let value = match self.opt_const(n, 2)? {
                Some(c) if c.numel() == 1 => c.values[0] as f32,
                Some(c) => return err(format!("its constant_value holds {} values", c.numel())),
                None => 0.0,
            };
            (self.konst(n, 1)?.ints(), value)
        };
        // [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over the axes given (all by default).
        let axes: Vec<i64> = match self.opt_const(n, 3)? {
            Some(c) => c
                .ints()
                .iter()
                .map(|&v| if v < 0 { v + 4 } else { v })
                .collect(),
            None => (0..4).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return err(format!("pads {pads:?} for axes {axes:?}"));
        }
        let mut full = [0i64; 8];
        for (i, &ax) in axes.iter().enumerate() {
            if !(0..4).contains(&ax) {
                return err(format!("axis {ax} of a rank-4 value"));
            }
            full[ax as usize] = pads[i];
            full[ax as usize + 4] = pads[i + axes.len()];
        }
        if full[0] != 0 || full[1] != 0 || full[4] != 0 || full[5] != 0 {
            return err(format!(
                "pads {pads:?} pad the batch or channel axis; Slim pads height and width"
            ));
        }
        let spatial = [full[2], full[3], full[6], full[7]];
        if spatial.iter().any(|&p| !(0..=LIMIT).contains(&p)) {
            return err(format!(
                "pads {pads:?}: negative (cropping) or beyond {LIMIT}"
            ));
        }
        let mode = match a.string("mode").as_deref().unwrap_or("constant") {
            "constant" => PadMode::Constant(value),
            "edge" => PadMode::Edge,
            "reflect" => PadMode::Reflect,
            other => {
                return err(format!(
                    "mode \"{other}\"; Slim pads constant, edge and reflect"
                ))
            }
        };
        let pads = spatial.map(|p| p as usize);
        if pads == [0; 4] {
            return self.bind(n, x);
        }
        let name = self.fresh_name(base, "pad");
        let shape = self.push(&name, Op::Pad { pads, mode }, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn resize(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if x.onnx.len() != 3 || self.shape_of(&x).len() != 3 {
            return err(format!(
                "{} of a [N, {}] value; Slim resizes [N, C, H, W] feature maps",
                n.op_type,
                join(&x.onnx)
            ));
        }
        let upsample = n.op_type == "Upsample";
        // Upsample (and Resize before opset 11) take the scales second and map coordinates
        // as `asymmetric`; later Resize takes roi, scales, sizes.
        let legacy = upsample || self.opset < 11;
        let ((out, scale), axes) = self.resize_extent(n, a, &x, legacy)?;
        let coord = resize_coord(a, legacy)?;
        let mode = resize_mode(a, legacy)?;
        let antialias = a.int("antialias").unwrap_or(0) != 0;
        let crop = match coord {
            CoordMode::TfCropAndResize => Some(self.crop(n, a, axes.as_deref())?),
            _ => None,
        };
        let op = Op::Resize(ResizeSpec {
            out,
            scale,
            mode,
            coord,
            antialias,
            crop,
        });
        let name = self.fresh_name(base, "resize");
        let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    /// The output height and width of a Resize or Upsample and the scales its coordinates
    /// map with, from its scales or its sizes; and the axes those name (opset 18).
    #[allow(clippy::type_complexity)]
    fn resize_extent(
        &self,
        n: &NodeProto,
        a: &Attrs,
        x: &NodeRef,
        legacy: bool,
    ) -> Result<(([usize; 2], [f32; 2]), Option<Vec<i64>>)> {
        let (h, w) = (x.onnx[1], x.onnx[2]);
        let upsample = n.op_type == "Upsample";
        let scales = if upsample && self.opset < 9 {
            a.get("scales").map(|s| Const {
                dims: vec![s.floats.len()],
                values: s.floats.iter().map(|&v| f64::from(v)).collect(),
            })
        } else if legacy {
            Some(self.konst(n, 1)?)
        } else {
            self.opt_const(n, 2)?.filter(|c| c.numel() > 0)
        };
        let given_sizes = if legacy {
            None
        } else {
            self.opt_const(n, 3)?.filter(|c| c.numel() > 0)
        };
        // Opset 18 may name the axes the scales or sizes are for.
        let axes = a.ints("axes").map(|v| {
            v.iter()
                .map(|&x| if x < 0 { x + 4 } else { x })
                .collect::<Vec<i64>>()
        });
        let full = |c: Const, fill: f64| -> Result<Const> {
            let Some(axes) = &axes else { return Ok(c) };
            if axes.len() != c.numel() || axes.iter().any(|&x| !(0..4).contains(&x)) {
                return err(format!("axes {axes:?} for {} values", c.numel()));
            }
            let mut values = vec![fill; 4];
            for (&ax, &v) in axes.iter().zip(&c.values) {
                values[ax as usize] = v;
            }
            Ok(Const {
                dims: vec![4],
                values,
            })
        };
        let scales = scales.map(|c| full(c, 1.0)).transpose()?;
        let mut given_sizes = given_sizes.map(|c| full(c, 0.0)).transpose()?;
        if let Some(sz) = given_sizes.as_mut().filter(|_| axes.is_some()) {
            // Axes not named keep their size.
            sz.values[0] = 1.0;
            sz.values[1] = x.onnx[0] as f64;
            for i in 2..4 {
                if sz.values[i] == 0.0 {
                    sz.values[i] = x.onnx[i - 1] as f64;
                }
            }
        }
        let extent = match (scales, given_sizes) {
            (Some(sc), None) => {
                let v = &sc.values;
                if v.len() != 4 || v[0] != 1.0 || v[1] != 1.0 {
                    return err(format!("scales {v:?}; Slim resizes height and width only"));
                }
                let scale = [v[2] as f32, v[3] as f32];
                if scale
                    .iter()
                    .any(|s| !(s.is_finite() && *s > 0.0 && *s <= 4096.0))
                {
                    return err(format!("scales {v:?} out of range"));
                }
                let out = [
                    (h as f64 * f64::from(scale[0])).floor() as usize,
                    (w as f64 * f64::from(scale[1])).floor() as usize,
                ];
                (out, scale)
            }
            (None, Some(sz)) => sizes_extent(&sz, a, [h, w], x.onnx[0])?,
            _ => return err("it needs exactly one of scales and sizes"),
        };
        Ok((extent, axes))
    }
}

impl Builder {
    /// The region and fill of a crop-and-resize: the `roi` input (starts, then ends, of the
    /// four axes or of the `axes` named), the batch and channel axes whole.
    fn crop(&self, n: &NodeProto, a: &Attrs, axes: Option<&[i64]>) -> Result<Crop> {
        let roi = self
            .opt_const(n, 1)?
            .ok_or_else(|| OnnxError::Model("tf_crop_and_resize without a roi".into()))?;
        let axes: Vec<usize> = match axes {
            Some(v) => v.iter().map(|&x| x as usize).collect(),
            None => (0..4).collect(),
        };
        if roi.numel() != 2 * axes.len() || axes.iter().any(|&x| x > 3) {
            return err(format!(
                "a roi of {} values for {} axes",
                roi.numel(),
                axes.len()
            ));
        }
        let (mut starts, mut ends) = ([0.0f64; 4], [1.0f64; 4]);
        for (k, &ax) in axes.iter().enumerate() {
            starts[ax] = roi.values[k];
            ends[ax] = roi.values[k + axes.len()];
        }
        if starts[..2] != [0.0, 0.0] || ends[..2] != [1.0, 1.0] {
            return err(format!(
                "a roi that crops the batch or channel axis ({:?} to {:?})",
                &starts[..2],
                &ends[..2]
            ));
        }
        let extrapolation = a.float("extrapolation_value").unwrap_or(0.0);
        Ok(Crop {
            roi: [starts[2], starts[3], ends[2], ends[3]].map(|v| v as f32),
            extrapolation,
        })
    }
}

/// A transposed convolution's strides, dilation, output padding and (before, after) padding
/// per spatial axis, from its attributes, the input's spatial sizes and the kernel's. Padding
/// comes from `pads`, or from `output_shape` or SAME auto_pad by ONNX's rule (the odd unit of
/// the total before the input unless SAME_UPPER); an output larger than the full one grows at
/// the end.
struct TransposeGeometry {
    stride: Vec<usize>,
    dilation: usize,
    output_padding: Vec<usize>,
    pads: Vec<(usize, usize)>,
}

fn transpose_geometry(a: &Attrs, input: &[usize], kernel: &[usize]) -> Result<TransposeGeometry> {
    let count = input.len();
    if kernel.contains(&0) {
        return err(format!("kernel {kernel:?} must be at least 1"));
    }
    let per_axis =
        |name: &str, default: i64, min: i64| axis_values(a, name, count, Some(default), min);
    let stride = per_axis("strides", 1, 1)?;
    let dilations = per_axis("dilations", 1, 1)?;
    if dilations.iter().any(|&d| d != dilations[0]) {
        return err(format!(
            "dilations {dilations:?}; Slim needs one dilation for both axes"
        ));
    }
    let dilation = dilations[0];
    let mut output_padding = per_axis("output_padding", 0, 0)?;
    let auto = a.string("auto_pad").unwrap_or_default();
    let upper = match auto.as_str() {
        "" | "NOTSET" | "VALID" => false,
        "SAME_UPPER" => true,
        "SAME_LOWER" => false,
        other => return err(format!("auto_pad {other}")),
    };
    let target: Option<Vec<i64>> = match a.ints("output_shape") {
        Some(shape) if shape.len() >= count => Some(shape[shape.len() - count..].to_vec()),
        Some(shape) => return err(format!("output_shape {shape:?} for {count} spatial axes")),
        None if auto.starts_with("SAME") => Some(
            input
                .iter()
                .zip(&stride)
                .map(|(&x, &s)| (x * s) as i64)
                .collect(),
        ),
        None => None,
    };
    let pads = match target {
        Some(target) => (0..count)
            .map(|i| {
                let full =
                    (input[i] - 1) * stride[i] + output_padding[i] + (kernel[i] - 1) * dilation + 1;
                let total = full as i64 - target[i];
                if total < 0 {
                    output_padding[i] += (-total) as usize;
                    return (0, 0);
                }
                let (half, rest) = ((total / 2) as usize, (total - total / 2) as usize);
                if upper {
                    (half, rest)
                } else {
                    (rest, half)
                }
            })
            .collect(),
        None => {
            let p = a.ints("pads").unwrap_or(vec![0; 2 * count]);
            if p.len() != 2 * count {
                return err(format!("pads {p:?} for {count} spatial axes"));
            }
            let p = sizes("pads", &p, 0)?;
            (0..count).map(|i| (p[i], p[count + i])).collect()
        }
    };
    Ok(TransposeGeometry {
        stride,
        dilation,
        output_padding,
        pads,
    })
}

/// An attribute of one value per spatial axis (`count` of them), each at least `min`: the
/// node's, or `default` on every axis where it has none (an error without a default).
pub(super) fn axis_values(
    a: &Attrs,
    name: &str,
    count: usize,
    default: Option<i64>,
    min: i64,
) -> Result<Vec<usize>> {
    let v = match (a.ints(name), default) {
        (Some(v), _) => v,
        (None, Some(d)) => vec![d; count],
        (None, None) => return err(format!("no {name}")),
    };
    if v.len() != count {
        return err(format!("{name} {v:?} for {count} spatial axes"));
    }
    sizes(name, &v, min)
}

/// The (before, after) padding of each spatial axis of a window, each axis with its stride
/// and dilation: explicit `pads`, `VALID`, or `SAME_UPPER` / `SAME_LOWER` (as much as keeps
/// `ceil(input / stride)` outputs, the odd one after or before).
pub(super) fn pads_of_axes(
    a: &Attrs,
    input: &[usize],
    kernel: &[usize],
    stride: &[usize],
    dil: &[usize],
) -> Result<Vec<(usize, usize)>> {
    if [kernel, stride, dil].iter().any(|v| v.contains(&0)) {
        return err(format!(
            "kernel {kernel:?}, strides {stride:?} and dilations {dil:?} must be at least 1"
        ));
    }
    let count = input.len();
    let auto = a.string("auto_pad").unwrap_or_default();
    let per_axis: Vec<(usize, usize)> = match auto.as_str() {
        "" | "NOTSET" => {
            let p = a.ints("pads").unwrap_or(vec![0; 2 * count]);
            if p.len() != 2 * count || p.iter().any(|&v| !(0..=LIMIT).contains(&v)) {
                return err(format!("pads {p:?}"));
            }
            (0..count)
                .map(|i| (p[i] as usize, p[count + i] as usize))
                .collect()
        }
        "VALID" => vec![(0, 0); count],
        "SAME_UPPER" | "SAME_LOWER" => (0..count)
            .map(|i| {
                let out = input[i].div_ceil(stride[i]);
                let span = dil[i] * (kernel[i] - 1) + 1;
                let total = ((out - 1) * stride[i] + span).saturating_sub(input[i]);
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            })
            .collect(),
        other => return err(format!("auto_pad {other}")),
    };
    Ok(per_axis)
}

/// Node kinds the importer dispatches here (from [`Builder::dispatch`]).
impl Builder {
    pub(super) fn dropout(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let mask_used = n.output.len() > 1 && self.uses.get(&n.output[1]).copied().unwrap_or(0) > 0;
        let p = if self.opset < 12 {
            a.float("ratio").map(f64::from)
        } else {
            match self.opt_const(n, 1)? {
                Some(c) if c.values.len() == 1 => Some(c.values[0]),
                Some(c) => return err(format!("its ratio has {} values, not one", c.values.len())),
                None => None,
            }
        };
        let p = decimal(p.unwrap_or(0.5) as f32) as f32;
        let training = self.opset >= 12
            && self
                .opt_const(n, 2)?
                .is_some_and(|t| t.values.iter().any(|&v| v != 0.0));
        if training && p > 0.0 {
            return err(
                "its training_mode is true: the graph drops values at inference, which Slim's \
                 dropout does only in training",
            );
        }
        self.unary(n, base, Op::Dropout { p })?;
        if mask_used {
            // Nothing is dropped at inference (nor in training at ratio 0): the mask keeps
            // every value.
            let x = self.node_in(n, 0)?;
            let ones = Const {
                values: vec![1.0; x.onnx.iter().product()],
                dims: x.onnx.clone(),
            };
            let r = self.constant_node(&format!("{base}_mask"), &ones, x.onnx.len() + 1)?;
            self.values.insert(n.output[1].clone(), Value::Node(r));
        }
        Ok(())
    }

    /// The mean over the plane (a vector `[C]`, seen as `[C, 1, 1]`), or over the length of a
    /// 1-D sequence (`[C, 1]`).
    pub(super) fn global_average_pool(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if x.onnx.len() == 2 {
            // Of a 1-D sequence [C, L]: the mean over its length, [C, 1].
            let node = self.materialize(&x)?;
            let name = self.fresh_name(base, "reduce");
            let op = Op::Reduce {
                kind: ReduceKind::Mean,
                axes: vec![1],
                keep: true,
            };
            let shape = self.push(&name, op, &[&node], BTreeMap::new())?;
            return self.bind(n, NodeRef::plain(name, &shape));
        }
        let name = self.fresh_name(base, "gap");
        let shape = self.push(&name, Op::GlobalAvgPool, &[&x.node], BTreeMap::new())?;
        let mut onnx = shape.clone();
        onnx.extend([1, 1]);
        self.bind(n, NodeRef { node: name, onnx })
    }

    /// The largest value of each channel's plane (or sequence), `[C, 1, 1]` (`[C, 1]`).
    pub(super) fn global_max_pool(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if !matches!(x.onnx.len(), 2 | 3) {
            return err(format!(
                "input of per-sample shape {:?}; global pooling takes [C, L] or [C, H, W]",
                x.onnx
            ));
        }
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "reduce");
        let op = Op::Reduce {
            kind: ReduceKind::Max,
            axes: (1..x.onnx.len()).collect(),
            keep: true,
        };
        let shape = self.push(&name, op, &[&node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    pub(super) fn batch_norm(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let [scale, bias, mean, var] = [1, 2, 3, 4].map(|i| self.konst(n, i));
        let (scale, bias, mean, var) = (scale?, bias?, mean?, var?);
        let Some(&channels) = x.onnx.first() else {
            return err("its input has no channel axis");
        };
        for (what, c) in [
            ("scale", &scale),
            ("bias", &bias),
            ("mean", &mean),
            ("var", &var),
        ] {
            if c.numel() != channels {
                return err(format!(
                    "{what} has {} values for {channels} channels",
                    c.numel()
                ));
            }
        }
        let eps = decimal(a.float("epsilon").unwrap_or(1e-5));
        // ONNX weighs the running statistic, Slim (as PyTorch) the batch's.
        let momentum = 1.0 - decimal(a.float("momentum").unwrap_or(0.9));
        let momentum = (momentum * 1e9).round() / 1e9;
        let name = self.layer_name(n, 1);
        let mut p = BTreeMap::new();
        p.insert("weight", scale);
        p.insert("bias", bias);
        p.insert("running_mean", mean);
        p.insert("running_var", var);
        let op = Op::BatchNorm2d(BatchNormSpec {
            channels,
            eps,
            momentum,
        });
        self.emit_keep(n, &name, op, &[&x], p)
    }

    pub(super) fn matmul(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        match self.value(n, 1)?.clone() {
            Value::Const(w) if x.onnx.len() == 1 && w.dims.len() == 2 => {
                let name = self.layer_name(n, 1);
                self.linear(n, &name, x, transpose(&w), None)
            }
            Value::Const(w) if w.dims.len() == 1 && x.onnx.len() > 1 => {
                // Times a vector: a dense layer of one output, its axis dropped.
                let node = self.materialize(&x)?;
                let spec = LinearSpec {
                    in_features: w.dims[0],
                    out_features: 1,
                    bias: false,
                };
                let weight = Const {
                    dims: vec![1, w.dims[0]],
                    values: w.values.clone(),
                };
                let p = BTreeMap::from([("weight", weight)]);
                let name = self.fresh_name(&self.layer_name(n, 1), "dense");
                let shape = self.push(&name, Op::Dense(spec), &[&node], p)?;
                let r = NodeRef::plain(name, &shape);
                self.reshape(n, base, &r, x.onnx[..x.onnx.len() - 1].to_vec())
            }
            Value::Const(w) if w.dims.len() == 2 => {
                // Tokens times a matrix: a dense layer over the last axis.
                let node = self.materialize(&x)?;
                let (k, out) = (w.dims[0], w.dims[1]);
                let spec = LinearSpec {
                    in_features: k,
                    out_features: out,
                    bias: false,
                };
                let mut p = BTreeMap::new();
                p.insert("weight", transpose(&w));
                let name = self.fresh_name(&self.layer_name(n, 1), "dense");
                let shape = self.push(&name, Op::Dense(spec), &[&node], p)?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            Value::Const(w) => {
                // Batched matrices: a constant node, in a product of data values.
                let c = self.constant_node(&display_name(n), &w, x.onnx.len() + 1)?;
                let a = self.materialize(&x)?;
                let name = self.fresh_name(base, "matmul");
                let shape = self.push(&name, Op::MatMul, &[&a, &c.node], BTreeMap::new())?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            Value::Node(y) => {
                let (a, b) = (self.materialize(&x)?, self.materialize(&y)?);
                let name = self.fresh_name(base, "matmul");
                let shape = self.push(&name, Op::MatMul, &[&a, &b], BTreeMap::new())?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
        }
    }

    pub(super) fn lrn(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if x.onnx.len() != 3 {
            return err(format!(
                "LRN of a [N, {}] value; Slim normalizes [N, C, H, W] feature maps",
                join(&x.onnx)
            ));
        }
        let size = sizes("size", &[a.int("size").unwrap_or(0)], 1)?[0];
        let spec = LrnSpec {
            size,
            alpha: a.float("alpha").unwrap_or(1e-4),
            beta: a.float("beta").unwrap_or(0.75),
            bias: a.float("bias").unwrap_or(1.0),
        };
        self.unary(n, base, Op::Lrn(spec))
    }
}

/// A Resize's `coordinate_transformation_mode` (`asymmetric` for Upsample and opsets before
/// 11).
fn resize_coord(a: &Attrs, legacy: bool) -> Result<CoordMode> {
    Ok(if legacy {
        CoordMode::Asymmetric
    } else {
        match a
            .string("coordinate_transformation_mode")
            .as_deref()
            .unwrap_or("half_pixel")
        {
            "half_pixel" => CoordMode::HalfPixel,
            "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
            "align_corners" => CoordMode::AlignCorners,
            "asymmetric" => CoordMode::Asymmetric,
            "half_pixel_symmetric" => CoordMode::HalfPixelSymmetric,
            "tf_crop_and_resize" => CoordMode::TfCropAndResize,
            other => {
                return err(format!(
                    "coordinate_transformation_mode \"{other}\" is not supported"
                ))
            }
        }
    })
}

/// A Resize's interpolation: nearest with its rounding, linear, or cubic.
fn resize_mode(a: &Attrs, legacy: bool) -> Result<ResizeMode> {
    // Taps outside the input weigh nothing: it changes only cubic resizing (nearest and
    // linear taps outside read the edge value, which the kept taps hold too).
    let exclude_outside = a.int("exclude_outside").unwrap_or(0) != 0;
    Ok(match a.string("mode").as_deref().unwrap_or("nearest") {
        "nearest" => {
            let rounding = if legacy {
                NearestRounding::Floor
            } else {
                match a
                    .string("nearest_mode")
                    .as_deref()
                    .unwrap_or("round_prefer_floor")
                {
                    "round_prefer_floor" => NearestRounding::RoundPreferFloor,
                    "round_prefer_ceil" => NearestRounding::RoundPreferCeil,
                    "floor" => NearestRounding::Floor,
                    "ceil" => NearestRounding::Ceil,
                    other => return err(format!("nearest_mode \"{other}\" is not supported")),
                }
            };
            ResizeMode::Nearest(rounding)
        }
        "linear" | "bilinear" => ResizeMode::Linear,
        "cubic" => {
            let coeff = a.float("cubic_coeff_a").unwrap_or(-0.75);
            if !coeff.is_finite() {
                return err(format!("cubic_coeff_a {coeff}"));
            }
            ResizeMode::Cubic {
                a: coeff,
                exclude_outside,
            }
        }
        other => {
            return err(format!(
                "mode \"{other}\"; Slim resizes nearest, linear and cubic"
            ))
        }
    })
}

/// The output height and width, and the scales, of a Resize given sizes (four, the batch's
/// and the channels' as they are, or the plane's two) for an input plane `[h, w]` of
/// `channels` channels, with ONNX 18's `keep_aspect_ratio_policy`.
fn sizes_extent(
    sz: &Const,
    a: &Attrs,
    [h, w]: [usize; 2],
    channels: usize,
) -> Result<([usize; 2], [f32; 2])> {
    let v = sz.ints();
    let plane: Vec<i64> = match v.len() {
        4 if v[0] >= 1 && v[1] == channels as i64 => v[2..].to_vec(),
        2 => v.clone(),
        _ => return err(format!("sizes {v:?}; Slim resizes height and width only")),
    };
    let out = sizes("sizes", &plane, 1)?;
    let ratio = [out[0] as f64 / h as f64, out[1] as f64 / w as f64];
    // Both axes by one factor, the smaller or larger of the two (ONNX 18's
    // keep_aspect_ratio_policy), the lengths rounded from it.
    let kept = match a.string("keep_aspect_ratio_policy").as_deref() {
        None | Some("stretch") => None,
        Some("not_larger") => Some(ratio[0].min(ratio[1])),
        Some("not_smaller") => Some(ratio[0].max(ratio[1])),
        Some(other) => return err(format!("keep_aspect_ratio_policy \"{other}\"")),
    };
    Ok(match kept {
        Some(s) => {
            let out = [
                (s * h as f64 + 0.5).floor() as usize,
                (s * w as f64 + 0.5).floor() as usize,
            ];
            if out.contains(&0) {
                return err(format!("sizes {v:?} keep no value of an axis"));
            }
            (out, [s as f32; 2])
        }
        None => ([out[0], out[1]], [ratio[0] as f32, ratio[1] as f32]),
    })
}
