//! Distils a half-width LeNet from a full-width one, trained first, on the bundled digits:
//! `cargo run --release -p slim-distill --example distill`.
use slim_core::{data::load_spec, train::TrainConfig, zoo::ZooConfig};
use slim_distill::run::{run, DistillOptions, Inputs};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = load_spec("builtin:mnist-10k")?;
    let half = ZooConfig::new([1, 28, 28]).with_width(0.5);
    let student = slim_core::zoo::model("lenet", &half, 0, &candle_core::Device::Cpu)?;
    let options = DistillOptions {
        teacher: vec!["zoo:lenet".into()],
        ..Default::default()
    };
    let train = TrainConfig {
        epochs: 2,
        ..Default::default()
    };
    let (_, report) = run(student, &options, Inputs::new(&data, &train), &mut |_| {})?;
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
    let student_top1 = report.eval.as_ref().map(|e| e.top1);
    println!(
        "teacher top-1 {}, student top-1 {} (losses {:?})",
        pct(report.teachers[0].top1),
        pct(student_top1),
        report.losses
    );
    Ok(())
}
