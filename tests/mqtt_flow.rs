//! The broker's outbound flow: topic aliases sent to MQTT 5 clients that accept them, and what
//! happens to QoS 1 messages for a subscriber slower than its publisher under each
//! `MQTT_SLOW_SUBSCRIBER` policy. Raw sockets show what is on the wire; rumqttc (a client
//! nobody here wrote) shows that real clients are served correctly.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Backend, TestServer, eventually};
use drover::config::SlowSubscriber;

const WAIT: Duration = Duration::from_secs(10);

/// A server with an operator API key for the `app` login.
async fn start(tweak: impl FnOnce(&mut drover::config::Config)) -> (TestServer, String) {
    let server = TestServer::start_with(Backend::Sqlite, tweak).unwrap();
    let admin = server.admin_token().await;
    let key = server.api_key(&admin, "operator").await;
    (server, key)
}

// ---- raw MQTT packets -----------------------------------------------------------------------

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn var_int(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(var_int(body.len()));
    p.extend(body);
    p
}

/// A CONNECT (clean start, no keep-alive) logging in as `app`; MQTT 5 with
/// `topic_alias_max` (absent when `None`), or MQTT 3.1.1.
fn connect(client_id: &str, key: &str, v5_topic_alias_max: Option<Option<u16>>) -> Vec<u8> {
    let mut body = string("MQTT");
    body.push(if v5_topic_alias_max.is_some() { 5 } else { 4 });
    body.push(0b1100_0010);
    body.extend_from_slice(&0u16.to_be_bytes());
    if let Some(max) = v5_topic_alias_max {
        let props = match max {
            Some(max) => {
                let mut p = vec![0x22];
                p.extend_from_slice(&max.to_be_bytes());
                p
            }
            None => Vec::new(),
        };
        body.extend(var_int(props.len()));
        body.extend(props);
    }
    body.extend(string(client_id));
    body.extend(string("app"));
    body.extend(string(key));
    packet(0x10, body)
}

fn subscribe(filter: &str, qos: u8, v5: bool) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    if v5 {
        body.push(0); // no properties
    }
    body.extend(string(filter));
    body.push(qos);
    packet(0x82, body)
}

/// Reads one packet: its first byte and its body.
fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).expect("a packet");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        len |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (first[0], body)
}

/// Connects and subscribes `filter` at QoS 0; returns once the SUBACK is read.
fn raw_subscriber(
    server: &TestServer,
    key: &str,
    id: &str,
    filter: &str,
    v5: Option<Option<u16>>,
) -> TcpStream {
    let mut stream = TcpStream::connect(server.mqtt).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(&connect(id, key, v5)).unwrap();
    let (kind, connack) = read_packet(&mut stream);
    assert_eq!((kind, connack[1]), (0x20, 0), "connected: {connack:?}");
    stream.write_all(&subscribe(filter, 0, v5.is_some())).unwrap();
    let (kind, suback) = read_packet(&mut stream);
    assert_eq!(kind, 0x90, "{suback:?}");
    stream
}

/// A QoS 0 MQTT 5 PUBLISH as received: its topic as written (empty when only the alias names
/// it), its Topic Alias property and its payload.
#[derive(Debug, PartialEq)]
struct WirePublish {
    topic: String,
    alias: Option<u16>,
    payload: String,
}

fn read_v5_publish(stream: &mut TcpStream) -> WirePublish {
    let (kind, body) = read_packet(stream);
    assert_eq!(kind & 0xf0, 0x30, "a PUBLISH");
    assert_eq!(kind & 0x06, 0, "QoS 0");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + topic_len].to_vec()).unwrap();
    let mut at = 2 + topic_len;
    let (mut props_len, mut shift) = (0usize, 0);
    loop {
        let byte = body[at];
        at += 1;
        props_len |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let props = &body[at..at + props_len];
    let mut alias = None;
    let mut i = 0;
    while i < props.len() {
        match props[i] {
            0x23 => {
                alias = Some(u16::from_be_bytes([props[i + 1], props[i + 2]]));
                i += 3;
            }
            other => panic!("unexpected property {other:#x} in {props:?}"),
        }
    }
    WirePublish {
        topic,
        alias,
        payload: String::from_utf8(body[at + props_len..].to_vec()).unwrap(),
    }
}

