//! `slim import` and `slim export`: ONNX models in and out.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;
use serde_json::json;
use slim_core::analysis::{analyze, human};

use crate::common::{check_out_dir, load_model, warn_nonfinite, LoadArgs};
use crate::{input_error, Failure};

#[derive(Args)]
pub struct ImportArgs {
    /// The ONNX model to import (.onnx).
    pub file: PathBuf,
    /// The Slim model file to write (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// The per-sample input shape CxHxW (any number of axes: AxB, AxBxCxD), for models whose
    /// input size is symbolic.
    #[arg(long)]
    pub input_shape: Option<String>,
    /// The preprocessing the model expects of pixels: raw (0..255 as they are), unit (0..1),
    /// imagenet (ImageNet mean and std), or MEAN/STD with comma-separated per-channel values
    /// on 0..1 pixels. Stored in the model file; every command feeds the model this way.
    /// Default: the data set's own normalization.
    #[arg(long)]
    pub preprocess: Option<String>,
    /// Resize images of another size to the model's input (bilinear) whenever data is fed to
    /// it (28x28 digits to a 32x32 LeNet, say). Stored in the model file.
    #[arg(long)]
    pub resize: bool,
    /// Print one JSON object with the result on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The model file to export (.safetensors, float or int8).
    pub file: PathBuf,
    /// The ONNX file to write (.onnx). Int8 models are written in QDQ form.
    #[arg(long)]
    pub out: PathBuf,
    /// The ONNX opset (12 to 21).
    #[arg(long, default_value_t = 17)]
    pub opset: i64,
    /// The integer type of an int8 model's activations: u8 (what ONNX Runtime runs fastest on
    /// x86) or s8.
    #[arg(long, default_value = "u8")]
    pub activations_type: String,
    /// Print one JSON object with the result on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

pub fn run_import(args: ImportArgs) -> Result<(), Failure> {
    check_out_dir("--out", &args.out)?;
    let input_shape = args
        .input_shape
        .as_deref()
        .map(|s| crate::info::parse_dims("--input-shape", s))
        .transpose()?;
    let preprocess = args
        .preprocess
        .as_deref()
        .map(|s| {
            slim_onnx::parse_preprocess(s).map_err(|e| input_error(format!("--preprocess: {e}")))
        })
        .transpose()?;
    let opts = slim_onnx::ImportOptions {
        input_shape,
        preprocess,
        resize: args.resize,
        allow_nonfinite: args.load.allow_nonfinite,
        single_sample: args.load.single_sample,
        ..Default::default()
    };
    let mut model = slim_onnx::import_file(&args.file, &opts)?;
    if args.load.allow_nonfinite {
        warn_nonfinite(&args.file, &model.nonfinite_params()?);
    }
    model
        .provenance
        .insert("imported_from".into(), args.file.display().to_string());
    model.save(&args.out)?;
    let stats = analyze(&model.graph);
    let bytes = std::fs::metadata(&args.out)?.len();
    let input = model.input_shape();
    if args.json {
        outln!(
            "{}",
            json!({
                "file": args.file, "out": args.out, "nodes": model.graph.len(),
                "input": input, "macs": stats.macs, "params": stats.params, "bytes": bytes,
                "preprocess": model.preprocess()?.map(|p| json!({"mean": p.mean, "std": p.std})),
                "resize": model.resizes_input()?,
            })
        );
    } else {
        outln!(
            "imported {} -> {}: {} nodes, input {:?}, {} MACs, {} parameters, {} bytes",
            args.file.display(),
            args.out.display(),
            model.graph.len(),
            input,
            human(stats.macs),
            human(stats.params),
            bytes
        );
    }
    Ok(())
}

pub fn run_export(args: ExportArgs) -> Result<(), Failure> {
    check_out_dir("--out", &args.out)?;
    let model = load_model(&args.file, &Device::Cpu, &args.load)?;
    let activations = args
        .activations_type
        .parse()
        .map_err(|e: String| crate::input_error(format!("--activations-type: {e}")))?;
    let opts = slim_onnx::ExportOptions {
        opset: args.opset,
        activations,
    };
    let notes = slim_onnx::export_file(&model, &args.out, &opts)?;
    for n in &notes {
        eprintln!("warning: {n}");
    }
    let bytes = std::fs::metadata(&args.out)?.len();
    let form = if model.int8.is_empty() {
        "f32"
    } else {
        "int8 QDQ"
    };
    if args.json {
        outln!(
            "{}",
            json!({"file": args.file, "out": args.out, "opset": args.opset, "form": form,
                   "activations_type": args.activations_type, "bytes": bytes, "warnings": notes})
        );
    } else {
        outln!(
            "exported {} -> {} ({form}, opset {}, {bytes} bytes)",
            args.file.display(),
            args.out.display(),
            args.opset
        );
    }
    Ok(())
}
