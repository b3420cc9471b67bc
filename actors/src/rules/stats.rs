//! Per-rule evaluation counters, shared between the evaluation threads that update them and the
//! API that shows them (`GET /api/rules/{id}`, `/metrics`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::script::ScriptError;

/// Evaluations in a row that hit the wall-time limit before the rule is stopped: one slow
/// evaluation may be the machine's load, a run of them is the rule, and each costs a worker the
/// whole limit, so a backlog judged by such rules would hold the tenant's worker for minutes.
pub const TIMEOUTS_IN_A_ROW_TO_STOP: u64 = 3;

/// Counters of one rule, shared with the API (`GET /api/rules/{id}` shows them).
#[derive(Debug, Default)]
pub struct RuleStats {
    pub evaluations: AtomicU64,
    pub matches: AtomicU64,
    /// Messages that lacked a value the rule reads.
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
    pub limit_hits: AtomicU64,
    /// Evaluations stopped by the wall-time limit (one alone does not stop the rule: wall time
    /// depends on the machine's load; [`TIMEOUTS_IN_A_ROW_TO_STOP`] in a row do).
    pub timeouts: AtomicU64,
    /// Timeouts since the last evaluation that ended in time.
    timeouts_in_a_row: AtomicU64,
    /// The `evaluations` count at the last timeout (the next one is in a row if it is one more).
    last_timeout_at: AtomicU64,
    /// Set when a sandbox limit was hit: the rule no longer runs until it is changed.
    pub stopped: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Evaluations counted for a group of rules at once (the evaluator's index judges a group
    /// of rules per message): the group's counter and its value when this rule joined.
    shared: Mutex<Option<(Arc<AtomicU64>, u64)>>,
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
        let shared = self
            .shared
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|(c, base)| c.load(Ordering::Relaxed) - base))
            .unwrap_or(0);
        RuleStatsView {
            evaluations: self.evaluations.load(Ordering::Relaxed) + shared,
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

    /// Counts this rule's evaluations from now on in `counter` as well (`None`: no longer);
    /// what the previous counter counted is kept.
    pub(super) fn share(&self, counter: Option<&Arc<AtomicU64>>) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, base)) = shared.take() {
            self.evaluations
                .fetch_add(c.load(Ordering::Relaxed) - base, Ordering::Relaxed);
        }
        *shared = counter.map(|c| (c.clone(), c.load(Ordering::Relaxed)));
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
                let evaluation = self.evaluations.load(Ordering::Relaxed);
                let previous = self.last_timeout_at.swap(evaluation, Ordering::Relaxed);
                let in_a_row = if previous == evaluation {
                    // The condition and the clear expression of one evaluation.
                    self.timeouts_in_a_row.load(Ordering::Relaxed)
                } else if previous != 0 && previous + 1 == evaluation {
                    self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    self.timeouts_in_a_row.store(1, Ordering::Relaxed);
                    1
                };
                if in_a_row >= TIMEOUTS_IN_A_ROW_TO_STOP {
                    self.stopped.store(true, Ordering::Relaxed);
                    if let Ok(mut last) = self.last_error.lock() {
                        *last = Some(format!(
                            "stopped after {in_a_row} evaluations in a row hit the time limit: {error}"
                        ));
                    }
                    return;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> ScriptError {
        ScriptError::Timeout {
            ms: 50,
            line: 1,
            column: 1,
        }
    }

    fn evaluate(stats: &RuleStats, outcome: Option<ScriptError>) {
        stats.evaluations.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = outcome {
            stats.error(&e);
        }
    }

    #[test]
    fn timeouts_in_a_row_stop_the_rule_and_one_in_time_resets_the_run() {
        let stats = RuleStats::default();
        evaluate(&stats, Some(timeout()));
        evaluate(&stats, Some(timeout()));
        evaluate(&stats, None);
        evaluate(&stats, Some(timeout()));
        evaluate(&stats, Some(timeout()));
        assert_eq!(
            stats.view().status,
            "running",
            "an evaluation in time broke the run"
        );
        evaluate(&stats, Some(timeout()));
        let view = stats.view();
        assert_eq!(view.status, "stopped");
        assert_eq!(view.timeouts, 5);
        assert!(view.last_error.unwrap().contains("3 evaluations in a row"));
    }
}
