//! `DeviceActor`: the single owner of one device's live state.
//!
//! Everything about a device that changes at run time (connection status, shadow, command
//! correlation, OTA progress) is changed by this actor and nobody else. It is started by its
//! tenant's [`TenantSupervisor`](crate::TenantSupervisor), rebuilds its state from the registry
//! when it starts, and tells the supervisor when it goes away, however it goes (including a
//! panic in a handler), so the supervisor can restart it.

pub mod commands;
pub mod jobs;
mod shadow_ops;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::WeakRecipient;
use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::device::DeviceRecord;
use crate::directory::DeviceDirectory;
use crate::ids::{DeviceId, TenantId};
use crate::outbound::ShadowServices;
use crate::pipeline::{Pipeline, TelemetryAccepted};
use crate::presence::PresenceSink;
use crate::shadow::{ShadowDocument, ShadowError};
use crate::telemetry::schema::DeviceTypeSchema;
use crate::telemetry::store::PointBatch;
use crate::telemetry::{TelemetryPoint, parse_payload};
use crate::telemetry_writer::{Backpressure, Queued, TryEnqueueError, WriteError};

// ---- messages received -------------------------------------------------------------------

/// Returns a snapshot of the actor's state.
#[derive(Message)]
#[rtype(result = "DeviceSnapshot")]
pub struct GetDeviceState {}

/// Returns how many telemetry messages the actor took in since it started (cheap: for
/// sampling every device's activity, see `TenantSupervisor`'s `SampleActivity`).
#[derive(Message)]
#[rtype(result = "u64")]
pub struct GetTelemetryCount {}

/// The device opened a connection (an MQTT session, a WebSocket).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeviceConnected {
    /// Identifies the connection, so a late disconnect of an older one is ignored.
    pub connection: u64,
    /// `mqtt/3.1.1`, `mqtt/5`, `websocket`…
    pub protocol: &'static str,
    pub at: DateTime<Utc>,
}

/// A connection of the device closed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeviceDisconnected {
    pub connection: u64,
    pub at: DateTime<Utc>,
}

/// What a device published that the platform itself handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundKind {
    /// `devices/{id}/telemetry`
    Telemetry,
    /// `devices/{id}/shadow/update`
    ShadowUpdate,
    /// `devices/{id}/shadow/get`
    ShadowGet,
    /// `devices/{id}/commands/{command}/response`, with the MQTT 5 Correlation Data if any.
    CommandResponse {
        command: String,
        correlation: Option<bytes::Bytes>,
    },
    /// `devices/{id}/jobs/{job}/update`
    JobUpdate { job: String },
    /// `devices/{id}/jobs/get`
    JobGet,
}

/// A publish of the device on one of its platform topics. The reply comes when the platform
/// has taken the message in (the broker acknowledges QoS 1/2 publishes only then).
#[derive(Message, Debug)]
#[rtype(result = "Result<InboundAccepted, InboundError>")]
pub struct DeviceInbound {
    pub kind: InboundKind,
    pub payload: bytes::Bytes,
    pub at: DateTime<Utc>,
    /// What to do when the telemetry writers are full: wait (MQTT QoS 1/2), refuse (HTTP,
    /// WebSocket) or drop (QoS 0). Telemetry is answered after its commit except with `Drop`.
    pub backpressure: Backpressure,
}

/// An inbound message the platform took in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboundAccepted {
    /// Telemetry points it carried (0 for other kinds).
    pub points: usize,
}

/// Why an inbound message was not taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    /// The message itself is wrong (a stable code and a message for the sender).
    #[error("{code}: {message}")]
    Rejected { code: &'static str, message: String },
    /// The telemetry writers are full; the sender should retry shortly.
    #[error("busy: the telemetry writers are full")]
    Busy,
    /// The platform cannot take it now; the sender should retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// The schema of a device type changed: actors of that type read it again.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct DeviceTypeChanged {
    pub device_type: String,
}

