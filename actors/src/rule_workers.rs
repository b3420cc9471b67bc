//! `RuleWorkers`: the threads that run rule scripts, shared fairly between tenants.
//!
//! No script runs on an HTTP worker or on an actor thread: each tenant's [`TenantRules`] lives
//! here, with a queue of [`RuleWork`] its `RuleActor` pushes. A worker takes the tenant at the
//! head of the ready ring, works through its queue for at most one time slice (evaluation
//! pauses between two rule evaluations when the slice is used up, see
//! [`TenantRules::on_telemetry_until`]), and puts the tenant back at the end of the ring if it
//! still has work. So a tenant whose rules are slow delays its own alarms, not another
//! tenant's: with `n` tenants that have work and `w` workers, a tenant waits at most about
//! `n / w` slices (plus one evaluation's wall-time limit each) for its turn.
//!
//! A tenant keeps `queue_capacity` telemetry events waiting of its own; a burst beyond that
//! borrows from a pool of `shared_capacity` events all tenants share (returned as its queue
//! drains), and what neither holds is dropped and counted (`RuleCounters::dropped`), like an
//! actor's full mailbox. So one tenant's burst is absorbed without every tenant being given
//! the memory of the largest burst, and the queues' total is bounded by `tenants ×
//! queue_capacity + shared_capacity`. Operator clears and ticks
//! are never dropped (a tick is not queued twice). A rule-set change does not wait in the
//! queue: it lands in the tenant's latest-rules slot (a newer one replaces it), the batch being
//! judged pauses at the next rule evaluation, and the new set judges everything still queued. So
//! a deleted rule stops at once and a new rule sees the next event, however long the backlog.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix::Recipient;

use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::rule_actor::{AlarmSignals, RuleCounters};
use crate::rules::evaluator::{Progress, TenantRules};
use crate::rules::findings::AnalyticsFindings;
use crate::rules::script::Sandbox;
use crate::rules::stats::StatsBoard;
use crate::rules::{AlarmSignal, Judge, RuleSpec};

/// What a tenant's rules are asked to do, in the order its rule actor asked.
#[derive(Debug)]
pub enum RuleWork {
    /// Judge an accepted batch (`now_ms`: the server time it arrived at) with the rules `judge`
    /// admits.
    Telemetry {
        event: TelemetryAccepted,
        now_ms: i64,
        judge: Judge,
    },
    /// Judge the `anomaly` and `forecast` rules on the analytics' findings for a device (queued
    /// and dropped like telemetry). Per-device conditions: judged on the device's own node.
    Findings {
        findings: AnalyticsFindings,
        now_ms: i64,
    },
    /// Replace the rule set (the (device, rule id) pairs of the active alarms seed it).
    SetRules {
        rules: Vec<RuleSpec>,
        active: Vec<(DeviceId, String)>,
    },
    /// An operator closed an alarm: its condition may raise it again.
    AlarmClosed { rule_id: String, device: DeviceId },
    /// Report coalesced repeats and fire time-based conditions (absence only when `spanning`:
    /// this node judges the tenant's spanning rules).
    Tick { now_ms: i64, spanning: bool },
    /// This node starts or stops judging the tenant's spanning rules: their state starts afresh
    /// (see [`TenantRules::reset_spanning`]).
    ResetSpanning {
        judging: bool,
        now_ms: i64,
        active: Vec<(DeviceId, String)>,
        connected: Vec<(DeviceId, String)>,
    },
}

/// How the workers run.
#[derive(Clone)]
pub struct WorkerSettings {
    /// Evaluation threads.
    pub threads: usize,
    /// Time a tenant may use per turn before the next tenant with work gets a worker.
    pub slice: Duration,
    /// Telemetry events one tenant may have waiting of its own.
    pub queue_capacity: usize,
    /// Telemetry events the tenants' bursts beyond `queue_capacity` may borrow, all together.
    pub shared_capacity: usize,
    pub sandbox: Arc<Sandbox>,
    pub anomaly_threshold: f64,
    pub board: StatsBoard,
    pub sink: Recipient<AlarmSignals>,
    pub counters: Arc<RuleCounters>,
    /// Nice increment of the evaluation threads (see [`crate::sched`]); 0 for none.
    pub nice: i32,
}

