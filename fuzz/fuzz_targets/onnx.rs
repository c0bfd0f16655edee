//! An ONNX model, imported (and, when that works, analysed).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = slim_onnx::import(data, &slim_onnx::ImportOptions::default()) {
        let _ = slim_core::analysis::analyze(&m.graph);
    }
});
