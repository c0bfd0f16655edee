//! `slim run`: a model's forward on arrays from NumPy files, its outputs written as NumPy
//! files.
//!
//! Everything the user gave is checked (the model, every input file, the shapes, the output
//! directory) and the forward is done before anything is written, so a refused run leaves the
//! output directory as it was; each output file is written to a temporary file and renamed.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use clap::Args;
use serde_json::json;
use slim_core::exec::NodeKernels;
use slim_core::{ForwardOptions, Mode};
use slim_quant::runtime::Int8Kernels;

use crate::common::{load_model, Common};
use crate::output::table;
use crate::{input_error, Failure};
use slim_core::npy;

#[derive(Args)]
pub struct RunArgs {
    /// A model file (.safetensors, float or int8, or .onnx). Int8 files run on the int8
    /// runtime, as in `slim eval`.
    pub file: PathBuf,
    /// A NumPy file (.npy) for each of the model's inputs, in the order of its input nodes:
    /// an array [N, ...the input's shape] of float32, float64, int64 or uint8 (read as
    /// float32), in C order. The values reach the graph as they are: no normalization.
    #[arg(long = "input", value_name = "NPY", required = true)]
    pub inputs: Vec<PathBuf>,
    /// The directory (created if missing) that gets one float32 NumPy file per graph output,
    /// DIR/<output node>.npy, shaped [N, ...the output's shape].
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    if args.out.exists() && !args.out.is_dir() {
        return Err(input_error(format!(
            "--out {}: exists and is not a directory",
            args.out.display()
        )));
    }
    let device = args.common.device()?;
    let model = load_model(&args.file, &device, &args.common.load)?;
    let g = &model.graph;
    let (xs, samples) = read_inputs(&args, &model, &device)?;

    // Int8 files run on the int8 runtime.
    let kernels = (!model.int8.is_empty()).then(|| Int8Kernels::new(&model));
    let runtime = if kernels.is_some() { "int8" } else { "f32" };
    let out = model.forward_with(
        &xs,
        Mode::Eval,
        ForwardOptions {
            kernels: kernels.as_ref().map(|k| k as &dyn NodeKernels),
            ..Default::default()
        },
    )?;
    let mut results = Vec::new();
    for (&id, t) in g.outputs().iter().zip(&out.outputs) {
        let name = g.node(id).name.clone();
        let shape = t.dims().to_vec();
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        results.push((name, shape, values));
    }

    std::fs::create_dir_all(&args.out)
        .map_err(|e| input_error(format!("cannot create {}: {e}", args.out.display())))?;
    let mut rows = Vec::new();
    let mut listed = Vec::new();
    for (name, shape, values) in &results {
        // Node names are made of A-Z a-z 0-9 _ . - only (the graph checks), so each is a
        // file name in DIR.
        let path = args.out.join(format!("{name}.npy"));
        slim_core::io::write_atomic(&path, &npy::to_bytes(shape, values))?;
        let min = values.iter().copied().fold(f32::NAN, f32::min);
        let max = values.iter().copied().fold(f32::NAN, f32::max);
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len().max(1) as f64;
        rows.push(vec![
            name.clone(),
            format!("{shape:?}"),
            number(f64::from(min)),
            number(f64::from(max)),
            number(mean),
        ]);
        listed.push(json!({
            "name": name, "shape": shape, "path": path,
            "min": min, "max": max, "mean": mean,
        }));
    }
    if args.common.json {
        outln!(
            "{}",
            json!({"model": args.file, "runtime": runtime, "samples": samples,
                   "outputs": listed, "out": args.out})
        );
    } else {
        out!(
            "{}",
            table(&["output", "shape", "min", "max", "mean"], &rows)
        );
        outln!(
            "{samples} sample(s) through {} ({runtime}); {} file(s) written to {}",
            args.file.display(),
            results.len(),
            args.out.display()
        );
    }
    Ok(())
}

/// The arrays of the --input files, checked against the model's inputs (their number, each
/// one's shape, one batch for all), and the batch.
fn read_inputs(
    args: &RunArgs,
    model: &slim_core::Model,
    device: &candle_core::Device,
) -> Result<(Vec<Tensor>, usize), Failure> {
    let g = &model.graph;
    let input_ids = g.inputs();
    if args.inputs.len() != input_ids.len() {
        let names: Vec<String> = input_ids
            .iter()
            .map(|&i| format!("`{}` {:?}", g.node(i).name, g.node(i).shape))
            .collect();
        return Err(input_error(format!(
            "{} has {} input(s) ({}); {} --input file(s) were given",
            args.file.display(),
            input_ids.len(),
            names.join(", "),
            args.inputs.len()
        )));
    }
    let mut batch: Option<(usize, &PathBuf)> = None;
    let mut xs = Vec::with_capacity(input_ids.len());
    for (path, &id) in args.inputs.iter().zip(&input_ids) {
        let a = npy::read(path)?;
        let node = g.node(id);
        if a.shape.len() != node.shape.len() + 1 || a.shape[1..] != node.shape[..] {
            let per_sample: Vec<String> = node.shape.iter().map(usize::to_string).collect();
            return Err(input_error(format!(
                "{}: the array's shape is {:?}; the model's input `{}` takes [N, {}] \
                 (N samples of {:?})",
                path.display(),
                a.shape,
                node.name,
                per_sample.join(", "),
                node.shape
            )));
        }
        let n = a.shape[0];
        if n == 0 {
            return Err(input_error(format!(
                "{}: the array holds no samples (shape {:?})",
                path.display(),
                a.shape
            )));
        }
        match batch {
            Some((m, first)) if m != n => {
                return Err(input_error(format!(
                    "{}: {n} sample(s), but {} has {m}; every input needs the same batch",
                    path.display(),
                    first.display()
                )))
            }
            _ => batch = Some((n, path)),
        }
        xs.push(Tensor::from_vec(a.data, a.shape, device)?);
    }
    Ok((xs, batch.map_or(0, |(n, _)| n)))
}

/// A value for the table: four decimals, or scientific notation when that would hide it.
fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || (1e-3..1e6).contains(&v.abs()) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}
