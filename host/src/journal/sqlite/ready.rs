//! The embedded journal's fresh deliveries, handed from acceptance to `take` in memory. A
//! delivery an acceptance creates waits, with its event, in its plugin's queue until a take
//! leases it: new work taken soon after it arrives neither waits for the writer thread nor
//! reads the file. The file stays the truth: a queued delivery is on disk as pending, and a
//! crash forgets the queues. Whatever no queue holds (deliveries from before the start,
//! retries, leases that ran out or were given back, the operator's replays, and deliveries
//! that found their queue full or stale) is found by a take that reads the file: for each
//! plugin at least every [`LOOK_EVERY_MS`], and whenever its queue is empty while the file
//! may hold some of its work. Until a look at the file finds no more of that work, the
//! plugin's new deliveries are left to the file too, and a look never leases a delivery
//! newer than the oldest one queued, so that a plugin's deliveries run in the order they
//! were accepted: under a backlog, takes work as if there were no queues.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::event::Event;
use crate::journal::Want;

/// Deliveries one plugin's queue holds; more wait on disk only.
pub(super) const QUEUE_CAPACITY: usize = 1024;
/// Event bytes all queues hold together (an event queued for two plugins counts twice);
/// more wait on disk only, so that large bodies do not pile up in memory.
pub(super) const QUEUED_BYTES: usize = 32 * 1024 * 1024;
/// How long a delivery may wait in a queue (its plugin gone or stuck) before it is left to
/// the file, so that the queue's memory is given back; an empty queue no take has looked at
/// for as long is dropped.
pub(super) const STALE_MS: u64 = 30_000;
/// How often a take reads the file for each plugin even while its queue has work: retries
/// and leases that ran out come due there.
pub(super) const LOOK_EVERY_MS: u64 = 100;

/// A delivery just created by an acceptance.
#[derive(Debug)]
pub(super) struct Fresh {
    /// The journal's key of the delivery.
    pub delivery: i64,
    /// The plugin it is for.
    pub plugin: String,
    /// The event to hand it.
    pub event: Arc<Event>,
}

/// A queued delivery.
#[derive(Debug)]
struct Waiting {
    delivery: i64,
    event: Arc<Event>,
    queued_ms: u64,
}

/// One plugin's queue.
#[derive(Debug)]
struct Queue {
    /// Deliveries in the order they were created.
    waiting: VecDeque<Waiting>,
    /// Some due delivery of the plugin may be on disk only: queue nothing more, and once the
    /// queue is empty take from the file, until a take from it comes up short.
    on_disk: bool,
    /// When a take last read the file for the plugin.
    looked_ms: u64,
}

impl Queue {
    /// A plugin not seen since the start may have work on disk, and is due a look.
    fn new() -> Queue {
        Queue { waiting: VecDeque::new(), on_disk: true, looked_ms: 0 }
    }
}

/// What a take that reads the file must leave alone: the deliveries queued, and in each
/// plugin's queue the oldest, newer than which the file's deliveries wait their turn.
#[derive(Debug, Default)]
pub(super) struct Queued {
    /// Every queued delivery of the plugins the take is for.
    pub deliveries: Vec<i64>,
    /// The oldest queued delivery of each of those plugins that has one.
    pub oldest: HashMap<String, i64>,
}

impl Queued {
    /// Whether a look may lease `delivery` of `plugin` now: it is older than everything
    /// queued for the plugin (a retry, a lease that ran out), or nothing is queued.
    pub(super) fn allows(&self, plugin: &str, delivery: i64) -> bool {
        self.oldest.get(plugin).is_none_or(|oldest| delivery < *oldest)
    }
}

/// The queues of fresh deliveries, by plugin.
#[derive(Debug, Default)]
pub(super) struct Ready {
    queues: HashMap<String, Queue>,
    /// The event bytes queued, against [`QUEUED_BYTES`].
    bytes: usize,
}

