//! A search shared by any number of workers: a **study**.
//!
//! [`run_search`](crate::search::run_search) runs a search in one process: propose, evaluate,
//! report, in turn. A study keeps the same search (the controller, the candidates being
//! evaluated, the history) in a [`StudyStore`], so that workers in other processes, on other
//! machines, each take a candidate, evaluate it and report its reward:
//!
//! - **Taking** a candidate is one atomic change of the study: the controller proposes it from
//!   the current state (only a candidate the search's constraint accepts: limits are enforced
//!   here, where candidates are made, not trusted to the evaluation), and it joins the pending
//!   list with the worker's name and a deadline.
//! - **Evaluating** it can take minutes; meanwhile the worker moves the deadline forward (a
//!   heartbeat). A worker that dies stops beating: once its deadline passes, the next worker
//!   that looks takes the candidate over. Nothing is lost.
//! - **Reporting** is another atomic change: the candidate leaves the pending list, the
//!   controller learns its reward, and the trial is appended to the history. A second report
//!   of the same candidate (from a worker that was thought dead and was not) finds it gone and
//!   is dropped, so every candidate counts once.
//!
//! The store only has to offer an atomic read-modify-write of the state and an append-only
//! history; [`MemoryStore`] is the in-process one (tests, one machine), and `slim-dist` puts a
//! study in Redis. Several workers take candidates from the same state, so an annealing study
//! evaluates a few neighbours of the current candidate at once instead of one after another:
//! the search is not the sequential one, but it is the same kind of search, and its history
//! has the same form ([`crate::search::History`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::search::{Annealing, Controller, Evolution, History, Trial};

/// A controller whose state can be kept in a store.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StudyController {
    Annealing(Annealing),
    Evolution(Evolution),
}

impl Controller for StudyController {
    fn propose(&mut self, feasible: &mut dyn FnMut(&[usize]) -> bool) -> Result<Vec<usize>> {
        match self {
            StudyController::Annealing(c) => c.propose(feasible),
            StudyController::Evolution(c) => c.propose(feasible),
        }
    }
    fn report(&mut self, tokens: &[usize], reward: f64) {
        match self {
            StudyController::Annealing(c) => c.report(tokens, reward),
            StudyController::Evolution(c) => c.report(tokens, reward),
        }
    }
    fn best(&self) -> Option<(&[usize], f64)> {
        match self {
            StudyController::Annealing(c) => c.best(),
            StudyController::Evolution(c) => c.best(),
        }
    }
}

impl StudyController {
    /// The range of each token of the search space.
    pub fn ranges(&self) -> &[usize] {
        match self {
            StudyController::Annealing(c) => c.ranges(),
            StudyController::Evolution(c) => c.ranges(),
        }
    }

    /// Checks a controller read from a store against `fresh`, one this worker made with its
    /// own settings; the message says what is wrong.
    pub fn check_against(&self, fresh: &StudyController) -> std::result::Result<(), String> {
        match (self, fresh) {
            (StudyController::Annealing(a), StudyController::Annealing(f)) => a.check_state(f),
            (StudyController::Evolution(a), StudyController::Evolution(f)) => a.check_state(f),
            _ => Err("its controller is of another kind than this worker's".into()),
        }
    }
}

/// A candidate being evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The candidate's number in the study (0, 1, ... in the order they were made).
    pub id: u64,
    pub tokens: Vec<usize>,
    /// What the search kept when it made the candidate (the candidates it rejected first).
    pub info: serde_json::Value,
    /// The worker evaluating it.
    pub worker: String,
    /// When (the store's clock, ms) the candidate goes to another worker unless its worker
    /// beats first.
    pub deadline_ms: u64,
    /// How many workers have taken it (more than 1: a worker died, or was too slow to beat).
    pub attempts: u32,
}

/// The state of a study, changed atomically as a whole; the history lives beside it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudyState {
    pub format: String,
    /// What the search is (model, data, space, limits, settings): a worker joins a study only
    /// with the same.
    pub search: serde_json::Value,
    /// Trials to run in all.
    pub iterations: usize,
    pub controller: StudyController,
    /// The next candidate's id.
    pub next_id: u64,
    pub pending: Vec<Pending>,
    /// Trials reported (the history's length).
    pub done: usize,
}

/// The format tag of a study's state.
pub const STUDY_FORMAT: &str = "slim-study/1";

