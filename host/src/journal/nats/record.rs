//! How events and dead letters are written into NATS messages and read back: the payload is
//! the event's data byte for byte; everything else travels as JSON in one header each, so
//! ids and types with any characters survive (header values cannot hold line breaks).

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::journal::AttemptError;

/// The header holding the event's metadata.
pub const EVENT_HEADER: &str = "Wasmhook-Event";
/// The header naming the only plugins a replayed copy is for (comma-separated).
pub const PLUGINS_HEADER: &str = "Wasmhook-Plugins";
/// The header of a dead letter's facts.
pub const DEAD_HEADER: &str = "Wasmhook-Dead";

#[derive(Serialize, Deserialize)]
struct Meta {
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    time_ms: u64,
    content_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    attributes: Vec<(String, String)>,
}

/// What a dead letter records besides its event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dead {
    /// The plugin that failed.
    pub plugin: String,
    /// Attempts made.
    pub attempts: u32,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// When it died, in milliseconds since the Unix epoch.
    pub died_ms: u64,
}

/// The headers and payload of `event`, deduplicated by JetStream under `message_id`.
pub fn event_message(event: &Event, message_id: &str) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
    headers.insert(EVENT_HEADER, meta_json(event).as_str());
    (headers, event.data.clone())
}

/// The event in a message's headers and payload; `None` when it is not one of ours.
pub fn read_event(headers: Option<&HeaderMap>, payload: &Bytes) -> Option<Event> {
    let meta: Meta = serde_json::from_str(headers?.get(EVENT_HEADER)?.as_str()).ok()?;
    Some(Event {
        id: meta.id,
        source: meta.source,
        event_type: meta.event_type,
        time_ms: meta.time_ms,
        content_type: meta.content_type,
        data: payload.clone(),
        attributes: meta.attributes,
    })
}

/// Whether a message is for `plugin`: every message is, unless a replay named its plugins.
pub fn is_for(headers: Option<&HeaderMap>, plugin: &str) -> bool {
    match headers.and_then(|headers| headers.get(PLUGINS_HEADER)) {
        Some(plugins) => plugins.as_str().split(',').any(|name| name == plugin),
        None => true,
    }
}

/// The headers and payload of a dead letter of `event`.
pub fn dead_message(event: &Event, dead: &Dead) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(EVENT_HEADER, meta_json(event).as_str());
    headers.insert(DEAD_HEADER, serde_json::to_string(dead).unwrap_or_default().as_str());
    (headers, event.data.clone())
}

/// A dead letter's facts, if the message holds them.
pub fn read_dead(headers: Option<&HeaderMap>) -> Option<Dead> {
    serde_json::from_str(headers?.get(DEAD_HEADER)?.as_str()).ok()
}

/// The JetStream message id of an event: its dedup key, (source, id), on one line.
pub fn message_id(source: &str, id: &str) -> String {
    let id: String = id.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect();
    format!("{source}:{id}")
}

fn meta_json(event: &Event) -> String {
    let meta = Meta {
        id: event.id.clone(),
        source: event.source.clone(),
        event_type: event.event_type.clone(),
        time_ms: event.time_ms,
        content_type: event.content_type.clone(),
        attributes: event.attributes.clone(),
    };
    serde_json::to_string(&meta).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            id: "line\nbreak\u{e9}".into(),
            source: "ce".into(),
            event_type: "com.example.x".into(),
            time_ms: 42,
            content_type: "application/json".into(),
            data: Bytes::from_static(b"{\"a\":1}"),
            attributes: vec![("subject".into(), "s\r\n".into())],
        }
    }

    #[test]
    fn an_event_survives_the_trip_through_headers() {
        let (headers, payload) = event_message(&event(), &message_id("ce", &event().id));
        assert_eq!(read_event(Some(&headers), &payload), Some(event()));
        let id = headers.get(async_nats::header::NATS_MESSAGE_ID).expect("id").as_str().to_owned();
        assert!(!id.contains('\n') && id.starts_with("ce:line"), "{id}");
        assert!(read_event(None, &payload).is_none());
    }

    #[test]
    fn a_dead_letter_keeps_its_errors() {
        let dead = Dead {
            plugin: "p".into(),
            attempts: 2,
            errors: vec![AttemptError { attempt: 1, time_ms: 5, error: "boom\nagain".into() }],
            died_ms: 9,
        };
        let (headers, payload) = dead_message(&event(), &dead);
        assert_eq!(read_dead(Some(&headers)), Some(dead));
        assert_eq!(read_event(Some(&headers), &payload), Some(event()));
    }

    #[test]
    fn a_replay_names_its_plugins() {
        let mut headers = HeaderMap::new();
        assert!(is_for(Some(&headers), "a") && is_for(None, "a"));
        headers.insert(PLUGINS_HEADER, "a,bc");
        assert!(is_for(Some(&headers), "a") && is_for(Some(&headers), "bc"));
        assert!(!is_for(Some(&headers), "b"));
    }
}
