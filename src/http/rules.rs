//! Rules (`/api/rules`) and named notification channels (`/api/channels`).
//!
//! Every change is validated first (expressions compiled and dry-run in the sandbox, on the
//! blocking pool and never on an HTTP worker: a syntax error, a limit hit or a call to a
//! function rules may not use is a 400 `invalid_expression` with line and column; an action
//! that could never be delivered is a 400 too), written with its audit entry, and then the
//! tenant's rule actor reloads. The answer carries `warnings` for what will not fire as
//! written (a metric no device reports). Secrets are write-only.

use actix_web::{HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use drover_actors::Role;
use drover_actors::rules::stats::RuleStatsView;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::error::{ApiError, ErrorBody, classify_json};
use crate::http::principal::Principal;
use crate::rules::model::{
    ChannelBody, ChannelSummary, KnownMetrics, ModelError, RuleBody, RuleWarning, unmask_url,
};
use crate::state::AppState;
use crate::storage::registry::from_ms;
use crate::storage::rules::{ChannelRecord, RuleRecord};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(create_rule)
        .service(list_rules)
        .service(get_rule)
        .service(patch_rule)
        .service(delete_rule)
        .service(create_channel)
        .service(list_channels)
        .service(get_channel)
        .service(patch_channel)
        .service(delete_channel)
        .service(test_channel);
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        ApiError::bad_request(e.code, e.message)
    }
}

/// A rule with its evaluation figures.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleView {
    pub id: String,
    /// The definition (secrets shown as `secretSet`).
    #[schema(value_type = Object)]
    pub rule: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// evaluations, matches, skipped (a value the rule reads was missing), errors, limitHits,
    /// status (running, stopped after a limit hit, idle before its first event), lastError.
    #[schema(value_type = Object)]
    pub stats: RuleStatsView,
    /// In the answers to create and update only, when the rule will not fire as written:
    /// `unknown_metric` for a metric no device of the tenant has reported since the server
    /// started and no device type declares.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<RuleWarning>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    pub rules: Vec<RuleView>,
}

fn rule_view(state: &AppState, record: &RuleRecord) -> RuleView {
    let stats = state
        .rules
        .board
        .lock()
        .ok()
        .and_then(|b| b.get(&record.id).map(|s| s.view()))
        .unwrap_or(RuleStatsView {
            evaluations: 0,
            matches: 0,
            skipped: 0,
            errors: 0,
            limit_hits: 0,
            timeouts: 0,
            status: "idle",
            last_error: None,
        });
    RuleView {
        id: record.id.clone(),
        rule: record.body.view(),
        created_at: from_ms(record.created_at),
        updated_at: from_ms(record.updated_at),
        stats,
        warnings: Vec::new(),
    }
}

/// Refuses bodies that try to set what only the server writes.
fn no_sealed(body: &Value) -> Result<(), ApiError> {
    if body.to_string().contains("\"secretSealed\"") {
        return Err(ApiError::invalid("secretSealed", "is set by the server"));
    }
    Ok(())
}

/// Refuses a rule whose actions could never be delivered (a channel the tenant does not have or
/// of another type, email without SMTP, SMS without an account): found now, not when an alarm
/// fails to notify anybody.
async fn check_channels(
    state: &AppState,
    tenant: &drover_actors::TenantId,
    rule: &RuleBody,
) -> Result<(), ApiError> {
    let names_channel = rule
        .actions
        .iter()
        .chain(rule.escalation.iter().flat_map(|step| step.actions.iter()))
        .any(|action| action.channel.is_some());
    let channels = if names_channel {
        state.registry.list_channels(tenant).await?
    } else {
        Vec::new()
    };
    let summaries: Vec<ChannelSummary> = channels
        .iter()
        .map(|c| ChannelSummary {
            name: &c.body.name,
            kind: c.body.kind,
            has_account: c.body.account_sid.as_deref().is_some_and(|a| !a.is_empty()),
        })
        .collect();
    rule.check_deliverable(&summaries, state.rules.delivery)?;
    Ok(())
}

