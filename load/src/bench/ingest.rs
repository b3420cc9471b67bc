//! Sustained telemetry from many devices over MQTT at QoS 0 or 1: accepted messages per
//! second, acknowledgement latency (QoS 1, where Drover acknowledges only after the commit),
//! and the number of messages read back from the store afterwards, so "accepted" is checked
//! against "stored". With `watch`, a dashboard session (`/ws`) subscribes to the first devices
//! and the time from each of their publishes to its live frame is measured too.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rumqttc::{Event, Outgoing, Packet};
use serde_json::json;
use tokio::sync::Mutex;

use super::fanout::{client, options, qos};
use super::report::{Report, latencies};
use crate::api::{Api, DeviceCredentials};

pub struct IngestOptions {
    pub host: String,
    pub port: u16,
    /// Ports of several cluster nodes: device `i` connects to `ports[i % len]` (empty: `port`).
    pub ports: Vec<u16>,
    pub qos: u8,
    /// Seconds of publishing.
    pub seconds: u64,
    /// Messages per second over all devices; 0: as fast as each client allows.
    pub rate: u32,
    /// Metrics per message.
    pub metrics: u32,
    /// Unacknowledged QoS 1 publishes a client may have in flight.
    pub inflight: u16,
    /// Devices (the first N) a dashboard session watches; 0: none.
    pub watch: u32,
}

/// When each watched device's messages were published, by sequence number.
type SentAt = Arc<Vec<std::sync::Mutex<HashMap<u64, Instant>>>>;

/// The dashboard side of the run: frames received, frames the server said it skipped, and
/// the publish-to-frame latencies in microseconds.
#[derive(Default)]
struct Dashboard {
    received: u64,
    missed: u64,
    latency: Option<Histogram<u64>>,
    /// When the late frames (over [`LATE_MS`]) and the skip notices arrived: per 100 ms window
    /// since the subscription, late frames, their worst latency in ms, frames skipped.
    late: std::collections::BTreeMap<u64, (u64, f64, u64)>,
}

/// Frames later than this are placed on the run's timeline ([`Dashboard::late`]).
const LATE_MS: f64 = 20.0;
/// Windows of the timeline reported (the first ones).
const LATE_WINDOWS: usize = 40;

/// The parts of a `/ws` frame the measurement reads.
#[derive(serde::Deserialize)]
struct LiveFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(rename = "deviceId", borrow, default)]
    device_id: Option<&'a str>,
    #[serde(default)]
    messages: Vec<LiveReading>,
    #[serde(default)]
    missed: Option<u64>,
}

#[derive(serde::Deserialize)]
struct LiveReading {
    metrics: LiveMetrics,
}

#[derive(serde::Deserialize)]
struct LiveMetrics {
    #[serde(default)]
    seq: Option<f64>,
}

/// Opens a dashboard session watching `devices` and measures each telemetry frame against the
/// time its message was published.
async fn watch_dashboard(
    api: &Api,
    devices: Vec<String>,
    sent_at: SentAt,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<tokio::task::JoinHandle<Dashboard>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let index: HashMap<String, usize> = devices.iter().cloned().enumerate().map(|(i, d)| (d, i)).collect();
    let (mut socket, _) =
        tokio_tungstenite::connect_async(crate::monitor::stream_url(api.base(), api.key())).await?;
    socket
        .send(Message::text(
            json!({"type": "subscribe", "devices": devices}).to_string(),
        ))
        .await?;
    // Up to the answer to the subscription (the hello comes first).
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text)?;
                match frame["type"].as_str() {
                    Some("subscribed") => break,
                    Some("error") => anyhow::bail!("the dashboard refused the subscription: {frame}"),
                    _ => {}
                }
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("the dashboard stream ended: {other:?}"),
        }
    }
    Ok(tokio::spawn(async move {
        let mut dashboard = Dashboard {
            latency: Histogram::new(3).ok(),
            ..Dashboard::default()
        };
        let subscribed = Instant::now();
        let window = |at: Instant| at.duration_since(subscribed).as_millis() as u64 / 100;
        loop {
            let message = tokio::select! {
                message = socket.next() => message,
                _ = &mut stop => break,
            };
            let Some(Ok(message)) = message else { break };
            let Message::Text(text) = message else { continue };
            let arrived = Instant::now();
            // Only the fields measured are read (a generic JSON value per frame would cost the
            // generator more than the server spends on it).
            let Ok(frame) = serde_json::from_str::<LiveFrame<'_>>(&text) else {
                continue;
            };
            match frame.kind {
                "telemetry" => {
                    let Some(&device) = frame.device_id.and_then(|d| index.get(d)) else {
                        continue;
                    };
                    for reading in frame.messages {
                        // Numbers arrive as JSON floats (Drover stores metrics as f64).
                        let Some(seq) = reading.metrics.seq.map(|v| v as u64) else {
                            continue;
                        };
                        let published = sent_at[device].lock().ok().and_then(|mut m| m.remove(&seq));
                        if let (Some(published), Some(histogram)) = (published, dashboard.latency.as_mut()) {
                            dashboard.received += 1;
                            let took = arrived.duration_since(published);
                            let _ = histogram.record((took.as_micros() as u64).max(1));
                            let ms = took.as_secs_f64() * 1000.0;
                            if ms > LATE_MS {
                                let slot = dashboard.late.entry(window(arrived)).or_default();
                                slot.0 += 1;
                                slot.1 = slot.1.max(ms);
                            }
                        }
                    }
                }
                "lagged" => {
                    let missed = frame.missed.unwrap_or(0);
                    dashboard.missed += missed;
                    dashboard.late.entry(window(arrived)).or_default().2 += missed;
                }
                _ => {}
            }
        }
        dashboard
    }))
}

