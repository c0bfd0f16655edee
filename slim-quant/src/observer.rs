//! Activation calibration: how the scale of a quantized layer's input is chosen from the
//! values it sees on calibration batches.
//!
//! Every method picks a threshold `T` on `|x|` and sets `scale = T / Q`:
//! - `abs_max`: the largest `|x|` over all batches;
//! - `avg`: the mean over batches of each batch's largest `|x|`;
//! - `moving_average_abs_max`: the batches' largest `|x|` as a moving average (rate 0.9),
//!   which is also how quantization-aware training tracks it;
//! - `hist`: the 99.99th percentile of `|x|`;
//! - `mse`: the threshold that minimises the expected squared error (rounding noise of
//!   `delta^2 / 12` inside the range, clipping error outside), from a histogram;
//! - `kl`: the threshold whose quantized distribution is closest to the observed one in
//!   Kullback-Leibler divergence (entropy calibration, as TensorRT describes it): the
//!   histogram up to the threshold, with everything beyond folded into its last bin, against
//!   the same bins merged into `qmax + 1` levels and spread back over the bins that were not
//!   empty, searched over the upper half of the observed range. Exact zeros (most of a
//!   ReLU's output) are left out: zero is exact at any scale, and their mass would otherwise
//!   pull the threshold down.
//!
//! The histogram methods take two passes over the calibration batches: one for the range,
//! one for the 2048-bin histogram of `|x|` over it.

use std::fmt;
use std::str::FromStr;

use crate::{QuantError, Result};

/// Bins of the `|x|` histogram.
pub const BINS: usize = 2048;

/// How activation scales are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ActQuant {
    #[default]
    AbsMax,
    Avg,
    MovingAverageAbsMax,
    Hist,
    Mse,
    Kl,
}

impl ActQuant {
    pub const ALL: [ActQuant; 6] = [
        ActQuant::AbsMax,
        ActQuant::Avg,
        ActQuant::MovingAverageAbsMax,
        ActQuant::Hist,
        ActQuant::Mse,
        ActQuant::Kl,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::AbsMax => "abs_max",
            ActQuant::Avg => "avg",
            ActQuant::MovingAverageAbsMax => "moving_average_abs_max",
            ActQuant::Hist => "hist",
            ActQuant::Mse => "mse",
            ActQuant::Kl => "kl",
        }
    }
    /// Whether the method needs the histogram pass.
    pub fn needs_histogram(self) -> bool {
        matches!(self, ActQuant::Hist | ActQuant::Mse | ActQuant::Kl)
    }
}

impl fmt::Display for ActQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ActQuant {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self> {
        ActQuant::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                QuantError::Invalid(format!(
                    "unknown activation quantizer `{s}` (abs_max, avg, moving_average_abs_max, \
                     hist, mse or kl)"
                ))
            })
    }
}

/// What one quantized input saw during calibration.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Each batch's largest `|x|`.
    pub batch_max: Vec<f32>,
    /// Counts of `|x|` in `BINS` equal bins over `[0, range]` (second pass).
    pub hist: Vec<u64>,
    pub range: f32,
    /// How many of the histogram's values were exactly zero (they are in its first bin too).
    pub zeros: u64,
}

impl Stats {
    pub fn max(&self) -> f32 {
        self.batch_max.iter().fold(0f32, |m, &v| m.max(v))
    }

    /// Adds one batch's values to the histogram (the range must be set).
    pub fn add_histogram(&mut self, values: &[f32]) {
        if self.hist.is_empty() {
            self.hist = vec![0; BINS];
        }
        if self.range <= 0.0 {
            self.hist[0] += values.len() as u64;
            self.zeros += values.iter().filter(|v| **v == 0.0).count() as u64;
            return;
        }
        let k = BINS as f32 / self.range;
        for v in values {
            if *v == 0.0 {
                self.zeros += 1;
            }
            let b = ((v.abs() * k) as usize).min(BINS - 1);
            self.hist[b] += 1;
        }
    }

