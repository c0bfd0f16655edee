//! End-to-end tests of `slim train` and `slim eval`, including a run killed with SIGKILL in
//! the middle of an epoch and resumed.

use std::process::Command;

fn slim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slim"))
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn train_then_eval_on_the_bundled_data() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("lenet.safetensors");
    let out = slim()
        .args([
            "train", "--model", "lenet", "--epochs", "1", "--limit", "1500", "--json", "--out",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let t = json_of(&out);
    assert!(t["top1"].as_f64().unwrap() > 0.7, "{t}");
    // The finished run removed its checkpoint; --keep-checkpoint keeps it.
    let ckpt = dir.path().join("lenet.safetensors.ckpt");
    assert!(!ckpt.exists());
    let kept = dir.path().join("kept.safetensors");
    let o = slim()
        .args([
            "train", "--model", "lenet", "--epochs", "1", "--limit", "256",
        ])
        .args(["--keep-checkpoint", "-q", "--out"])
        .arg(&kept)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(dir.path().join("kept.safetensors.ckpt").exists());
    assert_eq!(
        t["bytes"].as_u64().unwrap(),
        std::fs::metadata(&model).unwrap().len()
    );
    let e = json_of(
        &slim()
            .args(["eval", "--json"])
            .arg(&model)
            .output()
            .unwrap(),
    );
    assert_eq!(e["top1"], t["top1"]);
    assert_eq!(e["samples"].as_u64(), Some(1996));
}

/// `--hflip` and `--crop-padding` reach the training batches: the same seed with and without
/// them trains other weights, and the same flags twice the same weights (the tensors are
/// stored in the order of their names).
#[test]
fn augmentation_flags_change_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let model = dir.path().join(name);
        let out = slim()
            .args([
                "train", "--model", "lenet", "--epochs", "1", "--limit", "256",
            ])
            .args(["--quiet", "--json", "--out"])
            .arg(&model)
            .args(extra)
            .output()
            .unwrap();
        json_of(&out);
        // The tensors' bytes, after the safetensors header (whose metadata need not be
        // written in one order).
        let bytes = std::fs::read(&model).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header..].to_vec()
    };
    let plain = run("plain.safetensors", &[]);
    let flipped = run("flip.safetensors", &["--hflip"]);
    let cropped = run("crop.safetensors", &["--crop-padding", "2"]);
    let flipped_again = run("flip2.safetensors", &["--hflip"]);
    assert_ne!(plain, flipped);
    assert_ne!(plain, cropped);
    assert_ne!(flipped, cropped);
    assert_eq!(flipped, flipped_again);
}

#[test]
fn bad_arguments_exit_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("m.safetensors");
    let out = out_file.to_str().unwrap();
    for args in [
        vec!["train", "--model", "nope", "--out", out],
        vec![
            "train",
            "--model",
            "lenet",
            "--data",
            "mnist:/no/such/dir",
            "--out",
            out,
        ],
        vec!["train", "--model", "lenet", "--lr", "-1", "--out", out],
        vec![
            "train",
            "--model",
            "lenet",
            "--optimizer",
            "rmsprop",
            "--out",
            out,
        ],
        vec![
            "train",
            "--model",
            "lenet",
            "--crop-padding",
            "29",
            "--out",
            out,
        ],
        vec!["eval", "/no/such/model.safetensors"],
        vec![
            "train",
            "--model",
            "lenet",
            "--out",
            "/no/such/dir/m.safetensors",
        ],
    ] {
        let o = slim().args(&args).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!out_file.exists(), "{args:?} wrote a file");
    }
}
