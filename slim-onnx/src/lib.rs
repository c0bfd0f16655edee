//! # slim-onnx
//!
//! ONNX in and out, so that models trained elsewhere can be compressed and compressed models
//! deployed with any ONNX runtime.
//!
//! - [`import_file`] reads an ONNX model (opset 7 and newer) into a Slim [`Model`]: the ops of
//!   [`ops::OP_TABLE`] (convolutional networks, other exporters' spellings, segmenters'
//!   resizing, attention blocks), the shape arithmetic exporters emit, folded at import, and
//!   int8 models in QDQ form, which come in as int8 models. An unsupported op is an error that
//!   lists every such node.
//! - [`export`] writes any Slim model as ONNX: float graphs as they are, and int8 models in the
//!   QDQ form that ONNX Runtime, TensorRT and OpenVINO fuse into integer layers (int8 weights
//!   with per-channel scales, int32 biases, a quantizer right after every quantized layer).

//! The protobuf messages are declared by hand with `prost`'s derive macros ([`proto`]), so a
//! build needs no `protoc` and no build script.
//!
//! ```
//! use slim_core::zoo::{build, ZooConfig};
//! use slim_core::Model;
//! let graph = build("lenet", &ZooConfig::new([1, 28, 28])).unwrap();
//! let model = Model::init(graph, 0, &candle_core::Device::Cpu).unwrap();
//! let bytes = slim_onnx::export(&model, &slim_onnx::ExportOptions::default()).unwrap();
//! let back = slim_onnx::import(&bytes, &Default::default()).unwrap();
//! assert_eq!(back.graph.len(), model.graph.len());
//! ```
#![forbid(unsafe_code)]

pub mod export;
pub mod import;
pub mod ops;
pub mod proto;

pub use export::{export, export_file, export_with_notes, ActivationType, ExportOptions};
pub use import::{import, import_file, load_model, ImportOptions, SUPPORTED_OPS};

use slim_core::data::Normalize;

/// The error type of `slim-onnx`.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
    /// A file that cannot be read or is not a model Slim can import.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// A model that cannot be imported or exported, and why.
    #[error("{0}")]
    Model(String),
    /// Ops the importer does not know, every one of them.
    #[error("the model uses {} op(s) that Slim cannot import: {}", .0.len(), .0.join(", "))]
    Unsupported(Vec<String>),
}

impl OnnxError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            OnnxError::Core(c) => c.is_input(),
            _ => true,
        }
    }
}

/// The result type of `slim-onnx`.
pub type Result<T, E = OnnxError> = std::result::Result<T, E>;

/// A preprocessing from its name on the command line: `raw` (pixels 0..255 as they are),
/// `unit` (0..1), `imagenet` (ImageNet mean and std on 0..1 pixels), or `MEAN/STD` with
/// comma-separated per-channel values on 0..1 pixels (`0.5,0.5,0.5/0.25,0.25,0.25`).
pub fn parse_preprocess(spec: &str) -> Result<Normalize> {
    let bad = || {
        OnnxError::Model(format!(
            "preprocessing `{spec}` is not raw, unit, imagenet or MEAN/STD (comma-separated per channel)"
        ))
    };
    Ok(match spec {
        "raw" => Normalize {
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
        },
        "unit" => Normalize {
            mean: vec![0.0],
            std: vec![1.0],
        },
        "imagenet" => Normalize {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        },
        _ => {
            let (m, s) = spec.split_once('/').ok_or_else(bad)?;
            let list = |t: &str| -> Result<Vec<f32>> {
                t.split(',')
                    .map(|v| v.trim().parse::<f32>().map_err(|_| bad()))
                    .collect()
            };
            let norm = Normalize {
                mean: list(m)?,
                std: list(s)?,
            };
            if !norm.std.iter().all(|v| v.is_finite() && *v > 0.0) {
                return Err(bad());
            }
            norm
        }
    })
}
