//! The journal: where accepted events and their per-plugin deliveries live until done, and
//! where failures wait to be retried or replayed.
//!
//! [`Journal`] is the seam every backend implements; [`sqlite::SqliteJournal`] is the
//! embedded default. Ingest calls [`Journal::accept`] and answers only after it returns; the
//! dispatcher leases due deliveries with [`Journal::take`] and settles each with
//! [`Journal::finish`]; the admin API reads, replays and purges. Retry *policy* (how long to
//! wait) is the dispatcher's; the journal only records when a delivery is next due.

pub mod nats;
pub mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::Event;

/// How long a (source, id) is remembered to refuse repeats, unless the source says otherwise.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// How long handled events are kept (for `/v1/events` and replay) unless configured.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Deliveries not yet finished above which ingest refuses new events, unless configured.
pub const DEFAULT_MAX_PENDING: u64 = 100_000;

/// An event offered to the journal, with the plugins that subscribe to it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The event.
    pub event: Event,
    /// One delivery is created per plugin; none means the event is kept as unrouted.
    pub plugins: Vec<String>,
    /// How long its (source, id) refuses repeats.
    pub dedup_window: Duration,
}

/// The result of offering an event to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored durably, with one delivery per subscribed plugin.
    New,
    /// An event with the same [key](crate::event::Event::key) (source, id and any producer) was
    /// accepted within its dedup window; nothing was stored.
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

/// How a delivery attempt ended, and what happens next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin handled the event.
    Done,
    /// The attempt failed; try again after `delay`.
    Retry {
        /// What went wrong.
        error: String,
        /// The wait before the next attempt.
        delay: Duration,
    },
    /// The attempt failed and there will be no other: park it as a dead letter.
    Dead {
        /// What went wrong.
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

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Running => "running",
            DeliveryStatus::Done => "done",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Dead => "dead",
        }
    }

    fn parse(text: &str) -> DeliveryStatus {
        match text {
            "running" => DeliveryStatus::Running,
            "done" => DeliveryStatus::Done,
            "retrying" => DeliveryStatus::Retrying,
            "dead" => DeliveryStatus::Dead,
            _ => DeliveryStatus::Pending,
        }
    }
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
        } else if deliveries.iter().all(|d| matches!(d.status, DeliveryStatus::Done | DeliveryStatus::Dead)) {
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
    /// The journal's key of the delivery (the dead-letter id when it is dead).
    pub delivery: i64,
    /// The plugin's name.
    pub plugin: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// How many attempts have started.
    pub attempts: u32,
    /// The last attempt's error, if it failed.
    pub last_error: Option<String>,
    /// When it is next due (pending, retrying) or its lease ends (running).
    pub next_attempt_ms: Option<u64>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// The plugin version (SHA-256 of its file) that ran the last finished attempt.
    pub sha256: Option<String>,
}

/// One failed attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttemptError {
    /// Which attempt.
    pub attempt: u32,
    /// When it failed, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What went wrong.
    pub error: String,
}

/// A dead letter: a delivery the host gave up on, with its event.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id: the delivery's key.
    pub delivery: i64,
    /// The event's id.
    pub event_id: String,
    /// The event's source.
    pub source: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The plugin that failed.
    pub plugin: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// When it died, in milliseconds since the Unix epoch.
    pub died_ms: Option<u64>,
}

/// One dead letter in full: its errors and its event's payload.
#[derive(Debug, Clone)]
pub struct DeadLetterDetail {
    /// The summary also listed by [`Journal::dead_letters`].
    pub letter: DeadLetter,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// The event's content type.
    pub content_type: String,
    /// The event's payload.
    pub data: bytes::Bytes,
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadSelector {
    /// These ids.
    Ids(Vec<i64>),
    /// Every dead letter of this plugin.
    Plugin(String),
    /// Every dead letter.
    All,
}

/// Counts per status, for `/v1/stats`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Events stored.
    pub events: u64,
    /// Events stored with no delivery.
    pub unrouted: u64,
    /// Deliveries waiting for their first attempt.
    pub pending: u64,
    /// Deliveries leased to a worker.
    pub running: u64,
    /// Deliveries waiting for a retry.
    pub retrying: u64,
    /// Deliveries handled (within the retention period).
    pub done: u64,
    /// Dead letters.
    pub dead: u64,
    /// The cap on unfinished deliveries above which ingest answers 503.
    pub max_pending: u64,
    /// Events accepted in the last minute.
    pub accepted_last_minute: u64,
    /// Deliveries done in the last minute.
    pub done_last_minute: u64,
    /// Dead letters per plugin.
    pub dead_by_plugin: std::collections::BTreeMap<String, u64>,
}

/// What a round of housekeeping removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Handled events past the retention period (and their dedup window).
    pub events: u64,
}

/// Why the journal could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Too many deliveries are unfinished; the caller should come back later.
    #[error("the journal holds {pending} unfinished deliveries (the limit is {max})")]
    Full {
        /// Unfinished deliveries now.
        pending: u64,
        /// The configured cap.
        max: u64,
    },
    /// The storage engine failed.
    #[error("journal storage failed: {0}")]
    Storage(String),
    /// The journal has stopped (the host is shutting down).
    #[error("the journal is closed")]
    Closed,
    /// The storage engine cannot be reached now (a distributed backend); try again later.
    #[error("the journal is unreachable: {0}")]
    Unavailable(String),
    /// The event is larger than the storage engine takes in one message.
    #[error("the event is larger than the journal's limit of {max} bytes per message")]
    TooLarge {
        /// The most an event's message may take, headers included.
        max: usize,
    },
    /// This backend cannot do what was asked.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A loaded plugin as the dispatcher offers it to [`Journal::take`].
