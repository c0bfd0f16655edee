//! One-shot search: a weight-sharing supernet, trained once, then a search over subnets that
//! inherit its weights.
//!
//! The supernet is the space's dearest candidate ([`SearchSpace::supernet`]). A candidate's
//! weight is a slice of the supernet's: its leading output and input channels, and the centre
//! of a larger kernel window ([`SearchSpace::supernet_param`] names the supernet's parameter
//! when block numbering differs). Training samples one candidate per step (seeded, uniform
//! over each token's choices) and runs it on the batch with the slices in place of its own
//! weights (`slim-core`'s [`ParamSource`]), so the gradient lands in the shared supernet
//! weights. The search then scores each candidate with the weights it inherits, after its
//! batch-norm statistics are recomputed on training images ([`OneShotReward`]); the best is
//! exported as an ordinary model and trained again.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use slim_core::data::{DataSplits, Dataset, ImageSet, Loader, LoaderConfig, Normalize};
use slim_core::exec::ParamSource;
use slim_core::reproduce::Reproduce;
use slim_core::train::{
    evaluate, fidelity, recalibrate_batch_norm, CheckpointEvery, LossTerm, Optimizer, TrainConfig,
};
use slim_core::{CoreError, ForwardOptions, Graph, Mode, Model, Node, ParamStore};

use crate::sa::Reward;
use crate::space::{check_tokens, SearchSpace};
use crate::{NasError, Result};

/// The leading slice of `full` of `shape` (the centre on the kernel dimensions, 2 and up).
pub fn slice_to(full: &Tensor, shape: &[usize], name: &str) -> slim_core::Result<Tensor> {
    let dims = full.dims().to_vec();
    if dims.len() != shape.len() || dims.iter().zip(shape).any(|(h, w)| w > h) {
        return Err(CoreError::param(
            name,
            format!("the supernet's weight is {dims:?}, it cannot hold the candidate's {shape:?}"),
        ));
    }
    let mut t = full.clone();
    for (d, (&have, &want)) in dims.iter().zip(shape).enumerate() {
        if want < have {
            let start = if d >= 2 { (have - want) / 2 } else { 0 };
            t = t.narrow(d, start, want)?;
        }
    }
    Ok(t)
}

/// A candidate's trainable parameters as slices of the supernet's.
pub struct Slices<'a> {
    pub supernet: &'a ParamStore,
    pub space: &'a dyn SearchSpace,
    pub tokens: &'a [usize],
}

impl ParamSource for Slices<'_> {
    fn param(&self, node: &Node, role: &str) -> slim_core::Result<Option<Tensor>> {
        let name = node.param_name(role);
        let Some((_, spec)) = node.params().into_iter().find(|(n, _)| *n == name) else {
            return Ok(None);
        };
        if !spec.kind.is_trainable() {
            return Ok(None);
        }
        let sname = self.space.supernet_param(self.tokens, &name);
        let full = self.supernet.tensor(&sname).map_err(|_| {
            CoreError::param(
                &name,
                format!("the supernet has no parameter `{sname}` to share"),
            )
        })?;
        Ok(Some(slice_to(&full, &spec.shape, &name)?))
    }
}

/// A candidate as an ordinary model holding copies of its slices of the supernet's weights
/// (its batch-norm statistics are the supernet's slices too: recompute them before use).
pub fn inherit(supernet: &Model, space: &dyn SearchSpace, tokens: &[usize]) -> Result<Model> {
    let graph = space.graph(tokens)?;
    let model = Model::init(graph, 0, &supernet.device())?;
    for node in model.graph.nodes() {
        for (name, spec) in node.params() {
            let sname = space.supernet_param(tokens, &name);
            let full = supernet.params.tensor(&sname).map_err(|_| {
                NasError::Invalid(format!(
                    "the supernet has no parameter `{sname}` for the candidate's `{name}`"
                ))
            })?;
            let t = slice_to(&full, &spec.shape, &name)?.detach().contiguous()?;
            model.params.set(&name, &t)?;
        }
    }
    Ok(model)
}

