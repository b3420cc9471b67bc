//! Drift: has the distribution of a metric changed?
//!
//! Two views: [`ks_two_sample`] compares a reference window with a recent one after the fact
//! (the product's `detect_drift(data, threshold=0.05)`), and [`PageHinkley`] watches the stream
//! and raises an event as soon as the mean has moved, for live drift events.

use super::detector::{Detector, Method, Verdict, median_mad};
use super::{AnalyticsError, ensure_finite, ensure_len};

/// Default p-value below which two windows are said to differ.
pub const DEFAULT_DRIFT_P_VALUE: f64 = 0.05;

/// Result of [`ks_two_sample`].
#[derive(Debug, Clone, PartialEq)]
pub struct KsTest {
    /// Largest distance between the two empirical distribution functions.
    pub statistic: f64,
    /// Two-sided p-value from Kolmogorov's limiting distribution at `sqrt(n·m/(n+m))·D`.
    pub p_value: f64,
    /// `p_value < threshold`.
    pub drifted: bool,
}

/// Two-sample Kolmogorov–Smirnov test of `reference` against `recent`.
///
/// The p-value is the asymptotic one (scipy's `kstwobign`), accurate when both windows hold
/// more than a few dozen values, which drift windows do; below that it is conservative-ish and
/// scipy's exact method would differ.
pub fn ks_two_sample(reference: &[f64], recent: &[f64], threshold: f64) -> Result<KsTest, AnalyticsError> {
    ensure_len("Kolmogorov-Smirnov reference window", reference, 1)?;
    ensure_len("Kolmogorov-Smirnov recent window", recent, 1)?;
    ensure_finite(reference)?;
    ensure_finite(recent)?;
    let mut a = reference.to_vec();
    let mut b = recent.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut statistic) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        // Step over every copy of the smaller value in both samples before comparing, so ties
        // across the samples do not create a spurious gap.
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        statistic = statistic.max((i as f64 / n - j as f64 / m).abs());
    }
    let p_value = kolmogorov_survival((n * m / (n + m)).sqrt() * statistic);
    Ok(KsTest {
        statistic,
        p_value,
        drifted: p_value < threshold,
    })
}

/// `P(K > x)` for Kolmogorov's distribution: `2 Σ_{k≥1} (-1)^{k-1} exp(-2k²x²)`.
fn kolmogorov_survival(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x < 0.2 {
        // The alternating series converges slowly here and the answer is 1 to 1e-15 anyway.
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * x * x).exp();
        sum += if k as u64 % 2 == 1 { term } else { -term };
        if term < 1e-17 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// Direction of a detected change in the mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftDirection {
    Up,
    Down,
}

/// Streaming Page–Hinkley test for a change in the mean, in both directions.
///
/// With `x̄ₜ` the running mean, it accumulates `mₜ = Σ (xᵢ - x̄ᵢ - δ)` and signals an upward change
/// when `mₜ - min mₜ > λ` (mirror image for downward). `δ` is the change too small to care about,
/// `λ` the evidence needed, both in the metric's units. After a signal the test restarts, so
/// one shift gives one event, not one per value.
#[derive(Debug, Clone)]
pub struct PageHinkley {
    delta: f64,
    lambda: f64,
    warm_up: usize,
    count: usize,
    mean: f64,
    up_sum: f64,
    up_min: f64,
    down_sum: f64,
    down_max: f64,
}

impl PageHinkley {
    pub fn new(delta: f64, lambda: f64, warm_up: usize) -> Self {
        PageHinkley {
            delta,
            lambda,
            warm_up,
            count: 0,
            mean: 0.0,
            up_sum: 0.0,
            up_min: 0.0,
            down_sum: 0.0,
            down_max: 0.0,
        }
    }

    /// The test statistics `(mₜ - min m, max m' - m'ₜ)` for an upward and a downward change.
    pub fn statistics(&self) -> (f64, f64) {
        (self.up_sum - self.up_min, self.down_max - self.down_sum)
    }

    /// Adds a value; returns a direction when a change is detected (and restarts the test).
    pub fn observe(&mut self, value: f64) -> Option<DriftDirection> {
        if !value.is_finite() {
            return None;
        }
        self.count += 1;
        self.mean += (value - self.mean) / self.count as f64;
        self.up_sum += value - self.mean - self.delta;
        self.up_min = self.up_min.min(self.up_sum);
        self.down_sum += value - self.mean + self.delta;
        self.down_max = self.down_max.max(self.down_sum);
        if self.count < self.warm_up {
            return None;
        }
        let (up, down) = self.statistics();
        let direction = if up > self.lambda {
            Some(DriftDirection::Up)
        } else if down > self.lambda {
            Some(DriftDirection::Down)
        } else {
            None
        };
        if direction.is_some() {
            *self = PageHinkley::new(self.delta, self.lambda, self.warm_up);
        }
        direction
    }
}

/// [`PageHinkley`] as a [`Detector`], in units of the series' own spread: the first `warm_up`
/// values set a robust centre and scale (median, normal-consistent MAD), and `delta` and
/// `lambda` are multiples of that scale, so one setting fits any metric. Its verdict is an
/// event (`anomalous` on the value where the change is detected), the others' values score
/// `statistic / lambda`.
#[derive(Debug, Clone)]
pub struct DriftDetector {
    test: PageHinkley,
    warm_up: usize,
    learning: Vec<f64>,
    centre: f64,
    scale: f64,
}

/// Default allowance of [`DriftDetector`], in robust standard deviations.
pub const DEFAULT_DRIFT_DELTA: f64 = 0.5;
/// Default evidence of [`DriftDetector`], in robust standard deviations times values.
pub const DEFAULT_DRIFT_LAMBDA: f64 = 30.0;

