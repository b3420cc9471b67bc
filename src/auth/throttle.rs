//! Failed-login throttle, so passwords cannot be guessed at network speed. Kept in process: each
//! node throttles the attempts it sees.
//!
//! Failures are counted per (username, source address): an attacker guessing `admin`'s password
//! locks only their own attempts, and the owner logging in from elsewhere is not locked out.
//! A second count per source address, across usernames, stops one address from spraying many
//! usernames (credential stuffing). IPv6 sources are grouped by /64, the block one host gets.
//!
//! Memory is bounded whatever the callers send: a key is stored as a fixed 16-byte digest, never
//! the username itself, and each table is an insertion-ordered map with a hard entry cap (the
//! least recently failed entry goes first) whose expired entries are dropped as it is used. An
//! entry is about 120 bytes with the map's links and hash slot, so the default cap of 50,000 per
//! table bounds the throttle at about 12 MB.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hashlink::LinkedHashMap;
use sha2::{Digest, Sha256};

/// Settings of the throttle (from `[auth]` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct ThrottleLimits {
    /// Failures of one username from one source before that pair is locked.
    pub max_failures: u32,
    /// Failures from one source, whatever the username, before the source is locked.
    pub max_failures_per_source: u32,
    /// How long failures are remembered and a lock lasts.
    pub lockout: Duration,
    /// Entries each of the two tables holds at most.
    pub max_entries: usize,
}

/// Why a login is refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locked {
    /// This username from this source failed too often.
    Username { retry_after: Duration },
    /// This source failed too often across usernames.
    Source { retry_after: Duration },
}

impl Locked {
    pub fn retry_after(&self) -> Duration {
        match self {
            Locked::Username { retry_after } | Locked::Source { retry_after } => *retry_after,
        }
    }
}

/// A table key: the first 128 bits of a SHA-256, so every entry has the same small size and a
/// chosen username cannot collide with another on purpose.
type Key = [u8; 16];

struct Failures {
    count: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

impl Failures {
    /// Whether the entry says nothing any more: its window and any lock are over.
    fn expired(&self, now: Instant, lockout: Duration) -> bool {
        now.duration_since(self.first) >= lockout && self.locked_until.is_none_or(|u| u <= now)
    }
}

/// One table: counts by key with a failure limit, a window and an entry cap.
struct FailureTable {
    max_failures: u32,
    lockout: Duration,
    max_entries: usize,
    entries: LinkedHashMap<Key, Failures>,
}

impl FailureTable {
    fn new(max_failures: u32, lockout: Duration, max_entries: usize) -> Self {
        FailureTable {
            max_failures,
            lockout,
            max_entries: max_entries.max(1),
            entries: LinkedHashMap::new(),
        }
    }

    fn locked(&self, key: &Key, now: Instant) -> Option<Duration> {
        match self.entries.get(key).and_then(|f| f.locked_until) {
            Some(until) if until > now => Some(until - now),
            _ => None,
        }
    }

    /// Drops expired entries from the front (the least recently failed), a few at a time as the
    /// table is used, so no sweep ever walks the whole table.
    fn expire(&mut self, now: Instant) {
        while let Some((_, front)) = self.entries.front() {
            if !front.expired(now, self.lockout) {
                break;
            }
            self.entries.pop_front();
        }
    }

    fn fail(&mut self, key: Key, now: Instant) {
        self.expire(now);
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= self.max_entries {
                self.entries.pop_front();
            }
        }
        let lockout = self.lockout;
        let entry = self.entries.entry(key).or_insert(Failures {
            count: 0,
            first: now,
            locked_until: None,
        });
        // Failures older than the window, or a lock that has run out, start a new count.
        if now.duration_since(entry.first) >= lockout || entry.locked_until.is_some_and(|u| u <= now) {
            *entry = Failures {
                count: 0,
                first: now,
                locked_until: None,
            };
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count >= self.max_failures {
            entry.locked_until = Some(now + lockout);
        }
        self.entries.to_back(&key);
    }

    fn clear(&mut self, key: &Key) {
        self.entries.remove(key);
    }
}

struct Tables {
    pairs: FailureTable,
    sources: FailureTable,
}

pub struct LoginThrottle {
    tables: Mutex<Tables>,
}

/// The source as counted: an IPv4 address, or the /64 an IPv6 address belongs to.
fn source_bytes(source: IpAddr) -> Vec<u8> {
    match source {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets().to_vec(),
            None => v6.octets()[..8].to_vec(),
        },
    }
}

fn digest(parts: &[&[u8]]) -> Key {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let full = hasher.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&full[..16]);
    key
}

fn pair_key(username: &str, source: IpAddr) -> Key {
    digest(&[b"pair", username.as_bytes(), &source_bytes(source)])
}

fn source_key(source: IpAddr) -> Key {
    digest(&[b"source", &source_bytes(source)])
}

