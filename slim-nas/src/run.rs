//! One entrance to architecture search: [`run`] checks the options, builds the space for the
//! data, searches it under the limits (each candidate trained briefly, or scored with the
//! weights it inherits from a one-shot supernet) and writes the history, the plots and a
//! results table into the output folder. It is the call behind `slim nas sa|oneshot|worker`
//! and the pipeline's `nas.*` stages; the pipeline then trains the best candidate from scratch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::json;
use slim_core::data::{DataSplits, Dataset};
use slim_core::search::CostModel;
use slim_core::study::{StudyStore, WorkerOptions};
use slim_core::train::{CheckpointEvery, TrainConfig};
use slim_core::zoo::ZooConfig;
use slim_core::Model;

use crate::oneshot::{train_supernet, OneShotReward, SupernetProgress};
use crate::sa::{plots, sa_search, sa_worker, Evolve, Limits, NasProgress, Reward, SaConfig};
use crate::sa::{Candidate, SaResult, TrainReward};
use crate::space::{SearchSpace, Spaces};
use crate::{NasError, Result};

/// How candidates are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Each candidate trains briefly on its own (`nas.sa`).
    Train,
    /// A weight-sharing supernet trains once; candidates are scored with the weights they
    /// inherit from it (`nas.oneshot`).
    OneShot,
}

impl Method {
    /// `nas.sa` or `nas.oneshot`: the pipeline stage's kind.
    pub fn kind(self) -> &'static str {
        match self {
            Method::Train => "nas.sa",
            Method::OneShot => "nas.oneshot",
        }
    }
}

/// The options of a search: a pipeline stage's table, and `slim nas`'s flags of the same
/// names. The defaults are here and nowhere else.
#[derive(Clone, Debug, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct NasOptions {
    /// The search space: mobilenet_v2 (expansion, kernel, channels, repeats per stage),
    /// mobilenet_v1 (widths), resnet (depth and width per stage).
    #[cfg_attr(feature = "clap", arg(long))]
    pub space: String,
    /// Width multiplier of the space's hand-made network (the starting candidate).
    #[serde(default = "one")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = one()))]
    pub width: f64,
    /// The most multiply-accumulates a candidate may have.
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_macs: Option<u64>,
    /// At most this fraction of the MACs of the model entering the stage (a pipeline's).
    #[cfg_attr(feature = "clap", arg(skip))]
    pub max_macs_ratio: Option<f64>,
    /// The most parameters a candidate may have.
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_params: Option<u64>,
    /// A latency table (f32, from `slim latency build`) to price candidates with.
    // The caller loads it into the cost model (`Inputs::cost`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub latency_table: Option<PathBuf>,
    /// The most milliseconds a candidate may take, estimated from the latency table.
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_latency_ms: Option<f64>,
    /// Price ops the table lacks with its fallback fit instead of failing.
    #[serde(default)]
    #[cfg_attr(feature = "clap", arg(long))]
    pub fallback: bool,
    /// Candidates evaluated (scored).
    #[serde(default = "twenty")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = twenty()))]
    pub iterations: usize,
    /// Candidates (or the supernet) train on the first N training images (default: 2000 for
    /// candidates, all but the scoring images for a supernet).
    #[cfg_attr(feature = "clap", arg(skip))]
    pub train_images: Option<usize>,
    /// Candidates are scored (top-1) on the last N training images, kept apart from the test
    /// split and from what they train on.
    #[serde(default = "one_thousand")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = one_thousand()))]
    pub eval_images: usize,
    /// Epochs of each candidate's short training.
    #[serde(default = "one_usize")]
    #[cfg_attr(feature = "clap", arg(skip = one_usize()))]
    pub candidate_epochs: usize,
    /// Epochs of supernet training (default: the recipe's).
    #[cfg_attr(feature = "clap", arg(skip))]
    pub supernet_epochs: Option<usize>,
    /// Epochs of the best candidate's final training in a pipeline (default: the recipe's).
    #[cfg_attr(feature = "clap", arg(skip))]
    pub epochs: Option<usize>,
    /// Training images each one-shot candidate's batch-norm statistics are recomputed on.
    #[serde(default = "calibration")]
    #[cfg_attr(feature = "clap", arg(skip = calibration()))]
    pub calibration_images: usize,
    /// Initial temperature, on the reward's scale (top-1 in 0..1).
    #[serde(default = "temperature")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = temperature()))]
    pub init_temperature: f64,
    /// The temperature is multiplied by this after every evaluation.
    #[serde(default = "reduce")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = reduce()))]
    pub reduce_rate: f64,
    /// The search: annealing, or evolution (steady-state, tournament selection).
    #[serde(default = "annealing")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = annealing(),
        value_parser = ["annealing", "evolution"]))]
    pub search: String,
    /// --search evolution: candidates kept.
    #[serde(default = "population")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = population()))]
    pub population: usize,
    /// --search evolution: the probability that each token of a child changes.
    #[serde(default = "mutation")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = mutation()))]
    pub mutation: f64,
    /// Give up after this many candidates in a row broke a limit.
    #[serde(default = "rejections")]
    #[cfg_attr(feature = "clap", arg(long, default_value_t = rejections()))]
    pub max_rejections: usize,
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
fn one_thousand() -> usize {
    1000
}
fn calibration() -> usize {
    512
}
fn temperature() -> f64 {
    0.02
}
fn reduce() -> f64 {
    0.85
}
fn annealing() -> String {
    "annealing".into()
}
fn population() -> usize {
    8
}
fn mutation() -> f64 {
    0.15
}
fn rejections() -> usize {
    1000
}

