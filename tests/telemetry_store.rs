//! The telemetry store suite, run against the embedded SQLite store and against InfluxDB
//! (`DROVER_TEST_INFLUX_URL`; a database of its own per test, dropped afterwards), plus the
//! durable spool. Expected aggregates are computed here, independently of the stores' code.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use drover::telemetry::influx::{InfluxSettings, InfluxTelemetryStore};
use drover::telemetry::sqlite::{SqliteSettings, SqliteTelemetryStore};
use drover::telemetry::{FileSpool, Retention};
use drover_actors::telemetry::query::{
    Aggregation, Bucketing, DAY_MS, DataSource, HOUR_MS, MINUTE_MS, QueryResult, Sample, TelemetryQuery,
};
use drover_actors::telemetry::store::{
    MaintenanceReport, PointBatch, SpoolError, StoreInfo, TelemetrySpool, TelemetryStore,
    TelemetryStoreError, replay_spool,
};
use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Influx,
}

/// An InfluxDB database created for one test and dropped after it.
struct InfluxDatabase {
    url: String,
    name: String,
}

impl Drop for InfluxDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        // reqwest's blocking client must not run on the test's async runtime.
        let _ = std::thread::spawn(move || {
            reqwest::blocking::Client::new()
                .post(format!("{url}/query"))
                .form(&[("q", format!("DROP DATABASE \"{name}\""))])
                .send()
        })
        .join();
    }
}

struct Harness {
    kind: Kind,
    store: Arc<dyn TelemetryStore>,
    influx: Option<InfluxDatabase>,
    _dir: tempfile::TempDir,
}

fn retention() -> Retention {
    Retention {
        raw_ms: 30 * DAY_MS,
        rollup_1m_ms: 90 * DAY_MS,
        rollup_1h_ms: 730 * DAY_MS,
    }
}

async fn open(kind: Kind) -> Option<Harness> {
    let dir = tempfile::tempdir().unwrap();
    match kind {
        Kind::Sqlite => {
            let settings = SqliteSettings {
                path: dir.path().join("telemetry.db"),
                retention: retention(),
                cache_mib: 16,
            };
            let store = SqliteTelemetryStore::open(settings).unwrap();
            Some(Harness {
                kind,
                store: Arc::new(store),
                influx: None,
                _dir: dir,
            })
        }
        Kind::Influx => {
            let url = common::service_url("DROVER_TEST_INFLUX_URL")?;
            let url = url.trim_end_matches('/').to_string();
            let name = format!("drover_t_{}", uuid::Uuid::new_v4().simple());
            let store = InfluxTelemetryStore::new(InfluxSettings {
                url: url.clone(),
                db: name.clone(),
                token: String::new(),
                retention: retention(),
            })
            .unwrap();
            store.ensure_schema().await.expect("InfluxDB schema");
            Some(Harness {
                kind,
                store: Arc::new(store),
                influx: Some(InfluxDatabase { url, name }),
                _dir: dir,
            })
        }
    }
}

/// Runs each listed `async fn name(kind: Kind)` as a test on SQLite and on InfluxDB.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Sqlite).await
                }
            )*
        }
        mod influxdb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Influx).await
                }
            )*
        }
    };
}

on_both_stores!(
    raw_points_of_every_kind_round_trip,
    aggregations_match_values_computed_here,
    tenants_and_devices_never_mix,
    rewriting_a_batch_stores_it_once,
    rollups_are_maintained_and_read_for_long_ranges,
    retention_expires_raw_data,
);

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

fn metric(name: &str) -> MetricName {
    MetricName::parse(name).unwrap()
}

fn point(t: &str, d: &str, m: &str, ts_ms: i64, value: MetricValue) -> TelemetryPoint {
    TelemetryPoint {
        tenant: tenant(t),
        device: device(d),
        device_type: "sensor, v2".into(),
        metric: metric(m),
        ts_ms,
        value,
    }
}

fn num(v: f64) -> MetricValue {
    MetricValue::Number(v)
}

/// Whole hours, a day or two back: older than anything the continuous queries look at, well
/// inside the raw retention.
fn past_hour(days_back: i64) -> i64 {
    let now = Utc::now().timestamp_millis();
    (now - days_back * DAY_MS).div_euclid(HOUR_MS) * HOUR_MS
}

