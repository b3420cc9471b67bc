//! The InfluxDB telemetry store: InfluxDB 1.x over its HTTP API, or 2.x/3.x through their
//! 1.x-compatible `/write` and `/query` endpoints (`INFLUX_TOKEN` is sent as
//! `Authorization: Token …`).
//!
//! A minimal client on the workspace's reqwest (rustls, no OpenSSL) rather than the `influxdb`
//! crate: 0.8 needs reqwest 0.13 and 0.7 reqwest 0.11 (a second HTTP stack either way); both treat
//! any response containing `"error"` as failed, which breaks queries of a metric named `error`
//! or a string value `"error"`; and both reduce a refused write to its status code, dropping
//! the message a writer needs to log when it gives a batch up.
//!
//! Layout: one measurement `telemetry`, tags `tenant`, `device`, `type`, one field per metric.
//! A field's type is fixed per shard in InfluxDB, so to keep one device's (or one tenant's)
//! choice of value type from making another's writes fail, numbers are stored in field `m`,
//! booleans in `m:bool` and strings in `m:str` (metric names cannot contain `:`). Timestamps
//! are milliseconds (`precision=ms`).
//!
//! Retention policies `drover_raw` (default), `drover_1m` and `drover_1h` and continuous queries
//! writing mean/min/max/sum/count per minute and per hour are created at start. A continuous
//! query only sees recent data, so writes of late points (replayed from the spool, or sent late
//! by a device) mark their device, and [`maintain`](TelemetryStore::maintain) recomputes that
//! device's rollups over the late range. Queries read the rollups as `drover_actors`'
//! `query::plan` decides, like the embedded store.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use drover_actors::telemetry::query::{
    self as q, Bucketing, DataSource, HOUR_MS, MINUTE_MS, Partial, QueryResult, RollupCoverage, RollupLevel,
    Sample, Segment, SeriesData, TelemetryQuery,
};
use drover_actors::telemetry::store::{
    MaintenanceReport, PointBatch, StoreInfo, TelemetryStore, TelemetryStoreError,
};
use drover_actors::telemetry::{MetricName, MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};
use serde::Deserialize;
use serde_json::Value;

use super::Retention;
use crate::config::mask_url;

const MEASUREMENT: &str = "telemetry";
const RAW_RP: &str = "drover_raw";
/// Rollup measurements' numeric fields are those without a type suffix.
const NUMERIC_FIELDS: &str = "/^[^:]+$/";
/// Device rollups recomputed per request in a maintenance pass.
const MAINTENANCE_DEVICES_PER_REQUEST: usize = 20;

/// Settings of the InfluxDB store.
#[derive(Debug, Clone)]
pub struct InfluxSettings {
    pub url: String,
    pub db: String,
    /// Empty for InfluxDB 1.x without authentication.
    pub token: String,
    pub retention: Retention,
}

/// What the server lets Drover manage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// InfluxDB 1.x: Drover's retention policies and continuous queries.
    Managed,
    /// A 2.x/3.x compatibility API, which has no DDL: the bucket's own retention, no rollups.
    BucketOnly,
}

pub struct InfluxTelemetryStore {
    http: reqwest::Client,
    url: String,
    db: String,
    token: String,
    retention: Retention,
    layout: RwLock<Option<Layout>>,
    /// Devices with points too old for the continuous queries: the oldest such point.
    late: Mutex<HashMap<(TenantId, DeviceId), i64>>,
}

/// An InfluxQL identifier: double-quoted, with `\` and `"` escaped.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An InfluxQL string literal: single-quoted, with `\` and `'` escaped.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A line-protocol tag value or field key: `,`, `=` and space escaped. InfluxDB 1.x keeps other
/// backslashes as they are, and cannot represent a trailing one, which is dropped.
pub fn escape_key(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    for c in value.trim_end_matches('\\').chars() {
        if matches!(c, ',' | '=' | ' ') {
            out.push('\\');
        }
        // Line protocol has no escape for line breaks; device types cannot hold them anyway.
        out.push(if c == '\n' || c == '\r' { ' ' } else { c });
    }
    out
}

