//! Multivariate anomaly scoring with an Extended Isolation Forest (the
//! `extended-isolation-forest` crate) over derived features.
//!
//! A message's metrics become a feature vector ([`FeatureBuilder`]): per metric its value, its
//! difference from the previous message, and its rolling standard deviation, so a forest sees
//! jumps and sudden noise as well as unusual levels and combinations. Features are standardised
//! with the training set's mean and deviation (the forest cuts with random hyperplanes, so a
//! metric in thousands would otherwise drown one in units), then scored; the raw score is mapped
//! to 0..1 against the range of the training set's scores ([`IsolationModel::normalise`]).
//!
//! The crate's forest has a compile-time dimension, so vectors are padded with zeros to the
//! width of one metric's features or to [`FEATURE_DIM`]: a zero coordinate is the same for every point and never separates any, and
//! the forest is fully extended (random hyperplanes over all coordinates) so no split is spent on
//! a padding coordinate alone.
//!
//! Reproducibility: the crate (0.2.3) draws its trees from the thread-local random generator and
//! takes no seed, so the forest is grown by [`super::seeded_forest`] from
//! [`IsolationOptions::seed`] with the crate's algorithm: the same training set and seed give
//! the same model, which is also how a model survives a restart (its training set and seed are
//! kept, not its trees). It is scored in the flat layout of [`FlatForest`], which gives the
//! crate's score bit for bit at a fraction of the cost (one array per forest instead of a box per
//! node, and only the coordinates the data has instead of the padded width).

use std::collections::VecDeque;

use super::AnalyticsError;
use super::detector::{Detector, Method, Verdict};
use super::seeded_forest::FlatForest;

/// Metrics one model can take (each becomes [`FEATURES_PER_METRIC`] features).
pub const MAX_METRICS: usize = 8;
/// Value, difference from the previous message, rolling standard deviation.
pub const FEATURES_PER_METRIC: usize = 3;
/// The forest's fixed dimension.
pub const FEATURE_DIM: usize = MAX_METRICS * FEATURES_PER_METRIC;

/// Default normalised score from which a message is anomalous.
pub const DEFAULT_EIF_THRESHOLD: f64 = 0.95;

/// Turns a stream of metric vectors into feature vectors.
#[derive(Debug, Clone)]
pub struct FeatureBuilder {
    metrics: usize,
    window: usize,
    previous: Option<Vec<f64>>,
    history: Vec<VecDeque<f64>>,
}

impl FeatureBuilder {
    /// `metrics` in `1..=MAX_METRICS`; `window >= 2` values for the rolling deviation.
    pub fn new(metrics: usize, window: usize) -> Result<Self, AnalyticsError> {
        if metrics == 0 || metrics > MAX_METRICS {
            return Err(AnalyticsError::InvalidParameter {
                name: "metrics",
                reason: format!("{metrics} metrics; a model takes 1 to {MAX_METRICS}"),
            });
        }
        let window = window.max(2);
        Ok(FeatureBuilder {
            metrics,
            window,
            previous: None,
            history: vec![VecDeque::with_capacity(window); metrics],
        })
    }

    pub fn metrics(&self) -> usize {
        self.metrics
    }

    /// Adds one message's metrics (in a fixed order) and returns its features, laid out as all
    /// values, then all differences, then all rolling deviations. `None` until `window`
    /// messages have been seen: a deviation over fewer values is not comparable with the later
    /// ones, and a model trained on those first vectors would take them for its extremes.
    pub fn push(&mut self, values: &[f64]) -> Result<Option<Vec<f64>>, AnalyticsError> {
        if values.len() != self.metrics {
            return Err(AnalyticsError::LengthMismatch {
                left: self.metrics,
                right: values.len(),
            });
        }
        super::ensure_finite(values)?;
        for (history, &value) in self.history.iter_mut().zip(values) {
            if history.len() == self.window {
                history.pop_front();
            }
            history.push_back(value);
        }
        let Some(previous) = self.previous.replace(values.to_vec()) else {
            return Ok(None);
        };
        if self.history[0].len() < self.window {
            return Ok(None);
        }
        let mut features = Vec::with_capacity(self.metrics * FEATURES_PER_METRIC);
        features.extend_from_slice(values);
        features.extend(values.iter().zip(&previous).map(|(v, p)| v - p));
        features.extend(self.history.iter().map(|h| {
            let n = h.len() as f64;
            let mean = h.iter().sum::<f64>() / n;
            (h.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        }));
        Ok(Some(features))
    }
}

/// Forest size and sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsolationOptions {
    pub trees: usize,
    /// Points per tree (capped at the training set's size).
    pub sample_size: usize,
    /// Normalised score from which a point is anomalous.
    pub threshold: f64,
    /// Seed of the forest's random draws.
    pub seed: u64,
}

