//! The page cache wrapper of the embedded telemetry store (`telemetry::sqlite::pcache`), in a
//! process of its own: SQLite takes a page cache only before its first use, so this file holds
//! one test, which installs it before anything opens a database.
//!
//! Interleaved inserts into an index of 1 KiB pages split pages out of order (the case the
//! wrapper exists for), and rolled-back transactions shrink the database again (the case where
//! a truncation must reach SQLite's cache, or a later transaction would find stale pages).
//! Every row is checked against a model of what was committed, and SQLite checks its file.

use std::collections::BTreeMap;

use drover::telemetry::sqlite::pcache;
use rusqlite::{Connection, params};

#[test]
fn commits_skip_empty_truncations_and_rollbacks_still_drop_their_pages() {
    assert!(pcache::install(), "the wrapper goes in before SQLite's first use");
    assert!(pcache::install(), "and a second call reports it in place");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA page_size = 1024; PRAGMA journal_mode = WAL; PRAGMA cache_size = -4096; \
         CREATE TABLE points (series INTEGER NOT NULL, ts INTEGER NOT NULL, value REAL, \
         PRIMARY KEY (series, ts)) WITHOUT ROWID;",
    )
    .unwrap();
    // A second connection reads what the first committed, through its own cache.
    let reader = Connection::open(&path).unwrap();

    let mut model: BTreeMap<(i64, i64), f64> = BTreeMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (saved_before, _) = pcache::truncations();
    for round in 0..300_i64 {
        let rollback = round % 7 == 3;
        let tx = conn.unchecked_transaction().unwrap();
        let mut pending = Vec::new();
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO points (series, ts, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (series, ts) DO UPDATE SET value = excluded.value",
                )
                .unwrap();
            // One point for each of 200 series per round: every series' leaf fills and splits.
            for series in 0..200_i64 {
                let ts = round * 1000 + (next() % 1000) as i64;
                let value = (next() % 1_000_000) as f64 / 7.0;
                insert.execute(params![series, ts, value]).unwrap();
                pending.push(((series, ts), value));
            }
            if round % 11 == 5 {
                // Deletes free pages inside the file as well.
                let gone: Vec<(i64, i64)> = model.keys().filter(|_| next() % 5 == 0).copied().collect();
                let mut delete = tx
                    .prepare_cached("DELETE FROM points WHERE series = ?1 AND ts = ?2")
                    .unwrap();
                for key in &gone {
                    delete.execute(params![key.0, key.1]).unwrap();
                }
                if !rollback {
                    for key in gone {
                        model.remove(&key);
                    }
                }
            }
        }
        if rollback {
            tx.rollback().unwrap();
        } else {
            tx.commit().unwrap();
            model.extend(pending);
        }
        if round % 50 == 49 {
            let count: i64 = reader
                .query_row("SELECT count(*) FROM points", [], |row| row.get(0))
                .unwrap();
            assert_eq!(count as usize, model.len(), "round {round}");
        }
    }

    let rows: Vec<((i64, i64), f64)> = {
        let mut stmt = conn
            .prepare("SELECT series, ts, value FROM points ORDER BY series, ts")
            .unwrap();
        stmt.query_map([], |row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(rows.len(), model.len());
    for (got, want) in rows.iter().zip(&model) {
        assert_eq!((got.0, got.1.to_bits()), (*want.0, want.1.to_bits()));
    }
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");

    let (saved, forwarded) = pcache::truncations();
    assert!(
        saved > saved_before,
        "commits whose splits swapped pages through the locking page's number truncated nothing"
    );
    assert!(
        forwarded > 0,
        "rollbacks that shrank the database dropped their pages"
    );
}
