//! `DashboardSession`: the actor of one `/ws` client. Forwards its tenant's alarms and the
//! telemetry of the devices it subscribed to as text frames, answers pings, and stops with its
//! socket (the client closes, stops answering, or its credential is revoked).
//!
//! It registers with the [`DashboardHub`] when it starts and unregisters when it stops, so
//! `GET /admin/actors` lists every session (tenant, subscriptions, frames sent and skipped,
//! age). Telemetry does not pass through the actor: the socket's body takes it from the
//! session's backlog directly and writes every pending frame at once (see
//! [`super::socket::LiveBody`]). The actor's own frames (answers, alarms) wait for room in the
//! socket's queue (`ctx.wait`): while the socket is slow the actor reads no more alarms, its
//! bounded backlogs fill and what does not fit is counted as skipped and reported to the
//! client in a `lagged` frame.
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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, Message, ProtocolError};
use drover_actors::{DeviceId, TenantId};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::hub::{DashboardHub, LiveEvent, LiveMessage, MAX_WATCHED_DEVICES, SessionStats, TelemetryWatch};
use super::socket::{LiveBody, Outbound};
use crate::http::principal::CredentialCheck;
use crate::storage::registry::RegistryStore;

const HEARTBEAT: Duration = Duration::from_secs(15);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest request a client may send (continuation frames aggregated).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
pub use crate::http::principal::CREDENTIAL_RECHECK;

/// What a `/ws` session needs to start.
pub struct SessionSpec {
    pub tenant: TenantId,
    /// Who opened it (`user:<name>` or `key:<id>`), as the audit log names callers.
    pub principal: String,
    pub stream: actix_ws::MessageStream,
    pub hub: DashboardHub,
    pub registry: RegistryStore,
    pub credential: CredentialCheck,
}

pub struct DashboardSession {
    tenant: TenantId,
    /// The socket's queue for the actor's frames.
    outbound: Outbound,
    hub: DashboardHub,
    registry: RegistryStore,
    credential: CredentialCheck,
    watch: TelemetryWatch,
    stats: Arc<SessionStats>,
    /// Taken when the actor starts (they become its streams).
    inputs: Option<SessionInputs>,
    last_heard: Instant,
    close_reason: Option<CloseReason>,
}

struct SessionInputs {
    client: actix_ws::MessageStream,
    alarms: broadcast::Receiver<LiveEvent>,
}

// ---- what the actor reads ------------------------------------------------------------------

/// One alarm event of the tenant broadcast, or how many the session missed.
struct AlarmFeed(Result<LiveEvent, u64>);

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

/// A request, parsed and checked as far as can be done without the registry.
enum Request {
    WatchAll,
    UnwatchAll,
    Watch(Vec<DeviceId>),
    Unwatch(Vec<DeviceId>),
}

/// A request after the credential check and the registry lookup it needed.
enum Checked {
    Revoked,
    Refused(LiveMessage<'static>),
    Apply(Request),
    /// A subscription to `ids`, of which `known` are devices of the tenant.
    Watch {
        ids: Vec<DeviceId>,
        known: Vec<DeviceId>,
    },
}

impl DashboardSession {
    /// The session, and the body of its WebSocket response (what it writes to the socket).
    pub fn new(spec: SessionSpec) -> (DashboardSession, LiveBody) {
        let (watch, frames) = spec.hub.telemetry_watch(&spec.tenant);
        let stats = spec.hub.session_stats(&watch, spec.principal);
        let alarms = spec.hub.subscribe();
        let (outbound, body) = LiveBody::new(frames, stats.clone());
        let session = DashboardSession {
            tenant: spec.tenant,
            outbound,
            registry: spec.registry,
            credential: spec.credential,
            watch,
            stats,
            inputs: Some(SessionInputs {
                client: spec.stream,
                alarms,
            }),
            hub: spec.hub,
            last_heard: Instant::now(),
            close_reason: None,
        };
        (session, body)
    }

