//! # slim-latency
//!
//! Per-device latency tables: build one by timing a model's ops on this machine, estimate the
//! latency of a model that was never run from it, and check estimates against measurements.
//!
//! - A [`Table`] is a JSON file: the device and runtime it was measured on (CPU, threads,
//!   batch, f32 or int8, versions, date) and one [`Entry`] per op [`Signature`] (kind, shapes,
//!   kernel, stride, padding, groups, dtype) with the median and spread of its time.
//! - [`build`] runs each given model with a timer between its ops (after warm-up runs), so
//!   every op is timed where it really runs: after the op that produced its input, with the
//!   caches as they are in a whole forward. Each signature's median is over every run and
//!   every place it occurs. The forward's own bookkeeping is measured too (whole time minus
//!   the ops), per node of the graph.
//! - [`estimate`] sums the table's medians over a graph's ops; an op whose signature the table
//!   lacks is an error listing every such signature, unless the fallback is asked for (a line
//!   fitted on the work of the table's ops of the same kind), which the estimate then reports.
//! - [`validate`] compares estimated and measured whole-model latency.
//! - [`LatencyCost`] is the table as a [`CostModel`], for searches under a latency limit.
//!
//! This crate depends on `slim-core` alone: the int8 runtime comes in as
//! [`slim_core::exec::NodeKernels`] from whoever calls it (the `slim` binary passes Slim's).
//!
//! ```
//! use slim_core::{zoo, Model};
//! use slim_latency::{build, estimate, BuildOptions, DeviceInfo, Runtime, Subject, Table};
//! let dev = candle_core::Device::Cpu;
//! let m = zoo::model("lenet", &zoo::ZooConfig::new([1, 28, 28]), 0, &dev).unwrap();
//! let table = Table::new(DeviceInfo::this_machine(Runtime::F32, 1, 1));
//! let opts = BuildOptions { runs: 3, warmup: 1, warmup_ms: 0.0 };
//! let subjects = [Subject { name: "lenet".into(), model: &m }];
//! let (table, _) = build(table, &subjects, None, &opts, &mut |_| {}).unwrap();
//! let e = estimate(&table, &m, false).unwrap();
//! assert!(e.total_ms > 0.0 && e.fallback.is_empty());
//! ```
#![forbid(unsafe_code)]

pub mod table;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, D};
use serde::Serialize;
use slim_core::exec::NodeKernels;
use slim_core::search::CostModel;
use slim_core::{ForwardOptions, Graph, Mode, Model, Node, Op};

pub use table::{DeviceInfo, Entry, ModelTiming, Runtime, Signature, Table};

/// The error type of `slim-latency`.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
    /// A table file that cannot be used.
    #[error("the latency table {path}: {msg}")]
    Table { path: PathBuf, msg: String },
    /// Ops the table has no time for.
    #[error("the table has no time for {} op signature(s) of `{model}`:\n  {}\nadd them to the table (`slim latency build --model ...`, or `--space NAME` for a search space's candidates), or ask for the fallback fit (--fallback)", missing.len(), missing.join("\n  "))]
    Missing { model: String, missing: Vec<String> },
    /// A request that cannot be honoured.
    #[error("{0}")]
    Invalid(String),
}

impl LatencyError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            LatencyError::Core(c) => c.is_input(),
            _ => true,
        }
    }
}

impl From<candle_core::Error> for LatencyError {
    fn from(e: candle_core::Error) -> Self {
        LatencyError::Core(e.into())
    }
}

/// The result type of `slim-latency`.
pub type Result<T, E = LatencyError> = std::result::Result<T, E>;

/// How many times to run each model.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct BuildOptions {
    /// Timed runs of each model (each op's median is over these and its occurrences).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = BuildOptions::default().runs))]
    pub runs: usize,
    /// Untimed runs first (caches, allocator, lazily built state, the CPU's clock)...
    #[cfg_attr(feature = "clap", arg(long, default_value_t = BuildOptions::default().warmup))]
    pub warmup: usize,
    /// ...lasting at least this many milliseconds in all: a few runs of a small model are
    /// over before the machine has settled.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = BuildOptions::default().warmup_ms))]
    pub warmup_ms: f64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            runs: 20,
            warmup: 3,
            warmup_ms: 300.0,
        }
    }
}

