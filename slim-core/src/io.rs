//! Model files: one `.safetensors` file per model.
//!
//! The tensors are the parameters under their dotted names. The safetensors metadata holds
//! `format` (`slim-model`), `format_version`, `graph` (the [`GraphDef`] as JSON) and
//! `provenance` (a JSON object of strings). Any safetensors reader can open the file.
//!
//! Writing goes to a temporary file in the target's directory, which is synced and then
//! renamed over the target, so a crash never leaves half a model. Reading checks everything
//! before building anything: a file that is not safetensors, is truncated, has an unknown
//! format version, lacks a tensor or holds one of the wrong shape or type is an error naming
//! the file and the tensor. So is a float tensor that holds a NaN or an infinite value, unless
//! [`LoadOptions::allow_nonfinite`] says to load it anyway; the [`LoadReport`] then lists it.
//! Int8 tensors hold integers and are not scanned; their scales are.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::finite::NonFinite;
use crate::graph::{Graph, GraphDef};
use crate::model::Model;
use crate::params::ParamStore;

/// The value of the `format` metadata key of a Slim model file.
pub const FORMAT: &str = "slim-model";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// How a model file is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Load float tensors that hold NaN or infinite values instead of refusing the file; the
    /// [`LoadReport`] lists them.
    pub allow_nonfinite: bool,
}

impl LoadOptions {
    pub fn with_allow_nonfinite(mut self, allow: bool) -> Self {
        self.allow_nonfinite = allow;
        self
    }
}

/// What loading a model file found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// The tensors holding NaN or infinite values that were loaded anyway (only with
    /// [`LoadOptions::allow_nonfinite`]; without it, the first one is an error).
    pub nonfinite: Vec<NonFinite>,
}

/// Writes `bytes` to `path` atomically: a temporary sibling file, synced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| CoreError::file(path, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

