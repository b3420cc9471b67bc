//! `JobActor`: runs batch jobs (one operation over many devices) with bounded concurrency and
//! rate, a result per device, and resumption where a job stopped.
//!
//! A job's targets are fixed when it is created (one row per device, `pending` until done), so
//! running it is: take the next pending devices in id order, execute the operation on each (at
//! most `concurrency` at once, at most `rate_per_sec` started per second), record the chunk's
//! results in one write, repeat. Results are recorded only for rows still pending, so a device
//! is done once per job; a crash between executing and recording a chunk re-executes at most
//! that chunk after the restart, which the operations tolerate (setting a tag twice leaves one
//! tag; deleting a deleted device is reported as already done).
//!
//! Singleton, written for a cluster (DESIGN §9): every job runs under a [`JobLease`]; the
//! single-node lease always grants, a Redis lease would let exactly one node run each job, and
//! durable state lives only in the [`JobStore`] (the registry), so another node picks a job up
//! where it stopped. The adapter half (store, operations, HTTP) is `src/fleet_ops/jobs.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::ids::{DeviceId, TenantId};

// ---- messages received -------------------------------------------------------------------

/// Starts (or resumes) a job that is in the store; a job already running is left alone.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RunJob {
    pub job: String,
}

/// Asks a running job to stop after the devices in progress; answers once its run has ended
/// (at once when it was not running here), so nothing more happens to its devices after that.
/// The caller marks it cancelled in the store first.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CancelJob {
    pub job: String,
}

/// The jobs running now, for inspection.
#[derive(Message, Debug)]
#[rtype(result = "Vec<String>")]
pub struct RunningJobs {}

/// The runner as `GET /admin/actors` shows it.
#[derive(Message, Debug)]
#[rtype(result = "JobRunnerSnapshot")]
pub struct InspectJobRunner {}

/// What [`InspectJobRunner`] answers.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRunnerSnapshot {
    /// Jobs running here, with the devices each has done in this run.
    pub running: Vec<RunningJob>,
    /// Jobs waiting for a free slot, in order.
    pub waiting: Vec<String>,
    pub max_running: usize,
    /// Devices read (and results written) per round trip.
    pub chunk: usize,
    /// Runs ended since the start: completed, cancelled, interrupted (retried later).
    pub completed: u64,
    pub cancelled: u64,
    pub interrupted: u64,
    /// Device results recorded since the start, all jobs.
    pub devices_done: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningJob {
    pub job: String,
    /// Device results this run recorded.
    pub devices_done: u64,
    pub running_secs: u64,
}

// Sent to itself when a job's run ends.
#[derive(Message)]
#[rtype(result = "()")]
struct JobRunEnded {
    job: String,
    outcome: Result<JobEnd, String>,
}

// ---- what the actor needs ----------------------------------------------------------------

/// How a job runs, as stored.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub id: String,
    pub tenant: TenantId,
    pub operation: String,
    pub params: Value,
    /// Who created it (`user:<name>`, `key:<id>`): operations act on their behalf.
    pub created_by: String,
    pub concurrency: usize,
    /// Devices started per second at most (0: no limit).
    pub rate_per_sec: u32,
}

/// One device's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceResult {
    pub device: DeviceId,
    pub status: DeviceOutcome,
    /// What the operation answered (a command's reply, the new state) or why it failed.
    pub detail: Value,
    /// A secret produced for the job's creator only (a rotated token); stored sealed.
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOutcome {
    Succeeded,
    Failed,
    /// Nothing to do for this device (e.g. it was deleted before its turn).
    Skipped,
}

impl DeviceOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceOutcome::Succeeded => "succeeded",
            DeviceOutcome::Failed => "failed",
            DeviceOutcome::Skipped => "skipped",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Every device has its result.
    Completed,
    /// Stopped on request; devices not done stay without a result (`cancelled`).
    Cancelled,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("job store: {0}")]
pub struct JobStoreError(pub String);

