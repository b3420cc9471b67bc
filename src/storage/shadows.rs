//! Device shadows in the registry database, and a Redis cache in front of it.
//!
//! The database is the truth: a save is one conditional statement (`UPDATE … WHERE version =
//! expected`, or an `INSERT` for the first version, whose duplicate key means another writer
//! was first). The cache is written through after a successful save and dropped when a save
//! finds the stored version changed, so it never holds a version the database does not.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diesel::prelude::*;
use drover_actors::{DeviceId, ShadowDocument, ShadowStore, ShadowStoreError, TenantId};

use super::db::StoreError;
use super::registry::{RegistryStore, now_ms};
use super::schema::device_shadows;

fn store_error(error: StoreError) -> ShadowStoreError {
    match error {
        StoreError::AlreadyExists(_) => ShadowStoreError::Conflict,
        other => ShadowStoreError::Unavailable(other.to_string()),
    }
}

fn decode(text: &str) -> Result<ShadowDocument, ShadowStoreError> {
    serde_json::from_str(text)
        .map_err(|e| ShadowStoreError::Unavailable(format!("stored shadow unreadable: {e}")))
}

#[async_trait]
impl ShadowStore for RegistryStore {
    async fn load_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<ShadowDocument>, ShadowStoreError> {
        let (t, d) = (tenant.as_str().to_string(), device.as_str().to_string());
        let text = self
            .database()
            .read(move |conn| {
                device_shadows::table
                    .filter(device_shadows::tenant_id.eq(&t))
                    .filter(device_shadows::device_id.eq(&d))
                    .select(device_shadows::document)
                    .first::<String>(conn)
                    .optional()
                    .map_err(StoreError::from)
            })
            .await
            .map_err(store_error)?;
        text.as_deref().map(decode).transpose()
    }

    async fn save_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        document: &ShadowDocument,
        expected_previous_version: u64,
    ) -> Result<(), ShadowStoreError> {
        let text = serde_json::to_string(document)
            .map_err(|e| ShadowStoreError::Unavailable(format!("shadow not serializable: {e}")))?;
        let (t, d) = (tenant.as_str().to_string(), device.as_str().to_string());
        // Kept in its own column so device filters can match the reported firmware.
        let firmware = document
            .state
            .reported
            .get("firmware")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let version = i64::try_from(document.version)
            .map_err(|_| ShadowStoreError::Unavailable("shadow version out of range".into()))?;
        let expected = i64::try_from(expected_previous_version)
            .map_err(|_| ShadowStoreError::Unavailable("shadow version out of range".into()))?;
        let written = self
            .database()
            .write(move |conn| {
                let now = now_ms();
                if expected == 0 {
                    diesel::insert_into(device_shadows::table)
                        .values((
                            device_shadows::tenant_id.eq(&t),
                            device_shadows::device_id.eq(&d),
                            device_shadows::version.eq(version),
                            device_shadows::document.eq(&text),
                            device_shadows::updated_at.eq(now),
                            device_shadows::firmware.eq(&firmware),
                        ))
                        .execute(conn)
                        .map_err(StoreError::from)
                } else {
                    diesel::update(
                        device_shadows::table
                            .filter(device_shadows::tenant_id.eq(&t))
                            .filter(device_shadows::device_id.eq(&d))
                            .filter(device_shadows::version.eq(expected)),
                    )
                    .set((
                        device_shadows::version.eq(version),
                        device_shadows::document.eq(&text),
                        device_shadows::updated_at.eq(now),
                        device_shadows::firmware.eq(&firmware),
                    ))
                    .execute(conn)
                    .map_err(StoreError::from)
                }
            })
            .await
            .map_err(store_error)?;
        if written == 1 {
            Ok(())
        } else {
            Err(ShadowStoreError::Conflict)
        }
    }

    async fn delete_shadow(&self, tenant: &TenantId, device: &DeviceId) -> Result<(), ShadowStoreError> {
        let (t, d) = (tenant.as_str().to_string(), device.as_str().to_string());
        self.database()
            .write(move |conn| {
                diesel::delete(
                    device_shadows::table
                        .filter(device_shadows::tenant_id.eq(&t))
                        .filter(device_shadows::device_id.eq(&d)),
                )
                .execute(conn)
                .map_err(StoreError::from)
            })
            .await
            .map_err(store_error)?;
        Ok(())
    }
}

/// Caches a shadow unless the cache holds a newer version of it.
const PUT_UNLESS_NEWER: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and tonumber(doc['version']) and tonumber(doc['version']) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
";

