//! Descriptive statistics of a sample: the numbers behind `GET /api/analytics/stats`.

use statrs::statistics::{Data, OrderStatistics, Statistics};

use super::{AnalyticsError, ensure_finite, ensure_len};

/// The quantiles reported by [`Summary`], in this order.
pub const QUANTILES: [f64; 5] = [0.05, 0.25, 0.5, 0.75, 0.95];

/// Summary of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    /// Sample standard deviation (`n - 1` in the denominator).
    pub std_dev: f64,
    pub min: f64,
    pub max: f64,
    /// `(probability, value)` for each of [`QUANTILES`], with statrs' median-unbiased estimator
    /// (Hyndman–Fan type 8, numpy's `method="median_unbiased"`): unlike linear interpolation it
    /// does not depend on where the sample happens to start.
    pub quantiles: Vec<(f64, f64)>,
    /// Sample skewness `g1 = m3 / m2^1.5` (scipy's `skew` default, `bias=True`); 0 for a
    /// constant sample.
    pub skewness: f64,
    /// Excess kurtosis `g2 = m4 / m2² - 3` (scipy's `kurtosis` default: Fisher, `bias=True`); 0
    /// for a constant sample.
    pub kurtosis: f64,
}

/// Summarises `values` (at least two, all finite).
pub fn summarize(values: &[f64]) -> Result<Summary, AnalyticsError> {
    ensure_len("statistics", values, 2)?;
    ensure_finite(values)?;
    let mean = values.mean();
    let std_dev = values.std_dev();
    let mut data = Data::new(values.to_vec());
    let quantiles = QUANTILES.iter().map(|&p| (p, data.quantile(p))).collect();
    let n = values.len() as f64;
    let central = |power: i32| values.iter().map(|v| (v - mean).powi(power)).sum::<f64>() / n;
    let (m2, m3, m4) = (central(2), central(3), central(4));
    let (skewness, kurtosis) = if m2 > 0.0 {
        (m3 / m2.powf(1.5), m4 / (m2 * m2) - 3.0)
    } else {
        (0.0, 0.0)
    };
    Ok(Summary {
        count: values.len(),
        mean,
        std_dev,
        min: values.min(),
        max: values.max(),
        quantiles,
        skewness,
        kurtosis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: [f64; 10] = [2.0, 3.5, 1.0, 7.0, 4.5, 3.0, 9.5, 2.5, 5.0, 4.0];
    // Reference values for SAMPLE, from numpy 2.4 / scipy 1.17 (the calls are named at each use).
    const MEAN: f64 = 4.2;
    const STD: f64 = 2.507765716507204;
    const QUANTILE_VALUES: [f64; 5] = [1.0, 2.458333333333333, 3.75, 5.166666666666668, 9.5];
    const SKEW: f64 = 0.8982911714265839;
    const KURT: f64 = 0.08994368764749172;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    #[test]
    fn matches_numpy_and_scipy() {
        let s = summarize(&SAMPLE).unwrap();
        assert_eq!(s.count, 10);
        close(s.mean, MEAN); // numpy.mean
        close(s.std_dev, STD); // numpy.std(ddof=1)
        assert_eq!((s.min, s.max), (1.0, 9.5));
        // numpy.quantile(SAMPLE, [0.05, 0.25, 0.5, 0.75, 0.95], method="median_unbiased")
        for ((p, value), (expected_p, expected)) in
            s.quantiles.iter().zip(QUANTILES.iter().zip(QUANTILE_VALUES))
        {
            assert_eq!(p, expected_p);
            close(*value, expected);
        }
        close(s.skewness, SKEW); // scipy.stats.skew(SAMPLE)
        close(s.kurtosis, KURT); // scipy.stats.kurtosis(SAMPLE)
    }

    #[test]
    fn constant_sample_has_no_shape() {
        let s = summarize(&[4.0; 5]).unwrap();
        assert_eq!((s.std_dev, s.skewness, s.kurtosis), (0.0, 0.0, 0.0));
    }

    #[test]
    fn rejects_short_and_non_finite_input() {
        assert!(matches!(
            summarize(&[1.0]),
            Err(AnalyticsError::NotEnoughData { .. })
        ));
        assert_eq!(summarize(&[1.0, f64::NAN]), Err(AnalyticsError::NonFinite));
    }
}