fn query(
    t: &str,
    d: &str,
    metrics: &[&str],
    start_ms: i64,
    end_ms: i64,
    bucketing: Option<Bucketing>,
) -> TelemetryQuery {
    TelemetryQuery {
        tenant: tenant(t),
        device: device(d),
        metrics: metrics.iter().map(|m| metric(m)).collect(),
        start_ms,
        end_ms,
        bucketing,
        limit: 100_000,
    }
}

fn agg(aggregation: Aggregation, every_ms: Option<i64>) -> Option<Bucketing> {
    Some(Bucketing {
        aggregation,
        every_ms,
    })
}

fn samples(result: &QueryResult, i: usize) -> Vec<(i64, MetricValue)> {
    result.series[i]
        .samples
        .iter()
        .map(|s: &Sample| (s.ts_ms, s.value.clone()))
        .collect()
}

fn assert_close(actual: &[(i64, MetricValue)], expected: &[(i64, f64)], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: {actual:?} vs {expected:?}");
    for ((ta, va), (te, ve)) in actual.iter().zip(expected) {
        assert_eq!(ta, te, "{what}: bucket times {actual:?} vs {expected:?}");
        let va = va
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {va:?} is not a number"));
        assert!(
            (va - ve).abs() <= 1e-9 * ve.abs().max(1.0),
            "{what} at {ta}: got {va}, expected {ve}"
        );
    }
}

/// Deterministic pseudo-random numbers (a 64-bit LCG), so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

async fn raw_points_of_every_kind_round_trip(kind: Kind) {
    let Some(h) = open(kind).await else { return };
    let t0 = past_hour(1);
    let batch: Vec<TelemetryPoint> = vec![
        point("acme", "sensor-001", "temperature", t0, num(22.5)),
        point("acme", "sensor-001", "humidity", t0, num(65.0)),
        point("acme", "sensor-001", "temperature", t0 + 1000, num(-3.25)),
        point("acme", "sensor-001", "door", t0 + 1500, MetricValue::Bool(true)),
        point("acme", "sensor-001", "door", t0 + 2500, MetricValue::Bool(false)),
        point(
            "acme",
            "sensor-001",
            "status",
            t0 + 2000,
            MetricValue::Text("say \"hi\", a=b \\ ' ok".into()),
        ),
        point("acme", "sensor-001", "temperature", t0 + 60_000, num(1e-7)),
    ];
    h.store.write(batch.into()).await.unwrap();

    let result = h
        .store
        .query(query(
            "acme",
            "sensor-001",
            &["temperature", "door", "status", "nothing"],
            t0,
            t0 + 60_000,
            None,
        ))
        .await
        .unwrap();
    assert_eq!(result.source, DataSource::Raw);
    let names: Vec<&str> = result.series.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["temperature", "door", "status", "nothing"]);
    // Start inclusive, end exclusive, oldest first.
    assert_eq!(
        samples(&result, 0),
        vec![(t0, num(22.5)), (t0 + 1000, num(-3.25))]
    );
    assert_eq!(
        samples(&result, 1),
        vec![
            (t0 + 1500, MetricValue::Bool(true)),
            (t0 + 2500, MetricValue::Bool(false))
        ]
    );
    assert_eq!(
        samples(&result, 2),
        vec![(t0 + 2000, MetricValue::Text("say \"hi\", a=b \\ ' ok".into()))]
    );
    assert!(result.series[3].samples.is_empty());

    let result = h
        .store
        .query(query(
            "acme",
            "sensor-001",
            &["temperature"],
            t0 + 1,
            t0 + 2 * MINUTE_MS,
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        samples(&result, 0),
        vec![(t0 + 1000, num(-3.25)), (t0 + 60_000, num(1e-7))]
    );

    // The limit counts points over all metrics.
    let mut limited = query(
        "acme",
        "sensor-001",
        &["temperature", "door"],
        t0,
        t0 + HOUR_MS,
        None,
    );
    limited.limit = 5;
    assert!(h.store.query(limited.clone()).await.is_ok());
    limited.limit = 4;
    assert_eq!(
        h.store.query(limited).await.unwrap_err(),
        TelemetryStoreError::TooManyPoints { limit: 4 }
    );
    h.store.ping().await.unwrap();
}