/// What the publishing part of a run measured.
struct Published {
    sent: u64,
    acked: u64,
    published_for: Duration,
    /// CPU seconds this process used while publishing (all its threads).
    cpu_seconds: Option<f64>,
    acked_for: Duration,
    ack_latency: Histogram<u64>,
    /// Each device's id with its acknowledgement task (stopped once read back).
    devices: Vec<(String, tokio::task::JoinHandle<()>)>,
}

/// Publishes the telemetry load from `devices` (`(client id, credentials)`) until
/// `o.seconds` have passed, then waits for the last acknowledgements (QoS 1) and disconnects.
/// `sent_at` records the publish time of the first devices' messages for the dashboard.
async fn publish(
    devices: Vec<(String, Option<String>)>,
    o: &IngestOptions,
    sent_at: SentAt,
) -> anyhow::Result<Published> {
    let qos_level = qos(o.qos)?;
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let started = Instant::now();
    let cpu_at_start = super::report::process_cpu_seconds();
    let until = started + Duration::from_secs(o.seconds);
    let per_device_rate = (o.rate > 0).then(|| f64::from(o.rate) / devices.len().max(1) as f64);
    let mut tasks = Vec::new();
    for (index, (id, password)) in devices.into_iter().enumerate() {
        let port = if o.ports.is_empty() {
            o.port
        } else {
            o.ports[index % o.ports.len()]
        };
        let mut opts = options(
            &id,
            &o.host,
            port,
            password.as_ref().map(|_| id.as_str()),
            password.as_deref(),
        );
        opts.set_inflight(o.inflight.max(1));
        let (client, mut events) = client(opts, 256);
        let (sent, acked, histogram) = (sent.clone(), acked.clone(), histogram.clone());
        // Acknowledgements: the time from the publish leaving the client to its PUBACK.
        let acks = tokio::spawn(async move {
            let mut in_flight: HashMap<u16, Instant> = HashMap::new();
            let mut local = Histogram::<u64>::new(3).expect("histogram");
            while let Ok(event) = events.poll().await {
                match event {
                    Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                        in_flight.insert(pkid, Instant::now());
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        if let Some(at) = in_flight.remove(&ack.pkid) {
                            let _ = local.record((at.elapsed().as_micros() as u64).max(1));
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {}
                }
            }
            let _ = histogram.lock().await.add(&local);
        });
        let metrics = o.metrics.max(1);
        let sent_at = sent_at.clone();
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/{id}/telemetry");
            let interval = per_device_rate.map(|r| Duration::from_secs_f64(1.0 / r));
            // Spread the devices' first publishes over one interval.
            let begin =
                Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 % 97.0 / 97.0));
            let mut seq: u64 = 0;
            while Instant::now() < until {
                if let Some(interval) = interval {
                    let due = begin + interval.mul_f64(seq as f64);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                let mut values = serde_json::Map::new();
                values.insert("seq".into(), json!(seq));
                for m in 1..metrics {
                    values.insert(format!("m{m}"), json!(20.0 + (seq % 100) as f64 / 10.0));
                }
                let payload = json!({"metrics": values}).to_string();
                if let Some(times) = sent_at.get(index)
                    && let Ok(mut times) = times.lock()
                {
                    times.insert(seq, Instant::now());
                }
                if client
                    .publish(topic.as_str(), qos_level, false, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            (client, acks, id)
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await?);
    }
    let published_for = started.elapsed();
    let cpu_seconds = super::report::process_cpu_seconds()
        .zip(cpu_at_start)
        .map(|(end, start)| end - start);
    // Let the last acknowledgements arrive (QoS 1).
    let sent_total = sent.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while o.qos > 0 && acked.load(Ordering::Relaxed) < sent_total && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let acked_for = started.elapsed();
    for (client, _, _) in &clients {
        let _ = client.disconnect().await;
    }
    let devices = clients.into_iter().map(|(_, acks, id)| (id, acks)).collect();
    // The acknowledgement tasks end with their connections and merge their histograms; the
    // last batches are written and the last live frames arrive meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ack_latency = histogram.lock().await.clone();
    Ok(Published {
        sent: sent_total,
        acked: acked.load(Ordering::Relaxed),
        published_for,
        cpu_seconds,
        acked_for,
        ack_latency,
        devices,
    })
}

impl Published {
    fn report(&self, report: &mut Report, qos: u8) {
        report.set("sent", self.sent);
        report.set(
            "sent_per_second",
            self.sent as f64 / self.published_for.as_secs_f64(),
        );
        // How busy the generator itself was: near `generator_cores` it was the bottleneck, and
        // the latencies it measured include its own queueing.
        if let Some(cpu) = self.cpu_seconds {
            report.set("generator_cpu_cores", cpu / self.published_for.as_secs_f64());
            report.set(
                "generator_cores",
                std::thread::available_parallelism().map_or(1, |n| n.get()) as u64,
            );
        }
        if qos > 0 {
            report.set("acked", self.acked);
            report.set(
                "acked_per_second",
                self.acked as f64 / self.acked_for.as_secs_f64(),
            );
            latencies(report, "ack_latency", &self.ack_latency);
        }
    }
}

/// The same load against any MQTT broker (Mosquitto): the reference for Drover's figures,
/// acknowledged without storing anything. Client ids are `<prefix><n>`, no credentials.
pub async fn run_broker(
    target: &str,
    devices: u32,
    prefix: &str,
    o: IngestOptions,
) -> anyhow::Result<Report> {
    let ids = (0..devices).map(|n| (format!("{prefix}{n:05}"), None)).collect();
    let published = publish(ids, &o, Arc::new(Vec::new())).await?;
    for (_, acks) in &published.devices {
        acks.abort();
    }
    let mut report = Report::new(
        "ingest",
        target,
        json!({"qos": o.qos, "devices": devices, "seconds": o.seconds, "rate": o.rate, "metrics_per_message": o.metrics.max(1), "inflight": o.inflight, "watch": 0}),
    );
    published.report(&mut report, o.qos);
    Ok(report)
}

pub async fn run(api: &Api, devices: Vec<DeviceCredentials>, o: IngestOptions) -> anyhow::Result<Report> {
    let start_ms = chrono::Utc::now().timestamp_millis();
    let watched = (o.watch as usize).min(devices.len());
    let sent_at: SentAt = Arc::new((0..watched).map(|_| std::sync::Mutex::default()).collect());
    let (stop_dashboard, stopped) = tokio::sync::oneshot::channel();
    let dashboard = if watched > 0 {
        let ids = devices[..watched].iter().map(|d| d.id.clone()).collect();
        Some(watch_dashboard(api, ids, sent_at.clone(), stopped).await?)
    } else {
        None
    };
    let ids = devices
        .iter()
        .map(|d| (d.id.clone(), Some(d.token.clone())))
        .collect();
    let published = publish(ids, &o, sent_at.clone()).await?;
    let _ = stop_dashboard.send(());
    let dashboard = match dashboard {
        Some(task) => Some(task.await?),
        None => None,
    };

    // Read back: how many messages of each device the store holds.
    // Messages carry no timestamp: the server stamps each device's messages with distinct,
    // increasing milliseconds, which run ahead of the clock for a device sending more than
    // 1,000 a second. Read far enough ahead to count them all.
    let end_ms = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let mut stored = 0u64;
    for (id, acks) in &published.devices {
        acks.abort();
        let body = api
            .get(&format!(
                "/api/telemetry/{id}?metric=seq&agg=count&start={}&end={end_ms}",
                start_ms - 1000
            ))
            .await?;
        stored += body["series"][0]["points"]
            .as_array()
            .map(|points| points.iter().filter_map(|p| p["v"].as_f64()).sum::<f64>() as u64)
            .unwrap_or(0);
    }

    let mut report = Report::new(
        "ingest",
        "drover",
        json!({"qos": o.qos, "devices": devices.len(), "seconds": o.seconds, "rate": o.rate, "metrics_per_message": o.metrics.max(1), "inflight": o.inflight, "watch": o.watch, "nodes": o.ports.len().max(1)}),
    );
    published.report(&mut report, o.qos);
    if let Some(dashboard) = dashboard {
        // Messages of the watched devices that were sent: the dashboard should show each.
        let expected: usize = sent_at
            .iter()
            .map(|m| m.lock().map(|m| m.len()).unwrap_or(0))
            .sum::<usize>()
            + dashboard.received as usize;
        report.set("dashboard_devices", watched as u64);
        report.set("dashboard_expected", expected as u64);
        report.set("dashboard_received", dashboard.received);
        report.set("dashboard_missed", dashboard.missed);
        if let Some(histogram) = &dashboard.latency {
            latencies(&mut report, "dashboard_latency", histogram);
        }
        // [ms since the subscription, frames over LATE_MS, worst ms, frames skipped]: when a
        // run's tail happened, to set beside the server's own timeline.
        let timeline: Vec<serde_json::Value> = dashboard
            .late
            .iter()
            .take(LATE_WINDOWS)
            .map(|(w, (late, worst, skipped))| json!([w * 100, late, (worst * 10.0).round() / 10.0, skipped]))
            .collect();
        report.set("dashboard_late_windows", serde_json::Value::Array(timeline));
    }
    report.set("stored", stored);
    report.set("stored_ratio", stored as f64 / published.sent.max(1) as f64);
    report.set(
        "points_per_second",
        (stored * u64::from(o.metrics.max(1))) as f64 / published.acked_for.as_secs_f64(),
    );
    Ok(report)
}
