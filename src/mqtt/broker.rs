//! The broker's shared state: sessions, subscription trees, retained messages, access rules.
//!
//! `Broker` is `Send + Sync` and used from every MQTT worker thread and from actix (shadow
//! replies, commands, kicks). Connections never touch each other: a publish finds the matching
//! sessions and hands each a [`Delivery`] through the session's bounded channel, drained by a
//! task on the receiving connection's own worker. Lock order, everywhere: the session table,
//! then a session's state, then the trees and retained stores; the publish path releases the
//! tree lock before it touches any session.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use drover_actors::{DeviceId, TenantId};
use ntex_mqtt::QoS;
use parking_lot::{Mutex, RwLock};

use super::acl::{self, Identity, Namespace};
use super::message::{Delivery, Publication};
use super::metrics::BrokerMetrics;
use super::retained::RetainedStore;
use super::session::{Handoff, Link, Outbox, Session, SessionKey, SubOptions};
use super::subscriptions::SubscriptionTree;
use super::topic::Subscription;
use crate::config::MqttConfig;
use crate::storage::records::AclRule;

/// MQTT 5 reason codes the broker sends in DISCONNECT.
pub mod reason {
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const NOT_AUTHORIZED: u8 = 0x87;
}

/// Broker limits, from the `[mqtt]` configuration and `MAX_DEVICES`.
#[derive(Debug, Clone)]
pub struct BrokerLimits {
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    pub max_session_expiry: Duration,
}

impl BrokerLimits {
    pub fn from_config(mqtt: &MqttConfig, max_connections: u64) -> BrokerLimits {
        BrokerLimits {
            max_connections: max_connections as usize,
            max_subscriptions: mqtt.max_subscriptions,
            max_queued_messages: mqtt.max_queued_messages,
            max_queued_bytes: mqtt.max_queued_bytes,
            max_session_expiry: Duration::from_secs(u64::from(mqtt.max_session_expiry_secs)),
        }
    }
}

/// A session attached to a new connection.
pub struct Attached {
    pub session: Arc<Session>,
    pub conn_id: u64,
    /// Whether an earlier session was resumed (CONNACK session present).
    pub session_present: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubscribeError {
    /// The client holds `max_subscriptions` already.
    QuotaExceeded,
}

pub struct SubscribeOutcome {
    /// Whether the client had this subscription already (it was replaced).
    pub existed: bool,
    /// Retained messages to send for it.
    pub retained: Vec<Arc<Publication>>,
}

/// What a cluster plugs into the broker: it learns which filters this node holds and forwards
/// publications to the nodes whose subscribers match them.
pub trait RemoteRoutes: Send + Sync {
    /// A session of this node subscribed to `filter` in `namespace`.
    fn subscribed(&self, namespace: &Namespace, filter: &str);
    /// A session of this node no longer holds `filter`.
    fn unsubscribed(&self, namespace: &Namespace, filter: &str);
    /// Hands a publication made on this node to the nodes that want it. For QoS 1/2 the
    /// receiver answers once it is durably queued for them (`true`) or could not be (`false`).
    fn forward(
        &self,
        namespace: &Namespace,
        publication: &Arc<Publication>,
    ) -> Option<tokio::sync::oneshot::Receiver<bool>>;
    /// Connections were closed here for `kick`: close them on the other nodes too.
    fn kicked(&self, kick: &Kick, reason: u8, message: &str);
    /// A persistent session of this node changed (subscriptions, expiry, its connection):
    /// the cluster's copy is rewritten. Called without any broker lock held.
    fn session_saved(&self, _session: &Session) {}
    /// A session ended here for good (clean start, expiry): the cluster's copy goes too.
    fn session_dropped(&self, _key: &SessionKey) {}
    /// Keeps a QoS 1/2 delivery to a persistent session in the cluster until its client
    /// acknowledges it (`sent`: the client is connected, so it may be written at once);
    /// returns its id there.
    fn store(&self, _key: &SessionKey, _delivery: &Delivery, _sent: bool) -> Option<Arc<str>> {
        None
    }
    /// A stored delivery was acknowledged by its client, or given up.
    fn unstore(&self, _key: &SessionKey, _id: &str) {}
    /// Resolves once every delivery stored so far is written.
    fn stored(&self) -> Option<tokio::sync::oneshot::Receiver<bool>> {
        None
    }
}

/// Whose connections to close, wherever they are (see [`RemoteRoutes::kicked`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Kick {
    /// A device (deleted, disabled, new token).
    Device { tenant: String, device: String },
    /// Applications connected with an API key (revoked).
    ApiKey { key_id: String },
    /// Every client of a tenant (disabled).
    Tenant { tenant: String },
}

impl Kick {
    fn matches(&self, identity: &Identity) -> bool {
        match (self, identity) {
            (Kick::Device { tenant, device }, Identity::Device { tenant: t, device: d }) => {
                t.as_str() == tenant && d.as_str() == device
            }
            (Kick::ApiKey { key_id }, Identity::Application { key_id: k, .. }) => k == key_id,
            (Kick::Tenant { tenant }, identity) => identity.tenant().is_some_and(|t| t.as_str() == tenant),
            _ => false,
        }
    }
}

/// A session as it leaves for another node.
pub struct TakenSession {
    pub subscriptions: Vec<(Subscription, SubOptions)>,
    pub queued: Vec<Delivery>,
    pub expiry: Duration,
}

