//! A CIFAR-10 binary batch file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("slim-fuzz-cifar-{}.bin", std::process::id()));
    std::fs::write(&path, data).expect("the temporary file is written");
    let _ = slim_core::data::load_cifar10(std::slice::from_ref(&path));
});
