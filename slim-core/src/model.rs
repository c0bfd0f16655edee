//! A model: a graph and its parameters, kept consistent with each other.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{CoreError, Result};
use crate::graph::{Graph, Op, ParamSpec};
use crate::params::ParamStore;

pub use crate::hash::Fnv;

/// The name of an int8 parameter's scales in a model file: `<parameter>_scale`.
pub const INT8_SCALE_SUFFIX: &str = "_scale";

const PREPROCESS_KEY: &str = "preprocess";

/// A normalization with at least one mean and std, every std finite and positive.
fn usable(norm: &crate::data::Normalize) -> bool {
    !norm.mean.is_empty()
        && !norm.std.is_empty()
        && norm.std.iter().all(|s| s.is_finite() && *s > 0.0)
        && norm.mean.iter().all(|m| m.is_finite())
}

/// A graph with a value for every parameter it declares, and free-form provenance
/// (`zoo`, `created_by`, `data`, ...) that model files carry along.
#[derive(Clone, Debug)]
pub struct Model {
    pub graph: Graph,
    pub params: ParamStore,
    pub provenance: BTreeMap<String, String>,
    /// Parameters held as integers: their float parameter holds the same values read back
    /// (`q * scale`), and a model file stores them as int8 tensors with their scales.
    pub int8: BTreeMap<String, Int8Tensor>,
}

