//! Singletons under a lease (DESIGN §9): the OTA campaign runner's passes and each batch job
//! run on one node of a cluster at a time. A lease is a Redis key holding the node's id with a
//! TTL, renewed while it is held; another node takes it once it expires (its holder died).
//! On a single node every lease is granted.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use drover_actors::job_actor::JobLease;

use super::Cluster;

/// How long a lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);

/// Takes or renews `name`; `Some(true)` while this node holds it.
const TAKE_OR_RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Where a node finds its cluster (filled when it joins); `clustered` says whether it will.
#[derive(Clone)]
pub struct Leases {
    clustered: bool,
    slot: Arc<OnceLock<Arc<Cluster>>>,
}

impl Leases {
    pub fn new(clustered: bool, slot: Arc<OnceLock<Arc<Cluster>>>) -> Leases {
        Leases { clustered, slot }
    }

    /// Takes or renews the lease `name`. A single node always holds it; a cluster node that
    /// has not joined yet, or cannot reach Redis and did not hold it, does not.
    pub async fn hold(&self, name: &str) -> bool {
        if !self.clustered {
            return true;
        }
        let Some(cluster) = self.slot.get() else {
            return false;
        };
        cluster.hold_lease(name).await
    }

    pub async fn release(&self, name: &str) {
        if let Some(cluster) = self.slot.get() {
            cluster.release_lease(name).await;
        }
    }
}

impl Cluster {
    async fn hold_lease(&self, name: &str) -> bool {
        let mut conn = self.conn.clone();
        let held: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(TAKE_OR_RENEW)
            .arg(1)
            .arg(self.key(&format!("lease:{name}")))
            .arg(&self.node_id)
            .arg(LEASE.as_millis() as u64)
            .query_async(&mut conn)
            .await;
        match held {
            Ok(held) => held == 1,
            Err(error) => {
                // Without Redis nobody can tell who leads: this node stops leading rather than
                // risk two leaders; it takes the lease again when Redis answers.
                self.set_redis_up(false, &error);
                false
            }
        }
    }

    async fn release_lease(&self, name: &str) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(self.key(&format!("lease:{name}")))
            .arg(&self.node_id)
            .query_async(&mut conn)
            .await;
    }
}

/// Batch jobs: one node runs each job; the lease is renewed while it runs.
pub struct ClusterJobLease {
    leases: Leases,
    renewals: parking_lot::Mutex<std::collections::HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl ClusterJobLease {
    pub fn new(leases: Leases) -> ClusterJobLease {
        ClusterJobLease {
            leases,
            renewals: parking_lot::Mutex::default(),
        }
    }
}

#[async_trait]
impl JobLease for ClusterJobLease {
    async fn acquire(&self, job: &str) -> bool {
        let name = format!("job:{job}");
        if !self.leases.hold(&name).await {
            return false;
        }
        let leases = self.leases.clone();
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                leases.hold(&name).await;
            }
        });
        if let Some(previous) = self.renewals.lock().insert(job.to_string(), renewal) {
            previous.abort();
        }
        true
    }

    async fn release(&self, job: &str) {
        if let Some(renewal) = self.renewals.lock().remove(job) {
            renewal.abort();
        }
        self.leases.release(&format!("job:{job}")).await;
    }
}
