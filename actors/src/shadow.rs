//! Device shadows with AWS IoT Device Shadow semantics, as pure functions (no I/O).
//!
//! A shadow holds what the cloud wants a device to be (`desired`) and what the device says it
//! is (`reported`); their difference is the `delta`. Every leaf carries the time it was last
//! written in `metadata`, and every accepted update increments `version`, which a writer may
//! name to make its update conditional. The device actor owns one [`ShadowDocument`] and calls
//! [`parse_update`] and [`apply_update`]; the payloads it publishes (accepted, delta, documents,
//! rejected) are built here so MQTT and HTTP answer the same thing.
//!
//! Merge rules: objects merge key by key, recursively; any other value (arrays included)
//! replaces what was there; `null` deletes a key; `"desired": null` (or `"reported": null`)
//! clears the whole section. Objects left empty are removed, so a section never holds `{}`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Limits on shadow requests and documents (AWS's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowLimits {
    /// Serialized size of `desired` and of `reported`, each, after an update.
    pub max_state_bytes: usize,
    /// Nesting levels of `desired` or `reported` (`{"a": 1}` is one level).
    pub max_depth: usize,
    /// Size of an update or get request as sent.
    pub max_request_bytes: usize,
    pub max_client_token_bytes: usize,
}

impl Default for ShadowLimits {
    fn default() -> Self {
        ShadowLimits {
            max_state_bytes: 8192,
            max_depth: 6,
            max_request_bytes: 32768,
            max_client_token_bytes: 64,
        }
    }
}

/// Why a shadow request was refused. Each variant has a stable code and an HTTP status, which
/// the rejected topics and the API both report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    #[error("malformed JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown field {0:?}: an update has only state, version and clientToken")]
    UnknownField(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("version must be a non-negative integer")]
    InvalidVersion,
    #[error("clientToken must be a string of at most {max} bytes")]
    InvalidClientToken { max: usize },
    #[error("{section} is nested more than {max} levels deep")]
    TooDeep { section: &'static str, max: usize },
    #[error("request is {size} bytes; the limit is {max}")]
    PayloadTooLarge { size: usize, max: usize },
    #[error("{section} would be {size} bytes; the limit is {max}")]
    StateTooLarge {
        section: &'static str,
        size: usize,
        max: usize,
    },
    #[error("version conflict: the update names version {requested}, the shadow is at version {current}")]
    VersionConflict { requested: u64, current: u64 },
    #[error("this device has no shadow yet")]
    NotFound,
    #[error("shadow storage unavailable: {0}")]
    Unavailable(String),
}

impl ShadowError {
    /// Stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ShadowError::InvalidJson(_) => "invalid_json",
            ShadowError::InvalidRequest(_) => "invalid_request",
            ShadowError::UnknownField(_) => "unknown_field",
            ShadowError::InvalidState(_) => "invalid_state",
            ShadowError::InvalidVersion => "invalid_version",
            ShadowError::InvalidClientToken { .. } => "invalid_client_token",
            ShadowError::TooDeep { .. } => "too_deep",
            ShadowError::PayloadTooLarge { .. } => "payload_too_large",
            ShadowError::StateTooLarge { .. } => "state_too_large",
            ShadowError::VersionConflict { .. } => "version_conflict",
            ShadowError::NotFound => "not_found",
            ShadowError::Unavailable(_) => "unavailable",
        }
    }

    /// The HTTP status it maps to (also the numeric `code` of a rejected message, as AWS does).
    pub fn status(&self) -> u16 {
        match self {
            ShadowError::PayloadTooLarge { .. } | ShadowError::StateTooLarge { .. } => 413,
            ShadowError::VersionConflict { .. } => 409,
            ShadowError::NotFound => 404,
            ShadowError::Unavailable(_) => 503,
            _ => 400,
        }
    }

    /// The payload of `…/update/rejected` or `…/get/rejected`.
    pub fn rejected(&self, client_token: Option<&str>, now: DateTime<Utc>) -> Value {
        let mut out = json!({
            "code": self.status(),
            "errorCode": self.code(),
            "message": self.to_string(),
            "timestamp": now.timestamp(),
        });
        if let Some(token) = client_token {
            out["clientToken"] = Value::String(token.to_string());
        }
        out
    }
}

