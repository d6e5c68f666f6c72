//! The embedded journal's leases, held in memory rather than written: one host owns the
//! journal file, so taking a delivery only reads it, and its outcome is its one write. A
//! crash forgets every lease, and their deliveries, never marked as running on disk, are due
//! at the next start. The attempt a crash cut short is not counted.

use std::collections::HashMap;

use crate::journal::{DeliveryRecord, DeliveryStatus, Stats};

/// One delivery leased to a worker.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// The plugin it is for.
    pub plugin: String,
    /// The attempt the lease runs.
    pub attempt: u32,
    /// The attempts on disk when it was taken.
    pub recorded: u32,
    /// When the lease runs out, on the clock that never jumps ([`crate::clock::Clock::elapsed_ms`]):
    /// another take may lease the delivery again after that.
    pub until_ms: u64,
    /// Its status on disk (pending or retrying), unchanged while it is leased.
    pub stored: DeliveryStatus,
}

impl Held {
    /// Given back: kept only to count the attempts of earlier leases that ran out.
    fn is_free(&self) -> bool {
        self.until_ms == 0
    }
}

/// The leases the writer has handed out, by delivery.
#[derive(Debug, Default)]
pub(super) struct Leases {
    held: HashMap<i64, Held>,
}

impl Leases {
    /// The deliveries whose lease still runs at `now_ms`: no take may lease them.
    pub(super) fn running(&self, now_ms: u64) -> Vec<i64> {
        self.held.iter().filter(|(_, held)| held.until_ms > now_ms).map(|(delivery, _)| *delivery).collect()
    }

    /// Leases `delivery`, which has `recorded` attempts on disk, until `until_ms`; returns the
    /// attempt the lease runs. A lease that ran out counts as an attempt.
    pub(super) fn hold(
        &mut self,
        delivery: i64,
        plugin: String,
        recorded: u32,
        stored: DeliveryStatus,
        until_ms: u64,
    ) -> u32 {
        let previous = self.held.get(&delivery).map_or(recorded, |held| held.attempt.max(recorded));
        let attempt = previous + 1;
        self.held.insert(delivery, Held { plugin, attempt, recorded, until_ms, stored });
        attempt
    }

    /// The lease of `delivery` if `attempt` is the one it runs (a lease that ran out and was
    /// taken again is not, nor one given back).
    pub(super) fn current(&self, delivery: i64, attempt: u32) -> Option<&Held> {
        self.held.get(&delivery).filter(|held| held.attempt == attempt && !held.is_free())
    }

    /// Forgets the lease of `delivery` once its outcome is on disk.
    pub(super) fn forget(&mut self, delivery: i64, attempt: u32) {
        if self.current(delivery, attempt).is_some() {
            self.held.remove(&delivery);
        }
    }

    /// Gives back an unused lease: the delivery is free to take at once and its attempt is
    /// not counted (attempts of earlier leases that ran out still are). Returns whether
    /// `attempt` was the current lease.
    pub(super) fn release(&mut self, delivery: i64, attempt: u32) -> bool {
        if self.current(delivery, attempt).is_none() {
            return false;
        }
        let Some(held) = self.held.get_mut(&delivery) else { return false };
        if attempt - 1 > held.recorded {
            (held.attempt, held.until_ms) = (attempt - 1, 0);
        } else {
            self.held.remove(&delivery);
        }
        true
    }

    /// Counts deliveries whose lease runs at `now_ms` as running rather than as their status
    /// on disk. One whose lease ran out (its outcome never stored, and its plugin perhaps
    /// removed since) is back to that status until a take leases it again.
    pub(super) fn overlay_stats(&self, stats: &mut Stats, now_ms: u64) {
        for held in self.held.values().filter(|held| held.until_ms > now_ms) {
            stats.running += 1;
            match held.stored {
                DeliveryStatus::Retrying => stats.retrying = stats.retrying.saturating_sub(1),
                _ => stats.pending = stats.pending.saturating_sub(1),
            }
        }
    }

