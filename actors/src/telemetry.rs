//! Telemetry as the platform speaks it: metric names and values, stored points, and the parsing
//! and validation of device payloads.
//!
//! A device sends `{"timestamp": 1634567890000, "metrics": {"temperature": 22.5}}` or a JSON
//! array of such objects (a batch). [`parse_payload`] turns those bytes into validated
//! [`TelemetryMessage`]s or refuses them with a [`PayloadError`] whose [`code`](PayloadError::code)
//! is stable and whose message names the offending message index and metric. Nothing here does
//! I/O: MQTT, HTTP and WebSocket ingestion all call the same function.
//!
//! The query side (aggregations, buckets, rollup planning) is in [`query`]; the storage trait the
//! writers and the query API use is in [`store`].

mod fast;
pub mod query;
pub mod schema;
pub mod store;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{DeviceId, TenantId};

/// A metric's value: a finite number, a boolean or a (bounded) string.
///
/// Numbers are `f64`; integers above 2^53 lose precision, as in JSON itself and in InfluxDB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricValue {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl MetricValue {
    /// A number, refusing NaN and infinities (no store can keep them, JSON cannot carry them).
    pub fn number(value: f64) -> Option<MetricValue> {
        value.is_finite().then_some(MetricValue::Number(value))
    }

    /// The number, when this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetricValue::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// `number`, `bool` or `string`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            MetricValue::Number(_) => "number",
            MetricValue::Bool(_) => "bool",
            MetricValue::Text(_) => "string",
        }
    }
}

/// A metric's name: 1–64 ASCII letters, digits, `_`, `.` and `-`, starting with a letter or `_`.
///
/// Why these rules: such a name needs no quoting in a URL query (`metric=a,b` splits on commas,
/// which are therefore excluded), is a valid JSON key and InfluxDB field key, and cannot be
/// mistaken for a number or a timestamp. Names are case-sensitive.
///
/// The name is shared (`Arc<str>`): a point's copies (to the writer, the rules, the analytics,
/// the live view) take no allocation, and [`MetricName::parse_shared`] hands a device's
/// payloads the names already seen on this thread.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricName(Arc<str>);

/// Names [`MetricName::parse_shared`] keeps per thread at most; past it the thread starts over.
const SHARED_NAMES: usize = 4096;

thread_local! {
    static NAMES: std::cell::RefCell<std::collections::HashSet<Arc<str>>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

impl MetricName {
    pub const MAX_LEN: usize = 64;

    /// Validates `name`; the error says why it is not a metric name.
    pub fn parse(name: impl Into<String>) -> Result<MetricName, String> {
        let name = name.into();
        let Some(first) = name.chars().next() else {
            return Err("metric name must not be empty".into());
        };
        let len = name.chars().count();
        if len > Self::MAX_LEN {
            return Err(format!(
                "metric name must be at most {} characters (got {len})",
                Self::MAX_LEN
            ));
        }
        if !(first.is_ascii_alphabetic() || first == '_') {
            return Err(format!("metric name {name:?} must start with a letter or '_'"));
        }
        if let Some((position, found)) = name
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(format!(
                "metric name {name:?} may only contain letters, digits, '_', '.' and '-'; found {found:?} at position {position}"
            ));
        }
        Ok(MetricName(name.into()))
    }

    /// [`MetricName::parse`] for the names of incoming payloads: a name this thread validated
    /// before is shared rather than allocated again.
    pub fn parse_shared(name: &str) -> Result<MetricName, String> {
        if let Some(known) = NAMES.with(|names| names.borrow().get(name).cloned()) {
            return Ok(MetricName(known));
        }
        let parsed = MetricName::parse(name)?;
        NAMES.with(|names| {
            let mut names = names.borrow_mut();
            if names.len() >= SHARED_NAMES {
                names.clear();
            }
            names.insert(parsed.0.clone());
        });
        Ok(parsed)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for MetricName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for MetricName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for MetricName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for MetricName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        MetricName::parse(s)
    }
}

