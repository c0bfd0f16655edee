//! The int8 runtime: quantized convolutions and linear layers computed in integers.
//!
//! A layer runs in integers when its weight is held as int8 ([`Model::int8`]) and its input
//! comes from a fake-quantization node: the input is taken to its int8 grid
//! (`round(x / s_in)`), multiplied with the int8 weights with 32-bit accumulation, and the sums
//! are scaled back (`acc * s_in * s_w[o] + bias[o]`). Where that output only reaches other
//! integer layers (through a ReLU or ReLU6, max pooling or flattening, and their input's
//! quantizer), the layer rounds it to that quantizer's grid at once and int8 values travel to
//! the next layers, the same integers the float graph would round to (see
//! [`Int8Kernels::new`]). A sum that alone reads a layer's float output, or the floats of
//! the quantizer after it (a residual block's sum), is computed with those values, and the
//! activation after it, as they are written.
//! Everything else (other additions, average pooling, a model's last layer) runs as in the
//! float model. Matrix products run on the int8 GEMM of [`crate::gemm`],
//! depthwise convolutions as sweeps over stride phases, or, on small planes with AVX-512
//! VBMI, gathered from registers by byte permutes; rayon spreads the work over the cores
//! when there is enough of it to pay for that.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use slim_core::exec::NodeKernels;
use slim_core::kernels::{copy_short, for_each_chunk, for_each_task, Disjoint, Phases};
use slim_core::train::EvalReport;
use slim_core::{ForwardOptions, Mode, Model, Node, Op};

use crate::gemm::{gemm_rows, MatRef, PackedA};
use crate::grid::{bounds, round_to_grid, HALF_DOWN};

mod conv;
mod depthwise;
mod pooling;
mod residual;
use crate::Result;
use conv::*;
use depthwise::*;
use pooling::*;
use residual::*;

/// The shapes of one convolution.
struct Geometry<'a> {
    cin: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    spec: &'a slim_core::Conv2dSpec,
}

impl Geometry<'_> {
    /// Where in its input plane output `q` (of the `oh * ow` plane) reads kernel tap `t`
    /// (row-major), or `None` where that is padding.
    fn tap_place(&self, q: usize, t: usize) -> Option<usize> {
        let c = self.spec;
        let kw = c.kernel[1];
        let (oy, ox) = (q / self.ow, q % self.ow);
        let iy = (oy * c.stride + (t / kw) * c.dilation) as isize - c.padding as isize;
        let ix = (ox * c.stride + (t % kw) * c.dilation) as isize - c.padding as isize;
        ((0..self.h as isize).contains(&iy) && (0..self.w as isize).contains(&ix))
            .then(|| iy as usize * self.w + ix as usize)
    }
}

/// Input channels (per group) from which a convolution's columns are gathered as they are
/// packed rather than written out first: the gathering works out its loads once per panel
/// and kernel tap and uses them for every channel, which does not pay for one or two
/// channels (LeNet's first layer ran at half the speed).
const GATHERED_CHANNELS: usize = 4;

/// Work below which a kernel runs on the calling thread: handing it to the rayon pool and
/// waiting for it (tens of microseconds) would cost more than the second core saves. In
/// multiply-adds for matrix products (about a hundred per nanosecond with VNNI) and for
/// depthwise sweeps, and in values for pooling and rounding (measured on the benches' models:
/// each limit is where batch 1 stopped gaining and batch 64 started losing).
const SERIAL_PRODUCT: usize = 1 << 21;
const SERIAL_DEPTHWISE: usize = 1 << 17;
const SERIAL_VALUES: usize = 1 << 15;

thread_local! {
    /// A worker's sums buffer, kept from task to task.
    static ACC: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a layer's sums become int8 values on the grid of the quantizer that reads its output
/// (through a ReLU or ReLU6 between them, when there is one): the bounds and `1 / scale` of
/// [`quantize_chunk`], with the activation folded into the bounds.
#[derive(Clone, Copy, Debug)]
struct Requant {
    bounds: [f32; 3],
    avx2: bool,
}

impl Requant {
    /// For a float output (no requantization).
    const NONE: Requant = Requant {
        bounds: [0.0; 3],
        avx2: false,
    };

    /// The grid of a quantizer with `scale`, after `activation` (ReLU or ReLU6) if any.
    fn new(scale: f32, activation: Option<&Op>) -> Requant {
        let [mut lo, mut hi, inv] = bounds(scale);
        // max(relu(y), lo) = max(y, 0) for lo < 0; min(min(y, 6), hi) = min(y, min(6, hi)).
        // Both are the same float operations as the float graph's, so the integers agree.
        if matches!(activation, Some(Op::Relu | Op::Relu6)) {
            lo = 0.0;
        }
        if matches!(activation, Some(Op::Relu6)) {
            hi = hi.min(6.0);
        }
        Requant {
            bounds: [lo, hi, inv],
            avx2: crate::gemm::Kernel::Avx2.available(),
        }
    }
}

/// A block of consecutive output planes (output channels) of a layer: their int32 sums,
/// `plane` values each, and plane `i`'s scale `scales[i]` and bias `bias[i]`.
#[derive(Clone, Copy)]
struct Sums<'a> {
    acc: &'a [i32],
    plane: usize,
    scales: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl<'a> Sums<'a> {
    /// Each plane's sums with its scale and bias.
    #[inline(always)]
    fn planes(self) -> impl Iterator<Item = (&'a [i32], f32, f32)> {
        self.acc
            .chunks_exact(self.plane)
            .enumerate()
            .map(move |(i, a)| (a, self.scales[i], self.bias.map_or(0.0, |b| b[i])))
    }
}

/// The element type of an integer layer's output: `f32` (`acc * scale + bias`, the layer's
/// float output) or `i8` (that float output, requantized for the next integer layer).
trait Sink: Copy + Default + Send + Sync {
    fn finish(dst: &mut [Self], sums: Sums<'_>, to: &Requant);
    /// Where a product that finishes its sums itself writes this sink's values.
    fn output(at: *mut Self, to: &Requant) -> crate::gemm::Output;
    /// Where a depthwise sweep that finishes its sums itself writes this sink's values, for
    /// a plane with `scale` and `bias`.
    fn sweep_out<'a>(wide: &'a mut [Self], scale: f32, bias: f32, to: &Requant) -> SweepOut<'a>;
}

impl Sink for f32 {
    fn output(at: *mut f32, _: &Requant) -> crate::gemm::Output {
        crate::gemm::Output::F32(at)
    }
    fn sweep_out<'a>(wide: &'a mut [f32], scale: f32, bias: f32, _: &Requant) -> SweepOut<'a> {
        SweepOut::F32(wide, scale, bias)
    }
    fn finish(dst: &mut [f32], sums: Sums<'_>, _: &Requant) {
        for (d, (a, sc, b)) in dst.chunks_exact_mut(sums.plane).zip(sums.planes()) {
            for (d, &a) in d.iter_mut().zip(a) {
                *d = a as f32 * sc + b;
            }
        }
    }
}

impl Sink for i8 {
    fn output(at: *mut i8, to: &Requant) -> crate::gemm::Output {
        crate::gemm::Output::I8(at, to.bounds)
    }
    fn sweep_out<'a>(wide: &'a mut [i8], scale: f32, bias: f32, to: &Requant) -> SweepOut<'a> {
        SweepOut::I8(wide, scale, bias, to.bounds)
    }
    /// Each float output computed as the f32 sink computes it, then rounded as
    /// [`quantize_chunk`] rounds, in one pass compiled for AVX2 where the machine has it (a
    /// layer calls this once per block of planes, and the planes of late layers are small).
    fn finish(dst: &mut [i8], sums: Sums<'_>, to: &Requant) {
        #[inline(always)]
        fn run(dst: &mut [i8], sums: Sums<'_>, [lo, hi, inv]: [f32; 3]) {
            for (d, (a, sc, b)) in dst.chunks_exact_mut(sums.plane).zip(sums.planes()) {
                for (d, &a) in d.iter_mut().zip(a) {
                    *d = round_to_grid(a as f32 * sc + b, lo, hi, inv);
                }
            }
        }
        let bounds = to.bounds;
        slim_core::with_target_feature!(
            "avx2",
            to.avx2,
            run(dst: &mut [i8], sums: Sums<'_>, bounds: [f32; 3])
        )
    }
}

