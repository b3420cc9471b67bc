//! Rule and channel definitions as the API takes them, their validation, and their conversion
//! into the evaluator's [`RuleSpec`].
//!
//! Accepted rule bodies include the product description's own: `{"name": …, "condition":
//! "temperature > 30", "actions": [{"type": "webhook", "url": …}]}`. A condition is either an
//! expression string or an object with a `type`. Secrets in actions and channels are write-only:
//! they are sealed before storage and views show `secretSet: true` instead.

use drover_actors::analytics::detector::Method;
use drover_actors::analytics::forecast::Direction;
use drover_actors::rules::names;
use drover_actors::rules::script::{CONTEXT_VARIABLES, Sandbox, ScriptError};
use drover_actors::rules::{ClearSpec, ConditionSpec, RuleScope, RuleSpec, Severity};
use drover_actors::{DeviceId, GroupName, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::crypto::SecretBox;
use super::destination::DestinationPolicy;
use crate::config::mask_url;

/// Why a definition was refused (the API answers 400 with `code`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    pub code: &'static str,
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> ModelError {
    ModelError {
        code: "invalid_field",
        field: field.into(),
        message: format!("{field}: {}", message.into()),
    }
}

/// A nested object (`condition`, `clear`) that does not parse: a misspelled key is
/// `unknown_field` as in any body, anything else `invalid_field`.
fn invalid_object(field: &str, error: serde_json::Error) -> ModelError {
    let message = error.to_string();
    ModelError {
        code: if message.starts_with("unknown field") {
            "unknown_field"
        } else {
            "invalid_field"
        },
        field: field.into(),
        message: format!("{field}: {message}"),
    }
}

fn expression_error(field: &str, error: ScriptError) -> ModelError {
    let at = error
        .position()
        .map(|(l, c)| format!(" (line {l}, column {c})"))
        .unwrap_or_default();
    ModelError {
        code: "invalid_expression",
        field: field.into(),
        message: format!("{field}{at}: {error}"),
    }
}

/// A rule as created or replaced through the API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleBody {
    #[schema(example = "High temperature")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "enabled_default")]
    pub enabled: bool,
    /// critical, major, minor or warning (default major); an expression may return another.
    #[serde(default = "severity_default")]
    pub severity: String,
    /// Which devices: `{"type": "all"}` (default), `{"type": "deviceType", "value": "thermo"}`,
    /// `{"type": "group", "value": …}`, `{"type": "tag", "value": …}`, `{"type": "device", "value": …}`.
    #[serde(default)]
    pub scope: ScopeBody,
    /// The metric `current` stands for (required by statistical conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Span of the window statistics `metrics.<name>.avg|std|min|max|count|last|sum`, seconds.
    #[serde(default = "window_default")]
    pub window_secs: u64,
    /// An expression (`"temperature > 30"`) or a typed condition (`{"type": "duration", …}`).
    #[schema(value_type = Object)]
    pub condition: Value,
    /// When the alarm clears itself: an expression, or `{"expression": …, "forSecs": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub clear: Option<Value>,
    /// What happens when an alarm opens.
    #[serde(default)]
    pub actions: Vec<ActionBody>,
    /// Further steps while the alarm stays active and unacknowledged.
    #[serde(default)]
    pub escalation: Vec<EscalationStep>,
    #[serde(default)]
    pub notify: NotifyPolicy,
}

fn enabled_default() -> bool {
    true
}
fn severity_default() -> String {
    "major".into()
}
fn window_default() -> u64 {
    300
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScopeBody {
    /// all, deviceType, group, tag or device.
    #[serde(rename = "type", default = "scope_all")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn scope_all() -> String {
    "all".into()
}

impl Default for ScopeBody {
    fn default() -> Self {
        ScopeBody {
            kind: scope_all(),
            value: None,
        }
    }
}

/// One escalation step: `actions` run `afterSecs` after the alarm opened, if it is still active
/// and unacknowledged.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EscalationStep {
    pub after_secs: u64,
    pub actions: Vec<ActionBody>,
}

/// Throttling of a rule's notifications.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotifyPolicy {
    /// Alarms of this rule that notify per hour (0 = no limit); the others are recorded only.
    #[serde(default)]
    pub max_per_hour: u32,
    /// After an alarm of a device cleared, a new one within this many seconds does not notify.
    #[serde(default)]
    pub quiet_period_secs: u64,
}

/// What an action does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ActionKind {
    Webhook,
    Email,
    Sms,
    MqttCommand,
    ShadowPatch,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Webhook => "webhook",
            ActionKind::Email => "email",
            ActionKind::Sms => "sms",
            ActionKind::MqttCommand => "mqttCommand",
            ActionKind::ShadowPatch => "shadowPatch",
        }
    }
}

/// An action: a named channel (`channel`), or inline settings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActionBody {
    #[serde(rename = "type")]
    pub kind: ActionKind,
    /// A channel of `/api/channels` (webhook, email, sms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Webhook URL (inline): a public address unless the operator allows others
    /// (`NOTIFY_ALLOWED_NETWORKS`; else 400 `destination_not_allowed`). A password in it is
    /// shown masked (`user:***@host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Webhook HMAC key (inline, write-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Sealed secret, as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub secret_sealed: Option<String>,
    /// Email addresses or phone numbers (inline, or in addition to the channel's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// MQTT command name (published on `devices/{id}/commands/{command}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// MQTT command payload, or the desired-state patch of a shadow action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub payload: Option<Value>,
}

