//! Importance criteria: how much each channel of a group matters.
//!
//! A channel group may be produced by several layers (the convolutions whose outputs a
//! residual addition joins), and every one of them holds a filter for each channel. The
//! importance of channel `k` is computed over all those producers:
//!
//! - `l1_norm`: the sum over producers of the L1 norm of filter `k`;
//! - `l2_norm`: the same with L2 norms;
//! - `fpgm` (geometric median, He et al., "Filter Pruning via Geometric Median", CVPR 2019):
//!   for each producer, the sum of Euclidean distances from filter `k` to every other filter
//!   of that layer, summed over producers. Filters near the geometric median are the most
//!   replaceable by the others and get the lowest importance;
//! - `bn_scale` (network slimming, Liu et al., ICCV 2017): the sum of `|gamma_k|` over the
//!   group's batch norms. A group without a batch norm has no such importance: an error.
//!
//! The kept channels are those of highest importance (the lowest index first among equals).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use slim_core::deps::{ChannelGroup, Member};
use slim_core::{Model, Op};

use crate::{PruneError, Result};

/// How the importance of a channel is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    #[default]
    L1Norm,
    L2Norm,
    Fpgm,
    BnScale,
}

impl Criterion {
    pub const ALL: [Criterion; 4] = [
        Criterion::L1Norm,
        Criterion::L2Norm,
        Criterion::Fpgm,
        Criterion::BnScale,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Criterion::L1Norm => "l1_norm",
            Criterion::L2Norm => "l2_norm",
            Criterion::Fpgm => "fpgm",
            Criterion::BnScale => "bn_scale",
        }
    }
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Criterion {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        Criterion::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                PruneError::Invalid(format!(
                    "unknown criterion `{s}` (expected l1_norm, l2_norm, fpgm or bn_scale)"
                ))
            })
    }
}

/// The rows of a member's parameter that belong to each channel of the group, as a
/// `[channels, row length]` matrix (channel `k` gathers rows `(offset + k * stride) * expand
/// ..`).
fn channel_rows(model: &Model, m: &Member, channels: usize) -> Result<(Vec<f32>, usize)> {
    let t: Tensor = model.params.tensor(&m.param)?;
    let t = if m.axis == 0 {
        t
    } else {
        t.transpose(0, m.axis)?.contiguous()?
    };
    let rows = t.dim(0)?;
    let data = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let row_len = data.len() / rows.max(1);
    let per = row_len * m.expand;
    if channels == 0 {
        return Ok((Vec::new(), per));
    }
    let end = (m.index(channels - 1, 0) + m.expand) * row_len;
    if end > data.len() {
        return Err(PruneError::Invalid(format!(
            "parameter `{}` is too small for its channel group",
            m.param
        )));
    }
    let rows = (0..channels).flat_map(|k| {
        let start = m.index(k, 0) * row_len;
        data[start..start + per].iter().copied()
    });
    Ok((rows.collect(), per))
}

/// Members that produce the group's channels: the weights of its producer layers.
fn producer_weights<'g>(model: &Model, group: &'g ChannelGroup) -> Vec<&'g Member> {
    group
        .members
        .iter()
        .filter(|m| {
            group.producers.contains(&m.node)
                && model.graph.find(&m.node).is_some_and(|n| {
                    matches!(n.op, Op::Conv2d(_) | Op::Linear(_))
                        && m.param == n.param_name("weight")
                })
        })
        .collect()
}

/// The importance of every channel of `group`.
pub fn importance(model: &Model, group: &ChannelGroup, criterion: Criterion) -> Result<Vec<f64>> {
    let c = group.channels;
    let mut score = vec![0.0f64; c];
    match criterion {
        Criterion::L1Norm | Criterion::L2Norm | Criterion::Fpgm => {
            let members = producer_weights(model, group);
            if members.is_empty() {
                return Err(PruneError::Invalid(format!(
                    "{group} has no producing layer with weights to rank its channels"
                )));
            }
            for m in members {
                let (rows, per) = channel_rows(model, m, c)?;
                let row = |k: usize| &rows[k * per..(k + 1) * per];
                match criterion {
                    Criterion::L1Norm => {
                        for (k, s) in score.iter_mut().enumerate() {
                            *s += row(k).iter().map(|v| f64::from(v.abs())).sum::<f64>();
                        }
                    }
                    Criterion::L2Norm => {
                        for (k, s) in score.iter_mut().enumerate() {
                            *s += row(k)
                                .iter()
                                .map(|&v| f64::from(v) * f64::from(v))
                                .sum::<f64>()
                                .sqrt();
                        }
                    }
                    _ => {
                        for a in 0..c {
                            for b in a + 1..c {
                                let d = row(a)
                                    .iter()
                                    .zip(row(b))
                                    .map(|(&x, &y)| {
                                        let d = f64::from(x) - f64::from(y);
                                        d * d
                                    })
                                    .sum::<f64>()
                                    .sqrt();
                                score[a] += d;
                                score[b] += d;
                            }
                        }
                    }
                }
            }
        }
        Criterion::BnScale => {
            let mut found = false;
            for m in &group.members {
                let is_bn_scale = model.graph.find(&m.node).is_some_and(|n| {
                    matches!(n.op, Op::BatchNorm2d(_)) && m.param == n.param_name("weight")
                });
                if !is_bn_scale {
                    continue;
                }
                found = true;
                let (rows, per) = channel_rows(model, m, c)?;
                for (k, s) in score.iter_mut().enumerate() {
                    *s += rows[k * per..(k + 1) * per]
                        .iter()
                        .map(|v| f64::from(v.abs()))
                        .sum::<f64>();
                }
            }
            if !found {
                return Err(PruneError::Invalid(format!(
                    "{group} has no batch norm, so bn_scale cannot rank its channels; \
                     use l1_norm, l2_norm or fpgm, or leave the group out of the scope"
                )));
            }
        }
    }
    Ok(score)
}

/// The `keep` most important channels, in ascending index order.
pub fn top_channels(importance: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..importance.len()).collect();
    // Most important first; among equals, the lower index.
    order.sort_by(|&a, &b| {
        importance[b]
            .partial_cmp(&importance[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut kept: Vec<usize> = order.into_iter().take(keep).collect();
    kept.sort_unstable();
    kept
}
