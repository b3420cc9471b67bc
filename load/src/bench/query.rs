//! Telemetry queries over a large stored series, through the query API: loads `points` points
//! into one device's metric (over HTTP ingestion, batches of 1,000 messages, several requests in
//! flight), waits for the rollups to cover it and for the server to finish analysing it, then
//! times each query shape `repeat` times (from sending the request to the last byte of the
//! answer; the client's own JSON parsing is not counted) and reports p50, p95 and max.
//!
//! The points are evenly spaced and end a minute ago; the spacing is 1 s, or less when that
//! would reach back more than 20 days (so the series stays inside the default 30-day raw
//! retention): 10,000,000 points are 100 ms apart, 11.6 days.
//!
//! Shapes: aggregates the rollups answer (`mean_per_hour`, `max_per_day`, `count_whole_range`),
//! percentiles, which read every raw point of the range (`p95_per_hour`, `p99_whole_range`), and
//! raw reads (`raw_last_10000`; `raw_export_100000`, the largest answer the default
//! `TELEMETRY_QUERY_MAX_POINTS` allows, as a user exporting a range would ask).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Loading requests in flight at once.
    pub load_concurrency: usize,
}

/// Messages per ingestion request (the server's default `TELEMETRY_MAX_BATCH_MESSAGES`).
const BATCH: u64 = 1000;
/// The longest range loaded: inside the default raw retention (30 days) with room to spare.
const MAX_RANGE_MS: i64 = 20 * 24 * 3600 * 1000;
/// The raw export's size: the default `TELEMETRY_QUERY_MAX_POINTS`.
const EXPORT_POINTS: i64 = 100_000;

/// Spacing of `points` points: 1 s, or the largest of 500, 200, 100, 50, 20, 10, 5, 2, 1 ms
/// that keeps them within [`MAX_RANGE_MS`].
pub fn step_ms(points: u64) -> i64 {
    [1000, 500, 200, 100, 50, 20, 10, 5, 2, 1]
        .into_iter()
        .find(|step| points as i64 * step <= MAX_RANGE_MS)
        .unwrap_or(1)
}

pub async fn run(api: &Api, device: DeviceCredentials, o: QueryOptions) -> anyhow::Result<Report> {
    let step = step_ms(o.points);
    let end_ms = (chrono::Utc::now().timestamp_millis() - 60_000) / 1000 * 1000;
    let start_ms = end_ms - o.points as i64 * step;
    let loaded = Instant::now();
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut loaders = tokio::task::JoinSet::new();
    for _ in 0..o.load_concurrency.max(1) {
        let (client, next, device) = (client.clone(), next.clone(), device.clone());
        let url = format!("{}/api/devices/{}/telemetry", api.base(), device.id);
        let points = o.points;
        loaders.spawn(async move {
            loop {
                let first = next.fetch_add(BATCH, Ordering::Relaxed);
                if first >= points {
                    return anyhow::Ok(());
                }
                let mut body = String::with_capacity(BATCH as usize * 64);
                body.push('[');
                for i in first..(first + BATCH).min(points) {
                    if i > first {
                        body.push(',');
                    }
                    let t = start_ms + i as i64 * step;
                    let v = (i % 1000) as f64 / 10.0;
                    body.push_str(&format!(r#"{{"timestamp":{t},"metrics":{{"value":{v:?}}}}}"#));
                }
                body.push(']');
                loop {
                    let response = client
                        .post(&url)
                        .bearer_auth(&device.token)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone())
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
                    break;
                }
            }
        });
    }
    while let Some(loader) = loaders.join_next().await {
        loader??;
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
            "p99_whole_range",
            format!("/api/telemetry/{id}?metric=value&agg=p99&{range}"),
        ),
        (
            "raw_last_10000",
            format!(
                "/api/telemetry/{id}?metric=value&start={}&end={}&limit=10000",
                end_ms - 10_000 * step,
                end_ms + 1
            ),
        ),
        (
            "raw_export_100000",
            format!(
                "/api/telemetry/{id}?metric=value&start={start_ms}&end={}&limit={EXPORT_POINTS}",
                start_ms + EXPORT_POINTS * step
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
    // Analysing the loaded points (anomaly scoring, training) keeps the server busy for a while
    // after the load: the queries are timed once that work has stopped.
    let settled = Instant::now();
    let settle_deadline = settled + Duration::from_secs(o.wait_rollups.max(10));
    let mut last = analytics_work(api).await;
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = analytics_work(api).await;
        if now == last {
            break;
        }
        last = now;
    }
    let settle_seconds = settled.elapsed().as_secs_f64();
    let mut report = Report::new(
        "query",
        "drover",
        json!({"points": o.points, "repeat": o.repeat, "device": id, "step_ms": step}),
    );
    report.set("load_seconds", load_seconds);
    report.set("load_points_per_second", o.points as f64 / load_seconds);
    report.set("settle_seconds", settle_seconds);
    for (name, path) in shapes {
        let mut histogram = Histogram::<u64>::new(3)?;
        let mut body = Value::Null;
        let mut bytes = 0;
        for _ in 0..o.repeat.max(1) {
            let begin = Instant::now();
            let response = client
                .get(format!("{}{path}", api.base()))
                .bearer_auth(api.key())
                .send()
                .await
                .with_context(|| format!("query {name}"))?;
            let status = response.status();
            let answer = response.bytes().await.with_context(|| format!("query {name}"))?;
            histogram.record((begin.elapsed().as_micros() as u64).max(1))?;
            anyhow::ensure!(
                status.is_success(),
                "query {name}: {status} {}",
                String::from_utf8_lossy(&answer)
            );
            bytes = answer.len();
            body = serde_json::from_slice(&answer).with_context(|| format!("query {name}"))?;
        }
        for (quantile, q) in [("p50", 0.5), ("p95", 0.95)] {
            report.set(
                &format!("{name}_{quantile}_ms"),
                histogram.value_at_quantile(q) as f64 / 1000.0,
            );
        }
        report.set(&format!("{name}_max_ms"), histogram.max() as f64 / 1000.0);
        report.set(&format!("{name}_source"), body["source"].clone());
        report.set(
            &format!("{name}_rows"),
            body["series"][0]["points"].as_array().map_or(0, Vec::len),
        );
        report.set(&format!("{name}_bytes"), bytes);
    }
    Ok(report)
}

/// The server's analytics counters (events analysed, time spent scoring and training): they stop
/// moving once the loaded points are analysed.
async fn analytics_work(api: &Api) -> Vec<u64> {
    let mut out = Vec::new();
    for name in [
        "drover_analytics_messages_total",
        "drover_analytics_scoring_microseconds_total",
        "drover_analytics_training_microseconds_total",
    ] {
        out.push(api.metric(name).await.unwrap_or(0.0) as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_keeps_the_range_inside_the_retention() {
        assert_eq!(step_ms(1_000_000), 1000);
        assert_eq!(step_ms(1_728_000), 1000);
        assert_eq!(step_ms(1_728_001), 500);
        assert_eq!(step_ms(10_000_000), 100);
        for points in [1, 20_000, 2_000_000, 10_000_000, 100_000_000, 10_000_000_000] {
            assert!(points as i64 * step_ms(points) <= MAX_RANGE_MS || step_ms(points) == 1);
        }
    }
}