pub struct Broker {
    pub limits: BrokerLimits,
    pub metrics: BrokerMetrics,
    trees: RwLock<HashMap<Namespace, SubscriptionTree<u64, SubOptions>>>,
    sessions: RwLock<HashMap<u64, Arc<Session>>>,
    by_key: Mutex<HashMap<SessionKey, Arc<Session>>>,
    retained: RwLock<HashMap<Namespace, RetainedStore>>,
    acl: RwLock<HashMap<Namespace, Arc<Vec<AclRule>>>>,
    /// Changes whenever access rules are installed, so cached read decisions start over.
    acl_generation: AtomicU64,
    next_id: AtomicU64,
    connections: AtomicUsize,
    remote: std::sync::OnceLock<Arc<dyn RemoteRoutes>>,
}

impl Broker {
    pub fn new(limits: BrokerLimits, metrics: BrokerMetrics) -> Broker {
        Broker {
            limits,
            metrics,
            trees: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            by_key: Mutex::new(HashMap::new()),
            retained: RwLock::new(HashMap::new()),
            acl: RwLock::new(HashMap::new()),
            acl_generation: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            remote: std::sync::OnceLock::new(),
        }
    }

    /// A stored delivery was acknowledged by its client (or dropped): the cluster forgets it.
    pub fn unstore(&self, key: &SessionKey, id: &str) {
        if let Some(remote) = self.remote.get() {
            remote.unstore(key, id);
        }
    }

    /// Joins the broker to a cluster (once, at start).
    pub fn set_remote(&self, remote: Arc<dyn RemoteRoutes>) {
        let _ = self.remote.set(remote);
    }

    fn remote_unsubscribed(&self, namespace: &Namespace, filter: &str) {
        if let Some(remote) = self.remote.get() {
            remote.unsubscribed(namespace, filter);
        }
    }

