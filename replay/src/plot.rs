//! SVG plots of a replay: load against each policy's capacity, and replicas over time, with
//! SLA violations and labelled anomalies marked.

use std::path::Path;

use plotters::prelude::*;

use crate::report::ReportError;
use crate::sim::Step;

/// Points drawn per series at most: longer runs are reduced to bucket maxima, which keeps
/// peaks (what a reader looks for) and the file small.
const MAX_POINTS: usize = 1500;

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

fn reduce(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let per = points.len().div_ceil(MAX_POINTS);
    points
        .chunks(per)
        .map(|c| {
            let x = c[0].0;
            let y = c.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            (x, y)
        })
        .collect()
}

fn hours(t_ms: i64, t0: i64) -> f64 {
    (t_ms - t0) as f64 / 3_600_000.0
}

/// One policy's steps, by name, in drawing order.
pub type Runs<'a> = [(&'a str, &'a [Step])];

fn draw_err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> ReportError + '_ {
    move |e| ReportError::Plot {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

/// `load.svg`: the load and each policy's ready capacity (in `unit`), violations of ebb and
/// hpa marked under the axis, labelled anomaly windows shaded.
pub fn load_vs_capacity(
    path: &Path,
    runs: &Runs<'_>,
    capacity_per_replica: f64,
    unit: &str,
    anomalies: &[(i64, i64)],
) -> Result<(), ReportError> {
    let err = draw_err(path);
    let Some((_, first)) = runs.first() else {
        return Ok(());
    };
    let Some(t0) = first.first().map(|s| s.t_ms) else {
        return Ok(());
    };
    let t1 = first.last().map_or(t0 + 1, |s| s.t_ms.max(t0 + 1));
    let load: Vec<(f64, f64)> = first.iter().map(|s| (hours(s.t_ms, t0), s.load)).collect();
    let top = runs
        .iter()
        .flat_map(|(_, steps)| steps.iter())
        .map(|s| s.load.max(f64::from(s.ready) * capacity_per_replica))
        .fold(1.0, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let x_max = hours(t1, t0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("load vs ready capacity ({unit})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, -top * 0.06..top)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("hours")
        .light_line_style(WHITE)
        .draw()
        .map_err(&err)?;
    for &(from, until) in anomalies {
        let (a, b) = (hours(from, t0), hours(until, t0));
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b, top)],
                RGBColor(0xff, 0xe0, 0xe0).filled(),
            )))
            .map_err(&err)?;
    }
    chart
        .draw_series(LineSeries::new(reduce(&load), BLACK.stroke_width(1)))
        .map_err(&err)?
        .label("load")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    for (k, (name, steps)) in runs.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let capacity: Vec<(f64, f64)> = steps
            .iter()
            .map(|s| (hours(s.t_ms, t0), f64::from(s.ready) * capacity_per_replica))
            .collect();
        chart
            .draw_series(LineSeries::new(reduce(&capacity), color.stroke_width(1)))
            .map_err(&err)?
            .label(format!("{name} capacity"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        if *name == "ebb" || *name == "hpa" {
            let row = if *name == "ebb" { -0.02 } else { -0.045 } * top;
            chart
                .draw_series(
                    steps
                        .iter()
                        .filter(|s| s.violated)
                        .map(|s| Circle::new((hours(s.t_ms, t0), row), 2, color.filled())),
                )
                .map_err(&err)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)
}

/// `replicas.svg`: replicas asked for over time, per policy.
pub fn replicas(path: &Path, runs: &Runs<'_>) -> Result<(), ReportError> {
    let err = draw_err(path);
    let Some(t0) = runs.first().and_then(|(_, s)| s.first()).map(|s| s.t_ms) else {
        return Ok(());
    };
    let t1 = runs
        .first()
        .and_then(|(_, s)| s.last())
        .map_or(t0 + 1, |s| s.t_ms.max(t0 + 1));
    let top = runs
        .iter()
        .flat_map(|(_, s)| s.iter())
        .map(|s| f64::from(s.target))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (1200, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("replicas asked for", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..hours(t1, t0), 0.0..top)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("hours")
        .light_line_style(WHITE)
        .draw()
        .map_err(&err)?;
    for (k, (name, steps)) in runs.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<(f64, f64)> = steps
            .iter()
            .map(|s| (hours(s.t_ms, t0), f64::from(s.target)))
            .collect();
        chart
            .draw_series(LineSeries::new(reduce(&points), color.stroke_width(1)))
            .map_err(&err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)
}
