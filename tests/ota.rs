//! Firmware registry and OTA campaigns, end to end: real MQTT clients running the simulator's
//! device side of the job protocol (`load/src/sim_ota.rs`, the same code `drover-load simulate`
//! runs) against a server in process.
//!
//! One server per backend: each part below is a function of its own, run in turn; the restart
//! comes last.

mod common;

#[path = "../load/src/sim_ota.rs"]
#[allow(dead_code)]
mod sim_ota;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Backend, TestServer, eventually, ws};
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use serde_json::{Value, json};
use sim_ota::{OtaDevice, OtaFleet, OtaSettings};

const WAIT: Duration = Duration::from_secs(30);
/// Small, so a too large upload is cheap to send.
const MAX_IMAGE: u64 = 256 * 1024;

on_both_backends!(ota);

async fn ota(backend: Backend) {
    let Some(mut server) = TestServer::start_with(backend, |c| {
        c.firmware.max_image_bytes = MAX_IMAGE;
        // Fewer than the devices of a stage: some are told to come back (503), as a large
        // fleet would be.
        c.firmware.max_concurrent_downloads = 3;
    }) else {
        return;
    };
    let admin = server.admin_token().await;

    let base = upload(&server, &admin, "1.0.0", "sensor", &image(1, 40_000)).await;
    let next = upload(&server, &admin, "1.1.0", "sensor", &image(2, 50_000)).await;

    firmware_is_listed_signed_and_downloadable_in_ranges(&server, &admin, &next).await;
    a_staged_campaign_completes_and_rolls_back(&server, &admin, &base, &next).await;
    failures_past_the_threshold_pause_the_stage_until_resumed(&server, &admin).await;
    a_pause_suspends_the_timeouts_of_devices_at_work(&server, &admin).await;
    a_closed_maintenance_window_holds_notifications(&server, &admin).await;
    an_offline_device_gets_its_job_when_it_connects(&server, &admin, &next).await;
    tampered_images_are_refused_by_the_device(&server, &admin).await;
    an_interrupted_download_resumes(&server, &admin).await;
    bad_input_is_refused(&server, &admin, &next).await;
    tenants_and_roles_are_enforced(&server, &admin, &next).await;
    the_api_document_describes_fleet_operations(&server).await;
    a_campaign_survives_a_restart(&mut server, &admin).await;
}

// ---- helpers ---------------------------------------------------------------------------------

/// `len` bytes that differ per `seed`.
fn image(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn upload(server: &TestServer, token: &str, version: &str, types: &str, bytes: &[u8]) -> Value {
    let response = server
        .client
        .post(server.url(&format!(
            "/api/firmware?version={version}&deviceTypes={types}&notes=test"
        )))
        .bearer_auth(token)
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn register_fleet(
    server: &TestServer,
    token: &str,
    prefix: &str,
    n: usize,
    device_type: &str,
) -> Vec<(String, String)> {
    let mut devices = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}-{i:02}");
        let device_token = server
            .register(
                token,
                json!({"deviceId": id, "type": device_type, "tags": [prefix]}),
            )
            .await;
        devices.push((id, device_token));
    }
    devices
}

fn fleet(server: &TestServer, tweak: impl FnOnce(&mut OtaSettings)) -> Arc<OtaFleet> {
    let mut settings = OtaSettings {
        api_base: server.base.clone(),
        install_time: Duration::from_millis(20),
        ..OtaSettings::default()
    };
    tweak(&mut settings);
    OtaFleet::new(settings)
}

/// A simulated device connected over MQTT until dropped.
struct Sim {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn connect(server: &TestServer, id: &str, token: &str, fleet: &Arc<OtaFleet>) -> Sim {
    let device = OtaDevice::new(id, token, fleet.clone());
    let mut options = MqttOptions::new(id, "127.0.0.1", server.mqtt.port());
    options.set_credentials(id, token);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 64);
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => device.on_connected(&client).await,
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    device.handle(&client, &p.topic, &p.payload);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Sim { task }
}

fn connect_all(server: &TestServer, devices: &[(String, String)], fleet: &Arc<OtaFleet>) -> Vec<Sim> {
    devices
        .iter()
        .map(|(id, token)| connect(server, id, token, fleet))
        .collect()
}

