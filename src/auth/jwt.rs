//! Login tokens: HS256 JWTs with expiry, not-before and a tolerated clock skew.
//!
//! Several keys can be in use at once, each named by a key id (`kid` in the token header): the
//! newest signs, and keys retired by a rotation keep verifying the tokens they signed until those
//! expire. A token naming a key this node does not hold is refused.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use drover_actors::Role;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    /// The user's token generation when this token was issued: a password change raises it and
    /// ends every earlier login. Absent in tokens issued before generations existed (0).
    #[serde(default)]
    pub generation: i64,
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
    pub generation: i64,
}

/// One HMAC key as configured or kept in the key file.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub kid: String,
    pub secret: Vec<u8>,
    /// When a rotation replaced it (Unix seconds); `None` for a key still signing.
    pub retired_at: Option<i64>,
}

/// The key id of a secret: 16 hex characters of a domain-separated SHA-256, so the same secret
/// gets the same id on every node and the id reveals nothing usable about the secret.
pub fn key_id(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"drover jwt key id\0");
    hasher.update(secret);
    hex::encode(&hasher.finalize()[..8])
}

struct VerifyingKey {
    key: DecodingKey,
    retired_at: Option<i64>,
}

pub struct JwtKeys {
    kid: String,
    encoding: EncodingKey,
    verifying: HashMap<String, VerifyingKey>,
    ttl_secs: i64,
    validation: Validation,
}

impl JwtKeys {
    /// One key, signing and verifying.
    pub fn new(secret: &[u8], ttl_secs: u64, clock_skew_secs: u64) -> Self {
        let key = SigningKey {
            kid: key_id(secret),
            secret: secret.to_vec(),
            retired_at: None,
        };
        Self::from_keys(&[key], ttl_secs, clock_skew_secs).expect("one signing key")
    }

    /// The newest key without `retired_at` signs; retired keys only verify, and only while a
    /// token they signed can still be unexpired. `None` when no key is left to sign with.
    pub fn from_keys(keys: &[SigningKey], ttl_secs: u64, clock_skew_secs: u64) -> Option<Self> {
        let signing = keys.iter().rev().find(|k| k.retired_at.is_none())?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = clock_skew_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        let oldest_useful = Utc::now().timestamp() - (ttl_secs + clock_skew_secs) as i64;
        let verifying = keys
            .iter()
            .filter(|k| k.retired_at.is_none_or(|at| at >= oldest_useful))
            .map(|k| {
                (
                    k.kid.clone(),
                    VerifyingKey {
                        key: DecodingKey::from_secret(&k.secret),
                        retired_at: k.retired_at,
                    },
                )
            })
            .collect();
        Some(JwtKeys {
            kid: signing.kid.clone(),
            encoding: EncodingKey::from_secret(&signing.secret),
            verifying,
            ttl_secs: ttl_secs as i64,
            validation,
        })
    }

    /// The id of the key new tokens are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.kid
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
            generation: subject.generation,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let expires = Utc.timestamp_opt(claims.exp, 0).single().unwrap_or(now);
        Ok((token, expires))
    }

    /// Checks key id, signature, algorithm, issuer, expiry and not-before (with the configured
    /// skew). A token without a key id predates key ids and is checked with the signing key.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid("malformed token".into()))?;
        let kid = header.kid.unwrap_or_else(|| self.kid.clone());
        let key = self
            .verifying
            .get(&kid)
            .ok_or_else(|| TokenError::Invalid("unknown key id".into()))?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
                ErrorKind::ImmatureSignature => TokenError::Invalid("token not valid yet".into()),
                ErrorKind::InvalidAlgorithm => TokenError::Invalid("unsupported algorithm".into()),
                _ => TokenError::Invalid("malformed token".into()),
            })?;
        // A retired key signs nothing after its retirement: such a token was forged with a
        // leaked old key.
        if key.retired_at.is_some_and(|at| claims.iat > at) {
            return Err(TokenError::Invalid("signed by a retired key".into()));
        }
        Ok(claims)
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
            generation: 0,
        }
    }

    fn key(secret: &[u8], retired_at: Option<i64>) -> SigningKey {
        SigningKey {
            kid: key_id(secret),
            secret: secret.to_vec(),
            retired_at,
        }
    }

    #[test]
    fn a_rotated_out_key_verifies_its_tokens_until_they_expire() {
        let old = b"old-key-old-key-old-key-old-key-";
        let new = b"new-key-new-key-new-key-new-key-";
        let before = JwtKeys::from_keys(&[key(old, None)], 3600, 60).unwrap();
        let (token, _) = before.issue(subject()).unwrap();
        // Rotation: the old key retired now, the new one signs.
        let now = Utc::now().timestamp();
        let after = JwtKeys::from_keys(&[key(old, Some(now)), key(new, None)], 3600, 60).unwrap();
        assert_eq!(after.verify(&token).unwrap().usr, "alice");
        let (fresh, _) = after.issue(subject()).unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&fresh).unwrap().kid.as_deref(),
            Some(key_id(new).as_str())
        );
        // Retired longer ago than a token lives: dropped, and its tokens are refused.
        let later = JwtKeys::from_keys(&[key(old, Some(now - 4000)), key(new, None)], 3600, 60).unwrap();
        assert_eq!(
            later.verify(&token).unwrap_err(),
            TokenError::Invalid("unknown key id".into())
        );
    }

    #[test]
    fn tokens_a_retired_key_signed_after_its_retirement_are_refused() {
        let old = b"old-key-old-key-old-key-old-key-";
        let leaked = JwtKeys::from_keys(&[key(old, None)], 3600, 60).unwrap();
        let (token, _) = leaked.issue(subject()).unwrap();
        let retired_before = Utc::now().timestamp() - 10;
        let keys = JwtKeys::from_keys(&[key(old, Some(retired_before)), key(b"n", None)], 3600, 60).unwrap();
        assert!(keys.verify(&token).is_err());
    }

    #[test]
    fn an_unknown_key_id_is_refused() {
        let keys = JwtKeys::new(b"0123456789abcdef0123456789abcdef", 3600, 60);
        let other = JwtKeys::new(b"another-secret-another-secret-xx", 3600, 60);
        let (token, _) = other.issue(subject()).unwrap();
        assert_eq!(
            keys.verify(&token).unwrap_err(),
            TokenError::Invalid("unknown key id".into())
        );
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
        // Another secret claiming this key's id.
        let forger = SigningKey {
            kid: keys.signing_kid().to_string(),
            secret: b"another-secret-another-secret-xx".to_vec(),
            retired_at: None,
        };
        let other = JwtKeys::from_keys(&[forger], 3600, 60).unwrap();
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
