//! The rules engine end to end: telemetry published over MQTT raises alarms that notify real
//! receivers started here (an HTTP webhook checking the HMAC signature, Python's aiosmtpd, an
//! SMS gateway endpoint, a receiver that is down), escalate on a schedule driven by a
//! `ManualClock`, stop escalating when acknowledged, and clear themselves.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::receiver::http_receiver;
use common::{Backend, TestServer, eventually, services_required};
use drover_actors::clock::ManualClock;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

/// Python's aiosmtpd on a free port; each received message is a line `MAIL <from> <to,…> <subject>`.
struct SmtpServer {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SMTP_SCRIPT: &str = r#"
import sys, time
from aiosmtpd.controller import Controller
class Handler:
    async def handle_DATA(self, server, session, envelope):
        subject = ""
        for line in envelope.content.decode("utf8", "replace").splitlines():
            if line.lower().startswith("subject:"):
                subject = line[8:].strip()
        print("MAIL", envelope.mail_from, ",".join(envelope.rcpt_tos), subject, flush=True)
        return "250 OK"
controller = Controller(Handler(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("READY", flush=True)
while True:
    time.sleep(1)
"#;

fn smtp_server() -> Option<SmtpServer> {
    let importable = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        if services_required() {
            panic!(
                "python3 with aiosmtpd is not available (pip install aiosmtpd) but DROVER_REQUIRE_SERVICES=1"
            );
        }
        eprintln!("skipped: email delivery, python3 with aiosmtpd is not available (pip install aiosmtpd)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("python3")
        .args(["-c", SMTP_SCRIPT, &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let ready = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("aiosmtpd started");
    assert_eq!(ready, "READY");
    Some(SmtpServer { child, port, lines })
}

fn hmac_hex(key: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

async fn device_client(server: &TestServer, id: &str, token: &str) -> rumqttc::AsyncClient {
    let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", server.mqtt.port());
    options.set_credentials(id, token);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    client
}

async fn publish(client: &rumqttc::AsyncClient, id: &str, temperature: f64) {
    client
        .publish(
            format!("devices/{id}/telemetry"),
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({"metrics": {"temperature": temperature}}).to_string(),
        )
        .await
        .unwrap();
}

async fn alert_of(server: &TestServer, token: &str, device: &str) -> Option<Value> {
    let (status, body) = server.get(&format!("/api/alerts?deviceId={device}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["alerts"].as_array().and_then(|a| a.first().cloned())
}

async fn detail(server: &TestServer, token: &str, id: &str) -> Value {
    let (status, body) = server.get(&format!("/api/alerts/{id}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn alarms_flow(backend: Backend) {
    let clock = ManualClock::new();
    let smtp = smtp_server();
    let smtp_port = smtp.as_ref().map(|s| s.port);
    let (hook_addr, mut hooks, _) = http_receiver(200).await;
    let (down_addr, _down, down_hits) = http_receiver(503).await;
    let (sms_addr, mut sms, _) = http_receiver(201).await;
    let Some(server) = TestServer::start_with_clock(backend, clock.clone(), |c| {
        c.rules.tick_ms = 50;
        c.rules.retry_backoff_ms = 20;
        c.rules.delivery_attempts = 3;
        c.rules.http_timeout_ms = 3000;
        // The receivers are on loopback, which webhooks may only reach when allowed.
        c.rules.notify_allowed_networks = vec!["127.0.0.1".into()];
        // Without aiosmtpd email goes to a port nobody listens on: an email channel needs an
        // SMTP server configured to be accepted at all.
        c.smtp.host = "127.0.0.1".into();
        c.smtp.port = smtp_port.unwrap_or(9);
        c.smtp.tls = "none".into();
        c.smtp.from = "drover@example.com".into();
        c.sms.base_url = format!("http://{sms_addr}");
    }) else {
        return;
    };
    let admin = server.admin_token().await;
    let t1 = server
        .register(&admin, json!({"deviceId": "therm-1", "type": "thermo"}))
        .await;
    let t2 = server
        .register(&admin, json!({"deviceId": "therm-2", "type": "thermo"}))
        .await;

    // Channels: secrets go in, never come out.
    for channel in [
        json!({"name": "ops-hook", "type": "webhook", "url": format!("http://{hook_addr}/hook"), "secret": "hook-key"}),
        json!({"name": "down-hook", "type": "webhook", "url": format!("http://{down_addr}/down")}),
        json!({"name": "ops-mail", "type": "email", "to": ["ops@example.com"]}),
        json!({"name": "ops-sms", "type": "sms", "to": ["+15550001"], "accountSid": "AC123", "from": "+15559999", "secret": "sms-token"}),
    ] {
        let (status, body) = server.post("/api/channels", &admin, channel).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, channels) = server.get("/api/channels", &admin).await;
    assert!(!channels.to_string().contains("hook-key"));
    assert!(!channels.to_string().contains("sms-token"));
    assert_eq!(channels["channels"][1]["secretSet"], json!(true), "{channels}");

    // Bad rules are refused with a clear error; nothing is stored.
    for (condition, expected) in [
        ("temperature >", "line 1"),
        ("loop { }\ntrue", "limit"),
        ("let s = \"xxxxxxxx\"; loop { s += s; }", "limit"),
    ] {
        let (status, body) = server
            .post(
                "/api/rules",
                &admin,
                json!({"name": "bad", "condition": condition}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{condition}: {body}");
        assert_eq!(body["error"]["code"], "invalid_expression");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
    }

    let (status, hot) = server
        .post(
            "/api/rules",
            &admin,
            json!({
                "name": "Hot",
                "severity": "major",
                "metric": "temperature",
                "condition": "if temperature > 50 { \"critical\" } else { temperature > 30 }",
                "clear": "temperature < 25",
                "actions": [{"type": "webhook", "channel": "ops-hook"}, {"type": "webhook", "channel": "down-hook"}],
                "escalation": [
                    {"afterSecs": 300, "actions": [{"type": "email", "channel": "ops-mail"}]},
                    {"afterSecs": 900, "actions": [{"type": "sms", "channel": "ops-sms"}]}
                ]
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hot}");
    let hot_id = hot["id"].as_str().unwrap().to_string();
    // A loop that only runs on extreme data passes the dry run and is stopped at run time.
    let (status, trap) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Trap", "condition": "if temperature > 1000 { loop { } } false"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{trap}");
    let trap_id = trap["id"].as_str().unwrap().to_string();

    // The live stream.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={admin}", server.addr))
        .await
        .expect("websocket");
    let hello = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(hello.contains("\"type\":\"hello\""), "{hello}");

    let d1 = device_client(&server, "therm-1", &t1).await;
    let d2 = device_client(&server, "therm-2", &t2).await;
    publish(&d1, "therm-1", 31.0).await;
    publish(&d2, "therm-2", 32.0).await;

    // Created, and announced on the live stream.
    eventually(WAIT, "alarm of therm-1", || async {
        alert_of(&server, &admin, "therm-1").await.is_some()
    })
    .await;
    let a1 = alert_of(&server, &admin, "therm-1").await.unwrap();
    assert_eq!(a1["status"], "ACTIVE_UNACK");
    assert_eq!(a1["severity"], "major");
    assert_eq!(a1["count"], 1);
    let a1_id = a1["id"].as_str().unwrap().to_string();
    let opened = tokio::time::timeout(WAIT, async {
        loop {
            let text = ws.next().await.unwrap().unwrap().into_text().unwrap().to_string();
            if text.contains("\"event\":\"opened\"") {
                return text;
            }
        }
    })
    .await
    .expect("an opened event on the live stream");
    assert!(opened.contains("therm-"), "{opened}");

    // The webhook is signed; one per alarm.
    for _ in 0..2 {
        let got = tokio::time::timeout(WAIT, hooks.recv()).await.unwrap().unwrap();
        assert_eq!(got.path, "/hook");
        let signature = got.headers.get("x-drover-signature").expect("signature header");
        assert_eq!(signature, &format!("sha256={}", hmac_hex("hook-key", &got.body)));
        let payload: Value = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(payload["event"], "alarm.opened");
        assert_eq!(payload["alarm"]["ruleName"], "Hot");
    }

    // Repeats update the alarm, they do not notify again; the severity rises.
    publish(&d1, "therm-1", 35.0).await;
    publish(&d1, "therm-1", 55.0).await;
    eventually(WAIT, "count 3", || async {
        alert_of(&server, &admin, "therm-1").await.unwrap()["count"] == 3
    })
    .await;
    let a1 = alert_of(&server, &admin, "therm-1").await.unwrap();
    assert_eq!(a1["severity"], "critical");
    assert_eq!(a1["id"], a1_id.as_str(), "the same alarm");
    let (_, all) = server.get("/api/alerts?active=true", &admin).await;
    assert_eq!(all["alerts"].as_array().unwrap().len(), 2, "{all}");

    // The receiver that is down was retried, and the failure is recorded.
    eventually(WAIT, "failed delivery recorded", || async {
        let d = detail(&server, &admin, &a1_id).await;
        d["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["channel"] == "down-hook" && x["outcome"] == "failed")
    })
    .await;
    let d = detail(&server, &admin, &a1_id).await;
    let down = d["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["channel"] == "down-hook")
        .unwrap()
        .clone();
    assert_eq!(down["attempts"], 3, "{d}");
    assert!(down["detail"].as_str().unwrap().contains("503"), "{down}");
    let ok = d["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["channel"] == "ops-hook")
        .unwrap()
        .clone();
    assert_eq!(ok["outcome"], "delivered");
    assert!(down_hits.load(Ordering::SeqCst) >= 3);
    assert!(hooks.try_recv().is_err(), "no second webhook for repeats");

    // Escalation on schedule: nothing before 300 s; email at 300 s.
    clock.advance_ms(299_000);
    assert_eq!(detail(&server, &admin, &a1_id).await["escalationStep"], 0);
    clock.advance_ms(2_000);
    eventually(WAIT, "escalation step 1", || async {
        detail(&server, &admin, &a1_id).await["escalationStep"] == 1
    })
    .await;
    if let Some(smtp) = &smtp {
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(smtp.lines.recv_timeout(WAIT).expect("escalation email received"));
        }
        for line in &got {
            assert!(
                line.starts_with("MAIL drover@example.com ops@example.com"),
                "{line}"
            );
        }
        assert!(
            got.iter().any(|l| l.contains("CRITICAL: Hot on therm-1")),
            "{got:?}"
        );
        eventually(WAIT, "email delivery recorded", || async {
            let d = detail(&server, &admin, &a1_id).await;
            d["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["kind"] == "email" && x["outcome"] == "delivered" && x["step"] == 1)
        })
        .await;
    }

    // Acknowledging stops therm-1's escalation; therm-2's goes on to SMS at 900 s.
    let (status, acked) = server
        .post(&format!("/api/alerts/{a1_id}/ack"), &admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{acked}");
    assert_eq!(acked["status"], "ACTIVE_ACK");
    assert_eq!(acked["nextEscalationAt"], Value::Null);
    clock.advance_ms(600_000);
    let got = tokio::time::timeout(WAIT, sms.recv())
        .await
        .expect("SMS sent")
        .unwrap();
    assert_eq!(got.path, "/2010-04-01/Accounts/AC123/Messages.json");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("AC123:sms-token");
    assert_eq!(got.headers.get("authorization"), Some(&format!("Basic {basic}")));
    let form = String::from_utf8(got.body).unwrap();
    assert!(
        form.contains("To=%2B15550001") && form.contains("From=%2B15559999"),
        "{form}"
    );
    assert!(form.contains("therm-2"), "the SMS is about therm-2 only: {form}");
    // therm-1's SMS would have been sent on the same pass.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sms.try_recv().is_err(), "the acknowledged alarm did not escalate");
    assert_eq!(detail(&server, &admin, &a1_id).await["escalationStep"], 1);

    // A rule that hits a limit at run time is stopped; the others keep evaluating.
    publish(&d2, "therm-2", 2000.0).await;
    eventually(WAIT, "trap stopped", || async {
        let (_, r) = server.get(&format!("/api/rules/{trap_id}"), &admin).await;
        r["stats"]["status"] == "stopped"
    })
    .await;
    let (_, r) = server.get(&format!("/api/rules/{trap_id}"), &admin).await;
    assert!(r["stats"]["lastError"].as_str().unwrap().contains("limit"), "{r}");
    eventually(WAIT, "therm-2 updated by Hot", || async {
        alert_of(&server, &admin, "therm-2").await.unwrap()["count"] == 2
    })
    .await;
    let (_, r) = server.get(&format!("/api/rules/{hot_id}"), &admin).await;
    assert_eq!(r["stats"]["status"], "running");
    assert!(r["stats"]["evaluations"].as_u64().unwrap() >= 5, "{r}");

    // Comments, then auto-clear when the clear condition holds.
    let (status, _) = server
        .post(
            &format!("/api/alerts/{a1_id}/comments"),
            &admin,
            json!({"text": "fan replaced"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    publish(&d1, "therm-1", 20.0).await;
    eventually(WAIT, "therm-1 cleared", || async {
        alert_of(&server, &admin, "therm-1").await.unwrap()["status"] == "CLEARED_ACK"
    })
    .await;
    let d = detail(&server, &admin, &a1_id).await;
    let kinds: Vec<&str> = d["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "severity",
            "escalated",
            "acknowledged",
            "comment",
            "cleared"
        ],
        "{d}"
    );

    // An operator clears therm-2's; a new breach opens a new alarm.
    let a2 = alert_of(&server, &admin, "therm-2").await.unwrap();
    let (status, cleared) = server
        .post(
            &format!("/api/alerts/{}/clear", a2["id"].as_str().unwrap()),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cleared["status"], "CLEARED_UNACK");
    publish(&d2, "therm-2", 40.0).await;
    eventually(WAIT, "a new alarm for therm-2", || async {
        let (_, l) = server.get("/api/alerts?deviceId=therm-2", &admin).await;
        l["alerts"].as_array().unwrap().len() == 2
    })
    .await;

    // Failures are counted for operators.
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"drover_rule_notifications_total{kind="webhook",outcome="failed"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"drover_rule_delivery_attempt_failures_total{kind="webhook"}"#));
    assert!(metrics.contains("drover_rules_stopped 1"));
    let (_, audit) = server.get("/api/audit?action=alert.ack", &admin).await;
    assert!(audit.to_string().contains(&a1_id), "{audit}");
}

/// Alarms and escalation due times are in the registry: a restart loses neither.
async fn alarms_and_escalation_survive_a_restart(backend: Backend) {
    let clock = ManualClock::new();
    let (hook_addr, mut hooks, _) = http_receiver(200).await;
    let Some(mut server) = TestServer::start_with_clock(backend, clock.clone(), |c| {
        c.rules.tick_ms = 50;
        c.rules.notify_allowed_networks = vec!["127.0.0.1".into()];
    }) else {
        return;
    };
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "pump-1", "type": "pump"}))
        .await;
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Pressure", "condition": {"type": "repeating", "expression": "pressure > 8", "count": 2, "withinSecs": 60},
                   "escalation": [{"afterSecs": 600, "actions": [{"type": "webhook", "url": format!("http://{hook_addr}/late")}]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let device = device_client(&server, "pump-1", &token).await;
    for _ in 0..2 {
        device
            .publish(
                "devices/pump-1/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                r#"{"metrics":{"pressure":9}}"#,
            )
            .await
            .unwrap();
    }
    eventually(WAIT, "alarm of pump-1", || async {
        alert_of(&server, &admin, "pump-1").await.is_some()
    })
    .await;
    let before = alert_of(&server, &admin, "pump-1").await.unwrap();
    assert!(before["nextEscalationAt"].is_string(), "{before}");
    drop(device);

    server.restart();
    let admin = server.admin_token().await;
    let after = alert_of(&server, &admin, "pump-1")
        .await
        .expect("the alarm survived");
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["status"], "ACTIVE_UNACK");
    assert_eq!(after["nextEscalationAt"], before["nextEscalationAt"]);
    clock.advance_ms(601_000);
    let got = tokio::time::timeout(WAIT, hooks.recv())
        .await
        .expect("escalated after the restart")
        .unwrap();
    assert_eq!(got.path, "/late");
    let payload: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(payload["event"], "alarm.escalated");
    assert_eq!(payload["alarm"]["id"], before["id"]);
}

on_both_backends!(alarms_flow, alarms_and_escalation_survive_a_restart);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_crud_and_validation() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    // The product description's own body.
    let (status, rule) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "High Temperature Alert", "condition": "temperature > 30",
                   "actions": [{"type": "webhook", "url": "https://alerts.example.com/webhook", "secret": "s3"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    let id = rule["id"].as_str().unwrap();
    assert_eq!(rule["rule"]["actions"][0]["secretSet"], json!(true));
    assert!(!rule.to_string().contains("s3\""), "{rule}");
    assert_eq!(rule["stats"]["status"], "idle");
    // A channel that does not exist is refused now, not found missing when an alarm fires.
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Nobody hears", "condition": "temperature > 30",
                   "escalation": [{"afterSecs": 60, "actions": [{"type": "email", "channel": "no-such-mail"}]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "unknown_channel", "{body}");
    // Functions that block or read the clock are refused with their position, before anything
    // runs (two `sleep(15)` rules used to hold both HTTP workers for 15 s).
    for (condition, name, at) in [
        ("sleep(15); false", "sleep", "line 1, column 1"),
        (
            "temperature > 30 &&\n sleep(1.5) == ()",
            "sleep",
            "line 2, column 2",
        ),
        (
            "let t = timestamp(); while t.elapsed() < 10.0 {} true",
            "timestamp",
            "line 1, column 9",
        ),
    ] {
        let started = std::time::Instant::now();
        let (status, body) = server
            .post(
                "/api/rules",
                &admin,
                json!({"name": "Sleepy", "condition": condition}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{condition}: {body}");
        assert_eq!(body["error"]["code"], "invalid_expression", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{name}` is not available")) && message.contains(at),
            "{condition}: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused without running"
        );
    }
    // Through a function pointer the name is not in the source: the creation run finds it.
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Sleepy", "condition": "let f = Fn(\"sleep\"); f.call(15); false"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_expression", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`sleep` is not available"),
        "{body}"
    );
    // A misspelled field is named, as in every other body, wherever it is.
    for (path, body, field) in [
        (
            "/api/rules",
            json!({"name": "n", "condition": "true", "sevrity": "major"}),
            "sevrity",
        ),
        (
            "/api/rules",
            json!({"name": "n", "condition": "true", "actions": [{"type": "webhook", "url": "https://x.example.com", "scret": "s"}]}),
            "scret",
        ),
        (
            "/api/rules",
            json!({"name": "n", "condition": {"type": "duration", "expression": "true", "forSecs": 5, "forSeconds": 5}}),
            "forSeconds",
        ),
        (
            "/api/channels",
            json!({"name": "c", "type": "webhook", "url": "https://x.example.com", "scret": "s"}),
            "scret",
        ),
    ] {
        let (status, answer) = server.post(path, &admin, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "unknown_field", "{path}: {answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    // What could never be delivered is refused: this server has no SMTP server and no SMS account.
    for (channel, code) in [
        (
            json!({"name": "m", "type": "email", "to": ["ops@example.com"]}),
            "email_not_configured",
        ),
        (
            json!({"name": "s", "type": "sms", "to": ["+15550001"]}),
            "sms_not_configured",
        ),
    ] {
        let (status, body) = server.post("/api/channels", &admin, channel).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
    }
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Mail me", "condition": "temperature > 30",
                   "actions": [{"type": "email", "to": ["ops@example.com"]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "email_not_configured", "{body}");
    let (status, body) = server
        .post(
            "/api/channels",
            &admin,
            json!({"name": "own-sms", "type": "sms", "to": ["+15550001"], "accountSid": "AC1", "secret": "t"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "an SMS channel with its own account: {body}"
    );
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Wrong kind", "condition": "temperature > 30",
                   "actions": [{"type": "webhook", "channel": "own-sms"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "channel_type_mismatch", "{body}");
    // The issue's multi-line script.
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Spike", "metric": "temperature",
                   "condition": "const avg = metrics.temperature.avg;\nconst std = metrics.temperature.std;\nreturn current > (avg + 3 * std);"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Spike", "condition": "true"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    for (body, field) in [
        (
            json!({"name": "s", "condition": {"type": "statistical"}}),
            "metric",
        ),
        (
            json!({"name": "s", "condition": {"type": "duration", "expression": "a > 1"}}),
            "condition",
        ),
        (
            json!({"name": "s", "condition": "a > 1", "severity": "purple"}),
            "severity",
        ),
        (
            json!({"name": "s", "condition": "a > 1", "scope": {"type": "group", "value": "no such/group"}}),
            "scope",
        ),
        (
            json!({"name": "s", "condition": "a > 1", "actions": [{"type": "webhook"}]}),
            "actions[0]",
        ),
        (
            json!({"name": "s", "condition": "a > 1", "clear": "a >"}),
            "clear",
        ),
    ] {
        let (status, err) = server.post("/api/rules", &admin, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {err}"
        );
    }
    let (status, patched) = server
        .patch(
            &format!("/api/rules/{id}"),
            &admin,
            json!({"enabled": false, "severity": "critical"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["rule"]["enabled"], false);
    assert_eq!(
        patched["rule"]["actions"][0]["secretSet"],
        json!(true),
        "untouched actions keep their secret"
    );
    // A misspelled metric is accepted with a warning naming it; what a device type declares or
    // a device reported is known.
    let (status, body) = server
        .call(
            reqwest::Method::PUT,
            "/api/device-types/thermo",
            Some(&admin),
            Some(json!({"metrics": {"temperature": {"type": "number"}}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, typo) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Typo", "condition": "temprature > 30 || temperature > 60"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{typo}");
    let warnings = typo["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{typo}");
    assert_eq!(warnings[0]["code"], "unknown_metric");
    assert_eq!(warnings[0]["field"], "condition");
    let message = warnings[0]["message"].as_str().unwrap();
    assert!(
        message.contains("`temprature`") && message.contains("temperature"),
        "{message}"
    );
    let typo_id = typo["id"].as_str().unwrap().to_string();
    let (status, fixed) = server
        .patch(
            &format!("/api/rules/{typo_id}"),
            &admin,
            json!({"condition": "temperature > 30"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{fixed}");
    assert!(fixed.get("warnings").is_none(), "{fixed}");
    let device = server
        .register(&admin, json!({"deviceId": "hygro-1", "type": "hygro"}))
        .await;
    let (status, body) = server
        .post(
            "/api/devices/hygro-1/telemetry",
            &device,
            json!({"metrics": {"humidity": 40}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(WAIT, "a reported metric is known", || async {
        let (status, body) = server
            .patch(
                &format!("/api/rules/{typo_id}"),
                &admin,
                json!({"condition": "humidity > 80"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body.get("warnings").is_none()
    })
    .await;
    let (status, _) = server.delete(&format!("/api/rules/{typo_id}"), &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (_, list) = server.get("/api/rules", &admin).await;
    assert_eq!(list["rules"].as_array().unwrap().len(), 2);
    let (status, _) = server.delete(&format!("/api/rules/{id}"), &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server.get(&format!("/api/rules/{id}"), &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, audit) = server.get("/api/audit?action=rule.create", &admin).await;
    assert_eq!(audit["entries"].as_array().map(|a| a.len()), Some(3), "{audit}");
    // Alerts of another tenant are invisible.
    let other = server.tenant_admin(&admin, "other").await;
    let (_, alerts) = server.get("/api/alerts", &other).await;
    assert_eq!(alerts["alerts"], json!([]));
}

/// The device-facing actions: an MQTT command reaches the device's session; a shadow patch
/// lands in the device's desired state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_command_and_shadow_patch_actions() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.rules.delivery_attempts = 2;
        c.rules.retry_backoff_ms = 20;
    })
    .unwrap();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "valve-1", "type": "valve"}))
        .await;
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Leak", "condition": "flow > 10",
                   "actions": [{"type": "mqttCommand", "command": "close", "payload": {"valve": "main"}},
                               {"type": "shadowPatch", "payload": {"valve": "closed"}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let mut options = rumqttc::MqttOptions::new("valve-1", "127.0.0.1", server.mqtt.port());
    options.set_credentials("valve-1", token);
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            let _ = tx.send(event);
        }
    });
    client
        .subscribe("devices/valve-1/commands/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) = rx.recv().await {
                break;
            }
        }
    })
    .await
    .expect("subscribed");
    client
        .publish(
            "devices/valve-1/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"metrics":{"flow":12}}"#,
        )
        .await
        .unwrap();
    let command = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = rx.recv().await {
                return p;
            }
        }
    })
    .await
    .expect("the command reached the device");
    assert_eq!(command.topic, "devices/valve-1/commands/close");
    // Sent like any command (`POST /api/devices/{id}/commands`): with its request id.
    let sent = serde_json::from_slice::<Value>(&command.payload).unwrap();
    assert_eq!(sent["payload"], json!({"valve": "main"}));
    assert!(sent["requestId"].is_string(), "{sent}");

    let id = alert_of(&server, &admin, "valve-1").await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(WAIT, "both deliveries recorded", || async {
        detail(&server, &admin, &id).await["deliveries"]
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let d = detail(&server, &admin, &id).await;
    let by_kind = |kind: &str| {
        d["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["kind"] == kind)
            .unwrap()
            .clone()
    };
    assert_eq!(by_kind("mqttCommand")["outcome"], "delivered");
    assert_eq!(by_kind("shadowPatch")["outcome"], "delivered", "{d}");
    let (status, shadow) = server.get("/api/devices/valve-1/shadow", &admin).await;
    assert_eq!(status, StatusCode::OK, "{shadow}");
    assert_eq!(shadow["state"]["desired"]["valve"], "closed", "{shadow}");
    assert_eq!(shadow["state"]["delta"]["valve"], "closed", "{shadow}");
}

/// Per-rule notification rate limit and quiet period after a clear: the alarms are recorded,
/// the notifications they would have sent are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_quiet_period_hold_notifications_back() {
    let (hook_addr, mut hooks, hits) = http_receiver(200).await;
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.rules.tick_ms = 50;
        c.rules.notify_allowed_networks = vec!["127.0.0.1".into()];
    })
    .unwrap();
    let admin = server.admin_token().await;
    let mut devices = Vec::new();
    for id in ["fan-1", "fan-2"] {
        let token = server
            .register(&admin, json!({"deviceId": id, "type": "fan"}))
            .await;
        devices.push((id, device_client(&server, id, &token).await));
    }
    let url = format!("http://{hook_addr}/n");
    for (name, notify) in [
        ("Limited", json!({"maxPerHour": 1})),
        ("Quiet", json!({"quietPeriodSecs": 3600})),
    ] {
        let metric = if name == "Limited" { "rpm" } else { "temp" };
        let (status, body) = server
            .post(
                "/api/rules",
                &admin,
                json!({"name": name, "condition": format!("{metric} > 100"), "clear": format!("{metric} < 50"),
                       "notify": notify, "actions": [{"type": "webhook", "url": url}]}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let send = |client: &rumqttc::AsyncClient, id: &str, metric: &str, v: f64| {
        let (client, topic, payload) = (
            client.clone(),
            format!("devices/{id}/telemetry"),
            json!({"metrics": {metric: v}}).to_string(),
        );
        async move {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };
    let events_of = |alarm: Value| {
        let kinds: Vec<String> = alarm["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect();
        kinds
    };
    let alarms_of = |rule: &'static str| {
        let server = &server;
        let admin = admin.clone();
        async move {
            let (_, list) = server.get("/api/alerts", &admin).await;
            list["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["ruleName"] == rule)
                .cloned()
                .collect::<Vec<Value>>()
        }
    };

    // Rate limit: two alarms of "Limited", one notification.
    send(&devices[0].1, "fan-1", "rpm", 150.0).await;
    send(&devices[1].1, "fan-2", "rpm", 150.0).await;
    eventually(WAIT, "two Limited alarms", || async {
        alarms_of("Limited").await.len() == 2
    })
    .await;
    let got = tokio::time::timeout(WAIT, hooks.recv()).await.unwrap().unwrap();
    assert_eq!(got.path, "/n");
    let mut suppressed = 0;
    for alarm in alarms_of("Limited").await {
        let d = detail(&server, &admin, alarm["id"].as_str().unwrap()).await;
        if events_of(d).contains(&"suppressed".to_string()) {
            suppressed += 1;
        }
    }
    assert_eq!(suppressed, 1, "one alarm within the limit, one held back");

    // Quiet period: open (notifies), clear, open again (does not).
    send(&devices[0].1, "fan-1", "temp", 150.0).await;
    tokio::time::timeout(WAIT, hooks.recv())
        .await
        .expect("the first Quiet alarm notifies");
    send(&devices[0].1, "fan-1", "temp", 20.0).await;
    eventually(WAIT, "Quiet cleared", || async {
        alarms_of("Quiet")
            .await
            .first()
            .is_some_and(|a| a["active"] == false)
    })
    .await;
    send(&devices[0].1, "fan-1", "temp", 150.0).await;
    eventually(WAIT, "second Quiet alarm", || async {
        alarms_of("Quiet").await.len() == 2
    })
    .await;
    let newest = alarms_of("Quiet")
        .await
        .into_iter()
        .find(|a| a["active"] == true)
        .unwrap();
    let d = detail(&server, &admin, newest["id"].as_str().unwrap()).await;
    assert_eq!(events_of(d.clone()), ["created", "suppressed"], "{d}");
    assert_eq!(d["deliveries"], json!([]));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "one Limited and the first Quiet notification"
    );
}

/// The offline alarm: no telemetry for T (server time, moved by the test) opens it; telemetry
/// clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absence_opens_an_offline_alarm_and_telemetry_clears_it() {
    let clock = ManualClock::new();
    let server =
        TestServer::start_with_clock(Backend::Sqlite, clock.clone(), |c| c.rules.tick_ms = 50).unwrap();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "meter-1", "type": "meter"}))
        .await;
    let (status, body) = server
        .post(
            "/api/rules",
            &admin,
            json!({"name": "Offline", "severity": "warning", "scope": {"type": "deviceType", "value": "meter"},
                   "condition": {"type": "absence", "forSecs": 600}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let device = device_client(&server, "meter-1", &token).await;
    let reading = || async {
        device
            .publish(
                "devices/meter-1/telemetry",
                rumqttc::QoS::AtLeastOnce,
                false,
                r#"{"metrics":{"kwh":1}}"#,
            )
            .await
            .unwrap();
    };
    reading().await;
    eventually(WAIT, "the rule saw the device", || async {
        let (_, rules) = server.get("/api/rules", &admin).await;
        rules["rules"][0]["stats"]["evaluations"] == 1
    })
    .await;
    clock.advance_ms(599_000);
    clock.advance_ms(2_000);
    eventually(WAIT, "offline alarm", || async {
        alert_of(&server, &admin, "meter-1").await.is_some()
    })
    .await;
    let alarm = alert_of(&server, &admin, "meter-1").await.unwrap();
    assert_eq!(alarm["status"], "ACTIVE_UNACK");
    assert_eq!(alarm["severity"], "warning");
    assert!(
        alarm["details"]["silentForMs"].as_i64().unwrap() >= 600_000,
        "{alarm}"
    );
    reading().await;
    eventually(WAIT, "cleared by telemetry", || async {
        alert_of(&server, &admin, "meter-1").await.unwrap()["status"] == "CLEARED_UNACK"
    })
    .await;
}

/// One tenant's rules burn their whole time slice on every message of a flood; another tenant's
/// alarm still opens within 1 s, and `/health` answers within 100 ms all along (the rules used to
/// share one thread, and the creation-time dry run ran on the HTTP workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_slow_rules_delay_neither_another_tenants_alarm_nor_health() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let platform = server.admin_token().await;
    let noisy = server.tenant_admin(&platform, "noisy").await;
    let quiet = server.tenant_admin(&platform, "quiet").await;
    let noisy_device = server
        .register(&noisy, json!({"deviceId": "n-1", "type": "thermo"}))
        .await;
    let quiet_device = server
        .register(&quiet, json!({"deviceId": "q-1", "type": "thermo"}))
        .await;

    // /health, polled from the start to the end.
    let done = Arc::new(AtomicBool::new(false));
    let health = {
        let client = server.client.clone();
        let url = server.url("/health");
        let done = done.clone();
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut polls = 0;
            while !done.load(Ordering::SeqCst) {
                let started = std::time::Instant::now();
                let response = client.get(&url).send().await.unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                response.bytes().await.unwrap();
                slowest = slowest.max(started.elapsed());
                polls += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (slowest, polls)
        })
    };

    // Each rule spends about half the operation limit on every message, then does not fire:
    // far more than a time slice per message, never stopped.
    for i in 0..5 {
        let (status, body) = server
            .post(
                "/api/rules",
                &noisy,
                json!({"name": format!("Busy {i}"),
                       "condition": "let i = 0; while i < 4000 { i += 1; } temperature > 1000"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = server
        .post(
            "/api/rules",
            &quiet,
            json!({"name": "Hot", "condition": "temperature > 30"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // The flood: batches of 100 messages, each a few seconds of the noisy tenant's rules.
    let flood = {
        let client = server.client.clone();
        let url = server.url("/api/devices/n-1/telemetry");
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let now = chrono::Utc::now().timestamp_millis();
                let batch: Vec<Value> = (0..100)
                    .map(|i| json!({"timestamp": now - 1000 + i, "metrics": {"temperature": 20}}))
                    .collect();
                let response = client
                    .post(&url)
                    .bearer_auth(&noisy_device)
                    .json(&batch)
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    eventually(WAIT, "the noisy tenant's rules at work", || async {
        let (_, rules) = server.get("/api/rules", &noisy).await;
        let evaluations: u64 = rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["stats"]["evaluations"].as_u64().unwrap_or(0))
            .sum();
        evaluations >= 50
    })
    .await;

    let started = std::time::Instant::now();
    let (status, body) = server
        .post(
            "/api/devices/q-1/telemetry",
            &quiet_device,
            json!({"metrics": {"temperature": 31}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eventually(WAIT, "the quiet tenant's alarm", || async {
        alert_of(&server, &quiet, "q-1").await.is_some()
    })
    .await;
    let opened_after = started.elapsed();
    let backlog = server.metric("drover_rule_events_queued").await;

    done.store(true, Ordering::SeqCst);
    flood.await.unwrap();
    let (slowest_health, polls) = health.await.unwrap();
    assert!(
        opened_after < Duration::from_secs(1),
        "the quiet tenant's alarm opened after {opened_after:?}"
    );
    eprintln!(
        "alarm after {opened_after:?}, /health at most {slowest_health:?} over {polls} polls, {backlog} events waiting"
    );
    assert!(
        backlog >= 1.0,
        "the noisy tenant still had work waiting ({backlog})"
    );
    assert!(
        server.metric("drover_rule_slices_exhausted_total").await >= 1.0,
        "the noisy tenant used up its slices"
    );
    assert!(polls >= 10, "{polls} health polls");
    assert!(
        slowest_health < Duration::from_millis(100),
        "/health took {slowest_health:?}"
    );
    let (_, rules) = server.get("/api/rules", &noisy).await;
    for rule in rules["rules"].as_array().unwrap() {
        assert_eq!(rule["stats"]["status"], "running", "{rule}");
    }
}