/// Candidates of a trained search train on this many images unless told otherwise.
const CANDIDATE_IMAGES: usize = 2000;

impl NasOptions {
    /// The options for `space` with every default.
    pub fn new(space: impl Into<String>) -> Self {
        NasOptions {
            space: space.into(),
            width: one(),
            max_macs: None,
            max_macs_ratio: None,
            max_params: None,
            latency_table: None,
            max_latency_ms: None,
            fallback: false,
            iterations: twenty(),
            train_images: None,
            eval_images: one_thousand(),
            candidate_epochs: one_usize(),
            supernet_epochs: None,
            epochs: None,
            calibration_images: calibration(),
            init_temperature: temperature(),
            reduce_rate: reduce(),
            search: annealing(),
            population: population(),
            mutation: mutation(),
            max_rejections: rejections(),
        }
    }

    /// Checks the options before any work; `priced` says whether a cost model for
    /// `max_latency_ms` comes with them. Messages name the stage's kind.
    pub fn validate(&self, method: Method, priced: bool) -> Result<()> {
        let bad = |m: String| Err(NasError::Invalid(format!("{}: {m}", method.kind())));
        let spaces = Spaces::builtin();
        if !spaces.names().contains(&self.space) {
            return bad(format!(
                "unknown search space `{}` (known: {})",
                self.space,
                spaces.names().join(", ")
            ));
        }
        if !(self.width > 0.0 && self.width <= 8.0) {
            return bad(format!("`width` {} is out of range (0, 8]", self.width));
        }
        if let Some(r) = self.max_macs_ratio.filter(|r| !(*r > 0.0 && *r <= 1.0)) {
            return bad(format!("`max_macs_ratio` {r} must be in (0, 1]"));
        }
        if self.max_latency_ms.is_some() != priced {
            return bad("`max_latency_ms` and `latency_table` go together".into());
        }
        let counts = [
            ("iterations", self.iterations),
            ("eval_images", self.eval_images),
            ("candidate_epochs", self.candidate_epochs),
            ("calibration_images", self.calibration_images),
            ("max_rejections", self.max_rejections),
            ("train_images", self.train_images.unwrap_or(1)),
            ("supernet_epochs", self.supernet_epochs.unwrap_or(1)),
            ("epochs", self.epochs.unwrap_or(1)),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return bad(format!("`{name}` must be at least 1"));
        }
        match self.search.as_str() {
            "annealing" => {}
            "evolution" if self.population < 2 => {
                return bad(format!(
                    "`population` {} must be at least 2",
                    self.population
                ))
            }
            "evolution" if !(self.mutation > 0.0 && self.mutation <= 1.0) => {
                return bad(format!("`mutation` {} must be in (0, 1]", self.mutation))
            }
            "evolution" => {}
            other => return bad(format!("`search` {other:?}: annealing or evolution")),
        }
        Ok(())
    }