/// A change of a study's state, and the trial it appends to the history (if any).
pub struct Change {
    pub state: StudyState,
    pub append: Option<Trial>,
}

/// Where a study lives: an atomic read-modify-write of its state, an append-only history and
/// a clock that every worker reads alike.
pub trait StudyStore: Sync {
    /// The study in words (`study NAME at redis://...`), for messages.
    fn describe(&self) -> String;
    /// Milliseconds on the store's clock (the same for every worker).
    fn now_ms(&self) -> Result<u64>;
    /// Reads the state (`None`: no such study yet), lets `f` decide, and writes what `f`
    /// returns (`None`: nothing) atomically: if another worker changed the state in between,
    /// `f` runs again on the new one.
    fn transact(
        &self,
        f: &mut dyn FnMut(Option<StudyState>) -> Result<Option<Change>>,
    ) -> Result<()>;
    /// The history, in the order trials were reported.
    fn trials(&self) -> Result<Vec<Trial>>;
}

/// A study in this process's memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<(Option<StudyState>, Vec<Trial>)>,
    /// Added to the clock (tests move time forward to expire deadlines).
    skew_ms: std::sync::atomic::AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
    /// Moves this store's clock forward.
    pub fn advance(&self, by: Duration) {
        self.skew_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
    pub fn state(&self) -> Option<StudyState> {
        self.lock().0.clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<StudyState>, Vec<Trial>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StudyStore for MemoryStore {
    fn describe(&self) -> String {
        "study in memory".into()
    }
    fn now_ms(&self) -> Result<u64> {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(t + self.skew_ms.load(Ordering::SeqCst))
    }
    fn transact(
        &self,
        f: &mut dyn FnMut(Option<StudyState>) -> Result<Option<Change>>,
    ) -> Result<()> {
        let mut g = self.lock();
        if let Some(c) = f(g.0.clone())? {
            g.0 = Some(c.state);
            g.1.extend(c.append);
        }
        Ok(())
    }
    fn trials(&self) -> Result<Vec<Trial>> {
        Ok(self.lock().1.clone())
    }
}

/// What a worker's search does besides the controller: the constraint, what to keep with a
/// proposal, and the evaluation.
pub trait StudyTask {
    /// Called before every proposal attempt (an attempt is repeated when another worker
    /// changed the study meanwhile).
    fn begin(&mut self) {}
    /// Whether a candidate meets the search's limits.
    fn feasible(&mut self, tokens: &[usize]) -> bool;
    /// After a proposal: what to keep with it, or the error that ends the search (a cost that
    /// could not be computed, too many rejections).
    fn proposed(&mut self, tokens: &[usize]) -> Result<serde_json::Value>;
    /// The reward of a candidate and what to keep with it. `proposal` is what
    /// [`StudyTask::proposed`] kept; `known` is the history so far (a candidate met again may
    /// keep its reward).
    fn evaluate(
        &mut self,
        tokens: &[usize],
        proposal: &serde_json::Value,
        known: &[Trial],
    ) -> Result<(f64, serde_json::Value)>;
}

/// How a worker behaves.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The worker's name, kept with every trial it reports.
    pub name: String,
    /// A candidate whose worker has not beaten for this long goes to another worker.
    pub lease: Duration,
    /// How often a worker with nothing to take looks again.
    pub poll: Duration,
}

impl WorkerOptions {
    pub fn new(name: impl Into<String>) -> Self {
        WorkerOptions {
            name: name.into(),
            lease: Duration::from_secs(60),
            poll: Duration::from_millis(500),
        }
    }
}

/// What a worker reports as it goes.
#[derive(Clone, Debug)]
pub enum WorkerProgress<'a> {
    /// The worker took a candidate: a new one, or (`from`) one whose worker stopped beating.
    Took {
        id: u64,
        tokens: &'a [usize],
        from: Option<&'a str>,
    },
    /// Its trial was appended to the history as trial `index` (of `total`).
    Reported {
        index: usize,
        total: usize,
        trial: &'a Trial,
        /// The best reward of the study so far.
        best: f64,
    },
    /// Another worker reported the candidate first; this report was dropped.
    Dropped { id: u64 },
    /// Every remaining candidate is with another worker; waiting for them.
    Waiting { pending: usize },
}

