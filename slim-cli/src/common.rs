//! Arguments shared by several commands, and the progress display.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use slim_core::data::{load_spec_with, DataOptions, DataSplits};
use slim_core::finite::NonFinite;
use slim_core::train::{OptimizerKind, Progress, Schedule, TrainConfig};
use slim_core::Model;

use crate::{input_error, Failure};

/// Options every command takes.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// Print one JSON object with the results on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How model files are read; every command that reads one takes these.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct LoadArgs {
    /// Load model files whose tensors hold NaN or infinite values (a warning names each
    /// tensor) instead of refusing them.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Read an ONNX graph as computing on one sample: its input's whole shape, first axis
    /// included, is a sample (graphs written without a batch axis). The model then applies the
    /// graph to each sample of a batch.
    #[arg(long)]
    pub single_sample: bool,
}

impl Common {
    /// Where commands compute: the CPU. Slim's kernels (the f32 fast paths, the int8 runtime)
    /// are CPU kernels, and no build of Slim enables candle's CUDA backend, so no command
    /// offers another device.
    pub fn device(&self) -> Result<Device, Failure> {
        Ok(Device::Cpu)
    }
}

/// Loads a model file: a Slim `.safetensors` file, or an ONNX model (`.onnx`), imported with
/// the preprocessing its metadata records, if any. NaN or infinite values are refused unless
/// `load` allows them; then each tensor that holds some gets a warning on stderr.
pub fn load_model(path: &Path, device: &Device, load: &LoadArgs) -> Result<Model, Failure> {
    let import = slim_onnx::ImportOptions {
        allow_nonfinite: load.allow_nonfinite,
        single_sample: load.single_sample,
        ..Default::default()
    };
    let (m, nonfinite) = slim_onnx::load_model(path, device, &import)?;
    warn_nonfinite(path, &nonfinite);
    Ok(m)
}

/// Whether a command trains and measures without labels: asked for (`--label-free`), or the
/// data has none (`unlabeled:DIR`).
pub fn label_free(flag: bool, data: &DataSplits) -> bool {
    flag || !data.train.is_labeled()
}

/// The checkpoint a training job keeps beside its output: `OUT.ckpt`.
pub fn checkpoint_path(out: &Path) -> std::path::PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".ckpt");
    p.into()
}

/// The checkpoint options of every command that trains: resume, how often, keep.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct CheckpointArgs {
    /// Continue from OUT.ckpt if a previous run was stopped (the same arguments give the
    /// same model to continue).
    #[arg(long)]
    pub resume: bool,
    /// Write the checkpoint every STEPS steps too, not only after every epoch (default:
    /// about once a minute), so that a stopped run loses at most that much work.
    #[arg(long, value_name = "STEPS")]
    pub checkpoint_every: Option<usize>,
    /// Keep the checkpoint (OUT.ckpt) after the job finishes; it is removed by default.
    #[arg(long)]
    pub keep_checkpoint: bool,
}

impl CheckpointArgs {
    /// How often the job checkpoints within an epoch: every `--checkpoint-every` steps when
    /// given, else the library's default (about once a minute).
    pub fn every(&self) -> slim_core::train::CheckpointEvery {
        self.checkpoint_every
            .map(slim_core::train::CheckpointEvery::Steps)
            .unwrap_or_default()
    }

    /// Removes a finished job's checkpoint `ckpt` (three times the model's size: the output
    /// file now holds what it was kept for), unless `--keep-checkpoint`. A checkpoint that
    /// cannot be removed gets a warning.
    pub fn finished(&self, ckpt: &Path) {
        if self.keep_checkpoint {
            return;
        }
        match std::fs::remove_file(ckpt) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: {}: not removed: {e}", ckpt.display()),
        }
    }

    /// Fine-tuning by `config`, checkpointing to `ckpt` as the flags say.
    pub fn finetuning<'a>(
        &self,
        config: TrainConfig,
        ckpt: &Path,
    ) -> slim_core::pipeline::Finetuning<'a> {
        slim_core::pipeline::Finetuning {
            checkpoint: Some(ckpt.to_path_buf()),
            resume: self.resume,
            checkpoint_every: self.every(),
            eval_each_epoch: true,
            ..slim_core::pipeline::Finetuning::new(config)
        }
    }
}

/// One warning on stderr per tensor of `path` that holds NaN or infinite values and was
/// loaded anyway.
pub fn warn_nonfinite(path: &Path, found: &[NonFinite]) {
    for nf in found {
        eprintln!(
            "warning: {}: {nf}; loaded anyway (--allow-nonfinite)",
            path.display()
        );
    }
}

static DATA_OPTIONS: std::sync::OnceLock<DataOptions> = std::sync::OnceLock::new();

