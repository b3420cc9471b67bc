//! Audit events that are not part of a registry change (refused credentials, forbidden
//! actions) are written off the request path through a bounded queue: a flood of bad requests
//! cannot slow the API down or grow memory, and what is dropped is counted in `/metrics`.
//! Changes themselves are audited inside their own transaction (see `storage::registry`).
//!
//! Nobody has to authenticate to be refused, so refusals must not be able to fill the disk:
//! the client-supplied strings of an event are clipped before it is queued, and repeated
//! refusals of one kind from one source within [`AGGREGATION_WINDOW`] become one row whose
//! `occurrences` counts them. The log's age is bounded by [`AuditRetention`], which the
//! maintenance pass runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use drover_actors::downsampler::Housekeeping;
use prometheus::IntCounter;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use crate::logging::clip;
use crate::storage::RegistryStore;
use crate::storage::records::{AuditEvent, AuditOutcome};

const QUEUE: usize = 1024;

/// Refusals of one kind from one source within this window share one audit row.
pub const AGGREGATION_WINDOW: Duration = Duration::from_secs(60);

/// How often the counts of repeated refusals are added to their rows.
const COUNT_FLUSH: Duration = Duration::from_secs(1);

/// Sources × kinds followed in one window. Past it, refusals from further sources are counted
/// on one row per kind with no source (many sources at once is what that row then says).
const MAX_TRACKED: usize = 10_000;

/// Distinct sources of one kind of refusal (action and reason) given rows of their own in one
/// window; refusals of that kind from further sources share the kind's sourceless row. This
/// bounds the rows a window gets per kind however many addresses a flood comes from.
pub const SOURCES_PER_KIND: usize = 100;

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    dropped: IntCounter,
}

/// The task writing queued events; `finish` drains what is queued and waits for it.
pub struct AuditWriter {
    task: tokio::task::JoinHandle<()>,
    shutdown: Arc<Notify>,
}

impl AuditSink {
    /// Starts the writer task on the current runtime.
    pub fn start(registry: RegistryStore, dropped: IntCounter) -> (AuditSink, AuditWriter) {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let mut aggregator = Aggregator::new(AGGREGATION_WINDOW, MAX_TRACKED, Instant::now())
                .with_sources_per_kind(SOURCES_PER_KIND);
            let mut flush = tokio::time::interval(COUNT_FLUSH);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(event) => write(&registry, &mut aggregator, event).await,
                        None => break,
                    },
                    _ = flush.tick() => flush_counts(&registry, &mut aggregator).await,
                    _ = stop.notified() => {
                        while let Ok(event) = rx.try_recv() {
                            write(&registry, &mut aggregator, event).await;
                        }
                        break;
                    }
                }
            }
            flush_counts(&registry, &mut aggregator).await;
        });
        (AuditSink { tx, dropped }, AuditWriter { task, shutdown })
    }

    /// Queues an event (its client-supplied strings clipped); drops and counts it when the
    /// queue is full.
    pub fn submit(&self, event: AuditEvent) {
        if self.tx.try_send(clipped(event)).is_err() {
            self.dropped.inc();
        }
    }
}

impl AuditWriter {
    /// Writes what is queued, then stops (waits at most `timeout`).
    pub async fn finish(self, timeout: Duration) {
        self.shutdown.notify_one();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!("audit writer did not finish in time; some denial records may be missing");
        }
    }
}

async fn write(registry: &RegistryStore, aggregator: &mut Aggregator, event: AuditEvent) {
    let key = match aggregator.admit(&event, Instant::now()) {
        Admission::Counted => return,
        Admission::Write => None,
        Admission::WriteFirst(key) => Some(key),
    };
    match registry.record(event).await {
        Ok(row) => {
            if let Some(key) = key {
                aggregator.written(key, row);
            }
        }
        Err(error) => {
            if let Some(key) = key {
                aggregator.forget(&key);
            }
            tracing::warn!(%error, "could not write an audit record");
        }
    }
}

