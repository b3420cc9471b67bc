//! Analytics, adapter half: backtesting the streaming detectors over a CSV file.
//!
//! The maths is the domain half, `drover_actors::analytics` (actors/src/analytics/); this
//! module only reads rows, parses their timestamps and values, feeds them to exactly the
//! detectors live telemetry will use, and writes each row back with its score and flag.

use std::io::{Read, Write};

use chrono::{DateTime, NaiveDateTime, Utc};
use drover_actors::analytics::AnalyticsError;
use drover_actors::analytics::detector::{Detector, Method, detector_for};
use drover_actors::analytics::isolation::{DEFAULT_SEED, IsolationDetector, IsolationOptions};
use drover_actors::{DeviceId, MetricName};
use serde::Deserialize;
use serde_json::{Value, json};

/// Errors of [`score_csv`].
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("line {line}: {reason}")]
    Row { line: u64, reason: String },
    #[error("the input needs a header and at least one value column: timestamp,value[,value…]")]
    NoValueColumns,
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts of a backtest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BacktestSummary {
    pub rows: u64,
    /// Rows with a score (not warming up, every value present).
    pub scored: u64,
    pub anomalous: u64,
}

/// Parses a timestamp as RFC 3339, `YYYY-MM-DD HH:MM:SS[.fff]` (UTC), or a Unix epoch in seconds
/// (milliseconds when above 10¹¹, which in seconds would be the year 5138).
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    let epoch: f64 = text.parse().ok().filter(|v: &f64| v.is_finite())?;
    let millis = if epoch.abs() > 1e11 { epoch } else { epoch * 1000.0 };
    DateTime::from_timestamp_millis(millis.round() as i64)
}

/// The detectors for one file: one univariate detector per column, or one isolation forest over
/// all columns.
enum Scorer {
    PerColumn(Vec<Box<dyn Detector + Send>>),
    Forest(Box<IsolationDetector>),
}

impl Scorer {
    fn new(
        method: Method,
        threshold: Option<f64>,
        columns: usize,
        seed: u64,
    ) -> Result<Self, AnalyticsError> {
        Ok(match method {
            Method::Eif => {
                let options = IsolationOptions {
                    threshold: threshold.unwrap_or(IsolationOptions::default().threshold),
                    seed,
                    ..IsolationOptions::default()
                };
                Scorer::Forest(Box::new(IsolationDetector::new(columns, options, 500, 1000)?))
            }
            other => Scorer::PerColumn((0..columns).map(|_| detector_for(other, threshold)).collect()),
        })
    }

    /// `(score, anomalous)` of a row; `None` while warming up or when a value is missing. With one
    /// detector per column the row's score is the highest column score.
    fn observe(&mut self, values: &[Option<f64>]) -> Result<Option<(f64, bool)>, AnalyticsError> {
        match self {
            Scorer::Forest(forest) => {
                let Some(values) = values.iter().copied().collect::<Option<Vec<f64>>>() else {
                    return Ok(None);
                };
                Ok(forest.observe_vector(&values)?.map(|v| (v.score, v.anomalous)))
            }
            Scorer::PerColumn(detectors) => {
                let mut row: Option<(f64, bool)> = None;
                let mut complete = true;
                for (detector, value) in detectors.iter_mut().zip(values) {
                    match value.and_then(|v| detector.observe(v)) {
                        Some(v) => {
                            let (score, flag) = row.unwrap_or((0.0, false));
                            row = Some((score.max(v.score), flag || v.anomalous));
                        }
                        None => complete = false,
                    }
                }
                Ok(row.filter(|_| complete))
            }
        }
    }
}

