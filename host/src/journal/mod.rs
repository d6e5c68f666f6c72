//! The journal: where accepted events and their per-plugin deliveries live until done.
//!
//! [`Journal`] is the seam every backend implements; [`sqlite::SqliteJournal`] is the
//! embedded default. Ingest calls [`Journal::accept`] and answers only after it returns;
//! the dispatcher leases due deliveries with [`Journal::take`] and settles each with
//! [`Journal::finish`]; the admin API reads with [`Journal::event`].

pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::event::Event;

/// The result of offering an event to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored durably, with one delivery per subscribed plugin.
    New,
    /// The same (source, id) was accepted before; nothing was stored.
    Duplicate,
}

/// One delivery of an event to one plugin, leased to a worker until it is finished or the
/// lease runs out (then another worker may take it: delivery is at least once).
#[derive(Debug, Clone)]
pub struct Lease {
    /// The journal's key of the delivery.
    pub delivery: i64,
    /// The plugin to call.
    pub plugin: String,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// The event to hand it.
    pub event: Arc<Event>,
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin handled the event.
    Done,
    /// The plugin failed; the delivery is parked with the error. (Retries with backoff belong
    /// to the journal's retry policy, which builds on this.)
    Dead {
        /// What went wrong, for the operator.
        error: String,
    },
}

/// Where one delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waiting for its first attempt.
    Pending,
    /// Leased to a worker.
    Running,
    /// Handled.
    Done,
    /// Failed, waiting for its next attempt.
    Retrying,
    /// Given up on; kept for the operator.
    Dead,
}

/// Where an event stands, summed over its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// No plugin subscribed to its type when it arrived; it is kept all the same.
    Unrouted,
    /// Some delivery is not finished yet.
    Pending,
    /// Every delivery is done.
    Done,
    /// Every delivery is finished and at least one is dead.
    Dead,
}

impl EventStatus {
    /// The event's status from its deliveries' statuses.
    pub fn of(deliveries: &[DeliveryRecord]) -> EventStatus {
        if deliveries.is_empty() {
            EventStatus::Unrouted
        } else if deliveries.iter().all(|d| d.status == DeliveryStatus::Done) {
            EventStatus::Done
        } else if deliveries
            .iter()
            .all(|d| matches!(d.status, DeliveryStatus::Done | DeliveryStatus::Dead))
        {
            EventStatus::Dead
        } else {
            EventStatus::Pending
        }
    }
}

/// An event as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    /// The event id.
    pub id: String,
    /// The source that received it.
    pub source: String,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Summed over the deliveries.
    pub status: EventStatus,
    /// One per subscribed plugin.
    pub deliveries: Vec<DeliveryRecord>,
}

/// One delivery as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRecord {
    /// The plugin's name.
    pub plugin: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// How many attempts have started.
    pub attempts: u32,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
}

/// Why the journal could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The storage engine failed.
    #[error("journal storage failed: {0}")]
    Storage(String),
    /// The journal has stopped (the host is shutting down).
    #[error("the journal is closed")]
    Closed,
}

/// A durable store of events and their deliveries.
#[async_trait::async_trait]
pub trait Journal: Send + Sync {
    /// Stores `event` with one pending delivery per plugin in `plugins` (none: unrouted),
    /// unless its (source, id) was accepted before. Returns only once the event is durable.
    async fn accept(&self, event: Event, plugins: Vec<String>) -> Result<Accepted, JournalError>;

    /// Leases up to `max` due deliveries for the named plugins, each for `lease`. Waits up
    /// to `wait` for work to arrive when none is due; an empty result means none came.
    async fn take(
        &self,
        plugins: &[String],
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, JournalError>;

    /// Settles a leased delivery. A lease that ran out and was taken again by someone else
    /// is left alone, so a delivery is settled at most once per attempt.
    async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<(), JournalError>;

    /// The most recent event with this id, with its deliveries.
    async fn event(&self, id: &str) -> Result<Option<EventRecord>, JournalError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(status: DeliveryStatus) -> DeliveryRecord {
        DeliveryRecord {
            plugin: "p".into(),
            status,
            attempts: 1,
            last_error: None,
        }
    }

    #[test]
    fn event_status_sums_its_deliveries() {
        use DeliveryStatus::*;
        assert_eq!(EventStatus::of(&[]), EventStatus::Unrouted);
        assert_eq!(
            EventStatus::of(&[delivery(Done), delivery(Done)]),
            EventStatus::Done
        );
        assert_eq!(
            EventStatus::of(&[delivery(Done), delivery(Dead)]),
            EventStatus::Dead
        );
        assert_eq!(
            EventStatus::of(&[delivery(Done), delivery(Running)]),
            EventStatus::Pending
        );
        assert_eq!(
            EventStatus::of(&[delivery(Dead), delivery(Pending)]),
            EventStatus::Pending
        );
    }
}
