//! Analytics end to end: live anomaly detection on ingested telemetry (events listed, pushed on
//! `/ws`, written as `anomaly_score`, models kept over a restart), and the on-demand endpoints
//! (statistics, trend, drift, correlation, forecast, maintenance per device and ranked over the
//! fleet, backtest, configuration) with their tenant isolation and refusals of bad input, and the
//! `anomaly` and `forecast` rule conditions opening alarms from the live analytics.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::ws::{self, Socket};
use common::{Backend, TestServer, eventually};
use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A noisy periodic reading (deterministic), temperature and vibration moving together.
fn reading(i: usize) -> (f64, f64) {
    let phase = i as f64 * 0.3;
    let noise = ((i * 7919) % 13) as f64 / 30.0;
    (20.0 + phase.sin() + noise, 2.0 + 0.5 * phase.sin() + noise / 4.0)
}

async fn post_messages(server: &TestServer, token: &str, device: &str, messages: Vec<Value>) {
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/devices/{device}/telemetry"),
            Some(token),
            Some(Value::Array(messages)),
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
}

fn message(ts: i64, temperature: f64, vibration: f64) -> Value {
    json!({"timestamp": ts, "metrics": {"temperature": temperature, "vibration": vibration}})
}

async fn open_ws(server: &TestServer, token: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", server.addr))
        .await
        .expect("ws connects");
    let hello = ws::next_json(&mut socket, WAIT).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    socket
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_anomalies_are_stored_pushed_charted_and_survive_a_restart() {
    let mut server = TestServer::start(Backend::Sqlite).expect("SQLite server");
    let admin = server.admin_token().await;
    let device_token = server
        .register(&admin, json!({"deviceId": "pump-1", "type": "pump"}))
        .await;
    // The forest (on by default, one for the pump type, trained on its devices' vectors), small
    // windows so the test needs few messages, and a forest trained on 64 vectors.
    let (status, body) = server
        .call(
            Method::PUT,
            "/api/analytics/config/device-types/pump",
            Some(&admin),
            Some(json!({"window": 30, "warmUp": 30, "trainingSize": 64, "seed": 11})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["effective"]["trainingSize"], 64);
    assert_eq!(body["effective"]["threshold"], 3.0, "ANOMALY_THRESHOLD's default");
    assert_eq!(body["effective"]["forestPer"], "deviceType");
    assert_eq!(body["effective"]["methods"], json!(["ensemble", "eif", "drift"]));

    let mut socket = open_ws(&server, &admin).await;
    let start = Utc::now().timestamp_millis() - 600_000;
    let ts = |i: usize| start + i as i64 * 1000;
    for batch in 0..3 {
        let messages = (batch * 100..(batch + 1) * 100)
            .map(|i| {
                let (t, v) = reading(i);
                message(ts(i), t, v)
            })
            .collect();
        post_messages(&server, &device_token, "pump-1", messages).await;
    }
    eventually(WAIT, "the forest trained", || async {
        server.metric("drover_analytics_trainings_total").await >= 1.0
    })
    .await;
    // An ordinary vibration with a temperature far off: the forest names the temperature.
    post_messages(
        &server,
        &device_token,
        "pump-1",
        vec![message(ts(300), 45.0, 2.2)],
    )
    .await;

    // (A training message may score above the threshold too, once the forest exists: those
    // frames are skipped, the spike's is the one looked at.)
    let frame = loop {
        let frame = ws::next_json(&mut socket, WAIT).await;
        if frame["type"] == "analytics" && frame["method"] == "eif" && frame["ts"] == ts(300) {
            break frame;
        }
    };
    assert_eq!(frame["event"], "anomaly", "{frame}");
    assert_eq!(frame["deviceId"], "pump-1");
    assert_eq!(frame["ts"], ts(300));
    assert_eq!(frame["metrics"][0], "temperature", "{frame}");
    assert!(frame["score"].as_f64().unwrap() >= 1.0);

    let path = format!("/api/analytics/anomalies?device=pump-1&start={}", start);
    eventually(WAIT, "the events are stored", || async {
        let (_, body) = server.get(&path, &admin).await;
        body["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["method"] == "eif"))
    })
    .await;
    let (status, body) = server.get(&path, &admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = body["events"].clone();
    let eif = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "eif")
        .unwrap();
    assert_eq!(eif["ts"], ts(300));
    assert_eq!(eif["kind"], "anomaly");
    assert_eq!(eif["value"], 45.0);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["method"] == "ensemble"),
        "the univariate ensemble flags it too: {events}"
    );

    // The scores chart beside the data.
    eventually(WAIT, "anomaly_score is written", || async {
        let (_, body) = server
            .get(
                &format!("/api/telemetry/pump-1?metric=anomaly_score&start={start}"),
                &admin,
            )
            .await;
        body["series"][0]["points"]
            .as_array()
            .is_some_and(|p| p.len() > 200)
    })
    .await;
    let (_, body) = server
        .get(
            &format!(
                "/api/telemetry/pump-1?metric=anomaly_score&start={}&end={}",
                ts(300),
                ts(301)
            ),
            &admin,
        )
        .await;
    assert!(
        body["series"][0]["points"][0]["v"].as_f64().unwrap() >= 1.0,
        "{body}"
    );
    assert!(server.metric("drover_analytics_anomalies_total").await >= 2.0);
    let (status, svg) = server
        .get(
            &format!("/api/analytics/anomalies/pump-1.svg?metric=temperature&start={start}"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let svg = svg.as_str().unwrap();
    assert!(
        svg.contains("<polyline") && svg.matches("<circle").count() >= 1,
        "{svg}"
    );
    assert_eq!(server.metric("drover_analytics_events_dropped_total").await, 0.0);

    // A restart keeps what was learned: the first messages after it are scored at once, where a
    // cold monitor would warm up for 30 messages and train after 64.
    drop(socket);
    server.restart();
    let admin = server.admin_token().await;
    let (t, v) = reading(301);
    post_messages(&server, &device_token, "pump-1", vec![message(ts(301), t, v)]).await;
    eventually(
        WAIT,
        "the restored forest is retrained from its snapshot",
        || async { server.metric("drover_analytics_trainings_total").await >= 1.0 },
    )
    .await;
    post_messages(
        &server,
        &device_token,
        "pump-1",
        vec![message(ts(302), 45.0, 2.2)],
    )
    .await;
    eventually(WAIT, "the restored monitor flags the next spike", || async {
        let (_, body) = server
            .get(
                &format!("/api/analytics/anomalies?device=pump-1&start={}", ts(302)),
                &admin,
            )
            .await;
        let events = body["events"].as_array().cloned().unwrap_or_default();
        events.iter().any(|e| e["method"] == "eif") && events.iter().any(|e| e["method"] == "ensemble")
    })
    .await;
}

fn point(tenant: &str, device: &str, metric: &str, ts_ms: i64, value: f64) -> TelemetryPoint {
    TelemetryPoint {
        tenant: TenantId::parse(tenant).unwrap(),
        device: DeviceId::parse(device).unwrap(),
        device_type: "sensor".into(),
        metric: MetricName::parse(metric).unwrap(),
        ts_ms,
        value: MetricValue::Number(value),
    }
}

async fn code(server: &TestServer, token: &str, path: &str) -> (StatusCode, String) {
    let (status, body) = server.get(path, token).await;
    (
        status,
        body["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_compute_isolate_tenants_and_refuse_bad_input() {
    let server = TestServer::start(Backend::Sqlite).expect("SQLite server");
    let admin = server.admin_token().await;
    let platform = admin.clone();
    server
        .register(&admin, json!({"deviceId": "sensor-1", "type": "sensor"}))
        .await;
    server
        .register(&admin, json!({"deviceId": "sensor-2", "type": "sensor"}))
        .await;
    // Two days of hourly readings: temperature rising with a daily cycle, humidity following it
    // three hours later, a battery draining 0.5 % an hour.
    let hour = 3_600_000;
    let end = (Utc::now().timestamp_millis() / hour) * hour;
    let start = end - 96 * hour;
    let mut points = Vec::new();
    for i in 0..96i64 {
        let t = start + i * hour;
        let cycle = (2.0 * std::f64::consts::PI * i as f64 / 24.0).sin();
        let wobble = ((i * 7919) % 11) as f64 / 50.0;
        points.push(point(
            "default",
            "sensor-1",
            "temperature",
            t,
            20.0 + 0.05 * i as f64 + 3.0 * cycle + wobble,
        ));
        let lagged = (2.0 * std::f64::consts::PI * (i - 3) as f64 / 24.0).sin();
        points.push(point(
            "default",
            "sensor-2",
            "humidity",
            t,
            60.0 - 5.0 * lagged + wobble,
        ));
        points.push(point(
            "default",
            "sensor-1",
            "battery",
            t,
            80.0 - 0.5 * i as f64 + wobble / 5.0,
        ));
    }
    server.state.telemetry.write(points.into()).await.expect("stored");
    let range = format!("start={start}&end={end}");

    let (status, s) = server
        .get(
            &format!("/api/analytics/stats/sensor-1?metric=battery&{range}"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["count"], 96);
    assert!(
        (s["max"].as_f64().unwrap() - s["min"].as_f64().unwrap() - 47.5).abs() < 0.1,
        "{s}"
    );

    let (status, t) = server
        .get(
            &format!("/api/analytics/trend/sensor-1?metric=battery&{range}&every=1h"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["trend"], "decreasing");
    assert!((t["slopePerHour"].as_f64().unwrap() + 0.5).abs() < 0.01, "{t}");
    assert!(t["pValue"].as_f64().unwrap() < 1e-6);

    let (status, d) = server
        .get(
            &format!("/api/analytics/drift/sensor-1?metric=battery&{range}"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(
        d["drifted"], true,
        "the two halves of a draining battery differ: {d}"
    );
    assert_eq!(d["referenceCount"], 48);

    let (status, c) = server
        .get(
            &format!("/api/analytics/correlation?a=sensor-1:temperature&b=sensor-2:humidity&{range}&every=1h&maxLagSecs=21600"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["pairs"], 96);
    assert_eq!(
        c["bestLag"]["lagSecs"],
        3 * 3600,
        "humidity follows three hours later: {c}"
    );
    // The temperature's rise weakens it, but the lag explains more than none does.
    let lagged = c["bestLag"]["r"].as_f64().unwrap();
    assert!(
        lagged < -0.75 && lagged < c["pearson"]["r"].as_f64().unwrap(),
        "{c}"
    );
    assert!(c["spearman"]["pValue"].as_f64().unwrap() < 0.01);

    let (status, f) = server
        .get(
            &format!("/api/analytics/forecast/sensor-1?metric=temperature&horizon=12h&interval=1h&{range}"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{f}");
    let points = f["points"].as_array().unwrap();
    assert_eq!(points.len(), 12);
    for p in points {
        let (lo, v, hi) = (
            p["lower"].as_f64().unwrap(),
            p["value"].as_f64().unwrap(),
            p["upper"].as_f64().unwrap(),
        );
        assert!(lo <= v && v <= hi, "{p}");
        assert!(p["naive"].is_number());
    }
    assert_eq!(f["seasonSteps"], 24, "the daily cycle is found: {f}");

    // The same forecast as a picture, fetched with the bearer token like the console does.
    let response = server
        .client
        .get(server.url(&format!(
            "/api/analytics/forecast/sensor-1.svg?metric=temperature&horizon=12h&interval=1h&{range}"
        )))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/svg+xml");
    let svg = response.text().await.unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline") && svg.contains("sensor-1"),
        "{svg}"
    );

    // 80 - 0.5 h reaches 10 % 140 h after the start: 44 h after the last reading.
    let (status, m) = server
        .get(
            &format!("/api/analytics/maintenance/sensor-1?metric=battery&limit=10&direction=below&horizon=7d&interval=1h&{range}"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{m}");
    let expected = chrono::DateTime::parse_from_rfc3339(m["expectedAt"].as_str().unwrap()).unwrap();
    let hours_after = (expected.timestamp_millis() - (end - hour)) / hour;
    assert!((42..=46).contains(&hours_after), "{m}");
    let earliest = chrono::DateTime::parse_from_rfc3339(m["earliestAt"].as_str().unwrap()).unwrap();
    assert!(earliest <= expected);

    // The backtest is deterministic for a seed.
    let body = json!({"deviceId": "sensor-1", "metrics": ["temperature", "battery"], "start": start.to_string(), "end": end.to_string(), "method": "eif", "seed": 3});
    let (status, first) = server.post("/api/analytics/backtest", &admin, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["rows"], 96);
    let (_, second) = server.post("/api/analytics/backtest", &admin, body).await;
    assert_eq!(first, second);
    let (status, ens) = server
        .post(
            "/api/analytics/backtest",
            &admin,
            json!({"deviceId": "sensor-1", "metrics": ["temperature"], "start": start.to_string(), "end": end.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ens}");
    assert_eq!(ens["method"], "ensemble");

    // Another tenant sees none of it.
    let other = server.tenant_admin(&platform, "other").await;
    let paths = [
        format!("/api/analytics/stats/sensor-1?metric=battery&{range}"),
        format!("/api/analytics/trend/sensor-1?metric=battery&{range}"),
        format!("/api/analytics/drift/sensor-1?metric=battery&{range}"),
        format!("/api/analytics/forecast/sensor-1?metric=battery&{range}"),
        format!("/api/analytics/maintenance/sensor-1?metric=battery&limit=10&{range}"),
        format!("/api/analytics/correlation?a=sensor-1:temperature&b=sensor-2:humidity&{range}"),
        "/api/analytics/anomalies?device=sensor-1".to_string(),
        "/api/analytics/config/devices/sensor-1".to_string(),
        format!("/api/analytics/forecast/sensor-1.svg?metric=battery&{range}"),
        "/api/analytics/anomalies/sensor-1.svg?metric=battery".to_string(),
    ];
    for path in &paths {
        assert_eq!(
            code(&server, &other, path).await,
            (StatusCode::NOT_FOUND, "not_found".into()),
            "{path}"
        );
    }
    let (status, _) = server
        .post(
            "/api/analytics/backtest",
            &other,
            json!({"deviceId": "sensor-1", "metrics": ["battery"], "start": start.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = server
        .call(
            Method::PUT,
            "/api/analytics/config/devices/sensor-1",
            Some(&other),
            Some(json!({"threshold": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, body) = server.get("/api/analytics/config", &other).await;
    assert_eq!(body["config"], json!({}), "the other tenant's layer is its own");

    // Bad input gets a clear code.
    let bad = [
        ("/api/analytics/stats/sensor-1", "invalid_query"),
        ("/api/analytics/stats/sensor-1?metric=1bad", "invalid_metric_name"),
        (
            "/api/analytics/stats/sensor-1?metric=battery&colour=red",
            "invalid_query",
        ),
        (
            "/api/analytics/stats/sensor-1?metric=battery&start=2024-02-01&end=2024-01-01",
            "invalid_range",
        ),
        ("/api/analytics/stats/sensor-1?metric=nothing", "not_enough_data"),
        (
            "/api/analytics/stats/bad%20id?metric=battery",
            "invalid_device_id",
        ),
        (
            "/api/analytics/trend/sensor-1?metric=battery&alpha=2",
            "invalid_query",
        ),
        (
            "/api/analytics/trend/sensor-1?metric=battery&every=5x",
            "invalid_duration",
        ),
        (
            "/api/analytics/drift/sensor-1?metric=battery&threshold=0",
            "invalid_query",
        ),
        (
            "/api/analytics/forecast/sensor-1?metric=battery&horizon=1000d&interval=1s",
            "invalid_duration",
        ),
        (
            "/api/analytics/forecast/sensor-1?metric=battery&horizon=30d&interval=1m",
            "invalid_query",
        ),
        (
            "/api/analytics/maintenance/sensor-1?metric=battery",
            "invalid_query",
        ),
        (
            "/api/analytics/maintenance/sensor-1?metric=battery&limit=10&direction=sideways",
            "invalid_query",
        ),
        (
            "/api/analytics/correlation?a=sensor-1&b=sensor-2:humidity",
            "invalid_query",
        ),
        ("/api/analytics/anomalies?kind=other", "invalid_query"),
        ("/api/analytics/anomalies?limit=0", "invalid_query"),
    ];
    for (path, expected) in bad {
        let (status, got) = code(&server, &admin, path).await;
        assert_eq!(
            (status, got.as_str()),
            (StatusCode::BAD_REQUEST, expected),
            "{path}"
        );
    }
    for body in [
        json!({"window": 2}),
        json!({"methods": ["prophet"]}),
        json!({"eifThreshold": 3}),
        json!({"colour": "red"}),
    ] {
        let (status, response) = server
            .call(
                Method::PUT,
                "/api/analytics/config",
                Some(&admin),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {response}");
        assert_eq!(response["error"]["code"], "invalid_config", "{response}");
    }
    for body in [
        json!({"deviceId": "sensor-1", "metrics": [], "start": "0"}),
        json!({"deviceId": "sensor-1", "metrics": ["battery"], "start": "yesterday"}),
        json!({"deviceId": "sensor-1", "metrics": ["battery"], "start": "0", "method": "drift"}),
        json!({"deviceId": "sensor-1", "metrics": ["battery"], "start": "0", "extra": 1}),
    ] {
        let (status, response) = server.post("/api/analytics/backtest", &admin, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {response}");
        assert_eq!(response["error"]["code"], "invalid_backtest");
    }

    // Roles: a viewer reads, only an operator configures.
    let viewer = server.api_key(&admin, "viewer").await;
    let (status, _) = server.get("/api/analytics/config", &viewer).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .call(
            Method::PUT,
            "/api/analytics/config",
            Some(&viewer),
            Some(json!({"threshold": 4})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = server
        .call(
            Method::PUT,
            "/api/analytics/config",
            Some(&admin),
            Some(json!({"threshold": 4})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["effective"]["threshold"], 4.0);
    let (status, _) = server.get("/api/analytics/anomalies", "no-such-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn alarms_of(server: &TestServer, token: &str, device: &str) -> Vec<Value> {
    let (status, body) = server.get(&format!("/api/alerts?deviceId={device}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["alerts"].as_array().cloned().unwrap_or_default()
}

async fn mqtt_device(server: &TestServer, id: &str, token: &str) -> rumqttc::AsyncClient {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", server.mqtt.port());
    options.set_credentials(id, token);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 256);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_and_forecast_rules_open_alarms_from_the_live_analytics() {
    let clock = drover_actors::clock::ManualClock::new();
    let (hook_addr, mut hooks, _) = common::receiver::http_receiver(200).await;
    let server = TestServer::start_with_clock(Backend::Sqlite, clock.clone(), |c| {
        c.rules.tick_ms = 50;
        c.rules.notify_allowed_networks = vec!["127.0.0.1".into()];
    })
    .expect("SQLite server");
    let admin = server.admin_token().await;
    let pump_token = server
        .register(&admin, json!({"deviceId": "pump-7", "type": "pump"}))
        .await;
    let mut cells = Vec::new();
    for id in ["tracker-1", "tracker-2"] {
        cells.push(
            server
                .register(&admin, json!({"deviceId": id, "type": "tracker"}))
                .await,
        );
    }
    // Short windows so the test needs few messages.
    let (status, body) = server
        .call(
            Method::PUT,
            "/api/analytics/config/device-types/pump",
            Some(&admin),
            Some(json!({"window": 20, "warmUp": 20})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Bad conditions are refused with the field and what is expected.
    for (condition, field) in [
        (
            json!({"type": "anomaly", "method": "prophet"}),
            "condition.method",
        ),
        (
            json!({"type": "anomaly", "method": "eif", "threshold": 7}),
            "condition.threshold",
        ),
        (
            json!({"type": "forecast", "below": 10, "withinSecs": 3600}),
            "condition.metric",
        ),
        (
            json!({"type": "forecast", "metric": "battery", "below": 10, "above": 90, "withinSecs": 3600}),
            "condition",
        ),
        (
            json!({"type": "forecast", "metric": "battery", "below": 10, "withinSecs": 0}),
            "condition.withinSecs",
        ),
    ] {
        let (status, body) = server
            .post(
                "/api/rules",
                &admin,
                json!({"name": "bad", "condition": condition}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{condition}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().starts_with(field),
            "{condition}: {body}"
        );
    }

    let (status, odd) = server
        .post(
            "/api/rules",
            &admin,
            json!({
                "name": "Pump behaves oddly",
                "severity": "critical",
                "scope": {"type": "deviceType", "value": "pump"},
                "condition": {"type": "anomaly", "method": "zscore", "threshold": 6},
                "actions": [{"type": "webhook", "url": format!("http://{hook_addr}/odd")}],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{odd}");
    let (status, low) = server
        .post(
            "/api/rules",
            &admin,
            json!({
                "name": "Battery runs out within 3 days",
                "severity": "minor",
                "condition": {"type": "forecast", "metric": "battery", "below": 10, "withinSecs": 259200},
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{low}");
    for rule in [&odd, &low] {
        let path = format!("/api/rules/{}", rule["id"].as_str().unwrap());
        eventually(WAIT, "the rule is loaded", || async {
            server.get(&path, &admin).await.1["stats"]["status"] == "running"
        })
        .await;
    }

    // The pump over MQTT: ordinary readings open nothing, a spike opens a critical alarm and
    // notifies.
    let pump = mqtt_device(&server, "pump-7", &pump_token).await;
    let send = |temperature: f64| {
        let pump = pump.clone();
        async move {
            pump.publish(
                "devices/pump-7/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                json!({"metrics": {"temperature": temperature}}).to_string(),
            )
            .await
            .unwrap();
        }
    };
    for i in 0..40 {
        send(reading(i).0).await;
    }
    eventually(WAIT, "the ordinary readings are analysed", || async {
        server.metric("drover_analytics_messages_total").await >= 40.0
    })
    .await;
    assert!(alarms_of(&server, &admin, "pump-7").await.is_empty());
    send(45.0).await;
    eventually(WAIT, "the spike opens an anomaly alarm", || async {
        !alarms_of(&server, &admin, "pump-7").await.is_empty()
    })
    .await;
    let alarm = alarms_of(&server, &admin, "pump-7").await.remove(0);
    assert_eq!(alarm["ruleName"], "Pump behaves oddly", "{alarm}");
    assert_eq!(alarm["severity"], "critical");
    assert_eq!(alarm["active"], true);
    assert_eq!(alarm["value"], 45.0);
    assert_eq!(alarm["details"]["method"], "zscore", "{alarm}");
    assert_eq!(alarm["details"]["metric"], "temperature");
    assert!(alarm["details"]["statistic"].as_f64().unwrap() >= 6.0, "{alarm}");
    let hook = tokio::time::timeout(WAIT, hooks.recv()).await.unwrap().unwrap();
    assert_eq!(hook.path, "/odd");
    assert!(String::from_utf8_lossy(&hook.body).contains("Pump behaves oddly"));

    // Two trackers over HTTP with hourly readings up to now: one battery steady, one falling
    // 1 % an hour (53 % now: 10 % in about 43 hours). Only the falling one gets a maintenance
    // alarm, while its battery is still far above the limit.
    let now = Utc::now().timestamp_millis();
    let hour = 3_600_000;
    let history = |battery: &dyn Fn(i64) -> f64| -> Vec<Value> {
        (0..48)
            .map(|i| json!({"timestamp": now - (47 - i) * hour, "metrics": {"battery": battery(i)}}))
            .collect()
    };
    post_messages(
        &server,
        &cells[1],
        "tracker-2",
        history(&|i| 90.0 + (i % 3) as f64 * 0.1),
    )
    .await;
    eventually(WAIT, "the steady battery is forecast", || async {
        server.metric("drover_analytics_forecasts_total").await >= 1.0
    })
    .await;
    post_messages(&server, &cells[0], "tracker-1", history(&|i| 100.0 - i as f64)).await;
    eventually(WAIT, "the falling battery opens a maintenance alarm", || async {
        !alarms_of(&server, &admin, "tracker-1").await.is_empty()
    })
    .await;
    let alarm = alarms_of(&server, &admin, "tracker-1").await.remove(0);
    assert_eq!(alarm["ruleName"], "Battery runs out within 3 days", "{alarm}");
    assert_eq!(alarm["severity"], "minor");
    assert_eq!(alarm["value"], 53.0, "raised before the battery crossed: {alarm}");
    let expected = alarm["details"]["expectedInSecs"].as_i64().unwrap();
    assert!((38 * 3600..=48 * 3600).contains(&expected), "about 43 h: {alarm}");
    // The steady battery's forecast was judged before (one queue per tenant, in order).
    assert!(alarms_of(&server, &admin, "tracker-2").await.is_empty());
    assert_eq!(
        server.metric("drover_analytics_findings_dropped_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_maintenance_ranks_devices_by_time_to_the_limit() {
    let server = TestServer::start(Backend::Sqlite).expect("SQLite server");
    let admin = server.admin_token().await;
    let platform = admin.clone();
    // Batteries over the last 48 hours: one drained (already under 10 %), one falling 1.5 %
    // an hour (about 13 h left), one 0.5 % an hour (about 4 days), one 0.2 % an hour (about
    // 16 days, beyond a week), one steady; and a meter falling 1 % an hour (about 3 h left).
    let fleet: [(&str, &str, f64, f64); 6] = [
        ("tracker-a", "tracker", 100.0, 1.5),
        ("tracker-b", "tracker", 80.0, 0.5),
        ("tracker-c", "tracker", 90.0, 0.0),
        ("tracker-d", "tracker", 95.0, 0.2),
        ("tracker-e", "tracker", 8.0, 0.0),
        ("meter-1", "meter", 60.0, 1.0),
    ];
    let hour = 3_600_000;
    let now = Utc::now().timestamp_millis();
    let mut points = Vec::new();
    for (id, kind, first, drain) in fleet {
        server
            .register(&admin, json!({"deviceId": id, "type": kind}))
            .await;
        for i in 0..48i64 {
            let wobble = ((i * 7919) % 11) as f64 / 100.0;
            let mut p = point(
                "default",
                id,
                "battery",
                now - (47 - i) * hour,
                first - drain * i as f64 + wobble,
            );
            p.device_type = kind.into();
            points.push(p);
        }
    }
    server.state.telemetry.write(points.into()).await.expect("stored");

    let ranking = |query: String, token: String| {
        let server = &server;
        async move {
            let (status, body) = server
                .get(&format!("/api/analytics/maintenance?{query}"), &token)
                .await;
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
            body
        }
    };
    let ids = |body: &Value| -> Vec<String> {
        body["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["deviceId"].as_str().unwrap().to_string())
            .collect()
    };
    let body = ranking(
        "metric=battery&limit=10&within=7d&type=tracker".into(),
        admin.clone(),
    )
    .await;
    assert_eq!(ids(&body), ["tracker-e", "tracker-a", "tracker-b"], "{body}");
    assert_eq!(body["considered"], 5);
    assert_eq!(body["predicted"], 3);
    assert_eq!(body["within"], "1w");
    assert_eq!(body["next"], Value::Null);
    let devices = body["devices"].as_array().unwrap();
    assert_eq!(devices[0]["crossed"], true);
    assert_eq!(devices[0]["expectedInSecs"], 0);
    let a = devices[1]["expectedInSecs"].as_i64().unwrap();
    assert!((10 * 3600..=16 * 3600).contains(&a), "about 13 h: {body}");
    let b = devices[2]["expectedInSecs"].as_i64().unwrap();
    assert!((85 * 3600..=100 * 3600).contains(&b), "about 93 h: {body}");
    assert!(devices[1]["earliestInSecs"].as_i64().unwrap() <= a);

    // Every type, the shortest list, a shorter horizon, the other direction.
    let body = ranking("metric=battery&limit=10".into(), admin.clone()).await;
    assert_eq!(body["considered"], 6);
    assert_eq!(
        ids(&body),
        ["tracker-e", "meter-1", "tracker-a", "tracker-b"],
        "{body}"
    );
    let body = ranking("metric=battery&limit=10&top=1".into(), admin.clone()).await;
    assert_eq!(
        (ids(&body), body["predicted"].clone()),
        (vec!["tracker-e".to_string()], json!(4))
    );
    let body = ranking(
        "metric=battery&limit=10&within=1d&type=tracker".into(),
        admin.clone(),
    )
    .await;
    assert_eq!(ids(&body), ["tracker-e", "tracker-a"], "{body}");
    let body = ranking(
        "metric=battery&limit=85&direction=above&type=tracker".into(),
        admin.clone(),
    )
    .await;
    assert_eq!(ids(&body), ["tracker-c", "tracker-d"], "already above 85: {body}");
    // Paging through the devices considered: `next` continues after the last one.
    let body = ranking(
        "metric=battery&limit=10&type=tracker&after=tracker-b".into(),
        admin.clone(),
    )
    .await;
    assert_eq!(body["considered"], 3);
    assert_eq!(ids(&body), ["tracker-e"], "{body}");

    // A viewer may read it; another tenant sees none of these devices; no token, no answer.
    let viewer = server.api_key(&admin, "viewer").await;
    let body = ranking("metric=battery&limit=10".into(), viewer).await;
    assert_eq!(body["predicted"], 4);
    let other = server.tenant_admin(&platform, "other").await;
    let body = ranking("metric=battery&limit=10".into(), other).await;
    assert_eq!((body["considered"].clone(), ids(&body).len()), (json!(0), 0));
    let (status, _) = server
        .call(
            Method::GET,
            "/api/analytics/maintenance?metric=battery&limit=10",
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    for (query, expected) in [
        ("metric=battery", "invalid_query"),
        ("limit=10", "invalid_query"),
        ("metric=bad metric&limit=10", "invalid_metric_name"),
        ("metric=battery&limit=ten", "invalid_query"),
        ("metric=battery&limit=10&direction=sideways", "invalid_query"),
        ("metric=battery&limit=10&within=0", "invalid_duration"),
        ("metric=battery&limit=10&within=soon", "invalid_duration"),
        ("metric=battery&limit=10&within=300d&interval=1m", "invalid_query"),
        ("metric=battery&limit=10&top=0", "invalid_query"),
        ("metric=battery&limit=10&top=100000", "invalid_query"),
        ("metric=battery&limit=10&colour=red", "invalid_query"),
    ] {
        let path = format!("/api/analytics/maintenance?{query}");
        let (status, got) = code(&server, &admin, &path).await;
        assert_eq!(
            (status, got.as_str()),
            (StatusCode::BAD_REQUEST, expected),
            "{query}"
        );
    }
}