/// A device's shadow as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowDocument {
    pub state: ShadowSections,
    /// Same shape as `state`; every leaf is `{"timestamp": <epoch seconds>}`.
    pub metadata: ShadowSections,
    /// 1 after the first update, +1 for every accepted update.
    pub version: u64,
    /// When it was last updated (epoch seconds).
    pub timestamp: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowSections {
    #[serde(default)]
    pub desired: Map<String, Value>,
    #[serde(default)]
    pub reported: Map<String, Value>,
}

impl ShadowDocument {
    /// The delta: what `desired` asks for that `reported` does not say; `None` when in sync.
    pub fn delta(&self) -> Option<Map<String, Value>> {
        let delta = diff(&self.state.desired, &self.state.reported);
        (!delta.is_empty()).then_some(delta)
    }

    /// `{"desired": …, "reported": …}`, as telemetry observers see it.
    pub fn state_view(&self) -> Value {
        json!({
            "desired": Value::Object(self.state.desired.clone()),
            "reported": Value::Object(self.state.reported.clone()),
        })
    }

    /// The whole document as the API and `get/accepted` show it: state with its delta,
    /// metadata, version and timestamp. Empty sections are left out.
    pub fn view(&self) -> Value {
        let mut state = Map::new();
        put_section(&mut state, "desired", &self.state.desired);
        put_section(&mut state, "reported", &self.state.reported);
        if let Some(delta) = self.delta() {
            state.insert("delta".into(), Value::Object(delta));
        }
        let mut metadata = Map::new();
        put_section(&mut metadata, "desired", &self.metadata.desired);
        put_section(&mut metadata, "reported", &self.metadata.reported);
        json!({
            "state": state,
            "metadata": metadata,
            "version": self.version,
            "timestamp": self.timestamp,
        })
    }

    /// `{state, metadata, version}` without the delta, as `documents` carries it.
    fn snapshot(&self) -> Value {
        let mut state = Map::new();
        put_section(&mut state, "desired", &self.state.desired);
        put_section(&mut state, "reported", &self.state.reported);
        let mut metadata = Map::new();
        put_section(&mut metadata, "desired", &self.metadata.desired);
        put_section(&mut metadata, "reported", &self.metadata.reported);
        json!({ "state": state, "metadata": metadata, "version": self.version })
    }
}

fn put_section(into: &mut Map<String, Value>, name: &str, section: &Map<String, Value>) {
    if !section.is_empty() {
        into.insert(name.into(), Value::Object(section.clone()));
    }
}

/// What an update does to one section.
#[derive(Debug, Clone, PartialEq)]
pub enum SectionPatch {
    /// Not in the update.
    Absent,
    /// `null`: the section is cleared.
    Clear,
    /// An object merged into the section.
    Merge(Map<String, Value>),
}

impl SectionPatch {
    fn is_absent(&self) -> bool {
        matches!(self, SectionPatch::Absent)
    }
}

/// A parsed, validated update request.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowUpdate {
    pub desired: SectionPatch,
    pub reported: SectionPatch,
    /// When set, the update applies only to a shadow at exactly this version.
    pub version: Option<u64>,
    pub client_token: Option<String>,
}

/// The client token of a request, best effort (for the rejected reply of a request that
/// could not be parsed as a whole).
pub fn client_token_of(payload: &[u8], limits: &ShadowLimits) -> Option<String> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    match value.get("clientToken")? {
        Value::String(s) if s.len() <= limits.max_client_token_bytes => Some(s.clone()),
        _ => None,
    }
}

fn parse_object(payload: &[u8], limits: &ShadowLimits) -> Result<Map<String, Value>, ShadowError> {
    if payload.len() > limits.max_request_bytes {
        return Err(ShadowError::PayloadTooLarge {
            size: payload.len(),
            max: limits.max_request_bytes,
        });
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| ShadowError::InvalidJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ShadowError::InvalidRequest(
            "the request must be a JSON object".into(),
        )),
    }
}

