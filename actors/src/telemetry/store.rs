//! What the telemetry writers, the downsampler and the query API need from storage.
//!
//! [`TelemetryStore`] is implemented by the embedded SQLite store and the InfluxDB store in the
//! application crate. A writer hands it batches of up to `BATCH_SIZE` points from many devices;
//! when a write fails, [`TelemetryStoreError::is_retryable`] says whether to retry with backoff
//! (then park the batch in a [`TelemetrySpool`]) or to give the batch up.
//!
//! [`replay_spool`] drains a spool into a store in order, deleting a batch only after the store
//! committed it.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::telemetry::TelemetryPoint;
use crate::telemetry::query::{QueryResult, TelemetryQuery};

/// A batch as writers pass it around: cheap to clone for retries and for the spool.
pub type PointBatch = Arc<[TelemetryPoint]>;

/// Why a telemetry store operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TelemetryStoreError {
    /// The store cannot be reached or is overloaded (connection refused, timeout, 5xx, database
    /// locked, disk full). The same operation may succeed later.
    #[error("telemetry store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the data or the query (InfluxDB 4xx). Retrying cannot help.
    #[error("telemetry store refused the request: {0}")]
    Rejected(String),
    /// A raw query matched more points than its limit.
    #[error("the query matches more than {limit} points")]
    TooManyPoints { limit: usize },
    /// A sum or mean past the range of f64; the same query cannot succeed.
    #[error(transparent)]
    Overflow(#[from] crate::telemetry::query::AggregateOverflow),
    /// Anything else (corrupt data, a bug). Not retried.
    #[error("telemetry store error: {0}")]
    Internal(String),
}

impl TelemetryStoreError {
    /// Whether retrying the same operation later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TelemetryStoreError::Unavailable(_))
    }
}

/// What a store is, for `/health` and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreInfo {
    /// `sqlite` or `influxdb`.
    pub kind: &'static str,
    /// Where it is (file path or URL, without secrets).
    pub target: String,
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceReport {
    /// Series whose rollups were brought up to date.
    pub series_rolled_up: u64,
    /// Rollup rows (1-minute and 1-hour) written or rewritten.
    pub rollup_rows_written: u64,
    /// Raw points deleted because they are older than the raw retention.
    pub raw_points_deleted: u64,
    /// Rollup rows deleted because they are older than their retention.
    pub rollup_rows_deleted: u64,
}

/// A time-series store for telemetry points.
#[async_trait]
pub trait TelemetryStore: Send + Sync + 'static {
    fn info(&self) -> StoreInfo;

    /// Stores a batch atomically where the store allows it (SQLite: one transaction; InfluxDB:
    /// one write request). Points with the identity of a stored point replace it, so writing the
    /// same batch twice stores it once. `Ok` means committed.
    async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError>;

    /// Raw points or per-bucket aggregates of one device, scoped to the query's tenant.
    async fn query(&self, query: TelemetryQuery) -> Result<QueryResult, TelemetryStoreError>;

    /// A round trip to the store.
    async fn ping(&self) -> Result<(), TelemetryStoreError>;

    /// Brings rollups up to date with what was written and enforces retention, as of `now_ms`.
    /// Safe to call at any interval; each call does the work that accumulated since the last.
    async fn maintain(&self, now_ms: i64) -> Result<MaintenanceReport, TelemetryStoreError>;
}

/// How much a spool holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpoolDepth {
    pub batches: u64,
    pub points: u64,
    pub bytes: u64,
    /// Batches put aside because they were corrupt or the store refused them for good.
    pub set_aside: u64,
}

/// Why the spool could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// Appending would exceed the configured bound; the batch was not spooled.
    #[error("telemetry spool is full: {bytes} of {max_bytes} bytes used, the batch needs {needed} more")]
    Full { bytes: u64, max_bytes: u64, needed: u64 },
    #[error("telemetry spool I/O error: {0}")]
    Io(String),
}

/// A batch read back from the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledBatch {
    /// Its position: batches come back in the order they were appended.
    pub id: u64,
    pub points: Vec<TelemetryPoint>,
}

