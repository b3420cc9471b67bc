//! `TenantSupervisor`: starts, finds, restarts and stops the device actors of one tenant.
//!
//! Device actors are started lazily, the first time something needs a device (a connection, an
//! ingestion, an API call), after checking that the device is registered. When a device actor
//! fails (its handler panicked or it could not load its state) the supervisor starts a new one,
//! which rebuilds its state from storage; failures in quick succession are spaced out with an
//! exponential backoff so a broken registry is not hammered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::device_actor::{
    DeviceActor, DeviceActorExited, DeviceActorSpec, DeviceTypeChanged, ExitReason, Shutdown,
};
use crate::directory::{DeviceDirectory, DirectoryError};
use crate::ids::{DeviceId, TenantId};
use crate::outbound::ShadowServices;
use crate::pipeline::Pipeline;
use crate::presence::PresenceSink;

// ---- messages received -------------------------------------------------------------------

/// Finds the actor of a registered device, starting it if needed. `Ok(None)` when the device
/// is not registered in this tenant.
#[derive(Message)]
#[rtype(result = "Result<Option<Addr<DeviceActor>>, DirectoryError>")]
pub struct LookupDevice {
    pub device: DeviceId,
}

/// Stops a device's actor if it runs (the device was deleted or disabled). Returns whether one ran.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct StopDevice {
    pub device: DeviceId,
}

/// Lists the running device actors, for inspection.
#[derive(Message)]
#[rtype(result = "TenantSnapshot")]
pub struct InspectTenant {}

/// Asks every running device actor of the tenant how many telemetry messages it took in
/// (for ranking devices by message rate; off the ingestion path: one small message each).
#[derive(Message)]
#[rtype(result = "ActivitySample")]
pub struct SampleActivity {}

/// Telemetry messages taken in by each running device actor since it started, with the
/// generation of the actor (a restarted actor counts from zero again).
#[derive(Debug, Clone, Default)]
pub struct ActivitySample {
    pub devices: Vec<(DeviceId, u64, u64)>,
}

// ---- state -------------------------------------------------------------------------------

/// One supervised device actor, as `InspectTenant` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChildInfo {
    pub device: DeviceId,
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    pub restarts: u32,
    pub mailbox_capacity: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantSnapshot {
    pub tenant: TenantId,
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    pub devices: Vec<ChildInfo>,
    pub restarts_total: u64,
}

struct Child {
    addr: Addr<DeviceActor>,
    generation: u64,
    started_at: DateTime<Utc>,
    restarts: u32,
    /// Failures close together, for the restart backoff.
    recent_failures: u32,
    last_failure: Option<Instant>,
}

/// Tuning of the supervisor and the actors it starts.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub device_mailbox_capacity: usize,
    /// Payload rules and where accepted telemetry goes.
    pub pipeline: Arc<Pipeline>,
    /// First restart delay after a failure that follows another one closely.
    pub restart_backoff_base: Duration,
    pub restart_backoff_max: Duration,
    /// A device actor with no connection and no message for this long stops (`None`: never).
    pub device_idle_timeout: Option<Duration>,
    /// Where device actors keep their shadows and how they announce changes: one for all the
    /// tenant's device actors.
    pub shadows: Arc<ShadowServices>,
    /// Where device actors hand OTA job reports (the campaign runner).
    pub jobs: Arc<dyn crate::device_actor::jobs::DeviceJobs>,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        SupervisorSettings {
            device_mailbox_capacity: 256,
            pipeline: Arc::new(Pipeline::default()),
            restart_backoff_base: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(30),
            device_idle_timeout: None,
            shadows: Arc::default(),
            jobs: crate::device_actor::jobs::no_jobs(),
        }
    }
}

pub struct TenantSupervisor {
    tenant: TenantId,
    directory: Arc<dyn DeviceDirectory>,
    presence: Arc<dyn PresenceSink>,
    settings: SupervisorSettings,
    children: HashMap<DeviceId, Child>,
    next_generation: u64,
    restarts_total: u64,
    started_at: DateTime<Utc>,
}

impl TenantSupervisor {
    pub fn new(
        tenant: TenantId,
        directory: Arc<dyn DeviceDirectory>,
        presence: Arc<dyn PresenceSink>,
        settings: SupervisorSettings,
    ) -> Self {
        TenantSupervisor {
            tenant,
            directory,
            presence,
            settings,
            children: HashMap::new(),
            next_generation: 0,
            restarts_total: 0,
            started_at: Utc::now(),
        }
    }

