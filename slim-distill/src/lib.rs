//! # slim-distill
//!
//! Knowledge distillation: a small student learns from one or several teachers through
//! losses between named nodes of their graphs, on top of the core training loop (the losses
//! are an extra loss term; cross-entropy on the labels stays).
//!
//! - Pairs name nodes as the graphs name them (`slim info` lists them); nothing is renamed.
//!   Names and shapes are checked before any training, with suggestions for a misspelt name.
//! - Losses ([`losses`]): soft label with a temperature, L2 (with a learned 1x1 adapter when
//!   channel counts differ), FSP, and any [`DistillLoss`] of the user's.
//! - Teachers ([`Teacher`]) run in eval mode without gradients, or are replaced by their
//!   outputs precomputed to files ([`knowledge`]), so that training needs no teacher in memory.
//! - [`run`]: the one entrance, [`run::run`]: options in ([`run::DistillOptions`], the names of
//!   `slim distill`'s flags and of a pipeline stage's keys), the teachers opened and checked,
//!   the student trained and measured, a typed [`run::RunReport`] out. The pipeline's
//!   `distill` stage ([`strategy`]) is it.
//!
//! ```
//! use slim_core::{zoo, Mode};
//! use slim_distill::{Distiller, Teacher};
//! let dev = candle_core::Device::Cpu;
//! let cfg = zoo::ZooConfig::new([1, 28, 28]);
//! let teacher = zoo::model("lenet", &cfg, 1, &dev).unwrap();
//! let student = zoo::model("lenet", &cfg.clone().with_width(0.5), 2, &dev).unwrap();
//! let d = Distiller::from_specs(
//!     &student,
//!     vec![Teacher::model(teacher, "teacher")],
//!     &["soft_label:temperature=4".parse().unwrap()],
//! )
//! .unwrap();
//! assert_eq!(d.loss_names(), ["soft_label(T=4)"]);
//! ```
#![forbid(unsafe_code)]

pub mod knowledge;
pub mod losses;
pub mod run;
pub mod strategy;

use std::collections::BTreeSet;

use candle_core::{Tensor, Var};
use slim_core::data::{Batch, DataSplits};
use slim_core::train::{train, LossTerm, Progress, TrainConfig, TrainOptions, TrainReport};
use slim_core::{ForwardOptions, ForwardOutput, Graph, Mode, Model};

pub use knowledge::{dump, DumpReport, Knowledge};
pub use losses::{DistillLoss, LossSpec, Shapes, Taps, TeacherView};

/// The error type of `slim-distill`.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
    /// A request that cannot be honoured: an unknown node, incompatible shapes, a bad value.
    #[error("{0}")]
    Invalid(String),
}

impl DistillError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            DistillError::Core(c) => c.is_input(),
            DistillError::Invalid(_) => true,
        }
    }
}

impl From<candle_core::Error> for DistillError {
    fn from(e: candle_core::Error) -> Self {
        DistillError::Core(e.into())
    }
}

/// The result type of `slim-distill`.
pub type Result<T, E = DistillError> = std::result::Result<T, E>;

/// "the teacher `t.safetensors` has no node `x`; close names: ..." (`who` names the model).
pub(crate) fn unknown_node(who: &str, name: &str, g: &Graph) -> DistillError {
    let close = g.similar_names(name);
    let hint = if close.is_empty() {
        " (`slim info` lists the nodes)".to_string()
    } else {
        format!("; close names: {}", close.join(", "))
    };
    DistillError::Invalid(format!("the {who} has no node `{name}`{hint}"))
}

fn graph_shapes(g: &Graph) -> Shapes {
    g.nodes()
        .iter()
        .map(|n| (n.name.clone(), n.shape.clone()))
        .collect()
}

/// A teacher that runs elsewhere (another process, another machine) and answers with its
/// outputs for the samples asked. The student's data must be the data it serves, in the same
/// order (a data fingerprint is checked).
pub trait RemoteTeacher: Send {
    /// The teacher in words, for messages.
    fn label(&self) -> String;
    /// The per-sample shapes of the nodes it serves.
    fn shapes(&self) -> &Shapes;
    /// Its output node.
    fn output(&self) -> &str;
    /// Its model's fingerprint.
    fn fingerprint(&self) -> String;
    /// The fingerprint of the training split it serves (compared with the student's).
    fn data_fingerprint(&self) -> String;
    /// The batches of the coming epoch, in order, and the nodes that will be asked: the
    /// teacher may be asked for them ahead of use.
    fn plan(&mut self, batches: &[Vec<usize>], nodes: &[String]) -> Result<()>;
    /// The outputs of `nodes` for the samples `indices`, rows in that order.
    fn fetch(&mut self, indices: &[usize], nodes: &[String]) -> Result<Taps>;
}

