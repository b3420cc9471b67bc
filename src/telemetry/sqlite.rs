//! The embedded telemetry store: its own SQLite file (`telemetry.db` in the data dir), separate
//! from the registry so ingestion never contends with registry writes.
//!
//! Schema (see [`SCHEMA`]): `series` maps (tenant, device, metric) to an integer id; `points`
//! holds `(series_id, ts) → value` in a `WITHOUT ROWID` table, so the primary key *is* the
//! device+metric+time index and a point costs ~20 bytes. Values keep their SQLite storage class:
//! REAL for numbers, INTEGER 0/1 for booleans, TEXT for strings. `rollup_1m` and `rollup_1h` hold
//! count / numeric count / sum / min / max per bucket.
//!
//! Rollups are maintained incrementally: a write marks its series dirty from its oldest point
//! (`series.dirty_1m`, `series.dirty_1h`, in the same transaction, so a crash cannot lose the
//! mark) and [`maintain`](TelemetryStore::maintain) recomputes only dirty buckets, 1-minute from
//! raw points, 1-hour from 1-minute rollups. Recomputing (not adding) keeps rollups exact when a
//! point is replaced. Retention deletes by series and time range, which the primary keys serve.
//!
//! All SQLite work runs on tokio's blocking pool. One connection writes (SQLite allows one writer
//! at a time; a mutex is cheaper and fairer than `SQLITE_BUSY` retries); reads use a small pool
//! of other connections, which WAL lets run beside the writer. A percentile over a long range
//! reads it in time slices on several of them at once, in one snapshot (`sqlite/slices.rs`).
//! Queries are in `sqlite/query.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use drover_actors::telemetry::MetricValue;
use drover_actors::telemetry::query::{HOUR_MS, MINUTE_MS, QueryResult, TelemetryQuery};
use drover_actors::telemetry::store::{
    MaintenanceReport, PointBatch, StoreInfo, TelemetryStore, TelemetryStoreError,
};
use parking_lot::{Mutex as WriterLock, MutexGuard as WriterGuard};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior, params};

use super::Retention;

pub mod pcache;
mod query;
mod slices;

use query::run_query;
use slices::Slicing;

/// Tables and indexes; `user_version` 1.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id          INTEGER PRIMARY KEY,
    tenant      TEXT NOT NULL,
    device      TEXT NOT NULL,
    metric      TEXT NOT NULL,
    device_type TEXT NOT NULL,
    -- Oldest point written since the 1-minute / 1-hour rollups were last brought up to date.
    dirty_1m    INTEGER,
    dirty_1h    INTEGER,
    UNIQUE (tenant, device, metric)
);
CREATE TABLE IF NOT EXISTS points (
    series_id INTEGER NOT NULL,
    ts        INTEGER NOT NULL,
    value     NOT NULL,
    PRIMARY KEY (series_id, ts)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_1m (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    num_count INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL,
    max       REAL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_1h (
    series_id INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    num_count INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL,
    max       REAL,
    PRIMARY KEY (series_id, bucket)
) WITHOUT ROWID;
-- How far each rollup is complete for every series (buckets before until_ms).
CREATE TABLE IF NOT EXISTS rollup_state (
    level    TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

/// Series rolled up per maintenance transaction, so ingestion waits at most one chunk.
const MAINTENANCE_CHUNK: usize = 200;
/// A rollup transaction commits (and lets the writers in) once it has worked this long, even
/// before `MAINTENANCE_CHUNK` series: series with many fresh points (a fast device's minute
/// can hold tens of thousands) would otherwise hold the write lock for a second or more, and
/// every acknowledgement with it.
const MAINTENANCE_SLICE: std::time::Duration = std::time::Duration::from_millis(20);
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 4;
/// How much of the file readers map into memory. A range scan then reads checkpointed pages in
/// place instead of copying each through the page cache, which a long series outgrows (1,000,000
/// points are ~25 MiB of 1 KiB pages against a reader cache of a quarter of
/// `TELEMETRY_SQLITE_CACHE_MIB`). Address space only: the OS pages the file in and out as for
/// any read, and pages still in the WAL are read from it as before.
const READER_MMAP_BYTES: i64 = 1 << 30;
/// Time slices a long raw scan is read in at once at most, however many cores there are: each
/// takes a reader connection, and more than the idle pool keeps would open new ones.
const MAX_SLICES: usize = MAX_IDLE_READERS;

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct SqliteSettings {
    pub path: PathBuf,
    pub retention: Retention,
    pub cache_mib: u32,
}

pub struct SqliteTelemetryStore {
    path: PathBuf,
    retention: Retention,
    writer: Arc<WriterLock<Writer>>,
    readers: Arc<ReaderPool>,
    /// Time slices a long raw scan is read in at once at most (see [`Slicing`]).
    max_slices: usize,
}

/// The writing connection and what it caches.
struct Writer {
    conn: Connection,
    /// `tenant \0 device \0 metric` → series id; series rows are never deleted.
    series: HashMap<String, i64>,
    /// Per series, a timestamp its dirty marks are known to be at or below.
    dirty_upper: HashMap<i64, i64>,
}

struct ReaderPool {
    path: PathBuf,
    cache_kib: i64,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn get(&self) -> Result<Connection, TelemetryStoreError> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(classify)?;
        conn.execute_batch(&format!(
            "PRAGMA busy_timeout = 5000; PRAGMA cache_size = -{}; PRAGMA mmap_size = {READER_MMAP_BYTES};",
            self.cache_kib / 4
        ))
        .map_err(classify)?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }
}

/// Maps SQLite failures: contention, full disks and I/O trouble may pass; the rest will not.
fn classify(error: rusqlite::Error) -> TelemetryStoreError {
    match error.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::DiskFull
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory,
        ) => TelemetryStoreError::Unavailable(error.to_string()),
        _ => TelemetryStoreError::Internal(error.to_string()),
    }
}

