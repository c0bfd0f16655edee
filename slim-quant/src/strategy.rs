//! Quantization as pipeline [`Strategy`]s: post-training (`quant.ptq`) and
//! quantization-aware training (`quant.qat`).

use serde::Deserialize;
use serde_json::json;
use slim_core::pipeline::{Context, Strategy};
use slim_core::train::{OptimizerKind, Schedule};
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
                   "quantized_outputs": report.outputs.len(),
                   "folded_batch_norms": report.folded_batch_norms,
                   "calibration_images": report.calibration_images,
                   "calibration_seconds": report.seconds}),
        ))
    }
}

/// The options of a `quant.qat` stage (the names of `slim quant qat`'s flags, and its
/// defaults; the rest of the training recipe is the pipeline's).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QatOptions {
    #[serde(default = "default_weights")]
    pub weights: String,
    #[serde(default = "default_qat_batches")]
    pub calib_batches: usize,
    #[serde(default = "default_qat_epochs")]
    pub epochs: usize,
    #[serde(default = "default_qat_lr")]
    pub lr: f64,
    #[serde(default = "default_qat_optimizer")]
    pub optimizer: String,
    #[serde(default = "default_qat_schedule")]
    pub schedule: String,
}

fn default_qat_batches() -> usize {
    4
}
fn default_qat_epochs() -> usize {
    1
}
fn default_qat_lr() -> f64 {
    0.001
}
fn default_qat_optimizer() -> String {
    "sgd".into()
}
fn default_qat_schedule() -> String {
    "cosine".into()
}

/// A quantization-aware training stage: fake-quantization inserted, trained with the
/// pipeline's recipe (its epochs and learning rate overridden), then converted to int8.
pub struct QatStrategy {
    options: QatOptions,
    weights: WeightQuant,
    optimizer: OptimizerKind,
    schedule: Schedule,
}

impl QatStrategy {
    /// Checks the options before any work.
    pub fn new(o: QatOptions) -> crate::Result<Self> {
        if o.calib_batches == 0 || o.epochs == 0 {
            return Err(QuantError::Invalid(
                "quant.qat: `calib_batches` and `epochs` must be at least 1".into(),
            ));
        }
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(QuantError::Invalid(format!(
                "quant.qat: `lr` must be positive, got {}",
                o.lr
            )));
        }
        let weights = o.weights.parse::<WeightQuant>()?;
        let optimizer = o
            .optimizer
            .parse::<OptimizerKind>()
            .map_err(|e| QuantError::Invalid(format!("quant.qat: {e}")))?;
        let schedule = o
            .schedule
            .parse::<Schedule>()
            .map_err(|e| QuantError::Invalid(format!("quant.qat: {e}")))?;
        Ok(QatStrategy {
            options: o,
            weights,
            optimizer,
            schedule,
        })
    }
}

impl Strategy for QatStrategy {
    fn kind(&self) -> &str {
        "quant.qat"
    }

    fn run(
        &mut self,
        model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let core = |e: QuantError| match e {
            QuantError::Core(c) => c,
            other => CoreError::Invalid(other.to_string()),
        };
        let cfg = PtqConfig {
            weights: self.weights,
            batches: self.options.calib_batches,
            ..PtqConfig::default()
        };
        let mut q = crate::qat::prepare(&model, &ctx.data.train, &ctx.data.normalize, &cfg)
            .map_err(core)?;
        let kernels = crate::qat::QatKernels {
            weights: self.weights,
            bits: 8,
        };
        let mut tcfg = ctx.train.clone();
        tcfg.epochs = self.options.epochs;
        tcfg.lr = self.options.lr;
        tcfg.optimizer = self.optimizer;
        tcfg.schedule = self.schedule.clone();
        tcfg.warmup_epochs = 0;
        // Without labels, the fake-quantized model learns to reproduce the float one.
        let report = slim_core::pipeline::finetune(&mut q, &model, &tcfg, Some(&kernels), ctx)?;
        let int8 = crate::qat::convert(&q, self.weights, 8).map_err(core)?;
        Ok((
            int8,
            json!({"weights": self.weights.name(), "activations": "moving_average_abs_max",
                   "epochs": tcfg.epochs, "lr": tcfg.lr,
                   "optimizer": self.options.optimizer, "schedule": self.options.schedule,
                   "train_seconds": report.epochs.iter().map(|e| e.seconds).sum::<f64>()}),
        ))
    }
}