/// A durable, bounded, ordered queue of batches the store could not take.
///
/// To keep order, a writer that finds the spool non-empty appends new batches to it rather than
/// writing them directly, and lets [`replay_spool`] drain it.
#[async_trait]
pub trait TelemetrySpool: Send + Sync + 'static {
    /// Stores the batch durably (fsync) before returning `Ok`.
    async fn append(&self, batch: PointBatch) -> Result<(), SpoolError>;

    /// The oldest intact batch, without removing it. Damaged records (a write torn by a crash)
    /// are set aside and skipped.
    async fn oldest(&self) -> Result<Option<SpooledBatch>, SpoolError>;

    /// Deletes a batch once the store has committed it.
    async fn remove(&self, id: u64) -> Result<(), SpoolError>;

    /// Moves a batch the store refused for good out of the queue, kept for an operator.
    async fn set_aside(&self, id: u64, reason: &str) -> Result<(), SpoolError>;

    fn depth(&self) -> SpoolDepth;
}

/// What [`replay_spool`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    pub batches: u64,
    pub points: u64,
    /// Batches the store refused for good (set aside).
    pub refused: u64,
    /// Set when replay stopped early because the store is (again) unavailable.
    pub stopped_by: Option<TelemetryStoreError>,
}

/// Writes spooled batches to `store`, oldest first, removing each after it was committed, until
/// the spool is empty, `max_batches` were replayed, or the store is unavailable again.
///
/// A batch the store refuses for a non-retryable reason is set aside rather than retried
/// forever. A crash between a commit and the removal replays that batch once more, which the
/// store's replace-on-same-identity rule makes harmless.
pub async fn replay_spool(
    spool: &dyn TelemetrySpool,
    store: &dyn TelemetryStore,
    max_batches: usize,
) -> Result<ReplayReport, SpoolError> {
    let mut report = ReplayReport::default();
    while (report.batches + report.refused) < max_batches as u64 {
        let Some(batch) = spool.oldest().await? else {
            break;
        };
        let points = batch.points.len() as u64;
        match store.write(batch.points.into()).await {
            Ok(()) => {
                spool.remove(batch.id).await?;
                report.batches += 1;
                report.points += points;
            }
            Err(error) if error.is_retryable() => {
                report.stopped_by = Some(error);
                break;
            }
            Err(error) => {
                tracing::error!(batch = batch.id, %error, "telemetry store refused a spooled batch; set aside");
                spool.set_aside(batch.id, &error.to_string()).await?;
                report.refused += 1;
            }
        }
    }
    Ok(report)
}

/// An in-memory spool for tests of the writers and the replay.
#[cfg(test)]
pub(crate) mod memory {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::{PointBatch, SpoolDepth, SpoolError, SpooledBatch, TelemetrySpool};

    #[derive(Default)]
    pub struct MemorySpool {
        queue: Mutex<VecDeque<SpooledBatch>>,
        aside: Mutex<Vec<u64>>,
        next: Mutex<u64>,
    }

