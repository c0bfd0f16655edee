//! The report of a run: every stage's model timed in one sitting (and estimated from the
//! latency tables given), the results table (text, and report.md) and the accuracy-size plot.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use slim_core::analysis::human;
use slim_core::io::write_atomic;
use slim_core::plot::{table, Plot, Series};
use slim_core::Model;

use crate::Result;

/// One row of the results: a stage's model and what it measures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub name: String,
    pub file: PathBuf,
    /// Accuracy on the test split (data with labels).
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    /// Without labels: the first output's top-1 agreement with the baseline (its cosine
    /// similarity for an output that is not a score vector), and its cosine similarity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cosine: Option<f64>,
    pub macs: u64,
    pub params: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// The stage's own report.
    pub info: serde_json::Value,
    /// Estimated from the report's latency table of the model's runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Ops of the model the table lacked, estimated by its fallback fit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub latency_fallback_ops: usize,
    /// Measured: the median milliseconds of a batch-1 forward on Slim's runtime of the model
    /// (f32, or int8), every core, timed as `slim bench` times, every stage in one sitting
    /// after the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_ms: Option<f64>,
    /// The stage the model started from, when not the one before (`init`: fresh weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Timed forwards per stage for the report's measured column.
pub const BENCH_RUNS: usize = 20;

/// The threads a stage's forward is timed with: every core.
fn bench_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The median milliseconds of a batch-1 forward of `model` on Slim's runtime (int8 models on
/// the int8 one), as `slim bench` measures it.
pub fn time_batch_one(model: &Model) -> Result<f64> {
    let kernels = (!model.int8.is_empty()).then(|| slim_quant::runtime::Int8Kernels::new(model));
    let kernels = kernels
        .as_ref()
        .map(|k| k as &dyn slim_core::exec::NodeKernels);
    let opts = slim_latency::BuildOptions {
        runs: BENCH_RUNS,
        warmup: 3,
        warmup_ms: 100.0,
    };
    Ok(slim_latency::bench(model, kernels, 1, bench_threads(), &opts)?.median_ms)
}

/// Every stage's batch-1 forward timed in this sitting, and its latency estimated from the
/// table of its runtime, when given.
pub(crate) fn time_stages(
    stages: &mut [Row],
    tables: &[slim_latency::Table],
    load: &dyn Fn(&Path) -> Result<Model>,
) -> Result<()> {
    for row in stages.iter_mut() {
        let m = load(&row.file)?;
        row.measured_ms = Some(time_batch_one(&m)?);
        let runtime = if m.int8.is_empty() {
            slim_latency::Runtime::F32
        } else {
            slim_latency::Runtime::Int8
        };
        row.latency_ms = match tables.iter().find(|t| t.device.runtime == runtime) {
            Some(t) => {
                let e = slim_latency::estimate(t, &m, true)?;
                row.latency_fallback_ops = e.fallback.len();
                Some(e.total_ms)
            }
            None => None,
        };
    }
    Ok(())
}

/// One stage's cells of the results table.
fn cells(stages: &[Row], i: usize, labeled: bool, branches: bool, latency: bool) -> Vec<String> {
    let (r, base) = (&stages[i], &stages[0]);
    let mut row = vec![r.name.clone()];
    if branches {
        row.push(match (&r.from, i) {
            (_, 0) => "-".into(),
            (Some(f), _) => f.clone(),
            (None, _) => stages[i - 1].name.clone(),
        });
    }
    let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
    let (first, second, now, then) = if labeled {
        (pct(r.top1), pct(r.top5), r.top1, base.top1)
    } else {
        let cosine = r.cosine.map_or("-".into(), |c| format!("{c:.4}"));
        (pct(r.agreement), cosine, r.agreement, base.agreement)
    };
    row.extend([
        first,
        second,
        human(r.macs),
        human(r.params),
        human(r.bytes),
        match (r.name == "baseline", now, then) {
            (false, Some(a), Some(b)) => format!("{:+.2} pt", (a - b) * 100.0),
            _ => "-".into(),
        },
        format!("{:.0}%", r.bytes as f64 / base.bytes.max(1) as f64 * 100.0),
        r.measured_ms.map_or("-".into(), |ms| format!("{ms:.3}")),
        match (r.measured_ms, base.measured_ms) {
            (Some(ms), Some(b)) if ms > 0.0 => format!("{:.2}x", b / ms),
            _ => "-".into(),
        },
    ]);
    if latency {
        row.push(match r.latency_ms {
            Some(ms) if r.latency_fallback_ops > 0 => format!("{ms:.3} ms*"),
            Some(ms) => format!("{ms:.3} ms"),
            None => "-".into(),
        });
    }
    row
}

/// The results table of the stages, as text (returned) and as `report.md` in `dir`.
pub(crate) fn write_table(
    stages: &[Row],
    labeled: bool,
    with_latency: bool,
    dir: &Path,
) -> Result<String> {
    // A pipeline with branches says where each stage started.
    let branches = stages.iter().any(|r| r.from.is_some());
    let rows: Vec<Vec<String>> = (0..stages.len())
        .map(|i| cells(stages, i, labeled, branches, with_latency))
        .collect();
    let mut header = vec!["stage"];
    if branches {
        header.push("from");
    }
    if labeled {
        header.extend(["top-1", "top-5"]);
    } else {
        header.extend(["agreement", "cosine"]);
    }
    header.extend(["MACs", "params", "size"]);
    header.push(if labeled {
        "top-1 change"
    } else {
        "agreement change"
    });
    header.push("of baseline size");
    header.extend(["ms (batch 1)", "speed-up"]);
    if with_latency {
        header.push("est. latency");
    }
    let mut md = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for r in &rows {
        md.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    md.push_str(&format!(
        "\nms (batch 1): the median of {BENCH_RUNS} batch-1 forwards on Slim's runtime ({} \
         kernels, {} thread(s)), every stage timed in one sitting; speed-up against the \
         baseline's.\n",
        slim_core::cpu::level().name(),
        bench_threads()
    ));
    if with_latency {
        md.push_str(
            "\nLatency estimated from the tables given (`*`: some ops by the fallback fit).\n",
        );
    }
    write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(table(&header, &rows))
}

/// Top-1 against file size, one labelled point per stage.
pub(crate) fn plot(rows: &[Row]) -> String {
    // Top-1, or without labels the agreement with the baseline.
    let labeled = rows.iter().any(|r| r.top1.is_some());
    let y_label = if labeled {
        "test top-1 (%)"
    } else {
        "agreement with the baseline (%)"
    };
    let mut plot = Plot::new("accuracy against size", "model file size (KB)", y_label);
    for row in rows {
        let quality = row.top1.or(row.agreement).unwrap_or(0.0);
        let point = (row.bytes as f64 / 1000.0, quality * 100.0);
        plot = plot.series(Series::points(row.name.clone(), vec![point]));
    }
    plot.to_svg()
}
