//! Per-device-type telemetry rules: renames and unit conversions applied to incoming metrics,
//! then declared types and ranges enforced.
//!
//! A device type may declare a [`DeviceTypeSchema`]. Device actors of that type apply it to
//! every payload after [`parse_payload`](super::parse_payload) and before the points go to the
//! writers, so the store only ever holds the declared names, units and ranges. The whole
//! payload is refused at its first violation (like any other payload error), so a batch is
//! stored entirely or not at all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{MetricName, MetricValue, TelemetryMessage};

/// The kind of value a metric must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    Number,
    Boolean,
    String,
}

impl MetricKind {
    fn of(value: &MetricValue) -> MetricKind {
        match value {
            MetricValue::Number(_) => MetricKind::Number,
            MetricValue::Bool(_) => MetricKind::Boolean,
            MetricValue::Text(_) => MetricKind::String,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MetricKind::Number => "a number",
            MetricKind::Boolean => "a boolean",
            MetricKind::String => "a string",
        }
    }
}

/// What one metric of the type must be (after renames and conversions).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricRule {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<MetricKind>,
    /// Smallest accepted number (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest accepted number (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The unit, for people (`°C`, `%`); not interpreted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// A linear unit conversion: `value * scale + offset`, stored under `to` (or the same name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversion {
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// The name the converted value is stored under; the original name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<MetricName>,
}

fn one() -> f64 {
    1.0
}

/// A device type's telemetry schema and transformation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceTypeSchema {
    /// Incoming metric names to store under another name (`{"temp": "temperature"}`).
    pub rename: BTreeMap<MetricName, MetricName>,
    /// Unit conversions by incoming name (after renames), e.g. Fahrenheit to Celsius:
    /// `{"temperature_f": {"scale": 0.5555556, "offset": -17.777778, "to": "temperature"}}`.
    pub convert: BTreeMap<MetricName, Conversion>,
    /// Declared metrics, checked after renames and conversions.
    pub metrics: BTreeMap<MetricName, MetricRule>,
    /// Refuse metrics that are not declared in `metrics`.
    pub strict: bool,
}

/// A payload that breaks its device type's schema.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    #[error("message {index}: metric `{metric}` must be {expected}")]
    WrongType {
        index: usize,
        metric: String,
        expected: &'static str,
    },
    #[error("message {index}: metric `{metric}` = {value} is outside [{min}, {max}]")]
    OutOfRange {
        index: usize,
        metric: String,
        value: f64,
        min: String,
        max: String,
    },
    #[error("message {index}: metric `{metric}` is not declared by the device type (strict schema)")]
    UnknownMetric { index: usize, metric: String },
    #[error("message {index}: two metrics become `{metric}` after the device type's renames and conversions")]
    Collision { index: usize, metric: String },
    #[error("message {index}: metric `{metric}` cannot be converted: {reason}")]
    Conversion {
        index: usize,
        metric: String,
        reason: String,
    },
}

impl SchemaError {
    /// Stable codes, next to the payload errors of [`PayloadError::code`](super::PayloadError::code).
    pub fn code(&self) -> &'static str {
        match self {
            SchemaError::WrongType { .. } => "schema_wrong_type",
            SchemaError::OutOfRange { .. } => "schema_out_of_range",
            SchemaError::UnknownMetric { .. } => "schema_unknown_metric",
            SchemaError::Conversion { .. } => "schema_conversion_failed",
            SchemaError::Collision { .. } => "schema_metric_collision",
        }
    }
}

