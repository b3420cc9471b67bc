//! Drover: an IoT device management platform in one binary.
//!
//! The `drover` binary (src/main.rs) is a thin CLI over this library; integration tests start
//! the same [`server`] in process on loopback ports.

pub mod analytics;
pub mod audit;
pub mod auth;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod devcerts;
pub mod fleet_ops;
pub mod health;
pub mod heap;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod ota;
pub mod presence;
pub mod rules;
pub mod server;
pub mod state;
pub mod storage;
pub mod telemetry;
