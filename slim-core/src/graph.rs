//! The graph IR: a DAG of named nodes kept in topological order.
//!
//! Invariants:
//! - a node is added with [`Graph::wire`] only after all of its inputs, so the node list is
//!   always a topological order and [`Graph::eval_order`] is simply that list;
//! - every node's per-sample output shape (without the batch axis) is inferred when it is
//!   wired, and any error names the node;
//! - node names are unique and made of `[A-Za-z0-9_.-]`, so that the dotted parameter names
//!   derived from them (`<node>.weight`, `<node>.bias`, `<node>.running_mean`, ...) are stable.
//!
//! Shapes are per sample: `[C, H, W]` for feature maps and `[F]` for feature vectors. The
//! batch axis is added by execution.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

mod kinds;
mod window;
pub use kinds::{
    broadcast_shape, BinaryKind, CoordMode, Crop, Float8, LrnSpec, NearestRounding, PadMode,
    ReduceKind, ResizeMode, ResizeSpec, UnaryKind,
};
pub use window::{ConvTransposeSpec, PoolSpec, SquarePool};

pub use slim_kernels::Conv2dSpec;

/// A fully connected layer on a feature vector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearSpec {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

/// Batch normalization over the channel axis (running statistics kept as buffers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNormSpec {
    pub channels: usize,
    pub eps: f64,
    /// Weight of the batch statistic in the running average (PyTorch's convention).
    pub momentum: f64,
}

/// The largest size a graph may name: a dimension, a channel or feature count, a kernel, a
/// stride, a padding, a dilation.
pub const MAX_DIM: usize = 1 << 24;
/// The most values a node's per-sample output, or one parameter, may hold (1 GiB in f32).
pub const MAX_ELEMENTS: usize = 1 << 28;

/// The number of values of a shape, or `None` when it overflows.
pub fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// True when a shape holds at most [`MAX_ELEMENTS`] values.
fn fits(shape: &[usize]) -> bool {
    elements(shape).is_some_and(|n| n <= MAX_ELEMENTS)
}

/// Checks a per-sample shape read from outside (a file, a message): at least one axis, no
/// zero, and within [`MAX_DIM`] and [`MAX_ELEMENTS`].
pub fn check_shape(shape: &[usize]) -> Result<(), String> {
    if shape.is_empty() || shape.contains(&0) {
        return Err(format!("shape {shape:?} must have an axis and no zero"));
    }
    if shape.iter().any(|&d| d > MAX_DIM) || !fits(shape) {
        return Err(format!(
            "shape {shape:?} exceeds the limits ({MAX_DIM} per axis, {MAX_ELEMENTS} values)"
        ));
    }
    Ok(())
}

/// A layer's `weight` of `shape`, and its `bias` of `bias` values when it has one.
fn weight_and_bias(shape: Vec<usize>, bias: Option<usize>) -> Vec<ParamSpec> {
    let mut v = vec![ParamSpec {
        role: "weight",
        shape,
        kind: ParamKind::Weight,
    }];
    if let Some(n) = bias {
        v.push(ParamSpec {
            role: "bias",
            shape: vec![n],
            kind: ParamKind::Bias,
        });
    }
    v
}

/// The sizes a convolution (plain or transposed) names, against its input's `ci` channels:
/// `[in, out, groups, stride, dilation]` at least 1 (in matching `ci`), groups dividing both
/// channel counts, a kernel of at least 1.
fn check_conv(
    ci: usize,
    [inc, out, groups, stride, dilation]: [usize; 5],
    kernel: [usize; 2],
) -> Result<(), String> {
    if groups == 0 || stride == 0 || dilation == 0 {
        return Err("groups, stride and dilation must be at least 1".into());
    }
    if kernel.contains(&0) || out == 0 {
        return Err("kernel and output channels must be at least 1".into());
    }
    if ci != inc {
        return Err(format!("expects {inc} input channels, its input has {ci}"));
    }
    if inc % groups != 0 || out % groups != 0 {
        return Err(format!(
            "groups={groups} must divide input ({inc}) and output ({out}) channels"
        ));
    }
    Ok(())
}

/// Levenshtein distance between two strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The operations of the IR. The set is closed on purpose: a `match` over it makes the
/// compiler list every place (shape inference, execution, analysis, channel groups) that must
/// learn a new op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A model input with its per-sample shape.
    Input {
        shape: Vec<usize>,
    },
    Conv2d(Conv2dSpec),
    Linear(LinearSpec),
    BatchNorm2d(BatchNormSpec),
    Relu,
    Relu6,
    HardSwish,
    /// `clamp(alpha * x + beta, 0, 1)`, the gate of squeeze-and-excite blocks (PyTorch's
    /// `hardsigmoid` is alpha 1/6, beta 1/2).
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    Sigmoid,
    /// `clamp(x, min, max)`; a missing bound is no bound (ReLU and ReLU6 have ops of their own).
    Clip {
        min: Option<f32>,
        max: Option<f32>,
    },
    /// `x` where positive, `alpha * x` elsewhere.
    LeakyRelu {
        alpha: f32,
    },
    /// `x` where positive, `slope[c] * x` elsewhere, with a learned slope per channel (its
    /// parameter `weight`, shape `[C]`).
    PRelu {
        channels: usize,
    },
    Tanh,
    /// `x * sigmoid(x)` (also called swish).
    Silu,
    /// `x * Φ(x)` with the exact normal CDF: `0.5 * x * (1 + erf(x / √2))`.
    Gelu,
    /// GELU's tanh approximation: `0.5 * x * (1 + tanh(√(2/π) * (x + 0.044715 * x³)))`.
    GeluTanh,
    /// The error function, element-wise.
    Erf,
    /// `x * weight[c] + bias[c]` per channel (parameters `weight` and `bias`, shape `[C]`): what
    /// exporters write as a Mul and an Add by constants, where no layer before can absorb them.
    ChannelAffine {
        channels: usize,
    },
    /// Element-wise sum of two or more inputs of one shape.
    Add,
    /// Product of two inputs: element-wise for equal shapes, or channel-wise when the second
    /// input is a per-channel vector (`[C]` or `[C, 1, 1]`), as in squeeze-and-excite.
    Mul,
    /// Concatenation along the channel axis.
    Concat,
    MaxPool2d(PoolSpec),
    /// Average pooling; padding counts as zeros.
    AvgPool2d(PoolSpec),
    /// Mean over the spatial axes: `[C, H, W]` to `[C]`.
    GlobalAvgPool,
    /// `[C, H, W]` to `[C * H * W]`, channel-major.
    Flatten,
    Dropout {
        p: f32,
    },
    /// Softmax over the channel (or feature) axis.
    Softmax,
    /// Local response normalization across channels.
    Lrn(LrnSpec),
    ConvTranspose2d(ConvTransposeSpec),
    /// A linear layer over the last axis of values of any rank (`[..., in]` to `[..., out]`),
    /// as attention blocks and token MLPs apply it; parameters as [`Op::Linear`]'s.
    Dense(LinearSpec),
    /// The product of two data values over their last two axes, the axes before them
    /// broadcast (attention's `Q · Kᵀ` and `A · V`).
    MatMul,
    /// Element-wise arithmetic of two data values whose shapes broadcast.
    Binary(BinaryKind),
    /// Element-wise arithmetic of a value and a constant (its parameter `value`, of `shape`,
    /// broadcast against the value); `reversed` puts the constant first (`c - x`).
    ConstBinary {
        kind: BinaryKind,
        shape: Vec<usize>,
        reversed: bool,
    },
    Sqrt,
    /// `1 / x`.
    Reciprocal,
    /// An element-wise function: exponentials, logarithms and smooth activations.
    Unary(UnaryKind),
    /// Per-sample reshape (the batch axis kept).
    Reshape {
        shape: Vec<usize>,
    },
    /// Per-sample axes permuted: axis `i` of the output is axis `perm[i]` of the input.
    Transpose {
        perm: Vec<usize>,
    },
    /// Softmax over one per-sample axis.
    SoftmaxAt {
        axis: usize,
    },
    /// A reduction over per-sample axes (kept as ones when `keep`).
    Reduce {
        kind: ReduceKind,
        axes: Vec<usize>,
        keep: bool,
    },
    /// Layer normalization over the per-sample axes from `from` on, with a learned `weight`
    /// and `bias` of those axes' shape.
    LayerNorm {
        from: usize,
        shape: Vec<usize>,
        eps: f64,
    },
    /// Concatenation along one per-sample axis.
    ConcatAt {
        axis: usize,
    },
    /// Positions `start, start + step, ...` below `end` of one per-sample axis; `backward`,
    /// positions `end - 1, end - 1 - step, ...` not below `start` (ONNX's negative steps).
    Slice {
        axis: usize,
        start: usize,
        end: usize,
        step: usize,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        backward: bool,
    },
    /// Spatial padding of `[C, H, W]` values: `pads` are top, left, bottom, right.
    Pad {
        pads: [usize; 4],
        mode: PadMode,
    },
    Resize(ResizeSpec),
    /// ShuffleNet's channel shuffle: the channels, seen as a `[groups, C / groups]` grid, are
    /// read out column by column (ONNX writes it as Reshape, Transpose, Reshape).
    ChannelShuffle {
        groups: usize,
    },
    Identity,
    /// A constant of per-sample `shape` (its parameter `value`), the same for every sample:
    /// its one input gives only the batch size (an imported model's constant fed to a
    /// Concat or a MatMul, or expanded over the batch: a transformer's class token).
    Constant {
        shape: Vec<usize>,
    },
    /// Simulated symmetric quantization of the values that pass through (see
    /// [`FakeQuantSpec`]); its one parameter is the buffer `scale` (shape `[1]`).
    FakeQuant(FakeQuantSpec),
}

