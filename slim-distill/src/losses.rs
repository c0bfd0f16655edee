//! Distillation losses: the functions, the [`DistillLoss`] trait that every loss (built-in or
//! the user's) implements, and the built-in losses parsed from specs such as
//! `soft_label:temperature=4,weight=1` or `l2:teacher=avgpool,student=avgpool,adapter=true`.
//!
//! - Soft label: cross-entropy between the teacher's and the student's softened distributions,
//!   `-mean_n sum_k softmax(t/T)_k log softmax(s/T)_k` (Hinton et al., "Distilling the
//!   Knowledge in a Neural Network", 2015), optionally scaled by `T²` so that its gradients keep
//!   their size as `T` grows.
//! - L2: the mean squared difference of two feature maps; when the channel counts differ a
//!   learned 1x1 adapter maps the student's channels onto the teacher's (Romero et al.,
//!   "FitNets", 2015). The adapter trains with the student and is dropped afterwards.
//! - FSP: the "flow of solution procedure" matrix `G[i,j] = mean_{h,w} a_i(h,w) b_j(h,w)`
//!   between two feature maps of one spatial size, and the mean squared difference between the
//!   teacher's and the student's matrices (Yim et al., CVPR 2017).

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var, D};

use crate::{DistillError, Result};
use slim_core::graph::MAX_ELEMENTS;

/// Node outputs by name, batched.
pub type Taps = HashMap<String, Tensor>;

/// Per-sample output shapes of the nodes a network can provide, by name.
pub type Shapes = HashMap<String, Vec<usize>>;

/// What a loss may know about one teacher before training: the shapes of its nodes and the
/// name of its output.
pub struct TeacherView<'a> {
    pub label: &'a str,
    pub shapes: &'a Shapes,
    pub output: &'a str,
}

/// A distillation loss over tapped nodes of the student and of any teacher. Implement it for a
/// loss of your own and hand it to [`Distiller::new`](crate::Distiller::new).
pub trait DistillLoss: Send {
    /// A short name for reports (`soft_label`, `l2(avgpool)`, ...).
    fn name(&self) -> String;
    /// Student nodes the loss reads.
    fn student_nodes(&self) -> Vec<String>;
    /// Teacher nodes the loss reads, as (teacher index, node name).
    fn teacher_nodes(&self) -> Vec<(usize, String)>;
    /// Checks shapes before any training (nodes are known to exist when this is called).
    fn check(&self, _student: &Shapes, _teachers: &[TeacherView<'_>]) -> Result<()> {
        Ok(())
    }
    /// Parameters of the loss's own that train with the student.
    fn params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// The (already weighted) scalar to add to the training loss. `teachers[i]` holds the taps
    /// of teacher `i`; teacher outputs carry no gradient.
    fn loss(&self, student: &Taps, teachers: &[Taps]) -> Result<Tensor>;
}

/// Soft-label cross-entropy at a temperature, averaged over the batch.
pub fn soft_label(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let p = candle_nn::ops::softmax_last_dim(&(teacher.detach() / temperature)?)?;
    let log_q = candle_nn::ops::log_softmax(&(student / temperature)?, D::Minus1)?;
    let n = student.dim(0)? as f64;
    Ok(((p * log_q)?.sum_all()? * (-1.0 / n))?)
}

/// Mean squared difference between two tensors of one shape.
pub fn l2(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    Ok((student - teacher.detach())?.sqr()?.mean_all()?)
}

/// The FSP matrix `[N, Ca, Cb]` of two feature maps `[N, Ca, H, W]` and `[N, Cb, H, W]`.
pub fn fsp_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, ca, h, w) = a.dims4()?;
    let (_, cb, _, _) = b.dims4()?;
    let a = a.reshape((n, ca, h * w))?;
    let b = b.reshape((n, cb, h * w))?;
    Ok((a.matmul(&b.t()?)? / (h * w) as f64)?)
}

/// Mean squared difference between the student's and the teacher's FSP matrices.
pub fn fsp(student: (&Tensor, &Tensor), teacher: (&Tensor, &Tensor)) -> Result<Tensor> {
    let gs = fsp_matrix(student.0, student.1)?;
    let gt = fsp_matrix(&teacher.0.detach(), &teacher.1.detach())?;
    l2(&gs, &gt)
}

fn invalid(msg: impl Into<String>) -> DistillError {
    DistillError::Invalid(msg.into())
}

fn get<'a>(taps: &'a Taps, name: &str) -> Result<&'a Tensor> {
    taps.get(name)
        .ok_or_else(|| invalid(format!("node `{name}` was not tapped")))
}

