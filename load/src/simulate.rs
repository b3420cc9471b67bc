//! A simulated fleet: every device connects over MQTT with its own credentials, publishes
//! realistic telemetry at its rate, applies the shadow changes it is sent (reporting them
//! back as its new state) and answers commands (`sim_commands`), until Ctrl-C or the given
//! duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rumqttc::{AsyncClient, Event, Packet};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::DeviceCredentials;
use crate::bench::fanout::{options, qos};
use crate::sensors::{SensorModel, message};

pub struct SimulateOptions {
    pub host: String,
    pub port: u16,
    /// Telemetry messages per second per device.
    pub rate: f64,
    pub qos: u8,
    pub duration: Option<Duration>,
    /// Probability per reading that a device develops a fault.
    pub fault_rate: f64,
    /// Connections started per second.
    pub connect_rate: u32,
    /// Connect over TLS, trusting this client configuration.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Devices speak MQTT 5 (commands answered with Correlation Data) instead of 3.1.1.
    pub mqtt5: bool,
    /// How devices take OTA jobs (README "Fleet operations").
    pub ota: Arc<crate::sim_ota::OtaFleet>,
}

/// A TLS client configuration that trusts the CA certificates in the PEM file `ca_file`.
pub fn tls_config(ca_file: &std::path::Path) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use anyhow::Context;
    let pem = std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.context("a certificate in the CA file")?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "no certificate in {}", ca_file.display());
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

#[derive(Default)]
pub struct Counters {
    pub connected: AtomicU64,
    pub sent: AtomicU64,
    pub shadow_updates: AtomicU64,
    pub errors: AtomicU64,
    /// PUBACKs received (QoS 1 telemetry and shadow reports): what the server stored.
    pub acked: AtomicU64,
    pub commands_answered: AtomicU64,
}

/// What a simulation did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub devices: usize,
    pub connected: u64,
    pub messages_sent: u64,
    /// Publishes the server acknowledged (QoS 1 and 2 only; each is stored).
    pub messages_acked: u64,
    pub shadow_updates_applied: u64,
    pub commands_answered: u64,
    pub errors: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
}

