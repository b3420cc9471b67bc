//! The telemetry query API over HTTP: points are written through the server's own store
//! (`state.telemetry`), read back with `GET /api/telemetry/{deviceId}` as a client would.

mod common;

use chrono::{TimeZone, Utc};
use common::{Backend, TestServer};
use drover_actors::telemetry::query::{DAY_MS, HOUR_MS};
use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A server whose maintenance does not run during the test (data in 2024 is past retention).
fn start() -> TestServer {
    TestServer::start_with(Backend::Sqlite, |c| c.telemetry.maintenance_interval_secs = 3600)
        .expect("SQLite server")
}

fn ms(y: i32, m: u32, d: u32, h: u32) -> i64 {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap().timestamp_millis()
}

fn point(tenant: &str, device: &str, metric: &str, ts_ms: i64, value: MetricValue) -> TelemetryPoint {
    TelemetryPoint {
        tenant: TenantId::parse(tenant).unwrap(),
        device: DeviceId::parse(device).unwrap(),
        device_type: "temperature".into(),
        metric: MetricName::parse(metric).unwrap(),
        ts_ms,
        value,
    }
}

async fn write(server: &TestServer, points: Vec<TelemetryPoint>) {
    server
        .state
        .telemetry
        .write(points.into())
        .await
        .expect("points stored");
}

