//! The web console: how the binary serves it (page, fingerprinted files, CSP, gzip, caching),
//! then the console itself in a real browser, headless Chromium driven by Selenium
//! (tests/support/console_probe.py), against one server filled here over the API.
//!
//! The browser part needs Debian's `chromium` and `chromium-driver`, Python's `selenium` and
//! `mosquitto-clients`; without them it is skipped with a notice, or fails when
//! `DROVER_REQUIRE_SERVICES=1`. Screenshots go to `target/console-screenshots/`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::mosquitto::mosquitto;
use common::{ADMIN_PASSWORD, Backend, TestServer, eventually, services_required};
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, IF_NONE_MATCH,
};
use serde_json::{Value, json};

/// Chromium, its WebDriver and Python's Selenium, or a notice (a failure when services are
/// required) naming what is missing.
fn browser_available() -> bool {
    let found = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = [
        (
            found("chromium", &["--version"]),
            "chromium (apt-get install chromium)",
        ),
        (
            found("chromedriver", &["--version"]),
            "chromedriver (apt-get install chromium-driver)",
        ),
        (
            found("python3", &["-c", "import selenium"]),
            "python3 with selenium (pip install selenium)",
        ),
    ]
    .into_iter()
    .filter(|(ok, _)| !ok)
    .map(|(_, what)| what)
    .collect();
    if missing.is_empty() {
        return true;
    }
    if services_required() {
        panic!(
            "{} not available but DROVER_REQUIRE_SERVICES=1",
            missing.join(", ")
        );
    }
    eprintln!("skipped: browser tests need {}", missing.join(", "));
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_is_served_and_works_in_a_browser() {
    let server = TestServer::start(Backend::Sqlite).unwrap();

    // The page: never cached without revalidation, strict CSP, gzipped, pointing at this build.
    let page = server
        .client
        .get(server.url("/"))
        .header(ACCEPT_ENCODING, "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    assert_eq!(headers[CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(headers[CACHE_CONTROL], "no-cache");
    assert_eq!(headers[CONTENT_ENCODING], "gzip");
    let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self';"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    // This client does not decompress: read the page again without gzip.
    let html = server
        .client
        .get(server.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let start = html.find("/console/").expect("assets under /console/{build}/") + "/console/".len();
    let build = &html[start..start + 16];
    assert!(build.chars().all(|c| c.is_ascii_hexdigit()), "{build}");
    assert!(
        !html.contains("<script>") && !html.contains(" style="),
        "nothing inline: {html}"
    );

    // A reload of an unchanged build is answered 304 without the page.
    let again = server
        .client
        .get(server.url("/"))
        .header(IF_NONE_MATCH, format!("\"{build}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    // Fingerprinted files: cached for a year; another build's prefix is not served.
    let module = server
        .client
        .get(server.url(&format!("/console/{build}/app.js")))
        .send()
        .await
        .unwrap();
    assert_eq!(module.status(), StatusCode::OK);
    assert_eq!(module.headers()[CONTENT_TYPE], "text/javascript; charset=utf-8");
    assert_eq!(
        module.headers()[CACHE_CONTROL],
        "public, max-age=31536000, immutable"
    );
    for stale in [
        "/console/0000000000000000/app.js".to_string(),
        format!("/console/{build}/vendor/refresh.sh"),
        format!("/console/{build}/../console.rs"),
    ] {
        let (status, body) = server.call(reqwest::Method::GET, &stale, None, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{stale}");
        assert_eq!(body["error"]["code"], "not_found", "{stale}: {body}");
    }
    // The JSON index moved to /api for programs.
    let (status, index) = server.call(reqwest::Method::GET, "/api", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(index["api"], "/api/openapi.json");
    assert_eq!(index["console"], "/");

    if !browser_available() || !mosquitto() {
        return;
    }

    // A fleet of two devices, a rule that opens an alarm, a viewer.
    let admin = server.admin_token().await;
    let token = server
        .register(
            &admin,
            json!({"deviceId": "pump-1", "type": "pump", "tags": ["south"], "metadata": {"site": "plant-a"}}),
        )
        .await;
    server
        .register(
            &admin,
            json!({"deviceId": "fan-1", "type": "fan", "tags": ["north"]}),
        )
        .await;
    let (status, rule) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "High pressure", "severity": "major", "metric": "pressure", "condition": "pressure > 10"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    let (status, viewer) = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "watcher", "password": "watcher-password-1", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{viewer}");

    let screenshots = concat!(env!("CARGO_MANIFEST_DIR"), "/target/console-screenshots");
    let settings = json!({
        "base": server.base,
        "admin": "admin",
        "adminPassword": ADMIN_PASSWORD,
        "viewer": "watcher",
        "viewerPassword": "watcher-password-1",
        "device": "pump-1",
        "deviceType": "pump",
        "deviceToken": token,
        "otherDevice": "fan-1",
        "otherTag": "north",
        "mqttPort": server.mqtt.port(),
        "screenshots": screenshots,
    });
    let probe = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/console_probe.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(probe)
            .arg(settings.to_string())
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "the browser test failed (screenshots in {screenshots})"
    );

    // What the console did is what the API says: the alarm it acknowledged is acknowledged.
    let result: Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .expect("the probe's result line");
    let alarm = result["alarm"].as_str().expect("an alarm id").to_string();
    eventually(Duration::from_secs(5), "the acknowledgement over the API", || {
        let server = &server;
        let admin = admin.clone();
        let alarm = alarm.clone();
        async move {
            let (status, body) = server.get(&format!("/api/alerts/{alarm}"), &admin).await;
            status == StatusCode::OK && body["status"] == "ACTIVE_ACK"
        }
    })
    .await;
    // The rule edited (after a refused expression) and disabled in the console.
    let rule_id = rule["id"].as_str().unwrap();
    let (status, now) = server.get(&format!("/api/rules/{rule_id}"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(now["rule"]["enabled"], false, "{now}");
    assert_eq!(now["rule"]["condition"], "pressure > 20", "{now}");
    // The API key created and revoked in the console.
    let (_, keys) = server.get("/api/keys", &admin).await;
    let key = keys["apiKeys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "console-key")
        .expect("the key created in the console");
    assert_eq!(key["status"], "revoked", "{key}");
    // Tags replaced and metadata merged from the edit dialog.
    let (_, device) = server.get("/api/devices/pump-1", &admin).await;
    assert_eq!(device["tags"], json!(["line-2", "south"]), "{device}");
    assert_eq!(device["metadata"], json!({"floor": 3}), "{device}");
    // The desired state saved in the shadow editor (the conflicting edit changed nothing).
    let (status, shadow) = server.get("/api/devices/pump-1/shadow", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        shadow["state"]["desired"],
        json!({"led": "on", "fan": 2}),
        "{shadow}"
    );
    assert_eq!(shadow["version"], 2, "{shadow}");
}
