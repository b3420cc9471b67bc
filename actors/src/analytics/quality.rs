//! Measured quality of the detectors and the forecast on seeded synthetic data.
//!
//! Each series is a noisy daily-like cycle (level 20, seasonal amplitude 1.5, period 48,
//! Gaussian noise σ = 1) with one injected event: a point spike (6–9σ), a level shift (4–6σ for
//! 150 values), a variance change (extra noise of σ = 3 for 150 values) or a slow drift (a ramp
//! of 0.02–0.04σ per value to the end). An event is *detected* when the method flags a value
//! within its detection window after the start (spike: the value itself; shift: 10 values;
//! variance: 20; drift: 300). The *false-positive rate* is the share of flags among scored
//! values outside every event's disturbed span (the event and the window it takes the detectors
//! to settle afterwards).
//!
//! The numbers printed by `cargo test -p drover-actors analytics::quality -- --nocapture` are
//! the ones in README's quality table; the assertions pin them with a small margin so that a
//! regression fails.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::detector::{Method, detector_for};
use super::forecast::{Direction, Trend, forecast, mase, seasonal_naive, time_to_threshold};

const LEN: usize = 1600;
const PERIOD: usize = 48;
const SERIES_PER_KIND: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Spike,
    LevelShift,
    VarianceChange,
    Drift,
}

const KINDS: [Kind; 4] = [Kind::Spike, Kind::LevelShift, Kind::VarianceChange, Kind::Drift];

struct Labelled {
    values: Vec<f64>,
    start: usize,
    detect_until: usize,
    disturbed_until: usize,
}