/// Compiles and dry-runs the rule's expressions on the blocking pool: a script never runs on an
/// HTTP worker (each run is bounded by the sandbox's wall-time limit).
async fn validated(state: &AppState, rule: RuleBody) -> Result<RuleBody, ApiError> {
    let sandbox = state.rules.sandbox.clone();
    web::block(move || rule.validate(&sandbox).map(|()| rule))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// The metric names the tenant is known to have: reported by its devices since the server
/// started, or declared by its device types (declared metrics, rename and conversion targets).
async fn known_metrics(state: &AppState, tenant: &drover_actors::TenantId) -> Result<KnownMetrics, ApiError> {
    let reported = state.rules.seen.reported(tenant);
    let mut names = reported.names;
    for device_type in state.registry.list_device_types(tenant).await? {
        let schema = &device_type.schema;
        names.extend(schema.metrics.keys().map(|m| m.as_str().to_string()));
        names.extend(schema.rename.values().map(|m| m.as_str().to_string()));
        names.extend(
            schema
                .convert
                .iter()
                .map(|(from, c)| c.to.as_ref().unwrap_or(from).as_str().to_string()),
        );
    }
    Ok(KnownMetrics {
        names,
        complete: reported.complete,
    })
}

fn parse_rule(value: Value) -> Result<RuleBody, ApiError> {
    // The same codes as any other body (`unknown_field` naming a misspelled field, ...).
    serde_json::from_value(value).map_err(|e| classify_json(&e))
}

/// Create a rule.
#[utoipa::path(
    tag = "rules",
    request_body(content = RuleBody, description = "A rule: name, condition (expression or typed), actions, scope, severity, clear, escalation, notify"),
    responses(
        (status = 201, body = RuleView, description = "Created; `warnings` names what will not fire as written (`unknown_metric`)"),
        (status = 400, body = ErrorBody, description = "`invalid_expression` (syntax, a sandbox limit, or a function rules may not call such as `sleep` or `timestamp`, with line and column), `unknown_channel`, `channel_type_mismatch`, `email_not_configured`, `sms_not_configured`, `validation_failed`, `unknown_field`, `missing_field`, `invalid_type`, `invalid_value`, `invalid_field`"),
        (status = 409, body = ErrorBody)
    ),
    security(("bearer" = []))
)]
#[post("/rules")]
async fn create_rule(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "rule.create")?;
    let body = body.into_inner();
    no_sealed(&body)?;
    let mut rule = validated(&state, parse_rule(body)?).await?;
    rule.check_destinations(&state.rules.destinations)?;
    check_channels(&state, &principal.tenant, &rule).await?;
    let warnings = rule.warnings(&known_metrics(&state, &principal.tenant).await?);
    rule.seal_secrets(&state.rules.secrets);
    let record = state
        .registry
        .create_rule(principal.tenant.clone(), rule, principal.audit_actor())
        .await?;
    state.rules.reload(&principal.tenant);
    state.mqtt.tell_cluster(crate::cluster::notices::Notice::Rules {
        tenant: principal.tenant.to_string(),
    });
    let mut view = rule_view(&state, &record);
    view.warnings = warnings;
    Ok(HttpResponse::Created().json(view))
}

