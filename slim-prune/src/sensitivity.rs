//! Sensitivity analysis: how much accuracy the model loses when one channel group is pruned
//! at a given ratio, for each group in scope and each ratio of a list.
//!
//! Results live in a human-readable JSON file ([`Sensitivities`]) that is rewritten
//! (atomically) after every point, so a killed analysis resumes where it stopped. The file
//! records the fingerprint of the model and of the evaluation data, and the criterion; a
//! file made for another model, other data or another criterion is refused rather than
//! mixed. Points are evaluated in parallel (rayon). Several files about the same model merge.
//!
//! The loss of a point is relative: `(top1(baseline) - top1(pruned)) / top1(baseline)`.
//!
//! From the curves, [`ratios_for_reduction`] picks per-group ratios that reach a FLOPs
//! target with the least predicted loss, and [`ratios_for_loss`] the ones that remove the most
//! multiply-adds while the predicted loss stays within a budget. The prediction adds the
//! groups' losses, each read off its curve (linear between measured ratios, made
//! non-decreasing: pruning more is never predicted to help). The choice is greedy: at each
//! step the group whose next ratio costs the least predicted loss per multiply-add removed
//! moves on, without passing the target while a move that stays short of it remains (so the
//! result lands close to the target); then ratios are eased back where the target allows.
//! Ratios never go beyond the largest one measured, and a group always keeps a channel.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use slim_core::io::write_atomic;
use slim_core::search::Evaluator;

use crate::criterion::Criterion;
use crate::pruner::{check_ratio, check_reduction, kept_channels, Pruner, Ratios};
use crate::{PruneError, Result};

/// The `format` field of a sensitivity file.
pub const FORMAT: &str = "slim-sensitivity/1";

/// The ratios analysed when none are given: 0.1, 0.2, ..., 0.9.
pub fn default_ratios() -> Vec<f64> {
    (1..10).map(|i| i as f64 / 10.0).collect()
}

/// One measured point of a group's curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub ratio: f64,
    /// Channels kept at this ratio.
    pub kept: usize,
    pub top1: f64,
    /// Relative accuracy loss against the baseline.
    pub loss: f64,
}

/// A group's sensitivity curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Curve {
    pub channels: usize,
    /// Sorted by ratio.
    pub points: Vec<Point>,
}

/// The content of a sensitivity file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sensitivities {
    pub format: String,
    /// Fingerprint of the analysed model ([`slim_core::Model::fingerprint`]).
    pub model: String,
    /// What the evaluation data is, for people.
    pub data: String,
    /// Fingerprint of the evaluation images and labels.
    pub data_fingerprint: String,
    pub criterion: Criterion,
    /// Images that recalibrated batch norms after each pruning (0: none).
    #[serde(default)]
    pub bn_calibration: usize,
    /// Top-1 of the unpruned model on the evaluation data.
    pub baseline: f64,
    /// Curves by group key (the group's first producing layer).
    pub groups: BTreeMap<String, Curve>,
}

/// What an analysis reports as it goes.
#[derive(Clone, Debug)]
pub enum SensitivityProgress {
    /// Points already in the file, and how many there are to do in all.
    Start { done: usize, total: usize },
    /// One more point measured.
    Point {
        group: String,
        ratio: f64,
        top1: f64,
        loss: f64,
        done: usize,
        total: usize,
    },
}

/// What the data the analysis evaluates on is: a description and a fingerprint.
#[derive(Clone, Debug)]
pub struct EvalData {
    pub description: String,
    pub fingerprint: String,
}

impl Sensitivities {
    /// The losses as a table, a row per group and a column per ratio measured (in % of the
    /// baseline's top-1), under a line that says what they are.
    pub fn table(&self) -> String {
        let mut ratios: Vec<f64> = self
            .groups
            .values()
            .flat_map(|c| c.points.iter().map(|p| p.ratio))
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
        let mut header: Vec<String> = vec!["group".into(), "channels".into()];
        header.extend(ratios.iter().map(|r| format!("{r:.2}")));
        let rows: Vec<Vec<String>> = self
            .groups
            .iter()
            .map(|(k, c)| {
                let mut row = vec![k.clone(), c.channels.to_string()];
                row.extend(ratios.iter().map(|r| {
                    c.points
                        .iter()
                        .find(|p| (p.ratio - r).abs() < 1e-9)
                        .map(|p| format!("{:.2}", p.loss * 100.0))
                        .unwrap_or_default()
                }));
                row
            })
            .collect();
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        format!(
            "top-1 loss (% of the baseline's {:.2}%) by pruning ratio:\n{}",
            self.baseline * 100.0,
            slim_core::plot::table(&header, &rows)
        )
    }