impl DeviceTypeSchema {
    /// Checks the schema itself: ranges ordered and finite, conversions finite, no rename or
    /// conversion that would make two metrics collide in one step.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rule) in &self.metrics {
            for bound in [rule.min, rule.max].into_iter().flatten() {
                if !bound.is_finite() {
                    return Err(format!("metrics.{name}: bounds must be finite numbers"));
                }
            }
            if let (Some(min), Some(max)) = (rule.min, rule.max)
                && min > max
            {
                return Err(format!("metrics.{name}: min ({min}) is above max ({max})"));
            }
            if (rule.min.is_some() || rule.max.is_some())
                && rule.kind.is_some_and(|k| k != MetricKind::Number)
            {
                return Err(format!("metrics.{name}: min and max apply to numbers only"));
            }
        }
        for (name, conversion) in &self.convert {
            if !conversion.scale.is_finite() || !conversion.offset.is_finite() || conversion.scale == 0.0 {
                return Err(format!(
                    "convert.{name}: scale must be a non-zero finite number and offset finite"
                ));
            }
        }
        let mut targets = std::collections::BTreeSet::new();
        for to in self.rename.values() {
            if !targets.insert(to) {
                return Err(format!("rename: two metrics are renamed to `{to}`"));
            }
            if self.rename.contains_key(to) {
                return Err(format!("rename: `{to}` is both renamed and a rename's target"));
            }
        }
        Ok(())
    }

    /// Renames, converts and checks every metric of `messages` in place.
    pub fn apply(&self, messages: &mut [TelemetryMessage]) -> Result<(), SchemaError> {
        for (index, message) in messages.iter_mut().enumerate() {
            for (name, value) in message.metrics.iter_mut() {
                if let Some(to) = self.rename.get(name) {
                    *name = to.clone();
                }
                if let Some(conversion) = self.convert.get(name) {
                    let MetricValue::Number(x) = value else {
                        return Err(SchemaError::Conversion {
                            index,
                            metric: name.to_string(),
                            reason: "only numbers are converted".into(),
                        });
                    };
                    *value =
                        MetricValue::number(*x * conversion.scale + conversion.offset).ok_or_else(|| {
                            SchemaError::Conversion {
                                index,
                                metric: name.to_string(),
                                reason: "the result is not a finite number".into(),
                            }
                        })?;
                    if let Some(to) = &conversion.to {
                        *name = to.clone();
                    }
                }
                self.check(index, name, value)?;
            }
            // A rename onto a metric the message also carries would keep one value of two.
            let mut seen = std::collections::BTreeSet::new();
            if let Some((name, _)) = message
                .metrics
                .iter()
                .find(|(name, _)| !seen.insert(name.clone()))
            {
                return Err(SchemaError::Collision {
                    index,
                    metric: name.to_string(),
                });
            }
        }
        Ok(())
    }

    fn check(&self, index: usize, name: &MetricName, value: &MetricValue) -> Result<(), SchemaError> {
        let Some(rule) = self.metrics.get(name) else {
            if self.strict {
                return Err(SchemaError::UnknownMetric {
                    index,
                    metric: name.to_string(),
                });
            }
            return Ok(());
        };
        if let Some(kind) = rule.kind
            && MetricKind::of(value) != kind
        {
            return Err(SchemaError::WrongType {
                index,
                metric: name.to_string(),
                expected: kind.name(),
            });
        }
        if rule.min.is_some() || rule.max.is_some() {
            let MetricValue::Number(x) = value else {
                return Err(SchemaError::WrongType {
                    index,
                    metric: name.to_string(),
                    expected: MetricKind::Number.name(),
                });
            };
            let below = rule.min.is_some_and(|min| *x < min);
            let above = rule.max.is_some_and(|max| *x > max);
            if below || above {
                let bound = |b: Option<f64>, open: &str| b.map_or(open.to_string(), |b| b.to_string());
                return Err(SchemaError::OutOfRange {
                    index,
                    metric: name.to_string(),
                    value: *x,
                    min: bound(rule.min, "-inf"),
                    max: bound(rule.max, "inf"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::telemetry::{PayloadLimits, parse_payload};

    fn schema(value: serde_json::Value) -> DeviceTypeSchema {
        let schema: DeviceTypeSchema = serde_json::from_value(value).unwrap();
        schema.validate().unwrap();
        schema
    }

    fn run(schema: &DeviceTypeSchema, payload: &str) -> Result<Vec<(String, MetricValue)>, SchemaError> {
        let mut messages = parse_payload(payload.as_bytes(), 1_000, &PayloadLimits::default()).unwrap();
        schema.apply(&mut messages)?;
        Ok(messages
            .into_iter()
            .flat_map(|m| m.metrics.into_iter().map(|(n, v)| (n.to_string(), v)))
            .collect())
    }

    fn thermometer() -> DeviceTypeSchema {
        schema(json!({
            "rename": {"temp": "temperature"},
            "convert": {"temperature_f": {"scale": 0.5, "offset": -16.0, "to": "temperature"}},
            "metrics": {
                "temperature": {"type": "number", "min": -40, "max": 85, "unit": "°C"},
                "door": {"type": "boolean"}
            }
        }))
    }

    #[test]
    fn renames_and_conversions_apply_before_the_checks() {
        let s = thermometer();
        assert_eq!(
            run(&s, r#"{"metrics":{"temp":21.5}}"#).unwrap(),
            vec![("temperature".into(), MetricValue::Number(21.5))]
        );
        assert_eq!(
            run(&s, r#"{"metrics":{"temperature_f":70}}"#).unwrap(),
            vec![("temperature".into(), MetricValue::Number(19.0))]
        );
        // Undeclared metrics pass unless the schema is strict.
        assert_eq!(run(&s, r#"{"metrics":{"rssi":-70}}"#).unwrap().len(), 1);
    }

    #[test]
    fn violations_name_the_message_and_metric() {
        let s = thermometer();
        let error = run(&s, r#"[{"metrics":{"temp":20}},{"metrics":{"temp":90}}]"#).unwrap_err();
        assert_eq!(error.code(), "schema_out_of_range");
        assert_eq!(
            error.to_string(),
            "message 1: metric `temperature` = 90 is outside [-40, 85]"
        );
        assert_eq!(
            run(&s, r#"{"metrics":{"temperature_f":300}}"#)
                .unwrap_err()
                .code(),
            "schema_out_of_range"
        );
        assert_eq!(
            run(&s, r#"{"metrics":{"door":"open"}}"#).unwrap_err().code(),
            "schema_wrong_type"
        );
        assert_eq!(
            run(&s, r#"{"metrics":{"temperature":"hot"}}"#)
                .unwrap_err()
                .code(),
            "schema_wrong_type"
        );
        assert_eq!(
            run(&s, r#"{"metrics":{"temperature_f":"x"}}"#)
                .unwrap_err()
                .code(),
            "schema_conversion_failed"
        );
        // Both names in one message would leave one value of two: refused, not merged.
        assert_eq!(
            run(&s, r#"{"metrics":{"temp":1,"temperature":2}}"#)
                .unwrap_err()
                .code(),
            "schema_metric_collision"
        );
        let strict = schema(json!({"metrics": {"temperature": {}}, "strict": true}));
        assert_eq!(
            run(&strict, r#"{"metrics":{"rssi":1}}"#).unwrap_err().code(),
            "schema_unknown_metric"
        );
        assert!(run(&strict, r#"{"metrics":{"temperature":1e300}}"#).is_ok());
    }

    #[test]
    fn bad_schemas_are_refused() {
        let invalid =
            |v: serde_json::Value| serde_json::from_value::<DeviceTypeSchema>(v).map(|s| s.validate());
        assert!(matches!(
            invalid(json!({"metrics": {"t": {"min": 5, "max": 1}}})),
            Ok(Err(_))
        ));
        assert!(matches!(
            invalid(json!({"metrics": {"t": {"type": "string", "max": 1}}})),
            Ok(Err(_))
        ));
        assert!(matches!(
            invalid(json!({"convert": {"t": {"scale": 0}}})),
            Ok(Err(_))
        ));
        assert!(matches!(
            invalid(json!({"rename": {"a": "x", "b": "x"}})),
            Ok(Err(_))
        ));
        assert!(matches!(
            invalid(json!({"rename": {"a": "b", "b": "a"}})),
            Ok(Err(_))
        ));
        assert!(invalid(json!({"metrics": {"bad name!": {}}})).is_err());
        assert!(invalid(json!({"unknown": 1})).is_err());
        assert!(invalid(json!({"metrics": {"t": {"type": "integer"}}})).is_err());
    }
}
