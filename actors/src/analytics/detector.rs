//! Streaming univariate anomaly detectors: one value in, one score out, constant memory.
//!
//! Each detector compares a new value with what it learned from the values *before* it and only
//! then learns from it, so a spike is scored against a clean history. Until `warm_up` values have
//! been seen a detector returns `None`: a verdict on three points is noise, not detection.
//!
//! Scores share one scale so the [`Ensemble`] can combine them: a detector's score is its
//! statistic divided by its threshold, so `score >= 1.0` means "anomalous" for every method.

use std::collections::VecDeque;

/// The product's default `ANOMALY_THRESHOLD`: three standard deviations.
pub const DEFAULT_THRESHOLD: f64 = 3.0;
/// Default sliding window of the z-score and MAD detectors, in values.
pub const DEFAULT_WINDOW: usize = 100;
/// Default smoothing factor of the EWMA detector (an effective memory of about 1/alpha values).
pub const DEFAULT_EWMA_ALPHA: f64 = 0.05;

/// `1 / Φ⁻¹(3/4)`: scales a median absolute deviation into a standard deviation for normal data
/// (scipy's `median_abs_deviation(scale="normal")`).
const MAD_TO_SIGMA: f64 = 1.482_602_218_505_602;

/// Which detector produced a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    ZScore,
    Mad,
    Ewma,
    /// Extended Isolation Forest ([`super::isolation`]).
    Eif,
    /// Page–Hinkley change in the mean ([`super::drift::DriftDetector`]).
    Drift,
    Ensemble,
}

impl Method {
    /// The name used in configuration, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ZScore => "zscore",
            Method::Mad => "mad",
            Method::Ewma => "ewma",
            Method::Eif => "eif",
            Method::Drift => "drift",
            Method::Ensemble => "ensemble",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = super::AnalyticsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zscore" => Ok(Method::ZScore),
            "mad" => Ok(Method::Mad),
            "ewma" => Ok(Method::Ewma),
            "eif" => Ok(Method::Eif),
            "drift" => Ok(Method::Drift),
            "ensemble" => Ok(Method::Ensemble),
            other => Err(super::AnalyticsError::InvalidParameter {
                name: "method",
                reason: format!("unknown method {other:?} (zscore, mad, ewma, eif, drift, ensemble)"),
            }),
        }
    }
}

/// The verdict on one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The method's own statistic (a signed deviation in standard deviations for the three
    /// univariate methods).
    pub statistic: f64,
    /// `|statistic| / threshold`: `>= 1.0` is anomalous, whatever the method.
    pub score: f64,
    pub anomalous: bool,
}

impl Verdict {
    fn from_deviation(statistic: f64, threshold: f64) -> Self {
        let score = statistic.abs() / threshold;
        Verdict {
            statistic,
            score,
            anomalous: score >= 1.0,
        }
    }
}

/// A streaming detector: feed values in order, get a verdict once warmed up.
pub trait Detector {
    fn method(&self) -> Method;
    /// Scores `value` against the history, then adds it to the history. `None` while warming up
    /// or when `value` is not finite (a non-finite value is skipped, not learned).
    fn observe(&mut self, value: f64) -> Option<Verdict>;
    /// The verdicts of the detectors inside this one on the last value (an ensemble's voters),
    /// so that rules can ask for one method even when it runs inside the ensemble.
    fn members(&self) -> &[(Method, Verdict)] {
        &[]
    }
}

/// Deviation of a value from a spread; a flat history (zero spread) makes any change infinitely
/// surprising and no change not surprising at all.
fn deviation(value: f64, centre: f64, spread: f64) -> f64 {
    let diff = value - centre;
    if spread > f64::EPSILON * centre.abs().max(1.0) {
        diff / spread
    } else if diff.abs() <= f64::EPSILON * centre.abs().max(1.0) {
        0.0
    } else {
        diff.signum() * f64::INFINITY
    }
}

/// Z-score over a sliding window: `(x - mean) / std` of the last `window` values (sample
/// standard deviation, `ddof = 1`).
#[derive(Debug, Clone)]
pub struct ZScoreDetector {
    window: VecDeque<f64>,
    capacity: usize,
    warm_up: usize,
    threshold: f64,
    sum: f64,
    sum_sq: f64,
    pushes_since_resum: usize,
}