async fn flush_counts(registry: &RegistryStore, aggregator: &mut Aggregator) {
    let counts = aggregator.take_counts(Instant::now());
    if counts.is_empty() {
        return;
    }
    if let Err(error) = registry.add_audit_occurrences(counts).await {
        tracing::warn!(%error, "could not count repeated refusals in the audit log");
    }
}

/// The event with its client-supplied strings (actor, target, strings in the detail) clipped.
fn clipped(mut event: AuditEvent) -> AuditEvent {
    fn clip_json(value: &mut Value) {
        match value {
            Value::String(s) => {
                let short = clip(s).to_string();
                *s = short;
            }
            Value::Array(items) => items.iter_mut().for_each(clip_json),
            Value::Object(map) => map.values_mut().for_each(clip_json),
            _ => {}
        }
    }
    event.actor.actor = clip(&event.actor.actor).to_string();
    event.target = event.target.map(|t| clip(&t).to_string());
    if let Some(detail) = event.detail.as_mut() {
        clip_json(detail);
    }
    event
}

/// What makes two refusals "the same kind from the same source".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AggregationKey {
    tenant: Option<String>,
    /// Only for callers tied to a tenant: an unidentified caller's name is its own claim, and
    /// varying it must not make each refusal a row of its own.
    actor: Option<String>,
    action: String,
    source_ip: Option<String>,
    reason: String,
}

impl AggregationKey {
    fn of(event: &AuditEvent) -> AggregationKey {
        let reason = match &event.detail {
            Some(detail) => match detail.get("reason").or_else(|| detail.get("code")) {
                Some(Value::String(reason)) => reason.clone(),
                _ => detail.to_string(),
            },
            None => String::new(),
        };
        let tenant = event.actor.tenant.as_ref().map(|t| t.as_str().to_string());
        AggregationKey {
            actor: tenant.is_some().then(|| event.actor.actor.clone()),
            tenant,
            action: event.action.clone(),
            source_ip: event.actor.source_ip.clone(),
            reason,
        }
    }
}

/// What to do with an event.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    /// Write it as a row of its own (not a refusal).
    Write,
    /// Write it: the first refusal of its kind from its source in this window. Report the row
    /// with [`Aggregator::written`].
    WriteFirst(AggregationKey),
    /// Counted on the row of the first one.
    Counted,
}

/// The row of one kind of refusal in the current window and what is not yet added to it.
struct Slot {
    row: Option<i64>,
    unwritten: u64,
}

/// Decides which refusals get a row and counts the rest (pure: no I/O, time passed in).
struct Aggregator {
    window: Duration,
    max_tracked: usize,
    window_started: Instant,
    slots: HashMap<AggregationKey, Slot>,
    sources_per_kind: usize,
    /// Slots with a source in this window, per action and reason.
    sources: HashMap<(String, String), usize>,
}

impl Aggregator {
    fn new(window: Duration, max_tracked: usize, now: Instant) -> Aggregator {
        Aggregator {
            window,
            max_tracked,
            window_started: now,
            slots: HashMap::new(),
            sources_per_kind: usize::MAX,
            sources: HashMap::new(),
        }
    }

    fn with_sources_per_kind(mut self, limit: usize) -> Aggregator {
        self.sources_per_kind = limit;
        self
    }

    fn kind(key: &AggregationKey) -> (String, String) {
        (key.action.clone(), key.reason.clone())
    }

    fn admit(&mut self, event: &AuditEvent, now: Instant) -> Admission {
        if event.outcome != AuditOutcome::Denied {
            return Admission::Write;
        }
        self.roll(now);
        let mut key = AggregationKey::of(event);
        if !self.slots.contains_key(&key) {
            let kind_sources = self.sources.get(&Self::kind(&key)).copied().unwrap_or(0);
            if self.slots.len() >= self.max_tracked || kind_sources >= self.sources_per_kind {
                key.source_ip = None;
                key.actor = None;
                key.tenant = None;
            }
        }
        match self.slots.get_mut(&key) {
            Some(slot) => {
                slot.unwritten += 1;
                Admission::Counted
            }
            None => {
                if key.source_ip.is_some() {
                    *self.sources.entry(Self::kind(&key)).or_default() += 1;
                }
                self.slots.insert(
                    key.clone(),
                    Slot {
                        row: None,
                        unwritten: 0,
                    },
                );
                Admission::WriteFirst(key)
            }
        }
    }