    /// The threshold `T` (the scale is `T / qmax`).
    pub fn threshold(&self, method: ActQuant, qmax: f32) -> f32 {
        let max = self.max();
        let width = self.range / BINS as f32;
        match method {
            ActQuant::AbsMax => max,
            ActQuant::Avg => {
                self.batch_max.iter().sum::<f32>() / self.batch_max.len().max(1) as f32
            }
            ActQuant::MovingAverageAbsMax => {
                let mut it = self.batch_max.iter();
                let first = it.next().copied().unwrap_or(0.0);
                it.fold(first, |m, &v| 0.9 * m + 0.1 * v)
            }
            ActQuant::Hist => {
                let total: u64 = self.hist.iter().sum();
                let want = (total as f64 * 0.9999).ceil() as u64;
                let mut acc = 0;
                for (i, &c) in self.hist.iter().enumerate() {
                    acc += c;
                    if acc >= want {
                        return (i + 1) as f32 * width;
                    }
                }
                max
            }
            ActQuant::Mse => {
                let mut best = (f64::INFINITY, max);
                for i in (BINS / 32..=BINS).step_by(8) {
                    let t = i as f64 * f64::from(width);
                    let delta = t / f64::from(qmax);
                    let mut err = 0.0;
                    for (b, &c) in self.hist.iter().enumerate() {
                        if c == 0 {
                            continue;
                        }
                        let center = (b as f64 + 0.5) * f64::from(width);
                        err += c as f64
                            * if center > t {
                                (center - t).powi(2)
                            } else {
                                delta * delta / 12.0
                            };
                    }
                    if err < best.0 {
                        best = (err, t as f32);
                    }
                }
                best.1
            }
            ActQuant::Kl => {
                let mut hist = self.hist.clone();
                if let Some(h0) = hist.first_mut() {
                    *h0 = h0.saturating_sub(self.zeros);
                }
                let levels = (qmax as usize + 1).min(BINS);
                if hist.iter().sum::<u64>() == 0 {
                    return max;
                }
                let mut best = (f64::INFINITY, max);
                // Thresholds in the upper half of the observed range only (PaddleSlim's
                // search starts there too): lower down, the spike that a constant background
                // leaves in every early activation can look like the whole distribution.
                for i in (levels.max(BINS / 2)..=BINS).step_by(4) {
                    let d = clipped_kl(&hist, i, levels);
                    if d < best.0 {
                        best = (d, i as f32 * width);
                    }
                }
                best.1
            }
        }
    }
}

