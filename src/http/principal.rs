//! Who is calling: a user with a login token (JWT) or an application with an API key.
//!
//! `Principal` is an extractor. Every API handler takes one, so no handler can forget to
//! authenticate, and every query it makes is scoped to `principal.tenant`. Roles and the
//! platform-admin flag are read from the registry on each request, so a demotion, a disabled
//! user, a revoked key or a password change (which ends every earlier login token) takes effect
//! at once rather than when a token expires.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use chrono::Utc;
use drover_actors::{Role, TenantId};
use futures_util::future::LocalBoxFuture;

use crate::auth::TokenError;
use crate::auth::secrets::{API_KEY_PREFIX, digest};
use crate::http::error::ApiError;
use crate::state::AppState;
use crate::storage::records::{AuditActor, AuditEvent, AuditOutcome};

/// Header a platform admin sets to act inside another tenant.
pub const TENANT_HEADER: &str = "X-Tenant-Id";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User { id: String, username: String },
    ApiKey { id: String, name: String },
}

#[derive(Clone)]
pub struct Principal {
    pub tenant: TenantId,
    pub role: Role,
    pub platform_admin: bool,
    pub subject: Subject,
    pub source_ip: Option<String>,
    state: web::Data<AppState>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("tenant", &self.tenant)
            .field("role", &self.role)
            .field("platform_admin", &self.platform_admin)
            .field("subject", &self.subject)
            .finish()
    }
}

impl Principal {
    /// `user:<username>` or `key:<id>`, as the audit log names callers.
    pub fn actor(&self) -> String {
        match &self.subject {
            Subject::User { username, .. } => format!("user:{username}"),
            Subject::ApiKey { id, .. } => format!("key:{id}"),
        }
    }

    pub fn audit_actor(&self) -> AuditActor {
        AuditActor {
            tenant: Some(self.tenant.clone()),
            actor: self.actor(),
            source_ip: self.source_ip.clone(),
        }
    }

    /// Refuses (403, audited) unless the caller's role includes `required`.
    pub fn require(&self, required: Role, action: &str) -> Result<(), ApiError> {
        if self.role.allows(required) {
            return Ok(());
        }
        self.deny(
            action,
            format!("{action} needs the {required} role; this caller is {}", self.role),
        )
    }

    /// Refuses (403, audited) unless the caller is a platform admin.
    pub fn require_platform_admin(&self, action: &str) -> Result<(), ApiError> {
        if self.platform_admin {
            return Ok(());
        }
        self.deny(action, format!("{action} needs a platform admin"))
    }

    fn deny(&self, action: &str, message: String) -> Result<(), ApiError> {
        self.state
            .metrics
            .auth_failures
            .with_label_values(&["forbidden"])
            .inc();
        self.state.audit.submit(AuditEvent {
            actor: self.audit_actor(),
            action: action.to_string(),
            target: None,
            outcome: AuditOutcome::Denied,
            detail: Some(serde_json::json!({ "reason": "role", "role": self.role })),
        });
        Err(ApiError::forbidden(message))
    }
}

/// Longest login token or API key accepted, in bytes. Login tokens are about 400 bytes and API
/// keys 47; anything longer is refused before it is hashed or decoded.
pub const MAX_CREDENTIAL_BYTES: usize = 4096;

/// The credential a request carries.
#[derive(Clone)]
enum Credential {
    Jwt(String),
    ApiKey(String),
    /// Longer than [`MAX_CREDENTIAL_BYTES`]; the field it came in.
    TooLong(&'static str),
}

fn credential(req: &HttpRequest) -> Option<Credential> {
    let credential = carried_credential(req)?;
    Some(match credential {
        Credential::ApiKey(key) if key.len() > MAX_CREDENTIAL_BYTES => Credential::TooLong("apiKey"),
        Credential::Jwt(token) if token.len() > MAX_CREDENTIAL_BYTES => Credential::TooLong("token"),
        other => other,
    })
}

fn carried_credential(req: &HttpRequest) -> Option<Credential> {
    if let Some(key) = req.headers().get("X-API-Key").and_then(|v| v.to_str().ok()) {
        return Some(Credential::ApiKey(key.trim().to_string()));
    }
    let Some(value) = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        // Browsers cannot set headers on a WebSocket: the live stream and the device sockets
        // take `?token=`.
        if req.path() == "/ws" || req.path().starts_with("/ws/") {
            let token =
                web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
                    .ok()
                    .and_then(|q| q.get("token").cloned())?;
            return Some(if token.starts_with(API_KEY_PREFIX) {
                Credential::ApiKey(token)
            } else {
                Credential::Jwt(token)
            });
        }
        return None;
    };
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim().to_string();
    Some(if token.starts_with(API_KEY_PREFIX) {
        Credential::ApiKey(token)
    } else {
        Credential::Jwt(token)
    })
}