/// Scores a CSV of `timestamp,value[,value…]` (any header names) with `method` and writes every
/// row back with two more columns: `score` (the method's score, where 1.0 is its threshold;
/// empty while warming up) and `anomalous` (`true`/`false`, empty while warming up). Rows are
/// scored in file order, exactly as the live detectors would see them.
pub fn score_csv<R: Read, W: Write>(
    input: R,
    output: W,
    method: Method,
    threshold: Option<f64>,
) -> Result<BacktestSummary, BacktestError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let mut writer = csv::Writer::from_writer(output);
    let header = reader.headers()?.clone();
    if header.len() < 2 {
        return Err(BacktestError::NoValueColumns);
    }
    let mut out_header: Vec<&str> = header.iter().collect();
    out_header.extend(["score", "anomalous"]);
    writer.write_record(&out_header)?;
    let mut scorer = Scorer::new(method, threshold, header.len() - 1, DEFAULT_SEED)?;
    let mut summary = BacktestSummary::default();
    let mut values = Vec::with_capacity(header.len() - 1);
    for record in reader.records() {
        let record = record?;
        let line = record.position().map_or(0, |p| p.line());
        let row_error = |reason: String| BacktestError::Row { line, reason };
        let timestamp = record.get(0).unwrap_or_default();
        if parse_timestamp(timestamp).is_none() {
            return Err(row_error(format!(
                "timestamp {timestamp:?} is not RFC 3339, YYYY-MM-DD HH:MM:SS or a Unix epoch"
            )));
        }
        values.clear();
        for (column, cell) in record.iter().enumerate().skip(1) {
            // An empty cell is a missing value: that row is not scored, the stream goes on.
            let value = if cell.is_empty() {
                None
            } else {
                let v: f64 = cell
                    .parse()
                    .map_err(|_| row_error(format!("column {}: {cell:?} is not a number", column + 1)))?;
                Some(v).filter(|v| v.is_finite())
            };
            values.push(value);
        }
        let verdict = scorer.observe(&values)?;
        summary.rows += 1;
        let (score, flag) = match verdict {
            Some((score, anomalous)) => {
                summary.scored += 1;
                summary.anomalous += u64::from(anomalous);
                (format!("{score:.6}"), anomalous.to_string())
            }
            None => (String::new(), String::new()),
        };
        let mut out: Vec<&str> = record.iter().collect();
        out.push(&score);
        out.push(&flag);
        writer.write_record(&out)?;
    }
    writer.flush()?;
    Ok(summary)
}

