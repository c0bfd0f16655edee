//! Execution: the forward pass of a [`Model`] through candle ops.
//!
//! In [`Mode::Train`] parameters enter the computation as the store's `Var`s, so
//! `loss.backward()` yields a gradient for every trainable parameter, batch norm normalizes
//! with the batch's statistics and updates its running statistics, and dropout is active.
//! In [`Mode::Eval`] parameters enter detached, so no autograd graph is recorded; batch norm
//! uses its running statistics and dropout is the identity. An evaluation forward also runs
//! each convolution together with the batch norm and ReLU or ReLU6 that alone read its
//! output (the batch norm folded into the convolution's weights and bias, the activation
//! applied as each output is written), unless kernels, an observer or a tap need the values
//! between.
//!
//! In evaluation on the CPU, the chains of depthwise and pointwise convolutions of the mobile
//! networks (with the sums and activations between them) run on channels-last values
//! (`[N, H, W, C]`, [`crate::kernels::channels_last`]): converted where such a chain begins,
//! and back where a value leaves it for any other node (global pooling reads it as it is).
//! [`ForwardOptions::channels_first`] keeps every value `[N, C, H, W]`.
//!
//! A large evaluation batch runs in pieces of the batch, in parallel, each through the whole
//! graph, so that a piece's values stay in cache between nodes (see
//! [`NodeKernels::per_sample`] for kernels). A forward called from outside rayon's pool runs
//! on one of its workers.
//!
//! A forward can also return the outputs of any named nodes (taps, for distillation) and call
//! an observer on every node output (for calibration). Intermediate values are dropped as soon
//! as their last consumer has run.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::{CoreError, Result};
use crate::graph::{
    BatchNormSpec, BinaryKind, Conv2dSpec, ConvTransposeSpec, CoordMode, LrnSpec, NearestRounding,
    Node, Op, PadMode, PoolSpec, ReduceKind, ResizeMode, ResizeSpec, UnaryKind,
};
use crate::kernels::channels_last::{self, ChannelsLastConv};
use crate::model::Model;

mod windows;
use windows::{avg_pool, conv_transpose, max_pool, pad};

/// Train or evaluation behaviour of batch norm, dropout and autograd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// A callback that sees the output of every node: `(node name, batched output)`.
pub type Observer<'a> = dyn FnMut(&str, &Tensor) -> Result<()> + Send + 'a;

/// A callback told each node's name as the node is done, in evaluation order (for timing).
/// It sees no values, so it leaves evaluation's fused chains as they are: a batch norm or
/// activation computed with its convolution is done right after it.
pub type Finished<'a> = dyn FnMut(&str) + Send + 'a;

/// Computes some nodes another way (an integer runtime, say): `Some(output)` replaces the
/// node's own computation, `None` leaves it to the default.
pub trait NodeKernels: Sync {
    fn run(
        &self,
        model: &Model,
        node: &Node,
        inputs: &[&Tensor],
        mode: Mode,
    ) -> Result<Option<Tensor>>;

    /// Kernels made ready for many forwards of one model (weights repacked once, say), when
    /// these kernels have such a form; whoever runs a model repeatedly (latency timing) uses
    /// them instead.
    fn prepare<'m>(&self, _model: &'m Model) -> Option<Box<dyn NodeKernels + 'm>> {
        None
    }

    /// Whether these kernels compute each sample of a batch on its own (no statistic of the
    /// whole batch, such as a scale taken from the current batch), so that an evaluation
    /// forward may run a large batch in pieces.
    fn per_sample(&self) -> bool {
        false
    }

    /// A value that node `id`'s kernel reads besides the node's inputs (the other term of a
    /// sum it computes with the layer, say): a node that comes before `id` in evaluation
    /// order and that a later node reads, so that its value is there. The forward passes it
    /// after the node's inputs.
    fn also_reads(&self, _model: &Model, _id: usize) -> Option<usize> {
        None
    }
}

/// Supplies some nodes' trainable parameters in place of the model's own (a slice of a
/// shared supernet's weights, say); gradients flow to whatever the tensors derive from.
pub trait ParamSource: Sync {
    /// The tensor for `role` (`weight`, `bias`) of `node`, or `None` for the model's own.
    fn param(&self, node: &Node, role: &str) -> Result<Option<Tensor>>;
}

/// Options of [`Model::forward_with`].
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Kernels that take over some nodes.
    pub kernels: Option<&'a dyn NodeKernels>,
    /// Parameters from elsewhere for some nodes (their own BN statistics stay the model's).
    pub params: Option<&'a dyn ParamSource>,
    /// Names of nodes whose outputs to return.
    pub taps: Vec<String>,
    /// Called with every node's output, in evaluation order.
    pub observer: Option<&'a mut Observer<'a>>,
    /// Told as each node is done.
    pub finished: Option<&'a mut Finished<'a>>,
    /// Run a large evaluation batch whole, never in pieces (see the module docs): to compare
    /// the two, or to keep a forward to one pass over the batch.
    pub whole: bool,
    /// Keep every value `[N, C, H, W]`: no chain of depthwise and pointwise convolutions runs
    /// channels-last in evaluation (see the module docs), to compare the two.
    pub channels_first: bool,
    /// The evaluation's preparation, made once ([`Model::prepare_eval`]); used where it
    /// serves (see there), else the forward prepares its own.
    pub prepared: Option<&'a PreparedEval<'a>>,
    /// Seed of the dropout masks in train mode (the training loop derives one per step, so
    /// runs are reproducible); without it the masks come from the thread's random source.
    pub dropout_seed: Option<u64>,
}

impl<'a> ForwardOptions<'a> {
    pub fn with_dropout_seed(mut self, seed: u64) -> Self {
        self.dropout_seed = Some(seed);
        self
    }
    pub fn with_taps<S: AsRef<str>>(mut self, taps: &[S]) -> Self {
        self.taps = taps.iter().map(|s| s.as_ref().to_string()).collect();
        self
    }
    pub fn with_observer(mut self, observer: &'a mut Observer<'a>) -> Self {
        self.observer = Some(observer);
        self
    }
}

/// A convolution that runs with the batch norm and activation after it (in evaluation).
#[derive(Clone, Debug)]
struct Fusion {
    conv: usize,
    bn: Option<usize>,
    act: Option<usize>,
    clamp: crate::kernels::Epilogue,
}

impl Fusion {
    /// The node whose value the fused chain computes.
    fn last(&self) -> usize {
        self.act.or(self.bn).unwrap_or(self.conv)
    }
}

/// What one forward runs: the taps, how often each value is read, the fused chains and
/// their folded weights (by the chain's convolution).
struct Plan {
    tap_ids: Vec<usize>,
    uses: Vec<usize>,
    fusions: Vec<Option<Fusion>>,
    folded: Vec<Option<Folded>>,
    /// In training, by batch norm: the ReLU or ReLU6 that runs inside it, and its bound.
    bn_clips: Vec<Option<(usize, f32)>>,
    /// In evaluation, by node that computes a value: whether it runs channels-last.
    channels_last: Vec<bool>,
}

impl Plan {
    /// By node of a graph of `len` nodes: whether a fused chain computes its value (a batch
    /// norm or activation folded into the convolution before it, an activation run inside
    /// its batch norm).
    fn fused_away(&self, len: usize) -> Vec<bool> {
        let mut fused = vec![false; len];
        for f in self.fusions.iter().flatten() {
            for id in [f.bn, f.act].into_iter().flatten() {
                fused[id] = true;
            }
        }
        for &(act, _) in self.bn_clips.iter().flatten() {
            fused[act] = true;
        }
        fused
    }
}

/// The smallest output plane (in positions) that runs channels-last. The layers with
/// smaller planes are the ones with the most channels, whose weights' transposition (once per
/// forward) costs more than the layout saves: with them channels-last, MobileNetV1 at 32x32
/// ran slower than with none.
const CHANNELS_LAST_PLANE: usize = 49;

/// A fused chain's convolution with its batch norm folded in: the weights and bias as
/// tensors, or ready to run channels-last.
enum Folded {
    Tensors(Tensor, Tensor),
    ChannelsLast(ChannelsLastConv),
}

/// An evaluation forward's preparation ([`Model::prepare_eval`]).
pub struct PreparedEval<'m> {
    model: &'m Model,
    plan: Plan,
    channels_first: bool,
    on_cpu: bool,
}

/// What a forward returns: the graph outputs in order, and the requested taps by name.
#[derive(Debug)]
pub struct ForwardOutput {
    pub outputs: Vec<Tensor>,
    pub taps: HashMap<String, Tensor>,
}

