//! One MQTT connection: what MQTT 3.1.1 and 5.0 share once their packets are decoded.
//!
//! A `Connection` lives on the ntex worker that serves it (it is `Rc`, not `Send`). Messages
//! for it arrive from any thread through its session's bounded channel and are written by the
//! outbound task spawned on the same worker ([`super::delivery`]).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::num::{NonZeroU16, NonZeroU32};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use chrono::Utc;
use drover_actors::device_actor::{
    DeviceActor, DeviceConnected, DeviceDisconnected, DeviceInbound, InboundError, InboundKind,
    PendingShadowDelta, PublishedShadowRequest, ShadowTopic, commands::DeliverQueuedCommands,
};
use drover_actors::telemetry_writer::Backpressure;
use drover_actors::{DeviceId, Fleet, TenantId};
use ntex::util::{ByteString, Bytes};
use ntex_mqtt::{QoS, v5};

use super::acl::{self, Access, Identity, Namespace};
use super::auth::{Authenticator, Credentials, Refusal};
use super::broker::{Broker, SubscribeError};
pub use super::delivery::Sink;
use super::message::{Delivery, MessageProperties, Publication};
use super::metrics::BrokerMetrics;
use super::qos2::Qos2Link;
use super::session::{ClientClass, Inbox, Outbox, SLOW_SUBSCRIBER_STALL, Session, SessionKey, SubOptions};
use super::topic::{self, DeviceTopic, Subscription, TopicError};
use crate::audit::AuditSink;
use crate::config::MqttConfig;
use crate::storage::RegistryStore;
use crate::storage::records::{AuditActor, AuditEvent, AuditOutcome};

/// Everything a connection needs from the rest of the platform.
pub struct MqttContext {
    pub broker: Arc<Broker>,
    pub auth: Authenticator,
    pub registry: RegistryStore,
    pub fleet: Fleet,
    pub audit: AuditSink,
    pub config: MqttConfig,
    /// Set when this node is part of a cluster (after it joined).
    pub cluster: Arc<std::sync::OnceLock<Arc<crate::cluster::Cluster>>>,
}

impl MqttContext {
    pub(super) fn metrics(&self) -> &BrokerMetrics {
        &self.broker.metrics
    }

    fn audit_denial(&self, identity: Option<&Identity>, action: &str, target: &str, reason: &str) {
        self.audit.submit(AuditEvent {
            actor: AuditActor {
                tenant: identity.and_then(|i| i.tenant().cloned()),
                actor: identity.map_or_else(|| "mqtt:unauthenticated".into(), Identity::label),
                source_ip: None,
            },
            action: action.to_string(),
            target: Some(target.to_string()),
            outcome: AuditOutcome::Denied,
            detail: Some(serde_json::json!({ "reason": reason })),
        });
    }
}

/// A counted connection; the count is released when it is dropped.
pub struct ConnectionSlot(Arc<Broker>);

impl ConnectionSlot {
    pub fn reserve(broker: &Arc<Broker>) -> Option<ConnectionSlot> {
        broker
            .try_reserve_connection()
            .then(|| ConnectionSlot(broker.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.release_connection();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V3,
    V5,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V3 => "mqtt/3.1.1",
            Protocol::V5 => "mqtt/5",
        }
    }
}

/// The will message of a connection and its delay (MQTT 5 Will Delay Interval).
pub struct Will {
    pub publication: Publication,
    pub delay_secs: u32,
}

/// What a CONNECT asks for, decoded from either protocol.
pub struct ConnectRequest<'a> {
    pub protocol: Protocol,
    pub client_id: &'a str,
    pub credentials: Credentials<'a>,
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval; for 3.1.1, `None` and `clean_start` decide.
    pub session_expiry_secs: Option<u32>,
    pub keep_alive: u16,
    pub will: Option<Will>,
    /// The connection's QoS 2 layer (see [`super::qos2`]), absent in tests without one.
    pub qos2: Option<Qos2Link>,
    /// MQTT 5 Topic Alias Maximum: aliases the client accepts from the broker (0: none).
    pub topic_alias_max: u16,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRefusal {
    ConnectionLimit,
    Auth(Refusal),
    /// The client id is too long, or a device's is not its device id.
    ClientId(&'static str),
    /// The keep-alive is above the maximum (MQTT 3.1.1 has no way to negotiate it).
    KeepAlive,
}

pub struct Accepted {
    pub connection: Rc<Connection>,
    pub session_present: bool,
    /// The client id the broker chose, when the client sent none.
    pub assigned_client_id: Option<String>,
    pub session_expiry_secs: u32,
}

/// Why a PUBLISH was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRefusal {
    /// Over `max_packet_size` (closes the connection: v5 DISCONNECT 0x95).
    TooLarge(usize),
    /// Not a valid topic name (closes the connection: v5 DISCONNECT 0x90).
    TopicInvalid(TopicError),
    /// More than `max_publish_rate` messages per second (closes: v5 DISCONNECT 0x96).
    RateTooHigh,
    /// Refused by the access rules (v5 PUBACK/PUBREC 0x87; v3 acknowledged and dropped).
    NotAuthorized(String),
    /// The platform refused the content (v5 0x99 with the reason; v3 acknowledged and dropped).
    Rejected { code: &'static str, message: String },
    /// The platform could not take it now; not acknowledged as stored (v5 0x80; v3 closes).
    Unavailable(String),
}

impl PublishRefusal {
    /// The payload could not be read.
    fn payload(why: String) -> Self {
        PublishRefusal::Rejected {
            code: "payload",
            message: why,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            PublishRefusal::TooLarge(_) => "too_large",
            PublishRefusal::TopicInvalid(_) => "topic_invalid",
            PublishRefusal::RateTooHigh => "rate_limited",
            PublishRefusal::NotAuthorized(_) => "not_authorized",
            PublishRefusal::Rejected { .. } => "rejected",
            PublishRefusal::Unavailable(_) => "unavailable",
        }
    }
}

/// The outcome of one SUBSCRIBE entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeResult {
    Granted(QoS),
    TopicFilterInvalid,
    NotAuthorized,
    QuotaExceeded,
}

/// A decoded inbound PUBLISH.
pub struct InboundPublish<'a> {
    pub topic: &'a ByteString,
    pub qos: QoS,
    pub retain: bool,
    pub packet_id: Option<NonZeroU16>,
    pub payload_size: usize,
    pub properties: MessageProperties,
}

