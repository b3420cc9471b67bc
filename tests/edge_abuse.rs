//! What an outsider can do without credentials must not fill the disk or forge the log:
//! refused CONNECTs with huge client ids, their audit records, the audit log's retention, and
//! control characters in client strings. Raw sockets, since no client library sends these.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::wire::{connect_packet, connect_v5_packet};
use common::{Backend, TestServer, eventually};
use diesel::{Connection, RunQueryDsl};
use serde_json::Value;

/// Sends `packet` on a new connection and returns the CONNACK's return (v3) or reason (v5) code.
fn connack_code(addr: SocketAddr, packet: &[u8]) -> u8 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(packet).expect("CONNECT sent");
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).expect("CONNACK");
    assert_eq!(head[0], 0x20, "not a CONNACK: {head:?}");
    head[3]
}

/// Bytes of every file under `dir` (the registry's SQLite database, its WAL, the rest).
fn disk_usage(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                disk_usage(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

async fn connect_audit(server: &TestServer, token: &str) -> Vec<Value> {
    let (_, body) = server
        .get("/api/audit?scope=platform&action=mqtt.connect&limit=1000", token)
        .await;
    body["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_refused_connects_with_huge_client_ids_barely_grow_the_database() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    let addr = server.mqtt;
    let client_id = "x".repeat(60 * 1024);

    // MQTT 5 gets 0x85 (Client Identifier not valid), 3.1.1 return code 2 (identifier rejected).
    assert_eq!(connack_code(addr, &connect_v5_packet(&client_id, 30)), 0x85);
    let packet = connect_packet(&client_id, "nobody", "wrong", 30, None);
    assert_eq!(connack_code(addr, &packet), 0x02);
    // The first refusals are written; measure from there.
    eventually(Duration::from_secs(10), "the first refusals audited", || async {
        !connect_audit(&server, &admin).await.is_empty()
    })
    .await;
    let before = disk_usage(server.data_dir.path());

    const FLOOD: usize = 10_000;
    const PARALLEL: usize = 8;
    let packet = Arc::new(packet);
    let refused = tokio::task::spawn_blocking(move || {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|_| {
                let packet = packet.clone();
                std::thread::spawn(move || {
                    (0..FLOOD / PARALLEL)
                        .filter(|_| connack_code(addr, &packet) == 0x02)
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum::<usize>()
    })
    .await
    .unwrap();
    assert_eq!(refused, FLOOD);

    // Every refusal is counted (or, if the audit queue was ever full, counted as dropped)...
    let dropped = server.state.metrics.audit_dropped.clone();
    let total = FLOOD as u64 + 2;
    eventually(Duration::from_secs(20), "all refusals counted", || async {
        let counted: u64 = connect_audit(&server, &admin)
            .await
            .iter()
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        counted + dropped.get() == total
    })
    .await;
    // ... on one row per source and reason per minute, with the client id clipped.
    let entries = connect_audit(&server, &admin).await;
    assert!(entries.len() <= 4, "{} rows", entries.len());
    for entry in &entries {
        assert_eq!(entry["sourceIp"], "127.0.0.1", "{entry}");
        assert_eq!(entry["detail"]["reason"], "client_id", "{entry}");
        let actor = entry["actor"].as_str().unwrap();
        assert!(actor.len() < 300 && actor.ends_with("bytes)"), "{actor}");
    }
    let grown = disk_usage(server.data_dir.path()).saturating_sub(before);
    assert!(grown < 1024 * 1024, "the data directory grew by {grown} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maintenance_pass_deletes_audit_entries_past_the_retention() {
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.storage.audit_retention_days = 2;
        c.telemetry.maintenance_interval_secs = 1;
    })
    .unwrap();
    let admin = server.admin_token().await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let day_ms = 86_400_000;
    let mut conn =
        diesel::SqliteConnection::establish(&server.data_dir.path().join("drover.db").to_string_lossy())
            .unwrap();
    diesel::sql_query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .unwrap();
    for (action, at) in [
        ("test.expired", now_ms - 3 * day_ms),
        ("test.kept", now_ms - day_ms),
    ] {
        diesel::sql_query(format!(
            "INSERT INTO audit_log (at, actor, action, outcome) VALUES ({at}, 'test', '{action}', 'ok')"
        ))
        .execute(&mut conn)
        .unwrap();
    }
    let entries = |action: &'static str| {
        let (server, admin) = (&server, &admin);
        async move {
            let (_, body) = server
                .get(&format!("/api/audit?scope=platform&action={action}"), admin)
                .await;
            body["entries"].as_array().map_or(0, Vec::len)
        }
    };
    assert_eq!(entries("test.expired").await, 1);
    eventually(Duration::from_secs(15), "the expired entry deleted", || async {
        entries("test.expired").await == 0
    })
    .await;
    assert_eq!(entries("test.kept").await, 1);
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_holding_a_log_line_stays_on_its_own_line() {
    // The server's own text log, as `drover serve` writes it (the first test to install a
    // subscriber in this binary wins; no other test here installs one).
    let log = CapturedLog::default();
    let sink = log.clone();
    let config = drover::config::LogConfig {
        format: drover::config::LogFormat::Text,
        level: "info".into(),
    };
    drover::logging::init_with_writer(&config, move || sink.clone(), false);
    let server = TestServer::start(Backend::Sqlite).unwrap();

    let forged = "edge-forgery\n2026-12-06T10:00:00.000000Z  INFO drover::auth: login ok user=admin\r";
    let packet = connect_packet(forged, "nobody", "wrong", 30, None);
    assert_eq!(
        connack_code(server.mqtt, &packet),
        0x04,
        "bad username or password"
    );

    // A client id shaped like more fields stays one quoted value.
    let fields = r#"edge-fields source="10.9.9.9" reason="accepted_by_admin""#;
    let packet = connect_packet(fields, "nobody", "wrong", 30, None);
    assert_eq!(connack_code(server.mqtt, &packet), 0x04);

    let text = || String::from_utf8_lossy(&log.0.lock().unwrap()).to_string();
    eventually(Duration::from_secs(10), "the refusals logged", || async {
        text().contains("edge-forgery") && text().contains("edge-fields")
    })
    .await;
    let all = text();
    let line = all.lines().find(|l| l.contains("edge-fields")).unwrap();
    assert!(
        line.contains(r#"client="edge-fields source=\"10.9.9.9\" reason=\"accepted_by_admin\"""#),
        "{line}"
    );
    assert!(!line.contains(r#" source="10.9.9.9""#), "{line}");

    // Refusals from many source addresses (loopback is a /8): the audit log gets a bounded
    // number of rows for them and the server log a bounded number of lines.
    const SOURCES: usize = 2_000;
    let mqtt = server.mqtt;
    for i in 0..SOURCES {
        let source = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        let mut stream = socket.connect(mqtt).await.expect("connect");
        let packet = connect_packet(&format!("edge-flood-{i}"), "nobody", "wrong", 30, None);
        tokio::io::AsyncWriteExt::write_all(&mut stream, &packet)
            .await
            .unwrap();
        let mut head = [0u8; 4];
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut head),
        )
        .await
        .expect("CONNACK in time")
        .unwrap();
        assert_eq!(head[3], 0x04, "bad username or password");
    }
    let admin = server.admin_token().await;
    let dropped = server.state.metrics.audit_dropped.clone();
    let flood_rows = |entries: Vec<Value>| -> Vec<Value> {
        entries
            .into_iter()
            .filter(|e| {
                e["actor"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("mqtt:edge-flood"))
            })
            .collect()
    };
    eventually(Duration::from_secs(20), "the flood counted", || async {
        let counted: u64 = flood_rows(connect_audit(&server, &admin).await)
            .iter()
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        counted + dropped.get() >= SOURCES as u64
    })
    .await;
    let rows = flood_rows(connect_audit(&server, &admin).await);
    assert!(
        rows.len() <= drover::audit::SOURCES_PER_KIND + 1,
        "{} rows",
        rows.len()
    );
    let logged = text().lines().filter(|l| l.contains("edge-flood")).count();
    assert!(
        logged <= drover::logging::LINES_PER_INTERVAL as usize,
        "{logged} lines"
    );
    let text = text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("login ok user=admin"))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("MQTT connect refused") && lines[0].contains(r"edge-forgery\n2026"),
        "{}",
        lines[0]
    );
}