    /// The first refusal of `key` was written as `row`.
    fn written(&mut self, key: AggregationKey, row: i64) {
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.row = Some(row);
        }
    }

    /// Writing the first refusal of `key` failed: the next one tries again.
    fn forget(&mut self, key: &AggregationKey) {
        if self.slots.remove(key).is_some()
            && key.source_ip.is_some()
            && let Some(count) = self.sources.get_mut(&Self::kind(key))
        {
            *count = count.saturating_sub(1);
        }
    }

    /// Counts to add, per row; starts a new window once this one has passed.
    fn take_counts(&mut self, now: Instant) -> Vec<(i64, u64)> {
        let counts = self
            .slots
            .values_mut()
            .filter(|slot| slot.unwritten > 0)
            .filter_map(|slot| Some((slot.row?, std::mem::take(&mut slot.unwritten))))
            .collect();
        self.roll(now);
        counts
    }

    /// Forgets the rows of a window that has passed, once their counts are taken. Counts not
    /// taken yet keep the window open until they are (the next flush).
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window_started) < self.window {
            return;
        }
        if self
            .slots
            .values()
            .any(|slot| slot.unwritten > 0 && slot.row.is_some())
        {
            return;
        }
        self.slots.clear();
        self.sources.clear();
        self.window_started = now;
    }
}

/// Deletes audit entries older than the retention; run by the maintenance pass.
pub struct AuditRetention {
    registry: RegistryStore,
    days: u32,
}

impl AuditRetention {
    pub fn new(registry: RegistryStore, days: u32) -> AuditRetention {
        AuditRetention { registry, days }
    }
}

