//! Notifications cannot be turned against the server's own network (server-side request
//! forgery): webhook URLs naming a loopback, unspecified or link-local address are refused when
//! written, a host name resolving to loopback is refused when the alarm fires, redirects are not
//! followed, and the delivery log tells neither a closed port nor a refused destination by its
//! network error. Credentials in a webhook URL are masked wherever they are shown.
//!
//! One server: only 127.0.0.2 is opened (`NOTIFY_ALLOWED_NETWORKS`), so the receivers here listen
//! there while 127.0.0.1 and `localhost` stay refused as on any default deployment.

mod common;

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use common::receiver::http_receiver_on;
use common::{Backend, TestServer, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const OPENED: &str = "127.0.0.2";

/// The delivery log of the alarm that `rule` raised on `device`, once it holds an entry.
async fn deliveries(server: &TestServer, token: &str, device: &str, rule: &str) -> Vec<Value> {
    let found = |alerts: &Value| {
        alerts["alerts"]
            .as_array()
            .and_then(|list| list.iter().find(|a| a["ruleName"] == rule))
            .and_then(|a| a["id"].as_str().map(String::from))
    };
    let result = Mutex::new(Vec::new());
    eventually(WAIT, &format!("a delivery of {rule}"), || async {
        let (_, alerts) = server.get(&format!("/api/alerts?deviceId={device}"), token).await;
        let Some(id) = found(&alerts) else { return false };
        let (_, detail) = server.get(&format!("/api/alerts/{id}"), token).await;
        let list = detail["deliveries"].as_array().cloned().unwrap_or_default();
        let any = !list.is_empty();
        *result.lock().unwrap() = list;
        any
    })
    .await;
    result.into_inner().unwrap()
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_only_allowed_destinations() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.rules.tick_ms = 50;
        c.rules.delivery_attempts = 2;
        c.rules.retry_backoff_ms = 20;
        c.rules.notify_allowed_networks = vec![OPENED.into()];
    })
    .unwrap();
    let admin = server.admin_token().await;
    let (status, body) = server
        .post(
            "/api/channels",
            &admin,
            json!({"name": "public-hook", "type": "webhook", "url": "https://hooks.example.com/h"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, rule) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "public", "condition": "temperature > 1000",
                   "actions": [{"type": "webhook", "url": "https://hooks.example.com/r"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    let rule_id = rule["id"].as_str().unwrap();

    // Literal addresses are refused when written, whichever way they are spelled.
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://localhost.:1@127.0.0.1/",
        "http://[::1]:8080/hook",
        "http://0.0.0.0:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",
        "http://10.0.0.1/",
    ] {
        let writes = [
            server
                .post(
                    "/api/channels",
                    &admin,
                    json!({"name": "inner", "type": "webhook", "url": url}),
                )
                .await,
            server
                .patch(
                    "/api/channels/public-hook",
                    &admin,
                    json!({"name": "public-hook", "type": "webhook", "url": url}),
                )
                .await,
            server
                .post(
                    "/api/rules",
                    &admin,
                    json!({"name": "inner", "condition": "temperature > 30",
                           "escalation": [{"afterSecs": 60, "actions": [{"type": "webhook", "url": url}]}]}),
                )
                .await,
            server
                .patch(
                    &format!("/api/rules/{rule_id}"),
                    &admin,
                    json!({"actions": [{"type": "webhook", "url": url}]}),
                )
                .await,
        ];
        for (status, body) in writes {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
            assert_eq!(body["error"]["code"], "destination_not_allowed", "{url}: {body}");
        }
    }

    // Receivers: one that redirects to another, one that answers, and a closed port.
    let (target_addr, _target, target_hits) = http_receiver_on(OPENED, 200, "").await;
    let location = format!("Location: http://{target_addr}/stolen\r\n");
    let (redirect_addr, _redirect, redirect_hits) = http_receiver_on(OPENED, 302, &location).await;
    let (hook_addr, mut hooks, _) = http_receiver_on(OPENED, 200, "").await;
    let closed = std::net::TcpListener::bind((OPENED, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let (loopback_addr, _loopback, loopback_hits) = http_receiver_on("127.0.0.1", 200, "").await;

    // A channel whose URL carries credentials and a query token: both shown masked, delivered
    // with them, and kept when written back as shown.
    let (status, channel) = server
        .post(
            "/api/channels",
            &admin,
            json!({"name": "cred-hook", "type": "webhook", "url": format!("http://hookuser:hookpass@{hook_addr}/c?token=QuerySecret456")}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{channel}");
    let masked = format!("http://hookuser:***@{hook_addr}/c?token=***");
    assert_eq!(channel["url"], masked.as_str(), "{channel}");
    let (_, shown) = server.get("/api/channels/cred-hook", &admin).await;
    assert_eq!(shown["url"], masked.as_str(), "{shown}");
    let (_, list) = server.get("/api/channels", &admin).await;
    assert!(!list.to_string().contains("hookpass"), "{list}");
    assert!(!list.to_string().contains("QuerySecret456"), "{list}");
    let (status, patched) = server
        .patch(
            "/api/channels/cred-hook",
            &admin,
            json!({"name": "cred-hook", "type": "webhook", "url": shown["url"], "timeoutMs": 4000}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");

    let inline = format!("http://inluser:inlpass@{hook_addr}/i");
    for (name, actions) in [
        (
            "via-localhost",
            json!([{"type": "webhook", "url": format!("http://localhost:{}/x", loopback_addr.port())}]),
        ),
        (
            "redirected",
            json!([{"type": "webhook", "url": format!("http://{redirect_addr}/start")}]),
        ),
        (
            "closed-port",
            json!([{"type": "webhook", "url": format!("http://{closed}/x")}]),
        ),
        (
            "credentials",
            json!([{"type": "webhook", "channel": "cred-hook"}, {"type": "webhook", "url": inline}]),
        ),
    ] {
        let (status, body) = server
            .post(
                "/api/rules",
                &admin,
                json!({"name": name, "condition": "temperature > 30", "actions": actions}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {body}");
        if name == "credentials" {
            assert!(!body.to_string().contains("inlpass"), "{body}");
            assert_eq!(
                body["rule"]["actions"][1]["url"],
                format!("http://inluser:***@{hook_addr}/i"),
                "{body}"
            );
        }
    }
    let (_, rules) = server.get("/api/rules", &admin).await;
    assert!(!rules.to_string().contains("inlpass"), "{rules}");

    server
        .register(&admin, json!({"deviceId": "boiler-1", "type": "boiler"}))
        .await;
    let (status, body) = server
        .post(
            "/api/devices/boiler-1/telemetry",
            &admin,
            json!({"metrics": {"temperature": 31}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A name resolving to loopback is refused at delivery, and the log says only that.
    let via_localhost = deliveries(&server, &admin, "boiler-1", "via-localhost").await;
    assert_eq!(via_localhost[0]["outcome"], "failed", "{via_localhost:?}");
    assert_eq!(
        via_localhost[0]["detail"], "destination not allowed",
        "{via_localhost:?}"
    );
    assert_eq!(via_localhost[0]["attempts"], 1, "not retried: {via_localhost:?}");
    assert_eq!(loopback_hits.load(Ordering::SeqCst), 0);

    // A redirect is a failed delivery, not followed even to an allowed address.
    let redirected = deliveries(&server, &admin, "boiler-1", "redirected").await;
    assert_eq!(redirected[0]["outcome"], "failed", "{redirected:?}");
    assert_eq!(
        redirected[0]["detail"], "delivery failed: HTTP 302 Found",
        "{redirected:?}"
    );
    assert_eq!(redirect_hits.load(Ordering::SeqCst), 1);
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "the redirect was followed");

    // A closed port reads like any other failure without a response.
    let closed_port = deliveries(&server, &admin, "boiler-1", "closed-port").await;
    assert_eq!(closed_port[0]["outcome"], "failed", "{closed_port:?}");
    assert_eq!(closed_port[0]["detail"], "delivery failed", "{closed_port:?}");
    for entry in via_localhost.iter().chain(&closed_port) {
        let text = entry.to_string().to_lowercase();
        assert!(!text.contains("refused") && !text.contains("connect"), "{text}");
    }

    // Credentials are delivered (as basic authentication) and never shown.
    let mut authorizations = Vec::new();
    for _ in 0..2 {
        let got = tokio::time::timeout(WAIT, hooks.recv())
            .await
            .expect("webhook")
            .unwrap();
        authorizations.push((got.path.clone(), got.headers.get("authorization").cloned()));
    }
    authorizations.sort();
    assert_eq!(
        authorizations,
        vec![
            (
                "/c?token=QuerySecret456".to_string(),
                Some(basic("hookuser", "hookpass"))
            ),
            ("/i".to_string(), Some(basic("inluser", "inlpass"))),
        ]
    );
    let recorded = Mutex::new(Vec::new());
    eventually(WAIT, "both credential deliveries recorded", || async {
        let list = deliveries(&server, &admin, "boiler-1", "credentials").await;
        let both = list.len() == 2;
        *recorded.lock().unwrap() = list;
        both
    })
    .await;
    let credentials = recorded.into_inner().unwrap();
    let text = Value::from(credentials.clone()).to_string();
    assert!(!text.contains("inlpass") && !text.contains("hookpass"), "{text}");
    assert!(!text.contains("QuerySecret456"), "{text}");
    assert!(
        credentials
            .iter()
            .any(|d| d["channel"] == format!("http://inluser:***@{hook_addr}/i")
                && d["outcome"] == "delivered"),
        "{text}"
    );
}
