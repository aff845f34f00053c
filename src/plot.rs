//! Training curves as a hand-written SVG (`grpo plot`): reads `OUTPUT_DIR/metrics.jsonl` and
//! draws one panel each for `reward`, accuracy (`rewards/correctness/mean`), `kl` and `loss`
//! ([`Panels::Training`]), or for the seconds of each phase of a step and the generation
//! throughput ([`Panels::Timings`]), skipping those the run did not log. Each panel shows the raw values as a light line and an
//! exponential moving average over them (TensorBoard's debiased smoothing) as a strong one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The panels, in drawing order: (metric key in metrics.jsonl, panel title, line color).
pub const PANELS: [(&str, &str, &str); 4] = [
    ("reward", "reward", "#1f77b4"),
    ("rewards/correctness/mean", "accuracy", "#2ca02c"),
    ("kl", "kl", "#d62728"),
    ("loss", "loss", "#9467bd"),
];

/// The phase timings of a step (`timing/*`, see `crate::timing`), in drawing order.
pub const TIMING_PANELS: [(&str, &str, &str); 6] = [
    ("timing/generation", "generation (s)", "#1f77b4"),
    ("timing/policy", "policy forward + backward (s)", "#ff7f0e"),
    ("timing/reference", "reference forward (s)", "#2ca02c"),
    ("timing/optimizer", "optimizer (s)", "#d62728"),
    ("timing/rewards", "rewards (s)", "#9467bd"),
    (
        "generation/tokens_per_second",
        "generated tokens / s",
        "#8c564b",
    ),
];

/// Which set of curves to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Panels {
    /// Reward, accuracy, KL and loss ([`PANELS`]), into `curves.svg` by default.
    Training,
    /// Where each step's time goes ([`TIMING_PANELS`]), into `timings.svg` by default.
    Timings,
}

impl Panels {
    fn list(self) -> &'static [(&'static str, &'static str, &'static str)] {
        match self {
            Panels::Training => &PANELS,
            Panels::Timings => &TIMING_PANELS,
        }
    }

    fn default_file(self) -> &'static str {
        match self {
            Panels::Training => "curves.svg",
            Panels::Timings => "timings.svg",
        }
    }
}

/// Weight of the previous smoothed value in the moving average (TensorBoard's "smoothing").
pub const EMA_WEIGHT: f64 = 0.6;

/// One metric over training: `(step, value)` sorted by step.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub key: &'static str,
    pub title: &'static str,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Reads `output_dir/metrics.jsonl` and writes the curves of `panels` to `out` (default
/// `output_dir/curves.svg` or `output_dir/timings.svg`); returns the path written.
pub fn plot(output_dir: &Path, out: Option<&Path>, panels: Panels) -> Result<PathBuf> {
    let metrics = output_dir.join("metrics.jsonl");
    let curves = read_curves(&metrics, panels)?;
    let out = out.map_or_else(|| output_dir.join(panels.default_file()), Path::to_path_buf);
    std::fs::write(&out, render_svg(&curves))
        .with_context(|| format!("cannot write the plot to {}", out.display()))?;
    Ok(out)
}

/// The curves of `panels` that `metrics` (a metrics.jsonl file) logs at least once, in panel
/// order. Lines must be JSON objects with a numeric `step`; values that are not numbers are
/// skipped.
pub fn read_curves(metrics: &Path, panels: Panels) -> Result<Vec<Curve>> {
    let text = std::fs::read_to_string(metrics).with_context(|| {
        format!(
            "cannot read {}: give the output_dir of a training run, which logs metrics.jsonl",
            metrics.display()
        )
    })?;
    let mut curves: Vec<Curve> = panels
        .list()
        .iter()
        .map(|&(key, title, color)| Curve {
            key,
            title,
            color,
            points: Vec::new(),
        })
        .collect();
    let mut steps_logged = 0;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index + 1;
        let record: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)
            .with_context(|| {
                format!(
                    "{} line {line_number} is not a JSON object",
                    metrics.display()
                )
            })?;
        let step = record
            .get("step")
            .and_then(serde_json::Value::as_f64)
            .with_context(|| {
                format!(
                    "{} line {line_number} has no numeric \"step\"",
                    metrics.display()
                )
            })?;
        steps_logged += 1;
        for curve in &mut curves {
            if let Some(value) = record.get(curve.key).and_then(serde_json::Value::as_f64) {
                curve.points.push((step, value));
            }
        }
    }
    if steps_logged == 0 {
        bail!(
            "{} is empty: the run has not logged a step yet",
            metrics.display()
        );
    }
    curves.retain(|curve| !curve.points.is_empty());
    if curves.is_empty() {
        let keys: Vec<&str> = panels.list().iter().map(|(key, _, _)| *key).collect();
        bail!(
            "{} logs none of the plotted metrics ({})",
            metrics.display(),
            keys.join(", ")
        );
    }
    for curve in &mut curves {
        curve.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(curves)
}