impl Model {
    /// The model as the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let metadata = self.metadata()?;
        let mut tensors: Vec<(String, Raw)> = Vec::with_capacity(self.params.len());
        for (name, p) in self.params.iter() {
            let t = p.var.as_tensor();
            match self.int8.get(name) {
                Some(q) => {
                    let n = t.elem_count();
                    if q.values.len() != n || q.scales.is_empty() || n % q.scales.len() != 0 {
                        return Err(CoreError::param(
                            name,
                            format!(
                                "int8 form has {} values and {} scales for {n} elements",
                                q.values.len(),
                                q.scales.len()
                            ),
                        ));
                    }
                    tensors.push((
                        name.to_string(),
                        Raw {
                            dtype: safetensors::Dtype::I8,
                            shape: t.dims().to_vec(),
                            data: q.values.iter().map(|&v| v as u8).collect(),
                        },
                    ));
                    tensors.push((
                        format!("{name}{INT8_SCALE_SUFFIX}"),
                        Raw::f32(vec![q.scales.len()], &q.scales),
                    ));
                }
                None => {
                    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    tensors.push((name.to_string(), Raw::f32(t.dims().to_vec(), &v)));
                }
            }
        }
        safetensors::tensor::serialize(tensors, Some(metadata))
            .map_err(|e| CoreError::Invalid(format!("cannot encode the model: {e}")))
    }

    /// Saves the model to `path` atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self
            .to_bytes()
            .map_err(|e| CoreError::file(path, e.to_string()))?;
        write_atomic(path, &bytes)
    }

    /// Loads a model file onto a device, refusing one that holds NaN or infinite values.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Model> {
        Ok(Model::load_with(path, device, &LoadOptions::default())?.0)
    }

    /// Loads a model file onto a device, as `opts` says.
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<(Model, LoadReport)> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Model::from_bytes_with(&bytes, device, opts).map_err(|e| match e {
            CoreError::File { msg, .. } => CoreError::file(path, msg),
            other => CoreError::file(path, other.to_string()),
        })
    }

    /// Reads a model from the bytes of a safetensors file, refusing NaN or infinite values.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Model> {
        Ok(Model::from_bytes_with(bytes, device, &LoadOptions::default())?.0)
    }

    /// Reads a model from the bytes of a safetensors file, as `opts` says.
    pub fn from_bytes_with(
        bytes: &[u8],
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<(Model, LoadReport)> {
        let (st, meta) = open_safetensors(bytes)?;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(CoreError::file(
                "<bytes>",
                format!(
                    "metadata `format` is `{}`, expected `{FORMAT}`",
                    meta["format"]
                ),
            ));
        }
        Model::from_safetensors(&st, &meta, "", device, opts)
    }

    /// The metadata a model file carries (format, version, graph, provenance).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let graph = serde_json::to_string(&self.graph.to_def())
            .map_err(|e| CoreError::Invalid(format!("cannot encode the graph: {e}")))?;
        let provenance = serde_json::to_string(&self.provenance)
            .map_err(|e| CoreError::Invalid(format!("cannot encode the provenance: {e}")))?;
        Ok(HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("graph".to_string(), graph),
            ("provenance".to_string(), provenance),
        ]))
    }

    /// Reads the model whose tensors are stored under `prefix` (empty for a model file; other
    /// files, such as training checkpoints, keep more tensors beside the model's).
    pub fn from_safetensors(
        st: &SafeTensors<'_>,
        meta: &HashMap<String, String>,
        prefix: &str,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<(Model, LoadReport)> {
        let bad = |msg: String| CoreError::file("<bytes>", msg);
        let mut report = LoadReport::default();
        // One pass over a float tensor's bytes before anything is built from them.
        let mut check = |name: &str, bytes: &[u8]| -> Result<()> {
            match NonFinite::scan_le_bytes(name, bytes) {
                None => Ok(()),
                Some(nf) if opts.allow_nonfinite => {
                    report.nonfinite.push(nf);
                    Ok(())
                }
                Some(nf) => Err(bad(format!(
                    "{nf}; pass --allow-nonfinite to load it anyway"
                ))),
            }
        };
        let key = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata has no `{k}`: not a Slim model file")))
        };
        let version: u32 = key("format_version")?
            .parse()
            .map_err(|_| bad(format!("bad `format_version` `{}`", meta["format_version"])))?;
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            )));
        }
        let def: GraphDef = serde_json::from_str(key("graph")?)
            .map_err(|e| bad(format!("the `graph` metadata is malformed: {e}")))?;
        let graph = Graph::from_def(&def).map_err(|e| bad(format!("invalid graph: {e}")))?;
        let provenance: BTreeMap<String, String> = match meta.get("provenance") {
            Some(p) => serde_json::from_str(p)
                .map_err(|e| bad(format!("the `provenance` metadata is malformed: {e}")))?,
            None => BTreeMap::new(),
        };

        let mut params = ParamStore::new();
        let mut int8 = BTreeMap::new();
        let mut declared: std::collections::HashSet<String> = std::collections::HashSet::new();
        let specs = graph.param_specs();
        for (name, spec) in &specs {
            let stored = format!("{prefix}{name}");
            declared.insert(stored.clone());
            let view = st
                .tensor(&stored)
                .map_err(|_| bad(format!("tensor `{stored}` is missing")))?;
            if view.dtype() == safetensors::Dtype::I8 {
                let (q, t) = read_int8(st, &stored, &spec.shape, device, &mut check)?;
                declared.insert(format!("{stored}{INT8_SCALE_SUFFIX}"));
                params.insert(name.clone(), &t, spec.kind)?;
                int8.insert(name.clone(), q);
                continue;
            }
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!(
                    "tensor `{stored}` has type {:?}, expected F32",
                    view.dtype()
                )));
            }
            if view.shape() != spec.shape.as_slice() {
                return Err(bad(format!(
                    "tensor `{stored}` has shape {:?}, the graph expects {:?}",
                    view.shape(),
                    spec.shape
                )));
            }
            check(&stored, view.data())?;
            let t = view
                .load(device)
                .map_err(|e| bad(format!("tensor `{stored}`: {e}")))?;
            params.insert(name.clone(), &t.to_dtype(DType::F32)?, spec.kind)?;
        }
        if let Some(extra) = st
            .names()
            .into_iter()
            .find(|n| n.starts_with(prefix) && !declared.contains(*n))
        {
            return Err(bad(format!(
                "tensor `{extra}` is not declared by the graph"
            )));
        }
        let mut model = Model::new(graph, params).map_err(|e| bad(e.to_string()))?;
        model.provenance = provenance;
        model.int8 = int8;
        Ok((model, report))
    }
}

