//! `CampaignRunner`: drives every running OTA campaign, one pass at a time.
//!
//! A singleton whose state is all in the registry (`crate::storage::ota`): each pass reads the
//! running campaigns, records the reports devices sent since the last pass (in one transaction),
//! times out devices that did not finish, checks the shadows of devices that said they
//! succeeded, judges the current stage (advance, complete, pause or abort: the pure rules are
//! `drover_actors::campaign`), and notifies the next devices within the rollout's rate and the
//! maintenance window. Nothing lives only in memory, so a restart — or, in a cluster, another
//! node taking the runner's lease (DESIGN §9) — resumes where the last pass stopped.
//!
//! Device reports arrive through [`RunnerJobs`] (the device actors' `DeviceJobs`), with
//! `try_send` on a bounded mailbox: a full runner refuses the report and the device retries.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use chrono::Utc;
use drover_actors::campaign::{
    CampaignStatus, JobReport, JobState, ReportedStatus, StageDecision, decide, next_state,
};
use drover_actors::device_actor::jobs::{DeviceJobs, JobsBusy};
use drover_actors::{DeviceId, DeviceOutbound, ShadowStore, TenantId};
use serde::Serialize;

use super::campaigns::{CampaignPlan, job_notification};
use crate::dashboard::DashboardHub;
use crate::dashboard::hub::LiveMessage;
use crate::storage::RegistryStore;
use crate::storage::ota::{CampaignRecord, DeviceTransition, StateCounts, stage_counts};
use crate::storage::records::AuditActor;

/// How often a pass runs.
pub const PASS_INTERVAL: Duration = Duration::from_millis(250);
/// Reports and requests the runner's mailbox holds before devices are told to retry.
pub const MAILBOX: usize = 65_536;
/// Devices notified per campaign and pass when the rollout sets no rate.
pub const MAX_NOTIFIED_PER_PASS: u32 = 500;
/// Devices whose shadow is checked per campaign and pass.
const MAX_VERIFIED_PER_PASS: u32 = 500;

// ---- messages received -------------------------------------------------------------------

/// A device's report, from its actor.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReportJob {
    pub report: JobReport,
}

/// A device asked for its pending job, or connected.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RequestPendingJob {
    pub tenant: TenantId,
    pub device: DeviceId,
}

/// Something changed (a campaign created or resumed): run a pass now rather than at the tick.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Kick {}

/// Devices to tell their job is cancelled (campaign cancelled or aborted).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct TellCancelled {
    pub tenant: TenantId,
    pub campaign: String,
    pub devices: Vec<String>,
}

/// The runner as `GET /admin/actors` shows it.
#[derive(Message, Debug)]
#[rtype(result = "RunnerSnapshot")]
pub struct InspectRunner {}

/// What [`InspectRunner`] answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSnapshot {
    /// The running campaigns the last pass saw (driven here unless another node holds the
    /// runner's lease).
    pub running: Vec<RunningCampaign>,
    /// Whether this node drives them (holds the runner's lease).
    pub driving: bool,
    /// Device reports and job requests waiting for the next pass, and the mailbox's size.
    pub queued_reports: usize,
    pub queued_requests: usize,
    pub mailbox: usize,
    /// A pass is running now.
    pub busy: bool,
    pub passes: u64,
    pub last_pass_ms: Option<u64>,
    /// Since the start: device reports recorded, devices notified, devices timed out.
    pub reports_recorded: u64,
    pub devices_notified: u64,
    pub devices_timed_out: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningCampaign {
    pub campaign: String,
    pub tenant: String,
    /// 1-based.
    pub stage: u32,
    pub stages: u32,
}

/// Stops the runner (shutdown).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopRunner {}

// ---- the live frame --------------------------------------------------------------------------

/// What `/ws` sessions get after a pass that changed a campaign.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignProgress {
    pub campaign_id: String,
    #[schema(value_type = String)]
    pub status: CampaignStatus,
    /// 1-based.
    pub stage: u32,
    pub stages: u32,
    pub status_reason: Option<String>,
    /// Devices per job state.
    pub counts: std::collections::BTreeMap<String, u64>,
}

