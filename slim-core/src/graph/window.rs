//! The windows of pooling and transposed convolution: a size, step and padding per axis,
//! and the forms model files write them in (older files' single values kept).

use serde::{Deserialize, Serialize};

/// Max or average pooling over a window of the plane: its height and width, steps and tap
/// spacing per axis, and padding per side. Pools written before rectangular windows read as
/// before: a model file states a square pool as one `kernel`, `stride` and `padding`, and
/// writes it so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PoolFile", into = "PoolFile")]
pub struct PoolSpec {
    /// Window height and width.
    pub kernel: [usize; 2],
    /// Steps between windows, down and across.
    pub stride: [usize; 2],
    /// Spacing of the window's taps, down and across (1: adjacent).
    pub dilation: [usize; 2],
    /// Padding `[top, left, bottom, right]` (ONNX's order): never picked by max pooling,
    /// zeros for average pooling.
    pub pads: [usize; 4],
    /// Average pooling divides by the number of window positions inside the input (ONNX's
    /// `count_include_pad = 0`, PyTorch's default for ceil mode) rather than by the window size.
    pub exclude_pad: bool,
}

/// The square pools the fast kernels take: a `kernel` x `kernel` window of adjacent taps,
/// one stride, `padding` on every side and `pad_end` more after the bottom and right edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SquarePool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub pad_end: [usize; 2],
}

impl PoolSpec {
    /// A square window with symmetric padding (counted as zeros by average pooling).
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        PoolSpec {
            kernel: [kernel; 2],
            stride: [stride; 2],
            dilation: [1, 1],
            pads: [padding; 4],
            exclude_pad: false,
        }
    }
    /// The same pool with `extra` more padding after the bottom and the right edge.
    pub fn with_end_padding(mut self, extra: [usize; 2]) -> Self {
        self.pads[2] += extra[0];
        self.pads[3] += extra[1];
        self
    }
    /// True when the padding is the same on every side.
    pub fn is_symmetric(&self) -> bool {
        self.pads.iter().all(|&p| p == self.pads[0])
    }
    /// The pool as a [`SquarePool`], when it is one.
    pub fn square(&self) -> Option<SquarePool> {
        let [k, s, p] = [self.kernel[0], self.stride[0], self.pads[0]];
        let square = self.kernel == [k, k]
            && self.stride == [s, s]
            && self.dilation == [1, 1]
            && self.pads[1] == p
            && self.pads[2] >= p
            && self.pads[3] >= p;
        square.then(|| SquarePool {
            kernel: k,
            stride: s,
            padding: p,
            pad_end: [self.pads[2] - p, self.pads[3] - p],
        })
    }
    /// The extent of the window along an axis (0: height, 1: width), taps and gaps.
    pub fn span(&self, axis: usize) -> usize {
        self.dilation[axis] * (self.kernel[axis].max(1) - 1) + 1
    }
    /// Output size along an axis (0: height, 1: width) of an input of size `x`.
    pub fn out_size(&self, axis: usize, x: usize) -> Option<usize> {
        let padded = x + self.pads[axis] + self.pads[axis + 2];
        let span = self.span(axis);
        (padded >= span).then(|| (padded - span) / self.stride[axis].max(1) + 1)
    }
}

/// One size for both axes, or a pair.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Pair {
    One(usize),
    Two([usize; 2]),
}

impl Pair {
    fn of(v: [usize; 2]) -> Self {
        if v[0] == v[1] {
            Pair::One(v[0])
        } else {
            Pair::Two(v)
        }
    }
    fn both(self) -> [usize; 2] {
        match self {
            Pair::One(v) => [v, v],
            Pair::Two(v) => v,
        }
    }
}

