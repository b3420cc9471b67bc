//! Analytics over REST (`/api/analytics/…`): anomaly and drift events of the live analytics,
//! their configuration, and on-demand statistics, trend, drift, correlation, forecasts and
//! maintenance estimates over a device's stored telemetry. The maths is
//! `drover_actors::analytics`; heavy work runs on the blocking pool. Every endpoint is scoped
//! to the caller's tenant: another tenant's device answers 404 like a missing one.

use std::collections::HashMap;

use actix_web::{HttpResponse, get, post, put, web};
use chrono::{DateTime, Duration, TimeZone, Utc};
use drover_actors::analytics::AnalyticsError;
use drover_actors::analytics::correlation::{best_lag, pearson, spearman};
use drover_actors::analytics::drift::{DEFAULT_DRIFT_P_VALUE, ks_two_sample};
use drover_actors::analytics::forecast::{self as fc, Direction, Trend};
use drover_actors::analytics::settings::AnalyticsConfig;
use drover_actors::analytics::stats::summarize;
use drover_actors::analytics::trend::{MAX_TREND_VALUES, TrendDirection, mann_kendall};
use drover_actors::telemetry::query as q;
use drover_actors::{DeviceId, MetricName, Role};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::analytics::chart;
use crate::analytics::series::{SeriesRequest, numeric_series};
use crate::analytics::store::{self, ConfigScope, EventFilter, EventRecord};
use crate::http::devices::device_id;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::time_param;
use crate::http::principal::Principal;
use crate::state::AppState;

pub fn routes(cfg: &mut ServiceConfig) {
    // The pictures first: `{deviceId}` alone would also match `sensor-1.svg`.
    cfg.service(forecast_svg)
        .service(anomalies_svg)
        .service(list_anomalies)
        .service(get_tenant_config)
        .service(put_tenant_config)
        .service(get_type_config)
        .service(put_type_config)
        .service(get_device_config)
        .service(put_device_config)
        .service(stats)
        .service(trend)
        .service(drift)
        .service(correlation)
        .service(forecast)
        .service(maintenance)
        .service(fleet_maintenance)
        .service(backtest);
}

/// Most events one request lists.
const MAX_EVENTS: i64 = 10_000;
/// Most values one computation reads.
const MAX_VALUES: usize = 100_000;
/// Most buckets a forecast is fitted on.
const MAX_FORECAST_HISTORY: usize = 5_000;
/// Most steps a forecast looks ahead.
const MAX_HORIZON_STEPS: usize = 2_000;

/// A query string: known keys only, each at most once.
struct Params {
    values: HashMap<String, String>,
}

impl Params {
    fn parse(pairs: &[(String, String)], allowed: &[&str]) -> Result<Params, ApiError> {
        let mut values = HashMap::new();
        for (key, value) in pairs {
            if !allowed.contains(&key.as_str()) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown parameter {key:?}; use {}", allowed.join(", ")),
                ));
            }
            if values.insert(key.clone(), value.clone()).is_some() {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{key}: given twice"),
                ));
            }
        }
        Ok(Params { values })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.trim())
    }

    fn required(&self, key: &str, example: &str) -> Result<&str, ApiError> {
        self.get(key).filter(|v| !v.is_empty()).ok_or_else(|| {
            ApiError::bad_request("invalid_query", format!("{key}: required, e.g. {key}={example}"))
        })
    }

    fn metric(&self) -> Result<MetricName, ApiError> {
        let raw = self.required("metric", "temperature")?;
        MetricName::parse(raw)
            .map_err(|m| ApiError::bad_request("invalid_metric_name", format!("metric: {m}")))
    }

    fn time(&self, key: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.get(key).map(|v| time_param(key, v)).transpose()
    }

    /// `[start, end)`, by default the `default` before now.
    fn range(&self, default: Duration) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
        let end = self.time("end")?.unwrap_or_else(Utc::now);
        let start = self.time("start")?.unwrap_or(end - default);
        if start >= end {
            return Err(ApiError::bad_request(
                "invalid_range",
                format!(
                    "start ({}) must be before end ({})",
                    start.to_rfc3339(),
                    end.to_rfc3339()
                ),
            ));
        }
        Ok((start, end))
    }

    /// A duration: `6h`, `2d`, `30s`, `1w` or plain seconds.
    fn duration_ms(&self, key: &str) -> Result<Option<i64>, ApiError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let ms = match raw.parse::<i64>() {
            Ok(secs) if secs > 0 => secs.checked_mul(1000),
            Ok(_) => None,
            Err(_) => q::parse_every(raw).ok(),
        };
        match ms {
            Some(ms) if (1000..=366 * q::DAY_MS).contains(&ms) => Ok(Some(ms)),
            _ => Err(ApiError::bad_request(
                "invalid_duration",
                format!(
                    "{key}: expected a duration from 1s to 366d such as 30s, 6h, 2d or seconds, got {raw:?}"
                ),
            )),
        }
    }

    fn number(
        &self,
        key: &str,
        valid: impl Fn(f64) -> bool,
        expected: &str,
    ) -> Result<Option<f64>, ApiError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        match raw.parse::<f64>() {
            Ok(v) if v.is_finite() && valid(v) => Ok(Some(v)),
            _ => Err(ApiError::bad_request(
                "invalid_query",
                format!("{key}: expected {expected}, got {raw:?}"),
            )),
        }
    }

    /// A whole number from 1 to `max`.
    fn count(&self, key: &str, max: usize) -> Result<Option<usize>, ApiError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        match raw.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad_request(
                "invalid_query",
                format!("{key}: expected a number from 1 to {max}, got {raw:?}"),
            )),
        }
    }

    fn device(&self, key: &str) -> Result<Option<DeviceId>, ApiError> {
        self.get(key).map(device_id).transpose()
    }
}

