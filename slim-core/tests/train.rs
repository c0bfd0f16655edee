//! The training loop on real data: it learns, it is seeded, and a run resumed from a
//! checkpoint ends exactly where an unbroken one does.

use candle_core::Device;
use slim_core::data::{load_spec, DataSplits, DEFAULT_SPEC};
use slim_core::train::{
    evaluate, train, CheckpointEvery, OptimizerKind, Progress, TrainConfig, TrainOptions,
};
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;

fn small_mnist(train_n: usize, test_n: usize) -> DataSplits {
    let mut d = load_spec(DEFAULT_SPEC).unwrap();
    d.train = d.train.take(train_n);
    d.test = d.test.take(test_n);
    d
}

fn lenet(seed: u64) -> Model {
    zoo::model("lenet", &ZooConfig::new([1, 28, 28]), seed, &Device::Cpu).unwrap()
}

fn values(m: &Model) -> Vec<Vec<f32>> {
    m.params
        .iter()
        .map(|(_, p)| {
            p.var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn lenet_learns_mnist_in_seconds() {
    let data = small_mnist(3000, 500);
    let mut model = lenet(0);
    let before = evaluate(&model, &data.test, &data.normalize, 250).unwrap();
    let cfg = TrainConfig::default().with_epochs(2).with_lr(0.003);
    let mut steps = 0;
    let report = train(
        &mut model,
        &data,
        &cfg,
        TrainOptions {
            eval_each_epoch: true,
            ..Default::default()
        },
        &mut |p| {
            if let Progress::Step { .. } = p {
                steps += 1
            }
        },
    )
    .unwrap();
    assert_eq!(steps, 2 * (3000 / 64));
    let after = evaluate(&model, &data.test, &data.normalize, 250).unwrap();
    assert!(before.top1 < 0.3, "{before:?}");
    assert!(after.top1 > 0.85, "{after:?}");
    assert!(after.top5 >= after.top1 && after.top5 > 0.95, "{after:?}");
    // The per-epoch test figures are those of a later evaluation of the same model.
    let last = report.epochs[1].test.as_ref().unwrap();
    assert_eq!(
        (last.top1, last.top5, last.samples),
        (after.top1, after.top5, after.samples)
    );
    assert!(report.epochs[1].loss < report.epochs[0].loss);
}

#[test]
fn same_seed_same_model_and_resume_matches_an_unbroken_run() {
    let data = small_mnist(640, 100);
    let cfg = TrainConfig::default()
        .with_epochs(2)
        .with_optimizer(OptimizerKind::Sgd)
        .with_lr(0.05)
        .with_seed(3);
    let cfg = TrainConfig {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-4,
        ..cfg
    };
    let run = || {
        let mut m = lenet(1);
        train(&mut m, &data, &cfg, TrainOptions::default(), &mut |_| {}).unwrap();
        values(&m)
    };
    let unbroken = run();
    assert_eq!(unbroken, run());

    // One epoch with a checkpoint, then a new process-like start that resumes from it.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("run.ckpt");
    let mut first = lenet(1);
    let one = TrainConfig {
        epochs: 1,
        ..cfg.clone()
    };
    train(
        &mut first,
        &data,
        &one,
        TrainOptions {
            checkpoint: Some(ck.clone()),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let mut resumed = lenet(1);
    let report = train(
        &mut resumed,
        &data,
        &cfg,
        TrainOptions {
            checkpoint: Some(ck.clone()),
            resume: true,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(report.resumed_from, 1);
    assert_eq!(report.epochs.len(), 1);
    assert_eq!(values(&resumed), unbroken);

    // A checkpoint from another recipe is refused with the file's name.
    let other = TrainConfig {
        lr: 0.01,
        ..cfg.clone()
    };
    let e = train(
        &mut lenet(1),
        &data,
        &other,
        TrainOptions {
            checkpoint: Some(ck.clone()),
            resume: true,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("run.ckpt") && e.contains("recipe"), "{e}");
}

#[test]
fn dropout_is_seeded_too() {
    // MobileNetV2 has dropout before its classifier: two runs with one seed still agree.
    let data = small_mnist(64, 10);
    let cfg = TrainConfig::default()
        .with_epochs(1)
        .with_batch_size(32)
        .with_seed(4);
    let run = || {
        let mut m = zoo::model(
            "mobilenet_v2",
            &ZooConfig::new([1, 28, 28]).with_width(0.25),
            2,
            &Device::Cpu,
        )
        .unwrap();
        train(&mut m, &data, &cfg, TrainOptions::default(), &mut |_| {}).unwrap();
        values(&m)
    };
    assert_eq!(run(), run());
}

#[test]
fn mismatched_model_and_data_are_refused() {
    let data = small_mnist(128, 10);
    let mut m = zoo::model("lenet", &ZooConfig::new([3, 32, 32]), 0, &Device::Cpu).unwrap();
    let e = train(
        &mut m,
        &data,
        &TrainConfig::default(),
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("[3, 32, 32]"), "{e}");
    let mut m = lenet(0);
    let e = train(
        &mut m,
        &data,
        &TrainConfig::default().with_epochs(0),
        TrainOptions::default(),
        &mut |_| {},
    );
    assert!(e.unwrap_err().to_string().contains("epochs"));
}

#[test]
fn an_optimizer_state_with_an_impossible_step_count_is_refused() {
    let m = lenet(0);
    let opt = slim_core::train::Optimizer::new(OptimizerKind::Adam, &m, &[]).unwrap();
    let (slots, steps) = opt.state();
    let slots: std::collections::HashMap<String, candle_core::Tensor> = slots.into_iter().collect();
    let mut fresh = slim_core::train::Optimizer::new(OptimizerKind::Adam, &m, &[]).unwrap();
    fresh.restore(&slots, steps).unwrap();
    let e = fresh.restore(&slots, usize::MAX).unwrap_err();
    assert!(e.contains("step count"), "{e}");
}

/// An extra loss term that is NaN at its `at`-th call (counting from 1), zero otherwise.
struct NanAt {
    at: usize,
    calls: usize,
}

impl slim_core::train::LossTerm for NanAt {
    fn name(&self) -> &str {
        "nan_at"
    }
    fn loss(
        &mut self,
        _batch: &slim_core::data::Batch,
        _out: &slim_core::ForwardOutput,
    ) -> slim_core::Result<candle_core::Tensor> {
        self.calls += 1;
        let v = if self.calls == self.at { f32::NAN } else { 0.0 };
        Ok(candle_core::Tensor::new(v, &Device::Cpu)?)
    }
}

#[test]
fn a_nan_loss_names_epoch_and_step_and_the_checkpoint_kept() {
    // 640 images in batches of 64: 10 steps an epoch; the 13th is epoch 2, step 3.
    let data = small_mnist(640, 10);
    let cfg = TrainConfig::default().with_epochs(3);
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("run.ckpt");
    let mut term = NanAt { at: 13, calls: 0 };
    let e = train(
        &mut lenet(0),
        &data,
        &cfg,
        TrainOptions {
            checkpoint: Some(ck.clone()),
            extra: vec![&mut term],
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        format!(
            "the loss became NaN at epoch 2, step 3 of 10; lower the learning rate. The last \
             good checkpoint, {} (after epoch 1), is kept: --resume goes on from it with the \
             same recipe",
            ck.display()
        )
    );
    assert!(ck.exists());
    // In the first epoch there is no checkpoint to speak of.
    let mut term = NanAt { at: 2, calls: 0 };
    let e = train(
        &mut lenet(0),
        &data,
        &cfg,
        TrainOptions {
            checkpoint: Some(dir.path().join("other.ckpt")),
            extra: vec![&mut term],
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "the loss became NaN at epoch 1, step 2 of 10; lower the learning rate"
    );
}

/// Checkpoints written within an epoch: a run resumed from any of them ends with the unbroken
/// run's weights and epoch figures, bit for bit. Each copy of the checkpoint file taken as the
/// run goes stands for a run killed at that moment.
#[test]
fn a_run_resumed_from_a_step_checkpoint_matches_an_unbroken_run() {
    let data = small_mnist(640, 100);
    let cfg = TrainConfig::default()
        .with_epochs(2)
        .with_optimizer(OptimizerKind::Adam)
        .with_seed(5);
    let batches = 640 / 64;
    let mut unbroken = lenet(2);
    let full = train(
        &mut unbroken,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("run.ckpt");
    // Copies of the checkpoint as it stood at a few steps of the run: (epoch, step) -> file.
    let kill_at = [(0, 4), (1, 1), (1, 8)];
    let mut copies = Vec::new();
    let mut first = lenet(2);
    train(
        &mut first,
        &data,
        &cfg,
        TrainOptions {
            checkpoint: Some(ck.clone()),
            checkpoint_every: CheckpointEvery::Steps(3),
            ..Default::default()
        },
        &mut |p| {
            if let Progress::Step { epoch, step, .. } = p {
                if kill_at.contains(&(*epoch, *step)) {
                    let copy = dir.path().join(format!("killed-{epoch}-{step}.ckpt"));
                    std::fs::copy(&ck, &copy).unwrap();
                    copies.push(((*epoch, *step), copy));
                }
            }
        },
    )
    .unwrap();
    assert_eq!(values(&first), values(&unbroken));
    assert_eq!(copies.len(), kill_at.len());
    for ((epoch, step), copy) in copies {
        let mut resumed = lenet(2);
        let report = train(
            &mut resumed,
            &data,
            &cfg,
            TrainOptions {
                checkpoint: Some(copy.clone()),
                resume: true,
                checkpoint_every: CheckpointEvery::Steps(3),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
        // Checkpoints land after steps 3, 6 and 9 of each epoch, and at each epoch's end (step
        // 10 of 10 is the epoch's own checkpoint): the copy at step s holds the last of them.
        let done = epoch * batches + (step + 1) / 3 * 3;
        assert_eq!(
            report.resumed_from * batches + report.resumed_at_step,
            done,
            "killed at epoch {epoch}, step {step}"
        );
        assert_eq!(
            values(&resumed),
            values(&unbroken),
            "killed at {epoch}/{step}"
        );
        let last = report.epochs.last().unwrap();
        let whole = full.epochs.last().unwrap();
        assert_eq!((last.loss, last.train_top1), (whole.loss, whole.train_top1));
    }
    // Zero steps between checkpoints is refused.
    let e = train(
        &mut lenet(2),
        &data,
        &cfg,
        TrainOptions {
            checkpoint: Some(dir.path().join("x.ckpt")),
            checkpoint_every: CheckpointEvery::Steps(0),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("0 steps"), "{e}");
}

/// Training without labels: a fresh half-width LeNet learns to reproduce a trained LeNet from
/// its outputs alone (the images' labels hidden), and fidelity measures it: top-1 agreement
/// with the original, relative L2 error and cosine similarity of the scores.
#[test]
fn label_free_training_reproduces_the_original() {
    use slim_core::reproduce::Reproduce;
    use slim_core::train::fidelity;
    let mut data = load_spec(DEFAULT_SPEC).unwrap();
    data.train = data.train.take(2048);
    data.test = data.test.take(500);
    let cfg = TrainConfig::default().with_epochs(1);
    let mut original = lenet(0);
    train(
        &mut original,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    // The same images without their labels.
    let mut unlabeled = data.clone();
    unlabeled.train.classes = 0;
    unlabeled.test.classes = 0;
    let itself = fidelity(&original, &original, &unlabeled.test, &data.normalize, 128).unwrap();
    let o = &itself.outputs[0];
    assert_eq!((itself.samples, o.top1_agreement), (500, Some(1.0)));
    assert!(
        o.relative_l2 == 0.0 && (o.cosine - 1.0).abs() < 1e-9,
        "{o:?}"
    );

    let student_cfg = ZooConfig::new([1, 28, 28]).with_width(0.5);
    let mut student = zoo::model("lenet", &student_cfg, 1, &Device::Cpu).unwrap();
    let before = fidelity(&student, &original, &unlabeled.test, &data.normalize, 128).unwrap();
    // Without labels and without a model to reproduce there is nothing to learn from.
    let e = train(
        &mut student.deep_clone().unwrap(),
        &unlabeled,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has no labels"), "{e}");
    let mut teacher = Reproduce::new(original.deep_clone().unwrap()).unwrap();
    let two = TrainConfig::default().with_epochs(2);
    train(
        &mut student,
        &unlabeled,
        &two,
        TrainOptions {
            extra: vec![&mut teacher],
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    let after = fidelity(&student, &original, &unlabeled.test, &data.normalize, 128).unwrap();
    let (b, a) = (&before.outputs[0], &after.outputs[0]);
    eprintln!("before {b:?}\nafter {a:?}");
    assert!(a.top1_agreement.unwrap() > 0.85, "{a:?}");
    assert!(a.top1_agreement.unwrap() > b.top1_agreement.unwrap() + 0.5);
    assert!(
        a.relative_l2 < b.relative_l2 && a.cosine > b.cosine,
        "{b:?} -> {a:?}"
    );
}
