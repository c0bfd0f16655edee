//! Running a pipeline: the baseline (trained or read), then every stage from the model it
//! starts from, each model saved and measured, with the state in the output folder that lets
//! a stopped run resume; then the report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::json;
use slim_core::analysis::analyze;
use slim_core::data::DataSplits;
use slim_core::io::write_atomic;
use slim_core::pipeline::{Context, Strategy, Train};
use slim_core::train::{evaluate, Progress};
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;

use crate::config::{Pipeline, Source};
use crate::report::{plot, time_stages, write_table, Row};
use crate::{invalid, Result};

/// The pipeline's state in its output folder: which configuration, and the finished stages.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    config: String,
    stages: Vec<Row>,
}

const STATE_FORMAT: &str = "slim-pipeline/1";
/// The state file in the output folder.
pub const STATE_FILE: &str = "pipeline.json";
/// The file name of the int8 ONNX export of [`RunOptions::export`].
pub const ONNX_EXPORT: &str = "model.int8.onnx";

/// Reads a model file.
pub type LoadModel<'a> = &'a dyn Fn(&Path) -> Result<Model>;
/// Reads a data spec.
pub type LoadData<'a> = &'a dyn Fn(&str) -> Result<DataSplits>;

/// How a pipeline runs.
pub struct RunOptions<'a> {
    /// The output folder (the configuration's `[output] dir` unless given).
    pub dir: Option<PathBuf>,
    /// Continue a stopped run in the folder.
    pub resume: bool,
    /// Start over in a folder that holds another (or this) pipeline's results.
    pub force: bool,
    pub device: Device,
    /// Also write the configuration (pipeline.toml) and the last model as int8 ONNX for ONNX
    /// Runtime ([`ONNX_EXPORT`]) into the folder.
    pub export: bool,
    /// Reads model files (default: Slim's files, and ONNX through `slim-onnx`'s importer).
    pub load_model: Option<LoadModel<'a>>,
    /// Reads the data spec (default: `slim_core::data::load_spec`).
    pub load_data: Option<LoadData<'a>>,
    /// Silence for the stages' long work (their progress still goes to the events).
    pub quiet: bool,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        RunOptions {
            dir: None,
            resume: false,
            force: false,
            device: Device::Cpu,
            export: false,
            load_model: None,
            load_data: None,
            quiet: false,
        }
    }
}

impl RunOptions<'_> {
    fn load(&self, path: &Path) -> Result<Model> {
        if let Some(load) = self.load_model {
            return load(path);
        }
        let import = slim_onnx::ImportOptions::default();
        Ok(slim_onnx::load_model(path, &self.device, &import)?.0)
    }
}

/// Where a run tells what it does.
pub struct Events<'a> {
    /// A line for each stage as it starts (or is read back).
    pub note: &'a dyn Fn(&str),
    /// Training progress.
    pub progress: &'a mut dyn FnMut(&Progress),
    /// A one-line status of other long work; an empty line when a stage ends.
    pub status: &'a (dyn Fn(&str) + Sync),
}

/// What a run made.
#[derive(Clone, Debug)]
pub struct Report {
    /// The baseline's row, then every stage's.
    pub stages: Vec<Row>,
    pub dir: PathBuf,
    /// The int8 ONNX export, when asked for.
    pub onnx: Option<PathBuf>,
    /// The results as a text table (report.md holds it as Markdown).
    pub table: String,
    /// report.json's contents.
    pub json: serde_json::Value,
    /// Warnings of the ONNX export (ops kept in float).
    pub warnings: Vec<String>,
    pub seconds: f64,
}

