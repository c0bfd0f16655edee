//! Channel-group analysis plus 50% surgery of every prunable group of ResNet-50 at 224x224,
//! with real parameter tensors (25.6 M parameters). Baseline in the same run: a deep copy of
//! every parameter, the least any surgery that returns a new model must do. Target: the
//! surgery under 1 s on a 2-core machine.

// The allocator of the `slim` binary, so that kernels are timed as the binary runs them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::Device;
use criterion::{criterion_group, Criterion};
use slim_core::deps::channel_groups;
use slim_core::zoo::{self, ZooConfig};

fn surgery(c: &mut Criterion) {
    let model = zoo::model("resnet50", &ZooConfig::new([3, 224, 224]), 0, &Device::Cpu)
        .expect("resnet50 builds at 224x224");
    let mut group = c.benchmark_group("resnet50_224");
    group.sample_size(10);
    group.bench_function("baseline_deep_copy", |b| {
        b.iter(|| model.params.deep_clone().expect("copy"))
    });
    group.bench_function("groups_and_prune_half", |b| {
        b.iter(|| {
            let groups = channel_groups(&model.graph);
            let plan: Vec<(usize, Vec<usize>)> = groups
                .prunable()
                .map(|g| (g.id, (0..g.channels / 2).collect()))
                .collect();
            groups.prune(&model, &plan).expect("prune")
        })
    });
    group.finish();
}

criterion_group!(benches, surgery);

// Slim's `main` sets up candle's threads (`slim_core::configure_threads`); so do the benches.
fn main() {
    slim_core::configure_threads();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
