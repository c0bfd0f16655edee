//! ONNX conformance: the `onnx` package's per-op node tests of the ops Slim imports.
//!
//! `tests/ort/node_tests.py` picks every node test whose graph uses only ops of
//! [`slim_onnx::SUPPORTED_OPS`] and writes its model, its first input and its reference
//! outputs (as float32). Slim models take one data input and hold the rest as constants, as
//! real models do; so every graph input but the first (the axes, shapes, scales and pads, a
//! `Conv`'s weight, an `Add`'s second operand) becomes an initializer holding its stored test
//! value. A test whose second operand has the shape of the first (`test_add`) so tests data
//! with a constant, which Slim folds or broadcasts (and refuses where that constant spans the
//! batch axis). Tests whose first input is not float32, or whose outputs are not numeric
//! tensors, are listed as skipped with the reason. Each prepared test is imported into Slim
//! (with the stored input's first axis as the batch, or, where the importer refuses that, as
//! a graph of one sample: `ImportOptions::single_sample`), run in evaluation, and every output compared with the reference: it passes when the
//! element counts agree and every element is within `1e-5 + 1e-3 * |reference|`. The test
//! prints a table by op and the reason of every test that does not pass, and asserts that no
//! fewer tests pass than today, and at least 95% of them.
//!
//! The `onnx` package is Apache-2.0; nothing of it is copied into the repository: the script
//! reads (or, where the wheel no longer ships them, generates) the node tests of the
//! installed package.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use slim_core::exec::ForwardOptions;
use slim_core::Mode;
use slim_onnx::{import_file, ImportOptions, SUPPORTED_OPS};

use common::{python, read_f32, workspace};

/// The node tests (of supported ops, other inputs than the first made initializers) that pass
/// today: 524 of the 547 prepared with `onnx==1.23.2` (the version `tests/common` installs and
/// CI pins; its wheel ships no node test data, so the script generates them). The regression
/// floor: raise it when the importer gets better; at least [`TARGET`] of the prepared tests
/// must pass too.
const PASSES_AT_LEAST: usize = 524;

/// The share of the prepared node tests that must pass.
const TARGET: f64 = 0.95;

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-3;

/// What became of one node test.
enum Outcome {
    Pass,
    /// Ran, but an output differs: why (the largest error, or the shapes).
    Fail(String),
    /// The importer refused the model (its error).
    Refused(String),
    /// Imported, but the forward failed (its error).
    ForwardError(String),
}

/// Whether `a` matches the reference `b` (NaN matches NaN, infinity the same infinity).
fn close(a: f32, b: f32) -> bool {
    a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= ATOL + RTOL * b.abs()
}

fn dims(words: &[&str]) -> Vec<usize> {
    words.iter().map(|w| w.parse().expect("dim")).collect()
}

/// The message of a panic caught in the importer or the forward.
fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
    let what = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "?".into());
    format!("panicked: {what}")
}

/// One line of an error message, short enough for the report.
fn brief(msg: &str) -> String {
    let line = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        format!("{}...", line.chars().take(300).collect::<String>())
    } else {
        line
    }
}

/// A test imported as a model with a batch axis (the first of the stored input's), and,
/// where the importer refuses that, as a graph of one sample (`single_sample`: node tests
/// often compute over every axis of one tensor).
fn run_case(dir: &Path) -> Outcome {
    match attempt(dir, false) {
        Outcome::Refused(batched) => match attempt(dir, true) {
            Outcome::Refused(single) => {
                Outcome::Refused(format!("{batched} (as one sample: {single})"))
            }
            other => other,
        },
        other => other,
    }
}

