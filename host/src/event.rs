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

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
pub fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
