//! One-shot search: slices by hand, every candidate of every space inherits from its supernet,
//! a forward through the shared slices equals one through copied weights, the supernet
//! learns through sampled subnets, its training resumes, and Kendall's tau by hand.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use slim_core::data::load_spec;
use slim_core::train::{recalibrate_batch_norm, TrainConfig};
use slim_core::zoo::ZooConfig;
use slim_core::{ForwardOptions, Mode, Model};
use slim_nas::oneshot::{
    inherit, kendall_tau, slice_to, train_supernet, OneShotReward, Slices, SupernetProgress,
};
use slim_nas::{sa_search, Limits, Reward, SaConfig, Spaces};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn slices_are_leading_channels_and_the_kernel_centre() {
    // A [2, 2, 3, 3] weight numbered 0..36; the candidate's [1, 2, 1, 1] takes output
    // channel 0, both inputs, the centre tap (1, 1): values 4 and 13.
    let full = Tensor::arange(0f32, 36.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 2, 3, 3))
        .unwrap();
    let s = slice_to(&full, &[1, 2, 1, 1], "w").unwrap();
    assert_eq!(
        s.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![4.0, 13.0]
    );
    let s = slice_to(&full, &[2, 1, 3, 3], "w").unwrap();
    let v = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        v[..9].to_vec(),
        (0..9).map(|x| x as f32).collect::<Vec<_>>()
    );
    assert_eq!(v[9], 18.0);
    let e = slice_to(&full, &[3, 2, 3, 3], "conv.weight")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv.weight") && e.contains("cannot hold"),
        "{e}"
    );
}

#[test]
fn every_candidate_inherits_and_shared_slices_match_copies() {
    let spaces = Spaces::builtin();
    let cfg = ZooConfig::new([1, 28, 28]).with_width(0.25);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &dev).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for name in spaces.names() {
        let space = spaces.build(&name, &cfg).unwrap();
        let supernet = Model::init(space.graph(&space.supernet()).unwrap(), 1, &dev).unwrap();
        let ranges = space.ranges();
        let mut picks = vec![space.initial(), vec![0; ranges.len()], space.supernet()];
        for _ in 0..6 {
            picks.push(ranges.iter().map(|&r| rng.random_range(0..r)).collect());
        }
        for tokens in picks {
            let copied = inherit(&supernet, space.as_ref(), &tokens).unwrap();
            // The same candidate with other weights of its own, reading the supernet's
            // through the slices: the outputs agree with the copies'.
            let own = Model::init(space.graph(&tokens).unwrap(), 77, &dev).unwrap();
            for (n, p) in copied.params.iter() {
                if !p.kind.is_trainable() {
                    own.params.set(n, p.var.as_tensor()).unwrap();
                }
            }
            let slices = Slices {
                supernet: &supernet.params,
                space: space.as_ref(),
                tokens: &tokens,
            };
            let a = copied.forward(&x, Mode::Eval).unwrap();
            let b = own
                .forward_with(
                    std::slice::from_ref(&x),
                    Mode::Eval,
                    ForwardOptions {
                        params: Some(&slices),
                        ..Default::default()
                    },
                )
                .unwrap()
                .outputs
                .remove(0);
            let d = max_diff(&a, &b);
            assert!(d < 1e-4, "{name} {tokens:?}: {d}");
        }
    }
    // The supernet candidate inherits the supernet's weights unchanged.
    let space = spaces.build("mobilenet_v2", &cfg).unwrap();
    let supernet = Model::init(space.graph(&space.supernet()).unwrap(), 1, &dev).unwrap();
    let same = inherit(&supernet, space.as_ref(), &space.supernet()).unwrap();
    for (n, p) in supernet.params.iter() {
        let d = max_diff(p.var.as_tensor(), &same.params.tensor(n).unwrap());
        assert_eq!(d, 0.0, "{n}");
    }
}

