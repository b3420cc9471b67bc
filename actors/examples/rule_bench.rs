//! Rule evaluation cost: 1,000 rules across 10,000 devices, evaluated on a synthetic stream.
//!
//! `cargo run --release -p drover-actors --example rule_bench`
//!
//! Devices are spread over 100 device types and each rule is scoped to one type, so a message
//! meets the 10 rules of its type (as a fleet with per-type rules does). A fifth of the rules use
//! window statistics, a fifth are duration conditions, one in ten is statistical. Prints messages/s
//! and rule evaluations/s (one rule judged on one message = one evaluation) on one thread.
//!
//! `-- --platform`: instead, the mix `load/compare.sh`'s platform section creates (`drover-load
//! bench analytics --rules 1000`): every rule on every device, a quarter each of `m1 > T`,
//! `seq < 0 || m1 > T`, a 60 s duration of `m1 > T` and `metrics.m1.count > 2 &&
//! metrics.m1.max > T` over a 60 s window (T from 1,000 up: none holds), on messages carrying
//! `seq`, `m0` and `m1` as the load generator sends them.

use std::sync::Arc;
use std::time::Instant;

use drover_actors::pipeline::TelemetryAccepted;
use drover_actors::rules::evaluator::TenantRules;
use drover_actors::rules::script::Sandbox;
use drover_actors::rules::stats::StatsBoard;
use drover_actors::rules::{ConditionSpec, RuleScope, RuleSpec, Severity};
use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};

const RULES: usize = 1_000;
const DEVICES: usize = 10_000;
const TYPES: usize = 100;
/// Messages judged (`-- --messages N` to change).
const MESSAGES: usize = 200_000;

fn platform_specs(tenant: &TenantId) -> Vec<RuleSpec> {
    (0..RULES)
        .map(|n| {
            let threshold = 1000 + n;
            let expression = |e: String| ConditionSpec::Expression { expression: e };
            let condition = match n % 4 {
                0 => expression(format!("m1 > {threshold}")),
                1 => expression(format!("seq < 0 || m1 > {threshold}")),
                2 => ConditionSpec::Duration {
                    expression: format!("m1 > {threshold}"),
                    for_ms: 60_000,
                },
                _ => expression(format!("metrics.m1.count > 2 && metrics.m1.max > {threshold}")),
            };
            RuleSpec {
                id: format!("bench-rule-{n}"),
                tenant: tenant.clone(),
                name: format!("bench-rule-{n}"),
                enabled: true,
                severity: Severity::Minor,
                metric: (n % 4 == 3).then(|| "m1".to_string()),
                window_ms: 60_000,
                condition,
                clear: None,
                scope: RuleScope::All,
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let platform = args.iter().any(|a| a == "--platform");
    let messages = args
        .iter()
        .position(|a| a == "--messages")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(MESSAGES);
    let tenant = TenantId::parse("bench").unwrap();
    let specs: Vec<RuleSpec> = if platform {
        platform_specs(&tenant)
    } else {
        (0..RULES)
            .map(|i| {
                let condition = match i % 10 {
                    0 | 1 => ConditionSpec::Expression {
                        expression: "current > metrics.temperature.avg + 3.0 * metrics.temperature.std"
                            .into(),
                    },
                    2 | 3 => ConditionSpec::Duration {
                        expression: format!("temperature > {}", 30 + i % 7),
                        for_ms: 60_000,
                    },
                    4 => ConditionSpec::Statistical {
                        threshold: None,
                        min_samples: 10,
                    },
                    5 => ConditionSpec::Repeating {
                        expression: "humidity > 80".into(),
                        count: 3,
                        within_ms: 60_000,
                    },
                    _ => ConditionSpec::Expression {
                        expression: format!("temperature > {} && humidity < 90", 30 + i % 11),
                    },
                };
                RuleSpec {
                    id: format!("r{i}"),
                    tenant: tenant.clone(),
                    name: format!("rule {i}"),
                    enabled: true,
                    severity: Severity::Major,
                    metric: Some("temperature".into()),
                    window_ms: 300_000,
                    condition,
                    clear: None,
                    scope: RuleScope::DeviceType(format!("type-{}", i % TYPES)),
                }
            })
            .collect()
    };
    let board = StatsBoard::default();
    let mut rules = TenantRules::new(tenant.clone(), Arc::new(Sandbox::default()), 3.0, board.clone());
    let errors = rules.set_rules(specs, &[]);
    assert!(errors.is_empty(), "{errors:?}");

    let devices: Vec<(DeviceId, std::sync::Arc<str>)> = (0..DEVICES)
        .map(|i| {
            (
                DeviceId::parse(format!("dev-{i}")).unwrap(),
                format!("type-{}", i % TYPES).into(),
            )
        })
        .collect();
    let metadata = Arc::new(serde_json::Map::new());
    let temperature = MetricName::parse("temperature").unwrap();
    let humidity = MetricName::parse("humidity").unwrap();
    let (seq, m0, m1) = (
        MetricName::parse("seq").unwrap(),
        MetricName::parse("m0").unwrap(),
        MetricName::parse("m1").unwrap(),
    );
    let events: Vec<TelemetryAccepted> = (0..messages)
        .map(|n| {
            let (device, device_type) = &devices[n % DEVICES];
            let t = 20.0 + ((n * 7919) % 200) as f64 / 10.0;
            let point = |metric: &MetricName, v: f64| TelemetryPoint {
                tenant: tenant.clone(),
                device: device.clone(),
                device_type: device_type.clone(),
                metric: metric.clone(),
                ts_ms: n as i64,
                value: MetricValue::Number(v),
            };
            TelemetryAccepted {
                tenant: tenant.clone(),
                device: device.clone(),
                device_type: device_type.clone(),
                metadata: metadata.clone(),
                shadow: None,
                points: if platform {
                    // As drover-load sends them: a sequence number per device, values 20-30.
                    let s = (n / DEVICES) as f64;
                    let v = 20.0 + (n / DEVICES % 100) as f64 / 10.0;
                    vec![point(&seq, s), point(&m0, v), point(&m1, v)].into()
                } else {
                    vec![point(&temperature, t), point(&humidity, 50.0 + (n % 40) as f64)].into()
                },
            }
        })
        .collect();

    let started = Instant::now();
    let mut signals = 0usize;
    for (n, event) in events.iter().enumerate() {
        // The platform mix: each device every 200 ms (10,000 devices at 50,000 messages/s), so
        // the 60 s windows fill as they do under compare.sh.
        let now_ms = if platform {
            1_000_000 + n as i64 / 50
        } else {
            1_000_000 + n as i64 * 10
        };
        signals += rules.on_telemetry(event, now_ms).len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let evaluations: u64 = board.lock().unwrap().values().map(|s| s.view().evaluations).sum();
    println!(
        "mix: {}",
        if platform {
            "platform (compare.sh)"
        } else {
            "per device type"
        }
    );
    println!("rules: {RULES}, devices: {DEVICES}, messages: {messages}, alarm signals: {signals}");
    println!("elapsed: {elapsed:.2} s");
    println!("messages/s: {:.0}", messages as f64 / elapsed);
    println!("rule evaluations/s: {:.0}", evaluations as f64 / elapsed);
}
