//! Work a thread leaves for the end of its current turn. Senders on an actix arbiter gather
//! what they send to another thread's actors during one turn (the telemetry writers, the
//! observers of accepted telemetry) and send it at once: one wake-up of the other thread per
//! turn, not per message. One task per thread and turn runs every flush that was asked for.

use std::cell::RefCell;

use actix::Arbiter;

/// A flush to run at the end of a turn. Each is a `static`, so one asked for twice in a turn
/// runs once.
pub(crate) struct AtTurnEnd(pub fn());

thread_local! {
    static DUE: RefCell<Vec<&'static AtTurnEnd>> = const { RefCell::new(Vec::new()) };
}

/// Whether this thread runs an actix arbiter, where a send may wait for the end of the turn;
/// elsewhere a sender sends at once.
pub(crate) fn on_arbiter() -> bool {
    Arbiter::try_current().is_some()
}

/// Runs `flush` once this thread's arbiter has run the tasks it had already queued (no timer:
/// it waits only for them). Asked again before it ran, it still runs once. Only on an arbiter
/// ([`on_arbiter`]).
pub(crate) fn at_turn_end(flush: &'static AtTurnEnd) {
    let spawn = DUE.with(|due| {
        let mut due = due.borrow_mut();
        if due.iter().any(|f| std::ptr::eq(*f, flush)) {
            return false;
        }
        due.push(flush);
        due.len() == 1
    });
    if spawn {
        actix::spawn(async { run_due() });
    }
}

fn run_due() {
    let due = DUE.with(|due| std::mem::take(&mut *due.borrow_mut()));
    for flush in due {
        (flush.0)();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        static RUNS: Cell<u32> = const { Cell::new(0) };
    }

    static COUNT: AtTurnEnd = AtTurnEnd(|| RUNS.with(|r| r.set(r.get() + 1)));

    #[actix::test]
    async fn a_flush_asked_for_many_times_in_a_turn_runs_once_after_it() {
        assert!(on_arbiter());
        for _ in 0..3 {
            at_turn_end(&COUNT);
        }
        assert_eq!(RUNS.with(Cell::get), 0, "not before the turn ends");
        tokio::task::yield_now().await;
        assert_eq!(RUNS.with(Cell::get), 1);
        at_turn_end(&COUNT);
        tokio::task::yield_now().await;
        assert_eq!(
            RUNS.with(Cell::get),
            2,
            "asked again in the next turn, it runs again"
        );
    }
}
