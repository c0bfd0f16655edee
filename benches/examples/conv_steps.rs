//! Runs one of the kernels bench's convolutions (batch 64, f32) a fixed number of times and
//! prints the mean wall time per iteration: a quick way to compare two builds of one kernel,
//! or a kernel's backward with its forward, without criterion's warm-up and sampling. On a
//! shared machine, run the two builds in turn several times and compare the ranges.
//!
//! ```text
//! cargo run --release -p slim-benches --example conv_steps -- CASE PART [ITERATIONS]
//! ```
//!
//! `CASE` is `depthwise`, `dense` or `pointwise` (the shapes of `benches/kernels.rs`); `PART`
//! is `forward`, `backward` (the backward alone: the gradient ops of one forward, run again
//! and again), or `both` (forward and backward through candle's autograd, as the bench does).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use candle_core::{Device, Tensor};
use slim_core::kernels::{conv2d, conv2d_backward};
use slim_core::Conv2dSpec;

fn main() {
    slim_core::configure_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: conv_steps depthwise|dense|pointwise forward|backward|both [ITERATIONS]";
    let (case, part) = match (args.first(), args.get(1)) {
        (Some(c), Some(p)) => (c.as_str(), p.as_str()),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let iterations: usize = match args.get(2).map(|s| s.parse()) {
        None => 200,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let spec = match case {
        "depthwise" => Conv2dSpec::new(64, 64, 3).with_padding(1).with_groups(64),
        "dense" => Conv2dSpec::new(32, 64, 3).with_padding(1),
        "pointwise" => Conv2dSpec::new(64, 64, 1),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let dev = Device::Cpu;
    let (x, w) = slim_benches::conv_operands(&spec, 64, 14);
    let y = conv2d(&x, &w, None, &spec).expect("conv");
    let gy = Tensor::randn(0f32, 1.0, y.dims(), &dev).expect("gy");
    let step = || match part {
        "forward" => {
            conv2d(&x, &w, None, &spec).expect("conv");
        }
        "backward" => {
            conv2d_backward(&x, &w, &gy, &spec).expect("backward");
        }
        "both" => {
            conv2d(&x, &w, None, &spec)
                .expect("conv")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd");
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    for _ in 0..iterations.min(10) {
        step();
    }
    let t = Instant::now();
    for _ in 0..iterations {
        step();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / iterations.max(1) as f64;
    println!("{case} {part}: {ms:.3} ms per iteration ({iterations} iterations)");
}
