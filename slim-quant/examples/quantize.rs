//! Trains a LeNet for an epoch on the bundled digits, quantizes it to int8 after 4
//! calibration batches, and measures both, the int8 model on the int8 runtime:
//! `cargo run --release -p slim-quant --example quantize`.
use slim_core::{data::load_spec, train, zoo};
use slim_quant::{ptq, runtime};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = load_spec("builtin:mnist-10k")?;
    let cfg = zoo::ZooConfig::new([1, 28, 28]);
    let mut model = zoo::model("lenet", &cfg, 0, &candle_core::Device::Cpu)?;
    let recipe = train::TrainConfig::default().with_epochs(1);
    train::train(&mut model, &data, &recipe, Default::default(), &mut |_| {})?;
    let calibration = ptq::PtqConfig {
        batches: 4,
        ..Default::default()
    };
    let (int8, _) = ptq::quantize(&model, &data.train, &data.normalize, &calibration)?;
    let f32_top1 = train::evaluate(&model, &data.test, &data.normalize, 256)?.top1;
    let int8_top1 = runtime::evaluate(&int8, &data.test, &data.normalize, 256)?.top1;
    println!(
        "top-1: f32 {:.2}%, int8 {:.2}%",
        f32_top1 * 100.0,
        int8_top1 * 100.0
    );
    Ok(())
}