fn parse_client_token(value: Option<&Value>, limits: &ShadowLimits) -> Result<Option<String>, ShadowError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= limits.max_client_token_bytes => Ok(Some(s.clone())),
        Some(_) => Err(ShadowError::InvalidClientToken {
            max: limits.max_client_token_bytes,
        }),
    }
}

/// Parses and validates an update request (`{"state": {"desired": …, "reported": …},
/// "version": N, "clientToken": "…"}`).
pub fn parse_update(payload: &[u8], limits: &ShadowLimits) -> Result<ShadowUpdate, ShadowError> {
    let mut request = parse_object(payload, limits)?;
    let client_token = parse_client_token(request.get("clientToken"), limits)?;
    if let Some(unknown) = request
        .keys()
        .find(|k| !matches!(k.as_str(), "state" | "version" | "clientToken"))
    {
        return Err(ShadowError::UnknownField(unknown.clone()));
    }
    let version = match request.get("version") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or(ShadowError::InvalidVersion)?),
    };
    let state = match request.remove("state") {
        None => {
            return Err(ShadowError::InvalidRequest(
                "missing required field \"state\"".into(),
            ));
        }
        Some(Value::Object(state)) => state,
        Some(_) => return Err(ShadowError::InvalidState("state must be an object".into())),
    };
    if let Some(unknown) = state
        .keys()
        .find(|k| !matches!(k.as_str(), "desired" | "reported"))
    {
        return Err(ShadowError::InvalidState(format!(
            "state may hold only desired and reported, not {unknown:?}"
        )));
    }
    let section = |name: &'static str| -> Result<SectionPatch, ShadowError> {
        match state.get(name) {
            None => Ok(SectionPatch::Absent),
            Some(Value::Null) => Ok(SectionPatch::Clear),
            Some(Value::Object(map)) => {
                if depth(&Value::Object(map.clone())) > limits.max_depth {
                    return Err(ShadowError::TooDeep {
                        section: name,
                        max: limits.max_depth,
                    });
                }
                Ok(SectionPatch::Merge(map.clone()))
            }
            Some(_) => Err(ShadowError::InvalidState(format!(
                "{name} must be an object or null"
            ))),
        }
    };
    let desired = section("desired")?;
    let reported = section("reported")?;
    if desired.is_absent() && reported.is_absent() {
        return Err(ShadowError::InvalidState(
            "state must hold desired, reported or both".into(),
        ));
    }
    Ok(ShadowUpdate {
        desired,
        reported,
        version,
        client_token,
    })
}

/// Parses a get request: empty, or `{"clientToken": "…"}`. Returns the client token.
pub fn parse_get(payload: &[u8], limits: &ShadowLimits) -> Result<Option<String>, ShadowError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request = parse_object(payload, limits)?;
    let token = parse_client_token(request.get("clientToken"), limits)?;
    if let Some(unknown) = request.keys().find(|k| k.as_str() != "clientToken") {
        return Err(ShadowError::UnknownField(unknown.clone()));
    }
    Ok(token)
}

/// Nesting levels of containers in a value; scalars are 0.
fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// What an accepted update produced.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateOutcome {
    /// The new document, to store.
    pub document: ShadowDocument,
    /// Payload of `update/accepted` (and of the HTTP PATCH answer).
    pub accepted: Value,
    /// Payload of `update/delta`, when the update wrote `desired` and a delta remains.
    pub delta: Option<Value>,
    /// Payload of `update/documents`.
    pub documents: Value,
}

