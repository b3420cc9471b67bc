//! One owner per device. The node that hosts a device's actor and MQTT session holds a lease in
//! Redis (`owner:{ns}:{device}` = `node|fence`, renewed while the session lives there), where
//! `fence` comes from a counter that only grows. A connection arriving at another node asks
//! the owner to hand over: the owner closes the old connection ("session taken over"), puts the
//! session (subscriptions, queued messages) in Redis for the new node, stops the device actor
//! and releases the lease; the new node takes the lease, resumes the session and starts the
//! actor from the shadow store. An owner that does not answer in time (dead, partitioned) loses
//! the lease anyway, and learns it at its next renewal: it then drops the device. Shadow writes
//! are compare-and-set on the version in the registry, so a stale owner's write fails.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_actors::{DeviceId, TenantId};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Cluster;
use super::wire::{self, namespace_key};
use crate::mqtt::acl::Namespace;
use crate::mqtt::broker::TakenSession;
use crate::mqtt::session::{ClientClass, SessionKey};

/// How long a new connection waits for the owner to hand over before taking the lease.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);
/// How long a handed-over session waits in Redis for its new node.
const HANDOFF_TTL_MS: u64 = 60_000;

const ACQUIRE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] == '0' then
  local owner = string.match(current, '^(.*)|')
  if owner ~= ARGV[1] then return {0, current} end
end
local fence = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '|' .. fence
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {1, value}
";

/// Renews a lease; one that vanished (Redis restarted empty, or it expired during an outage)
/// is taken back, since nobody else claimed the device meanwhile. 0: another node has it.
const RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const TAKE: &str = r"
local value = redis.call('GET', KEYS[1])
if value then redis.call('DEL', KEYS[1]) end
return value
";

type DeviceKey = (TenantId, DeviceId);

/// A lease this node holds: its value `node|fence`, and when this node claimed it.
struct Held {
    value: String,
    claimed: Instant,
}

/// The leases this node holds.
#[derive(Default)]
pub struct Owned {
    leases: Mutex<HashMap<DeviceKey, Held>>,
}

impl Owned {
    pub fn len(&self) -> usize {
        self.leases.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.lock().is_empty()
    }

    fn insert(&self, key: DeviceKey, value: String) {
        let claimed = Instant::now();
        self.leases.lock().insert(key, Held { value, claimed });
    }

    fn remove(&self, key: &DeviceKey) -> Option<String> {
        self.leases.lock().remove(key).map(|held| held.value)
    }

    fn snapshot(&self) -> Vec<(DeviceKey, String)> {
        self.leases
            .lock()
            .iter()
            .map(|(k, held)| (k.clone(), held.value.clone()))
            .collect()
    }

    /// The leases to renew (`true`) or release (`false`): a lease stays while its device's
    /// session lives here, or while the connection that claimed it is still being set up
    /// (the session is attached only after the claim, the session copy, the device actor and
    /// the access rules: released in that window, the lease would leave the device on this
    /// node with no owner in Redis, and the next node it connects to would not ask this one to
    /// give it up). A claim whose connection never came is released after `grace`.
    fn renewals(
        &self,
        grace: Duration,
        holds: impl Fn(&DeviceKey) -> bool,
    ) -> Vec<(DeviceKey, String, bool)> {
        let leases: Vec<(DeviceKey, String, bool)> = self
            .leases
            .lock()
            .iter()
            .map(|(key, held)| (key.clone(), held.value.clone(), held.claimed.elapsed() < grace))
            .collect();
        // The broker's lock is taken outside this one.
        leases
            .into_iter()
            .map(|(key, value, claiming)| {
                let here = claiming || holds(&key);
                (key, value, here)
            })
            .collect()
    }

    /// Forgets `key`'s lease if it is still `value` (not claimed again since); whether it was.
    fn remove_if(&self, key: &DeviceKey, value: &str) -> bool {
        let mut leases = self.leases.lock();
        if leases.get(key).is_some_and(|held| held.value == value) {
            leases.remove(key);
            true
        } else {
            false
        }
    }
}