/// One tenant's rules and the work waiting for them.
struct TenantSlot {
    /// `None` while a worker has them.
    rules: Option<Box<TenantRules>>,
    queue: VecDeque<RuleWork>,
    /// The latest rule set not applied yet (a `SetRules` never waits behind telemetry).
    new_rules: Option<RuleWork>,
    telemetry_queued: usize,
    /// Of those, borrowed from the shared pool (returned first as the queue drains).
    borrowed: usize,
    tick_queued: bool,
    /// In the ready ring, or held by a worker.
    scheduled: bool,
}

/// The tenants' queues and the order in which tenants with work get a worker.
#[derive(Default)]
struct Schedule {
    tenants: HashMap<TenantId, TenantSlot>,
    /// Tenants with work that no worker holds, in the order they get one.
    ready: VecDeque<TenantId>,
    /// Telemetry events the tenants may borrow beyond their own capacity, all together.
    shared_capacity: usize,
    /// Borrowed now.
    borrowed: usize,
    stopping: bool,
}

/// Why work was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// The tenant already has `queue_capacity` telemetry events waiting and the shared pool
    /// is lent out.
    Full,
    /// The same work is already waiting (a tick).
    Duplicate,
}

impl Schedule {
    /// Queues `work` for `tenant`; the tenant joins the ready ring unless it is already in it or
    /// held by a worker.
    fn push(
        &mut self,
        tenant: &TenantId,
        work: RuleWork,
        capacity: usize,
        new_rules: impl FnOnce() -> TenantRules,
    ) -> Result<(), Refused> {
        let slot = self.tenants.entry(tenant.clone()).or_insert_with(|| TenantSlot {
            rules: Some(Box::new(new_rules())),
            queue: VecDeque::new(),
            new_rules: None,
            telemetry_queued: 0,
            borrowed: 0,
            tick_queued: false,
            scheduled: false,
        });
        match work {
            RuleWork::Telemetry { .. } | RuleWork::Findings { .. } if slot.telemetry_queued >= capacity => {
                if self.borrowed >= self.shared_capacity {
                    return Err(Refused::Full);
                }
                self.borrowed += 1;
                slot.borrowed += 1;
                slot.telemetry_queued += 1;
            }
            RuleWork::Telemetry { .. } | RuleWork::Findings { .. } => slot.telemetry_queued += 1,
            RuleWork::Tick { .. } if slot.tick_queued => return Err(Refused::Duplicate),
            RuleWork::Tick { .. } => slot.tick_queued = true,
            _ => {}
        }
        if matches!(work, RuleWork::SetRules { .. }) {
            slot.new_rules = Some(work);
        } else {
            slot.queue.push_back(work);
        }
        if !slot.scheduled {
            slot.scheduled = true;
            self.ready.push_back(tenant.clone());
        }
        Ok(())
    }

    /// The next tenant's turn: its id and its rules (which stay out until [`Schedule::end_turn`]).
    fn start_turn(&mut self) -> Option<(TenantId, Box<TenantRules>)> {
        while let Some(tenant) = self.ready.pop_front() {
            if let Some(rules) = self.tenants.get_mut(&tenant).and_then(|slot| slot.rules.take()) {
                return Some((tenant, rules));
            }
        }
        None
    }

    /// The tenant's next piece of work, if it has one: a new rule set first.
    fn next_work(&mut self, tenant: &TenantId) -> Option<RuleWork> {
        let slot = self.tenants.get_mut(tenant)?;
        if let Some(rules) = slot.new_rules.take() {
            return Some(rules);
        }
        let work = slot.queue.pop_front()?;
        match work {
            RuleWork::Telemetry { .. } | RuleWork::Findings { .. } => {
                slot.telemetry_queued -= 1;
                // Loans are returned first: the tenant's own room is what it had before them.
                if slot.borrowed > 0 {
                    slot.borrowed -= 1;
                    self.borrowed -= 1;
                }
            }
            RuleWork::Tick { .. } => slot.tick_queued = false,
            _ => {}
        }
        Some(work)
    }

