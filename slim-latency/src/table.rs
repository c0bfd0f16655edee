//! The table file: what it was measured on, and one entry per op signature.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use slim_core::{Graph, Node, Op};

use crate::{LatencyError, Result};

/// The `format` field of a table file.
pub const TABLE_FORMAT: &str = "slim-latency-table";
/// The version of the table layout this crate reads and writes.
pub const TABLE_VERSION: u32 = 1;

/// Which runtime executes the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Candle's float kernels (and Slim's own), every value f32.
    F32,
    /// Slim's int8 runtime: quantized convolutions and linear layers in integers, the rest f32.
    Int8,
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runtime::F32 => "f32",
            Runtime::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for Runtime {
    type Err = LatencyError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Runtime::F32),
            "int8" => Ok(Runtime::Int8),
            other => Err(LatencyError::Invalid(format!(
                "unknown runtime `{other}` (known: f32, int8)"
            ))),
        }
    }
}

/// What a table was measured on. Estimates are only meaningful on the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The CPU's model name (from `/proc/cpuinfo` where there is one).
    pub cpu: String,
    /// Where the tensors lived (`cpu`).
    pub device: String,
    pub threads: usize,
    pub batch: usize,
    pub runtime: Runtime,
    pub slim_version: String,
    pub candle_version: String,
    /// The day the table was first built (UTC, `YYYY-MM-DD`).
    pub date: String,
}

/// The version of candle that Slim is built with, recorded in every table (a test checks it
/// against the lock file).
pub const CANDLE_VERSION: &str = "0.11.1";

impl DeviceInfo {
    /// A description of this machine for the given settings.
    pub fn this_machine(runtime: Runtime, threads: usize, batch: usize) -> DeviceInfo {
        DeviceInfo {
            cpu: cpu_model(),
            device: "cpu".into(),
            threads,
            batch,
            runtime,
            slim_version: env!("CARGO_PKG_VERSION").into(),
            candle_version: CANDLE_VERSION.into(),
            date: today(),
        }
    }

    /// `cpu, N thread(s), batch B, RUNTIME`: the unit of the table's costs.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} thread(s), batch {}, {} runtime",
            self.cpu, self.threads, self.batch, self.runtime
        )
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Today's UTC date as `YYYY-MM-DD` (civil calendar from days since 1970-01-01).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// What determines an op's cost: its kind, the per-sample shapes it reads and writes, its
/// geometry, and the type it computes in. The batch and threads are the table's.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Signature {
    pub op: String,
    pub inputs: Vec<Vec<usize>>,
    pub output: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_channels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<[usize; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dilation: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<usize>,
    pub dtype: String,
}

fn dims(s: &[usize]) -> String {
    s.iter().map(usize::to_string).collect::<Vec<_>>().join("x")
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inputs: Vec<String> = self.inputs.iter().map(|s| dims(s)).collect();
        write!(
            f,
            "{} {}->{}",
            self.op,
            inputs.join("+"),
            dims(&self.output)
        )?;
        if let Some(k) = self.kernel {
            write!(f, " k{}x{}", k[0], k[1])?;
        }
        if let Some(s) = self.stride {
            write!(f, " s{s}")?;
        }
        if let Some(p) = self.padding {
            write!(f, " p{p}")?;
        }
        if let Some(d) = self.dilation.filter(|&d| d != 1) {
            write!(f, " d{d}")?;
        }
        if let Some(g) = self.groups.filter(|&g| g != 1) {
            write!(f, " g{g}")?;
        }
        write!(f, " {}", self.dtype)
    }
}

impl Signature {
    /// The signature of `node` in `graph`; `int8` says whether the runtime computes it in
    /// integers.
    pub fn of(graph: &Graph, node: &Node, int8: bool) -> Signature {
        let inputs = node
            .inputs
            .iter()
            .map(|&i| graph.node(i).shape.clone())
            .collect();
        let mut s = Signature {
            op: node.op.kind().to_string(),
            inputs,
            output: node.shape.clone(),
            out_channels: None,
            kernel: None,
            stride: None,
            padding: None,
            dilation: None,
            groups: None,
            dtype: if int8 { "int8" } else { "f32" }.into(),
        };
        match &node.op {
            Op::Conv2d(c) => {
                s.out_channels = Some(c.out_channels);
                s.kernel = Some(c.kernel);
                s.stride = Some(c.stride);
                s.padding = Some(c.padding);
                s.dilation = Some(c.dilation);
                s.groups = Some(c.groups);
            }
            Op::Linear(l) => s.out_channels = Some(l.out_features),
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => {
                // The height's stride, padding and dilation; the output shape tells the rest.
                s.kernel = Some(p.kernel);
                s.stride = Some(p.stride[0]);
                s.padding = Some(p.pads[0]);
                s.dilation = (p.dilation != [1, 1]).then_some(p.dilation[0]);
            }
            _ => {}
        }
        s
    }