/// Soft-label distillation from one teacher.
pub struct SoftLabel {
    pub teacher: usize,
    pub teacher_node: String,
    pub student_node: String,
    pub temperature: f64,
    pub weight: f64,
    /// Multiply by `T²`.
    pub t2: bool,
}

impl DistillLoss for SoftLabel {
    fn name(&self) -> String {
        format!("soft_label(T={})", self.temperature)
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student_node.clone()]
    }
    fn teacher_nodes(&self) -> Vec<(usize, String)> {
        vec![(self.teacher, self.teacher_node.clone())]
    }
    fn check(&self, student: &Shapes, teachers: &[TeacherView<'_>]) -> Result<()> {
        let s = &student[&self.student_node];
        let t = &teachers[self.teacher].shapes[&self.teacher_node];
        if s.len() != 1 || s != t {
            return Err(invalid(format!(
                "soft_label pairs teacher node `{}` {t:?} with student node `{}` {s:?}: both must be logits of one length",
                self.teacher_node, self.student_node
            )));
        }
        Ok(())
    }
    fn loss(&self, student: &Taps, teachers: &[Taps]) -> Result<Tensor> {
        let s = get(student, &self.student_node)?;
        let t = get(&teachers[self.teacher], &self.teacher_node)?;
        let scale = self.weight
            * if self.t2 {
                self.temperature * self.temperature
            } else {
                1.0
            };
        Ok((soft_label(s, t, self.temperature)? * scale)?)
    }
}

/// A learned 1x1 map from the student's channels to the teacher's.
pub struct Adapter {
    pub weight: Var,
    pub bias: Var,
}

impl Adapter {
    /// A seeded uniform initialisation in `±1/sqrt(from)` (the usual fan-in bound).
    pub fn new(from: usize, to: usize, seed: u64, device: &candle_core::Device) -> Result<Self> {
        if from == 0 || to == 0 || from.checked_mul(to).is_none_or(|n| n > MAX_ELEMENTS) {
            return Err(DistillError::Invalid(format!(
                "an adapter from {from} to {to} channels is impossible or too large"
            )));
        }
        let bound = 1.0 / (from as f64).sqrt();
        let mut state = seed ^ 0x2545_f491_4f6c_dd1d;
        let values: Vec<f32> = (0..from * to)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                ((2.0 * u - 1.0) * bound) as f32
            })
            .collect();
        Ok(Adapter {
            weight: Var::from_tensor(&Tensor::from_vec(values, (to, from), device)?)?,
            bias: Var::from_tensor(&Tensor::zeros(to, candle_core::DType::F32, device)?)?,
        })
    }

    /// Maps `[N, C]` or `[N, C, H, W]` to the teacher's channel count.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let b = self.bias.as_tensor();
        Ok(match x.rank() {
            2 => x.matmul(&w.t()?)?.broadcast_add(b)?,
            4 => {
                let (n, c, h, wd) = x.dims4()?;
                let y = w.broadcast_matmul(&x.reshape((n, c, h * wd))?)?;
                y.broadcast_add(&b.reshape((1, (), 1))?)?
                    .reshape((n, (), h, wd))?
            }
            r => {
                return Err(invalid(format!(
                    "an adapter takes rank 2 or 4, got rank {r}"
                )))
            }
        })
    }
}

/// L2 between a student node and a teacher node, through an adapter when channels differ.
pub struct L2 {
    pub teacher: usize,
    pub teacher_node: String,
    pub student_node: String,
    pub weight: f64,
    pub adapter: Option<Adapter>,
    /// A unique prefix for the adapter's parameter names.
    pub key: String,
}

impl DistillLoss for L2 {
    fn name(&self) -> String {
        if self.teacher_node == self.student_node {
            format!("l2({})", self.student_node)
        } else {
            format!("l2({}->{})", self.student_node, self.teacher_node)
        }
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student_node.clone()]
    }
    fn teacher_nodes(&self) -> Vec<(usize, String)> {
        vec![(self.teacher, self.teacher_node.clone())]
    }
    fn check(&self, student: &Shapes, teachers: &[TeacherView<'_>]) -> Result<()> {
        let s = &student[&self.student_node];
        let t = &teachers[self.teacher].shapes[&self.teacher_node];
        if self.adapter.is_some() && s.len() != 1 && s.len() != 3 {
            return Err(invalid(format!(
                "an adapter maps features [C] or feature maps [C, H, W]; student node `{}` is {s:?}",
                self.student_node
            )));
        }
        let mut mapped = s.clone();
        if let (Some(a), Some(c)) = (&self.adapter, mapped.first_mut()) {
            *c = a.weight.dims()[0];
        }
        if &mapped != t {
            let hint = if self.adapter.is_none()
                && !s.is_empty()
                && s.len() == t.len()
                && s[1..] == t[1..]
            {
                "; the channel counts differ: add adapter=true to learn a 1x1 map between them"
            } else {
                ""
            };
            return Err(invalid(format!(
                "l2 pairs teacher node `{}` {t:?} with student node `{}` {s:?}: the shapes differ{hint}",
                self.teacher_node, self.student_node
            )));
        }
        Ok(())
    }
    fn params(&self) -> Vec<(String, Var)> {
        match &self.adapter {
            Some(a) => vec![
                (format!("{}.adapter.weight", self.key), a.weight.clone()),
                (format!("{}.adapter.bias", self.key), a.bias.clone()),
            ],
            None => Vec::new(),
        }
    }
    fn loss(&self, student: &Taps, teachers: &[Taps]) -> Result<Tensor> {
        let s = get(student, &self.student_node)?;
        let s = match &self.adapter {
            Some(a) => a.apply(s)?,
            None => s.clone(),
        };
        let t = get(&teachers[self.teacher], &self.teacher_node)?;
        Ok((l2(&s, t)? * self.weight)?)
    }
}