/// A PUBLISH's payload as the protocol layer has it.
pub enum PublishPayload<F> {
    /// Read with the packet (`Err`: why it cannot be read).
    Fixed(Result<Bytes, String>),
    /// Still streaming in (a large message): the future reads the rest.
    Streaming(F),
}

/// The payload of an ntex-mqtt PUBLISH (v3 or v5), read at once when it came with the packet.
pub fn publish_payload(
    payload: ntex_mqtt::Payload,
) -> PublishPayload<impl Future<Output = Result<Bytes, String>>> {
    if payload.is_fixed()
        && let Some(read) = futures_util::FutureExt::now_or_never(payload.read_all())
    {
        return PublishPayload::Fixed(read.map_err(|e| e.to_string()));
    }
    PublishPayload::Streaming(async move { payload.read_all().await.map_err(|e| e.to_string()) })
}

/// What [`Connection::publish`] made of a PUBLISH.
pub enum Publishing<'a> {
    /// Handled in the call.
    Done(Result<(), PublishRefusal>),
    /// The rest of its handling, which waits.
    Waiting(std::pin::Pin<Box<dyn Future<Output = Result<(), PublishRefusal>> + 'a>>),
}

impl Publishing<'_> {
    pub async fn outcome(self) -> Result<(), PublishRefusal> {
        match self {
            Publishing::Done(result) => result,
            Publishing::Waiting(rest) => rest.await,
        }
    }
}

/// The part of a PUBLISH's handling that waits, from where it started waiting. Made only to
/// be moved into the one box that waits, so its variants are not boxed again.
#[allow(clippy::large_enum_variant)]
enum PublishWaiting<'a, F> {
    /// For its payload to stream in; then the rest.
    Payload {
        publish: InboundPublish<'a>,
        qos2_id: Option<u16>,
        read: F,
    },
    /// For a device actor to take it in; then routed.
    HandOver {
        publish: InboundPublish<'a>,
        qos2_id: Option<u16>,
        payload: Bytes,
        handing: HandingOver,
    },
    /// Routed; for room in subscribers' queues or the cluster's confirmations.
    Routed(RouteWaiting),
}

impl<'a, F> PublishWaiting<'a, F>
where
    F: Future<Output = Result<Bytes, String>>,
{
    async fn finish(self, connection: &'a Connection) -> Result<(), PublishRefusal> {
        let (publish, qos2_id, payload) = match self {
            PublishWaiting::Payload {
                publish,
                qos2_id,
                read,
            } => {
                let payload = read.await.map_err(PublishRefusal::payload)?;
                if let Some(handing) = connection.hand_over(&publish, &payload)? {
                    handing.finish(connection).await?;
                }
                (publish, qos2_id, payload)
            }
            PublishWaiting::HandOver {
                publish,
                qos2_id,
                payload,
                handing,
            } => {
                handing.finish(connection).await?;
                (publish, qos2_id, payload)
            }
            PublishWaiting::Routed(routed) => {
                routed.finish(connection).await;
                return Ok(());
            }
        };
        if let Some(routed) = connection.route(publish, qos2_id, payload) {
            routed.finish(connection).await;
        }
        Ok(())
    }
}

/// A message on its way to a device's actor.
enum HandingOver {
    /// A device's own QoS 1/2 message: in its actor's mailbox, answered once taken in.
    Device(actix::dev::Request<DeviceActor, DeviceInbound>),
    /// An application's shadow request: the device's actor is looked up first.
    Shadow {
        tenant: TenantId,
        device: DeviceId,
        qos: QoS,
        request: PublishedShadowRequest,
    },
}

