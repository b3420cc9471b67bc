//! Telemetry queries: `GET /api/telemetry/{deviceId}` returns raw points or per-bucket
//! aggregates of one device's metrics, read from the telemetry store (and its rollups).

use actix_web::http::header::ContentType;
use actix_web::{HttpResponse, get, web};
use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use drover_actors::Role;
use drover_actors::telemetry::query::{
    self as q, Aggregation, Bucketing, DAY_MS, HOUR_MS, MINUTE_MS, QueryResult, Sample, SeriesData,
    TelemetryQuery,
};
use drover_actors::telemetry::store::TelemetryStoreError;
use drover_actors::telemetry::{MetricName, MetricValue};
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::devices::device_id;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::time_param;
use crate::http::principal::Principal;
use crate::state::AppState;

/// Metrics one query may name.
pub const MAX_METRICS_PER_QUERY: usize = 50;
/// The range when `start` is not given: this long before `end`.
const DEFAULT_RANGE_MS: i64 = DAY_MS;

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(query_telemetry);
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryResponse {
    pub device_id: String,
    /// Inclusive start of the range.
    pub start: DateTime<Utc>,
    /// Exclusive end of the range.
    pub end: DateTime<Utc>,
    /// The aggregation, or null for raw points.
    pub agg: Option<String>,
    /// The bucket width (`1m`, `1h`…), or null for raw points or one bucket over the range.
    pub every: Option<String>,
    /// What answered: `raw`, `rollup_1m` or `rollup_1h` (edges and the latest minutes of a
    /// rollup answer are read raw).
    #[schema(example = "raw")]
    pub source: String,
    /// One per requested metric, in the order asked.
    pub series: Vec<SeriesView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SeriesView {
    pub metric: String,
    /// Oldest first; an aggregate is reported at its bucket's start. Buckets without data are left out.
    pub points: Vec<PointView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PointView {
    /// Time (RFC 3339, UTC, millisecond precision).
    pub t: DateTime<Utc>,
    /// A number, a boolean or a string (aggregates other than `last` are numbers).
    pub v: Value,
}

/// The parsed query string.
struct Params {
    metrics: Vec<MetricName>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    aggregation: Option<Aggregation>,
    every_ms: Option<i64>,
    limit: usize,
}

fn parse_params(
    pairs: &[(String, String)],
    default_limit: usize,
    max_limit: usize,
) -> Result<Params, ApiError> {
    let mut metrics: Vec<MetricName> = Vec::new();
    let (mut start, mut end, mut agg, mut every, mut limit) = (None, None, None, None, None);
    for (key, value) in pairs {
        match key.as_str() {
            "metric" => {
                for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let name = MetricName::parse(name)
                        .map_err(|m| ApiError::bad_request("invalid_metric_name", format!("metric: {m}")))?;
                    if !metrics.contains(&name) {
                        metrics.push(name);
                    }
                }
            }
            "start" => start = Some(time_param("start", value)?),
            "end" => end = Some(time_param("end", value)?),
            "agg" => {
                agg = Some(
                    value
                        .trim()
                        .parse::<Aggregation>()
                        .map_err(|m| ApiError::bad_request("invalid_aggregation", format!("agg: {m}")))?,
                )
            }
            "every" => {
                every = Some(
                    q::parse_every(value)
                        .map_err(|m| ApiError::bad_request("invalid_duration", format!("every: {m}")))?,
                )
            }
            "limit" => {
                limit = Some(match value.trim().parse::<usize>() {
                    Ok(n) if (1..=max_limit).contains(&n) => n,
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_query",
                            format!("limit: expected a number from 1 to {max_limit}, got {value:?}"),
                        ));
                    }
                })
            }
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown parameter {other:?}; use start, end, metric, agg, every or limit"),
                ));
            }
        }
    }
    if metrics.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "metric: name at least one metric, e.g. metric=temperature or metric=temperature,humidity",
        ));
    }
    if metrics.len() > MAX_METRICS_PER_QUERY {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!(
                "metric: at most {MAX_METRICS_PER_QUERY} metrics per query (got {})",
                metrics.len()
            ),
        ));
    }
    if every.is_some() && agg.is_none() {
        return Err(ApiError::bad_request(
            "invalid_query",
            "every: buckets need an aggregation, e.g. agg=mean&every=1m",
        ));
    }
    let end = end.unwrap_or_else(Utc::now);
    let start = start.unwrap_or(end - Duration::milliseconds(DEFAULT_RANGE_MS));
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
    Ok(Params {
        metrics,
        start,
        end,
        aggregation: agg,
        every_ms: every,
        limit: limit.unwrap_or(default_limit),
    })
}

