//! Convolution kernels at batch 64, f32, each against candle's own convolution in the same
//! run: depthwise 3x3 over 64 channels of 14x14, dense 3x3 32->64 at 14x14 and 1x1 64->64 at
//! 14x14, forward and forward+backward; and one training step (forward, backward, Adam) of
//! `lenet` and `mobilenet_tiny` on 1x28x28 digits.

// The allocator of the `slim` binary, so that kernels are timed as the binary runs them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};
use slim_core::kernels::conv2d;
use slim_core::Conv2dSpec;

fn conv_case(c: &mut Criterion, name: &str, spec: Conv2dSpec, hw: usize) {
    let n = 64;
    let (x, w) = slim_benches::conv_operands(&spec, n, hw);
    let (oh, ow) = spec.out_size(hw, hw).expect("fits");
    let macs = (n
        * spec.out_channels
        * oh
        * ow
        * (spec.in_channels / spec.groups)
        * spec.kernel[0]
        * spec.kernel[1]) as u64;
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements(macs));
    let candle =
        |x: &Tensor, w: &Tensor| x.conv2d(w, spec.padding, spec.stride, spec.dilation, spec.groups);
    g.bench_function("candle_forward", |b| {
        b.iter(|| candle(&x, &w).expect("conv"))
    });
    g.bench_function("slim_forward", |b| {
        b.iter(|| conv2d(&x, &w, None, &spec).expect("conv"))
    });
    g.bench_function("candle_forward_backward", |b| {
        b.iter(|| {
            candle(&x, &w)
                .expect("conv")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd")
        })
    });
    g.bench_function("slim_forward_backward", |b| {
        b.iter(|| {
            conv2d(&x, &w, None, &spec)
                .expect("conv")
                .sum_all()
                .expect("sum")
                .backward()
                .expect("bwd")
        })
    });
    g.finish();
}

fn kernels(c: &mut Criterion) {
    conv_case(
        c,
        "depthwise3x3_64ch_14x14",
        Conv2dSpec::new(64, 64, 3).with_padding(1).with_groups(64),
        14,
    );
    conv_case(
        c,
        "dense3x3_32to64_14x14",
        Conv2dSpec::new(32, 64, 3).with_padding(1),
        14,
    );
    conv_case(
        c,
        "pointwise1x1_64to64_14x14",
        Conv2dSpec::new(64, 64, 1),
        14,
    );
}

fn train_steps(c: &mut Criterion) {
    use slim_core::data::{load_spec, DEFAULT_SPEC};
    use slim_core::train::{train, TrainConfig, TrainOptions};
    use slim_core::zoo::{self, ZooConfig};
    let mut data = load_spec(DEFAULT_SPEC).expect("bundled data");
    data.train = data.train.take(64);
    let mut g = c.benchmark_group("train_step_batch64");
    g.sample_size(10);
    g.throughput(Throughput::Elements(64));
    for name in ["lenet", "mobilenet_tiny"] {
        let mut model =
            zoo::model(name, &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).expect("model");
        let cfg = TrainConfig::default().with_epochs(1);
        g.bench_function(name, |b| {
            b.iter(|| {
                train(
                    &mut model,
                    &data,
                    &cfg,
                    TrainOptions::default(),
                    &mut |_| {},
                )
                .expect("train")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, kernels, train_steps);

// Slim's `main` sets up candle's threads (`slim_core::configure_threads`); so do the benches.
fn main() {
    slim_core::configure_threads();
    // The kernels a run measured: the machine's best, or what SLIM_CPU caps them at
    // (portable, avx2, avx512, vnni), so each level's speed can be read.
    eprintln!(
        "kernel level: {} (SLIM_CPU=portable|avx2|avx512|vnni caps it)",
        slim_core::cpu::level().name()
    );
    benches();
    Criterion::default().configure_from_args().final_summary();
}
