//! Development certificates for MQTT over TLS: a CA, a server certificate it signs, and
//! device certificates (CN = device id) it signs. For trying TLS and mTLS locally and for the
//! tests; production uses certificates from the operator's own PKI. Also the verification
//! certificate that registering a CA takes (proof of possession of its key).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: PemPair,
    pub server: PemPair,
    /// (device id, its certificate and key).
    pub devices: Vec<(String, PemPair)>,
}

/// A CA named `ca_name`, a server certificate for `hosts` (names or IP addresses) and a
/// client certificate for each of `devices`.
pub fn generate(ca_name: &str, hosts: &[String], devices: &[String]) -> Result<DevCerts, DevCertError> {
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(hosts.to_vec())?;
    server_params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map_or("localhost", String::as_str),
    );
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca)?;

    let mut issued = Vec::new();
    for device in devices {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, device.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca)?;
        issued.push((
            device.clone(),
            PemPair {
                cert: cert.pem(),
                key: key.serialize_pem(),
            },
        ));
    }
    Ok(DevCerts {
        ca: PemPair {
            cert: ca.pem(),
            key: ca_key_pem,
        },
        server: PemPair {
            cert: server.pem(),
            key: server_key.serialize_pem(),
        },
        devices: issued,
    })
}

/// A verification certificate for CA registration: CN = `code` (the tenant's registration code,
/// `GET /api/mqtt/cas/registration-code`), signed by the key of `ca`. It proves that whoever
/// registers the CA holds its private key. The certificate's own key is thrown away.
pub fn verification_certificate(ca: &PemPair, code: &str) -> Result<PemPair, DevCertError> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, KeyPair::from_pem(&ca.key)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, code);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(PemPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

impl DevCerts {
    /// Writes `ca.pem`, `ca.key`, `server.pem`, `server.key` and `device-<id>.pem/.key`.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, DevCertError> {
        let write = |name: String, text: &str| {
            let path = dir.join(name);
            // Private keys are for the server's user only; certificates may be read by anyone.
            let written = if path.extension().is_some_and(|e| e == "key") {
                crate::storage::files::write_private(&path, text.as_bytes())
            } else {
                std::fs::write(&path, text)
            };
            written.map_err(|source| DevCertError::Write {
                path: path.clone(),
                source,
            })?;
            Ok::<_, DevCertError>(path)
        };
        std::fs::create_dir_all(dir).map_err(|source| DevCertError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut written = vec![
            write("ca.pem".into(), &self.ca.cert)?,
            write("ca.key".into(), &self.ca.key)?,
            write("server.pem".into(), &self.server.cert)?,
            write("server.key".into(), &self.server.key)?,
        ];
        for (device, pair) in &self.devices {
            written.push(write(format!("device-{device}.pem"), &pair.cert)?);
            written.push(write(format!("device-{device}.key"), &pair.key)?);
        }
        Ok(written)
    }
}
