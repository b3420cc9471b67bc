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