/// The tenant a caller asks to act in: the `X-Tenant-Id` header, or on the live stream, where
/// browsers cannot set headers, `?tenant=`. Only platform admins may name one (see
/// `authenticate`).
fn requested_tenant(req: &HttpRequest) -> Option<String> {
    if let Some(value) = req.headers().get(TENANT_HEADER) {
        return Some(value.to_str().unwrap_or("").to_string());
    }
    if req.path() == "/ws" {
        return web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("tenant").cloned());
    }
    None
}

impl FromRequest for Principal {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let credential = credential(req);
        let tenant_override = requested_tenant(req);
        let source_ip = req.peer_addr().map(|a| a.ip().to_string());
        let route = format!("{} {}", req.method(), req.path());
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            authenticate(state, credential, tenant_override, source_ip, route)
                .await
                .map_err(Into::into)
        })
    }
}

/// A request's credential kept to be checked again later: a long-lived connection (the `/ws`
/// stream) must end when its API key is revoked, its user's password changes or its login
/// token expires, as REST calls start failing then. The check is the one every request goes
/// through, so it costs one registry read.
/// How long a live socket (a `/ws` session, a device's ingestion socket) may outlive its
/// credential at most: one registry read per socket each time, never per frame.
pub const CREDENTIAL_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone)]
pub struct CredentialCheck {
    state: web::Data<AppState>,
    credential: Option<Credential>,
    tenant_override: Option<String>,
    source_ip: Option<String>,
    route: String,
}

impl CredentialCheck {
    pub fn of(req: &HttpRequest, state: web::Data<AppState>) -> CredentialCheck {
        CredentialCheck {
            state,
            credential: credential(req),
            tenant_override: requested_tenant(req),
            source_ip: req.peer_addr().map(|a| a.ip().to_string()),
            route: format!("{} {}", req.method(), req.path()),
        }
    }

    /// Whether the credential still authenticates as the same tenant. A registry that does
    /// not answer (5xx) counts as still valid: an outage should not drop every live session.
    pub async fn still_valid(&self, tenant: &TenantId) -> bool {
        let checked = authenticate(
            self.state.clone(),
            self.credential.clone(),
            self.tenant_override.clone(),
            self.source_ip.clone(),
            self.route.clone(),
        )
        .await;
        match checked {
            Ok(principal) => principal.tenant == *tenant,
            Err(e) => e.status.is_server_error(),
        }
    }
}