    #[async_trait]
    impl TelemetrySpool for MemorySpool {
        async fn append(&self, batch: PointBatch) -> Result<(), SpoolError> {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            self.queue.lock().unwrap().push_back(SpooledBatch {
                id: *next,
                points: batch.to_vec(),
            });
            Ok(())
        }
        async fn oldest(&self) -> Result<Option<SpooledBatch>, SpoolError> {
            Ok(self.queue.lock().unwrap().front().cloned())
        }
        async fn remove(&self, id: u64) -> Result<(), SpoolError> {
            self.queue.lock().unwrap().retain(|b| b.id != id);
            Ok(())
        }
        async fn set_aside(&self, id: u64, _reason: &str) -> Result<(), SpoolError> {
            self.aside.lock().unwrap().push(id);
            self.remove(id).await
        }
        fn depth(&self) -> SpoolDepth {
            let queue = self.queue.lock().unwrap();
            SpoolDepth {
                batches: queue.len() as u64,
                points: queue.iter().map(|b| b.points.len() as u64).sum(),
                bytes: 0,
                set_aside: self.aside.lock().unwrap().len() as u64,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::memory::MemorySpool;
    use std::sync::Mutex;

    use super::*;
    use crate::ids::{DeviceId, TenantId};
    use crate::telemetry::query::DataSource;
    use crate::telemetry::{MetricName, MetricValue};

    /// Fails the writes listed in `script` (in order), then accepts everything.
    struct ScriptedStore {
        script: Mutex<VecDeque<Option<TelemetryStoreError>>>,
        written: Mutex<Vec<i64>>,
    }

    #[async_trait]
    impl TelemetryStore for ScriptedStore {
        fn info(&self) -> StoreInfo {
            StoreInfo {
                kind: "memory",
                target: String::new(),
            }
        }
        async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError> {
            if let Some(Some(error)) = self.script.lock().unwrap().pop_front() {
                return Err(error);
            }
            self.written.lock().unwrap().extend(batch.iter().map(|p| p.ts_ms));
            Ok(())
        }
        async fn query(&self, _query: TelemetryQuery) -> Result<QueryResult, TelemetryStoreError> {
            Ok(QueryResult {
                series: vec![],
                source: DataSource::Raw,
            })
        }
        async fn ping(&self) -> Result<(), TelemetryStoreError> {
            Ok(())
        }
        async fn maintain(&self, _now_ms: i64) -> Result<MaintenanceReport, TelemetryStoreError> {
            Ok(MaintenanceReport::default())
        }
    }

    fn batch(ts: &[i64]) -> PointBatch {
        ts.iter()
            .map(|t| TelemetryPoint {
                tenant: TenantId::parse("t").unwrap(),
                device: DeviceId::parse("d").unwrap(),
                device_type: "x".into(),
                metric: MetricName::parse("m").unwrap(),
                ts_ms: *t,
                value: MetricValue::Number(1.0),
            })
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn classification() {
        assert!(TelemetryStoreError::Unavailable("x".into()).is_retryable());
        assert!(!TelemetryStoreError::Rejected("x".into()).is_retryable());
        assert!(!TelemetryStoreError::Internal("x".into()).is_retryable());
        assert!(!TelemetryStoreError::TooManyPoints { limit: 1 }.is_retryable());
    }

    #[actix_rt::test]
    async fn replay_keeps_order_stops_when_unavailable_and_sets_refusals_aside() {
        let spool = MemorySpool::default();
        for ts in [[1, 2], [3, 4], [5, 6], [7, 8]] {
            spool.append(batch(&ts)).await.unwrap();
        }
        let store = ScriptedStore {
            script: Mutex::new(
                [
                    None,
                    Some(TelemetryStoreError::Rejected("bad".into())),
                    None,
                    Some(TelemetryStoreError::Unavailable("down".into())),
                ]
                .into(),
            ),
            written: Mutex::new(vec![]),
        };
        let report = replay_spool(&spool, &store, 100).await.unwrap();
        assert_eq!(report.batches, 2);
        assert_eq!(report.points, 4);
        assert_eq!(report.refused, 1);
        assert!(report.stopped_by.is_some());
        assert_eq!(*store.written.lock().unwrap(), vec![1, 2, 5, 6]);
        assert_eq!(spool.depth().batches, 1);
        assert_eq!(spool.depth().set_aside, 1);

        // The store is back: the rest follows.
        let report = replay_spool(&spool, &store, 100).await.unwrap();
        assert_eq!((report.batches, report.stopped_by), (1, None));
        assert_eq!(*store.written.lock().unwrap(), vec![1, 2, 5, 6, 7, 8]);
        assert_eq!(spool.depth().batches, 0);
    }

    #[actix_rt::test]
    async fn replay_is_bounded() {
        let spool = MemorySpool::default();
        for ts in 0..5 {
            spool.append(batch(&[ts])).await.unwrap();
        }
        let store = ScriptedStore {
            script: Mutex::new(VecDeque::new()),
            written: Mutex::new(vec![]),
        };
        assert_eq!(replay_spool(&spool, &store, 2).await.unwrap().batches, 2);
        assert_eq!(spool.depth().batches, 3);
    }
}