impl HandingOver {
    async fn finish(self, connection: &Connection) -> Result<(), PublishRefusal> {
        match self {
            HandingOver::Device(request) => match request.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(InboundError::Rejected { code, message })) => {
                    Err(PublishRefusal::Rejected { code, message })
                }
                Ok(Err(InboundError::Unavailable(why))) => Err(PublishRefusal::Unavailable(why)),
                Ok(Err(InboundError::Busy)) => {
                    Err(PublishRefusal::Unavailable("telemetry writers are full".into()))
                }
                Err(mailbox) => Err(PublishRefusal::Unavailable(format!("device actor: {mailbox}"))),
            },
            HandingOver::Shadow {
                tenant,
                device,
                qos,
                request,
            } => {
                let addr = match connection.ctx.fleet.device(&tenant, &device).await {
                    Ok(Some(addr)) => addr,
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(PublishRefusal::Unavailable(format!("device actor: {error}"))),
                };
                if qos == QoS::AtMostOnce {
                    if addr.try_send(request).is_err() {
                        connection
                            .ctx
                            .metrics()
                            .dropped
                            .with_label_values(&["device_busy"])
                            .inc();
                    }
                    return Ok(());
                }
                addr.send(request)
                    .await
                    .map_err(|mailbox| PublishRefusal::Unavailable(format!("device actor: {mailbox}")))
            }
        }
    }
}

/// What a routed message's acknowledgement waits for: room in the queues it went into past
/// their limit (or their clients disconnected for taking nothing), and the confirmations of
/// the cluster's nodes (QoS 1/2: acknowledged once the other nodes' streams hold it; without
/// Redis the node serves alone), also for the cluster's copies of persistent sessions.
struct RouteWaiting {
    backlogged: Vec<Outbox>,
    forwarded: Vec<tokio::sync::oneshot::Receiver<bool>>,
}

impl RouteWaiting {
    async fn finish(self, connection: &Connection) {
        let max = connection.ctx.broker.limits.max_queued_bytes;
        let waits = self
            .backlogged
            .iter()
            .map(|queue| queue.room(max, SLOW_SUBSCRIBER_STALL));
        futures_util::future::join_all(waits).await;
        for confirmation in self.forwarded {
            let _ = confirmation.await;
        }
    }
}

/// A token bucket: `rate` messages per second with bursts of up to one second's worth.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Option<RateLimit> {
        (rate > 0).then(|| RateLimit {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        })
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Connection {
    pub ctx: Arc<MqttContext>,
    pub session: Arc<Session>,
    pub conn_id: u64,
    pub identity: Identity,
    pub namespace: Namespace,
    pub protocol: Protocol,
    pub client_id: Arc<str>,
    /// Topic aliases the client accepts from the broker (MQTT 5).
    pub topic_alias_max: u16,
    /// The sending side of this connection's own queue.
    own_queue: Outbox,
    device: Option<Addr<DeviceActor>>,
    /// Boxed: most clients have no will, and every connection holds this field.
    will: RefCell<Option<Box<Will>>>,
    qos2: Option<Qos2Link>,
    graceful: Cell<bool>,
    closed: Cell<bool>,
    rate: RefCell<Option<RateLimit>>,
    outbound: RefCell<Option<Inbox>>,
    close_signal: RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
    close_wait: RefCell<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// The topic this connection last published to with the access rules' generation that
    /// allowed it: a device publishes to the same few topics, and the rules' map is shared by
    /// every connection's thread. Boxed: one word in every connection.
    published: Cell<Option<Box<Published>>>,
    _slot: ConnectionSlot,
}

/// A topic a connection was allowed to publish to, and the access rules' generation then.
type Published = (u64, Box<str>);

/// Authenticates a CONNECT and attaches its session. `slot` is the connection's place under
/// the connection limit, reserved by the caller before anything else.
pub async fn connect(
    ctx: &Arc<MqttContext>,
    slot: ConnectionSlot,
    request: ConnectRequest<'_>,
) -> Result<Accepted, ConnectRefusal> {
    // Boxed: ntex-mqtt holds the handshake's future inline in the connection's future, which
    // lives as long as the connection. Inline, this one (authentication, device claim, session
    // takeover: about 2.2 KB) made every connection's future 3.6 KB for its whole life.
    Box::pin(connect_inner(ctx, slot, request)).await
}