/// A named notification channel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelBody {
    pub name: String,
    /// webhook, email or sms.
    #[serde(rename = "type")]
    pub kind: ActionKind,
    /// Webhook URL: a public address unless the operator allows others
    /// (`NOTIFY_ALLOWED_NETWORKS`; else 400 `destination_not_allowed`). A password in it is
    /// shown masked (`user:***@host`); sent back masked, the stored one is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Recipients (email addresses, phone numbers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// SMS sender number (defaults to `sms.from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// SMS gateway account (defaults to `sms.account_sid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_sid: Option<String>,
    /// Webhook timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Webhook HMAC key or SMS gateway token (write-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

fn check_name(field: &str, name: &str) -> Result<(), ModelError> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 128 || n != name {
        return Err(invalid(
            field,
            "1 to 128 characters without leading or trailing spaces",
        ));
    }
    Ok(())
}

fn check_url(field: &str, url: &str) -> Result<(), ModelError> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        _ => Err(invalid(field, "an http:// or https:// URL")),
    }
}

/// Refuses a webhook URL naming an address the policy does not allow. A host name passes here
/// and is judged on the addresses it resolves to at delivery.
fn check_destination(field: &str, url: &str, policy: &DestinationPolicy) -> Result<(), ModelError> {
    match reqwest::Url::parse(url) {
        Ok(u) if !policy.allows_url(&u) => Err(ModelError {
            code: "destination_not_allowed",
            field: field.into(),
            message: format!(
                "{field}: notifications may not go to this address (loopback, private, \
                 link-local, unique-local, multicast and unspecified addresses are refused unless \
                 the operator allows them with NOTIFY_ALLOWED_NETWORKS)"
            ),
        }),
        _ => Ok(()),
    }
}

/// A URL sent back as the API showed it (`user:***@host`, `?token=***`) means "keep the stored
/// one": returns the stored URL it masks, if any.
pub fn unmask_url<'a>(sent: &str, stored: impl IntoIterator<Item = &'a str>) -> Option<String> {
    if !sent.contains(":***@") && !sent.contains("=***") {
        return None;
    }
    stored
        .into_iter()
        .find(|s| *s != sent && mask_url(s) == sent)
        .map(String::from)
}

#[derive(Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
enum TypedCondition {
    Expression {
        expression: String,
    },
    Duration {
        expression: String,
        for_secs: u64,
    },
    Repeating {
        expression: String,
        count: u32,
        within_secs: u64,
    },
    Statistical {
        threshold: Option<f64>,
        min_samples: Option<u32>,
    },
    Pattern {
        first: String,
        then: String,
        within_secs: u64,
    },
    Group {
        expression: String,
        min_devices: u32,
        within_secs: u64,
    },
    Absence {
        for_secs: u64,
    },
    Anomaly {
        method: String,
        threshold: Option<f64>,
        clear_after_secs: Option<i64>,
    },
    Forecast {
        metric: Option<String>,
        below: Option<f64>,
        above: Option<f64>,
        within_secs: Option<i64>,
    },
}

/// How long an anomaly alarm waits, with the score under the threshold, before it clears.
const ANOMALY_CLEAR_AFTER_SECS: i64 = 300;

