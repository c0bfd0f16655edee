//! Searches ResNet depths and widths under a limit of 2M multiply-adds on the bundled digits,
//! each candidate trained three epochs on 2,000 images and scored on 500 others:
//! `cargo run --release -p slim-nas --example search`.
use slim_core::{data::load_spec, train::TrainConfig};
use slim_nas::run::{run, Inputs, Method, NasOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = load_spec("builtin:mnist-10k")?;
    let options = NasOptions {
        width: 0.25,
        max_macs: Some(2_000_000),
        iterations: 5,
        train_images: Some(2000),
        candidate_epochs: 3,
        eval_images: 500,
        ..NasOptions::new("resnet")
    };
    let (train, device) = (TrainConfig::default(), candle_core::Device::Cpu);
    let out = tempfile::tempdir()?;
    let inputs = Inputs::new(&data, &train, &device, out.path());
    let (_, report) = run(Method::Train, &options, inputs, &mut |_| {})?;
    println!(
        "{}best: {}, {:.2}% top-1",
        report.markdown,
        report.arch,
        report.reward * 100.0
    );
    Ok(())
}
