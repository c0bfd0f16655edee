//! Quantization-aware training.
//!
//! [`prepare`] turns a float model into one that trains as it will run in integers: batch
//! norms are folded into their convolutions, and every quantized layer gets a
//! fake-quantization node on its input whose scale starts from a short `abs_max` calibration
//! and then follows the batches as a moving average (`moving_average_abs_max`, rate 0.9).
//! During training, [`QatKernels`] computes each quantized layer with its weights
//! fake-quantized (per output channel or per tensor) and a straight-through gradient, so the
//! float weights learn to sit well on the integer grid. [`convert`] then freezes the scales and
//! stores the weights as int8: the result is an int8 model file like post-training
//! quantization's.

use candle_core::{Tensor, D};
use slim_core::data::{ImageSet, Normalize};
use slim_core::exec::NodeKernels;
use slim_core::graph::{FakeQuantSpec, ParamKind};
use slim_core::model::Int8Tensor;
use slim_core::{Mode, Model, Node, Op};

use crate::ptq::{quantize, PtqConfig};
use crate::quantizer::{check_bits, qmax, quantize_param, WeightQuant};
use crate::{QuantError, Result};

/// Fake-quantized weights for the layers that read a fake-quantization node.
pub struct QatKernels {
    pub weights: WeightQuant,
    pub bits: u8,
}

fn reads_fake_quant(model: &Model, node: &Node) -> bool {
    node.inputs
        .first()
        .is_some_and(|&i| matches!(model.graph.node(i).op, Op::FakeQuant(_)))
}

impl QatKernels {
    /// `w` rounded to its integer grid, with a straight-through gradient.
    fn fake_quant_weight(&self, w: &Tensor) -> candle_core::Result<Tensor> {
        let q = f64::from(qmax(self.bits));
        let o = w.dim(0)?;
        let flat = w.reshape((o, ()))?;
        let max = match self.weights {
            WeightQuant::ChannelWiseAbsMax => flat.abs()?.max_keepdim(D::Minus1)?,
            WeightQuant::AbsMax => flat
                .abs()?
                .max_all()?
                .reshape((1, 1))?
                .broadcast_as((o, 1))?,
        };
        // Guard all-zero channels, then keep the scale out of the gradient.
        let scale = ((max.detach() / q)?.maximum(1e-12)?).broadcast_as(flat.shape())?;
        let rounded = (flat.broadcast_div(&scale)?.round()?.clamp(-q, q)? * &scale)?;
        let fq = (&flat + (rounded - &flat)?.detach())?;
        fq.reshape(w.shape())
    }
}

impl NodeKernels for QatKernels {
    fn run(
        &self,
        model: &Model,
        node: &Node,
        inputs: &[&Tensor],
        mode: Mode,
    ) -> slim_core::Result<Option<Tensor>> {
        if !reads_fake_quant(model, node) {
            return Ok(None);
        }
        let param = |role: &str| -> slim_core::Result<Tensor> {
            let t = model.params.tensor(&node.param_name(role))?;
            Ok(if mode == Mode::Eval { t.detach() } else { t })
        };
        let x = inputs[0];
        Ok(match &node.op {
            Op::Conv2d(c) => {
                let w = self.fake_quant_weight(&param("weight")?)?;
                let b = if c.bias { Some(param("bias")?) } else { None };
                Some(slim_core::kernels::conv2d(x, &w, b.as_ref(), c)?)
            }
            Op::Linear(l) => {
                let w = self.fake_quant_weight(&param("weight")?)?;
                let y = x.matmul(&w.t()?)?;
                Some(if l.bias {
                    y.broadcast_add(&param("bias")?)?
                } else {
                    y
                })
            }
            _ => None,
        })
    }
}

/// A model ready for quantization-aware training (see the module documentation); `cfg`
/// says which layers, how the weights will be quantized, and the calibration that sets the
/// first activation scales.
pub fn prepare(
    model: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    cfg: &PtqConfig,
) -> Result<Model> {
    prepare_with(model, set, normalize, cfg, ActivationScale::MovingAverage)
}

/// How the activation scales follow the batches in quantization-aware training (PaddleSlim's
/// `activation_quantize_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationScale {
    /// `moving_average_abs_max`: a moving average (rate 0.9) of each batch's absolute maximum.
    MovingAverage,
    /// `range_abs_max`: the largest absolute maximum of the last `window` batches.
    Range { window: usize },
}

impl ActivationScale {
    /// `moving_average_abs_max` or `range_abs_max`.
    pub fn name(self) -> &'static str {
        match self {
            ActivationScale::MovingAverage => "moving_average_abs_max",
            ActivationScale::Range { .. } => "range_abs_max",
        }
    }

    /// From its name and, for `range_abs_max`, the window (batches, at least 1).
    pub fn parse(name: &str, window: usize) -> Result<Self> {
        match name {
            "moving_average_abs_max" => Ok(ActivationScale::MovingAverage),
            "range_abs_max" if (1..=1 << 20).contains(&window) => {
                Ok(ActivationScale::Range { window })
            }
            "range_abs_max" => Err(QuantError::Invalid(format!(
                "window_size {window} must be between 1 and {}",
                1 << 20
            ))),
            other => Err(QuantError::Invalid(format!(
                "unknown activation quantizer `{other}` (moving_average_abs_max or \
                 range_abs_max)"
            ))),
        }
    }
}

