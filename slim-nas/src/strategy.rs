//! Architecture search as pipeline [`Strategy`]s (`nas.sa`, `nas.oneshot`): the stage searches
//! its space under its limits, then trains the best candidate from scratch with the pipeline's
//! recipe and hands it on. The model entering the stage sets relative limits
//! (`max_macs_ratio`: a fraction of its MACs) and is otherwise replaced.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::json;
use slim_core::analysis::analyze;
use slim_core::data::Dataset;
use slim_core::pipeline::{Context, Strategy};
use slim_core::search::CostModel;
use slim_core::zoo::ZooConfig;
use slim_core::{CoreError, Model};

use crate::oneshot::{train_supernet, OneShotReward};
use crate::sa::{plots, sa_search, Limits, NasProgress, Reward, SaConfig, TrainReward};
use crate::{NasError, Spaces};

/// The options of a `nas.sa` or `nas.oneshot` stage (the names of `slim nas`'s flags).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NasOptions {
    /// `mobilenet_v2`, `mobilenet_v1` or `resnet`.
    pub space: String,
    #[serde(default = "one")]
    pub width: f64,
    pub max_macs: Option<u64>,
    /// At most this fraction of the MACs of the model entering the stage.
    pub max_macs_ratio: Option<f64>,
    pub max_params: Option<u64>,
    /// An f32 latency table, with `max_latency_ms` (read by the `slim` binary).
    pub latency_table: Option<PathBuf>,
    pub max_latency_ms: Option<f64>,
    #[serde(default)]
    pub fallback: bool,
    #[serde(default = "twenty")]
    pub iterations: usize,
    /// `nas.sa`: each candidate trains on the first N training images.
    #[serde(default = "two_thousand")]
    pub train_images: usize,
    /// Candidates are scored on the last N training images.
    #[serde(default = "one_thousand")]
    pub eval_images: usize,
    /// `nas.sa`: epochs of each candidate's short training.
    #[serde(default = "one_usize")]
    pub candidate_epochs: usize,
    /// `nas.oneshot`: epochs of supernet training (default: the pipeline's recipe).
    pub supernet_epochs: Option<usize>,
    /// Epochs of the best candidate's final training (default: the pipeline's recipe).
    pub epochs: Option<usize>,
    #[serde(default = "temperature")]
    pub init_temperature: f64,
    #[serde(default = "reduce")]
    pub reduce_rate: f64,
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn twenty() -> usize {
    20
}
fn two_thousand() -> usize {
    2000
}
fn one_thousand() -> usize {
    1000
}
fn temperature() -> f64 {
    0.02
}
fn reduce() -> f64 {
    0.85
}

/// A search stage.
pub struct NasStrategy {
    kind: &'static str,
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
        let kind = if oneshot { "nas.oneshot" } else { "nas.sa" };
        let bad = |m: String| Err(NasError::Invalid(format!("{kind}: {m}")));
        if !Spaces::builtin().names().contains(&options.space) {
            return bad(format!(
                "unknown space `{}` (known: {})",
                options.space,
                Spaces::builtin().names().join(", ")
            ));
        }
        if !(options.width > 0.0 && options.width <= 8.0) {
            return bad(format!("`width` {} is out of range (0, 8]", options.width));
        }
        if let Some(r) = options.max_macs_ratio {
            if !(r > 0.0 && r <= 1.0) {
                return bad(format!("`max_macs_ratio` {r} must be in (0, 1]"));
            }
        }
        if options.max_latency_ms.is_some() != cost.is_some() {
            return bad("`max_latency_ms` and `latency_table` go together".into());
        }
        if options.iterations == 0 || options.eval_images == 0 || options.candidate_epochs == 0 {
            return bad(
                "`iterations`, `eval_images` and `candidate_epochs` must be at least 1".into(),
            );
        }
        if options.supernet_epochs == Some(0) || options.epochs == Some(0) {
            return bad("`supernet_epochs` and `epochs` must be at least 1".into());
        }
        Ok(NasStrategy {
            kind,
            options,
            cost,
        })
    }
}

/// The number of classes a teacher scores: candidates without labels reproduce its scores.
pub fn teacher_classes(teacher: &Model) -> crate::Result<usize> {
    match teacher.graph.node(teacher.graph.outputs()[0]).shape[..] {
        [k] => Ok(k),
        ref other => Err(NasError::Invalid(format!(
            "the model to reproduce outputs {other:?} per image, not class scores: an \
             architecture search without labels needs a classifier to reproduce"
        ))),
    }
}

impl Strategy for NasStrategy {
    fn kind(&self) -> &str {
        self.kind
    }

