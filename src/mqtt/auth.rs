//! Who is connecting: a device (token, or a client certificate signed by a CA of its tenant),
//! an application (API key), or an anonymous client when that is allowed.
//!
//! A client certificate identifies a device of one tenant only: the tenant that registered the
//! CA which issued it. CA certificates are public, so registering one takes proof that the
//! tenant holds its private key ([`verify_possession`]), and a login by certificate looks the
//! device up in the issuing CA's tenant and nowhere else.
//!
//! Tokens and API keys are checked by their SHA-256 digest, one indexed lookup: fast enough
//! for connect storms, where argon2 would not be. No secret is ever logged.

use std::sync::Arc;

use chrono::Utc;
use drover_actors::{DeviceId, TenantId};
use parking_lot::RwLock;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;

use super::acl::Identity;
use crate::auth::secrets::{API_KEY_PREFIX, digest};
use crate::storage::records::{CaCertificate, DeviceLogin};
use crate::storage::{RegistryStore, StoreError};

/// What a CONNECT offers.
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The TLS client certificate chain (leaf first), when the client presented one.
    pub certificates: Option<Vec<CertificateDer<'static>>>,
}

/// Why a CONNECT is refused; mapped to CONNACK codes by the protocol glue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown or wrong credentials (v3: 4, v5: 0x86).
    BadCredentials(&'static str),
    /// Known credentials that may not connect (v3: 5, v5: 0x87).
    NotAuthorized(&'static str),
    /// The registry could not be asked (v3: 3, v5: 0x88).
    Unavailable,
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::BadCredentials(why) | Refusal::NotAuthorized(why) => why,
            Refusal::Unavailable => "registry_unavailable",
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(error: StoreError) -> Self {
        tracing::warn!(%error, "MQTT login could not reach the registry");
        Refusal::Unavailable
    }
}

/// A tenant CA, parsed once.
struct TrustedCa {
    tenant: TenantId,
    der: CertificateDer<'static>,
}

pub struct Authenticator {
    registry: RegistryStore,
    allow_anonymous: bool,
    cas: RwLock<Arc<Vec<TrustedCa>>>,
}

impl Authenticator {
    pub fn new(registry: RegistryStore, allow_anonymous: bool) -> Authenticator {
        Authenticator {
            registry,
            allow_anonymous,
            cas: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// Loads every tenant's CA certificates (at start and after a change through the API).
    pub async fn reload_cas(&self) -> Result<usize, StoreError> {
        let cas = self.registry.list_ca_certificates(None).await?;
        let parsed: Vec<TrustedCa> = cas.into_iter().filter_map(|ca| trusted(&ca)).collect();
        let n = parsed.len();
        *self.cas.write() = Arc::new(parsed);
        Ok(n)
    }

    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, Refusal> {
        if let Some(chain) = credentials.certificates.filter(|c| !c.is_empty()) {
            return self.by_certificate(&chain, credentials.username).await;
        }
        match (credentials.username, credentials.password) {
            (_, Some(password)) => {
                let secret =
                    std::str::from_utf8(password).map_err(|_| Refusal::BadCredentials("bad_password"))?;
                if secret.starts_with(API_KEY_PREFIX) {
                    self.by_api_key(secret).await
                } else {
                    self.by_device_token(credentials.username, secret).await
                }
            }
            (Some(_), None) => Err(Refusal::BadCredentials("missing_password")),
            (None, None) if self.allow_anonymous => Ok(Identity::Anonymous),
            (None, None) => Err(Refusal::NotAuthorized("anonymous_not_allowed")),
        }
    }

    async fn by_device_token(&self, username: Option<&str>, token: &str) -> Result<Identity, Refusal> {
        let Some(login) = self.registry.device_by_token(&digest(token)).await? else {
            return Err(Refusal::BadCredentials("unknown_token"));
        };
        // The username names the device; a token of another device is a wrong password.
        if username != Some(login.device.as_str()) {
            return Err(Refusal::BadCredentials("token_of_another_device"));
        }
        device_identity(login)
    }

    async fn by_api_key(&self, key: &str) -> Result<Identity, Refusal> {
        let Some(found) = self.registry.api_key_by_digest(&digest(key)).await? else {
            return Err(Refusal::BadCredentials("unknown_api_key"));
        };
        if found.key.revoked_at.is_some() {
            return Err(Refusal::BadCredentials("api_key_revoked"));
        }
        if found.key.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(Refusal::BadCredentials("api_key_expired"));
        }
        if found.tenant_disabled {
            return Err(Refusal::NotAuthorized("tenant_disabled"));
        }
        Ok(Identity::Application {
            tenant: found.key.tenant,
            key_id: found.key.id,
            role: found.key.role,
        })
    }

    /// A client certificate: its chain must lead to a CA registered for a tenant, and its CN
    /// must be the id of an enabled device of that tenant (never of another tenant, even one
    /// with a device of that id).
    async fn by_certificate(
        &self,
        chain: &[CertificateDer<'static>],
        username: Option<&str>,
    ) -> Result<Identity, Refusal> {
        let cn = common_name(&chain[0]).ok_or(Refusal::BadCredentials("certificate_without_cn"))?;
        let device = DeviceId::parse(cn.as_str())
            .map_err(|_| Refusal::BadCredentials("certificate_cn_not_a_device_id"))?;
        if username.is_some_and(|u| u != device.as_str()) {
            return Err(Refusal::BadCredentials("username_differs_from_certificate"));
        }
        let tenant = self.issuing_tenant(chain)?;
        let Some(login) = self.registry.device_login(&tenant, &device).await? else {
            return Err(Refusal::BadCredentials("certificate_for_unknown_device"));
        };
        device_identity(login)
    }

    /// The tenant owning the registered CA that issued the leaf, for client authentication,
    /// now. The CA that signed the leaf itself decides; only when none did is the chain
    /// followed through the intermediates the client sent. A chain leading to CAs of more
    /// than one tenant identifies nobody.
    fn issuing_tenant(&self, chain: &[CertificateDer<'static>]) -> Result<TenantId, Refusal> {
        let not_signed = Refusal::BadCredentials("certificate_not_signed_by_a_tenant_ca");
        let Ok(leaf) = webpki::EndEntityCert::try_from(&chain[0]) else {
            return Err(not_signed);
        };
        let cas = self.cas.read().clone();
        let tenants_verifying = |intermediates: &[CertificateDer<'static>]| {
            let mut tenants: Vec<TenantId> = Vec::new();
            for ca in cas.iter() {
                let Ok(anchor) = webpki::anchor_from_trusted_cert(&ca.der) else {
                    continue;
                };
                let verified = leaf
                    .verify_for_usage(
                        webpki::ALL_VERIFICATION_ALGS,
                        &[anchor],
                        intermediates,
                        UnixTime::now(),
                        webpki::KeyUsage::client_auth(),
                        None,
                        None,
                    )
                    .is_ok();
                if verified && !tenants.contains(&ca.tenant) {
                    tenants.push(ca.tenant.clone());
                }
            }
            tenants
        };
        let mut tenants = tenants_verifying(&[]);
        if tenants.is_empty() && chain.len() > 1 {
            tenants = tenants_verifying(&chain[1..]);
        }
        match tenants.len() {
            0 => Err(not_signed),
            1 => Ok(tenants.remove(0)),
            _ => Err(Refusal::BadCredentials("certificate_issuer_ambiguous")),
        }
    }
}

/// Why a verification certificate does not prove possession of a CA's key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PossessionError {
    #[error("the verification certificate is not an X.509 certificate: {0}")]
    NotACertificate(String),
    #[error("the verification certificate has no subject CN (it must be the registration code)")]
    NoCommonName,
    #[error("the verification certificate is not signed by this CA's private key")]
    NotSignedByCa,
}

/// Checks that `verification` is signed by the key of `ca` and answers its subject CN, which
/// the caller compares with the tenant's registration code. This is how a tenant proves it
/// holds the CA's private key (AWS IoT's verification certificates work the same way).
pub fn verify_possession(
    ca: &CertificateDer<'_>,
    verification: &CertificateDer<'_>,
) -> Result<String, PossessionError> {
    fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, PossessionError> {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map(|(_, cert)| cert)
            .map_err(|e| PossessionError::NotACertificate(e.to_string()))
    }
    let (ca, verification) = (parse(ca)?, parse(verification)?);
    verification
        .verify_signature(Some(ca.public_key()))
        .map_err(|_| PossessionError::NotSignedByCa)?;
    verification
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or(PossessionError::NoCommonName)
}

fn trusted(ca: &CaCertificate) -> Option<TrustedCa> {
    let der = parse_pem_certificates(&ca.pem).ok()?.into_iter().next()?;
    Some(TrustedCa {
        tenant: ca.tenant.clone(),
        der,
    })
}

/// The certificates of a PEM text.
pub fn parse_pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut reader = std::io::BufReader::new(pem.as_bytes());
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the PEM text".into());
    }
    Ok(certs)
}

/// The subject CN of a certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()
        .map(str::to_string)
}

