//! Criterion benchmarks of Slim's kernels and hot paths. Each bench file runs its baseline
//! (candle's own op, an unpruned model, a plain copy) in the same run, so that speed is read
//! as a ratio from one run on a noisy machine. Run them with `cargo bench -p slim-benches`.
//!
//! ```
//! // The benches build on slim-core's zoo; the smallest model builds instantly.
//! let g = slim_core::zoo::build("lenet", &slim_core::zoo::ZooConfig::new([1, 28, 28])).unwrap();
//! assert_eq!(g.node(g.outputs()[0]).shape, vec![10]);
//! ```