impl CampaignProgress {
    pub fn of(campaign: &CampaignRecord, counts: &[(u32, JobState, u64)]) -> CampaignProgress {
        let mut by_state = std::collections::BTreeMap::new();
        for (_, state, n) in counts {
            *by_state.entry(state.as_str().to_string()).or_insert(0) += n;
        }
        CampaignProgress {
            campaign_id: campaign.id.clone(),
            status: campaign.status,
            stage: campaign.stage + 1,
            stages: campaign.stages,
            status_reason: campaign.status_reason.clone(),
            counts: by_state,
        }
    }
}

// ---- the actor -------------------------------------------------------------------------------

pub struct CampaignRunner {
    /// In a cluster one node drives the campaigns (stages, notifications, timeouts); every
    /// node records the reports of its own devices.
    leases: crate::cluster::leases::Leases,
    registry: RegistryStore,
    outbound: Arc<dyn DeviceOutbound>,
    shadows: Arc<dyn ShadowStore>,
    hub: DashboardHub,
    reports: Vec<JobReport>,
    requests: HashSet<(TenantId, DeviceId)>,
    cancelled: Vec<TellCancelled>,
    /// A pass is running; the next waits for it.
    busy: bool,
    /// Another pass was asked for while one ran.
    again: bool,
    /// Devices still owed to each rate-limited campaign (fractions carried between passes).
    allowance: HashMap<String, f64>,
    /// Counts last shown live per campaign, to send frames only on change.
    shown: HashMap<String, StateCounts>,
    /// What the last pass saw, and totals since the start (for `GET /admin/actors`).
    running: Vec<RunningCampaign>,
    driving: bool,
    passes: u64,
    last_pass: Option<Duration>,
    totals: PassFigures,
}

/// What passes did.
#[derive(Debug, Clone, Copy, Default)]
struct PassFigures {
    reports: u64,
    notified: u64,
    timed_out: u64,
}

impl CampaignRunner {
    pub fn new(
        registry: RegistryStore,
        outbound: Arc<dyn DeviceOutbound>,
        shadows: Arc<dyn ShadowStore>,
        hub: DashboardHub,
        leases: crate::cluster::leases::Leases,
    ) -> CampaignRunner {
        CampaignRunner {
            leases,
            registry,
            outbound,
            shadows,
            hub,
            reports: Vec::new(),
            requests: HashSet::new(),
            cancelled: Vec::new(),
            busy: false,
            again: false,
            allowance: HashMap::new(),
            shown: HashMap::new(),
            running: Vec::new(),
            driving: false,
            passes: 0,
            last_pass: None,
            totals: PassFigures::default(),
        }
    }

    fn run_pass(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            self.again = true;
            return;
        }
        self.busy = true;
        let work = Pass {
            leases: self.leases.clone(),
            registry: self.registry.clone(),
            outbound: self.outbound.clone(),
            shadows: self.shadows.clone(),
            reports: std::mem::take(&mut self.reports),
            requests: std::mem::take(&mut self.requests),
            cancelled: std::mem::take(&mut self.cancelled),
            allowance: std::mem::take(&mut self.allowance),
            figures: PassFigures::default(),
        };
        let started = std::time::Instant::now();
        ctx.spawn(work.run().into_actor(self).map(move |outcome, act, ctx| {
            act.busy = false;
            act.allowance = outcome.allowance;
            act.passes += 1;
            act.last_pass = Some(started.elapsed());
            act.running = outcome.running;
            act.driving = outcome.driving;
            act.totals.reports += outcome.figures.reports;
            act.totals.notified += outcome.figures.notified;
            act.totals.timed_out += outcome.figures.timed_out;
            for (campaign, counts) in outcome.progress {
                if act.shown.get(&campaign.id) != Some(&counts) {
                    let progress = CampaignProgress::of(&campaign, &counts);
                    act.hub.publish(
                        &campaign.tenant,
                        &LiveMessage::Campaign {
                            campaign: Box::new(progress),
                        },
                    );
                    act.shown.insert(campaign.id.clone(), counts);
                }
                if campaign.status.is_final() || campaign.status == CampaignStatus::Paused {
                    act.shown.remove(&campaign.id);
                }
            }
            if act.again {
                act.again = false;
                act.run_pass(ctx);
            }
        }));
    }
}