/// The integer kernels, to pass to a forward as [`ForwardOptions::kernels`].
///
/// [`Int8Kernels::new`] prepares (packs) a model's int8 weights once, for many forwards of
/// that model; [`Int8Kernels::ON_THE_FLY`] serves any model and packs each layer's weights
/// when it runs.
pub struct Int8Kernels<'m> {
    prepared: Option<Prepared<'m>>,
}

/// What [`Int8Kernels::new`] prepares for one model.
struct Prepared<'m> {
    model: &'m Model,
    /// Packed weights of the layers that run as matrix products.
    packed: HashMap<String, PackedA>,
    /// The same in tap order, for the convolutions that gather from quad planes
    /// ([`quad_layer`]).
    tap_major: HashMap<String, PackedA>,
    /// Integer layers whose output only feeds other integer layers (through an activation and
    /// a quantizer that nothing else reads): they write int8 values on that quantizer's grid.
    requant: HashMap<usize, Requant>,
    /// The activations and quantizers between such layers, which pass those values on.
    passed: HashSet<usize>,
    /// Quantizers at the end of such a chain that other nodes read: they turn the int8
    /// values into the floats they stand for (with their scales).
    dequantized: HashMap<usize, f32>,
    /// The quantizers whose readers are all integer layers (and that are no graph output):
    /// their readers round the input themselves, so they pass it on as it is.
    skipped: HashSet<usize>,
    /// The values that have the sum after them computed with them (and its activation):
    /// integer layers' outputs and the floats of quantizers after such layers, by node;
    /// those sums, with the position of that node among their inputs; and those
    /// activations, which pass the value on ([`residual`]).
    residual: HashMap<usize, Residual>,
    sums: HashMap<usize, usize>,
    activated: HashSet<usize>,
    /// Every integer layer's weights, scales and bias, by node.
    layers: HashMap<usize, LayerParts<'m>>,
    /// The depthwise layers' sweeps (and the windows of fanned-out layers), by node and input
    /// height and width, made at the first forward with that input size.
    sweeps: Mutex<HashMap<(usize, usize, usize), Arc<Sweeps>>>,
}

/// What an integer layer computes with, looked up once: its int8 weights (and their name),
/// its input's scale, each output channel's `s_in * s_w`, and its bias.
struct LayerParts<'m> {
    id: usize,
    weight: String,
    w: &'m slim_core::model::Int8Tensor,
    s_in: f32,
    scales: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl<'m> LayerParts<'m> {
    /// The parts of node `id` of `model`, `None` where it is no integer layer (no int8
    /// weights, or an input that is not a quantizer's).
    fn new(model: &'m Model, id: usize) -> slim_core::Result<Option<LayerParts<'m>>> {
        let node = model.graph.node(id);
        let rows = match &node.op {
            Op::Conv2d(c) => c.out_channels,
            Op::Linear(l) => l.out_features,
            _ => return Ok(None),
        };
        let weight = node.param_name("weight");
        let (Some(w), Some(s_in)) = (model.int8.get(&weight), input_scale(model, node)?) else {
            return Ok(None);
        };
        let bias = match model.params.tensor(&node.param_name("bias")) {
            Ok(b) => Some(b.to_vec1::<f32>()?),
            Err(_) => None,
        };
        // Row `o` of the weights (output channel or feature) has the scale of its values.
        let per_row = w.values.len() / rows.max(1);
        let per_scale = (w.values.len() / w.scales.len().max(1)).max(1);
        let scales = (0..rows)
            .map(|o| s_in * w.scales[(o * per_row) / per_scale])
            .collect();
        Ok(Some(LayerParts {
            id,
            weight,
            w,
            s_in,
            scales,
            bias,
        }))
    }
}

impl<'m> Int8Kernels<'m> {
    /// Kernels that pack the weights of whatever model they run, layer by layer.
    pub const ON_THE_FLY: Int8Kernels<'static> = Int8Kernels { prepared: None };

    /// Kernels for `model`, with its int8 weights packed now (any other model they are given
    /// is served on the fly).
    ///
    /// Where an integer layer's output goes only (through a ReLU or ReLU6) to a quantizer
    /// that only integer layers read, the layer writes int8 values on that quantizer's grid
    /// and the next layers read them as they are: no float output is written, activated and
    /// quantized again between the two. Such a layer's output (and its activation's and
    /// quantizer's) is then an int8 tensor held as `U8` (the same bytes) for observers and
    /// taps of the forward.
    ///
    /// Where an integer layer's float output (or the floats a quantizer makes of such a
    /// layer's int8 values) goes only to a sum of two values (a residual block's), that node
    /// adds the sum's other term, and applies the ReLU or ReLU6 that alone reads the sum, as
    /// it writes its values: observers and taps of the forward see that finished value as
    /// the node's output (and the sum's and the activation's).
    pub fn new(model: &'m Model) -> Self {
        // The layers that run as matrix products (depthwise convolutions run directly).
        let products: HashSet<String> = model
            .graph
            .nodes()
            .iter()
            .filter(|n| match &n.op {
                Op::Conv2d(c) => !c.is_depthwise(),
                Op::Linear(_) => true,
                _ => false,
            })
            .map(|n| n.param_name("weight"))
            .collect();
        let packed = model
            .int8
            .iter()
            .filter(|(name, _)| products.contains(*name))
            .filter_map(|(name, w)| {
                let rows = *model.params.param(name)?.var.dims().first()?;
                let cols = w.values.len() / rows.max(1);
                Some((
                    name.clone(),
                    PackedA::new(MatRef::new(&w.values, rows, cols)),
                ))
            })
            .collect();
        let tap_major = model
            .graph
            .nodes()
            .iter()
            .filter_map(|node| {
                let name = node.param_name("weight");
                let w = model.int8.get(&name)?;
                Some((name, quad_filters(node, &w.values)?))
            })
            .collect();
        let (requant, passed, dequantized) = integer_chains(model);
        let (residual, sums, activated) = residual_sums(model, &requant, &dequantized);
        let g = &model.graph;
        let skipped = (0..g.nodes().len())
            .filter(|&id| skipped_quantizer(model, id))
            .collect();
        // (A layer whose parts cannot be read is looked up at its forward, which reports why.)
        let layers = (0..g.nodes().len())
            .filter_map(|id| Some((id, LayerParts::new(model, id).ok()??)))
            .collect();
        Int8Kernels {
            prepared: Some(Prepared {
                model,
                packed,
                tap_major,
                requant,
                passed,
                dequantized,
                skipped,
                residual,
                sums,
                activated,
                layers,
                sweeps: Mutex::default(),
            }),
        }
    }

    /// What was prepared, when it was prepared for `model`.
    fn for_model(&self, model: &Model) -> Option<&Prepared<'m>> {
        self.prepared
            .as_ref()
            .filter(|p| std::ptr::eq(p.model, model))
    }

    /// A depthwise layer's sweeps: prepared ones for the model these kernels were made for
    /// (made at the layer's first forward with this input size), else made now.
    fn sweeps(&self, model: &Model, id: usize, geo: &Geometry<'_>, wq: &[i8]) -> Arc<Sweeps> {
        self.sweeps_made(model, id, geo, || Sweeps::fastest(geo, wq))
    }

    /// A layer's sweeps as `make` makes them: kept for the model these kernels were made for
    /// (made at the layer's first forward with this input size), else made now.
    fn sweeps_made(
        &self,
        model: &Model,
        id: usize,
        geo: &Geometry<'_>,
        make: impl FnOnce() -> Sweeps,
    ) -> Arc<Sweeps> {
        let Some(p) = self.for_model(model) else {
            return Arc::new(make());
        };
        let key = (id, geo.h, geo.w);
        // A poisoned lock only means another forward panicked; the map is still whole.
        let mut made = p.sweeps.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(made.entry(key).or_insert_with(|| Arc::new(make())))
    }

    /// A convolution's filters in tap order (see [`quad_layer`]): prepared ones for the
    /// model these kernels were made for, else packed now; `None` for other layers.
    fn quad_weights(&self, model: &Model, layer: &Layer<'_>) -> Option<Cow<'_, PackedA>> {
        match self.for_model(model) {
            Some(p) => p.tap_major.get(&layer.parts.weight).map(Cow::Borrowed),
            None => quad_filters(layer.node, &layer.parts.w.values).map(Cow::Owned),
        }
    }

    /// A layer's packed weights: prepared ones for the model these kernels were made for,
    /// else packed now.
    fn weights(&self, model: &Model, layer: &Layer<'_>, rows: usize) -> Cow<'_, PackedA> {
        let values = &layer.parts.w.values;
        match self
            .for_model(model)
            .and_then(|p| p.packed.get(&layer.parts.weight))
        {
            Some(packed) => Cow::Borrowed(packed),
            None => Cow::Owned(PackedA::new(MatRef::new(
                values,
                rows,
                values.len() / rows.max(1),
            ))),
        }
    }
}

/// Whether node `id` is a quantizer that passes its input on as it is: one whose readers are
/// all convolutions or linear layers with int8 weights (they round the input to the same grid
/// themselves; rounding it here would do it twice), and that is no graph output.
fn skipped_quantizer(model: &Model, id: usize) -> bool {
    let g = &model.graph;
    if !matches!(g.node(id).op, Op::FakeQuant(_)) || g.outputs().contains(&id) {
        return false;
    }
    let readers = g.successors(id);
    !readers.is_empty()
        && readers.iter().all(|&r| {
            let n = g.node(r);
            matches!(n.op, Op::Conv2d(_) | Op::Linear(_))
                && model.int8.contains_key(&n.param_name("weight"))
        })
}

/// Whether a node runs in integers: a convolution or linear layer with int8 weights that
/// reads a quantizer.
fn is_integer_layer(model: &Model, node: &Node) -> bool {
    matches!(node.op, Op::Conv2d(_) | Op::Linear(_))
        && model.int8.contains_key(&node.param_name("weight"))
        && node
            .inputs
            .first()
            .is_some_and(|&i| matches!(model.graph.node(i).op, Op::FakeQuant(_)))
}

/// The integer layers that can write their output requantized (see [`Int8Kernels::new`]),
/// with the grid of each; the activation and quantizer nodes that pass it on; and the
/// quantizers at the end of such a chain that other nodes read too (a sum, pooling), which
/// turn the int8 values back into floats, with their scales.
type Chains = (HashMap<usize, Requant>, HashSet<usize>, HashMap<usize, f32>);

fn integer_chains(model: &Model) -> Chains {
    let g = &model.graph;
    let outputs = g.outputs();
    // The one reader of a node that is not a graph output.
    let only_reader = |id: usize| match g.successors(id)[..] {
        [r] if !outputs.contains(&id) => Some(r),
        _ => None,
    };
    let (mut requant, mut passed, mut dequantized) =
        (HashMap::new(), HashSet::new(), HashMap::new());
    for id in g.eval_order() {
        let node = g.node(id);
        if !is_integer_layer(model, node) {
            continue;
        }
        let Some(mut next) = only_reader(id) else {
            continue;
        };
        // Up to the quantizer: at most one ReLU or ReLU6, and max pooling and flattening,
        // in any order. Each commutes with rounding to the grid (they are monotone, or only
        // move values), so the layer can round first and the values travel as int8.
        let mut chain = vec![];
        let mut activation = None;
        let quantizer = loop {
            let op = &g.node(next).op;
            match op {
                Op::Relu | Op::Relu6 if activation.is_none() => activation = Some(op),
                // (Extra end padding is left to the float path.)
                Op::MaxPool2d(p) if p.is_symmetric() => {}
                Op::Flatten => {}
                _ => break Some(next),
            }
            chain.push(next);
            match only_reader(next) {
                Some(after) => next = after,
                None => break None,
            }
        };
        let Some(next) = quantizer else {
            continue;
        };
        let quantizer = g.node(next);
        let scale = model
            .params
            .tensor(&quantizer.param_name("scale"))
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?));
        let (true, Ok(scale)) = (matches!(quantizer.op, Op::FakeQuant(_)), scale) else {
            continue;
        };
        let Some(&scale) = scale.first() else {
            continue;
        };
        let readers = g.successors(next);
        if !readers.is_empty()
            && readers.iter().all(|&r| is_integer_layer(model, g.node(r)))
            && !outputs.contains(&next)
        {
            chain.push(next);
        } else {
            dequantized.insert(next, scale);
        }
        requant.insert(id, Requant::new(scale, activation));
        passed.extend(chain);
    }
    (requant, passed, dequantized)
}

