//! `slim quant ptq`: post-training quantization to an int8 model file.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use slim_core::analysis::human;
use slim_core::train::evaluate;
use slim_quant::ptq::quantize;
use slim_quant::strategy::{PtqOptions, QatOptions};

use crate::common::{check_out_dir, Common};
use crate::output::table;
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
    #[arg(long, default_value_t = QatOptions::default().epochs)]
    pub epochs: usize,
    /// The default recipe (SGD with momentum 0.9, lr 0.001, cosine) fine-tunes gently: the
    /// float model's weights move only as far as the integer grid asks.
    #[arg(long, default_value_t = QatOptions::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// sgd, adam or adamw.
    #[arg(long, default_value_t = QatOptions::default().optimizer)]
    pub optimizer: String,
    /// constant, cosine, or step:EVERY:GAMMA.
    #[arg(long, default_value_t = QatOptions::default().schedule)]
    pub schedule: String,
    /// abs_max or channel_wise_abs_max.
    #[arg(long, default_value_t = QatOptions::default().weights)]
    pub weights: String,
    /// Calibration batches that set the first activation scales.
    #[arg(long, default_value_t = QatOptions::default().calib_batches)]
    pub calib_batches: usize,
    /// How activation scales follow the batches while training: moving_average_abs_max (a
    /// moving average of each batch's absolute maximum) or range_abs_max (the largest of the
    /// last --window-size batches').
    #[arg(long, default_value_t = QatOptions::default().activations)]
    pub activations: String,
    /// range_abs_max's window, in batches.
    #[arg(long, default_value_t = QatOptions::default().window_size)]
    pub window_size: usize,
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
    /// abs_max or channel_wise_abs_max.
    #[arg(long, default_value_t = PtqOptions::default().weights)]
    pub weights: String,
    /// abs_max, avg, moving_average_abs_max, hist, mse or kl.
    #[arg(long, default_value_t = PtqOptions::default().activations)]
    pub activations: String,
    #[arg(long, default_value_t = PtqOptions::default().calib_batches)]
    pub calib_batches: usize,
    #[arg(long, default_value_t = PtqOptions::default().batch_size)]
    pub batch_size: usize,
    /// Bits of the weights (2 to 8).
    #[arg(long, default_value_t = PtqOptions::default().bits_weights)]
    pub bits_weights: u8,
    /// Layers to quantize (glob patterns); default: every convolution and linear layer.
    #[arg(long, num_args = 1..)]
    pub scope: Vec<String>,
    /// Keep batch norms instead of folding them into the convolutions.
    #[arg(long)]
    pub no_fold: bool,
    /// Correct each quantized layer's bias so that its outputs keep their float means on the
    /// calibration images.
    #[arg(long)]
    pub bias_correction: bool,
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
    let cfg = PtqOptions {
        weights: args.weights.clone(),
        activations: args.activations.clone(),
        calib_batches: args.calib_batches,
        batch_size: args.batch_size,
        bits_weights: args.bits_weights,
        scope: args.scope.clone(),
        fold_batch_norm: !args.no_fold,
        bias_correction: args.bias_correction,
    }
    .validate()?;
    check_out_dir("--out", &args.out)?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let spec = crate::common::data_spec(args.data.as_deref(), &model);
    let data = crate::common::data_for(&spec, &model)?;
    let (q, report) = quantize(&model, &data.train, &data.normalize, &cfg)?;
    if !data.test.is_labeled() {
        let details = json!({"weights": cfg.weights.name(), "activations": cfg.activations.name(),
                             "calibration": report});
        return int8_without_labels(
            "int8",
            &args.file,
            &args.out,
            &args.common,
            &model,
            &q,
            &data,
            details,
        );
    }
    let before = evaluate(&model, &data.test, &data.normalize, 256)?;
    // The int8 model's accuracy comes from the int8 runtime; the fake-quantized float graph
    // is the reference it is checked against.
    let after = slim_quant::runtime::evaluate(&q, &data.test, &data.normalize, 256)?;
    let simulated = evaluate(&q, &data.test, &data.normalize, 256)?;
    q.save(&args.out)?;
    let (b_bytes, a_bytes) = (
        std::fs::metadata(&args.file)?.len(),
        std::fs::metadata(&args.out)?.len(),
    );
    if args.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(json!({
                "model": args.file, "data": spec,
                "weights": cfg.weights.name(), "activations": cfg.activations.name(),
                "before": {"top1": before.top1, "top5": before.top5, "bytes": b_bytes},
                "after": {"top1": after.top1, "top5": after.top5, "bytes": a_bytes},
                "simulated_top1": simulated.top1,
                "calibration": report, "out": args.out,
            }))
        );
        return Ok(());
    }
    print_comparison("int8", before.top1, after.top1, b_bytes, a_bytes);
    outln!(
        "int8 top-1 from the int8 runtime ({:.2}% by the fake-quantized float graph)",
        simulated.top1 * 100.0
    );
    outln!(
        "{} layers quantized (weights {}, activations {}) and {} of their outputs that no \
         quantized layer reads, {} batch norms folded, calibrated on {} images in {:.1} s; {} \
         written",
        report.layers.len(),
        cfg.weights,
        cfg.activations,
        report.outputs.len(),
        report.folded_batch_norms,
        report.calibration_images,
        report.seconds,
        args.out.display()
    );
    Ok(())
}

