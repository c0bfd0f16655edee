//! The search controllers that automatic pruning and architecture search share, and the
//! traits that let a search score and price a candidate.
//!
//! A candidate is a vector of **tokens**: token `i` is an integer in `0..ranges[i]` (a pruning
//! ratio index for one channel group, a block choice for NAS). A [`Controller`] proposes the
//! next candidate, only ever one that passes the caller's constraint (a FLOPs or latency limit
//! checked before anything is evaluated), and learns the reward of each evaluated candidate.
//!
//! - [`Annealing`]: simulated annealing. The next candidate changes one token of the current
//!   one (or two, half of the time); a better reward is always accepted, a worse one with probability
//!   `exp((reward - current) / T)`, where `T` starts at `init_temperature` and is multiplied by
//!   `reduce_rate` after every evaluation.
//! - [`Evolution`]: a steady-state evolutionary search. The first `population` candidates are
//!   the initial tokens and mutations of them; after that, two parents chosen by tournament
//!   are crossed over token by token and each token mutates with `mutation` probability; the
//!   worst member leaves the population when a better child arrives.
//!
//! Both are seeded and deterministic: the same seed, constraint and rewards give the same
//! candidates. That is what lets [`run_search`] resume a killed search: it replays the history
//! file (proposals must come out identical, or the file belongs to another search) and goes
//! on where the history stops.

use std::path::Path;

use rand::{Rng, SeedableRng};
// The generator behind `StdRng`, named so that a controller's state (its generator's
// position included) can be saved and restored: a distributed study keeps it in a store.
use rand_chacha::ChaCha12Rng as StdRng;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::graph::Graph;
use crate::model::Model;

/// A score of a model: higher is better (accuracy on an evaluation set, say).
pub trait Evaluator: Sync {
    fn score(&self, model: &Model) -> Result<f64>;
}

/// A cost of a graph: latency on a device, multiply-accumulates, bytes.
pub trait CostModel: Sync {
    /// What the cost measures, with its unit (`"MACs"`, `"ms on cpu-x86_64"`).
    fn unit(&self) -> String;
    /// What identifies these costs (a search's history is only resumed with the same): the
    /// unit by default; a table's content for a latency table.
    fn key(&self) -> String {
        self.unit()
    }
    fn cost(&self, graph: &Graph) -> Result<f64>;
}

/// Multiply-accumulates, counted as [`crate::analysis`] counts them.
pub struct MacsCost;

impl CostModel for MacsCost {
    fn unit(&self) -> String {
        "MACs".into()
    }
    fn cost(&self, graph: &Graph) -> Result<f64> {
        Ok(crate::analysis::analyze(graph).macs as f64)
    }
}

/// Proposes candidates and learns their rewards.
pub trait Controller {
    /// The next candidate that `feasible` accepts. An error when none can be found (after
    /// many tries), or when the initial tokens themselves are not feasible.
    fn propose(&mut self, feasible: &mut dyn FnMut(&[usize]) -> bool) -> Result<Vec<usize>>;
    /// The reward of a proposed candidate (higher is better).
    fn report(&mut self, tokens: &[usize], reward: f64);
    /// The best candidate so far and its reward.
    fn best(&self) -> Option<(&[usize], f64)>;
}

/// How many random changes a controller tries before it gives up on finding a feasible one.
const MAX_TRIES: usize = 10_000;

pub(crate) fn check_tokens(ranges: &[usize], tokens: &[usize]) -> Result<()> {
    if ranges.is_empty() {
        return Err(CoreError::Invalid(
            "a search needs at least one token".into(),
        ));
    }
    if let Some(i) = ranges.iter().position(|&r| r == 0) {
        return Err(CoreError::Invalid(format!("token {i} has an empty range")));
    }
    if tokens.len() != ranges.len() {
        return Err(CoreError::Invalid(format!(
            "the initial candidate has {} tokens, the search space {}",
            tokens.len(),
            ranges.len()
        )));
    }
    for (i, (&t, &r)) in tokens.iter().zip(ranges).enumerate() {
        if t >= r {
            return Err(CoreError::Invalid(format!(
                "initial token {i} is {t}, outside its range 0..{r}"
            )));
        }
    }
    Ok(())
}

