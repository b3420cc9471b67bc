//! Window statistics of one metric of one device: the values that arrived within the last
//! `window_ms` (server time), before the message being evaluated.

use std::collections::VecDeque;

/// Summary of a window, as expressions see it (`metrics.temperature.avg`…).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowStats {
    pub count: u64,
    pub sum: f64,
    pub avg: f64,
    /// Population standard deviation.
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub last: f64,
}

/// The recent numeric values of one metric, oldest first, bounded in length.
#[derive(Debug, Clone, Default)]
pub struct MetricWindow {
    values: VecDeque<(i64, f64)>,
}

/// Values kept per metric whatever the window, so a chatty device cannot grow memory.
pub const MAX_WINDOW_VALUES: usize = 4096;

impl MetricWindow {
    pub fn push(&mut self, at_ms: i64, value: f64) {
        if self.values.len() == MAX_WINDOW_VALUES {
            self.values.pop_front();
        }
        self.values.push_back((at_ms, value));
    }

    /// Drops values older than `now_ms - keep_ms`.
    pub fn prune(&mut self, now_ms: i64, keep_ms: i64) {
        let oldest = now_ms.saturating_sub(keep_ms);
        while self.values.front().is_some_and(|(t, _)| *t < oldest) {
            self.values.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Statistics of the values within `[now_ms - window_ms, now_ms]`.
    pub fn stats(&self, now_ms: i64, window_ms: i64) -> WindowStats {
        let oldest = now_ms.saturating_sub(window_ms);
        let mut count = 0u64;
        let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
        let (mut min, mut max, mut last) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
        for &(t, v) in self.values.iter().rev() {
            if t < oldest {
                break;
            }
            if count == 0 {
                last = v;
            }
            count += 1;
            sum += v;
            sum_sq += v * v;
            min = min.min(v);
            max = max.max(v);
        }
        if count == 0 {
            return WindowStats::default();
        }
        let avg = sum / count as f64;
        let variance = (sum_sq / count as f64 - avg * avg).max(0.0);
        WindowStats {
            count,
            sum,
            avg,
            std: variance.sqrt(),
            min,
            max,
            last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_cover_only_the_window() {
        let mut w = MetricWindow::default();
        w.push(0, 100.0);
        for (i, v) in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0].into_iter().enumerate() {
            w.push(10_000 + i as i64, v);
        }
        let s = w.stats(10_010, 5_000);
        assert_eq!(s.count, 8);
        assert_eq!(s.avg, 5.0);
        assert_eq!(s.std, 2.0);
        assert_eq!((s.min, s.max, s.last, s.sum), (2.0, 9.0, 9.0, 40.0));
        let all = w.stats(10_010, 60_000);
        assert_eq!(all.count, 9);
        assert_eq!(all.max, 100.0);
    }

    #[test]
    fn empty_and_pruned_windows() {
        let mut w = MetricWindow::default();
        assert_eq!(w.stats(0, 1000).count, 0);
        w.push(0, 1.0);
        w.push(5000, 2.0);
        w.prune(6000, 2000);
        assert_eq!(w.stats(6000, 60_000).count, 1);
        for i in 0..(MAX_WINDOW_VALUES as i64 + 10) {
            w.push(6000 + i, 1.0);
        }
        assert_eq!(
            w.stats(i64::MAX / 2, i64::MAX / 2).count as usize,
            MAX_WINDOW_VALUES
        );
    }
}
