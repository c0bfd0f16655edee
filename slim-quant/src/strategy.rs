//! Quantization as pipeline [`Strategy`]s: post-training (`quant.ptq`) and
//! quantization-aware training (`quant.qat`).

use serde::Deserialize;
use serde_json::json;
use slim_core::pipeline::{Context, Finetuning, Strategy};
use slim_core::train::{OptimizerKind, Schedule};
use slim_core::{CoreError, Model};

use crate::observer::ActQuant;
use crate::ptq::{quantize, PtqConfig};
pub use crate::qat::QatSettings;
use crate::quantizer::{check_bits, WeightQuant};
use crate::QuantError;

/// The settings of post-training quantization as `slim quant ptq`'s flags and a `quant.ptq`
/// stage's keys both give them, with their defaults: [`PtqOptions::validate`] checks them into
/// the [`PtqConfig`] that [`quantize`] takes.
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct PtqOptions {
    /// abs_max or channel_wise_abs_max.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = PtqOptions::default().weights))]
    pub weights: String,
    /// abs_max, avg, moving_average_abs_max, hist, mse or kl.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = PtqOptions::default().activations))]
    pub activations: String,
    /// Calibration batches.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = PtqOptions::default().calib_batches))]
    pub calib_batches: usize,
    /// Images per calibration batch.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = PtqOptions::default().batch_size))]
    pub batch_size: usize,
    /// Bits of the weights (2 to 8).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = PtqOptions::default().bits_weights))]
    pub bits_weights: u8,
    /// Layers to quantize (glob patterns); default: every convolution and linear layer.
    #[cfg_attr(feature = "clap", arg(long, num_args = 1..))]
    pub scope: Vec<String>,
    /// Fold batch norms into the convolutions before them (on the command line, `--no-fold`
    /// keeps them).
    #[cfg_attr(feature = "clap", arg(long = "no-fold", action = clap::ArgAction::SetFalse,
        help = "Keep batch norms instead of folding them into the convolutions"))]
    pub fold_batch_norm: bool,
    /// Correct each quantized layer's bias so that its outputs keep their float means on the
    /// calibration images.
    #[cfg_attr(feature = "clap", arg(long))]
    pub bias_correction: bool,
}

impl Default for PtqOptions {
    fn default() -> Self {
        let c = PtqConfig::default();
        PtqOptions {
            weights: c.weights.name().into(),
            activations: c.activations.name().into(),
            calib_batches: c.batches,
            batch_size: c.batch_size,
            bits_weights: c.bits_weights,
            scope: c.scope,
            fold_batch_norm: c.fold_batch_norm,
            bias_correction: c.bias_correction,
        }
    }
}

impl PtqOptions {
    /// The checked configuration: known methods, bits in range, at least one batch.
    pub fn validate(&self) -> crate::Result<PtqConfig> {
        check_bits(self.bits_weights)?;
        if self.calib_batches == 0 || self.batch_size == 0 {
            return Err(QuantError::Invalid(
                "quantization needs at least one calibration batch of at least one image \
                 (calib_batches, batch_size)"
                    .into(),
            ));
        }
        Ok(PtqConfig {
            weights: self.weights.parse::<WeightQuant>()?,
            activations: self.activations.parse::<ActQuant>()?,
            bits_weights: self.bits_weights,
            bits_activations: 8,
            batches: self.calib_batches,
            batch_size: self.batch_size,
            scope: self.scope.clone(),
            fold_batch_norm: self.fold_batch_norm,
            bias_correction: self.bias_correction,
        })
    }
}

/// A post-training quantization stage.
pub struct PtqStrategy {
    config: PtqConfig,
}

