//! The report's plots, drawn by `plotters` as SVG (sharp at any size, text left to the viewer's
//! fonts): the lateness CDF of the burst (share delivered within a given lateness, log-scale x),
//! and throughput (ingest and drain, per system).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::report::Results;
use super::{Sizes, System};

const SIZE: (u32, u32) = (960, 560);
const FONT: &str = "sans-serif";

/// One colour per system, the same in every plot (the Tableau 10 palette).
fn color(system: System) -> RGBColor {
    match system {
        System::Punctual => RGBColor(31, 119, 180),
        System::Zset => RGBColor(255, 127, 14),
        System::Keyspace => RGBColor(44, 160, 44),
        System::Beanstalkd => RGBColor(214, 39, 40),
        System::PunctualResp => RGBColor(148, 103, 189),
    }
}

fn drawing<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow!("drawing the plot: {error:?}")
}

/// Draws the legend at `at` in both plots' style, then writes the file.
fn legend_and_present<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    root: &DrawingArea<DB, plotters::coord::Shift>,
    at: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(at)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing)
}

/// Lateness from 10^2 µs (0.1 ms) to 10^8 µs (100 s).
const X_RANGE_US: (f64, f64) = (1e2, 1e8);

fn lateness_label(us: f64) -> String {
    match us {
        us if us < 1e3 => format!("{} ms", us / 1e3),
        us if us < 1e6 => format!("{} ms", (us / 1e3).round()),
        us => format!("{} s", (us / 1e6).round()),
    }
}

/// The share of the burst delivered within each lateness of a log-spaced sweep: the curve's points.
pub fn cdf_points(hist: &hdrhistogram::Histogram<u64>, due: u64) -> Vec<(f64, f64)> {
    let (lo, hi) = (X_RANGE_US.0.log10(), X_RANGE_US.1.log10());
    (0..=600)
        .map(|i| {
            let us = 10f64.powf(lo + (hi - lo) * f64::from(i) / 600.0);
            let share = hist.count_between(0, us as u64) as f64 / due.max(1) as f64;
            (us, share.clamp(0.0, 1.0))
        })
        .collect()
}

/// Draws the burst lateness of every system that has one into `path`; false if there is none.
pub fn lateness_cdf(path: &Path, res: &Results, s: &Sizes) -> Result<bool> {
    if res.lateness.is_empty() {
        return Ok(false);
    }
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let title = format!(
        "Burst: {} tasks due over {} s with {} pending — share delivered within a lateness",
        s.burst,
        s.burst_over_ms as f64 / 1000.0,
        s.tasks
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 18))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(64)
        .build_cartesian_2d((X_RANGE_US.0..X_RANGE_US.1).log_scale(), 0f64..1.0)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("lateness: due time to the consumer holding the task (log scale)")
        .y_desc("share of the burst delivered")
        .x_label_formatter(&|us| lateness_label(*us))
        .y_label_formatter(&|share| format!("{:.0} %", share * 100.0))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(drawing)?;
    for (system, (hist, due)) in &res.lateness {
        let c = color(*system);
        chart
            .draw_series(LineSeries::new(cdf_points(hist, *due), c.stroke_width(3)))
            .map_err(drawing)?
            .label(system.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
    }
    legend_and_present(&mut chart, &root, SeriesLabelPosition::LowerRight)?;
    Ok(true)
}

/// The figures the throughput plot shows: (group label, figure key).
fn throughput_groups(res: &Results) -> Vec<(String, &'static str)> {
    [
        ("ingest, 1 connection", "ingest_1"),
        ("ingest, 4 connections", "ingest_4"),
        ("drain", "drain_rate"),
    ]
    .into_iter()
    .filter(|(_, key)| res.rows.iter().any(|r| r.key == *key))
    .map(|(label, key)| (label.to_owned(), key))
    .collect()
}

/// Draws ingest and drain (medians of the runs, tasks/s) per system into `path`; false if the run
/// measured neither.
pub fn throughput(path: &Path, res: &Results, systems: &[System]) -> Result<bool> {
    let groups = throughput_groups(res);
    let bars: Vec<(usize, usize, System, f64)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, (_, key))| {
            systems
                .iter()
                .enumerate()
                .filter_map(move |(i, &sys)| Some((g, i, sys, res.median(key, sys)?)))
        })
        .filter(|(.., v)| v.is_finite())
        .collect();
    if bars.is_empty() {
        return Ok(false);
    }
    let top = bars.iter().map(|b| b.3).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput: tasks per second, median of the runs",
            (FONT, 18),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top.max(1.0))
        .map_err(drawing)?;
    let names: Vec<String> = groups.iter().map(|(label, _)| label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Group labels sit at the middle of each group (x = g + 0.5).
            let g = x - 0.5;
            if (g - g.round()).abs() < 1e-6 && g >= 0.0 {
                names.get(g.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| {
            if *v >= 1000.0 {
                format!("{:.0} k", v / 1000.0)
            } else {
                format!("{v:.0}")
            }
        })
        .y_desc("tasks per second")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(drawing)?;
    let width = 0.8 / systems.len().max(1) as f64;
    for &sys in systems {
        let c = color(sys);
        let mine: Vec<_> = bars.iter().filter(|b| b.2 == sys).collect();
        if mine.is_empty() {
            continue;
        }
        chart
            .draw_series(mine.iter().map(|&&(g, i, _, v)| {
                let x0 = g as f64 + 0.1 + width * i as f64;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], c.filled())
            }))
            .map_err(drawing)?
            .label(sys.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], c.filled()));
    }
    legend_and_present(&mut chart, &root, SeriesLabelPosition::UpperRight)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cdf_rises_from_zero_to_the_share_delivered() {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for us in [500u64, 2_000, 2_000, 40_000] {
            hist.record(us).unwrap();
        }
        // Five were due, four came.
        let points = cdf_points(&hist, 5);
        assert_eq!(points.first().unwrap().1, 0.0);
        assert!((points.last().unwrap().1 - 0.8).abs() < 1e-9);
        assert!(
            points
                .windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0)
        );
        assert_eq!(lateness_label(1e2), "0.1 ms");
        assert_eq!(lateness_label(1e5), "100 ms");
        assert_eq!(lateness_label(1e7), "10 s");
    }
}