    /// Whether a rule set waits to replace the tenant's rules (the batch being judged pauses).
    fn rules_changed(&self, tenant: &TenantId) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|slot| slot.new_rules.is_some())
    }

    /// A batch that paused goes back to the head of its tenant's queue, to resume first.
    fn put_back(&mut self, tenant: &TenantId, work: RuleWork) {
        if let Some(slot) = self.tenants.get_mut(tenant) {
            if matches!(work, RuleWork::Telemetry { .. }) {
                slot.telemetry_queued += 1;
            }
            slot.queue.push_front(work);
        }
    }

    /// Returns the rules; a tenant with work left goes to the end of the ready ring. `true` when
    /// it did (so another worker may be woken).
    fn end_turn(&mut self, tenant: &TenantId, rules: Box<TenantRules>) -> bool {
        let Some(slot) = self.tenants.get_mut(tenant) else {
            return false;
        };
        slot.rules = Some(rules);
        if slot.queue.is_empty() && slot.new_rules.is_none() {
            slot.scheduled = false;
            false
        } else {
            self.ready.push_back(tenant.clone());
            true
        }
    }

    #[cfg(test)]
    fn telemetry_queued(&self) -> usize {
        self.tenants.values().map(|s| s.telemetry_queued).sum()
    }
}

struct Shared {
    schedule: Mutex<Schedule>,
    wake: Condvar,
    settings: WorkerSettings,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        // A worker that panicked left the schedule consistent (every change is one call).
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`RuleWorkers::snapshot`] reports.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSnapshot {
    pub threads: usize,
    pub slice_ms: u64,
    /// Telemetry events one tenant may have waiting of its own.
    pub queue_capacity: usize,
    /// Telemetry events bursts may borrow beyond that, all tenants together.
    pub shared_capacity: usize,
    /// Lent out now.
    pub borrowed: usize,
    /// Tenants with work waiting for a thread.
    pub ready_tenants: usize,
    pub tenants: Vec<TenantQueue>,
}

/// One tenant's queue in the rule workers.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantQueue {
    pub tenant: TenantId,
    /// Work items waiting (telemetry, ticks, clears).
    pub queued: usize,
    pub telemetry_queued: usize,
    /// Of those, borrowed from the shared pool.
    pub borrowed: usize,
    /// A thread is judging its rules now.
    pub evaluating: bool,
}

/// The evaluation threads and the tenants' queues.
pub struct RuleWorkers {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for RuleWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleWorkers")
            .field("threads", &self.shared.settings.threads)
            .field("slice", &self.shared.settings.slice)
            .finish()
    }
}

