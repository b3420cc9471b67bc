//! The key file: the keys that sign login tokens (each with an id, so they can be rotated) and
//! the rules' secrets key. Kept out of the registry database, in a JSON file of mode 0600 in the
//! data directory (`AUTH_KEY_FILE`): anyone who reads the database must not be able to mint a
//! platform admin's token or open channel secrets.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::jwt::{SigningKey, key_id};
use super::secrets;
use crate::storage::files;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyFile {
    /// Oldest first; the last key that is not retired signs new tokens.
    pub jwt_keys: Vec<StoredJwtKey>,
    /// Seals channel secrets (webhook HMAC keys, SMS gateway tokens). Never rotated: the sealed
    /// secrets would no longer open.
    pub rules_secret_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoredJwtKey {
    pub kid: String,
    pub secret: String,
    /// Unix seconds.
    pub created_at: i64,
    /// When a rotation replaced it (Unix seconds); it verifies its tokens until they expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
}

impl StoredJwtKey {
    fn new(secret: String, now: i64) -> Self {
        StoredJwtKey {
            kid: key_id(secret.as_bytes()),
            secret,
            created_at: now,
            retired_at: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a usable key file: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl KeyFile {
    /// New random keys; `jwt_secret` and `rules_secret_key` keep the values an earlier version
    /// stored in the registry, so tokens and sealed channel secrets stay valid.
    pub fn adopt(jwt_secret: Option<String>, rules_secret_key: Option<String>, now: i64) -> KeyFile {
        KeyFile {
            jwt_keys: vec![StoredJwtKey::new(
                jwt_secret.unwrap_or_else(|| secrets::new_secret("")),
                now,
            )],
            rules_secret_key: rules_secret_key.unwrap_or_else(|| secrets::new_secret("")),
        }
    }

    /// Adds a JWT secret found in the registry as a retired key (a file written by another node
    /// already signs with its own), so the tokens it signed keep working until they expire.
    /// Returns whether anything changed.
    pub fn merge_jwt_secret(&mut self, secret: String, now: i64) -> bool {
        let kid = key_id(secret.as_bytes());
        if self.jwt_keys.iter().any(|k| k.kid == kid) {
            return false;
        }
        let mut key = StoredJwtKey::new(secret, now);
        key.retired_at = Some(now);
        self.jwt_keys.insert(0, key);
        true
    }

    /// `None` when there is no file at `path`. A file readable by others is tightened to 0600.
    pub fn load(path: &Path) -> Result<Option<KeyFile>, KeyFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(path)(e)),
        };
        files::restrict_file(path).map_err(io_error(path))?;
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| KeyFileError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        file.validate().map_err(|message| KeyFileError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(Some(file))
    }

    fn validate(&self) -> Result<(), String> {
        if !self.jwt_keys.iter().any(|k| k.retired_at.is_none()) {
            return Err("no JWT key without retiredAt to sign with".into());
        }
        if let Some(short) = self.jwt_keys.iter().find(|k| k.secret.len() < 32) {
            return Err(format!("JWT key {} is shorter than 32 characters", short.kid));
        }
        if self.rules_secret_key.is_empty() {
            return Err("rulesSecretKey is empty".into());
        }
        Ok(())
    }

    /// Writes the file with mode 0600, atomically (a temporary file renamed over it), so a
    /// crash leaves the old keys or the new ones, never half a file.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| KeyFileError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        files::write_private(&tmp, text.as_bytes()).map_err(io_error(&tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_error(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_error(path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error(dir))?;
        }
        Ok(())
    }

    /// Retires the signing key and adds a new one, which signs from the next start on. Keys
    /// retired more than `keep_secs` ago (a token's lifetime plus the clock skew: nothing they
    /// signed is still valid) are removed. Returns the new key's id.
    pub fn rotate_jwt(&mut self, now: i64, keep_secs: i64) -> String {
        for key in &mut self.jwt_keys {
            key.retired_at.get_or_insert(now);
        }
        self.jwt_keys
            .retain(|k| k.retired_at.is_some_and(|at| at > now - keep_secs));
        let key = StoredJwtKey::new(secrets::new_secret(""), now);
        let kid = key.kid.clone();
        self.jwt_keys.push(key);
        kid
    }

    pub fn jwt_keys(&self) -> Vec<SigningKey> {
        self.jwt_keys
            .iter()
            .map(|k| SigningKey {
                kid: k.kid.clone(),
                secret: k.secret.as_bytes().to_vec(),
                retired_at: k.retired_at,
            })
            .collect()
    }
}

/// What the registry keeps to recognise the rules' secrets key without holding it: a
/// domain-separated SHA-256 (of a 256-bit random key it reveals nothing), so a node starting
/// with another key is stopped before it seals secrets the others cannot open.
pub fn rules_key_fingerprint(key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"drover rules secrets key fingerprint\0");
    hasher.update(key.as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::auth::JwtKeys;

    #[test]
    fn saved_files_are_private_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        assert_eq!(KeyFile::load(&path).unwrap(), None);
        let file = KeyFile::adopt(None, Some("kept-rules-key".into()), 1000);
        file.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(KeyFile::load(&path).unwrap(), Some(file));
    }

    #[test]
    fn a_loose_file_is_tightened_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        KeyFile::adopt(None, None, 0).save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        KeyFile::load(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn rotation_keeps_recent_keys_and_drops_old_ones() {
        let mut file = KeyFile::adopt(Some("first-secret-first-secret-first-s".into()), None, 0);
        let first = file.jwt_keys[0].kid.clone();
        let second = file.rotate_jwt(1000, 3660);
        assert_eq!(file.jwt_keys.len(), 2);
        assert_eq!(file.jwt_keys[0].retired_at, Some(1000));
        assert_eq!(file.jwt_keys[1].kid, second);
        // Long after: the first key is dropped, the second retired, a third signs.
        let third = file.rotate_jwt(10_000, 3660);
        let kids: Vec<_> = file.jwt_keys.iter().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, [second.as_str(), third.as_str()]);
        assert!(!kids.contains(&first.as_str()));
        let keys = JwtKeys::from_keys(&file.jwt_keys(), 3600, 60).unwrap();
        assert_eq!(keys.signing_kid(), third);
    }

    #[test]
    fn a_registry_secret_merged_into_another_file_only_verifies() {
        let mut file = KeyFile::adopt(None, None, 0);
        let signing = file.jwt_keys[0].kid.clone();
        assert!(file.merge_jwt_secret("legacy-secret-legacy-secret-legacy".into(), 5));
        assert!(!file.merge_jwt_secret("legacy-secret-legacy-secret-legacy".into(), 6));
        let keys = JwtKeys::from_keys(&file.jwt_keys(), 3600, 60).unwrap();
        assert_eq!(keys.signing_kid(), signing);
    }

    #[test]
    fn files_without_a_signing_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let mut file = KeyFile::adopt(None, None, 0);
        file.jwt_keys[0].retired_at = Some(1);
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
        assert!(matches!(KeyFile::load(&path), Err(KeyFileError::Invalid { .. })));
    }
}
