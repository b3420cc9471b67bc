//! Registry access for the MQTT broker: device logins, presence, access rules, tenant CAs.

use diesel::prelude::*;
use drover_actors::{DeviceId, Role, TenantId};

use super::db::{DbConnection, MultiBackend, StoreError};
use super::records::*;
use super::registry::{RegistryStore, from_ms};
use super::schema::*;

type LoginRow = (String, String, String, bool, bool);

fn login_from_row(
    (tenant, device, device_type, enabled, tenant_disabled): LoginRow,
) -> Result<DeviceLogin, StoreError> {
    let invalid = |e: drover_actors::IdError| StoreError::Internal(format!("invalid stored identifier: {e}"));
    Ok(DeviceLogin {
        tenant: TenantId::parse(tenant).map_err(invalid)?,
        device: DeviceId::parse(device).map_err(invalid)?,
        device_type,
        enabled,
        tenant_disabled,
    })
}

impl AclSubject {
    fn to_columns(&self) -> (&'static str, String) {
        match self {
            AclSubject::Role(role) => ("role", role.as_str().to_string()),
            AclSubject::ApiKey(id) => ("api_key", id.clone()),
            AclSubject::Anonymous => ("anonymous", "*".to_string()),
        }
    }

    fn from_columns(kind: &str, subject: &str) -> Result<AclSubject, StoreError> {
        match kind {
            "role" => subject
                .parse::<Role>()
                .map(AclSubject::Role)
                .map_err(StoreError::Internal),
            "api_key" => Ok(AclSubject::ApiKey(subject.to_string())),
            "anonymous" => Ok(AclSubject::Anonymous),
            other => Err(StoreError::Internal(format!("unknown ACL subject kind {other}"))),
        }
    }
}

impl AclAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AclAction::Publish => "publish",
            AclAction::Subscribe => "subscribe",
            AclAction::All => "all",
        }
    }

    pub fn parse(value: &str) -> Option<AclAction> {
        match value {
            "publish" => Some(AclAction::Publish),
            "subscribe" => Some(AclAction::Subscribe),
            "all" => Some(AclAction::All),
            _ => None,
        }
    }
}

impl AclEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            AclEffect::Allow => "allow",
            AclEffect::Deny => "deny",
        }
    }

    pub fn parse(value: &str) -> Option<AclEffect> {
        match value {
            "allow" => Some(AclEffect::Allow),
            "deny" => Some(AclEffect::Deny),
            _ => None,
        }
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = mqtt_acl_rules)]
struct AclRow {
    id: String,
    tenant_id: Option<String>,
    subject_kind: String,
    subject: String,
    action: String,
    topic: String,
    effect: String,
    priority: i32,
    created_at: i64,
}

impl AclRow {
    fn into_rule(self) -> Result<AclRule, StoreError> {
        let bad = |what: &str| StoreError::Internal(format!("invalid stored ACL {what}"));
        Ok(AclRule {
            tenant: self
                .tenant_id
                .map(TenantId::parse)
                .transpose()
                .map_err(|_| bad("tenant"))?,
            subject: AclSubject::from_columns(&self.subject_kind, &self.subject)?,
            action: AclAction::parse(&self.action).ok_or_else(|| bad("action"))?,
            effect: AclEffect::parse(&self.effect).ok_or_else(|| bad("effect"))?,
            id: self.id,
            topic: self.topic,
            priority: self.priority,
            created_at: from_ms(self.created_at),
        })
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = tenant_ca_certificates)]
struct CaRow {
    id: String,
    tenant_id: String,
    fingerprint: String,
    subject: String,
    pem: String,
    not_after: i64,
    created_at: i64,
}

impl CaRow {
    fn into_record(self) -> Result<CaCertificate, StoreError> {
        Ok(CaCertificate {
            tenant: TenantId::parse(self.tenant_id).map_err(|e| StoreError::Internal(e.to_string()))?,
            id: self.id,
            fingerprint: self.fingerprint,
            subject: self.subject,
            pem: self.pem,
            not_after: from_ms(self.not_after),
            created_at: from_ms(self.created_at),
        })
    }
}