/// The smallest round bucket width (1s, 1m, 1h, 1d multiples) giving at most `buckets` buckets.
fn suggested_every(range_ms: i64, buckets: usize) -> String {
    let buckets = buckets.max(1) as i64;
    let needed = ((range_ms + buckets - 1) / buckets).max(1);
    let unit = [DAY_MS, HOUR_MS, MINUTE_MS, 1000]
        .into_iter()
        .find(|u| needed >= *u)
        .unwrap_or(1000);
    q::format_every((needed + unit - 1) / unit * unit)
}

fn too_many_points(params: &Params, max_limit: usize) -> ApiError {
    let range = (params.end - params.start).num_milliseconds();
    let every = suggested_every(range, params.limit / params.metrics.len());
    let raise = if params.limit < max_limit {
        format!(", or raise limit (up to {max_limit})")
    } else {
        String::new()
    };
    ApiError::bad_request(
        "too_many_points",
        format!(
            "the range holds more than {} points; aggregate it, e.g. agg=mean&every={every}, narrow start..end{raise}",
            params.limit
        ),
    )
}

/// One device's telemetry: raw points, or aggregates per time bucket.
#[utoipa::path(
    tag = "telemetry",
    params(
        ("deviceId" = String, Path, description = "Device id"),
        ("start" = Option<String>, Query, description = "Inclusive start: RFC 3339, a date (2024-01-31) or epoch seconds/milliseconds; default: 24 h before end"),
        ("end" = Option<String>, Query, description = "Exclusive end, same forms; default: now"),
        ("metric" = String, Query, description = "Metric name(s): metric=a,b or metric=a&metric=b"),
        ("agg" = Option<String>, Query, description = "mean, min, max, sum, count, last, p50, p95 or p99; absent: raw points"),
        ("every" = Option<String>, Query, description = "Bucket width with agg, e.g. 30s, 1m, 1h, 1d; absent: one bucket over the range"),
        ("limit" = Option<u32>, Query, description = "Most points (raw points, or buckets x metrics) to return; default 10000"),
    ),
    responses(
        (status = 200, body = TelemetryResponse),
        (status = 400, description = "invalid_query, invalid_metric_name, invalid_range, invalid_aggregation, invalid_duration, too_many_points", body = ErrorBody),
        (status = 404, description = "No such device in the caller's tenant", body = ErrorBody),
        (status = 503, description = "The telemetry store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[get("/telemetry/{deviceId}")]
async fn query_telemetry(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Viewer, "telemetry.query")?;
    let id = device_id(&path)?;
    let limits = &state.config.telemetry;
    let params = parse_params(&query, limits.query_default_points, limits.query_max_points)?;
    // Another tenant's device answers 404 like a missing one.
    if state.registry.get_device(&principal.tenant, &id).await?.is_none() {
        return Err(ApiError::not_found(format!("device {id} not found")));
    }
    let (start_ms, end_ms) = (params.start.timestamp_millis(), params.end.timestamp_millis());
    let bucketing = params.aggregation.map(|aggregation| Bucketing {
        aggregation,
        every_ms: params.every_ms,
    });
    if bucketing.is_some() {
        let buckets = q::bucket_count(start_ms, end_ms, params.every_ms) as u128;
        if buckets * params.metrics.len() as u128 > params.limit as u128 {
            return Err(too_many_points(&params, limits.query_max_points));
        }
    }
    let result = state
        .telemetry
        .query(TelemetryQuery {
            tenant: principal.tenant.clone(),
            device: id.clone(),
            metrics: params.metrics.clone(),
            start_ms,
            end_ms,
            bucketing,
            limit: params.limit,
        })
        .await;
    let QueryResult { series, source } = match result {
        Ok(result) => result,
        Err(TelemetryStoreError::TooManyPoints { .. }) => {
            return Err(too_many_points(&params, limits.query_max_points));
        }
        Err(error) => return Err(error.into()),
    };
    let body = ResponseBody {
        device_id: id.as_str(),
        start: params.start,
        end: params.end,
        agg: params.aggregation.map(Aggregation::as_str),
        every: params.every_ms.map(q::format_every),
        source: source.as_str(),
        series: &series,
    };
    let points: usize = series.iter().map(|s| s.samples.len()).sum();
    let mut json = Vec::with_capacity(256 + points * 48);
    serde_json::to_writer(&mut json, &body)
        .map_err(|e| ApiError::internal(format!("cannot serialise the answer: {e}")))?;
    Ok(HttpResponse::Ok().content_type(ContentType::json()).body(json))
}

/// The answer as it is sent: the JSON of [`TelemetryResponse`], written straight from the
/// store's samples. A raw answer can hold 100,000 points; building a `PointView` (with a
/// `serde_json::Value` and a `DateTime`) for each first cost more than reading them.
struct ResponseBody<'a> {
    device_id: &'a str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    agg: Option<&'static str>,
    every: Option<String>,
    source: &'static str,
    series: &'a [SeriesData],
}

