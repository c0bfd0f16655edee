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
        let img = image::GrayImage::from_raw(28, 28, set.sample(i).unwrap().0.to_vec()).unwrap();
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

    // QAT: one epoch reproducing the float model.
    let qat = slim()
        .args(["quant", "qat"])
        .arg(&original)
        .args(["--epochs", "1", "--data", &spec, "-q", "--json", "--out"])
        .arg(out("qat.safetensors"))
        .output()
        .unwrap();
    let qat = json_of(&qat);
    assert!(agreement(&qat) > 0.97, "{qat}");
    assert!(!out("qat.safetensors.ckpt").exists());
    // --label-free with labelled data: the same, the labels left unused.
    let qat = slim()
        .args(["quant", "qat"])
        .arg(&original)
        .args(["--epochs", "1", "--label-free", "-q", "--json", "--out"])
        .arg(out("qat-label-free.safetensors"))
        .output()
        .unwrap();
    let qat = json_of(&qat);
    assert!(
        qat["before"]["top1"].is_null() && agreement(&qat) > 0.97,
        "{qat}"
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

/// A pipeline on images without labels, from a trained model: pruning fine-tunes by
/// reproducing the unpruned model, QAT by reproducing the float one, and the report gives each
/// stage's agreement with the baseline instead of top-1.
#[test]
fn a_pipeline_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let original = trained_lenet(dir.path());
    let spec = unlabeled_folder(&dir.path().join("images"), 1200);
    let config = |stages: &str, model: &str| {
        let text = format!(
            "[model]\n{model}\n[data]\nspec = \"{spec}\"\n[train]\nepochs = 1\n{stages}\n[output]\ndir = \"{}\"\n",
            dir.path().join("out").display()
        );
        let path = dir.path().join("pipeline.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let file = format!("file = \"{}\"", original.display());
    let stages =
        "[[strategy]]\nkind = \"prune.uniform\"\nflops_reduction = 0.5\nfinetune_epochs = 2\n\
                  [[strategy]]\nkind = \"quant.ptq\"\n\
                  [[strategy]]\nkind = \"quant.qat\"\nfrom = \"baseline\"\nepochs = 1\n";
    let o = slim()
        .args(["compress", "--json", "-q", "--config"])
        .arg(config(stages, &file))
        .output()
        .unwrap();
    let r = json_of(&o);
    let stages = r["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4, "{r}");
    for s in stages {
        assert!(s["top1"].is_null(), "{s}");
        let a = s["agreement"].as_f64().unwrap();
        eprintln!("{}: agreement {a:.3}", s["name"]);
        assert!(a > 0.85, "{s}");
    }
    assert_eq!(stages[0]["agreement"], 1.0);
    let md = std::fs::read_to_string(dir.path().join("out").join("report.md")).unwrap();
    assert!(md.contains("agreement"), "{md}");

    // A model file and images, no configuration: the default pipeline for a model (prune 30%
    // with fine-tuning, int8), its configuration and the int8 model as ONNX beside the report.
    let out = dir.path().join("model-out");
    let r = json_of(
        &slim()
            .args(["compress", "--json", "-q", "--augment", "none", "--model"])
            .arg(&original)
            .args(["--data", &spec, "--out"])
            .arg(&out)
            .output()
            .unwrap(),
    );
    let stages = r["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["baseline", "prune.uniform", "quant.ptq"], "{r}");
    for s in stages {
        assert!(s["agreement"].as_f64().unwrap() > 0.85, "{s}");
    }
    let reduction = 1.0 - stages[1]["macs"].as_f64().unwrap() / stages[0]["macs"].as_f64().unwrap();
    assert!((0.25..0.35).contains(&reduction), "{reduction}");
    let onnx = out.join("model.int8.onnx");
    assert_eq!(r["onnx"].as_str(), Some(onnx.to_str().unwrap()));
    assert!(out.join("pipeline.toml").is_file());
    // The export reads back (Slim's importer takes QDQ files).
    let info = slim().arg("info").arg(&onnx).output().unwrap();
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    // --data goes with --model; --model does not go with --config.
    let o = slim().args(["compress", "--data", &spec]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));

    // Refused, naming what needs labels (exit 2): a zoo baseline (before any work), and a
    // pruning method that scores by accuracy (when its stage starts).
    for (stages, model) in [
        ("", "zoo = \"lenet\""),
        (
            "[[strategy]]\nkind = \"prune.sensitivity\"\nflops_reduction = 0.5\n",
            file.as_str(),
        ),
    ] {
        let o = slim()
            .args(["compress", "-q", "--force", "--config"])
            .arg(config(stages, model))
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains("no labels"), "{e}");
    }
}

/// Per-pixel cross-entropy against the strokes of each digit (its pixels brighter than the
/// mean): the segmentation task the dense-output model is trained on.
struct Strokes;

impl slim_core::train::LossTerm for Strokes {
    fn name(&self) -> &str {
        "strokes"
    }
    fn loss(
        &mut self,
        batch: &slim_core::data::Batch,
        out: &slim_core::exec::ForwardOutput,
    ) -> slim_core::Result<candle_core::Tensor> {
        let fg = batch.images.gt(0.0)?.to_dtype(candle_core::DType::F32)?;
        let y = &out.outputs[0];
        let m = y.max_keepdim(1)?.detach();
        let lse = (y.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
        let logp = y.broadcast_sub(&lse)?;
        let (bg_p, fg_p) = (logp.narrow(1, 0, 1)?, logp.narrow(1, 1, 1)?);
        let picked = ((&fg * fg_p)? + ((1.0 - &fg)? * bg_p)?)?;
        Ok(picked.mean_all()?.neg()?)
    }
}

/// A model with a per-pixel output (the zoo's encoder-decoder, with a transposed convolution,
/// a resize and a skip connection), trained to segment digit strokes, then pruned without
/// labels: fine-tuning to reproduce its maps keeps them close to the original's on held-out
/// images (mean cosine similarity), closer than pruning alone.
#[test]
fn a_dense_output_model_pruned_without_labels_keeps_its_maps() {
    let dir = tempfile::tempdir().unwrap();
    let spec = unlabeled_folder(&dir.path().join("images"), 1200);
    let original = dir.path().join("segnet.safetensors");
    let cfg = slim_core::zoo::ZooConfig::new([1, 28, 28]).with_classes(2);
    let mut model =
        slim_core::zoo::model("segnet_tiny", &cfg, 0, &candle_core::Device::Cpu).unwrap();
    let data = load_spec(&spec).unwrap();
    let mut strokes = Strokes;
    let report = slim_core::train::train(
        &mut model,
        &data,
        &slim_core::train::TrainConfig::default()
            .with_epochs(2)
            .with_lr(0.003),
        slim_core::train::TrainOptions {
            eval_each_epoch: false,
            extra: vec![&mut strokes],
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let loss = report.epochs.last().unwrap().loss;
    assert!(loss < 0.2, "the segmentation did not train: loss {loss}");
    model.save(&original).unwrap();
    let prune = |epochs: &str, out: &str| {
        json_of(
            &slim()
                .arg("prune")
                .arg(&original)
                .args(["--flops-reduction", "0.3", "--finetune-epochs", epochs])
                .args(["--augment", "none", "--batch-size", "16"])
                .args(["--data", &spec, "-q", "--json", "--out"])
                .arg(dir.path().join(out))
                .output()
                .unwrap(),
        )
    };
    let cosine = |v: &serde_json::Value| {
        let o = &v["fidelity"]["outputs"][0];
        assert!(o["top1_agreement"].is_null(), "a map has no top-1: {v}");
        o["cosine"]
            .as_f64()
            .unwrap_or_else(|| panic!("no cosine in {v}"))
    };
    let tuned = prune("3", "tuned.safetensors");
    let bare = prune("0", "bare.safetensors");
    assert!(tuned["flops_reduction"].as_f64().unwrap() > 0.25, "{tuned}");
    let (t, b) = (cosine(&tuned), cosine(&bare));
    eprintln!(
        "segnet_tiny (stroke loss {loss:.3}), 30% of MACs pruned: cosine {b:.4} alone, \
         {t:.4} after fine-tuning"
    );
    assert!(t >= 0.99, "{tuned}");
    assert!(t > b, "fine-tuning did not help: {b} -> {t}");
}

/// Architecture search without labels: candidates (annealing, and one-shot from a supernet)
/// learn to reproduce a trained LeNet on unlabeled digits and are scored by their top-1
/// agreement with it; the best one exported and its JSON say so. Without a model to
/// reproduce, unlabeled data is refused.
#[test]
fn architecture_search_without_labels_reproduces_a_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = trained_lenet(dir.path());
    let spec = unlabeled_folder(&dir.path().join("images"), 1200);
    let small = [
        "--space",
        "mobilenet_v1",
        "--width",
        "0.25",
        "--eval-images",
        "256",
        "--iterations",
        "3",
        "--data",
        &spec,
        "--augment",
        "none",
        "--json",
        "-q",
    ];
    let refused = slim()
        .args(["nas", "sa"])
        .args(small)
        .arg("--out")
        .arg(dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--teacher"), "{err}");
    assert!(!dir.path().join("none").exists());

    let sa_out = dir.path().join("sa");
    let sa = json_of(
        &slim()
            .args(["nas", "sa"])
            .args(small)
            .args([
                "--train-images",
                "800",
                "--epochs",
                "5",
                "--lr",
                "0.02",
                "--teacher",
            ])
            .arg(&teacher)
            .arg("--out")
            .arg(&sa_out)
            .output()
            .unwrap(),
    );
    assert_eq!(sa["reward"], "agreement", "{sa}");
    let best = sa["best"]["reward"].as_f64().unwrap();
    assert!(best > 0.5, "the best candidate agrees on {best}: {sa}");
    let table = std::fs::read_to_string(sa_out.join("results.md")).unwrap();
    assert!(table.contains("agreement"), "{table}");

    let one = json_of(
        &slim()
            .args(["nas", "oneshot"])
            .args(small)
            .args(["--supernet-epochs", "5", "--lr", "0.02"])
            .args(["--calibration-images", "256", "--teacher"])
            .arg(&teacher)
            .arg("--out")
            .arg(dir.path().join("oneshot"))
            .output()
            .unwrap(),
    );
    // A supernet trained for five short epochs scores its subnets well above chance (one in
    // ten), as on the labels (26% top-1 for the same settings, measured with them).
    assert_eq!(one["reward"], "agreement", "{one}");
    let best = one["best"]["reward"].as_f64().unwrap();
    assert!(
        best > 0.15,
        "the best inherited candidate agrees on {best}: {one}"
    );
    let exported = json_of(
        &slim()
            .args(["nas", "export"])
            .arg(dir.path().join("oneshot"))
            .args([
                "--inherit",
                "--calibration-images",
                "256",
                "--data",
                &spec,
                "--json",
            ])
            .arg("--out")
            .arg(dir.path().join("found.safetensors"))
            .output()
            .unwrap(),
    );
    assert!(exported["inherited"]["test_top1"].is_null(), "{exported}");

    // A pipeline's search stage on unlabeled data reproduces the model entering it: its
    // candidates, then the architecture it found, trained with the pipeline's recipe.
    let config = dir.path().join("nas.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nfile = \"{}\"\n[data]\nspec = \"{spec}\"\n[train]\nepochs = 5\n\
             lr = 0.02\n[[strategy]]\nkind = \"nas.sa\"\nspace = \"mobilenet_v1\"\n\
             width = 0.25\niterations = 2\ncandidate_epochs = 5\ntrain_images = 800\n\
             eval_images = 256\n[output]\ndir = \"{}\"\n",
            teacher.display(),
            dir.path().join("pipeline").display()
        ),
    )
    .unwrap();
    let r = json_of(
        &slim()
            .args(["compress", "--json", "-q", "--augment", "none", "--config"])
            .arg(&config)
            .output()
            .unwrap(),
    );
    let stage = &r["stages"][1];
    assert_eq!(stage["name"], "nas.sa", "{r}");
    assert!(stage["info"]["search_top1"].is_null(), "{stage}");
    assert!(
        stage["info"]["search_agreement"].as_f64().unwrap() > 0.5,
        "{stage}"
    );
    assert!(stage["agreement"].as_f64().unwrap() > 0.5, "{stage}");
}

/// The ONNX model zoo's MNIST network, compressed from the bundled training digits without
/// their labels, then measured with the test labels: pruned by half its MACs with one epoch
/// of reproducing the original, and quantized to int8.
#[test]
fn the_model_zoos_mnist_network_compressed_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../slim-onnx/tests/fixtures/mnist-conv/model.onnx");
    let original = dir.path().join("mnist.safetensors");
    json_of(
        &slim()
            .arg("import")
            .arg(&onnx)
            .args(["--preprocess", "raw", "--json", "--out"])
            .arg(&original)
            .output()
            .unwrap(),
    );
    let spec = unlabeled_folder(&dir.path().join("digits"), 8004);
    let top1 = |model: &Path| {
        json_of(
            &slim()
                .arg("eval")
                .arg(model)
                .args(["--data", DEFAULT_SPEC, "--json"])
                .output()
                .unwrap(),
        )["top1"]
            .as_f64()
            .unwrap()
    };
    let before = top1(&original);
    let pruned = dir.path().join("pruned.safetensors");
    let p = json_of(
        &slim()
            .arg("prune")
            .arg(&original)
            .args(["--flops-reduction", "0.5", "--finetune-epochs", "1"])
            .args([
                "--data",
                &spec,
                "--augment",
                "none",
                "-q",
                "--json",
                "--out",
            ])
            .arg(&pruned)
            .output()
            .unwrap(),
    );
    let int8 = dir.path().join("int8.safetensors");
    let q = json_of(
        &slim()
            .args(["quant", "ptq"])
            .arg(&original)
            .args(["--data", &spec, "-q", "--json", "--out"])
            .arg(&int8)
            .output()
            .unwrap(),
    );
    let (pa, qa) = (agreement(&p), agreement(&q));
    let (pt, qt) = (top1(&pruned), top1(&int8));
    eprintln!(
        "mnist-conv {:.2}%: pruned -50% agreement {:.2}%, top-1 {:.2}%; int8 agreement {:.2}%, \
         top-1 {:.2}%",
        before * 100.0,
        pa * 100.0,
        pt * 100.0,
        qa * 100.0,
        qt * 100.0
    );
    assert!(p["flops_reduction"].as_f64().unwrap() > 0.45, "{p}");
    assert!(pa >= 0.97 && pt >= before - 0.015, "{p}");
    assert!(qa >= 0.99 && qt >= before - 0.005, "{q}");
}
