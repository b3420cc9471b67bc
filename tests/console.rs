//! The web console: how the binary serves it (page, fingerprinted files, CSP, gzip, caching),
//! the APIs its pages use (live sessions as actors in the actor tree, tenant switching for
//! platform admins, busiest devices, a device's audit entries, channel tests), then the console
//! itself in a real browser, headless Chromium driven by Selenium
//! (tests/support/console_probe.py), against one server filled here over the API.
//!
//! The browser part needs Debian's `chromium` and `chromium-driver`, Python's `selenium` and
//! `mosquitto-clients`; without them it is skipped with a notice, or fails when
//! `DROVER_REQUIRE_SERVICES=1`. Screenshots go to `target/console-screenshots/`.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mosquitto::mosquitto;
use common::receiver::http_receiver;
use common::ws::{next_json, request};
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

const WAIT: Duration = Duration::from_secs(5);

/// A `/ws` session as a browser opens it (`?token=`, and `?tenant=` for a platform admin).
async fn live_socket(
    server: &TestServer,
    token: &str,
    tenant: Option<&str>,
) -> Result<common::ws::Socket, StatusCode> {
    let tenant = tenant.map(|t| format!("&tenant={t}")).unwrap_or_default();
    match tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}{tenant}", server.addr)).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status()),
        Err(other) => panic!("the live stream did not answer: {other}"),
    }
}

