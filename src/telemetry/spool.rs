//! The durable local spool: batches the telemetry store could not take, kept in the data dir
//! (`spool/`) until [`replay_spool`](drover_actors::telemetry::store::replay_spool) writes them.
//!
//! One file per batch, named by its sequence number (`00000000000000000042.batch`), so removing
//! a committed batch is one `unlink` and there is no cursor or compaction to get wrong. A batch is
//! written to `spool/tmp/`, fsynced, renamed into place and the directory fsynced: after a crash
//! a batch is either complete under its final name or a leftover in `tmp/`, which the next open
//! deletes (its append never returned `Ok`, so nobody was told it was stored).
//!
//! Each file starts with a 16-byte header (magic `DRSP`, point count, payload length, CRC-32 of
//! the payload, little endian) followed by the batch as JSON. A file whose length or checksum
//! does not match (torn by a crash or a failing disk) is moved to `spool/rejected/` and
//! skipped, never fatal; so is a batch the store refused for good, with a `.reason` file beside
//! it. The spool is independent of the store kind and bounded by `telemetry.spool_max_bytes`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use drover_actors::telemetry::TelemetryPoint;
use drover_actors::telemetry::store::{PointBatch, SpoolDepth, SpoolError, SpooledBatch, TelemetrySpool};

use crate::storage::files::{private_dir, private_file_options, write_private};

const MAGIC: &[u8; 4] = b"DRSP";
const HEADER_LEN: u64 = 16;
const SUFFIX: &str = ".batch";

#[derive(Debug, Clone, Copy)]
struct Entry {
    points: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    queue: BTreeMap<u64, Entry>,
    next_id: u64,
    /// Bytes of queued files plus those being written.
    bytes: u64,
    points: u64,
    set_aside: u64,
}

pub struct FileSpool {
    dir: PathBuf,
    max_bytes: u64,
    state: Arc<Mutex<State>>,
}

fn io(context: &str, path: &Path, error: std::io::Error) -> SpoolError {
    SpoolError::Io(format!("{context} {}: {error}", path.display()))
}

fn file_name(id: u64) -> String {
    format!("{id:020}{SUFFIX}")
}

fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("cannot sync", dir, e))
}

/// Reads the header of a spooled file: (points, payload length, crc).
fn read_header(file: &mut File) -> Option<(u64, u64, u32)> {
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact(&mut header).ok()?;
    if &header[..4] != MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    Some((u64::from(word(4)), u64::from(word(8)), word(12)))
}