impl WorkerProgress<'_> {
    /// The event in words, for a log; `None` for a report (the caller's progress shows it).
    pub fn describe(&self) -> Option<String> {
        Some(match self {
            WorkerProgress::Took {
                id, from: Some(f), ..
            } => {
                format!("candidate #{id}: taken over from {f}, which stopped beating")
            }
            WorkerProgress::Took { id, from: None, .. } => format!("candidate #{id}: taken"),
            WorkerProgress::Dropped { id } => {
                format!("candidate #{id}: another worker reported it first; this report dropped")
            }
            WorkerProgress::Waiting { pending } => format!(
                "waiting for {pending} candidate(s) other workers hold, to see the study finish"
            ),
            WorkerProgress::Reported { .. } => return None,
        })
    }
}

/// What a worker does next.
enum Step {
    Done,
    Wait(usize),
    Evaluate(Pending, Option<String>),
}

/// A worker of one study: takes candidates, evaluates them and reports, until the study has
/// run its iterations.
pub struct Worker<'a> {
    store: &'a dyn StudyStore,
    search: serde_json::Value,
    iterations: usize,
    /// The controller as this worker's settings make it: the study's first state, and what
    /// every state read from the store is checked against.
    fresh: StudyController,
    opts: WorkerOptions,
}

impl<'a> Worker<'a> {
    /// A worker of the study in `store` whose search is `search` (compared with the study's:
    /// a worker of another search is refused). `make_controller` makes the controller (once),
    /// which starts the study when this worker is the first, with `iterations`.
    pub fn new(
        store: &'a dyn StudyStore,
        search: serde_json::Value,
        iterations: usize,
        make_controller: &'a (dyn Fn() -> Result<StudyController> + Sync),
        opts: WorkerOptions,
    ) -> Result<Self> {
        if iterations == 0 {
            return Err(CoreError::Invalid(
                "a study needs at least one iteration".into(),
            ));
        }
        if opts.name.is_empty() {
            return Err(CoreError::Invalid("a worker needs a name".into()));
        }
        if opts.lease < Duration::from_millis(100) {
            return Err(CoreError::Invalid(format!(
                "a lease of {:?} is too short for a heartbeat",
                opts.lease
            )));
        }
        Ok(Worker {
            store,
            search,
            iterations,
            fresh: make_controller()?,
            opts,
        })
    }

    fn check(&self, s: &StudyState) -> Result<()> {
        if s.format != STUDY_FORMAT {
            return Err(CoreError::Invalid(format!(
                "{}: format `{}`, expected `{STUDY_FORMAT}`",
                self.store.describe(),
                s.format
            )));
        }
        if s.search != self.search {
            return Err(CoreError::Invalid(format!(
                "{} belongs to another search (model, data, space, limits or settings differ); \
                 start this worker with the study's settings, or name another study",
                self.store.describe()
            )));
        }
        if s.iterations != self.iterations {
            return Err(CoreError::Invalid(format!(
                "{} runs {} iterations; this worker was started with {}",
                self.store.describe(),
                s.iterations,
                self.iterations
            )));
        }
        let damaged = |what: String| {
            CoreError::Invalid(format!("{} is damaged: {what}", self.store.describe()))
        };
        s.controller.check_against(&self.fresh).map_err(damaged)?;
        let ranges = self.fresh.ranges();
        for p in &s.pending {
            crate::search::check_tokens(ranges, &p.tokens).map_err(|e| {
                damaged(format!(
                    "its pending candidate {} is {:?}: {e}",
                    p.id, p.tokens
                ))
            })?;
        }
        if s.done.saturating_add(s.pending.len()) > s.iterations {
            return Err(damaged(format!(
                "{} trials done and {} pending, more than its {} iterations",
                s.done,
                s.pending.len(),
                s.iterations
            )));
        }
        Ok(())
    }

    fn lease_ms(&self) -> u64 {
        self.opts.lease.as_millis() as u64
    }