/// Sends one HTTP telemetry message of `device` (answered once stored).
async fn send_reading(server: &TestServer, device: &str, token: &str, value: f64) {
    let (status, body) = server
        .post(
            &format!("/api/devices/{device}/telemetry"),
            token,
            json!({"metrics": {"pressure": value}}),
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
}

/// GET with `X-Tenant-Id`.
async fn get_in_tenant(server: &TestServer, path: &str, token: &str, tenant: &str) -> (StatusCode, Value) {
    let response = server
        .client
        .get(server.url(path))
        .bearer_auth(token)
        .header("X-Tenant-Id", tenant)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Platform admins act in any tenant over REST and the live stream; a tenant's own admin can
/// name no other tenant on either.
async fn tenant_switching(server: &TestServer, admin: &str) {
    let other = server.tenant_admin(admin, "other").await;
    server
        .register(&other, json!({"deviceId": "o-1", "type": "pump"}))
        .await;

    let (status, devices) = get_in_tenant(server, "/api/devices", admin, "other").await;
    assert_eq!(status, StatusCode::OK, "{devices}");
    let ids: Vec<&str> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o-1"]);
    let (status, me) = get_in_tenant(server, "/api/auth/me", admin, "other").await;
    assert_eq!((status, me["tenant"].as_str()), (StatusCode::OK, Some("other")));

    // The live stream of the named tenant: its devices, and only its devices.
    let mut socket = live_socket(server, admin, Some("other")).await.unwrap();
    let hello = next_json(&mut socket, WAIT).await;
    assert_eq!(hello, json!({"type": "hello", "tenant": "other"}));
    let answer = request(&mut socket, r#"{"type":"subscribe","devices":["o-1"]}"#, WAIT).await;
    assert_eq!(answer["devices"], json!(["o-1"]), "{answer}");
    let answer = request(&mut socket, r#"{"type":"subscribe","devices":["pump-1"]}"#, WAIT).await;
    assert_eq!(answer["code"], "unknown_device", "{answer}");
    let _ = socket.close(None).await;
    // An unknown tenant is a 404, not the caller's own tenant.
    assert_eq!(
        live_socket(server, admin, Some("nope")).await.err(),
        Some(StatusCode::NOT_FOUND)
    );

    // A tenant admin naming another tenant: refused on both.
    let (status, body) = get_in_tenant(server, "/api/devices", &other, "default").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        live_socket(server, &other, Some("default")).await.err(),
        Some(StatusCode::FORBIDDEN)
    );
    let (status, _) = server.get("/api/tenants", &other).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Each `/ws` client is an actor listed by `/admin/actors` with every other kind of actor, and
/// it is gone from the list once its socket closes.
async fn live_sessions_in_the_actor_tree(server: &TestServer, admin: &str, device_token: &str) {
    let mut socket = live_socket(server, admin, None).await.unwrap();
    next_json(&mut socket, WAIT).await;
    request(&mut socket, r#"{"type":"subscribe","devices":["pump-1"]}"#, WAIT).await;
    send_reading(server, "pump-1", device_token, 1.5).await;
    let frame = next_json(&mut socket, WAIT).await;
    assert_eq!(frame["type"], "telemetry", "{frame}");

    let (status, tree) = server.get("/admin/actors", admin).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    let sessions = tree["sessions"].as_array().expect("sessions");
    let mine: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["tenant"] == "default" && s["subscriptions"]["devices"] == 1)
        .collect();
    assert_eq!(mine.len(), 1, "{tree}");
    let session = mine[0].clone();
    assert_eq!(session["principal"], "user:admin");
    assert_eq!(session["subscriptions"]["all"], false);
    // hello, subscribed, telemetry
    assert!(session["framesSent"].as_u64().unwrap() >= 3, "{session}");
    assert_eq!(session["framesSkipped"], 0);
    assert_eq!(session["requestsHandled"], 1);
    assert!(
        session["ageSeconds"].is_u64() && session["startedAt"].is_string(),
        "{session}"
    );
    // Every kind of actor the platform runs.
    assert!(
        tree["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["tenant"] == "default"),
        "{tree}"
    );
    assert!(!tree["writers"].as_array().unwrap().is_empty());
    assert!(tree["replayer"]["intervalMs"].is_u64(), "{tree}");
    assert!(tree["downsampler"]["intervalSecs"].is_u64(), "{tree}");
    assert!(tree["alarmService"]["mailboxCapacity"].is_u64(), "{tree}");
    assert!(
        tree["rules"]["workers"]["threads"].as_u64().unwrap() >= 1,
        "{tree}"
    );
    let rule_actors = tree["rules"]["router"]["ruleActors"]
        .as_array()
        .expect("rule actors");
    let rules_of_default = rule_actors
        .iter()
        .find(|r| r["tenant"] == "default")
        .expect("the default tenant's rule actor (it has telemetry)");
    assert!(
        rules_of_default["messagesHandled"].as_u64().unwrap() >= 1,
        "{rules_of_default}"
    );

    // Stopped with its socket.
    let id = session["id"].clone();
    let _ = socket.close(None).await;
    eventually(WAIT, "the session actor gone with its socket", || {
        let id = id.clone();
        async move {
            let (_, tree) = server.get("/admin/actors", admin).await;
            tree["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["id"] != id))
        }
    })
    .await;
}

/// The overview's ranking: the devices that sent most since the previous sample, first.
async fn busiest_devices(server: &TestServer, admin: &str, pump_token: &str, fan_token: &str) {
    for bad in ["0", "101", "ten"] {
        let (status, body) = server
            .get(&format!("/stats/busiest-devices?limit={bad}"), admin)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query");
    }
    // A first sample, then traffic, then the ranking of the window that holds it.
    let (status, _) = server.get("/stats/busiest-devices", admin).await;
    assert_eq!(status, StatusCode::OK);
    for i in 0..5 {
        send_reading(server, "pump-1", pump_token, i as f64).await;
    }
    for i in 0..2 {
        send_reading(server, "fan-1", fan_token, i as f64).await;
    }
    eventually(
        Duration::from_secs(10),
        "pump-1 then fan-1 ranked",
        || async move {
            let (_, ranking) = server.get("/stats/busiest-devices?limit=5", admin).await;
            let ranked: Vec<(String, u64)> = ranking["devices"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .map(|d| {
                            (
                                d["deviceId"].as_str().unwrap().to_string(),
                                d["messages"].as_u64().unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            ranked == [("pump-1".to_string(), 5), ("fan-1".to_string(), 2)]
                && ranking["windowSeconds"].as_f64().is_some_and(|w| w > 0.0)
        },
    )
    .await;
    // Another tenant ranks only its own devices.
    let (status, ranking) = get_in_tenant(server, "/stats/busiest-devices", admin, "other").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        ranking["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["deviceId"] == "o-1"),
        "{ranking}"
    );
}

/// A device page reads the device's audit entries with `target=`.
async fn device_audit(server: &TestServer, admin: &str) {
    let (status, audit) = server.get("/api/audit?target=pump-1&limit=50", admin).await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["target"] == "pump-1"), "{audit}");
    assert!(
        entries.iter().any(|e| e["action"] == "device.register"),
        "{audit}"
    );
    // The other tenant's entries about its device are not this tenant's.
    let (_, audit) = server.get("/api/audit?target=o-1", admin).await;
    assert_eq!(audit["entries"], json!([]), "{audit}");
}

/// A channel test sends one real notification and says how it went.
async fn channel_test(server: &TestServer, admin: &str, operator: &str) {
    let (addr, mut received, _) = http_receiver(200).await;
    let (status, channel) = server
        .post(
            "/api/channels",
            admin,
            json!({"name": "ops-hook", "type": "webhook", "url": format!("http://{addr}/hook")}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{channel}");
    let (status, answer) = server
        .post("/api/channels/ops-hook/test", admin, json!(null))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["delivered"], true, "{answer}");
    let hit = tokio::time::timeout(WAIT, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hit.path, "/hook");
    let body: Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(body["event"], "channel.test", "{body}");

    let (failing, _, _) = http_receiver(500).await;
    let (status, _) = server
        .patch(
            "/api/channels/ops-hook",
            admin,
            json!({"name": "ops-hook", "type": "webhook", "url": format!("http://{failing}/hook")}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, answer) = server
        .post("/api/channels/ops-hook/test", admin, json!(null))
        .await;
    assert_eq!(answer["delivered"], false, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("500"), "{answer}");

    let (status, _) = server
        .post("/api/channels/ops-hook/test", operator, json!(null))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = server
        .post("/api/channels/nothing/test", admin, json!(null))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = server.delete("/api/channels/ops-hook", admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_is_served_and_works_in_a_browser() {
    // Channel tests post to a receiver on loopback.
    let mut server = TestServer::start_with(Backend::Sqlite, |config| {
        config.rules.notify_allowed_networks = vec!["127.0.0.0/8".into()];
    })
    .unwrap();

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

    // A fleet of two devices, a rule that opens an alarm, a viewer.
    let admin = server.admin_token().await;
    let token = server
        .register(
            &admin,
            json!({"deviceId": "pump-1", "type": "pump", "tags": ["south"], "metadata": {"site": "plant-a"}}),
        )
        .await;
    let fan_token = server
        .register(
            &admin,
            json!({"deviceId": "fan-1", "type": "fan", "tags": ["north"]}),
        )
        .await;
    let operator = server.api_key(&admin, "operator").await;

    // What the pages read besides the resources every client reads.
    tenant_switching(&server, &admin).await;
    live_sessions_in_the_actor_tree(&server, &admin, &token).await;
    busiest_devices(&server, &admin, &token, &fan_token).await;
    device_audit(&server, &admin).await;
    channel_test(&server, &admin, &operator).await;

    if !browser_available() || !mosquitto() {
        return;
    }
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

    // A webhook receiver for the channel the console creates and tests.
    let (hook, _hook_requests, hook_hits) = http_receiver(200).await;
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
        "otherTenant": "other",
        "otherTenantDevice": "o-1",
        "hookUrl": format!("http://{hook}/console-hook"),
        "mqttPort": server.mqtt.port(),
        "screenshots": screenshots,
    });
    let probe = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/console_probe.py");
    // The probe asks for the server to be stopped and started again (on the same ports) by
    // printing a step line; it is told on its standard input when that is done.
    let mut child = Command::new("python3")
        .arg(probe)
        .arg(settings.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let mut steps = child.stdin.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    while let Some(line) = lines.recv().await {
        eprintln!("{line}");
        let step: Option<Value> = serde_json::from_str(&line).ok();
        match step.as_ref().and_then(|s| s["step"].as_str()) {
            Some("stop-server") => {
                tokio::task::block_in_place(|| server.pause());
                writeln!(steps, "stopped").and_then(|_| steps.flush()).unwrap();
            }
            Some("start-server") => {
                tokio::task::block_in_place(|| server.resume_on_same_ports());
                writeln!(steps, "started").and_then(|_| steps.flush()).unwrap();
            }
            _ => printed.push(line),
        }
    }
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    assert!(
        status.success(),
        "the browser test failed (screenshots in {screenshots})"
    );
    assert!(
        hook_hits.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the channel test from the console reached the webhook"
    );

    // What the console did is what the API says: the alarm it acknowledged is acknowledged.
    let result: Value = printed
        .iter()
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