impl Serialize for ResponseBody<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_struct("TelemetryResponse", 7)?;
        map.serialize_field("deviceId", self.device_id)?;
        map.serialize_field("start", &self.start)?;
        map.serialize_field("end", &self.end)?;
        map.serialize_field("agg", &self.agg)?;
        map.serialize_field("every", &self.every)?;
        map.serialize_field("source", self.source)?;
        map.serialize_field("series", &SeriesList(self.series))?;
        map.end()
    }
}

struct SeriesList<'a>(&'a [SeriesData]);

impl Serialize for SeriesList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for series in self.0 {
            seq.serialize_element(&SeriesOut(series))?;
        }
        seq.end()
    }
}

struct SeriesOut<'a>(&'a SeriesData);

impl Serialize for SeriesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_struct("SeriesView", 2)?;
        map.serialize_field("metric", self.0.metric.as_str())?;
        map.serialize_field("points", &PointsOut(&self.0.samples))?;
        map.end()
    }
}

struct PointsOut<'a>(&'a [Sample]);

impl Serialize for PointsOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        let mut time = TimeText::default();
        for sample in self.0 {
            seq.serialize_element(&PointOut {
                t: time.format(sample.ts_ms),
                v: &sample.value,
            })?;
        }
        seq.end()
    }
}

struct PointOut<'a> {
    t: &'a str,
    v: &'a MetricValue,
}

impl Serialize for PointOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_struct("PointView", 2)?;
        map.serialize_field("t", self.t)?;
        match self.v {
            // Non-finite numbers are never stored; serde_json writes them as null regardless.
            MetricValue::Number(n) => map.serialize_field("v", n)?,
            MetricValue::Bool(b) => map.serialize_field("v", b)?,
            MetricValue::Text(text) => map.serialize_field("v", text.as_str())?,
        }
        map.end()
    }
}

/// Formats epoch milliseconds as `DateTime<Utc>` serialises them (RFC 3339, `Z`, a fraction
/// only when the milliseconds are not zero), without building a `DateTime` per point.
#[derive(Default)]
struct TimeText {
    buf: String,
}

impl TimeText {
    fn format(&mut self, ts_ms: i64) -> &str {
        self.buf.clear();
        let days = ts_ms.div_euclid(DAY_MS);
        let ms_of_day = ts_ms.rem_euclid(DAY_MS);
        let (year, month, day) = civil_from_days(days);
        if !(0..=9999).contains(&year) {
            // Signed years: chrono's own formatting (and its limits).
            let time = Utc.timestamp_millis_opt(ts_ms).single().unwrap_or_default();
            self.buf
                .push_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            return &self.buf;
        }
        let (hour, minute) = (ms_of_day / HOUR_MS, ms_of_day % HOUR_MS / MINUTE_MS);
        let (second, milli) = (ms_of_day % MINUTE_MS / 1000, ms_of_day % 1000);
        let mut out = [0u8; 24];
        let digits = |out: &mut [u8], value: i64| {
            let mut v = value;
            for slot in out.iter_mut().rev() {
                *slot = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        digits(&mut out[0..4], year);
        out[4] = b'-';
        digits(&mut out[5..7], month);
        out[7] = b'-';
        digits(&mut out[8..10], day);
        out[10] = b'T';
        digits(&mut out[11..13], hour);
        out[13] = b':';
        digits(&mut out[14..16], minute);
        out[16] = b':';
        digits(&mut out[17..19], second);
        let len = if milli == 0 {
            out[19] = b'Z';
            20
        } else {
            out[19] = b'.';
            digits(&mut out[20..23], milli);
            out[23] = b'Z';
            24
        };
        // Only ASCII digits and separators were written.
        self.buf
            .push_str(std::str::from_utf8(&out[..len]).unwrap_or_default());
        &self.buf
    }
}

/// The proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How answers were built before [`ResponseBody`]: the reference its JSON must equal.
    fn json_value(value: MetricValue) -> Value {
        match value {
            MetricValue::Number(n) => serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
            MetricValue::Bool(b) => Value::Bool(b),
            MetricValue::Text(s) => Value::String(s),
        }
    }

    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn code(query: &str) -> &'static str {
        parse_params(&pairs(query), 10_000, 100_000)
            .err()
            .map_or("ok", |e| e.code)
    }

