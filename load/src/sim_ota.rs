//! The simulated device's side of OTA jobs (AWS IoT Jobs' shape, README "Fleet operations").
//!
//! On connect a device learns the firmware its shadow reports (reporting its initial version
//! when there is none), subscribes to `devices/{id}/jobs/notify` and asks for a pending job on
//! `devices/{id}/jobs/get`. For each job it checks the manifest's Ed25519 signature, downloads
//! the image with its own token — resuming with HTTP Range after an interruption — checks size
//! and SHA-256, "installs" it (an injectable share of devices fail here), reports the new
//! version in its shadow and then `SUCCEEDED` on `devices/{id}/jobs/{jobId}/update`. A bad
//! signature or checksum is reported `FAILED` with the reason; a job for another device type
//! would be `REJECTED`.
//!
//! Self-contained (rumqttc, reqwest, ring) so the server's integration tests drive the same
//! code the simulator runs.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::digest::{Context, SHA256};
use ring::signature::{ED25519, UnparsedPublicKey};
use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;
use serde_json::{Value, json};

/// How simulated devices behave towards OTA jobs.
#[derive(Debug, Clone)]
pub struct OtaSettings {
    /// The API's base URL (`http://127.0.0.1:8080`): job URLs are relative to it.
    pub api_base: String,
    /// The version a device reports when its shadow has none yet.
    pub initial_firmware: String,
    /// Share of jobs (0–1) whose install fails, picked by a hash of device and job so a run
    /// is reproducible.
    pub failure_rate: f64,
    /// How long an install takes.
    pub install_time: Duration,
    /// The public key to trust (base64); `None`: fetched from `GET /api/firmware/signing-key`.
    pub trusted_key: Option<String>,
    /// Cut the first download of each job after this many bytes, to resume it with Range.
    pub interrupt_download_after: Option<u64>,
}

impl Default for OtaSettings {
    fn default() -> Self {
        OtaSettings {
            api_base: "http://127.0.0.1:8080".into(),
            initial_firmware: "1.0.0".into(),
            failure_rate: 0.0,
            install_time: Duration::from_millis(200),
            trusted_key: None,
            interrupt_download_after: None,
        }
    }
}

/// What the simulated fleet did with jobs.
#[derive(Debug, Default)]
pub struct OtaCounters {
    pub jobs: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    /// Downloads resumed with a Range request.
    pub resumed: AtomicU64,
}

/// Shared by every simulated device: settings, HTTP client, the trusted key once fetched.
pub struct OtaFleet {
    pub settings: OtaSettings,
    pub counters: OtaCounters,
    http: reqwest::Client,
    key: tokio::sync::OnceCell<String>,
}

impl OtaFleet {
    pub fn new(settings: OtaSettings) -> Arc<OtaFleet> {
        Arc::new(OtaFleet {
            settings,
            counters: OtaCounters::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
            key: tokio::sync::OnceCell::new(),
        })
    }

    async fn trusted_key(&self, token: &str) -> Result<String, String> {
        if let Some(key) = &self.settings.trusted_key {
            return Ok(key.clone());
        }
        self.key
            .get_or_try_init(|| async {
                let response = self
                    .http
                    .get(format!("{}/api/firmware/signing-key", self.settings.api_base))
                    .bearer_auth(token)
                    .send()
                    .await
                    .map_err(|e| format!("signing key: {e}"))?;
                let body: Value = response.json().await.map_err(|e| format!("signing key: {e}"))?;
                body["publicKey"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("signing key: unexpected answer {body}"))
            })
            .await
            .cloned()
    }
}

/// What `devices/{id}/jobs/notify` carries.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub job_id: String,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub manifest: String,
    #[serde(default)]
    pub signature: String,
}

#[derive(Default)]
struct DeviceState {
    firmware: Option<String>,
    /// The job being worked on.
    working: Option<String>,
    /// Jobs finished or cancelled (a notification repeated after a reconnect is ignored).
    done: HashSet<String>,
}

/// One simulated device's OTA side.
pub struct OtaDevice {
    pub id: String,
    token: String,
    fleet: Arc<OtaFleet>,
    state: Mutex<DeviceState>,
}

impl OtaDevice {
    pub fn new(id: &str, token: &str, fleet: Arc<OtaFleet>) -> Arc<OtaDevice> {
        Arc::new(OtaDevice {
            id: id.to_string(),
            token: token.to_string(),
            fleet,
            state: Mutex::new(DeviceState::default()),
        })
    }