/// Changes one token of `tokens` to another value of its range (when its range allows): any
/// other value, or with `reach`, one at most a `reach` fraction of the range away (at least
/// one step), for tokens whose values are ordered.
fn mutate_one(rng: &mut StdRng, ranges: &[usize], tokens: &mut [usize], reach: Option<f64>) {
    let movable: Vec<usize> = (0..ranges.len()).filter(|&i| ranges[i] > 1).collect();
    if movable.is_empty() {
        return;
    }
    let i = movable[rng.random_range(0..movable.len())];
    let (lo, hi) = match reach {
        Some(f) => {
            let k = ((ranges[i] as f64 * f).round() as usize).max(1);
            (
                tokens[i].saturating_sub(k),
                (tokens[i] + k).min(ranges[i] - 1),
            )
        }
        None => (0, ranges[i] - 1),
    };
    // A value in lo..=hi other than the current one.
    let mut v = rng.random_range(lo..hi);
    if v >= tokens[i] {
        v += 1;
    }
    tokens[i] = v;
}

/// Checks that every candidate a controller state holds fits `ranges`.
fn check_held<'a>(
    ranges: &[usize],
    held: impl IntoIterator<Item = &'a Vec<usize>>,
) -> std::result::Result<(), String> {
    for t in held {
        check_tokens(ranges, t).map_err(|e| format!("it holds the candidate {t:?}: {e}"))?;
    }
    Ok(())
}

/// Simulated annealing over token vectors. Its whole state serializes (the generator's
/// position included), so that a study kept in a store can move it between processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Annealing {
    ranges: Vec<usize>,
    init: Vec<usize>,
    current: Option<(Vec<usize>, f64)>,
    best: Option<(Vec<usize>, f64)>,
    init_temperature: f64,
    reduce_rate: f64,
    evaluated: usize,
    reach: Option<f64>,
    rng: StdRng,
}

