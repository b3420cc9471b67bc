//! OTA campaigns, domain half: the states a device's job goes through, what devices report, how
//! a rollout is cut into stages and when a stage passes, pauses or aborts the campaign.
//!
//! Pure logic only, unit-tested here. The adapter half — the runner actor that drives campaigns
//! from the registry, storage and the HTTP API — is `src/ota/` in the application crate; the
//! device's side of the protocol (parsing `devices/{id}/jobs/{jobId}/update`) is
//! [`crate::device_actor`]'s `jobs` module.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveTime, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, TenantId};

/// Where a campaign is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    Running,
    /// Stopped notifying devices, by an operator or by its failure rule; can be resumed.
    Paused,
    Completed,
    Cancelled,
    /// Stopped by its failure rule for good.
    Aborted,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Running => "running",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Completed => "completed",
            CampaignStatus::Cancelled => "cancelled",
            CampaignStatus::Aborted => "aborted",
        }
    }

    /// Finished for good: no device is notified any more, reports are only recorded.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CampaignStatus::Completed | CampaignStatus::Cancelled | CampaignStatus::Aborted
        )
    }
}

impl FromStr for CampaignStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "running" => CampaignStatus::Running,
            "paused" => CampaignStatus::Paused,
            "completed" => CampaignStatus::Completed,
            "cancelled" => CampaignStatus::Cancelled,
            "aborted" => CampaignStatus::Aborted,
            other => return Err(format!("unknown campaign status {other:?}")),
        })
    }
}

impl fmt::Display for CampaignStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one device's job (its "job execution", in AWS IoT Jobs' words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// In a stage not reached yet, or waiting for its turn in the current one.
    Pending,
    /// The job was published to the device; no answer yet.
    Notified,
    InProgress,
    /// The device said it succeeded; waiting for its shadow to report the new version.
    Verifying,
    Succeeded,
    Failed,
    Rejected,
    TimedOut,
    Cancelled,
    /// Not attempted: the device's type is not one the firmware fits.
    Skipped,
}

impl JobState {
    pub const ALL: [JobState; 10] = [
        JobState::Pending,
        JobState::Notified,
        JobState::InProgress,
        JobState::Verifying,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Rejected,
        JobState::TimedOut,
        JobState::Cancelled,
        JobState::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Notified => "notified",
            JobState::InProgress => "in_progress",
            JobState::Verifying => "verifying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Rejected => "rejected",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Skipped => "skipped",
        }
    }

    /// Nothing more will happen to it in this campaign (unless a resume retries failures).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Rejected
                | JobState::TimedOut
                | JobState::Cancelled
                | JobState::Skipped
        )
    }

    /// Counts against the stage's failure rule.
    pub fn is_failure(self) -> bool {
        matches!(self, JobState::Failed | JobState::Rejected | JobState::TimedOut)
    }

    /// The device holds the job now: notified and not finished.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Notified | JobState::InProgress | JobState::Verifying
        )
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a device reports on `devices/{id}/jobs/{jobId}/update` (`"status"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReportedStatus {
    InProgress,
    Succeeded,
    Failed,
    Rejected,
}

/// A device's report about a job, as the device actor passes it on.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub job: String,
    pub status: ReportedStatus,
    /// 0–100, with `InProgress`.
    pub progress: Option<u8>,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// Longest failure reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 256;
/// Longest job id accepted on the update topic.
pub const MAX_JOB_ID_BYTES: usize = 64;

/// Why a job update payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobUpdateError(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    status: String,
    #[serde(default)]
    progress: Option<f64>,
    #[serde(default)]
    reason: Option<String>,
    /// Free-form details a device may add (AWS's `statusDetails`); kept out of the record.
    #[serde(default, rename = "statusDetails")]
    _details: Option<serde_json::Value>,
}

/// Parses an update body: `{"status": "IN_PROGRESS", "progress": 40}`,
/// `{"status": "FAILED", "reason": "checksum mismatch"}`, `SUCCEEDED`, `REJECTED`.
pub fn parse_job_update(
    payload: &[u8],
) -> Result<(ReportedStatus, Option<u8>, Option<String>), JobUpdateError> {
    let body: UpdateBody =
        serde_json::from_slice(payload).map_err(|e| JobUpdateError(format!("not a job update: {e}")))?;
    let status = match body.status.as_str() {
        "IN_PROGRESS" => ReportedStatus::InProgress,
        "SUCCEEDED" => ReportedStatus::Succeeded,
        "FAILED" => ReportedStatus::Failed,
        "REJECTED" => ReportedStatus::Rejected,
        other => {
            return Err(JobUpdateError(format!(
                "status {other:?}: use IN_PROGRESS, SUCCEEDED, FAILED or REJECTED"
            )));
        }
    };
    let progress = match body.progress {
        None => None,
        Some(p) if (0.0..=100.0).contains(&p) => Some(p.round() as u8),
        Some(p) => return Err(JobUpdateError(format!("progress {p}: expected 0 to 100"))),
    };
    let reason = body
        .reason
        .map(|r| r.chars().take(MAX_REASON_CHARS).collect::<String>())
        .filter(|r| !r.is_empty());
    Ok((status, progress, reason))
}

/// The state a report moves a job to, or `None` when it changes nothing (a late report about a
/// job that already finished, or a progress report after the success). A success becomes
/// `Verifying` until the device's shadow shows the version.
pub fn next_state(current: JobState, reported: ReportedStatus) -> Option<JobState> {
    if current.is_terminal() || current == JobState::Pending {
        return None;
    }
    match reported {
        ReportedStatus::InProgress if current == JobState::Verifying => None,
        ReportedStatus::InProgress => Some(JobState::InProgress),
        ReportedStatus::Succeeded => Some(JobState::Verifying),
        ReportedStatus::Failed => Some(JobState::Failed),
        ReportedStatus::Rejected => Some(JobState::Rejected),
    }
}

/// How devices are cut into stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollout {
    /// Cumulative percentages of the target, increasing, the last 100 (`[1, 10, 50, 100]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<f64>>,
    /// Or fixed batches of this many devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Most devices notified per minute (0 or absent: as fast as the runner goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_minute: Option<u32>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            stages: Some(vec![100.0]),
            batch_size: None,
            max_per_minute: None,
        }
    }
}