/// Sets how every command reads image folders (`--val-fraction`, `--skip-bad-images`), once.
pub fn set_data_options(options: DataOptions) {
    let _ = DATA_OPTIONS.set(options);
}

/// The image files left out with `--skip-bad-images` by every data set this command loaded.
static SKIPPED: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

/// A command's JSON report, with `skipped_images` added when `--skip-bad-images` left files
/// out: their count and each file with the reason.
pub fn with_skipped(mut report: serde_json::Value) -> serde_json::Value {
    let skipped = SKIPPED.lock().map(|s| s.clone()).unwrap_or_default();
    if let (Some(obj), false) = (report.as_object_mut(), skipped.is_empty()) {
        let files: Vec<serde_json::Value> = skipped
            .iter()
            .map(|(path, why)| serde_json::json!({"file": path, "reason": why}))
            .collect();
        obj.insert(
            "skipped_images".into(),
            serde_json::json!({"count": files.len(), "files": files}),
        );
    }
    report
}

/// Loads a data spec with the command line's folder options, reporting on stderr the files
/// left out with `--skip-bad-images` (and in the JSON report: [`with_skipped`]).
pub fn load_spec(spec: &str) -> Result<DataSplits, Failure> {
    load_spec_shaped(spec, None)
}

/// [`load_spec`], with image folders decoded straight to `shape` (a model's input) when given.
pub fn load_spec_shaped(spec: &str, shape: Option<[usize; 3]>) -> Result<DataSplits, Failure> {
    let mut options = DATA_OPTIONS.get().cloned().unwrap_or_default();
    options.shape = shape;
    let data = load_spec_with(spec, &options)?;
    if let Ok(mut all) = SKIPPED.lock() {
        for s in &data.skipped {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
    }
    if !data.skipped.is_empty() {
        eprintln!(
            "{spec}: {} bad files skipped (--skip-bad-images):",
            data.skipped.len()
        );
        for (path, why) in data.skipped.iter().take(10) {
            eprintln!("  {}: {why}", path.display());
        }
        if data.skipped.len() > 10 {
            eprintln!("  and {} more", data.skipped.len() - 10);
        }
    }
    Ok(data)
}

/// The data specs every `--data` takes.
pub const DATA_SPECS: &str = "builtin:mnist-10k, mnist:DIR, fashion-mnist:DIR, cifar10:DIR, \
     images:DIR (one folder per class), unlabeled:DIR (images without labels)";

/// The help of a command's `--data`: what the command does with the data, then the specs.
pub fn data_help(what: &str) -> String {
    format!("{what}. Specs: {DATA_SPECS}")
}

/// The data spec for a model: the one given (`--data`), else the one it was trained on (its
/// provenance), else the bundled digits.
pub fn data_spec(given: Option<&str>, model: &Model) -> String {
    given
        .map(str::to_string)
        .or_else(|| model.provenance.get("data").cloned())
        .unwrap_or_else(|| slim_core::data::DEFAULT_SPEC.to_string())
}

/// Loads the data a model is fed: the spec's data set, normalized as the model expects when
/// it records its own preprocessing (imported models), else as the data set's own.
pub fn data_for(spec: &str, model: &Model) -> Result<DataSplits, Failure> {
    load_data_for(spec, None, model)
}

/// [`load_data`] for `model`: image folders decoded to its input, the data fed the way it
/// expects ([`Model::adapt_data`]).
pub fn load_data_for(
    spec: &str,
    limit: Option<usize>,
    model: &Model,
) -> Result<DataSplits, Failure> {
    let mut data = load_data(spec, limit, model.input_shape().try_into().ok())?;
    model.adapt_data(&mut data)?;
    Ok(data)
}

/// Loads a data spec (image folders decoded to `shape` when given); with `limit`, keeps the
/// first N training images only.
pub fn load_data(
    spec: &str,
    limit: Option<usize>,
    shape: Option<[usize; 3]>,
) -> Result<DataSplits, Failure> {
    let mut data = load_spec_shaped(spec, shape)?;
    if let Some(n) = limit {
        data.train = data.train.take(n);
        data.spec = format!("{spec} (first {n} training images)");
    }
    Ok(data)
}

/// A training recipe given on the command line (its flags are [`TrainConfig`]'s), checked.
pub fn checked(recipe: &TrainConfig) -> Result<TrainConfig, Failure> {
    recipe.validate()?;
    Ok(recipe.clone())
}

/// A fine-tuning recipe on the command line: the training after a change (pruning's
/// fine-tuning) and the supernet's training. A gentler default than [`TrainConfig`]'s: a cosine
/// schedule.
#[derive(Args, Clone, Debug)]
pub struct FinetuneFlags {
    /// Learning rate.
    #[arg(long, default_value_t = 0.003)]
    pub lr: f64,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// sgd, adam or adamw.
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// constant, cosine, or step:EVERY:GAMMA.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Seed of the training (weights drawn, batch order, dropout) and of the search.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl FinetuneFlags {
    /// The training configuration for `epochs` epochs (checked by the caller when it
    /// trains).
    pub fn config(&self, epochs: usize) -> Result<TrainConfig, Failure> {
        Ok(TrainConfig {
            epochs,
            batch_size: self.batch_size,
            optimizer: self.optimizer.parse::<OptimizerKind>()?,
            lr: self.lr,
            schedule: self.schedule.parse::<Schedule>()?,
            seed: self.seed,
            ..TrainConfig::default()
        })
    }
}

/// A per-epoch progress bar with loss, accuracy and images per second; hidden when stderr is
/// not a terminal or with `--quiet`.
pub struct EpochBars {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl EpochBars {
    pub fn new(quiet: bool) -> Self {
        EpochBars { bar: None, quiet }
    }

    pub fn update(&mut self, p: &Progress) {
        match p {
            Progress::EpochStart {
                epoch,
                epochs,
                batches,
            } => {
                let template = "epoch {prefix} [{bar:30}] {pos}/{len} {msg}";
                let bar = bar(*batches as u64, self.quiet, template);
                bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
                self.bar = Some(bar);
            }
            Progress::Step {
                step,
                loss,
                accuracy,
                images_per_sec,
                ..
            } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(*step as u64 + 1);
                    let acc = accuracy
                        .map(|a| format!(" acc {:.2}%", a * 100.0))
                        .unwrap_or_default();
                    bar.set_message(format!("loss {loss:.4}{acc} {images_per_sec:.0} img/s"));
                }
            }
            Progress::EpochEnd { report, .. } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                if !self.quiet {
                    eprintln!("{}", report.describe());
                }
            }
        }
    }
}