// ---- rumqttc clients ------------------------------------------------------------------------

/// A QoS 1 publisher; the returned receiver gets one `()` per PUBACK.
fn publisher(
    server: &TestServer,
    key: &str,
    id: &str,
) -> (rumqttc::AsyncClient, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", server.mqtt.port());
    options.set_credentials("app", key);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
                let _ = tx.send(());
            }
        }
    });
    (client, rx)
}

/// A QoS 1 subscriber slower than a fast publisher: it acknowledges every message, about one
/// per millisecond. The receiver gets each payload, in the order received.
async fn slow_subscriber(
    server: &TestServer,
    key: &str,
    filter: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let mut options = rumqttc::MqttOptions::new("slow-reader", "127.0.0.1", server.mqtt.port());
    options.set_credentials("app", key);
    options.set_manual_acks(true);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    let (incoming_tx, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(event) = events.poll().await {
            match event {
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let _ = incoming_tx.send(p);
                }
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                _ => {}
            }
        }
    });
    let (payloads_tx, payloads) = tokio::sync::mpsc::unbounded_channel();
    let acks = client.clone();
    tokio::spawn(async move {
        while let Some(publish) = incoming.recv().await {
            // The deliberate slowness this test is about, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = payloads_tx.send(String::from_utf8_lossy(&publish.payload).to_string());
            if acks.ack(&publish).await.is_err() {
                return;
            }
        }
    });
    client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, subscribed)
        .await
        .expect("subscribed")
        .unwrap();
    payloads
}

fn payload(i: usize) -> String {
    format!("{i:06}-{}", "x".repeat(90))
}

/// Publishes `count` QoS 1 messages as fast as the client goes and waits for every PUBACK.
async fn publish_all(
    client: &rumqttc::AsyncClient,
    acks: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    topic: &str,
    count: usize,
) {
    let sender = client.clone();
    let topic = topic.to_string();
    tokio::spawn(async move {
        for i in 0..count {
            sender
                .publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, payload(i))
                .await
                .unwrap();
        }
    });
    for n in 0..count {
        tokio::time::timeout(Duration::from_secs(60), acks.recv())
            .await
            .unwrap_or_else(|_| panic!("{n} of {count} acknowledged"));
    }
}

async fn metric(server: &TestServer, series: &str) -> u64 {
    server.metric(series).await as u64
}

const QUEUE_FULL: &str = r#"drover_mqtt_messages_dropped_total{reason="queue_full"}"#;
const SENT_QOS1: &str = r#"drover_mqtt_messages_sent_total{qos="1"}"#;
const SLOW_DISCONNECTS: &str = "drover_mqtt_slow_subscriber_disconnects_total";

