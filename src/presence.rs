//! Device connection status in the registry, written in batches.
//!
//! Device actors report every connect and disconnect here; a task coalesces the reports per
//! device and writes them in one transaction every [`FLUSH_EVERY`], so a connect storm of
//! thousands of devices costs a handful of writes. Each row records which node holds the
//! session, so a node that restarts clears only the devices it had connected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_actors::{DeviceId, PresenceSink, TenantId};
use tokio::sync::{Notify, mpsc};

use crate::storage::RegistryStore;
use crate::storage::records::Presence;

const FLUSH_EVERY: Duration = Duration::from_millis(200);

pub struct PresenceRecorder {
    tx: mpsc::UnboundedSender<Presence>,
}

/// The writing task; `finish` writes what is pending and waits for it.
pub struct PresenceWriter {
    task: tokio::task::JoinHandle<()>,
    shutdown: Arc<Notify>,
}

impl PresenceRecorder {
    pub fn start(registry: RegistryStore, node: String) -> (Arc<PresenceRecorder>, PresenceWriter) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Presence>();
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let mut pending: HashMap<(TenantId, DeviceId), Presence> = HashMap::new();
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            loop {
                tokio::select! {
                    report = rx.recv() => match report {
                        Some(p) => { pending.insert((p.tenant.clone(), p.device.clone()), p); }
                        None => break,
                    },
                    _ = tick.tick() => flush(&registry, &node, &mut pending).await,
                    _ = stop.notified() => {
                        while let Ok(p) = rx.try_recv() {
                            pending.insert((p.tenant.clone(), p.device.clone()), p);
                        }
                        break;
                    }
                }
            }
            flush(&registry, &node, &mut pending).await;
        });
        (
            Arc::new(PresenceRecorder { tx }),
            PresenceWriter { task, shutdown },
        )
    }
}

async fn flush(registry: &RegistryStore, node: &str, pending: &mut HashMap<(TenantId, DeviceId), Presence>) {
    if pending.is_empty() {
        return;
    }
    let batch: Vec<Presence> = pending.values().cloned().collect();
    match registry.record_presence(node, batch).await {
        Ok(()) => pending.clear(),
        // Kept for the next tick; newer reports for the same device replace these.
        Err(error) => {
            tracing::warn!(%error, devices = pending.len(), "could not record device presence; will retry")
        }
    }
}

impl PresenceSink for PresenceRecorder {
    fn connection_changed(&self, tenant: &TenantId, device: &DeviceId, connected: bool, at: DateTime<Utc>) {
        let _ = self.tx.send(Presence {
            tenant: tenant.clone(),
            device: device.clone(),
            connected,
            at,
        });
    }
}

impl PresenceWriter {
    pub async fn finish(self, timeout: Duration) {
        self.shutdown.notify_one();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!("presence writer did not finish in time");
        }
    }
}
