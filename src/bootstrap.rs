//! First start: a default tenant and a platform admin, so a new installation can be used at once;
//! and on every start, the signing keys from configuration or the key file (moved out of the
//! registry where an earlier version kept them).

use std::path::PathBuf;

use drover_actors::{Role, TenantId};

use crate::auth::JwtKeys;
use crate::auth::keyfile::{KeyFile, KeyFileError, rules_key_fingerprint};
use crate::auth::secrets;
use crate::config::Config;
use crate::storage::files;
use crate::storage::records::{AuditActor, NewUser};
use crate::storage::{RegistryStore, StoreError};

pub const DEFAULT_TENANT: &str = "default";
pub const DEFAULT_ADMIN: &str = "admin";

/// What the first start created, for the one-time message.
#[derive(Debug, Clone)]
pub struct FirstStart {
    pub tenant: TenantId,
    pub username: String,
    /// The generated password, or `None` when it came from `DROVER_ADMIN_PASSWORD`.
    pub generated_password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("DROVER_ADMIN_PASSWORD: {0}")]
    Password(String),
    #[error("key file {0}")]
    KeyFile(#[from] KeyFileError),
    #[error("{0}")]
    Keys(String),
}

/// Registry settings where earlier versions kept the keys.
const LEGACY_JWT_SECRET: &str = "jwt_secret";
const LEGACY_RULES_KEY: &str = "rules_secret_key";
/// Registry setting recognising the rules' secrets key (see [`rules_key_fingerprint`]).
const RULES_KEY_FINGERPRINT: &str = "rules_secret_key_fingerprint";

/// The keys the server signs and seals with.
pub struct SigningKeys {
    pub jwt: JwtKeys,
    pub rules_secret_key: String,
}

/// Where the key file is: `auth.key_file`, or `keys.json` in the data directory.
pub fn key_file_path(config: &Config) -> PathBuf {
    if config.auth.key_file.as_os_str().is_empty() {
        config.storage.data_dir.join("keys.json")
    } else {
        config.auth.key_file.clone()
    }
}

