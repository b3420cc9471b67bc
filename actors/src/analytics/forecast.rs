//! Forecasting for predictive maintenance: where will a metric be, and when will it cross a
//! limit?
//!
//! The model is exponential smoothing with an additive damped trend (Holt's damped method,
//! `augurs-ets`), fitted to the series after its seasonality has been taken out by MSTL
//! (`augurs-mstl`); the season length is detected from the data with a periodogram
//! (`augurs-seasons`). A damped trend keeps a long horizon from extrapolating a short-lived
//! slope forever. A seasonal-naive forecast (the value one season earlier) is the baseline
//! every forecast is measured against with [`mase`].
//!
//! Prophet is not used: it has no Rust implementation without embedding a Stan runtime; this
//! decomposition plus damped-trend smoothing covers the same ground (trend plus seasonality with
//! intervals) for sensor series.

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_ets::trend::AutoETSTrendModel;
use augurs_mstl::MSTLModel;

use super::{AnalyticsError, ensure_finite, ensure_len};

/// Default prediction interval level.
pub const DEFAULT_LEVEL: f64 = 0.95;
/// Fewest values a forecast is fitted on.
pub const MIN_HISTORY: usize = 10;

/// A forecast: one point and interval per future step.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub point: Vec<f64>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
    /// Probability the interval is meant to cover (e.g. 0.95).
    pub level: f64,
    /// The season length used, in steps (`None`: no seasonality found).
    pub season: Option<usize>,
}

/// Smallest autocorrelation at which a lag counts as a season.
pub const MIN_SEASON_ACF: f64 = 0.3;

/// Detects the dominant season length (in steps) of `values`, if any: the lag of the highest
/// local peak of the autocorrelation of the linearly detrended series, above
/// [`MIN_SEASON_ACF`], among lags seen at least twice in the data. When a multiple of the season
/// peaks nearly as high (within 10%), the shortest lag wins: a daily cycle also repeats weekly.
///
/// (augurs' periodogram detector was tried first; on a few hundred points its frequency grid is
/// too coarse and it named 62 for a clean 24-step cycle.)
pub fn detect_season(values: &[f64]) -> Option<usize> {
    let max_lag = values.len() / 2;
    let acf = detrended_autocorrelation(values, max_lag + 1)?;
    let peaks: Vec<(usize, f64)> = (2..=max_lag)
        .filter(|&lag| acf[lag] > acf[lag - 1] && acf[lag] >= acf[lag + 1] && acf[lag] >= MIN_SEASON_ACF)
        .map(|lag| (lag, acf[lag]))
        .collect();
    let best = peaks.iter().map(|&(_, r)| r).fold(f64::NEG_INFINITY, f64::max);
    peaks.iter().find(|&&(_, r)| r >= 0.9 * best).map(|&(lag, _)| lag)
}

/// Autocorrelation at lags `0..=max_lag` of `values` after removing their least-squares line
/// (statsmodels' `acf` of scipy's `detrend`). `None` for fewer than 8 values, non-finite values,
/// a perfectly straight series, or `max_lag >= len`.
pub(crate) fn detrended_autocorrelation(values: &[f64], max_lag: usize) -> Option<Vec<f64>> {
    let n = values.len();
    if n < 8 || max_lag >= n || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    // Remove the least-squares line: a trend makes every lag look correlated.
    let t_mean = (n - 1) as f64 / 2.0;
    let y_mean = values.iter().sum::<f64>() / n as f64;
    let (mut sty, mut stt) = (0.0, 0.0);
    for (t, y) in values.iter().enumerate() {
        sty += (t as f64 - t_mean) * (y - y_mean);
        stt += (t as f64 - t_mean).powi(2);
    }
    let slope = sty / stt;
    let residual: Vec<f64> = values
        .iter()
        .enumerate()
        .map(|(t, y)| y - y_mean - slope * (t as f64 - t_mean))
        .collect();
    let denominator: f64 = residual.iter().map(|r| r * r).sum();
    if denominator <= f64::EPSILON * n as f64 {
        return None;
    }
    Some(
        (0..=max_lag)
            .map(|lag| {
                residual
                    .iter()
                    .zip(&residual[lag..])
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    / denominator
            })
            .collect(),
    )
}

