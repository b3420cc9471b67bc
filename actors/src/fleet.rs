//! `Fleet`: the root of the actor tree. Finds (and lazily starts) each tenant's supervisor.
//!
//! Tenant supervisors run on a small set of dedicated arbiters (threads), a tenant always on the
//! same one, so a tenant's device actors share a thread with their supervisor and talk to it
//! without crossing threads. `Fleet` is cheap to clone and can be used from any thread.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use actix::prelude::*;

use crate::device_actor::DeviceActor;
use crate::directory::{DeviceDirectory, DirectoryError};
use crate::ids::{DeviceId, TenantId};
use crate::presence::PresenceSink;
use crate::tenant_supervisor::{
    InspectTenant, LookupDevice, StopDevice, SupervisorSettings, TenantSnapshot, TenantSupervisor,
};

/// A lookup through the actor tree failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("tenant supervisor unavailable: {0}")]
    Mailbox(#[from] MailboxError),
}

#[derive(Clone)]
pub struct Fleet {
    inner: Arc<FleetInner>,
}

struct FleetInner {
    directory: Arc<dyn DeviceDirectory>,
    presence: Arc<dyn PresenceSink>,
    settings: SupervisorSettings,
    arbiters: Mutex<Vec<Arbiter>>,
    handles: Vec<ArbiterHandle>,
    tenants: Mutex<HashMap<TenantId, Addr<TenantSupervisor>>>,
}

impl Fleet {
    /// Starts `threads` arbiters for the actor tree. Must be called inside a running actix system.
    pub fn start(
        directory: Arc<dyn DeviceDirectory>,
        presence: Arc<dyn PresenceSink>,
        settings: SupervisorSettings,
        threads: usize,
    ) -> Fleet {
        let arbiters: Vec<Arbiter> = (0..threads.max(1)).map(|_| Arbiter::new()).collect();
        let handles = arbiters.iter().map(Arbiter::handle).collect();
        Fleet {
            inner: Arc::new(FleetInner {
                directory,
                presence,
                settings,
                arbiters: Mutex::new(arbiters),
                handles,
                tenants: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The tenant's supervisor, started on first use and started again if it has died.
    pub fn tenant(&self, tenant: &TenantId) -> Addr<TenantSupervisor> {
        let mut tenants = self.inner.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(addr) = tenants.get(tenant).filter(|a| a.connected()) {
            return addr.clone();
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        tenant.hash(&mut hasher);
        let arbiter = &self.inner.handles[hasher.finish() as usize % self.inner.handles.len()];
        let (id, directory, presence, settings) = (
            tenant.clone(),
            self.inner.directory.clone(),
            self.inner.presence.clone(),
            self.inner.settings.clone(),
        );
        let addr = TenantSupervisor::start_in_arbiter(arbiter, move |_ctx| {
            TenantSupervisor::new(id, directory, presence, settings)
        });
        tenants.insert(tenant.clone(), addr.clone());
        addr
    }

    /// The actor of a registered device, started if needed; `None` when the tenant has no such device.
    pub async fn device(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Addr<DeviceActor>>, LookupError> {
        let found = self
            .tenant(tenant)
            .send(LookupDevice {
                device: device.clone(),
            })
            .await??;
        Ok(found)
    }

    /// Stops a device's actor if it runs (after the device was deleted or disabled).
    pub async fn stop_device(&self, tenant: &TenantId, device: &DeviceId) -> Result<bool, LookupError> {
        let existing = self.running_tenant(tenant);
        match existing {
            Some(addr) => Ok(addr
                .send(StopDevice {
                    device: device.clone(),
                })
                .await?),
            None => Ok(false),
        }
    }

    /// Tells the running device actors of `tenant` that a device type's schema changed.
    pub fn device_type_changed(&self, tenant: &TenantId, device_type: &str) {
        if let Some(addr) = self.running_tenant(tenant) {
            addr.do_send(crate::device_actor::DeviceTypeChanged {
                device_type: device_type.to_string(),
            });
        }
    }

    fn running_tenant(&self, tenant: &TenantId) -> Option<Addr<TenantSupervisor>> {
        let tenants = self.inner.tenants.lock().unwrap_or_else(|e| e.into_inner());
        tenants.get(tenant).filter(|a| a.connected()).cloned()
    }

    /// Snapshots of every running tenant supervisor.
    pub async fn inspect(&self) -> Vec<TenantSnapshot> {
        let supervisors: Vec<Addr<TenantSupervisor>> = {
            let tenants = self.inner.tenants.lock().unwrap_or_else(|e| e.into_inner());
            tenants.values().cloned().collect()
        };
        let mut out = Vec::with_capacity(supervisors.len());
        for addr in supervisors {
            if let Ok(snapshot) = addr.send(InspectTenant {}).await {
                out.push(snapshot);
            }
        }
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }

    /// Telemetry messages each running device actor of `tenant` took in (empty when the
    /// tenant has no supervisor running).
    pub async fn sample_activity(&self, tenant: &TenantId) -> crate::tenant_supervisor::ActivitySample {
        match self.running_tenant(tenant) {
            Some(addr) => addr
                .send(crate::tenant_supervisor::SampleActivity {})
                .await
                .unwrap_or_default(),
            None => Default::default(),
        }
    }

    /// Stops the arbiters, which drops every actor on them. Idempotent.
    pub fn shutdown(&self) {
        let arbiters = std::mem::take(&mut *self.inner.arbiters.lock().unwrap_or_else(|e| e.into_inner()));
        self.inner
            .tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for arbiter in arbiters {
            arbiter.stop();
            let _ = arbiter.join();
        }
    }
}