impl Pipeline {
    /// Runs the pipeline into its output folder: every stage not yet done there, then the
    /// report (report.md, report.json, accuracy-size.svg).
    pub fn run(&mut self, opts: &RunOptions<'_>, events: Events<'_>) -> Result<Report> {
        let started = Instant::now();
        let dir = opts
            .dir
            .clone()
            .unwrap_or_else(|| self.config.output.dir.clone());
        let mut state = open_state(&dir, self.fingerprint(), self.stages.len(), opts)?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
        let spec = &self.config.data.spec;
        let mut data = match opts.load_data {
            Some(load) => load(spec)?,
            None => slim_core::data::load_spec(spec)?,
        };
        if let Some(n) = self.config.data.limit {
            data.train = data.train.take(n);
        }
        if !data.train.is_labeled() && self.config.model.zoo.is_some() {
            return Err(invalid(format!(
                "[data] spec = \"{spec}\" has no labels, and a zoo baseline is trained on \
                 labels; without labels, start from a trained model ([model] file)"
            )));
        }
        let Events {
            note,
            progress,
            status,
        } = events;
        let total = self.stages.len() + 1;
        let mut model = self.baseline(&mut state, &mut data, &dir, opts, note, progress)?;
        // The baseline as its file holds it, for stages that learn from it.
        let baseline = opts.load(&state.stages[0].file)?;
        for i in 0..self.stages.len() {
            let index = i + 1;
            let (name, source) = (self.stages[i].name.clone(), self.stages[i].source);
            if let Some(row) = state.stages.get(index) {
                note(&format!("stage {}/{total}: {name} (done)", index + 1));
                model = opts.load(&row.file)?;
                continue;
            }
            let from = match source {
                Source::Previous => None,
                Source::Stage(j) => Some(state.stages[j].name.clone()),
                Source::Init => Some("init".to_string()),
            };
            match &from {
                Some(f) => note(&format!("stage {}/{total}: {name} (from {f})", index + 1)),
                None => note(&format!("stage {}/{total}: {name}", index + 1)),
            }
            model = match source {
                Source::Previous => model,
                Source::Stage(j) => opts.load(&state.stages[j].file)?,
                Source::Init => self.fresh_model(&data, &opts.device)?,
            };
            let t0 = Instant::now();
            let stem = format!("{index:02}-{}", name.replace(' ', "_"));
            let work_dir = dir.join(&stem);
            std::fs::create_dir_all(&work_dir)?;
            let mut ctx = Context {
                data: &data,
                train: self.train.clone(),
                work_dir,
                quiet: opts.quiet,
                progress: &mut *progress,
                status,
                baseline: Some(&baseline),
            };
            let (next, info) = self.stages[i].strategy.run(model, &mut ctx)?;
            status("");
            let file = dir.join(format!("{stem}.safetensors"));
            next.save(&file)?;
            let seconds = t0.elapsed().as_secs_f64();
            let mut row = measure(&name, &next, &file, &data, seconds, info, Some(&baseline))?;
            row.from = from;
            state.stages.push(row);
            save_state(&dir, &state)?;
            model = next;
        }
        self.report(state.stages, &data, &dir, opts, started)
    }