/// The seed when none is configured.
pub const DEFAULT_SEED: u64 = 0x5eed;

impl Default for IsolationOptions {
    fn default() -> Self {
        IsolationOptions {
            trees: 100,
            sample_size: 256,
            threshold: DEFAULT_EIF_THRESHOLD,
            seed: DEFAULT_SEED,
        }
    }
}

/// Forests are grown at one of two widths, one metric's features or [`FEATURE_DIM`], so that a
/// forest grown from a seed stays the same forest whatever the number of metrics; the flat form
/// then reads only the coordinates the data has.
const NARROW: usize = FEATURES_PER_METRIC;

/// A trained forest with the standardisation and normalisation learned from its training set.
pub struct IsolationModel {
    trees: FlatForest,
    dims: usize,
    centre: Vec<f64>,
    scale: Vec<f64>,
    /// Coordinates the model does not judge: the levels of metrics that only moved one way
    /// through the training set ([`IsolationModel::train_on_messages`]). They standardise to 0.
    ignored: Vec<bool>,
    /// Lowest and highest raw score of the training set: the most ordinary training point maps
    /// to 0, the most isolated one to 1.
    floor: f64,
    ceiling: f64,
    threshold: f64,
}

impl std::fmt::Debug for IsolationModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolationModel")
            .field("dims", &self.dims)
            .field("ignored", &self.ignored)
            .field("floor", &self.floor)
            .field("ceiling", &self.ceiling)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

impl IsolationModel {
    /// Trains on feature vectors of equal length (at most [`FEATURE_DIM`]); needs at least 16.
    pub fn train(features: &[Vec<f64>], options: &IsolationOptions) -> Result<Self, AnalyticsError> {
        Self::train_ignoring(features, options, None)
    }

    /// Trains on vectors a [`FeatureBuilder`] made (values, differences, deviations), leaving
    /// out the level of every metric that is monotone over the training set: each of its
    /// differences has the same sign (or is 0) and at least a quarter are not 0 (a counter,
    /// an odometer, a draining tank). Such a level leaves the training range by its nature, so a
    /// forest that judged it would flag every later message (a sequence number trained on its
    /// first 500 values finds every later one isolated); its differences and their deviation
    /// are still judged, so a counter that jumps, stalls or resets stands out as before.
    pub fn train_on_messages(
        features: &[Vec<f64>],
        options: &IsolationOptions,
    ) -> Result<Self, AnalyticsError> {
        let dims = features.first().map_or(0, Vec::len);
        if dims == 0 || !dims.is_multiple_of(FEATURES_PER_METRIC) || features.iter().any(|f| f.len() != dims)
        {
            return Self::train(features, options);
        }
        let metrics = dims / FEATURES_PER_METRIC;
        let mut ignored = vec![false; dims];
        for (metric, slot) in ignored.iter_mut().take(metrics).enumerate() {
            *slot = monotone(features.iter().map(|f| f[metrics + metric]));
        }
        Self::train_ignoring(features, options, Some(ignored))
    }

    /// The metrics (by position in the vectors [`Self::train_on_messages`] took) whose level the
    /// model leaves out.
    pub fn ignored_levels(&self) -> Vec<usize> {
        (0..self.dims).filter(|d| self.ignored[*d]).collect()
    }

