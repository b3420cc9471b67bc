//! Commands with responses, the adapter half: records each command in the registry (the
//! device's command history), hands it to the device's actor (which publishes it and
//! correlates the answer, see `drover_actors::device_actor::commands`), and records the
//! outcome. The HTTP API, batch jobs and the rules' `mqttCommand` action all send through
//! [`CommandService::send`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::Utc;
use drover_actors::device_actor::commands::{
    CommandDispatch, CommandOutcome, CommandRefusal, CommandRequest, SendCommand,
};
use drover_actors::{DeviceId, Fleet, TenantId};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::storage::commands::{CommandEnd, CommandRecord, CommandStatus};
use crate::storage::{RegistryStore, StoreError};

/// Longest a caller may wait for an answer.
pub const MAX_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Longest a command may wait for an offline device.
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// Largest command payload (its JSON text).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub name: String,
    pub payload: Value,
    pub timeout: Duration,
    /// Keep the command this long for an offline device; `None`: refuse an offline device.
    pub queue_ttl: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(String),
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    #[error("device {0} is offline")]
    DeviceOffline(DeviceId),
    #[error("device {device} already has {waiting} commands waiting")]
    Busy { device: DeviceId, waiting: usize },
    #[error("device actors: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A command handed over: its record as it stood right after, and the outcome to come.
pub struct CommandTicket {
    pub record: CommandRecord,
    /// Resolves once the outcome is recorded, with the final record.
    pub finished: oneshot::Receiver<CommandRecord>,
}

/// Checks a command name: it becomes a topic level.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("name: 1 to 64 characters".into());
    }
    if name.contains(['/', '+', '#', '\0']) || name.starts_with('$') {
        return Err("name: no `/`, `+`, `#`, NUL, nor a leading `$`".into());
    }
    Ok(())
}