/// Values per bucket the way the API documents them, computed without the stores' code.
fn expected(
    points: &[(i64, MetricValue)],
    aggregation: Aggregation,
    every: Option<i64>,
    start: i64,
) -> Vec<(i64, MetricValue)> {
    let mut buckets: BTreeMap<i64, Vec<&MetricValue>> = BTreeMap::new();
    for (ts, v) in points {
        let bucket = every.map_or(start, |w| ts.div_euclid(w) * w);
        buckets.entry(bucket).or_default().push(v);
    }
    let mut out = Vec::new();
    for (bucket, values) in buckets {
        let mut numbers: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
        let value = match aggregation {
            Aggregation::Count => Some(num(values.len() as f64)),
            Aggregation::Last => values.last().map(|v| (*v).clone()),
            _ if numbers.is_empty() => None,
            Aggregation::Mean => Some(num(numbers.iter().sum::<f64>() / numbers.len() as f64)),
            Aggregation::Sum => Some(num(numbers.iter().sum())),
            Aggregation::Min => Some(num(numbers.iter().cloned().fold(f64::MAX, f64::min))),
            Aggregation::Max => Some(num(numbers.iter().cloned().fold(f64::MIN, f64::max))),
            Aggregation::P50 | Aggregation::P95 | Aggregation::P99 => {
                let p = match aggregation {
                    Aggregation::P50 => 50.0,
                    Aggregation::P95 => 95.0,
                    _ => 99.0,
                };
                numbers.sort_by(|a, b| a.partial_cmp(b).unwrap());
                // Nearest rank, rounded half up.
                let rank = (numbers.len() as f64 * p / 100.0 + 0.5).floor() as usize;
                Some(num(numbers[rank.clamp(1, numbers.len()) - 1]))
            }
        };
        if let Some(v) = value {
            out.push((bucket, v));
        }
    }
    out
}

fn check(actual: &[(i64, MetricValue)], expected: &[(i64, MetricValue)], what: &str) {
    let numeric: Option<Vec<(i64, f64)>> = expected
        .iter()
        .map(|(t, v)| v.as_f64().map(|f| (*t, f)))
        .collect();
    match numeric {
        Some(expected) => assert_close(actual, &expected, what),
        None => assert_eq!(actual, expected, "{what}"),
    }
}

async fn aggregations_match_values_computed_here(kind: Kind) {
    let Some(h) = open(kind).await else { return };
    let t0 = past_hour(1) - 3 * HOUR_MS;
    let mut rng = Lcg(42);
    let mut load = Vec::new();
    let mut power = Vec::new();
    let mut batch = Vec::new();
    let mut ts = t0 + 137;
    while ts < t0 + 3 * HOUR_MS {
        let v = (rng.next() % 100_000) as f64 / 100.0 - 200.0;
        load.push((ts, num(v)));
        batch.push(point("acme", "pump-7", "load", ts, num(v)));
        if rng.next().is_multiple_of(3) {
            let p = (rng.next() % 1000) as f64;
            power.push((ts, num(p)));
            batch.push(point("acme", "pump-7", "power", ts, num(p)));
        }
        // Every so often the metric reports a string (a fault code): counted, not averaged.
        if rng.next().is_multiple_of(97) {
            ts += 1;
            load.push((ts, MetricValue::Text("E42".into())));
            batch.push(point(
                "acme",
                "pump-7",
                "load",
                ts,
                MetricValue::Text("E42".into()),
            ));
        }
        ts += 7_000 + (rng.next() % 20_000) as i64;
    }
    for chunk in batch.chunks(1000) {
        h.store.write(chunk.to_vec().into()).await.unwrap();
    }
    // An unaligned range cuts the first and last buckets.
    let (start, end) = (t0 + 10 * MINUTE_MS + 5_000, t0 + 3 * HOUR_MS - 7 * MINUTE_MS);
    let within = |series: &[(i64, MetricValue)]| -> Vec<(i64, MetricValue)> {
        series
            .iter()
            .filter(|(t, _)| *t >= start && *t < end)
            .cloned()
            .collect()
    };
    let (load_in, power_in) = (within(&load), within(&power));
    for aggregation in Aggregation::ALL {
        for every in [Some(5 * MINUTE_MS), Some(HOUR_MS), Some(90_000), None] {
            let result = h
                .store
                .query(query(
                    "acme",
                    "pump-7",
                    &["load", "power"],
                    start,
                    end,
                    agg(aggregation, every),
                ))
                .await
                .unwrap_or_else(|e| panic!("{aggregation} every {every:?}: {e}"));
            let what = format!("{:?} {aggregation} every {every:?}", h.kind);
            check(
                &samples(&result, 0),
                &expected(&load_in, aggregation, every, start),
                &format!("load {what}"),
            );
            check(
                &samples(&result, 1),
                &expected(&power_in, aggregation, every, start),
                &format!("power {what}"),
            );
        }
    }
}

