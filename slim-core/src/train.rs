//! Training: the one loop behind everything in Slim that trains (baseline, fine-tuning after
//! pruning, quantization-aware training, distillation, supernets), and evaluation.
//!
//! - Optimizers: SGD with momentum, Nesterov and (coupled) weight decay; Adam; AdamW (decoupled
//!   weight decay, Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019).
//! - Learning-rate schedules: constant, step, cosine; with an optional linear warm-up.
//! - Extra loss terms from the caller ([`LossTerm`]), which may read any tapped node.
//! - Seeded: batches depend only on the seed and the epoch, so two runs with one seed agree,
//!   and a run resumed from an epoch checkpoint continues exactly as an unbroken one.
//! - Checkpoints: after every epoch, the model, the optimizer state and the progress are
//!   written atomically to one safetensors file.
//! - Progress goes to a caller-supplied callback; this crate prints nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, DataSplits, Dataset, ImageSet, Loader, LoaderConfig, Normalize};
use crate::error::{CoreError, Result};
use crate::exec::{ForwardOptions, ForwardOutput, Mode};
use crate::io::{open_safetensors, write_atomic};
use crate::model::Model;

pub use crate::io::CHECKPOINT_FORMAT;

/// Which optimizer updates the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    AdamW,
}

impl std::str::FromStr for OptimizerKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::AdamW),
            _ => Err(CoreError::Invalid(format!(
                "unknown optimizer `{s}` (known: sgd, adam, adamw)"
            ))),
        }
    }
}

/// How the learning rate changes over the epochs (after warm-up).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        every: usize,
        gamma: f64,
    },
    /// Cosine decay to zero over the run, step by step.
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = CoreError;
    /// `constant`, `cosine`, or `step:EVERY:GAMMA` (e.g. `step:10:0.1`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            CoreError::Invalid(format!(
                "unknown schedule `{s}` (constant, cosine, step:EVERY:GAMMA)"
            ))
        };
        match s {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            _ => {
                let parts: Vec<&str> = s.split(':').collect();
                match parts[..] {
                    ["step", every, gamma] => Ok(Schedule::Step {
                        every: every.parse().map_err(|_| bad())?,
                        gamma: gamma.parse().map_err(|_| bad())?,
                    }),
                    _ => Err(bad()),
                }
            }
        }
    }
}

/// A training recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct TrainConfig {
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().epochs))]
    pub epochs: usize,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().batch_size))]
    pub batch_size: usize,
    /// sgd, adam or adamw.
    #[cfg_attr(feature = "clap", arg(long, default_value = "adam"))]
    pub optimizer: OptimizerKind,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().lr))]
    pub lr: f64,
    /// SGD momentum (ignored by Adam).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = TrainConfig::default().momentum))]
    pub momentum: f64,
    #[cfg_attr(feature = "clap", arg(long))]
    pub nesterov: bool,
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.0))]
    pub weight_decay: f64,
    /// constant, cosine, or step:EVERY:GAMMA.
    #[cfg_attr(feature = "clap", arg(long, default_value = "constant"))]
    pub schedule: Schedule,
    /// Epochs of linear warm-up from 0 to `lr`.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub warmup_epochs: usize,
    /// Seed of the initial weights, the batch order and dropout.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 5,
            batch_size: 64,
            optimizer: OptimizerKind::Adam,
            lr: 0.003,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            warmup_epochs: 0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn with_epochs(mut self, epochs: usize) -> Self {
        self.epochs = epochs;
        self
    }
    pub fn with_lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }
    pub fn with_optimizer(mut self, optimizer: OptimizerKind) -> Self {
        self.optimizer = optimizer;
        self
    }
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Checks the recipe once, before any work starts.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::Invalid(m));
        if self.epochs == 0 || self.epochs > 1_000_000 {
            return bad(format!("epochs {} must be in 1..=1000000", self.epochs));
        }
        if self.warmup_epochs > self.epochs {
            return bad(format!(
                "warm-up epochs {} exceed the {} epochs",
                self.warmup_epochs, self.epochs
            ));
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum {} must be in [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay {} must be non-negative",
                self.weight_decay
            ));
        }
        if let Schedule::Step { every, gamma } = self.schedule {
            if every == 0 || !(gamma > 0.0 && gamma <= 1.0) {
                return bad(format!(
                    "step schedule needs every >= 1 and gamma in (0, 1], got {every}, {gamma}"
                ));
            }
        }
        Ok(())
    }

    /// The learning rate at a step (counted from 0 over the whole run).
    pub fn lr_at(&self, step: usize, steps_per_epoch: usize) -> f64 {
        let spe = steps_per_epoch.max(1);
        let warm = self.warmup_epochs.saturating_mul(spe);
        if step < warm {
            return self.lr * (step + 1) as f64 / warm as f64;
        }
        let total = self.epochs.saturating_mul(spe).saturating_sub(warm).max(1);
        let t = step - warm;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Step { every, gamma } => {
                self.lr * gamma.powi(((step / spe) / every.max(1)) as i32)
            }
            Schedule::Cosine => {
                0.5 * self.lr * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos())
            }
        }
    }
}

/// An extra term of the training loss, computed from the batch and the forward output
/// (which includes the taps it asked for). Distillation losses are such terms.
pub trait LossTerm {
    /// A short name for progress and reports.
    fn name(&self) -> &str;
    /// Nodes whose outputs the term reads from [`ForwardOutput::taps`].
    fn taps(&self) -> Vec<String> {
        Vec::new()
    }
    /// Parameters of the term's own that train with the model (a distillation adapter, say),
    /// by unique name. They are checkpointed with the model, never saved into it.
    fn params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// What identifies the term's setting (its losses, its teachers): a run resumed from a
    /// checkpoint written with another is refused.
    fn fingerprint(&self) -> String {
        self.name().to_string()
    }
    /// The term's value (a scalar), to be added to the cross-entropy.
    fn loss(&mut self, batch: &Batch, out: &ForwardOutput) -> Result<Tensor>;
    /// Called before each epoch with the sample indices of its batches, in the order they
    /// will come (a term that fetches per-sample data from elsewhere asks for it ahead).
    fn epoch_start(&mut self, _plan: &[Vec<usize>]) -> Result<()> {
        Ok(())
    }
}

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Progress {
    EpochStart {
        epoch: usize,
        epochs: usize,
        batches: usize,
    },
    Step {
        epoch: usize,
        step: usize,
        batches: usize,
        loss: f64,
        /// The epoch's training top-1 so far; `None` when training without labels.
        accuracy: Option<f64>,
        images_per_sec: f64,
        lr: f64,
    },
    EpochEnd {
        epoch: usize,
        report: EpochReport,
    },
}

