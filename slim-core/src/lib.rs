//! # slim-core
//!
//! The foundation of Slim, a model-compression toolkit over [candle] tensors. Every method
//! crate (`slim-prune`, `slim-quant`, `slim-distill`, `slim-nas`, `slim-latency`,
//! `slim-onnx`) depends on this crate alone; the `slim` binary combines them.
//!
//! - [`graph`]: the graph IR, a DAG of named nodes with shapes inferred at wiring time, and a
//!   fluent [`GraphBuilder`];
//! - [`params`]: parameters as candle `Var`s under stable dotted names;
//! - [`exec`]: forward in train or eval mode, with taps and observers;
//! - [`io`]: one `.safetensors` file per model, written atomically; [`npy`]: NumPy arrays in
//!   and out;
//! - [`finite`]: NaN and infinite values found in one pass and named, so that files,
//!   imports and calibration refuse them;
//! - [`analysis`]: multiply-accumulates, parameters and bytes per layer;
//! - [`deps`]: channel groups and the surgery that prunes them;
//! - [`zoo`]: LeNet, VGG, ResNet, MobileNet V1/V2;
//! - [`data`]: MNIST/Fashion-MNIST IDX and CIFAR-10 loaders, the bundled MNIST subset, batching;
//! - [`train`]: the one training loop (SGD, Adam, AdamW, schedules, checkpoints) and evaluation;
//! - [`pipeline`]: the `Strategy` trait that `slim compress` chains, and training as a strategy;
//! - [`transform`]: graph rewrites that keep the eval output (batch-norm folding);
//! - [`search`]: the simulated-annealing and evolutionary controllers that automatic pruning and
//!   architecture search share, with resumable histories, and the `Evaluator` and `CostModel`
//!   traits;
//! - [`kernels`]: the CPU convolution, batch-norm and pooling kernels, the `slim-kernels`
//!   crate re-exported (with [`cpu`], the instruction-set levels), where all of Slim's
//!   unsafe f32 code lives; this crate has none.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use slim_core::{analysis, deps, zoo, Mode};
//!
//! // A MobileNet for 28x28 digits, its cost, and half of every prunable channel group removed.
//! let model = zoo::model("mobilenet_tiny", &zoo::ZooConfig::new([1, 28, 28]), 0, &Device::Cpu)?;
//! let before = analysis::analyze(&model.graph).macs;
//! let groups = deps::channel_groups(&model.graph);
//! let plan: Vec<(usize, Vec<usize>)> =
//!     groups.prunable().map(|g| (g.id, (0..g.channels / 2).collect())).collect();
//! let pruned = groups.prune(&model, &plan)?;
//! let after = analysis::analyze(&pruned.graph).macs;
//! assert!(after < before / 2);
//! let x = Tensor::zeros((2, 1, 28, 28), candle_core::DType::F32, &Device::Cpu)?;
//! assert_eq!(pruned.forward(&x, Mode::Eval)?.dims(), &[2, 10]);
//! # Ok::<(), slim_core::CoreError>(())
//! ```
#![forbid(unsafe_code)]

pub mod analysis;
pub mod compare;
pub mod data;
pub mod deps;
pub mod error;
pub mod exec;
pub mod finite;
pub mod graph;
pub mod hash;
pub mod io;
pub mod model;
pub mod npy;
pub mod params;
pub mod pipeline;
pub mod plot;
pub mod reproduce;
pub mod search;
pub mod study;
pub mod train;
pub mod transform;
pub mod zoo;

pub use error::{CoreError, Result};
pub use exec::{ForwardOptions, ForwardOutput, Mode, PreparedEval};
pub use graph::{Conv2dSpec, Graph, GraphBuilder, LinearSpec, Node, Op, ParamKind, PoolSpec};
pub use model::Model;
pub use params::ParamStore;
pub use slim_kernels as kernels;
pub use slim_kernels::{cpu, note_skipped, with_target_feature};

/// Sets up candle's threads beside Slim's rayon pool; call it first thing in `main`, before
/// any other thread starts. Two things, each only where the user has not set the variable:
///
/// - Candle's elementwise operations run on the calling thread (`CANDLE_NUM_THREADS=1`).
///   Candle keeps a thread pool of its own for elementwise work on large tensors, beside the
///   rayon pool that runs Slim's kernels, and its idle workers spin before they sleep: on a
///   machine with few cores they take the cores from the next convolution (measured on 2
///   cores: int8 and f32 evaluation about 1.4x to 1.5x faster without it, a training step
///   about 1.15x).
/// - `RAYON_NUM_THREADS` is set to the available parallelism, which is what rayon uses when
///   it is unset, so Slim's pool does not change. Candle asks for its thread count at every
///   matrix product, and without the variable it counts the physical cores by reading
///   `/proc/cpuinfo`, every time: on a 2-core machine about two thirds of LeNet's f32
///   forward at batch 1 (0.12 ms, against 0.04 ms with the variable set).
///
/// And the calling thread becomes one of the rayon pool's threads (rayon's
/// `use_current_thread`; the pool keeps its size, with one thread fewer started), so that a
/// forward called from `main` runs its kernels' parallel loops where it is, instead of
/// handing the forward to a pool thread and sleeping until it is done (a wake-up on each
/// side, every forward: on 2 cores, LeNet's f32 forward at batch 64 went from 0.72-0.80 to
/// 0.67-0.69 ms in one sitting, within the noise in a noisier one). Only with two threads
/// or more: with one, the calling thread would be the pool's only thread, and parallel work
/// sent from another thread (the data loader's) while it waits outside rayon would never
/// run. If the pool was set up already, it stays as it is.
pub fn configure_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        if let Ok(n) = std::thread::available_parallelism() {
            std::env::set_var("RAYON_NUM_THREADS", n.get().to_string());
        }
    }
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    if threads >= 2 {
        // An error means the pool exists already (or this thread is in one): keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .use_current_thread()
            .build_global();
    }
}