async fn connect_inner(
    ctx: &Arc<MqttContext>,
    slot: ConnectionSlot,
    request: ConnectRequest<'_>,
) -> Result<Accepted, ConnectRefusal> {
    let config = &ctx.config;
    // Before anything else: a client id is stored, logged and audited, so its size is bounded
    // for clients that never authenticate too.
    if request.client_id.len() > config.max_client_id_len {
        return Err(ConnectRefusal::ClientId("client identifier too long"));
    }
    let unlimited_keep_alive = config.max_keep_alive_secs == u16::MAX;
    if request.protocol == Protocol::V3
        && !unlimited_keep_alive
        && (request.keep_alive == 0 || request.keep_alive > config.max_keep_alive_secs)
    {
        return Err(ConnectRefusal::KeepAlive);
    }
    let identity = ctx
        .auth
        .authenticate(request.credentials)
        .await
        .map_err(ConnectRefusal::Auth)?;
    let (class, client_id, assigned) = match &identity {
        Identity::Device { device, .. } => {
            if !request.client_id.is_empty() && request.client_id != device.as_str() {
                return Err(ConnectRefusal::ClientId(
                    "a device must connect with its device id as client id",
                ));
            }
            (
                ClientClass::Device,
                device.as_str().to_string(),
                request.client_id.is_empty().then(|| device.to_string()),
            )
        }
        other => {
            let class = if matches!(other, Identity::Anonymous) {
                ClientClass::Anonymous
            } else {
                ClientClass::Application
            };
            if request.client_id.is_empty() {
                let id = format!("auto-{}", uuid::Uuid::new_v4().simple());
                (class, id.clone(), Some(id))
            } else {
                (class, request.client_id.to_string(), None)
            }
        }
    };
    let key = SessionKey {
        namespace: identity.namespace(),
        class,
        client_id: client_id.as_str().into(),
    };
    // In a cluster the device moves here first: its previous node hands its session over.
    // Then the session itself: its copy in Redis becomes this node's (a clean start drops
    // it), and another node still holding it gives it up.
    let handed_over = match (&identity, ctx.cluster.get()) {
        (Identity::Device { tenant, device }, Some(cluster)) => cluster.claim_device(tenant, device).await,
        _ => None,
    };
    let resumed = match ctx.cluster.get() {
        Some(cluster) => {
            cluster
                .claim_session(&key, &identity, request.clean_start, handed_over)
                .await
        }
        None => None,
    };
    // The device actor must exist before the session is attached (the device may have been
    // deleted since its credentials were checked).
    let device = match &identity {
        Identity::Device { tenant, device } => match ctx.fleet.device(tenant, device).await {
            Ok(Some(addr)) => Some(addr),
            Ok(None) => return Err(ConnectRefusal::Auth(Refusal::BadCredentials("device_deleted"))),
            Err(error) => {
                tracing::warn!(%error, "device actor unavailable at connect");
                return Err(ConnectRefusal::Auth(Refusal::Unavailable));
            }
        },
        _ => None,
    };
    let namespace = identity.namespace();
    load_acl(ctx, &namespace)
        .await
        .map_err(|_| ConnectRefusal::Auth(Refusal::Unavailable))?;

    let expiry_secs = match (request.protocol, request.session_expiry_secs) {
        (Protocol::V5, Some(secs)) => secs.min(config.max_session_expiry_secs),
        (Protocol::V5, None) => 0,
        // MQTT 3.1.1: a persistent session (clean session 0) lasts up to the configured maximum.
        (Protocol::V3, _) if request.clean_start => 0,
        (Protocol::V3, _) => config.max_session_expiry_secs,
    };
    let (outbox, inbox) = Outbox::with_policy(config.slow_subscriber);
    let own_queue = outbox.clone();
    let attached = ctx.broker.attach(
        key,
        identity.clone(),
        request.clean_start,
        Duration::from_secs(u64::from(expiry_secs)),
        outbox,
    );
    let mut session_present = attached.session_present;
    // A session this node does not hold: handed over by another node, or stored in Redis.
    if let Some(taken) = resumed
        && !request.clean_start
        && !session_present
    {
        ctx.broker.restore(&attached.session, taken);
        session_present = true;
    }
    let (close_tx, close_rx) = tokio::sync::oneshot::channel();
    if let Some(addr) = &device {
        addr.do_send(DeviceConnected {
            connection: attached.conn_id,
            protocol: request.protocol.name(),
            at: Utc::now(),
        });
    }
    tracing::debug!(client = %client_id, identity = %identity.label(), protocol = request.protocol.name(), session_present, "MQTT client connected");
    let connection = Rc::new(Connection {
        session: attached.session,
        conn_id: attached.conn_id,
        namespace,
        protocol: request.protocol,
        client_id: client_id.as_str().into(),
        topic_alias_max: request.topic_alias_max,
        own_queue,
        device,
        will: RefCell::new(request.will.map(Box::new)),
        qos2: request.qos2,
        graceful: Cell::new(false),
        closed: Cell::new(false),
        rate: RefCell::new(RateLimit::new(config.max_publish_rate)),
        outbound: RefCell::new(Some(inbox)),
        close_signal: RefCell::new(Some(close_tx)),
        close_wait: RefCell::new(Some(close_rx)),
        published: Cell::new(None),
        identity,
        ctx: ctx.clone(),
        _slot: slot,
    });
    if let Some(link) = &connection.qos2 {
        link.attach(connection.session.clone());
    }
    if session_present {
        connection.resume_shadow_delta();
    }
    Ok(Accepted {
        connection,
        session_present,
        assigned_client_id: assigned,
        session_expiry_secs: expiry_secs,
    })
}

/// Loads a namespace's access rules the first time a client of it connects.
async fn load_acl(ctx: &MqttContext, namespace: &Namespace) -> Result<(), ()> {
    if ctx.broker.acl_rules(namespace).is_some() {
        return Ok(());
    }
    let tenant = match namespace {
        Namespace::Tenant(t) => Some(t),
        Namespace::Anonymous => None,
    };
    match ctx.registry.list_acl_rules(tenant).await {
        Ok(rules) => {
            ctx.broker.set_acl_rules(namespace.clone(), rules);
            Ok(())
        }
        Err(error) => {
            tracing::warn!(%error, "could not load MQTT access rules");
            Err(())
        }
    }
}

impl Connection {
    fn authorize(&self, access: Access, topic: &str) -> acl::Decision {
        let rules = self.ctx.broker.acl_rules(&self.namespace).unwrap_or_default();
        acl::authorize(&self.identity, access, topic, &rules)
    }