/// Durable job state (the registry).
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Jobs to run after a start: those queued or running when the server stopped.
    async fn runnable_jobs(&self) -> Result<Vec<String>, JobStoreError>;
    /// The job's plan, and marks it running; `None` when it is not runnable (finished, cancelled, gone).
    async fn start_job(&self, job: &str) -> Result<Option<JobPlan>, JobStoreError>;
    /// Up to `limit` devices still pending, in id order, after `after`.
    async fn pending_devices(
        &self,
        job: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>, JobStoreError>;
    /// Records results of devices without one (pending, or cancelled while they were in
    /// progress; a device done before is left as it is) and adds them to the job's counts.
    /// Answers whether the job was cancelled meanwhile.
    async fn record_results(&self, job: &str, results: Vec<DeviceResult>) -> Result<bool, JobStoreError>;
    /// Marks the job finished.
    async fn finish_job(&self, job: &str, end: JobEnd) -> Result<(), JobStoreError>;
}

/// Executes the job's operation on one device. Must not panic; failures are results.
#[async_trait]
pub trait JobExecutor: Send + Sync + 'static {
    async fn execute(&self, plan: &JobPlan, device: &DeviceId) -> DeviceResult;
}

/// Who may run a job (DESIGN §9: one node per job in a cluster).
#[async_trait]
pub trait JobLease: Send + Sync + 'static {
    /// Takes the job's lease; `false` when another node holds it.
    async fn acquire(&self, job: &str) -> bool;
    async fn release(&self, job: &str);
}

/// Why a run did not start: another node holds the job's lease (not a failure, not logged as one).
const HELD_ELSEWHERE: &str = "another node runs this job";

/// How often the runnable jobs are read again (to take over those of a node that died).
const RESCAN: Duration = Duration::from_secs(30);

/// A single node holds every lease.
pub struct LocalLease;

#[async_trait]
impl JobLease for LocalLease {
    async fn acquire(&self, _job: &str) -> bool {
        true
    }
    async fn release(&self, _job: &str) {}
}

/// Tuning of the runner.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Jobs running at once; more wait their turn.
    pub max_running: usize,
    /// Pending devices read (and results written) per round trip.
    pub chunk: usize,
    /// Wait before retrying a job whose store was unavailable.
    pub retry_after: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            max_running: 4,
            chunk: 200,
            retry_after: Duration::from_secs(5),
        }
    }
}

// ---- the actor ---------------------------------------------------------------------------

pub struct JobActor {
    store: Arc<dyn JobStore>,
    executor: Arc<dyn JobExecutor>,
    lease: Arc<dyn JobLease>,
    settings: JobSettings,
    /// Running jobs: their stop flags and progress.
    running: HashMap<String, Run>,
    /// Who waits for a run to end (cancellations).
    ended: HashMap<String, Vec<tokio::sync::oneshot::Sender<()>>>,
    /// Jobs waiting for a free slot, in order.
    waiting: Vec<String>,
    /// Runs ended since the start, by outcome.
    completed: u64,
    cancelled: u64,
    interrupted: u64,
    /// Device results of the runs that ended.
    devices_done: u64,
}

/// A job running here.
struct Run {
    stop: Arc<AtomicBool>,
    /// Device results the run recorded.
    done: Arc<AtomicU64>,
    started: Instant,
}

impl JobActor {
    pub fn new(
        store: Arc<dyn JobStore>,
        executor: Arc<dyn JobExecutor>,
        lease: Arc<dyn JobLease>,
        settings: JobSettings,
    ) -> JobActor {
        JobActor {
            store,
            executor,
            lease,
            settings,
            running: HashMap::new(),
            ended: HashMap::new(),
            waiting: Vec::new(),
            completed: 0,
            cancelled: 0,
            interrupted: 0,
            devices_done: 0,
        }
    }

