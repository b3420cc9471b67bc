//! Persistent MQTT sessions in Redis (cluster mode only). A session that outlives its
//! connection (MQTT 3.1.1 clean session 0, MQTT 5 session expiry > 0) is written through as it
//! changes, so a client whose node died resumes it on any other node:
//!
//! - `session:{ns}:{class}:{client}`: a hash with `owner` (the node holding the session now)
//!   and `data` (who may resume it, its subscriptions, its expiry).
//! - `sq:{ns}:{class}:{client}`: the QoS 1/2 messages promised to it that its client has not
//!   acknowledged yet, queued while it was away or in flight, one field each (an id that
//!   sorts by time). A message is written before its publisher gets PUBACK (or before the
//!   forward that brought it is acknowledged in its stream) and removed when the client sends
//!   PUBACK (PUBREC for QoS 2); removals are batched.
//!
//! Both expire with the session: once the client is away, after the session expiry; while it
//! is connected, the expiry plus [`CONNECTED_MARGIN`], renewed every [`REFRESH_EVERY`] (so a
//! node that dies with the client connected leaves the session to the expiry plus that margin).
//!
//! Writes leave through one task, in order, batched into pipelines. A node writes its
//! sessions' copies only while it is their `owner`: a connection claims the copy first
//! ([`Cluster::claim_session`]), and another node that still holds the session gives it up.
//! While Redis is away nothing is written (the node serves from memory); when it returns every
//! persistent session of the node is written again, with its queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ntex_mqtt::QoS;
use tokio::sync::{mpsc, oneshot};

use super::Cluster;
use super::wire::{self, namespace_key, parse_namespace};
use crate::mqtt::acl::Identity;
use crate::mqtt::broker::TakenSession;
use crate::mqtt::message::Delivery;
use crate::mqtt::session::{ClientClass, Session, SessionKey, SubOptions};
use crate::mqtt::topic::{self, Subscription};

/// Writes one pipeline carries.
const WRITE_BATCH: usize = 512;
/// How often the copies of connected sessions have their TTL renewed.
const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// What a connected session's copy outlives its expiry by, so renewals every
/// [`REFRESH_EVERY`] keep it.
const CONNECTED_MARGIN: Duration = Duration::from_secs(180);
/// Entries of a dead node's stream looked through for a session resumed from it.
const DRAIN_MAX: usize = 10_000;
/// How long a session handed over by a live node waits in Redis for its new node.
const HANDOFF_TTL_MS: u64 = 60_000;
/// How long a connection waits for the node holding its session to hand it over.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// Takes the copy for this node (`ARGV[1]`), or drops it on a clean start (`ARGV[2]` = 1).
/// Returns the previous owner and the session data; empty strings when there is no copy.
const CLAIM: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {'', ''} end
local data = redis.call('HGET', KEYS[1], 'data') or ''
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
end
return {owner, data}
";

/// Rewrites the session data, unless another node owns the copy now.
const SAVE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'data', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
";

/// Drops the copy, if this node owns it.
const DROP: &str = r"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1], KEYS[2])
end
return 0
";

/// Keeps a message for the session while it exists, up to `ARGV[3]` messages, with the
/// session's TTL.
const STORE: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
";

const TAKE: &str = r"
local value = redis.call('GET', KEYS[1])
if value then redis.call('DEL', KEYS[1]) end
return value
";

enum Write {
    Save {
        meta: String,
        queue: String,
        data: String,
        ttl_ms: u64,
    },
    Drop {
        meta: String,
        queue: String,
    },
    Store {
        meta: String,
        queue: String,
        id: Arc<str>,
        value: Vec<u8>,
    },
    Unstore {
        queue: String,
        id: Arc<str>,
    },
    Barrier(oneshot::Sender<bool>),
}

/// The write-through of this node's persistent sessions.
#[derive(Default)]
pub struct SessionStore {
    writes: OnceLock<mpsc::UnboundedSender<Write>>,
    counter: AtomicU64,
    /// Something was not written (Redis away): every persistent session of this node is
    /// written again once Redis answers.
    resync: AtomicBool,
}

fn class_code(class: ClientClass) -> &'static str {
    match class {
        ClientClass::Device => "d",
        ClientClass::Application => "a",
        ClientClass::Anonymous => "n",
    }
}

fn class_of(code: &str) -> Option<ClientClass> {
    match code {
        "d" => Some(ClientClass::Device),
        "a" => Some(ClientClass::Application),
        "n" => Some(ClientClass::Anonymous),
        _ => None,
    }
}