    /// [`Self::authorize`] for a PUBLISH, remembering the last topic allowed until the access
    /// rules change (the broker's rules generation moves on every change of any namespace's
    /// rules). Refusals are decided every time, so each is logged and audited.
    fn authorize_publish(&self, topic: &str) -> acl::Decision {
        let generation = self.ctx.broker.acl_generation();
        let published = self.published.take();
        let allowed = published
            .as_ref()
            .is_some_and(|last| last.0 == generation && *last.1 == *topic);
        self.published.set(published);
        if allowed {
            return acl::Decision::Allow;
        }
        let decision = self.authorize(Access::Publish, topic);
        if decision.is_allowed() {
            self.published.set(Some(Box::new((generation, topic.into()))));
        }
        decision
    }

    /// Takes one PUBLISH: checks it, hands platform topics of a device to its actor (QoS 1/2
    /// wait for it to take the message in), then routes it to subscribers.
    ///
    /// What needs no waiting is done in the call, and then the answer is [`Publishing::Done`];
    /// only what waits (a payload still streaming in, a device actor taking a QoS 1/2 message,
    /// an application's shadow request, a full subscriber queue, the cluster's confirmations)
    /// goes on in one boxed future. ntex moves the connection's publish future a few times per
    /// message and spawns it when an earlier one is still pending, so it is kept a few words.
    pub fn publish<'a, F>(&'a self, publish: InboundPublish<'a>, payload: PublishPayload<F>) -> Publishing<'a>
    where
        F: Future<Output = Result<Bytes, String>> + 'a,
    {
        match self.publish_start(publish, payload) {
            Ok(Some(waiting)) => Publishing::Waiting(Box::pin(async move {
                let result = waiting.finish(self).await;
                self.count_refusal(&result);
                result
            })),
            Ok(None) => Publishing::Done(Ok(())),
            Err(refusal) => {
                let result = Err(refusal);
                self.count_refusal(&result);
                Publishing::Done(result)
            }
        }
    }

    fn count_refusal(&self, result: &Result<(), PublishRefusal>) {
        if let Err(refusal) = result {
            self.ctx
                .metrics()
                .refused
                .with_label_values(&["publish", refusal.label()])
                .inc();
        }
    }