/// Applies an update to the current document (`None`: no shadow yet).
pub fn apply_update(
    current: Option<&ShadowDocument>,
    update: &ShadowUpdate,
    now: DateTime<Utc>,
    limits: &ShadowLimits,
) -> Result<UpdateOutcome, ShadowError> {
    let current_version = current.map_or(0, |d| d.version);
    if let Some(requested) = update.version
        && requested != current_version
    {
        return Err(ShadowError::VersionConflict {
            requested,
            current: current_version,
        });
    }
    let ts = now.timestamp();
    let mut document = current.cloned().unwrap_or(ShadowDocument {
        state: ShadowSections::default(),
        metadata: ShadowSections::default(),
        version: 0,
        timestamp: ts,
    });
    let mut echo_state = Map::new();
    let mut echo_metadata = Map::new();
    for (name, patch, state, metadata) in [
        (
            "desired",
            &update.desired,
            &mut document.state.desired,
            &mut document.metadata.desired,
        ),
        (
            "reported",
            &update.reported,
            &mut document.state.reported,
            &mut document.metadata.reported,
        ),
    ] {
        match patch {
            SectionPatch::Absent => {}
            SectionPatch::Clear => {
                state.clear();
                metadata.clear();
                echo_state.insert(name.into(), Value::Null);
                echo_metadata.insert(name.into(), json!({ "timestamp": ts }));
            }
            SectionPatch::Merge(changes) => {
                merge(state, metadata, changes, ts);
                let size = serde_json::to_vec(state).map_or(0, |v| v.len());
                if size > limits.max_state_bytes {
                    return Err(ShadowError::StateTooLarge {
                        section: name,
                        size,
                        max: limits.max_state_bytes,
                    });
                }
                echo_state.insert(name.into(), Value::Object(changes.clone()));
                echo_metadata.insert(name.into(), Value::Object(stamp(changes, ts)));
            }
        }
    }
    document.version = current_version + 1;
    document.timestamp = ts;

    let mut accepted = json!({
        "state": echo_state,
        "metadata": echo_metadata,
        "version": document.version,
        "timestamp": ts,
    });
    let mut documents = json!({
        "previous": current.map_or(Value::Null, ShadowDocument::snapshot),
        "current": document.snapshot(),
        "timestamp": ts,
    });
    if let Some(token) = &update.client_token {
        accepted["clientToken"] = Value::String(token.clone());
        documents["clientToken"] = Value::String(token.clone());
    }
    // As AWS does: only an update of `desired` publishes a delta, so a device reporting its
    // state does not get its own pending delta back after every report.
    let delta = if update.desired.is_absent() {
        None
    } else {
        delta_message(&document, now)
    };
    Ok(UpdateOutcome {
        document,
        accepted,
        delta,
        documents,
    })
}

/// Payload of `get/accepted`.
pub fn get_accepted(document: &ShadowDocument, client_token: Option<&str>) -> Value {
    let mut out = document.view();
    if let Some(token) = client_token {
        out["clientToken"] = Value::String(token.to_string());
    }
    out
}

/// Payload of `update/delta` (`{state: <delta>, metadata, version, timestamp}`), `None` when
/// `desired` and `reported` agree. `metadata` is that of the desired values in the delta.
pub fn delta_message(document: &ShadowDocument, now: DateTime<Utc>) -> Option<Value> {
    let delta = document.delta()?;
    let metadata = restrict(&document.metadata.desired, &delta);
    Some(json!({
        "state": delta,
        "metadata": metadata,
        "version": document.version,
        "timestamp": now.timestamp(),
    }))
}

/// Merges `changes` into `state`, stamping every written leaf in `metadata`.
fn merge(
    state: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    changes: &Map<String, Value>,
    ts: i64,
) {
    for (key, change) in changes {
        match change {
            Value::Null => {
                state.remove(key);
                metadata.remove(key);
            }
            Value::Object(inner) => {
                // A leaf (or nothing) becomes an object; its metadata then mirrors its keys.
                if !state.get(key).is_some_and(Value::is_object) {
                    state.insert(key.clone(), Value::Object(Map::new()));
                    metadata.insert(key.clone(), Value::Object(Map::new()));
                }
                let meta = metadata
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let (Some(Value::Object(t)), Value::Object(m)) = (state.get_mut(key), meta) {
                    merge(t, m, inner, ts);
                    if t.is_empty() {
                        state.remove(key);
                        metadata.remove(key);
                    }
                }
            }
            leaf => {
                state.insert(key.clone(), leaf.clone());
                metadata.insert(key.clone(), json!({ "timestamp": ts }));
            }
        }
    }
}

