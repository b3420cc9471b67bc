//! Benchmarks: each prints a table and a JSON line (see [`report`]).
pub mod analytics;
pub mod connect;
pub mod fanout;
pub mod ingest;
pub mod query;
pub mod report;
pub mod rules;
