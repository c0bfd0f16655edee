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
    /// The nearest integer, halves to even (ONNX's `Round`; its gradient is zero).
    Round,
    /// The nearest value of an 8-bit float `format` (halves to even), as a `Cast` to it and
    /// back computes: values past the format's largest become the largest (`saturate`) or
    /// its overflow value (infinity, or NaN where the format has no infinity).
    Float8 {
        format: Float8,
        saturate: bool,
    },
}

/// The 8-bit float formats of ONNX (opset 19): `E4M3FN` and `E5M2` as in the OCP 8-bit
/// floating point specification, the `FNUZ` variants with one NaN, no infinity and no
/// negative zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Float8 {
    E4M3FN,
    E4M3FNUZ,
    E5M2,
    E5M2FNUZ,
}

impl Float8 {
    /// The ONNX element type (`TensorProto.DataType`) of the format.
    pub fn onnx_type(self) -> i32 {
        match self {
            Float8::E4M3FN => 17,
            Float8::E4M3FNUZ => 18,
            Float8::E5M2 => 19,
            Float8::E5M2FNUZ => 20,
        }
    }

    /// The format of an ONNX element type.
    pub fn of_onnx(t: i32) -> Option<Float8> {
        [
            Float8::E4M3FN,
            Float8::E4M3FNUZ,
            Float8::E5M2,
            Float8::E5M2FNUZ,
        ]
        .into_iter()
        .find(|f| f.onnx_type() == t)
    }

    /// Mantissa bits, the exponent of the smallest normal value, the largest finite value.
    fn layout(self) -> (i32, i32, f64) {
        match self {
            Float8::E4M3FN => (3, -6, 448.0),
            Float8::E4M3FNUZ => (3, -7, 240.0),
            Float8::E5M2 => (2, -14, 57344.0),
            Float8::E5M2FNUZ => (2, -15, 57344.0),
        }
    }

    /// The value of the format's byte `b`.
    pub fn from_bits(self, b: u8) -> f32 {
        let (mantissa, min_exp, _) = self.layout();
        let uz = matches!(self, Float8::E4M3FNUZ | Float8::E5M2FNUZ);
        let exp_mask = (1u8 << (7 - mantissa)) - 1;
        let (e, m) = ((b >> mantissa) & exp_mask, b & ((1u8 << mantissa) - 1));
        let negative = b & 0x80 != 0;
        match self {
            _ if uz && b == 0x80 => return f32::NAN,
            Float8::E4M3FN if e == exp_mask && m == (1 << mantissa) - 1 => return f32::NAN,
            Float8::E5M2 if e == exp_mask && m != 0 => return f32::NAN,
            Float8::E5M2 if e == exp_mask => {
                return if negative {
                    f32::NEG_INFINITY
                } else {
                    f32::INFINITY
                }
            }
            _ => {}
        }
        let frac = f64::from(m) / f64::from(1u32 << mantissa);
        let v = if e == 0 {
            frac * 2f64.powi(min_exp)
        } else {
            (1.0 + frac) * 2f64.powi(i32::from(e) - 1 + min_exp)
        };
        (if negative { -v } else { v }) as f32
    }

    /// The value of the format nearest to `x` (halves to even), as a float, with ONNX's
    /// rules for what the format cannot hold: past the largest value, the largest
    /// (`saturate`), else infinity (`E5M2`) or NaN; infinities as values past the largest,
    /// except in the `FNUZ` formats, which make them NaN; no negative zero in those.
    pub fn round(self, x: f32, saturate: bool) -> f32 {
        let (mantissa, min_exp, max) = self.layout();
        let uz = matches!(self, Float8::E4M3FNUZ | Float8::E5M2FNUZ);
        let sign = |v: f32| if x.is_sign_negative() { -v } else { v };
        let overflow = || match (saturate, self) {
            (true, _) => sign(max as f32),
            (false, Float8::E5M2) => sign(f32::INFINITY),
            _ => f32::NAN,
        };
        if x.is_nan() || (x.is_infinite() && uz) {
            return f32::NAN;
        }
        if x.is_infinite() {
            return overflow();
        }
        let a = f64::from(x).abs();
        // The spacing of the values around `a`: 2^(e - mantissa) in the binade of 2^e, the
        // subnormal spacing below the smallest normal value.
        let e = if a > 0.0 {
            (a.log2().floor() as i32).max(min_exp)
        } else {
            min_exp
        };
        let step = 2f64.powi(e - mantissa);
        let r = (a / step).round_ties_even() * step;
        if r > max {
            return overflow();
        }
        if r == 0.0 && uz {
            return 0.0;
        }
        sign(r as f32)
    }
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
            UnaryKind::Round => "Round",
            UnaryKind::Float8 { .. } => "Cast",
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

#[cfg(test)]
mod tests {
    use super::Float8;

