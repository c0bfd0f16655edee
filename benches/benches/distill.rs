//! The cost of distillation per training epoch: `mobilenet_tiny` at width 0.5 trained for one
//! epoch on 1,024 MNIST images (batch 32) alone (the baseline), with a soft-label loss from
//! logits precomputed by `dump` (no teacher in memory), and with the width-1.0 teacher run
//! alongside. Target: a distilled epoch at most 1.3x the plain one.

// The allocator of the `slim` binary, so that training is timed as the binary runs it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::Device;
use criterion::{criterion_group, Criterion};
use slim_core::data::{load_spec, DEFAULT_SPEC};
use slim_core::train::{train, TrainConfig, TrainOptions};
use slim_core::zoo::{self, ZooConfig};
use slim_distill::{distill, dump, Distiller, Knowledge, LossSpec, Teacher};

fn epoch(c: &mut Criterion) {
    let mut data = load_spec(DEFAULT_SPEC).expect("the bundled data");
    data.train = data.train.take(1024);
    let cfg = ZooConfig::new([1, 28, 28]);
    let model = |w: f64, seed: u64| {
        zoo::model(
            "mobilenet_tiny",
            &cfg.clone().with_width(w),
            seed,
            &Device::Cpu,
        )
        .expect("mobilenet_tiny builds")
    };
    let recipe = TrainConfig::default().with_epochs(1).with_batch_size(32);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let teacher = model(1.0, 0);
    dump(
        &teacher,
        "teacher",
        &data.train,
        &data.normalize,
        DEFAULT_SPEC,
        &[],
        dir.path(),
        10_000,
        &mut |_, _| {},
    )
    .expect("dump");
    let loss: Vec<LossSpec> = vec!["soft_label:temperature=2".parse().expect("spec")];

    let mut group = c.benchmark_group("mobilenet_tiny_x0.5_epoch_1024");
    group.sample_size(10);
    group.bench_function("baseline_alone", |b| {
        b.iter(|| {
            let mut s = model(0.5, 1);
            train(&mut s, &data, &recipe, TrainOptions::default(), &mut |_| {}).expect("train")
        })
    });
    group.bench_function("soft_label_from_knowledge", |b| {
        b.iter(|| {
            let mut s = model(0.5, 1);
            let k = Knowledge::open(dir.path(), &Device::Cpu).expect("knowledge");
            let mut d =
                Distiller::from_specs(&s, vec![Teacher::Knowledge(k)], &loss).expect("distiller");
            distill(
                &mut s,
                &mut d,
                &data,
                &recipe,
                TrainOptions::default(),
                &mut |_| {},
            )
            .expect("distill")
        })
    });
    group.bench_function("soft_label_online_teacher", |b| {
        b.iter(|| {
            let mut s = model(0.5, 1);
            let t = Teacher::model(model(1.0, 0), "teacher");
            let mut d = Distiller::from_specs(&s, vec![t], &loss).expect("distiller");
            distill(
                &mut s,
                &mut d,
                &data,
                &recipe,
                TrainOptions::default(),
                &mut |_| {},
            )
            .expect("distill")
        })
    });
    group.finish();
}

criterion_group!(benches, epoch);

// Slim's `main` sets up candle's threads (`slim_core::configure_threads`); so do the benches.
fn main() {
    slim_core::configure_threads();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