impl DriftDetector {
    pub fn new(delta: f64, lambda: f64, warm_up: usize) -> Self {
        let warm_up = warm_up.max(3);
        DriftDetector {
            test: PageHinkley::new(delta, lambda, warm_up),
            warm_up,
            learning: Vec::with_capacity(warm_up),
            centre: 0.0,
            scale: 0.0,
        }
    }
}

impl Default for DriftDetector {
    fn default() -> Self {
        DriftDetector::new(
            DEFAULT_DRIFT_DELTA,
            DEFAULT_DRIFT_LAMBDA,
            super::detector::DEFAULT_WINDOW,
        )
    }
}

impl Detector for DriftDetector {
    fn method(&self) -> Method {
        Method::Drift
    }

    fn observe(&mut self, value: f64) -> Option<Verdict> {
        if !value.is_finite() {
            return None;
        }
        if self.learning.len() < self.warm_up {
            self.learning.push(value);
            if self.learning.len() == self.warm_up {
                let (centre, scale) = median_mad(&self.learning);
                self.centre = centre;
                // A flat warm-up has no spread; any unit keeps the test defined.
                self.scale = if scale > 0.0 { scale } else { 1.0 };
            }
            return None;
        }
        let lambda = self.test.lambda;
        let event = self.test.observe((value - self.centre) / self.scale);
        let (up, down) = self.test.statistics();
        Some(match event {
            Some(direction) => {
                let statistic = if direction == DriftDirection::Up {
                    lambda
                } else {
                    -lambda
                };
                Verdict {
                    statistic,
                    score: 1.0,
                    anomalous: true,
                }
            }
            None => {
                let statistic = if up >= down { up } else { -down };
                Verdict {
                    statistic,
                    score: (up.max(down) / lambda).min(0.999),
                    anomalous: false,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!((actual - expected).abs() < tolerance, "{actual} != {expected}");
    }

    // A = sin(0.37·i) for i in 0..40, B = sin(0.51·i) + 0.6 for i in 0..30:
    // scipy.stats.ks_2samp(A, B).statistic, and scipy.stats.kstwobign.sf(sqrt(40·30/70)·D).
    // (ks_2samp's own p-value is the exact one for samples this small: 0.00218.)
    const KS_D: f64 = 0.43333333333333335;
    const KS_P: f64 = 0.003198900693025626;
    const KSTWOBIGN: [(f64, f64); 4] = [
        (0.5, 0.9639452436648751),
        (1.0, 0.26999967167735456),
        (1.36, 0.049485876755377876),
        (2.0, 0.0006709252557796953),
    ];
    const PH_INPUT: [f64; 10] = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0, 2.5, 2.7, 2.4, 2.6];
    const PH_UP: f64 = 4.054603174603175;
    const PH_DOWN: f64 = 0.0;

    #[test]
    fn ks_matches_scipy() {
        let a: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..30).map(|i| (i as f64 * 0.51).sin() + 0.6).collect();
        let t = ks_two_sample(&a, &b, 0.05).unwrap();
        close(t.statistic, KS_D, 1e-12);
        close(t.p_value, KS_P, 1e-9);
        assert!(t.drifted);
    }

    #[test]
    fn ks_same_sample_has_no_drift() {
        let a = [1.0, 2.0, 2.0, 3.0, 5.0];
        let t = ks_two_sample(&a, &a, 0.05).unwrap();
        assert_eq!((t.statistic, t.p_value, t.drifted), (0.0, 1.0, false));
    }

    #[test]
    fn kolmogorov_survival_matches_scipy() {
        // scipy.stats.kstwobign.sf([0.5, 1.0, 1.36, 2.0])
        for (x, expected) in KSTWOBIGN {
            close(kolmogorov_survival(x), expected, 1e-12);
        }
    }

    #[test]
    fn page_hinkley_matches_the_recursion_and_fires_once_per_shift() {
        // Values computed in Python with the recursion in the type's doc comment
        // (delta 0.1, lambda 5): the statistic after PH_INPUT.
        let mut ph = PageHinkley::new(0.1, 5.0, 5);
        for &v in &PH_INPUT {
            assert_eq!(ph.observe(v), None);
        }
        let (up, down) = ph.statistics();
        close(up, PH_UP, 1e-12);
        close(down, PH_DOWN, 1e-12);

        let mut ph = PageHinkley::new(0.1, 5.0, 5);
        let series: Vec<f64> = (0..200)
            .map(|i| {
                if i < 100 {
                    (i % 3) as f64
                } else {
                    3.0 + (i % 3) as f64
                }
            })
            .collect();
        let events: Vec<(usize, DriftDirection)> = series
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| ph.observe(v).map(|d| (i, d)))
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].1, DriftDirection::Up);
        assert!((100..110).contains(&events[0].0), "{events:?}");
    }

    #[test]
    fn drift_detector_sees_a_slow_ramp_in_units_of_the_noise() {
        // Warm-up on alternating ±1 (MAD-σ 1.4826), then a ramp of 0.05 per value: the
        // cumulative excess over δ = 0.5σ passes λ = 30σ some tens of values into the ramp.
        let mut detector = DriftDetector::new(0.5, 30.0, 50);
        let values: Vec<f64> = (0..400)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 } + if i >= 200 { (i - 200) as f64 * 0.05 } else { 0.0 })
            .collect();
        let flagged: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| detector.observe(**v).is_some_and(|v| v.anomalous))
            .map(|(i, _)| i)
            .collect();
        assert!(
            !flagged.is_empty() && flagged[0] > 200 && flagged[0] < 300,
            "{flagged:?}"
        );
    }
}