/// One epoch's figures.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    /// `None` when the model trained without labels (reproducing a teacher's outputs).
    pub train_top1: Option<f64>,
    pub test: Option<EvalReport>,
    pub seconds: f64,
    pub images_per_sec: f64,
}

/// Accuracy on a data set.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalReport {
    pub top1: f64,
    pub top5: f64,
    pub samples: usize,
    pub seconds: f64,
    pub samples_per_sec: f64,
}

/// What a training run did.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochReport>,
    /// The epoch the run resumed after (0 when it started fresh).
    pub resumed_from: usize,
    /// The steps of the next epoch that the checkpoint it resumed from had done (0 when it
    /// resumed at an epoch's end, or started fresh).
    pub resumed_at_step: usize,
}

impl EpochReport {
    /// The epoch in one line: loss, train and test top-1 where measured, time, speed.
    pub fn describe(&self) -> String {
        let test = self
            .test
            .as_ref()
            .map(|t| format!(", test top-1 {:.2}%", t.top1 * 100.0))
            .unwrap_or_default();
        let train = self
            .train_top1
            .map(|a| format!(", train top-1 {:.2}%", a * 100.0))
            .unwrap_or_default();
        format!(
            "epoch {}: loss {:.4}{train}{test}, {:.1} s, {:.0} img/s",
            self.epoch + 1,
            self.loss,
            self.seconds,
            self.images_per_sec
        )
    }
}

impl TrainReport {
    /// Images per second over the whole run (each epoch weighted by its time).
    pub fn images_per_sec(&self) -> f64 {
        let (n, s) = self.epochs.iter().fold((0.0, 0.0), |(n, s), e| {
            (n + e.images_per_sec * e.seconds, s + e.seconds)
        });
        if s > 0.0 {
            n / s
        } else {
            0.0
        }
    }

    /// The epochs as a table: loss, train and test top-1, seconds, images per second.
    pub fn table(&self) -> String {
        let pct = |a: f64| format!("{:.2}%", a * 100.0);
        let rows: Vec<Vec<String>> = self
            .epochs
            .iter()
            .map(|e| {
                vec![
                    (e.epoch + 1).to_string(),
                    format!("{:.4}", e.loss),
                    e.train_top1.map_or("-".into(), pct),
                    e.test.as_ref().map(|t| pct(t.top1)).unwrap_or_default(),
                    format!("{:.1}", e.seconds),
                    format!("{:.0}", e.images_per_sec),
                ]
            })
            .collect();
        let header = [
            "epoch",
            "loss",
            "train top-1",
            "test top-1",
            "seconds",
            "img/s",
        ];
        crate::plot::table(&header, &rows)
    }
}

/// How often a training run writes its checkpoint within an epoch; one is written after every
/// epoch as well.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CheckpointEvery {
    /// After this many steps (at least 1).
    Steps(usize),
    /// After at least this many seconds of training since the last checkpoint.
    Seconds(f64),
}

impl Default for CheckpointEvery {
    /// About one minute of work: a killed run loses at most that.
    fn default() -> Self {
        CheckpointEvery::Seconds(60.0)
    }
}

impl CheckpointEvery {
    /// Refuses 0 steps and a negative or NaN number of seconds.
    pub fn check(&self) -> Result<()> {
        match *self {
            CheckpointEvery::Steps(0) => Err(CoreError::Invalid(
                "checkpoints every 0 steps: give at least 1".into(),
            )),
            CheckpointEvery::Seconds(s) if s.is_nan() || s < 0.0 => Err(CoreError::Invalid(
                format!("checkpoints every {s} seconds: give a number of seconds, 0 or more"),
            )),
            _ => Ok(()),
        }
    }

    /// Whether a checkpoint is due after `steps` steps, `since` the last one was written.
    pub fn due(&self, steps: usize, since: Instant) -> bool {
        match *self {
            CheckpointEvery::Steps(n) => steps >= n,
            CheckpointEvery::Seconds(t) => since.elapsed().as_secs_f64() >= t,
        }
    }
}

/// Where and whether to checkpoint, and what else to add to the loss.
#[derive(Default)]
pub struct TrainOptions<'a> {
    /// Written after every epoch, and within epochs as `checkpoint_every` says.
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_every: CheckpointEvery,
    /// Continue from `checkpoint` if it exists.
    pub resume: bool,
    /// Evaluate on the test split after every epoch (labelled data only).
    pub eval_each_epoch: bool,
    /// Train without labels: the loss is the extra terms' alone (a teacher the model learns
    /// to reproduce), no cross-entropy. Data without labels (`unlabeled:DIR`) always trains
    /// this way.
    pub label_free: bool,
    pub extra: Vec<&'a mut dyn LossTerm>,
    /// Kernels that compute some nodes another way during training (quantization-aware
    /// training's fake-quantized weights).
    pub kernels: Option<&'a dyn crate::exec::NodeKernels>,
}

/// Optimizer state: one or two slots per trainable parameter. The training loop's; public for
/// loops that train something other than one model's own parameters (a supernet through its
/// subnets).
pub struct Optimizer {
    kind: OptimizerKind,
    params: Vec<(String, Var)>,
    /// `slots[i]` holds the state tensors of parameter `i`: momentum buffer (SGD) or first
    /// and second moments (Adam).
    slots: Vec<Vec<Tensor>>,
    steps: usize,
}

const SLOT_NAMES: [&str; 2] = ["m", "v"];

