//! Telemetry ingestion over HTTP and WebSocket: `POST /api/devices/{id}/telemetry` and
//! `GET /ws/devices/{id}` (upgraded to a WebSocket).
//!
//! Both go through the device's actor, like MQTT: it validates the payload (DESIGN.md §4, one
//! message or a batch) and hands the points to the batching writers. The HTTP answer, and the
//! WebSocket reply to a frame, come only once the points are committed to the store (or to the
//! spool while the store is unreachable). When the writers are full the answer is 503 with
//! `Retry-After` (a `busy` reply on a WebSocket): HTTP senders are refused, never queued.
//!
//! The device authenticates with its token (`Authorization: Bearer dvt_…`, `X-Device-Token`,
//! or `?token=` where a client cannot set headers, as browsers opening a WebSocket); an
//! application may also send on a device's behalf with an API key or login token of the
//! device's tenant and at least the operator role.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, get, post, web};
use chrono::Utc;
use drover_actors::device_actor::{
    DeviceConnected, DeviceDisconnected, DeviceInbound, InboundError, InboundKind,
};
use drover_actors::telemetry_writer::Backpressure;
use drover_actors::{DeviceActor, DeviceId, Role, TenantId};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::auth::secrets::{DEVICE_TOKEN_PREFIX, digest};
use crate::http::devices::device_id;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::{CREDENTIAL_RECHECK, Principal};
use crate::state::AppState;

/// Seconds a refused sender is told to wait when the writers are full.
const BUSY_RETRY_AFTER_SECS: u64 = 1;
/// Seconds a sender is told to wait when the device actor or the store is unavailable.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(ingest_telemetry);
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestAccepted {
    /// Points committed (metrics × messages).
    pub points: usize,
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The device token a request carries, if any.
pub(crate) fn device_token(req: &HttpRequest) -> Option<String> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(token) = header("X-Device-Token") {
        return Some(token.to_string());
    }
    if let Some((scheme, token)) = header("Authorization").and_then(|v| v.split_once(' ')) {
        let token = token.trim();
        if scheme.eq_ignore_ascii_case("bearer") && token.starts_with(DEVICE_TOKEN_PREFIX) {
            return Some(token.to_string());
        }
    }
    web::Query::<TokenQuery>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.into_inner().token)
        .filter(|t| t.starts_with(DEVICE_TOKEN_PREFIX))
}

/// The tenant of the device `device` if the request may send its telemetry: its own token, or
/// a caller of its tenant with the operator role.
async fn sender_tenant(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    device: &DeviceId,
) -> Result<TenantId, ApiError> {
    if let Some(token) = device_token(req) {
        let refuse = |code: &'static str, message: &str| {
            state
                .metrics
                .auth_failures
                .with_label_values(&["device_token"])
                .inc();
            ApiError::unauthorized(code, message)
        };
        let Some(login) = state.registry.device_by_token(&digest(&token)).await? else {
            return Err(refuse("invalid_device_token", "unknown device token"));
        };
        if login.device != *device {
            return Err(refuse(
                "token_of_another_device",
                "this device token belongs to another device",
            ));
        }
        if !login.enabled || login.tenant_disabled {
            return Err(ApiError::forbidden("this device or its tenant is disabled"));
        }
        return Ok(login.tenant);
    }
    // A refused credential keeps its own answer (invalid_api_key, token_expired…); only a
    // request with none is told what a device may send.
    let principal = Principal::extract(req)
        .await
        .map_err(|e| match e.as_error::<ApiError>() {
            Some(refused) if refused.code != "unauthenticated" => refused.clone(),
            _ => ApiError::unauthorized(
                "unauthenticated",
                "missing credentials: send the device token (`Authorization: Bearer dvt_…`, \
             `X-Device-Token` or `?token=`) or an API key or login token of the device's tenant",
            ),
        })?;
    principal.require(Role::Operator, "telemetry.ingest")?;
    Ok(principal.tenant)
}

async fn device_actor(
    state: &web::Data<AppState>,
    tenant: &TenantId,
    device: &DeviceId,
) -> Result<actix::Addr<DeviceActor>, ApiError> {
    state
        .fleet
        .device(tenant, device)
        .await
        .map_err(|e| ApiError::unavailable(format!("device actors: {e}"), UNAVAILABLE_RETRY_AFTER_SECS))?
        .ok_or_else(|| ApiError::not_found(format!("no device `{device}` in this tenant")))
}

/// How an ingestion refusal is told to an HTTP or WebSocket sender.
fn refusal(error: InboundError) -> ApiError {
    match error {
        InboundError::Rejected { code, message } => ApiError::bad_request(code, message),
        InboundError::Busy => ApiError {
            code: "busy",
            ..ApiError::unavailable(
                "the telemetry writers are full; retry shortly",
                BUSY_RETRY_AFTER_SECS,
            )
        },
        InboundError::Unavailable(why) => ApiError::unavailable(why, UNAVAILABLE_RETRY_AFTER_SECS),
    }
}

