//! A pipeline configuration (`slim compress --config`), parsed and checked as `--check` does.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Relative paths in a configuration (a model file, a latency table) resolve in fuzz/,
    // where the seeds hold real ones.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = slim_cli::check_config(text, "fuzz.toml");
    }
});
