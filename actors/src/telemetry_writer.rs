//! `TelemetryWriter`: batches points from many devices and commits them to the telemetry store
//! in one write, answering each sender once its points are committed.
//!
//! A writer flushes when it holds `batch_size` points or `batch_interval` has passed, whichever
//! comes first, with one write in flight at a time: while a write runs, new points gather into
//! the next batch (group commit), so under load batches grow and writes stay few. A write that
//! fails with a retryable error is retried with backoff; if the store stays unreachable the
//! batch goes to the durable spool instead, and the senders are answered then (their points are
//! safe on disk). While anything waits in the spool, new batches are appended to it too, so
//! points of a device are replayed in the order they arrived. [`SpoolReplayer`] drains it once
//! the store is back.
//!
//! The mailbox is bounded: a full writer pushes back on whoever sends to it (see
//! [`WriterPool::submit`]).
//!
//! Senders on an actix arbiter (the device actors' threads, the HTTP workers) gather what they
//! queue within one turn of their thread and send it to each writer as one message, after the
//! actors that thread was running: a send to a writer whose thread sleeps costs a wake-up (a
//! write to its event descriptor), and sending per message made the device actors' thread pay
//! one for nearly every message (about a sixth of that thread's time at 50,000 messages a
//! second).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, oneshot};

use crate::ids::{DeviceId, TenantId};
use crate::telemetry::TelemetryPoint;
use crate::telemetry::store::{PointBatch, TelemetrySpool, TelemetryStore, replay_spool};
use crate::turn;

// ---- messages received -------------------------------------------------------------------

/// Points to commit. `done` (when set) is answered once they are in the store or the spool;
/// `permits` reserve their room in the writer's bounded queue and are released then.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WritePoints {
    pub points: Vec<TelemetryPoint>,
    pub done: Option<oneshot::Sender<Result<(), WriteError>>>,
    pub permits: Option<OwnedSemaphorePermit>,
}

/// Points of several senders gathered on one thread (see [`send_to_writer`]), in the order
/// they were queued.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WriteBatch(pub Vec<WritePoints>);

/// The writer's figures, for inspection.
#[derive(Message)]
#[rtype(result = "WriterSnapshot")]
pub struct InspectWriter {}

/// Flushes what is pending and stops (at shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainWriter {}

/// Why points were not committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The store refused the points themselves (not retried).
    #[error("the telemetry store refused the points: {0}")]
    Rejected(String),
    /// The writers' queues are full (HTTP answers 503, QoS 0 points are dropped).
    #[error("the telemetry writers are busy")]
    Busy,
    /// Neither the store nor the spool could take them; the sender should retry.
    #[error("telemetry could not be stored: {0}")]
    Unavailable(String),
}

/// Why [`WriterPool::try_enqueue`] did not queue a message.
#[derive(Debug)]
pub enum TryEnqueueError {
    Failed(WriteError),
    /// No room now, and the message waits for room (`Wait`): its points, to wait with.
    NoRoom(Vec<TelemetryPoint>),
}

/// Points in a writer's queue. With `Drop` nobody waits for their commit.
#[derive(Debug)]
pub struct Queued(Option<oneshot::Receiver<Result<(), WriteError>>>);

impl Queued {
    /// Resolves when the points are committed (to the store, or the spool while the store is
    /// away); at once for points queued with `Drop`.
    pub async fn committed(self) -> Result<(), WriteError> {
        match self.0 {
            Some(reply) => reply
                .await
                .unwrap_or_else(|_| Err(WriteError::Unavailable("the telemetry writer stopped".into()))),
            None => Ok(()),
        }
    }
}

// ---- state -------------------------------------------------------------------------------

/// Tuning shared by the writers.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub batch_size: usize,
    pub batch_interval: Duration,
    /// Points one writer holds at most (queued and being written); senders beyond it wait,
    /// are refused or dropped according to their [`Backpressure`].
    pub queue_points: usize,
    /// Attempts of one write before the batch is spooled.
    pub attempts: u32,
    pub retry_base: Duration,
}

impl Default for WriterSettings {
    fn default() -> Self {
        WriterSettings {
            batch_size: 1000,
            batch_interval: Duration::from_millis(100),
            queue_points: 20_000,
            attempts: 3,
            retry_base: Duration::from_millis(50),
        }
    }
}