/// An int8 parameter stored as `stored` (shape `shape`) with its scales (one per slice of the
/// first axis, in `stored` + [`INT8_SCALE_SUFFIX`]): its integers and scales, and the float
/// tensor they stand for; `check` scans the scales' bytes.
fn read_int8(
    st: &SafeTensors<'_>,
    stored: &str,
    shape: &[usize],
    device: &Device,
    check: &mut dyn FnMut(&str, &[u8]) -> Result<()>,
) -> Result<(crate::model::Int8Tensor, Tensor)> {
    let bad = |msg: String| CoreError::file("<bytes>", msg);
    let view = st
        .tensor(stored)
        .map_err(|_| bad(format!("tensor `{stored}` is missing")))?;
    if view.shape() != shape {
        return Err(bad(format!(
            "tensor `{stored}` has shape {:?}, the graph expects {shape:?}",
            view.shape()
        )));
    }
    let scale_name = format!("{stored}{INT8_SCALE_SUFFIX}");
    let sv = st
        .tensor(&scale_name)
        .map_err(|_| bad(format!("int8 tensor `{stored}` has no `{scale_name}`")))?;
    if sv.dtype() != safetensors::Dtype::F32 || sv.shape().len() != 1 {
        return Err(bad(format!("`{scale_name}` must be a vector of F32")));
    }
    check(&scale_name, sv.data())?;
    let scales: Vec<f32> = sv
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let values: Vec<i8> = view.data().iter().map(|&b| b as i8).collect();
    if scales.is_empty() || !values.len().is_multiple_of(scales.len()) {
        return Err(bad(format!(
            "`{scale_name}` has {} scales for {} values",
            scales.len(),
            values.len()
        )));
    }
    let per = values.len() / scales.len();
    let deq: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(i, &q)| f32::from(q) * scales[i / per])
        .collect();
    let t = Tensor::from_vec(deq, shape.to_vec(), device)?;
    Ok((crate::model::Int8Tensor { values, scales }, t))
}

pub use crate::model::INT8_SCALE_SUFFIX;

/// The `format` metadata of a training checkpoint file (which model files' readers also
/// take).
pub const CHECKPOINT_FORMAT: &str = "slim-checkpoint";

/// A tensor as bytes, for the safetensors writer.
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn f32(shape: Vec<usize>, v: &[f32]) -> Raw {
        Raw {
            dtype: safetensors::Dtype::F32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Parses a safetensors buffer and its metadata, checking the `format` key is a Slim one.
pub fn open_safetensors(bytes: &[u8]) -> Result<(SafeTensors<'_>, HashMap<String, String>)> {
    let bad = |msg: String| CoreError::file("<bytes>", msg);
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) | Some(CHECKPOINT_FORMAT) => Ok((st, meta)),
        Some(other) => Err(bad(format!(
            "metadata `format` is `{other}`, expected `{FORMAT}`"
        ))),
        None => Err(bad("metadata has no `format`: not a Slim model file".into())),
    }
}

/// An output folder made for a job's files: removed again when the guard is dropped with
/// nothing written into it (a job that failed before its first file leaves no empty folder).
/// A folder that existed before is left as it is.
pub struct OutputDir<'a> {
    path: &'a Path,
    created: bool,
}