/// [`prepare`], with the activation scales following the batches as `activations` says.
pub fn prepare_with(
    model: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    cfg: &PtqConfig,
    activations: ActivationScale,
) -> Result<Model> {
    check_bits(cfg.bits_weights)?;
    let (quantized, _) = quantize(model, set, normalize, cfg)?;
    // Float weights again (the folded ones), and scales that follow the batches.
    let (folded, _) = if cfg.fold_batch_norm {
        slim_core::transform::fold_batch_norms(model)?
    } else {
        (model.deep_clone()?, 0)
    };
    let window = match activations {
        ActivationScale::MovingAverage => 0,
        ActivationScale::Range { window } => window,
    };
    let graph = quantized.graph.map_ops(|n| match &n.op {
        Op::FakeQuant(q) => Op::FakeQuant(FakeQuantSpec {
            bits: q.bits,
            moving_rate: if window > 0 { 0.0 } else { 0.9 },
            window,
        }),
        other => other.clone(),
    })?;
    let mut params = quantized.params.deep_clone()?;
    if window > 0 {
        // The window starts with the calibrated scale as its first batch.
        let device = model.device();
        for n in graph
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::FakeQuant(_)))
        {
            let scale = params.tensor(&n.param_name("scale"))?.to_vec1::<f32>()?[0];
            let mut ring = vec![0f32; window];
            ring[0] = scale;
            let ring = Tensor::from_vec(ring, window, &device)?;
            params.insert(n.param_name("window_max"), &ring, ParamKind::Buffer)?;
            let step = Tensor::new(&[1f32], &device)?;
            params.insert(n.param_name("window_step"), &step, ParamKind::Buffer)?;
        }
    }
    let mut out = Model::new(graph, params)?;
    for name in quantized.int8.keys() {
        out.params.set(name, &folded.params.tensor(name)?)?;
    }
    out.provenance = model.provenance.clone();
    Ok(out)
}

/// Freezes the activation scales of a model trained with [`prepare`] and [`QatKernels`] and
/// stores its quantized weights as integers.
pub fn convert(model: &Model, weights: WeightQuant, bits: u8) -> Result<Model> {
    check_bits(bits)?;
    let activations = match model.graph.nodes().iter().find_map(|n| match &n.op {
        Op::FakeQuant(q) => Some(q.window),
        _ => None,
    }) {
        Some(w) if w > 0 => "range_abs_max",
        _ => "moving_average_abs_max",
    };
    let graph = model.graph.map_ops(|n| match &n.op {
        Op::FakeQuant(q) => Op::FakeQuant(FakeQuantSpec {
            bits: q.bits,
            moving_rate: 0.0,
            window: 0,
        }),
        other => other.clone(),
    })?;
    let mut params = model.params.deep_clone()?;
    // The windows of range_abs_max are training state, not part of the frozen model.
    for n in model.graph.nodes() {
        for role in ["window_max", "window_step"] {
            params.remove(&n.param_name(role));
        }
    }
    let mut out = Model::new(graph, params)?;
    out.provenance = model.provenance.clone();
    let layers: Vec<Node> = model
        .graph
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Conv2d(_) | Op::Linear(_)) && reads_fake_quant(model, n))
        .cloned()
        .collect();
    let device = model.device();
    for n in layers {
        let name = n.param_name("weight");
        let q = quantize_param(&model.params, &name, weights, bits)?;
        out.params.set(&name, &q.dequantize(&device)?)?;
        out.int8.insert(
            name,
            Int8Tensor {
                values: q.values,
                scales: q.scales,
            },
        );
    }
    out.provenance.insert(
        "quantization".into(),
        format!("qat: weights {weights} {bits}-bit, activations {activations} 8-bit"),
    );
    Ok(out)
}
/// Checked [`crate::strategy::QatOptions`].
#[derive(Clone, Debug)]
pub struct QatSettings {
    /// How the fake-quantized model is calibrated before training ([`crate::qat::prepare`]).
    pub calibration: crate::ptq::PtqConfig,
    pub weights: WeightQuant,
    /// How the activation scales follow the batches while training.
    pub activations: crate::qat::ActivationScale,
    pub epochs: usize,
    pub lr: f64,
    pub optimizer: slim_core::train::OptimizerKind,
    pub schedule: slim_core::train::Schedule,
}

impl QatSettings {
    /// `base` (the command's or the pipeline's recipe) with these epochs, rate, optimizer and
    /// schedule, and no warm-up.
    pub fn recipe(&self, base: &slim_core::train::TrainConfig) -> slim_core::train::TrainConfig {
        slim_core::train::TrainConfig {
            epochs: self.epochs,
            lr: self.lr,
            optimizer: self.optimizer,
            schedule: self.schedule.clone(),
            warmup_epochs: 0,
            ..base.clone()
        }
    }
}
