//! The parameters of the graph's elementwise, reduction, padding, resizing and normalization
//! ops: which function, which fill, which coordinates.

use serde::{Deserialize, Serialize};

/// How [`super::Op::Pad`] fills the border.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PadMode {
    /// A constant value.
    Constant(f32),
    /// The nearest edge value repeated.
    Edge,
    /// The values mirrored about the edge (the edge itself not repeated).
    Reflect,
}

/// How [`super::Op::Resize`] picks or mixes input values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Nearest neighbour, the source coordinate rounded as ONNX's `nearest_mode` says.
    Nearest(NearestRounding),
    /// Bilinear: the two neighbours on each axis, weighted by distance.
    Linear,
    /// Bicubic: the four neighbours on each axis, weighted by Keys' cubic kernel with
    /// coefficient `a` (ONNX's `cubic_coeff_a`, -0.75 by default; -0.5 is Keys' own). Taps
    /// outside the axis read its edge value, or with `exclude_outside` weigh nothing and the
    /// others are scaled to sum to one.
    Cubic { a: f32, exclude_outside: bool },
}

/// ONNX's `nearest_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NearestRounding {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// ONNX's `coordinate_transformation_mode`: where an output coordinate falls in the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoordMode {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    /// Half-pixel, shifted so that the output's centre falls on the input's when the output
    /// length was rounded from `len · scale`.
    HalfPixelSymmetric,
    /// TensorFlow's crop and resize: the output spans the region [`ResizeSpec::crop`] gives
    /// (as fractions of `len - 1`), and points outside the input take its fill value.
    TfCropAndResize,
}

/// The region of [`CoordMode::TfCropAndResize`]: where the output's first and last points
/// fall on each axis, as fractions of the axis (`0` the first input value, `1` the last), and
/// the value of points outside the input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Crop {
    /// `[height start, width start, height end, width end]`.
    pub roi: [f32; 4],
    pub extrapolation: f32,
}

/// Spatial resizing of `[C, H, W]` values to `out` (height, width); `scale` is the factor the
/// coordinates are mapped with (out / in, or the file's own scales).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeSpec {
    pub out: [usize; 2],
    pub scale: [f32; 2],
    pub mode: ResizeMode,
    pub coord: CoordMode,
    /// ONNX's `antialias`: linear and cubic resizing that shrinks an axis stretch their
    /// kernel by the inverse of its scale (every input value under it weighs in), the weights
    /// scaled to sum to one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub antialias: bool,
    /// The region and fill of [`CoordMode::TfCropAndResize`] (required by it, unused by the
    /// other modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<Crop>,
}

/// The element-wise arithmetic of [`super::Op::Binary`] and [`super::Op::ConstBinary`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryKind {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    /// The larger of the two.
    Max,
    /// The smaller of the two.
    Min,
}

impl BinaryKind {
    /// The ONNX op of the same name.
    pub fn onnx(self) -> &'static str {
        match self {
            BinaryKind::Add => "Add",
            BinaryKind::Sub => "Sub",
            BinaryKind::Mul => "Mul",
            BinaryKind::Div => "Div",
            BinaryKind::Pow => "Pow",
            BinaryKind::Max => "Max",
            BinaryKind::Min => "Min",
        }
    }
}

/// The element-wise functions of [`super::Op::Unary`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryKind {
    Abs,
    Exp,
    Log,
    /// `log(1 + exp(x))`.
    Softplus,
    /// `x / (1 + |x|)`.
    Softsign,
    /// `x · tanh(softplus(x))`.
    Mish,
    /// `x` above 0, `alpha · (exp(x) - 1)` below.
    Elu {
        alpha: f32,
    },
    /// `gamma · elu(x)` with ELU's `alpha`.
    Selu {
        alpha: f32,
        gamma: f32,
    },
}

impl UnaryKind {
    /// The ONNX op of the same name.
    pub fn onnx(self) -> &'static str {
        match self {
            UnaryKind::Abs => "Abs",
            UnaryKind::Exp => "Exp",
            UnaryKind::Log => "Log",
            UnaryKind::Softplus => "Softplus",
            UnaryKind::Softsign => "Softsign",
            UnaryKind::Mish => "Mish",
            UnaryKind::Elu { .. } => "Elu",
            UnaryKind::Selu { .. } => "Selu",
        }
    }
}

/// A reduction of [`super::Op::Reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceKind {
    Mean,
    Max,
    Sum,
    Min,
    /// The sum of absolute values.
    L1,
    /// The square root of the sum of squares.
    L2,
    SumSquare,
    /// The index of the largest value along one axis (its first occurrence), as a float.
    ArgMax,
    /// ArgMax's last occurrence.
    ArgMaxLast,
    /// The index of the smallest value along one axis (its first occurrence), as a float.
    ArgMin,
    /// ArgMin's last occurrence.
    ArgMinLast,
}

impl ReduceKind {
    /// The ONNX op of the same reduction.
    pub fn onnx(self) -> &'static str {
        match self {
            ReduceKind::Mean => "ReduceMean",
            ReduceKind::Max => "ReduceMax",
            ReduceKind::Sum => "ReduceSum",
            ReduceKind::Min => "ReduceMin",
            ReduceKind::L1 => "ReduceL1",
            ReduceKind::L2 => "ReduceL2",
            ReduceKind::SumSquare => "ReduceSumSquare",
            ReduceKind::ArgMax | ReduceKind::ArgMaxLast => "ArgMax",
            ReduceKind::ArgMin | ReduceKind::ArgMinLast => "ArgMin",
        }
    }
    /// Whether the reduction gives an index rather than a value (along one axis).
    pub fn is_index(self) -> bool {
        matches!(
            self,
            ReduceKind::ArgMax
                | ReduceKind::ArgMaxLast
                | ReduceKind::ArgMin
                | ReduceKind::ArgMinLast
        )
    }
}

/// The shape two per-sample shapes broadcast to (NumPy's rules, aligned at the last axis),
/// or `None` when they do not.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| (i + s.len()).checked_sub(n).map_or(1, |j| s[j]);
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// Local response normalization across channels (AlexNet, GoogLeNet):
/// `y_c = x_c / (bias + alpha / size * sum of x_k^2 over the `size` channels around c)^beta`,
/// the window running from `c - (size - 1) / 2` to `c + size / 2`, as ONNX defines it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrnSpec {
    pub size: usize,
    pub alpha: f32,
    pub beta: f32,
    pub bias: f32,
}
