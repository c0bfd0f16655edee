//! `slim info`: what a model costs, layer by layer, and which channels can be pruned.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;
use serde_json::json;
use slim_core::zoo::{self, ZooConfig};

use crate::{input_error, Failure};

#[derive(Args)]
pub struct InfoArgs {
    /// A model file: .safetensors written by slim, or .onnx.
    #[arg(conflicts_with = "model", required_unless_present = "model")]
    pub file: Option<PathBuf>,
    /// A zoo model instead of a file: lenet, vgg11, vgg16, resnet20, resnet56, resnet18,
    /// resnet50, mobilenet_v1, mobilenet_v2, mobilenet_tiny.
    #[arg(long)]
    pub model: Option<String>,
    /// Width multiplier of a zoo model.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    /// Input shape of a zoo model, as CxHxW.
    #[arg(long, default_value = "3x224x224")]
    pub input: String,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: crate::common::LoadArgs,
}

/// Parses `CxHxW` given with `--input`.
pub fn parse_input(s: &str) -> Result<[usize; 3], Failure> {
    parse_shape("--input", s)
}

/// A shape `AxBxC` of one or more positive sizes given with `flag`.
pub fn parse_dims(flag: &str, s: &str) -> Result<Vec<usize>, Failure> {
    let dims: Vec<usize> = s
        .split('x')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .ok()
        .filter(|d: &Vec<usize>| d.iter().all(|&v| v > 0))
        .ok_or_else(|| {
            input_error(format!(
                "{flag} `{s}` is not of the form CxHxW (e.g. 3x32x32)"
            ))
        })?;
    slim_core::graph::check_shape(&dims).map_err(|e| input_error(format!("{flag}: {e}")))?;
    Ok(dims)
}

/// A shape `CxHxW` of three positive sizes given with `flag`.
pub fn parse_shape(flag: &str, s: &str) -> Result<[usize; 3], Failure> {
    match parse_dims(flag, s)?[..] {
        [c, h, w] => Ok([c, h, w]),
        _ => Err(input_error(format!(
            "{flag} `{s}` is not of the form CxHxW (e.g. 3x32x32)"
        ))),
    }
}

pub fn run(args: InfoArgs) -> Result<(), Failure> {
    let (label, model, bytes) = match (&args.file, &args.model) {
        (Some(path), _) => {
            let model = crate::common::load_model(path, &Device::Cpu, &args.load)?;
            let bytes = std::fs::metadata(path)?.len();
            (path.display().to_string(), model, bytes)
        }
        (None, Some(name)) => {
            let cfg = ZooConfig::new(parse_input(&args.input)?).with_width(args.width);
            let model = zoo::model(name, &cfg, 0, &Device::Cpu)?;
            // The size of the file `slim` would write for this model.
            let bytes = model.to_bytes()?.len() as u64;
            (name.clone(), model, bytes)
        }
        (None, None) => return Err(input_error("give a model file or --model NAME")),
    };

    let info = slim_core::analysis::ModelInfo::of(&label, &model, bytes);
    if args.json {
        outln!("{}", json!(info));
    } else {
        out!("{}", info.table());
    }
    Ok(())
}