#[async_trait]
impl Housekeeping for AuditRetention {
    fn name(&self) -> &'static str {
        "audit_retention"
    }

    async fn run(&self, now_ms: i64) -> Result<u64, String> {
        let cutoff_ms = now_ms - i64::from(self.days) * 86_400_000;
        self.registry
            .prune_audit(cutoff_ms)
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use drover_actors::TenantId;
    use serde_json::json;

    use super::*;
    use crate::storage::records::AuditActor;

    fn refusal(actor: &str, source: &str, reason: &str) -> AuditEvent {
        AuditEvent {
            actor: AuditActor {
                tenant: None,
                actor: actor.into(),
                source_ip: Some(source.into()),
            },
            action: "mqtt.connect".into(),
            target: None,
            outcome: AuditOutcome::Denied,
            detail: Some(json!({ "reason": reason })),
        }
    }

    fn first(admission: Admission) -> AggregationKey {
        match admission {
            Admission::WriteFirst(key) => key,
            other => panic!("expected a first refusal, got {other:?}"),
        }
    }

    #[test]
    fn repeated_refusals_from_one_source_share_a_row_per_window() {
        let start = Instant::now();
        let window = Duration::from_secs(60);
        let mut agg = Aggregator::new(window, 100, start);
        let key = first(agg.admit(&refusal("mqtt:a", "10.0.0.1", "unknown_token"), start));
        agg.written(key, 7);
        // Another client id from the same source and for the same reason: counted.
        for i in 0..5 {
            let event = refusal(&format!("mqtt:x{i}"), "10.0.0.1", "unknown_token");
            assert_eq!(agg.admit(&event, start), Admission::Counted);
        }
        // Another reason, another source: rows of their own.
        first(agg.admit(&refusal("mqtt:a", "10.0.0.1", "client_id"), start));
        first(agg.admit(&refusal("mqtt:a", "10.0.0.2", "unknown_token"), start));
        assert_eq!(agg.take_counts(start), vec![(7, 5)]);
        assert_eq!(agg.take_counts(start), vec![]);
        // The next window starts a new row.
        let later = start + window;
        first(agg.admit(&refusal("mqtt:a", "10.0.0.1", "unknown_token"), later));
    }

    #[test]
    fn identified_callers_are_told_apart_and_successes_never_aggregated() {
        let now = Instant::now();
        let mut agg = Aggregator::new(Duration::from_secs(60), 100, now);
        let of = |actor: &str| AuditEvent {
            actor: AuditActor {
                tenant: Some(TenantId::parse("acme").unwrap()),
                actor: actor.into(),
                source_ip: Some("10.0.0.1".into()),
            },
            ..refusal("", "", "role")
        };
        first(agg.admit(&of("user:alice"), now));
        first(agg.admit(&of("user:bob"), now));
        assert_eq!(agg.admit(&of("user:bob"), now), Admission::Counted);
        let ok = AuditEvent {
            outcome: AuditOutcome::Ok,
            ..of("user:bob")
        };
        assert_eq!(agg.admit(&ok, now), Admission::Write);
        assert_eq!(agg.admit(&ok, now), Admission::Write);
    }

    #[test]
    fn past_the_tracked_sources_refusals_share_one_row_per_kind() {
        let now = Instant::now();
        let mut agg = Aggregator::new(Duration::from_secs(60), 2, now);
        first(agg.admit(&refusal("a", "10.0.0.1", "r"), now));
        first(agg.admit(&refusal("a", "10.0.0.2", "r"), now));
        let overflow = first(agg.admit(&refusal("a", "10.0.0.3", "r"), now));
        assert_eq!(overflow.source_ip, None);
        agg.written(overflow, 3);
        assert_eq!(agg.admit(&refusal("a", "10.0.0.4", "r"), now), Admission::Counted);
        assert_eq!(agg.take_counts(now), vec![(3, 1)]);
    }

    #[test]
    fn past_the_sources_of_one_kind_its_refusals_share_one_row() {
        let now = Instant::now();
        let mut agg = Aggregator::new(Duration::from_secs(60), 100, now).with_sources_per_kind(2);
        first(agg.admit(&refusal("a", "10.0.0.1", "r"), now));
        first(agg.admit(&refusal("a", "10.0.0.2", "r"), now));
        let overflow = first(agg.admit(&refusal("a", "10.0.0.3", "r"), now));
        assert_eq!(overflow.source_ip, None);
        agg.written(overflow, 3);
        assert_eq!(agg.admit(&refusal("a", "10.0.0.4", "r"), now), Admission::Counted);
        // Another reason has sources of its own.
        let other = first(agg.admit(&refusal("a", "10.0.0.5", "s"), now));
        assert_eq!(other.source_ip.as_deref(), Some("10.0.0.5"));
    }

    #[test]
    fn a_failed_first_write_is_retried_and_unwritten_counts_keep_their_window() {
        let start = Instant::now();
        let window = Duration::from_secs(60);
        let mut agg = Aggregator::new(window, 100, start);
        let key = first(agg.admit(&refusal("a", "10.0.0.1", "r"), start));
        agg.forget(&key);
        let key = first(agg.admit(&refusal("a", "10.0.0.1", "r"), start));
        agg.written(key, 1);
        assert_eq!(
            agg.admit(&refusal("a", "10.0.0.1", "r"), start),
            Admission::Counted
        );
        // The window passes before the count is written: it is still added to its row.
        assert_eq!(agg.take_counts(start + window), vec![(1, 1)]);
        first(agg.admit(&refusal("a", "10.0.0.1", "r"), start + window));
    }

    #[test]
    fn client_strings_are_clipped_before_queueing() {
        let long = "x".repeat(60_000);
        let mut event = refusal(&format!("mqtt:{long}"), "10.0.0.1", "r");
        event.target = Some(long.clone());
        event.detail = Some(json!({ "reason": "r", "topics": [long.clone()] }));
        let event = clipped(event);
        assert!(event.actor.actor.len() < 400, "{}", event.actor.actor.len());
        assert!(event.actor.actor.ends_with("bytes)"));
        assert!(event.target.unwrap().len() < 400);
        assert!(event.detail.unwrap().to_string().len() < 500);
    }
}