    /// The part of [`Self::publish`] that needs no waiting; `Ok(Some(_))` is what is left.
    fn publish_start<'a, F>(
        &'a self,
        publish: InboundPublish<'a>,
        payload: PublishPayload<F>,
    ) -> Result<Option<PublishWaiting<'a, F>>, PublishRefusal>
    where
        F: Future<Output = Result<Bytes, String>> + 'a,
    {
        let metrics = self.ctx.metrics();
        metrics.received(publish.qos).inc();
        // Checked before reading: a crafted packet can claim a size the codec let through.
        if publish.payload_size > self.ctx.config.max_packet_size as usize {
            return Err(PublishRefusal::TooLarge(publish.payload_size));
        }
        topic::validate_name(publish.topic).map_err(PublishRefusal::TopicInvalid)?;
        if let Some(rate) = self.rate.borrow_mut().as_mut()
            && !rate.take()
        {
            return Err(PublishRefusal::RateTooHigh);
        }
        if let acl::Decision::Deny(why) = self.authorize_publish(publish.topic) {
            tracing::info!(client = %self.client_id, identity = %self.identity.label(), topic = %crate::logging::clip(publish.topic), reason = %why, "MQTT publish refused");
            self.ctx
                .audit_denial(Some(&self.identity), "mqtt.publish", publish.topic, &why);
            return Err(PublishRefusal::NotAuthorized(why));
        }
        // A QoS 2 message resent after a reconnect, already routed: acknowledge, do not route.
        let qos2_id = (publish.qos == QoS::ExactlyOnce)
            .then_some(publish.packet_id)
            .flatten()
            .map(NonZeroU16::get);
        if let Some(id) = qos2_id
            && self.session.state.lock().qos2_pending.contains(&id)
        {
            return Ok(None);
        }
        let payload = match payload {
            PublishPayload::Fixed(payload) => payload.map_err(PublishRefusal::payload)?,
            PublishPayload::Streaming(read) => {
                return Ok(Some(PublishWaiting::Payload {
                    publish,
                    qos2_id,
                    read,
                }));
            }
        };
        match self.hand_over(&publish, &payload)? {
            Some(handing) => Ok(Some(PublishWaiting::HandOver {
                publish,
                qos2_id,
                payload,
                handing,
            })),
            None => Ok(self.route(publish, qos2_id, payload).map(PublishWaiting::Routed)),
        }
    }

    /// Platform topics go to a device's actor first: a device's own, or a shadow request an
    /// application sends for a device of its tenant. `Some`: the message waits for it.
    fn hand_over(
        &self,
        publish: &InboundPublish<'_>,
        payload: &Bytes,
    ) -> Result<Option<HandingOver>, PublishRefusal> {
        if let Some(device) = &self.device
            && let Identity::Device { device: own, .. } = &self.identity
        {
            let correlation = publish.properties.correlation_data.as_deref();
            self.hand_to_device(device, own, publish.topic, publish.qos, payload, correlation)
        } else if let Identity::Application { tenant, .. } = &self.identity {
            Ok(self.shadow_request(tenant, publish.topic, publish.qos, payload))
        } else {
            Ok(None)
        }
    }

    /// Routes to subscribers. `Some`: the acknowledgement waits for room in their queues or
    /// for the cluster's confirmations.
    fn route(
        &self,
        publish: InboundPublish<'_>,
        qos2_id: Option<u16>,
        payload: Bytes,
    ) -> Option<RouteWaiting> {
        let publication = Publication {
            topic: publish.topic.clone(),
            payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties,
            received_at: Instant::now(),
            origin: Some(self.session.id),
        };
        let mut backlogged = Vec::new();
        let (_, forwarded) = self
            .ctx
            .broker
            .route_and_forward(&self.namespace, publication, &mut backlogged);
        if let Some(id) = qos2_id {
            self.session.state.lock().qos2_pending.insert(id);
        }
        // Backpressure: not for this connection's own queue: its client empties it by reading,
        // and an MQTT 3.1.1 connection stops reading while its publishes wait.
        backlogged.retain(|queue| !queue.same_queue(&self.own_queue));
        (!backlogged.is_empty() || !forwarded.is_empty()).then_some(RouteWaiting {
            backlogged,
            forwarded,
        })
    }

    /// Platform topics of a device go to its actor first; QoS 1/2 wait until it took the
    /// message in (the acknowledgement follows: `Some`), QoS 0 is dropped and counted when
    /// it is busy.
    fn hand_to_device(
        &self,
        addr: &Addr<DeviceActor>,
        own: &DeviceId,
        name: &str,
        qos: QoS,
        payload: &Bytes,
        correlation: Option<&[u8]>,
    ) -> Result<Option<HandingOver>, PublishRefusal> {
        let kind = match DeviceTopic::parse(name) {
            Some(t) if t.device() != own.as_str() => return Ok(None),
            Some(DeviceTopic::Telemetry { .. }) => InboundKind::Telemetry,
            Some(DeviceTopic::ShadowUpdate { .. }) => InboundKind::ShadowUpdate,
            Some(DeviceTopic::ShadowGet { .. }) => InboundKind::ShadowGet,
            Some(DeviceTopic::CommandResponse { command, .. }) => InboundKind::CommandResponse {
                command: command.to_string(),
                correlation: correlation.map(bytes::Bytes::copy_from_slice),
            },
            Some(DeviceTopic::JobUpdate { job, .. }) => InboundKind::JobUpdate { job: job.to_string() },
            Some(DeviceTopic::JobGet { .. }) => InboundKind::JobGet,
            Some(DeviceTopic::Other { .. }) | None => return Ok(None),
        };
        let message = DeviceInbound {
            kind,
            payload: bytes::Bytes::copy_from_slice(payload),
            at: Utc::now(),
            // QoS 1/2 publishers wait for room (their acknowledgement comes late); QoS 0
            // points are dropped and counted when the writers are full.
            backpressure: if qos == QoS::AtMostOnce {
                Backpressure::Drop
            } else {
                Backpressure::Wait
            },
        };
        if qos == QoS::AtMostOnce {
            if addr.try_send(message).is_err() {
                self.ctx
                    .metrics()
                    .dropped
                    .with_label_values(&["device_busy"])
                    .inc();
            }
            return Ok(None);
        }
        // In the actor's mailbox from here on (or waiting for room in it, in order).
        Ok(Some(HandingOver::Device(addr.send(message))))
    }

    /// A shadow request an application published for a device of its tenant goes to that
    /// device's actor, which answers on the shadow topics (`Some`: found by the wait). A
    /// topic naming no registered device is only routed.
    fn shadow_request(
        &self,
        tenant: &TenantId,
        name: &str,
        qos: QoS,
        payload: &Bytes,
    ) -> Option<HandingOver> {
        let (topic, device) = match DeviceTopic::parse(name) {
            Some(DeviceTopic::ShadowUpdate { device }) => (ShadowTopic::Update, device),
            Some(DeviceTopic::ShadowGet { device }) => (ShadowTopic::Get, device),
            _ => return None,
        };
        let device = DeviceId::parse(device).ok()?;
        Some(HandingOver::Shadow {
            tenant: tenant.clone(),
            device,
            qos,
            request: PublishedShadowRequest {
                topic,
                payload: bytes::Bytes::copy_from_slice(payload),
                at: Utc::now(),
            },
        })
    }

    /// The QoS of an inbound PUBLISH: the QoS 2 layer hands QoS 2 messages to ntex-mqtt as
    /// QoS 1 and completes their exchange itself.
    pub fn inbound_qos(&self, decoded: QoS, packet_id: Option<NonZeroU16>) -> QoS {
        match (&self.qos2, packet_id) {
            (Some(link), Some(id)) if decoded == QoS::AtLeastOnce && link.exactly_once(id.get()) => {
                QoS::ExactlyOnce
            }
            _ => decoded,
        }
    }

    /// PUBREL: the QoS 2 exchange of `packet_id` is complete.
    pub fn released(&self, packet_id: u16) {
        self.session.state.lock().qos2_pending.remove(&packet_id);
    }

    /// One SUBSCRIBE entry; retained messages to send are appended to `retained`.
    pub fn subscribe(
        &self,
        raw: &str,
        options: SubOptions,
        retained: &mut Vec<(Arc<Publication>, QoS)>,
    ) -> SubscribeResult {
        let result = self.subscribe_inner(raw, options, retained);
        let refused = match result {
            SubscribeResult::Granted(_) => None,
            SubscribeResult::TopicFilterInvalid => Some("topic_filter_invalid"),
            SubscribeResult::NotAuthorized => Some("not_authorized"),
            SubscribeResult::QuotaExceeded => Some("quota_exceeded"),
        };
        if let Some(reason) = refused {
            self.ctx
                .metrics()
                .refused
                .with_label_values(&["subscribe", reason])
                .inc();
            tracing::info!(client = %self.client_id, identity = %self.identity.label(), filter = %crate::logging::clip(raw), reason, "MQTT subscribe refused");
        }
        result
    }

    fn subscribe_inner(
        &self,
        raw: &str,
        options: SubOptions,
        retained: &mut Vec<(Arc<Publication>, QoS)>,
    ) -> SubscribeResult {
        let Ok(sub) = Subscription::parse(raw) else {
            return SubscribeResult::TopicFilterInvalid;
        };
        // MQTT 5 §3.8.3.1: No Local on a shared subscription is an error.
        if sub.share.is_some() && options.no_local {
            return SubscribeResult::TopicFilterInvalid;
        }
        let rules = self.ctx.broker.acl_rules(&self.namespace).unwrap_or_default();
        let options = match acl::subscription(&self.identity, &sub.filter, &rules) {
            acl::SubscribeDecision::Deny(why) => {
                self.ctx
                    .audit_denial(Some(&self.identity), "mqtt.subscribe", raw, &why);
                return SubscribeResult::NotAuthorized;
            }
            acl::SubscribeDecision::Allow => options,
            acl::SubscribeDecision::AllowChecked => SubOptions {
                read_checked: true,
                ..options
            },
        };
        match self.ctx.broker.subscribe(&self.session, &sub, options) {
            Ok(outcome) => {
                retained.extend(outcome.retained.into_iter().map(|p| (p, options.qos)));
                // A subscription the session already had was served when the session resumed.
                if !outcome.existed
                    && let Some(topic) = self.shadow_delta_topic()
                    && topic::matches(&sub.filter, &topic)
                {
                    self.send_pending_delta(topic, options);
                }
                self.deliver_queued_commands(&sub.filter);
                SubscribeResult::Granted(options.qos)
            }
            Err(SubscribeError::QuotaExceeded) => SubscribeResult::QuotaExceeded,
        }
    }

    /// `devices/{id}/shadow/update/delta` of a device's connection.
    fn shadow_delta_topic(&self) -> Option<String> {
        match (&self.identity, &self.device) {
            (Identity::Device { device, .. }, Some(_)) => {
                Some(format!("devices/{device}/shadow/update/delta"))
            }
            _ => None,
        }
    }

    /// A device whose resumed session already subscribes to its delta topic gets the pending
    /// delta, as if it had just subscribed.
    fn resume_shadow_delta(&self) {
        let Some(topic) = self.shadow_delta_topic() else {
            return;
        };
        let options = {
            let state = self.session.state.lock();
            state
                .subscriptions
                .iter()
                .find(|(sub, _)| topic::matches(&sub.filter, &topic))
                .map(|(_, options)| *options)
        };
        if let Some(options) = options {
            self.send_pending_delta(topic, options);
        }
        let filters: Vec<_> = {
            let state = self.session.state.lock();
            state.subscriptions.keys().map(|sub| sub.filter.clone()).collect()
        };
        for filter in &filters {
            self.deliver_queued_commands(filter);
        }
    }

    /// A device that (re)subscribed to its commands gets those kept for it while it was away.
    fn deliver_queued_commands(&self, filter: &str) {
        if let (Identity::Device { device, .. }, Some(addr)) = (&self.identity, &self.device) {
            let prefix = format!("devices/{device}/commands/");
            if filter.starts_with(&prefix) || topic::matches(filter, &format!("{prefix}_")) {
                let _ = addr.try_send(DeliverQueuedCommands {});
            }
        }
    }

    /// Asks the device actor for the shadow's delta and, if there is one, delivers it to this
    /// session only (other subscribers of the topic saw it when it was published).
    fn send_pending_delta(&self, topic: String, options: SubOptions) {
        let Some(addr) = self.device.clone() else {
            return;
        };
        let broker = self.ctx.broker.clone();
        let session = self.session.clone();
        ntex::rt::spawn(async move {
            let Ok(Some(payload)) = addr.send(PendingShadowDelta {}).await else {
                return;
            };
            let publication =
                Publication::internal(topic, Bytes::copy_from_slice(&payload), QoS::AtLeastOnce, false);
            let delivery = Delivery {
                qos: options.qos.min(publication.qos),
                retain: false,
                subscription_ids: options.subscription_id.into_iter().collect(),
                dup: false,
                stored: None,
                publication: Arc::new(publication),
            };
            broker.deliver_to(&session, delivery);
        });
    }

    /// Sends the retained messages a SUBSCRIBE matched (after its SUBACK is written).
    pub fn send_retained(&self, retained: Vec<(Arc<Publication>, QoS)>) {
        for (publication, granted) in retained {
            let delivery = Delivery {
                qos: granted.min(publication.qos),
                retain: true,
                subscription_ids: Vec::new(),
                dup: false,
                stored: None,
                publication,
            };
            self.ctx.broker.deliver_to(&self.session, delivery);
        }
    }

    pub fn unsubscribe(&self, raw: &str) -> bool {
        Subscription::parse(raw).is_ok_and(|sub| self.ctx.broker.unsubscribe(&self.session, &sub))
    }

    /// A DISCONNECT from the client: the will is dropped, unless MQTT 5 reason 0x04 asks for it.
    pub fn disconnect_requested(&self, with_will: bool, session_expiry_secs: Option<u32>) {
        self.graceful.set(true);
        if !with_will {
            self.will.borrow_mut().take();
        }
        if let Some(secs) = session_expiry_secs {
            let secs = secs.min(self.ctx.config.max_session_expiry_secs);
            self.session.state.lock().expiry = Duration::from_secs(u64::from(secs));
        }
    }

    /// The connection is gone, for whatever reason. Runs once.
    pub fn closed(&self, reason: &str) {
        if self.closed.replace(true) {
            return;
        }
        tracing::debug!(client = %self.client_id, identity = %self.identity.label(), reason, "MQTT connection closed");
        if let Some(signal) = self.close_signal.borrow_mut().take() {
            let _ = signal.send(());
        }
        if let Some(addr) = &self.device {
            addr.do_send(DeviceDisconnected {
                connection: self.conn_id,
                at: Utc::now(),
            });
        }
        if let Some(will) = self.will.borrow_mut().take() {
            self.publish_will(*will);
        }
    }

    /// Publishes the will now or after its delay, unless the client is back by then.
    fn publish_will(&self, will: Will) {
        if let acl::Decision::Deny(why) = self.authorize(Access::Publish, &will.publication.topic) {
            tracing::info!(client = %self.client_id, topic = %crate::logging::clip(&will.publication.topic), reason = %why, "will not published: not allowed");
            return;
        }
        let broker = self.ctx.broker.clone();
        let namespace = self.namespace.clone();
        let (expiry, generation) = {
            let state = self.session.state.lock();
            (state.expiry, state.generation)
        };
        // The will goes out at the end of the delay or of the session, whichever is first.
        let delay = Duration::from_secs(u64::from(will.delay_secs)).min(expiry);
        if delay.is_zero() {
            broker.publish(&namespace, will.publication);
            return;
        }
        let session = self.session.clone();
        ntex::rt::spawn(async move {
            ntex::time::sleep(delay).await;
            let back = session.state.lock().generation != generation;
            if !back {
                broker.publish(&namespace, will.publication);
            }
        });
    }

    /// Starts the task that writes this connection's deliveries to its sink.
    pub fn spawn_outbound(self: &Rc<Self>, sink: Sink) {
        let (Some(rx), Some(close)) = (
            self.outbound.borrow_mut().take(),
            self.close_wait.borrow_mut().take(),
        ) else {
            return;
        };
        let conn = self.clone();
        // Boxed: ntex's spawn wraps the future in a block that keeps it twice (as the block's
        // capture and as the awaited value), so inline the task cost 2.3 KB per connection.
        ntex::rt::spawn(Box::pin(super::delivery::run_outbound(conn, sink, rx, close)));
    }
}

