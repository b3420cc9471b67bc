//! Backend health for `GET /health`: the registry always, Redis and InfluxDB when configured,
//! and the telemetry store (embedded or InfluxDB) with the depth of its spool.
//! A configured registry or telemetry store is required: if one is down the platform reports
//! itself unavailable (503). Redis is not: without it the platform reports itself degraded.
//! Anyone may ask, but only a platform admin sees the details (addresses, paths, errors, the
//! version): the rest get each backend's status, which is what a load balancer needs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_actors::{TelemetrySpool, TelemetryStore};

use serde::Serialize;

use crate::config::Config;
use crate::storage::RegistryStore;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Up,
    Down,
    NotConfigured,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    pub status: CheckStatus,
    pub required: bool,
    /// What was checked (backend kind and address, passwords masked).
    pub target: Option<String>,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
    /// Check-specific figures (the telemetry spool's depth).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// `ok` when every backend is up, `degraded` when only an optional one (Redis) is down,
    /// `unavailable` (503) when a required one is.
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub checks: std::collections::BTreeMap<&'static str, CheckResult>,
}

impl HealthReport {
    /// Serving: every required backend is up (`ok`, or `degraded` when an optional one is down).
    pub fn healthy(&self) -> bool {
        self.status != "unavailable"
    }

    /// What a caller who is not a platform admin sees.
    pub fn public(&self) -> PublicHealthReport {
        PublicHealthReport {
            status: self.status,
            checks: self
                .checks
                .iter()
                .map(|(name, check)| (*name, PublicCheck { status: check.status }))
                .collect(),
        }
    }
}

/// `GET /health` for anyone but a platform admin: statuses only.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicHealthReport {
    /// `ok` when every backend is up, `degraded` when only an optional one (Redis) is down,
    /// `unavailable` (503) when a required one is.
    pub status: &'static str,
    pub checks: std::collections::BTreeMap<&'static str, PublicCheck>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PublicCheck {
    pub status: CheckStatus,
}

pub struct HealthChecker {
    registry: RegistryStore,
    redis: Option<(redis::Client, String)>,
    influx: Option<(reqwest::Client, String, String)>,
    telemetry: Option<(Arc<dyn TelemetryStore>, Arc<dyn TelemetrySpool>)>,
}

impl HealthChecker {
    pub fn new(config: &Config, registry: RegistryStore) -> HealthChecker {
        let redis_url = config.redis.url.expose();
        let redis = (!redis_url.is_empty())
            .then(|| {
                redis::Client::open(redis_url)
                    .ok()
                    .map(|c| (c, crate::config::mask_url(redis_url)))
            })
            .flatten();
        let influx = (!config.influx.url.is_empty()).then(|| {
            let client = reqwest::Client::builder()
                .timeout(CHECK_TIMEOUT)
                .build()
                .unwrap_or_default();
            (
                client,
                config.influx.url.trim_end_matches('/').to_string(),
                config.influx.token.expose().to_string(),
            )
        });
        HealthChecker {
            registry,
            redis,
            influx,
            telemetry: None,
        }
    }

    /// Adds the telemetry store and its spool to the checks.
    pub fn with_telemetry(mut self, store: Arc<dyn TelemetryStore>, spool: Arc<dyn TelemetrySpool>) -> Self {
        self.telemetry = Some((store, spool));
        self
    }

    pub async fn check(&self, uptime: Duration) -> HealthReport {
        let (registry, mut redis, influx, telemetry) = tokio::join!(
            self.check_registry(),
            self.check_redis(),
            self.check_influx(),
            self.check_telemetry()
        );
        // Without Redis the node keeps serving: shadows come from the registry, a cluster node
        // serves its own devices until Redis returns. Degraded, not down.
        redis.required = false;
        let checks = [
            ("registry", registry),
            ("redis", redis),
            ("influxdb", influx),
            ("telemetry", telemetry),
        ];
        let healthy = checks
            .iter()
            .all(|(_, c)| !c.required || c.status == CheckStatus::Up);
        let whole = checks.iter().all(|(_, c)| c.status != CheckStatus::Down);
        HealthReport {
            status: match (healthy, whole) {
                (false, _) => "unavailable",
                (true, false) => "degraded",
                (true, true) => "ok",
            },
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: uptime.as_secs(),
            checks: checks.into_iter().collect(),
        }
    }

    async fn check_registry(&self) -> CheckResult {
        let target = self.registry.database().description().to_string();
        timed(Some(target), async {
            self.registry.database().ping().await.map_err(|e| e.to_string())
        })
        .await
    }

    async fn check_telemetry(&self) -> CheckResult {
        let Some((store, spool)) = &self.telemetry else {
            return not_configured();
        };
        let info = store.info();
        let mut result = timed(Some(info.target), async {
            store.ping().await.map_err(|e| e.to_string())
        })
        .await;
        result.details = Some(serde_json::json!({ "store": info.kind, "spool": spool.depth() }));
        result
    }

    async fn check_redis(&self) -> CheckResult {
        let Some((client, target)) = &self.redis else {
            return not_configured();
        };
        timed(Some(format!("redis {target}")), async {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
    }

    async fn check_influx(&self) -> CheckResult {
        let Some((client, url, token)) = &self.influx else {
            return not_configured();
        };
        timed(
            Some(format!("influxdb {}", crate::config::mask_url(url))),
            async {
                let mut request = client.get(format!("{url}/ping"));
                if !token.is_empty() {
                    request = request.header("Authorization", format!("Token {token}"));
                }
                let response = request.send().await.map_err(|e| e.to_string())?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("ping answered {}", response.status()))
                }
            },
        )
        .await
    }
}

fn not_configured() -> CheckResult {
    CheckResult {
        status: CheckStatus::NotConfigured,
        required: false,
        target: None,
        latency_ms: None,
        error: None,
        details: None,
    }
}

async fn timed(
    target: Option<String>,
    check: impl std::future::Future<Output = Result<(), String>>,
) -> CheckResult {
    let start = Instant::now();
    let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    };
    let latency_ms = Some((start.elapsed().as_secs_f64() * 1e6).round() / 1e3);
    match outcome {
        Ok(()) => CheckResult {
            status: CheckStatus::Up,
            required: true,
            target,
            latency_ms,
            error: None,
            details: None,
        },
        Err(error) => CheckResult {
            status: CheckStatus::Down,
            required: true,
            target,
            latency_ms,
            error: Some(error),
            details: None,
        },
    }
}