fn attempt(dir: &Path, single: bool) -> Outcome {
    let shape = dims(
        &std::fs::read_to_string(dir.join("input.txt"))
            .expect("input.txt")
            .split_whitespace()
            .collect::<Vec<_>>(),
    );
    if shape.is_empty() {
        return Outcome::Refused(
            "the input is 0-d (a scalar): a Slim input has a batch axis".into(),
        );
    }
    // One sample is a batch of one.
    let fed: Vec<usize> = if single {
        std::iter::once(1).chain(shape.iter().copied()).collect()
    } else {
        shape.clone()
    };
    let x = Tensor::from_vec(read_f32(&dir.join("input.bin")), fed, &Device::Cpu).expect("input");
    // The stored input's per-sample shape: the model's when it declares one (checked against
    // it), and the only one there is when its shape is symbolic.
    let opts = ImportOptions {
        input_shape: Some(shape[usize::from(!single)..].to_vec()),
        single_sample: single,
        ..Default::default()
    };
    let path = dir.join("model.onnx");
    let model = match catch_unwind(|| import_file(&path, &opts)) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            // Without the file's (temporary) path in front.
            let msg = e.to_string();
            let prefix = format!("{}: ", path.display());
            return Outcome::Refused(brief(msg.strip_prefix(&prefix).unwrap_or(&msg)));
        }
        Err(p) => return Outcome::Refused(panic_message(p)),
    };
    let forward = catch_unwind(AssertUnwindSafe(|| {
        model.forward_with(
            std::slice::from_ref(&x),
            Mode::Eval,
            ForwardOptions::default(),
        )
    }));
    let ys = match forward {
        Ok(Ok(out)) => out.outputs,
        Ok(Err(e)) => return Outcome::ForwardError(brief(&e.to_string())),
        Err(p) => return Outcome::ForwardError(panic_message(p)),
    };
    let listed = std::fs::read_to_string(dir.join("outputs.txt")).expect("outputs.txt");
    let listed: Vec<&str> = listed.lines().filter(|l| !l.trim().is_empty()).collect();
    if ys.len() != listed.len() {
        return Outcome::Fail(format!(
            "{} output(s), the reference has {}",
            ys.len(),
            listed.len()
        ));
    }
    let mut problems = Vec::new();
    for (k, (y, line)) in ys.iter().zip(&listed).enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let want_dims = dims(&words[1..]);
        let want = read_f32(&dir.join(format!("output_{k}.bin")));
        let got: Vec<f32> = match y
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
        {
            Ok(v) => v,
            Err(e) => {
                return Outcome::ForwardError(format!("output {k}: {}", brief(&e.to_string())))
            }
        };
        if got.len() != want.len() {
            problems.push(format!(
                "output {k} `{}`: shape {:?}, the reference's {want_dims:?}",
                words[0],
                y.dims()
            ));
            continue;
        }
        // The largest error, and where.
        let mut worst: Option<(f32, usize)> = None;
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            if !close(a, b) {
                let err = if (a - b).is_nan() {
                    f32::INFINITY
                } else {
                    (a - b).abs()
                };
                if worst.is_none_or(|(w, _)| err > w) {
                    worst = Some((err, i));
                }
            }
        }
        if let Some((err, i)) = worst {
            let bad = got
                .iter()
                .zip(&want)
                .filter(|(&a, &b)| !close(a, b))
                .count();
            let dims = &y.dims()[usize::from(single)..];
            let same_shape = dims == want_dims.as_slice();
            problems.push(format!(
                "output {k} `{}`: {bad} of {} differ, largest error {err:.3e} at {i} (got {}, want {}){}",
                words[0],
                want.len(),
                got[i],
                want[i],
                if same_shape {
                    String::new()
                } else {
                    format!("; shape {:?}, the reference's {want_dims:?}", y.dims())
                }
            ));
        }
    }
    if problems.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail(problems.join("; "))
    }
}

/// Lines `a<TAB>b` of a file the script wrote.
fn pairs(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .expect("list")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (a, b) = l.split_once('\t').unwrap_or((l, ""));
            (a.to_string(), b.to_string())
        })
        .collect()
}

#[derive(Default)]
struct Row {
    pass: usize,
    fail: usize,
    refused: usize,
    error: usize,
    skipped: usize,
}

