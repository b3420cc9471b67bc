//! `Downsampler`: runs the telemetry store's maintenance (rollups, retention) on a timer.
//!
//! It owns nothing but its schedule and the outcome of the last pass. A pass that is still
//! running when the timer fires again is not doubled; a failed pass is logged and retried at
//! the next tick, since maintenance always picks up where the last successful pass stopped.
//! Other periodic housekeeping (the registry's audit retention) runs in the same pass, after
//! the telemetry store's, through [`Housekeeping`].

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::telemetry::store::{MaintenanceReport, TelemetryStore};

// ---- messages received -------------------------------------------------------------------

/// Runs a pass now and answers when it is done (at once when a pass is already running).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunMaintenance {}

/// Stops the downsampler (shutdown). A pass in progress finishes in the store.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopDownsampler {}

/// Returns the downsampler's state, for inspection.
#[derive(Message)]
#[rtype(result = "DownsamplerSnapshot")]
pub struct GetDownsamplerState {}

/// A chore the maintenance pass runs besides the telemetry store's (defined by the crate
/// that owns the data, e.g. the registry's audit retention).
#[async_trait]
pub trait Housekeeping: Send + Sync + 'static {
    /// Names the chore in logs.
    fn name(&self) -> &'static str;
    /// Does one round of it; answers how many records it removed or changed.
    async fn run(&self, now_ms: i64) -> Result<u64, String>;
}

// ---- state -------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DownsamplerSnapshot {
    pub interval_secs: u64,
    pub passes: u64,
    pub failures: u64,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_report: Option<MaintenanceReport>,
    pub last_error: Option<String>,
}

pub struct Downsampler {
    store: Arc<dyn TelemetryStore>,
    chores: Vec<Arc<dyn Housekeeping>>,
    interval: Duration,
    running: bool,
    state: DownsamplerSnapshot,
}

impl Downsampler {
    pub fn new(store: Arc<dyn TelemetryStore>, interval: Duration) -> Self {
        Downsampler {
            store,
            chores: Vec::new(),
            interval,
            running: false,
            state: DownsamplerSnapshot {
                interval_secs: interval.as_secs(),
                passes: 0,
                failures: 0,
                last_started_at: None,
                last_report: None,
                last_error: None,
            },
        }
    }

    /// Also runs `chore` in every pass.
    pub fn with_housekeeping(mut self, chore: Arc<dyn Housekeeping>) -> Self {
        self.chores.push(chore);
        self
    }

    fn pass(&mut self) -> ResponseActFuture<Self, ()> {
        if self.running {
            return Box::pin(fut::ready(()));
        }
        self.running = true;
        let started = Utc::now();
        self.state.last_started_at = Some(started);
        let store = self.store.clone();
        let chores = self.chores.clone();
        Box::pin(
            async move {
                let now_ms = started.timestamp_millis();
                let report = store.maintain(now_ms).await;
                // A failed chore is retried next pass like the store's maintenance.
                for chore in &chores {
                    match chore.run(now_ms).await {
                        Ok(changed) => tracing::debug!(chore = chore.name(), changed, "housekeeping done"),
                        Err(error) => {
                            tracing::warn!(chore = chore.name(), %error, "housekeeping failed; retried next pass")
                        }
                    }
                }
                report
            }
                .into_actor(self)
                .map(move |result, act, _ctx| {
                    act.running = false;
                    act.state.passes += 1;
                    let elapsed_ms = (Utc::now() - started).num_milliseconds();
                    match result {
                        Ok(report) => {
                            tracing::debug!(?report, elapsed_ms, "telemetry maintenance done");
                            act.state.last_report = Some(report);
                            act.state.last_error = None;
                        }
                        Err(error) => {
                            tracing::warn!(%error, elapsed_ms, "telemetry maintenance failed; retried next pass");
                            act.state.failures += 1;
                            act.state.last_error = Some(error.to_string());
                        }
                    }
                }),
        )
    }
}

impl Actor for Downsampler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| {
            ctx.spawn(act.pass());
        });
    }
}

impl Handler<RunMaintenance> for Downsampler {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _msg: RunMaintenance, _ctx: &mut Context<Self>) -> Self::Result {
        self.pass()
    }
}

impl Handler<StopDownsampler> for Downsampler {
    type Result = ();

    fn handle(&mut self, _msg: StopDownsampler, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<GetDownsamplerState> for Downsampler {
    type Result = MessageResult<GetDownsamplerState>;

    fn handle(&mut self, _msg: GetDownsamplerState, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::telemetry::query::{DataSource, QueryResult, TelemetryQuery};
    use crate::telemetry::store::{PointBatch, StoreInfo, TelemetryStoreError};

    #[derive(Default)]
    struct CountingStore {
        passes: AtomicU64,
    }

    #[async_trait]
    impl TelemetryStore for CountingStore {
        fn info(&self) -> StoreInfo {
            StoreInfo {
                kind: "memory",
                target: String::new(),
            }
        }
        async fn write(&self, _batch: PointBatch) -> Result<(), TelemetryStoreError> {
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
            let n = self.passes.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                return Err(TelemetryStoreError::Unavailable("locked".into()));
            }
            Ok(MaintenanceReport {
                series_rolled_up: n,
                ..MaintenanceReport::default()
            })
        }
    }

    #[actix_rt::test]
    async fn runs_passes_and_reports_them() {
        let store = Arc::new(CountingStore::default());
        let addr = Downsampler::new(store.clone(), Duration::from_secs(3600)).start();
        addr.send(RunMaintenance {}).await.unwrap();
        let state = addr.send(GetDownsamplerState {}).await.unwrap();
        assert_eq!((state.passes, state.failures), (1, 1));
        assert!(state.last_error.unwrap().contains("locked"));

        addr.send(RunMaintenance {}).await.unwrap();
        let state = addr.send(GetDownsamplerState {}).await.unwrap();
        assert_eq!((state.passes, state.failures), (2, 1));
        assert_eq!(state.last_report.unwrap().series_rolled_up, 1);
        assert!(state.last_error.is_none());
    }

    #[derive(Default)]
    struct CountingChore {
        runs: AtomicU64,
    }

    #[async_trait]
    impl Housekeeping for CountingChore {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn run(&self, _now_ms: i64) -> Result<u64, String> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            Err("always fails".into())
        }
    }

    #[actix_rt::test]
    async fn housekeeping_runs_in_every_pass_even_when_the_store_fails() {
        let chore = Arc::new(CountingChore::default());
        let addr = Downsampler::new(Arc::new(CountingStore::default()), Duration::from_secs(3600))
            .with_housekeeping(chore.clone())
            .start();
        addr.send(RunMaintenance {}).await.unwrap();
        addr.send(RunMaintenance {}).await.unwrap();
        assert_eq!(chore.runs.load(Ordering::SeqCst), 2);
    }
}