/// Counters every writer adds to, read by `/metrics`.
#[derive(Debug, Default)]
pub struct WriterCounters {
    pub points_committed: AtomicU64,
    pub batches_committed: AtomicU64,
    pub points_spooled: AtomicU64,
    pub batches_spooled: AtomicU64,
    pub write_retries: AtomicU64,
    /// Points neither the store nor the spool took (their senders got an error).
    pub points_failed: AtomicU64,
    /// Points refused because a writer's queue was full (HTTP 503), and those of messages the
    /// device actors refused as invalid ([`Pipeline::count_refused`](crate::pipeline::Pipeline::count_refused)).
    pub points_refused: AtomicU64,
    /// Points dropped because a writer's queue was full (MQTT QoS 0).
    pub points_dropped: AtomicU64,
}

/// What `InspectWriter` returns.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WriterSnapshot {
    pub index: usize,
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    /// Points waiting for the next write.
    pub queued_points: usize,
    /// Points queued, being written, or waiting for room (of `queue_points`).
    pub held_points: usize,
    pub queue_points: usize,
    pub writing: bool,
    /// Senders' messages taken (each one device's points).
    pub messages_handled: u64,
    /// Mailbox deliveries they came in: one per sending thread's turn (see [`send_to_writer`]).
    pub deliveries: u64,
    pub batches_written: u64,
    pub last_batch_points: usize,
    pub last_write_ms: Option<f64>,
}

/// One batch being gathered or committed: its points, who waits for them, and their room.
#[derive(Default)]
struct Batch {
    points: Vec<TelemetryPoint>,
    waiters: Vec<oneshot::Sender<Result<(), WriteError>>>,
    permits: Vec<OwnedSemaphorePermit>,
}

pub struct TelemetryWriter {
    index: usize,
    store: Arc<dyn TelemetryStore>,
    spool: Arc<dyn TelemetrySpool>,
    /// Set while anything waits in the spool (shared by writers and the replayer).
    spooling: Arc<AtomicBool>,
    room: Arc<Semaphore>,
    settings: WriterSettings,
    counters: Arc<WriterCounters>,
    pending: Batch,
    writing: bool,
    draining: bool,
    started_at: DateTime<Utc>,
    messages_handled: u64,
    deliveries: u64,
    batches_written: u64,
    last_batch_points: usize,
    last_write: Option<Duration>,
}

impl TelemetryWriter {
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.points.is_empty() {
            return;
        }
        self.writing = true;
        let batch = std::mem::take(&mut self.pending);
        let count = batch.points.len();
        let points: PointBatch = batch.points.into();
        let (store, spool, spooling, settings, counters) = (
            self.store.clone(),
            self.spool.clone(),
            self.spooling.clone(),
            self.settings.clone(),
            self.counters.clone(),
        );
        let (waiters, permits) = (batch.waiters, batch.permits);
        let started = Instant::now();
        let write = async move { commit(points, &*store, &*spool, &spooling, &settings, &counters).await };
        ctx.spawn(write.into_actor(self).map(move |outcome, act, ctx| {
            act.writing = false;
            act.batches_written += 1;
            act.last_batch_points = count;
            act.last_write = Some(started.elapsed());
            drop(permits);
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
            // Group commit: what gathered during the write goes at once, it has waited already.
            if !act.pending.points.is_empty() {
                act.flush(ctx);
            } else if act.draining {
                ctx.stop();
            }
        }));
    }
}

