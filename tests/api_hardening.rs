//! The HTTP API's edges as an adversary or a careless client meets them: metric labels that
//! cannot grow without bound, one JSON error shape for every refusal (oversized, mistyped or
//! misspelled bodies), identifiers that URLs cannot address, aggregates past f64's range, and
//! the small inconsistencies a new user trips over (timestamps, field case, links, documents).
//!
//! One server for the whole file: each part below is a function of its own, run in turn.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::ws;
use common::{Backend, TestServer};
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
/// Small, so that an oversized body is cheap to send.
const MAX_BODY: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_hardening() {
    let server =
        TestServer::start_with(Backend::Sqlite, |c| c.http.max_body_bytes = MAX_BODY).expect("SQLite server");
    let admin = server.admin_token().await;
    let operator = server.api_key(&admin, "operator").await;
    let device_token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;

    metric_labels_come_from_closed_sets(&server).await;
    every_refusal_is_a_json_error(&server, &admin).await;
    bodies_that_are_not_json_get_415(&server, &admin, &device_token).await;
    unknown_fields_are_refused(&server, &admin).await;
    dot_segment_device_ids_are_refused(&server, &admin).await;
    overflowing_sums_say_why(&server, &admin, &device_token).await;
    refused_points_are_counted(&server, &device_token).await;
    device_socket_takes_an_api_key_in_the_query(&server, &operator).await;
    device_socket_ends_with_its_credential(&server, &admin).await;
    timestamps_are_milliseconds_everywhere(&server, &admin).await;
    admin_actor_records_are_camel_case(&server, &admin).await;
    documents_and_links_answer(&server).await;
}

/// Sends `count` requests with made-up methods and paths, 50 at a time.
async fn random_requests(server: &TestServer, seed: u64, count: u64) {
    let client = reqwest::Client::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(50) {
        let requests = chunk.iter().map(|i| {
            let n = seed * 1_000_000 + i;
            let method = Method::from_bytes(format!("M{n:X}").as_bytes()).unwrap();
            let path = match n % 4 {
                0 => format!("/random/{n}"),
                1 => format!("/api/nothing-{n}/x"),
                2 => format!("/api/devices/dev-{n}/nothing"),
                _ => format!("/api/devices/dev-{n}"),
            };
            let method = if n.is_multiple_of(3) { Method::GET } else { method };
            client.request(method, server.url(&path)).send()
        });
        for response in join_all(requests).await {
            response.expect("request answered");
        }
    }
}