/// The identity a device login gives, unless the device or its tenant is disabled.
fn device_identity(login: DeviceLogin) -> Result<Identity, Refusal> {
    if !login.enabled {
        return Err(Refusal::NotAuthorized("device_disabled"));
    }
    if login.tenant_disabled {
        return Err(Refusal::NotAuthorized("tenant_disabled"));
    }
    Ok(Identity::Device {
        tenant: login.tenant,
        device: login.device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcerts;

    fn der(pem: &str) -> CertificateDer<'static> {
        parse_pem_certificates(pem).unwrap().remove(0)
    }

    #[test]
    fn a_verification_certificate_proves_possession_of_the_ca_key_only() {
        let hosts = vec!["localhost".to_string()];
        let ours = devcerts::generate("Ours", &hosts, &[]).unwrap();
        let theirs = devcerts::generate("Theirs", &hosts, &[]).unwrap();
        let proof = devcerts::verification_certificate(&ours.ca, "code-123").unwrap();
        assert_eq!(
            verify_possession(&der(&ours.ca.cert), &der(&proof.cert)),
            Ok("code-123".to_string())
        );
        // Signed by another key (whoever holds a copy of our public CA certificate).
        assert_eq!(
            verify_possession(&der(&theirs.ca.cert), &der(&proof.cert)),
            Err(PossessionError::NotSignedByCa)
        );
    }
}