impl ZScoreDetector {
    /// `window >= 2`; `warm_up` is clamped to `2..=window`.
    pub fn new(window: usize, warm_up: usize, threshold: f64) -> Self {
        let capacity = window.max(2);
        ZScoreDetector {
            window: VecDeque::with_capacity(capacity),
            capacity,
            warm_up: warm_up.clamp(2, capacity),
            threshold,
            sum: 0.0,
            sum_sq: 0.0,
            pushes_since_resum: 0,
        }
    }

    fn mean_std(&self) -> (f64, f64) {
        let n = self.window.len() as f64;
        let mean = self.sum / n;
        // Running sums drift by rounding; a tiny negative variance is rounding, not data.
        let var = ((self.sum_sq - n * mean * mean) / (n - 1.0)).max(0.0);
        (mean, var.sqrt())
    }
}

impl Default for ZScoreDetector {
    fn default() -> Self {
        ZScoreDetector::new(DEFAULT_WINDOW, DEFAULT_WINDOW, DEFAULT_THRESHOLD)
    }
}

impl Detector for ZScoreDetector {
    fn method(&self) -> Method {
        Method::ZScore
    }

    fn observe(&mut self, value: f64) -> Option<Verdict> {
        if !value.is_finite() {
            return None;
        }
        let verdict = (self.window.len() >= self.warm_up).then(|| {
            let (mean, std) = self.mean_std();
            Verdict::from_deviation(deviation(value, mean, std), self.threshold)
        });
        if self.window.len() == self.capacity
            && let Some(old) = self.window.pop_front()
        {
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.window.push_back(value);
        self.sum += value;
        self.sum_sq += value * value;
        // Adding and removing values leaves rounding residue in the running sums; over months
        // of telemetry it would add up. Recomputing once per window length bounds it at O(1)
        // amortised cost.
        self.pushes_since_resum += 1;
        if self.pushes_since_resum >= self.capacity {
            self.sum = self.window.iter().sum();
            self.sum_sq = self.window.iter().map(|v| v * v).sum();
            self.pushes_since_resum = 0;
        }
        verdict
    }
}

/// Robust z-score: `(x - median) / (1.4826 · MAD)` over a sliding window. A few outliers in the
/// window move neither the median nor the MAD, so a burst of spikes does not hide the next one.
/// Costs two selections over a copy of the window per value (O(w), no allocation).
#[derive(Debug, Clone)]
pub struct MadDetector {
    window: VecDeque<f64>,
    capacity: usize,
    warm_up: usize,
    threshold: f64,
    scratch: Vec<f64>,
}

impl MadDetector {
    /// `window >= 3`; `warm_up` is clamped to `3..=window`.
    pub fn new(window: usize, warm_up: usize, threshold: f64) -> Self {
        let capacity = window.max(3);
        MadDetector {
            window: VecDeque::with_capacity(capacity),
            capacity,
            warm_up: warm_up.clamp(3, capacity),
            threshold,
            scratch: Vec::with_capacity(capacity),
        }
    }
}

impl Default for MadDetector {
    fn default() -> Self {
        MadDetector::new(DEFAULT_WINDOW, DEFAULT_WINDOW, DEFAULT_THRESHOLD)
    }
}

/// Median and normal-consistent MAD of a sample.
pub fn median_mad(values: &[f64]) -> (f64, f64) {
    median_mad_in_place(&mut values.to_vec())
}

/// [`median_mad`] overwriting `values` with the absolute deviations.
pub fn median_mad_in_place(values: &mut [f64]) -> (f64, f64) {
    let centre = super::median_in_place(values);
    for v in values.iter_mut() {
        *v = (*v - centre).abs();
    }
    (centre, super::median_in_place(values) * MAD_TO_SIGMA)
}

impl Detector for MadDetector {
    fn method(&self) -> Method {
        Method::Mad
    }