/// What a supernet file says it is, so that it is only reused by the same training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SupernetState {
    key: serde_json::Value,
    epochs_done: usize,
    /// Steps of epoch `epochs_done` already taken (a file written within an epoch).
    #[serde(default)]
    steps_done: usize,
    /// That epoch's loss sum and steps so far, so that its figure is the unbroken run's.
    #[serde(default)]
    loss_sum: f64,
}

/// Where a supernet training is.
#[derive(Clone, Debug)]
pub enum SupernetProgress {
    /// Epochs already done, and steps of the next, read back from the file.
    Resumed {
        epochs_done: usize,
        steps_done: usize,
    },
    Step {
        epoch: usize,
        epochs: usize,
        step: usize,
        steps: usize,
        loss: f64,
    },
    EpochEnd {
        epoch: usize,
        loss: f64,
        seconds: f64,
    },
}

impl SupernetProgress {
    /// The event in words, for a log; `None` for a step (a progress bar's).
    pub fn describe(&self) -> Option<String> {
        match self {
            SupernetProgress::Resumed {
                epochs_done,
                steps_done,
            } => Some(format!(
                "supernet: {epochs_done} epoch(s) and {steps_done} step(s) read back from the \
                 output folder"
            )),
            SupernetProgress::Step { .. } => None,
            SupernetProgress::EpochEnd {
                epoch,
                loss,
                seconds,
            } => Some(format!(
                "supernet epoch {}: loss {loss:.4} over sampled subnets, {seconds:.1} s",
                epoch + 1
            )),
        }
    }
}

/// The supernet file `f` of a training with `key` and its state, checked: the same space,
/// data and recipe, and not trained past `cfg`'s epochs.
fn read_supernet(
    f: &Path,
    key: &serde_json::Value,
    cfg: &TrainConfig,
    device: &candle_core::Device,
) -> Result<(Model, SupernetState)> {
    let m = Model::load(f, device)?;
    let state: SupernetState = m
        .provenance
        .get("supernet_state")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| {
            NasError::Invalid(format!("{}: not a supernet file of slim nas", f.display()))
        })?;
    if state.key != *key {
        return Err(NasError::Invalid(format!(
            "{}: a supernet of another space, data set or recipe; remove it or name \
             another folder",
            f.display()
        )));
    }
    if state.steps_done > 0 && state.epochs_done >= cfg.epochs {
        return Err(NasError::Invalid(format!(
            "{}: a supernet trained {} step(s) into epoch {}, past the {} epoch(s) asked \
             for; ask for more epochs, or remove it",
            f.display(),
            state.steps_done,
            state.epochs_done + 1,
            cfg.epochs
        )));
    }
    Ok((m, state))
}

/// The loss of the subnet `tokens` of the supernet on `batch` (dropout drawn from `seed`):
/// with the teacher's outputs to reproduce, else on the labels.
fn subnet_loss(
    space: &dyn SearchSpace,
    (supernet, tokens, seed): (&Model, &[usize], u64),
    batch: &slim_core::data::Batch,
    reproduce: Option<&mut Reproduce>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    // A throwaway model of the candidate: its own batch-norm statistics, the
    // supernet's slices for everything trained (its own weights are never read).
    let sub = Model::with_zero_weights(space.graph(tokens)?, device)?;
    let slices = Slices {
        supernet: &supernet.params,
        space,
        tokens,
    };
    let out = sub.forward_with(
        std::slice::from_ref(&batch.images),
        Mode::Train,
        ForwardOptions {
            params: Some(&slices),
            dropout_seed: Some(seed),
            ..Default::default()
        },
    )?;
    Ok(match reproduce {
        Some(r) => r.loss(batch, &out)?,
        None => candle_nn::loss::cross_entropy(&out.outputs[0], &batch.labels)?,
    })
}