/// Writes a batch: to the spool at once while the spool is in use (order), otherwise to the
/// store with retries, then to the spool if the store stays unreachable.
async fn commit(
    points: PointBatch,
    store: &dyn TelemetryStore,
    spool: &dyn TelemetrySpool,
    spooling: &AtomicBool,
    settings: &WriterSettings,
    counters: &WriterCounters,
) -> Result<(), WriteError> {
    let count = points.len() as u64;
    if !spooling.load(Ordering::Acquire) {
        let mut attempt = 0;
        loop {
            match store.write(points.clone()).await {
                Ok(()) => {
                    counters.points_committed.fetch_add(count, Ordering::Relaxed);
                    counters.batches_committed.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(error) if error.is_retryable() => {
                    attempt += 1;
                    if attempt >= settings.attempts {
                        tracing::warn!(%error, points = count, "telemetry store unreachable; spooling the batch");
                        break;
                    }
                    counters.write_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(settings.retry_base * 4u32.pow(attempt - 1)).await;
                }
                Err(error) => {
                    counters.points_failed.fetch_add(count, Ordering::Relaxed);
                    tracing::warn!(%error, points = count, "telemetry store refused a batch");
                    return Err(WriteError::Rejected(error.to_string()));
                }
            }
        }
    }
    spooling.store(true, Ordering::Release);
    match spool.append(points).await {
        Ok(()) => {
            counters.points_spooled.fetch_add(count, Ordering::Relaxed);
            counters.batches_spooled.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(error) => {
            counters.points_failed.fetch_add(count, Ordering::Relaxed);
            tracing::error!(%error, points = count, "telemetry could be neither stored nor spooled");
            Err(WriteError::Unavailable(error.to_string()))
        }
    }
}

impl Actor for TelemetryWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Room is bounded by the permits senders take, not by the mailbox.
        ctx.set_mailbox_capacity(usize::MAX);
        ctx.run_interval(self.settings.batch_interval, |act, ctx| act.flush(ctx));
    }
}

impl Handler<WritePoints> for TelemetryWriter {
    type Result = ();

    fn handle(&mut self, msg: WritePoints, ctx: &mut Context<Self>) {
        self.deliveries += 1;
        self.take(msg);
        if self.pending.points.len() >= self.settings.batch_size || self.draining {
            self.flush(ctx);
        }
    }
}

impl Handler<WriteBatch> for TelemetryWriter {
    type Result = ();

    fn handle(&mut self, msg: WriteBatch, ctx: &mut Context<Self>) {
        self.deliveries += 1;
        for points in msg.0 {
            self.take(points);
            if self.pending.points.len() >= self.settings.batch_size || self.draining {
                self.flush(ctx);
            }
        }
    }
}

impl TelemetryWriter {
    fn take(&mut self, msg: WritePoints) {
        self.messages_handled += 1;
        self.pending.points.extend(msg.points);
        self.pending.waiters.extend(msg.done);
        self.pending.permits.extend(msg.permits);
    }
}

impl Handler<InspectWriter> for TelemetryWriter {
    type Result = MessageResult<InspectWriter>;

    fn handle(&mut self, _msg: InspectWriter, _ctx: &mut Context<Self>) -> Self::Result {
        let capacity = self.settings.queue_points.max(1);
        MessageResult(WriterSnapshot {
            index: self.index,
            started_at: self.started_at,
            queued_points: self.pending.points.len(),
            held_points: capacity.saturating_sub(self.room.available_permits()),
            queue_points: capacity,
            writing: self.writing,
            messages_handled: self.messages_handled,
            deliveries: self.deliveries,
            batches_written: self.batches_written,
            last_batch_points: self.last_batch_points,
            last_write_ms: self.last_write.map(|d| d.as_secs_f64() * 1000.0),
        })
    }
}

impl Handler<DrainWriter> for TelemetryWriter {
    type Result = ();

    fn handle(&mut self, _msg: DrainWriter, ctx: &mut Context<Self>) {
        self.draining = true;
        if self.writing {
            return; // the write in flight flushes the rest and stops
        }
        if self.pending.points.is_empty() {
            ctx.stop();
        } else {
            self.flush(ctx);
        }
    }
}

/// How a sender wants to be treated when its writer's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Backpressure {
    /// Wait for room, then for the commit (MQTT QoS 1/2: the acknowledgement comes late).
    Wait,
    /// Refuse at once with [`WriteError::Busy`], else wait for the commit (HTTP: 503).
    Refuse,
    /// Drop and count at once, and do not wait for the commit (MQTT QoS 0).
    Drop,
}

/// The writers, chosen by device so each device's points keep their order.
#[derive(Clone)]
pub struct WriterPool {
    writers: Writers,
    queue_points: usize,
    pub counters: Arc<WriterCounters>,
    spooling: Arc<AtomicBool>,
}

