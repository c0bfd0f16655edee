//! Pruning checked against independent references: importance against candle's own
//! reductions, pruned models against their predicted and measured cost on every zoo family
//! and a concat graph, sensitivity files against a resumed and a merged run, and ratio
//! choices against the curves they come from.

use candle_core::{Device, Tensor};
use slim_core::analysis::analyze;
use slim_core::data::{load_spec, DEFAULT_SPEC};
use slim_core::search::Evaluator;
use slim_core::train::Top1;
use slim_core::zoo::{self, ZooConfig};
use slim_core::{GraphBuilder, Mode, Model};
use slim_prune::auto::{self, AutoConfig, Method};
use slim_prune::criterion::{importance, top_channels};
use slim_prune::sensitivity::{self, EvalData, Sensitivities};
use slim_prune::{Criterion, Pruner, Ratios};

fn zoo_model(name: &str, input: [usize; 3]) -> Model {
    zoo::model(name, &ZooConfig::new(input), 1, &Device::Cpu).unwrap()
}

/// Per-filter norms of a weight computed with candle's reductions: a second implementation.
fn filter_norms(model: &Model, param: &str, l2: bool) -> Vec<f64> {
    let w = model.params.tensor(param).unwrap();
    let n = w.dim(0).unwrap();
    let flat = w.reshape((n, ())).unwrap();
    let r = if l2 {
        flat.sqr().unwrap().sum(1).unwrap().sqrt().unwrap()
    } else {
        flat.abs().unwrap().sum(1).unwrap()
    };
    r.to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn importance_sums_every_producer_of_a_group() {
    // In ResNet-20 the stem and the first stage's second convolutions are joined by the
    // residual additions: one group, several producers.
    let m = zoo_model("resnet20", [1, 28, 28]);
    let p = Pruner::new(&m, Criterion::L1Norm, &[]).unwrap();
    let g = p
        .scope()
        .iter()
        .copied()
        .find(|&g| p.group(g).producers.len() > 1)
        .expect("a residual group");
    let group = p.group(g);
    for (criterion, l2) in [(Criterion::L1Norm, false), (Criterion::L2Norm, true)] {
        let got = importance(&m, group, criterion).unwrap();
        let mut want = vec![0.0; group.channels];
        for prod in &group.producers {
            for (w, v) in want
                .iter_mut()
                .zip(filter_norms(&m, &format!("{prod}.weight"), l2))
            {
                *w += v;
            }
        }
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{criterion}: {a} vs {b}"
            );
        }
    }
    // BN scale: the sum of |gamma| over the group's batch norms.
    let bn_members: Vec<_> = group
        .members
        .iter()
        .filter(|mm| mm.param.ends_with("bn.weight"))
        .collect();
    assert!(!bn_members.is_empty());
    let got = importance(&m, group, Criterion::BnScale).unwrap();
    let mut want = vec![0.0; group.channels];
    for mm in bn_members {
        let gamma = m.params.tensor(&mm.param).unwrap().abs().unwrap();
        for (w, v) in want.iter_mut().zip(gamma.to_vec1::<f32>().unwrap()) {
            *w += f64::from(v);
        }
    }
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "bn_scale: {a} vs {b}");
    }
}

#[test]
fn fpgm_ranks_the_filter_nearest_the_others_lowest() {
    // Three filters: two far apart and one in the middle; the middle one is the geometric
    // median and the first to go. Distances by hand: |a-b| = 4, |a-c| = 2, |b-c| = 2.
    let mut b = GraphBuilder::new([1, 1, 1]);
    b.conv("c", 3, 1, 1, 0)
        .relu("r")
        .flatten("f")
        .linear("fc", 2);
    let m = Model::init(b.build().unwrap(), 0, &Device::Cpu).unwrap();
    let w = Tensor::new(&[0.0f32, 4.0, 2.0], &Device::Cpu)
        .unwrap()
        .reshape((3, 1, 1, 1))
        .unwrap();
    m.params.set("c.weight", &w).unwrap();
    let p = Pruner::new(&m, Criterion::Fpgm, &["c".into()]).unwrap();
    let g = p.scope()[0];
    let imp = p.importance(g).unwrap();
    assert_eq!(imp, &[6.0, 6.0, 4.0]);
    assert_eq!(top_channels(imp, 2), vec![0, 1]);
    // L1 keeps the largest filters instead.
    let l1 = Pruner::new(&m, Criterion::L1Norm, &["c".into()]).unwrap();
    assert_eq!(top_channels(l1.importance(g).unwrap(), 2), vec![1, 2]);
    // No batch norm here: bn_scale says so.
    let e = Pruner::new(&m, Criterion::BnScale, &["c".into()])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no batch norm"), "{e}");
}

