//! Trend: the Mann–Kendall test (is there a monotonic trend?) with Sen's slope (how steep?).
//!
//! Both are rank based, so a few outliers neither create nor hide a trend, and neither assumes
//! the trend is linear or the noise normal.

use statrs::distribution::{ContinuousCDF, Normal};

use super::{AnalyticsError, ensure_finite, ensure_len, median};

/// Direction of a trend at the test's significance level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrendDirection {
    Increasing,
    Decreasing,
    None,
}

/// Result of [`mann_kendall`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrendTest {
    /// Kendall's S: concordant minus discordant pairs.
    pub s: f64,
    /// Variance of S under no trend, corrected for ties.
    pub var_s: f64,
    /// Normal score of S with continuity correction.
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// Sen's slope: the median of all pairwise slopes, per sample step.
    pub slope: f64,
    /// Sen's intercept: `median(x) - slope · median(index)`.
    pub intercept: f64,
    pub direction: TrendDirection,
}

/// Longest series [`mann_kendall`] takes: Sen's slope keeps every pairwise slope, about 16 MB
/// at this length. Longer ranges are bucketed (e.g. hourly means) first.
pub const MAX_TREND_VALUES: usize = 2_000;

/// Mann–Kendall trend test of equally spaced `values` at significance `alpha` (e.g. 0.05).
///
/// O(n²) in time and, for Sen's slope, memory: hence [`MAX_TREND_VALUES`].
pub fn mann_kendall(values: &[f64], alpha: f64) -> Result<TrendTest, AnalyticsError> {
    ensure_len("Mann-Kendall test", values, 3)?;
    if values.len() > MAX_TREND_VALUES {
        return Err(AnalyticsError::InvalidParameter {
            name: "values",
            reason: format!(
                "{} values; the trend test takes at most {MAX_TREND_VALUES}",
                values.len()
            ),
        });
    }
    ensure_finite(values)?;
    let n = values.len();
    let mut s = 0.0;
    let mut slopes = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let diff = values[j] - values[i];
            s += if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            slopes.push(diff / (j - i) as f64);
        }
    }
    let nf = n as f64;
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut ties = 0.0;
    for group in sorted.chunk_by(|a, b| a == b) {
        let t = group.len() as f64;
        ties += t * (t - 1.0) * (2.0 * t + 5.0);
    }
    let var_s = (nf * (nf - 1.0) * (2.0 * nf + 5.0) - ties) / 18.0;
    let z = if var_s <= 0.0 {
        0.0
    } else if s > 0.0 {
        (s - 1.0) / var_s.sqrt()
    } else if s < 0.0 {
        (s + 1.0) / var_s.sqrt()
    } else {
        0.0
    };
    let p_value = 2.0 * Normal::standard().sf(z.abs());
    let slope = median(&slopes);
    let intercept = median(values) - slope * (nf - 1.0) / 2.0;
    let direction = if p_value >= alpha {
        TrendDirection::None
    } else if z > 0.0 {
        TrendDirection::Increasing
    } else {
        TrendDirection::Decreasing
    };
    Ok(TrendTest {
        s,
        var_s,
        z,
        p_value,
        slope,
        intercept,
        direction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    // A rising series with noise and one tie (4.0 twice).
    const RISING: [f64; 12] = [1.0, 2.5, 2.0, 4.0, 3.5, 4.0, 6.0, 5.5, 7.0, 8.5, 8.0, 9.5];

    // pymannkendall.original_test(RISING, alpha=0.05) (pymannkendall 1.4), Sen's slope and
    // intercept also equal to scipy.stats.theilslopes(RISING).
    const MK_S: f64 = 57.0;
    const MK_VAR_S: f64 = 211.66666666666666;
    const MK_Z: f64 = 3.849123021091436;
    const MK_P: f64 = 0.00011854146541478983;
    const MK_SLOPE: f64 = 0.75;
    const MK_INTERCEPT: f64 = 0.625;

    #[test]
    fn matches_pymannkendall() {
        let t = mann_kendall(&RISING, 0.05).unwrap();
        close(t.s, MK_S);
        close(t.var_s, MK_VAR_S);
        close(t.z, MK_Z);
        close(t.p_value, MK_P);
        close(t.slope, MK_SLOPE);
        close(t.intercept, MK_INTERCEPT);
        assert_eq!(t.direction, TrendDirection::Increasing);
    }

    #[test]
    fn no_trend_in_alternating_values() {
        // pymannkendall.original_test([3, 1, 3, 1, 3, 1, 3, 1]): s = -4, var_s = 48 (ties),
        // p = 0.6650055421020291
        let t = mann_kendall(&[3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0], 0.05).unwrap();
        close(t.s, -4.0);
        close(t.var_s, 48.0);
        close(t.p_value, 0.6650055421020291);
        assert_eq!(t.direction, TrendDirection::None);
    }

    #[test]
    fn decreasing_is_detected() {
        assert!(mann_kendall(&vec![1.0; MAX_TREND_VALUES + 1], 0.05).is_err());
        let falling: Vec<f64> = RISING.iter().rev().copied().collect();
        let t = mann_kendall(&falling, 0.05).unwrap();
        close(t.z, -MK_Z);
        close(t.slope, -MK_SLOPE);
        assert_eq!(t.direction, TrendDirection::Decreasing);
    }
}
