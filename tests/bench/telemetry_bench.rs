//! Measures the embedded telemetry store: write throughput (points/s) and aggregated queries
//! over 1,000,000 stored points of one series. A measurement, not a test:
//!
//! ```sh
//! cargo run --release --example telemetry_bench
//! ```

use std::sync::Arc;
use std::time::Instant;

use drover::telemetry::Retention;
use drover::telemetry::sqlite::{SqliteSettings, SqliteTelemetryStore};
use drover_actors::telemetry::query::{Aggregation, Bucketing, DAY_MS, HOUR_MS, TelemetryQuery};
use drover_actors::telemetry::store::TelemetryStore;
use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};

const POINTS: i64 = 1_000_000;
const BATCH: usize = 1000;

fn point(device: &DeviceId, tenant: &TenantId, metric: &MetricName, ts_ms: i64, v: f64) -> TelemetryPoint {
    TelemetryPoint {
        tenant: tenant.clone(),
        device: device.clone(),
        device_type: "bench".into(),
        metric: metric.clone(),
        ts_ms,
        value: MetricValue::Number(v),
    }
}

async fn write_all(store: &Arc<SqliteTelemetryStore>, points: Vec<TelemetryPoint>) -> f64 {
    let start = Instant::now();
    for chunk in points.chunks(BATCH) {
        store.write(chunk.to_vec().into()).await.expect("write");
    }
    points.len() as f64 / start.elapsed().as_secs_f64()
}

async fn timed_query(
    store: &Arc<SqliteTelemetryStore>,
    query: &TelemetryQuery,
) -> (f64, usize, &'static str) {
    let mut times = Vec::new();
    let mut out = (0, "");
    for _ in 0..5 {
        let start = Instant::now();
        let result = store.query(query.clone()).await.expect("query");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        out = (result.series[0].samples.len(), result.source.as_str());
    }
    times.sort_by(f64::total_cmp);
    (times[2], out.0, out.1)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        SqliteTelemetryStore::open(SqliteSettings {
            path: dir.path().join("telemetry.db"),
            retention: Retention {
                raw_ms: 30 * DAY_MS,
                rollup_1m_ms: 90 * DAY_MS,
                rollup_1h_ms: 730 * DAY_MS,
            },
            cache_mib: 64,
        })
        .expect("open"),
    );
    let tenant = TenantId::parse("bench").unwrap();
    let metric = MetricName::parse("temperature").unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let t0 = now - HOUR_MS - POINTS * 1000;

    // 1,000 devices reporting once a second, interleaved as a writer would batch them.
    let devices: Vec<DeviceId> = (0..1000)
        .map(|i| DeviceId::parse(format!("dev-{i}")).unwrap())
        .collect();
    let fleet: Vec<TelemetryPoint> = (0..POINTS)
        .map(|i| {
            let d = &devices[(i % 1000) as usize];
            point(
                d,
                &tenant,
                &metric,
                t0 + (i / 1000) * 1000,
                (i % 500) as f64 / 10.0,
            )
        })
        .collect();
    let rate = write_all(&store, fleet).await;
    println!("write, 1,000 devices interleaved, batches of {BATCH}: {rate:.0} points/s");

    // One device with 1,000,000 points (11.6 days at 1 Hz), the series the queries read.
    let one = DeviceId::parse("sensor-001").unwrap();
    let series: Vec<TelemetryPoint> = (0..POINTS)
        .map(|i| {
            point(
                &one,
                &tenant,
                &metric,
                t0 + i * 1000,
                ((i * 7919) % 1000) as f64 / 10.0,
            )
        })
        .collect();
    let rate = write_all(&store, series).await;
    println!("write, one series in time order, batches of {BATCH}: {rate:.0} points/s");

    let query = |aggregation: Option<Aggregation>, every_ms: Option<i64>, limit: usize| TelemetryQuery {
        tenant: tenant.clone(),
        device: one.clone(),
        metrics: vec![metric.clone()],
        start_ms: t0,
        end_ms: t0 + POINTS * 1000,
        bucketing: aggregation.map(|aggregation| Bucketing {
            aggregation,
            every_ms,
        }),
        limit,
    };
    for (label, q) in [
        (
            "mean every 1h, raw (before maintenance)",
            query(Some(Aggregation::Mean), Some(HOUR_MS), 10_000),
        ),
        (
            "mean, one bucket, raw",
            query(Some(Aggregation::Mean), None, 10_000),
        ),
        (
            "p95 every 1h, raw",
            query(Some(Aggregation::P95), Some(HOUR_MS), 10_000),
        ),
    ] {
        let (ms, n, source) = timed_query(&store, &q).await;
        println!("query over 1,000,000 points, {label}: {ms:.1} ms ({n} buckets, {source})");
    }

    let start = Instant::now();
    let report = store.maintain(now).await.expect("maintain");
    println!(
        "maintenance after loading 2,000,000 points: {:.0} ms ({} series, {} rollup rows)",
        start.elapsed().as_secs_f64() * 1e3,
        report.series_rolled_up,
        report.rollup_rows_written
    );
    let start = Instant::now();
    store.maintain(now + 60_000).await.expect("maintain");
    println!(
        "maintenance pass with nothing new (1,001 series): {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    for (label, q) in [
        (
            "mean every 1h, from rollups",
            query(Some(Aggregation::Mean), Some(HOUR_MS), 10_000),
        ),
        (
            "mean every 1m, from rollups",
            query(Some(Aggregation::Mean), Some(60_000), 20_000),
        ),
        (
            "max, one bucket, from rollups",
            query(Some(Aggregation::Max), None, 10_000),
        ),
    ] {
        let (ms, n, source) = timed_query(&store, &q).await;
        println!("query over 1,000,000 points, {label}: {ms:.1} ms ({n} buckets, {source})");
    }
    let (ms, n, _) = timed_query(
        &store,
        &TelemetryQuery {
            end_ms: t0 + 100_000 * 1000,
            ..query(None, None, 100_000)
        },
    )
    .await;
    println!("raw read of {n} points: {ms:.1} ms");
    let size = std::fs::metadata(dir.path().join("telemetry.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "database file: {:.1} MiB for 2,000,000 points and their rollups",
        size as f64 / 1048576.0
    );
}