    fn observe(&mut self, value: f64) -> Option<Verdict> {
        if !value.is_finite() {
            return None;
        }
        let verdict = (self.window.len() >= self.warm_up).then(|| {
            self.scratch.clear();
            self.scratch.extend(self.window.iter().copied());
            let (centre, spread) = median_mad_in_place(&mut self.scratch);
            Verdict::from_deviation(deviation(value, centre, spread), self.threshold)
        });
        if self.window.len() == self.capacity {
            self.window.pop_front();
        }
        self.window.push_back(value);
        verdict
    }
}

/// Exponentially weighted mean and variance: the mean follows slow trends (a drifting sensor is
/// not an anomaly at every sample), the variance adapts to the noise level.
///
/// Update, with `d = x - mean`: `mean += alpha·d`, `var = (1 - alpha)·(var + alpha·d²)`
/// (pandas `ewm(alpha, adjust=False)` for the mean, the matching biased recursive variance).
#[derive(Debug, Clone)]
pub struct EwmaDetector {
    alpha: f64,
    warm_up: usize,
    threshold: f64,
    seen: usize,
    mean: f64,
    var: f64,
}

impl EwmaDetector {
    /// `alpha` in `(0, 1]`; `warm_up >= 2`.
    pub fn new(alpha: f64, warm_up: usize, threshold: f64) -> Self {
        EwmaDetector {
            alpha: alpha.clamp(f64::EPSILON, 1.0),
            warm_up: warm_up.max(2),
            threshold,
            seen: 0,
            mean: 0.0,
            var: 0.0,
        }
    }

    /// Current smoothed mean and variance.
    pub fn state(&self) -> (f64, f64) {
        (self.mean, self.var)
    }
}

impl Default for EwmaDetector {
    fn default() -> Self {
        EwmaDetector::new(DEFAULT_EWMA_ALPHA, DEFAULT_WINDOW, DEFAULT_THRESHOLD)
    }
}

impl Detector for EwmaDetector {
    fn method(&self) -> Method {
        Method::Ewma
    }

    fn observe(&mut self, value: f64) -> Option<Verdict> {
        if !value.is_finite() {
            return None;
        }
        if self.seen == 0 {
            self.seen = 1;
            self.mean = value;
            return None;
        }
        let diff = value - self.mean;
        let verdict = (self.seen >= self.warm_up)
            .then(|| Verdict::from_deviation(deviation(value, self.mean, self.var.sqrt()), self.threshold));
        self.mean += self.alpha * diff;
        self.var = (1.0 - self.alpha) * (self.var + self.alpha * diff * diff);
        self.seen += 1;
        verdict
    }
}

/// Combines detectors: a value is anomalous when at least `quorum` voters flag it, or when any
/// sentinel does. The score is the larger of the `quorum`-th highest voter score and the highest
/// sentinel score, so `score >= 1.0` agrees with the flag.
///
/// Voting keeps the false positives of a union down: the point detectors err on different
/// values (the MAD on seasonal peaks, the EWMA just after a step). A sentinel watches for what
/// no voter can see, such as a slow drift that every windowed detector learns as normal.
pub struct Ensemble {
    voters: Vec<Box<dyn Detector + Send>>,
    sentinels: Vec<Box<dyn Detector + Send>>,
    quorum: usize,
    scores: Vec<f64>,
    members: Vec<(Method, Verdict)>,
}

impl Ensemble {
    /// `quorum` is clamped to `1..=voters.len()`.
    pub fn new(
        voters: Vec<Box<dyn Detector + Send>>,
        sentinels: Vec<Box<dyn Detector + Send>>,
        quorum: usize,
    ) -> Self {
        let quorum = quorum.clamp(1, voters.len().max(1));
        let scores = Vec::with_capacity(voters.len());
        Ensemble {
            members: Vec::with_capacity(voters.len()),
            voters,
            sentinels,
            quorum,
            scores,
        }
    }

    /// Z-score, MAD and EWMA with their defaults and `threshold`, two votes out of three, and a
    /// Page–Hinkley drift sentinel.
    pub fn standard(threshold: f64) -> Self {
        Ensemble::new(
            vec![
                Box::new(ZScoreDetector::new(DEFAULT_WINDOW, DEFAULT_WINDOW, threshold)),
                Box::new(MadDetector::new(DEFAULT_WINDOW, DEFAULT_WINDOW, threshold)),
                Box::new(EwmaDetector::new(DEFAULT_EWMA_ALPHA, DEFAULT_WINDOW, threshold)),
            ],
            vec![Box::new(super::drift::DriftDetector::default())],
            2,
        )
    }
}

impl std::fmt::Debug for Ensemble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let voters: Vec<_> = self.voters.iter().map(|m| m.method()).collect();
        let sentinels: Vec<_> = self.sentinels.iter().map(|m| m.method()).collect();
        f.debug_struct("Ensemble")
            .field("voters", &voters)
            .field("sentinels", &sentinels)
            .field("quorum", &self.quorum)
            .finish()
    }
}