#[test]
fn onnx_node_tests_of_supported_ops_pass() {
    let Some(py) = python() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let ops_file = tmp.path().join("ops.txt");
    std::fs::write(&ops_file, SUPPORTED_OPS.join("\n") + "\n").expect("write");
    let out_dir = tmp.path().join("node");
    let out = Command::new(py)
        .arg(workspace().join("slim-onnx/tests/ort/node_tests.py"))
        .arg(&out_dir)
        .arg(&ops_file)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "node_tests.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{}", String::from_utf8_lossy(&out.stdout));

    let cases = pairs(&out_dir.join("cases.txt"));
    let skipped = pairs(&out_dir.join("skipped.txt"));
    let op_of: BTreeMap<String, String> = pairs(&out_dir.join("ops.txt")).into_iter().collect();
    assert!(!cases.is_empty(), "no node test was prepared");

    // The importer's and forward's own panics are outcomes here, not the test's failure.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcomes: Vec<(String, String, Outcome)> = cases
        .iter()
        .map(|(name, op)| (name.clone(), op.clone(), run_case(&out_dir.join(name))))
        .collect();
    std::panic::set_hook(hook);

    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (_, op, o) in &outcomes {
        let row = rows.entry(op.clone()).or_default();
        match o {
            Outcome::Pass => row.pass += 1,
            Outcome::Fail(_) => row.fail += 1,
            Outcome::Refused(_) => row.refused += 1,
            Outcome::ForwardError(_) => row.error += 1,
        }
    }
    for (name, _) in &skipped {
        let op = op_of.get(name).cloned().unwrap_or_default();
        rows.entry(op).or_default().skipped += 1;
    }
    let width = rows.keys().map(|k| k.len()).max().unwrap_or(2).max(2);
    eprintln!(
        "\n{:width$} | pass | fail | refused | fwd err | skipped",
        "op"
    );
    eprintln!(
        "{:-<width$}-|------|------|---------|---------|--------",
        ""
    );
    for (op, r) in &rows {
        eprintln!(
            "{op:width$} | {:4} | {:4} | {:7} | {:7} | {:7}",
            r.pass, r.fail, r.refused, r.error, r.skipped
        );
    }
    let count = |f: fn(&Row) -> usize| rows.values().map(f).sum::<usize>();
    let (pass, fail, refused, error) = (
        count(|r| r.pass),
        count(|r| r.fail),
        count(|r| r.refused),
        count(|r| r.error),
    );
    eprintln!(
        "{:width$} | {pass:4} | {fail:4} | {refused:7} | {error:7} | {:7}",
        "total",
        skipped.len()
    );

    eprintln!("\nnot passing:");
    for (name, op, o) in &outcomes {
        let (kind, why) = match o {
            Outcome::Pass => continue,
            Outcome::Fail(w) => ("fail", w),
            Outcome::Refused(w) => ("refused", w),
            Outcome::ForwardError(w) => ("forward error", w),
        };
        eprintln!("  {name} [{op}] {kind}: {why}");
    }
    eprintln!("\nskipped (not prepared):");
    for (name, why) in &skipped {
        eprintln!("  {name}: {why}");
    }

    let prepared = outcomes.len();
    let rate = pass as f64 / prepared as f64;
    let needed = (TARGET * prepared as f64).ceil() as usize;
    let considered = prepared + skipped.len();
    eprintln!(
        "\n{pass} of {prepared} prepared node tests pass ({:.1}%); the {:.0}% target needs {needed}: {} short ({:.1} points)",
        100.0 * rate,
        100.0 * TARGET,
        needed.saturating_sub(pass),
        (100.0 * (TARGET - rate)).max(0.0)
    );
    eprintln!(
        "counting the {} skipped tests of supported ops too: {pass} of {considered} ({:.1}%)",
        skipped.len(),
        100.0 * pass as f64 / considered as f64
    );
    assert!(
        pass >= PASSES_AT_LEAST,
        "{pass} node tests pass, fewer than the {PASSES_AT_LEAST} that passed before"
    );
    assert!(
        pass >= needed,
        "{pass} of {prepared} node tests pass, fewer than {needed} ({:.0}%)",
        100.0 * TARGET
    );
}
