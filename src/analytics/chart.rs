//! Analytics pictures as SVG (plotters' SVG backend): a forecast with its interval after the
//! history, and a series with its anomalies marked. Self-contained SVG text that a browser, an
//! `<img>` or a notification email shows as is.
//!
//! plotters is built without fonts (no system font lookup, no bitmap code), so the few labels
//! (title, value range, time range) are SVG `<text>` elements added here and drawn by the
//! viewer's renderer.

use chrono::{TimeZone, Utc};
use plotters::prelude::*;

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 360;
/// Room for the labels around the plot.
const MARGIN_TOP: u32 = 36;
const MARGIN_BOTTOM: u32 = 28;
const MARGIN_SIDE: u32 = 64;

const HISTORY: RGBColor = RGBColor(31, 119, 180);
const FORECAST: RGBColor = RGBColor(255, 127, 14);
const BAND: RGBColor = RGBColor(255, 204, 153);
const ANOMALY: RGBColor = RGBColor(214, 39, 40);

/// One forecast step: time, value, lower and upper bound.
pub type ForecastStep = (i64, f64, f64, f64);

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn time_label(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M").to_string())
}

/// Ranges padded so a flat series still has height.
fn bounds(
    times: impl Iterator<Item = i64> + Clone,
    values: impl Iterator<Item = f64> + Clone,
) -> (i64, i64, f64, f64) {
    let (t0, t1) = times
        .clone()
        .fold((i64::MAX, i64::MIN), |(a, b), t| (a.min(t), b.max(t)));
    let (v0, v1) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let (t0, t1) = if t0 > t1 {
        (0, 1)
    } else if t0 == t1 {
        (t0.saturating_sub(1), t1.saturating_add(1))
    } else {
        (t0, t1)
    };
    let (v0, v1) = if !v0.is_finite() {
        (0.0, 1.0)
    } else if v1 - v0 < 1e-9 {
        (v0 - 1.0, v1 + 1.0)
    } else {
        let pad = (v1 - v0) * 0.05;
        (v0 - pad, v1 + pad)
    };
    (t0, t1, v0, v1)
}

/// Adds the title and the axis ranges as text, and closes the document.
fn labelled(
    svg: String,
    title: &str,
    (t0, t1, v0, v1): (i64, i64, f64, f64),
    legend: &[(&str, RGBColor)],
) -> String {
    let mut labels = format!(
        r##"<text x="{x}" y="22" font-family="sans-serif" font-size="15" fill="#222">{title}</text>
<text x="{l}" y="{top}" font-family="sans-serif" font-size="11" fill="#555" text-anchor="end">{v1}</text>
<text x="{l}" y="{bottom}" font-family="sans-serif" font-size="11" fill="#555" text-anchor="end">{v0}</text>
<text x="{side}" y="{below}" font-family="sans-serif" font-size="11" fill="#555">{t0}</text>
<text x="{right}" y="{below}" font-family="sans-serif" font-size="11" fill="#555" text-anchor="end">{t1}</text>
"##,
        x = MARGIN_SIDE,
        title = escape(title),
        l = MARGIN_SIDE - 6,
        top = MARGIN_TOP + 10,
        bottom = HEIGHT - MARGIN_BOTTOM,
        side = MARGIN_SIDE,
        right = WIDTH - MARGIN_SIDE,
        below = HEIGHT - 8,
        v0 = format_value(v0),
        v1 = format_value(v1),
        t0 = time_label(t0),
        t1 = time_label(t1),
    );
    let mut x = WIDTH - MARGIN_SIDE;
    for (name, colour) in legend.iter().rev() {
        let width = 14 + 7 * name.len() as u32;
        x -= width;
        labels.push_str(&format!(
            r##"<rect x="{x}" y="12" width="10" height="10" fill="rgb({},{},{})"/><text x="{}" y="21" font-family="sans-serif" font-size="11" fill="#333">{}</text>
"##,
            colour.0,
            colour.1,
            colour.2,
            x + 13,
            escape(name)
        ));
    }
    match svg.rfind("</svg>") {
        Some(end) => format!("{}{}{}", &svg[..end], labels, &svg[end..]),
        None => svg,
    }
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 || v.abs() < 0.01 && v != 0.0 {
        format!("{v:.3e}")
    } else {
        format!("{v:.2}")
    }
}