/// [`PoolSpec`] as a model file writes it: square pools in the older form (`padding` on
/// every side, `pad_end` more after), other pools with `pads`.
#[derive(Serialize, Deserialize)]
struct PoolFile {
    kernel: Pair,
    stride: Pair,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dilation: Option<Pair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    padding: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pad_end: Option<[usize; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pads: Option<[usize; 4]>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    exclude_pad: bool,
}

impl From<PoolFile> for PoolSpec {
    fn from(f: PoolFile) -> Self {
        let pads = f.pads.unwrap_or_else(|| {
            let p = f.padding.unwrap_or(0);
            let e = f.pad_end.unwrap_or([0, 0]);
            [p, p, p.saturating_add(e[0]), p.saturating_add(e[1])]
        });
        PoolSpec {
            kernel: f.kernel.both(),
            stride: f.stride.both(),
            dilation: f.dilation.map_or([1, 1], Pair::both),
            pads,
            exclude_pad: f.exclude_pad,
        }
    }
}

impl From<PoolSpec> for PoolFile {
    fn from(p: PoolSpec) -> Self {
        let [top, left, bottom, right] = p.pads;
        let older = top == left && bottom >= top && right >= left;
        let end = [bottom.saturating_sub(top), right.saturating_sub(left)];
        PoolFile {
            kernel: Pair::of(p.kernel),
            stride: Pair::of(p.stride),
            dilation: (p.dilation != [1, 1]).then(|| Pair::of(p.dilation)),
            padding: older.then_some(top),
            pad_end: (older && end != [0, 0]).then_some(end),
            pads: (!older).then_some(p.pads),
            exclude_pad: p.exclude_pad,
        }
    }
}

/// A transposed 2-D convolution (a "deconvolution"): its weight is `[in, out / groups, kh, kw]`
/// and each input position scatters a filter into a `stride`-spaced output grid; the output
/// is `(x - 1) * stride + dilation * (k - 1) + output_padding + 1`, less the padding before and
/// after, per axis. A model file states equal strides and output paddings as one number and
/// equal padding on every side as one `padding`, as files written before per-axis values do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ConvTransposeFile", into = "ConvTransposeFile")]
pub struct ConvTransposeSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    /// Down and across.
    pub stride: [usize; 2],
    /// Output rows and columns left out: `[top, left, bottom, right]` (ONNX's order).
    pub pads: [usize; 4],
    /// Rows and columns added after the bottom and right edges.
    pub output_padding: [usize; 2],
    pub dilation: usize,
    pub groups: usize,
    pub bias: bool,
}

impl ConvTransposeSpec {
    /// Output spatial size for an input size, or `None` when the padding eats the output.
    pub fn out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let o = |axis: usize, x: usize| {
            let k = self.kernel[axis];
            ((x - 1) * self.stride[axis] + self.dilation * (k - 1) + self.output_padding[axis] + 1)
                .checked_sub(self.pads[axis] + self.pads[axis + 2])
                .filter(|&v| v > 0)
        };
        Some((o(0, h)?, o(1, w)?))
    }
    /// The input size along an axis (0: height, 1: width) that gives an output of `out`.
    pub fn in_size(&self, axis: usize, out: usize) -> usize {
        let k = self.kernel[axis];
        (out + self.pads[axis] + self.pads[axis + 2])
            .saturating_sub(self.output_padding[axis] + self.dilation * (k - 1) + 1)
            / self.stride[axis].max(1)
            + 1
    }
}

/// [`ConvTransposeSpec`] as a model file writes it.
#[derive(Serialize, Deserialize)]
struct ConvTransposeFile {
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 2],
    stride: Pair,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    padding: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pads: Option<[usize; 4]>,
    output_padding: Pair,
    dilation: usize,
    groups: usize,
    bias: bool,
}

impl From<ConvTransposeFile> for ConvTransposeSpec {
    fn from(f: ConvTransposeFile) -> Self {
        ConvTransposeSpec {
            in_channels: f.in_channels,
            out_channels: f.out_channels,
            kernel: f.kernel,
            stride: f.stride.both(),
            pads: f.pads.unwrap_or([f.padding.unwrap_or(0); 4]),
            output_padding: f.output_padding.both(),
            dilation: f.dilation,
            groups: f.groups,
            bias: f.bias,
        }
    }
}

impl From<ConvTransposeSpec> for ConvTransposeFile {
    fn from(c: ConvTransposeSpec) -> Self {
        let even = c.pads.iter().all(|&p| p == c.pads[0]);
        ConvTransposeFile {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            kernel: c.kernel,
            stride: Pair::of(c.stride),
            padding: even.then_some(c.pads[0]),
            pads: (!even).then_some(c.pads),
            output_padding: Pair::of(c.output_padding),
            dilation: c.dilation,
            groups: c.groups,
            bias: c.bias,
        }
    }
}
