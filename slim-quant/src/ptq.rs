//! Post-training quantization.
//!
//! Batch norms that follow convolutions are first folded into them (unless asked not to).
//! The quantized layers are the convolutions and linear layers in scope (name patterns; all
//! by default). Calibration runs the float model on a few batches and observes each quantized
//! layer's input; from what it saw, each input gets a scale ([`ActQuant`]). The result is a
//! model whose graph has a [`FakeQuant`](slim_core::Op::FakeQuant) node before every
//! quantized layer (its input is rounded to `bits` on that scale) and whose quantized weights
//! hold integers ([`Model::int8`]) with their float read-back: its file is an int8 file, and
//! its float forward computes what the integer model computes, up to float rounding of the
//! sums.
//!
//! Non-finite values are refused, never quantized: a parameter holding NaN or infinity is an
//! error naming it, before any work; an observed activation holding one is an error naming
//! the node, its quantizer and the calibration batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use slim_core::data::{Dataset, ImageSet, Loader, LoaderConfig, Normalize};
use slim_core::finite::NonFinite;
use slim_core::graph::{FakeQuantSpec, GraphDef, NodeDef};
use slim_core::model::Int8Tensor;
use slim_core::params::matches_pattern;
use slim_core::{CoreError, ForwardOptions, Graph, Mode, Model, Op, ParamKind, ParamStore};

use crate::observer::{ActQuant, Stats};
use crate::quantizer::{check_bits, qmax, quantize_param, WeightQuant};
use crate::{QuantError, Result};

/// What to quantize and how.
#[derive(Clone, Debug)]
pub struct PtqConfig {
    pub weights: WeightQuant,
    pub activations: ActQuant,
    pub bits_weights: u8,
    pub bits_activations: u8,
    /// Calibration batches and their size.
    pub batches: usize,
    pub batch_size: usize,
    /// Patterns over layer names; empty: every convolution and linear layer.
    pub scope: Vec<String>,
    /// Fold batch norms into the convolutions before them first (the integer model then
    /// runs no batch norm, and the file holds no batch-norm statistics).
    pub fold_batch_norm: bool,
    /// Correct every quantized layer's bias so that the mean of each output channel over the
    /// calibration images (up to 8 of its batches) is the float model's (layer after layer,
    /// each measured with the earlier ones corrected); a layer without a bias gets one.
    pub bias_correction: bool,
}

impl Default for PtqConfig {
    fn default() -> Self {
        PtqConfig {
            weights: WeightQuant::ChannelWiseAbsMax,
            activations: ActQuant::AbsMax,
            bits_weights: 8,
            bits_activations: 8,
            batches: 16,
            batch_size: 64,
            scope: Vec::new(),
            fold_batch_norm: true,
            bias_correction: false,
        }
    }
}

/// One quantized layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub layer: String,
    /// The scale of its input.
    pub input_scale: f32,
    /// How many weight scales it has (1, or one per output channel).
    pub weight_scales: usize,
}

/// What calibration did.
#[derive(Clone, Debug, Serialize)]
pub struct PtqReport {
    pub layers: Vec<LayerReport>,
    /// The values quantized after a quantized layer because no quantized layer reads them
    /// (a residual branch before its sum, a feature map before pooling): each has a
    /// fake-quantization node `<value>.output_quant`, so that the whole chain runs in
    /// integers where the model is deployed (see [`output_quant_points`]).
    pub outputs: Vec<String>,
    pub calibration_images: usize,
    /// Batch norms folded into convolutions.
    pub folded_batch_norms: usize,
    /// Layers whose bias was corrected (none without bias correction), with the largest
    /// per-channel shift applied.
    pub bias_corrections: Vec<(String, f32)>,
    pub seconds: f64,
}

/// The name of the fake-quantization node inserted before layer `layer`.
pub fn input_quant_name(layer: &str) -> String {
    format!("{layer}.input_quant")
}

/// The name of the fake-quantization node inserted after value `value`.
pub fn output_quant_name(value: &str) -> String {
    format!("{value}.output_quant")
}

/// The values that get a quantizer after them: for each quantized layer, the end of its
/// output's walk through a ReLU or ReLU6, max pooling and flattening
/// ([`Graph::quantized_chain`]) when no quantized layer reads it there. Runtimes that fuse
/// QDQ graphs (ONNX Runtime, TensorRT, OpenVINO) then find a quantizer right after every
/// quantized layer and run it in integers end to end. Graph outputs stay in float.
pub fn output_quant_points(model: &Model, layers: &[String]) -> Result<Vec<String>> {
    let g = &model.graph;
    let mut points = Vec::new();
    for l in layers {
        let id = g.id(l)?;
        let (chain, quantizer) = g.quantized_chain(id, |n| layers.contains(&n.name));
        let end = chain.last().copied().unwrap_or(id);
        if quantizer.is_none() && !g.outputs().contains(&end) && !g.successors(end).is_empty() {
            points.push(g.node(end).name.clone());
        }
    }
    Ok(points)
}

