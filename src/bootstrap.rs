//! First start: a default tenant and a platform admin, so a new installation can be used at once.

use drover_actors::{Role, TenantId};

use crate::auth::secrets;
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