/// Simulated symmetric quantization: `clamp(round(x / scale), -q, q) * scale` with
/// `q = 2^(bits-1) - 1`, and a straight-through gradient (1 inside the range, 0 outside).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FakeQuantSpec {
    pub bits: u8,
    /// In train mode the scale follows the batches' absolute maximum as a moving average with
    /// this rate (`moving_average_abs_max`, 0.9 by default); 0 keeps the scale fixed.
    pub moving_rate: f32,
    /// In train mode, when above 0, the scale is the largest of the last `window` batches'
    /// absolute maxima (PaddleSlim's `range_abs_max`), kept in the buffers `window_max`
    /// (one value per batch, a ring) and `window_step` (the batches seen); it takes the place
    /// of `moving_rate`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub window: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl FakeQuantSpec {
    /// The largest quantized magnitude, `2^(bits-1) - 1`.
    pub fn qmax(&self) -> f32 {
        ((1u32 << (self.bits.clamp(2, 16) - 1)) - 1) as f32
    }
}

/// What a parameter is for: trained weights and biases, or buffers (running statistics) that
/// are updated by execution and never by an optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    Weight,
    Bias,
    Buffer,
}

impl ParamKind {
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamKind::Buffer)
    }
}

/// A parameter that a node owns: its role (`weight`, `bias`, `running_mean`, `running_var`),
/// shape and kind. Its full name is `<node>.<role>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub role: &'static str,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl Op {
    /// A short lowercase name of the op kind, as it appears in tables.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Conv2d(c) if c.is_depthwise() => "dwconv2d",
            Op::Conv2d(_) => "conv2d",
            Op::Linear(_) => "linear",
            Op::BatchNorm2d(_) => "batchnorm2d",
            Op::Relu => "relu",
            Op::Relu6 => "relu6",
            Op::HardSwish => "hardswish",
            Op::HardSigmoid { .. } => "hardsigmoid",
            Op::Sigmoid => "sigmoid",
            Op::Clip { .. } => "clip",
            Op::LeakyRelu { .. } => "leakyrelu",
            Op::PRelu { .. } => "prelu",
            Op::Tanh => "tanh",
            Op::Silu => "silu",
            Op::Gelu => "gelu",
            Op::GeluTanh => "gelutanh",
            Op::Erf => "erf",
            Op::ChannelAffine { .. } => "channelaffine",
            Op::Add => "add",
            Op::Mul => "mul",
            Op::Concat => "concat",
            Op::MaxPool2d(_) => "maxpool2d",
            Op::AvgPool2d(_) => "avgpool2d",
            Op::GlobalAvgPool => "globalavgpool",
            Op::Flatten => "flatten",
            Op::Dropout { .. } => "dropout",
            Op::Softmax => "softmax",
            Op::Lrn(_) => "lrn",
            Op::ConvTranspose2d(_) => "convtranspose2d",
            Op::Dense(_) => "dense",
            Op::MatMul => "matmul",
            Op::Binary(_) => "binary",
            Op::ConstBinary { .. } => "constbinary",
            Op::Sqrt => "sqrt",
            Op::Reciprocal => "reciprocal",
            Op::Unary(_) => "unary",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::SoftmaxAt { .. } => "softmaxat",
            Op::Reduce { .. } => "reduce",
            Op::LayerNorm { .. } => "layernorm",
            Op::ConcatAt { .. } => "concatat",
            Op::Slice { .. } => "slice",
            Op::Pad { .. } => "pad",
            Op::Resize(_) => "resize",
            Op::ChannelShuffle { .. } => "channelshuffle",
            Op::Identity => "identity",
            Op::Constant { .. } => "constant",
            Op::FakeQuant(_) => "fakequant",
        }
    }

    /// The parameters this op owns, in a fixed order.
    pub fn params(&self) -> Vec<ParamSpec> {
        let spec = |role, shape, kind| ParamSpec { role, shape, kind };
        match self {
            Op::Conv2d(c) => weight_and_bias(
                vec![
                    c.out_channels,
                    c.in_channels / c.groups.max(1),
                    c.kernel[0],
                    c.kernel[1],
                ],
                c.bias.then_some(c.out_channels),
            ),
            Op::Linear(l) | Op::Dense(l) => weight_and_bias(
                vec![l.out_features, l.in_features],
                l.bias.then_some(l.out_features),
            ),
            Op::FakeQuant(q) if q.window > 0 => vec![
                spec("scale", vec![1], ParamKind::Buffer),
                spec("window_max", vec![q.window], ParamKind::Buffer),
                spec("window_step", vec![1], ParamKind::Buffer),
            ],
            Op::FakeQuant(_) => vec![spec("scale", vec![1], ParamKind::Buffer)],
            Op::ConvTranspose2d(c) => weight_and_bias(
                vec![
                    c.in_channels,
                    c.out_channels / c.groups.max(1),
                    c.kernel[0],
                    c.kernel[1],
                ],
                c.bias.then_some(c.out_channels),
            ),
            Op::PRelu { channels } => vec![spec("weight", vec![*channels], ParamKind::Weight)],
            Op::LayerNorm { shape, .. } => vec![
                spec("weight", shape.clone(), ParamKind::Weight),
                spec("bias", shape.clone(), ParamKind::Bias),
            ],
            Op::ConstBinary { shape, .. } | Op::Constant { shape } => {
                vec![spec("value", shape.clone(), ParamKind::Buffer)]
            }
            Op::ChannelAffine { channels } => vec![
                spec("weight", vec![*channels], ParamKind::Weight),
                spec("bias", vec![*channels], ParamKind::Bias),
            ],
            Op::BatchNorm2d(b) => vec![
                spec("weight", vec![b.channels], ParamKind::Weight),
                spec("bias", vec![b.channels], ParamKind::Bias),
                spec("running_mean", vec![b.channels], ParamKind::Buffer),
                spec("running_var", vec![b.channels], ParamKind::Buffer),
            ],
            _ => Vec::new(),
        }
    }

    /// The sizes this op names (channels, features, kernel, stride, padding, dilation, groups,
    /// the input's dimensions), each at most [`MAX_DIM`].
    fn check_sizes(&self) -> Result<(), String> {
        let sizes: Vec<(&str, usize)> = match self {
            Op::Input { shape } => shape.iter().map(|&d| ("input dimension", d)).collect(),
            Op::Conv2d(c) => vec![
                ("in_channels", c.in_channels),
                ("out_channels", c.out_channels),
                ("kernel", c.kernel[0]),
                ("kernel", c.kernel[1]),
                ("stride", c.stride),
                ("padding", c.padding),
                ("dilation", c.dilation),
                ("groups", c.groups),
            ],
            Op::Linear(l) | Op::Dense(l) => vec![
                ("in_features", l.in_features),
                ("out_features", l.out_features),
            ],
            Op::Reshape { shape } | Op::ConstBinary { shape, .. } | Op::Constant { shape } => {
                shape.iter().map(|&d| ("dimension", d)).collect()
            }
            Op::Slice {
                start, end, step, ..
            } => vec![("start", *start), ("end", *end), ("step", *step)],
            Op::BatchNorm2d(b) => vec![("channels", b.channels)],
            Op::PRelu { channels } | Op::ChannelAffine { channels } => {
                vec![("channels", *channels)]
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                let pairs = [
                    ("kernel", p.kernel),
                    ("stride", p.stride),
                    ("dilation", p.dilation),
                ];
                let sides = p.pads.iter().map(|&v| ("padding", v));
                pairs
                    .into_iter()
                    .flat_map(|(what, v)| v.map(|v| (what, v)))
                    .chain(sides)
                    .collect()
            }
            Op::Lrn(l) => vec![("size", l.size)],
            Op::ConvTranspose2d(c) => {
                let pairs = [
                    ("kernel", c.kernel),
                    ("stride", c.stride),
                    ("output_padding", c.output_padding),
                ];
                let sides = c.pads.iter().map(|&p| ("padding", p));
                [
                    ("in_channels", c.in_channels),
                    ("out_channels", c.out_channels),
                    ("dilation", c.dilation),
                    ("groups", c.groups),
                ]
                .into_iter()
                .chain(pairs.into_iter().flat_map(|(what, v)| v.map(|v| (what, v))))
                .chain(sides)
                .collect()
            }
            Op::Pad { pads, .. } => pads.iter().map(|&p| ("padding", p)).collect(),
            Op::Resize(r) => vec![("output height", r.out[0]), ("output width", r.out[1])],
            Op::ChannelShuffle { groups } => vec![("groups", *groups)],
            _ => Vec::new(),
        };
        match sizes.iter().find(|(_, v)| *v > MAX_DIM) {
            Some((what, v)) => Err(format!("{what} {v} exceeds the limit of {MAX_DIM}")),
            None => Ok(()),
        }
    }

    /// Infers the per-sample output shape from the input shapes, or says what is wrong. Sizes
    /// are bounded ([`MAX_DIM`], [`MAX_ELEMENTS`]), so that no later product overflows and no
    /// file can ask for an impossible allocation.
    pub fn infer_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>, String> {
        self.check_sizes()?;
        if let Some(empty) = inputs.iter().find(|s| s.contains(&0)) {
            if !self.takes_empty() {
                return Err(format!(
                    "its input {empty:?} holds no value (an axis of length 0); Slim computes \
                     {} only on values that hold some",
                    self.kind()
                ));
            }
        }
        let shape = self.infer_shape_unbounded(inputs)?;
        if !fits(&shape) {
            return Err(format!(
                "its output {shape:?} exceeds the limit of {MAX_ELEMENTS} values per sample"
            ));
        }
        if let Some(p) = self.params().into_iter().find(|p| !fits(&p.shape)) {
            return Err(format!(
                "its {} {:?} exceeds the limit of {MAX_ELEMENTS} values",
                p.role, p.shape
            ));
        }
        Ok(shape)
    }

    /// Whether the op computes values with an axis of length 0 (an empty set): element-wise
    /// arithmetic, whose result is as empty, and the reductions, which give their identity
    /// over an empty axis (0 for sums, `-inf` for a maximum, `inf` for a minimum).
    fn takes_empty(&self) -> bool {
        match self {
            Op::Reduce { kind, .. } => !matches!(
                kind,
                ReduceKind::ArgMax
                    | ReduceKind::ArgMaxLast
                    | ReduceKind::ArgMin
                    | ReduceKind::ArgMinLast
            ),
            Op::Unary(_)
            | Op::Binary(_)
            | Op::ConstBinary { .. }
            | Op::Identity
            | Op::Add
            | Op::Mul
            | Op::Sqrt
            | Op::Reciprocal => true,
            _ => false,
        }
    }

    fn infer_shape_unbounded(&self, inputs: &[&[usize]]) -> Result<Vec<usize>, String> {
        type Rule = fn(&Op, &[&[usize]]) -> Result<Option<Vec<usize>>, String>;
        let rules: [Rule; 7] = [
            Op::layer_shape,
            Op::activation_shape,
            Op::window_shape,
            Op::spatial_shape,
            Op::arithmetic_shape,
            Op::axis_shape,
            Op::join_shape,
        ];
        for rule in rules {
            if let Some(shape) = rule(self, inputs)? {
                return Ok(shape);
            }
        }
        Err(format!("{} has no shape rule", self.kind()))
    }

    /// The input and layers with weights. `None` for other ops.
    /// Refuses `inputs` unless there are `n` of them.
    fn arity(&self, inputs: &[&[usize]], n: usize) -> Result<(), String> {
        if inputs.len() == n {
            Ok(())
        } else {
            Err(format!(
                "{} takes {n} input(s), got {}",
                self.kind(),
                inputs.len()
            ))
        }
    }

    /// A feature map's `(C, H, W)`.
    fn chw(&self, s: &[usize]) -> Result<(usize, usize, usize), String> {
        match *s {
            [c, h, w] => Ok((c, h, w)),
            _ => Err(format!(
                "{} expects a [C, H, W] input, got {s:?}",
                self.kind()
            )),
        }
    }

    fn layer_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::Input { shape } => {
                self.arity(inputs, 0)?;
                if shape.is_empty() {
                    return Err("an input of no axes (a sample is one number or more)".into());
                }
                Ok(shape.clone())
            }
            Op::Conv2d(c) => {
                self.arity(inputs, 1)?;
                let (ci, h, w) = self.chw(inputs[0])?;
                check_conv(
                    ci,
                    [
                        c.in_channels,
                        c.out_channels,
                        c.groups,
                        c.stride,
                        c.dilation,
                    ],
                    c.kernel,
                )?;
                let (oh, ow) = c.out_size(h, w).ok_or_else(|| {
                    format!("kernel {:?} does not fit the {h}x{w} input", c.kernel)
                })?;
                Ok(vec![c.out_channels, oh, ow])
            }
            Op::Linear(l) => {
                self.arity(inputs, 1)?;
                match inputs[0] {
                    [f] if *f == l.in_features && l.out_features > 0 => Ok(vec![l.out_features]),
                    [f] => Err(format!(
                        "expects {} input features and at least one output, its input has {f}",
                        l.in_features
                    )),
                    s => Err(format!(
                        "linear expects a [F] input (flatten first), got {s:?}"
                    )),
                }
            }
            Op::BatchNorm2d(b) => {
                self.arity(inputs, 1)?;
                let s = inputs[0];
                if s.len() != 3 && s.len() != 1 {
                    return Err(format!("batchnorm expects [C, H, W] or [C], got {s:?}"));
                }
                if s[0] != b.channels {
                    return Err(format!(
                        "expects {} channels, its input has {}",
                        b.channels, s[0]
                    ));
                }
                Ok(s.to_vec())
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }

    /// Element-wise functions and channel-wise layers without a change of shape. `None` for other ops.
    fn activation_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::LeakyRelu { alpha } if !alpha.is_finite() => {
                Err(format!("leaky relu's alpha {alpha} is not finite"))
            }
            Op::HardSigmoid { alpha, beta } if !(alpha.is_finite() && beta.is_finite()) => Err(
                format!("hard sigmoid's alpha {alpha} and beta {beta} must be finite"),
            ),
            Op::Relu
            | Op::Relu6
            | Op::HardSwish
            | Op::HardSigmoid { .. }
            | Op::Sigmoid
            | Op::LeakyRelu { .. }
            | Op::Tanh
            | Op::Silu
            | Op::Gelu
            | Op::GeluTanh
            | Op::Erf
            | Op::Unary(_)
            | Op::Dropout { .. }
            | Op::Softmax
            | Op::Identity
            | Op::FakeQuant(_) => {
                self.arity(inputs, 1)?;
                Ok(inputs[0].to_vec())
            }
            Op::Clip { min, max } => {
                self.arity(inputs, 1)?;
                let bad = |v: &Option<f32>| v.is_some_and(|v| !v.is_finite());
                if bad(min) || bad(max) || matches!((min, max), (Some(a), Some(b)) if a > b) {
                    return Err(format!(
                            "clip bounds {min:?} and {max:?} must be finite, the lower not above the upper"
                        ));
                }
                Ok(inputs[0].to_vec())
            }
            Op::PRelu { channels } | Op::ChannelAffine { channels } => {
                self.arity(inputs, 1)?;
                if inputs[0].first() != Some(channels) {
                    return Err(format!(
                        "{} of {channels} channels on an input of shape {:?}",
                        self.kind(),
                        inputs[0]
                    ));
                }
                Ok(inputs[0].to_vec())
            }
            Op::Lrn(l) => {
                self.arity(inputs, 1)?;
                self.chw(inputs[0])?;
                if l.size == 0 || !(l.alpha.is_finite() && l.beta.is_finite() && l.bias.is_finite())
                {
                    return Err(format!(
                        "lrn needs a size of at least 1 and finite alpha, beta and bias, got {l:?}"
                    ));
                }
                Ok(inputs[0].to_vec())
            }
            Op::Sqrt | Op::Reciprocal => {
                self.arity(inputs, 1)?;
                Ok(inputs[0].to_vec())
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }

    /// Transposed convolutions and pooling. `None` for other ops.
    fn window_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::ConvTranspose2d(c) => {
                self.arity(inputs, 1)?;
                let (ci, h, w) = self.chw(inputs[0])?;
                check_conv(
                    ci,
                    [
                        c.in_channels,
                        c.out_channels,
                        c.groups,
                        c.stride[0].min(c.stride[1]),
                        c.dilation,
                    ],
                    c.kernel,
                )?;
                for axis in 0..2 {
                    if c.output_padding[axis] >= c.stride[axis].max(c.dilation) {
                        return Err(format!(
                            "output_padding {:?} must be below the stride {:?} or the dilation {}",
                            c.output_padding, c.stride, c.dilation
                        ));
                    }
                }
                let (oh, ow) = c.out_size(h, w).ok_or_else(|| {
                    format!("padding {:?} leaves no output of the {h}x{w} input", c.pads)
                })?;
                Ok(vec![c.out_channels, oh, ow])
            }
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                self.arity(inputs, 1)?;
                let (c, h, w) = self.chw(inputs[0])?;
                if [p.kernel, p.stride, p.dilation]
                    .iter()
                    .flatten()
                    .any(|&v| v == 0)
                {
                    return Err("pool kernel, stride and dilation must be at least 1".into());
                }
                // Every window reaches the input: no side's padding spans a whole window.
                for (side, &pad) in p.pads.iter().enumerate() {
                    if pad >= p.span(side % 2) {
                        return Err(format!(
                            "padding {:?} (top, left, bottom, right): each must stay below the window's extent {}x{}",
                            p.pads,
                            p.span(0),
                            p.span(1)
                        ));
                    }
                }
                match (p.out_size(0, h), p.out_size(1, w)) {
                    (Some(oh), Some(ow)) => Ok(vec![c, oh, ow]),
                    _ => Err(format!(
                        "pool window {}x{} does not fit the {h}x{w} input",
                        p.span(0),
                        p.span(1)
                    )),
                }
            }
            Op::GlobalAvgPool => {
                self.arity(inputs, 1)?;
                let (c, _, _) = self.chw(inputs[0])?;
                Ok(vec![c])
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }

    /// Padding, resizing, shuffling and flattening of feature maps. `None` for other ops.
    fn spatial_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::Pad { pads, mode } => {
                self.arity(inputs, 1)?;
                let (c, h, w) = self.chw(inputs[0])?;
                if let PadMode::Reflect = mode {
                    if pads[0].max(pads[2]) >= h || pads[1].max(pads[3]) >= w {
                        return Err(format!(
                            "reflect padding {pads:?} must stay below the {h}x{w} input's size"
                        ));
                    }
                }
                if let PadMode::Constant(v) = mode {
                    if !v.is_finite() {
                        return Err(format!("the padding value {v} is not finite"));
                    }
                }
                Ok(vec![c, h + pads[0] + pads[2], w + pads[1] + pads[3]])
            }
            Op::Resize(r) => {
                self.arity(inputs, 1)?;
                let (c, _, _) = self.chw(inputs[0])?;
                if r.out.contains(&0) || r.scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(format!(
                        "resize to {:?} with scales {:?}: sizes and scales must be positive",
                        r.out, r.scale
                    ));
                }
                let crop_ok = match (&r.coord, &r.crop) {
                    (CoordMode::TfCropAndResize, Some(c)) => {
                        c.roi.iter().all(|v| v.is_finite()) && c.extrapolation.is_finite()
                    }
                    (CoordMode::TfCropAndResize, None) => false,
                    _ => true,
                };
                if !crop_ok {
                    return Err(format!(
                        "a crop-and-resize needs a finite region and fill value, not {:?}",
                        r.crop
                    ));
                }
                Ok(vec![c, r.out[0], r.out[1]])
            }
            Op::ChannelShuffle { groups } => {
                self.arity(inputs, 1)?;
                let (c, _, _) = self.chw(inputs[0])?;
                if *groups == 0 || c % groups != 0 {
                    return Err(format!(
                            "channel shuffle of {c} channels in {groups} groups: groups must divide the channels"
                        ));
                }
                Ok(inputs[0].to_vec())
            }
            Op::Flatten => {
                self.arity(inputs, 1)?;
                Ok(vec![inputs[0].iter().product()])
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }

    /// Arithmetic, products and constants. `None` for other ops.
    fn arithmetic_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::Dense(l) => {
                self.arity(inputs, 1)?;
                let s = inputs[0];
                if s.last() != Some(&l.in_features) || l.out_features == 0 {
                    return Err(format!(
                        "dense of {} input features on a value of shape {s:?}",
                        l.in_features
                    ));
                }
                let mut out = s.to_vec();
                *out.last_mut().unwrap_or(&mut 0) = l.out_features;
                Ok(out)
            }
            Op::MatMul => {
                self.arity(inputs, 2)?;
                let (a, b) = (inputs[0], inputs[1]);
                if a.len() < 2 || b.len() < 2 || a[a.len() - 1] != b[b.len() - 2] {
                    return Err(format!("matmul of {a:?} by {b:?}: the inner sizes differ"));
                }
                let lead =
                    broadcast_shape(&a[..a.len() - 2], &b[..b.len() - 2]).ok_or_else(|| {
                        format!("matmul of {a:?} by {b:?}: the batch axes do not broadcast")
                    })?;
                let mut out = lead;
                out.extend([a[a.len() - 2], b[b.len() - 1]]);
                Ok(out)
            }
            Op::Binary(_) => {
                self.arity(inputs, 2)?;
                broadcast_shape(inputs[0], inputs[1]).ok_or_else(|| {
                    format!(
                        "shapes {:?} and {:?} do not broadcast",
                        inputs[0], inputs[1]
                    )
                })
            }
            Op::ConstBinary { shape, .. } => {
                self.arity(inputs, 1)?;
                match broadcast_shape(inputs[0], shape) {
                    Some(out) if out == inputs[0] => Ok(out),
                    _ => Err(format!(
                        "a constant of shape {shape:?} does not broadcast onto {:?}",
                        inputs[0]
                    )),
                }
            }
            Op::Constant { shape } => {
                self.arity(inputs, 1)?;
                if shape.is_empty() || shape.contains(&0) {
                    return Err(format!("a constant of shape {shape:?}"));
                }
                Ok(shape.clone())
            }
            Op::Add => {
                if inputs.len() < 2 {
                    return Err(format!("add takes at least 2 inputs, got {}", inputs.len()));
                }
                if inputs.iter().any(|s| *s != inputs[0]) {
                    return Err(format!("add needs inputs of one shape, got {inputs:?}"));
                }
                Ok(inputs[0].to_vec())
            }
            Op::Mul => {
                self.arity(inputs, 2)?;
                let (a, b) = (inputs[0], inputs[1]);
                let channel_wise = a.len() == 3 && (b == [a[0]] || b == [a[0], 1, 1]);
                if a == b || channel_wise {
                    Ok(a.to_vec())
                } else {
                    Err(format!(
                        "mul needs equal shapes or a per-channel second input, got {a:?} and {b:?}"
                    ))
                }
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }

    /// Reshapes, transposes and ops over chosen axes. `None` for other ops.
    fn axis_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::Reshape { shape } => {
                self.arity(inputs, 1)?;
                if elements(shape) != elements(inputs[0]) || shape.is_empty() || shape.contains(&0)
                {
                    return Err(format!("reshape of {:?} to {shape:?}", inputs[0]));
                }
                Ok(shape.clone())
            }
            Op::Transpose { perm } => {
                self.arity(inputs, 1)?;
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                if sorted != (0..inputs[0].len()).collect::<Vec<_>>() {
                    return Err(format!(
                        "perm {perm:?} for a value of shape {:?}",
                        inputs[0]
                    ));
                }
                Ok(perm.iter().map(|&p| inputs[0][p]).collect())
            }
            Op::SoftmaxAt { axis } => {
                self.arity(inputs, 1)?;
                if *axis >= inputs[0].len() {
                    return Err(format!("softmax over axis {axis} of {:?}", inputs[0]));
                }
                Ok(inputs[0].to_vec())
            }
            Op::Reduce { kind, axes, keep } => {
                self.arity(inputs, 1)?;
                let s = inputs[0];
                if axes.is_empty() || axes.iter().any(|&a| a >= s.len()) {
                    return Err(format!("reduction over axes {axes:?} of {s:?}"));
                }
                if kind.is_index() && axes.len() != 1 {
                    return Err(format!("{} over axes {axes:?}: one axis", kind.onnx()));
                }
                let out: Vec<usize> = (0..s.len())
                    .filter_map(|i| match (axes.contains(&i), keep) {
                        (false, _) => Some(s[i]),
                        (true, true) => Some(1),
                        (true, false) => None,
                    })
                    .collect();
                if out.is_empty() {
                    return Err(format!("reduction of {s:?} to a scalar per sample"));
                }
                Ok(out)
            }
            Op::LayerNorm { from, shape, eps } => {
                self.arity(inputs, 1)?;
                let s = inputs[0];
                if *from >= s.len() || s[*from..] != shape[..] || !(eps.is_finite() && *eps >= 0.0)
                {
                    return Err(format!(
                        "layer norm from axis {from} (eps {eps}) of {:?}",
                        inputs[0]
                    ));
                }
                Ok(inputs[0].to_vec())
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }

    /// Concatenations and slices. `None` for other ops.
    fn join_shape(&self, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>, String> {
        let shape = match self {
            Op::ConcatAt { axis } => {
                if inputs.is_empty() {
                    return Err("concat takes at least 1 input".into());
                }
                let first = inputs[0];
                if *axis >= first.len() {
                    return Err(format!("concat along axis {axis} of {first:?}"));
                }
                let mut out = first.to_vec();
                out[*axis] = 0;
                for s in inputs {
                    let same = s.len() == first.len()
                        && (0..s.len()).all(|i| i == *axis || s[i] == first[i]);
                    if !same {
                        return Err(format!("concat along axis {axis} of {inputs:?}"));
                    }
                    out[*axis] += s[*axis];
                }
                Ok(out)
            }
            Op::Slice {
                axis,
                start,
                end,
                step,
                ..
            } => {
                self.arity(inputs, 1)?;
                let s = inputs[0];
                if *axis >= s.len() || *step == 0 || start >= end || *end > s[*axis] {
                    return Err(format!(
                        "slice {start}..{end} step {step} of axis {axis} of {s:?}"
                    ));
                }
                let mut out = s.to_vec();
                out[*axis] = (end - start).div_ceil(*step);
                Ok(out)
            }
            Op::Concat => {
                if inputs.is_empty() {
                    return Err("concat takes at least 1 input".into());
                }
                let (_, h, w) = self.chw(inputs[0])?;
                let mut c = 0;
                for s in inputs {
                    let (ci, hi, wi) = self.chw(s)?;
                    if (hi, wi) != (h, w) {
                        return Err(format!("concat needs one spatial size, got {inputs:?}"));
                    }
                    c += ci;
                }
                Ok(vec![c, h, w])
            }
            _ => return Ok(None),
        };
        shape.map(Some)
    }
}