/// KL(P || Q), both normalized here: P the first `i` bins of `hist` with the rest added to
/// bin `i - 1`, Q those bins merged into `levels` groups, each group's count spread evenly
/// over its non-empty bins. Bins where P is empty add nothing; where Q is empty and P is not
/// (only by rounding of the groups), Q takes a tiny floor.
pub fn clipped_kl(hist: &[u64], i: usize, levels: usize) -> f64 {
    let mut p: Vec<f64> = hist[..i].iter().map(|&c| c as f64).collect();
    p[i - 1] += hist[i..].iter().map(|&c| c as f64).sum::<f64>();
    let mut q = vec![0f64; i];
    for g in 0..levels {
        let (a, b) = (g * i / levels, (g + 1) * i / levels);
        if a >= b {
            continue;
        }
        let total: f64 = hist[a..b].iter().map(|&c| c as f64).sum();
        let nonempty = hist[a..b].iter().filter(|&&c| c > 0).count();
        if nonempty == 0 {
            continue;
        }
        for (j, &c) in hist[a..b].iter().enumerate() {
            if c > 0 {
                q[a + j] = total / nonempty as f64;
            }
        }
    }
    // The clipped mass folded into P's last bin is what Q misses: Q keeps it out.
    let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    p.iter()
        .zip(&q)
        .filter(|(&pp, _)| pp > 0.0)
        .map(|(&pp, &qq)| {
            let (pn, qn) = (pp / sp, (qq / sq).max(1e-12));
            pn * (pn / qn).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(values: &[f32]) -> Stats {
        let mut s = Stats {
            batch_max: vec![values.iter().fold(0f32, |m, v| m.max(v.abs()))],
            ..Default::default()
        };
        s.range = s.max();
        s.add_histogram(values);
        s
    }

    #[test]
    fn simple_thresholds_by_hand() {
        let s = Stats {
            batch_max: vec![2.0, 4.0, 6.0],
            ..Default::default()
        };
        assert_eq!(s.threshold(ActQuant::AbsMax, 127.0), 6.0);
        assert_eq!(s.threshold(ActQuant::Avg, 127.0), 4.0);
        // 2 -> 0.9*2 + 0.1*4 = 2.2 -> 0.9*2.2 + 0.1*6 = 2.58
        assert!((s.threshold(ActQuant::MovingAverageAbsMax, 127.0) - 2.58).abs() < 1e-6);
    }

    #[test]
    fn histogram_methods_clip_a_rare_outlier() {
        // 100,000 values spread over [0, 1) and one outlier at 100: abs_max keeps the outlier,
        // the percentile clips near 1; MSE weighs the outlier's squared error
        // against the rounding noise of 100,000 values and clips part of the way.
        let mut v: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        v.push(100.0);
        let s = stats(&v);
        assert_eq!(s.threshold(ActQuant::AbsMax, 127.0), 100.0);
        let hist = s.threshold(ActQuant::Hist, 127.0);
        assert!(hist > 0.5 && hist < 3.0, "hist: {hist}");
        let mse = s.threshold(ActQuant::Mse, 127.0);
        assert!(mse > 1.0 && mse < 100.0, "mse: {mse}");
        // The MSE choice is no worse than abs_max or the percentile by its own measure.
        let err = |t: f32| -> f64 {
            let d = f64::from(t) / 127.0;
            v.iter()
                .map(|&x| {
                    let x = f64::from(x);
                    if x > f64::from(t) {
                        (x - f64::from(t)).powi(2)
                    } else {
                        d * d / 12.0
                    }
                })
                .sum()
        };
        assert!(err(mse) <= err(100.0) && err(mse) <= err(hist), "{mse}");
        // KL searches the upper half of the range: it keeps the outlier's half at least.
        let kl = s.threshold(ActQuant::Kl, 127.0);
        assert!((50.0..100.0).contains(&kl), "kl: {kl}");
    }

    #[test]
    fn kl_divergence_by_hand() {
        // P = [4, 2] / 6, Q = one level over both bins = [3, 3] / 6:
        // 2/3 ln(4/3) + 1/3 ln(2/3).
        let want = 2.0 / 3.0 * (4.0f64 / 3.0).ln() + 1.0 / 3.0 * (2.0f64 / 3.0).ln();
        assert!((clipped_kl(&[4, 2], 2, 1) - want).abs() < 1e-12);
        // As many levels as bins: Q equals P.
        assert!(clipped_kl(&[5, 1, 7, 3], 4, 4).abs() < 1e-12);
        // Clipping at bin 2 folds the 9 beyond into P's last bin, which Q lacks.
        assert!(clipped_kl(&[5, 1, 9], 2, 2) > clipped_kl(&[5, 1, 9], 3, 2));
    }

    #[test]
    fn kl_ignores_exact_zeros() {
        // A ReLU's output: nine zeros for every value spread over (0, 1]. With the zeros the
        // first bin would dominate; without them the threshold covers the spread.
        let mut v: Vec<f32> = vec![0.0; 90_000];
        v.extend((1..=10_000).map(|i| i as f32 / 10_000.0));
        let s = stats(&v);
        assert_eq!(s.zeros, 90_000);
        let kl = s.threshold(ActQuant::Kl, 127.0);
        assert!(kl > 0.8, "kl: {kl}");
    }
}
