//! `slim prune` and `slim sensitivity`.

use std::path::PathBuf;
use std::time::Instant;

use clap::{ArgGroup, Args};
use indicatif::ProgressBar;
use serde_json::json;
use slim_core::search::{Evaluator, SearchProgress};
use slim_core::study::{StudyStore, WorkerProgress};
use slim_core::Model;
use slim_prune::pruner::{check_ratio, check_reduction};
use slim_prune::run::{Choice, Inputs, Progress, PruneOptions, PruneOutcome};
use slim_prune::sensitivity::{self, default_ratios, Sensitivities, SensitivityProgress};
use slim_prune::Criterion;

use crate::common::{bar, check_out_dir, Common, EpochBars};
use crate::{input_error, Failure};

/// Options shared by `prune` and `sensitivity`.
#[derive(Args, Clone, Debug)]
pub struct Selection {
    /// How channels are ranked: l1_norm, l2_norm, fpgm or bn_scale.
    #[arg(long, default_value = "l1_norm")]
    pub criterion: String,
    /// Glob patterns over the layers (or their parameters) whose output channels may be
    /// pruned; default: every prunable group.
    #[arg(long, num_args = 1..)]
    pub scope: Vec<String>,
    #[arg(long, help = crate::common::data_help(
        "Data (default: the data the model was trained on, from its file, else the bundled \
         MNIST subset; without labels, fine-tuning reproduces the original)"))]
    pub data: Option<String>,
    /// Evaluate on the first N test images only (sensitivity and search rewards).
    #[arg(long)]
    pub eval_samples: Option<usize>,
    /// Recompute batch-norm statistics of each pruned model on this many training images
    /// (0: keep the stored statistics). Needs data; models without batch norm ignore it.
    #[arg(long, default_value_t = 640)]
    pub bn_calibration: usize,
}