    /// Takes the next candidate: one whose worker stopped beating, or a new one.
    fn take(&self, task: &mut dyn StudyTask) -> Result<Step> {
        let now = self.store.now_ms()?;
        let mut step = Step::Done;
        let me = &self.opts.name;
        self.store.transact(&mut |state| {
            task.begin();
            let mut s = match state {
                Some(s) => {
                    self.check(&s)?;
                    s
                }
                None => StudyState {
                    format: STUDY_FORMAT.into(),
                    search: self.search.clone(),
                    iterations: self.iterations,
                    controller: self.fresh.clone(),
                    next_id: 0,
                    pending: Vec::new(),
                    done: 0,
                },
            };
            if s.done >= s.iterations {
                step = Step::Done;
                return Ok(None);
            }
            if let Some(p) = s.pending.iter_mut().find(|p| p.deadline_ms < now) {
                let from = std::mem::replace(&mut p.worker, me.clone());
                p.deadline_ms = now.saturating_add(self.lease_ms());
                p.attempts = p.attempts.saturating_add(1);
                step = Step::Evaluate(p.clone(), Some(from));
                return Ok(Some(Change {
                    state: s,
                    append: None,
                }));
            }
            if s.done + s.pending.len() >= s.iterations {
                step = Step::Wait(s.pending.len());
                return Ok(None);
            }
            let tokens = s.controller.propose(&mut |t| task.feasible(t))?;
            let info = task.proposed(&tokens)?;
            let p = Pending {
                id: s.next_id,
                tokens,
                info,
                worker: me.clone(),
                deadline_ms: now.saturating_add(self.lease_ms()),
                attempts: 1,
            };
            s.next_id = s.next_id.saturating_add(1);
            s.pending.push(p.clone());
            step = Step::Evaluate(p, None);
            Ok(Some(Change {
                state: s,
                append: None,
            }))
        })?;
        Ok(step)
    }

    /// Moves the deadline of candidate `id` forward; false when it is no longer this
    /// worker's (reported, or taken over).
    fn beat(&self, id: u64) -> Result<bool> {
        let now = self.store.now_ms()?;
        let mut mine = false;
        self.store.transact(&mut |state| {
            let Some(mut s) = state else {
                mine = false;
                return Ok(None);
            };
            match s
                .pending
                .iter_mut()
                .find(|p| p.id == id && p.worker == self.opts.name)
            {
                Some(p) => {
                    p.deadline_ms = now.saturating_add(self.lease_ms());
                    mine = true;
                    Ok(Some(Change {
                        state: s,
                        append: None,
                    }))
                }
                None => {
                    mine = false;
                    Ok(None)
                }
            }
        })?;
        Ok(mine)
    }

    /// Reports the reward of candidate `p`: the trial and its index in the history, or `None`
    /// when another worker reported it first.
    fn report(
        &self,
        p: &Pending,
        reward: f64,
        info: serde_json::Value,
    ) -> Result<Option<(usize, Trial, f64)>> {
        let mut out = None;
        self.store.transact(&mut |state| {
            out = None;
            let Some(mut s) = state else {
                return Err(CoreError::Invalid(format!(
                    "{} disappeared while candidate {} was evaluated",
                    self.store.describe(),
                    p.id
                )));
            };
            self.check(&s)?;
            let Some(pos) = s.pending.iter().position(|q| q.id == p.id) else {
                return Ok(None);
            };
            let q = s.pending.remove(pos);
            s.controller.report(&q.tokens, reward);
            s.done += 1;
            let mut info = merge(q.info.clone(), info.clone());
            if let serde_json::Value::Object(m) = &mut info {
                m.insert("candidate".into(), q.id.into());
                m.insert("worker".into(), self.opts.name.clone().into());
                m.insert("attempts".into(), q.attempts.into());
            }
            let trial = Trial {
                tokens: q.tokens,
                reward,
                info,
            };
            let best = s.controller.best().map_or(reward, |(_, b)| b.max(reward));
            out = Some((s.done - 1, trial.clone(), best));
            Ok(Some(Change {
                state: s,
                append: Some(trial),
            }))
        })?;
        Ok(out)
    }