/// The convolutions and linear layers that `scope` selects (all when empty).
pub fn quantizable_layers(model: &Model, scope: &[String]) -> Result<Vec<String>> {
    for p in scope {
        if !model
            .graph
            .nodes()
            .iter()
            .any(|n| matches_pattern(p, &n.name))
        {
            return Err(QuantError::Invalid(format!(
                "the scope pattern `{p}` matches no layer of the model"
            )));
        }
    }
    let layers: Vec<String> = model
        .graph
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Conv2d(_) | Op::Linear(_)))
        .filter(|n| scope.is_empty() || scope.iter().any(|p| matches_pattern(p, &n.name)))
        .map(|n| n.name.clone())
        .collect();
    if layers.is_empty() {
        return Err(QuantError::Invalid(
            "no convolution or linear layer to quantize".into(),
        ));
    }
    if model
        .graph
        .nodes()
        .iter()
        .any(|n| matches!(n.op, Op::FakeQuant(_)))
    {
        return Err(QuantError::Invalid(
            "the model is already quantized (it has fake-quantization nodes)".into(),
        ));
    }
    Ok(layers)
}

/// The quantizer that the statistics under `key` set: a layer's input quantizer, or an output
/// quantizer (whose key is its own name).
fn quantizer_of(key: &str) -> String {
    if key.ends_with(".output_quant") {
        key.to_string()
    } else {
        input_quant_name(key)
    }
}

/// Observes values on calibration batches: `points` pairs the node whose output is observed
/// with the name its statistics go under. An observed value that holds NaN or infinity is an
/// error naming the node, the quantizer and the batch: its scale would be meaningless.
fn calibrate(
    model: &Model,
    points: &[(String, String)],
    set: &ImageSet,
    normalize: &Normalize,
    cfg: &PtqConfig,
) -> Result<(HashMap<String, Stats>, usize)> {
    let mut feeds: HashMap<String, Vec<String>> = HashMap::new();
    for (node, key) in points {
        feeds.entry(node.clone()).or_default().push(key.clone());
    }
    let n = cfg.batches.saturating_mul(cfg.batch_size).min(set.len());
    if n == 0 {
        return Err(QuantError::Invalid("no calibration images".into()));
    }
    let calib = set.take(n);
    let loader_cfg = LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle: None,
        augment: Default::default(),
        normalize: normalize.clone(),
        drop_last: false,
    };
    let mut stats: HashMap<String, Stats> = points
        .iter()
        .map(|(_, key)| (key.clone(), Stats::default()))
        .collect();
    let passes = if cfg.activations.needs_histogram() {
        2
    } else {
        1
    };
    for pass in 0..passes {
        if pass == 1 {
            for s in stats.values_mut() {
                s.range = s.max();
            }
        }
        let data: Arc<dyn Dataset> = Arc::new(calib.clone());
        let loader = Loader::new(data, &loader_cfg, 0, &model.device())?;
        let batches = loader.len();
        for (b, batch) in loader.enumerate() {
            let batch = batch?;
            let mut observe = |name: &str, y: &candle_core::Tensor| -> slim_core::Result<()> {
                if let Some(targets) = feeds.get(name) {
                    let v = y.flatten_all()?.to_vec1::<f32>()?;
                    // The second pass sees the values the first one checked.
                    let max = if pass == 0 {
                        let (max, finite) = v.iter().fold((0f32, true), |(m, f), x| {
                            (m.max(x.abs()), f && x.is_finite())
                        });
                        if !finite {
                            let nf = NonFinite::scan(name, v.iter().copied())
                                .map(|nf| nf.summary())
                                .unwrap_or_default();
                            let quantizers: Vec<String> = targets
                                .iter()
                                .map(|t| format!("`{}`", quantizer_of(t)))
                                .collect();
                            return Err(CoreError::Node {
                                node: name.to_string(),
                                msg: format!(
                                    "on calibration batch {} of {batches}, its output holds \
                                     {nf}, observed for {}; the model's values overflow or \
                                     turn NaN by this point",
                                    b + 1,
                                    quantizers.join(", ")
                                ),
                            });
                        }
                        max
                    } else {
                        0.0
                    };
                    for t in targets {
                        if let Some(s) = stats.get_mut(t) {
                            if pass == 0 {
                                s.batch_max.push(max);
                            } else {
                                s.add_histogram(&v);
                            }
                        }
                    }
                }
                Ok(())
            };
            model.forward_with(
                std::slice::from_ref(&batch.images),
                Mode::Eval,
                ForwardOptions::default().with_observer(&mut observe),
            )?;
        }
    }
    Ok((stats, n))
}

