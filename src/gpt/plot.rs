//! The spike lab's figures with `plotters`: loss curves and an update-ratio
//! heatmap, as SVG (with axis labels) and PNG (no font is bundled, so the
//! PNG carries the lines and colors only; the report names them).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{KeelError, Result};

/// The file format of a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics, with text.
    Svg,
    /// A bitmap, without text.
    Png,
}

const PALETTE: [(RGBColor, &str); 8] = [
    (RGBColor(0, 0, 0), "black"),
    (RGBColor(230, 25, 75), "red"),
    (RGBColor(60, 180, 75), "green"),
    (RGBColor(0, 130, 200), "blue"),
    (RGBColor(245, 130, 48), "orange"),
    (RGBColor(145, 30, 180), "purple"),
    (RGBColor(70, 200, 220), "cyan"),
    (RGBColor(170, 110, 40), "brown"),
];

/// The name of the color of series `i` (for legends in text).
pub fn color_name(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()].1
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> KeelError {
    KeelError::Data(format!("cannot draw `{}`: {e}", path.display()))
}

/// Draws `(name, losses)` series (5-step means, NaN/Inf gaps dropped, values
/// clipped at `ymax`) to `path`.
pub fn loss_curves(
    path: &Path,
    series: &[(String, Vec<f64>)],
    ymax: f64,
    format: Format,
) -> Result<()> {
    let size = (720, 420);
    match format {
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_curves(&root, series, ymax, true).map_err(|e| plot_err(path, e))?;
            root.present().map_err(|e| plot_err(path, e))
        }
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_curves(&root, series, ymax, false).map_err(|e| plot_err(path, e))?;
            root.present().map_err(|e| plot_err(path, e))
        }
    }
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn smooth(x: &[f64], k: usize) -> Vec<(f64, f64)> {
    (0..x.len())
        .filter_map(|i| {
            let w = &x[i.saturating_sub(k - 1)..=i];
            let m = w.iter().sum::<f64>() / w.len() as f64;
            m.is_finite().then_some((i as f64, m))
        })
        .collect()
}

fn draw_curves<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[(String, Vec<f64>)],
    ymax: f64,
    text: bool,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let steps = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(1) as f64;
    // Room for the highest curve, never above the caller's ceiling.
    let top = series
        .iter()
        .flat_map(|s| smooth(&s.1, 5))
        .map(|p| p.1)
        .fold(f64::NEG_INFINITY, f64::max);
    let ymax = if top.is_finite() {
        top.min(ymax) + 0.1
    } else {
        ymax
    };
    let ymin = series
        .iter()
        .flat_map(|s| smooth(&s.1, 5))
        .map(|p| p.1)
        .fold(ymax, f64::min)
        .min(ymax - 0.5)
        - 0.1;
    let mut builder = ChartBuilder::on(root);
    builder.margin(12);
    if text {
        builder
            .caption("training loss (5-step mean), seed 0", ("sans-serif", 18))
            .x_label_area_size(36)
            .y_label_area_size(48);
    }
    let mut chart = builder.build_cartesian_2d(0.0..steps, ymin..ymax)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .light_line_style(WHITE)
            .draw()?;
    }
    for (i, (name, losses)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].0;
        let points: Vec<(f64, f64)> = smooth(losses, 5)
            .into_iter()
            .map(|(x, y)| (x, y.min(ymax)))
            .collect();
        let s = chart.draw_series(LineSeries::new(points, color.stroke_width(1)))?;
        if text {
            s.label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// Draws `ratios[step][layer]` (log10, steps from `first_step`) as a
/// heatmap with one row per layer (the first at the bottom) and a mark at
/// `mark_step`.
pub fn heatmap(
    path: &Path,
    layers: &[String],
    ratios: &[Vec<f64>],
    first_step: usize,
    mark_step: usize,
    format: Format,
) -> Result<()> {
    let size = (720, 60 + 40 * layers.len() as u32);
    match format {
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_heatmap(&root, layers, ratios, first_step, mark_step, true)
                .map_err(|e| plot_err(path, e))?;
            root.present().map_err(|e| plot_err(path, e))
        }
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_heatmap(&root, layers, ratios, first_step, mark_step, false)
                .map_err(|e| plot_err(path, e))?;
            root.present().map_err(|e| plot_err(path, e))
        }
    }
}

fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    layers: &[String],
    ratios: &[Vec<f64>],
    first_step: usize,
    mark_step: usize,
    text: bool,
) -> DrawResult<DB> {
    root.fill(&WHITE)?;
    let logs: Vec<f64> = ratios
        .iter()
        .flatten()
        .filter(|r| **r > 0.0 && r.is_finite())
        .map(|r| r.log10())
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let x0 = first_step as f64;
    let x1 = (first_step + ratios.len()) as f64;
    let mut builder = ChartBuilder::on(root);
    builder.margin(12);
    if text {
        builder
            .caption(
                format!("log10 ||dw||/||w|| per layer ({lo:.1} dark .. {hi:.1} bright)"),
                ("sans-serif", 16),
            )
            .x_label_area_size(30)
            .y_label_area_size(60);
    }
    let n = layers.len() as i32;
    let mut chart = builder.build_cartesian_2d(x0..x1, (0..n).into_segmented())?;
    if text {
        let names = layers.to_vec();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_labels(layers.len())
            .y_label_formatter(&move |y| match y {
                SegmentValue::CenterOf(i) if *i >= 0 && (*i as usize) < names.len() => {
                    names[*i as usize].clone()
                }
                _ => String::new(),
            })
            .draw()?;
    }
    chart.draw_series(ratios.iter().enumerate().flat_map(|(s, row)| {
        row.iter().enumerate().map(move |(l, &r)| {
            let v = if r > 0.0 && r.is_finite() {
                ((r.log10() - lo) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let x = x0 + s as f64;
            let l = l as i32;
            Rectangle::new(
                [
                    (x, SegmentValue::Exact(l)),
                    (x + 1.0, SegmentValue::Exact(l + 1)),
                ],
                ramp(v).filled(),
            )
        })
    }))?;
    let m = mark_step as f64;
    for x in [m, m + 1.0] {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
            RED.stroke_width(2),
        )))?;
    }
    Ok(())
}

/// Dark blue (0) through teal to yellow (1).
fn ramp(v: f64) -> RGBColor {
    let stops = [
        (68.0, 1.0, 84.0),
        (33.0, 145.0, 140.0),
        (253.0, 231.0, 37.0),
    ];
    let (i, f) = if v < 0.5 {
        (0, v * 2.0)
    } else {
        (1, (v - 0.5) * 2.0)
    };
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}
