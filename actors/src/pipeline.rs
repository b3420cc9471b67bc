//! Where a device's accepted telemetry goes after its actor validated it: to the batching
//! writers that commit it, to the live view once queued (dashboard sessions), and after the
//! commit to the observers that act on it (rule actors).
//!
//! Observers get a [`TelemetryAccepted`] per message batch, with the device's metadata and
//! shadow at that moment, so a rule can look at them without asking the registry. Sends are
//! `try_send`: an observer that falls behind loses events (counted), it never slows ingestion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde_json::{Map, Value};

use crate::ids::{DeviceId, TenantId};
use crate::telemetry::PayloadLimits;
use crate::telemetry::TelemetryPoint;
use crate::telemetry::store::PointBatch;
use crate::telemetry_writer::WriterPool;

/// Telemetry of one device that the platform accepted.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct TelemetryAccepted {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub device_type: Arc<str>,
    /// The device's metadata (location, model…) when the telemetry arrived.
    pub metadata: Arc<Map<String, Value>>,
    /// The device's shadow state (`{"desired": …, "reported": …}`) when the telemetry arrived.
    pub shadow: Option<Arc<Value>>,
    pub points: PointBatch,
}

#[cfg(test)]
impl TelemetryAccepted {
    /// No points of `device` of `tenant`: what tests fill queues and mailboxes with.
    pub(crate) fn empty(tenant: &TenantId, device: &str) -> TelemetryAccepted {
        TelemetryAccepted {
            tenant: tenant.clone(),
            device: DeviceId::parse(device).unwrap(),
            device_type: "t".into(),
            metadata: Arc::default(),
            shadow: None,
            points: Vec::new().into(),
        }
    }
}

/// Where accepted telemetry is shown as it arrives (the dashboard's WebSocket sessions).
/// Device actors ask [`LiveTelemetry::watching`] for every message, so it must be cheap, and
/// call [`LiveTelemetry::show`] once the message is queued for its writer: before its commit,
/// which only delays acknowledgements, never the live view.
pub trait LiveTelemetry: Send + Sync + 'static {
    fn watching(&self, tenant: &TenantId, device: &DeviceId) -> bool;
    fn show(&self, tenant: &TenantId, device: &DeviceId, device_type: &str, points: &[TelemetryPoint]);
}

/// What device actors share about telemetry: the payload rules, the writers that commit it,
/// and the observers.
pub struct Pipeline {
    pub limits: PayloadLimits,
    /// Where accepted points are committed; `None` only in tests that need no store.
    pub writers: Option<WriterPool>,
    observers: Vec<Observer>,
    live: Option<Arc<dyn LiveTelemetry>>,
    dropped: AtomicU64,
    counts: Mutex<HashMap<TenantId, Arc<TenantCounter>>>,
}

/// An observer of accepted telemetry, and what counts the events its full mailbox refused (the
/// observer's own drop counter, so its figure in `/metrics` covers them).
struct Observer {
    recipient: Recipient<TelemetryAccepted>,
    missed: Box<dyn Fn() + Send + Sync>,
}

/// A tenant's committed telemetry, counted by its device actors without a lock: each holds
/// the counter of its tenant.
#[derive(Debug, Default)]
pub struct TenantCounter {
    messages: AtomicU64,
    points: AtomicU64,
}

impl TenantCounter {
    /// Counts a committed message of `points` points.
    pub fn count(&self, points: usize) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.points.fetch_add(points as u64, Ordering::Relaxed);
    }

    fn read(&self) -> TenantTelemetry {
        TenantTelemetry {
            messages: self.messages.load(Ordering::Relaxed),
            points: self.points.load(Ordering::Relaxed),
        }
    }
}

/// Telemetry a tenant's devices had committed since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantTelemetry {
    pub messages: u64,
    pub points: u64,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("observers", &self.observers.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline::new(PayloadLimits::default())
    }
}

