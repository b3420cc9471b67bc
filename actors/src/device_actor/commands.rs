//! The command half of [`DeviceActor`]: sending a command to the device, correlating its
//! answer, timing it out, and keeping commands for an offline device until it comes back.
//!
//! The actor owns correlation because it is the one place every message of the device passes
//! through: its answer arrives as a [`DeviceInbound`](super::DeviceInbound) of kind
//! `CommandResponse`. The adapter half (persistence, history, the HTTP API) is
//! `src/fleet_ops/commands.rs`; it hands each command over with a channel on which the actor
//! reports the one outcome.
//!
//! Wire format (both protocol versions get the same payload on `devices/{id}/commands/{name}`):
//! `{"requestId": "<id>", "payload": <any>}`. MQTT 5 devices also get the Response Topic
//! `devices/{id}/commands/{name}/response` and the id as Correlation Data, and answer there with
//! it; MQTT 3.1.1 devices answer on the same topic with `requestId` in the body. The answer is
//! `{"status": <int, default 200>, "payload": <any>}` (an MQTT 5 answer that is not such an
//! object is taken whole as the payload).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::DeviceActor;
use crate::outbound::CommandMessage;

/// Commands kept for one offline device at most; more are refused.
pub const MAX_QUEUED_COMMANDS: usize = 64;
/// Commands awaiting their answer from one device at most.
pub const MAX_PENDING_COMMANDS: usize = 256;

// ---- messages received -------------------------------------------------------------------

/// Sends a command to the device now, or keeps it until the device subscribes to its commands
/// again when `queue_for` is set and the device is offline. The outcome is reported once on
/// `done` (answer, timeout, expiry); the reply says what happened right away.
#[derive(Message, Debug)]
#[rtype(result = "Result<CommandDispatch, CommandRefusal>")]
pub struct SendCommand {
    pub request: CommandRequest,
    pub done: oneshot::Sender<CommandOutcome>,
}

/// The device subscribed to its command topic: commands kept for it go out now.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeliverQueuedCommands {}

/// One command for the device.
#[derive(Debug, Clone)]
pub struct CommandRequest {
    pub id: String,
    pub name: String,
    pub payload: Value,
    /// How long the device has to answer once the command is sent.
    pub timeout: Duration,
    /// Keep it this long while the device is offline; `None` refuses an offline device.
    pub queue_for: Option<Duration>,
}

/// What became of a command handed to the actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandDispatch {
    /// Published to the device; the outcome follows.
    Sent { at: DateTime<Utc> },
    /// Kept until the device is back (or the time to live runs out).
    Queued,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandRefusal {
    #[error("the device is offline")]
    DeviceOffline,
    #[error("the device already has {0} commands waiting")]
    Busy(usize),
}

/// The one outcome of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandOutcome {
    /// The device answered: its status (200 unless it said otherwise) and payload.
    Answered {
        status: i64,
        payload: Value,
        at: DateTime<Utc>,
        /// When a queued command was finally sent.
        sent_at: Option<DateTime<Utc>>,
    },
    /// No answer within the timeout after it was sent.
    TimedOut { sent_at: Option<DateTime<Utc>> },
    /// The device did not come back within the command's time to live.
    Expired,
    /// The device actor went away (device deleted or disabled, shutdown) before an outcome.
    Abandoned,
}

// ---- state -------------------------------------------------------------------------------

struct Pending {
    name: String,
    sent_at: DateTime<Utc>,
    done: oneshot::Sender<CommandOutcome>,
    timer: SpawnHandle,
}

struct Queued {
    request: CommandRequest,
    done: oneshot::Sender<CommandOutcome>,
    timer: SpawnHandle,
}

/// Commands sent and awaiting an answer, and commands kept for the device's return; made
/// with the device's first command (most devices never get one, and every device actor
/// holds this).
#[derive(Default)]
pub struct CommandCorrelation(Option<Box<Correlation>>);

#[derive(Default)]
struct Correlation {
    pending: HashMap<String, Pending>,
    queued: VecDeque<Queued>,
}

