//! Pruning as a pipeline [`Strategy`]: `prune.uniform`, `prune.sensitivity` and `prune.auto`,
//! each [`crate::run::compress`]: pruning, then fine-tuning with the pipeline's training
//! recipe.

use slim_core::pipeline::{Context, Strategy};
use slim_core::{CoreError, Model};

use slim_core::pipeline::Finetuning;
use slim_core::search::SearchProgress;

use crate::run::{compress, Inputs, Progress};
pub use crate::run::{Choice, PruneOptions};
use crate::PruneError;

/// A pruning stage.
pub struct PruneStrategy {
    pub choice: Choice,
    pub options: PruneOptions,
    kind: String,
}

impl PruneStrategy {
    /// Checks the options for `choice` (before any work is done).
    pub fn new(choice: Choice, options: PruneOptions) -> crate::Result<Self> {
        let kind = format!("prune.{}", choice.name());
        options.validate(choice, &kind)?;
        Ok(PruneStrategy {
            choice,
            options,
            kind,
        })
    }
}

impl Strategy for PruneStrategy {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn run(
        &mut self,
        model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let inputs = Inputs {
            data: Some(ctx.data),
            label_free: !ctx.labeled(),
            sensitivity_file: Some(ctx.work_dir.join("sensitivity.json")),
            history: Some(ctx.work_dir.join("search.json")),
            seed: ctx.train.seed,
            ..Default::default()
        };
        let finetune = (self.options.finetune_epochs > 0).then(|| {
            let mut cfg = ctx.train.clone();
            cfg.epochs = self.options.finetune_epochs;
            if let Some(lr) = self.options.lr {
                cfg.lr = lr;
            }
            Finetuning::new(cfg)
        });
        let (status, train_progress) = (ctx.status, &mut *ctx.progress);
        let done = compress(
            &model,
            self.choice,
            &self.options,
            inputs,
            finetune.as_ref(),
            &mut |p| match p {
                Progress::Search(SearchProgress::Evaluated {
                    index, total, best, ..
                }) => status(&format!(
                    "search: {}/{total} candidates, best top-1 {:.2}%",
                    index + 1,
                    best * 100.0
                )),
                Progress::Train(p) => train_progress(p),
                _ => {}
            },
        );
        let (pruned, outcome) = done.map_err(|e| match e {
            PruneError::Core(c) => c,
            other => CoreError::Invalid(other.to_string()),
        })?;
        let mut info = serde_json::to_value(&outcome.report)
            .map_err(|e| CoreError::Invalid(format!("{}: the report: {e}", self.kind)))?;
        if let Some(f) = &finetune {
            info["finetune_epochs"] = serde_json::json!(f.config.epochs);
        }
        Ok((pruned, info))
    }
}
