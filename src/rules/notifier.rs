//! Sends an alarm's notifications: webhook (JSON POST signed with HMAC-SHA256), email over SMTP
//! (lettre), SMS through a Twilio-compatible gateway, an MQTT command to the device, a desired
//! state patch of the device's shadow. Each action is delivered on its own task, retried with
//! exponential backoff while the failure is retryable, and recorded in the alarm's delivery log
//! whatever the outcome; a receiver that is down never holds up the alarm flow.
//!
//! Webhooks connect only to addresses [`DestinationPolicy`] allows (checked on the address
//! actually connected to) and never follow redirects. The delivery log, which the tenant reads,
//! tells "destination not allowed" and "delivery failed" (with the HTTP status when a response
//! came) but never why a connection failed: "connection refused" against "timed out" against
//! "200 OK" would make webhooks a port scanner of whatever they can reach. The reason goes to the
//! server log.

use std::sync::Arc;
use std::time::Duration;

use drover_actors::clock::SharedClock;
use drover_actors::rules::DesiredStatePatcher;
use drover_actors::{DeviceId, TenantId};
use hmac::{Hmac, Mac};
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};
use sha2::Sha256;

use super::crypto::SecretBox;
use super::destination::{self, DestinationPolicy, VettedResolver};
use super::metrics::RulesMetrics;
use super::model::{ActionBody, ActionKind};
use super::view::AlarmView;
use crate::config::{Config, SmsConfig, mask_url};
use crate::storage::RegistryStore;
use crate::storage::rules::{AlarmRecord, NewDelivery};

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>` when the webhook has a key.
pub const SIGNATURE_HEADER: &str = "X-Drover-Signature";

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryError {
    /// Worth another attempt (5xx, 429, SMTP transient).
    Retryable(String),
    /// Retrying cannot help (4xx, 3xx, bad address, channel missing, not configured).
    Permanent(String),
    /// The destination's address is not allowed (`NOTIFY_ALLOWED_NETWORKS`); never attempted.
    NotAllowed,
    /// No HTTP response came (refused, reset, timed out, not HTTP, TLS failed); worth another
    /// attempt. `cause` is for the server log only.
    NoResponse { cause: String },
}

impl DeliveryError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeliveryError::Retryable(_) | DeliveryError::NoResponse { .. }
        )
    }

    /// What the delivery log (read by the tenant) says.
    fn message(&self) -> &str {
        match self {
            DeliveryError::Retryable(m) | DeliveryError::Permanent(m) => m,
            DeliveryError::NotAllowed => "destination not allowed",
            DeliveryError::NoResponse { .. } => "delivery failed",
        }
    }

    /// What the server log says: the network detail the tenant is not shown.
    fn cause(&self) -> &str {
        match self {
            DeliveryError::NoResponse { cause } => cause,
            other => other.message(),
        }
    }
}

pub struct Notifier {
    registry: RegistryStore,
    /// Webhooks: resolves through the destination policy, never follows redirects.
    http: reqwest::Client,
    /// The SMS gateway the operator configured (`sms.base_url`), which no tenant can change.
    sms_http: reqwest::Client,
    destinations: Arc<DestinationPolicy>,
    smtp: Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)>,
    sms: SmsConfig,
    secrets: SecretBox,
    patcher: Arc<dyn DesiredStatePatcher>,
    commands: crate::fleet_ops::commands::SharedLateCommands,
    attempts: u32,
    backoff: Duration,
    timeout: Duration,
    metrics: RulesMetrics,
    clock: SharedClock,
}

/// Where an action goes, resolved from its channel or inline settings.
struct Target {
    label: String,
    url: Option<String>,
    secret: Option<String>,
    to: Vec<String>,
    from: Option<String>,
    account_sid: Option<String>,
    timeout: Option<Duration>,
}

/// A request that got no response. Its URL is left out of the cause: it may hold credentials.
fn http_error(error: reqwest::Error) -> DeliveryError {
    if destination::is_not_allowed(&error) {
        return DeliveryError::NotAllowed;
    }
    let error = error.without_url();
    let mut cause = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(inner) = source {
        cause.push_str(": ");
        cause.push_str(&inner.to_string());
        source = inner.source();
    }
    DeliveryError::NoResponse { cause }
}

/// A response that is not a success. Only the status is recorded: the body is the receiver's
/// (and a redirect is not followed, so 3xx fails too).
fn status_error(status: reqwest::StatusCode) -> DeliveryError {
    let message = format!("delivery failed: HTTP {status}");
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        DeliveryError::Retryable(message)
    } else {
        DeliveryError::Permanent(message)
    }
}

/// `sha256=<hex>` of `body` under `key`.
pub fn signature(key: &str, body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn smtp_transport(config: &Config) -> Result<Option<(AsyncSmtpTransport<Tokio1Executor>, Mailbox)>, String> {
    let smtp = &config.smtp;
    if smtp.host.is_empty() {
        return Ok(None);
    }
    let builder = match smtp.tls.as_str() {
        "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
        "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(|e| e.to_string())?,
        _ => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host).map_err(|e| e.to_string())?,
    };
    let mut builder = builder
        .port(smtp.port)
        .timeout(Some(Duration::from_secs(smtp.timeout_secs)));
    if !smtp.username.is_empty() {
        builder = builder.credentials(Credentials::new(
            smtp.username.clone(),
            smtp.password.expose().to_string(),
        ));
    }
    let from: Mailbox = smtp.from.parse().map_err(|e| format!("smtp.from: {e}"))?;
    Ok(Some((builder.build(), from)))
}

impl Notifier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        destinations: Arc<DestinationPolicy>,
        registry: RegistryStore,
        secrets: SecretBox,
        patcher: Arc<dyn DesiredStatePatcher>,
        commands: crate::fleet_ops::commands::SharedLateCommands,
        metrics: RulesMetrics,
        clock: SharedClock,
    ) -> Result<Notifier, String> {
        let timeout = Duration::from_millis(config.rules.http_timeout_ms);
        // A proxy would be the address connected to, defeating the policy: connect directly.
        let client = || {
            reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
        };
        Ok(Notifier {
            registry,
            http: client()
                .dns_resolver(Arc::new(VettedResolver::new(destinations.clone())))
                .build()
                .map_err(|e| e.to_string())?,
            sms_http: client().build().map_err(|e| e.to_string())?,
            destinations,
            smtp: smtp_transport(config)?,
            sms: config.sms.clone(),
            secrets,
            patcher,
            commands,
            attempts: config.rules.delivery_attempts.max(1),
            backoff: Duration::from_millis(config.rules.retry_backoff_ms),
            timeout,
            metrics,
            clock,
        })
    }

    /// Starts delivering `actions` for `alarm` (step 0: initial actions; n: escalation step n).
    pub fn dispatch(
        self: &Arc<Self>,
        alarm: &AlarmRecord,
        actions: &[ActionBody],
        step: usize,
        event: &'static str,
    ) {
        for action in actions {
            let (this, alarm, action) = (self.clone(), alarm.clone(), action.clone());
            actix_rt::spawn(async move { this.deliver(alarm, action, step, event).await });
        }
    }

    async fn deliver(&self, alarm: AlarmRecord, action: ActionBody, step: usize, event: &'static str) {
        let kind = action.kind.as_str();
        let mut attempts = 0;
        let (label, result) = match self.resolve(&alarm.tenant, &action).await {
            Err(e) => (action.channel.clone().unwrap_or_else(|| kind.to_string()), Err(e)),
            Ok(target) => {
                let mut result = Err(DeliveryError::Permanent("not attempted".into()));
                let mut wait = self.backoff;
                while attempts < self.attempts {
                    attempts += 1;
                    result = self.send_once(&alarm, &action, &target, step, event).await;
                    match &result {
                        Ok(_) => break,
                        Err(error) => {
                            self.metrics.attempt_failures.with_label_values(&[kind]).inc();
                            tracing::info!(alarm = %alarm.id, kind, channel = %target.label, attempt = attempts, error = error.cause(), "notification attempt failed");
                            if !error.is_retryable() || attempts == self.attempts {
                                break;
                            }
                            tokio::time::sleep(wait).await;
                            wait = wait.saturating_mul(2);
                        }
                    }
                }
                (target.label, result)
            }
        };
        let (delivered, detail) = match result {
            Ok(detail) => (true, detail),
            Err(error) => (false, error.message().to_string()),
        };
        self.metrics
            .notifications
            .with_label_values(&[kind, if delivered { "delivered" } else { "failed" }])
            .inc();
        if !delivered {
            tracing::warn!(alarm = %alarm.id, kind, channel = %label, %detail, "notification failed");
        }
        let record = NewDelivery {
            alarm_id: alarm.id.clone(),
            at: self.clock.now_ms(),
            channel: label,
            kind: kind.to_string(),
            step: step as i32,
            attempts: attempts as i32,
            delivered,
            detail,
        };
        if let Err(error) = self.registry.record_delivery(record).await {
            tracing::warn!(alarm = %alarm.id, %error, "cannot record a delivery");
        }
    }

    /// Sends one test notification through the tenant's channel `name` (id or name): one
    /// attempt, no retry, no alarm. Answers what the delivery log would say (the receiver's
    /// answer, or why it failed, without the connection's cause).
    pub async fn test_channel(
        &self,
        tenant: &TenantId,
        name: &str,
        kind: ActionKind,
    ) -> Result<String, String> {
        let action = ActionBody {
            kind,
            channel: Some(name.to_string()),
            url: None,
            secret: None,
            secret_sealed: None,
            to: Vec::new(),
            command: None,
            payload: None,
        };
        let target = self
            .resolve(tenant, &action)
            .await
            .map_err(|e| e.message().to_string())?;
        let now = self.clock.now_ms();
        let alarm = AlarmRecord {
            id: "channel-test".into(),
            tenant: tenant.clone(),
            rule_id: "channel-test".into(),
            rule_name: format!("Test of channel {}", target.label),
            device: "none".into(),
            severity: drover_actors::rules::Severity::Warning,
            active: false,
            acknowledged: false,
            count: 1,
            first_seen: now,
            last_seen: now,
            acked_at: None,
            acked_by: None,
            cleared_at: None,
            cleared_by: None,
            value: None,
            details: json!({ "test": true }),
            escalation_step: 0,
            next_escalation_at: None,
        };
        let result = self.send_once(&alarm, &action, &target, 0, "channel.test").await;
        self.metrics
            .notifications
            .with_label_values(&[kind.as_str(), if result.is_ok() { "delivered" } else { "failed" }])
            .inc();
        result.map_err(|e| {
            tracing::info!(%tenant, channel = %target.label, error = e.cause(), "channel test failed");
            e.message().to_string()
        })
    }

    async fn resolve(&self, tenant: &TenantId, action: &ActionBody) -> Result<Target, DeliveryError> {
        let open = |sealed: Option<&String>| -> Result<Option<String>, DeliveryError> {
            sealed
                .map(|s| {
                    self.secrets
                        .open(s)
                        .map_err(|e| DeliveryError::Permanent(e.to_string()))
                })
                .transpose()
        };
        if let Some(name) = &action.channel {
            let channel = self
                .registry
                .get_channel(tenant, name)
                .await
                .map_err(|e| DeliveryError::Retryable(e.to_string()))?
                .ok_or_else(|| DeliveryError::Permanent(format!("no channel named {name:?}")))?;
            if channel.body.kind != action.kind {
                return Err(DeliveryError::Permanent(format!(
                    "channel {name:?} is a {} channel, not {}",
                    channel.body.kind.as_str(),
                    action.kind.as_str()
                )));
            }
            let mut to = channel.body.to.clone();
            to.extend(action.to.iter().cloned());
            return Ok(Target {
                label: name.clone(),
                url: channel.body.url.clone(),
                secret: open(channel.secret_sealed.as_ref())?,
                to,
                from: channel.body.from.clone(),
                account_sid: channel.body.account_sid.clone(),
                timeout: channel.body.timeout_ms.map(Duration::from_millis),
            });
        }
        let label = match action.kind {
            ActionKind::Webhook => mask_url(action.url.as_deref().unwrap_or_default()),
            ActionKind::Email | ActionKind::Sms => action.to.join(", "),
            ActionKind::MqttCommand => format!("command {}", action.command.clone().unwrap_or_default()),
            ActionKind::ShadowPatch => "shadow desired".into(),
        };
        Ok(Target {
            label,
            url: action.url.clone(),
            secret: open(action.secret_sealed.as_ref())?,
            to: action.to.clone(),
            from: None,
            account_sid: None,
            timeout: None,
        })
    }

    fn payload(alarm: &AlarmRecord, step: usize, event: &str) -> Value {
        json!({ "event": event, "step": step, "alarm": AlarmView::from(alarm) })
    }

    fn summary(alarm: &AlarmRecord) -> String {
        let value = alarm.value.map(|v| format!(" (value {v})")).unwrap_or_default();
        format!(
            "[Drover] {}: {} on {}{value}",
            alarm.severity.as_str().to_uppercase(),
            alarm.rule_name,
            alarm.device
        )
    }

    async fn send_once(
        &self,
        alarm: &AlarmRecord,
        action: &ActionBody,
        target: &Target,
        step: usize,
        event: &'static str,
    ) -> Result<String, DeliveryError> {
        match action.kind {
            ActionKind::Webhook => {
                let url = target
                    .url
                    .as_deref()
                    .ok_or_else(|| DeliveryError::Permanent("no URL".into()))?;
                let url =
                    reqwest::Url::parse(url).map_err(|_| DeliveryError::Permanent("not a URL".into()))?;
                // A literal address is connected to without resolving: the resolver never sees it.
                if !self.destinations.allows_url(&url) {
                    return Err(DeliveryError::NotAllowed);
                }
                let body = serde_json::to_vec(&Self::payload(alarm, step, event)).unwrap_or_default();
                let mut request = self
                    .http
                    .post(url)
                    .timeout(target.timeout.unwrap_or(self.timeout))
                    .header("Content-Type", "application/json")
                    .header("X-Drover-Event", event);
                if let Some(key) = &target.secret {
                    request = request.header(SIGNATURE_HEADER, signature(key, &body));
                }
                let response = request.body(body).send().await.map_err(http_error)?;
                let status = response.status();
                if status.is_success() {
                    Ok(format!("HTTP {status}"))
                } else {
                    Err(status_error(status))
                }
            }
            ActionKind::Email => {
                let (transport, from) = self.smtp.as_ref().ok_or_else(|| {
                    DeliveryError::Permanent("email is not configured (smtp.host, SMTP_HOST)".into())
                })?;
                let mut builder = Message::builder()
                    .from(from.clone())
                    .subject(Self::summary(alarm));
                for to in &target.to {
                    let mailbox: Mailbox = to
                        .parse()
                        .map_err(|_| DeliveryError::Permanent(format!("{to:?} is not an email address")))?;
                    builder = builder.to(mailbox);
                }
                let text = format!(
                    "{}\n\nAlarm {}\nStatus: {}\nCount: {}\nStep: {step}\n\n{}\n",
                    Self::summary(alarm),
                    alarm.id,
                    alarm.status(),
                    alarm.count,
                    serde_json::to_string_pretty(&alarm.details).unwrap_or_default()
                );
                let message = builder
                    .header(ContentType::TEXT_PLAIN)
                    .body(text)
                    .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
                match transport.send(message).await {
                    Ok(response) => Ok(format!("SMTP {}", response.code())),
                    Err(e) if e.is_permanent() => Err(DeliveryError::Permanent(e.to_string())),
                    Err(e) => Err(DeliveryError::Retryable(e.to_string())),
                }
            }
            ActionKind::Sms => {
                let sid = target
                    .account_sid
                    .clone()
                    .unwrap_or_else(|| self.sms.account_sid.clone());
                let token = target
                    .secret
                    .clone()
                    .unwrap_or_else(|| self.sms.auth_token.expose().to_string());
                let from = target.from.clone().unwrap_or_else(|| self.sms.from.clone());
                if sid.is_empty() {
                    return Err(DeliveryError::Permanent(
                        "no SMS account (sms.account_sid, SMS_ACCOUNT_SID)".into(),
                    ));
                }
                let url = format!(
                    "{}/2010-04-01/Accounts/{sid}/Messages.json",
                    self.sms.base_url.trim_end_matches('/')
                );
                let mut sent = Vec::new();
                for to in &target.to {
                    let response = self
                        .sms_http
                        .post(&url)
                        .basic_auth(&sid, Some(&token))
                        .form(&[
                            ("To", to.as_str()),
                            ("From", from.as_str()),
                            ("Body", &Self::summary(alarm)),
                        ])
                        .send()
                        .await
                        .map_err(http_error)?;
                    let status = response.status();
                    if !status.is_success() {
                        return Err(status_error(status));
                    }
                    sent.push(to.clone());
                }
                Ok(format!("sent to {}", sent.join(", ")))
            }
            ActionKind::MqttCommand => {
                // The same path as `POST /api/devices/{id}/commands`: recorded in the device's
                // command history, correlated by its actor; delivered once the device has it.
                let command = action.command.clone().unwrap_or_default();
                let device = DeviceId::parse(alarm.device.clone())
                    .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
                let payload = action
                    .payload
                    .clone()
                    .unwrap_or_else(|| Self::payload(alarm, step, event));
                let service = self
                    .commands
                    .get()
                    .ok_or_else(|| DeliveryError::Retryable("device commands are not running yet".into()))?;
                let spec = crate::fleet_ops::commands::CommandSpec {
                    name: command.clone(),
                    payload,
                    timeout: Duration::from_secs(crate::fleet_ops::commands::DEFAULT_TIMEOUT_SECS),
                    queue_ttl: None,
                };
                match service
                    .send(&alarm.tenant, &device, spec, format!("rule:{}", alarm.rule_id))
                    .await
                {
                    Ok(ticket) => Ok(format!("command {command} sent ({})", ticket.record.id)),
                    Err(e @ crate::fleet_ops::commands::CommandError::DeviceOffline(_))
                    | Err(e @ crate::fleet_ops::commands::CommandError::Busy { .. })
                    | Err(e @ crate::fleet_ops::commands::CommandError::Unavailable(_))
                    | Err(e @ crate::fleet_ops::commands::CommandError::Store(_)) => {
                        Err(DeliveryError::Retryable(e.to_string()))
                    }
                    Err(e) => Err(DeliveryError::Permanent(e.to_string())),
                }
            }
            ActionKind::ShadowPatch => {
                let device = DeviceId::parse(alarm.device.clone())
                    .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
                let patch = action.payload.clone().unwrap_or(Value::Null);
                self.patcher
                    .patch_desired(&alarm.tenant, &device, patch)
                    .await
                    .map(|_| "desired state patched".to_string())
                    .map_err(DeliveryError::Permanent)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn http_failures_are_classified() {
        assert!(status_error(reqwest::StatusCode::BAD_GATEWAY).is_retryable());
        assert!(status_error(reqwest::StatusCode::TOO_MANY_REQUESTS).is_retryable());
        assert!(!status_error(reqwest::StatusCode::UNAUTHORIZED).is_retryable());
        assert!(!status_error(reqwest::StatusCode::FOUND).is_retryable());
        assert!(!DeliveryError::NotAllowed.is_retryable());
        let no_response = DeliveryError::NoResponse {
            cause: "tcp connect error: Connection refused (os error 111)".into(),
        };
        assert!(no_response.is_retryable());
        assert_eq!(no_response.message(), "delivery failed");
    }
}