/// A progress bar of `len` steps drawn by `template` on stderr (hidden with `quiet`, or when
/// stderr is no terminal).
pub fn bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    let target = match quiet {
        true => ProgressDrawTarget::hidden(),
        false => ProgressDrawTarget::stderr(),
    };
    let b = ProgressBar::with_draw_target(Some(len), target);
    b.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

/// Refuses an output path whose directory does not exist, before any work is done.
pub fn check_out_dir(flag: &str, path: &Path) -> Result<(), Failure> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(input_error(format!(
                "{flag} {}: the directory {} does not exist",
                path.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Where a shared search lives, and how its worker behaves.
#[derive(clap::Args)]
pub struct StudyArgs {
    /// The Redis server: redis://HOST:PORT, redis://:PASSWORD@HOST:PORT/DB, rediss://... (TLS).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// rediss://: check the server's certificate against this PEM certificate authority
    /// instead of the system's.
    #[arg(long)]
    pub redis_ca: Option<PathBuf>,
    /// The study's name: every worker of one search gives the same.
    #[arg(long)]
    pub study: Option<String>,
    /// This worker's name in the history (default: HOST-PID).
    #[arg(long)]
    pub worker_name: Option<String>,
    /// A candidate whose worker has not beaten for this many seconds goes to another worker.
    #[arg(long, default_value_t = 60.0)]
    pub lease_seconds: f64,
}

impl StudyArgs {
    /// The study, when --study names one.
    pub fn open(&self) -> Result<Option<slim_dist::RedisStudy>, Failure> {
        let Some(name) = &self.study else {
            return Ok(None);
        };
        let url = slim_dist::RedisUrl::parse_with_ca(&self.redis, self.redis_ca.as_deref())?;
        Ok(Some(slim_dist::RedisStudy::open(&url, name)?))
    }

    pub fn options(&self) -> Result<slim_core::study::WorkerOptions, Failure> {
        if !(self.lease_seconds >= 1.0 && self.lease_seconds <= 86_400.0) {
            return Err(input_error(format!(
                "--lease-seconds must be between 1 and 86400, not {}",
                self.lease_seconds
            )));
        }
        let name = match &self.worker_name {
            Some(n) => n.clone(),
            None => slim_dist::host_pid("worker"),
        };
        slim_dist::check_name("worker", &name)?;
        let mut o = slim_core::study::WorkerOptions::new(name);
        o.lease = std::time::Duration::from_secs_f64(self.lease_seconds);
        Ok(o)
    }
}

/// A study worker's progress, on stderr.
pub fn show_worker(p: &slim_core::study::WorkerProgress<'_>) {
    if let Some(line) = p.describe() {
        eprintln!("{line}");
    }
}
