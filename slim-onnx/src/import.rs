//! ONNX to Slim: reads a model file into a Slim [`Model`].
//!
//! The importer walks the ONNX nodes in their (topological) order and keeps, for every ONNX
//! value, either a constant (initializers, `Constant` nodes, and whatever can be computed from
//! them at import: the `Shape`/`Gather`/`Slice`/`Unsqueeze`/`Concat` chains that exporters emit
//! for a `Reshape`) or the Slim node that computes it. Constants added to or multiplied with a
//! convolution or linear layer's output per channel become its bias or scale (CNTK and some
//! PyTorch exports write the bias as a separate `Add`). Nothing is executed while importing.
//!
//! Slim shapes have no batch axis; an ONNX value of shape `[N, C, 1, 1]` that comes out of
//! `GlobalAveragePool` is the Slim vector `[C]`, and a 1x1 convolution on it is imported as a
//! linear layer, so squeeze-and-excite blocks stay prunable.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use prost::Message;
use slim_core::data::Normalize;
use slim_core::graph::{
    BatchNormSpec, BinaryKind, Conv2dSpec, ConvTransposeSpec, CoordMode, Graph, LinearSpec,
    LrnSpec, NearestRounding, Op, PadMode, ParamKind, PoolSpec, ReduceKind, ResizeMode, ResizeSpec,
};
use slim_core::params::ParamStore;
use slim_core::Model;

use crate::proto::{self, data_type, AttributeProto, NodeProto, TensorProto};
use crate::{OnnxError, Result};

pub use crate::ops::SUPPORTED_OPS;

/// Options of an import.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The per-sample input shape `[C, H, W]`, for models whose input shape is symbolic (or to
    /// check it).
    pub input_shape: Option<Vec<usize>>,
    /// The preprocessing the model expects of raw pixels, stored in the model file and used by
    /// every command that feeds it data.
    pub preprocess: Option<Normalize>,
    /// Resize images of another size to the model's input (bilinear) before feeding them;
    /// stored with the preprocessing.
    pub resize: bool,
    /// The most values that ops filling tensors from a shape alone (ConstantOfShape) may
    /// create in one import, beyond the bytes of the file; `None`: 2^28 (VGG-19's light
    /// network needs 1.4 · 10^8). A small file cannot ask for more.
    pub max_generated: Option<usize>,
}

/// Reads an ONNX file into a model.
pub fn import_file(path: impl AsRef<Path>, opts: &ImportOptions) -> Result<Model> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| OnnxError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    import_in(&bytes, opts, Some(dir)).map_err(|e| match e {
        OnnxError::Model(m) => OnnxError::File {
            path: path.display().to_string(),
            message: m,
        },
        e => e,
    })
}

/// Reads an ONNX model from its bytes (a model whose tensors live in external data files
/// must be read with [`import_file`], which finds them beside it).
pub fn import(bytes: &[u8], opts: &ImportOptions) -> Result<Model> {
    import_in(bytes, opts, None)
}

/// The most bytes Slim reads from one external data file for one tensor (as many as a
/// tensor of [`slim_core::graph::MAX_ELEMENTS`] doubles).
const MAX_EXTERNAL: u64 = 8 << 28;

/// Loads a tensor's external data (ONNX's `location`, `offset`, `length`, relative to the
/// model's folder) into its `raw_data`.
fn load_external(t: &mut TensorProto, dir: &Path) -> Result<()> {
    let bad = |m: String| OnnxError::Model(format!("tensor `{}`: {m}", t.name));
    let entry = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let location =
        entry("location").ok_or_else(|| bad("external data without a location".into()))?;
    let relative = Path::new(&location);
    let inside = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !inside {
        return Err(bad(format!(
            "its external data `{location}` is not a path inside the model's folder"
        )));
    }
    let number = |key: &str| -> Result<Option<u64>> {
        entry(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("external data {key} `{v}`")))
            })
            .transpose()
    };
    let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
    let path = dir.join(relative);
    let io = |e: std::io::Error| bad(format!("its external data {}: {e}", path.display()));
    let mut f = std::fs::File::open(&path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) || length > MAX_EXTERNAL {
        return Err(bad(format!(
            "its external data ({length} bytes at {offset}) lies outside {} ({size} bytes)",
            path.display()
        )));
    }
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut raw = vec![0u8; length as usize];
    f.read_exact(&mut raw).map_err(io)?;
    t.raw_data = raw;
    t.external_data.clear();
    t.data_location = 0;
    Ok(())
}

fn import_in(bytes: &[u8], opts: &ImportOptions, dir: Option<&Path>) -> Result<Model> {
    let mut model = proto::ModelProto::decode(bytes)
        .map_err(|e| OnnxError::Model(format!("not an ONNX model (protobuf: {e})")))?;
    if let (Some(dir), Some(g)) = (dir, model.graph.as_mut()) {
        for t in g.initializer.iter_mut() {
            if t.data_location == 1 || !t.external_data.is_empty() {
                load_external(t, dir)?;
            }
        }
    }
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::Model("the ONNX model has no graph".into()))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    if opset < 7 {
        return Err(OnnxError::Model(format!(
            "the model uses opset {opset}; Slim imports opset 7 and newer"
        )));
    }
    let unsupported: Vec<String> = graph
        .node
        .iter()
        .filter(|n| {
            !(n.domain.is_empty() || n.domain == "ai.onnx")
                || !SUPPORTED_OPS.contains(&n.op_type.as_str())
        })
        .map(|n| {
            let domain = if n.domain.is_empty() {
                "ai.onnx"
            } else {
                &n.domain
            };
            format!(
                "`{}` ({} of {domain}, opset {opset})",
                display_name(n),
                n.op_type
            )
        })
        .collect();
    if !unsupported.is_empty() {
        return Err(OnnxError::Unsupported(unsupported));
    }
    let mut b = Builder::new(opset);
    if let Some(max) = opts.max_generated {
        b.generated_left.set(max);
    }
    for t in &graph.initializer {
        b.values
            .insert(t.name.clone(), Value::Const(Const::from_proto(t)?));
        if data_type::is_integer(t.data_type) {
            b.ints.insert(t.name.clone());
        }
    }
    for n in &graph.node {
        for i in &n.input {
            *b.uses.entry(i.clone()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *b.uses.entry(o.name.clone()).or_default() += 1;
    }
    // The data input: a graph input that is not an initializer (old IR lists both), that no
    // node computes (some exporters list the outputs of their weight-filling nodes as inputs
    // too), and that some node reads.
    let computed: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(|o| o.as_str()))
        .collect();
    let inputs: Vec<&proto::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| {
            !b.values.contains_key(&i.name)
                && !computed.contains(i.name.as_str())
                && b.uses.get(&i.name).copied().unwrap_or(0) > 0
        })
        .collect();
    let input = match inputs.as_slice() {
        [one] => *one,
        [] => return Err(OnnxError::Model("the model has no data input".into())),
        many => {
            return Err(OnnxError::Model(format!(
                "the model has {} data inputs ({}); Slim models take one image input",
                many.len(),
                many.iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let shape = input_shape(input, opts.input_shape.as_deref())?;
    let in_name = b.fresh_name(&sanitize(&input.name), "input");
    b.push(
        &in_name,
        Op::Input {
            shape: shape.clone(),
        },
        &[],
        BTreeMap::new(),
    )?;
    b.values.insert(
        input.name.clone(),
        Value::Node(NodeRef::plain(in_name, &shape)),
    );

    for n in &graph.node {
        b.node(n).map_err(|e| match e {
            OnnxError::Model(m) => {
                OnnxError::Model(format!("node `{}` ({}): {m}", display_name(n), n.op_type))
            }
            e => e,
        })?;
    }
    let mut outputs = Vec::new();
    for o in &graph.output {
        match b.values.get(&o.name) {
            Some(Value::Node(r)) => outputs.push(r.node.clone()),
            Some(Value::Const(_)) => {
                return Err(OnnxError::Model(format!(
                    "the graph output `{}` is a constant",
                    o.name
                )))
            }
            None => {
                return Err(OnnxError::Model(format!(
                    "the graph output `{}` is computed by no node",
                    o.name
                )))
            }
        }
    }
    let mut out = b.finish(&outputs)?;
    out.provenance
        .insert("created_by".into(), "slim import".into());
    out.provenance
        .insert("onnx.opset".into(), opset.to_string());
    let producer = format!("{} {}", model.producer_name, model.producer_version);
    if !producer.trim().is_empty() {
        out.provenance
            .insert("onnx.producer".into(), producer.trim().to_string());
    }
    // A model Slim exported carries its provenance (and preprocessing) as `slim.*` metadata.
    for e in &model.metadata_props {
        if let Some(key) = e.key.strip_prefix("slim.") {
            if key != "created_by" {
                out.provenance.insert(key.to_string(), e.value.clone());
            }
        }
    }
    if opts.preprocess.is_some() || opts.resize {
        out.set_preprocess(opts.preprocess.as_ref(), opts.resize)?;
    }
    Ok(out)
}

fn display_name(n: &NodeProto) -> String {
    if !n.name.is_empty() {
        n.name.clone()
    } else {
        n.output.first().cloned().unwrap_or_default()
    }
}

/// A Slim node name from an ONNX name: `/layer1/conv/Conv` becomes `layer1.conv.Conv`.
pub(crate) fn sanitize(name: &str) -> String {
    let s: String = name
        .trim_start_matches('/')
        .chars()
        .map(|c| match c {
            '/' | ':' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') => c,
            _ => '_',
        })
        .collect();
    s.trim_matches('.').to_string()
}

fn input_shape(input: &proto::ValueInfoProto, given: Option<&[usize]>) -> Result<Vec<usize>> {
    let shape = declared_input_shape(input, given)?;
    let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if shape.iter().any(|&d| d as i64 > LIMIT) || total.is_none_or(|t| t > 1 << 26) {
        return err(format!(
            "the input `{}` of per-sample shape {shape:?} is too large",
            input.name
        ));
    }
    Ok(shape)
}

fn declared_input_shape(
    input: &proto::ValueInfoProto,
    given: Option<&[usize]>,
) -> Result<Vec<usize>> {
    let dims: Option<Vec<Option<usize>>> = input
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| d.dim_value.filter(|&v| v > 0).map(|v| v as usize))
                .collect()
        });
    let declared: Option<Vec<Option<usize>>> = dims.map(|d| d.into_iter().skip(1).collect());
    match (declared, given) {
        (Some(d), Some(g)) => {
            let fits =
                d.len() == g.len() && d.iter().zip(g).all(|(a, b)| a.is_none_or(|a| a == *b));
            if fits {
                Ok(g.to_vec())
            } else {
                Err(OnnxError::Model(format!(
                    "--input-shape {} does not match the model's input `{}` of per-sample shape {}",
                    g.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join("x"),
                    input.name,
                    show_dims(&d)
                )))
            }
        }
        (_, Some(g)) => Ok(g.to_vec()),
        (Some(d), None) => d
            .iter()
            .copied()
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| {
                OnnxError::Model(format!(
                "the input `{}` has per-sample shape {}; give its size with --input-shape CxHxW",
                input.name,
                show_dims(&d)
            ))
            }),
        (None, None) => Err(OnnxError::Model(format!(
            "the input `{}` declares no shape; give it with --input-shape CxHxW",
            input.name
        ))),
    }
}

fn show_dims(d: &[Option<usize>]) -> String {
    let v: Vec<String> = d
        .iter()
        .map(|x| x.map(|v| v.to_string()).unwrap_or_else(|| "?".into()))
        .collect();
    format!("[{}]", v.join(", "))
}

/// A constant tensor, values held as f64 (exact for f32, int8 and the int64 shape values
/// exporters compute).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Const {
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

impl Const {
    fn from_proto(t: &TensorProto) -> Result<Const> {
        let bad = |m: String| OnnxError::Model(format!("tensor `{}`: {m}", t.name));
        if t.data_location == 1 || !t.external_data.is_empty() {
            return Err(bad(
                "its data is in an external file; import the model from its file, beside its data"
                    .into(),
            ));
        }
        let mut dims = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            if d < 0 {
                return Err(bad(format!("negative dimension {d}")));
            }
            dims.push(d as usize);
        }
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 31)
            .ok_or_else(|| bad(format!("dimensions {dims:?} are too large")))?;
        let raw = &t.raw_data;
        let values: Vec<f64> = match t.data_type {
            data_type::FLOAT if !raw.is_empty() => le_chunks::<4>(raw, n, &bad)?
                .map(|c| f64::from(f32::from_le_bytes(c)))
                .collect(),
            data_type::FLOAT => t.float_data.iter().map(|&v| f64::from(v)).collect(),
            data_type::DOUBLE if !raw.is_empty() => le_chunks::<8>(raw, n, &bad)?
                .map(f64::from_le_bytes)
                .collect(),
            data_type::DOUBLE => t.double_data.clone(),
            data_type::INT64 if !raw.is_empty() => le_chunks::<8>(raw, n, &bad)?
                .map(|c| i64::from_le_bytes(c) as f64)
                .collect(),
            data_type::INT64 => t.int64_data.iter().map(|&v| v as f64).collect(),
            data_type::INT32 if !raw.is_empty() => le_chunks::<4>(raw, n, &bad)?
                .map(|c| f64::from(i32::from_le_bytes(c)))
                .collect(),
            data_type::INT32 | data_type::INT8 | data_type::UINT8 if raw.is_empty() => {
                t.int32_data.iter().map(|&v| f64::from(v)).collect()
            }
            data_type::INT8 => raw.iter().map(|&v| f64::from(v as i8)).collect(),
            data_type::UINT8 => raw.iter().map(|&v| f64::from(v)).collect(),
            other => {
                return Err(bad(format!(
                    "element type {} is not supported",
                    data_type::name(other)
                )))
            }
        };
        if values.len() != n {
            return Err(bad(format!(
                "holds {} values, its dimensions {dims:?} need {n}",
                values.len()
            )));
        }
        Ok(Const { dims, values })
    }

    fn numel(&self) -> usize {
        self.values.len()
    }

    fn scalar(v: f64) -> Const {
        Const {
            dims: vec![],
            values: vec![v],
        }
    }

    fn ints(&self) -> Vec<i64> {
        self.values.iter().map(|&v| v as i64).collect()
    }

    fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    /// The values as one per channel, when the shape broadcasts that way over `[N, C, ...]`
    /// (or over `[N, C]` for a feature vector): `[C]`, `[C, 1, 1]`, `[1, C, 1, 1]`, `[1, C]`;
    /// a scalar gives `channels` copies.
    fn per_channel(&self, channels: usize, rank: usize) -> Option<Vec<f64>> {
        if self.numel() == 1 {
            return Some(vec![self.values[0]; channels]);
        }
        if self.numel() != channels {
            return None;
        }
        let non_one: Vec<usize> = self
            .dims
            .iter()
            .enumerate()
            .filter(|(_, &d)| d != 1)
            .map(|(i, _)| i)
            .collect();
        // Broadcasting aligns trailing axes: the channel axis of an ONNX value of rank
        // `rank + 1` sits `rank` places from the end.
        let from_end = self.dims.len() - non_one.first().copied()?;
        (from_end == rank && self.dims.len() <= rank + 1).then(|| self.values.clone())
    }
}