impl Actor for CampaignRunner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        ctx.run_interval(PASS_INTERVAL, |act, ctx| act.run_pass(ctx));
        tracing::info!("campaign runner started");
    }
}

impl Handler<ReportJob> for CampaignRunner {
    type Result = ();
    fn handle(&mut self, msg: ReportJob, _ctx: &mut Context<Self>) {
        self.reports.push(msg.report);
    }
}

impl Handler<RequestPendingJob> for CampaignRunner {
    type Result = ();
    fn handle(&mut self, msg: RequestPendingJob, _ctx: &mut Context<Self>) {
        self.requests.insert((msg.tenant, msg.device));
    }
}

impl Handler<Kick> for CampaignRunner {
    type Result = ();
    fn handle(&mut self, _msg: Kick, ctx: &mut Context<Self>) {
        self.run_pass(ctx);
    }
}

impl Handler<TellCancelled> for CampaignRunner {
    type Result = ();
    fn handle(&mut self, msg: TellCancelled, ctx: &mut Context<Self>) {
        self.cancelled.push(msg);
        self.run_pass(ctx);
    }
}

impl Handler<InspectRunner> for CampaignRunner {
    type Result = MessageResult<InspectRunner>;
    fn handle(&mut self, _msg: InspectRunner, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(RunnerSnapshot {
            running: self.running.clone(),
            driving: self.driving,
            queued_reports: self.reports.len(),
            queued_requests: self.requests.len(),
            mailbox: MAILBOX,
            busy: self.busy,
            passes: self.passes,
            last_pass_ms: self.last_pass.map(|d| d.as_millis() as u64),
            reports_recorded: self.totals.reports,
            devices_notified: self.totals.notified,
            devices_timed_out: self.totals.timed_out,
        })
    }
}

impl Handler<StopRunner> for CampaignRunner {
    type Result = ();
    fn handle(&mut self, _msg: StopRunner, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// The device actors' way to the runner.
#[derive(Clone)]
pub struct RunnerJobs {
    runner: Addr<CampaignRunner>,
}

impl RunnerJobs {
    pub fn new(runner: Addr<CampaignRunner>) -> RunnerJobs {
        RunnerJobs { runner }
    }
}

impl std::fmt::Debug for RunnerJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunnerJobs")
    }
}

impl DeviceJobs for RunnerJobs {
    fn report(&self, report: JobReport) -> Result<(), JobsBusy> {
        self.runner.try_send(ReportJob { report }).map_err(|_| JobsBusy)
    }

    fn request_pending(&self, tenant: &TenantId, device: &DeviceId) {
        // A lost request costs nothing: the device asks again when it reconnects.
        let _ = self.runner.try_send(RequestPendingJob {
            tenant: tenant.clone(),
            device: device.clone(),
        });
    }
}

// ---- one pass --------------------------------------------------------------------------------

struct Pass {
    leases: crate::cluster::leases::Leases,
    registry: RegistryStore,
    outbound: Arc<dyn DeviceOutbound>,
    shadows: Arc<dyn ShadowStore>,
    reports: Vec<JobReport>,
    requests: HashSet<(TenantId, DeviceId)>,
    cancelled: Vec<TellCancelled>,
    allowance: HashMap<String, f64>,
    figures: PassFigures,
}

struct PassOutcome {
    allowance: HashMap<String, f64>,
    progress: Vec<(CampaignRecord, StateCounts)>,
    running: Vec<RunningCampaign>,
    driving: bool,
    figures: PassFigures,
}