/// `POST /api/analytics/backtest`: the CSV backtest over a device's stored range.
#[derive(Debug, Clone)]
pub struct StoredBacktest {
    pub device: DeviceId,
    pub metrics: Vec<MetricName>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub method: Method,
    pub threshold: Option<f64>,
    pub seed: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BacktestBody {
    device_id: String,
    metrics: Vec<String>,
    start: String,
    end: Option<String>,
    method: Option<String>,
    threshold: Option<f64>,
    seed: Option<u64>,
}

/// Most metrics one backtest scores together (the forest's limit).
pub const MAX_BACKTEST_METRICS: usize = drover_actors::analytics::isolation::MAX_METRICS;

impl StoredBacktest {
    /// Reads and checks a request body; the error says what to fix.
    pub fn from_json(body: Value) -> Result<StoredBacktest, String> {
        let b: BacktestBody = serde_json::from_value(body).map_err(|e| e.to_string())?;
        let device = DeviceId::parse(&b.device_id).map_err(|e| format!("deviceId: {e}"))?;
        if b.metrics.is_empty() || b.metrics.len() > MAX_BACKTEST_METRICS {
            return Err(format!("metrics: name 1 to {MAX_BACKTEST_METRICS} metrics"));
        }
        let metrics = b
            .metrics
            .iter()
            .map(|m| MetricName::parse(m.as_str()).map_err(|e| format!("metrics: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let start =
            parse_timestamp(&b.start).ok_or("start: expected RFC 3339, YYYY-MM-DD HH:MM:SS or epoch")?;
        let end = match &b.end {
            Some(e) => parse_timestamp(e).ok_or("end: expected RFC 3339, YYYY-MM-DD HH:MM:SS or epoch")?,
            None => Utc::now(),
        };
        if start >= end {
            return Err("start must be before end".into());
        }
        let method = match &b.method {
            Some(m) => m.parse::<Method>().map_err(|e| e.to_string())?,
            None => Method::Ensemble,
        };
        if method == Method::Drift {
            return Err(
                "method: drift raises events, not scores; use zscore, mad, ewma, eif or ensemble".into(),
            );
        }
        if let Some(t) = b.threshold
            && !(t.is_finite() && t > 0.0)
        {
            return Err("threshold: expected a positive number".into());
        }
        Ok(StoredBacktest {
            device,
            metrics,
            start,
            end,
            method,
            threshold: b.threshold,
            seed: b.seed.unwrap_or(DEFAULT_SEED),
        })
    }

    /// Scores the rows made of `columns` (one `(ts, value)` series per metric, aligned on
    /// timestamps) exactly as the CSV backtest does.
    pub fn run(&self, columns: &[Vec<(i64, f64)>]) -> Result<Value, AnalyticsError> {
        let mut times: Vec<i64> = columns.iter().flatten().map(|(t, _)| *t).collect();
        times.sort_unstable();
        times.dedup();
        let lookups: Vec<std::collections::HashMap<i64, f64>> =
            columns.iter().map(|c| c.iter().copied().collect()).collect();
        let mut scorer = Scorer::new(self.method, self.threshold, columns.len(), self.seed)?;
        let mut rows = Vec::with_capacity(times.len());
        let (mut scored, mut anomalous) = (0u64, 0u64);
        for t in times {
            let values: Vec<Option<f64>> = lookups.iter().map(|l| l.get(&t).copied()).collect();
            let verdict = scorer.observe(&values)?;
            if let Some((_, flag)) = verdict {
                scored += 1;
                anomalous += u64::from(flag);
            }
            rows.push(json!({
                "ts": t,
                "values": values,
                "score": verdict.map(|(s, _)| if s.is_finite() { s } else { f64::MAX }),
                "anomalous": verdict.map(|(_, a)| a),
            }));
        }
        Ok(json!({
            "deviceId": self.device.as_str(),
            "metrics": self.metrics.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "method": self.method.as_str(),
            "seed": self.seed,
            "rows": rows.len(),
            "scored": scored,
            "anomalous": anomalous,
            "results": rows,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_the_three_formats() {
        let expected = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_timestamp("2026-03-01T12:00:00Z"), Some(expected));
        assert_eq!(parse_timestamp("2026-03-01T13:00:00+01:00"), Some(expected));
        assert_eq!(parse_timestamp("2026-03-01 12:00:00"), Some(expected));
        assert_eq!(parse_timestamp("1772366400"), Some(expected));
        assert_eq!(parse_timestamp("1772366400000"), Some(expected));
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("NaN"), None);
    }

    fn series_csv(spike_at: usize) -> String {
        let mut csv = String::from("time,temperature\n");
        for i in 0..300 {
            let value = if i == spike_at {
                60.0
            } else {
                20.0 + (i % 7) as f64 * 0.5
            };
            csv.push_str(&format!("{},{value}\n", 1_772_366_400 + i * 60));
        }
        csv
    }

    #[test]
    fn flags_the_spike_and_keeps_every_row() {
        let mut out = Vec::new();
        let summary = score_csv(series_csv(250).as_bytes(), &mut out, Method::ZScore, None).unwrap();
        assert_eq!(
            summary,
            BacktestSummary {
                rows: 300,
                scored: 200,
                anomalous: 1
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "time,temperature,score,anomalous");
        assert_eq!(lines.len(), 301);
        assert!(lines[1].ends_with(",,"), "warming up: {}", lines[1]);
        assert!(lines[251].starts_with(&format!("{},60,", 1_772_366_400 + 250 * 60)));
        assert!(lines[251].ends_with(",true"), "{}", lines[251]);
    }

    #[test]
    fn the_same_input_gives_the_same_output() {
        let run = || {
            let mut out = Vec::new();
            score_csv(series_csv(200).as_bytes(), &mut out, Method::Ensemble, None).unwrap();
            out
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn bad_rows_name_their_line() {
        let input = "t,v\n2026-03-01 12:00:00,1\nnot a time,2\n";
        let error = score_csv(input.as_bytes(), Vec::new(), Method::ZScore, None).unwrap_err();
        assert!(matches!(error, BacktestError::Row { line: 3, .. }), "{error}");
        let input = "t,v\n2026-03-01 12:00:00,warm\n";
        let error = score_csv(input.as_bytes(), Vec::new(), Method::ZScore, None).unwrap_err();
        assert!(error.to_string().contains("line 2: column 2"), "{error}");
        let error = score_csv("t\n1\n".as_bytes(), Vec::new(), Method::ZScore, None).unwrap_err();
        assert!(matches!(error, BacktestError::NoValueColumns));
    }

    #[test]
    fn isolation_forest_scores_rows_of_several_metrics() {
        let mut csv = String::from("time,a,b\n");
        for i in 0..700 {
            let a = (i % 10) as f64;
            let b = if i == 650 { 100.0 } else { 2.0 * a };
            csv.push_str(&format!(
                "2026-03-01T00:{:02}:{:02}Z,{a},{b}\n",
                (i / 60) % 60,
                i % 60
            ));
        }
        let mut out = Vec::new();
        let summary = score_csv(csv.as_bytes(), &mut out, Method::Eif, None).unwrap();
        // 9 rows fill the feature window, 500 train the forest.
        assert_eq!(summary.scored, 700 - 509);
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().nth(651).unwrap().ends_with(",true"));
    }
}
