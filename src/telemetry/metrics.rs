//! Telemetry figures for `/metrics`: points written and failed writes (counted by wrapping the
//! store, so every writer is counted the same way), what the batching writers did with points
//! (committed, spooled, refused, dropped) and the spool's depth (read at scrape time).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use drover_actors::telemetry::query::{QueryResult, TelemetryQuery};
use drover_actors::telemetry::store::{
    MaintenanceReport, PointBatch, StoreInfo, TelemetrySpool, TelemetryStore, TelemetryStoreError,
};
use drover_actors::telemetry_writer::{WriterCounters, WriterPool};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::Metrics;

/// A store that counts what goes through it.
pub struct MeteredStore {
    inner: Arc<dyn TelemetryStore>,
    points_written: IntCounter,
    batches_written: IntCounter,
    write_errors: IntCounterVec,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn TelemetryStore>, metrics: &Metrics) -> MeteredStore {
        let points_written = IntCounter::new(
            "drover_telemetry_points_written_total",
            "Telemetry points committed to the store",
        )
        .expect("valid metric");
        let batches_written = IntCounter::new(
            "drover_telemetry_batches_written_total",
            "Telemetry batches committed to the store",
        )
        .expect("valid metric");
        let write_errors = IntCounterVec::new(
            Opts::new(
                "drover_telemetry_write_errors_total",
                "Failed telemetry batch writes by kind (retryable: store unavailable; rejected: refused for good)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        metrics.register(Box::new(points_written.clone()));
        metrics.register(Box::new(batches_written.clone()));
        metrics.register(Box::new(write_errors.clone()));
        MeteredStore {
            inner,
            points_written,
            batches_written,
            write_errors,
        }
    }
}

#[async_trait]
impl TelemetryStore for MeteredStore {
    fn info(&self) -> StoreInfo {
        self.inner.info()
    }

    async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError> {
        let points = batch.len() as u64;
        let result = self.inner.write(batch).await;
        match &result {
            Ok(()) => {
                self.points_written.inc_by(points);
                self.batches_written.inc();
            }
            Err(error) => {
                let kind = if error.is_retryable() {
                    "retryable"
                } else {
                    "rejected"
                };
                self.write_errors.with_label_values(&[kind]).inc();
            }
        }
        result
    }

    async fn query(&self, query: TelemetryQuery) -> Result<QueryResult, TelemetryStoreError> {
        self.inner.query(query).await
    }

    async fn ping(&self) -> Result<(), TelemetryStoreError> {
        self.inner.ping().await
    }

    async fn maintain(&self, now_ms: i64) -> Result<MaintenanceReport, TelemetryStoreError> {
        self.inner.maintain(now_ms).await
    }
}

/// Reports the spool's depth whenever `/metrics` is scraped.
struct SpoolCollector {
    spool: Arc<dyn TelemetrySpool>,
    batches: IntGauge,
    points: IntGauge,
    bytes: IntGauge,
    set_aside: IntGauge,
    descs: Vec<Desc>,
}

impl Collector for SpoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let depth = self.spool.depth();
        self.batches.set(depth.batches as i64);
        self.points.set(depth.points as i64);
        self.bytes.set(depth.bytes as i64);
        self.set_aside.set(depth.set_aside as i64);
        [&self.batches, &self.points, &self.bytes, &self.set_aside]
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

pub fn register_spool(metrics: &Metrics, spool: Arc<dyn TelemetrySpool>) {
    let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
    let batches = gauge(
        "drover_telemetry_spool_batches",
        "Batches waiting in the local spool for the store",
    );
    let points = gauge(
        "drover_telemetry_spool_points",
        "Points waiting in the local spool for the store",
    );
    let bytes = gauge("drover_telemetry_spool_bytes", "Bytes used by the local spool");
    let set_aside = gauge(
        "drover_telemetry_spool_set_aside",
        "Spooled batches set aside (damaged, or refused by the store)",
    );
    let descs = [&batches, &points, &bytes, &set_aside]
        .into_iter()
        .flat_map(|g| g.desc().into_iter().cloned())
        .collect();
    metrics.register(Box::new(SpoolCollector {
        spool,
        batches,
        points,
        bytes,
        set_aside,
        descs,
    }));
}

/// Reports what the batching writers did, read from their shared counters at scrape time.
struct WriterCollector {
    counters: Arc<WriterCounters>,
    spooling: Arc<std::sync::atomic::AtomicBool>,
    points: IntCounterVec,
    retries: IntCounter,
    spooling_gauge: IntGauge,
    descs: Vec<Desc>,
}

impl Collector for WriterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = &self.counters;
        for (outcome, value) in [
            ("committed", &c.points_committed),
            ("spooled", &c.points_spooled),
            ("refused", &c.points_refused),
            ("dropped", &c.points_dropped),
            ("failed", &c.points_failed),
        ] {
            let counter = self.points.with_label_values(&[outcome]);
            let now = value.load(Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        let retries = c.write_retries.load(Ordering::Relaxed);
        self.retries.inc_by(retries.saturating_sub(self.retries.get()));
        self.spooling_gauge
            .set(self.spooling.load(Ordering::Acquire) as i64);
        let mut out = self.points.collect();
        out.extend(self.retries.collect());
        out.extend(self.spooling_gauge.collect());
        out
    }
}

/// Registers the writers' figures: points by outcome (committed to the store, spooled while
/// it was away, refused as invalid or with 503, dropped at QoS 0, failed), write retries, and whether new
/// batches currently go to the spool.
pub fn register_writers(metrics: &Metrics, writers: &WriterPool) {
    let points = IntCounterVec::new(
        Opts::new(
            "drover_telemetry_ingested_points_total",
            "Telemetry points by what the batching writers did with them (committed, spooled, refused, dropped, failed)",
        ),
        &["outcome"],
    )
    .expect("valid metric");
    let retries = IntCounter::new(
        "drover_telemetry_write_retries_total",
        "Batch writes retried after a transient store error",
    )
    .expect("valid metric");
    let spooling_gauge = IntGauge::new(
        "drover_telemetry_spooling",
        "1 while new batches go to the local spool (store unreachable or spool being replayed)",
    )
    .expect("valid metric");
    let descs = points
        .desc()
        .into_iter()
        .chain(retries.desc())
        .chain(spooling_gauge.desc())
        .cloned()
        .collect();
    metrics.register(Box::new(WriterCollector {
        counters: writers.counters.clone(),
        spooling: writers.spooling_flag(),
        points,
        retries,
        spooling_gauge,
        descs,
    }));
}
