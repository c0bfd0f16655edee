//! Distillation: losses against hand computations, the checks before training, teachers
//! without gradients, knowledge files against the online teacher, and resumed runs.

use candle_core::{Device, Tensor};
use slim_core::data::{load_spec, DataSplits, DEFAULT_SPEC};
use slim_core::train::{TrainConfig, TrainOptions};
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;
use slim_distill::losses::{fsp, fsp_matrix, l2, soft_label};
use slim_distill::{
    distill, dump, DistillLoss, Distiller, Knowledge, LossSpec, Shapes, Taps, Teacher, TeacherView,
};

fn t2(rows: &[&[f32]]) -> Tensor {
    let n = rows.len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (n, rows[0].len()), &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    f64::from(t.to_scalar::<f32>().unwrap())
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[test]
fn soft_label_matches_a_hand_computation() {
    let s = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]];
    let t = [[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]];
    for temp in [1.0, 2.0, 4.0] {
        let mut want = 0.0;
        for (sr, tr) in s.iter().zip(&t) {
            let p = softmax(&tr.map(|v| v / temp));
            let q = softmax(&sr.map(|v| v / temp));
            want -= p.iter().zip(&q).map(|(p, q)| p * q.ln()).sum::<f64>();
        }
        want /= 2.0;
        let got = soft_label(
            &t2(&[&s[0].map(|v| v as f32), &s[1].map(|v| v as f32)]),
            &t2(&[&t[0].map(|v| v as f32), &t[1].map(|v| v as f32)]),
            temp,
        )
        .unwrap();
        assert!(
            (scalar(&got) - want).abs() < 1e-5,
            "T={temp}: {} vs {want}",
            scalar(&got)
        );
    }
}

#[test]
fn l2_and_fsp_match_hand_computations() {
    let a = t2(&[&[1.0, 2.0], &[3.0, 5.0]]);
    let b = t2(&[&[0.0, 2.0], &[3.0, 1.0]]);
    // ((1)^2 + 0 + 0 + 4^2) / 4
    assert!((scalar(&l2(&a, &b).unwrap()) - 17.0 / 4.0).abs() < 1e-6);

    // a: one sample, 2 channels of 1x2; b: 1 channel of 1x2.
    let a = Tensor::new(&[[[[1f32, 2.0]], [[3.0, -1.0]]]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[[[4f32, 6.0]]]], &Device::Cpu).unwrap();
    let g = fsp_matrix(&a, &b).unwrap();
    assert_eq!(g.dims(), [1, 2, 1]);
    // G[0,0] = (1*4 + 2*6)/2 = 8, G[1,0] = (3*4 - 1*6)/2 = 3.
    let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v, [8.0, 3.0]);
    let b2 = Tensor::new(&[[[[2f32, 6.0]]]], &Device::Cpu).unwrap();
    // Teacher matrix with b2: [(2+12)/2, (6-6)/2] = [7, 0]; squared differences 1 and 9.
    let f = fsp((&a, &b), (&a, &b2)).unwrap();
    assert!((scalar(&f) - 5.0).abs() < 1e-6);
}

fn small_data() -> DataSplits {
    let mut d = load_spec(DEFAULT_SPEC).unwrap();
    d.train = d.train.take(320);
    d.test = d.test.take(200);
    d
}

fn lenet(width: f64, seed: u64) -> Model {
    let cfg = ZooConfig::new([1, 28, 28]).with_width(width);
    zoo::model("lenet", &cfg, seed, &Device::Cpu).unwrap()
}

fn specs(s: &[&str]) -> Vec<LossSpec> {
    s.iter().map(|x| x.parse().unwrap()).collect()
}

