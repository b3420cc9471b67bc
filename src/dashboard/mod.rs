//! The live dashboard stream: a hub that fans platform events out to WebSocket sessions.

pub mod hub;
pub mod session;

pub use hub::{DashboardHub, LiveEvent};