impl LoginThrottle {
    pub fn new(limits: ThrottleLimits) -> Self {
        LoginThrottle {
            tables: Mutex::new(Tables {
                pairs: FailureTable::new(limits.max_failures, limits.lockout, limits.max_entries),
                sources: FailureTable::new(
                    limits.max_failures_per_source,
                    limits.lockout,
                    limits.max_entries,
                ),
            }),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err` while this username from this source, or this source, is locked.
    pub fn check(&self, username: &str, source: IpAddr) -> Result<(), Locked> {
        self.check_at(username, source, Instant::now())
    }

    pub fn check_at(&self, username: &str, source: IpAddr, now: Instant) -> Result<(), Locked> {
        let tables = self.tables();
        if let Some(retry_after) = tables.sources.locked(&source_key(source), now) {
            return Err(Locked::Source { retry_after });
        }
        if let Some(retry_after) = tables.pairs.locked(&pair_key(username, source), now) {
            return Err(Locked::Username { retry_after });
        }
        Ok(())
    }

    pub fn failed(&self, username: &str, source: IpAddr) {
        self.failed_at(username, source, Instant::now())
    }

    pub fn failed_at(&self, username: &str, source: IpAddr, now: Instant) {
        let (pair, by_source) = (pair_key(username, source), source_key(source));
        let mut tables = self.tables();
        tables.pairs.fail(pair, now);
        tables.sources.fail(by_source, now);
    }

    /// A correct password clears that pair's count. The source's count stays: knowing one
    /// account's password must not reset an address's budget for guessing others.
    pub fn succeeded(&self, username: &str, source: IpAddr) {
        let pair = pair_key(username, source);
        self.tables().pairs.clear(&pair);
    }

    /// Entries held in both tables; at most twice `max_entries`.
    pub fn len(&self) -> usize {
        let tables = self.tables();
        tables.pairs.entries.len() + tables.sources.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const X: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const Y: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

    fn throttle(max_failures: u32, per_source: u32, max_entries: usize) -> LoginThrottle {
        LoginThrottle::new(ThrottleLimits {
            max_failures,
            max_failures_per_source: per_source,
            lockout: Duration::from_secs(60),
            max_entries,
        })
    }

    #[test]
    fn locks_after_max_failures_and_unlocks_later() {
        let throttle = throttle(3, 100, 1000);
        let t0 = Instant::now();
        for _ in 0..2 {
            throttle.failed_at("alice", X, t0);
        }
        assert!(throttle.check_at("alice", X, t0).is_ok());
        throttle.failed_at("alice", X, t0);
        let locked = throttle.check_at("alice", X, t0).unwrap_err();
        assert_eq!(
            locked,
            Locked::Username {
                retry_after: Duration::from_secs(60)
            }
        );
        assert!(
            throttle.check_at("bob", X, t0).is_ok(),
            "other users are not affected"
        );
        assert!(
            throttle
                .check_at("alice", X, t0 + Duration::from_secs(61))
                .is_ok()
        );
    }

    #[test]
    fn a_locked_pair_does_not_lock_the_owner_elsewhere() {
        let throttle = throttle(5, 100, 1000);
        let t0 = Instant::now();
        for _ in 0..5 {
            throttle.failed_at("admin", X, t0);
        }
        assert!(throttle.check_at("admin", X, t0).is_err());
        assert!(throttle.check_at("admin", Y, t0).is_ok());
    }

    #[test]
    fn one_source_spraying_usernames_is_locked() {
        let throttle = throttle(5, 10, 1000);
        let t0 = Instant::now();
        for i in 0..10 {
            throttle.failed_at(&format!("user{i}"), X, t0);
        }
        assert!(matches!(
            throttle.check_at("someone-else", X, t0),
            Err(Locked::Source { .. })
        ));
        assert!(throttle.check_at("someone-else", Y, t0).is_ok());
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64() {
        let throttle = throttle(2, 100, 1000);
        let t0 = Instant::now();
        let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1));
        let b = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 2));
        throttle.failed_at("alice", a, t0);
        throttle.failed_at("alice", b, t0);
        assert!(throttle.check_at("alice", a, t0).is_err());
    }

    #[test]
    fn success_resets_the_pair() {
        let throttle = throttle(2, 100, 1000);
        let t0 = Instant::now();
        throttle.failed_at("alice", X, t0);
        throttle.succeeded("alice", X);
        throttle.failed_at("alice", X, t0);
        assert!(throttle.check_at("alice", X, t0).is_ok());
    }

    #[test]
    fn a_hundred_thousand_distinct_failures_stay_within_the_cap() {
        let throttle = throttle(5, u32::MAX, 10_000);
        let t0 = Instant::now();
        // Long usernames too: only their digest is kept.
        let long = "x".repeat(4096);
        for i in 0..100_000u32 {
            throttle.failed_at(&format!("{long}{i}"), X, t0);
        }
        // 10,000 pairs plus the one source.
        assert_eq!(throttle.len(), 10_001);
    }

    #[test]
    fn expired_entries_are_dropped_as_the_table_is_used() {
        let throttle = throttle(5, u32::MAX, 10_000);
        let t0 = Instant::now();
        for i in 0..1000 {
            throttle.failed_at(&format!("user{i}"), X, t0);
        }
        assert_eq!(throttle.len(), 1001);
        // After the window, one new failure sweeps out everything that expired.
        throttle.failed_at("late", Y, t0 + Duration::from_secs(61));
        assert_eq!(throttle.len(), 2);
    }

    #[test]
    fn eviction_keeps_the_most_recently_failed() {
        let throttle = throttle(2, u32::MAX, 3);
        let t0 = Instant::now();
        throttle.failed_at("alice", X, t0);
        throttle.failed_at("bob", X, t0);
        throttle.failed_at("carol", X, t0);
        // alice fails again: she becomes the most recent, and the next newcomer evicts bob.
        throttle.failed_at("alice", X, t0);
        throttle.failed_at("dave", X, t0);
        assert!(
            throttle.check_at("alice", X, t0).is_err(),
            "alice's lock survived"
        );
    }
}
