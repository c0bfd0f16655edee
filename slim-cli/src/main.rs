//! The `slim` command: compress convolutional models by pruning, quantization, distillation
//! and architecture search. This binary only parses arguments, calls the library crates and
//! prints their results; no algorithm lives here (the command's code is in `lib.rs`).
//!
//! Exit status: 0 on success, 2 on a usage or input error (a bad file, name, shape or value),
//! 1 on any other failure. With `--json` a command prints exactly one JSON object on stdout;
//! progress and logs go to stderr.

use std::process::ExitCode;

// Training allocates and frees many large tensors per step; glibc's allocator returns them to
// the kernel and faults them back in, which costs more than the arithmetic on small models.
// mimalloc, told to keep what it has (`tune_allocator`), reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    slim_cli::tune_allocator();
    slim_core::configure_threads();
    slim_cli::main()
}
