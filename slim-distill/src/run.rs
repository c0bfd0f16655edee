//! One entrance to distillation: [`run`] opens the teachers named in the options (the
//! baseline, a zoo network trained first, model files, knowledge directories) beside any the
//! caller serves from elsewhere, checks them against the student and the data, builds the
//! losses, trains the student and measures it (its accuracy, or without labels its fidelity
//! to the first teacher model). It is the call behind `slim distill` and the pipeline's
//! `distill` stages.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use slim_core::data::DataSplits;
use slim_core::train::{
    evaluate, fidelity, CheckpointEvery, EvalReport, Fidelity, Progress, TrainConfig, TrainOptions,
    TrainReport,
};
use slim_core::Model;

use crate::{distill, DistillError, Distiller, Knowledge, LossSpec, Result, Teacher};

/// The options of distillation: a pipeline stage's table, and `slim distill`'s flags of the
/// same names. The defaults are here and nowhere else.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillOptions {
    /// The teachers, in `teacher_index` order: `baseline` (the caller's baseline model),
    /// `zoo:NAME` (a zoo network trained first with the recipe), a model file, or a knowledge
    /// directory from `slim distill dump`. One string or a list.
    #[serde(default = "default_teacher", deserialize_with = "one_or_more")]
    pub teacher: Vec<String>,
    /// Width multiplier of a `zoo:` teacher.
    #[serde(default = "default_width")]
    pub teacher_width: f64,
    /// Training epochs of a `zoo:` teacher (default: the recipe's).
    pub teacher_epochs: Option<usize>,
    /// Loss specs (see [`LossSpec`]). Default: soft labels at temperature 2 with labels;
    /// without them, every output of the first teacher model reproduced.
    #[serde(default)]
    pub loss: Vec<String>,
    /// Epochs (default: the recipe's).
    pub epochs: Option<usize>,
    /// Learning rate (default: the recipe's).
    pub lr: Option<f64>,
}

fn default_teacher() -> Vec<String> {
    vec!["baseline".into()]
}
fn default_width() -> f64 {
    1.0
}

/// The loss of a distillation on labels when none is given.
pub const DEFAULT_LOSS: &str = "soft_label:temperature=2";

fn one_or_more<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    Ok(match OneOrMore::deserialize(d)? {
        OneOrMore::One(s) => vec![s],
        OneOrMore::More(v) => v,
    })
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            teacher: default_teacher(),
            teacher_width: default_width(),
            teacher_epochs: None,
            loss: Vec::new(),
            epochs: None,
            lr: None,
        }
    }
}

impl DistillOptions {
    /// Checks the options before any work and parses the losses; node names are checked when
    /// the models are met. `what` names the caller in the messages.
    pub fn validate(&self, what: &str) -> Result<Vec<LossSpec>> {
        let bad = |m: String| Err(DistillError::Invalid(format!("{what}: {m}")));
        for t in &self.teacher {
            if let Some(name) = t.strip_prefix("zoo:") {
                if !slim_core::zoo::NAMES.contains(&name) {
                    return bad(format!(
                        "teacher `zoo:{name}`: not a zoo model ({})",
                        slim_core::zoo::NAMES.join(", ")
                    ));
                }
            } else if t != "baseline" && !Path::new(t).exists() {
                return bad(format!(
                    "teacher `{t}` is neither `baseline`, `zoo:NAME`, nor an existing model \
                     file or knowledge directory"
                ));
            }
        }
        if !(self.teacher_width > 0.0 && self.teacher_width.is_finite()) {
            return bad(format!(
                "`teacher_width` {} must be positive",
                self.teacher_width
            ));
        }
        for (name, v) in [
            ("teacher_epochs", self.teacher_epochs),
            ("epochs", self.epochs),
        ] {
            if v == Some(0) {
                return bad(format!("`{name}` must be at least 1"));
            }
        }
        if let Some(lr) = self.lr.filter(|lr| !(*lr > 0.0 && lr.is_finite())) {
            return bad(format!("`lr` {lr} must be positive"));
        }
        self.loss.iter().map(|s| s.parse::<LossSpec>()).collect()
    }
}

/// Reads a teacher's model file (the caller's reader: an ONNX importer, say).
pub type LoadModel<'a> = &'a dyn Fn(&Path) -> Result<Model>;