/// Loads the key file, creating it on first start. Keys an earlier version kept in the registry
/// are written to the file first and deleted from the registry after, so a crash between the
/// two loses nothing (the next start finds them in both and finishes the move).
pub async fn signing_keys(config: &Config, registry: &RegistryStore) -> Result<SigningKeys, BootstrapError> {
    let path = key_file_path(config);
    let data_dir = &config.storage.data_dir;
    files::private_dir(data_dir)
        .map_err(|e| BootstrapError::Keys(format!("cannot create {}: {e}", data_dir.display())))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| BootstrapError::Keys(format!("cannot create {}: {e}", dir.display())))?;
    }
    let legacy_jwt = registry.setting(LEGACY_JWT_SECRET).await?;
    let legacy_rules = registry.setting(LEGACY_RULES_KEY).await?;
    let now = chrono::Utc::now().timestamp();
    let file = match KeyFile::load(&path)? {
        Some(mut file) => {
            let mut changed = false;
            if let Some(secret) = legacy_jwt.clone() {
                changed |= file.merge_jwt_secret(secret, now);
            }
            if legacy_rules.as_ref().is_some_and(|k| *k != file.rules_secret_key) {
                return Err(BootstrapError::Keys(format!(
                    "the registry holds a rules secrets key that differs from the one in {}; channel                      secrets sealed with it would no longer open. Remove the key file to adopt the                      registry's key, or set RULES_SECRET_KEY",
                    path.display()
                )));
            }
            if changed {
                file.save(&path)?;
            }
            file
        }
        None => {
            let sealed_elsewhere = registry.setting(RULES_KEY_FINGERPRINT).await?.is_some();
            if legacy_rules.is_none() && sealed_elsewhere && config.rules.secret_key.is_empty() {
                return Err(BootstrapError::Keys(format!(
                    "no key file at {}, but the registry's channel secrets were sealed by a node                      that has one: copy that node's key file here (or point AUTH_KEY_FILE at it)",
                    path.display()
                )));
            }
            let file = KeyFile::adopt(legacy_jwt.clone(), legacy_rules.clone(), now);
            file.save(&path)?;
            tracing::info!(key_file = %path.display(), "signing keys written to the key file");
            file
        }
    };
    for (name, value) in [(LEGACY_JWT_SECRET, legacy_jwt), (LEGACY_RULES_KEY, legacy_rules)] {
        if let Some(value) = value {
            registry.delete_setting(name, &value).await?;
            tracing::info!(setting = name, key_file = %path.display(), "key moved out of the registry");
        }
    }

    let rules_secret_key = if config.rules.secret_key.is_empty() {
        file.rules_secret_key.clone()
    } else {
        config.rules.secret_key.expose().to_string()
    };
    let fingerprint = rules_key_fingerprint(&rules_secret_key);
    let stored = registry
        .setting_or_insert(RULES_KEY_FINGERPRINT, {
            let fingerprint = fingerprint.clone();
            move || fingerprint
        })
        .await?;
    if stored != fingerprint {
        return Err(BootstrapError::Keys(format!(
            "the rules secrets key ({}) is not the one that sealed the registry's channel secrets;              use the key file or RULES_SECRET_KEY the other nodes use",
            if config.rules.secret_key.is_empty() {
                path.display().to_string()
            } else {
                "RULES_SECRET_KEY".to_string()
            }
        )));
    }

    let (ttl, skew) = (config.auth.token_ttl_secs, config.auth.clock_skew_secs);
    let jwt = if config.auth.jwt_secret.is_empty() {
        JwtKeys::from_keys(&file.jwt_keys(), ttl, skew)
            .ok_or_else(|| BootstrapError::Keys(format!("{}: no JWT key to sign with", path.display())))?
    } else {
        JwtKeys::new(config.auth.jwt_secret.expose().as_bytes(), ttl, skew)
    };
    Ok(SigningKeys {
        jwt,
        rules_secret_key,
    })
}

/// Creates the default tenant and a platform admin when the registry has no user at all (also
/// after a first start that was interrupted between the two).
pub async fn ensure_first_tenant(
    registry: &RegistryStore,
    admin_password: Option<String>,
) -> Result<Option<FirstStart>, BootstrapError> {
    if registry.count_users().await? > 0 {
        return Ok(None);
    }
    let tenant = TenantId::parse(DEFAULT_TENANT).expect("valid tenant id");
    match registry
        .create_tenant(
            tenant.clone(),
            "Default tenant".into(),
            None,
            AuditActor::system(),
        )
        .await
    {
        // Conflict: created by an earlier, interrupted start or by another node sharing the registry.
        Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let (password, generated) = match admin_password.filter(|p| !p.is_empty()) {
        Some(p) => {
            secrets::check_password_strength(&p).map_err(BootstrapError::Password)?;
            (p, false)
        }
        None => (secrets::new_password(), true),
    };
    let password_hash = tokio::task::spawn_blocking({
        let password = password.clone();
        move || secrets::hash_password(&password)
    })
    .await
    .map_err(|e| BootstrapError::Password(e.to_string()))?
    .map_err(|e| BootstrapError::Password(e.to_string()))?;
    let user = NewUser {
        tenant: tenant.clone(),
        username: DEFAULT_ADMIN.into(),
        password_hash,
        role: Role::Admin,
        platform_admin: true,
    };
    match registry.create_user(user, AuditActor::system()).await {
        Ok(_) => {}
        // Another node created the admin at the same moment; its start prints the password.
        Err(StoreError::AlreadyExists(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    Ok(Some(FirstStart {
        tenant,
        username: DEFAULT_ADMIN.into(),
        generated_password: generated.then_some(password),
    }))
}