impl Model {
    /// Forward of a single-input, single-output model on a batch `[N, ...input shape]`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let out = self.forward_with(std::slice::from_ref(x), mode, ForwardOptions::default())?;
        out.outputs
            .into_iter()
            .next()
            .ok_or_else(|| CoreError::Invalid("the graph has no output".into()))
    }

    /// Forward with one batch per input node, returning outputs and taps.
    ///
    /// Called from outside rayon's pool, a forward of more than about four million
    /// multiply-adds runs on one of its workers, so that the kernels' parallel loops start
    /// where they are called instead of waking the pool and putting the caller to sleep for
    /// every node (at batch 1 that wake-up was about a third of a small network's forward).
    /// A smaller one runs on the calling thread, as its kernels do.
    pub fn forward_with(
        &self,
        inputs: &[Tensor],
        mode: Mode,
        opts: ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        // A small forward (whose kernels all run on the calling thread) stays where it is.
        let n = inputs
            .first()
            .and_then(|x| x.dims().first().copied())
            .unwrap_or(1);
        let macs: u64 = self
            .graph
            .nodes()
            .iter()
            .map(crate::analysis::node_macs)
            .sum();
        if rayon::current_thread_index().is_none() && n as u64 * macs >= 1 << 22 {
            return rayon::scope(|_| self.forward_here(inputs, mode, opts));
        }
        self.forward_here(inputs, mode, opts)
    }

    /// [`Model::forward_with`] on the calling thread.
    fn forward_here(
        &self,
        inputs: &[Tensor],
        mode: Mode,
        opts: ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        let g = &self.graph;
        let input_ids = g.inputs();
        if inputs.len() != input_ids.len() {
            return Err(CoreError::Invalid(format!(
                "the model has {} input(s), {} batch(es) were given",
                input_ids.len(),
                inputs.len()
            )));
        }
        for (&id, x) in input_ids.iter().zip(inputs) {
            let node = g.node(id);
            if let Op::Input { shape } = &node.op {
                if x.rank() != shape.len() + 1 || &x.dims()[1..] != shape.as_slice() {
                    return Err(CoreError::node(
                        &node.name,
                        format!(
                            "expects a batch of shape [N, {shape:?}], got {:?}",
                            x.dims()
                        ),
                    ));
                }
            }
        }
        let fresh;
        let plan = match opts.prepared {
            Some(p) if !std::ptr::eq(p.model, self) => {
                return Err(CoreError::Invalid(
                    "the prepared evaluation is another model's".into(),
                ))
            }
            Some(p)
                if mode == Mode::Eval
                    && opts.kernels.is_none()
                    && opts.observer.is_none()
                    && opts.params.is_none()
                    && opts.taps.is_empty()
                    && opts.channels_first == p.channels_first
                    && inputs.iter().all(|x| x.device().is_cpu() == p.on_cpu) =>
            {
                &p.plan
            }
            _ => {
                let on_cpu = inputs.iter().all(|x| x.device().is_cpu());
                fresh = self.plan(mode, &opts, on_cpu)?;
                &fresh
            }
        };
        match self.chunk_size(inputs, mode, &opts) {
            Some(size) => self.run_chunked(plan, inputs, size, opts.kernels, opts.params),
            None => self.run_plan(plan, inputs, mode, opts),
        }
    }

    /// An evaluation forward's preparation, made once for many forwards of this model with
    /// the same parameters (an evaluation pass, a latency measurement): the fused chains with
    /// their batch norms folded into the weights, and the channels-last convolutions' weights
    /// laid out (see the module docs); at batch 1 that work was about 40% of MobileNetV1's
    /// forward. A snapshot: in a forward given it ([`ForwardOptions::prepared`]) the
    /// convolutions that run with their batch norm or activation compute with their
    /// parameters as they were when it was made (the other layers read theirs at each
    /// forward), so prepare again after changing them. It serves evaluation forwards without
    /// kernels, observer, taps or other parameters, with the same `channels_first`; any other
    /// forward prepares its own.
    pub fn prepare_eval(&self, channels_first: bool) -> Result<PreparedEval<'_>> {
        let opts = ForwardOptions {
            channels_first,
            ..Default::default()
        };
        let on_cpu = self.device().is_cpu();
        Ok(PreparedEval {
            model: self,
            plan: self.plan(Mode::Eval, &opts, on_cpu)?,
            channels_first,
            on_cpu,
        })
    }

    /// What a forward with `opts` runs (see [`Plan`]); `on_cpu` when its inputs are.
    fn plan(&self, mode: Mode, opts: &ForwardOptions<'_>, on_cpu: bool) -> Result<Plan> {
        let g = &self.graph;
        let mut tap_ids = Vec::with_capacity(opts.taps.len());
        for t in &opts.taps {
            tap_ids.push(g.id(t)?);
        }
        let mut uses = g.use_counts();
        for &t in &tap_ids {
            uses[t] += 1;
        }
        // In evaluation a convolution runs together with the batch norm and activation after
        // it, unless something else (kernels, an observer, a tap) needs the values between;
        // the folded weights are computed once per forward.
        let fusions = if mode == Mode::Eval && opts.kernels.is_none() && opts.observer.is_none() {
            self.fusions(&uses, &tap_ids)
        } else {
            vec![None; g.len()]
        };
        let channels_last = if on_cpu && !opts.channels_first {
            self.channels_last(&fusions, &tap_ids)
        } else {
            vec![false; g.len()]
        };
        let folded = fusions
            .iter()
            .map(|f| {
                f.as_ref()
                    .map(|f| {
                        let conv = g.node(f.conv);
                        self.folded(conv, f, opts.params, channels_last[f.conv])
                            .map_err(|e| CoreError::node(&conv.name, e.to_string()))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        // In training, a batch norm applies the ReLU or ReLU6 that alone reads it.
        let bn_clips = if mode == Mode::Train && opts.kernels.is_none() && opts.observer.is_none() {
            self.bn_clips(&uses, &tap_ids)
        } else {
            vec![None; g.len()]
        };
        Ok(Plan {
            tap_ids,
            uses,
            fusions,
            folded,
            bn_clips,
            channels_last,
        })
    }

    /// The number of samples per piece when an evaluation forward runs in pieces of the batch,
    /// in parallel, each through the whole graph (every node of an evaluation computes each
    /// sample on its own): a piece's values stay in the caches from one node to the next,
    /// where a large batch's activations go through memory at every node. `None` when the
    /// forward runs whole: in training, with kernels that need the whole batch, an observer,
    /// a timer or taps, on one thread, or when the batch's values fit in the caches anyway
    /// (then the pieces' extra calls cost more than they save).
    fn chunk_size(
        &self,
        inputs: &[Tensor],
        mode: Mode,
        opts: &ForwardOptions<'_>,
    ) -> Option<usize> {
        /// Samples per piece (pieces of 8 did worse on every zoo network measured).
        const PIECE: usize = 16;
        /// Below this much data in the largest node's inputs and output over the whole batch,
        /// the batch runs whole.
        const WHOLE: usize = 4 << 20;
        if mode != Mode::Eval
            || opts.whole
            || opts.kernels.is_some_and(|k| !k.per_sample())
            || opts.observer.is_some()
            || opts.finished.is_some()
            || !opts.taps.is_empty()
            || rayon::current_num_threads() < 2
        {
            return None;
        }
        let n = inputs.first()?.dims().first().copied()?;
        // (Every input's shape was checked against its node: each has a batch dimension.)
        if n < 2 * PIECE || inputs.iter().any(|x| x.dim(0).ok() != Some(n)) {
            return None;
        }
        let g = &self.graph;
        let per_sample = g
            .nodes()
            .iter()
            .map(|node| {
                let ins: usize = node
                    .inputs
                    .iter()
                    .map(|&i| g.node(i).shape.iter().product::<usize>())
                    .sum();
                ins + node.shape.iter().product::<usize>()
            })
            .max()
            .unwrap_or(0);
        (n * per_sample * 4 >= WHOLE).then_some(PIECE)
    }

    /// Runs `plan` on pieces of `size` samples of the batch in parallel and joins the outputs.
    fn run_chunked(
        &self,
        plan: &Plan,
        inputs: &[Tensor],
        size: usize,
        kernels: Option<&dyn NodeKernels>,
        params: Option<&dyn ParamSource>,
    ) -> Result<ForwardOutput> {
        use rayon::prelude::*;
        let n = inputs[0].dim(0)?;
        let starts: Vec<usize> = (0..n).step_by(size).collect();
        let pieces = starts
            .into_par_iter()
            .map(|start| {
                let len = size.min(n - start);
                let xs = inputs
                    .iter()
                    .map(|x| x.narrow(0, start, len))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let opts = ForwardOptions {
                    kernels,
                    params,
                    ..Default::default()
                };
                Ok(self.run_plan(plan, &xs, Mode::Eval, opts)?.outputs)
            })
            .collect::<Result<Vec<Vec<Tensor>>>>()?;
        let outputs = (0..pieces[0].len())
            .map(|o| {
                let parts: Vec<&Tensor> = pieces.iter().map(|p| &p[o]).collect();
                Ok(Tensor::cat(&parts, 0)?)
            })
            .collect::<Result<_>>()?;
        Ok(ForwardOutput {
            outputs,
            taps: HashMap::new(),
        })
    }

    /// The forward's node loop over one batch.
    fn run_plan(
        &self,
        plan: &Plan,
        inputs: &[Tensor],
        mode: Mode,
        mut opts: ForwardOptions<'_>,
    ) -> Result<ForwardOutput> {
        let g = &self.graph;
        let tap_ids = &plan.tap_ids;
        let mut uses = plan.uses.clone();
        let mut values: Vec<Option<Tensor>> = vec![None; g.len()];
        // Whether each value is channels-last (`[N, H, W, C]`).
        let mut is_cl = vec![false; g.len()];
        let mut taps = HashMap::new();
        let mut next_input = inputs.iter();
        let fused_away = plan.fused_away(g.len());
        for id in g.eval_order() {
            if fused_away[id] {
                // Computed with its chain's convolution, whose value is this chain's last.
                if let Some(done) = opts.finished.as_mut() {
                    done(&g.node(id).name);
                }
                continue;
            }
            let node = g.node(id);
            // The value computed and the node it belongs to: a fused chain's last node.
            let mut out = id;
            let y = if let Op::Input { .. } = &node.op {
                // `next_input` has exactly one batch per input node, of the node's shape
                // (checked by `forward_here`).
                let x = next_input
                    .next()
                    .ok_or_else(|| CoreError::Invalid("missing input".into()))?;
                x.to_dtype(DType::F32)?
            } else {
                let xs = self.gather_inputs(plan, id, &mut values, &mut is_cl, &opts)?;
                let xs: Vec<&Tensor> = xs.iter().collect();
                let in_cl = node.inputs.first().is_some_and(|&i| is_cl[i]);
                let (y, last) = self.compute(plan, id, &xs, in_cl, mode, &opts)?;
                out = last;
                y
            };
            if let Some(obs) = opts.observer.as_mut() {
                obs(&node.name, &y)?;
            }
            if let Some(done) = opts.finished.as_mut() {
                done(&node.name);
            }
            for &i in &node.inputs {
                uses[i] -= 1;
                if uses[i] == 0 {
                    values[i] = None;
                }
            }
            if tap_ids.contains(&out) {
                taps.insert(g.node(out).name.clone(), y.clone());
            }
            values[out] = Some(y);
            is_cl[out] = plan.channels_last[id];
        }
        let outputs = g
            .outputs()
            .iter()
            .map(|&o| {
                values[o]
                    .clone()
                    .ok_or_else(|| CoreError::node(&g.node(o).name, "output not computed"))
            })
            .collect::<Result<_>>()?;
        Ok(ForwardOutput { outputs, taps })
    }

    /// Node `id`'s inputs in the layout it reads: channels-last where it runs so (converted
    /// where they enter a chain), else `[N, C, H, W]` (converted where they leave one, in
    /// place, so that the value's other readers find it so), except that global pooling reads
    /// either; then the value its kernel also reads, if any.
    fn gather_inputs(
        &self,
        plan: &Plan,
        id: usize,
        values: &mut [Option<Tensor>],
        is_cl: &mut [bool],
        opts: &ForwardOptions<'_>,
    ) -> Result<Vec<Tensor>> {
        let (g, node) = (&self.graph, self.graph.node(id));
        let cl = plan.channels_last[id];
        let mut xs = Vec::with_capacity(node.inputs.len() + 1);
        for &i in &node.inputs {
            let v = values[i]
                .as_ref()
                .ok_or_else(|| CoreError::node(&node.name, "input not computed"))?;
            let x = if cl && !is_cl[i] {
                channels_last::to_channels_last(v)?
            } else if !cl && is_cl[i] && !matches!(node.op, Op::GlobalAvgPool) {
                let x = channels_last::to_channels_first(v)?;
                (values[i], is_cl[i]) = (Some(x.clone()), false);
                x
            } else {
                v.clone()
            };
            xs.push(x);
        }
        if let Some(j) = opts.kernels.and_then(|k| k.also_reads(self, id)) {
            match (&values[j], is_cl[j]) {
                (Some(v), false) => xs.push(v.clone()),
                _ => {
                    return Err(CoreError::node(
                        &node.name,
                        format!("its kernel reads `{}`, not at hand", g.node(j).name),
                    ))
                }
            }
        }
        Ok(xs)
    }

    /// Node `id`'s value from its inputs `xs` (`in_cl`: the first is channels-last): by the
    /// caller's kernels, as a fused chain (whose last node it belongs to), or by its op; the
    /// value and the node it belongs to.
    fn compute(
        &self,
        plan: &Plan,
        id: usize,
        xs: &[&Tensor],
        in_cl: bool,
        mode: Mode,
        opts: &ForwardOptions<'_>,
    ) -> Result<(Tensor, usize)> {
        let node = self.graph.node(id);
        let fusions = &plan.fusions;
        let mut out = id;
        let custom = match opts.kernels {
            Some(k) => k.run(self, node, xs, mode)?,
            None => None,
        };
        let y = match (custom, &fusions[id]) {
            (Some(y), _) => y,
            (None, Some(f)) => {
                out = f.last();
                let folded = plan.folded[id].as_ref().ok_or_else(|| {
                    CoreError::node(&node.name, "fused chain without its weights")
                })?;
                match folded {
                    Folded::ChannelsLast(conv) => conv.forward(xs[0]).map_err(CoreError::from),
                    Folded::Tensors(w, b) => Self::run_fused(node, f, xs[0], w, b),
                }
                .map_err(|e| CoreError::node(&node.name, e.to_string()))?
            }
            (None, None) => match (&node.op, plan.bn_clips[id]) {
                (Op::BatchNorm2d(spec), Some((act, max))) => {
                    out = act;
                    self.batch_norm(node, spec, xs[0], mode, opts.params, Some(max))
                }
                (Op::GlobalAvgPool, _) if in_cl => {
                    channels_last::channel_means(xs[0]).map_err(CoreError::from)
                }
                _ => self.run_node(id, node, xs, mode, opts.dropout_seed, opts.params),
            }
            .map_err(|e| CoreError::node(&node.name, e.to_string()))?,
        };
        Ok((y, out))
    }

    /// Which nodes run channels-last in evaluation ([`crate::kernels::channels_last`]): the
    /// fused chains whose convolution takes that layout, and the ReLU, ReLU6 and sums between
    /// them, joined through the values they pass each other, in the groups so joined that
    /// hold a depthwise convolution (a group of pointwise convolutions alone would pay a
    /// conversion at each end for nothing); none whose output planes are smaller than
    /// [`CHANNELS_LAST_PLANE`]. Values that are graph outputs or taps stay `[N, C, H, W]`.
    fn channels_last(&self, fusions: &[Option<Fusion>], tap_ids: &[usize]) -> Vec<bool> {
        let g = &self.graph;
        let outputs = g.outputs();
        let kept = |v: usize| !tap_ids.contains(&v) && !outputs.contains(&v);
        // The node that computes each value (a fused chain's, its convolution).
        let mut runner: Vec<usize> = (0..g.len()).collect();
        for f in fusions.iter().flatten() {
            for id in [f.bn, f.act].into_iter().flatten() {
                runner[id] = f.conv;
            }
        }
        let mut able = vec![false; g.len()];
        let mut depthwise = vec![false; g.len()];
        for id in g.eval_order() {
            let node = g.node(id);
            if runner[id] != id
                || node.shape.len() != 3
                || node.shape[1] * node.shape[2] < CHANNELS_LAST_PLANE
            {
                continue;
            }
            match (&node.op, &fusions[id]) {
                (Op::Conv2d(spec), Some(f)) => {
                    able[id] = kept(f.last()) && ChannelsLastConv::applies(spec);
                    depthwise[id] = able[id] && spec.is_depthwise();
                }
                (Op::Relu | Op::Relu6 | Op::Add, None) => able[id] = kept(id),
                _ => {}
            }
        }
        // Groups joined through the values passed between able nodes (union-find).
        let mut group: Vec<usize> = (0..g.len()).collect();
        fn root(group: &mut [usize], mut i: usize) -> usize {
            while group[i] != i {
                group[i] = group[group[i]];
                i = group[i];
            }
            i
        }
        for id in g.eval_order().filter(|&id| able[id]) {
            for &i in &g.node(id).inputs {
                let from = runner[i];
                if able[from] {
                    let (a, b) = (root(&mut group, id), root(&mut group, from));
                    group[a] = b;
                }
            }
        }
        let mut has_depthwise = vec![false; g.len()];
        for id in (0..g.len()).filter(|&id| depthwise[id]) {
            let r = root(&mut group, id);
            has_depthwise[r] = true;
        }
        (0..g.len())
            .map(|id| able[id] && has_depthwise[root(&mut group, id)])
            .collect()
    }

    /// By node: the node that alone reads its value, when that value is neither a graph
    /// output nor a tap (`uses` counts both), so that the two can run as one.
    fn only_readers(&self, uses: &[usize], tap_ids: &[usize]) -> Vec<Option<usize>> {
        let g = &self.graph;
        let mut reader = vec![None; g.len()];
        for id in g.eval_order() {
            for &i in &g.node(id).inputs {
                reader[i] = Some(id);
            }
        }
        (0..g.len())
            .map(|i| reader[i].filter(|_| uses[i] == 1 && !tap_ids.contains(&i)))
            .collect()
    }

    /// By batch norm: the ReLU (bound `∞`) or ReLU6 (6) that alone reads it.
    fn bn_clips(&self, uses: &[usize], tap_ids: &[usize]) -> Vec<Option<(usize, f32)>> {
        let g = &self.graph;
        let readers = self.only_readers(uses, tap_ids);
        (0..g.len())
            .map(|id| {
                let Op::BatchNorm2d(_) = g.node(id).op else {
                    return None;
                };
                let act = readers[id]?;
                match g.node(act).op {
                    Op::Relu => Some((act, f32::INFINITY)),
                    Op::Relu6 => Some((act, 6.0)),
                    _ => None,
                }
            })
            .collect()
    }

    /// For each convolution, the batch norm and then the ReLU or ReLU6 that can run with it:
    /// each must be the only reader of the value before it, which must be neither a graph
    /// output nor a tap.
    fn fusions(&self, uses: &[usize], tap_ids: &[usize]) -> Vec<Option<Fusion>> {
        let g = &self.graph;
        let readers = self.only_readers(uses, tap_ids);
        let only_reader = |i: usize| readers[i];
        g.eval_order()
            .map(|id| {
                let Op::Conv2d(_) = g.node(id).op else {
                    return None;
                };
                let mut f = Fusion {
                    conv: id,
                    bn: None,
                    act: None,
                    clamp: crate::kernels::Epilogue::NONE,
                };
                if let Some(j) = only_reader(id) {
                    if let Op::BatchNorm2d(_) = g.node(j).op {
                        f.bn = Some(j);
                    }
                }
                if let Some(j) = only_reader(f.last()) {
                    let clamp = match g.node(j).op {
                        Op::Relu => Some(crate::kernels::Epilogue::RELU),
                        Op::Relu6 => Some(crate::kernels::Epilogue::RELU6),
                        _ => None,
                    };
                    if let Some(c) = clamp {
                        f.act = Some(j);
                        f.clamp = c;
                    }
                }
                (f.last() != id).then_some(f)
            })
            .collect()
    }

    /// A convolution with its batch norm folded into the weights and bias (evaluation: the
    /// running statistics) and its activation applied as each output is written.
    fn run_fused(conv: &Node, f: &Fusion, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let Op::Conv2d(spec) = &conv.op else {
            return Err(CoreError::node(
                &conv.name,
                "fused chain without a convolution",
            ));
        };
        Ok(crate::kernels::conv2d_fused(x, w, b, spec, f.clamp)?)
    }

    /// The weights and bias of a fused chain's convolution with its batch norm folded in
    /// (the running statistics).
    fn folded(
        &self,
        conv: &Node,
        f: &Fusion,
        src: Option<&dyn ParamSource>,
        channels_last: bool,
    ) -> Result<Folded> {
        let Op::Conv2d(spec) = &conv.op else {
            return Err(CoreError::node(
                &conv.name,
                "fused chain without a convolution",
            ));
        };
        let mode = Mode::Eval;
        let w = self.param(conv, "weight", mode, src)?;
        let o = w.dim(0)?;
        let bias = if spec.bias {
            Some(self.param(conv, "bias", mode, src)?)
        } else {
            None
        };
        let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let ready = |w: &[f32], b: &[f32]| -> Result<Folded> {
            let c = ChannelsLastConv::new(spec, w, b, f.clamp).ok_or_else(|| {
                CoreError::node(&conv.name, "weights of the wrong size for the convolution")
            })?;
            Ok(Folded::ChannelsLast(c))
        };
        let Some(bn_id) = f.bn else {
            let b = match bias {
                Some(b) => b,
                None => Tensor::zeros(o, DType::F32, w.device())?,
            };
            if channels_last {
                return ready(&values(&w)?, &values(&b)?);
            }
            return Ok(Folded::Tensors(w.contiguous()?, b.contiguous()?));
        };
        let bn = self.graph.node(bn_id);
        let Op::BatchNorm2d(bspec) = &bn.op else {
            return Err(CoreError::node(
                &bn.name,
                "fused chain without a batch norm",
            ));
        };
        // One pass over the values (a chain of about ten tensor ops per convolution was an
        // eighth of a small network's forward at batch 1), with the f32 operations of
        // [`Model::bn_eval_affine`] and a broadcast product, in the same order.
        let channel = |role: &str| -> Result<Vec<f32>> {
            let v = values(&self.param(bn, role, mode, src)?)?;
            if v.len() != o {
                return Err(CoreError::node(
                    &bn.name,
                    format!("{role} has {} values for {o} channels", v.len()),
                ));
            }
            Ok(v)
        };
        let (gamma, beta) = (channel("weight")?, channel("bias")?);
        let (mean, var) = (channel("running_mean")?, channel("running_var")?);
        let eps = bspec.eps as f32;
        let scale: Vec<f32> = var
            .iter()
            .zip(&gamma)
            .map(|(&v, &g)| (v + eps).sqrt().recip() * g)
            .collect();
        let b: Vec<f32> = match &bias {
            Some(b) => values(b)?,
            None => vec![0.0; o],
        };
        let b: Vec<f32> = (0..o)
            .map(|c| b[c] * scale[c] + (beta[c] - mean[c] * scale[c]))
            .collect();
        let mut wv = values(&w)?;
        let per = wv.len() / o.max(1);
        for (row, &s) in wv.chunks_exact_mut(per.max(1)).zip(&scale) {
            for v in row {
                *v *= s;
            }
        }
        if channels_last {
            return ready(&wv, &b);
        }
        Ok(Folded::Tensors(
            Tensor::from_vec(wv, w.shape(), w.device())?,
            Tensor::from_vec(b, o, w.device())?,
        ))
    }

    /// Batch norm in evaluation as `x * scale + shift` per channel (`[C]` each):
    /// `scale = gamma / sqrt(running_var + eps)`, `shift = beta - running_mean * scale`.
    fn bn_eval_affine(
        &self,
        bn: &Node,
        spec: &BatchNormSpec,
        src: Option<&dyn ParamSource>,
    ) -> Result<(Tensor, Tensor)> {
        let mode = Mode::Eval;
        let gamma = self.param(bn, "weight", mode, src)?;
        let beta = self.param(bn, "bias", mode, src)?;
        let mean = self.param(bn, "running_mean", mode, src)?;
        let var = self.param(bn, "running_var", mode, src)?;
        let scale = ((var + spec.eps)?.sqrt()?.recip()? * gamma)?;
        let shift = (beta - (mean * &scale)?)?;
        Ok((scale, shift))
    }

    fn param(
        &self,
        node: &Node,
        role: &str,
        mode: Mode,
        src: Option<&dyn ParamSource>,
    ) -> Result<Tensor> {
        let from = match src {
            Some(s) if role != "running_mean" && role != "running_var" => s.param(node, role)?,
            _ => None,
        };
        let t = match from {
            Some(t) => t,
            None => self.params.tensor(&node.param_name(role))?,
        };
        Ok(match mode {
            Mode::Train => t,
            Mode::Eval => t.detach(),
        })
    }

    fn run_node(
        &self,
        id: usize,
        node: &Node,
        xs: &[&Tensor],
        mode: Mode,
        seed: Option<u64>,
        src: Option<&dyn ParamSource>,
    ) -> Result<Tensor> {
        let r = Run {
            id,
            node,
            xs,
            mode,
            seed,
            src,
        };
        type Rule = fn(&Model, &Run<'_>) -> Result<Option<Tensor>>;
        let rules: [Rule; 5] = [
            Model::run_layer,
            Model::run_activation,
            Model::run_arithmetic,
            Model::run_spatial,
            Model::run_axes,
        ];
        for rule in rules {
            if let Some(y) = rule(self, &r)? {
                return Ok(y);
            }
        }
        Err(CoreError::Invalid(format!(
            "no forward for {}",
            node.op.kind()
        )))
    }

    /// Layers with weights, constants and quantizers. `None` for other ops.
    fn run_layer(&self, r: &Run<'_>) -> Result<Option<Tensor>> {
        let node = r.node;
        let x = r.xs[0];
        let mode = r.mode;
        let src = r.src;
        Ok(Some(match &node.op {
            Op::Input { .. } => x.clone(),
            Op::Conv2d(c) => {
                let w = self.param(node, "weight", mode, src)?;
                let b = if c.bias {
                    Some(self.param(node, "bias", mode, src)?)
                } else {
                    None
                };
                crate::kernels::conv2d(x, &w, b.as_ref(), c)?
            }
            Op::Linear(l) => {
                let w = self.param(node, "weight", mode, src)?;
                let y = x.matmul(&w.t()?)?;
                if l.bias {
                    y.broadcast_add(&self.param(node, "bias", mode, src)?)?
                } else {
                    y
                }
            }
            Op::BatchNorm2d(spec) => self.batch_norm(node, spec, x, mode, src, None)?,
            Op::ChannelAffine { .. } => {
                let w = per_channel(&self.param(node, "weight", mode, src)?, x)?;
                let b = per_channel(&self.param(node, "bias", mode, src)?, x)?;
                x.broadcast_mul(&w)?.broadcast_add(&b)?
            }
            Op::Lrn(l) => lrn(x, l)?,
            Op::ConvTranspose2d(c) => {
                let w = self.param(node, "weight", mode, src)?;
                let b = if c.bias {
                    Some(self.param(node, "bias", mode, src)?)
                } else {
                    None
                };
                conv_transpose(x, &w, b.as_ref(), c)?
            }
            Op::Dense(l) => {
                let w = self.param(node, "weight", mode, src)?;
                let y = x.broadcast_matmul(&w.t()?)?;
                if l.bias {
                    y.broadcast_add(&self.param(node, "bias", mode, src)?)?
                } else {
                    y
                }
            }
            Op::Constant { shape } => {
                let c = self.param(node, "value", mode, src)?;
                let mut dims = vec![x.dim(0)?];
                dims.extend(shape);
                c.unsqueeze(0)?.broadcast_as(dims)?.contiguous()?
            }
            Op::FakeQuant(q) => self.fake_quant(node, q, x, mode)?,
            _ => return Ok(None),
        }))
    }

    /// Activations and other element-wise functions. `None` for other ops.
    fn run_activation(&self, r: &Run<'_>) -> Result<Option<Tensor>> {
        let node = r.node;
        let x = r.xs[0];
        let id = r.id;
        let mode = r.mode;
        let seed = r.seed;
        let src = r.src;
        Ok(Some(match &node.op {
            Op::Relu => crate::kernels::clip(x, f32::INFINITY)?,
            Op::Relu6 => crate::kernels::clip(x, 6.0)?,
            Op::HardSwish => (x * ((x + 3.0)?.relu()?.minimum(6f32)? / 6.0)?)?,
            Op::HardSigmoid { alpha, beta } => x
                .affine(f64::from(*alpha), f64::from(*beta))?
                .clamp(0f32, 1f32)?,
            Op::Sigmoid => candle_nn::ops::sigmoid(x)?,
            Op::Clip { min, max } => match (min, max) {
                (Some(lo), Some(hi)) => x.clamp(*lo, *hi)?,
                (Some(lo), None) => x.maximum(*lo)?,
                (None, Some(hi)) => x.minimum(*hi)?,
                (None, None) => x.clone(),
            },
            Op::LeakyRelu { alpha } => candle_nn::ops::leaky_relu(x, f64::from(*alpha))?,
            Op::PRelu { .. } => {
                // (A select, not relu(x) + slope · min(x, 0): at 0 that sums two gradients.)
                let slope = per_channel(&self.param(node, "weight", mode, src)?, x)?;
                x.gt(0f32)?.where_cond(x, &x.broadcast_mul(&slope)?)?
            }
            Op::Tanh => x.tanh()?,
            Op::Silu => x.silu()?,
            Op::Gelu => x.gelu_erf()?,
            Op::GeluTanh => x.gelu()?,
            Op::Erf => x.erf()?,
            Op::Dropout { p } => match mode {
                Mode::Train if *p > 0.0 => {
                    // Each dropout node draws from its own stream of the step's seed.
                    let node_seed =
                        seed.map(|s| s ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    dropout(x, *p, node_seed)?
                }
                _ => x.clone(),
            },
            Op::Softmax => candle_nn::ops::softmax(x, 1)?,
            Op::Sqrt => x.sqrt()?,
            Op::Reciprocal => x.recip()?,
            Op::Unary(kind) => unary(*kind, x)?,
            Op::Identity => x.clone(),
            _ => return Ok(None),
        }))
    }

    /// Sums, products, arithmetic, concatenations and slices. `None` for other ops.
    fn run_arithmetic(&self, r: &Run<'_>) -> Result<Option<Tensor>> {
        let node = r.node;
        let x = r.xs[0];
        let xs = r.xs;
        let mode = r.mode;
        let src = r.src;
        Ok(Some(match &node.op {
            Op::Add => {
                let mut acc = x.clone();
                for y in &xs[1..] {
                    acc = (acc + *y)?;
                }
                acc
            }
            Op::Mul => {
                let y = xs[1];
                if x.dims() == y.dims() {
                    (x * y)?
                } else {
                    // Channel-wise: a [N, C] or [N, C, 1, 1] gate over [N, C, H, W].
                    let (n, c) = (x.dim(0)?, x.dim(1)?);
                    x.broadcast_mul(&y.reshape((n, c, 1, 1))?)?
                }
            }
            Op::Concat => Tensor::cat(xs, 1)?,
            Op::MatMul => batched_matmul(x, xs[1])?,
            Op::Binary(kind) => binary(*kind, x, xs[1])?,
            Op::ConstBinary { kind, reversed, .. } => {
                let c = self.param(node, "value", mode, src)?;
                // The constant's shape is per sample: a batch axis of one in front.
                let c = c.unsqueeze(0)?;
                if let (BinaryKind::Pow, false, 1) = (kind, reversed, c.elem_count()) {
                    // A power with one exponent element-wise, so that negative bases raised
                    // to whole powers stay defined (x² in layer norms).
                    let e = c.flatten_all()?.to_vec1::<f32>()?[0];
                    return Ok(Some(if e == 2.0 {
                        x.sqr()?
                    } else {
                        x.powf(f64::from(e))?
                    }));
                }
                if *reversed {
                    binary(*kind, &c, x)?
                } else {
                    binary(*kind, x, &c)?
                }
            }
            Op::ConcatAt { axis } => Tensor::cat(xs, axis + 1)?,
            Op::Slice {
                axis,
                start,
                end,
                step,
                backward,
            } => {
                let len = (end - start).div_ceil(*step);
                if *step == 1 && !backward {
                    x.narrow(axis + 1, *start, len)?
                } else {
                    let at = |i: usize| match backward {
                        true => end - 1 - i * step,
                        false => start + i * step,
                    };
                    let idx: Vec<u32> = (0..len).map(|i| at(i) as u32).collect();
                    let idx = Tensor::from_vec(idx, len, x.device())?;
                    x.contiguous()?.index_select(&idx, axis + 1)?
                }
            }
            _ => return Ok(None),
        }))
    }

    /// Pooling, padding, resizing, shuffling and flattening. `None` for other ops.
    fn run_spatial(&self, r: &Run<'_>) -> Result<Option<Tensor>> {
        let node = r.node;
        let x = r.xs[0];
        Ok(Some(match &node.op {
            Op::MaxPool2d(p) => max_pool(x, p)?,
            Op::AvgPool2d(p) => avg_pool(x, p)?,
            Op::GlobalAvgPool => crate::kernels::plane_means(x)?,
            Op::Flatten => x.flatten_from(1)?,
            Op::Pad { pads, mode } => pad(x, *pads, *mode)?,
            Op::Resize(r) => resize(x, r)?,
            Op::ChannelShuffle { groups } => channel_shuffle(x, *groups)?,
            _ => return Ok(None),
        }))
    }

    /// Reshapes, transposes and ops over chosen axes. `None` for other ops.
    fn run_axes(&self, r: &Run<'_>) -> Result<Option<Tensor>> {
        let node = r.node;
        let x = r.xs[0];
        let mode = r.mode;
        let src = r.src;
        Ok(Some(match &node.op {
            Op::Reshape { shape } => {
                let mut dims = vec![x.dim(0)?];
                dims.extend(shape);
                x.reshape(dims)?
            }
            Op::Transpose { perm } => {
                let mut dims = vec![0];
                dims.extend(perm.iter().map(|&p| p + 1));
                x.permute(dims)?.contiguous()?
            }
            Op::SoftmaxAt { axis } => candle_nn::ops::softmax(x, axis + 1)?,
            Op::Reduce { kind, axes, keep } => {
                let mut y = match kind {
                    ReduceKind::L1 => x.abs()?,
                    ReduceKind::L2 | ReduceKind::SumSquare => x.sqr()?,
                    _ => x.clone(),
                };
                // From the last axis down, so that the indices stay valid without `keep`.
                let mut sorted = axes.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                for &a in &sorted {
                    y = match kind {
                        // Over an empty axis: the reduction's identity.
                        _ if y.dim(a + 1)? == 0 => {
                            let mut dims = y.dims().to_vec();
                            dims[a + 1] = 1;
                            let fill = match kind {
                                ReduceKind::Max => f64::NEG_INFINITY,
                                ReduceKind::Min => f64::INFINITY,
                                ReduceKind::Mean => f64::NAN,
                                _ => 0.0,
                            };
                            Tensor::full(fill, dims, y.device())?.to_dtype(y.dtype())?
                        }
                        ReduceKind::Mean => y.mean_keepdim(a + 1)?,
                        ReduceKind::Max => y.max_keepdim(a + 1)?,
                        ReduceKind::Sum | ReduceKind::SumSquare | ReduceKind::L2 => {
                            y.sum_keepdim(a + 1)?
                        }
                        ReduceKind::Min => y.min_keepdim(a + 1)?,
                        ReduceKind::ArgMax
                        | ReduceKind::ArgMaxLast
                        | ReduceKind::ArgMin
                        | ReduceKind::ArgMinLast => arg_extreme(&y, a + 1, *kind)?,
                        ReduceKind::L1 => y.sum_keepdim(a + 1)?,
                    };
                    if !keep {
                        y = y.squeeze(a + 1)?;
                    }
                }
                if *kind == ReduceKind::L2 {
                    y = y.sqrt()?;
                }
                y
            }
            Op::LayerNorm { from, eps, .. } => {
                let w = self.param(node, "weight", mode, src)?;
                let b = self.param(node, "bias", mode, src)?;
                let flat = x.flatten_from(from + 1)?;
                let mean = flat.mean_keepdim(from + 1)?;
                let centred = flat.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(from + 1)?;
                let y = centred.broadcast_div(&(var + *eps)?.sqrt()?)?;
                let y = y.reshape(x.dims())?;
                y.broadcast_mul(&w)?.broadcast_add(&b)?
            }
            _ => return Ok(None),
        }))
    }

    fn fake_quant(
        &self,
        node: &Node,
        q: &crate::graph::FakeQuantSpec,
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let name = node.param_name("scale");
        let qmax = f64::from(q.qmax());
        let mut scale = self.params.tensor(&name)?.to_vec1::<f32>()?[0];
        if mode == Mode::Train && q.window > 0 {
            let batch = x.detach().abs()?.max_all()?.to_scalar::<f32>()? / q.qmax();
            scale = self.range_abs_max(node, q.window, batch, x.device())?;
            self.params
                .set(&name, &Tensor::new(&[scale], x.device())?)?;
        } else if mode == Mode::Train && q.moving_rate > 0.0 {
            let batch = x.detach().abs()?.max_all()?.to_scalar::<f32>()? / q.qmax();
            scale = if scale > 0.0 {
                q.moving_rate * scale + (1.0 - q.moving_rate) * batch
            } else {
                batch
            };
            self.params
                .set(&name, &Tensor::new(&[scale], x.device())?)?;
        }
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(CoreError::param(
                &name,
                "the fake-quantization scale is not set (calibrate or train the model first)",
            ));
        }
        if mode == Mode::Eval && x.device().is_cpu() && x.dtype() == DType::F32 {
            return fake_quantize_eval(x, scale, qmax);
        }
        fake_quantize(x, scale, qmax)
    }

    /// `range_abs_max`: this batch's scale written into the ring of the last `window`
    /// batches' scales, and the largest of those seen so far returned.
    fn range_abs_max(
        &self,
        node: &Node,
        window: usize,
        batch: f32,
        device: &candle_core::Device,
    ) -> Result<f32> {
        let (ring, step) = (
            node.param_name("window_max"),
            node.param_name("window_step"),
        );
        let mut values = self.params.tensor(&ring)?.to_vec1::<f32>()?;
        let seen = self.params.tensor(&step)?.to_vec1::<f32>()?[0];
        if values.len() != window || !(seen >= 0.0 && seen.is_finite()) {
            return Err(CoreError::param(&ring, "not a range_abs_max window"));
        }
        let seen = seen as usize;
        values[seen % window] = batch;
        let filled = (seen + 1).min(window);
        let scale = values[..filled].iter().copied().fold(0.0f32, f32::max);
        self.params.set(&ring, &Tensor::new(values, device)?)?;
        self.params
            .set(&step, &Tensor::new(&[(seen + 1) as f32], device)?)?;
        Ok(scale)
    }

    /// Batch norm, followed by `clamp(·, 0, max)` when `clip` is `Some(max)`.
    fn batch_norm(
        &self,
        node: &Node,
        spec: &BatchNormSpec,
        x: &Tensor,
        mode: Mode,
        src: Option<&dyn ParamSource>,
        clip: Option<f32>,
    ) -> Result<Tensor> {
        let then_clip = |y: Tensor| -> Result<Tensor> {
            Ok(match clip {
                Some(max) => crate::kernels::clip(&y, max)?,
                None => y,
            })
        };
        let c = spec.channels;
        // [1, C] for feature vectors, [1, C, 1, 1] for feature maps.
        let bshape: Vec<usize> = if x.rank() == 4 {
            vec![1, c, 1, 1]
        } else {
            vec![1, c]
        };
        match mode {
            Mode::Eval => {
                let (scale, shift) = self.bn_eval_affine(node, spec, src)?;
                then_clip(
                    x.broadcast_mul(&scale.reshape(bshape.as_slice())?)?
                        .broadcast_add(&shift.reshape(bshape.as_slice())?)?,
                )
            }
            Mode::Train => {
                let count = x.elem_count() / c;
                if count < 2 {
                    return Err(CoreError::node(
                        &node.name,
                        "batch norm in train mode needs more than one value per channel",
                    ));
                }
                let (y, mean, var) = if x.rank() == 4 && crate::kernels::fused_batch_norm(x) {
                    let gamma = self.param(node, "weight", mode, src)?;
                    let beta = self.param(node, "bias", mode, src)?;
                    let x = x.contiguous()?;
                    let mut op = crate::kernels::BatchNormTrain::for_batch(&x, spec.eps)?;
                    if let Some(max) = clip {
                        op = op.with_clip(max);
                    }
                    let (mean, var) = op.mean_var();
                    let y = x.apply_op3(&gamma, &beta, op)?;
                    let dev = x.device();
                    (y, Tensor::new(mean, dev)?, Tensor::new(var, dev)?)
                } else {
                    let gamma = self
                        .param(node, "weight", mode, src)?
                        .reshape(bshape.as_slice())?;
                    let beta = self
                        .param(node, "bias", mode, src)?
                        .reshape(bshape.as_slice())?;
                    let reduce = |t: &Tensor| -> Result<Tensor> {
                        let mut m = t.mean_keepdim(0)?;
                        if t.rank() == 4 {
                            m = m.mean_keepdim(3)?.mean_keepdim(2)?;
                        }
                        Ok(m)
                    };
                    let mean = reduce(x)?;
                    let centered = x.broadcast_sub(&mean)?;
                    let var = reduce(&centered.sqr()?)?;
                    let y = then_clip(
                        centered
                            .broadcast_div(&(&var + spec.eps)?.sqrt()?)?
                            .broadcast_mul(&gamma)?
                            .broadcast_add(&beta)?,
                    )?;
                    (y, mean.detach().flatten_all()?, var.detach().flatten_all()?)
                };
                // Running statistics: detached, unbiased variance, PyTorch's momentum convention.
                let m = spec.momentum;
                let rm_name = node.param_name("running_mean");
                let rv_name = node.param_name("running_var");
                let rm = self.params.tensor(&rm_name)?;
                let rv = self.params.tensor(&rv_name)?;
                let bv = (var * (count as f64 / (count as f64 - 1.0)))?;
                self.params
                    .set(&rm_name, &((rm * (1.0 - m))? + (mean * m)?)?)?;
                self.params
                    .set(&rv_name, &((rv * (1.0 - m))? + (bv * m)?)?)?;
                Ok(y)
            }
        }
    }
}

/// `clamp(round(x / scale), -qmax, qmax) * scale`, with a straight-through gradient: the
/// values inside the range get the incoming gradient unchanged, those clipped get none.
pub fn fake_quantize(x: &Tensor, scale: f32, qmax: f64) -> Result<Tensor> {
    let s = f64::from(scale);
    let clipped = x.clamp(-qmax * s, qmax * s)?;
    let q = ((&clipped / s)?.round()? * s)?;
    Ok((&clipped + (q - &clipped)?.detach())?)
}

/// [`fake_quantize`] without a gradient, in one pass over the values on the CPU: the same
/// float operations in the same order, so the same results to the bit.
fn fake_quantize_eval(x: &Tensor, scale: f32, qmax: f64) -> Result<Tensor> {
    let s = f64::from(scale);
    let (lo, hi) = ((-qmax * s) as f32, (qmax * s) as f32);
    let (inv, s32) = ((1.0 / s) as f32, s as f32);
    let v = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; v.len()];
    let run = |(src, dst): (&[f32], &mut [f32])| {
        for (d, &x) in dst.iter_mut().zip(src) {
            let c = x.clamp(lo, hi);
            let q = (c * inv + 0.0).round() * s32 + 0.0;
            *d = c + (q - c);
        }
    };
    const CHUNK: usize = 1 << 15;
    if v.len() > CHUNK {
        use rayon::prelude::*;
        v.par_chunks(CHUNK)
            .zip(out.par_chunks_mut(CHUNK))
            .for_each(run);
    } else {
        run((&v, &mut out));
    }
    Ok(Tensor::from_vec(out, x.dims(), x.device())?)
}

/// Inverted dropout: zero each value with probability `p`, scale the rest by `1 / (1 - p)`.
fn dropout(x: &Tensor, p: f32, seed: Option<u64>) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    if !(0.0..1.0).contains(&p) {
        return Err(CoreError::Invalid(format!(
            "dropout probability {p} must be in [0, 1)"
        )));
    }
    let mut rng = match seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_rng(&mut rand::rng()),
    };
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.dims(), x.device())?;
    Ok((x * mask)?)
}