impl Annealing {
    /// A search over `ranges` that starts from `init`. `init_temperature` is on the scale of
    /// the rewards (0.02 for accuracies in 0..1 accepts a loss of two points with probability
    /// 1/e at first); `reduce_rate` in (0, 1] cools it after every evaluation.
    pub fn new(
        ranges: Vec<usize>,
        init: Vec<usize>,
        init_temperature: f64,
        reduce_rate: f64,
        seed: u64,
    ) -> Result<Self> {
        check_tokens(&ranges, &init)?;
        if !(init_temperature > 0.0 && init_temperature.is_finite()) {
            return Err(CoreError::Invalid(format!(
                "the initial temperature must be positive, not {init_temperature}"
            )));
        }
        if !(reduce_rate > 0.0 && reduce_rate <= 1.0) {
            return Err(CoreError::Invalid(format!(
                "the reduce rate must be in (0, 1], not {reduce_rate}"
            )));
        }
        Ok(Annealing {
            ranges,
            init,
            current: None,
            best: None,
            init_temperature,
            reduce_rate,
            evaluated: 0,
            reach: None,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// Ordered tokens: a change moves a token by at most `fraction` of its range (at least
    /// one step) instead of to any value.
    pub fn with_reach(mut self, fraction: f64) -> Self {
        self.reach = Some(fraction);
        self
    }

    /// The temperature after `n` evaluations.
    pub fn temperature(&self) -> f64 {
        self.init_temperature * self.reduce_rate.powi(self.evaluated as i32)
    }
}

impl Annealing {
    pub(crate) fn ranges(&self) -> &[usize] {
        &self.ranges
    }

    /// Checks a state read from outside (a study's store) against one made here with the
    /// same settings: the same space and settings, and candidates that fit the space.
    pub(crate) fn check_state(&self, fresh: &Annealing) -> std::result::Result<(), String> {
        if self.ranges != fresh.ranges || self.init != fresh.init {
            return Err("its search space or first candidate differs from this worker's".into());
        }
        if self.init_temperature != fresh.init_temperature
            || self.reduce_rate != fresh.reduce_rate
            || self.reach != fresh.reach
        {
            return Err("its annealing settings differ from this worker's".into());
        }
        check_held(
            &self.ranges,
            self.current.iter().chain(&self.best).map(|(t, _)| t),
        )
    }
}

impl Controller for Annealing {
    fn propose(&mut self, feasible: &mut dyn FnMut(&[usize]) -> bool) -> Result<Vec<usize>> {
        let Some((current, _)) = &self.current else {
            if !feasible(&self.init) {
                return Err(CoreError::Invalid(
                    "the initial candidate does not satisfy the constraint".into(),
                ));
            }
            return Ok(self.init.clone());
        };
        let current = current.clone();
        for _ in 0..MAX_TRIES {
            let mut next = current.clone();
            mutate_one(&mut self.rng, &self.ranges, &mut next, self.reach);
            if self.rng.random::<bool>() {
                // Two changes at once can move budget from one token to another along a
                // constraint's boundary, where any single change is infeasible or worse.
                mutate_one(&mut self.rng, &self.ranges, &mut next, self.reach);
            }
            // Two changes can undo each other; the current candidate is known already.
            if next != current && feasible(&next) {
                return Ok(next);
            }
        }
        Err(CoreError::Invalid(format!(
            "no change of the current candidate satisfies the constraint after {MAX_TRIES} tries"
        )))
    }

    fn report(&mut self, tokens: &[usize], reward: f64) {
        let t = self.temperature();
        let accept = match &self.current {
            None => true,
            Some((_, cur)) => {
                reward >= *cur || self.rng.random::<f64>() < ((reward - cur) / t).exp()
            }
        };
        if accept {
            self.current = Some((tokens.to_vec(), reward));
        }
        if self.best.as_ref().is_none_or(|(_, b)| reward > *b) {
            self.best = Some((tokens.to_vec(), reward));
        }
        self.evaluated += 1;
    }

    fn best(&self) -> Option<(&[usize], f64)> {
        self.best.as_ref().map(|(t, r)| (t.as_slice(), *r))
    }
}

/// A steady-state evolutionary search over token vectors; serializes like [`Annealing`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Evolution {
    ranges: Vec<usize>,
    init: Vec<usize>,
    population_size: usize,
    mutation: f64,
    population: Vec<(Vec<usize>, f64)>,
    proposed: usize,
    rng: StdRng,
}

impl Evolution {
    /// A population of `population` candidates (at least 2) seeded from `init`; each token of
    /// a child mutates with probability `mutation` in [0, 1].
    pub fn new(
        ranges: Vec<usize>,
        init: Vec<usize>,
        population: usize,
        mutation: f64,
        seed: u64,
    ) -> Result<Self> {
        check_tokens(&ranges, &init)?;
        if population < 2 {
            return Err(CoreError::Invalid(format!(
                "an evolutionary search needs a population of at least 2, not {population}"
            )));
        }
        if !(0.0..=1.0).contains(&mutation) {
            return Err(CoreError::Invalid(format!(
                "the mutation probability must be in [0, 1], not {mutation}"
            )));
        }
        Ok(Evolution {
            ranges,
            init,
            population_size: population,
            mutation,
            population: Vec::new(),
            proposed: 0,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    fn tournament(&mut self) -> Vec<usize> {
        let n = self.population.len();
        let a = self.rng.random_range(0..n);
        let b = self.rng.random_range(0..n);
        let pick = if self.population[a].1 >= self.population[b].1 {
            a
        } else {
            b
        };
        self.population[pick].0.clone()
    }
}

impl Evolution {
    pub(crate) fn ranges(&self) -> &[usize] {
        &self.ranges
    }

    /// Checks a state read from outside, as [`Annealing`]'s `check_state` does.
    pub(crate) fn check_state(&self, fresh: &Evolution) -> std::result::Result<(), String> {
        if self.ranges != fresh.ranges || self.init != fresh.init {
            return Err("its search space or first candidate differs from this worker's".into());
        }
        if self.population_size != fresh.population_size || self.mutation != fresh.mutation {
            return Err("its evolution settings differ from this worker's".into());
        }
        if self.population.len() > self.population_size {
            return Err(format!(
                "its population holds {} candidates, more than its size {}",
                self.population.len(),
                self.population_size
            ));
        }
        check_held(&self.ranges, self.population.iter().map(|(t, _)| t))
    }
}

impl Controller for Evolution {
    fn propose(&mut self, feasible: &mut dyn FnMut(&[usize]) -> bool) -> Result<Vec<usize>> {
        if self.proposed == 0 {
            if !feasible(&self.init) {
                return Err(CoreError::Invalid(
                    "the initial candidate does not satisfy the constraint".into(),
                ));
            }
            self.proposed += 1;
            return Ok(self.init.clone());
        }
        for _ in 0..MAX_TRIES {
            let child = if self.population.len() < self.population_size {
                // Filling the first population: mutations of the initial candidate.
                let mut c = self.init.clone();
                let changes = 1 + self.rng.random_range(0..self.ranges.len());
                for _ in 0..changes {
                    mutate_one(&mut self.rng, &self.ranges, &mut c, None);
                }
                c
            } else {
                let (a, b) = (self.tournament(), self.tournament());
                let mut c: Vec<usize> = a
                    .iter()
                    .zip(&b)
                    .map(|(&x, &y)| if self.rng.random::<bool>() { x } else { y })
                    .collect();
                for (t, &range) in c.iter_mut().zip(&self.ranges) {
                    if range > 1 && self.rng.random::<f64>() < self.mutation {
                        *t = self.rng.random_range(0..range);
                    }
                }
                c
            };
            if feasible(&child) {
                self.proposed += 1;
                return Ok(child);
            }
        }
        Err(CoreError::Invalid(format!(
            "no feasible child found after {MAX_TRIES} tries"
        )))
    }

    fn report(&mut self, tokens: &[usize], reward: f64) {
        self.population.push((tokens.to_vec(), reward));
        if self.population.len() > self.population_size {
            // Drop the worst (the oldest among equals).
            let worst = (0..self.population.len())
                .min_by(|&a, &b| {
                    self.population[a]
                        .1
                        .partial_cmp(&self.population[b].1)
                        .unwrap_or(std::cmp::Ordering::Equal)
                })
                .unwrap_or(0);
            self.population.remove(worst);
        }
    }

    fn best(&self) -> Option<(&[usize], f64)> {
        self.population
            .iter()
            .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(t, r)| (t.as_slice(), *r))
    }
}

/// One evaluated candidate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    pub tokens: Vec<usize>,
    pub reward: f64,
    /// Anything the caller wants to keep beside the reward (its cost, say).
    #[serde(default)]
    pub info: serde_json::Value,
}

/// A search's history file: what the search is (a fingerprint the caller chooses, compared on
/// resume) and every trial so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct History {
    pub format: String,
    pub search: serde_json::Value,
    pub trials: Vec<Trial>,
}

pub(crate) const HISTORY_FORMAT: &str = "slim-search-history/1";

impl History {
    pub fn new(search: serde_json::Value) -> Self {
        History {
            format: HISTORY_FORMAT.into(),
            search,
            trials: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<History> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let h: History = serde_json::from_str(&text)
            .map_err(|e| CoreError::file(path, format!("not a search history: {e}")))?;
        if h.format != HISTORY_FORMAT {
            return Err(CoreError::file(
                path,
                format!("format `{}`, expected `{HISTORY_FORMAT}`", h.format),
            ));
        }
        Ok(h)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| CoreError::Invalid(format!("cannot serialize the history: {e}")))?;
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// The trial with the highest reward (the first among equals).
    pub fn best(&self) -> Option<&Trial> {
        self.trials
            .iter()
            .fold(None, |best: Option<&Trial>, t| match best {
                Some(b) if b.reward >= t.reward => Some(b),
                _ => Some(t),
            })
    }
}

/// What a search reports as it goes.
#[derive(Clone, Debug)]
pub enum SearchProgress<'a> {
    /// A trial replayed from the history file.
    Replayed { index: usize, trial: &'a Trial },
    /// A new trial was evaluated.
    Evaluated {
        index: usize,
        total: usize,
        trial: &'a Trial,
        best: f64,
    },
}

/// Evaluates a candidate: its reward and what to keep beside it in the history.
pub type EvaluateFn<'a> = dyn FnMut(&[usize]) -> Result<(f64, serde_json::Value)> + 'a;

/// Runs `trials` evaluations in all (counting those already in the history file at
/// `history_path`, which is written after every trial). `evaluate` returns the reward of a
/// candidate and what to keep beside it.
pub fn run_search(
    controller: &mut dyn Controller,
    feasible: &mut dyn FnMut(&[usize]) -> bool,
    evaluate: &mut EvaluateFn<'_>,
    trials: usize,
    search: serde_json::Value,
    history_path: Option<&Path>,
    progress: &mut dyn FnMut(SearchProgress<'_>),
) -> Result<History> {
    let mut history = match history_path.filter(|p| p.exists()) {
        Some(p) => {
            let h = History::load(p)?;
            if h.search != search {
                return Err(CoreError::file(
                    p,
                    "this history belongs to another search (model, data or settings differ); \
                     remove it or name another file",
                ));
            }
            h
        }
        None => History::new(search),
    };
    for (index, trial) in history.trials.iter().enumerate() {
        let tokens = controller.propose(feasible)?;
        if tokens != trial.tokens {
            return Err(CoreError::Invalid(format!(
                "the history's trial {index} does not replay (candidate {:?}, history {:?}); \
                 it was written by another search",
                tokens, trial.tokens
            )));
        }
        controller.report(&tokens, trial.reward);
        progress(SearchProgress::Replayed { index, trial });
    }
    while history.trials.len() < trials {
        let tokens = controller.propose(feasible)?;
        let (reward, info) = evaluate(&tokens)?;
        controller.report(&tokens, reward);
        history.trials.push(Trial {
            tokens,
            reward,
            info,
        });
        if let Some(p) = history_path {
            history.save(p)?;
        }
        let index = history.trials.len() - 1;
        let best = history.best().map(|t| t.reward).unwrap_or(reward);
        progress(SearchProgress::Evaluated {
            index,
            total: trials,
            trial: &history.trials[index],
            best,
        });
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reward with one best point: tokens equal to `target`.
    fn reward(tokens: &[usize], target: &[usize]) -> f64 {
        -tokens
            .iter()
            .zip(target)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
    }

    fn drive(c: &mut dyn Controller, n: usize, feasible: &mut dyn FnMut(&[usize]) -> bool) {
        let target = [7, 2, 5, 9];
        for _ in 0..n {
            let t = c.propose(feasible).unwrap();
            assert!(feasible(&t), "proposed an infeasible candidate {t:?}");
            c.report(&t, reward(&t, &target));
        }
    }

    #[test]
    fn annealing_finds_the_optimum_and_respects_the_constraint() {
        let mut sa = Annealing::new(vec![10; 4], vec![0; 4], 1.0, 0.95, 3).unwrap();
        // Constraint: the sum of tokens at most 23 (the optimum, 23, is on the boundary).
        let mut feasible = |t: &[usize]| t.iter().sum::<usize>() <= 23;
        drive(&mut sa, 400, &mut feasible);
        let (best, r) = sa.best().unwrap();
        assert_eq!(best, &[7, 2, 5, 9], "reward {r}");
    }

    #[test]
    fn evolution_finds_the_optimum_and_respects_the_constraint() {
        let mut ev = Evolution::new(vec![10; 4], vec![0; 4], 12, 0.2, 5).unwrap();
        let mut feasible = |t: &[usize]| t.iter().sum::<usize>() <= 23;
        drive(&mut ev, 600, &mut feasible);
        assert_eq!(ev.best().unwrap().0, &[7, 2, 5, 9]);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Annealing::new(vec![3, 3], vec![0, 3], 1.0, 0.9, 0).is_err());
        assert!(Annealing::new(vec![3, 3], vec![0], 1.0, 0.9, 0).is_err());
        assert!(Annealing::new(vec![3, 3], vec![0, 0], 0.0, 0.9, 0).is_err());
        assert!(Annealing::new(vec![3, 3], vec![0, 0], 1.0, 1.5, 0).is_err());
        assert!(Evolution::new(vec![3, 3], vec![0, 0], 1, 0.1, 0).is_err());
        let mut sa = Annealing::new(vec![3, 3], vec![2, 2], 1.0, 0.9, 0).unwrap();
        let e = sa.propose(&mut |t| t[0] < 2).unwrap_err();
        assert!(e.to_string().contains("initial candidate"), "{e}");
    }

    #[test]
    fn a_search_resumes_from_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.json");
        let target = [3, 1, 4];
        let calls = std::cell::Cell::new(0);
        let mut eval = |t: &[usize]| {
            calls.set(calls.get() + 1);
            Ok((
                reward(t, &target),
                serde_json::json!({"sum": t.iter().sum::<usize>()}),
            ))
        };
        let new_sa = || Annealing::new(vec![6; 3], vec![0; 3], 0.5, 0.9, 11).unwrap();
        let key = serde_json::json!({"space": "test"});
        let mut feasible = |_: &[usize]| true;
        // An unbroken run of 30 trials, and one that stops at 12 and resumes to 30.
        let full = run_search(
            &mut new_sa(),
            &mut feasible,
            &mut eval,
            30,
            key.clone(),
            None,
            &mut |_| {},
        )
        .unwrap();
        run_search(
            &mut new_sa(),
            &mut feasible,
            &mut eval,
            12,
            key.clone(),
            Some(&path),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(History::load(&path).unwrap().trials.len(), 12);
        let before = calls.get();
        let resumed = run_search(
            &mut new_sa(),
            &mut feasible,
            &mut eval,
            30,
            key.clone(),
            Some(&path),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            calls.get() - before,
            18,
            "only the missing trials are evaluated"
        );
        assert_eq!(resumed.trials, full.trials);
        // Another search's settings are refused.
        let e = run_search(
            &mut new_sa(),
            &mut feasible,
            &mut eval,
            30,
            serde_json::json!({"space": "other"}),
            Some(&path),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("another search"), "{e}");
    }
}
