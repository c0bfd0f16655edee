//! `slim nas sa|export`: architecture search under MACs, parameter and latency limits.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use slim_core::data::DEFAULT_SPEC;
use slim_core::search::CostModel;
use slim_core::study::{StudyStore, WorkerOptions};
use slim_core::train::{CheckpointEvery, TrainConfig};
use slim_latency::LatencyCost;
use slim_nas::oneshot::SupernetProgress;
use slim_nas::run::{Inputs, Method, NasOptions, Progress, SearchFolder, Weights};
use slim_nas::NasProgress;

use crate::common::Common;
use crate::{input_error, Failure};

#[derive(Subcommand)]
pub enum NasCommand {
    /// Simulated-annealing search: every candidate that breaks a limit is rejected before it
    /// is trained; the others are trained briefly on a subset and scored on another.
    Sa(SaArgs),
    /// One-shot search: a weight-sharing supernet trained once (one sampled candidate per
    /// step), then the annealing search scores candidates with the weights they inherit.
    Oneshot(OneshotArgs),
    /// One worker of a search shared through Redis: start any number, on any machines, with
    /// the same settings and study name; each takes candidates, trains and scores them, and
    /// reports, until the study has run its --iterations. A worker that dies loses nothing:
    /// its candidate goes to another after --lease-seconds.
    Worker(WorkerArgs),
    /// Write the architecture of a search's N-th best candidate as a model file (freshly
    /// initialized; train it with `slim train --model FILE`).
    Export(ExportArgs),
}

/// What every search takes: the space, the data, the limits, the annealing, the output.
#[derive(Args)]
pub struct Search {
    #[command(flatten)]
    pub options: NasOptions,
    #[arg(long, default_value = DEFAULT_SPEC, help = crate::common::data_help(
        "The data the candidates train and are scored on (without labels: with --teacher)"))]
    pub data: String,
    /// A model to reproduce, for data without labels (`unlabeled:DIR`, where it is needed) or
    /// in place of them: candidates learn to reproduce its outputs and are scored by their
    /// top-1 agreement with it instead of their accuracy.
    #[arg(long, value_name = "MODEL")]
    pub teacher: Option<PathBuf>,
    /// The output folder: history.json (resumed if it exists), the plots, results.md.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct SaArgs {
    #[command(flatten)]
    pub search: Search,
    /// Each candidate trains on the first N training images (with the recipe below).
    #[arg(long, default_value_t = 2000)]
    pub train_images: usize,
    #[command(flatten)]
    pub recipe: slim_core::train::TrainConfig,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub sa: SaArgs,
    #[command(flatten)]
    pub study: crate::common::StudyArgs,
}