/// A node of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// Ids of the input nodes, all smaller than this node's id.
    pub inputs: Vec<usize>,
    /// Per-sample output shape, inferred when the node was wired.
    pub shape: Vec<usize>,
}

impl Node {
    /// The full dotted name of one of this node's parameters.
    pub fn param_name(&self, role: &str) -> String {
        format!("{}.{role}", self.name)
    }
    /// `(full name, spec)` of every parameter this node owns.
    pub fn params(&self) -> Vec<(String, ParamSpec)> {
        self.op
            .params()
            .into_iter()
            .map(|p| (self.param_name(p.role), p))
            .collect()
    }
}

/// A DAG of named nodes in topological order, with its designated outputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    nodes: Vec<Node>,
    by_name: HashMap<String, usize>,
    outputs: Vec<usize>,
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CoreError::node(
            name,
            "names must be non-empty and use only A-Z a-z 0-9 _ . -",
        ))
    }
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node fed by the named inputs, inferring its output shape now. Fails, naming the
    /// node, on a duplicate name, an unknown input, or shapes the op cannot take.
    pub fn wire(&mut self, name: impl Into<String>, op: Op, inputs: &[&str]) -> Result<usize> {
        let name = name.into();
        check_name(&name)?;
        if self.by_name.contains_key(&name) {
            return Err(CoreError::node(&name, "a node of this name already exists"));
        }
        let ids = inputs
            .iter()
            .map(|i| {
                self.by_name
                    .get(*i)
                    .copied()
                    .ok_or_else(|| CoreError::node(&name, format!("unknown input `{i}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.wire_ids(name, op, ids)
    }

    fn wire_ids(&mut self, name: String, op: Op, inputs: Vec<usize>) -> Result<usize> {
        let shapes: Vec<&[usize]> = inputs
            .iter()
            .map(|&i| self.nodes[i].shape.as_slice())
            .collect();
        let shape = op
            .infer_shape(&shapes)
            .map_err(|m| CoreError::node(&name, m))?;
        let id = self.nodes.len();
        self.by_name.insert(name.clone(), id);
        self.nodes.push(Node {
            name,
            op,
            inputs,
            shape,
        });
        Ok(id)
    }

    /// Names the graph's outputs (by default, the last node wired).
    pub fn set_outputs(&mut self, names: &[&str]) -> Result<()> {
        let ids = names
            .iter()
            .map(|n| self.id(n))
            .collect::<Result<Vec<_>>>()?;
        if ids.is_empty() {
            return Err(CoreError::Invalid(
                "a graph needs at least one output".into(),
            ));
        }
        self.outputs = ids;
        Ok(())
    }

    /// Ids of the output nodes.
    pub fn outputs(&self) -> Vec<usize> {
        if self.outputs.is_empty() {
            self.nodes.len().checked_sub(1).into_iter().collect()
        } else {
            self.outputs.clone()
        }
    }

    /// Ids of the input nodes, in the order they were wired.
    pub fn inputs(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n.op, Op::Input { .. }))
            .map(|(i, _)| i)
            .collect()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    pub fn node(&self, id: usize) -> &Node {
        &self.nodes[id]
    }
    /// The id of a node by name.
    pub fn id(&self, name: &str) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| CoreError::UnknownNode(name.to_string()))
    }
    /// A node by name.
    pub fn find(&self, name: &str) -> Option<&Node> {
        self.by_name.get(name).map(|&i| &self.nodes[i])
    }

    /// Up to three node names close to `name` (by edit distance, or containing it), closest
    /// first: the suggestions of an "unknown node" error.
    pub fn similar_names(&self, name: &str) -> Vec<String> {
        let limit = (name.chars().count() / 3).max(2);
        let mut scored: Vec<(usize, &str)> = self
            .nodes
            .iter()
            .filter_map(|n| {
                let d = edit_distance(name, &n.name);
                let contains =
                    !name.is_empty() && (n.name.contains(name) || name.contains(&n.name));
                (d <= limit || contains).then_some((d, n.name.as_str()))
            })
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(3)
            .map(|(_, n)| n.to_string())
            .collect()
    }

    /// The nodes that consume `id`'s output, in order.
    pub fn successors(&self, id: usize) -> Vec<usize> {
        (id + 1..self.nodes.len())
            .filter(|&j| self.nodes[j].inputs.contains(&id))
            .collect()
    }

    /// Where the output of node `id` is next rounded to an integer grid: from `id`, along
    /// each node's only reader, through at most one ReLU or ReLU6, symmetric max pooling and
    /// flattening (each commutes with rounding, being monotone or only moving values), up to
    /// a node one of whose readers `quantizer` picks. Gives the nodes passed (without `id`)
    /// and that reader; `None` where the walk meets a graph output, a node with no reader, or
    /// a node it cannot pass before finding one.
    pub fn quantized_chain(
        &self,
        id: usize,
        quantizer: impl Fn(&Node) -> bool,
    ) -> (Vec<usize>, Option<usize>) {
        let outputs = self.outputs();
        let (mut chain, mut cur, mut activation) = (Vec::new(), id, false);
        loop {
            if outputs.contains(&cur) {
                return (chain, None);
            }
            let readers = self.successors(cur);
            if let Some(&q) = readers.iter().find(|&&r| quantizer(&self.nodes[r])) {
                return (chain, Some(q));
            }
            let [next] = readers[..] else {
                return (chain, None);
            };
            match &self.nodes[next].op {
                Op::Relu | Op::Relu6 if !activation => activation = true,
                Op::MaxPool2d(p) if p.is_symmetric() => {}
                Op::Flatten => {}
                _ => return (chain, None),
            }
            chain.push(next);
            cur = next;
        }
    }

    /// For every node, how many times its output is consumed (outputs count once more).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut uses = vec![0; self.nodes.len()];
        for n in &self.nodes {
            for &i in &n.inputs {
                uses[i] += 1;
            }
        }
        for o in self.outputs() {
            uses[o] += 1;
        }
        uses
    }

    /// The order in which nodes are evaluated: the wiring order, which is topological.
    pub fn eval_order(&self) -> std::ops::Range<usize> {
        0..self.nodes.len()
    }

    /// Every parameter of the graph: `(full name, spec)`, in node order.
    pub fn param_specs(&self) -> Vec<(String, ParamSpec)> {
        self.nodes.iter().flat_map(Node::params).collect()
    }

    /// Rebuilds the graph with each node's op replaced by `f(node)`, re-inferring every
    /// shape. Used by surgery; fails (naming the node) if the new ops do not fit together.
    pub fn map_ops(&self, mut f: impl FnMut(&Node) -> Op) -> Result<Graph> {
        self.map_ops_on(|n, _| f(n))
    }

    /// [`Graph::map_ops`] where `f` also reads the new shapes of the node's inputs.
    pub fn map_ops_on(&self, mut f: impl FnMut(&Node, &[&[usize]]) -> Op) -> Result<Graph> {
        let mut g = Graph::new();
        for n in &self.nodes {
            let shapes: Vec<&[usize]> = n
                .inputs
                .iter()
                .map(|&i| g.nodes[i].shape.as_slice())
                .collect();
            let op = f(n, &shapes);
            g.by_name.insert(n.name.clone(), g.nodes.len());
            let shape = op
                .infer_shape(&shapes)
                .map_err(|m| CoreError::node(&n.name, m))?;
            g.nodes.push(Node {
                name: n.name.clone(),
                op,
                inputs: n.inputs.clone(),
                shape,
            });
        }
        g.outputs = self.outputs.clone();
        Ok(g)
    }

    /// A serializable description of the graph (what model files store).
    pub fn to_def(&self) -> GraphDef {
        GraphDef {
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeDef {
                    name: n.name.clone(),
                    op: n.op.clone(),
                    inputs: n
                        .inputs
                        .iter()
                        .map(|&i| self.nodes[i].name.clone())
                        .collect(),
                })
                .collect(),
            outputs: self
                .outputs()
                .iter()
                .map(|&i| self.nodes[i].name.clone())
                .collect(),
        }
    }

    /// Rebuilds a graph from its description, checking every node as it is wired.
    pub fn from_def(def: &GraphDef) -> Result<Graph> {
        let mut g = Graph::new();
        for n in &def.nodes {
            let inputs: Vec<&str> = n.inputs.iter().map(String::as_str).collect();
            g.wire(n.name.clone(), n.op.clone(), &inputs)?;
        }
        if g.is_empty() {
            return Err(CoreError::Invalid("the graph has no nodes".into()));
        }
        let outs: Vec<&str> = def.outputs.iter().map(String::as_str).collect();
        g.set_outputs(&outs)?;
        Ok(g)
    }
}