    /// Counts a new connection; `false` (nothing counted) when the limit is reached.
    pub fn try_reserve_connection(&self) -> bool {
        let mut current = self.connections.load(Ordering::Acquire);
        loop {
            if current >= self.limits.max_connections {
                return false;
            }
            match self.connections.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.metrics.connections.inc();
                    self.metrics.connections_total.inc();
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }

    pub fn release_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.dec();
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// A connection id unique in this process (MQTT and WebSocket connections share them).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Attaches a new connection to its session: resumes the existing one unless `clean_start`,
    /// takes it over from a connection that still holds it (which is told to close), and
    /// hands the messages queued while the client was away to the new connection.
    pub fn attach(
        &self,
        key: SessionKey,
        identity: Identity,
        clean_start: bool,
        expiry: Duration,
        outbox: Outbox,
    ) -> Attached {
        let conn_id = self.next_id();
        let expiry = expiry.min(self.limits.max_session_expiry);
        let mut by_key = self.by_key.lock();
        let existing = by_key.get(&key).cloned();
        if let Some(old) = &existing {
            let mut state = old.state.lock();
            if let Some(link) = state.link.take() {
                link.outbox.disconnect(
                    reason::SESSION_TAKEN_OVER,
                    "another connection took over this session",
                );
            }
            old.set_connected(false);
        }
        let (session, session_present) = match existing {
            Some(old) if !clean_start && old.identity == identity => (old, true),
            Some(old) => {
                self.discard(&mut by_key, &old);
                (self.create(&mut by_key, key, identity), false)
            }
            None => (self.create(&mut by_key, key, identity), false),
        };
        {
            let mut state = session.state.lock();
            state.expiry = expiry;
            state.disconnected_at = None;
            state.generation += 1;
            while let Some(queued) = state.queue.pop_front() {
                if outbox.force(queued).is_err() {
                    break;
                }
            }
            state.link = Some(Link { conn_id, outbox });
        }
        session.set_connected(true);
        drop(by_key);
        // A clean start's earlier copy in the cluster went when the session was claimed.
        if !expiry.is_zero()
            && let Some(remote) = self.remote.get()
        {
            remote.session_saved(&session);
        }
        Attached {
            session,
            conn_id,
            session_present,
        }
    }

    fn create(
        &self,
        by_key: &mut HashMap<SessionKey, Arc<Session>>,
        key: SessionKey,
        identity: Identity,
    ) -> Arc<Session> {
        let session = Arc::new(Session::new(self.next_id(), key.clone(), identity));
        by_key.insert(key, session.clone());
        self.sessions.write().insert(session.id, session.clone());
        self.metrics.sessions.inc();
        session
    }

    /// Removes a session and its subscriptions (the caller holds the session table).
    fn discard(&self, by_key: &mut HashMap<SessionKey, Arc<Session>>, session: &Arc<Session>) {
        if by_key.get(&session.key).is_some_and(|s| Arc::ptr_eq(s, session)) {
            by_key.remove(&session.key);
        }
        if self.sessions.write().remove(&session.id).is_none() {
            return;
        }
        self.metrics.sessions.dec();
        let mut state = session.state.lock();
        let subscriptions: Vec<_> = state.subscriptions.drain().collect();
        state.queue.clear();
        drop(state);
        let namespace = session.identity.namespace();
        let mut trees = self.trees.write();
        if let Some(tree) = trees.get_mut(&namespace) {
            for (sub, _) in subscriptions {
                if tree.remove(&sub.filter, sub.share.as_deref(), &session.id) {
                    self.metrics.subscriptions.dec();
                    self.remote_unsubscribed(&namespace, &sub.filter);
                }
            }
            if tree.is_empty() {
                trees.remove(&namespace);
            }
        }
    }

    /// The connection `conn_id` is gone. A session without expiry ends; a persistent one
    /// keeps `unsent` (QoS 1/2 deliveries that were queued or not acknowledged; those already
    /// written carry the DUP flag) for the next connection.
    pub fn detach(&self, session: &Arc<Session>, conn_id: u64, unsent: Vec<Delivery>) {
        let mut by_key = self.by_key.lock();
        let registered = by_key.get(&session.key).is_some_and(|s| Arc::ptr_eq(s, session));
        let mut state = session.state.lock();
        let current = state.link.as_ref().is_some_and(|l| l.conn_id == conn_id);
        if current {
            state.link = None;
            state.disconnected_at = Some(Instant::now());
            session.set_connected(false);
        }
        if !registered {
            return;
        }
        let remote = self.remote.get();
        if current && state.expiry.is_zero() {
            drop(state);
            self.discard(&mut by_key, session);
            drop(by_key);
            if let Some(remote) = remote {
                remote.session_dropped(&session.key);
            }
            return;
        }
        for delivery in unsent.into_iter().rev().filter(|d| d.qos != QoS::AtMostOnce) {
            state.queue.push_front(delivery);
        }
        while state.queue.len() > self.limits.max_queued_messages {
            if let Some(dropped) = state.queue.pop_back()
                && let (Some(remote), Some(id)) = (remote, &dropped.stored)
            {
                remote.unstore(&session.key, id);
            }
            self.metrics.dropped.with_label_values(&["queue_full"]).inc();
        }
        // Taken over: the new connection gets them now.
        if let Some(link) = &state.link {
            let outbox = link.outbox.clone();
            while let Some(queued) = state.queue.pop_front() {
                if outbox.force(queued).is_err() {
                    break;
                }
            }
        }
        drop(state);
        drop(by_key);
        if current && let Some(remote) = remote {
            remote.session_saved(session);
        }
    }

    /// Adds or replaces a subscription. Retained messages to send come back with it.
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        sub: &Subscription,
        options: SubOptions,
    ) -> Result<SubscribeOutcome, SubscribeError> {
        let mut state = session.state.lock();
        let existed = state.subscriptions.contains_key(sub);
        if !existed && state.subscriptions.len() >= self.limits.max_subscriptions {
            return Err(SubscribeError::QuotaExceeded);
        }
        state.subscriptions.insert(sub.clone(), options);
        let namespace = session.identity.namespace();
        let replaced = self.trees.write().entry(namespace.clone()).or_default().insert(
            &sub.filter,
            sub.share.as_deref(),
            session.id,
            options,
        );
        let persistent = !state.expiry.is_zero();
        drop(state);
        if !replaced {
            self.metrics.subscriptions.inc();
            if let Some(remote) = self.remote.get() {
                remote.subscribed(&namespace, &sub.filter);
            }
        }
        if persistent && let Some(remote) = self.remote.get() {
            remote.session_saved(session);
        }
        // MQTT 5 §4.8.2: retained messages are not sent for shared subscriptions.
        let send_retained = sub.share.is_none()
            && (options.retain_handling == 0 || (options.retain_handling == 1 && !existed));
        let mut retained = if send_retained {
            self.retained
                .read()
                .get(&namespace)
                .map(|store| store.matching(&sub.filter, Instant::now()))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        if options.read_checked && !retained.is_empty() {
            let rules = self.acl_rules(&namespace).unwrap_or_default();
            retained.retain(|p| self.may_read(session, &p.topic, &rules));
        }
        Ok(SubscribeOutcome { existed, retained })
    }

    /// Removes a subscription; returns whether it existed.
    pub fn unsubscribe(&self, session: &Arc<Session>, sub: &Subscription) -> bool {
        let mut state = session.state.lock();
        if state.subscriptions.remove(sub).is_none() {
            return false;
        }
        let persistent = !state.expiry.is_zero();
        let namespace = session.identity.namespace();
        let mut trees = self.trees.write();
        if let Some(tree) = trees.get_mut(&namespace) {
            if tree.remove(&sub.filter, sub.share.as_deref(), &session.id) {
                self.metrics.subscriptions.dec();
                self.remote_unsubscribed(&namespace, &sub.filter);
            }
            if tree.is_empty() {
                trees.remove(&namespace);
            }
        }
        drop(trees);
        drop(state);
        if persistent && let Some(remote) = self.remote.get() {
            remote.session_saved(session);
        }
        true
    }

    /// Routes a message to every matching session of `namespace` (one per shared group) and
    /// keeps it if it is retained. Returns how many sessions it was handed to.
    pub fn publish(&self, namespace: &Namespace, publication: Publication) -> usize {
        self.route(namespace, publication, &mut Vec::new())
    }

    /// As [`Broker::publish`]; the queues it was pushed into past their limit (backpressure)
    /// are added to `backlogged`, for the publisher to wait for room in before acknowledging.
    pub fn route(
        &self,
        namespace: &Namespace,
        publication: Publication,
        backlogged: &mut Vec<Outbox>,
    ) -> usize {
        self.route_and_forward(namespace, publication, backlogged).0
    }

    /// As [`Broker::route`], also handing the message to the other nodes of a cluster; for
    /// QoS 1/2 the receivers tell when the other nodes' queues, and the cluster's copies of
    /// the persistent sessions it was queued for, hold it.
    pub fn route_and_forward(
        &self,
        namespace: &Namespace,
        publication: Publication,
        backlogged: &mut Vec<Outbox>,
    ) -> (usize, Vec<tokio::sync::oneshot::Receiver<bool>>) {
        let publication = Arc::new(publication);
        let Some(remote) = self.remote.get() else {
            return (self.route_local(namespace, publication, backlogged), Vec::new());
        };
        let mut confirmations: Vec<_> = remote.forward(namespace, &publication).into_iter().collect();
        let (handed, stored) = self.route_local_stored(namespace, publication, backlogged);
        if stored > 0 {
            confirmations.extend(remote.stored());
        }
        (handed, confirmations)
    }

    /// Routes to the sessions of this node only (messages forwarded by other nodes).
    pub fn route_local(
        &self,
        namespace: &Namespace,
        publication: Arc<Publication>,
        backlogged: &mut Vec<Outbox>,
    ) -> usize {
        self.route_local_stored(namespace, publication, backlogged).0
    }

    /// As [`Broker::route_local`]; also returns how many deliveries were stored in the
    /// cluster's copies of persistent sessions (see [`RemoteRoutes::stored`]).
    pub fn route_local_stored(
        &self,
        namespace: &Namespace,
        publication: Arc<Publication>,
        backlogged: &mut Vec<Outbox>,
    ) -> (usize, usize) {
        if publication.retain {
            let delta = self
                .retained
                .write()
                .entry(namespace.clone())
                .or_default()
                .set(publication.clone());
            self.metrics.retained.add(delta);
        }
        let mut targets: Vec<(Arc<Session>, SubOptions)> = Vec::new();
        {
            let trees = self.trees.read();
            let Some(tree) = trees.get(namespace) else {
                return (0, 0);
            };
            let sessions = self.sessions.read();
            let matches = tree.matches(&publication.topic, |id| {
                sessions.get(id).is_some_and(|s| s.is_connected())
            });
            for (id, options) in matches.direct {
                if options.no_local && publication.origin == Some(*id) {
                    continue;
                }
                if let Some(session) = sessions.get(id) {
                    targets.push((session.clone(), *options));
                }
            }
            for (id, options) in matches.shared {
                if let Some(session) = sessions.get(id) {
                    targets.push((session.clone(), *options));
                }
            }
        }
        // Subscriptions overlapping a deny rule do not get the denied topics.
        if targets.iter().any(|(_, options)| options.read_checked) {
            let rules = self.acl_rules(namespace).unwrap_or_default();
            targets.retain(|(session, options)| {
                !options.read_checked || self.may_read(session, &publication.topic, &rules)
            });
        }
        // One delivery per session, with the highest QoS of its matching subscriptions.
        targets.sort_by_key(|(s, _)| s.id);
        let remote = self.remote.get();
        let mut handed = 0;
        let mut stored = 0;
        let mut i = 0;
        while i < targets.len() {
            let session = targets[i].0.clone();
            let mut qos = QoS::AtMostOnce;
            let mut retain_as_published = false;
            let mut subscription_ids = Vec::new();
            while i < targets.len() && targets[i].0.id == session.id {
                let options = targets[i].1;
                qos = qos.max(options.qos);
                retain_as_published |= options.retain_as_published;
                subscription_ids.extend(options.subscription_id);
                i += 1;
            }
            let mut delivery = Delivery {
                qos: qos.min(publication.qos),
                retain: retain_as_published && publication.retain,
                subscription_ids,
                dup: false,
                stored: None,
                publication: publication.clone(),
            };
            // In a cluster, what a persistent session is promised outlives this node.
            if let Some(remote) = remote
                && delivery.qos != QoS::AtMostOnce
                && !session.state.lock().expiry.is_zero()
            {
                delivery.stored = remote.store(&session.key, &delivery, session.is_connected());
                stored += usize::from(delivery.stored.is_some());
            }
            let id = delivery.stored.clone();
            match session.deliver(
                delivery,
                self.limits.max_queued_bytes,
                self.limits.max_queued_messages,
            ) {
                Handoff::Sent | Handoff::Queued => handed += 1,
                Handoff::Backlogged(outbox) => {
                    handed += 1;
                    backlogged.push(outbox);
                }
                Handoff::Dropped(reason) => {
                    if let (Some(remote), Some(id)) = (remote, id) {
                        remote.unstore(&session.key, &id);
                    }
                    self.metrics.dropped.with_label_values(&[reason]).inc()
                }
            }
        }
        (handed, stored)
    }

    /// Whether `session` may read `topic`, decided once per topic and rules generation.
    fn may_read(&self, session: &Session, topic: &str, rules: &[AclRule]) -> bool {
        let generation = self.acl_generation.load(Ordering::Acquire);
        let allowed = session.read_decisions.lock().may_read(generation, topic, || {
            acl::may_read(&session.identity, topic, rules)
        });
        if !allowed {
            self.metrics.dropped.with_label_values(&["not_authorized"]).inc();
        }
        allowed
    }

    /// Hands a message to one session (retained messages at subscribe time).
    pub fn deliver_to(&self, session: &Session, delivery: Delivery) {
        if let Handoff::Dropped(reason) = session.deliver(
            delivery,
            self.limits.max_queued_bytes,
            self.limits.max_queued_messages,
        ) {
            self.metrics.dropped.with_label_values(&[reason]).inc();
        }
    }

    /// Ends sessions whose expiry has passed and drops expired retained messages.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut by_key = self.by_key.lock();
        let expired: Vec<Arc<Session>> = by_key
            .values()
            .filter(|s| {
                let state = s.state.lock();
                state.link.is_none()
                    && state
                        .disconnected_at
                        .is_some_and(|at| now.saturating_duration_since(at) >= state.expiry)
            })
            .cloned()
            .collect();
        for session in &expired {
            self.discard(&mut by_key, session);
        }
        drop(by_key);
        if let Some(remote) = self.remote.get() {
            for session in &expired {
                remote.session_dropped(&session.key);
            }
        }
        let mut retained = self.retained.write();
        let mut purged = 0;
        for store in retained.values_mut() {
            purged += store.purge_expired(now);
        }
        self.metrics.retained.sub(purged as i64);
        expired.len()
    }