/// Metadata for what an update wrote: its shape with every leaf (or `null`) stamped.
fn stamp(changes: &Map<String, Value>, ts: i64) -> Map<String, Value> {
    changes
        .iter()
        .map(|(k, v)| {
            let meta = match v {
                Value::Object(inner) if !inner.is_empty() => Value::Object(stamp(inner, ts)),
                _ => json!({ "timestamp": ts }),
            };
            (k.clone(), meta)
        })
        .collect()
}

/// The keys of `desired` whose values `reported` does not have, recursively for objects.
fn diff(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, want) in desired {
        match (want, reported.get(key)) {
            (Value::Object(w), Some(Value::Object(r))) => {
                let inner = diff(w, r);
                if !inner.is_empty() {
                    out.insert(key.clone(), Value::Object(inner));
                }
            }
            (w, Some(r)) if w == r => {}
            (w, _) => {
                out.insert(key.clone(), w.clone());
            }
        }
    }
    out
}

/// The part of `metadata` whose keys appear in `shape`.
fn restrict(metadata: &Map<String, Value>, shape: &Map<String, Value>) -> Map<String, Value> {
    shape
        .iter()
        .filter_map(|(key, value)| {
            let meta = metadata.get(key)?;
            Some(match (value, meta) {
                (Value::Object(inner), Value::Object(m)) => (key.clone(), Value::Object(restrict(m, inner))),
                _ => (key.clone(), meta.clone()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).unwrap()
    }

    fn limits() -> ShadowLimits {
        ShadowLimits::default()
    }

    fn update(body: Value) -> ShadowUpdate {
        parse_update(body.to_string().as_bytes(), &limits()).unwrap()
    }

    fn apply(current: Option<&ShadowDocument>, body: Value, secs: i64) -> UpdateOutcome {
        apply_update(current, &update(body), at(secs), &limits()).unwrap()
    }

    fn err(body: &str) -> ShadowError {
        parse_update(body.as_bytes(), &limits()).unwrap_err()
    }

    #[test]
    fn first_update_creates_version_1_with_metadata() {
        let out = apply(
            None,
            json!({"state": {"desired": {"color": "red", "led": {"on": true}}}}),
            100,
        );
        let doc = &out.document;
        assert_eq!(doc.version, 1);
        assert_eq!(doc.timestamp, 100);
        assert_eq!(
            Value::Object(doc.state.desired.clone()),
            json!({"color": "red", "led": {"on": true}})
        );
        assert_eq!(
            Value::Object(doc.metadata.desired.clone()),
            json!({"color": {"timestamp": 100}, "led": {"on": {"timestamp": 100}}})
        );
        assert!(doc.state.reported.is_empty());
        assert_eq!(out.documents["previous"], Value::Null);
        assert_eq!(out.documents["current"]["version"], 1);
    }

    #[test]
    fn objects_merge_recursively_arrays_replace_null_deletes() {
        let first = apply(
            None,
            json!({"state": {"reported": {"a": {"x": 1, "y": 2}, "list": [1, 2, 3], "gone": true}}}),
            100,
        );
        let second = apply(
            Some(&first.document),
            json!({"state": {"reported": {"a": {"y": 3, "z": 4}, "list": [9], "gone": null}}}),
            200,
        );
        let doc = second.document;
        assert_eq!(
            Value::Object(doc.state.reported.clone()),
            json!({"a": {"x": 1, "y": 3, "z": 4}, "list": [9]})
        );
        assert_eq!(
            Value::Object(doc.metadata.reported.clone()),
            json!({"a": {"x": {"timestamp": 100}, "y": {"timestamp": 200}, "z": {"timestamp": 200}},
                   "list": {"timestamp": 200}})
        );
        assert_eq!(doc.version, 2);
    }

    #[test]
    fn deleting_the_last_key_of_an_object_removes_the_object() {
        let first = apply(None, json!({"state": {"desired": {"a": {"b": 1}, "c": 2}}}), 1);
        let second = apply(
            Some(&first.document),
            json!({"state": {"desired": {"a": {"b": null}}}}),
            2,
        );
        assert_eq!(
            Value::Object(second.document.state.desired.clone()),
            json!({"c": 2})
        );
        assert_eq!(
            Value::Object(second.document.metadata.desired.clone()),
            json!({"c": {"timestamp": 1}})
        );
    }

    #[test]
    fn a_leaf_replaced_by_an_object_and_back() {
        let first = apply(None, json!({"state": {"desired": {"a": 1}}}), 1);
        let second = apply(
            Some(&first.document),
            json!({"state": {"desired": {"a": {"b": 2}}}}),
            2,
        );
        assert_eq!(
            Value::Object(second.document.state.desired.clone()),
            json!({"a": {"b": 2}})
        );
        assert_eq!(
            Value::Object(second.document.metadata.desired.clone()),
            json!({"a": {"b": {"timestamp": 2}}})
        );
        let third = apply(Some(&second.document), json!({"state": {"desired": {"a": 3}}}), 3);
        assert_eq!(
            Value::Object(third.document.state.desired.clone()),
            json!({"a": 3})
        );
        assert_eq!(
            Value::Object(third.document.metadata.desired.clone()),
            json!({"a": {"timestamp": 3}})
        );
    }

    #[test]
    fn null_section_clears_it() {
        let first = apply(
            None,
            json!({"state": {"desired": {"a": 1}, "reported": {"b": 2}}}),
            1,
        );
        let second = apply(Some(&first.document), json!({"state": {"desired": null}}), 2);
        assert!(second.document.state.desired.is_empty());
        assert!(second.document.metadata.desired.is_empty());
        assert_eq!(
            Value::Object(second.document.state.reported.clone()),
            json!({"b": 2})
        );
        assert_eq!(second.accepted["state"], json!({"desired": null}));
        assert!(second.delta.is_none(), "nothing desired, nothing to do");
        assert!(second.document.view()["state"].get("desired").is_none());
    }

    #[test]
    fn delta_is_what_desired_asks_that_reported_lacks() {
        let first = apply(
            None,
            json!({"state": {"desired": {"color": "red", "mode": {"a": 1, "b": 2}, "list": [1]},
                              "reported": {"color": "blue", "mode": {"a": 1, "b": 3}, "list": [1], "extra": 5}}}),
            10,
        );
        let doc = &first.document;
        assert_eq!(
            Value::Object(doc.delta().unwrap()),
            json!({"color": "red", "mode": {"b": 2}})
        );
        let delta = first.delta.unwrap();
        assert_eq!(delta["state"], json!({"color": "red", "mode": {"b": 2}}));
        assert_eq!(
            delta["metadata"],
            json!({"color": {"timestamp": 10}, "mode": {"b": {"timestamp": 10}}})
        );
        assert_eq!(delta["version"], 1);
        assert_eq!(delta["timestamp"], 10);
        assert_eq!(
            doc.view()["state"]["delta"],
            json!({"color": "red", "mode": {"b": 2}})
        );
    }

    #[test]
    fn delta_published_only_after_a_desired_update() {
        let first = apply(None, json!({"state": {"desired": {"on": true}}}), 1);
        assert!(first.delta.is_some());
        // A report that does not settle the delta publishes none (AWS), though one remains.
        let report = apply(
            Some(&first.document),
            json!({"state": {"reported": {"temp": 20}}}),
            2,
        );
        assert!(report.delta.is_none());
        assert!(report.document.delta().is_some());
        // A report that settles it leaves no delta.
        let settled = apply(
            Some(&report.document),
            json!({"state": {"reported": {"on": true}}}),
            3,
        );
        assert!(settled.document.delta().is_none());
        assert!(settled.document.view()["state"].get("delta").is_none());
        // A desired update that matches reported publishes no delta either.
        let same = apply(
            Some(&settled.document),
            json!({"state": {"desired": {"on": true}}}),
            4,
        );
        assert!(same.delta.is_none());
        assert!(delta_message(&same.document, at(5)).is_none());
    }

    #[test]
    fn versions_increment_and_conditional_updates_check_them() {
        let first = apply(None, json!({"state": {"reported": {"a": 1}}, "version": 0}), 1);
        assert_eq!(first.document.version, 1);
        let second = apply(
            Some(&first.document),
            json!({"state": {"reported": {"a": 2}}, "version": 1}),
            2,
        );
        assert_eq!(second.document.version, 2);
        let stale = update(json!({"state": {"reported": {"a": 3}}, "version": 1}));
        let error = apply_update(Some(&second.document), &stale, at(3), &limits()).unwrap_err();
        assert_eq!(
            error,
            ShadowError::VersionConflict {
                requested: 1,
                current: 2
            }
        );
        assert_eq!(error.status(), 409);
        assert_eq!(error.code(), "version_conflict");
        let on_missing = update(json!({"state": {"reported": {"a": 3}}, "version": 4}));
        assert_eq!(
            apply_update(None, &on_missing, at(3), &limits())
                .unwrap_err()
                .code(),
            "version_conflict"
        );
        // Without a version the update is unconditional.
        let third = apply(
            Some(&second.document),
            json!({"state": {"reported": {"a": 3}}}),
            3,
        );
        assert_eq!(third.document.version, 3);
    }

    #[test]
    fn accepted_echoes_the_update_with_its_metadata_and_token() {
        let first = apply(
            None,
            json!({"state": {"desired": {"a": {"b": 1}, "c": null}}, "clientToken": "tok-1"}),
            7,
        );
        assert_eq!(
            first.accepted,
            json!({"state": {"desired": {"a": {"b": 1}, "c": null}},
                   "metadata": {"desired": {"a": {"b": {"timestamp": 7}}, "c": {"timestamp": 7}}},
                   "version": 1, "timestamp": 7, "clientToken": "tok-1"})
        );
        assert_eq!(first.documents["clientToken"], "tok-1");
        let got = get_accepted(&first.document, Some("tok-2"));
        assert_eq!(got["clientToken"], "tok-2");
        assert_eq!(got["state"]["desired"], json!({"a": {"b": 1}}));
        assert_eq!(got["state"]["delta"], json!({"a": {"b": 1}}));
        assert_eq!(got["metadata"]["desired"], json!({"a": {"b": {"timestamp": 7}}}));
        assert_eq!(got["version"], 1);
    }

    #[test]
    fn documents_carry_previous_and_current() {
        let first = apply(None, json!({"state": {"reported": {"a": 1}}}), 1);
        let second = apply(Some(&first.document), json!({"state": {"reported": {"a": 2}}}), 2);
        assert_eq!(
            second.documents["previous"]["state"],
            json!({"reported": {"a": 1}})
        );
        assert_eq!(second.documents["previous"]["version"], 1);
        assert_eq!(
            second.documents["current"]["state"],
            json!({"reported": {"a": 2}})
        );
        assert_eq!(
            second.documents["current"]["metadata"],
            json!({"reported": {"a": {"timestamp": 2}}})
        );
        assert_eq!(second.documents["current"]["version"], 2);
        assert_eq!(second.documents["timestamp"], 2);
    }

    #[test]
    fn malformed_requests_get_specific_codes() {
        assert_eq!(err("{not json").code(), "invalid_json");
        assert_eq!(err("[1]").code(), "invalid_request");
        assert_eq!(err("{}").code(), "invalid_request");
        assert_eq!(
            err(r#"{"state": {"desired": {}}, "extra": 1}"#).code(),
            "unknown_field"
        );
        assert_eq!(err(r#"{"state": 5}"#).code(), "invalid_state");
        assert_eq!(err(r#"{"state": {}}"#).code(), "invalid_state");
        assert_eq!(err(r#"{"state": {"delta": {"a": 1}}}"#).code(), "invalid_state");
        assert_eq!(err(r#"{"state": {"desired": [1]}}"#).code(), "invalid_state");
        assert_eq!(
            err(r#"{"state": {"desired": {}}, "version": -1}"#).code(),
            "invalid_version"
        );
        assert_eq!(
            err(r#"{"state": {"desired": {}}, "version": "3"}"#).code(),
            "invalid_version"
        );
        assert_eq!(
            err(r#"{"state": {"desired": {}}, "clientToken": 5}"#).code(),
            "invalid_client_token"
        );
        let long = format!(
            r#"{{"state": {{"desired": {{}}}}, "clientToken": "{}"}}"#,
            "x".repeat(65)
        );
        assert_eq!(err(&long).code(), "invalid_client_token");
        for e in [err("{"), err("{}")] {
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn depth_and_size_limits() {
        let six = json!({"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}}});
        assert!(parse_update(six.to_string().as_bytes(), &limits()).is_ok());
        let seven = json!({"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}});
        let error = parse_update(seven.to_string().as_bytes(), &limits()).unwrap_err();
        assert_eq!(error.code(), "too_deep");
        assert_eq!(error.status(), 400);
        let arrays = json!({"state": {"reported": {"a": [[[[[[1]]]]]]}}});
        assert_eq!(
            parse_update(arrays.to_string().as_bytes(), &limits())
                .unwrap_err()
                .code(),
            "too_deep"
        );

        let big = "x".repeat(5000);
        let first = apply(None, json!({"state": {"reported": {"a": big}}}), 1);
        let more = update(json!({"state": {"reported": {"b": big}}}));
        let error = apply_update(Some(&first.document), &more, at(2), &limits()).unwrap_err();
        assert_eq!(error.code(), "state_too_large");
        assert_eq!(error.status(), 413);
        // Each section has its own budget.
        let desired = update(json!({"state": {"desired": {"b": big}}}));
        assert!(apply_update(Some(&first.document), &desired, at(2), &limits()).is_ok());

        let huge = format!(r#"{{"state": {{"desired": {{"a": "{}"}}}}}}"#, "y".repeat(40_000));
        let error = err(&huge);
        assert_eq!(error.code(), "payload_too_large");
        assert_eq!(error.status(), 413);
    }

    #[test]
    fn rejected_payload_has_numeric_and_string_codes() {
        let error = ShadowError::VersionConflict {
            requested: 1,
            current: 2,
        };
        let payload = error.rejected(Some("abc"), at(9));
        assert_eq!(payload["code"], 409);
        assert_eq!(payload["errorCode"], "version_conflict");
        assert_eq!(payload["timestamp"], 9);
        assert_eq!(payload["clientToken"], "abc");
        assert!(payload["message"].as_str().unwrap().contains("version"));
        assert!(
            ShadowError::NotFound
                .rejected(None, at(1))
                .get("clientToken")
                .is_none()
        );
        assert_eq!(
            client_token_of(br#"{"clientToken": "t", "bad": 1}"#, &limits()).as_deref(),
            Some("t")
        );
    }

    #[test]
    fn get_requests() {
        assert_eq!(parse_get(b"", &limits()), Ok(None));
        assert_eq!(parse_get(b"{}", &limits()), Ok(None));
        assert_eq!(
            parse_get(br#"{"clientToken": "x"}"#, &limits()),
            Ok(Some("x".into()))
        );
        assert_eq!(parse_get(b"nope", &limits()).unwrap_err().code(), "invalid_json");
        assert_eq!(
            parse_get(br#"{"state": 1}"#, &limits()).unwrap_err().code(),
            "unknown_field"
        );
    }

    #[test]
    fn document_round_trips_through_json_storage() {
        let out = apply(
            None,
            json!({"state": {"desired": {"a": 1}, "reported": {"b": [1, 2]}}}),
            5,
        );
        let text = serde_json::to_string(&out.document).unwrap();
        let back: ShadowDocument = serde_json::from_str(&text).unwrap();
        assert_eq!(back, out.document);
        assert_eq!(
            out.document.state_view(),
            json!({"desired": {"a": 1}, "reported": {"b": [1, 2]}})
        );
    }
}
