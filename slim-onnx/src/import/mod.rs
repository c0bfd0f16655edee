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
    BatchNormSpec, BinaryKind, Conv2dSpec, ConvTransposeSpec, CoordMode, Crop, Float8, Graph,
    LinearSpec, LrnSpec, NearestRounding, Op, PadMode, ParamKind, PoolSpec, ReduceKind, ResizeMode,
    ResizeSpec, UnaryKind,
};
use slim_core::params::ParamStore;
use slim_core::Model;

use crate::proto::{self, data_type, AttributeProto, NodeProto, TensorProto};

mod arith;
mod constant;
mod layers;
mod norm;
mod pool;
mod quant;
mod single;
mod tensor;

use crate::{OnnxError, Result};
use constant::{cast_keeps_floats, resolve_reshape, shape_range, squeeze_dims, transpose, Const};

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
    /// Import a model whose parameters hold NaN or infinite values instead of refusing it
    /// ([`Model::nonfinite_params`] lists them).
    pub allow_nonfinite: bool,
    /// The graph computes on one sample: its input's whole shape (first axis included) is
    /// the per-sample shape, and Slim's model applies the graph to each sample of a batch.
    /// For graphs written without a batch axis (ops over every axis of a vector or a table);
    /// convolutions, pooling, batch norm and LRN read the first axis as the batch and are
    /// refused so.
    pub single_sample: bool,
}

/// Reads any model file: an ONNX model (`.onnx`, imported by `opts`) or a Slim file (a float
/// or int8 `.safetensors`), onto `device`. With `opts.allow_nonfinite`, a model whose tensors
/// hold NaN or infinite values is read with a list of them; without it, it is refused.
pub fn load_model(
    path: &Path,
    device: &candle_core::Device,
    opts: &ImportOptions,
) -> Result<(Model, Vec<slim_core::finite::NonFinite>)> {
    let onnx = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
    let load = slim_core::io::LoadOptions::default().with_allow_nonfinite(opts.allow_nonfinite);
    if !onnx {
        let (m, report) = Model::load_with(path, device, &load)?;
        return Ok((m, report.nonfinite));
    }
    let m = import_file(path, opts)?;
    let found = match opts.allow_nonfinite {
        true => m.nonfinite_params()?,
        false => Vec::new(),
    };
    if device.is_cpu() {
        Ok((m, found))
    } else {
        Ok((
            Model::from_bytes_with(&m.to_bytes()?, device, &load)?.0,
            found,
        ))
    }
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
    let unsupported = unsupported_ops(graph, opset);
    if !unsupported.is_empty() {
        return Err(OnnxError::Unsupported(unsupported));
    }
    let mut b = Builder::new(opset);
    b.single = opts.single_sample;
    if let Some(max) = opts.max_generated {
        b.generated_left.set(max);
    }
    for t in &graph.initializer {
        b.values
            .insert(t.name.clone(), Value::Const(Const::from_proto(t)?));
        if data_type::is_integer(t.data_type) {
            b.ints.insert(t.name.clone());
        }
        b.types.insert(t.name.clone(), t.data_type);
    }
    b.count_uses(graph);
    let input = data_input(graph, &b)?;
    let shape = input_shape(input, opts.input_shape.as_deref(), opts.single_sample)?;
    if shape.is_empty() && !opts.single_sample {
        return err(format!(
            "the input `{}` has one axis, which Slim reads as the batch: a sample would be one \
             number (a graph without a batch axis imports with --single-sample)",
            input.name
        ));
    }
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
    let outputs = b.outputs(graph)?;
    let mut out = b.finish(&outputs)?;
    // The parameters, not every initializer: a constant such as a padding value or a clip
    // bound may be infinite on purpose, and it becomes an attribute, not a parameter.
    if !opts.allow_nonfinite {
        if let Some(nf) = out.nonfinite_params()?.into_iter().next() {
            return Err(OnnxError::Model(format!(
                "parameter `{}` holds {}; pass --allow-nonfinite to import it anyway",
                nf.tensor,
                nf.summary()
            )));
        }
    }
    record_provenance(&mut out, &model, opset);
    if opts.preprocess.is_some() || opts.resize {
        out.set_preprocess(opts.preprocess.as_ref(), opts.resize)?;
    }
    Ok(out)
}