/// The history as a line, then the forecast with its interval as a band.
pub fn forecast_svg(
    title: &str,
    history: &[(i64, f64)],
    forecast: &[ForecastStep],
) -> Result<String, String> {
    let times = history.iter().map(|p| p.0).chain(forecast.iter().map(|f| f.0));
    let values = history
        .iter()
        .map(|p| p.1)
        .chain(forecast.iter().flat_map(|f| [f.1, f.2, f.3]));
    let range = bounds(times, values);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .margin_top(MARGIN_TOP)
            .margin_bottom(MARGIN_BOTTOM)
            .margin_left(MARGIN_SIDE)
            .margin_right(MARGIN_SIDE)
            .build_cartesian_2d(range.0..range.1, range.2..range.3)
            .map_err(|e| e.to_string())?;
        chart
            .plotting_area()
            .draw(&Rectangle::new(
                [(range.0, range.2), (range.1, range.3)],
                RGBColor(200, 200, 200).stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
        if !forecast.is_empty() {
            let band: Vec<(i64, f64)> = forecast
                .iter()
                .map(|f| (f.0, f.3.clamp(range.2, range.3)))
                .chain(forecast.iter().rev().map(|f| (f.0, f.2.clamp(range.2, range.3))))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(band, BAND.mix(0.6).filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(history.iter().copied(), HISTORY.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        let joined = history
            .last()
            .map(|&(t, v)| (t, v))
            .into_iter()
            .chain(forecast.iter().map(|f| (f.0, f.1)));
        chart
            .draw_series(LineSeries::new(joined, FORECAST.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(labelled(
        svg,
        title,
        range,
        &[("history", HISTORY), ("forecast", FORECAST), ("interval", BAND)],
    ))
}

/// A series as a line with its anomalies as red circles.
pub fn anomalies_svg(title: &str, series: &[(i64, f64)], anomalies: &[(i64, f64)]) -> Result<String, String> {
    let range = bounds(
        series.iter().map(|p| p.0).chain(anomalies.iter().map(|a| a.0)),
        series.iter().map(|p| p.1).chain(anomalies.iter().map(|a| a.1)),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .margin_top(MARGIN_TOP)
            .margin_bottom(MARGIN_BOTTOM)
            .margin_left(MARGIN_SIDE)
            .margin_right(MARGIN_SIDE)
            .build_cartesian_2d(range.0..range.1, range.2..range.3)
            .map_err(|e| e.to_string())?;
        chart
            .plotting_area()
            .draw(&Rectangle::new(
                [(range.0, range.2), (range.1, range.3)],
                RGBColor(200, 200, 200).stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(series.iter().copied(), HISTORY.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                anomalies
                    .iter()
                    .map(|&(t, v)| Circle::new((t, v), 5, ANOMALY.stroke_width(2))),
            )
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(labelled(
        svg,
        title,
        range,
        &[("value", HISTORY), ("anomaly", ANOMALY)],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forecast_picture_has_its_parts() {
        let history: Vec<(i64, f64)> = (0..50).map(|i| (i * 1000, (i as f64 * 0.3).sin())).collect();
        let forecast: Vec<ForecastStep> = (50..60).map(|i| (i * 1000, 0.0, -1.0, 1.0)).collect();
        let svg = forecast_svg("sensor-1 <temperature>", &history, &forecast).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{svg}"
        );
        assert!(
            svg.contains("<polygon") || svg.contains("<path"),
            "the interval band"
        );
        assert!(svg.contains("<polyline"), "the lines");
        assert!(svg.contains("sensor-1 &lt;temperature&gt;"), "the title, escaped");
    }

    #[test]
    fn anomaly_picture_marks_each_anomaly_and_survives_flat_or_empty_data() {
        let series: Vec<(i64, f64)> = (0..20).map(|i| (i * 1000, 5.0)).collect();
        let svg = anomalies_svg("flat", &series, &[(3000, 5.0), (9000, 5.0)]).unwrap();
        assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
        assert!(anomalies_svg("empty", &[], &[]).unwrap().contains("</svg>"));
    }
}