/// FSP between a pair of student nodes and a pair of teacher nodes.
pub struct Fsp {
    pub teacher: usize,
    pub teacher_nodes: (String, String),
    pub student_nodes: (String, String),
    pub weight: f64,
}

impl DistillLoss for Fsp {
    fn name(&self) -> String {
        format!("fsp({}-{})", self.student_nodes.0, self.student_nodes.1)
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.student_nodes.0.clone(), self.student_nodes.1.clone()]
    }
    fn teacher_nodes(&self) -> Vec<(usize, String)> {
        vec![
            (self.teacher, self.teacher_nodes.0.clone()),
            (self.teacher, self.teacher_nodes.1.clone()),
        ]
    }
    fn check(&self, student: &Shapes, teachers: &[TeacherView<'_>]) -> Result<()> {
        let pair = |who: &str,
                    shapes: &Shapes,
                    (a, b): &(String, String)|
         -> Result<(usize, usize)> {
            let (sa, sb) = (&shapes[a], &shapes[b]);
            if sa.len() != 3 || sb.len() != 3 || sa[1..] != sb[1..] {
                return Err(invalid(format!(
                    "fsp needs two {who} feature maps of one spatial size: `{a}` is {sa:?}, `{b}` is {sb:?}"
                )));
            }
            Ok((sa[0], sb[0]))
        };
        let s = pair("student", student, &self.student_nodes)?;
        let t = pair(
            "teacher",
            teachers[self.teacher].shapes,
            &self.teacher_nodes,
        )?;
        if s != t {
            return Err(invalid(format!(
                "fsp: the teacher's matrix between `{}` and `{}` is {}x{}, the student's between `{}` and `{}` is {}x{}; the channel counts must match",
                self.teacher_nodes.0, self.teacher_nodes.1, t.0, t.1,
                self.student_nodes.0, self.student_nodes.1, s.0, s.1
            )));
        }
        Ok(())
    }
    fn loss(&self, student: &Taps, teachers: &[Taps]) -> Result<Tensor> {
        let t = &teachers[self.teacher];
        let v = fsp(
            (
                get(student, &self.student_nodes.0)?,
                get(student, &self.student_nodes.1)?,
            ),
            (
                get(t, &self.teacher_nodes.0)?,
                get(t, &self.teacher_nodes.1)?,
            ),
        )?;
        Ok((v * self.weight)?)
    }
}

/// A parsed loss spec: `KIND:key=value,key=value`.
#[derive(Clone, Debug, PartialEq)]
pub struct LossSpec {
    pub kind: String,
    pub args: BTreeMap<String, String>,
    pub text: String,
}

impl std::str::FromStr for LossSpec {
    type Err = DistillError;
    fn from_str(text: &str) -> Result<Self> {
        let (kind, rest) = text.split_once(':').unwrap_or((text, ""));
        let kind = kind.trim();
        if !["soft_label", "l2", "fsp"].contains(&kind) {
            return Err(invalid(format!(
                "unknown loss `{kind}` in `{text}` (known: soft_label, l2, fsp)"
            )));
        }
        let mut args = BTreeMap::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| invalid(format!("`{part}` in loss `{text}` is not key=value")))?;
            if args
                .insert(k.trim().to_string(), v.trim().to_string())
                .is_some()
            {
                return Err(invalid(format!("`{k}` is given twice in loss `{text}`")));
            }
        }
        Ok(LossSpec {
            kind: kind.to_string(),
            args,
            text: text.to_string(),
        })
    }
}