impl Pass {
    async fn run(mut self) -> PassOutcome {
        let mut touched: HashMap<String, TenantId> = HashMap::new();
        let running = match self.registry.running_campaigns().await {
            Ok(running) => running,
            Err(error) => {
                tracing::warn!(%error, "campaign runner: cannot read campaigns; retrying next pass");
                // Keep nothing: devices retry their reports (the ones not acknowledged).
                return PassOutcome {
                    allowance: self.allowance,
                    progress: Vec::new(),
                    running: Vec::new(),
                    driving: false,
                    figures: self.figures,
                };
            }
        };
        let reports = std::mem::take(&mut self.reports);
        match self.record_reports(reports, &running).await {
            Ok(campaigns) => touched.extend(campaigns),
            Err(error) => tracing::warn!(%error, "campaign runner: reports not recorded"),
        }
        for cancelled in std::mem::take(&mut self.cancelled) {
            for device in &cancelled.devices {
                let payload = serde_json::json!({"jobId": cancelled.campaign, "operation": "cancel"});
                self.outbound.publish(
                    &cancelled.tenant,
                    format!("devices/{device}/jobs/notify"),
                    Bytes::from(payload.to_string()),
                );
            }
        }
        // Without a running campaign no device has a job to get (the common case on a reconnect
        // storm): no registry read per request.
        let tenants: HashSet<TenantId> = running.iter().map(|c| c.tenant.clone()).collect();
        let requests = std::mem::take(&mut self.requests);
        for (tenant, device) in requests.into_iter().filter(|(t, _)| tenants.contains(t)) {
            match self.registry.pending_job(&tenant, &device).await {
                Ok(Some(job)) => {
                    let payload = job_notification(&job.campaign, &job.firmware);
                    self.outbound
                        .publish(&tenant, format!("devices/{device}/jobs/notify"), payload);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, %tenant, %device, "campaign runner: pending job not read")
                }
            }
        }
        let mut progress = Vec::new();
        let live: HashSet<String> = running.iter().map(|c| c.id.clone()).collect();
        self.allowance.retain(|id, _| live.contains(id));
        let seen: Vec<RunningCampaign> = running
            .iter()
            .map(|c| RunningCampaign {
                campaign: c.id.clone(),
                tenant: c.tenant.to_string(),
                stage: c.stage + 1,
                stages: c.stages,
            })
            .collect();
        let driving = self.leases.hold("campaign-runner").await;
        let running = if driving { running } else { Vec::new() };
        for campaign in running {
            match self.drive(campaign.clone()).await {
                Ok(Some(updated)) => progress.push(updated),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, campaign = %campaign.id, "campaign runner: pass failed; retrying next pass")
                }
            }
            touched.remove(&campaign.id);
        }
        // Paused or finished campaigns whose devices reported: their counts changed too.
        for (id, tenant) in touched {
            if let Ok(counts) = self.registry.campaign_counts(&id).await
                && let Ok(Some(campaign)) = self.registry.get_campaign(&tenant, &id).await
            {
                progress.push((campaign, counts));
            }
        }
        PassOutcome {
            allowance: self.allowance,
            progress,
            running: seen,
            driving,
            figures: self.figures,
        }
    }

    /// Turns reports into transitions (checking the shadow of those that say they succeeded)
    /// and records them in one transaction.
    async fn record_reports(
        &mut self,
        reports: Vec<JobReport>,
        running: &[CampaignRecord],
    ) -> Result<HashMap<String, TenantId>, crate::storage::StoreError> {
        if reports.is_empty() {
            return Ok(HashMap::new());
        }
        let tenants: HashMap<String, TenantId> = reports
            .iter()
            .map(|r| (r.job.clone(), r.tenant.clone()))
            .collect();
        let mut versions: HashMap<String, Option<String>> = running
            .iter()
            .map(|c| (c.id.clone(), Some(c.firmware_version.clone())))
            .collect();
        let mut transitions = Vec::with_capacity(reports.len());
        for report in reports {
            if !versions.contains_key(&report.job) {
                let version = self
                    .registry
                    .get_campaign(&report.tenant, &report.job)
                    .await?
                    .map(|c| c.firmware_version);
                versions.insert(report.job.clone(), version);
            }
            let Some(Some(version)) = versions.get(&report.job) else {
                tracing::debug!(tenant = %report.tenant, device = %report.device, job = %report.job, "report about an unknown job ignored");
                continue;
            };
            let from: Vec<JobState> = [JobState::Notified, JobState::InProgress, JobState::Verifying]
                .into_iter()
                .filter(|s| next_state(*s, report.status).is_some())
                .collect();
            let mut to = match report.status {
                ReportedStatus::InProgress => JobState::InProgress,
                ReportedStatus::Succeeded => JobState::Verifying,
                ReportedStatus::Failed => JobState::Failed,
                ReportedStatus::Rejected => JobState::Rejected,
            };
            if to == JobState::Verifying
                && self
                    .reports_version(&report.tenant, &report.device, version)
                    .await
            {
                to = JobState::Succeeded;
            }
            transitions.push(DeviceTransition {
                campaign: report.job,
                tenant: report.tenant,
                device: report.device,
                from,
                to,
                progress: report.progress,
                reason: report.reason,
                at: report.at,
            });
        }
        let recorded = transitions.len() as u64;
        let touched = self.registry.apply_transitions(transitions).await?;
        self.figures.reports += recorded;
        Ok(touched
            .into_iter()
            .filter_map(|id| tenants.get(&id).map(|t| (id, t.clone())))
            .collect())
    }

    /// Whether the device's reported shadow says it runs `version` (`firmware`).
    async fn reports_version(&self, tenant: &TenantId, device: &DeviceId, version: &str) -> bool {
        match self.shadows.load_shadow(tenant, device).await {
            Ok(Some(shadow)) => shadow
                .state
                .reported
                .get("firmware")
                .and_then(|v| v.as_str())
                .is_some_and(|v| v == version),
            _ => false,
        }
    }

    /// One running campaign: timeouts, verification, the stage's verdict, notifications.
    async fn drive(
        &mut self,
        mut campaign: CampaignRecord,
    ) -> Result<Option<(CampaignRecord, StateCounts)>, crate::storage::StoreError> {
        let plan = CampaignPlan::from_record(&campaign);
        let now = Utc::now();
        // Devices that held the job too long: past their deadline (the notification plus the
        // timeout, moved later by any time the campaign spent paused since).
        let late = self
            .registry
            .campaign_devices_due(&campaign.id, now, plan.timeout_secs, 10_000)
            .await?;
        if !late.is_empty() {
            self.figures.timed_out += late.len() as u64;
            let reason = format!("did not succeed within {} s", plan.timeout_secs);
            let transitions = late
                .into_iter()
                .filter_map(|d| DeviceId::parse(d).ok())
                .map(|device| DeviceTransition {
                    campaign: campaign.id.clone(),
                    tenant: campaign.tenant.clone(),
                    device,
                    from: vec![JobState::Notified, JobState::InProgress, JobState::Verifying],
                    to: JobState::TimedOut,
                    progress: None,
                    reason: Some(reason.clone()),
                    at: now,
                })
                .collect();
            self.registry.apply_transitions(transitions).await?;
        }
        // Devices that said they succeeded: does their shadow agree now?
        let verifying = self
            .registry
            .campaign_devices_in(&campaign.id, &[JobState::Verifying], None, MAX_VERIFIED_PER_PASS)
            .await?;
        let mut verified = Vec::new();
        for device in verifying.into_iter().filter_map(|d| DeviceId::parse(d).ok()) {
            if self
                .reports_version(&campaign.tenant, &device, &campaign.firmware_version)
                .await
            {
                verified.push(DeviceTransition {
                    campaign: campaign.id.clone(),
                    tenant: campaign.tenant.clone(),
                    device,
                    from: vec![JobState::Verifying],
                    to: JobState::Succeeded,
                    progress: Some(100),
                    reason: None,
                    at: now,
                });
            }
        }
        if !verified.is_empty() {
            self.registry.apply_transitions(verified).await?;
        }

        let mut counts = self.registry.campaign_counts(&campaign.id).await?;
        let mut decision = decide(
            campaign.stage as usize,
            campaign.stages as usize,
            &stage_counts(&counts, campaign.stage),
            &plan.failure_rule,
        );
        // Stages can pass at once (a stage whose devices were all skipped).
        while decision == StageDecision::Advance {
            let next = campaign.stage + 1;
            if !self.registry.advance_campaign(&campaign.id, next).await? {
                return Ok(None);
            }
            tracing::info!(campaign = %campaign.id, stage = next + 1, stages = campaign.stages, "campaign stage started");
            campaign.stage = next;
            decision = decide(
                campaign.stage as usize,
                campaign.stages as usize,
                &stage_counts(&counts, campaign.stage),
                &plan.failure_rule,
            );
        }
        let stop = match decision {
            StageDecision::Complete => Some((CampaignStatus::Completed, None, false)),
            StageDecision::Pause(why) => Some((CampaignStatus::Paused, Some(why), false)),
            StageDecision::Abort(why) => Some((CampaignStatus::Aborted, Some(why), true)),
            StageDecision::Continue | StageDecision::Advance => None,
        };
        if let Some((status, reason, cancel)) = stop {
            if let Some(why) = &reason {
                tracing::warn!(campaign = %campaign.id, %status, reason = %why, "campaign stopped by its failure rule");
            } else {
                tracing::info!(campaign = %campaign.id, "campaign completed");
            }
            let changed = self
                .registry
                .set_campaign_status(
                    &campaign.tenant,
                    &campaign.id,
                    &[CampaignStatus::Running],
                    status,
                    None,
                    reason,
                    false,
                    cancel,
                    AuditActor {
                        tenant: Some(campaign.tenant.clone()),
                        actor: "system:campaigns".into(),
                        source_ip: None,
                    },
                )
                .await?;
            if let Some((updated, told)) = changed {
                for device in told {
                    let payload = serde_json::json!({"jobId": updated.id, "operation": "cancel"});
                    self.outbound.publish(
                        &updated.tenant,
                        format!("devices/{device}/jobs/notify"),
                        Bytes::from(payload.to_string()),
                    );
                }
                let counts = self.registry.campaign_counts(&updated.id).await?;
                return Ok(Some((updated, counts)));
            }
            return Ok(None);
        }

        // Notify the next devices, within the rate and the window.
        let window_open = plan.maintenance_window.is_none_or(|w| w.contains(now));
        if window_open {
            let budget = match plan.rollout.max_per_minute.filter(|&n| n > 0) {
                Some(per_minute) => {
                    let owed = self.allowance.entry(campaign.id.clone()).or_insert(0.0);
                    *owed = (*owed + f64::from(per_minute) * PASS_INTERVAL.as_secs_f64() / 60.0)
                        .min(f64::from(per_minute.min(MAX_NOTIFIED_PER_PASS)));
                    let whole = owed.floor();
                    *owed -= whole;
                    whole as u32
                }
                None => MAX_NOTIFIED_PER_PASS,
            };
            if budget > 0 {
                let claimed = self
                    .registry
                    .claim_pending_devices(&campaign.id, campaign.stage, budget, plan.timeout_secs)
                    .await?;
                if !claimed.is_empty() {
                    self.figures.notified += claimed.len() as u64;
                    let firmware = self
                        .registry
                        .get_firmware(&campaign.tenant, &campaign.firmware_id)
                        .await?;
                    match firmware {
                        Some(firmware) => {
                            let payload = job_notification(&campaign, &firmware);
                            for device in &claimed {
                                self.outbound.publish(
                                    &campaign.tenant,
                                    format!("devices/{device}/jobs/notify"),
                                    payload.clone(),
                                );
                            }
                        }
                        None => tracing::warn!(campaign = %campaign.id, "the campaign's firmware is gone"),
                    }
                    counts = self.registry.campaign_counts(&campaign.id).await?;
                }
            }
        }
        Ok(Some((campaign, counts)))
    }
}