    fn run(
        &mut self,
        model: Model,
        ctx: &mut Context<'_>,
    ) -> slim_core::Result<(Model, serde_json::Value)> {
        let o = &self.options;
        let kind = self.kind;
        let to_core = |e: NasError| match e {
            NasError::Core(c) => c,
            other => CoreError::Invalid(format!("{kind}: {other}")),
        };
        let data = ctx.data;
        let device = model.device();
        let n = data.train.len();
        let train_n = if kind == "nas.sa" {
            o.train_images
        } else {
            n.saturating_sub(o.eval_images)
        };
        if train_n < ctx.train.batch_size || train_n + o.eval_images > n {
            return Err(CoreError::Invalid(format!(
                "{kind}: {train_n} training and {} scoring images do not fit the {n} training \
                 images (or make less than a batch)",
                o.eval_images
            )));
        }
        // Without labels, candidates learn to reproduce the model entering the stage, and
        // score their agreement with it.
        let teacher = (!ctx.labeled()).then(|| model.clone());
        let classes = match &teacher {
            None => data.train.classes,
            Some(t) => teacher_classes(t).map_err(to_core)?,
        };
        let zcfg = ZooConfig::new(data.train.shape)
            .with_width(o.width)
            .with_classes(classes);
        let space = Spaces::builtin().build(&o.space, &zcfg).map_err(to_core)?;
        let entering = analyze(&model.graph).macs;
        let max_macs = match (o.max_macs, o.max_macs_ratio) {
            (a, Some(r)) => {
                let rel = (entering as f64 * r).floor() as u64;
                Some(a.map_or(rel, |a| a.min(rel)))
            }
            (a, None) => a,
        };
        let limits = Limits {
            max_macs,
            max_params: o.max_params,
            latency: self
                .cost
                .as_deref()
                .zip(o.max_latency_ms)
                .map(|(c, x)| (c as &dyn CostModel, x)),
        };
        let mut sub = data.clone();
        sub.train = data.train.take(train_n);
        sub.test = data.train.take_last(o.eval_images);
        let supernet;
        let mut train_reward;
        let mut oneshot_reward;
        let reward: &mut dyn Reward = if kind == "nas.sa" {
            let mut cfg = ctx.train.clone();
            cfg.epochs = o.candidate_epochs;
            train_reward = TrainReward {
                data: sub.clone(),
                cfg,
                device: device.clone(),
                teacher: teacher.clone(),
            };
            &mut train_reward
        } else {
            let mut cfg = ctx.train.clone();
            if let Some(e) = o.supernet_epochs {
                cfg.epochs = e;
            }
            (ctx.status)("training the supernet");
            let status = ctx.status;
            supernet = train_supernet(
                space.as_ref(),
                &sub,
                &cfg,
                teacher.as_ref(),
                Some(&ctx.work_dir.join("supernet.safetensors")),
                slim_core::train::CheckpointEvery::default(),
                &device,
                &mut |p| {
                    if let crate::oneshot::SupernetProgress::Step {
                        epoch,
                        epochs,
                        step,
                        steps,
                        loss,
                    } = p
                    {
                        status(&format!(
                            "supernet epoch {}/{epochs}, step {}/{steps}, loss {loss:.4}",
                            epoch + 1,
                            step + 1
                        ));
                    }
                },
            )
            .map_err(to_core)?;
            oneshot_reward = OneShotReward {
                supernet: &supernet,
                space: space.as_ref(),
                calibration: sub.train.take(512.min(train_n)),
                eval: sub.test.clone(),
                normalize: sub.normalize.clone(),
                supernet_key: json!({"data": sub.train.fingerprint(), "recipe": format!("{cfg:?}")}),
                teacher: teacher.as_ref(),
            };
            &mut oneshot_reward
        };
        let sa = SaConfig {
            iterations: o.iterations,
            init_temperature: o.init_temperature,
            reduce_rate: o.reduce_rate,
            seed: ctx.train.seed,
            ..Default::default()
        };
        let status = ctx.status;
        let labeled = ctx.labeled();
        let result = sa_search(
            space.as_ref(),
            &limits,
            reward,
            &sa,
            Some(&ctx.work_dir.join("history.json")),
            &mut |p| {
                if let NasProgress::Evaluated {
                    index, total, best, ..
                } = p
                {
                    status(&format!(
                        "candidate {}/{total}, best {} {:.2}%",
                        index + 1,
                        if labeled { "top-1" } else { "agreement" },
                        best * 100.0
                    ));
                }
            },
        )
        .map_err(to_core)?;
        let limit = o.max_latency_ms.or(max_macs.map(|m| m as f64 / 1e6));
        let (over_time, vs_cost) = plots(&result.candidates, limit);
        slim_core::io::write_atomic(&ctx.work_dir.join("reward.svg"), over_time.as_bytes())?;
        slim_core::io::write_atomic(&ctx.work_dir.join("reward-cost.svg"), vs_cost.as_bytes())?;
        // The best architecture, trained from scratch with the pipeline's recipe.
        let best = &result.best;
        let mut found = Model::init(
            space.graph(&best.tokens).map_err(to_core)?,
            ctx.train.seed,
            &device,
        )?;
        found.provenance = model.provenance.clone();
        found
            .provenance
            .insert("nas_arch".into(), format!("{}: {}", o.space, best.arch));
        let mut cfg = ctx.train.clone();
        if let Some(e) = o.epochs {
            cfg.epochs = e;
        }
        (ctx.status)(&format!("training the best candidate: {}", best.arch));
        // On the labels, or (without them) to reproduce the model entering the stage.
        let report = slim_core::pipeline::finetune(&mut found, &model, &cfg, None, ctx)?;
        let evaluated = result
            .candidates
            .iter()
            .filter(|c| c.status == "evaluated")
            .count();
        Ok((
            found,
            json!({
                "space": o.space,
                "arch": best.arch,
                "tokens": best.tokens,
                "search_top1": labeled.then_some(best.reward),
                "search_agreement": (!labeled).then_some(best.reward),
                "macs_limit": max_macs,
                "latency_ms": best.measure.latency_ms,
                "evaluated": evaluated,
                "rejected": result.candidates.len() - evaluated,
                "epochs": cfg.epochs,
                "seconds": report.epochs.iter().map(|e| e.seconds).sum::<f64>(),
            }),
        ))
    }
}
