//! Prunes a zoo network to half its multiply-adds, batch norms recalibrated on the bundled
//! digits: `cargo run --release -p slim-prune --example prune`.
use slim_core::{analysis::analyze, data::load_spec, zoo};
use slim_prune::run::{run, Choice, Inputs, PruneOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = zoo::ZooConfig::new([1, 28, 28]);
    let model = zoo::model("mobilenet_tiny", &cfg, 0, &candle_core::Device::Cpu)?;
    let data = load_spec("builtin:mnist-10k")?;
    let options = PruneOptions {
        flops_reduction: Some(0.5),
        ..Default::default()
    };
    let inputs = Inputs {
        data: Some(&data),
        ..Default::default()
    };
    let (pruned, report) = run(&model, Choice::Uniform, &options, inputs, &mut |_| {})?;
    let (before, after) = (analyze(&model.graph), analyze(&pruned.graph));
    println!(
        "{} MACs to {} ({:.1}% fewer), {} channel groups pruned",
        before.macs,
        after.macs,
        report.flops_reduction * 100.0,
        report.groups.len()
    );
    Ok(())
}