    /// Queues `message` for the socket; while its queue is full nothing else is read until
    /// there is room. The actor stops when the socket is gone.
    fn send_frame(&mut self, message: Message, ctx: &mut Context<Self>) {
        use tokio::sync::mpsc::error::TrySendError;
        match self.outbound.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Closed(_)) => ctx.stop(),
            Err(TrySendError::Full(message)) => {
                let outbound = self.outbound.clone();
                ctx.wait(
                    async move { outbound.send(message).await }
                        .into_actor(self)
                        .map(|sent, _, ctx| {
                            if sent.is_err() {
                                ctx.stop();
                            }
                        }),
                );
            }
        }
    }

    fn send_text(&mut self, text: String, ctx: &mut Context<Self>) {
        self.send_frame(Message::Text(text.into()), ctx);
    }

    fn send(&mut self, message: &LiveMessage<'_>, ctx: &mut Context<Self>) {
        if let Ok(text) = serde_json::to_string(message) {
            self.send_text(text, ctx);
        }
    }

    fn lagged(&mut self, stream: &'static str, missed: u64, ctx: &mut Context<Self>) {
        self.stats.frames_skipped.fetch_add(missed, Ordering::Relaxed);
        self.send(&LiveMessage::Lagged { stream, missed }, ctx);
    }

    fn revoke(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(tenant = %self.tenant, "live stream closed: its credential no longer authenticates");
        self.close_reason = Some(revoked());
        ctx.stop();
    }

    /// Checks the credential, then carries out a subscribe or unsubscribe request and says
    /// what the session watches now. Requests are answered in the order they came.
    fn request(&mut self, text: &[u8], ctx: &mut Context<Self>) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let parsed = parse_request(text);
        let credential = self.credential.clone();
        let registry = self.registry.clone();
        let tenant = self.tenant.clone();
        let check = async move {
            if !credential.still_valid(&tenant).await {
                return Checked::Revoked;
            }
            match parsed {
                Err(refused) => Checked::Refused(refused),
                Ok(Request::Watch(ids)) => match registry.registered_devices(&tenant, &ids).await {
                    Ok(known) => Checked::Watch { ids, known },
                    Err(e) => Checked::Refused(refusal(
                        "unavailable",
                        format!("the device registry did not answer: {e}"),
                    )),
                },
                Ok(other) => Checked::Apply(other),
            }
        };
        ctx.wait(check.into_actor(self).map(|checked, act, ctx| {
            let answer = match checked {
                Checked::Revoked => return act.revoke(ctx),
                Checked::Refused(answer) => answer,
                Checked::Apply(request) => act.apply(request),
                Checked::Watch { ids, known } => {
                    let unknown: Vec<String> = ids
                        .iter()
                        .filter(|id| !known.contains(id))
                        .map(|id| id.to_string())
                        .collect();
                    if unknown.is_empty() {
                        act.apply(Request::Watch(ids))
                    } else {
                        LiveMessage::Error {
                            code: "unknown_device",
                            message: "no such devices in this tenant; nothing was changed".into(),
                            devices: unknown,
                        }
                    }
                }
            };
            act.send(&answer, ctx);
        }));
    }

    fn apply(&mut self, request: Request) -> LiveMessage<'static> {
        match request {
            Request::WatchAll => self.watch.watch_all(),
            Request::UnwatchAll => self.watch.unwatch_all(),
            Request::Unwatch(ids) => self.watch.unwatch(&ids),
            Request::Watch(ids) => {
                if self.watch.watch(&ids).is_err() {
                    return too_many();
                }
            }
        }
        let (all, devices) = self.watch.watched();
        self.stats.watching_all.store(all, Ordering::Relaxed);
        self.stats.watched_devices.store(devices.len(), Ordering::Relaxed);
        LiveMessage::Subscribed { all, devices }
    }
}

