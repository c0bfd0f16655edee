//! Post-training quantization as a pipeline [`Strategy`] (`quant.ptq`).

use serde::Deserialize;
use serde_json::json;
use slim_core::pipeline::{Context, Strategy};
use slim_core::{CoreError, Model};

use crate::observer::ActQuant;
use crate::ptq::{quantize, PtqConfig};
use crate::quantizer::{check_bits, WeightQuant};
use crate::QuantError;

/// The options of a `quant.ptq` stage (the names of `slim quant ptq`'s flags).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtqOptions {
    #[serde(default = "default_weights")]
    pub weights: String,
    #[serde(default = "default_activations")]
    pub activations: String,
    #[serde(default = "default_batches")]
    pub calib_batches: usize,
    #[serde(default = "default_bits")]
    pub bits_weights: u8,
    #[serde(default)]
    pub scope: Vec<String>,
    #[serde(default)]
    pub bias_correction: bool,
}

fn default_weights() -> String {
    "channel_wise_abs_max".into()
}
fn default_activations() -> String {
    "abs_max".into()
}
fn default_batches() -> usize {
    16
}
fn default_bits() -> u8 {
    8
}

/// A post-training quantization stage.
pub struct PtqStrategy {
    config: PtqConfig,
}

impl PtqStrategy {
    /// Checks the options before any work.
    pub fn new(o: PtqOptions) -> crate::Result<Self> {
        check_bits(o.bits_weights)?;
        if o.calib_batches == 0 {
            return Err(QuantError::Invalid(
                "quant.ptq: `calib_batches` must be at least 1".into(),
            ));
        }
        Ok(PtqStrategy {
            config: PtqConfig {
                weights: o.weights.parse::<WeightQuant>()?,
                activations: o.activations.parse::<ActQuant>()?,
                bits_weights: o.bits_weights,
                batches: o.calib_batches,
                scope: o.scope,
                bias_correction: o.bias_correction,
                ..PtqConfig::default()
            },
        })
    }
}

impl Strategy for PtqStrategy {
    fn kind(&self) -> &str {
        "quant.ptq"
    }

    fn run(
        &mut self,
        model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let (q, report) = quantize(&model, &ctx.data.train, &ctx.data.normalize, &self.config)
            .map_err(|e| match e {
                QuantError::Core(c) => c,
                other => CoreError::Invalid(other.to_string()),
            })?;
        Ok((
            q,
            json!({"weights": self.config.weights.name(),
                   "activations": self.config.activations.name(),
                   "layers": report.layers.len(),
                   "folded_batch_norms": report.folded_batch_norms,
                   "calibration_images": report.calibration_images,
                   "calibration_seconds": report.seconds}),
        ))
    }
}
