//! Telemetry storage adapters: the embedded SQLite store (default), the InfluxDB store (when
//! `INFLUX_URL` is set), the durable local spool, and their `/metrics` figures.
//!
//! The traits they implement ([`TelemetryStore`], [`TelemetrySpool`]) and the query arithmetic
//! they share live in `drover_actors::telemetry`.

pub mod influx;
pub mod metrics;
pub mod spool;
pub mod sqlite;

use std::sync::Arc;

use drover_actors::telemetry::store::{SpoolError, TelemetrySpool, TelemetryStore, TelemetryStoreError};

use crate::config::{Config, TelemetryConfig, days_ms};
use crate::metrics::Metrics;

pub use influx::InfluxTelemetryStore;
pub use metrics::MeteredStore;
pub use spool::FileSpool;
pub use sqlite::SqliteTelemetryStore;

/// How long each kind of data is kept, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub raw_ms: i64,
    pub rollup_1m_ms: i64,
    pub rollup_1h_ms: i64,
}

impl Retention {
    pub fn from_config(config: &TelemetryConfig) -> Retention {
        Retention {
            raw_ms: days_ms(config.raw_retention_days),
            rollup_1m_ms: days_ms(config.rollup_1m_retention_days),
            rollup_1h_ms: days_ms(config.rollup_1h_retention_days),
        }
    }
}

/// The telemetry store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryOpenError {
    #[error("telemetry store: {0}")]
    Store(#[from] TelemetryStoreError),
    #[error("telemetry spool: {0}")]
    Spool(#[from] SpoolError),
}

/// The opened store (counted for `/metrics`) and spool.
pub struct Telemetry {
    pub store: Arc<dyn TelemetryStore>,
    pub spool: Arc<dyn TelemetrySpool>,
}

/// Opens the configured store (InfluxDB when `influx.url` is set, else `telemetry.db` in the
/// data dir) and the spool in `data_dir/spool`, and registers their figures with `metrics`.
///
/// An unreachable InfluxDB does not stop the start: its database, retention policies and
/// continuous queries are created on first contact, and until then batches go to the spool.
pub async fn open(config: &Config, metrics: &Metrics) -> Result<Telemetry, TelemetryOpenError> {
    let retention = Retention::from_config(&config.telemetry);
    let store: Arc<dyn TelemetryStore> = if config.influx.url.is_empty() {
        let settings = sqlite::SqliteSettings {
            path: config.storage.data_dir.join("telemetry.db"),
            retention,
            cache_mib: config.telemetry.sqlite_cache_mib,
        };
        let store = tokio::task::spawn_blocking(move || SqliteTelemetryStore::open(settings))
            .await
            .map_err(|e| TelemetryStoreError::Internal(e.to_string()))??;
        Arc::new(store)
    } else {
        let store = InfluxTelemetryStore::new(influx::InfluxSettings {
            url: config.influx.url.clone(),
            db: config.influx.db.clone(),
            token: config.influx.token.expose().to_string(),
            retention,
        })?;
        if let Err(error) = store.ensure_schema().await {
            if !error.is_retryable() {
                return Err(error.into());
            }
            tracing::warn!(%error, "InfluxDB unreachable at start; telemetry is spooled until it answers");
        }
        Arc::new(store)
    };
    let info = store.info();
    let dir = config.storage.data_dir.join("spool");
    let max_bytes = config.telemetry.spool_max_bytes;
    let spool = tokio::task::spawn_blocking(move || FileSpool::open(dir, max_bytes))
        .await
        .map_err(|e| SpoolError::Io(e.to_string()))??;
    let spool: Arc<dyn TelemetrySpool> = Arc::new(spool);
    let store: Arc<dyn TelemetryStore> = Arc::new(MeteredStore::new(store, metrics));
    metrics::register_spool(metrics, spool.clone());
    tracing::info!(kind = info.kind, target = %info.target, "telemetry store ready");
    Ok(Telemetry { store, spool })
}
