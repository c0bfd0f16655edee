//! The int8 runtime against f32, each beside its baseline in the same run:
//!
//! - `int8_gemm_512`: Slim's int8 matrix product (512 x 512 by 512 x 512) on one core and split
//!   over all cores, against candle's f32 matmul and candle's Q8_0 `QMatMul` of the same size
//!   (criterion's throughput is multiply-adds; the kernel is the best this machine runs, see
//!   `slim_quant::gemm::Kernel`);
//! - `int8_<model>_b<N>`: a post-training-quantized model run by the int8 runtime against the
//!   same float model's forward (Slim's own fast kernels), at batch 1 and 64, for MobileNetV1
//!   and ResNet-20 on 3x32x32 inputs, and for the small MNIST models `mobilenet_tiny` and
//!   LeNet on 1x28x28 (width 1; calibrated on random images, which does not change the
//!   work).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, Criterion, Throughput};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use slim_core::zoo::{self, ZooConfig};
use slim_core::{ForwardOptions, Mode};

fn gemm(c: &mut Criterion) {
    let n = 512;
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev).expect("a");
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev).expect("b");
    let mut rng = StdRng::seed_from_u64(1);
    let ai: Vec<i8> = (0..n * n).map(|_| rng.random()).collect();
    let bi: Vec<i8> = (0..n * n).map(|_| rng.random()).collect();
    let mut out = vec![0i32; n * n];
    let mut g = c.benchmark_group("int8_gemm_512");
    g.sample_size(20);
    g.throughput(Throughput::Elements((n * n * n) as u64));
    g.bench_function("candle_f32_matmul", |bch| {
        bch.iter(|| a.matmul(&b).expect("matmul"))
    });
    // candle's own 8-bit route: Q8_0 weights (blocks of 32 with an f16 scale) in QMatMul.
    let q8 = candle_core::quantized::QMatMul::from_qtensor(
        candle_core::quantized::QTensor::quantize(
            &b.t().expect("t").contiguous().expect("c"),
            candle_core::quantized::GgmlDType::Q8_0,
        )
        .expect("q8_0"),
    )
    .expect("qmatmul");
    g.bench_function("candle_q8_0_qmatmul", |bch| {
        bch.iter(|| candle_core::Module::forward(&q8, &a).expect("qmatmul"))
    });
    g.bench_function("slim_int8_gemm", |bch| {
        bch.iter(|| {
            slim_quant::gemm::gemm(
                slim_quant::gemm::MatRef::new(&ai, n, n),
                slim_quant::gemm::MatRef::new(&bi, n, n),
                &mut out,
            )
        })
    });
    // The same product split by columns over the cores, as the runtime splits its work
    // (candle's matmul uses every core too).
    let packed = slim_quant::gemm::PackedA::new(slim_quant::gemm::MatRef::new(&ai, n, n));
    let threads = rayon::current_num_threads().max(1);
    let width = n.div_ceil(threads);
    let mut parts: Vec<Vec<i32>> = (0..threads).map(|_| vec![0i32; n * width]).collect();
    g.bench_function("slim_int8_gemm_all_cores", |bch| {
        bch.iter(|| {
            parts.par_iter_mut().enumerate().for_each(|(t, out)| {
                let c0 = t * width;
                let cols = width.min(n - c0);
                let view = slim_quant::gemm::MatRef {
                    data: &bi[c0..],
                    rows: n,
                    cols,
                    stride: n,
                };
                slim_quant::gemm::gemm_rows(&packed, 0..n, view, out);
            })
        })
    });
    g.finish();
}

fn models(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (name, shape) in [
        ("mobilenet_v1", [3, 32, 32]),
        ("resnet20", [3, 32, 32]),
        ("mobilenet_tiny", [1, 28, 28]),
        ("lenet", [1, 28, 28]),
    ] {
        let m = zoo::model(name, &ZooConfig::new(shape), 0, &dev).expect("zoo");
        let q = slim_benches::quantized_for_timing(&m, shape);
        for batch in [1usize, 64] {
            let x =
                Tensor::randn(0f32, 1.0, (batch, shape[0], shape[1], shape[2]), &dev).expect("x");
            let mut g = c.benchmark_group(format!("int8_{name}_b{batch}"));
            g.sample_size(10);
            g.throughput(Throughput::Elements(batch as u64));
            // Both sides prepared once, as `slim eval` and every evaluation run them: the f32
            // forward's batch norms folded and weights laid out, the int8 weights packed.
            let prepared = m.prepare_eval(false).expect("prepare");
            g.bench_function("f32_forward", |b| {
                b.iter(|| {
                    let opts = ForwardOptions {
                        prepared: Some(&prepared),
                        ..Default::default()
                    };
                    m.forward_with(std::slice::from_ref(&x), Mode::Eval, opts)
                        .expect("f32")
                })
            });
            let kernels = slim_quant::runtime::Int8Kernels::new(&q);
            g.bench_function("int8_runtime", |b| {
                b.iter(|| slim_quant::runtime::forward_with(&q, &kernels, &x).expect("int8"))
            });
            g.finish();
        }
    }
}

criterion_group!(benches, gemm, models);

// Slim's `main` sets up candle's threads (`slim_core::configure_threads`) and the allocator
// (`slim_cli::tune_allocator`); so do the benches.
fn main() {
    slim_cli::tune_allocator();
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