/// The trend the smoothing extrapolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trend {
    /// Holt's damped trend: the slope fades over the horizon. The better default for a metric
    /// forecast, as a short-lived slope is not extrapolated forever.
    Damped,
    /// Holt's linear trend: the slope persists. For maintenance, where a metric degrades
    /// steadily towards a limit until someone acts (a battery does not level off at 30%).
    Linear,
}

/// Forecasts `horizon` steps after `values` (equally spaced) with intervals at `level`.
/// `season`: `Some(p)` forces a season length (`Some(1)` none), `None` detects it.
pub fn forecast(
    values: &[f64],
    horizon: usize,
    level: f64,
    season: Option<usize>,
    trend: Trend,
) -> Result<Forecast, AnalyticsError> {
    ensure_len("forecast", values, MIN_HISTORY)?;
    ensure_finite(values)?;
    if !(level > 0.0 && level < 1.0) {
        return Err(AnalyticsError::InvalidParameter {
            name: "level",
            reason: format!("{level} is not within (0, 1)"),
        });
    }
    let season = match season {
        Some(p) if p >= 2 && p * 2 <= values.len() => Some(p),
        Some(p) if p >= 2 => {
            return Err(AnalyticsError::NotEnoughData {
                what: "seasonal forecast (two seasons)",
                needed: p * 2,
                got: values.len(),
            });
        }
        Some(_) => None,
        None => detect_season(values),
    };
    let damped = || -> Result<AutoETS, AnalyticsError> {
        AutoETS::new(1, "AAN")
            .and_then(|m| m.damped(trend == Trend::Damped))
            .map_err(|e| AnalyticsError::Model(e.to_string()))
    };
    let model_error = |e: &dyn std::fmt::Display| AnalyticsError::Model(e.to_string());
    let predicted = match season {
        Some(p) => {
            let model = MSTLModel::new(vec![p], AutoETSTrendModel::from(damped()?));
            let fitted = model.fit(values).map_err(|e| model_error(&e))?;
            fitted.predict(horizon, level).map_err(|e| model_error(&e))?
        }
        None => {
            let fitted = damped()?.fit(values).map_err(|e| model_error(&e))?;
            fitted.predict(horizon, level).map_err(|e| model_error(&e))?
        }
    };
    let intervals = predicted
        .intervals
        .ok_or_else(|| AnalyticsError::Model("the model returned no intervals".into()))?;
    Ok(Forecast {
        point: predicted.point,
        lower: intervals.lower,
        upper: intervals.upper,
        level,
        season,
    })
}

/// Most steps [`fit_recent`] looks ahead; a longer look-ahead widens the steps instead.
pub const MAX_RECENT_HORIZON: usize = 2_000;