    fn train_ignoring(
        features: &[Vec<f64>],
        options: &IsolationOptions,
        ignored: Option<Vec<bool>>,
    ) -> Result<Self, AnalyticsError> {
        const MIN_TRAINING: usize = 16;
        if features.len() < MIN_TRAINING {
            return Err(AnalyticsError::NotEnoughData {
                what: "isolation forest training",
                needed: MIN_TRAINING,
                got: features.len(),
            });
        }
        let dims = features[0].len();
        if dims == 0 || dims > FEATURE_DIM {
            return Err(AnalyticsError::InvalidParameter {
                name: "features",
                reason: format!("{dims} features; 1 to {FEATURE_DIM}"),
            });
        }
        if let Some(bad) = features.iter().find(|f| f.len() != dims) {
            return Err(AnalyticsError::LengthMismatch {
                left: dims,
                right: bad.len(),
            });
        }
        if features.iter().any(|f| f.iter().any(|v| !v.is_finite())) {
            return Err(AnalyticsError::NonFinite);
        }
        let ignored = ignored.unwrap_or_else(|| vec![false; dims]);
        let n = features.len() as f64;
        let centre: Vec<f64> = (0..dims)
            .map(|d| features.iter().map(|f| f[d]).sum::<f64>() / n)
            .collect();
        let scale: Vec<f64> = (0..dims)
            .map(|d| {
                let var = features.iter().map(|f| (f[d] - centre[d]).powi(2)).sum::<f64>() / n;
                // A constant feature keeps scale 1: it stays constant (and useless) after
                // centring instead of dividing by zero.
                if var > 0.0 { var.sqrt() } else { 1.0 }
            })
            .collect();
        let standardised: Vec<Vec<f64>> = features
            .iter()
            .map(|f| {
                f.iter()
                    .enumerate()
                    .map(|(d, v)| standardise(*v, centre[d], scale[d], ignored[d]))
                    .collect()
            })
            .collect();
        let (trees, training_scores) = if dims <= NARROW {
            grow::<NARROW>(&standardised, dims, options)?
        } else {
            grow::<FEATURE_DIM>(&standardised, dims, options)?
        };
        Ok(IsolationModel {
            trees,
            dims,
            centre,
            scale,
            ignored,
            floor: training_scores.iter().copied().fold(f64::INFINITY, f64::min),
            ceiling: training_scores.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            threshold: options.threshold,
        })
    }

    /// The forest's own score, `2^(-E[h]/c)`: about 0.5 and below is ordinary.
    pub fn raw_score(&self, features: &[f64]) -> Result<f64, AnalyticsError> {
        if features.len() != self.dims {
            return Err(AnalyticsError::LengthMismatch {
                left: self.dims,
                right: features.len(),
            });
        }
        super::ensure_finite(features)?;
        let mut standardised = [0.0; FEATURE_DIM];
        for (d, (slot, v)) in standardised.iter_mut().zip(features).enumerate() {
            *slot = standardise(*v, self.centre[d], self.scale[d], self.ignored[d]);
        }
        Ok(self.trees.score(&standardised[..self.dims]))
    }

    /// Maps a raw score to 0..1 against the training set: 0 for its most ordinary point, 1 for
    /// its most isolated one and anything beyond.
    ///
    /// Why not the raw score: a forest's cuts fall inside the training data's range, so a point
    /// far outside it is isolated no faster than the training set's own extreme points; raw
    /// scores of clear anomalies stall around 0.6–0.7 depending on the data's shape, while the
    /// range of the training scores is a scale the data itself sets.
    pub fn normalise(&self, raw: f64) -> f64 {
        let span = self.ceiling - self.floor;
        if span <= f64::EPSILON {
            return if raw > self.ceiling + f64::EPSILON {
                1.0
            } else {
                0.0
            };
        }
        ((raw - self.floor) / span).clamp(0.0, 1.0)
    }

