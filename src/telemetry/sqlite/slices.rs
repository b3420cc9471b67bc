//! Reading one long raw range in time slices at once, one per core, on connections that share
//! one snapshot: where to cut a range (balanced by the hour rollups' counts, on the query's
//! bucket grid), and the snapshot the slices are read in. What a slice computes and how slices
//! are merged is the query's business (`query.rs`).

use std::time::{Duration, Instant};

use drover_actors::telemetry::query::HOUR_MS;
use drover_actors::telemetry::store::TelemetryStoreError;
use rusqlite::{Connection, params};

use super::{ReaderPool, Writer, classify, floor_to};

/// A raw percentile scan is cut into time slices only where the hour rollups count at least this
/// many points per slice: below it, a second connection and thread cost about what they save
/// (a point costs ~100 ns to read).
pub(super) const MIN_POINTS_PER_SLICE: i64 = 25_000;
/// How long a query waits for the writer lock, under which its slices' snapshots are taken
/// together, before it reads the range in one slice instead.
const SNAPSHOT_WAIT: Duration = Duration::from_millis(5);

/// What a query may use beyond its own connection to read a long range in time slices at once,
/// one per core: more readers, and the writer lock under which their snapshots are taken.
pub(super) struct Slicing<'a> {
    pub pool: &'a ReaderPool,
    pub writer: &'a parking_lot::Mutex<Writer>,
    /// Slices read at once at most; 1 reads every range in one scan.
    pub max_slices: usize,
}

/// Points per hour of one series in `[start, end)` (the hours that overlap it), from the hour
/// rollups: what [`slice_bounds`] balances slices with. Hours not rolled up yet are missing,
/// which only makes the slices less even.
pub(super) fn hour_counts(
    conn: &Connection,
    id: i64,
    (start_ms, end_ms): (i64, i64),
) -> Result<Vec<(i64, i64)>, TelemetryStoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT bucket, count FROM rollup_1h WHERE series_id = ?1 AND bucket >= ?2 AND bucket < ?3 \
             ORDER BY bucket",
        )
        .map_err(classify)?;
    let rows = stmt
        .query_map(params![id, floor_to(start_ms, HOUR_MS), end_ms], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .map_err(classify)?;
    rows.collect::<Result<_, _>>().map_err(classify)
}

/// Where to cut `[start, end)` into at most `max_slices` time slices of about the same number of
/// points, at least `min_points` each, judged from `hours` (hour start and point count,
/// ascending). Cuts fall on hour boundaries floored to the query's bucket grid (`every`), so no
/// bucket spans two slices. Returns the bounds, `start` first and `end` last, strictly increasing.
pub(super) fn slice_bounds(
    (start_ms, end_ms): (i64, i64),
    every_ms: Option<i64>,
    hours: &[(i64, i64)],
    max_slices: usize,
    min_points: i64,
) -> Vec<i64> {
    let total: i64 = hours.iter().map(|&(_, count)| count.max(0)).sum();
    let slices = (total / min_points.max(1)).clamp(1, max_slices.max(1) as i64);
    let mut bounds = vec![start_ms];
    let mut seen = 0i64;
    let mut next = 1;
    for &(hour, count) in hours {
        seen += count.max(0);
        // The slice ends after the hour that brings it to its share of the points.
        while next < slices && seen as i128 * slices as i128 >= total as i128 * next as i128 {
            let cut = every_ms.map_or(hour + HOUR_MS, |every| (hour + HOUR_MS).div_euclid(every) * every);
            if cut > bounds[bounds.len() - 1] && cut < end_ms {
                bounds.push(cut);
            }
            next += 1;
        }
    }
    bounds.push(end_ms);
    bounds
}

/// The query's connection and more from the pool, each in a read transaction begun under the
/// writer lock, so all see the same snapshot: no commit can fall between them, and slices read
/// on different connections add up to what one scan would have read. Dropping it ends the
/// transactions and returns the extra connections to the pool.
pub(super) struct SliceSnapshot<'a> {
    main: &'a Connection,
    extra: Vec<Connection>,
    pool: &'a ReaderPool,
}

