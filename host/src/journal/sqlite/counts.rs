//! The embedded journal's counts (events, deliveries per status, dead letters per plugin, the
//! last minute's acceptances and completions), kept by the writer as it commits, so that
//! `/v1/stats` and every `/metrics` scrape cost the same whatever the journal holds.
//!
//! Each write records what it changed in a [`Tally`]; the writer adds a write's tally to the
//! [`Counts`] only once its transaction has committed. [`Counts::load`] counts the tables
//! once, when the journal opens.

use std::collections::BTreeMap;

use rusqlite::Connection;

use super::ready::Fresh;
use crate::journal::{DeliveryStatus, Stats};

fn slot(status: DeliveryStatus) -> usize {
    match status {
        DeliveryStatus::Pending => 0,
        DeliveryStatus::Running => 1,
        DeliveryStatus::Retrying => 2,
        DeliveryStatus::Done => 3,
        DeliveryStatus::Dead => 4,
    }
}

/// How one write changed the counts, the lease it settled and the deliveries it created.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// The lease (delivery, attempt) whose outcome the write recorded: forgotten once the
    /// write commits, so that a failed commit leaves the lease to run out instead.
    pub(super) lease_done: Option<(i64, u32)>,
    /// The deliveries acceptances created: offered to the queues once the write commits.
    pub(super) fresh: Vec<Fresh>,
    events: i64,
    unrouted: i64,
    by_status: [i64; 5],
    dead_by_plugin: Vec<(String, i64)>,
    accepted: u64,
    done: u64,
    /// Deliveries that became due now (new, replayed or redelivered).
    made_due: u64,
}

impl Tally {
    /// An event was stored with `deliveries` pending deliveries.
    pub(super) fn event_stored(&mut self, deliveries: usize) {
        self.events += 1;
        self.accepted += 1;
        if deliveries == 0 {
            self.unrouted += 1;
        }
        self.by_status[slot(DeliveryStatus::Pending)] += i64::try_from(deliveries).unwrap_or(i64::MAX);
        self.made_due += deliveries as u64;
    }

    /// Events were removed, `unrouted` of them without deliveries.
    pub(super) fn events_removed(&mut self, events: u64, unrouted: u64) {
        self.events -= i64::try_from(events).unwrap_or(i64::MAX);
        self.unrouted -= i64::try_from(unrouted).unwrap_or(i64::MAX);
    }

    /// A stored event got its first delivery.
    pub(super) fn routed(&mut self) {
        self.unrouted -= 1;
    }

    /// A stored event lost its last delivery (its dead letters were purged).
    pub(super) fn unrouted(&mut self) {
        self.unrouted += 1;
    }

    /// A delivery of `plugin` went from `from` to `to`.
    pub(super) fn moved(&mut self, plugin: &str, from: DeliveryStatus, to: DeliveryStatus) {
        self.removed(plugin, from);
        self.added(plugin, to);
    }

    /// A delivery of `plugin` in status `status` appeared.
    pub(super) fn added(&mut self, plugin: &str, status: DeliveryStatus) {
        self.by_status[slot(status)] += 1;
        match status {
            DeliveryStatus::Pending => self.made_due += 1,
            DeliveryStatus::Done => self.done += 1,
            DeliveryStatus::Dead => self.dead_by_plugin.push((plugin.to_owned(), 1)),
            _ => {}
        }
    }

    /// A delivery of `plugin` in status `status` went away.
    pub(super) fn removed(&mut self, plugin: &str, status: DeliveryStatus) {
        self.by_status[slot(status)] -= 1;
        if status == DeliveryStatus::Dead {
            self.dead_by_plugin.push((plugin.to_owned(), -1));
        }
    }

    /// `n` done deliveries went away (handled events past the retention period).
    pub(super) fn done_removed(&mut self, n: u64) {
        self.by_status[slot(DeliveryStatus::Done)] -= i64::try_from(n).unwrap_or(i64::MAX);
    }

    /// Whether some delivery became due now, even if the write finished others (a finish
    /// that emits an event): a waiting take should look.
    pub(super) fn adds_work(&self) -> bool {
        self.made_due > 0
    }

    /// Whether some delivery became due now that no acceptance created (the operator's
    /// changes): no queue holds it.
    pub(super) fn made_due_on_disk(&self) -> bool {
        self.made_due > self.fresh.len() as u64
    }
}

/// Counts over the last 60 seconds, in a ring of one-second buckets.
#[derive(Debug, Clone)]
struct LastMinute {
    /// Per bucket: the second (since the epoch) it counts, and its count.
    buckets: [(u64, u64); 60],
}

impl Default for LastMinute {
    fn default() -> Self {
        LastMinute { buckets: [(0, 0); 60] }
    }
}

impl LastMinute {
    fn add(&mut self, now_ms: u64, n: u64) {
        if n == 0 {
            return;
        }
        let second = now_ms / 1000;
        let bucket = &mut self.buckets[(second % 60) as usize];
        if bucket.0 != second {
            *bucket = (second, 0);
        }
        bucket.1 += n;
    }

    fn total(&self, now_ms: u64) -> u64 {
        let second = now_ms / 1000;
        self.buckets.iter().filter(|(at, _)| *at <= second && second - at < 60).map(|(_, count)| count).sum()
    }
}

/// The journal's counts.
#[derive(Debug, Clone, Default)]
pub(super) struct Counts {
    events: u64,
    unrouted: u64,
    by_status: [u64; 5],
    dead_by_plugin: BTreeMap<String, u64>,
    accepted: LastMinute,
    done: LastMinute,
}