/// One node as stored in a model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeDef {
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
    #[serde(default)]
    pub inputs: Vec<String>,
}

/// A graph as stored in a model file: nodes in topological order and the output names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GraphDef {
    pub nodes: Vec<NodeDef>,
    pub outputs: Vec<String>,
}

/// A fluent builder for hand-written models. It keeps a cursor (the last node added) that
/// the next layer is fed from, and remembers the first error, which [`GraphBuilder::build`]
/// returns.
///
/// ```
/// use slim_core::GraphBuilder;
/// let g = GraphBuilder::new([1, 28, 28])
///     .conv("conv1", 8, 3, 1, 1)
///     .relu("relu1")
///     .max_pool("pool1", 2, 2)
///     .flatten("flat")
///     .linear("fc", 10)
///     .build()
///     .unwrap();
/// assert_eq!(g.node(g.outputs()[0]).shape, vec![10]);
/// ```
#[derive(Debug)]
pub struct GraphBuilder {
    graph: Graph,
    cursor: String,
    error: Option<CoreError>,
}

impl GraphBuilder {
    /// Starts a graph with one input node named `input` of the given per-sample shape.
    pub fn new(shape: impl Into<Vec<usize>>) -> Self {
        let mut b = GraphBuilder {
            graph: Graph::new(),
            cursor: "input".into(),
            error: None,
        };
        b.add_node(
            "input",
            Op::Input {
                shape: shape.into(),
            },
            &[],
        );
        b
    }

