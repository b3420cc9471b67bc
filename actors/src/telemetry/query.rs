//! Telemetry queries: what can be asked, and the pure arithmetic every store shares.
//!
//! Aggregates are computed per time bucket. Buckets are aligned to multiples of `every` since
//! the Unix epoch (so `every=1d` buckets start at UTC midnight), like InfluxDB's
//! `GROUP BY time()`; a bucket is reported with its start time, and only buckets holding data
//! are reported. Without `every`, the whole range is one bucket reported at `start`.
//!
//! Mean, min, max, sum and count can be computed from partial aggregates ([`Partial`]), which is
//! what lets a store answer them from its 1-minute and 1-hour rollups; [`plan`] decides which
//! rollup (if any) answers which part of the range. `last` and the percentiles need raw points.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, TenantId};
use crate::telemetry::{MetricName, MetricValue};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;

/// How values in a bucket are combined.
///
/// Numeric aggregations (`mean`, `min`, `max`, `sum`, percentiles) consider number values only;
/// `count` counts values of every kind; `last` is the latest value of any kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    Mean,
    Min,
    Max,
    Sum,
    Count,
    Last,
    P50,
    P95,
    P99,
}

impl Aggregation {
    pub const ALL: [Aggregation; 9] = [
        Aggregation::Mean,
        Aggregation::Min,
        Aggregation::Max,
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::Last,
        Aggregation::P50,
        Aggregation::P95,
        Aggregation::P99,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Mean => "mean",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Last => "last",
            Aggregation::P50 => "p50",
            Aggregation::P95 => "p95",
            Aggregation::P99 => "p99",
        }
    }

    /// The percentile (0–100) for p50/p95/p99.
    pub fn percentile(self) -> Option<f64> {
        match self {
            Aggregation::P50 => Some(50.0),
            Aggregation::P95 => Some(95.0),
            Aggregation::P99 => Some(99.0),
            _ => None,
        }
    }

    /// Whether rollups (count/sum/min/max per bucket) can answer it.
    pub fn from_rollups(self) -> bool {
        matches!(
            self,
            Aggregation::Mean | Aggregation::Min | Aggregation::Max | Aggregation::Sum | Aggregation::Count
        )
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Aggregation::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!("unknown aggregation {s:?}; expected one of mean, min, max, sum, count, last, p50, p95, p99")
            })
    }
}

/// An aggregation and its bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucketing {
    pub aggregation: Aggregation,
    /// Bucket width in milliseconds; `None` makes the whole range one bucket.
    pub every_ms: Option<i64>,
}

/// A query of one device's telemetry, always scoped to a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryQuery {
    pub tenant: TenantId,
    pub device: DeviceId,
    /// At least one; each becomes one series of the result, in this order.
    pub metrics: Vec<MetricName>,
    /// Inclusive start, epoch milliseconds.
    pub start_ms: i64,
    /// Exclusive end, epoch milliseconds; greater than `start_ms`.
    pub end_ms: i64,
    /// `None`: raw points.
    pub bucketing: Option<Bucketing>,
    /// Most points (raw) the result may hold over all metrics; more is
    /// [`TooManyPoints`](crate::telemetry::store::TelemetryStoreError::TooManyPoints).
    pub limit: usize,
}

/// Which data answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataSource {
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "rollup_1m")]
    Rollup1m,
    #[serde(rename = "rollup_1h")]
    Rollup1h,
}

impl DataSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DataSource::Raw => "raw",
            DataSource::Rollup1m => "rollup_1m",
            DataSource::Rollup1h => "rollup_1h",
        }
    }
}

/// One value at one time: a raw point, or a bucket's aggregate at the bucket's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ts_ms: i64,
    pub value: MetricValue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeriesData {
    pub metric: MetricName,
    /// Oldest first.
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    /// One per requested metric, in the order asked (empty when nothing was stored).
    pub series: Vec<SeriesData>,
    /// The rollup that answered the bulk of the range, or raw.
    pub source: DataSource,
}

/// Parses a bucket width such as `500ms`, `30s`, `1m`, `1h`, `1d` or `1w`.
pub fn parse_every(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        "w" => 7 * DAY_MS,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: use a whole number and a unit ms, s, m, h, d or w, e.g. 30s, 1m, 1h"
            ));
        }
    };
    let n: i64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: the number is missing or too large"))?;
    match n.checked_mul(unit_ms) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(format!(
            "{text:?} is not a usable duration: it must be greater than zero"
        )),
    }
}

