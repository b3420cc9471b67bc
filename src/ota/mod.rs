//! Fleet operations, OTA half: the firmware registry and OTA campaigns (adapter side).
//!
//! - [`images`]: image bytes under the data directory, streamed in and out (HTTP Range).
//! - [`signing`]: the Ed25519 key signing firmware manifests.
//! - [`firmware`]: registering an uploaded image (semver, manifest, signature, record).
//! - [`campaigns`]: creating campaigns and rollbacks ([`campaigns::create_campaign`] is the
//!   entry point for other features, such as batch jobs' `update_firmware`).
//! - [`runner`]: the `CampaignRunner` actor that drives running campaigns.
//!
//! The domain half — job states, stage planning, failure rules — is `drover_actors::campaign`;
//! the device's side of the MQTT protocol is `drover_actors::device_actor::jobs`. HTTP lives in
//! `crate::http::firmware` and `crate::http::campaigns`.

pub mod campaigns;
pub mod firmware;
pub mod images;
pub mod launcher;
pub mod runner;
pub mod signing;

use std::sync::Arc;

use actix::{Actor, Addr};
use drover_actors::{DeviceOutbound, ShadowStore};

use crate::config::Config;
use crate::dashboard::DashboardHub;
use crate::storage::{RegistryStore, StoreError};

pub use campaigns::{CampaignSpec, CampaignTarget, create_campaign};

/// What the API and the device actors share for OTA.
pub struct Ota {
    pub files: images::FirmwareFiles,
    pub signer: signing::ManifestSigner,
    pub runner: Addr<runner::CampaignRunner>,
    /// Largest image accepted, in bytes.
    pub max_image_bytes: u64,
    /// One permit per download being served.
    pub download_slots: Arc<tokio::sync::Semaphore>,
}

impl Ota {
    /// Loads the signing key and starts the campaign runner (inside an actix system).
    pub fn start(
        config: &Config,
        registry: RegistryStore,
        outbound: Arc<dyn DeviceOutbound>,
        shadows: Arc<dyn ShadowStore>,
        hub: DashboardHub,
        leases: crate::cluster::leases::Leases,
    ) -> Result<Ota, signing::SigningKeyError> {
        let signer = signing::ManifestSigner::load_or_create(config)?;
        let runner = runner::CampaignRunner::new(registry, outbound, shadows, hub, leases).start();
        Ok(Ota {
            files: images::FirmwareFiles::new(&config.storage.data_dir),
            signer,
            runner,
            max_image_bytes: config.firmware.max_image_bytes,
            download_slots: Arc::new(tokio::sync::Semaphore::new(
                config.firmware.max_concurrent_downloads,
            )),
        })
    }

    /// What device actors hand job reports to.
    pub fn device_jobs(&self) -> Arc<dyn drover_actors::device_actor::jobs::DeviceJobs> {
        Arc::new(runner::RunnerJobs::new(self.runner.clone()))
    }

    pub fn stop(&self) {
        self.runner.do_send(runner::StopRunner {});
    }
}

/// Why an OTA operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("version {0:?} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.4.2)")]
    BadVersion(String),
    #[error("no firmware {0} in this tenant")]
    UnknownFirmware(String),
    #[error("unknown devices: {}", .0.join(", "))]
    UnknownDevices(Vec<String>),
    #[error("the target matches no device")]
    EmptyTarget,
    #[error("no targeted device is of a type the firmware fits ({0})")]
    NoDeviceFits(String),
    #[error("the target matches more than {0} devices")]
    TooManyDevices(usize),
    #[error("the campaign has no rollback firmware; give firmwareId")]
    NoRollbackFirmware,
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl OtaError {
    pub fn invalid(field: &'static str, message: impl std::fmt::Display) -> OtaError {
        OtaError::Invalid {
            field,
            message: message.to_string(),
        }
    }
}

impl From<OtaError> for crate::http::error::ApiError {
    fn from(error: OtaError) -> Self {
        use actix_web::http::StatusCode;

        use crate::http::error::ApiError;
        let message = error.to_string();
        match error {
            OtaError::Invalid { .. } => ApiError::bad_request("validation_failed", message),
            OtaError::BadVersion(_) => ApiError::bad_request("invalid_version", message),
            OtaError::UnknownFirmware(_) => ApiError::bad_request("unknown_firmware", message),
            OtaError::UnknownDevices(_) => ApiError::bad_request("unknown_device", message),
            OtaError::EmptyTarget => ApiError::bad_request("empty_target", message),
            OtaError::NoDeviceFits(_) => ApiError::bad_request("no_device_fits", message),
            OtaError::TooManyDevices(_) => ApiError::bad_request("too_many_devices", message),
            OtaError::NoRollbackFirmware => ApiError::bad_request("no_rollback_firmware", message),
            OtaError::Image(images::ImageError::TooLarge { .. }) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
            }
            OtaError::Image(images::ImageError::Io(e)) => {
                tracing::error!(error = %e, "firmware storage");
                ApiError::internal("firmware storage failed")
            }
            OtaError::Store(e) => e.into(),
            OtaError::Internal(m) => {
                tracing::error!(message = %m, "ota");
                ApiError::internal("internal error")
            }
        }
    }
}