/// The tenant's rules.
#[utoipa::path(tag = "rules", responses((status = 200, body = RuleList)), security(("bearer" = [])))]
#[get("/rules")]
async fn list_rules(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<RuleList>, ApiError> {
    let records = state.registry.list_rules(&principal.tenant).await?;
    Ok(web::Json(RuleList {
        rules: records.iter().map(|r| rule_view(&state, r)).collect(),
    }))
}

/// One rule with its evaluation figures.
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Rule id")),
    responses((status = 200, body = RuleView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/rules/{id}")]
async fn get_rule(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<RuleView>, ApiError> {
    let record = state
        .registry
        .get_rule(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("rule {id} not found")))?;
    Ok(web::Json(rule_view(&state, &record)))
}

/// Change a rule: the fields given replace the stored ones (actions are replaced whole, so
/// their secrets must be sent again). A changed rule starts afresh (and runs again if stopped).
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Rule id")),
    request_body(content = Object, description = "Fields of the rule to replace"),
    responses(
        (status = 200, body = RuleView, description = "Updated; `warnings` names what will not fire as written (`unknown_metric`)"),
        (status = 400, body = ErrorBody, description = "As for creation"),
        (status = 404, body = ErrorBody)
    ),
    security(("bearer" = []))
)]
#[patch("/rules/{id}")]
async fn patch_rule(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<web::Json<RuleView>, ApiError> {
    principal.require(Role::Operator, "rule.update")?;
    let patch = body.into_inner();
    no_sealed(&patch)?;
    let Value::Object(patch) = patch else {
        return Err(ApiError::bad_request(
            "validation_failed",
            "expected a JSON object",
        ));
    };
    let current = state
        .registry
        .get_rule(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("rule {id} not found")))?;
    let mut merged = serde_json::to_value(&current.body).map_err(|e| ApiError::internal(e.to_string()))?;
    let touches_actions = patch.contains_key("actions") || patch.contains_key("escalation");
    for (key, value) in patch {
        merged[key] = value;
    }
    let mut rule = parse_rule(merged)?;
    rule.restore_masked_urls(&current.body);
    let mut rule = validated(&state, rule).await?;
    if touches_actions {
        // Only new actions: a rule stored before the policy can still be disabled.
        rule.check_destinations(&state.rules.destinations)?;
        check_channels(&state, &principal.tenant, &rule).await?;
    }
    let warnings = rule.warnings(&known_metrics(&state, &principal.tenant).await?);
    if touches_actions {
        rule.seal_secrets(&state.rules.secrets);
    }
    let record = state
        .registry
        .update_rule(
            principal.tenant.clone(),
            id.into_inner(),
            rule,
            principal.audit_actor(),
        )
        .await?;
    state.rules.reload(&principal.tenant);
    state.mqtt.tell_cluster(crate::cluster::notices::Notice::Rules {
        tenant: principal.tenant.to_string(),
    });
    let mut view = rule_view(&state, &record);
    view.warnings = warnings;
    Ok(web::Json(view))
}

/// Delete a rule; its active alarms are cleared.
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Rule id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/rules/{id}")]
async fn delete_rule(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "rule.delete")?;
    let now = state.rules.clock.now_ms();
    state
        .registry
        .delete_rule(
            principal.tenant.clone(),
            id.into_inner(),
            now,
            principal.audit_actor(),
        )
        .await?;
    state.rules.reload(&principal.tenant);
    state.mqtt.tell_cluster(crate::cluster::notices::Notice::Rules {
        tenant: principal.tenant.to_string(),
    });
    Ok(HttpResponse::NoContent().finish())
}

// ---- channels -------------------------------------------------------------------------------

/// A channel; its secret is never shown.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelView {
    pub id: String,
    #[serde(flatten)]
    pub channel: ChannelBody,
    /// Whether a secret (HMAC key, gateway token) is stored.
    pub secret_set: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelList {
    pub channels: Vec<ChannelView>,
}

impl From<ChannelRecord> for ChannelView {
    fn from(c: ChannelRecord) -> Self {
        ChannelView {
            id: c.id,
            channel: c.body.view(),
            secret_set: c.secret_sealed.is_some(),
            created_at: from_ms(c.created_at),
            updated_at: from_ms(c.updated_at),
        }
    }
}

