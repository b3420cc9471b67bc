//! Ramps up device connections to Drover and measures how fast they are accepted and what
//! each costs the server in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet};
use serde_json::json;
use tokio::sync::Semaphore;

use super::fanout::options;
use super::report::{Report, latencies};
use crate::api::{Api, DeviceCredentials};

pub struct ConnectOptions {
    pub host: String,
    pub port: u16,
    /// Connection attempts started per second; 0: as fast as possible.
    pub rate: u32,
    /// Seconds to keep every connection open once all are up.
    pub hold: u64,
    /// Seconds after the hold over which the server's lowest RSS is taken (see [`settled_rss`]).
    pub settle: u64,
    pub concurrency: usize,
}

pub async fn run(api: &Api, devices: Vec<DeviceCredentials>, o: ConnectOptions) -> anyhow::Result<Report> {
    let rss_before = api.metric("process_resident_memory_bytes").await.ok();
    // Counted only when the server runs with HEAP_METRICS=1.
    let heap_before = api
        .metric("drover_heap_allocated_bytes")
        .await
        .ok()
        .filter(|&b| b > 0.0);
    let connected_before = api.metric("drover_mqtt_connections").await.unwrap_or(0.0);
    let limit = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let started = Instant::now();
    let mut attempts = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        if o.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / f64::from(o.rate));
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let permit = limit.clone().acquire_owned().await?;
        let mut options = options(&device.id, &o.host, o.port, Some(&device.id), Some(&device.token));
        options.set_keep_alive(Duration::from_secs(120));
        let (client, mut events) = AsyncClient::new(options, 8);
        attempts.push(tokio::spawn(async move {
            let begin = Instant::now();
            let outcome = loop {
                match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                        break (ack.code == ConnectReturnCode::Success).then(|| begin.elapsed());
                    }
                    Ok(Ok(_)) => continue,
                    _ => break None,
                }
            };
            drop(permit);
            if outcome.is_some() {
                // Keep the connection alive (PINGREQ) until the client is dropped.
                tokio::spawn(async move { while events.poll().await.is_ok() {} });
            }
            (client, outcome)
        }));
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut clients = Vec::new();
    let mut failed = 0u64;
    for attempt in attempts {
        let (client, outcome) = attempt.await?;
        match outcome {
            Some(latency) => {
                let _ = histogram.record(latency.as_micros() as u64);
                clients.push(client);
            }
            None => failed += 1,
        }
    }
    let ramp = started.elapsed();
    // Let the server account for them, then weigh it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut server_connections = 0.0;
    while Instant::now() < deadline {
        server_connections = api.metric("drover_mqtt_connections").await.unwrap_or(0.0);
        if server_connections - connected_before >= clients.len() as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(o.hold)).await;
    let rss_held = api.metric("process_resident_memory_bytes").await.ok();
    let rss_after = match rss_held {
        Some(held) => Some(settled_rss(api, held, Duration::from_secs(o.settle)).await),
        None => None,
    };
    let heap_after = api.metric("drover_heap_allocated_bytes").await.ok();
    let stats = api.get("/stats").await.ok();

    let mut report = Report::new(
        "connect",
        &format!("{}:{}", o.host, o.port),
        json!({"devices": devices.len(), "rate": o.rate, "concurrency": o.concurrency}),
    );
    report.set("connected", clients.len() as u64);
    report.set("failed", failed);
    report.set("ramp_seconds", ramp.as_secs_f64());
    report.set(
        "connects_per_second",
        clients.len() as f64 / ramp.as_secs_f64().max(1e-6),
    );
    report.set("server_connections", server_connections);
    if let Some(stats) = stats {
        report.set("stats_devices_connected", stats["devices"]["connected"].clone());
    }
    let per_connection_kib =
        |before: f64, after: f64| (after - before) / clients.len().max(1) as f64 / 1024.0;
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report.set("server_rss_mib", after / 1048576.0);
        report.set("server_rss_per_connection_kib", per_connection_kib(before, after));
    }
    if let (Some(before), Some(held)) = (rss_before, rss_held) {
        report.set("server_rss_held_mib", held / 1048576.0);
        report.set(
            "server_rss_held_per_connection_kib",
            per_connection_kib(before, held),
        );
    }
    if let (Some(before), Some(after)) = (heap_before, heap_after) {
        report.set(
            "server_heap_per_connection_kib",
            per_connection_kib(before, after),
        );
    }
    latencies(&mut report, "connack", &histogram);
    for client in &clients {
        let _ = client.disconnect().await;
    }
    Ok(report)
}

/// The server's lowest RSS over `limit` after the hold (`held`: the sample at its end), sampled
/// every second. The allocator returns the pages freed during the connect ramp (handshakes,
/// device loads, read buffers) some seconds after they were freed, when its threads next
/// allocate: read at once, the RSS still counts them (2.7 KiB per connection in one run with
/// 19,000 connections here: 412 MiB right after the ramp, 362 MiB 12 s later). Idle connections allocate nothing, so the lowest sample is what holding
/// them costs.
async fn settled_rss(api: &Api, held: f64, limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    let mut lowest = held;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match api.metric("process_resident_memory_bytes").await {
            Ok(now) => lowest = lowest.min(now),
            Err(_) => break,
        }
    }
    lowest
}
