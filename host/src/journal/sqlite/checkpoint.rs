//! The embedded journal's checkpointer: a thread with its own connection that copies
//! committed pages from the write-ahead log into the database file, so that the writer does
//! not stop for it.
//!
//! A checkpoint syncs the log, copies its pages into the database and syncs the database.
//! The database's pages are scattered (every dedup key lands on a random leaf), and this
//! disk takes about 0.05 ms per scattered page it syncs: a checkpoint of 1 000 pages, which
//! SQLite runs on the committing connection, stalled the writer and every acknowledgement
//! behind it for 10 – 25 ms. Here passes run beside the writer, as long as they find work.
//!
//! SQLite starts the log over from its beginning only when a transaction starts with every
//! frame copied, which steady load rarely allows: frames committed during a pass are left for
//! the next. So when a pass leaves at most [`RESTART_LEFT`] frames behind in a log of
//! [`RESTART_AT`] frames or more, the checkpointer stops and tells the writer, which copies
//! that small rest itself between two commits ([`Checkpointer::restart_if_due`]); its next
//! transaction then starts the log over. The writer's own automatic checkpoint stays on at
//! [`WRITER_CHECKPOINT_AT`] frames, a bound on the log for a disk that cannot keep up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// A log this long is worth starting over, once nearly all of it is copied (16 MiB of
/// pages): each start over stops the writer for one short copy, so not too often.
const RESTART_AT: u64 = 4_000;
/// Frames the writer copies itself to start the log over: a short stop.
const RESTART_LEFT: u64 = 64;
/// The log length at which SQLite checkpoints on the writer anyway (64 MiB of pages).
pub(super) const WRITER_CHECKPOINT_AT: u32 = 16_000;
/// How long commits gather before a pass, once the last one caught up.
const GATHER: Duration = Duration::from_millis(20);

/// The thread that checkpoints the journal while the writer goes on committing.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    /// The writer committed since the last pass began.
    wrote: AtomicBool,
    /// The last pass left only a short rest of a long log: the writer's turn.
    restart_due: AtomicBool,
    stop: AtomicBool,
}

/// What one pass found: frames in the log, and how many of them are in the database now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pass {
    log: u64,
    copied: u64,
}

impl Pass {
    fn left(self) -> u64 {
        self.log.saturating_sub(self.copied)
    }
}

impl Checkpointer {
    /// Starts the thread that checkpoints through `connection`, a connection of its own to
    /// the journal's file.
    pub(super) fn start(connection: Connection) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || checkpoint_loop(&connection, &shared))?
        };
        Ok(Checkpointer { shared, thread: Some(thread) })
    }

    /// Tells the checkpointer that the writer committed; cheap enough to call for each commit.
    pub(super) fn wrote(&self) {
        if !self.shared.wrote.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Called by the writer between commits, on its own connection: when the checkpointer
    /// has copied nearly all of a long log, copies the rest, so that the next transaction
    /// starts the log over. Returns the pass when it ran one.
    pub(super) fn restart_if_due(&self, writer: &Connection) -> Option<rusqlite::Result<Pass>> {
        if !self.shared.restart_due.load(Ordering::Acquire) {
            return None;
        }
        let pass = checkpoint(writer);
        self.shared.restart_due.store(false, Ordering::Release);
        self.wake();
        Some(pass)
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

fn checkpoint_loop(connection: &Connection, shared: &Shared) {
    let mut failing = false;
    let mut behind = false;
    while !shared.stop.load(Ordering::Acquire) {
        if shared.restart_due.load(Ordering::Acquire) || !(behind || shared.wrote.load(Ordering::Acquire)) {
            std::thread::park();
            continue;
        }
        if !behind {
            // Caught up last time: let commits gather, so that an idle-ish host does not
            // pay two fsyncs per commit. Parked rather than asleep, so that a stop does not
            // wait; other wake-ups end a park early, hence the loop.
            let until = Instant::now() + GATHER;
            while let Some(left) = until.checked_duration_since(Instant::now())
                && !shared.stop.load(Ordering::Acquire)
            {
                std::thread::park_timeout(left);
            }
        }
        shared.wrote.store(false, Ordering::Release);
        let started = Instant::now();
        match checkpoint(connection) {
            Ok(pass) => {
                crate::metrics::journal_checkpoint("checkpointer", started.elapsed());
                failing = false;
                behind = pass.left() > RESTART_LEFT;
                if !behind && pass.log >= RESTART_AT {
                    shared.restart_due.store(true, Ordering::Release);
                }
            }
            // Nothing is lost: the pages stay in the log, and the next pass or the writer's
            // own checkpoint copies them. Said once per run of failures.
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "cannot checkpoint the journal; it is retried");
                }
                failing = true;
                behind = false;
            }
        }
    }
}