/// An element-wise function of [`Op::Unary`], composed of candle's differentiable ops.
fn unary(kind: UnaryKind, x: &Tensor) -> Result<Tensor> {
    // log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(-|x|)).
    let softplus = |x: &Tensor| -> Result<Tensor> {
        Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
    };
    // x above 0, exp(x) - 1 below: relu(x) + exp(min(x, 0)) - 1.
    let elu = |x: &Tensor, alpha: f32| -> Result<Tensor> {
        let below = ((x.neg()?.relu()?.neg()?.exp()? - 1.0)? * f64::from(alpha))?;
        Ok((x.relu()? + below)?)
    };
    Ok(match kind {
        UnaryKind::Abs => x.abs()?,
        UnaryKind::Exp => x.exp()?,
        UnaryKind::Log => x.log()?,
        UnaryKind::Softplus => softplus(x)?,
        UnaryKind::Softsign => x.broadcast_div(&(x.abs()? + 1.0)?)?,
        UnaryKind::Mish => (x * softplus(x)?.tanh()?)?,
        UnaryKind::Elu { alpha } => elu(x, alpha)?,
        UnaryKind::Selu { alpha, gamma } => (elu(x, alpha)? * f64::from(gamma))?,
        UnaryKind::Round => elementwise_on_host(x, f32::round_ties_even)?,
        UnaryKind::Float8 { format, saturate } => {
            elementwise_on_host(x, |v| format.round(v, saturate))?
        }
    })
}

