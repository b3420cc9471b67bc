//! Rule and channel definitions as the API takes them, their validation, and their conversion
//! into the evaluator's [`RuleSpec`].
//!
//! Accepted rule bodies include the product description's own: `{"name": …, "condition":
//! "temperature > 30", "actions": [{"type": "webhook", "url": …}]}`. A condition is either an
//! expression string or an object with a `type`. Secrets in actions and channels are write-only:
//! they are sealed before storage and views show `secretSet: true` instead.

use drover_actors::rules::script::{Sandbox, ScriptError};
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

/// A URL sent back as the API showed it (`user:***@host`) means "keep the stored one": returns
/// the stored URL it masks, if any.
pub fn unmask_url<'a>(sent: &str, stored: impl IntoIterator<Item = &'a str>) -> Option<String> {
    if !sent.contains(":***@") {
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
    fn condition_spec(&self, sandbox: &Sandbox) -> Result<ConditionSpec, ModelError> {
        let check = |field: &str, e: &str| {
            sandbox
                .check(e)
                .map(|_| ())
                .map_err(|x| expression_error(field, x))
        };
        let typed = match &self.condition {
            Value::String(e) => TypedCondition::Expression {
                expression: e.clone(),
            },
            Value::Object(_) => serde_json::from_value(self.condition.clone())
                .map_err(|e| invalid("condition", e.to_string()))?,
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
            TypedCondition::Expression { expression } => {
                check("condition", &expression)?;
                ConditionSpec::Expression { expression }
            }
            TypedCondition::Duration { expression, for_secs } => {
                check("condition.expression", &expression)?;
                ConditionSpec::Duration {
                    expression,
                    for_ms: positive("condition.forSecs", for_secs)?,
                }
            }
            TypedCondition::Repeating {
                expression,
                count,
                within_secs,
            } => {
                check("condition.expression", &expression)?;
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
            } => {
                check("condition.first", &first)?;
                check("condition.then", &then)?;
                ConditionSpec::Pattern {
                    first,
                    then,
                    within_ms: positive("condition.withinSecs", within_secs)?,
                }
            }
            TypedCondition::Group {
                expression,
                min_devices,
                within_secs,
            } => {
                check("condition.expression", &expression)?;
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
        })
    }

    fn clear_spec(&self, sandbox: &Sandbox) -> Result<Option<ClearSpec>, ModelError> {
        let Some(clear) = &self.clear else { return Ok(None) };
        let (expression, for_secs) = match clear {
            Value::String(e) => (e.clone(), 0),
            Value::Object(_) => {
                let c: ClearObject =
                    serde_json::from_value(clear.clone()).map_err(|e| invalid("clear", e.to_string()))?;
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
        sandbox
            .check(&expression)
            .map_err(|e| expression_error("clear", e))?;
        Ok(Some(ClearSpec {
            expression,
            for_ms: for_secs as i64 * S,
        }))
    }

    /// Checks everything that does not need the registry; compiles and dry-runs expressions.
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
        self.condition_spec(sandbox)?;
        self.clear_spec(sandbox)?;
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

    /// The evaluator's view; group and tag members come from the registry.
    pub fn to_spec(
        &self,
        id: &str,
        tenant: &TenantId,
        sandbox: &Sandbox,
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
            condition: self.condition_spec(sandbox)?,
            clear: self.clear_spec(sandbox)?,
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
        let spec = b
            .to_spec("r1", &TenantId::parse("t").unwrap(), &Sandbox::default(), None)
            .unwrap();
        assert_eq!(spec.severity, Severity::Major);
        assert_eq!(spec.scope, RuleScope::All);
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
}