/// A shadow request from the API (the device's own arrive as [`DeviceInbound`]). Answers
/// what `get/accepted` or `update/accepted` carry. An accepted update is published on the
/// device's shadow topics like one from the device.
#[derive(Message, Debug)]
#[rtype(result = "Result<serde_json::Value, ShadowError>")]
pub struct ShadowRequest {
    pub action: ShadowAction,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub enum ShadowAction {
    /// The whole document with its delta.
    Get,
    /// An update request body (`{"state": {...}, "version": N, "clientToken": "..."}`).
    Update { payload: bytes::Bytes },
}

/// A shadow request an application published on the device's `shadow/update` or `shadow/get`
/// topic (AWS lets any authorized client do so). Handled like the device's own, answered on the
/// shadow topics, but not a sign of life of the device.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PublishedShadowRequest {
    pub topic: ShadowTopic,
    pub payload: bytes::Bytes,
    pub at: DateTime<Utc>,
}

/// Which shadow request topic a message was published on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowTopic {
    /// `devices/{id}/shadow/update`
    Update,
    /// `devices/{id}/shadow/get`
    Get,
}

/// The `update/delta` payload to send a device that just (re)subscribed to its delta topic,
/// `None` when its shadow has no delta.
#[derive(Message, Debug)]
#[rtype(result = "Option<bytes::Bytes>")]
pub struct PendingShadowDelta {}

/// Stops the actor on purpose (device deleted, idle, shutdown); it is not restarted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {}

/// Makes the actor's handler panic, so tests (here and of the whole server) can exercise
/// supervision. Nothing in the API sends it.
#[doc(hidden)]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash {}

// ---- messages sent -------------------------------------------------------------------------

/// Why a device actor went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Stopped on purpose; do not restart.
    Stopped,
    /// The device is no longer registered; do not restart.
    Unregistered,
    /// Panicked or could not load its state; restart.
    Failed,
}

/// Sent to the supervisor when a device actor is gone.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeviceActorExited {
    pub device: DeviceId,
    pub generation: u64,
    pub reason: ExitReason,
}

// ---- state -------------------------------------------------------------------------------

/// The device's live connection.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub connection: u64,
    pub protocol: &'static str,
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub since: DateTime<Utc>,
}

/// Messages taken in from the device, by kind.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundCounts {
    pub telemetry: u64,
    /// Telemetry points committed.
    pub points: u64,
    /// Messages refused (bad payload, writers full or unavailable).
    pub refused: u64,
    pub shadow: u64,
    pub command_responses: u64,
    /// Job updates and requests (OTA).
    pub jobs: u64,
}

/// What `GetDeviceState` returns.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSnapshot {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub record: Option<DeviceRecord>,
    pub connection: Option<ConnectionInfo>,
    #[serde(serialize_with = "crate::clock::rfc3339_ms_opt")]
    pub last_seen: Option<DateTime<Utc>>,
    pub inbound: InboundCounts,
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    pub messages_handled: u64,
    pub generation: u64,
    /// Telemetry messages waiting for their commit.
    pub in_flight: usize,
    pub mailbox_capacity: usize,
}

/// Sends [`DeviceActorExited`] from `Drop`, which also runs when a handler panics and the
/// actor's task is torn down. The reason starts as `Failed` and only the deliberate stop paths
/// change it: actix calls `stopped()` even while unwinding from a panic, so that hook cannot
/// tell a failure from an orderly stop.
struct ExitNotice {
    supervisor: WeakRecipient<DeviceActorExited>,
    device: DeviceId,
    generation: u64,
    reason: ExitReason,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.upgrade() {
            supervisor.do_send(DeviceActorExited {
                device: self.device.clone(),
                generation: self.generation,
                reason: self.reason,
            });
        }
    }
}

/// How a device actor is set up by its supervisor.
pub struct DeviceActorSpec {
    pub tenant: TenantId,
    pub device: DeviceId,
    /// The record when the supervisor has just read it; `None` makes the actor load it.
    pub record: Option<DeviceRecord>,
    pub directory: Arc<dyn DeviceDirectory>,
    pub presence: Arc<dyn PresenceSink>,
    pub pipeline: Arc<Pipeline>,
    pub supervisor: WeakRecipient<DeviceActorExited>,
    pub generation: u64,
    pub mailbox_capacity: usize,
    /// Stops the actor after this long without a connection or a message (`None`: never).
    pub idle_timeout: Option<Duration>,
    pub shadows: Arc<ShadowServices>,
    /// Where job reports go (the campaign runner).
    pub jobs: Arc<dyn jobs::DeviceJobs>,
}