fn generate(kind: Kind, seed: u64) -> Labelled {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = Normal::new(0.0, 1.0).expect("valid normal");
    let mut values: Vec<f64> = (0..LEN)
        .map(|t| {
            let phase = 2.0 * std::f64::consts::PI * (t % PERIOD) as f64 / PERIOD as f64;
            20.0 + 1.5 * phase.sin() + noise.sample(&mut rng)
        })
        .collect();
    // After the EIF's 500 training values, and far enough from the end for every window.
    let start = rng.gen_range(600..1200);
    let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
    let (detect, disturbed) = match kind {
        Kind::Spike => {
            values[start] += sign * rng.gen_range(6.0..9.0);
            (1, 5)
        }
        Kind::LevelShift => {
            let shift = sign * rng.gen_range(4.0..6.0);
            values[start..start + 150].iter_mut().for_each(|v| *v += shift);
            (10, 150 + 110)
        }
        Kind::VarianceChange => {
            let extra = Normal::new(0.0, 3.0).expect("valid normal");
            values[start..start + 150]
                .iter_mut()
                .for_each(|v| *v += extra.sample(&mut rng));
            (20, 150 + 110)
        }
        Kind::Drift => {
            let slope = sign * rng.gen_range(0.02..0.04);
            values[start..]
                .iter_mut()
                .enumerate()
                .for_each(|(k, v)| *v += slope * k as f64);
            (300, LEN)
        }
    };
    Labelled {
        values,
        start,
        detect_until: start + detect,
        disturbed_until: (start + disturbed).min(LEN),
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    events: usize,
    detected: usize,
    normal: usize,
    false_flags: usize,
}

impl Tally {
    fn recall(&self) -> f64 {
        self.detected as f64 / self.events as f64
    }
    fn false_positive_rate(&self) -> f64 {
        self.false_flags as f64 / self.normal as f64
    }
    fn add(&mut self, other: Tally) {
        self.events += other.events;
        self.detected += other.detected;
        self.normal += other.normal;
        self.false_flags += other.false_flags;
    }
}

/// Runs `series` series of `kind` through fresh detectors of `method`; one tally per factor in
/// `factors`, a value being flagged when `verdict.score >= factor` (1.0: the default threshold).
fn evaluate(method: Method, kind: Kind, series: usize, factors: &[f64]) -> Vec<Tally> {
    let mut tallies = vec![Tally::default(); factors.len()];
    for i in 0..series {
        let labelled = generate(kind, 1_000 * (kind as u64 + 1) + i as u64);
        let mut detector = detector_for(method, None);
        let mut detected = vec![false; factors.len()];
        for (t, &value) in labelled.values.iter().enumerate() {
            let Some(verdict) = detector.observe(value) else {
                continue;
            };
            for ((factor, tally), hit) in factors.iter().zip(&mut tallies).zip(&mut detected) {
                let flagged = verdict.score >= *factor;
                if (labelled.start..labelled.detect_until).contains(&t) {
                    *hit |= flagged;
                } else if !(labelled.start..labelled.disturbed_until).contains(&t) {
                    tally.normal += 1;
                    tally.false_flags += usize::from(flagged);
                }
            }
        }
        for (tally, hit) in tallies.iter_mut().zip(detected) {
            tally.events += 1;
            tally.detected += usize::from(hit);
        }
    }
    tallies
}

/// Quality of one method at a threshold factor.
#[derive(Debug, Clone, Copy)]
struct Quality {
    per_kind: [f64; 4],
    recall: f64,
    false_positive_rate: f64,
}

fn measure(method: Method, series: usize, factors: &[f64]) -> Vec<Quality> {
    let mut totals = vec![Tally::default(); factors.len()];
    let mut per_kind = vec![[0.0; 4]; factors.len()];
    for (k, kind) in KINDS.iter().enumerate() {
        for (f, tally) in evaluate(method, *kind, series, factors).into_iter().enumerate() {
            per_kind[f][k] = tally.recall();
            totals[f].add(tally);
        }
    }
    factors
        .iter()
        .zip(totals)
        .zip(per_kind)
        .map(|((factor, total), per_kind)| {
            let quality = Quality {
                per_kind,
                recall: total.recall(),
                false_positive_rate: total.false_positive_rate(),
            };
            eprintln!(
                "| {:<8} x{:<4.2} | {:>5.2} | {:>5.2} | {:>5.2} | {:>5.2} | {:>5.2} | {:>6.3}% |",
                method.as_str(),
                factor,
                per_kind[0],
                per_kind[1],
                per_kind[2],
                per_kind[3],
                quality.recall,
                100.0 * quality.false_positive_rate
            );
            quality
        })
        .collect()
}

/// The univariate detectors and the ensemble, 50 series per kind (200 events, about 230,000
/// normal values per method).
#[test]
fn detection_quality_on_the_synthetic_suite() {
    eprintln!("| method  factor | spike | shift | var.  | drift | all   | false + |");
    let zscore = measure(Method::ZScore, SERIES_PER_KIND, &[1.0])[0];
    let mad = measure(Method::Mad, SERIES_PER_KIND, &[1.0])[0];
    let ewma = measure(Method::Ewma, SERIES_PER_KIND, &[1.0])[0];
    let drift = measure(Method::Drift, SERIES_PER_KIND, &[1.0])[0];
    let ensemble = measure(Method::Ensemble, SERIES_PER_KIND, &[1.0])[0];
    // The series are seeded, so these are exact; the bounds leave a small margin below the
    // measured values (in README) so that a change that costs quality fails here.
    let at_least = |q: Quality, recall: f64, max_fp: f64, name: &str| {
        assert!(q.recall >= recall, "{name} recall {} < {recall}", q.recall);
        assert!(
            q.false_positive_rate <= max_fp,
            "{name} false positives {} > {max_fp}",
            q.false_positive_rate
        );
    };
    at_least(zscore, 0.93, 0.002, "zscore");
    at_least(mad, 0.90, 0.002, "mad");
    at_least(ewma, 0.80, 0.004, "ewma");
    at_least(drift, 0.35, 0.0005, "drift");
    assert!(
        drift.per_kind[3] >= 0.98,
        "the drift detector misses drifts: {:?}",
        drift.per_kind
    );
    // The target: ensemble recall >= 0.9 at <= 1% false positives.
    at_least(ensemble, 0.9, 0.01, "ensemble");
    assert_eq!(ensemble.per_kind[0], 1.0, "every spike");
    assert!(
        ensemble.per_kind[3] >= 0.98,
        "drifts, through the sentinel: {:?}",
        ensemble.per_kind
    );
}

/// The isolation forest on one metric (value, difference, rolling deviation), fewer series: its
/// training dominates the suite's time.
#[test]
fn isolation_forest_quality_on_the_synthetic_suite() {
    eprintln!("| method  factor | spike | shift | var.  | drift | all   | false + |");
    // Thresholds 0.8, 0.9, 0.95 (the default) and 1.0, as factors of the default: the lower
    // ones show why 0.95 is the default.
    let eif = measure(Method::Eif, 20, &[0.8 / 0.95, 0.9 / 0.95, 1.0, 1.0 / 0.95]);
    // The forest is trained from a thread-local generator (see isolation.rs), so these vary a
    // little between runs: the bounds have a wider margin than the seeded detectors'.
    assert!(eif[2].recall >= 0.9, "eif recall {}", eif[2].recall);
    assert!(
        eif[2].false_positive_rate <= 0.01,
        "eif false positives {}",
        eif[2].false_positive_rate
    );
    assert!(eif[0].false_positive_rate > eif[2].false_positive_rate);
}

/// A series with a known trend and a 24-step season: level, slope per step, seasonal
/// amplitude, noise σ 0.5. Returns the noisy values and the noise-free curve.
fn trend_and_season(
    rng: &mut ChaCha8Rng,
    len: usize,
    level: f64,
    slope: f64,
    amplitude: f64,
) -> (Vec<f64>, Vec<f64>) {
    let noise = Normal::new(0.0, 0.5).expect("valid normal");
    let clean: Vec<f64> = (0..len)
        .map(|t| {
            let phase = 2.0 * std::f64::consts::PI * (t % 24) as f64 / 24.0;
            level + slope * t as f64 + amplitude * phase.sin()
        })
        .collect();
    let noisy = clean.iter().map(|c| c + noise.sample(rng)).collect();
    (noisy, clean)
}

#[test]
fn forecast_accuracy_against_seasonal_naive() {
    const TRAIN: usize = 240;
    const HORIZON: usize = 48;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let (mut model_mase, mut naive_mase, mut wins) = (Vec::new(), Vec::new(), 0);
    for _ in 0..20 {
        let slope = rng.gen_range(-0.1..0.1);
        let amplitude = rng.gen_range(2.0..5.0);
        let (series, _) = trend_and_season(&mut rng, TRAIN + HORIZON, 50.0, slope, amplitude);
        let (train, test) = series.split_at(TRAIN);
        let predicted = forecast(train, HORIZON, 0.95, None, Trend::Damped).expect("forecast");
        let naive = seasonal_naive(train, 24, HORIZON).expect("naive");
        let m = mase(test, &predicted.point, train, 24).expect("mase");
        let n = mase(test, &naive, train, 24).expect("mase");
        wins += usize::from(m < n);
        model_mase.push(m);
        naive_mase.push(n);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "forecast MASE: model {:.3}, seasonal naive {:.3}, model better on {wins}/20",
        mean(&model_mase),
        mean(&naive_mase)
    );
    assert!(mean(&model_mase) < 1.0, "model MASE {}", mean(&model_mase));
    assert!(mean(&model_mase) < mean(&naive_mase));
    assert!(
        wins >= 18,
        "model better than seasonal naive on only {wins}/20 series"
    );
}

#[test]
fn threshold_crossing_interval_covers_the_true_time() {
    const TRAIN: usize = 200;
    const HORIZON: usize = 150;
    const LIMIT: f64 = 30.0;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut covered, mut cases, mut expected_error) = (0, 0, Vec::new());
    for _ in 0..20 {
        // A battery-like metric falling by 0.2–0.35 per step towards LIMIT.
        let slope = -rng.gen_range(0.2..0.35);
        let (series, clean) = trend_and_season(&mut rng, TRAIN + HORIZON, 100.0, slope, 2.0);
        let Some(truth) = clean[TRAIN..].iter().position(|&v| v <= LIMIT).map(|i| i + 1) else {
            continue;
        };
        cases += 1;
        let predicted = forecast(&series[..TRAIN], HORIZON, 0.95, None, Trend::Linear).expect("forecast");
        let crossing = time_to_threshold(&predicted, LIMIT, Direction::Below);
        let inside =
            crossing.earliest.is_some_and(|e| e <= truth) && crossing.latest.is_none_or(|l| truth <= l);
        covered += usize::from(inside);
        if let Some(expected) = crossing.expected {
            expected_error.push((expected as f64 - truth as f64).abs());
        }
    }
    eprintln!(
        "crossing inside the interval: {covered}/{cases}; expected crossing found in {}, mean error {:.1} steps",
        expected_error.len(),
        expected_error.iter().sum::<f64>() / expected_error.len().max(1) as f64
    );
    // The target: the true crossing inside the reported interval in >= 80% of cases.
    assert!(
        cases >= 15,
        "the generator should cross within the horizon: {cases}"
    );
    assert!(covered as f64 >= 0.8 * cases as f64, "covered {covered}/{cases}");
}
