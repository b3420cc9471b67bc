//! Scheduling priority of the threads whose work may fall behind without loss of data: rule
//! evaluation and live analytics. Both are fed through bounded queues that drop and count what
//! they cannot take, so when the CPU is short it is better spent on ingestion (the MQTT
//! workers, the device actors, the writers), which acknowledges and stores. A lowered thread
//! still gets the CPU nobody else wants.

use actix::ArbiterHandle;

/// Lowers the calling thread's priority by `increment` nice levels (capped at 19, the lowest);
/// 0 leaves it alone. Linux sets priorities per thread; elsewhere this does nothing.
pub fn lower_current_thread(increment: i32) -> std::io::Result<()> {
    if increment <= 0 {
        return Ok(());
    }
    imp::lower(increment)
}

/// Lowers the thread of `arbiter` (see [`lower_current_thread`]); a failure is logged, since
/// the thread then only keeps the server's own priority.
pub fn lower_arbiter(arbiter: &ArbiterHandle, increment: i32, what: &'static str) {
    if increment <= 0 {
        return;
    }
    arbiter.spawn_fn(move || lower_logged(increment, what));
}

/// [`lower_current_thread`], logging a failure.
pub fn lower_logged(increment: i32, what: &'static str) {
    if let Err(error) = lower_current_thread(increment) {
        tracing::warn!(thread = what, increment, %error, "cannot lower the thread's priority");
    }
}

#[cfg(target_os = "linux")]
mod imp {
    /// The calling thread's nice value.
    pub fn current() -> std::io::Result<i32> {
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // -1 is both a valid nice value and the error return: errno tells them apart.
        unsafe { *libc::__errno_location() = 0 };
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        if nice == -1 && unsafe { *libc::__errno_location() } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(nice)
    }

    pub fn lower(increment: i32) -> std::io::Result<()> {
        let target = current()?.saturating_add(increment).min(19);
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // On Linux PRIO_PROCESS with a thread id sets that thread alone.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, target) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn lower(_increment: i32) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let before = imp::current().unwrap();
        let (lowered, after_zero) = std::thread::spawn(move || {
            lower_current_thread(0).unwrap();
            let after_zero = imp::current().unwrap();
            lower_current_thread(3).unwrap();
            (imp::current().unwrap(), after_zero)
        })
        .join()
        .unwrap();
        assert_eq!(after_zero, before, "an increment of 0 changes nothing");
        assert_eq!(lowered, (before + 3).min(19));
        assert_eq!(
            imp::current().unwrap(),
            before,
            "other threads keep their priority"
        );
    }

    #[test]
    fn never_goes_past_the_lowest_priority() {
        let nice = std::thread::spawn(|| {
            lower_current_thread(15).unwrap();
            lower_current_thread(15).unwrap();
            imp::current().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(nice, 19);
    }

    #[actix_rt::test]
    async fn lowers_an_arbiters_thread() {
        let arbiter = actix::Arbiter::new();
        lower_arbiter(&arbiter.handle(), 2, "test");
        let (tx, rx) = tokio::sync::oneshot::channel();
        arbiter.spawn_fn(move || {
            let _ = tx.send(imp::current().unwrap());
        });
        let nice = rx.await.unwrap();
        assert_eq!(nice, (imp::current().unwrap() + 2).min(19));
        arbiter.stop();
    }
}
