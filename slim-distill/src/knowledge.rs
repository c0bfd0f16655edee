//! Offline knowledge: a teacher's outputs for chosen nodes over a whole training split,
//! computed once and written to safetensors shards, so that distillation can train without the
//! teacher in memory.
//!
//! A knowledge directory holds `shard-00000.safetensors`, `shard-00001.safetensors`, ... Each
//! shard stores, for a contiguous range of sample indices, one tensor per node (`node/NAME`,
//! `[n, ...]`) and `index` (`[n]`, the sample indices), with metadata naming the teacher (its
//! fingerprint), the data (the split's fingerprint, which covers its order) and the shard's
//! place in the set. Shards are written atomically; a dump stopped part-way keeps its finished
//! shards and a rerun with the same teacher and data continues after them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use slim_core::data::{Batch, Dataset, ImageSet, Loader, LoaderConfig, Normalize};
use slim_core::io::write_atomic;
use slim_core::{ForwardOptions, Mode, Model};

use crate::losses::{Shapes, Taps};
use crate::{DistillError, Result};

/// The `format` metadata of a knowledge shard.
pub const KNOWLEDGE_FORMAT: &str = "slim-knowledge";

/// What every shard of one dump shares, plus its own range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub teacher: String,
    pub teacher_fingerprint: String,
    pub data: String,
    pub data_fingerprint: String,
    pub samples: usize,
    pub shards: usize,
    pub shard_size: usize,
    /// Node name -> per-sample shape.
    pub nodes: BTreeMap<String, Vec<usize>>,
    /// The teacher's output node.
    pub output: String,
    pub shard: usize,
}

impl ShardMeta {
    /// The first field in which `other` belongs to another dump, if any. Labels (the teacher's
    /// file name, the data spec) may differ: fingerprints decide.
    fn differs(&self, other: &ShardMeta) -> Option<&'static str> {
        if self.teacher_fingerprint != other.teacher_fingerprint {
            Some("teacher")
        } else if self.data_fingerprint != other.data_fingerprint || self.samples != other.samples {
            Some("data")
        } else if self.nodes != other.nodes || self.output != other.output {
            Some("node list")
        } else if self.shard_size != other.shard_size || self.shards != other.shards {
            Some("shard size")
        } else {
            None
        }
    }

    /// Refuses a count of shards that does not cover the samples exactly, and a shard number
    /// outside the set (a damaged or hand-made file).
    fn check(&self, path: &Path) -> Result<()> {
        if self.shard_size == 0
            || self.samples == 0
            || self.shards != self.samples.div_ceil(self.shard_size)
            || self.shard >= self.shards
        {
            return Err(file_err(
                path,
                format!(
                    "has inconsistent `knowledge` metadata: shard {} of {} with {} samples of {} per shard",
                    self.shard, self.shards, self.samples, self.shard_size
                ),
            ));
        }
        for (node, shape) in &self.nodes {
            slim_core::graph::check_shape(shape).map_err(|e| {
                file_err(path, format!("has a damaged shape for node `{node}`: {e}"))
            })?;
        }
        Ok(())
    }
}

/// The name under which a node's outputs are stored in a shard (apart from `index`).
fn stored_name(node: &str) -> String {
    format!("node/{node}")
}

fn shard_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("shard-{k:05}.safetensors"))
}

fn file_err(path: &Path, msg: impl Into<String>) -> DistillError {
    DistillError::Core(slim_core::CoreError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    })
}