/// What a distillation works with besides its options.
pub struct Inputs<'a> {
    pub data: &'a DataSplits,
    /// The recipe (its epochs and learning rate replaced by the options').
    pub train: &'a TrainConfig,
    /// Train without labels (always so for data without them): the student learns from the
    /// teachers alone and is measured by its fidelity to the first teacher model.
    pub label_free: bool,
    /// The model the teacher `baseline` names.
    pub baseline: Option<&'a Model>,
    /// Where a `zoo:` teacher is kept once trained (so that a rerun reads it back).
    pub work_dir: Option<&'a Path>,
    /// Reads teacher model files (default: [`Model::load`]).
    pub load: Option<LoadModel<'a>>,
    /// Teachers served from elsewhere, with their labels: after the named ones in
    /// `teacher_index` order.
    pub remote: Vec<(String, Teacher)>,
    /// The training checkpoint (resumed from with `resume`), and how often it is written.
    pub checkpoint: Option<PathBuf>,
    pub resume: bool,
    pub checkpoint_every: CheckpointEvery,
    /// Measure the student on the test split after every epoch (shown in the progress).
    pub eval_each_epoch: bool,
    /// A line of status for work other than the student's training (a zoo teacher's).
    pub status: Option<&'a dyn Fn(&str)>,
}

impl<'a> Inputs<'a> {
    /// A distillation on `data` with the recipe `train`, the teachers named in the options.
    pub fn new(data: &'a DataSplits, train: &'a TrainConfig) -> Self {
        Inputs {
            data,
            train,
            label_free: false,
            baseline: None,
            work_dir: None,
            load: None,
            remote: Vec::new(),
            checkpoint: None,
            resume: false,
            checkpoint_every: CheckpointEvery::default(),
            eval_each_epoch: false,
            status: None,
        }
    }
}

/// A teacher as the report shows it: its label, and its accuracy on the test split where it
/// was measured (a model teacher, on data with labels).
#[derive(Clone, Debug, Serialize)]
pub struct TeacherReport {
    pub teacher: String,
    pub top1: Option<f64>,
    pub top5: Option<f64>,
}

/// What a distillation did.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub teachers: Vec<TeacherReport>,
    /// The mean of every distillation loss over the run (weighted, as added to the loss).
    pub losses: Vec<(String, f64)>,
    pub train: TrainReport,
    /// Epochs trained for.
    pub epochs: usize,
    pub label_free: bool,
    /// The student's accuracy on the test split (with labels).
    pub eval: Option<EvalReport>,
    /// The student's fidelity to the first teacher model (without labels, where there is one).
    pub fidelity: Option<Fidelity>,
}

impl RunReport {
    /// The report's figures for a JSON summary, with the student's cost: the teachers' and
    /// the student's accuracy (or without labels the fidelity), the mean losses, the epochs.
    pub fn summary(&self, student: &Model) -> serde_json::Value {
        let stats = slim_core::analysis::analyze(&student.graph);
        let losses: serde_json::Map<String, serde_json::Value> = self
            .losses
            .iter()
            .map(|(n, v)| (n.clone(), serde_json::json!(v)))
            .collect();
        let mut j = serde_json::json!({
            "losses": losses, "macs": stats.macs, "params": stats.params,
            "epochs": self.train.epochs, "resumed_from": self.train.resumed_from,
            "resumed_at_step": self.train.resumed_at_step,
        });
        let more = if self.label_free {
            serde_json::json!({"label_free": true, "fidelity": self.fidelity})
        } else {
            serde_json::json!({"teachers": self.teachers,
                "top1": self.eval.as_ref().map_or(0.0, |e| e.top1),
                "top5": self.eval.as_ref().map_or(0.0, |e| e.top5),
                "seconds_per_epoch": self.seconds_per_epoch()})
        };
        if let (Some(j), serde_json::Value::Object(more)) = (j.as_object_mut(), more) {
            j.extend(more);
        }
        j
    }

    fn seconds_per_epoch(&self) -> f64 {
        let epochs = &self.train.epochs;
        epochs.iter().map(|e| e.seconds).sum::<f64>() / epochs.len().max(1) as f64
    }

    /// The teachers' and the student's (named `student`) accuracy and the mean losses; without
    /// labels, the student's fidelity to the first teacher model.
    pub fn table(&self, student: &str) -> String {
        let table = slim_core::plot::table;
        if self.label_free {
            return match &self.fidelity {
                Some(f) => {
                    let rows: Vec<Vec<String>> =
                        f.rows().into_iter().map(|(l, v)| vec![l, v]).collect();
                    table(&["student, against the first teacher", ""], &rows)
                }
                None => {
                    "no labels and no teacher model to compare with: no fidelity to show\n".into()
                }
            };
        }
        let pct = |v: f64| format!("{:.2}%", v * 100.0);
        let mut rows: Vec<Vec<String>> = self
            .teachers
            .iter()
            .map(|t| {
                vec![
                    format!("teacher {}", t.teacher),
                    t.top1.map(pct).unwrap_or_else(|| "precomputed".into()),
                    t.top5.map(pct).unwrap_or_default(),
                ]
            })
            .collect();
        let (top1, top5) = self.eval.as_ref().map_or((0.0, 0.0), |e| (e.top1, e.top5));
        rows.push(vec![format!("student {student}"), pct(top1), pct(top5)]);
        let losses: Vec<String> = self
            .losses
            .iter()
            .map(|(n, v)| format!("{n} {v:.4}"))
            .collect();
        format!(
            "{}mean distillation losses: {}; {:.1} s per epoch\n",
            table(&["model", "top-1", "top-5"], &rows),
            losses.join(", "),
            self.seconds_per_epoch()
        )
    }
}