/// The device must be in the caller's tenant.
async fn known_device(state: &AppState, principal: &Principal, id: &DeviceId) -> Result<(), ApiError> {
    if state.registry.get_device(&principal.tenant, id).await?.is_none() {
        return Err(ApiError::not_found(format!("device {id} not found")));
    }
    Ok(())
}

fn analytics_error(error: AnalyticsError) -> ApiError {
    match error {
        AnalyticsError::NotEnoughData { .. } => ApiError::bad_request("not_enough_data", error.to_string()),
        AnalyticsError::Model(_) => ApiError::new(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "model_failed",
            error.to_string(),
        ),
        _ => ApiError::bad_request("invalid_query", error.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AnalyticsError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ApiError::internal("analytics task failed"))?
        .map_err(analytics_error)
}

async fn load(
    state: &AppState,
    principal: &Principal,
    device: &DeviceId,
    metric: &MetricName,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    every_ms: Option<i64>,
) -> Result<Vec<(i64, f64)>, ApiError> {
    if let Some(every) = every_ms {
        let buckets = q::bucket_count(start.timestamp_millis(), end.timestamp_millis(), Some(every));
        if buckets as usize > MAX_VALUES {
            return Err(ApiError::bad_request(
                "too_many_points",
                format!("{buckets} buckets; widen the interval or narrow start..end (at most {MAX_VALUES})"),
            ));
        }
    }
    Ok(numeric_series(
        state.telemetry.as_ref(),
        SeriesRequest {
            tenant: principal.tenant.clone(),
            device: device.clone(),
            metric: metric.clone(),
            start_ms: start.timestamp_millis(),
            end_ms: end.timestamp_millis(),
            every_ms,
            limit: MAX_VALUES,
        },
    )
    .await?)
}

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Events

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventList {
    pub events: Vec<EventRecord>,
}

/// Anomaly and drift events of the live analytics, newest first.
#[utoipa::path(
    tag = "analytics",
    params(
        ("device" = Option<String>, Query, description = "Only this device"),
        ("start" = Option<String>, Query, description = "Inclusive start (default: 24 h before end)"),
        ("end" = Option<String>, Query, description = "Exclusive end (default: now)"),
        ("kind" = Option<String>, Query, description = "anomaly or drift"),
        ("limit" = Option<u32>, Query, description = "Most events (default 1000, at most 10000)"),
    ),
    responses((status = 200, body = EventList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/anomalies")]
async fn list_anomalies(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<EventList>, ApiError> {
    principal.require(Role::Viewer, "analytics.anomalies")?;
    let p = Params::parse(&query, &["device", "start", "end", "kind", "limit"])?;
    let device = p.device("device")?;
    let (start, end) = p.range(Duration::days(1))?;
    let kind = match p.get("kind") {
        None => None,
        Some(k @ ("anomaly" | "drift")) => Some(k.to_string()),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("kind: expected anomaly or drift, got {other:?}"),
            ));
        }
    };
    let limit = p.count("limit", MAX_EVENTS as usize)?.unwrap_or(1000) as i64;
    if let Some(device) = &device {
        known_device(&state, &principal, device).await?;
    }
    let events = store::list_events(
        &state.registry,
        &principal.tenant,
        EventFilter {
            device,
            kind,
            start_ms: start.timestamp_millis(),
            end_ms: end.timestamp_millis(),
            limit,
        },
    )
    .await?;
    Ok(web::Json(EventList { events }))
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigView {
    /// `tenant`, `device_type` or `device`.
    pub scope: &'static str,
    /// The device type or device id (absent for the tenant).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// This layer's fields (absent fields come from the layers below).
    #[schema(value_type = Object)]
    pub config: AnalyticsConfig,
    /// What applies with the built-in defaults and the tenant's layer below this one (for a
    /// device type or device, without the other layer).
    #[schema(value_type = Object)]
    pub effective: Value,
}

async fn config_view(
    state: &AppState,
    principal: &Principal,
    scope: ConfigScope,
) -> Result<ConfigView, ApiError> {
    let layer = store::get_config(&state.registry, &principal.tenant, scope.clone())
        .await?
        .unwrap_or_default();
    let tenant = match scope {
        ConfigScope::Tenant => AnalyticsConfig::default(),
        _ => store::get_config(&state.registry, &principal.tenant, ConfigScope::Tenant)
            .await?
            .unwrap_or_default(),
    };
    let defaults = AnalyticsConfig {
        threshold: Some(state.config.rules.anomaly_threshold),
        ..AnalyticsConfig::default()
    };
    let settings = defaults
        .overlay(&tenant)
        .overlay(&layer)
        .resolve()
        .unwrap_or_default();
    let (scope_name, target) = match scope {
        ConfigScope::Tenant => ("tenant", None),
        ConfigScope::DeviceType(t) => ("device_type", Some(t)),
        ConfigScope::Device(d) => ("device", Some(d.into_string())),
    };
    Ok(ConfigView {
        scope: scope_name,
        target,
        config: layer,
        effective: json!({
            "enabled": settings.enabled,
            "metrics": settings.metrics,
            "methods": settings.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "window": settings.window,
            "warmUp": settings.warm_up,
            "threshold": settings.threshold,
            "eifThreshold": settings.eif_threshold,
            "trainingSize": settings.training_size,
            "retrainIntervalSecs": settings.retrain_interval_ms / 1000,
            "trees": settings.trees,
            "seed": settings.seed,
            "forestPer": if settings.shared_forest { "deviceType" } else { "device" },
        }),
    })
}

async fn put_config(
    state: &AppState,
    principal: &Principal,
    scope: ConfigScope,
    body: Value,
) -> Result<ConfigView, ApiError> {
    principal.require(Role::Operator, "analytics.config.put")?;
    let config: AnalyticsConfig = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request("invalid_config", format!("analytics configuration: {e}")))?;
    config.validate().map_err(|e| match e {
        AnalyticsError::InvalidParameter { name, reason } => {
            ApiError::bad_request("invalid_config", format!("{name}: {reason}"))
        }
        other => ApiError::bad_request("invalid_config", other.to_string()),
    })?;
    let stored = (config != AnalyticsConfig::default()).then_some(config);
    store::put_config(&state.registry, &principal.tenant, scope.clone(), stored).await?;
    state.analytics.reload(&principal.tenant);
    config_view(state, principal, scope).await
}

fn type_scope(raw: &str) -> Result<ConfigScope, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 64 || raw.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad_request(
            "invalid_device_type",
            "device type: 1 to 64 printable characters",
        ));
    }
    Ok(ConfigScope::DeviceType(raw.to_string()))
}

