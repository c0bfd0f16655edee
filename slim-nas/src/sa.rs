//! Simulated-annealing architecture search under MACs, parameter and latency limits.
//!
//! Every candidate the controller proposes is measured first (its graph's MACs and parameters,
//! its latency from the [`CostModel`] when one is given); one that breaks a limit is rejected
//! there, recorded as rejected, and never trained or evaluated. The reward of the others comes
//! from a [`Reward`]: by default a short training on a data subset and the top-1 accuracy on
//! an evaluation subset ([`TrainReward`]).
//!
//! The search starts from the space's hand-made network. When that breaks a limit, it is shrunk
//! one token at a time (a seeded random token moved to its next cheaper choice) until it
//! fits: a start on the limit's edge, where the best candidates usually are. The controller is
//! `slim-core`'s [`Annealing`]; the history is written after every trial, so a killed search
//! resumes where it stopped (see [`slim_core::search::run_search`]). A candidate met again
//! keeps the reward it got the first time instead of being trained again.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use slim_core::analysis::analyze;
use slim_core::data::DataSplits;
use slim_core::plot::{Plot, Series};
use slim_core::reproduce::Reproduce;
use slim_core::search::{
    run_search, Annealing, CostModel, Evolution, History, SearchProgress, Trial,
};
use slim_core::study::{
    StudyController, StudyStore, StudyTask, Worker, WorkerOptions, WorkerProgress,
};
use slim_core::train::{evaluate, fidelity, train, TrainConfig, TrainOptions};
use slim_core::{CoreError, Graph, Model};

use crate::space::{check_tokens, SearchSpace};
use crate::{NasError, Result};

/// The limits every evaluated candidate meets.
#[derive(Default)]
pub struct Limits<'a> {
    pub max_macs: Option<u64>,
    pub max_params: Option<u64>,
    /// A cost model (a latency table) and the largest cost allowed.
    pub latency: Option<(&'a dyn CostModel, f64)>,
}

impl Limits<'_> {
    fn key(&self) -> serde_json::Value {
        json!({
            "max_macs": self.max_macs,
            "max_params": self.max_params,
            "max_latency": self.latency.map(|(c, x)| json!({"cost": c.key(), "max": x})),
        })
    }

    fn check(&self) -> Result<()> {
        if let Some((_, x)) = self.latency {
            if !(x > 0.0 && x.is_finite()) {
                return Err(NasError::Invalid(format!(
                    "the latency limit must be positive, not {x}"
                )));
            }
        }
        if self.max_macs == Some(0) || self.max_params == Some(0) {
            return Err(NasError::Invalid(
                "a MACs or parameter limit of 0 admits no model".into(),
            ));
        }
        Ok(())
    }

    /// What a candidate breaks, in words; `None` when it meets every limit.
    pub fn broken(&self, m: &Measure) -> Option<String> {
        let mut why = Vec::new();
        if let Some(max) = self.max_macs.filter(|&x| m.macs > x) {
            why.push(format!("{} MACs > {max}", m.macs));
        }
        if let Some(max) = self.max_params.filter(|&x| m.params > x) {
            why.push(format!("{} params > {max}", m.params));
        }
        if let (Some((_, max)), Some(l)) = (self.latency, m.latency_ms) {
            if l > max {
                why.push(format!("{l:.3} ms > {max}"));
            }
        }
        (!why.is_empty()).then(|| why.join(", "))
    }

    /// The size and cost of a candidate's graph.
    pub fn measure(&self, graph: &Graph) -> Result<Measure> {
        let s = analyze(graph);
        let latency_ms = match self.latency {
            Some((c, _)) => Some(c.cost(graph)?),
            None => None,
        };
        Ok(Measure {
            macs: s.macs,
            params: s.params,
            latency_ms,
        })
    }
}

/// A candidate's size and cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    pub macs: u64,
    pub params: u64,
    /// Present when a cost model (a latency table) priced the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// The score of a candidate architecture (higher is better).
pub trait Reward {
    /// What the reward depends on (data fingerprints, recipe): a history is only resumed by a
    /// search with the same key.
    fn key(&self) -> serde_json::Value;
    /// The reward of the candidate `tokens`, whose graph is `graph`.
    fn reward(&mut self, tokens: &[usize], graph: &Graph) -> slim_core::Result<f64>;
}