    /// Scores a feature vector.
    pub fn verdict(&self, features: &[f64]) -> Result<Verdict, AnalyticsError> {
        let normalised = self.normalise(self.raw_score(features)?);
        let score = normalised / self.threshold;
        Ok(Verdict {
            statistic: normalised,
            score,
            anomalous: score >= 1.0,
        })
    }

    /// Per feature, how far (in training deviations) the vector is from the training centre:
    /// the largest of a metric's features names the metric that made the point stand out.
    pub fn deviations(&self, features: &[f64]) -> Vec<f64> {
        features
            .iter()
            .enumerate()
            .take(self.dims)
            .map(|(d, v)| standardise(*v, self.centre[d], self.scale[d], self.ignored[d]).abs())
            .collect()
    }
}

/// Grid of standardised features: 2⁻²⁰ of a training deviation.
const QUANTUM: f64 = 1.0 / 1_048_576.0;
/// Standardised features are clamped to this many deviations, so the grid stays exact.
const FEATURE_LIMIT: f64 = 1e9;

/// Rounds a standardised feature to the [`QUANTUM`] grid.
///
/// Why: the crate draws each cut with `rand`'s `Uniform::new(min, max)`, whose set-up shrinks
/// its scale one ulp at a time until `min + scale` rounds below `max`. When a node's samples
/// differ by a few ulps (values that are equal but for floating-point noise, common once metrics
/// are differenced and standardised), that loop runs for ~10¹⁵ steps: training hangs. On the
/// grid, two values are either equal (the crate skips the draw) or a quantum apart, far above an
/// ulp. A millionth of a deviation is below any sensor's resolution.
fn quantise(value: f64) -> f64 {
    (value.clamp(-FEATURE_LIMIT, FEATURE_LIMIT) / QUANTUM).round() * QUANTUM
}

/// A feature in training deviations from the training centre, on the [`QUANTUM`] grid; 0 for a
/// coordinate the model ignores (the same for every point, so no cut separates on it).
fn standardise(value: f64, centre: f64, scale: f64, ignored: bool) -> f64 {
    if ignored {
        0.0
    } else {
        quantise((value - centre) / scale)
    }
}

/// Whether a series of differences moved one way only: none against the direction of the others,
/// and at least a quarter of them moving (a metric that stepped once in the training set is a
/// level that changed, not a counter).
fn monotone(differences: impl Iterator<Item = f64>) -> bool {
    let (mut up, mut down, mut still) = (0usize, 0usize, 0usize);
    for d in differences {
        match d.partial_cmp(&0.0) {
            Some(std::cmp::Ordering::Greater) => up += 1,
            Some(std::cmp::Ordering::Less) => down += 1,
            _ => still += 1,
        }
    }
    let moving = up + down;
    (up == 0 || down == 0) && moving > 0 && moving * 3 >= still
}

/// Zero-pads a vector to the forest's width.
fn pad<const N: usize>(values: &[f64]) -> [f64; N] {
    let mut padded = [0.0; N];
    for (slot, value) in padded.iter_mut().zip(values) {
        *slot = *value;
    }
    padded
}

/// Grows a fully extended forest of width `N` over vectors of `dims` coordinates (zero-padded
/// to `N`) and scores its own training set.
fn grow<const N: usize>(
    standardised: &[Vec<f64>],
    dims: usize,
    options: &IsolationOptions,
) -> Result<(FlatForest, Vec<f64>), AnalyticsError> {
    let padded: Vec<[f64; N]> = standardised.iter().map(|f| pad(f)).collect();
    let forest = super::seeded_forest::grow_flat(
        &padded,
        options.trees.max(1),
        options.sample_size.clamp(2, padded.len()),
        options.seed,
        dims,
    )?;
    let scores = standardised.iter().map(|p| forest.score(p)).collect();
    Ok((forest, scores))
}

