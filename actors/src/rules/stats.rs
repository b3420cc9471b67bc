//! Per-rule evaluation counters, shared between the evaluation threads that update them and the
//! API that shows them (`GET /api/rules/{id}`, `/metrics`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::script::ScriptError;

/// Counters of one rule, shared with the API (`GET /api/rules/{id}` shows them).
#[derive(Debug, Default)]
pub struct RuleStats {
    pub evaluations: AtomicU64,
    pub matches: AtomicU64,
    /// Messages that lacked a value the rule reads.
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
    pub limit_hits: AtomicU64,
    /// Evaluations stopped by the wall-time limit (the rule keeps running: wall time depends on
    /// the machine's load).
    pub timeouts: AtomicU64,
    /// Set when a sandbox limit was hit: the rule no longer runs until it is changed.
    pub stopped: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// [`RuleStats`] as JSON.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleStatsView {
    pub evaluations: u64,
    pub matches: u64,
    pub skipped: u64,
    pub errors: u64,
    pub limit_hits: u64,
    pub timeouts: u64,
    /// `running`, `stopped` (a limit was hit) or `idle` (not loaded yet).
    pub status: &'static str,
    pub last_error: Option<String>,
}

impl RuleStats {
    pub fn view(&self) -> RuleStatsView {
        RuleStatsView {
            evaluations: self.evaluations.load(Ordering::Relaxed),
            matches: self.matches.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            limit_hits: self.limit_hits.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            status: if self.stopped.load(Ordering::Relaxed) {
                "stopped"
            } else {
                "running"
            },
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    pub(super) fn error(&self, error: &ScriptError) {
        match error {
            ScriptError::Missing(_) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            ScriptError::Limit { .. } => {
                self.limit_hits.fetch_add(1, Ordering::Relaxed);
                self.stopped.store(true, Ordering::Relaxed);
            }
            ScriptError::Timeout { .. } => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
    }
}

/// Stats of every loaded rule by id, shared between the evaluation threads and the API.
pub type StatsBoard = Arc<Mutex<HashMap<String, Arc<RuleStats>>>>;
