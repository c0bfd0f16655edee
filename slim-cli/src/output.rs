//! Writing results to stdout.

/// Writes results to stdout. A closed pipe ends the program with status 0 (the reader has
/// what it wanted); any other write error ends it with status 1.
pub fn write_stdout(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("slim: error: cannot write the results: {e}");
        std::process::exit(1);
    }
}
