//! The pipeline core: a [`Strategy`] is one step of a compression pipeline (train, prune,
//! quantize, distil, search) that takes a model and returns the next one. The `slim compress`
//! command builds strategies from a configuration file and runs them in order; each method
//! crate implements the trait for its own methods, so no algorithm lives in the pipeline.

use std::path::PathBuf;

use crate::data::DataSplits;
use crate::error::Result;
use crate::model::Model;
use crate::train::{train, Progress, TrainConfig, TrainOptions, TrainReport};

/// What a strategy can use besides the model: the data, the pipeline's training recipe (for
/// any step that trains unless the strategy says otherwise), a folder for files of its own,
/// and a sink for training progress.
pub struct Context<'a> {
    pub data: &'a DataSplits,
    pub train: TrainConfig,
    /// This stage's folder for its own files (sensitivities, search histories).
    pub work_dir: PathBuf,
    /// Silence for long work (progress still goes to `progress`).
    pub quiet: bool,
    /// Training progress.
    pub progress: &'a mut dyn FnMut(&Progress),
    /// A one-line status of other long work (a sensitivity analysis, a search); may be called
    /// from several threads.
    pub status: &'a (dyn Fn(&str) + Sync),
    /// The pipeline's first model (trained or read), for a stage that compares with it or
    /// learns from it (a distillation teacher); `None` while it is being made.
    pub baseline: Option<&'a Model>,
}

impl Context<'_> {
    /// Whether the pipeline's data carries labels; without them, stages train by reproducing
    /// the model they started from and are measured by their fidelity to the baseline.
    pub fn labeled(&self) -> bool {
        self.data.train.is_labeled()
    }
}

/// Trains `model` with `cfg` on the pipeline's data, after a stage changed it: on the labels,
/// or, for data without labels, to reproduce `original` (the model before the change).
/// `kernels` compute some nodes another way during training (quantization-aware training).
pub fn finetune(
    model: &mut Model,
    original: &Model,
    cfg: &TrainConfig,
    kernels: Option<&dyn crate::exec::NodeKernels>,
    ctx: &mut Context<'_>,
) -> Result<TrainReport> {
    let mut teacher = if ctx.labeled() {
        None
    } else {
        Some(crate::reproduce::Reproduce::new(original.deep_clone()?)?)
    };
    let extra: Vec<&mut dyn crate::train::LossTerm> = match teacher.as_mut() {
        Some(t) => vec![t],
        None => Vec::new(),
    };
    train(
        model,
        ctx.data,
        cfg,
        TrainOptions {
            label_free: !ctx.labeled(),
            extra,
            kernels,
            ..Default::default()
        },
        ctx.progress,
    )
}

/// One step of a compression pipeline.
pub trait Strategy {
    /// The strategy's kind as configuration files name it (`prune.uniform`).
    fn kind(&self) -> &str;
    /// Runs the step on `model` and returns the new model and a short account of what it did
    /// (a JSON object for the report).
    fn run(&mut self, model: Model, ctx: &mut Context<'_>) -> Result<(Model, serde_json::Value)>;
}

/// Training with the pipeline's recipe (or its own), the first stage of a pipeline that starts
/// from a zoo model.
pub struct Train {
    pub config: Option<TrainConfig>,
}

impl Strategy for Train {
    fn kind(&self) -> &str {
        "train"
    }
    fn run(
        &mut self,
        mut model: Model,
        ctx: &mut Context<'_>,
    ) -> Result<(Model, serde_json::Value)> {
        let cfg = self.config.clone().unwrap_or_else(|| ctx.train.clone());
        let report = train(
            &mut model,
            ctx.data,
            &cfg,
            TrainOptions {
                eval_each_epoch: false,
                ..Default::default()
            },
            ctx.progress,
        )?;
        let seconds: f64 = report.epochs.iter().map(|e| e.seconds).sum();
        Ok((
            model,
            serde_json::json!({"epochs": cfg.epochs, "seconds": seconds,
                               "final_loss": report.epochs.last().map(|e| e.loss)}),
        ))
    }
}
