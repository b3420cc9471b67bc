//! MQTT behaviour that clients rely on and the specification or common brokers (Mosquitto,
//! EMQX) define: subscription ordering, negotiated keep-alive, access rules on wildcard
//! subscriptions and QoS 2 retransmission. Driven by paho-mqtt (Python) and raw sockets; one
//! server per test, on 127.0.0.1 ports chosen by the system.

mod common;

use common::wire::{self, packet, read_packet, string};
use common::{Backend, TestServer};
use serde_json::json;

/// A server and an operator API key for application clients.
async fn start_with(tweak: impl FnOnce(&mut drover::config::Config)) -> (TestServer, String) {
    let server = TestServer::start_with(Backend::Sqlite, tweak).unwrap();
    let admin = server.admin_token().await;
    let key = server.api_key(&admin, "operator").await;
    (server, key)
}

/// A SUBSCRIBE that reached the broker before another client's PUBLISH takes effect for it,
/// with and without No Local, even when the publish follows before the SUBACK. The test
/// server runs one MQTT worker: with several, two connections are ordered only as far as
/// their workers read them (see README, "Ordering").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_read_before_a_publish_receives_it() {
    if !common::paho_available() {
        return;
    }
    let (server, key) = start_with(|_| {}).await;
    for no_local in [true, false] {
        let result = common::paho_probe(
            server.mqtt,
            &key,
            "subscribe_then_publish",
            json!({"no_local": no_local, "rounds": 10, "pause": 0.05}),
        );
        for (i, round) in result["rounds"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                round["b"],
                json!([format!("m{i}")]),
                "no_local={no_local}: {result}"
            );
            if no_local {
                assert_eq!(round["a"], json!([]), "No Local: {result}");
            } else {
                assert_eq!(round["a"], json!([format!("m{i}")]), "{result}");
            }
        }
    }
}