impl CommandSpec {
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name)?;
        if self.payload.to_string().len() > MAX_PAYLOAD_BYTES {
            return Err(format!("payload: at most {MAX_PAYLOAD_BYTES} bytes of JSON"));
        }
        let timeout = self.timeout.as_secs();
        if timeout == 0 || timeout > MAX_TIMEOUT_SECS {
            return Err(format!("timeoutSecs: 1 to {MAX_TIMEOUT_SECS}"));
        }
        if let Some(ttl) = self.queue_ttl
            && (ttl.as_secs() == 0 || ttl.as_secs() > MAX_TTL_SECS)
        {
            return Err(format!("ttlSecs: 1 to {MAX_TTL_SECS}"));
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct CommandService {
    registry: RegistryStore,
    fleet: Fleet,
}

impl CommandService {
    pub fn new(registry: RegistryStore, fleet: Fleet) -> CommandService {
        CommandService { registry, fleet }
    }

    /// Records the command and hands it to the device's actor. Offline without a time to live
    /// is refused (and recorded as undelivered, so the history shows the attempt).
    pub async fn send(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        spec: CommandSpec,
        requested_by: String,
    ) -> Result<CommandTicket, CommandError> {
        spec.validate().map_err(CommandError::Invalid)?;
        let actor = self
            .fleet
            .device(tenant, device)
            .await
            .map_err(|e| CommandError::Unavailable(e.to_string()))?
            .ok_or_else(|| CommandError::DeviceNotFound(device.clone()))?;
        let now = Utc::now();
        let mut record = CommandRecord {
            id: uuid::Uuid::now_v7().to_string(),
            tenant: tenant.clone(),
            device: device.clone(),
            name: spec.name.clone(),
            payload: spec.payload.clone(),
            status: CommandStatus::Pending,
            response: None,
            response_status: None,
            error: None,
            timeout_secs: spec.timeout.as_secs(),
            expires_at: spec
                .queue_ttl
                .and_then(|ttl| chrono::Duration::from_std(ttl).ok())
                .map(|ttl| now + ttl),
            requested_by,
            created_at: now,
            sent_at: None,
            completed_at: None,
        };
        self.registry.insert_command(record.clone()).await?;
        self.dispatch(actor, record.clone(), spec)
            .await
            .map(|(status, sent_at, finished)| {
                record.status = status;
                record.sent_at = sent_at;
                CommandTicket { record, finished }
            })
    }

    async fn dispatch(
        &self,
        actor: actix::Addr<drover_actors::DeviceActor>,
        record: CommandRecord,
        spec: CommandSpec,
    ) -> Result<
        (
            CommandStatus,
            Option<chrono::DateTime<Utc>>,
            oneshot::Receiver<CommandRecord>,
        ),
        CommandError,
    > {
        let (done_tx, done_rx) = oneshot::channel();
        let request = CommandRequest {
            id: record.id.clone(),
            name: spec.name,
            payload: spec.payload,
            timeout: spec.timeout,
            queue_for: spec.queue_ttl,
        };
        let reply = actor
            .send(SendCommand {
                request,
                done: done_tx,
            })
            .await;
        let refused = |status: CommandStatus, why: String| CommandEnd {
            status,
            response: None,
            response_status: None,
            error: Some(why),
            sent_at: None,
        };
        let (status, sent_at) = match reply {
            Ok(Ok(CommandDispatch::Sent { at })) => (CommandStatus::Sent, Some(at)),
            Ok(Ok(CommandDispatch::Queued)) => (CommandStatus::Queued, None),
            Ok(Err(refusal)) => {
                let error = match refusal {
                    CommandRefusal::DeviceOffline => CommandError::DeviceOffline(record.device.clone()),
                    CommandRefusal::Busy(waiting) => CommandError::Busy {
                        device: record.device.clone(),
                        waiting,
                    },
                };
                self.registry
                    .command_finished(
                        record.id.clone(),
                        refused(CommandStatus::Undelivered, error.to_string()),
                    )
                    .await?;
                return Err(error);
            }
            Err(mailbox) => {
                let why = format!("device actor: {mailbox}");
                self.registry
                    .command_finished(
                        record.id.clone(),
                        refused(CommandStatus::Undelivered, why.clone()),
                    )
                    .await?;
                return Err(CommandError::Unavailable(why));
            }
        };
        self.registry
            .command_dispatched(record.id.clone(), status, sent_at)
            .await?;
        let (finished_tx, finished_rx) = oneshot::channel();
        let registry = self.registry.clone();
        // The outcome is recorded whether or not anyone still waits for it.
        actix_rt::spawn(async move {
            let outcome = done_rx.await.unwrap_or(CommandOutcome::Abandoned);
            let end = end_of(outcome);
            let id = record.id.clone();
            if let Err(error) = registry.command_finished(id.clone(), end).await {
                tracing::warn!(command = %id, %error, "could not record a command's outcome");
            }
            if let Ok(Some(final_record)) = registry.get_command(&record.tenant, &id).await {
                let _ = finished_tx.send(final_record);
            }
        });
        Ok((status, sent_at, finished_rx))
    }

    /// Hands the commands that were queued when the server stopped to their devices again.
    pub async fn resume_queued(&self) -> Result<usize, StoreError> {
        let records = self.registry.reopen_commands().await?;
        let count = records.len();
        for record in records {
            let remaining = record
                .expires_at
                .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::from_secs(1)))
                .unwrap_or(Duration::from_secs(1));
            let spec = CommandSpec {
                name: record.name.clone(),
                payload: record.payload.clone(),
                timeout: Duration::from_secs(record.timeout_secs.max(1)),
                queue_ttl: Some(remaining.max(Duration::from_secs(1))),
            };
            let actor = match self.fleet.device(&record.tenant, &record.device).await {
                Ok(Some(actor)) => actor,
                _ => {
                    let end = CommandEnd {
                        status: CommandStatus::Undelivered,
                        response: None,
                        response_status: None,
                        error: Some("the device is no longer registered".into()),
                        sent_at: None,
                    };
                    self.registry.command_finished(record.id.clone(), end).await?;
                    continue;
                }
            };
            if let Err(error) = self.dispatch(actor, record.clone(), spec).await {
                tracing::warn!(command = %record.id, %error, "queued command not resumed");
            }
        }
        Ok(count)
    }
}

fn end_of(outcome: CommandOutcome) -> CommandEnd {
    match outcome {
        CommandOutcome::Answered {
            status,
            payload,
            sent_at,
            ..
        } => CommandEnd {
            status: if status < 400 {
                CommandStatus::Succeeded
            } else {
                CommandStatus::Failed
            },
            response: Some(payload),
            response_status: Some(status),
            error: None,
            sent_at,
        },
        CommandOutcome::TimedOut { sent_at } => CommandEnd {
            status: CommandStatus::TimedOut,
            response: None,
            response_status: None,
            error: Some("no answer within the timeout".into()),
            sent_at,
        },
        CommandOutcome::Expired => CommandEnd {
            status: CommandStatus::Expired,
            response: None,
            response_status: None,
            error: Some("the device did not come back within the time to live".into()),
            sent_at: None,
        },
        CommandOutcome::Abandoned => CommandEnd {
            status: CommandStatus::Undelivered,
            response: None,
            response_status: None,
            error: Some("the device's actor stopped (device deleted or disabled, or shutdown)".into()),
            sent_at: None,
        },
    }
}

/// The command service for parts started before it (the rules engine starts before the
/// fleet): attached once the fleet runs; a use before that fails and is retried by the caller.
#[derive(Default)]
pub struct LateCommands {
    service: OnceLock<CommandService>,
}

impl LateCommands {
    pub fn attach(&self, service: CommandService) {
        let _ = self.service.set(service);
    }

    pub fn get(&self) -> Option<&CommandService> {
        self.service.get()
    }
}

pub type SharedLateCommands = Arc<LateCommands>;