/// The methods an `anomaly` condition may name, and the range of its threshold in each one's
/// unit.
fn anomaly_method(method: &str, threshold: Option<f64>) -> Result<Method, ModelError> {
    let parsed = match method {
        "zscore" => Method::ZScore,
        "mad" => Method::Mad,
        "ewma" => Method::Ewma,
        "eif" => Method::Eif,
        "ensemble" => Method::Ensemble,
        other => {
            return Err(invalid(
                "condition.method",
                format!("unknown method {other:?}: expected eif, zscore, mad, ewma or ensemble"),
            ));
        }
    };
    if let Some(t) = threshold {
        let (ok, expected) = match parsed {
            Method::Eif => (
                t > 0.0 && t <= 1.0,
                "a normalised isolation-forest score above 0 and at most 1 (e.g. 0.7)",
            ),
            Method::Ensemble => (
                t > 0.0 && t <= 100.0,
                "a multiple of the configured threshold above 0 and at most 100 (1.0 = the threshold)",
            ),
            _ => (
                t > 0.0 && t <= 100.0,
                "a number of standard deviations above 0 and at most 100 (e.g. 3)",
            ),
        };
        if !(t.is_finite() && ok) {
            return Err(invalid(
                "condition.threshold",
                format!("{t} for {method}: expected {expected}"),
            ));
        }
    }
    Ok(parsed)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClearObject {
    expression: String,
    #[serde(default)]
    for_secs: u64,
}

const S: i64 = 1000;

impl RuleBody {
    /// The condition as the evaluator takes it. Runs no script: expressions are checked by
    /// [`RuleBody::validate`].
    fn condition_spec(&self) -> Result<ConditionSpec, ModelError> {
        let typed = match &self.condition {
            Value::String(e) => TypedCondition::Expression {
                expression: e.clone(),
            },
            Value::Object(_) => {
                serde_json::from_value(self.condition.clone()).map_err(|e| invalid_object("condition", e))?
            }
            _ => {
                return Err(invalid(
                    "condition",
                    "an expression string or an object with a type",
                ));
            }
        };
        let positive = |field: &str, v: u64| {
            if v == 0 || v > 30 * 86_400 {
                Err(invalid(field, "between 1 second and 30 days"))
            } else {
                Ok(v as i64 * S)
            }
        };
        Ok(match typed {
            TypedCondition::Expression { expression } => ConditionSpec::Expression { expression },
            TypedCondition::Duration { expression, for_secs } => ConditionSpec::Duration {
                expression,
                for_ms: positive("condition.forSecs", for_secs)?,
            },
            TypedCondition::Repeating {
                expression,
                count,
                within_secs,
            } => {
                if !(1..=10_000).contains(&count) {
                    return Err(invalid("condition.count", "between 1 and 10000"));
                }
                ConditionSpec::Repeating {
                    expression,
                    count,
                    within_ms: positive("condition.withinSecs", within_secs)?,
                }
            }
            TypedCondition::Statistical {
                threshold,
                min_samples,
            } => {
                if self.metric.is_none() {
                    return Err(invalid(
                        "metric",
                        "a statistical condition scores one metric: set `metric`",
                    ));
                }
                if threshold.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
                    return Err(invalid("condition.threshold", "a positive number"));
                }
                ConditionSpec::Statistical {
                    threshold,
                    min_samples: min_samples.unwrap_or(10).clamp(2, 4096),
                }
            }
            TypedCondition::Pattern {
                first,
                then,
                within_secs,
            } => ConditionSpec::Pattern {
                first,
                then,
                within_ms: positive("condition.withinSecs", within_secs)?,
            },
            TypedCondition::Group {
                expression,
                min_devices,
                within_secs,
            } => {
                if min_devices == 0 {
                    return Err(invalid("condition.minDevices", "at least 1"));
                }
                ConditionSpec::Group {
                    expression,
                    min_devices,
                    within_ms: positive("condition.withinSecs", within_secs)?,
                }
            }
            TypedCondition::Absence { for_secs } => ConditionSpec::Absence {
                for_ms: positive("condition.forSecs", for_secs)?,
            },
            TypedCondition::Anomaly {
                method,
                threshold,
                clear_after_secs,
            } => {
                let method = anomaly_method(&method, threshold)?;
                let clear_after = clear_after_secs.unwrap_or(ANOMALY_CLEAR_AFTER_SECS);
                if !(0..=30 * 86_400).contains(&clear_after) {
                    return Err(invalid(
                        "condition.clearAfterSecs",
                        "between 0 seconds and 30 days",
                    ));
                }
                ConditionSpec::Anomaly {
                    method,
                    threshold,
                    clear_after_ms: clear_after * S,
                }
            }
            TypedCondition::Forecast {
                metric,
                below,
                above,
                within_secs,
            } => {
                let metric = metric.or_else(|| self.metric.clone()).ok_or_else(|| {
                    invalid(
                        "condition.metric",
                        "required: the metric to forecast, e.g. \"metric\": \"battery\"",
                    )
                })?;
                drover_actors::MetricName::parse(metric.clone())
                    .map_err(|e| invalid("condition.metric", e))?;
                let (limit, direction) = match (below, above) {
                    (Some(limit), None) => (limit, Direction::Below),
                    (None, Some(limit)) => (limit, Direction::Above),
                    _ => {
                        return Err(invalid(
                            "condition",
                            "a forecast condition needs exactly one of `below` and `above`",
                        ));
                    }
                };
                let within = within_secs.ok_or_else(|| {
                    invalid(
                        "condition.withinSecs",
                        "required: how far ahead the crossing counts, e.g. 259200 (3 days)",
                    )
                })?;
                if !(1..=366 * 86_400).contains(&within) {
                    return Err(invalid(
                        "condition.withinSecs",
                        format!("{within}: expected a positive number of seconds, at most 366 days"),
                    ));
                }
                ConditionSpec::Forecast {
                    metric,
                    limit,
                    direction,
                    within_ms: within * S,
                }
            }
        })
    }

    fn clear_spec(&self) -> Result<Option<ClearSpec>, ModelError> {
        let Some(clear) = &self.clear else { return Ok(None) };
        let (expression, for_secs) = match clear {
            Value::String(e) => (e.clone(), 0),
            Value::Object(_) => {
                let c: ClearObject =
                    serde_json::from_value(clear.clone()).map_err(|e| invalid_object("clear", e))?;
                (c.expression, c.for_secs)
            }
            Value::Null => return Ok(None),
            _ => {
                return Err(invalid(
                    "clear",
                    "an expression string or {\"expression\", \"forSecs\"}",
                ));
            }
        };
        Ok(Some(ClearSpec {
            expression,
            for_ms: for_secs as i64 * S,
        }))
    }

    /// The expressions of the rule, each with the field it came from.
    fn expressions(&self) -> Result<Vec<(&'static str, String)>, ModelError> {
        let condition_field = if self.condition.is_string() {
            "condition"
        } else {
            "condition.expression"
        };
        let mut found = match self.condition_spec()? {
            ConditionSpec::Expression { expression }
            | ConditionSpec::Duration { expression, .. }
            | ConditionSpec::Repeating { expression, .. }
            | ConditionSpec::Group { expression, .. } => vec![(condition_field, expression)],
            ConditionSpec::Pattern { first, then, .. } => {
                vec![("condition.first", first), ("condition.then", then)]
            }
            ConditionSpec::Statistical { .. }
            | ConditionSpec::Absence { .. }
            | ConditionSpec::Anomaly { .. }
            | ConditionSpec::Forecast { .. } => Vec::new(),
        };
        if let Some(clear) = self.clear_spec()? {
            found.push(("clear", clear.expression));
        }
        Ok(found)
    }

    /// Checks everything that does not need the registry; compiles and dry-runs expressions, so
    /// it runs scripts: call it off the HTTP workers.
    pub fn validate(&self, sandbox: &Sandbox) -> Result<(), ModelError> {
        check_name("name", &self.name)?;
        if self.description.chars().count() > 1024 {
            return Err(invalid("description", "at most 1024 characters"));
        }
        Severity::parse(&self.severity)
            .ok_or_else(|| invalid("severity", "critical, major, minor or warning"))?;
        if self.window_secs == 0 || self.window_secs > 86_400 {
            return Err(invalid("windowSecs", "between 1 second and 1 day"));
        }
        if let Some(m) = &self.metric {
            drover_actors::MetricName::parse(m.clone()).map_err(|e| invalid("metric", e))?;
        }
        self.scope_kind()?;
        if self.clear.as_ref().is_some_and(|c| !c.is_null())
            && matches!(
                self.condition_spec()?,
                ConditionSpec::Anomaly { .. } | ConditionSpec::Forecast { .. }
            )
        {
            return Err(invalid(
                "clear",
                "anomaly and forecast alarms clear by themselves (after clearAfterSecs under the threshold; when a later forecast no longer crosses in time): leave out `clear`",
            ));
        }
        for (field, expression) in self.expressions()? {
            sandbox
                .check(&expression)
                .map_err(|e| expression_error(field, e))?;
        }
        if self.actions.len() > 16 {
            return Err(invalid("actions", "at most 16"));
        }
        for (i, a) in self.actions.iter().enumerate() {
            a.validate(&format!("actions[{i}]"))?;
        }
        if self.escalation.len() > 8 {
            return Err(invalid("escalation", "at most 8 steps"));
        }
        let mut last = 0;
        for (i, step) in self.escalation.iter().enumerate() {
            if step.after_secs <= last && i > 0 || step.after_secs == 0 {
                return Err(invalid(
                    &format!("escalation[{i}].afterSecs"),
                    "positive and increasing from step to step",
                ));
            }
            last = step.after_secs;
            for (j, a) in step.actions.iter().enumerate() {
                a.validate(&format!("escalation[{i}].actions[{j}]"))?;
            }
        }
        Ok(())
    }

    fn scope_kind(&self) -> Result<(), ModelError> {
        let value = self.scope.value.as_deref();
        match (self.scope.kind.as_str(), value) {
            ("all", None) => Ok(()),
            ("deviceType", Some(v)) if !v.is_empty() => Ok(()),
            ("group", Some(v)) => GroupName::parse(v)
                .map(|_| ())
                .map_err(|e| invalid("scope.value", e.to_string())),
            ("tag", Some(v)) if !v.is_empty() => Ok(()),
            ("device", Some(v)) => DeviceId::parse(v)
                .map(|_| ())
                .map_err(|e| invalid("scope.value", e.to_string())),
            _ => Err(invalid(
                "scope",
                "{\"type\": \"all\"} or {\"type\": \"deviceType\"|\"group\"|\"tag\"|\"device\", \"value\": …}",
            )),
        }
    }

    /// Refuses inline webhook URLs naming an address the policy does not allow (400
    /// `destination_not_allowed`).
    pub fn check_destinations(&self, policy: &DestinationPolicy) -> Result<(), ModelError> {
        let steps = std::iter::once(("actions".to_string(), &self.actions)).chain(
            self.escalation
                .iter()
                .enumerate()
                .map(|(i, step)| (format!("escalation[{i}].actions"), &step.actions)),
        );
        for (field, actions) in steps {
            for (j, action) in actions.iter().enumerate() {
                if let (ActionKind::Webhook, Some(url)) = (action.kind, &action.url) {
                    check_destination(&format!("{field}[{j}].url"), url, policy)?;
                }
            }
        }
        Ok(())
    }

    /// Puts back the stored URLs of `previous` that were sent as the API shows them (password
    /// masked), so that a rule read and written back keeps its webhook credentials.
    pub fn restore_masked_urls(&mut self, previous: &RuleBody) {
        let stored: Vec<&str> = previous
            .actions
            .iter()
            .chain(previous.escalation.iter().flat_map(|s| s.actions.iter()))
            .filter_map(|a| a.url.as_deref())
            .collect();
        let actions = self
            .actions
            .iter_mut()
            .chain(self.escalation.iter_mut().flat_map(|s| s.actions.iter_mut()));
        for action in actions {
            if let Some(url) = action
                .url
                .as_deref()
                .and_then(|sent| unmask_url(sent, stored.iter().copied()))
            {
                action.url = Some(url);
            }
        }
    }

    /// Seals inline secrets (and keeps the sealed ones of `previous` when a secret is not resent).
    pub fn seal_secrets(&mut self, secrets: &SecretBox) {
        let seal = |a: &mut ActionBody| {
            if let Some(s) = a.secret.take() {
                a.secret_sealed = Some(secrets.seal(&s));
            }
        };
        self.actions.iter_mut().for_each(seal);
        for step in &mut self.escalation {
            step.actions.iter_mut().for_each(seal);
        }
    }

    /// All actions of a step (0 = `actions`, n = `escalation[n-1]`).
    pub fn step_actions(&self, step: usize) -> &[ActionBody] {
        if step == 0 {
            &self.actions
        } else {
            self.escalation
                .get(step - 1)
                .map(|s| s.actions.as_slice())
                .unwrap_or(&[])
        }
    }

    /// The evaluator's view; group and tag members come from the registry. Runs no script (the
    /// stored rule was checked when it was written).
    pub fn to_spec(
        &self,
        id: &str,
        tenant: &TenantId,
        members: Option<std::sync::Arc<std::collections::HashSet<DeviceId>>>,
    ) -> Result<RuleSpec, ModelError> {
        let value = self.scope.value.clone().unwrap_or_default();
        let scope = match self.scope.kind.as_str() {
            "deviceType" => RuleScope::DeviceType(value),
            "group" => RuleScope::Group {
                name: value,
                members: members.unwrap_or_default(),
            },
            "tag" => RuleScope::Tag {
                tag: value,
                members: members.unwrap_or_default(),
            },
            "device" => {
                RuleScope::Device(DeviceId::parse(value).map_err(|e| invalid("scope.value", e.to_string()))?)
            }
            _ => RuleScope::All,
        };
        Ok(RuleSpec {
            id: id.to_string(),
            tenant: tenant.clone(),
            name: self.name.clone(),
            enabled: self.enabled,
            severity: Severity::parse(&self.severity).unwrap_or(Severity::Major),
            metric: self.metric.clone(),
            window_ms: self.window_secs as i64 * S,
            condition: self.condition_spec()?,
            clear: self.clear_spec()?,
            scope,
        })
    }

    /// The body as the API shows it: secrets replaced by `secretSet`, passwords in URLs masked.
    pub fn view(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        let hide = |actions: &mut Value| {
            if let Some(list) = actions.as_array_mut() {
                for a in list {
                    if let Some(obj) = a.as_object_mut() {
                        let set = obj.remove("secretSealed").is_some();
                        obj.remove("secret");
                        if let Some(Value::String(url)) = obj.get_mut("url") {
                            *url = mask_url(url);
                        }
                        if obj.get("type").and_then(Value::as_str) == Some("webhook") {
                            obj.insert("secretSet".into(), Value::Bool(set));
                        }
                    }
                }
            }
        };
        hide(&mut value["actions"]);
        if let Some(steps) = value["escalation"].as_array_mut() {
            for s in steps {
                hide(&mut s["actions"]);
            }
        }
        value
    }
}