fn add(count: &mut u64, delta: i64) {
    *count = count.saturating_add_signed(delta);
}

impl Counts {
    /// Counts what the tables hold (at open; the last minute starts empty).
    pub(super) fn load(connection: &Connection) -> rusqlite::Result<Counts> {
        let count = |sql: &str| {
            connection.query_row(sql, [], |row| row.get::<_, i64>(0)).map(|n| u64::try_from(n).unwrap_or(0))
        };
        let mut counts = Counts {
            events: count("SELECT COUNT(*) FROM events")?,
            unrouted: count(
                "SELECT COUNT(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)",
            )?,
            ..Counts::default()
        };
        let mut by_status =
            connection.prepare("SELECT status, plugin, COUNT(*) FROM deliveries GROUP BY status, plugin")?;
        let rows = by_status.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0)))
        })?;
        for row in rows {
            let (status, plugin, n) = row?;
            let status = DeliveryStatus::parse(&status);
            counts.by_status[slot(status)] += n;
            if status == DeliveryStatus::Dead {
                counts.dead_by_plugin.insert(plugin, n);
            }
        }
        Ok(counts)
    }

    /// Adds a committed write's tally at `now_ms`.
    pub(super) fn apply(&mut self, tally: Tally, now_ms: u64) {
        add(&mut self.events, tally.events);
        add(&mut self.unrouted, tally.unrouted);
        for (count, delta) in self.by_status.iter_mut().zip(tally.by_status) {
            add(count, delta);
        }
        for (plugin, delta) in tally.dead_by_plugin {
            let count = self.dead_by_plugin.entry(plugin).or_default();
            add(count, delta);
            if *count == 0 {
                self.dead_by_plugin.retain(|_, count| *count > 0);
            }
        }
        self.accepted.add(now_ms, tally.accepted);
        self.done.add(now_ms, tally.done);
    }

    /// Unfinished deliveries: pending, running and retrying.
    pub(super) fn unfinished(&self) -> u64 {
        self.by_status[..3].iter().sum()
    }

    /// The counts as `/v1/stats` shows them at `now_ms`.
    pub(super) fn stats(&self, max_pending: u64, now_ms: u64) -> Stats {
        let of = |status| self.by_status[slot(status)];
        Stats {
            events: self.events,
            unrouted: self.unrouted,
            pending: of(DeliveryStatus::Pending),
            running: of(DeliveryStatus::Running),
            retrying: of(DeliveryStatus::Retrying),
            done: of(DeliveryStatus::Done),
            dead: of(DeliveryStatus::Dead),
            max_pending,
            accepted_last_minute: self.accepted.total(now_ms),
            done_last_minute: self.done.total(now_ms),
            dead_by_plugin: self.dead_by_plugin.clone(),
        }
    }

    /// The same counts without the last minute's, to compare with a fresh [`Counts::load`].
    #[cfg(test)]
    pub(super) fn stored(&self) -> Stats {
        Stats { accepted_last_minute: 0, done_last_minute: 0, ..self.stats(0, 0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_minute_forgets_what_is_older_than_sixty_seconds() {
        let mut minute = LastMinute::default();
        minute.add(1_000_000, 3);
        minute.add(1_000_500, 2);
        minute.add(1_030_000, 1);
        assert_eq!(minute.total(1_030_000), 6);
        assert_eq!(minute.total(1_059_999), 6);
        assert_eq!(minute.total(1_060_000), 1, "the first second is a minute old");
        minute.add(1_060_000, 4);
        assert_eq!(minute.total(1_060_000), 5, "its bucket was reused, not added to");
        assert_eq!(minute.total(1_200_000), 0);
    }

    #[test]
    fn a_tally_moves_deliveries_between_statuses_and_counts_dead_letters_per_plugin() {
        let mut counts = Counts::default();
        let mut tally = Tally::default();
        tally.event_stored(2);
        tally.event_stored(0);
        assert!(tally.adds_work());
        counts.apply(tally, 0);
        let mut tally = Tally::default();
        tally.moved("a", DeliveryStatus::Pending, DeliveryStatus::Running);
        tally.moved("a", DeliveryStatus::Running, DeliveryStatus::Dead);
        tally.moved("b", DeliveryStatus::Pending, DeliveryStatus::Done);
        assert!(!tally.adds_work());
        let mut finish_and_emit = Tally::default();
        finish_and_emit.moved("a", DeliveryStatus::Pending, DeliveryStatus::Done);
        finish_and_emit.event_stored(1);
        assert!(finish_and_emit.adds_work(), "the emitted event's delivery is due, though pending did not grow");
        counts.apply(tally, 0);
        let stats = counts.stats(10, 0);
        assert_eq!((stats.events, stats.unrouted, stats.pending, stats.done, stats.dead), (2, 1, 0, 1, 1));
        assert_eq!(stats.dead_by_plugin, BTreeMap::from([("a".to_owned(), 1)]));
        assert_eq!((stats.accepted_last_minute, stats.done_last_minute), (2, 1));
        let mut tally = Tally::default();
        tally.removed("a", DeliveryStatus::Dead);
        counts.apply(tally, 0);
        assert!(counts.stats(10, 0).dead_by_plugin.is_empty(), "a plugin with no dead letters is not listed");
        assert_eq!(counts.unfinished(), 0);
    }
}