#[test]
fn pruned_channels_are_the_least_important() {
    let m = zoo_model("lenet", [1, 28, 28]);
    let p = Pruner::new(&m, Criterion::L1Norm, &["conv2".into()]).unwrap();
    let g = p.scope()[0];
    let norms = filter_norms(&m, "conv2.weight", false);
    let pruned = p.apply(&Ratios::from([(g, 0.5)])).unwrap();
    let kept = pruned.params.tensor("conv2.weight").unwrap();
    assert_eq!(kept.dim(0).unwrap(), 8);
    let kept_norms = filter_norms(&pruned, "conv2.weight", false);
    let mut sorted = norms.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let mut kept_sorted = kept_norms.clone();
    kept_sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    assert_eq!(kept_sorted, sorted[..8].to_vec());
}

/// A graph with parallel branches joined by concatenation, as in Inception.
fn concat_model() -> Model {
    let mut b = GraphBuilder::new([3, 12, 12]);
    b.conv("stem", 8, 3, 1, 1).bn("stem.bn").relu("stem.relu");
    b.conv("a", 6, 1, 1, 0).relu("a.relu");
    b.at("stem.relu").conv("b", 10, 3, 1, 1).relu("b.relu");
    b.concat("cat", &["a.relu", "b.relu"])
        .bn("cat.bn")
        .relu("cat.relu");
    b.conv("mix", 12, 3, 2, 1)
        .relu("mix.relu")
        .global_avg_pool("gap")
        .flatten("flat");
    b.linear("fc", 5);
    Model::init(b.build().unwrap(), 3, &Device::Cpu).unwrap()
}