    fn start_child(
        &mut self,
        device: DeviceId,
        record: Option<crate::DeviceRecord>,
        ctx: &mut Context<Self>,
    ) -> Addr<DeviceActor> {
        self.next_generation += 1;
        let spec = DeviceActorSpec {
            tenant: self.tenant.clone(),
            device,
            record,
            directory: self.directory.clone(),
            presence: self.presence.clone(),
            pipeline: self.settings.pipeline.clone(),
            supervisor: ctx.address().downgrade().recipient(),
            generation: self.next_generation,
            mailbox_capacity: self.settings.device_mailbox_capacity,
            idle_timeout: self.settings.device_idle_timeout,
            shadows: self.settings.shadows.clone(),
            jobs: self.settings.jobs.clone(),
        };
        DeviceActor::new(spec).start()
    }

    fn running(&self, device: &DeviceId) -> Option<Addr<DeviceActor>> {
        self.children
            .get(device)
            .filter(|child| child.addr.connected())
            .map(|child| child.addr.clone())
    }

    /// Restart delay for a child that has failed `recent_failures` times in quick succession.
    fn backoff(&self, recent_failures: u32) -> Duration {
        if recent_failures <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (recent_failures - 2).min(16);
        (self.settings.restart_backoff_base * factor).min(self.settings.restart_backoff_max)
    }

    fn restart(&mut self, device: DeviceId, ctx: &mut Context<Self>) {
        // The child may have been stopped or replaced while the restart was pending.
        let Some(child) = self.children.get(&device) else {
            return;
        };
        if child.addr.connected() {
            return;
        }
        let addr = self.start_child(device.clone(), None, ctx);
        let generation = self.next_generation;
        if let Some(child) = self.children.get_mut(&device) {
            child.addr = addr;
            child.generation = generation;
            child.started_at = Utc::now();
        }
    }
}

impl Actor for TenantSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Context<Self>) {
        tracing::debug!(tenant = %self.tenant, "tenant supervisor started");
    }

    fn stopping(&mut self, _ctx: &mut Context<Self>) -> Running {
        for child in self.children.values() {
            child.addr.do_send(Shutdown {});
        }
        Running::Stop
    }
}

impl Handler<LookupDevice> for TenantSupervisor {
    type Result = ResponseActFuture<Self, Result<Option<Addr<DeviceActor>>, DirectoryError>>;

    fn handle(&mut self, msg: LookupDevice, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(addr) = self.running(&msg.device) {
            return Box::pin(fut::ready(Ok(Some(addr))));
        }
        let directory = self.directory.clone();
        let tenant = self.tenant.clone();
        let device = msg.device;
        Box::pin(
            async move {
                let record = directory.find_device(&tenant, &device).await?;
                Ok((device, record))
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                let (device, record) = result?;
                let Some(record) = record else { return Ok(None) };
                // Another lookup may have started it while the registry was being read.
                if let Some(addr) = act.running(&device) {
                    return Ok(Some(addr));
                }
                let addr = act.start_child(device.clone(), Some(record), ctx);
                let generation = act.next_generation;
                let restarts = act.children.get(&device).map_or(0, |c| c.restarts);
                act.children.insert(
                    device,
                    Child {
                        addr: addr.clone(),
                        generation,
                        started_at: Utc::now(),
                        restarts,
                        recent_failures: 0,
                        last_failure: None,
                    },
                );
                Ok(Some(addr))
            }),
        )
    }
}

impl Handler<DeviceTypeChanged> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, msg: DeviceTypeChanged, _ctx: &mut Context<Self>) {
        for child in self.children.values() {
            child.addr.do_send(msg.clone());
        }
    }
}

impl Handler<StopDevice> for TenantSupervisor {
    type Result = bool;

    fn handle(&mut self, msg: StopDevice, _ctx: &mut Context<Self>) -> bool {
        match self.children.remove(&msg.device) {
            Some(child) => {
                child.addr.do_send(Shutdown {});
                true
            }
            None => false,
        }
    }
}