fn acl_rules_of(conn: &mut DbConnection, tenant: Option<&TenantId>) -> Result<Vec<AclRule>, StoreError> {
    let mut q = mqtt_acl_rules::table.into_boxed::<MultiBackend>();
    q = match tenant {
        Some(t) => q.filter(mqtt_acl_rules::tenant_id.eq(t.as_str().to_string())),
        None => q.filter(mqtt_acl_rules::tenant_id.is_null()),
    };
    q.order((mqtt_acl_rules::priority, mqtt_acl_rules::created_at))
        .select(AclRow::as_select())
        .load(conn)?
        .into_iter()
        .map(AclRow::into_rule)
        .collect()
}

impl RegistryStore {
    /// The device whose token has this digest, for an MQTT or HTTP login.
    pub async fn device_by_token(&self, digest: &str) -> Result<Option<DeviceLogin>, StoreError> {
        let digest = digest.to_string();
        self.database()
            .read(move |conn| {
                device_credentials::table
                    .inner_join(
                        devices::table.on(devices::tenant_id
                            .eq(device_credentials::tenant_id)
                            .and(devices::device_id.eq(device_credentials::device_id))),
                    )
                    .inner_join(tenants::table.on(tenants::id.eq(devices::tenant_id)))
                    .filter(device_credentials::digest.eq(&digest))
                    .filter(device_credentials::kind.eq("token"))
                    .select((
                        devices::tenant_id,
                        devices::device_id,
                        devices::device_type,
                        devices::enabled,
                        tenants::disabled,
                    ))
                    .first::<LoginRow>(conn)
                    .optional()?
                    .map(login_from_row)
                    .transpose()
            })
            .await
    }

    /// A device by id in a tenant, for a login by client certificate.
    pub async fn device_login(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<DeviceLogin>, StoreError> {
        let (tenant, device) = (tenant.clone(), device.clone());
        self.database()
            .read(move |conn| {
                devices::table
                    .inner_join(tenants::table.on(tenants::id.eq(devices::tenant_id)))
                    .filter(devices::tenant_id.eq(tenant.as_str()))
                    .filter(devices::device_id.eq(device.as_str()))
                    .select((
                        devices::tenant_id,
                        devices::device_id,
                        devices::device_type,
                        devices::enabled,
                        tenants::disabled,
                    ))
                    .first::<LoginRow>(conn)
                    .optional()?
                    .map(login_from_row)
                    .transpose()
            })
            .await
    }

    /// Records connects and disconnects in one transaction. `node` names the server holding
    /// the sessions; updates for devices that no longer exist are ignored.
    pub async fn record_presence(&self, node: &str, updates: Vec<Presence>) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let node = node.to_string();
        self.database()
            .write(move |conn| {
                for p in &updates {
                    let target = devices::table
                        .filter(devices::tenant_id.eq(p.tenant.as_str()))
                        .filter(devices::device_id.eq(p.device.as_str()));
                    let holder = p.connected.then(|| node.clone());
                    diesel::update(target)
                        .set((
                            devices::connected.eq(p.connected),
                            devices::last_seen_at.eq(p.at.timestamp_millis()),
                            devices::connected_node.eq(holder),
                        ))
                        .execute(conn)?;
                }
                Ok(())
            })
            .await
    }

    /// Marks every device this node had connected as disconnected (after a restart or crash).
    pub async fn clear_presence(&self, node: &str) -> Result<usize, StoreError> {
        let node = node.to_string();
        self.database()
            .write(move |conn| {
                Ok(
                    diesel::update(devices::table.filter(devices::connected_node.eq(&node)))
                        .set((
                            devices::connected.eq(false),
                            devices::connected_node.eq(None::<String>),
                        ))
                        .execute(conn)?,
                )
            })
            .await
    }

    /// Rules of a tenant (or, with `None`, for anonymous clients), in evaluation order.
    pub async fn list_acl_rules(&self, tenant: Option<&TenantId>) -> Result<Vec<AclRule>, StoreError> {
        let tenant = tenant.cloned();
        self.database()
            .read(move |conn| acl_rules_of(conn, tenant.as_ref()))
            .await
    }