/// Whether layer `l` reads the graph's input directly.
fn reads_model_input(model: &Model, l: &str) -> bool {
    model.graph.find(l).is_some_and(|n| {
        n.inputs
            .first()
            .is_some_and(|&i| matches!(model.graph.node(i).op, Op::Input { .. }))
    })
}

/// The scale of each activation quantizer: before each layer (by the method asked for; the
/// model's input by its whole range) and after each output point (its whole range).
fn activation_scales(
    model: &Model,
    layers: &[String],
    outputs: &[String],
    stats: &HashMap<String, Stats>,
    cfg: &PtqConfig,
) -> BTreeMap<String, f32> {
    let qa = qmax(cfg.bits_activations);
    let mut scales: BTreeMap<String, f32> = BTreeMap::new();
    for l in layers {
        // The model's input is a known, bounded range (normalized pixels) with nothing rare to
        // clip; KL's search would mistake its background spike for the bulk of the
        // distribution and clip the bright pixels, so the input keeps its full range.
        let method = if cfg.activations == ActQuant::Kl && reads_model_input(model, l) {
            ActQuant::AbsMax
        } else {
            cfg.activations
        };
        let t = stats[l].threshold(method, qa);
        // A layer whose input was always zero keeps a harmless scale.
        scales.insert(input_quant_name(l), if t > 0.0 { t / qa } else { 1.0 });
    }
    for e in outputs {
        // Outputs keep their whole observed range: they carry sums and dense maps whose
        // largest values matter.
        let key = output_quant_name(e);
        let t = stats[&key].threshold(ActQuant::AbsMax, qa);
        scales.insert(key, if t > 0.0 { t / qa } else { 1.0 });
    }
    scales
}

/// The graph with a fake-quantization node of `bits` before every layer of `layers`, and
/// after every output point.
fn with_quantizers(
    model: &Model,
    layers: &[String],
    outputs: &[String],
    bits: u8,
) -> Result<Graph> {
    let def = model.graph.to_def();
    let fake_quant = |name: String, input: String| NodeDef {
        name,
        op: Op::FakeQuant(FakeQuantSpec {
            bits,
            moving_rate: 0.0,
            window: 0,
        }),
        inputs: vec![input],
    };
    let mut nodes: Vec<NodeDef> =
        Vec::with_capacity(def.nodes.len() + layers.len() + outputs.len());
    for n in &def.nodes {
        let mut n = n.clone();
        // Readers of an output point read its quantizer.
        for i in &mut n.inputs {
            if outputs.contains(&*i) {
                *i = output_quant_name(i);
            }
        }
        if layers.contains(&n.name) {
            let q = input_quant_name(&n.name);
            nodes.push(fake_quant(q.clone(), n.inputs[0].clone()));
            n.inputs = vec![q];
        }
        let name = n.name.clone();
        nodes.push(n);
        if outputs.contains(&name) {
            nodes.push(fake_quant(output_quant_name(&name), name));
        }
    }
    Ok(Graph::from_def(&GraphDef {
        nodes,
        outputs: def.outputs.clone(),
    })?)
}

/// The parameters with the layers' weights quantized (and stored dequantized beside their
/// integers), the activation quantizers' scales as buffers, and what was done per layer.
#[allow(clippy::type_complexity)]
fn quantized_params(
    model: &Model,
    layers: &[String],
    scales: &BTreeMap<String, f32>,
    cfg: &PtqConfig,
) -> Result<(ParamStore, BTreeMap<String, Int8Tensor>, Vec<LayerReport>)> {
    let mut params = ParamStore::new();
    let mut int8 = BTreeMap::new();
    let device = model.device();
    for (name, p) in model.params.iter() {
        params.insert(name, &p.var.as_tensor().copy()?, p.kind)?;
    }
    let mut report = Vec::new();
    for l in layers {
        let wname = format!("{l}.weight");
        let q = quantize_param(&model.params, &wname, cfg.weights, cfg.bits_weights)?;
        params.set(&wname, &q.dequantize(&device)?)?;
        report.push(LayerReport {
            layer: l.clone(),
            input_scale: scales[&input_quant_name(l)],
            weight_scales: q.scales.len(),
        });
        int8.insert(
            wname,
            Int8Tensor {
                values: q.values,
                scales: q.scales,
            },
        );
    }
    for (q, scale) in scales {
        params.insert(
            format!("{q}.scale"),
            &candle_core::Tensor::new(&[*scale], &device)?,
            ParamKind::Buffer,
        )?;
    }
    Ok((params, int8, report))
}

