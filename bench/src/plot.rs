//! SVG plots of the results (plotters' SVG backend: no fonts or native libraries needed).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::chaos;
use crate::load::{Summary, PLOT_QUANTILES};

const COLORS: [RGBColor; 4] =
    [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e), RGBColor(0x2c, 0xa0, 0x2c), RGBColor(0xd6, 0x27, 0x28)];

/// Send -> delivered latency by percentile, one line per target (one run each: the median run).
pub fn latency(runs: &[Summary], title: &str, out: &Path) -> anyhow::Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plot: {e:?}");
    let root = SVGBackend::new(out, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let max = runs.iter().flat_map(|r| r.deliver_curve.iter().map(|p| p[1])).fold(1.0, f64::max);
    let n = PLOT_QUANTILES.len() - 1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..n as f64, (0.01f64..max * 2.0).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let q = PLOT_QUANTILES[(x.round() as usize).min(n)];
            if q == 0.0 {
                "min".into()
            } else if q == 1.0 {
                "max".into()
            } else {
                format!("p{}", (q * 100.0 * 100.0).round() / 100.0)
            }
        })
        .x_desc("percentile")
        .y_desc("send -> delivered (ms, log scale)")
        .draw()
        .map_err(e)?;
    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = run.deliver_curve.iter().enumerate().map(|(x, p)| (x as f64, p[1].max(0.01)));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(e)?
            .label(format!("{} ({})", run.target, run.pace))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    finish(&root, out)
}

/// Acknowledged messages per second over the first `seconds` of a chaos run, with each kill marked.
pub fn failover(report: &chaos::Report, seconds: f64, out: &Path) -> anyhow::Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plot: {e:?}");
    let root = SVGBackend::new(out, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let buckets = ((seconds * 10.0) as usize).min(report.acks_per_100ms.len());
    let rate: Vec<(f64, f64)> = report.acks_per_100ms[..buckets]
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as f64 / 10.0, f64::from(n) * 10.0))
        .collect();
    let top = rate.iter().map(|p| p.1).fold(10.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Acknowledged msg/s through kill -9 (offered {:.0}/s, {} users)", report.rate, report.users),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..seconds, 0f64..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("acknowledged msg/s (100 ms bins)")
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(rate, COLORS[0].stroke_width(2)))
        .map_err(e)?
        .label("acknowledged msg/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[0].stroke_width(2)));
    let kills: Vec<&chaos::Cycle> = report.cycles.iter().filter(|c| c.killed_at_ms / 1000.0 < seconds).collect();
    let mut labelled = (false, false);
    for c in kills {
        let x = c.killed_at_ms / 1000.0;
        let color = if c.victim_was_primary { COLORS[3] } else { COLORS[1] };
        let series = chart.draw_series(LineSeries::new(vec![(x, 0.0), (x, top)], color.stroke_width(1))).map_err(e)?;
        let first = if c.victim_was_primary { &mut labelled.0 } else { &mut labelled.1 };
        if !*first {
            *first = true;
            let what = if c.victim_was_primary { "kill -9 primary" } else { "kill -9 backup" };
            series.label(what).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    finish(&root, out)
}

/// One point of a latency curve: a target at an offered rate.
pub struct CurvePoint {
    pub target: String,
    /// Offered msg/s (the fixed rate the users sent at).
    pub offered: f64,
    /// Acknowledged msg/s (median run).
    pub achieved: f64,
    /// p99 send -> delivered, ms (median of the runs).
    pub p99_ms: f64,
}

/// p99 send -> delivered against offered load, one line per target: where each target's knee is. A point
/// where the target acknowledged less than 95 % of what was offered (it could not keep up) is drawn as a cross.
pub fn curve(points: &[CurvePoint], title: &str, out: &Path) -> anyhow::Result<()> {
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("plot: {e:?}");
    let root = SVGBackend::new(out, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let max_x = points.iter().map(|p| p.offered).fold(1.0, f64::max);
    let max_y = points.iter().map(|p| p.p99_ms).fold(1.0, f64::max);
    let min_x = points.iter().map(|p| p.offered).fold(max_x, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d((min_x * 0.8..max_x * 1.25).log_scale(), (0.05f64..max_y * 3.0).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("offered msg/s (log scale)")
        .y_desc("p99 send -> delivered (ms, log scale)")
        .draw()
        .map_err(e)?;
    let mut targets: Vec<&str> = Vec::new();
    for p in points {
        if !targets.contains(&p.target.as_str()) {
            targets.push(&p.target);
        }
    }
    for (i, target) in targets.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut line: Vec<&CurvePoint> = points.iter().filter(|p| p.target == *target).collect();
        line.sort_by(|a, b| a.offered.total_cmp(&b.offered));
        chart
            .draw_series(LineSeries::new(line.iter().map(|p| (p.offered, p.p99_ms.max(0.05))), color.stroke_width(2)))
            .map_err(e)?
            .label(*target)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(line.iter().map(|p| {
                let at = (p.offered, p.p99_ms.max(0.05));
                if p.achieved >= 0.95 * p.offered {
                    Circle::new(at, 4, color.filled()).into_dyn()
                } else {
                    Cross::new(at, 6, color.stroke_width(2)).into_dyn()
                }
            }))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    finish(&root, out)
}

/// Write the file and say so.
fn finish(root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, out: &Path) -> anyhow::Result<()> {
    root.present().map_err(|e| anyhow!("plot: {e:?}"))?;
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}