impl<'de> Deserialize<'de> for MetricName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        MetricName::parse(raw).map_err(serde::de::Error::custom)
    }
}

/// One stored value: what the writers hand to a [`store::TelemetryStore`].
///
/// `(tenant, device, metric, ts_ms)` identifies a point; writing the same identity again
/// replaces the value, so a replayed batch never counts twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryPoint {
    pub tenant: TenantId,
    pub device: DeviceId,
    /// The device's type when the point was received (an InfluxDB tag; informative in SQLite).
    /// Shared by the points of a device's messages.
    pub device_type: Arc<str>,
    pub metric: MetricName,
    /// Milliseconds since the Unix epoch, UTC.
    pub ts_ms: i64,
    pub value: MetricValue,
}

/// One validated message of a device payload: a timestamp and its metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryMessage {
    pub ts_ms: i64,
    /// The message carried no timestamp; `ts_ms` is the server's time of arrival.
    pub server_stamped: bool,
    pub metrics: Vec<(MetricName, MetricValue)>,
}

impl TelemetryMessage {
    /// The message's metrics as points of `device`.
    pub fn into_points(
        self,
        tenant: &TenantId,
        device: &DeviceId,
        device_type: &Arc<str>,
    ) -> Vec<TelemetryPoint> {
        let ts_ms = self.ts_ms;
        self.metrics
            .into_iter()
            .map(|(metric, value)| TelemetryPoint {
                tenant: tenant.clone(),
                device: device.clone(),
                device_type: device_type.clone(),
                metric,
                ts_ms,
                value,
            })
            .collect()
    }
}

/// Limits a payload must respect.
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadLimits {
    /// Messages in one batch (JSON array).
    pub max_messages: usize,
    /// Metrics in one message.
    pub max_metrics: usize,
    /// Bytes of one string value.
    pub max_string_bytes: usize,
    /// How far ahead of the server's clock a timestamp may be.
    pub max_future_ms: i64,
    /// How old a timestamp may be (the raw retention: older points would be deleted at once).
    pub max_age_ms: i64,
}

impl Default for PayloadLimits {
    fn default() -> Self {
        PayloadLimits {
            max_messages: 1000,
            max_metrics: 100,
            max_string_bytes: 1024,
            max_future_ms: 10 * 60 * 1000,
            max_age_ms: 30 * 24 * 3600 * 1000,
        }
    }
}

/// Where in a payload a refusal applies: the message's index in a batch, or `None` for a single
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At(pub Option<usize>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => write!(f, "message {i}: "),
            None => Ok(()),
        }
    }
}

/// Why a payload was refused. Nothing of a refused payload is stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("malformed JSON: {0}")]
    InvalidJson(String),
    #[error("{at}{message}")]
    InvalidMessage { at: At, message: String },
    #[error("{at}{message}")]
    EmptyMessage { at: At, message: String },
    #[error("batch of {count} messages; at most {max} are accepted in one payload")]
    BatchTooLarge { count: usize, max: usize },
    #[error("{at}{count} metrics; at most {max} are accepted in one message")]
    TooManyMetrics { at: At, count: usize, max: usize },
    #[error("{at}{reason}")]
    InvalidMetricName { at: At, reason: String },
    #[error("{at}metric {metric:?}: {reason}")]
    InvalidValue { at: At, metric: String, reason: String },
    #[error("{at}metric {metric:?}: string of {len} bytes; at most {max} are accepted")]
    ValueTooLong {
        at: At,
        metric: String,
        len: usize,
        max: usize,
    },
    #[error("{at}timestamp: {reason}")]
    InvalidTimestamp { at: At, reason: String },
    #[error("{at}timestamp {ts_ms} is {reason}")]
    TimestampOutOfRange { at: At, ts_ms: i64, reason: String },
}

