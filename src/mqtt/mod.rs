//! The MQTT broker.
pub mod acl;
pub mod auth;
pub mod broker;
pub mod connection;
pub mod delivery;
pub mod inflight;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod outbound;
pub mod qos2;
pub mod retained;
pub mod session;
pub mod subscriptions;
pub mod topic;
pub mod v3;
pub mod v5;