impl Detector for Ensemble {
    fn method(&self) -> Method {
        Method::Ensemble
    }

    fn members(&self) -> &[(Method, Verdict)] {
        &self.members
    }

    fn observe(&mut self, value: f64) -> Option<Verdict> {
        self.scores.clear();
        self.members.clear();
        for voter in &mut self.voters {
            if let Some(verdict) = voter.observe(value) {
                self.scores.push(verdict.score);
                self.members.push((voter.method(), verdict));
            }
        }
        let mut sentinel_score: Option<f64> = None;
        let mut sentinels_warm = true;
        for sentinel in &mut self.sentinels {
            match sentinel.observe(value) {
                Some(verdict) => sentinel_score = Some(sentinel_score.unwrap_or(0.0).max(verdict.score)),
                None => sentinels_warm = false,
            }
        }
        // Every member must be warm: a vote among fewer would change the quorum's meaning.
        if self.scores.len() < self.voters.len() || self.voters.is_empty() || !sentinels_warm {
            return None;
        }
        self.scores.sort_by(|a, b| b.total_cmp(a));
        let score = self.scores[self.quorum - 1].max(sentinel_score.unwrap_or(0.0));
        Some(Verdict {
            statistic: score,
            score,
            anomalous: score >= 1.0,
        })
    }
}