impl ActionBody {
    fn validate(&self, field: &str) -> Result<(), ModelError> {
        match self.kind {
            ActionKind::Webhook => {
                if self.channel.is_none() {
                    let url = self
                        .url
                        .as_deref()
                        .ok_or_else(|| invalid(field, "a webhook needs `url` or `channel`"))?;
                    check_url(&format!("{field}.url"), url)?;
                }
            }
            ActionKind::Email | ActionKind::Sms => {
                if self.channel.is_none() && self.to.is_empty() {
                    return Err(invalid(field, "needs `channel` or `to`"));
                }
                if self.kind == ActionKind::Email {
                    for to in &self.to {
                        to.parse::<lettre::Address>().map_err(|_| {
                            invalid(&format!("{field}.to"), format!("{to:?} is not an email address"))
                        })?;
                    }
                }
            }
            ActionKind::MqttCommand => {
                let c = self.command.as_deref().unwrap_or("");
                if c.is_empty() || c.len() > 64 || c.contains(['/', '+', '#']) {
                    return Err(invalid(
                        &format!("{field}.command"),
                        "a command name without / + #",
                    ));
                }
            }
            ActionKind::ShadowPatch => {
                if !self.payload.as_ref().is_some_and(Value::is_object) {
                    return Err(invalid(
                        &format!("{field}.payload"),
                        "the desired-state patch, an object",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl ChannelBody {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_name("name", &self.name)?;
        match self.kind {
            ActionKind::Webhook => check_url("url", self.url.as_deref().unwrap_or("")),
            ActionKind::Email => {
                if self.to.is_empty() {
                    return Err(invalid("to", "at least one address"));
                }
                for to in &self.to {
                    to.parse::<lettre::Address>()
                        .map_err(|_| invalid("to", format!("{to:?} is not an email address")))?;
                }
                Ok(())
            }
            ActionKind::Sms => {
                if self.to.is_empty() {
                    return Err(invalid("to", "at least one phone number"));
                }
                // The account is a segment of the gateway's URL path: nothing may steer the
                // request elsewhere on the gateway (`../`, `?`, `#`).
                if let Some(sid) = &self.account_sid
                    && (sid.is_empty() || sid.len() > 64 || !sid.chars().all(|c| c.is_ascii_alphanumeric()))
                {
                    return Err(invalid("accountSid", "1 to 64 letters and digits"));
                }
                Ok(())
            }
            _ => Err(invalid("type", "webhook, email or sms")),
        }
    }

    /// The body as stored besides the sealed secret.
    pub fn without_secret(&self) -> ChannelBody {
        ChannelBody {
            secret: None,
            ..self.clone()
        }
    }

    /// The body as the API shows it: no secret, the password of the URL masked.
    pub fn view(&self) -> ChannelBody {
        ChannelBody {
            url: self.url.as_deref().map(mask_url),
            ..self.without_secret()
        }
    }

    /// Refuses a webhook URL naming an address the policy does not allow (400
    /// `destination_not_allowed`).
    pub fn check_destination(&self, policy: &DestinationPolicy) -> Result<(), ModelError> {
        match (self.kind, &self.url) {
            (ActionKind::Webhook, Some(url)) => check_destination("url", url, policy),
            _ => Ok(()),
        }
    }
}

/// What this server can deliver, from its configuration: an email or SMS action it cannot
/// deliver is refused when it is written rather than failing at every alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// An SMTP server is configured (`SMTP_HOST`).
    pub email: bool,
    /// A default SMS gateway account is configured (`SMS_ACCOUNT_SID`).
    pub sms_account: bool,
}

fn email_not_configured(field: &str) -> ModelError {
    ModelError {
        code: "email_not_configured",
        field: field.into(),
        message: format!(
            "{field}: email cannot be delivered, no SMTP server is configured on this server (SMTP_HOST)"
        ),
    }
}

fn sms_not_configured(field: &str) -> ModelError {
    ModelError {
        code: "sms_not_configured",
        field: field.into(),
        message: format!(
            "{field}: SMS cannot be delivered without a gateway account: set the channel's \
             accountSid and secret, or SMS_ACCOUNT_SID and SMS_AUTH_TOKEN on the server"
        ),
    }
}

impl ChannelBody {
    /// Refuses a channel this server could never deliver through.
    pub fn check_deliverable(&self, delivery: DeliveryConfig) -> Result<(), ModelError> {
        match self.kind {
            ActionKind::Email if !delivery.email => Err(email_not_configured("type")),
            ActionKind::Sms
                if self.account_sid.as_deref().is_none_or(str::is_empty) && !delivery.sms_account =>
            {
                Err(sms_not_configured("accountSid"))
            }
            _ => Ok(()),
        }
    }
}

/// A named channel as a rule's actions see it.
#[derive(Debug, Clone, Copy)]
pub struct ChannelSummary<'a> {
    pub name: &'a str,
    pub kind: ActionKind,
    pub has_account: bool,
}

impl RuleBody {
    /// Refuses actions that could never be delivered: a channel the tenant does not have or of
    /// another type, email without SMTP, SMS without a gateway account.
    pub fn check_deliverable(
        &self,
        channels: &[ChannelSummary],
        delivery: DeliveryConfig,
    ) -> Result<(), ModelError> {
        let steps = std::iter::once(("actions".to_string(), &self.actions)).chain(
            self.escalation
                .iter()
                .enumerate()
                .map(|(i, step)| (format!("escalation[{i}].actions"), &step.actions)),
        );
        for (prefix, actions) in steps {
            for (j, action) in actions.iter().enumerate() {
                let field = format!("{prefix}[{j}]");
                let has_account = match &action.channel {
                    Some(name) => {
                        let channel = channels.iter().find(|c| c.name == name).ok_or_else(|| ModelError {
                            code: "unknown_channel",
                            field: field.clone(),
                            message: format!(
                                "{field}: no channel named {name:?}: create it with POST /api/channels first"
                            ),
                        })?;
                        if channel.kind != action.kind {
                            return Err(ModelError {
                                code: "channel_type_mismatch",
                                field: field.clone(),
                                message: format!(
                                    "{field}: channel {name:?} is a {} channel, not {}",
                                    channel.kind.as_str(),
                                    action.kind.as_str()
                                ),
                            });
                        }
                        channel.has_account
                    }
                    None => false,
                };
                match action.kind {
                    ActionKind::Email if !delivery.email => return Err(email_not_configured(&field)),
                    ActionKind::Sms if !has_account && !delivery.sms_account => {
                        return Err(sms_not_configured(&field));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Names of metrics the rule reads, each with the fields that read it: the variables its
    /// expressions read (the evaluator's own variables aside), the metrics of their window
    /// statistics and the rule's `metric`.
    fn metrics_read(&self) -> Result<std::collections::BTreeMap<String, Vec<&'static str>>, ModelError> {
        let mut read: std::collections::BTreeMap<String, Vec<&'static str>> = Default::default();
        for (field, expression) in self.expressions()? {
            let names = names::free_variables(&expression)
                .into_iter()
                .filter(|n| !CONTEXT_VARIABLES.contains(&n.as_str()))
                .chain(names::window_metrics(&expression));
            for name in names {
                let fields = read.entry(name).or_default();
                if !fields.contains(&field) {
                    fields.push(field);
                }
            }
        }
        if let Some(metric) = &self.metric {
            read.entry(metric.clone()).or_default().push("metric");
        }
        Ok(read)
    }

    /// What will never fire as written, for the answer to a create or update: metrics the
    /// tenant's devices have not reported and no device type declares.
    pub fn warnings(&self, known: &KnownMetrics) -> Vec<RuleWarning> {
        if !known.complete {
            return Vec::new();
        }
        let Ok(read) = self.metrics_read() else {
            return Vec::new();
        };
        let reported = if known.names.is_empty() {
            "no device of this tenant has reported a metric since the server started".to_string()
        } else {
            let shown: Vec<&str> = known.names.iter().take(20).map(String::as_str).collect();
            let more = if known.names.len() > shown.len() {
                ", …"
            } else {
                ""
            };
            format!("known metrics: {}{more}", shown.join(", "))
        };
        read.into_iter()
            .filter(|(name, _)| !known.names.contains(name))
            .map(|(name, fields)| RuleWarning {
                code: "unknown_metric",
                field: fields.join(", "),
                message: format!(
                    "{}: no device of this tenant has reported `{name}` since the server started and \
                     no device type declares it; evaluations that need it are skipped until a device \
                     reports it ({reported})",
                    fields.join(", ")
                ),
            })
            .collect()
    }
}

/// Metric names a tenant is known to have: reported by its devices since the server started, or
/// declared by its device types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownMetrics {
    pub names: std::collections::BTreeSet<String>,
    /// `false` when the list was cut short (then no name is reported as unknown).
    pub complete: bool,
}

/// Something a rule was accepted with that will not work as it probably should.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RuleWarning {
    /// `unknown_metric`.
    pub code: &'static str,
    /// The fields concerned (`condition`, `clear`, `metric`…).
    pub field: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> RuleBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_seed_body_is_accepted() {
        let b = body(json!({
            "name": "High Temperature Alert",
            "condition": "temperature > 30",
            "actions": [{"type": "webhook", "url": "https://alerts.example.com/webhook"}]
        }));
        b.validate(&Sandbox::default()).unwrap();
        let spec = b.to_spec("r1", &TenantId::parse("t").unwrap(), None).unwrap();
        assert_eq!(spec.severity, Severity::Major);
        assert_eq!(spec.scope, RuleScope::All);
    }

    #[test]
    fn anomaly_and_forecast_conditions_parse_into_specs() {
        let tenant = TenantId::parse("t").unwrap();
        let b =
            body(json!({"name": "odd", "condition": {"type": "anomaly", "method": "eif", "threshold": 0.7}}));
        b.validate(&Sandbox::default()).unwrap();
        assert_eq!(
            b.to_spec("r", &tenant, None).unwrap().condition,
            ConditionSpec::Anomaly {
                method: Method::Eif,
                threshold: Some(0.7),
                clear_after_ms: 300_000,
            }
        );
        let b = body(
            json!({"name": "z", "condition": {"type": "anomaly", "method": "zscore", "clearAfterSecs": 0}}),
        );
        assert_eq!(
            b.to_spec("r", &tenant, None).unwrap().condition,
            ConditionSpec::Anomaly {
                method: Method::ZScore,
                threshold: None,
                clear_after_ms: 0,
            }
        );
        let b = body(json!({"name": "battery", "condition":
            {"type": "forecast", "metric": "battery", "below": 10, "withinSecs": 259200}}));
        b.validate(&Sandbox::default()).unwrap();
        assert_eq!(
            b.to_spec("r", &tenant, None).unwrap().condition,
            ConditionSpec::Forecast {
                metric: "battery".into(),
                limit: 10.0,
                direction: Direction::Below,
                within_ms: 259_200_000,
            }
        );
        // The rule's metric stands in for the condition's.
        let b = body(json!({"name": "hot", "metric": "vibration", "condition":
            {"type": "forecast", "above": 7.5, "withinSecs": 3600}}));
        assert_eq!(
            b.to_spec("r", &tenant, None).unwrap().condition,
            ConditionSpec::Forecast {
                metric: "vibration".into(),
                limit: 7.5,
                direction: Direction::Above,
                within_ms: 3_600_000,
            }
        );
    }

    #[test]
    fn bad_anomaly_and_forecast_conditions_are_refused_with_the_field() {
        let cases = [
            (
                json!({"type": "anomaly", "method": "prophet"}),
                "condition.method",
                "unknown method",
            ),
            (
                json!({"type": "anomaly", "method": "drift"}),
                "condition.method",
                "unknown method",
            ),
            (
                json!({"type": "anomaly", "method": "eif", "threshold": 1.5}),
                "condition.threshold",
                "at most 1",
            ),
            (
                json!({"type": "anomaly", "method": "eif", "threshold": 0}),
                "condition.threshold",
                "above 0",
            ),
            (
                json!({"type": "anomaly", "method": "zscore", "threshold": -3}),
                "condition.threshold",
                "standard deviations",
            ),
            (
                json!({"type": "anomaly", "method": "ensemble", "threshold": 500}),
                "condition.threshold",
                "at most 100",
            ),
            (
                json!({"type": "anomaly", "method": "mad", "clearAfterSecs": -1}),
                "condition.clearAfterSecs",
                "30 days",
            ),
            (
                json!({"type": "forecast", "below": 10, "withinSecs": 60}),
                "condition.metric",
                "required",
            ),
            (
                json!({"type": "forecast", "metric": "battery", "withinSecs": 60}),
                "condition",
                "exactly one of",
            ),
            (
                json!({"type": "forecast", "metric": "battery", "below": 10, "above": 90, "withinSecs": 60}),
                "condition",
                "exactly one of",
            ),
            (
                json!({"type": "forecast", "metric": "battery", "below": 10}),
                "condition.withinSecs",
                "required",
            ),
            (
                json!({"type": "forecast", "metric": "battery", "below": 10, "withinSecs": 0}),
                "condition.withinSecs",
                "positive",
            ),
            (
                json!({"type": "forecast", "metric": "battery", "below": 10, "withinSecs": -60}),
                "condition.withinSecs",
                "positive",
            ),
            (
                json!({"type": "forecast", "metric": "bad metric!", "below": 10, "withinSecs": 60}),
                "condition.metric",
                "",
            ),
        ];
        for (condition, field, says) in cases {
            let b = body(json!({"name": "x", "condition": condition.clone()}));
            let e = b.validate(&Sandbox::default()).unwrap_err();
            assert_eq!(e.field, field, "{condition}: {e:?}");
            assert_eq!(e.code, "invalid_field", "{condition}");
            assert!(e.message.contains(says), "{condition}: {}", e.message);
        }
        let b = body(json!({"name": "x", "condition": {"type": "anomaly", "method": "eif", "window": 3}}));
        assert_eq!(b.validate(&Sandbox::default()).unwrap_err().code, "unknown_field");
        let b =
            body(json!({"name": "x", "clear": "true", "condition": {"type": "anomaly", "method": "eif"}}));
        assert_eq!(b.validate(&Sandbox::default()).unwrap_err().field, "clear");
    }

    #[test]
    fn bad_expressions_are_refused_with_position() {
        let b = body(json!({"name": "x", "condition": "temperature >\n > 3"}));
        let e = b.validate(&Sandbox::default()).unwrap_err();
        assert_eq!(e.code, "invalid_expression");
        assert!(e.message.contains("line 2"), "{}", e.message);
        let b = body(
            json!({"name": "x", "condition": {"type": "duration", "expression": "loop {}", "forSecs": 5}}),
        );
        assert_eq!(
            b.validate(&Sandbox::default()).unwrap_err().code,
            "invalid_expression"
        );
        let b = body(json!({"name": "x", "condition": {"type": "statistical"}}));
        assert_eq!(b.validate(&Sandbox::default()).unwrap_err().field, "metric");
    }

    #[test]
    fn literal_destinations_are_refused_and_passwords_masked() {
        let b = body(json!({"name": "x", "condition": "a > 1",
            "actions": [{"type": "webhook", "url": "https://u:pw@hooks.example.com/h"}],
            "escalation": [{"afterSecs": 5, "actions": [{"type": "webhook", "url": "http://[::1]:9/"}]}]}));
        let e = b.check_destinations(&DestinationPolicy::default()).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_str()),
            ("destination_not_allowed", "escalation[0].actions[0].url")
        );
        let open = DestinationPolicy::parse(&["::1"]).unwrap();
        b.check_destinations(&open).unwrap();
        assert_eq!(b.view()["actions"][0]["url"], "https://u:***@hooks.example.com/h");
        // Written back as shown, the stored password is kept; a new one replaces it.
        let mut sent = b.clone();
        sent.actions[0].url = Some("https://u:***@hooks.example.com/h".into());
        sent.restore_masked_urls(&b);
        assert_eq!(
            sent.actions[0].url.as_deref(),
            Some("https://u:pw@hooks.example.com/h")
        );
        assert_eq!(
            unmask_url(
                "https://u:new@hooks.example.com/h",
                ["https://u:pw@hooks.example.com/h"]
            ),
            None
        );
        assert_eq!(
            unmask_url(
                "https://u:***@other.example.com/h",
                ["https://u:pw@hooks.example.com/h"]
            ),
            None
        );
    }

    #[test]
    fn secrets_are_sealed_and_hidden() {
        let mut b = body(json!({"name": "x", "condition": "a > 1",
            "actions": [{"type": "webhook", "url": "http://127.0.0.1:1/h", "secret": "k"}]}));
        b.seal_secrets(&SecretBox::from_passphrase("p"));
        assert!(b.actions[0].secret.is_none());
        let v = b.view();
        assert_eq!(v["actions"][0]["secretSet"], json!(true));
        assert!(!v.to_string().contains("secretSealed"));
    }

    fn known(names: &[&str]) -> KnownMetrics {
        KnownMetrics {
            names: names.iter().map(|n| n.to_string()).collect(),
            complete: true,
        }
    }

    #[test]
    fn a_misspelled_metric_is_warned_about_and_known_ones_are_not() {
        let b = body(json!({"name": "x", "metric": "temperature",
            "condition": "let limit = 30; temprature > limit && metrics.humidity.avg > 3 && current > 1 && device != \"\"",
            "clear": {"expression": "temperature < 25 && shadow.reported.on", "forSecs": 5}}));
        let warnings = b.warnings(&known(&["temperature", "humidity"]));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].code, "unknown_metric");
        assert_eq!(warnings[0].field, "condition");
        assert!(
            warnings[0].message.contains("`temprature`"),
            "{}",
            warnings[0].message
        );
        assert!(
            warnings[0]
                .message
                .contains("known metrics: humidity, temperature"),
            "{}",
            warnings[0].message
        );
        // The rule's metric, window metrics and the clear expression count too.
        let warnings = b.warnings(&known(&["temprature"]));
        let fields: Vec<(&str, &str)> = warnings
            .iter()
            .map(|w| (w.field.as_str(), w.message.split('`').nth(1).unwrap()))
            .collect();
        assert_eq!(
            fields,
            vec![("condition", "humidity"), ("clear, metric", "temperature")]
        );
        // A list cut short proves nothing.
        let mut partial = known(&[]);
        partial.complete = false;
        assert!(b.warnings(&partial).is_empty());
    }

    #[test]
    fn actions_that_could_never_be_delivered_are_refused() {
        let none = DeliveryConfig {
            email: false,
            sms_account: false,
        };
        let all = DeliveryConfig {
            email: true,
            sms_account: true,
        };
        let channels = [
            ChannelSummary {
                name: "mail",
                kind: ActionKind::Email,
                has_account: false,
            },
            ChannelSummary {
                name: "pager",
                kind: ActionKind::Sms,
                has_account: true,
            },
        ];
        let rule = |actions: Value| {
            body(
                json!({"name": "x", "condition": "t > 1", "escalation": [{"afterSecs": 60, "actions": actions}]}),
            )
        };
        let code = |r: &RuleBody, d| r.check_deliverable(&channels, d).err().map(|e| e.code);
        let mail = rule(json!([{"type": "email", "channel": "mail"}]));
        assert_eq!(code(&mail, none), Some("email_not_configured"));
        assert_eq!(code(&mail, all), None);
        let inline = rule(json!([{"type": "email", "to": ["a@example.com"]}]));
        assert_eq!(code(&inline, none), Some("email_not_configured"));
        let pager = rule(json!([{"type": "sms", "channel": "pager"}]));
        assert_eq!(code(&pager, none), None, "the channel has its own account");
        let sms = rule(json!([{"type": "sms", "to": ["+1555"]}]));
        assert_eq!(code(&sms, none), Some("sms_not_configured"));
        assert_eq!(code(&sms, all), None);
        let wrong = rule(json!([{"type": "webhook", "channel": "mail"}]));
        assert_eq!(code(&wrong, all), Some("channel_type_mismatch"));
        let missing = rule(json!([{"type": "webhook", "channel": "nope"}]));
        assert_eq!(code(&missing, all), Some("unknown_channel"));
        let err = mail.check_deliverable(&channels, none).unwrap_err();
        assert_eq!(err.field, "escalation[0].actions[0]");

        let channel = |v: Value| serde_json::from_value::<ChannelBody>(v).unwrap();
        let email = channel(json!({"name": "m", "type": "email", "to": ["a@example.com"]}));
        assert_eq!(
            email.check_deliverable(none).unwrap_err().code,
            "email_not_configured"
        );
        assert!(email.check_deliverable(all).is_ok());
        let sms = channel(json!({"name": "s", "type": "sms", "to": ["+1555"]}));
        assert_eq!(
            sms.check_deliverable(none).unwrap_err().code,
            "sms_not_configured"
        );
        let own = channel(json!({"name": "s", "type": "sms", "to": ["+1555"], "accountSid": "AC1"}));
        assert!(own.check_deliverable(none).is_ok());
        let blank = channel(json!({"name": "s", "type": "sms", "to": ["+1555"], "accountSid": ""}));
        assert_eq!(
            blank.check_deliverable(none).unwrap_err().code,
            "sms_not_configured"
        );
    }

    #[test]
    fn loading_a_stored_rule_runs_no_script() {
        // A stored body from before the sandbox refused `sleep` still converts (and is then
        // refused by the evaluator's compile, counted as a load error) without running.
        let b = body(json!({"name": "x", "condition": "sleep(15); true"}));
        let started = std::time::Instant::now();
        b.to_spec("r1", &TenantId::parse("t").unwrap(), None).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let e = b.validate(&Sandbox::default()).unwrap_err();
        assert_eq!(e.code, "invalid_expression");
        assert!(e.message.contains("`sleep` is not available"), "{}", e.message);
    }
}
