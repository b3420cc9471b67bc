//! Login tokens: HS256 JWTs with expiry, not-before and a tolerated clock skew.

use chrono::{DateTime, TimeZone, Utc};
use drover_actors::Role;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

const ISSUER: &str = "drover";

/// What a login token says. Short names keep the token small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Username, for logs and the audit trail.
    pub usr: String,
    /// Tenant id.
    pub tid: String,
    pub role: Role,
    /// Platform admin.
    #[serde(default)]
    pub pa: bool,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub iss: String,
    pub jti: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Identity put into a new token.
pub struct TokenSubject<'a> {
    pub user_id: &'a str,
    pub username: &'a str,
    pub tenant: &'a str,
    pub role: Role,
    pub platform_admin: bool,
}

pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl_secs: i64,
    validation: Validation,
}

impl JwtKeys {
    pub fn new(secret: &[u8], ttl_secs: u64, clock_skew_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = clock_skew_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            ttl_secs: ttl_secs as i64,
            validation,
        }
    }

    /// A signed token for `subject`, and when it expires.
    pub fn issue(&self, subject: TokenSubject<'_>) -> Result<(String, DateTime<Utc>), TokenError> {
        self.issue_at(subject, Utc::now())
    }

    pub fn issue_at(
        &self,
        subject: TokenSubject<'_>,
        now: DateTime<Utc>,
    ) -> Result<(String, DateTime<Utc>), TokenError> {
        let iat = now.timestamp();
        let claims = Claims {
            sub: subject.user_id.to_string(),
            usr: subject.username.to_string(),
            tid: subject.tenant.to_string(),
            role: subject.role,
            pa: subject.platform_admin,
            iat,
            nbf: iat,
            exp: iat + self.ttl_secs,
            iss: ISSUER.to_string(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let expires = Utc.timestamp_opt(claims.exp, 0).single().unwrap_or(now);
        Ok((token, expires))
    }

    /// Checks signature, algorithm, issuer, expiry and not-before (with the configured skew).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
                ErrorKind::ImmatureSignature => TokenError::Invalid("token not valid yet".into()),
                ErrorKind::InvalidAlgorithm => TokenError::Invalid("unsupported algorithm".into()),
                _ => TokenError::Invalid("malformed token".into()),
            })
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn subject() -> TokenSubject<'static> {
        TokenSubject {
            user_id: "u1",
            username: "alice",
            tenant: "acme",
            role: Role::Operator,
            platform_admin: false,
        }
    }

    #[test]
    fn round_trip() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", 3600, 60);
        let (token, expires) = keys.issue(subject()).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.usr, "alice");
        assert_eq!(claims.role, Role::Operator);
        assert_eq!(claims.exp, expires.timestamp());
    }

    #[test]
    fn expired_tokens_are_refused_after_the_skew() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", 3600, 60);
        // Expired 30 s ago: inside the 60 s skew, still accepted.
        let (token, _) = keys
            .issue_at(subject(), Utc::now() - Duration::seconds(3630))
            .unwrap();
        assert!(keys.verify(&token).is_ok());
        // Expired 2 minutes ago: refused as expired.
        let (token, _) = keys
            .issue_at(subject(), Utc::now() - Duration::seconds(3720))
            .unwrap();
        assert_eq!(keys.verify(&token).unwrap_err(), TokenError::Expired);
    }

    #[test]
    fn future_tokens_within_skew_are_accepted() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", 3600, 60);
        let (token, _) = keys
            .issue_at(subject(), Utc::now() + Duration::seconds(30))
            .unwrap();
        assert!(keys.verify(&token).is_ok());
        let (token, _) = keys
            .issue_at(subject(), Utc::now() + Duration::seconds(600))
            .unwrap();
        assert!(matches!(keys.verify(&token), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn forged_and_garbage_tokens_are_refused() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", 3600, 60);
        let other = JwtKeys::new(b"another-secret-another-secret-xx", 3600, 60);
        let (token, _) = other.issue(subject()).unwrap();
        assert_eq!(
            keys.verify(&token).unwrap_err(),
            TokenError::Invalid("bad signature".into())
        );
        assert!(matches!(keys.verify("not.a.jwt"), Err(TokenError::Invalid(_))));
        // alg=none with the same claims.
        let (good, _) = keys.issue(subject()).unwrap();
        let payload = good.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(keys.verify(&none).is_err());
    }
}
