//! Ingestion with many active rules: creates `rules` rules in the tenant (a mix of threshold,
//! window-statistics and duration conditions over the ingest scenario's metrics, set so they
//! rarely fire), runs the ingest scenario, and adds the server's rule figures to its report.

use serde_json::json;

use super::ingest::{self, IngestOptions};
use super::report::Report;
use crate::api::{Api, DeviceCredentials};

/// Creates the benchmark's rules (named `bench-rule-N`); existing ones are left as they are.
pub(super) async fn create_rules(api: &Api, count: u32) -> anyhow::Result<u32> {
    let mut created = 0;
    for n in 0..count {
        let threshold = 1000 + n;
        let condition = match n % 4 {
            0 => json!(format!("m1 > {threshold}")),
            1 => json!(format!("seq < 0 || m1 > {threshold}")),
            2 => json!({"type": "duration", "expression": format!("m1 > {threshold}"), "forSecs": 60}),
            _ => json!(format!("metrics.m1.count > 2 && metrics.m1.max > {threshold}")),
        };
        let mut body = json!({
            "name": format!("bench-rule-{n}"),
            "severity": "minor",
            "condition": condition,
            "actions": [],
        });
        if n % 4 == 3 {
            body["metric"] = json!("m1");
            body["windowSecs"] = json!(60);
        }
        if api.post("/api/rules", &body).await?.0.is_success() {
            created += 1;
        }
    }
    Ok(created)
}

pub async fn run(
    api: &Api,
    devices: Vec<DeviceCredentials>,
    rules: u32,
    o: IngestOptions,
) -> anyhow::Result<Report> {
    let created = create_rules(api, rules).await?;
    let evaluations_before = api.metric("drover_rule_evaluations_total").await.unwrap_or(0.0);
    let dropped_before = api
        .metric("drover_rule_events_dropped_total")
        .await
        .unwrap_or(0.0);
    let started = std::time::Instant::now();
    let mut report = ingest::run(
        api,
        devices,
        IngestOptions {
            metrics: o.metrics.max(2),
            ..o
        },
    )
    .await?;
    // Rule evaluation trails ingestion; give it a moment to finish what was accepted.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let evaluations = api.metric("drover_rule_evaluations_total").await.unwrap_or(0.0) - evaluations_before;
    let dropped = api
        .metric("drover_rule_events_dropped_total")
        .await
        .unwrap_or(0.0)
        - dropped_before;
    report.scenario = "rules".into();
    report.parameters["rules"] = json!(rules);
    report.set("rules_created", created);
    report.set("rule_evaluations", evaluations);
    report.set(
        "rule_evaluations_per_second",
        evaluations / started.elapsed().as_secs_f64(),
    );
    report.set("rule_events_dropped", dropped);
    Ok(report)
}
