//! Normalizations and channel rearrangements that ONNX names and Slim composes: instance and
//! group normalization as a layer norm over each channel's (or group's) values and a
//! per-channel affine; DepthToSpace and SpaceToDepth as reshapes around a transpose.

use super::*;

impl Builder {
    /// InstanceNormalization: each channel of each sample normalized over its plane (or
    /// sequence, or volume), then scaled and shifted per channel.
    pub(super) fn instance_norm(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let channels = x.onnx.first().copied().unwrap_or(0);
        if x.onnx.len() < 2 {
            return err(format!(
                "input of per-sample shape {:?}; instance normalization needs [C, ...]",
                x.onnx
            ));
        }
        self.normalized_groups(n, a, base, &x, channels, channels)
    }

    /// GroupNormalization: the channels in `num_groups` groups, each group of each sample
    /// normalized over its channels' values, then scaled and shifted per channel (opset 21)
    /// or per group (opset 18, its scale and bias one value a group).
    pub(super) fn group_norm(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let channels = x.onnx.first().copied().unwrap_or(0);
        let groups = a.int("num_groups").unwrap_or(0);
        if x.onnx.len() < 2 || groups < 1 || channels % groups as usize != 0 {
            return err(format!(
                "{groups} groups of a per-sample shape {:?}; the groups must divide the channels",
                x.onnx
            ));
        }
        self.normalized_groups(n, a, base, &x, channels, groups as usize)
    }

    /// `x` ([C, ...]) normalized over each of `groups` equal runs of channels, then the
    /// affine of inputs 1 and 2 (a value per channel, or per group).
    fn normalized_groups(
        &mut self,
        n: &NodeProto,
        a: &Attrs,
        base: &str,
        x: &NodeRef,
        channels: usize,
        groups: usize,
    ) -> Result<()> {
        let (scale, bias) = (self.konst(n, 1)?, self.konst(n, 2)?);
        let per_channel = |c: Const, what: &str| -> Result<Vec<f64>> {
            match c.numel() {
                k if k == channels => Ok(c.values),
                k if k == groups => Ok((0..channels)
                    .map(|i| c.values[i / (channels / groups)])
                    .collect()),
                k => err(format!(
                    "its {what} has {k} values for {channels} channels in {groups} groups"
                )),
            }
        };
        let (scale, bias) = (per_channel(scale, "scale")?, per_channel(bias, "bias")?);
        let eps = decimal(a.float("epsilon").unwrap_or(1e-5));
        let per_sample: usize = x.onnx.iter().product();
        let width = per_sample / groups;
        let stem = sanitize(&display_name(n));
        let rows = self.reshape_to(&format!("{stem}.groups"), &x.node, vec![groups, width])?;
        let norm = self.fresh_name(&format!("{base}.norm"), "layernorm");
        let p = BTreeMap::from([
            (
                "weight",
                Const {
                    dims: vec![width],
                    values: vec![1.0; width],
                },
            ),
            (
                "bias",
                Const {
                    dims: vec![width],
                    values: vec![0.0; width],
                },
            ),
        ]);
        let op = Op::LayerNorm {
            from: 1,
            shape: vec![width],
            eps,
        };
        self.push(&norm, op, &[&rows], p)?;
        let back = self.reshape_to(&format!("{stem}.ungroup"), &norm, x.onnx.clone())?;
        self.affine(n, NodeRef::plain(back, &x.onnx), scale, bias)
    }

    /// DepthToSpace and SpaceToDepth (`DCR`: the blocks outermost in the channels, or `CRD`:
    /// innermost), as a reshape, a transpose and a reshape.
    pub(super) fn depth_space(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let b = a.int("blocksize").unwrap_or(0);
        let [c, h, w] = x.onnx[..] else {
            return err(format!(
                "input of per-sample shape {:?}; {} takes [C, H, W]",
                x.onnx, n.op_type
            ));
        };
        if !(1..=LIMIT).contains(&b) {
            return err(format!("blocksize {b}"));
        }
        let b = b as usize;
        let mode = a.string("mode");
        let (grid, perm, out) = if n.op_type == "SpaceToDepth" {
            if h % b != 0 || w % b != 0 {
                return err(format!("blocksize {b} does not divide the {h}x{w} plane"));
            }
            let (oh, ow) = (h / b, w / b);
            let perm = match mode.as_deref() {
                // [C, H', b, W', b] -> [b, b, C, H', W']
                None | Some("DCR") => vec![2, 4, 0, 1, 3],
                // [C, H', b, W', b] -> [C, b, b, H', W']
                Some("CRD") => vec![0, 2, 4, 1, 3],
                Some(other) => return err(format!("mode {other} (ONNX names DCR and CRD)")),
            };
            (vec![c, oh, b, ow, b], perm, vec![c * b * b, oh, ow])
        } else {
            if c % (b * b) != 0 {
                return err(format!("blocksize {b}: {b}² does not divide {c} channels"));
            }
            let oc = c / (b * b);
            let out = vec![oc, h * b, w * b];
            match mode.as_deref() {
                // [b, b, C', H, W] -> [C', H, b, W, b]
                None | Some("DCR") => (vec![b, b, oc, h, w], vec![2, 3, 0, 4, 1], out),
                // [C', b, b, H, W] -> [C', H, b, W, b]
                Some("CRD") => (vec![oc, b, b, h, w], vec![0, 3, 1, 4, 2], out),
                Some(other) => return err(format!("mode {other} (ONNX names DCR and CRD)")),
            }
        };
        let stem = sanitize(&display_name(n));
        let split = self.reshape_to(&format!("{stem}.blocks"), &x.node, grid)?;
        let moved = self.fresh_name(&format!("{base}.moved"), "transpose");
        let shape = self.push(&moved, Op::Transpose { perm }, &[&split], BTreeMap::new())?;
        self.reshape(
            n,
            &format!("{stem}.merged"),
            &NodeRef::plain(moved, &shape),
            out,
        )
    }
}
