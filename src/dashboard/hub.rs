//! `DashboardHub`: where live events are published for the `/ws` sessions.
//!
//! Alarms (opening, escalating, clearing) go through a broadcast channel every session of the
//! tenant reads. Telemetry is far more: a session receives only the devices it subscribed to
//! (or its whole tenant when it asked for `*`), through a bounded channel of its own that device
//! actors fill directly (see [`LiveTelemetry`]) and its socket empties (see
//! [`super::socket::LiveBody`]). Either way a session that falls behind skips
//! events (it is told how many) rather than holding memory for them or slowing ingestion.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use drover_actors::pipeline::LiveTelemetry;
use drover_actors::telemetry::{MetricValue, TelemetryPoint};
use drover_actors::{DeviceId, TenantId};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::rules::view::AlarmView;

/// Telemetry frames a session may have waiting before it misses some.
const TELEMETRY_BACKLOG: usize = 1024;
/// Bytes of telemetry frames a session may have waiting before it misses some: large batches
/// would otherwise let a client that never reads hold up to 1,024 of them (about 1 GB).
/// A single frame larger than this is still queued when nothing else waits.
pub const TELEMETRY_BACKLOG_BYTES: usize = 4 * 1024 * 1024;

/// Hands a tenant-wide frame (alarm, analytics event, campaign progress; tenant, JSON) to the
/// other nodes of a cluster.
pub type EventTap = Box<dyn Fn(&TenantId, &Arc<str>) + Send + Sync>;

#[derive(Default)]
struct TapSlot(std::sync::OnceLock<EventTap>);

impl std::fmt::Debug for TapSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "EventTap(set)"
        } else {
            "EventTap(none)"
        })
    }
}

/// What the live stream carries (one JSON text frame each).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum LiveMessage<'a> {
    /// Sent first, once: the stream is open, and whose it is (README, "Live telemetry").
    Hello { tenant: String },
    /// An alarm changed: `event` is opened, updated, escalated, acknowledged or cleared.
    Alarm {
        event: &'static str,
        alarm: Box<AlarmView>,
    },
    /// A message of a watched device: its points grouped by timestamp.
    #[serde(rename_all = "camelCase")]
    Telemetry {
        device_id: &'a str,
        device_type: &'a str,
        messages: Vec<LiveReading<'a>>,
    },
    /// What the session watches now (the answer to subscribe and unsubscribe).
    #[serde(rename_all = "camelCase")]
    Subscribed { all: bool, devices: Vec<String> },
    /// A request of the session was refused.
    Error {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        devices: Vec<String>,
    },
    /// A live analytics event (README, "Analytics"): `event` is `anomaly` or `drift`.
    #[serde(rename_all = "camelCase")]
    Analytics {
        event: &'static str,
        device_id: &'a str,
        /// Milliseconds since the Unix epoch of the message that raised it.
        ts: i64,
        method: &'static str,
        score: f64,
        statistic: f64,
        metrics: &'a [String],
        value: Option<f64>,
    },
    /// An OTA campaign's progress changed (status, stage or counts per job state).
    Campaign {
        campaign: Box<crate::ota::runner::CampaignProgress>,
    },
    /// The session fell behind and missed `missed` events of `stream` (`alarms` or `telemetry`).
    Lagged { stream: &'static str, missed: u64 },
}

/// One timestamp of a live telemetry message.
#[derive(Debug, Clone, Serialize)]
pub struct LiveReading<'a> {
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    pub metrics: BTreeMap<&'a str, &'a MetricValue>,
}

/// One event of one tenant, serialised once for every session.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub tenant: TenantId,
    pub json: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct DashboardHub {
    sender: broadcast::Sender<LiveEvent>,
    watchers: Arc<Watchers>,
    /// Where tenant-wide frames also go in a cluster (the other nodes' sessions).
    event_tap: Arc<TapSlot>,
    sessions: Arc<Sessions>,
    activity: Arc<super::activity::ActivityRanker>,
}

/// The live `/ws` session actors, registered while they run.
#[derive(Debug, Default)]
struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<SessionStats>>>,
}