    /// Takes, evaluates and reports candidates until the study has run its iterations (it
    /// waits for candidates other workers hold, and takes them over if those stop beating).
    /// Returns the study's history.
    pub fn run(
        &self,
        task: &mut dyn StudyTask,
        progress: &mut dyn FnMut(WorkerProgress<'_>),
    ) -> Result<History> {
        let mut waiting_since: Option<Instant> = None;
        loop {
            match self.take(task)? {
                Step::Done => break,
                Step::Wait(pending) => {
                    if waiting_since.is_none() {
                        progress(WorkerProgress::Waiting { pending });
                        waiting_since = Some(Instant::now());
                    }
                    std::thread::sleep(self.opts.poll);
                }
                Step::Evaluate(p, from) => {
                    waiting_since = None;
                    progress(WorkerProgress::Took {
                        id: p.id,
                        tokens: &p.tokens,
                        from: from.as_deref(),
                    });
                    let known = self.store.trials()?;
                    let (reward, info) = self.evaluate_beating(task, &p, &known)?;
                    if !reward.is_finite() {
                        return Err(CoreError::Invalid(format!(
                            "the reward of candidate {:?} is {reward}",
                            p.tokens
                        )));
                    }
                    match self.report(&p, reward, info)? {
                        Some((index, trial, best)) => progress(WorkerProgress::Reported {
                            index,
                            total: self.iterations,
                            trial: &trial,
                            best,
                        }),
                        None => progress(WorkerProgress::Dropped { id: p.id }),
                    }
                }
            }
        }
        Ok(History {
            format: crate::search::HISTORY_FORMAT.into(),
            search: self.search.clone(),
            trials: self.store.trials()?,
        })
    }

    /// Evaluates `p` while a second thread beats for it.
    fn evaluate_beating(
        &self,
        task: &mut dyn StudyTask,
        p: &Pending,
        known: &[Trial],
    ) -> Result<(f64, serde_json::Value)> {
        let stop = AtomicBool::new(false);
        let every = self.opts.lease / 4;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut last = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20).min(every));
                    if last.elapsed() >= every {
                        last = Instant::now();
                        // A store that cannot be reached now may be reachable at the next
                        // beat; the report says whether the candidate was still ours.
                        if let Ok(false) = self.beat(p.id) {
                            break;
                        }
                    }
                }
            });
            let r = task.evaluate(&p.tokens, &p.info, known);
            stop.store(true, Ordering::SeqCst);
            r
        })
    }

    /// Takes one candidate and returns without evaluating it, as a worker that dies would
    /// (tests of the hand-over).
    #[doc(hidden)]
    pub fn take_and_abandon(&self, task: &mut dyn StudyTask) -> Result<Option<Vec<usize>>> {
        Ok(match self.take(task)? {
            Step::Evaluate(p, _) => Some(p.tokens),
            _ => None,
        })
    }
}