impl Pipeline {
    pub fn new(limits: PayloadLimits) -> Pipeline {
        Pipeline {
            limits,
            writers: None,
            observers: Vec::new(),
            live: None,
            dropped: AtomicU64::new(0),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Commits accepted points through `writers` (before the pipeline is shared).
    pub fn with_writers(mut self, writers: WriterPool) -> Pipeline {
        self.writers = Some(writers);
        self
    }

    /// Adds an observer (before the pipeline is shared); `missed` is called for each event its
    /// full mailbox refuses.
    pub fn with_observer(
        mut self,
        observer: Recipient<TelemetryAccepted>,
        missed: impl Fn() + Send + Sync + 'static,
    ) -> Pipeline {
        self.observers.push(Observer {
            recipient: observer,
            missed: Box::new(missed),
        });
        self
    }

    /// Shows accepted telemetry live through `live` (before the pipeline is shared).
    pub fn with_live(mut self, live: Arc<dyn LiveTelemetry>) -> Pipeline {
        self.live = Some(live);
        self
    }

    /// Whether someone watches `device` live now (asked for every message: cheap).
    pub fn watched(&self, tenant: &TenantId, device: &DeviceId) -> bool {
        self.live
            .as_ref()
            .is_some_and(|live| live.watching(tenant, device))
    }

    /// Shows a message of `device` to those who watch it live.
    pub fn show_live(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        device_type: &str,
        points: &[TelemetryPoint],
    ) {
        if let Some(live) = &self.live {
            live.show(tenant, device, device_type, points);
        }
    }

    /// Counts the points of a message refused before it reached the writers (malformed, or
    /// against the device type's schema) with the points the writers refused, so that one
    /// figure tells every refusal. A message whose points cannot be read counts as one.
    pub fn count_refused(&self, points: usize) {
        if let Some(writers) = &self.writers {
            writers
                .counters
                .points_refused
                .fetch_add(points.max(1) as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The counter of `tenant`'s committed telemetry (a device actor takes it once).
    pub fn tenant_counter(&self, tenant: &TenantId) -> Arc<TenantCounter> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.entry(tenant.clone()).or_default().clone()
    }

    /// What `tenant` had committed since start (`None`: every tenant together).
    pub fn counts(&self, tenant: Option<&TenantId>) -> TenantTelemetry {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match tenant {
            Some(t) => counts.get(t).map(|c| c.read()).unwrap_or_default(),
            None => counts
                .values()
                .map(|c| c.read())
                .fold(TenantTelemetry::default(), |a, c| TenantTelemetry {
                    messages: a.messages + c.messages,
                    points: a.points + c.points,
                }),
        }
    }

    pub fn has_observers(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Tells every observer; an observer whose mailbox is full misses this event.
    pub fn observe(&self, event: TelemetryAccepted) {
        for observer in &self.observers {
            if observer.recipient.try_send(event.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                (observer.missed)();
            }
        }
    }

    /// Events observers missed because they were behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    struct Slow(Arc<AtomicUsize>);

    impl Actor for Slow {
        type Context = Context<Self>;
    }

    impl Handler<TelemetryAccepted> for Slow {
        type Result = ();

        fn handle(&mut self, _msg: TelemetryAccepted, _ctx: &mut Context<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[actix::test]
    async fn events_an_observer_refuses_are_counted_by_the_observer() {
        let received = Arc::new(AtomicUsize::new(0));
        let observer = Slow::create(|ctx| {
            ctx.set_mailbox_capacity(2);
            Slow(received.clone())
        });
        let missed = Arc::new(AtomicUsize::new(0));
        let counted = missed.clone();
        let pipeline = Pipeline::default().with_observer(observer.recipient(), move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let event = TelemetryAccepted::empty(&TenantId::parse("acme").unwrap(), "d1");
        // No yield in between: the observer takes none of them before the burst ends.
        for _ in 0..20 {
            pipeline.observe(event.clone());
        }
        let refused = missed.load(Ordering::Relaxed);
        assert!(refused >= 10, "a mailbox of 2 refused {refused} of 20");
        assert_eq!(pipeline.dropped(), refused as u64);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            received.load(Ordering::Relaxed) + refused,
            20,
            "each event received or counted"
        );
    }
}