/// The tenant's analytics configuration layer and what applies with it.
#[utoipa::path(tag = "analytics", responses((status = 200, body = ConfigView)), security(("bearer" = [])))]
#[get("/analytics/config")]
async fn get_tenant_config(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<ConfigView>, ApiError> {
    principal.require(Role::Viewer, "analytics.config.get")?;
    Ok(web::Json(
        config_view(&state, &principal, ConfigScope::Tenant).await?,
    ))
}

/// Sets the tenant's analytics configuration layer (`{}` clears it): `{"threshold": 3.5,
/// "methods": ["ensemble", "eif", "drift"], "window": 100, "warmUp": 100, "eifThreshold": 0.95,
/// "trainingSize": 500, "retrainIntervalSecs": 21600, "trees": 100, "seed": 7, "metrics": ["temperature"]}`.
#[utoipa::path(tag = "analytics", request_body(content = Object), responses((status = 200, body = ConfigView), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
#[put("/analytics/config")]
async fn put_tenant_config(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<Value>,
) -> Result<web::Json<ConfigView>, ApiError> {
    Ok(web::Json(
        put_config(&state, &principal, ConfigScope::Tenant, body.into_inner()).await?,
    ))
}

/// A device type's analytics configuration layer.
#[utoipa::path(tag = "analytics", params(("type" = String, Path)), responses((status = 200, body = ConfigView)), security(("bearer" = [])))]
#[get("/analytics/config/device-types/{type}")]
async fn get_type_config(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<web::Json<ConfigView>, ApiError> {
    principal.require(Role::Viewer, "analytics.config.get")?;
    Ok(web::Json(
        config_view(&state, &principal, type_scope(&path)?).await?,
    ))
}

/// Sets a device type's analytics configuration layer (`{}` clears it).
#[utoipa::path(tag = "analytics", params(("type" = String, Path)), request_body(content = Object), responses((status = 200, body = ConfigView), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
#[put("/analytics/config/device-types/{type}")]
async fn put_type_config(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> Result<web::Json<ConfigView>, ApiError> {
    let scope = type_scope(&path)?;
    Ok(web::Json(
        put_config(&state, &principal, scope, body.into_inner()).await?,
    ))
}

/// A device's own analytics configuration layer.
#[utoipa::path(tag = "analytics", params(("deviceId" = String, Path)), responses((status = 200, body = ConfigView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
#[get("/analytics/config/devices/{deviceId}")]
async fn get_device_config(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<web::Json<ConfigView>, ApiError> {
    principal.require(Role::Viewer, "analytics.config.get")?;
    let id = device_id(&path)?;
    known_device(&state, &principal, &id).await?;
    Ok(web::Json(
        config_view(&state, &principal, ConfigScope::Device(id)).await?,
    ))
}

/// Sets a device's own analytics configuration layer (`{}` clears it).
#[utoipa::path(tag = "analytics", params(("deviceId" = String, Path)), request_body(content = Object), responses((status = 200, body = ConfigView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
#[put("/analytics/config/devices/{deviceId}")]
async fn put_device_config(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> Result<web::Json<ConfigView>, ApiError> {
    principal.require(Role::Operator, "analytics.config.put")?;
    let id = device_id(&path)?;
    known_device(&state, &principal, &id).await?;
    Ok(web::Json(
        put_config(&state, &principal, ConfigScope::Device(id), body.into_inner()).await?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Statistics, trend, drift

/// Descriptive statistics of one metric over a range.
#[utoipa::path(
    tag = "analytics",
    params(
        ("deviceId" = String, Path),
        ("metric" = String, Query),
        ("start" = Option<String>, Query, description = "Default: 24 h before end"),
        ("end" = Option<String>, Query, description = "Default: now"),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/stats/{deviceId}")]
async fn stats(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.stats")?;
    let id = device_id(&path)?;
    let p = Params::parse(&query, &["metric", "start", "end"])?;
    let metric = p.metric()?;
    let range = p.range(Duration::days(1))?;
    known_device(&state, &principal, &id).await?;
    let values: Vec<f64> = load(&state, &principal, &id, &metric, range, None)
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let s = blocking(move || summarize(&values)).await?;
    Ok(web::Json(json!({
        "deviceId": id.as_str(),
        "metric": metric.as_str(),
        "start": range.0,
        "end": range.1,
        "count": s.count,
        "mean": s.mean,
        "stdDev": s.std_dev,
        "min": s.min,
        "max": s.max,
        "quantiles": s.quantiles.iter().map(|(p, v)| json!({"p": p, "value": v})).collect::<Vec<_>>(),
        "skewness": s.skewness,
        "kurtosis": s.kurtosis,
    })))
}

/// Mann–Kendall trend test with Sen's slope over bucket means (`every`, default so that the
/// range holds at most 500 buckets).
#[utoipa::path(
    tag = "analytics",
    params(
        ("deviceId" = String, Path),
        ("metric" = String, Query),
        ("start" = Option<String>, Query),
        ("end" = Option<String>, Query),
        ("every" = Option<String>, Query, description = "Bucket width (e.g. 1h)"),
        ("alpha" = Option<f64>, Query, description = "Significance level, default 0.05"),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/trend/{deviceId}")]
async fn trend(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.trend")?;
    let id = device_id(&path)?;
    let p = Params::parse(&query, &["metric", "start", "end", "every", "alpha"])?;
    let metric = p.metric()?;
    let range = p.range(Duration::days(7))?;
    let alpha = p
        .number("alpha", |a| a > 0.0 && a < 1.0, "a probability between 0 and 1")?
        .unwrap_or(0.05);
    let span = (range.1 - range.0).num_milliseconds();
    let every = match p.duration_ms("every")? {
        Some(e) => e,
        None => (span / 500).max(1000),
    };
    if span / every > MAX_TREND_VALUES as i64 {
        return Err(ApiError::bad_request(
            "too_many_points",
            format!("at most {MAX_TREND_VALUES} buckets; widen every"),
        ));
    }
    known_device(&state, &principal, &id).await?;
    let values: Vec<f64> = load(&state, &principal, &id, &metric, range, Some(every))
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let t = blocking(move || mann_kendall(&values, alpha)).await?;
    Ok(web::Json(json!({
        "deviceId": id.as_str(),
        "metric": metric.as_str(),
        "every": q::format_every(every),
        "trend": match t.direction {
            TrendDirection::Increasing => "increasing",
            TrendDirection::Decreasing => "decreasing",
            TrendDirection::None => "none",
        },
        "s": t.s,
        "z": t.z,
        "pValue": t.p_value,
        "slopePerBucket": t.slope,
        "slopePerHour": t.slope * 3_600_000.0 / every as f64,
        "intercept": t.intercept,
    })))
}

/// Two-sample Kolmogorov–Smirnov test between a reference window `[start, split)` and a recent
/// one `[split, end)` (`split` defaults to the middle).
#[utoipa::path(
    tag = "analytics",
    params(
        ("deviceId" = String, Path),
        ("metric" = String, Query),
        ("start" = Option<String>, Query),
        ("end" = Option<String>, Query),
        ("split" = Option<String>, Query, description = "Where the recent window starts"),
        ("threshold" = Option<f64>, Query, description = "p-value below which the windows differ, default 0.05"),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/drift/{deviceId}")]
async fn drift(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.drift")?;
    let id = device_id(&path)?;
    let p = Params::parse(&query, &["metric", "start", "end", "split", "threshold"])?;
    let metric = p.metric()?;
    let range = p.range(Duration::days(2))?;
    let split = p.time("split")?.unwrap_or(range.0 + (range.1 - range.0) / 2);
    if split <= range.0 || split >= range.1 {
        return Err(ApiError::bad_request(
            "invalid_range",
            "split must be between start and end",
        ));
    }
    let threshold = p
        .number("threshold", |a| a > 0.0 && a < 1.0, "a p-value between 0 and 1")?
        .unwrap_or(DEFAULT_DRIFT_P_VALUE);
    known_device(&state, &principal, &id).await?;
    let values = load(&state, &principal, &id, &metric, range, None).await?;
    let split_ms = split.timestamp_millis();
    let (reference, recent): (Vec<_>, Vec<_>) = values.iter().partition(|(t, _)| *t < split_ms);
    let reference: Vec<f64> = reference.into_iter().map(|(_, v)| v).collect();
    let recent: Vec<f64> = recent.into_iter().map(|(_, v)| v).collect();
    let (n_ref, n_rec) = (reference.len(), recent.len());
    let ks = blocking(move || ks_two_sample(&reference, &recent, threshold)).await?;
    Ok(web::Json(json!({
        "deviceId": id.as_str(),
        "metric": metric.as_str(),
        "split": split,
        "referenceCount": n_ref,
        "recentCount": n_rec,
        "statistic": ks.statistic,
        "pValue": ks.p_value,
        "threshold": threshold,
        "drifted": ks.drifted,
    })))
}

// ---------------------------------------------------------------------------------------------
// Correlation

/// Pearson and Spearman correlation with p-values, and the lag of best cross-correlation, of
/// two series (`a` and `b`, each `deviceId:metric`) over aligned bucket means.
#[utoipa::path(
    tag = "analytics",
    params(
        ("a" = String, Query, description = "deviceId:metric"),
        ("b" = String, Query, description = "deviceId:metric"),
        ("start" = Option<String>, Query),
        ("end" = Option<String>, Query),
        ("every" = Option<String>, Query, description = "Bucket width, default 1m"),
        ("maxLagSecs" = Option<u64>, Query, description = "Largest lag tried, default 0"),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/correlation")]
async fn correlation(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.correlation")?;
    let p = Params::parse(&query, &["a", "b", "start", "end", "every", "maxLagSecs"])?;
    let parse_series = |key: &str| -> Result<(DeviceId, MetricName), ApiError> {
        let raw = p.required(key, "sensor-1:temperature")?;
        let (device, metric) = raw.split_once(':').ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!("{key}: expected deviceId:metric, got {raw:?}"),
            )
        })?;
        Ok((
            device_id(device)?,
            MetricName::parse(metric)
                .map_err(|m| ApiError::bad_request("invalid_metric_name", format!("{key}: {m}")))?,
        ))
    };
    let (a, b) = (parse_series("a")?, parse_series("b")?);
    let range = p.range(Duration::days(1))?;
    let every = p.duration_ms("every")?.unwrap_or(q::MINUTE_MS);
    let max_lag_secs = p
        .number("maxLagSecs", |v| v >= 0.0 && v.fract() == 0.0, "whole seconds")?
        .unwrap_or(0.0);
    let max_lag = (max_lag_secs * 1000.0 / every as f64).floor() as usize;
    if max_lag > 10_000 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "maxLagSecs: at most 10000 buckets",
        ));
    }
    known_device(&state, &principal, &a.0).await?;
    known_device(&state, &principal, &b.0).await?;
    let xa = load(&state, &principal, &a.0, &a.1, range, Some(every)).await?;
    let xb = load(&state, &principal, &b.0, &b.1, range, Some(every)).await?;
    let fb: HashMap<i64, f64> = xb.into_iter().collect();
    // Aligned: buckets where both have a value.
    let (x, y): (Vec<f64>, Vec<f64>) = xa.iter().filter_map(|(t, v)| fb.get(t).map(|w| (*v, *w))).unzip();
    let n = x.len();
    let (p_r, s_r, lag) = blocking(move || {
        let lag = if max_lag > 0 {
            Some(best_lag(&x, &y, max_lag.min(n / 2))?)
        } else {
            None
        };
        Ok((pearson(&x, &y)?, spearman(&x, &y)?, lag))
    })
    .await?;
    Ok(web::Json(json!({
        "a": format!("{}:{}", a.0, a.1.as_str()),
        "b": format!("{}:{}", b.0, b.1.as_str()),
        "every": q::format_every(every),
        "pairs": n,
        "pearson": {"r": p_r.coefficient, "pValue": p_r.p_value},
        "spearman": {"rho": s_r.coefficient, "pValue": s_r.p_value},
        "bestLag": lag.map(|l| json!({
            "lagSecs": l.lag as i64 * every / 1000,
            "r": l.correlation.coefficient,
            "pValue": l.correlation.p_value,
        })),
    })))
}

// ---------------------------------------------------------------------------------------------
// Forecast and maintenance

struct ForecastInput {
    id: DeviceId,
    metric: MetricName,
    interval_ms: i64,
    steps: usize,
    history: Vec<(i64, f64)>,
    level: f64,
    season: Option<usize>,
}

async fn forecast_input(
    state: &AppState,
    principal: &Principal,
    path: &str,
    p: &Params,
) -> Result<ForecastInput, ApiError> {
    let id = device_id(path)?;
    let metric = p.metric()?;
    let interval_ms = p.duration_ms("interval")?.unwrap_or(q::HOUR_MS);
    let horizon_ms = p.duration_ms("horizon")?.unwrap_or(q::DAY_MS);
    let steps = (horizon_ms / interval_ms).max(1) as usize;
    if steps > MAX_HORIZON_STEPS {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("horizon / interval is {steps} steps; at most {MAX_HORIZON_STEPS}"),
        ));
    }
    let level = p
        .number("level", |l| l > 0.5 && l < 1.0, "a probability between 0.5 and 1")?
        .unwrap_or(fc::DEFAULT_LEVEL);
    let end = p.time("end")?.unwrap_or_else(Utc::now);
    let start = p
        .time("start")?
        .unwrap_or(end - Duration::milliseconds(interval_ms * 500));
    if start >= end {
        return Err(ApiError::bad_request("invalid_range", "start must be before end"));
    }
    if (end - start).num_milliseconds() / interval_ms > MAX_FORECAST_HISTORY as i64 {
        return Err(ApiError::bad_request(
            "too_many_points",
            format!(
                "the history holds more than {MAX_FORECAST_HISTORY} intervals; widen interval or narrow start"
            ),
        ));
    }
    known_device(state, principal, &id).await?;
    let history = load(state, principal, &id, &metric, (start, end), Some(interval_ms)).await?;
    Ok(ForecastInput {
        id,
        metric,
        interval_ms,
        steps,
        history: fill_gaps(&history, interval_ms),
        level,
        season: None,
    })
}

/// Bucket means with empty buckets filled by carrying the last value forward (the models need
/// evenly spaced values); nothing before the first value.
fn fill_gaps(history: &[(i64, f64)], every: i64) -> Vec<(i64, f64)> {
    let mut out: Vec<(i64, f64)> = Vec::with_capacity(history.len());
    for &(t, v) in history {
        if let Some(&(last_t, last_v)) = out.last() {
            let mut next = last_t + every;
            while next < t {
                out.push((next, last_v));
                next += every;
            }
        }
        out.push((t, v));
    }
    out
}

/// Forecast of one metric with prediction intervals (damped-trend exponential smoothing with
/// detected seasonality), and the seasonal-naive baseline beside it.
#[utoipa::path(
    tag = "analytics",
    params(
        ("deviceId" = String, Path),
        ("metric" = String, Query),
        ("horizon" = Option<String>, Query, description = "How far ahead: 6h, 2d or seconds; default 1d"),
        ("interval" = Option<String>, Query, description = "Step: 1h, 15m or seconds; default 1h"),
        ("level" = Option<f64>, Query, description = "Interval coverage, default 0.95"),
        ("start" = Option<String>, Query, description = "History start, default 500 intervals before end"),
        ("end" = Option<String>, Query, description = "History end, default now"),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/forecast/{deviceId}")]
async fn forecast(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.forecast")?;
    let (input, steps) = computed_forecast(&state, &principal, &path, &query).await?;
    let points: Vec<Value> = steps
        .iter()
        .map(|s| json!({"t": time(s.t), "value": s.value, "lower": s.lower, "upper": s.upper, "naive": s.naive}))
        .collect();
    Ok(web::Json(json!({
        "deviceId": input.id.as_str(),
        "metric": input.metric.as_str(),
        "interval": q::format_every(input.interval_ms),
        "level": input.level,
        "model": "ets-damped",
        "seasonSteps": input.season,
        "history": input.history.len(),
        "points": points,
    })))
}

struct ForecastPoint {
    t: i64,
    value: f64,
    lower: f64,
    upper: f64,
    naive: f64,
}

const FORECAST_PARAMS: [&str; 6] = ["metric", "horizon", "interval", "level", "start", "end"];

async fn computed_forecast(
    state: &AppState,
    principal: &Principal,
    path: &str,
    query: &[(String, String)],
) -> Result<(ForecastInput, Vec<ForecastPoint>), ApiError> {
    let p = Params::parse(query, &FORECAST_PARAMS)?;
    let mut input = forecast_input(state, principal, path, &p).await?;
    let values: Vec<f64> = input.history.iter().map(|(_, v)| *v).collect();
    let last_t = input.history.last().map_or(0, |(t, _)| *t);
    let (steps, level) = (input.steps, input.level);
    let (f, naive) = blocking(move || {
        let f = fc::forecast(&values, steps, level, None, Trend::Damped)?;
        let naive = fc::seasonal_naive(&values, f.season.unwrap_or(1), steps)?;
        Ok((f, naive))
    })
    .await?;
    input.season = f.season;
    let points = (0..steps)
        .map(|i| ForecastPoint {
            t: last_t + (i as i64 + 1) * input.interval_ms,
            value: f.point[i],
            lower: f.lower[i],
            upper: f.upper[i],
            naive: naive[i],
        })
        .collect();
    Ok((input, points))
}

/// The forecast as an SVG picture: history, forecast and its interval (same parameters as the
/// JSON forecast).
#[utoipa::path(
    tag = "analytics",
    params(("deviceId" = String, Path), ("metric" = String, Query), ("horizon" = Option<String>, Query), ("interval" = Option<String>, Query)),
    responses((status = 200, content_type = "image/svg+xml", body = String), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/forecast/{deviceId}.svg")]
async fn forecast_svg(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Viewer, "analytics.forecast")?;
    let (input, steps) = computed_forecast(&state, &principal, &path, &query).await?;
    let title = format!("{} · {} forecast", input.id, input.metric.as_str());
    let steps: Vec<chart::ForecastStep> = steps.iter().map(|s| (s.t, s.value, s.lower, s.upper)).collect();
    let svg = chart::forecast_svg(&title, &input.history, &steps).map_err(ApiError::internal)?;
    Ok(svg_response(svg))
}

fn svg_response(svg: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("image/svg+xml")
        .insert_header(("Cache-Control", "no-store"))
        .body(svg)
}

/// A metric over a range with the anomalies raised on it marked (SVG).
#[utoipa::path(
    tag = "analytics",
    params(("deviceId" = String, Path), ("metric" = String, Query), ("start" = Option<String>, Query), ("end" = Option<String>, Query)),
    responses((status = 200, content_type = "image/svg+xml", body = String), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/anomalies/{deviceId}.svg")]
async fn anomalies_svg(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Viewer, "analytics.anomalies")?;
    let id = device_id(&path)?;
    let p = Params::parse(&query, &["metric", "start", "end"])?;
    let metric = p.metric()?;
    let range = p.range(Duration::days(1))?;
    known_device(&state, &principal, &id).await?;
    // About a thousand points: means per bucket over long ranges.
    let span = (range.1 - range.0).num_milliseconds();
    let every = (span / 1000 >= 1000).then_some(span / 1000);
    let series = load(&state, &principal, &id, &metric, range, every).await?;
    let events = store::list_events(
        &state.registry,
        &principal.tenant,
        EventFilter {
            device: Some(id.clone()),
            kind: Some("anomaly".into()),
            start_ms: range.0.timestamp_millis(),
            end_ms: range.1.timestamp_millis(),
            limit: MAX_EVENTS,
        },
    )
    .await?;
    let marks: Vec<(i64, f64)> = events
        .iter()
        .filter(|e| e.metrics.first().is_some_and(|m| m == metric.as_str()))
        .filter_map(|e| Some((e.ts, e.value?)))
        .collect();
    let title = format!("{} · {} anomalies", id, metric.as_str());
    let svg = chart::anomalies_svg(&title, &series, &marks).map_err(ApiError::internal)?;
    Ok(svg_response(svg))
}

/// Estimated time until a metric crosses a limit (`direction=below`: battery reaching 10 %;
/// `above`: vibration exceeding its limit), with the interval of the forecast's level.
#[utoipa::path(
    tag = "analytics",
    params(
        ("deviceId" = String, Path),
        ("metric" = String, Query),
        ("limit" = f64, Query),
        ("direction" = Option<String>, Query, description = "above or below (default below)"),
        ("horizon" = Option<String>, Query, description = "How far to look, default 30d"),
        ("interval" = Option<String>, Query, description = "Step, default 1h"),
        ("level" = Option<f64>, Query),
        ("start" = Option<String>, Query),
        ("end" = Option<String>, Query),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/maintenance/{deviceId}")]
async fn maintenance(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.maintenance")?;
    let p = Params::parse(
        &query,
        &[
            "metric",
            "limit",
            "direction",
            "horizon",
            "interval",
            "level",
            "start",
            "end",
        ],
    )?;
    let limit = p
        .number("limit", |_| true, "a number")?
        .ok_or_else(|| ApiError::bad_request("invalid_query", "limit: required, e.g. limit=10"))?;
    let direction = direction_param(&p)?;
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| k != "limit" && k != "direction")
        .cloned()
        .collect();
    if p.get("horizon").is_none() {
        pairs.push(("horizon".into(), "30d".into()));
    }
    let fp = Params::parse(
        &pairs,
        &["metric", "horizon", "interval", "level", "start", "end"],
    )?;
    let input = forecast_input(&state, &principal, &path, &fp).await?;
    let values: Vec<f64> = input.history.iter().map(|(_, v)| *v).collect();
    let last_t = input.history.last().map_or(0, |(t, _)| *t);
    let (steps, level) = (input.steps, input.level);
    let crossing = blocking(move || {
        // A degrading metric keeps its slope until someone acts: linear, not damped.
        let f = fc::forecast(&values, steps, level, None, Trend::Linear)?;
        Ok(fc::time_to_threshold(&f, limit, direction))
    })
    .await?;
    let at = |step: Option<usize>| step.map(|s| time(last_t + s as i64 * input.interval_ms));
    let secs = |step: Option<usize>| {
        step.map(|s| ((last_t + s as i64 * input.interval_ms) - Utc::now().timestamp_millis()).max(0) / 1000)
    };
    Ok(web::Json(json!({
        "deviceId": input.id.as_str(),
        "metric": input.metric.as_str(),
        "limit": limit,
        "direction": if direction == Direction::Below { "below" } else { "above" },
        "level": level,
        "expectedAt": at(crossing.expected),
        "earliestAt": at(crossing.earliest),
        "latestAt": at(crossing.latest),
        "expectedInSecs": secs(crossing.expected),
        "earliestInSecs": secs(crossing.earliest),
        "latestInSecs": secs(crossing.latest),
        "withinHorizon": crossing.expected.is_some() || crossing.earliest.is_some(),
    })))
}

/// Devices one fleet ranking considers (a page of the tenant's devices in id order; `after`
/// continues).
const MAX_FLEET_DEVICES: u32 = 500;
/// Devices whose history is read and forecast at once during a fleet ranking.
const FLEET_CONCURRENCY: usize = 4;
/// Most devices a fleet ranking returns.
const MAX_FLEET_TOP: usize = 500;

fn direction_param(p: &Params) -> Result<Direction, ApiError> {
    match p.get("direction").unwrap_or("below") {
        "below" => Ok(Direction::Below),
        "above" => Ok(Direction::Above),
        other => Err(ApiError::bad_request(
            "invalid_query",
            format!("direction: expected above or below, got {other:?}"),
        )),
    }
}

/// One device of the fleet ranking.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RankedDevice {
    device_id: String,
    device_type: String,
    last_value: f64,
    /// The last value is already past the limit.
    crossed: bool,
    expected_at: DateTime<Utc>,
    expected_in_secs: i64,
    earliest_in_secs: Option<i64>,
    latest_in_secs: Option<i64>,
}

/// Ranks the tenant's devices by the predicted time until `metric` crosses `limit`, keeping
/// those predicted to cross within `within` (a linear-trend forecast of each device's bucket
/// means, as `/maintenance/{deviceId}`). Bounded: one call considers at most
/// [`MAX_FLEET_DEVICES`] devices (`next` continues with the following ones), reads and fits at
/// most [`FLEET_CONCURRENCY`] at once, fits on the blocking pool.
#[utoipa::path(
    tag = "analytics",
    params(
        ("metric" = String, Query),
        ("limit" = f64, Query, description = "The limit the metric must not cross"),
        ("direction" = Option<String>, Query, description = "below (default) or above"),
        ("within" = Option<String>, Query, description = "Keep devices predicted to cross within this: 7d (default), 12h or seconds"),
        ("interval" = Option<String>, Query, description = "Step of the bucket means the forecasts fit, default 1h"),
        ("type" = Option<String>, Query, description = "Only devices of this type"),
        ("top" = Option<u32>, Query, description = "Most devices returned, default 50, at most 500"),
        ("after" = Option<String>, Query, description = "Continue after this device id (the `next` of the previous answer)"),
    ),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/analytics/maintenance")]
async fn fleet_maintenance(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<Value>, ApiError> {
    principal.require(Role::Viewer, "analytics.maintenance")?;
    let p = Params::parse(
        &query,
        &[
            "metric",
            "limit",
            "direction",
            "within",
            "interval",
            "type",
            "top",
            "after",
        ],
    )?;
    let metric = p.metric()?;
    let limit = p
        .number("limit", |_| true, "a number")?
        .ok_or_else(|| ApiError::bad_request("invalid_query", "limit: required, e.g. limit=10"))?;
    let direction = direction_param(&p)?;
    let within_ms = p.duration_ms("within")?.unwrap_or(7 * q::DAY_MS);
    let interval_ms = p.duration_ms("interval")?.unwrap_or(q::HOUR_MS);
    let steps = (within_ms / interval_ms).max(1) as usize;
    if steps > MAX_HORIZON_STEPS {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("within / interval is {steps} steps; at most {MAX_HORIZON_STEPS}: widen interval"),
        ));
    }
    let top = p.count("top", MAX_FLEET_TOP)?.unwrap_or(50);
    let device_type = p.get("type").filter(|t| !t.is_empty()).map(str::to_string);
    let after = p.get("after").map(device_id).transpose()?;
    let page = state
        .registry
        .list_devices(
            &principal.tenant,
            crate::storage::records::DeviceFilter {
                device_type,
                ..Default::default()
            },
            crate::storage::records::PageRequest {
                after: after.map(|a| a.as_str().to_string()),
                limit: MAX_FLEET_DEVICES,
            },
        )
        .await?;
    let considered = page.items.len();
    let now = Utc::now();
    let end = now;
    let start = end - Duration::milliseconds(interval_ms * 500);
    let state_ref = &state;
    let principal_ref = &principal;
    let metric_ref = &metric;
    use futures_util::StreamExt;
    let outcomes: Vec<Option<RankedDevice>> = futures_util::stream::iter(page.items)
        .map(|record| async move {
            let history = load(
                state_ref,
                principal_ref,
                &record.id,
                metric_ref,
                (start, end),
                Some(interval_ms),
            )
            .await
            .ok()?;
            let history = fill_gaps(&history, interval_ms);
            let &(last_t, last_value) = history.last()?;
            let values: Vec<f64> = history.iter().map(|(_, v)| *v).collect();
            let crossing = blocking(move || {
                let f = fc::forecast(&values, steps, fc::DEFAULT_LEVEL, None, Trend::Linear)?;
                Ok(fc::time_to_threshold(&f, limit, direction))
            })
            .await
            .ok()?;
            let crossed = match direction {
                Direction::Below => last_value <= limit,
                Direction::Above => last_value >= limit,
            };
            let at = |step: usize| last_t + step as i64 * interval_ms;
            let in_secs = |step: usize| ((at(step) - now.timestamp_millis()) / 1000).max(0);
            let expected_ms = if crossed {
                now.timestamp_millis()
            } else {
                at(crossing.expected?)
            };
            if expected_ms - now.timestamp_millis() > within_ms {
                return None;
            }
            Some(RankedDevice {
                device_id: record.id.as_str().to_string(),
                device_type: record.device_type,
                last_value,
                crossed,
                expected_at: time(expected_ms),
                expected_in_secs: ((expected_ms - now.timestamp_millis()) / 1000).max(0),
                earliest_in_secs: if crossed {
                    Some(0)
                } else {
                    crossing.earliest.map(in_secs)
                },
                latest_in_secs: if crossed {
                    Some(0)
                } else {
                    crossing.latest.map(in_secs)
                },
            })
        })
        .buffer_unordered(FLEET_CONCURRENCY)
        .collect()
        .await;
    let mut ranked: Vec<RankedDevice> = outcomes.into_iter().flatten().collect();
    ranked.sort_by(|a, b| {
        a.expected_in_secs
            .cmp(&b.expected_in_secs)
            .then_with(|| a.device_id.cmp(&b.device_id))
    });
    let predicted = ranked.len();
    ranked.truncate(top);
    Ok(web::Json(json!({
        "metric": metric.as_str(),
        "limit": limit,
        "direction": if direction == Direction::Below { "below" } else { "above" },
        "within": q::format_every(within_ms),
        "interval": q::format_every(interval_ms),
        "considered": considered,
        "predicted": predicted,
        "devices": ranked,
        "next": page.next,
    })))
}

// ---------------------------------------------------------------------------------------------
// Backtest

/// Runs the streaming detectors over a device's stored range (the CLI's `analytics score` on
/// stored data): one row per message with its score and flag. Deterministic for a given seed.
#[utoipa::path(
    tag = "analytics",
    request_body(content = Object, description = r#"{"deviceId": "sensor-1", "metrics": ["temperature"], "start": "...", "end": "...", "method": "ensemble", "threshold": 3.0, "seed": 7}"#),
    responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/analytics/backtest")]
async fn backtest(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Viewer, "analytics.backtest")?;
    let request = crate::analytics::backtest::StoredBacktest::from_json(body.into_inner())
        .map_err(|m| ApiError::bad_request("invalid_backtest", m))?;
    let id = request.device.clone();
    known_device(&state, &principal, &id).await?;
    let mut columns = Vec::new();
    for metric in &request.metrics {
        columns.push(
            load(
                &state,
                &principal,
                &id,
                metric,
                (request.start, request.end),
                None,
            )
            .await?,
        );
    }
    let result = blocking(move || request.run(&columns)).await?;
    Ok(HttpResponse::Ok().json(result))
}