/// Create a notification channel (webhook, email or sms).
#[utoipa::path(
    tag = "rules",
    request_body = ChannelBody,
    responses((status = 201, body = ChannelView), (status = 400, body = ErrorBody, description = "Invalid settings; `email_not_configured` (no SMTP server), `sms_not_configured` (no SMS gateway account)"), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/channels")]
async fn create_channel(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<ChannelBody>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "channel.create")?;
    let body = body.into_inner();
    body.validate()?;
    body.check_destination(&state.rules.destinations)?;
    body.check_deliverable(state.rules.delivery)?;
    let sealed = body.secret.as_deref().map(|s| state.rules.secrets.seal(s));
    let record = state
        .registry
        .create_channel(principal.tenant.clone(), body, sealed, principal.audit_actor())
        .await?;
    Ok(HttpResponse::Created().json(ChannelView::from(record)))
}

/// The tenant's channels.
#[utoipa::path(tag = "rules", responses((status = 200, body = ChannelList)), security(("bearer" = [])))]
#[get("/channels")]
async fn list_channels(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<ChannelList>, ApiError> {
    let channels = state.registry.list_channels(&principal.tenant).await?;
    Ok(web::Json(ChannelList {
        channels: channels.into_iter().map(Into::into).collect(),
    }))
}

/// One channel (by id or name).
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Channel id or name")),
    responses((status = 200, body = ChannelView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/channels/{id}")]
async fn get_channel(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<ChannelView>, ApiError> {
    let channel = state
        .registry
        .get_channel(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("channel {id} not found")))?;
    Ok(web::Json(channel.into()))
}

/// Replace a channel's settings; without `secret` the stored one is kept.
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Channel id or name")),
    request_body = ChannelBody,
    responses((status = 200, body = ChannelView), (status = 400, body = ErrorBody, description = "As for creation"), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[patch("/channels/{id}")]
async fn patch_channel(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<ChannelBody>,
) -> Result<web::Json<ChannelView>, ApiError> {
    principal.require(Role::Admin, "channel.update")?;
    let mut body = body.into_inner();
    body.validate()?;
    body.check_destination(&state.rules.destinations)?;
    body.check_deliverable(state.rules.delivery)?;
    // A URL sent back as shown (password masked) keeps the stored password.
    if let Some(sent) = body.url.as_deref()
        && let Some(current) = state.registry.get_channel(&principal.tenant, &id).await?
        && let Some(stored) = unmask_url(sent, current.body.url.as_deref())
    {
        body.url = Some(stored);
    }
    let sealed = body.secret.as_deref().map(|s| state.rules.secrets.seal(s));
    let record = state
        .registry
        .update_channel(
            principal.tenant.clone(),
            id.into_inner(),
            body,
            sealed,
            principal.audit_actor(),
        )
        .await?;
    Ok(web::Json(record.into()))
}

/// Delete a channel (actions naming it fail, recorded in their alarms' delivery log).
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Channel id or name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/channels/{id}")]
async fn delete_channel(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "channel.delete")?;
    state
        .registry
        .delete_channel(principal.tenant.clone(), id.into_inner(), principal.audit_actor())
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// What a channel test answers.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelTestView {
    pub delivered: bool,
    /// The receiver's answer, or why the delivery failed (as the alarm delivery log says it).
    pub detail: String,
}

/// Send one test notification through a channel (admins; one attempt, no retry). Delivery
/// failures answer 200 with `delivered: false` and the reason.
#[utoipa::path(
    tag = "rules",
    params(("id" = String, Path, description = "Channel id or name")),
    responses((status = 200, body = ChannelTestView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/channels/{id}/test")]
async fn test_channel(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<ChannelTestView>, ApiError> {
    principal.require(Role::Admin, "channel.test")?;
    let channel = state
        .registry
        .get_channel(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("channel {id} not found")))?;
    let outcome = state
        .rules
        .notifier
        .test_channel(&principal.tenant, &channel.id, channel.body.kind)
        .await;
    let (delivered, detail) = match outcome {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    state.audit.submit(crate::storage::records::AuditEvent {
        actor: principal.audit_actor(),
        action: "channel.test".into(),
        target: Some(channel.body.name.clone()),
        outcome: crate::storage::records::AuditOutcome::Ok,
        detail: Some(serde_json::json!({ "delivered": delivered })),
    });
    Ok(web::Json(ChannelTestView { delivered, detail }))
}
