//! `grpo plot`: curves read from a metrics.jsonl written here, the SVG's panels, points and
//! axes, the moving average, and errors that name the file.

use std::path::Path;

use assert_cmd::Command;
use grpo::plot::{self, ema, Panels, EMA_WEIGHT};
use predicates::str::contains;

fn write_metrics(dir: &Path, lines: &[String]) {
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
}

/// The `<g class="panel" ...>...</g>` groups of an SVG.
fn panels(svg: &str) -> Vec<&str> {
    svg.split(r#"<g class="panel""#)
        .skip(1)
        .map(|rest| &rest[..rest.find("</g>").expect("panel closed")])
        .collect()
}

/// The (x, y) pairs of the `points` attribute of the polyline with `class`.
fn polyline(panel: &str, class: &str) -> Vec<(f64, f64)> {
    let start = panel
        .find(&format!(r#"<polyline class="{class}""#))
        .unwrap_or_else(|| panic!("no {class} polyline in {panel}"));
    let rest = &panel[start..];
    let points = &rest[rest.find("points=\"").unwrap() + 8..];
    points[..points.find('"').unwrap()]
        .split(' ')
        .map(|pair| {
            let (x, y) = pair.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

/// The texts anchored at `anchor` ("end": y tick labels, "middle": x tick labels and "step").
fn labels<'a>(panel: &'a str, anchor: &str) -> Vec<&'a str> {
    let marker = format!(r#"text-anchor="{anchor}">"#);
    panel
        .split(marker.as_str())
        .skip(1)
        .map(|rest| &rest[..rest.find("</text>").unwrap()])
        .collect()
}

#[test]
fn draws_one_panel_per_logged_metric_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (1..=30)
        .map(|step| {
            let accuracy = f64::from(step) / 30.0;
            format!(
                r#"{{"step": {step}, "loss": 0.01, "reward": {}, "rewards/correctness/mean": {accuracy}, "kl": {}, "completion_length": 120}}"#,
                2.0 * accuracy,
                0.001 * f64::from(step)
            )
        })
        .collect();
    write_metrics(dir.path(), &lines);
    let written = plot::plot(dir.path(), None, Panels::Training).unwrap();
    assert_eq!(written, dir.path().join("curves.svg"));
    let svg = std::fs::read_to_string(&written).unwrap();

    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), 1);
    let panels = panels(&svg);
    assert_eq!(panels.len(), 4);
    for (panel, title) in panels.iter().zip(["reward", "accuracy", "kl", "loss"]) {
        assert!(
            panel.contains(&format!(">{title}</text>")),
            "{title}: {panel}"
        );
        assert_eq!(panel.matches("<polyline").count(), 2, "raw and EMA");
        assert_eq!(polyline(panel, "raw").len(), 30);
        assert_eq!(polyline(panel, "ema").len(), 30);
        assert!(panel.contains(">step</text>"));
    }
    assert!(panels[1].contains("rewards/correctness/mean"));
    assert!(!svg.contains("completion_length"));

    // Accuracy rises from 1/30 to 1: the raw line climbs (SVG y grows downward) from left to
    // right, and the y axis labels 0 and 1 as round ticks.
    let raw = polyline(panels[1], "raw");
    assert!(raw.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 < w[0].1));
    // Round ticks that cover the values: 1-2-5 steps, about five of them.
    assert_eq!(
        labels(panels[1], "end"),
        ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    );
    assert_eq!(labels(panels[1], "middle"), ["0", "10", "20", "30", "step"]);
    // kl spans 0.001..0.03: a fifth of that (0.0058) rounds up to the step 0.01.
    assert_eq!(labels(panels[2], "end"), ["0", "0.01", "0.02", "0.03"]);
}

#[test]
fn skips_absent_metrics_and_honours_out() {
    let dir = tempfile::tempdir().unwrap();
    write_metrics(
        dir.path(),
        &[
            r#"{"step": 2, "kl": 0.5}"#.to_string(),
            String::new(),
            r#"{"step": 1, "kl": 0.25, "reward": null}"#.to_string(),
            r#"{"step": 3, "kl": 0.75}"#.to_string(),
        ],
    );
    let out = dir.path().join("kl.svg");
    assert_eq!(
        plot::plot(dir.path(), Some(&out), Panels::Training).unwrap(),
        out
    );
    assert!(!dir.path().join("curves.svg").exists());
    let svg = std::fs::read_to_string(&out).unwrap();
    let panels = panels(&svg);
    assert_eq!(panels.len(), 1);
    assert!(panels[0].contains(">kl</text>"));
    assert!(!svg.contains(">reward</text>") && !svg.contains(">accuracy</text>"));

    // Points are sorted by step, so the line moves right and up.
    let raw = polyline(panels[0], "raw");
    assert_eq!(raw.len(), 3);
    assert!(raw[0].0 < raw[1].0 && raw[1].0 < raw[2].0);
    assert!(raw[0].1 > raw[1].1 && raw[1].1 > raw[2].1);
}

#[test]
fn moving_average_matches_tensorboard_smoothing() {
    let values = [1.0, 0.0, 0.0, 4.0];
    let w = EMA_WEIGHT;
    // Debiased EMA by its definition: sum of w^(i-j)(1-w) v_j over sum of the weights.
    let expected: Vec<f64> = (0..values.len())
        .map(|i| {
            let weights: Vec<f64> = (0..=i).map(|j| w.powi((i - j) as i32)).collect();
            let total: f64 = weights.iter().sum();
            weights.iter().zip(&values).map(|(k, v)| k * v).sum::<f64>() / total
        })
        .collect();
    let smoothed = ema(&values, w);
    for (a, b) in smoothed.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-12, "{smoothed:?} vs {expected:?}");
    }
    assert_eq!(smoothed[0], 1.0);
    assert!(ema(&[3.0; 5], w).iter().all(|v| (v - 3.0).abs() < 1e-12));
}

