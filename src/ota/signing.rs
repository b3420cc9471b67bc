//! The Ed25519 key that signs firmware manifests, so a device can check that what it is about
//! to install is what this platform registered (a compromised download path cannot forge it).
//!
//! The key is the 32-byte seed from `firmware.signing_key` (`FIRMWARE_SIGNING_KEY`), or else the
//! one kept in `firmware-signing.key` (mode 0600) in the data directory, created on first start.
//! Nodes of a cluster must share it: set it in the configuration of each.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::config::Config;
use crate::storage::files;

/// File name of the generated key in the data directory.
pub const KEY_FILE: &str = "firmware-signing.key";

pub struct ManifestSigner {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for ManifestSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestSigner")
            .field("public_key", &self.public_key_base64())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("firmware.signing_key (FIRMWARE_SIGNING_KEY): {0}")]
    Config(String),
}

impl ManifestSigner {
    /// From a base64 32-byte seed.
    pub fn from_seed_base64(seed: &str) -> Result<ManifestSigner, String> {
        let bytes = BASE64
            .decode(seed.trim())
            .map_err(|e| format!("not base64: {e}"))?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&bytes)
            .map_err(|_| format!("expected a 32-byte Ed25519 seed, got {} bytes", bytes.len()))?;
        Ok(ManifestSigner { pair })
    }

    /// The configured key, or the data directory's key file (created when missing).
    pub fn load_or_create(config: &Config) -> Result<ManifestSigner, SigningKeyError> {
        if !config.firmware.signing_key.is_empty() {
            return Self::from_seed_base64(config.firmware.signing_key.expose())
                .map_err(SigningKeyError::Config);
        }
        let path = config.storage.data_dir.join(KEY_FILE);
        Self::from_file(&path)
    }

    fn from_file(path: &Path) -> Result<ManifestSigner, SigningKeyError> {
        let io = |source| SigningKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(seed) => Self::from_seed_base64(&seed).map_err(|message| SigningKeyError::Invalid {
                path: path.to_path_buf(),
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut seed)
                    .map_err(|_| io(std::io::Error::other("no system randomness")))?;
                let encoded = BASE64.encode(seed);
                files::write_private(path, encoded.as_bytes()).map_err(io)?;
                tracing::info!(key_file = %path.display(), "firmware signing key created");
                Self::from_seed_base64(&encoded).map_err(|message| SigningKeyError::Invalid {
                    path: path.to_path_buf(),
                    message,
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The signature of `message`, base64.
    pub fn sign_base64(&self, message: &[u8]) -> String {
        BASE64.encode(self.pair.sign(message).as_ref())
    }

    /// The raw 32-byte public key, base64: what devices verify with.
    pub fn public_key_base64(&self) -> String {
        BASE64.encode(self.pair.public_key().as_ref())
    }
}

/// Whether `signature` (base64) is `public_key`'s (base64) signature of `message`.
pub fn verify(public_key: &str, message: &[u8], signature: &str) -> bool {
    let (Ok(key), Ok(signature)) = (BASE64.decode(public_key), BASE64.decode(signature)) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, &signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_what_the_public_key_verifies_and_nothing_else() {
        let signer = ManifestSigner::from_seed_base64(&BASE64.encode([7u8; 32])).unwrap();
        let signature = signer.sign_base64(b"manifest");
        assert!(verify(&signer.public_key_base64(), b"manifest", &signature));
        assert!(!verify(&signer.public_key_base64(), b"manifest!", &signature));
        let other = ManifestSigner::from_seed_base64(&BASE64.encode([8u8; 32])).unwrap();
        assert!(!verify(&other.public_key_base64(), b"manifest", &signature));
    }

    #[test]
    fn a_bad_seed_is_refused_and_a_missing_file_is_created_once() {
        assert!(ManifestSigner::from_seed_base64("not base64!").is_err());
        assert!(ManifestSigner::from_seed_base64(&BASE64.encode([1u8; 16])).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let first = ManifestSigner::from_file(&path).unwrap();
        let again = ManifestSigner::from_file(&path).unwrap();
        assert_eq!(first.public_key_base64(), again.public_key_base64());
    }
}