/// What the model records of where it came from: the importer, the opset, the producer, and
/// the `slim.*` metadata of a model Slim exported.
fn record_provenance(out: &mut Model, model: &proto::ModelProto, opset: i64) {
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
}

/// The data input: a graph input that is not an initializer (old IR lists both), that no node
/// computes (some exporters list the outputs of their weight-filling nodes as inputs too), and
/// that some node reads; exactly one.
fn data_input<'g>(graph: &'g proto::GraphProto, b: &Builder) -> Result<&'g proto::ValueInfoProto> {
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
    match inputs.as_slice() {
        [one] => Ok(*one),
        [] => Err(OnnxError::Model("the model has no data input".into())),
        many => Err(OnnxError::Model(format!(
            "the model has {} data inputs ({}); Slim models take one image input",
            many.len(),
            many.iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Every node of `graph` whose op the importer does not take, described for the error.
fn unsupported_ops(graph: &proto::GraphProto, opset: i64) -> Vec<String> {
    graph
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
        .collect()
}

impl Builder {
    /// The Slim nodes of the graph's outputs.
    fn outputs(&mut self, graph: &proto::GraphProto) -> Result<Vec<String>> {
        let mut outputs = Vec::new();
        for o in &graph.output {
            match self.values.get(&o.name) {
                Some(Value::Node(r)) => outputs.push(r.node.clone()),
                // A graph of one sample may compute a constant (a shape): the same for every
                // sample.
                Some(Value::Const(c)) if self.single => {
                    let c = c.clone();
                    let rank = c.dims.len() + 1;
                    let r = self.constant_node(&o.name, &c, rank).map_err(|e| {
                        OnnxError::Model(format!("the graph output `{}`: {e}", o.name))
                    })?;
                    outputs.push(r.node)
                }
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
        Ok(outputs)
    }
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

fn input_shape(
    input: &proto::ValueInfoProto,
    given: Option<&[usize]>,
    single: bool,
) -> Result<Vec<usize>> {
    let shape = declared_input_shape(input, given, single)?;
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
    single: bool,
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
    // The batch axis, first, is not part of a sample (unless the graph is of one sample).
    let skip = usize::from(!single);
    let declared: Option<Vec<Option<usize>>> = dims.map(|d| d.into_iter().skip(skip).collect());
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
    /// The graph is of one sample ([`ImportOptions::single_sample`]).
    single: bool,
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
    /// How many of a value's uses are a `DequantizeLinear`'s first input.
    dequantized_uses: HashMap<String, usize>,
    nodes: Vec<Pending>,
    by_name: HashMap<String, usize>,
    /// The element types of constant values (initializers, `Constant` tensors, quantized
    /// constants): a zero point's type says a quantizer's range.
    types: HashMap<String, i32>,
    /// Dequantized int8 constants by their float values' bits, with their integers: a layer
    /// weight found among them is held as int8.
    int8_consts: HashMap<Vec<u32>, slim_core::model::Int8Tensor>,
}

fn err<T>(m: impl Into<String>) -> Result<T> {
    Err(OnnxError::Model(m.into()))
}

impl Builder {
    fn new(opset: i64) -> Builder {
        Builder {
            opset,
            single: false,
            values: HashMap::new(),
            swapped: HashMap::new(),
            generated_left: std::cell::Cell::new(slim_core::graph::MAX_ELEMENTS),
            ints: std::collections::HashSet::new(),
            batchy: HashMap::new(),
            uses: HashMap::new(),
            dequantized_uses: HashMap::new(),
            nodes: Vec::new(),
            by_name: HashMap::new(),
            types: HashMap::new(),
            int8_consts: HashMap::new(),
        }
    }

    /// How often each value is read, by nodes and as a graph output.
    fn count_uses(&mut self, graph: &crate::proto::GraphProto) {
        for n in &graph.node {
            for i in &n.input {
                *self.uses.entry(i.clone()).or_default() += 1;
            }
            if let ("DequantizeLinear", Some(x)) = (n.op_type.as_str(), n.input.first()) {
                *self.dequantized_uses.entry(x.clone()).or_default() += 1;
            }
        }
        for o in &graph.output {
            *self.uses.entry(o.name.clone()).or_default() += 1;
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

    /// Every input of `n` as data: a constant among them becomes a constant node (see
    /// [`Builder::constant_node`]) of the data's rank.
    fn data_or_constants(&mut self, n: &NodeProto) -> Result<Vec<NodeRef>> {
        let values: Vec<Value> = (0..n.input.len())
            .map(|i| self.value(n, i).cloned())
            .collect::<Result<_>>()?;
        let rank = values
            .iter()
            .find_map(|v| match v {
                Value::Node(r) => Some(r.onnx.len() + 1),
                Value::Const(_) => None,
            })
            .ok_or_else(|| OnnxError::Model("no data input".into()))?;
        values
            .into_iter()
            .map(|v| match v {
                Value::Node(r) => Ok(r),
                Value::Const(c) => self.constant_node(&display_name(n), &c, rank),
            })
            .collect()
    }

    /// A constant of the file fed where data goes (a Concat's or a MatMul's input, an Expand
    /// over the batch): a constant node of its per-sample shape, the same for every sample.
    /// Its input is the model's input, for the batch size. A constant of the data's full
    /// `rank` (the batch axis included) must have one in its first axis.
    fn constant_node(&mut self, base: &str, c: &Const, rank: usize) -> Result<NodeRef> {
        let per_sample = match c.dims.len() {
            r if r == rank && c.dims[0] == 1 => c.dims[1..].to_vec(),
            r if r == rank => {
                return err(format!(
                    "a constant of shape {:?} holds other values for each of {} samples; Slim's \
                     constants are the same for every sample",
                    c.dims, c.dims[0]
                ))
            }
            r if r < rank => c.dims.clone(),
            _ => {
                return err(format!(
                    "a constant of shape {:?} has more axes than the data",
                    c.dims
                ))
            }
        };
        if per_sample.is_empty() {
            return err("a constant of one number where Slim expects data");
        }
        let source = match self.nodes.first() {
            Some(p) if matches!(p.op, Op::Input { .. }) => p.name.clone(),
            _ => return err("a constant before the model's input"),
        };
        let name = self.fresh_name(&sanitize(base), "constant");
        let value = Const {
            dims: per_sample.clone(),
            values: c.values.clone(),
        };
        let op = Op::Constant {
            shape: per_sample.clone(),
        };
        let p = BTreeMap::from([("value", value)]);
        self.push(&name, op, &[&source], p)?;
        Ok(NodeRef::plain(name, &per_sample))
    }

    /// Expand: a constant over the batch (a class token repeated for every sample) becomes a
    /// constant node of the broadcast shape; data whose shape the target leaves as it is
    /// passes through.
    fn expand(&mut self, n: &NodeProto) -> Result<()> {
        let target = self.konst(n, 1)?.ints();
        let input = self.value(n, 0)?.clone();
        let dims = match &input {
            Value::Const(c) => c.dims.clone(),
            Value::Node(x) => std::iter::once(1).chain(x.onnx.iter().copied()).collect(),
        };
        // Numpy's broadcast of the input's shape and the target, aligned on the right; the
        // target's first entry, when it spans the input's, is the batch (read from the input's
        // shape) and keeps the input's.
        let mut want: Vec<usize> = target.iter().map(|&t| t.max(1) as usize).collect();
        if !want.is_empty() && want.len() >= dims.len() {
            want[0] = 1;
        }
        let rank = dims.len().max(want.len());
        let out = slim_core::graph::broadcast_shape(&dims, &want)
            .filter(|o| !o.is_empty())
            .ok_or_else(|| {
                OnnxError::Model(format!("shape {dims:?} does not expand to {target:?}"))
            })?;
        match input {
            Value::Node(x) if out[1..] == x.onnx[..] => self.bind(n, x),
            Value::Node(x) => {
                // Data broadcast to a larger shape: a product with ones of that shape (axes
                // added in front of the batch would move it; in a graph of one sample the
                // first axis is the one the rewrite put in front, and they go after it).
                if out.first() != Some(&1) || (target.len() > dims.len() && !self.single) {
                    return err(format!(
                        "Expand of data of shape [N, {}] to {target:?} over the batch axis",
                        join(&x.onnx)
                    ));
                }
                self.charge(&out[1..], 0)?;
                let ones = Const {
                    values: vec![1.0; out[1..].iter().product()],
                    dims: out[1..].to_vec(),
                };
                let base = display_name(n);
                let c = self.constant_node(&format!("{base}.ones"), &ones, rank)?;
                self.data_binary(n, &sanitize(&base), &x, &c, BinaryKind::Mul)
            }
            Value::Const(c) => {
                if out.first() != Some(&1) {
                    return err(format!(
                        "Expand of a constant of shape {dims:?} over its first axis"
                    ));
                }
                let count = slim_core::graph::elements(&out)
                    .filter(|&n| n <= slim_core::graph::MAX_ELEMENTS)
                    .ok_or_else(|| {
                        OnnxError::Model(format!("Expand to {out:?} is beyond Slim's limits"))
                    })?;
                let left = self.generated_left.get();
                if count > left {
                    return err(format!(
                        "Expand to {out:?} ({count} values) exceeds the {left} values the import \
                         may still generate"
                    ));
                }
                self.generated_left.set(left - count);
                let values = broadcast_values(&c, &out);
                let full = Const { dims: out, values };
                let r = self.constant_node(&display_name(n), &full, rank)?;
                self.bind(n, r)
            }
        }
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
        // A constant that holds the batch size may only be the batch entry of a Reshape's
        // target, an Expand's shape or a Resize's sizes (exporters copy the input's [N, C]
        // there): each keeps the batch as it is.
        for (i, input) in n.input.iter().enumerate() {
            let Some(flags) = self.batchy.get(input) else {
                continue;
            };
            let first_axis = a
                .ints("axes")
                .is_none_or(|ax| matches!(ax.first(), Some(0 | -4)));
            let keeps_batch = match (n.op_type.as_str(), i) {
                ("Reshape", 1) | ("Expand", 1) => true,
                ("Resize", 3) => first_axis,
                _ => false,
            };
            if !keeps_batch || flags[1..].contains(&true) {
                return err(format!(
                    "input `{input}` is computed from the batch size, which Slim does not know at import (each sample is computed apart)"
                ));
            }
        }
        if let (Some(t), Some(out)) = (a.tensor("value"), n.output.first()) {
            if n.op_type == "Constant" {
                self.types.insert(out.clone(), t.data_type);
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
        if self.single {
            let lifted = self.lift(n)?;
            return self.dispatch(&lifted);
        }
        self.dispatch(n)
    }

    /// Imports a node that reads data (or a `Constant`).
    fn dispatch(&mut self, n: &NodeProto) -> Result<()> {
        let a = Attrs(&n.attribute);
        let base = sanitize(&display_name(n));
        if let Some(kind) = unary_kind(&n.op_type, &a) {
            return self.unary(n, &base, Op::Unary(kind));
        }
        match n.op_type.as_str() {
            "Constant" => self.constant_value(n, &a),
            "Dropout" => self.dropout(n, &a, &base),
            "Cast" if let Some(kind) = float8_cast(&a) => self.unary(n, &base, Op::Unary(kind)),
            "Cast" if !cast_keeps_floats(a.int("to").unwrap_or(0)) => err(format!(
                "a Cast of data to {}; Slim computes in floats",
                data_type::name(a.int("to").unwrap_or(0) as i32)
            )),
            "Identity" | "Cast" => self.pass_through(n),
            "Shape" => self.shape(n, &a),
            "Conv" => self.conv(n, &a),
            "BatchNormalization" => self.batch_norm(n, &a),
            "Relu" => self.unary(n, &base, Op::Relu),
            "Sigmoid" => self.unary(n, &base, Op::Sigmoid),
            "HardSwish" => self.unary(n, &base, Op::HardSwish),
            "HardSigmoid" => {
                let alpha = a.float("alpha").unwrap_or(0.2);
                let beta = a.float("beta").unwrap_or(0.5);
                self.unary(n, &base, Op::HardSigmoid { alpha, beta })
            }
            "Clip" => self.clip(n, &a, &base),
            "LeakyRelu" => {
                let alpha = a.float("alpha").unwrap_or(0.01);
                self.unary(n, &base, Op::LeakyRelu { alpha })
            }
            "PRelu" => self.prelu(n, &base),
            "Tanh" => self.unary(n, &base, Op::Tanh),
            "Erf" => self.unary(n, &base, Op::Erf),
            "Max" => self.extreme(n, &base, BinaryKind::Max),
            "Min" => self.extreme(n, &base, BinaryKind::Min),
            "Gelu" => match a.string("approximate").as_deref() {
                None | Some("none") => self.unary(n, &base, Op::Gelu),
                Some("tanh") => self.unary(n, &base, Op::GeluTanh),
                Some(other) => err(format!(
                    "Gelu with approximate=\"{other}\" (ONNX names none and tanh)"
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
            "Concat" => self.concat(n, &a, &base),
            "MaxPool" | "AveragePool" => self.pool(n, &a, &base),
            "GlobalAveragePool" => self.global_average_pool(n, &base),
            "GlobalMaxPool" => self.global_max_pool(n, &base),
            "Flatten" => self.flatten_op(n, &a, &base),
            "Reshape"
                if n.input
                    .first()
                    .is_some_and(|i| self.swapped.contains_key(i)) =>
            {
                self.unshuffle(n, &base)
            }
            "Transpose" => self.transpose_op(n, &a, &base),
            "Reshape" | "Squeeze" | "Unsqueeze" => self.reshape_op(n, &a, &base),
            "Gemm" => self.gemm(n, &a),
            "MatMul" => self.matmul(n, &base),
            "Softmax" => self.softmax(n, &a, &base),
            "LRN" => self.lrn(n, &a, &base),
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
            "ReduceMean" | "ReduceMax" | "ReduceSum" | "ReduceMin" | "ReduceL1" | "ReduceL2"
            | "ReduceSumSquare" => self.reduce(n, &a, &base),
            "ArgMax" | "ArgMin" => self.arg_extreme(n, &a, &base),
            "LayerNormalization" => self.layer_norm(n, &a, &base),
            "InstanceNormalization" => self.instance_norm(n, &a, &base),
            "GroupNormalization" => self.group_norm(n, &a, &base),
            "DepthToSpace" | "SpaceToDepth" => self.depth_space(n, &a, &base),
            "Split" => self.split(n, &a, &base),
            "Slice" => self.slice(n, &a, &base),
            "Resize" | "Upsample" => self.resize(n, &a, &base),
            "ConvTranspose" => self.conv_transpose(n, &a),
            "QuantizeLinear" => self.quantize_linear(n, &a, &base),
            "DequantizeLinear" => self.dequantize_linear(n, &a),
            "Gather" => self.gather(n, &a, &base),
            "Expand" => self.expand(n),
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
                "axis {axis} of a rank-{rank} value: Slim keeps the batch axis (0) apart (a \
                 graph without a batch axis imports with --single-sample)"
            ));
        }
        Ok(a as usize - 1)
    }

    /// Binds `n`'s output to `x` reshaped to the per-sample `shape`.
    fn reshape(&mut self, n: &NodeProto, base: &str, x: &NodeRef, shape: Vec<usize>) -> Result<()> {
        let name = self.reshape_to(base, &x.node, shape.clone())?;
        self.bind(n, NodeRef::plain(name, &shape))
    }

    /// A Slim node reshaping the node `x` to the per-sample `shape`; its name.
    fn reshape_to(&mut self, base: &str, x: &str, shape: Vec<usize>) -> Result<String> {
        let name = self.fresh_name(base, "reshape");
        self.push(&name, Op::Reshape { shape }, &[x], BTreeMap::new())?;
        Ok(name)
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
        let mut model = Model::new(graph, params)?;
        // Layers that read a quantizer and whose weight was dequantized from int8 hold it so.
        for node in model.graph.nodes() {
            let reads_quantizer = node
                .inputs
                .first()
                .is_some_and(|&i| matches!(model.graph.node(i).op, Op::FakeQuant(_)));
            if !matches!(node.op, Op::Conv2d(_) | Op::Linear(_)) || !reads_quantizer {
                continue;
            }
            let name = node.param_name("weight");
            let w = model
                .params
                .tensor(&name)?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(slim_core::CoreError::from)?;
            if let Some(q) = self.int8_consts.get(&quant::bits_key(&w)) {
                if q.scales.len() == 1 || node.shape.first() == Some(&q.scales.len()) {
                    model.int8.insert(name, q.clone());
                }
            }
        }
        Ok(model)
    }
}

/// A `Cast` to an 8-bit float: the rounding to it.
fn float8_cast(a: &Attrs) -> Option<UnaryKind> {
    Some(UnaryKind::Float8 {
        format: Float8::of_onnx(a.int("to").unwrap_or(0) as i32)?,
        saturate: a.int("saturate").unwrap_or(1) != 0,
    })
}

/// The element-wise function an ONNX op of one input names, with its attributes' values
/// (ONNX's defaults where absent).
fn unary_kind(op: &str, a: &Attrs) -> Option<UnaryKind> {
    Some(match op {
        "Abs" => UnaryKind::Abs,
        "Exp" => UnaryKind::Exp,
        "Log" => UnaryKind::Log,
        "Softplus" => UnaryKind::Softplus,
        "Softsign" => UnaryKind::Softsign,
        "Mish" => UnaryKind::Mish,
        "Round" => UnaryKind::Round,
        "Elu" => UnaryKind::Elu {
            alpha: a.float("alpha").unwrap_or(1.0),
        },
        "Selu" => UnaryKind::Selu {
            alpha: a.float("alpha").unwrap_or(1.673_263_2),
            gamma: a.float("gamma").unwrap_or(1.050_701),
        },
        _ => return None,
    })
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

/// The values of `c` broadcast (numpy's rules, aligned on the right) to `shape`.
fn broadcast_values(c: &Const, shape: &[usize]) -> Vec<f64> {
    let total: usize = shape.iter().product();
    let offset = shape.len() - c.dims.len();
    (0..total)
        .map(|mut flat| {
            let mut index = 0;
            let mut stride = 1;
            for (i, &len) in shape.iter().enumerate().rev() {
                let pos = flat % len;
                flat /= len;
                if i >= offset {
                    let d = c.dims[i - offset];
                    index += if d == 1 { 0 } else { pos } * stride;
                    stride *= d;
                }
            }
            c.values[index]
        })
        .collect()
}
