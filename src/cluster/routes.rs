//! Routing between nodes. Each node announces the filters its sessions hold (`routes:{id}`,
//! changes on the `routes` channel) and caches everyone else's in one subscription tree per
//! namespace; a publication is matched locally and against that cache, and forwarded to the
//! matching nodes through their streams `fwd:{id}` (consumer group, XACK after delivery), so a
//! forward waits in Redis while its node restarts. Retained messages go to every node and are
//! kept in Redis for nodes that join later.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt;
use ntex_mqtt::QoS;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::stream::StreamConsumer;
use super::wire::{self, namespace_key, parse_namespace};
use super::{Cluster, ownership};
use crate::mqtt::acl::Namespace;
use crate::mqtt::broker::RemoteRoutes;
use crate::mqtt::message::Publication;
use crate::mqtt::subscriptions::SubscriptionTree;

/// Publications waiting for the forwarder; beyond it QoS 0 is dropped (counted) and QoS 1/2
/// wait for room.
const FORWARD_QUEUE: usize = 16_384;
/// Entries one XADD batch carries.
const FORWARD_BATCH: usize = 512;
/// Length a node's stream is capped at (approximately), so a node that never returns does not
/// fill Redis.
const STREAM_CAP: u64 = 1_000_000;
/// Full route reloads heal notices missed while the pub/sub connection was down.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
const SEPARATOR: char = '\u{1f}';

fn entry(namespace: &Namespace, filter: &str) -> String {
    format!("{}{SEPARATOR}{filter}", namespace_key(namespace))
}

fn split_entry(entry: &str) -> Option<(Namespace, &str)> {
    let (ns, filter) = entry.split_once(SEPARATOR)?;
    Some((parse_namespace(ns)?, filter))
}

