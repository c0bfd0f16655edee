//! A latency table (`slim latency build`), read and checked.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("slim-fuzz-table-{}.json", std::process::id()));
    std::fs::write(&path, data).expect("the temporary file is written");
    if let Ok(t) = slim_latency::Table::load(&path) {
        let _ = t.check(&path, slim_latency::Runtime::F32);
    }
});
