//! Aggregated telemetry queries over a large stored series, through the query API: loads
//! `points` points into one device (over HTTP ingestion, in batches), then times each query
//! shape several times.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::report::Report;
use crate::api::{Api, DeviceCredentials};

pub struct QueryOptions {
    pub points: u64,
    /// Times each query runs.
    pub repeat: u32,
    /// Wait (up to this many seconds) for the rollups to cover the loaded range first.
    pub wait_rollups: u64,
}

const BATCH: u64 = 1000;
/// One point per second, ending a minute ago.
const STEP_MS: i64 = 1000;

pub async fn run(api: &Api, device: DeviceCredentials, o: QueryOptions) -> anyhow::Result<Report> {
    let end_ms = (chrono::Utc::now().timestamp_millis() - 60_000) / 1000 * 1000;
    let start_ms = end_ms - o.points as i64 * STEP_MS;
    let loaded = Instant::now();
    let client = reqwest::Client::new();
    let mut batch_start = 0u64;
    while batch_start < o.points {
        let messages: Vec<Value> = (batch_start..(batch_start + BATCH).min(o.points))
            .map(|i| {
                let t = start_ms + i as i64 * STEP_MS;
                json!({"timestamp": t, "metrics": {"value": (i % 1000) as f64 / 10.0}})
            })
            .collect();
        let response = client
            .post(format!("{}/api/devices/{}/telemetry", api.base(), device.id))
            .bearer_auth(&device.token)
            .json(&messages)
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        anyhow::ensure!(
            response.status().is_success(),
            "loading failed: {}",
            response.text().await?
        );
        batch_start += BATCH;
    }
    let load_seconds = loaded.elapsed().as_secs_f64();

    let range = format!("start={start_ms}&end={}", end_ms + 1);
    let id = &device.id;
    let shapes = [
        (
            "mean_per_hour",
            format!("/api/telemetry/{id}?metric=value&agg=mean&every=1h&{range}"),
        ),
        (
            "max_per_day",
            format!("/api/telemetry/{id}?metric=value&agg=max&every=1d&{range}"),
        ),
        (
            "count_whole_range",
            format!("/api/telemetry/{id}?metric=value&agg=count&{range}"),
        ),
        (
            "p95_per_hour",
            format!("/api/telemetry/{id}?metric=value&agg=p95&every=1h&{range}"),
        ),
        (
            "raw_last_10000",
            format!(
                "/api/telemetry/{id}?metric=value&start={}&end={}&limit=10000",
                end_ms - 10_000 * STEP_MS,
                end_ms + 1
            ),
        ),
    ];
    if o.wait_rollups > 0 {
        let deadline = Instant::now() + Duration::from_secs(o.wait_rollups);
        loop {
            let body = api.get(&shapes[0].1).await?;
            if body["source"] != "raw" || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let mut report = Report::new(
        "query",
        "drover",
        json!({"points": o.points, "repeat": o.repeat, "device": id}),
    );
    report.set("load_seconds", load_seconds);
    report.set("load_points_per_second", o.points as f64 / load_seconds);
    for (name, path) in shapes {
        let mut histogram = Histogram::<u64>::new(3)?;
        let mut source = Value::Null;
        let mut buckets = 0;
        for _ in 0..o.repeat.max(1) {
            let begin = Instant::now();
            let body = api.get(&path).await.with_context(|| format!("query {name}"))?;
            histogram.record((begin.elapsed().as_micros() as u64).max(1))?;
            source = body["source"].clone();
            buckets = body["series"][0]["points"].as_array().map_or(0, Vec::len);
        }
        report.set(
            &format!("{name}_p50_ms"),
            histogram.value_at_quantile(0.5) as f64 / 1000.0,
        );
        report.set(&format!("{name}_max_ms"), histogram.max() as f64 / 1000.0);
        report.set(&format!("{name}_source"), source);
        report.set(&format!("{name}_rows"), buckets);
    }
    Ok(report)
}
