//! Reads a device's stored numeric series for the analytics endpoints: raw points, or means per
//! bucket so that forecasts and correlations see evenly spaced values.

use drover_actors::telemetry::query::{Aggregation, Bucketing, TelemetryQuery};
use drover_actors::telemetry::store::TelemetryStoreError;
use drover_actors::{DeviceId, MetricName, MetricValue, TelemetryStore, TenantId};

/// One metric of one device over `[start_ms, end_ms)`.
#[derive(Debug, Clone)]
pub struct SeriesRequest {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub metric: MetricName,
    pub start_ms: i64,
    pub end_ms: i64,
    /// `Some`: the mean of each bucket this wide; `None`: raw points.
    pub every_ms: Option<i64>,
    pub limit: usize,
}

/// `(timestamp, value)` pairs, oldest first; values that are not numbers are left out.
pub async fn numeric_series(
    store: &dyn TelemetryStore,
    request: SeriesRequest,
) -> Result<Vec<(i64, f64)>, TelemetryStoreError> {
    let result = store
        .query(TelemetryQuery {
            tenant: request.tenant,
            device: request.device,
            metrics: vec![request.metric],
            start_ms: request.start_ms,
            end_ms: request.end_ms,
            bucketing: request.every_ms.map(|every| Bucketing {
                aggregation: Aggregation::Mean,
                every_ms: Some(every),
            }),
            limit: request.limit,
        })
        .await?;
    Ok(result
        .series
        .into_iter()
        .flat_map(|s| s.samples)
        .filter_map(|s| match s.value {
            MetricValue::Number(v) if v.is_finite() => Some((s.ts_ms, v)),
            _ => None,
        })
        .collect())
}
