//! Logins, users and API keys.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use drover_actors::Role;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::auth::jwt::TokenSubject;
use crate::auth::secrets::{self, API_KEY_PREFIX};
use crate::auth::throttle::Locked;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::{Principal, Subject};
use crate::state::AppState;
use crate::storage::records::{
    ApiKey, AuditActor, AuditEvent, AuditOutcome, NewApiKey, NewUser, User, UserPatch,
};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(login)
        .service(me)
        .service(list_users)
        .service(create_user)
        .service(get_user)
        .service(patch_user)
        .service(delete_user)
        .service(list_keys)
        .service(create_key)
        .service(revoke_key);
}

// ---- views ---------------------------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub tenant: String,
    #[schema(value_type = String, example = "operator")]
    pub role: Role,
    pub platform_admin: bool,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        UserView {
            id: u.id,
            username: u.username,
            tenant: u.tenant.into_string(),
            role: u.role,
            platform_admin: u.platform_admin,
            disabled: u.disabled,
            created_at: u.created_at,
            updated_at: u.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[schema(example = "admin")]
    pub username: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
    pub user: UserView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub tenant: String,
    #[schema(value_type = String)]
    pub role: Role,
    pub platform_admin: bool,
    /// `user` or `api_key`.
    pub kind: String,
    pub id: String,
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateUser {
    /// 3–64 of letters, digits, `.`, `_`, `@`, `-`; unique on the platform.
    pub username: String,
    /// At least 8 characters.
    pub password: String,
    #[schema(value_type = String, example = "viewer")]
    pub role: Role,
    /// Only platform admins may create platform admins.
    #[serde(default)]
    pub platform_admin: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchUser {
    #[schema(value_type = Option<String>)]
    pub role: Option<Role>,
    pub password: Option<String>,
    /// Needed when users change their own password.
    pub current_password: Option<String>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    #[schema(value_type = String)]
    pub role: Role,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// `active`, `revoked` or `expired`.
    pub status: String,
}

impl From<ApiKey> for ApiKeyView {
    fn from(k: ApiKey) -> Self {
        let status = if k.revoked_at.is_some() {
            "revoked"
        } else if k.expires_at.is_some_and(|at| at <= Utc::now()) {
            "expired"
        } else {
            "active"
        };
        ApiKeyView {
            id: k.id,
            name: k.name,
            role: k.role,
            prefix: k.prefix,
            created_by: k.created_by,
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            status: status.into(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateApiKey {
    #[schema(example = "ingest-service")]
    pub name: String,
    #[schema(value_type = String, example = "operator")]
    pub role: Role,
    /// Days until the key stops working; omitted: no expiry.
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedApiKey {
    pub api_key: ApiKeyView,
    /// The key itself. Shown only here; only its digest is stored.
    pub key: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
}

// ---- rules -----------------------------------------------------------------------------------

/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 64;
/// Longest password, in characters (argon2 hashes whatever it is given: a megabyte password
/// costs CPU on every login attempt).
pub const MAX_PASSWORD_CHARS: usize = 256;
/// Longest API key name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// 400 `field_too_long` naming the field, checked before anything else reads the value.
pub fn check_length(field: &str, value: &str, max_chars: usize) -> Result<(), ApiError> {
    // Bytes first: a value longer in bytes than 4 × max cannot fit, without counting its chars.
    if value.len() > max_chars * 4 || value.chars().count() > max_chars {
        return Err(ApiError::bad_request(
            "field_too_long",
            format!("{field}: must be at most {max_chars} characters"),
        ));
    }
    Ok(())
}

pub fn check_username(username: &str) -> Result<(), ApiError> {
    check_length("username", username, MAX_USERNAME_CHARS)?;
    let len = username.chars().count();
    if !(3..=MAX_USERNAME_CHARS).contains(&len) {
        return Err(ApiError::invalid("username", "must be 3 to 64 characters"));
    }
    if let Some(c) = username
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-')))
    {
        return Err(ApiError::invalid(
            "username",
            format!("contains {c:?}; allowed are letters, digits and . _ @ -"),
        ));
    }
    Ok(())
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    check_length(field, name, MAX_NAME_CHARS)?;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "must be 1 to 128 printable characters"));
    }
    Ok(())
}

/// Hashes on the blocking pool: argon2 is deliberately slow.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    check_length("password", &password, MAX_PASSWORD_CHARS)?;
    secrets::check_password_strength(&password).map_err(|m| ApiError::invalid("password", m))?;
    web::block(move || secrets::hash_password(&password))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn verify_password(password: String, hash: String) -> bool {
    web::block(move || secrets::verify_password(&password, &hash))
        .await
        .unwrap_or(false)
}

/// A hash to check unknown usernames against, so a login takes as long whether or not the
/// username exists.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| secrets::hash_password(&secrets::new_password()).unwrap_or_default())
}

// ---- login -----------------------------------------------------------------------------------

/// Log in with a username and password; returns a bearer token.
#[utoipa::path(
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, body = LoginResponse),
        (status = 400, description = "A field is too long (`field_too_long`)", body = ErrorBody),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
        (status = 403, description = "Account or tenant disabled", body = ErrorBody),
        (status = 429, description = "Too many failed attempts for this username from this address, or from this address", body = ErrorBody),
    )
)]
#[post("/auth/login")]
async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<web::Json<LoginResponse>, ApiError> {
    let LoginRequest { username, password } = body.into_inner();
    check_length("username", &username, MAX_USERNAME_CHARS)?;
    check_length("password", &password, MAX_PASSWORD_CHARS)?;
    // The peer address: no proxy header is trusted, so a client cannot pick its own source.
    let source = req
        .peer_addr()
        .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |a| a.ip());
    let source_ip = Some(source.to_string());
    if let Err(locked) = state.login_throttle.check(&username, source) {
        let wait = locked.retry_after().as_secs().max(1);
        let what = match locked {
            Locked::Username { .. } => "for this username from this address",
            Locked::Source { .. } => "from this address",
        };
        let mut error = ApiError::new(
            actix_web::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            format!("too many failed logins {what}; try again in {wait} s"),
        );
        error.retry_after = Some(wait);
        return Err(error);
    }
    let found = state.registry.user_credentials(&username).await?;
    let hash = found
        .as_ref()
        .map_or_else(|| decoy_hash().to_string(), |c| c.password_hash.clone());
    let matches = verify_password(password, hash).await && found.is_some();
    let Some(credentials) = found.filter(|_| matches) else {
        state.login_throttle.failed(&username, source);
        state.metrics.auth_failures.with_label_values(&["login"]).inc();
        state.audit.submit(AuditEvent {
            actor: AuditActor {
                tenant: None,
                actor: format!("user:{username}"),
                source_ip,
            },
            action: "auth.login".into(),
            target: None,
            outcome: AuditOutcome::Denied,
            detail: Some(serde_json::json!({ "reason": "invalid_credentials" })),
        });
        return Err(ApiError::unauthorized(
            "invalid_credentials",
            "wrong username or password",
        ));
    };
    state.login_throttle.succeeded(&username, source);
    let user = credentials.user;
    if user.disabled || credentials.tenant_disabled {
        let what = if user.disabled {
            "this account"
        } else {
            "this account's tenant"
        };
        return Err(ApiError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "account_disabled",
            format!("{what} is disabled"),
        ));
    }
    let (token, expires_at) = state
        .jwt
        .issue(TokenSubject {
            user_id: &user.id,
            username: &user.username,
            tenant: user.tenant.as_str(),
            role: user.role,
            platform_admin: user.platform_admin,
            generation: user.token_generation,
        })
        .map_err(|e| ApiError::internal(e.to_string()))?;
    state.audit.submit(AuditEvent {
        actor: AuditActor {
            tenant: Some(user.tenant.clone()),
            actor: format!("user:{}", user.username),
            source_ip,
        },
        action: "auth.login".into(),
        target: None,
        outcome: AuditOutcome::Ok,
        detail: None,
    });
    Ok(web::Json(LoginResponse {
        token,
        token_type: "Bearer".into(),
        expires_at,
        user: user.into(),
    }))
}