#[derive(Args)]
pub struct OneshotArgs {
    #[command(flatten)]
    pub search: Search,
    /// Epochs of supernet training.
    #[arg(long, default_value_t = 5)]
    pub supernet_epochs: usize,
    /// The supernet trains on the first N training images (default: all but the
    /// --eval-images).
    #[arg(long)]
    pub train_images: Option<usize>,
    /// The supernet's training recipe (the seed also draws its subnets and the search's).
    #[command(flatten)]
    pub recipe: crate::common::FinetuneFlags,
    /// Training images each candidate's batch-norm statistics are recomputed on.
    #[arg(long, default_value_t = 512)]
    pub calibration_images: usize,
    /// Write the supernet (OUT/supernet.safetensors, which a rerun in the same folder
    /// resumes from) every STEPS steps too, not only after every epoch (default: about once
    /// a minute).
    #[arg(long, value_name = "STEPS")]
    pub checkpoint_every: Option<usize>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A search's output folder.
    pub dir: PathBuf,
    /// Which candidate: 1 is the best evaluated one.
    #[arg(long, default_value_t = 1)]
    pub rank: usize,
    /// The model file to write (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the fresh weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A one-shot search's candidate keeps the weights it was scored with: its slices of the
    /// supernet (`supernet.safetensors` in the folder), with batch-norm statistics recomputed
    /// on the first --calibration-images training images of --data. Without it, the model
    /// starts from fresh weights, to be trained.
    #[arg(long)]
    pub inherit: bool,
    /// --inherit: the data the search ran on.
    #[arg(long, default_value = DEFAULT_SPEC)]
    pub data: String,
    /// --inherit: images for the batch-norm statistics (the search's --calibration-images).
    #[arg(long, default_value_t = 512)]
    pub calibration_images: usize,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(cmd: NasCommand) -> Result<(), Failure> {
    match cmd {
        NasCommand::Sa(a) => run_sa(a, None),
        NasCommand::Worker(a) => {
            let opts = a.study.options()?;
            let store = a
                .study
                .open()?
                .ok_or_else(|| input_error("`slim nas worker` needs --study NAME"))?;
            run_sa(a.sa, Some((&store, opts)))
        }
        NasCommand::Oneshot(a) => run_oneshot(a),
        NasCommand::Export(a) => run_export(a),
    }
}

fn run_sa(a: SaArgs, study: Option<(&dyn StudyStore, WorkerOptions)>) -> Result<(), Failure> {
    let cfg = crate::common::checked(&a.recipe)?;
    let options = NasOptions {
        train_images: Some(a.train_images),
        candidate_epochs: cfg.epochs,
        ..a.search.options.clone()
    };
    search(&a.search, Method::Train, &options, &cfg, None, study)
}

fn run_oneshot(a: OneshotArgs) -> Result<(), Failure> {
    let cfg = a.recipe.config(a.supernet_epochs)?;
    cfg.validate()?;
    let options = NasOptions {
        train_images: a.train_images,
        supernet_epochs: Some(a.supernet_epochs),
        calibration_images: a.calibration_images,
        ..a.search.options.clone()
    };
    let every = a.checkpoint_every.map(CheckpointEvery::Steps);
    search(&a.search, Method::OneShot, &options, &cfg, every, None)
}

/// Checks the flags, loads what the search needs (the latency table, the model to reproduce,
/// the data), searches with `slim_nas::run`, and prints its table or JSON.
fn search(
    s: &Search,
    method: Method,
    options: &NasOptions,
    cfg: &TrainConfig,
    checkpoint: Option<CheckpointEvery>,
    study: Option<(&dyn StudyStore, WorkerOptions)>,
) -> Result<(), Failure> {
    let o = &s.options;
    match (&o.latency_table, o.max_latency_ms) {
        (Some(_), None) => return Err(input_error("--latency-table needs --max-latency-ms")),
        (None, Some(_)) => {
            return Err(input_error(
                "--max-latency-ms needs --latency-table (an f32 table from `slim latency build`)",
            ))
        }
        _ => {}
    }
    if s.out.exists() && !s.out.is_dir() {
        return Err(input_error(format!(
            "--out {}: not a folder",
            s.out.display()
        )));
    }
    crate::common::check_out_dir("--out", &s.out)?;
    options.validate(method, o.latency_table.is_some())?;
    let cost = match &o.latency_table {
        Some(p) => Some(LatencyCost::load(p, o.fallback)?),
        None => None,
    };
    let device = s.common.device()?;
    let teacher = match &s.teacher {
        Some(path) => Some(crate::common::load_model(path, &device, &s.common.load)?),
        None => None,
    };
    let data = match &teacher {
        Some(t) => crate::common::load_data_for(&s.data, None, t)?,
        None => crate::common::load_data(&s.data, None, None)?,
    };
    if teacher.is_none() && !data.train.is_labeled() {
        return Err(input_error(format!(
            "`{}` has no labels: give --teacher MODEL, a model for the candidates to reproduce",
            s.data
        )));
    }
    let _out = slim_core::io::OutputDir::create(&s.out)?;
    let inputs = Inputs {
        data: &data,
        teacher: teacher.as_ref(),
        cost: cost.as_ref().map(|c| c as &dyn CostModel),
        train: cfg,
        device: &device,
        out: &s.out,
        entering_macs: None,
        checkpoint: checkpoint.unwrap_or_default(),
        study,
    };
    let mut show = Shown::new(s.common.quiet, teacher.is_some());
    let (found, report) = slim_nas::run::run(method, options, inputs, &mut |p| show.progress(p))?;
    let result = &found.result;
    if s.common.json {
        let mut j = result.to_json();
        j["reward"] = json!(if teacher.is_some() {
            "agreement"
        } else {
            "top1"
        });
        j["baseline"] =
            json!({"measure": result.baseline, "meets_limits": result.baseline_feasible});
        j["seconds"] = json!(report.seconds);
        j["out"] = json!(s.out);
        outln!("{}", crate::common::with_skipped(j));
    } else {
        out!("{}", report.markdown);
        outln!(
            "history, plots (reward.svg, {}) and this table in {}",
            report.cost_plot,
            s.out.display()
        );
    }
    Ok(())
}

/// A search's progress on the terminal: a bar for the supernet's epochs, a line per candidate.
struct Shown {
    quiet: bool,
    metric: &'static str,
    bar: Option<indicatif::ProgressBar>,
}

impl Shown {
    fn new(quiet: bool, reproduces: bool) -> Self {
        let metric = if reproduces { "agreement" } else { "top-1" };
        Shown {
            quiet,
            metric,
            bar: None,
        }
    }