/// What identifies a supernet's training: the space, the data, the recipe but its epochs (a
/// longer training of the same supernet goes on from its file), and the teacher.
fn supernet_key(
    space: &dyn SearchSpace,
    data: &DataSplits,
    cfg: &TrainConfig,
    teacher: Option<&Model>,
) -> Result<serde_json::Value> {
    let recipe = TrainConfig {
        epochs: 0,
        ..cfg.clone()
    };
    let mut key = json!({
        "space": space.name(),
        "space_config": space.key(),
        "data": data.train.fingerprint(),
        "recipe": format!("{recipe:?}"),
    });
    if let Some(t) = teacher {
        key["teacher"] = json!(t.fingerprint()?);
    }
    Ok(key)
}

/// The optimizer's state of the moment `at` the supernet file `f` was written, so that the
/// resumed training is the one that was stopped; without it (an older file) the optimizer
/// starts afresh. The newest state first, then the one it replaced: a kill after the
/// optimizer's write and before the supernet's leaves the supernet with the previous one.
fn restore_optimizer(
    opt: &mut Optimizer,
    f: &Path,
    at: (usize, usize),
    key: &serde_json::Value,
    device: &candle_core::Device,
) -> Result<()> {
    for path in [optimizer_path(f), previous_optimizer_path(f)] {
        if let Some((tensors, steps)) = load_optimizer(&path, at, key, device)? {
            opt.restore(&tensors, steps)
                .map_err(|e| NasError::Invalid(format!("{}: {e}", path.display())))?;
            break;
        }
    }
    Ok(())
}

/// The value of the supernet's loss at `epoch` and `step`, refused when it is not finite.
fn finite_loss(loss: &Tensor, epoch: usize, step: usize) -> Result<f64> {
    let value = f64::from(loss.to_scalar::<f32>()?);
    if !value.is_finite() {
        return Err(NasError::Invalid(format!(
            "the supernet's loss is {value} at epoch {} step {step}; lower the learning rate",
            epoch + 1
        )));
    }
    Ok(value)
}

