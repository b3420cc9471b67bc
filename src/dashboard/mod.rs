//! The live dashboard stream: a hub that fans platform events out to WebSocket sessions, and
//! the web console that shows it.

pub mod activity;
pub mod console;
pub mod hub;
pub mod session;
pub mod socket;

pub use hub::{DashboardHub, LiveEvent};