    /// Counts the attempts leases started, and shows a delivery whose lease runs at `now` as
    /// running, with the lease's end on the wall clock as it reads `now`.
    pub(super) fn overlay_delivery(&self, delivery: &mut DeliveryRecord, now: super::Now) {
        let Some(held) = self.held.get(&delivery.delivery) else { return };
        delivery.attempts = delivery.attempts.max(held.attempt);
        if held.until_ms > now.elapsed_ms {
            delivery.status = DeliveryStatus::Running;
            delivery.next_attempt_ms = Some(held.until_ms.saturating_add(now.wall_ms).saturating_sub(now.elapsed_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_that_ran_out_counts_as_an_attempt_and_its_late_outcome_is_refused() {
        let mut leases = Leases::default();
        assert_eq!(leases.hold(7, "a".into(), 0, DeliveryStatus::Pending, 100), 1);
        assert_eq!(leases.running(99), [7]);
        assert!(leases.running(100).is_empty(), "ran out");
        assert_eq!(leases.hold(7, "a".into(), 0, DeliveryStatus::Pending, 200), 2);
        assert!(leases.current(7, 1).is_none(), "the first lease is stale");
        leases.forget(7, 1);
        assert!(leases.current(7, 2).is_some(), "a stale outcome leaves the new lease alone");
        leases.forget(7, 2);
        assert!(leases.current(7, 2).is_none());
    }

    #[test]
    fn a_released_lease_gives_its_attempt_back_but_keeps_those_that_ran_out() {
        let mut leases = Leases::default();
        leases.hold(1, "a".into(), 2, DeliveryStatus::Retrying, 100);
        assert!(leases.release(1, 3));
        assert!(leases.running(0).is_empty());
        assert_eq!(leases.hold(1, "a".into(), 2, DeliveryStatus::Retrying, 100), 3, "the same attempt again");

        leases.hold(1, "a".into(), 2, DeliveryStatus::Retrying, 300);
        assert!(!leases.release(1, 3), "not the current lease");
        assert!(leases.release(1, 4));
        assert!(leases.running(0).is_empty(), "free to take");
        assert!(leases.current(1, 3).is_none(), "the lease that ran out is not current again");
        assert_eq!(leases.hold(1, "a".into(), 2, DeliveryStatus::Retrying, 400), 4, "the attempt that ran out counts");
    }

    #[test]
    fn leased_deliveries_show_as_running() {
        let mut leases = Leases::default();
        leases.hold(1, "a".into(), 0, DeliveryStatus::Pending, 100);
        leases.hold(2, "a".into(), 1, DeliveryStatus::Retrying, 100);
        let mut stats = Stats { pending: 3, retrying: 1, ..Stats::default() };
        leases.overlay_stats(&mut stats, 99);
        assert_eq!((stats.pending, stats.retrying, stats.running), (2, 0, 2));
    }

    #[test]
    fn a_lease_that_ran_out_no_longer_shows_as_running() {
        let mut leases = Leases::default();
        leases.hold(1, "gone".into(), 0, DeliveryStatus::Pending, 100);
        let mut stats = Stats { pending: 1, ..Stats::default() };
        leases.overlay_stats(&mut stats, 100);
        assert_eq!((stats.pending, stats.running), (1, 0));

        let mut record = DeliveryRecord {
            delivery: 1,
            plugin: "gone".into(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_ms: None,
            errors: Vec::new(),
            sha256: None,
        };
        leases.overlay_delivery(&mut record, super::super::Now { wall_ms: 5_000, elapsed_ms: 100 });
        assert_eq!((record.status, record.attempts), (DeliveryStatus::Pending, 1), "the attempt that ran out counts");
        leases.overlay_delivery(&mut record, super::super::Now { wall_ms: 5_000, elapsed_ms: 99 });
        assert_eq!((record.status, record.next_attempt_ms), (DeliveryStatus::Running, Some(5_001)));
    }
}