    /// The name of the node the next layer will be fed from.
    pub fn cursor(&self) -> &str {
        &self.cursor
    }
    /// Moves the cursor to a node added earlier (for branches).
    pub fn at(&mut self, name: &str) -> &mut Self {
        if self.error.is_none() && self.graph.find(name).is_none() {
            self.error = Some(CoreError::UnknownNode(name.to_string()));
        }
        self.cursor = name.to_string();
        self
    }
    /// The per-sample shape at the cursor (empty after an error).
    pub fn shape(&self) -> Vec<usize> {
        self.graph
            .find(&self.cursor)
            .map(|n| n.shape.clone())
            .unwrap_or_default()
    }
    fn channels(&self) -> usize {
        self.shape().first().copied().unwrap_or(0)
    }

    /// Adds any op fed by the named inputs and moves the cursor to it.
    pub fn add_node(&mut self, name: &str, op: Op, inputs: &[&str]) -> &mut Self {
        if self.error.is_none() {
            if let Err(e) = self.graph.wire(name, op, inputs) {
                self.error = Some(e);
            }
        }
        self.cursor = name.to_string();
        self
    }
    /// Adds a single-input op fed from the cursor.
    pub fn push(&mut self, name: &str, op: Op) -> &mut Self {
        let from = self.cursor.clone();
        self.add_node(name, op, &[&from])
    }