    #[test]
    fn parameters() {
        let p = parse_params(
            &pairs("start=2024-01-01&end=2024-01-31&metric=temperature,humidity&metric=temperature"),
            10_000,
            100_000,
        )
        .unwrap();
        assert_eq!(p.metrics.len(), 2);
        assert_eq!(p.limit, 10_000);
        assert_eq!(code("metric=a&agg=p95&every=5m&limit=100"), "ok");
        assert_eq!(code("start=2024-01-01"), "invalid_query");
        assert_eq!(code("metric=1a"), "invalid_metric_name");
        assert_eq!(code("metric=a&start=2024-02-01&end=2024-01-01"), "invalid_range");
        assert_eq!(code("metric=a&start=2024-01-01&end=2024-01-01"), "invalid_range");
        assert_eq!(code("metric=a&agg=median"), "invalid_aggregation");
        assert_eq!(code("metric=a&agg=mean&every=5x"), "invalid_duration");
        assert_eq!(code("metric=a&every=5m"), "invalid_query");
        assert_eq!(code("metric=a&limit=0"), "invalid_query");
        assert_eq!(code("metric=a&limit=100001"), "invalid_query");
        assert_eq!(code("metric=a&start=yesterday"), "invalid_query");
        assert_eq!(code("metric=a&color=red"), "invalid_query");
    }

    #[test]
    fn suggestions_are_round() {
        assert_eq!(suggested_every(30 * DAY_MS, 10_000), "5m");
        assert_eq!(suggested_every(HOUR_MS, 10_000), "1s");
        assert_eq!(suggested_every(365 * DAY_MS, 1000), "9h");
    }

    #[test]
    fn written_answers_equal_the_documented_shape() {
        let times = [
            0,
            1,
            999,
            1_000,
            -1,
            -86_400_000,
            951_782_400_000,   // 2000-02-29
            1_709_164_799_999, // 2024-02-28T23:59:59.999
            1_709_251_200_123, // 2024-03-01
            4_102_444_800_000, // 2100-01-01
            253_402_300_799_999,
            253_402_300_800_000, // year 10000
            -62_167_219_200_000, // year 0
            -62_167_219_200_001, // year -1
        ];
        let values = [
            MetricValue::Number(21.7),
            MetricValue::Number(-0.0),
            MetricValue::Number(1e21),
            MetricValue::Number(3.0),
            MetricValue::Bool(true),
            MetricValue::Text("a \"quoted\"\nline ☃".into()),
        ];
        let samples: Vec<Sample> = times
            .iter()
            .enumerate()
            .map(|(i, ts_ms)| Sample {
                ts_ms: *ts_ms,
                value: values[i % values.len()].clone(),
            })
            .collect();
        let series = vec![
            SeriesData {
                metric: MetricName::parse("temperature").unwrap(),
                samples,
            },
            SeriesData {
                metric: MetricName::parse("empty").unwrap(),
                samples: Vec::new(),
            },
        ];
        let (start, end) = (
            Utc.timestamp_millis_opt(-5).unwrap(),
            Utc.timestamp_millis_opt(7_000).unwrap(),
        );
        for (agg, every) in [(None, None), (Some("p95"), Some("1h".to_string()))] {
            let written = serde_json::to_string(&ResponseBody {
                device_id: "sensor-1",
                start,
                end,
                agg,
                every: every.clone(),
                source: "raw",
                series: &series,
            })
            .unwrap();
            let documented = serde_json::to_string(&TelemetryResponse {
                device_id: "sensor-1".into(),
                start,
                end,
                agg: agg.map(str::to_string),
                every,
                source: "raw".into(),
                series: series
                    .iter()
                    .map(|s| SeriesView {
                        metric: s.metric.to_string(),
                        points: s
                            .samples
                            .iter()
                            .map(|p| PointView {
                                t: Utc.timestamp_millis_opt(p.ts_ms).single().unwrap(),
                                v: json_value(p.value.clone()),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .unwrap();
            assert_eq!(written, documented);
        }
    }
}
