//! MQTT administration: access rules (applied to live connections at once) and the CAs that
//! sign a tenant's device certificates.

use actix_web::{HttpResponse, delete, get, post, web};
use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use drover_actors::Role;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::mqtt::acl::Namespace;
use crate::mqtt::auth::{parse_pem_certificates, verify_possession};
use crate::mqtt::topic;
use crate::state::AppState;
use crate::storage::records::{AclAction, AclEffect, AclRule, AclSubject, CaCertificate};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list_rules)
        .service(create_rule)
        .service(delete_rule)
        .service(list_cas)
        .service(ca_registration_code)
        .service(add_ca)
        .service(delete_ca);
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AclRuleView {
    pub id: String,
    /// `role:<admin|operator|viewer>`, `apiKey:<id>` or `anonymous`.
    pub subject: String,
    /// `publish`, `subscribe` or `all`.
    pub action: String,
    /// A topic filter; wildcards allowed.
    pub topic: String,
    /// `allow` or `deny`.
    pub effect: String,
    /// Lower first; the first matching rule decides.
    pub priority: i32,
    pub created_at: DateTime<Utc>,
}

impl From<AclRule> for AclRuleView {
    fn from(r: AclRule) -> Self {
        AclRuleView {
            subject: match &r.subject {
                AclSubject::Role(role) => format!("role:{role}"),
                AclSubject::ApiKey(id) => format!("apiKey:{id}"),
                AclSubject::Anonymous => "anonymous".into(),
            },
            action: r.action.as_str().into(),
            effect: r.effect.as_str().into(),
            id: r.id,
            topic: r.topic,
            priority: r.priority,
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAclRule {
    #[schema(example = "role:viewer")]
    pub subject: String,
    #[schema(example = "subscribe")]
    pub action: String,
    #[schema(example = "alerts/#")]
    pub topic: String,
    #[schema(example = "deny")]
    pub effect: String,
    #[serde(default = "default_priority")]
    pub priority: i32,
}

fn default_priority() -> i32 {
    100
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AclRuleList {
    pub rules: Vec<AclRuleView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AclChange {
    pub rule: Option<AclRuleView>,
    /// Live subscriptions lying wholly inside a filter the new rules deny, removed; those
    /// that only overlap one stay and no longer receive the denied topics.
    pub subscriptions_dropped: usize,
}

#[derive(Debug, Deserialize)]
pub struct ScopeQuery {
    /// `anonymous` for the rules about anonymous clients (platform admins).
    scope: Option<String>,
}

/// The namespace a request is about: the caller's tenant, or (platform admins) anonymous clients.
fn scope(principal: &Principal, query: &ScopeQuery, action: &str) -> Result<Namespace, ApiError> {
    match query.scope.as_deref() {
        None | Some("tenant") => Ok(Namespace::Tenant(principal.tenant.clone())),
        Some("anonymous") => {
            principal.require_platform_admin(action)?;
            Ok(Namespace::Anonymous)
        }
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("scope: expected tenant or anonymous, got {other:?}"),
        )),
    }
}

fn tenant_of(namespace: &Namespace) -> Option<drover_actors::TenantId> {
    match namespace {
        Namespace::Tenant(t) => Some(t.clone()),
        Namespace::Anonymous => None,
    }
}

/// Reloads a namespace's rules into the broker; returns the live subscriptions dropped.
async fn apply(state: &AppState, namespace: Namespace) -> Result<usize, ApiError> {
    let rules = state
        .registry
        .list_acl_rules(tenant_of(&namespace).as_ref())
        .await?;
    state.mqtt.tell_cluster(crate::cluster::notices::Notice::Acl {
        namespace: crate::cluster::wire::namespace_key(&namespace),
    });
    Ok(state.mqtt.broker.set_acl_rules(namespace, rules))
}

/// Access rules for applications and anonymous clients, in evaluation order.
#[utoipa::path(
    tag = "mqtt",
    params(("scope" = Option<String>, Query, description = "`anonymous` for rules about anonymous clients (platform admins)")),
    responses((status = 200, body = AclRuleList), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/mqtt/acl")]
async fn list_rules(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<ScopeQuery>,
) -> Result<web::Json<AclRuleList>, ApiError> {
    principal.require(Role::Admin, "mqtt_acl.list")?;
    let namespace = scope(&principal, &query, "mqtt_acl.list")?;
    let rules = state
        .registry
        .list_acl_rules(tenant_of(&namespace).as_ref())
        .await?;
    Ok(web::Json(AclRuleList {
        rules: rules.into_iter().map(Into::into).collect(),
    }))
}

/// Add an access rule; it applies to live connections at once.
#[utoipa::path(
    tag = "mqtt",
    request_body = CreateAclRule,
    responses((status = 201, body = AclChange), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/mqtt/acl")]
async fn create_rule(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<CreateAclRule>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "mqtt_acl.create")?;
    let body = body.into_inner();
    let subject = match body.subject.split_once(':') {
        _ if body.subject == "anonymous" => AclSubject::Anonymous,
        Some(("role", role)) => AclSubject::Role(
            role.parse::<Role>()
                .map_err(|m| ApiError::invalid("subject", m))?,
        ),
        Some(("apiKey", id)) => {
            let known = state
                .registry
                .list_api_keys(&principal.tenant)
                .await?
                .into_iter()
                .any(|k| k.id == id);
            if !known {
                return Err(ApiError::not_found(format!("API key {id} not found")));
            }
            AclSubject::ApiKey(id.to_string())
        }
        _ => {
            return Err(ApiError::invalid(
                "subject",
                "expected role:<admin|operator|viewer>, apiKey:<id> or anonymous",
            ));
        }
    };
    let namespace = if subject == AclSubject::Anonymous {
        principal.require_platform_admin("mqtt_acl.create_anonymous")?;
        Namespace::Anonymous
    } else {
        Namespace::Tenant(principal.tenant.clone())
    };
    let action = AclAction::parse(&body.action)
        .ok_or_else(|| ApiError::invalid("action", "expected publish, subscribe or all"))?;
    let effect = AclEffect::parse(&body.effect)
        .ok_or_else(|| ApiError::invalid("effect", "expected allow or deny"))?;
    topic::validate_filter(&body.topic).map_err(|e| ApiError::invalid("topic", e))?;
    if body.topic.starts_with("$share/") {
        return Err(ApiError::invalid(
            "topic",
            "rules name the filter itself, without $share/<group>/",
        ));
    }
    let rule = AclRule {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: tenant_of(&namespace),
        subject,
        action,
        topic: body.topic,
        effect,
        priority: body.priority,
        // Milliseconds, as the registry stores it: the answer shows what a later GET will.
        created_at: Utc::now().trunc_subsecs(3),
    };
    let rule = state
        .registry
        .create_acl_rule(rule, principal.audit_actor())
        .await?;
    let dropped = apply(&state, namespace).await?;
    Ok(HttpResponse::Created().json(AclChange {
        rule: Some(rule.into()),
        subscriptions_dropped: dropped,
    }))
}

/// Delete an access rule; it stops applying at once.
#[utoipa::path(
    tag = "mqtt",
    params(("id" = String, Path, description = "Rule id"), ("scope" = Option<String>, Query, description = "`anonymous` for rules about anonymous clients")),
    responses((status = 200, body = AclChange), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/mqtt/acl/{id}")]
async fn delete_rule(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    query: web::Query<ScopeQuery>,
) -> Result<web::Json<AclChange>, ApiError> {
    principal.require(Role::Admin, "mqtt_acl.delete")?;
    let namespace = scope(&principal, &query, "mqtt_acl.delete")?;
    state
        .registry
        .delete_acl_rule(tenant_of(&namespace), id.into_inner(), principal.audit_actor())
        .await?;
    let dropped = apply(&state, namespace).await?;
    Ok(web::Json(AclChange {
        rule: None,
        subscriptions_dropped: dropped,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaView {
    pub id: String,
    pub subject: String,
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint: String,
    pub not_after: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

impl From<CaCertificate> for CaView {
    fn from(c: CaCertificate) -> Self {
        CaView {
            id: c.id,
            subject: c.subject,
            fingerprint: c.fingerprint,
            not_after: c.not_after,
            created_at: c.created_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AddCa {
    /// The CA certificate, PEM.
    pub pem: String,
    /// Proof of possession of the CA's key: a certificate whose subject CN is the tenant's
    /// current registration code (`GET /api/mqtt/cas/registration-code`), signed by the CA, PEM.
    pub verification_pem: Option<String>,
}

/// How long a CA registration code may be used.
const REGISTRATION_CODE_TTL: chrono::Duration = chrono::Duration::hours(1);

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaRegistrationCode {
    /// The subject CN a verification certificate must carry.
    pub registration_code: String,
    /// After this, ask again for a new code. A code also serves for one registration only.
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CaList {
    pub cas: Vec<CaView>,
}

/// CAs whose certificates identify this tenant's devices over MQTT mTLS.
#[utoipa::path(tag = "mqtt", responses((status = 200, body = CaList)), security(("bearer" = [])))]
#[get("/mqtt/cas")]
async fn list_cas(state: web::Data<AppState>, principal: Principal) -> Result<web::Json<CaList>, ApiError> {
    principal.require(Role::Admin, "ca.list")?;
    let cas = state
        .registry
        .list_ca_certificates(Some(&principal.tenant))
        .await?;
    Ok(web::Json(CaList {
        cas: cas.into_iter().map(Into::into).collect(),
    }))
}

/// The tenant's CA registration code: sign a verification certificate with this CN using the
/// CA's private key, and register the CA with it. The same code is answered until it expires
/// (an hour) or is used.
#[utoipa::path(
    tag = "mqtt",
    responses((status = 200, body = CaRegistrationCode)),
    security(("bearer" = []))
)]
#[get("/mqtt/cas/registration-code")]
async fn ca_registration_code(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<CaRegistrationCode>, ApiError> {
    principal.require(Role::Admin, "ca.registration_code")?;
    let (registration_code, expires_at) = state
        .registry
        // 64 hex digits: as long as a CN may be, and safe in any shell command line.
        .ca_registration_code(&principal.tenant, REGISTRATION_CODE_TTL, || {
            hex::encode(rand::random::<[u8; 32]>())
        })
        .await?;
    Ok(web::Json(CaRegistrationCode {
        registration_code,
        expires_at,
    }))
}

/// Register a CA: devices presenting a certificate it signed, with their device id as CN,
/// connect without a token. Takes proof that the caller holds the CA's private key (a
/// verification certificate for the tenant's registration code), and a CA identifies the
/// devices of the tenant that registered it only.
#[utoipa::path(
    tag = "mqtt",
    request_body = AddCa,
    responses((status = 201, body = CaView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/mqtt/cas")]
async fn add_ca(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<AddCa>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "ca.add")?;
    let AddCa {
        pem,
        verification_pem,
    } = body.into_inner();
    let der = parse_pem_certificates(&pem)
        .map_err(|m| ApiError::invalid("pem", m))?
        .remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| ApiError::invalid("pem", format!("not an X.509 certificate: {e}")))?;
    let is_ca = parsed
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(ApiError::invalid(
            "pem",
            "the certificate is not a CA (basicConstraints CA:TRUE)",
        ));
    }
    let not_after = Utc
        .timestamp_opt(parsed.validity().not_after.timestamp(), 0)
        .single()
        .unwrap_or_default();
    if not_after <= Utc::now() {
        return Err(ApiError::invalid("pem", "the certificate has expired"));
    }
    let verification_pem = verification_pem.ok_or_else(|| {
        ApiError::invalid(
            "verificationPem",
            "required: a certificate with CN = the code from GET /api/mqtt/cas/registration-code, \
             signed by this CA's private key (proof that you hold it)",
        )
    })?;
    let verification = parse_pem_certificates(&verification_pem)
        .map_err(|m| ApiError::invalid("verificationPem", m))?
        .remove(0);
    let code = verify_possession(&der, &verification).map_err(|e| ApiError::invalid("verificationPem", e))?;
    let ca = CaCertificate {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: principal.tenant.clone(),
        fingerprint: hex::encode(Sha256::digest(der.as_ref())),
        subject: parsed.subject().to_string(),
        pem,
        not_after,
        created_at: Utc::now().trunc_subsecs(3),
    };
    let ca = state
        .registry
        .add_ca_certificate(ca, code, principal.audit_actor())
        .await?;
    state.mqtt.auth.reload_cas().await?;
    state.mqtt.tell_cluster(crate::cluster::notices::Notice::Cas);
    Ok(HttpResponse::Created().json(CaView::from(ca)))
}

/// Remove a CA; devices whose certificate it signed can no longer connect with it.
#[utoipa::path(
    tag = "mqtt",
    params(("id" = String, Path, description = "CA id")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/mqtt/cas/{id}")]
async fn delete_ca(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "ca.delete")?;
    state
        .registry
        .delete_ca_certificate(principal.tenant.clone(), id.into_inner(), principal.audit_actor())
        .await?;
    state.mqtt.auth.reload_cas().await?;
    state.mqtt.tell_cluster(crate::cluster::notices::Notice::Cas);
    Ok(HttpResponse::NoContent().finish())
}
