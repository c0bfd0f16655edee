//! A Slim model file (safetensors with the graph in its metadata): read, then analysed.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = slim_core::Model::from_bytes(data, &candle_core::Device::Cpu) {
        let _ = slim_core::analysis::analyze(&m.graph);
        let _ = m.fingerprint();
    }
});
