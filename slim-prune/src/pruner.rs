//! The pruner: a model, its channel groups, a scope and a criterion; plans of per-group ratios,
//! their predicted cost, and the surgery that carries them out.
//!
//! A **ratio** is the fraction of a group's channels to remove: a group of `c` channels keeps
//! `c - round(c * ratio)` of them, and never fewer than one, so no ratio removes a whole group.
//! A **FLOPs reduction** is `1 - MACs(after) / MACs(before)` over the whole model.

use std::collections::BTreeMap;

use serde::Serialize;
use slim_core::analysis::analyze;
use slim_core::data::{ImageSet, Normalize};
use slim_core::deps::{channel_groups, ChannelGroup, ChannelGroups};
use slim_core::params::matches_pattern;
use slim_core::train::recalibrate_batch_norm;
use slim_core::Model;

use crate::criterion::{importance, top_channels, Criterion};
use crate::{PruneError, Result};

/// Per-group ratios, by group id.
pub type Ratios = BTreeMap<usize, f64>;

/// A group the scope selected but that cannot be pruned, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub group: String,
    pub channels: usize,
    pub reason: String,
}

/// Images whose batch statistics replace every batch norm's running statistics after
/// pruning (see [`slim_core::train::recalibrate_batch_norm`]).
#[derive(Clone, Debug)]
pub struct Calibration {
    pub set: ImageSet,
    pub normalize: Normalize,
    pub batch_size: usize,
}

/// A model ready to be pruned.
pub struct Pruner<'m> {
    calibration: Option<Calibration>,
    model: &'m Model,
    groups: ChannelGroups,
    criterion: Criterion,
    scope: Vec<usize>,
    skipped: Vec<Skipped>,
    importance: BTreeMap<usize, Vec<f64>>,
    base_macs: u64,
}

/// How many channels a group of `channels` keeps at `ratio`.
pub fn kept_channels(channels: usize, ratio: f64) -> usize {
    let removed = (channels as f64 * ratio).round() as usize;
    channels.saturating_sub(removed).max(1)
}

/// Checks that a pruning ratio is in (0, 1).
pub fn check_ratio(ratio: f64) -> Result<()> {
    if ratio > 0.0 && ratio < 1.0 {
        Ok(())
    } else {
        Err(PruneError::Invalid(format!(
            "a pruning ratio must be in (0, 1), not {ratio}"
        )))
    }
}

/// Checks that a FLOPs reduction target is in (0, 1).
pub fn check_reduction(reduction: f64) -> Result<()> {
    if reduction > 0.0 && reduction < 1.0 {
        Ok(())
    } else {
        Err(PruneError::Invalid(format!(
            "a FLOPs reduction must be in (0, 1) (0.5 removes half the multiply-adds), \
             not {reduction}"
        )))
    }
}

/// A stable name for a group: its first producer (each producer belongs to one group only).
pub fn group_key(group: &ChannelGroup) -> String {
    group
        .producers
        .first()
        .cloned()
        .unwrap_or_else(|| format!("group{}", group.id))
}

impl<'m> Pruner<'m> {
    /// Channel groups of `model` selected by `scope` (glob patterns over the names of the
    /// layers that produce a group's channels, or of their parameters; empty: every group). A pattern that matches no node or parameter is an error;
    /// a selected group that cannot be pruned is kept in [`Pruner::skipped`] with the reason.
    pub fn new(model: &'m Model, criterion: Criterion, scope: &[String]) -> Result<Self> {
        let groups = channel_groups(&model.graph);
        for p in scope {
            let hits_node = model
                .graph
                .nodes()
                .iter()
                .any(|n| matches_pattern(p, &n.name));
            let hits_param = model.params.names().any(|n| matches_pattern(p, n));
            if !hits_node && !hits_param {
                return Err(PruneError::Invalid(format!(
                    "the scope pattern `{p}` matches no layer or parameter of the model"
                )));
            }
        }
        let selected = |g: &ChannelGroup| {
            scope.is_empty()
                || scope.iter().any(|p| {
                    g.producers.iter().any(|n| matches_pattern(p, n))
                        || g.members
                            .iter()
                            .any(|m| g.producers.contains(&m.node) && matches_pattern(p, &m.param))
                })
        };
        let mut in_scope = Vec::new();
        let mut skipped = Vec::new();
        for g in &groups.groups {
            if !selected(g) || g.producers.is_empty() {
                continue;
            }
            if g.is_prunable() {
                in_scope.push(g.id);
            } else {
                let reason = match &g.blocked {
                    Some(b) => format!("blocked by `{}` ({}): {}", b.node, b.op, b.reason),
                    None => "a single channel".into(),
                };
                skipped.push(Skipped {
                    group: group_key(g),
                    channels: g.channels,
                    reason,
                });
            }
        }
        if in_scope.is_empty() {
            return Err(PruneError::Invalid(if scope.is_empty() {
                "the model has no prunable channel group".to_string()
            } else {
                format!(
                    "the scope {} selects no prunable channel group",
                    scope.join(" ")
                )
            }));
        }
        let mut importance_map = BTreeMap::new();
        for &gid in &in_scope {
            importance_map.insert(gid, importance(model, &groups.groups[gid], criterion)?);
        }
        let base_macs = analyze(&model.graph).macs;
        Ok(Pruner {
            calibration: None,
            model,
            groups,
            criterion,
            scope: in_scope,
            skipped,
            importance: importance_map,
            base_macs,
        })
    }