async fn tenants_and_devices_never_mix(kind: Kind) {
    let Some(h) = open(kind).await else { return };
    let t0 = past_hour(1);
    let batch = vec![
        point("acme", "sensor-001", "temperature", t0, num(1.0)),
        point("globex", "sensor-001", "temperature", t0, num(100.0)),
        point("globex", "sensor-001", "temperature", t0 + 1000, num(200.0)),
        point("acme", "sensor-002", "temperature", t0, num(7.0)),
    ];
    h.store.write(batch.into()).await.unwrap();
    let read = |t: &'static str, d: &'static str, b: Option<Bucketing>| {
        let store = h.store.clone();
        async move {
            let result = store
                .query(query(t, d, &["temperature"], t0, t0 + HOUR_MS, b))
                .await
                .unwrap();
            samples(&result, 0)
        }
    };
    assert_eq!(read("acme", "sensor-001", None).await, vec![(t0, num(1.0))]);
    assert_eq!(
        read("globex", "sensor-001", None).await,
        vec![(t0, num(100.0)), (t0 + 1000, num(200.0))]
    );
    assert_eq!(read("acme", "sensor-002", None).await, vec![(t0, num(7.0))]);
    assert!(read("initech", "sensor-001", None).await.is_empty());
    let sum = agg(Aggregation::Sum, None);
    assert_eq!(read("acme", "sensor-001", sum).await, vec![(t0, num(1.0))]);
    assert_eq!(read("globex", "sensor-001", sum).await, vec![(t0, num(300.0))]);
}

async fn rewriting_a_batch_stores_it_once(kind: Kind) {
    let Some(h) = open(kind).await else { return };
    let t0 = past_hour(1);
    let batch: PointBatch = (0..500)
        .map(|i| point("acme", "meter-1", "energy", t0 + i * 1000, num(i as f64)))
        .collect::<Vec<_>>()
        .into();
    h.store.write(batch.clone()).await.unwrap();
    h.store.write(batch).await.unwrap();
    let count = agg(Aggregation::Count, None);
    let sum = agg(Aggregation::Sum, None);
    let q = |b| query("acme", "meter-1", &["energy"], t0, t0 + HOUR_MS, b);
    assert_eq!(
        samples(&h.store.query(q(count)).await.unwrap(), 0),
        vec![(t0, num(500.0))]
    );
    assert_eq!(
        samples(&h.store.query(q(sum)).await.unwrap(), 0),
        vec![(t0, num(124_750.0))]
    );
    assert_eq!(h.store.query(q(None)).await.unwrap().series[0].samples.len(), 500);

    // The last write of a point wins.
    h.store
        .write(vec![point("acme", "meter-1", "energy", t0, num(1000.0))].into())
        .await
        .unwrap();
    assert_eq!(
        samples(&h.store.query(q(sum)).await.unwrap(), 0),
        vec![(t0, num(125_750.0))]
    );
    assert_eq!(
        samples(&h.store.query(q(count)).await.unwrap(), 0),
        vec![(t0, num(500.0))]
    );
}