fn err(student: &Model, teacher: Model, loss: &[&str]) -> String {
    let parsed: slim_distill::Result<Vec<LossSpec>> = loss.iter().map(|x| x.parse()).collect();
    match parsed.and_then(|l| {
        Distiller::from_specs(student, vec![Teacher::model(teacher, "t.safetensors")], &l)
    }) {
        Ok(_) => panic!("{loss:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_pairs_are_refused_before_training_with_names() {
    let student = lenet(0.5, 1);
    let e = err(&student, lenet(1.0, 0), &["l2:teacher=fc1,student=fc_1"]);
    assert!(
        e.contains("`fc_1`") && e.contains("close names: fc1"),
        "{e}"
    );
    let e = err(&student, lenet(1.0, 0), &["l2:teacher=pol2,student=pool2"]);
    assert!(
        e.contains("teacher `t.safetensors`") && e.contains("pool2"),
        "{e}"
    );
    // Channel counts differ: 16 vs 8.
    let e = err(&student, lenet(1.0, 0), &["l2:teacher=pool2,student=pool2"]);
    assert!(
        e.contains("[16, 5, 5]") && e.contains("[8, 5, 5]") && e.contains("adapter=true"),
        "{e}"
    );
    let e = err(
        &student,
        lenet(1.0, 0),
        &["l2:teacher=pool2,student=fc1,adapter=true"],
    );
    assert!(e.contains("shapes differ"), "{e}");
    let e = err(&student, lenet(1.0, 0), &["soft_label:temperature=0"]);
    assert!(e.contains("temperature=0") && e.contains("positive"), "{e}");
    let e = err(&student, lenet(1.0, 0), &["soft_label:temperature=-2"]);
    assert!(e.contains("positive"), "{e}");
    let e = err(&student, lenet(1.0, 0), &["soft_label:temprature=2"]);
    assert!(e.contains("`temprature` is not an option"), "{e}");
    let e = err(
        &student,
        lenet(1.0, 0),
        &["fsp:teacher=conv1-relu1,student=conv1-relu1"],
    );
    assert!(e.contains("6x6") && e.contains("3x3"), "{e}");
    let e = err(
        &student,
        lenet(1.0, 0),
        &["fsp:teacher=conv1-pool1,student=conv1-pool1"],
    );
    assert!(e.contains("one spatial size"), "{e}");
    let e = err(&student, lenet(1.0, 0), &["soft_label:teacher_index=1"]);
    assert!(e.contains("1 teacher(s)"), "{e}");
    assert!("kl:temperature=2".parse::<LossSpec>().is_err());
    // A teacher for another input shape.
    let other = zoo::model("lenet", &ZooConfig::new([3, 32, 32]), 0, &Device::Cpu).unwrap();
    let e = err(&student, other, &["soft_label"]);
    assert!(e.contains("[3, 32, 32]"), "{e}");
}

#[test]
fn distillation_trains_the_student_and_leaves_the_teacher_alone() {
    let data = small_data();
    let teacher = lenet(1.0, 0);
    let before = teacher.fingerprint().unwrap();
    let mut student = lenet(0.5, 1);
    let s0 = student.fingerprint().unwrap();
    let mut d = Distiller::from_specs(
        &student,
        vec![Teacher::model(teacher, "teacher")],
        &specs(&[
            "soft_label:temperature=2,t2=true",
            "l2:teacher=pool2,student=pool2,adapter=true,weight=0.5",
            "fsp:teacher=conv2-relu2,student=conv2-relu2",
        ]),
    );
    // conv2-relu2 is 16x16 in the teacher and 8x8 in the student: refused.
    assert!(d.is_err());
    d = Distiller::from_specs(
        &student,
        vec![Teacher::model(lenet(1.0, 0), "teacher")],
        &specs(&[
            "soft_label:temperature=2,t2=true",
            "l2:teacher=pool2,student=pool2,adapter=true,weight=0.5",
        ]),
    );
    let mut d = d.unwrap();
    assert_eq!(slim_core::train::LossTerm::params(&d).len(), 2);
    let cfg = TrainConfig::default().with_epochs(1).with_batch_size(32);
    let r = distill(
        &mut student,
        &mut d,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.losses.len(), 2);
    assert!(
        r.losses.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
        "{:?}",
        r.losses
    );
    assert_ne!(
        student.fingerprint().unwrap(),
        s0,
        "the student did not train"
    );
    let Teacher::Model { model, .. } = &d.teachers()[0] else {
        panic!("not a model teacher")
    };
    assert_eq!(model.fingerprint().unwrap(), before, "the teacher changed");
    // The adapter is not part of the student.
    assert!(student.params.iter().all(|(n, _)| !n.contains("adapter")));

    // FSP between pairs of equal channel counts (a student of the teacher's width).
    let mut same = lenet(1.0, 2);
    let mut d = Distiller::from_specs(
        &same,
        vec![Teacher::model(lenet(1.0, 0), "teacher")],
        &specs(&[
            "fsp:teacher=conv1-relu1,student=conv1-relu1",
            "fsp:teacher=conv2-relu2,student=conv2-relu2",
        ]),
    )
    .unwrap();
    let r = distill(
        &mut same,
        &mut d,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(
        r.losses.iter().all(|(_, v)| v.is_finite()),
        "{:?}",
        r.losses
    );
}

/// A loss of the user's: one minus the cosine similarity of the pooled features of two
/// teachers' and the student's last convolution, averaged over the batch.
struct Cosine {
    node: String,
}

impl DistillLoss for Cosine {
    fn name(&self) -> String {
        "cosine".into()
    }
    fn student_nodes(&self) -> Vec<String> {
        vec![self.node.clone()]
    }
    fn teacher_nodes(&self) -> Vec<(usize, String)> {
        vec![(0, self.node.clone()), (1, self.node.clone())]
    }
    fn loss(&self, student: &Taps, teachers: &[Taps]) -> slim_distill::Result<Tensor> {
        let s = student[&self.node].flatten_from(1)?;
        let mut total = None;
        for t in teachers {
            let t = t[&self.node].flatten_from(1)?;
            let dot = (&s * &t)?.sum(1)?;
            let norms = (s.sqr()?.sum(1)?.sqrt()? * t.sqr()?.sum(1)?.sqrt()?)?;
            let cos = (dot / (norms + 1e-6)?)?;
            let l = (1.0 - cos.mean_all()?)?;
            total = Some(match total {
                Some(x) => (x + l)?,
                None => l,
            });
        }
        Ok(total.expect("two teachers"))
    }
}

#[test]
fn several_teachers_and_a_loss_of_the_users() {
    let data = small_data();
    let mut student = lenet(1.0, 5);
    let teachers = vec![
        Teacher::model(lenet(1.0, 0), "first"),
        Teacher::model(lenet(1.0, 1), "second"),
    ];
    let mut losses: Vec<Box<dyn DistillLoss>> = vec![Box::new(Cosine {
        node: "pool2".into(),
    })];
    // Built-in losses pick their teacher by index.
    for spec in specs(&["soft_label:teacher_index=1,temperature=3"]) {
        let shapes: Shapes = student
            .graph
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), n.shape.clone()))
            .collect();
        let t_shapes = shapes.clone();
        let views = [
            TeacherView {
                label: "first",
                shapes: &t_shapes,
                output: "fc3",
            },
            TeacherView {
                label: "second",
                shapes: &t_shapes,
                output: "fc3",
            },
        ];
        losses.push(spec.build(1, &shapes, "fc3", &views, &Device::Cpu).unwrap());
    }
    let mut d = Distiller::new(&student, teachers, losses).unwrap();
    assert_eq!(d.loss_names(), ["cosine", "soft_label(T=3)"]);
    // The user's loss on held-out images, before and after training.
    let held_out = |student: &Model, d: &Distiller| {
        let n = 64;
        let per = 28 * 28;
        let x: Vec<f32> = data.test.images.as_memory().unwrap()[..n * per]
            .iter()
            .map(|&v| (f32::from(v) / 255.0 - 0.1307) / 0.3081)
            .collect();
        let x = Tensor::from_vec(x, (n, 1, 28, 28), &Device::Cpu).unwrap();
        let taps = |m: &Model| {
            m.forward_with(
                std::slice::from_ref(&x),
                slim_core::Mode::Eval,
                slim_core::ForwardOptions::default().with_taps(&["pool2"]),
            )
            .unwrap()
            .taps
        };
        let teacher_taps: Vec<Taps> = d
            .teachers()
            .iter()
            .map(|t| match t {
                Teacher::Model { model, .. } => taps(model),
                _ => unreachable!("only model teachers here"),
            })
            .collect();
        let c = Cosine {
            node: "pool2".into(),
        };
        scalar(&c.loss(&taps(student), &teacher_taps).unwrap())
    };
    let before = held_out(&student, &d);
    let cfg = TrainConfig::default().with_epochs(2).with_batch_size(32);
    let r = distill(
        &mut student,
        &mut d,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(
        r.losses.iter().all(|(_, v)| v.is_finite()),
        "{:?}",
        r.losses
    );
    let after = held_out(&student, &d);
    assert!(
        after < 0.8 * before,
        "the user's loss went from {before} to {after}"
    );

    // A third teacher that a loss names but nobody gave.
    let e = Distiller::from_specs(
        &student,
        vec![Teacher::model(lenet(1.0, 0), "only")],
        &specs(&["l2:teacher=pool2,student=pool2,teacher_index=2"]),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("teacher_index=2"), "{e}");
}

#[test]
fn knowledge_files_replace_the_teacher_and_refuse_other_data() {
    let data = small_data();
    let teacher = lenet(1.0, 0);
    let dir = tempfile::tempdir().unwrap();
    let kdir = dir.path().join("k");
    let nodes = vec!["fc3".to_string(), "pool2".to_string()];
    let r = dump(
        &teacher,
        "teacher",
        &data.train,
        &data.normalize,
        "mnist",
        &nodes,
        &kdir,
        128,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((r.samples, r.shards, r.reused), (320, 3, 0));
    // A rerun keeps the finished shards: the teacher and data are recognised by their
    // contents, not by the labels given, and a node asked twice is stored once.
    let r = dump(
        &teacher,
        "./teacher",
        &data.train,
        &data.normalize,
        "builtin:mnist",
        &["pool2".to_string(), "fc3".to_string(), "pool2".to_string()],
        &kdir,
        128,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(r.reused, 3);
    // Another teacher into the same directory is refused.
    let e = dump(
        &lenet(1.0, 9),
        "other",
        &data.train,
        &data.normalize,
        "mnist",
        &nodes,
        &kdir,
        128,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("another teacher"), "{e}");
    let e = dump(
        &teacher,
        "teacher",
        &data.train,
        &data.normalize,
        "mnist",
        &nodes,
        &kdir,
        100,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("another shard size"), "{e}");

    let k = Knowledge::open(&kdir, &Device::Cpu).unwrap();
    k.check_teacher(&teacher, "teacher").unwrap();
    assert!(k.check_teacher(&lenet(1.0, 9), "other").is_err());
    // The same images in another order are another data set.
    let mut reversed = data.clone();
    let per = 28 * 28;
    reversed.train.images = data
        .train
        .images
        .as_memory()
        .unwrap()
        .chunks(per)
        .rev()
        .flatten()
        .copied()
        .collect();
    reversed.train.labels = data.train.labels.iter().rev().copied().collect();
    let e = k
        .check_data(&reversed.train, "reversed")
        .unwrap_err()
        .to_string();
    assert!(e.contains("in this order"), "{e}");

    // Training from the files equals training with the teacher in memory.
    let cfg = TrainConfig::default().with_epochs(1).with_batch_size(32);
    let losses = specs(&[
        "soft_label:temperature=4",
        "l2:teacher=pool2,student=pool2,adapter=true",
    ]);
    let mut online = lenet(0.5, 3);
    let mut d =
        Distiller::from_specs(&online, vec![Teacher::model(teacher, "teacher")], &losses).unwrap();
    let a = distill(
        &mut online,
        &mut d,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let mut offline = lenet(0.5, 3);
    let mut d = Distiller::from_specs(&offline, vec![Teacher::Knowledge(k)], &losses).unwrap();
    let b = distill(
        &mut offline,
        &mut d,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    for ((n, x), (_, y)) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "{n}: {x} vs {y}");
    }
    let wa = online.params.tensor("fc3.weight").unwrap();
    let wb = offline.params.tensor("fc3.weight").unwrap();
    let diff = scalar(&(wa - wb).unwrap().abs().unwrap().max_all().unwrap());
    assert!(diff < 1e-3, "weights differ by {diff}");

    // Refused: training on other data, a node the files lack, a missing shard.
    let k = Knowledge::open(&kdir, &Device::Cpu).unwrap();
    let mut d = Distiller::from_specs(
        &offline,
        vec![Teacher::Knowledge(k)],
        &specs(&["soft_label"]),
    )
    .unwrap();
    let e = distill(
        &mut offline,
        &mut d,
        &reversed,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("dump it again"), "{e}");
    // Knowledge of the stored images does not fit randomly cropped or flipped ones.
    let mut augmented = data.clone();
    augmented.augment.hflip = true;
    let e = d.check_data(&augmented).unwrap_err().to_string();
    assert!(e.contains("augmented"), "{e}");
    let k = Knowledge::open(&kdir, &Device::Cpu).unwrap();
    let e = Distiller::from_specs(
        &offline,
        vec![Teacher::Knowledge(k)],
        &specs(&["l2:teacher=fc1,student=fc1"]),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("--node fc1"), "{e}");
    std::fs::remove_file(kdir.join("shard-00001.safetensors")).unwrap();
    let e = Knowledge::open(&kdir, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("shard-00001") && e.contains("missing"), "{e}");
    std::fs::write(kdir.join("shard-00001.safetensors"), b"not a shard").unwrap();
    assert!(Knowledge::open(&kdir, &Device::Cpu).is_err());
    // A shard in another's place.
    std::fs::copy(
        kdir.join("shard-00002.safetensors"),
        kdir.join("shard-00001.safetensors"),
    )
    .unwrap();
    let e = Knowledge::open(&kdir, &Device::Cpu)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("says it is shard 2, not 1"), "{e}");
}

#[test]
fn a_resumed_run_with_an_adapter_matches_an_unbroken_one() {
    let data = small_data();
    let losses = specs(&[
        "l2:teacher=pool2,student=pool2,adapter=true",
        "soft_label:temperature=3",
    ]);
    let cfg = TrainConfig::default().with_epochs(2).with_batch_size(32);
    let mut whole = lenet(0.5, 4);
    let mut d =
        Distiller::from_specs(&whole, vec![Teacher::model(lenet(1.0, 0), "t")], &losses).unwrap();
    distill(
        &mut whole,
        &mut d,
        &data,
        &cfg,
        TrainOptions::default(),
        &mut |_| {},
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("s.ckpt");
    let mut part = lenet(0.5, 4);
    let mut d =
        Distiller::from_specs(&part, vec![Teacher::model(lenet(1.0, 0), "t")], &losses).unwrap();
    let opts = TrainOptions {
        checkpoint: Some(ck.clone()),
        ..Default::default()
    };
    distill(
        &mut part,
        &mut d,
        &data,
        &cfg.clone().with_epochs(1),
        opts,
        &mut |_| {},
    )
    .unwrap();
    // As in a fresh process: a fresh student and a fresh adapter, both at their initial values.
    let mut resumed = lenet(0.5, 4);
    let mut d =
        Distiller::from_specs(&resumed, vec![Teacher::model(lenet(1.0, 0), "t")], &losses).unwrap();
    let opts = TrainOptions {
        checkpoint: Some(ck),
        resume: true,
        ..Default::default()
    };
    let r = distill(&mut resumed, &mut d, &data, &cfg, opts, &mut |_| {}).unwrap();
    assert_eq!(r.train.resumed_from, 1);
    assert_eq!(resumed.fingerprint().unwrap(), whole.fingerprint().unwrap());

    // Resuming with other losses, or another teacher, is refused.
    for (losses, teacher_seed) in [(specs(&["soft_label:temperature=3"]), 0), (losses, 7)] {
        let mut again = lenet(0.5, 4);
        let mut d = Distiller::from_specs(
            &again,
            vec![Teacher::model(lenet(1.0, teacher_seed), "t")],
            &losses,
        )
        .unwrap();
        let opts = TrainOptions {
            checkpoint: Some(dir.path().join("s.ckpt")),
            resume: true,
            ..Default::default()
        };
        let e = distill(
            &mut again,
            &mut d,
            &data,
            &cfg.clone().with_epochs(3),
            opts,
            &mut |_| {},
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("other extra losses or teachers"), "{e}");
    }
}

#[test]
fn every_loss_has_its_own_name() {
    let student = lenet(0.5, 1);
    let d = Distiller::from_specs(
        &student,
        vec![
            Teacher::model(lenet(1.0, 0), "a"),
            Teacher::model(lenet(1.0, 1), "b"),
        ],
        &specs(&[
            "soft_label:temperature=2",
            "soft_label:temperature=2,teacher_index=1",
            " l2 :teacher=fc3,student=fc3",
            "l2:teacher=fc3,student=fc3,weight=2",
        ]),
    )
    .unwrap();
    assert_eq!(
        d.loss_names(),
        [
            "soft_label(T=2)@0",
            "soft_label(T=2)@1",
            "l2(fc3)@0",
            "l2(fc3)@0#2"
        ]
    );
    let e = err(&student, lenet(1.0, 0), &["fsp:teacher=conv1"]);
    assert!(e.contains("A-B"), "{e}");
    let e = err(&student, lenet(1.0, 0), &["fsp:student=conv1-relu1"]);
    assert!(e.contains("teacher=A-B"), "{e}");
}