/// A line-protocol string field value: quoted, with `\` and `"` escaped.
pub fn escape_string_field(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The field a value is stored in: `m` (number), `m:bool`, `m:str`.
fn field_key(metric: &MetricName, value: &MetricValue) -> String {
    match value {
        MetricValue::Number(_) => metric.as_str().to_string(),
        MetricValue::Bool(_) => format!("{metric}:bool"),
        MetricValue::Text(_) => format!("{metric}:str"),
    }
}

fn field_value(value: &MetricValue) -> String {
    match value {
        // Rust never prints f64 in exponent form, and a number without `i` is a float to InfluxDB.
        MetricValue::Number(n) => format!("{n}"),
        MetricValue::Bool(b) => b.to_string(),
        MetricValue::Text(s) => escape_string_field(s),
    }
}

/// The batch in line protocol, one line per (device, type, timestamp) with all its fields.
pub fn line_protocol(batch: &[TelemetryPoint]) -> String {
    let mut out = String::with_capacity(batch.len() * 64);
    let mut i = 0;
    while i < batch.len() {
        let first = &batch[i];
        let _ = write!(
            out,
            "{MEASUREMENT},device={},tenant={},type={} ",
            escape_key(first.device.as_str()),
            escape_key(first.tenant.as_str()),
            escape_key(if first.device_type.is_empty() {
                "-"
            } else {
                &first.device_type
            })
        );
        let mut j = i;
        while j < batch.len()
            && batch[j].ts_ms == first.ts_ms
            && batch[j].device == first.device
            && batch[j].tenant == first.tenant
            && batch[j].device_type == first.device_type
        {
            if j > i {
                out.push(',');
            }
            let p = &batch[j];
            let _ = write!(
                out,
                "{}={}",
                escape_key(&field_key(&p.metric, &p.value)),
                field_value(&p.value)
            );
            j += 1;
        }
        let _ = writeln!(out, " {}", first.ts_ms);
        i = j;
    }
    out
}

#[derive(Debug, Deserialize)]
struct QueryResponse {
    #[serde(default)]
    results: Vec<StatementResult>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StatementResult {
    #[serde(default)]
    series: Vec<ResultSeries>,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResultSeries {
    #[serde(default)]
    values: Vec<Vec<Value>>,
}

impl StatementResult {
    fn rows(self) -> impl Iterator<Item = Vec<Value>> {
        self.series.into_iter().flat_map(|s| s.values)
    }
}

fn unavailable(error: reqwest::Error) -> TelemetryStoreError {
    TelemetryStoreError::Unavailable(format!("InfluxDB: {error}"))
}

/// Statuses that say "later": auth (a token being fixed), a missing database (being created),
/// throttling and server trouble. Other 4xx refuse the data itself.
fn classify_status(status: reqwest::StatusCode, body: &str) -> TelemetryStoreError {
    let message = influx_error_message(body);
    let text = format!("InfluxDB answered {status}: {message}");
    match status.as_u16() {
        401 | 403 | 404 | 408 | 429 => TelemetryStoreError::Unavailable(text),
        s if s >= 500 => TelemetryStoreError::Unavailable(text),
        _ => TelemetryStoreError::Rejected(text),
    }
}

fn influx_error_message(body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    message.chars().take(500).collect()
}

fn as_i64(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().map(|f| f as i64))
}

fn as_f64(value: &Value) -> Option<f64> {
    value.as_f64()
}

fn floor_to(ts: i64, res: i64) -> i64 {
    ts.div_euclid(res) * res
}

fn ceil_to(ts: i64, res: i64) -> i64 {
    floor_to(ts + res - 1, res)
}

impl InfluxTelemetryStore {
    pub fn new(settings: InfluxSettings) -> Result<InfluxTelemetryStore, TelemetryStoreError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| TelemetryStoreError::Internal(format!("HTTP client: {e}")))?;
        Ok(InfluxTelemetryStore {
            http,
            url: settings.url.trim_end_matches('/').to_string(),
            db: settings.db,
            token: settings.token,
            retention: settings.retention,
            layout: RwLock::new(None),
            late: Mutex::new(HashMap::new()),
        })
    }

    pub fn database(&self) -> &str {
        &self.db
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if self.token.is_empty() {
            request
        } else {
            request.header(reqwest::header::AUTHORIZATION, format!("Token {}", self.token))
        }
    }

    /// Runs InfluxQL (several statements may be separated by `;`) and returns each statement's
    /// result; statement errors are left to the caller.
    async fn influxql(
        &self,
        statements: &str,
        with_db: bool,
    ) -> Result<Vec<StatementResult>, TelemetryStoreError> {
        let mut params: Vec<(&str, &str)> = vec![("q", statements), ("epoch", "ms")];
        if with_db {
            params.push(("db", &self.db));
        }
        let response = self
            .authorized(self.http.post(format!("{}/query", self.url)).form(&params))
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        let body = response.text().await.map_err(unavailable)?;
        if !status.is_success() {
            return Err(classify_status(status, &body));
        }
        let parsed: QueryResponse = serde_json::from_str(&body)
            .map_err(|e| TelemetryStoreError::Internal(format!("unexpected InfluxDB answer: {e}")))?;
        if let Some(error) = parsed.error {
            return Err(TelemetryStoreError::Rejected(format!("InfluxDB: {error}")));
        }
        Ok(parsed.results)
    }

    /// One statement that must succeed.
    async fn statement(&self, statement: &str) -> Result<StatementResult, TelemetryStoreError> {
        let mut results = self.influxql(statement, true).await?;
        let result = results
            .pop()
            .ok_or_else(|| TelemetryStoreError::Internal("InfluxDB returned no result".into()))?;
        match result.error {
            Some(error) => Err(TelemetryStoreError::Rejected(format!("InfluxDB: {error}"))),
            None => Ok(result),
        }
    }

    /// Creates the database, retention policies and continuous queries (idempotent; settings
    /// changed in the configuration are applied). On a compatibility API without DDL, falls
    /// back to writing into the bucket as it is, without rollups.
    pub async fn ensure_schema(&self) -> Result<(), TelemetryStoreError> {
        let db = ident(&self.db);
        match self.statement(&format!("CREATE DATABASE {db}")).await {
            Ok(_) => {}
            Err(error) if !error.is_retryable() && !self.token.is_empty() => {
                tracing::info!(%error, "InfluxDB has no DDL (2.x/3.x compatibility API): using the bucket's retention, no rollups");
                *self.layout.write().unwrap_or_else(|e| e.into_inner()) = Some(Layout::BucketOnly);
                return Ok(());
            }
            Err(error) => return Err(error),
        }
        let r = self.retention;
        for (rp, ms, default) in [
            (RAW_RP, r.raw_ms, true),
            ("drover_1m", r.rollup_1m_ms, false),
            ("drover_1h", r.rollup_1h_ms, false),
        ] {
            // InfluxDB's shortest retention is one hour.
            let hours = (ms / HOUR_MS).max(1);
            let default = if default { " DEFAULT" } else { "" };
            let create = format!(
                "CREATE RETENTION POLICY {} ON {db} DURATION {hours}h REPLICATION 1{default}",
                ident(rp)
            );
            if let Err(error) = self.statement(&create).await {
                if !error.to_string().contains("already exists") {
                    return Err(error);
                }
                self.statement(&format!(
                    "ALTER RETENTION POLICY {} ON {db} DURATION {hours}h{default}",
                    ident(rp)
                ))
                .await?;
            }
        }
        for level in RollupLevel::ALL {
            let name = ident(&format!("drover_rollup_{}", level_suffix(level)));
            self.statement(&format!("DROP CONTINUOUS QUERY {name} ON {db}"))
                .await?;
            let every = level_suffix(level);
            self.statement(&format!(
                "CREATE CONTINUOUS QUERY {name} ON {db} RESAMPLE FOR 2{unit} BEGIN {select} END",
                unit = &every[1..],
                select = self.rollup_select(level, None)
            ))
            .await?;
        }
        *self.layout.write().unwrap_or_else(|e| e.into_inner()) = Some(Layout::Managed);
        tracing::info!(db = %self.db, "InfluxDB database, retention policies and continuous queries ready");
        Ok(())
    }

    async fn layout(&self) -> Result<Layout, TelemetryStoreError> {
        if let Some(layout) = *self.layout.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(layout);
        }
        self.ensure_schema().await?;
        self.layout
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or_else(|| TelemetryStoreError::Unavailable("InfluxDB schema not set up".into()))
    }

    /// The SELECT … INTO that computes a rollup level from raw points, optionally limited by a
    /// WHERE clause (the continuous query has none: InfluxDB adds its time window).
    fn rollup_select(&self, level: RollupLevel, filter: Option<&str>) -> String {
        let n = NUMERIC_FIELDS;
        let db = ident(&self.db);
        format!(
            "SELECT mean({n}), min({n}), max({n}), sum({n}), count(/.*/) INTO {db}.{}.{m} \
             FROM {db}.{}.{m}{} GROUP BY time({}), *",
            ident(&format!("drover_{}", level_suffix(level))),
            ident(RAW_RP),
            filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
            level_suffix(level),
            m = ident(MEASUREMENT),
        )
    }

    fn raw_from(&self, layout: Layout) -> String {
        match layout {
            Layout::Managed => format!("{}.{}.{}", ident(&self.db), ident(RAW_RP), ident(MEASUREMENT)),
            Layout::BucketOnly => ident(MEASUREMENT),
        }
    }

    fn rollup_from(&self, level: RollupLevel) -> String {
        format!(
            "{}.{}.{}",
            ident(&self.db),
            ident(&format!("drover_{}", level_suffix(level))),
            ident(MEASUREMENT)
        )
    }

    fn device_filter(tenant: &TenantId, device: &DeviceId, start_ms: i64, end_ms: i64) -> String {
        format!(
            "\"tenant\" = {} AND \"device\" = {} AND time >= {start_ms}ms AND time < {end_ms}ms",
            literal(tenant.as_str()),
            literal(device.as_str())
        )
    }

    fn note_late_points(&self, batch: &[TelemetryPoint]) {
        let now = Utc::now().timestamp_millis();
        // The 1-minute continuous query recomputes the last two minutes each minute.
        let late_before = floor_to(now, MINUTE_MS) - MINUTE_MS;
        let mut late = self.late.lock().unwrap_or_else(|e| e.into_inner());
        for p in batch.iter().filter(|p| p.ts_ms < late_before) {
            late.entry((p.tenant.clone(), p.device.clone()))
                .and_modify(|t| *t = (*t).min(p.ts_ms))
                .or_insert(p.ts_ms);
        }
    }

    fn coverage(&self, layout: Layout, query: &TelemetryQuery) -> Vec<RollupCoverage> {
        if layout == Layout::BucketOnly {
            return Vec::new();
        }
        let now = Utc::now().timestamp_millis();
        let late = self
            .late
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(query.tenant.clone(), query.device.clone()))
            .copied();
        // Leave the continuous queries a moment after each boundary to run.
        [(RollupLevel::Minute, 10_000), (RollupLevel::Hour, 60_000)]
            .into_iter()
            .map(|(level, slack)| {
                let res = level.resolution_ms();
                let mut until_ms = floor_to(now - slack, res);
                if let Some(t) = late {
                    until_ms = until_ms.min(floor_to(t, res));
                }
                RollupCoverage { level, until_ms }
            })
            .collect()
    }

    async fn raw_points(
        &self,
        layout: Layout,
        query: &TelemetryQuery,
    ) -> Result<QueryResult, TelemetryStoreError> {
        let fields: Vec<String> = query
            .metrics
            .iter()
            .flat_map(|m| {
                [
                    ident(m.as_str()),
                    ident(&format!("{m}:bool")),
                    ident(&format!("{m}:str")),
                ]
            })
            .collect();
        let statement = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY time ASC LIMIT {}",
            fields.join(", "),
            self.raw_from(layout),
            Self::device_filter(&query.tenant, &query.device, query.start_ms, query.end_ms),
            query.limit + 1
        );
        let mut series: Vec<SeriesData> = query
            .metrics
            .iter()
            .map(|m| SeriesData {
                metric: m.clone(),
                samples: Vec::new(),
            })
            .collect();
        let mut total = 0usize;
        for row in self.statement(&statement).await?.rows() {
            let Some(ts_ms) = row.first().and_then(as_i64) else {
                continue;
            };
            for (i, s) in series.iter_mut().enumerate() {
                if let Some(value) = typed_value(&row, 1 + 3 * i) {
                    s.samples.push(Sample { ts_ms, value });
                    total += 1;
                }
            }
            if total > query.limit {
                return Err(TelemetryStoreError::TooManyPoints { limit: query.limit });
            }
        }
        Ok(QueryResult {
            series,
            source: DataSource::Raw,
        })
    }

    fn group_by(bucketing: Bucketing) -> String {
        match bucketing.every_ms {
            Some(every) => format!(" GROUP BY time({every}ms) fill(none)"),
            None => String::new(),
        }
    }

    async fn aggregate(
        &self,
        layout: Layout,
        query: &TelemetryQuery,
        bucketing: Bucketing,
    ) -> Result<QueryResult, TelemetryStoreError> {
        let aggregation = bucketing.aggregation;
        let bucket_of = |ts: i64| q::bucket_start(ts, query.start_ms, bucketing.every_ms);
        let filter = Self::device_filter(&query.tenant, &query.device, query.start_ms, query.end_ms);
        let mut series: Vec<SeriesData> = query
            .metrics
            .iter()
            .map(|m| SeriesData {
                metric: m.clone(),
                samples: Vec::new(),
            })
            .collect();

        if let Some(p) = aggregation.percentile() {
            let select: Vec<String> = query
                .metrics
                .iter()
                .map(|m| format!("percentile({}, {p})", ident(m.as_str())))
                .collect();
            let statement = format!(
                "SELECT {} FROM {} WHERE {filter}{}",
                select.join(", "),
                self.raw_from(layout),
                Self::group_by(bucketing)
            );
            for row in self.statement(&statement).await?.rows() {
                let Some(ts) = row.first().and_then(as_i64) else {
                    continue;
                };
                for (i, s) in series.iter_mut().enumerate() {
                    if let Some(v) = row.get(1 + i).and_then(as_f64).and_then(MetricValue::number) {
                        s.samples.push(Sample {
                            ts_ms: bucket_of(ts),
                            value: v,
                        });
                    }
                }
            }
            return Ok(QueryResult {
                series,
                source: DataSource::Raw,
            });
        }

        if aggregation == q::Aggregation::Last {
            let select: Vec<String> = query
                .metrics
                .iter()
                .flat_map(|m| {
                    [
                        format!("last({})", ident(m.as_str())),
                        format!("last({})", ident(&format!("{m}:bool"))),
                        format!("last({})", ident(&format!("{m}:str"))),
                    ]
                })
                .collect();
            let statement = format!(
                "SELECT {} FROM {} WHERE {filter}{}",
                select.join(", "),
                self.raw_from(layout),
                Self::group_by(bucketing)
            );
            for row in self.statement(&statement).await?.rows() {
                let Some(ts) = row.first().and_then(as_i64) else {
                    continue;
                };
                let bucket = bucket_of(ts);
                for (i, s) in series.iter_mut().enumerate() {
                    let present = (0..3)
                        .filter(|k| row.get(1 + 3 * i + k).is_some_and(|v| !v.is_null()))
                        .count();
                    let value = match present {
                        0 => None,
                        1 => typed_value(&row, 1 + 3 * i),
                        // The metric changed type inside the bucket: ask which value came last.
                        _ => {
                            self.latest_in(layout, query, &s.metric, bucket, bucketing)
                                .await?
                        }
                    };
                    if let Some(value) = value {
                        s.samples.push(Sample { ts_ms: bucket, value });
                    }
                }
            }
            return Ok(QueryResult {
                series,
                source: DataSource::Raw,
            });
        }

        let plan = q::plan(
            query.start_ms,
            query.end_ms,
            Some(bucketing),
            &self.coverage(layout, query),
        );
        let mut partials: Vec<Vec<(i64, Partial)>> = vec![Vec::new(); query.metrics.len()];
        for segment in &plan.segments {
            let (from, select, start_ms, end_ms) = match *segment {
                Segment::Raw { start_ms, end_ms } => {
                    let select: Vec<String> = query
                        .metrics
                        .iter()
                        .flat_map(|m| {
                            let (n, b, s) = (
                                ident(m.as_str()),
                                ident(&format!("{m}:bool")),
                                ident(&format!("{m}:str")),
                            );
                            [
                                format!("count({n})"),
                                format!("sum({n})"),
                                format!("min({n})"),
                                format!("max({n})"),
                                format!("count({b})"),
                                format!("count({s})"),
                            ]
                        })
                        .collect();
                    (self.raw_from(layout), select, start_ms, end_ms)
                }
                Segment::Rollup {
                    level,
                    start_ms,
                    end_ms,
                } => {
                    let select: Vec<String> = query
                        .metrics
                        .iter()
                        .flat_map(|m| {
                            [
                                format!("sum({})", ident(&format!("count_{m}"))),
                                format!("sum({})", ident(&format!("sum_{m}"))),
                                format!("min({})", ident(&format!("min_{m}"))),
                                format!("max({})", ident(&format!("max_{m}"))),
                                format!("sum({})", ident(&format!("count_{m}:bool"))),
                                format!("sum({})", ident(&format!("count_{m}:str"))),
                            ]
                        })
                        .collect();
                    (self.rollup_from(level), select, start_ms, end_ms)
                }
            };
            let statement = format!(
                "SELECT {} FROM {from} WHERE {}{}",
                select.join(", "),
                Self::device_filter(&query.tenant, &query.device, start_ms, end_ms),
                Self::group_by(bucketing)
            );
            for row in self.statement(&statement).await?.rows() {
                let Some(ts) = row.first().and_then(as_i64) else {
                    continue;
                };
                for (i, out) in partials.iter_mut().enumerate() {
                    let col = |k: usize| row.get(1 + 6 * i + k);
                    let count = |k: usize| col(k).and_then(as_i64).unwrap_or(0).max(0) as u64;
                    let num_count = count(0);
                    let all = num_count + count(4) + count(5);
                    if all == 0 {
                        continue;
                    }
                    out.push((
                        bucket_of(ts),
                        Partial {
                            count: all,
                            num_count,
                            sum: col(1).and_then(as_f64).unwrap_or(0.0),
                            min: col(2).and_then(as_f64).unwrap_or(f64::INFINITY),
                            max: col(3).and_then(as_f64).unwrap_or(f64::NEG_INFINITY),
                        },
                    ));
                }
            }
        }
        for (s, p) in series.iter_mut().zip(partials) {
            s.samples = q::finish_partials(p, aggregation, query.start_ms, bucketing.every_ms)?;
        }
        Ok(QueryResult {
            series,
            source: plan.source,
        })
    }

    /// The latest value of `metric` in one bucket, whatever its type.
    async fn latest_in(
        &self,
        layout: Layout,
        query: &TelemetryQuery,
        metric: &MetricName,
        bucket: i64,
        bucketing: Bucketing,
    ) -> Result<Option<MetricValue>, TelemetryStoreError> {
        let start = bucket.max(query.start_ms);
        let end = bucketing
            .every_ms
            .map_or(query.end_ms, |w| (bucket + w).min(query.end_ms));
        let statement = format!(
            "SELECT {}, {}, {} FROM {} WHERE {} ORDER BY time DESC LIMIT 1",
            ident(metric.as_str()),
            ident(&format!("{metric}:bool")),
            ident(&format!("{metric}:str")),
            self.raw_from(layout),
            Self::device_filter(&query.tenant, &query.device, start, end)
        );
        Ok(self
            .statement(&statement)
            .await?
            .rows()
            .next()
            .and_then(|row| typed_value(&row, 1)))
    }
}