/// Int8 values on a quantizer's grid (scale `s`) as the floats they stand for.
fn dequantize(x: &Tensor, s: f32, what: &str) -> slim_core::Result<Vec<f32>> {
    with_int8(x, what, |q| {
        let mut out = vec![0f32; q.len()];
        for_each_chunk(&mut out, 1 << 14, q.len() < SERIAL_VALUES, |(i, d)| {
            let src = &q[i << 14..];
            for (d, &q) in d.iter_mut().zip(src) {
                *d = f32::from(q) * s;
            }
        });
        out
    })
}

/// The int8 values of a `U8` tensor (see [`Int8Kernels::new`]), read where they lie, given
/// to `f`; `what` names the node for the error when they are not contiguous on the CPU.
fn with_int8<R>(x: &Tensor, what: &str, f: impl FnOnce(&[i8]) -> R) -> slim_core::Result<R> {
    let (storage, layout) = x.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::U8(v)), Some((a, b))) => {
            Ok(f(bytemuck::cast_slice(&v[a..b])))
        }
        _ => Err(slim_core::CoreError::Node {
            node: what.to_string(),
            msg: "an int8 input must be a contiguous tensor on the CPU".into(),
        }),
    }
}

/// int8 values as the `U8` tensor that carries them between layers (the same bytes: i8 and
/// u8 share size and alignment, so the buffer is handed over, not copied).
fn int8_tensor(
    v: Vec<i8>,
    shape: Vec<usize>,
    device: &candle_core::Device,
) -> slim_core::Result<Tensor> {
    Ok(Tensor::from_vec(
        bytemuck::allocation::cast_vec::<i8, u8>(v),
        shape,
        device,
    )?)
}

/// The input's fake-quantization scale, when the node reads one.
fn input_scale(model: &Model, node: &Node) -> slim_core::Result<Option<f32>> {
    let src = model.graph.node(node.inputs[0]);
    if !matches!(src.op, Op::FakeQuant(_)) {
        return Ok(None);
    }
    Ok(Some(
        model
            .params
            .tensor(&src.param_name("scale"))?
            .to_vec1::<f32>()?[0],
    ))
}

/// The input on its int8 grid, computed exactly as the fake quantizer
/// ([`slim_core::exec::fake_quantize`]) does: clipped to `±127 s`, multiplied by `1 / s` (as
/// f32), rounded half away from zero. Any other order of operations (dividing by `s`, say)
/// rounds some values near a half-step the other way, and the two models part.
fn to_i8(x: &Tensor, scale: f32) -> slim_core::Result<Vec<i8>> {
    // A contiguous f32 tensor on the CPU is read where it lies; anything else is copied first.
    {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(quantize_values(&data[a..b], scale));
        }
    }
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(quantize_values(&v, scale))
}

/// Each value clamped to `[-127 scale, 127 scale]`, divided by `scale` and rounded half away
/// from zero, as the fake quantizer does.
fn quantize_values(v: &[f32], scale: f32) -> Vec<i8> {
    let [lo, hi, inv] = bounds(scale);
    let mut out = vec![0i8; v.len()];
    let avx2 = crate::gemm::Kernel::Avx2.available();
    let avx512 = crate::gemm::Kernel::Avx512Vnni.available();
    // (`move`: the bounds copied into the closure, so that the loop needs no check that its
    // stores might change them, and vectorizes)
    for_each_chunk(
        &mut out,
        1 << 14,
        v.len() < SERIAL_VALUES,
        move |(i, dst)| {
            let src = &v[i << 14..][..dst.len()];
            quantize_chunk(dst, src, [lo, hi, inv], (avx512, avx2))
        },
    );
    out
}