impl Selection {
    fn criterion(&self) -> Result<Criterion, Failure> {
        Ok(self.criterion.parse::<Criterion>()?)
    }
    /// The data spec to use for a model: `--data`, else the model's own, else the default.
    fn data_spec(&self, model: &Model) -> String {
        crate::common::data_spec(self.data.as_deref(), model)
    }
    /// The options these flags give (the rest as pruning's defaults).
    fn options(&self) -> Result<PruneOptions, Failure> {
        if self.eval_samples == Some(0) {
            return Err(input_error("--eval-samples must be at least 1"));
        }
        Ok(PruneOptions {
            criterion: self.criterion()?,
            scope: self.scope.clone(),
            bn_calibration: self.bn_calibration,
            eval_samples: self.eval_samples,
            ..PruneOptions::default()
        })
    }
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["ratio", "flops_reduction"])))]
pub struct PruneArgs {
    /// The model file to prune (.safetensors, or .onnx).
    pub file: PathBuf,
    /// Remove this fraction of the channels of every group in scope (uniform).
    #[arg(long)]
    pub ratio: Option<f64>,
    /// Remove this fraction of the multiply-adds (0.5: half), in (0, 1).
    #[arg(long)]
    pub flops_reduction: Option<f64>,
    #[arg(long, value_enum, default_value = "uniform")]
    pub method: Choice,
    /// Sensitivity files (from `slim sensitivity`) for --method sensitivity, or to start
    /// --method auto from; several are merged.
    #[arg(long, num_args = 1..)]
    pub sensitivity: Vec<PathBuf>,
    #[command(flatten)]
    pub selection: Selection,
    /// Fine-tune the pruned model for N epochs on the training split.
    #[arg(long, default_value_t = 0)]
    pub finetune_epochs: usize,
    #[command(flatten)]
    pub checkpoint: crate::common::CheckpointArgs,
    /// Without labels: fine-tune the pruned model to reproduce the original's outputs and
    /// measure fidelity to it (top-1 agreement) instead of accuracy. Data without labels
    /// (`unlabeled:DIR`) is always used this way.
    #[arg(long)]
    pub label_free: bool,
    /// The fine-tuning's recipe (and the search's seed).
    #[command(flatten)]
    pub recipe: crate::common::FinetuneFlags,
    /// --method auto: the search algorithm.
    #[arg(long, default_value = "annealing", value_parser = ["annealing", "evolution"])]
    pub search: String,
    /// --method auto: candidates evaluated.
    #[arg(long, default_value_t = 30)]
    pub trials: usize,
    /// --method auto: before its reward is measured, fine-tune each candidate for one pass
    /// over the first N training images (with the fine-tuning options; 0: no fine-tune).
    #[arg(long, default_value_t = 0)]
    pub reward_finetune_images: usize,
    /// --method auto: the search history (resumed if it exists); default OUT.search.json.
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// The pruned model file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// --method auto with --study: this process is one worker of a search shared through
    /// Redis; start any number with the same arguments (each writes its --out from the
    /// study's best).
    #[command(flatten)]
    pub study: crate::common::StudyArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Checks everything about the arguments before any work; the study's worker options.
fn check_prune_args(args: &PruneArgs) -> Result<Option<slim_core::study::WorkerOptions>, Failure> {
    if let Some(r) = args.ratio {
        check_ratio(r)?;
        if args.method != Choice::Uniform {
            return Err(input_error(
                "--ratio is uniform pruning; --method sensitivity and auto take \
                 --flops-reduction",
            ));
        }
    }
    if let Some(f) = args.flops_reduction {
        check_reduction(f)?;
    }
    if args.method == Choice::Sensitivity && args.sensitivity.is_empty() {
        return Err(input_error(
            "--method sensitivity needs --sensitivity FILE (from `slim sensitivity`)",
        ));
    }
    if args.method == Choice::Auto && args.trials == 0 {
        return Err(input_error("--trials must be at least 1"));
    }
    if args.reward_finetune_images > 0 && args.reward_finetune_images < args.recipe.batch_size {
        return Err(input_error(format!(
            "--reward-finetune-images {} is less than one batch (--batch-size {})",
            args.reward_finetune_images, args.recipe.batch_size
        )));
    }
    check_out_dir("--out", &args.out)?;
    Ok(match &args.study.study {
        Some(_) if args.method != Choice::Auto => {
            return Err(input_error(
                "--study shares a search: it needs --method auto",
            ));
        }
        Some(_) if args.history.is_some() => {
            return Err(input_error(
                "--study keeps the history in Redis; --history is for a search on one machine",
            ));
        }
        Some(_) => Some(args.study.options()?),
        None => None,
    })
}

/// `slim prune`'s flags as the method's options.
fn prune_options(args: &PruneArgs) -> Result<(Choice, PruneOptions), Failure> {
    let choice = args.method;
    let options = PruneOptions {
        ratio: args.ratio,
        flops_reduction: args.flops_reduction,
        trials: args.trials,
        search: args.search.clone(),
        finetune_epochs: args.finetune_epochs,
        lr: Some(args.recipe.lr),
        ..args.selection.options()?
    };
    Ok((choice, options))
}

/// The search's history file (--method auto on this machine): --history, else beside --out.
fn history_file(args: &PruneArgs, shared: bool) -> Result<Option<PathBuf>, Failure> {
    if args.method != Choice::Auto || shared {
        return Ok(None);
    }
    let history = args.history.clone().unwrap_or_else(|| {
        let mut p = args.out.clone().into_os_string();
        p.push(".search.json");
        p.into()
    });
    check_out_dir("--history", &history)?;
    Ok(Some(history))
}

/// The search's progress bar (--method auto), and the study worker's messages.
fn search_bar(args: &PruneArgs) -> ProgressBar {
    bar(
        args.trials as u64,
        args.common.quiet || args.method != Choice::Auto,
        "search [{bar:30}] {pos}/{len} {msg}",
    )
}

pub fn run_prune(args: PruneArgs) -> Result<(), Failure> {
    let study = check_prune_args(&args)?;
    let (choice, options) = prune_options(&args)?;
    let ft = args.recipe.config(args.finetune_epochs)?;
    let history = history_file(&args, study.is_some())?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let needs_data = args.finetune_epochs > 0 || args.method == Choice::Auto;
    let data = if needs_data || args.selection.data.is_some() {
        Some(crate::common::data_for(
            &args.selection.data_spec(&model),
            &model,
        )?)
    } else {
        None
    };
    let label_free = data
        .as_ref()
        .is_some_and(|d| crate::common::label_free(args.label_free, d));
    if label_free && args.method == Choice::Auto {
        return Err(input_error(
            "--method auto scores candidates by their accuracy on labels; without labels, \
             prune with --ratio or --flops-reduction (uniform, or from sensitivity files)",
        ));
    }
    let sensitivities = Sensitivities::load_for(&args.sensitivity, &model)?;
    let store = match &study {
        Some(_) => Some(
            args.study
                .open()?
                .ok_or_else(|| input_error("no --study"))?,
        ),
        None => None,
    };
    let started = Instant::now();
    let inputs = Inputs {
        data: data.as_ref(),
        label_free,
        sensitivities,
        history,
        study: store.as_ref().map(|s| s as &dyn StudyStore).zip(study),
        reward_finetune_images: args.reward_finetune_images,
        reward_recipe: ft.clone(),
        seed: args.recipe.seed,
        measure: true,
        ..Default::default()
    };
    let ckpt = crate::common::checkpoint_path(&args.out);
    let finetune = (args.finetune_epochs > 0).then(|| args.checkpoint.finetuning(ft, &ckpt));
    let (b, mut bars) = (search_bar(&args), EpochBars::new(args.common.quiet));
    let show = |index: usize, reward: f64, best: f64| {
        b.set_position(index as u64 + 1);
        b.set_message(format!(
            "top-1 {:.2}%, best {:.2}%",
            reward * 100.0,
            best * 100.0
        ));
    };
    let (mut pruned, mut outcome) = slim_prune::run::compress(
        &model,
        choice,
        &options,
        inputs,
        finetune.as_ref(),
        &mut |p| match p {
            Progress::Search(SearchProgress::Replayed { index, .. }) => {
                b.set_position(index as u64 + 1)
            }
            Progress::Search(SearchProgress::Evaluated {
                index, trial, best, ..
            })
            | Progress::Worker(WorkerProgress::Reported {
                index, trial, best, ..
            }) => show(index, trial.reward, best),
            Progress::Worker(other) if !args.common.quiet => {
                b.suspend(|| crate::common::show_worker(&other))
            }
            Progress::Train(p) => {
                if !b.is_finished() {
                    b.finish_and_clear();
                }
                bars.update(p)
            }
            _ => {}
        },
    )?;
    b.finish_and_clear();
    pruned
        .provenance
        .insert("pruned_from".into(), args.file.display().to_string());
    pruned.save(&args.out)?;
    args.checkpoint.finished(&ckpt);
    outcome.before = outcome.before.with_file(&args.file)?;
    outcome.after = outcome.after.with_file(&args.out)?;
    print_prune(&args, &outcome, started.elapsed().as_secs_f64());
    Ok(())
}

/// What the pruning did: the JSON report, or the before/after table.
fn print_prune(args: &PruneArgs, outcome: &PruneOutcome, seconds: f64) {
    let (report, trained) = (&outcome.report, outcome.finetune.as_ref());
    if args.common.json {
        let (before, after) = (&outcome.before, &outcome.after);
        outln!(
            "{}",
            crate::common::with_skipped(json!({
                "model": args.file,
                "method": report.method,
                "criterion": report.criterion,
                "before": before,
                "after": after,
                "flops_reduction": 1.0 - after.macs as f64 / before.macs.max(1) as f64,
                "groups": report.groups,
                "skipped": report.skipped,
                "finetune": trained.map(|t| &t.epochs),
                "resumed_from": trained.map_or(0, |t| t.resumed_from),
                "resumed_at_step": trained.map_or(0, |t| t.resumed_at_step),
                "fidelity": outcome.fidelity,
                "search": report.search,
                "seconds": seconds,
                "out": args.out,
            }))
        );
        return;
    }
    out!("{}", outcome.table());
    outln!(
        "{} pruned ({}, {}): {} written in {:.1} s",
        args.file.display(),
        report.method,
        report.criterion,
        args.out.display(),
        seconds
    );
}

#[derive(Args)]
pub struct SensitivityArgs {
    /// The model file to analyse (.safetensors, or .onnx).
    pub file: PathBuf,
    /// The sensitivity file (JSON); an existing one for this model is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Ratios to analyse, comma-separated (default 0.1,0.2,...,0.9).
    #[arg(long, value_delimiter = ',')]
    pub ratios: Vec<f64>,
    /// Also draw the curves as an SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Merge these sensitivity files (of the same model) into --out instead of analysing.
    #[arg(long, num_args = 1..)]
    pub merge: Vec<PathBuf>,
    #[command(flatten)]
    pub selection: Selection,
    #[command(flatten)]
    pub common: Common,
}

pub fn run_sensitivity(args: SensitivityArgs) -> Result<(), Failure> {
    let ratios = if args.ratios.is_empty() {
        default_ratios()
    } else {
        args.ratios.clone()
    };
    for &r in &ratios {
        check_ratio(r)?;
    }
    check_out_dir("--out", &args.out)?;
    if let Some(p) = &args.plot {
        check_out_dir("--plot", p)?;
    }
    args.selection.criterion()?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let started = Instant::now();
    let merged = Sensitivities::load_for(&args.merge, &model)?;
    let sens = if let Some(merged) = merged {
        merged.save(&args.out)?;
        merged
    } else {
        let data = crate::common::load_spec(&args.selection.data_spec(&model))?;
        let o = args.selection.options()?;
        let pruner = slim_prune::run::pruner(&model, &o, Some(&data))?;
        let (evaluator, eval) = slim_prune::run::eval_set(&o, &data);
        let total = (pruner.scope().len() * ratios.len()) as u64;
        let b = bar(
            total,
            args.common.quiet,
            "sensitivity [{bar:30}] {pos}/{len} {msg}",
        );
        let s = sensitivity::analyze(
            &pruner,
            &evaluator as &dyn Evaluator,
            &ratios,
            &eval,
            Some(&args.out),
            &|p| match p {
                SensitivityProgress::Start { done, .. } => b.set_position(done as u64),
                SensitivityProgress::Point {
                    group,
                    ratio,
                    loss,
                    done,
                    ..
                } => {
                    b.set_position(done as u64);
                    b.set_message(format!("{group} at {ratio:.2}: loss {:.2}%", loss * 100.0));
                }
            },
        )?;
        b.finish_and_clear();
        s
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(p) = &args.plot {
        slim_core::io::write_atomic(p, sensitivity::to_svg(&sens).as_bytes())?;
    }
    print_sensitivity(&args, &sens, seconds);
    Ok(())
}

/// The sensitivities: the JSON report, or the table of losses by group and ratio.
fn print_sensitivity(args: &SensitivityArgs, sens: &Sensitivities, seconds: f64) {
    if args.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(
                json!({"model": args.file, "out": args.out, "plot": args.plot, "baseline": sens.baseline,
                   "criterion": sens.criterion.name(), "data": sens.data, "points": sens.len(),
                   "seconds": seconds, "groups": sens.groups})
            )
        );
        return;
    }
    out!("{}", sens.table());
    outln!(
        "{} points on {} in {:.1} s; {} written{}",
        sens.len(),
        sens.data,
        seconds,
        args.out.display(),
        args.plot
            .as_ref()
            .map(|p| format!(", plot {}", p.display()))
            .unwrap_or_default()
    );
}