/// The value in columns `at` (number), `at+1` (bool), `at+2` (string) of a row, whichever is set.
fn typed_value(row: &[Value], at: usize) -> Option<MetricValue> {
    if let Some(n) = row.get(at).and_then(as_f64) {
        return MetricValue::number(n);
    }
    if let Some(b) = row.get(at + 1).and_then(Value::as_bool) {
        return Some(MetricValue::Bool(b));
    }
    row.get(at + 2)
        .and_then(Value::as_str)
        .map(|s| MetricValue::Text(s.to_string()))
}

fn level_suffix(level: RollupLevel) -> &'static str {
    match level {
        RollupLevel::Minute => "1m",
        RollupLevel::Hour => "1h",
    }
}

#[async_trait]
impl TelemetryStore for InfluxTelemetryStore {
    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "influxdb",
            target: format!("influxdb {} db={}", mask_url(&self.url), self.db),
        }
    }

    async fn write(&self, batch: PointBatch) -> Result<(), TelemetryStoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let layout = self.layout().await?;
        let mut params = vec![("db", self.db.as_str()), ("precision", "ms")];
        if layout == Layout::Managed {
            params.push(("rp", RAW_RP));
        }
        let response = self
            .authorized(
                self.http
                    .post(format!("{}/write", self.url))
                    .query(&params)
                    .body(line_protocol(&batch)),
            )
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if status.is_success() {
            if layout == Layout::Managed {
                self.note_late_points(&batch);
            }
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::NOT_FOUND {
            // The database was dropped under us: set it up again on the next write.
            *self.layout.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
        Err(classify_status(status, &body))
    }

    async fn query(&self, query: TelemetryQuery) -> Result<QueryResult, TelemetryStoreError> {
        let layout = self.layout().await?;
        match query.bucketing {
            None => self.raw_points(layout, &query).await,
            Some(bucketing) => self.aggregate(layout, &query, bucketing).await,
        }
    }

    async fn ping(&self) -> Result<(), TelemetryStoreError> {
        let response = self
            .authorized(self.http.get(format!("{}/ping", self.url)))
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            let body = response.text().await.unwrap_or_default();
            Err(classify_status(status, &body))
        }
    }

    async fn maintain(&self, now_ms: i64) -> Result<MaintenanceReport, TelemetryStoreError> {
        let mut report = MaintenanceReport::default();
        if self.layout().await? == Layout::BucketOnly {
            return Ok(report);
        }
        let late: Vec<((TenantId, DeviceId), i64)> =
            std::mem::take(&mut *self.late.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .collect();
        // Retention itself is InfluxDB's (retention policies); only late rollups are Drover's.
        let raw_horizon = now_ms - self.retention.raw_ms;
        for (i, chunk) in late.chunks(MAINTENANCE_DEVICES_PER_REQUEST).enumerate() {
            let mut statements = Vec::with_capacity(chunk.len() * 2);
            for ((tenant, device), from) in chunk {
                for level in [RollupLevel::Minute, RollupLevel::Hour] {
                    let res = level.resolution_ms();
                    let start = floor_to(*from, res).max(ceil_to(raw_horizon, res));
                    let end = floor_to(now_ms, res);
                    if start < end {
                        let filter = Self::device_filter(tenant, device, start, end);
                        statements.push(self.rollup_select(level, Some(&filter)));
                    }
                }
            }
            let outcome = match self.influxql(&statements.join("; "), true).await {
                Ok(results) => match results.iter().find_map(|r| r.error.clone()) {
                    Some(error) => Err(TelemetryStoreError::Rejected(format!("InfluxDB: {error}"))),
                    None => Ok(results),
                },
                Err(error) => Err(error),
            };
            match outcome {
                Ok(results) => {
                    for result in results {
                        report.rollup_rows_written += result
                            .rows()
                            .filter_map(|row| row.get(1).and_then(as_i64))
                            .sum::<i64>() as u64;
                    }
                    report.series_rolled_up += chunk.len() as u64;
                }
                Err(error) => {
                    // Keep what is not done yet for the next pass.
                    let mut pending = self.late.lock().unwrap_or_else(|e| e.into_inner());
                    for (key, from) in late[i * MAINTENANCE_DEVICES_PER_REQUEST..].iter().cloned() {
                        pending
                            .entry(key)
                            .and_modify(|t| *t = (*t).min(from))
                            .or_insert(from);
                    }
                    return Err(error);
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn influxql_quoting_cannot_be_escaped() {
        assert_eq!(ident("temp"), "\"temp\"");
        assert_eq!(ident("a\"b\\"), "\"a\\\"b\\\\\"");
        assert_eq!(literal("sensor-001"), "'sensor-001'");
        assert_eq!(literal("x' OR 'a'='a"), "'x\\' OR \\'a\\'=\\'a'");
        assert_eq!(literal("a\\"), "'a\\\\'");
    }

    #[test]
    fn line_protocol_escapes_and_groups() {
        let point = |metric: &str, ts_ms: i64, value: MetricValue| TelemetryPoint {
            tenant: TenantId::parse("acme").unwrap(),
            device: DeviceId::parse("sensor-001").unwrap(),
            device_type: "temp, probe=v2 \"x\"\\".into(),
            metric: MetricName::parse(metric).unwrap(),
            ts_ms,
            value,
        };
        let batch = vec![
            point("temperature", 1000, MetricValue::Number(22.5)),
            point("door", 1000, MetricValue::Bool(true)),
            point("status", 1000, MetricValue::Text("say \"hi\" \\ now".into())),
            point("temperature", 2000, MetricValue::Number(1e21)),
        ];
        assert_eq!(
            line_protocol(&batch),
            "telemetry,device=sensor-001,tenant=acme,type=temp\\,\\ probe\\=v2\\ \"x\" \
             temperature=22.5,door:bool=true,status:str=\"say \\\"hi\\\" \\\\ now\" 1000\n\
             telemetry,device=sensor-001,tenant=acme,type=temp\\,\\ probe\\=v2\\ \"x\" \
             temperature=1000000000000000000000 2000\n"
        );
    }

    #[test]
    fn statuses_are_classified() {
        use reqwest::StatusCode;
        let retryable = |s: u16| classify_status(StatusCode::from_u16(s).unwrap(), "").is_retryable();
        for s in [401, 403, 404, 408, 429, 500, 503] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 413, 422] {
            assert!(!retryable(s), "{s}");
        }
        let error = classify_status(
            StatusCode::BAD_REQUEST,
            r#"{"error":"partial write: points beyond retention policy dropped=1"}"#,
        );
        assert!(error.to_string().contains("beyond retention policy"), "{error}");
    }
}