/// The loop of [`quantize_values`] over one chunk, with the bounds `[lo, hi]` and `1 / scale`,
/// compiled for AVX-512 (F and BW) or AVX2 where the machine has them.
fn quantize_chunk(
    dst: &mut [i8],
    src: &[f32],
    [lo, hi, inv]: [f32; 3],
    (avx512, avx2): (bool, bool),
) {
    #[inline(always)]
    fn chunk(dst: &mut [i8], src: &[f32], lo: f32, hi: f32, inv: f32) {
        for (d, &a) in dst.iter_mut().zip(src) {
            *d = round_to_grid(a, lo, hi, inv);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn wide(dst: &mut [i8], src: &[f32], lo: f32, hi: f32, inv: f32) {
            chunk(dst, src, lo, hi, inv)
        }
        if avx512 {
            // SAFETY: the caller checked that the machine has AVX-512 F and BW.
            return unsafe { wide(dst, src, lo, hi, inv) };
        }
    }
    let _ = avx512;
    slim_core::with_target_feature!(
        "avx2",
        avx2,
        chunk(dst: &mut [i8], src: &[f32], lo: f32, hi: f32, inv: f32)
    )
}

impl NodeKernels for Int8Kernels<'_> {
    fn prepare<'m>(&self, model: &'m Model) -> Option<Box<dyn NodeKernels + 'm>> {
        Some(Box::new(Int8Kernels::new(model)))
    }

    /// Every scale is the model's own (from calibration or training), none the batch's.
    fn per_sample(&self) -> bool {
        true
    }

    /// A layer that computes the sum after it reads the sum's other term.
    fn also_reads(&self, model: &Model, id: usize) -> Option<usize> {
        Some(self.for_model(model)?.residual.get(&id)?.other)
    }

    fn run(
        &self,
        model: &Model,
        node: &Node,
        inputs: &[&Tensor],
        _mode: Mode,
    ) -> slim_core::Result<Option<Tensor>> {
        let id = model.graph.id(&node.name)?;
        let prepared = self.for_model(model);
        if let Some(p) = prepared {
            // A sum its layer computed (with its activation): passed on.
            if let Some(&at) = p.sums.get(&id) {
                return Ok(Some(inputs[at].clone()));
            }
            if p.activated.contains(&id) {
                return Ok(Some(inputs[0].clone()));
            }
        }
        if prepared.is_some_and(|p| p.passed.contains(&id)) && inputs[0].dtype() == DType::U8 {
            // Already activated and on the quantizer's grid: pooled or flattened as they are.
            let x = inputs[0];
            return Ok(Some(match &node.op {
                Op::MaxPool2d(p) => max_pool_i8(x, p, &node.name)?,
                Op::Flatten => x.flatten_from(1)?,
                _ => x.clone(),
            }));
        }
        // The sum after the node (a layer, or the quantizer after one), its other term read
        // after the node's input.
        let residual = prepared
            .and_then(|p| p.residual.get(&id))
            .zip(inputs.get(1));
        let finished = |mut v: Vec<f32>, shape: &[usize]| -> slim_core::Result<Tensor> {
            if let Some((r, other)) = residual {
                add_residual(&mut v, other, r.activation, &node.name)?;
            }
            Ok(Tensor::from_vec(v, shape, inputs[0].device())?)
        };
        if let Some(&s) = prepared.and_then(|p| p.dequantized.get(&id)) {
            if inputs[0].dtype() == DType::U8 {
                let v = dequantize(inputs[0], s, &node.name)?;
                return Ok(Some(finished(v, inputs[0].dims())?));
            }
            if residual.is_some() {
                return Err(slim_core::CoreError::Node {
                    node: node.name.clone(),
                    msg: "the int8 values of the layer before it were not written".into(),
                });
            }
        }
        if let Op::FakeQuant(_) = node.op {
            let skip = match prepared {
                Some(p) => p.skipped.contains(&id),
                None => skipped_quantizer(model, id),
            };
            return Ok(skip.then(|| inputs[0].clone()));
        }
        // Prepared parts, else looked up now (on the fly, for a node that is no integer
        // layer, or for one whose parts could not be read when the kernels were made).
        let made;
        let parts = match prepared.and_then(|p| p.layers.get(&id)) {
            Some(parts) => parts,
            None => match LayerParts::new(model, id)? {
                Some(parts) => {
                    made = parts;
                    &made
                }
                None => return Ok(None),
            },
        };
        let s_in = parts.s_in;
        let x = inputs[0];
        let requant = prepared.and_then(|p| p.requant.get(&id));
        let layer = Layer { node, parts };
        let compute = |xq: &[i8]| -> slim_core::Result<Option<Tensor>> {
            Ok(match requant {
                Some(to) => self
                    .layer::<i8>(model, &layer, xq, x.dims(), to)?
                    .map(|(v, shape)| int8_tensor(v, shape, x.device()))
                    .transpose()?,
                None => self
                    .layer::<f32>(model, &layer, xq, x.dims(), &Requant::NONE)?
                    .map(|(v, shape)| finished(v, &shape))
                    .transpose()?,
            })
        };
        // The input on its grid: as the previous layer wrote it, or quantized now.
        if x.dtype() == DType::U8 {
            with_int8(x, &node.name, compute)?
        } else {
            compute(&to_i8(x, s_in)?)
        }
    }
}

/// An integer layer's node and parts.
struct Layer<'a> {
    node: &'a Node,
    parts: &'a LayerParts<'a>,
}

impl Int8Kernels<'_> {
    /// The output values of an integer layer over the int8 input `xq` (of shape `dims`) and
    /// their shape, as `T` (see [`Sink`]); `None` for a node it does not compute.
    fn layer<T: Sink>(
        &self,
        model: &Model,
        layer: &Layer<'_>,
        xq: &[i8],
        dims: &[usize],
        to: &Requant,
    ) -> slim_core::Result<Option<(Vec<T>, Vec<usize>)>> {
        let (node, parts) = (layer.node, layer.parts);
        let (w, scales, bias) = (parts.w, &parts.scales[..], parts.bias.as_deref());
        match &node.op {
            Op::Linear(l) => {
                let (n, k, o) = (dims[0], l.in_features, l.out_features);
                // Filters times the inputs as columns.
                let mut xt = vec![0i8; k * n];
                for (si, row) in xq.chunks_exact(k).enumerate() {
                    for (t, &v) in row.iter().enumerate() {
                        xt[t * n + si] = v;
                    }
                }
                let mut acc = vec![0i32; o * n];
                let pa = self.weights(model, layer, o);
                gemm_rows(&pa, 0..o, MatRef::new(&xt, k, n), &mut acc);
                // Per output feature, its samples' values; then laid out sample by sample.
                let mut rows = vec![T::default(); o * n];
                let block = Sums {
                    acc: &acc,
                    plane: n,
                    scales,
                    bias,
                };
                T::finish(&mut rows, block, to);
                let mut out = vec![T::default(); n * o];
                for (j, row) in rows.chunks_exact(n).enumerate() {
                    for (si, &v) in row.iter().enumerate() {
                        out[si * o + j] = v;
                    }
                }
                Ok(Some((out, vec![n, o])))
            }
            Op::Conv2d(c) => {
                let [n, cin, h, wd] = dims[..] else {
                    return Ok(None);
                };
                let [oc, oh, ow] = node.shape[..] else {
                    return Ok(None);
                };
                let geo = Geometry {
                    cin,
                    h,
                    w: wd,
                    oh,
                    ow,
                    spec: c,
                };
                let out = if c.is_depthwise() {
                    let sweeps = self.sweeps(model, parts.id, &geo, &w.values);
                    depthwise_by(&sweeps, xq, &w.values, &geo, n, scales, bias, to)
                } else if let Some(out) = self.fanned_out(model, parts, &geo, xq, n, to) {
                    out
                } else {
                    let pa = self.weights(model, layer, oc);
                    let quad = self.quad_weights(model, layer);
                    grouped(xq, (&pa, quad.as_deref()), &geo, n, scales, bias, to)
                };
                Ok(Some((out, vec![n, oc, oh, ow])))
            }
            _ => Ok(None),
        }
    }
}

impl Int8Kernels<'_> {
    /// A convolution of one input channel run by [`fan_out_windows`], where the machine
    /// and the layer's windows allow (its layout made at the layer's first forward with this
    /// input size, as a depthwise layer's sweeps are); `None` otherwise.
    fn fanned_out<T: Sink>(
        &self,
        model: &Model,
        parts: &LayerParts<'_>,
        geo: &Geometry<'_>,
        xq: &[i8],
        n: usize,
        to: &Requant,
    ) -> Option<Vec<T>> {
        let c = geo.spec;
        let oc = c.out_channels;
        if geo.cin != 1 || c.groups != 1 || oc == 0 || !vnni_sweeps_available() {
            return None;
        }
        // The layer's filters taken as the channels of a depthwise layer over copies of its
        // input plane: the same windows, taps and weights.
        let as_depthwise = Geometry { cin: oc, ..*geo };
        let sweeps = self.sweeps_made(model, parts.id, geo, || {
            WindowPlanes::new(&as_depthwise, &parts.w.values, 8)
                .map_or(Sweeps::Plain, Sweeps::Windows)
        });
        let Sweeps::Windows(wp) = &*sweeps else {
            return None;
        };
        let bias = parts.bias.as_deref();
        fan_out(wp, xq, n, oc, &parts.scales, bias, to)
    }
}