#[derive(Debug, Clone)]
pub struct Want {
    /// Its name.
    pub plugin: String,
    /// Calls of it that can start now; none means take nothing for it this time.
    pub free: usize,
    /// The glob patterns it subscribes to.
    pub subscriptions: Arc<[String]>,
    /// How long a delivery taken for it stays leased: its timeout plus a margin.
    pub lease: Duration,
    /// When it was loaded, in milliseconds since the Unix epoch (a new queue starts there).
    pub since_ms: u64,
}

/// Which plugins should get an event of a given type (the registry's routing, for replay).
pub type Route<'a> = &'a (dyn Fn(&str) -> Vec<String> + Send + Sync);

/// A durable store of events and their deliveries.
#[async_trait::async_trait]
pub trait Journal: Send + Sync {
    /// Stores an event with one pending delivery per plugin, unless its (source, id) was
    /// accepted within the dedup window. Returns only once the event is durable.
    async fn accept(&self, new: NewEvent) -> Result<Accepted, JournalError>;

    /// Whether [`Journal::accept`] would refuse any event now for want of room (`Full`) or
    /// of its store (`Unavailable`): a cheap check, so that ingest can refuse before it
    /// verifies and parses a request it could not store.
    fn has_room(&self) -> Result<(), JournalError>;

    /// Whether `event` fits in one of the journal's records (`TooLarge` when not), checked
    /// before a plugin's emitted events are committed with its outcome. The embedded journal
    /// takes any event a plugin may emit.
    fn check_size(&self, _event: &Event) -> Result<(), JournalError> {
        Ok(())
    }

    /// Leases up to `max` due deliveries in all, for the plugins with some `free` capacity.
    /// The nats backend also keeps to each plugin's `free` and `lease`; the embedded one
    /// leases every delivery for the longest `lease` (the dispatcher gives back what a busy
    /// plugin cannot run). Waits up to `wait` for work to arrive when none is due; an empty
    /// result means none came.
    async fn take(&self, wants: &[Want], max: usize, wait: Duration) -> Result<Vec<Lease>, JournalError>;

    /// Settles a leased delivery, recording the plugin version (`sha256`) that ran it, and in
    /// the same transaction accepts `emitted` events. A lease that ran out and was taken again
    /// is left alone (and `emitted` dropped), so a delivery is settled at most once per
    /// attempt. Returns whether the lease still held (one that ran out but was not taken
    /// again still settles).
    async fn finish(
        &self,
        lease: &Lease,
        outcome: Outcome,
        sha256: &str,
        emitted: Vec<NewEvent>,
    ) -> Result<bool, JournalError>;

    /// Gives a lease back unused (the plugin was busy or is gone): the delivery is due again
    /// at once. The embedded journal does not count the attempt; JetStream does (SCALE-OUT.md).
    async fn release(&self, lease: &Lease) -> Result<(), JournalError>;

    /// Unfinished deliveries (pending, running, retrying) per plugin.
    async fn pending_by_plugin(&self) -> Result<std::collections::BTreeMap<String, u64>, JournalError>;

    /// The most recent event with this id, with its deliveries.
    async fn event(&self, id: &str) -> Result<Option<EventRecord>, JournalError>;

    /// Dead letters, newest first, of one plugin or all, at most `limit`.
    async fn dead_letters(&self, plugin: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, JournalError>;

    /// One dead letter with its errors and payload.
    async fn dead_letter(&self, delivery: i64) -> Result<Option<DeadLetterDetail>, JournalError>;

    /// Makes the selected dead letters due now, with a fresh attempt budget. Returns how many.
    async fn replay_dead(&self, selector: DeadSelector) -> Result<u64, JournalError>;

    /// Deletes the selected dead letters. Returns how many.
    async fn purge_dead(&self, selector: DeadSelector) -> Result<u64, JournalError>;

    /// Delivers again every stored event accepted since `since_ms` to the plugins `route`
    /// names for its type (none: skipped): finished deliveries (done, dead) are made due
    /// again and missing ones added; those still pending, retrying or running are left as
    /// they are. Returns how many deliveries were made due.
    async fn replay(&self, since_ms: u64, route: Route<'_>) -> Result<u64, JournalError>;

    /// Counts per status.
    async fn stats(&self) -> Result<Stats, JournalError>;

    /// Checks the journal can take a write now (for readiness probes).
    async fn ping(&self) -> Result<(), JournalError>;

    /// Removes handled events past the retention period (and, with the embedded journal,
    /// past their dedup window: there an event is its own dedup key).
    async fn expire(&self) -> Result<Expired, JournalError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(status: DeliveryStatus) -> DeliveryRecord {
        DeliveryRecord {
            delivery: 1,
            plugin: "p".into(),
            status,
            attempts: 1,
            last_error: None,
            next_attempt_ms: None,
            errors: Vec::new(),
            sha256: None,
        }
    }

    #[test]
    fn event_status_sums_its_deliveries() {
        use DeliveryStatus::*;
        assert_eq!(EventStatus::of(&[]), EventStatus::Unrouted);
        assert_eq!(EventStatus::of(&[delivery(Done), delivery(Done)]), EventStatus::Done);
        assert_eq!(EventStatus::of(&[delivery(Done), delivery(Dead)]), EventStatus::Dead);
        assert_eq!(EventStatus::of(&[delivery(Done), delivery(Running)]), EventStatus::Pending);
        assert_eq!(EventStatus::of(&[delivery(Dead), delivery(Retrying)]), EventStatus::Pending);
    }

    #[test]
    fn statuses_round_trip_through_their_stored_text() {
        use DeliveryStatus::*;
        for status in [Pending, Running, Done, Retrying, Dead] {
            assert_eq!(DeliveryStatus::parse(status.as_str()), status);
        }
    }
}
