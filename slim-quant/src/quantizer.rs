//! Weight quantizers: symmetric, per tensor (`abs_max`) or per output channel
//! (`channel_wise_abs_max`), 8 bits or fewer.
//!
//! A weight `w` with scale `s` is stored as `q = clamp(round(w / s), -Q, Q)` with
//! `Q = 2^(bits-1) - 1` and read back as `q * s`. The scale is `max |w| / Q` over the tensor
//! or over each output channel (axis 0).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use slim_core::finite::NonFinite;
use slim_core::params::ParamStore;
use slim_core::CoreError;

use crate::{QuantError, Result};

/// How weight scales are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightQuant {
    /// One scale for the whole tensor.
    AbsMax,
    /// One scale per output channel.
    #[default]
    ChannelWiseAbsMax,
}

impl WeightQuant {
    pub fn name(self) -> &'static str {
        match self {
            WeightQuant::AbsMax => "abs_max",
            WeightQuant::ChannelWiseAbsMax => "channel_wise_abs_max",
        }
    }
}

impl fmt::Display for WeightQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightQuant {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "abs_max" => Ok(WeightQuant::AbsMax),
            "channel_wise_abs_max" => Ok(WeightQuant::ChannelWiseAbsMax),
            _ => Err(QuantError::Invalid(format!(
                "unknown weight quantizer `{s}` (abs_max or channel_wise_abs_max)"
            ))),
        }
    }
}

/// The largest quantized magnitude for `bits`, `2^(bits-1) - 1`.
pub fn qmax(bits: u8) -> f32 {
    ((1u32 << (bits - 1)) - 1) as f32
}

/// Checks a bit width (2 to 8).
pub fn check_bits(bits: u8) -> Result<()> {
    if (2..=8).contains(&bits) {
        Ok(())
    } else {
        Err(QuantError::Invalid(format!(
            "quantization to {bits} bits is not supported (2 to 8)"
        )))
    }
}

/// A weight in integers: values (row-major, the tensor's shape) and one scale per tensor or
/// per output channel.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    pub shape: Vec<usize>,
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub bits: u8,
}

impl QuantizedWeight {
    /// Elements that share one scale.
    pub fn per_scale(&self) -> usize {
        self.values.len() / self.scales.len().max(1)
    }

    /// The weight read back as floats (`q * s`).
    pub fn dequantize(&self, device: &candle_core::Device) -> Result<Tensor> {
        let per = self.per_scale();
        let v: Vec<f32> = self
            .values
            .iter()
            .enumerate()
            .map(|(i, &q)| f32::from(q) * self.scales[i / per])
            .collect();
        Ok(Tensor::from_vec(v, self.shape.clone(), device)?)
    }
}

/// Quantizes the parameter `name` of `params` (see [`quantize_weight`]); NaN or infinite
/// values are an error naming the parameter.
pub fn quantize_param(
    params: &ParamStore,
    name: &str,
    method: WeightQuant,
    bits: u8,
) -> Result<QuantizedWeight> {
    quantize_weight(&params.tensor(name)?, method, bits).map_err(|e| match e {
        QuantError::Invalid(msg) => CoreError::param(name, msg).into(),
        e => e,
    })
}

/// Quantizes a weight tensor (axis 0 is the output channel). NaN or infinite values are
/// refused: a NaN would round to zero and an infinity would make its scale infinite.
pub fn quantize_weight(w: &Tensor, method: WeightQuant, bits: u8) -> Result<QuantizedWeight> {
    check_bits(bits)?;
    let shape = w.dims().to_vec();
    let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some(nf) = NonFinite::scan("weight", values.iter().copied()) {
        return Err(QuantError::Invalid(format!(
            "holds {}; quantization needs finite parameters",
            nf.summary()
        )));
    }
    let channels = match method {
        WeightQuant::AbsMax => 1,
        WeightQuant::ChannelWiseAbsMax => shape.first().copied().unwrap_or(1).max(1),
    };
    let per = values.len() / channels;
    let q = qmax(bits);
    let scales: Vec<f32> = values
        .chunks(per.max(1))
        .map(|c| {
            let m = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            // An all-zero channel keeps a harmless non-zero scale.
            if m > 0.0 {
                m / q
            } else {
                1.0
            }
        })
        .collect();
    let ints: Vec<i8> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scales[i / per.max(1)]).round().clamp(-q, q) as i8)
        .collect();
    Ok(QuantizedWeight {
        shape,
        values: ints,
        scales,
        bits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nonfinite_weights_are_refused_by_name() {
        let mut params = ParamStore::new();
        let w = Tensor::new(&[[1.0f32, 2.0], [f32::NAN, 3.0]], &Device::Cpu).unwrap();
        params
            .insert("fc.weight", &w, slim_core::ParamKind::Weight)
            .unwrap();
        let e = quantize_param(&params, "fc.weight", WeightQuant::ChannelWiseAbsMax, 8)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "parameter `fc.weight`: holds 1 NaN value (first at index 2); \
             quantization needs finite parameters"
        );
        let inf = Tensor::new(&[f32::INFINITY, 1.0], &Device::Cpu).unwrap();
        assert!(quantize_weight(&inf, WeightQuant::AbsMax, 8).is_err());
    }

    #[test]
    fn channel_scales_and_rounding_by_hand() {
        // Channel 0: max 2.54 -> scale 0.02; channel 1: max 1.27 -> scale 0.01.
        let w = Tensor::new(&[[2.54f32, -1.0, 0.015], [0.5, -1.27, 0.004]], &Device::Cpu).unwrap();
        let q = quantize_weight(&w, WeightQuant::ChannelWiseAbsMax, 8).unwrap();
        assert!((q.scales[0] - 0.02).abs() < 1e-7 && (q.scales[1] - 0.01).abs() < 1e-7);
        assert_eq!(q.values, vec![127, -50, 1, 50, -127, 0]);
        let t = quantize_weight(&w, WeightQuant::AbsMax, 8).unwrap();
        assert_eq!(t.scales.len(), 1);
        assert_eq!(t.values[0], 127);
        // 4 bits: Q = 7.
        let f = quantize_weight(&w, WeightQuant::ChannelWiseAbsMax, 4).unwrap();
        assert_eq!(f.values, vec![7, -3, 0, 3, -7, 0]);
        let back = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((back[0][1] + 1.0).abs() < 1e-6);
        assert!(check_bits(9).is_err() && check_bits(1).is_err());
    }
}