/// Trains the supernet of `space` on `data.train` with `cfg` (its epochs, batch size,
/// optimizer, schedule and seed), one sampled candidate per step: on the labels, or with a
/// teacher (data without labels) to reproduce the teacher's outputs. With `file`, the supernet
/// and its optimizer's state are written there after every epoch and within epochs as
/// `every` says; a training stopped in between (or asked for more epochs) resumes where the
/// file was written, to the same supernet as an unbroken run; a finished one is read back.
pub fn train_supernet(
    space: &dyn SearchSpace,
    data: &DataSplits,
    cfg: &TrainConfig,
    teacher: Option<&Model>,
    file: Option<&Path>,
    every: CheckpointEvery,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(&SupernetProgress),
) -> Result<Model> {
    cfg.validate()?;
    every.check()?;
    let sup_tokens = space.supernet();
    check_tokens(space, &sup_tokens)?;
    if data.train.len() < cfg.batch_size {
        return Err(NasError::Invalid(format!(
            "the supernet's training set has {} images, fewer than one batch of {}",
            data.train.len(),
            cfg.batch_size
        )));
    }
    let key = supernet_key(space, data, cfg, teacher)?;
    let mut reproduce = teacher.map(|t| Reproduce::new(t.clone())).transpose()?;
    let mut supernet = Model::init(space.graph(&sup_tokens)?, cfg.seed, device)?;
    let (mut done, mut done_steps, mut done_loss) = (0, 0, 0.0);
    if let Some(f) = file.filter(|f| f.exists()) {
        let (m, state) = read_supernet(f, &key, cfg, device)?;
        supernet = m;
        done = state.epochs_done.min(cfg.epochs);
        (done_steps, done_loss) = (state.steps_done, state.loss_sum);
        progress(&SupernetProgress::Resumed {
            epochs_done: done,
            steps_done: done_steps,
        });
    }
    let mut opt = Optimizer::new(cfg.optimizer, &supernet, &[])?;
    if let Some(f) = file.filter(|_| (done, done_steps) != (0, 0)) {
        restore_optimizer(&mut opt, f, (done, done_steps), &key, device)?;
    }
    let train_set: Arc<dyn Dataset> = Arc::new(data.train.clone());
    let loader_cfg = LoaderConfig::training(data, cfg.batch_size, cfg.seed);
    let steps = data.train.len() / cfg.batch_size;
    let ranges = space.ranges();
    let mut since_checkpoint = (0usize, std::time::Instant::now());
    for epoch in done..cfg.epochs {
        let started = std::time::Instant::now();
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37));
        // A training resumed within this epoch skips the steps the file had taken: the same
        // batches, and the same sampled candidates drawn and dropped.
        let skip = if epoch == done { done_steps } else { 0 };
        let (mut sum, mut n) = (if skip > 0 { done_loss } else { 0.0 }, skip);
        for _ in 0..skip {
            for &r in &ranges {
                rng.random_range(0..r);
            }
        }
        for (step, batch) in Loader::new(train_set.clone(), &loader_cfg, epoch as u64, device)?
            .enumerate()
            .skip(skip)
        {
            let batch = batch?;
            let tokens: Vec<usize> = ranges.iter().map(|&r| rng.random_range(0..r)).collect();
            let global = epoch * steps + step;
            let on = (&supernet, tokens.as_slice(), cfg.seed ^ global as u64);
            let loss = subnet_loss(space, on, &batch, reproduce.as_mut(), device)?;
            let value = finite_loss(&loss, epoch, step)?;
            let grads = loss.backward()?;
            opt.step(&grads, cfg.lr_at(global, steps), cfg)?;
            sum += value;
            n += 1;
            since_checkpoint.0 += 1;
            let due = every.due(since_checkpoint.0, since_checkpoint.1);
            if let (Some(f), true, true) = (file, due, step + 1 < steps) {
                save_supernet(f, &mut supernet, &opt, &key, (epoch, step + 1), sum)?;
                since_checkpoint = (0, std::time::Instant::now());
            }
            progress(&SupernetProgress::Step {
                epoch,
                epochs: cfg.epochs,
                step,
                steps,
                loss: sum / n as f64,
            });
        }
        if let Some(f) = file {
            save_supernet(f, &mut supernet, &opt, &key, (epoch + 1, 0), 0.0)?;
            since_checkpoint = (0, std::time::Instant::now());
        }
        progress(&SupernetProgress::EpochEnd {
            epoch,
            loss: sum / n.max(1) as f64,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(supernet)
}

/// Writes the supernet and its optimizer's state after `at` (epochs done, steps of the next),
/// with that epoch's loss sum so far. The optimizer first, after moving the state it
/// replaces aside: a kill between the files leaves a supernet one moment behind the newest
/// optimizer state, whose own moment the previous file still holds.
fn save_supernet(
    f: &Path,
    supernet: &mut Model,
    opt: &Optimizer,
    key: &serde_json::Value,
    at: (usize, usize),
    loss_sum: f64,
) -> Result<()> {
    let (newest, previous) = (optimizer_path(f), previous_optimizer_path(f));
    if newest.exists() {
        std::fs::rename(&newest, &previous).map_err(|e| {
            NasError::Invalid(format!("{}: cannot move it aside: {e}", newest.display()))
        })?;
    }
    save_optimizer(&newest, opt, at, key)?;
    let state = SupernetState {
        key: key.clone(),
        epochs_done: at.0,
        steps_done: at.1,
        loss_sum,
    };
    supernet.provenance.insert(
        "supernet_state".into(),
        serde_json::to_string(&state).unwrap_or_default(),
    );
    supernet.save(f)?;
    Ok(())
}

/// Where a supernet file's optimizer state is kept: `NAME.opt.safetensors` beside it.
fn optimizer_path(supernet: &Path) -> std::path::PathBuf {
    supernet.with_extension("opt.safetensors")
}

/// The optimizer state that the newest one replaced: `NAME.opt.prev.safetensors`.
fn previous_optimizer_path(supernet: &Path) -> std::path::PathBuf {
    supernet.with_extension("opt.prev.safetensors")
}

const OPTIMIZER_FORMAT: &str = "slim-supernet-optimizer";

fn save_optimizer(
    path: &Path,
    opt: &Optimizer,
    at: (usize, usize),
    key: &serde_json::Value,
) -> Result<()> {
    let (tensors, steps) = opt.state();
    let meta: std::collections::HashMap<String, String> = [
        ("format".to_string(), OPTIMIZER_FORMAT.to_string()),
        ("epochs_done".to_string(), at.0.to_string()),
        ("steps_done".to_string(), at.1.to_string()),
        ("steps".to_string(), steps.to_string()),
        ("key".to_string(), key.to_string()),
    ]
    .into_iter()
    .collect();
    let bytes = safetensors::tensor::serialize(tensors, Some(meta)).map_err(|e| {
        NasError::Invalid(format!(
            "{}: cannot encode the optimizer: {e}",
            path.display()
        ))
    })?;
    slim_core::io::write_atomic(path, &bytes)?;
    Ok(())
}

/// The optimizer's state saved at `at` (epochs done, steps of the next) of the supernet
/// `key`, or `None` when there is none of that moment.
fn load_optimizer(
    path: &Path,
    at: (usize, usize),
    key: &serde_json::Value,
    device: &candle_core::Device,
) -> Result<
    Option<(
        std::collections::HashMap<String, candle_core::Tensor>,
        usize,
    )>,
> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(None);
    };
    let bad = |msg: String| NasError::Invalid(format!("{}: {msg}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(OPTIMIZER_FORMAT) {
        return Err(bad("not a supernet's optimizer state".into()));
    }
    let steps_done = meta.get("steps_done").map_or("0", String::as_str);
    let same_moment =
        meta.get("epochs_done") == Some(&at.0.to_string()) && steps_done == at.1.to_string();
    if !same_moment || meta.get("key") != Some(&key.to_string()) {
        return Ok(None);
    }
    let steps = meta
        .get("steps")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no step count".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("unreadable ({e})")))?;
    Ok(Some((tensors, steps)))
}

