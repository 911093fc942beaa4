//! The spike lab's figures with `plotters`: loss curves and an update-ratio
//! heatmap, as SVG or PNG, with captions, axis labels and legends. Text is
//! laid out with a bundled font (a 20 KB subset of DejaVu Sans,
//! `assets/fonts/`), so a figure draws on every machine, fonts installed or
//! not: a PNG's text is drawn in it; an SVG names the family `sans-serif`
//! and its viewer draws the text in its own sans-serif font.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{KeelError, Result};

/// The file format of a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics.
    Svg,
    /// A bitmap.
    Png,
}

/// The figures' font: DejaVu Sans cut to Latin, Greek and a few marks
/// (license and how it was cut: `assets/fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

/// Width in pixels of the loss figure's legend column.
const LEGEND_WIDTH: u32 = 160;

/// The family name the figures ask for (plotters' default for labels).
const FAMILY: &str = "sans-serif";

/// Registers [`FONT`] as [`FAMILY`] with plotters once per process; its
/// text layout fails without a registered font.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(KeelError::Data(
            "the bundled plot font could not be read".into(),
        ))
    }
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
/// clipped at `ymax`) to `path`. Errors on a `ymax` that is not finite.
pub fn loss_curves(
    path: &Path,
    series: &[(String, Vec<f64>)],
    ymax: f64,
    format: Format,
) -> Result<()> {
    if !ymax.is_finite() {
        return Err(KeelError::config(
            "ymax",
            format!("the loss axis needs a finite top, got {ymax}"),
        ));
    }
    ensure_font()?;
    let size = (840, 420);
    match format {
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_curves(&root, series, ymax).map_err(|e| plot_err(path, e))?;
            root.present().map_err(|e| plot_err(path, e))
        }
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_curves(&root, series, ymax).map_err(|e| plot_err(path, e))?;
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
    // The legend gets its own column at the right, off the curves.
    let (width, _) = root.dim_in_pixel();
    let (plot_area, legend_area) = root.split_horizontally(width.saturating_sub(LEGEND_WIDTH));
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .caption("training loss (5-step mean), seed 0", (FAMILY, 18))
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..steps, ymin..ymax)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    for (i, (name, losses)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].0;
        let points: Vec<(f64, f64)> = smooth(losses, 5)
            .into_iter()
            .map(|(x, y)| (x, y.min(ymax)))
            .collect();
        chart.draw_series(LineSeries::new(points, color.stroke_width(1)))?;
        let y = 48 + 22 * i as i32;
        legend_area.draw(&PathElement::new(
            vec![(4, y), (26, y)],
            color.stroke_width(2),
        ))?;
        legend_area.draw(&Text::new(
            name.as_str(),
            (32, y),
            TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    Ok(())
}

/// Draws `ratios[step][layer]` (log10, steps from `first_step`) as a
/// heatmap with one row per layer (the first at the bottom) and a mark at
/// `mark_step`. Errors when `mark_step` is not one of the steps drawn, or
/// there are more layers than a figure holds.
pub fn heatmap(
    path: &Path,
    layers: &[String],
    ratios: &[Vec<f64>],
    first_step: usize,
    mark_step: usize,
    format: Format,
) -> Result<()> {
    let steps = first_step..first_step.saturating_add(ratios.len());
    if !steps.contains(&mark_step) || steps.end == usize::MAX {
        return Err(KeelError::config(
            "mark_step",
            format!("{mark_step} is not one of the steps drawn, {steps:?}"),
        ));
    }
    // 40 pixels a row: past this the bitmap would not fit in memory.
    const MAX_LAYERS: usize = 1000;
    if layers.len() > MAX_LAYERS {
        return Err(KeelError::config(
            "layers",
            format!(
                "{} rows; a heatmap draws at most {MAX_LAYERS}",
                layers.len()
            ),
        ));
    }
    let size = (720, 60 + 40 * layers.len() as u32);
    ensure_font()?;
    match format {
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            draw_heatmap(&root, layers, ratios, first_step, mark_step)
                .map_err(|e| plot_err(path, e))?;
            root.present().map_err(|e| plot_err(path, e))
        }
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            draw_heatmap(&root, layers, ratios, first_step, mark_step)
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
    let n = layers.len() as i32;
    let mut chart = ChartBuilder::on(root)
        .margin(12)
        .caption(
            format!("log10 ||dw||/||w|| per layer ({lo:.1} dark .. {hi:.1} bright)"),
            (FAMILY, 16),
        )
        .x_label_area_size(30)
        .y_label_area_size(60)
        // A segmented range `0..k` has k + 1 segments: `0..n - 1` gives the
        // n layer rows and no empty one on top.
        .build_cartesian_2d(x0..x1, (0..(n - 1).max(0)).into_segmented())?;
    let names = layers.to_vec();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(layers.len())
        .y_label_formatter(&move |y| match y {
            SegmentValue::CenterOf(i) if *i >= 0 && (*i as usize) < names.len() => {
                names[*i as usize].clone()
            }
            _ => String::new(),
        })
        .draw()?;
    // The top edge of layer row `l`: the last row ends where the axis does.
    let row_top = |l: i32| {
        if l + 1 >= n {
            SegmentValue::Last
        } else {
            SegmentValue::Exact(l + 1)
        }
    };
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
                [(x, SegmentValue::Exact(l)), (x + 1.0, row_top(l))],
                ramp(v).filled(),
            )
        })
    }))?;
    let m = mark_step as f64;
    for x in [m, m + 1.0] {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Last)],
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Dark pixels (all channels below 100) of an RGB buffer `w` wide, in
    /// columns `xs` and rows `ys`.
    fn dark_pixels(
        buf: &[u8],
        w: u32,
        xs: std::ops::Range<u32>,
        ys: std::ops::Range<u32>,
    ) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| ((y * w + x) * 3) as usize))
            .filter(|&i| buf[i..i + 3].iter().all(|&c| c < 100))
            .count()
    }

    /// Draws the loss figure of one series named `name` into a bitmap.
    fn loss_bitmap(name: &str) -> (Vec<u8>, u32) {
        ensure_font().unwrap();
        let (w, h) = (840u32, 420u32);
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            let losses: Vec<f64> = (0..50).map(|i| 4.0 - 0.02 * i as f64).collect();
            draw_curves(&root, &[(name.to_string(), losses)], 5.0).unwrap();
            root.present().unwrap();
        }
        (buf, w)
    }

    #[test]
    fn bitmaps_carry_text_in_the_bundled_font() {
        let (named, w) = loss_bitmap("adamw+guard");
        let (unnamed, _) = loss_bitmap("");
        // The legend column: the series' name is drawn right of its swatch.
        let name_box = (w - LEGEND_WIDTH + 32..w, 38..58);
        let with_name = dark_pixels(&named, w, name_box.0.clone(), name_box.1.clone());
        let without = dark_pixels(&unnamed, w, name_box.0, name_box.1);
        assert_eq!(without, 0, "an empty name left ink in the legend");
        assert!(
            with_name > 40,
            "the legend name drew {with_name} dark pixels"
        );
        // The caption, centered over the plot.
        let caption = dark_pixels(&named, w, 200..500, 0..30);
        assert!(caption > 100, "the caption drew {caption} dark pixels");
    }

    #[test]
    fn figures_refuse_ranges_they_cannot_draw() {
        let dir = std::env::temp_dir().join(format!("keel-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.svg");
        let series = [("a".to_string(), vec![3.0, 2.0, 1.0])];
        for ymax in [f64::NEG_INFINITY, f64::INFINITY, f64::NAN] {
            let e = loss_curves(&path, &series, ymax, Format::Svg).unwrap_err();
            assert!(e.to_string().contains("`ymax`"), "{e}");
        }
        let rows = [vec![0.1], vec![0.2]];
        let layers = ["a".to_string()];
        for (first, mark) in [(usize::MAX, 0), (0, usize::MAX), (10, 9), (10, 12)] {
            let e = heatmap(&path, &layers, &rows, first, mark, Format::Svg).unwrap_err();
            assert!(e.to_string().contains("`mark_step`"), "{first} {mark}: {e}");
        }
        assert!(!path.exists());
        // In range, both draw.
        heatmap(&path, &layers, &rows, 10, 11, Format::Svg).unwrap();
        loss_curves(&path, &series, 5.0, Format::Svg).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
