//! Publish-to-subscriber throughput and latency through any MQTT broker, so the same run
//! measures Drover and a reference such as Mosquitto.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::Mutex;

use super::report::{Report, latencies};

#[derive(Debug, Clone)]
pub struct FanoutOptions {
    pub target: String,
    pub host: String,
    pub port: u16,
    /// Where the publishers connect (`None`: `port`, like the subscribers).
    pub publish_port: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub qos: u8,
    pub publishers: u32,
    pub subscribers: u32,
    /// Messages per publisher.
    pub messages: u32,
    pub payload: usize,
    /// Messages per second per publisher; 0 publishes as fast as the client allows.
    pub rate: u32,
    /// The broker's slow-subscriber policy (Drover's `MQTT_SLOW_SUBSCRIBER`), when known: with
    /// `drop`, QoS 1 messages a subscriber cannot keep up with are lost (`delivered_ratio`
    /// below 1); with `backpressure`, publishers are slowed instead (`published_per_second`).
    pub slow_subscriber: Option<String>,
}

pub fn qos(level: u8) -> anyhow::Result<QoS> {
    Ok(match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        other => bail!("QoS must be 0, 1 or 2, not {other}"),
    })
}

/// A client and its event loop, with Nagle's algorithm off as latency-minded MQTT clients
/// run (small publishes would otherwise wait for the previous segment's acknowledgement,
/// up to the peer's 40 ms delayed ACK).
pub fn client(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut events) = AsyncClient::new(options, capacity);
    let mut network = events.network_options();
    network.set_tcp_nodelay(true);
    events.set_network_options(network);
    (client, events)
}

pub fn options(
    id: &str,
    host: &str,
    port: u16,
    username: Option<&str>,
    password: Option<&str>,
) -> MqttOptions {
    let mut options = MqttOptions::new(id, host, port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_max_packet_size(1 << 20, 1 << 20);
    options.set_inflight(100);
    if let (Some(user), Some(pass)) = (username, password) {
        options.set_credentials(user, pass);
    }
    options
}

pub async fn run(o: FanoutOptions) -> anyhow::Result<Report> {
    let qos = qos(o.qos)?;
    let origin = Instant::now();
    let expected = u64::from(o.publishers) * u64::from(o.messages) * u64::from(o.subscribers);
    let received = Arc::new(AtomicU64::new(0));
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let last_receipt = Arc::new(std::sync::Mutex::new(origin));
    let run_id = std::process::id();

    // Subscribers first, each acknowledged before anything is published.
    let mut subscribed = Vec::new();
    for s in 0..o.subscribers {
        let (client, mut events) = client(
            options(
                &format!("bench-sub-{run_id}-{s}"),
                &o.host,
                o.port,
                o.username.as_deref(),
                o.password.as_deref(),
            ),
            1024,
        );
        client.subscribe("bench/#", qos).await?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (received, histogram, last_receipt) = (received.clone(), histogram.clone(), last_receipt.clone());
        tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut local = Histogram::<u64>::new(3).expect("histogram");
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        if p.payload.len() >= 8 {
                            let sent = u64::from_be_bytes(p.payload[..8].try_into().expect("8 bytes"));
                            let latency = (now - origin).as_micros() as u64;
                            let _ = local.record(latency.saturating_sub(sent).max(1));
                        }
                        *last_receipt.lock().expect("lock") = now;
                        if received.fetch_add(1, Ordering::Relaxed) % 1000 == 999 {
                            histogram.lock().await.add(&local).expect("same bounds");
                            local.reset();
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = histogram.lock().await.add(&local);
        });
        subscribed.push((client, ready_rx));
    }
    let mut subscribers = Vec::new();
    for (client, ready) in subscribed {
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("no SUBACK")?
            .context("subscriber ended")?;
        subscribers.push(client);
    }

    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..o.publishers {
        let (client, mut events) = client(
            options(
                &format!("bench-pub-{run_id}-{p}"),
                &o.host,
                o.publish_port.unwrap_or(o.port),
                o.username.as_deref(),
                o.password.as_deref(),
            ),
            1024,
        );
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        let o = o.clone();
        publishers.push(tokio::spawn(async move {
            let topic = format!("bench/{p}");
            let interval = (o.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(o.rate)));
            let begin = Instant::now();
            for seq in 0..o.messages {
                if let Some(interval) = interval {
                    let due = begin + interval * seq;
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                let mut payload = vec![0u8; o.payload.max(16)];
                payload[..8].copy_from_slice(&((Instant::now() - origin).as_micros() as u64).to_be_bytes());
                payload[8..16].copy_from_slice(&u64::from(seq).to_be_bytes());
                client.publish(topic.as_str(), qos, false, payload).await?;
            }
            anyhow::Ok(client)
        }));
    }
    let mut publisher_clients = Vec::new();
    for p in publishers {
        publisher_clients.push(p.await??);
    }
    let published_in = started.elapsed();

    // Wait until every message arrived, or nothing arrived for a while.
    let mut last_count = 0;
    let mut idle_since = Instant::now();
    loop {
        let now_count = received.load(Ordering::Relaxed);
        if now_count >= expected {
            break;
        }
        if now_count != last_count {
            last_count = now_count;
            idle_since = Instant::now();
        } else if idle_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = received.load(Ordering::Relaxed);
    let elapsed = (*last_receipt.lock().expect("lock"))
        .saturating_duration_since(started)
        .max(Duration::from_micros(1));
    for c in subscribers.iter().chain(publisher_clients.iter()) {
        let _ = c.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut report = Report::new(
        "fanout",
        &o.target,
        json!({"qos": o.qos, "publishers": o.publishers, "subscribers": o.subscribers, "messages_per_publisher": o.messages, "payload_bytes": o.payload.max(16), "rate_per_publisher": o.rate, "slow_subscriber": o.slow_subscriber, "cross_node": o.publish_port.is_some_and(|p| p != o.port)}),
    );
    report.set("expected", expected);
    report.set("delivered", delivered);
    report.set("delivered_ratio", delivered as f64 / expected.max(1) as f64);
    report.set("seconds", elapsed.as_secs_f64());
    report.set("delivered_per_second", delivered as f64 / elapsed.as_secs_f64());
    report.set(
        "published_per_second",
        f64::from(o.publishers * o.messages) / published_in.as_secs_f64().max(1e-6),
    );
    latencies(&mut report, "latency", &*histogram.lock().await);
    Ok(report)
}
