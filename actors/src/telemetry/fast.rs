//! The common payload parsed straight into messages, without a `serde_json::Value` tree.
//!
//! A profile of MQTT ingestion showed the allocator among the largest items, and every payload
//! went through a `Value`: a `BTreeMap` node and an owned key per object, another per `metrics`
//! object, a `Value` per metric. This path reads the same JSON with borrowed keys into a short
//! list and builds the [`TelemetryMessage`]s directly. It accepts only payloads it can read
//! without any doubt and leaves everything else, every refusal included, to the `Value` path,
//! which alone words the errors: [`parse`] returns `None` and the caller parses again. So the
//! result of a payload is the same whichever path read it (the tests compare both on valid and
//! invalid payloads), and a refused payload costs one extra parse.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer as _;
use serde::de::{self, Deserialize, MapAccess, SeqAccess, Visitor};

use super::{At, MetricName, MetricValue, PayloadLimits, TelemetryMessage, check_timestamp};

/// The messages of a valid payload, or `None` when the `Value` path must decide.
pub(super) fn parse(payload: &[u8], now_ms: i64, limits: &PayloadLimits) -> Option<Vec<TelemetryMessage>> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let raw: Vec<RawMessage<'_>> = match payload
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?
    {
        b'{' => vec![RawMessage::deserialize(&mut de).ok()?],
        b'[' => {
            let batch = de
                .deserialize_seq(Batch {
                    max: limits.max_messages,
                })
                .ok()?;
            if batch.is_empty() {
                return None;
            }
            batch
        }
        _ => return None,
    };
    de.end().ok()?;
    let mut messages = Vec::with_capacity(raw.len());
    for message in raw {
        messages.push(message.into_message(now_ms, limits)?);
    }
    Some(messages)
}

struct RawMessage<'a> {
    /// `None`: absent or `null`.
    timestamp: Option<i64>,
    metrics: Vec<(&'a str, RawValue<'a>)>,
}

enum RawValue<'a> {
    Number(f64),
    Bool(bool),
    Text(Cow<'a, str>),
}

impl RawMessage<'_> {
    fn into_message(mut self, now_ms: i64, limits: &PayloadLimits) -> Option<TelemetryMessage> {
        let ts_ms = self.timestamp.unwrap_or(now_ms);
        check_timestamp(ts_ms, At(None), now_ms, limits).ok()?;
        // As the `Value` path's map: ordered by name, the last of a repeated name wins.
        self.metrics.sort_by(|a, b| a.0.cmp(b.0));
        let mut metrics: Vec<(MetricName, MetricValue)> = Vec::with_capacity(self.metrics.len());
        let mut previous: Option<&str> = None;
        for (name, value) in self.metrics {
            let value = match value {
                RawValue::Number(n) => MetricValue::number(n)?,
                RawValue::Bool(b) => MetricValue::Bool(b),
                RawValue::Text(s) if s.len() > limits.max_string_bytes => return None,
                RawValue::Text(s) => MetricValue::Text(s.into_owned()),
            };
            if previous == Some(name) {
                metrics.last_mut()?.1 = value;
                continue;
            }
            previous = Some(name);
            metrics.push((MetricName::parse_shared(name).ok()?, value));
        }
        if metrics.is_empty() || metrics.len() > limits.max_metrics {
            return None;
        }
        Some(TelemetryMessage {
            ts_ms,
            server_stamped: self.timestamp.is_none(),
            metrics,
        })
    }
}

/// A batch of at most `max` messages (a longer one is the `Value` path's refusal to word).
struct Batch {
    max: usize,
}

impl<'de> Visitor<'de> for Batch {
    type Value = Vec<RawMessage<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(self.max));
        while let Some(message) = seq.next_element::<RawMessage<'de>>()? {
            if out.len() == self.max {
                return Err(de::Error::custom("batch too large"));
            }
            out.push(message);
        }
        Ok(out)
    }
}

impl<'de> Deserialize<'de> for RawMessage<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MessageVisitor)
    }
}

struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = RawMessage<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut timestamp: Option<Option<i64>> = None;
        let mut metrics = None;
        // Keys with escapes cannot be borrowed: the `Value` path takes those payloads.
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                "timestamp" if timestamp.is_none() => timestamp = Some(map.next_value()?),
                "metrics" if metrics.is_none() => metrics = Some(map.next_value::<Metrics<'de>>()?.0),
                _ => return Err(de::Error::custom("not the common shape")),
            }
        }
        Ok(RawMessage {
            timestamp: timestamp.flatten(),
            metrics: metrics.ok_or_else(|| de::Error::custom("no metrics"))?,
        })
    }
}

struct Metrics<'a>(Vec<(&'a str, RawValue<'a>)>);

impl<'de> Deserialize<'de> for Metrics<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetricsVisitor;
        impl<'de> Visitor<'de> for MetricsVisitor {
            type Value = Metrics<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of metrics")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(name) = map.next_key::<&'de str>()? {
                    out.push((name, map.next_value()?));
                }
                Ok(Metrics(out))
            }
        }
        deserializer.deserialize_map(MetricsVisitor)
    }
}

