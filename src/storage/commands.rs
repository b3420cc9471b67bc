//! Device commands in the registry: each command with its outcome, which is also the device's
//! command history. Written by `fleet_ops::commands`; statuses only move forward (a late
//! "sent" never overwrites an answer that was already recorded).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use drover_actors::{DeviceId, TenantId};
use serde_json::Value;

use super::db::StoreError;
use super::registry::{RegistryStore, from_ms, now_ms};
use super::schema::device_commands;

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// Recorded, being handed to the device.
    Pending,
    /// Kept for an offline device until it is back or its time to live runs out.
    Queued,
    /// Published; waiting for the answer.
    Sent,
    /// The device answered with a status below 400.
    Succeeded,
    /// The device answered with a status of 400 or more.
    Failed,
    /// No answer within the timeout.
    TimedOut,
    /// The device did not come back within the time to live.
    Expired,
    /// Not delivered: the device was offline (and the caller did not queue), or went away.
    Undelivered,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "pending",
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::TimedOut => "timed_out",
            CommandStatus::Expired => "expired",
            CommandStatus::Undelivered => "undelivered",
        }
    }

    pub fn parse(s: &str) -> Option<CommandStatus> {
        Some(match s {
            "pending" => CommandStatus::Pending,
            "queued" => CommandStatus::Queued,
            "sent" => CommandStatus::Sent,
            "succeeded" => CommandStatus::Succeeded,
            "failed" => CommandStatus::Failed,
            "timed_out" => CommandStatus::TimedOut,
            "expired" => CommandStatus::Expired,
            "undelivered" => CommandStatus::Undelivered,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommandStatus::Pending | CommandStatus::Queued | CommandStatus::Sent
        )
    }
}

const OPEN: [&str; 3] = ["pending", "queued", "sent"];

#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub id: String,
    pub tenant: TenantId,
    pub device: DeviceId,
    pub name: String,
    pub payload: Value,
    pub status: CommandStatus,
    pub response: Option<Value>,
    pub response_status: Option<i64>,
    pub error: Option<String>,
    pub timeout_secs: u64,
    pub expires_at: Option<DateTime<Utc>>,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// The end of a command, as recorded.
#[derive(Debug, Clone)]
pub struct CommandEnd {
    pub status: CommandStatus,
    pub response: Option<Value>,
    pub response_status: Option<i64>,
    pub error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = device_commands)]
struct CommandRow {
    id: String,
    tenant_id: String,
    device_id: String,
    name: String,
    payload: String,
    status: String,
    response: Option<String>,
    response_status: Option<i64>,
    error: Option<String>,
    timeout_secs: i64,
    expires_at: Option<i64>,
    requested_by: String,
    created_at: i64,
    sent_at: Option<i64>,
    completed_at: Option<i64>,
}

impl CommandRow {
    fn into_record(self) -> Result<CommandRecord, StoreError> {
        let invalid =
            |what: &str| StoreError::Internal(format!("stored command {}: invalid {what}", self.id));
        Ok(CommandRecord {
            tenant: TenantId::parse(self.tenant_id.clone()).map_err(|_| invalid("tenant"))?,
            device: DeviceId::parse(self.device_id.clone()).map_err(|_| invalid("device"))?,
            payload: serde_json::from_str(&self.payload).map_err(|_| invalid("payload"))?,
            status: CommandStatus::parse(&self.status).ok_or_else(|| invalid("status"))?,
            response: match &self.response {
                Some(text) => Some(serde_json::from_str(text).map_err(|_| invalid("response"))?),
                None => None,
            },
            response_status: self.response_status,
            error: self.error,
            timeout_secs: self.timeout_secs.max(0) as u64,
            expires_at: self.expires_at.map(from_ms),
            requested_by: self.requested_by,
            created_at: from_ms(self.created_at),
            sent_at: self.sent_at.map(from_ms),
            completed_at: self.completed_at.map(from_ms),
            name: self.name,
            id: self.id,
        })
    }
}