/// How long a cached shadow lives without being read or written.
const CACHE_TTL_SECS: u64 = 3600;
/// A cache that does not answer quickly is skipped; the database answers instead.
const CACHE_TIMEOUT: Duration = Duration::from_millis(500);

/// A shadow store with a Redis cache in front: reads try Redis first, writes go to the
/// store and then to Redis. Redis being down only costs the cache.
pub struct CachedShadowStore {
    inner: Arc<dyn ShadowStore>,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Keeps apart the registries that share one Redis server (see [`CachedShadowStore::new`]).
    scope: String,
}

impl CachedShadowStore {
    /// `scope` names the registry the cache belongs to (the cluster's name, or the
    /// registry's location): two registries sharing a Redis server never read each other's
    /// shadows, even for the same tenant and device ids.
    pub fn new(inner: Arc<dyn ShadowStore>, client: redis::Client, scope: &str) -> CachedShadowStore {
        CachedShadowStore {
            inner,
            client,
            connection: tokio::sync::Mutex::new(None),
            scope: scope.to_string(),
        }
    }

    /// The Redis key of a device's shadow.
    pub fn key(&self, tenant: &TenantId, device: &DeviceId) -> String {
        format!("drover:{}:shadow:{tenant}/{device}", self.scope)
    }

    async fn connection(&self) -> Option<redis::aio::MultiplexedConnection> {
        let mut guard = self.connection.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Some(conn.clone());
        }
        match tokio::time::timeout(CACHE_TIMEOUT, self.client.get_multiplexed_async_connection()).await {
            Ok(Ok(conn)) => {
                *guard = Some(conn.clone());
                Some(conn)
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "shadow cache unreachable");
                None
            }
            Err(_) => None,
        }
    }

    /// Runs one command; `None` when Redis failed (the connection is dropped and reopened later).
    async fn run<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Option<T> {
        let mut conn = self.connection().await?;
        match tokio::time::timeout(CACHE_TIMEOUT, command.query_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Some(value),
            outcome => {
                if let Ok(Err(error)) = outcome {
                    tracing::debug!(%error, "shadow cache command failed");
                }
                *self.connection.lock().await = None;
                None
            }
        }
    }

    async fn put(&self, key: &str, document: &ShadowDocument) -> bool {
        let Ok(text) = serde_json::to_string(document) else {
            return false;
        };
        // Never over a newer version: another node (or a save racing this load) may have
        // cached one since this document was read.
        let mut command = redis::cmd("EVAL");
        command
            .arg(PUT_UNLESS_NEWER)
            .arg(1)
            .arg(key)
            .arg(text)
            .arg(document.version)
            .arg(CACHE_TTL_SECS);
        self.run::<i64>(command).await.is_some()
    }

    async fn forget(&self, key: &str) {
        let mut command = redis::cmd("DEL");
        command.arg(key);
        if self.run::<i64>(command).await.is_none() {
            tracing::warn!(
                key,
                "could not drop a shadow from the cache; it expires within the hour"
            );
        }
    }
}

#[async_trait]
impl ShadowStore for CachedShadowStore {
    async fn load_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<ShadowDocument>, ShadowStoreError> {
        let key = self.key(tenant, device);
        let mut get = redis::cmd("GET");
        get.arg(&key);
        if let Some(Some(text)) = self.run::<Option<String>>(get).await
            && let Ok(document) = decode(&text)
        {
            return Ok(Some(document));
        }
        let loaded = self.inner.load_shadow(tenant, device).await?;
        if let Some(document) = &loaded {
            self.put(&key, document).await;
        }
        Ok(loaded)
    }

    async fn save_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        document: &ShadowDocument,
        expected_previous_version: u64,
    ) -> Result<(), ShadowStoreError> {
        let key = self.key(tenant, device);
        match self
            .inner
            .save_shadow(tenant, device, document, expected_previous_version)
            .await
        {
            Ok(()) => {
                if !self.put(&key, document).await {
                    self.forget(&key).await;
                }
                Ok(())
            }
            Err(ShadowStoreError::Conflict) => {
                // The cache may hold what the conflict proves stale; the next load reads the database.
                self.forget(&key).await;
                Err(ShadowStoreError::Conflict)
            }
            Err(error) => Err(error),
        }
    }

    async fn delete_shadow(&self, tenant: &TenantId, device: &DeviceId) -> Result<(), ShadowStoreError> {
        self.inner.delete_shadow(tenant, device).await?;
        self.forget(&self.key(tenant, device)).await;
        Ok(())
    }
}