impl Actor for DashboardSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.hub.session_started(&self.stats);
        if let Some(inputs) = self.inputs.take() {
            ctx.add_stream(
                inputs
                    .client
                    .aggregate_continuations()
                    .max_continuation_size(MAX_REQUEST_BYTES),
            );
            ctx.add_stream(futures_util::stream::unfold(
                inputs.alarms,
                |mut alarms| async move {
                    let next = match alarms.recv().await {
                        Ok(event) => Ok(event),
                        Err(RecvError::Lagged(missed)) => Err(missed),
                        Err(RecvError::Closed) => return None,
                    };
                    Some((AlarmFeed(next), alarms))
                },
            ));
        }
        let hello = LiveMessage::Hello {
            tenant: self.tenant.to_string(),
        };
        self.send(&hello, ctx);
        ctx.run_interval(HEARTBEAT, |act, ctx| {
            if act.last_heard.elapsed() > CLIENT_TIMEOUT {
                ctx.stop();
                return;
            }
            act.send_frame(Message::Ping(Default::default()), ctx);
        });
        ctx.run_interval(CREDENTIAL_RECHECK, |act, ctx| {
            let credential = act.credential.clone();
            let tenant = act.tenant.clone();
            ctx.wait(
                async move { credential.still_valid(&tenant).await }
                    .into_actor(act)
                    .map(|valid, act, ctx| {
                        if !valid {
                            act.revoke(ctx);
                        }
                    }),
            );
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.hub.session_ended(self.stats.id);
        // Queued at once when there is room, so no telemetry is written after it.
        let close = Message::Close(self.close_reason.take());
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(close)) = self.outbound.try_send(close) {
            let outbound = self.outbound.clone();
            actix_rt::spawn(async move {
                let _ = outbound.send(close).await;
            });
        }
    }
}

impl StreamHandler<Result<AggregatedMessage, ProtocolError>> for DashboardSession {
    fn handle(&mut self, frame: Result<AggregatedMessage, ProtocolError>, ctx: &mut Context<Self>) {
        match frame {
            Ok(AggregatedMessage::Ping(bytes)) => {
                self.last_heard = Instant::now();
                self.send_frame(Message::Pong(bytes), ctx);
            }
            Ok(AggregatedMessage::Text(text)) => {
                self.last_heard = Instant::now();
                self.request(text.as_bytes(), ctx);
            }
            Ok(AggregatedMessage::Close(_)) | Err(_) => ctx.stop(),
            Ok(_) => self.last_heard = Instant::now(),
        }
    }

    /// The socket is gone: so is the session.
    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl StreamHandler<AlarmFeed> for DashboardSession {
    fn handle(&mut self, feed: AlarmFeed, ctx: &mut Context<Self>) {
        match feed.0 {
            Ok(event) if event.tenant == self.tenant => self.send_text(event.json.to_string(), ctx),
            Ok(_) => {}
            Err(missed) => self.lagged("alarms", missed, ctx),
        }
    }
}

/// Parses a client request and checks what can be checked without the registry.
fn parse_request(text: &[u8]) -> Result<Request, LiveMessage<'static>> {
    let request: ClientMessage = serde_json::from_slice(text).map_err(|e| {
        refusal(
            "invalid_request",
            format!("expected {{\"type\":\"subscribe\"|\"unsubscribe\",\"devices\":[…] or \"*\"}}: {e}"),
        )
    })?;
    let (subscribe, devices) = match request {
        ClientMessage::Subscribe { devices } => (true, devices),
        ClientMessage::Unsubscribe { devices } => (false, devices),
    };
    match devices {
        Devices::All(star) if star == "*" => Ok(if subscribe {
            Request::WatchAll
        } else {
            Request::UnwatchAll
        }),
        Devices::All(other) => Err(refusal(
            "invalid_request",
            format!("devices must be a list of device ids or \"*\", not {other:?}"),
        )),
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
                return Err(LiveMessage::Error {
                    code: "invalid_device_id",
                    message: "these are not valid device ids; nothing was changed".into(),
                    devices: invalid,
                });
            }
            if !subscribe {
                Ok(Request::Unwatch(ids))
            } else if ids.len() > MAX_WATCHED_DEVICES {
                Err(too_many())
            } else {
                Ok(Request::Watch(ids))
            }
        }
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