fn le_chunks<'a, const K: usize>(
    raw: &'a [u8],
    n: usize,
    bad: &dyn Fn(String) -> OnnxError,
) -> Result<impl Iterator<Item = [u8; K]> + 'a> {
    if raw.len() != n * K {
        return Err(bad(format!(
            "raw data has {} bytes, {n} values need {}",
            raw.len(),
            n * K
        )));
    }
    Ok(raw.chunks_exact(K).map(|c| std::array::from_fn(|i| c[i])))
}

/// A reference to the Slim node that computes an ONNX value.
#[derive(Clone, Debug)]
struct NodeRef {
    node: String,
    /// The ONNX per-sample shape (no batch axis); it differs from the Slim node's shape only
    /// by trailing ones (`[C, 1, 1]` against `[C]`).
    onnx: Vec<usize>,
}

impl NodeRef {
    fn plain(node: String, shape: &[usize]) -> NodeRef {
        NodeRef {
            node,
            onnx: shape.to_vec(),
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    Const(Const),
    Node(NodeRef),
}

struct Pending {
    name: String,
    op: Op,
    inputs: Vec<String>,
    shape: Vec<usize>,
    params: BTreeMap<&'static str, Const>,
}

struct Builder {
    opset: i64,
    values: HashMap<String, Value>,
    /// ONNX values that are a channel grid `[g, C/g, H, W]` with its two channel axes
    /// swapped (the middle of a channel shuffle): the Slim node holds the unswapped values, so
    /// only a Reshape back to `[C, H, W]` may read them.
    swapped: HashMap<String, usize>,
    /// What ConstantOfShape may still create ([`ImportOptions::max_generated`]).
    generated_left: std::cell::Cell<usize>,
    /// The constant ONNX values of integer type (shape arithmetic), whose Div truncates.
    ints: std::collections::HashSet<String>,
    /// Constant values computed from a `Shape` of data, with the entries that hold the batch
    /// size (unknown at import, stored as 1) marked.
    batchy: HashMap<String, Vec<bool>>,
    uses: HashMap<String, usize>,
    nodes: Vec<Pending>,
    by_name: HashMap<String, usize>,
}

fn err<T>(m: impl Into<String>) -> Result<T> {
    Err(OnnxError::Model(m.into()))
}

impl Builder {
    fn new(opset: i64) -> Builder {
        Builder {
            opset,
            values: HashMap::new(),
            swapped: HashMap::new(),
            generated_left: std::cell::Cell::new(slim_core::graph::MAX_ELEMENTS),
            ints: std::collections::HashSet::new(),
            batchy: HashMap::new(),
            uses: HashMap::new(),
            nodes: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    fn fresh_name(&self, base: &str, fallback: &str) -> String {
        let base = if base.is_empty() { fallback } else { base };
        if !self.by_name.contains_key(base) {
            return base.to_string();
        }
        (2..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.by_name.contains_key(n))
            .unwrap_or_else(|| base.to_string())
    }

    fn push(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[&str],
        params: BTreeMap<&'static str, Const>,
    ) -> Result<Vec<usize>> {
        let shapes: Vec<&[usize]> = inputs
            .iter()
            .map(|i| self.nodes[self.by_name[*i]].shape.as_slice())
            .collect();
        let shape = op.infer_shape(&shapes).map_err(OnnxError::Model)?;
        self.by_name.insert(name.to_string(), self.nodes.len());
        self.nodes.push(Pending {
            name: name.to_string(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            shape: shape.clone(),
            params,
        });
        Ok(shape)
    }

    /// Adds a Slim node and binds the ONNX output to it.
    fn emit(
        &mut self,
        n: &NodeProto,
        base: &str,
        op: Op,
        inputs: &[&str],
        params: BTreeMap<&'static str, Const>,
    ) -> Result<()> {
        let name = self.fresh_name(base, &n.op_type.to_lowercase());
        let shape = self.push(&name, op, inputs, params)?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    fn bind(&mut self, n: &NodeProto, r: NodeRef) -> Result<()> {
        let out = n
            .output
            .first()
            .ok_or_else(|| OnnxError::Model("no output".into()))?;
        self.values.insert(out.clone(), Value::Node(r));
        Ok(())
    }

    fn bind_const(&mut self, n: &NodeProto, c: Const) -> Result<()> {
        let out = n
            .output
            .first()
            .ok_or_else(|| OnnxError::Model("no output".into()))?;
        self.values.insert(out.clone(), Value::Const(c));
        Ok(())
    }

    fn value(&self, n: &NodeProto, i: usize) -> Result<&Value> {
        let name = n
            .input
            .get(i)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OnnxError::Model(format!("input {i} is missing")))?;
        self.values.get(name).ok_or_else(|| {
            OnnxError::Model(format!("input `{name}` is computed by no earlier node"))
        })
    }

    fn opt_const(&self, n: &NodeProto, i: usize) -> Result<Option<Const>> {
        if n.input.get(i).is_none_or(|s| s.is_empty()) {
            return Ok(None);
        }
        match self.value(n, i)? {
            Value::Const(c) => Ok(Some(c.clone())),
            Value::Node(_) => err(format!(
                "input `{}` must be a constant (an initializer), it is computed from the data",
                n.input[i]
            )),
        }
    }

    fn konst(&self, n: &NodeProto, i: usize) -> Result<Const> {
        self.opt_const(n, i)?
            .ok_or_else(|| OnnxError::Model(format!("input {i} is missing")))
    }

    fn node_in(&self, n: &NodeProto, i: usize) -> Result<NodeRef> {
        if let Some(g) = n.input.get(i).and_then(|v| self.swapped.get(v)) {
            return err(format!(
                "input `{}` is a channel grid of {g} groups with its axes swapped; Slim reads it only when a Reshape turns it back into channels (a channel shuffle)",
                n.input[i]
            ));
        }
        self.view_in(n, i)
    }

    /// Like [`Builder::node_in`], but also a swapped channel grid.
    fn view_in(&self, n: &NodeProto, i: usize) -> Result<NodeRef> {
        match self.value(n, i)? {
            Value::Node(r) => Ok(r.clone()),
            Value::Const(_) => err(format!(
                "input `{}` is a constant where Slim expects data",
                n.input[i]
            )),
        }
    }

    /// Which entries of a folded constant hold the batch size, when an input held it.
    fn batch_flags(&self, n: &NodeProto, a: &Attrs, out: &Const) -> Option<Vec<bool>> {
        let flags: Vec<Option<&Vec<bool>>> = n.input.iter().map(|i| self.batchy.get(i)).collect();
        if flags.iter().all(|f| f.is_none_or(|f| !f.contains(&true))) {
            return None;
        }
        let of = |i: usize| -> Vec<bool> {
            match flags.get(i).copied().flatten() {
                Some(f) => f.clone(),
                None => {
                    let len = self.raw_const(n, i).map_or(0, |c| c.numel());
                    vec![false; len]
                }
            }
        };
        let all = vec![true; out.numel()];
        let picked = match n.op_type.as_str() {
            "Identity" | "Cast" | "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" => of(0),
            "Concat" => (0..n.input.len()).flat_map(of).collect(),
            "Gather" => {
                let f = of(0);
                let idx = self.raw_const(n, 1)?.ints();
                idx.iter()
                    .map(|&i| {
                        let j = if i < 0 { i + f.len() as i64 } else { i };
                        f.get(j as usize).copied().unwrap_or(true)
                    })
                    .collect()
            }
            "Slice" => {
                let f = of(0);
                let (s, e) = if self.opset < 10 {
                    let get = |k: &str| a.ints(k).and_then(|v| v.first().copied());
                    (get("starts"), get("ends"))
                } else {
                    let get =
                        |i: usize| self.raw_const(n, i).and_then(|c| c.ints().first().copied());
                    (get(1), get(2))
                };
                let len = f.len() as i64;
                let clamp = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
                let (s, e) = (clamp(s.unwrap_or(0)), clamp(e.unwrap_or(len)));
                f[s as usize..e.max(s) as usize].to_vec()
            }
            "Mul" | "Add" | "Sub" | "Div" => {
                let (x, y) = (of(0), of(1));
                (0..out.numel())
                    .map(|i| {
                        x.get(if x.len() == 1 { 0 } else { i })
                            .copied()
                            .unwrap_or(true)
                            || y.get(if y.len() == 1 { 0 } else { i })
                                .copied()
                                .unwrap_or(true)
                    })
                    .collect()
            }
            _ => all.clone(),
        };
        Some(if picked.len() == out.numel() {
            picked
        } else {
            all
        })
    }

    /// A constant input, without the batch-size check (folding propagates that).
    fn raw_const(&self, n: &NodeProto, i: usize) -> Option<Const> {
        match self.values.get(n.input.get(i)?)? {
            Value::Const(c) => Some(c.clone()),
            Value::Node(_) => None,
        }
    }

    /// True when every input of `n` is a constant of integer type.
    fn int_typed(&self, n: &NodeProto) -> bool {
        n.input
            .iter()
            .filter(|s| !s.is_empty())
            .all(|i| self.ints.contains(i))
    }

    fn all_const(&self, n: &NodeProto) -> bool {
        n.input
            .iter()
            .filter(|s| !s.is_empty())
            .all(|i| matches!(self.values.get(i), Some(Value::Const(_))))
    }

    fn shape_of(&self, r: &NodeRef) -> Vec<usize> {
        self.nodes[self.by_name[&r.node]].shape.clone()
    }

    /// A base name for a layer with weights: the weight initializer's name without its
    /// `.weight` suffix when it has one (PyTorch exports), so parameter names stay the ONNX
    /// names; else the node's own name.
    fn layer_name(&self, n: &NodeProto, weight_input: usize) -> String {
        if let Some(w) = n.input.get(weight_input) {
            if let Some(stem) = w.strip_suffix(".weight") {
                let s = sanitize(stem);
                if !s.is_empty() && s == stem && !self.by_name.contains_key(&s) {
                    return s;
                }
            }
        }
        sanitize(&display_name(n))
    }

    fn node(&mut self, n: &NodeProto) -> Result<()> {
        let a = Attrs(&n.attribute);
        // Anything computed from constants alone is folded now.
        if self.all_const(n) && n.op_type != "Constant" {
            if let Some(c) = self.fold(n, &a)? {
                let int = match n.op_type.as_str() {
                    "Cast" => data_type::is_integer(a.int("to").unwrap_or(0) as i32),
                    "Shape" => true,
                    "ConstantOfShape" => a
                        .tensor("value")
                        .is_some_and(|t| data_type::is_integer(t.data_type)),
                    _ => self.int_typed(n),
                };
                if int {
                    self.ints.extend(n.output.iter().cloned());
                }
                if let Some(flags) = self.batch_flags(n, &a, &c).filter(|f| f.contains(&true)) {
                    if let Some(out) = n.output.first() {
                        self.batchy.insert(out.clone(), flags);
                    }
                }
                return self.bind_const(n, c);
            }
        }
        // A constant that holds the batch size may only be a Reshape's batch entry.
        for (i, input) in n.input.iter().enumerate() {
            let Some(flags) = self.batchy.get(input) else {
                continue;
            };
            let reshape_batch = n.op_type == "Reshape" && i == 1 && !flags[1..].contains(&true);
            if !reshape_batch {
                return err(format!(
                    "input `{input}` is computed from the batch size, which Slim does not know at import (each sample is computed apart)"
                ));
            }
        }
        if n.op_type == "Constant" {
            let int = a
                .tensor("value")
                .is_some_and(|t| data_type::is_integer(t.data_type))
                || a.get("value_int").is_some()
                || a.get("value_ints").is_some();
            if int {
                self.ints.extend(n.output.iter().cloned());
            }
        }
        let base = sanitize(&display_name(n));
        match n.op_type.as_str() {
            "Constant" => {
                let c = if let Some(t) = a.tensor("value") {
                    Const::from_proto(t)?
                } else if let Some(f) = a.get("value_float") {
                    Const::scalar(f64::from(f.f))
                } else if let Some(f) = a.get("value_floats") {
                    Const {
                        dims: vec![f.floats.len()],
                        values: f.floats.iter().map(|&v| f64::from(v)).collect(),
                    }
                } else if let Some(i) = a.get("value_int") {
                    Const::scalar(i.i as f64)
                } else if let Some(i) = a.get("value_ints") {
                    Const {
                        dims: vec![i.ints.len()],
                        values: i.ints.iter().map(|&v| v as f64).collect(),
                    }
                } else {
                    return err("a Constant without a supported value attribute");
                };
                self.bind_const(n, c)
            }
            "Dropout" => {
                if n.output.len() > 1 && self.uses.get(&n.output[1]).copied().unwrap_or(0) > 0 {
                    return err("the dropout mask output is used, which Slim does not compute");
                }
                let p = if self.opset < 12 {
                    a.float("ratio").map(f64::from)
                } else {
                    match self.opt_const(n, 1)? {
                        Some(c) if c.values.len() == 1 => Some(c.values[0]),
                        Some(c) => {
                            return err(format!("its ratio has {} values, not one", c.values.len()))
                        }
                        None => None,
                    }
                };
                let p = decimal(p.unwrap_or(0.5) as f32) as f32;
                self.unary(n, &base, Op::Dropout { p })
            }
            "Cast" if !cast_keeps_floats(a.int("to").unwrap_or(0)) => err(format!(
                "a Cast of data to {}; Slim computes in floats",
                data_type::name(a.int("to").unwrap_or(0) as i32)
            )),
            "Identity" | "Cast" => {
                if n.output.len() > 1 && self.uses.get(&n.output[1]).copied().unwrap_or(0) > 0 {
                    return err("the dropout mask output is used, which Slim does not compute");
                }
                let v = self.value(n, 0)?.clone();
                let Some(out) = n.output.first().cloned() else {
                    return err("it has no output");
                };
                self.values.insert(out, v);
                Ok(())
            }
            "Shape" => {
                self.ints.extend(n.output.iter().cloned());
                let r = self.node_in(n, 0)?;
                // The batch size is not known at import: its entry is marked, and only a
                // Reshape's batch position may read it.
                let mut dims = vec![1.0];
                dims.extend(r.onnx.iter().map(|&d| d as f64));
                let (s, e) = shape_range(&a, dims.len());
                let flags: Vec<bool> = (s..e).map(|i| i == 0).collect();
                if let (Some(out), true) = (n.output.first(), flags.contains(&true)) {
                    self.batchy.insert(out.clone(), flags);
                }
                let values = dims[s..e].to_vec();
                self.bind_const(
                    n,
                    Const {
                        dims: vec![values.len()],
                        values,
                    },
                )
            }
            "Conv" => self.conv(n, &a),
            "BatchNormalization" => {
                let x = self.node_in(n, 0)?;
                let [scale, bias, mean, var] = [1, 2, 3, 4].map(|i| self.konst(n, i));
                let (scale, bias, mean, var) = (scale?, bias?, mean?, var?);
                let Some(&channels) = x.onnx.first() else {
                    return err("its input has no channel axis");
                };
                for (what, c) in [
                    ("scale", &scale),
                    ("bias", &bias),
                    ("mean", &mean),
                    ("var", &var),
                ] {
                    if c.numel() != channels {
                        return err(format!(
                            "{what} has {} values for {channels} channels",
                            c.numel()
                        ));
                    }
                }
                let eps = decimal(a.float("epsilon").unwrap_or(1e-5));
                // ONNX weighs the running statistic, Slim (as PyTorch) the batch's.
                let momentum = 1.0 - decimal(a.float("momentum").unwrap_or(0.9));
                let momentum = (momentum * 1e9).round() / 1e9;
                let name = self.layer_name(n, 1);
                let mut p = BTreeMap::new();
                p.insert("weight", scale);
                p.insert("bias", bias);
                p.insert("running_mean", mean);
                p.insert("running_var", var);
                let op = Op::BatchNorm2d(BatchNormSpec {
                    channels,
                    eps,
                    momentum,
                });
                self.emit_keep(n, &name, op, &[&x], p)
            }
            "Relu" => self.unary(n, &base, Op::Relu),
            "Sigmoid" => self.unary(n, &base, Op::Sigmoid),
            "HardSwish" => self.unary(n, &base, Op::HardSwish),
            "HardSigmoid" => {
                let alpha = a.float("alpha").unwrap_or(0.2);
                let beta = a.float("beta").unwrap_or(0.5);
                self.unary(n, &base, Op::HardSigmoid { alpha, beta })
            }
            "Clip" => {
                let (lo, hi) = if self.opset < 11 {
                    (a.float("min").map(f64::from), a.float("max").map(f64::from))
                } else {
                    let one = |c: Option<Const>| -> Result<Option<f64>> {
                        match c {
                            None => Ok(None),
                            Some(c) if c.numel() == 1 => Ok(Some(c.values[0])),
                            Some(_) => err("Clip bounds must be scalars"),
                        }
                    };
                    (one(self.opt_const(n, 1)?)?, one(self.opt_const(n, 2)?)?)
                };
                let big = |v: Option<f64>| v.is_none_or(|v| v >= 3.0e38);
                let small = |v: Option<f64>| v.is_none_or(|v| v <= -3.0e38);
                match lo {
                    Some(l) if l == 0.0 && hi == Some(6.0) => self.unary(n, &base, Op::Relu6),
                    Some(l) if l == 0.0 && big(hi) => self.unary(n, &base, Op::Relu),
                    _ => {
                        let bound = |v: Option<f64>, open: bool| {
                            (!open).then(|| v.map(|v| v as f32)).flatten()
                        };
                        let op = Op::Clip {
                            min: bound(lo, small(lo)),
                            max: bound(hi, big(hi)),
                        };
                        self.unary(n, &base, op)
                    }
                }
            }
            "LeakyRelu" => {
                let alpha = a.float("alpha").unwrap_or(0.01);
                self.unary(n, &base, Op::LeakyRelu { alpha })
            }
            "PRelu" => {
                let x = self.node_in(n, 0)?;
                let slope = self.konst(n, 1)?;
                let channels = x.onnx[0];
                let v = slope.per_channel(channels, x.onnx.len()).ok_or_else(|| {
                    OnnxError::Model(format!(
                        "its slope of shape {:?} is not one value or one per channel of a [{}] value",
                        slope.dims,
                        join(&x.onnx)
                    ))
                })?;
                let mut p = BTreeMap::new();
                p.insert(
                    "weight",
                    Const {
                        dims: vec![channels],
                        values: v,
                    },
                );
                self.emit_keep(n, &base, Op::PRelu { channels }, &[&x], p)
            }
            "Tanh" => self.unary(n, &base, Op::Tanh),
            "Erf" => self.unary(n, &base, Op::Erf),
            "Gelu" => match a.string("approximate").as_deref() {
                None | Some("none") => self.unary(n, &base, Op::Gelu),
                Some(other) => err(format!(
                    "Gelu with approximate=\"{other}\"; Slim computes the exact (erf) form"
                )),
            },
            "Neg" => {
                let x = self.node_in(n, 0)?;
                self.affine(n, x, vec![-1.0], vec![0.0])
            }
            "Add" | "Sum" => self.add(n, &base),
            "Sub" => self.sub(n, &base),
            "Mul" => self.mul(n, &base),
            "Div" => self.div(n, &base),
            "Concat" => {
                let xs: Vec<NodeRef> = (0..n.input.len())
                    .map(|i| self.node_in(n, i))
                    .collect::<Result<_>>()?;
                let rank = xs[0].onnx.len() as i64 + 1;
                let axis = a.int("axis").unwrap_or(1);
                let axis = if axis < 0 { axis + rank } else { axis };
                let same = xs.iter().all(|x| self.shape_of(x) == x.onnx);
                if axis != 1 || xs[0].onnx.len() != 3 || !same {
                    let axis = self.sample_axis(axis, rank)?;
                    let names: Vec<String> = xs
                        .iter()
                        .map(|x| self.materialize(x))
                        .collect::<Result<_>>()?;
                    let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
                    let name = self.fresh_name(&base, "concat");
                    let shape = self.push(&name, Op::ConcatAt { axis }, &names, BTreeMap::new())?;
                    return self.bind(n, NodeRef::plain(name, &shape));
                }
                let names: Vec<&str> = xs.iter().map(|x| x.node.as_str()).collect();
                let name = self.fresh_name(&base, "concat");
                let shape = self.push(&name, Op::Concat, &names, BTreeMap::new())?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            "MaxPool" | "AveragePool" => self.pool(n, &a, &base),
            "GlobalAveragePool" => {
                let x = self.node_in(n, 0)?;
                let name = self.fresh_name(&base, "gap");
                let shape = self.push(&name, Op::GlobalAvgPool, &[&x.node], BTreeMap::new())?;
                let mut onnx = shape.clone();
                onnx.extend([1, 1]);
                self.bind(n, NodeRef { node: name, onnx })
            }
            "Flatten" => {
                let x = self.node_in(n, 0)?;
                let rank = x.onnx.len() as i64 + 1;
                let axis = a.int("axis").unwrap_or(1);
                let axis = if axis < 0 { axis + rank } else { axis };
                if axis == 1 {
                    return self.flatten(n, &base, x);
                }
                err(format!(
                    "Flatten from axis {axis} of a rank-{rank} value merges the batch axis into its rows; Slim keeps each sample apart"
                ))
            }
            "Reshape"
                if n.input
                    .first()
                    .is_some_and(|i| self.swapped.contains_key(i)) =>
            {
                let x = self.view_in(n, 0)?;
                let groups = self.swapped[&n.input[0]];
                let target = resolve_reshape(&x.onnx, &self.konst(n, 1)?.ints())?;
                if target != self.shape_of(&x) {
                    return err(format!(
                        "reshape of a swapped channel grid [N, {}] to [N, {}]; a channel shuffle reshapes it back to [N, C, H, W]",
                        join(&x.onnx),
                        join(&target)
                    ));
                }
                let name = self.fresh_name(&base, "shuffle");
                let op = Op::ChannelShuffle { groups };
                let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            "Transpose" => {
                let x = self.view_in(n, 0)?;
                let rank = x.onnx.len() + 1;
                let perm: Vec<i64> = a
                    .ints("perm")
                    .unwrap_or_else(|| (0..rank as i64).rev().collect());
                let identity: Vec<i64> = (0..rank as i64).collect();
                let slim = self.shape_of(&x);
                if perm == identity {
                    return self.bind(n, x);
                }
                let grid = slim.len() == 3
                    && x.onnx.len() == 4
                    && x.onnx[2..] == slim[1..]
                    && !self.swapped.contains_key(&n.input[0]);
                if grid && perm == [0, 2, 1, 3, 4] {
                    let groups = x.onnx[0];
                    let onnx = vec![x.onnx[1], x.onnx[0], x.onnx[2], x.onnx[3]];
                    let out = n.output.first().cloned().unwrap_or_default();
                    self.swapped.insert(out, groups);
                    return self.bind(n, NodeRef { node: x.node, onnx });
                }
                if perm.first() != Some(&0) || self.swapped.contains_key(&n.input[0]) {
                    return err(format!(
                        "Transpose with perm {perm:?} of a [N, {}] value moves the batch axis",
                        join(&x.onnx)
                    ));
                }
                let node = self.materialize(&x)?;
                let perm: Vec<usize> = perm[1..].iter().map(|&p| p as usize - 1).collect();
                let name = self.fresh_name(&base, "transpose");
                let shape = self.push(&name, Op::Transpose { perm }, &[&node], BTreeMap::new())?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            "Reshape" | "Squeeze" | "Unsqueeze" => {
                let x = self.node_in(n, 0)?;
                let total = slim_core::graph::elements(&x.onnx)
                    .ok_or_else(|| OnnxError::Model(format!("a value of shape {:?}", x.onnx)))?;
                let target: Vec<usize> = match n.op_type.as_str() {
                    "Reshape" => {
                        let shape = self.konst(n, 1)?.ints();
                        resolve_reshape(&x.onnx, &shape)?
                    }
                    "Squeeze" => {
                        let axes = self.axes(n, &a)?;
                        let full: Vec<usize> =
                            std::iter::once(1).chain(x.onnx.iter().copied()).collect();
                        squeeze_dims(&full, axes.as_deref())?
                            .into_iter()
                            .skip(1)
                            .collect()
                    }
                    _ => {
                        let axes = self.axes(n, &a)?.unwrap_or_default();
                        let rank = (x.onnx.len() + 1 + axes.len()) as i64;
                        let mut axes: Vec<i64> = axes
                            .iter()
                            .map(|&v| if v < 0 { v + rank } else { v })
                            .collect();
                        axes.sort_unstable();
                        let mut full = vec![1usize];
                        full.extend(&x.onnx);
                        for ax in axes {
                            if ax < 1 || ax as usize > full.len() {
                                return err(format!(
                                    "Unsqueeze at axis {ax}: Slim keeps the batch axis first"
                                ));
                            }
                            full.insert(ax as usize, 1);
                        }
                        full[1..].to_vec()
                    }
                };
                if target.is_empty() {
                    return err(format!(
                        "it makes each sample of [N, {}] a scalar; Slim values keep an axis",
                        join(&x.onnx)
                    ));
                }
                let strip = |v: &[usize]| -> Vec<usize> {
                    let keep = v.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
                    v[..keep].to_vec()
                };
                let slim = self.shape_of(&x);
                let grid = n.op_type == "Reshape"
                    && slim.len() == 3
                    && target.len() == 4
                    && target[2..] == slim[1..]
                    && target[0] * target[1] == slim[0];
                if target == x.onnx {
                    self.bind(n, x)
                } else if target == slim || grid {
                    // Channels viewed as a [g, C/g] grid (a channel shuffle's first step), or
                    // such a view turned back: the same Slim value.
                    self.bind(
                        n,
                        NodeRef {
                            node: x.node,
                            onnx: target,
                        },
                    )
                } else if self.shape_of(&x).len() == 1 && strip(&target) == strip(&x.onnx) {
                    // A vector viewed as [C, 1, 1] (or back): the same Slim value.
                    self.bind(
                        n,
                        NodeRef {
                            node: x.node,
                            onnx: target,
                        },
                    )
                } else if target == [total] {
                    self.flatten(n, &base, x)
                } else {
                    self.reshape(n, &base, &x, target)
                }
            }
            "Gemm" => self.gemm(n, &a),
            "MatMul" => {
                let x = self.node_in(n, 0)?;
                match self.value(n, 1)?.clone() {
                    Value::Const(w) if x.onnx.len() == 1 && w.dims.len() == 2 => {
                        let name = self.layer_name(n, 1);
                        self.linear(n, &name, x, transpose(&w), None)
                    }
                    Value::Const(w) if w.dims.len() == 2 => {
                        // Tokens times a matrix: a dense layer over the last axis.
                        let node = self.materialize(&x)?;
                        let (k, out) = (w.dims[0], w.dims[1]);
                        let spec = LinearSpec {
                            in_features: k,
                            out_features: out,
                            bias: false,
                        };
                        let mut p = BTreeMap::new();
                        p.insert("weight", transpose(&w));
                        let name = self.fresh_name(&self.layer_name(n, 1), "dense");
                        let shape = self.push(&name, Op::Dense(spec), &[&node], p)?;
                        self.bind(n, NodeRef::plain(name, &shape))
                    }
                    Value::Const(w) => err(format!(
                        "MatMul of [N, {}] by a constant of shape {:?}; Slim multiplies by constant matrices",
                        join(&x.onnx),
                        w.dims
                    )),
                    Value::Node(y) => {
                        let (a, b) = (self.materialize(&x)?, self.materialize(&y)?);
                        let name = self.fresh_name(&base, "matmul");
                        let shape = self.push(&name, Op::MatMul, &[&a, &b], BTreeMap::new())?;
                        self.bind(n, NodeRef::plain(name, &shape))
                    }
                }
            }
            "Softmax" => {
                let x = self.node_in(n, 0)?;
                let rank = x.onnx.len() as i64 + 1;
                let default = if self.opset < 13 { 1 } else { -1 };
                let axis = a.int("axis").unwrap_or(default);
                let axis = if axis < 0 { axis + rank } else { axis };
                // Before opset 13 the softmax runs over everything from `axis` on, which is
                // the channels when the spatial axes are ones (a pooled [N, C, 1, 1]).
                let flat_ok = x.onnx.iter().skip(1).all(|&d| d == 1);
                let last = axis == rank - 1;
                if axis == 1 && (self.opset >= 13 || rank <= 2 || flat_ok) {
                    return self.unary(n, &base, Op::Softmax);
                }
                if self.opset < 13 && !last {
                    return err(format!(
                        "Softmax (before opset 13) over the axes from {axis} on of a rank-{rank} value; Slim takes one axis"
                    ));
                }
                let axis = self.sample_axis(axis, rank)?;
                let node = self.materialize(&x)?;
                let name = self.fresh_name(&base, "softmax");
                let shape = self.push(&name, Op::SoftmaxAt { axis }, &[&node], BTreeMap::new())?;
                self.bind(n, NodeRef::plain(name, &shape))
            }
            "LRN" => {
                let x = self.node_in(n, 0)?;
                if x.onnx.len() != 3 {
                    return err(format!(
                        "LRN of a [N, {}] value; Slim normalizes [N, C, H, W] feature maps",
                        join(&x.onnx)
                    ));
                }
                let size = sizes("size", &[a.int("size").unwrap_or(0)], 1)?[0];
                let spec = LrnSpec {
                    size,
                    alpha: a.float("alpha").unwrap_or(1e-4),
                    beta: a.float("beta").unwrap_or(0.75),
                    bias: a.float("bias").unwrap_or(1.0),
                };
                self.unary(n, &base, Op::Lrn(spec))
            }
            "ConstantOfShape" => {
                err("its shape is computed from the data; Slim needs a constant shape")
            }
            "Pad" => self.pad(n, &a, &base),
            "Sqrt" => {
                let x = self.node_in(n, 0)?;
                self.emit_keep(n, &base, Op::Sqrt, &[&x], BTreeMap::new())
            }
            "Reciprocal" => {
                let x = self.node_in(n, 0)?;
                self.emit_keep(n, &base, Op::Reciprocal, &[&x], BTreeMap::new())
            }
            "Pow" => self.pow(n, &base),
            "ReduceMean" | "ReduceMax" | "ReduceSum" => self.reduce(n, &a, &base),
            "LayerNormalization" => self.layer_norm(n, &a, &base),
            "Split" => self.split(n, &a, &base),
            "Slice" => self.slice(n, &a, &base),
            "Resize" | "Upsample" => self.resize(n, &a, &base),
            "ConvTranspose" => self.conv_transpose(n, &a),
            "Gather" => err(format!(
                "{} on data (not constants) is not supported",
                n.op_type
            )),
            other => err(format!("{other} is not supported")),
        }
    }

    fn emit_keep(
        &mut self,
        n: &NodeProto,
        name: &str,
        op: Op,
        x: &[&NodeRef],
        p: BTreeMap<&'static str, Const>,
    ) -> Result<()> {
        let names: Vec<&str> = x.iter().map(|r| r.node.as_str()).collect();
        let name = self.fresh_name(name, &n.op_type.to_lowercase());
        self.push(&name, op, &names, p)?;
        let onnx = x[0].onnx.clone();
        self.bind(n, NodeRef { node: name, onnx })
    }

    fn unary(&mut self, n: &NodeProto, base: &str, op: Op) -> Result<()> {
        let x = self.node_in(n, 0)?;
        self.emit_keep(n, base, op, &[&x], BTreeMap::new())
    }

    fn flatten(&mut self, n: &NodeProto, base: &str, x: NodeRef) -> Result<()> {
        let total = slim_core::graph::elements(&x.onnx)
            .ok_or_else(|| OnnxError::Model(format!("a value of shape {:?}", x.onnx)))?;
        if self.shape_of(&x).len() == 1 {
            return self.bind(
                n,
                NodeRef {
                    node: x.node,
                    onnx: vec![total],
                },
            );
        }
        let name = self.fresh_name(base, "flatten");
        let shape = self.push(&name, Op::Flatten, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    fn axes(&self, n: &NodeProto, a: &Attrs) -> Result<Option<Vec<i64>>> {
        if self.opset >= 13 {
            Ok(self.opt_const(n, 1)?.map(|c| c.ints()))
        } else {
            Ok(a.ints("axes"))
        }
    }

    fn conv(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let mut x = self.node_in(n, 0)?;
        let w = self.konst(n, 1)?;
        let b = self.opt_const(n, 2)?;
        if w.dims.len() != 4 {
            return err(format!(
                "weight of shape {:?}; Slim convolutions are 2-D",
                w.dims
            ));
        }
        let (o, ipg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let groups = sizes("group", &[a.int("group").unwrap_or(1)], 1)?[0];
        let name = self.layer_name(n, 1);
        let strides = sizes("strides", &a.ints("strides").unwrap_or(vec![1, 1]), 1)?;
        let dil = sizes("dilations", &a.ints("dilations").unwrap_or(vec![1, 1]), 1)?;
        if x.onnx.len() == 1
            || x.onnx.len() == 3 && x.onnx[1..] == [1, 1] && self.shape_of(&x).len() == 1
        {
            // A 1x1 convolution on a pooled vector is a linear layer.
            if kh == 1 && kw == 1 && groups == 1 {
                let weight = Const {
                    dims: vec![o, ipg],
                    values: w.values.clone(),
                };
                let name_ok = name.clone();
                let xs = NodeRef {
                    node: x.node.clone(),
                    onnx: vec![x.onnx[0]],
                };
                self.linear(n, &name_ok, xs, weight, b)?;
                if let Some(Value::Node(r)) = self.values.get_mut(&n.output[0]) {
                    r.onnx = vec![o, 1, 1];
                }
                return Ok(());
            }
            return err("a convolution other than 1x1 on a pooled [C, 1, 1] value");
        }
        if x.onnx.len() != 3 {
            return err(format!(
                "input of per-sample shape {:?}; Slim convolutions take [C, H, W]",
                x.onnx
            ));
        }
        let (h, wd) = (x.onnx[1], x.onnx[2]);
        if strides.len() != 2 || strides[0] != strides[1] {
            return err(format!(
                "strides {strides:?}; Slim needs one stride for both axes"
            ));
        }
        if dil.len() != 2 || dil[0] != dil[1] {
            return err(format!(
                "dilations {dil:?}; Slim needs one dilation for both axes"
            ));
        }
        let (s, d) = (strides[0], dil[0]);
        let axes = pads_per_axis(a, [h, wd], [kh, kw], s, d)?;
        let mut sides = [axes[0].0, axes[1].0, axes[0].1, axes[1].1];
        // Zero padding written as a Pad before the convolution (tf2onnx) joins its own.
        if let Some((
            &Op::Pad {
                pads,
                mode: PadMode::Constant(v),
            },
            input,
        )) = self.op_of(&x.node)
        {
            if v == 0.0 {
                let input = input.to_string();
                let shape = self.nodes[self.by_name[&input]].shape.clone();
                for (side, extra) in sides.iter_mut().zip(pads) {
                    *side += extra;
                }
                x = NodeRef::plain(input, &shape);
            }
        }
        // One padding on every side; what one side has beyond it is a Pad node.
        let pads = *sides.iter().min().unwrap_or(&0);
        let extra = sides.map(|p| p - pads);
        if extra != [0; 4] {
            let name = self.fresh_name(&format!("{}.pad", self.layer_name(n, 1)), "pad");
            let op = Op::Pad {
                pads: extra,
                mode: PadMode::Constant(0.0),
            };
            let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
            x = NodeRef::plain(name, &shape);
        }
        let spec = Conv2dSpec {
            in_channels: ipg * groups,
            out_channels: o,
            kernel: [kh, kw],
            stride: s,
            padding: pads,
            dilation: d,
            groups,
            bias: b.is_some(),
        };
        if let Some(b) = &b {
            if b.numel() != o {
                return err(format!(
                    "bias has {} values for {o} output channels",
                    b.numel()
                ));
            }
        }
        let mut p = BTreeMap::new();
        p.insert("weight", w);
        if let Some(b) = b {
            p.insert(
                "bias",
                Const {
                    dims: vec![o],
                    values: b.values,
                },
            );
        }
        self.emit(n, &name, Op::Conv2d(spec), &[&x.node], p)
    }

    /// A Slim node whose shape is the ONNX value's own: the node itself, or a reshape of it
    /// where the importer kept a view (`[C]` seen as `[C, 1, 1]`, a channel grid).
    fn materialize(&mut self, r: &NodeRef) -> Result<String> {
        if self.shape_of(r) == r.onnx {
            return Ok(r.node.clone());
        }
        let name = self.fresh_name(&format!("{}.view", r.node), "view");
        let op = Op::Reshape {
            shape: r.onnx.clone(),
        };
        self.push(&name, op, &[&r.node], BTreeMap::new())?;
        Ok(name)
    }

    /// A per-sample axis from an ONNX axis of a value of `rank` (the batch axis is refused).
    fn sample_axis(&self, axis: i64, rank: i64) -> Result<usize> {
        let a = if axis < 0 { axis + rank } else { axis };
        if a < 1 || a >= rank {
            return err(format!(
                "axis {axis} of a rank-{rank} value: Slim keeps the batch axis (0) apart"
            ));
        }
        Ok(a as usize - 1)
    }

    /// Binds `n`'s output to `x` reshaped to the per-sample `shape`.
    fn reshape(&mut self, n: &NodeProto, base: &str, x: &NodeRef, shape: Vec<usize>) -> Result<()> {
        let name = self.fresh_name(base, "reshape");
        let op = Op::Reshape { shape };
        let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    /// Arithmetic of data and a constant that is no per-channel vector: the constant is kept
    /// as a tensor that broadcasts against the value.
    fn const_binary(
        &mut self,
        n: &NodeProto,
        x: &NodeRef,
        c: &Const,
        kind: BinaryKind,
        reversed: bool,
    ) -> Result<()> {
        // A scale or shift after a layer norm that nothing else reads is its weight and bias.
        let value = n
            .input
            .iter()
            .find(|i| matches!(self.values.get(*i), Some(Value::Node(r)) if r.node == x.node))
            .cloned();
        let foldable = matches!(kind, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul)
            && !reversed
            && self.sole_producer(x, value.as_ref()).is_some_and(|id| {
                matches!(&self.nodes[id].op, Op::LayerNorm { shape, .. }
                    if c.numel() == 1 || (c.dims.iter().skip_while(|&&d| d == 1).copied().collect::<Vec<_>>() == *shape))
            });
        // A bias added to (or a scale of) a dense layer's outputs goes into the layer.
        let dense = matches!(kind, BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul)
            && !reversed
            && self.sole_producer(x, value.as_ref()).is_some_and(|id| {
                matches!(&self.nodes[id].op, Op::Dense(l)
                    if c.numel() == 1 || (c.dims.iter().skip_while(|&&d| d == 1).copied().collect::<Vec<_>>() == [l.out_features]))
            });
        if dense {
            let id = self.by_name[&x.node];
            if let Some(v) = &value {
                self.values.remove(v);
            }
            let node = &mut self.nodes[id];
            let Op::Dense(l) = &mut node.op else {
                return err("a dense layer changed under the importer");
            };
            l.bias = true;
            let (out, inp) = (l.out_features, l.in_features);
            let at = |i: usize| {
                if c.numel() == 1 {
                    c.values[0]
                } else {
                    c.values[i]
                }
            };
            let bias = node.params.entry("bias").or_insert_with(|| Const {
                dims: vec![out],
                values: vec![0.0; out],
            });
            for (o, b) in bias.values.iter_mut().enumerate() {
                *b = match kind {
                    BinaryKind::Mul => *b * at(o),
                    BinaryKind::Add => *b + at(o),
                    _ => *b - at(o),
                };
            }
            if kind == BinaryKind::Mul {
                if let Some(w) = node.params.get_mut("weight") {
                    for (i, v) in w.values.iter_mut().enumerate() {
                        *v *= at(i / inp);
                    }
                }
            }
            return self.bind(n, x.clone());
        }
        if foldable {
            let id = self.by_name[&x.node];
            if let Some(v) = &value {
                self.values.remove(v);
            }
            let node = &mut self.nodes[id];
            let numel = node.params["weight"].numel();
            let at = |i: usize| {
                if c.numel() == 1 {
                    c.values[0]
                } else {
                    c.values[i]
                }
            };
            for i in 0..numel {
                let (w, b) = (
                    node.params["weight"].values[i],
                    node.params["bias"].values[i],
                );
                let (w, b) = match kind {
                    BinaryKind::Mul => (w * at(i), b * at(i)),
                    BinaryKind::Add => (w, b + at(i)),
                    _ => (w, b - at(i)),
                };
                if let Some(p) = node.params.get_mut("weight") {
                    p.values[i] = w;
                }
                if let Some(p) = node.params.get_mut("bias") {
                    p.values[i] = b;
                }
            }
            return self.bind(n, x.clone());
        }
        let mut dims = c.dims.clone();
        // A constant of the value's full rank carries a batch axis of one.
        if dims.len() == x.onnx.len() + 1 {
            if dims[0] != 1 {
                return err(format!(
                    "a constant of shape {:?} spans the batch axis",
                    c.dims
                ));
            }
            dims.remove(0);
        }
        if dims.is_empty() {
            dims.push(1);
        }
        let node = self.materialize(x)?;
        let name = self.fresh_name(&sanitize(&display_name(n)), "arith");
        let mut p = BTreeMap::new();
        p.insert(
            "value",
            Const {
                dims: dims.clone(),
                values: c.values.clone(),
            },
        );
        let op = Op::ConstBinary {
            kind,
            shape: dims,
            reversed,
        };
        let shape = self.push(&name, op, &[&node], p)?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    /// `(input, from, shape, eps)` when `d / s` is a layer norm written out (PyTorch's export):
    /// `d = x - mean(x)`, `s = sqrt(mean(d²) + eps)`, both means over the trailing axes.
    fn layer_norm_parts(&self, d: &str, s: &str) -> Option<(String, usize, Vec<usize>, f64)> {
        let node = |name: &str| self.by_name.get(name).map(|&i| &self.nodes[i]);
        let (dn, sn) = (node(d)?, node(s)?);
        let (Op::Binary(BinaryKind::Sub), Op::Sqrt) = (&dn.op, &sn.op) else {
            return None;
        };
        let (x, mean) = (&dn.inputs[0], &dn.inputs[1]);
        let trailing = |n: &Pending| -> Option<usize> {
            match &n.op {
                Op::Reduce {
                    kind: ReduceKind::Mean,
                    axes,
                    keep: true,
                } => {
                    let rank = n.shape.len();
                    let from = axes[0];
                    (*axes == (from..rank).collect::<Vec<_>>()).then_some(from)
                }
                _ => None,
            }
        };
        let mn = node(mean)?;
        let from = trailing(mn)?;
        if mn.inputs[0] != *x {
            return None;
        }
        let (one, eps, var) = self.scalar_affine(&sn.inputs[0])?;
        let vn = node(&var)?;
        if one != 1.0 || trailing(vn)? != from {
            return None;
        }
        let sq = node(&vn.inputs[0])?;
        let squares = matches!(
            &sq.op,
            Op::ConstBinary {
                kind: BinaryKind::Pow,
                reversed: false,
                ..
            }
        ) && sq.params.get("value").is_some_and(|c| c.values == [2.0])
            && sq.inputs[0] == d;
        let shape = node(x)?.shape[from..].to_vec();
        (squares && eps >= 0.0).then(|| (x.clone(), from, shape, eps))
    }

    /// Arithmetic of two data values whose shapes broadcast.
    fn data_binary(
        &mut self,
        n: &NodeProto,
        base: &str,
        x: &NodeRef,
        y: &NodeRef,
        kind: BinaryKind,
    ) -> Result<()> {
        if kind == BinaryKind::Div {
            if let Some((input, from, shape, eps)) = self.layer_norm_parts(&x.node, &y.node) {
                let name = self.fresh_name(base, "layernorm");
                let numel: usize = shape.iter().product();
                let p = BTreeMap::from([
                    (
                        "weight",
                        Const {
                            dims: shape.clone(),
                            values: vec![1.0; numel],
                        },
                    ),
                    (
                        "bias",
                        Const {
                            dims: shape.clone(),
                            values: vec![0.0; numel],
                        },
                    ),
                ]);
                let op = Op::LayerNorm { from, shape, eps };
                let out = self.push(&name, op, &[&input], p)?;
                return self.bind(n, NodeRef::plain(name, &out));
            }
        }
        let (a, b) = (self.materialize(x)?, self.materialize(y)?);
        let name = self.fresh_name(base, kind.onnx());
        let shape = self.push(&name, Op::Binary(kind), &[&a, &b], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    fn pow(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        match (self.value(n, 0)?.clone(), self.value(n, 1)?.clone()) {
            (Value::Node(x), Value::Const(c)) if c.numel() == 1 && c.values[0] == 1.0 => {
                self.bind(n, x)
            }
            (Value::Node(x), Value::Const(c)) => {
                self.const_binary(n, &x, &c, BinaryKind::Pow, false)
            }
            (Value::Const(c), Value::Node(x)) => {
                self.const_binary(n, &x, &c, BinaryKind::Pow, true)
            }
            (Value::Node(x), Value::Node(y)) => self.data_binary(n, base, &x, &y, BinaryKind::Pow),
            _ => err("a Pow of two constants"),
        }
    }

    fn reduce(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        // The axes are an input from opset 18 (ReduceSum: 13), an attribute before.
        let as_input = self.opset >= 18 || (n.op_type == "ReduceSum" && self.opset >= 13);
        let axes = if as_input {
            self.opt_const(n, 1)?.map(|c| c.ints())
        } else {
            a.ints("axes")
        };
        let keep = a.int("keepdims").unwrap_or(1) != 0;
        let axes: Vec<i64> = match axes {
            Some(v) if !v.is_empty() => v,
            _ if a.int("noop_with_empty_axes").unwrap_or(0) != 0 => return self.bind(n, x),
            _ => {
                return err(format!(
                    "{} without axes reduces the batch axis too; Slim keeps each sample apart",
                    n.op_type
                ))
            }
        };
        let mut axes = axes
            .iter()
            .map(|&v| self.sample_axis(v, rank))
            .collect::<Result<Vec<usize>>>()?;
        axes.sort_unstable();
        axes.dedup();
        // A mean over the plane of a feature map is global average pooling (SE blocks).
        let plane = x.onnx.len() == 3 && axes == [1, 2] && self.shape_of(&x).len() == 3;
        if n.op_type == "ReduceMean" && plane {
            let name = self.fresh_name(base, "gap");
            let shape = self.push(&name, Op::GlobalAvgPool, &[&x.node], BTreeMap::new())?;
            let mut onnx = shape.clone();
            if keep {
                onnx.extend([1, 1]);
            }
            return self.bind(n, NodeRef { node: name, onnx });
        }
        let kind = match n.op_type.as_str() {
            "ReduceMean" => ReduceKind::Mean,
            "ReduceMax" => ReduceKind::Max,
            _ => ReduceKind::Sum,
        };
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "reduce");
        let op = Op::Reduce { kind, axes, keep };
        let shape = self.push(&name, op, &[&node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    fn layer_norm(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        if n.output.len() > 1
            && n.output[1..]
                .iter()
                .any(|o| self.uses.get(o).copied().unwrap_or(0) > 0)
        {
            return err(
                "its mean or inverse deviation output is used, which Slim does not compute",
            );
        }
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let from = self.sample_axis(a.int("axis").unwrap_or(-1), rank)?;
        let shape = x.onnx[from..].to_vec();
        let numel: usize = shape.iter().product();
        let full = |c: Option<Const>, fill: f64, what: &str| -> Result<Const> {
            match c {
                None => Ok(Const {
                    dims: shape.clone(),
                    values: vec![fill; numel],
                }),
                Some(c) if c.numel() == numel => Ok(Const {
                    dims: shape.clone(),
                    values: c.values,
                }),
                Some(c) if c.numel() == 1 => Ok(Const {
                    dims: shape.clone(),
                    values: vec![c.values[0]; numel],
                }),
                Some(c) => err(format!(
                    "its {what} of shape {:?} for normalized axes {shape:?}",
                    c.dims
                )),
            }
        };
        let weight = full(self.opt_const(n, 1)?, 1.0, "scale")?;
        let bias = full(self.opt_const(n, 2)?, 0.0, "bias")?;
        let eps = decimal(a.float("epsilon").unwrap_or(1e-5));
        let node = self.materialize(&x)?;
        let name = self.fresh_name(base, "layernorm");
        let p = BTreeMap::from([("weight", weight), ("bias", bias)]);
        let op = Op::LayerNorm {
            from,
            shape: shape.clone(),
            eps,
        };
        let out = self.push(&name, op, &[&node], p)?;
        self.bind(n, NodeRef::plain(name, &out))
    }

    /// Binds ONNX output `k` of `n` to a slice of `x` along a per-sample axis.
    fn bind_slice(
        &mut self,
        n: &NodeProto,
        k: usize,
        x: &str,
        axis: usize,
        range: (usize, usize, usize),
    ) -> Result<()> {
        let (start, end, step) = range;
        let base = sanitize(n.output.get(k).map(|s| s.as_str()).unwrap_or(""));
        let name = self.fresh_name(&base, "slice");
        let op = Op::Slice {
            axis,
            start,
            end,
            step,
        };
        let shape = self.push(&name, op, &[x], BTreeMap::new())?;
        let out = n.output[k].clone();
        self.values
            .insert(out, Value::Node(NodeRef::plain(name, &shape)));
        Ok(())
    }

    fn split(&mut self, n: &NodeProto, a: &Attrs, _base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let axis = self.sample_axis(a.int("axis").unwrap_or(0), rank)?;
        let len = x.onnx[axis];
        let parts = n.output.len();
        let given = if self.opset >= 13 {
            self.opt_const(n, 1)?.map(|c| c.ints())
        } else {
            a.ints("split")
        };
        let sizes: Vec<usize> = match given {
            Some(v) => sizes("split", &v, 0)?,
            None if parts > 0 => {
                // Equal parts, the last one smaller when the length does not divide.
                let each = len.div_ceil(parts);
                (0..parts)
                    .map(|i| each.min(len.saturating_sub(i * each)))
                    .collect()
            }
            None => return err("a Split without outputs"),
        };
        if sizes.len() != parts || sizes.iter().sum::<usize>() != len || sizes.contains(&0) {
            return err(format!(
                "split sizes {sizes:?} of {len} values into {parts} outputs"
            ));
        }
        let node = self.materialize(&x)?;
        let mut start = 0;
        for (k, size) in sizes.into_iter().enumerate() {
            self.bind_slice(n, k, &node, axis, (start, start + size, 1))?;
            start += size;
        }
        Ok(())
    }

    fn slice(&mut self, n: &NodeProto, a: &Attrs, _base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let rank = x.onnx.len() as i64 + 1;
        let (starts, ends, axes, steps) = if self.opset < 10 {
            (
                a.ints("starts").unwrap_or_default(),
                a.ints("ends").unwrap_or_default(),
                a.ints("axes"),
                None,
            )
        } else {
            (
                self.konst(n, 1)?.ints(),
                self.konst(n, 2)?.ints(),
                self.opt_const(n, 3)?.map(|c| c.ints()),
                self.opt_const(n, 4)?.map(|c| c.ints()),
            )
        };
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return err("Slice with starts, ends, axes and steps of different lengths");
        }
        let mut cur = self.materialize(&x)?;
        let mut shape = x.onnx.clone();
        for i in 0..starts.len() {
            let axis = self.sample_axis(axes[i], rank)?;
            let len = shape[axis] as i64;
            let step = steps[i];
            if step < 1 {
                return err(format!("Slice with step {step}; Slim slices forwards"));
            }
            let clamp = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
            let (s, e) = (clamp(starts[i]), clamp(ends[i]));
            if s >= e {
                return err(format!(
                    "Slice {}..{} of axis {} leaves nothing",
                    starts[i], ends[i], axes[i]
                ));
            }
            if (s, e, step) == (0, len, 1) {
                continue;
            }
            let name = self.fresh_name(&sanitize(&display_name(n)), "slice");
            let op = Op::Slice {
                axis,
                start: s as usize,
                end: e as usize,
                step: step as usize,
            };
            shape = self.push(&name, op, &[&cur], BTreeMap::new())?;
            cur = name;
        }
        let r = NodeRef::plain(cur, &shape);
        self.bind(n, r)
    }

    fn pad(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if x.onnx.len() != 3 || self.shape_of(&x).len() != 3 {
            return err(format!(
                "Pad of a [N, {}] value; Slim pads [N, C, H, W] feature maps",
                join(&x.onnx)
            ));
        }
        let (pads, value) = if self.opset < 11 {
            (
                a.ints("pads").unwrap_or_default(),
                a.float("value").unwrap_or(0.0),
            )
        } else {
            let value = match self.opt_const(n, 2)? {
                Some(c) if c.numel() == 1 => c.values[0] as f32,
                Some(c) => return err(format!("its constant_value holds {} values", c.numel())),
                None => 0.0,
            };
            (self.konst(n, 1)?.ints(), value)
        };
        // [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over the axes given (all by default).
        let axes: Vec<i64> = match self.opt_const(n, 3)? {
            Some(c) => c
                .ints()
                .iter()
                .map(|&v| if v < 0 { v + 4 } else { v })
                .collect(),
            None => (0..4).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return err(format!("pads {pads:?} for axes {axes:?}"));
        }
        let mut full = [0i64; 8];
        for (i, &ax) in axes.iter().enumerate() {
            if !(0..4).contains(&ax) {
                return err(format!("axis {ax} of a rank-4 value"));
            }
            full[ax as usize] = pads[i];
            full[ax as usize + 4] = pads[i + axes.len()];
        }
        if full[0] != 0 || full[1] != 0 || full[4] != 0 || full[5] != 0 {
            return err(format!(
                "pads {pads:?} pad the batch or channel axis; Slim pads height and width"
            ));
        }
        let spatial = [full[2], full[3], full[6], full[7]];
        if spatial.iter().any(|&p| !(0..=LIMIT).contains(&p)) {
            return err(format!(
                "pads {pads:?}: negative (cropping) or beyond {LIMIT}"
            ));
        }
        let mode = match a.string("mode").as_deref().unwrap_or("constant") {
            "constant" => PadMode::Constant(value),
            "edge" => PadMode::Edge,
            "reflect" => PadMode::Reflect,
            other => {
                return err(format!(
                    "mode \"{other}\"; Slim pads constant, edge and reflect"
                ))
            }
        };
        let pads = spatial.map(|p| p as usize);
        if pads == [0; 4] {
            return self.bind(n, x);
        }
        let name = self.fresh_name(base, "pad");
        let shape = self.push(&name, Op::Pad { pads, mode }, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    fn resize(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if x.onnx.len() != 3 || self.shape_of(&x).len() != 3 {
            return err(format!(
                "{} of a [N, {}] value; Slim resizes [N, C, H, W] feature maps",
                n.op_type,
                join(&x.onnx)
            ));
        }
        let (h, w) = (x.onnx[1], x.onnx[2]);
        let upsample = n.op_type == "Upsample";
        // Upsample (and Resize before opset 11) take the scales second and map coordinates
        // as `asymmetric`; later Resize takes roi, scales, sizes.
        let legacy = upsample || self.opset < 11;
        let scales = if upsample && self.opset < 9 {
            a.get("scales").map(|s| Const {
                dims: vec![s.floats.len()],
                values: s.floats.iter().map(|&v| f64::from(v)).collect(),
            })
        } else if legacy {
            Some(self.konst(n, 1)?)
        } else {
            self.opt_const(n, 2)?.filter(|c| c.numel() > 0)
        };
        let given_sizes = if legacy {
            None
        } else {
            self.opt_const(n, 3)?.filter(|c| c.numel() > 0)
        };
        // Opset 18 may name the axes the scales or sizes are for.
        let axes = a.ints("axes").map(|v| {
            v.iter()
                .map(|&x| if x < 0 { x + 4 } else { x })
                .collect::<Vec<i64>>()
        });
        let full = |c: Const, fill: f64| -> Result<Const> {
            let Some(axes) = &axes else { return Ok(c) };
            if axes.len() != c.numel() || axes.iter().any(|&x| !(0..4).contains(&x)) {
                return err(format!("axes {axes:?} for {} values", c.numel()));
            }
            let mut values = vec![fill; 4];
            for (&ax, &v) in axes.iter().zip(&c.values) {
                values[ax as usize] = v;
            }
            Ok(Const {
                dims: vec![4],
                values,
            })
        };
        let scales = scales.map(|c| full(c, 1.0)).transpose()?;
        let mut given_sizes = given_sizes.map(|c| full(c, 0.0)).transpose()?;
        if let Some(sz) = given_sizes.as_mut().filter(|_| axes.is_some()) {
            // Axes not named keep their size.
            sz.values[0] = 1.0;
            sz.values[1] = x.onnx[0] as f64;
            for i in 2..4 {
                if sz.values[i] == 0.0 {
                    sz.values[i] = x.onnx[i - 1] as f64;
                }
            }
        }
        let (out, scale) = match (scales, given_sizes) {
            (Some(sc), None) => {
                let v = &sc.values;
                if v.len() != 4 || v[0] != 1.0 || v[1] != 1.0 {
                    return err(format!("scales {v:?}; Slim resizes height and width only"));
                }
                let scale = [v[2] as f32, v[3] as f32];
                if scale
                    .iter()
                    .any(|s| !(s.is_finite() && *s > 0.0 && *s <= 4096.0))
                {
                    return err(format!("scales {v:?} out of range"));
                }
                let out = [
                    (h as f64 * f64::from(scale[0])).floor() as usize,
                    (w as f64 * f64::from(scale[1])).floor() as usize,
                ];
                (out, scale)
            }
            (None, Some(sz)) => {
                let v = sz.ints();
                let plane: Vec<i64> = match v.len() {
                    4 if v[0] >= 1 && v[1] == x.onnx[0] as i64 => v[2..].to_vec(),
                    2 => v.clone(),
                    _ => return err(format!("sizes {v:?}; Slim resizes height and width only")),
                };
                let out = sizes("sizes", &plane, 1)?;
                let out = [out[0], out[1]];
                (out, [out[0] as f32 / h as f32, out[1] as f32 / w as f32])
            }
            _ => return err("it needs exactly one of scales and sizes"),
        };
        let coord = if legacy {
            CoordMode::Asymmetric
        } else {
            match a
                .string("coordinate_transformation_mode")
                .as_deref()
                .unwrap_or("half_pixel")
            {
                "half_pixel" => CoordMode::HalfPixel,
                "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
                "align_corners" => CoordMode::AlignCorners,
                "asymmetric" => CoordMode::Asymmetric,
                other => {
                    return err(format!(
                        "coordinate_transformation_mode \"{other}\" is not supported"
                    ))
                }
            }
        };
        if a.int("exclude_outside").unwrap_or(0) != 0 || a.int("antialias").unwrap_or(0) != 0 {
            return err("exclude_outside and antialias are not supported");
        }
        if a.string("keep_aspect_ratio_policy")
            .is_some_and(|p| p != "stretch")
        {
            return err("keep_aspect_ratio_policy other than stretch is not supported");
        }
        let mode = match a.string("mode").as_deref().unwrap_or("nearest") {
            "nearest" => {
                let rounding = if legacy {
                    NearestRounding::Floor
                } else {
                    match a
                        .string("nearest_mode")
                        .as_deref()
                        .unwrap_or("round_prefer_floor")
                    {
                        "round_prefer_floor" => NearestRounding::RoundPreferFloor,
                        "round_prefer_ceil" => NearestRounding::RoundPreferCeil,
                        "floor" => NearestRounding::Floor,
                        "ceil" => NearestRounding::Ceil,
                        other => return err(format!("nearest_mode \"{other}\" is not supported")),
                    }
                };
                ResizeMode::Nearest(rounding)
            }
            "linear" | "bilinear" => ResizeMode::Linear,
            other => return err(format!("mode \"{other}\"; Slim resizes nearest and linear")),
        };
        let op = Op::Resize(ResizeSpec {
            out,
            scale,
            mode,
            coord,
        });
        let name = self.fresh_name(base, "resize");
        let shape = self.push(&name, op, &[&x.node], BTreeMap::new())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    fn conv_transpose(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let w = self.konst(n, 1)?;
        let b = self.opt_const(n, 2)?;
        if x.onnx.len() != 3 || w.dims.len() != 4 {
            return err(format!(
                "input [N, {}] and weight {:?}; Slim's transposed convolutions are 2-D",
                join(&x.onnx),
                w.dims
            ));
        }
        let (ci, opg, kh, kw) = (w.dims[0], w.dims[1], w.dims[2], w.dims[3]);
        let groups = sizes("group", &[a.int("group").unwrap_or(1)], 1)?[0];
        let one = |what: &str, v: Vec<i64>, min: i64| -> Result<usize> {
            let v = sizes(what, &v, min)?;
            match v[..] {
                [p, q] if p == q => Ok(p),
                _ => err(format!("{what} {v:?}; Slim needs one value for both axes")),
            }
        };
        let s = one("strides", a.ints("strides").unwrap_or(vec![1, 1]), 1)?;
        let d = one("dilations", a.ints("dilations").unwrap_or(vec![1, 1]), 1)?;
        let op = one(
            "output_padding",
            a.ints("output_padding").unwrap_or(vec![0, 0]),
            0,
        )?;
        if a.string("auto_pad")
            .is_some_and(|p| p != "NOTSET" && p != "VALID")
        {
            return err(
                "auto_pad SAME_UPPER/SAME_LOWER on a transposed convolution is not supported; give pads",
            );
        }
        let padding = match a.ints("output_shape") {
            Some(shape) => {
                // The total padding the requested size implies, split evenly.
                let target = &shape[shape.len().saturating_sub(2)..];
                let mut each = Vec::new();
                for (i, (&len, k)) in x.onnx[1..].iter().zip([kh, kw]).enumerate() {
                    let full = (len - 1) * s + op + (k - 1) * d + 1;
                    let total = full as i64 - target.get(i).copied().unwrap_or(0);
                    if total < 0 || total % 2 != 0 {
                        return err(format!("output_shape {shape:?} needs uneven padding"));
                    }
                    each.push(total / 2);
                }
                one("padding", each, 0)?
            }
            None => {
                let p = a.ints("pads").unwrap_or(vec![0, 0, 0, 0]);
                match sizes("pads", &p, 0)?[..] {
                    [t, l, b2, r] if t == l && l == b2 && b2 == r => t,
                    _ => {
                        return err(format!(
                            "pads {p:?}; Slim pads a transposed convolution equally on every side"
                        ))
                    }
                }
            }
        };
        let spec = ConvTransposeSpec {
            in_channels: ci,
            out_channels: opg * groups,
            kernel: [kh, kw],
            stride: s,
            padding,
            output_padding: op,
            dilation: d,
            groups,
            bias: b.is_some(),
        };
        let mut p = BTreeMap::new();
        p.insert("weight", w);
        if let Some(b) = b {
            if b.numel() != opg * groups {
                return err(format!(
                    "bias has {} values for {} outputs",
                    b.numel(),
                    opg * groups
                ));
            }
            p.insert(
                "bias",
                Const {
                    dims: vec![opg * groups],
                    values: b.values,
                },
            );
        }
        let name = self.layer_name(n, 1);
        self.emit(n, &name, Op::ConvTranspose2d(spec), &[&x.node], p)
    }

    fn linear(
        &mut self,
        n: &NodeProto,
        name: &str,
        x: NodeRef,
        weight: Const,
        bias: Option<Const>,
    ) -> Result<()> {
        let (out, inp) = (weight.dims[0], weight.dims[1]);
        if x.onnx != [inp] {
            return err(format!(
                "a [{out}, {inp}] weight on an input of per-sample shape {:?}",
                x.onnx
            ));
        }
        let mut p = BTreeMap::new();
        p.insert("weight", weight);
        let has_bias = bias.is_some();
        if let Some(b) = bias {
            let v = b.per_channel(out, 1).ok_or_else(|| {
                OnnxError::Model(format!("bias of shape {:?} for {out} outputs", b.dims))
            })?;
            p.insert(
                "bias",
                Const {
                    dims: vec![out],
                    values: v,
                },
            );
        }
        let spec = LinearSpec {
            in_features: inp,
            out_features: out,
            bias: has_bias,
        };
        self.emit(n, name, Op::Linear(spec), &[&x.node], p)
    }

    fn gemm(&mut self, n: &NodeProto, a: &Attrs) -> Result<()> {
        let x = self.node_in(n, 0)?;
        let b = self.konst(n, 1)?;
        let c = self.opt_const(n, 2)?;
        if a.int("transA").unwrap_or(0) != 0 {
            return err("transA=1 is not supported");
        }
        if b.dims.len() != 2 {
            return err(format!("B of shape {:?} is not a matrix", b.dims));
        }
        let alpha = f64::from(a.float("alpha").unwrap_or(1.0));
        let beta = f64::from(a.float("beta").unwrap_or(1.0));
        let mut w = if a.int("transB").unwrap_or(0) != 0 {
            b
        } else {
            transpose(&b)
        };
        w.values.iter_mut().for_each(|v| *v *= alpha);
        let c = c.map(|mut c| {
            c.values.iter_mut().for_each(|v| *v *= beta);
            c
        });
        let name = self.layer_name(n, 1);
        self.linear(n, &name, x, w, c)
    }

    fn pool(&mut self, n: &NodeProto, a: &Attrs, base: &str) -> Result<()> {
        let x = self.node_in(n, 0)?;
        if n.output.len() > 1 && self.uses.get(&n.output[1]).copied().unwrap_or(0) > 0 {
            return err("the indices output of MaxPool is used, which Slim does not compute");
        }
        if x.onnx.len() != 3 || self.shape_of(&x).len() != 3 {
            return err(format!(
                "input of per-sample shape {:?}; pooling takes [C, H, W]",
                x.onnx
            ));
        }
        let k = sizes("kernel", &a.ints("kernel_shape").unwrap_or_default(), 1)?;
        if k.len() != 2 || k[0] != k[1] {
            return err(format!("kernel {k:?}; Slim pools with square windows"));
        }
        let strides = sizes("strides", &a.ints("strides").unwrap_or(vec![1, 1]), 1)?;
        if strides.len() != 2 || strides[0] != strides[1] {
            return err(format!(
                "strides {strides:?}; Slim needs one stride for both axes"
            ));
        }
        if a.ints("dilations")
            .is_some_and(|d| d.iter().any(|&v| v != 1))
        {
            return err("dilated pooling is not supported");
        }
        let (k, s) = (k[0], strides[0]);
        let (h, w) = (x.onnx[1], x.onnx[2]);
        let axes = pads_per_axis(a, [h, w], [k, k], s, 1)?;
        let p = axes[0].0;
        if axes[1].0 != p || axes.iter().any(|&(b, e)| e < b) {
            return err(format!(
                "padding (top, bottom) {:?} and (left, right) {:?}: Slim pools with one padding before both axes and at least as much after",
                axes[0], axes[1]
            ));
        }
        let mut end = [axes[0].1 - p, axes[1].1 - p];
        let average = n.op_type == "AveragePool";
        let include_pad = a.int("count_include_pad").unwrap_or(0) != 0;
        if a.int("ceil_mode").unwrap_or(0) != 0 {
            // Ceil mode adds a last window where the floor leaves values uncovered, as long as
            // it starts inside the input or its leading padding; the values it reaches past
            // the padded input are extra padding at the end.
            for (axis, len) in [h, w].into_iter().enumerate() {
                let padded = len + p + axes[axis].1;
                let Some(span) = padded.checked_sub(k) else {
                    return err(format!("its {k}x{k} window does not fit the {h}x{w} input"));
                };
                let mut out = span.div_ceil(s) + 1;
                if (out - 1) * s >= len + p {
                    out -= 1;
                }
                let reach = (out - 1) * s + k;
                if reach > padded {
                    if average && include_pad {
                        return err("ceil_mode=1 with count_include_pad=1 and a partial last window is not supported");
                    }
                    end[axis] += reach - padded;
                }
            }
        }
        let spec = PoolSpec {
            kernel: k,
            stride: s,
            padding: p,
            pad_end: end,
            exclude_pad: average && !include_pad && (p > 0 || end != [0, 0]),
        };
        let op = if average {
            Op::AvgPool2d(spec)
        } else {
            Op::MaxPool2d(spec)
        };
        self.emit(n, base, op, &[&x.node], BTreeMap::new())
    }

    fn add(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let vals: Vec<Value> = (0..n.input.len())
            .map(|i| self.value(n, i).cloned())
            .collect::<Result<_>>()?;
        let nodes: Vec<NodeRef> = vals
            .iter()
            .filter_map(|v| match v {
                Value::Node(r) => Some(r.clone()),
                Value::Const(_) => None,
            })
            .collect();
        let consts: Vec<Const> = vals
            .iter()
            .filter_map(|v| match v {
                Value::Const(c) => Some(c.clone()),
                Value::Node(_) => None,
            })
            .collect();
        if consts.is_empty() {
            return self.sum(n, base, &nodes);
        }
        if nodes.len() != 1 || consts.len() != 1 {
            return err("an Add of several constants and data");
        }
        let (x, c) = (nodes[0].clone(), &consts[0]);
        match self.per_channel_of(&x, c, "adds") {
            Ok(shift) => self.affine(n, x, vec![1.0], shift),
            Err(_) => self.const_binary(n, &x, c, BinaryKind::Add, false),
        }
    }

    /// The element-wise sum of data values of one shape.
    fn sum(&mut self, n: &NodeProto, base: &str, nodes: &[NodeRef]) -> Result<()> {
        if let [x, y] = nodes {
            if x.onnx != y.onnx {
                return self.data_binary(n, base, x, y, BinaryKind::Add);
            }
        }
        if nodes.iter().any(|r| r.onnx != nodes[0].onnx) {
            return err("an Add of different shapes (broadcasting between data is not supported)");
        }
        let names: Vec<&str> = nodes.iter().map(|r| r.node.as_str()).collect();
        let name = self.fresh_name(base, "add");
        self.push(&name, Op::Add, &names, BTreeMap::new())?;
        let onnx = nodes[0].onnx.clone();
        self.bind(n, NodeRef { node: name, onnx })
    }

    fn sub(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        match (self.value(n, 0)?.clone(), self.value(n, 1)?.clone()) {
            (Value::Node(x), Value::Const(c)) => match self.per_channel_of(&x, &c, "subtracts") {
                Ok(shift) => self.affine(n, x, vec![1.0], shift.iter().map(|v| -v).collect()),
                Err(_) => self.const_binary(n, &x, &c, BinaryKind::Sub, false),
            },
            (Value::Const(c), Value::Node(x)) => {
                match self.per_channel_of(&x, &c, "subtracts from") {
                    Ok(shift) => self.affine(n, x, vec![-1.0], shift),
                    Err(_) => self.const_binary(n, &x, &c, BinaryKind::Sub, true),
                }
            }
            (Value::Node(x), Value::Node(y)) if x.onnx != y.onnx || self.shape_of(&y) != y.onnx => {
                self.data_binary(n, base, &x, &y, BinaryKind::Sub)
            }
            (Value::Node(x), Value::Node(y)) => {
                // x - y as x + (-1 · y).
                let neg = self.fresh_name(&format!("{base}.neg"), "neg");
                let channels = y.onnx[0];
                let params = affine_params(channels, &[-1.0], &[0.0]);
                let shape = self.push(&neg, Op::ChannelAffine { channels }, &[&y.node], params)?;
                let _ = shape;
                let y = NodeRef {
                    node: neg,
                    onnx: y.onnx,
                };
                self.sum(n, base, &[x, y])
            }
            _ => err("a Sub of two constants"),
        }
    }

    fn div(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        match (self.value(n, 0)?.clone(), self.value(n, 1)?.clone()) {
            (Value::Node(x), Value::Const(c)) => match self.per_channel_of(&x, &c, "divides by") {
                Ok(d) => {
                    if d.iter().any(|&v| v == 0.0 || !v.is_finite()) {
                        return err("it divides by zero or by a value that is not finite");
                    }
                    self.affine(n, x, d.iter().map(|v| 1.0 / v).collect(), vec![0.0])
                }
                Err(_) => self.const_binary(n, &x, &c, BinaryKind::Div, false),
            },
            (Value::Const(c), Value::Node(x)) => {
                self.const_binary(n, &x, &c, BinaryKind::Div, true)
            }
            (Value::Node(x), Value::Node(y)) => self.data_binary(n, base, &x, &y, BinaryKind::Div),
            _ => err("a Div of two constants"),
        }
    }

    fn mul(&mut self, n: &NodeProto, base: &str) -> Result<()> {
        let (a, b) = (self.value(n, 0)?.clone(), self.value(n, 1)?.clone());
        match (a, b) {
            (Value::Node(x), Value::Node(y)) => {
                if let Some(done) = self.recognize_product(n, base, &x, &y)? {
                    return Ok(done);
                }
                // The gate (the per-channel vector) goes second.
                let (x, y) = if x.onnx.len() == 3
                    && y.onnx.len() == 3
                    && x.onnx[1..] == [1, 1]
                    && y.onnx[1..] != [1, 1]
                {
                    (y, x)
                } else {
                    (x, y)
                };
                let (sa, sb) = (self.shape_of(&x), self.shape_of(&y));
                let gate = sa.len() == 3 && (sb == [sa[0]] || sb == [sa[0], 1, 1]);
                if !((sa == sb && x.onnx == y.onnx) || gate) {
                    return self.data_binary(n, base, &x, &y, BinaryKind::Mul);
                }
                let name = self.fresh_name(base, "mul");
                self.push(&name, Op::Mul, &[&x.node, &y.node], BTreeMap::new())?;
                let onnx = x.onnx.clone();
                self.bind(n, NodeRef { node: name, onnx })
            }
            (Value::Node(x), Value::Const(c)) | (Value::Const(c), Value::Node(x)) => {
                match self.per_channel_of(&x, &c, "multiplies") {
                    Ok(scale) => self.affine(n, x, scale, vec![0.0]),
                    Err(_) => self.const_binary(n, &x, &c, BinaryKind::Mul, false),
                }
            }
            _ => err("a Mul of two constants"),
        }
    }

    /// A constant as one value per channel of `x` (a scalar stays one value).
    fn per_channel_of(&self, x: &NodeRef, c: &Const, what: &str) -> Result<Vec<f64>> {
        if c.numel() == 1 {
            return Ok(vec![c.values[0]]);
        }
        let Some(&channels) = x.onnx.first() else {
            return err(format!(
                "it {what} a constant, and its input has no channel axis"
            ));
        };
        c.per_channel(channels, x.onnx.len()).ok_or_else(|| {
            OnnxError::Model(format!(
                "it {what} a constant of shape {:?} that is not one value or one per channel of a [{}] value",
                c.dims,
                join(&x.onnx)
            ))
        })
    }

    /// The pending node that computes `r`, when nothing but the ONNX value `value` reads it.
    fn sole_producer(&self, r: &NodeRef, value: Option<&String>) -> Option<usize> {
        let shared = value.is_none_or(|o| self.uses.get(o).copied().unwrap_or(0) > 1)
            || self.nodes.iter().any(|p| p.inputs.contains(&r.node))
            || self
                .values
                .values()
                .filter(|v| matches!(v, Value::Node(o) if o.node == r.node))
                .count()
                > 1;
        (!shared).then(|| self.by_name[&r.node])
    }

    /// Binds `n`'s output to `x * scale + shift` (each one value, or one per channel): folded
    /// into the layer that computes `x` when nothing else reads it (a convolution, linear
    /// layer, batch norm or per-channel affine), recognized as a hard sigmoid after a ReLU6,
    /// else a new per-channel affine node.
    fn affine(
        &mut self,
        n: &NodeProto,
        x: NodeRef,
        scale: Vec<f64>,
        shift: Vec<f64>,
    ) -> Result<()> {
        if scale.iter().all(|&s| s == 1.0) && shift.iter().all(|&b| b == 0.0) {
            return self.bind(n, x);
        }
        let Some(&channels) = x.onnx.first() else {
            return err("an arithmetic constant on a value with no channel axis");
        };
        let expand = |v: &[f64]| -> Vec<f64> {
            if v.len() == 1 {
                vec![v[0]; channels]
            } else {
                v.to_vec()
            }
        };
        let (scale_c, shift_c) = (expand(&scale), expand(&shift));
        let value = n
            .input
            .iter()
            .find(|i| matches!(self.values.get(*i), Some(Value::Node(r)) if r.node == x.node));
        if let Some(id) = self.sole_producer(&x, value) {
            // The value read here is read nowhere else: once folded, it is gone.
            if let Some(v) = value.cloned() {
                self.values.remove(&v);
            }
            let node = &mut self.nodes[id];
            if matches!(
                node.op,
                Op::Conv2d(_) | Op::Linear(_) | Op::BatchNorm2d(_) | Op::ChannelAffine { .. }
            ) {
                let scales_output = !matches!(node.op, Op::ChannelAffine { .. });
                match &mut node.op {
                    Op::Conv2d(s) => s.bias = true,
                    Op::Linear(s) => s.bias = true,
                    _ => {}
                }
                if let Some(w) = node.params.get_mut("weight") {
                    let per = (w.numel() / channels).max(1);
                    for (i, v) in w.values.iter_mut().enumerate() {
                        *v *= scale_c[i / per];
                    }
                }
                let bias = node.params.entry("bias").or_insert_with(|| Const {
                    dims: vec![channels],
                    values: vec![0.0; channels],
                });
                for ((b, s), t) in bias.values.iter_mut().zip(&scale_c).zip(&shift_c) {
                    *b = *b * s + t;
                }
                let _ = scales_output;
                // An affine that became the identity is passed over.
                if let Op::ChannelAffine { .. } = node.op {
                    // (within f32 rounding: 6 · 0.16666667 is not quite 1)
                    let one = |w: f64| (w - 1.0).abs() <= 2.0 * f64::from(f32::EPSILON);
                    let identity = node.params["weight"].values.iter().all(|&w| one(w))
                        && node.params["bias"].values.iter().all(|&b| b == 0.0);
                    if identity {
                        let input = node.inputs[0].clone();
                        let onnx = x.onnx.clone();
                        return self.bind(n, NodeRef { node: input, onnx });
                    }
                }
                return self.bind(n, x);
            }
        }
        // s · relu6(z) with 6s = 1 is a hard sigmoid (a scalar affine before the ReLU6 goes
        // into it): exporters write PyTorch's hardsigmoid as Add 3, Clip 0..6, Div 6.
        if let (&[s], &[0.0]) = (&scale[..], &shift[..]) {
            let producer = &self.nodes[self.by_name[&x.node]];
            if matches!(producer.op, Op::Relu6) && close(6.0 * s, 1.0) {
                let z = producer.inputs[0].clone();
                let (alpha, beta, z) = match self.scalar_affine(&z) {
                    Some((s1, t1, w)) => (s * s1, s * t1, w),
                    None => (s, 0.0, z),
                };
                let name = self.fresh_name(&sanitize(&display_name(n)), "hardsigmoid");
                let op = Op::HardSigmoid {
                    alpha: alpha as f32,
                    beta: beta as f32,
                };
                self.push(&name, op, &[&z], BTreeMap::new())?;
                return self.bind(
                    n,
                    NodeRef {
                        node: name,
                        onnx: x.onnx,
                    },
                );
            }
        }
        let name = self.fresh_name(&sanitize(&display_name(n)), "affine");
        let params = affine_params(channels, &scale_c, &shift_c);
        self.push(&name, Op::ChannelAffine { channels }, &[&x.node], params)?;
        self.bind(
            n,
            NodeRef {
                node: name,
                onnx: x.onnx,
            },
        )
    }

    /// `(scale, shift, input)` of a per-channel affine node with one scale and one shift.
    fn scalar_affine(&self, node: &str) -> Option<(f64, f64, String)> {
        let p = &self.nodes[*self.by_name.get(node)?];
        if !matches!(p.op, Op::ChannelAffine { .. }) {
            return None;
        }
        let (w, b) = (
            &p.params.get("weight")?.values,
            &p.params.get("bias")?.values,
        );
        let same = |v: &[f64]| v.iter().all(|&a| a == v[0]);
        (same(w) && same(b)).then(|| (w[0], b[0], p.inputs[0].clone()))
    }

    /// The op of the pending node `node` and its first input.
    fn op_of(&self, node: &str) -> Option<(&Op, &str)> {
        let p = &self.nodes[*self.by_name.get(node)?];
        Some((&p.op, p.inputs.first().map(|s| s.as_str()).unwrap_or("")))
    }

    /// Recognizes the products exporters write for named activations: `x · sigmoid(x)`
    /// (SiLU), `x · hardsigmoid(x)` (hardswish), `x · relu6(x + 3)` (6 · hardswish),
    /// `x · (1 + erf(x / √2))` (2 · GELU). Returns `Some` when it bound the output.
    fn recognize_product(
        &mut self,
        n: &NodeProto,
        base: &str,
        a: &NodeRef,
        b: &NodeRef,
    ) -> Result<Option<()>> {
        for (x, g) in [(a, b), (b, a)] {
            let Some((op, input)) = self.op_of(&g.node) else {
                continue;
            };
            let reads_x = input == x.node;
            let found = match op {
                Op::Sigmoid if reads_x => Some((Op::Silu, 1.0)),
                Op::HardSigmoid { alpha, beta }
                    if reads_x
                        && close(f64::from(*alpha) * 6.0, 1.0)
                        && close(f64::from(*beta), 0.5) =>
                {
                    Some((Op::HardSwish, 1.0))
                }
                Op::Relu6 => match self.scalar_affine(input) {
                    Some((s, t, z)) if z == x.node && s == 1.0 && t == 3.0 => {
                        Some((Op::HardSwish, 6.0))
                    }
                    _ => None,
                },
                Op::ChannelAffine { .. } => match self.scalar_affine(&g.node) {
                    Some((1.0, 1.0, e)) => match self.op_of(&e) {
                        Some((Op::Erf, inner)) => match self.scalar_affine(inner) {
                            Some((s, 0.0, z))
                                if z == x.node && close(s, std::f64::consts::FRAC_1_SQRT_2) =>
                            {
                                Some((Op::Gelu, 2.0))
                            }
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            };
            let Some((op, factor)) = found else {
                continue;
            };
            let name = self.fresh_name(base, op.kind());
            self.push(&name, op, &[&x.node], BTreeMap::new())?;
            let r = NodeRef {
                node: name,
                onnx: x.onnx.clone(),
            };
            if factor == 1.0 {
                self.bind(n, r)?;
            } else {
                let channels = r.onnx[0];
                let scaled = self.fresh_name(&format!("{base}.scale"), "scale");
                let params = affine_params(channels, &[factor], &[0.0]);
                self.push(&scaled, Op::ChannelAffine { channels }, &[&r.node], params)?;
                self.bind(
                    n,
                    NodeRef {
                        node: scaled,
                        onnx: r.onnx,
                    },
                )?;
            }
            return Ok(Some(()));
        }
        Ok(None)
    }

    /// Evaluates a node whose inputs are all constants, when it is one of the shape ops.
    fn fold(&self, n: &NodeProto, a: &Attrs) -> Result<Option<Const>> {
        let c = |i| self.konst(n, i);
        Ok(Some(match n.op_type.as_str() {
            "Identity" => c(0)?,
            "Cast" => {
                let mut x = c(0)?;
                let to = a.int("to").unwrap_or(0);
                if to == i64::from(data_type::BOOL) {
                    x.values
                        .iter_mut()
                        .for_each(|v| *v = f64::from(u8::from(*v != 0.0)));
                } else if !cast_keeps_floats(to) {
                    // Integer types: toward zero, as C casts.
                    x.values.iter_mut().for_each(|v| *v = v.trunc());
                }
                x
            }
            "Reshape" => {
                let x = c(0)?;
                let shape = c(1)?.ints();
                let full = resolve_shape(&x.dims, &shape)?;
                Const {
                    dims: full,
                    values: x.values,
                }
            }
            "Unsqueeze" => {
                let x = c(0)?;
                let axes = self.axes(n, a)?.unwrap_or_default();
                let rank = (x.dims.len() + axes.len()) as i64;
                let mut axes: Vec<usize> = axes
                    .iter()
                    .map(|&ax| if ax < 0 { ax + rank } else { ax } as usize)
                    .collect();
                axes.sort();
                let mut dims = x.dims.clone();
                for ax in axes {
                    if ax > dims.len() {
                        return err(format!("axis {ax} out of range"));
                    }
                    dims.insert(ax, 1);
                }
                Const {
                    dims,
                    values: x.values,
                }
            }
            "Squeeze" => {
                let x = c(0)?;
                let axes = self.axes(n, a)?;
                Const {
                    dims: squeeze_dims(&x.dims, axes.as_deref())?,
                    values: x.values,
                }
            }
            "Concat" => {
                let parts: Vec<Const> = (0..n.input.len()).map(c).collect::<Result<_>>()?;
                if parts.iter().any(|p| p.dims.len() > 1) {
                    return err("Concat of constants of rank above 1 is not supported");
                }
                let values: Vec<f64> = parts
                    .iter()
                    .flat_map(|p| p.values.iter().copied())
                    .collect();
                Const {
                    dims: vec![values.len()],
                    values,
                }
            }
            "Gather" => {
                let x = c(0)?;
                let idx = c(1)?;
                let axis = a.int("axis").unwrap_or(0);
                if axis != 0 || x.dims.len() != 1 {
                    return err("Gather of constants other than from a vector along axis 0");
                }
                let len = x.dims[0] as i64;
                let mut values = Vec::with_capacity(idx.numel());
                for i in idx.ints() {
                    let j = if i < 0 { i + len } else { i };
                    if !(0..len).contains(&j) {
                        return err(format!("index {i} out of range for {len} values"));
                    }
                    values.push(x.values[j as usize]);
                }
                Const {
                    dims: idx.dims.clone(),
                    values,
                }
            }
            "Slice" => {
                let x = c(0)?;
                if x.dims.len() != 1 {
                    return err("Slice of constants other than vectors");
                }
                let (starts, ends, steps) = if self.opset < 10 {
                    (
                        a.ints("starts").unwrap_or_default(),
                        a.ints("ends").unwrap_or_default(),
                        vec![1],
                    )
                } else {
                    (
                        c(1)?.ints(),
                        c(2)?.ints(),
                        self.opt_const(n, 4)?.map(|s| s.ints()).unwrap_or(vec![1]),
                    )
                };
                let (Some(&s), Some(&e), Some(&st)) = (starts.first(), ends.first(), steps.first())
                else {
                    return err("Slice without starts and ends");
                };
                if st != 1 {
                    return err("Slice of constants with a step other than 1");
                }
                let len = x.dims[0] as i64;
                let clampi = |v: i64| if v < 0 { (v + len).max(0) } else { v.min(len) };
                let (s, e) = (clampi(s), clampi(e));
                let values: Vec<f64> = if s < e {
                    x.values[s as usize..e as usize].to_vec()
                } else {
                    vec![]
                };
                Const {
                    dims: vec![values.len()],
                    values,
                }
            }
            "ConstantOfShape" => {
                let shape = c(0)?.ints();
                let dims = sizes("ConstantOfShape's shape", &shape, 0)
                    .ok()
                    .filter(|d| {
                        slim_core::graph::elements(d)
                            .is_some_and(|n| n <= slim_core::graph::MAX_ELEMENTS)
                    })
                    .ok_or_else(|| {
                        OnnxError::Model(format!(
                            "ConstantOfShape of shape {shape:?} is beyond Slim's limits"
                        ))
                    })?;
                let value = match a.tensor("value") {
                    Some(t) => {
                        let v = Const::from_proto(t)?;
                        if v.numel() != 1 {
                            return err(format!("its value holds {} elements, not one", v.numel()));
                        }
                        v.values[0]
                    }
                    None => 0.0,
                };
                let n = slim_core::graph::elements(&dims).unwrap_or(0);
                let left = self.generated_left.get();
                if n > left {
                    return err(format!(
                        "ConstantOfShape of shape {shape:?} ({n} values) exceeds the {left} values the import may still generate"
                    ));
                }
                self.generated_left.set(left - n);
                Const {
                    dims,
                    values: vec![value; n],
                }
            }
            "Transpose" => {
                let x = c(0)?;
                let rank = x.dims.len();
                let perm: Vec<usize> = match a.ints("perm") {
                    Some(p) => p.iter().map(|&v| v as usize).collect(),
                    None => (0..rank).rev().collect(),
                };
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                if sorted != (0..rank).collect::<Vec<_>>() {
                    return err(format!("perm {perm:?} for a constant of rank {rank}"));
                }
                transpose_nd(&x, &perm)
            }
            "Shape" => {
                let x = c(0)?;
                let (s, e) = shape_range(a, x.dims.len());
                Const {
                    dims: vec![e - s],
                    values: x.dims[s..e].iter().map(|&d| d as f64).collect(),
                }
            }
            "Mul" | "Add" | "Sub" | "Div" => {
                let (x, y) = (c(0)?, c(1)?);
                let ints = self.int_typed(n);
                let f = |p: f64, q: f64| match n.op_type.as_str() {
                    "Mul" => p * q,
                    "Add" => p + q,
                    "Sub" => p - q,
                    // Shape arithmetic divides integers (toward zero).
                    _ if ints => (p / q).trunc(),
                    _ => p / q,
                };
                if x.numel() == y.numel() {
                    Const {
                        dims: x.dims.clone(),
                        values: x
                            .values
                            .iter()
                            .zip(&y.values)
                            .map(|(&p, &q)| f(p, q))
                            .collect(),
                    }
                } else if y.numel() == 1 {
                    Const {
                        dims: x.dims.clone(),
                        values: x.values.iter().map(|&p| f(p, y.values[0])).collect(),
                    }
                } else if x.numel() == 1 {
                    Const {
                        dims: y.dims.clone(),
                        values: y.values.iter().map(|&q| f(x.values[0], q)).collect(),
                    }
                } else {
                    return Ok(None);
                }
            }
            _ => return Ok(None),
        }))
    }

    fn finish(self, outputs: &[String]) -> Result<Model> {
        // Only the nodes that some output needs (the input always): recognized patterns
        // leave their parts behind, and exporters leave unread branches.
        let mut live = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = outputs
            .iter()
            .filter_map(|o| self.by_name.get(o).copied())
            .collect();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut live[i], true) {
                continue;
            }
            stack.extend(self.nodes[i].inputs.iter().map(|x| self.by_name[x]));
        }
        let mut graph = Graph::new();
        let mut params = ParamStore::new();
        let dev = Device::Cpu;
        for (_, p) in self
            .nodes
            .iter()
            .enumerate()
            .filter(|&(i, p)| live[i] || matches!(p.op, Op::Input { .. }))
        {
            let inputs: Vec<&str> = p.inputs.iter().map(|s| s.as_str()).collect();
            graph.wire(&p.name, p.op.clone(), &inputs)?;
            for spec in p.op.params() {
                let c = p.params.get(spec.role).ok_or_else(|| {
                    OnnxError::Model(format!("node `{}` lacks its {}", p.name, spec.role))
                })?;
                if c.numel() != spec.shape.iter().product::<usize>() {
                    return err(format!(
                        "`{}.{}` has {} values, the layer needs shape {:?}",
                        p.name,
                        spec.role,
                        c.numel(),
                        spec.shape
                    ));
                }
                let t = Tensor::from_vec(c.f32s(), spec.shape.as_slice(), &dev)
                    .map_err(slim_core::CoreError::from)?;
                let kind = if spec.role == "weight" || spec.role == "bias" {
                    spec.kind
                } else {
                    ParamKind::Buffer
                };
                params.insert(format!("{}.{}", p.name, spec.role), &t, kind)?;
            }
        }
        let names: Vec<&str> = outputs.iter().map(|s| s.as_str()).collect();
        graph.set_outputs(&names)?;
        Ok(Model::new(graph, params)?)
    }
}

/// The `weight` and `bias` of a per-channel affine node (one value repeated, or one per
/// channel).
fn affine_params(channels: usize, scale: &[f64], shift: &[f64]) -> BTreeMap<&'static str, Const> {
    let full = |v: &[f64]| Const {
        dims: vec![channels],
        values: if v.len() == 1 {
            vec![v[0]; channels]
        } else {
            v.to_vec()
        },
    };
    BTreeMap::from([("weight", full(scale)), ("bias", full(shift))])
}

/// Equal up to f32 rounding: constants such as 1/6 and 1/√2 come as f32.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// An f32 attribute as the f64 of its shortest decimal form (`1e-5`, not `9.99999974e-6`), so
/// that the values Slim wrote come back exactly.
fn decimal(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(f64::from(v))
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn transpose(w: &Const) -> Const {
    let (r, c) = (w.dims[0], w.dims[1]);
    let mut values = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            values[j * r + i] = w.values[i * c + j];
        }
    }
    Const {
        dims: vec![c, r],
        values,
    }
}

/// The `start..end` of a Shape (opset 15), clamped to a rank.
fn shape_range(a: &Attrs, rank: usize) -> (usize, usize) {
    let r = rank as i64;
    let clamp = |v: i64| if v < 0 { (v + r).max(0) } else { v.min(r) } as usize;
    let s = clamp(a.int("start").unwrap_or(0));
    let e = clamp(a.int("end").unwrap_or(r));
    (s, e.max(s))
}

/// True for ONNX element types that hold floats: a Cast to them leaves Slim's values as
/// they are.
fn cast_keeps_floats(to: i64) -> bool {
    [
        data_type::FLOAT,
        data_type::DOUBLE,
        data_type::FLOAT16,
        data_type::BFLOAT16,
    ]
    .contains(&(to as i32))
}

/// The axes of a constant permuted: axis `i` of the result is axis `perm[i]` of `x`.
fn transpose_nd(x: &Const, perm: &[usize]) -> Const {
    let dims: Vec<usize> = perm.iter().map(|&p| x.dims[p]).collect();
    let mut strides = vec![1usize; x.dims.len()];
    for i in (0..x.dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * x.dims[i + 1];
    }
    let mut values = Vec::with_capacity(x.numel());
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..x.numel() {
        let src: usize = idx.iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum();
        values.push(x.values[src]);
        for ax in (0..dims.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < dims[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    Const { dims, values }
}

/// A constant's new dimensions under a Reshape (0 copies, -1 is inferred).
fn resolve_shape(dims: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let too_large = || OnnxError::Model(format!("reshape of {dims:?} to {shape:?} is too large"));
    let total = slim_core::graph::elements(dims).ok_or_else(too_large)?;
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &s) in shape.iter().enumerate() {
        match s {
            0 => out.push(
                *dims
                    .get(i)
                    .ok_or_else(|| OnnxError::Model("reshape copies a missing axis".into()))?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            s => return err(format!("reshape to a dimension of {s}")),
        }
    }
    let known = slim_core::graph::elements(&out).ok_or_else(too_large)?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return err(format!("cannot reshape {dims:?} to {shape:?}"));
        }
        out[i] = total / known;
    }
    if slim_core::graph::elements(&out) != Some(total) {
        return err(format!("cannot reshape {dims:?} to {shape:?}"));
    }
    Ok(out)
}

/// A data value's per-sample shape under a Reshape whose first entry is the batch axis,
/// whatever the exporter wrote there (1, 0, -1 or a fixed batch size).
fn resolve_reshape(onnx: &[usize], shape: &[i64]) -> Result<Vec<usize>> {
    let Some((_, rest)) = shape.split_first() else {
        return err("reshape to a scalar");
    };
    let mut dims = vec![1];
    dims.extend_from_slice(onnx);
    let mut target = vec![1i64];
    target.extend(rest.iter().map(|&v| if v == 0 { 0 } else { v }));
    let out = resolve_shape(&dims, &target)?;
    Ok(out[1..].to_vec())
}

fn squeeze_dims(dims: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>> {
    let rank = dims.len() as i64;
    match axes {
        None => Ok(dims.iter().copied().filter(|&d| d != 1).collect()),
        Some(axes) => {
            let axes: Vec<usize> = axes
                .iter()
                .map(|&a| if a < 0 { a + rank } else { a } as usize)
                .collect();
            for &a in &axes {
                if dims.get(a) != Some(&1) {
                    return err(format!("squeeze of axis {a} of shape {dims:?}"));
                }
            }
            Ok(dims
                .iter()
                .enumerate()
                .filter(|(i, _)| !axes.contains(i))
                .map(|(_, &d)| d)
                .collect())
        }
    }
}

/// `(before, after)` padding of the height and width axes, from `pads` or `auto_pad`.
fn pads_per_axis(
    a: &Attrs,
    input: [usize; 2],
    kernel: [usize; 2],
    stride: usize,
    dil: usize,
) -> Result<Vec<(usize, usize)>> {
    if stride == 0 || dil == 0 || kernel.contains(&0) {
        return err(format!(
            "kernel {kernel:?}, stride {stride} and dilation {dil} must be at least 1"
        ));
    }
    let auto = a.string("auto_pad").unwrap_or_default();
    let per_axis: Vec<(usize, usize)> = match auto.as_str() {
        "" | "NOTSET" => {
            let p = a.ints("pads").unwrap_or(vec![0, 0, 0, 0]);
            if p.len() != 4 || p.iter().any(|&v| !(0..=LIMIT).contains(&v)) {
                return err(format!("pads {p:?}"));
            }
            vec![
                (p[0] as usize, p[2] as usize),
                (p[1] as usize, p[3] as usize),
            ]
        }
        "VALID" => vec![(0, 0), (0, 0)],
        "SAME_UPPER" | "SAME_LOWER" => (0..2)
            .map(|i| {
                let out = input[i].div_ceil(stride);
                let span = dil * (kernel[i] - 1) + 1;
                let total = ((out - 1) * stride + span).saturating_sub(input[i]);
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            })
            .collect(),
        other => return err(format!("auto_pad {other}")),
    };
    Ok(per_axis)
}

/// The largest stride, dilation, padding or window Slim accepts from a file (far beyond any
/// real model; it keeps every size computation inside `usize`).
const LIMIT: i64 = 1 << 16;

/// An attribute's sizes, each checked to be in `min..=LIMIT`.
fn sizes(what: &str, v: &[i64], min: i64) -> Result<Vec<usize>> {
    if v.iter().all(|x| (min..=LIMIT).contains(x)) {
        Ok(v.iter().map(|&x| x as usize).collect())
    } else {
        err(format!("{what} {v:?} out of range ({min} to {LIMIT})"))
    }
}

struct Attrs<'a>(&'a [AttributeProto]);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str) -> Option<i64> {
        self.get(name).map(|a| a.i)
    }
    fn float(&self, name: &str) -> Option<f32> {
        self.get(name).map(|a| a.f)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    fn string(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    fn tensor(&self, name: &str) -> Option<&TensorProto> {
        self.get(name).and_then(|a| a.t.as_ref())
    }
}
