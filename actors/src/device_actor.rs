//! `DeviceActor`: the single owner of one device's live state.
//!
//! Everything about a device that changes at run time (connection status, shadow, command
//! correlation, OTA progress) is changed by this actor and nobody else. It is started by its
//! tenant's [`TenantSupervisor`](crate::TenantSupervisor), rebuilds its state from the registry
//! when it starts, and tells the supervisor when it goes away, however it goes (including a
//! panic in a handler), so the supervisor can restart it.

use std::sync::Arc;

use actix::WeakRecipient;
use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::device::DeviceRecord;
use crate::directory::DeviceDirectory;
use crate::ids::{DeviceId, TenantId};

// ---- messages received -------------------------------------------------------------------

/// Returns a snapshot of the actor's state.
#[derive(Message)]
#[rtype(result = "DeviceSnapshot")]
pub struct GetDeviceState {}

/// Stops the actor on purpose (device deleted, idle, shutdown); it is not restarted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {}

/// Makes the actor's handler panic, so tests can exercise supervision.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash {}

// ---- messages sent -------------------------------------------------------------------------

/// Why a device actor went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Stopped on purpose; do not restart.
    Stopped,
    /// The device is no longer registered; do not restart.
    Unregistered,
    /// Panicked or could not load its state; restart.
    Failed,
}

/// Sent to the supervisor when a device actor is gone.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeviceActorExited {
    pub device: DeviceId,
    pub generation: u64,
    pub reason: ExitReason,
}

// ---- state -------------------------------------------------------------------------------

/// What `GetDeviceState` returns.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSnapshot {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub record: Option<DeviceRecord>,
    pub started_at: DateTime<Utc>,
    pub messages_handled: u64,
    pub generation: u64,
}

/// Sends [`DeviceActorExited`] from `Drop`, which also runs when a handler panics and the
/// actor's task is torn down. The reason starts as `Failed` and only the deliberate stop paths
/// change it: actix calls `stopped()` even while unwinding from a panic, so that hook cannot
/// tell a failure from an orderly stop.
struct ExitNotice {
    supervisor: WeakRecipient<DeviceActorExited>,
    device: DeviceId,
    generation: u64,
    reason: ExitReason,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.upgrade() {
            supervisor.do_send(DeviceActorExited {
                device: self.device.clone(),
                generation: self.generation,
                reason: self.reason,
            });
        }
    }
}

/// How a device actor is set up by its supervisor.
pub struct DeviceActorSpec {
    pub tenant: TenantId,
    pub device: DeviceId,
    /// The record when the supervisor has just read it; `None` makes the actor load it.
    pub record: Option<DeviceRecord>,
    pub directory: Arc<dyn DeviceDirectory>,
    pub supervisor: WeakRecipient<DeviceActorExited>,
    pub generation: u64,
    pub mailbox_capacity: usize,
}

pub struct DeviceActor {
    tenant: TenantId,
    device: DeviceId,
    record: Option<DeviceRecord>,
    directory: Arc<dyn DeviceDirectory>,
    mailbox_capacity: usize,
    started_at: DateTime<Utc>,
    messages_handled: u64,
    exit: ExitNotice,
}

impl DeviceActor {
    pub fn new(spec: DeviceActorSpec) -> Self {
        DeviceActor {
            exit: ExitNotice {
                supervisor: spec.supervisor,
                device: spec.device.clone(),
                generation: spec.generation,
                reason: ExitReason::Failed,
            },
            tenant: spec.tenant,
            device: spec.device,
            record: spec.record,
            directory: spec.directory,
            mailbox_capacity: spec.mailbox_capacity,
            started_at: Utc::now(),
            messages_handled: 0,
        }
    }

    fn load_record(&mut self, ctx: &mut Context<Self>) {
        let directory = self.directory.clone();
        let (tenant, device) = (self.tenant.clone(), self.device.clone());
        // `wait` holds the mailbox until the state is loaded, so no message sees a half-built actor.
        ctx.wait(
            async move { directory.find_device(&tenant, &device).await }
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(Some(record)) => act.record = Some(record),
                    Ok(None) => {
                        tracing::info!(tenant = %act.tenant, device = %act.device, "device no longer registered; stopping its actor");
                        act.exit.reason = ExitReason::Unregistered;
                        ctx.stop();
                    }
                    Err(error) => {
                        tracing::warn!(tenant = %act.tenant, device = %act.device, %error, "device actor could not load its state");
                        act.exit.reason = ExitReason::Failed;
                        ctx.terminate();
                    }
                }),
        );
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
        if self.record.is_none() {
            self.load_record(ctx);
        }
    }
}

impl Handler<GetDeviceState> for DeviceActor {
    type Result = MessageResult<GetDeviceState>;

    fn handle(&mut self, _msg: GetDeviceState, _ctx: &mut Context<Self>) -> Self::Result {
        self.messages_handled += 1;
        MessageResult(DeviceSnapshot {
            tenant: self.tenant.clone(),
            device: self.device.clone(),
            record: self.record.clone(),
            started_at: self.started_at,
            messages_handled: self.messages_handled,
            generation: self.exit.generation,
        })
    }
}

impl Handler<Shutdown> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Context<Self>) {
        self.exit.reason = ExitReason::Stopped;
        ctx.stop();
    }
}

#[cfg(test)]
impl Handler<Crash> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _msg: Crash, _ctx: &mut Context<Self>) {
        panic!("injected device actor failure");
    }
}