impl FileSpool {
    /// Opens the spool in `dir` (created if needed): deletes unfinished writes, checks every
    /// batch's header and length, and sets damaged files aside. Blocking.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<FileSpool, SpoolError> {
        let dir = dir.into();
        for sub in [dir.clone(), dir.join("tmp"), dir.join("rejected")] {
            private_dir(&sub).map_err(|e| io("cannot create", &sub, e))?;
        }
        let tmp = dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| io("cannot list", &tmp, e))? {
            let path = entry.map_err(|e| io("cannot list", &tmp, e))?.path();
            tracing::warn!(file = %path.display(), "removing an unfinished spool write");
            fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
        }
        let mut state = State::default();
        for entry in fs::read_dir(&dir).map_err(|e| io("cannot list", &dir, e))? {
            let path = entry.map_err(|e| io("cannot list", &dir, e))?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            state.next_id = state.next_id.max(id + 1);
            let mut file = File::open(&path).map_err(|e| io("cannot open", &path, e))?;
            let size = file.metadata().map_err(|e| io("cannot stat", &path, e))?.len();
            match read_header(&mut file) {
                Some((points, len, _)) if HEADER_LEN + len == size => {
                    state.queue.insert(id, Entry { points, bytes: size });
                    state.bytes += size;
                    state.points += points;
                }
                _ => {
                    drop(file);
                    move_aside(
                        &dir,
                        id,
                        "damaged record (torn write): length does not match its header",
                    )?;
                }
            }
        }
        let rejected = dir.join("rejected");
        state.set_aside = fs::read_dir(&rejected)
            .map_err(|e| io("cannot list", &rejected, e))?
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "batch"))
            .count() as u64;
        if !state.queue.is_empty() {
            tracing::info!(
                batches = state.queue.len(),
                points = state.points,
                bytes = state.bytes,
                "telemetry spool holds batches to replay"
            );
        }
        Ok(FileSpool {
            dir,
            max_bytes,
            state: Arc::new(Mutex::new(state)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, SpoolError> + Send + 'static,
    {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| SpoolError::Io(format!("spool task failed: {e}")))?
    }
}

/// Moves batch `id` to `rejected/` with a note saying why.
fn move_aside(dir: &Path, id: u64, reason: &str) -> Result<(), SpoolError> {
    let from = dir.join(file_name(id));
    let to = dir.join("rejected").join(file_name(id));
    tracing::warn!(file = %from.display(), %reason, "telemetry spool batch set aside");
    fs::rename(&from, &to).map_err(|e| io("cannot move", &from, e))?;
    let note = dir.join("rejected").join(format!("{id:020}.reason"));
    write_private(&note, format!("{reason}\n").as_bytes()).map_err(|e| io("cannot write", &note, e))?;
    fsync_dir(dir)
}

/// Reads and checks batch `id`; `Err(reason)` when it is damaged.
fn read_batch(dir: &Path, id: u64) -> Result<Result<Vec<TelemetryPoint>, String>, SpoolError> {
    let path = dir.join(file_name(id));
    let mut file = File::open(&path).map_err(|e| io("cannot open", &path, e))?;
    let Some((points, len, crc)) = read_header(&mut file) else {
        return Ok(Err("damaged record: bad header".into()));
    };
    let mut payload = Vec::with_capacity(len as usize);
    file.read_to_end(&mut payload)
        .map_err(|e| io("cannot read", &path, e))?;
    if payload.len() as u64 != len {
        return Ok(Err(format!(
            "damaged record (torn write): {} of {len} bytes",
            payload.len()
        )));
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(Err("damaged record: checksum mismatch".into()));
    }
    match serde_json::from_slice::<Vec<TelemetryPoint>>(&payload) {
        Ok(batch) if batch.len() as u64 == points => Ok(Ok(batch)),
        Ok(batch) => Ok(Err(format!(
            "damaged record: {} points, header says {points}",
            batch.len()
        ))),
        Err(e) => Ok(Err(format!("damaged record: {e}"))),
    }
}

#[async_trait]
impl TelemetrySpool for FileSpool {
    async fn append(&self, batch: PointBatch) -> Result<(), SpoolError> {
        let payload = serde_json::to_vec(&batch[..])
            .map_err(|e| SpoolError::Io(format!("cannot encode batch: {e}")))?;
        let size = HEADER_LEN + payload.len() as u64;
        let id = {
            let mut state = self.lock();
            if state.bytes + size > self.max_bytes {
                return Err(SpoolError::Full {
                    bytes: state.bytes,
                    max_bytes: self.max_bytes,
                    needed: size,
                });
            }
            // Reserved now so concurrent appends cannot overshoot the bound together.
            state.bytes += size;
            let id = state.next_id;
            state.next_id += 1;
            id
        };
        let dir = self.dir.clone();
        let points = batch.len() as u64;
        let written = self
            .blocking(move || {
                let mut header = Vec::with_capacity(HEADER_LEN as usize);
                header.extend_from_slice(MAGIC);
                header.extend_from_slice(&(points as u32).to_le_bytes());
                header.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                header.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
                let tmp = dir.join("tmp").join(file_name(id));
                let mut file = private_file_options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .map_err(|e| io("cannot create", &tmp, e))?;
                file.write_all(&header)
                    .and_then(|_| file.write_all(&payload))
                    .and_then(|_| file.sync_all())
                    .map_err(|e| io("cannot write", &tmp, e))?;
                let path = dir.join(file_name(id));
                fs::rename(&tmp, &path).map_err(|e| io("cannot move", &tmp, e))?;
                fsync_dir(&dir)
            })
            .await;
        let mut state = self.lock();
        match written {
            Ok(()) => {
                state.queue.insert(id, Entry { points, bytes: size });
                state.points += points;
                Ok(())
            }
            Err(error) => {
                state.bytes -= size;
                Err(error)
            }
        }
    }

    async fn oldest(&self) -> Result<Option<SpooledBatch>, SpoolError> {
        loop {
            let Some(id) = self.lock().queue.keys().next().copied() else {
                return Ok(None);
            };
            let dir = self.dir.clone();
            match self.blocking(move || read_batch(&dir, id)).await? {
                Ok(points) => return Ok(Some(SpooledBatch { id, points })),
                Err(reason) => self.set_aside(id, &reason).await?,
            }
        }
    }

    async fn remove(&self, id: u64) -> Result<(), SpoolError> {
        let path = self.dir.join(file_name(id));
        self.blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &path, e)),
        })
        .await?;
        let mut state = self.lock();
        if let Some(entry) = state.queue.remove(&id) {
            state.bytes -= entry.bytes;
            state.points -= entry.points;
        }
        Ok(())
    }

    async fn set_aside(&self, id: u64, reason: &str) -> Result<(), SpoolError> {
        let dir = self.dir.clone();
        let reason = reason.to_string();
        self.blocking(move || move_aside(&dir, id, &reason)).await?;
        let mut state = self.lock();
        if let Some(entry) = state.queue.remove(&id) {
            state.bytes -= entry.bytes;
            state.points -= entry.points;
        }
        state.set_aside += 1;
        Ok(())
    }

    fn depth(&self) -> SpoolDepth {
        let state = self.lock();
        SpoolDepth {
            batches: state.queue.len() as u64,
            points: state.points,
            bytes: state.queue.values().map(|e| e.bytes).sum(),
            set_aside: state.set_aside,
        }
    }
}