impl PayloadError {
    /// Stable, machine-readable code (HTTP error code, MQTT rejection reason).
    pub fn code(&self) -> &'static str {
        match self {
            PayloadError::InvalidJson(_) => "invalid_json",
            PayloadError::InvalidMessage { .. } => "invalid_message",
            PayloadError::EmptyMessage { .. } => "empty_message",
            PayloadError::BatchTooLarge { .. } => "batch_too_large",
            PayloadError::TooManyMetrics { .. } => "too_many_metrics",
            PayloadError::InvalidMetricName { .. } => "invalid_metric_name",
            PayloadError::InvalidValue { .. } => "invalid_value",
            PayloadError::ValueTooLong { .. } => "value_too_long",
            PayloadError::InvalidTimestamp { .. } => "invalid_timestamp",
            PayloadError::TimestampOutOfRange { .. } => "timestamp_out_of_range",
        }
    }
}

/// Parses and validates a device payload: one message object or a JSON array of them.
///
/// A message without `timestamp` (or with `null`) is stamped `now_ms`. The whole payload is
/// refused at its first fault, so a batch is stored entirely or not at all.
pub fn parse_payload(
    payload: &[u8],
    now_ms: i64,
    limits: &PayloadLimits,
) -> Result<Vec<TelemetryMessage>, PayloadError> {
    match fast::parse(payload, now_ms, limits) {
        Some(messages) => Ok(messages),
        None => parse_payload_value(payload, now_ms, limits),
    }
}

/// [`parse_payload`] through a `serde_json::Value`: every payload the fast path leaves, and the
/// wording of every refusal.
fn parse_payload_value(
    payload: &[u8],
    now_ms: i64,
    limits: &PayloadLimits,
) -> Result<Vec<TelemetryMessage>, PayloadError> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| PayloadError::InvalidJson(e.to_string()))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(PayloadError::EmptyMessage {
                    at: At(None),
                    message: "the batch is an empty array".into(),
                });
            }
            if items.len() > limits.max_messages {
                return Err(PayloadError::BatchTooLarge {
                    count: items.len(),
                    max: limits.max_messages,
                });
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| parse_message(item, At(Some(i)), now_ms, limits))
                .collect()
        }
        other => Ok(vec![parse_message(other, At(None), now_ms, limits)?]),
    }
}

fn parse_message(
    value: Value,
    at: At,
    now_ms: i64,
    limits: &PayloadLimits,
) -> Result<TelemetryMessage, PayloadError> {
    let Value::Object(mut object) = value else {
        return Err(PayloadError::InvalidMessage {
            at,
            message: format!(
                "expected an object {{\"timestamp\": <epoch ms>, \"metrics\": {{...}}}}, got {}",
                json_kind(&value)
            ),
        });
    };
    if let Some(unknown) = object.keys().find(|k| *k != "timestamp" && *k != "metrics") {
        return Err(PayloadError::InvalidMessage {
            at,
            message: format!("unknown field {unknown:?}; a message has only \"timestamp\" and \"metrics\""),
        });
    }
    let server_stamped = matches!(object.get("timestamp"), None | Some(Value::Null));
    let ts_ms = match object.remove("timestamp") {
        None | Some(Value::Null) => now_ms,
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| PayloadError::InvalidTimestamp {
            at,
            reason: format!("expected an integer number of milliseconds since the epoch, got {n}"),
        })?,
        Some(other) => {
            return Err(PayloadError::InvalidTimestamp {
                at,
                reason: format!(
                    "expected an integer number of milliseconds since the epoch, got {}",
                    json_kind(&other)
                ),
            });
        }
    };
    check_timestamp(ts_ms, at, now_ms, limits)?;
    let metrics = match object.remove("metrics") {
        Some(Value::Object(metrics)) => metrics,
        None => {
            return Err(PayloadError::InvalidMessage {
                at,
                message: "missing field \"metrics\"".into(),
            });
        }
        Some(other) => {
            return Err(PayloadError::InvalidMessage {
                at,
                message: format!(
                    "\"metrics\" must be an object of name: value, got {}",
                    json_kind(&other)
                ),
            });
        }
    };
    if metrics.is_empty() {
        return Err(PayloadError::EmptyMessage {
            at,
            message: "\"metrics\" is empty".into(),
        });
    }
    if metrics.len() > limits.max_metrics {
        return Err(PayloadError::TooManyMetrics {
            at,
            count: metrics.len(),
            max: limits.max_metrics,
        });
    }
    let mut parsed = Vec::with_capacity(metrics.len());
    for (name, value) in metrics {
        let value = metric_value(&name, value, at, limits)?;
        let metric =
            MetricName::parse(name).map_err(|reason| PayloadError::InvalidMetricName { at, reason })?;
        parsed.push((metric, value));
    }
    Ok(TelemetryMessage {
        ts_ms,
        server_stamped,
        metrics: parsed,
    })
}