/// Distils into `student` with options `o`: the trained student and what was done.
pub fn run(
    mut student: Model,
    o: &DistillOptions,
    inputs: Inputs<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Model, RunReport)> {
    let mut specs = o.validate("distill")?;
    let data = inputs.data;
    let label_free = inputs.label_free || !data.train.is_labeled();
    let device = student.device();
    let Opened {
        mut teachers,
        mut reports,
        reference,
    } = open_teachers(o, &inputs, label_free, &device, progress)?;
    for (label, t) in inputs.remote {
        reports.push(TeacherReport {
            teacher: label,
            top1: None,
            top5: None,
        });
        teachers.push(t);
    }
    if specs.is_empty() {
        specs = match (&reference, label_free) {
            (_, false) => vec![DEFAULT_LOSS.parse()?],
            (Some(r), true) => Distiller::reproduce_specs(r, &student)?,
            (None, true) => {
                return Err(DistillError::Invalid(
                    "without labels and without a teacher model file, give the losses".into(),
                ))
            }
        };
    }
    let mut distiller = Distiller::from_specs(&student, teachers, &specs)?;
    distiller.check_data(data)?;
    let labels: Vec<&str> = reports.iter().map(|r| r.teacher.as_str()).collect();
    student
        .provenance
        .insert("distilled_from".into(), labels.join(", "));
    let mut cfg = inputs.train.clone();
    cfg.epochs = o.epochs.unwrap_or(cfg.epochs);
    cfg.lr = o.lr.unwrap_or(cfg.lr);
    let opts = TrainOptions {
        checkpoint: inputs.checkpoint,
        resume: inputs.resume,
        checkpoint_every: inputs.checkpoint_every,
        eval_each_epoch: inputs.eval_each_epoch,
        label_free,
        ..Default::default()
    };
    let done = distill(&mut student, &mut distiller, data, &cfg, opts, progress)?;
    let (eval, fidelity) = match (&reference, label_free) {
        (_, false) => (
            Some(evaluate(&student, &data.test, &data.normalize, 256)?),
            None,
        ),
        (Some(r), true) => (
            None,
            Some(fidelity(&student, r, &data.test, &data.normalize, 256)?),
        ),
        (None, true) => (None, None),
    };
    let report = RunReport {
        teachers: reports,
        losses: done.losses,
        train: done.train,
        epochs: cfg.epochs,
        label_free,
        eval,
        fidelity,
    };
    Ok((student, report))
}

/// The teachers named in the options, opened, checked and (with labels) measured.
struct Opened {
    teachers: Vec<Teacher>,
    reports: Vec<TeacherReport>,
    /// Without labels, the first teacher model: the student is measured against it.
    reference: Option<Model>,
}