impl CommandCorrelation {
    /// Nothing waits: the actor may stop when idle.
    pub fn is_empty(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(|c| c.pending.is_empty() && c.queued.is_empty())
    }

    fn get_or_make(&mut self) -> &mut Correlation {
        self.0.get_or_insert_default()
    }
}

impl Drop for Correlation {
    fn drop(&mut self) {
        for (_, pending) in self.pending.drain() {
            let _ = pending.done.send(CommandOutcome::Abandoned);
        }
        for queued in self.queued.drain(..) {
            let _ = queued.done.send(CommandOutcome::Abandoned);
        }
    }
}

/// A device's answer, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandAnswer {
    pub id: String,
    pub status: i64,
    pub payload: Value,
}

/// Decodes an answer published on `…/commands/{name}/response`. The id comes from MQTT 5
/// Correlation Data when present, otherwise from `requestId` in the body.
pub fn parse_answer(correlation: Option<&[u8]>, body: &[u8]) -> Result<CommandAnswer, String> {
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) if correlation.is_some() => Value::String(String::from_utf8_lossy(body).into_owned()),
            Err(e) => return Err(format!("the answer is not JSON: {e}")),
        }
    };
    let id = match correlation {
        Some(bytes) => std::str::from_utf8(bytes)
            .map_err(|_| "correlation data is not a command id".to_string())?
            .to_string(),
        None => value
            .get("requestId")
            .and_then(Value::as_str)
            .ok_or("the answer has no requestId")?
            .to_string(),
    };
    let envelope = value
        .as_object()
        .filter(|o| o.contains_key("requestId") || o.contains_key("status") || o.contains_key("payload"));
    let (status, payload) = match envelope {
        Some(object) => {
            let status = match object.get("status") {
                None => 200,
                Some(s) => s.as_i64().ok_or("status must be an integer")?,
            };
            (status, object.get("payload").cloned().unwrap_or(Value::Null))
        }
        None => (200, value),
    };
    Ok(CommandAnswer { id, status, payload })
}

impl DeviceActor {
    fn command_topic(&self, name: &str) -> String {
        format!("devices/{}/commands/{name}", self.device)
    }

    /// Publishes the command and starts waiting for its answer.
    fn send_now(
        &mut self,
        request: CommandRequest,
        done: oneshot::Sender<CommandOutcome>,
        ctx: &mut Context<Self>,
    ) -> DateTime<Utc> {
        let topic = self.command_topic(&request.name);
        let mqtt5 = self
            .connection
            .as_ref()
            .is_some_and(|c| c.protocol.starts_with("mqtt/5"));
        let body = json!({"requestId": request.id, "payload": request.payload});
        let message = CommandMessage {
            response_topic: mqtt5.then(|| format!("{topic}/response")),
            correlation: mqtt5.then(|| Bytes::from(request.id.clone().into_bytes())),
            expiry_secs: Some(request.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32),
            topic,
            payload: Bytes::from(body.to_string()),
        };
        self.shadows.outbound.publish_command(&self.tenant, message);
        let id = request.id.clone();
        let timer = ctx.run_later(request.timeout, move |act, _ctx| {
            if let Some(pending) = act.commands.get_or_make().pending.remove(&id) {
                tracing::debug!(tenant = %act.tenant, device = %act.device, command = %id, "command timed out");
                let _ = pending.done.send(CommandOutcome::TimedOut {
                    sent_at: Some(pending.sent_at),
                });
            }
        });
        let sent_at = Utc::now();
        self.commands.get_or_make().pending.insert(
            request.id,
            Pending {
                name: request.name,
                sent_at,
                done,
                timer,
            },
        );
        sent_at
    }