impl std::fmt::Debug for WriterPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterPool")
            .field("writers", &self.writers.len())
            .finish()
    }
}

impl WriterPool {
    /// Starts `count` writers on the current arbiter. Until a [`SpoolReplayer`] finds the spool
    /// empty, batches go to the spool (so points spooled before a restart stay first).
    pub fn start(
        count: usize,
        store: Arc<dyn TelemetryStore>,
        spool: Arc<dyn TelemetrySpool>,
        settings: WriterSettings,
    ) -> WriterPool {
        let counters = Arc::new(WriterCounters::default());
        let spooling = Arc::new(AtomicBool::new(spool.depth().batches > 0));
        let queue_points = settings.queue_points.max(1);
        let writers = (0..count.max(1))
            .map(|index| {
                let room = Arc::new(Semaphore::new(queue_points));
                let writer = TelemetryWriter {
                    index,
                    store: store.clone(),
                    spool: spool.clone(),
                    spooling: spooling.clone(),
                    room: room.clone(),
                    settings: settings.clone(),
                    counters: counters.clone(),
                    pending: Batch::default(),
                    writing: false,
                    draining: false,
                    started_at: Utc::now(),
                    messages_handled: 0,
                    deliveries: 0,
                    batches_written: 0,
                    last_batch_points: 0,
                    last_write: None,
                }
                .start();
                (writer, room)
            })
            .collect();
        WriterPool {
            writers: Arc::new(writers),
            queue_points,
            counters,
            spooling,
        }
    }

    /// The index of the device's writer.
    fn writer_for(&self, tenant: &TenantId, device: &DeviceId) -> usize {
        let mut hasher = DefaultHasher::new();
        (tenant, device).hash(&mut hasher);
        hasher.finish() as usize % self.writers.len()
    }

    /// Hands a device's points to its writer. With `Wait` and `Refuse` this resolves when they
    /// are committed (to the store, or the spool while the store is away); with `Drop` as soon
    /// as the writer has them.
    pub async fn submit(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        points: Vec<TelemetryPoint>,
        backpressure: Backpressure,
    ) -> Result<(), WriteError> {
        self.enqueue(tenant, device, points, backpressure)
            .await?
            .committed()
            .await
    }

    /// Puts a device's points in its writer's queue, waiting for room (`Wait`) or refusing
    /// when there is none (`Refuse`, `Drop`). What is queued will be committed or spooled;
    /// [`Queued::committed`] tells when.
    pub async fn enqueue(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        points: Vec<TelemetryPoint>,
        backpressure: Backpressure,
    ) -> Result<Queued, WriteError> {
        match self.try_enqueue(tenant, device, points, backpressure) {
            Ok(queued) => Ok(queued),
            Err(TryEnqueueError::Failed(error)) => Err(error),
            Err(TryEnqueueError::NoRoom(points)) => {
                let writer = self.writer_for(tenant, device);
                let permits = self.writers[writer]
                    .1
                    .clone()
                    .acquire_many_owned(self.room_needed(points.len()))
                    .await
                    .map_err(|_| WriteError::Unavailable("the telemetry writers stopped".into()))?;
                self.send(writer, points, backpressure, permits)
            }
        }
    }

    /// [`Self::enqueue`] without waiting: where `Wait` would wait for room, the points come
    /// back ([`TryEnqueueError::NoRoom`]) for the caller to wait with [`Self::enqueue`]. The
    /// common case (there is room) needs no future.
    pub fn try_enqueue(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        points: Vec<TelemetryPoint>,
        backpressure: Backpressure,
    ) -> Result<Queued, TryEnqueueError> {
        if points.is_empty() {
            return Ok(Queued(None));
        }
        let count = points.len();
        let writer = self.writer_for(tenant, device);
        let permits = match self.writers[writer]
            .1
            .clone()
            .try_acquire_many_owned(self.room_needed(count))
        {
            Ok(permits) => permits,
            Err(TryAcquireError::Closed) => {
                return Err(TryEnqueueError::Failed(WriteError::Unavailable(
                    "the telemetry writers stopped".into(),
                )));
            }
            Err(TryAcquireError::NoPermits) => {
                let counter = match backpressure {
                    Backpressure::Wait => return Err(TryEnqueueError::NoRoom(points)),
                    Backpressure::Drop => &self.counters.points_dropped,
                    Backpressure::Refuse => &self.counters.points_refused,
                };
                counter.fetch_add(count as u64, Ordering::Relaxed);
                return Err(TryEnqueueError::Failed(WriteError::Busy));
            }
        };
        self.send(writer, points, backpressure, permits)
            .map_err(TryEnqueueError::Failed)
    }