/// What one session actor shares about itself: written by the actor, read by the inspector.
#[derive(Debug)]
pub struct SessionStats {
    pub id: u64,
    pub tenant: TenantId,
    /// Who opened it (`user:<name>` or `key:<id>`).
    pub principal: String,
    pub started: std::time::Instant,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub frames_sent: AtomicU64,
    /// Frames the session missed because it fell behind (telemetry and alarms).
    pub frames_skipped: AtomicU64,
    /// Subscribe and unsubscribe requests handled.
    pub requests: AtomicU64,
    pub watching_all: std::sync::atomic::AtomicBool,
    pub watched_devices: AtomicUsize,
    /// Bytes of telemetry frames waiting to be sent (its telemetry backlog).
    pub queued_bytes: Arc<AtomicUsize>,
}

impl SessionStats {
    fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            id: self.id,
            tenant: self.tenant.to_string(),
            principal: self.principal.clone(),
            started_at: self.started_at,
            age_seconds: self.started.elapsed().as_secs(),
            subscriptions: SessionSubscriptions {
                all: self.watching_all.load(Ordering::Relaxed),
                devices: self.watched_devices.load(Ordering::Relaxed),
            },
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            frames_skipped: self.frames_skipped.load(Ordering::Relaxed),
            requests_handled: self.requests.load(Ordering::Relaxed),
            queued_bytes: self.queued_bytes.load(Ordering::Relaxed),
        }
    }
}

/// One `/ws` session actor as `GET /admin/actors` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSnapshot {
    pub id: u64,
    pub tenant: String,
    pub principal: String,
    #[serde(serialize_with = "drover_actors::clock::rfc3339_ms")]
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub age_seconds: u64,
    pub subscriptions: SessionSubscriptions,
    pub frames_sent: u64,
    pub frames_skipped: u64,
    pub requests_handled: u64,
    /// Bytes of telemetry waiting to be sent (at most 4 MiB).
    pub queued_bytes: usize,
}

/// What a session watches: the whole tenant, and how many devices by name.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSubscriptions {
    pub all: bool,
    pub devices: usize,
}

/// Who watches which devices' telemetry, per tenant.
#[derive(Debug, Default)]
struct Watchers {
    /// Watch entries in all tenants: device actors skip the lock while it is 0.
    entries: AtomicUsize,
    next_session: AtomicU64,
    tenants: RwLock<HashMap<TenantId, TenantWatchers>>,
}

#[derive(Debug, Default)]
struct TenantWatchers {
    /// Sessions watching every device of the tenant.
    all: Vec<Watcher>,
    devices: HashMap<DeviceId, Vec<Watcher>>,
}

impl TenantWatchers {
    fn is_empty(&self) -> bool {
        self.all.is_empty() && self.devices.is_empty()
    }
}

#[derive(Debug, Clone)]
struct Watcher {
    session: u64,
    frames: mpsc::Sender<Arc<str>>,
    missed: Arc<AtomicU64>,
    /// Bytes of the frames waiting in `frames`.
    queued: Arc<AtomicUsize>,
}