impl<'de> Deserialize<'de> for RawValue<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = RawValue<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a boolean or a string")
            }

            // The conversions are serde_json's `Number::as_f64`.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(RawValue::Number(v as f64))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawValue::Number(v as f64))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(RawValue::Number(v))
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(RawValue::Bool(v))
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(RawValue::Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawValue::Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(RawValue::Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::parse_payload_value;

    const NOW: i64 = 1_700_000_000_000;

    /// Payloads the fast path must read itself, with the `Value` path's result.
    const COMMON: &[&str] = &[
        r#"{"timestamp": 1700000000000, "metrics": {"temperature": 22.5, "ok": true}}"#,
        r#"{"metrics": {"seq": 17, "m1": -3, "status": "idle"}}"#,
        r#"{"timestamp": null, "metrics": {"b": 1, "a": 2}}"#,
        r#"{"metrics": {"big": 18446744073709551615, "neg": -9223372036854775808, "e": 1.5e300}}"#,
        r#" [{"timestamp": 1700000000001, "metrics": {"a": 1}}, {"metrics": {"a": 2, "b": "x\ny"}}] "#,
        r#"{"metrics": {"a": 1, "b": 2, "a": 3}}"#,
        r#"{"metrics": {"n": -0.0, "t": "caf\u00e9"}}"#,
    ];

    /// Payloads that are refused, or that only the `Value` path reads.
    const OTHERS: &[&str] = &[
        "",
        "null",
        "[]",
        "[1]",
        "{",
        r#"{"metrics": {}}"#,
        r#"{"metrics": {"a": null}}"#,
        r#"{"metrics": {"a": [1]}}"#,
        r#"{"metrics": {"a": {"b": 1}}}"#,
        r#"{"metrics": {"1a": 1}}"#,
        r#"{"metrics": {"a b": 1}}"#,
        r#"{"metrics": {"\u0061": 1}}"#,
        r#"{"metrics": 5}"#,
        r#"{"timestamp": 1700000000000}"#,
        r#"{"timestamp": 1.5, "metrics": {"a": 1}}"#,
        r#"{"timestamp": "now", "metrics": {"a": 1}}"#,
        r#"{"timestamp": 1700000000, "metrics": {"a": 1}}"#,
        r#"{"timestamp": 99999999999999999, "metrics": {"a": 1}}"#,
        r#"{"timestamp": 18446744073709551615, "metrics": {"a": 1}}"#,
        r#"{"timestamp": 1700000000000, "timestamp": 1700000000001, "metrics": {"a": 1}}"#,
        r#"{"metrics": {"a": 1}, "extra": 2}"#,
        r#"{"metrics": {"a": 1}} trailing"#,
        r#"{"metrics": {"a": 1e400}}"#,
        r#"{"metrics": {"a": "x", "a": 1}}"#,
        r#"[{"metrics": {"a": 1}}, {"metrics": {}}]"#,
        r#"[{"metrics": {"a": 1}}, 7]"#,
    ];

    fn limits() -> PayloadLimits {
        PayloadLimits {
            max_messages: 3,
            max_metrics: 3,
            max_string_bytes: 8,
            ..PayloadLimits::default()
        }
    }

    #[test]
    fn the_fast_path_reads_common_payloads_as_the_value_path_does() {
        for payload in COMMON {
            let fast = parse(payload.as_bytes(), NOW, &limits());
            let value = parse_payload_value(payload.as_bytes(), NOW, &limits());
            assert_eq!(fast.as_ref(), Some(value.as_ref().unwrap()), "{payload}");
        }
    }

    #[test]
    fn the_fast_path_leaves_every_other_payload_to_the_value_path_or_agrees_with_it() {
        let long = format!(r#"{{"metrics": {{"a": "{}"}}}}"#, "x".repeat(9));
        let many = r#"{"metrics": {"a": 1, "b": 2, "c": 3, "d": 4}}"#.to_string();
        let batch = format!("[{}]", [r#"{"metrics": {"a": 1}}"#; 4].join(","));
        let others = OTHERS.iter().map(|s| s.to_string()).chain([long, many, batch]);
        for payload in others {
            let value = parse_payload_value(payload.as_bytes(), NOW, &limits());
            match parse(payload.as_bytes(), NOW, &limits()) {
                None => {}
                Some(fast) => assert_eq!(Ok(fast), value, "{payload}"),
            }
            // Through the public function the outcome is the Value path's, refusals included.
            assert_eq!(
                crate::telemetry::parse_payload(payload.as_bytes(), NOW, &limits()),
                value,
                "{payload}"
            );
        }
        // Refusals are never read by the fast path.
        for payload in OTHERS
            .iter()
            .filter(|p| parse_payload_value(p.as_bytes(), NOW, &limits()).is_err())
        {
            assert!(parse(payload.as_bytes(), NOW, &limits()).is_none(), "{payload}");
        }
    }
}