/// Copies what it can of the log into the database without waiting for any other
/// connection, and syncs the database.
fn checkpoint(connection: &Connection) -> rusqlite::Result<Pass> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        // (busy, frames in the log, frames copied); -1 when the file is not in WAL mode.
        let log: i64 = row.get(1)?;
        let copied: i64 = row.get(2)?;
        Ok(Pass { log: log.max(0).unsigned_abs(), copied: copied.max(0).unsigned_abs() })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a new WAL file in `dir` that never checkpoints by itself, with a table.
    fn writer(dir: &std::path::Path) -> Connection {
        let writer = Connection::open(dir.join("journal.sqlite3")).expect("open");
        writer.pragma_update(None, "journal_mode", "WAL").expect("wal");
        writer.pragma_update(None, "synchronous", "OFF").expect("synchronous");
        writer.pragma_update(None, "wal_autocheckpoint", 0).expect("no automatic checkpoint");
        writer.execute("CREATE TABLE rows (n INTEGER PRIMARY KEY, data BLOB)", []).expect("table");
        writer
    }

    fn insert(writer: &Connection, n: i64) {
        writer.execute("INSERT INTO rows (n, data) VALUES (?1, zeroblob(3000))", [n]).expect("insert");
    }

    /// The log's length in frames, after copying what can be copied.
    fn frames(connection: &Connection) -> Pass {
        checkpoint(connection).expect("checkpoint")
    }

    #[test]
    fn commits_are_copied_into_the_database_beside_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = writer(dir.path());
        let checkpointer =
            Checkpointer::start(Connection::open(dir.path().join("journal.sqlite3")).expect("open")).expect("start");
        for n in 0..20 {
            insert(&writer, n);
        }
        checkpointer.wrote();
        let database = dir.path().join("journal.sqlite3");
        let deadline = Instant::now() + Duration::from_secs(30);
        // The rows only reach the database file through a checkpoint, and the writer ran none.
        while std::fs::metadata(&database).expect("size").len() < 20 * 3000 {
            assert!(Instant::now() < deadline, "the checkpointer never copied the log into the database");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(checkpointer.restart_if_due(&writer).is_none(), "a short log is not worth a stop of the writer");
    }

    #[test]
    fn a_long_log_nearly_copied_starts_over_after_the_writer_copies_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = writer(dir.path());
        let checkpointer =
            Checkpointer::start(Connection::open(dir.path().join("journal.sqlite3")).expect("open")).expect("start");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        let restarted = loop {
            assert!(Instant::now() < deadline, "the writer was never asked to start the log over");
            insert(&writer, n);
            n += 1;
            checkpointer.wrote();
            if let Some(pass) = checkpointer.restart_if_due(&writer) {
                break pass.expect("the writer's checkpoint");
            }
        };
        assert!(restarted.log >= RESTART_AT, "asked to start over a log of {} frames", restarted.log);
        assert_eq!(restarted.left(), 0, "the writer copies all that is left");
        insert(&writer, n);
        let after = frames(&writer);
        assert!(after.log < RESTART_AT / 10, "the log did not start over: {} frames after the restart", after.log);
        let rows: i64 = writer.query_row("SELECT COUNT(*) FROM rows", [], |row| row.get(0)).expect("count");
        assert_eq!(rows, n + 1, "nothing written is lost when the log starts over");
    }
}