/// Debiased exponential moving average: `s = weight·s + (1 − weight)·v`, divided by
/// `1 − weight^(i+1)` so the first value is kept as is.
pub fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let mut smoothed = 0.0;
    let mut debias = 1.0;
    values
        .iter()
        .map(|&value| {
            smoothed = weight * smoothed + (1.0 - weight) * value;
            debias *= weight;
            smoothed / (1.0 - debias)
        })
        .collect()
}

const PANEL_WIDTH: f64 = 440.0;
const PANEL_HEIGHT: f64 = 280.0;
const MARGIN_LEFT: f64 = 64.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 46.0;
/// Raw points get a marker when there are at most this many.
const MAX_MARKED_POINTS: usize = 40;

/// The SVG document: panels two per row, each with axes, tick labels, the raw line and its EMA.
pub fn render_svg(curves: &[Curve]) -> String {
    let columns = curves.len().clamp(1, 2);
    let rows = curves.len().div_ceil(columns).max(1);
    let width = PANEL_WIDTH * columns as f64;
    let height = PANEL_HEIGHT * rows as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">"#
    );
    svg.push_str(
        "<style>\
text{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;font-size:11px;fill:#444}\
.title{font-size:14px;font-weight:600;fill:#222}.key{fill:#888}\
.grid{stroke:#ececec;stroke-width:1}.axis{stroke:#999;stroke-width:1}\
.raw{fill:none;stroke-width:1;stroke-opacity:0.35}.ema{fill:none;stroke-width:2}\
</style>\n",
    );
    let _ = writeln!(
        svg,
        r##"<rect width="{width}" height="{height}" fill="#ffffff"/>"##
    );
    for (index, curve) in curves.iter().enumerate() {
        let x = PANEL_WIDTH * (index % columns) as f64;
        let y = PANEL_HEIGHT * (index / columns) as f64;
        render_panel(&mut svg, curve, (x, y));
    }
    svg.push_str("</svg>\n");
    svg
}