/// The default reward: train a fresh model of the candidate (seeded) on `data.train` with
/// `cfg`, then its top-1 on `data.test` (subsets of a data set, for a short search). With a
/// teacher (data without labels), the candidate learns to reproduce the teacher's outputs
/// instead, and scores its fidelity to it on `data.test` (top-1 agreement, or the cosine
/// similarity of an output that is not class scores).
pub struct TrainReward {
    pub data: DataSplits,
    pub cfg: TrainConfig,
    pub device: Device,
    pub teacher: Option<Model>,
}

impl Reward for TrainReward {
    fn key(&self) -> serde_json::Value {
        let mut key = json!({
            "train": self.data.train.fingerprint(),
            "eval": self.data.test.fingerprint(),
            "recipe": format!("{:?}", self.cfg),
        });
        if let Some(t) = &self.teacher {
            key["teacher"] = json!(t.fingerprint().ok());
        }
        key
    }
    fn reward(&mut self, _tokens: &[usize], graph: &Graph) -> slim_core::Result<f64> {
        let mut model = Model::init(graph.clone(), self.cfg.seed, &self.device)?;
        let Some(teacher) = &self.teacher else {
            train(
                &mut model,
                &self.data,
                &self.cfg,
                TrainOptions::default(),
                &mut |_| {},
            )?;
            return Ok(evaluate(&model, &self.data.test, &self.data.normalize, 256)?.top1);
        };
        let mut term = Reproduce::new(teacher.clone())?;
        let opts = TrainOptions {
            label_free: true,
            eval_each_epoch: false,
            extra: vec![&mut term],
            ..Default::default()
        };
        train(&mut model, &self.data, &self.cfg, opts, &mut |_| {})?;
        Ok(fidelity(&model, teacher, &self.data.test, &self.data.normalize, 256)?.headline())
    }
}

/// The annealing settings.
#[derive(Clone, Debug)]
pub struct SaConfig {
    /// Candidates evaluated in all.
    pub iterations: usize,
    /// On the reward's scale (0.02: a loss of two points of top-1 is accepted with
    /// probability 1/e at first).
    pub init_temperature: f64,
    pub reduce_rate: f64,
    pub seed: u64,
    /// Candidates rejected in a row, for breaking a limit, before the search gives up.
    pub max_rejections: usize,
    /// A steady-state evolutionary search (`slim-core`'s [`Evolution`]) in place of the
    /// annealing, whose temperature settings it then ignores.
    pub evolution: Option<Evolve>,
}

/// The settings of an evolutionary search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evolve {
    /// Candidates kept (at least 2).
    pub population: usize,
    /// Each token of a child changes with this probability.
    pub mutation: f64,
}

impl Default for SaConfig {
    fn default() -> Self {
        SaConfig {
            iterations: 20,
            init_temperature: 0.02,
            reduce_rate: 0.85,
            seed: 0,
            max_rejections: 1000,
            evolution: None,
        }
    }
}

/// One candidate of the history: evaluated (with its reward) or rejected (with the limit it
/// broke).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub tokens: Vec<usize>,
    /// The candidate in words (the tokens that differ from the initial network).
    pub arch: String,
    #[serde(flatten)]
    pub measure: Measure,
    pub reward: Option<f64>,
    /// `evaluated` or `rejected`.
    pub status: String,
    /// Why a rejected candidate was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a search found.
#[derive(Clone, Debug)]
pub struct SaResult {
    /// The best evaluated candidate.
    pub best: Candidate,
    /// Every candidate in the order it was met, rejected ones included.
    pub candidates: Vec<Candidate>,
    /// The trial file's contents (evaluated candidates, with the rejected ones before each).
    pub history: History,
    /// The initial network's measure, and whether it met the limits.
    pub baseline: Measure,
    pub baseline_feasible: bool,
}

impl SaResult {
    /// `{"best": ..., "history": [...]}`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({"best": self.best, "history": self.candidates})
    }
}

/// What a search reports as it goes.
#[derive(Clone, Debug)]
pub enum NasProgress<'a> {
    /// The initial network broke a limit; this one, `steps` tokens cheaper, starts the search.
    Start {
        arch: String,
        steps: usize,
    },
    Replayed {
        index: usize,
    },
    Evaluated {
        index: usize,
        total: usize,
        candidate: &'a Candidate,
        best: f64,
        /// Candidates rejected before this one was found.
        rejected: usize,
    },
    /// A worker of a study took a candidate, waits, or had its report dropped.
    Study(WorkerProgress<'a>),
}