#[test]
fn the_supernet_learns_through_its_subnets_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("supernet.safetensors");
    let space = Spaces::builtin()
        .build("resnet", &ZooConfig::new([1, 28, 28]).with_width(0.25))
        .unwrap();
    let mut data = load_spec("builtin:mnist-10k").unwrap();
    data.train = data.train.take(1536);
    data.test = data.test.take(512);
    let cfg = TrainConfig::default()
        .with_epochs(1)
        .with_batch_size(64)
        .with_lr(0.02);
    let dev = Device::Cpu;
    let mut losses = Vec::new();
    let mut record = |p: &SupernetProgress| {
        if let SupernetProgress::EpochEnd { loss, .. } = p {
            losses.push(*loss)
        }
    };
    train_supernet(
        space.as_ref(),
        &data,
        &cfg,
        None,
        Some(&file),
        Default::default(),
        &dev,
        &mut record,
    )
    .unwrap();
    assert!(file.is_file());
    // Asked for a second epoch, it goes on after the first.
    let cfg2 = cfg.clone().with_epochs(2);
    let mut resumed = None;
    let sup = train_supernet(
        space.as_ref(),
        &data,
        &cfg2,
        None,
        Some(&file),
        Default::default(),
        &dev,
        &mut |p| {
            if let SupernetProgress::Resumed { epochs_done, .. } = p {
                resumed = Some(*epochs_done)
            }
            record(p)
        },
    )
    .unwrap();
    assert_eq!(resumed, Some(1));
    assert_eq!(losses.len(), 2, "{losses:?}");
    assert!(losses[1] < losses[0], "{losses:?}");
    // Another recipe is refused.
    let e = train_supernet(
        space.as_ref(),
        &data,
        &cfg2.clone().with_lr(0.1),
        None,
        Some(&file),
        Default::default(),
        &dev,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("another space, data set or recipe"), "{e}");
    // Subnets with inherited weights, BN statistics recomputed, are far above chance.
    let mut reward = OneShotReward {
        supernet: &sup,
        space: space.as_ref(),
        calibration: data.train.take(512),
        eval: data.test.clone(),
        normalize: data.normalize.clone(),
        supernet_key: serde_json::json!("test"),
        teacher: None,
    };
    for tokens in [space.initial(), space.supernet()] {
        let g = space.graph(&tokens).unwrap();
        let r = reward.reward(&tokens, &g).unwrap();
        // Chance is 0.1; a supernet that did not learn through its subnets stays there (this
        // recipe gives about 0.27; 48 steps are few).
        assert!(r > 0.2, "{tokens:?}: {r}, losses {losses:?}");
    }
    // And the search runs on them.
    let r = sa_search(
        space.as_ref(),
        &Limits {
            max_macs: Some(1_500_000),
            ..Default::default()
        },
        &mut reward,
        &SaConfig {
            iterations: 4,
            ..Default::default()
        },
        None,
        &mut |_| {},
    )
    .unwrap();
    assert!(r.best.measure.macs <= 1_500_000);
    // Recalibration is what the reward relies on: it runs on the inherited model.
    let m = inherit(&sup, space.as_ref(), &r.best.tokens).unwrap();
    assert!(recalibrate_batch_norm(&m, &data.train.take(128), &data.normalize, 64).unwrap() > 0);
}

#[test]
fn kendall_tau_by_hand() {
    assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), 1.0);
    assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
    // Pairs (1,2) concordant, (1,3) concordant, (2,3) discordant: (2 - 1) / 3.
    let t = kendall_tau(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]);
    assert!((t - 1.0 / 3.0).abs() < 1e-12, "{t}");
}

/// Trains a small supernet in `dir`, writing every 2 steps; with `stop_after`, the run is
/// stopped (as a kill would) right after the write that follows that step.
fn supernet_in(dir: &std::path::Path, stop_after: Option<usize>) -> Option<Model> {
    let space = Spaces::builtin()
        .build("resnet", &ZooConfig::new([1, 28, 28]).with_width(0.25))
        .unwrap();
    let mut data = load_spec("builtin:mnist-10k").unwrap();
    data.train = data.train.take(512);
    let cfg = TrainConfig::default()
        .with_epochs(1)
        .with_batch_size(64)
        .with_lr(0.02);
    std::fs::create_dir_all(dir).unwrap();
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train_supernet(
            space.as_ref(),
            &data,
            &cfg,
            None,
            Some(&dir.join("supernet.safetensors")),
            slim_core::train::CheckpointEvery::Steps(2),
            &Device::Cpu,
            &mut |p| {
                if let SupernetProgress::Step { step, .. } = p {
                    if Some(*step) == stop_after {
                        panic!("stopped after step {step}");
                    }
                }
            },
        )
        .unwrap()
    }));
    run.ok()
}

#[test]
fn a_supernet_stopped_between_its_two_writes_resumes_to_the_unbroken_one() {
    let dir = tempfile::tempdir().unwrap();
    let unbroken = supernet_in(&dir.path().join("unbroken"), None).unwrap();
    // The supernet as written after 2 steps, and a run whose optimizer state was written
    // after 4 steps but whose supernet file was not: the file of 2 steps put back.
    let two = dir.path().join("two");
    assert!(supernet_in(&two, Some(1)).is_none());
    let torn = dir.path().join("torn");
    assert!(supernet_in(&torn, Some(3)).is_none());
    std::fs::copy(
        two.join("supernet.safetensors"),
        torn.join("supernet.safetensors"),
    )
    .unwrap();
    let resumed = supernet_in(&torn, None).unwrap();
    for (n, p) in unbroken.params.iter() {
        let d = max_diff(p.var.as_tensor(), &resumed.params.tensor(n).unwrap());
        assert_eq!(d, 0.0, "{n}");
    }
}