/// Most stages a rollout may have.
pub const MAX_STAGES: usize = 1000;

impl Rollout {
    /// Refuses a rollout that cannot be planned.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.stages, self.batch_size) {
            (Some(_), Some(_)) => Err("give either stages or batchSize, not both".into()),
            (None, None) => Err("give stages (cumulative percentages) or batchSize".into()),
            (None, Some(0)) => Err("batchSize must be at least 1".into()),
            (None, Some(_)) => Ok(()),
            (Some(stages), None) => {
                if stages.is_empty() || stages.len() > 20 {
                    return Err("stages: give 1 to 20 cumulative percentages".into());
                }
                let mut last = 0.0;
                for &p in stages {
                    if !(p > last && p <= 100.0) {
                        return Err(format!(
                            "stages: percentages must increase, each above 0 and at most 100 (got {p} after {last})"
                        ));
                    }
                    last = p;
                }
                if last != 100.0 {
                    return Err("stages: the last stage must be 100".into());
                }
                Ok(())
            }
        }
    }

    /// The end (exclusive, in target order) of each stage for `total` devices: device `i` is in
    /// the first stage whose end is above `i`. Every stage has at least one device, so a 1%
    /// stage of 50 devices is 1 device; stages that would be empty are merged away.
    pub fn stage_ends(&self, total: usize) -> Vec<usize> {
        if total == 0 {
            return vec![0];
        }
        let mut ends = Vec::new();
        match (&self.stages, self.batch_size) {
            (Some(stages), _) => {
                for p in stages {
                    let end = ((total as f64) * p / 100.0).ceil() as usize;
                    let end = end.clamp(1, total);
                    if ends.last().is_none_or(|&last| end > last) {
                        ends.push(end);
                    }
                }
            }
            (None, Some(batch)) => {
                let batch = batch.max(1) as usize;
                let mut end = 0;
                while end < total && ends.len() < MAX_STAGES {
                    end = (end + batch).min(total);
                    ends.push(end);
                }
            }
            (None, None) => {}
        }
        if ends.last() != Some(&total) {
            ends.push(total);
        }
        ends
    }
}

/// What happens when a stage's failures pass the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    Pause,
    Abort,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureRule {
    /// Fraction (0–1) of a stage's devices that may fail (failed, rejected or timed out).
    pub max_failure_rate: f64,
    #[serde(default = "FailureRule::default_action")]
    pub action: FailureAction,
}

impl FailureRule {
    fn default_action() -> FailureAction {
        FailureAction::Pause
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.max_failure_rate) {
            return Err(format!(
                "maxFailureRate {}: expected a fraction from 0 to 1",
                self.max_failure_rate
            ));
        }
        Ok(())
    }
}

impl Default for FailureRule {
    fn default() -> Self {
        FailureRule {
            max_failure_rate: 0.1,
            action: FailureAction::Pause,
        }
    }
}

