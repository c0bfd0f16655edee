//! Pruning as a pipeline [`Strategy`]: `prune.uniform`, `prune.sensitivity` and `prune.auto`,
//! each followed by fine-tuning with the pipeline's training recipe.

use serde::Deserialize;
use serde_json::json;
use slim_core::pipeline::{Context, Strategy};
use slim_core::train::Top1;
use slim_core::{CoreError, Model};

use crate::auto::{self, AutoConfig, Method};
use crate::pruner::{check_ratio, check_reduction, kept_channels, Calibration, Pruner, Ratios};
use crate::sensitivity::{self, default_ratios, EvalData};
use crate::{Criterion, PruneError};

/// Which way the per-group ratios are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Uniform,
    Sensitivity,
    Auto,
}

/// The options of a pruning stage (the names of `slim prune`'s flags).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneOptions {
    /// One ratio for every group (uniform only).
    pub ratio: Option<f64>,
    /// The FLOPs reduction to reach.
    pub flops_reduction: Option<f64>,
    #[serde(default)]
    pub criterion: Criterion,
    #[serde(default)]
    pub scope: Vec<String>,
    /// Training images that recalibrate batch norms after pruning.
    #[serde(default = "default_calibration")]
    pub bn_calibration: usize,
    /// Test images for sensitivities and search rewards (default: all).
    pub eval_samples: Option<usize>,
    /// Ratios of the sensitivity analysis.
    #[serde(default = "default_ratios")]
    pub ratios: Vec<f64>,
    /// Candidates of the automatic search.
    #[serde(default = "default_trials")]
    pub trials: usize,
    /// `annealing` or `evolution`.
    #[serde(default = "default_search")]
    pub search: String,
    /// Fine-tuning epochs after pruning (with the pipeline's recipe).
    #[serde(default)]
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate (default: the recipe's).
    pub lr: Option<f64>,
}

fn default_calibration() -> usize {
    640
}
fn default_trials() -> usize {
    30
}
fn default_search() -> String {
    "annealing".into()
}

/// A pruning stage.
pub struct PruneStrategy {
    pub choice: Choice,
    pub options: PruneOptions,
    kind: String,
}

impl PruneStrategy {
    /// Checks the options for `choice` (before any work is done).
    pub fn new(choice: Choice, options: PruneOptions) -> crate::Result<Self> {
        let kind = match choice {
            Choice::Uniform => "prune.uniform",
            Choice::Sensitivity => "prune.sensitivity",
            Choice::Auto => "prune.auto",
        };
        match (choice, options.ratio, options.flops_reduction) {
            (Choice::Uniform, Some(r), None) => check_ratio(r)?,
            (_, None, Some(f)) => check_reduction(f)?,
            (Choice::Uniform, _, _) => {
                return Err(PruneError::Invalid(format!(
                    "{kind}: give exactly one of `ratio` and `flops_reduction`"
                )))
            }
            _ => {
                return Err(PruneError::Invalid(format!(
                    "{kind}: give `flops_reduction` (and no `ratio`)"
                )))
            }
        }
        for &r in &options.ratios {
            check_ratio(r)?;
        }
        if options.search != "annealing" && options.search != "evolution" {
            return Err(PruneError::Invalid(format!(
                "{kind}: unknown search `{}` (annealing or evolution)",
                options.search
            )));
        }
        if choice == Choice::Auto && options.trials == 0 {
            return Err(PruneError::Invalid(format!(
                "{kind}: `trials` must be at least 1"
            )));
        }
        Ok(PruneStrategy {
            choice,
            options,
            kind: kind.into(),
        })
    }