/// Streaming wrapper: builds features, collects `training_size` of them, trains, then scores
/// every message, retraining on the most recent `training_size` vectors every `retrain_every`
/// messages. Training runs inline here; an actor should call [`IsolationModel::train`] on a
/// blocking pool and swap the model in instead.
#[derive(Debug)]
pub struct IsolationDetector {
    features: FeatureBuilder,
    options: IsolationOptions,
    training_size: usize,
    retrain_every: usize,
    recent: VecDeque<Vec<f64>>,
    since_training: usize,
    model: Option<IsolationModel>,
}

impl IsolationDetector {
    pub fn new(
        metrics: usize,
        options: IsolationOptions,
        training_size: usize,
        retrain_every: usize,
    ) -> Result<Self, AnalyticsError> {
        Ok(IsolationDetector {
            features: FeatureBuilder::new(metrics, 10)?,
            options,
            training_size: training_size.max(16),
            retrain_every,
            recent: VecDeque::with_capacity(training_size),
            since_training: 0,
            model: None,
        })
    }

    /// One metric, default forest, 500 training messages, retraining every 1,000.
    pub fn univariate(threshold: f64) -> Self {
        let options = IsolationOptions {
            threshold,
            ..IsolationOptions::default()
        };
        // One metric is always within 1..=MAX_METRICS.
        let features = FeatureBuilder {
            metrics: 1,
            window: 10,
            previous: None,
            history: vec![VecDeque::with_capacity(10)],
        };
        IsolationDetector {
            features,
            options,
            training_size: 500,
            retrain_every: 1000,
            recent: VecDeque::with_capacity(500),
            since_training: 0,
            model: None,
        }
    }

    pub fn model(&self) -> Option<&IsolationModel> {
        self.model.as_ref()
    }

    /// Scores one message's metrics. `None` while the first model is not trained yet.
    pub fn observe_vector(&mut self, values: &[f64]) -> Result<Option<Verdict>, AnalyticsError> {
        let Some(features) = self.features.push(values)? else {
            return Ok(None);
        };
        let verdict = self.model.as_ref().map(|m| m.verdict(&features)).transpose()?;
        if self.recent.len() == self.training_size {
            self.recent.pop_front();
        }
        self.recent.push_back(features);
        self.since_training += 1;
        let due = match &self.model {
            None => self.recent.len() == self.training_size,
            Some(_) => self.retrain_every > 0 && self.since_training >= self.retrain_every,
        };
        if due {
            let training: Vec<Vec<f64>> = self.recent.iter().cloned().collect();
            self.model = Some(IsolationModel::train_on_messages(&training, &self.options)?);
            self.since_training = 0;
        }
        Ok(verdict)
    }
}

impl Detector for IsolationDetector {
    fn method(&self) -> Method {
        Method::Eif
    }

