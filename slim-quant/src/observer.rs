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
//!   `delta^2 / 12` inside the range, clipping error outside), from a histogram.
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
}

impl ActQuant {
    pub const ALL: [ActQuant; 5] = [
        ActQuant::AbsMax,
        ActQuant::Avg,
        ActQuant::MovingAverageAbsMax,
        ActQuant::Hist,
        ActQuant::Mse,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::AbsMax => "abs_max",
            ActQuant::Avg => "avg",
            ActQuant::MovingAverageAbsMax => "moving_average_abs_max",
            ActQuant::Hist => "hist",
            ActQuant::Mse => "mse",
        }
    }
    /// Whether the method needs the histogram pass.
    pub fn needs_histogram(self) -> bool {
        matches!(self, ActQuant::Hist | ActQuant::Mse)
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
                     hist or mse)"
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
            return;
        }
        let k = BINS as f32 / self.range;
        for v in values {
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
        }
    }
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
    }
}
