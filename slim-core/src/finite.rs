//! Non-finite values (NaN, plus or minus infinity) in tensors.
//!
//! A NaN or an infinity in a weight or an activation spreads silently: through every layer
//! after it, into a quantization scale, into an accuracy of 10%. So the places that take
//! values from outside (model files, ONNX imports, calibration batches) scan them once and
//! refuse them by name, with the count and the first index, using [`NonFinite`].

use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::model::Model;
use crate::model::INT8_SCALE_SUFFIX;

/// The non-finite values that one tensor holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NonFinite {
    /// The tensor: a parameter, a model file's tensor, an observed node's output.
    pub tensor: String,
    /// How many values are NaN.
    pub nan: usize,
    /// How many values are plus or minus infinity.
    pub infinite: usize,
    /// The flat (row-major) index of the first non-finite value.
    pub first: usize,
}

impl NonFinite {
    /// Scans `values` once; `None` when every one is finite.
    pub fn scan(tensor: &str, values: impl IntoIterator<Item = f32>) -> Option<NonFinite> {
        let mut found: Option<NonFinite> = None;
        for (i, v) in values.into_iter().enumerate() {
            if v.is_finite() {
                continue;
            }
            let f = found.get_or_insert_with(|| NonFinite {
                tensor: tensor.to_string(),
                nan: 0,
                infinite: 0,
                first: i,
            });
            if v.is_nan() {
                f.nan += 1;
            } else {
                f.infinite += 1;
            }
        }
        found
    }

    /// Scans the little-endian `f32` values of a safetensors buffer.
    pub fn scan_le_bytes(tensor: &str, bytes: &[u8]) -> Option<NonFinite> {
        NonFinite::scan(
            tensor,
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        )
    }

    /// Scans a tensor of any float type (read as `f32`).
    pub fn scan_tensor(tensor: &str, t: &Tensor) -> Result<Option<NonFinite>> {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(NonFinite::scan(tensor, v))
    }

    /// What the tensor holds, without its name: `1 NaN value (first at index 3)`,
    /// `2 NaN and 1 infinite values (first at index 0)`.
    pub fn summary(&self) -> String {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        let what = match (self.nan, self.infinite) {
            (n, 0) => format!("{n} NaN value{}", s(n)),
            (0, i) => format!("{i} infinite value{}", s(i)),
            (n, i) => format!("{n} NaN and {i} infinite values"),
        };
        format!("{what} (first at index {})", self.first)
    }
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor `{}` holds {}", self.tensor, self.summary())
    }
}

impl Model {
    /// The parameters that hold NaN or infinite values, in name order. An int8 parameter is
    /// judged by its scales (its integers are finite), reported as `<parameter>_scale` as in
    /// a model file.
    pub fn nonfinite_params(&self) -> Result<Vec<NonFinite>> {
        let mut found = Vec::new();
        for (name, p) in self.params.iter() {
            let nf = match self.int8.get(name) {
                Some(q) => NonFinite::scan(
                    &format!("{name}{INT8_SCALE_SUFFIX}"),
                    q.scales.iter().copied(),
                ),
                None => NonFinite::scan_tensor(name, p.var.as_tensor())?,
            };
            found.extend(nf);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_counts_and_finds_the_first() {
        assert_eq!(NonFinite::scan("x", [0.0, 1.0, f32::MAX]), None);
        let nf = NonFinite::scan("x", [0.0, f32::INFINITY, f32::NAN, f32::NEG_INFINITY]).unwrap();
        assert_eq!((nf.nan, nf.infinite, nf.first), (1, 2, 1));
        assert_eq!(
            nf.to_string(),
            "tensor `x` holds 1 NaN and 2 infinite values (first at index 1)"
        );
        let one = NonFinite::scan("c.bias", [0.0, 0.0, 0.0, f32::NAN]).unwrap();
        assert_eq!(
            one.to_string(),
            "tensor `c.bias` holds 1 NaN value (first at index 3)"
        );
        let bytes: Vec<u8> = [1.0f32, f32::NEG_INFINITY, f32::INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let inf = NonFinite::scan_le_bytes("w", &bytes).unwrap();
        assert_eq!(inf.summary(), "2 infinite values (first at index 1)");
    }
}
