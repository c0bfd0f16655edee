//! Criterion benchmarks of Slim's kernels and hot paths. Each bench file runs its baseline
//! (candle's own op, an unpruned model, a plain copy) in the same run, so that speed is read
//! as a ratio from one run on a noisy machine. Run them with `cargo bench -p slim-benches`.
//!
//! ```
//! // The benches build on slim-core's zoo; the smallest model builds instantly.
//! let g = slim_core::zoo::build("lenet", &slim_core::zoo::ZooConfig::new([1, 28, 28])).unwrap();
//! assert_eq!(g.node(g.outputs()[0]).shape, vec![10]);
//! ```

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use slim_core::data::{ImageSet, Normalize};
use slim_core::{Conv2dSpec, Model};
use slim_quant::ptq::{quantize, PtqConfig};

/// A random input `[n, C, hw, hw]` and a random weight for the convolution `spec`, as
/// variables (for timing a forward and its backward).
pub fn conv_operands(spec: &Conv2dSpec, n: usize, hw: usize) -> (Var, Var) {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (n, spec.in_channels, hw, hw), &dev).expect("x");
    let [kh, kw] = spec.kernel;
    let w_shape = (spec.out_channels, spec.in_channels / spec.groups, kh, kw);
    let w = Tensor::randn(0f32, 1.0, w_shape, &dev).expect("w");
    (
        Var::from_tensor(&x).expect("var"),
        Var::from_tensor(&w).expect("var"),
    )
}

/// `m` post-training quantized (2 batches of 64, the default observers) on 256 random images
/// of `shape`, to time the int8 runtime: its scales need only be plausible.
pub fn quantized_for_timing(m: &Model, shape: [usize; 3]) -> Model {
    let mut rng = StdRng::seed_from_u64(2);
    let per: usize = shape.iter().product();
    let calib = ImageSet {
        shape,
        classes: 10,
        images: (0..256 * per).map(|_| rng.random()).collect(),
        labels: (0..256).map(|i| (i % 10) as u8).collect(),
    };
    let norm = Normalize {
        mean: vec![0.5; shape[0]],
        std: vec![0.25; shape[0]],
    };
    let cfg = PtqConfig {
        batches: 2,
        batch_size: 64,
        ..PtqConfig::default()
    };
    quantize(m, &calib, &norm, &cfg).expect("ptq").0
}
