//! `slim train` and `slim eval`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use slim_core::analysis::analyze;
use slim_core::data::DEFAULT_SPEC;
use slim_core::train::{evaluate, train, TrainOptions};
use slim_core::zoo::{self, ZooConfig};

use crate::common::{Common, EpochBars};
use crate::{input_error, Failure};

#[derive(Args)]
pub struct TrainArgs {
    /// Zoo model to train (lenet, vgg11, vgg16, resnet20, resnet56, resnet18, resnet50,
    /// mobilenet_v1, mobilenet_v2, mobilenet_tiny), or a model file to train from its
    /// weights (an architecture written by `slim nas export`, say).
    #[arg(long)]
    pub model: String,
    /// Width multiplier.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    #[arg(long, default_value = DEFAULT_SPEC, help = crate::common::data_help("Data"))]
    pub data: String,
    #[command(flatten)]
    pub recipe: slim_core::train::TrainConfig,
    /// The trained model file (.safetensors). A checkpoint is kept beside it as FILE.ckpt
    /// while the job runs (removed when it finishes).
    #[arg(long)]
    pub out: PathBuf,
    /// Train on the first N training images only (a quick run on a slice of the data).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub checkpoint: crate::common::CheckpointArgs,
    /// Flip training images horizontally at random (on for cifar10, off for the digit and
    /// clothing sets unless given).
    #[arg(long)]
    pub hflip: bool,
    /// Pad training images by N zero pixels and crop them back at a random offset (cifar10:
    /// 4 by default; 0 turns it off).
    #[arg(long, value_name = "N")]
    pub crop_padding: Option<usize>,
    #[command(flatten)]
    pub common: Common,
}

/// The model to train: a model file (an architecture from `slim nas export`, or a model to
/// train further), or a zoo name.
fn model_to_train(
    args: &TrainArgs,
    zcfg: ZooConfig,
    device: &candle_core::Device,
) -> Result<slim_core::Model, Failure> {
    let as_file = std::path::Path::new(&args.model);
    if as_file.is_file() || args.model.ends_with(".safetensors") {
        let m = crate::common::load_model(as_file, device, &args.common.load)?;
        if !m.int8.is_empty() {
            return Err(crate::input_error(format!(
                "{} is an int8 model; train the float model it came from",
                args.model
            )));
        }
        return Ok(m);
    }
    Ok(zoo::model(&args.model, &zcfg, args.recipe.seed, device)?)
}

pub fn run_train(args: TrainArgs) -> Result<(), Failure> {
    let cfg = crate::common::checked(&args.recipe)?;
    crate::common::check_out_dir("--out", &args.out)?;
    let device = args.common.device()?;
    let mut data = crate::common::load_data(&args.data, args.limit, None)?;
    if !data.train.is_labeled() {
        return Err(input_error(format!(
            "`{}` has no labels, and training learns from labels; without them, compress a \
             trained model by reproducing its outputs (slim prune, slim quant, slim distill)",
            args.data
        )));
    }
    data.augment.hflip |= args.hflip;
    if let Some(pad) = args.crop_padding {
        if pad > data.train.shape[1].min(data.train.shape[2]) {
            return Err(crate::input_error(format!(
                "--crop-padding {pad} is more than the images' side ({}x{})",
                data.train.shape[1], data.train.shape[2]
            )));
        }
        data.augment.crop_padding = pad;
    }
    let zcfg = ZooConfig::new(data.train.shape)
        .with_width(args.width)
        .with_classes(data.train.classes);
    let mut model = model_to_train(&args, zcfg, &device)?;
    model.provenance.insert("data".into(), args.data.clone());
    model.provenance.insert(
        "created_by".into(),
        format!("slim {}", env!("CARGO_PKG_VERSION")),
    );
    let ckpt = crate::common::checkpoint_path(&args.out);
    let mut bars = EpochBars::new(args.common.quiet);
    let report = train(
        &mut model,
        &data,
        &cfg,
        TrainOptions {
            checkpoint: Some(ckpt.clone()),
            resume: args.checkpoint.resume,
            checkpoint_every: args.checkpoint.every(),
            eval_each_epoch: true,
            ..Default::default()
        },
        &mut |p| bars.update(p),
    )?;
    model.save(&args.out)?;
    args.checkpoint.finished(&ckpt);
    let final_eval = evaluate(&model, &data.test, &data.normalize, 256)?;
    let stats = analyze(&model.graph);
    let bytes = std::fs::metadata(&args.out)?.len();
    if args.common.json {
        let out = json!({
            "model": args.model,
            "data": args.data,
            "top1": final_eval.top1,
            "top5": final_eval.top5,
            "macs": stats.macs,
            "params": stats.params,
            "bytes": bytes,
            "out": args.out,
            "images_per_sec": report.images_per_sec(),
            "resumed_from": report.resumed_from,
            "resumed_at_step": report.resumed_at_step,
            "epochs": report.epochs,
        });
        outln!("{}", crate::common::with_skipped(out));
    } else {
        out!("{}", report.table());
        outln!(
            "{}: test top-1 {:.2}%, top-5 {:.2}% on {} images; {} written ({} bytes)",
            args.model,
            final_eval.top1 * 100.0,
            final_eval.top5 * 100.0,
            final_eval.samples,
            args.out.display(),
            bytes
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct EvalArgs {
    /// A model file (.safetensors, or .onnx).
    pub file: PathBuf,
    #[arg(long, default_value = DEFAULT_SPEC, help = crate::common::data_help("Data"))]
    pub data: String,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    #[command(flatten)]
    pub common: Common,
}

pub fn run_eval(args: EvalArgs) -> Result<(), Failure> {
    let device = args.common.device()?;
    let model = crate::common::load_model(&args.file, &device, &args.common.load)?;
    let data = crate::common::data_for(&args.data, &model)?;
    if !data.test.is_labeled() {
        return Err(input_error(format!(
            "`{}` has no labels to measure accuracy with; `slim eval` needs labelled data",
            args.data
        )));
    }
    // Int8 files run on the int8 runtime.
    let int8 = !model.int8.is_empty();
    let r = if int8 {
        slim_quant::runtime::evaluate(&model, &data.test, &data.normalize, args.batch_size)?
    } else {
        evaluate(&model, &data.test, &data.normalize, args.batch_size)?
    };
    let runtime = if int8 { "int8" } else { "f32" };
    if args.common.json {
        outln!(
            "{}",
            crate::common::with_skipped(
                json!({"model": args.file, "data": args.data, "runtime": runtime, "top1": r.top1, "top5": r.top5,
                   "samples": r.samples, "samples_per_sec": r.samples_per_sec, "seconds": r.seconds})
            )
        );
    } else {
        outln!(
            "{} ({runtime}): top-1 {:.2}%, top-5 {:.2}% on {} test images of {}; {:.0} samples/s",
            args.file.display(),
            r.top1 * 100.0,
            r.top5 * 100.0,
            r.samples,
            args.data,
            r.samples_per_sec
        );
    }
    Ok(())
}