fn metric_value(
    name: &str,
    value: Value,
    at: At,
    limits: &PayloadLimits,
) -> Result<MetricValue, PayloadError> {
    let invalid = |reason: String| PayloadError::InvalidValue {
        at,
        metric: name.to_string(),
        reason,
    };
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(MetricValue::number)
            .ok_or_else(|| invalid(format!("{n} is not a finite number"))),
        Value::Bool(b) => Ok(MetricValue::Bool(b)),
        Value::String(s) if s.len() > limits.max_string_bytes => Err(PayloadError::ValueTooLong {
            at,
            metric: name.to_string(),
            len: s.len(),
            max: limits.max_string_bytes,
        }),
        Value::String(s) => Ok(MetricValue::Text(s)),
        other => Err(invalid(format!(
            "expected a number, a boolean or a string, got {}",
            json_kind(&other)
        ))),
    }
}

fn check_timestamp(ts_ms: i64, at: At, now_ms: i64, limits: &PayloadLimits) -> Result<(), PayloadError> {
    let out = |reason: String| PayloadError::TimestampOutOfRange { at, ts_ms, reason };
    if ts_ms > now_ms.saturating_add(limits.max_future_ms) {
        return Err(out(format!(
            "{} ahead of the server's clock; at most {} ahead is accepted",
            human_duration(ts_ms - now_ms),
            human_duration(limits.max_future_ms)
        )));
    }
    if ts_ms < now_ms.saturating_sub(limits.max_age_ms) {
        // Ten digits or fewer is almost certainly seconds rather than milliseconds.
        let hint = if (0..100_000_000_000).contains(&ts_ms) {
            " (timestamps are milliseconds since the epoch; this looks like seconds)"
        } else {
            ""
        };
        return Err(out(format!(
            "{} in the past; at most {} (the raw retention) is accepted{hint}",
            human_duration(now_ms.saturating_sub(ts_ms)),
            human_duration(limits.max_age_ms)
        )));
    }
    Ok(())
}

