//! Figures for reports: small SVG charts (lines and point clouds on linear axes, with tidy
//! ticks and a legend; plain SVG text, so that no font or drawing library is needed) and
//! plain-text tables.
//!
//! ```
//! use slim_core::plot::{Plot, Series};
//! let svg = Plot::new("reward", "iteration", "top-1 (%)")
//!     .series(Series::line("best", vec![(0.0, 80.0), (1.0, 85.0)]))
//!     .series(Series::points("trials", vec![(0.0, 80.0), (1.0, 85.0)]))
//!     .to_svg();
//! assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("circle"));
//! ```

use std::fmt::Write;

/// Renders rows as a left-aligned text table with a header rule. Numeric-looking cells are
/// right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let numeric = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_digit() || ".%GMK-+".contains(c))
    };
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| {
                if numeric(c) {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|&w| "-".repeat(w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Line,
    Points,
}

/// One named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            style: Style::Line,
        }
    }
    pub fn points(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            style: Style::Points,
        }
    }
}

/// A chart: a title, axis labels, series, and labelled vertical lines (a limit, say).
#[derive(Clone, Debug, Default)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub vlines: Vec<(f64, String)>,
}

const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Ticks over `lo..=hi`: a step of 1, 2 or 5 times a power of ten giving at most 8 intervals,
/// and the range rounded out to it.
fn ticks(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (lo, hi) = if hi - lo < 1e-12 {
        (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / 8.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

fn label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let s = format!("{v:.decimals$}");
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// `s` with the characters XML gives meaning to (`&`, `<`, `>`) escaped, for SVG text.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Plot {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Plot {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            ..Default::default()
        }
    }

    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    pub fn vline(mut self, x: f64, label: &str) -> Self {
        self.vlines.push((x, label.into()));
        self
    }

    /// The axes' first and last ticks and their step, x then y, from the finite points (and
    /// the vertical lines).
    #[allow(clippy::type_complexity)]
    fn axes(&self) -> ((f64, f64, f64), (f64, f64, f64)) {
        let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(|p| finite(p)).map(|p| p.0))
            .chain(self.vlines.iter().map(|v| v.0).filter(|x| x.is_finite()));
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(|p| finite(p)).map(|p| p.1));
        let range = |it: &mut dyn Iterator<Item = f64>| {
            it.fold(None, |r: Option<(f64, f64)>, v| match r {
                None => Some((v, v)),
                Some((a, b)) => Some((a.min(v), b.max(v))),
            })
            .unwrap_or((0.0, 1.0))
        };
        let (x0, x1, xstep) = {
            let (a, b) = range(&mut xs.into_iter());
            ticks(a, b)
        };
        let (y0, y1, ystep) = {
            let (a, b) = range(&mut ys.into_iter());
            ticks(a, b)
        };
        ((x0, x1, xstep), (y0, y1, ystep))
    }

    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        const W: f64 = 760.0;
        const H: f64 = 440.0;
        let (left, right, top, bottom) = (70.0, 190.0, 36.0, 52.0);
        let (pw, ph) = (W - left - right, H - top - bottom);
        let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
        let ((x0, x1, xstep), (y0, y1, ystep)) = self.axes();
        let x = |v: f64| left + (v - x0) / (x1 - x0) * pw;
        let y = |v: f64| top + ph - (v - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = write!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
             viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{:.1}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
            left + pw / 2.0,
            escape(&self.title)
        );
        let mut v = y0;
        while v <= y1 + ystep * 1e-6 {
            let yy = y(v);
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                left + pw,
                left - 6.0,
                yy + 4.0,
                label(v, ystep)
            );
            v += ystep;
        }
        let mut v = x0;
        while v <= x1 + xstep * 1e-6 {
            let xx = x(v);
            let _ = writeln!(
                s,
                "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                top + ph,
                top + ph + 16.0,
                label(v, xstep)
            );
            v += xstep;
        }
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" \
             stroke=\"black\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            left + pw / 2.0,
            H - 12.0,
            escape(&self.x_label),
            top + ph / 2.0,
            escape(&self.y_label)
        );
        for (xv, name) in &self.vlines {
            if !xv.is_finite() {
                continue;
            }
            let xx = x(*xv);
            let _ = writeln!(
                s,
                "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#d62728\" \
                 stroke-dasharray=\"6 4\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#d62728\">{}</text>",
                top + ph,
                xx + 4.0,
                top + 14.0,
                escape(name)
            );
        }
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .filter(|p| finite(p))
                .map(|&(a, b)| (x(a), y(b)))
                .collect();
            draw_series(&mut s, series.style, &pts, color);
            // The legend lists the series that fit beside the frame.
            let ly = top + 10.0 + i as f64 * 16.0;
            if ly >= H - 10.0 {
                continue;
            }
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" \
                 stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                left + pw + 12.0,
                left + pw + 32.0,
                left + pw + 38.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// One series' points, already in the frame's coordinates: a line through them, or dots.
fn draw_series(s: &mut String, style: Style, pts: &[(f64, f64)], color: &str) {
    match style {
        Style::Line => {
            let list: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" \
                 points=\"{}\"/>",
                list.join(" ")
            );
        }
        Style::Points => {
            for (a, b) in pts {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3\" fill=\"{color}\" \
                     fill-opacity=\"0.7\"/>"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_tidy_and_cover_the_range() {
        let (a, b, step) = ticks(0.13, 0.87);
        assert_eq!(step, 0.1);
        assert!((a - 0.1).abs() < 1e-9 && (b - 0.9).abs() < 1e-9);
        let (a, b, step) = ticks(3.0, 3.0);
        assert!(a < 3.0 && b > 3.0 && step > 0.0);
        assert_eq!(label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(label(-0.0, 1.0), "0");
    }

    #[test]
    fn points_land_inside_the_frame_and_names_are_escaped() {
        let svg = Plot::new("a < b", "x", "y")
            .series(Series::points(
                "p&q",
                vec![(1.0, 2.0), (3.0, f64::NAN), (5.0, 9.0)],
            ))
            .vline(4.0, "limit")
            .to_svg();
        assert!(svg.contains("a &lt; b") && svg.contains("p&amp;q"));
        // The NaN point is left out.
        assert_eq!(svg.matches("<circle").count(), 2);
        for c in svg.split("<circle").skip(1) {
            let cx: f64 = c
                .split("cx=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!((70.0..=570.0).contains(&cx), "{cx}");
        }
    }
}
