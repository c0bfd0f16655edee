//! An ONNX model, imported (and, when that works, analysed).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Weights filled from a shape alone (the light model-zoo networks) within the fuzzer's
    // memory: up to 2^22 values.
    let opts = slim_onnx::ImportOptions {
        max_generated: Some(1 << 22),
        ..Default::default()
    };
    if let Ok(m) = slim_onnx::import(data, &opts) {
        let _ = slim_core::analysis::analyze(&m.graph);
    }
});
