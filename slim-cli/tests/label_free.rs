//! Compression without labels: a trained model and a folder of images with no labels
//! (`unlabeled:DIR`, written from the bundled digits). Pruning fine-tunes the pruned model to
//! reproduce the original, PTQ calibrates on the images, distillation teaches a student from
//! the teacher alone; each reports fidelity to the original instead of accuracy.

mod common;

use std::path::Path;

use common::{json_of, slim, trained_lenet};
use slim_core::data::{load_spec, Dataset, DEFAULT_SPEC};

/// Writes `n` bundled training digits as PNGs in a tree without classes.
fn unlabeled_folder(dir: &Path, n: usize) -> String {
    let set = load_spec(DEFAULT_SPEC).unwrap().train.take(n);
    for i in 0..set.len() {
        let sub = dir.join(format!("batch{}", i % 3));
        std::fs::create_dir_all(&sub).unwrap();
        let img = image::GrayImage::from_raw(28, 28, set.sample(i).0.to_vec()).unwrap();
        img.save(sub.join(format!("{i:05}.png"))).unwrap();
    }
    format!("unlabeled:{}", dir.display())
}

fn agreement(v: &serde_json::Value) -> f64 {
    v["fidelity"]["outputs"][0]["top1_agreement"]
        .as_f64()
        .unwrap_or_else(|| panic!("no agreement in {v}"))
}

#[test]
fn prune_quantize_and_distill_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let original = trained_lenet(dir.path());
    let spec = unlabeled_folder(&dir.path().join("images"), 1200);
    let out = |n: &str| dir.path().join(n);

    // Pruning: half the MACs, two epochs reproducing the original.
    let pruned = out("pruned.safetensors");
    let o = slim()
        .arg("prune")
        .arg(&original)
        .args(["--flops-reduction", "0.5", "--finetune-epochs", "2"])
        .args(["--data", &spec, "-q", "--json", "--out"])
        .arg(&pruned)
        .output()
        .unwrap();
    let p = json_of(&o);
    assert!(p["before"]["top1"].is_null(), "{p}");
    assert!(agreement(&p) > 0.85, "{p}");
    assert!(p["flops_reduction"].as_f64().unwrap() > 0.45, "{p}");
    // The same without fine-tuning agrees less.
    let bare = slim()
        .arg("prune")
        .arg(&original)
        .args([
            "--flops-reduction",
            "0.5",
            "--data",
            &spec,
            "-q",
            "--json",
            "--out",
        ])
        .arg(out("bare.safetensors"))
        .output()
        .unwrap();
    assert!(agreement(&json_of(&bare)) < agreement(&p), "{p}");

    // --label-free with labelled data: the labels are left unused.
    let lf = slim()
        .arg("prune")
        .arg(&original)
        .args([
            "--flops-reduction",
            "0.5",
            "--finetune-epochs",
            "1",
            "--label-free",
        ])
        .args(["-q", "--json", "--out"])
        .arg(out("label-free.safetensors"))
        .output()
        .unwrap();
    let lf = json_of(&lf);
    assert!(
        lf["before"]["top1"].is_null() && agreement(&lf) > 0.85,
        "{lf}"
    );

    // PTQ: calibrated on the images; the int8 runtime against the float model.
    let q = slim()
        .args(["quant", "ptq"])
        .arg(&original)
        .args(["--data", &spec, "-q", "--json", "--out"])
        .arg(out("int8.safetensors"))
        .output()
        .unwrap();
    let q = json_of(&q);
    assert!(agreement(&q) > 0.97, "{q}");
    assert!(
        q["fidelity"]["outputs"][0]["cosine"].as_f64().unwrap() > 0.99,
        "{q}"
    );

    // Distillation: a fresh half-width student from the teacher alone.
    let d = slim()
        .args(["distill", "--teacher"])
        .arg(&original)
        .args([
            "--student-model",
            "lenet",
            "--width",
            "0.5",
            "--epochs",
            "6",
        ])
        .args(["--data", &spec, "-q", "--json", "--out"])
        .arg(out("student.safetensors"))
        .output()
        .unwrap();
    let d = json_of(&d);
    assert_eq!(d["label_free"], true);
    eprintln!(
        "agreement with the original: pruned {:.3}, int8 {:.3}, student {:.3}",
        agreement(&p),
        agreement(&q),
        agreement(&d)
    );
    assert!(agreement(&d) > 0.8, "{d}");

    // What needs labels says so (exit 2): training from scratch, and the automatic search.
    for args in [
        vec!["train", "--model", "lenet", "--epochs", "1"],
        vec!["prune", original.to_str().unwrap(), "--method", "auto"],
    ] {
        let o = slim()
            .args(&args)
            .args(
                ["--flops-reduction", "0.5"]
                    .iter()
                    .filter(|_| args[0] == "prune"),
            )
            .args(["--data", &spec, "--out"])
            .arg(out("never.safetensors"))
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains("label"), "{args:?}: {e}");
        assert!(!out("never.safetensors").exists());
    }
}
