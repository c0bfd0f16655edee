//! # slim-quant
//!
//! Quantization for Slim: symmetric integer weights (per tensor or per output channel, 8 bits
//! or fewer), activation calibration (abs_max, avg, moving average, percentile histogram,
//! MSE), and post-training quantization that yields a real int8 model file: the quantized
//! weights are stored as int8 tensors with their scales, and the graph carries a
//! fake-quantization node with its scale before every quantized layer.
//!
//! - [`quantizer`]: weight quantizers;
//! - [`observer`]: activation calibration methods;
//! - [`ptq`]: calibration and conversion;
//! - [`qat`]: quantization-aware training (fake-quantized weights and activations) and conversion;
//! - [`runtime`]: the int8 runtime (integer convolutions and linear layers).
//!
//! This crate depends on `slim-core` alone.
//!
//! ```
//! use candle_core::Device;
//! use slim_core::{data, zoo};
//! use slim_quant::ptq::{quantize, PtqConfig};
//!
//! let splits = data::load_spec(data::DEFAULT_SPEC)?;
//! let model = zoo::model("lenet", &zoo::ZooConfig::new([1, 28, 28]), 0, &Device::Cpu)?;
//! let cfg = PtqConfig { batches: 2, ..PtqConfig::default() };
//! let (int8, report) = quantize(&model, &splits.train, &splits.normalize, &cfg)?;
//! assert_eq!(report.layers.len(), 5); // two convolutions, three linear layers
//! // The int8 file is about a quarter of the float one.
//! assert!(int8.to_bytes()?.len() * 10 < model.to_bytes()?.len() * 3);
//! # Ok::<(), slim_quant::QuantError>(())
//! ```

pub mod compress;
pub mod gemm;
mod grid;
pub mod observer;
pub mod ptq;
pub mod qat;
pub mod quantizer;
pub mod runtime;
pub mod strategy;

/// The error type of `slim-quant`.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
    /// A request that cannot be honoured: an unknown quantizer, a bad bit width, a scope
    /// that matches nothing.
    #[error("{0}")]
    Invalid(String),
}

impl QuantError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            QuantError::Core(c) => c.is_input(),
            QuantError::Invalid(_) => true,
        }
    }
}

impl From<candle_core::Error> for QuantError {
    fn from(e: candle_core::Error) -> Self {
        QuantError::Core(e.into())
    }
}

/// The result type of `slim-quant`.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;
