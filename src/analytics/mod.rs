//! Analytics, adapter half. The maths, the per-device monitors and the per-tenant actors are the
//! domain half, `drover_actors::analytics` (actors/src/analytics/); this folder connects them to
//! the rest of the server:
//! - [`backtest`]: `drover analytics score`, the streaming detectors over a CSV file;
//! - [`chart`]: forecast and anomaly pictures as SVG;
//! - [`cli`]: `drover analytics stats|anomaly|forecast|drift|correlate` on a CSV or a server;
//! - [`store`]: the registry tables (configuration layers, model snapshots, events);
//! - [`engine`]: starts the analytics router, shows events on `/ws`, counts for `/metrics`;
//! - [`series`]: reads a device's stored metrics for the REST endpoints and the CLI.
//!
//! The REST endpoints are `src/http/analytics.rs`.

pub mod backtest;
pub mod chart;
pub mod cli;
pub mod engine;
pub mod series;
pub mod store;

pub use backtest::{BacktestError, BacktestSummary, parse_timestamp, score_csv};