    /// The sensitivity files of `model` (each checked against its fingerprint), merged;
    /// `None` for no files.
    pub fn load_for(
        files: &[std::path::PathBuf],
        model: &slim_core::Model,
    ) -> Result<Option<Self>> {
        if files.is_empty() {
            return Ok(None);
        }
        let fingerprint = model.fingerprint()?;
        let mut all = Vec::new();
        for f in files {
            let s = Sensitivities::load(f)?;
            s.check_model(&fingerprint, f)?;
            all.push(s);
        }
        Ok(Some(Sensitivities::merge(all)?))
    }

    pub fn load(path: &Path) -> Result<Sensitivities> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            PruneError::Invalid(format!(
                "cannot read sensitivity file {}: {e}",
                path.display()
            ))
        })?;
        let s: Sensitivities = serde_json::from_str(&text).map_err(|e| {
            PruneError::Invalid(format!("{} is not a sensitivity file: {e}", path.display()))
        })?;
        if s.format != FORMAT {
            return Err(PruneError::Invalid(format!(
                "{}: format `{}`, expected `{FORMAT}`",
                path.display(),
                s.format
            )));
        }
        s.check()
            .map_err(|e| PruneError::Invalid(format!("{} is damaged: {e}", path.display())))?;
        Ok(s)
    }

    /// Refuses values an analysis cannot have written: a top-1 outside [0, 1], a ratio
    /// outside [0, 1), more channels kept than the group has, a loss that does not follow
    /// from the top-1 and the baseline.
    fn check(&self) -> std::result::Result<(), String> {
        let unit = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if !unit(self.baseline) {
            return Err(format!("the baseline top-1 is {}", self.baseline));
        }
        for (key, c) in &self.groups {
            if c.channels == 0 {
                return Err(format!("group `{key}` has no channels"));
            }
            for p in &c.points {
                let expected = if self.baseline > 0.0 {
                    (self.baseline - p.top1) / self.baseline
                } else {
                    0.0
                };
                let why = if !(p.ratio.is_finite() && (0.0..1.0).contains(&p.ratio)) {
                    Some("its ratio is outside [0, 1)")
                } else if p.kept == 0 || p.kept > c.channels {
                    Some("it keeps more channels than the group has, or none")
                } else if !unit(p.top1) {
                    Some("its top-1 is outside [0, 1]")
                } else if !(p.loss.is_finite() && (p.loss - expected).abs() <= 1e-6) {
                    Some("its loss does not follow from its top-1 and the baseline")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(format!("group `{key}`, point at ratio {}: {why}", p.ratio));
                }
            }
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| PruneError::Invalid(format!("cannot serialize sensitivities: {e}")))?;
        write_atomic(path, text.as_bytes())?;
        Ok(())
    }

    /// Refuses a file made for another model (by fingerprint).
    pub fn check_model(&self, fingerprint: &str, path: &Path) -> Result<()> {
        if self.model != fingerprint {
            return Err(PruneError::Invalid(format!(
                "{} holds sensitivities of another model (fingerprint {}, this model {})",
                path.display(),
                self.model,
                fingerprint
            )));
        }
        Ok(())
    }

    /// Merges several analyses of one model on one data set with one criterion; a point
    /// measured in several files is taken from the first.
    pub fn merge(all: Vec<Sensitivities>) -> Result<Sensitivities> {
        let mut iter = all.into_iter();
        let mut out = iter
            .next()
            .ok_or_else(|| PruneError::Invalid("no sensitivity files to merge".into()))?;
        for s in iter {
            if s.model != out.model {
                return Err(PruneError::Invalid(format!(
                    "cannot merge sensitivities of two models ({} and {})",
                    out.model, s.model
                )));
            }
            if s.data_fingerprint != out.data_fingerprint
                || s.criterion != out.criterion
                || s.bn_calibration != out.bn_calibration
            {
                return Err(PruneError::Invalid(format!(
                    "cannot merge sensitivities measured on other data or with another \
                     criterion or calibration ({} with {}, {} with {})",
                    out.data, out.criterion, s.data, s.criterion
                )));
            }
            for (key, curve) in s.groups {
                let entry = out.groups.entry(key).or_insert_with(|| Curve {
                    channels: curve.channels,
                    points: Vec::new(),
                });
                for p in curve.points {
                    if !entry.points.iter().any(|q| same_ratio(q.ratio, p.ratio)) {
                        entry.points.push(p);
                    }
                }
                entry.points.sort_by(|a, b| {
                    a.ratio
                        .partial_cmp(&b.ratio)
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
            }
        }
        Ok(out)
    }

    fn has_point(&self, key: &str, ratio: f64) -> bool {
        self.groups
            .get(key)
            .is_some_and(|c| c.points.iter().any(|p| same_ratio(p.ratio, ratio)))
    }

    fn insert(&mut self, key: &str, channels: usize, point: Point) {
        let c = self.groups.entry(key.to_string()).or_insert_with(|| Curve {
            channels,
            points: Vec::new(),
        });
        c.points.push(point);
        c.points.sort_by(|a, b| {
            a.ratio
                .partial_cmp(&b.ratio)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
    }

    /// The number of measured points.
    pub fn len(&self) -> usize {
        self.groups.values().map(|c| c.points.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn same_ratio(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// The analysis kept in `file`, when it is there: of this model, on the same data, with the
/// same criterion and batch-norm calibration (else refused, naming what differs).
fn resumed(
    file: Option<&Path>,
    fingerprint: &str,
    pruner: &Pruner<'_>,
    data: &EvalData,
) -> Result<Option<Sensitivities>> {
    Ok(match file.filter(|f| f.exists()) {
        Some(f) => {
            let s = Sensitivities::load(f)?;
            s.check_model(fingerprint, f)?;
            if s.data_fingerprint != data.fingerprint {
                return Err(PruneError::Invalid(format!(
                    "{} was measured on other data ({}); this run evaluates on {}",
                    f.display(),
                    s.data,
                    data.description
                )));
            }
            if s.criterion != pruner.criterion() {
                return Err(PruneError::Invalid(format!(
                    "{} was measured with the {} criterion, not {}",
                    f.display(),
                    s.criterion,
                    pruner.criterion()
                )));
            }
            if s.bn_calibration != pruner.calibration_images() {
                return Err(PruneError::Invalid(format!(
                    "{} was measured with {} batch-norm calibration images, this run uses {}",
                    f.display(),
                    s.bn_calibration,
                    pruner.calibration_images()
                )));
            }
            Some(s)
        }
        None => None,
    })
}

/// Measures the sensitivity of every group in scope at every ratio. With `file`, points
/// already there are kept (after checking that the file is about this model, data and
/// criterion) and the file is rewritten after every new point.
pub fn analyze(
    pruner: &Pruner<'_>,
    evaluator: &dyn Evaluator,
    ratios: &[f64],
    data: &EvalData,
    file: Option<&Path>,
    progress: &(dyn Fn(SensitivityProgress) + Sync),
) -> Result<Sensitivities> {
    if ratios.is_empty() {
        return Err(PruneError::Invalid("no ratios to analyse".into()));
    }
    for &r in ratios {
        check_ratio(r)?;
    }
    let fingerprint = pruner.model().fingerprint()?;
    let existing = resumed(file, &fingerprint, pruner, data)?;
    let sens = match existing {
        Some(s) => s,
        None => {
            let baseline = evaluator.score(pruner.model())?;
            let s = Sensitivities {
                format: FORMAT.into(),
                model: fingerprint,
                data: data.description.clone(),
                data_fingerprint: data.fingerprint.clone(),
                criterion: pruner.criterion(),
                bn_calibration: pruner.calibration_images(),
                baseline,
                groups: BTreeMap::new(),
            };
            if let Some(f) = file {
                s.save(f)?;
            }
            s
        }
    };
    let todo: Vec<(usize, f64)> = pruner
        .scope()
        .iter()
        .flat_map(|&g| ratios.iter().map(move |&r| (g, r)))
        .filter(|&(g, r)| !sens.has_point(&pruner.key(g), r))
        .collect();
    let total = pruner.scope().len() * ratios.len();
    progress(SensitivityProgress::Start {
        done: total - todo.len(),
        total,
    });
    let baseline = sens.baseline;
    let state = Mutex::new((sens, total - todo.len()));
    todo.par_iter().try_for_each(|&(g, ratio)| -> Result<()> {
        let pruned = pruner.apply(&Ratios::from([(g, ratio)]))?;
        let top1 = evaluator.score(&pruned)?;
        let loss = if baseline > 0.0 {
            (baseline - top1) / baseline
        } else {
            0.0
        };
        let key = pruner.key(g);
        let channels = pruner.group(g).channels;
        let mut guard = state.lock().map_err(|_| {
            PruneError::Invalid("a sensitivity worker failed while holding the results".into())
        })?;
        guard.0.insert(
            &key,
            channels,
            Point {
                ratio,
                kept: kept_channels(channels, ratio),
                top1,
                loss,
            },
        );
        guard.1 += 1;
        if let Some(f) = file {
            guard.0.save(f)?;
        }
        progress(SensitivityProgress::Point {
            group: key,
            ratio,
            top1,
            loss,
            done: guard.1,
            total,
        });
        Ok(())
    })?;
    let (sens, _) = state
        .into_inner()
        .map_err(|_| PruneError::Invalid("a sensitivity worker failed".into()))?;
    Ok(sens)
}

/// A group's predicted loss as a function of the ratio: linear between measured points
/// (0 at ratio 0), non-decreasing, never negative; `None` beyond the largest measured ratio.
struct LossCurve {
    points: Vec<(f64, f64)>,
}

impl LossCurve {
    fn new(curve: &Curve) -> Self {
        let mut points = vec![(0.0, 0.0)];
        let mut running = 0.0f64;
        for p in &curve.points {
            running = running.max(p.loss);
            points.push((p.ratio, running));
        }
        LossCurve { points }
    }
    fn max_ratio(&self) -> f64 {
        self.points.last().map(|p| p.0).unwrap_or(0.0)
    }
    fn at(&self, r: f64) -> f64 {
        for w in self.points.windows(2) {
            let ((r0, l0), (r1, l1)) = (w[0], w[1]);
            if r <= r1 + 1e-12 {
                let t = if r1 > r0 { (r - r0) / (r1 - r0) } else { 1.0 };
                return l0 + t.clamp(0.0, 1.0) * (l1 - l0);
            }
        }
        self.points.last().map(|p| p.1).unwrap_or(0.0)
    }
}

/// Ratio steps a group may take: every distinct channel count up to its largest measured
/// ratio, as the smallest ratio that gives it.
fn steps(channels: usize, max_ratio: f64) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    let mut last = channels;
    let n = (max_ratio * 1000.0).round() as usize;
    for i in 1..=n {
        let r = i as f64 / 1000.0;
        let k = kept_channels(channels, r);
        if k < last {
            out.push(r);
            last = k;
        }
    }
    out
}

enum Goal {
    Reduction(f64),
    LossBudget(f64),
}

/// Each group in scope with its loss curve and its measured ratios.
type Curves = Vec<(usize, LossCurve, Vec<f64>)>;

fn curves(sens: &Sensitivities, pruner: &Pruner<'_>) -> Result<Curves> {
    pruner
        .scope()
        .iter()
        .map(|&g| {
            let key = pruner.key(g);
            let curve = sens.groups.get(&key).ok_or_else(|| {
                PruneError::Invalid(format!(
                    "group `{key}` is in scope but the sensitivity file has no curve for it; \
                     analyse it, or narrow the scope"
                ))
            })?;
            let lc = LossCurve::new(curve);
            let st = steps(pruner.group(g).channels, lc.max_ratio());
            Ok((g, lc, st))
        })
        .collect()
}

/// Undoes steps of `ratios`, the most predicted loss saved first, while the MACs stay within
/// `target_macs`.
fn ease_back(curves: &Curves, pruner: &Pruner<'_>, ratios: &mut Ratios, target_macs: f64) {
    loop {
        let mut best: Option<(f64, usize, f64)> = None;
        for (g, lc, st) in curves {
            let cur = ratios[g];
            let Some(&prev) = st.iter().rev().find(|&&r| r < cur - 1e-12) else {
                if cur > 0.0 {
                    let mut trial = ratios.clone();
                    trial.insert(*g, 0.0);
                    if pruner.predict_macs(&trial) as f64 <= target_macs {
                        let saved = lc.at(cur);
                        if best.is_none_or(|b| saved > b.0) {
                            best = Some((saved, *g, 0.0));
                        }
                    }
                }
                continue;
            };
            let mut trial = ratios.clone();
            trial.insert(*g, prev);
            if pruner.predict_macs(&trial) as f64 <= target_macs {
                let saved = lc.at(cur) - lc.at(prev);
                if best.is_none_or(|b| saved > b.0) {
                    best = Some((saved, *g, prev));
                }
            }
        }
        match best {
            Some((_, g, r)) => {
                ratios.insert(g, r);
            }
            None => break,
        }
    }
}

fn greedy(sens: &Sensitivities, pruner: &Pruner<'_>, goal: Goal) -> Result<Ratios> {
    let curves = curves(sens, pruner)?;
    let mut ratios: Ratios = curves.iter().map(|(g, _, _)| (*g, 0.0)).collect();
    let base = pruner.base_macs() as f64;
    let target_macs = match goal {
        Goal::Reduction(t) => base * (1.0 - t),
        Goal::LossBudget(_) => 0.0,
    };
    let total_loss = |r: &Ratios| -> f64 { curves.iter().map(|(g, lc, _)| lc.at(r[g])).sum() };
    let mut macs = pruner.predict_macs(&ratios) as f64;
    while macs > target_macs {
        let loss_now = total_loss(&ratios);
        // The best move that stays above the target (least loss per multiply-add removed,
        // then the most removed), and, for when every move would pass the target, the one
        // with the least loss among those that land within 1% of it (else the one that
        // passes it by the least).
        let mut best_fit: Option<(f64, f64, usize, f64)> = None;
        let mut best_over: Option<(f64, f64, usize, f64)> = None;
        for (g, lc, st) in &curves {
            let cur = ratios[g];
            for &r in st.iter().filter(|&&r| r > cur + 1e-12) {
                let mut trial = ratios.clone();
                trial.insert(*g, r);
                let after = pruner.predict_macs(&trial) as f64;
                let removed = macs - after;
                if removed <= 0.0 {
                    continue;
                }
                let dl = lc.at(r) - lc.at(cur);
                if let Goal::LossBudget(b) = goal {
                    if loss_now + dl > b + 1e-12 {
                        continue;
                    }
                }
                if after >= target_macs {
                    let score = dl / removed;
                    let better = best_fit.is_none_or(|(s, neg_removed, _, _)| {
                        score < s - 1e-15 || (score <= s + 1e-15 && -removed < neg_removed)
                    });
                    if better {
                        best_fit = Some((score, -removed, *g, r));
                    }
                } else {
                    // Within 1% of the target, the least loss; else the least overshoot.
                    let over = target_macs - after;
                    let key = if over <= 0.01 * base {
                        (0.0, dl)
                    } else {
                        (1.0, over)
                    };
                    let better = best_over
                        .is_none_or(|(a, b, _, _)| key.0 < a || (key.0 == a && key.1 < b - 1e-12));
                    if better {
                        best_over = Some((key.0, key.1, *g, r));
                    }
                }
            }
        }
        let Some((_, _, g, r)) = best_fit.or(best_over) else {
            break;
        };
        ratios.insert(g, r);
        macs = pruner.predict_macs(&ratios) as f64;
    }
    if let Goal::Reduction(t) = goal {
        if macs > target_macs + 1e-9 {
            let got = 1.0 - macs / base;
            return Err(PruneError::Invalid(format!(
                "a FLOPs reduction of {:.1}% cannot be reached within the measured ratios: \
                 the most they remove is {:.1}% (measure larger ratios, or aim lower)",
                t * 100.0,
                got * 100.0
            )));
        }
        ease_back(&curves, pruner, &mut ratios, target_macs);
    }
    Ok(ratios)
}

/// Per-group ratios that reach a FLOPs `reduction` with the least predicted loss.
pub fn ratios_for_reduction(
    sens: &Sensitivities,
    pruner: &Pruner<'_>,
    reduction: f64,
) -> Result<Ratios> {
    check_reduction(reduction)?;
    greedy(sens, pruner, Goal::Reduction(reduction))
}

/// Per-group ratios that remove the most multiply-adds while the predicted relative loss
/// (summed over groups) stays within `budget` (0.01: one percent of the baseline's top-1).
pub fn ratios_for_loss(sens: &Sensitivities, pruner: &Pruner<'_>, budget: f64) -> Result<Ratios> {
    if !(budget > 0.0 && budget < 1.0) {
        return Err(PruneError::Invalid(format!(
            "a loss budget must be in (0, 1), not {budget}"
        )));
    }
    greedy(sens, pruner, Goal::LossBudget(budget))
}

/// The predicted relative loss of `ratios` (the sum of the groups' curve values).
pub fn predicted_loss(sens: &Sensitivities, pruner: &Pruner<'_>, ratios: &Ratios) -> Result<f64> {
    let curves = curves(sens, pruner)?;
    Ok(curves
        .iter()
        .map(|(g, lc, _)| lc.at(ratios.get(g).copied().unwrap_or(0.0)))
        .sum())
}

/// An SVG plot of every group's curve: relative loss (%) against ratio.
pub fn to_svg(sens: &Sensitivities) -> String {
    use slim_core::plot::{Plot, Series};
    let title = format!(
        "Sensitivity ({}, baseline top-1 {:.2}%)",
        sens.criterion,
        sens.baseline * 100.0
    );
    let mut plot = Plot::new(&title, "pruning ratio", "top-1 loss (% of baseline)");
    for (key, curve) in &sens.groups {
        let points = std::iter::once((0.0, 0.0))
            .chain(curve.points.iter().map(|p| (p.ratio, p.loss * 100.0)))
            .collect();
        plot = plot.series(Series::line(format!("{key} ({})", curve.channels), points));
    }
    plot.to_svg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sens(loss: f64, top1: f64, baseline: f64) -> Sensitivities {
        Sensitivities {
            format: FORMAT.into(),
            model: "m".into(),
            data: "d".into(),
            data_fingerprint: "f".into(),
            criterion: Criterion::L1Norm,
            bn_calibration: 0,
            baseline,
            groups: [(
                "conv1".to_string(),
                Curve {
                    channels: 8,
                    points: vec![Point {
                        ratio: 0.5,
                        kept: 4,
                        top1,
                        loss,
                    }],
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn a_wide_loss_range_plots_with_a_few_ticks() {
        // A gain of 99,900% (a near-zero baseline): once a plot of millions of tick lines.
        let s = sens(-999.0, 0.5, 0.0005);
        assert!(s.check().is_ok());
        let svg = to_svg(&s);
        assert!(svg.len() < 20_000, "{} bytes", svg.len());
        assert!(svg.matches("stroke=\"#ddd\"").count() <= 10);
    }

    #[test]
    fn impossible_points_are_refused() {
        assert!(sens(0.5, 0.4, 0.8).check().is_ok());
        let bad = [
            sens(66666666666666.0, 0.4, 0.8),
            sens(f64::NAN, 0.4, 0.8),
            sens(0.5, 1.4, 0.8),
            sens(0.5, 0.4, 1.8),
        ];
        for s in bad {
            assert!(s.check().is_err(), "{s:?}");
        }
        let mut s = sens(0.5, 0.4, 0.8);
        s.groups.get_mut("conv1").unwrap().points[0].ratio = 1.25;
        assert!(s.check().unwrap_err().contains("ratio"));
        let mut s = sens(0.5, 0.4, 0.8);
        s.groups.get_mut("conv1").unwrap().points[0].kept = 10;
        assert!(s.check().unwrap_err().contains("channels"));
    }
}
