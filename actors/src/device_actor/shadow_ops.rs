//! The shadow half of [`DeviceActor`]: loading the shadow when the actor starts, updates and
//! gets from the device (MQTT) and from the API, and what they publish.
//!
//! The actor is the shadow's only writer. An update is parsed and merged here, saved (on the
//! condition that the stored version is still the one it was merged onto), and only then
//! adopted and announced. While a save is in flight the actor's mailbox waits (`ctx.wait`), so
//! updates apply one at a time in arrival order, whichever way they came.

use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
    DeviceActor, ExitReason, PendingShadowDelta, PublishedShadowRequest, ShadowAction, ShadowRequest,
    ShadowTopic,
};
use crate::directory::ShadowStoreError;
use crate::shadow::{self, ShadowDocument, ShadowError};

/// Where the request came from, which decides where a refusal goes: an MQTT client (the
/// device, or an application) hears it on the `rejected` topic, the API caller in the answer.
/// Accepted updates are announced on the topics either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requester {
    Mqtt,
    Api,
}

impl DeviceActor {
    /// Loads the shadow before the actor handles anything; failing to is a failure of the
    /// actor (the supervisor restarts it with backoff).
    pub(super) fn load_shadow(&mut self, ctx: &mut Context<Self>) {
        let store = self.shadows.store.clone();
        let (tenant, device) = (self.tenant.clone(), self.device.clone());
        ctx.wait(
            async move { store.load_shadow(&tenant, &device).await }
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(document) => act.set_shadow(document),
                    Err(error) => {
                        tracing::warn!(tenant = %act.tenant, device = %act.device, %error, "device actor could not load its shadow");
                        act.exit.reason = ExitReason::Failed;
                        ctx.terminate();
                    }
                }),
        );
    }

    fn set_shadow(&mut self, document: Option<ShadowDocument>) {
        self.shadow_view = document.as_ref().map(|d| Arc::new(d.state_view()));
        self.shadow = document.map(Box::new);
    }

    fn publish_shadow(&self, suffix: &str, payload: &Value) {
        let topic = format!("devices/{}/shadow/{suffix}", self.device);
        let payload = Bytes::from(serde_json::to_vec(payload).unwrap_or_default());
        self.shadows.outbound.publish(&self.tenant, topic, payload);
    }

    fn update_refused(
        &self,
        error: &ShadowError,
        client_token: Option<&str>,
        at: DateTime<Utc>,
        requester: Requester,
    ) {
        self.shadows.metrics.update_rejected(error.code());
        tracing::debug!(tenant = %self.tenant, device = %self.device, code = error.code(), ?requester, "shadow update rejected");
        if requester == Requester::Mqtt {
            self.publish_shadow("update/rejected", &error.rejected(client_token, at));
        }
    }

    /// `devices/{id}/shadow/update` over MQTT: the reply goes to the shadow topics.
    pub(super) fn shadow_update_over_mqtt(
        &mut self,
        payload: Bytes,
        at: DateTime<Utc>,
        ctx: &mut Context<Self>,
    ) {
        let update = self.update_shadow(payload, at, Requester::Mqtt);
        ctx.wait(update.map(|_, _, _| ()));
    }

    /// `devices/{id}/shadow/get` over MQTT.
    pub(super) fn shadow_get_over_mqtt(&mut self, payload: &[u8], at: DateTime<Utc>) {
        let limits = self.shadows.limits;
        let answer = match shadow::parse_get(payload, &limits) {
            Ok(token) => match self.shadow.as_deref() {
                Some(document) => Ok(shadow::get_accepted(document, token.as_deref())),
                None => Err((ShadowError::NotFound, token)),
            },
            Err(error) => Err((error, shadow::client_token_of(payload, &limits))),
        };
        match answer {
            Ok(accepted) => self.publish_shadow("get/accepted", &accepted),
            Err((error, token)) => self.publish_shadow("get/rejected", &error.rejected(token.as_deref(), at)),
        }
    }

    /// Parses, merges, saves, then adopts and announces an update. Resolves to the
    /// `update/accepted` payload or the reason it was refused.
    fn update_shadow(
        &mut self,
        payload: Bytes,
        at: DateTime<Utc>,
        requester: Requester,
    ) -> ResponseActFuture<Self, Result<Value, ShadowError>> {
        let limits = self.shadows.limits;
        let prepared = shadow::parse_update(&payload, &limits).and_then(|update| {
            let outcome = shadow::apply_update(self.shadow.as_deref(), &update, at, &limits)?;
            Ok((update, outcome))
        });
        let (update, outcome) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                let token = shadow::client_token_of(&payload, &limits);
                self.update_refused(&error, token.as_deref(), at, requester);
                return Box::pin(fut::ready(Err(error)));
            }
        };
        let store = self.shadows.store.clone();
        let (tenant, device) = (self.tenant.clone(), self.device.clone());
        let expected = self.shadow.as_deref().map_or(0, |d| d.version);
        let document = outcome.document.clone();
        Box::pin(
            async move {
                match store.save_shadow(&tenant, &device, &document, expected).await {
                    Ok(()) => Ok(()),
                    // Someone else wrote it: read what is stored, so the next update merges onto it.
                    Err(ShadowStoreError::Conflict) => Err((
                        ShadowStoreError::Conflict,
                        Some(store.load_shadow(&tenant, &device).await),
                    )),
                    Err(error) => Err((error, None)),
                }
            }
            .into_actor(self)
            .map(move |saved, act, _ctx| match saved {
                Ok(()) => {
                    act.set_shadow(Some(outcome.document));
                    act.shadows.metrics.update_accepted();
                    act.publish_shadow("update/accepted", &outcome.accepted);
                    act.publish_shadow("update/documents", &outcome.documents);
                    if let Some(delta) = &outcome.delta {
                        act.publish_shadow("update/delta", delta);
                    }
                    tracing::debug!(tenant = %act.tenant, device = %act.device, version = act.shadow.as_deref().map_or(0, |d| d.version), ?requester, "shadow updated");
                    Ok(outcome.accepted)
                }
                Err((ShadowStoreError::Conflict, reloaded)) => {
                    if let Some(Ok(stored)) = reloaded {
                        act.set_shadow(stored);
                    }
                    let error = ShadowError::VersionConflict {
                        requested: update.version.unwrap_or(expected),
                        current: act.shadow.as_deref().map_or(0, |d| d.version),
                    };
                    act.update_refused(&error, update.client_token.as_deref(), at, requester);
                    Err(error)
                }
                Err((ShadowStoreError::Unavailable(why), _)) => {
                    tracing::warn!(tenant = %act.tenant, device = %act.device, error = %why, "shadow not saved");
                    let error = ShadowError::Unavailable(why);
                    act.update_refused(&error, update.client_token.as_deref(), at, requester);
                    Err(error)
                }
            }),
        )
    }
}