    pub async fn create_acl_rule(&self, rule: AclRule, by: AuditActor) -> Result<AclRule, StoreError> {
        self.database()
            .write(move |conn| {
                let (kind, subject) = rule.subject.to_columns();
                diesel::insert_into(mqtt_acl_rules::table)
                    .values((
                        mqtt_acl_rules::id.eq(&rule.id),
                        mqtt_acl_rules::tenant_id.eq(rule.tenant.as_ref().map(|t| t.as_str().to_string())),
                        mqtt_acl_rules::subject_kind.eq(kind),
                        mqtt_acl_rules::subject.eq(&subject),
                        mqtt_acl_rules::action.eq(rule.action.as_str()),
                        mqtt_acl_rules::topic.eq(&rule.topic),
                        mqtt_acl_rules::effect.eq(rule.effect.as_str()),
                        mqtt_acl_rules::priority.eq(rule.priority),
                        mqtt_acl_rules::created_at.eq(rule.created_at.timestamp_millis()),
                    ))
                    .execute(conn)?;
                let detail = serde_json::json!({
                    "subject": format!("{kind}:{subject}"), "action": rule.action.as_str(),
                    "topic": rule.topic, "effect": rule.effect.as_str(), "priority": rule.priority,
                });
                super::registry::insert_audit(
                    conn,
                    &super::registry::audit(&by, "mqtt_acl.create", &rule.id, Some(detail)),
                )?;
                Ok(rule)
            })
            .await
    }