impl BuildOptions {
    fn check(&self) -> Result<()> {
        if self.runs == 0 {
            return Err(LatencyError::Invalid("--runs must be at least 1".into()));
        }
        if !(0.0..=600_000.0).contains(&self.warmup_ms) {
            return Err(LatencyError::Invalid(format!(
                "--warmup-ms must be in 0..=600000, not {}",
                self.warmup_ms
            )));
        }
        Ok(())
    }
}

/// A model to time, with the name reports give it.
pub struct Subject<'a> {
    pub name: String,
    pub model: &'a Model,
}

/// Where a long run is.
#[derive(Clone, Debug)]
pub struct TimingProgress {
    pub model: String,
    pub done: usize,
    pub total: usize,
}

/// Whether the int8 runtime computes `node` in integers: a convolution or linear layer whose
/// weight the model holds as int8 and whose input is fake-quantized.
pub fn runs_in_int8(model: &Model, node: &Node) -> bool {
    model.int8.contains_key(&node.param_name("weight")) && reads_quantized(&model.graph, node)
}

fn reads_quantized(graph: &Graph, node: &Node) -> bool {
    matches!(node.op, Op::Conv2d(_) | Op::Linear(_))
        && node
            .inputs
            .first()
            .is_some_and(|&i| matches!(graph.node(i).op, Op::FakeQuant(_)))
}

/// Refuses a model the runtime cannot run as asked.
fn check_model(name: &str, model: &Model, runtime: Runtime) -> Result<()> {
    let int8 = model.graph.nodes().iter().any(|n| runs_in_int8(model, n));
    match (runtime, int8) {
        (Runtime::Int8, false) => Err(LatencyError::Invalid(format!(
            "`{name}` has no int8 layers; quantize it first (`slim quant ptq`), or use the f32 runtime"
        ))),
        (Runtime::F32, true) => Err(LatencyError::Invalid(format!(
            "`{name}` is an int8 model; time it on the int8 runtime (--runtime int8)"
        ))),
        _ => Ok(()),
    }
}

fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| LatencyError::Invalid(format!("cannot start {threads} thread(s): {e}")))?;
    pool.install(f)
}

fn median_and_quartiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let pos = q * (v.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
    };
    (at(0.5), at(0.25), at(0.75))
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.duration_since(from).as_secs_f64() * 1e3
}

/// Runs of one model: every op's time per run (in evaluation order, inputs left out), and the
/// whole forward's time in runs without the timer between ops.
struct Timings {
    ops: Vec<(usize, Vec<f64>)>,
    whole: Vec<f64>,
}