impl Handler<DeviceActorExited> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, msg: DeviceActorExited, ctx: &mut Context<Self>) {
        let Some(child) = self.children.get_mut(&msg.device) else {
            return;
        };
        if child.generation != msg.generation {
            return; // an older incarnation; the current one is fine
        }
        match msg.reason {
            ExitReason::Stopped | ExitReason::Unregistered => {
                self.children.remove(&msg.device);
            }
            ExitReason::Failed => {
                let now = Instant::now();
                let close = child
                    .last_failure
                    .is_some_and(|at| now.duration_since(at) < Duration::from_secs(10));
                child.recent_failures = if close { child.recent_failures + 1 } else { 1 };
                child.last_failure = Some(now);
                child.restarts += 1;
                let (recent, restarts) = (child.recent_failures, child.restarts);
                self.restarts_total += 1;
                let delay = self.backoff(recent);
                tracing::warn!(tenant = %self.tenant, device = %msg.device, restarts, ?delay, "device actor failed; restarting");
                let device = msg.device;
                if delay.is_zero() {
                    self.restart(device, ctx);
                } else {
                    ctx.run_later(delay, move |act, ctx| act.restart(device, ctx));
                }
            }
        }
    }
}

impl Handler<InspectTenant> for TenantSupervisor {
    type Result = MessageResult<InspectTenant>;

    fn handle(&mut self, _msg: InspectTenant, _ctx: &mut Context<Self>) -> Self::Result {
        let mut devices: Vec<ChildInfo> = self
            .children
            .iter()
            .map(|(device, child)| ChildInfo {
                device: device.clone(),
                started_at: child.started_at,
                restarts: child.restarts,
                mailbox_capacity: self.settings.device_mailbox_capacity,
            })
            .collect();
        devices.sort_by(|a, b| a.device.cmp(&b.device));
        MessageResult(TenantSnapshot {
            tenant: self.tenant.clone(),
            started_at: self.started_at,
            devices,
            restarts_total: self.restarts_total,
        })
    }
}

impl Handler<SampleActivity> for TenantSupervisor {
    type Result = ResponseFuture<ActivitySample>;