/// Formats a bucket width the way [`parse_every`] reads it (the largest exact unit).
pub fn format_every(ms: i64) -> String {
    for (unit, size) in [
        ("w", 7 * DAY_MS),
        ("d", DAY_MS),
        ("h", HOUR_MS),
        ("m", MINUTE_MS),
        ("s", 1000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// The start of the bucket holding `ts_ms`.
pub fn bucket_start(ts_ms: i64, start_ms: i64, every_ms: Option<i64>) -> i64 {
    match every_ms {
        Some(every) => ts_ms.div_euclid(every) * every,
        None => start_ms,
    }
}

/// How many buckets `[start, end)` spans with width `every` (1 without width).
pub fn bucket_count(start_ms: i64, end_ms: i64, every_ms: Option<i64>) -> i64 {
    match every_ms {
        Some(every) => (end_ms - 1).div_euclid(every) - start_ms.div_euclid(every) + 1,
        None => 1,
    }
}

/// The value at percentile `p` (0–100) of `sorted` (ascending), by nearest rank rounded half up:
/// index `floor(n * p / 100 + 0.5) - 1`. This is InfluxDB's `PERCENTILE()`, so both stores
/// answer alike. `None` for an empty slice or a rank below the first value.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    let rank = (n as f64 * p / 100.0 + 0.5).floor() as i64 - 1;
    if rank < 0 || n == 0 {
        return None;
    }
    Some(sorted[(rank as usize).min(n - 1)])
}

/// [`percentile`] of values in any order, found by selection (linear time) instead of a full
/// sort; `values` is reordered. The same value as sorting and calling [`percentile`].
pub fn select_percentile(values: &mut [f64], p: f64) -> Option<f64> {
    let n = values.len();
    let rank = (n as f64 * p / 100.0 + 0.5).floor() as i64 - 1;
    if rank < 0 || n == 0 {
        return None;
    }
    let (_, value, _) = values.select_nth_unstable_by((rank as usize).min(n - 1), f64::total_cmp);
    Some(*value)
}

/// A mergeable summary of some values: everything mean/min/max/sum/count need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Partial {
    /// Values of every kind.
    pub count: u64,
    /// Number values only.
    pub num_count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Partial {
    fn default() -> Self {
        Partial {
            count: 0,
            num_count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Partial {
    pub fn add(&mut self, value: &MetricValue) {
        self.count += 1;
        if let MetricValue::Number(n) = value {
            self.num_count += 1;
            self.sum += n;
            self.min = self.min.min(*n);
            self.max = self.max.max(*n);
        }
    }

    pub fn merge(&mut self, other: &Partial) {
        self.count += other.count;
        self.num_count += other.num_count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The aggregate, or `None` when it is undefined for these values (a mean of no numbers).
    /// Only for aggregations that [`Aggregation::from_rollups`].
    ///
    /// Sums are f64 from the first value on (and so are the stored rollups), so values near the
    /// i64 limits add up without wrapping; a sum past f64's range (±1.8e308) is infinite, and
    /// its sum or mean is refused with [`AggregateOverflow`] rather than left out of the answer
    /// as if the bucket had no values.
    pub fn finish(&self, aggregation: Aggregation) -> Result<Option<MetricValue>, AggregateOverflow> {
        let numeric = self.num_count > 0;
        let value = match aggregation {
            Aggregation::Count if self.count > 0 => self.count as f64,
            Aggregation::Mean | Aggregation::Sum if numeric && !self.sum.is_finite() => {
                return Err(AggregateOverflow { aggregation });
            }
            Aggregation::Mean if numeric => self.sum / self.num_count as f64,
            Aggregation::Sum if numeric => self.sum,
            Aggregation::Min if numeric => self.min,
            Aggregation::Max if numeric => self.max,
            _ => return Ok(None),
        };
        Ok(MetricValue::number(value))
    }
}

/// A sum (or the sum a mean divides) beyond the range of a 64-bit float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {} of these values is beyond the range of a 64-bit float (±1.8e308): narrow the time range or the bucket (every), or ask for min or max",
    aggregation.as_str()
)]
pub struct AggregateOverflow {
    pub aggregation: Aggregation,
}

/// Aggregates raw samples (oldest first) per bucket. Buckets without a defined value (no
/// numbers for a numeric aggregation) are left out.
pub fn aggregate(
    samples: &[Sample],
    bucketing: Bucketing,
    start_ms: i64,
) -> Result<Vec<Sample>, AggregateOverflow> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < samples.len() {
        let bucket = bucket_start(samples[i].ts_ms, start_ms, bucketing.every_ms);
        let mut j = i;
        while j < samples.len() && bucket_start(samples[j].ts_ms, start_ms, bucketing.every_ms) == bucket {
            j += 1;
        }
        if let Some(value) = aggregate_bucket(&samples[i..j], bucketing.aggregation)? {
            out.push(Sample { ts_ms: bucket, value });
        }
        i = j;
    }
    Ok(out)
}

/// The aggregate of one bucket's samples (oldest first).
pub fn aggregate_bucket(
    samples: &[Sample],
    aggregation: Aggregation,
) -> Result<Option<MetricValue>, AggregateOverflow> {
    if let Some(p) = aggregation.percentile() {
        let mut numbers: Vec<f64> = samples.iter().filter_map(|s| s.value.as_f64()).collect();
        return Ok(select_percentile(&mut numbers, p).and_then(MetricValue::number));
    }
    if aggregation == Aggregation::Last {
        return Ok(samples.last().map(|s| s.value.clone()));
    }
    let mut partial = Partial::default();
    samples.iter().for_each(|s| partial.add(&s.value));
    partial.finish(aggregation)
}

/// Turns per-bucket partials (in any order, several per bucket allowed) into samples.
pub fn finish_partials(
    mut partials: Vec<(i64, Partial)>,
    aggregation: Aggregation,
    start_ms: i64,
    every_ms: Option<i64>,
) -> Result<Vec<Sample>, AggregateOverflow> {
    for (ts, _) in partials.iter_mut() {
        *ts = bucket_start(*ts, start_ms, every_ms);
    }
    partials.sort_by_key(|(ts, _)| *ts);
    let mut merged: Vec<(i64, Partial)> = Vec::with_capacity(partials.len());
    for (ts, partial) in partials {
        match merged.last_mut() {
            Some((last, acc)) if *last == ts => acc.merge(&partial),
            _ => merged.push((ts, partial)),
        }
    }
    let mut out = Vec::with_capacity(merged.len());
    for (ts_ms, p) in merged {
        if let Some(value) = p.finish(aggregation)? {
            out.push(Sample { ts_ms, value });
        }
    }
    Ok(out)
}

/// A rollup table (or InfluxDB retention policy) of per-bucket partial aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RollupLevel {
    Minute,
    Hour,
}

impl RollupLevel {
    /// Coarsest first: the order [`plan`] tries them in.
    pub const ALL: [RollupLevel; 2] = [RollupLevel::Hour, RollupLevel::Minute];

    pub fn resolution_ms(self) -> i64 {
        match self {
            RollupLevel::Minute => MINUTE_MS,
            RollupLevel::Hour => HOUR_MS,
        }
    }

    pub fn source(self) -> DataSource {
        match self {
            RollupLevel::Minute => DataSource::Rollup1m,
            RollupLevel::Hour => DataSource::Rollup1h,
        }
    }
}

/// How far a rollup is complete: buckets starting before `until_ms` are rolled up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupCoverage {
    pub level: RollupLevel,
    pub until_ms: i64,
}

/// A part of the query range and where to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Raw {
        start_ms: i64,
        end_ms: i64,
    },
    Rollup {
        level: RollupLevel,
        start_ms: i64,
        end_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPlan {
    pub source: DataSource,
    pub segments: Vec<Segment>,
}

/// Decides where to read `[start, end)` from.
///
/// Raw points answer raw queries, `last` and percentiles. For mean/min/max/sum/count the
/// coarsest rollup whose resolution divides `every` (any rollup when there is no `every`) reads
/// the aligned middle of the range; the unaligned edges and the part after the rollup's
/// completion point are read raw, so the answer equals the raw answer wherever raw data is
/// kept, and extends beyond the raw retention as far as the rollup's own retention.
pub fn plan(
    start_ms: i64,
    end_ms: i64,
    bucketing: Option<Bucketing>,
    coverage: &[RollupCoverage],
) -> QueryPlan {
    let raw = QueryPlan {
        source: DataSource::Raw,
        segments: vec![Segment::Raw { start_ms, end_ms }],
    };
    let Some(bucketing) = bucketing.filter(|b| b.aggregation.from_rollups()) else {
        return raw;
    };
    for level in RollupLevel::ALL {
        let Some(cov) = coverage.iter().find(|c| c.level == level) else {
            continue;
        };
        let res = level.resolution_ms();
        if bucketing.every_ms.is_some_and(|every| every % res != 0) {
            continue;
        }
        let a = start_ms.div_euclid(res) * res + if start_ms.rem_euclid(res) == 0 { 0 } else { res };
        let b = (end_ms.div_euclid(res) * res).min(cov.until_ms);
        if a >= b {
            continue;
        }
        let mut segments = Vec::with_capacity(3);
        if start_ms < a {
            segments.push(Segment::Raw { start_ms, end_ms: a });
        }
        segments.push(Segment::Rollup {
            level,
            start_ms: a,
            end_ms: b,
        });
        if b < end_ms {
            segments.push(Segment::Raw { start_ms: b, end_ms });
        }
        return QueryPlan {
            source: level.source(),
            segments,
        };
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(ts_ms: i64, v: f64) -> Sample {
        Sample {
            ts_ms,
            value: MetricValue::Number(v),
        }
    }

    #[test]
    fn aggregation_names_round_trip() {
        for a in Aggregation::ALL {
            assert_eq!(a.as_str().parse::<Aggregation>().unwrap(), a);
        }
        assert!("median".parse::<Aggregation>().unwrap_err().contains("p95"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_every("30s"), Ok(30_000));
        assert_eq!(parse_every("1m"), Ok(60_000));
        assert_eq!(parse_every("1h"), Ok(3_600_000));
        assert_eq!(parse_every("1d"), Ok(86_400_000));
        assert_eq!(parse_every("2w"), Ok(14 * 86_400_000));
        assert_eq!(parse_every("250ms"), Ok(250));
        for bad in [
            "",
            "1",
            "m",
            "0s",
            "1.5m",
            "-1m",
            "1y",
            "99999999999999999999s",
            "1 m",
        ] {
            assert!(parse_every(bad).is_err(), "{bad}");
        }
        for ms in [250, 30_000, 60_000, 90_000, 3_600_000, 86_400_000] {
            assert_eq!(parse_every(&format_every(ms)), Ok(ms));
        }
        assert_eq!(format_every(90_000), "90s");
    }

    #[test]
    fn buckets_align_to_the_epoch() {
        assert_eq!(bucket_start(125_000, 0, Some(60_000)), 120_000);
        assert_eq!(bucket_start(-1, 0, Some(60_000)), -60_000);
        assert_eq!(bucket_start(125_000, 7, None), 7);
        assert_eq!(bucket_count(30_000, 150_000, Some(60_000)), 3);
        assert_eq!(bucket_count(0, 120_000, Some(60_000)), 2);
        assert_eq!(bucket_count(0, 1, None), 1);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        // n = 10: p50 -> floor(5.5) - 1 = 4 -> 5; p95 -> floor(10) - 1 = 9 -> 10.
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 95.0), Some(10.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        let v: Vec<f64> = (1..=13).map(f64::from).collect();
        // n = 13: p95 -> floor(12.85) - 1 = 11 -> 12 (nearest rank rounded, not ceiling).
        assert_eq!(percentile(&v, 95.0), Some(12.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 1.0), None);
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn selected_percentiles_equal_sorted_ones() {
        // Scrambled values with repeats and negatives, in several lengths.
        for n in [1usize, 2, 3, 10, 13, 100, 1001] {
            let values: Vec<f64> = (0..n).map(|i| ((i * 7919) % 211) as f64 - 100.5).collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            for p in [1.0, 50.0, 95.0, 99.0, 100.0] {
                let mut scratch = values.clone();
                assert_eq!(
                    select_percentile(&mut scratch, p),
                    percentile(&sorted, p),
                    "n {n} p {p}"
                );
            }
        }
        assert_eq!(select_percentile(&mut [], 50.0), None);
        assert_eq!(select_percentile(&mut [3.0], 1.0), None);
    }

    #[test]
    fn aggregates_per_bucket() {
        let samples = vec![
            n(0, 1.0),
            n(10_000, 3.0),
            Sample {
                ts_ms: 20_000,
                value: MetricValue::Text("x".into()),
            },
            n(60_000, -2.0),
            n(61_000, 4.0),
            Sample {
                ts_ms: 130_000,
                value: MetricValue::Bool(true),
            },
        ];
        let run = |a: Aggregation| {
            aggregate(
                &samples,
                Bucketing {
                    aggregation: a,
                    every_ms: Some(60_000),
                },
                0,
            )
            .unwrap()
        };
        assert_eq!(run(Aggregation::Mean), vec![n(0, 2.0), n(60_000, 1.0)]);
        assert_eq!(run(Aggregation::Sum), vec![n(0, 4.0), n(60_000, 2.0)]);
        assert_eq!(run(Aggregation::Min), vec![n(0, 1.0), n(60_000, -2.0)]);
        assert_eq!(run(Aggregation::Max), vec![n(0, 3.0), n(60_000, 4.0)]);
        assert_eq!(
            run(Aggregation::Count),
            vec![n(0, 3.0), n(60_000, 2.0), n(120_000, 1.0)]
        );
        assert_eq!(
            run(Aggregation::Last),
            vec![
                Sample {
                    ts_ms: 0,
                    value: MetricValue::Text("x".into())
                },
                n(60_000, 4.0),
                Sample {
                    ts_ms: 120_000,
                    value: MetricValue::Bool(true)
                },
            ]
        );
        assert_eq!(run(Aggregation::P50), vec![n(0, 1.0), n(60_000, -2.0)]);
        let whole = aggregate(
            &samples,
            Bucketing {
                aggregation: Aggregation::Count,
                every_ms: None,
            },
            5,
        )
        .unwrap();
        assert_eq!(whole, vec![n(5, 6.0)]);
    }

    #[test]
    fn partials_merge_like_raw() {
        let values = [3.5, -1.0, 8.25, 0.0, 2.0];
        let mut whole = Partial::default();
        values.iter().for_each(|v| whole.add(&MetricValue::Number(*v)));
        let mut left = Partial::default();
        let mut right = Partial::default();
        values[..2]
            .iter()
            .for_each(|v| left.add(&MetricValue::Number(*v)));
        values[2..]
            .iter()
            .for_each(|v| right.add(&MetricValue::Number(*v)));
        left.merge(&right);
        assert_eq!(left, whole);
        assert_eq!(
            whole.finish(Aggregation::Mean),
            Ok(Some(MetricValue::Number(12.75 / 5.0)))
        );
        assert_eq!(Partial::default().finish(Aggregation::Mean), Ok(None));
        let samples = finish_partials(
            vec![(120_000, left), (0, whole), (60_000, whole)],
            Aggregation::Count,
            0,
            Some(120_000),
        )
        .unwrap();
        assert_eq!(samples, vec![n(0, 10.0), n(120_000, 5.0)]);
    }

    #[test]
    fn sums_near_the_limits() {
        let sum_of = |values: &[f64], aggregation: Aggregation| {
            let mut p = Partial::default();
            values.iter().for_each(|v| p.add(&MetricValue::Number(*v)));
            p.finish(aggregation)
        };
        // Past i64::MAX: no wrapping, no error.
        let big = i64::MAX as f64;
        assert_eq!(
            sum_of(&[big, big], Aggregation::Sum),
            Ok(Some(MetricValue::Number(2.0 * big)))
        );
        assert_eq!(
            sum_of(&[-big, -big], Aggregation::Mean),
            Ok(Some(MetricValue::Number(-big)))
        );
        // Past f64::MAX: refused with the reason, for the sum and the mean alike.
        for aggregation in [Aggregation::Sum, Aggregation::Mean] {
            assert_eq!(
                sum_of(&[f64::MAX, f64::MAX], aggregation),
                Err(AggregateOverflow { aggregation })
            );
        }
        // Opposite overflows make NaN: refused too.
        assert!(
            sum_of(
                &[f64::MAX, f64::MAX, -f64::MAX, -f64::MAX, -f64::MAX],
                Aggregation::Sum
            )
            .is_err()
        );
        // Min, max and count of the same values are fine.
        assert_eq!(
            sum_of(&[f64::MAX, f64::MAX], Aggregation::Max),
            Ok(Some(MetricValue::Number(f64::MAX)))
        );
        // Finishing partials reports it too.
        let mut p = Partial::default();
        p.add(&MetricValue::Number(f64::MAX));
        assert!(finish_partials(vec![(0, p), (0, p)], Aggregation::Sum, 0, None).is_err());
    }

    fn cov(until_ms: i64) -> Vec<RollupCoverage> {
        vec![
            RollupCoverage {
                level: RollupLevel::Minute,
                until_ms,
            },
            RollupCoverage {
                level: RollupLevel::Hour,
                until_ms: until_ms.div_euclid(HOUR_MS) * HOUR_MS,
            },
        ]
    }

    fn mean_every(every: Option<i64>) -> Option<Bucketing> {
        Some(Bucketing {
            aggregation: Aggregation::Mean,
            every_ms: every,
        })
    }

    #[test]
    fn plans_pick_the_coarsest_fitting_rollup() {
        let day = DAY_MS;
        let now = 10 * day + 30 * MINUTE_MS + 5_000;
        // Hourly buckets over days: the hour rollup, raw after its completion point.
        let p = plan(0, 10 * day + 40 * MINUTE_MS, mean_every(Some(HOUR_MS)), &cov(now));
        assert_eq!(p.source, DataSource::Rollup1h);
        assert_eq!(
            p.segments,
            vec![
                Segment::Rollup {
                    level: RollupLevel::Hour,
                    start_ms: 0,
                    end_ms: 10 * day
                },
                Segment::Raw {
                    start_ms: 10 * day,
                    end_ms: 10 * day + 40 * MINUTE_MS
                },
            ]
        );
        // 5-minute buckets: minutes; unaligned edges raw.
        let p = plan(
            30_000,
            9 * MINUTE_MS + 1,
            mean_every(Some(5 * MINUTE_MS)),
            &cov(now),
        );
        assert_eq!(p.source, DataSource::Rollup1m);
        assert_eq!(
            p.segments,
            vec![
                Segment::Raw {
                    start_ms: 30_000,
                    end_ms: MINUTE_MS
                },
                Segment::Rollup {
                    level: RollupLevel::Minute,
                    start_ms: MINUTE_MS,
                    end_ms: 9 * MINUTE_MS
                },
                Segment::Raw {
                    start_ms: 9 * MINUTE_MS,
                    end_ms: 9 * MINUTE_MS + 1
                },
            ]
        );
        // One bucket over the whole range may use any rollup.
        assert_eq!(
            plan(0, 2 * day, mean_every(None), &cov(now)).source,
            DataSource::Rollup1h
        );
    }

    #[test]
    fn plans_fall_back_to_raw() {
        let now = 10 * DAY_MS;
        let raw = |start_ms, end_ms| vec![Segment::Raw { start_ms, end_ms }];
        // Raw points, last and percentiles.
        assert_eq!(plan(0, DAY_MS, None, &cov(now)).segments, raw(0, DAY_MS));
        for a in [Aggregation::Last, Aggregation::P95] {
            let b = Some(Bucketing {
                aggregation: a,
                every_ms: Some(HOUR_MS),
            });
            assert_eq!(plan(0, DAY_MS, b, &cov(now)).source, DataSource::Raw);
        }
        // Buckets no rollup divides.
        assert_eq!(
            plan(0, DAY_MS, mean_every(Some(30_000)), &cov(now)).source,
            DataSource::Raw
        );
        assert_eq!(
            plan(0, DAY_MS, mean_every(Some(90_000)), &cov(now)).source,
            DataSource::Raw
        );
        // Ranges shorter than a rollup bucket, or not rolled up yet.
        assert_eq!(
            plan(1000, 50_000, mean_every(None), &cov(now)).source,
            DataSource::Raw
        );
        assert_eq!(
            plan(now, now + HOUR_MS, mean_every(Some(MINUTE_MS)), &cov(now)).source,
            DataSource::Raw
        );
        // No rollups at all (a store without them).
        assert_eq!(
            plan(0, DAY_MS, mean_every(Some(HOUR_MS)), &[]).source,
            DataSource::Raw
        );
    }
}
