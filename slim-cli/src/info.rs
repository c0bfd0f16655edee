//! `slim info`: what a model costs, layer by layer, and which channels can be pruned.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;
use serde_json::json;
use slim_core::analysis::{analyze, human};
use slim_core::deps::channel_groups;
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;

use crate::output::table;
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

    if args.json {
        print_json(&label, &model, bytes);
        return Ok(());
    }
    print_tables(&label, &model, bytes);
    Ok(())
}

/// The model's layers and channel groups as JSON.
fn print_json(label: &str, model: &Model, bytes: u64) {
    let stats = analyze(&model.graph);
    let groups = channel_groups(&model.graph);
    let input = model.input_shape();
    let layers: Vec<_> = stats
        .layers
        .iter()
        .map(|l| json!({"name": l.name, "op": l.op, "shape": l.shape, "macs": l.macs, "params": l.params}))
        .collect();
    let groups_json: Vec<_> = groups
        .groups
        .iter()
        .filter(|g| !g.producers.is_empty())
        .map(|g| {
            json!({
                "id": g.id,
                "channels": g.channels,
                "producers": g.producers,
                "prunable": g.is_prunable(),
                "blocked_by": g.blocked.as_ref().map(|b| json!({"node": b.node, "op": b.op, "reason": b.reason})),
            })
        })
        .collect();
    let out = json!({
        "model": label,
        "input": input,
        "macs": stats.macs,
        "params": stats.params,
        "buffers": stats.buffers,
        "bytes": bytes,
        "layers": layers,
        "groups": groups_json,
    });
    outln!("{out}");
}

/// The model's layers and channel groups as tables.
fn print_tables(label: &str, model: &Model, bytes: u64) {
    let stats = analyze(&model.graph);
    let groups = channel_groups(&model.graph);
    let input = model.input_shape();
    let rows: Vec<Vec<String>> = stats
        .layers
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                l.op.clone(),
                format!("{:?}", l.shape),
                if l.macs > 0 {
                    human(l.macs)
                } else {
                    String::new()
                },
                if l.params > 0 {
                    human(l.params)
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    outln!("{label}  input {input:?}");
    out!(
        "{}",
        table(&["node", "op", "output", "MACs", "params"], &rows)
    );
    outln!(
        "total: {} MACs (multiply-accumulates), {} parameters, {} bytes on disk",
        human(stats.macs),
        human(stats.params),
        bytes
    );
    outln!();
    let rows: Vec<Vec<String>> = groups
        .groups
        .iter()
        .filter(|g| !g.producers.is_empty())
        .map(|g| {
            vec![
                g.id.to_string(),
                g.channels.to_string(),
                g.producers.join(","),
                match &g.blocked {
                    None if g.is_prunable() => "prunable".to_string(),
                    None => "single channel".to_string(),
                    Some(b) => format!("blocked by `{}` ({}): {}", b.node, b.op, b.reason),
                },
            ]
        })
        .collect();
    outln!(
        "channel groups: {} prunable of {}",
        groups.prunable().count(),
        rows.len()
    );
    out!(
        "{}",
        table(&["group", "channels", "produced by", "status"], &rows)
    );
}