    fn launch(&mut self, job: String, ctx: &mut Context<Self>) {
        if self.running.contains_key(&job) {
            return;
        }
        if self.running.len() >= self.settings.max_running.max(1) {
            if !self.waiting.contains(&job) {
                self.waiting.push(job);
            }
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        self.running.insert(
            job.clone(),
            Run {
                stop: stop.clone(),
                done: done.clone(),
                started: Instant::now(),
            },
        );
        let (store, executor, lease) = (self.store.clone(), self.executor.clone(), self.lease.clone());
        let chunk = self.settings.chunk.max(1);
        let me = ctx.address();
        actix::spawn(async move {
            let outcome = if lease.acquire(&job).await {
                let outcome = run_job_counted(&job, store.as_ref(), executor, chunk, &stop, &done).await;
                lease.release(&job).await;
                outcome
            } else {
                Err(HELD_ELSEWHERE.to_string())
            };
            me.do_send(JobRunEnded { job, outcome });
        });
    }
}

impl Actor for JobActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.resume(ctx);
        // Jobs another node was running when it died are taken over once their lease expires.
        ctx.run_interval(RESCAN, |act, ctx| act.resume(ctx));
    }

    fn stopping(&mut self, _ctx: &mut Context<Self>) -> Running {
        // Runs stop at their next device; what they did is recorded, the rest stays pending.
        for run in self.running.values() {
            run.stop.store(true, Ordering::Relaxed);
        }
        Running::Stop
    }
}

impl JobActor {
    /// Launches the runnable jobs not running here.
    fn resume(&mut self, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        ctx.spawn(async move { store.runnable_jobs().await }.into_actor(self).map(
            |jobs, act, ctx| match jobs {
                Ok(jobs) => {
                    let new: Vec<String> = jobs
                        .into_iter()
                        .filter(|j| !act.running.contains_key(j) && !act.waiting.contains(j))
                        .collect();
                    if !new.is_empty() {
                        tracing::info!(jobs = new.len(), "resuming batch jobs");
                    }
                    for job in new {
                        act.launch(job, ctx);
                    }
                }
                Err(error) => tracing::warn!(%error, "could not read the batch jobs to resume"),
            },
        ));
    }
}

impl Handler<RunJob> for JobActor {
    type Result = ();

    fn handle(&mut self, msg: RunJob, ctx: &mut Context<Self>) {
        self.launch(msg.job, ctx);
    }
}