    /// The report of the finished stages: every model timed in this sitting (and estimated
    /// from the latency tables), the tables and the plot written, the ONNX export if asked.
    fn report(
        &self,
        mut stages: Vec<Row>,
        data: &DataSplits,
        dir: &Path,
        opts: &RunOptions<'_>,
        started: Instant,
    ) -> Result<Report> {
        time_stages(&mut stages, &self.tables, &|p| opts.load(p))?;
        let labeled = data.test.is_labeled();
        let table = write_table(&stages, labeled, !self.tables.is_empty(), dir)?;
        write_atomic(&dir.join("accuracy-size.svg"), plot(&stages).as_bytes())?;
        let (mut onnx, mut warnings) = (None, Vec::new());
        if opts.export {
            write_atomic(&dir.join("pipeline.toml"), self.text.as_bytes())?;
            if let Some(last) = stages.last() {
                let m = opts.load(&last.file)?;
                let path = dir.join(ONNX_EXPORT);
                let options = slim_onnx::ExportOptions::default();
                warnings = slim_onnx::export_file(&m, &path, &options)?;
                onnx = Some(path);
            }
        }
        let mut json = json!({"stages": stages, "out": dir});
        if let Some(p) = &onnx {
            json["onnx"] = json!(p);
        }
        if !data.skipped.is_empty() {
            let files: Vec<serde_json::Value> = data
                .skipped
                .iter()
                .map(|(path, why)| json!({"file": path, "reason": why}))
                .collect();
            json["skipped_images"] = json!({"count": files.len(), "files": files});
        }
        write_atomic(
            &dir.join("report.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        Ok(Report {
            stages,
            dir: dir.to_path_buf(),
            onnx,
            table,
            json,
            warnings,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The zoo model of `[model]` with the weights it starts training from.
    fn fresh_model(&self, data: &DataSplits, device: &Device) -> Result<Model> {
        let name = self.config.model.zoo.as_deref().unwrap_or_default();
        let zcfg = ZooConfig::new(data.train.shape)
            .with_width(self.config.model.width)
            .with_classes(data.train.classes);
        let mut m = zoo::model(name, &zcfg, self.train.seed, device)?;
        m.provenance
            .insert("data".into(), self.config.data.spec.clone());
        Ok(m)
    }

    /// Stage 0, the baseline: read back when the state has it, else trained from the zoo or
    /// read from `[model] file` (whose preprocessing the data then follows), measured and
    /// recorded.
    fn baseline(
        &self,
        state: &mut State,
        data: &mut DataSplits,
        dir: &Path,
        opts: &RunOptions<'_>,
        note: &dyn Fn(&str),
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Model> {
        let total = self.stages.len() + 1;
        if let Some(row) = state.stages.first() {
            note(&format!("stage 1/{total}: baseline (done)"));
            let m = opts.load(&row.file)?;
            m.adapt_data(data)?;
            return Ok(m);
        }
        let t0 = Instant::now();
        let (model, info, file) = match (&self.config.model.zoo, &self.config.model.file) {
            (Some(name), _) => {
                note(&format!("stage 1/{total}: baseline: train {name}"));
                let m = self.fresh_model(data, &opts.device)?;
                let mut ctx = Context {
                    data,
                    train: self.train.clone(),
                    work_dir: dir.to_path_buf(),
                    quiet: opts.quiet,
                    progress,
                    status: &|_| {},
                    baseline: None,
                };
                let (m, info) = Train { config: None }.run(m, &mut ctx)?;
                let file = dir.join("00-baseline.safetensors");
                m.save(&file)?;
                (m, info, file)
            }
            (None, Some(path)) => {
                note(&format!("stage 1/{total}: baseline: {}", path.display()));
                let m = opts.load(path)?;
                // An imported model is fed data the way it expects.
                m.adapt_data(data)?;
                (m, json!({}), path.clone())
            }
            (None, None) => return Err(invalid("[model] needs `zoo` or `file`")),
        };
        let seconds = t0.elapsed().as_secs_f64();
        let row = measure("baseline", &model, &file, data, seconds, info, None)?;
        state.stages.push(row);
        save_state(dir, state)?;
        Ok(model)
    }
}

fn save_state(dir: &Path, state: &State) -> Result<()> {
    let text = serde_json::to_string_pretty(state)?;
    write_atomic(&dir.join(STATE_FILE), text.as_bytes())?;
    Ok(())
}

/// The pipeline's state in `dir`: a finished or (with `resume`) stopped run of the same
/// configuration (`key`), else a fresh one.
fn open_state(dir: &Path, key: String, stages: usize, opts: &RunOptions<'_>) -> Result<State> {
    let path = dir.join(STATE_FILE);
    if !path.exists() || opts.force {
        return Ok(State {
            format: STATE_FORMAT.into(),
            config: key,
            stages: Vec::new(),
        });
    }
    let text = std::fs::read_to_string(&path)?;
    let s: State = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("{}: not a pipeline state: {e}", path.display())))?;
    if s.format != STATE_FORMAT || s.config != key {
        return Err(invalid(format!(
            "{} holds another pipeline's results; choose another output folder, or --force to \
             start over there",
            dir.display()
        )));
    }
    // A finished run of this pipeline is only reported again; a stopped one continues when
    // asked to.
    let finished = s.stages.len() == stages + 1;
    if !opts.resume && !finished {
        return Err(invalid(format!(
            "{} holds a stopped run of this pipeline; --resume to continue it, or --force to \
             start over",
            dir.display()
        )));
    }
    Ok(s)
}

/// A stage's figures: accuracy on the test split, or without labels its fidelity to
/// `baseline` (`None`: the stage is the baseline). Int8 models run on the int8 runtime.
fn measure(
    name: &str,
    model: &Model,
    file: &Path,
    data: &DataSplits,
    seconds: f64,
    info: serde_json::Value,
    baseline: Option<&Model>,
) -> Result<Row> {
    let int8 = !model.int8.is_empty();
    let (mut top1, mut top5, mut agreement, mut cosine) = (None, None, None, None);
    if data.test.is_labeled() {
        let e = if int8 {
            slim_quant::runtime::evaluate(model, &data.test, &data.normalize, 256)?
        } else {
            evaluate(model, &data.test, &data.normalize, 256)?
        };
        (top1, top5) = (Some(e.top1), Some(e.top5));
    } else if let Some(b) = baseline {
        let f = if int8 {
            let kernels = slim_quant::runtime::Int8Kernels::new(model);
            slim_core::train::fidelity_with(model, b, &data.test, &data.normalize, 256, &|m, x| {
                Ok(vec![slim_quant::runtime::forward_with(m, &kernels, x)?])
            })?
        } else {
            slim_core::train::fidelity(model, b, &data.test, &data.normalize, 256)?
        };
        agreement = Some(f.headline());
        cosine = f.outputs.first().map(|o| o.cosine);
    } else {
        (agreement, cosine) = (Some(1.0), Some(1.0));
    }
    let stats = analyze(&model.graph);
    Ok(Row {
        name: name.into(),
        file: file.to_path_buf(),
        top1,
        top5,
        agreement,
        cosine,
        macs: stats.macs,
        params: stats.params,
        bytes: std::fs::metadata(file)?.len(),
        seconds,
        info,
        latency_ms: None,
        latency_fallback_ops: 0,
        measured_ms: None,
        from: None,
    })
}