impl Optimizer {
    /// Over the model's trainable parameters, then `extra` (named `extra/<name>`).
    pub fn new(kind: OptimizerKind, model: &Model, extra: &[(String, Var)]) -> Result<Self> {
        let params: Vec<(String, Var)> = model
            .params
            .iter()
            .filter(|(_, p)| p.kind.is_trainable())
            .map(|(n, p)| (n.to_string(), p.var.clone()))
            .chain(extra.iter().map(|(n, v)| (format!("extra/{n}"), v.clone())))
            .collect();
        let n_slots = if kind == OptimizerKind::Sgd { 1 } else { 2 };
        let slots = params
            .iter()
            .map(|(_, v)| {
                (0..n_slots)
                    .map(|_| v.as_tensor().zeros_like())
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Optimizer {
            kind,
            params,
            slots,
            steps: 0,
        })
    }

    /// Its state: the slot tensors by name (`m/PARAM`, and `v/PARAM` for Adam) and the
    /// number of steps taken, to be saved beside the weights.
    pub fn state(&self) -> (Vec<(String, Tensor)>, usize) {
        let mut out = Vec::new();
        for ((name, _), slots) in self.params.iter().zip(&self.slots) {
            for (slot, t) in SLOT_NAMES.iter().zip(slots) {
                out.push((format!("{slot}/{name}"), t.clone()));
            }
        }
        (out, self.steps)
    }

    /// Restores what [`Optimizer::state`] gave (for the same parameters): every slot must be
    /// there with its parameter's shape. The error names what is missing or wrong.
    pub fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps: usize,
    ) -> std::result::Result<(), String> {
        // Adam's bias correction raises its rates to the step count as an i32.
        if steps > i32::MAX as usize / 2 {
            return Err(format!("the optimizer's step count {steps} is impossible"));
        }
        let mut restored = self.slots.clone();
        for ((name, var), slots) in self.params.iter().zip(restored.iter_mut()) {
            for (slot, t) in SLOT_NAMES.iter().zip(slots.iter_mut()) {
                let key = format!("{slot}/{name}");
                let v = tensors
                    .get(&key)
                    .ok_or_else(|| format!("optimizer state `{key}` is missing"))?;
                if v.dims() != var.dims() {
                    return Err(format!(
                        "optimizer state `{key}` has shape {:?}, expected {:?}",
                        v.dims(),
                        var.dims()
                    ));
                }
                *t = v.to_device(var.device()).map_err(|e| e.to_string())?;
            }
        }
        self.slots = restored;
        self.steps = steps;
        Ok(())
    }

