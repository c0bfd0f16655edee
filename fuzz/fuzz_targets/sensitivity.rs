//! A sensitivity file (`slim sensitivity`), read and plotted.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("slim-fuzz-sens-{}.json", std::process::id()));
    std::fs::write(&path, data).expect("the temporary file is written");
    if let Ok(s) = slim_prune::sensitivity::Sensitivities::load(&path) {
        let _ = slim_prune::sensitivity::to_svg(&s);
        let _ = slim_prune::sensitivity::Sensitivities::merge(vec![s.clone(), s]);
    }
});
