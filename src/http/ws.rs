//! `/ws`: the live dashboard stream over WebSocket. The caller authenticates like any API call
//! (`Authorization: Bearer …`, or `?token=…` since browsers cannot set headers on WebSockets)
//! and receives its tenant's live events as JSON text frames. A platform admin may name the
//! tenant to watch with `X-Tenant-Id` or, from a browser, `?tenant=…` (anyone else is refused).
//! Each connection is a [`DashboardSession`] actor.

use actix::Actor;
use actix_web::body::{BodyStream, BoxBody};
use actix_web::{HttpRequest, HttpResponse, get, web};

use crate::dashboard::session::{DashboardSession, SessionSpec};
use crate::http::error::ApiError;
use crate::http::principal::{CredentialCheck, Principal};
use crate::state::AppState;

/// Upgrades to a WebSocket carrying the tenant's live events.
#[utoipa::path(
    tag = "alerts",
    params(
        ("token" = Option<String>, Query, description = "Login token or API key, when no Authorization header can be sent"),
        ("tenant" = Option<String>, Query, description = "Platform admins: the tenant to watch (as the X-Tenant-Id header); refused (403) for anyone else"),
    ),
    responses((status = 101, description = "Switching to the WebSocket protocol; the first frame is {\"type\":\"hello\",\"tenant\":…}, then alarm changes and subscribed telemetry; closed with 1008 `credential revoked` once the credential no longer authenticates (checked every 10 s and before each request)"), (status = 401, body = crate::http::error::ErrorBody), (status = 403, body = crate::http::error::ErrorBody)),
    security(("bearer" = []))
)]
#[get("/ws")]
pub async fn live(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // actix-ws answers the handshake and reads the client's frames; what the session writes
    // goes through a body of its own, which writes every pending frame at once.
    let (response, _, stream) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::bad_request("not_a_websocket", e.to_string()))?;
    let (session, socket_body) = DashboardSession::new(SessionSpec {
        tenant: principal.tenant.clone(),
        principal: principal.actor(),
        stream,
        hub: state.hub.clone(),
        registry: state.registry.clone(),
        credential: CredentialCheck::of(&req, state.clone()),
    });
    session.start();
    Ok(response.map_body(|_, _| BoxBody::new(BodyStream::new(socket_body))))
}