    /// The work the op does, for the fallback fit: multiply-accumulates of a convolution or
    /// linear layer, values read and written otherwise (one sample).
    pub fn work(&self) -> f64 {
        // In floats: a table read from a file may hold any sizes.
        let n = |s: &[usize]| s.iter().map(|&d| d as f64).product::<f64>();
        let out = n(&self.output);
        match self.op.as_str() {
            "conv2d" | "dwconv2d" => {
                let k = self.kernel.unwrap_or([1, 1]);
                let cin = self
                    .inputs
                    .first()
                    .and_then(|s| s.first())
                    .copied()
                    .unwrap_or(1);
                let g = self.groups.unwrap_or(1).max(1);
                out * (cin / g) as f64 * k[0] as f64 * k[1] as f64
            }
            "linear" => out * self.inputs.first().map_or(1.0, |s| n(s)),
            _ => out + self.inputs.iter().map(|s| n(s)).sum::<f64>(),
        }
    }

    /// Ops whose cost the fallback fits together.
    fn family(&self) -> (String, String) {
        (self.op.clone(), self.dtype.clone())
    }
}

/// The measured time of one signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub signature: Signature,
    /// The median over every measured run (milliseconds for the whole batch).
    pub median_ms: f64,
    /// The 25th and 75th percentiles: the spread of the runs.
    pub p25_ms: f64,
    pub p75_ms: f64,
    /// How many timings the median is over.
    pub samples: usize,
}

/// A whole model timed while the table was built.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelTiming {
    pub name: String,
    pub nodes: usize,
    pub measured_ms: f64,
    /// The sum of its ops' medians.
    pub ops_ms: f64,
}

/// A latency table: the device it was measured on and one entry per op signature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub format: String,
    pub version: u32,
    pub device: DeviceInfo,
    /// The cost of a forward beyond its ops (setting up, collecting the outputs), per node of
    /// the graph: the median over the built models of (whole - sum of ops) / nodes.
    pub overhead_per_node_ms: f64,
    pub entries: Vec<Entry>,
    /// The models the table was built from.
    pub models: Vec<ModelTiming>,
}

impl Table {
    pub fn new(device: DeviceInfo) -> Table {
        Table {
            format: TABLE_FORMAT.into(),
            version: TABLE_VERSION,
            device,
            overhead_per_node_ms: 0.0,
            entries: Vec::new(),
            models: Vec::new(),
        }
    }

