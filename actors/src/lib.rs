//! Drover's domain and actor layer.
//!
//! This crate holds the types every part of the platform speaks (tenants, devices, roles), the
//! actors that own live device state, and the storage *traits* those actors need. It has no
//! transport or database code: the application crate decodes MQTT/HTTP/WebSocket input into these
//! types and provides the storage adapters.

pub mod analytics;
pub mod campaign;
pub mod clock;
pub mod device;
pub mod device_actor;
pub mod directory;
pub mod downsampler;
pub mod fleet;
pub mod ids;
pub mod job_actor;
pub mod outbound;
pub mod pipeline;
pub mod presence;
pub mod role;
pub mod rule_actor;
pub mod rule_router;
pub mod rule_workers;
pub mod rules;
pub mod sched;
pub mod shadow;
pub mod telemetry;
pub mod telemetry_writer;
pub mod tenant_supervisor;
mod turn;

pub use device::{ConnectionStatus, DeviceRecord};
pub use device_actor::DeviceActor;
pub use directory::{DeviceDirectory, DirectoryError, MemoryShadowStore, ShadowStore, ShadowStoreError};
pub use downsampler::Downsampler;
pub use fleet::Fleet;
pub use ids::{DeviceId, GroupName, IdError, TenantId};
pub use outbound::{DeviceOutbound, ShadowServices};
pub use presence::{NoPresence, PresenceSink};
pub use role::Role;
pub use shadow::{ShadowDocument, ShadowError, ShadowLimits};
pub use telemetry::store::{TelemetrySpool, TelemetryStore, TelemetryStoreError};
pub use telemetry::{MetricName, MetricValue, TelemetryPoint};
pub use tenant_supervisor::TenantSupervisor;