/// Where a teacher's outputs come from.
pub enum Teacher {
    /// A model run alongside the student, in eval mode.
    Model {
        model: Model,
        label: String,
        shapes: Shapes,
        output: String,
    },
    /// Outputs precomputed by [`dump`].
    Knowledge(Knowledge),
    /// Outputs computed by a teacher served elsewhere.
    Remote(Box<dyn RemoteTeacher>),
}

impl Teacher {
    pub fn model(model: Model, label: impl Into<String>) -> Teacher {
        let shapes = graph_shapes(&model.graph);
        let output = model.graph.node(model.graph.outputs()[0]).name.clone();
        Teacher::Model {
            model,
            label: label.into(),
            shapes,
            output,
        }
    }

    pub fn label(&self) -> String {
        match self {
            Teacher::Model { label, .. } => label.clone(),
            Teacher::Knowledge(k) => k.dir.display().to_string(),
            Teacher::Remote(r) => r.label(),
        }
    }

    fn view(&self) -> (String, &Shapes, &str) {
        match self {
            Teacher::Model {
                label,
                shapes,
                output,
                ..
            } => (label.clone(), shapes, output),
            Teacher::Knowledge(k) => (self.label(), k.shapes(), &k.meta.output),
            Teacher::Remote(r) => (r.label(), r.shapes(), r.output()),
        }
    }

    fn missing(&self, name: &str) -> DistillError {
        match self {
            Teacher::Model { model, label, .. } => {
                unknown_node(&format!("teacher `{label}`"), name, &model.graph)
            }
            Teacher::Knowledge(k) => DistillError::Invalid(format!(
                "the knowledge in {} holds the nodes {}, not `{name}`; dump it again with --node {name}",
                k.dir.display(),
                k.meta.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            Teacher::Remote(r) => {
                let mut served: Vec<&String> = r.shapes().keys().collect();
                served.sort();
                DistillError::Invalid(format!(
                    "the teacher {} serves the nodes {}, not `{name}`; serve it with --nodes {name}",
                    r.label(),
                    served.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ))
            }
        }
    }

    fn taps(&mut self, batch: &Batch, nodes: &[String]) -> Result<Taps> {
        match self {
            Teacher::Model { model, .. } => {
                let out = model.forward_with(
                    std::slice::from_ref(&batch.images),
                    Mode::Eval,
                    ForwardOptions::default().with_taps(nodes),
                )?;
                Ok(out.taps.into_iter().map(|(n, t)| (n, t.detach())).collect())
            }
            Teacher::Knowledge(k) => k.gather(batch, nodes),
            Teacher::Remote(r) => {
                let device = batch.images.device();
                r.fetch(&batch.indices, nodes)?
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.to_device(device)?)))
                    .collect()
            }
        }
    }
}

/// The distillation loss term: teachers, losses, and the running mean of every loss.
pub struct Distiller {
    teachers: Vec<Teacher>,
    losses: Vec<Box<dyn DistillLoss>>,
    student_taps: Vec<String>,
    teacher_taps: Vec<Vec<String>>,
    /// One distinct name per loss.
    names: Vec<String>,
    fingerprint: String,
    sums: Vec<f64>,
    steps: usize,
}

/// Names that tell the losses apart: a name that repeats gets its teacher (`@1`), and then a
/// count (`#2`) where that is not enough.
fn distinct_names(losses: &[Box<dyn DistillLoss>]) -> Vec<String> {
    let count = |names: &[String], n: &str| names.iter().filter(|m| m.as_str() == n).count();
    let base: Vec<String> = losses.iter().map(|l| l.name()).collect();
    let with_teacher: Vec<String> = losses
        .iter()
        .zip(&base)
        .map(|(l, n)| match l.teacher_nodes().first() {
            Some((t, _)) if count(&base, n) > 1 => format!("{n}@{t}"),
            _ => n.clone(),
        })
        .collect();
    let mut seen: Vec<String> = Vec::new();
    with_teacher
        .iter()
        .map(|n| {
            let k = count(&seen, n);
            seen.push(n.clone());
            if k == 0 {
                n.clone()
            } else {
                format!("{n}#{}", k + 1)
            }
        })
        .collect()
}