/// `f` of every element, computed on the host (functions of a step, whose gradient is zero:
/// the result is a new tensor, outside autograd).
fn elementwise_on_host(x: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    let values: Vec<f32> = x
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f)
        .collect();
    Ok(Tensor::from_vec(values, x.dims(), x.device())?.to_dtype(x.dtype())?)
}

/// The index of the largest (smallest) value along `dim`, kept as an axis of one, in `x`'s
/// float type: its first occurrence, or its last one for the `Last` kinds (taken on the axis
/// reversed, and counted back).
fn arg_extreme(x: &Tensor, dim: usize, kind: ReduceKind) -> Result<Tensor> {
    let len = x.dim(dim)?;
    let last = matches!(kind, ReduceKind::ArgMaxLast | ReduceKind::ArgMinLast);
    let max = matches!(kind, ReduceKind::ArgMax | ReduceKind::ArgMaxLast);
    let x = if last {
        let rev: Vec<u32> = (0..len as u32).rev().collect();
        x.contiguous()?
            .index_select(&Tensor::from_vec(rev, len, x.device())?, dim)?
    } else {
        x.clone()
    };
    let at = match max {
        true => x.argmax_keepdim(dim)?,
        false => x.argmin_keepdim(dim)?,
    };
    let at = at.to_dtype(x.dtype())?.detach();
    Ok(match last {
        true => (at.neg()? + (len - 1) as f64)?,
        false => at,
    })
}