/// The label sets of the HTTP metrics, without the values.
async fn http_series(server: &TestServer) -> (BTreeSet<String>, usize) {
    let text = server.metrics_text().await;
    let series = text
        .lines()
        .filter(|l| l.starts_with("drover_http_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_string()))
        .collect();
    (series, text.len())
}

async fn metric_labels_come_from_closed_sets(server: &TestServer) {
    random_requests(server, 1, 2_500).await;
    // A scrape counts itself after it is rendered: the first one adds the /metrics series.
    http_series(server).await;
    let (before, size_before) = http_series(server).await;
    random_requests(server, 2, 2_500).await;
    let (after, size_after) = http_series(server).await;
    let new: Vec<_> = after.difference(&before).collect();
    assert!(new.is_empty(), "new HTTP series after a second batch: {new:?}");
    // Only counters' digits may have grown.
    assert!(
        size_after < size_before + 512,
        "/metrics grew from {size_before} to {size_after} bytes"
    );
    assert!(
        after.iter().any(|s| s.contains("method=\"other\"")),
        "unknown methods are counted as other"
    );
}

fn assert_json_error(what: &str, status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// Sends `body` as it is, with `content_type` (none when `None`).
async fn send(
    server: &TestServer,
    method: Method,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut request = server.client.request(method, server.url(path)).bearer_auth(token);
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    let response = request.body(body).send().await.expect("answered");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn every_refusal_is_a_json_error(server: &TestServer, admin: &str) {
    // The shadow update reads raw bytes: its 413 came from actix as plain text.
    let oversized = format!(
        "{{\"state\": {{\"desired\": {{\"blob\": \"{}\"}}}}}}",
        "x".repeat(MAX_BODY)
    );
    let (status, body) = send(
        server,
        Method::PATCH,
        "/api/devices/sensor-001/shadow",
        admin,
        Some("application/json"),
        oversized.clone(),
    )
    .await;
    assert_json_error(
        "oversized shadow update",
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&MAX_BODY.to_string()),
        "{body}"
    );
    // The same through the typed JSON extractor and the streamed telemetry body.
    let (status, body) = send(
        server,
        Method::POST,
        "/api/devices/register",
        admin,
        Some("application/json"),
        oversized.clone(),
    )
    .await;
    assert_json_error(
        "oversized registration",
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let (status, body) = send(
        server,
        Method::POST,
        "/api/devices/sensor-001/telemetry",
        admin,
        Some("application/json"),
        oversized,
    )
    .await;
    assert_json_error(
        "oversized telemetry",
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // Malformed JSON, a bad query, a bad path, a method the route does not take.
    let (status, body) = server
        .call_raw(Method::POST, "/api/groups", admin, "{\"name\": ")
        .await;
    assert_json_error(
        "malformed JSON",
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    let (status, body) = server.get("/api/devices?limit=many", admin).await;
    assert_json_error(
        "bad query",
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    );
    let (status, body) = server.call(Method::PUT, "/health", None, None).await;
    assert!(status.is_client_error(), "PUT /health: {status}");
    assert!(body["error"]["code"].is_string(), "PUT /health: {body}");
}

async fn bodies_that_are_not_json_get_415(server: &TestServer, admin: &str, device_token: &str) {
    let registration = r#"{"deviceId": "typed-1", "type": "temperature"}"#;
    let bodies = [
        (Method::POST, "/api/devices/register", admin, registration),
        (
            Method::POST,
            "/api/devices/sensor-001/telemetry",
            device_token,
            r#"{"metrics": {"temperature": 1}}"#,
        ),
        (
            Method::PATCH,
            "/api/devices/sensor-001/shadow",
            admin,
            r#"{"state": {"desired": {"led": "on"}}}"#,
        ),
    ];
    for content_type in [
        "application/x-www-form-urlencoded",
        "application/xml",
        "multipart/form-data; boundary=x",
        "text/plain",
    ] {
        for (method, path, token, body) in &bodies {
            let (status, answer) = send(server, method.clone(), path, token, Some(content_type), *body).await;
            assert_json_error(
                content_type,
                status,
                &answer,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            );
        }
    }
    // JSON by another name is JSON.
    let (status, body) = send(
        server,
        Method::POST,
        "/api/devices/sensor-001/telemetry",
        device_token,
        Some("application/vnd.drover+json; charset=utf-8"),
        r#"{"metrics": {"temperature": 1}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "+json suffix: {body}");
    // No Content-Type at all is read as JSON, as README says.
    let (status, body) = send(
        server,
        Method::POST,
        "/api/devices/register",
        admin,
        None,
        registration,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "no Content-Type: {body}");
    let (status, body) = send(
        server,
        Method::POST,
        "/api/devices/sensor-001/telemetry",
        device_token,
        None,
        r#"{"metrics": {"temperature": 2}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "no Content-Type: {body}");
}

async fn unknown_fields_are_refused(server: &TestServer, admin: &str) {
    let (status, body) = server
        .post(
            "/api/devices/register",
            admin,
            json!({"deviceId": "typo-1", "type": "temperature", "metdata": {"location": "a"}}),
        )
        .await;
    assert_json_error("metdata", status, &body, StatusCode::BAD_REQUEST, "unknown_field");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("metdata"),
        "{body}"
    );
    let (status, _) = server.get("/api/devices/typo-1", admin).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a refused registration writes nothing"
    );
}

async fn dot_segment_device_ids_are_refused(server: &TestServer, admin: &str) {
    for id in [".", ".."] {
        let (status, body) = server
            .post(
                "/api/devices/register",
                admin,
                json!({"deviceId": id, "type": "temperature"}),
            )
            .await;
        assert_json_error(id, status, &body, StatusCode::BAD_REQUEST, "invalid_device_id");
    }
    let (status, body) = server.post("/api/groups", admin, json!({"name": ".."})).await;
    assert_json_error(
        "group ..",
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_group_name",
    );
}

async fn overflowing_sums_say_why(server: &TestServer, admin: &str, device_token: &str) {
    let now = chrono::Utc::now().timestamp_millis();
    let ingest = |metric: &str, value: f64| {
        let body = json!([
            {"timestamp": now - 2_000, "metrics": {metric: value}},
            {"timestamp": now - 1_000, "metrics": {metric: value}},
        ]);
        server.post("/api/devices/sensor-001/telemetry", device_token, body)
    };
    let (status, body) = ingest("huge", f64::MAX).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = ingest("big", i64::MAX as f64).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let range = format!("start={}&end={}", now - 60_000, now + 60_000);
    for agg in ["sum", "mean"] {
        let (status, body) = server
            .get(
                &format!("/api/telemetry/sensor-001?metric=huge&agg={agg}&{range}"),
                admin,
            )
            .await;
        assert_json_error(agg, status, &body, StatusCode::BAD_REQUEST, "aggregate_overflow");
    }
    let (status, body) = server
        .get(
            &format!("/api/telemetry/sensor-001?metric=huge&agg=max&{range}"),
            admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["series"][0]["points"][0]["v"], json!(f64::MAX), "{body}");
    let (status, body) = server
        .get(
            &format!("/api/telemetry/sensor-001?metric=big&agg=sum&{range}"),
            admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["series"][0]["points"][0]["v"],
        json!(2.0 * i64::MAX as f64),
        "{body}"
    );
}

/// `drover_telemetry_ingested_points_total{outcome="refused"}`.
async fn refused_points(server: &TestServer) -> u64 {
    server
        .metric("drover_telemetry_ingested_points_total{outcome=\"refused\"}")
        .await as u64
}

async fn refused_points_are_counted(server: &TestServer, device_token: &str) {
    let before = refused_points(server).await;
    let (status, body) = server
        .call_raw(
            Method::POST,
            "/api/devices/sensor-001/telemetry",
            device_token,
            r#"{"metrics": {"bad name!": 1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let after = refused_points(server).await;
    assert_eq!(after, before + 1, "the refused point is counted");
}

async fn device_socket_takes_an_api_key_in_the_query(server: &TestServer, operator: &str) {
    let url = format!("ws://{}/ws/devices/sensor-001?token={operator}", server.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("an operator's API key in ?token= opens the device socket");
    let reply = ws::request(&mut socket, r#"{"metrics": {"temperature": 20.5}}"#, WAIT).await;
    assert_eq!(reply, json!({"ok": true, "points": 1}));
    // A refused key keeps its own code, readable.
    let url = format!("ws://{}/ws/devices/sensor-001?token=drv_not-a-key", server.addr);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED.as_u16());
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("a JSON error");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
            assert_eq!(body["error"]["message"], "unknown API key", "{body}");
        }
        other => panic!("an unknown key opened the socket: {other:?}"),
    }
}

/// A device socket opened with an API key stops taking telemetry once the key is revoked: the
/// next frame after the re-check interval (10 s) closes it with 1008 "credential revoked".
async fn device_socket_ends_with_its_credential(server: &TestServer, admin: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let (status, key) = server
        .post(
            "/api/keys",
            admin,
            json!({"name": "revoked-socket", "role": "operator"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let url = format!(
        "ws://{}/ws/devices/sensor-001?token={}",
        server.addr,
        key["key"].as_str().unwrap()
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let reply = ws::request(&mut socket, r#"{"metrics": {"temperature": 21}}"#, WAIT).await;
    assert_eq!(reply, json!({"ok": true, "points": 1}));
    let (status, body) = server
        .delete(
            &format!("/api/keys/{}", key["apiKey"]["id"].as_str().unwrap()),
            admin,
        )
        .await;
    assert!(status.is_success(), "{status} {body}");

    // Frames keep coming; each is either still answered (within the re-check interval) or the
    // socket closes for its credential. It must close before the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    let mut answered_after_revoke = 0;
    let close = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the socket outlived its revoked key"
        );
        socket
            .send(Message::text(r#"{"metrics": {"temperature": 22}}"#))
            .await
            .unwrap();
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("an answer in time")
        {
            Some(Ok(Message::Text(_))) => answered_after_revoke += 1,
            Some(Ok(Message::Close(frame))) => break frame,
            other => panic!("unexpected: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let frame = close.expect("a close frame with a reason");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "credential revoked");
    assert!(
        answered_after_revoke <= 22,
        "{answered_after_revoke} frames taken after the revocation"
    );
}

/// Every RFC 3339 time in `value` has at most millisecond precision.
fn assert_millisecond_times(what: &str, value: &Value) {
    match value {
        Value::String(s) => {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                assert_eq!(
                    t.timestamp_subsec_nanos() % 1_000_000,
                    0,
                    "{what}: {s} is finer than milliseconds"
                );
            }
        }
        Value::Array(items) => items.iter().for_each(|v| assert_millisecond_times(what, v)),
        Value::Object(map) => map.values().for_each(|v| assert_millisecond_times(what, v)),
        _ => {}
    }
}

async fn timestamps_are_milliseconds_everywhere(server: &TestServer, admin: &str) {
    let (status, created) = server
        .post(
            "/api/mqtt/acl",
            admin,
            json!({"subject": "role:viewer", "action": "subscribe", "topic": "ms/#", "effect": "deny"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_millisecond_times("POST /api/mqtt/acl", &created);
    let (_, listed) = server.get("/api/mqtt/acl", admin).await;
    let id = &created["rule"]["id"];
    let stored = listed["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| &r["id"] == id)
        .expect("the rule is listed");
    assert_eq!(
        stored["createdAt"], created["rule"]["createdAt"],
        "POST and GET agree"
    );
    for (path, body) in [
        ("/api/groups", json!({"name": "ms-group"})),
        (
            "/api/keys",
            json!({"name": "ms-key", "role": "viewer", "expiresInDays": 1}),
        ),
        ("/api/devices/register", json!({"deviceId": "ms-1", "type": "t"})),
        ("/api/tenants", json!({"id": "ms-tenant", "name": "ms"})),
    ] {
        let (status, body) = server.post(path, admin, body).await;
        assert!(status.is_success(), "{path}: {body}");
        assert_millisecond_times(path, &body);
    }
    let (_, stats) = server.get("/stats", admin).await;
    assert_millisecond_times("/stats", &stats);
}

/// Object keys of `value` that are not camelCase (metadata and other user maps excepted).
fn snake_keys(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| snake_keys(v, out)),
        Value::Object(map) => {
            for (key, v) in map {
                if key.contains('_') {
                    out.push(key.clone());
                }
                if key != "metadata" {
                    snake_keys(v, out);
                }
            }
        }
        _ => {}
    }
}

async fn admin_actor_records_are_camel_case(server: &TestServer, admin: &str) {
    for path in ["/admin/actors", "/admin/actors/default/sensor-001"] {
        let (status, body) = server.get(path, admin).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_millisecond_times(path, &body);
        let mut keys = Vec::new();
        snake_keys(&body, &mut keys);
        assert!(keys.is_empty(), "{path} has snake_case keys {keys:?}: {body}");
    }
}

async fn documents_and_links_answer(server: &TestServer) {
    // The start banner links /api.
    let (status, index) = server.call(Method::GET, "/api", None, None).await;
    assert_eq!(status, StatusCode::OK, "{index}");
    assert_eq!(index["api"], "/api/openapi.json", "{index}");
    let (status, doc) = server.call(Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/ws", "/ws/devices/{deviceId}"] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is not in the OpenAPI document"
        );
    }
}
