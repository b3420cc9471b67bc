//! Parsing of request parts shared by several endpoints: query parameters and the body's
//! content type.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use crate::http::error::ApiError;

/// Default and largest page sizes of list endpoints.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// A point in time given as RFC 3339 (`2024-01-31T12:00:00Z`), a date (`2024-01-31`, midnight
/// UTC) or a Unix timestamp in seconds (10 digits or fewer) or milliseconds (more).
pub fn parse_time(value: &str) -> Result<DateTime<Utc>, String> {
    let value = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight exists")));
    }
    if let Ok(n) = value.parse::<i64>() {
        let digits = value.trim_start_matches('-').len();
        let parsed = if digits <= 10 {
            Utc.timestamp_opt(n, 0).single()
        } else {
            Utc.timestamp_millis_opt(n).single()
        };
        return parsed.ok_or_else(|| format!("{value} is out of range"));
    }
    Err(format!(
        "{value:?} is not a time: use RFC 3339 (2024-01-31T12:00:00Z), a date (2024-01-31) or epoch seconds/milliseconds"
    ))
}

/// Refuses (415) a request body that says it is not JSON: every body of the API is JSON, and
/// a form, XML or multipart body read as JSON would only fail later with a misleading
/// `invalid_json`. A body without `Content-Type` is taken as JSON (devices with minimal HTTP
/// stacks often send none); `application/json` and any `+json` type are accepted. Requests
/// without a body (GET, WebSocket upgrades, POSTs that take none) are not checked.
pub fn refuse_non_json_body(req: &actix_web::HttpRequest) -> Result<(), ApiError> {
    use actix_web::HttpMessage;
    use actix_web::http::header;
    use actix_web::mime::JSON;
    let headers = req.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|length| length > 0);
    if !has_body || takes_binary_body(req) {
        return Ok(());
    }
    match req.mime_type() {
        Ok(None) => Ok(()),
        Ok(Some(mime)) if mime.subtype() == JSON || mime.suffix() == Some(JSON) => Ok(()),
        _ => Err(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON: send it with Content-Type: application/json",
        )),
    }
}

/// Endpoints whose body is not JSON: a firmware upload is the raw image or a multipart form.
fn takes_binary_body(req: &actix_web::HttpRequest) -> bool {
    req.method() == actix_web::http::Method::POST && req.path().trim_end_matches('/') == "/api/firmware"
}

/// A time query parameter, or a 400 naming the parameter.
pub fn time_param(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    parse_time(value).map_err(|m| ApiError::bad_request("invalid_query", format!("{name}: {m}")))
}

/// `limit`, defaulting to [`DEFAULT_LIMIT`] and at most [`MAX_LIMIT`].
pub fn limit_param(value: Option<&str>) -> Result<u32, ApiError> {
    match value {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                "invalid_query",
                format!("limit: expected a number from 1 to {MAX_LIMIT}, got {v:?}"),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_time_forms() {
        let expected = Utc.with_ymd_and_hms(2024, 1, 31, 0, 0, 0).unwrap();
        assert_eq!(parse_time("2024-01-31").unwrap(), expected);
        assert_eq!(parse_time("2024-01-31T00:00:00Z").unwrap(), expected);
        assert_eq!(parse_time("2024-01-31T01:00:00+01:00").unwrap(), expected);
        assert_eq!(parse_time("1706659200").unwrap(), expected);
        assert_eq!(parse_time("1706659200000").unwrap(), expected);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2024-13-01").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(limit_param(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit_param(Some("5")).unwrap(), 5);
        assert!(limit_param(Some("0")).is_err());
        assert!(limit_param(Some("5000")).is_err());
        assert!(limit_param(Some("ten")).is_err());
    }
}
