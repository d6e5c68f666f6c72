//! The embedded journal's checkpointer: a thread with its own connection that copies
//! committed pages from the write-ahead log into the database file, so that the writer does
//! not stop for it.
//!
//! A checkpoint copies the log's pages into the database file and syncs it. Those pages are
//! scattered (every event's key lands on a random leaf of its index), and syncing scattered pages is slow:
//! after 600 of them one fsync took 34 ms on the development machine, after 600 appended
//! ones 12 ms (`tests/load/sync-cost.py`). SQLite runs its automatic checkpoint (every 1 000
//! pages) on the committing connection, so each one stalled the writer, and every
//! acknowledgement queued behind it, for 10 – 25 ms. Here passes run beside the writer, a
//! moment after a commit ([`GATHER_BUSY`], or [`GATHER_QUIET`] when the last pass found little
//! to copy). SQLite syncs the database only after a pass that reached the end of the log,
//! which a pass under load never does (the writer commits meanwhile), so the checkpointer
//! syncs the file itself after each pass that copied something.
//!
//! SQLite starts the log over from its beginning only when a transaction starts with every
//! frame copied, which steady load never allows. So once the log holds [`RESTART_AT`] frames,
//! the checkpointer runs one more pass at once (it copies what was committed during the last),
//! then stops and tells the writer, which copies the rest itself between two commits
//! ([`Checkpointer::restart_if_due`]): its next transaction starts the log over. SQLite's own
//! checkpoint stays on the writer at [`WRITER_CHECKPOINT_AT`] frames, in case the checkpointer
//! cannot run (it skips a commit's checkpoint while a pass holds the lock, and a long read
//! keeps any checkpoint from finishing, so that is no hard bound on the log).
//!
//! A failed sync of the database file is final, as for the log (see [`super::sync`]): Linux
//! may drop the pages it could not write, and SQLite counts them as copied. The checkpointer
//! stops and says so ([`Checkpointer::failed`]): the writer then turns SQLite's own checkpoint
//! off and refuses every write promised the disk, so that the log, which still holds those
//! frames, is never started over, and a restart copies it again from its start.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// A log this long is started over (16 MiB of pages): each start over stops the writer for
/// one copy of what the last pass left, so not too often.
const RESTART_AT: u64 = 4_000;
/// The log length at which SQLite checkpoints on the writer anyway (64 MiB of pages).
pub(super) const WRITER_CHECKPOINT_AT: u32 = 16_000;
/// How long commits gather before a pass, after one that copied [`BUSY_PASS`] frames or more:
/// a page committed several times meanwhile (an index leaf, the event table's last leaf) is
/// copied once, and the database file synced once (100 ms rather than 20 took the
/// checkpointer from 8 – 9 to 5 – 6 µs of CPU per event under load, docs/BENCHMARKS-HISTORY.md).
const GATHER_BUSY: Duration = Duration::from_millis(100);
/// How long they gather after a pass that copied fewer: a quiet host pays a few passes a
/// second, not one per commit.
const GATHER_QUIET: Duration = Duration::from_millis(250);
/// Frames a pass must copy for the next to come after [`GATHER_BUSY`]: a handful of commits.
const BUSY_PASS: u64 = 32;

/// The thread that checkpoints the journal while the writer goes on committing.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    /// The writer committed since the last pass began.
    wrote: AtomicBool,
    /// The log is long and nearly all copied: the writer's turn to copy the rest.
    restart_due: AtomicBool,
    /// A sync of the database file failed: nothing may start the log over.
    failed: AtomicBool,
    stop: AtomicBool,
}

/// What a pass found: frames in the log when it began, and how many of them are copied.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Pass {
    log: u64,
    copied: u64,
}

impl Pass {
    /// Frames this pass copied, given the one before it (the log may have started over).
    fn copied_since(self, before: Pass) -> u64 {
        if self.log < before.log { self.copied } else { self.copied.saturating_sub(before.copied) }
    }
}