/// Devices of one stage by where they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StageCounts {
    pub total: u64,
    pub pending: u64,
    pub active: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Cancelled or skipped.
    pub other: u64,
}

impl StageCounts {
    pub fn add(&mut self, state: JobState, n: u64) {
        self.total += n;
        match state {
            JobState::Pending => self.pending += n,
            s if s.is_active() => self.active += n,
            JobState::Succeeded => self.succeeded += n,
            s if s.is_failure() => self.failed += n,
            _ => self.other += n,
        }
    }
}

/// What the runner does with a campaign after looking at its current stage.
#[derive(Debug, Clone, PartialEq)]
pub enum StageDecision {
    /// Keep notifying and waiting.
    Continue,
    /// The stage passed: start the next one.
    Advance,
    /// The last stage passed.
    Complete,
    Pause(String),
    Abort(String),
}

/// Judges the current stage (`stage` of `stages`, 0-based). A stage fails as soon as its
/// failures exceed the allowed fraction of its devices — waiting for the rest would only
/// brick more of them — and passes once every device finished.
pub fn decide(stage: usize, stages: usize, counts: &StageCounts, rule: &FailureRule) -> StageDecision {
    let allowed = rule.max_failure_rate * counts.total as f64;
    if counts.failed > 0 && counts.failed as f64 > allowed {
        let why = format!(
            "stage {} of {}: {} of {} devices failed, above the allowed {:.0}%",
            stage + 1,
            stages,
            counts.failed,
            counts.total,
            rule.max_failure_rate * 100.0
        );
        return match rule.action {
            FailureAction::Pause => StageDecision::Pause(why),
            FailureAction::Abort => StageDecision::Abort(why),
        };
    }
    if counts.pending > 0 || counts.active > 0 {
        return StageDecision::Continue;
    }
    if stage + 1 >= stages {
        StageDecision::Complete
    } else {
        StageDecision::Advance
    }
}

/// A daily window (UTC) in which devices may be notified; it may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// `HH:MM`, UTC.
    #[serde(with = "hhmm")]
    pub start: NaiveTime,
    #[serde(with = "hhmm")]
    pub end: NaiveTime,
}

impl MaintenanceWindow {
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let now = at.time().with_nanosecond(0).unwrap_or(at.time());
        if self.start <= self.end {
            self.start <= now && now < self.end
        } else {
            now >= self.start || now < self.end
        }
    }
}