    fn sa_config(&self, seed: u64) -> SaConfig {
        SaConfig {
            iterations: self.iterations,
            init_temperature: self.init_temperature,
            reduce_rate: self.reduce_rate,
            seed,
            max_rejections: self.max_rejections,
            evolution: (self.search == "evolution").then_some(Evolve {
                population: self.population,
                mutation: self.mutation,
            }),
        }
    }
}

/// What a search works with besides its options.
pub struct Inputs<'a> {
    /// The data: candidates train on the first training images and are scored on the last.
    pub data: &'a DataSplits,
    /// A model to reproduce: candidates learn its outputs and are scored by their agreement
    /// with it (for data without labels, where it is needed).
    pub teacher: Option<&'a Model>,
    /// Prices candidates for `max_latency_ms`.
    pub cost: Option<&'a dyn CostModel>,
    /// The recipe of the candidates' and the supernet's training (its epochs are replaced by
    /// `candidate_epochs` and `supernet_epochs`); its seed seeds the search.
    pub train: &'a TrainConfig,
    pub device: &'a Device,
    /// The folder of the history (resumed from), the supernet, the plots and results.md.
    pub out: &'a Path,
    /// The MACs of the model the search replaces, for `max_macs_ratio`.
    pub entering_macs: Option<u64>,
    /// How often the supernet is written besides every epoch.
    pub checkpoint: CheckpointEvery,
    /// A shared study this process works for as one worker (trained candidates only).
    pub study: Option<(&'a dyn StudyStore, WorkerOptions)>,
}

impl<'a> Inputs<'a> {
    /// A search on labeled `data`, trained with `train` on `device`, writing into `out`: no
    /// latency limit, no model it replaces, no shared study.
    pub fn new(
        data: &'a DataSplits,
        train: &'a TrainConfig,
        device: &'a Device,
        out: &'a Path,
    ) -> Self {
        Inputs {
            data,
            teacher: None,
            cost: None,
            train,
            device,
            out,
            entering_macs: None,
            checkpoint: CheckpointEvery::default(),
            study: None,
        }
    }
}

