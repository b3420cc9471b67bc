//! Where a device's accepted telemetry goes after its actor validated it: to the batching
//! writers that commit it, to the live view once queued (dashboard sessions), and after the
//! commit to the observers that act on it (rule actors).
//!
//! Observers get a [`TelemetryAccepted`] per message batch, with the device's metadata and
//! shadow at that moment, so a rule can look at them without asking the registry. An observer
//! has room for a fixed number of events; one that falls behind loses events (counted), it
//! never slows ingestion. What one thread accepts for an observer in one turn of its actors
//! reaches it as one [`ObservedTelemetry`] message: one wake-up of the observer's thread per
//! turn, not per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde_json::{Map, Value};

use crate::ids::{DeviceId, TenantId};
use crate::telemetry::PayloadLimits;
use crate::telemetry::TelemetryPoint;
use crate::telemetry::store::PointBatch;
use crate::telemetry_writer::WriterPool;
use crate::turn;

/// Telemetry of one device that the platform accepted.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct TelemetryAccepted {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub device_type: Arc<str>,
    /// The device's metadata (location, model…) when the telemetry arrived.
    pub metadata: Arc<Map<String, Value>>,
    /// The device's shadow state (`{"desired": …, "reported": …}`) when the telemetry arrived.
    pub shadow: Option<Arc<Value>>,
    pub points: PointBatch,
}

#[cfg(test)]
impl TelemetryAccepted {
    /// No points of `device` of `tenant`: what tests fill queues and mailboxes with.
    pub(crate) fn empty(tenant: &TenantId, device: &str) -> TelemetryAccepted {
        TelemetryAccepted {
            tenant: tenant.clone(),
            device: DeviceId::parse(device).unwrap(),
            device_type: "t".into(),
            metadata: Arc::default(),
            shadow: None,
            points: Vec::new().into(),
        }
    }
}

/// The observers that had room for an event when its message arrived, one bit each in the
/// order they were added (a pipeline has at most 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WithRoom(u64);

impl WithRoom {
    /// Every observer.
    pub const ALL: WithRoom = WithRoom(u64::MAX);

    /// Whether no observer had room.
    pub fn none(self) -> bool {
        self.0 == 0
    }

    fn has(self, observer: usize) -> bool {
        self.0 & (1 << observer) != 0
    }
}

/// Accepted telemetry for an observer: what one thread accepted for it in one turn, oldest
/// first. The room the events take in the observer's queue is given back when the message is
/// dropped, so an observer handles the events (or hands them on) before it returns.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ObservedTelemetry {
    pub events: Vec<TelemetryAccepted>,
    _room: Option<RoomTaken>,
}

impl ObservedTelemetry {
    /// Events that take no room in any queue (tests, and senders that bound nothing).
    pub fn new(events: Vec<TelemetryAccepted>) -> ObservedTelemetry {
        ObservedTelemetry { events, _room: None }
    }
}

/// An observer's room: events sent to it and not yet handled, at most `capacity`.
#[derive(Debug)]
struct Room {
    used: AtomicUsize,
    capacity: usize,
}

impl Room {
    /// Takes room for one event; `false` when there is none.
    fn take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.capacity).then_some(used + 1)
            })
            .is_ok()
    }

    /// Whether one more event would fit now (room not taken).
    fn has_room(&self) -> bool {
        self.used.load(Ordering::Acquire) < self.capacity
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.capacity - self.used.load(Ordering::Acquire)
    }
}

/// The room a message's events took, given back when the message is dropped (handled, or
/// refused by a stopped observer).
#[derive(Debug)]
struct RoomTaken {
    room: Arc<Room>,
    events: usize,
}

impl Drop for RoomTaken {
    fn drop(&mut self) {
        self.room.used.fetch_sub(self.events, Ordering::AcqRel);
    }
}

