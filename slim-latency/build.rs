//! Records the version of candle this build uses (from the workspace's Cargo.lock), so that a
//! latency table can say what it was measured with.

fn main() {
    let lock = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let Ok(text) = std::fs::read_to_string(&lock) else {
        return;
    };
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"candle-core\"" {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \""))
                .and_then(|v| v.strip_suffix('"'))
            {
                println!("cargo:rustc-env=SLIM_CANDLE_VERSION={v}");
            }
            return;
        }
    }
}
