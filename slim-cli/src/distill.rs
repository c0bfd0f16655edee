//! `slim distill` and `slim distill dump`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use slim_core::data::DEFAULT_SPEC;
use slim_dist::teacher::TeacherClient;
use slim_distill::run::{DistillOptions, Inputs};
use slim_distill::{dump, Teacher};

use crate::common::{check_out_dir, load_data, Common, EpochBars};
use crate::{input_error, Failure};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DistillArgs {
    #[command(subcommand)]
    pub command: Option<DistillCommand>,
    #[command(flatten)]
    pub train: DistillTrainArgs,
}

#[derive(Subcommand)]
pub enum DistillCommand {
    /// Run a teacher over a training split once and write the outputs of chosen nodes to
    /// safetensors shards; `slim distill --teacher DIR` then trains without the teacher.
    Dump(DumpArgs),
    /// Serve a teacher to students on other processes or machines, through Redis, until
    /// stopped; start several with one --name to share the load (or to survive one's end).
    Teacher(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// The Redis server: redis://HOST:PORT, redis://:PASSWORD@HOST:PORT/DB, rediss://... (TLS).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// rediss://: check the server's certificate against this PEM certificate authority.
    #[arg(long)]
    pub redis_ca: Option<PathBuf>,
    /// The teacher's name, which students give to --teacher-service.
    #[arg(long)]
    pub name: String,
    /// The teacher model file.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = DEFAULT_SPEC, help = crate::common::data_help(
        "The students' data (the training split is served by sample index)"))]
    pub data: String,
    /// Serve the first N training images only (the students' --limit).
    #[arg(long)]
    pub limit: Option<usize>,
    /// The nodes students may ask for, repeatable (default: every node).
    #[arg(long)]
    pub node: Vec<String>,
    /// This process's name among those serving the teacher (default: HOST-PID).
    #[arg(long)]
    pub server_name: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct DistillTrainArgs {
    /// A teacher: a model file, or a directory written by `slim distill dump`. Repeat for
    /// several teachers; losses pick one with teacher_index=K (from 0, in this order).
    #[arg(long)]
    pub teacher: Vec<PathBuf>,
    /// A teacher served by `slim distill teacher --name NAME` (through --redis), repeatable;
    /// these come after the --teacher ones in teacher_index order.
    #[arg(long)]
    pub teacher_service: Vec<String>,
    /// The Redis server of --teacher-service (rediss://... for TLS).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// rediss://: check the server's certificate against this PEM certificate authority.
    #[arg(long)]
    pub redis_ca: Option<PathBuf>,
    /// --teacher-service: stop with an error when no process serving a teacher answers (or,
    /// at the start, announces it) for this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub teacher_timeout: f64,
    /// --teacher-service: ask again for a batch whose answer is this many seconds late.
    #[arg(long, default_value_t = 5.0)]
    pub teacher_retry: f64,
    /// --teacher-service: batches asked ahead of use.
    #[arg(long, default_value_t = 4)]
    pub prefetch: usize,
    /// The student as a model file (trained or not).
    #[arg(long, conflicts_with = "student_model")]
    pub student: Option<PathBuf>,
    /// The student as a fresh zoo model (lenet, resnet20, mobilenet_v1, mobilenet_tiny, ...).
    #[arg(long)]
    pub student_model: Option<String>,
    /// Width multiplier of --student-model.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    #[arg(long, default_value = DEFAULT_SPEC, help = crate::common::data_help(
        "The data (without labels, the students learn from the teachers alone)"))]
    pub data: String,
    /// A loss, repeatable: soft_label[:temperature=T,t2=true,weight=W],
    /// l2:teacher=NODE,student=NODE[,adapter=true], fsp:teacher=A-B,student=C-D; every loss
    /// also takes weight=W and teacher_index=K. The default is soft_label:temperature=2, and
    /// without labels to reproduce every output of the first teacher model (soft labels on
    /// scores, L2 on maps).
    #[arg(long)]
    pub loss: Vec<String>,
    /// Use the first N training images only (a quick run on a slice of the data).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub recipe: slim_core::train::TrainConfig,
    /// The distilled student (.safetensors). A checkpoint is kept beside it as FILE.ckpt
    /// while the job runs (removed when it finishes).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub checkpoint: crate::common::CheckpointArgs,
    /// Train without labels: the student learns from the teachers alone (the losses given,
    /// no cross-entropy) and is measured by its fidelity to the first teacher model. Data
    /// without labels (`unlabeled:DIR`) is always used this way.
    #[arg(long)]
    pub label_free: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct DumpArgs {
    /// The teacher model file.
    #[arg(long)]
    pub teacher: PathBuf,
    #[arg(long, default_value = DEFAULT_SPEC, help = crate::common::data_help(
        "The data whose training split the teacher's outputs are computed on"))]
    pub data: String,
    /// A node whose outputs to keep, repeatable (default: the teacher's output).
    #[arg(long)]
    pub node: Vec<String>,
    /// Use the first N training images only (a quick run on a slice of the data).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Samples per shard.
    #[arg(long, default_value_t = 10_000)]
    pub shard_size: usize,
    /// The knowledge directory.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: DistillArgs) -> Result<(), Failure> {
    match args.command {
        Some(DistillCommand::Dump(d)) => run_dump(d),
        Some(DistillCommand::Teacher(t)) => run_serve(t),
        None => run_train(args.train),
    }
}