impl<'a> SliceSnapshot<'a> {
    /// `None` when the writer lock stays taken for [`SNAPSHOT_WAIT`] (a long write or
    /// maintenance pass): the caller reads in one scan rather than wait.
    pub(super) fn take(
        main: &'a Connection,
        slicing: &Slicing<'a>,
        extra: usize,
    ) -> Result<Option<SliceSnapshot<'a>>, TelemetryStoreError> {
        let mut snapshot = SliceSnapshot {
            main,
            extra: Vec::with_capacity(extra),
            pool: slicing.pool,
        };
        for _ in 0..extra {
            snapshot.extra.push(slicing.pool.get()?);
        }
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        let _writer = loop {
            match slicing.writer.try_lock() {
                Some(guard) => break guard,
                None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                None => return Ok(None),
            }
        };
        // A deferred transaction takes its snapshot at its first read.
        for conn in std::iter::once(main).chain(&snapshot.extra) {
            conn.execute_batch("BEGIN").map_err(classify)?;
            conn.query_row("SELECT count(*) FROM rollup_state", [], |row| {
                row.get::<_, i64>(0)
            })
            .map_err(classify)?;
        }
        Ok(Some(snapshot))
    }

    /// Runs `each` over `slices` (one per connection, the first on this thread, the others on a
    /// thread each) and returns the results in slice order.
    pub(super) fn scan<T: Send>(
        &mut self,
        slices: &[(i64, i64)],
        each: impl Fn(&Connection, (i64, i64)) -> Result<T, TelemetryStoreError> + Sync,
    ) -> Result<Vec<T>, TelemetryStoreError> {
        let Some((first, rest)) = slices.split_first() else {
            return Ok(Vec::new());
        };
        if rest.len() != self.extra.len() {
            return Err(TelemetryStoreError::Internal(format!(
                "{} slices for {} connections",
                slices.len(),
                self.extra.len() + 1
            )));
        }
        let each = &each;
        std::thread::scope(|scope| {
            let others: Vec<_> = self
                .extra
                .iter_mut()
                .zip(rest)
                .map(|(conn, range)| {
                    std::thread::Builder::new()
                        .name("telemetry-slice".into())
                        .spawn_scoped(scope, move || each(conn, *range))
                })
                .collect();
            let mut results = vec![each(self.main, *first)];
            for other in others {
                results.push(match other {
                    Ok(thread) => thread.join().unwrap_or_else(|_| {
                        Err(TelemetryStoreError::Internal("a slice scan panicked".into()))
                    }),
                    Err(e) => Err(TelemetryStoreError::Unavailable(format!(
                        "cannot start a thread for a slice scan: {e}"
                    ))),
                });
            }
            results.into_iter().collect()
        })
    }
}

impl Drop for SliceSnapshot<'_> {
    fn drop(&mut self) {
        for conn in std::iter::once(self.main).chain(&self.extra) {
            if !conn.is_autocommit() {
                // Nothing was written: ending the read transaction cannot fail in a way that
                // matters, and a connection left in one would pin the WAL.
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        for conn in self.extra.drain(..) {
            self.pool.put(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_699_920_000_000;
    const DAY_MS: i64 = 24 * HOUR_MS;

    #[test]
    fn slices_hold_about_the_same_points_and_cut_on_the_bucket_grid() {
        let hours: Vec<(i64, i64)> = (0..10).map(|h| (T0 + h * HOUR_MS, 100)).collect();
        let range = (T0 + 17, T0 + 10 * HOUR_MS);
        assert_eq!(slice_bounds(range, None, &[], 4, 10), vec![range.0, range.1]);
        // Too few points for two slices.
        assert_eq!(slice_bounds(range, None, &hours, 4, 600), vec![range.0, range.1]);
        assert_eq!(slice_bounds(range, None, &hours, 1, 10), vec![range.0, range.1]);
        assert_eq!(
            slice_bounds(range, None, &hours, 2, 10),
            vec![range.0, T0 + 5 * HOUR_MS, range.1]
        );
        assert_eq!(
            slice_bounds(range, Some(HOUR_MS), &hours, 4, 250),
            vec![
                range.0,
                T0 + 3 * HOUR_MS,
                T0 + 5 * HOUR_MS,
                T0 + 8 * HOUR_MS,
                range.1
            ]
        );
        // On a 2-hour grid the cuts are floored to it; on a day grid none is left inside.
        assert_eq!(
            slice_bounds(range, Some(2 * HOUR_MS), &hours, 4, 250),
            vec![
                range.0,
                T0 + 2 * HOUR_MS,
                T0 + 4 * HOUR_MS,
                T0 + 8 * HOUR_MS,
                range.1
            ]
        );
        assert_eq!(
            slice_bounds(range, Some(DAY_MS), &hours, 4, 10),
            vec![range.0, range.1]
        );
        // Points bunched at the end: the cuts follow them, and none falls on the end.
        let mut bunched = hours.clone();
        bunched[9].1 = 10_000;
        assert_eq!(slice_bounds(range, None, &bunched, 4, 10), vec![range.0, range.1]);
        bunched[8].1 = 10_000;
        assert_eq!(
            slice_bounds(range, None, &bunched, 2, 10),
            vec![range.0, T0 + 9 * HOUR_MS, range.1]
        );
    }
}
