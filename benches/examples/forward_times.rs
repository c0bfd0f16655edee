//! Times Slim's f32 evaluation forward of zoo models on random inputs, with the protocol of
//! `scripts/paddle_inference.py` (20 warm-up forwards, 5 timed runs of 200 forwards at batch
//! 1 or 20 at batch 64, the median run), so that the two can be compared in one sitting:
//! `scripts/paddle-inference.sh` runs both.
//!
//! ```text
//! cargo run --release -p slim-benches --example forward_times -- [--nodes] [--batch N] [--per-run N] [--whole] [--channels-first] [--unprepared] [--width W] [--int8] MODEL...
//! ```
//!
//! `--batch N` times that batch size alone (default: 1 and 64); `--per-run N` makes each
//! timed run N forwards (longer runs to profile). `--whole` runs large batches
//! whole, not in pieces (`ForwardOptions::whole`), to compare the two; `--channels-first`
//! keeps every value `[N, C, H, W]` (`ForwardOptions::channels_first`), likewise. `--width W`
//! scales the models' channels (as `slim train --width`). The f32 forward is prepared once
//! per model (`Model::prepare_eval`, as evaluation runs it) unless `--unprepared`. `--int8` times the
//! int8 runtime instead, on the model post-training quantized from random images (as the
//! `int8` bench quantizes it).
//!
//! `--nodes` adds each node's share of a forward, f32 or int8 (the time until the node is
//! done, the batch run whole; a batch norm or activation that runs with its convolution, or
//! a quantizer whose readers round for it, shows next to nothing).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use candle_core::{Device, Tensor};
use slim_core::exec::{ForwardOptions, Mode};
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;
use slim_quant::runtime::Int8Kernels;

fn input_for(name: &str) -> [usize; 3] {
    if name == "lenet" || name == "mobilenet_tiny" {
        [1, 28, 28]
    } else {
        [3, 32, 32]
    }
}

/// The median of 5 runs of `per` calls of `fwd`, in ms per call, and the fastest and
/// slowest run.
fn time(fwd: impl Fn(), per: usize) -> (f64, f64, f64) {
    for _ in 0..20 {
        fwd();
    }
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per {
                fwd();
            }
            start.elapsed().as_secs_f64() * 1e3 / per as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    (runs[2], runs[0], runs[4])
}

/// Each node's mean time over `reps` batch forwards (with `kernels`, where given), in
/// evaluation order.
fn node_times(
    m: &Model,
    x: &Tensor,
    reps: usize,
    kernels: Option<&dyn slim_core::exec::NodeKernels>,
) -> Vec<(String, f64)> {
    let mut times: Vec<(String, f64)> = vec![];
    for _ in 0..reps {
        let mut at = 0;
        let mut last = Instant::now();
        let mut done = |name: &str| {
            let now = Instant::now();
            if at == times.len() {
                times.push((name.to_string(), 0.0));
            }
            times[at].1 += (now - last).as_secs_f64();
            at += 1;
            last = now;
        };
        let opts = ForwardOptions {
            finished: Some(&mut done),
            kernels,
            ..Default::default()
        };
        m.forward_with(std::slice::from_ref(x), Mode::Eval, opts)
            .expect("forward");
    }
    times
        .into_iter()
        .map(|(n, t)| (n, t * 1e3 / reps as f64))
        .collect()
}

fn main() {
    // As the `slim` binary starts.
    slim_cli::tune_allocator();
    slim_core::configure_threads();
    let mut nodes = false;
    let mut whole = false;
    let mut channels_first = false;
    let mut width = 1.0f64;
    let mut unprepared = false;
    let mut int8 = false;
    let mut batches = vec![1usize, 64];
    let mut per_run = None;
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--nodes" => nodes = true,
            "--whole" => whole = true,
            "--channels-first" => channels_first = true,
            "--unprepared" => unprepared = true,
            "--int8" => int8 = true,
            "--per-run" => match args.next().and_then(|b| b.parse().ok()) {
                Some(n) if n > 0 => per_run = Some(n),
                _ => {
                    eprintln!("forward_times: --per-run needs a positive whole number");
                    std::process::exit(2);
                }
            },
            "--width" => match args.next().and_then(|b| b.parse().ok()) {
                Some(w) if w > 0.0 => width = w,
                _ => {
                    eprintln!("forward_times: --width needs a positive number");
                    std::process::exit(2);
                }
            },
            "--batch" => match args.next().and_then(|b| b.parse().ok()) {
                Some(b) if b > 0 => batches = vec![b],
                _ => {
                    eprintln!("forward_times: --batch needs a positive whole number");
                    std::process::exit(2);
                }
            },
            flag if flag.starts_with("--") => {
                eprintln!(
                    "forward_times: unknown option `{flag}` (--nodes, --batch N, --per-run N, --whole, --channels-first, --unprepared, --width W, --int8)"
                );
                std::process::exit(2);
            }
            _ => models.push(a),
        }
    }
    if models.is_empty() {
        models = vec!["mobilenet_tiny".into(), "lenet".into()];
    }
    let dev = Device::Cpu;
    for name in &models {
        let shape = input_for(name);
        let m = match zoo::model(name, &ZooConfig::new(shape).with_width(width), 0, &dev) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("forward_times: {e}");
                std::process::exit(2);
            }
        };
        let q = int8.then(|| slim_benches::quantized_for_timing(&m, shape));
        // The weights packed once, as `slim eval` runs int8 files.
        let kernels = q.as_ref().map(Int8Kernels::new);
        // And the f32 forward's batch norms folded and weights laid out once (unless
        // `--unprepared`).
        let prepared = (!unprepared).then(|| m.prepare_eval(channels_first).expect("prepare"));
        for &batch in &batches {
            let x = Tensor::randn(0f32, 1.0, (batch, shape[0], shape[1], shape[2]), &dev)
                .expect("input");
            let per = per_run.unwrap_or(if batch == 1 { 200 } else { 20 });
            let (median, lo, hi) = match (&q, &kernels) {
                (Some(q), Some(k)) => time(
                    || {
                        slim_quant::runtime::forward_with(q, k, &x).expect("int8 forward");
                    },
                    per,
                ),
                _ => time(
                    || {
                        let opts = ForwardOptions {
                            whole,
                            channels_first,
                            prepared: prepared.as_ref(),
                            ..Default::default()
                        };
                        m.forward_with(std::slice::from_ref(&x), Mode::Eval, opts)
                            .expect("forward");
                    },
                    per,
                ),
            };
            let kind = if int8 { " int8" } else { "" };
            println!("slim{kind} {name} batch {batch}: {median:.3} ms (runs {lo:.3}..{hi:.3})");
            if nodes {
                let times = match (&q, &kernels) {
                    (Some(q), Some(k)) => node_times(q, &x, 20, Some(k)),
                    _ => node_times(&m, &x, 20, None),
                };
                for (n, t) in times {
                    println!("    {n:>24} {t:8.3} ms");
                }
            }
        }
    }
}
