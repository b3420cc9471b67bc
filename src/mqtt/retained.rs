//! Retained messages of one namespace: the last retained message per topic, delivered to new
//! subscriptions whose filter matches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ntex::util::ByteString;

use super::message::Publication;
use super::topic;

#[derive(Default)]
pub struct RetainedStore {
    messages: HashMap<ByteString, Arc<Publication>>,
}

impl RetainedStore {
    /// Stores or replaces the topic's retained message; an empty payload clears it.
    /// Returns the change in the number of retained messages (-1, 0 or 1).
    pub fn set(&mut self, publication: Arc<Publication>) -> i64 {
        if publication.payload.is_empty() {
            return -(self.messages.remove(&publication.topic).is_some() as i64);
        }
        match self.messages.insert(publication.topic.clone(), publication) {
            Some(_) => 0,
            None => 1,
        }
    }

    /// Unexpired retained messages whose topic `filter` matches, oldest topic name first.
    pub fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Publication>> {
        let mut found: Vec<Arc<Publication>> = self
            .messages
            .values()
            .filter(|p| !p.is_expired(now) && topic::matches(filter, &p.topic))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.topic.cmp(&b.topic));
        found
    }

    /// Drops expired messages; returns how many.
    pub fn purge_expired(&mut self, now: Instant) -> usize {
        let before = self.messages.len();
        self.messages.retain(|_, p| !p.is_expired(now));
        before - self.messages.len()
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use ntex_mqtt::QoS;

    use super::*;

    fn msg(topic: &str, payload: &str) -> Arc<Publication> {
        Arc::new(Publication::internal(
            topic.to_string(),
            payload.to_string(),
            QoS::AtLeastOnce,
            true,
        ))
    }

    #[test]
    fn set_replace_clear() {
        let mut store = RetainedStore::default();
        assert_eq!(store.set(msg("a/b", "1")), 1);
        assert_eq!(store.set(msg("a/b", "2")), 0);
        assert_eq!(store.set(msg("a/c", "3")), 1);
        let found = store.matching("a/+", Instant::now());
        assert_eq!(
            found.iter().map(|p| &p.payload[..]).collect::<Vec<_>>(),
            [b"2", b"3"]
        );
        assert_eq!(store.set(msg("a/b", "")), -1);
        assert_eq!(store.set(msg("a/b", "")), 0);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn expired_messages_are_not_delivered() {
        let mut store = RetainedStore::default();
        let mut p = Publication::internal("t", "x", QoS::AtMostOnce, true);
        p.properties.message_expiry = Some(1);
        p.received_at = Instant::now() - std::time::Duration::from_secs(2);
        store.set(Arc::new(p));
        assert!(store.matching("#", Instant::now()).is_empty());
        assert_eq!(store.purge_expired(Instant::now()), 1);
    }
}
