//! Distillation as a pipeline [`Strategy`] (`distill`): the model entering the stage is the
//! student, taught by [`crate::run::run`]; the teachers are the pipeline's baseline (the
//! default), a zoo model trained in the stage's folder first (`zoo:NAME`), model files or
//! knowledge directories.

use serde_json::json;
use slim_core::pipeline::{Context, Strategy};
use slim_core::{CoreError, Model};

use crate::run::{run, DistillOptions, Inputs};
use crate::DistillError;

/// A distillation stage.
pub struct DistillStrategy {
    options: DistillOptions,
}

impl DistillStrategy {
    /// Checks the options (the loss specs, the teachers' files) before any work; node names
    /// are checked when the stage starts, against the models it meets.
    pub fn new(options: DistillOptions) -> crate::Result<Self> {
        options.validate("distill")?;
        Ok(DistillStrategy { options })
    }
}

impl Strategy for DistillStrategy {
    fn kind(&self) -> &str {
        "distill"
    }

    fn run(
        &mut self,
        model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let to_core = |e: DistillError| match e {
            DistillError::Core(c) => c,
            other => CoreError::Invalid(format!("distill: {other}")),
        };
        let status = ctx.status;
        let inputs = Inputs {
            label_free: !ctx.labeled(),
            baseline: ctx.baseline,
            work_dir: Some(&ctx.work_dir),
            status: Some(&|s: &str| status(s)),
            ..Inputs::new(ctx.data, &ctx.train)
        };
        let (student, report) =
            run(model, &self.options, inputs, &mut *ctx.progress).map_err(to_core)?;
        let seconds: f64 = report.train.epochs.iter().map(|e| e.seconds).sum();
        let losses: serde_json::Map<String, serde_json::Value> = report
            .losses
            .iter()
            .map(|(n, v)| (n.clone(), json!(v)))
            .collect();
        Ok((
            student,
            json!({"teacher": self.options.teacher.join(", "),
                   "teacher_top1": report.teachers.first().and_then(|t| t.top1),
                   "epochs": report.epochs, "seconds": seconds, "losses": losses}),
        ))
    }
}