mod hhmm {
    use chrono::NaiveTime;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &NaiveTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.format("%H:%M").to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NaiveTime, D::Error> {
        let raw = String::deserialize(d)?;
        NaiveTime::parse_from_str(&raw, "%H:%M")
            .map_err(|_| serde::de::Error::custom(format!("{raw:?} is not a time of day HH:MM")))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn stages(p: &[f64]) -> Rollout {
        Rollout {
            stages: Some(p.to_vec()),
            ..Rollout::default()
        }
    }

    #[test]
    fn percentages_become_stage_ends_with_at_least_one_device_each() {
        assert_eq!(
            stages(&[1.0, 10.0, 50.0, 100.0]).stage_ends(1000),
            vec![10, 100, 500, 1000]
        );
        assert_eq!(
            stages(&[1.0, 10.0, 50.0, 100.0]).stage_ends(50),
            vec![1, 5, 25, 50]
        );
        // 1% and 10% of 5 devices are both the first device: one stage.
        assert_eq!(stages(&[1.0, 10.0, 50.0, 100.0]).stage_ends(5), vec![1, 3, 5]);
        assert_eq!(stages(&[100.0]).stage_ends(7), vec![7]);
        assert_eq!(stages(&[100.0]).stage_ends(0), vec![0]);
    }

    #[test]
    fn batches_become_stage_ends() {
        let rollout = Rollout {
            stages: None,
            batch_size: Some(4),
            max_per_minute: None,
        };
        assert_eq!(rollout.stage_ends(10), vec![4, 8, 10]);
        assert!(rollout.validate().is_ok());
    }

    #[test]
    fn rollouts_that_cannot_be_planned_are_refused() {
        assert!(stages(&[10.0, 5.0, 100.0]).validate().is_err());
        assert!(stages(&[10.0, 50.0]).validate().is_err());
        assert!(stages(&[0.0, 100.0]).validate().is_err());
        assert!(stages(&[]).validate().is_err());
        assert!(stages(&[1.0, 10.0, 100.0]).validate().is_ok());
        let both = Rollout {
            stages: Some(vec![100.0]),
            batch_size: Some(3),
            max_per_minute: None,
        };
        assert!(both.validate().is_err());
    }

    fn counts(pending: u64, active: u64, succeeded: u64, failed: u64) -> StageCounts {
        StageCounts {
            total: pending + active + succeeded + failed,
            pending,
            active,
            succeeded,
            failed,
            other: 0,
        }
    }

    #[test]
    fn a_stage_pauses_as_soon_as_its_failures_pass_the_threshold() {
        let rule = FailureRule {
            max_failure_rate: 0.2,
            action: FailureAction::Pause,
        };
        // 2 of 10 is exactly the allowed 20%: keep going.
        assert_eq!(decide(0, 3, &counts(3, 3, 2, 2), &rule), StageDecision::Continue);
        // 3 of 10 is above it, even with devices still working.
        assert!(matches!(
            decide(0, 3, &counts(2, 3, 2, 3), &rule),
            StageDecision::Pause(_)
        ));
        let abort = FailureRule {
            action: FailureAction::Abort,
            ..rule
        };
        assert!(matches!(
            decide(1, 3, &counts(0, 0, 0, 3), &abort),
            StageDecision::Abort(_)
        ));
    }

    #[test]
    fn a_finished_stage_advances_and_the_last_completes() {
        let rule = FailureRule::default();
        assert_eq!(decide(0, 2, &counts(0, 0, 10, 0), &rule), StageDecision::Advance);
        assert_eq!(decide(1, 2, &counts(0, 0, 10, 0), &rule), StageDecision::Complete);
        assert_eq!(decide(1, 2, &counts(0, 1, 9, 0), &rule), StageDecision::Continue);
        // A zero tolerance pauses on the first failure.
        let strict = FailureRule {
            max_failure_rate: 0.0,
            action: FailureAction::Pause,
        };
        assert!(matches!(
            decide(0, 2, &counts(0, 0, 9, 1), &strict),
            StageDecision::Pause(_)
        ));
    }

    #[test]
    fn reports_move_jobs_forward_only() {
        use ReportedStatus::*;
        assert_eq!(
            next_state(JobState::Notified, InProgress),
            Some(JobState::InProgress)
        );
        assert_eq!(
            next_state(JobState::InProgress, Succeeded),
            Some(JobState::Verifying)
        );
        assert_eq!(next_state(JobState::InProgress, Failed), Some(JobState::Failed));
        assert_eq!(next_state(JobState::Notified, Rejected), Some(JobState::Rejected));
        assert_eq!(next_state(JobState::Verifying, InProgress), None);
        assert_eq!(next_state(JobState::Succeeded, Failed), None);
        assert_eq!(next_state(JobState::Cancelled, InProgress), None);
        assert_eq!(next_state(JobState::Pending, InProgress), None);
    }

    #[test]
    fn job_updates_are_parsed_and_checked() {
        assert_eq!(
            parse_job_update(br#"{"status":"IN_PROGRESS","progress":41.6}"#).unwrap(),
            (ReportedStatus::InProgress, Some(42), None)
        );
        assert_eq!(
            parse_job_update(br#"{"status":"FAILED","reason":"sha256 mismatch"}"#).unwrap(),
            (ReportedStatus::Failed, None, Some("sha256 mismatch".into()))
        );
        assert!(parse_job_update(br#"{"status":"DONE"}"#).is_err());
        assert!(parse_job_update(br#"{"status":"IN_PROGRESS","progress":140}"#).is_err());
        assert!(parse_job_update(b"not json").is_err());
        assert!(parse_job_update(br#"{"status":"SUCCEEDED","extra":1}"#).is_err());
    }

    #[test]
    fn windows_may_wrap_past_midnight() {
        let at = |h, m| Utc.with_ymd_and_hms(2026, 1, 1, h, m, 0).unwrap();
        let t = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
        let night = MaintenanceWindow {
            start: t(22, 0),
            end: t(4, 0),
        };
        assert!(night.contains(at(23, 0)));
        assert!(night.contains(at(3, 59)));
        assert!(!night.contains(at(4, 0)));
        assert!(!night.contains(at(12, 0)));
        let day = MaintenanceWindow {
            start: t(9, 0),
            end: t(17, 0),
        };
        assert!(day.contains(at(9, 0)));
        assert!(!day.contains(at(17, 30)));
        let parsed: MaintenanceWindow = serde_json::from_str(r#"{"start":"22:00","end":"04:00"}"#).unwrap();
        assert_eq!(parsed, night);
        assert!(serde_json::from_str::<MaintenanceWindow>(r#"{"start":"25:00","end":"04:00"}"#).is_err());
    }
}