/// A candidate's reward with the supernet's weights: its batch-norm statistics recomputed on
/// `calibration`, then its top-1 on `eval`, or with a teacher (data without labels) its
/// fidelity to the teacher there.
pub struct OneShotReward<'a> {
    pub supernet: &'a Model,
    pub space: &'a dyn SearchSpace,
    pub calibration: ImageSet,
    pub eval: ImageSet,
    pub normalize: Normalize,
    /// What identifies the supernet (its training), for the history's key.
    pub supernet_key: serde_json::Value,
    pub teacher: Option<&'a Model>,
}

impl Reward for OneShotReward<'_> {
    fn key(&self) -> serde_json::Value {
        let mut key = json!({
            "one_shot": self.supernet_key,
            "calibration": self.calibration.fingerprint(),
            "eval": self.eval.fingerprint(),
        });
        if let Some(t) = self.teacher {
            key["teacher"] = json!(t.fingerprint().ok());
        }
        key
    }
    fn reward(&mut self, tokens: &[usize], _graph: &Graph) -> slim_core::Result<f64> {
        let m = inherit(self.supernet, self.space, tokens).map_err(|e| match e {
            NasError::Core(c) => c,
            other => CoreError::Invalid(other.to_string()),
        })?;
        recalibrate_batch_norm(&m, &self.calibration, &self.normalize, 64)?;
        Ok(match self.teacher {
            Some(t) => fidelity(&m, t, &self.eval, &self.normalize, 256)?.headline(),
            None => evaluate(&m, &self.eval, &self.normalize, 256)?.top1,
        })
    }
}

/// Kendall's rank correlation (tau-a) of two equally long lists: 1 when they order every
/// pair alike, -1 when they order every pair oppositely.
pub fn kendall_tau(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let mut s = 0.0;
    let mut pairs = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            let x = (a[i] - a[j]).signum() * (b[i] - b[j]).signum();
            if (a[i] - a[j]) != 0.0 && (b[i] - b[j]) != 0.0 {
                s += x;
            }
            pairs += 1.0;
        }
    }
    if pairs == 0.0 {
        0.0
    } else {
        s / pairs
    }
}