/// One publication on its way to other nodes.
pub struct Forward {
    targets: Vec<Arc<str>>,
    namespace: Namespace,
    fields: Vec<(&'static str, Vec<u8>)>,
    retained: Option<(String, Vec<u8>)>,
    done: Option<oneshot::Sender<bool>>,
}

/// This node's filters and the cached filters of the others.
#[derive(Default)]
pub struct RouteTable {
    /// Sessions of this node per `namespace␟filter`.
    local: Mutex<HashMap<String, usize>>,
    /// Other nodes' filters: the node ids whose sessions match, per namespace.
    remote: RwLock<HashMap<Namespace, SubscriptionTree<Arc<str>, ()>>>,
    remote_entries: Mutex<HashMap<String, HashSet<String>>>,
    announce: OnceLock<mpsc::UnboundedSender<(bool, String)>>,
    forwarder: OnceLock<mpsc::Sender<Forward>>,
    resync: AtomicBool,
}

impl RouteTable {
    pub fn attach_forwarder(&self, forwarder: mpsc::Sender<Forward>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Redis came back: announce everything again and reload everyone's.
    pub fn resync_needed(&self) {
        self.resync.store(true, Ordering::Release);
    }

    fn local_changed(&self, added: bool, entry: String) {
        let changed = {
            let mut local = self.local.lock();
            if added {
                let count = local.entry(entry.clone()).or_insert(0);
                *count += 1;
                *count == 1
            } else {
                match local.get_mut(&entry) {
                    Some(count) if *count > 1 => {
                        *count -= 1;
                        false
                    }
                    Some(_) => {
                        local.remove(&entry);
                        true
                    }
                    None => false,
                }
            }
        };
        if changed && let Some(announce) = self.announce.get() {
            let _ = announce.send((added, entry));
        }
    }

    /// The nodes whose sessions hold a filter matching `topic`.
    fn nodes_for(&self, namespace: &Namespace, topic: &str) -> Vec<Arc<str>> {
        let remote = self.remote.read();
        let Some(tree) = remote.get(namespace) else {
            return Vec::new();
        };
        let matches = tree.matches(topic, |_| true);
        let mut nodes: Vec<Arc<str>> = matches
            .direct
            .into_iter()
            .chain(matches.shared)
            .map(|(node, _)| node.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    fn apply(&self, node: &str, added: &[String], removed: &[String]) {
        let node: Arc<str> = node.into();
        let mut entries = self.remote_entries.lock();
        let known = entries.entry(node.to_string()).or_default();
        let mut remote = self.remote.write();
        for e in removed {
            if known.remove(e)
                && let Some((ns, filter)) = split_entry(e)
                && let Some(tree) = remote.get_mut(&ns)
            {
                tree.remove(filter, None, &node);
                if tree.is_empty() {
                    remote.remove(&ns);
                }
            }
        }
        for e in added {
            if known.insert(e.clone())
                && let Some((ns, filter)) = split_entry(e)
            {
                remote
                    .entry(ns)
                    .or_default()
                    .insert(filter, None, node.clone(), ());
            }
        }
    }

    fn replace(&self, node: &str, now: HashSet<String>) {
        let before = self.remote_entries.lock().get(node).cloned().unwrap_or_default();
        let removed: Vec<String> = before.difference(&now).cloned().collect();
        let added: Vec<String> = now.difference(&before).cloned().collect();
        self.apply(node, &added, &removed);
    }

    /// A node left: its filters no longer attract forwards.
    pub fn forget_node(&self, node: &str) {
        self.replace(node, HashSet::new());
        self.remote_entries.lock().remove(node);
    }

    pub fn describe(&self) -> serde_json::Value {
        let entries = self.remote_entries.lock();
        let remote: HashMap<&String, usize> = entries.iter().map(|(n, e)| (n, e.len())).collect();
        serde_json::json!({
            "localFilters": self.local.lock().len(),
            "remoteFilters": remote,
        })
    }
}

impl RemoteRoutes for Arc<Cluster> {
    fn subscribed(&self, namespace: &Namespace, filter: &str) {
        self.as_ref().subscribed(namespace, filter)
    }

    fn unsubscribed(&self, namespace: &Namespace, filter: &str) {
        self.as_ref().unsubscribed(namespace, filter)
    }

    fn forward(
        &self,
        namespace: &Namespace,
        publication: &Arc<Publication>,
    ) -> Option<oneshot::Receiver<bool>> {
        self.as_ref().forward(namespace, publication)
    }

    fn kicked(&self, kick: &crate::mqtt::broker::Kick, reason: u8, message: &str) {
        self.notify(super::notices::Notice::Kick {
            kick: kick.clone(),
            reason,
            message: message.to_string(),
        });
    }

    fn session_saved(&self, session: &crate::mqtt::session::Session) {
        self.save_session(session);
    }

    fn session_dropped(&self, key: &crate::mqtt::session::SessionKey) {
        self.drop_session(key);
    }

    fn store(
        &self,
        key: &crate::mqtt::session::SessionKey,
        delivery: &crate::mqtt::message::Delivery,
        sent: bool,
    ) -> Option<Arc<str>> {
        self.store_delivery(key, delivery, sent)
    }

    fn unstore(&self, key: &crate::mqtt::session::SessionKey, id: &str) {
        self.unstore_delivery(key, id);
    }

    fn stored(&self) -> Option<oneshot::Receiver<bool>> {
        self.stored_barrier()
    }
}

impl Cluster {
    pub(super) fn subscribed(&self, namespace: &Namespace, filter: &str) {
        self.routes.local_changed(true, entry(namespace, filter));
    }

    pub(super) fn unsubscribed(&self, namespace: &Namespace, filter: &str) {
        self.routes.local_changed(false, entry(namespace, filter));
    }

    fn forward(
        &self,
        namespace: &Namespace,
        publication: &Arc<Publication>,
    ) -> Option<oneshot::Receiver<bool>> {
        let forwarder = self.routes.forwarder.get()?;
        let (targets, retained) = if publication.retain {
            // Every node keeps the retained messages; Redis keeps them for nodes yet to come.
            let targets = self.peer_ids().into_iter().map(Arc::from).collect();
            (
                targets,
                Some((namespace_key(namespace), encode_retained(namespace, publication))),
            )
        } else {
            (self.routes.nodes_for(namespace, &publication.topic), None)
        };
        if targets.is_empty() && retained.is_none() {
            return None;
        }
        let confirm = publication.qos != QoS::AtMostOnce;
        let (done, receiver) = if confirm {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let forward = Forward {
            fields: wire::publication_fields(namespace, publication, &self.node_id),
            namespace: namespace.clone(),
            targets,
            retained,
            done,
        };
        match forwarder.try_send(forward) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(forward)) if confirm => {
                let forwarder = forwarder.clone();
                actix_rt::spawn(async move {
                    let _ = forwarder.send(forward).await;
                });
            }
            Err(_) => {
                self.metrics.forwarded.with_label_values(&["dropped"]).inc();
                return None;
            }
        }
        receiver
    }
}

#[derive(Serialize, Deserialize)]
struct RetainedEntry {
    ns: String,
    topic: String,
    payload: String,
    qos: u8,
}

fn encode_retained(namespace: &Namespace, p: &Publication) -> Vec<u8> {
    serde_json::to_vec(&RetainedEntry {
        ns: namespace_key(namespace),
        topic: p.topic.to_string(),
        payload: B64.encode(&p.payload),
        qos: wire::qos_number(p.qos),
    })
    .unwrap_or_default()
}

pub fn decode_retained(bytes: &[u8]) -> Option<(Namespace, Publication)> {
    let entry: RetainedEntry = serde_json::from_slice(bytes).ok()?;
    let namespace = parse_namespace(&entry.ns)?;
    let payload = B64.decode(entry.payload).ok()?;
    Some((
        namespace,
        Publication::internal(entry.topic, payload, wire::qos_from(entry.qos), true),
    ))
}

/// Sends forwards in batches: one pipeline of XADDs per batch.
pub fn start_forwarder(cluster: Arc<Cluster>) -> mpsc::Sender<Forward> {
    let (tx, mut rx) = mpsc::channel::<Forward>(FORWARD_QUEUE);
    let weak = Arc::downgrade(&cluster);
    drop(cluster);
    actix_rt::spawn(async move {
        let mut batch = Vec::with_capacity(FORWARD_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < FORWARD_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let Some(cluster) = weak.upgrade() else { return };
            let ok = send_batch(&cluster, &batch).await;
            let sent: usize = batch.iter().map(|f| f.targets.len()).sum();
            cluster
                .metrics
                .forwarded
                .with_label_values(&[if ok { "sent" } else { "failed" }])
                .inc_by(sent as u64);
            for forward in batch.drain(..) {
                if let Some(done) = forward.done {
                    let _ = done.send(ok);
                }
            }
        }
    });
    tx
}

async fn send_batch(cluster: &Cluster, batch: &[Forward]) -> bool {
    let mut pipe = redis::pipe();
    for forward in batch {
        for target in &forward.targets {
            let cmd = pipe
                .cmd("XADD")
                .arg(cluster.key(&format!("fwd:{target}")))
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_CAP)
                .arg("*");
            for (name, value) in &forward.fields {
                cmd.arg(*name).arg(value.as_slice());
            }
            cmd.ignore();
        }
        if let Some((ns, value)) = &forward.retained {
            let key = cluster.key(&format!("retained:{ns}"));
            let topic = forward
                .fields
                .iter()
                .find(|(n, _)| *n == "t")
                .map(|(_, t)| t.as_slice());
            let empty = forward.fields.iter().any(|(n, v)| *n == "p" && v.is_empty());
            if let Some(topic) = topic {
                if empty {
                    pipe.cmd("HDEL").arg(&key).arg(topic).ignore();
                } else {
                    pipe.cmd("HSET")
                        .arg(&key)
                        .arg(topic)
                        .arg(value.as_slice())
                        .ignore();
                    pipe.cmd("SADD").arg(cluster.key("retained-ns")).arg(ns).ignore();
                }
            }
            let _ = &forward.namespace;
        }
    }
    let mut conn = cluster.conn.clone();
    match pipe.query_async::<()>(&mut conn).await {
        Ok(()) => true,
        Err(error) => {
            cluster.set_redis_up(false, &error);
            false
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RouteNotice {
    node: String,
    #[serde(default)]
    full: bool,
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
}

/// Starts the route announcer, the route/control listener and the stream consumer.
pub fn start(cluster: Arc<Cluster>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = cluster.routes.announce.set(tx);
    actix_rt::spawn(announce(Arc::downgrade(&cluster), rx));
    actix_rt::spawn(listen(Arc::downgrade(&cluster)));
    actix_rt::spawn(consume(Arc::downgrade(&cluster)));
}

/// Writes this node's filter changes to `routes:{id}` and tells the others.
async fn announce(weak: std::sync::Weak<Cluster>, mut rx: mpsc::UnboundedReceiver<(bool, String)>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut pending: Vec<(bool, String)> = Vec::new();
    loop {
        tokio::select! {
            change = rx.recv() => match change {
                Some(change) => {
                    pending.push(change);
                    while let Ok(more) = rx.try_recv() {
                        pending.push(more);
                    }
                }
                None => return,
            },
            _ = tick.tick() => {}
        }
        let Some(cluster) = weak.upgrade() else { return };
        if cluster.routes.resync.load(Ordering::Acquire) {
            if full_announce(&cluster).await {
                cluster.routes.resync.store(false, Ordering::Release);
                pending.clear();
                reload_all(&cluster).await;
            }
            continue;
        }
        if pending.is_empty() {
            continue;
        }
        let (added, removed): (Vec<_>, Vec<_>) = pending.iter().cloned().partition(|(a, _)| *a);
        let added: Vec<String> = added.into_iter().map(|(_, e)| e).collect();
        let removed: Vec<String> = removed.into_iter().map(|(_, e)| e).collect();
        let key = cluster.key(&format!("routes:{}", cluster.node_id));
        let notice = RouteNotice {
            node: cluster.node_id.clone(),
            full: false,
            added: added.clone(),
            removed: removed.clone(),
        };
        let mut pipe = redis::pipe();
        if !added.is_empty() {
            pipe.cmd("SADD").arg(&key).arg(&added).ignore();
        }
        if !removed.is_empty() {
            pipe.cmd("SREM").arg(&key).arg(&removed).ignore();
        }
        pipe.cmd("PUBLISH")
            .arg(cluster.key("routes"))
            .arg(serde_json::to_string(&notice).unwrap_or_default())
            .ignore();
        let mut conn = cluster.conn.clone();
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => pending.clear(),
            Err(error) => {
                // Announced in full once Redis answers again.
                cluster.set_redis_up(false, &error);
                cluster.routes.resync_needed();
                pending.clear();
            }
        }
    }
}

/// Replaces `routes:{id}` with every filter this node holds now.
async fn full_announce(cluster: &Cluster) -> bool {
    let entries: Vec<String> = cluster.routes.local.lock().keys().cloned().collect();
    let key = cluster.key(&format!("routes:{}", cluster.node_id));
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("DEL").arg(&key).ignore();
    for chunk in entries.chunks(1000) {
        pipe.cmd("SADD").arg(&key).arg(chunk).ignore();
    }
    let notice = RouteNotice {
        node: cluster.node_id.clone(),
        full: true,
        added: Vec::new(),
        removed: Vec::new(),
    };
    pipe.cmd("PUBLISH")
        .arg(cluster.key("routes"))
        .arg(serde_json::to_string(&notice).unwrap_or_default())
        .ignore();
    let mut conn = cluster.conn.clone();
    pipe.query_async::<()>(&mut conn).await.is_ok()
}

/// Reads one node's filters from Redis into the cache.
async fn reload(cluster: &Cluster, node: &str) -> Result<(), redis::RedisError> {
    let mut conn = cluster.conn.clone();
    let entries: HashSet<String> = redis::cmd("SMEMBERS")
        .arg(cluster.key(&format!("routes:{node}")))
        .query_async(&mut conn)
        .await?;
    cluster.routes.replace(node, entries);
    Ok(())
}

async fn reload_all(cluster: &Cluster) {
    for node in cluster.peer_ids() {
        if let Err(error) = reload(cluster, &node).await {
            cluster.set_redis_up(false, &error);
            return;
        }
    }
}

/// Listens to route notices and this node's control channel; reconnects with backoff.
async fn listen(weak: std::sync::Weak<Cluster>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(cluster) = weak.upgrade() else { return };
        let routes_channel = cluster.key("routes");
        let control_channel = cluster.key(&format!("control:{}", cluster.node_id));
        let notices_channel = cluster.key("notices");
        let live_channel = cluster.key("live");
        let pubsub = async {
            let mut pubsub = cluster.client.get_async_pubsub().await?;
            pubsub.subscribe(&routes_channel).await?;
            pubsub.subscribe(&control_channel).await?;
            pubsub.subscribe(&notices_channel).await?;
            pubsub.subscribe(&live_channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let pubsub = match pubsub {
            Ok(p) => p,
            Err(error) => {
                cluster.set_redis_up(false, &error);
                drop(cluster);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        // Whatever changed while we were not listening.
        reload_all(&cluster).await;
        drop(cluster);
        let mut messages = pubsub.into_on_message();
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.tick().await;
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Some(cluster) = weak.upgrade() else { return };
                    let payload: Vec<u8> = message.get_payload_bytes().to_vec();
                    if message.get_channel_name() == routes_channel {
                        if let Ok(notice) = serde_json::from_slice::<RouteNotice>(&payload)
                            && notice.node != cluster.node_id
                        {
                            if notice.full {
                                let _ = reload(&cluster, &notice.node).await;
                            } else {
                                cluster.routes.apply(&notice.node, &notice.added, &notice.removed);
                            }
                        }
                    } else if message.get_channel_name() == live_channel {
                        cluster.live_frame(&payload, &cluster.hub);
                    } else if message.get_channel_name() == notices_channel {
                        cluster.heard(&payload);
                    } else {
                        ownership::control(cluster.clone(), &payload);
                    }
                }
                _ = resync.tick() => {
                    let Some(cluster) = weak.upgrade() else { return };
                    reload_all(&cluster).await;
                }
            }
        }
        // The connection ended: Redis went away.
        if let Some(cluster) = weak.upgrade() {
            cluster.set_redis_up(false, &"pub/sub connection closed");
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Reads this node's stream and delivers each forward to the local sessions, then XACKs it:
/// a node that dies before XACK gets the entries again when it returns.
async fn consume(weak: std::sync::Weak<Cluster>) {
    let Some(cluster) = weak.upgrade() else { return };
    let mut stream = StreamConsumer::new(&cluster, &format!("fwd:{}", cluster.node_id));
    drop(cluster);
    loop {
        let read = stream.read().await;
        let Some(cluster) = weak.upgrade() else { return };
        let entries = match read {
            Ok(entries) => entries,
            Err((error, wait)) => {
                cluster.set_redis_up(false, &error);
                drop(cluster);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        if entries.is_empty() {
            continue;
        }
        let mut stored = 0;
        let ids: Vec<String> = entries
            .into_iter()
            .map(|entry| {
                if let Some((namespace, publication)) = wire::publication_from_fields(&entry.map) {
                    stored += cluster
                        .broker
                        .route_local_stored(&namespace, Arc::new(publication), &mut Vec::new())
                        .1;
                    cluster.metrics.received.inc();
                }
                entry.id
            })
            .collect();
        // What persistent sessions were promised is in their copies before the entries go.
        if stored > 0
            && let Some(written) = cluster.stored_barrier()
        {
            let _ = written.await;
        }
        if let Err(error) = stream.done(&ids).await {
            cluster.set_redis_up(false, &error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_actors::TenantId;

    fn ns(t: &str) -> Namespace {
        Namespace::Tenant(TenantId::parse(t).unwrap())
    }

    #[test]
    fn local_filters_are_announced_on_the_first_session_and_withdrawn_after_the_last() {
        let table = RouteTable::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        table.announce.set(tx).unwrap();
        let e = entry(&ns("a"), "x/#");
        table.local_changed(true, e.clone());
        table.local_changed(true, e.clone());
        table.local_changed(false, e.clone());
        assert_eq!(rx.try_recv().unwrap(), (true, e.clone()));
        assert!(
            rx.try_recv().is_err(),
            "second subscriber and first leaver change nothing"
        );
        table.local_changed(false, e.clone());
        assert_eq!(rx.try_recv().unwrap(), (false, e.clone()));
        table.local_changed(false, e);
        assert!(rx.try_recv().is_err(), "an unknown removal is ignored");
    }

    #[test]
    fn remote_filters_route_by_namespace_and_leave_with_their_node() {
        let table = RouteTable::default();
        table.apply("n2", &[entry(&ns("a"), "devices/+/telemetry")], &[]);
        table.apply("n3", &[entry(&ns("a"), "devices/#"), entry(&ns("b"), "#")], &[]);
        let nodes = |n: &Namespace, t: &str| -> Vec<String> {
            table.nodes_for(n, t).iter().map(|s| s.to_string()).collect()
        };
        assert_eq!(nodes(&ns("a"), "devices/d1/telemetry"), vec!["n2", "n3"]);
        assert_eq!(nodes(&ns("a"), "devices/d1/status"), vec!["n3"]);
        assert_eq!(nodes(&ns("c"), "devices/d1/telemetry"), Vec::<String>::new());
        table.apply("n3", &[], &[entry(&ns("a"), "devices/#")]);
        assert_eq!(nodes(&ns("a"), "devices/d1/status"), Vec::<String>::new());
        table.forget_node("n2");
        assert_eq!(nodes(&ns("a"), "devices/d1/telemetry"), Vec::<String>::new());
        assert_eq!(nodes(&ns("b"), "anything"), vec!["n3"]);
        let mut full = HashSet::new();
        full.insert(entry(&ns("b"), "other"));
        table.replace("n3", full);
        assert_eq!(nodes(&ns("b"), "anything"), Vec::<String>::new());
        assert_eq!(nodes(&ns("b"), "other"), vec!["n3"]);
    }

    #[test]
    fn retained_entries_round_trip() {
        let p = Publication::internal("a/b", &b"on"[..], QoS::AtLeastOnce, true);
        let (n, back) = decode_retained(&encode_retained(&ns("a"), &p)).unwrap();
        assert_eq!(n, ns("a"));
        assert_eq!(back.topic, p.topic);
        assert_eq!(back.payload, p.payload);
        assert!(back.retain);
    }
}