fn render_panel(svg: &mut String, curve: &Curve, origin: (f64, f64)) {
    let color = curve.color;
    let (steps, values): (Vec<f64>, Vec<f64>) = curve.points.iter().copied().unzip();
    let x_axis = Axis::new(&steps, 1.0);
    let y_axis = Axis::new(&values, 0.0);
    let left = origin.0 + MARGIN_LEFT;
    let right = origin.0 + PANEL_WIDTH - MARGIN_RIGHT;
    let top = origin.1 + MARGIN_TOP;
    let bottom = origin.1 + PANEL_HEIGHT - MARGIN_BOTTOM;
    let to_x = |step: f64| left + (right - left) * x_axis.fraction(step);
    let to_y = |value: f64| bottom - (bottom - top) * y_axis.fraction(value);
    let legend_y = origin.1 + 22.0;

    let _ = writeln!(
        svg,
        r#"<g class="panel" id="panel-{}">"#,
        escape(&curve.key.replace('/', "-"))
    );
    let _ = writeln!(
        svg,
        r#"<text class="title" x="{left:.1}" y="{legend_y:.1}">{}</text>"#,
        escape(curve.title)
    );
    if curve.title != curve.key {
        let _ = writeln!(
            svg,
            r#"<text class="key" x="{:.1}" y="{:.1}">{}</text>"#,
            left + 8.0 * curve.title.chars().count() as f64 + 12.0,
            legend_y,
            escape(curve.key)
        );
    }
    // Legend: a light swatch for the raw values, a strong one for their moving average.
    let raw_x = right - 118.0;
    let ema_x = right - 66.0;
    let _ = writeln!(
        svg,
        r#"<line x1="{raw_x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-opacity="0.35"/><text class="key" x="{:.1}" y="{legend_y:.1}">raw</text>"#,
        legend_y - 4.0,
        raw_x + 16.0,
        legend_y - 4.0,
        raw_x + 20.0,
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{ema_x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/><text class="key" x="{:.1}" y="{legend_y:.1}">EMA {EMA_WEIGHT}</text>"#,
        legend_y - 4.0,
        ema_x + 16.0,
        legend_y - 4.0,
        ema_x + 20.0,
    );

    for &tick in &y_axis.ticks {
        let y = to_y(tick);
        let _ = writeln!(
            svg,
            r#"<line class="grid" x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + 4.0,
            y_axis.label(tick)
        );
    }
    for &tick in &x_axis.ticks {
        let x = to_x(tick);
        let _ = writeln!(
            svg,
            r#"<line class="grid" x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            bottom + 16.0,
            x_axis.label(tick)
        );
    }
    let _ = writeln!(
        svg,
        r#"<line class="axis" x1="{left:.1}" y1="{top:.1}" x2="{left:.1}" y2="{bottom:.1}"/><line class="axis" x1="{left:.1}" y1="{bottom:.1}" x2="{right:.1}" y2="{bottom:.1}"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"#,
        (left + right) / 2.0,
        bottom + 34.0
    );

    let raw: Vec<(f64, f64)> = curve
        .points
        .iter()
        .map(|&(step, value)| (to_x(step), to_y(value)))
        .collect();
    let smoothed: Vec<(f64, f64)> = steps
        .iter()
        .zip(ema(&values, EMA_WEIGHT))
        .map(|(&step, value)| (to_x(step), to_y(value)))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline class="raw" stroke="{color}" points="{}"/>"#,
        points_attribute(&raw)
    );
    if raw.len() <= MAX_MARKED_POINTS {
        for (x, y) in &raw {
            let _ = writeln!(
                svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="2" fill="{color}" fill-opacity="0.45"/>"#
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<polyline class="ema" stroke="{color}" points="{}"/>"#,
        points_attribute(&smoothed)
    );
    svg.push_str("</g>\n");
}

fn points_attribute(points: &[(f64, f64)]) -> String {
    points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A linear axis over round numbers: its ends and ticks are multiples of a 1-2-5 step.
struct Axis {
    low: f64,
    high: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Covers `values` with about five ticks, spaced at least `min_step` apart (1 for steps).
    fn new(values: &[f64], min_step: f64) -> Self {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let (mut low, mut high) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if low > high {
            (low, high) = (0.0, 1.0);
        }
        if low == high {
            let pad = if low == 0.0 { 1.0 } else { low.abs() * 0.5 };
            (low, high) = (low - pad, high + pad);
        }
        let step = nice_step((high - low) / 5.0).max(min_step);
        // The tolerance keeps float noise (1.0 / 0.2 = 5.000000000000001) from adding a tick.
        let low = (low / step + 1e-9).floor() * step;
        let high = (high / step - 1e-9).ceil() * step;
        let count = ((high - low) / step).round() as usize;
        let ticks = (0..=count).map(|i| low + i as f64 * step).collect();
        Self {
            low,
            high,
            step,
            ticks,
        }
    }

    /// Where `value` lies between the ends, from 0 to 1.
    fn fraction(&self, value: f64) -> f64 {
        (value - self.low) / (self.high - self.low)
    }

    /// A tick label with as many decimals as the step needs.
    fn label(&self, value: f64) -> String {
        // Snap away float noise such as 0.30000000000000004 and -0.
        let value = (value / self.step).round() * self.step + 0.0;
        if value == 0.0 {
            return "0".into();
        }
        if self.step < 1e-4 || self.step >= 1e6 {
            return format!("{value:.1e}");
        }
        let decimals = (-self.step.log10().floor()).max(0.0) as usize;
        format!("{value:.decimals$}")
    }
}

/// The 1, 2 or 5 times a power of ten nearest above `rough`.
fn nice_step(rough: f64) -> f64 {
    let magnitude = 10f64.powf(rough.log10().floor());
    let fraction = rough / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