// ---- topic aliases --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_clients_that_accept_topic_aliases_get_them() {
    let (server, key) = start(|_| {}).await;
    let mut aliased = raw_subscriber(&server, &key, "aliased", "alias/#", Some(Some(5)));
    let mut plain = raw_subscriber(&server, &key, "plain", "alias/#", Some(None));
    let mut zero = raw_subscriber(&server, &key, "zero", "alias/#", Some(Some(0)));

    // rumqttc announces a maximum too. It checks the aliases it is sent (an unknown one is a
    // protocol error that ends its connection) but reports each packet as sent.
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let mut options = rumqttc::v5::MqttOptions::new("rumqttc-5", "127.0.0.1", server.mqtt.port());
    options.set_credentials("app", key.clone());
    options.set_topic_alias_max(Some(10));
    let (client5, mut events5) = rumqttc::v5::AsyncClient::new(options, 16);
    let (tx5, mut rx5) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events5.poll().await {
            let _ = tx5.send(event);
        }
    });
    client5
        .subscribe("alias/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, rx5.recv()).await {
            Ok(Some(rumqttc::v5::Event::Incoming(Packet5::SubAck(_)))) => break,
            Ok(Some(_)) => continue,
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    let (client, mut acks) = publisher(&server, &key, "alias-publisher");
    let sent = ["alias/a", "alias/a", "alias/b", "alias/a", "alias/b"];
    for (i, topic) in sent.iter().enumerate() {
        client
            .publish(*topic, rumqttc::QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
        tokio::time::timeout(WAIT, acks.recv()).await.unwrap();
    }

    let wire = |topic: &str, alias: Option<u16>, i: usize| WirePublish {
        topic: topic.to_string(),
        alias,
        payload: format!("m{i}"),
    };
    // The first time a topic comes with its alias, afterwards by alias only.
    let got: Vec<WirePublish> = (0..sent.len()).map(|_| read_v5_publish(&mut aliased)).collect();
    assert_eq!(
        got,
        [
            wire("alias/a", Some(1), 0),
            wire("", Some(1), 1),
            wire("alias/b", Some(2), 2),
            wire("", Some(1), 3),
            wire("", Some(2), 4),
        ]
    );
    // A client that allows none (absent or 0) never gets one.
    for stream in [&mut plain, &mut zero] {
        let got: Vec<WirePublish> = (0..sent.len()).map(|_| read_v5_publish(stream)).collect();
        let expected: Vec<WirePublish> = sent
            .iter()
            .enumerate()
            .map(|(i, topic)| wire(topic, None, i))
            .collect();
        assert_eq!(got, expected);
    }
    let mut known = std::collections::HashMap::new();
    let mut received = Vec::new();
    while received.len() < sent.len() {
        match tokio::time::timeout(WAIT, rx5.recv()).await {
            Ok(Some(rumqttc::v5::Event::Incoming(Packet5::Publish(p)))) => {
                let topic = String::from_utf8_lossy(&p.topic).to_string();
                let alias = p.properties.and_then(|props| props.topic_alias);
                let resolved = match alias {
                    Some(a) if topic.is_empty() => known.get(&a).cloned().expect("a known alias"),
                    Some(a) => {
                        known.insert(a, topic.clone());
                        topic
                    }
                    None => topic,
                };
                received.push((resolved, alias.is_some()));
            }
            Ok(Some(_)) => continue,
            other => panic!("rumqttc got {received:?}, then {other:?}"),
        }
    }
    let expected: Vec<(String, bool)> = sent.iter().map(|t| (t.to_string(), true)).collect();
    assert_eq!(received, expected);

    // MQTT 3.1.1 has no aliases: nothing changes for it.
    let mut v3 = raw_subscriber(&server, &key, "v3", "alias/#", None);
    client
        .publish("alias/a", rumqttc::QoS::AtLeastOnce, false, "v3")
        .await
        .unwrap();
    let (kind, body) = read_packet(&mut v3);
    assert_eq!(kind & 0xf0, 0x30);
    assert_eq!(&body[2..9], b"alias/a");
    assert_eq!(&body[9..], b"v3");
}

// ---- slow subscribers -----------------------------------------------------------------------

/// 8 KiB may wait for a connected client: a slow subscriber overflows it within a few dozen
/// messages of the fast publisher.
const QUEUE: usize = 8 * 1024;
const MESSAGES: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_slow_subscriber_loses_what_overflows_its_queue_and_it_is_counted() {
    let (server, key) = start(|c| c.mqtt.max_queued_bytes = QUEUE).await;
    assert_eq!(server.state.config.mqtt.slow_subscriber, SlowSubscriber::Drop);
    let mut payloads = slow_subscriber(&server, &key, "flow/#").await;
    let (client, mut acks) = publisher(&server, &key, "fast-publisher");
    publish_all(&client, &mut acks, "flow/data", MESSAGES).await;

    // Every message was either written to the subscriber and acknowledged, or dropped.
    eventually(
        Duration::from_secs(60),
        "every message sent or dropped",
        || async { metric(&server, SENT_QOS1).await + metric(&server, QUEUE_FULL).await == MESSAGES as u64 },
    )
    .await;
    let dropped = metric(&server, QUEUE_FULL).await;
    assert!(dropped > 0, "the slow subscriber overflowed its queue");
    // What was acknowledged reached the subscriber, and nothing else did.
    for n in 0..MESSAGES as u64 - dropped {
        tokio::time::timeout(WAIT, payloads.recv())
            .await
            .unwrap_or_else(|_| panic!("{n} received, {dropped} dropped"));
    }
    assert!(payloads.try_recv().is_err(), "no more than was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_backpressure_publishers_wait_for_slow_subscribers_and_stalled_ones_are_dropped() {
    let (server, key) = start(|c| {
        c.mqtt.max_queued_bytes = QUEUE;
        c.mqtt.slow_subscriber = SlowSubscriber::Backpressure;
    })
    .await;

    // A slow subscriber that keeps acknowledging gets every message, in order.
    let mut payloads = slow_subscriber(&server, &key, "flow/#").await;
    let (client, mut acks) = publisher(&server, &key, "fast-publisher");
    publish_all(&client, &mut acks, "flow/data", MESSAGES).await;
    let mut received = Vec::with_capacity(MESSAGES);
    while received.len() < MESSAGES {
        match tokio::time::timeout(WAIT, payloads.recv()).await {
            Ok(Some(p)) => received.push(p),
            _ => panic!("{} of {MESSAGES} received", received.len()),
        }
    }
    let expected: Vec<String> = (0..MESSAGES).map(payload).collect();
    assert!(received == expected, "every message once, in order");
    assert_eq!(metric(&server, QUEUE_FULL).await, 0);

    // A subscriber that stops reading holds a publisher only until it has taken nothing for
    // 10 s: then it is disconnected and the publisher goes on.
    let mut stalled = TcpStream::connect(server.mqtt).unwrap();
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    stalled.write_all(&connect("stalled", &key, None)).unwrap();
    assert_eq!(read_packet(&mut stalled).0, 0x20);
    stalled.write_all(&subscribe("stall/#", 1, false)).unwrap();
    assert_eq!(read_packet(&mut stalled).0, 0x90);
    let (client, mut acks) = publisher(&server, &key, "held-publisher");
    let started = Instant::now();
    let held = tokio::spawn(async move {
        publish_all(&client, &mut acks, "stall/data", 500).await;
    });
    // Meanwhile QoS 0 is never held: a QoS 0 publisher to the same topic, then a QoS 1
    // message of its own elsewhere, is answered while the stalled client is still connected.
    let (qos0, mut qos0_acks) = publisher(&server, &key, "qos0-publisher");
    for i in 0..200 {
        qos0.publish("stall/data", rumqttc::QoS::AtMostOnce, false, payload(i))
            .await
            .unwrap();
    }
    qos0.publish("elsewhere", rumqttc::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    tokio::time::timeout(WAIT, qos0_acks.recv()).await.unwrap();
    assert_eq!(
        metric(&server, SLOW_DISCONNECTS).await,
        0,
        "answered before the stall ended"
    );

    tokio::time::timeout(Duration::from_secs(40), held)
        .await
        .expect("the publisher is released")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "it was held while the subscriber could still take messages: {:?}",
        started.elapsed()
    );
    assert_eq!(metric(&server, SLOW_DISCONNECTS).await, 1);
    // The stalled client's connection is closed (after what was written to it).
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stalled.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still connected: {e}"),
        }
    }
}
