//! `--data images:DIR` on the command line: a folder of PNG digits trains and evaluates, and a
//! damaged image is refused by name with nothing written.

use std::path::Path;
use std::process::Command;

use slim_core::data::{load_spec, Dataset, DEFAULT_SPEC};

fn slim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slim"))
        .args(args)
        .output()
        .expect("slim runs")
}

/// 400 training and 100 test digits as `dir/{train,test}/<label>/<index>.png`.
fn digits(dir: &Path) {
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    for (split, set) in [("train", idx.train.take(400)), ("test", idx.test.take(100))] {
        for i in 0..set.len() {
            let (px, label) = set.sample(i).unwrap();
            let class = dir.join(split).join(label.to_string());
            std::fs::create_dir_all(&class).unwrap();
            image::GrayImage::from_raw(28, 28, px.to_vec())
                .unwrap()
                .save(class.join(format!("{i:04}.png")))
                .unwrap();
        }
    }
}

#[test]
fn a_png_folder_trains_and_a_damaged_image_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("digits");
    digits(&data);
    let spec = format!("images:{}", data.display());
    let out = dir.path().join("lenet.safetensors");
    let o = slim(&[
        "train",
        "--model",
        "lenet",
        "--data",
        &spec,
        "--epochs",
        "1",
        // Digits are not photographs: no flips or resized crops.
        "--augment",
        "none",
        "-q",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["top1"].as_f64().unwrap() > 0.3, "{v}");
    // An augmentation that does not exist is refused by name, before any work.
    let o = slim(&[
        "train",
        "--model",
        "lenet",
        "--data",
        &spec,
        "--augment",
        "rotate:30",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("rotate:30"));
    let o = slim(&["eval", out.to_str().unwrap(), "--data", &spec, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    std::fs::write(data.join("test/7/broken.png"), b"\x89PNG\r\n\x1a\n broken").unwrap();
    let again = dir.path().join("again.safetensors");
    let o = slim(&[
        "train",
        "--model",
        "lenet",
        "--data",
        &spec,
        "--epochs",
        "1",
        "-q",
        "--out",
        again.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("broken.png"), "{err}");
    assert!(!again.exists());
    // With --skip-bad-images the file is left out and reported.
    let o = slim(&[
        "eval",
        out.to_str().unwrap(),
        "--data",
        &spec,
        "--skip-bad-images",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 bad files skipped") && err.contains("broken.png"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 100);
    // The report counts it too, naming the file and why.
    let skipped = &v["skipped_images"];
    assert_eq!(skipped["count"], 1, "{v}");
    let file = skipped["files"][0]["file"].as_str().unwrap_or_default();
    assert!(file.ends_with("broken.png"), "{v}");
    assert!(!skipped["files"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
    // A held-out share outside (0, 1) is refused.
    let o = slim(&[
        "eval",
        out.to_str().unwrap(),
        "--data",
        &spec,
        "--val-fraction",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--val-fraction"));
}