    /// Recompute batch-norm statistics of every pruned model on these images.
    pub fn with_calibration(mut self, calibration: Calibration) -> Self {
        self.calibration = Some(calibration);
        self
    }

    /// How many images recalibrate batch norms after pruning (0: none).
    pub fn calibration_images(&self) -> usize {
        self.calibration.as_ref().map_or(0, |c| c.set.labels.len())
    }

    pub fn model(&self) -> &Model {
        self.model
    }
    pub fn criterion(&self) -> Criterion {
        self.criterion
    }
    pub fn groups(&self) -> &ChannelGroups {
        &self.groups
    }
    /// Ids of the prunable groups in scope, in graph order.
    pub fn scope(&self) -> &[usize] {
        &self.scope
    }
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
    pub fn group(&self, id: usize) -> &ChannelGroup {
        &self.groups.groups[id]
    }
    pub fn key(&self, id: usize) -> String {
        group_key(self.group(id))
    }
    /// The group in scope with this key.
    pub fn id_of(&self, key: &str) -> Option<usize> {
        self.scope.iter().copied().find(|&g| self.key(g) == key)
    }
    /// The model's multiply-accumulates before pruning.
    pub fn base_macs(&self) -> u64 {
        self.base_macs
    }
    /// The importance of each channel of a group in scope.
    pub fn importance(&self, id: usize) -> Option<&[f64]> {
        self.importance.get(&id).map(|v| v.as_slice())
    }

    /// The same ratio for every group in scope.
    pub fn uniform(&self, ratio: f64) -> Ratios {
        self.scope.iter().map(|&g| (g, ratio)).collect()
    }

    fn check(&self, ratios: &Ratios) -> Result<()> {
        for (&g, &r) in ratios {
            if !self.scope.contains(&g) {
                return Err(PruneError::Invalid(format!(
                    "group {g} is not a prunable group in scope"
                )));
            }
            if !(0.0..1.0).contains(&r) {
                return Err(PruneError::Invalid(format!(
                    "group `{}`: a pruning ratio must be in [0, 1), not {r}",
                    self.key(g)
                )));
            }
        }
        Ok(())
    }

    /// MACs after pruning at `ratios`, predicted from the channel counts (no surgery).
    pub fn predict_macs(&self, ratios: &Ratios) -> u64 {
        let kept = ratios
            .iter()
            .map(|(&g, &r)| (g, kept_channels(self.group(g).channels, r)))
            .collect();
        self.groups.predict_macs(&kept)
    }

    /// The FLOPs reduction that `ratios` would give.
    pub fn predict_reduction(&self, ratios: &Ratios) -> f64 {
        1.0 - self.predict_macs(ratios) as f64 / self.base_macs.max(1) as f64
    }

    /// The channels each group keeps at `ratios`: the most important ones.
    pub fn plan(&self, ratios: &Ratios) -> Result<Vec<(usize, Vec<usize>)>> {
        self.check(ratios)?;
        Ok(ratios
            .iter()
            .filter(|(_, &r)| r > 0.0)
            .map(|(&g, &r)| {
                let keep = kept_channels(self.group(g).channels, r);
                (g, top_channels(&self.importance[&g], keep))
            })
            .filter(|(g, keep)| keep.len() < self.group(*g).channels)
            .collect())
    }

    /// The pruned model (the original is untouched), with its batch norms recalibrated when
    /// the pruner has calibration images.
    pub fn apply(&self, ratios: &Ratios) -> Result<Model> {
        let plan = self.plan(ratios)?;
        let mut pruned = self.groups.prune(self.model, &plan)?;
        if let Some(c) = &self.calibration {
            recalibrate_batch_norm(&pruned, &c.set, &c.normalize, c.batch_size)?;
        }
        pruned.provenance.insert(
            "pruned".into(),
            format!("{} groups, {}", plan.len(), self.criterion),
        );
        Ok(pruned)
    }

    /// The largest reduction uniform pruning can reach (every group down to one channel).
    pub fn max_uniform_reduction(&self) -> f64 {
        self.predict_reduction(&self.uniform(0.999_999))
    }