    const ALL: [Float8; 4] = [
        Float8::E4M3FN,
        Float8::E4M3FNUZ,
        Float8::E5M2,
        Float8::E5M2FNUZ,
    ];

    #[test]
    fn every_value_of_a_format_rounds_to_itself() {
        for f in ALL {
            for b in 0..=255u8 {
                let v = f.from_bits(b);
                if v.is_nan() {
                    continue;
                }
                let r = f.round(v, false);
                assert!(
                    r == v && r.is_sign_negative() == v.is_sign_negative(),
                    "{f:?} {b:#x}: {v} -> {r}"
                );
            }
        }
    }

    #[test]
    fn halves_go_to_the_even_neighbour_and_overflow_follows_onnx() {
        let e5m2 = Float8::E5M2;
        // Steps of 0.25 between 1 and 2: 1.125 lies halfway between 1 (even) and 1.25.
        assert_eq!(e5m2.round(1.1, true), 1.0);
        assert_eq!(e5m2.round(1.125, true), 1.0);
        assert_eq!(e5m2.round(1.375, true), 1.5);
        assert_eq!(e5m2.round(-1.3, true), -1.25);
        // Subnormals: steps of 2^-16.
        assert_eq!(e5m2.round(2f32.powi(-17), true), 0.0);
        assert_eq!(e5m2.round(3.0 * 2f32.powi(-17), true), 2f32.powi(-15));
        // The largest value is 57344 (then steps of 8192): up to 61440 rounds to it, past
        // that is the largest or infinity.
        assert_eq!(e5m2.round(60000.0, false), 57344.0);
        assert_eq!(e5m2.round(62000.0, true), 57344.0);
        assert_eq!(e5m2.round(62000.0, false), f32::INFINITY);
        assert_eq!(e5m2.round(f32::NEG_INFINITY, true), -57344.0);
        assert_eq!(e5m2.round(f32::NEG_INFINITY, false), f32::NEG_INFINITY);
        // E4M3FN has no infinity: NaN when not saturating.
        assert_eq!(Float8::E4M3FN.round(500.0, true), 448.0);
        assert!(Float8::E4M3FN.round(500.0, false).is_nan());
        assert_eq!(Float8::E4M3FN.round(f32::INFINITY, true), 448.0);
        // The FNUZ formats: infinities are NaN, no negative zero.
        assert!(Float8::E4M3FNUZ.round(f32::INFINITY, true).is_nan());
        assert!(Float8::E5M2FNUZ.round(-1e-9, true).is_sign_positive());
        assert_eq!(Float8::E4M3FNUZ.round(300.0, true), 240.0);
        // Bytes: E5M2 is the upper byte of a half; 0x7B is its largest value.
        assert_eq!(e5m2.from_bits(0x3C), 1.0);
        assert_eq!(e5m2.from_bits(0x7B), 57344.0);
        assert_eq!(e5m2.from_bits(0xFC), f32::NEG_INFINITY);
        assert_eq!(Float8::E4M3FN.from_bits(0x7E), 448.0);
        assert!(Float8::E4M3FN.from_bits(0x7F).is_nan());
        assert!(Float8::E4M3FNUZ.from_bits(0x80).is_nan());
    }
}
