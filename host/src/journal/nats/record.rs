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
/// The most a dead letter's failed attempts take in its header: the newest that fit are kept.
const DEAD_ERRORS_BYTES: usize = 8 * 1024;
/// What a dead letter's message may add to its event's: the attempts' errors, the plugin's
/// name, the letter's own message id. An event is stored only with this much room to spare,
/// so that its dead letter always fits in a message too.
pub const DEAD_LETTER_ROOM: usize = DEAD_ERRORS_BYTES + 2 * 1024;

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

/// The headers and payload of a dead letter of `event`. Of its failed attempts, the newest
/// that fit in [`DEAD_ERRORS_BYTES`] are kept; the last one always, cut to fit if it must (an
/// error is at most 4 KiB, but JSON may write one byte as six).
pub fn dead_message(event: &Event, dead: &Dead) -> (HeaderMap, Bytes) {
    let json_len = |error: &AttemptError| serde_json::to_string(error).map_or(0, |json| json.len() + 1);
    let mut errors: Vec<AttemptError> = Vec::new();
    let mut bytes = 0;
    for error in dead.errors.iter().rev() {
        bytes += json_len(error);
        if bytes > DEAD_ERRORS_BYTES && !errors.is_empty() {
            break;
        }
        errors.push(error.clone());
    }
    errors.reverse();
    if let Some(last) = errors.last_mut() {
        while json_len(last) > DEAD_ERRORS_BYTES {
            last.error.truncate(last.error.floor_char_boundary(last.error.len() / 2));
        }
    }
    let dead = Dead { errors, ..dead.clone() };
    let mut headers = HeaderMap::new();
    headers.insert(EVENT_HEADER, meta_json(event).as_str());
    headers.insert(DEAD_HEADER, serde_json::to_string(&dead).unwrap_or_default().as_str());
    (headers, event.data.clone())
}

/// The bytes a message with `headers` and a `payload` of that length takes against the
/// server's `max_payload`: the header block as NATS writes it (`NATS/1.0`, one line per value,
/// a blank line; none without headers), then the payload.
pub fn wire_len(headers: &HeaderMap, payload: usize) -> usize {
    if headers.is_empty() {
        return payload;
    }
    let lines: usize = headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &[u8] = name.as_ref();
            values.iter().map(move |value| name.len() + ": \r\n".len() + value.as_str().len())
        })
        .sum();
    "NATS/1.0\r\n\r\n".len() + lines + payload
}

/// A dead letter's facts, if the message holds them.
pub fn read_dead(headers: Option<&HeaderMap>) -> Option<Dead> {
    serde_json::from_str(headers?.get(DEAD_HEADER)?.as_str()).ok()
}

/// The JetStream message id of an event: its [key](Event::key), on one line.
pub fn message_id(event: &Event) -> String {
    event.key().chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
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
        let (headers, payload) = event_message(&event(), &message_id(&event()));
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
    fn a_dead_letter_keeps_its_newest_errors_that_fit() {
        let error = |attempt| AttemptError { attempt, time_ms: 5, error: "x".repeat(3000) };
        let dead = Dead { plugin: "p".into(), attempts: 10, errors: (1..=10).map(error).collect(), died_ms: 9 };
        let (headers, _) = dead_message(&event(), &dead);
        let kept = read_dead(Some(&headers)).expect("dead").errors;
        assert_eq!(kept.iter().map(|e| e.attempt).collect::<Vec<_>>(), [9, 10]);
        assert!(headers.get(DEAD_HEADER).expect("header").as_str().len() <= DEAD_ERRORS_BYTES);

        // Control characters take six bytes each in JSON: the last error is cut to fit.
        let huge = Dead { errors: vec![AttemptError { error: "\u{1}".repeat(4096), ..error(1) }], ..dead };
        let (headers, _) = dead_message(&event(), &huge);
        let kept = read_dead(Some(&headers)).expect("dead").errors;
        assert!(kept.len() == 1 && !kept[0].error.is_empty(), "the last error is always kept, in part");
        assert!(headers.get(DEAD_HEADER).expect("header").as_str().len() <= DEAD_ERRORS_BYTES + 128);
    }

    #[test]
    fn wire_len_counts_the_header_block_as_nats_writes_it() {
        let mut headers = HeaderMap::new();
        assert_eq!(wire_len(&headers, 7), 7);
        headers.insert("Ab", "cde");
        headers.append("Ab", "f");
        // "NATS/1.0\r\n" "Ab: cde\r\n" "Ab: f\r\n" "\r\n"
        assert_eq!(wire_len(&headers, 100), 10 + 9 + 7 + 2 + 100);
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