fn run_dump(args: DumpArgs) -> Result<(), Failure> {
    let device = args.common.device()?;
    let teacher = crate::common::load_model(&args.teacher, &device, &args.common.load)?;
    let data = crate::common::load_data_for(&args.data, args.limit, &teacher)?;
    let quiet = args.common.quiet;
    let mut last = 0usize;
    let label = args.teacher.display().to_string();
    let r = dump(
        &teacher,
        &label,
        &data.train,
        &data.normalize,
        &data.spec,
        &args.node,
        &args.out,
        args.shard_size,
        &mut |done, total| {
            // A line per tenth of the work: dumps are short and their output is often logged.
            if !quiet && (done * 10 / total > last || done == total) {
                last = done * 10 / total;
                eprintln!("dump: {done}/{total} samples");
            }
        },
    )?;
    if args.common.json {
        outln!("{}", crate::common::with_skipped(json!(r)));
    } else {
        outln!("{}", r.describe(&args.data));
    }
    Ok(())
}

/// The served teachers' client options, checked (`None` without --teacher-service).
fn client_options(
    args: &DistillTrainArgs,
) -> Result<Option<slim_dist::teacher::ClientOptions>, Failure> {
    Ok(if args.teacher_service.is_empty() {
        None
    } else {
        let secs = |flag: &str, v: f64| {
            if v > 0.0 && v <= 86_400.0 {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(input_error(format!(
                    "{flag} must be between 0 and 86400 seconds, not {v}"
                )))
            }
        };
        if args.prefetch == 0 {
            return Err(input_error("--prefetch must be at least 1"));
        }
        for n in &args.teacher_service {
            slim_dist::check_name("teacher", n)?;
        }
        Some(slim_dist::teacher::ClientOptions {
            prefetch: args.prefetch,
            retry: secs("--teacher-retry", args.teacher_retry)?,
            timeout: secs("--teacher-timeout", args.teacher_timeout)?,
        })
    })
}

/// The student: a model file, or a fresh zoo model with as many classes as the data has
/// (without labels, as the first teacher model scores).
fn student_model(
    args: &DistillTrainArgs,
    data: &slim_core::data::DataSplits,
    device: &candle_core::Device,
) -> Result<slim_core::Model, Failure> {
    Ok(match (&args.student, &args.student_model) {
        (Some(path), _) => crate::common::load_model(path, device, &args.common.load)?,
        (None, Some(name)) => {
            // Without labels, as many classes as the first teacher model scores.
            let first = args.teacher.iter().find(|p| !p.is_dir());
            let teacher = match first {
                Some(p) if !data.train.is_labeled() => {
                    Some(crate::common::load_model(p, device, &args.common.load)?)
                }
                _ => None,
            };
            let (width, seed) = (args.width, args.recipe.seed);
            slim_distill::run::zoo_student(name, width, seed, data, teacher.as_ref(), device)?
        }
        (None, None) => {
            return Err(input_error(
                "give the student: --student FILE or --student-model NAME",
            ))
        }
    })
}

fn run_train(args: DistillTrainArgs) -> Result<(), Failure> {
    let out = args
        .out
        .clone()
        .ok_or_else(|| input_error("--out FILE is required (where the distilled student goes)"))?;
    check_out_dir("--out", &out)?;
    if args.teacher.is_empty() && args.teacher_service.is_empty() {
        return Err(input_error(
            "at least one --teacher (or --teacher-service) is required",
        ));
    }
    let client_opts = client_options(&args)?;
    let cfg = crate::common::checked(&args.recipe)?;
    let options = DistillOptions {
        teacher: args
            .teacher
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        loss: args.loss.clone(),
        ..Default::default()
    };
    options.validate("slim distill")?;
    let device = args.common.device()?;
    let mut data = load_data(&args.data, args.limit, None)?;
    let mut student = student_model(&args, &data, &device)?;
    student.adapt_data(&mut data)?;
    let mut remote = Vec::new();
    if let Some(opts) = client_opts {
        let url = slim_dist::RedisUrl::parse_with_ca(&args.redis, args.redis_ca.as_deref())?;
        let clients = TeacherClient::connect_all(&url, &args.teacher_service, &opts)?;
        for (name, c) in args.teacher_service.iter().zip(clients) {
            let label = format!("service {name} ({})", c.info().label);
            remote.push((label, Teacher::Remote(Box::new(Served(c)))));
        }
    }
    student.provenance.insert("data".into(), args.data.clone());
    let ckpt = crate::common::checkpoint_path(&out);
    let load = |p: &std::path::Path| {
        crate::common::load_model(p, &device, &args.common.load)
            .map_err(|f| slim_distill::DistillError::Invalid(format!("{:#}", f.error)))
    };
    let inputs = Inputs {
        label_free: crate::common::label_free(args.label_free, &data),
        load: Some(&load),
        remote,
        checkpoint: Some(ckpt.clone()),
        resume: args.checkpoint.resume,
        checkpoint_every: args.checkpoint.every(),
        eval_each_epoch: true,
        ..Inputs::new(&data, &cfg)
    };
    let mut bars = EpochBars::new(args.common.quiet);
    let (student, report) =
        slim_distill::run::run(student, &options, inputs, &mut |p| bars.update(p))?;
    student.save(&out)?;
    args.checkpoint.finished(&ckpt);
    print_distilled(&args, &student, &report, &out);
    Ok(())
}