/// `90 s`, `12 min`, `5 h`, `30 days`: rounded down, for messages.
pub fn human_duration(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if s < 120 => format!("{s} s"),
        _ if s < 7200 => format!("{} min", s / 60),
        _ if s < 2 * 86_400 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn parse(text: &str) -> Result<Vec<TelemetryMessage>, PayloadError> {
        parse_payload(text.as_bytes(), NOW, &PayloadLimits::default())
    }

    fn code(text: &str) -> &'static str {
        parse(text).unwrap_err().code()
    }

    #[test]
    fn metric_names() {
        for ok in ["temperature", "_x", "cpu.load-1m", "A", &"x".repeat(64)] {
            assert!(MetricName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1st",
            ".x",
            "-x",
            "a b",
            "a,b",
            "a/b",
            "ü",
            "a\"b",
            &"x".repeat(65),
        ] {
            assert!(MetricName::parse(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MetricName>("\"a,b\"").is_err());
    }

    #[test]
    fn names_of_payloads_are_shared_once_validated() {
        let first = MetricName::parse_shared("shared_name").unwrap();
        let again = MetricName::parse_shared("shared_name").unwrap();
        assert!(Arc::ptr_eq(&first.0, &again.0));
        assert_eq!(again, MetricName::parse("shared_name").unwrap());
        assert_eq!(serde_json::to_string(&again).unwrap(), "\"shared_name\"");
        for bad in ["", "1st", "a b", &"x".repeat(65)] {
            assert!(MetricName::parse_shared(bad).is_err(), "{bad}");
            assert!(MetricName::parse_shared(bad).is_err(), "{bad} twice");
        }
        // Payloads take their names from it.
        let one = parse(r#"{"metrics": {"shared_name": 1}}"#).unwrap();
        assert!(Arc::ptr_eq(&one[0].metrics[0].0.0, &first.0));
        // The thread's set is bounded: past it, it starts over.
        for i in 0..SHARED_NAMES + 10 {
            MetricName::parse_shared(&format!("n{i}")).unwrap();
        }
        assert!(NAMES.with(|names| names.borrow().len()) <= SHARED_NAMES);
    }

    #[test]
    fn seed_payload_parses() {
        let messages =
            parse(r#"{"timestamp": 1699999999000, "metrics": {"temperature": 22.5, "humidity": 65.0}}"#)
                .unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].ts_ms, 1_699_999_999_000);
        let mut metrics = messages[0].metrics.clone();
        metrics.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            metrics,
            vec![
                (MetricName::parse("humidity").unwrap(), MetricValue::Number(65.0)),
                (
                    MetricName::parse("temperature").unwrap(),
                    MetricValue::Number(22.5)
                ),
            ]
        );
    }

    #[test]
    fn batches_missing_timestamps_and_value_kinds() {
        let messages = parse(
            r#"[{"metrics": {"door": true, "status": "ok"}}, {"timestamp": null, "metrics": {"n": -3}}]"#,
        )
        .unwrap();
        assert_eq!(messages.len(), 2);
        assert!(messages.iter().all(|m| m.ts_ms == NOW));
        assert!(
            messages[0]
                .metrics
                .contains(&(MetricName::parse("door").unwrap(), MetricValue::Bool(true)))
        );
        assert!(messages[0].metrics.contains(&(
            MetricName::parse("status").unwrap(),
            MetricValue::Text("ok".into())
        )));
        assert_eq!(messages[1].metrics[0].1, MetricValue::Number(-3.0));
    }

    #[test]
    fn points_carry_their_device() {
        let tenant = TenantId::parse("acme").unwrap();
        let device = DeviceId::parse("sensor-001").unwrap();
        let message = parse(r#"{"timestamp": 1699999999000, "metrics": {"t": 1}}"#)
            .unwrap()
            .remove(0);
        let points = message.into_points(&tenant, &device, &Arc::from("temperature"));
        assert_eq!(
            points,
            vec![TelemetryPoint {
                tenant,
                device,
                device_type: "temperature".into(),
                metric: MetricName::parse("t").unwrap(),
                ts_ms: 1_699_999_999_000,
                value: MetricValue::Number(1.0),
            }]
        );
    }

    #[test]
    fn every_refusal_has_its_code_and_names_the_culprit() {
        assert_eq!(code("{\"metrics\": "), "invalid_json");
        assert_eq!(code("42"), "invalid_message");
        assert_eq!(code(r#"{"metrics": {"a": 1}, "extra": 1}"#), "invalid_message");
        assert_eq!(code(r#"{"timestamp": 1699999999000}"#), "invalid_message");
        assert_eq!(code(r#"{"metrics": [1]}"#), "invalid_message");
        assert_eq!(code(r#"{"metrics": {}}"#), "empty_message");
        assert_eq!(code("[]"), "empty_message");
        assert_eq!(code(r#"{"metrics": {"1x": 1}}"#), "invalid_metric_name");
        assert_eq!(code(r#"{"metrics": {"a": null}}"#), "invalid_value");
        assert_eq!(code(r#"{"metrics": {"a": {"b": 1}}}"#), "invalid_value");
        assert_eq!(
            code(r#"{"timestamp": "yesterday", "metrics": {"a": 1}}"#),
            "invalid_timestamp"
        );
        assert_eq!(
            code(r#"{"timestamp": 1.5, "metrics": {"a": 1}}"#),
            "invalid_timestamp"
        );

        let err = parse(r#"[{"metrics": {"a": 1}}, {"metrics": {"ok": 1, "bad name": 2}}]"#).unwrap_err();
        assert_eq!(err.code(), "invalid_metric_name");
        assert!(err.to_string().starts_with("message 1: "), "{err}");
        assert!(err.to_string().contains("bad name"), "{err}");

        let err = parse(r#"{"metrics": {"temp": [1, 2]}}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "metric \"temp\": expected a number, a boolean or a string, got an array"
        );
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        // JSON cannot spell NaN; serde_json refuses out-of-range literals as malformed.
        assert_eq!(code(r#"{"metrics": {"a": 1e999}}"#), "invalid_json");
        assert_eq!(code(r#"{"metrics": {"a": NaN}}"#), "invalid_json");
        assert!(MetricValue::number(f64::NAN).is_none());
        assert!(MetricValue::number(f64::INFINITY).is_none());
        assert_eq!(MetricValue::number(1.5), Some(MetricValue::Number(1.5)));
    }

    #[test]
    fn limits_are_enforced() {
        let limits = PayloadLimits {
            max_messages: 2,
            max_metrics: 2,
            max_string_bytes: 4,
            ..PayloadLimits::default()
        };
        let run = |text: &str| parse_payload(text.as_bytes(), NOW, &limits).map_err(|e| e.code());
        assert_eq!(
            run(r#"[{"metrics":{"a":1}},{"metrics":{"a":1}},{"metrics":{"a":1}}]"#),
            Err("batch_too_large")
        );
        assert_eq!(run(r#"{"metrics":{"a":1,"b":2,"c":3}}"#), Err("too_many_metrics"));
        assert_eq!(run(r#"{"metrics":{"a":"12345"}}"#), Err("value_too_long"));
        assert!(run(r#"{"metrics":{"a":"1234","b":2}}"#).is_ok());
    }

    #[test]
    fn timestamp_window() {
        let limits = PayloadLimits::default();
        let at = |ts: i64| {
            parse_payload(
                format!(r#"{{"timestamp": {ts}, "metrics": {{"a": 1}}}}"#).as_bytes(),
                NOW,
                &limits,
            )
        };
        assert!(at(NOW + limits.max_future_ms).is_ok());
        assert!(at(NOW - limits.max_age_ms).is_ok());
        let err = at(NOW + limits.max_future_ms + 1).unwrap_err();
        assert_eq!(err.code(), "timestamp_out_of_range");
        assert!(err.to_string().contains("ahead"), "{err}");
        assert_eq!(
            at(NOW - limits.max_age_ms - 1).unwrap_err().code(),
            "timestamp_out_of_range"
        );
        let err = at(NOW / 1000).unwrap_err();
        assert!(err.to_string().contains("looks like seconds"), "{err}");
    }

    #[test]
    fn points_round_trip_through_json() {
        let point = TelemetryPoint {
            tenant: TenantId::parse("t").unwrap(),
            device: DeviceId::parse("d").unwrap(),
            device_type: "x".into(),
            metric: MetricName::parse("status").unwrap(),
            ts_ms: NOW,
            value: MetricValue::Text("ok".into()),
        };
        let text = serde_json::to_string(&point).unwrap();
        assert_eq!(serde_json::from_str::<TelemetryPoint>(&text).unwrap(), point);
        for value in [MetricValue::Number(2.0), MetricValue::Bool(false)] {
            let text = serde_json::to_string(&value).unwrap();
            assert_eq!(serde_json::from_str::<MetricValue>(&text).unwrap(), value);
        }
    }
}