impl Distiller {
    /// Checks every loss's nodes and shapes against the student and the teachers.
    pub fn new(
        student: &Model,
        teachers: Vec<Teacher>,
        losses: Vec<Box<dyn DistillLoss>>,
    ) -> Result<Distiller> {
        if teachers.is_empty() {
            return Err(DistillError::Invalid("distillation needs a teacher".into()));
        }
        if losses.is_empty() {
            return Err(DistillError::Invalid(
                "distillation needs at least one loss".into(),
            ));
        }
        for t in &teachers {
            if let Teacher::Model { model, label, .. } = t {
                if model.input_shape() != student.input_shape() {
                    return Err(DistillError::Invalid(format!(
                        "the teacher `{label}` takes inputs of shape {:?}, the student {:?}",
                        model.input_shape(),
                        student.input_shape()
                    )));
                }
            }
        }
        let student_shapes = graph_shapes(&student.graph);
        let mut student_taps = BTreeSet::new();
        let mut teacher_taps = vec![BTreeSet::new(); teachers.len()];
        for loss in &losses {
            for n in loss.student_nodes() {
                if !student_shapes.contains_key(&n) {
                    return Err(unknown_node("student", &n, &student.graph));
                }
                student_taps.insert(n);
            }
            for (i, n) in loss.teacher_nodes() {
                let t = teachers.get(i).ok_or_else(|| {
                    DistillError::Invalid(format!(
                        "the loss {} reads teacher {i}, there are {}",
                        loss.name(),
                        teachers.len()
                    ))
                })?;
                if !t.view().1.contains_key(&n) {
                    return Err(t.missing(&n));
                }
                teacher_taps[i].insert(n);
            }
        }
        let views: Vec<(String, &Shapes, &str)> = teachers.iter().map(Teacher::view).collect();
        let views: Vec<TeacherView<'_>> = views
            .iter()
            .map(|(label, shapes, output)| TeacherView {
                label,
                shapes,
                output,
            })
            .collect();
        for loss in &losses {
            loss.check(&student_shapes, &views)?;
        }
        let n = losses.len();
        let names = distinct_names(&losses);
        let mut fingerprint = names.join(",");
        for t in &teachers {
            let fp = match t {
                Teacher::Model { model, .. } => model.fingerprint()?,
                Teacher::Knowledge(k) => k.meta.teacher_fingerprint.clone(),
                Teacher::Remote(r) => r.fingerprint(),
            };
            let short: String = fp.chars().take(16).collect();
            fingerprint.push_str(&format!(" teacher:{short}"));
        }
        Ok(Distiller {
            names,
            fingerprint,
            teachers,
            losses,
            student_taps: student_taps.into_iter().collect(),
            teacher_taps: teacher_taps
                .into_iter()
                .map(|s| s.into_iter().collect())
                .collect(),
            sums: vec![0.0; n],
            steps: 0,
        })
    }

    /// Builds the losses from specs (see [`LossSpec`]) and checks them.
    pub fn from_specs(
        student: &Model,
        teachers: Vec<Teacher>,
        specs: &[LossSpec],
    ) -> Result<Distiller> {
        let student_shapes = graph_shapes(&student.graph);
        let output = student.graph.node(student.graph.outputs()[0]).name.clone();
        let views: Vec<(String, &Shapes, &str)> = teachers.iter().map(Teacher::view).collect();
        let views: Vec<TeacherView<'_>> = views
            .iter()
            .map(|(label, shapes, output)| TeacherView {
                label,
                shapes,
                output,
            })
            .collect();
        let losses = specs
            .iter()
            .enumerate()
            .map(|(i, s)| s.build(i, &student_shapes, &output, &views, &student.device()))
            .collect::<Result<Vec<_>>>()?;
        Distiller::new(student, teachers, losses)
    }

    /// The losses that make a compressed model reproduce its original, for training without
    /// labels: for every output of the original that the student has by name, soft labels
    /// (temperature 1) where the output is a vector per sample (a classifier's scores), L2
    /// where it is a map or any other shape (a detector's or segmenter's dense outputs).
    pub fn reproduce_specs(original: &Model, student: &Model) -> Result<Vec<LossSpec>> {
        let mut specs = Vec::new();
        for o in original.graph.outputs() {
            let node = original.graph.node(o);
            if student.graph.find(&node.name).is_none() {
                continue;
            }
            let text = if node.shape.len() == 1 {
                format!(
                    "soft_label:temperature=1,student={0},teacher={0}",
                    node.name
                )
            } else {
                format!("l2:student={0},teacher={0}", node.name)
            };
            specs.push(text.parse::<LossSpec>()?);
        }
        if specs.is_empty() {
            return Err(DistillError::Invalid(
                "the model has none of its original's outputs (by name) to reproduce".into(),
            ));
        }
        Ok(specs)
    }

