//! A compressed model beside the model it came from: the figures every method reports
//! (accuracy, or without labels fidelity to the original; multiply-adds, parameters, bytes),
//! measured the same way by each, and the before-and-after table the command line prints.
//!
//! ```
//! use slim_core::compare::{Comparison, Figures};
//! let before = Figures { top1: Some(0.9), macs: 1000, params: 100, bytes: 400, ..Default::default() };
//! let after = Figures { top1: Some(0.89), macs: 500, params: 50, bytes: 200, ..Default::default() };
//! let t = Comparison::new(["before", "after"], &before, &after).table();
//! assert!(t.contains("-1.00 pt") && t.contains("-50.0%"));
//! ```

use std::path::Path;

use serde::Serialize;

use crate::analysis::{analyze, human};
use crate::data::DataSplits;
use crate::error::{CoreError, Result};
use crate::model::Model;
use crate::plot::table;
use crate::train::{
    evaluate, evaluate_with, fidelity, fidelity_with, EvalForward, EvalReport, Fidelity,
};

/// Accuracy (when measured on labels), cost and size of one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    pub top1: Option<f64>,
    pub top5: Option<f64>,
    pub macs: u64,
    pub params: u64,
    /// The size of its file (0 until [`Figures::with_file`]).
    pub bytes: u64,
}

impl Figures {
    /// A model's cost, with its accuracy when it was evaluated.
    pub fn of(model: &Model, eval: Option<&EvalReport>) -> Figures {
        let stats = analyze(&model.graph);
        Figures {
            top1: eval.map(|e| e.top1),
            top5: eval.map(|e| e.top5),
            macs: stats.macs,
            params: stats.params,
            bytes: 0,
        }
    }

    /// With the size of `file`, where the model was read from or written to.
    pub fn with_file(mut self, file: &Path) -> Result<Figures> {
        self.bytes = std::fs::metadata(file)
            .map_err(|source| CoreError::Io {
                path: file.to_path_buf(),
                source,
            })?
            .len();
        Ok(self)
    }
}

/// A changed model measured against its original on the test split.
pub struct Measured {
    /// The original's accuracy (labelled data).
    pub before: Option<EvalReport>,
    /// The changed model's accuracy (labelled data).
    pub after: Option<EvalReport>,
    /// Without labels: the changed model's agreement with the original.
    pub fidelity: Option<Fidelity>,
}

/// Measures `changed` against `original` on `data`'s test split: both models' accuracy on the
/// labels, or (`label_free`, or data without labels) the changed model's fidelity to the
/// original. `forward` computes the changed model (another runtime: int8); `None`, its own.
pub fn measure(
    changed: &Model,
    original: &Model,
    data: &DataSplits,
    label_free: bool,
    forward: Option<&EvalForward<'_>>,
) -> Result<Measured> {
    let (set, norm) = (&data.test, &data.normalize);
    if label_free || !set.is_labeled() {
        let f = match forward {
            Some(fw) => fidelity_with(changed, original, set, norm, 256, &|m, x| {
                Ok(vec![fw(m, x)?])
            })?,
            None => fidelity(changed, original, set, norm, 256)?,
        };
        return Ok(Measured {
            before: None,
            after: None,
            fidelity: Some(f),
        });
    }
    Ok(Measured {
        before: Some(evaluate(original, set, norm, 256)?),
        after: Some(match forward {
            Some(fw) => evaluate_with(changed, set, norm, 256, fw)?,
            None => evaluate(changed, set, norm, 256)?,
        }),
        fidelity: None,
    })
}

/// The before-and-after table of a method: top-1 (or, without labels, the fidelity rows),
/// multiply-adds and parameters (unless left out) and bytes, each with its change.
pub struct Comparison<'a> {
    header: [&'a str; 2],
    before: &'a Figures,
    after: &'a Figures,
    fidelity: Option<&'a Fidelity>,
    cost: bool,
}

impl<'a> Comparison<'a> {
    /// The two columns' names (`before`, `after`; `f32`, `int8`) and their figures.
    pub fn new(header: [&'a str; 2], before: &'a Figures, after: &'a Figures) -> Self {
        Comparison {
            header,
            before,
            after,
            fidelity: None,
            cost: true,
        }
    }

    /// Shows the fidelity to the original in place of top-1.
    pub fn fidelity(mut self, f: Option<&'a Fidelity>) -> Self {
        self.fidelity = f;
        self
    }

    /// Leaves out the multiply-adds and parameters (a method that does not change them).
    pub fn without_cost(mut self) -> Self {
        self.cost = false;
        self
    }

    pub fn table(&self) -> String {
        let (b, a) = (self.before, self.after);
        let pct = |v: Option<f64>| v.map_or("-".into(), |t| format!("{:.2}%", t * 100.0));
        let change =
            |x: u64, y: u64| format!("{:+.1}%", (y as f64 / (x as f64).max(1e-12) - 1.0) * 100.0);
        let mut rows = match self.fidelity {
            // Without labels there is no top-1: the model's fidelity to the original.
            Some(f) => f
                .rows()
                .into_iter()
                .map(|(label, value)| vec![label, "100%".into(), value, "-".into()])
                .collect(),
            None => vec![vec![
                "top-1".to_string(),
                pct(b.top1),
                pct(a.top1),
                match (b.top1, a.top1) {
                    (Some(x), Some(y)) => format!("{:+.2} pt", (y - x) * 100.0),
                    _ => "-".into(),
                },
            ]],
        };
        let mut size = |label: &str, x: u64, y: u64| {
            rows.push(vec![label.into(), human(x), human(y), change(x, y)]);
        };
        if self.cost {
            size("MACs", b.macs, a.macs);
            size("params", b.params, a.params);
        }
        size("bytes", b.bytes, a.bytes);
        table(&["", self.header[0], self.header[1], "change"], &rows)
    }
}