/// Who the credentials belong to.
#[utoipa::path(tag = "auth", responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
#[get("/auth/me")]
async fn me(principal: Principal) -> web::Json<WhoAmI> {
    let (kind, id, name) = match &principal.subject {
        Subject::User { id, username } => ("user", id.clone(), username.clone()),
        Subject::ApiKey { id, name } => ("api_key", id.clone(), name.clone()),
    };
    web::Json(WhoAmI {
        tenant: principal.tenant.to_string(),
        role: principal.role,
        platform_admin: principal.platform_admin,
        kind: kind.into(),
        id,
        name,
    })
}

// ---- users -----------------------------------------------------------------------------------

/// The tenant's users.
#[utoipa::path(tag = "users", responses((status = 200, body = UserList), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
#[get("/users")]
async fn list_users(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<UserList>, ApiError> {
    principal.require(Role::Admin, "user.list")?;
    let users = state.registry.list_users(&principal.tenant).await?;
    Ok(web::Json(UserList {
        users: users.into_iter().map(Into::into).collect(),
    }))
}

/// Create a user in the tenant.
#[utoipa::path(
    tag = "users",
    request_body = CreateUser,
    responses((status = 201, body = UserView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/users")]
async fn create_user(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<CreateUser>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "user.create")?;
    let body = body.into_inner();
    check_username(&body.username)?;
    if body.platform_admin {
        principal.require_platform_admin("user.create_platform_admin")?;
    }
    let password_hash = hash_password(body.password).await?;
    let new = NewUser {
        tenant: principal.tenant.clone(),
        username: body.username,
        password_hash,
        role: body.role,
        platform_admin: body.platform_admin,
    };
    let user = state.registry.create_user(new, principal.audit_actor()).await?;
    Ok(HttpResponse::Created().json(UserView::from(user)))
}

/// The caller's username when the caller is the user `id`.
fn own_username<'a>(principal: &'a Principal, id: &str) -> Option<&'a str> {
    match &principal.subject {
        Subject::User { id: own, username } if own == id => Some(username),
        _ => None,
    }
}