    /// The room a message of `count` points takes: a message larger than the whole queue takes
    /// all of it rather than never fitting.
    fn room_needed(&self, count: usize) -> u32 {
        count.min(self.queue_points) as u32
    }

    fn send(
        &self,
        writer: usize,
        points: Vec<TelemetryPoint>,
        backpressure: Backpressure,
        permits: OwnedSemaphorePermit,
    ) -> Result<Queued, WriteError> {
        let (done, reply) = if backpressure == Backpressure::Drop {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        send_to_writer(
            &self.writers,
            writer,
            WritePoints {
                points,
                done,
                permits: Some(permits),
            },
        )
        .map_err(|_| WriteError::Unavailable("the telemetry writers stopped".into()))?;
        Ok(Queued(reply))
    }

    pub async fn inspect(&self) -> Vec<WriterSnapshot> {
        let mut out = Vec::with_capacity(self.writers.len());
        for (writer, _) in self.writers.iter() {
            if let Ok(snapshot) = writer.send(InspectWriter {}).await {
                out.push(snapshot);
            }
        }
        out
    }

    /// Commits what the writers hold and stops them (at shutdown, after ingestion stopped).
    pub async fn drain(&self, timeout: Duration) {
        // What this thread gathered goes first: the writers take it before they stop.
        send_gathered();
        for (writer, _) in self.writers.iter() {
            writer.do_send(DrainWriter {});
        }
        let deadline = Instant::now() + timeout;
        while self.writers.iter().any(|(w, _)| w.connected()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether new batches currently go to the spool.
    pub fn is_spooling(&self) -> bool {
        self.spooling.load(Ordering::Acquire)
    }

    /// The flag writers and the replayer share.
    pub fn spooling_flag(&self) -> Arc<AtomicBool> {
        self.spooling.clone()
    }
}

/// A pool's writers with the room of each one's queue.
type Writers = Arc<Vec<(Addr<TelemetryWriter>, Arc<Semaphore>)>>;

/// What one thread has queued for the writers in its current turn, by pool and writer index.
type Outgoing = Vec<(Writers, usize, Vec<WritePoints>)>;

thread_local! {
    static OUTGOING: std::cell::RefCell<Outgoing> = const { std::cell::RefCell::new(Vec::new()) };
}

static SEND_GATHERED: turn::AtTurnEnd = turn::AtTurnEnd(send_gathered);

/// Hands `msg` to `writer`. On an actix arbiter it joins what this thread has gathered for the
/// writer, sent as one [`WriteBatch`] at the end of the thread's turn ([`turn`]). Elsewhere it
/// is sent at once. Either way the writer gets each thread's messages in the order they were
/// queued. A writer that stopped meanwhile drops the batch: its senders' `done` channels
/// close, and they learn the points were not stored.
fn send_to_writer(writers: &Writers, index: usize, msg: WritePoints) -> Result<(), ()> {
    let writer = &writers[index].0;
    if !turn::on_arbiter() {
        return writer.try_send(msg).map_err(|_| ());
    }
    if !writer.connected() {
        return Err(());
    }
    let first = OUTGOING.with(|outgoing| {
        let mut outgoing = outgoing.borrow_mut();
        let first = outgoing.is_empty();
        match outgoing
            .iter_mut()
            .find(|(pool, i, _)| *i == index && Arc::ptr_eq(pool, writers))
        {
            Some((_, _, queue)) => queue.push(msg),
            None => outgoing.push((writers.clone(), index, vec![msg])),
        }
        first
    });
    if first {
        turn::at_turn_end(&SEND_GATHERED);
    }
    Ok(())
}

fn send_gathered() {
    let queues = OUTGOING.with(|outgoing| std::mem::take(&mut *outgoing.borrow_mut()));
    for (writers, index, mut queue) in queues {
        let writer = &writers[index].0;
        let _ = if queue.len() == 1 {
            writer.try_send(queue.pop().expect("one message")).map_err(drop)
        } else {
            writer.try_send(WriteBatch(queue)).map_err(drop)
        };
    }
}

/// Replays the spool into the store once it is reachable, oldest batch first, and lets the
/// writers go back to the store when the spool is empty.
pub struct SpoolReplayer {
    store: Arc<dyn TelemetryStore>,
    spool: Arc<dyn TelemetrySpool>,
    spooling: Arc<AtomicBool>,
    every: Duration,
    replaying: bool,
    replayed_batches: u64,
    started_at: DateTime<Utc>,
    passes: u64,
    last_error: Option<String>,
}

/// Reports the replayer's state, for `GET /admin/actors`.
#[derive(Message)]
#[rtype(result = "ReplayerSnapshot")]
pub struct InspectReplayer {}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayerSnapshot {
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    pub interval_ms: u64,
    /// A replay is running now.
    pub replaying: bool,
    /// Replay passes started (one per interval while there is something to replay).
    pub passes: u64,
    pub replayed_batches: u64,
    pub last_error: Option<String>,
}

impl Handler<InspectReplayer> for SpoolReplayer {
    type Result = MessageResult<InspectReplayer>;

    fn handle(&mut self, _msg: InspectReplayer, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(ReplayerSnapshot {
            started_at: self.started_at,
            interval_ms: self.every.as_millis() as u64,
            replaying: self.replaying,
            passes: self.passes,
            replayed_batches: self.replayed_batches,
            last_error: self.last_error.clone(),
        })
    }
}

impl SpoolReplayer {
    pub fn new(
        store: Arc<dyn TelemetryStore>,
        spool: Arc<dyn TelemetrySpool>,
        spooling: Arc<AtomicBool>,
        every: Duration,
    ) -> Self {
        SpoolReplayer {
            store,
            spool,
            spooling,
            every,
            replaying: false,
            replayed_batches: 0,
            started_at: Utc::now(),
            passes: 0,
            last_error: None,
        }
    }

    fn replay(&mut self, ctx: &mut Context<Self>) {
        if self.replaying || (self.spool.depth().batches == 0 && !self.spooling.load(Ordering::Acquire)) {
            return;
        }
        self.replaying = true;
        self.passes += 1;
        let (store, spool, spooling) = (self.store.clone(), self.spool.clone(), self.spooling.clone());
        let work = async move {
            let mut replayed = 0u64;
            loop {
                let report = replay_spool(&*spool, &*store, 64)
                    .await
                    .map_err(|e| e.to_string())?;
                replayed += report.batches;
                if report.stopped_by.is_some() {
                    return Ok(replayed); // the store is still unreachable; try again later
                }
                if spool.depth().batches == 0 {
                    // Empty: writers go to the store again. A batch a writer appended just
                    // before it saw the flag drop is replayed on the next pass.
                    spooling.store(false, Ordering::Release);
                    if spool.depth().batches == 0 {
                        return Ok(replayed);
                    }
                }
            }
        };
        ctx.spawn(
            work.into_actor(self)
                .map(|outcome: Result<u64, String>, act, _ctx| {
                    act.replaying = false;
                    match outcome {
                        Ok(n) => {
                            if n > 0 {
                                tracing::info!(batches = n, "replayed spooled telemetry into the store");
                            }
                            act.replayed_batches += n;
                            act.last_error = None;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "replaying the telemetry spool failed");
                            act.last_error = Some(error);
                        }
                    }
                }),
        );
    }
}

/// Stops the replayer (at shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopReplayer {}

impl Handler<StopReplayer> for SpoolReplayer {
    type Result = ();

    fn handle(&mut self, _msg: StopReplayer, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Actor for SpoolReplayer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.replay(ctx);
        ctx.run_interval(self.every, |act, ctx| act.replay(ctx));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::telemetry::query::{DataSource, QueryResult, TelemetryQuery};
    use crate::telemetry::store::memory::MemorySpool;
    use crate::telemetry::store::{MaintenanceReport, StoreInfo, TelemetryStoreError};
    use crate::telemetry::{MetricName, MetricValue};

    /// A store whose writes wait for `gate` (when closed) and fail while `down`.
    #[derive(Default)]
    struct GatedStore {
        gate: tokio::sync::RwLock<()>,
        down: AtomicBool,
        written: Mutex<Vec<i64>>,
        writes: AtomicU64,
    }

    #[async_trait]
    impl TelemetryStore for GatedStore {
        fn info(&self) -> StoreInfo {
            StoreInfo {
                kind: "memory",
                target: String::new(),
            }
        }
        async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError> {
            let _open = self.gate.read().await;
            self.writes.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                return Err(TelemetryStoreError::Unavailable("down".into()));
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

    fn points(ts: std::ops::Range<i64>) -> Vec<TelemetryPoint> {
        ts.map(|t| TelemetryPoint {
            tenant: TenantId::parse("t").unwrap(),
            device: DeviceId::parse("d").unwrap(),
            device_type: "x".into(),
            metric: MetricName::parse("m").unwrap(),
            ts_ms: t,
            value: MetricValue::Number(1.0),
        })
        .collect()
    }

    fn ids() -> (TenantId, DeviceId) {
        (TenantId::parse("t").unwrap(), DeviceId::parse("d").unwrap())
    }

    fn settings() -> WriterSettings {
        WriterSettings {
            batch_size: 5,
            batch_interval: Duration::from_millis(10),
            queue_points: 10,
            attempts: 2,
            retry_base: Duration::from_millis(1),
        }
    }

    #[actix_rt::test]
    async fn what_a_thread_queues_in_one_turn_reaches_the_writer_in_one_delivery_in_order() {
        let store = Arc::new(GatedStore::default());
        let settings = WriterSettings {
            batch_size: 1000,
            queue_points: 1000,
            ..settings()
        };
        let pool = WriterPool::start(1, store.clone(), Arc::new(MemorySpool::default()), settings);
        let (tenant, device) = ids();
        let mut queued = Vec::new();
        for t in 0..10 {
            let enqueue = pool.enqueue(&tenant, &device, points(t..t + 1), Backpressure::Refuse);
            queued.push(
                futures_util::FutureExt::now_or_never(enqueue)
                    .expect("queued at once")
                    .unwrap(),
            );
        }
        for q in queued {
            q.committed().await.unwrap();
        }
        assert_eq!(*store.written.lock().unwrap(), (0..10).collect::<Vec<i64>>());
        let writer = &pool.inspect().await[0];
        assert_eq!((writer.messages_handled, writer.deliveries), (10, 1));

        // The next turn's message is a delivery of its own.
        pool.submit(&tenant, &device, points(10..11), Backpressure::Refuse)
            .await
            .unwrap();
        let writer = &pool.inspect().await[0];
        assert_eq!((writer.messages_handled, writer.deliveries), (11, 2));
    }

    #[actix_rt::test]
    async fn drained_writers_commit_what_was_gathered_before_and_refuse_what_comes_after() {
        let store = Arc::new(GatedStore::default());
        let pool = WriterPool::start(1, store.clone(), Arc::new(MemorySpool::default()), settings());
        let (tenant, device) = ids();
        let enqueue = pool.enqueue(&tenant, &device, points(0..1), Backpressure::Refuse);
        let queued = futures_util::FutureExt::now_or_never(enqueue)
            .expect("queued at once")
            .unwrap();
        // Drained in the same turn, before the gathered message was sent.
        pool.drain(Duration::from_secs(1)).await;
        assert_eq!(queued.committed().await, Ok(()));
        assert_eq!(*store.written.lock().unwrap(), [0]);
        assert_eq!(
            pool.submit(&tenant, &device, points(1..2), Backpressure::Refuse)
                .await,
            Err(WriteError::Unavailable("the telemetry writers stopped".into()))
        );
    }

    #[actix_rt::test]
    async fn full_writers_make_senders_wait_refuse_or_drop_and_release_room_on_commit() {
        let store = Arc::new(GatedStore::default());
        let pool = WriterPool::start(1, store.clone(), Arc::new(MemorySpool::default()), settings());
        let (tenant, device) = ids();
        let closed = store.gate.write().await;
        // Ten points fill the queue: five being written (held at the gate), five waiting.
        let first = {
            let (pool, tenant, device) = (pool.clone(), tenant.clone(), device.clone());
            actix_rt::spawn(async move {
                pool.submit(&tenant, &device, points(0..5), Backpressure::Wait)
                    .await
            })
        };
        let second = {
            let (pool, tenant, device) = (pool.clone(), tenant.clone(), device.clone());
            actix_rt::spawn(async move {
                pool.submit(&tenant, &device, points(5..10), Backpressure::Wait)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            pool.submit(&tenant, &device, points(10..11), Backpressure::Refuse)
                .await,
            Err(WriteError::Busy)
        );
        assert_eq!(
            pool.submit(&tenant, &device, points(11..13), Backpressure::Drop)
                .await,
            Err(WriteError::Busy)
        );
        assert_eq!(pool.counters.points_refused.load(Ordering::Relaxed), 1);
        assert_eq!(pool.counters.points_dropped.load(Ordering::Relaxed), 2);
        let third = {
            let (pool, tenant, device) = (pool.clone(), tenant.clone(), device.clone());
            actix_rt::spawn(async move {
                pool.submit(&tenant, &device, points(13..14), Backpressure::Wait)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished() && !second.is_finished() && !third.is_finished());
        assert_eq!(pool.inspect().await[0].held_points, 10);
        drop(closed);
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(second.await.unwrap(), Ok(()));
        assert_eq!(third.await.unwrap(), Ok(()));
        let mut written = store.written.lock().unwrap().clone();
        written.sort();
        assert_eq!(written, (0..10).chain(13..14).collect::<Vec<_>>());
        assert_eq!(pool.counters.points_committed.load(Ordering::Relaxed), 11);
        assert_eq!(pool.inspect().await[0].held_points, 0);
    }

    #[actix_rt::test]
    async fn an_unreachable_store_sends_batches_to_the_spool_and_the_replayer_drains_it_in_order() {
        let store = Arc::new(GatedStore::default());
        store.down.store(true, Ordering::Relaxed);
        let spool = Arc::new(MemorySpool::default());
        let pool = WriterPool::start(1, store.clone(), spool.clone(), settings());
        let (tenant, device) = ids();
        for chunk in 0..4 {
            let range = chunk * 5..chunk * 5 + 5;
            assert_eq!(
                pool.submit(&tenant, &device, points(range), Backpressure::Wait)
                    .await,
                Ok(())
            );
        }
        assert!(pool.is_spooling());
        assert_eq!(spool.depth().points, 20);
        // Once the first batch went to the spool, the next ones go there directly (order).
        assert_eq!(store.writes.load(Ordering::Relaxed), 2);
        assert_eq!(pool.counters.points_spooled.load(Ordering::Relaxed), 20);

        let replayer = SpoolReplayer::new(
            store.clone(),
            spool.clone(),
            pool.spooling_flag(),
            Duration::from_millis(20),
        )
        .start();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            spool.depth().batches,
            4,
            "nothing replayed while the store is down"
        );
        store.down.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.is_spooling() {
            assert!(Instant::now() < deadline, "spool not drained");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(spool.depth().batches, 0);
        assert_eq!(
            pool.submit(&tenant, &device, points(20..25), Backpressure::Wait)
                .await,
            Ok(())
        );
        assert_eq!(*store.written.lock().unwrap(), (0..25).collect::<Vec<_>>());
        replayer.do_send(StopReplayer {});
    }

    #[actix_rt::test]
    async fn drain_commits_what_is_pending_and_stops_the_writers() {
        let store = Arc::new(GatedStore::default());
        let mut slow = settings();
        slow.batch_interval = Duration::from_secs(3600);
        let pool = WriterPool::start(2, store.clone(), Arc::new(MemorySpool::default()), slow);
        let (tenant, device) = ids();
        assert_eq!(
            pool.submit(&tenant, &device, points(0..3), Backpressure::Drop)
                .await,
            Ok(())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            store.written.lock().unwrap().is_empty(),
            "below batch size, interval not reached"
        );
        pool.drain(Duration::from_secs(5)).await;
        assert_eq!(*store.written.lock().unwrap(), vec![0, 1, 2]);
        assert!(pool.inspect().await.is_empty(), "writers stopped");
    }
}