pub struct DeviceActor {
    tenant: TenantId,
    device: DeviceId,
    /// The registry's record, without its metadata (held by `metadata_view`).
    record: Option<DeviceRecord>,
    /// The record's type and metadata as every accepted message carries them: shared, so a
    /// message costs reference counts rather than copies.
    device_type_view: Arc<str>,
    metadata_view: Arc<serde_json::Map<String, serde_json::Value>>,
    /// The tenant's committed-telemetry counter.
    tenant_counter: Arc<crate::pipeline::TenantCounter>,
    /// The telemetry schema of the device's type, if it declares one.
    schema: Option<Arc<DeviceTypeSchema>>,
    directory: Arc<dyn DeviceDirectory>,
    presence: Arc<dyn PresenceSink>,
    pipeline: Arc<Pipeline>,
    mailbox_capacity: usize,
    started_at: DateTime<Utc>,
    messages_handled: u64,
    connection: Option<ConnectionInfo>,
    last_seen: Option<DateTime<Utc>>,
    inbound: InboundCounts,
    idle_timeout: Option<Duration>,
    last_activity: Instant,
    in_flight: usize,
    /// The earliest millisecond the next server-stamped message may get.
    next_server_stamp_ms: i64,
    /// The device's shadow, loaded when the actor starts; `None` before its first update.
    /// Boxed, like `shadows` and the commands: what only some devices use stays out of
    /// the actor that every connected device has.
    shadow: Option<Box<ShadowDocument>>,
    /// `{"desired", "reported"}` of `shadow`, shared with telemetry observers.
    shadow_view: Option<Arc<serde_json::Value>>,
    shadows: Arc<ShadowServices>,
    /// Commands awaiting the device's answer or its return (see `commands.rs`).
    commands: commands::CommandCorrelation,
    jobs: Arc<dyn jobs::DeviceJobs>,
    exit: ExitNotice,
}

impl DeviceActor {
    pub fn new(spec: DeviceActorSpec) -> Self {
        let tenant_counter = spec.pipeline.tenant_counter(&spec.tenant);
        DeviceActor {
            exit: ExitNotice {
                supervisor: spec.supervisor,
                device: spec.device.clone(),
                generation: spec.generation,
                reason: ExitReason::Failed,
            },
            tenant: spec.tenant,
            device: spec.device,
            record: spec.record,
            device_type_view: Arc::from(""),
            metadata_view: Arc::default(),
            tenant_counter,
            schema: None,
            directory: spec.directory,
            presence: spec.presence,
            pipeline: spec.pipeline,
            mailbox_capacity: spec.mailbox_capacity,
            started_at: Utc::now(),
            messages_handled: 0,
            connection: None,
            last_seen: None,
            inbound: InboundCounts::default(),
            idle_timeout: spec.idle_timeout,
            last_activity: Instant::now(),
            in_flight: 0,
            next_server_stamp_ms: 0,
            shadow: None,
            shadow_view: None,
            shadows: spec.shadows,
            commands: commands::CommandCorrelation::default(),
            jobs: spec.jobs,
        }
    }

    /// Stops the actor when nothing has used it for `idle_timeout`: no connection, no message,
    /// nothing in flight. It starts again on the next use, from storage.
    fn stop_if_idle(&mut self, ctx: &mut Context<Self>) {
        let Some(idle) = self.idle_timeout else {
            return;
        };
        if self.connection.is_none()
            && self.in_flight == 0
            && self.commands.is_empty()
            && self.last_activity.elapsed() >= idle
        {
            tracing::debug!(tenant = %self.tenant, device = %self.device, "device actor idle; stopping");
            self.exit.reason = ExitReason::Stopped;
            ctx.stop();
        }
    }

