//! Channel secrets at rest: AES-256-GCM with a random 96-bit nonce per value.
//!
//! The key comes from `rules.secret_key` (`RULES_SECRET_KEY` / `DROVER_SECRET_KEY`); any string
//! works, its SHA-256 is the key. Without one, a random key is generated on first start and kept
//! in the registry's settings (so every node sharing the registry can decrypt).

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("stored secret is not valid base64")]
    Encoding,
    #[error("stored secret cannot be decrypted with the configured key (RULES_SECRET_KEY changed?)")]
    Decrypt,
}

/// Encrypts and decrypts channel secrets.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    pub fn from_passphrase(passphrase: &str) -> SecretBox {
        let digest = Sha256::digest(passphrase.as_bytes());
        SecretBox {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&digest)),
        }
    }

    /// `base64(nonce || ciphertext+tag)`.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    pub fn open(&self, sealed: &str) -> Result<String, SecretError> {
        let raw = STANDARD.decode(sealed).map_err(|_| SecretError::Encoding)?;
        if raw.len() < 12 + 16 {
            return Err(SecretError::Decrypt);
        }
        let (nonce, body) = raw.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), body)
            .map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| SecretError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_random_nonces_and_wrong_keys() {
        let b = SecretBox::from_passphrase("key one");
        let a1 = b.seal("hunter2");
        let a2 = b.seal("hunter2");
        assert_ne!(a1, a2, "a fresh nonce each time");
        assert!(!a1.contains("hunter2"));
        assert_eq!(b.open(&a1).unwrap(), "hunter2");
        assert_eq!(
            SecretBox::from_passphrase("key two").open(&a1),
            Err(SecretError::Decrypt)
        );
        assert_eq!(b.open("!!"), Err(SecretError::Encoding));
    }
}