/// [`fan_out_windows`] over a batch of `n` samples, in tasks of a sample (or, for fewer
/// samples than threads, of part of its filters).
#[allow(clippy::too_many_arguments)]
fn fan_out<T: Sink>(
    wp: &WindowPlanes,
    xq: &[i8],
    n: usize,
    oc: usize,
    scales: &[f32],
    bias: Option<&[f32]>,
    to: &Requant,
) -> Option<Vec<T>> {
    #[cfg(target_arch = "x86_64")]
    {
        // (`fan_out_windows` places filter `o` of a sample by the windows' own filter count.)
        assert_eq!(oc, wp.offsets.len(), "windows made for another layer");
        let len = n * oc * wp.o;
        // (Counted as a depthwise layer's work, one multiply-add per group of four taps: a
        // stem at batch 1 lost time handing half its filters to another thread.)
        let work = len * wp.groups;
        let serial = work < SERIAL_DEPTHWISE;
        // Fewer samples than threads: each sample's filters in parts (each part gathers
        // the windows' taps again, so not when the work stays on this thread).
        let parts = if n < rayon::current_num_threads() && !serial {
            rayon::current_num_threads().min(oc.div_ceil(4))
        } else {
            1
        };
        let per = oc.div_ceil(parts);
        let mut out: Vec<T> = unwritten(len);
        let written = Disjoint(out.as_mut_ptr());
        for_each_task(n * parts, serial, |task| {
            let (sample, part) = (task / parts, task % parts);
            let filters = (part * per).min(oc)..((part + 1) * per).min(oc);
            // SAFETY: `vnni_sweeps_available` held for the windows to be made; this task
            // alone writes these filters of this sample, inside `out`'s capacity.
            unsafe {
                let at = written.add(0).0;
                fan_out_windows(wp, xq, (sample, filters), scales, bias, T::output(at, to))
            };
        });
        // SAFETY: the tasks wrote every filter of every sample (the windows' blocks cover
        // each output plane), and `T` is a plain number.
        unsafe { out.set_len(len) };
        Some(out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (wp, xq, n, oc, scales, bias, to);
        None
    }
}

/// The forward of a quantized model with given (prepared) kernels.
pub fn forward_with(
    model: &Model,
    kernels: &Int8Kernels<'_>,
    x: &Tensor,
) -> slim_core::Result<Tensor> {
    let out = model.forward_with(
        std::slice::from_ref(x),
        Mode::Eval,
        ForwardOptions {
            kernels: Some(kernels),
            ..Default::default()
        },
    )?;
    out.outputs
        .into_iter()
        .next()
        .ok_or_else(|| slim_core::CoreError::Invalid("the graph has no output".into()))
}

/// The forward of a quantized model with its quantized layers computed in integers (its
/// weights packed for this call; [`forward_with`] reuses [`Int8Kernels::new`]'s packing).
pub fn forward(model: &Model, x: &Tensor) -> Result<Tensor> {
    let out = model.forward_with(
        std::slice::from_ref(x),
        Mode::Eval,
        ForwardOptions {
            kernels: Some(&Int8Kernels::new(model)),
            ..Default::default()
        },
    )?;
    Ok(out
        .outputs
        .into_iter()
        .next()
        .ok_or_else(|| slim_core::CoreError::Invalid("the graph has no output".into()))?)
}

/// Top-1 and top-5 of a quantized model run by the int8 runtime.
pub fn evaluate(
    model: &Model,
    set: &slim_core::data::ImageSet,
    normalize: &slim_core::data::Normalize,
    batch_size: usize,
) -> Result<EvalReport> {
    let kernels = Int8Kernels::new(model);
    Ok(slim_core::train::evaluate_with(
        model,
        set,
        normalize,
        batch_size,
        &|m, x| forward_with(m, &kernels, x),
    )?)
}

/// How many of the samples in `x` get the same top-1 class from the int8 runtime and from the
/// model's float forward (the fake-quantized graph).
pub fn agreement(model: &Model, x: &Tensor) -> Result<(usize, usize)> {
    let a = forward(model, x)?.argmax(1)?.to_vec1::<u32>()?;
    let b = model.forward(x, Mode::Eval)?.argmax(1)?.to_vec1::<u32>()?;
    Ok((a.iter().zip(&b).filter(|(x, y)| x == y).count(), a.len()))
}

#[cfg(test)]
mod tests {
    /// A square convolution with bias (`[in, out, groups]` channels, `[kernel, stride,
    /// padding, dilation]`) and its output height and width on an `h x w` input.
    fn square_conv(
        (h, w): (usize, usize),
        [in_channels, out_channels, groups]: [usize; 3],
        [k, stride, padding, dilation]: [usize; 4],
    ) -> (slim_core::Conv2dSpec, usize, usize) {
        let spec = slim_core::Conv2dSpec {
            in_channels,
            out_channels,
            kernel: [k, k],
            stride,
            padding,
            dilation,
            groups,
            bias: true,
        };
        let (oh, ow) = spec.out_size(h, w).expect("the kernel fits");
        (spec, oh, ow)
    }

    use slim_core::kernels::Phases;

    #[test]
    fn every_other_byte_is_taken_as_the_definition_takes_it() {
        // Lengths around the 32-byte blocks, the source ending at the last byte read (so a
        // load past it would be caught by the bounds it was given), and room after the
        // output that must stay as it was.
        let src: Vec<i8> = (0..300).map(|i| (i % 251) as i8).collect();
        let wide = crate::gemm::Kernel::Avx512Vnni.available();
        for stride in 1..=3 {
            for len in [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 90] {
                let want: Vec<i8> = (0..len).map(|i| src[i * stride]).collect();
                let end = (len - 1) * stride + 1;
                for halving in [false, wide] {
                    let mut dst = vec![-1i8; len + 5];
                    super::every_nth(&mut dst[..len], &src[..end], stride, halving);
                    assert_eq!(dst[..len], want[..], "stride {stride}, {len} values");
                    assert!(dst[len..].iter().all(|&v| v == -1), "written past {len}");
                }
            }
        }
    }

    #[test]
    fn the_int8_grid_is_the_fake_quantizers_grid() {
        // Values within an ulp or two of half-steps, where the order of operations decides
        // the rounding, for awkward scales.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for &s in &[0.0123f32, 0.1, 1.0 / 3.0, 0.007_812_5, 2.71] {
            let xs: Vec<f32> = (0..20_000)
                .map(|_| {
                    let k = rng.random_range(-140i32..140) as f32 + 0.5;
                    let x = k * s;
                    f32::from_bits((x.to_bits() as i64 + rng.random_range(-3i64..=3)) as u32)
                })
                .collect();
            let t = candle_core::Tensor::new(&xs[..], &candle_core::Device::Cpu).expect("t");
            let fq = slim_core::exec::fake_quantize(&t, s, 127.0)
                .and_then(|f| Ok(f.to_vec1::<f32>()?))
                .expect("fq");
            let q = super::to_i8(&t, s).expect("q");
            for ((x, f), q) in xs.iter().zip(fq).zip(q) {
                assert_eq!(f, f32::from(q) * s, "{x} at scale {s}");
            }
        }
    }

    /// The depthwise sweeps in registers (pairs of taps per multiply-add) against one pass per
    /// tap and a plain sum: odd and even numbers of taps, strides, sweeps shorter and longer
    /// than a block, extreme values, a second channel's weights.
    #[test]
    fn depthwise_sweeps_agree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let avx2 = crate::gemm::Kernel::Avx2.available();
        for (h, w, k, stride, pad) in [
            (14, 14, 3, 1, 1),
            (9, 11, 3, 2, 1),
            (4, 4, 1, 1, 0),
            (7, 7, 5, 1, 2),
            (28, 28, 3, 2, 1),
            (3, 5, 2, 1, 0),
            (12, 12, 7, 1, 3),
        ] {
            let layout = Phases::new(h, w, k, k, stride, pad, 1);
            let plane: Vec<i8> = (0..h * w)
                .map(|i| match i % 7 {
                    0 => -128,
                    1 => 127,
                    _ => rng.random_range(-128i32..128) as i8,
                })
                .collect();
            let mut phases = vec![0i8; layout.len() + super::SWEEP_SLACK];
            layout.fill(&plane, &mut phases);
            // Two channels, the second's filter the first's negated (-128 becomes 127).
            let filt: Vec<i8> = (0..k * k)
                .map(|t| {
                    if t == 0 {
                        -128
                    } else {
                        rng.random_range(-128i32..128) as i8
                    }
                })
                .collect();
            let negated: Vec<i8> = filt.iter().map(|f| f.saturating_neg()).collect();
            let plain = |f: &[i8]| -> Vec<i32> {
                (0..layout.span())
                    .map(|i| {
                        (0..k * k)
                            .map(|t| i32::from(f[t]) * i32::from(phases[layout.tap(t) + i]))
                            .sum()
                    })
                    .collect()
            };
            let mut want = vec![7i32; layout.span()];
            super::accumulate_taps(&mut want, &phases, &layout, &filt, false);
            assert_eq!(want, plain(&filt));
            if avx2 && cfg!(target_arch = "x86_64") {
                let filters = [filt.clone(), negated].concat();
                let pairs = super::TapPairs::new(&layout, &filters, k * k);
                let per = pairs.starts.len();
                for c in 0..2 {
                    let wide = layout.span().next_multiple_of(16);
                    let weights = &pairs.weights[c * per..][..per];
                    let (mut got, mut y, mut q) =
                        (vec![-1i32; wide], vec![f32::NAN; wide], vec![99i8; wide]);
                    // A scale and bias that put outputs on both sides of the grid's bounds,
                    // and a ReLU's lower bound for the second channel.
                    let (scale, bias) = (
                        rng.random_range(1e-4f32..1e-2),
                        rng.random_range(-1f32..1.0),
                    );
                    let mut bounds = super::bounds(rng.random_range(1e-3f32..2e-2));
                    if c == 1 {
                        bounds[0] = 0.0;
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the machine has AVX2; the phases have their slack.
                    unsafe {
                        use super::SweepOut;
                        let starts = &pairs.starts;
                        super::madd_sweep(SweepOut::Sums(&mut got), &phases, starts, weights);
                        let out = SweepOut::F32(&mut y, scale, bias);
                        super::madd_sweep(out, &phases, starts, weights);
                        let out = SweepOut::I8(&mut q, scale, bias, bounds);
                        super::madd_sweep(out, &phases, starts, weights);
                    };
                    let want = plain(&filters[c * k * k..][..k * k]);
                    let case = format!("{h}x{w} k{k} s{stride} p{pad} channel {c}");
                    assert_eq!(got[..layout.span()], want, "{case}");
                    // The finished values, as the scalar finish computes them, bit for bit.
                    let [lo, hi, inv] = bounds;
                    for (i, &a) in want.iter().enumerate() {
                        let f = a as f32 * scale + bias;
                        assert_eq!(y[i].to_bits(), f.to_bits(), "{case}: f32 [{i}]");
                        assert_eq!(
                            q[i],
                            super::round_to_grid(f, lo, hi, inv),
                            "{case}: i8 [{i}]"
                        );
                    }
                }
            }
        }
    }

    /// Which layers run as windows: the MobileNets' larger planes do, in runs of 16 outputs; a
    /// 40x40 plane at stride 2 does in rows (a run across two output rows would span five
    /// input rows); a wide plane with a dilation of 4 does not; a window never spans more
    /// than 128 values.
    #[test]
    fn windows_fit_the_mobilenets_larger_planes() {
        // (h, w, stride, padding, dilation), whether windows fit, and whether in runs of 16.
        for ((h, w, stride, pad, dil), fits, runs) in [
            ((28, 28, 1, 1, 1), true, true),
            ((28, 28, 2, 1, 1), true, true),
            ((40, 40, 2, 1, 1), true, false),
            ((14, 14, 2, 1, 1), true, true),
            ((32, 32, 1, 1, 1), true, true),
            ((32, 32, 2, 1, 1), true, true),
            ((20, 20, 1, 4, 4), false, false),
        ] {
            let spec = slim_core::Conv2dSpec {
                in_channels: 2,
                out_channels: 2,
                kernel: [3, 3],
                stride,
                padding: pad,
                dilation: dil,
                groups: 2,
                bias: false,
            };
            let oh = (h + 2 * pad - dil * 2 - 1) / stride + 1;
            let ow = (w + 2 * pad - dil * 2 - 1) / stride + 1;
            let geo = super::Geometry {
                cin: 2,
                h,
                w,
                oh,
                ow,
                spec: &spec,
            };
            let wp = super::WindowPlanes::new(&geo, &[1; 18], 16);
            assert_eq!(wp.is_some(), fits, "{h}x{w} s{stride} d{dil}");
            let Some(wp) = wp else { continue };
            let in_runs = wp
                .blocks
                .iter()
                .enumerate()
                .all(|(b, &[q0, ..])| q0 == 16 * b);
            assert_eq!(in_runs, runs, "{h}x{w} s{stride}");
            assert_eq!(wp.blocks.iter().map(|b| b[1]).sum::<usize>(), oh * ow);
            for (b, &[_, _, base]) in wp.blocks.iter().enumerate() {
                assert!(base < h * w);
                for at in b * wp.groups..(b + 1) * wp.groups {
                    for i in (0..64).filter(|&i| wp.keep[at] >> i & 1 == 1) {
                        assert!(wp.index[at][i] < 128, "{h}x{w} s{stride}: block {b}");
                    }
                }
            }
        }
    }

    /// Every way this machine runs a depthwise layer gives what the plain passes give, bit for
    /// bit, as f32 and as int8 outputs: small planes one or several to a unit (and a channel
    /// count that forbids several), strides, dilation, kernels of 1 to 49 taps, planes too
    /// large for the small way, extreme values, with and without a bias and a ReLU's bound.
    #[test]
    fn depthwise_ways_agree() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // (h, w, kernel, stride, padding, dilation, channels)
        for (h, w, k, stride, pad, dil, ch) in [
            (4, 4, 3, 1, 1, 1, 8),
            (2, 2, 3, 1, 1, 1, 8),
            (2, 2, 3, 1, 1, 1, 6),
            (8, 8, 3, 2, 1, 1, 4),
            (4, 4, 3, 2, 1, 1, 8),
            (2, 2, 3, 2, 1, 1, 16),
            (1, 1, 3, 1, 1, 1, 32),
            (8, 8, 3, 1, 1, 1, 3),
            (7, 7, 3, 1, 1, 1, 5),
            (7, 7, 3, 2, 1, 1, 4),
            (5, 5, 5, 1, 2, 1, 4),
            (3, 3, 2, 1, 0, 1, 8),
            (6, 6, 3, 1, 2, 2, 4),
            (4, 4, 1, 1, 0, 1, 4),
            (14, 14, 3, 1, 1, 1, 3),
            (9, 11, 3, 2, 1, 1, 2),
            (12, 12, 7, 1, 3, 1, 2),
            (28, 28, 3, 1, 1, 1, 2),
            (28, 28, 3, 2, 1, 1, 3),
            (32, 32, 3, 2, 1, 1, 2),
            (16, 16, 3, 2, 1, 1, 2),
            (13, 29, 3, 2, 0, 1, 2),
            (20, 20, 3, 1, 4, 4, 2),
            (40, 40, 3, 2, 1, 1, 2),
        ] {
            let (spec, oh, ow) = square_conv((h, w), [ch, ch, ch], [k, stride, pad, dil]);
            let geo = super::Geometry {
                cin: ch,
                h,
                w,
                oh,
                ow,
                spec: &spec,
            };
            let n = 3;
            let extreme = |rng: &mut rand::rngs::StdRng, i: usize| match i % 9 {
                0 => -128,
                1 => 127,
                _ => rng.random_range(-128i32..128) as i8,
            };
            let xq: Vec<i8> = (0..n * ch * h * w).map(|i| extreme(&mut rng, i)).collect();
            let wq: Vec<i8> = (0..ch * k * k).map(|i| extreme(&mut rng, i + 1)).collect();
            let scales: Vec<f32> = (0..ch).map(|_| rng.random_range(1e-4f32..1e-2)).collect();
            let bias: Vec<f32> = (0..ch).map(|_| rng.random_range(-1f32..1.0)).collect();
            let ways = super::Sweeps::available(&geo, &wq);
            let name = |s: &super::Sweeps| match s {
                super::Sweeps::Small(_) => "small planes",
                super::Sweeps::Windows(_) => "windows",
                super::Sweeps::Quads(_) => "quads",
                super::Sweeps::Pairs(_) => "pairs",
                super::Sweeps::Plain => "plain",
            };
            for bias in [Some(&bias[..]), None] {
                let relu = slim_core::Op::Relu;
                for act in [None, Some(&relu)] {
                    let to = super::Requant::new(rng.random_range(1e-3f32..2e-2), act);
                    let run_f32 =
                        |s| super::depthwise_by::<f32>(s, &xq, &wq, &geo, n, &scales, bias, &to);
                    let run_i8 =
                        |s| super::depthwise_by::<i8>(s, &xq, &wq, &geo, n, &scales, bias, &to);
                    let plain = super::Sweeps::Plain;
                    let want_f: Vec<u32> = run_f32(&plain).iter().map(|v| v.to_bits()).collect();
                    let want_q = run_i8(&plain);
                    assert_eq!(want_f.len(), n * ch * oh * ow);
                    for way in &ways {
                        let case = format!(
                            "{h}x{w} k{k} s{stride} p{pad} d{dil} {ch} channels, {}",
                            name(way)
                        );
                        let first =
                            |a: &[u32], b: &[u32]| a.iter().zip(b).position(|(x, y)| x != y);
                        let got: Vec<u32> = run_f32(way).iter().map(|v| v.to_bits()).collect();
                        assert_eq!(first(&got, &want_f), None, "{case}: f32, first difference");
                        let got: Vec<u32> = run_i8(way).iter().map(|&v| v as u32).collect();
                        let want: Vec<u32> = want_q.iter().map(|&v| v as u32).collect();
                        assert_eq!(first(&got, &want), None, "{case}: int8, first difference");
                    }
                }
            }
        }
    }

    /// Dense and grouped convolutions give the same values whichever kernel runs the
    /// product: the AVX-512 VNNI kernel and AVX2's product of non-negative inputs, which
    /// finish every value in registers and write it into an output that was never zeroed
    /// (filled with a pattern in tests), AVX2's product of any inputs, and the portable one,
    /// whose int32 sums the runtime finishes. Pointwise layers on planes with tails of
    /// columns, 3x3 layers gathered from planes and from quad planes, strided, dilated and
    /// grouped layers, and blocks of rows (planes wider than a task's share), on inputs of
    /// any value and without a negative one. (Filters in tap order are packed for the kernel
    /// under test, so with them the stride-1 layers run its quad product on both sides:
    /// there the test sees only that the unzeroed output was written whole.)
    #[test]
    fn convolutions_write_every_output_whichever_kernel_runs_them() {
        use crate::gemm::{Kernel, MatRef, PackedA};
        use rand::{Rng, SeedableRng};
        if !Kernel::Avx2.available() {
            slim_core::note_skipped("this machine (or SLIM_CPU) lacks AVX2");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        // (h, w, cin, oc, kernel, stride, padding, dilation, groups)
        for (h, w, cin, oc, k, stride, pad, dil, groups) in [
            (28, 28, 16, 32, 1, 1, 0, 1, 1),
            (7, 7, 64, 24, 1, 1, 0, 1, 1),
            (5, 3, 20, 9, 1, 1, 0, 1, 1),
            (14, 14, 8, 16, 3, 1, 1, 1, 1),
            (9, 9, 12, 10, 3, 1, 1, 1, 1),
            (28, 28, 4, 8, 3, 2, 1, 1, 1),
            (12, 12, 8, 8, 3, 1, 2, 2, 1),
            (10, 10, 8, 12, 3, 1, 1, 1, 2),
            (40, 40, 4, 6, 3, 1, 1, 1, 1),
            (7, 7, 64, 96, 3, 1, 1, 1, 1),
        ] {
            let (spec, oh, ow) = square_conv((h, w), [cin, oc, groups], [k, stride, pad, dil]);
            let geo = super::Geometry {
                cin,
                h,
                w,
                oh,
                ow,
                spec: &spec,
            };
            // One sample of 7x7 planes: a task per share of the output channels.
            let n = if h * w <= 49 { 1 } else { 2 };
            let cols = cin / groups * k * k;
            let signed: Vec<i8> = (0..n * cin * h * w).map(|_| rng.random()).collect();
            let unsigned: Vec<i8> = signed.iter().map(|&v| v & 0x7f).collect();
            let wq: Vec<i8> = (0..oc * cols).map(|_| rng.random()).collect();
            let scales: Vec<f32> = (0..oc).map(|_| rng.random_range(1e-4f32..1e-2)).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.random_range(-1f32..1.0)).collect();
            let filters = MatRef::new(&wq, oc, cols);
            let portable = PackedA::for_kernel(filters, Kernel::Portable);
            let node = slim_core::Node {
                name: "conv".into(),
                op: slim_core::Op::Conv2d(spec.clone()),
                inputs: vec![],
                shape: vec![oc, oh, ow],
            };
            let relu = slim_core::Op::Relu;
            let kernels = [Kernel::Avx512Vnni, Kernel::Avx2]
                .into_iter()
                .filter(|k| k.available());
            // Inputs of any value, and without a negative one (AVX2's second product).
            for (kernel, xq) in kernels.flat_map(|k| [(k, &signed), (k, &unsigned)]) {
                let packed = PackedA::for_kernel(filters, kernel);
                let quads = super::quad_filters_for(&node, &wq, kernel);
                let sign = if xq == &signed { "signed" } else { "unsigned" };
                let case = format!(
                    "{kernel:?} {sign} {h}x{w} {cin}->{oc} k{k} s{stride} p{pad} d{dil} g{groups}"
                );
                for act in [None, Some(&relu)] {
                    let to = super::Requant::new(rng.random_range(1e-3f32..2e-2), act);
                    for quad in [None, quads.as_ref()] {
                        let run_f32 = |pa| {
                            super::grouped::<f32>(
                                xq,
                                (pa, quad),
                                &geo,
                                n,
                                &scales,
                                Some(&bias),
                                &to,
                            )
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<u32>>()
                        };
                        let run_i8 = |pa| {
                            super::grouped::<i8>(xq, (pa, quad), &geo, n, &scales, Some(&bias), &to)
                        };
                        let with = if quad.is_some() { ", quads" } else { "" };
                        assert_eq!(run_f32(&packed), run_f32(&portable), "{case}{with}: f32");
                        assert_eq!(
                            run_i8(&packed),
                            run_i8(&portable),
                            "{case}{with}: int8 {act:?}"
                        );
                    }
                }
            }
        }
    }

    /// A 1x1 convolution at a stride (a ResNet's downsampling shortcut) gives what its
    /// definition gives, to the bit: each output the sum over channels of filter times the
    /// input at `(oy * stride, ox * stride)`, times the channel's scale, plus its bias.
    /// Strides 2 and 3, even and odd planes, with each kernel this machine has and the
    /// portable one.
    #[test]
    fn strided_pointwise_convolutions_read_every_stride_th_value() {
        use crate::gemm::{Kernel, MatRef, PackedA};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(29);
        for (h, w, cin, oc, stride, n) in [
            (28, 28, 16, 32, 2, 2),
            (14, 14, 32, 64, 2, 3),
            (9, 7, 12, 10, 2, 1),
            (10, 11, 8, 5, 3, 2),
        ] {
            let (spec, oh, ow) = square_conv((h, w), [cin, oc, 1], [1, stride, 0, 1]);
            let geo = super::Geometry {
                cin,
                h,
                w,
                oh,
                ow,
                spec: &spec,
            };
            let xq: Vec<i8> = (0..n * cin * h * w).map(|_| rng.random()).collect();
            let wq: Vec<i8> = (0..oc * cin).map(|_| rng.random()).collect();
            let scales: Vec<f32> = (0..oc).map(|_| rng.random_range(1e-4f32..1e-2)).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.random_range(-1f32..1.0)).collect();
            let mut want = Vec::with_capacity(n * oc * oh * ow);
            for s in 0..n {
                for o in 0..oc {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let acc: i32 = (0..cin)
                                .map(|c| {
                                    let x = xq[((s * cin + c) * h + oy * stride) * w + ox * stride];
                                    i32::from(wq[o * cin + c]) * i32::from(x)
                                })
                                .sum();
                            want.push((acc as f32 * scales[o] + bias[o]).to_bits());
                        }
                    }
                }
            }
            let kernels = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable]
                .into_iter()
                .filter(|k| k.available());
            for kernel in kernels {
                let pa = PackedA::for_kernel(MatRef::new(&wq, oc, cin), kernel);
                let got: Vec<u32> = super::grouped::<f32>(
                    &xq,
                    (&pa, None),
                    &geo,
                    n,
                    &scales,
                    Some(&bias),
                    &super::Requant::NONE,
                )
                .iter()
                .map(|v| v.to_bits())
                .collect();
                assert_eq!(got, want, "{kernel:?} {h}x{w} {cin}->{oc} s{stride} n{n}");
            }
        }
    }

    /// A convolution of one input channel fanned out over windows gives exactly what the
    /// im2col product gives ([`super::grouped`]), as f32 and as int8 on plain and ReLU grids,
    /// with and without bias: 3x3 and 5x5 kernels on MNIST-sized planes (LeNet's first layer
    /// needs blocks narrower than 16), stride 2, dilation, no padding, one filter, filter
    /// counts that split a batch of one across threads, and full-range values. Layers whose
    /// windows cannot fit are left to the product.
    #[test]
    fn one_channel_convolutions_fan_out_as_the_product_computes() {
        use rand::{Rng, SeedableRng};
        if !super::vnni_sweeps_available() {
            slim_core::note_skipped("this machine (or SLIM_CPU) lacks AVX-512 VBMI and VNNI");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        // (h, w, kernel, stride, padding, dilation, filters, samples)
        for (h, w, k, stride, pad, dil, oc, n) in [
            (28, 28, 3, 1, 1, 1, 16, 3),
            (28, 28, 3, 1, 1, 1, 16, 1),
            (28, 28, 5, 1, 2, 1, 6, 2),
            (28, 28, 5, 1, 0, 1, 5, 1),
            (32, 32, 3, 2, 1, 1, 8, 2),
            (14, 14, 3, 1, 2, 2, 3, 2),
            (7, 9, 3, 1, 1, 1, 1, 1),
            (64, 64, 7, 1, 3, 1, 4, 1),
        ] {
            let (spec, oh, ow) = square_conv((h, w), [1, oc, 1], [k, stride, pad, dil]);
            let geo = super::Geometry {
                cin: 1,
                h,
                w,
                oh,
                ow,
                spec: &spec,
            };
            let extreme = |rng: &mut rand::rngs::StdRng, i: usize| match i % 7 {
                0 => -128,
                1 => 127,
                _ => rng.random_range(-128i32..128) as i8,
            };
            let xq: Vec<i8> = (0..n * h * w).map(|i| extreme(&mut rng, i)).collect();
            let wq: Vec<i8> = (0..oc * k * k).map(|i| extreme(&mut rng, i + 3)).collect();
            let scales: Vec<f32> = (0..oc).map(|_| rng.random_range(1e-4f32..1e-2)).collect();
            let bias: Vec<f32> = (0..oc).map(|_| rng.random_range(-1f32..1.0)).collect();
            let case = format!("{h}x{w} k{k} s{stride} p{pad} d{dil}, {oc} filters, {n} samples");
            let as_depthwise = super::Geometry { cin: oc, ..geo };
            let Some(wp) = super::WindowPlanes::new(&as_depthwise, &wq, 8) else {
                assert_eq!(k, 7, "{case}: no windows");
                continue;
            };
            let pa = crate::gemm::PackedA::new(crate::gemm::MatRef::new(&wq, oc, k * k));
            for bias in [Some(&bias[..]), None] {
                let relu = slim_core::Op::Relu;
                for act in [None, Some(&relu)] {
                    let to = super::Requant::new(rng.random_range(1e-3f32..2e-2), act);
                    let want_f: Vec<u32> =
                        super::grouped::<f32>(&xq, (&pa, None), &geo, n, &scales, bias, &to)
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                    let want_q =
                        super::grouped::<i8>(&xq, (&pa, None), &geo, n, &scales, bias, &to);
                    let got_f: Vec<u32> =
                        super::fan_out::<f32>(&wp, &xq, n, oc, &scales, bias, &to)
                            .expect("x86-64")
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                    let got_q =
                        super::fan_out::<i8>(&wp, &xq, n, oc, &scales, bias, &to).expect("x86-64");
                    assert_eq!(got_f.len(), n * oc * oh * ow, "{case}");
                    let first = |a: &[u32], b: &[u32]| a.iter().zip(b).position(|(x, y)| x != y);
                    assert_eq!(
                        first(&got_f, &want_f),
                        None,
                        "{case}: f32, first difference"
                    );
                    assert_eq!(got_q, want_q, "{case}: int8 {act:?}");
                }
            }
        }
    }

    /// The 2x2, stride-2 pooling gives what the general window search gives, on even and
    /// odd plane sizes (whose last row or column no window reads) and at -128.
    #[test]
    fn halving_max_pool_agrees_with_the_window_search() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let spec = slim_core::graph::PoolSpec::new(2, 2, 0);
        let wide = crate::gemm::Kernel::Avx512Vnni.available();
        // (rows of 35 and 64 outputs: past one and two blocks of 32 in the vector rows)
        for (h, w) in [(28, 28), (7, 9), (2, 2), (5, 4), (3, 3), (4, 71), (3, 128)] {
            let plane: Vec<i8> = (0..h * w).map(|_| rng.random()).collect();
            let (oh, ow) = (h / 2, w / 2);
            let mut want = vec![i8::MIN; oh * ow];
            super::max_pool_plane(&plane, [h, w], &mut want, ow, &spec);
            for way in [false, wide] {
                let mut got = vec![i8::MIN; oh * ow];
                super::max_pool_halving(&plane, w, &mut got, ow, way);
                assert_eq!(got, want, "{h}x{w}, vectors {way}");
                // A plane of -128 only pools to -127 (the grid's lowest value).
                let low = vec![i8::MIN; h * w];
                super::max_pool_halving(&low, w, &mut got, ow, way);
                assert!(
                    got.iter().all(|&v| v == -127),
                    "{h}x{w}, vectors {way}: -128"
                );
            }
            let whole = super::max_pool_values(&plane, [1, h, w], [oh, ow], &spec);
            assert_eq!(whole, want, "{h}x{w} through max_pool_values");
        }
    }

    /// Windows of any shape (rectangular, unequal strides, dilated, padded): each output is
    /// the largest input its taps reach, and -127 where padding alone is reached.
    #[test]
    fn int8_max_pool_of_any_window_matches_its_taps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (h, w) = (9, 11);
        let plane: Vec<i8> = (0..h * w).map(|_| rng.random()).collect();
        for (kernel, stride, dilation, pad) in [
            ([2, 3], [2, 1], [1, 1], 1),
            ([3, 1], [1, 2], [2, 1], 0),
            ([2, 2], [3, 2], [2, 3], 1),
            ([1, 4], [1, 1], [1, 2], 2),
        ] {
            let spec = slim_core::graph::PoolSpec {
                kernel,
                stride,
                dilation,
                pads: [pad; 4],
                exclude_pad: false,
            };
            let (oh, ow) = (spec.out_size(0, h).unwrap(), spec.out_size(1, w).unwrap());
            let got = super::max_pool_values(&plane, [1, h, w], [oh, ow], &spec);
            for (o, &v) in got.iter().enumerate() {
                let (oy, ox) = (o / ow, o % ow);
                let mut want = -127i8;
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        let y = (oy * stride[0] + ky * dilation[0]) as isize - pad as isize;
                        let x = (ox * stride[1] + kx * dilation[1]) as isize - pad as isize;
                        if (0..h as isize).contains(&y) && (0..w as isize).contains(&x) {
                            want = want.max(plane[y as usize * w + x as usize]);
                        }
                    }
                }
                assert_eq!(v, want, "{spec:?} at ({oy}, {ox})");
            }
        }
    }

    #[test]
    fn quantizing_rounds_like_f32_round() {
        assert_eq!(super::HALF_DOWN, f32::from_bits(0.5f32.to_bits() - 1));
        let xs = [
            0.0f32,
            0.49999997,
            0.5,
            0.50000006,
            1.5,
            2.5,
            -0.5,
            -2.5,
            -0.49999997,
            126.5,
            -126.5,
            127.49,
            300.0,
            -1e9,
            8388609.0,
            1e-30,
        ];
        let t = candle_core::Tensor::new(&xs[..], &candle_core::Device::Cpu).expect("t");
        let q = super::to_i8(&t, 1.0).expect("q");
        for (x, q) in xs.iter().zip(q) {
            assert_eq!(q, x.round().clamp(-127.0, 127.0) as i8, "{x}");
        }
        // A view (here a 4x4 matrix transposed) is
        // read in its logical order, as a contiguous tensor is.
        let m = t.reshape((4, 4)).and_then(|m| m.t()).expect("view");
        assert!(!m.is_contiguous());
        let a = super::to_i8(&m, 1.0).expect("view");
        let b = super::to_i8(&m.contiguous().expect("copy"), 1.0).expect("copy");
        assert_eq!(a, b);
        assert_ne!(a, super::to_i8(&t, 1.0).expect("q"));
    }
}
