//! Time as the rules engine sees it: server time at arrival, from an injectable clock.
//!
//! Windows, durations, absence timers and escalation due times all read [`Clock::now_ms`], so
//! tests drive them with a [`ManualClock`] instead of sleeping.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + Debug {
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    /// A manual clock starting at the current system time.
    pub fn new() -> Arc<ManualClock> {
        Self::at(SystemClock.now_ms())
    }

    pub fn at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: AtomicI64::new(ms),
        })
    }

    pub fn advance_ms(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set_ms(&self, ms: i64) {
        self.now.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// The clock every component shares.
pub type SharedClock = Arc<dyn Clock>;

/// Serialises a time as RFC 3339 with milliseconds, the precision the registry stores and the
/// API shows everywhere (`2026-01-31T12:00:00.123Z`); live snapshots hold nanoseconds.
pub fn rfc3339_ms<S: serde::Serializer>(t: &chrono::DateTime<chrono::Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// [`rfc3339_ms`] for an optional time (`null` when absent).
pub fn rfc3339_ms_opt<S: serde::Serializer>(
    t: &Option<chrono::DateTime<chrono::Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339_ms(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod rfc3339_tests {
    use chrono::TimeZone;

    #[derive(serde::Serialize)]
    struct At {
        #[serde(serialize_with = "super::rfc3339_ms")]
        at: chrono::DateTime<chrono::Utc>,
        #[serde(serialize_with = "super::rfc3339_ms_opt")]
        maybe: Option<chrono::DateTime<chrono::Utc>>,
    }

    #[test]
    fn times_show_milliseconds() {
        let at = chrono::Utc.timestamp_nanos(1_764_331_267_112_345_678);
        let json = serde_json::to_string(&At { at, maybe: None }).unwrap();
        assert_eq!(json, r#"{"at":"2025-11-28T12:01:07.112Z","maybe":null}"#);
    }
}