impl Handler<CancelJob> for JobActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: CancelJob, _ctx: &mut Context<Self>) -> Self::Result {
        self.waiting.retain(|j| *j != msg.job);
        let Some(run) = self.running.get(&msg.job) else {
            return Box::pin(async {});
        };
        run.stop.store(true, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ended.entry(msg.job).or_default().push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<RunningJobs> for JobActor {
    type Result = Vec<String>;

    fn handle(&mut self, _msg: RunningJobs, _ctx: &mut Context<Self>) -> Vec<String> {
        let mut jobs: Vec<String> = self.running.keys().cloned().collect();
        jobs.sort();
        jobs
    }
}

impl Handler<InspectJobRunner> for JobActor {
    type Result = MessageResult<InspectJobRunner>;

    fn handle(&mut self, _msg: InspectJobRunner, _ctx: &mut Context<Self>) -> Self::Result {
        let mut running: Vec<RunningJob> = self
            .running
            .iter()
            .map(|(job, run)| RunningJob {
                job: job.clone(),
                devices_done: run.done.load(Ordering::Relaxed),
                running_secs: run.started.elapsed().as_secs(),
            })
            .collect();
        running.sort_by(|a, b| a.job.cmp(&b.job));
        let in_runs: u64 = running.iter().map(|r| r.devices_done).sum();
        MessageResult(JobRunnerSnapshot {
            running,
            waiting: self.waiting.clone(),
            max_running: self.settings.max_running.max(1),
            chunk: self.settings.chunk.max(1),
            completed: self.completed,
            cancelled: self.cancelled,
            interrupted: self.interrupted,
            devices_done: self.devices_done + in_runs,
        })
    }
}

impl Handler<JobRunEnded> for JobActor {
    type Result = ();

    fn handle(&mut self, msg: JobRunEnded, ctx: &mut Context<Self>) {
        if let Some(run) = self.running.remove(&msg.job) {
            self.devices_done += run.done.load(Ordering::Relaxed);
        }
        match &msg.outcome {
            Ok(JobEnd::Completed) => self.completed += 1,
            Ok(JobEnd::Cancelled) => self.cancelled += 1,
            Err(error) if error == HELD_ELSEWHERE => {}
            Err(_) if self.ended.contains_key(&msg.job) => self.cancelled += 1,
            Err(_) => self.interrupted += 1,
        }
        let cancelled = self.ended.remove(&msg.job).unwrap_or_default();
        let was_cancelled = !cancelled.is_empty();
        for waiter in cancelled {
            let _ = waiter.send(());
        }
        match msg.outcome {
            Ok(end) => tracing::info!(job = %msg.job, ?end, "batch job ended"),
            // Stopped for a cancellation: the store already says cancelled.
            Err(_) if was_cancelled => tracing::info!(job = %msg.job, "batch job cancelled"),
            // Another node runs it: asked again later, in case that node dies.
            Err(error) if error == HELD_ELSEWHERE => {
                tracing::debug!(job = %msg.job, "batch job runs on another node");
                let job = msg.job.clone();
                ctx.run_later(self.settings.retry_after, move |act, ctx| act.launch(job, ctx));
            }
            Err(error) => {
                // The job stays running in the store: try again later (a restart also resumes it).
                tracing::warn!(job = %msg.job, %error, "batch job interrupted; retrying");
                let job = msg.job.clone();
                ctx.run_later(self.settings.retry_after, move |act, ctx| act.launch(job, ctx));
            }
        }
        if !self.waiting.is_empty() {
            let next = self.waiting.remove(0);
            self.launch(next, ctx);
        }
    }
}

// ---- the run -----------------------------------------------------------------------------

/// Paces starts to `rate` per second (0: unpaced).
struct Pacer {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: u32) -> Pacer {
        Pacer {
            interval: (rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(rate))),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// Runs a job until every device has a result, or it is stopped or cancelled.
pub async fn run_job(
    job: &str,
    store: &dyn JobStore,
    executor: Arc<dyn JobExecutor>,
    chunk: usize,
    stop: &AtomicBool,
) -> Result<JobEnd, String> {
    run_job_counted(job, store, executor, chunk, stop, &AtomicU64::new(0)).await
}

/// [`run_job`], adding the device results it records to `done`.
pub async fn run_job_counted(
    job: &str,
    store: &dyn JobStore,
    executor: Arc<dyn JobExecutor>,
    chunk: usize,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> Result<JobEnd, String> {
    let Some(plan) = store.start_job(job).await.map_err(|e| e.to_string())? else {
        return Ok(JobEnd::Cancelled);
    };
    let plan = Arc::new(plan);
    let pacer = Arc::new(Pacer::new(plan.rate_per_sec));
    let concurrency = plan.concurrency.max(1);
    // Results are recorded per chunk: keep a chunk to about a quarter second of work at the
    // job's rate, so progress shows and a restart repeats little.
    let chunk = match plan.rate_per_sec {
        0 => chunk,
        rate => chunk.min(concurrency.max(rate as usize / 4)),
    };
    let mut after: Option<DeviceId> = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err("stopped".into());
        }
        let devices = store
            .pending_devices(job, after.as_ref(), chunk)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = devices.last().cloned() else {
            break;
        };
        after = Some(last);
        let results: Vec<DeviceResult> = futures_util::stream::iter(devices)
            .map(|device| {
                let (plan, pacer, executor) = (plan.clone(), pacer.clone(), executor.clone());
                async move {
                    if stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    pacer.wait().await;
                    Some(executor.execute(&plan, &device).await)
                }
            })
            .buffer_unordered(concurrency)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        let recorded = results.len() as u64;
        let cancelled = store
            .record_results(job, results)
            .await
            .map_err(|e| e.to_string())?;
        done.fetch_add(recorded, Ordering::Relaxed);
        if cancelled {
            store
                .finish_job(job, JobEnd::Cancelled)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(JobEnd::Cancelled);
        }
    }
    if stop.load(Ordering::Relaxed) {
        return Err("stopped".into());
    }
    store
        .finish_job(job, JobEnd::Completed)
        .await
        .map_err(|e| e.to_string())?;
    Ok(JobEnd::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex as StdMutex;

    /// Jobs in memory: devices with their status.
    #[derive(Default)]
    struct MemoryJobs {
        devices: StdMutex<BTreeMap<String, &'static str>>,
        cancelled: AtomicBool,
        finished: StdMutex<Option<JobEnd>>,
    }

    #[async_trait]
    impl JobStore for MemoryJobs {
        async fn runnable_jobs(&self) -> Result<Vec<String>, JobStoreError> {
            Ok(vec![])
        }
        async fn start_job(&self, job: &str) -> Result<Option<JobPlan>, JobStoreError> {
            Ok(Some(JobPlan {
                id: job.into(),
                tenant: TenantId::parse("acme").unwrap(),
                operation: "add_tags".into(),
                params: Value::Null,
                created_by: "user:test".into(),
                concurrency: 4,
                rate_per_sec: 0,
            }))
        }
        async fn pending_devices(
            &self,
            _job: &str,
            after: Option<&DeviceId>,
            limit: usize,
        ) -> Result<Vec<DeviceId>, JobStoreError> {
            let devices = self.devices.lock().unwrap();
            Ok(devices
                .iter()
                .filter(|(id, status)| {
                    **status == "pending" && after.is_none_or(|a| id.as_str() > a.as_str())
                })
                .take(limit)
                .map(|(id, _)| DeviceId::parse(id.clone()).unwrap())
                .collect())
        }
        async fn record_results(
            &self,
            _job: &str,
            results: Vec<DeviceResult>,
        ) -> Result<bool, JobStoreError> {
            let mut devices = self.devices.lock().unwrap();
            for r in results {
                let entry = devices.get_mut(r.device.as_str()).unwrap();
                assert_eq!(*entry, "pending", "a device was done twice");
                *entry = r.status.as_str();
            }
            Ok(self.cancelled.load(Ordering::Relaxed))
        }
        async fn finish_job(&self, _job: &str, end: JobEnd) -> Result<(), JobStoreError> {
            *self.finished.lock().unwrap() = Some(end);
            Ok(())
        }
    }

    struct EvenFails;

    #[async_trait]
    impl JobExecutor for EvenFails {
        async fn execute(&self, _plan: &JobPlan, device: &DeviceId) -> DeviceResult {
            let n: u32 = device.as_str()[1..].parse().unwrap();
            DeviceResult {
                device: device.clone(),
                status: if n.is_multiple_of(2) {
                    DeviceOutcome::Failed
                } else {
                    DeviceOutcome::Succeeded
                },
                detail: Value::Null,
                secret: None,
            }
        }
    }

    fn jobs(n: usize) -> MemoryJobs {
        let store = MemoryJobs::default();
        for i in 0..n {
            store
                .devices
                .lock()
                .unwrap()
                .insert(format!("d{i:04}"), "pending");
        }
        store
    }

    #[actix_rt::test]
    async fn every_device_gets_one_result_across_chunks() {
        let store = jobs(1000);
        let end = run_job("j", &store, Arc::new(EvenFails), 64, &AtomicBool::new(false)).await;
        assert_eq!(end, Ok(JobEnd::Completed));
        let devices = store.devices.lock().unwrap();
        assert_eq!(devices.values().filter(|s| **s == "failed").count(), 500);
        assert_eq!(devices.values().filter(|s| **s == "succeeded").count(), 500);
        assert_eq!(*store.finished.lock().unwrap(), Some(JobEnd::Completed));
    }

    #[actix_rt::test]
    async fn a_cancelled_job_stops_after_its_chunk() {
        let store = jobs(100);
        store.cancelled.store(true, Ordering::Relaxed);
        let end = run_job("j", &store, Arc::new(EvenFails), 10, &AtomicBool::new(false)).await;
        assert_eq!(end, Ok(JobEnd::Cancelled));
        let pending = store
            .devices
            .lock()
            .unwrap()
            .values()
            .filter(|s| **s == "pending")
            .count();
        assert_eq!(pending, 90);
    }

    #[actix_rt::test]
    async fn a_stopped_run_leaves_the_rest_pending_for_a_resume() {
        let store = jobs(50);
        let stop = AtomicBool::new(true);
        let end = run_job("j", &store, Arc::new(EvenFails), 10, &stop).await;
        assert!(end.is_err());
        assert!(store.finished.lock().unwrap().is_none());
        let resumed = run_job("j", &store, Arc::new(EvenFails), 10, &AtomicBool::new(false)).await;
        assert_eq!(resumed, Ok(JobEnd::Completed));
        assert!(store.devices.lock().unwrap().values().all(|s| *s != "pending"));
    }
}