async fn authenticate(
    state: web::Data<AppState>,
    credential: Option<Credential>,
    tenant_override: Option<String>,
    source_ip: Option<String>,
    route: String,
) -> Result<Principal, ApiError> {
    let refuse = |kind: &'static str, error: ApiError, tenant: Option<TenantId>, actor: String| {
        state.metrics.auth_failures.with_label_values(&[kind]).inc();
        state.audit.submit(AuditEvent {
            actor: AuditActor {
                tenant,
                actor,
                source_ip: source_ip.clone(),
            },
            action: "auth".into(),
            target: Some(route.clone()),
            outcome: AuditOutcome::Denied,
            detail: Some(serde_json::json!({ "code": error.code })),
        });
        error
    };

    let mut principal = match credential {
        None => {
            return Err(ApiError::unauthorized(
                "unauthenticated",
                "missing credentials: send `Authorization: Bearer <login token or API key>`",
            ));
        }
        Some(Credential::TooLong(field)) => {
            return Err(ApiError::bad_request(
                "field_too_long",
                format!("{field}: must be at most {MAX_CREDENTIAL_BYTES} bytes"),
            ));
        }
        Some(Credential::ApiKey(key)) => {
            let found = state.registry.api_key_by_digest(&digest(&key)).await?;
            let Some(found) = found else {
                return Err(refuse(
                    "api_key",
                    ApiError::unauthorized("invalid_api_key", "unknown API key"),
                    None,
                    "anonymous".into(),
                ));
            };
            let actor = format!("key:{}", found.key.id);
            if found.key.revoked_at.is_some() {
                return Err(refuse(
                    "api_key",
                    ApiError::unauthorized("api_key_revoked", "this API key has been revoked"),
                    Some(found.key.tenant),
                    actor,
                ));
            }
            if found.key.expires_at.is_some_and(|at| at <= Utc::now()) {
                return Err(refuse(
                    "api_key",
                    ApiError::unauthorized("api_key_expired", "this API key has expired"),
                    Some(found.key.tenant),
                    actor,
                ));
            }
            if found.tenant_disabled {
                return Err(refuse(
                    "api_key",
                    ApiError::forbidden("tenant is disabled"),
                    Some(found.key.tenant),
                    actor,
                ));
            }
            Principal {
                tenant: found.key.tenant,
                role: found.key.role,
                platform_admin: false,
                subject: Subject::ApiKey {
                    id: found.key.id,
                    name: found.key.name,
                },
                source_ip: source_ip.clone(),
                state: state.clone(),
            }
        }
        Some(Credential::Jwt(token)) => {
            let claims = match state.jwt.verify(&token) {
                Ok(claims) => claims,
                Err(TokenError::Expired) => {
                    return Err(refuse(
                        "token",
                        ApiError::unauthorized("token_expired", "login token expired; log in again"),
                        None,
                        "anonymous".into(),
                    ));
                }
                Err(TokenError::Invalid(why)) => {
                    return Err(refuse(
                        "token",
                        ApiError::unauthorized("invalid_token", format!("login token refused: {why}")),
                        None,
                        "anonymous".into(),
                    ));
                }
            };
            let found = state.registry.user_by_id(&claims.sub).await?;
            let actor = format!("user:{}", claims.usr);
            let (user, tenant_disabled) = match found {
                Some((user, tenant_disabled)) if !user.disabled => (user, tenant_disabled),
                _ => {
                    return Err(refuse(
                        "token",
                        ApiError::unauthorized("invalid_token", "this user no longer exists or is disabled"),
                        None,
                        actor,
                    ));
                }
            };
            // The user row is read on every request anyway (roles take effect at once), so this
            // check costs nothing more.
            if claims.generation != user.token_generation {
                return Err(refuse(
                    "token",
                    ApiError::unauthorized(
                        "token_revoked",
                        "this login ended when the password was changed; log in again",
                    ),
                    Some(user.tenant),
                    actor,
                ));
            }
            if tenant_disabled {
                return Err(refuse(
                    "token",
                    ApiError::forbidden("tenant is disabled"),
                    Some(user.tenant),
                    actor,
                ));
            }
            Principal {
                tenant: user.tenant,
                role: user.role,
                platform_admin: user.platform_admin,
                subject: Subject::User {
                    id: user.id,
                    username: user.username,
                },
                source_ip: source_ip.clone(),
                state: state.clone(),
            }
        }
    };

    if let Some(requested) = tenant_override.filter(|t| !t.is_empty()) {
        if !principal.platform_admin {
            principal.deny(
                "tenant.switch",
                format!("only platform admins may use {TENANT_HEADER} (or ?tenant= on /ws)"),
            )?;
        }
        let tenant = TenantId::parse(requested).map_err(ApiError::invalid_id)?;
        if state.registry.get_tenant(&tenant).await?.is_none() {
            return Err(ApiError::not_found(format!("tenant {tenant} not found")));
        }
        principal.tenant = tenant;
    }
    Ok(principal)
}
