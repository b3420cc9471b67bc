//! Analytics: anomaly detection, forecasting, statistics, trend, drift and correlation.
//!
//! This is the **domain half** of analytics. The maths is pure: plain structs and functions over
//! `f64` slices and streams, no actors, no I/O, no clock. [`monitor`] holds one device's live
//! state (still pure), and the two actor files, [`router`] and [`actor`], run monitors on live
//! telemetry, one actor per tenant, with storage and the live stream reached through traits.
//! The adapter half is `src/analytics/` (registry storage, REST, `/ws` frames, CLI, SVG).
//!
//! One file per concern:
//! - [`detector`]: streaming univariate detectors (z-score, median/MAD, EWMA) behind one
//!   [`detector::Detector`] trait, and an [`detector::Ensemble`] combining them (with the drift
//!   detector as a sentinel);
//! - [`isolation`]: multivariate scoring with an Extended Isolation Forest over derived
//!   features;
//! - [`stats`]: descriptive statistics of a sample;
//! - [`trend`]: Mann–Kendall trend test with Sen's slope;
//! - [`drift`]: two-sample Kolmogorov–Smirnov test and a streaming Page–Hinkley detector, also
//!   as a scale-free [`detector::Detector`];
//! - [`correlation`]: Pearson and Spearman with p-values, best-lag cross-correlation;
//! - [`forecast`]: damped-trend exponential smoothing with detected seasonality, a
//!   seasonal-naive baseline, MASE, and time until a threshold is crossed;
//! - [`settings`]: layered configuration (tenant, device type, device) and its defaults;
//! - [`monitor`]: one device's detectors and forest, its snapshot and restore;
//! - [`seeded_forest`]: grows the crate's forest from a seed;
//! - [`router`], [`actor`]: the per-tenant analytics actors;
//! - `quality` (tests only): the seeded synthetic suite behind README's quality table.

pub mod actor;
pub mod correlation;
pub mod detector;
pub mod drift;
pub mod forecast;
pub mod isolation;
pub mod monitor;
pub mod router;
pub mod seeded_forest;
pub mod settings;
pub mod stats;
pub mod trend;

#[cfg(test)]
mod quality;

/// Errors of the analytics functions. Every one is about the input: too little of it, values
/// that are not numbers, or parameters out of range.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AnalyticsError {
    #[error("{what} needs at least {needed} values, got {got}")]
    NotEnoughData {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("input contains a value that is not a finite number")]
    NonFinite,
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    #[error("the two series have different lengths ({left} and {right})")]
    LengthMismatch { left: usize, right: usize },
    #[error("forecast model failed: {0}")]
    Model(String),
}

/// Fails with [`AnalyticsError::NonFinite`] when any value is NaN or infinite, so the maths
/// below can assume total ordering.
pub(crate) fn ensure_finite(values: &[f64]) -> Result<(), AnalyticsError> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(AnalyticsError::NonFinite)
    }
}

/// Fails with [`AnalyticsError::NotEnoughData`] when `values` is shorter than `needed`.
pub(crate) fn ensure_len(what: &'static str, values: &[f64], needed: usize) -> Result<(), AnalyticsError> {
    if values.len() < needed {
        Err(AnalyticsError::NotEnoughData {
            what,
            needed,
            got: values.len(),
        })
    } else {
        Ok(())
    }
}

/// Ranks with ties given their average rank (1-based), as Spearman and the rank tests need.
pub(crate) fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        // Positions i..=j share one value: each gets the mean of ranks i+1..=j+1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Median of a slice (the mean of the two middle values for an even length).
pub(crate) fn median(values: &[f64]) -> f64 {
    median_in_place(&mut values.to_vec())
}

/// [`median`] reordering `values` instead of copying them: a selection (O(n)), not a sort,
/// with the same result.
pub(crate) fn median_in_place(values: &mut [f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let (lower, upper, _) = values.select_nth_unstable_by(n / 2, f64::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        let below = lower.iter().copied().max_by(f64::total_cmp).unwrap_or(upper);
        (below + upper) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_ranks_share_ties() {
        // scipy.stats.rankdata([3, 1, 4, 1, 5]) -> [3. , 1.5, 4. , 1.5, 5. ]
        assert_eq!(
            average_ranks(&[3.0, 1.0, 4.0, 1.0, 5.0]),
            vec![3.0, 1.5, 4.0, 1.5, 5.0]
        );
    }

    #[test]
    fn median_of_even_and_odd_lengths() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