impl PtqStrategy {
    /// Checks the options before any work.
    pub fn new(o: PtqOptions) -> crate::Result<Self> {
        Ok(PtqStrategy {
            config: o.validate()?,
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

/// The settings of quantization-aware training as `slim quant qat`'s flags and a `quant.qat`
/// stage's keys both give them, with their defaults (the rest of the training recipe is the
/// command's or the pipeline's): [`QatOptions::validate`] checks them into [`QatSettings`].
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields, default)]
pub struct QatOptions {
    /// abs_max or channel_wise_abs_max.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().weights))]
    pub weights: String,
    /// Calibration batches that set the first activation scales.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().calib_batches))]
    pub calib_batches: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().epochs))]
    pub epochs: usize,
    /// The default recipe (SGD with momentum 0.9, lr 0.001, cosine) fine-tunes gently: the
    /// float model's weights move only as far as the integer grid asks.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().lr))]
    pub lr: f64,
    /// sgd, adam or adamw.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().optimizer))]
    pub optimizer: String,
    /// constant, cosine, or step:EVERY:GAMMA.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().schedule))]
    pub schedule: String,
    /// How activation scales follow the batches while training: moving_average_abs_max (a
    /// moving average of each batch's absolute maximum) or range_abs_max (the largest of the
    /// last --window-size batches').
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().activations))]
    pub activations: String,
    /// range_abs_max's window, in batches.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = QatOptions::default().window_size))]
    pub window_size: usize,
}

impl Default for QatOptions {
    fn default() -> Self {
        QatOptions {
            weights: PtqConfig::default().weights.name().into(),
            calib_batches: 4,
            epochs: 1,
            lr: 0.001,
            optimizer: "sgd".into(),
            schedule: "cosine".into(),
            activations: "moving_average_abs_max".into(),
            window_size: 10_000,
        }
    }
}

impl QatOptions {
    /// The checked settings: known methods, at least one batch and epoch, a positive rate.
    pub fn validate(&self) -> crate::Result<QatSettings> {
        if self.calib_batches == 0 || self.epochs == 0 {
            return Err(QuantError::Invalid(
                "quantization-aware training needs at least one calibration batch and one \
                 epoch (calib_batches, epochs)"
                    .into(),
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(QuantError::Invalid(format!(
                "the learning rate (lr) must be positive, got {}",
                self.lr
            )));
        }
        let weights = self.weights.parse::<WeightQuant>()?;
        let bad = |e: CoreError| QuantError::Invalid(e.to_string());
        Ok(QatSettings {
            calibration: PtqConfig {
                weights,
                batches: self.calib_batches,
                ..PtqConfig::default()
            },
            weights,
            activations: crate::qat::ActivationScale::parse(&self.activations, self.window_size)?,
            epochs: self.epochs,
            lr: self.lr,
            optimizer: self.optimizer.parse::<OptimizerKind>().map_err(bad)?,
            schedule: self.schedule.parse::<Schedule>().map_err(bad)?,
        })
    }
}

/// A quantization-aware training stage: fake-quantization inserted, trained with the
/// pipeline's recipe (its epochs and learning rate overridden), then converted to int8.
pub struct QatStrategy {
    options: QatOptions,
    settings: QatSettings,
}

impl QatStrategy {
    /// Checks the options before any work.
    pub fn new(o: QatOptions) -> crate::Result<Self> {
        Ok(QatStrategy {
            settings: o.validate()?,
            options: o,
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
        let st = &self.settings;
        let tcfg = st.recipe(&ctx.train);
        // Without labels, the fake-quantized model learns to reproduce the float one.
        let how = Finetuning::new(tcfg.clone());
        let (int8, report) =
            crate::compress::train_int8(&model, ctx.data, st, &how, false, ctx.progress)
                .map_err(core)?;
        Ok((
            int8,
            json!({"weights": st.weights.name(), "activations": "moving_average_abs_max",
                   "epochs": tcfg.epochs, "lr": tcfg.lr,
                   "optimizer": self.options.optimizer, "schedule": self.options.schedule,
                   "train_seconds": report.epochs.iter().map(|e| e.seconds).sum::<f64>()}),
        ))
    }
}
