//! Storage adapters: the registry over diesel (SQLite or PostgreSQL), and device shadows
//! kept in it (cached in Redis when configured).

pub mod commands;
pub mod db;
pub mod device_types;
pub mod files;
pub mod firmware;
pub mod jobs;
pub mod mqtt;
pub mod ota;
pub mod records;
pub mod registry;
pub mod rules;
pub mod schema;
pub mod shadows;

pub use db::{Backend, Database, StoreError};
pub use registry::RegistryStore;