    /// An answer on `…/commands/{name}/response`; one that matches no waiting command (late,
    /// unknown, or for another command name) is counted and ignored.
    pub(super) fn command_answered(
        &mut self,
        name: &str,
        correlation: Option<&[u8]>,
        body: &[u8],
        ctx: &mut Context<Self>,
    ) {
        let answer = match parse_answer(correlation, body) {
            Ok(answer) => answer,
            Err(why) => {
                tracing::debug!(tenant = %self.tenant, device = %self.device, command = name, %why, "command answer ignored");
                return;
            }
        };
        let matches = self
            .commands
            .0
            .as_ref()
            .and_then(|c| c.pending.get(&answer.id))
            .is_some_and(|p| p.name == name);
        if !matches {
            tracing::debug!(tenant = %self.tenant, device = %self.device, command = name, id = %answer.id, "answer to no waiting command");
            return;
        }
        if let Some(pending) = self.commands.get_or_make().pending.remove(&answer.id) {
            ctx.cancel_future(pending.timer);
            let _ = pending.done.send(CommandOutcome::Answered {
                status: answer.status,
                payload: answer.payload,
                at: Utc::now(),
                sent_at: Some(pending.sent_at),
            });
        }
    }
}

impl Handler<SendCommand> for DeviceActor {
    type Result = Result<CommandDispatch, CommandRefusal>;

    fn handle(&mut self, msg: SendCommand, ctx: &mut Context<Self>) -> Self::Result {
        self.messages_handled += 1;
        let SendCommand { request, done } = msg;
        if self.connection.is_some() {
            if self.commands.get_or_make().pending.len() >= MAX_PENDING_COMMANDS {
                return Err(CommandRefusal::Busy(MAX_PENDING_COMMANDS));
            }
            let at = self.send_now(request, done, ctx);
            return Ok(CommandDispatch::Sent { at });
        }
        let Some(ttl) = request.queue_for else {
            return Err(CommandRefusal::DeviceOffline);
        };
        if self.commands.get_or_make().queued.len() >= MAX_QUEUED_COMMANDS {
            return Err(CommandRefusal::Busy(MAX_QUEUED_COMMANDS));
        }
        let id = request.id.clone();
        let timer = ctx.run_later(ttl, move |act, _ctx| {
            if let Some(at) = act
                .commands
                .get_or_make()
                .queued
                .iter()
                .position(|q| q.request.id == id)
                && let Some(queued) = act.commands.get_or_make().queued.remove(at)
            {
                let _ = queued.done.send(CommandOutcome::Expired);
            }
        });
        self.commands
            .get_or_make()
            .queued
            .push_back(Queued { request, done, timer });
        Ok(CommandDispatch::Queued)
    }
}

impl Handler<DeliverQueuedCommands> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _msg: DeliverQueuedCommands, ctx: &mut Context<Self>) {
        self.messages_handled += 1;
        if self.connection.is_none() {
            return;
        }
        while let Some(queued) = self.commands.0.as_mut().and_then(|c| c.queued.pop_front()) {
            ctx.cancel_future(queued.timer);
            if self.commands.get_or_make().pending.len() >= MAX_PENDING_COMMANDS {
                let _ = queued.done.send(CommandOutcome::TimedOut { sent_at: None });
                continue;
            }
            self.send_now(queued.request, queued.done, ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_3_1_1_answer_carries_its_request_id() {
        let answer = parse_answer(
            None,
            br#"{"requestId": "c1", "status": 202, "payload": {"ok": true}}"#,
        )
        .unwrap();
        assert_eq!(answer.id, "c1");
        assert_eq!(answer.status, 202);
        assert_eq!(answer.payload, json!({"ok": true}));
        assert!(parse_answer(None, br#"{"status": 200}"#).is_err());
        assert!(parse_answer(None, b"not json").is_err());
    }

    #[test]
    fn an_mqtt5_answer_is_correlated_by_its_property() {
        let envelope = parse_answer(Some(b"c2"), br#"{"payload": [1, 2]}"#).unwrap();
        assert_eq!((envelope.id.as_str(), envelope.status), ("c2", 200));
        assert_eq!(envelope.payload, json!([1, 2]));
        let bare = parse_answer(Some(b"c3"), br#"{"uptime": 5}"#).unwrap();
        assert_eq!(bare.payload, json!({"uptime": 5}));
        let text = parse_answer(Some(b"c4"), b"done").unwrap();
        assert_eq!(text.payload, json!("done"));
        assert!(parse_answer(Some(b"c5"), br#"{"status": "bad"}"#).is_err());
    }
}
