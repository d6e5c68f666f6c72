//! The embedded journal's checkpointer: a thread with its own connection that copies
//! committed pages from the write-ahead log into the database file, so that the writer does
//! not stop for it.
//!
//! A checkpoint copies the log's pages into the database file and syncs it. Those pages are
//! scattered (every dedup key lands on a random leaf), and syncing scattered pages is slow:
//! 600 of them took 28 ms on the development machine, 600 appended ones 8 ms. SQLite runs
//! its automatic checkpoint (every 1 000 pages) on the committing connection, so each one
//! stalled the writer, and every acknowledgement queued behind it, for 10 – 25 ms. Here passes
//! run beside the writer, 20 ms after a commit ([`GATHER`]). SQLite syncs the database only
//! after a pass that reached the end of the log, which a pass under load never does (the
//! writer commits meanwhile), so the checkpointer syncs the file itself after each pass.
//!
//! SQLite starts the log over from its beginning only when a transaction starts with every
//! frame copied, which steady load never allows. So once the log holds [`RESTART_AT`] frames,
//! the checkpointer runs one more pass at once (it copies what was committed during the last),
//! then stops and tells the writer, which copies the rest itself between two commits
//! ([`Checkpointer::restart_if_due`]): its next transaction starts the log over. SQLite's own
//! checkpoint stays on the writer at [`WRITER_CHECKPOINT_AT`] frames, in case the checkpointer
//! cannot run (it skips a commit's checkpoint while a pass holds the lock, so the log may pass
//! that length during a long pass).

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
/// How long commits gather before a pass.
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
    /// The log is long and nearly all copied: the writer's turn to copy the rest.
    restart_due: AtomicBool,
    stop: AtomicBool,
}

/// What a pass found: frames in the log when it began, and how many of them are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pass {
    log: u64,
    copied: u64,
}

impl Checkpointer {
    /// Starts the thread that checkpoints through `connection`, a connection of its own to
    /// the journal's file, and syncs `database`, that file opened for reading.
    pub(super) fn start(connection: Connection, database: File) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("journal-checkpoint".into())
                .spawn(move || checkpoint_loop(&connection, &database, &shared))?
        };
        Ok(Checkpointer { shared, thread: Some(thread) })
    }

    /// Tells the checkpointer that the writer committed; cheap enough to call for each commit.
    pub(super) fn wrote(&self) {
        if !self.shared.wrote.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Called by the writer between commits, on its own connection: when the log is long and
    /// the checkpointer has copied nearly all of it, copies the rest (and SQLite syncs the
    /// database, as the pass reaches the end of the log), so that the next transaction
    /// starts the log over. Returns the pass when it ran one; `None` in it when another
    /// checkpoint held the lock.
    pub(super) fn restart_if_due(&self, writer: &Connection) -> Option<rusqlite::Result<Option<Pass>>> {
        if !self.shared.restart_due.load(Ordering::Acquire) {
            return None;
        }
        let pass = checkpoint(writer);
        self.shared.restart_due.store(false, Ordering::Release);
        // Commits that came while the flag was up found the checkpointer parked.
        self.shared.wrote.store(true, Ordering::Release);
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

fn checkpoint_loop(connection: &Connection, database: &File, shared: &Shared) {
    let stopped = || shared.stop.load(Ordering::Acquire);
    let mut failing = false;
    while !stopped() {
        if shared.restart_due.load(Ordering::Acquire) || !shared.wrote.load(Ordering::Acquire) {
            std::thread::park();
            continue;
        }
        // Let commits gather, so that a quiet host does not pay a pass per commit. Parked
        // rather than asleep, so that a stop does not wait; other wake-ups end a park early.
        let until = Instant::now() + GATHER;
        while let Some(left) = until.checked_duration_since(Instant::now())
            && !stopped()
        {
            std::thread::park_timeout(left);
        }
        if stopped() {
            return;
        }
        shared.wrote.store(false, Ordering::Release);
        let mut result = pass(connection, database);
        if let Ok(Some(first)) = result
            && first.log >= RESTART_AT
        {
            result = pass(connection, database);
            if let Ok(Some(_)) = result {
                shared.restart_due.store(true, Ordering::Release);
            }
        }
        match result {
            Ok(_) => failing = false,
            // Nothing is lost: the pages stay in the log, and the next pass or the writer's
            // own checkpoint copies them. Said once per run of failures.
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "cannot checkpoint the journal; it is retried");
                }
                failing = true;
            }
        }
    }
}

/// One pass of the checkpointer: copies what it can and syncs the database file; `None`
/// when another checkpoint held the lock (SQLite's own, on the writer).
fn pass(connection: &Connection, database: &File) -> Result<Option<Pass>, String> {
    let started = Instant::now();
    let Some(pass) = checkpoint(connection).map_err(|err| err.to_string())? else { return Ok(None) };
    if pass.copied > 0 {
        database.sync_data().map_err(|err| format!("cannot sync the journal's database file: {err}"))?;
    }
    crate::metrics::journal_checkpoint("checkpointer", started.elapsed());
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
        Checkpointer::start(connection, File::open(dir.join(FILE)).expect("open the file")).expect("start")
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
    fn a_long_log_starts_over_once_the_writer_copies_the_rest_and_copying_goes_on_after() {
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
                break pass.expect("the writer's checkpoint").expect("not locked out by the checkpointer");
            }
        };
        assert!(restarted.log >= RESTART_AT, "asked to start over a log of {} frames", restarted.log);
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
