//! Prometheus metrics: one registry per server, rendered by `GET /metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub auth_failures: IntCounterVec,
    pub audit_dropped: IntCounter,
    pub devices_registered: IntGauge,
    pub devices_connected: IntGauge,
    pub tenants: IntGauge,
    pub uptime_seconds: IntGauge,
    /// Live heap bytes (the `drover` binary's counting allocator; absent in embedded use).
    pub heap_allocated_bytes: IntGauge,
    /// Shadow updates by outcome (`accepted`, `rejected`) and rejection code.
    pub shadow_updates: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "drover_http_requests_total",
                "HTTP requests by method, route and status",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "drover_http_request_duration_seconds",
                "HTTP request latency by method and route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["method", "route"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "drover_auth_failures_total",
                "Refused credentials by kind (login, token, api_key, forbidden)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let audit_dropped = IntCounter::new(
            "drover_audit_events_dropped_total",
            "Audit events of refused requests dropped because the audit queue was full",
        )
        .expect("valid metric");
        let devices_registered =
            IntGauge::new("drover_devices_registered", "Registered devices (all tenants)")
                .expect("valid metric");
        let devices_connected = IntGauge::new("drover_devices_connected", "Connected devices (all tenants)")
            .expect("valid metric");
        let tenants = IntGauge::new("drover_tenants", "Tenants").expect("valid metric");
        let uptime_seconds =
            IntGauge::new("drover_uptime_seconds", "Seconds since the server started").expect("valid metric");
        let heap_allocated_bytes = IntGauge::new(
            "drover_heap_allocated_bytes",
            "Heap bytes allocated and not freed (process_resident_memory_bytes also holds what the allocator keeps for reuse)",
        )
        .expect("valid metric");
        let shadow_updates = IntCounterVec::new(
            Opts::new(
                "drover_shadow_updates_total",
                "Device shadow updates (MQTT and HTTP) by outcome and rejection code",
            ),
            &["outcome", "code"],
        )
        .expect("valid metric");
        let build = IntGauge::with_opts(
            Opts::new("drover_build_info", "Build information")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("valid metric");
        build.set(1);

        for collector in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(auth_failures.clone()),
            Box::new(audit_dropped.clone()),
            Box::new(devices_registered.clone()),
            Box::new(devices_connected.clone()),
            Box::new(tenants.clone()),
            Box::new(uptime_seconds.clone()),
            Box::new(heap_allocated_bytes.clone()),
            Box::new(shadow_updates.clone()),
            Box::new(build),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(collector).expect("metric registered once");
        }
        Metrics {
            registry,
            http_requests,
            http_duration,
            auth_failures,
            audit_dropped,
            devices_registered,
            devices_connected,
            tenants,
            uptime_seconds,
            heap_allocated_bytes,
            shadow_updates,
        }
    }

    /// Registers a collector owned by another part of the server.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(error) = self.registry.register(collector) {
            tracing::error!(%error, "metric registered twice");
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::with_capacity(16 * 1024);
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// The `method` label of an HTTP request: the standard methods by name, anything else `other`.
/// Labels must come from a closed set: a client inventing methods would otherwise add a time
/// series per request and grow `/metrics` (and memory) without bound.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Counts device actors' shadow updates in `drover_shadow_updates_total`.
pub struct ShadowUpdateCounter(pub IntCounterVec);

impl drover_actors::outbound::ShadowMetrics for ShadowUpdateCounter {
    fn update_accepted(&self) {
        self.0.with_label_values(&["accepted", ""]).inc();
    }

    fn update_rejected(&self, code: &'static str) {
        self.0.with_label_values(&["rejected", code]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::Method;

    use super::method_label;

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        for custom in ["FOO", "get", "PROPFIND"] {
            assert_eq!(
                method_label(&Method::from_bytes(custom.as_bytes()).unwrap()),
                "other"
            );
        }
    }
}
