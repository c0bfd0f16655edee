//! IDX files (MNIST, Fashion-MNIST), plain or gzip, as images (rank 3) and labels (rank 1).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = std::path::Path::new("fuzz.idx");
    let _ = slim_core::data::parse_idx(p, data, 3);
    let _ = slim_core::data::parse_idx(p, data, 1);
});