/// `{ns}:{class}:{client}`, the part of a session's keys that names it.
fn session_name(key: &SessionKey) -> String {
    format!(
        "{}:{}:{}",
        namespace_key(&key.namespace),
        class_code(key.class),
        key.client_id
    )
}

/// A session key back from what [`Cluster::ask_session`] sent.
pub fn session_key(ns: &str, class: &str, client: &str) -> Option<SessionKey> {
    Some(SessionKey {
        namespace: parse_namespace(ns)?,
        class: class_of(class)?,
        client_id: client.into(),
    })
}

/// The deliveries a stored session's subscriptions make of a publication (none below QoS 1:
/// only QoS 1/2 wait for an absent client).
fn delivery_for(
    subscriptions: &[(Subscription, SubOptions)],
    publication: crate::mqtt::message::Publication,
) -> Option<Delivery> {
    let mut qos = None;
    let mut retain_as_published = false;
    let mut subscription_ids = Vec::new();
    for (sub, options) in subscriptions {
        if topic::matches(&sub.filter, &publication.topic) {
            qos = Some(qos.map_or(options.qos, |q: QoS| q.max(options.qos)));
            retain_as_published |= options.retain_as_published;
            subscription_ids.extend(options.subscription_id);
        }
    }
    let qos = qos?.min(publication.qos);
    if qos == QoS::AtMostOnce {
        return None;
    }
    Some(Delivery {
        qos,
        retain: retain_as_published && publication.retain,
        subscription_ids,
        dup: false,
        stored: None,
        publication: Arc::new(publication),
    })
}

impl Cluster {
    /// The keys of a session's copy: its data and its messages.
    fn session_keys(&self, key: &SessionKey) -> (String, String) {
        let name = session_name(key);
        (
            self.key(&format!("session:{name}")),
            self.key(&format!("sq:{name}")),
        )
    }

    fn session_handoff_key(&self, key: &SessionKey) -> String {
        self.key(&format!("session-handoff:{}", session_name(key)))
    }

    /// Queues a write; `false` when Redis is away (then everything is written again later).
    fn write(&self, write: Write) -> bool {
        let sent = self.redis_up()
            && self
                .sessions
                .writes
                .get()
                .is_some_and(|tx| tx.send(write).is_ok());
        if !sent {
            self.sessions.resync.store(true, Ordering::Release);
            self.metrics.session_writes.with_label_values(&["skipped"]).inc();
        }
        sent
    }

    /// An id for a stored message: unique, and sorting by time.
    fn next_message_id(&self) -> Arc<str> {
        let n = self.sessions.counter.fetch_add(1, Ordering::Relaxed) % 10_000_000_000;
        format!("{:013}-{n:010}-{}", super::now_ms(), self.node_id).into()
    }

    /// Writes a persistent session's data (subscriptions, expiry) and sets its copy's TTL.
    pub(super) fn save_session(&self, session: &Session) {
        let (subscriptions, expiry, connected, away) = {
            let state = session.state.lock();
            (
                state
                    .subscriptions
                    .iter()
                    .map(|(s, o)| (s.clone(), *o))
                    .collect::<Vec<_>>(),
                state.expiry,
                state.link.is_some(),
                state.disconnected_at.map(|at| at.elapsed()),
            )
        };
        if expiry.is_zero() {
            return;
        }
        let ttl = if connected {
            expiry + CONNECTED_MARGIN
        } else {
            expiry.saturating_sub(away.unwrap_or_default())
        };
        let (meta, queue) = self.session_keys(&session.key);
        self.write(Write::Save {
            meta,
            queue,
            data: wire::encode_stored_session(&session.identity.label(), &subscriptions, expiry),
            ttl_ms: (ttl.as_millis() as u64).max(1),
        });
    }

    pub(super) fn drop_session(&self, key: &SessionKey) {
        let (meta, queue) = self.session_keys(key);
        self.write(Write::Drop { meta, queue });
    }

    /// Keeps a delivery in the session's copy until the client acknowledges it.
    pub(super) fn store_delivery(
        &self,
        key: &SessionKey,
        delivery: &Delivery,
        sent: bool,
    ) -> Option<Arc<str>> {
        if !self.redis_up() {
            self.sessions.resync.store(true, Ordering::Release);
            return None;
        }
        let id = delivery.stored.clone().unwrap_or_else(|| self.next_message_id());
        let (meta, queue) = self.session_keys(key);
        let value = wire::encode_delivery(delivery, sent);
        self.write(Write::Store {
            meta,
            queue,
            id: id.clone(),
            value,
        })
        .then_some(id)
    }