fn open_teachers(
    o: &DistillOptions,
    inputs: &Inputs<'_>,
    label_free: bool,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Opened> {
    let data = inputs.data;
    let mut opened = Opened {
        teachers: Vec::new(),
        reports: Vec::new(),
        reference: None,
    };
    for spec in &o.teacher {
        let unmeasured = TeacherReport {
            teacher: spec.clone(),
            top1: None,
            top5: None,
        };
        let model = match spec.as_str() {
            "baseline" => inputs
                .baseline
                .ok_or_else(|| {
                    DistillError::Invalid(
                        "distill: the teacher `baseline` names no model here; give a model file"
                            .into(),
                    )
                })?
                .deep_clone()?,
            t if t.starts_with("zoo:") => {
                zoo_teacher(&t["zoo:".len()..], o, inputs, device, progress)?
            }
            path if Path::new(path).is_dir() => {
                let k = Knowledge::open(path.as_ref(), device)?;
                opened.teachers.push(Teacher::Knowledge(k));
                opened.reports.push(unmeasured);
                continue;
            }
            path => match inputs.load {
                Some(load) => load(Path::new(path))?,
                None => Model::load(Path::new(path), device)?,
            },
        };
        check_preprocessing(spec, &model, data)?;
        let report = if label_free {
            if opened.reference.is_none() {
                opened.reference = Some(model.deep_clone()?);
            }
            unmeasured
        } else {
            let e = evaluate(&model, &data.test, &data.normalize, 256).map_err(|e| {
                DistillError::Invalid(format!(
                    "the teacher {spec} cannot run on `{}`: {e}",
                    data.spec
                ))
            })?;
            TeacherReport {
                top1: Some(e.top1),
                top5: Some(e.top5),
                ..unmeasured
            }
        };
        opened.reports.push(report);
        opened.teachers.push(Teacher::model(model, spec.clone()));
    }
    Ok(opened)
}

/// A teacher model expects the input the student is fed: one batch goes to both.
fn check_preprocessing(label: &str, m: &Model, data: &DataSplits) -> Result<()> {
    match m.preprocess()? {
        Some(p) if p != data.normalize => Err(DistillError::Invalid(format!(
            "the teacher {label} expects its input normalized with mean {:?} and std {:?}; the \
             student is fed mean {:?}, std {:?}. Student and teachers share one batch: import \
             them with one preprocessing",
            p.mean, p.std, data.normalize.mean, data.normalize.std
        ))),
        _ => Ok(()),
    }
}

/// A fresh zoo network `name` as a student for `data`: as many classes as the data has, or
/// without labels as many as `teacher` (the first teacher model) scores.
pub fn zoo_student(
    name: &str,
    width: f64,
    seed: u64,
    data: &DataSplits,
    teacher: Option<&Model>,
    device: &candle_core::Device,
) -> Result<Model> {
    let classes = match (data.train.is_labeled(), teacher) {
        (true, _) => data.train.classes,
        (false, None) => {
            return Err(DistillError::Invalid(
                "without labels, a zoo student takes its classes from a teacher model file; \
                 give one"
                    .into(),
            ))
        }
        (false, Some(t)) => match t.graph.node(t.graph.outputs()[0]).shape[..] {
            [k] => k,
            ref other => {
                return Err(DistillError::Invalid(format!(
                    "the first teacher outputs {other:?} per image, not class scores: give the \
                     student as a file"
                )))
            }
        },
    };
    let zcfg = slim_core::zoo::ZooConfig::new(data.train.shape)
        .with_width(width)
        .with_classes(classes);
    Ok(slim_core::zoo::model(name, &zcfg, seed, device)?)
}

/// A zoo network trained on the data with the recipe, kept in the work folder under a name
/// that holds its width and epochs (another width or length trains a new one).
fn zoo_teacher(
    name: &str,
    o: &DistillOptions,
    inputs: &Inputs<'_>,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Model> {
    let data = inputs.data;
    let epochs = o.teacher_epochs.unwrap_or(inputs.train.epochs);
    let file = inputs.work_dir.map(|d| {
        d.join(format!(
            "teacher-{name}-w{}-e{epochs}.safetensors",
            o.teacher_width
        ))
    });
    if let Some(f) = file.as_ref().filter(|f| f.exists()) {
        return Ok(Model::load(f, device)?);
    }
    if !data.train.is_labeled() {
        return Err(DistillError::Invalid(format!(
            "distill: the teacher `zoo:{name}` trains on labels, and `{}` has none",
            data.spec
        )));
    }
    let zcfg = slim_core::zoo::ZooConfig::new(data.train.shape)
        .with_width(o.teacher_width)
        .with_classes(data.train.classes);
    let mut m = slim_core::zoo::model(name, &zcfg, inputs.train.seed, device)?;
    let mut cfg = inputs.train.clone();
    cfg.epochs = epochs;
    if let Some(status) = inputs.status {
        status(&format!("training the teacher {name}"));
    }
    slim_core::train::train(&mut m, data, &cfg, TrainOptions::default(), progress)?;
    if let Some(f) = &file {
        // Kept, so that a resumed pipeline does not train it again.
        m.save(f)?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teachers_are_one_string_or_a_list_and_checked_by_name() {
        let one: DistillOptions = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(one.teacher, ["baseline"]);
        let two: DistillOptions =
            serde_json::from_value(serde_json::json!({"teacher": ["baseline", "zoo:lenet"]}))
                .unwrap();
        assert_eq!(two.teacher, ["baseline", "zoo:lenet"]);
        assert!(two.validate("distill").unwrap().is_empty());
        let bad = |o: DistillOptions, says: &str| {
            let e = o.validate("distill").unwrap_err().to_string();
            assert!(e.starts_with("distill: ") && e.contains(says), "{e}");
        };
        bad(
            DistillOptions {
                teacher: vec!["zoo:lenet5".into()],
                ..Default::default()
            },
            "zoo:lenet5",
        );
        bad(
            DistillOptions {
                teacher: vec!["no/such/file.safetensors".into()],
                ..Default::default()
            },
            "no/such/file.safetensors",
        );
        bad(
            DistillOptions {
                epochs: Some(0),
                ..Default::default()
            },
            "`epochs`",
        );
        bad(
            DistillOptions {
                lr: Some(f64::NAN),
                ..Default::default()
            },
            "`lr`",
        );
        let e = DistillOptions {
            loss: vec!["mse:teacher=fc3".into()],
            ..Default::default()
        }
        .validate("distill")
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown loss `mse`"), "{e}");
    }
}