/// What a search reports as it goes.
pub enum Progress<'a> {
    Supernet(&'a SupernetProgress),
    Search(NasProgress<'a>),
}

/// What a search found: its space (to build any candidate) and every candidate.
pub struct Outcome {
    pub space: Box<dyn SearchSpace>,
    pub result: SaResult,
}

impl Outcome {
    /// Evaluated candidates, best first, each architecture once.
    pub fn ranked(&self) -> Vec<&Candidate> {
        ranked(&self.result.candidates)
    }
}

/// A search's summary.
#[derive(Clone, Debug, Serialize)]
pub struct NasReport {
    /// `nas.sa` or `nas.oneshot`.
    pub kind: &'static str,
    pub space: String,
    /// `top-1`, or `agreement` with the model reproduced.
    pub metric: &'static str,
    /// The best candidate, and its reward in the search.
    pub arch: String,
    pub tokens: Vec<usize>,
    pub reward: f64,
    pub macs_limit: Option<u64>,
    pub latency_ms: Option<f64>,
    pub evaluated: usize,
    pub rejected: usize,
    pub seconds: f64,
    /// The reward-against-cost plot written beside `reward.svg`.
    pub cost_plot: &'static str,
    /// The results table, also written to results.md.
    #[serde(skip)]
    pub markdown: String,
}

/// The history file of a search's output folder.
pub fn history_path(dir: &Path) -> PathBuf {
    dir.join("history.json")
}

/// Searches by `method` with options `o`: the space and its candidates, and a summary.
pub fn run(
    method: Method,
    o: &NasOptions,
    mut inputs: Inputs<'_>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Outcome, NasReport)> {
    let started = Instant::now();
    o.validate(method, inputs.cost.is_some())?;
    let plan = plan(method, o, &inputs)?;
    let limits = Limits {
        max_macs: plan.max_macs,
        max_params: o.max_params,
        latency: inputs.cost.zip(o.max_latency_ms),
    };
    std::fs::create_dir_all(inputs.out).map_err(|source| slim_core::CoreError::Io {
        path: inputs.out.to_path_buf(),
        source,
    })?;
    let space = plan.space.as_ref();
    let supernet;
    let mut train_reward;
    let mut oneshot_reward;
    let reward: &mut dyn Reward = match method {
        Method::Train => {
            let mut cfg = inputs.train.clone();
            cfg.epochs = o.candidate_epochs;
            train_reward = TrainReward {
                data: plan.data.clone(),
                cfg,
                device: inputs.device.clone(),
                teacher: inputs.teacher.cloned(),
            };
            &mut train_reward
        }
        Method::OneShot => {
            let mut cfg = inputs.train.clone();
            cfg.epochs = o.supernet_epochs.unwrap_or(cfg.epochs);
            supernet = train_supernet(
                space,
                &plan.data,
                &cfg,
                inputs.teacher,
                Some(&inputs.out.join("supernet.safetensors")),
                inputs.checkpoint,
                inputs.device,
                &mut |p| progress(Progress::Supernet(p)),
            )?;
            let sub = &plan.data;
            oneshot_reward = OneShotReward {
                supernet: &supernet,
                space,
                calibration: sub.train.take(o.calibration_images.min(sub.train.len())),
                eval: sub.test.clone(),
                normalize: sub.normalize.clone(),
                supernet_key: json!({
                    "data": sub.train.fingerprint(),
                    "recipe": format!("{cfg:?}"),
                }),
                teacher: inputs.teacher,
            };
            &mut oneshot_reward
        }
    };
    let sa = o.sa_config(inputs.train.seed);
    let history = history_path(inputs.out);
    let mut show = |p: NasProgress<'_>| progress(Progress::Search(p));
    let result = match inputs.study.take() {
        None => sa_search(space, &limits, reward, &sa, Some(&history), &mut show)?,
        Some((store, opts)) if method == Method::Train => {
            let r = sa_worker(space, &limits, reward, &sa, store, opts, &mut show)?;
            // The study's history, as a search on one machine writes it.
            r.history.save(&history)?;
            r
        }
        Some(_) => {
            return Err(NasError::Invalid(format!(
                "{}: a shared study scores candidates by training them",
                method.kind()
            )))
        }
    };
    let metric = if inputs.teacher.is_some() {
        "agreement"
    } else {
        "top-1"
    };
    let seconds = started.elapsed().as_secs_f64();
    let report = write_results(method, o, &plan, &inputs, &result, metric, seconds)?;
    let outcome = Outcome {
        space: plan.space,
        result,
    };
    Ok((outcome, report))
}

/// What a search works on, checked: its space, its data (the training images candidates
/// learn from, the scoring images as the test split) and its MACs limit.
struct Plan {
    space: Box<dyn SearchSpace>,
    data: DataSplits,
    max_macs: Option<u64>,
}

/// Checks the data against the options and builds the space for it.
fn plan(method: Method, o: &NasOptions, inputs: &Inputs<'_>) -> Result<Plan> {
    let bad = |m: String| NasError::Invalid(format!("{}: {m}", method.kind()));
    let data = inputs.data;
    if inputs.teacher.is_none() && !data.train.is_labeled() {
        return Err(bad(format!(
            "`{}` has no labels: give a model for the candidates to reproduce",
            data.spec
        )));
    }
    let n = data.train.len();
    let train_n = match (method, o.train_images) {
        (_, Some(t)) => t,
        (Method::Train, None) => CANDIDATE_IMAGES,
        (Method::OneShot, None) => n.saturating_sub(o.eval_images),
    };
    let batch = inputs.train.batch_size;
    if train_n < batch || train_n + o.eval_images > n {
        return Err(bad(format!(
            "{train_n} training and {} scoring images need {} training images, at least one \
             batch ({batch}) to train on; `{}` has {n}",
            o.eval_images,
            train_n + o.eval_images,
            data.spec
        )));
    }
    let classes = match inputs.teacher {
        Some(t) => teacher_classes(t)?,
        None => data.train.classes,
    };
    let zcfg = ZooConfig::new(data.train.shape)
        .with_width(o.width)
        .with_classes(classes);
    let space = Spaces::builtin().build(&o.space, &zcfg)?;
    let max_macs = match (o.max_macs, o.max_macs_ratio, inputs.entering_macs) {
        (a, Some(r), Some(entering)) => {
            let rel = (entering as f64 * r).floor() as u64;
            Some(a.map_or(rel, |a| a.min(rel)))
        }
        (_, Some(_), None) => {
            return Err(bad(
                "`max_macs_ratio` needs a model the search replaces".into()
            ))
        }
        (a, None, _) => a,
    };
    let mut sub = data.clone();
    sub.train = data.train.take(train_n);
    sub.test = data.train.take_last(o.eval_images);
    sub.spec = format!(
        "{} (train: first {train_n}, score: last {} training images)",
        data.spec, o.eval_images
    );
    Ok(Plan {
        space,
        data: sub,
        max_macs,
    })
}

/// The plots and results.md in the output folder, and the search's summary.
fn write_results(
    method: Method,
    o: &NasOptions,
    plan: &Plan,
    inputs: &Inputs<'_>,
    result: &SaResult,
    metric: &'static str,
    seconds: f64,
) -> Result<NasReport> {
    let limit = o.max_latency_ms.or(plan.max_macs.map(|m| m as f64 / 1e6));
    let (over_time, vs_cost) = plots(&result.candidates, limit);
    let cost_plot = if inputs.cost.is_some() {
        "reward-latency.svg"
    } else {
        "reward-macs.svg"
    };
    slim_core::io::write_atomic(&inputs.out.join("reward.svg"), over_time.as_bytes())?;
    slim_core::io::write_atomic(&inputs.out.join(cost_plot), vs_cost.as_bytes())?;
    let markdown = results_markdown(plan.space.as_ref(), result, seconds, metric);
    slim_core::io::write_atomic(&inputs.out.join("results.md"), markdown.as_bytes())?;
    let evaluated = result
        .candidates
        .iter()
        .filter(|c| c.status == "evaluated")
        .count();
    let best = &result.best;
    Ok(NasReport {
        kind: method.kind(),
        space: o.space.clone(),
        metric,
        arch: best.arch.clone(),
        tokens: best.tokens.clone(),
        reward: best.reward.unwrap_or(f64::NAN),
        macs_limit: plan.max_macs,
        latency_ms: best.measure.latency_ms,
        evaluated,
        rejected: result.candidates.len() - evaluated,
        seconds,
        cost_plot,
        markdown,
    })
}

/// A finished search's folder, read back: the space as the search built it, and every
/// candidate of its history (what `slim nas export` picks from).
pub struct SearchFolder {
    pub space: Box<dyn SearchSpace>,
    /// The space's name, and the width and input shape it was built for.
    pub name: String,
    pub width: f64,
    pub input: [usize; 3],
    pub candidates: Vec<Candidate>,
    /// The search's key in its history (space, limits, reward).
    pub key: serde_json::Value,
}

impl SearchFolder {
    /// Reads `dir`'s history; a folder without one, or with another kind of history, is
    /// refused naming the file.
    pub fn open(dir: &Path) -> Result<SearchFolder> {
        let path = history_path(dir);
        if !path.exists() {
            return Err(NasError::Invalid(format!(
                "{} has no search history ({} is missing)",
                dir.display(),
                path.display()
            )));
        }
        let history = slim_core::search::History::load(&path)?;
        let key = history.search.clone();
        let bad = |what: &str| {
            NasError::Invalid(format!(
                "{}: not an architecture search's history ({what})",
                path.display()
            ))
        };
        if key["kind"] != "nas.sa" {
            return Err(bad("no `kind: nas.sa`"));
        }
        let name = key["space"].as_str().ok_or_else(|| bad("no space"))?;
        let sc = &key["space_config"];
        let width = sc["width"].as_f64().ok_or_else(|| bad("no width"))?;
        let input: [usize; 3] =
            serde_json::from_value(sc["input"].clone()).map_err(|_| bad("no input shape"))?;
        slim_core::graph::check_shape(&input).map_err(|e| bad(&format!("input: {e}")))?;
        let classes = sc["classes"]
            .as_u64()
            .filter(|&c| c > 0 && c <= slim_core::graph::MAX_DIM as u64)
            .ok_or_else(|| bad("no possible number of classes"))? as usize;
        let zcfg = ZooConfig::new(input)
            .with_width(width)
            .with_classes(classes);
        Ok(SearchFolder {
            space: Spaces::builtin().build(name, &zcfg)?,
            name: name.to_string(),
            width,
            input,
            candidates: crate::sa::candidates(&history)?,
            key,
        })
    }

    /// Evaluated candidates, best first, each architecture once.
    pub fn ranked(&self) -> Vec<&Candidate> {
        ranked(&self.candidates)
    }

    /// The candidate ranked `rank` (1: the best).
    pub fn candidate(&self, rank: usize) -> Result<&Candidate> {
        let ranked = self.ranked();
        rank.checked_sub(1)
            .and_then(|i| ranked.get(i).copied())
            .ok_or_else(|| {
                NasError::Invalid(format!(
                    "rank {rank}: the search evaluated {} distinct candidates (rank 1 is the best)",
                    ranked.len()
                ))
            })
    }

    /// What the search's reward measured: `top-1`, or `agreement with the teacher`.
    pub fn reward_name(&self) -> &'static str {
        match self.key["reward"].get("teacher") {
            Some(_) => "agreement with the teacher",
            None => "top-1",
        }
    }

    /// Candidate `c` as a model with `weights`, its provenance saying where it came from; for
    /// inherited weights, also how they score.
    pub fn export(
        &self,
        c: &Candidate,
        weights: Weights<'_>,
        device: &Device,
    ) -> Result<(Model, Option<InheritedWeights>)> {
        let (mut model, inherited, described) = match weights {
            Weights::Fresh { seed } => {
                let m = Model::init(self.space.graph(&c.tokens)?, seed, device)?;
                (m, None, format!("fresh, seed {seed}"))
            }
            Weights::Inherited {
                supernet,
                data,
                calibration_images,
            } => {
                let (m, i) = self.inherit(c, supernet, data, calibration_images)?;
                (m, Some(i), "inherited from the supernet".to_string())
            }
        };
        let input = self.input;
        for (k, v) in [
            ("nas_space", self.name.clone()),
            ("nas_arch", c.arch.clone()),
            ("nas_tokens", format!("{:?}", c.tokens)),
            ("nas_reward", format!("{:.4}", c.reward.unwrap_or(f64::NAN))),
            ("width", self.width.to_string()),
            ("input", format!("{}x{}x{}", input[0], input[1], input[2])),
            ("nas_weights", described),
            (
                "created_by",
                format!("slim {} nas export", env!("CARGO_PKG_VERSION")),
            ),
        ] {
            model.provenance.insert(k.into(), v);
        }
        Ok((model, inherited))
    }

    /// Candidate `c` with its slices of the supernet, batch norms recomputed on the first
    /// `images` training images of `data` (the model the search scored when they are the
    /// search's own calibration images).
    fn inherit(
        &self,
        c: &Candidate,
        supernet: &Model,
        data: &DataSplits,
        images: usize,
    ) -> Result<(Model, InheritedWeights)> {
        if images == 0 {
            return Err(NasError::Invalid(
                "batch-norm calibration needs at least 1 image".into(),
            ));
        }
        let mut model = crate::oneshot::inherit(supernet, self.space.as_ref(), &c.tokens)?;
        let calibration = data.train.take(images);
        slim_core::train::recalibrate_batch_norm(&model, &calibration, &data.normalize, 64)?;
        let same = self.key["reward"]["calibration"].as_str() == Some(&calibration.fingerprint());
        // Without labels there is no top-1 to measure.
        let test_top1 = match data.test.is_labeled() {
            true => {
                Some(slim_core::train::evaluate(&model, &data.test, &data.normalize, 256)?.top1)
            }
            false => None,
        };
        model.provenance.insert("data".into(), data.spec.clone());
        let i = InheritedWeights {
            same_calibration: same,
            test_top1,
        };
        Ok((model, i))
    }
}

