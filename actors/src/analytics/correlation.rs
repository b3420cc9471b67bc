//! Correlation between two aligned series (metrics of one device, or one metric across
//! devices, bucketed to the same timestamps by the caller): Pearson, Spearman, and the lag at
//! which they line up best.

use statrs::distribution::{ContinuousCDF, StudentsT};

use super::{AnalyticsError, average_ranks, ensure_finite, ensure_len};

/// A correlation coefficient with its two-sided p-value (null hypothesis: no correlation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Correlation {
    pub coefficient: f64,
    pub p_value: f64,
    /// Pairs used.
    pub n: usize,
}

fn check_pair(x: &[f64], y: &[f64]) -> Result<(), AnalyticsError> {
    if x.len() != y.len() {
        return Err(AnalyticsError::LengthMismatch {
            left: x.len(),
            right: y.len(),
        });
    }
    ensure_len("correlation", x, 3)?;
    ensure_finite(x)?;
    ensure_finite(y)
}

/// Pearson's r, `NaN`-free: a constant series has no correlation (r = 0, p = 1).
fn pearson_r(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0)
    }
}

/// Two-sided p-value of r under no correlation: `t = r·sqrt((n-2)/(1-r²))` on `n - 2` degrees
/// of freedom (what scipy's `pearsonr` and `spearmanr` report).
fn p_value(r: f64, n: usize) -> f64 {
    let df = (n - 2) as f64;
    if r.abs() >= 1.0 {
        return 0.0;
    }
    let t = r * (df / (1.0 - r * r)).sqrt();
    match StudentsT::new(0.0, 1.0, df) {
        Ok(dist) => (2.0 * dist.sf(t.abs())).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// Pearson's linear correlation.
pub fn pearson(x: &[f64], y: &[f64]) -> Result<Correlation, AnalyticsError> {
    check_pair(x, y)?;
    let coefficient = pearson_r(x, y);
    Ok(Correlation {
        coefficient,
        p_value: p_value(coefficient, x.len()),
        n: x.len(),
    })
}

/// Spearman's rank correlation (Pearson on average ranks): monotonic, not only linear,
/// relations, and robust to outliers.
pub fn spearman(x: &[f64], y: &[f64]) -> Result<Correlation, AnalyticsError> {
    check_pair(x, y)?;
    let coefficient = pearson_r(&average_ranks(x), &average_ranks(y));
    Ok(Correlation {
        coefficient,
        p_value: p_value(coefficient, x.len()),
        n: x.len(),
    })
}

/// The lag of best Pearson correlation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LaggedCorrelation {
    /// `y` follows `x` by `lag` steps when positive (`x[t]` pairs with `y[t + lag]`).
    pub lag: isize,
    pub correlation: Correlation,
}

/// Tries every lag in `-max_lag..=max_lag` and returns the one with the largest `|r|` (the
/// smallest `|lag|` on a tie). Each lag needs at least three overlapping pairs.
pub fn best_lag(x: &[f64], y: &[f64], max_lag: usize) -> Result<LaggedCorrelation, AnalyticsError> {
    check_pair(x, y)?;
    let n = x.len();
    let max_lag = max_lag.min(n - 3) as isize;
    let mut best: Option<LaggedCorrelation> = None;
    for magnitude in 0..=max_lag {
        for lag in if magnitude == 0 {
            vec![0]
        } else {
            vec![magnitude, -magnitude]
        } {
            let (xs, ys) = if lag >= 0 {
                (&x[..n - lag as usize], &y[lag as usize..])
            } else {
                (&x[(-lag) as usize..], &y[..n - (-lag) as usize])
            };
            let coefficient = pearson_r(xs, ys);
            let better = best.is_none_or(|b| coefficient.abs() > b.correlation.coefficient.abs());
            if better {
                let correlation = Correlation {
                    coefficient,
                    p_value: p_value(coefficient, xs.len()),
                    n: xs.len(),
                };
                best = Some(LaggedCorrelation { lag, correlation });
            }
        }
    }
    best.ok_or(AnalyticsError::NotEnoughData {
        what: "cross-correlation",
        needed: 3,
        got: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    const X: [f64; 10] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
    const Y: [f64; 10] = [2.1, 3.9, 6.2, 7.8, 11.0, 11.5, 14.2, 15.8, 30.0, 20.1];
    // scipy 1.17: pearsonr(X, Y) and spearmanr(X, Y).
    const PEARSON_R: f64 = 0.9085372949116505;
    const PEARSON_P: f64 = 0.0002738248226781658;
    const SPEARMAN_R: f64 = 0.9878787878787878;
    const SPEARMAN_P: f64 = 9.307459988955516e-08;

    /// p-values span orders of magnitude: compare them relatively.
    fn close_relative(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= 1e-7 * expected.abs(),
            "{actual} != {expected}"
        );
    }

    #[test]
    fn pearson_matches_scipy() {
        // scipy.stats.pearsonr(X, Y)
        let c = pearson(&X, &Y).unwrap();
        close(c.coefficient, PEARSON_R);
        close_relative(c.p_value, PEARSON_P);
    }

    #[test]
    fn spearman_matches_scipy() {
        // scipy.stats.spearmanr(X, Y) (Y has one outlier, which ranks shrug off)
        let c = spearman(&X, &Y).unwrap();
        close(c.coefficient, SPEARMAN_R);
        close_relative(c.p_value, SPEARMAN_P);
    }

    #[test]
    fn best_lag_finds_a_delayed_copy() {
        // y is x delayed by 3 steps: numpy.corrcoef(x[:-3], y[3:])[0, 1] = 1.
        let x: Vec<f64> = (0..50).map(|i| ((i * 7 % 11) as f64).sin()).collect();
        let mut y = vec![0.0; 3];
        y.extend_from_slice(&x[..47]);
        let best = best_lag(&x, &y, 10).unwrap();
        assert_eq!(best.lag, 3);
        close(best.correlation.coefficient, 1.0);
        assert_eq!(best.correlation.n, 47);
        let reverse = best_lag(&y, &x, 10).unwrap();
        assert_eq!(reverse.lag, -3);
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            pearson(&X, &Y[..9]),
            Err(AnalyticsError::LengthMismatch { left: 10, right: 9 })
        );
        assert_eq!(
            spearman(&[1.0, f64::INFINITY, 2.0], &[1.0, 2.0, 3.0]),
            Err(AnalyticsError::NonFinite)
        );
        assert_eq!(pearson(&[1.0; 5], &X[..5]).unwrap().coefficient, 0.0);
    }
}
