//! Training steps from a folder of JPEG photographs against the same images already decoded
//! in memory: MobileNetV1 (width 0.5) at 3x224x224, batch 32, the usual augmentation (random
//! resized crop and flip) in both. It writes the folder itself (random crops of the three
//! photographs in `slim-core/tests/fixtures/photos`, 256 to 400 pixels a side, JPEG quality
//! 90), reads it twice (`--cache-mb` large: decoded once into memory; `--cache-mb 0`: each
//! batch decoded from the files while the model trains), trains one epoch on each in turn,
//! `ROUNDS` times, and prints the median wall time per step of each and their ratio.
//!
//! ```text
//! cargo run --release -p slim-benches --example folder_steps -- [IMAGES] [ROUNDS]
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use rand::{rngs::StdRng, Rng, SeedableRng};
use slim_core::data::{load_spec_with, DataOptions, DataSplits};
use slim_core::train::{train, Progress, TrainConfig, TrainOptions};
use slim_core::zoo::{self, ZooConfig};

const SHAPE: [usize; 3] = [3, 224, 224];
const BATCH: usize = 32;
const CLASSES: usize = 4;

/// Writes `n` JPEG crops of the fixture photographs into `dir/CLASS/`.
fn write_folder(dir: &Path, n: usize) {
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../slim-core/tests/fixtures/photos");
    let sources: Vec<image::RgbImage> = ["rocket.jpg", "chelsea.png", "camera.png"]
        .iter()
        .map(|f| {
            image::open(photos.join(f))
                .expect("a fixture photograph")
                .to_rgb8()
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0);
    for i in 0..n {
        let src = &sources[i % sources.len()];
        let (w, h) = src.dimensions();
        let (cw, ch) = (
            rng.random_range(w * 3 / 5..=w),
            rng.random_range(h * 3 / 5..=h),
        );
        let (x, y) = (rng.random_range(0..=w - cw), rng.random_range(0..=h - ch));
        let crop = image::imageops::crop_imm(src, x, y, cw, ch).to_image();
        let (ow, oh) = (rng.random_range(256..=400), rng.random_range(256..=400));
        let out = image::imageops::resize(&crop, ow, oh, image::imageops::FilterType::Triangle);
        let class = dir.join(format!("class{}", i % CLASSES));
        std::fs::create_dir_all(&class).expect("a class folder");
        let file = std::fs::File::create(class.join(format!("{i:05}.jpg"))).expect("a file");
        image::codecs::jpeg::JpegEncoder::new_with_quality(file, 90)
            .encode_image(&out)
            .expect("JPEG encoding");
    }
}

/// The wall time of each training step of one epoch on `data`, the first two left out
/// (the loader filling its queue, the allocator warming up).
fn step_times(data: &DataSplits) -> Vec<f64> {
    let cfg = ZooConfig::new(SHAPE).with_width(0.5).with_classes(CLASSES);
    let mut model = zoo::model("mobilenet_v1", &cfg, 0, &Device::Cpu).expect("the model");
    let tc = TrainConfig {
        epochs: 1,
        batch_size: BATCH,
        ..TrainConfig::default()
    };
    let opts = TrainOptions {
        eval_each_epoch: false,
        ..Default::default()
    };
    let mut last = Instant::now();
    let mut times = Vec::new();
    train(&mut model, data, &tc, opts, &mut |p| {
        if let Progress::Step { .. } = p {
            times.push(last.elapsed().as_secs_f64());
            last = Instant::now();
        }
    })
    .expect("training");
    times.split_off(2.min(times.len()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    slim_core::configure_threads();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse().unwrap_or_else(|_| {
                eprintln!("usage: folder_steps [IMAGES] [ROUNDS]");
                std::process::exit(2)
            })
        })
        .collect();
    let images = args.first().copied().unwrap_or(384);
    let rounds = args.get(1).copied().unwrap_or(2);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let started = Instant::now();
    write_folder(dir.path(), images);
    eprintln!(
        "wrote {images} JPEG files in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let spec = format!("images:{}", dir.path().display());
    let read = |cache_mb: usize| {
        let opts = DataOptions {
            cache_mb,
            shape: Some(SHAPE),
            ..Default::default()
        };
        let started = Instant::now();
        let d = load_spec_with(&spec, &opts).expect("the folder");
        (d, started.elapsed().as_secs_f64())
    };
    let ((memory, decode_s), (files, list_s)) = (read(4096), read(0));
    assert!(!memory.train.is_streamed() && files.train.is_streamed());
    eprintln!(
        "read: decoded into memory in {decode_s:.1} s; listed (headers checked) in {list_s:.2} s"
    );
    let (mut from_memory, mut from_files) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        from_memory.extend(step_times(&memory));
        from_files.extend(step_times(&files));
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let (m, f) = (median(&mut from_memory), median(&mut from_files));
    println!(
        "MobileNetV1 x0.5, 3x224x224, batch {BATCH}, {} training images, {} threads",
        memory.train.labels.len(),
        rayon::current_num_threads()
    );
    println!(
        "| images | ms per step (median of {}) | ratio |",
        from_memory.len()
    );
    println!("|---|---:|---:|");
    println!("| decoded in memory | {:.0} | 1.00 |", m * 1e3);
    println!(
        "| JPEG files, decoded per batch | {:.0} | {:.3} |",
        f * 1e3,
        f / m
    );
}
