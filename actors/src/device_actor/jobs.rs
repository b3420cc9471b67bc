//! The device's side of OTA jobs (AWS IoT Jobs' shape), in its actor.
//!
//! A device reports on `devices/{id}/jobs/{jobId}/update` and asks for its pending job on
//! `devices/{id}/jobs/get`; both arrive here as [`DeviceInbound`](super::DeviceInbound). The
//! payload is checked here (a bad one is refused to the device), then handed to the campaign
//! runner through [`DeviceJobs`] without waiting: the runner batches what it records. When
//! the device connects, the runner is asked to send it its pending job too, so a device that
//! was offline gets it without asking.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{DeviceActor, InboundAccepted, InboundError};
use crate::campaign::{JobReport, MAX_JOB_ID_BYTES, parse_job_update};
use crate::ids::{DeviceId, TenantId};

/// Where device actors hand job reports and requests (the campaign runner). Implementations
/// must not block: a full runner queue refuses, and the device is told to retry.
pub trait DeviceJobs: std::fmt::Debug + Send + Sync + 'static {
    /// A report about a job; `Err` when the runner cannot take it now.
    fn report(&self, report: JobReport) -> Result<(), JobsBusy>;
    /// The device asked for its pending job, or just connected: send it if it has one.
    fn request_pending(&self, tenant: &TenantId, device: &DeviceId);
}

/// The campaign runner's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobsBusy;

/// Takes nothing (tests, tools without campaigns).
#[derive(Debug)]
pub struct NoJobs;

impl DeviceJobs for NoJobs {
    fn report(&self, _: JobReport) -> Result<(), JobsBusy> {
        Ok(())
    }
    fn request_pending(&self, _: &TenantId, _: &DeviceId) {}
}

/// The default for actors started without a runner.
pub fn no_jobs() -> Arc<dyn DeviceJobs> {
    Arc::new(NoJobs)
}

impl DeviceActor {
    /// `devices/{id}/jobs/{job}/update`.
    pub(super) fn job_update(
        &mut self,
        job: &str,
        payload: &[u8],
        at: DateTime<Utc>,
    ) -> Result<InboundAccepted, InboundError> {
        self.inbound.jobs += 1;
        if job.is_empty() || job.len() > MAX_JOB_ID_BYTES {
            return Err(InboundError::Rejected {
                code: "invalid_job_id",
                message: format!("a job id is 1 to {MAX_JOB_ID_BYTES} bytes"),
            });
        }
        let (status, progress, reason) = parse_job_update(payload).map_err(|e| InboundError::Rejected {
            code: "invalid_job_update",
            message: e.to_string(),
        })?;
        let report = JobReport {
            tenant: self.tenant.clone(),
            device: self.device.clone(),
            job: job.to_string(),
            status,
            progress,
            reason,
            at,
        };
        self.jobs
            .report(report)
            .map(|()| InboundAccepted::default())
            .map_err(|JobsBusy| InboundError::Unavailable("the campaign runner is busy; retry".into()))
    }

    /// `devices/{id}/jobs/get`, or the device connected.
    pub(super) fn job_request(&mut self) {
        self.jobs.request_pending(&self.tenant, &self.device);
    }
}
