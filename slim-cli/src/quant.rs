//! `slim quant ptq`: post-training quantization to an int8 model file.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use slim_quant::strategy::{PtqOptions, QatOptions};

use crate::common::{check_out_dir, Common};
use crate::Failure;

#[derive(Subcommand)]
pub enum QuantCommand {
    /// Calibrate on a few batches and write an int8 model file.
    Ptq(PtqArgs),
    /// Train with fake-quantized weights and activations, then write an int8 model file.
    Qat(QatArgs),
}

#[derive(Args)]
pub struct QatArgs {
    /// The float model file (.safetensors, or .onnx).
    pub file: PathBuf,
    #[arg(long, help = crate::common::data_help(
        "Data (default: the data the model was trained on, else the bundled MNIST subset; \
         without labels, the fake-quantized model reproduces the float one)"))]
    pub data: Option<String>,
    #[command(flatten)]
    pub options: QatOptions,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub checkpoint: crate::common::CheckpointArgs,
    /// Without labels: the fake-quantized model learns to reproduce the float one's outputs,
    /// and the int8 result is measured by its fidelity to it (top-1 agreement) instead of
    /// accuracy. Data without labels (`unlabeled:DIR`) is always used this way.
    #[arg(long)]
    pub label_free: bool,
    /// The int8 model file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct PtqArgs {
    /// The float model file (.safetensors, or .onnx).
    pub file: PathBuf,
    #[arg(long, help = crate::common::data_help(
        "Data for calibration (training split) and evaluation (test split); default: the data \
         the model was trained on, else the bundled MNIST subset"))]
    pub data: Option<String>,
    #[command(flatten)]
    pub options: PtqOptions,
    /// The int8 model file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(cmd: QuantCommand) -> Result<(), Failure> {
    match cmd {
        QuantCommand::Ptq(args) => run_ptq(args),
        QuantCommand::Qat(args) => run_qat(args),
    }
}

fn run_ptq(args: PtqArgs) -> Result<(), Failure> {
    // The flags are the options of a `quant.ptq` stage, checked the same way.
    let cfg = args.options.validate()?;
    check_out_dir("--out", &args.out)?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let data = crate::common::data_for(
        &crate::common::data_spec(args.data.as_deref(), &model),
        &model,
    )?;
    let (q, mut outcome) = slim_quant::compress::ptq(&model, &data, &cfg)?;
    q.save(&args.out)?;
    outcome.before = outcome.before.with_file(&args.file)?;
    outcome.after = outcome.after.with_file(&args.out)?;
    if args.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(json!({
                "model": args.file, "data": data.spec,
                "weights": cfg.weights.name(), "activations": cfg.activations.name(),
                "before": outcome.before, "after": outcome.after,
                "simulated_top1": outcome.simulated_top1, "fidelity": outcome.fidelity,
                "calibration": outcome.calibration, "out": args.out,
            }))
        );
        return Ok(());
    }
    out!("{}", outcome.table("int8"));
    if let Some(top1) = outcome.simulated_top1 {
        outln!(
            "int8 top-1 from the int8 runtime ({:.2}% by the fake-quantized float graph)",
            top1 * 100.0
        );
    }
    if let Some(report) = &outcome.calibration {
        outln!(
            "{} layers quantized (weights {}, activations {}) and {} of their outputs that no \
             quantized layer reads, {} batch norms folded, calibrated on {} images in {:.1} s",
            report.layers.len(),
            cfg.weights,
            cfg.activations,
            report.outputs.len(),
            report.folded_batch_norms,
            report.calibration_images,
            report.seconds,
        );
    }
    outln!("{} written", args.out.display());
    Ok(())
}

/// `slim quant qat`'s flags as the options of a `quant.qat` stage, checked the same way, and
/// the training recipe (the rest of it is the command's).
fn qat_settings(
    args: &QatArgs,
) -> Result<
    (
        slim_quant::strategy::QatSettings,
        slim_core::train::TrainConfig,
    ),
    Failure,
> {
    let settings = args.options.validate()?;
    let tcfg = settings.recipe(&slim_core::train::TrainConfig {
        batch_size: args.batch_size,
        seed: args.seed,
        ..Default::default()
    });
    tcfg.validate()?;
    Ok((settings, tcfg))
}

fn run_qat(args: QatArgs) -> Result<(), Failure> {
    let (settings, tcfg) = qat_settings(&args)?;
    check_out_dir("--out", &args.out)?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let data = crate::common::data_for(
        &crate::common::data_spec(args.data.as_deref(), &model),
        &model,
    )?;
    let mut bars = crate::common::EpochBars::new(args.common.quiet);
    let ckpt = crate::common::checkpoint_path(&args.out);
    let how = slim_core::pipeline::Finetuning {
        eval_each_epoch: false,
        ..args.checkpoint.finetuning(tcfg, &ckpt)
    };
    // Without labels, the fake-quantized model learns to reproduce the float one.
    let label_free = crate::common::label_free(args.label_free, &data);
    let (int8, mut outcome) =
        slim_quant::compress::qat(&model, &data, &settings, &how, label_free, &mut |p| {
            bars.update(p)
        })?;
    int8.save(&args.out)?;
    args.checkpoint.finished(&ckpt);
    outcome.before = outcome.before.with_file(&args.file)?;
    outcome.after = outcome.after.with_file(&args.out)?;
    let trained = outcome.train.as_ref();
    if args.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(json!({
                "model": args.file, "data": data.spec, "weights": settings.weights.name(),
                "before": outcome.before, "after": outcome.after, "fidelity": outcome.fidelity,
                "epochs": args.options.epochs,
                "resumed_from": trained.map_or(0, |t| t.resumed_from),
                "resumed_at_step": trained.map_or(0, |t| t.resumed_at_step),
                "out": args.out,
            }))
        );
        return Ok(());
    }
    out!("{}", outcome.table("int8 (QAT)"));
    outln!("{} written", args.out.display());
    Ok(())
}