/// A forecast of irregularly timed values (`(timestamp ms, value)`, oldest first), as the live
/// analytics fit for `forecast` rule conditions: the values are put on a regular grid (the
/// median spacing between two values, at least 1 s, to the minute from a minute on, widened so that `within_ms` fits in
/// [`MAX_RECENT_HORIZON`] steps; the mean of each step, gaps carried forward), and a linear-trend
/// forecast at [`DEFAULT_LEVEL`] looks `within_ms` ahead. Returns the step, the time and value of
/// the grid's last step, and the forecast (step 1 is one step after that time).
pub fn fit_recent(
    points: &[(i64, f64)],
    within_ms: i64,
) -> Result<(i64, i64, f64, Forecast), AnalyticsError> {
    if points.len() < MIN_HISTORY {
        return Err(AnalyticsError::NotEnoughData {
            what: "forecast",
            needed: MIN_HISTORY,
            got: points.len(),
        });
    }
    if within_ms <= 0 {
        return Err(AnalyticsError::InvalidParameter {
            name: "within",
            reason: format!("{within_ms} ms is not positive"),
        });
    }
    let mut gaps: Vec<i64> = points
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|g| *g > 0)
        .collect();
    gaps.sort_unstable();
    let median_gap = gaps.get(gaps.len() / 2).copied().unwrap_or(1000);
    // Readings a few seconds early or late still mean "every minute" or "every hour".
    let median_gap = if median_gap >= 60_000 {
        (median_gap + 30_000) / 60_000 * 60_000
    } else {
        median_gap
    };
    let step = median_gap
        .max(1000)
        .max((within_ms + MAX_RECENT_HORIZON as i64 - 1) / MAX_RECENT_HORIZON as i64);
    let first = points[0].0;
    let mut grid: Vec<(f64, usize)> = Vec::new();
    for &(ts, v) in points {
        let index = ((ts - first).max(0) / step) as usize;
        if index >= grid.len() {
            grid.resize(index + 1, (0.0, 0));
        }
        grid[index].0 += v;
        grid[index].1 += 1;
    }
    let mut values = Vec::with_capacity(grid.len());
    let mut last = f64::NAN;
    for (sum, n) in grid.iter() {
        if *n > 0 {
            last = sum / *n as f64;
        }
        values.push(last);
    }
    let last_ts = first + (values.len() as i64 - 1) * step;
    let last_value = *values.last().unwrap_or(&f64::NAN);
    let horizon = ((within_ms + step - 1) / step).clamp(1, MAX_RECENT_HORIZON as i64) as usize;
    let forecast = forecast(&values, horizon, DEFAULT_LEVEL, None, Trend::Linear)?;
    Ok((step, last_ts, last_value, forecast))
}

/// The seasonal-naive forecast: each future step repeats the value one season earlier
/// (`season = 1`: the last value).
pub fn seasonal_naive(values: &[f64], season: usize, horizon: usize) -> Result<Vec<f64>, AnalyticsError> {
    let season = season.max(1);
    ensure_len("seasonal-naive forecast", values, season)?;
    let last_season = &values[values.len() - season..];
    Ok((0..horizon).map(|h| last_season[h % season]).collect())
}

/// Mean absolute scaled error of `predicted` against `actual`, scaled by the in-sample mean
/// absolute error of the seasonal-naive forecast on `training` (Hyndman & Koehler 2006). Below 1:
/// better than repeating the last season.
pub fn mase(
    actual: &[f64],
    predicted: &[f64],
    training: &[f64],
    season: usize,
) -> Result<f64, AnalyticsError> {
    if actual.len() != predicted.len() {
        return Err(AnalyticsError::LengthMismatch {
            left: actual.len(),
            right: predicted.len(),
        });
    }
    let season = season.max(1);
    ensure_len("MASE training series", training, season + 1)?;
    ensure_len("MASE actual values", actual, 1)?;
    let scale = training
        .windows(season + 1)
        .map(|w| (w[season] - w[0]).abs())
        .sum::<f64>()
        / (training.len() - season) as f64;
    if scale == 0.0 {
        return Err(AnalyticsError::InvalidParameter {
            name: "training",
            reason: "the seasonal-naive forecast is exact in-sample; MASE is undefined".into(),
        });
    }
    let error = actual
        .iter()
        .zip(predicted)
        .map(|(a, p)| (a - p).abs())
        .sum::<f64>()
        / actual.len() as f64;
    Ok(error / scale)
}

/// Which side of the limit is the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Failure when the metric rises above the limit (vibration, temperature).
    Above,
    /// Failure when the metric falls below the limit (battery, pressure).
    Below,
}

/// When a forecast crosses a limit, in steps ahead (1 = the first forecast step). `None`: not
/// within the horizon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    /// First step where the point forecast crosses.
    pub expected: Option<usize>,
    /// First step where the interval's bound on the failing side crosses: the earliest the
    /// failure is plausible at the forecast's level.
    pub earliest: Option<usize>,
    /// First step where the other bound crosses too: by then the failure is all but certain.
    pub latest: Option<usize>,
}