/// Element-wise arithmetic with broadcasting.
fn binary(kind: BinaryKind, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(match kind {
        BinaryKind::Add => a.broadcast_add(b)?,
        BinaryKind::Sub => a.broadcast_sub(b)?,
        BinaryKind::Mul => a.broadcast_mul(b)?,
        BinaryKind::Div => a.broadcast_div(b)?,
        BinaryKind::Pow => a.broadcast_pow(b)?,
        BinaryKind::Max => a.broadcast_maximum(b)?,
        BinaryKind::Min => a.broadcast_minimum(b)?,
    })
}

/// A per-channel vector `[C]` shaped to broadcast over `x` (`[N, C, ...]`).
fn per_channel(v: &Tensor, x: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1; x.rank()];
    shape[1] = v.elem_count();
    Ok(v.reshape(shape)?)
}

/// The `[out, len]` matrix that resizes an axis of `len` values (ONNX Resize's rules).
fn resize_matrix(len: usize, out: usize, axis: usize, r: &ResizeSpec) -> Vec<f32> {
    let scale = f64::from(r.scale[axis]);
    let last = len as f64 - 1.0;
    let mut m = vec![0f32; out * len];
    for o in 0..out {
        let of = o as f64;
        let src = match r.coord {
            CoordMode::TfCropAndResize => match crop_source(len, of, axis, r) {
                Some(src) => src,
                // Outside the input: the fill value, added after the products.
                None => continue,
            },
            CoordMode::HalfPixel => (of + 0.5) / scale - 0.5,
            CoordMode::PytorchHalfPixel if out > 1 => (of + 0.5) / scale - 0.5,
            CoordMode::PytorchHalfPixel => 0.0,
            // ONNX divides by the resized length before rounding (`len · scale - 1`).
            CoordMode::AlignCorners if len as f64 * scale > 1.0 => {
                of * last / (len as f64 * scale - 1.0)
            }
            CoordMode::AlignCorners => 0.0,
            CoordMode::Asymmetric => of / scale,
            CoordMode::HalfPixelSymmetric => {
                let centre = len as f64 / 2.0;
                let adjustment = out as f64 / (len as f64 * scale);
                centre * (1.0 - adjustment) + (of + 0.5) / scale - 0.5
            }
        };
        let row = &mut m[o * len..(o + 1) * len];
        if r.antialias && scale < 1.0 && !matches!(r.mode, ResizeMode::Nearest(_)) {
            antialiased_row(row, src, scale, r.mode);
            continue;
        }
        match r.mode {
            ResizeMode::Nearest(rounding) => {
                let i = match rounding {
                    NearestRounding::RoundPreferFloor if src.fract() == 0.5 => src.floor(),
                    NearestRounding::RoundPreferCeil if src.fract() == 0.5 => src.ceil(),
                    NearestRounding::RoundPreferFloor | NearestRounding::RoundPreferCeil => {
                        src.round()
                    }
                    NearestRounding::Floor => src.floor(),
                    NearestRounding::Ceil => src.ceil(),
                };
                row[i.clamp(0.0, last) as usize] = 1.0;
            }
            ResizeMode::Linear => {
                let src = src.clamp(0.0, last);
                let lo = src.floor();
                let hi = (lo + 1.0).min(last);
                let frac = src - lo;
                row[lo as usize] += (1.0 - frac) as f32;
                row[hi as usize] += frac as f32;
            }
            ResizeMode::Cubic { a, exclude_outside } => {
                // The four taps around `src`, the one at or just left of it second; at a
                // whole coordinate, that tap is the one to its left and the fraction 1, as
                // ONNX's reference takes them (the same values either way).
                let base = src.ceil() - 1.0;
                let t = src - base;
                let taps = cubic_weights(t, f64::from(a));
                let inside = |i: f64| (0.0..=last).contains(&i);
                let kept: f64 = (0..4)
                    .filter(|&j| inside(base - 1.0 + j as f64))
                    .map(|j| taps[j])
                    .sum();
                // Taps inside that weigh nothing in all (a hostile `a` on a one-value axis)
                // cannot be scaled to one: they read the edge as without `exclude_outside`.
                let exclude_outside = exclude_outside && kept != 0.0;
                for (j, w) in taps.iter().enumerate() {
                    let i = base - 1.0 + j as f64;
                    if exclude_outside && !inside(i) {
                        continue;
                    }
                    let w = if exclude_outside { w / kept } else { *w };
                    row[i.clamp(0.0, last) as usize] += w as f32;
                }
            }
        }
    }
    m
}