/// The mailbox of an observer that routes events to per-tenant actors (the rules' and the
/// analytics' routers) for per-tenant mailboxes of `mailbox` events; also the room the
/// pipeline gives such an observer, in events.
pub fn router_mailbox(mailbox: usize) -> usize {
    mailbox.max(1024)
}

/// Where accepted telemetry is shown as it arrives (the dashboard's WebSocket sessions).
/// Device actors ask [`LiveTelemetry::watching`] for every message, so it must be cheap, and
/// call [`LiveTelemetry::show`] once the message is queued for its writer: before its commit,
/// which only delays acknowledgements, never the live view.
pub trait LiveTelemetry: Send + Sync + 'static {
    fn watching(&self, tenant: &TenantId, device: &DeviceId) -> bool;
    fn show(&self, tenant: &TenantId, device: &DeviceId, device_type: &str, points: &[TelemetryPoint]);
}

/// What device actors share about telemetry: the payload rules, the writers that commit it,
/// and the observers.
pub struct Pipeline {
    pub limits: PayloadLimits,
    /// Where accepted points are committed; `None` only in tests that need no store.
    pub writers: Option<WriterPool>,
    observers: Vec<Arc<Observer>>,
    live: Option<Arc<dyn LiveTelemetry>>,
    dropped: Arc<AtomicU64>,
    counts: Mutex<HashMap<TenantId, Arc<TenantCounter>>>,
}

/// An observer of accepted telemetry: its room in events, and what counts the events it had no
/// room for (the observer's own drop counter, so its figure in `/metrics` covers them, and the
/// pipeline's).
struct Observer {
    recipient: Recipient<ObservedTelemetry>,
    room: Arc<Room>,
    missed: Box<dyn Fn() + Send + Sync>,
    dropped: Arc<AtomicU64>,
}

impl Observer {
    fn miss(&self, events: usize) {
        self.dropped.fetch_add(events as u64, Ordering::Relaxed);
        for _ in 0..events {
            (self.missed)();
        }
    }

    /// Sends `events`, which took room already; what the observer cannot take (it stopped)
    /// is counted as missed and its room given back.
    fn send(&self, events: Vec<TelemetryAccepted>) {
        let count = events.len();
        let room = RoomTaken {
            room: self.room.clone(),
            events: count,
        };
        if self
            .recipient
            .try_send(ObservedTelemetry {
                events,
                _room: Some(room),
            })
            .is_err()
        {
            self.miss(count);
        }
    }
}

/// A tenant's committed telemetry, counted by its device actors without a lock: each holds
/// the counter of its tenant.
#[derive(Debug, Default)]
pub struct TenantCounter {
    messages: AtomicU64,
    points: AtomicU64,
}

impl TenantCounter {
    /// Counts a committed message of `points` points.
    pub fn count(&self, points: usize) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.points.fetch_add(points as u64, Ordering::Relaxed);
    }

    fn read(&self) -> TenantTelemetry {
        TenantTelemetry {
            messages: self.messages.load(Ordering::Relaxed),
            points: self.points.load(Ordering::Relaxed),
        }
    }
}

/// Telemetry a tenant's devices had committed since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TenantTelemetry {
    pub messages: u64,
    pub points: u64,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("observers", &self.observers.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline::new(PayloadLimits::default())
    }
}