async fn rollups_are_maintained_and_read_for_long_ranges(kind: Kind) {
    let Some(h) = open(kind).await else { return };
    let t0 = past_hour(2);
    let mut values = Vec::new();
    let mut batch = Vec::new();
    for i in 0..(4 * 3600 / 10) {
        let ts = t0 + i * 10_000 + 3;
        let v = ((i * 37) % 101) as f64 / 4.0;
        values.push((ts, num(v)));
        batch.push(point("acme", "boiler", "temp", ts, num(v)));
        if i % 50 == 0 {
            values.push((ts + 1, MetricValue::Bool(true)));
            batch.push(point("acme", "boiler", "temp", ts + 1, MetricValue::Bool(true)));
        }
    }
    for chunk in batch.chunks(1000) {
        h.store.write(chunk.to_vec().into()).await.unwrap();
    }
    let (start, end) = (t0, t0 + 4 * HOUR_MS);
    let run = |aggregation, every| {
        let store = h.store.clone();
        async move {
            store
                .query(query(
                    "acme",
                    "boiler",
                    &["temp"],
                    start,
                    end,
                    agg(aggregation, every),
                ))
                .await
                .unwrap()
        }
    };
    // Before maintenance nothing is rolled up: raw answers.
    assert_eq!(
        run(Aggregation::Mean, Some(HOUR_MS)).await.source,
        DataSource::Raw
    );

    let report = h.store.maintain(Utc::now().timestamp_millis()).await.unwrap();
    assert!(report.rollup_rows_written > 0, "{report:?}");
    for (aggregation, every, source) in [
        (Aggregation::Mean, Some(HOUR_MS), DataSource::Rollup1h),
        (Aggregation::Max, Some(2 * HOUR_MS), DataSource::Rollup1h),
        (Aggregation::Count, None, DataSource::Rollup1h),
        (Aggregation::Sum, Some(5 * MINUTE_MS), DataSource::Rollup1m),
        (Aggregation::Min, Some(MINUTE_MS), DataSource::Rollup1m),
        (Aggregation::P95, Some(HOUR_MS), DataSource::Raw),
        (Aggregation::Last, Some(HOUR_MS), DataSource::Raw),
        (Aggregation::Mean, Some(30_000), DataSource::Raw),
    ] {
        let result = run(aggregation, every).await;
        let what = format!("{kind:?} {aggregation} every {every:?}");
        assert_eq!(result.source, source, "{what}");
        check(
            &samples(&result, 0),
            &expected(&values, aggregation, every, start),
            &what,
        );
    }
    // A range not aligned to hours: minute rollups in the middle, raw at the edges, same answer.
    let (s2, e2) = (t0 + 61 * MINUTE_MS + 500, t0 + 3 * HOUR_MS + 7_001);
    let result = h
        .store
        .query(query(
            "acme",
            "boiler",
            &["temp"],
            s2,
            e2,
            agg(Aggregation::Mean, Some(10 * MINUTE_MS)),
        ))
        .await
        .unwrap();
    assert_eq!(result.source, DataSource::Rollup1m);
    let inside: Vec<_> = values
        .iter()
        .filter(|(t, _)| *t >= s2 && *t < e2)
        .cloned()
        .collect();
    check(
        &samples(&result, 0),
        &expected(&inside, Aggregation::Mean, Some(10 * MINUTE_MS), s2),
        "unaligned",
    );

    // A late point in a rolled-up hour: raw answers until the next pass, which folds it in.
    let late = t0 + HOUR_MS + 5;
    h.store
        .write(vec![point("acme", "boiler", "temp", late, num(1000.0))].into())
        .await
        .unwrap();
    values.push((late, num(1000.0)));
    values.sort_by_key(|(t, _)| *t);
    let result = run(Aggregation::Max, Some(HOUR_MS)).await;
    check(
        &samples(&result, 0),
        &expected(&values, Aggregation::Max, Some(HOUR_MS), start),
        "late, before pass",
    );
    h.store.maintain(Utc::now().timestamp_millis()).await.unwrap();
    let result = run(Aggregation::Max, Some(HOUR_MS)).await;
    assert_eq!(result.source, DataSource::Rollup1h);
    check(
        &samples(&result, 0),
        &expected(&values, Aggregation::Max, Some(HOUR_MS), start),
        "late, after pass",
    );
}

