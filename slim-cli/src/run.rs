//! `slim run`: a model's forward on arrays from NumPy files, its outputs written as NumPy
//! files.
//!
//! Everything the user gave is checked (the model, every input file, the shapes, the output
//! directory) and the forward is done before anything is written, so a refused run leaves the
//! output directory as it was; each output file is written to a temporary file and renamed.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use slim_core::exec::NodeKernels;
use slim_core::{ForwardOptions, Mode};
use slim_quant::runtime::Int8Kernels;

use crate::common::{load_model, Common};
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
    let (xs, samples) = npy::read_inputs(&model, &args.inputs, "--input file(s)", &device)?;
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
    std::fs::create_dir_all(&args.out)
        .map_err(|e| input_error(format!("cannot create {}: {e}", args.out.display())))?;
    let written = npy::write_outputs(&model, &out.outputs, &args.out)?;
    if args.common.json {
        outln!(
            "{}",
            json!({"model": args.file, "runtime": runtime, "samples": samples,
                   "outputs": written, "out": args.out})
        );
    } else {
        out!("{}", npy::outputs_table(&written));
        outln!(
            "{samples} sample(s) through {} ({runtime}); {} file(s) written to {}",
            args.file.display(),
            written.len(),
            args.out.display()
        );
    }
    Ok(())
}