async fn campaign(server: &TestServer, token: &str, id: &str) -> Value {
    let (status, body) = server.get(&format!("/api/campaigns/{id}"), token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn wait_for_status(server: &TestServer, token: &str, id: &str, wanted: &str) -> Value {
    let mut last = Value::Null;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        last = campaign(server, token, id).await;
        if last["status"] == wanted {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("campaign {id} did not become {wanted}: {last}");
}

async fn create(server: &TestServer, token: &str, body: Value) -> Value {
    let (status, created) = server.post("/api/campaigns", token, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

async fn reported_firmware(server: &TestServer, token: &str, device: &str) -> Value {
    let (status, shadow) = server.get(&format!("/api/devices/{device}/shadow"), token).await;
    if status == StatusCode::NOT_FOUND {
        return Value::Null;
    }
    assert_eq!(status, StatusCode::OK, "{shadow}");
    shadow["state"]["reported"]["firmware"].clone()
}

async fn device_job(server: &TestServer, token: &str, campaign: &str, device: &str) -> Value {
    let (status, body) = server
        .get(&format!("/api/campaigns/{campaign}/devices/{device}"), token)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

// ---- the parts -------------------------------------------------------------------------------

async fn firmware_is_listed_signed_and_downloadable_in_ranges(
    server: &TestServer,
    admin: &str,
    next: &Value,
) {
    assert_eq!(next["version"], "1.1.0");
    assert_eq!(next["size"], 50_000);
    assert_eq!(next["deviceTypes"], json!(["sensor"]));
    let (status, list) = server.get("/api/firmware", admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["firmware"].as_array().unwrap().len(), 2, "{list}");

    // The manifest names this image, and the platform key signed exactly its text.
    let manifest: Value = serde_json::from_str(next["manifest"].as_str().unwrap()).unwrap();
    assert_eq!(manifest["sha256"], next["sha256"]);
    assert_eq!(manifest["size"], 50_000);
    let (status, key) = server.get("/api/firmware/signing-key", admin).await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["algorithm"], "Ed25519");
    let public_key = key["publicKey"].as_str().unwrap();
    let manifest_text = next["manifest"].as_str().unwrap();
    assert!(sim_ota::verify(
        public_key,
        manifest_text.as_bytes(),
        next["signature"].as_str().unwrap()
    ));
    assert!(!sim_ota::verify(
        public_key,
        format!("{manifest_text} ").as_bytes(),
        next["signature"].as_str().unwrap()
    ));

    // A device downloads with its own token, whole or by range.
    let device_token = server
        .register(admin, json!({"deviceId": "downloader", "type": "sensor"}))
        .await;
    let url = server.url(next["downloadUrl"].as_str().unwrap());
    let whole = server
        .client
        .get(&url)
        .bearer_auth(&device_token)
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap().to_vec(), image(2, 50_000));
    let part = server
        .client
        .get(&url)
        .bearer_auth(&device_token)
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], "bytes 1000-1999/50000");
    assert_eq!(
        part.bytes().await.unwrap().to_vec(),
        image(2, 50_000)[1000..2000].to_vec()
    );
    let tail = server
        .client
        .get(&url)
        .bearer_auth(&device_token)
        .header("Range", "bytes=49990-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.bytes().await.unwrap().len(), 10);
    let beyond = server
        .client
        .get(&url)
        .bearer_auth(&device_token)
        .header("Range", "bytes=50000-")
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let body: Value = beyond.json().await.unwrap();
    assert_eq!(body["error"]["code"], "range_not_satisfiable");
    let unknown = server
        .client
        .get(&url)
        .bearer_auth("dvt_not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
}

async fn a_staged_campaign_completes_and_rolls_back(
    server: &TestServer,
    admin: &str,
    base: &Value,
    next: &Value,
) {
    let devices = register_fleet(server, admin, "staged", 10, "sensor").await;
    let fleet = fleet(server, |_| {});
    let _sims = connect_all(server, &devices, &fleet);
    for (id, _) in &devices {
        let id = id.clone();
        eventually(WAIT, "initial firmware reported", || {
            let id = id.clone();
            async move { reported_firmware(server, admin, &id).await == "1.0.0" }
        })
        .await;
    }
    let (mut live, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={admin}", server.addr))
        .await
        .unwrap();
    assert_eq!(ws::next_json(&mut live, WAIT).await["type"], "hello");

    let created = create(
        server,
        admin,
        json!({
            "name": "staged rollout",
            "firmwareId": next["id"],
            "target": {"tags": ["staged"]},
            "rollout": {"stages": [10, 50, 100]},
            "failureRule": {"maxFailureRate": 0.2, "action": "pause"},
            "timeoutSecs": 60,
            "rollbackFirmwareId": base["id"],
        }),
    )
    .await;
    assert_eq!(created["stages"], 3);
    assert_eq!(created["counts"]["skipped"], 0);
    let sizes: Vec<u64> = created["stageProgress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["devices"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![1, 4, 5]);
    let id = created["id"].as_str().unwrap().to_string();

    let done = wait_for_status(server, admin, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 10, "{done}");
    assert_eq!(done["stage"], 3);
    for (device, _) in &devices {
        assert_eq!(reported_firmware(server, admin, device).await, "1.1.0");
    }
    let job = device_job(server, admin, &id, &devices[0].0).await;
    let states: Vec<&str> = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"pending"));
    assert!(
        states.contains(&"notified") && states.contains(&"in_progress"),
        "{states:?}"
    );
    assert_eq!(states.last(), Some(&"succeeded"));
    assert_eq!(job["progress"], 100);

    // The live stream showed the campaign moving.
    let mut seen_campaign = false;
    for _ in 0..50 {
        let frame = ws::next_json(&mut live, WAIT).await;
        if frame["type"] == "campaign" && frame["campaign"]["campaignId"] == id.as_str() {
            seen_campaign = true;
            break;
        }
    }
    assert!(seen_campaign, "no campaign frame on /ws");

    // The image a campaign runs cannot be deleted while it runs; finished, it can be rolled
    // back in one call, which installs the rollback image on every device it touched.
    let (status, rolled) = server
        .call(
            Method::POST,
            &format!("/api/campaigns/{id}/rollback"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rolled}");
    assert_eq!(rolled["rollbackOf"], id.as_str());
    assert_eq!(rolled["firmwareVersion"], "1.0.0");
    let rollback_id = rolled["id"].as_str().unwrap().to_string();
    let back = wait_for_status(server, admin, &rollback_id, "completed").await;
    assert_eq!(back["counts"]["succeeded"], 10, "{back}");
    for (device, _) in &devices {
        assert_eq!(reported_firmware(server, admin, device).await, "1.0.0");
    }
}

async fn failures_past_the_threshold_pause_the_stage_until_resumed(server: &TestServer, admin: &str) {
    let image = upload(server, admin, "2.0.0", "", &image(3, 30_000)).await;
    let devices = register_fleet(server, admin, "flaky", 10, "sensor").await;
    let broken = fleet(server, |s| s.failure_rate = 1.0);
    let sims = connect_all(server, &devices, &broken);
    let created = create(
        server,
        admin,
        json!({
            "firmwareId": image["id"],
            "target": {"tags": ["flaky"]},
            "rollout": {"stages": [20, 100]},
            "failureRule": {"maxFailureRate": 0.5, "action": "pause"},
            "timeoutSecs": 60,
        }),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let paused = wait_for_status(server, admin, &id, "paused").await;
    assert_eq!(paused["stage"], 1, "{paused}");
    let reason = paused["statusReason"].as_str().unwrap();
    assert!(
        reason.contains("stage 1 of 2") && reason.contains("failed"),
        "{reason}"
    );
    // The second stage was never started.
    assert_eq!(paused["stageProgress"][1]["pending"], 8, "{paused}");
    assert_eq!(paused["counts"]["failed"], 2, "{paused}");
    let (status, failed) = server
        .get(&format!("/api/campaigns/{id}/devices?state=failed"), admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(failed["total"], 2);
    assert!(
        failed["devices"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("injected"),
        "{failed}"
    );
    // Paused twice is a conflict, not a silent success.
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/campaigns/{id}/pause"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // The fix: devices that install fine. Resuming retries the failed ones.
    drop(sims);
    let fixed = fleet(server, |_| {});
    let _sims = connect_all(server, &devices, &fixed);
    let (status, resumed) = server
        .call(
            Method::POST,
            &format!("/api/campaigns/{id}/resume"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let done = wait_for_status(server, admin, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 10, "{done}");
    let retried = device_job(
        server,
        admin,
        &id,
        failed["devices"][0]["deviceId"].as_str().unwrap(),
    )
    .await;
    assert_eq!(retried["attempts"], 2, "{retried}");
}

/// A device still installing when its campaign is paused is not timed out while the campaign
/// is paused, nor at the resume: its deadline moves by the pause, and the time it had left
/// still runs out afterwards.
async fn a_pause_suspends_the_timeouts_of_devices_at_work(server: &TestServer, admin: &str) {
    const TIMEOUT_SECS: u64 = 10;
    let image = upload(server, admin, "2.5.0", "", &image(12, 20_000)).await;
    let devices = register_fleet(server, admin, "patient", 2, "sensor").await;
    // One installs for longer than the timeout, but less than the timeout and the pause;
    // the other never finishes.
    let slow = fleet(server, |s| s.install_time = Duration::from_secs(15));
    let stuck = fleet(server, |s| s.install_time = Duration::from_secs(3600));
    let _slow = connect(server, &devices[0].0, &devices[0].1, &slow);
    let _stuck = connect(server, &devices[1].0, &devices[1].1, &stuck);
    let created = create(
        server,
        admin,
        json!({"firmwareId": image["id"], "target": {"tags": ["patient"]}, "timeoutSecs": TIMEOUT_SECS,
               "failureRule": {"maxFailureRate": 1.0}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    for (device, _) in &devices {
        eventually(WAIT, "the device at work", || async {
            device_job(server, admin, &id, device).await["state"] == "in_progress"
        })
        .await;
    }
    let (status, paused) = server
        .call(
            Method::POST,
            &format!("/api/campaigns/{id}/pause"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    let deadline = |job: &Value| {
        chrono::DateTime::parse_from_rfc3339(job["deadlineAt"].as_str().expect("a deadline")).unwrap()
    };
    let job = device_job(server, admin, &id, &devices[1].0).await;
    let before = deadline(&job);
    let notified = chrono::DateTime::parse_from_rfc3339(job["notifiedAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        before - notified,
        chrono::Duration::seconds(TIMEOUT_SECS as i64),
        "{job}"
    );

    // Paused for longer than the timeout: nobody is timed out.
    tokio::time::sleep(Duration::from_secs(TIMEOUT_SECS + 1)).await;
    let still = campaign(server, admin, &id).await;
    assert_eq!(still["status"], "paused", "{still}");
    assert_eq!(still["counts"]["in_progress"], 2, "{still}");
    assert_eq!(still["counts"]["timed_out"], 0, "{still}");

    let (status, resumed) = server
        .call(
            Method::POST,
            &format!("/api/campaigns/{id}/resume"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    // The campaign runner is in the actor tree, driving it.
    eventually(WAIT, "the runner lists the resumed campaign", || async {
        let (_, tree) = server.get("/admin/actors", admin).await;
        tree["campaignRunner"]["running"]
            .as_array()
            .is_some_and(|r| r.iter().any(|c| c["campaign"] == id.as_str()))
    })
    .await;
    let job = device_job(server, admin, &id, &devices[1].0).await;
    let after = deadline(&job);
    assert!(
        after - before >= chrono::Duration::seconds(TIMEOUT_SECS as i64 + 1),
        "the deadline moved by the pause: {before} -> {after}"
    );
    // The slow device finishes within the time it had left; the stuck one runs out of it.
    let done = wait_for_status(server, admin, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");
    assert_eq!(done["counts"]["timed_out"], 1, "{done}");
    assert_eq!(
        device_job(server, admin, &id, &devices[0].0).await["state"],
        "succeeded"
    );
    let job = device_job(server, admin, &id, &devices[1].0).await;
    assert_eq!(job["state"], "timed_out", "{job}");
    let timed_out = job["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == "timed_out")
        .expect("a timed_out entry");
    let at = chrono::DateTime::parse_from_rfc3339(timed_out["at"].as_str().unwrap()).unwrap();
    assert!(at >= after, "timed out at {at}, before its deadline {after}");
    let (status, tree) = server.get("/admin/actors", admin).await;
    assert_eq!(status, StatusCode::OK, "{tree}");
    let runner = &tree["campaignRunner"];
    assert_eq!(runner["driving"], true, "{runner}");
    assert!(runner["passes"].as_u64().unwrap() >= 1, "{runner}");
    assert!(runner["devicesTimedOut"].as_u64().unwrap() >= 1, "{runner}");
    assert!(runner["devicesNotified"].as_u64().unwrap() >= 2, "{runner}");
    assert!(runner["reportsRecorded"].as_u64().unwrap() >= 1, "{runner}");
    assert!(runner["mailbox"].as_u64().unwrap() >= 1, "{runner}");
}

/// Outside its maintenance window a campaign notifies nobody, and resuming it there does not
/// either: its devices wait, pending, for the window.
async fn a_closed_maintenance_window_holds_notifications(server: &TestServer, admin: &str) {
    let image = upload(server, admin, "2.6.0", "", &image(13, 5_000)).await;
    let devices = register_fleet(server, admin, "nightly", 2, "sensor").await;
    let fleet = fleet(server, |_| {});
    let _sims = connect_all(server, &devices, &fleet);
    // A window that opens two hours from now.
    let now = chrono::Utc::now();
    let at = |hours: i64| (now + chrono::Duration::hours(hours)).format("%H:00").to_string();
    let created = create(
        server,
        admin,
        json!({"firmwareId": image["id"], "target": {"tags": ["nightly"]}, "timeoutSecs": 60,
               "maintenanceWindow": {"start": at(2), "end": at(3)}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let passes = || async {
        let (_, tree) = server.get("/admin/actors", admin).await;
        tree["campaignRunner"]["passes"].as_u64().unwrap_or(0)
    };
    // Some passes of the runner over the running campaign, then: nobody notified.
    let start = passes().await;
    eventually(WAIT, "three runner passes", || async {
        passes().await >= start + 3
    })
    .await;
    let held = campaign(server, admin, &id).await;
    assert_eq!(held["status"], "running", "{held}");
    assert_eq!(held["counts"]["pending"], 2, "{held}");
    assert_eq!(held["counts"]["notified"], 0, "{held}");
    // Paused and resumed outside the window: still nobody.
    for action in ["pause", "resume"] {
        let (status, body) = server
            .call(
                Method::POST,
                &format!("/api/campaigns/{id}/{action}"),
                Some(admin),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{action}: {body}");
    }
    let start = passes().await;
    eventually(WAIT, "three runner passes", || async {
        passes().await >= start + 3
    })
    .await;
    let held = campaign(server, admin, &id).await;
    assert_eq!(held["counts"]["pending"], 2, "{held}");
    let (status, cancelled) = server
        .call(
            Method::POST,
            &format!("/api/campaigns/{id}/cancel"),
            Some(admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
}

async fn an_offline_device_gets_its_job_when_it_connects(server: &TestServer, admin: &str, next: &Value) {
    let devices = register_fleet(server, admin, "offline", 1, "sensor").await;
    let (device, token) = &devices[0];
    let created = create(
        server,
        admin,
        json!({"firmwareId": next["id"], "target": {"deviceIds": [device]}, "timeoutSecs": 120}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    eventually(WAIT, "the offline device notified", || async {
        device_job(server, admin, &id, device).await["state"] == "notified"
    })
    .await;
    // While a campaign runs, its image cannot be deleted.
    let (status, refused) = server
        .delete(&format!("/api/firmware/{}", next["id"].as_str().unwrap()), admin)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let fleet = fleet(server, |_| {});
    let _sim = connect(server, device, token, &fleet);
    let done = wait_for_status(server, admin, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");
    assert_eq!(reported_firmware(server, admin, device).await, "1.1.0");
}

async fn tampered_images_are_refused_by_the_device(server: &TestServer, admin: &str) {
    // Bytes changed on disk after registration: the checksum no longer matches.
    let tampered = upload(server, admin, "3.0.0", "", &image(4, 20_000)).await;
    let tenant = server
        .state
        .config
        .storage
        .data_dir
        .join("firmware")
        .join("default");
    let path = tenant.join(format!("{}.bin", tampered["id"].as_str().unwrap()));
    assert!(path.exists(), "image stored at {}", path.display());
    std::fs::write(&path, image(5, 20_000)).unwrap();
    let devices = register_fleet(server, admin, "tamper", 1, "sensor").await;
    let fleet_ok = fleet(server, |_| {});
    let _sim = connect(server, &devices[0].0, &devices[0].1, &fleet_ok);
    let created = create(
        server,
        admin,
        json!({"firmwareId": tampered["id"], "target": {"deviceIds": [devices[0].0]}, "timeoutSecs": 60,
               "failureRule": {"maxFailureRate": 1.0}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    eventually(WAIT, "the device refused the tampered image", || async {
        device_job(server, admin, &id, &devices[0].0).await["state"] == "failed"
    })
    .await;
    let job = device_job(server, admin, &id, &devices[0].0).await;
    assert!(
        job["reason"].as_str().unwrap().contains("sha256 mismatch"),
        "{job}"
    );
    assert_ne!(reported_firmware(server, admin, &devices[0].0).await, "3.0.0");

    // A manifest signed by another key than the one the device trusts.
    let genuine = upload(server, admin, "3.0.1", "", &image(6, 20_000)).await;
    let devices = register_fleet(server, admin, "forged", 1, "sensor").await;
    let other_key = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=".to_string();
    let wary = fleet(server, |s| s.trusted_key = Some(other_key));
    let _sim = connect(server, &devices[0].0, &devices[0].1, &wary);
    let created = create(
        server,
        admin,
        json!({"firmwareId": genuine["id"], "target": {"deviceIds": [devices[0].0]}, "timeoutSecs": 60,
               "failureRule": {"maxFailureRate": 1.0}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    eventually(WAIT, "the device refused the manifest", || async {
        device_job(server, admin, &id, &devices[0].0).await["state"] == "failed"
    })
    .await;
    let job = device_job(server, admin, &id, &devices[0].0).await;
    assert!(job["reason"].as_str().unwrap().contains("signature"), "{job}");
    assert_eq!(wary.counters.bytes_downloaded.load(Ordering::Relaxed), 0);
}

async fn an_interrupted_download_resumes(server: &TestServer, admin: &str) {
    let image = upload(server, admin, "4.0.0", "", &image(7, 120_000)).await;
    let devices = register_fleet(server, admin, "resume", 2, "sensor").await;
    let flaky_link = fleet(server, |s| s.interrupt_download_after = Some(50_000));
    let _sims = connect_all(server, &devices, &flaky_link);
    let created = create(
        server,
        admin,
        json!({"firmwareId": image["id"], "target": {"tags": ["resume"]}, "timeoutSecs": 60}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let done = wait_for_status(server, admin, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 2, "{done}");
    assert_eq!(flaky_link.counters.resumed.load(Ordering::Relaxed), 2);
    // Each device fetched the image once in all: half, then the rest.
    assert_eq!(
        flaky_link.counters.bytes_downloaded.load(Ordering::Relaxed),
        240_000
    );
}

async fn bad_input_is_refused(server: &TestServer, admin: &str, next: &Value) {
    let raw = |path: &str, content_type: &str, body: Vec<u8>| {
        server
            .client
            .post(server.url(path))
            .bearer_auth(admin)
            .header("Content-Type", content_type.to_string())
            .body(body)
            .send()
    };
    let response = raw(
        "/api/firmware?version=1.2",
        "application/octet-stream",
        image(1, 10),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_version"
    );
    let response = raw(
        "/api/firmware?version=1.1.0",
        "application/octet-stream",
        image(1, 10),
    )
    .await
    .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::CONFLICT,
        "a version is registered once"
    );
    let response = raw(
        "/api/firmware?version=9.9.9",
        "application/octet-stream",
        image(1, MAX_IMAGE as usize + 1),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
    let response = raw(
        "/api/firmware?version=9.9.8",
        "application/octet-stream",
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // Multipart: the same fields as a form.
    let boundary = "ota-test-boundary";
    let mut form = Vec::new();
    for (name, value) in [
        ("version", "5.0.0"),
        ("deviceTypes", "sensor,gateway"),
        ("notes", "form upload"),
    ] {
        form.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    form.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"fw.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    form.extend_from_slice(&image(9, 5000));
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let response = raw(
        "/api/firmware",
        &format!("multipart/form-data; boundary={boundary}"),
        form,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let uploaded: Value = response.json().await.unwrap();
    assert_eq!(uploaded["size"], 5000);
    assert_eq!(uploaded["deviceTypes"], json!(["gateway", "sensor"]));
    assert_eq!(uploaded["notes"], "form upload");

    for (body, code) in [
        (
            json!({"firmwareId": "no-such-image", "target": {"group": "all"}}),
            "unknown_firmware",
        ),
        (
            json!({"firmwareId": next["id"], "target": {}}),
            "validation_failed",
        ),
        (
            json!({"firmwareId": next["id"], "target": {"tags": ["nobody-has-this"]}}),
            "empty_target",
        ),
        (
            json!({"firmwareId": next["id"], "target": {"deviceIds": ["ghost"]}}),
            "unknown_device",
        ),
        (
            json!({"firmwareId": next["id"], "target": {"tags": ["staged"]}, "rollout": {"stages": [50, 10, 100]}}),
            "validation_failed",
        ),
        (
            json!({"firmwareId": next["id"], "target": {"tags": ["staged"]}, "failureRule": {"maxFailureRate": 2}}),
            "validation_failed",
        ),
        (
            json!({"firmwareId": next["id"], "target": {"tags": ["staged"]}, "timeoutSecs": 1}),
            "validation_failed",
        ),
        (
            json!({"firmwareId": next["id"], "target": {"tags": ["staged"]}, "maintenanceWindow": {"start": "25:00", "end": "01:00"}}),
            "validation_failed",
        ),
    ] {
        let (status, refused) = server.post("/api/campaigns", admin, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {refused}");
        assert_eq!(refused["error"]["code"], code, "{body}: {refused}");
    }
    // Firmware for gateways only fits none of the sensors.
    let gateway = upload(server, admin, "6.0.0", "gateway", &image(10, 1000)).await;
    let (status, refused) = server
        .post(
            "/api/campaigns",
            admin,
            json!({"firmwareId": gateway["id"], "target": {"tags": ["staged"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["code"], "no_device_fits");
    let (status, _) = server.get("/api/campaigns/nope", admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server.get("/api/campaigns?status=sleeping", admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn tenants_and_roles_are_enforced(server: &TestServer, admin: &str, next: &Value) {
    let firmware_id = next["id"].as_str().unwrap();
    let (status, list) = server.get("/api/campaigns", admin).await;
    assert_eq!(status, StatusCode::OK);
    let campaign_id = list["campaigns"][0]["id"].as_str().unwrap().to_string();

    // Another tenant sees none of it, and its devices cannot download it.
    let other = server.tenant_admin(admin, "rival").await;
    let rival_device = server
        .register(&other, json!({"deviceId": "rival-01", "type": "sensor"}))
        .await;
    let (_, devices) = server
        .get(&format!("/api/campaigns/{campaign_id}/devices"), admin)
        .await;
    let campaign_device = devices["devices"][0]["deviceId"].as_str().unwrap().to_string();
    for path in [
        format!("/api/firmware/{firmware_id}"),
        format!("/api/campaigns/{campaign_id}"),
        format!("/api/campaigns/{campaign_id}/devices"),
        format!("/api/campaigns/{campaign_id}/devices/{campaign_device}"),
    ] {
        let (status, body) = server.get(&path, &other).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (_, rival_list) = server.get("/api/firmware", &other).await;
    assert_eq!(rival_list["firmware"], json!([]));
    let (_, rival_campaigns) = server.get("/api/campaigns", &other).await;
    assert_eq!(rival_campaigns["total"], 0);
    for action in ["pause", "resume", "cancel", "rollback"] {
        let (status, body) = server
            .call(
                Method::POST,
                &format!("/api/campaigns/{campaign_id}/{action}"),
                Some(&other),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}: {body}");
    }
    let (status, _) = server
        .delete(&format!("/api/firmware/{firmware_id}"), &other)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let response = server
        .client
        .get(server.url(&format!("/api/firmware/{firmware_id}/download")))
        .bearer_auth(&rival_device)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (status, _) = server
        .post(
            "/api/campaigns",
            &other,
            json!({"firmwareId": firmware_id, "target": {"deviceIds": ["rival-01"]}}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "another tenant's firmware is unknown"
    );

    // A viewer reads; changing anything needs an operator.
    let viewer = server.api_key(admin, "viewer").await;
    for path in [
        "/api/firmware".to_string(),
        format!("/api/firmware/{firmware_id}"),
        format!("/api/firmware/{firmware_id}/download"),
        "/api/campaigns".into(),
        format!("/api/campaigns/{campaign_id}"),
        format!("/api/campaigns/{campaign_id}/devices"),
        format!("/api/campaigns/{campaign_id}/devices/{campaign_device}"),
        "/api/firmware/signing-key".into(),
    ] {
        let (status, body) = server.get(&path, &viewer).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let response = server
        .client
        .post(server.url("/api/firmware?version=7.0.0"))
        .bearer_auth(&viewer)
        .header("Content-Type", "application/octet-stream")
        .body(image(1, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let (status, _) = server
        .post(
            "/api/campaigns",
            &viewer,
            json!({"firmwareId": firmware_id, "target": {"tags": ["staged"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for action in ["pause", "resume", "cancel", "rollback"] {
        let (status, body) = server
            .call(
                Method::POST,
                &format!("/api/campaigns/{campaign_id}/{action}"),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{action}: {body}");
    }
    let (status, _) = server
        .delete(&format!("/api/firmware/{firmware_id}"), &viewer)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Without credentials, nothing.
    for (method, path) in [
        (Method::GET, "/api/firmware".to_string()),
        (Method::GET, format!("/api/firmware/{firmware_id}")),
        (Method::GET, format!("/api/firmware/{firmware_id}/download")),
        (Method::GET, "/api/firmware/signing-key".into()),
        (Method::POST, "/api/firmware?version=7.0.1".into()),
        (Method::DELETE, format!("/api/firmware/{firmware_id}")),
        (Method::GET, "/api/campaigns".into()),
        (Method::POST, "/api/campaigns".into()),
        (Method::GET, format!("/api/campaigns/{campaign_id}")),
        (Method::GET, format!("/api/campaigns/{campaign_id}/devices")),
        (
            Method::GET,
            format!("/api/campaigns/{campaign_id}/devices/{campaign_device}"),
        ),
        (Method::POST, format!("/api/campaigns/{campaign_id}/pause")),
        (Method::POST, format!("/api/campaigns/{campaign_id}/resume")),
        (Method::POST, format!("/api/campaigns/{campaign_id}/cancel")),
        (Method::POST, format!("/api/campaigns/{campaign_id}/rollback")),
    ] {
        let (status, body) = server.call(method.clone(), &path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
    }
}

async fn the_api_document_describes_fleet_operations(server: &TestServer) {
    let (status, doc) = server.call(Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for (path, method) in [
        ("/api/firmware", "post"),
        ("/api/firmware", "get"),
        ("/api/firmware/{id}", "get"),
        ("/api/firmware/{id}", "delete"),
        ("/api/firmware/{id}/download", "get"),
        ("/api/firmware/signing-key", "get"),
        ("/api/campaigns", "post"),
        ("/api/campaigns", "get"),
        ("/api/campaigns/{id}", "get"),
        ("/api/campaigns/{id}/devices", "get"),
        ("/api/campaigns/{id}/devices/{deviceId}", "get"),
        ("/api/campaigns/{id}/pause", "post"),
        ("/api/campaigns/{id}/resume", "post"),
        ("/api/campaigns/{id}/cancel", "post"),
        ("/api/campaigns/{id}/rollback", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not described"
        );
    }
}

async fn a_campaign_survives_a_restart(server: &mut TestServer, admin: &str) {
    let image = upload(server, admin, "8.0.0", "", &image(11, 10_000)).await;
    let devices = register_fleet(server, admin, "restart", 3, "sensor").await;
    let created = create(
        server,
        admin,
        json!({"firmwareId": image["id"], "target": {"deviceIds": devices.iter().map(|d| &d.0).collect::<Vec<_>>()},
               "rollout": {"batchSize": 1}, "timeoutSecs": 300}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    // Only the first device is online: the campaign finishes stage 1 and waits in stage 2.
    let fleet_before = fleet(server, |_| {});
    let first = connect(server, &devices[0].0, &devices[0].1, &fleet_before);
    eventually(WAIT, "stage 2 started", || async {
        campaign(server, admin, &id).await["stage"] == 2
    })
    .await;
    drop(first);

    server.restart();
    let admin = server.admin_token().await;
    let after = campaign(server, &admin, &id).await;
    assert_eq!(after["status"], "running", "{after}");
    assert_eq!(after["stage"], 2);
    assert_eq!(after["counts"]["succeeded"], 1);
    let fleet_after = fleet(server, |_| {});
    let _sims = connect_all(server, &devices[1..], &fleet_after);
    let done = wait_for_status(server, &admin, &id, "completed").await;
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");
}
