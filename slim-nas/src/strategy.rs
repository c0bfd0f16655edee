//! Architecture search as pipeline [`Strategy`]s (`nas.sa`, `nas.oneshot`): the stage searches
//! its space under its limits with [`crate::run::run`], then trains the best candidate from
//! scratch with the pipeline's recipe and hands it on. The model entering the stage sets
//! relative limits (`max_macs_ratio`: a fraction of its MACs) and is otherwise replaced.

use serde_json::json;
use slim_core::analysis::analyze;
use slim_core::pipeline::{Context, Strategy};
use slim_core::search::CostModel;
use slim_core::train::CheckpointEvery;
use slim_core::{CoreError, Model};

use crate::oneshot::SupernetProgress;
use crate::run::{run, Inputs, Method, NasOptions, Progress};
use crate::sa::NasProgress;
use crate::NasError;

/// A search stage.
pub struct NasStrategy {
    method: Method,
    options: NasOptions,
    cost: Option<Box<dyn CostModel + Send>>,
}

impl NasStrategy {
    /// `oneshot` chooses `nas.oneshot`; `cost` prices candidates for `max_latency_ms` (the
    /// table named by `latency_table`, loaded by the caller). Options are checked here.
    pub fn new(
        oneshot: bool,
        options: NasOptions,
        cost: Option<Box<dyn CostModel + Send>>,
    ) -> crate::Result<Self> {
        let method = if oneshot {
            Method::OneShot
        } else {
            Method::Train
        };
        options.validate(method, cost.is_some())?;
        Ok(NasStrategy {
            method,
            options,
            cost,
        })
    }
}

impl Strategy for NasStrategy {
    fn kind(&self) -> &str {
        self.method.kind()
    }

    fn run(
        &mut self,
        model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let o = &self.options;
        let to_core = |e: NasError| match e {
            NasError::Core(c) => c,
            other => CoreError::Invalid(other.to_string()),
        };
        let device = model.device();
        // Without labels, candidates learn to reproduce the model entering the stage, and
        // score their agreement with it.
        let teacher = (!ctx.labeled()).then(|| model.clone());
        let status = ctx.status;
        let inputs = Inputs {
            data: ctx.data,
            teacher: teacher.as_ref(),
            cost: self.cost.as_deref().map(|c| c as &dyn CostModel),
            train: &ctx.train,
            device: &device,
            out: &ctx.work_dir,
            entering_macs: Some(analyze(&model.graph).macs),
            checkpoint: CheckpointEvery::default(),
            study: None,
        };
        if self.method == Method::OneShot {
            status("training the supernet");
        }
        let (found, report) = run(self.method, o, inputs, &mut |p| match p {
            Progress::Supernet(SupernetProgress::Step {
                epoch,
                epochs,
                step,
                steps,
                loss,
            }) => status(&format!(
                "supernet epoch {}/{epochs}, step {}/{steps}, loss {loss:.4}",
                epoch + 1,
                step + 1
            )),
            Progress::Search(NasProgress::Evaluated {
                index, total, best, ..
            }) => status(&format!(
                "candidate {}/{total}, best {} {:.2}%",
                index + 1,
                if teacher.is_none() {
                    "top-1"
                } else {
                    "agreement"
                },
                best * 100.0
            )),
            _ => {}
        })
        .map_err(to_core)?;
        // The best architecture, trained from scratch with the pipeline's recipe.
        let graph = found.space.graph(&report.tokens).map_err(to_core)?;
        let mut best = Model::init(graph, ctx.train.seed, &device)?;
        best.provenance = model.provenance.clone();
        best.provenance
            .insert("nas_arch".into(), format!("{}: {}", o.space, report.arch));
        let mut cfg = ctx.train.clone();
        cfg.epochs = o.epochs.unwrap_or(cfg.epochs);
        (ctx.status)(&format!("training the best candidate: {}", report.arch));
        // On the labels, or (without them) to reproduce the model entering the stage.
        let trained = slim_core::pipeline::finetune(&mut best, &model, &cfg, None, ctx)?;
        let labeled = teacher.is_none();
        Ok((
            best,
            json!({
                "space": report.space,
                "arch": report.arch,
                "tokens": report.tokens,
                "search_top1": labeled.then_some(report.reward),
                "search_agreement": (!labeled).then_some(report.reward),
                "macs_limit": report.macs_limit,
                "latency_ms": report.latency_ms,
                "evaluated": report.evaluated,
                "rejected": report.rejected,
                "epochs": cfg.epochs,
                "seconds": trained.epochs.iter().map(|e| e.seconds).sum::<f64>(),
            }),
        ))
    }
}