impl NasProgress<'_> {
    /// The event in words, for a log (`metric` names the reward: `top-1`, `agreement`);
    /// `None` for a study's report of a trial.
    pub fn describe(&self, metric: &str) -> Option<String> {
        Some(match self {
            NasProgress::Start { arch, steps } => format!(
                "the hand-made network breaks the limits; starting {steps} step(s) smaller: {arch}"
            ),
            NasProgress::Replayed { index } => {
                format!("candidate {} replayed from the history", index + 1)
            }
            NasProgress::Evaluated {
                index,
                total,
                candidate,
                best,
                rejected,
            } => format!(
                "candidate {}/{total}: {metric} {:.2}% (best {:.2}%), {} MACs{}, {rejected} \
                 rejected before it: {}",
                index + 1,
                candidate.reward.unwrap_or(f64::NAN) * 100.0,
                best * 100.0,
                slim_core::analysis::human(candidate.measure.macs),
                candidate
                    .measure
                    .latency_ms
                    .map(|l| format!(", {l:.3} ms"))
                    .unwrap_or_default(),
                candidate.arch
            ),
            NasProgress::Study(w) => return w.describe(),
        })
    }
}

/// The evaluated and rejected candidates recorded in a history's trials.
pub fn candidates(history: &History) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for (i, t) in history.trials.iter().enumerate() {
        let info: TrialInfo = serde_json::from_value(t.info.clone()).map_err(|e| {
            NasError::Invalid(format!(
                "trial {i} of the history is not an architecture search's: {e}"
            ))
        })?;
        out.extend(info.rejected);
        out.push(Candidate {
            tokens: t.tokens.clone(),
            arch: info.arch,
            measure: info.measure,
            reward: Some(t.reward),
            status: "evaluated".into(),
            reason: None,
        });
    }
    Ok(out)
}

#[derive(Serialize, Deserialize)]
struct TrialInfo {
    arch: String,
    #[serde(flatten)]
    measure: Measure,
    #[serde(default)]
    rejected: Vec<Candidate>,
}

/// What identifies a search in its history file (and lets `export` rebuild its space).
pub fn search_key(
    space: &dyn SearchSpace,
    limits: &Limits<'_>,
    reward: &dyn Reward,
    cfg: &SaConfig,
) -> serde_json::Value {
    json!({
        "kind": "nas.sa",
        "space": space.name(),
        "space_config": space.key(),
        "limits": limits.key(),
        "reward": reward.key(),
        "init_temperature": cfg.init_temperature,
        "reduce_rate": cfg.reduce_rate,
        "seed": cfg.seed,
        "evolution": cfg.evolution.map(|e| json!({"population": e.population, "mutation": e.mutation})),
    })
}

/// Measures candidates once each, and keeps the rejected ones until the next trial.
struct Judge<'s, 'l> {
    space: &'s dyn SearchSpace,
    limits: &'s Limits<'l>,
    cache: HashMap<Vec<usize>, Measure>,
    /// Rewards of the candidates evaluated so far: one met again is not trained again (the
    /// reward is seeded, so it would come out the same).
    rewards: HashMap<Vec<usize>, f64>,
    rejected: Vec<Candidate>,
    in_a_row: usize,
    max_rejections: usize,
    /// Why the search must stop: a cost that could not be computed, or too many rejections.
    fatal: Option<NasError>,
}

impl Judge<'_, '_> {
    fn measure(&mut self, tokens: &[usize]) -> Result<Measure> {
        if let Some(m) = self.cache.get(tokens) {
            return Ok(m.clone());
        }
        let g = self.space.graph(tokens)?;
        let m = self.limits.measure(&g).map_err(|e| {
            NasError::Invalid(format!(
                "cannot price candidate {tokens:?} ({}): {e}",
                self.space.describe(tokens)
            ))
        })?;
        self.cache.insert(tokens.to_vec(), m.clone());
        Ok(m)
    }

