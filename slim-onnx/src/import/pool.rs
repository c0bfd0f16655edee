//! MaxPool and AveragePool at import, over one, two or three spatial axes. Slim's pools take
//! `[C, H, W]` planes; a pool of a sequence `[C, L]` is a pool of `[C, 1, L]` planes, and one
//! of volumes `[C, D, H, W]` pools the planes `[C·D, H, W]`, then each column along the
//! depth as `[C, D, H'·W']` planes. That is exact for both kinds: a window's maximum is the
//! maximum over its depth of the planes' maxima, and its mean the mean of means (the
//! positions of a box inside the input are those inside it along each axis).

use super::layers::{axis_values, pads_of_axes};
use super::*;

/// One spatial axis of an ONNX pool.
#[derive(Clone, Copy, Debug)]
struct Axis {
    kernel: usize,
    stride: usize,
    dilation: usize,
    /// Padding before and after, as the node declares it.
    pads: (usize, usize),
    /// How far ceil mode's partial last window reaches past the padded input.
    overflow: usize,
}

impl Axis {
    /// An axis the pool leaves as it is.
    const UNIT: Axis = Axis {
        kernel: 1,
        stride: 1,
        dilation: 1,
        pads: (0, 0),
        overflow: 0,
    };

    fn span(&self) -> usize {
        self.dilation * (self.kernel - 1) + 1
    }
}

/// What the pool computes.
#[derive(Clone, Copy)]
struct Kind {
    average: bool,
    /// Average pooling divides by the whole window, padding included (`count_include_pad`).
    include_pad: bool,
}

impl Builder {
    pub(super) fn pool(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if n.output.len() > 1 && self.uses.get(&n.output[1]).copied().unwrap_or(0) > 0 {
            return err("the indices output of MaxPool is used, which Slim does not compute");
        }
        let rank = x.onnx.len();
        if !(2..=4).contains(&rank) {
            return err(format!(
                "input of per-sample shape {:?}; pooling takes [C, L], [C, H, W] or [C, D, H, W]",
                x.onnx
            ));
        }
        let average = n.op_type == "AveragePool";
        let kind = Kind {
            average,
            include_pad: average && a.int("count_include_pad").unwrap_or(0) != 0,
        };
        let axes = pool_axes(a, &x.onnx[1..])?;
        // (A reshape reads the values in order: it may start from a view.)
        let stem = sanitize(&display_name(n));
        let c = x.onnx[0];
        match axes[..] {
            [h, w] => {
                let planes = self.materialize(&x)?;
                let (name, shape) = self.pool_plane(base, n, &planes, [h, w], kind)?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            [l] => {
                let plane =
                    self.reshape_to(&format!("{stem}.as_2d"), &x.node, vec![c, 1, x.onnx[1]])?;
                let (y, shape) =
                    self.pool_plane(&format!("{stem}.pool"), n, &plane, [Axis::UNIT, l], kind)?;
                self.reshape(
                    n,
                    &format!("{stem}.as_1d"),
                    &NodeRef::plain(y, &shape),
                    vec![c, shape[2]],
                )
            }
            [d, h, w] => {
                let [depth, rows, cols] = [x.onnx[1], x.onnx[2], x.onnx[3]];
                let planes = self.reshape_to(
                    &format!("{stem}.planes"),
                    &x.node,
                    vec![c * depth, rows, cols],
                )?;
                let (y, s) =
                    self.pool_plane(&format!("{stem}.pool_hw"), n, &planes, [h, w], kind)?;
                let (oh, ow) = (s[1], s[2]);
                let columns =
                    self.reshape_to(&format!("{stem}.columns"), &y, vec![c, depth, oh * ow])?;
                let (y, s) = self.pool_plane(
                    &format!("{stem}.pool_d"),
                    n,
                    &columns,
                    [d, Axis::UNIT],
                    kind,
                )?;
                let y = NodeRef::plain(y, &s);
                self.reshape(n, &format!("{stem}.as_3d"), &y, vec![c, s[1], oh, ow])
            }
            _ => err(format!("a pool over {} axes", axes.len())),
        }
    }

    /// Pools `[C, H, W]` values `x` over `[height, width]`: one Slim pool, after a zero Pad of
    /// the declared padding where average pooling counts the padding but not ceil mode's
    /// partial window (ONNX's rule). The pool's name and shape.
    fn pool_plane(
        &mut self,
        base: &str,
        n: &NodeProto,
        x: &str,
        [ah, aw]: [Axis; 2],
        kind: Kind,
    ) -> Result<(String, Vec<usize>)> {
        let declared = [ah.pads.0, aw.pads.0, ah.pads.1, aw.pads.1];
        let overflow = [ah.overflow, aw.overflow];
        let mut input = x.to_string();
        let mut pads = [
            declared[0],
            declared[1],
            declared[2] + overflow[0],
            declared[3] + overflow[1],
        ];
        let mut exclude_pad = kind.average && !kind.include_pad;
        if kind.include_pad && overflow != [0, 0] {
            // The padding becomes part of the input; the partial window's reach stays out.
            let pad = self.fresh_name(&format!("{base}.pad"), "pad");
            let op = Op::Pad {
                pads: declared,
                mode: PadMode::Constant(0.0),
            };
            self.push(&pad, op, &[x], BTreeMap::new())?;
            input = pad;
            pads = [0, 0, overflow[0], overflow[1]];
            exclude_pad = true;
        }
        let spec = PoolSpec {
            kernel: [ah.kernel, aw.kernel],
            stride: [ah.stride, aw.stride],
            dilation: [ah.dilation, aw.dilation],
            pads,
            exclude_pad: exclude_pad && pads != [0; 4],
        };
        let op = if kind.average {
            Op::AvgPool2d(spec)
        } else {
            Op::MaxPool2d(spec)
        };
        let name = self.fresh_name(base, &n.op_type.to_lowercase());
        let shape = self.push(&name, op, &[&input], BTreeMap::new())?;
        Ok((name, shape))
    }
}

/// The pool's axes, from its attributes and the input's spatial sizes `dims`.
fn pool_axes(a: &Attrs, dims: &[usize]) -> Result<Vec<Axis>> {
    let count = dims.len();
    let per_axis = |name: &str, default: Option<i64>| axis_values(a, name, count, default, 1);
    let kernel = per_axis("kernel_shape", None)?;
    let stride = per_axis("strides", Some(1))?;
    let dilation = per_axis("dilations", Some(1))?;
    let pads = pads_of_axes(a, dims, &kernel, &stride, &dilation)?;
    let ceil = a.int("ceil_mode").unwrap_or(0) != 0;
    (0..count)
        .map(|i| {
            let mut axis = Axis {
                kernel: kernel[i],
                stride: stride[i],
                dilation: dilation[i],
                pads: pads[i],
                overflow: 0,
            };
            let (len, s, span) = (dims[i], axis.stride, axis.span());
            let padded = len + axis.pads.0 + axis.pads.1;
            let Some(room) = padded.checked_sub(span) else {
                return err(format!(
                    "its window of extent {span} does not fit axis {} of {len} (padded {padded})",
                    i + 1
                ));
            };
            if ceil {
                // A last window where the floor leaves values uncovered, as long as it starts
                // inside the input or its leading padding.
                let mut out = room.div_ceil(s) + 1;
                if (out - 1) * s >= len + axis.pads.0 {
                    out -= 1;
                }
                axis.overflow = ((out - 1) * s + span).saturating_sub(padded);
            }
            Ok(axis)
        })
        .collect()
}