    fn handle(&mut self, _msg: SampleActivity, _ctx: &mut Context<Self>) -> Self::Result {
        // `send` queues each request at once, so the actors answer concurrently.
        let asked: Vec<_> = self
            .children
            .iter()
            .map(|(device, child)| {
                (
                    device.clone(),
                    child.generation,
                    child.addr.send(crate::device_actor::GetTelemetryCount {}),
                )
            })
            .collect();
        Box::pin(async move {
            let mut devices = Vec::with_capacity(asked.len());
            for (device, generation, answer) in asked {
                if let Ok(count) = answer.await {
                    devices.push((device, generation, count));
                }
            }
            ActivitySample { devices }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::DeviceRecord;
    use crate::device_actor::{Crash, GetDeviceState};

    #[derive(Default)]
    struct MemoryDirectory {
        devices: Mutex<HashMap<(TenantId, DeviceId), DeviceRecord>>,
        reads: Mutex<u32>,
    }

    impl MemoryDirectory {
        fn with(tenant: &str, device: &str) -> Arc<Self> {
            let dir = Arc::new(MemoryDirectory::default());
            let now = Utc::now();
            let record = DeviceRecord {
                tenant: TenantId::parse(tenant).unwrap(),
                id: DeviceId::parse(device).unwrap(),
                device_type: "temperature".into(),
                metadata: Default::default(),
                tags: vec![],
                groups: vec![],
                enabled: true,
                connected: false,
                last_seen_at: None,
                created_at: now,
                updated_at: now,
            };
            dir.devices
                .lock()
                .unwrap()
                .insert((record.tenant.clone(), record.id.clone()), record);
            dir
        }
    }

    #[async_trait]
    impl DeviceDirectory for MemoryDirectory {
        async fn find_device(
            &self,
            tenant: &TenantId,
            device: &DeviceId,
        ) -> Result<Option<DeviceRecord>, DirectoryError> {
            *self.reads.lock().unwrap() += 1;
            Ok(self
                .devices
                .lock()
                .unwrap()
                .get(&(tenant.clone(), device.clone()))
                .cloned())
        }
    }

    fn supervisor(dir: Arc<MemoryDirectory>) -> Addr<TenantSupervisor> {
        TenantSupervisor::new(
            TenantId::parse("acme").unwrap(),
            dir,
            Arc::new(crate::NoPresence),
            SupervisorSettings::default(),
        )
        .start()
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[actix_rt::test]
    async fn registered_device_is_found_and_started_once() {
        let dir = MemoryDirectory::with("acme", "sensor-001");
        let sup = supervisor(dir.clone());
        let a = sup
            .send(LookupDevice {
                device: id("sensor-001"),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let b = sup
            .send(LookupDevice {
                device: id("sensor-001"),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(a, b);
        let state = a.send(GetDeviceState {}).await.unwrap();
        assert_eq!(state.record.unwrap().device_type, "temperature");
        assert_eq!(
            *dir.reads.lock().unwrap(),
            1,
            "the record read by the lookup is handed over"
        );
    }

    #[actix_rt::test]
    async fn unknown_device_and_other_tenant_are_not_found() {
        let dir = MemoryDirectory::with("other", "sensor-001");
        let sup = supervisor(dir);
        assert!(
            sup.send(LookupDevice {
                device: id("sensor-001")
            })
            .await
            .unwrap()
            .unwrap()
            .is_none()
        );
        assert!(
            sup.send(LookupDevice { device: id("nope") })
                .await
                .unwrap()
                .unwrap()
                .is_none()
        );
        let snapshot = sup.send(InspectTenant {}).await.unwrap();
        assert!(snapshot.devices.is_empty());
    }

    #[actix_rt::test]
    async fn failed_device_actor_is_restarted_with_its_state() {
        let dir = MemoryDirectory::with("acme", "sensor-001");
        let sup = supervisor(dir.clone());
        let first = sup
            .send(LookupDevice {
                device: id("sensor-001"),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let _ = first.send(Crash {}).await; // the handler panics; the reply channel is dropped

        let deadline = Instant::now() + Duration::from_secs(5);
        let second = loop {
            let snapshot = sup.send(InspectTenant {}).await.unwrap();
            if snapshot.restarts_total == 1 {
                let addr = sup
                    .send(LookupDevice {
                        device: id("sensor-001"),
                    })
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                if addr.connected() {
                    break addr;
                }
            }
            assert!(Instant::now() < deadline, "device actor was not restarted");
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(!first.connected());
        let state = second.send(GetDeviceState {}).await.unwrap();
        assert_eq!(
            state.record.unwrap().id.as_str(),
            "sensor-001",
            "state rebuilt from the directory"
        );
        assert_eq!(state.generation, 2);
        let snapshot = sup.send(InspectTenant {}).await.unwrap();
        assert_eq!(snapshot.devices[0].restarts, 1);
    }

    #[actix_rt::test]
    async fn stopped_device_is_not_restarted() {
        let dir = MemoryDirectory::with("acme", "sensor-001");
        let sup = supervisor(dir);
        let addr = sup
            .send(LookupDevice {
                device: id("sensor-001"),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            sup.send(StopDevice {
                device: id("sensor-001")
            })
            .await
            .unwrap()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while addr.connected() {
            assert!(Instant::now() < deadline, "device actor did not stop");
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        let snapshot = sup.send(InspectTenant {}).await.unwrap();
        assert!(snapshot.devices.is_empty());
        assert_eq!(snapshot.restarts_total, 0);
    }

    /// Records what device actors publish.
    #[derive(Default)]
    struct CaptureOutbound {
        published: Mutex<Vec<(String, serde_json::Value)>>,
    }

    impl crate::outbound::DeviceOutbound for CaptureOutbound {
        fn publish(&self, _tenant: &TenantId, topic: String, payload: bytes::Bytes) {
            let value = serde_json::from_slice(&payload).unwrap();
            self.published.lock().unwrap().push((topic, value));
        }
    }

    #[actix_rt::test]
    async fn shadow_survives_a_crash_and_updates_are_announced() {
        use crate::device_actor::{PendingShadowDelta, ShadowAction, ShadowRequest};

        let dir = MemoryDirectory::with("acme", "sensor-001");
        let outbound = Arc::new(CaptureOutbound::default());
        let settings = SupervisorSettings {
            shadows: Arc::new(crate::ShadowServices {
                outbound: outbound.clone(),
                ..Default::default()
            }),
            ..SupervisorSettings::default()
        };
        let sup = TenantSupervisor::new(
            TenantId::parse("acme").unwrap(),
            dir,
            Arc::new(crate::NoPresence),
            settings,
        )
        .start();
        let lookup = || async {
            sup.send(LookupDevice {
                device: id("sensor-001"),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        };
        let first = lookup().await;
        let get = ShadowRequest {
            action: ShadowAction::Get,
            at: Utc::now(),
        };
        assert_eq!(first.send(get).await.unwrap(), Err(crate::ShadowError::NotFound));
        let accepted = first
            .send(ShadowRequest {
                action: ShadowAction::Update {
                    payload: r#"{"state": {"desired": {"led": "on"}}, "clientToken": "t1"}"#.into(),
                },
                at: Utc::now(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(accepted["version"], 1);
        assert_eq!(accepted["clientToken"], "t1");
        let topics: Vec<String> = outbound
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect();
        assert_eq!(
            topics,
            [
                "devices/sensor-001/shadow/update/accepted",
                "devices/sensor-001/shadow/update/documents",
                "devices/sensor-001/shadow/update/delta"
            ]
        );
        // A refused API update is answered to the caller, not published.
        let conflict = first
            .send(ShadowRequest {
                action: ShadowAction::Update {
                    payload: r#"{"state": {"desired": {"led": "off"}}, "version": 7}"#.into(),
                },
                at: Utc::now(),
            })
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(conflict.code(), "version_conflict");
        assert_eq!(outbound.published.lock().unwrap().len(), 3);

        let _ = first.send(Crash {}).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let second = loop {
            let addr = lookup().await;
            if addr != first && addr.connected() {
                break addr;
            }
            assert!(Instant::now() < deadline, "device actor was not restarted");
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        };
        let view = second
            .send(ShadowRequest {
                action: ShadowAction::Get,
                at: Utc::now(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(view["version"], 1);
        assert_eq!(view["state"]["desired"], serde_json::json!({"led": "on"}));
        assert_eq!(view["state"]["delta"], serde_json::json!({"led": "on"}));
        let pending = second.send(PendingShadowDelta {}).await.unwrap().unwrap();
        let pending: serde_json::Value = serde_json::from_slice(&pending).unwrap();
        assert_eq!(pending["state"], serde_json::json!({"led": "on"}));
    }

    /// Keeps the telemetry events it observes.
    struct CaptureObserver(Arc<Mutex<Vec<crate::pipeline::TelemetryAccepted>>>);

    impl Actor for CaptureObserver {
        type Context = Context<Self>;
    }

    impl Handler<crate::pipeline::ObservedTelemetry> for CaptureObserver {
        type Result = ();

        fn handle(&mut self, msg: crate::pipeline::ObservedTelemetry, _ctx: &mut Context<Self>) {
            self.0.lock().unwrap().extend(msg.events);
        }
    }

    #[actix_rt::test]
    async fn telemetry_observers_see_the_shadow_state() {
        use crate::device_actor::{DeviceInbound, InboundKind, ShadowAction, ShadowRequest};

        let seen = Arc::new(Mutex::new(Vec::new()));
        let observer = CaptureObserver(seen.clone()).start();
        let settings = SupervisorSettings {
            pipeline: Arc::new(crate::pipeline::Pipeline::default().with_observer(
                observer.recipient(),
                16,
                || {},
            )),
            ..SupervisorSettings::default()
        };
        let sup = TenantSupervisor::new(
            TenantId::parse("acme").unwrap(),
            MemoryDirectory::with("acme", "sensor-001"),
            Arc::new(crate::NoPresence),
            settings,
        )
        .start();
        let device = sup
            .send(LookupDevice {
                device: id("sensor-001"),
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let telemetry = || DeviceInbound {
            kind: InboundKind::Telemetry,
            payload: r#"{"metrics": {"temperature": 21.5}}"#.into(),
            at: Utc::now(),
            backpressure: crate::telemetry_writer::Backpressure::Wait,
        };
        device.send(telemetry()).await.unwrap().unwrap();
        device
            .send(ShadowRequest {
                action: ShadowAction::Update {
                    payload: r#"{"state": {"desired": {"target": 20}, "reported": {"target": 18}}}"#.into(),
                },
                at: Utc::now(),
            })
            .await
            .unwrap()
            .unwrap();
        device.send(telemetry()).await.unwrap().unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "observer did not get both events");
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = seen.lock().unwrap();
        assert!(seen[0].shadow.is_none(), "no shadow before the first update");
        assert_eq!(
            seen[1].shadow.as_deref(),
            Some(&serde_json::json!({"desired": {"target": 20}, "reported": {"target": 18}}))
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let dir = MemoryDirectory::with("acme", "d");
        let sup = TenantSupervisor::new(
            TenantId::parse("acme").unwrap(),
            dir,
            Arc::new(crate::NoPresence),
            SupervisorSettings::default(),
        );
        assert_eq!(sup.backoff(1), Duration::ZERO);
        assert_eq!(sup.backoff(2), Duration::from_millis(100));
        assert_eq!(sup.backoff(3), Duration::from_millis(200));
        assert_eq!(sup.backoff(40), Duration::from_secs(30));
    }
}
