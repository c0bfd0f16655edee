//! Automatic pruning: a search over per-group ratios under a FLOPs limit.
//!
//! Each group in scope is one token of the search: the number of its channels removed, from 0
//! up to `max_ratio` of them (annealing moves a token by at most a tenth of its range). The FLOPs limit is checked on every candidate, from the channel counts alone,
//! before the candidate is pruned or evaluated; the reward is the evaluator's score of the
//! pruned model (top-1 on an evaluation subset), after an optional short fine-tune. The
//! controllers are `slim-core`'s ([`Annealing`], [`Evolution`]), seeded, and the history is
//! written after every trial so that a killed search resumes (see
//! [`slim_core::search::run_search`]).
//!
//! The search starts from a candidate that meets the limit: the ratios given (those chosen
//! from sensitivities, say) or else uniform pruning to the target.

use std::path::Path;

use serde_json::json;
use slim_core::search::{
    run_search, Annealing, Evaluator, Evolution, History, SearchProgress, Trial,
};
use slim_core::study::{
    StudyController, StudyStore, StudyTask, Worker, WorkerOptions, WorkerProgress,
};
use slim_core::Model;

use crate::pruner::{check_reduction, Pruner, Ratios};
use crate::{PruneError, Result};

/// The search algorithm and its settings.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Simulated annealing; the temperature is on the scale of the reward (top-1 in 0..1).
    Annealing {
        init_temperature: f64,
        reduce_rate: f64,
    },
    /// Steady-state evolution with tournament selection and uniform crossover.
    Evolution { population: usize, mutation: f64 },
}

impl Method {
    pub fn annealing() -> Self {
        Method::Annealing {
            init_temperature: 0.01,
            reduce_rate: 0.85,
        }
    }
    pub fn evolution() -> Self {
        Method::Evolution {
            population: 8,
            mutation: 0.15,
        }
    }
}

/// What to search for and how long.
#[derive(Clone, Debug)]
pub struct AutoConfig {
    /// The FLOPs reduction every candidate must reach, in (0, 1).
    pub reduction: f64,
    /// Evaluations in all.
    pub trials: usize,
    pub method: Method,
    /// The largest ratio a group may take.
    pub max_ratio: f64,
    pub seed: u64,
}

impl AutoConfig {
    pub fn new(reduction: f64) -> Self {
        AutoConfig {
            reduction,
            trials: 30,
            method: Method::annealing(),
            max_ratio: 0.9,
            seed: 0,
        }
    }
}

/// Trains a pruned candidate briefly before it is scored.
pub type Finetune<'a> = dyn FnMut(&mut Model) -> slim_core::Result<()> + 'a;

/// The best candidate found.
#[derive(Clone, Debug)]
pub struct AutoResult {
    pub ratios: Ratios,
    pub reward: f64,
    /// The reward of the starting candidate.
    pub initial_reward: f64,
    pub reduction: f64,
    pub history: History,
}

/// A search's space, limit, start and controller.
struct Prepared {
    groups: Vec<usize>,
    channels: Vec<usize>,
    limit: f64,
    controller: StudyController,
    key: serde_json::Value,
}

impl Prepared {
    /// Token i: channels removed from group i.
    fn ratios(&self, tokens: &[usize]) -> Ratios {
        self.groups
            .iter()
            .zip(tokens)
            .zip(&self.channels)
            .map(|((&g, &t), &c)| (g, t as f64 / c as f64))
            .collect()
    }

    fn feasible(&self, pruner: &Pruner<'_>, tokens: &[usize]) -> bool {
        pruner.predict_macs(&self.ratios(tokens)) as f64 <= self.limit
    }