impl Ready {
    /// Queues a delivery just committed, unless older work of its plugin may be on disk or
    /// the queues are full: then it is left to the file.
    pub(super) fn offer(&mut self, fresh: Fresh, now_ms: u64) {
        let size = fresh.event.data.len();
        let full = self.bytes.saturating_add(size) > QUEUED_BYTES;
        let queue = self.queues.entry(fresh.plugin).or_insert_with(Queue::new);
        if queue.on_disk || full || queue.waiting.len() >= QUEUE_CAPACITY {
            queue.on_disk = true;
            return;
        }
        self.bytes += size;
        queue.waiting.push_back(Waiting { delivery: fresh.delivery, event: fresh.event, queued_ms: now_ms });
    }

    /// Some deliveries became due on disk only, of any plugin (the operator's changes).
    pub(super) fn all_on_disk(&mut self) {
        for queue in self.queues.values_mut() {
            queue.on_disk = true;
        }
    }

    /// A delivery of `plugin` became due on disk only (a lease given back).
    pub(super) fn on_disk(&mut self, plugin: &str) {
        if let Some(queue) = self.queues.get_mut(plugin) {
            queue.on_disk = true;
        }
    }

    /// Whether a take for `plugins` should read the file before the queues: it has not for
    /// one of them for a while.
    pub(super) fn look_due(&self, plugins: &[String], now_ms: u64) -> bool {
        plugins.iter().any(|plugin| {
            self.queues.get(plugin).is_none_or(|queue| now_ms >= queue.looked_ms.saturating_add(LOOK_EVERY_MS))
        })
    }

    /// Whether `plugin`'s queue is empty while the file may hold due work of it.
    pub(super) fn ran_dry(&self, plugin: &str) -> bool {
        self.queues.get(plugin).is_none_or(|queue| queue.on_disk && queue.waiting.is_empty())
    }

    /// Before a take reads the file for `plugins`: leaves deliveries queued for longer than
    /// [`STALE_MS`] to the file, drops queues nobody looked at for as long, and says what the
    /// take must leave alone.
    pub(super) fn before_look(&mut self, plugins: &[String], now_ms: u64) -> Queued {
        let stale = |since: u64| since.saturating_add(STALE_MS) <= now_ms;
        for queue in self.queues.values_mut() {
            while queue.waiting.front().is_some_and(|waiting| stale(waiting.queued_ms)) {
                if let Some(waiting) = queue.waiting.pop_front() {
                    self.bytes -= waiting.event.data.len();
                }
                queue.on_disk = true;
            }
        }
        self.queues.retain(|_, queue| !queue.waiting.is_empty() || !stale(queue.looked_ms));
        let mut queued = Queued::default();
        for plugin in plugins {
            let Some(queue) = self.queues.get(plugin) else { continue };
            if let Some(oldest) = queue.waiting.front() {
                queued.oldest.insert(plugin.clone(), oldest.delivery);
            }
            queued.deliveries.extend(queue.waiting.iter().map(|waiting| waiting.delivery));
        }
        queued
    }

    /// After a take read the file for `plugins`: when it found fewer than it could take, no
    /// due delivery of theirs is on disk only any more, except of the plugins `held_back`
    /// (some of whose deliveries it left for after their queue).
    pub(super) fn looked(&mut self, plugins: &[String], came_up_short: bool, held_back: &[&str], now_ms: u64) {
        for plugin in plugins {
            let queue = self.queues.entry(plugin.clone()).or_insert_with(Queue::new);
            queue.looked_ms = now_ms;
            if came_up_short && !held_back.contains(&plugin.as_str()) {
                queue.on_disk = false;
            }
        }
    }