    /// Uniform pruning to a FLOPs reduction `target`: the ratio whose reduction is closest to
    /// the target, then, where the channel counts are too coarse for one ratio to land within
    /// 1% of it (LeNet's 6-channel layer moves the total by whole percents), single channels
    /// given back or taken per group until it does. An unreachable target is an error that
    /// says the most that can be removed.
    pub fn uniform_for_reduction(&self, target: f64) -> Result<UniformPlan> {
        check_reduction(target)?;
        let max = self.max_uniform_reduction();
        if max < target - 0.01 {
            return Err(PruneError::Invalid(format!(
                "a FLOPs reduction of {:.1}% cannot be reached by pruning the groups in scope: \
                 the most they can remove is {:.1}%",
                target * 100.0,
                max * 100.0
            )));
        }
        // The reduction grows with the ratio (in steps): bisect for the smallest ratio that
        // reaches the target, then take whichever neighbour lands closer.
        let (mut lo, mut hi) = (0.0f64, 0.999_999f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if self.predict_reduction(&self.uniform(mid)) >= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let above = self.predict_reduction(&self.uniform(hi));
        let below = self.predict_reduction(&self.uniform(lo));
        let ratio = if lo > 0.0 && (target - below) < (above - target) {
            lo
        } else {
            hi
        };
        // Per-group channel counts at that ratio, as exact fractions, then nudged one channel
        // at a time towards the target while that brings it closer.
        let mut removed: BTreeMap<usize, usize> = self
            .scope
            .iter()
            .map(|&g| {
                let c = self.group(g).channels;
                (g, c - kept_channels(c, ratio))
            })
            .collect();
        let as_ratios = |removed: &BTreeMap<usize, usize>| -> Ratios {
            removed
                .iter()
                .map(|(&g, &k)| (g, k as f64 / self.group(g).channels as f64))
                .collect()
        };
        let mut current = self.predict_reduction(&as_ratios(&removed));
        while (current - target).abs() > 0.01 {
            let mut best: Option<(f64, usize, usize)> = None;
            for &g in &self.scope {
                let c = self.group(g).channels;
                let k = removed[&g];
                for next in [k.checked_sub(1), (k + 1 < c).then_some(k + 1)]
                    .into_iter()
                    .flatten()
                {
                    let mut trial = removed.clone();
                    trial.insert(g, next);
                    let red = self.predict_reduction(&as_ratios(&trial));
                    if (red - target).abs()
                        < best.map_or((current - target).abs(), |b| (b.0 - target).abs())
                    {
                        best = Some((red, g, next));
                    }
                }
            }
            match best {
                Some((red, g, next)) => {
                    removed.insert(g, next);
                    current = red;
                }
                None => break,
            }
        }
        Ok(UniformPlan {
            ratio,
            ratios: as_ratios(&removed),
            reduction: current,
        })
    }
}

/// Uniform pruning fitted to a FLOPs target.
#[derive(Clone, Debug)]
pub struct UniformPlan {
    /// The one ratio.
    pub ratio: f64,
    /// Per-group ratios: the one ratio, with at most a few groups a channel off.
    pub ratios: Ratios,
    /// The FLOPs reduction they give.
    pub reduction: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use slim_core::zoo::{self, ZooConfig};

    #[test]
    fn kept_channels_rounds_and_never_empties_a_group() {
        assert_eq!(kept_channels(16, 0.5), 8);
        assert_eq!(kept_channels(10, 0.25), 7); // 2.5 rounds to 3 removed
        assert_eq!(kept_channels(6, 0.99), 1);
        assert_eq!(kept_channels(1, 0.5), 1);
        assert_eq!(kept_channels(5, 0.0), 5);
    }

    #[test]
    fn flops_targets_are_met_within_one_percent() {
        let m = zoo::model("resnet20", &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).unwrap();
        let p = Pruner::new(&m, Criterion::L1Norm, &[]).unwrap();
        for target in [0.2, 0.3, 0.5, 0.7] {
            let u = p.uniform_for_reduction(target).unwrap();
            let got = u.reduction;
            assert!(
                (got - target).abs() <= 0.01,
                "{target}: ratio {} gives {got}",
                u.ratio
            );
            let pruned = p.apply(&u.ratios).unwrap();
            let real = 1.0 - analyze(&pruned.graph).macs as f64 / p.base_macs() as f64;
            assert!((real - got).abs() < 1e-9, "predicted {got}, real {real}");
        }
        // With only the first stage in scope, most of the network cannot shrink.
        let stage = Pruner::new(&m, Criterion::L1Norm, &["stem*".into()]).unwrap();
        let e = stage.uniform_for_reduction(0.9).unwrap_err().to_string();
        assert!(e.contains("the most they can remove is"), "{e}");
        assert!(p.uniform_for_reduction(0.0).is_err());
        assert!(p.uniform_for_reduction(1.0).is_err());
    }

    #[test]
    fn scope_patterns_select_groups_and_unknown_patterns_are_refused() {
        let m = zoo::model("lenet", &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).unwrap();
        let all = Pruner::new(&m, Criterion::L1Norm, &[]).unwrap();
        let one = Pruner::new(&m, Criterion::L1Norm, &["conv1*".into()]).unwrap();
        assert!(all.scope().len() > one.scope().len());
        assert_eq!(one.scope().len(), 1);
        let e = Pruner::new(&m, Criterion::L1Norm, &["nothing*".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nothing*"), "{e}");
        // The classifier's output is never in scope.
        let out = m.graph.node(m.graph.outputs()[0]).name.clone();
        assert!(all
            .scope()
            .iter()
            .all(|&g| !all.group(g).producers.contains(&out)));
    }
}
