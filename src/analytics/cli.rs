//! `drover analytics stats|anomaly|forecast|drift|correlate`: the analytics on a CSV file
//! (computed here with the same functions the server uses) or asked of a running server
//! (`--server URL --api-key KEY --device ID`, answered by `/api/analytics/…`). Prints JSON.

use std::io::Read;

use clap::{Args, Subcommand};
use drover_actors::analytics::AnalyticsError;
use drover_actors::analytics::correlation::{best_lag, pearson, spearman};
use drover_actors::analytics::detector::Method;
use drover_actors::analytics::drift::{DEFAULT_DRIFT_P_VALUE, ks_two_sample};
use drover_actors::analytics::forecast::{self as fc, Trend};
use drover_actors::analytics::stats::summarize;
use drover_actors::analytics::trend::{TrendDirection, mann_kendall};
use serde_json::{Value, json};

/// Errors of the analytics commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error(transparent)]
    Backtest(#[from] super::BacktestError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    #[error("server: {0}")]
    Server(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the data comes from: a CSV file, or a device on a running server.
#[derive(Debug, Clone, Args)]
pub struct Source {
    /// A CSV of `timestamp,value[,value…]` (any header names).
    #[arg(long, conflicts_with = "server")]
    pub input: Option<std::path::PathBuf>,
    /// The value column of the CSV (header name); default: the first.
    #[arg(long)]
    pub column: Option<String>,
    /// A running server's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, requires = "api_key")]
    pub server: Option<String>,
    /// An API key (or login token) of the tenant.
    #[arg(long, env = "DROVER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The device (with --server).
    #[arg(long)]
    pub device: Option<String>,
    /// The metric (with --server).
    #[arg(long)]
    pub metric: Option<String>,
    /// Range start (with --server): RFC 3339, a date or epoch.
    #[arg(long)]
    pub start: Option<String>,
    /// Range end (with --server).
    #[arg(long)]
    pub end: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum QueryCommand {
    /// Count, mean, deviation, min/max, quantiles, skewness, kurtosis (and the Mann–Kendall trend).
    Stats {
        #[command(flatten)]
        source: Source,
    },
    /// Anomalies: the rows the streaming detectors flag (CSV) or the stored events (server).
    Anomaly {
        #[command(flatten)]
        source: Source,
        /// zscore, mad, ewma, eif or ensemble (CSV).
        #[arg(long, default_value = "ensemble")]
        method: Method,
        #[arg(long)]
        threshold: Option<f64>,
    },
    /// Forecast with prediction intervals (CSV rows are taken as evenly spaced steps).
    Forecast {
        #[command(flatten)]
        source: Source,
        /// Steps ahead (CSV).
        #[arg(long, default_value_t = 24)]
        steps: usize,
        /// How far ahead (server), e.g. 2d.
        #[arg(long, default_value = "1d")]
        horizon: String,
        /// Step width (server), e.g. 1h.
        #[arg(long, default_value = "1h")]
        interval: String,
    },
    /// When a metric crosses a limit: one device (CSV, or --device on a server), or the
    /// server's fleet ranked by predicted time to the limit (--server without --device).
    Maintenance {
        #[command(flatten)]
        source: Source,
        /// The limit the metric must not cross.
        #[arg(long, allow_negative_numbers = true)]
        limit: f64,
        /// below (battery reaching 10) or above (vibration exceeding its limit).
        #[arg(long, default_value = "below")]
        direction: String,
        /// How far ahead to look: steps (CSV) or a duration (server, e.g. 7d).
        #[arg(long, default_value = "7d")]
        within: String,
        /// Step width (server), e.g. 1h.
        #[arg(long, default_value = "1h")]
        interval: String,
        /// Only devices of this type (fleet ranking).
        #[arg(long = "type")]
        device_type: Option<String>,
        /// Most devices listed (fleet ranking).
        #[arg(long, default_value_t = 50)]
        top: u32,
    },
    /// Two-sample Kolmogorov–Smirnov test, first half against second half.
    Drift {
        #[command(flatten)]
        source: Source,
        /// p-value below which the halves differ.
        #[arg(long, default_value_t = DEFAULT_DRIFT_P_VALUE)]
        threshold: f64,
    },
    /// Pearson and Spearman with p-values, and the best lag (CSV: the first two value columns;
    /// server: --a and --b as deviceId:metric).
    Correlate {
        #[command(flatten)]
        source: Source,
        #[arg(long)]
        a: Option<String>,
        #[arg(long)]
        b: Option<String>,
        /// Largest lag tried: rows (CSV) or seconds (server).
        #[arg(long, default_value_t = 0)]
        max_lag: u64,
    },
}

/// Reads the value columns of a CSV: `(header names, columns)`; empty cells are skipped.
fn read_columns(path: &std::path::Path) -> Result<(Vec<String>, Vec<Vec<f64>>), CliError> {
    let mut text = String::new();
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers()?.iter().skip(1).map(str::to_string).collect();
    if header.is_empty() {
        return Err(CliError::Usage("the CSV needs timestamp,value[,value…]".into()));
    }
    let mut columns = vec![Vec::new(); header.len()];
    for (line, record) in reader.records().enumerate() {
        let record = record?;
        for (i, cell) in record.iter().skip(1).enumerate().take(header.len()) {
            if cell.is_empty() {
                continue;
            }
            let v: f64 = cell
                .parse()
                .map_err(|_| CliError::Usage(format!("line {}: {cell:?} is not a number", line + 2)))?;
            columns[i].push(v);
        }
    }
    Ok((header, columns))
}

fn column(source: &Source, path: &std::path::Path) -> Result<Vec<f64>, CliError> {
    let (header, mut columns) = read_columns(path)?;
    let index = match &source.column {
        None => 0,
        Some(name) => header.iter().position(|h| h == name).ok_or_else(|| {
            CliError::Usage(format!("no column {name:?}; the CSV has {}", header.join(", ")))
        })?,
    };
    Ok(columns.swap_remove(index))
}

fn server_get(source: &Source, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
    let base = source
        .server
        .as_deref()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    let key = source.api_key.clone().unwrap_or_default();
    let mut query: Vec<(&str, String)> = query.to_vec();
    for (k, v) in [("start", &source.start), ("end", &source.end)] {
        if let Some(v) = v {
            query.push((k, v.clone()));
        }
    }
    let url = format!("{base}{path}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let response = reqwest::Client::new()
            .get(&url)
            .bearer_auth(key)
            .query(&query)
            .send()
            .await
            .map_err(|e| CliError::Server(e.to_string()))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| CliError::Server(e.to_string()))?;
        if !status.is_success() {
            return Err(CliError::Server(format!(
                "{status}: {}",
                body["error"]["message"]
            )));
        }
        Ok(body)
    })
}

fn required<'a>(value: &'a Option<String>, what: &str) -> Result<&'a str, CliError> {
    value
        .as_deref()
        .ok_or_else(|| CliError::Usage(format!("--{what} is required with --server")))
}