impl RuleWorkers {
    /// Starts `settings.threads` evaluation threads (at least one).
    pub fn start(settings: WorkerSettings) -> std::io::Result<Arc<RuleWorkers>> {
        let threads = settings.threads.max(1);
        let shared = Arc::new(Shared {
            schedule: Mutex::new(Schedule {
                shared_capacity: settings.shared_capacity,
                ..Schedule::default()
            }),
            wake: Condvar::new(),
            settings,
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let for_thread = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rules-{i}"))
                .spawn(move || work(&for_thread));
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop(&shared, handles);
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(RuleWorkers {
            shared,
            threads: Mutex::new(handles),
        }))
    }

    /// Queues work for a tenant. Telemetry beyond the tenant's queue capacity is dropped and
    /// counted; `false` when it was.
    pub fn push(&self, tenant: &TenantId, work: RuleWork) -> bool {
        let settings = &self.shared.settings;
        let telemetry = matches!(work, RuleWork::Telemetry { .. } | RuleWork::Findings { .. });
        let result = self
            .shared
            .lock()
            .push(tenant, work, settings.queue_capacity, || {
                TenantRules::new(
                    tenant.clone(),
                    settings.sandbox.clone(),
                    settings.anomaly_threshold,
                    settings.board.clone(),
                )
            });
        match result {
            Ok(()) => {
                if telemetry {
                    settings.counters.queued.fetch_add(1, Ordering::Relaxed);
                }
                self.shared.wake.notify_one();
                true
            }
            Err(Refused::Full) => {
                settings.counters.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(Refused::Duplicate) => true,
        }
    }

    /// The threads and each tenant's waiting work, for `GET /admin/actors`.
    pub fn snapshot(&self) -> WorkersSnapshot {
        let settings = &self.shared.settings;
        let schedule = self.shared.lock();
        let mut tenants: Vec<TenantQueue> = schedule
            .tenants
            .iter()
            .map(|(tenant, slot)| TenantQueue {
                tenant: tenant.clone(),
                queued: slot.queue.len(),
                telemetry_queued: slot.telemetry_queued,
                borrowed: slot.borrowed,
                evaluating: slot.rules.is_none(),
            })
            .collect();
        tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        WorkersSnapshot {
            threads: settings.threads.max(1),
            slice_ms: settings.slice.as_millis() as u64,
            queue_capacity: settings.queue_capacity,
            shared_capacity: settings.shared_capacity,
            borrowed: schedule.borrowed,
            ready_tenants: schedule.ready.len(),
            tenants,
        }
    }

    /// Stops the threads once each has finished its current step (at most a slice and one
    /// evaluation); work still queued is dropped. Blocks until they have stopped.
    pub fn stop(&self) {
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        stop(&self.shared, handles);
    }
}

impl Drop for RuleWorkers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop(shared: &Shared, handles: Vec<JoinHandle<()>>) {
    shared.lock().stopping = true;
    shared.wake.notify_all();
    for handle in handles {
        let _ = handle.join();
    }
}

/// One evaluation thread: takes turns until the workers stop.
fn work(shared: &Shared) {
    let settings = &shared.settings;
    crate::sched::lower_logged(settings.nice, "rules");
    loop {
        let (tenant, mut rules) = {
            let mut schedule = shared.lock();
            loop {
                if schedule.stopping {
                    return;
                }
                if let Some(turn) = schedule.start_turn() {
                    break turn;
                }
                schedule = shared.wake.wait(schedule).unwrap_or_else(|e| e.into_inner());
            }
        };
        let deadline = Instant::now() + settings.slice;
        let slice_over = || Instant::now() >= deadline;
        // A new rule set also pauses the batch: the rules being run may have been deleted.
        let mut pause = || slice_over() || shared.lock().rules_changed(&tenant);
        let mut signals = Vec::new();
        let mut exhausted = false;
        loop {
            // The schedule's lock is released before the work runs.
            let next = shared.lock().next_work(&tenant);
            let Some(item) = next else { break };
            match item {
                RuleWork::Telemetry { event, now_ms, judge } => {
                    match rules.judge_until(&event, now_ms, judge, &mut signals, &mut pause) {
                        Progress::Done => {
                            settings.counters.queued.fetch_sub(1, Ordering::Relaxed);
                        }
                        Progress::Paused => {
                            shared
                                .lock()
                                .put_back(&tenant, RuleWork::Telemetry { event, now_ms, judge });
                            if slice_over() {
                                exhausted = true;
                                break;
                            }
                            // Paused for new rules: they are the next work.
                            continue;
                        }
                    }
                }
                RuleWork::SetRules { rules: specs, active } => {
                    let errors = rules.set_rules(specs, &active);
                    for error in &errors {
                        tracing::warn!(%tenant, %error, "rule not loaded");
                    }
                    settings
                        .counters
                        .load_errors
                        .fetch_add(errors.len() as u64, Ordering::Relaxed);
                    tracing::debug!(%tenant, rules = rules.rule_count(), "rules loaded");
                }
                RuleWork::Findings { findings, now_ms } => {
                    signals.extend(rules.on_findings(&findings, now_ms));
                    settings.counters.queued.fetch_sub(1, Ordering::Relaxed);
                }
                RuleWork::AlarmClosed { rule_id, device } => rules.alarm_closed(&rule_id, &device),
                RuleWork::Tick { now_ms, spanning } => signals.extend(rules.tick(now_ms, spanning)),
                RuleWork::ResetSpanning {
                    judging,
                    now_ms,
                    active,
                    connected,
                } => rules.reset_spanning(judging, now_ms, &active, &connected),
            }
            if slice_over() {
                exhausted = true;
                break;
            }
        }
        emit(settings, signals);
        let more = shared.lock().end_turn(&tenant, rules);
        if more {
            if exhausted {
                settings.counters.slices_exhausted.fetch_add(1, Ordering::Relaxed);
            }
            shared.wake.notify_one();
        }
    }
}

fn emit(settings: &WorkerSettings, signals: Vec<AlarmSignal>) {
    if signals.is_empty() {
        return;
    }
    let n = signals.len() as u64;
    if settings.sink.try_send(AlarmSignals { signals }).is_err() {
        settings.counters.signals_dropped.fetch_add(n, Ordering::Relaxed);
    } else {
        settings.counters.signals.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> TenantId {
        TenantId::parse(id).unwrap()
    }

    fn rules(id: &str) -> TenantRules {
        TenantRules::new(
            tenant(id),
            Arc::new(Sandbox::default()),
            3.0,
            StatsBoard::default(),
        )
    }

    fn tick(now_ms: i64) -> RuleWork {
        RuleWork::Tick {
            now_ms,
            spanning: true,
        }
    }

    /// An empty telemetry batch of `t`'s, to fill queues with.
    fn telemetry(t: &TenantId) -> RuleWork {
        RuleWork::Telemetry {
            event: TelemetryAccepted::empty(t, "d"),
            now_ms: 0,
            judge: Judge::All,
        }
    }

    fn closed(rule: &str) -> RuleWork {
        RuleWork::AlarmClosed {
            rule_id: rule.into(),
            device: DeviceId::parse("d").unwrap(),
        }
    }

    #[test]
    fn tenants_with_work_take_turns_and_a_busy_one_goes_behind_the_others() {
        let (a, b) = (tenant("a"), tenant("b"));
        let mut s = Schedule::default();
        for i in 0..3 {
            s.push(&a, closed(&format!("a{i}")), 10, || rules("a")).unwrap();
        }
        // b arrives while a has work: a's first turn, then b's, then a's again.
        let (first, rules_a) = s.start_turn().unwrap();
        assert_eq!(first, a);
        s.push(&b, closed("b0"), 10, || rules("b")).unwrap();
        assert!(s.next_work(&a).is_some());
        assert!(s.end_turn(&a, rules_a), "a still has work");
        assert_eq!(
            s.start_turn().map(|t| t.0),
            Some(b),
            "b does not wait for a's backlog"
        );
        assert_eq!(s.start_turn().map(|t| t.0), Some(a));
        assert!(s.start_turn().is_none());
    }

    #[test]
    fn a_tenant_is_held_by_one_worker_at_a_time() {
        let a = tenant("a");
        let mut s = Schedule::default();
        s.push(&a, closed("x"), 10, || rules("a")).unwrap();
        let (_, held) = s.start_turn().unwrap();
        s.push(&a, closed("y"), 10, || rules("a")).unwrap();
        assert!(
            s.start_turn().is_none(),
            "pushing to a held tenant does not ring it again"
        );
        assert!(s.next_work(&a).is_some());
        assert!(s.next_work(&a).is_some());
        assert!(s.next_work(&a).is_none());
        assert!(!s.end_turn(&a, held), "nothing left");
        assert!(s.start_turn().is_none());
        s.push(&a, closed("z"), 10, || rules("a")).unwrap();
        assert_eq!(s.start_turn().map(|t| t.0), Some(a));
    }

    fn set_rules() -> RuleWork {
        RuleWork::SetRules {
            rules: Vec::new(),
            active: Vec::new(),
        }
    }

    #[test]
    fn a_rule_change_goes_before_queued_work_and_the_latest_one_wins() {
        let a = tenant("a");
        let mut s = Schedule::default();
        s.push(&a, closed("x"), 10, || rules("a")).unwrap();
        s.push(&a, closed("y"), 10, || rules("a")).unwrap();
        let (_, held) = s.start_turn().unwrap();
        assert!(!s.rules_changed(&a));
        s.push(&a, set_rules(), 10, || rules("a")).unwrap();
        s.push(&a, set_rules(), 10, || rules("a")).unwrap();
        assert!(s.rules_changed(&a), "the batch being judged is told to pause");
        assert!(
            matches!(s.next_work(&a), Some(RuleWork::SetRules { .. })),
            "the new rules do not wait behind the backlog"
        );
        assert!(!s.rules_changed(&a), "two changes are applied once, the latest");
        assert!(matches!(s.next_work(&a), Some(RuleWork::AlarmClosed { .. })));
        assert!(matches!(s.next_work(&a), Some(RuleWork::AlarmClosed { .. })));
        assert!(s.next_work(&a).is_none());
        // A change alone gives the tenant a turn.
        s.push(&a, set_rules(), 10, || rules("a")).unwrap();
        assert!(s.end_turn(&a, held), "the change is work left");
        assert_eq!(s.start_turn().map(|t| t.0), Some(a));
    }

    #[test]
    fn telemetry_beyond_the_capacity_is_refused_and_ticks_are_not_queued_twice() {
        let a = tenant("a");
        let mut s = Schedule::default();
        let batch = || telemetry(&a);
        s.push(&a, batch(), 2, || rules("a")).unwrap();
        s.push(&a, batch(), 2, || rules("a")).unwrap();
        assert_eq!(s.push(&a, batch(), 2, || rules("a")), Err(Refused::Full));
        assert_eq!(s.push(&a, tick(1), 2, || rules("a")), Ok(()));
        assert_eq!(s.push(&a, tick(2), 2, || rules("a")), Err(Refused::Duplicate));
        assert_eq!(
            s.push(&a, closed("r"), 2, || rules("a")),
            Ok(()),
            "control work is never refused"
        );
        assert_eq!(s.telemetry_queued(), 2);
        let (_, _held) = s.start_turn().unwrap();
        let first = s.next_work(&a).unwrap();
        assert_eq!(s.telemetry_queued(), 1);
        s.put_back(&a, first);
        assert_eq!(s.telemetry_queued(), 2);
        assert!(
            matches!(s.next_work(&a), Some(RuleWork::Telemetry { .. })),
            "a paused batch resumes first"
        );
    }

    #[test]
    fn bursts_borrow_from_the_shared_pool_and_return_it_as_they_drain() {
        let (a, b) = (tenant("a"), tenant("b"));
        let mut s = Schedule {
            shared_capacity: 3,
            ..Schedule::default()
        };
        let batch = telemetry;
        // a: 2 of its own, then 2 borrowed; b: 1 borrowed beyond its own 2, then the pool is out.
        for _ in 0..4 {
            s.push(&a, batch(&a), 2, || rules("a")).unwrap();
        }
        for _ in 0..3 {
            s.push(&b, batch(&b), 2, || rules("b")).unwrap();
        }
        assert_eq!(s.push(&b, batch(&b), 2, || rules("b")), Err(Refused::Full));
        assert_eq!(s.push(&a, batch(&a), 2, || rules("a")), Err(Refused::Full));
        assert_eq!((s.borrowed, s.telemetry_queued()), (3, 7));
        // a drains one: its loan goes back first, and b may borrow it.
        let (turn, _held) = s.start_turn().unwrap();
        assert_eq!(turn, a);
        assert!(s.next_work(&a).is_some());
        assert_eq!(s.borrowed, 2);
        s.push(&b, batch(&b), 2, || rules("b")).unwrap();
        assert_eq!(s.push(&b, batch(&b), 2, || rules("b")), Err(Refused::Full));
        // a drains the rest: one more loan back, then its own room.
        for _ in 0..3 {
            assert!(s.next_work(&a).is_some());
        }
        assert!(s.next_work(&a).is_none());
        assert_eq!(s.borrowed, 2, "b's two loans");
        assert_eq!(s.tenants[&a].borrowed, 0);
        // Without a pool a tenant keeps to its own capacity.
        let mut alone = Schedule::default();
        alone.push(&a, batch(&a), 1, || rules("a")).unwrap();
        assert_eq!(alone.push(&a, batch(&a), 1, || rules("a")), Err(Refused::Full));
    }
}