/// Sends telemetry of one device: a message `{"timestamp"?, "metrics": {…}}` or an array of
/// them. Answered after the points are committed.
#[utoipa::path(
    tag = "telemetry",
    params(("deviceId" = String, Path, description = "The device")),
    request_body(content = Object, description = "A telemetry message or an array of them (DESIGN.md §4)"),
    responses(
        (status = 200, body = IngestAccepted, description = "Committed"),
        (status = 400, body = ErrorBody, description = "Invalid payload, with a specific code"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such device in the caller's tenant"),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody, description = "unsupported_media_type: a body whose Content-Type is not JSON"),
        (status = 503, body = ErrorBody, description = "Writers full or store and spool unavailable; see Retry-After"),
    ),
    security(("bearer" = []))
)]
#[post("/devices/{deviceId}/telemetry")]
pub async fn ingest_telemetry(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<web::Json<IngestAccepted>, ApiError> {
    let device = device_id(&path)?;
    let tenant = sender_tenant(&req, &state, &device).await?;
    let body = read_body(body, state.config.http.max_body_bytes).await?;
    let addr = device_actor(&state, &tenant, &device).await?;
    let points = commit(&addr, body).await?;
    Ok(web::Json(IngestAccepted { points }))
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(mut body: web::Payload, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        if buffer.len() + chunk.len() > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body exceeds {limit} bytes (http.max_body_bytes)"),
            ));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Hands one payload to the device actor (refused at once when its mailbox is full) and
/// waits for the commit.
async fn commit(addr: &actix::Addr<DeviceActor>, payload: bytes::Bytes) -> Result<usize, ApiError> {
    let message = DeviceInbound {
        kind: InboundKind::Telemetry,
        payload,
        at: Utc::now(),
        backpressure: Backpressure::Refuse,
    };
    match addr.send(message).await {
        Ok(Ok(accepted)) => Ok(accepted.points),
        Ok(Err(error)) => Err(refusal(error)),
        Err(error) => Err(ApiError::unavailable(
            format!("device actor: {error}"),
            UNAVAILABLE_RETRY_AFTER_SECS,
        )),
    }
}

/// A reply to one WebSocket frame.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FrameReply<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    points: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

/// `GET /ws/devices/{id}`: a WebSocket on which every text or binary frame is a telemetry
/// payload. Each frame gets one text reply, in order, once its points are committed:
/// `{"ok":true,"points":N}` or `{"ok":false,"code":…,"message":…}` (with `retryAfter` when
/// the writers are full). The device counts as connected while the socket is open.
#[utoipa::path(
    tag = "telemetry",
    params(
        ("deviceId" = String, Path, description = "The device"),
        ("token" = Option<String>, Query, description = "The device token, or an API key or login token with the operator role, when no Authorization header can be sent")
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; every frame is a telemetry payload answered with {\"ok\":true,\"points\":N} or {\"ok\":false,\"code\":…,\"message\":…}"),
        (status = 400, body = ErrorBody, description = "websocket_required: not a WebSocket upgrade"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such device in the caller's tenant"),
    ),
    security(("bearer" = []))
)]
#[get("/ws/devices/{deviceId}")]
pub async fn device_socket(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let device = device_id(&path)?;
    let tenant = sender_tenant(&req, &state, &device).await?;
    let addr = device_actor(&state, &tenant, &device).await?;
    let (response, mut session, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::bad_request("websocket_required", format!("upgrade to a WebSocket: {e}")))?;
    let max_frame = state.config.http.max_body_bytes;
    let mut stream = stream
        .max_frame_size(max_frame)
        .aggregate_continuations()
        .max_continuation_size(max_frame);
    let connection = state.mqtt.broker.next_id();
    addr.do_send(DeviceConnected {
        connection,
        protocol: "websocket",
        at: Utc::now(),
    });
    tracing::debug!(%tenant, %device, "device WebSocket opened");
    actix_web::rt::spawn(async move {
        let idle = Duration::from_secs(120);
        let mut checked = Instant::now();
        let close_reason = loop {
            let next = match tokio::time::timeout(idle, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    // Quiet for long: check the peer is there.
                    if session.ping(b"").await.is_err() {
                        break None;
                    }
                    continue;
                }
            };
            let payload = match next {
                Some(Ok(actix_ws::AggregatedMessage::Text(text))) => text.into_bytes(),
                Some(Ok(actix_ws::AggregatedMessage::Binary(bytes))) => bytes,
                Some(Ok(actix_ws::AggregatedMessage::Ping(bytes))) => {
                    if session.pong(&bytes).await.is_err() {
                        break None;
                    }
                    continue;
                }
                Some(Ok(actix_ws::AggregatedMessage::Pong(_))) => continue,
                Some(Ok(actix_ws::AggregatedMessage::Close(reason))) => break reason,
                Some(Err(error)) => {
                    tracing::debug!(%device, %error, "device WebSocket protocol error");
                    break Some(actix_ws::CloseReason {
                        code: actix_ws::CloseCode::Protocol,
                        description: Some(error.to_string()),
                    });
                }
                None => break None,
            };
            // A socket outlives its credential by CREDENTIAL_RECHECK at most: a revoked token or
            // key, a disabled device or a changed password ends it as REST calls start failing.
            if checked.elapsed() >= CREDENTIAL_RECHECK {
                match sender_tenant(&req, &state, &device).await {
                    Ok(current) if current == tenant => checked = Instant::now(),
                    // The registry did not answer: an outage should not drop every socket.
                    Err(error) if error.status.is_server_error() => {}
                    _ => {
                        break Some(actix_ws::CloseReason {
                            code: actix_ws::CloseCode::Policy,
                            description: Some("credential revoked".into()),
                        });
                    }
                }
            }
            let reply = match commit(&addr, payload).await {
                Ok(points) => FrameReply {
                    ok: true,
                    points: Some(points),
                    code: None,
                    message: None,
                    retry_after: None,
                },
                Err(error) => FrameReply {
                    ok: false,
                    points: None,
                    code: Some(error.code),
                    message: Some(error.message.clone()),
                    retry_after: error.retry_after,
                },
            };
            let text = serde_json::to_string(&reply).unwrap_or_default();
            if session.text(text).await.is_err() {
                break None;
            }
        };
        let _ = session.close(close_reason).await;
        addr.do_send(DeviceDisconnected {
            connection,
            at: Utc::now(),
        });
        tracing::debug!(%device, "device WebSocket closed");
    });
    Ok(response)
}
