//! Credentials: random secrets and their digests, password hashing, login tokens (JWT) and the
//! failed-login throttle. Transport-free; the HTTP layer turns these into a caller identity.

pub mod jwt;
pub mod keyfile;
pub mod secrets;
pub mod throttle;

pub use jwt::{Claims, JwtKeys, TokenError};
pub use throttle::LoginThrottle;
