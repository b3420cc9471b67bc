//! Storage adapters: the registry over diesel (SQLite or PostgreSQL).

pub mod db;
pub mod mqtt;
pub mod records;
pub mod registry;
pub mod rules;
pub mod schema;

pub use db::{Backend, Database, StoreError};
pub use registry::RegistryStore;