/// The fencing token of a lease value `node|fence`.
pub fn fence_of(value: &str) -> Option<u64> {
    value.rsplit_once('|')?.1.parse().ok()
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub(super) enum Control {
    /// Give this device up: another node has its new connection.
    Handover {
        tenant: String,
        device: String,
        to: String,
    },
    /// Give this (non-device) session up: its client connected to another node. Hand it over
    /// unless `discard` (a clean start).
    TakeSession {
        ns: String,
        class: String,
        client: String,
        to: String,
        discard: bool,
    },
}

fn device_ns(tenant: &TenantId) -> String {
    namespace_key(&Namespace::Tenant(tenant.clone()))
}

impl Cluster {
    fn owner_key(&self, tenant: &TenantId, device: &DeviceId) -> String {
        self.key(&format!("owner:{}:{device}", device_ns(tenant)))
    }

    fn fence_key(&self, tenant: &TenantId, device: &DeviceId) -> String {
        self.key(&format!("fence:{}:{device}", device_ns(tenant)))
    }

    fn handoff_key(&self, tenant: &TenantId, device: &DeviceId) -> String {
        self.key(&format!("handoff:{}:{device}", device_ns(tenant)))
    }

    async fn acquire(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        force: bool,
    ) -> redis::RedisResult<(i64, String)> {
        let mut conn = self.conn.clone();
        redis::cmd("EVAL")
            .arg(ACQUIRE)
            .arg(2)
            .arg(self.owner_key(tenant, device))
            .arg(self.fence_key(tenant, device))
            .arg(&self.node_id)
            .arg(self.lease.as_millis() as u64)
            .arg(if force { "1" } else { "0" })
            .query_async(&mut conn)
            .await
    }

    /// Makes this node the device's owner before its connection is accepted here. Returns the
    /// session its previous node handed over, if any. When Redis does not answer the node
    /// serves the device alone (degraded) and `None` comes back.
    pub async fn claim_device(&self, tenant: &TenantId, device: &DeviceId) -> Option<TakenSession> {
        let started = Instant::now();
        let mut asked: Option<String> = None;
        let value = loop {
            let force = started.elapsed() >= HANDOVER_WAIT;
            match self.acquire(tenant, device, force).await {
                Ok((1, value)) => {
                    if force {
                        tracing::warn!(%tenant, %device, owner = ?asked, "device owner did not hand over in time: lease taken");
                        self.metrics.takeovers.with_label_values(&["in", "timeout"]).inc();
                    }
                    break value;
                }
                Ok((_, current)) => {
                    let owner = current
                        .rsplit_once('|')
                        .map(|(n, _)| n)
                        .unwrap_or(&current)
                        .to_string();
                    if asked.is_none() {
                        if !self.is_live(&owner) {
                            // Its node is gone (no heartbeat): nothing to wait for.
                            match self.acquire(tenant, device, true).await {
                                Ok((_, value)) => {
                                    tracing::info!(%tenant, %device, %owner, "device taken over from a node that left");
                                    self.metrics.takeovers.with_label_values(&["in", "expired"]).inc();
                                    break value;
                                }
                                Err(error) => {
                                    self.set_redis_up(false, &error);
                                    self.owned.insert(
                                        (tenant.clone(), device.clone()),
                                        format!("{}|0", self.node_id),
                                    );
                                    return None;
                                }
                            }
                        }
                        self.ask_handover(&owner, tenant, device).await;
                        asked = Some(owner);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => {
                    // Served here alone; the lease is taken at the first renewal Redis answers
                    // (or the device is dropped then, if another node claimed it meanwhile).
                    self.set_redis_up(false, &error);
                    self.owned
                        .insert((tenant.clone(), device.clone()), format!("{}|0", self.node_id));
                    return None;
                }
            }
        };
        self.owned.insert((tenant.clone(), device.clone()), value);
        asked.as_ref()?;
        self.metrics
            .takeovers
            .with_label_values(&["in", "handover"])
            .inc();
        let mut conn = self.conn.clone();
        let handed: Option<String> = redis::cmd("EVAL")
            .arg(TAKE)
            .arg(1)
            .arg(self.handoff_key(tenant, device))
            .query_async(&mut conn)
            .await
            .ok()
            .flatten();
        handed.and_then(|json| wire::decode_session(&json))
    }

    async fn ask_handover(&self, owner: &str, tenant: &TenantId, device: &DeviceId) {
        let message = Control::Handover {
            tenant: tenant.to_string(),
            device: device.to_string(),
            to: self.node_id.clone(),
        };
        let mut conn = self.conn.clone();
        let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(self.key(&format!("control:{owner}")))
            .arg(serde_json::to_string(&message).unwrap_or_default())
            .query_async(&mut conn)
            .await;
        if let Err(error) = sent {
            self.set_redis_up(false, &error);
        }
    }

    /// The owner's side of a handover: close the connection, leave the session in Redis for
    /// the new node, stop the device actor (it has written its state), release the lease.
    async fn hand_over(self: Arc<Self>, tenant: TenantId, device: DeviceId, to: String) {
        // Out of the renewals first: a renewal that found the session gone would release the
        // lease before the session is in Redis, and the new node would start without it.
        let lease = self.owned.remove(&(tenant.clone(), device.clone()));
        let key = SessionKey {
            namespace: Namespace::Tenant(tenant.clone()),
            class: ClientClass::Device,
            client_id: device.as_str().into(),
        };
        if let Some(taken) = self.broker.take_session(&key) {
            // Its stored messages first: the new node reads them after the handoff.
            if let Some(written) = self.stored_barrier() {
                let _ = written.await;
            }
            let mut conn = self.conn.clone();
            let stored: redis::RedisResult<()> = redis::cmd("SET")
                .arg(self.handoff_key(&tenant, &device))
                .arg(wire::encode_session(&taken))
                .arg("PX")
                .arg(HANDOFF_TTL_MS)
                .query_async(&mut conn)
                .await;
            if let Err(error) = stored {
                tracing::warn!(%error, %tenant, %device, "session could not be handed over");
            }
        }
        if let Err(error) = self.fleet.stop_device(&tenant, &device).await {
            tracing::warn!(%error, %tenant, %device, "device actor did not stop for the handover");
        }
        if let Some(lease) = lease {
            self.release(&tenant, &device, lease).await;
        }
        self.metrics
            .takeovers
            .with_label_values(&["out", "handover"])
            .inc();
        tracing::info!(%tenant, %device, %to, "device handed over");
    }

    async fn release(&self, tenant: &TenantId, device: &DeviceId, value: String) {
        let mut conn = self.conn.clone();
        let released: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(self.owner_key(tenant, device))
            .arg(value)
            .query_async(&mut conn)
            .await;
        if let Err(error) = released {
            self.set_redis_up(false, &error);
        }
    }

    /// Renews the leases of devices whose session is still here, releases the others, and
    /// drops devices whose lease another node took.
    async fn renew(self: &Arc<Self>) {
        let checked = self.owned.renewals(self.lease, |(tenant, device)| {
            self.broker.holds_device_session(tenant, device)
        });
        if checked.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for ((tenant, device), value, here) in &checked {
            pipe.cmd("EVAL")
                .arg(if *here { RENEW } else { RELEASE })
                .arg(1)
                .arg(self.owner_key(tenant, device))
                .arg(value);
            if *here {
                pipe.arg(self.lease.as_millis() as u64);
            }
        }
        let mut conn = self.conn.clone();
        let results: Vec<i64> = match pipe.query_async(&mut conn).await {
            Ok(results) => results,
            Err(error) => {
                // Kept: the devices stay served here; the leases are renewed when Redis answers.
                self.set_redis_up(false, &error);
                return;
            }
        };
        let mut lost = Vec::new();
        for ((key, value, here), renewed) in checked.into_iter().zip(results) {
            // Renewed, or claimed again meanwhile (a reconnect): that newer lease stands.
            if (here && renewed != 0) || !self.owned.remove_if(&key, &value) {
                continue;
            }
            if here {
                lost.push(key);
            }
        }
        for (tenant, device) in lost {
            tracing::warn!(%tenant, %device, "device lease lost to another node: dropping the device here");
            let session = SessionKey {
                namespace: Namespace::Tenant(tenant.clone()),
                class: ClientClass::Device,
                client_id: device.as_str().into(),
            };
            self.broker.take_session(&session);
            let _ = self.fleet.stop_device(&tenant, &device).await;
            self.metrics.takeovers.with_label_values(&["out", "lost"]).inc();
        }
    }

    /// Leaving the cluster on a graceful stop: leases and routes released at once, so devices
    /// reconnecting elsewhere need not wait for them to expire.
    pub async fn leave(&self) {
        let leases = self.owned.snapshot();
        let mut pipe = redis::pipe();
        for ((tenant, device), value) in &leases {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(self.owner_key(tenant, device))
                .arg(value)
                .ignore();
        }
        pipe.cmd("DEL")
            .arg(self.key(&format!("routes:{}", self.node_id)))
            .ignore();
        pipe.cmd("DEL")
            .arg(self.key(&format!("node:{}", self.node_id)))
            .ignore();
        pipe.cmd("SREM")
            .arg(self.key("nodes"))
            .arg(&self.node_id)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.key("routes"))
            .arg(serde_json::json!({"node": self.node_id, "full": true}).to_string())
            .ignore();
        let mut conn = self.conn.clone();
        let left = tokio::time::timeout(Duration::from_secs(3), pipe.query_async::<()>(&mut conn)).await;
        match left {
            Ok(Ok(())) => tracing::info!(devices = leases.len(), "left the cluster"),
            _ => tracing::warn!("could not leave the cluster cleanly: leases expire on their own"),
        }
    }
}

/// A message on this node's control channel.
pub fn control(cluster: Arc<Cluster>, payload: &[u8]) {
    match serde_json::from_slice::<Control>(payload) {
        Ok(Control::Handover { tenant, device, to }) => {
            let (Ok(tenant), Ok(device)) = (TenantId::parse(tenant), DeviceId::parse(device)) else {
                return;
            };
            actix_rt::spawn(cluster.hand_over(tenant, device, to));
        }
        Ok(Control::TakeSession {
            ns,
            class,
            client,
            to,
            discard,
        }) => {
            if let Some(key) = super::sessions::session_key(&ns, &class, &client) {
                actix_rt::spawn(cluster.give_up_session(key, to, discard));
            }
        }
        Err(error) => tracing::debug!(%error, "unknown cluster control message"),
    }
}

/// Renews this node's device leases a few times per lease period.
pub fn start(cluster: Arc<Cluster>) {
    let weak = Arc::downgrade(&cluster);
    let period = (cluster.lease / 3).max(Duration::from_millis(300));
    drop(cluster);
    actix_rt::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(cluster) = weak.upgrade() else { return };
            cluster.renew().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_is_the_number_after_the_last_bar() {
        assert_eq!(fence_of("node-1|42"), Some(42));
        assert_eq!(fence_of("a|b|7"), Some(7));
        assert_eq!(fence_of("node-1"), None);
    }

    fn key(device: &str) -> DeviceKey {
        (TenantId::parse("t").unwrap(), DeviceId::parse(device).unwrap())
    }

    #[test]
    fn a_lease_stays_while_its_connection_is_set_up_and_goes_when_it_never_came() {
        let owned = Owned::default();
        owned.insert(key("connecting"), "n1|1".into());
        owned.insert(key("connected"), "n1|2".into());
        owned.leases.lock().insert(
            key("refused"),
            Held {
                value: "n1|3".into(),
                claimed: Instant::now() - Duration::from_secs(5),
            },
        );
        let grace = Duration::from_secs(3);
        let mut renewals = owned.renewals(grace, |(_, device)| device.as_str() == "connected");
        renewals.sort_by(|a, b| a.1.cmp(&b.1));
        let decided: Vec<(&str, bool)> = renewals.iter().map(|(_, v, here)| (v.as_str(), *here)).collect();
        assert_eq!(decided, [("n1|1", true), ("n1|2", true), ("n1|3", false)]);
        // Past the grace only a session here keeps a lease.
        let renewals = owned.renewals(Duration::ZERO, |(_, device)| device.as_str() == "connected");
        assert_eq!(renewals.iter().filter(|(_, _, here)| *here).count(), 1);
    }

    #[test]
    fn a_lease_claimed_again_is_not_removed_by_the_older_renewal() {
        let owned = Owned::default();
        owned.insert(key("d"), "n1|1".into());
        owned.insert(key("d"), "n1|2".into());
        assert!(!owned.remove_if(&key("d"), "n1|1"));
        assert_eq!(owned.len(), 1);
        assert!(owned.remove_if(&key("d"), "n1|2"));
        assert!(owned.is_empty());
    }
}