    fn feasible(&mut self, tokens: &[usize]) -> bool {
        if self.fatal.is_some() {
            return false;
        }
        let m = match self.measure(tokens) {
            Ok(m) => m,
            Err(e) => {
                self.fatal = Some(e);
                return false;
            }
        };
        match self.limits.broken(&m) {
            None => {
                self.in_a_row = 0;
                true
            }
            Some(reason) => {
                self.in_a_row += 1;
                if self.in_a_row > self.max_rejections {
                    self.fatal = Some(NasError::Invalid(format!(
                        "{} candidates in a row broke the limits (the last: {}, {reason}); \
                         loosen the limits",
                        self.max_rejections,
                        self.space.describe(tokens)
                    )));
                } else {
                    self.rejected.push(Candidate {
                        tokens: tokens.to_vec(),
                        arch: self.space.describe(tokens),
                        measure: m,
                        reward: None,
                        status: "rejected".into(),
                        reason: Some(reason),
                    });
                }
                false
            }
        }
    }
}

/// A seeded walk from `init` to a candidate that meets the limits: one random token at a time
/// moves to its next cheaper choice. The number of steps, or an error naming the cheapest
/// candidate's measure when even that breaks a limit.
fn shrink_to_fit(
    judge: &mut Judge<'_, '_>,
    init: &[usize],
    seed: u64,
) -> Result<(Vec<usize>, usize)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0f5a);
    let mut t = init.to_vec();
    let mut steps = 0;
    loop {
        if judge.feasible(&t) {
            return Ok((t, steps));
        }
        if let Some(e) = judge.fatal.take() {
            return Err(e);
        }
        let movable: Vec<usize> = (0..t.len()).filter(|&i| t[i] > 0).collect();
        if movable.is_empty() {
            let m = judge.measure(&t)?;
            return Err(NasError::Invalid(format!(
                "no candidate of the search space `{}` meets the limits: even the cheapest \
                 ({}) breaks them: {}",
                judge.space.name(),
                judge.space.describe(&t),
                judge.limits.broken(&m).unwrap_or_default()
            )));
        }
        let i = movable[rng.random_range(0..movable.len())];
        t[i] -= 1;
        steps += 1;
    }
}

/// What every search of a space starts from: the checked settings, the judge of limits, the
/// starting candidate (the hand-made network, shrunk to fit) and the controller.
struct Setup<'s, 'l> {
    judge: RefCell<Judge<'s, 'l>>,
    baseline: Measure,
    baseline_feasible: bool,
    controller: StudyController,
}