    fn prune(
        &self,
        model: &Model,
        ctx: &mut Context<'_>,
    ) -> crate::Result<(Model, serde_json::Value)> {
        let o = &self.options;
        let mut pruner = Pruner::new(model, o.criterion, &o.scope)?;
        if o.bn_calibration > 0 {
            pruner = pruner.with_calibration(Calibration {
                set: ctx.data.train.take(o.bn_calibration),
                normalize: ctx.data.normalize.clone(),
                batch_size: 64,
            });
        }
        let set = match o.eval_samples {
            Some(n) => ctx.data.test.take(n),
            None => ctx.data.test.clone(),
        };
        let eval = EvalData {
            description: format!("{}, {} test images", ctx.data.spec, set.labels.len()),
            fingerprint: set.fingerprint(),
        };
        let evaluator = Top1 {
            set,
            normalize: ctx.data.normalize.clone(),
            batch_size: 256,
        };
        let mut info = json!({});
        let ratios: Ratios = match (self.choice, o.ratio, o.flops_reduction) {
            (Choice::Uniform, Some(r), _) => pruner.uniform(r),
            (Choice::Uniform, None, Some(f)) => pruner.uniform_for_reduction(f)?.ratios,
            (Choice::Sensitivity, _, Some(f)) => {
                let file = ctx.work_dir.join("sensitivity.json");
                let sens = sensitivity::analyze(
                    &pruner,
                    &evaluator,
                    &o.ratios,
                    &eval,
                    Some(&file),
                    &|_| {},
                )?;
                slim_core::io::write_atomic(
                    &ctx.work_dir.join("sensitivity.svg"),
                    sensitivity::to_svg(&sens).as_bytes(),
                )?;
                info["sensitivity"] = json!(file);
                sensitivity::ratios_for_reduction(&sens, &pruner, f)?
            }
            (Choice::Auto, _, Some(f)) => {
                let method = if o.search == "evolution" {
                    Method::evolution()
                } else {
                    Method::annealing()
                };
                let cfg = AutoConfig {
                    trials: o.trials,
                    method,
                    seed: ctx.train.seed,
                    ..AutoConfig::new(f)
                };
                let history = ctx.work_dir.join("search.json");
                let r = auto::search(
                    &pruner,
                    &cfg,
                    None,
                    &evaluator,
                    None,
                    Some(&history),
                    json!({"data": eval.fingerprint}),
                    &mut |p| {
                        if let slim_core::search::SearchProgress::Evaluated {
                            index,
                            total,
                            best,
                            ..
                        } = p
                        {
                            (ctx.status)(&format!(
                                "search: {}/{total} candidates, best top-1 {:.2}%",
                                index + 1,
                                best * 100.0
                            ));
                        }
                    },
                )?;
                info["search"] = json!({"history": history, "best_reward": r.reward,
                                        "initial_reward": r.initial_reward});
                r.ratios
            }
            _ => return Err(PruneError::Invalid(format!("{}: no target", self.kind))),
        };
        let pruned = pruner.apply(&ratios)?;
        info["flops_reduction"] = json!(pruner.predict_reduction(&ratios));
        info["groups"] = ratios
            .iter()
            .map(|(&g, &r)| {
                let c = pruner.group(g).channels;
                json!({"group": pruner.key(g), "channels": c, "kept": kept_channels(c, r)})
            })
            .collect();
        Ok((pruned, info))
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
        if !ctx.labeled() && self.choice != Choice::Uniform {
            return Err(CoreError::Invalid(format!(
                "{}: the data has no labels, and this method scores pruned models by their \
                 accuracy; without labels, use prune.uniform",
                self.kind
            )));
        }
        let (mut pruned, mut info) = self.prune(&model, ctx).map_err(|e| match e {
            PruneError::Core(c) => c,
            other => CoreError::Invalid(other.to_string()),
        })?;
        if self.options.finetune_epochs > 0 {
            let mut cfg = ctx.train.clone();
            cfg.epochs = self.options.finetune_epochs;
            if let Some(lr) = self.options.lr {
                cfg.lr = lr;
            }
            // Without labels, the pruned model learns to reproduce the unpruned one.
            slim_core::pipeline::finetune(&mut pruned, &model, &cfg, None, ctx)?;
            info["finetune_epochs"] = json!(cfg.epochs);
        }
        Ok((pruned, info))
    }
}
