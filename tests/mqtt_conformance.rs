//! MQTT behaviour that clients rely on and the specification or common brokers (Mosquitto,
//! EMQX) define: subscription ordering, negotiated keep-alive, access rules on wildcard
//! subscriptions and QoS 2 retransmission. Driven by paho-mqtt (Python) and raw sockets; one
//! server per test, on 127.0.0.1 ports chosen by the system.

mod common;

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
            assert_eq!(round["b"], json!([format!("m{i}")]), "no_local={no_local}: {result}");
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
            .map(|m| (m["topic"].as_str().unwrap().to_string(), m["retain"].as_bool().unwrap()))
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