fn time_model(
    model: &Model,
    kernels: Option<&dyn NodeKernels>,
    batch: usize,
    opts: &BuildOptions,
    profile: bool,
    mut tick: impl FnMut(),
) -> Result<Timings> {
    // Kernels that prepare per model (the int8 runtime packs its weights) are timed prepared,
    // as a deployed model runs.
    let prepared = kernels.and_then(|k| k.prepare(model));
    let kernels: Option<&dyn NodeKernels> = prepared.as_deref().or(kernels);
    // The f32 forward likewise: its batch norms folded and weights laid out once.
    let eval = match kernels {
        None => Some(model.prepare_eval(false)?),
        Some(_) => None,
    };
    let mut shape = vec![batch];
    shape.extend(model.input_shape());
    let x = Tensor::randn(0f32, 1f32, shape, &model.device())?;
    let order: Vec<usize> = model.graph.eval_order().collect();
    let mut ops: Vec<(usize, Vec<f64>)> = order
        .iter()
        .filter(|&&id| !matches!(model.graph.node(id).op, Op::Input { .. }))
        .map(|&id| (id, Vec::with_capacity(opts.runs)))
        .collect();
    let plain = |x: &Tensor| -> Result<f64> {
        let start = Instant::now();
        let out = model.forward_with(
            std::slice::from_ref(x),
            Mode::Eval,
            ForwardOptions {
                kernels,
                prepared: eval.as_ref(),
                ..Default::default()
            },
        )?;
        // The outputs are computed eagerly; reading one value makes sure.
        out.outputs[0].max_keepdim(D::Minus1)?;
        Ok(ms(start, Instant::now()))
    };
    let warm = Instant::now();
    let mut warmed = 0;
    while warmed < opts.warmup || ms(warm, Instant::now()) < opts.warmup_ms {
        plain(&x)?;
        warmed += 1;
    }
    let mut whole = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs {
        if profile {
            let mut stamps: Vec<Instant> = Vec::with_capacity(order.len());
            let start = Instant::now();
            {
                // Told as each node is done, which keeps evaluation's fused chains (a
                // convolution's time includes its batch norm and activation).
                let mut observe = |_: &str| stamps.push(Instant::now());
                model.forward_with(
                    std::slice::from_ref(&x),
                    Mode::Eval,
                    ForwardOptions {
                        kernels,
                        finished: Some(&mut observe),
                        prepared: eval.as_ref(),
                        ..Default::default()
                    },
                )?;
            }
            let mut k = 0;
            for (i, &id) in order.iter().enumerate() {
                if matches!(model.graph.node(id).op, Op::Input { .. }) {
                    continue;
                }
                let before = if i == 0 { start } else { stamps[i - 1] };
                ops[k].1.push(ms(before, stamps[i]));
                k += 1;
            }
        }
        // Interleaved with the timed-op runs, so that both see the same machine.
        whole.push(plain(&x)?);
        tick();
    }
    Ok(Timings { ops, whole })
}

/// What a build did.
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    /// Signatures new to the table.
    pub added: usize,
    /// Signatures the table had, measured again.
    pub remeasured: usize,
    pub seconds: f64,
}

/// The ops' timings as the table's entries, replacing those of the same signature; how many
/// were added and how many measured again.
fn merge_samples(table: &mut Table, samples: BTreeMap<Signature, Vec<f64>>) -> (usize, usize) {
    let (mut added, mut remeasured) = (0, 0);
    for (sig, mut v) in samples {
        let (median_ms, p25_ms, p75_ms) = median_and_quartiles(&mut v);
        let entry = Entry {
            signature: sig,
            median_ms,
            p25_ms,
            p75_ms,
            samples: v.len(),
        };
        match table
            .entries
            .iter_mut()
            .find(|e| e.signature == entry.signature)
        {
            Some(old) => {
                *old = entry;
                remeasured += 1;
            }
            None => {
                table.entries.push(entry);
                added += 1;
            }
        }
    }
    table.entries.sort_by(|a, b| a.signature.cmp(&b.signature));
    (added, remeasured)
}