fn value_ref(value: &MetricValue) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(match value {
        MetricValue::Number(n) => ValueRef::Real(*n),
        MetricValue::Bool(b) => ValueRef::Integer(i64::from(*b)),
        MetricValue::Text(s) => ValueRef::Text(s.as_bytes()),
    })
}

fn metric_value(value: ValueRef<'_>) -> Result<MetricValue, TelemetryStoreError> {
    match value {
        ValueRef::Real(n) => Ok(MetricValue::Number(n)),
        ValueRef::Integer(i) => Ok(MetricValue::Bool(i != 0)),
        ValueRef::Text(t) => Ok(MetricValue::Text(String::from_utf8_lossy(t).into_owned())),
        other => Err(TelemetryStoreError::Internal(format!(
            "unexpected stored value of type {:?}",
            other.data_type()
        ))),
    }
}

fn floor_to(ts: i64, res: i64) -> i64 {
    ts.div_euclid(res) * res
}

fn ceil_to(ts: i64, res: i64) -> i64 {
    floor_to(ts + res - 1, res)
}

impl SqliteTelemetryStore {
    /// Opens (creating if needed) the database file and its schema. Blocking: call it from the
    /// blocking pool or at start.
    pub fn open(settings: SqliteSettings) -> Result<SqliteTelemetryStore, TelemetryStoreError> {
        // In place already when the server started; a no-op if SQLite was used before.
        pcache::install();
        if let Some(dir) = settings.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::storage::files::private_dir(dir).map_err(|e| {
                TelemetryStoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        crate::storage::files::private_sqlite(&settings.path).map_err(|e| {
            TelemetryStoreError::Unavailable(format!("cannot create {}: {e}", settings.path.display()))
        })?;
        let conn = Connection::open(&settings.path).map_err(classify)?;
        let cache_kib = i64::from(settings.cache_mib) * 1024;
        // Small pages for a new file: a batch from many devices touches one leaf page per series,
        // and each commit copies every touched page into the WAL; 1 KiB pages measured ~50% more
        // interleaved inserts per second than 4 KiB. (No effect on an existing file.)
        conn.execute_batch("PRAGMA page_size = 1024;").map_err(classify)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(classify)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(TelemetryStoreError::Internal(format!(
                "{} cannot use WAL (journal mode {mode})",
                settings.path.display()
            )));
        }
        // NORMAL in WAL mode: a committed batch survives a killed process; only a power cut can
        // lose the last commits. A bigger page cache keeps the leaf pages of active series hot.
        conn.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA temp_store = MEMORY; \
             PRAGMA cache_size = -{cache_kib}; PRAGMA wal_autocheckpoint = 4000;"
        ))
        .map_err(classify)?;
        conn.execute_batch(SCHEMA).map_err(classify)?;
        Ok(SqliteTelemetryStore {
            readers: Arc::new(ReaderPool {
                path: settings.path.clone(),
                cache_kib,
                idle: Mutex::new(Vec::new()),
            }),
            path: settings.path,
            retention: settings.retention,
            writer: Arc::new(WriterLock::new(Writer {
                conn,
                series: HashMap::new(),
                dirty_upper: HashMap::new(),
            })),
            max_slices: std::thread::available_parallelism()
                .map_or(1, |cores| cores.get())
                .min(MAX_SLICES),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, TelemetryStoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, TelemetryStoreError> + Send + 'static,
    {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| TelemetryStoreError::Internal(format!("telemetry task failed: {e}")))?
    }
}

fn write_batch(writer: &mut Writer, batch: &PointBatch) -> Result<(), TelemetryStoreError> {
    let Writer {
        conn,
        series,
        dirty_upper,
    } = writer;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(classify)?;
    // New series ids are cached only once the transaction commits.
    let mut new_series: Vec<(String, i64)> = Vec::new();
    let mut oldest: HashMap<i64, i64> = HashMap::new();
    {
        let mut insert_series = tx
            .prepare_cached(
                "INSERT INTO series (tenant, device, metric, device_type) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (tenant, device, metric) DO UPDATE SET device_type = excluded.device_type \
                 RETURNING id",
            )
            .map_err(classify)?;
        let mut insert_point = tx
            .prepare_cached(
                "INSERT INTO points (series_id, ts, value) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (series_id, ts) DO UPDATE SET value = excluded.value",
            )
            .map_err(classify)?;
        let mut key = String::with_capacity(128);
        for point in batch.iter() {
            key.clear();
            key.push_str(point.tenant.as_str());
            key.push('\0');
            key.push_str(point.device.as_str());
            key.push('\0');
            key.push_str(point.metric.as_str());
            let id = match series.get(key.as_str()) {
                Some(id) => *id,
                None => match new_series.iter().find(|(k, _)| *k == key) {
                    Some((_, id)) => *id,
                    None => {
                        let id: i64 = insert_series
                            .query_row(
                                params![
                                    point.tenant.as_str(),
                                    point.device.as_str(),
                                    point.metric.as_str(),
                                    point.device_type
                                ],
                                |row| row.get(0),
                            )
                            .map_err(classify)?;
                        new_series.push((key.clone(), id));
                        id
                    }
                },
            };
            insert_point
                .execute(params![id, point.ts_ms, value_ref(&point.value)])
                .map_err(classify)?;
            oldest
                .entry(id)
                .and_modify(|t| *t = (*t).min(point.ts_ms))
                .or_insert(point.ts_ms);
        }
    }
    let mut marked: Vec<(i64, i64)> = Vec::new();
    {
        let mut mark = tx
            .prepare_cached(
                "UPDATE series SET dirty_1m = min(coalesce(dirty_1m, ?1), ?1), \
                 dirty_1h = min(coalesce(dirty_1h, ?1), ?1) WHERE id = ?2",
            )
            .map_err(classify)?;
        for (id, ts) in oldest {
            // Skip the update when the marks are already at or below this batch's oldest point.
            if dirty_upper.get(&id).is_some_and(|upper| *upper <= ts) {
                continue;
            }
            mark.execute(params![ts, id]).map_err(classify)?;
            marked.push((id, ts));
        }
    }
    tx.commit().map_err(classify)?;
    series.extend(new_series);
    dirty_upper.extend(marked);
    Ok(())
}

/// Rolls up the dirty series and applies retention, in chunks of series.
fn maintain(
    writer: &WriterLock<Writer>,
    retention: &Retention,
    now_ms: i64,
) -> Result<MaintenanceReport, TelemetryStoreError> {
    let mut report = MaintenanceReport::default();
    let until_1m = floor_to(now_ms, MINUTE_MS);
    let until_1h = floor_to(now_ms, HOUR_MS);
    let raw_horizon = now_ms - retention.raw_ms;
    let horizon_1m = now_ms - retention.rollup_1m_ms;
    let horizon_1h = now_ms - retention.rollup_1h_ms;

    let dirty: Vec<i64> = {
        let guard = writer.lock();
        let mut stmt = guard
            .conn
            .prepare_cached("SELECT id FROM series WHERE dirty_1m IS NOT NULL OR dirty_1h IS NOT NULL")
            .map_err(classify)?;
        stmt.query_map([], |row| row.get(0))
            .map_err(classify)?
            .collect::<Result<_, _>>()
            .map_err(classify)?
    };
    let mut remaining = dirty.as_slice();
    while !remaining.is_empty() {
        let mut guard = writer.lock();
        let Writer {
            conn, dirty_upper, ..
        } = &mut *guard;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(classify)?;
        let started = std::time::Instant::now();
        let mut done = 0;
        for id in remaining.iter().take(MAINTENANCE_CHUNK) {
            if done > 0 && started.elapsed() >= MAINTENANCE_SLICE {
                break;
            }
            done += 1;
            // Read again under the writer lock: a write since the listing may have lowered them.
            let (dirty_1m, dirty_1h): (Option<i64>, Option<i64>) = tx
                .prepare_cached("SELECT dirty_1m, dirty_1h FROM series WHERE id = ?1")
                .and_then(|mut s| s.query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?))))
                .map_err(classify)?;
            // Buckets older than the raw retention keep their rollups: their raw points are
            // (partly) gone, so recomputing them would lose data.
            if let Some(from) = dirty_1m.map(|d| floor_to(d, MINUTE_MS).max(ceil_to(raw_horizon, MINUTE_MS)))
            {
                report.rollup_rows_written += rollup_minutes(&tx, *id, from, until_1m)?;
            }
            if let Some(from) = dirty_1h.map(|d| floor_to(d, HOUR_MS).max(ceil_to(horizon_1m, HOUR_MS))) {
                report.rollup_rows_written += rollup_hours(&tx, *id, from, until_1h)?;
            }
            let pending = |from: i64| -> Result<Option<i64>, TelemetryStoreError> {
                tx.prepare_cached("SELECT 1 FROM points WHERE series_id = ?1 AND ts >= ?2 LIMIT 1")
                    .and_then(|mut s| s.exists(params![id, from]))
                    .map(|exists| exists.then_some(from))
                    .map_err(classify)
            };
            let (next_1m, next_1h) = (pending(until_1m)?, pending(until_1h)?);
            tx.prepare_cached("UPDATE series SET dirty_1m = ?1, dirty_1h = ?2 WHERE id = ?3")
                .and_then(|mut s| s.execute(params![next_1m, next_1h, id]))
                .map_err(classify)?;
            dirty_upper.remove(id);
            report.series_rolled_up += 1;
        }
        tx.commit().map_err(classify)?;
        remaining = &remaining[done..];
        // Handed straight to a writer waiting with a batch: released plainly, the lock would
        // often be taken again by this loop before the woken writer ran, and a pass of many
        // slices held every acknowledgement for its whole length (0.5-2 s seen).
        WriterGuard::unlock_fair(guard);
    }

    // Every series is now rolled up to these points (late writes mark their series again).
    {
        let guard = writer.lock();
        let mut stmt = guard
            .conn
            .prepare_cached(
                "INSERT INTO rollup_state (level, until_ms) VALUES (?1, ?2) \
                 ON CONFLICT (level) DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)",
            )
            .map_err(classify)?;
        stmt.execute(params!["1m", until_1m]).map_err(classify)?;
        stmt.execute(params!["1h", until_1h]).map_err(classify)?;
    }

    let ids: Vec<i64> = {
        let guard = writer.lock();
        let mut stmt = guard
            .conn
            .prepare_cached("SELECT id FROM series")
            .map_err(classify)?;
        stmt.query_map([], |row| row.get(0))
            .map_err(classify)?
            .collect::<Result<_, _>>()
            .map_err(classify)?
    };
    for chunk in ids.chunks(MAINTENANCE_CHUNK * 5) {
        let mut guard = writer.lock();
        let tx = guard
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(classify)?;
        {
            let mut raw = tx
                .prepare_cached("DELETE FROM points WHERE series_id = ?1 AND ts < ?2")
                .map_err(classify)?;
            let mut minutes = tx
                .prepare_cached("DELETE FROM rollup_1m WHERE series_id = ?1 AND bucket < ?2")
                .map_err(classify)?;
            let mut hours = tx
                .prepare_cached("DELETE FROM rollup_1h WHERE series_id = ?1 AND bucket < ?2")
                .map_err(classify)?;
            for id in chunk {
                report.raw_points_deleted += raw.execute(params![id, raw_horizon]).map_err(classify)? as u64;
                report.rollup_rows_deleted += minutes
                    .execute(params![id, floor_to(horizon_1m, MINUTE_MS)])
                    .map_err(classify)? as u64;
                report.rollup_rows_deleted += hours
                    .execute(params![id, floor_to(horizon_1h, HOUR_MS)])
                    .map_err(classify)? as u64;
            }
        }
        tx.commit().map_err(classify)?;
    }
    Ok(report)
}

