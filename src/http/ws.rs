//! `/ws`: the live dashboard stream over WebSocket. The caller authenticates like any API call
//! (`Authorization: Bearer …`, or `?token=…` since browsers cannot set headers on WebSockets)
//! and receives its tenant's live events as JSON text frames.

use actix_web::{HttpRequest, HttpResponse, get, web};

use crate::dashboard::session::DashboardSession;
use crate::http::error::ApiError;
use crate::http::principal::{CredentialCheck, Principal};
use crate::state::AppState;

/// Upgrades to a WebSocket carrying the tenant's live events.
#[utoipa::path(
    tag = "alerts",
    params(("token" = Option<String>, Query, description = "Login token or API key, when no Authorization header can be sent")),
    responses((status = 101, description = "Switching to the WebSocket protocol; the first frame is {\"type\":\"hello\",\"tenant\":…}, then alarm changes and subscribed telemetry; closed with 1008 `credential revoked` once the credential no longer authenticates (checked every 10 s and before each request)"), (status = 401, body = crate::http::error::ErrorBody)),
    security(("bearer" = []))
)]
#[get("/ws")]
pub async fn live(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (response, session, stream) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request("not_a_websocket", e.to_string()))?;
    let dashboard = DashboardSession {
        tenant: principal.tenant.clone(),
        session,
        hub: state.hub.clone(),
        registry: state.registry.clone(),
        credential: CredentialCheck::of(&req, state.clone()),
    };
    actix_rt::spawn(dashboard.run(stream));
    Ok(response)
}