    /// Loads the record (unless the supervisor passed it) and the type's telemetry schema.
    fn load_state(&mut self, ctx: &mut Context<Self>) {
        let directory = self.directory.clone();
        let (tenant, device) = (self.tenant.clone(), self.device.clone());
        // Moved, not copied: the loaded record replaces it.
        let known = self.record.take();
        // `wait` holds the mailbox until the state is loaded, so no message sees a half-built actor.
        ctx.wait(
            async move {
                let record = match known {
                    Some(record) => Some(record),
                    None => directory.find_device(&tenant, &device).await?,
                };
                let schema = match &record {
                    Some(r) => directory.device_type_schema(&tenant, &r.device_type).await?,
                    None => None,
                };
                Ok::<_, crate::directory::DirectoryError>((record, schema))
            }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok((Some(mut record), schema)) => {
                    act.device_type_view = Arc::from(record.device_type.as_str());
                    // The metadata is kept once, in the shared view (the snapshot puts it back).
                    act.metadata_view = Arc::new(std::mem::take(&mut record.metadata));
                    act.record = Some(record);
                    act.schema = schema.map(Arc::new);
                }
                Ok((None, _)) => {
                    tracing::info!(tenant = %act.tenant, device = %act.device, "device no longer registered; stopping its actor");
                    act.exit.reason = ExitReason::Unregistered;
                    ctx.stop();
                }
                Err(error) => {
                    tracing::warn!(tenant = %act.tenant, device = %act.device, %error, "device actor could not load its state");
                    act.exit.reason = ExitReason::Failed;
                    ctx.terminate();
                }
            }),
        );
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        self.load_state(ctx);
        if let Some(idle) = self.idle_timeout {
            let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
            ctx.run_interval(every, |act, ctx| act.stop_if_idle(ctx));
        }
        self.load_shadow(ctx);
    }
}

impl Handler<GetDeviceState> for DeviceActor {
    type Result = MessageResult<GetDeviceState>;

    fn handle(&mut self, _msg: GetDeviceState, _ctx: &mut Context<Self>) -> Self::Result {
        self.messages_handled += 1;
        MessageResult(DeviceSnapshot {
            tenant: self.tenant.clone(),
            device: self.device.clone(),
            record: self.record.clone().map(|mut record| {
                record.metadata = (*self.metadata_view).clone();
                record
            }),
            connection: self.connection.clone(),
            last_seen: self.last_seen,
            inbound: self.inbound.clone(),
            started_at: self.started_at,
            messages_handled: self.messages_handled,
            generation: self.exit.generation,
            in_flight: self.in_flight,
            mailbox_capacity: self.mailbox_capacity,
        })
    }
}

impl Handler<GetTelemetryCount> for DeviceActor {
    type Result = u64;

    fn handle(&mut self, _msg: GetTelemetryCount, _ctx: &mut Context<Self>) -> u64 {
        self.inbound.telemetry
    }
}

impl Handler<DeviceConnected> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: DeviceConnected, _ctx: &mut Context<Self>) {
        self.messages_handled += 1;
        self.last_seen = Some(msg.at);
        let was_online = self.connection.is_some();
        self.connection = Some(ConnectionInfo {
            connection: msg.connection,
            protocol: msg.protocol,
            since: msg.at,
        });
        if !was_online {
            self.presence
                .connection_changed(&self.tenant, &self.device, true, msg.at);
            self.job_request();
        }
        tracing::debug!(tenant = %self.tenant, device = %self.device, protocol = msg.protocol, "device connected");
    }
}

impl Handler<DeviceDisconnected> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: DeviceDisconnected, _ctx: &mut Context<Self>) {
        self.messages_handled += 1;
        // A connection that was already replaced (session takeover) changes nothing.
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.connection == msg.connection)
        {
            self.connection = None;
            self.last_seen = Some(msg.at);
            self.presence
                .connection_changed(&self.tenant, &self.device, false, msg.at);
            tracing::debug!(tenant = %self.tenant, device = %self.device, "device disconnected");
        }
    }
}