/// Estimates when `forecast` crosses `limit` in `direction`.
pub fn time_to_threshold(forecast: &Forecast, limit: f64, direction: Direction) -> Crossing {
    let crosses = |v: f64| match direction {
        Direction::Above => v >= limit,
        Direction::Below => v <= limit,
    };
    let first = |series: &[f64]| series.iter().position(|&v| crosses(v)).map(|i| i + 1);
    let (near, far) = match direction {
        Direction::Above => (&forecast.upper, &forecast.lower),
        Direction::Below => (&forecast.lower, &forecast.upper),
    };
    Crossing {
        expected: first(&forecast.point),
        earliest: first(near),
        latest: first(far),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seasonal_series(len: usize, season: usize, slope: f64) -> Vec<f64> {
        (0..len)
            .map(|t| {
                let phase = 2.0 * std::f64::consts::PI * (t % season) as f64 / season as f64;
                // Deterministic "noise": a fast, incommensurate wobble.
                20.0 + slope * t as f64 + 5.0 * phase.sin() + 0.3 * (t as f64 * 2.39).sin()
            })
            .collect()
    }

    #[test]
    fn seasonal_naive_repeats_the_last_season() {
        let values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        assert_eq!(
            seasonal_naive(&values, 3, 5).unwrap(),
            vec![5.0, 6.0, 7.0, 5.0, 6.0]
        );
        assert_eq!(seasonal_naive(&values, 1, 2).unwrap(), vec![7.0, 7.0]);
    }

    #[test]
    fn mase_matches_its_definition() {
        // By hand from the definition: the in-sample seasonal-naive MAE of TRAIN with lag 2 is
        // mean(|3-1|, |2-2|, |5-3|, |4-2|) = 1.5; MAE of the forecast is mean(|6-5|, |5-7|) = 1.5.
        let train = [1.0, 2.0, 3.0, 2.0, 5.0, 4.0];
        assert!((mase(&[6.0, 5.0], &[5.0, 7.0], &train, 2).unwrap() - 1.0).abs() < 1e-12);
        assert!(mase(&[1.0], &[1.0, 2.0], &train, 2).is_err());
    }

    #[test]
    fn detects_the_season_of_a_periodic_series() {
        assert_eq!(detect_season(&seasonal_series(240, 24, 0.0)), Some(24));
        assert_eq!(detect_season(&seasonal_series(200, 12, 0.05)), Some(12));
        // A straight line with (pseudo-random, LCG) noise has no season.
        let mut state: u64 = 7;
        let line: Vec<f64> = (0..200)
            .map(|t| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t as f64 * 0.5 + (state >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect();
        assert_eq!(detect_season(&line), None);
    }

    const SAWTOOTH_ACF: [f64; 9] = [
        1.0,
        0.20238095238095236,
        -0.3002574002574002,
        -0.49864864864864866,
        -0.38352638352638346,
        0.05437580437580434,
        0.8243243243243241,
        0.1736808236808236,
        -0.24066924066924067,
    ];

    #[test]
    fn autocorrelation_matches_statsmodels() {
        // statsmodels.tsa.stattools.acf(scipy.signal.detrend(SAWTOOTH), nlags=8)
        let sawtooth: Vec<f64> = (0..36).map(|t| (t % 6) as f64 + t as f64 * 0.1).collect();
        let acf = detrended_autocorrelation(&sawtooth, 8).unwrap();
        for (lag, (actual, expected)) in acf.iter().zip(SAWTOOTH_ACF).enumerate() {
            assert!(
                (actual - expected).abs() < 1e-12,
                "lag {lag}: {actual} != {expected}"
            );
        }
        assert_eq!(detect_season(&sawtooth), Some(6));
    }

    #[test]
    fn forecast_beats_seasonal_naive_on_trend_plus_season() {
        let series = seasonal_series(264, 24, 0.05);
        let (train, test) = series.split_at(240);
        let f = forecast(train, 24, 0.95, None, Trend::Damped).unwrap();
        assert_eq!(f.season, Some(24));
        assert_eq!(f.point.len(), 24);
        assert!(
            f.lower
                .iter()
                .zip(&f.point)
                .zip(&f.upper)
                .all(|((l, p), u)| l <= p && p <= u)
        );
        let naive = seasonal_naive(train, 24, 24).unwrap();
        let model = mase(test, &f.point, train, 24).unwrap();
        let baseline = mase(test, &naive, train, 24).unwrap();
        assert!(
            model < 1.0 && model < baseline,
            "model {model}, baseline {baseline}"
        );
    }

    #[test]
    fn irregular_recent_values_are_gridded_and_forecast_far_enough() {
        // A battery falling 1 % an hour, read every hour with a jitter of a few seconds and one
        // reading missing: the grid is hourly, the gap carried forward, and 10 % is crossed about
        // 40 hours after the last reading (50 % then).
        let hour = 3_600_000;
        let points: Vec<(i64, f64)> = (0..51)
            .filter(|i| *i != 20)
            .map(|i| (i * hour + (i % 3) * 2_000, 100.0 - i as f64))
            .collect();
        let (step, last_ts, last_value, f) = fit_recent(&points, 72 * hour).unwrap();
        assert_eq!(step, hour);
        assert_eq!(last_ts, 50 * hour);
        assert!((last_value - 50.0).abs() < 1e-9);
        assert_eq!(f.point.len(), 72);
        let c = time_to_threshold(&f, 10.0, Direction::Below);
        let expected = c.expected.expect("crosses within 72 h") as i64;
        assert!((38..=42).contains(&expected), "{c:?}");
        // A look-ahead longer than the step cap widens the steps instead.
        let (step, _, _, f) = fit_recent(&points, 100 * 24 * hour).unwrap();
        assert!(f.point.len() <= MAX_RECENT_HORIZON && step > hour, "{step}");
        assert!(matches!(
            fit_recent(&points[..5], hour),
            Err(AnalyticsError::NotEnoughData { .. })
        ));
    }

    #[test]
    fn crossing_is_bracketed_by_the_interval() {
        let f = Forecast {
            point: vec![50.0, 40.0, 30.0, 20.0, 10.0],
            lower: vec![45.0, 30.0, 15.0, 5.0, -5.0],
            upper: vec![55.0, 50.0, 45.0, 35.0, 25.0],
            level: 0.95,
            season: None,
        };
        let c = time_to_threshold(&f, 20.0, Direction::Below);
        assert_eq!(
            c,
            Crossing {
                expected: Some(4),
                earliest: Some(3),
                latest: None
            }
        );
        let c = time_to_threshold(&f, 40.0, Direction::Above);
        assert_eq!(
            c,
            Crossing {
                expected: Some(1),
                earliest: Some(1),
                latest: Some(1)
            }
        );
    }

    #[test]
    fn flat_and_short_series_do_not_break_the_model() {
        // A metric that never changes (a stuck sensor, a full battery) gets a flat forecast with
        // a (near) zero-width interval, not an error, a panic or NaNs.
        for values in [vec![5.0; 50], vec![5.0; 12]] {
            let f = forecast(&values, 5, 0.95, None, Trend::Linear).unwrap();
            assert_eq!(f.season, None);
            for v in f.point.iter().chain(&f.lower).chain(&f.upper) {
                assert!((v - 5.0).abs() < 1e-6, "{f:?}");
            }
        }
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(
            forecast(&[1.0; 5], 3, 0.95, None, Trend::Damped),
            Err(AnalyticsError::NotEnoughData { .. })
        ));
        assert!(matches!(
            forecast(&[1.0; 20], 3, 1.5, None, Trend::Damped),
            Err(AnalyticsError::InvalidParameter { .. })
        ));
        assert!(matches!(
            forecast(&[1.0; 20], 3, 0.95, Some(15), Trend::Damped),
            Err(AnalyticsError::NotEnoughData { .. })
        ));
    }
}
