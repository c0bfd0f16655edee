//! `slim compress`: a pipeline of strategies from a TOML file, run in order by
//! `slim_pipeline`, with a results table and a report in the output folder.

use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use serde_json::json;
use slim_pipeline::{Events, Pipeline, RunOptions, DEFAULT_CONFIG};

use crate::common::{Common, EpochBars};
use crate::{input_error, Failure};

#[derive(Args)]
pub struct CompressArgs {
    /// The pipeline configuration (TOML); default: a built-in pipeline on the bundled data.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Compress this model file (.safetensors, or .onnx) with the default pipeline for a
    /// model: prune 30% of its MACs with one fine-tuning epoch, quantize to int8, and export
    /// the int8 model for ONNX Runtime (QDQ, model.int8.onnx in the output folder, beside
    /// pipeline.toml, the configuration it ran). Without labels (--data unlabeled:DIR) the
    /// fine-tuning reproduces the original, and the table gives the agreement with it.
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    #[arg(long, requires = "model", help = crate::common::data_help(
        "--model: the data (default: the data the model was trained on, from its file, else \
         the bundled MNIST subset)"))]
    pub data: Option<String>,
    /// Only check the configuration.
    #[arg(long)]
    pub check: bool,
    /// Continue a stopped pipeline in its output folder.
    #[arg(long)]
    pub resume: bool,
    /// Start over in an output folder that holds another (or this) pipeline's results.
    #[arg(long)]
    pub force: bool,
    /// The output folder (overrides the configuration's).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// Checks a pipeline configuration as `slim compress --check` does (the model file and the
/// latency tables it names are read), and returns the kinds of its strategies in order.
/// `origin` names the configuration in messages.
pub fn check_config(text: &str, origin: &str) -> Result<Vec<String>, Failure> {
    Ok(slim_pipeline::check_config(text, origin)?)
}

/// The pipeline configuration for `--model FILE` ([`slim_pipeline::model_config`]), with the
/// data the model was trained on unless `--data` says otherwise.
fn model_config(file: &std::path::Path, args: &CompressArgs) -> Result<String, Failure> {
    let model = crate::common::load_model(file, &args.common.device()?, &args.common.load)?;
    let spec = crate::common::data_spec(args.data.as_deref(), &model);
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("slim-out"));
    Ok(slim_pipeline::model_config(file, &spec, &dir))
}

pub fn run(args: CompressArgs) -> Result<(), Failure> {
    let (text, origin) = match (&args.config, &args.model) {
        (Some(p), _) => (
            std::fs::read_to_string(p).map_err(|e| input_error(format!("{}: {e}", p.display())))?,
            p.display().to_string(),
        ),
        (None, Some(m)) => (
            model_config(m, &args)?,
            format!("the default pipeline for {}", m.display()),
        ),
        (None, None) => (
            DEFAULT_CONFIG.to_string(),
            "the default pipeline".to_string(),
        ),
    };
    let mut pipeline = Pipeline::parse(&text, &origin)?;
    if args.check {
        let kinds = pipeline.kinds();
        if args.common.json {
            outln!(
                "{}",
                crate::common::with_skipped(json!({"config": origin, "ok": true,
                       "strategies": kinds}))
            );
        } else {
            outln!(
                "{origin}: ok ({} strategies: {})",
                kinds.len(),
                kinds.join(", ")
            );
        }
        return Ok(());
    }
    let quiet = args.common.quiet;
    let device = args.common.device()?;
    let load_model = |p: &std::path::Path| {
        crate::common::load_model(p, &device, &args.common.load).map_err(pipeline_error)
    };
    let load_data = |spec: &str| crate::common::load_spec(spec).map_err(pipeline_error);
    let options = RunOptions {
        dir: args.out.clone(),
        resume: args.resume,
        force: args.force,
        device: device.clone(),
        export: args.model.is_some(),
        load_model: Some(&load_model),
        load_data: Some(&load_data),
        quiet,
    };
    let spinner = Spinner::new(quiet);
    let mut bars = EpochBars::new(quiet);
    let events = Events {
        note: &|m| {
            if !quiet {
                eprintln!("{m}");
            }
        },
        progress: &mut |p| bars.update(p),
        status: &|m| spinner.show(m),
    };
    let report = pipeline.run(&options, events)?;
    for w in &report.warnings {
        if !quiet {
            eprintln!("warning: {w}");
        }
    }
    if args.common.json {
        outln!("{}", report.json);
        return Ok(());
    }
    out!("{}", report.table);
    outln!(
        "{} stages in {:.1} s; models, report.md and report.json in {}",
        report.stages.len(),
        report.seconds,
        report.dir.display()
    );
    if let Some(p) = &report.onnx {
        outln!(
            "the int8 model for ONNX Runtime (QDQ): {}; the pipeline it ran: {}",
            p.display(),
            report.dir.join("pipeline.toml").display()
        );
    }
    Ok(())
}

/// A reader's failure as the pipeline's error, keeping whether it was the user's input.
fn pipeline_error(f: Failure) -> slim_pipeline::PipelineError {
    slim_pipeline::PipelineError::new(format!("{:#}", f.error), f.code == 2)
}

/// A one-line status display on stderr while a stage works (hidden with --quiet or when
/// stderr is no terminal); an empty line clears it.
struct Spinner {
    quiet: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Spinner {
    fn new(quiet: bool) -> Self {
        Spinner {
            quiet,
            bar: Mutex::new(None),
        }
    }

    fn show(&self, message: &str) {
        let Ok(mut bar) = self.bar.lock() else { return };
        if message.is_empty() {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            return;
        }
        if self.quiet {
            return;
        }
        bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        })
        .set_message(message.to_string());
    }
}