impl LossSpec {
    fn allow(&self, keys: &[&str]) -> Result<()> {
        for k in self.args.keys() {
            if !keys.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "`{k}` is not an option of {} (options: {}) in `{}`",
                    self.kind,
                    keys.join(", "),
                    self.text
                )));
            }
        }
        Ok(())
    }

    fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.args.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| invalid(format!("{key}={v} in `{}` is not a number", self.text))),
        }
    }

    fn flag(&self, key: &str) -> Result<bool> {
        match self.args.get(key).map(String::as_str) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(invalid(format!(
                "{key}={v} in `{}` must be true or false",
                self.text
            ))),
        }
    }

    fn required(&self, key: &str, what: &str) -> Result<&str> {
        self.args
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| invalid(format!("loss `{}` needs {key}={what}", self.text)))
    }

    /// Which teacher the loss reads (`teacher_index`, of `teachers`) and its weight.
    fn teacher_and_weight(&self, teachers: usize) -> Result<(usize, f64)> {
        let teacher = self.number("teacher_index", 0.0)?;
        if teacher < 0.0 || teacher.fract() != 0.0 || teacher as usize >= teachers {
            return Err(invalid(format!(
                "teacher_index={teacher} in `{}`: there are {teachers} teacher(s), numbered \
                 from 0",
                self.text
            )));
        }
        let weight = self.number("weight", 1.0)?;
        if weight < 0.0 {
            return Err(invalid(format!(
                "weight={weight} in `{}` must not be negative",
                self.text
            )));
        }
        Ok((teacher as usize, weight))
    }

    /// Builds the loss. `index` makes adapter names unique; `student` holds the student's
    /// node shapes, `teachers` what is known of each teacher; node names are resolved here.
    pub fn build(
        &self,
        index: usize,
        student: &Shapes,
        student_output: &str,
        teachers: &[TeacherView<'_>],
        device: &candle_core::Device,
    ) -> Result<Box<dyn DistillLoss>> {
        let common = ["teacher_index", "weight"];
        let (teacher, weight) = self.teacher_and_weight(teachers.len())?;
        let opts = |extra: &[&'static str]| -> Vec<&'static str> {
            common.iter().chain(extra).copied().collect()
        };
        Ok(match self.kind.as_str() {
            "soft_label" => {
                self.allow(&opts(&["temperature", "t2", "teacher", "student"]))?;
                let temperature = self.number("temperature", 1.0)?;
                if temperature <= 0.0 {
                    return Err(invalid(format!(
                        "temperature={temperature} in `{}` must be positive",
                        self.text
                    )));
                }
                Box::new(SoftLabel {
                    teacher,
                    teacher_node: self
                        .args
                        .get("teacher")
                        .cloned()
                        .unwrap_or_else(|| teachers[teacher].output.to_string()),
                    student_node: self
                        .args
                        .get("student")
                        .cloned()
                        .unwrap_or_else(|| student_output.to_string()),
                    temperature,
                    weight,
                    t2: self.flag("t2")?,
                })
            }
            "l2" => {
                self.allow(&opts(&["teacher", "student", "adapter"]))?;
                let teacher_node = self.required("teacher", "NODE")?.to_string();
                let student_node = self.required("student", "NODE")?.to_string();
                let adapter = if self.flag("adapter")? {
                    let s = student.get(&student_node);
                    let t = teachers[teacher].shapes.get(&teacher_node);
                    match (s, t) {
                        (Some(s), Some(t)) if !s.is_empty() && !t.is_empty() => {
                            Some(Adapter::new(s[0], t[0], index as u64, device)?)
                        }
                        // Unknown nodes are reported by the distiller, with suggestions.
                        _ => None,
                    }
                } else {
                    None
                };
                Box::new(L2 {
                    teacher,
                    teacher_node,
                    student_node,
                    weight,
                    adapter,
                    key: format!("loss{index}"),
                })
            }
            _ => {
                self.allow(&opts(&["teacher", "student"]))?;
                let split = |who: &str, shapes: &Shapes, key: &str| -> Result<(String, String)> {
                    let v = self.required(key, "A-B")?;
                    // Node names may contain `-`: take the split whose halves both exist.
                    let cuts: Vec<(String, String)> = v
                        .match_indices('-')
                        .map(|(i, _)| (v[..i].to_string(), v[i + 1..].to_string()))
                        .collect();
                    cuts.iter()
                        .find(|(a, b)| shapes.contains_key(a) && shapes.contains_key(b))
                        .or(cuts.first())
                        .cloned()
                        .ok_or_else(|| {
                            invalid(format!(
                                "{key}={v} in `{}` must name two {who} nodes as A-B",
                                self.text
                            ))
                        })
                };
                Box::new(Fsp {
                    teacher,
                    teacher_nodes: split("teacher", teachers[teacher].shapes, "teacher")?,
                    student_nodes: split("student", student, "student")?,
                    weight,
                })
            }
        })
    }
}