    /// A dense convolution with a square kernel and no bias.
    pub fn conv(
        &mut self,
        name: &str,
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> &mut Self {
        let spec = Conv2dSpec::new(self.channels(), out, kernel)
            .with_stride(stride)
            .with_padding(padding);
        self.push(name, Op::Conv2d(spec))
    }
    /// A convolution described in full; its input channels are taken from the cursor.
    pub fn conv_with(&mut self, name: &str, mut spec: Conv2dSpec) -> &mut Self {
        spec.in_channels = self.channels();
        self.push(name, Op::Conv2d(spec))
    }
    /// A depthwise convolution (one square filter per channel, no bias).
    pub fn dwconv(
        &mut self,
        name: &str,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> &mut Self {
        let c = self.channels();
        let spec = Conv2dSpec::new(c, c, kernel)
            .with_stride(stride)
            .with_padding(padding)
            .with_groups(c);
        self.push(name, Op::Conv2d(spec))
    }
    /// A fully connected layer with bias.
    pub fn linear(&mut self, name: &str, out: usize) -> &mut Self {
        let spec = LinearSpec {
            in_features: self.channels(),
            out_features: out,
            bias: true,
        };
        self.push(name, Op::Linear(spec))
    }
    /// Batch normalization with eps 1e-5 and momentum 0.1.
    pub fn bn(&mut self, name: &str) -> &mut Self {
        let spec = BatchNormSpec {
            channels: self.channels(),
            eps: 1e-5,
            momentum: 0.1,
        };
        self.push(name, Op::BatchNorm2d(spec))
    }
    pub fn relu(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::Relu)
    }
    pub fn relu6(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::Relu6)
    }
    pub fn hardswish(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::HardSwish)
    }
    /// `clamp(alpha * x + beta, 0, 1)`.
    pub fn hardsigmoid(&mut self, name: &str, alpha: f32, beta: f32) -> &mut Self {
        self.push(name, Op::HardSigmoid { alpha, beta })
    }
    pub fn sigmoid(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::Sigmoid)
    }
    pub fn max_pool(&mut self, name: &str, kernel: usize, stride: usize) -> &mut Self {
        self.push(name, Op::MaxPool2d(PoolSpec::new(kernel, stride, 0)))
    }
    pub fn avg_pool(&mut self, name: &str, kernel: usize, stride: usize) -> &mut Self {
        self.push(name, Op::AvgPool2d(PoolSpec::new(kernel, stride, 0)))
    }
    pub fn global_avg_pool(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::GlobalAvgPool)
    }
    pub fn flatten(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::Flatten)
    }
    pub fn dropout(&mut self, name: &str, p: f32) -> &mut Self {
        self.push(name, Op::Dropout { p })
    }
    pub fn softmax(&mut self, name: &str) -> &mut Self {
        self.push(name, Op::Softmax)
    }
    /// Element-wise sum of the named nodes.
    pub fn add(&mut self, name: &str, inputs: &[&str]) -> &mut Self {
        self.add_node(name, Op::Add, inputs)
    }
    /// Product of two named nodes (element-wise or channel-wise).
    pub fn mul(&mut self, name: &str, inputs: &[&str]) -> &mut Self {
        self.add_node(name, Op::Mul, inputs)
    }
    /// Channel concatenation of the named nodes.
    pub fn concat(&mut self, name: &str, inputs: &[&str]) -> &mut Self {
        self.add_node(name, Op::Concat, inputs)
    }

    /// Finishes the graph with the cursor as its output.
    pub fn build(&self) -> Result<Graph> {
        if let Some(e) = &self.error {
            return Err(clone_error(e));
        }
        let mut g = self.graph.clone();
        g.set_outputs(&[&self.cursor])?;
        Ok(g)
    }
}

