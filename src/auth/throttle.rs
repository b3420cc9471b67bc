//! Locks a username for a while after repeated failed logins, so passwords cannot be guessed
//! at network speed. Kept in process: each node throttles the attempts it sees.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct LoginThrottle {
    max_failures: u32,
    lockout: Duration,
    attempts: Mutex<HashMap<String, Failures>>,
}

struct Failures {
    count: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

/// Entries kept before old ones are swept, bounding memory under a spray of usernames.
const SWEEP_AT: usize = 10_000;

impl LoginThrottle {
    pub fn new(max_failures: u32, lockout: Duration) -> Self {
        LoginThrottle {
            max_failures,
            lockout,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` while the username is locked.
    pub fn check(&self, username: &str) -> Result<(), Duration> {
        self.check_at(username, Instant::now())
    }

    pub fn check_at(&self, username: &str, now: Instant) -> Result<(), Duration> {
        let attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        match attempts.get(username).and_then(|f| f.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    pub fn failed(&self, username: &str) {
        self.failed_at(username, Instant::now())
    }

    pub fn failed_at(&self, username: &str, now: Instant) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if attempts.len() >= SWEEP_AT {
            let lockout = self.lockout;
            attempts.retain(|_, f| {
                now.duration_since(f.first) < lockout || f.locked_until.is_some_and(|u| u > now)
            });
        }
        let entry = attempts.entry(username.to_string()).or_insert(Failures {
            count: 0,
            first: now,
            locked_until: None,
        });
        // Failures older than the lockout window, or a lock that has run out, start a new count.
        if now.duration_since(entry.first) >= self.lockout || entry.locked_until.is_some_and(|u| u <= now) {
            *entry = Failures {
                count: 0,
                first: now,
                locked_until: None,
            };
        }
        entry.count += 1;
        if entry.count >= self.max_failures {
            entry.locked_until = Some(now + self.lockout);
        }
    }

    pub fn succeeded(&self, username: &str) {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(username);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_unlocks_later() {
        let throttle = LoginThrottle::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..2 {
            throttle.failed_at("alice", t0);
        }
        assert!(throttle.check_at("alice", t0).is_ok());
        throttle.failed_at("alice", t0);
        let wait = throttle.check_at("alice", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        assert!(
            throttle.check_at("bob", t0).is_ok(),
            "other users are not affected"
        );
        assert!(throttle.check_at("alice", t0 + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn success_resets() {
        let throttle = LoginThrottle::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        throttle.failed_at("alice", t0);
        throttle.succeeded("alice");
        throttle.failed_at("alice", t0);
        assert!(throttle.check_at("alice", t0).is_ok());
    }
}