    /// Refuses precomputed knowledge of another training split, and of a data set that is
    /// augmented in training: knowledge holds the teacher's outputs for the stored images,
    /// not for the randomly cropped or flipped ones the student would see.
    pub fn check_data(&self, data: &DataSplits) -> Result<()> {
        for t in &self.teachers {
            if let Teacher::Remote(r) = t {
                if r.data_fingerprint() != data.train.fingerprint() {
                    return Err(DistillError::Invalid(format!(
                        "the teacher {} serves another training split than `{}` (other images, \
                         order or --limit); start it with the student's data",
                        r.label(),
                        data.spec
                    )));
                }
                if data.augment != Default::default() {
                    return Err(DistillError::Invalid(format!(
                        "the data `{}` is augmented in training (random crops or flips), so the \
                         outputs of the teacher {} for the stored images would not match what \
                         the student sees; train without augmentation (--augment none) or use \
                         the teacher model",
                        data.spec,
                        r.label()
                    )));
                }
            }
            if let Teacher::Knowledge(k) = t {
                k.check_data(&data.train, &data.spec)?;
                if data.augment != Default::default() {
                    return Err(DistillError::Invalid(format!(
                        "the data `{}` is augmented in training (random crops or flips), so the outputs precomputed in {} would not match what the student sees; train without augmentation (--augment none) or use the teacher model",
                        data.spec,
                        k.dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// One name per loss, distinct (a repeated name gets `@TEACHER`, then `#N`).
    pub fn loss_names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// The mean of every loss (weighted) over the steps of this run so far (a resumed run
    /// counts from where it resumed), by name.
    pub fn loss_means(&self) -> Vec<(String, f64)> {
        self.names
            .iter()
            .zip(&self.sums)
            .map(|(l, s)| (l.clone(), s / self.steps.max(1) as f64))
            .collect()
    }

    pub fn teachers(&self) -> &[Teacher] {
        &self.teachers
    }
}

impl LossTerm for Distiller {
    fn name(&self) -> &str {
        "distill"
    }
    fn taps(&self) -> Vec<String> {
        self.student_taps.clone()
    }
    fn params(&self) -> Vec<(String, Var)> {
        self.losses.iter().flat_map(|l| l.params()).collect()
    }
    fn fingerprint(&self) -> String {
        format!("distill[{}]", self.fingerprint)
    }
    fn epoch_start(&mut self, plan: &[Vec<usize>]) -> slim_core::Result<()> {
        for (t, nodes) in self.teachers.iter_mut().zip(&self.teacher_taps) {
            if let Teacher::Remote(r) = t {
                if !nodes.is_empty() {
                    r.plan(plan, nodes).map_err(to_core)?;
                }
            }
        }
        Ok(())
    }
    fn loss(&mut self, batch: &Batch, out: &ForwardOutput) -> slim_core::Result<Tensor> {
        let mut run = || -> Result<Tensor> {
            let teacher_taps = self
                .teachers
                .iter_mut()
                .zip(&self.teacher_taps)
                .map(|(t, nodes)| {
                    if nodes.is_empty() {
                        Ok(Taps::new())
                    } else {
                        t.taps(batch, nodes)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let mut total: Option<Tensor> = None;
            for (loss, sum) in self.losses.iter().zip(self.sums.iter_mut()) {
                let v = loss.loss(&out.taps, &teacher_taps)?;
                *sum += f64::from(v.to_scalar::<f32>()?);
                total = Some(match total {
                    Some(t) => (t + v)?,
                    None => v,
                });
            }
            self.steps += 1;
            total.ok_or_else(|| DistillError::Invalid("no losses".into()))
        };
        run().map_err(|e| match e {
            DistillError::Core(c) => c,
            other => slim_core::CoreError::Invalid(other.to_string()),
        })
    }
}

fn to_core(e: DistillError) -> slim_core::CoreError {
    match e {
        DistillError::Core(c) => c,
        other => slim_core::CoreError::Invalid(other.to_string()),
    }
}

/// What a distillation run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DistillReport {
    pub train: TrainReport,
    /// The mean of every distillation loss over the run (weighted, as added to the loss).
    pub losses: Vec<(String, f64)>,
}

/// Trains `student` with the cross-entropy on the labels plus the distiller's losses.
pub fn distill(
    student: &mut Model,
    distiller: &mut Distiller,
    data: &DataSplits,
    cfg: &TrainConfig,
    opts: TrainOptions<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<DistillReport> {
    distiller.check_data(data)?;
    let TrainOptions {
        checkpoint,
        checkpoint_every,
        resume,
        eval_each_epoch,
        label_free,
        extra,
        kernels,
    } = opts;
    let mut terms: Vec<&mut dyn LossTerm> = Vec::new();
    for e in extra {
        terms.push(e);
    }
    terms.push(&mut *distiller);
    let opts = TrainOptions {
        checkpoint,
        checkpoint_every,
        resume,
        eval_each_epoch,
        label_free,
        extra: terms,
        kernels,
    };
    let train = train(student, data, cfg, opts, progress)?;
    Ok(DistillReport {
        train,
        losses: distiller.loss_means(),
    })
}