/// Errors of the ntex services. A refusal that closes the connection, or a setup failure.
#[derive(Debug, Clone)]
pub enum BrokerError {
    Refused(PublishRefusal),
    Internal(String),
}

// fn_service factories have `()` as their init error.
impl From<()> for BrokerError {
    fn from(_: ()) -> Self {
        BrokerError::Internal("service setup failed".into())
    }
}

/// Lets already-decoded packets (a DISCONNECT queued behind a slow PUBLISH) reach the
/// protocol service before a connection's end is handled: ntex-mqtt can deliver
/// `Control::Stop` first.
pub async fn settle() {
    ntex::time::sleep(ntex::time::Millis(1)).await;
}

/// How a connection ended, for the logs.
pub fn describe_stop(reason: &ntex_mqtt::Reason<BrokerError>) -> String {
    match reason {
        ntex_mqtt::Reason::Error(e) => format!("refused: {:?}", e.get_ref()),
        ntex_mqtt::Reason::Protocol(e) => format!("protocol error: {}", e.get_ref()),
        ntex_mqtt::Reason::PeerGone(g) => match g.err() {
            Some(e) => format!("connection lost: {e}"),
            None => "connection closed".into(),
        },
    }
}

/// The client certificate chain of a TLS connection, if it presented one.
pub fn peer_certificates(io: &ntex::io::IoBoxed) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let chain = io.query::<ntex::server::rustls::PeerCertChain<'static>>();
    chain
        .as_ref()
        .map(|c| c.0.iter().map(|cert| cert.clone().into_owned()).collect())
}

/// MQTT 5 subscription options as the broker keeps them.
pub fn sub_options(options: &v5::codec::SubscriptionOptions, id: Option<NonZeroU32>) -> SubOptions {
    SubOptions {
        qos: options.qos,
        no_local: options.no_local,
        retain_as_published: options.retain_as_published,
        retain_handling: options.retain_handling as u8,
        subscription_id: id,
        read_checked: false,
    }
}

/// MQTT 3.1.1 subscriptions have only a QoS.
pub fn v3_sub_options(qos: QoS) -> SubOptions {
    SubOptions {
        qos,
        no_local: false,
        retain_as_published: false,
        retain_handling: 0,
        subscription_id: None,
        read_checked: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_without_a_will_holds_no_room_for_one() {
        // Held by every connected client; the will (216 bytes inline) is boxed.
        let size = size_of::<Connection>();
        println!("Connection: {size} bytes");
        assert!(size <= 320, "Connection is {size} bytes");
    }
}