    /// Tells every matching connected session to close; returns how many.
    pub fn disconnect_where(&self, reason: u8, message: &str, matches: impl Fn(&Session) -> bool) -> usize {
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .read()
            .values()
            .filter(|s| matches(s))
            .cloned()
            .collect();
        let mut closed = 0;
        for session in sessions {
            let state = session.state.lock();
            if state
                .link
                .as_ref()
                .is_some_and(|link| link.outbox.disconnect(reason, message))
            {
                closed += 1;
            }
        }
        closed
    }

    /// Closes a device's connection (token rotated, device disabled or deleted), on every
    /// node of a cluster.
    pub fn disconnect_device(&self, tenant: &TenantId, device: &DeviceId, message: &str) -> usize {
        let kick = Kick::Device {
            tenant: tenant.to_string(),
            device: device.to_string(),
        };
        self.kick(&kick, reason::ADMINISTRATIVE_ACTION, message)
    }

    /// Closes the connections `kick` names here and on every other node of a cluster.
    pub fn kick(&self, kick: &Kick, reason: u8, message: &str) -> usize {
        if let Some(remote) = self.remote.get() {
            remote.kicked(kick, reason, message);
        }
        self.kick_here(kick, reason, message)
    }

    /// As [`Broker::kick`], on this node only (what another node asked for).
    pub fn kick_here(&self, kick: &Kick, reason: u8, message: &str) -> usize {
        self.disconnect_where(reason, message, |s| kick.matches(&s.identity))
    }