impl RegistryStore {
    pub async fn insert_command(&self, record: CommandRecord) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                diesel::insert_into(device_commands::table)
                    .values((
                        device_commands::id.eq(&record.id),
                        device_commands::tenant_id.eq(record.tenant.as_str()),
                        device_commands::device_id.eq(record.device.as_str()),
                        device_commands::name.eq(&record.name),
                        device_commands::payload.eq(record.payload.to_string()),
                        device_commands::status.eq(record.status.as_str()),
                        device_commands::timeout_secs.eq(record.timeout_secs as i64),
                        device_commands::expires_at.eq(record.expires_at.map(|t| t.timestamp_millis())),
                        device_commands::requested_by.eq(&record.requested_by),
                        device_commands::created_at.eq(record.created_at.timestamp_millis()),
                    ))
                    .execute(conn)?;
                Ok(())
            })
            .await
    }

    /// Moves an open command to `queued` or `sent`; a command already finished stays as it is.
    pub async fn command_dispatched(
        &self,
        id: String,
        status: CommandStatus,
        sent_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                let open = device_commands::table
                    .filter(device_commands::id.eq(&id))
                    .filter(device_commands::status.eq_any(["pending", "queued"]));
                diesel::update(open)
                    .set((
                        device_commands::status.eq(status.as_str()),
                        device_commands::sent_at.eq(sent_at.map(|t| t.timestamp_millis())),
                    ))
                    .execute(conn)?;
                Ok(())
            })
            .await
    }

    /// Records how an open command ended (once; later calls change nothing).
    pub async fn command_finished(&self, id: String, end: CommandEnd) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                let open = device_commands::table
                    .filter(device_commands::id.eq(&id))
                    .filter(device_commands::status.eq_any(OPEN));
                diesel::update(open)
                    .set((
                        device_commands::status.eq(end.status.as_str()),
                        device_commands::response.eq(end.response.as_ref().map(Value::to_string)),
                        device_commands::response_status.eq(end.response_status),
                        device_commands::error.eq(&end.error),
                        device_commands::completed_at.eq(now_ms()),
                    ))
                    .execute(conn)?;
                if let Some(sent) = end.sent_at {
                    diesel::update(
                        device_commands::table
                            .filter(device_commands::id.eq(&id))
                            .filter(device_commands::sent_at.is_null()),
                    )
                    .set(device_commands::sent_at.eq(sent.timestamp_millis()))
                    .execute(conn)?;
                }
                Ok(())
            })
            .await
    }

    pub async fn get_command(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .read(move |conn| {
                device_commands::table
                    .filter(device_commands::tenant_id.eq(tenant.as_str()))
                    .filter(device_commands::id.eq(&id))
                    .select(CommandRow::as_select())
                    .first::<CommandRow>(conn)
                    .optional()?
                    .map(CommandRow::into_record)
                    .transpose()
            })
            .await
    }

    /// A device's commands, newest first; `before` is the `next` of the previous page.
    pub async fn list_commands(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        limit: u32,
        before: Option<String>,
    ) -> Result<(Vec<CommandRecord>, Option<String>), StoreError> {
        let (tenant, device) = (tenant.clone(), device.clone());
        self.database()
            .read(move |conn| {
                let mut query = device_commands::table
                    .filter(device_commands::tenant_id.eq(tenant.as_str().to_string()))
                    .filter(device_commands::device_id.eq(device.as_str().to_string()))
                    .into_boxed();
                if let Some(before) = before {
                    // Ids are UUIDv7: their order is their creation order.
                    query = query.filter(device_commands::id.lt(before));
                }
                let limit = i64::from(limit.clamp(1, 1000));
                let mut rows: Vec<CommandRow> = query
                    .order(device_commands::id.desc())
                    .limit(limit + 1)
                    .select(CommandRow::as_select())
                    .load(conn)?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                let next = more.then(|| rows.last().map(|r| r.id.clone())).flatten();
                let records = rows
                    .into_iter()
                    .map(CommandRow::into_record)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((records, next))
            })
            .await
    }

    /// Commands that were open when the server stopped: queued ones still within their time to
    /// live are answered for resending; the others are closed (their answer can no longer be
    /// correlated).
    pub async fn reopen_commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        self.database()
            .write(move |conn| {
                let now = now_ms();
                let rows: Vec<CommandRow> = device_commands::table
                    .filter(device_commands::status.eq_any(OPEN))
                    .select(CommandRow::as_select())
                    .load(conn)?;
                let mut kept = Vec::new();
                for row in rows {
                    let alive = row.status != "sent" && row.expires_at.is_some_and(|at| at > now);
                    if alive {
                        kept.push(row.into_record()?);
                        continue;
                    }
                    let (status, error) = match row.status.as_str() {
                        "sent" => (
                            CommandStatus::TimedOut,
                            "the server restarted while waiting for the answer",
                        ),
                        _ if row.expires_at.is_some() => (CommandStatus::Expired, "the time to live ran out"),
                        _ => (
                            CommandStatus::Undelivered,
                            "the server restarted before the command was sent",
                        ),
                    };
                    diesel::update(device_commands::table.filter(device_commands::id.eq(&row.id)))
                        .set((
                            device_commands::status.eq(status.as_str()),
                            device_commands::error.eq(error),
                            device_commands::completed_at.eq(now),
                        ))
                        .execute(conn)?;
                }
                Ok(kept)
            })
            .await
    }
}