/// A narrow deny rule does not refuse the wildcard subscriptions that overlap it: they are
/// granted, get every other topic, and never the denied one (live or retained). Only a
/// subscription wholly inside the denied filter is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_deny_rule_withholds_its_topic_from_wildcard_subscribers() {
    if !common::paho_available() {
        return;
    }
    let (server, key) = start_with(|c| c.mqtt.allow_anonymous = true).await;
    let platform = server.admin_token().await;
    let (status, rule) = server
        .post(
            "/api/mqtt/acl",
            &platform,
            json!({"subject": "anonymous", "action": "subscribe", "topic": "test/nosubscribe", "effect": "deny"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{rule}");
    let result = common::paho_probe(
        server.mqtt,
        &key,
        "withheld",
        json!({
            "anonymous": true,
            "filters": ["#", "+/+", "test/#", "test/nosubscribe", "test/other"],
            "topics": ["test/nosubscribe", "test/other", "other/x"],
            "last": "test/last",
            "see_last": ["#", "+/+", "test/#"],
        }),
    );
    let subscriber = |filter: &str| {
        result["subscribers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["filter"] == filter)
            .unwrap()
            .clone()
    };
    let topics = |filter: &str| -> Vec<(String, bool)> {
        subscriber(filter)["got"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["topic"].as_str().unwrap().to_string(),
                    m["retain"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let expect = |list: &[(&str, bool)]| -> Vec<(String, bool)> {
        list.iter().map(|(t, r)| (t.to_string(), *r)).collect()
    };
    for filter in ["#", "+/+"] {
        assert_eq!(subscriber(filter)["code"], 1, "granted QoS 1: {result}");
        let mut got = topics(filter);
        got.sort();
        assert_eq!(
            got,
            expect(&[
                ("other/x", false),
                ("other/x", true),
                ("test/last", false),
                ("test/other", false),
                ("test/other", true),
            ]),
            "{filter}: {result}"
        );
    }
    assert_eq!(subscriber("test/#")["code"], 1);
    let mut got = topics("test/#");
    got.sort();
    assert_eq!(
        got,
        expect(&[("test/last", false), ("test/other", false), ("test/other", true)])
    );
    assert_eq!(
        subscriber("test/nosubscribe")["code"],
        0x87,
        "wholly inside the denied filter: {result}"
    );
    assert_eq!(subscriber("test/other")["code"], 1);
}

// ---- raw MQTT packets --------------------------------------------------------------------

/// An anonymous CONNECT, clean start, for protocol level 4 (3.1.1) or 5.
fn connect(level: u8, client_id: &str) -> Vec<u8> {
    if level == 5 {
        return wire::connect_v5_packet(client_id, 60);
    }
    let body = [string("MQTT"), vec![level, 0x02, 0, 60], string(client_id)].concat();
    packet(0x10, body)
}

/// A QoS 2 PUBLISH with packet id `id`, DUP as given.
fn publish_qos2(level: u8, topic: &str, id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = [string(topic), id.to_be_bytes().to_vec()].concat();
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(payload);
    packet(0x34 | if dup { 0x08 } else { 0 }, body)
}

/// Connects and waits for a successful CONNACK.
fn raw_client(server: &TestServer, level: u8, client_id: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(server.mqtt).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&connect(level, client_id)).unwrap();
    let (first, body) = read_packet(&mut stream).expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0), "CONNACK accepted: {body:?}");
    stream
}

/// A QoS 2 PUBLISH resent (DUP, same packet id) before PUBREL is answered with PUBREC again
/// and delivered once, on both protocol versions (MQTT 3.1.1 and 5.0 §4.3.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_resend_before_pubrel_gets_pubrec_again_and_is_delivered_once() {
    use std::io::Write;
    let (server, _) = start_with(|c| c.mqtt.allow_anonymous = true).await;
    let mut subscriber = raw_client(&server, 4, "dup-watch");
    subscriber
        .write_all(&packet(0x82, [&[0, 1][..], &string("dup/#"), &[2]].concat()))
        .unwrap();
    assert_eq!(read_packet(&mut subscriber).map(|p| p.0), Some(0x90), "SUBACK");
    for level in [4u8, 5] {
        let topic = format!("dup/{level}");
        let mut publisher = raw_client(&server, level, &format!("dup-pub-{level}"));
        let id = 10u16;
        let pubrec = |p: Option<(u8, Vec<u8>)>, what: &str| {
            let (first, body) = p.unwrap_or_else(|| panic!("level {level}: {what}: connection closed"));
            assert_eq!(
                first, 0x50,
                "level {level}: {what}: PUBREC expected, got {first:#x} {body:?}"
            );
            assert_eq!(&body[..2], &id.to_be_bytes(), "level {level}: {what}");
            assert!(
                body.len() == 2 || body[2] < 0x80,
                "level {level}: {what}: success {body:?}"
            );
        };
        publisher
            .write_all(&publish_qos2(level, &topic, id, false, b"once"))
            .unwrap();
        pubrec(read_packet(&mut publisher), "first PUBLISH");
        // Twice more, as a client that missed the PUBREC would.
        for _ in 0..2 {
            publisher
                .write_all(&publish_qos2(level, &topic, id, true, b"once"))
                .unwrap();
            pubrec(read_packet(&mut publisher), "resent PUBLISH");
        }
        publisher
            .write_all(&packet(0x62, id.to_be_bytes().to_vec()))
            .unwrap();
        let (first, body) = read_packet(&mut publisher).expect("PUBCOMP");
        assert_eq!(
            (first, &body[..2]),
            (0x70, &id.to_be_bytes()[..]),
            "level {level}"
        );
        // The id is free again: a new message with it is a new message.
        publisher
            .write_all(&publish_qos2(level, &topic, id, false, b"again"))
            .unwrap();
        pubrec(read_packet(&mut publisher), "new PUBLISH with the released id");
        publisher
            .write_all(&packet(0x62, id.to_be_bytes().to_vec()))
            .unwrap();
        assert_eq!(read_packet(&mut publisher).map(|p| p.0), Some(0x70));
        // The subscriber got each message once, at QoS 2: `once`, then `again`.
        let mut got = Vec::new();
        while got.len() < 2 {
            let (first, body) = read_packet(&mut subscriber).expect("delivery");
            assert_eq!(first & 0xF6, 0x34, "a QoS 2 PUBLISH: {first:#x} {body:?}");
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let id = [body[2 + topic_len], body[3 + topic_len]];
            got.push(String::from_utf8_lossy(&body[4 + topic_len..]).to_string());
            subscriber.write_all(&packet(0x50, id.to_vec())).unwrap();
            assert_eq!(read_packet(&mut subscriber), Some((0x62, id.to_vec())), "PUBREL");
            subscriber.write_all(&packet(0x70, id.to_vec())).unwrap();
        }
        assert_eq!(got, ["once", "again"], "level {level}");
    }
    // Nothing else arrives.
    subscriber
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    assert!(read_packet(&mut subscriber).is_none(), "no second delivery");
}

/// An MQTT 5 connection takes any number of QoS 2 messages, each id reused once its exchange
/// is complete (ntex-mqtt 8.2 alone never frees them: the 65th closed the connection with
/// 0x93 Receive Maximum exceeded). A PUBREL for an unknown id gets PUBCOMP 0x92.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_packet_ids_are_freed_by_pubrel() {
    use std::io::Write;
    let (server, _) = start_with(|c| c.mqtt.allow_anonymous = true).await;
    let mut publisher = raw_client(&server, 5, "many");
    for n in 0..200u16 {
        let id = 1 + n % 3;
        publisher
            .write_all(&publish_qos2(5, "many", id, false, b"x"))
            .unwrap();
        let p = read_packet(&mut publisher);
        assert_eq!(
            p.as_ref().map(|p| (p.0, p.1[..2].to_vec())),
            Some((0x50, id.to_be_bytes().to_vec())),
            "message {n}: {p:?}"
        );
        publisher
            .write_all(&packet(0x62, id.to_be_bytes().to_vec()))
            .unwrap();
        let p = read_packet(&mut publisher);
        assert_eq!(p.as_ref().map(|p| p.0), Some(0x70), "message {n}: {p:?}");
    }
    publisher.write_all(&packet(0x62, vec![0, 99])).unwrap();
    assert_eq!(read_packet(&mut publisher), Some((0x70, vec![0, 99, 0x92])));
}