async fn retention_expires_raw_data(kind: Kind) {
    let Some(h) = open(kind).await else { return };
    let now = Utc::now().timestamp_millis();
    match h.kind {
        Kind::Sqlite => {
            // Points 29 days old: kept now, expired once the clock has moved two days on.
            let t0 = (now - 29 * DAY_MS).div_euclid(HOUR_MS) * HOUR_MS;
            let batch: Vec<_> = (0..120)
                .map(|i| point("acme", "old-1", "v", t0 + i * 30_000, num(i as f64)))
                .collect();
            h.store.write(batch.into()).await.unwrap();
            h.store
                .write(vec![point("acme", "old-1", "v", now - HOUR_MS, num(5.0))].into())
                .await
                .unwrap();
            let report = h.store.maintain(now).await.unwrap();
            assert_eq!(report.raw_points_deleted, 0, "{report:?}");
            let later = now + 2 * DAY_MS;
            let report = h.store.maintain(later).await.unwrap();
            assert_eq!(report.raw_points_deleted, 120, "{report:?}");
            let raw = h
                .store
                .query(query("acme", "old-1", &["v"], t0, now, None))
                .await
                .unwrap();
            assert_eq!(samples(&raw, 0), vec![(now - HOUR_MS, num(5.0))]);
            // The hourly rollup outlives the raw points it was computed from.
            let hourly = h
                .store
                .query(query(
                    "acme",
                    "old-1",
                    &["v"],
                    t0,
                    t0 + HOUR_MS,
                    agg(Aggregation::Sum, Some(HOUR_MS)),
                ))
                .await
                .unwrap();
            assert_eq!(hourly.source, DataSource::Rollup1h);
            assert_eq!(samples(&hourly, 0), vec![(t0, num((0..120).sum::<i64>() as f64))]);
            // Rollups expire with their own retention.
            let report = h.store.maintain(now + 800 * DAY_MS).await.unwrap();
            // 60 minute rows and an hour row of the old points, plus the recent point's rows.
            assert!(report.rollup_rows_deleted >= 63, "{report:?}");
        }
        Kind::Influx => {
            // InfluxDB enforces retention itself: the policies carry the configured durations,
            // and it refuses (for good) points older than the raw retention.
            let db = &h.influx.as_ref().unwrap().name;
            let url = &h.influx.as_ref().unwrap().url;
            let body: serde_json::Value = reqwest::Client::new()
                .get(format!("{url}/query"))
                .query(&[("q", format!("SHOW RETENTION POLICIES ON \"{db}\""))])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let rows = body["results"][0]["series"][0]["values"]
                .as_array()
                .unwrap()
                .clone();
            let policy = |name: &str| rows.iter().find(|r| r[0] == name).cloned().unwrap_or_default();
            assert_eq!(policy("drover_raw")[1], "720h0m0s");
            assert_eq!(policy("drover_raw")[4], true);
            assert_eq!(policy("drover_1m")[1], "2160h0m0s");
            assert_eq!(policy("drover_1h")[1], "17520h0m0s");
            let error = h
                .store
                .write(vec![point("acme", "old-1", "v", now - 31 * DAY_MS, num(1.0))].into())
                .await
                .unwrap_err();
            assert!(!error.is_retryable(), "{error}");
            assert!(error.to_string().contains("retention"), "{error}");
        }
    }
}

// ---- the spool ---------------------------------------------------------------------------

fn spool_batch(first_ts: i64, n: i64) -> PointBatch {
    (0..n)
        .map(|i| point("acme", "sensor-001", "temperature", first_ts + i, num(i as f64)))
        .collect::<Vec<_>>()
        .into()
}

/// A store that is unreachable for its first `failures` writes, then delegates.
struct FlakyStore {
    inner: Arc<dyn TelemetryStore>,
    failures: AtomicUsize,
}