/// One user (admins: any in the tenant; everyone: themselves).
#[utoipa::path(
    tag = "users",
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, body = UserView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/users/{id}")]
async fn get_user(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<UserView>, ApiError> {
    if own_username(&principal, &id).is_none() {
        principal.require(Role::Admin, "user.read")?;
    }
    let user = state
        .registry
        .get_user(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("user not found"))?;
    Ok(web::Json(user.into()))
}

/// Change a user's role, password or disabled flag. Users may change their own password
/// (giving `currentPassword`); everything else needs an admin.
#[utoipa::path(
    tag = "users",
    params(("id" = String, Path, description = "User id")),
    request_body = PatchUser,
    responses((status = 200, body = UserView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[patch("/users/{id}")]
async fn patch_user(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<PatchUser>,
) -> Result<web::Json<UserView>, ApiError> {
    let id = id.into_inner();
    let body = body.into_inner();
    let own = own_username(&principal, &id);
    if !(own.is_some() && body.role.is_none() && body.disabled.is_none()) {
        principal.require(Role::Admin, "user.update")?;
    }
    if let (Some(username), Some(_)) = (own, &body.password) {
        let current = body
            .current_password
            .clone()
            .ok_or_else(|| ApiError::invalid("currentPassword", "needed to change your own password"))?;
        check_length("currentPassword", &current, MAX_PASSWORD_CHARS)?;
        let stored = state
            .registry
            .user_credentials(username)
            .await?
            .ok_or_else(|| ApiError::not_found("user not found"))?;
        if !verify_password(current, stored.password_hash).await {
            return Err(ApiError::forbidden("currentPassword is wrong"));
        }
    }
    let password_hash = match body.password {
        Some(p) => Some(hash_password(p).await?),
        None => None,
    };
    let patch = UserPatch {
        role: body.role,
        password_hash,
        disabled: body.disabled,
    };
    let user = state
        .registry
        .update_user(principal.tenant.clone(), id, patch, principal.audit_actor())
        .await?;
    Ok(web::Json(user.into()))
}

/// Delete a user. The tenant's last active admin cannot be deleted.
#[utoipa::path(
    tag = "users",
    params(("id" = String, Path, description = "User id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/users/{id}")]
async fn delete_user(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "user.delete")?;
    state
        .registry
        .delete_user(principal.tenant.clone(), id.into_inner(), principal.audit_actor())
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

// ---- API keys --------------------------------------------------------------------------------

/// The tenant's API keys (never the keys themselves).
#[utoipa::path(tag = "keys", responses((status = 200, body = ApiKeyList), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
#[get("/keys")]
async fn list_keys(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<ApiKeyList>, ApiError> {
    principal.require(Role::Admin, "api_key.list")?;
    let keys = state.registry.list_api_keys(&principal.tenant).await?;
    Ok(web::Json(ApiKeyList {
        api_keys: keys.into_iter().map(Into::into).collect(),
    }))
}

/// Create an API key for an application; the key is shown once.
#[utoipa::path(
    tag = "keys",
    request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/keys")]
async fn create_key(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<CreateApiKey>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Admin, "api_key.create")?;
    let body = body.into_inner();
    check_name("name", &body.name)?;
    if !principal.role.allows(body.role) {
        return Err(ApiError::forbidden(
            "a key cannot have a higher role than its creator",
        ));
    }
    let expires_at = match body.expires_in_days {
        Some(0) => return Err(ApiError::invalid("expiresInDays", "must be at least 1")),
        Some(days) if days > 3650 => return Err(ApiError::invalid("expiresInDays", "must be at most 3650")),
        Some(days) => Some(Utc::now() + Duration::from_secs(u64::from(days) * 86_400)),
        None => None,
    };
    let key = secrets::new_secret(API_KEY_PREFIX);
    let new = NewApiKey {
        tenant: principal.tenant.clone(),
        name: body.name,
        role: body.role,
        digest: secrets::digest(&key),
        prefix: secrets::display_prefix(&key),
        created_by: principal.actor(),
        expires_at,
    };
    let api_key = state
        .registry
        .create_api_key(new, principal.audit_actor())
        .await?;
    Ok(HttpResponse::Created().json(CreatedApiKey {
        api_key: api_key.into(),
        key,
    }))
}

/// Revoke an API key; it stops working at once.
#[utoipa::path(
    tag = "keys",
    params(("id" = String, Path, description = "API key id")),
    responses((status = 200, body = ApiKeyView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/keys/{id}")]
async fn revoke_key(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<ApiKeyView>, ApiError> {
    principal.require(Role::Admin, "api_key.revoke")?;
    let key = state
        .registry
        .revoke_api_key(principal.tenant.clone(), id.into_inner(), principal.audit_actor())
        .await?;
    // Connections opened with the key end now.
    state.mqtt.broker.kick(
        &crate::mqtt::broker::Kick::ApiKey {
            key_id: key.id.clone(),
        },
        crate::mqtt::broker::reason::NOT_AUTHORIZED,
        "API key revoked",
    );
    Ok(web::Json(key.into()))
}
