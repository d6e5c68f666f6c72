//! The embedded journal's syncer: a thread that makes committed writes durable with an
//! `fdatasync` of the write-ahead log, and only then answers the callers promised the disk.
//! The writer commits every group without waiting for the disk (`synchronous = NORMAL`) and
//! hands the durable ones here, so that it goes on committing (outcomes, the next group)
//! while the disk works. Each sync covers every commit handed over before it started: while
//! one runs, the next groups gather for the one after it.
//!
//! A sync that fails is final: Linux may drop the pages it could not write and report that
//! only once, so a later sync that succeeds proves nothing about them. Every write handed over
//! after it is answered with the same error (ingest answers 500) until the host restarts and
//! SQLite recovers from what really is on disk; [`Syncer::failed`] tells the writer, which
//! then refuses such writes before committing them.
//!
//! Why this is as durable as SQLite's `synchronous = FULL` in WAL mode: a commit is its frames
//! in the WAL file, written before the commit returns; syncing that file puts them, and every
//! frame before them, on disk. The WAL's header is synced by SQLite itself when the log is
//! reused, and a checkpoint syncs the log before copying it and the database after.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::lock;

/// Groups handed over and not yet synced before the writer waits for the syncer.
const DEPTH: usize = 1024;
/// Longest [`Syncer::wait_until_synced`] waits (a disk that hangs, a syncer that died):
/// the writer then commits what it holds anyway.
const LONGEST_WAIT: Duration = Duration::from_millis(100);

/// Syncs the WAL for the groups handed to it; each group's items are answered after.
pub(super) struct Syncer<T: Send + 'static> {
    groups: Option<SyncSender<Vec<T>>>,
    /// Groups handed over whose sync has not ended yet.
    unsynced: Arc<(Mutex<usize>, Condvar)>,
    /// Set once a sync has failed; final until the host restarts.
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Syncer<T> {
    /// Starts the thread that syncs `wal` and then calls `answer` with each item handed over
    /// and whether its commit is on disk (the error of the sync otherwise).
    pub(super) fn start(
        wal: File,
        answer: impl Fn(T, Result<(), &std::io::Error>) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (groups, queue) = sync_channel(DEPTH);
        let unsynced = Arc::new((Mutex::new(0), Condvar::new()));
        let failed = Arc::new(AtomicBool::new(false));
        let thread = {
            let (unsynced, failed) = (Arc::clone(&unsynced), Arc::clone(&failed));
            std::thread::Builder::new()
                .name("journal-sync".into())
                .spawn(move || sync_loop(&wal, &queue, &unsynced, &failed, &answer))?
        };
        Ok(Syncer { groups: Some(groups), unsynced, failed, thread: Some(thread) })
    }

    /// Whether a sync of the log has failed: nothing handed over since, or from now on, is
    /// answered as on disk.
    pub(super) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Answers `items`, all committed, once a sync that started after now has ended.
    pub(super) fn after_sync(&self, items: Vec<T>) {
        let Some(groups) = self.groups.as_ref().filter(|_| !items.is_empty()) else { return };
        *lock(&self.unsynced.0) += 1;
        // Blocks while DEPTH groups wait for the disk, and so the writer and ingest with it
        // (backpressure). Fails only if the thread panicked: the callers hear the journal closed.
        if groups.send(items).is_err() {
            *lock(&self.unsynced.0) -= 1;
        }
    }

    /// Waits until every group handed over is synced and answered; false when that took
    /// longer than [`LONGEST_WAIT`] or the syncer is gone. The writer waits here with writes
    /// nobody needs on disk at once (outcomes), so that they share the next group's commit
    /// rather than each commit alone.
    pub(super) fn wait_until_synced(&self) -> bool {
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            return false;
        }
        let (unsynced, synced) = &*self.unsynced;
        let (_unsynced, waited) = synced
            .wait_timeout_while(lock(unsynced), LONGEST_WAIT, |groups| *groups > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !waited.timed_out()
    }
}

impl<T: Send + 'static> Drop for Syncer<T> {
    /// Syncs and answers everything handed over, then ends the thread.
    fn drop(&mut self) {
        drop(self.groups.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sync_loop<T>(
    wal: &File,
    queue: &Receiver<Vec<T>>,
    unsynced: &(Mutex<usize>, Condvar),
    failed: &AtomicBool,
    answer: &impl Fn(T, Result<(), &std::io::Error>),
) {
    let mut error: Option<std::io::Error> = None;
    while let Ok(mut items) = queue.recv() {
        let mut groups = 1;
        while let Ok(more) = queue.try_recv() {
            items.extend(more);
            groups += 1;
        }
        if error.is_none() {
            let started = Instant::now();
            let synced = wal.sync_data();
            crate::metrics::journal_sync(started.elapsed());
            if let Err(err) = synced {
                tracing::error!(
                    error = %err, writes = items.len(),
                    "cannot sync the journal to disk; no event is accepted until the host restarts"
                );
                error = Some(err);
                failed.store(true, Ordering::Release);
            }
        }
        for item in items {
            answer(item, error.as_ref().map_or(Ok(()), Err));
        }
        *lock(&unsynced.0) -= groups;
        unsynced.1.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Each item answered, and whether it was synced.
    type Seen = Arc<Mutex<Vec<(u32, bool)>>>;

    /// A syncer of `file`, and what it answers.
    fn syncing(file: File) -> (Seen, Syncer<u32>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let answer = move |item, synced: Result<(), &std::io::Error>| {
            record.lock().expect("lock").push((item, synced.is_ok()));
        };
        (seen, Syncer::start(file, answer).expect("start"))
    }

    /// A syncer of a new file in `dir`, and what it answers.
    fn syncing_a_file(dir: &tempfile::TempDir) -> (Seen, Syncer<u32>) {
        syncing(File::create(dir.path().join("wal")).expect("file"))
    }

    #[test]
    fn every_item_is_answered_in_order_after_a_sync_of_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (seen, syncer) = syncing_a_file(&dir);
        for group in [vec![1, 2], vec![3], vec![4, 5, 6]] {
            syncer.after_sync(group);
        }
        assert!(!syncer.failed());
        drop(syncer);
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen, [(1, true), (2, true), (3, true), (4, true), (5, true), (6, true)]);
    }

    #[test]
    fn waiting_until_synced_returns_after_every_group_handed_over_is_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (seen, syncer) = syncing_a_file(&dir);
        assert!(syncer.wait_until_synced(), "nothing handed over: nothing to wait for");
        for item in 1..=50 {
            syncer.after_sync(vec![item]);
        }
        // Each wait ends within 100 ms; a slow, shared disk may need many.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut synced = syncer.wait_until_synced();
        while !synced && Instant::now() < deadline {
            synced = syncer.wait_until_synced();
        }
        assert!(synced, "the count of groups in flight came back to zero");
        assert_eq!(seen.lock().expect("lock").len(), 50, "every group was synced and answered");
    }

    #[test]
    fn a_sync_that_fails_answers_its_items_and_all_later_ones_with_the_error() {
        // A pipe cannot be synced: fdatasync fails with EINVAL.
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let not_a_file = File::from(std::os::fd::OwnedFd::from(reader));
        let (seen, syncer) = syncing(not_a_file);
        syncer.after_sync(vec![7]);
        while seen.lock().expect("lock").is_empty() {
            std::thread::yield_now();
        }
        assert!(syncer.failed(), "the writer can see the failure");
        syncer.after_sync(vec![8]);
        drop(syncer);
        assert_eq!(*seen.lock().expect("lock"), [(7, false), (8, false)], "and every write after it fails too");
    }
}
