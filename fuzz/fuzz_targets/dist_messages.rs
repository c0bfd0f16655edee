//! What arrives through Redis: a study's state, a teacher's request and a teacher's answer.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<slim_core::study::StudyState>(data);
    let _ = slim_dist::teacher::fuzzing::request(data);
    let _ = slim_dist::teacher::fuzzing::answer(data);
});