#[async_trait]
impl TelemetryStore for FlakyStore {
    fn info(&self) -> StoreInfo {
        self.inner.info()
    }
    async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError> {
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(TelemetryStoreError::Unavailable("connection refused".into()));
        }
        self.inner.write(batch).await
    }
    async fn query(&self, query: TelemetryQuery) -> Result<QueryResult, TelemetryStoreError> {
        self.inner.query(query).await
    }
    async fn ping(&self) -> Result<(), TelemetryStoreError> {
        self.inner.ping().await
    }
    async fn maintain(&self, now_ms: i64) -> Result<MaintenanceReport, TelemetryStoreError> {
        self.inner.maintain(now_ms).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_replays_in_order_and_deletes_only_committed_batches() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FileSpool::open(dir.path().join("spool"), 64 * 1024 * 1024).unwrap();
    let t0 = past_hour(1);
    for i in 0..5 {
        spool.append(spool_batch(t0 + i * 1000, 100)).await.unwrap();
    }
    let depth = spool.depth();
    assert_eq!((depth.batches, depth.points), (5, 500));
    assert!(depth.bytes > 0);

    // Reopening (a restart) finds the same batches in the same order.
    drop(spool);
    let spool = FileSpool::open(dir.path().join("spool"), 64 * 1024 * 1024).unwrap();
    assert_eq!(spool.depth().batches, 5);
    assert_eq!(spool.oldest().await.unwrap().unwrap().points[0].ts_ms, t0);

    let Some(h) = open(Kind::Sqlite).await else { return };
    let store = FlakyStore {
        inner: h.store.clone(),
        failures: AtomicUsize::new(1),
    };
    // Store still down: nothing replayed, nothing lost.
    let report = replay_spool(&spool, &store, 100).await.unwrap();
    assert_eq!(report.batches, 0);
    assert!(report.stopped_by.unwrap().is_retryable());
    assert_eq!(spool.depth().batches, 5);
    // Back: everything, in order, then the spool is empty (and its files gone).
    let report = replay_spool(&spool, &store, 100).await.unwrap();
    assert_eq!((report.batches, report.points), (5, 500));
    assert_eq!(spool.depth(), Default::default());
    let files = std::fs::read_dir(dir.path().join("spool"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_file())
        .count();
    assert_eq!(files, 0);
    let stored = h
        .store
        .query(query(
            "acme",
            "sensor-001",
            &["temperature"],
            t0,
            t0 + HOUR_MS,
            agg(Aggregation::Count, None),
        ))
        .await
        .unwrap();
    assert_eq!(samples(&stored, 0), vec![(t0, num(500.0))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_survives_a_torn_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool");
    let spool = FileSpool::open(&path, 64 * 1024 * 1024).unwrap();
    for i in 0..3 {
        spool.append(spool_batch(i * 1000, 50)).await.unwrap();
    }
    drop(spool);
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // A kill -9 in the middle of a write: the last record is cut short...
    let last = &files[2];
    let len = std::fs::metadata(last).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(last).unwrap();
    file.set_len(len / 2).unwrap();
    // ...a write that never reached its final name is left in tmp/...
    std::fs::write(
        path.join("tmp").join("00000000000000000009.batch"),
        b"DRSP partial",
    )
    .unwrap();
    // ...and a bit flipped in the middle one is caught by its checksum.
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&files[1], bytes).unwrap();

    let spool = FileSpool::open(&path, 64 * 1024 * 1024).unwrap();
    assert_eq!(spool.depth().batches, 2, "the torn record is set aside at open");
    assert_eq!(spool.depth().set_aside, 1);
    assert_eq!(std::fs::read_dir(path.join("tmp")).unwrap().count(), 0);
    let first = spool.oldest().await.unwrap().unwrap();
    assert_eq!(first.points.len(), 50);
    assert_eq!(first.points[0].ts_ms, 0);
    spool.remove(first.id).await.unwrap();
    // The damaged one is skipped, not fatal.
    assert!(spool.oldest().await.unwrap().is_none());
    assert_eq!(spool.depth().set_aside, 2);
    assert_eq!(
        std::fs::read_dir(path.join("rejected")).unwrap().count(),
        4,
        "batches and reasons"
    );
    // New appends continue after the highest sequence number seen.
    spool.append(spool_batch(5000, 10)).await.unwrap();
    assert_eq!(spool.oldest().await.unwrap().unwrap().points[0].ts_ms, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FileSpool::open(dir.path().join("spool"), 20_000).unwrap();
    let mut appended = 0;
    let error = loop {
        match spool.append(spool_batch(appended * 100, 50)).await {
            Ok(()) => appended += 1,
            Err(error) => break error,
        }
        assert!(appended < 100, "the bound is never reached");
    };
    assert!(appended > 0);
    match &error {
        SpoolError::Full {
            bytes,
            max_bytes,
            needed,
        } => {
            assert_eq!(*max_bytes, 20_000);
            assert!(bytes + needed > 20_000);
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(error.to_string().contains("spool is full"), "{error}");
    assert!(spool.depth().bytes <= 20_000);
    // Draining makes room again.
    let oldest = spool.oldest().await.unwrap().unwrap();
    spool.remove(oldest.id).await.unwrap();
    spool.append(spool_batch(0, 50)).await.unwrap();
}