fn input(source: &Source) -> Result<&std::path::Path, CliError> {
    source.input.as_deref().ok_or_else(|| {
        CliError::Usage("give --input FILE.csv or --server URL --api-key KEY --device ID".into())
    })
}

/// Runs one command; the JSON to print.
pub fn run(command: &QueryCommand) -> Result<Value, CliError> {
    match command {
        QueryCommand::Stats { source } if source.server.is_some() => {
            let device = required(&source.device, "device")?;
            let metric = required(&source.metric, "metric")?.to_string();
            server_get(
                source,
                &format!("/api/analytics/stats/{device}"),
                &[("metric", metric)],
            )
        }
        QueryCommand::Stats { source } => {
            let values = column(source, input(source)?)?;
            let s = summarize(&values)?;
            let trend = mann_kendall(&values[values.len().saturating_sub(2000)..], 0.05).ok();
            Ok(json!({
                "count": s.count, "mean": s.mean, "stdDev": s.std_dev, "min": s.min, "max": s.max,
                "quantiles": s.quantiles.iter().map(|(p, v)| json!({"p": p, "value": v})).collect::<Vec<_>>(),
                "skewness": s.skewness, "kurtosis": s.kurtosis,
                "trend": trend.map(|t| json!({
                    "direction": match t.direction {
                        TrendDirection::Increasing => "increasing",
                        TrendDirection::Decreasing => "decreasing",
                        TrendDirection::None => "none",
                    },
                    "pValue": t.p_value, "slopePerRow": t.slope,
                })),
            }))
        }
        QueryCommand::Anomaly { source, .. } if source.server.is_some() => {
            let device = required(&source.device, "device")?.to_string();
            server_get(source, "/api/analytics/anomalies", &[("device", device)])
        }
        QueryCommand::Anomaly {
            source,
            method,
            threshold,
        } => {
            let file = std::fs::File::open(input(source)?)?;
            let mut scored = Vec::new();
            let summary = super::score_csv(file, &mut scored, *method, *threshold)?;
            let mut reader = csv::Reader::from_reader(scored.as_slice());
            let mut anomalies = Vec::new();
            for record in reader.records() {
                let record = record?;
                let n = record.len();
                if record.get(n - 1) == Some("true") {
                    anomalies.push(json!({
                        "timestamp": record.get(0),
                        "score": record.get(n - 2).and_then(|s| s.parse::<f64>().ok()),
                    }));
                }
            }
            Ok(json!({
                "method": method.as_str(),
                "rows": summary.rows,
                "scored": summary.scored,
                "anomalous": summary.anomalous,
                "anomalies": anomalies,
            }))
        }
        QueryCommand::Forecast {
            source,
            horizon,
            interval,
            ..
        } if source.server.is_some() => {
            let device = required(&source.device, "device")?;
            let metric = required(&source.metric, "metric")?.to_string();
            server_get(
                source,
                &format!("/api/analytics/forecast/{device}"),
                &[
                    ("metric", metric),
                    ("horizon", horizon.clone()),
                    ("interval", interval.clone()),
                ],
            )
        }
        QueryCommand::Forecast { source, steps, .. } => {
            let values = column(source, input(source)?)?;
            let f = fc::forecast(&values, *steps, fc::DEFAULT_LEVEL, None, Trend::Damped)?;
            let naive = fc::seasonal_naive(&values, f.season.unwrap_or(1), *steps)?;
            Ok(json!({
                "model": "ets-damped",
                "seasonSteps": f.season,
                "level": f.level,
                "points": (0..*steps).map(|i| json!({
                    "step": i + 1, "value": f.point[i], "lower": f.lower[i], "upper": f.upper[i], "naive": naive[i],
                })).collect::<Vec<_>>(),
            }))
        }
        QueryCommand::Maintenance {
            source,
            limit,
            direction,
            within,
            interval,
            device_type,
            top,
        } if source.server.is_some() => {
            let metric = required(&source.metric, "metric")?.to_string();
            let mut query = vec![
                ("metric", metric),
                ("limit", limit.to_string()),
                ("direction", direction.clone()),
                ("interval", interval.clone()),
            ];
            match &source.device {
                Some(device) => {
                    query.push(("horizon", within.clone()));
                    server_get(source, &format!("/api/analytics/maintenance/{device}"), &query)
                }
                None => {
                    query.push(("within", within.clone()));
                    query.push(("top", top.to_string()));
                    if let Some(t) = device_type {
                        query.push(("type", t.clone()));
                    }
                    server_get(source, "/api/analytics/maintenance", &query)
                }
            }
        }
        QueryCommand::Maintenance {
            source,
            limit,
            direction,
            within,
            ..
        } => {
            let values = column(source, input(source)?)?;
            let dir = match direction.as_str() {
                "below" => fc::Direction::Below,
                "above" => fc::Direction::Above,
                other => {
                    return Err(CliError::Usage(format!(
                        "--direction: above or below, not {other:?}"
                    )));
                }
            };
            let steps: usize = match within.parse() {
                Ok(n) if (1..=10_000).contains(&n) => n,
                _ => {
                    return Err(CliError::Usage(format!(
                        "--within: with --input, a number of rows ahead (1 to 10000), not {within:?}"
                    )));
                }
            };
            let f = fc::forecast(&values, steps, fc::DEFAULT_LEVEL, None, Trend::Linear)?;
            let c = fc::time_to_threshold(&f, *limit, dir);
            Ok(json!({
                "limit": limit,
                "direction": direction,
                "level": f.level,
                "expectedStep": c.expected,
                "earliestStep": c.earliest,
                "latestStep": c.latest,
                "withinHorizon": c.expected.is_some() || c.earliest.is_some(),
            }))
        }
        QueryCommand::Drift { source, threshold } if source.server.is_some() => {
            let device = required(&source.device, "device")?;
            let metric = required(&source.metric, "metric")?.to_string();
            server_get(
                source,
                &format!("/api/analytics/drift/{device}"),
                &[("metric", metric), ("threshold", threshold.to_string())],
            )
        }
        QueryCommand::Drift { source, threshold } => {
            let values = column(source, input(source)?)?;
            let (reference, recent) = values.split_at(values.len() / 2);
            let ks = ks_two_sample(reference, recent, *threshold)?;
            Ok(json!({
                "referenceCount": reference.len(), "recentCount": recent.len(),
                "statistic": ks.statistic, "pValue": ks.p_value, "threshold": threshold, "drifted": ks.drifted,
            }))
        }
        QueryCommand::Correlate {
            source,
            a,
            b,
            max_lag,
        } if source.server.is_some() => server_get(
            source,
            "/api/analytics/correlation",
            &[
                ("a", required(a, "a")?.to_string()),
                ("b", required(b, "b")?.to_string()),
                ("maxLagSecs", max_lag.to_string()),
            ],
        ),
        QueryCommand::Correlate { source, max_lag, .. } => {
            let (header, columns) = read_columns(input(source)?)?;
            if columns.len() < 2 {
                return Err(CliError::Usage("correlate needs two value columns".into()));
            }
            let n = columns[0].len().min(columns[1].len());
            let (x, y) = (&columns[0][..n], &columns[1][..n]);
            let p = pearson(x, y)?;
            let s = spearman(x, y)?;
            let lag = (*max_lag > 0)
                .then(|| best_lag(x, y, (*max_lag as usize).min(n / 2)))
                .transpose()?;
            Ok(json!({
                "a": header[0], "b": header[1], "pairs": n,
                "pearson": {"r": p.coefficient, "pValue": p.p_value},
                "spearman": {"rho": s.coefficient, "pValue": s.p_value},
                "bestLag": lag.map(|l| json!({"lagRows": l.lag, "r": l.correlation.coefficient, "pValue": l.correlation.p_value})),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv_file(rows: &[(usize, f64, f64)]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "time,temperature,humidity").unwrap();
        for (t, a, b) in rows {
            writeln!(f, "{},{a},{b}", 1_700_000_000 + t * 60).unwrap();
        }
        f
    }

    fn source(path: &std::path::Path) -> Source {
        Source {
            input: Some(path.to_path_buf()),
            column: None,
            server: None,
            api_key: None,
            device: None,
            metric: None,
            start: None,
            end: None,
        }
    }

    #[test]
    fn commands_on_a_csv() {
        let rows: Vec<(usize, f64, f64)> = (0..200)
            .map(|i| {
                let x = (i as f64 * 0.4).sin() + ((i * 7919) % 13) as f64 / 40.0;
                (i, if i == 150 { 30.0 } else { 20.0 + x }, 50.0 - 2.0 * x)
            })
            .collect();
        let f = csv_file(&rows);
        let src = source(f.path());
        let stats = run(&QueryCommand::Stats { source: src.clone() }).unwrap();
        assert_eq!(stats["count"], 200);
        let anomalies = run(&QueryCommand::Anomaly {
            source: src.clone(),
            method: Method::Ensemble,
            threshold: None,
        })
        .unwrap();
        assert!(
            anomalies["anomalies"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["timestamp"].as_str() == Some("1700009000")),
            "{anomalies}"
        );
        let forecast = run(&QueryCommand::Forecast {
            source: src.clone(),
            steps: 5,
            horizon: "1d".into(),
            interval: "1h".into(),
        })
        .unwrap();
        assert_eq!(forecast["points"].as_array().unwrap().len(), 5);
        let correlate = run(&QueryCommand::Correlate {
            source: src.clone(),
            a: None,
            b: None,
            max_lag: 3,
        })
        .unwrap();
        assert!(
            correlate["spearman"]["rho"].as_f64().unwrap() < -0.8,
            "{correlate}"
        );
        let drift = run(&QueryCommand::Drift {
            source: src.clone(),
            threshold: 0.05,
        })
        .unwrap();
        assert_eq!(drift["referenceCount"], 100);
        let missing = Source {
            column: Some("pressure".into()),
            ..src
        };
        assert!(matches!(
            run(&QueryCommand::Stats { source: missing }),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn maintenance_on_a_csv_counts_the_rows_until_the_limit() {
        // Falling 0.5 a row from 100: 50.5 at the last row, 40 about 21 rows later.
        let rows: Vec<(usize, f64, f64)> = (0..100)
            .map(|i| (i, 100.0 - 0.5 * i as f64 + ((i * 7919) % 13) as f64 / 100.0, 1.0))
            .collect();
        let f = csv_file(&rows);
        let maintenance = |limit: f64, direction: &str, within: &str| {
            run(&QueryCommand::Maintenance {
                source: source(f.path()),
                limit,
                direction: direction.into(),
                within: within.into(),
                interval: "1h".into(),
                device_type: None,
                top: 50,
            })
        };
        let m = maintenance(40.0, "below", "100").unwrap();
        let expected = m["expectedStep"].as_u64().unwrap();
        assert!((19..=23).contains(&expected), "{m}");
        assert!(m["earliestStep"].as_u64().unwrap() <= expected, "{m}");
        let m = maintenance(40.0, "below", "10").unwrap();
        assert_eq!(m["withinHorizon"], false, "{m}");
        assert!(matches!(
            maintenance(40.0, "sideways", "10"),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            maintenance(40.0, "below", "7d"),
            Err(CliError::Usage(_))
        ));
    }
}