/// Times every op of every subject on this machine (the table's threads and batch, its
/// runtime: `kernels` must be the int8 runtime's for an int8 table) and adds their signatures
/// to `table`; signatures it had are measured again.
pub fn build(
    mut table: Table,
    subjects: &[Subject<'_>],
    kernels: Option<&dyn NodeKernels>,
    opts: &BuildOptions,
    progress: &mut (dyn FnMut(&TimingProgress) + Send),
) -> Result<(Table, BuildReport)> {
    let started = Instant::now();
    opts.check()?;
    if subjects.is_empty() {
        return Err(LatencyError::Invalid(
            "give at least one model to time".into(),
        ));
    }
    let runtime = table.device.runtime;
    if runtime == Runtime::Int8 && kernels.is_none() {
        return Err(LatencyError::Invalid(
            "an int8 table needs the int8 runtime's kernels".into(),
        ));
    }
    for s in subjects {
        check_model(&s.name, s.model, runtime)?;
    }
    let (batch, threads) = (table.device.batch, table.device.threads);
    let int8 = runtime == Runtime::Int8;
    let mut samples: BTreeMap<Signature, Vec<f64>> = BTreeMap::new();
    let mut wholes = Vec::new();
    with_threads(threads, || {
        for s in subjects {
            let mut done = 0;
            let total = opts.runs;
            let t = time_model(s.model, kernels, batch, opts, true, || {
                done += 1;
                progress(&TimingProgress {
                    model: s.name.clone(),
                    done,
                    total,
                });
            })?;
            let g = &s.model.graph;
            let mut sigs = Vec::new();
            for (id, times) in t.ops {
                let node = g.node(id);
                let sig = Signature::of(g, node, int8 && runs_in_int8(s.model, node));
                sigs.push(sig.clone());
                samples.entry(sig).or_default().extend(times);
            }
            let mut whole = t.whole;
            wholes.push((
                s.name.clone(),
                g.len(),
                median_and_quartiles(&mut whole).0,
                sigs,
            ));
        }
        Ok(())
    })?;
    let (added, remeasured) = merge_samples(&mut table, samples);
    let lookup: BTreeMap<Signature, f64> = table
        .entries
        .iter()
        .map(|e| (e.signature.clone(), e.median_ms))
        .collect();
    for (name, nodes, measured_ms, sigs) in wholes {
        let ops_ms = sigs.iter().map(|s| lookup[s]).sum();
        table.models.retain(|m| m.name != name);
        table.models.push(ModelTiming {
            name,
            nodes,
            measured_ms,
            ops_ms,
        });
    }
    let mut per_node: Vec<f64> = table
        .models
        .iter()
        .map(|m| ((m.measured_ms - m.ops_ms) / m.nodes.max(1) as f64).max(0.0))
        .collect();
    table.overhead_per_node_ms = median_and_quartiles(&mut per_node).0;
    Ok((
        table,
        BuildReport {
            added,
            remeasured,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

/// One op of an estimate.
#[derive(Clone, Debug, Serialize)]
pub struct OpEstimate {
    pub node: String,
    pub signature: String,
    pub ms: f64,
    /// Estimated by the fallback fit, not found in the table.
    pub fallback: bool,
}

/// A model's estimated latency.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub total_ms: f64,
    /// The sum over the ops.
    pub ops_ms: f64,
    /// The forward's own cost (the table's per-node overhead times the nodes).
    pub overhead_ms: f64,
    pub ops: Vec<OpEstimate>,
    /// Signatures the table lacks, estimated by the fallback fit (empty without fallback).
    pub fallback: Vec<String>,
}

/// Estimates a graph's latency from the table; `int8` tells which nodes the runtime computes
/// in integers. Without `fallback`, every op must be in the table.
impl Estimate {
    /// The estimate in words for `model` on `device`, with the signatures the fallback fit
    /// priced.
    pub fn describe(&self, model: &str, device: &str) -> String {
        let mut s = format!(
            "{model}: {:.3} ms on {device} ({:.3} ms in {} ops, {:.3} ms forward overhead)\n",
            self.total_ms,
            self.ops_ms,
            self.ops.len(),
            self.overhead_ms
        );
        if !self.fallback.is_empty() {
            s += &format!(
                "estimated by the fallback fit ({} signature(s) not in the table):\n",
                self.fallback.len()
            );
            for f in &self.fallback {
                s += &format!("  {f}\n");
            }
        }
        s
    }
}

pub fn estimate_graph(
    table: &Table,
    name: &str,
    graph: &Graph,
    int8: &dyn Fn(&Node) -> bool,
    fallback: bool,
) -> Result<Estimate> {
    let lookup = table.lookup();
    let fits = if fallback {
        table.fits()
    } else {
        BTreeMap::new()
    };
    let mut ops = Vec::new();
    let mut missing = Vec::new();
    let mut fell_back = Vec::new();
    for node in graph.nodes() {
        if matches!(node.op, Op::Input { .. }) {
            continue;
        }
        let sig = Signature::of(graph, node, int8(node));
        let (ms, fb) = match lookup.get(&sig) {
            Some(e) => (e.median_ms, false),
            None => match Table::fallback(&fits, &sig) {
                Some(v) if fallback => (v, true),
                _ => {
                    if !missing.contains(&sig.to_string()) {
                        missing.push(sig.to_string());
                    }
                    continue;
                }
            },
        };
        if fb && !fell_back.contains(&sig.to_string()) {
            fell_back.push(sig.to_string());
        }
        ops.push(OpEstimate {
            node: node.name.clone(),
            signature: sig.to_string(),
            ms,
            fallback: fb,
        });
    }
    if !missing.is_empty() {
        return Err(LatencyError::Missing {
            model: name.to_string(),
            missing,
        });
    }
    let ops_ms: f64 = ops.iter().map(|o| o.ms).sum();
    let overhead_ms = table.overhead_per_node_ms * graph.len() as f64;
    Ok(Estimate {
        total_ms: ops_ms + overhead_ms,
        ops_ms,
        overhead_ms,
        ops,
        fallback: fell_back,
    })
}

/// Estimates a model's latency on the table's runtime (an int8 table wants an int8 model, an
/// f32 table a float one).
pub fn estimate(table: &Table, model: &Model, fallback: bool) -> Result<Estimate> {
    estimate_named(table, "the model", model, fallback)
}

fn estimate_named(table: &Table, name: &str, model: &Model, fallback: bool) -> Result<Estimate> {
    let runtime = table.device.runtime;
    check_model(name, model, runtime)?;
    let int8 = |n: &Node| runtime == Runtime::Int8 && runs_in_int8(model, n);
    estimate_graph(table, name, &model.graph, &int8, fallback)
}

/// One model of a validation.
#[derive(Clone, Debug, Serialize)]
pub struct ValidationRow {
    pub model: String,
    pub estimated_ms: f64,
    pub measured_ms: f64,
    /// (estimated - measured) / measured.
    pub error: f64,
    /// Ops estimated by the fallback fit.
    pub fallback_ops: usize,
}

/// Estimated against measured latency for several models.
#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    pub models: Vec<ValidationRow>,
    /// The mean absolute percentage error, as a fraction.
    pub mape: f64,
}

/// Estimates every subject from the table, then measures it (median of `opts.runs` after
/// `opts.warmup`), with the table's threads and batch.
impl Validation {
    /// A markdown table of the models' estimated and measured times, then the mean error.
    pub fn table(&self) -> String {
        let mut t =
            "| model | estimated ms | measured ms | error |\n|---|---|---|---|\n".to_string();
        for m in &self.models {
            let fb = if m.fallback_ops > 0 {
                format!(" ({} ops by fallback)", m.fallback_ops)
            } else {
                String::new()
            };
            t += &format!(
                "| {} | {:.3} | {:.3} | {:+.1}%{fb} |\n",
                m.model,
                m.estimated_ms,
                m.measured_ms,
                m.error * 100.0
            );
        }
        t + &format!(
            "mean absolute percentage error: {:.1}%\n",
            self.mape * 100.0
        )
    }
}

pub fn validate(
    table: &Table,
    subjects: &[Subject<'_>],
    kernels: Option<&dyn NodeKernels>,
    opts: &BuildOptions,
    fallback: bool,
    progress: &mut (dyn FnMut(&TimingProgress) + Send),
) -> Result<Validation> {
    opts.check()?;
    if subjects.is_empty() {
        return Err(LatencyError::Invalid(
            "give at least one model to validate".into(),
        ));
    }
    if table.device.runtime == Runtime::Int8 && kernels.is_none() {
        return Err(LatencyError::Invalid(
            "an int8 table needs the int8 runtime's kernels".into(),
        ));
    }
    // Every estimate first: a missing op stops the run before any time is spent.
    let estimates = subjects
        .iter()
        .map(|s| estimate_named(table, &s.name, s.model, fallback))
        .collect::<Result<Vec<_>>>()?;
    let mut models = Vec::new();
    with_threads(table.device.threads, || {
        for (s, e) in subjects.iter().zip(&estimates) {
            let mut done = 0;
            let t = time_model(s.model, kernels, table.device.batch, opts, false, || {
                done += 1;
                progress(&TimingProgress {
                    model: s.name.clone(),
                    done,
                    total: opts.runs,
                });
            })?;
            let mut whole = t.whole;
            let measured_ms = median_and_quartiles(&mut whole).0;
            models.push(ValidationRow {
                model: s.name.clone(),
                estimated_ms: e.total_ms,
                measured_ms,
                error: (e.total_ms - measured_ms) / measured_ms,
                fallback_ops: e.ops.iter().filter(|o| o.fallback).count(),
            });
        }
        Ok(())
    })?;
    let mape = models.iter().map(|m| m.error.abs()).sum::<f64>() / models.len() as f64;
    Ok(Validation { models, mape })
}

/// One whole-model timing: a batch size and thread count, and milliseconds per forward.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRun {
    pub batch: usize,
    pub threads: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub images_per_sec: f64,
}

impl BenchRun {
    /// Runs as a table: batch, threads, median, fastest and slowest ms, images per second.
    pub fn table(runs: &[BenchRun]) -> String {
        let rows: Vec<Vec<String>> = runs
            .iter()
            .map(|r| {
                let ms = |v: f64| format!("{v:.3}");
                let (b, t) = (r.batch.to_string(), r.threads.to_string());
                vec![
                    b,
                    t,
                    ms(r.median_ms),
                    ms(r.min_ms),
                    ms(r.max_ms),
                    format!("{:.1}", r.images_per_sec),
                ]
            })
            .collect();
        let header = [
            "batch",
            "threads",
            "median ms",
            "min ms",
            "max ms",
            "images/s",
        ];
        slim_core::plot::table(&header, &rows)
    }
}

/// The most memory this process has held, from the kernel's count (Linux; `None` elsewhere).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Times whole forwards of `model` on random inputs: `opts.runs` of them after the warm-up,
/// with `threads` threads and `batch` images each, on the f32 runtime (its batch norms
/// folded and weights laid out once) or on `kernels` (prepared once, as a deployed model
/// runs).
pub fn bench(
    model: &Model,
    kernels: Option<&dyn NodeKernels>,
    batch: usize,
    threads: usize,
    opts: &BuildOptions,
) -> Result<BenchRun> {
    opts.check()?;
    if batch == 0 || threads == 0 {
        return Err(LatencyError::Invalid(format!(
            "the batch size and thread count must be at least 1 (batch {batch}, {threads} thread(s))"
        )));
    }
    let mut t = with_threads(threads, || {
        time_model(model, kernels, batch, opts, false, || {})
    })?;
    let (median_ms, _, _) = median_and_quartiles(&mut t.whole);
    Ok(BenchRun {
        batch,
        threads,
        median_ms,
        min_ms: t.whole[0],
        max_ms: t.whole[t.whole.len() - 1],
        images_per_sec: batch as f64 * 1e3 / median_ms,
    })
}

/// A latency table as a search's cost: estimated milliseconds of a graph. For an int8 table,
/// every convolution and linear layer that reads a fake-quantized input counts as int8.
pub struct LatencyCost {
    pub table: Table,
    /// Estimate ops the table lacks with the fallback fit rather than failing.
    pub fallback: bool,
}

impl LatencyCost {
    /// The f32 latency table at `path` (a search's candidates are float graphs) as a cost.
    pub fn load(path: &std::path::Path, fallback: bool) -> Result<LatencyCost> {
        let table = Table::load(path)?;
        table.check(path, Runtime::F32)?;
        Ok(LatencyCost { table, fallback })
    }
}

impl CostModel for LatencyCost {
    fn unit(&self) -> String {
        format!("ms on {}", self.table.device.describe())
    }
    fn key(&self) -> String {
        // Another table, or the fallback switched, prices candidates differently.
        let mut h = slim_core::model::Fnv::new();
        h.write(
            serde_json::to_string(&self.table)
                .unwrap_or_default()
                .as_bytes(),
        );
        format!(
            "{} table {:016x}{}",
            self.unit(),
            h.finish(),
            if self.fallback { " with fallback" } else { "" }
        )
    }
    fn cost(&self, graph: &Graph) -> slim_core::Result<f64> {
        let int8 = self.table.device.runtime == Runtime::Int8;
        let is_int8 = |n: &Node| int8 && reads_quantized(graph, n);
        estimate_graph(&self.table, "the candidate", graph, &is_int8, self.fallback)
            .map(|e| e.total_ms)
            .map_err(|e| match e {
                LatencyError::Core(c) => c,
                other => slim_core::CoreError::Invalid(other.to_string()),
            })
    }
}