impl DeviceActor {
    /// Validates a telemetry payload, hands its points to the writers and, once they are
    /// committed, to the observers.
    fn take_telemetry(
        &mut self,
        payload: &[u8],
        at: DateTime<Utc>,
        backpressure: Backpressure,
    ) -> ResponseActFuture<Self, Result<InboundAccepted, InboundError>> {
        if self.record.is_none() {
            return refused(InboundError::Unavailable("device state not loaded".into()));
        }
        let parsed = parse_payload(payload, at.timestamp_millis(), &self.pipeline.limits)
            .map_err(|e| (e.code(), e.to_string(), 1))
            .and_then(|mut messages| match &self.schema {
                Some(schema) => match schema.apply(&mut messages) {
                    Ok(()) => Ok(messages),
                    Err(e) => {
                        let points = messages.iter().map(|m| m.metrics.len()).sum();
                        Err((e.code(), e.to_string(), points))
                    }
                },
                None => Ok(messages),
            });
        let messages = match parsed {
            Ok(messages) => messages,
            Err((code, message, points)) => {
                self.inbound.refused += 1;
                self.pipeline.count_refused(points);
                return refused(InboundError::Rejected { code, message });
            }
        };
        // Server-stamped messages of a device get distinct, increasing milliseconds: two that
        // arrive within the same millisecond (or in one batch) would otherwise have the same
        // identity, and the second would replace the first in the store.
        let mut messages = messages;
        for message in messages.iter_mut().filter(|m| m.server_stamped) {
            message.ts_ms = message.ts_ms.max(self.next_server_stamp_ms);
            self.next_server_stamp_ms = message.ts_ms + 1;
        }
        let points: Vec<TelemetryPoint> = messages
            .into_iter()
            .flat_map(|m| m.into_points(&self.tenant, &self.device, &self.device_type_view))
            .collect();
        let count = points.len();
        let watched = self.pipeline.watched(&self.tenant, &self.device);
        // The observers' event is built only if one of them has room for it now.
        let observing = self.pipeline.has_observers().then(|| self.pipeline.with_room());
        let to_observers = observing.is_some_and(|with_room| !with_room.none());
        let shared: Option<PointBatch> = (watched || to_observers).then(|| points.clone().into());
        let accepted = to_observers.then(|| TelemetryAccepted {
            tenant: self.tenant.clone(),
            device: self.device.clone(),
            device_type: self.device_type_view.clone(),
            metadata: self.metadata_view.clone(),
            shadow: self.shadow_view.clone(),
            points: shared.clone().unwrap_or_else(|| Arc::from([])),
        });
        let mut live = shared
            .filter(|_| watched)
            .map(|points| (points, self.device_type_view.clone()));
        // A message that waits for room in its writer's queue (QoS 1) is never dropped: it is
        // shown now, so a full queue (a slow commit) delays its acknowledgement, not the live
        // view. One that may be dropped (QoS 0) or refused is shown once queued.
        if backpressure == Backpressure::Wait
            && let Some((points, device_type)) = live.take()
        {
            self.pipeline
                .show_live(&self.tenant, &self.device, &device_type, &points);
        }
        // Queued from the handler, in the order the messages arrive: the actor polls the
        // futures it has spawned in no particular order, so a burst of messages queued (and
        // shown) from them would reach the writer and the dashboard shuffled. Refusing or
        // dropping never waits; a message that waits for room takes its place in the line now.
        let enqueue = self.pipeline.writers.as_ref().map(|writers| {
            match writers.try_enqueue(&self.tenant, &self.device, points, backpressure) {
                Ok(queued) => Enqueue::Done(Ok(queued)),
                Err(TryEnqueueError::Failed(error)) => Enqueue::Done(Err(error)),
                // Waits for room: a future of its own (holding the pipeline), polled once now
                // so that it takes its place in the line for room before the next message.
                Err(TryEnqueueError::NoRoom(points)) => {
                    let (pipeline, tenant, device) =
                        (self.pipeline.clone(), self.tenant.clone(), self.device.clone());
                    let mut waiting: WaitingForRoom = Box::pin(async move {
                        let writers = pipeline.writers.as_ref().expect("it had writers");
                        writers.enqueue(&tenant, &device, points, backpressure).await
                    });
                    match futures_util::FutureExt::now_or_never(waiting.as_mut()) {
                        Some(queued) => Enqueue::Done(queued),
                        None => Enqueue::Waiting(waiting),
                    }
                }
            }
        });
        if let (Some(Enqueue::Done(Ok(_))), Some((points, device_type))) = (&enqueue, &live) {
            self.pipeline
                .show_live(&self.tenant, &self.device, device_type, points);
            live = None;
        }
        let pipeline = self.pipeline.clone();
        let (tenant, device) = (self.tenant.clone(), self.device.clone());
        self.in_flight += 1;
        let commit = async move {
            let queued = match enqueue {
                Some(Enqueue::Done(queued)) => Some(queued?),
                Some(Enqueue::Waiting(enqueue)) => Some(enqueue.await?),
                None => None,
            };
            // Shown live once queued: what is queued gets committed (or spooled), and the
            // dashboard need not wait for the batch.
            if let Some((points, device_type)) = &live {
                pipeline.show_live(&tenant, &device, device_type, points);
            }
            match queued {
                Some(queued) => queued.committed().await,
                None => Ok(()),
            }
        };
        Box::pin(commit.into_actor(self).map(move |outcome, act, _ctx| {
            // `last_activity` stays the message's arrival: the idle check also waits for
            // nothing in flight.
            act.in_flight -= 1;
            match outcome {
                Ok(()) => {
                    act.inbound.points += count as u64;
                    act.tenant_counter.count(count);
                    if let Some(with_room) = observing {
                        act.pipeline.observe_if(with_room, accepted);
                    }
                    Ok(InboundAccepted { points: count })
                }
                Err(error) => {
                    act.inbound.refused += 1;
                    Err(match error {
                        WriteError::Busy => InboundError::Busy,
                        WriteError::Rejected(why) => InboundError::Rejected {
                            code: "store_rejected",
                            message: why,
                        },
                        WriteError::Unavailable(why) => InboundError::Unavailable(why),
                    })
                }
            }
        }))
    }
}