/// Parses a shard's bytes and metadata.
fn open_shard<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(safetensors::SafeTensors<'a>, HashMap<String, String>)> {
    let unreadable = |e: safetensors::SafeTensorError| {
        file_err(path, format!("is not a readable safetensors file ({e})"))
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(unreadable)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(unreadable)?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(KNOWLEDGE_FORMAT) {
        return Err(file_err(path, "is not a knowledge shard"));
    }
    Ok((st, meta))
}

fn read_meta(path: &Path) -> Result<(Vec<u8>, ShardMeta)> {
    let bytes = std::fs::read(path).map_err(|source| slim_core::CoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = {
        let (_, meta) = open_shard(path, &bytes)?;
        serde_json::from_str::<ShardMeta>(meta.get("knowledge").map(String::as_str).unwrap_or(""))
            .map_err(|e| file_err(path, format!("the `knowledge` metadata is malformed: {e}")))?
    };
    meta.check(path)?;
    Ok((bytes, meta))
}

/// What a dump did.
#[derive(Clone, Debug, Serialize)]
pub struct DumpReport {
    pub dir: PathBuf,
    pub samples: usize,
    pub shards: usize,
    /// Shards found finished from an earlier run and kept.
    pub reused: usize,
    pub nodes: BTreeMap<String, Vec<usize>>,
    pub bytes: u64,
    pub seconds: f64,
}

impl DumpReport {
    /// The dump in one line (`data` names the data set).
    pub fn describe(&self, data: &str) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(n, s)| format!("{n} {s:?}"))
            .collect();
        format!(
            "{}: {} samples of {data} in {} shard(s) ({} kept from an earlier run), nodes {}; {} \
             bytes written in {:.1} s",
            self.dir.display(),
            self.samples,
            self.shards,
            self.reused,
            nodes.join(", "),
            self.bytes,
            self.seconds
        )
    }
}

/// The teacher's output node, the nodes to store (its output when none are named; each
/// once) and their shapes; an unknown node is refused with suggestions.
#[allow(clippy::type_complexity)]
fn node_shapes(
    teacher: &Model,
    teacher_label: &str,
    nodes: &[String],
) -> Result<(String, Vec<String>, BTreeMap<String, Vec<usize>>)> {
    let g = &teacher.graph;
    let output = g.node(g.outputs()[0]).name.clone();
    // A node asked twice is stored once.
    let nodes: Vec<String> = if nodes.is_empty() {
        vec![output.clone()]
    } else {
        let mut seen = std::collections::BTreeSet::new();
        nodes
            .iter()
            .filter(|n| seen.insert(n.as_str()))
            .cloned()
            .collect()
    };
    let mut shapes = BTreeMap::new();
    for n in &nodes {
        let node = g
            .find(n)
            .ok_or_else(|| crate::unknown_node(&format!("teacher `{teacher_label}`"), n, g))?;
        shapes.insert(n.clone(), node.shape.clone());
    }
    Ok((output, nodes, shapes))
}

/// Which of the dump's shards `dir` (created when missing) already holds; shards of another
/// teacher or data set there are refused.
fn shards_done(dir: &Path, base: &ShardMeta) -> Result<Vec<bool>> {
    std::fs::create_dir_all(dir).map_err(|source| slim_core::CoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    // Shards left by another dump would mix two teachers or data sets: refuse before working.
    let mut done = vec![false; base.shards];
    for entry in std::fs::read_dir(dir).map_err(|source| slim_core::CoreError::Io {
        path: dir.to_path_buf(),
        source,
    })? {
        let path = entry
            .map_err(|source| slim_core::CoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        let is_shard = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".safetensors"));
        if !is_shard {
            continue;
        }
        let (_, meta) = read_meta(&path)?;
        if let Some(field) = base.differs(&meta) {
            return Err(file_err(
                &path,
                format!(
                    "holds knowledge of another {field} than this dump asks for; remove the directory's shards or dump elsewhere"
                ),
            ));
        }
        if path == shard_path(dir, meta.shard) {
            done[meta.shard] = true;
        }
    }
    Ok(done)
}

/// Writes shard `k` of the dump `base` to `dir`: its tensors and metadata; its size.
fn write_shard(
    dir: &Path,
    k: usize,
    base: &ShardMeta,
    tensors: Vec<(String, Tensor)>,
) -> Result<u64> {
    let meta = ShardMeta {
        shard: k,
        ..base.clone()
    };
    let mut md = HashMap::new();
    md.insert("format".to_string(), KNOWLEDGE_FORMAT.to_string());
    md.insert(
        "knowledge".to_string(),
        serde_json::to_string(&meta)
            .map_err(|e| DistillError::Invalid(format!("cannot encode metadata: {e}")))?,
    );
    let path = shard_path(dir, k);
    let encoded = safetensors::tensor::serialize(tensors, Some(md))
        .map_err(|e| file_err(&path, format!("cannot encode the shard: {e}")))?;
    write_atomic(&path, &encoded)?;
    Ok(encoded.len() as u64)
}