impl Handler<ShadowRequest> for DeviceActor {
    type Result = AtomicResponse<Self, Result<Value, ShadowError>>;

    fn handle(&mut self, msg: ShadowRequest, _ctx: &mut Context<Self>) -> Self::Result {
        self.messages_handled += 1;
        if self.shadows.shared_store && self.connection.is_none() {
            // Another node may own the device and have written its shadow: read it first.
            let store = self.shadows.store.clone();
            let (tenant, device) = (self.tenant.clone(), self.device.clone());
            return AtomicResponse::new(Box::pin(
                async move { store.load_shadow(&tenant, &device).await }
                    .into_actor(self)
                    .then(
                        move |loaded, act, _ctx| -> ResponseActFuture<Self, Result<Value, ShadowError>> {
                            match loaded {
                                Ok(document) => act.set_shadow(document),
                                Err(error) => {
                                    return Box::pin(fut::ready(Err(ShadowError::Unavailable(
                                        error.to_string(),
                                    ))));
                                }
                            }
                            act.serve_shadow_request(msg)
                        },
                    ),
            ));
        }
        AtomicResponse::new(self.serve_shadow_request(msg))
    }
}

impl DeviceActor {
    fn serve_shadow_request(
        &mut self,
        msg: ShadowRequest,
    ) -> ResponseActFuture<Self, Result<Value, ShadowError>> {
        match msg.action {
            ShadowAction::Get => {
                let answer = self
                    .shadow
                    .as_deref()
                    .map(ShadowDocument::view)
                    .ok_or(ShadowError::NotFound);
                Box::pin(fut::ready(answer))
            }
            ShadowAction::Update { payload } => self.update_shadow(payload, msg.at, Requester::Api),
        }
    }
}

impl Handler<PublishedShadowRequest> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: PublishedShadowRequest, ctx: &mut Context<Self>) {
        self.messages_handled += 1;
        match msg.topic {
            ShadowTopic::Update => self.shadow_update_over_mqtt(msg.payload, msg.at, ctx),
            ShadowTopic::Get => self.shadow_get_over_mqtt(&msg.payload, msg.at),
        }
    }
}

impl Handler<PendingShadowDelta> for DeviceActor {
    type Result = Option<Bytes>;

    fn handle(&mut self, _msg: PendingShadowDelta, _ctx: &mut Context<Self>) -> Option<Bytes> {
        self.messages_handled += 1;
        let delta = shadow::delta_message(self.shadow.as_deref()?, Utc::now())?;
        serde_json::to_vec(&delta).ok().map(Bytes::from)
    }
}