/// Quantizes `model` after calibrating on the first `cfg.batches * cfg.batch_size` images of
/// `set`.
/// `model` quantized for timing alone: calibrated on a fixed pattern of 16 images of its input
/// shape (latency does not depend on the values).
pub fn quantize_for_timing(model: &Model) -> Result<Model> {
    let input: [usize; 3] = model
        .input_shape()
        .try_into()
        .map_err(|_| QuantError::Invalid("a model to time in int8 takes images (CxHxW)".into()))?;
    let n = 16;
    let set = ImageSet {
        shape: input,
        classes: 10,
        images: (0..n * input.iter().product::<usize>())
            .map(|i| (i * 97 % 251) as u8)
            .collect(),
        labels: vec![0; n],
    };
    let normalize = Normalize {
        mean: vec![0.5; input[0]],
        std: vec![0.25; input[0]],
    };
    let cfg = PtqConfig {
        batches: 1,
        batch_size: n,
        ..Default::default()
    };
    Ok(quantize(model, &set, &normalize, &cfg)?.0)
}

pub fn quantize(
    model: &Model,
    set: &ImageSet,
    normalize: &Normalize,
    cfg: &PtqConfig,
) -> Result<(Model, PtqReport)> {
    check_bits(cfg.bits_weights)?;
    check_bits(cfg.bits_activations)?;
    if cfg.batches == 0 || cfg.batch_size == 0 {
        return Err(QuantError::Invalid(
            "calibration needs at least one batch of at least one image".into(),
        ));
    }
    // A NaN weight would quantize to zero and an infinite one would give an infinite scale:
    // refused by name, before folding spreads it into the convolution it folds into.
    if let Some(nf) = model.nonfinite_params()?.into_iter().next() {
        return Err(CoreError::param(
            &nf.tensor,
            format!(
                "holds {}; quantization needs finite parameters",
                nf.summary()
            ),
        )
        .into());
    }
    let started = Instant::now();
    let (folded_model, folded) = if cfg.fold_batch_norm {
        slim_core::transform::fold_batch_norms(model)?
    } else {
        (model.clone(), 0)
    };
    let model = &folded_model;
    let layers = quantizable_layers(model, &cfg.scope)?;
    let mut points = Vec::with_capacity(layers.len());
    for l in &layers {
        let node = model
            .graph
            .find(l)
            .ok_or_else(|| QuantError::Invalid(format!("no layer `{l}`")))?;
        let src = model.graph.node(node.inputs[0]).name.clone();
        points.push((src, l.clone()));
    }
    let outputs = output_quant_points(model, &layers)?;
    for e in &outputs {
        points.push((e.clone(), output_quant_name(e)));
    }
    let (stats, images) = calibrate(model, &points, set, normalize, cfg)?;
    let scales = activation_scales(model, &layers, &outputs, &stats, cfg);
    let graph = with_quantizers(model, &layers, &outputs, cfg.bits_activations)?;
    let (params, int8, report) = quantized_params(model, &layers, &scales, cfg)?;
    let mut out = Model::new(graph, params)?;
    out.provenance = model.provenance.clone();
    out.provenance.insert(
        "quantization".into(),
        format!(
            "ptq: weights {} {}-bit, activations {} {}-bit, {} calibration images{}",
            cfg.weights,
            cfg.bits_weights,
            cfg.activations,
            cfg.bits_activations,
            images,
            if cfg.bias_correction {
                ", bias correction"
            } else {
                ""
            }
        ),
    );
    out.int8 = int8;
    let bias_corrections = if cfg.bias_correction {
        let (corrected, shifts) = correct_biases(model, out, &layers, set, normalize, cfg)?;
        out = corrected;
        shifts
    } else {
        Vec::new()
    };
    Ok((
        out,
        PtqReport {
            layers: report,
            outputs: outputs.clone(),
            calibration_images: images,
            folded_batch_norms: folded,
            bias_corrections,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

/// Per-channel means of the outputs of `layers` over the calibration batches.
fn channel_means(
    model: &Model,
    layers: &[String],
    batches: &[candle_core::Tensor],
) -> Result<HashMap<String, Vec<f64>>> {
    let mut sums: HashMap<String, (Vec<f64>, usize)> = HashMap::new();
    for x in batches {
        let mut observe = |name: &str, y: &candle_core::Tensor| -> slim_core::Result<()> {
            if layers.iter().any(|l| l == name) {
                // [N, C, ...] -> per-channel sums over everything but C.
                let c = y.dim(1)?;
                let per_channel = y.transpose(0, 1)?.reshape((c, ()))?;
                let count = per_channel.dim(1)?;
                let s = per_channel.sum(1)?.to_vec1::<f32>()?;
                let e = sums
                    .entry(name.to_string())
                    .or_insert_with(|| (vec![0.0; c], 0));
                for (a, v) in e.0.iter_mut().zip(s) {
                    *a += f64::from(v);
                }
                e.1 += count;
            }
            Ok(())
        };
        model.forward_with(
            std::slice::from_ref(x),
            Mode::Eval,
            ForwardOptions::default().with_observer(&mut observe),
        )?;
    }
    Ok(sums
        .into_iter()
        .map(|(k, (s, n))| (k, s.iter().map(|v| v / n.max(1) as f64).collect()))
        .collect())
}

/// Empirical bias correction (as in Nagel et al., "Data-Free Quantization Through Weight
/// Equalization and Bias Correction", ICCV 2019, but measured on calibration images rather than
/// derived from batch-norm statistics): quantizing a layer's weights shifts the mean of its
/// outputs; adding the shift back to the bias removes the systematic part of the error.
fn correct_biases(
    float: &Model,
    mut quant: Model,
    layers: &[String],
    set: &ImageSet,
    normalize: &Normalize,
    cfg: &PtqConfig,
) -> Result<(Model, Vec<(String, f32)>)> {
    // Layers without a bias get a zero one first.
    let needs_bias = |op: &Op| match op {
        Op::Conv2d(c) => !c.bias,
        Op::Linear(l) => !l.bias,
        _ => false,
    };
    let graph = quant.graph.map_ops(|n| {
        if layers.contains(&n.name) && needs_bias(&n.op) {
            match &n.op {
                Op::Conv2d(c) => Op::Conv2d(slim_core::Conv2dSpec {
                    bias: true,
                    ..c.clone()
                }),
                Op::Linear(l) => Op::Linear(slim_core::LinearSpec {
                    bias: true,
                    ..l.clone()
                }),
                other => other.clone(),
            }
        } else {
            n.op.clone()
        }
    })?;
    let device = quant.device();
    for l in layers {
        let name = format!("{l}.bias");
        if quant.params.tensor(&name).is_err() {
            let c = float
                .graph
                .find(l)
                .map(|n| n.shape[0])
                .ok_or_else(|| QuantError::Invalid(format!("no layer `{l}`")))?;
            quant.params.insert(
                &name,
                &candle_core::Tensor::zeros(c, candle_core::DType::F32, &device)?,
                ParamKind::Bias,
            )?;
        }
    }
    let mut corrected = Model::new(graph, quant.params.clone())?;
    corrected.provenance = quant.provenance.clone();
    corrected.int8 = quant.int8.clone();

    let n = (cfg.batches.min(8) * cfg.batch_size).min(set.len());
    let loader_cfg = LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle: None,
        augment: Default::default(),
        normalize: normalize.clone(),
        drop_last: false,
    };
    let data: Arc<dyn Dataset> = Arc::new(set.take(n));
    let batches: Vec<candle_core::Tensor> = Loader::new(data, &loader_cfg, 0, &device)?
        .map(|b| b.map(|b| b.images))
        .collect::<slim_core::Result<_>>()?;
    let want = channel_means(float, layers, &batches)?;
    let mut shifts = Vec::new();
    for l in layers {
        let got = channel_means(&corrected, std::slice::from_ref(l), &batches)?;
        let (Some(w), Some(g)) = (want.get(l), got.get(l)) else {
            continue;
        };
        let delta: Vec<f32> = w.iter().zip(g).map(|(w, g)| (w - g) as f32).collect();
        let name = format!("{l}.bias");
        let b = corrected.params.tensor(&name)?;
        let d = candle_core::Tensor::from_vec(delta.clone(), b.dims(), &device)?;
        corrected.params.set(&name, &(b + d)?)?;
        let largest = delta.iter().fold(0f32, |m, v| m.max(v.abs()));
        shifts.push((l.clone(), largest));
    }
    Ok((corrected, shifts))
}