/// The end of a distillation: the student's accuracy beside its teachers', or without labels
/// its fidelity to the first teacher model; the losses; a table, or JSON.
fn print_distilled(
    args: &DistillTrainArgs,
    student: &slim_core::Model,
    report: &slim_distill::run::RunReport,
    out: &std::path::Path,
) {
    if args.common.json {
        let mut j = report.summary(student);
        j["data"] = json!(args.data);
        j["out"] = json!(out);
        outln!("{}", crate::common::with_skipped(j));
        return;
    }
    out!("{}", report.table(&out.display().to_string()));
    if report.label_free {
        outln!("{} written (trained without labels)", out.display());
    }
}

/// A served teacher as the distiller sees it.
struct Served(slim_dist::teacher::TeacherClient);

fn distill_err(e: slim_dist::DistError) -> slim_distill::DistillError {
    match e {
        slim_dist::DistError::Core(c) => slim_distill::DistillError::Core(c),
        slim_dist::DistError::Redis(m) => {
            slim_distill::DistillError::Core(slim_core::CoreError::Store(m))
        }
        slim_dist::DistError::Invalid(m) => slim_distill::DistillError::Invalid(m),
    }
}

impl slim_distill::RemoteTeacher for Served {
    fn label(&self) -> String {
        self.0.label().to_string()
    }
    fn shapes(&self) -> &slim_distill::Shapes {
        self.0.shapes()
    }
    fn output(&self) -> &str {
        &self.0.info().output
    }
    fn fingerprint(&self) -> String {
        self.0.info().fingerprint.clone()
    }
    fn data_fingerprint(&self) -> String {
        self.0.info().data_fingerprint.clone()
    }
    fn plan(&mut self, batches: &[Vec<usize>], nodes: &[String]) -> slim_distill::Result<()> {
        self.0.plan(batches, nodes).map_err(distill_err)
    }
    fn fetch(
        &mut self,
        indices: &[usize],
        nodes: &[String],
    ) -> slim_distill::Result<slim_distill::Taps> {
        self.0.fetch(indices, nodes).map_err(distill_err)
    }
}

fn run_serve(args: ServeArgs) -> Result<(), Failure> {
    slim_dist::check_name("teacher", &args.name)?;
    let url = slim_dist::RedisUrl::parse_with_ca(&args.redis, args.redis_ca.as_deref())?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.model, &device, &args.common.load)?;
    let data = crate::common::load_data_for(&args.data, args.limit, &model)?;
    let label = args.model.display().to_string();
    let info =
        slim_dist::teacher::teacher_info(&model, &label, &data.train, &data.spec, &args.node)?;
    let server = match &args.server_name {
        Some(s) => s.clone(),
        None => slim_dist::host_pid("server"),
    };
    let quiet = args.common.quiet;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut answered, mut last) = (0usize, std::time::Instant::now());
    let report = slim_dist::teacher::serve(
        &url,
        &args.name,
        &server,
        &model,
        &info,
        &data.train,
        &data.normalize,
        &stop,
        &mut |e| match e {
            slim_dist::teacher::ServeEvent::Ready(i) => eprintln!(
                "serving the teacher `{}` ({}, {} samples of {}, {} nodes) at {url} as {server}",
                args.name,
                i.label,
                i.samples,
                i.data,
                i.nodes.len()
            ),
            slim_dist::teacher::ServeEvent::Answered { .. } => {
                answered += 1;
                if !quiet && last.elapsed().as_secs() >= 10 {
                    eprintln!("{answered} requests answered");
                    last = std::time::Instant::now();
                }
            }
            slim_dist::teacher::ServeEvent::Dropped(why) => {
                eprintln!("warning: a request dropped: {why}")
            }
        },
    )?;
    if args.common.json {
        outln!("{}", crate::common::with_skipped(json!(report)));
    }
    Ok(())
}
