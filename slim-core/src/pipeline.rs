//! The pipeline core: a [`Strategy`] is one step of a compression pipeline (train, prune,
//! quantize, distil, search) that takes a model and returns the next one. The `slim compress`
//! command builds strategies from a configuration file and runs them in order; each method
//! crate implements the trait for its own methods, so no algorithm lives in the pipeline.

use std::path::PathBuf;

use crate::data::DataSplits;
use crate::error::Result;
use crate::model::Model;
use crate::train::{train, CheckpointEvery, Progress, TrainConfig, TrainOptions, TrainReport};

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

/// How a model is fine-tuned after a method changed it: the recipe, the checkpoint a long run
/// keeps (and resumes from), and kernels that compute some nodes another way while it trains
/// (quantization-aware training's fake-quantized weights).
#[derive(Clone, Default)]
pub struct Finetuning<'a> {
    pub config: TrainConfig,
    pub checkpoint: Option<PathBuf>,
    pub resume: bool,
    pub checkpoint_every: CheckpointEvery,
    /// Evaluate after every epoch (labelled data only).
    pub eval_each_epoch: bool,
    pub kernels: Option<&'a dyn crate::exec::NodeKernels>,
}

impl<'a> Finetuning<'a> {
    /// Fine-tuning by `config`, nothing kept.
    pub fn new(config: TrainConfig) -> Self {
        Finetuning {
            config,
            ..Default::default()
        }
    }

    /// Trains `model` on `data`, after a change: on the labels, or (`label_free`, or data
    /// without labels) to reproduce `original`, the model before the change.
    pub fn run(
        &self,
        model: &mut Model,
        original: &Model,
        data: &DataSplits,
        label_free: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<TrainReport> {
        let label_free = label_free || !data.train.is_labeled();
        let mut teacher = if label_free {
            Some(crate::reproduce::Reproduce::new(original.deep_clone()?)?)
        } else {
            None
        };
        let extra: Vec<&mut dyn crate::train::LossTerm> = match teacher.as_mut() {
            Some(t) => vec![t],
            None => Vec::new(),
        };
        train(
            model,
            data,
            &self.config,
            TrainOptions {
                checkpoint: self.checkpoint.clone(),
                checkpoint_every: self.checkpoint_every,
                resume: self.resume,
                eval_each_epoch: self.eval_each_epoch && !label_free,
                label_free,
                extra,
                kernels: self.kernels,
            },
            progress,
        )
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
    let how = Finetuning {
        kernels,
        ..Finetuning::new(cfg.clone())
    };
    how.run(model, original, ctx.data, false, ctx.progress)
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