fn clone_error(e: &CoreError) -> CoreError {
    match e {
        CoreError::Node { node, msg } => CoreError::node(node, msg),
        CoreError::UnknownNode(n) => CoreError::UnknownNode(n.clone()),
        other => CoreError::Invalid(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value with an axis of length 0 (an empty set) reaches element-wise ops and
    /// reductions, which give their identity over it; any other op refuses it by name.
    #[test]
    fn empty_values_reach_reductions_and_nothing_else() {
        use crate::exec::Mode;
        use candle_core::{Device, Tensor};
        let mut b = GraphBuilder::new(vec![0, 4]);
        b.push("abs", Op::Unary(UnaryKind::Abs)).push(
            "max",
            Op::Reduce {
                kind: ReduceKind::Max,
                axes: vec![0],
                keep: false,
            },
        );
        let g = b.build().expect("graph");
        assert_eq!(g.nodes.last().map(|n| n.shape.clone()), Some(vec![4]));
        let m = crate::Model::init(g, 0, &Device::Cpu).expect("model");
        let x = Tensor::zeros((2, 0, 4), candle_core::DType::F32, &Device::Cpu).expect("x");
        let y = m.forward(&x, Mode::Eval).expect("forward");
        assert_eq!(y.dims(), &[2, 4]);
        let v: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).expect("values");
        assert!(v.iter().all(|&v| v == f32::NEG_INFINITY), "{v:?}");
        let mut b = GraphBuilder::new(vec![0, 4, 4]);
        b.push("flat", Op::Flatten);
        let e = b.build().err().expect("Flatten of nothing").to_string();
        assert!(e.contains("flat") && e.contains("holds no value"), "{e}");
    }

    #[test]
    fn shapes_are_inferred_and_errors_name_the_node() {
        let mut g = Graph::new();
        g.wire(
            "x",
            Op::Input {
                shape: vec![3, 32, 32],
            },
            &[],
        )
        .unwrap();
        let spec = Conv2dSpec::new(3, 8, 3).with_stride(2).with_padding(1);
        g.wire("c", Op::Conv2d(spec), &["x"]).unwrap();
        assert_eq!(g.find("c").unwrap().shape, vec![8, 16, 16]);
        let bad = Conv2dSpec::new(4, 8, 3);
        let e = g
            .wire("c2", Op::Conv2d(bad), &["c"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("c2") && e.contains("input channels"), "{e}");
        let e = g.wire("c3", Op::Relu, &["nope"]).unwrap_err().to_string();
        assert!(e.contains("c3") && e.contains("nope"), "{e}");
        let e = g.wire("c", Op::Relu, &["x"]).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = g.wire(
            "f",
            Op::Linear(LinearSpec {
                in_features: 8,
                out_features: 2,
                bias: true,
            }),
            &["c"],
        );
        assert!(e.unwrap_err().to_string().contains("flatten"));
    }

    #[test]
    fn close_names_are_suggested() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("pool2", "pool2"), 0);
        let g = GraphBuilder::new([1, 8, 8])
            .conv("conv1", 4, 3, 1, 1)
            .relu("relu1")
            .conv("conv2", 4, 3, 1, 1)
            .global_avg_pool("avgpool")
            .build()
            .unwrap();
        assert_eq!(g.similar_names("conv_2"), ["conv2", "conv1"]);
        assert_eq!(g.similar_names("avgpol"), ["avgpool"]);
        assert_eq!(g.similar_names("pool"), ["avgpool"]);
        assert!(g.similar_names("classifier").is_empty());
    }

    #[test]
    fn successors_and_def_round_trip() {
        let mut b = GraphBuilder::new([3, 8, 8]);
        b.conv("a", 4, 3, 1, 1)
            .relu("r")
            .at("input")
            .conv("b", 4, 1, 1, 0);
        b.add("sum", &["r", "b"])
            .global_avg_pool("gap")
            .linear("fc", 2);
        let g = b.build().unwrap();
        assert_eq!(g.successors(0), vec![1, 3]);
        let back = Graph::from_def(&g.to_def()).unwrap();
        assert_eq!(back, g);
        let json = serde_json::to_string(&g.to_def()).unwrap();
        let def: GraphDef = serde_json::from_str(&json).unwrap();
        assert_eq!(Graph::from_def(&def).unwrap(), g);
    }

    #[test]
    fn builder_reports_the_first_error() {
        let e = GraphBuilder::new([1, 4, 4])
            .conv("c", 2, 7, 1, 0)
            .relu("r")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("`c`"), "{e}");
    }
}