/// A message's handover to its writer, started in the handler.
enum Enqueue {
    Done(Result<Queued, WriteError>),
    Waiting(WaitingForRoom),
}

type WaitingForRoom = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Queued, WriteError>>>>;

/// An answer that needs no waiting.
fn refused(error: InboundError) -> ResponseActFuture<DeviceActor, Result<InboundAccepted, InboundError>> {
    answered(Err(error))
}

fn answered(
    result: Result<InboundAccepted, InboundError>,
) -> ResponseActFuture<DeviceActor, Result<InboundAccepted, InboundError>> {
    Box::pin(fut::ready(result))
}

impl Handler<DeviceInbound> for DeviceActor {
    type Result = ResponseActFuture<Self, Result<InboundAccepted, InboundError>>;

    fn handle(&mut self, msg: DeviceInbound, ctx: &mut Context<Self>) -> Self::Result {
        self.messages_handled += 1;
        self.last_seen = Some(msg.at);
        self.last_activity = Instant::now();
        match msg.kind {
            InboundKind::Telemetry => {
                self.inbound.telemetry += 1;
                self.take_telemetry(&msg.payload, msg.at, msg.backpressure)
            }
            InboundKind::ShadowUpdate => {
                self.inbound.shadow += 1;
                self.shadow_update_over_mqtt(msg.payload, msg.at, ctx);
                answered(Ok(InboundAccepted::default()))
            }
            InboundKind::ShadowGet => {
                self.inbound.shadow += 1;
                self.shadow_get_over_mqtt(&msg.payload, msg.at);
                answered(Ok(InboundAccepted::default()))
            }
            InboundKind::CommandResponse { command, correlation } => {
                self.inbound.command_responses += 1;
                self.command_answered(&command, correlation.as_deref(), &msg.payload, ctx);
                answered(Ok(InboundAccepted::default()))
            }
            InboundKind::JobUpdate { job } => answered(self.job_update(&job, &msg.payload, msg.at)),
            InboundKind::JobGet => {
                self.inbound.jobs += 1;
                self.job_request();
                answered(Ok(InboundAccepted::default()))
            }
        }
    }
}

impl Handler<DeviceTypeChanged> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: DeviceTypeChanged, ctx: &mut Context<Self>) {
        if self
            .record
            .as_ref()
            .is_some_and(|r| r.device_type == msg.device_type)
        {
            let directory = self.directory.clone();
            let tenant = self.tenant.clone();
            ctx.wait(
                async move { directory.device_type_schema(&tenant, &msg.device_type).await }
                    .into_actor(self)
                    .map(|result, act, _ctx| match result {
                        Ok(schema) => act.schema = schema.map(Arc::new),
                        Err(error) => {
                            tracing::warn!(tenant = %act.tenant, device = %act.device, %error, "could not reload the device type's schema; keeping the old one")
                        }
                    }),
            );
        }
    }
}

impl Handler<Shutdown> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        self.exit.reason = ExitReason::Stopped;
        ctx.stop();
    }
}

impl Handler<Crash> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _msg: Crash, _ctx: &mut Context<Self>) {
        panic!("injected device actor failure");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_only_some_devices_use_stays_out_of_the_actor() {
        // Every connected device has an actor; its task (the actor, actix's context and
        // tokio's task header) took a 1,280-byte allocation while the shadow, the command
        // correlation and the shadow services were held inline (816 bytes of actor).
        let size = size_of::<DeviceActor>();
        println!("DeviceActor: {size} bytes");
        assert!(size <= 600, "DeviceActor is {size} bytes");
    }
}