/// An integer parameter: values in the parameter's shape (row-major) and one scale per tensor
/// or per slice along axis 0 (`values.len() / scales.len()` values share one scale).
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Tensor {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Model {
    /// Pairs a graph with parameters, checking that every declared parameter is present with
    /// its shape and that there is no parameter the graph does not declare.
    pub fn new(graph: Graph, params: ParamStore) -> Result<Model> {
        let specs = graph.param_specs();
        for (name, spec) in &specs {
            let p = params
                .param(name)
                .ok_or_else(|| CoreError::param(name, "missing from the parameters"))?;
            if p.var.dims() != spec.shape.as_slice() {
                return Err(CoreError::param(
                    name,
                    format!(
                        "has shape {:?}, the graph expects {:?}",
                        p.var.dims(),
                        spec.shape
                    ),
                ));
            }
        }
        if params.len() != specs.len() {
            let declared: std::collections::HashSet<&str> =
                specs.iter().map(|(n, _)| n.as_str()).collect();
            if let Some(extra) = params.names().find(|n| !declared.contains(n)) {
                return Err(CoreError::param(
                    extra,
                    "not declared by any node of the graph",
                ));
            }
        }
        Ok(Model {
            graph,
            params,
            provenance: BTreeMap::new(),
            int8: BTreeMap::new(),
        })
    }

    /// Fresh parameters for a graph, seeded: convolutions get He (Kaiming) normal initialization
    /// over the fan-out, linear layers a uniform one over the fan-in, batch norm the identity.
    pub fn init(graph: Graph, seed: u64, device: &Device) -> Result<Model> {
        Model::with_params(graph, |op, name, spec| {
            init_tensor(op, name, spec, seed, device)
        })
    }

    /// A model of `graph` with each parameter made by `make(op, name, spec)`.
    fn with_params(
        graph: Graph,
        mut make: impl FnMut(&Op, &str, &ParamSpec) -> Result<Tensor>,
    ) -> Result<Model> {
        let mut params = ParamStore::new();
        for node in graph.nodes() {
            for (name, spec) in node.params() {
                let t = make(&node.op, &name, &spec)?;
                params.insert(name, &t, spec.kind)?;
            }
        }
        Model::new(graph, params)
    }

    /// A model of `graph` whose trained parameters are zeros and whose buffers are fresh (as
    /// [`Model::init`] makes them): for executions that read the trained weights from
    /// elsewhere (a supernet's slices), where drawing random ones would be wasted work.
    pub fn with_zero_weights(graph: Graph, device: &Device) -> Result<Model> {
        Model::with_params(graph, |op, name, spec| {
            if spec.kind.is_trainable() {
                Ok(Tensor::zeros(
                    spec.shape.clone(),
                    candle_core::DType::F32,
                    device,
                )?)
            } else {
                init_tensor(op, name, spec, 0, device)
            }
        })
    }

    /// The preprocessing this model expects of raw pixels, when it is not the data set's own
    /// (models imported from elsewhere: raw 0..255 pixels, ImageNet statistics). It is kept
    /// with the provenance (key `preprocess`), so every model derived from this one carries it.
    pub fn preprocess(&self) -> Result<Option<crate::data::Normalize>> {
        let Some(v) = self.preprocess_entry()? else {
            return Ok(None);
        };
        let list = |key: &str| -> Option<Vec<f32>> {
            v.get(key).and_then(|a| a.as_array()).map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| x as f32)
                    .collect()
            })
        };
        match (list("mean"), list("std")) {
            (None, None) => Ok(None),
            (Some(mean), Some(std)) => {
                let norm = crate::data::Normalize { mean, std };
                if usable(&norm) {
                    Ok(Some(norm))
                } else {
                    Err(self
                        .bad_preprocess("`mean` and `std` need at least one value, std positive"))
                }
            }
            _ => Err(self.bad_preprocess("it needs both `mean` and `std`")),
        }
    }

    /// Whether images of another size are resized to this model's input (bilinear) before
    /// they are fed to it: an import option, kept with the preprocessing.
    pub fn resizes_input(&self) -> Result<bool> {
        Ok(self
            .preprocess_entry()?
            .and_then(|v| v.get("resize").and_then(|r| r.as_bool()))
            .unwrap_or(false))
    }

    /// Feeds a data set the way this model expects: its own normalization when it records one
    /// (imported models), and images resized to its input when it asks for that. Image folders
    /// (photographs of any size and colour) take its channels and size whatever it records.
    pub fn adapt_data(&self, data: &mut crate::data::DataSplits) -> Result<()> {
        let input = self.input_shape();
        let folder = data.spec.starts_with("images:") || data.spec.starts_with("unlabeled:");
        if let (&[mc, _, _], true) = (&input[..], folder) {
            let c = data.train.shape[0];
            if mc != c && matches!((c, mc), (1, 3) | (3, 1)) {
                data.train = data.train.with_channels(mc)?;
                data.test = data.test.with_channels(mc)?;
                let n = &mut data.normalize;
                for v in [&mut n.mean, &mut n.std] {
                    let avg = v.iter().sum::<f32>() / v.len() as f32;
                    *v = vec![avg; mc];
                }
            }
        }
        let [c, h, w] = data.train.shape;
        if let [mc, mh, mw] = input[..] {
            if (mh, mw) != (h, w) && mc == c && (folder || self.resizes_input()?) {
                // One byte per pixel, both splits: refuse what cannot fit rather than abort (a
                // set read from its files only changes the size it decodes to).
                let images = data.train.labels.len() + data.test.labels.len();
                let bytes = images as u128 * (c * mh * mw) as u128;
                if bytes > 1 << 33 && !data.train.is_streamed() {
                    return Err(CoreError::Invalid(format!(
                        "the model's input is {c}x{mh}x{mw}: resizing the {} images of `{}` to \
                         it would take {:.0} GiB",
                        images,
                        data.spec,
                        bytes as f64 / f64::from(1u32 << 30)
                    )));
                }
                data.train = data.train.resized(mh, mw);
                data.test = data.test.resized(mh, mw);
                data.spec = format!("{} (resized to {mh}x{mw})", data.spec);
            }
        }
        if let Some(p) = self.preprocess()? {
            for (what, v) in [("mean", &p.mean), ("std", &p.std)] {
                if v.len() != 1 && v.len() != c {
                    return Err(CoreError::Invalid(format!(
                        "the model's preprocessing has {} {what} values; the data `{}` has {c} \
                         channel(s)",
                        v.len(),
                        data.spec
                    )));
                }
            }
            data.normalize = p;
        }
        Ok(())
    }

    fn preprocess_entry(&self) -> Result<Option<serde_json::Value>> {
        let Some(text) = self.provenance.get(PREPROCESS_KEY) else {
            return Ok(None);
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| self.bad_preprocess(&e.to_string()))?;
        if !v.is_object() {
            return Err(self.bad_preprocess("it is not a JSON object"));
        }
        Ok(Some(v))
    }

    fn bad_preprocess(&self, m: &str) -> CoreError {
        let text = self
            .provenance
            .get(PREPROCESS_KEY)
            .cloned()
            .unwrap_or_default();
        CoreError::Invalid(format!(
            "the model's `preprocess` entry {text:?} is malformed: {m}"
        ))
    }

    /// Records the preprocessing this model expects (see [`Model::preprocess`] and
    /// [`Model::resizes_input`]); `None` keeps the data set's normalization.
    pub fn set_preprocess(
        &mut self,
        norm: Option<&crate::data::Normalize>,
        resize: bool,
    ) -> Result<()> {
        let mut v = serde_json::Map::new();
        if let Some(norm) = norm {
            if !usable(norm) {
                return Err(CoreError::Invalid(format!(
                    "preprocessing needs a mean and a positive std per channel, got {norm:?}"
                )));
            }
            let channels = self.input_shape().first().copied().unwrap_or(1);
            for v in [&norm.mean, &norm.std] {
                if v.len() != 1 && v.len() != channels {
                    return Err(CoreError::Invalid(format!(
                        "preprocessing gives {} values per statistic for a {channels}-channel \
                         input",
                        v.len()
                    )));
                }
            }
            v.insert("mean".into(), serde_json::json!(norm.mean));
            v.insert("std".into(), serde_json::json!(norm.std));
        }
        if resize {
            v.insert("resize".into(), serde_json::Value::Bool(true));
        }
        if v.is_empty() {
            self.provenance.remove(PREPROCESS_KEY);
        } else {
            self.provenance.insert(
                PREPROCESS_KEY.into(),
                serde_json::Value::Object(v).to_string(),
            );
        }
        Ok(())
    }

    /// A copy whose parameters are new variables (training the copy leaves `self` untouched).
    pub fn deep_clone(&self) -> Result<Model> {
        Ok(Model {
            graph: self.graph.clone(),
            params: self.params.deep_clone()?,
            provenance: self.provenance.clone(),
            int8: self.int8.clone(),
        })
    }

    /// The device the parameters live on (CPU for a model without parameters).
    pub fn device(&self) -> Device {
        self.params
            .iter()
            .next()
            .map(|(_, p)| p.var.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// A 64-bit fingerprint (16 hex digits) of the graph and every parameter's name, shape and
    /// values: files derived from a model (sensitivities, search histories) record it, so that
    /// they are refused for any other model.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = Fnv::new();
        let def = serde_json::to_string(&self.graph.to_def())
            .map_err(|e| crate::CoreError::Invalid(format!("cannot serialize the graph: {e}")))?;
        h.write(def.as_bytes());
        for (name, p) in self.params.iter() {
            h.write(name.as_bytes());
            let t = p.var.as_tensor();
            for &d in t.dims() {
                h.write(&(d as u64).to_le_bytes());
            }
            let values = t
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            for v in values {
                h.write(&v.to_le_bytes());
            }
        }
        Ok(format!("{:016x}", h.0))
    }

    /// Per-sample shape of the (first) input.
    pub fn input_shape(&self) -> Vec<usize> {
        self.graph
            .inputs()
            .first()
            .map(|&i| self.graph.node(i).shape.clone())
            .unwrap_or_default()
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a: each parameter's values depend on the seed and its name only, not on the order
    // in which parameters are created.
    let mut h = Fnv(Fnv::new().0 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    h.write(name.as_bytes());
    h.finish()
}

fn init_tensor(
    op: &Op,
    name: &str,
    spec: &ParamSpec,
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = spec.shape.iter().product();
    let mut rng = StdRng::seed_from_u64(name_seed(seed, name));
    let values: Vec<f32> = match (op, spec.role) {
        (Op::Conv2d(c), "weight") => {
            let fan_out = (c.out_channels * c.kernel[0] * c.kernel[1] / c.groups.max(1)).max(1);
            let std = (2.0 / fan_out as f64).sqrt();
            normal(&mut rng, n, std)
        }
        (Op::Linear(l), "weight") => {
            let bound = 1.0 / (l.in_features.max(1) as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        }
        (Op::Dense(l), "weight") => {
            let bound = 1.0 / (l.in_features.max(1) as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        }
        (
            Op::BatchNorm2d(_) | Op::ChannelAffine { .. } | Op::LayerNorm { .. },
            "weight" | "running_var",
        ) => vec![1.0; n],
        // PyTorch's default slope.
        (Op::PRelu { .. }, "weight") => vec![0.25; n],
        _ => vec![0.0; n],
    };
    Ok(Tensor::from_vec(values, spec.shape.clone(), device)?)
}

fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box-Muller: two independent standard normals from two uniforms.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos() * std) as f32);
        out.push((r * t.sin() * std) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{GraphBuilder, ParamKind};

    #[test]
    fn preprocessing_takes_one_value_or_one_per_channel() {
        let g = GraphBuilder::new([3, 8, 8])
            .conv("c", 4, 3, 1, 1)
            .build()
            .unwrap();
        let mut m = Model::init(g, 0, &Device::Cpu).unwrap();
        let norm = |n: usize| crate::data::Normalize {
            mean: vec![0.5; n],
            std: vec![0.25; n],
        };
        for ok in [1, 3] {
            m.set_preprocess(Some(&norm(ok)), false).unwrap();
            assert_eq!(m.preprocess().unwrap().unwrap().mean.len(), ok);
        }
        let e = m.set_preprocess(Some(&norm(2)), false).unwrap_err();
        assert!(
            e.to_string()
                .contains("2 values per statistic for a 3-channel input"),
            "{e}"
        );
    }

    #[test]
    fn zero_weights_keep_fresh_buffers() {
        let g = GraphBuilder::new([1, 8, 8])
            .conv("c", 4, 3, 1, 1)
            .bn("bn")
            .build()
            .unwrap();
        let init = Model::init(g.clone(), 3, &Device::Cpu).unwrap();
        let zero = Model::with_zero_weights(g, &Device::Cpu).unwrap();
        let values = |m: &Model, n: &str| {
            m.params
                .tensor(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for (name, p) in init.params.iter() {
            if p.kind.is_trainable() {
                assert!(values(&zero, name).iter().all(|&v| v == 0.0), "{name}");
            } else {
                assert_eq!(values(&zero, name), values(&init, name), "{name}");
            }
        }
        assert_eq!(values(&zero, "bn.running_var"), vec![1.0; 4]);
    }

    #[test]
    fn init_is_seeded_and_checked() {
        let g = GraphBuilder::new([1, 8, 8])
            .conv("c", 4, 3, 1, 1)
            .bn("bn")
            .build()
            .unwrap();
        let a = Model::init(g.clone(), 7, &Device::Cpu).unwrap();
        let b = Model::init(g.clone(), 7, &Device::Cpu).unwrap();
        let c = Model::init(g.clone(), 8, &Device::Cpu).unwrap();
        let w = |m: &Model| {
            m.params
                .tensor("c.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        assert_eq!(a.params.len(), 5);

        let mut p = a.params.deep_clone().unwrap();
        p.insert(
            "extra.weight",
            &Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
            ParamKind::Weight,
        )
        .unwrap();
        let e = Model::new(g.clone(), p).unwrap_err().to_string();
        assert!(e.contains("extra.weight"), "{e}");
        let mut p = a.params.deep_clone().unwrap();
        p.insert(
            "bn.bias",
            &Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
            ParamKind::Bias,
        )
        .unwrap();
        let e = Model::new(g, p).unwrap_err().to_string();
        assert!(e.contains("bn.bias") && e.contains("[3]"), "{e}");
    }
}