    /// The access rules of a namespace, if loaded.
    /// Moves on whenever any namespace's access rules change: a decision taken under one
    /// generation holds while it is current.
    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }

    pub fn acl_rules(&self, namespace: &Namespace) -> Option<Arc<Vec<AclRule>>> {
        self.acl.read().get(namespace).cloned()
    }

    /// Installs a namespace's access rules: drops the live subscriptions they now refuse
    /// wholly and marks those they refuse in part for checks at delivery. Returns how many
    /// subscriptions were dropped.
    pub fn set_acl_rules(&self, namespace: Namespace, rules: Vec<AclRule>) -> usize {
        let rules = Arc::new(rules);
        self.acl.write().insert(namespace.clone(), rules.clone());
        self.acl_generation.fetch_add(1, Ordering::AcqRel);
        let sessions: Vec<Arc<Session>> = self
            .sessions
            .read()
            .values()
            .filter(|s| s.identity.namespace() == namespace && !matches!(s.identity, Identity::Device { .. }))
            .cloned()
            .collect();
        let mut dropped = 0;
        for session in sessions {
            let subscriptions: Vec<(Subscription, SubOptions)> = session
                .state
                .lock()
                .subscriptions
                .iter()
                .map(|(sub, options)| (sub.clone(), *options))
                .collect();
            for (sub, options) in subscriptions {
                let read_checked = match acl::subscription(&session.identity, &sub.filter, &rules) {
                    acl::SubscribeDecision::Deny(_) => {
                        if self.unsubscribe(&session, &sub) {
                            tracing::info!(client = %session.key.client_id, subscription = %sub, "subscription dropped: no longer allowed by the access rules");
                            dropped += 1;
                        }
                        continue;
                    }
                    acl::SubscribeDecision::Allow => false,
                    acl::SubscribeDecision::AllowChecked => true,
                };
                if read_checked != options.read_checked {
                    self.replace_options(
                        &session,
                        &sub,
                        SubOptions {
                            read_checked,
                            ..options
                        },
                    );
                }
            }
        }
        dropped
    }

    /// Changes the options of an existing subscription in place.
    fn replace_options(&self, session: &Arc<Session>, sub: &Subscription, options: SubOptions) {
        let mut state = session.state.lock();
        let Some(current) = state.subscriptions.get_mut(sub) else {
            return;
        };
        *current = options;
        let namespace = session.identity.namespace();
        if let Some(tree) = self.trees.write().get_mut(&namespace) {
            tree.insert(&sub.filter, sub.share.as_deref(), session.id, options);
        }
    }

    /// Whether a session of this device lives here (connected, or kept for its expiry).
    pub fn holds_device_session(&self, tenant: &TenantId, device: &DeviceId) -> bool {
        self.by_key.lock().contains_key(&SessionKey {
            namespace: Namespace::Tenant(tenant.clone()),
            class: super::session::ClientClass::Device,
            client_id: device.as_str().into(),
        })
    }

    /// Whether a session with this key lives here (connected, or kept for its expiry).
    pub fn holds_session(&self, key: &SessionKey) -> bool {
        self.by_key.lock().contains_key(key)
    }

    /// The sessions of this node that outlive their connection.
    pub fn persistent_sessions(&self) -> Vec<Arc<Session>> {
        self.by_key
            .lock()
            .values()
            .filter(|s| !s.state.lock().expiry.is_zero())
            .cloned()
            .collect()
    }

    /// Gives a session up to another node: closes its connection ("session taken over") and
    /// removes it here, returning its subscriptions, queued messages and expiry.
    pub fn take_session(&self, key: &SessionKey) -> Option<TakenSession> {
        let mut by_key = self.by_key.lock();
        let session = by_key.get(key).cloned()?;
        let taken = {
            let mut state = session.state.lock();
            if let Some(link) = state.link.take() {
                link.outbox
                    .disconnect(reason::SESSION_TAKEN_OVER, "session taken over by another node");
            }
            session.set_connected(false);
            TakenSession {
                subscriptions: state
                    .subscriptions
                    .iter()
                    .map(|(sub, options)| (sub.clone(), *options))
                    .collect(),
                queued: state.queue.drain(..).collect(),
                expiry: state.expiry,
            }
        };
        self.discard(&mut by_key, &session);
        Some(taken)
    }

    /// Gives a session what another node handed over (after [`Broker::attach`]).
    pub fn restore(&self, session: &Arc<Session>, taken: TakenSession) {
        for (sub, options) in taken.subscriptions {
            // Its retained messages were sent when it first subscribed.
            let _ = self.subscribe(
                session,
                &sub,
                SubOptions {
                    retain_handling: 2,
                    ..options
                },
            );
        }
        for delivery in taken.queued {
            self.deliver_to(session, delivery);
        }
    }

    pub fn retained_count(&self) -> usize {
        self.retained.read().values().map(RetainedStore::len).sum()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::mqtt::message::Outbound;
    use crate::mqtt::session::ClientClass;

    fn broker() -> Broker {
        let limits = BrokerLimits {
            max_connections: 10,
            max_subscriptions: 3,
            max_queued_messages: 4,
            max_queued_bytes: 1 << 20,
            max_session_expiry: Duration::from_secs(3600),
        };
        Broker::new(limits, BrokerMetrics::new(&Metrics::new()))
    }

    fn tenant() -> Namespace {
        Namespace::Tenant(TenantId::parse("acme").unwrap())
    }

    fn app(id: &str) -> (SessionKey, Identity) {
        let identity = Identity::Application {
            tenant: TenantId::parse("acme").unwrap(),
            key_id: id.into(),
            role: drover_actors::Role::Operator,
        };
        (
            SessionKey {
                namespace: tenant(),
                class: ClientClass::Application,
                client_id: id.into(),
            },
            identity,
        )
    }

    fn opts(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            subscription_id: None,
            read_checked: false,
        }
    }

    fn publication(topic: &str, qos: QoS) -> Publication {
        Publication::internal(topic.to_string(), "x", qos, false)
    }

    fn received(rx: &mut super::super::session::Inbox) -> Vec<(String, QoS, bool)> {
        let mut out = Vec::new();
        while let Some(Outbound::Deliver(d)) = rx.try_recv() {
            out.push((d.publication.topic.to_string(), d.qos, d.dup));
        }
        out
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_with_the_highest_qos() {
        let b = broker();
        let (tx, mut rx) = Outbox::new();
        let (key, id) = app("c1");
        let s = b.attach(key, id, true, Duration::ZERO, tx).session;
        b.subscribe(&s, &Subscription::parse("a/+").unwrap(), opts(QoS::AtMostOnce))
            .unwrap();
        b.subscribe(&s, &Subscription::parse("a/#").unwrap(), opts(QoS::AtLeastOnce))
            .unwrap();
        assert_eq!(b.publish(&tenant(), publication("a/b", QoS::ExactlyOnce)), 1);
        assert_eq!(received(&mut rx), [("a/b".to_string(), QoS::AtLeastOnce, false)]);
        // Other namespaces do not see it.
        assert_eq!(
            b.publish(&Namespace::Anonymous, publication("a/b", QoS::AtMostOnce)),
            0
        );
    }

    #[test]
    fn persistent_sessions_queue_while_away_and_resume() {
        let b = broker();
        let (key, id) = app("c1");
        let (tx, rx) = Outbox::new();
        let attached = b.attach(key.clone(), id.clone(), true, Duration::from_secs(60), tx);
        b.subscribe(
            &attached.session,
            &Subscription::parse("t").unwrap(),
            opts(QoS::AtLeastOnce),
        )
        .unwrap();
        drop(rx);
        // A QoS 1 delivery written but not acknowledged when the connection dropped (the
        // outbound task marks those DUP before handing them back).
        let unacked = Delivery {
            publication: Arc::new(publication("t", QoS::AtLeastOnce)),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
            dup: true,
            stored: None,
        };
        b.detach(&attached.session, attached.conn_id, vec![unacked]);
        assert!(!attached.session.is_connected());
        b.publish(&tenant(), publication("t", QoS::AtLeastOnce));
        b.publish(&tenant(), publication("t", QoS::AtMostOnce)); // QoS 0 is not queued for absent clients
        for _ in 0..5 {
            b.publish(&tenant(), publication("t", QoS::AtLeastOnce));
        }
        let (tx, mut rx) = Outbox::new();
        let again = b.attach(key, id, false, Duration::from_secs(60), tx);
        assert!(again.session_present);
        let got = received(&mut rx);
        assert_eq!(got.len(), 4, "bounded by max_queued_messages: {got:?}");
        assert!(got[0].2, "the unacknowledged one comes first, still marked DUP");
        assert!(!got[1].2);
    }

    #[test]
    fn clean_start_discards_and_takeover_disconnects_the_old_connection() {
        let b = broker();
        let (key, id) = app("c1");
        let (tx1, mut rx1) = Outbox::new();
        let first = b.attach(key.clone(), id.clone(), true, Duration::from_secs(60), tx1);
        b.subscribe(
            &first.session,
            &Subscription::parse("t").unwrap(),
            opts(QoS::AtMostOnce),
        )
        .unwrap();
        let (tx2, _rx2) = Outbox::new();
        let second = b.attach(key.clone(), id.clone(), false, Duration::from_secs(60), tx2);
        assert!(second.session_present);
        assert!(matches!(
            rx1.try_recv(),
            Some(Outbound::Disconnect {
                reason: reason::SESSION_TAKEN_OVER,
                ..
            })
        ));
        // The old connection's end does not detach the new one.
        b.detach(&first.session, first.conn_id, vec![]);
        assert!(second.session.is_connected());
        let (tx3, _rx3) = Outbox::new();
        let third = b.attach(key, id, true, Duration::ZERO, tx3);
        assert!(!third.session_present);
        assert!(third.session.state.lock().subscriptions.is_empty());
        assert_eq!(
            b.publish(&tenant(), publication("t", QoS::AtMostOnce)),
            0,
            "old subscriptions are gone"
        );
        assert_eq!(b.session_count(), 1);
    }

    #[test]
    fn sessions_without_expiry_end_with_their_connection() {
        let b = broker();
        let (key, id) = app("c1");
        let (tx, _rx) = Outbox::new();
        let a = b.attach(key, id, true, Duration::ZERO, tx);
        b.subscribe(
            &a.session,
            &Subscription::parse("t").unwrap(),
            opts(QoS::AtMostOnce),
        )
        .unwrap();
        b.detach(&a.session, a.conn_id, vec![]);
        assert_eq!(b.session_count(), 0);
        assert_eq!(b.publish(&tenant(), publication("t", QoS::AtMostOnce)), 0);
    }

    #[test]
    fn subscription_quota_and_retained() {
        let b = broker();
        let (key, id) = app("c1");
        let (tx, _rx) = Outbox::new();
        let s = b.attach(key, id, true, Duration::ZERO, tx).session;
        let mut retained = publication("r/1", QoS::AtLeastOnce);
        retained.retain = true;
        b.publish(&tenant(), retained);
        let outcome = b
            .subscribe(&s, &Subscription::parse("r/#").unwrap(), opts(QoS::AtMostOnce))
            .unwrap();
        assert_eq!(outcome.retained.len(), 1);
        b.subscribe(&s, &Subscription::parse("b").unwrap(), opts(QoS::AtMostOnce))
            .unwrap();
        b.subscribe(&s, &Subscription::parse("c").unwrap(), opts(QoS::AtMostOnce))
            .unwrap();
        assert_eq!(
            b.subscribe(&s, &Subscription::parse("d").unwrap(), opts(QoS::AtMostOnce))
                .err(),
            Some(SubscribeError::QuotaExceeded)
        );
        // Replacing an existing one is not a new subscription.
        assert!(
            b.subscribe(&s, &Subscription::parse("c").unwrap(), opts(QoS::AtLeastOnce))
                .unwrap()
                .existed
        );
        // Retain handling 2 sends nothing; shared subscriptions never get retained messages.
        let mut no_retained = opts(QoS::AtMostOnce);
        no_retained.retain_handling = 2;
        assert!(
            b.subscribe(&s, &Subscription::parse("r/#").unwrap(), no_retained)
                .unwrap()
                .retained
                .is_empty()
        );
        assert_eq!(b.retained_count(), 1);
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let b = broker();
        let (key, id) = app("c1");
        let (tx, mut rx) = Outbox::new();
        let s = b.attach(key, id, true, Duration::ZERO, tx).session;
        let mut o = opts(QoS::AtMostOnce);
        o.no_local = true;
        b.subscribe(&s, &Subscription::parse("t").unwrap(), o).unwrap();
        let mut own = publication("t", QoS::AtMostOnce);
        own.origin = Some(s.id);
        assert_eq!(b.publish(&tenant(), own), 0);
        assert_eq!(b.publish(&tenant(), publication("t", QoS::AtMostOnce)), 1);
        assert_eq!(received(&mut rx).len(), 1);
    }

    #[test]
    fn rules_installed_later_withhold_denied_topics_from_live_wildcard_subscriptions() {
        use crate::storage::records::{AclAction, AclEffect, AclSubject};
        let b = broker();
        let (key, id) = app("c1");
        let (tx, mut rx) = Outbox::new();
        let s = b.attach(key, id, true, Duration::ZERO, tx).session;
        b.subscribe(&s, &Subscription::parse("#").unwrap(), opts(QoS::AtMostOnce))
            .unwrap();
        b.subscribe(
            &s,
            &Subscription::parse("alerts/fire").unwrap(),
            opts(QoS::AtMostOnce),
        )
        .unwrap();
        let deny = |topic: &str| AclRule {
            id: format!("deny-{topic}"),
            tenant: None,
            subject: AclSubject::Role(drover_actors::Role::Operator),
            action: AclAction::Subscribe,
            topic: topic.into(),
            effect: AclEffect::Deny,
            priority: 1,
            created_at: chrono::Utc::now(),
        };
        // `alerts/fire` lies wholly inside the rule and is dropped; `#` stays, checked.
        assert_eq!(b.set_acl_rules(tenant(), vec![deny("alerts/#")]), 1);
        assert_eq!(
            b.publish(&tenant(), publication("alerts/fire", QoS::AtMostOnce)),
            0
        );
        assert_eq!(
            b.publish(&tenant(), publication("alerts/fire", QoS::AtMostOnce)),
            0
        );
        assert_eq!(b.publish(&tenant(), publication("status/ok", QoS::AtMostOnce)), 1);
        assert_eq!(received(&mut rx).len(), 1);
        // New rules, new decisions: the cached ones do not outlive them.
        assert_eq!(b.set_acl_rules(tenant(), vec![deny("status/ok")]), 0);
        assert_eq!(
            b.publish(&tenant(), publication("alerts/fire", QoS::AtMostOnce)),
            1
        );
        assert_eq!(b.publish(&tenant(), publication("status/ok", QoS::AtMostOnce)), 0);
        // Without rules the subscription is no longer checked.
        b.set_acl_rules(tenant(), vec![]);
        assert!(!s.state.lock().subscriptions.values().any(|o| o.read_checked));
        assert_eq!(b.publish(&tenant(), publication("status/ok", QoS::AtMostOnce)), 1);
    }

    /// A cluster as the broker sees it: records what it is told about persistent sessions.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        next: AtomicU64,
    }

    impl RemoteRoutes for Recorder {
        fn subscribed(&self, _: &Namespace, _: &str) {}
        fn unsubscribed(&self, _: &Namespace, _: &str) {}
        fn forward(
            &self,
            _: &Namespace,
            _: &Arc<Publication>,
        ) -> Option<tokio::sync::oneshot::Receiver<bool>> {
            None
        }
        fn kicked(&self, _: &Kick, _: u8, _: &str) {}
        fn session_saved(&self, session: &Session) {
            let subs = session.state.lock().subscriptions.len();
            self.calls
                .lock()
                .push(format!("saved {} {subs}", session.key.client_id));
        }
        fn session_dropped(&self, key: &SessionKey) {
            self.calls.lock().push(format!("dropped {}", key.client_id));
        }
        fn store(&self, key: &SessionKey, d: &Delivery, sent: bool) -> Option<Arc<str>> {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            self.calls.lock().push(format!(
                "store {} {} {id} sent={sent}",
                key.client_id, d.publication.topic
            ));
            Some(id.to_string().into())
        }
        fn unstore(&self, key: &SessionKey, id: &str) {
            self.calls.lock().push(format!("unstore {} {id}", key.client_id));
        }
        fn stored(&self) -> Option<tokio::sync::oneshot::Receiver<bool>> {
            self.calls.lock().push("barrier".into());
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(true);
            Some(rx)
        }
    }

    #[test]
    fn in_a_cluster_persistent_sessions_are_written_through_and_others_are_not() {
        let b = broker();
        let recorder = Arc::new(Recorder::default());
        b.set_remote(recorder.clone());
        // What was written, less the barriers (tested once, below).
        let calls = || -> Vec<String> {
            std::mem::take(&mut *recorder.calls.lock())
                .into_iter()
                .filter(|c| c != "barrier")
                .collect()
        };
        let (key, id) = app("keeper");
        let (tx, rx) = Outbox::new();
        let kept = b.attach(key.clone(), id.clone(), true, Duration::from_secs(60), tx);
        b.subscribe(
            &kept.session,
            &Subscription::parse("t").unwrap(),
            opts(QoS::AtLeastOnce),
        )
        .unwrap();
        let (fkey, fid) = app("fleeting");
        let (ftx, _frx) = Outbox::new();
        let fleeting = b.attach(fkey, fid, true, Duration::ZERO, ftx);
        b.subscribe(
            &fleeting.session,
            &Subscription::parse("t").unwrap(),
            opts(QoS::AtLeastOnce),
        )
        .unwrap();
        assert_eq!(
            calls(),
            ["saved keeper 0", "saved keeper 1"],
            "connect and subscribe"
        );

        // Online: the QoS 1 delivery is stored (sent) and the publisher waits for the write;
        // QoS 0 and the session without expiry are not stored.
        let (handed, confirmations) =
            b.route_and_forward(&tenant(), publication("t", QoS::AtLeastOnce), &mut Vec::new());
        assert_eq!((handed, confirmations.len()), (2, 1));
        assert_eq!(*recorder.calls.lock(), ["store keeper t 0 sent=true", "barrier"]);
        b.publish(&tenant(), publication("t", QoS::AtMostOnce));
        assert_eq!(calls(), ["store keeper t 0 sent=true"]);

        // Away: what was in flight comes back with its id; what is queued is stored unsent.
        drop(rx);
        let mut inflight = Vec::new();
        let unacked = Delivery {
            publication: Arc::new(publication("t", QoS::AtLeastOnce)),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
            dup: true,
            stored: Some("0".into()),
        };
        inflight.push(unacked);
        b.detach(&kept.session, kept.conn_id, inflight);
        assert_eq!(calls(), ["saved keeper 1"]);
        for _ in 0..3 {
            b.publish(&tenant(), publication("t", QoS::AtLeastOnce));
        }
        let stored = calls();
        assert_eq!(stored.len(), 3, "{stored:?}");
        assert!(stored.iter().all(|c| c.ends_with("sent=false")), "{stored:?}");
        // max_queued_messages is 4 (with the one in flight): the next is dropped and unstored.
        assert_eq!(
            b.publish(&tenant(), publication("t", QoS::AtLeastOnce)),
            1,
            "the session without expiry only"
        );
        assert_eq!(calls(), ["store keeper t 4 sent=false", "unstore keeper 4"]);

        // Resumed on this node: the queue keeps its ids for the acknowledgements.
        let (tx, mut rx) = Outbox::new();
        let back = b.attach(key.clone(), id.clone(), false, Duration::from_secs(60), tx);
        assert!(back.session_present);
        let mut ids = Vec::new();
        while let Some(Outbound::Deliver(d)) = rx.try_recv() {
            ids.push(d.stored.as_deref().map(str::to_string));
        }
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[0].as_deref(), Some("0"), "the one in flight first");
        assert!(ids.iter().all(Option::is_some));
        calls();
        // A session that ends with its connection drops its copy; so does one that expires.
        let (tx, _rx) = Outbox::new();
        let ending = b.attach(key.clone(), id.clone(), false, Duration::ZERO, tx);
        assert!(calls().is_empty(), "no expiry, nothing written");
        b.detach(&ending.session, ending.conn_id, Vec::new());
        assert_eq!(calls(), ["dropped keeper"]);
        let (tx, _rx) = Outbox::new();
        let expiring = b.attach(key, id, false, Duration::from_secs(1), tx);
        b.detach(&expiring.session, expiring.conn_id, Vec::new());
        calls();
        assert_eq!(b.sweep(Instant::now() + Duration::from_secs(2)), 1);
        assert_eq!(calls(), ["dropped keeper"]);
    }

    #[test]
    fn connection_limit() {
        let b = broker();
        for _ in 0..10 {
            assert!(b.try_reserve_connection());
        }
        assert!(!b.try_reserve_connection());
        b.release_connection();
        assert!(b.try_reserve_connection());
    }
}