/// Where an exported candidate's weights come from.
pub enum Weights<'a> {
    /// Drawn afresh, to be trained.
    Fresh { seed: u64 },
    /// The candidate's slices of a one-shot search's supernet, batch norms recomputed on the
    /// first `calibration_images` training images of `data`.
    Inherited {
        supernet: &'a Model,
        data: &'a DataSplits,
        calibration_images: usize,
    },
}

/// How inherited weights score.
#[derive(Clone, Debug, Serialize)]
pub struct InheritedWeights {
    /// The batch norms were recomputed on the search's own calibration images: the model is
    /// the one the search scored.
    pub same_calibration: bool,
    /// Top-1 on the test split (labelled data).
    pub test_top1: Option<f64>,
}

/// The number of classes a teacher scores: candidates without labels reproduce its scores.
pub fn teacher_classes(teacher: &Model) -> Result<usize> {
    match teacher.graph.node(teacher.graph.outputs()[0]).shape[..] {
        [k] => Ok(k),
        ref other => Err(NasError::Invalid(format!(
            "the model to reproduce outputs {other:?} per image, not class scores: an \
             architecture search without labels needs a classifier to reproduce"
        ))),
    }
}

/// Evaluated candidates, best first, each architecture once; among equal rewards the earlier
/// candidate ranks first.
pub fn ranked(all: &[Candidate]) -> Vec<&Candidate> {
    let mut seen = std::collections::HashSet::new();
    let mut v: Vec<&Candidate> = all
        .iter()
        .filter(|c| c.status == "evaluated" && seen.insert(c.tokens.clone()))
        .collect();
    v.sort_by(|x, y| {
        y.reward
            .partial_cmp(&x.reward)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    v
}

/// The best ten candidates beside the hand-made network, as a text table under a line that
/// counts the candidates.
fn results_markdown(space: &dyn SearchSpace, r: &SaResult, seconds: f64, metric: &str) -> String {
    let evaluated = r
        .candidates
        .iter()
        .filter(|c| c.status == "evaluated")
        .count();
    let rejected = r.candidates.len() - evaluated;
    let with_lat = r.baseline.latency_ms.is_some();
    let human = slim_core::analysis::human;
    let latency = |l: Option<f64>| format!("{:.3}", l.unwrap_or(f64::NAN));
    let mut first = vec![
        "-".to_string(),
        "hand-made (initial)".to_string(),
        human(r.baseline.macs),
        human(r.baseline.params),
    ];
    if with_lat {
        first.push(latency(r.baseline.latency_ms));
    }
    first.push(
        if r.baseline_feasible {
            "meets the limits"
        } else {
            "breaks the limits"
        }
        .into(),
    );
    let mut rows = vec![first];
    for (i, c) in ranked(&r.candidates).iter().take(10).enumerate() {
        let mut row = vec![
            (i + 1).to_string(),
            c.arch.clone(),
            human(c.measure.macs),
            human(c.measure.params),
        ];
        if with_lat {
            row.push(latency(c.measure.latency_ms));
        }
        row.push(format!("{:.2}%", c.reward.unwrap_or(f64::NAN) * 100.0));
        rows.push(row);
    }
    let mut header = vec!["rank", "architecture", "MACs", "params"];
    if with_lat {
        header.push("latency ms");
    }
    header.push(metric);
    format!(
        "search space {}: {evaluated} candidates evaluated, {rejected} rejected by the limits, \
         {seconds:.0} s\n\n{}",
        space.name(),
        slim_core::plot::table(&header, &rows)
    )
}
