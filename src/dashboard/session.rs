//! `DashboardSession`: one `/ws` client. Forwards its tenant's live events as text frames,
//! answers pings, and ends when the client closes or stops answering.

use std::time::{Duration, Instant};

use actix_ws::{AggregatedMessage, Session};
use drover_actors::TenantId;
use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;

use super::hub::{DashboardHub, LiveMessage};

const HEARTBEAT: Duration = Duration::from_secs(15);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);

pub struct DashboardSession {
    pub tenant: TenantId,
    pub session: Session,
    pub hub: DashboardHub,
}

impl DashboardSession {
    /// Runs until the client goes away.
    pub async fn run(mut self, stream: actix_ws::MessageStream) {
        let mut events = self.hub.subscribe();
        let mut stream = stream.aggregate_continuations().max_continuation_size(64 * 1024);
        let hello = LiveMessage::Hello {
            tenant: self.tenant.to_string(),
        };
        if let Ok(text) = serde_json::to_string(&hello)
            && self.session.text(text).await.is_err()
        {
            return;
        }
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) if event.tenant == self.tenant => {
                        if self.session.text(event.json.to_string()).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        let text = serde_json::to_string(&LiveMessage::Lagged { missed }).unwrap_or_default();
                        if self.session.text(text).await.is_err() {
                            break;
                        }
                    }
                    Err(RecvError::Closed) => break,
                },
                frame = stream.next() => match frame {
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        last_heard = Instant::now();
                        if self.session.pong(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(AggregatedMessage::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => last_heard = Instant::now(),
                },
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > CLIENT_TIMEOUT || self.session.ping(b"").await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = self.session.close(None).await;
    }
}