impl Watcher {
    /// Queues `frame` unless the session's backlog is full (by count or by bytes); a frame
    /// that does not fit is counted as missed.
    fn offer(&self, frame: &Arc<str>) {
        let size = frame.len();
        let reserved = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued == 0 || queued + size <= TELEMETRY_BACKLOG_BYTES).then_some(queued + size)
            })
            .is_ok();
        if !reserved {
            self.missed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(refused) = self.frames.try_send(frame.clone()) {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            if let mpsc::error::TrySendError::Full(_) = refused {
                self.missed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What one session watches (its frames arrive through the [`TelemetryFrames`] that came
/// with it).
#[derive(Debug)]
pub struct TelemetryWatch {
    hub: DashboardHub,
    tenant: TenantId,
    watcher: Watcher,
    all: bool,
    devices: BTreeSet<DeviceId>,
}

/// The telemetry frames of one session's [`TelemetryWatch`], oldest first (the session's
/// socket takes them directly, see [`super::socket::LiveBody`]).
#[derive(Debug)]
pub struct TelemetryFrames {
    frames: mpsc::Receiver<Arc<str>>,
    queued: Arc<AtomicUsize>,
    missed: Arc<AtomicU64>,
}

impl TelemetryFrames {
    /// The next telemetry frame for the session (cancel-safe).
    pub async fn next_frame(&mut self) -> Option<Arc<str>> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    pub fn poll_frame(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Arc<str>>> {
        self.frames.poll_recv(cx).map(|frame| {
            if let Some(frame) = &frame {
                self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
            }
            frame
        })
    }

    /// The next telemetry frame if one is waiting now; unlike [`TelemetryFrames::poll_frame`]
    /// it leaves no waker behind, so the device actors queueing frames wake nobody.
    pub fn try_frame(&mut self) -> Option<Arc<str>> {
        let frame = self.frames.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    /// Frames missed since the last call (the session was too slow for them).
    pub fn take_missed(&self) -> u64 {
        self.missed.swap(0, Ordering::Relaxed)
    }
}

/// What a session may watch at once (besides `*`).
pub const MAX_WATCHED_DEVICES: usize = 1000;

impl Default for DashboardHub {
    fn default() -> Self {
        DashboardHub::new(4096)
    }
}

impl DashboardHub {
    pub fn new(capacity: usize) -> DashboardHub {
        DashboardHub {
            sender: broadcast::channel(capacity).0,
            watchers: Arc::default(),
            event_tap: Arc::default(),
            sessions: Arc::default(),
            activity: Arc::default(),
        }
    }

    /// Sends tenant-wide frames to `tap` too (once, when a cluster node joins).
    pub fn set_event_tap(&self, tap: EventTap) {
        let _ = self.event_tap.0.set(tap);
    }

    /// An event another node published, for this node's sessions.
    pub fn publish_json(&self, tenant: &TenantId, json: Arc<str>) {
        if self.sender.receiver_count() > 0 {
            let _ = self.sender.send(LiveEvent {
                tenant: tenant.clone(),
                json,
            });
        }
    }

    /// Tenants whose telemetry some session of this node watches.
    pub fn watched_tenants(&self) -> Vec<TenantId> {
        let tenants = self.watchers.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants
            .iter()
            .filter(|(_, w)| !w.all.is_empty() || !w.devices.is_empty())
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// A session's telemetry subscription, watching nothing yet, and where its frames arrive.
    pub fn telemetry_watch(&self, tenant: &TenantId) -> (TelemetryWatch, TelemetryFrames) {
        let (tx, rx) = mpsc::channel(TELEMETRY_BACKLOG);
        let queued: Arc<AtomicUsize> = Arc::default();
        let missed: Arc<AtomicU64> = Arc::default();
        let watch = TelemetryWatch {
            hub: self.clone(),
            tenant: tenant.clone(),
            watcher: Watcher {
                session: self.watchers.next_session.fetch_add(1, Ordering::Relaxed),
                frames: tx,
                missed: missed.clone(),
                queued: queued.clone(),
            },
            all: false,
            devices: BTreeSet::new(),
        };
        let frames = TelemetryFrames {
            frames: rx,
            queued,
            missed,
        };
        (watch, frames)
    }

    /// The figures of a new session (registered by [`DashboardHub::session_started`]).
    pub fn session_stats(&self, watch: &TelemetryWatch, principal: String) -> Arc<SessionStats> {
        let tenant = &watch.tenant;
        Arc::new(SessionStats {
            id: self.sessions.next.fetch_add(1, Ordering::Relaxed) + 1,
            tenant: tenant.clone(),
            principal,
            started: std::time::Instant::now(),
            started_at: chrono::Utc::now(),
            frames_sent: AtomicU64::new(0),
            frames_skipped: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            watching_all: std::sync::atomic::AtomicBool::new(false),
            watched_devices: AtomicUsize::new(0),
            queued_bytes: watch.watcher.queued.clone(),
        })
    }

    /// Registers a live session (its actor calls this when it starts and
    /// [`DashboardHub::session_ended`] when it stops), for `GET /admin/actors`.
    pub fn session_started(&self, stats: &Arc<SessionStats>) {
        self.sessions
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(stats.id, stats.clone());
    }

    /// Forgets a session registered by [`DashboardHub::session_started`].
    pub fn session_ended(&self, id: u64) {
        self.sessions
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// The live sessions, oldest first (`tenant`: only that tenant's).
    pub fn session_snapshots(&self, tenant: Option<&TenantId>) -> Vec<SessionSnapshot> {
        let live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SessionSnapshot> = live
            .values()
            .filter(|s| tenant.is_none_or(|t| *t == s.tenant))
            .map(|s| s.snapshot())
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Which devices of a tenant sent the most telemetry lately (the overview's ranking).
    pub fn activity(&self) -> &super::activity::ActivityRanker {
        &self.activity
    }

    /// Sessions watching telemetry, and their watch entries (devices, or `*`).
    pub fn telemetry_watchers(&self) -> usize {
        self.watchers.entries.load(Ordering::Relaxed)
    }

    fn tenants(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TenantId, TenantWatchers>> {
        self.watchers.tenants.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A tenant-wide frame (alarm, analytics event, campaign progress) for every session of the
    /// tenant, on this node and, in a cluster, on the others.
    pub fn publish(&self, tenant: &TenantId, message: &LiveMessage<'_>) {
        let tap = self.event_tap.0.get();
        if self.sender.receiver_count() == 0 && tap.is_none() {
            return;
        }
        if let Ok(json) = serde_json::to_string(message) {
            let json: Arc<str> = json.into();
            if let Some(tap) = tap {
                tap(tenant, &json);
            }
            self.publish_json(tenant, json);
        }
    }

    pub fn alarm(&self, event: &'static str, alarm: AlarmView) {
        let tenant = alarm.tenant.clone();
        self.publish(
            &tenant,
            &LiveMessage::Alarm {
                event,
                alarm: Box::new(alarm),
            },
        );
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }

    pub fn sessions(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl LiveTelemetry for DashboardHub {
    fn watching(&self, tenant: &TenantId, device: &DeviceId) -> bool {
        if self.watchers.entries.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let tenants = self.watchers.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants
            .get(tenant)
            .is_some_and(|w| !w.all.is_empty() || w.devices.contains_key(device))
    }

    fn show(&self, tenant: &TenantId, device: &DeviceId, device_type: &str, points: &[TelemetryPoint]) {
        let tenants = self.watchers.tenants.read().unwrap_or_else(|e| e.into_inner());
        let Some(watchers) = tenants.get(tenant) else {
            return;
        };
        let mut targets = watchers
            .all
            .iter()
            .chain(watchers.devices.get(device).into_iter().flatten())
            .peekable();
        if targets.peek().is_none() {
            return;
        }
        let Some(frame) = telemetry_frame(device, device_type, points) else {
            return;
        };
        // Offering takes no lock and never waits: it is done under the read lock.
        for watcher in targets {
            watcher.offer(&frame);
        }
    }
}

/// Points of a message up to which [`telemetry_frame`] writes the frame itself; a larger batch
/// goes through [`telemetry_message`] (grouping by timestamp and ordering metrics by name cost
/// the direct writer quadratic time).
const DIRECT_FRAME_POINTS: usize = 32;

thread_local! {
    /// The frame being written, reused from message to message on the device actors' threads.
    static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A message's telemetry frame, the JSON text of [`LiveMessage::Telemetry`]: for the messages a
/// device usually sends (a few metrics), written straight into a buffer this thread reuses, with
/// no grouping map or reading list built first; the one allocation left is the frame the
/// sessions share. Byte for byte what serialising [`telemetry_message`] gives.
fn telemetry_frame(device: &DeviceId, device_type: &str, points: &[TelemetryPoint]) -> Option<Arc<str>> {
    if points.len() > DIRECT_FRAME_POINTS {
        return serde_json::to_string(&telemetry_message(device, device_type, points))
            .ok()
            .map(Arc::from);
    }
    FRAME.with(|frame| {
        let mut buf = frame.borrow_mut();
        buf.clear();
        write_telemetry_frame(&mut buf, device.as_str(), device_type, points).ok()?;
        // Keep the thread's buffer at a usual frame's size after a large one.
        let frame = std::str::from_utf8(&buf).ok().map(Arc::from);
        buf.shrink_to(4096);
        frame
    })
}

fn write_telemetry_frame(
    buf: &mut Vec<u8>,
    device: &str,
    device_type: &str,
    points: &[TelemetryPoint],
) -> serde_json::Result<()> {
    buf.extend_from_slice(br#"{"type":"telemetry","deviceId":"#);
    serde_json::to_writer(&mut *buf, device)?;
    buf.extend_from_slice(br#","deviceType":"#);
    serde_json::to_writer(&mut *buf, device_type)?;
    buf.extend_from_slice(br#","messages":["#);
    for (i, point) in points.iter().enumerate() {
        // A reading per timestamp, in the order the timestamps first appear.
        if points[..i].iter().any(|p| p.ts_ms == point.ts_ms) {
            continue;
        }
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(br#"{"ts":"#);
        serde_json::to_writer(&mut *buf, &point.ts_ms)?;
        buf.extend_from_slice(br#","metrics":{"#);
        // Its metrics by name; a name given twice keeps its last value.
        let reading = || points[i..].iter().filter(|p| p.ts_ms == point.ts_ms);
        let mut last: Option<&str> = None;
        let mut first = true;
        loop {
            let mut next: Option<&TelemetryPoint> = None;
            for p in reading() {
                let name = p.metric.as_str();
                if last.is_some_and(|last| name <= last) {
                    continue;
                }
                if next.is_none_or(|n| name <= n.metric.as_str()) {
                    next = Some(p);
                }
            }
            let Some(p) = next else { break };
            if !first {
                buf.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *buf, p.metric.as_str())?;
            buf.push(b':');
            serde_json::to_writer(&mut *buf, &p.value)?;
            last = Some(p.metric.as_str());
        }
        buf.extend_from_slice(b"}}");
    }
    buf.extend_from_slice(b"]}");
    Ok(())
}

/// A message's points as the live stream shows them: one reading per timestamp.
fn telemetry_message<'a>(
    device: &'a DeviceId,
    device_type: &'a str,
    points: &'a [TelemetryPoint],
) -> LiveMessage<'a> {
    let mut messages: Vec<LiveReading<'a>> = Vec::new();
    for point in points {
        match messages.iter_mut().find(|m| m.ts == point.ts_ms) {
            Some(reading) => {
                reading.metrics.insert(point.metric.as_str(), &point.value);
            }
            None => messages.push(LiveReading {
                ts: point.ts_ms,
                metrics: BTreeMap::from([(point.metric.as_str(), &point.value)]),
            }),
        }
    }
    LiveMessage::Telemetry {
        device_id: device.as_str(),
        device_type,
        messages,
    }
}

impl TelemetryWatch {
    /// Watches every device of the tenant.
    pub fn watch_all(&mut self) {
        if !self.all {
            self.all = true;
            self.hub
                .tenants()
                .entry(self.tenant.clone())
                .or_default()
                .all
                .push(self.watcher.clone());
            self.hub.watchers.entries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Watches `devices` too; refuses (and changes nothing) past [`MAX_WATCHED_DEVICES`].
    pub fn watch(&mut self, devices: &[DeviceId]) -> Result<(), usize> {
        let new: BTreeSet<&DeviceId> = devices.iter().filter(|d| !self.devices.contains(*d)).collect();
        if self.devices.len() + new.len() > MAX_WATCHED_DEVICES {
            return Err(MAX_WATCHED_DEVICES);
        }
        let mut tenants = self.hub.tenants();
        let watchers = tenants.entry(self.tenant.clone()).or_default();
        for device in new {
            watchers
                .devices
                .entry(device.clone())
                .or_default()
                .push(self.watcher.clone());
            self.devices.insert(device.clone());
            self.hub.watchers.entries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Stops watching the whole tenant (devices named one by one stay watched).
    pub fn unwatch_all(&mut self) {
        if self.all {
            self.all = false;
            let session = self.watcher.session;
            self.edit(|w| {
                w.all.retain(|x| x.session != session);
                1
            });
        }
    }

    /// Stops watching `devices`.
    pub fn unwatch(&mut self, devices: &[DeviceId]) {
        let gone: Vec<DeviceId> = devices
            .iter()
            .filter(|d| self.devices.remove(*d))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        let session = self.watcher.session;
        self.edit(|w| {
            for device in &gone {
                if let Some(list) = w.devices.get_mut(device) {
                    list.retain(|x| x.session != session);
                    if list.is_empty() {
                        w.devices.remove(device);
                    }
                }
            }
            gone.len()
        });
    }

    /// Whether the tenant as a whole is watched, and the devices named one by one (sorted).
    pub fn watched(&self) -> (bool, Vec<String>) {
        (self.all, self.devices.iter().map(|d| d.to_string()).collect())
    }

    /// Bytes of the frames waiting for the session.
    pub fn queued_bytes(&self) -> usize {
        self.watcher.queued.load(Ordering::Relaxed)
    }

    /// Frames missed since the last call (the session was too slow for them).
    pub fn take_missed(&self) -> u64 {
        self.watcher.missed.swap(0, Ordering::Relaxed)
    }

    /// Applies `change` to the tenant's watchers; it returns how many entries it removed.
    fn edit(&self, change: impl FnOnce(&mut TenantWatchers) -> usize) {
        let mut tenants = self.hub.tenants();
        if let Some(watchers) = tenants.get_mut(&self.tenant) {
            let removed = change(watchers);
            self.hub.watchers.entries.fetch_sub(removed, Ordering::Relaxed);
            if watchers.is_empty() {
                tenants.remove(&self.tenant);
            }
        }
    }
}

impl Drop for TelemetryWatch {
    fn drop(&mut self) {
        self.unwatch_all();
        let devices: Vec<DeviceId> = self.devices.iter().cloned().collect();
        self.unwatch(&devices);
    }
}

#[cfg(test)]
mod tests {
    use drover_actors::telemetry::MetricName;

    use super::*;

    fn point(ts_ms: i64, metric: &str, value: MetricValue) -> TelemetryPoint {
        TelemetryPoint {
            tenant: TenantId::parse("acme").unwrap(),
            device: DeviceId::parse("pump-1").unwrap(),
            device_type: "pump".into(),
            metric: MetricName::parse(metric).unwrap(),
            ts_ms,
            value,
        }
    }

    #[test]
    fn the_direct_frame_is_byte_for_byte_the_serialised_message() {
        let device = DeviceId::parse("pump-1").unwrap();
        let n = MetricValue::Number;
        let cases: Vec<Vec<TelemetryPoint>> = vec![
            vec![],
            vec![point(1, "t", n(21.5))],
            vec![
                point(1, "t", n(21.0)),
                point(1, "a", n(-0.0)),
                point(1, "m", n(1e300)),
            ],
            // Several timestamps, interleaved, and a name given twice in one of them.
            vec![
                point(5, "b", n(1.0)),
                point(3, "a", MetricValue::Bool(true)),
                point(5, "a", MetricValue::Text("\"quoted\" \u{7} é\n".into())),
                point(3, "b", n(2.0)),
                point(5, "b", n(3.0)),
                point(-7, "z", n(0.1)),
            ],
            // Names that share prefixes, and case.
            vec![
                point(0, "ab", n(1.0)),
                point(0, "a", n(2.0)),
                point(0, "B", n(3.0)),
                point(0, "a.b", n(4.0)),
            ],
            // Past the direct writer's size: the serialised path.
            (0..40)
                .map(|i| point(i % 3, &format!("m{}", 40 - i), n(i as f64)))
                .collect(),
        ];
        for points in cases {
            let expected = serde_json::to_string(&telemetry_message(&device, "pu\"mp", &points)).unwrap();
            let frame = telemetry_frame(&device, "pu\"mp", &points).unwrap();
            assert_eq!(&*frame, expected.as_str());
            let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
            assert_eq!(value["type"], "telemetry");
        }
        // Every size the direct writer takes, with repeats.
        for len in 1..=DIRECT_FRAME_POINTS {
            let points: Vec<TelemetryPoint> = (0..len)
                .map(|i| point((i * 7 % 4) as i64, &format!("m{}", i * 5 % 9), n(i as f64 / 3.0)))
                .collect();
            let expected = serde_json::to_string(&telemetry_message(&device, "pump", &points)).unwrap();
            assert_eq!(
                &*telemetry_frame(&device, "pump", &points).unwrap(),
                expected.as_str()
            );
        }
    }

    #[test]
    fn a_session_that_does_not_read_holds_at_most_its_byte_backlog() {
        let hub = DashboardHub::default();
        let tenant = TenantId::parse("acme").unwrap();
        let device = DeviceId::parse("pump-1").unwrap();
        let (mut watch, mut frames) = hub.telemetry_watch(&tenant);
        watch.watch_all();
        // About 900 KB per frame, as a large batch gives.
        let points = vec![TelemetryPoint {
            tenant: tenant.clone(),
            device: device.clone(),
            device_type: "pump".into(),
            metric: MetricName::parse("log").unwrap(),
            ts_ms: 0,
            value: MetricValue::Text("x".repeat(900_000)),
        }];
        for _ in 0..50 {
            hub.show(&tenant, &device, "pump", &points);
        }
        assert!(
            watch.queued_bytes() <= TELEMETRY_BACKLOG_BYTES,
            "{}",
            watch.queued_bytes()
        );
        assert!(watch.queued_bytes() > TELEMETRY_BACKLOG_BYTES / 2);
        let queued = (50 - watch.take_missed()) as usize;
        assert_eq!(queued, TELEMETRY_BACKLOG_BYTES / 900_000);
        // Reading frees room again.
        for _ in 0..queued {
            let frame = futures_util::FutureExt::now_or_never(frames.next_frame());
            assert!(matches!(frame, Some(Some(_))));
        }
        assert_eq!(watch.queued_bytes(), 0);
        hub.show(&tenant, &device, "pump", &points);
        assert_eq!(watch.take_missed(), 0);
    }
}