    /// Reads a table, refusing a file that is not one or is damaged.
    pub fn load(path: &Path) -> Result<Table> {
        let bad = |msg: String| LatencyError::Table {
            path: path.to_path_buf(),
            msg,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("is not JSON (line {}: {e})", e.line())))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(TABLE_FORMAT) {
            return Err(bad(format!(
                "is not a latency table (its `format` is not \"{TABLE_FORMAT}\")"
            )));
        }
        let table: Table = serde_json::from_value(value)
            .map_err(|e| bad(format!("is a damaged latency table: {e}")))?;
        if table.version != TABLE_VERSION {
            return Err(bad(format!(
                "has layout version {}, this Slim reads version {TABLE_VERSION}",
                table.version
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &table.entries {
            let ok = [e.median_ms, e.p25_ms, e.p75_ms]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0);
            if !ok || e.samples == 0 {
                return Err(bad(format!(
                    "has an invalid time for `{}` (median {}, {} samples)",
                    e.signature, e.median_ms, e.samples
                )));
            }
            if !seen.insert(&e.signature) {
                return Err(bad(format!("lists `{}` twice", e.signature)));
            }
            let s = &e.signature;
            let sizes = [s.out_channels, s.stride, s.padding, s.dilation, s.groups]
                .into_iter()
                .flatten()
                .chain(s.kernel.into_iter().flatten());
            let shapes_ok = s
                .inputs
                .iter()
                .chain(std::iter::once(&s.output))
                .all(|shape| slim_core::graph::check_shape(shape).is_ok());
            if !shapes_ok || sizes.into_iter().any(|v| v > slim_core::graph::MAX_DIM) {
                return Err(bad(format!("has an impossible layer `{s}`")));
            }
        }
        if !(table.overhead_per_node_ms.is_finite() && table.overhead_per_node_ms >= 0.0) {
            return Err(bad("has an invalid `overhead_per_node_ms`".into()));
        }
        if table.device.threads == 0 || table.device.batch == 0 {
            return Err(bad("has zero threads or batch".into()));
        }
        if table.device.threads > 4096 || table.device.batch > 65536 {
            return Err(bad(format!(
                "has an impossible device: {} threads, batch {}",
                table.device.threads, table.device.batch
            )));
        }
        Ok(table)
    }

    /// Writes the table atomically (a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LatencyError::Invalid(format!("cannot encode the table: {e}")))?;
        slim_core::io::write_atomic(path, text.as_bytes())?;
        Ok(())
    }

    /// Refuses a table measured for another runtime, thread count or batch than asked.
    /// The table at `path` to add to (checked to be for `runtime`, `threads` and `batch`), or
    /// a new one for this machine when there is none.
    pub fn open_or_new(
        path: &Path,
        runtime: Runtime,
        threads: usize,
        batch: usize,
    ) -> Result<Table> {
        if !path.exists() {
            return Ok(Table::new(DeviceInfo::this_machine(
                runtime, threads, batch,
            )));
        }
        let t = Table::load(path)?;
        t.check(path, runtime)?;
        if (t.device.threads, t.device.batch) != (threads, batch) {
            return Err(LatencyError::Table {
                path: path.to_path_buf(),
                msg: format!(
                    "was measured with {} thread(s) and batch {}, not {threads} and {batch}",
                    t.device.threads, t.device.batch
                ),
            });
        }
        Ok(t)
    }

    pub fn check(&self, path: &Path, runtime: Runtime) -> Result<()> {
        if self.device.runtime != runtime {
            return Err(LatencyError::Table {
                path: path.to_path_buf(),
                msg: format!(
                    "was measured on the {} runtime, not {runtime}",
                    self.device.runtime
                ),
            });
        }
        Ok(())
    }

    pub fn lookup(&self) -> BTreeMap<&Signature, &Entry> {
        self.entries.iter().map(|e| (&e.signature, e)).collect()
    }

    /// A least-squares line `ms = a + b * work` per op family (kind and dtype) over the table's
    /// entries, used for signatures the table lacks when a fallback is asked for.
    pub(crate) fn fits(&self) -> BTreeMap<(String, String), (f64, f64)> {
        let mut groups: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
        for e in &self.entries {
            groups
                .entry(e.signature.family())
                .or_default()
                .push((e.signature.work(), e.median_ms));
        }
        groups
            .into_iter()
            .map(|(k, pts)| {
                let n = pts.len() as f64;
                let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
                let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
                let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
                let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
                let fit = if sxx > 0.0 && sxy > 0.0 {
                    let b = sxy / sxx;
                    let a = (my - b * mx).max(0.0);
                    (a, b)
                } else if mx > 0.0 {
                    // One point, or no trend: proportional to the work.
                    (0.0, my / mx)
                } else {
                    (my, 0.0)
                };
                (k, fit)
            })
            .collect()
    }

    pub(crate) fn fallback(
        fits: &BTreeMap<(String, String), (f64, f64)>,
        s: &Signature,
    ) -> Option<f64> {
        fits.get(&s.family()).map(|(a, b)| a + b * s.work())
    }
}

#[cfg(test)]
mod candle_version {
    /// The lock file's candle-core (the workspace's, or a package's own) is the version the
    /// tables record.
    #[test]
    fn the_recorded_candle_version_is_the_locked_one() {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let lock = [here.join("Cargo.lock"), here.join("../Cargo.lock")]
            .into_iter()
            .find(|p| p.is_file())
            .expect("a Cargo.lock beside the package or its workspace");
        let text = std::fs::read_to_string(&lock).unwrap();
        let mut lines = text.lines();
        let locked = loop {
            let line = lines.next().expect("candle-core in the lock file");
            if line.trim() == "name = \"candle-core\"" {
                break lines.next().unwrap().trim().to_string();
            }
        };
        assert_eq!(
            locked,
            format!("version = \"{}\"", super::CANDLE_VERSION),
            "{}",
            lock.display()
        );
    }
}