impl<'a> OutputDir<'a> {
    /// Makes `path` (and its parents) unless it exists.
    pub fn create(path: &'a Path) -> Result<Self> {
        let created = !path.exists();
        std::fs::create_dir_all(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(OutputDir { path, created })
    }
}

impl Drop for OutputDir<'_> {
    fn drop(&mut self) {
        if self.created {
            // Fails, as it should, when the folder holds anything.
            let _ = std::fs::remove_dir(self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Mode;
    use crate::graph::GraphBuilder;

    #[test]
    fn an_output_folder_left_empty_is_removed_and_others_stay() {
        let root = tempfile::tempdir().unwrap();
        let (empty, used) = (root.path().join("a/b"), root.path().join("c"));
        drop(OutputDir::create(&empty).unwrap());
        assert!(!empty.exists() && root.path().join("a").exists());
        {
            let _g = OutputDir::create(&used).unwrap();
            write_atomic(&used.join("f"), b"x").unwrap();
        }
        assert!(used.join("f").is_file());
        let before = root.path().join("before");
        std::fs::create_dir(&before).unwrap();
        drop(OutputDir::create(&before).unwrap());
        assert!(before.is_dir(), "a folder that was there stays");
    }

    fn small() -> Model {
        let g = GraphBuilder::new([1, 6, 6])
            .conv("c", 3, 3, 1, 1)
            .bn("bn")
            .relu("r")
            .flatten("f")
            .linear("fc", 4)
            .build()
            .unwrap();
        let mut m = Model::init(g, 3, &Device::Cpu).unwrap();
        m.provenance.insert("zoo".into(), "test".into());
        m
    }

    #[test]
    fn save_then_load_is_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let m = small();
        m.save(&path).unwrap();
        let back = Model::load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.graph, m.graph);
        assert_eq!(back.provenance, m.provenance);
        for (name, p) in m.params.iter() {
            let a = p
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = back
                .params
                .tensor(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(a, b, "{name}");
            assert_eq!(back.params.param(name).unwrap().kind, p.kind);
        }
        let x = Tensor::randn(0f32, 1.0, (2, 1, 6, 6), &Device::Cpu).unwrap();
        let ya = m
            .forward(&x, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let yb = back
            .forward(&x, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ya, yb);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_files_are_errors_that_name_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let m = small();
        let bytes = m.to_bytes().unwrap();
        let load = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            Model::load(&path, &Device::Cpu).unwrap_err().to_string()
        };
        let e = load(b"hello, this is not a model");
        assert!(
            e.contains("m.safetensors") && e.contains("safetensors"),
            "{e}"
        );
        let e = load(&bytes[..bytes.len() - 10]);
        assert!(e.contains("m.safetensors"), "{e}");
        let e = load(&[]);
        assert!(e.contains("m.safetensors"), "{e}");

        // A tensor missing, one of the wrong shape, an unknown version.
        let mut tensors: Vec<(String, Tensor)> = m
            .params
            .iter()
            .map(|(n, p)| (n.to_string(), p.var.as_tensor().clone()))
            .collect();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let drop: Vec<_> = tensors
            .iter()
            .filter(|(n, _)| n != "bn.running_var")
            .cloned()
            .collect();
        let e = load(&safetensors::tensor::serialize(drop, Some(meta.clone())).unwrap());
        assert!(e.contains("bn.running_var") && e.contains("missing"), "{e}");
        for (n, t) in tensors.iter_mut() {
            if n == "fc.weight" {
                *t = Tensor::zeros((4, 5), DType::F32, &Device::Cpu).unwrap();
            }
        }
        let e = load(&safetensors::tensor::serialize(tensors.clone(), Some(meta.clone())).unwrap());
        assert!(e.contains("fc.weight") && e.contains("shape"), "{e}");
        let mut meta2 = meta.clone();
        meta2.insert("format_version".into(), "99".into());
        let e = load(&safetensors::tensor::serialize(tensors, Some(meta2)).unwrap());
        assert!(e.contains("version 99"), "{e}");
    }

    #[test]
    fn nonfinite_values_are_refused_by_name_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let m = small();
        // One infinity in a weight, where a 3x3 kernel's fifth value sits.
        let w = m.params.tensor("c.weight").unwrap();
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[4] = f32::INFINITY;
        m.params
            .set(
                "c.weight",
                &Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap(),
            )
            .unwrap();
        m.save(&path).unwrap();

        let e = Model::load(&path, &Device::Cpu).unwrap_err();
        assert!(matches!(e, CoreError::File { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: tensor `c.weight` holds 1 infinite value (first at index 4); \
                 pass --allow-nonfinite to load it anyway",
                path.display()
            )
        );
        assert!(Model::from_bytes(&m.to_bytes().unwrap(), &Device::Cpu).is_err());

        let opts = LoadOptions::default().with_allow_nonfinite(true);
        let (back, report) = Model::load_with(&path, &Device::Cpu, &opts).unwrap();
        assert_eq!(report.nonfinite.len(), 1);
        assert_eq!(report.nonfinite[0].tensor, "c.weight");
        assert_eq!(report.nonfinite[0].infinite, 1);
        let b = back.params.tensor("c.weight").unwrap();
        assert_eq!(
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()[4],
            f32::INFINITY
        );
        assert_eq!(back.nonfinite_params().unwrap(), report.nonfinite);

        // A clean file reports nothing.
        small().save(&path).unwrap();
        let (_, report) = Model::load_with(&path, &Device::Cpu, &opts).unwrap();
        assert!(report.nonfinite.is_empty());
    }

    #[test]
    fn failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing_dir = dir.path().join("no/such/dir/m.safetensors");
        assert!(small().save(&missing_dir).is_err());
    }
}