    /// The univariate use: one metric per message; a message of the wrong width or a failed
    /// training scores nothing.
    fn observe(&mut self, value: f64) -> Option<Verdict> {
        self.observe_vector(&[value]).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_values_differences_and_rolling_deviation() {
        let mut builder = FeatureBuilder::new(2, 3).unwrap();
        assert_eq!(builder.push(&[1.0, 10.0]).unwrap(), None);
        assert_eq!(
            builder.push(&[2.0, 14.0]).unwrap(),
            None,
            "the window is not full yet"
        );
        // Window [1, 2, 4] and [10, 14, 14]: numpy.std(ddof=1) = 1.5275252316519465 and
        // 2.3094010767585034
        let f = builder.push(&[4.0, 14.0]).unwrap().unwrap();
        assert_eq!(&f[..4], &[4.0, 14.0, 2.0, 0.0]);
        assert!((f[4] - 1.5275252316519465).abs() < 1e-12, "{f:?}");
        assert!((f[5] - 2.3094010767585034).abs() < 1e-12, "{f:?}");
        // The window slides: [2, 4, 8] -> numpy.std(ddof=1) = 3.0550504633038935
        let f = builder.push(&[8.0, 14.0]).unwrap().unwrap();
        assert!((f[4] - 3.0550504633038935).abs() < 1e-12, "{f:?}");
        assert_eq!(f[5], 0.0);
        assert!(matches!(
            builder.push(&[1.0]),
            Err(AnalyticsError::LengthMismatch { .. })
        ));
        assert!(FeatureBuilder::new(MAX_METRICS + 1, 3).is_err());
    }

    /// Two correlated metrics (y ≈ 2x) on a grid: the unusual *combination* (x normal, y normal
    /// on its own, but not y = 2x) must stand out, which no univariate detector sees.
    #[test]
    fn forest_flags_an_unusual_combination_of_ordinary_values() {
        let training: Vec<Vec<f64>> = (0..400)
            .map(|i| {
                let x = (i % 40) as f64 / 4.0;
                let wobble = ((i * 37 % 17) as f64 - 8.0) / 40.0;
                vec![x, 2.0 * x + wobble]
            })
            .collect();
        let model = IsolationModel::train(&training, &IsolationOptions::default()).unwrap();
        let ordinary = model.verdict(&[5.0, 10.05]).unwrap();
        let odd = model.verdict(&[5.0, 1.0]).unwrap();
        assert!(ordinary.statistic < 0.4, "{ordinary:?}");
        assert!(odd.statistic > 0.7, "{odd:?}");
        assert!(odd.anomalous && !ordinary.anomalous);
        let deviations = model.deviations(&[5.0, 1.0]);
        assert!(deviations[1] > deviations[0]);
    }

    #[test]
    fn scores_are_deterministic_for_a_trained_model_and_within_0_1() {
        let training: Vec<Vec<f64>> = (0..100)
            .map(|i| vec![(i as f64).sin(), (i as f64 * 0.3).cos()])
            .collect();
        let model = IsolationModel::train(&training, &IsolationOptions::default()).unwrap();
        for probe in [[0.0, 0.0], [5.0, -5.0], [1e9, 1e9]] {
            let first = model.verdict(&probe).unwrap();
            assert_eq!(first, model.verdict(&probe).unwrap());
            assert!((0.0..=1.0).contains(&first.statistic));
        }
    }

    #[test]
    fn training_refuses_bad_input() {
        let few = vec![vec![1.0]; 5];
        assert!(matches!(
            IsolationModel::train(&few, &IsolationOptions::default()),
            Err(AnalyticsError::NotEnoughData { .. })
        ));
        let mut ragged = vec![vec![1.0, 2.0]; 20];
        ragged[3] = vec![1.0];
        assert!(matches!(
            IsolationModel::train(&ragged, &IsolationOptions::default()),
            Err(AnalyticsError::LengthMismatch { .. })
        ));
        // A constant training set trains (every feature has scale 1) and scores its own value 0.
        let constant = vec![vec![3.0, 3.0]; 20];
        let model = IsolationModel::train(&constant, &IsolationOptions::default()).unwrap();
        assert_eq!(model.verdict(&[3.0, 3.0]).unwrap().statistic, 0.0);
    }

    #[test]
    fn training_on_values_a_few_ulps_apart_finishes() {
        // Without quantisation this set makes the crate's uniform sampler loop for ~10¹⁵ steps.
        let base = 20.0_f64;
        let near = f64::from_bits(base.to_bits() + 1);
        let training: Vec<Vec<f64>> = (0..200)
            .map(|i| vec![if i % 2 == 0 { base } else { near }, (i % 7) as f64])
            .collect();
        let model = IsolationModel::train(&training, &IsolationOptions::default()).unwrap();
        assert!(model.verdict(&[base, 3.0]).is_ok());
    }

    /// A message counter beside a temperature: vectors of messages `from..to`, the counter
    /// being the message number plus `offset` from `jump_at` on.
    fn counter_and_temperature(from: usize, to: usize, jump_at: usize, offset: f64) -> Vec<Vec<f64>> {
        let mut builder = FeatureBuilder::new(2, 10).unwrap();
        (0..to)
            .filter_map(|i| {
                let seq = i as f64 + if i >= jump_at { offset } else { 0.0 };
                let temperature = 20.0 + ((i * 37 % 23) as f64 - 11.0) / 10.0;
                builder.push(&[seq, temperature]).unwrap()
            })
            .skip(from)
            .collect()
    }

    #[test]
    fn a_counter_is_judged_by_its_steps_not_its_level() {
        let training = counter_and_temperature(0, 500, usize::MAX, 0.0);
        let options = IsolationOptions::default();
        let model = IsolationModel::train_on_messages(&training, &options).unwrap();
        assert_eq!(
            model.ignored_levels(),
            vec![0],
            "the counter's level, not the temperature's"
        );
        // Later messages: the counter is far beyond what training saw, the rest repeats what
        // training saw, so they are flagged no more often than the training set itself (whose
        // most isolated points normalise to the top of the scale by construction).
        let flagged_share = |model: &IsolationModel, vectors: &[Vec<f64>]| {
            vectors
                .iter()
                .filter(|f| model.verdict(f).unwrap().anomalous)
                .count() as f64
                / vectors.len() as f64
        };
        let later = counter_and_temperature(5_000, 5_400, usize::MAX, 0.0);
        let (trained, flagged) = (flagged_share(&model, &training), flagged_share(&model, &later));
        assert!(
            flagged <= trained + 0.02,
            "{flagged} of later messages, {trained} of training"
        );
        // The same training set judged on every level flags (nearly) all of them: what the
        // monotone rule is for.
        let naive = IsolationModel::train(&training, &options).unwrap();
        assert!(flagged_share(&naive, &later) > 0.9);
        // A jump and a reset of the counter, and a temperature spike, still stand out.
        let jump = counter_and_temperature(5_000, 5_100, 5_050, 10_000.0);
        let reset = counter_and_temperature(5_000, 5_100, 5_050, -5_050.0);
        for (what, vectors) in [("jump", &jump), ("reset", &reset)] {
            let at = 5_050 - 5_000 - 9; // the builder's first vector is message 9's
            assert!(
                model.verdict(&vectors[at]).unwrap().anomalous,
                "{what}: {:?}",
                vectors[at]
            );
        }
        let mut spike = later[100].clone();
        spike[1] = 45.0;
        spike[3] = spike[1] - later[99][1];
        assert!(model.verdict(&spike).unwrap().anomalous);
        let deviations = model.deviations(&later[200]);
        assert_eq!(deviations[0], 0.0, "an ignored level names no metric");
    }

    #[test]
    fn monotone_means_one_direction_and_moving_often() {
        assert!(monotone([1.0, 1.0, 2.0, 0.0].into_iter()));
        assert!(monotone([-0.5, -0.5, 0.0, -1.0].into_iter()), "a draining tank");
        assert!(
            !monotone([1.0, -1.0, 1.0, 1.0].into_iter()),
            "noise goes both ways"
        );
        assert!(!monotone([0.0; 8].into_iter()), "a constant is no counter");
        assert!(
            !monotone([1.0, 0.0, 0.0, 0.0, 0.0].into_iter()),
            "one step in five is a level change"
        );
        // Layouts that are not a feature builder's train on every coordinate.
        let raw: Vec<Vec<f64>> = (0..50).map(|i| vec![i as f64, 1.0]).collect();
        let model = IsolationModel::train_on_messages(&raw, &IsolationOptions::default()).unwrap();
        assert!(model.ignored_levels().is_empty());
    }

    #[test]
    fn streaming_detector_trains_then_scores() {
        let mut detector = IsolationDetector::new(1, IsolationOptions::default(), 50, 0).unwrap();
        let mut verdicts = Vec::new();
        for i in 0..120 {
            let value = if i == 100 { 40.0 } else { (i % 5) as f64 };
            verdicts.push(detector.observe(value));
        }
        // Messages 0..=9 fill the rolling window (the 10th gives the first vector), 9..=58 train.
        assert!(verdicts[..59].iter().all(Option::is_none));
        assert!(verdicts[59..].iter().all(Option::is_some));
        assert!(verdicts[100].unwrap().anomalous, "{:?}", &verdicts[95..105]);
    }
}