/// Recomputes the 1-minute rollups of one series for buckets in `[from, until)` from raw points.
fn rollup_minutes(
    tx: &rusqlite::Transaction,
    id: i64,
    from: i64,
    until: i64,
) -> Result<u64, TelemetryStoreError> {
    if from >= until {
        return Ok(0);
    }
    tx.prepare_cached("DELETE FROM rollup_1m WHERE series_id = ?1 AND bucket >= ?2 AND bucket < ?3")
        .and_then(|mut s| s.execute(params![id, from, until]))
        .map_err(classify)?;
    tx.prepare_cached(
        "INSERT INTO rollup_1m (series_id, bucket, count, num_count, sum, min, max) \
         SELECT ?1, bucket, count(*), count(num), coalesce(sum(num), 0.0), min(num), max(num) FROM ( \
             SELECT ts - ((ts % 60000) + 60000) % 60000 AS bucket, \
                    CASE WHEN typeof(value) = 'real' THEN value END AS num \
             FROM points WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3) \
         GROUP BY bucket",
    )
    .and_then(|mut s| s.execute(params![id, from, until]))
    .map(|n| n as u64)
    .map_err(classify)
}

/// Recomputes the 1-hour rollups of one series for buckets in `[from, until)` from its
/// 1-minute rollups.
fn rollup_hours(
    tx: &rusqlite::Transaction,
    id: i64,
    from: i64,
    until: i64,
) -> Result<u64, TelemetryStoreError> {
    if from >= until {
        return Ok(0);
    }
    tx.prepare_cached("DELETE FROM rollup_1h WHERE series_id = ?1 AND bucket >= ?2 AND bucket < ?3")
        .and_then(|mut s| s.execute(params![id, from, until]))
        .map_err(classify)?;
    tx.prepare_cached(
        "INSERT INTO rollup_1h (series_id, bucket, count, num_count, sum, min, max) \
         SELECT ?1, bucket - ((bucket % 3600000) + 3600000) % 3600000 AS hour, \
                sum(count), sum(num_count), sum(sum), min(min), max(max) \
         FROM rollup_1m WHERE series_id = ?1 AND bucket >= ?2 AND bucket < ?3 GROUP BY hour",
    )
    .and_then(|mut s| s.execute(params![id, from, until]))
    .map(|n| n as u64)
    .map_err(classify)
}