/// The end of quantization without labels: the int8 model (on the int8 runtime) is measured
/// by its fidelity to the float model on the held-out images, written, and reported with
/// `details` (the method's own figures) in the JSON.
#[allow(clippy::too_many_arguments)]
fn int8_without_labels(
    what: &str,
    file: &std::path::Path,
    out: &std::path::Path,
    common: &crate::common::Common,
    model: &slim_core::Model,
    q: &slim_core::Model,
    data: &slim_core::data::DataSplits,
    details: serde_json::Value,
) -> Result<(), Failure> {
    let kernels = slim_quant::runtime::Int8Kernels::new(q);
    let fidelity =
        slim_core::train::fidelity_with(q, model, &data.test, &data.normalize, 256, &|m, x| {
            Ok(vec![slim_quant::runtime::forward_with(m, &kernels, x)?])
        })?;
    q.save(out)?;
    let (b_bytes, a_bytes) = (
        std::fs::metadata(file)?.len(),
        std::fs::metadata(out)?.len(),
    );
    if common.json {
        let mut v = json!({
            "model": file, "data": data.spec,
            "before": {"bytes": b_bytes}, "after": {"bytes": a_bytes},
            "fidelity": fidelity, "out": out,
        });
        if let (Some(v), serde_json::Value::Object(d)) = (v.as_object_mut(), details) {
            v.extend(d);
        }
        outln!("{}", crate::common::with_skipped(v));
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = crate::common::fidelity_rows(&fidelity)
        .into_iter()
        .map(|(label, value)| vec![label, "100%".into(), value, "-".into()])
        .collect();
    rows.push(vec![
        "bytes".into(),
        human(b_bytes),
        human(a_bytes),
        format!("{:+.1}%", (a_bytes as f64 / b_bytes as f64 - 1.0) * 100.0),
    ]);
    out!("{}", table(&["", "f32", what, "change"], &rows));
    outln!(
        "no labels: the int8 model (int8 runtime) against the float one on {} held-out \
         images; {} written",
        fidelity.samples,
        out.display()
    );
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
    let settings = QatOptions {
        weights: args.weights.clone(),
        calib_batches: args.calib_batches,
        epochs: args.epochs,
        lr: args.lr,
        optimizer: args.optimizer.clone(),
        schedule: args.schedule.clone(),
        activations: args.activations.clone(),
        window_size: args.window_size,
    }
    .validate()?;
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
    let weights = settings.weights;
    let cfg = settings.calibration.clone();
    check_out_dir("--out", &args.out)?;
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let spec = crate::common::data_spec(args.data.as_deref(), &model);
    let data = crate::common::data_for(&spec, &model)?;
    let mut q = slim_quant::qat::prepare_with(
        &model,
        &data.train,
        &data.normalize,
        &cfg,
        settings.activations,
    )?;
    let kernels = slim_quant::qat::QatKernels { weights, bits: 8 };
    let mut bars = crate::common::EpochBars::new(args.common.quiet);
    let ckpt = crate::common::checkpoint_path(&args.out);
    // Without labels, the fake-quantized model learns to reproduce the float one.
    let label_free = crate::common::label_free(args.label_free, &data);
    let mut teacher = crate::common::reproduce_original(label_free, &model)?;
    let extra = crate::common::extra_terms(&mut teacher);
    let report = slim_core::train::train(
        &mut q,
        &data,
        &tcfg,
        slim_core::train::TrainOptions {
            kernels: Some(&kernels),
            checkpoint: Some(ckpt.clone()),
            resume: args.checkpoint.resume,
            checkpoint_every: args.checkpoint.every(),
            label_free,
            extra,
            ..Default::default()
        },
        &mut |p| bars.update(p),
    )?;
    let int8 = slim_quant::qat::convert(&q, weights, 8)?;
    if label_free {
        let details = json!({"weights": weights.name(), "epochs": args.epochs,
                             "resumed_from": report.resumed_from,
                             "resumed_at_step": report.resumed_at_step});
        int8_without_labels(
            "int8 (QAT)",
            &args.file,
            &args.out,
            &args.common,
            &model,
            &int8,
            &data,
            details,
        )?;
        if !args.checkpoint.keep_checkpoint {
            crate::common::remove_checkpoint(&ckpt);
        }
        return Ok(());
    }
    let before = evaluate(&model, &data.test, &data.normalize, 256)?;
    let after = slim_quant::runtime::evaluate(&int8, &data.test, &data.normalize, 256)?;
    int8.save(&args.out)?;
    if !args.checkpoint.keep_checkpoint {
        crate::common::remove_checkpoint(&ckpt);
    }
    let (b_bytes, a_bytes) = (
        std::fs::metadata(&args.file)?.len(),
        std::fs::metadata(&args.out)?.len(),
    );
    if args.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(
                json!({"model": args.file, "data": spec, "weights": weights.name(),
                   "before": {"top1": before.top1, "top5": before.top5, "bytes": b_bytes},
                   "after": {"top1": after.top1, "top5": after.top5, "bytes": a_bytes},
                   "epochs": args.epochs, "resumed_from": report.resumed_from,
                   "resumed_at_step": report.resumed_at_step, "out": args.out})
            )
        );
        return Ok(());
    }
    print_comparison("int8 (QAT)", before.top1, after.top1, b_bytes, a_bytes);
    outln!("{} written", args.out.display());
    Ok(())
}

/// The f32-against-int8 table: top-1 and file size, with the change.
fn print_comparison(
    label: &str,
    top1_before: f64,
    top1_after: f64,
    bytes_before: u64,
    bytes_after: u64,
) {
    let rows = vec![
        vec![
            "top-1".to_string(),
            format!("{:.2}%", top1_before * 100.0),
            format!("{:.2}%", top1_after * 100.0),
            format!("{:+.2} pt", (top1_after - top1_before) * 100.0),
        ],
        vec![
            "bytes".into(),
            human(bytes_before),
            human(bytes_after),
            format!(
                "{:+.1}%",
                (bytes_after as f64 / bytes_before as f64 - 1.0) * 100.0
            ),
        ],
    ];
    out!("{}", table(&["", "f32", label, "change"], &rows));
}