/// Runs `teacher` (eval mode) over `set` in stored order and writes the outputs of `nodes`
/// (the teacher's output when empty) to shards of `shard_size` samples in `dir`.
/// `progress(done, total)` is called after every batch.
#[allow(clippy::too_many_arguments)]
pub fn dump(
    teacher: &Model,
    teacher_label: &str,
    set: &ImageSet,
    normalize: &Normalize,
    data_spec: &str,
    nodes: &[String],
    dir: &Path,
    shard_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DumpReport> {
    let started = std::time::Instant::now();
    if shard_size == 0 {
        return Err(DistillError::Invalid(
            "the shard size must be at least 1".into(),
        ));
    }
    if set.is_empty() {
        return Err(DistillError::Invalid("the data set is empty".into()));
    }
    if teacher.input_shape() != set.shape.to_vec() {
        return Err(DistillError::Invalid(format!(
            "the teacher takes inputs of shape {:?}, the data `{data_spec}` has {:?}",
            teacher.input_shape(),
            set.shape
        )));
    }
    let (output, nodes, shapes) = node_shapes(teacher, teacher_label, nodes)?;
    let samples = set.len();
    let shards = samples.div_ceil(shard_size);
    let base = ShardMeta {
        teacher: teacher_label.to_string(),
        teacher_fingerprint: teacher.fingerprint()?,
        data: data_spec.to_string(),
        data_fingerprint: set.fingerprint(),
        samples,
        shards,
        shard_size,
        nodes: shapes.clone(),
        output,
        shard: 0,
    };
    let done = shards_done(dir, &base)?;
    let reused = done.iter().filter(|&&d| d).count();
    let shard_len = |k: usize| (k * shard_size + shard_size).min(samples) - k * shard_size;

    let device = teacher.device();
    let mut bytes = 0u64;
    let mut finished: usize = (0..shards).filter(|&k| done[k]).map(shard_len).sum();
    for (k, _) in done.iter().enumerate().filter(|(_, d)| !**d) {
        let start = k * shard_size;
        let end = (start + shard_size).min(samples);
        let part = set.range(start, end);
        let cfg = LoaderConfig {
            batch_size: 256,
            shuffle: None,
            augment: Default::default(),
            normalize: normalize.clone(),
            drop_last: false,
        };
        let mut parts: HashMap<String, Vec<Tensor>> = HashMap::new();
        let data: Arc<dyn Dataset> = Arc::new(part);
        for batch in Loader::new(data, &cfg, 0, &device)? {
            let batch = batch?;
            let out = teacher.forward_with(
                std::slice::from_ref(&batch.images),
                Mode::Eval,
                ForwardOptions::default().with_taps(&nodes),
            )?;
            for (name, t) in out.taps {
                parts.entry(name).or_default().push(t.to_dtype(DType::F32)?);
            }
            finished += batch.indices.len();
            progress(finished.min(samples), samples);
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for n in &nodes {
            let t = Tensor::cat(&parts[n], 0)?.to_device(&Device::Cpu)?;
            tensors.push((stored_name(n), t));
        }
        let index: Vec<u32> = (start as u32..end as u32).collect();
        tensors.push(("index".into(), Tensor::new(index, &Device::Cpu)?));
        bytes += write_shard(dir, k, &base, tensors)?;
    }
    Ok(DumpReport {
        dir: dir.to_path_buf(),
        samples,
        shards,
        reused,
        nodes: shapes,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A knowledge directory loaded into memory: one `[samples, ...]` tensor per node.
pub struct Knowledge {
    pub dir: PathBuf,
    pub meta: ShardMeta,
    values: HashMap<String, Tensor>,
    shapes: Shapes,
}

impl Knowledge {
    /// Reads every shard of `dir`, checking that they belong to one dump and cover every
    /// sample exactly once.
    pub fn open(dir: &Path, device: &Device) -> Result<Knowledge> {
        if !dir.is_dir() {
            return Err(file_err(dir, "no such knowledge directory"));
        }
        let first = shard_path(dir, 0);
        if !first.exists() {
            return Err(file_err(
                dir,
                "holds no knowledge shards (shard-00000.safetensors); write them with `slim distill dump`",
            ));
        }
        let (_, meta0) = read_meta(&first)?;
        let mut parts: HashMap<String, Vec<Tensor>> = HashMap::new();
        for k in 0..meta0.shards {
            let path = shard_path(dir, k);
            if !path.exists() {
                return Err(file_err(
                    &path,
                    format!(
                        "is missing: the dump has {} shards; finish it by running the same `slim distill dump` again",
                        meta0.shards
                    ),
                ));
            }
            let (bytes, meta) = read_meta(&path)?;
            if let Some(field) = meta0.differs(&meta) {
                return Err(file_err(
                    &path,
                    format!("belongs to another dump than shard-00000 (another {field})"),
                ));
            }
            if meta.shard != k {
                return Err(file_err(
                    &path,
                    format!("says it is shard {}, not {k}", meta.shard),
                ));
            }
            let (st, _) = open_shard(&path, &bytes)?;
            let start = k * meta.shard_size;
            let n = (start + meta.shard_size).min(meta.samples) - start;
            let load = |name: &str| -> Result<Tensor> {
                use candle_core::safetensors::Load;
                let view = st
                    .tensor(name)
                    .map_err(|_| file_err(&path, format!("tensor `{name}` is missing")))?;
                view.load(device)
                    .map_err(|e| file_err(&path, format!("tensor `{name}`: {e}")))
            };
            let index = load("index")?
                .to_vec1::<u32>()
                .map_err(|e| file_err(&path, format!("tensor `index`: {e}")))?;
            if index.len() != n
                || index
                    .iter()
                    .enumerate()
                    .any(|(i, &v)| v as usize != start + i)
            {
                return Err(file_err(
                    &path,
                    format!("does not hold samples {start}..{} in order", start + n),
                ));
            }
            for (name, shape) in &meta.nodes {
                let t = load(&stored_name(name))?;
                let mut want = vec![n];
                want.extend(shape);
                if t.dims() != want.as_slice() {
                    return Err(file_err(
                        &path,
                        format!(
                            "tensor `{name}` has shape {:?}, expected {want:?}",
                            t.dims()
                        ),
                    ));
                }
                parts
                    .entry(name.clone())
                    .or_default()
                    .push(t.to_dtype(DType::F32)?);
            }
        }
        let values = parts
            .into_iter()
            .map(|(n, ts)| Ok((n, Tensor::cat(&ts, 0)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let shapes = meta0.nodes.clone().into_iter().collect();
        Ok(Knowledge {
            dir: dir.to_path_buf(),
            meta: meta0,
            values,
            shapes,
        })
    }

    /// Refuses a training split other than the one the knowledge was computed on (another
    /// data set, or the same images in another order).
    pub fn check_data(&self, set: &ImageSet, spec: &str) -> Result<()> {
        if set.fingerprint() != self.meta.data_fingerprint || set.len() != self.meta.samples {
            return Err(file_err(
                &self.dir,
                format!(
                    "holds knowledge of the data `{}` ({} samples), not of `{spec}` ({} samples) in this order; dump it again for this data",
                    self.meta.data,
                    self.meta.samples,
                    set.len()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a teacher other than the one the knowledge came from.
    pub fn check_teacher(&self, teacher: &Model, label: &str) -> Result<()> {
        if teacher.fingerprint()? != self.meta.teacher_fingerprint {
            return Err(file_err(
                &self.dir,
                format!(
                    "holds knowledge of the teacher `{}`, not of `{label}`",
                    self.meta.teacher
                ),
            ));
        }
        Ok(())
    }

    /// Per-sample shapes of the stored nodes.
    pub fn shapes(&self) -> &Shapes {
        &self.shapes
    }

    /// The stored outputs of `nodes` for a batch's samples.
    pub fn gather(&self, batch: &Batch, nodes: &[String]) -> Result<Taps> {
        if let Some(&bad) = batch.indices.iter().find(|&&i| i >= self.meta.samples) {
            return Err(file_err(
                &self.dir,
                format!("has no sample {bad} (it holds {})", self.meta.samples),
            ));
        }
        let idx: Vec<u32> = batch.indices.iter().map(|&i| i as u32).collect();
        let some = self.values.values().next().map(Tensor::device).cloned();
        let idx = Tensor::new(idx, &some.unwrap_or(Device::Cpu))?;
        nodes
            .iter()
            .map(|n| {
                let t = self.values.get(n).ok_or_else(|| {
                    file_err(&self.dir, format!("holds no outputs of node `{n}`"))
                })?;
                Ok((n.clone(), t.index_select(&idx, 0)?))
            })
            .collect()
    }
}