    fn topic(&self, tail: &str) -> String {
        format!("devices/{}/{tail}", self.id)
    }

    /// After each CONNACK: subscribe, learn the reported version, ask for a pending job.
    pub async fn on_connected(&self, client: &AsyncClient) {
        let _ = client
            .subscribe(self.topic("jobs/notify"), QoS::AtLeastOnce)
            .await;
        // `accepted` carries the shadow; `rejected` says there is none yet.
        let _ = client
            .subscribe(self.topic("shadow/get/+"), QoS::AtLeastOnce)
            .await;
        let _ = client
            .publish(self.topic("shadow/get"), QoS::AtLeastOnce, false, "{}")
            .await;
        let _ = client
            .publish(self.topic("jobs/get"), QoS::AtLeastOnce, false, "{}")
            .await;
    }

    /// Takes an incoming publish if it is about OTA; `true` when it was.
    pub fn handle(self: &Arc<Self>, client: &AsyncClient, topic: &str, payload: &[u8]) -> bool {
        if topic == self.topic("shadow/get/accepted") {
            self.adopt_reported(client, payload);
            return true;
        }
        if topic == self.topic("shadow/get/rejected") {
            self.adopt_reported(client, b"{}");
            return true;
        }
        if topic != self.topic("jobs/notify") {
            return false;
        }
        let Ok(notification) = serde_json::from_slice::<Notification>(payload) else {
            return true;
        };
        let mut state = self.state.lock().expect("state");
        if notification.operation == "cancel" {
            state.done.insert(notification.job_id);
            return true;
        }
        if state.done.contains(&notification.job_id) || state.working.is_some() {
            return true;
        }
        state.working = Some(notification.job_id.clone());
        drop(state);
        let device = self.clone();
        let client = client.clone();
        tokio::spawn(async move {
            device.fleet.counters.jobs.fetch_add(1, Ordering::Relaxed);
            let job = notification.job_id.clone();
            let outcome = device.run_job(&client, &notification).await;
            let report = match &outcome {
                Ok(()) => {
                    device.fleet.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                    json!({"status": "SUCCEEDED"})
                }
                Err(reason) => {
                    device.fleet.counters.failed.fetch_add(1, Ordering::Relaxed);
                    json!({"status": "FAILED", "reason": reason})
                }
            };
            let cancelled = {
                let mut state = device.state.lock().expect("state");
                state.working = None;
                !state.done.insert(job.clone())
            };
            if !cancelled {
                device.report(&client, &job, report).await;
            }
        });
        true
    }