async fn error_code(server: &TestServer, token: &str, path: &str) -> (StatusCode, String, String) {
    let (status, body) = server.get(path, token).await;
    (
        status,
        body["error"]["code"].as_str().unwrap_or_default().to_string(),
        body["error"]["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_query_and_response_shape() {
    let server = start();
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;
    let mut points = Vec::new();
    for day in 1..=30u32 {
        for hour in [0u32, 12] {
            let ts = ms(2024, 1, day, hour);
            points.push(point(
                "default",
                "sensor-001",
                "temperature",
                ts,
                MetricValue::Number(f64::from(day)),
            ));
            points.push(point(
                "default",
                "sensor-001",
                "humidity",
                ts,
                MetricValue::Number(50.0),
            ));
        }
    }
    points.push(point(
        "default",
        "sensor-001",
        "status",
        ms(2024, 1, 2, 3),
        MetricValue::Text("ok".into()),
    ));
    write(&server, points).await;

    // The product description's example, verbatim.
    let (status, body) = server
        .get(
            "/api/telemetry/sensor-001?start=2024-01-01&end=2024-01-31&metric=temperature",
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["deviceId"], "sensor-001");
    assert_eq!(body["start"], "2024-01-01T00:00:00Z");
    assert_eq!(body["end"], "2024-01-31T00:00:00Z");
    assert_eq!(body["agg"], Value::Null);
    assert_eq!(body["every"], Value::Null);
    assert_eq!(body["source"], "raw");
    let series = body["series"].as_array().unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(series[0]["metric"], "temperature");
    let points = series[0]["points"].as_array().unwrap();
    assert_eq!(points.len(), 60, "30 days x 2, end exclusive");
    assert_eq!(points[0], json!({"t": "2024-01-01T00:00:00Z", "v": 1.0}));
    assert_eq!(points[59], json!({"t": "2024-01-30T12:00:00Z", "v": 30.0}));

    // Several metrics, aggregated per day, epoch-millisecond and RFC 3339 bounds.
    let path = format!(
        "/api/telemetry/sensor-001?start={}&end=2024-01-04T00:00:00Z&metric=temperature,humidity&metric=status&agg=count&every=1d",
        ms(2024, 1, 1, 0)
    );
    let (status, body) = server.get(&path, &admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["agg"], "count");
    assert_eq!(body["every"], "1d");
    let names: Vec<&str> = body["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metric"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["temperature", "humidity", "status"]);
    assert_eq!(
        body["series"][0]["points"],
        json!([
            {"t": "2024-01-01T00:00:00Z", "v": 2.0},
            {"t": "2024-01-02T00:00:00Z", "v": 2.0},
            {"t": "2024-01-03T00:00:00Z", "v": 2.0},
        ])
    );
    assert_eq!(
        body["series"][2]["points"],
        json!([{"t": "2024-01-02T00:00:00Z", "v": 1.0}])
    );

    // Mean over the whole range (one bucket at start), and last of a string metric.
    let (_, body) = server
        .get(
            "/api/telemetry/sensor-001?start=2024-01-01&end=2024-01-11&metric=temperature&agg=mean",
            &admin,
        )
        .await;
    assert_eq!(
        body["series"][0]["points"],
        json!([{"t": "2024-01-01T00:00:00Z", "v": 5.5}])
    );
    let (_, body) = server
        .get(
            "/api/telemetry/sensor-001?start=2024-01-01&end=2024-02-01&metric=status&agg=last&every=1w",
            &admin,
        )
        .await;
    assert_eq!(body["series"][0]["points"][0]["v"], "ok");

    // A viewer may read.
    let viewer = server.api_key(&admin, "viewer").await;
    let (status, _) = server
        .get(
            "/api/telemetry/sensor-001?start=2024-01-01&end=2024-01-31&metric=temperature",
            &viewer,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // The endpoint is in the OpenAPI description.
    let (_, doc) = server.get("/api/openapi.json", &admin).await;
    assert!(doc["paths"]["/api/telemetry/{deviceId}"]["get"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_code() {
    let server = start_with_limits();
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;
    let t0 = ms(2024, 3, 1, 0);
    let points: Vec<_> = (0..200)
        .map(|i| {
            point(
                "default",
                "sensor-001",
                "temperature",
                t0 + i * 1000,
                MetricValue::Number(1.0),
            )
        })
        .collect();
    write(&server, points).await;

    let base = "/api/telemetry/sensor-001?start=2024-03-01&end=2024-03-02";
    for (query, status, code) in [
        ("", StatusCode::BAD_REQUEST, "invalid_query"),
        ("&metric=1st", StatusCode::BAD_REQUEST, "invalid_metric_name"),
        ("&metric=a%20b", StatusCode::BAD_REQUEST, "invalid_metric_name"),
        (
            "&metric=temperature&agg=median",
            StatusCode::BAD_REQUEST,
            "invalid_aggregation",
        ),
        (
            "&metric=temperature&agg=mean&every=5x",
            StatusCode::BAD_REQUEST,
            "invalid_duration",
        ),
        (
            "&metric=temperature&agg=mean&every=0s",
            StatusCode::BAD_REQUEST,
            "invalid_duration",
        ),
        (
            "&metric=temperature&every=5m",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "&metric=temperature&limit=501",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            "&metric=temperature&colour=red",
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
    ] {
        let (s, c, m) = error_code(&server, &admin, &format!("{base}{query}")).await;
        assert_eq!((s, c.as_str()), (status, code), "{query}: {m}");
    }
    for (path, code) in [
        (
            "/api/telemetry/sensor-001?start=2024-03-02&end=2024-03-01&metric=t",
            "invalid_range",
        ),
        (
            "/api/telemetry/sensor-001?start=2024-03-01&end=2024-03-01&metric=t",
            "invalid_range",
        ),
        (
            "/api/telemetry/sensor-001?start=tomorrow&metric=t",
            "invalid_query",
        ),
    ] {
        let (s, c, m) = error_code(&server, &admin, path).await;
        assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, code), "{path}: {m}");
    }

    // Too many raw points: the message says how to aggregate.
    let (s, c, m) = error_code(&server, &admin, &format!("{base}&metric=temperature")).await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::BAD_REQUEST, "too_many_points"),
        "{m}"
    );
    assert!(m.contains("agg=mean&every="), "{m}");
    assert!(m.contains("limit (up to 500)"), "{m}");
    let (status, body) = server
        .get(&format!("{base}&metric=temperature&limit=200"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["series"][0]["points"].as_array().unwrap().len(), 200);
    // Too many buckets, before the store is asked.
    let (s, c, m) = error_code(
        &server,
        &admin,
        &format!("{base}&metric=temperature&agg=mean&every=1s"),
    )
    .await;
    assert_eq!(
        (s, c.as_str()),
        (StatusCode::BAD_REQUEST, "too_many_points"),
        "{m}"
    );
    let (status, _) = server
        .get(&format!("{base}&metric=temperature&agg=mean&every=1h"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK);

    // Unknown and malformed devices; no credentials.
    let (s, c, _) = error_code(&server, &admin, "/api/telemetry/sensor-404?metric=t").await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let (s, c, _) = error_code(&server, &admin, "/api/telemetry/bad$id?metric=t").await;
    assert_eq!((s, c.as_str()), (StatusCode::BAD_REQUEST, "invalid_device_id"));
    let (status, _) = server
        .call(
            reqwest::Method::GET,
            &format!("{base}&metric=temperature"),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

fn start_with_limits() -> TestServer {
    TestServer::start_with(Backend::Sqlite, |c| {
        c.telemetry.maintenance_interval_secs = 3600;
        c.telemetry.query_default_points = 100;
        c.telemetry.query_max_points = 500;
    })
    .expect("SQLite server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let server = start();
    let platform = server.admin_token().await;
    let globex = server.tenant_admin(&platform, "globex").await;
    server
        .register(
            &platform,
            json!({"deviceId": "sensor-001", "type": "temperature"}),
        )
        .await;
    server
        .register(
            &platform,
            json!({"deviceId": "only-default", "type": "temperature"}),
        )
        .await;
    server
        .register(&globex, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;
    let t0 = ms(2024, 5, 1, 0);
    write(
        &server,
        vec![
            point(
                "default",
                "sensor-001",
                "temperature",
                t0,
                MetricValue::Number(1.0),
            ),
            point(
                "globex",
                "sensor-001",
                "temperature",
                t0,
                MetricValue::Number(99.0),
            ),
            point(
                "globex",
                "sensor-001",
                "temperature",
                t0 + 1000,
                MetricValue::Number(98.0),
            ),
            point(
                "default",
                "only-default",
                "temperature",
                t0,
                MetricValue::Number(5.0),
            ),
        ],
    )
    .await;
    let path = "/api/telemetry/sensor-001?start=2024-05-01&end=2024-05-02&metric=temperature";
    let (_, body) = server.get(path, &platform).await;
    assert_eq!(
        body["series"][0]["points"],
        json!([{"t": "2024-05-01T00:00:00Z", "v": 1.0}])
    );
    let (_, body) = server.get(path, &globex).await;
    assert_eq!(body["series"][0]["points"].as_array().unwrap().len(), 2);
    assert_eq!(body["series"][0]["points"][0]["v"], 99.0);
    // Another tenant's device does not exist for this caller.
    let (s, c, _) = error_code(
        &server,
        &globex,
        "/api/telemetry/only-default?start=2024-05-01&end=2024-05-02&metric=temperature",
    )
    .await;
    assert_eq!((s, c.as_str()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_report_the_store_and_spool() {
    let server = start();
    let admin = server.admin_token().await;
    let now = Utc::now().timestamp_millis();
    write(
        &server,
        (0..25)
            .map(|i| {
                point(
                    "default",
                    "sensor-001",
                    "t",
                    now - HOUR_MS + i,
                    MetricValue::Number(1.0),
                )
            })
            .collect(),
    )
    .await;
    let (status, health) = server.get("/health", &admin).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    let check = &health["checks"]["telemetry"];
    assert_eq!(check["status"], "up", "{health}");
    assert_eq!(check["details"]["store"], "sqlite");
    assert!(
        check["target"].as_str().unwrap().ends_with("telemetry.db"),
        "{check}"
    );
    assert_eq!(
        check["details"]["spool"],
        json!({"batches": 0, "points": 0, "bytes": 0, "setAside": 0})
    );
    assert!(server.data_dir.path().join("telemetry.db").exists());
    assert!(server.data_dir.path().join("spool").is_dir());

    let text = server.metrics_text().await;
    for line in [
        "drover_telemetry_points_written_total 25",
        "drover_telemetry_batches_written_total 1",
        "drover_telemetry_spool_batches 0",
        "drover_telemetry_spool_points 0",
        "drover_telemetry_spool_bytes 0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from /metrics");
    }
}

/// The same API on an InfluxDB-backed server (`DROVER_TEST_INFLUX_URL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influx_backed_server_answers_queries() {
    let Some(url) = common::service_url("DROVER_TEST_INFLUX_URL") else {
        return;
    };
    let db = format!("drover_t_{}", uuid::Uuid::new_v4().simple());
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.influx.url = url.clone();
        c.influx.db = db.clone();
    })
    .expect("server");
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "temperature"}))
        .await;
    let now = Utc::now().timestamp_millis();
    let t0 = (now - DAY_MS).div_euclid(HOUR_MS) * HOUR_MS;
    write(
        &server,
        (0..60)
            .map(|i| {
                point(
                    "default",
                    "sensor-001",
                    "temperature",
                    t0 + i * 60_000,
                    MetricValue::Number(i as f64),
                )
            })
            .collect(),
    )
    .await;
    let path = format!(
        "/api/telemetry/sensor-001?start={t0}&end={}&metric=temperature&agg=max&every=30m",
        t0 + HOUR_MS
    );
    let (status, body) = server.get(&path, &admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let points = body["series"][0]["points"].as_array().unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| p["v"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        [29.0, 59.0]
    );
    let (_, health) = server.get("/health", &admin).await;
    assert_eq!(health["checks"]["telemetry"]["details"]["store"], "influxdb");
    assert_eq!(health["checks"]["telemetry"]["status"], "up");
    drop(server);
    let _ = reqwest::Client::new()
        .post(format!("{}/query", url.trim_end_matches('/')))
        .form(&[("q", format!("DROP DATABASE \"{db}\""))])
        .send()
        .await;
}