#[async_trait]
impl TelemetryStore for SqliteTelemetryStore {
    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "sqlite",
            target: format!("sqlite:{}", self.path.display()),
        }
    }

    async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let writer = self.writer.clone();
        self.blocking(move || {
            let mut writer = writer.lock();
            write_batch(&mut writer, &batch)
        })
        .await
    }

    async fn query(&self, query: TelemetryQuery) -> Result<QueryResult, TelemetryStoreError> {
        let (readers, writer, max_slices) = (self.readers.clone(), self.writer.clone(), self.max_slices);
        self.blocking(move || {
            let conn = readers.get()?;
            let slicing = Slicing {
                pool: &readers,
                writer: &writer,
                max_slices,
            };
            let result = run_query(&conn, &query, &slicing);
            readers.put(conn);
            result
        })
        .await
    }

    async fn ping(&self) -> Result<(), TelemetryStoreError> {
        let readers = self.readers.clone();
        self.blocking(move || {
            let conn = readers.get()?;
            let result = conn
                .query_row("SELECT count(*) FROM rollup_state", [], |row| {
                    row.get::<_, i64>(0)
                })
                .map(|_| ())
                .map_err(classify);
            readers.put(conn);
            result
        })
        .await
    }

    async fn maintain(&self, now_ms: i64) -> Result<MaintenanceReport, TelemetryStoreError> {
        let writer = self.writer.clone();
        let retention = self.retention;
        self.blocking(move || maintain(&writer, &retention, now_ms)).await
    }
}