/// Where output point `of` of `axis` falls in an input of `len` values under
/// [`CoordMode::TfCropAndResize`] (ONNX's formula, the output's length taken as
/// `len · scale`); `None` outside the input.
fn crop_source(len: usize, of: f64, axis: usize, r: &ResizeSpec) -> Option<f64> {
    let crop = r.crop.as_ref()?;
    let (start, end) = (f64::from(crop.roi[axis]), f64::from(crop.roi[axis + 2]));
    let last = len as f64 - 1.0;
    let out_len = len as f64 * f64::from(r.scale[axis]);
    let src = if out_len == 1.0 {
        (end - start) * last / 2.0
    } else {
        of * (end - start) * last / (out_len - 1.0)
    } + start * last;
    (0.0..=last).contains(&src).then_some(src)
}

/// One output's weights for ONNX's antialiased linear or cubic shrinking (`scale` < 1): the
/// kernel (the triangle of support 1, or Keys' cubic of support 2) stretched by `1 / scale`
/// over the taps around the source coordinate `src`, the one at or just left of it counted
/// as ONNX's reference counts it; the weights are scaled to sum to one, taps outside read the
/// edge value (or, with `exclude_outside`, weigh nothing).
fn antialiased_row(row: &mut [f32], src: f64, scale: f64, mode: ResizeMode) {
    let last = row.len() as f64 - 1.0;
    let (support, a, exclude_outside) = match mode {
        ResizeMode::Cubic { a, exclude_outside } => (2.0, f64::from(a), exclude_outside),
        _ => (1.0, 0.0, false),
    };
    let kernel = |x: f64| -> f64 {
        let x = x.abs();
        match mode {
            ResizeMode::Cubic { .. } if x <= 1.0 => ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
            ResizeMode::Cubic { .. } if x < 2.0 => ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a,
            ResizeMode::Cubic { .. } => 0.0,
            _ => (1.0 - x).max(0.0),
        }
    };
    let start = (-support / scale).floor() + 1.0;
    let count = (2.0 - 2.0 * start) as usize;
    let base = src.ceil() - 1.0;
    let t = src - base;
    let taps: Vec<(f64, f64)> = (0..count)
        .map(|k| {
            let i = start + k as f64;
            (base + i, kernel((i - t) * scale))
        })
        .filter(|&(i, _)| !exclude_outside || (0.0..=last).contains(&i))
        .collect();
    let total: f64 = taps.iter().map(|&(_, w)| w).sum();
    if total == 0.0 || !total.is_finite() {
        row[src.round().clamp(0.0, last) as usize] = 1.0;
        return;
    }
    for (i, w) in taps {
        row[i.clamp(0.0, last) as usize] += (w / total) as f32;
    }
}

/// Keys' cubic convolution weights of the taps at distances `1 + t`, `t`, `1 - t` and `2 - t`
/// from a point a fraction `t` past the second tap, with coefficient `a`.
fn cubic_weights(t: f64, a: f64) -> [f64; 4] {
    // |x| <= 1: (a + 2)|x|^3 - (a + 3)|x|^2 + 1; 1 < |x| < 2: a|x|^3 - 5a|x|^2 + 8a|x| - 4a.
    let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [far(1.0 + t), near(t), near(1.0 - t), far(2.0 - t)]
}

/// What one node's forward works with.
struct Run<'a> {
    id: usize,
    node: &'a Node,
    xs: &'a [&'a Tensor],
    mode: Mode,
    seed: Option<u64>,
    src: Option<&'a dyn ParamSource>,
}

/// A product of matrices over broadcast leading axes: both sides broadcast to the common
/// leading shape and laid out as one batch of matrices (candle's own broadcast product
/// refuses some broadcast layouts).
fn batched_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let (ra, rb) = (ad.len(), bd.len());
    if ra < 2 || rb < 2 {
        return a.broadcast_matmul(b);
    }
    let lead = crate::graph::broadcast_shape(&ad[..ra - 2], &bd[..rb - 2]).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "matmul of {ad:?} by {bd:?}: the leading axes differ"
        ))
    })?;
    let (m, k, n) = (ad[ra - 2], ad[ra - 1], bd[rb - 1]);
    let count: usize = lead.iter().product();
    let full = |rows: usize, cols: usize| -> Vec<usize> {
        lead.iter().copied().chain([rows, cols]).collect()
    };
    let a3 = a
        .broadcast_as(full(m, k))?
        .contiguous()?
        .reshape((count, m, k))?;
    let b3 = b
        .broadcast_as(full(k, n))?
        .contiguous()?
        .reshape((count, k, n))?;
    a3.matmul(&b3)?.reshape(full(m, n))
}

#[cfg(test)]
mod resize_tests {
    use super::*;

    /// Cubic weights sum to one, and with `exclude_outside` a hostile coefficient whose
    /// inside taps sum to zero still gives finite weights.
    #[test]
    fn cubic_rows_are_finite_and_sum_to_one() {
        // (1, 2, 4) asymmetric: the one inside tap is at 0.5, where a = 4's kernel is zero.
        for (len, out, a, coord) in [
            (5, 9, -0.75f32, CoordMode::HalfPixel),
            (4, 2, 4.0, CoordMode::HalfPixel),
            (1, 2, 4.0, CoordMode::Asymmetric),
        ] {
            for exclude_outside in [false, true] {
                let r = ResizeSpec {
                    out: [out, out],
                    scale: [out as f32 / len as f32; 2],
                    mode: ResizeMode::Cubic { a, exclude_outside },
                    coord,
                    antialias: false,
                    crop: None,
                };
                let m = resize_matrix(len, out, 0, &r);
                for row in m.chunks(len) {
                    let sum: f32 = row.iter().sum();
                    assert!(
                        row.iter().all(|w| w.is_finite()),
                        "{len} {out} {a}: {row:?}"
                    );
                    assert!((sum - 1.0).abs() < 1e-5, "{len} {out} {a}: {row:?}");
                }
            }
        }
    }
}

/// Resizing as two products: `[out_h, H] · x · [W, out_w]`, so that any scale, coordinate
/// rule and rounding goes through one differentiable path.
fn resize(x: &Tensor, r: &ResizeSpec) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let [oh, ow] = r.out;
    let rows = resize_matrix(h, oh, 0, r);
    let cols = resize_matrix(w, ow, 1, r);
    let rows = Tensor::from_vec(rows, (1, oh, h), x.device())?.to_dtype(x.dtype())?;
    let cols = Tensor::from_vec(cols, (1, ow, w), x.device())?
        .to_dtype(x.dtype())?
        .transpose(1, 2)?;
    let y = rows
        .broadcast_matmul(&x.reshape((n * c, h, w))?)?
        .broadcast_matmul(&cols)?;
    let y = y.reshape((n, c, oh, ow))?;
    match (&r.coord, &r.crop) {
        (CoordMode::TfCropAndResize, Some(crop)) => {
            // Points outside the input on either axis take the fill value.
            let inside = |len: usize, out: usize, axis: usize| -> Vec<bool> {
                (0..out)
                    .map(|o| crop_source(len, o as f64, axis, r).is_some())
                    .collect()
            };
            let (ri, ci) = (inside(h, oh, 0), inside(w, ow, 1));
            if ri.iter().chain(&ci).all(|&v| v) {
                return Ok(y);
            }
            let mask: Vec<f32> = ri
                .iter()
                .flat_map(|&a| ci.iter().map(move |&b| f32::from(u8::from(a && b))))
                .collect();
            let mask = Tensor::from_vec(mask, (1, 1, oh, ow), x.device())?.to_dtype(x.dtype())?;
            let fill = mask.affine(
                -f64::from(crop.extrapolation),
                f64::from(crop.extrapolation),
            )?;
            Ok(y.broadcast_mul(&mask)?.broadcast_add(&fill)?)
        }
        _ => Ok(y),
    }
}