#[test]
fn every_family_prunes_to_half_the_flops_and_runs() {
    let mut cases: Vec<(String, Model)> = [
        ("lenet", [1, 28, 28]),
        ("vgg11", [3, 32, 32]),
        ("resnet20", [1, 28, 28]),
        ("resnet56", [3, 32, 32]),
        ("resnet50", [3, 32, 32]),
        ("mobilenet_v1", [1, 28, 28]),
        ("mobilenet_v2", [3, 32, 32]),
        ("mobilenet_tiny", [1, 28, 28]),
    ]
    .into_iter()
    .map(|(n, i)| (n.to_string(), zoo_model(n, i)))
    .collect();
    cases.push(("concat".into(), concat_model()));
    for (name, m) in &cases {
        let before = analyze(&m.graph);
        let p = Pruner::new(m, Criterion::L1Norm, &[]).unwrap();
        let plan = p.uniform_for_reduction(0.5).unwrap();
        let predicted = plan.reduction;
        assert!((predicted - 0.5).abs() <= 0.01, "{name}: {predicted}");
        let pruned = p.apply(&plan.ratios).unwrap();
        let after = analyze(&pruned.graph);
        let real = 1.0 - after.macs as f64 / before.macs as f64;
        assert!(
            (real - predicted).abs() < 1e-9,
            "{name}: {real} vs {predicted}"
        );
        assert!(after.params < before.params, "{name}");
        let shape: Vec<usize> = std::iter::once(2).chain(m.input_shape()).collect();
        let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
        let y = pruned.forward(&x, Mode::Eval).unwrap();
        let classes = m.graph.node(m.graph.outputs()[0]).shape.clone();
        assert_eq!(y.dims()[1..], classes[..], "{name}");
        // The file round trip keeps the smaller graph.
        let back = Model::from_bytes(&pruned.to_bytes().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(analyze(&back.graph).macs, after.macs, "{name}");
    }
}

/// A trained LeNet (a few hundred steps) and a small evaluation set.
fn trained_lenet() -> (Model, Top1, EvalData) {
    let mut data = load_spec(DEFAULT_SPEC).unwrap();
    data.train = data.train.take(2000);
    let mut m = zoo_model("lenet", [1, 28, 28]);
    let cfg = slim_core::train::TrainConfig::default()
        .with_epochs(1)
        .with_lr(0.003);
    slim_core::train::train(&mut m, &data, &cfg, Default::default(), &mut |_| {}).unwrap();
    let set = data.test.take(300);
    let eval = EvalData {
        description: "first 300 test images".into(),
        fingerprint: set.fingerprint(),
    };
    let top1 = Top1 {
        set,
        normalize: data.normalize.clone(),
        batch_size: 300,
    };
    (m, top1, eval)
}

#[test]
fn sensitivity_resumes_refuses_other_models_merges_and_chooses_ratios() {
    let (m, top1, eval) = trained_lenet();
    let base = top1.score(&m).unwrap();
    assert!(base > 0.8, "the baseline learned something: {base}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sens.json");
    let p = Pruner::new(&m, Criterion::L1Norm, &[]).unwrap();
    let ratios = [0.2, 0.5, 0.8];
    // Part of the analysis (two ratios), then the rest resumed from the file.
    let first = sensitivity::analyze(&p, &top1, &ratios[..2], &eval, Some(&file), &|_| {}).unwrap();
    assert_eq!(first.len(), p.scope().len() * 2);
    let on_disk = Sensitivities::load(&file).unwrap();
    assert_eq!(on_disk, first);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let full = sensitivity::analyze(&p, &top1, &ratios, &eval, Some(&file), &|ev| {
        if let sensitivity::SensitivityProgress::Point { .. } = ev {
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    assert_eq!(
        done.into_inner(),
        p.scope().len(),
        "only the missing points were measured"
    );
    assert_eq!(full.len(), p.scope().len() * 3);
    // Each point is what pruning that group alone gives.
    let (key, curve) = full.groups.iter().next().unwrap();
    let g = p.id_of(key).unwrap();
    let point = &curve.points[2];
    let direct = top1
        .score(&p.apply(&Ratios::from([(g, point.ratio)])).unwrap())
        .unwrap();
    assert_eq!(direct, point.top1);
    assert!((point.loss - (base - direct) / base).abs() < 1e-12);

    // Another model is refused, and nothing is written.
    let other = zoo_model("lenet", [1, 28, 28]);
    let po = Pruner::new(&other, Criterion::L1Norm, &[]).unwrap();
    let before = std::fs::read(&file).unwrap();
    let e = sensitivity::analyze(&po, &top1, &ratios, &eval, Some(&file), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("another model"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), before);

    // Two halves merge into the whole.
    let mut a = full.clone();
    let mut b = full.clone();
    for c in a.groups.values_mut() {
        c.points.truncate(1);
    }
    for c in b.groups.values_mut() {
        c.points.remove(0);
    }
    assert_eq!(Sensitivities::merge(vec![a, b]).unwrap(), full);
    let mut foreign = full.clone();
    foreign.model = "0000000000000000".into();
    assert!(Sensitivities::merge(vec![full.clone(), foreign]).is_err());

    // Ratios for a FLOPs target: the target is met (within 1%), no group is emptied, and
    // the predicted loss is no worse than uniform pruning's.
    let chosen = sensitivity::ratios_for_reduction(&full, &p, 0.5).unwrap();
    let reduction = p.predict_reduction(&chosen);
    assert!((0.5..=0.51).contains(&reduction), "{reduction}");
    let pruned = p.apply(&chosen).unwrap();
    assert!(pruned
        .forward(
            &Tensor::zeros((1, 1, 28, 28), candle_core::DType::F32, &Device::Cpu).unwrap(),
            Mode::Eval
        )
        .is_ok());
    let uniform = p.uniform_for_reduction(0.5).unwrap().ratios;
    let loss_s = sensitivity::predicted_loss(&full, &p, &chosen).unwrap();
    let loss_u = sensitivity::predicted_loss(&full, &p, &uniform).unwrap();
    assert!(
        loss_s <= loss_u + 1e-12,
        "sensitivity {loss_s} vs uniform {loss_u}"
    );
    // A loss budget is respected.
    let budgeted = sensitivity::ratios_for_loss(&full, &p, 0.02).unwrap();
    assert!(sensitivity::predicted_loss(&full, &p, &budgeted).unwrap() <= 0.02 + 1e-12);
    // The plot names every group.
    let svg = sensitivity::to_svg(&full);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for key in full.groups.keys() {
        assert!(svg.contains(key.as_str()), "{key}");
    }
}

#[test]
fn automatic_pruning_meets_the_limit_beats_its_start_and_resumes() {
    let (m, top1, eval) = trained_lenet();
    let p = Pruner::new(&m, Criterion::L1Norm, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hist = dir.path().join("auto.json");
    for method in [Method::annealing(), Method::evolution()] {
        let cfg = AutoConfig {
            trials: 12,
            method: method.clone(),
            ..AutoConfig::new(0.5)
        };
        let key = serde_json::json!({"data": eval.fingerprint});
        let run = |trials: usize| {
            let cfg = AutoConfig {
                trials,
                ..cfg.clone()
            };
            auto::search(
                &p,
                &cfg,
                None,
                &top1,
                None,
                Some(&hist),
                key.clone(),
                &mut |_| {},
            )
            .unwrap()
        };
        let _ = std::fs::remove_file(&hist);
        let part = run(5);
        assert_eq!(part.history.trials.len(), 5);
        let full = run(12);
        assert_eq!(full.history.trials[..5], part.history.trials[..]);
        for t in &full.history.trials {
            let r: Ratios = p
                .scope()
                .iter()
                .zip(&t.tokens)
                .map(|(&g, &k)| (g, k as f64 / p.group(g).channels as f64))
                .collect();
            assert!(p.predict_reduction(&r) >= 0.5 - 1e-12, "{method:?}: {t:?}");
        }
        assert!(full.reward >= full.initial_reward, "{method:?}");
        assert!(full.reduction >= 0.5);
        let direct = top1.score(&p.apply(&full.ratios).unwrap()).unwrap();
        assert_eq!(direct, full.reward);
    }
}
