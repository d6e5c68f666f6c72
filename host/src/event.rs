//! The event every module speaks: what ingest produces, the journal stores and plugins receive.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// One verified event from a source. Its delivery attempt number is not part of it: that
/// belongs to each plugin's delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The sender's delivery id, or the SHA-256 of the body when the sender gives none.
    pub id: String,
    /// The configured source that received it.
    pub source: String,
    /// Lower-case dotted type, such as `github.push`.
    pub event_type: String,
    /// When the host accepted it, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Media type of `data`.
    pub content_type: String,
    /// The verified payload, byte for byte.
    pub data: Bytes,
    /// Extra facts as name/value pairs (selected headers).
    pub attributes: Vec<(String, String)>,
}

/// The attribute in which an event names its producer: a CloudEvent's own `source`.
const PRODUCER_ATTRIBUTE: &str = "source";

impl Event {
    /// Who produced the event, by its own account, when it says: a CloudEvent's `source`
    /// attribute. CloudEvents makes only `source` with `id` unique, so two producers' events
    /// with the same id are two events.
    pub fn producer(&self) -> Option<&str> {
        producer(&self.attributes)
    }

    /// What dedup compares, on one line: `{source}:{id}`, or with a producer
    /// `{source}:"{producer}":{id}` (the producer JSON-quoted, so that where it ends is never in
    /// doubt). Emitted events' ids start with their parent's key.
    pub fn key(&self) -> String {
        match self.producer() {
            None => format!("{}:{}", self.source, self.id),
            Some(producer) => {
                let quoted = serde_json::Value::from(producer);
                format!("{}:{quoted}:{}", self.source, self.id)
            }
        }
    }
}

/// The producer named in `attributes` (see [`Event::producer`]).
pub fn producer(attributes: &[(String, String)]) -> Option<&str> {
    attributes.iter().find(|(name, _)| name == PRODUCER_ATTRIBUTE).map(|(_, value)| value.as_str())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source: &str, id: &str, attributes: &[(&str, &str)]) -> Event {
        Event {
            id: id.to_owned(),
            source: source.to_owned(),
            event_type: "t".to_owned(),
            time_ms: 0,
            content_type: "application/json".to_owned(),
            data: Bytes::new(),
            attributes: attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    #[test]
    fn a_key_is_source_and_id_with_the_producer_quoted_between_when_there_is_one() {
        assert_eq!(event("github", "58474f00", &[("hook-id", "1")]).key(), "github:58474f00");
        let cloud = event("ce", "A-1", &[("subject", "x"), ("source", "/my\"context")]);
        assert_eq!(cloud.producer(), Some("/my\"context"));
        assert_eq!(cloud.key(), r#"ce:"/my\"context":A-1"#);
    }

    #[test]
    fn keys_differ_whenever_producer_or_id_differ_even_where_one_could_hide_the_other() {
        let pairs = [("a\":\"b", "c"), ("a", "b\":c"), ("a", "b"), ("a\n", "b")];
        let keys: std::collections::BTreeSet<String> =
            pairs.iter().map(|(producer, id)| event("ce", id, &[("source", producer)]).key()).collect();
        assert_eq!(keys.len(), pairs.len(), "{keys:?}");
        assert!(keys.iter().all(|key| !key.contains('\n')), "one line: {keys:?}");
    }
}