    /// One step over every parameter that `grads` has a gradient for.
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for ((_, var), slots) in self.params.iter().zip(self.slots.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached, so that the update records no graph: a gradient's own graph reaches
            // the step's activations, and a slot built from it would keep them, and through
            // the previous slot every earlier step's, alive for the whole run.
            let (g, w) = (&g.detach(), &var.as_tensor().detach());
            match self.kind {
                OptimizerKind::Sgd => {
                    let g = if cfg.weight_decay > 0.0 {
                        (g + (w * cfg.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let d = if cfg.momentum > 0.0 {
                        let buf = ((&slots[0] * cfg.momentum)? + &g)?;
                        let d = if cfg.nesterov {
                            (&g + (&buf * cfg.momentum)?)?
                        } else {
                            buf.clone()
                        };
                        slots[0] = buf;
                        d
                    } else {
                        g
                    };
                    var.set(&(w - (d * lr)?)?)?;
                }
                OptimizerKind::Adam | OptimizerKind::AdamW => {
                    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
                    let coupled = self.kind == OptimizerKind::Adam && cfg.weight_decay > 0.0;
                    let g = if coupled {
                        (g + (w * cfg.weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let m = ((&slots[0] * b1)? + (&g * (1.0 - b1))?)?;
                    let v = ((&slots[1] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let mhat = (&m / (1.0 - b1.powi(t)))?;
                    let vhat = (&v / (1.0 - b2.powi(t)))?;
                    let mut w_new = (w - ((mhat / (vhat.sqrt()? + eps)?)? * lr)?)?;
                    if self.kind == OptimizerKind::AdamW && cfg.weight_decay > 0.0 {
                        w_new = (w_new - (w * (lr * cfg.weight_decay))?)?;
                    }
                    var.set(&w_new)?;
                    slots[0] = m;
                    slots[1] = v;
                }
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct TrainState {
    epochs_done: usize,
    /// Steps of epoch `epochs_done` already taken (a checkpoint written within an epoch).
    #[serde(default)]
    steps_done: usize,
    /// That epoch's running figures so far, so that its report is the unbroken run's.
    #[serde(default)]
    partial: Partial,
    optimizer_steps: usize,
    config: TrainConfig,
    data: String,
    /// The fingerprints of the extra loss terms.
    #[serde(default)]
    terms: Vec<String>,
}

/// An epoch's running figures.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Partial {
    loss_sum: f64,
    correct: usize,
    seen: usize,
    seconds: f64,
}

fn save_checkpoint(path: &Path, model: &Model, opt: &Optimizer, state: &TrainState) -> Result<()> {
    let mut meta = model.metadata()?;
    meta.insert("format".into(), CHECKPOINT_FORMAT.into());
    meta.insert(
        "train_state".into(),
        serde_json::to_string(state)
            .map_err(|e| CoreError::Invalid(format!("cannot encode the state: {e}")))?,
    );
    let mut tensors: Vec<(String, Tensor)> = model
        .params
        .iter()
        .map(|(n, p)| (format!("model/{n}"), p.var.as_tensor().clone()))
        .collect();
    for (name, var) in &opt.params {
        if name.starts_with("extra/") {
            tensors.push((name.clone(), var.as_tensor().clone()));
        }
    }
    for ((name, _), slots) in opt.params.iter().zip(&opt.slots) {
        for (slot, t) in SLOT_NAMES.iter().zip(slots) {
            tensors.push((format!("opt/{slot}/{name}"), t.clone()));
        }
    }
    let bytes = safetensors::tensor::serialize(tensors, Some(meta))
        .map_err(|e| CoreError::file(path, format!("cannot encode the checkpoint: {e}")))?;
    write_atomic(path, &bytes)
}

fn load_checkpoint(
    path: &Path,
    device: &Device,
) -> Result<(Model, HashMap<String, Tensor>, TrainState)> {
    let bytes = std::fs::read(path).map_err(|source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let wrap = |e: CoreError| match e {
        CoreError::File { msg, .. } => CoreError::file(path, msg),
        other => CoreError::file(path, other.to_string()),
    };
    let (st, meta) = open_safetensors(&bytes).map_err(wrap)?;
    if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
        return Err(CoreError::file(path, "not a training checkpoint"));
    }
    let state: TrainState = serde_json::from_str(
        meta.get("train_state").map(String::as_str).unwrap_or(""),
    )
    .map_err(|e| {
        CoreError::file(
            path,
            format!("the `train_state` metadata is malformed: {e}"),
        )
    })?;
    let (model, _) =
        Model::from_safetensors(&st, &meta, "model/", device, &Default::default()).map_err(wrap)?;
    let mut slots = HashMap::new();
    for (name, view) in st.tensors() {
        if name.starts_with("opt/") || name.starts_with("extra/") {
            let rest = name.strip_prefix("opt/").unwrap_or(&name);
            use candle_core::safetensors::Load;
            let t = view
                .load(device)
                .map_err(|e| CoreError::file(path, format!("tensor `{name}`: {e}")))?;
            slots.insert(rest.to_string(), t);
        }
    }
    Ok((model, slots, state))
}

/// Whether `model` can train on `data` with `cfg`: its input and output fit the data, a
/// batch fits the training split, and without labels there is a term to learn from.
fn check_fit(
    model: &Model,
    data: &DataSplits,
    cfg: &TrainConfig,
    label_free: bool,
    has_terms: bool,
) -> Result<()> {
    let shape = model.input_shape();
    if shape != data.train.shape.to_vec() {
        return Err(CoreError::Invalid(format!(
            "the model takes inputs of shape {shape:?}, the data set `{}` has {:?}",
            data.spec, data.train.shape
        )));
    }
    if label_free && !has_terms {
        return Err(CoreError::Invalid(format!(
            "the data set `{}` {}: training then needs a model to reproduce (a teacher), and \
             none is given",
            data.spec,
            if data.train.is_labeled() {
                "is used without its labels"
            } else {
                "has no labels"
            }
        )));
    }
    let out_shape = model.graph.node(model.graph.outputs()[0]).shape.clone();
    if !label_free && out_shape != [data.train.classes] {
        return Err(CoreError::Invalid(format!(
            "the model outputs {out_shape:?}, the data set `{}` has {} classes",
            data.spec, data.train.classes
        )));
    }
    if data.train.len() < cfg.batch_size {
        return Err(CoreError::Invalid(format!(
            "the training split has {} samples, fewer than one batch of {}",
            data.train.len(),
            cfg.batch_size
        )));
    }
    Ok(())
}

/// Replaces `model` and `opt` by the checkpoint at `path` (written by a run of the same
/// recipe, data, graph and extra terms, else refused); the epochs and steps it had done and
/// its epoch's running figures.
fn resume(
    path: &Path,
    model: &mut Model,
    opt: &mut Optimizer,
    (cfg, data, terms, extra_params): (&TrainConfig, &str, &[String], &[(String, Var)]),
) -> Result<(usize, usize, Partial)> {
    let (ck_model, slots, state) = load_checkpoint(path, &model.device())?;
    let mut ck_cfg = state.config.clone();
    ck_cfg.epochs = cfg.epochs;
    if ck_cfg != *cfg || state.data != data {
        return Err(CoreError::file(
            path,
            "was written by a run with another recipe or data set; remove it or use the same settings",
        ));
    }
    if ck_model.graph != model.graph {
        return Err(CoreError::file(path, "holds a different model graph"));
    }
    if state.terms != terms {
        return Err(CoreError::file(
            path,
            format!(
                "was written with other extra losses or teachers ({}), not ({}); remove it or use the same settings",
                state.terms.join("; "),
                terms.join("; ")
            ),
        ));
    }
    *model = ck_model;
    *opt = Optimizer::new(cfg.optimizer, model, extra_params)?;
    for (name, var) in &opt.params {
        if name.starts_with("extra/") {
            let t = slots
                .get(name.as_str())
                .ok_or_else(|| CoreError::file(path, format!("the trained `{name}` is missing")))?;
            if t.dims() != var.dims() {
                return Err(CoreError::file(
                    path,
                    format!(
                        "`{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(t)?;
        }
    }
    opt.restore(&slots, state.optimizer_steps)
        .map_err(|e| CoreError::file(path, e))?;
    Ok((state.epochs_done, state.steps_done, state.partial))
}

/// The error of a loss that is no longer finite at `(epoch, step, batches)`, naming the last
/// good checkpoint (epochs done, steps of the next) where there is one.
fn diverged(
    l: f64,
    (epoch, step, batches): (usize, usize, usize),
    checkpoint: Option<&Path>,
    last: Option<(usize, usize)>,
) -> CoreError {
    let mut msg = format!(
        "the loss became {l} at epoch {}, step {} of {batches}; lower the learning rate",
        epoch + 1,
        step + 1
    );
    if let (Some(path), Some((e, s))) = (checkpoint, last) {
        let at = if s == 0 {
            format!("after epoch {e}")
        } else {
            format!("at epoch {}, step {s}", e + 1)
        };
        msg.push_str(&format!(
            ". The last good checkpoint, {} ({at}), is kept: --resume goes on from it with \
             the same recipe",
            path.display()
        ));
    }
    CoreError::Invalid(msg)
}

/// One optimizer step on `batch` at learning rate `lr` (dropout drawn from `seed`): the
/// forward, the cross-entropy (with labels) and the extra terms, the backward pass and the
/// update; the loss and the logits.
fn train_step(
    model: &Model,
    opts: &mut TrainOptions<'_>,
    opt: &mut Optimizer,
    cfg: &TrainConfig,
    batch: &crate::data::Batch,
    taps: &[String],
    (lr, seed): (f64, u64),
) -> Result<(f64, Tensor)> {
    let mut fopts = ForwardOptions::default()
        .with_taps(taps)
        .with_dropout_seed(seed);
    fopts.kernels = opts.kernels;
    let out = model.forward_with(std::slice::from_ref(&batch.images), Mode::Train, fopts)?;
    let logits = &out.outputs[0];
    let mut loss = if opts.label_free {
        None
    } else {
        Some(candle_nn::loss::cross_entropy(logits, &batch.labels)?)
    };
    for term in opts.extra.iter_mut() {
        let extra = term.loss(batch, &out)?;
        loss = Some(match loss {
            Some(l) => (l + extra)?,
            None => extra,
        });
    }
    // Checked above: a label-free run has a term.
    let loss = loss.ok_or_else(|| CoreError::Invalid("no loss to train on".into()))?;
    let grads = loss.backward()?;
    opt.step(&grads, lr, cfg)?;
    let l = f64::from(loss.to_scalar::<f32>()?);
    Ok((l, logits.clone()))
}

/// A checkpoint's state: `epochs_done`, the steps of the next and their running figures.
fn train_state(
    (epochs_done, steps_done, partial): (usize, usize, Partial),
    opt: &Optimizer,
    cfg: &TrainConfig,
    data: &DataSplits,
    terms: &[String],
) -> TrainState {
    TrainState {
        epochs_done,
        steps_done,
        partial,
        optimizer_steps: opt.steps,
        config: cfg.clone(),
        data: data.spec.clone(),
        terms: terms.to_vec(),
    }
}

/// An epoch's report from its running figures (`seconds` its whole time).
fn epoch_report(
    epoch: usize,
    f: &Partial,
    label_free: bool,
    test: Option<EvalReport>,
) -> EpochReport {
    EpochReport {
        epoch,
        loss: f.loss_sum / f.seen.max(1) as f64,
        train_top1: (!label_free).then(|| f.correct as f64 / f.seen.max(1) as f64),
        test,
        seconds: f.seconds,
        images_per_sec: f.seen as f64 / f.seconds.max(1e-9),
    }
}

/// Trains `model` on `data.train` with `cfg`. On resume, the model is replaced by the one in
/// the checkpoint and training continues after its last finished epoch.
pub fn train(
    model: &mut Model,
    data: &DataSplits,
    cfg: &TrainConfig,
    mut opts: TrainOptions<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainReport> {
    cfg.validate()?;
    let label_free = opts.label_free || !data.train.is_labeled();
    opts.label_free = label_free;
    check_fit(model, data, cfg, label_free, !opts.extra.is_empty())?;

    let extra_params: Vec<(String, Var)> = opts.extra.iter().flat_map(|t| t.params()).collect();
    let terms: Vec<String> = opts.extra.iter().map(|t| t.fingerprint()).collect();
    let mut opt = Optimizer::new(cfg.optimizer, model, &extra_params)?;
    opts.checkpoint_every.check()?;
    let mut start_epoch = 0;
    let (mut start_step, mut partial) = (0, Partial::default());
    if let (true, Some(path)) = (opts.resume, &opts.checkpoint) {
        if path.exists() {
            let ctx = (
                cfg,
                data.spec.as_str(),
                terms.as_slice(),
                extra_params.as_slice(),
            );
            (start_epoch, start_step, partial) = resume(path, model, &mut opt, ctx)?;
        }
    }

    let train_set: Arc<dyn Dataset> = Arc::new(data.train.clone());
    let loader_cfg = LoaderConfig::training(data, cfg.batch_size, cfg.seed);
    let mut report = TrainReport {
        epochs: Vec::new(),
        resumed_from: start_epoch,
        resumed_at_step: start_step,
    };
    let mut run = Run {
        taps: opts.extra.iter().flat_map(|t| t.taps()).collect(),
        model,
        data,
        cfg,
        opts,
        opt,
        terms,
        train_set,
        loader_cfg,
        last_checkpoint: ((start_epoch, start_step) != (0, 0)).then_some((start_epoch, start_step)),
        since_checkpoint: (0, Instant::now()),
    };
    for epoch in start_epoch..cfg.epochs {
        // A run resumed within this epoch skips the steps its checkpoint had taken (the
        // batches come in the same order) and carries on the epoch's figures.
        let (skip, before) = match epoch == start_epoch && start_step > 0 {
            true => (start_step, partial),
            false => (0, Partial::default()),
        };
        report
            .epochs
            .push(run.epoch(epoch, skip, before, progress)?);
    }
    Ok(report)
}

/// A training run under way: what its steps read, and what they change.
struct Run<'r, 'o> {
    model: &'r mut Model,
    data: &'r DataSplits,
    cfg: &'r TrainConfig,
    opts: TrainOptions<'o>,
    opt: Optimizer,
    /// The nodes the extra terms read, and the terms' fingerprints.
    taps: Vec<String>,
    terms: Vec<String>,
    train_set: Arc<dyn Dataset>,
    loader_cfg: LoaderConfig,
    /// Where the last checkpoint was written (epochs done, steps of the next), for messages.
    last_checkpoint: Option<(usize, usize)>,
    /// Steps since the last checkpoint, and when it was written.
    since_checkpoint: (usize, Instant),
}

impl Run<'_, '_> {
    /// Epoch `epoch` from step `skip` on, carrying on the figures `before`; its report.
    fn epoch(
        &mut self,
        epoch: usize,
        skip: usize,
        before: Partial,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<EpochReport> {
        let device = self.model.device();
        let loader = Loader::new(
            self.train_set.clone(),
            &self.loader_cfg,
            epoch as u64,
            &device,
        )?;
        let batches = loader.len();
        if !self.opts.extra.is_empty() {
            let plan =
                crate::data::epoch_plan(self.train_set.len(), &self.loader_cfg, epoch as u64);
            for term in self.opts.extra.iter_mut() {
                term.epoch_start(&plan)?;
            }
        }
        progress(&Progress::EpochStart {
            epoch,
            epochs: self.cfg.epochs,
            batches,
        });
        let started = Instant::now();
        let mut fig = before;
        let label_free = self.opts.label_free;
        for (step, batch) in loader.enumerate().skip(skip) {
            let batch = batch?;
            let lr = self.cfg.lr_at(epoch * batches + step, batches);
            let seed = crate::data::mix(self.cfg.seed, epoch as u64, step as u64 + 1);
            let (l, logits) = train_step(
                self.model,
                &mut self.opts,
                &mut self.opt,
                self.cfg,
                &batch,
                &self.taps,
                (lr, seed),
            )?;
            if !l.is_finite() {
                let at = (epoch, step, batches);
                let path = self.opts.checkpoint.as_deref();
                return Err(diverged(l, at, path, self.last_checkpoint));
            }
            let b = batch.labels.dim(0)?;
            fig.loss_sum += l * b as f64;
            if !label_free {
                fig.correct += count_hits(&logits, &batch.labels, 1)?;
            }
            fig.seen += b;
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            self.since_checkpoint.0 += 1;
            let (steps, since) = self.since_checkpoint;
            if self.opts.checkpoint_every.due(steps, since) && step + 1 < batches {
                fig.seconds = before.seconds + started.elapsed().as_secs_f64();
                self.checkpoint((epoch, step + 1, fig))?;
            }
            progress(&Progress::Step {
                epoch,
                step,
                batches,
                loss: fig.loss_sum / fig.seen as f64,
                accuracy: (!label_free).then(|| fig.correct as f64 / fig.seen as f64),
                images_per_sec: fig.seen as f64 / secs,
                lr,
            });
        }
        fig.seconds = before.seconds + started.elapsed().as_secs_f64();
        let test = if self.opts.eval_each_epoch && self.data.test.is_labeled() {
            let d = self.data;
            Some(evaluate(self.model, &d.test, &d.normalize, 256)?)
        } else {
            None
        };
        let er = epoch_report(epoch, &fig, label_free, test);
        self.checkpoint((epoch + 1, 0, Partial::default()))?;
        progress(&Progress::EpochEnd {
            epoch,
            report: er.clone(),
        });
        Ok(er)
    }

    /// Writes the checkpoint, where there is one: `epochs_done`, the steps of the next and
    /// their running figures.
    fn checkpoint(&mut self, at: (usize, usize, Partial)) -> Result<()> {
        let Some(path) = &self.opts.checkpoint else {
            return Ok(());
        };
        let state = train_state(at, &self.opt, self.cfg, self.data, &self.terms);
        save_checkpoint(path, self.model, &self.opt, &state)?;
        self.last_checkpoint = Some((at.0, at.1));
        self.since_checkpoint = (0, Instant::now());
        Ok(())
    }
}

/// How many rows have their label among the `k` largest logits.
fn count_hits(logits: &Tensor, labels: &Tensor, k: usize) -> Result<usize> {
    if k == 1 {
        let pred = logits.argmax(D::Minus1)?;
        return Ok(pred
            .eq(labels)?
            .to_dtype(candle_core::DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize);
    }
    let rows = logits.detach().to_vec2::<f32>()?;
    let labels = labels.to_vec1::<u32>()?;
    let mut hits = 0;
    for (row, &l) in rows.iter().zip(&labels) {
        let Some(&target) = row.get(l as usize) else {
            return Err(CoreError::Invalid(format!(
                "the model gives {} scores per sample, and a label is {l}",
                row.len()
            )));
        };
        // Rank of the label: how many logits beat it (ties count for the label).
        if row.iter().filter(|&&v| v > target).count() < k {
            hits += 1;
        }
    }
    Ok(hits)
}

/// Top-1 and top-5 accuracy of a model on a data set, in eval mode.
pub fn evaluate(
    model: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<EvalReport> {
    // The batch norms folded and the weights laid out once for the whole pass.
    let prepared = model.prepare_eval(false)?;
    evaluate_with(model, set, normalize, batch_size, &|m, x| {
        let opts = ForwardOptions {
            prepared: Some(&prepared),
            ..Default::default()
        };
        let out = m.forward_with(std::slice::from_ref(x), Mode::Eval, opts)?;
        out.outputs
            .into_iter()
            .next()
            .ok_or_else(|| CoreError::Invalid("the graph has no output".into()))
    })
}

/// The batches of `set` in order, once, for models that read it (each named for errors): the
/// set must not be empty and every model must take its images' shape.
fn eval_loader(
    models: &[(&str, &Model)],
    set: &ImageSet,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<Loader> {
    if set.is_empty() {
        return Err(CoreError::Invalid("the evaluation set is empty".into()));
    }
    for (who, m) in models {
        let shape = m.input_shape();
        if shape != set.shape.to_vec() {
            return Err(CoreError::Invalid(format!(
                "the {who} takes inputs of shape {shape:?}, the data has {:?}",
                set.shape
            )));
        }
    }
    let data: Arc<dyn Dataset> = Arc::new(set.clone());
    let cfg = LoaderConfig {
        batch_size,
        shuffle: None,
        augment: Default::default(),
        normalize: normalize.clone(),
        drop_last: false,
    };
    let device = models
        .first()
        .map(|(_, m)| m.device())
        .unwrap_or(Device::Cpu);
    Loader::new(data, &cfg, 0, &device)
}

/// A forward used for evaluation: the model's own, or another runtime's.
pub type EvalForward<'a> = dyn Fn(&Model, &Tensor) -> Result<Tensor> + 'a;

/// Top-1 and top-5 accuracy with the logits computed by `forward`.
pub fn evaluate_with(
    model: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    batch_size: usize,
    forward: &EvalForward<'_>,
) -> Result<EvalReport> {
    let loader = eval_loader(&[("model", model)], set, normalize, batch_size)?;
    let out_shape = &model.graph.node(model.graph.outputs()[0]).shape;
    if !matches!(out_shape[..], [k] if k >= set.classes) {
        return Err(CoreError::Invalid(format!(
            "the model outputs {out_shape:?}, the data has {} classes",
            set.classes
        )));
    }
    let started = Instant::now();
    let (mut top1, mut top5, mut n) = (0, 0, 0);
    for batch in loader {
        let batch = batch?;
        let logits = forward(model, &batch.images)?;
        let classes = logits.dim(1)?;
        top1 += count_hits(&logits, &batch.labels, 1)?;
        top5 += count_hits(&logits, &batch.labels, 5.min(classes))?;
        n += batch.labels.dim(0)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(EvalReport {
        top1: top1 as f64 / n as f64,
        top5: top5 as f64 / n as f64,
        samples: n,
        seconds,
        samples_per_sec: n as f64 / seconds.max(1e-9),
    })
}

/// How closely one output of a model reproduces the same output of a reference model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OutputFidelity {
    /// The output node.
    pub output: String,
    /// For per-sample vectors (a classifier's scores): the share of samples whose largest
    /// entry is at the reference's.
    pub top1_agreement: Option<f64>,
    /// The mean over samples of `|y - r| / |r|` (Euclidean norms of each sample's output).
    pub relative_l2: f64,
    /// The mean over samples of the cosine similarity of `y` and `r`.
    pub cosine: f64,
}

/// Quality without labels: how closely a model reproduces a reference model (its original,
/// before compression) on a data set, output by output.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Fidelity {
    pub samples: usize,
    pub outputs: Vec<OutputFidelity>,
}

impl Fidelity {
    /// The first output's top-1 agreement, else its cosine similarity: one figure for tables.
    pub fn headline(&self) -> f64 {
        self.outputs
            .first()
            .map(|o| o.top1_agreement.unwrap_or(o.cosine))
            .unwrap_or(0.0)
    }

    /// The figures as table rows (label, value), in the order to show them: agreement with
    /// the original for score vectors, cosine similarity for other outputs.
    pub fn rows(&self) -> Vec<(String, String)> {
        let many = self.outputs.len() > 1;
        self.outputs
            .iter()
            .rev()
            .map(|o| {
                let name = if many {
                    format!(" ({})", o.output)
                } else {
                    String::new()
                };
                match o.top1_agreement {
                    Some(a) => (
                        format!("agreement with the original{name}"),
                        format!("{:.2}%", a * 100.0),
                    ),
                    None => (
                        format!("cosine to the original{name}"),
                        format!("{:.4}", o.cosine),
                    ),
                }
            })
            .collect()
    }
}

/// A forward that gives every output of the model (or the first ones).
pub type OutputsForward<'a> = dyn Fn(&Model, &Tensor) -> Result<Vec<Tensor>> + 'a;

/// [`fidelity_with`] with the model's own evaluation forward.
pub fn fidelity(
    model: &Model,
    reference: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<Fidelity> {
    let prepared = model.prepare_eval(false)?;
    fidelity_with(model, reference, set, normalize, batch_size, &|m, x| {
        let opts = ForwardOptions {
            prepared: Some(&prepared),
            ..Default::default()
        };
        Ok(m.forward_with(std::slice::from_ref(x), Mode::Eval, opts)?
            .outputs)
    })
}

/// How closely the outputs `forward` computes for `model` reproduce `reference`'s on `set`
/// (every output `forward` gives, compared with the reference's output at the same place).
pub fn fidelity_with(
    model: &Model,
    reference: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    batch_size: usize,
    forward: &OutputsForward<'_>,
) -> Result<Fidelity> {
    let loader = eval_loader(
        &[("model", model), ("reference model", reference)],
        set,
        normalize,
        batch_size,
    )?;
    let names: Vec<String> = model
        .graph
        .outputs()
        .iter()
        .map(|&o| model.graph.node(o).name.clone())
        .collect();
    let prepared = reference.prepare_eval(false)?;
    // Per output: agreeing samples, summed relative errors, summed cosines, vector or not.
    let mut sums: Vec<(usize, f64, f64, bool)> = Vec::new();
    let mut n = 0;
    for batch in loader {
        let batch = batch?;
        let ys = forward(model, &batch.images)?;
        let opts = ForwardOptions {
            prepared: Some(&prepared),
            ..Default::default()
        };
        let rs = reference
            .forward_with(std::slice::from_ref(&batch.images), Mode::Eval, opts)?
            .outputs;
        if ys.len() > rs.len() {
            return Err(CoreError::Invalid(format!(
                "the model has {} outputs, the reference model {}",
                ys.len(),
                rs.len()
            )));
        }
        if sums.is_empty() {
            sums = ys.iter().map(|y| (0, 0.0, 0.0, y.rank() == 2)).collect();
        }
        for (i, (y, r)) in ys.iter().zip(&rs).enumerate() {
            if y.dims() != r.dims() {
                return Err(CoreError::Invalid(format!(
                    "output {} (`{}`) has shape {:?}, the reference's {:?}",
                    i + 1,
                    names.get(i).map(String::as_str).unwrap_or("?"),
                    &y.dims()[1..],
                    &r.dims()[1..]
                )));
            }
            let b = y.dim(0)?;
            let y = y
                .flatten_from(1)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2::<f32>()?;
            let r = r
                .flatten_from(1)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2::<f32>()?;
            for (yv, rv) in y.iter().zip(&r).take(b) {
                let (mut dd, mut rr, mut yy, mut yr) = (0f64, 0f64, 0f64, 0f64);
                for (&a, &c) in yv.iter().zip(rv) {
                    let (a, c) = (f64::from(a), f64::from(c));
                    dd += (a - c) * (a - c);
                    rr += c * c;
                    yy += a * a;
                    yr += a * c;
                }
                let s = &mut sums[i];
                s.1 += dd.sqrt() / rr.sqrt().max(1e-12);
                s.2 += if yy == 0.0 && rr == 0.0 {
                    1.0
                } else {
                    yr / (yy.sqrt() * rr.sqrt()).max(1e-30)
                };
                if s.3 && argmax(yv) == argmax(rv) {
                    s.0 += 1;
                }
            }
        }
        n += batch.images.dim(0)?;
    }
    let n_f = n.max(1) as f64;
    Ok(Fidelity {
        samples: n,
        outputs: sums
            .into_iter()
            .enumerate()
            .map(|(i, (agree, rel, cos, vector))| OutputFidelity {
                output: names.get(i).cloned().unwrap_or_default(),
                top1_agreement: vector.then_some(agree as f64 / n_f),
                relative_l2: rel / n_f,
                cosine: cos / n_f,
            })
            .collect(),
    })
}

/// The index of the largest value (the first of equal ones).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Recomputes every batch norm's running statistics from `set` (in order, `batch_size` images
/// at a time), as the average of the batch statistics: after pruning, the layers that follow a
/// pruned one see other activations than their stored statistics describe, and accuracy
/// measured without this step says more about stale statistics than about the pruned
/// channels (Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network
/// Pruning", ECCV 2020). Only the running statistics change. Returns the number of batches
/// used (0 when the model has no batch norm).
pub fn recalibrate_batch_norm(
    model: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<usize> {
    let has_bn = model
        .graph
        .nodes()
        .iter()
        .any(|n| matches!(n.op, crate::graph::Op::BatchNorm2d(_)));
    if !has_bn || set.is_empty() {
        return Ok(0);
    }
    let data: Arc<dyn Dataset> = Arc::new(set.clone());
    let cfg = LoaderConfig {
        batch_size: batch_size.max(2),
        shuffle: None,
        augment: Default::default(),
        normalize: normalize.clone(),
        drop_last: false,
    };
    let mut used = 0;
    for batch in Loader::new(data, &cfg, 0, &model.device())? {
        let batch = batch?;
        if batch.labels.dim(0)? < 2 {
            continue;
        }
        // Momentum 1/(k+1) at batch k makes the running value the plain average of batches.
        let m = 1.0 / (used as f64 + 1.0);
        let graph = model.graph.map_ops(|n| match &n.op {
            crate::graph::Op::BatchNorm2d(b) => {
                let mut b = b.clone();
                b.momentum = m;
                crate::graph::Op::BatchNorm2d(b)
            }
            other => other.clone(),
        })?;
        let view = Model {
            graph,
            params: model.params.clone(),
            provenance: Default::default(),
            int8: Default::default(),
        };
        view.forward(&batch.images.detach(), Mode::Train)?;
        used += 1;
    }
    Ok(used)
}

/// Top-1 accuracy on an image set, as a search [`Evaluator`](crate::search::Evaluator).
pub struct Top1 {
    pub set: ImageSet,
    pub normalize: Normalize,
    pub batch_size: usize,
}

impl crate::search::Evaluator for Top1 {
    fn score(&self, model: &Model) -> Result<f64> {
        Ok(evaluate(model, &self.set, &self.normalize, self.batch_size)?.top1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let c = TrainConfig::default()
            .with_lr(1.0)
            .with_epochs(10)
            .with_schedule(Schedule::Cosine);
        assert!((c.lr_at(0, 10) - 1.0).abs() < 1e-9);
        assert!((c.lr_at(50, 10) - 0.5).abs() < 1e-9);
        let s = TrainConfig {
            schedule: Schedule::Step {
                every: 3,
                gamma: 0.1,
            },
            ..c.clone()
        };
        assert!((s.lr_at(29, 10) - 1.0).abs() < 1e-9);
        assert!((s.lr_at(30, 10) - 0.1).abs() < 1e-9);
        let w = TrainConfig {
            warmup_epochs: 1,
            schedule: Schedule::Constant,
            ..c
        };
        assert!((w.lr_at(4, 10) - 0.5).abs() < 1e-9);
        assert!((w.lr_at(10, 10) - 1.0).abs() < 1e-9);
        assert_eq!(
            "step:10:0.5".parse::<Schedule>().unwrap(),
            Schedule::Step {
                every: 10,
                gamma: 0.5
            }
        );
        assert!("step:x".parse::<Schedule>().is_err());
        assert!(TrainConfig::default().with_lr(-1.0).validate().is_err());
    }

    #[test]
    fn top_k_counts() {
        let logits = Tensor::new(
            &[[0.1f32, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]],
            &Device::Cpu,
        )
        .unwrap();
        let labels = Tensor::new(&[1u32, 2, 0], &Device::Cpu).unwrap();
        assert_eq!(count_hits(&logits, &labels, 1).unwrap(), 1);
        assert_eq!(count_hits(&logits, &labels, 2).unwrap(), 2);
        assert_eq!(count_hits(&logits, &labels, 3).unwrap(), 3);
    }

    #[test]
    fn sgd_and_adam_match_hand_computed_steps() {
        // One parameter w = [1, -2], loss = sum(w^2) / 2, so the gradient is w.
        let g = crate::graph::GraphBuilder::new([2])
            .linear("fc", 1)
            .build()
            .unwrap();
        let m = Model::init(g, 0, &Device::Cpu).unwrap();
        m.params
            .set(
                "fc.weight",
                &Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap(),
            )
            .unwrap();
        let cfg = TrainConfig {
            momentum: 0.5,
            nesterov: true,
            weight_decay: 0.1,
            ..TrainConfig::default()
        };
        let mut opt = Optimizer::new(OptimizerKind::Sgd, &m, &[]).unwrap();
        for _ in 0..2 {
            let w = m.params.tensor("fc.weight").unwrap();
            let grads = (w.sqr().unwrap().sum_all().unwrap() * 0.5)
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&grads, 0.1, &cfg).unwrap();
        }
        // Step 1: g'=1.1w, buf=1.1w, d=g'+0.5buf=1.65w, w1=w(1-0.165)=0.835w.
        // Step 2: g'=1.1*0.835w=0.9185w, buf=0.5*1.1w+0.9185w=1.4685w,
        //         d=0.9185w+0.73425w=1.65275w, w2=0.835w-0.165275w=0.669725w.
        let w = m
            .params
            .tensor("fc.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (w[0] - 0.669725).abs() < 1e-6 && (w[1] + 2.0 * 0.669725).abs() < 1e-5,
            "{w:?}"
        );

        m.params
            .set(
                "fc.weight",
                &Tensor::new(&[[1f32, -2.0]], &Device::Cpu).unwrap(),
            )
            .unwrap();
        let mut adam = Optimizer::new(OptimizerKind::Adam, &m, &[]).unwrap();
        let w0 = m.params.tensor("fc.weight").unwrap();
        let grads = (w0.sqr().unwrap().sum_all().unwrap() * 0.5)
            .unwrap()
            .backward()
            .unwrap();
        adam.step(&grads, 0.01, &TrainConfig::default()).unwrap();
        // The first Adam step moves every coordinate by lr against the gradient's sign.
        let w = m
            .params
            .tensor("fc.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (w[0] - 0.99).abs() < 1e-6 && (w[1] + 1.99).abs() < 1e-6,
            "{w:?}"
        );
    }

    /// The optimizer's state after a step keeps no graph: nothing reaches the parameters
    /// from its slots (a slot that did would keep every step's activations alive).
    #[test]
    fn optimizer_state_keeps_no_graph() {
        let g = crate::graph::GraphBuilder::new([3])
            .linear("fc", 2)
            .build()
            .unwrap();
        let m = Model::init(g, 0, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[1f32, -2.0, 0.5]], &Device::Cpu).unwrap();
        let cfg = TrainConfig {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.01,
            ..TrainConfig::default()
        };
        for kind in [
            OptimizerKind::Sgd,
            OptimizerKind::Adam,
            OptimizerKind::AdamW,
        ] {
            let mut opt = Optimizer::new(kind, &m, &[]).unwrap();
            for _ in 0..2 {
                let y = m.forward(&x, Mode::Train).unwrap();
                let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                opt.step(&grads, 0.1, &cfg).unwrap();
            }
            let weight = m.params.tensor("fc.weight").unwrap();
            for slot in opt.slots.iter().flatten() {
                let reached = slot.sum_all().unwrap().backward().unwrap();
                assert!(
                    reached.get(&weight).is_none(),
                    "{kind:?}: a slot reaches the weights"
                );
            }
        }
    }
}
