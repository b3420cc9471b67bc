//! Audit events that are not part of a registry change (refused credentials, forbidden
//! actions) are written off the request path through a bounded queue: a flood of bad requests
//! cannot slow the API down or grow memory, and what is dropped is counted in `/metrics`.
//! Changes themselves are audited inside their own transaction (see `storage::registry`).

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::{Notify, mpsc};

use crate::storage::RegistryStore;
use crate::storage::records::AuditEvent;

const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    dropped: IntCounter,
}

/// The task writing queued events; `finish` drains what is queued and waits for it.
pub struct AuditWriter {
    task: tokio::task::JoinHandle<()>,
    shutdown: Arc<Notify>,
}

impl AuditSink {
    /// Starts the writer task on the current runtime.
    pub fn start(registry: RegistryStore, dropped: IntCounter) -> (AuditSink, AuditWriter) {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(QUEUE);
        let shutdown = Arc::new(Notify::new());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(event) => write(&registry, event).await,
                        None => break,
                    },
                    _ = stop.notified() => {
                        while let Ok(event) = rx.try_recv() {
                            write(&registry, event).await;
                        }
                        break;
                    }
                }
            }
        });
        (AuditSink { tx, dropped }, AuditWriter { task, shutdown })
    }

    /// Queues an event; drops and counts it when the queue is full.
    pub fn submit(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }
}

impl AuditWriter {
    /// Writes what is queued, then stops (waits at most `timeout`).
    pub async fn finish(self, timeout: Duration) {
        self.shutdown.notify_one();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            tracing::warn!("audit writer did not finish in time; some denial records may be missing");
        }
    }
}

async fn write(registry: &RegistryStore, event: AuditEvent) {
    if let Err(error) = registry.record(event).await {
        tracing::warn!(%error, "could not write an audit record");
    }
}