    /// The reward of a candidate (pruned, fine-tuned if asked, scored) and its reduction.
    fn evaluate(
        &self,
        pruner: &Pruner<'_>,
        evaluator: &dyn Evaluator,
        finetune: &mut Option<&mut Finetune<'_>>,
        tokens: &[usize],
    ) -> slim_core::Result<(f64, serde_json::Value)> {
        let ratios = self.ratios(tokens);
        let mut pruned = pruner.apply(&ratios).map_err(|e| match e {
            PruneError::Core(c) => c,
            other => slim_core::CoreError::Invalid(other.to_string()),
        })?;
        if let Some(f) = finetune.as_mut() {
            f(&mut pruned)?;
        }
        let reward = evaluator.score(&pruned)?;
        Ok((
            reward,
            json!({ "reduction": pruner.predict_reduction(&ratios) }),
        ))
    }

    fn result(&self, pruner: &Pruner<'_>, history: History) -> Result<AutoResult> {
        let best = history
            .best()
            .ok_or_else(|| PruneError::Invalid("the search evaluated nothing".into()))?;
        let ratios = self.ratios(&best.tokens);
        // The starting candidate is the first made (in a study, not always the first reported).
        let initial = history
            .trials
            .iter()
            .find(|t| t.info.get("candidate").is_none_or(|c| c == 0))
            .unwrap_or(&history.trials[0]);
        Ok(AutoResult {
            reduction: pruner.predict_reduction(&ratios),
            reward: best.reward,
            initial_reward: initial.reward,
            ratios,
            history,
        })
    }
}

/// Checks the settings and makes the search's space, start and controller.
fn prepare(
    pruner: &Pruner<'_>,
    cfg: &AutoConfig,
    init: Option<&Ratios>,
    key: serde_json::Value,
) -> Result<Prepared> {
    check_reduction(cfg.reduction)?;
    if cfg.trials == 0 {
        return Err(PruneError::Invalid(
            "a search needs at least one trial".into(),
        ));
    }
    if !(cfg.max_ratio > 0.0 && cfg.max_ratio < 1.0) {
        return Err(PruneError::Invalid(format!(
            "the largest ratio must be in (0, 1), not {}",
            cfg.max_ratio
        )));
    }
    let groups: Vec<usize> = pruner.scope().to_vec();
    let channels: Vec<usize> = groups.iter().map(|&g| pruner.group(g).channels).collect();
    // Token i: channels removed from group i, at most max_ratio of them and never all.
    let ranges: Vec<usize> = channels
        .iter()
        .map(|&c| ((c as f64 * cfg.max_ratio).floor() as usize).min(c - 1) + 1)
        .collect();
    let limit = pruner.base_macs() as f64 * (1.0 - cfg.reduction);

    // The starting candidate.
    let start: Ratios = match init {
        Some(r) => r.clone(),
        None => pruner.uniform_for_reduction(cfg.reduction)?.ratios,
    };
    let init_tokens: Vec<usize> = groups
        .iter()
        .zip(&channels)
        .zip(&ranges)
        .map(|((g, &c), &range)| {
            let r = start.get(g).copied().unwrap_or(0.0);
            (c - crate::pruner::kept_channels(c, r)).min(range - 1)
        })
        .collect();
    let controller = match cfg.method {
        Method::Annealing {
            init_temperature,
            reduce_rate,
        } => StudyController::Annealing(
            Annealing::new(
                ranges,
                init_tokens.clone(),
                init_temperature,
                reduce_rate,
                cfg.seed,
            )?
            .with_reach(0.1),
        ),
        Method::Evolution {
            population,
            mutation,
        } => StudyController::Evolution(Evolution::new(
            ranges,
            init_tokens.clone(),
            population,
            mutation,
            cfg.seed,
        )?),
    };
    let key = json!({
        "model": pruner.model().fingerprint()?,
        "criterion": pruner.criterion().name(),
        "bn_calibration": pruner.calibration_images(),
        "groups": groups.iter().map(|&g| pruner.key(g)).collect::<Vec<_>>(),
        "reduction": cfg.reduction,
        "method": format!("{:?}", cfg.method),
        "max_ratio": cfg.max_ratio,
        "seed": cfg.seed,
        "init": start.iter().map(|(g, r)| (pruner.key(*g), *r)).collect::<std::collections::BTreeMap<_, _>>(),
        "evaluation": key,
    });
    let p = Prepared {
        groups,
        channels,
        limit,
        controller,
        key,
    };
    if !p.feasible(pruner, &init_tokens) {
        return Err(PruneError::Invalid(format!(
            "the starting candidate does not reach a FLOPs reduction of {:.1}% with at most \
             {:.0}% of any group removed",
            cfg.reduction * 100.0,
            cfg.max_ratio * 100.0
        )));
    }
    Ok(p)
}