    fn progress(&mut self, p: Progress<'_>) {
        if self.quiet {
            return;
        }
        match p {
            Progress::Supernet(p) => self.supernet(p),
            Progress::Search(p) => self.search(p),
        }
    }

    fn supernet(&mut self, p: &SupernetProgress) {
        if let SupernetProgress::Step {
            epoch,
            epochs,
            step,
            steps,
            loss,
        } = p
        {
            let template = "supernet epoch {prefix} [{bar:30}] {pos}/{len} {msg}";
            let b = self
                .bar
                .get_or_insert_with(|| crate::common::bar(*steps as u64, false, template));
            b.set_prefix(format!("{}/{epochs}", epoch + 1));
            b.set_position(*step as u64 + 1);
            b.set_message(format!("loss {loss:.4}"));
            return;
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if let Some(line) = p.describe() {
            eprintln!("{line}");
        }
    }

    fn search(&self, p: NasProgress<'_>) {
        if let Some(line) = p.describe(self.metric) {
            eprintln!("{line}");
        }
    }
}

fn run_export(a: ExportArgs) -> Result<(), Failure> {
    crate::common::check_out_dir("--out", &a.out)?;
    if a.rank == 0 {
        return Err(input_error("--rank starts at 1 (the best candidate)"));
    }
    let folder = SearchFolder::open(&a.dir)?;
    let c = folder.candidate(a.rank)?;
    let device = a.common.device()?;
    let (model, inherited) = if a.inherit {
        let file = a.dir.join("supernet.safetensors");
        if !file.is_file() {
            return Err(input_error(format!(
                "--inherit: {} holds no supernet ({} is missing); only one-shot searches have one",
                a.dir.display(),
                file.display()
            )));
        }
        if a.calibration_images == 0 {
            return Err(input_error("--calibration-images must be at least 1"));
        }
        let supernet = crate::common::load_model(&file, &device, &a.common.load)?;
        let data = crate::common::load_data(&a.data, None, Some(folder.input))?;
        let weights = Weights::Inherited {
            supernet: &supernet,
            data: &data,
            calibration_images: a.calibration_images,
        };
        folder.export(c, weights, &device)?
    } else {
        folder.export(c, Weights::Fresh { seed: a.seed }, &device)?
    };
    model.save(&a.out)?;
    if a.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(json!({"out": a.out, "rank": a.rank, "candidate": c,
                "space": folder.name, "inherited": inherited}))
        );
        return Ok(());
    }
    outln!(
        "{}: rank {} of {} ({}: {}), {} {:.2}% in the search, {} MACs, {} params",
        a.out.display(),
        a.rank,
        folder.ranked().len(),
        folder.name,
        c.arch,
        folder.reward_name(),
        c.reward.unwrap_or(f64::NAN) * 100.0,
        slim_core::analysis::human(c.measure.macs),
        slim_core::analysis::human(c.measure.params)
    );
    if let Some((top1, i)) = inherited.as_ref().and_then(|i| Some((i.test_top1?, i))) {
        outln!(
            "weights inherited from the supernet: top-1 {:.2}% on the test split{}",
            top1 * 100.0,
            match i.same_calibration {
                true => "",
                false => " (batch-norm statistics from other images than the search's)",
            }
        );
    }
    Ok(())
}