pub async fn run(
    devices: Vec<DeviceCredentials>,
    o: SimulateOptions,
    quiet: bool,
) -> anyhow::Result<Summary> {
    let qos = qos(o.qos)?;
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let total = devices.len();
    let mut tasks = Vec::with_capacity(total);
    let bars = (!quiet).then(|| {
        let multi = MultiProgress::new();
        let connecting = multi.add(ProgressBar::new(total as u64));
        connecting.set_style(
            ProgressStyle::with_template("connected {pos}/{len} {wide_bar} {per_sec}").expect("template"),
        );
        let rate = multi.add(ProgressBar::new_spinner());
        (multi, connecting, rate)
    });
    // Ctrl-C or the duration end the run.
    {
        let stop_tx = stop_tx.clone();
        let duration = o.duration;
        tokio::spawn(async move {
            match duration {
                Some(d) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            let _ = stop_tx.send(true);
        });
    }
    let interval = Duration::from_secs_f64(1.0 / o.rate.max(0.001));
    for (i, device) in devices.into_iter().enumerate() {
        if *stop_rx.borrow() {
            break;
        }
        if o.connect_rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / f64::from(o.connect_rate));
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let device_counters = counters.clone();
        if o.mqtt5 {
            let task = crate::sim_commands::run_device_v5(
                i,
                device,
                o.host.clone(),
                o.port,
                interval,
                o.fault_rate,
                counters.clone(),
                stop_rx.clone(),
            );
            tasks.push(tokio::spawn(task));
            continue;
        }
        let mut stop = stop_rx.clone();
        let (host, port, fault_rate, tls) = (o.host.clone(), o.port, o.fault_rate, o.tls.clone());
        let ota = crate::sim_ota::OtaDevice::new(&device.id, &device.token, o.ota.clone());
        tasks.push(tokio::spawn(async move {
            let counters = device_counters;
            let mut rng = StdRng::seed_from_u64(i as u64);
            let mut model = SensorModel::new(&mut rng, fault_rate);
            let mut mqtt_options = options(&device.id, &host, port, Some(&device.id), Some(&device.token));
            if let Some(tls) = &tls {
                mqtt_options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
            }
            let (client, mut events) = AsyncClient::new(mqtt_options, 64);
            let delta_topic = format!("devices/{}/shadow/update/delta", device.id);
            let telemetry_topic = format!("devices/{}/telemetry", device.id);
            let update_topic = format!("devices/{}/shadow/update", device.id);
            let _ = client.subscribe(delta_topic.as_str(), rumqttc::QoS::AtLeastOnce).await;
            let _ = client.subscribe(crate::sim_commands::command_filter(&device.id), rumqttc::QoS::AtLeastOnce).await;
            // Spread the first readings over one interval so the fleet does not publish in lockstep.
            let offset = interval.mul_f64(rand::Rng::gen_range(&mut rng, 0.0..1.0));
            let mut ticker = tokio::time::interval_at((Instant::now() + offset).into(), interval);
            let mut seen_online = false;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = ticker.tick() => {
                        let now = chrono::Utc::now().timestamp_millis();
                        let hours = started.elapsed().as_secs_f64() / 3600.0;
                        let body = message(now, model.reading(&mut rng, now, hours)).to_string();
                        match client.try_publish(telemetry_topic.as_str(), qos, false, body) {
                            Ok(()) => { counters.sent.fetch_add(1, Ordering::Relaxed); }
                            Err(_) => { counters.errors.fetch_add(1, Ordering::Relaxed); }
                        }
                    }
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            counters.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            ota.on_connected(&client).await;
                            if !seen_online {
                                seen_online = true;
                                counters.connected.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) if ota.handle(&client, &p.topic, &p.payload) => {}
                        Ok(Event::Incoming(Packet::Publish(p))) if p.topic == delta_topic => {
                            // Apply the desired change and report it back as the new state.
                            if let Ok(delta) = serde_json::from_slice::<Value>(&p.payload) {
                                let reported = json!({"state": {"reported": delta["state"].clone()}});
                                if client.try_publish(update_topic.as_str(), rumqttc::QoS::AtLeastOnce, false, reported.to_string()).is_ok() {
                                    counters.shadow_updates.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            if let Some((topic, reply)) = crate::sim_commands::answer_v311(&device.id, &p.topic, &p.payload)
                                && client.try_publish(topic, rumqttc::QoS::AtLeastOnce, false, reply).is_ok()
                            {
                                counters.commands_answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            // rumqttc reconnects on the next poll; do not spin.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                }
            }
            // The disconnect is queued behind the publishes not sent yet; their PUBACKs are
            // counted until it goes out.
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(event) = events.poll().await {
                    if let Event::Incoming(Packet::PubAck(_)) = event {
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        }));
        if let Some((_, connecting, _)) = &bars {
            connecting.set_position(counters.connected.load(Ordering::Relaxed));
        }
    }
    // Live figures until the end.
    let mut last = (Instant::now(), 0u64);
    let mut stopped = stop_rx.clone();
    while !*stopped.borrow() {
        tokio::select! {
            _ = stopped.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Some((_, connecting, rate)) = &bars {
            let sent = counters.sent.load(Ordering::Relaxed);
            let per_second = (sent - last.1) as f64 / last.0.elapsed().as_secs_f64();
            last = (Instant::now(), sent);
            connecting.set_position(counters.connected.load(Ordering::Relaxed));
            rate.set_message(format!(
                "sent {sent} messages ({per_second:.0}/s), shadow updates applied {}, errors {}",
                counters.shadow_updates.load(Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed)
            ));
            rate.tick();
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    if let Some((_, connecting, rate)) = bars {
        connecting.finish();
        rate.finish();
    }
    let seconds = started.elapsed().as_secs_f64();
    let sent = counters.sent.load(Ordering::Relaxed);
    Ok(Summary {
        devices: total,
        connected: counters.connected.load(Ordering::Relaxed),
        messages_sent: sent,
        messages_acked: counters.acked.load(Ordering::Relaxed),
        shadow_updates_applied: counters.shadow_updates.load(Ordering::Relaxed),
        commands_answered: counters.commands_answered.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        seconds,
        messages_per_second: sent as f64 / seconds.max(1e-6),
    })
}