/// Searches per-group ratios that meet `cfg.reduction` and score best. `init` is the starting
/// candidate (uniform pruning to the target when absent); `finetune`, when given, trains each
/// pruned candidate briefly before it is scored; `history` is the resumable trial file;
/// `key` identifies the evaluation data (its fingerprint) and the fine-tune recipe, so that a
/// history is only resumed by the same search.
#[allow(clippy::too_many_arguments)]
pub fn search(
    pruner: &Pruner<'_>,
    cfg: &AutoConfig,
    init: Option<&Ratios>,
    evaluator: &dyn Evaluator,
    mut finetune: Option<&mut Finetune<'_>>,
    history: Option<&Path>,
    key: serde_json::Value,
    progress: &mut dyn FnMut(SearchProgress<'_>),
) -> Result<AutoResult> {
    let mut p = prepare(pruner, cfg, init, key)?;
    let mut controller = p.controller.clone();
    let mut feasible = |t: &[usize]| p.feasible(pruner, t);
    let mut evaluate = |t: &[usize]| p.evaluate(pruner, evaluator, &mut finetune, t);
    let history = run_search(
        &mut controller,
        &mut feasible,
        &mut evaluate,
        cfg.trials,
        p.key.clone(),
        history,
        progress,
    )?;
    p.controller = controller;
    p.result(pruner, history)
}

/// The study work of a pruning search.
struct Work<'a, 'p, 'f> {
    p: &'a Prepared,
    pruner: &'a Pruner<'p>,
    evaluator: &'a dyn Evaluator,
    finetune: Option<&'a mut Finetune<'f>>,
}

impl StudyTask for Work<'_, '_, '_> {
    fn feasible(&mut self, tokens: &[usize]) -> bool {
        self.p.feasible(self.pruner, tokens)
    }
    fn proposed(&mut self, _tokens: &[usize]) -> slim_core::Result<serde_json::Value> {
        Ok(json!({}))
    }
    fn evaluate(
        &mut self,
        tokens: &[usize],
        _proposal: &serde_json::Value,
        known: &[Trial],
    ) -> slim_core::Result<(f64, serde_json::Value)> {
        // A candidate met again keeps the reward it got (the evaluation is seeded).
        if let Some(k) = known.iter().find(|k| k.tokens == tokens) {
            let ratios = self.p.ratios(tokens);
            let reduction = self.pruner.predict_reduction(&ratios);
            return Ok((k.reward, json!({ "reduction": reduction })));
        }
        self.p
            .evaluate(self.pruner, self.evaluator, &mut self.finetune, tokens)
    }
}

/// [`search`] as one worker of a study shared through `store` (see [`slim_core::study`]):
/// every worker of the study is started with the same model, settings and evaluation.
#[allow(clippy::too_many_arguments)]
pub fn search_worker(
    pruner: &Pruner<'_>,
    cfg: &AutoConfig,
    init: Option<&Ratios>,
    evaluator: &dyn Evaluator,
    finetune: Option<&mut Finetune<'_>>,
    key: serde_json::Value,
    store: &dyn StudyStore,
    opts: WorkerOptions,
    progress: &mut dyn FnMut(WorkerProgress<'_>),
) -> Result<AutoResult> {
    let p = prepare(pruner, cfg, init, key)?;
    let make = || Ok(p.controller.clone());
    let worker = Worker::new(store, p.key.clone(), cfg.trials, &make, opts)?;
    let mut work = Work {
        p: &p,
        pruner,
        evaluator,
        finetune,
    };
    let history = worker.run(&mut work, progress)?;
    p.result(pruner, history)
}