#[test]
fn single_point_and_constant_values_still_draw() {
    let dir = tempfile::tempdir().unwrap();
    write_metrics(dir.path(), &[r#"{"step": 1, "loss": 0.0}"#.to_string()]);
    let svg =
        std::fs::read_to_string(plot::plot(dir.path(), None, Panels::Training).unwrap()).unwrap();
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
    assert_eq!(polyline(panels(&svg)[0], "raw").len(), 1);
}

#[test]
fn missing_empty_or_unplottable_metrics_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let message =
        |dir: &Path| format!("{:#}", plot::plot(dir, None, Panels::Training).unwrap_err());

    let error = message(dir.path());
    assert!(error.contains(&metrics.display().to_string()), "{error}");
    assert!(error.contains("output_dir"), "{error}");

    std::fs::write(&metrics, "\n").unwrap();
    let error = message(dir.path());
    assert!(
        error.contains(&metrics.display().to_string()) && error.contains("empty"),
        "{error}"
    );

    write_metrics(
        dir.path(),
        &[r#"{"step": 1, "grad_norm": 0.3}"#.to_string()],
    );
    let error = message(dir.path());
    assert!(
        error.contains(&metrics.display().to_string()) && error.contains("reward, "),
        "{error}"
    );

    write_metrics(
        dir.path(),
        &[
            r#"{"step": 1, "kl": 0.3}"#.to_string(),
            "not json".to_string(),
        ],
    );
    let error = message(dir.path());
    assert!(error.contains("line 2"), "{error}");

    write_metrics(dir.path(), &[r#"{"kl": 0.3}"#.to_string()]);
    let error = message(dir.path());
    assert!(
        error.contains("line 1") && error.contains("step"),
        "{error}"
    );
    assert!(!dir.path().join("curves.svg").exists());
}

#[test]
fn cli_plots_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    Command::cargo_bin("grpo")
        .unwrap()
        .arg("plot")
        .arg(dir.path())
        .assert()
        .failure()
        .stderr(contains("metrics.jsonl"));

    write_metrics(
        dir.path(),
        &[
            r#"{"step": 1, "reward": 0.5}"#.to_string(),
            r#"{"step": 2, "reward": 0.75}"#.to_string(),
        ],
    );
    let out = dir.path().join("plot.svg");
    Command::cargo_bin("grpo")
        .unwrap()
        .arg("plot")
        .arg(dir.path())
        .arg("--out")
        .arg(&out)
        .assert()
        .success()
        .stdout(contains("plot.svg"));
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains(">reward</text>"));

    let assert = Command::cargo_bin("grpo")
        .unwrap()
        .args(["plot", "--help"])
        .assert()
        .success();
    let help = String::from_utf8(assert.get_output().stdout.clone()).unwrap();
    assert!(help.contains("OUTPUT_DIR") && help.contains("--out") && help.contains("curves.svg"));
}

#[test]
fn cli_timings_draws_the_phase_panels_into_timings_svg() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (1..=5)
        .map(|step| {
            format!(
                r#"{{"step": {step}, "reward": 1.0, "timing/generation": {}, "timing/policy": 2.0, "timing/optimizer": 0.1, "generation/tokens_per_second": 300}}"#,
                1.0 + f64::from(step)
            )
        })
        .collect();
    write_metrics(dir.path(), &lines);
    Command::cargo_bin("grpo")
        .unwrap()
        .args(["plot", "--timings"])
        .arg(dir.path())
        .assert()
        .success()
        .stdout(contains("timings.svg"));
    assert!(!dir.path().join("curves.svg").exists());
    let svg = std::fs::read_to_string(dir.path().join("timings.svg")).unwrap();
    let titles: Vec<&str> = panels(&svg)
        .iter()
        .map(|panel| {
            let title = &panel[panel.find(r#"class="title""#).unwrap()..];
            &title[title.find('>').unwrap() + 1..title.find("</text>").unwrap()]
        })
        .collect();
    // Logged phases only, in panel order; `reward` is not a timing panel.
    assert_eq!(
        titles,
        [
            "generation (s)",
            "policy forward + backward (s)",
            "optimizer (s)",
            "generated tokens / s"
        ]
    );
    let generation = polyline(panels(&svg)[0], "raw");
    assert_eq!(generation.len(), 5);
    assert!(
        generation[0].1 > generation[4].1,
        "rising seconds go up the panel"
    );
}