/// `a`'s fields, then `b`'s (which win).
fn merge(a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    match (a, b) {
        (serde_json::Value::Object(mut a), serde_json::Value::Object(b)) => {
            a.extend(b);
            serde_json::Value::Object(a)
        }
        (serde_json::Value::Null, b) => b,
        (a, serde_json::Value::Null) => a,
        (_, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The reward peaks at `TARGET`; the constraint is a budget on the sum of tokens.
    const TARGET: [usize; 4] = [7, 2, 5, 9];

    fn reward(t: &[usize]) -> f64 {
        -t.iter()
            .zip(TARGET)
            .map(|(&a, b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
    }

    struct Toy {
        evaluated: usize,
        rejected: usize,
    }

    impl StudyTask for Toy {
        fn begin(&mut self) {
            self.rejected = 0;
        }
        fn feasible(&mut self, t: &[usize]) -> bool {
            let ok = t.iter().sum::<usize>() <= 23;
            self.rejected += usize::from(!ok);
            ok
        }
        fn proposed(&mut self, _t: &[usize]) -> Result<serde_json::Value> {
            Ok(serde_json::json!({"rejected": self.rejected}))
        }
        fn evaluate(
            &mut self,
            t: &[usize],
            _p: &serde_json::Value,
            _k: &[Trial],
        ) -> Result<(f64, serde_json::Value)> {
            self.evaluated += 1;
            std::thread::sleep(Duration::from_millis(2));
            Ok((
                reward(t),
                serde_json::json!({"sum": t.iter().sum::<usize>()}),
            ))
        }
    }

    fn annealing() -> Result<StudyController> {
        Ok(StudyController::Annealing(Annealing::new(
            vec![10; 4],
            vec![0; 4],
            1.0,
            0.97,
            3,
        )?))
    }

    fn opts(name: &str) -> WorkerOptions {
        WorkerOptions {
            name: name.into(),
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(5),
        }
    }

    fn key() -> serde_json::Value {
        serde_json::json!({"search": "toy"})
    }

    #[test]
    fn the_generator_is_the_one_behind_std_rng() {
        use rand::{Rng, SeedableRng};
        let mut a = rand::rngs::StdRng::seed_from_u64(42);
        let mut b = rand_chacha::ChaCha12Rng::seed_from_u64(42);
        for _ in 0..100 {
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
    }

    #[test]
    fn a_controller_resumes_from_its_serialized_state() {
        let mut a = annealing().unwrap();
        let mut feasible = |t: &[usize]| t.iter().sum::<usize>() <= 23;
        for _ in 0..17 {
            let t = a.propose(&mut feasible).unwrap();
            a.report(&t, reward(&t));
        }
        let text = serde_json::to_string(&a).unwrap();
        let mut b: StudyController = serde_json::from_str(&text).unwrap();
        for _ in 0..40 {
            let ta = a.propose(&mut feasible).unwrap();
            let tb = b.propose(&mut feasible).unwrap();
            assert_eq!(ta, tb);
            a.report(&ta, reward(&ta));
            b.report(&tb, reward(&tb));
        }
        assert_eq!(a.best(), b.best());
        // The same for evolution.
        let mut e =
            StudyController::Evolution(Evolution::new(vec![10; 4], vec![0; 4], 6, 0.2, 9).unwrap());
        for _ in 0..9 {
            let t = e.propose(&mut feasible).unwrap();
            e.report(&t, reward(&t));
        }
        let mut f: StudyController =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        for _ in 0..20 {
            let te = e.propose(&mut feasible).unwrap();
            assert_eq!(te, f.propose(&mut feasible).unwrap());
            e.report(&te, reward(&te));
            f.report(&te, reward(&te));
        }
    }

    #[test]
    fn three_workers_share_one_annealing_study() {
        let store = MemoryStore::new();
        let make = annealing;
        let n = 150;
        let histories: Vec<(History, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|i| {
                    let store = &store;
                    s.spawn(move || {
                        let w =
                            Worker::new(store, key(), n, &make, opts(&format!("w{i}"))).unwrap();
                        let mut task = Toy {
                            evaluated: 0,
                            rejected: 0,
                        };
                        let h = w.run(&mut task, &mut |_| {}).unwrap();
                        (h, task.evaluated)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Every worker ends with the whole history; every candidate was evaluated once.
        let h = &histories[0].0;
        assert_eq!(h.trials.len(), n);
        assert!(histories.iter().all(|(x, _)| x.trials == h.trials));
        assert_eq!(histories.iter().map(|(_, e)| e).sum::<usize>(), n);
        let ids: BTreeSet<u64> = h
            .trials
            .iter()
            .map(|t| t.info["candidate"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, (0..n as u64).collect::<BTreeSet<_>>());
        let workers: BTreeSet<&str> = h
            .trials
            .iter()
            .map(|t| t.info["worker"].as_str().unwrap())
            .collect();
        assert!(workers.len() >= 2, "the work was shared: {workers:?}");
        for t in &h.trials {
            assert!(t.tokens.iter().sum::<usize>() <= 23, "{t:?}");
            assert_eq!(t.reward, reward(&t.tokens));
            assert!(t.info["rejected"].is_u64() && t.info["sum"].is_u64());
        }
        // The annealing state agrees with the history, and the search came within a step of
        // the optimum (from a start at -159; which neighbours run at once depends on timing).
        let st = store.state().unwrap();
        assert_eq!((st.done, st.pending.len(), st.next_id), (n, 0, n as u64));
        let best = h.best().unwrap();
        assert_eq!(
            st.controller.best().unwrap(),
            (best.tokens.as_slice(), best.reward)
        );
        assert!(best.reward >= -2.0, "{best:?}");
    }

    #[test]
    fn a_dead_workers_candidate_is_taken_over_and_counted_once() {
        let store = MemoryStore::new();
        let make = annealing;
        let mut task = Toy {
            evaluated: 0,
            rejected: 0,
        };
        let dead = Worker::new(&store, key(), 6, &make, opts("dead")).unwrap();
        let lost = dead.take_and_abandon(&mut task).unwrap().unwrap();
        // Before the deadline the candidate stays with its worker: a second worker makes new
        // candidates and then waits for it.
        let live = Worker::new(&store, key(), 6, &make, opts("live")).unwrap();
        let Step::Evaluate(p, None) = live.take(&mut task).unwrap() else {
            panic!("a new candidate")
        };
        assert_eq!(p.id, 1);
        live.report(&p, 0.0, serde_json::json!({}))
            .unwrap()
            .unwrap();
        store.advance(Duration::from_secs(31));
        let Step::Evaluate(q, Some(from)) = live.take(&mut task).unwrap() else {
            panic!("the abandoned candidate")
        };
        assert_eq!(
            (q.id, q.tokens.clone(), from.as_str(), q.attempts),
            (0, lost, "dead", 2)
        );
        // The dead worker comes back and reports first: the taker's report is dropped.
        assert!(dead
            .report(&q, -1.0, serde_json::json!({}))
            .unwrap()
            .is_some());
        assert!(live
            .report(&q, -2.0, serde_json::json!({}))
            .unwrap()
            .is_none());
        assert!(!live.beat(q.id).unwrap());
        let h = live.run(&mut task, &mut |_| {}).unwrap();
        assert_eq!(h.trials.len(), 6);
        let ids: BTreeSet<u64> = h
            .trials
            .iter()
            .map(|t| t.info["candidate"].as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), 6);
        assert_eq!(h.trials[1].reward, -1.0, "the first report counts");
    }

    #[test]
    fn a_worker_of_another_search_is_refused() {
        let store = MemoryStore::new();
        let make = annealing;
        let mut task = Toy {
            evaluated: 0,
            rejected: 0,
        };
        Worker::new(&store, key(), 3, &make, opts("a"))
            .unwrap()
            .run(&mut task, &mut |_| {})
            .unwrap();
        let other = Worker::new(
            &store,
            serde_json::json!({"search": "x"}),
            3,
            &make,
            opts("b"),
        )
        .unwrap();
        let e = other.run(&mut task, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("another search"), "{e}");
        let longer = Worker::new(&store, key(), 4, &make, opts("c")).unwrap();
        let e = longer.run(&mut task, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("runs 3 iterations"), "{e}");
        // A finished study gives its history at once, evaluating nothing.
        let before = task.evaluated;
        let h = Worker::new(&store, key(), 3, &make, opts("d"))
            .unwrap()
            .run(&mut task, &mut |_| {})
            .unwrap();
        assert_eq!((h.trials.len(), task.evaluated), (3, before));
        assert!(Worker::new(&store, key(), 0, &make, opts("e")).is_err());
    }

    #[test]
    fn a_damaged_state_is_named_and_never_run() {
        let store = MemoryStore::new();
        let make = annealing;
        let mut task = Toy {
            evaluated: 0,
            rejected: 0,
        };
        Worker::new(&store, key(), 2, &make, opts("a"))
            .unwrap()
            .run(&mut task, &mut |_| {})
            .unwrap();
        let good = serde_json::to_value(store.state().unwrap()).unwrap();
        let damage: [(&str, fn(&mut serde_json::Value)); 5] = [
            ("candidate [99, 0, 0, 0]", |v| {
                v["controller"]["annealing"]["current"][0] = serde_json::json!([99, 0, 0, 0])
            }),
            ("candidate [1]", |v| {
                v["controller"]["annealing"]["best"][0] = serde_json::json!([1])
            }),
            ("annealing settings differ", |v| {
                v["controller"]["annealing"]["reduce_rate"] = serde_json::json!(0.5)
            }),
            ("pending candidate 7", |v| {
                v["iterations"] = serde_json::json!(2);
                v["done"] = serde_json::json!(1);
                v["pending"] = serde_json::json!([{"id": 7, "tokens": [1, 2], "info": null,
                    "worker": "x", "deadline_ms": 0, "attempts": 4294967295u32}]);
            }),
            ("more than its 2 iterations", |v| {
                v["done"] = serde_json::json!(usize::MAX)
            }),
        ];
        for (needle, f) in damage {
            let mut v = good.clone();
            f(&mut v);
            let state: StudyState = serde_json::from_value(v).unwrap();
            store
                .transact(&mut |_| {
                    Ok(Some(Change {
                        state: state.clone(),
                        append: None,
                    }))
                })
                .unwrap();
            let before = task.evaluated;
            let e = Worker::new(&store, key(), 2, &make, opts("b"))
                .unwrap()
                .run(&mut task, &mut |_| {})
                .unwrap_err()
                .to_string();
            assert!(e.contains("damaged") && e.contains(needle), "{needle}: {e}");
            assert_eq!(task.evaluated, before);
        }
    }
}