    /// The shadow's reported `firmware`, or the initial version reported now.
    fn adopt_reported(&self, client: &AsyncClient, payload: &[u8]) {
        let reported = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v["state"]["reported"]["firmware"].as_str().map(str::to_string));
        let mut state = self.state.lock().expect("state");
        match reported {
            Some(version) => state.firmware = Some(version),
            None if state.firmware.is_none() => {
                let version = self.fleet.settings.initial_firmware.clone();
                state.firmware = Some(version.clone());
                let body = json!({"state": {"reported": {"firmware": version}}}).to_string();
                let _ = client.try_publish(self.topic("shadow/update"), QoS::AtLeastOnce, false, body);
            }
            None => {}
        }
    }

    async fn report(&self, client: &AsyncClient, job: &str, body: Value) {
        let _ = client
            .publish(
                self.topic(&format!("jobs/{job}/update")),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await;
    }

    /// Verify, download, check, install, report the version.
    async fn run_job(&self, client: &AsyncClient, job: &Notification) -> Result<(), String> {
        if job.operation != "update_firmware" {
            return Err(format!("unknown operation {:?}", job.operation));
        }
        self.report(
            client,
            &job.job_id,
            json!({"status": "IN_PROGRESS", "progress": 0}),
        )
        .await;
        // The manifest must be signed by the platform and describe what the job says.
        let key = self.fleet.trusted_key(&self.token).await?;
        if !verify(&key, job.manifest.as_bytes(), &job.signature) {
            return Err("manifest signature mismatch".into());
        }
        let manifest: Value =
            serde_json::from_str(&job.manifest).map_err(|e| format!("manifest unreadable: {e}"))?;
        if manifest["sha256"].as_str() != Some(job.sha256.as_str())
            || manifest["size"].as_u64() != Some(job.size)
            || manifest["version"].as_str() != Some(job.version.as_str())
        {
            return Err("the job does not match its signed manifest".into());
        }
        let digest = self.download(client, job).await?;
        if digest != job.sha256 {
            return Err(format!("sha256 mismatch: got {digest}, expected {}", job.sha256));
        }
        tokio::time::sleep(self.fleet.settings.install_time).await;
        if injected_failure(&self.id, &job.job_id, self.fleet.settings.failure_rate) {
            return Err("install failed: flash write error (injected)".into());
        }
        self.state.lock().expect("state").firmware = Some(job.version.clone());
        let body = json!({"state": {"reported": {"firmware": job.version}}}).to_string();
        client
            .publish(self.topic("shadow/update"), QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| format!("shadow report: {e}"))?;
        Ok(())
    }

    /// Downloads the image, resuming with `Range` after an interruption; returns its SHA-256.
    async fn download(&self, client: &AsyncClient, job: &Notification) -> Result<String, String> {
        let url = format!("{}{}", self.fleet.settings.api_base, job.url);
        let mut hash = Context::new(&SHA256);
        let mut have: u64 = 0;
        let mut cut = self.fleet.settings.interrupt_download_after;
        let mut last_progress = 0u64;
        let mut busy_waits = 0u32;
        let mut attempt = 0;
        while attempt < 5 {
            attempt += 1;
            let mut request = self.fleet.http.get(&url).bearer_auth(&self.token);
            if have > 0 {
                request = request.header("Range", format!("bytes={have}-"));
                self.fleet.counters.resumed.fetch_add(1, Ordering::Relaxed);
            }
            let mut response = match request.send().await {
                Ok(r) => r,
                Err(_) if attempt < 5 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => return Err(format!("download: {e}")),
            };
            let status = response.status().as_u16();
            if status == 503 {
                // The server serves so many downloads at once: wait as told, then resume.
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                busy_waits += 1;
                attempt -= 1;
                if busy_waits > 600 {
                    return Err("download: the server stayed busy".into());
                }
                tokio::time::sleep(Duration::from_millis(
                    wait * 1000 / 2 + jitter_ms(&self.id, busy_waits),
                ))
                .await;
                continue;
            }
            if !(status == 200 && have == 0 || status == 206 && have > 0) {
                return Err(format!("download: HTTP {status}"));
            }
            let mut interrupted = false;
            loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => {
                        let mut chunk = &chunk[..];
                        if let Some(limit) = cut
                            && have + chunk.len() as u64 >= limit
                        {
                            chunk = &chunk[..(limit - have) as usize];
                            interrupted = true;
                        }
                        hash.update(chunk);
                        have += chunk.len() as u64;
                        self.fleet
                            .counters
                            .bytes_downloaded
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        let progress = (have * 90 / job.size.max(1)).min(90);
                        if progress >= last_progress + 30 {
                            last_progress = progress;
                            self.report(
                                client,
                                &job.job_id,
                                json!({"status": "IN_PROGRESS", "progress": progress}),
                            )
                            .await;
                        }
                        if interrupted {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        interrupted = true;
                        break;
                    }
                }
            }
            if interrupted {
                // Dropping the response closes the connection, as a lost link would.
                cut = None;
                continue;
            }
            if have != job.size {
                return Err(format!("size mismatch: got {have} bytes, expected {}", job.size));
            }
            return Ok(hex(hash.finish().as_ref()));
        }
        Err("download: gave up after 5 attempts".into())
    }
}

/// Whether `signature` (base64) is `key`'s (base64) Ed25519 signature of `message`.
pub fn verify(key: &str, message: &[u8], signature: &str) -> bool {
    let (Ok(key), Ok(signature)) = (BASE64.decode(key), BASE64.decode(signature)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, &signature)
        .is_ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Up to a second, spread over devices and retries so busy devices do not retry in lockstep.
fn jitter_ms(device: &str, retry: u32) -> u64 {
    let digest = ring::digest::digest(&SHA256, format!("{device}/{retry}").as_bytes());
    u64::from(u16::from_be_bytes([digest.as_ref()[0], digest.as_ref()[1]])) % 1000
}

/// A reproducible draw: the same device fails the same job on every run.
fn injected_failure(device: &str, job: &str, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    let digest = ring::digest::digest(&SHA256, format!("{device}/{job}").as_bytes());
    let draw = u64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap_or_default());
    (draw as f64 / u64::MAX as f64) < rate
}
