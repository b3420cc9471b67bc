//! API errors: `{"error": {"code": "...", "message": "..."}}` with the right status.
//!
//! Every failure that reaches a client goes through [`ApiError`]; the one `ResponseError` impl
//! maps it to a status and body. Extractor failures (bad JSON, bad query, bad path) are mapped
//! here too, so clients get the same shape and a specific code for each.

use std::fmt;

use actix_web::dev::ServiceResponse;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use drover_actors::IdError;
use drover_actors::telemetry::PayloadError;
use drover_actors::telemetry::store::TelemetryStoreError;
use serde::Serialize;

use crate::storage::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

/// The error body, for the OpenAPI description.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code such as `invalid_json`, `not_found`, `forbidden`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// A validation failure of one field.
    pub fn invalid(field: &str, message: impl fmt::Display) -> Self {
        Self::bad_request("validation_failed", format!("{field}: {message}"))
    }

    /// An identifier that does not follow the rules, with a code naming which kind.
    pub fn invalid_id(error: IdError) -> Self {
        let code = match error.what() {
            "deviceId" => "invalid_device_id",
            "tenant id" => "invalid_tenant_id",
            "group name" => "invalid_group_name",
            _ => "validation_failed",
        };
        Self::bad_request(code, error.to_string())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"drover\""),
            ));
        }
        response.json(ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            StoreError::AlreadyExists(message) => ApiError::conflict("already_exists", message),
            StoreError::Conflict(message) => ApiError::conflict("conflict", message),
            StoreError::LimitReached(message) => ApiError::conflict("limit_reached", message),
            StoreError::Invalid(message) => ApiError::bad_request("validation_failed", message),
            StoreError::Unavailable(message) => {
                tracing::warn!(%message, "registry unavailable");
                ApiError::unavailable("the registry database is unavailable; retry later", 5)
            }
            StoreError::Internal(message) => {
                tracing::error!(%message, "registry error");
                ApiError::internal("internal error")
            }
        }
    }
}

impl From<TelemetryStoreError> for ApiError {
    fn from(error: TelemetryStoreError) -> Self {
        match error {
            TelemetryStoreError::Unavailable(message) => {
                tracing::warn!(%message, "telemetry store unavailable");
                ApiError::unavailable("the telemetry store is unavailable; retry later", 5)
            }
            TelemetryStoreError::Rejected(message) => ApiError::bad_request("rejected_by_store", message),
            TelemetryStoreError::TooManyPoints { limit } => ApiError::bad_request(
                "too_many_points",
                format!("more than {limit} points; aggregate with agg and every, or narrow the range"),
            ),
            TelemetryStoreError::Overflow(overflow) => {
                ApiError::bad_request("aggregate_overflow", overflow.to_string())
            }
            TelemetryStoreError::Internal(message) => {
                tracing::error!(%message, "telemetry store error");
                ApiError::internal("internal error")
            }
        }
    }
}

/// A refused device payload: 400 with the payload error's own code (`invalid_metric_name`,
/// `timestamp_out_of_range`, …).
impl From<PayloadError> for ApiError {
    fn from(error: PayloadError) -> Self {
        ApiError::bad_request(error.code(), error.to_string())
    }
}

/// Maps a JSON body that could not be read to a specific error.
pub fn json_error(error: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api = match &error {
        JsonPayloadError::OverflowKnownLength { length, limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is {length} bytes; the limit is {limit}"),
        ),
        JsonPayloadError::Overflow { limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
        ),
        JsonPayloadError::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a JSON body (Content-Type: application/json)",
        ),
        JsonPayloadError::Deserialize(e) => classify_json(e),
        JsonPayloadError::Serialize(e) => ApiError::internal(e.to_string()),
        other => ApiError::bad_request("invalid_body", other.to_string()),
    };
    api.into()
}

/// Tells malformed JSON from well-formed JSON of the wrong shape.
pub fn classify_json(error: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let message = error.to_string();
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request("invalid_json", format!("malformed JSON: {message}"))
        }
        Category::Data if message.starts_with("missing field") => {
            ApiError::bad_request("missing_field", message)
        }
        Category::Data if message.starts_with("unknown field") => {
            ApiError::bad_request("unknown_field", message)
        }
        Category::Data if message.starts_with("invalid type") => {
            ApiError::bad_request("invalid_type", message)
        }
        Category::Data if message.starts_with("invalid value") || message.starts_with("unknown variant") => {
            ApiError::bad_request("invalid_value", message)
        }
        // serde accepts a struct as a JSON array of its fields; an array body is a type error here.
        Category::Data if message.starts_with("invalid length") && message.contains("expected struct") => {
            ApiError::bad_request(
                "invalid_type",
                "the request body must be a JSON object, not an array",
            )
        }
        Category::Data => ApiError::bad_request("validation_failed", message),
    }
}

/// The code of an error response that did not come from an [`ApiError`], by its status.
fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "invalid_body",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    }
}

/// Gives every error response the API's JSON shape, whatever produced it. Extractors without
/// an error hook (`web::Bytes` and `web::Payload` over their limit answer a plain-text 413),
/// actix's own method and routing refusals and any other error that is not an [`ApiError`]
/// pass through here; answers already in JSON are left as they are.
pub fn json_error_response<B>(res: ServiceResponse<B>) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let limit = res
        .request()
        .app_data::<actix_web::web::Data<crate::state::AppState>>()
        .map(|state| state.config.http.max_body_bytes);
    let message = match (res.response().error(), limit) {
        (Some(error), Some(limit)) if status == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::debug!(%error, "request body over the limit");
            format!("request body exceeds the limit of {limit} bytes")
        }
        (Some(error), _) => error.to_string(),
        (None, _) => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let api = ApiError::new(status, code_for_status(status), message);
    let (req, original) = res.into_parts();
    let mut response = api.error_response();
    // Keep what the original answer told (`Allow`, `Retry-After`…), not its body's type.
    for (name, value) in original.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, response).map_into_right_body(),
    ))
}

pub fn query_error(error: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request("invalid_query", error.to_string()).into()
}

pub fn path_error(error: PathError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request("invalid_path", error.to_string()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    fn code_of(text: &str) -> &'static str {
        classify_json(&serde_json::from_str::<Body>(text).unwrap_err()).code
    }

    #[test]
    fn json_errors_are_classified() {
        assert_eq!(code_of("{\"name\": "), "invalid_json");
        assert_eq!(code_of("{name: 1}"), "invalid_json");
        assert_eq!(code_of("{\"name\": \"a\"}"), "missing_field");
        assert_eq!(code_of("{\"name\": \"a\", \"count\": \"x\"}"), "invalid_type");
        assert_eq!(code_of("{\"name\": \"a\", \"count\": -1}"), "invalid_value");
        assert_eq!(code_of("[\"a\"]"), "invalid_type");
    }
}
