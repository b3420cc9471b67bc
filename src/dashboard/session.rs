//! `DashboardSession`: one `/ws` client. Forwards its tenant's alarms and the telemetry of the
//! devices it subscribed to as text frames, answers pings, and ends when the client closes or
//! stops answering.
//!
//! The first frame of every session is `{"type":"hello","tenant":"…"}`: it tells the client
//! the stream is open and whose it is (`drover-load monitor` and the tests wait for it before
//! subscribing).
//!
//! The client subscribes with text frames:
//! `{"type":"subscribe","devices":["pump-1","pump-2"]}` (or `"devices":"*"` for every device
//! of the tenant) and `{"type":"unsubscribe","devices":[…]|"*"}`; each is answered with
//! `{"type":"subscribed","all":…,"devices":[…]}`, or `{"type":"error",…}`.
//!
//! The session's credential is checked again every [`CREDENTIAL_RECHECK`] and before each
//! request: once it no longer authenticates (API key revoked or expired, password changed,
//! user disabled, login token expired) the socket is closed with 1008 (policy violation) and
//! the reason `credential revoked`, and nothing more is sent.

use std::time::{Duration, Instant};

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Session};
use drover_actors::{DeviceId, TenantId};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::hub::{DashboardHub, LiveMessage, MAX_WATCHED_DEVICES, TelemetryWatch};
use crate::http::principal::CredentialCheck;
use crate::storage::registry::RegistryStore;

const HEARTBEAT: Duration = Duration::from_secs(15);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
pub use crate::http::principal::CREDENTIAL_RECHECK;

pub struct DashboardSession {
    pub tenant: TenantId,
    pub session: Session,
    pub hub: DashboardHub,
    pub registry: RegistryStore,
    pub credential: CredentialCheck,
}

/// What a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum ClientMessage {
    Subscribe { devices: Devices },
    Unsubscribe { devices: Devices },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Devices {
    List(Vec<String>),
    /// `"*"`: every device of the tenant.
    All(String),
}

impl DashboardSession {
    /// Runs until the client goes away.
    pub async fn run(mut self, stream: actix_ws::MessageStream) {
        let mut events = self.hub.subscribe();
        let mut watch = self.hub.telemetry_watch(&self.tenant);
        let mut stream = stream.aggregate_continuations().max_continuation_size(64 * 1024);
        let hello = LiveMessage::Hello {
            tenant: self.tenant.to_string(),
        };
        if !self.send(&hello).await {
            return;
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + CREDENTIAL_RECHECK,
            CREDENTIAL_RECHECK,
        );
        let mut last_heard = Instant::now();
        let mut close_reason = None;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) if event.tenant == self.tenant => {
                        if self.session.text(event.json.to_string()).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        if !self.send(&LiveMessage::Lagged { stream: "alarms", missed }).await {
                            break;
                        }
                    }
                    Err(RecvError::Closed) => break,
                },
                Some(frame) = watch.next_frame() => {
                    let missed = watch.take_missed();
                    if missed > 0 && !self.send(&LiveMessage::Lagged { stream: "telemetry", missed }).await {
                        break;
                    }
                    if self.session.text(frame.to_string()).await.is_err() {
                        break;
                    }
                }
                frame = stream.next() => match frame {
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        last_heard = Instant::now();
                        if self.session.pong(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        last_heard = Instant::now();
                        if !self.credential.still_valid(&self.tenant).await {
                            close_reason = Some(revoked());
                            break;
                        }
                        let answer = self.request(&mut watch, text.as_bytes()).await;
                        if !self.send(&answer).await {
                            break;
                        }
                    }
                    Some(Ok(AggregatedMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => last_heard = Instant::now(),
                },
                _ = recheck.tick() => {
                    if !self.credential.still_valid(&self.tenant).await {
                        close_reason = Some(revoked());
                        break;
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > CLIENT_TIMEOUT || self.session.ping(b"").await.is_err() {
                        break;
                    }
                }
            }
        }
        if close_reason.is_some() {
            tracing::info!(tenant = %self.tenant, "live stream closed: its credential no longer authenticates");
        }
        let _ = self.session.close(close_reason).await;
    }

    async fn send(&mut self, message: &LiveMessage<'_>) -> bool {
        match serde_json::to_string(message) {
            Ok(text) => self.session.text(text).await.is_ok(),
            Err(_) => true,
        }
    }

    /// Carries out a subscribe or unsubscribe request and says what the session watches now.
    async fn request(&self, watch: &mut TelemetryWatch, text: &[u8]) -> LiveMessage<'static> {
        let request: ClientMessage = match serde_json::from_slice(text) {
            Ok(request) => request,
            Err(e) => {
                return refusal(
                    "invalid_request",
                    format!(
                        "expected {{\"type\":\"subscribe\"|\"unsubscribe\",\"devices\":[…] or \"*\"}}: {e}"
                    ),
                );
            }
        };
        let (subscribe, devices) = match request {
            ClientMessage::Subscribe { devices } => (true, devices),
            ClientMessage::Unsubscribe { devices } => (false, devices),
        };
        match devices {
            Devices::All(star) if star == "*" => {
                if subscribe {
                    watch.watch_all();
                } else {
                    watch.unwatch_all();
                }
            }
            Devices::All(other) => {
                return refusal(
                    "invalid_request",
                    format!("devices must be a list of device ids or \"*\", not {other:?}"),
                );
            }
            Devices::List(names) => {
                let mut ids = Vec::with_capacity(names.len());
                let mut invalid = Vec::new();
                for name in names {
                    match DeviceId::parse(name.clone()) {
                        Ok(id) => ids.push(id),
                        Err(_) => invalid.push(name),
                    }
                }
                if !invalid.is_empty() {
                    return LiveMessage::Error {
                        code: "invalid_device_id",
                        message: "these are not valid device ids; nothing was changed".into(),
                        devices: invalid,
                    };
                }
                if !subscribe {
                    watch.unwatch(&ids);
                } else if ids.len() > MAX_WATCHED_DEVICES {
                    return too_many();
                } else {
                    let known = match self.registry.registered_devices(&self.tenant, &ids).await {
                        Ok(known) => known,
                        Err(e) => {
                            return refusal(
                                "unavailable",
                                format!("the device registry did not answer: {e}"),
                            );
                        }
                    };
                    let unknown: Vec<String> = ids
                        .iter()
                        .filter(|id| !known.contains(id))
                        .map(|id| id.to_string())
                        .collect();
                    if !unknown.is_empty() {
                        return LiveMessage::Error {
                            code: "unknown_device",
                            message: "no such devices in this tenant; nothing was changed".into(),
                            devices: unknown,
                        };
                    }
                    if watch.watch(&ids).is_err() {
                        return too_many();
                    }
                }
            }
        }
        let (all, devices) = watch.watched();
        LiveMessage::Subscribed { all, devices }
    }
}

fn revoked() -> CloseReason {
    CloseReason {
        code: CloseCode::Policy,
        description: Some("credential revoked".into()),
    }
}

fn refusal(code: &'static str, message: String) -> LiveMessage<'static> {
    LiveMessage::Error {
        code,
        message,
        devices: Vec::new(),
    }
}

fn too_many() -> LiveMessage<'static> {
    refusal(
        "too_many_devices",
        format!(
            "a session watches at most {MAX_WATCHED_DEVICES} devices by name; subscribe to \"*\" for the whole tenant"
        ),
    )
}