/// Local response normalization across channels (see [`LrnSpec`]).
fn lrn(x: &Tensor, l: &LrnSpec) -> Result<Tensor> {
    let c = x.dim(1)?;
    let squares = x.sqr()?.pad_with_zeros(1, (l.size - 1) / 2, l.size / 2)?;
    let mut sums = squares.narrow(1, 0, c)?;
    for k in 1..l.size {
        sums = (sums + squares.narrow(1, k, c)?)?;
    }
    let base = sums.affine(f64::from(l.alpha) / l.size as f64, f64::from(l.bias))?;
    Ok((x / base.powf(f64::from(l.beta))?)?)
}

/// Channel `j * groups + i` of the output is channel `i * (C / groups) + j` of the input.
fn channel_shuffle(x: &Tensor, groups: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, groups, c / groups, h, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, c, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Conv2dSpec, GraphBuilder};
    use candle_core::{Device, Var};

    /// The one-pass evaluation quantizer gives the graph's quantizer's values to the bit:
    /// random values, exact ties (`k + 0.5` steps), the clamp's edges, and values beyond.
    #[test]
    fn one_pass_fake_quantization_is_the_graphs_to_the_bit() {
        for (scale, qmax) in [(0.0173f32, 127.0), (0.5, 127.0), (3.1e-4, 7.0)] {
            let mut v: Vec<f32> = Tensor::randn(0f32, 200.0 * scale, 70_000, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            v.extend((-300..300).map(|k| (k as f32 + 0.5) * scale));
            v.extend([
                qmax as f32 * scale,
                -(qmax as f32) * scale,
                1e9,
                -1e9,
                0.0,
                -0.0,
            ]);
            let x = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
            let a: Vec<f32> = fake_quantize(&x, scale, qmax).unwrap().to_vec1().unwrap();
            let b: Vec<f32> = fake_quantize_eval(&x, scale, qmax)
                .unwrap()
                .to_vec1()
                .unwrap();
            for ((x, a), b) in v.iter().zip(&a).zip(&b) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{x} at scale {scale}: {a} against {b}"
                );
            }
        }
    }

    #[test]
    fn gradients_reach_every_trainable_parameter_and_bn_updates_only_in_train() {
        let g = GraphBuilder::new([2, 6, 6])
            .conv("c", 4, 3, 1, 1)
            .bn("bn")
            .relu("r")
            .global_avg_pool("gap")
            .linear("fc", 3)
            .build()
            .unwrap();
        let m = Model::init(g, 1, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 2, 6, 6), &Device::Cpu).unwrap();
        let rm0 = m
            .params
            .tensor("bn.running_mean")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let _ = m.forward(&x, Mode::Eval).unwrap();
        assert_eq!(
            m.params
                .tensor("bn.running_mean")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            rm0
        );
        let y = m.forward(&x, Mode::Train).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in m.params.trainable() {
            assert!(grads.get(v.as_tensor()).is_some());
        }
        assert_ne!(
            m.params
                .tensor("bn.running_mean")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            rm0
        );
        // Eval records no graph: backward from an eval output finds no variable.
        let ye = m.forward(&x, Mode::Eval).unwrap();
        let ge = ye.sum_all().unwrap().backward().unwrap();
        assert!(m
            .params
            .trainable()
            .iter()
            .all(|v: &Var| ge.get(v.as_tensor()).is_none()));
    }

    /// Batch norms with statistics and affine parameters far from the identity.
    fn unusual_batch_norms(m: &Model, names: &[&str]) {
        let dev = m.device();
        for name in names {
            let c = m
                .params
                .tensor(&format!("{name}.weight"))
                .unwrap()
                .dim(0)
                .unwrap();
            for (role, lo, hi) in [
                ("weight", 0.5, 2.0),
                ("bias", -1.0, 1.0),
                ("running_mean", -0.5, 0.5),
                ("running_var", 0.2, 3.0),
            ] {
                let t = Tensor::rand(lo as f32, hi as f32, c, &dev).unwrap();
                m.params.set(&format!("{name}.{role}"), &t).unwrap();
            }
        }
    }

    /// `a` and `b` have the same shape and differ by at most `tol` times `b`'s largest
    /// magnitude (at least 1) anywhere.
    fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= tol * scale, "{what}[{i}]: {p} vs {q}");
        }
    }

    /// Evaluation fuses convolutions with the batch norm and activation after them; the
    /// reference is the same forward with an observer, which sees every node and so runs
    /// each on its own.
    #[test]
    fn fused_evaluation_matches_node_by_node() {
        let mut b = GraphBuilder::new([3, 9, 9]);
        b.conv_with(
            "stem",
            Conv2dSpec::new(3, 8, 3).with_padding(1).with_bias(true),
        )
        .bn("stem.bn")
        .relu("stem.relu")
        .dwconv("dw", 3, 2, 1)
        .bn("dw.bn")
        .relu6("dw.relu")
        // A tapped batch norm ends its chain there; the ReLU after it runs alone.
        .conv("pw", 12, 1, 1, 0)
        .bn("pw.bn")
        .relu("pw.relu")
        // A convolution read twice (the residual) is not fused.
        .conv("res", 12, 3, 1, 1)
        .bn("res.bn");
        b.add("sum", &["res", "pw.relu"])
            .conv("last", 6, 1, 1, 0)
            .relu("last.relu")
            .global_avg_pool("gap")
            .linear("fc", 4);
        let g = b.build().unwrap();
        let dev = Device::Cpu;
        let m = Model::init(g, 3, &dev).unwrap();
        unusual_batch_norms(&m, &["stem.bn", "dw.bn", "pw.bn", "res.bn"]);
        let x = Tensor::randn(0f32, 1.0, (5, 3, 9, 9), &dev).unwrap();
        let taps = ["pw.bn", "last.relu"];
        let fused = m
            .forward_with(
                std::slice::from_ref(&x),
                Mode::Eval,
                ForwardOptions::default().with_taps(&taps),
            )
            .unwrap();
        let mut nothing = |_: &str, _: &Tensor| Ok(());
        let reference = m
            .forward_with(
                &[x],
                Mode::Eval,
                ForwardOptions::default()
                    .with_taps(&taps)
                    .with_observer(&mut nothing),
            )
            .unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| assert_close(a, b, 1e-5, what);
        close(&fused.outputs[0], &reference.outputs[0], "output");
        for t in taps {
            close(&fused.taps[t], &reference.taps[t], t);
        }
        // The fused chains are the ones described above.
        let uses = m.graph.use_counts();
        let ids: Vec<usize> = taps.iter().map(|t| m.graph.id(t).unwrap()).collect();
        let names = |id: Option<usize>| id.map(|i| m.graph.node(i).name.clone());
        let chains: Vec<(String, Option<String>, Option<String>)> = m
            .fusions(&uses, &ids)
            .into_iter()
            .flatten()
            .map(|f| (m.graph.node(f.conv).name.clone(), names(f.bn), names(f.act)))
            .collect();
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            chains,
            vec![
                ("stem".into(), s("stem.bn"), s("stem.relu")),
                ("dw".into(), s("dw.bn"), s("dw.relu")),
                ("pw".into(), s("pw.bn"), None),
                ("last".into(), None, s("last.relu")),
            ]
        );
    }

    /// The chains of depthwise and pointwise convolutions (with the sums and activations
    /// between them) run channels-last and give what the same forward gives with every value
    /// `[N, C, H, W]`, and what every node on its own gives; a group of pointwise convolutions
    /// alone, and values read outside such a group, stay (or are turned back) `[N, C, H, W]`.
    #[test]
    fn channels_last_chains_match_channels_first() {
        let mut b = GraphBuilder::new([3, 14, 14]);
        b.conv_with(
            "stem",
            Conv2dSpec::new(3, 16, 3).with_padding(1).with_bias(true),
        )
        .bn("stem.bn")
        .relu("stem.relu")
        .dwconv("dw1", 3, 1, 1)
        .bn("dw1.bn")
        .relu6("dw1.relu")
        .conv("pw1", 24, 1, 1, 0)
        // Read by the depthwise below and by a dense convolution.
        .bn("pw1.bn")
        .dwconv("dw2", 3, 2, 1)
        .bn("dw2.bn")
        .relu("dw2.relu")
        .conv("pw2", 24, 1, 1, 0)
        .bn("pw2.bn");
        b.at("pw1.bn").conv("side", 24, 3, 2, 1).bn("side.bn");
        b.add("sum", &["pw2.bn", "side.bn"])
            .relu("sum.relu")
            .dwconv("dw3", 5, 1, 2)
            .bn("dw3.bn")
            .conv_with("pw3", Conv2dSpec::new(24, 8, 1).with_bias(true))
            .relu("pw3.relu")
            .global_avg_pool("gap")
            .linear("fc", 4);
        // A pointwise convolution with no depthwise one in its group.
        b.at("side.bn")
            .conv("lone", 24, 1, 1, 0)
            .bn("lone.bn")
            .relu("lone.relu")
            .global_avg_pool("gap2");
        let mut g = b.build().unwrap();
        g.set_outputs(&["fc", "gap2"]).unwrap();
        let dev = Device::Cpu;
        let m = Model::init(g, 3, &dev).unwrap();
        let bns = [
            "stem.bn", "dw1.bn", "pw1.bn", "dw2.bn", "pw2.bn", "side.bn", "dw3.bn",
        ];
        unusual_batch_norms(&m, &bns);
        let uses = m.graph.use_counts();
        let fusions = m.fusions(&uses, &[]);
        let cl: Vec<&str> = m
            .channels_last(&fusions, &[])
            .iter()
            .enumerate()
            .filter(|(_, &cl)| cl)
            .map(|(id, _)| m.graph.node(id).name.as_str())
            .collect();
        assert_eq!(
            cl,
            ["dw1", "pw1", "dw2", "pw2", "sum", "sum.relu", "dw3", "pw3"]
        );
        let close = |a: &Tensor, b: &Tensor, what: &str| assert_close(a, b, 2e-5, what);
        let x = Tensor::randn(0f32, 1.0, (5, 3, 14, 14), &dev).unwrap();
        let run = |channels_first: bool| {
            let opts = ForwardOptions {
                channels_first,
                ..Default::default()
            };
            m.forward_with(std::slice::from_ref(&x), Mode::Eval, opts)
                .unwrap()
                .outputs
        };
        let mut nothing = |_: &str, _: &Tensor| Ok(());
        let alone = m
            .forward_with(
                std::slice::from_ref(&x),
                Mode::Eval,
                ForwardOptions::default().with_observer(&mut nothing),
            )
            .unwrap()
            .outputs;
        let (last, first) = (run(false), run(true));
        assert_eq!(last.len(), 2);
        for o in 0..2 {
            close(&last[o], &first[o], &format!("output {o}"));
            close(&last[o], &alone[o], &format!("output {o} node by node"));
        }
        // MobileNetV1 at 32x32: its layers down to 8x8 planes, not the smaller ones.
        let m1 = crate::zoo::model(
            "mobilenet_v1",
            &crate::zoo::ZooConfig::new([3, 32, 32]),
            0,
            &dev,
        )
        .unwrap();
        let fusions = m1.fusions(&m1.graph.use_counts(), &[]);
        let cl = m1.channels_last(&fusions, &[]);
        let planes: Vec<(usize, bool)> = (0..m1.graph.len())
            .filter(|&id| matches!(m1.graph.node(id).op, Op::Conv2d(_)))
            .map(|id| {
                let shape = &m1.graph.node(id).shape;
                (shape[1] * shape[2], cl[id])
            })
            .collect();
        assert!(planes.iter().any(|&(_, cl)| cl));
        for (i, &(plane, cl)) in planes.iter().enumerate().skip(1) {
            assert_eq!(cl, plane >= CHANNELS_LAST_PLANE, "convolution {i}: {plane}");
        }
        // Zoo networks, in pieces of the batch: MobileNetV2's residual sums included.
        for (name, input) in [
            ("mobilenet_tiny", [1, 28, 28]),
            ("mobilenet_v2", [3, 32, 32]),
        ] {
            let m = crate::zoo::model(name, &crate::zoo::ZooConfig::new(input), 0, &dev).unwrap();
            let x = Tensor::randn(0f32, 1.0, (40, input[0], input[1], input[2]), &dev).unwrap();
            let run = |channels_first: bool| {
                let opts = ForwardOptions {
                    channels_first,
                    ..Default::default()
                };
                let out = m.forward_with(std::slice::from_ref(&x), Mode::Eval, opts);
                out.unwrap().outputs.remove(0)
            };
            close(&run(false), &run(true), name);
        }
    }

    /// A prepared evaluation gives the forward's own outputs, in pieces or whole, and is a
    /// snapshot of the parameters it was made with; it is refused for another model and left
    /// aside by a forward it does not serve (taps).
    #[test]
    fn a_prepared_evaluation_is_the_forward_made_once() {
        let dev = Device::Cpu;
        let m = crate::zoo::model(
            "mobilenet_tiny",
            &crate::zoo::ZooConfig::new([1, 28, 28]),
            0,
            &dev,
        )
        .unwrap();
        unusual_batch_norms(&m, &["stem.bn", "block2.dw.bn", "block3.pw.bn"]);
        let prepared = m.prepare_eval(false).unwrap();
        let with = |x: &Tensor, opts: ForwardOptions| {
            m.forward_with(std::slice::from_ref(x), Mode::Eval, opts)
                .unwrap()
                .outputs
                .remove(0)
        };
        for n in [1, 40] {
            let x = Tensor::randn(0f32, 1.0, (n, 1, 28, 28), &dev).unwrap();
            let own = m.forward(&x, Mode::Eval).unwrap();
            let opts = ForwardOptions {
                prepared: Some(&prepared),
                ..Default::default()
            };
            assert_close(&with(&x, opts), &own, 0.0, &format!("batch {n}"));
        }
        // Taps: the forward prepares its own (the tapped value is left as it is, so the chain
        // around it runs in [N, C, H, W] rather than channels-last: the same sums in another
        // order, equal to the bit with the AVX-512 kernels, within float rounding with the AVX2
        // ones, which `SLIM_CPU=avx2` runs on any machine).
        let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &dev).unwrap();
        let opts = ForwardOptions {
            prepared: Some(&prepared),
            ..Default::default()
        }
        .with_taps(&["block1.dw.bn"]);
        let tapped = m
            .forward_with(std::slice::from_ref(&x), Mode::Eval, opts)
            .unwrap();
        assert_close(
            &tapped.outputs[0],
            &m.forward(&x, Mode::Eval).unwrap(),
            1e-5,
            "with a tap",
        );
        // A snapshot: after a convolution's weights change, it still computes with the old
        // ones.
        let before = m.forward(&x, Mode::Eval).unwrap();
        let w = m.params.tensor("block4.pw.conv.weight").unwrap();
        m.params
            .set("block4.pw.conv.weight", &(w * 2.0).unwrap())
            .unwrap();
        let opts = ForwardOptions {
            prepared: Some(&prepared),
            ..Default::default()
        };
        assert_close(&with(&x, opts), &before, 0.0, "snapshot");
        let after = m.forward(&x, Mode::Eval).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(
            values(&after),
            values(&before),
            "the new weights count unprepared"
        );
        // Another model's preparation is refused.
        let other = crate::zoo::model(
            "mobilenet_tiny",
            &crate::zoo::ZooConfig::new([1, 28, 28]),
            0,
            &dev,
        )
        .unwrap();
        let opts = ForwardOptions {
            prepared: Some(&prepared),
            ..Default::default()
        };
        let e = other
            .forward_with(std::slice::from_ref(&x), Mode::Eval, opts)
            .unwrap_err();
        assert!(e.to_string().contains("another model"), "{e}");
    }

    /// In training a batch norm runs the ReLU or ReLU6 that alone reads it; the values, the
    /// gradients of every parameter and the running statistics are bit for bit those of the
    /// same step with an observer, which runs every node on its own.
    #[test]
    fn training_batch_norm_with_its_activation_matches_node_by_node() {
        let mut b = GraphBuilder::new([3, 9, 9]);
        b.conv("stem", 8, 3, 1, 1)
            .bn("stem.bn")
            .relu("stem.relu")
            .dwconv("dw", 3, 2, 1)
            .bn("dw.bn")
            .relu6("dw.relu")
            // A batch norm read twice keeps its value; the ReLU after it runs alone.
            .conv("pw", 12, 1, 1, 0)
            .bn("pw.bn")
            .relu("pw.relu");
        b.add("sum", &["pw.bn", "pw.relu"])
            .global_avg_pool("gap")
            .linear("fc", 4);
        let g = b.build().unwrap();
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (5, 3, 9, 9), &dev).unwrap();
        let step = |observe: bool| {
            let m = Model::init(g.clone(), 3, &dev).unwrap();
            let mut nothing = |_: &str, _: &Tensor| Ok(());
            let opts = if observe {
                ForwardOptions::default().with_observer(&mut nothing)
            } else {
                ForwardOptions::default()
            };
            let y = m
                .forward_with(std::slice::from_ref(&x), Mode::Train, opts)
                .unwrap()
                .outputs
                .remove(0);
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut seen: Vec<(String, Vec<f32>)> =
                vec![("output".into(), y.flatten_all().unwrap().to_vec1().unwrap())];
            for (name, p) in m.params.iter().filter(|(_, p)| p.kind.is_trainable()) {
                let g = grads
                    .get(p.var.as_tensor())
                    .expect("a gradient for every parameter");
                seen.push((name.into(), g.flatten_all().unwrap().to_vec1().unwrap()));
            }
            for name in ["stem.bn.running_var", "dw.bn.running_mean"] {
                let t = m.params.tensor(name).unwrap();
                seen.push((name.into(), t.to_vec1().unwrap()));
            }
            (m, seen)
        };
        let (m, fused) = step(false);
        let (_, reference) = step(true);
        assert_eq!(fused, reference);
        let uses = m.graph.use_counts();
        let clips: Vec<(String, String, f32)> = m
            .bn_clips(&uses, &[])
            .iter()
            .enumerate()
            .filter_map(|(bn, c)| c.map(|(act, max)| (bn, act, max)))
            .map(|(bn, act, max)| {
                let name = |i: usize| m.graph.node(i).name.clone();
                (name(bn), name(act), max)
            })
            .collect();
        assert_eq!(
            clips,
            vec![
                ("stem.bn".into(), "stem.relu".into(), f32::INFINITY),
                ("dw.bn".into(), "dw.relu".into(), 6.0),
            ]
        );
    }

    /// A large evaluation batch runs in pieces of the batch, and gives what the whole batch
    /// gives when it runs whole (a tap keeps it whole); a small one, a training forward and
    /// an observed one run whole; a wrong input shape is still named.
    #[test]
    fn a_large_evaluation_batch_runs_in_pieces_with_the_same_result() {
        let dev = Device::Cpu;
        let cfg = crate::zoo::ZooConfig::new([1, 28, 28]);
        let m = crate::zoo::model("mobilenet_tiny", &cfg, 5, &dev).unwrap();
        // 40 samples: pieces of 16, 16 and 8.
        let x = Tensor::randn(0f32, 1.0, (40, 1, 28, 28), &dev).unwrap();
        let opts = ForwardOptions::default;
        let pieces = m.chunk_size(std::slice::from_ref(&x), Mode::Eval, &opts());
        if rayon::current_num_threads() > 1 {
            assert_eq!(pieces, Some(16));
        }
        let small = x.narrow(0, 0, 8).unwrap();
        assert_eq!(m.chunk_size(&[small], Mode::Eval, &opts()), None);
        assert_eq!(
            m.chunk_size(std::slice::from_ref(&x), Mode::Train, &opts()),
            None
        );
        let whole = ForwardOptions {
            whole: true,
            ..opts()
        };
        assert_eq!(
            m.chunk_size(std::slice::from_ref(&x), Mode::Eval, &whole),
            None
        );
        let tapped = opts().with_taps(&["fc"]);
        assert_eq!(
            m.chunk_size(std::slice::from_ref(&x), Mode::Eval, &tapped),
            None
        );
        let mut nothing = |_: &str, _: &Tensor| Ok(());
        let observed = opts().with_observer(&mut nothing);
        assert_eq!(
            m.chunk_size(std::slice::from_ref(&x), Mode::Eval, &observed),
            None
        );

        let in_pieces = m.forward(&x, Mode::Eval).unwrap();
        let whole = m
            .forward_with(
                std::slice::from_ref(&x),
                Mode::Eval,
                opts().with_taps(&["fc"]),
            )
            .unwrap();
        assert_eq!(in_pieces.dims(), &[40, 10]);
        let a = in_pieces.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = whole.outputs[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            assert!((p - q).abs() <= 1e-5 * scale, "output[{i}]: {p} vs {q}");
        }
        let wrong = Tensor::zeros((40, 1, 28, 27), DType::F32, &dev).unwrap();
        let err = m.forward(&wrong, Mode::Eval).unwrap_err().to_string();
        assert!(
            err.contains("input") && err.contains("[40, 1, 28, 27]"),
            "{err}"
        );
    }

    #[test]
    fn taps_and_observer() {
        let g = GraphBuilder::new([1, 4, 4])
            .conv("c", 2, 3, 1, 1)
            .relu("r")
            .flatten("f")
            .build()
            .unwrap();
        let m = Model::init(g, 0, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 4, 4), &Device::Cpu).unwrap();
        let mut seen = Vec::new();
        let mut obs = |name: &str, t: &Tensor| {
            seen.push((name.to_string(), t.dims().to_vec()));
            Ok(())
        };
        let out = m
            .forward_with(
                &[x],
                Mode::Eval,
                ForwardOptions::default()
                    .with_taps(&["c"])
                    .with_observer(&mut obs),
            )
            .unwrap();
        assert_eq!(out.taps["c"].dims(), &[2, 2, 4, 4]);
        assert_eq!(out.outputs[0].dims(), &[2, 32]);
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3], ("f".to_string(), vec![2, 32]));
    }

    #[test]
    fn dropout_is_inverted_seeded_and_off_in_eval() {
        let x = Tensor::ones((4, 1000), DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.3, Some(1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = dropout(&x, 0.3, Some(1))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.3).abs() < 0.03, "{zeros}");
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.05, "{mean}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
        let g = GraphBuilder::new([8]).dropout("d", 0.5).build().unwrap();
        let m = Model::init(g, 0, &Device::Cpu).unwrap();
        let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            m.forward(&x, Mode::Eval).unwrap().to_vec2::<f32>().unwrap(),
            x.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn bad_input_shape_names_the_input() {
        let g = GraphBuilder::new([1, 4, 4]).relu("r").build().unwrap();
        let m = Model::init(g, 0, &Device::Cpu).unwrap();
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let e = m.forward(&x, Mode::Eval).unwrap_err().to_string();
        assert!(e.contains("`input`"), "{e}");
    }
}