impl Checkpointer {
    /// Starts the thread that checkpoints through `connection`, a connection of its own to
    /// the journal's file, and syncs `database`, that file opened for reading. The caller
    /// keeps `database` open until its SQLite connections are closed: closing any descriptor
    /// of a file drops every POSIX lock the process holds on it, SQLite's included.
    pub(super) fn start(connection: Connection, database: Arc<File>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || checkpoint_loop(&connection, &database, &shared))?
        };
        Ok(Checkpointer { shared, thread: Some(thread) })
    }

    /// Tells the checkpointer that the writer committed changes; cheap enough for each commit.
    pub(super) fn wrote(&self) {
        if !self.shared.wrote.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Called by the writer between commits, on its own connection: when the log is long and
    /// the checkpointer has copied nearly all of it, copies the rest (and SQLite syncs the
    /// database, as the pass reaches the end of the log), so that the next transaction
    /// starts the log over. Returns the pass when one ran.
    pub(super) fn restart_if_due(&self, writer: &Connection) -> Option<Pass> {
        if !self.shared.restart_due.load(Ordering::Acquire) || self.failed() {
            return None;
        }
        let started = Instant::now();
        let pass = match checkpoint(writer) {
            Ok(Some(pass)) => {
                crate::metrics::journal_checkpoint("writer", started.elapsed());
                Some(pass)
            }
            Ok(None) => None,
            // Left in the log: the checkpointer's next passes or SQLite's own copy it.
            Err(err) => {
                tracing::warn!(error = %err, "cannot checkpoint the journal; it is retried");
                None
            }
        };
        self.shared.restart_due.store(false, Ordering::Release);
        // Commits that came while the flag was up found the checkpointer parked.
        self.shared.wrote.store(true, Ordering::Release);
        self.wake();
        pass
    }

    /// Whether a sync of the database file failed; final until the host restarts.
    pub(super) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    fn wake(&self) {
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }
}

impl Drop for Checkpointer {
    /// Ends the thread; what it has not copied is copied when the last connection closes.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn checkpoint_loop(connection: &Connection, database: &File, shared: &Shared) {
    let stopped = || shared.stop.load(Ordering::Acquire);
    let mut last = Pass::default();
    let mut gather = GATHER_QUIET;
    let mut failing = false;
    while !stopped() {
        if shared.restart_due.load(Ordering::Acquire) || !shared.wrote.load(Ordering::Acquire) {
            std::thread::park();
            continue;
        }
        // Parked rather than asleep, so that a stop does not wait; other wake-ups end a park
        // early, hence the loop.
        let until = Instant::now() + gather;
        while let Some(left) = until.checked_duration_since(Instant::now())
            && !stopped()
        {
            std::thread::park_timeout(left);
        }
        if stopped() {
            return;
        }
        shared.wrote.store(false, Ordering::Release);
        let before = last;
        let result = pass(connection, database, &mut last).and_then(|first| match first {
            // The catch-up pass: what is left after it is the writer's to copy, if it found
            // more to copy (a reader that holds the log back leaves nothing to gain).
            Some(first) if first.log >= RESTART_AT => {
                let second = pass(connection, database, &mut last)?;
                if second.is_some_and(|second| second.copied > first.copied) {
                    shared.restart_due.store(true, Ordering::Release);
                }
                Ok(second.or(Some(first)))
            }
            other => Ok(other),
        });
        match result {
            Ok(latest) => {
                let copied = latest.map_or(0, |latest| latest.copied_since(before));
                gather = if copied >= BUSY_PASS { GATHER_BUSY } else { GATHER_QUIET };
                failing = false;
            }
            Err(Failure::Checkpoint(err)) => {
                // The pages stay in the log for the next pass. Said once per run of failures.
                if !failing {
                    tracing::warn!(error = %err, "cannot checkpoint the journal; it is retried");
                }
                failing = true;
                gather = GATHER_QUIET;
            }
            Err(Failure::Sync(err)) => {
                shared.failed.store(true, Ordering::Release);
                tracing::error!(
                    error = %err,
                    "cannot sync the journal's database file; no event is accepted until the host restarts and copies the log again"
                );
                return;
            }
        }
    }
}

enum Failure {
    Checkpoint(rusqlite::Error),
    Sync(std::io::Error),
}

/// One pass of the checkpointer: copies what it can and, if that was anything, syncs the
/// database file; `None` when another checkpoint held the lock (SQLite's own, on the writer).
/// `last` is the pass before, and becomes this one.
fn pass(connection: &Connection, database: &File, last: &mut Pass) -> Result<Option<Pass>, Failure> {
    let started = Instant::now();
    let Some(pass) = checkpoint(connection).map_err(Failure::Checkpoint)? else { return Ok(None) };
    if pass.copied_since(*last) > 0 {
        database.sync_data().map_err(Failure::Sync)?;
        crate::metrics::journal_checkpoint("checkpointer", started.elapsed());
    }
    *last = pass;
    Ok(Some(pass))
}