impl Pipeline {
    pub fn new(limits: PayloadLimits) -> Pipeline {
        Pipeline {
            limits,
            writers: None,
            observers: Vec::new(),
            live: None,
            dropped: Arc::default(),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Commits accepted points through `writers` (before the pipeline is shared).
    pub fn with_writers(mut self, writers: WriterPool) -> Pipeline {
        self.writers = Some(writers);
        self
    }

    /// Adds an observer (before the pipeline is shared) with room for `capacity` events not yet
    /// handled; `missed` is called for each event it has no room for. The observer's mailbox
    /// must hold `capacity` messages (each carries at least one event), so it never refuses
    /// one the room let through.
    pub fn with_observer(
        mut self,
        observer: Recipient<ObservedTelemetry>,
        capacity: usize,
        missed: impl Fn() + Send + Sync + 'static,
    ) -> Pipeline {
        assert!(self.observers.len() < 64, "at most 64 observers");
        self.observers.push(Arc::new(Observer {
            recipient: observer,
            room: Arc::new(Room {
                used: AtomicUsize::new(0),
                capacity: capacity.max(1),
            }),
            missed: Box::new(missed),
            dropped: self.dropped.clone(),
        }));
        self
    }

    /// Shows accepted telemetry live through `live` (before the pipeline is shared).
    pub fn with_live(mut self, live: Arc<dyn LiveTelemetry>) -> Pipeline {
        self.live = Some(live);
        self
    }

    /// Whether someone watches `device` live now (asked for every message: cheap).
    pub fn watched(&self, tenant: &TenantId, device: &DeviceId) -> bool {
        self.live
            .as_ref()
            .is_some_and(|live| live.watching(tenant, device))
    }

    /// Shows a message of `device` to those who watch it live.
    pub fn show_live(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        device_type: &str,
        points: &[TelemetryPoint],
    ) {
        if let Some(live) = &self.live {
            live.show(tenant, device, device_type, points);
        }
    }

    /// Counts the points of a message refused before it reached the writers (malformed, or
    /// against the device type's schema) with the points the writers refused, so that one
    /// figure tells every refusal. A message whose points cannot be read counts as one.
    pub fn count_refused(&self, points: usize) {
        if let Some(writers) = &self.writers {
            writers
                .counters
                .points_refused
                .fetch_add(points.max(1) as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The counter of `tenant`'s committed telemetry (a device actor takes it once).
    pub fn tenant_counter(&self, tenant: &TenantId) -> Arc<TenantCounter> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.entry(tenant.clone()).or_default().clone()
    }

    /// What `tenant` had committed since start (`None`: every tenant together).
    pub fn counts(&self, tenant: Option<&TenantId>) -> TenantTelemetry {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match tenant {
            Some(t) => counts.get(t).map(|c| c.read()).unwrap_or_default(),
            None => counts
                .values()
                .map(|c| c.read())
                .fold(TenantTelemetry::default(), |a, c| TenantTelemetry {
                    messages: a.messages + c.messages,
                    points: a.points + c.points,
                }),
        }
    }

    pub fn has_observers(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Tells every observer; an observer with no room left misses this event. On an actix
    /// arbiter the event joins what this thread gathered for the observer in this turn.
    pub fn observe(&self, event: TelemetryAccepted) {
        self.observe_if(WithRoom::ALL, Some(event));
    }

    /// The observers with room now, room not taken: a device actor builds the event of a
    /// message (a copy of its points, the device's metadata and shadow) only when one has,
    /// and hands it to [`Pipeline::observe_if`] after the commit. At full load most events
    /// would be missed (the analytics' and the rules' queues full), and building them was
    /// a tenth of the device actors' thread.
    pub fn with_room(&self) -> WithRoom {
        let mut bits = 0u64;
        for (i, observer) in self.observers.iter().enumerate() {
            if observer.room.has_room() {
                bits |= 1 << i;
            }
        }
        WithRoom(bits)
    }

    /// Tells the observers that had room when the message arrived (`with_room`, which built
    /// `event`; `None` when none had) and still have; the rest miss it, counted as
    /// [`Pipeline::observe`] counts an observer with no room.
    pub fn observe_if(&self, with_room: WithRoom, mut event: Option<TelemetryAccepted>) {
        // Room taken first: the last observer that gets the event takes it, the others a copy.
        let mut takers = 0u64;
        for (i, observer) in self.observers.iter().enumerate() {
            if event.is_some() && with_room.has(i) && observer.room.take() {
                takers |= 1 << i;
            } else {
                observer.miss(1);
            }
        }
        if takers == 0 {
            return;
        }
        let last = 63 - takers.leading_zeros() as usize;
        for (i, observer) in self.observers.iter().enumerate().take(last + 1) {
            if takers & (1 << i) == 0 {
                continue;
            }
            let event = if i == last {
                event.take().expect("taken by the last observer only")
            } else {
                event.clone().expect("kept for the last observer")
            };
            gather(observer, event);
        }
    }

    /// Events observers missed because they were behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What one thread accepted for each observer in its current turn.
type Gathered = Vec<(Arc<Observer>, Vec<TelemetryAccepted>)>;

thread_local! {
    static GATHERED: std::cell::RefCell<Gathered> = const { std::cell::RefCell::new(Vec::new()) };
}

static SEND_GATHERED: turn::AtTurnEnd = turn::AtTurnEnd(send_gathered);

/// Hands `event`, which took its room, to `observer`: on an actix arbiter through what this
/// thread gathers in the current turn, sent at the turn's end ([`turn`]); elsewhere at once.
fn gather(observer: &Arc<Observer>, event: TelemetryAccepted) {
    if !turn::on_arbiter() {
        observer.send(vec![event]);
        return;
    }
    let first = GATHERED.with(|gathered| {
        let mut gathered = gathered.borrow_mut();
        let first = gathered.is_empty();
        match gathered.iter_mut().find(|(o, _)| Arc::ptr_eq(o, observer)) {
            Some((_, events)) => events.push(event),
            None => gathered.push((observer.clone(), vec![event])),
        }
        first
    });
    if first {
        turn::at_turn_end(&SEND_GATHERED);
    }
}

fn send_gathered() {
    let queues = GATHERED.with(|gathered| std::mem::take(&mut *gathered.borrow_mut()));
    for (observer, events) in queues {
        observer.send(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the devices of the events it handles, one entry per message.
    #[derive(Default)]
    struct Seen {
        messages: Vec<Vec<String>>,
    }

    struct Capture(Arc<Mutex<Seen>>);

    impl Actor for Capture {
        type Context = Context<Self>;
    }

    impl Handler<ObservedTelemetry> for Capture {
        type Result = ();

        fn handle(&mut self, msg: ObservedTelemetry, _ctx: &mut Context<Self>) {
            self.0
                .lock()
                .unwrap()
                .messages
                .push(msg.events.iter().map(|e| e.device.as_str().to_string()).collect());
        }
    }

    fn observed(capacity: usize) -> (Pipeline, Arc<Mutex<Seen>>, Arc<AtomicU64>, Arc<Room>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let missed = Arc::new(AtomicU64::new(0));
        let counted = missed.clone();
        let capture = Capture(seen.clone()).start();
        let pipeline = Pipeline::default().with_observer(capture.recipient(), capacity, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let room = pipeline.observers[0].room.clone();
        (pipeline, seen, missed, room)
    }

    fn event(n: usize) -> TelemetryAccepted {
        TelemetryAccepted::empty(&TenantId::parse("acme").unwrap(), &format!("d{n}"))
    }

    async fn settle() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    #[actix::test]
    async fn a_turns_events_reach_an_observer_as_one_message_in_order() {
        let (pipeline, seen, missed, _) = observed(100);
        for n in 0..5 {
            pipeline.observe(event(n));
        }
        settle().await;
        pipeline.observe(event(5));
        settle().await;
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.messages,
            vec![vec!["d0", "d1", "d2", "d3", "d4"], vec!["d5"]],
            "one message per turn, in the order observed"
        );
        assert_eq!(missed.load(Ordering::Relaxed), 0);
    }

    #[actix::test]
    async fn events_beyond_an_observers_room_are_counted_and_the_room_comes_back() {
        let (pipeline, seen, missed, room) = observed(3);
        // No yield in between: the observer takes none of them before the burst ends.
        for n in 0..20 {
            pipeline.observe(event(n));
        }
        assert_eq!(room.free(), 0, "three events hold the whole room");
        assert_eq!(missed.load(Ordering::Relaxed), 17);
        assert_eq!(pipeline.dropped(), 17);
        settle().await;
        assert_eq!(room.free(), 3, "given back once handled");
        for n in 20..22 {
            pipeline.observe(event(n));
        }
        settle().await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.messages, vec![vec!["d0", "d1", "d2"], vec!["d20", "d21"]]);
        assert_eq!(
            missed.load(Ordering::Relaxed),
            17,
            "each event received or counted"
        );
    }

    #[actix::test]
    async fn every_observer_gets_every_event_and_one_without_room_misses_alone() {
        let (pipeline, first, missed_first, _) = observed(2);
        let second = Arc::new(Mutex::new(Seen::default()));
        let capture = Capture(second.clone()).start();
        let pipeline = pipeline.with_observer(capture.recipient(), 10, || {});
        for n in 0..4 {
            pipeline.observe(event(n));
        }
        settle().await;
        assert_eq!(first.lock().unwrap().messages, vec![vec!["d0", "d1"]]);
        assert_eq!(
            second.lock().unwrap().messages,
            vec![vec!["d0", "d1", "d2", "d3"]]
        );
        assert_eq!(missed_first.load(Ordering::Relaxed), 2);
        assert_eq!(pipeline.dropped(), 2);
    }

    #[actix::test]
    async fn an_observer_full_when_a_message_arrives_misses_it_even_with_room_at_its_commit() {
        let (pipeline, first, missed_first, first_room) = observed(1);
        let second = Arc::new(Mutex::new(Seen::default()));
        let missed_second = Arc::new(AtomicU64::new(0));
        let counted = missed_second.clone();
        let capture = Capture(second.clone()).start();
        let pipeline = pipeline.with_observer(capture.recipient(), 10, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        // The first observer's room is taken when message A arrives; the second has room.
        pipeline.observe(event(0));
        let a = pipeline.with_room();
        assert!(!a.none() && !a.has(0) && a.has(1));
        settle().await;
        assert_eq!(first_room.free(), 1, "room again before A's commit");
        pipeline.observe_if(a, Some(event(1)));
        // Message B arrives while both have room, but the first is full again at B's commit.
        let b = pipeline.with_room();
        assert!(b.has(0) && b.has(1));
        pipeline.observe(event(2));
        pipeline.observe_if(b, Some(event(3)));
        // Message C arrives while neither has room: no event was built for it.
        let full = WithRoom(0);
        pipeline.observe_if(full, None);
        settle().await;
        assert_eq!(first.lock().unwrap().messages, vec![vec!["d0"], vec!["d2"]]);
        assert_eq!(
            second.lock().unwrap().messages,
            vec![vec!["d0"], vec!["d1", "d2", "d3"]]
        );
        assert_eq!(missed_first.load(Ordering::Relaxed), 3, "A, B and C");
        assert_eq!(missed_second.load(Ordering::Relaxed), 1, "C");
        assert_eq!(pipeline.dropped(), 4);
    }

    #[test]
    fn outside_an_arbiter_an_event_is_sent_at_once_and_a_stopped_observer_misses_it() {
        let system = actix::System::new();
        let (seen, pipeline, missed, room) = system.block_on(async {
            let (pipeline, seen, missed, room) = observed(4);
            (seen, pipeline, missed, room)
        });
        // Off the system's thread there is no arbiter: the event goes out as its own message.
        std::thread::scope(|s| {
            s.spawn(|| pipeline.observe(event(1)));
        });
        system.block_on(settle());
        assert_eq!(seen.lock().unwrap().messages, vec![vec!["d1"]]);
        drop(system);
        std::thread::scope(|s| {
            s.spawn(|| pipeline.observe(event(2)));
        });
        assert_eq!(
            missed.load(Ordering::Relaxed),
            1,
            "the stopped observer's event counted"
        );
        assert_eq!(room.free(), 4, "and its room given back");
    }
}