    /// Deletes a rule of the tenant (or an anonymous-client rule with `None`).
    pub async fn delete_acl_rule(
        &self,
        tenant: Option<TenantId>,
        id: String,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                let mut q = diesel::delete(mqtt_acl_rules::table)
                    .filter(mqtt_acl_rules::id.eq(&id))
                    .into_boxed::<MultiBackend>();
                q = match &tenant {
                    Some(t) => q.filter(mqtt_acl_rules::tenant_id.eq(t.as_str().to_string())),
                    None => q.filter(mqtt_acl_rules::tenant_id.is_null()),
                };
                if q.execute(conn)? == 0 {
                    return Err(StoreError::NotFound(format!("ACL rule {id}")));
                }
                super::registry::insert_audit(
                    conn,
                    &super::registry::audit(&by, "mqtt_acl.delete", &id, None),
                )
            })
            .await
    }

    /// The tenant's current CA registration code and when it expires: the unexpired one if
    /// there is one (two admins asking at once get the same), else `new_code()`, valid for `ttl`.
    pub async fn ca_registration_code(
        &self,
        tenant: &TenantId,
        ttl: chrono::Duration,
        new_code: impl FnOnce() -> String + Send + 'static,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>), StoreError> {
        let tenant = tenant.clone();
        self.database()
            .write(move |conn| {
                let now = chrono::Utc::now();
                let current: Option<(String, i64)> = ca_registration_codes::table
                    .filter(ca_registration_codes::tenant_id.eq(tenant.as_str()))
                    .filter(ca_registration_codes::expires_at.gt(now.timestamp_millis()))
                    .select((ca_registration_codes::code, ca_registration_codes::expires_at))
                    .first(conn)
                    .optional()?;
                if let Some((code, expires_at)) = current {
                    return Ok((code, from_ms(expires_at)));
                }
                let (code, expires_at) = (new_code(), now + ttl);
                diesel::delete(
                    ca_registration_codes::table.filter(ca_registration_codes::tenant_id.eq(tenant.as_str())),
                )
                .execute(conn)?;
                diesel::insert_into(ca_registration_codes::table)
                    .values((
                        ca_registration_codes::tenant_id.eq(tenant.as_str()),
                        ca_registration_codes::code.eq(&code),
                        ca_registration_codes::expires_at.eq(expires_at.timestamp_millis()),
                    ))
                    .execute(conn)?;
                Ok((code, expires_at))
            })
            .await
    }

    /// Registers a CA whose key signed a verification certificate for `code`, which must be the
    /// tenant's current registration code; the code is used up in the same transaction.
    pub async fn add_ca_certificate(
        &self,
        ca: CaCertificate,
        code: String,
        by: AuditActor,
    ) -> Result<CaCertificate, StoreError> {
        self.database()
            .write(move |conn| {
                let used = diesel::delete(
                    ca_registration_codes::table
                        .filter(ca_registration_codes::tenant_id.eq(ca.tenant.as_str()))
                        .filter(ca_registration_codes::code.eq(&code))
                        .filter(ca_registration_codes::expires_at.gt(chrono::Utc::now().timestamp_millis())),
                )
                .execute(conn)?;
                if used == 0 {
                    return Err(StoreError::Invalid(
                        "the verification certificate's CN is not this tenant's current registration code \
                         (GET /api/mqtt/cas/registration-code; a code expires after an hour and serves once)"
                            .into(),
                    ));
                }
                // A CA identifies the devices of one tenant only: CA certificates are public, so
                // another tenant registering the same one could otherwise claim its devices.
                let elsewhere: i64 = tenant_ca_certificates::table
                    .filter(tenant_ca_certificates::fingerprint.eq(&ca.fingerprint))
                    .filter(tenant_ca_certificates::tenant_id.ne(ca.tenant.as_str()))
                    .count()
                    .get_result(conn)?;
                if elsewhere > 0 {
                    return Err(StoreError::AlreadyExists(
                        "this CA certificate is registered by another tenant; a CA can identify the devices of one tenant only"
                            .into(),
                    ));
                }
                diesel::insert_into(tenant_ca_certificates::table)
                    .values((
                        tenant_ca_certificates::id.eq(&ca.id),
                        tenant_ca_certificates::tenant_id.eq(ca.tenant.as_str()),
                        tenant_ca_certificates::fingerprint.eq(&ca.fingerprint),
                        tenant_ca_certificates::subject.eq(&ca.subject),
                        tenant_ca_certificates::pem.eq(&ca.pem),
                        tenant_ca_certificates::not_after.eq(ca.not_after.timestamp_millis()),
                        tenant_ca_certificates::created_at.eq(ca.created_at.timestamp_millis()),
                    ))
                    .execute(conn)
                    .map_err(|e| match StoreError::from(e) {
                        StoreError::AlreadyExists(_) => {
                            StoreError::AlreadyExists("this CA certificate is already registered".into())
                        }
                        other => other,
                    })?;
                let detail = serde_json::json!({ "subject": ca.subject, "fingerprint": ca.fingerprint });
                super::registry::insert_audit(
                    conn,
                    &super::registry::audit(&by, "ca.add", &ca.id, Some(detail)),
                )?;
                Ok(ca)
            })
            .await
    }

    /// CA certificates of one tenant, or of every tenant with `None` (for the TLS listener).
    pub async fn list_ca_certificates(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<CaCertificate>, StoreError> {
        let tenant = tenant.cloned();
        self.database()
            .read(move |conn| {
                let mut q = tenant_ca_certificates::table.into_boxed::<MultiBackend>();
                if let Some(t) = &tenant {
                    q = q.filter(tenant_ca_certificates::tenant_id.eq(t.as_str().to_string()));
                }
                q.order(tenant_ca_certificates::created_at)
                    .select(CaRow::as_select())
                    .load(conn)?
                    .into_iter()
                    .map(CaRow::into_record)
                    .collect()
            })
            .await
    }

    pub async fn delete_ca_certificate(
        &self,
        tenant: TenantId,
        id: String,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                let removed = diesel::delete(
                    tenant_ca_certificates::table
                        .filter(tenant_ca_certificates::tenant_id.eq(tenant.as_str()))
                        .filter(tenant_ca_certificates::id.eq(&id)),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(StoreError::NotFound(format!("CA certificate {id}")));
                }
                super::registry::insert_audit(conn, &super::registry::audit(&by, "ca.delete", &id, None))
            })
            .await
    }
}