/// A detector of `method` with its default window and warm-up. `threshold` is in the method's
/// own unit (standard deviations for z-score, MAD, EWMA and the ensemble; a normalised 0..1
/// score for the isolation forest; the drift detector has no threshold of this kind and ignores
/// it); `None` takes the method's default.
pub fn detector_for(method: Method, threshold: Option<f64>) -> Box<dyn Detector + Send> {
    use super::isolation::{DEFAULT_EIF_THRESHOLD, IsolationDetector};
    let sigmas = threshold.unwrap_or(DEFAULT_THRESHOLD);
    match method {
        Method::ZScore => Box::new(ZScoreDetector::new(DEFAULT_WINDOW, DEFAULT_WINDOW, sigmas)),
        Method::Mad => Box::new(MadDetector::new(DEFAULT_WINDOW, DEFAULT_WINDOW, sigmas)),
        Method::Ewma => Box::new(EwmaDetector::new(DEFAULT_EWMA_ALPHA, DEFAULT_WINDOW, sigmas)),
        Method::Eif => Box::new(IsolationDetector::univariate(
            threshold.unwrap_or(DEFAULT_EIF_THRESHOLD),
        )),
        Method::Drift => Box::new(super::drift::DriftDetector::default()),
        Method::Ensemble => Box::new(Ensemble::standard(sigmas)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERIES: [f64; 12] = [
        10.0, 12.0, 11.0, 13.0, 12.0, 11.0, 10.0, 12.0, 11.0, 30.0, 12.0, 11.0,
    ];

    fn run(detector: &mut dyn Detector, values: &[f64]) -> Vec<Option<Verdict>> {
        values.iter().map(|&v| detector.observe(v)).collect()
    }

    #[test]
    fn zscore_matches_numpy_over_the_window() {
        // w = SERIES[4:9]; (SERIES[9] - w.mean()) / w.std(ddof=1)
        // numpy: w = [12, 11, 10, 12, 11] -> mean 11.2, std 0.8366600265340756
        //        z = (30 - 11.2) / 0.8366600265340756 = 22.4702978554866
        let mut detector = ZScoreDetector::new(5, 5, 3.0);
        let verdicts = run(&mut detector, &SERIES);
        assert!(verdicts[..5].iter().all(Option::is_none), "warming up");
        let spike = verdicts[9].expect("warm");
        assert!((spike.statistic - 22.4702978554866).abs() < 1e-9, "{spike:?}");
        assert!(spike.anomalous);
        // The value after the spike: window [11, 10, 12, 11, 30] has mean 14.8,
        // numpy: (12 - w.mean()) / w.std(ddof=1) = -0.3283906822141303
        let after = verdicts[10].expect("warm");
        assert!(
            (after.statistic - (-0.3283906822141303)).abs() < 1e-9,
            "{after:?}"
        );
        assert!(!after.anomalous);
    }

    #[test]
    fn mad_matches_scipy() {
        // w = SERIES[4:9] = [12, 11, 10, 12, 11]: median 11,
        // scipy.stats.median_abs_deviation(w, scale="normal") = 1.482602218505602
        // robust z of 30 = (30 - 11) / 1.482602218505602 = 12.815305253725551
        let mut detector = MadDetector::new(5, 5, 3.0);
        let verdicts = run(&mut detector, &SERIES);
        let spike = verdicts[9].expect("warm");
        assert!((spike.statistic - 12.815305253725551).abs() < 1e-9, "{spike:?}");
        // After the spike the window is [11, 10, 12, 11, 30]: median 11, MAD still 1.4826:
        // the spike did not widen the robust spread. (12 - 11) / 1.4826 = 0.6744897501960817
        let after = verdicts[10].expect("warm");
        assert!((after.statistic - 0.6744897501960817).abs() < 1e-9, "{after:?}");
    }

    #[test]
    fn ewma_mean_matches_pandas_and_variance_the_recursion() {
        // s = pandas.Series(SERIES[:9]).ewm(alpha=0.3, adjust=False)
        // s.mean().iloc[-1] = 11.20293028, s.var(bias=True).iloc[-1] = 0.6718876014591217
        let mut detector = EwmaDetector::new(0.3, 3, 3.0);
        run(&mut detector, &SERIES[..9]);
        let (mean, var) = detector.state();
        assert!((mean - 11.20293028).abs() < 1e-9, "{mean}");
        assert!((var - 0.6718876014591217).abs() < 1e-9, "{var}");
        let spike = detector.observe(30.0).expect("warm");
        assert!(((30.0 - mean) / var.sqrt() - spike.statistic).abs() < 1e-9);
        assert!(spike.anomalous);
    }

    #[test]
    fn ewma_follows_a_slow_ramp_and_still_sees_a_spike_on_it() {
        // A steady rise with alternating noise: the smoothed mean keeps up, so no value of the
        // ramp is flagged, while a jump of 5 noise widths on top of it is.
        let mut values: Vec<f64> = (0..400)
            .map(|i| i as f64 * 0.01 + if i % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        values[300] += 5.0;
        let mut ewma = EwmaDetector::new(0.05, 50, 3.0);
        let verdicts = run(&mut ewma, &values);
        let flagged: Vec<usize> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some_and(|v| v.anomalous))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(flagged, vec![300]);
    }

    #[test]
    fn flat_history_flags_any_change_and_nothing_else() {
        let mut detector = ZScoreDetector::new(5, 5, 3.0);
        let verdicts = run(&mut detector, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]);
        assert_eq!(verdicts[5].map(|v| v.anomalous), Some(false));
        assert_eq!(verdicts[6].map(|v| v.anomalous), Some(true));
    }

    #[test]
    fn non_finite_values_are_skipped_not_learned() {
        let mut detector = ZScoreDetector::new(3, 3, 3.0);
        run(&mut detector, &[1.0, 2.0, 3.0]);
        assert_eq!(detector.observe(f64::NAN), None);
        // mean 2, std 1 -> z of 2 is 0: the NaN did not enter the window.
        assert_eq!(detector.observe(2.0).map(|v| v.statistic), Some(0.0));
    }

    #[test]
    fn ensemble_needs_a_quorum() {
        let mut ensemble = Ensemble::standard(3.0);
        let mut flags = Vec::new();
        for i in 0..300 {
            let value = if i == 250 { 50.0 } else { (i % 7) as f64 };
            flags.push(ensemble.observe(value));
        }
        assert!(flags[..DEFAULT_WINDOW].iter().all(Option::is_none));
        assert_eq!(flags[250].map(|v| v.anomalous), Some(true));
        let false_flags = flags
            .iter()
            .enumerate()
            .filter(|(i, v)| *i != 250 && v.is_some_and(|v| v.anomalous))
            .count();
        assert_eq!(false_flags, 0);
    }

    #[test]
    fn method_names_round_trip() {
        for method in [
            Method::ZScore,
            Method::Mad,
            Method::Ewma,
            Method::Eif,
            Method::Ensemble,
        ] {
            assert_eq!(method.as_str().parse::<Method>(), Ok(method));
        }
        assert!("prophet".parse::<Method>().is_err());
    }
}
