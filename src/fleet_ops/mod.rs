//! Fleet operations over many devices: batch jobs (`POST /api/devices/batch`), commands with
//! responses (`POST /api/devices/{id}/commands`), and what they share. Dynamic groups live in
//! the registry's device filter (`storage::registry`), so every caller that filters devices
//! (device lists, rule scopes, batch jobs, campaign targets) follows them.
//!
//! The domain halves are in `drover_actors`: `job_actor` (the job runner) and
//! `device_actor::commands` (command correlation in each device's actor).

pub mod commands;
pub mod jobs;

use std::sync::Arc;

use actix::Actor;
use drover_actors::job_actor::{JobActor, JobLease, JobSettings};

use crate::rules::crypto::SecretBox;
use crate::storage::jobs::RegistryJobStore;
use commands::CommandService;
use jobs::{JobService, OperationContext, OperationExecutor};

/// What the API uses of fleet operations.
pub struct FleetOps {
    pub commands: CommandService,
    pub jobs: JobService,
    /// Seals the secrets jobs produce (rotated tokens) until their creator collects them.
    pub secrets: SecretBox,
}

impl FleetOps {
    /// Starts the job runner (which resumes the jobs that were running) and hands the
    /// commands that were queued when the server stopped to their devices again.
    /// `lease` decides which node runs a job (every job on a single node).
    pub fn start(ctx: OperationContext, secret_key: &str, lease: Arc<dyn JobLease>) -> FleetOps {
        let secrets = SecretBox::from_passphrase(secret_key);
        let sealer = secrets.clone();
        let store = RegistryJobStore {
            registry: ctx.registry.clone(),
            seal: Arc::new(move |plain: &str| sealer.seal(plain)),
        };
        let commands = ctx.commands.clone();
        let registry = ctx.registry.clone();
        let runner = JobActor::new(
            Arc::new(store),
            Arc::new(OperationExecutor { ctx }),
            lease,
            JobSettings::default(),
        )
        .start();
        let resume = commands.clone();
        actix_rt::spawn(async move {
            match resume.resume_queued().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(commands = n, "queued commands handed to their devices again"),
                Err(error) => tracing::warn!(%error, "could not resume queued commands"),
            }
        });
        FleetOps {
            commands,
            jobs: JobService::new(registry, runner),
            secrets,
        }
    }
}