    pub(super) fn unstore_delivery(&self, key: &SessionKey, id: &str) {
        let (_, queue) = self.session_keys(key);
        self.write(Write::Unstore { queue, id: id.into() });
    }

    /// Resolves once everything queued for writing so far is written (`true`) or failed.
    pub(super) fn stored_barrier(&self) -> Option<oneshot::Receiver<bool>> {
        let (tx, rx) = oneshot::channel();
        self.write(Write::Barrier(tx)).then_some(rx)
    }

    async fn run_writes(&self, batch: &mut Vec<Write>) {
        let max_queued = self.broker.limits.max_queued_messages;
        let mut pipe = redis::pipe();
        let mut commands = 0;
        let mut barriers = Vec::new();
        for write in batch.drain(..) {
            match write {
                Write::Save {
                    meta,
                    queue,
                    data,
                    ttl_ms,
                } => {
                    pipe.cmd("EVAL")
                        .arg(SAVE)
                        .arg(2)
                        .arg(meta)
                        .arg(queue)
                        .arg(&self.node_id)
                        .arg(data)
                        .arg(ttl_ms)
                        .ignore();
                }
                Write::Drop { meta, queue } => {
                    pipe.cmd("EVAL")
                        .arg(DROP)
                        .arg(2)
                        .arg(meta)
                        .arg(queue)
                        .arg(&self.node_id)
                        .ignore();
                }
                Write::Store {
                    meta,
                    queue,
                    id,
                    value,
                } => {
                    pipe.cmd("EVAL")
                        .arg(STORE)
                        .arg(2)
                        .arg(meta)
                        .arg(queue)
                        .arg(id.as_ref())
                        .arg(value)
                        .arg(max_queued)
                        .ignore();
                }
                Write::Unstore { queue, id } => {
                    pipe.cmd("HDEL").arg(queue).arg(id.as_ref()).ignore();
                }
                Write::Barrier(tx) => {
                    barriers.push(tx);
                    continue;
                }
            }
            commands += 1;
        }
        let ok = if commands == 0 {
            true
        } else {
            let mut conn = self.conn.clone();
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    self.metrics
                        .session_writes
                        .with_label_values(&["written"])
                        .inc_by(commands);
                    true
                }
                Err(error) => {
                    self.metrics
                        .session_writes
                        .with_label_values(&["failed"])
                        .inc_by(commands);
                    self.sessions.resync.store(true, Ordering::Release);
                    self.set_redis_up(false, &error);
                    false
                }
            }
        };
        for barrier in barriers {
            let _ = barrier.send(ok);
        }
    }

    /// Writes a session again whole (after Redis was away): its data and its queue.
    fn resync_session(&self, session: &Session) {
        self.save_session(session);
        let mut state = session.state.lock();
        for delivery in state.queue.iter_mut() {
            if let Some(id) = self.store_delivery(&session.key, delivery, delivery.dup) {
                delivery.stored = Some(id);
            }
        }
    }

    /// Makes this node the owner of a session's copy in Redis before its connection is
    /// accepted here; a clean start drops the copy. Returns the session to resume when this
    /// node does not hold it: the one a live node handed over (`handed`: the device's previous
    /// node did already), with the messages it had in flight, which only Redis knows; or the
    /// stored copy (its node died, or restarted), with the messages forwarded to a dead node
    /// for it and never delivered.
    pub async fn claim_session(
        &self,
        key: &SessionKey,
        identity: &Identity,
        clean_start: bool,
        mut handed: Option<TakenSession>,
    ) -> Option<TakenSession> {
        if !self.redis_up() {
            // Degraded: the connection is not held up by a Redis that does not answer.
            self.sessions.resync.store(true, Ordering::Release);
            return handed;
        }
        let (meta, queue) = self.session_keys(key);
        let mut conn = self.conn.clone();
        let claimed: redis::RedisResult<(String, String)> = redis::cmd("EVAL")
            .arg(CLAIM)
            .arg(2)
            .arg(&meta)
            .arg(&queue)
            .arg(&self.node_id)
            .arg(if clean_start { "1" } else { "0" })
            .query_async(&mut conn)
            .await;
        let (previous, data) = match claimed {
            Ok(claimed) => claimed,
            Err(error) => {
                // Served from memory: a session only Redis knew is not found now.
                self.set_redis_up(false, &error);
                self.sessions.resync.store(true, Ordering::Release);
                return handed;
            }
        };
        if previous.is_empty() {
            return handed;
        }
        let elsewhere = previous != self.node_id && self.is_live(&previous);
        // A device's previous node gave its session up with the device (see `claim_device`).
        if elsewhere && key.class != ClientClass::Device {
            handed = self.ask_session(&previous, key, clean_start).await;
        }
        if clean_start || self.broker.holds_session(key) {
            return handed;
        }
        let stored: HashMap<String, Vec<u8>> = match redis::cmd("HGETALL")
            .arg(&queue)
            .query_async(&mut conn)
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, client = %key.client_id, "stored messages of the session could not be read");
                HashMap::new()
            }
        };
        let mut stored: Vec<(String, Vec<u8>)> = stored.into_iter().collect();
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        let stored = stored
            .iter()
            .filter_map(|(id, value)| wire::decode_delivery(id, value));
        if let Some(mut handed) = handed {
            // What the old connection had in flight went back to a session that was gone.
            let known: std::collections::HashSet<Arc<str>> =
                handed.queued.iter().filter_map(|d| d.stored.clone()).collect();
            let mut queued: Vec<Delivery> = stored
                .filter(|d| d.stored.as_ref().is_some_and(|id| !known.contains(id)))
                .map(|d| Delivery { dup: true, ..d })
                .collect();
            queued.append(&mut handed.queued);
            handed.queued = queued;
            self.metrics.sessions_resumed.with_label_values(&["node"]).inc();
            return Some(handed);
        }
        let (who, mut session) = wire::decode_stored_session(&data)?;
        if who != identity.label() {
            // Someone else's session under this client id: MQTT resumes it only for its own.
            return None;
        }
        session.queued = stored.collect();
        if previous != self.node_id && !elsewhere {
            // Its node died: what was forwarded to it and never delivered is still in its
            // stream.
            for mut delivery in self.drain_stream(&previous, key, &session.subscriptions).await {
                delivery.stored = self.store_delivery(key, &delivery, false);
                session.queued.push(delivery);
            }
        }
        tracing::info!(client = %key.client_id, from = %previous, messages = session.queued.len(), "session resumed from the cluster's copy");
        self.metrics.sessions_resumed.with_label_values(&["redis"]).inc();
        Some(session)
    }

    /// Asks the live node holding a session to give it up (closing its connection) and, unless
    /// `discard`, waits for it to hand the session over.
    async fn ask_session(&self, owner: &str, key: &SessionKey, discard: bool) -> Option<TakenSession> {
        let handoff = self.session_handoff_key(key);
        let message = super::ownership::Control::TakeSession {
            ns: namespace_key(&key.namespace),
            class: class_code(key.class).into(),
            client: key.client_id.to_string(),
            to: self.node_id.clone(),
            discard,
        };
        let mut conn = self.conn.clone();
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(self.key(&format!("control:{owner}")))
            .arg(serde_json::to_string(&message).unwrap_or_default())
            .query_async(&mut conn)
            .await;
        if let Err(error) = sent {
            self.set_redis_up(false, &error);
            return None;
        }
        if discard {
            return None;
        }
        let started = Instant::now();
        while started.elapsed() < HANDOVER_WAIT {
            let handed: redis::RedisResult<Option<String>> = redis::cmd("EVAL")
                .arg(TAKE)
                .arg(1)
                .arg(&handoff)
                .query_async(&mut conn)
                .await;
            match handed {
                Ok(Some(json)) => return wire::decode_session(&json),
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => return None,
            }
        }
        tracing::warn!(client = %key.client_id, %owner, "session owner did not hand over in time: resuming the stored copy");
        None
    }

    /// The owner's side of [`Cluster::ask_session`]: closes the connection, and hands the
    /// session over once its stored messages are written.
    pub(super) async fn give_up_session(self: Arc<Self>, key: SessionKey, to: String, discard: bool) {
        let Some(taken) = self.broker.take_session(&key) else {
            return;
        };
        tracing::info!(client = %key.client_id, %to, "session taken over by another node");
        if discard {
            return;
        }
        if let Some(written) = self.stored_barrier() {
            let _ = written.await;
        }
        let mut conn = self.conn.clone();
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(self.session_handoff_key(&key))
            .arg(wire::encode_session(&taken))
            .arg("PX")
            .arg(HANDOFF_TTL_MS)
            .query_async(&mut conn)
            .await;
        if let Err(error) = stored {
            tracing::warn!(%error, client = %key.client_id, "session could not be handed over");
        }
    }

    /// The QoS 1/2 messages for a session still waiting in the stream of its dead node.
    async fn drain_stream(
        &self,
        node: &str,
        key: &SessionKey,
        subscriptions: &[(Subscription, SubOptions)],
    ) -> Vec<Delivery> {
        let mut conn = self.conn.clone();
        let reply: redis::RedisResult<redis::streams::StreamRangeReply> = redis::cmd("XRANGE")
            .arg(self.key(&format!("fwd:{node}")))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(DRAIN_MAX)
            .query_async(&mut conn)
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                tracing::warn!(%error, %node, "the stream of a dead node could not be read");
                return Vec::new();
            }
        };
        reply
            .ids
            .into_iter()
            .filter_map(|entry| wire::publication_from_fields(&entry.map))
            .filter(|(namespace, _)| *namespace == key.namespace)
            .filter_map(|(_, publication)| delivery_for(subscriptions, publication))
            .collect()
    }
}

