//! Distillation as a pipeline [`Strategy`] (`distill`): the model entering the stage is the
//! student; the teacher is the pipeline's baseline (the default), a zoo model trained in the
//! stage's folder first (`zoo:NAME`), a model file, or a knowledge directory.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::json;
use slim_core::pipeline::{Context, Strategy};
use slim_core::train::TrainOptions;
use slim_core::{CoreError, Model};

use crate::{distill, DistillError, Distiller, Knowledge, LossSpec, Teacher};

/// The options of a `distill` stage (the names of `slim distill`'s flags).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillOptions {
    /// `baseline` (the pipeline's first model), `zoo:NAME` (a zoo model trained first with the
    /// pipeline's recipe, kept in the stage's folder), a model file, or a knowledge directory.
    #[serde(default = "default_teacher")]
    pub teacher: String,
    /// Width multiplier of a `zoo:` teacher.
    #[serde(default = "default_width")]
    pub teacher_width: f64,
    /// Training epochs of a `zoo:` teacher (default: the pipeline's recipe).
    pub teacher_epochs: Option<usize>,
    /// Loss specs, as `slim distill --loss`.
    #[serde(default = "default_loss")]
    pub loss: Vec<String>,
    /// Epochs (default: the pipeline's recipe).
    pub epochs: Option<usize>,
    /// Learning rate (default: the pipeline's recipe).
    pub lr: Option<f64>,
}

fn default_teacher() -> String {
    "baseline".into()
}
fn default_width() -> f64 {
    1.0
}
fn default_loss() -> Vec<String> {
    vec!["soft_label:temperature=2".into()]
}

/// A distillation stage.
pub struct DistillStrategy {
    options: DistillOptions,
    specs: Vec<LossSpec>,
}

impl DistillStrategy {
    /// Checks the options (the loss specs, the teacher's file) before any work; node names
    /// are checked when the stage starts, against the models it meets.
    pub fn new(options: DistillOptions) -> crate::Result<Self> {
        if options.loss.is_empty() {
            return Err(DistillError::Invalid("distill: `loss` is empty".into()));
        }
        let specs = options
            .loss
            .iter()
            .map(|s| s.parse::<LossSpec>())
            .collect::<crate::Result<Vec<_>>>()?;
        if let Some(name) = options.teacher.strip_prefix("zoo:") {
            if !slim_core::zoo::NAMES.contains(&name) {
                return Err(DistillError::Invalid(format!(
                    "distill: teacher `zoo:{name}`: not a zoo model ({})",
                    slim_core::zoo::NAMES.join(", ")
                )));
            }
            if !(options.teacher_width > 0.0 && options.teacher_width.is_finite()) {
                return Err(DistillError::Invalid(format!(
                    "distill: `teacher_width` {} must be positive",
                    options.teacher_width
                )));
            }
        } else if options.teacher != "baseline" && !PathBuf::from(&options.teacher).exists() {
            return Err(DistillError::Invalid(format!(
                "distill: teacher `{}` is neither `baseline`, `zoo:NAME`, nor an existing model file or knowledge directory",
                options.teacher
            )));
        }
        if options.teacher_epochs == Some(0) {
            return Err(DistillError::Invalid(
                "distill: `teacher_epochs` must be at least 1".into(),
            ));
        }
        if options.epochs == Some(0) {
            return Err(DistillError::Invalid(
                "distill: `epochs` must be at least 1".into(),
            ));
        }
        Ok(DistillStrategy { options, specs })
    }
}

impl Strategy for DistillStrategy {
    fn kind(&self) -> &str {
        "distill"
    }

    fn run(
        &mut self,
        mut model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let to_core = |e: DistillError| match e {
            DistillError::Core(c) => c,
            other => CoreError::Invalid(format!("distill: {other}")),
        };
        let device = model.device();
        let mut teacher_top1 = None;
        let teacher = match self.options.teacher.as_str() {
            "baseline" => {
                let b = ctx.baseline.ok_or_else(|| {
                    CoreError::Invalid("distill: the pipeline has no baseline to teach".into())
                })?;
                Teacher::model(b.deep_clone()?, "baseline")
            }
            t if t.starts_with("zoo:") => {
                let name = &t["zoo:".len()..];
                // The file's name holds what the teacher was trained with, so that another
                // width or length trains a new one.
                let epochs = self.options.teacher_epochs.unwrap_or(ctx.train.epochs);
                let file = ctx.work_dir.join(format!(
                    "teacher-{name}-w{}-e{epochs}.safetensors",
                    self.options.teacher_width
                ));
                let teacher = if file.exists() {
                    Model::load(&file, &device)?
                } else {
                    let data = ctx.data;
                    let zcfg = slim_core::zoo::ZooConfig::new(data.train.shape)
                        .with_width(self.options.teacher_width)
                        .with_classes(data.train.classes);
                    let mut m = slim_core::zoo::model(name, &zcfg, ctx.train.seed, &device)?;
                    let mut cfg = ctx.train.clone();
                    if let Some(e) = self.options.teacher_epochs {
                        cfg.epochs = e;
                    }
                    (ctx.status)(&format!("training the teacher {name}"));
                    slim_core::train::train(
                        &mut m,
                        data,
                        &cfg,
                        TrainOptions::default(),
                        ctx.progress,
                    )?;
                    // Kept, so that a resumed pipeline does not train it again.
                    m.save(&file)?;
                    m
                };
                teacher_top1 = Some(
                    slim_core::train::evaluate(&teacher, &ctx.data.test, &ctx.data.normalize, 256)?
                        .top1,
                );
                Teacher::model(teacher, t)
            }
            path if PathBuf::from(path).is_dir() => {
                Teacher::Knowledge(Knowledge::open(path.as_ref(), &device).map_err(to_core)?)
            }
            path => Teacher::model(Model::load(std::path::Path::new(path), &device)?, path),
        };
        let mut distiller =
            Distiller::from_specs(&model, vec![teacher], &self.specs).map_err(to_core)?;
        let mut cfg = ctx.train.clone();
        if let Some(e) = self.options.epochs {
            cfg.epochs = e;
        }
        if let Some(lr) = self.options.lr {
            cfg.lr = lr;
        }
        let report = distill(
            &mut model,
            &mut distiller,
            ctx.data,
            &cfg,
            TrainOptions::default(),
            ctx.progress,
        )
        .map_err(to_core)?;
        let seconds: f64 = report.train.epochs.iter().map(|e| e.seconds).sum();
        let losses: serde_json::Map<String, serde_json::Value> = report
            .losses
            .iter()
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect();
        Ok((
            model,
            json!({"teacher": self.options.teacher, "teacher_top1": teacher_top1,
                   "epochs": cfg.epochs, "seconds": seconds, "losses": losses}),
        ))
    }
}