fn setup<'s, 'l>(
    space: &'s dyn SearchSpace,
    limits: &'s Limits<'l>,
    cfg: &SaConfig,
    progress: &mut dyn FnMut(NasProgress<'_>),
) -> Result<Setup<'s, 'l>> {
    limits.check()?;
    if cfg.iterations == 0 {
        return Err(NasError::Invalid(
            "a search needs at least one iteration".into(),
        ));
    }
    if cfg.max_rejections == 0 {
        return Err(NasError::Invalid(
            "--max-rejections must be at least 1".into(),
        ));
    }
    let init = space.initial();
    check_tokens(space, &init)?;
    let ranges = space.ranges();
    let judge = RefCell::new(Judge {
        space,
        limits,
        cache: HashMap::new(),
        rewards: HashMap::new(),
        rejected: Vec::new(),
        in_a_row: 0,
        max_rejections: cfg.max_rejections,
        fatal: None,
    });
    let baseline = judge.borrow_mut().measure(&init)?;
    let baseline_feasible = limits.broken(&baseline).is_none();
    let (start, steps) = shrink_to_fit(&mut judge.borrow_mut(), &init, cfg.seed)?;
    if steps > 0 {
        progress(NasProgress::Start {
            arch: space.describe(&start),
            steps,
        });
    }
    let controller = match cfg.evolution {
        None => StudyController::Annealing(Annealing::new(
            ranges,
            start,
            cfg.init_temperature,
            cfg.reduce_rate,
            cfg.seed,
        )?),
        Some(e) => StudyController::Evolution(Evolution::new(
            ranges,
            start,
            e.population,
            e.mutation,
            cfg.seed,
        )?),
    };
    Ok(Setup {
        judge,
        baseline,
        baseline_feasible,
        controller,
    })
}

/// The result of a search from its history.
fn finish(history: History, baseline: Measure, baseline_feasible: bool) -> Result<SaResult> {
    let candidates = candidates(&history)?;
    let best = candidates
        .iter()
        .filter(|c| c.status == "evaluated")
        .fold(None::<&Candidate>, |b, c| match b {
            Some(b) if b.reward >= c.reward => Some(b),
            _ => Some(c),
        })
        .cloned()
        .ok_or_else(|| NasError::Invalid("the search evaluated nothing".into()))?;
    Ok(SaResult {
        best,
        candidates,
        history,
        baseline,
        baseline_feasible,
    })
}

/// Reports an evaluated trial as a candidate (with the rejections before it).
fn show_evaluated(
    progress: &mut dyn FnMut(NasProgress<'_>),
    index: usize,
    total: usize,
    trial: &Trial,
    best: f64,
) {
    let Ok(info) = serde_json::from_value::<TrialInfo>(trial.info.clone()) else {
        return;
    };
    let candidate = Candidate {
        tokens: trial.tokens.clone(),
        arch: info.arch,
        measure: info.measure,
        reward: Some(trial.reward),
        status: "evaluated".into(),
        reason: None,
    };
    progress(NasProgress::Evaluated {
        index,
        total,
        candidate: &candidate,
        best,
        rejected: info.rejected.len(),
    });
}

/// Searches `space` for the candidate with the best reward that meets `limits`, by annealing
/// (or evolution, with `cfg.evolution`).
pub fn sa_search(
    space: &dyn SearchSpace,
    limits: &Limits<'_>,
    reward: &mut dyn Reward,
    cfg: &SaConfig,
    history: Option<&Path>,
    progress: &mut dyn FnMut(NasProgress<'_>),
) -> Result<SaResult> {
    let Setup {
        judge,
        baseline,
        baseline_feasible,
        mut controller,
    } = setup(space, limits, cfg, progress)?;
    let key = search_key(space, limits, reward, cfg);
    let mut feasible = |t: &[usize]| judge.borrow_mut().feasible(t);
    let mut evaluate = |t: &[usize]| -> slim_core::Result<(f64, serde_json::Value)> {
        let graph = space.graph(t).map_err(to_core)?;
        let measure = judge.borrow_mut().measure(t).map_err(to_core)?;
        let known = judge.borrow().rewards.get(t).copied();
        let r = match known {
            Some(r) => r,
            None => reward.reward(t, &graph)?,
        };
        judge.borrow_mut().rewards.insert(t.to_vec(), r);
        if !r.is_finite() {
            return Err(CoreError::Invalid(format!(
                "the reward of candidate {t:?} is {r}"
            )));
        }
        let rejected = std::mem::take(&mut judge.borrow_mut().rejected);
        let info = TrialInfo {
            arch: space.describe(t),
            measure,
            rejected,
        };
        Ok((r, serde_json::to_value(info).unwrap_or_default()))
    };
    let mut core_progress = |p: SearchProgress<'_>| match p {
        SearchProgress::Replayed { index, trial } => {
            // The rejected candidates before this trial are in its record already.
            let mut j = judge.borrow_mut();
            j.rejected.clear();
            j.rewards.insert(trial.tokens.clone(), trial.reward);
            drop(j);
            progress(NasProgress::Replayed { index });
        }
        SearchProgress::Evaluated {
            index,
            total,
            trial,
            best,
        } => show_evaluated(progress, index, total, trial, best),
    };
    let result = run_search(
        &mut controller,
        &mut feasible,
        &mut evaluate,
        cfg.iterations,
        key,
        history,
        &mut core_progress,
    );
    if let Some(e) = judge.borrow_mut().fatal.take() {
        return Err(e);
    }
    finish(result?, baseline, baseline_feasible)
}

/// A search's work for a study: the judge makes candidates, the reward scores them.
struct StudyWork<'j, 's, 'l, 'r> {
    judge: &'j RefCell<Judge<'s, 'l>>,
    reward: &'r mut dyn Reward,
}

impl StudyTask for StudyWork<'_, '_, '_, '_> {
    fn begin(&mut self) {
        // A proposal made again (the study changed meanwhile) starts its record afresh.
        self.judge.borrow_mut().rejected.clear();
    }
    fn feasible(&mut self, tokens: &[usize]) -> bool {
        self.judge.borrow_mut().feasible(tokens)
    }
    fn proposed(&mut self, _tokens: &[usize]) -> slim_core::Result<serde_json::Value> {
        let mut j = self.judge.borrow_mut();
        if let Some(e) = j.fatal.take() {
            return Err(to_core(e));
        }
        let rejected = std::mem::take(&mut j.rejected);
        Ok(json!({ "rejected": rejected }))
    }
    fn evaluate(
        &mut self,
        t: &[usize],
        _proposal: &serde_json::Value,
        known: &[Trial],
    ) -> slim_core::Result<(f64, serde_json::Value)> {
        let space = self.judge.borrow().space;
        let graph = space.graph(t).map_err(to_core)?;
        let measure = self.judge.borrow_mut().measure(t).map_err(to_core)?;
        // A candidate met again keeps the reward it got (the reward is seeded).
        let r = match known.iter().find(|k| k.tokens == t) {
            Some(k) => k.reward,
            None => self.reward.reward(t, &graph)?,
        };
        Ok((
            r,
            json!({ "arch": space.describe(t), "macs": measure.macs,
            "params": measure.params, "latency_ms": measure.latency_ms }),
        ))
    }
}

/// One worker of a search shared through a study (see [`slim_core::study`]): it takes
/// candidates that meet `limits` from the study in `store`, scores them with `reward` and
/// reports, until the study has run `cfg.iterations`; then the study's result, in the same
/// form as [`sa_search`]'s. The first worker creates the study; the others must be started
/// with the same space, limits, reward and settings.
pub fn sa_worker(
    space: &dyn SearchSpace,
    limits: &Limits<'_>,
    reward: &mut dyn Reward,
    cfg: &SaConfig,
    store: &dyn StudyStore,
    opts: WorkerOptions,
    progress: &mut dyn FnMut(NasProgress<'_>),
) -> Result<SaResult> {
    let Setup {
        judge,
        baseline,
        baseline_feasible,
        controller,
    } = setup(space, limits, cfg, progress)?;
    let key = search_key(space, limits, reward, cfg);
    let make = move || Ok(controller.clone());
    let worker = Worker::new(store, key, cfg.iterations, &make, opts)?;
    let mut work = StudyWork {
        judge: &judge,
        reward,
    };
    let result = worker.run(&mut work, &mut |p| match p {
        WorkerProgress::Reported {
            index,
            total,
            trial,
            best,
        } => show_evaluated(progress, index, total, trial, best),
        other => progress(NasProgress::Study(other)),
    });
    if let Some(e) = judge.borrow_mut().fatal.take() {
        return Err(e);
    }
    finish(result?, baseline, baseline_feasible)
}

fn to_core(e: NasError) -> CoreError {
    match e {
        NasError::Core(c) => c,
        other => CoreError::Invalid(other.to_string()),
    }
}

/// Two SVG plots of a search: the reward of each evaluated candidate over the iterations (with
/// the best so far), and reward against latency (or MACs without a latency table), rejected
/// candidates drawn at the bottom, with the limit.
pub fn plots(candidates: &[Candidate], limit: Option<f64>) -> (String, String) {
    let evaluated: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.status == "evaluated")
        .collect();
    let pts: Vec<(f64, f64)> = evaluated
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64, c.reward.unwrap_or(f64::NAN) * 100.0))
        .collect();
    let mut best = f64::NEG_INFINITY;
    let best_line: Vec<(f64, f64)> = pts
        .iter()
        .map(|&(i, r)| {
            best = best.max(r);
            (i, best)
        })
        .collect();
    let over_time = Plot::new("Reward over the search", "iteration", "reward (top-1 %)")
        .series(Series::points("evaluated", pts))
        .series(Series::line("best so far", best_line))
        .to_svg();
    let with_latency = candidates.iter().any(|c| c.measure.latency_ms.is_some());
    let cost = |c: &Candidate| {
        if with_latency {
            c.measure.latency_ms.unwrap_or(f64::NAN)
        } else {
            c.measure.macs as f64 / 1e6
        }
    };
    let floor = evaluated
        .iter()
        .filter_map(|c| c.reward)
        .fold(f64::INFINITY, f64::min)
        * 100.0;
    let rejected: Vec<(f64, f64)> = candidates
        .iter()
        .filter(|c| c.status == "rejected")
        .map(|c| (cost(c), if floor.is_finite() { floor } else { 0.0 }))
        .collect();
    let mut p = Plot::new(
        if with_latency {
            "Reward against latency"
        } else {
            "Reward against MACs"
        },
        if with_latency {
            "estimated latency (ms)"
        } else {
            "MACs (millions)"
        },
        "reward (top-1 %)",
    )
    .series(Series::points(
        "evaluated",
        evaluated
            .iter()
            .map(|c| (cost(c), c.reward.unwrap_or(f64::NAN) * 100.0))
            .collect(),
    ))
    .series(Series::points("rejected (at the bottom)", rejected));
    if let Some(l) = limit {
        p = p.vline(l, "limit");
    }
    (over_time, p.to_svg())
}