/// Starts the writer, and the task that renews the TTL of connected sessions' copies and
/// writes everything again after Redis was away.
pub fn start(cluster: &Arc<Cluster>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _ = cluster.sessions.writes.set(tx);
    let weak = Arc::downgrade(cluster);
    actix_rt::spawn(async move {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let Some(cluster) = weak.upgrade() else { return };
            cluster.run_writes(&mut batch).await;
        }
    });
    let weak = Arc::downgrade(cluster);
    actix_rt::spawn(async move {
        let mut refreshed = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(cluster) = weak.upgrade() else { return };
            let resync = cluster.redis_up() && cluster.sessions.resync.swap(false, Ordering::AcqRel);
            if !resync && refreshed.elapsed() < REFRESH_EVERY {
                continue;
            }
            refreshed = Instant::now();
            let sessions = cluster.broker.persistent_sessions();
            if resync && !sessions.is_empty() {
                tracing::info!(
                    sessions = sessions.len(),
                    "writing the persistent sessions to Redis again"
                );
            }
            for session in sessions {
                if resync {
                    cluster.resync_session(&session);
                } else if session.is_connected() {
                    cluster.save_session(&session);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::message::Publication;

    fn sub(filter: &str, qos: QoS, id: Option<u32>) -> (Subscription, SubOptions) {
        (
            Subscription::parse(filter).unwrap(),
            SubOptions {
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
                subscription_id: id.and_then(std::num::NonZeroU32::new),
                read_checked: false,
            },
        )
    }

    #[test]
    fn a_drained_publication_is_delivered_as_the_subscriptions_ask() {
        let subs = [
            sub("orders/#", QoS::AtLeastOnce, Some(3)),
            sub("orders/+/new", QoS::ExactlyOnce, None),
            sub("status/#", QoS::AtMostOnce, None),
        ];
        let p = |topic: &str, qos| Publication::internal(topic.to_string(), "x", qos, false);
        let d = delivery_for(&subs, p("orders/7/new", QoS::ExactlyOnce)).unwrap();
        assert_eq!(
            d.qos,
            QoS::ExactlyOnce,
            "the highest QoS of the matching subscriptions"
        );
        assert_eq!(d.subscription_ids.len(), 1);
        let d = delivery_for(&subs, p("orders/7/new", QoS::AtLeastOnce)).unwrap();
        assert_eq!(d.qos, QoS::AtLeastOnce, "never above the publication's");
        assert!(
            delivery_for(&subs, p("status/x", QoS::AtLeastOnce)).is_none(),
            "QoS 0 does not wait"
        );
        assert!(delivery_for(&subs, p("other", QoS::AtLeastOnce)).is_none());
    }

    #[test]
    fn session_names_round_trip() {
        let key = SessionKey {
            namespace: crate::mqtt::acl::Namespace::Tenant(drover_actors::TenantId::parse("acme").unwrap()),
            class: ClientClass::Application,
            client_id: "app:1".into(),
        };
        assert_eq!(session_name(&key), "t:acme:a:app:1");
        let back = session_key("t:acme", class_code(key.class), "app:1").unwrap();
        assert_eq!(back, key);
        assert!(session_key("t:acme", "x", "c").is_none());
    }
}