    /// Up to `max` queued deliveries, oldest first, at most `want.free` of each wanted
    /// plugin (less the `taken` it already got).
    pub(super) fn take(&mut self, wants: &[&Want], taken: &HashMap<&str, usize>, max: usize) -> Vec<Fresh> {
        let mut budget: Vec<(&str, usize)> = wants
            .iter()
            .map(|want| {
                (want.plugin.as_str(), want.free.saturating_sub(taken.get(want.plugin.as_str()).copied().unwrap_or(0)))
            })
            .collect();
        let mut out = Vec::new();
        while out.len() < max {
            let oldest = budget
                .iter_mut()
                .filter(|(_, free)| *free > 0)
                .filter_map(|entry| {
                    let front = self.queues.get(entry.0)?.waiting.front()?.delivery;
                    Some((front, entry))
                })
                .min_by_key(|(front, _)| *front);
            let Some((_, (plugin, free))) = oldest else { break };
            *free -= 1;
            let Some(Waiting { delivery, event, .. }) =
                self.queues.get_mut(*plugin).and_then(|queue| queue.waiting.pop_front())
            else {
                break;
            };
            self.bytes -= event.data.len();
            out.push(Fresh { delivery, plugin: (*plugin).to_owned(), event });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fresh(delivery: i64, plugin: &str) -> Fresh {
        sized(delivery, plugin, 0)
    }

    fn sized(delivery: i64, plugin: &str, size: usize) -> Fresh {
        let event = Event {
            source: "s".into(),
            id: delivery.to_string(),
            event_type: "t".into(),
            time_ms: 0,
            content_type: "application/json".into(),
            data: bytes::Bytes::from(vec![0; size]),
            attributes: Vec::new(),
        };
        Fresh { delivery, plugin: plugin.into(), event: Arc::new(event) }
    }

    fn want(plugin: &str, free: usize) -> Want {
        Want { plugin: plugin.into(), free, subscriptions: Arc::from([]), lease: Duration::from_secs(1), since_ms: 0 }
    }

    fn names(plugins: &[&str]) -> Vec<String> {
        plugins.iter().map(|plugin| (*plugin).to_owned()).collect()
    }

    fn taken(fresh: &[Fresh]) -> Vec<(i64, &str)> {
        fresh.iter().map(|fresh| (fresh.delivery, fresh.plugin.as_str())).collect()
    }

    #[test]
    fn the_file_is_read_for_a_dry_queue_until_a_look_at_it_comes_up_short() {
        let mut ready = Ready::default();
        let a = want("a", 9);
        assert!(ready.ran_dry("a"), "after the start the file may hold work of any plugin");
        ready.offer(fresh(1, "a"), 0);
        assert!(ready.take(&[&a], &HashMap::new(), 9).is_empty(), "so new work waits behind it, on disk");
        ready.looked(&names(&["a"]), false, &[], 50);
        assert!(ready.ran_dry("a"), "the look took all it could: there may be more");
        let a_only = names(&["a"]);
        assert!(!ready.look_due(&a_only, 149) && ready.look_due(&a_only, 150), "and again every {LOOK_EVERY_MS} ms");
        ready.looked(&names(&["a"]), true, &[], 60);
        assert!(!ready.ran_dry("a"), "the file holds nothing more that is due");
        ready.offer(fresh(2, "a"), 60);
        ready.offer(fresh(3, "a"), 60);
        assert_eq!(taken(&ready.take(&[&a], &HashMap::new(), 1)), [(2, "a")]);
        ready.on_disk("a");
        assert!(!ready.ran_dry("a"), "queued work first");
        ready.offer(fresh(4, "a"), 60);
        assert_eq!(taken(&ready.take(&[&a], &HashMap::new(), 9)), [(3, "a")], "4 waits behind the lease given back");
        assert!(ready.ran_dry("a"));
        ready.looked(&names(&["a"]), true, &[], 70);
        ready.all_on_disk();
        assert!(ready.ran_dry("a"), "so do the operator's replays");
    }

    #[test]
    fn takes_are_oldest_first_within_each_plugins_free_calls() {
        let mut ready = Ready::default();
        ready.looked(&names(&["a", "b"]), true, &[], 0);
        for (delivery, plugin) in [(1, "a"), (2, "b"), (3, "a"), (4, "a"), (5, "b")] {
            ready.offer(fresh(delivery, plugin), 0);
        }
        let (a, b) = (want("a", 2), want("b", 5));
        let got = ready.take(&[&a, &b], &HashMap::new(), 10);
        assert_eq!(taken(&got), [(1, "a"), (2, "b"), (3, "a"), (5, "b")], "a has two free calls");
        let got = ready.take(&[&a, &b], &HashMap::from([("a", 1)]), 10);
        assert_eq!(taken(&got), [(4, "a")], "one of a's free calls went to a delivery from the file");
        assert!(ready.take(&[&a, &b], &HashMap::new(), 10).is_empty());
        ready.offer(fresh(6, "a"), 0);
        ready.offer(fresh(7, "a"), 0);
        assert_eq!(taken(&ready.take(&[&a], &HashMap::new(), 1)), [(6, "a")], "no more than asked");
    }

    #[test]
    fn a_full_or_stale_queue_leaves_its_deliveries_to_the_file() {
        let mut ready = Ready::default();
        ready.looked(&names(&["a", "b"]), true, &[], 0);
        for delivery in 0..QUEUE_CAPACITY as i64 {
            ready.offer(fresh(delivery, "a"), 0);
        }
        assert!(!ready.ran_dry("a"));
        ready.offer(fresh(-1, "a"), 0);
        let everything = ready.take(&[&want("a", usize::MAX)], &HashMap::new(), usize::MAX);
        assert_eq!(everything.len(), QUEUE_CAPACITY, "the one that found the queue full is on disk only");
        assert!(ready.ran_dry("a"));

        ready.looked(&names(&["a"]), true, &[], 0);
        ready.offer(fresh(1, "a"), 0);
        ready.offer(fresh(2, "b"), STALE_MS);
        assert_eq!(
            ready.before_look(&names(&["a", "b"]), STALE_MS).deliveries,
            [2],
            "queued deliveries are skipped by the look"
        );
        assert!(ready.ran_dry("a"), "a's waited too long: left to the file");
        assert!(!ready.ran_dry("b"));
        assert!(ready.take(&[&want("a", 9)], &HashMap::new(), 9).is_empty());
    }

    #[test]
    fn each_plugin_is_looked_for_on_disk_every_period_however_often_another_is() {
        let mut ready = Ready::default();
        ready.looked(&names(&["a", "b"]), true, &[], 0);
        for now in (10..=200).step_by(10) {
            // b has a backlog on disk: every take reads the file for it alone.
            ready.looked(&names(&["b"]), false, &[], now);
            let due = ready.look_due(&names(&["a", "b"]), now);
            assert_eq!(due, now >= LOOK_EVERY_MS, "at {now} ms: a was last looked for at 0");
        }
    }

    #[test]
    fn a_look_leaves_newer_deliveries_than_the_queued_ones_for_after_them() {
        let mut ready = Ready::default();
        ready.looked(&names(&["a"]), true, &[], 0);
        for delivery in 10..10 + QUEUE_CAPACITY as i64 {
            ready.offer(fresh(delivery, "a"), 0);
        }
        let overflow = 10 + QUEUE_CAPACITY as i64;
        ready.offer(fresh(overflow, "a"), 0);
        let queued = ready.before_look(&names(&["a", "b"]), 1);
        assert_eq!(queued.deliveries.len(), QUEUE_CAPACITY);
        assert!(!queued.allows("a", overflow), "accepted after everything queued: it waits its turn");
        assert!(queued.allows("a", 3), "a retry of an older delivery runs now");
        assert!(queued.allows("b", overflow), "b has no queue");
        ready.looked(&names(&["a"]), true, &["a"], 1);
        assert_eq!(ready.take(&[&want("a", usize::MAX)], &HashMap::new(), usize::MAX).len(), QUEUE_CAPACITY);
        assert!(ready.ran_dry("a"), "the one held back is still on disk only");
    }

    #[test]
    fn the_queues_hold_a_bounded_number_of_bytes() {
        let mut ready = Ready::default();
        ready.looked(&names(&["a", "b"]), true, &[], 0);
        ready.offer(sized(1, "a", QUEUED_BYTES / 2), 0);
        ready.offer(sized(2, "b", QUEUED_BYTES / 2), 0);
        ready.offer(sized(3, "b", 1), 0);
        assert!(!ready.ran_dry("b"));
        assert_eq!(taken(&ready.take(&[&want("b", 9)], &HashMap::new(), 9)), [(2, "b")]);
        assert!(ready.ran_dry("b"), "3 found the queues full and waits on disk");
        ready.looked(&names(&["b"]), true, &[], 0);
        ready.offer(sized(4, "b", QUEUED_BYTES / 2), 0);
        assert_eq!(taken(&ready.take(&[&want("b", 9)], &HashMap::new(), 9)), [(4, "b")], "taking gives the bytes back");
    }
}