/// Copies what it can of the log into the database without waiting for any other
/// connection (SQLite syncs the database only if that reached the end of the log); `None`
/// when another checkpoint held the lock.
fn checkpoint(connection: &Connection) -> rusqlite::Result<Option<Pass>> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        // (busy, frames in the log, frames copied); busy = 1 with -1s when locked out.
        let busy: i64 = row.get(0)?;
        let count = |column: usize| row.get::<_, i64>(column).map(|n| u64::try_from(n).unwrap_or(0));
        Ok((busy == 0).then_some(Pass { log: count(1)?, copied: count(2)? }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "journal.sqlite3";

    /// A connection to a new WAL file in `dir` that never checkpoints by itself, with a table.
    fn writer(dir: &std::path::Path) -> Connection {
        let writer = Connection::open(dir.join(FILE)).expect("open");
        writer.pragma_update(None, "journal_mode", "WAL").expect("wal");
        writer.pragma_update(None, "synchronous", "OFF").expect("synchronous");
        writer.pragma_update(None, "wal_autocheckpoint", 0).expect("no automatic checkpoint");
        writer.execute("CREATE TABLE rows (n INTEGER PRIMARY KEY, data BLOB)", []).expect("table");
        writer
    }

    fn start(dir: &std::path::Path) -> Checkpointer {
        let connection = Connection::open(dir.join(FILE)).expect("open");
        Checkpointer::start(connection, Arc::new(File::open(dir.join(FILE)).expect("open the file"))).expect("start")
    }

    /// Adds a row of about one page.
    fn insert(writer: &Connection, n: i64) {
        writer.execute("INSERT INTO rows (n, data) VALUES (?1, zeroblob(3000))", [n]).expect("insert");
    }

    fn database_bytes(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join(FILE)).expect("size").len()
    }

    /// Waits until the database file holds `bytes`, which only a checkpoint writes there.
    fn wait_for_copy(dir: &std::path::Path, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while database_bytes(dir) < bytes {
            assert!(Instant::now() < deadline, "the checkpointer never copied the log into the database");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_failed_sync_of_the_database_file_is_reported_and_stops_the_writer_s_turns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = writer(dir.path());
        // A pipe cannot be synced: fdatasync fails with EINVAL.
        let (reader, _writer_end) = std::io::pipe().expect("pipe");
        let not_a_file = File::from(std::os::fd::OwnedFd::from(reader));
        let connection = Connection::open(dir.path().join(FILE)).expect("open");
        let checkpointer = Checkpointer::start(connection, Arc::new(not_a_file)).expect("start");
        assert!(!checkpointer.failed());
        for n in 0..5 {
            insert(&writer, n);
        }
        checkpointer.wrote();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !checkpointer.failed() {
            assert!(Instant::now() < deadline, "the failed sync was never reported");
            std::thread::sleep(Duration::from_millis(10));
        }
        checkpointer.shared.restart_due.store(true, Ordering::Release);
        assert!(checkpointer.restart_if_due(&writer).is_none(), "no copy that would let the log start over");
    }

    #[test]
    fn commits_are_copied_into_the_database_beside_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = writer(dir.path());
        let checkpointer = start(dir.path());
        let before = database_bytes(dir.path());
        for n in 0..20 {
            insert(&writer, n);
        }
        checkpointer.wrote();
        wait_for_copy(dir.path(), before + 20 * 3000);
    }

    #[test]
    fn a_long_log_starts_over_after_the_writer_s_turn_and_copying_goes_on_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = writer(dir.path());
        let checkpointer = start(dir.path());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        let restarted = loop {
            assert!(Instant::now() < deadline, "the writer was never asked to start the log over");
            insert(&writer, n);
            n += 1;
            checkpointer.wrote();
            if let Some(pass) = checkpointer.restart_if_due(&writer) {
                break pass;
            }
        };
        // (The log may already have started over if the checkpointer's second pass reached
        // its end and a commit followed: then the writer copies a short rest.)
        assert_eq!(restarted.copied, restarted.log, "the writer copies all that is left");

        // The checkpointer goes on after the writer's turn.
        let before = database_bytes(dir.path());
        for _ in 0..20 {
            insert(&writer, n);
            n += 1;
        }
        checkpointer.wrote();
        wait_for_copy(dir.path(), before + 20 * 3000);

        drop(checkpointer);
        let after = checkpoint(&writer).expect("checkpoint").expect("nobody else checkpoints");
        assert!(after.log < RESTART_AT / 10, "the log did not start over: {} frames after the restart", after.log);
        let rows: i64 = writer.query_row("SELECT COUNT(*) FROM rows", [], |row| row.get(0)).expect("count");
        assert_eq!(rows, n, "nothing written is lost when the log starts over");
    }
}
