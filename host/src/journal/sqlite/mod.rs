//! The embedded journal: one SQLite file in WAL mode in the data folder.
//!
//! One writer thread owns the write connection and runs every write that arrives while it is
//! busy in one transaction (group commit). It does not wait for the fsync of its commits: an
//! accepted event is on disk before its caller hears back (`synchronous = "full"`, the
//! default), but the fsync runs on a second thread ([`sync`]) while the writer commits the next
//! group, and one fsync covers every group committed before it started. Only acceptances and
//! an operator's changes wait for the fsync: outcomes are answered once committed (crash-safe
//! for the process), because losing one to a power cut only runs that delivery again. Outcomes
//! do wait for the fsyncs under way when nothing else is queued: they then share one commit
//! instead of one each. A write that fails rolls its group back and the others run again
//! without it, so it leaves nothing half-done. Checkpoints, which copy the log into the
//! database file, run on a third thread ([`checkpoint`]); the writer copies only the short
//! rest that lets the log start over (and SQLite's own checkpoint stays on it as a
//! fallback). Reads for the admin API use a connection of their own, which WAL lets run
//! beside the writer.
//!
//! A delivery's `due_ms` is when it next needs attention: its first attempt or its next
//! retry. Finished deliveries (done, dead) have none, which keeps the index of due work small.
//! Leases are held in memory ([`leases`]): taking a delivery writes nothing, and its outcome
//! is its one write. New deliveries wait in memory too ([`ready`]), so that a take of fresh
//! work reads neither the file nor waits for the writer.
//! The dedup key is the event's own row (its source and id, and the producer in its
//! attributes), live until the row's `dedup_until_ms`.
//! The writer keeps the counts `/v1/stats` shows as it commits ([`counts`]): stats never
//! scan the tables.
//!
//! One host owns the file: it holds an exclusive lock on the data folder, so the leases it
//! forgets in a crash belong to nobody else, and their deliveries are due at the next start.

mod checkpoint;
mod counts;
mod leases;
mod ready;
mod sync;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{
    Accepted, AttemptError, DeadLetter, DeadLetterDetail, DeadSelector, DeliveryRecord, DeliveryStatus, EventRecord,
    EventStatus, Expired, Journal, JournalError, Lease, NewEvent, Outcome, Route, Stats, Want,
};
use crate::clock::{Clock, SystemClock};
use crate::event::{Event, millis};
use checkpoint::Checkpointer;
use counts::{Counts, Tally};
use leases::Leases;
use ready::{Fresh, Ready};
use sync::Syncer;

/// The journal's file name inside the data folder.
pub const FILE_NAME: &str = "journal.sqlite3";
/// The lock file that keeps a second host off the same data folder.
pub const LOCK_FILE_NAME: &str = "wasmhook.lock";

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Writes waiting for the writer thread before callers wait to queue theirs.
const QUEUE_DEPTH: usize = 4096;
/// How often an idle `take` looks again, for retries and leases coming due.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long the read connection waits for a lock before failing.
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Events looked at per round of replay or expiry: each round's write stays short, so that
/// requests are answered between rounds.
const PAGE: usize = 1000;
/// The schema this code writes; older files are migrated, newer ones refused.
const SCHEMA_VERSION: i64 = 3;

/// What each schema version changes from the one before it.
const MIGRATIONS: [&str; 2] = [
    // 2: the plugin version that ran each delivery.
    "ALTER TABLE deliveries ADD COLUMN sha256 TEXT;",
    // 3: the dedup key is the event's own row, until its window ends, not a table and index
    // of its own: each acceptance writes two B-trees fewer, and keys need no sweep to expire.
    // A key goes to the newest event with it; one whose event retention already removed (a
    // window longer than the retention) is forgotten, since events now outlive their window.
    "ALTER TABLE events ADD COLUMN dedup_until_ms INTEGER NOT NULL DEFAULT 0;
     UPDATE events SET dedup_until_ms =
         (SELECT d.expires_ms FROM dedup d WHERE d.source = events.source AND d.id = events.id)
      WHERE seq IN (SELECT (SELECT MAX(e.seq) FROM events e WHERE e.id = d.id AND e.source = d.source)
                      FROM dedup d);
     DROP TABLE dedup;
     DROP INDEX IF EXISTS events_by_id;
     CREATE INDEX events_by_key ON events (id, source, dedup_until_ms);",
];

const SCHEMA: &str = "
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    time_ms      INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    data         BLOB    NOT NULL,
    attributes   TEXT    NOT NULL,
    dedup_until_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_by_key ON events (id, source, dedup_until_ms);
CREATE INDEX events_by_time ON events (time_ms);
CREATE TABLE deliveries (
    seq         INTEGER PRIMARY KEY,
    event_seq   INTEGER NOT NULL REFERENCES events (seq),
    plugin      TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    due_ms      INTEGER,
    last_error  TEXT,
    finished_ms INTEGER,
    sha256      TEXT,
    UNIQUE (event_seq, plugin)
);
CREATE INDEX deliveries_due ON deliveries (due_ms) WHERE due_ms IS NOT NULL;
CREATE INDEX deliveries_dead ON deliveries (plugin, finished_ms) WHERE status = 'dead';
CREATE TABLE delivery_errors (
    delivery_seq INTEGER NOT NULL REFERENCES deliveries (seq),
    attempt      INTEGER NOT NULL,
    time_ms      INTEGER NOT NULL,
    error        TEXT    NOT NULL
);
CREATE INDEX delivery_errors_by_delivery ON delivery_errors (delivery_seq);
";

/// SQLite's `synchronous` setting: how hard each commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every acceptance and operator change is on disk before it is answered (the default:
    /// 202 means durable); outcomes are answered once committed.
    Full,
    /// In WAL mode, a power loss may undo the last commits; a process crash loses nothing.
    Normal,
}

/// How the embedded journal behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How hard commits wait for the disk.
    pub synchronous: Synchronous,
    /// Unfinished deliveries above which `accept` answers [`JournalError::Full`].
    pub max_pending: u64,
    /// How long handled events are kept.
    pub retention: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            synchronous: Synchronous::Full,
            max_pending: super::DEFAULT_MAX_PENDING,
            retention: super::DEFAULT_RETENTION,
        }
    }
}

/// The embedded SQLite journal.
pub struct SqliteJournal {
    writes: mpsc::Sender<Write>,
    reader: Arc<Mutex<Connection>>,
    /// The database file, which the checkpointer syncs. Closed after every connection to the
    /// file (the writer's and the checkpointer's close when `drop` joins the writer thread, the
    /// reader's just above), as closing a descriptor drops the process's POSIX locks on the
    /// file, SQLite's included.
    _database: Arc<std::fs::File>,
    work: Arc<Notify>,
    tracked: Arc<Mutex<Tracked>>,
    clock: Arc<dyn Clock>,
    options: Options,
    writer: Option<JoinHandle<()>>,
    /// Held for the journal's life: the lock on the data folder.
    _lock: std::fs::File,
}

impl std::fmt::Debug for SqliteJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteJournal").field("options", &self.options).finish_non_exhaustive()
    }
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// A write for the writer thread; each carries where to send its result (after the commit,
/// except a take's, which only reads).
enum Write {
    Accept { new: NewEvent, reply: Reply<Accepted> },
    Take { plugins: Vec<String>, max: usize, lease_ms: u64, reply: Reply<Vec<Lease>> },
    Finish { delivery: i64, attempt: u32, outcome: Outcome, sha256: String, emitted: Vec<NewEvent>, reply: Reply<bool> },
    ReplayDead { selector: DeadSelector, reply: Reply<u64> },
    PurgeDead { selector: DeadSelector, reply: Reply<u64> },
    Redeliver { items: Vec<(i64, Vec<String>)>, reply: Reply<u64> },
    Expire { retention_ms: u64, seqs: Vec<i64>, reply: Reply<Expired> },
    Ping { reply: Reply<()> },
}

/// What the writer keeps in memory beside the file: the counts, the leases and the queues of
/// fresh deliveries, under one lock so that stats see the first two at the same moment and a
/// delivery leaves its queue as its lease is taken.
#[derive(Debug)]
struct Tracked {
    counts: Counts,
    leases: Leases,
    ready: Ready,
}

/// "Now" as one batch of writes sees it ([`Clock`]): the wall clock for what is written (due
/// times, dedup windows, when a delivery finished), and the clock that never jumps for the
/// leases and queues held in memory.
#[derive(Debug, Clone, Copy)]
struct Now {
    wall_ms: u64,
    elapsed_ms: u64,
}

impl Now {
    fn of(clock: &dyn Clock) -> Self {
        Now { wall_ms: clock.now_ms(), elapsed_ms: clock.elapsed_ms() }
    }
}

impl Tracked {
    /// Adds a committed write's changes.
    fn apply(&mut self, mut tally: Tally, now: Now) {
        if let Some((delivery, attempt)) = tally.lease_done {
            self.leases.forget(delivery, attempt);
        }
        if tally.made_due_on_disk() {
            self.ready.all_on_disk();
        }
        for fresh in tally.fresh.drain(..) {
            self.ready.offer(fresh, now.elapsed_ms);
        }
        self.counts.apply(tally, now.wall_ms);
    }

    /// Leases up to `max` queued deliveries of the `wants`' plugins until `until_ms`, within
    /// each plugin's free calls less the leases `already` taken for it.
    fn take_fresh(&mut self, wants: &[&Want], already: &[Lease], max: usize, until_ms: u64) -> Vec<Lease> {
        let mut taken = std::collections::HashMap::new();
        for lease in already {
            *taken.entry(lease.plugin.as_str()).or_insert(0) += 1;
        }
        let fresh = self.ready.take(wants, &taken, max);
        fresh
            .into_iter()
            .map(|Fresh { delivery, plugin, event }| {
                let attempt = self.leases.hold(delivery, plugin.clone(), 0, DeliveryStatus::Pending, until_ms);
                Lease { delivery, plugin, attempt, event }
            })
            .collect()
    }

    fn stats(&self, max_pending: u64, now: Now) -> Stats {
        let mut stats = self.counts.stats(max_pending, now.wall_ms);
        self.leases.overlay_stats(&mut stats, now.elapsed_ms);
        stats
    }
}

fn storage(err: rusqlite::Error) -> JournalError {
    JournalError::Storage(err.to_string())
}

fn json_error(err: serde_json::Error) -> JournalError {
    JournalError::Storage(err.to_string())
}

/// SQLite stores integers as i64; times in ms since 1970 fit with room to spare.
fn sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn from_sql_ms(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0)
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `data_dir`.
    pub fn open(data_dir: &Path, options: Options) -> Result<Self, JournalError> {
        Self::open_with_clock(data_dir, options, Arc::new(SystemClock))
    }

    /// Opens the journal with `clock` as its notion of now (tests move it by hand).
    pub fn open_with_clock(data_dir: &Path, options: Options, clock: Arc<dyn Clock>) -> Result<Self, JournalError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|err| JournalError::Storage(format!("cannot create data folder {}: {err}", data_dir.display())))?;
        let lock = lock_folder(data_dir)?;
        let path = data_dir.join(FILE_NAME);
        let open_err = |err: rusqlite::Error| JournalError::Storage(format!("cannot open {}: {err}", path.display()));
        let mut writer = Connection::open(&path).map_err(open_err)?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            // Commits do not wait for the disk; the syncer makes acceptances durable.
            .and_then(|()| writer.pragma_update(None, "synchronous", "NORMAL"))
            // Plans chosen without peeking at bound values: otherwise a take whose LIMIT differs
            // from the last one re-prepares its statement (a fifth of the writer's time).
            .and_then(|()| writer.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(drop))
            // The checkpointer copies the log beside the writer; this is only its bound.
            .and_then(|()| writer.pragma_update(None, "wal_autocheckpoint", checkpoint::WRITER_CHECKPOINT_AT))
            .map_err(open_err)?;
        migrate(&mut writer, &path)?;
        // Earlier versions marked leased deliveries as running on disk.
        let interrupted = writer
            .execute(
                "UPDATE deliveries SET due_ms = ?1, status = CASE WHEN attempts = 0 THEN 'pending' ELSE 'retrying' END
                 WHERE status = 'running'",
                [sql_ms(clock.now_ms())],
            )
            .map_err(open_err)?;
        if interrupted > 0 {
            tracing::warn!(
                deliveries = interrupted,
                "deliveries were running when the host last stopped; they run again now"
            );
        }
        let counts = Counts::load(&writer).map_err(open_err)?;
        let tracked = Arc::new(Mutex::new(Tracked { counts, leases: Leases::default(), ready: Ready::default() }));
        let reader = Connection::open(&path).map_err(open_err)?;
        reader.busy_timeout(READ_BUSY_TIMEOUT).map_err(open_err)?;
        let syncer = match options.synchronous {
            Synchronous::Full => Some(start_syncer(&path)?),
            Synchronous::Normal => None,
        };
        let database = Arc::new(
            std::fs::File::open(&path)
                .map_err(|err| JournalError::Storage(format!("cannot open {}: {err}", path.display())))?,
        );
        let checkpointer = Checkpointer::start(Connection::open(&path).map_err(open_err)?, Arc::clone(&database))
            .map_err(|err| JournalError::Storage(format!("cannot start the journal's checkpointer: {err}")))?;

        let work = Arc::new(Notify::new());
        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let thread = {
            let (tracked, work, clock) = (Arc::clone(&tracked), Arc::clone(&work), Arc::clone(&clock));
            std::thread::Builder::new()
                .name("journal-writer".into())
                .spawn(move || {
                    write_loop(writer, queue, clock.as_ref(), syncer.as_ref(), &checkpointer, &tracked, &work);
                })
                .map_err(|err| JournalError::Storage(format!("cannot start the journal writer: {err}")))?
        };
        Ok(SqliteJournal {
            writes,
            reader: Arc::new(Mutex::new(reader)),
            _database: database,
            work,
            tracked,
            clock,
            options,
            writer: Some(thread),
            _lock: lock,
        })
    }

    /// Leases what is due now: from the file first when it has not been read for a while,
    /// then from the queues, then from the file for plugins whose queue ran dry while it may
    /// hold some of their work.
    async fn take_now(
        &self,
        wants: &[&Want],
        plugins: &[String],
        max: usize,
        lease_ms: u64,
    ) -> Result<Vec<Lease>, JournalError> {
        let mut leases = Vec::new();
        let look_first = lock(&self.tracked).ready.look_due(plugins, self.clock.elapsed_ms());
        if look_first {
            let plugins = plugins.to_vec();
            leases = self.call(|reply| Write::Take { plugins, max, lease_ms, reply }).await?;
        }
        if leases.len() >= max {
            return Ok(leases);
        }
        let until = self.clock.elapsed_ms().saturating_add(lease_ms);
        let dry: Vec<String> = {
            let mut tracked = lock(&self.tracked);
            let fresh = tracked.take_fresh(wants, &leases, max - leases.len(), until);
            leases.extend(fresh);
            if look_first || leases.len() >= max {
                return Ok(leases);
            }
            plugins.iter().filter(|plugin| tracked.ready.ran_dry(plugin)).cloned().collect()
        };
        if !dry.is_empty() {
            let want = max - leases.len();
            let more = self.call(|reply| Write::Take { plugins: dry, max: want, lease_ms, reply }).await;
            leases = keep_given(leases, more)?;
        }
        Ok(leases)
    }

    async fn call<T>(&self, write: impl FnOnce(Reply<T>) -> Write) -> Result<T, JournalError> {
        let (reply, answer) = oneshot::channel();
        self.writes.send(write(reply)).await.map_err(|_| JournalError::Closed)?;
        answer.await.map_err(|_| JournalError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, JournalError> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let connection = lock(&reader);
            query(&connection).map_err(storage)
        })
        .await
        .map_err(|err| JournalError::Storage(err.to_string()))?
    }
}

/// The leases of a take whose last read of the file ended in `more`: the ones the queues
/// already `given` stand even when that read failed (dropping them would let them run out
/// and cost each delivery an attempt); the error is then logged, and returned only when
/// there is nothing to hand out.
fn keep_given(mut given: Vec<Lease>, more: Result<Vec<Lease>, JournalError>) -> Result<Vec<Lease>, JournalError> {
    match more {
        Ok(more) => given.extend(more),
        Err(err) if given.is_empty() => return Err(err),
        Err(err) => {
            tracing::error!(error = %err, kept = given.len(), "cannot read due deliveries from the journal's file; handing out the ones already leased")
        }
    }
    Ok(given)
}

/// The syncer of the journal at `path`: it syncs the write-ahead log, which exists once the
/// writer's connection has read the file, and answers each write once synced.
fn start_syncer(path: &Path) -> Result<Syncer<(Write, Done)>, JournalError> {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .map_err(|err| JournalError::Storage(format!("cannot open {}: {err}", wal.display())))?;
    syncer_of(file)
}

/// A syncer of the write-ahead log `wal` that answers each write once synced.
fn syncer_of(wal: std::fs::File) -> Result<Syncer<(Write, Done)>, JournalError> {
    Syncer::start(wal, |(write, done), synced: Result<(), &std::io::Error>| {
        let result =
            synced.map(|()| done).map_err(|err| JournalError::Storage(format!("cannot sync the journal: {err}")));
        respond(write, result);
    })
    .map_err(|err| JournalError::Storage(format!("cannot start the journal's syncer: {err}")))
}

/// Takes the data folder's lock, or says which folder another host holds.
fn lock_folder(data_dir: &Path) -> Result<std::fs::File, JournalError> {
    let path = data_dir.join(LOCK_FILE_NAME);
    let file = std::fs::File::create(&path)
        .map_err(|err| JournalError::Storage(format!("cannot create {}: {err}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Storage(format!(
            "another wasmhook is using the data folder {}; each host needs its own",
            data_dir.display()
        ))),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(JournalError::Storage(format!("cannot lock {}: {err}", path.display())))
        }
    }
}

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), JournalError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(storage)?;
    let tx = connection.transaction().map_err(storage)?;
    let has_tables: bool = tx
        .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events')", [], |row| {
            row.get(0)
        })
        .map_err(storage)?;
    match version {
        0 if has_tables => {
            return Err(JournalError::Storage(format!(
                "{} was written by a development build that kept no schema version; move it away to start a new journal",
                path.display()
            )));
        }
        0 => tx.execute_batch(SCHEMA).map_err(storage)?,
        1..SCHEMA_VERSION => {
            tracing::info!(
                from = version, to = SCHEMA_VERSION, file = %path.display(),
                "migrating the journal's schema; a large journal takes a while, and the host listens once it is done"
            );
            if version <= 2 {
                warn_of_keys_without_events(&tx)?;
            }
            for (from, migration) in (1..).zip(MIGRATIONS) {
                if version <= from {
                    tx.execute_batch(migration).map_err(storage)?;
                }
            }
            tracing::info!(from = version, to = SCHEMA_VERSION, "journal schema migrated");
        }
        SCHEMA_VERSION => return Ok(()),
        other => {
            return Err(JournalError::Storage(format!(
                "{} has schema version {other}, newer than this wasmhook's {SCHEMA_VERSION}",
                path.display()
            )));
        }
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(storage)?;
    tx.commit().map_err(storage)
}

/// Schema 3 keeps a dedup key on its event, so a version 2 key whose event retention already
/// removed (a window longer than the retention) cannot move: say how many are forgotten.
fn warn_of_keys_without_events(tx: &Connection) -> Result<(), JournalError> {
    let forgotten: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM dedup d WHERE d.expires_ms > ?1
               AND NOT EXISTS (SELECT 1 FROM events e WHERE e.id = d.id AND e.source = d.source)",
            [sql_ms(crate::event::now_ms())],
            |row| row.get(0),
        )
        .map_err(storage)?;
    if forgotten > 0 {
        tracing::warn!(
            forgotten,
            "dedup keys whose events the retention already removed are forgotten: a sender repeating one of those ids is accepted again"
        );
    }
    Ok(())
}

impl Drop for SqliteJournal {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it holds.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writes, closed));
        if let Some(thread) = self.writer.take() {
            let _ = thread.join();
        }
    }
}

#[async_trait::async_trait]
impl Journal for SqliteJournal {
    async fn accept(&self, new: NewEvent) -> Result<Accepted, JournalError> {
        self.has_room()?;
        self.call(|reply| Write::Accept { new, reply }).await
    }

    fn has_room(&self) -> Result<(), JournalError> {
        let pending = lock(&self.tracked).counts.unfinished();
        if pending >= self.options.max_pending {
            return Err(JournalError::Full { pending, max: self.options.max_pending });
        }
        Ok(())
    }

    async fn take(&self, wants: &[Want], max: usize, wait: Duration) -> Result<Vec<Lease>, JournalError> {
        // Plugins at their concurrency take nothing; every lease lasts the longest plugin's.
        let ready: Vec<&Want> = wants.iter().filter(|want| want.free > 0).collect();
        let plugins: Vec<String> = ready.iter().map(|want| want.plugin.clone()).collect();
        let lease = ready.iter().map(|want| want.lease).max().unwrap_or_default();
        let deadline = Instant::now() + wait;
        let lease_ms = millis(lease);
        loop {
            if !plugins.is_empty() && max > 0 {
                let leases = self.take_now(&ready, &plugins, max, lease_ms).await?;
                if !leases.is_empty() {
                    return Ok(leases);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            tokio::select! {
                () = self.work.notified() => {}
                () = tokio::time::sleep((deadline - now).min(IDLE_POLL)) => {}
            }
        }
    }

    async fn finish(
        &self,
        lease: &Lease,
        outcome: Outcome,
        sha256: &str,
        emitted: Vec<NewEvent>,
    ) -> Result<bool, JournalError> {
        let (delivery, attempt, sha256) = (lease.delivery, lease.attempt, sha256.to_owned());
        self.call(|reply| Write::Finish { delivery, attempt, outcome, sha256, emitted, reply }).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), JournalError> {
        let mut tracked = lock(&self.tracked);
        if tracked.leases.release(lease.delivery, lease.attempt) {
            tracked.ready.on_disk(&lease.plugin);
            drop(tracked);
            self.work.notify_one();
        }
        Ok(())
    }

    async fn pending_by_plugin(&self) -> Result<std::collections::BTreeMap<String, u64>, JournalError> {
        self.read(|connection| {
            connection
                .prepare_cached("SELECT plugin, COUNT(*) FROM deliveries WHERE due_ms IS NOT NULL GROUP BY plugin")?
                .query_map([], |row| Ok((row.get::<_, String>(0)?, u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0))))?
                .collect()
        })
        .await
    }

    async fn event(&self, id: &str) -> Result<Option<EventRecord>, JournalError> {
        let id = id.to_owned();
        let mut found = self.read(move |connection| read_event(connection, &id)).await?;
        if let Some(record) = &mut found {
            let now = Now::of(self.clock.as_ref());
            let tracked = lock(&self.tracked);
            for delivery in &mut record.deliveries {
                tracked.leases.overlay_delivery(delivery, now);
            }
            record.status = EventStatus::of(&record.deliveries);
        }
        Ok(found)
    }

    async fn dead_letters(&self, plugin: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>, JournalError> {
        let plugin = plugin.map(str::to_owned);
        self.read(move |connection| read_dead_letters(connection, plugin.as_deref(), limit)).await
    }

    async fn dead_letter(&self, delivery: i64) -> Result<Option<DeadLetterDetail>, JournalError> {
        self.read(move |connection| read_dead_letter(connection, delivery)).await
    }

    async fn replay_dead(&self, selector: DeadSelector) -> Result<u64, JournalError> {
        self.call(|reply| Write::ReplayDead { selector, reply }).await
    }

    async fn purge_dead(&self, selector: DeadSelector) -> Result<u64, JournalError> {
        self.call(|reply| Write::PurgeDead { selector, reply }).await
    }

    async fn replay(&self, since_ms: u64, route: Route<'_>) -> Result<u64, JournalError> {
        let mut after = 0_i64;
        let mut made_due = 0;
        loop {
            let page = self.read(move |connection| read_replay_page(connection, since_ms, after)).await?;
            let Some(&(last, _)) = page.last() else { return Ok(made_due) };
            after = last;
            let items: Vec<(i64, Vec<String>)> = page
                .into_iter()
                .map(|(seq, event_type)| (seq, route(&event_type)))
                .filter(|(_, plugins)| !plugins.is_empty())
                .collect();
            if !items.is_empty() {
                made_due += self.call(|reply| Write::Redeliver { items, reply }).await?;
            }
        }
    }

    async fn stats(&self) -> Result<Stats, JournalError> {
        Ok(lock(&self.tracked).stats(self.options.max_pending, Now::of(self.clock.as_ref())))
    }

    async fn ping(&self) -> Result<(), JournalError> {
        self.call(|reply| Write::Ping { reply }).await
    }

    /// Finds what may go page by page on the reader, from where the last page ended, so that
    /// old events that must stay (dead letters) are read once per round and never hold up the
    /// writer; the writer checks each page again and removes it. Rounds go on until a page
    /// comes back short, however many events are due.
    async fn expire(&self) -> Result<Expired, JournalError> {
        let retention_ms = millis(self.options.retention);
        let mut expired = Expired::default();
        let mut after = (i64::MIN, i64::MIN);
        loop {
            let now = self.clock.now_ms();
            let page = self.read(move |c| expirable(c, after, now, retention_ms)).await?;
            let Some(&last) = page.last() else { break };
            after = last;
            let seqs = page.iter().map(|&(_, seq)| seq).collect();
            expired.events += self.call(|reply| Write::Expire { retention_ms, seqs, reply }).await?.events;
            if page.len() < PAGE {
                break;
            }
        }
        Ok(expired)
    }
}

/// Locks `mutex`, whether or not a thread panicked holding it (the counts stay usable).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Commits what arrives, in groups, until the queue closes; with a `syncer`, the writes
/// promised the disk are answered once it has synced them.
fn write_loop(
    mut connection: Connection,
    mut queue: mpsc::Receiver<Write>,
    clock: &dyn Clock,
    syncer: Option<&Syncer<(Write, Done)>>,
    checkpointer: &Checkpointer,
    tracked: &Mutex<Tracked>,
    work: &Notify,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut checkpoints_off = false;
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        gather(&mut queue, &mut batch);
        // After a failed sync of the database file, its copied pages may be lost while SQLite
        // counts them as copied: the log must keep them until a restart copies it again.
        if checkpointer.failed() && !checkpoints_off {
            if let Err(err) = connection.pragma_update(None, "wal_autocheckpoint", 0) {
                tracing::error!(error = %err, "cannot turn SQLite's own checkpoint off");
            }
            checkpoints_off = true;
        }
        // After a failed sync of either file, nothing more is promised the disk: what must
        // reach it is refused before it is committed. (The group whose sync failed, and what
        // joined the batch while it was waited for, are committed already: their senders are
        // told of the failure, yet their deliveries may run, a duplicate for at-least-once if
        // they send again.)
        let unsyncable = if checkpointer.failed() {
            Some("the journal's database file could not be synced; restart the host")
        } else if syncer.is_some_and(Syncer::failed) {
            Some("the journal's log could not be synced; restart the host")
        } else {
            None
        };
        if let Some(reason) = unsyncable {
            let (refused, kept): (Vec<Write>, Vec<Write>) = batch.drain(..).partition(Write::must_reach_disk);
            for write in refused {
                respond(write, Err(JournalError::Storage(reason.to_owned())));
            }
            batch.extend(kept);
            if batch.is_empty() {
                continue;
            }
        }
        // Outcomes alone wait for the fsyncs under way, and what arrives meanwhile joins them:
        // one commit after them rather than one per outcome, as a commit costs the pages it
        // touches more than its rows (docs/BENCHMARKS-HISTORY.md, session 5). A batch with
        // anything else in it commits at once; an acceptance that arrives during the wait
        // commits after it, which costs it the commit's time, as its own fsync could not start
        // sooner anyway.
        if let Some(syncer) = syncer
            && batch.len() < MAX_BATCH
            && batch.iter().all(|write| matches!(write, Write::Finish { .. }))
        {
            syncer.wait_until_synced();
            gather(&mut queue, &mut batch);
        }
        let changes = connection.total_changes();
        commit_batch(&mut connection, batch.drain(..), Now::of(clock), tracked, work, syncer);
        if connection.total_changes() != changes {
            checkpointer.wrote();
        }
        checkpointer.restart_if_due(&connection);
    }
}

/// Adds the writes waiting in `queue` to `batch`, up to [`MAX_BATCH`].
fn gather(queue: &mut mpsc::Receiver<Write>, batch: &mut Vec<Write>) {
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(write) => batch.push(write),
            Err(_) => break,
        }
    }
}

impl Write {
    /// Whether the caller is promised the write is on disk: an accepted event, and the
    /// operator's changes. An outcome lost to a power cut only runs a delivery again
    /// (emitted events included: they are emitted again), which at-least-once allows. A ping
    /// (readiness) goes through the syncer too, so that once a sync has failed, and every
    /// acceptance with it, the host stops reporting itself ready.
    fn must_reach_disk(&self) -> bool {
        !matches!(self, Write::Take { .. } | Write::Finish { .. })
    }
}

/// Runs `batch`: takes first (they only read, and each is answered with what it read), then
/// every other write in one transaction. A write that fails rolls the transaction back, is
/// answered with its error, and the others run again without it: each write is all or
/// nothing, without a savepoint per write. Once the commit's fate is known, updates the
/// counts, leases and queues (and wakes `take` if work was added) before answering any
/// caller, so that an answer never runs ahead of the counts. With a `syncer`, the writes
/// promised the disk are answered once it has synced the commit.
fn commit_batch(
    connection: &mut Connection,
    batch: impl Iterator<Item = Write>,
    now: Now,
    tracked: &Mutex<Tracked>,
    work: &Notify,
    syncer: Option<&Syncer<(Write, Done)>>,
) {
    let (takes, mut writes): (Vec<Write>, Vec<Write>) = batch.partition(|write| matches!(write, Write::Take { .. }));
    for take in takes {
        let result = apply(connection, &take, now, tracked).map(|(done, _)| done);
        respond(take, result);
    }
    let started = Instant::now();
    while !writes.is_empty() {
        let tx = match connection.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(err) => return refuse_all(writes, &storage(err)),
        };
        let mut done = Vec::with_capacity(writes.len());
        let mut failed = None;
        for (i, write) in writes.iter().enumerate() {
            match apply(&tx, write, now, tracked) {
                Ok(applied) => done.push(applied),
                Err(err) => {
                    failed = Some((i, err));
                    break;
                }
            }
        }
        if let Some((i, err)) = failed {
            drop(tx); // rolls back what the writes before it did
            respond(writes.remove(i), Err(err));
            continue;
        }
        if let Err(err) = tx.commit() {
            return refuse_all(writes, &storage(err));
        }
        crate::metrics::journal_commit(writes.len(), started.elapsed());
        // Wake `take` when any write added work, even if another finished some.
        let adds_work = done.iter().any(|(_, tally)| tally.adds_work());
        let mut answers = Vec::with_capacity(done.len());
        {
            let mut tracked = lock(tracked);
            for (value, tally) in done {
                tracked.apply(tally, now);
                answers.push(value);
            }
        }
        if adds_work {
            work.notify_one();
        }
        let (after_sync, answer_now): (Vec<_>, Vec<_>) =
            writes.into_iter().zip(answers).partition(|(write, _)| syncer.is_some() && write.must_reach_disk());
        for (write, value) in answer_now {
            respond(write, Ok(value));
        }
        if let Some(syncer) = syncer {
            syncer.after_sync(after_sync);
        }
        return;
    }
}

fn refuse_all(writes: Vec<Write>, err: &JournalError) {
    tracing::error!(error = %err, writes = writes.len(), "journal commit failed");
    for write in writes {
        respond(write, Err(JournalError::Storage(err.to_string())));
    }
}

/// What a write produced, for its caller.
enum Done {
    Accepted(Accepted),
    Leases(Vec<Lease>),
    Settled(bool),
    Count(u64),
    Expired(Expired),
    Nothing,
}

/// Sends `write`'s caller its result.
fn respond(write: Write, result: Result<Done, JournalError>) {
    fn send<T>(reply: Reply<T>, result: Result<Done, JournalError>, pick: fn(Done) -> Option<T>) {
        let result = result.and_then(|done| {
            pick(done).ok_or_else(|| JournalError::Storage("the journal answered the wrong kind of write".into()))
        });
        // A caller that stopped waiting no longer listens; nothing to do about it.
        let _ = reply.send(result);
    }
    match write {
        Write::Accept { reply, .. } => send(reply, result, |done| match done {
            Done::Accepted(accepted) => Some(accepted),
            _ => None,
        }),
        Write::Take { reply, .. } => send(reply, result, |done| match done {
            Done::Leases(leases) => Some(leases),
            _ => None,
        }),
        Write::Finish { reply, .. } => send(reply, result, |done| match done {
            Done::Settled(held) => Some(held),
            _ => None,
        }),
        Write::ReplayDead { reply, .. } | Write::PurgeDead { reply, .. } | Write::Redeliver { reply, .. } => {
            send(reply, result, |done| match done {
                Done::Count(n) => Some(n),
                _ => None,
            })
        }
        Write::Expire { reply, .. } => send(reply, result, |done| match done {
            Done::Expired(expired) => Some(expired),
            _ => None,
        }),
        Write::Ping { reply } => send(reply, result, |done| matches!(done, Done::Nothing).then_some(())),
    }
}

/// Runs one write; returns what it produced and how it changes the counts once committed.
fn apply(tx: &Connection, write: &Write, now: Now, tracked: &Mutex<Tracked>) -> Result<(Done, Tally), JournalError> {
    let mut tally = Tally::default();
    let wall = now.wall_ms;
    let done = match write {
        Write::Accept { new, .. } => Done::Accepted(accept(tx, new, wall, &mut tally)?),
        Write::Take { plugins, max, lease_ms, .. } => {
            Done::Leases(take(tx, tracked, plugins, *max, now, now.elapsed_ms.saturating_add(*lease_ms))?)
        }
        Write::Finish { delivery, attempt, outcome, sha256, emitted, .. } => {
            let held = lock(tracked).leases.current(*delivery, *attempt).cloned();
            match held {
                None => {
                    tracing::warn!(
                        delivery,
                        attempt,
                        "lease ran out before the attempt finished; its result is dropped"
                    );
                    Done::Settled(false)
                }
                Some(held) => {
                    finish(tx, *delivery, *attempt, &held, outcome, sha256, wall, &mut tally)?;
                    for new in emitted {
                        accept(tx, new, wall, &mut tally)?;
                    }
                    Done::Settled(true)
                }
            }
        }
        Write::ReplayDead { selector, .. } => Done::Count(replay_dead(tx, selector, wall, &mut tally)?),
        Write::PurgeDead { selector, .. } => Done::Count(purge_dead(tx, selector, &mut tally)?),
        Write::Redeliver { items, .. } => Done::Count(redeliver(tx, items, wall, &mut tally)?),
        Write::Expire { retention_ms, seqs, .. } => Done::Expired(expire(tx, wall, *retention_ms, seqs, &mut tally)?),
        Write::Ping { .. } => Done::Nothing,
    };
    Ok((done, tally))
}

/// Whether an event with `event`'s key (its source and id, and its producer or the lack of
/// one) was stored within that one's dedup window. The index finds the rows with the same
/// source and id; only those, rare, are read for their producer.
fn seen_within_window(tx: &Connection, event: &Event, now: u64) -> Result<bool, JournalError> {
    let mut seen = tx
        .prepare_cached("SELECT attributes FROM events WHERE id = ?1 AND source = ?2 AND dedup_until_ms > ?3")
        .map_err(storage)?;
    let mut rows = seen.query(params![event.id, event.source, sql_ms(now)]).map_err(storage)?;
    while let Some(row) = rows.next().map_err(storage)? {
        let attributes: Vec<(String, String)> =
            serde_json::from_str(&row.get::<_, String>(0).map_err(storage)?).map_err(json_error)?;
        if crate::event::producer(&attributes) == event.producer() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Stores the event unless an event with its key was stored within that one's dedup window.
fn accept(tx: &Connection, new: &NewEvent, now: u64, tally: &mut Tally) -> Result<Accepted, JournalError> {
    let event = &new.event;
    if seen_within_window(tx, event, now)? {
        return Ok(Accepted::Duplicate);
    }
    let dedup_until = now.saturating_add(millis(new.dedup_window));
    let attributes = serde_json::to_string(&event.attributes).map_err(json_error)?;
    tx.prepare_cached(
        "INSERT INTO events (source, id, event_type, time_ms, content_type, data, attributes, dedup_until_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut insert| {
        insert.execute(params![
            event.source,
            event.id,
            event.event_type,
            sql_ms(event.time_ms),
            event.content_type,
            &event.data[..],
            attributes,
            sql_ms(dedup_until)
        ])
    })
    .map_err(storage)?;
    let event_seq = tx.last_insert_rowid();
    let mut insert = tx
        .prepare_cached("INSERT INTO deliveries (event_seq, plugin, status, due_ms) VALUES (?1, ?2, 'pending', ?3)")
        .map_err(storage)?;
    let mut shared = None; // the event for the queues, copied only if some plugin gets it
    for plugin in &new.plugins {
        insert.execute(params![event_seq, plugin, sql_ms(now)]).map_err(storage)?;
        let delivery = tx.last_insert_rowid();
        let event = Arc::clone(shared.get_or_insert_with(|| Arc::new(event.clone())));
        tally.fresh.push(Fresh { delivery, plugin: plugin.clone(), event });
    }
    tally.event_stored(new.plugins.len());
    Ok(Accepted::New)
}

/// Leases up to `max` due deliveries of `plugins` from the file, skipping those a running
/// lease holds, those queued in memory, and those newer than a plugin's oldest queued one
/// (they run after the queue, in order). The lock on `tracked` is not held while the query
/// runs (it may scan past many deliveries of busy plugins), so that ingest and stats never
/// wait for it. Only the writer thread reads takes from the file and queues deliveries, so
/// nothing can lease what this one reads meanwhile: takes from the queues lease only what
/// is skipped here. A lease given back meanwhile is skipped until the plugin's next look.
fn take(
    tx: &Connection,
    tracked: &Mutex<Tracked>,
    plugins: &[String],
    max: usize,
    now: Now,
    lease_until: u64,
) -> Result<Vec<Lease>, JournalError> {
    let (queued, skipped) = {
        let mut tracked = lock(tracked);
        let queued = tracked.ready.before_look(plugins, now.elapsed_ms);
        let mut skipped = tracked.leases.running(now.elapsed_ms);
        skipped.extend_from_slice(&queued.deliveries);
        (queued, serde_json::to_string(&skipped).map_err(json_error)?)
    };
    let plugins_json = serde_json::to_string(plugins).map_err(json_error)?;
    let mut select = tx
        .prepare_cached(
            "SELECT d.seq, d.plugin, d.attempts, d.status, e.source, e.id, e.event_type, e.time_ms,
                    e.content_type, e.data, e.attributes
             FROM deliveries d JOIN events e ON e.seq = d.event_seq
             WHERE d.due_ms <= ?1 AND d.plugin IN (SELECT value FROM json_each(?2))
               AND d.seq NOT IN (SELECT value FROM json_each(?4))
             ORDER BY d.due_ms LIMIT ?3",
        )
        .map_err(storage)?;
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let mut rows = select.query(params![sql_ms(now.wall_ms), plugins_json, limit, skipped]).map_err(storage)?;
    let mut read = Vec::new();
    while let Some(row) = rows.next().map_err(storage)? {
        let attributes: String = row.get(10).map_err(storage)?;
        let recorded: u32 = row.get(2).map_err(storage)?;
        let stored = DeliveryStatus::parse(&row.get::<_, String>(3).map_err(storage)?);
        let lease = Lease {
            delivery: row.get(0).map_err(storage)?,
            plugin: row.get(1).map_err(storage)?,
            attempt: 0,
            event: Arc::new(Event {
                source: row.get(4).map_err(storage)?,
                id: row.get(5).map_err(storage)?,
                event_type: row.get(6).map_err(storage)?,
                time_ms: from_sql_ms(row.get(7).map_err(storage)?),
                content_type: row.get(8).map_err(storage)?,
                data: Bytes::from(row.get::<_, Vec<u8>>(9).map_err(storage)?),
                attributes: serde_json::from_str(&attributes).map_err(json_error)?,
            }),
        };
        read.push((lease, recorded, stored));
    }
    let came_up_short = read.len() < max;
    let (read, waiting): (Vec<_>, Vec<_>) =
        read.into_iter().partition(|(lease, _, _)| queued.allows(&lease.plugin, lease.delivery));
    let held_back: Vec<&str> = waiting.iter().map(|(lease, _, _)| lease.plugin.as_str()).collect();
    let mut tracked = lock(tracked);
    tracked.ready.looked(plugins, came_up_short, &held_back, now.elapsed_ms);
    Ok(read
        .into_iter()
        .map(|(mut lease, recorded, stored)| {
            lease.attempt = tracked.leases.hold(lease.delivery, lease.plugin.clone(), recorded, stored, lease_until);
            lease
        })
        .collect())
}

/// Records the outcome of the `held` lease's attempt; the lease is forgotten once it commits.
#[allow(clippy::too_many_arguments)]
fn finish(
    tx: &Connection,
    delivery: i64,
    attempt: u32,
    held: &leases::Held,
    outcome: &Outcome,
    sha256: &str,
    now: u64,
    tally: &mut Tally,
) -> Result<(), JournalError> {
    let (status, due, error, finished) = match outcome {
        Outcome::Done => (DeliveryStatus::Done, None, None, Some(now)),
        Outcome::Retry { error, delay } => {
            (DeliveryStatus::Retrying, Some(now.saturating_add(millis(*delay))), Some(error.as_str()), None)
        }
        Outcome::Dead { error } => (DeliveryStatus::Dead, None, Some(error.as_str()), Some(now)),
    };
    tx.prepare_cached(
        "UPDATE deliveries SET status = ?3, attempts = ?2, due_ms = ?4, last_error = COALESCE(?5, last_error),
                finished_ms = ?6, sha256 = ?7
         WHERE seq = ?1",
    )
    .and_then(|mut update| {
        update.execute(params![
            delivery,
            attempt,
            status.as_str(),
            due.map(sql_ms),
            error,
            finished.map(sql_ms),
            sha256
        ])
    })
    .map_err(storage)?;
    if let Some(error) = error {
        tx.prepare_cached(
            "INSERT INTO delivery_errors (delivery_seq, attempt, time_ms, error) VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut insert| insert.execute(params![delivery, attempt, sql_ms(now), error]))
        .map_err(storage)?;
    }
    tally.moved(&held.plugin, held.stored, status);
    tally.lease_done = Some((delivery, attempt));
    Ok(())
}

/// The SQL condition choosing dead letters, and its one parameter.
fn dead_filter(selector: &DeadSelector) -> Result<(&'static str, String), JournalError> {
    Ok(match selector {
        DeadSelector::Ids(ids) => {
            ("seq IN (SELECT value FROM json_each(?1))", serde_json::to_string(ids).map_err(json_error)?)
        }
        DeadSelector::Plugin(plugin) => ("plugin = ?1", plugin.clone()),
        DeadSelector::All => ("?1 IS NOT NULL", String::new()),
    })
}

fn replay_dead(tx: &Connection, selector: &DeadSelector, now: u64, tally: &mut Tally) -> Result<u64, JournalError> {
    let (filter, value) = dead_filter(selector)?;
    let sql = format!(
        "UPDATE deliveries SET status = 'pending', attempts = 0, due_ms = ?2, finished_ms = NULL
         WHERE status = 'dead' AND {filter} RETURNING plugin"
    );
    let plugins: Vec<String> = tx
        .prepare(&sql)
        .and_then(|mut update| update.query_map(params![value, sql_ms(now)], |row| row.get(0))?.collect())
        .map_err(storage)?;
    for plugin in &plugins {
        tally.moved(plugin, DeliveryStatus::Dead, DeliveryStatus::Pending);
    }
    Ok(plugins.len() as u64)
}

fn purge_dead(tx: &Connection, selector: &DeadSelector, tally: &mut Tally) -> Result<u64, JournalError> {
    let (filter, value) = dead_filter(selector)?;
    let errors = format!(
        "DELETE FROM delivery_errors WHERE delivery_seq IN (SELECT seq FROM deliveries WHERE status = 'dead' AND {filter})"
    );
    tx.execute(&errors, [&value]).map_err(storage)?;
    let deliveries = format!("DELETE FROM deliveries WHERE status = 'dead' AND {filter} RETURNING plugin, event_seq");
    let purged: Vec<(String, i64)> = tx
        .prepare(&deliveries)
        .and_then(|mut delete| delete.query_map([&value], |row| Ok((row.get(0)?, row.get(1)?)))?.collect())
        .map_err(storage)?;
    // An event whose every delivery was purged is left with none, as if unrouted.
    let mut events: Vec<i64> = purged.iter().map(|(_, event_seq)| *event_seq).collect();
    events.sort_unstable();
    events.dedup();
    let mut any =
        tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM deliveries WHERE event_seq = ?1)").map_err(storage)?;
    for event_seq in events {
        if !any.query_row([event_seq], |row| row.get::<_, bool>(0)).map_err(storage)? {
            tally.unrouted();
        }
    }
    for (plugin, _) in &purged {
        tally.removed(plugin, DeliveryStatus::Dead);
    }
    Ok(purged.len() as u64)
}

fn redeliver(tx: &Connection, items: &[(i64, Vec<String>)], now: u64, tally: &mut Tally) -> Result<u64, JournalError> {
    let mut before =
        tx.prepare_cached("SELECT status FROM deliveries WHERE event_seq = ?1 AND plugin = ?2").map_err(storage)?;
    let mut any =
        tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM deliveries WHERE event_seq = ?1)").map_err(storage)?;
    let mut upsert = tx
        .prepare_cached(
            "INSERT INTO deliveries (event_seq, plugin, status, attempts, due_ms)
             SELECT ?1, ?2, 'pending', 0, ?3 WHERE EXISTS (SELECT 1 FROM events WHERE seq = ?1)
             ON CONFLICT (event_seq, plugin) DO UPDATE
             SET status = 'pending', attempts = 0, due_ms = excluded.due_ms, finished_ms = NULL
             WHERE deliveries.due_ms IS NULL",
        )
        .map_err(storage)?;
    let mut made_due = 0;
    for (event_seq, plugins) in items {
        for plugin in plugins {
            let status: Option<String> =
                before.query_row(params![event_seq, plugin], |row| row.get(0)).optional().map_err(storage)?;
            let routed =
                status.is_some() || any.query_row([event_seq], |row| row.get::<_, bool>(0)).map_err(storage)?;
            if upsert.execute(params![event_seq, plugin, sql_ms(now)]).map_err(storage)? == 0 {
                continue;
            }
            made_due += 1;
            match status {
                Some(status) => tally.moved(plugin, DeliveryStatus::parse(&status), DeliveryStatus::Pending),
                None => {
                    tally.added(plugin, DeliveryStatus::Pending);
                    if !routed {
                        tally.routed();
                    }
                }
            }
        }
    }
    Ok(made_due)
}

/// When an event `e` may go: older than the cutoff `?1`, past its dedup window at `?2`, and
/// handled (no delivery but done ones).
const EXPIRABLE: &str = "e.time_ms < ?1 AND e.dedup_until_ms <= ?2
    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.status <> 'done')";

/// Which handled events may go, older than the retention and past their dedup window: up to
/// [`PAGE`] of them after `after`, as (time, seq) in that order.
fn expirable(reader: &Connection, after: (i64, i64), now: u64, retention_ms: u64) -> rusqlite::Result<Vec<(i64, i64)>> {
    let limit = i64::try_from(PAGE).unwrap_or(i64::MAX);
    let cutoff = sql_ms(now.saturating_sub(retention_ms));
    reader
        .prepare_cached(
            &format!("SELECT time_ms, seq FROM events e WHERE (time_ms, seq) > (?3, ?4) AND {EXPIRABLE} ORDER BY time_ms, seq LIMIT ?5"),
        )?
        .query_map(params![cutoff, sql_ms(now), after.0, after.1, limit], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

/// Removes those of `seqs` that are still handled events older than the retention whose dedup
/// window has ended too (a replay may have made one due again since it was found).
fn expire(
    tx: &Connection,
    now: u64,
    retention_ms: u64,
    seqs: &[i64],
    tally: &mut Tally,
) -> Result<Expired, JournalError> {
    let cutoff = sql_ms(now.saturating_sub(retention_ms));
    let seqs = serde_json::to_string(seqs).map_err(json_error)?;
    tx.execute_batch("CREATE TEMP TABLE IF NOT EXISTS expiring (seq INTEGER PRIMARY KEY); DELETE FROM expiring;")
        .map_err(storage)?;
    let handled = tx
        .execute(
            &format!("INSERT INTO expiring SELECT e.seq FROM json_each(?3) j JOIN events e ON e.seq = j.value WHERE {EXPIRABLE}"),
            params![cutoff, sql_ms(now), seqs],
        )
        .map_err(storage)?;
    if handled > 0 {
        let count = |sql: &str| {
            tx.query_row(sql, [], |row| row.get::<_, i64>(0)).map(|n| u64::try_from(n).unwrap_or(0)).map_err(storage)
        };
        let unrouted = count(
            "SELECT COUNT(*) FROM expiring x WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = x.seq)",
        )?;
        let done = count("SELECT COUNT(*) FROM deliveries WHERE event_seq IN (SELECT seq FROM expiring)")?;
        tx.execute_batch(
            "DELETE FROM delivery_errors WHERE delivery_seq IN
                 (SELECT seq FROM deliveries WHERE event_seq IN (SELECT seq FROM expiring));
             DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM expiring);
             DELETE FROM events WHERE seq IN (SELECT seq FROM expiring);",
        )
        .map_err(storage)?;
        tally.events_removed(handled as u64, unrouted);
        tally.done_removed(done);
    }
    Ok(Expired { events: handled as u64 })
}

fn read_event(connection: &Connection, id: &str) -> rusqlite::Result<Option<EventRecord>> {
    let found = connection
        .prepare_cached(
            "SELECT seq, source, id, event_type, time_ms FROM events WHERE id = ?1 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                EventRecord {
                    source: row.get(1)?,
                    id: row.get(2)?,
                    event_type: row.get(3)?,
                    time_ms: from_sql_ms(row.get(4)?),
                    status: EventStatus::Unrouted,
                    deliveries: Vec::new(),
                },
            ))
        })
        .optional()?;
    let Some((seq, mut record)) = found else { return Ok(None) };
    let mut deliveries: Vec<DeliveryRecord> = connection
        .prepare_cached(
            "SELECT seq, plugin, status, attempts, last_error, due_ms, sha256 FROM deliveries WHERE event_seq = ?1
             ORDER BY plugin",
        )?
        .query_map([seq], |row| {
            Ok(DeliveryRecord {
                delivery: row.get(0)?,
                plugin: row.get(1)?,
                status: DeliveryStatus::parse(&row.get::<_, String>(2)?),
                attempts: row.get(3)?,
                last_error: row.get(4)?,
                next_attempt_ms: row.get::<_, Option<i64>>(5)?.map(from_sql_ms),
                errors: Vec::new(),
                sha256: row.get(6)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for delivery in &mut deliveries {
        delivery.errors = read_errors(connection, delivery.delivery)?;
    }
    record.status = EventStatus::of(&deliveries);
    record.deliveries = deliveries;
    Ok(Some(record))
}

fn read_errors(connection: &Connection, delivery: i64) -> rusqlite::Result<Vec<AttemptError>> {
    connection
        .prepare_cached("SELECT attempt, time_ms, error FROM delivery_errors WHERE delivery_seq = ?1 ORDER BY rowid")?
        .query_map([delivery], |row| {
            Ok(AttemptError { attempt: row.get(0)?, time_ms: from_sql_ms(row.get(1)?), error: row.get(2)? })
        })?
        .collect()
}

const DEAD_LETTER_COLUMNS: &str =
    "d.seq, e.id, e.source, e.event_type, d.plugin, d.attempts, d.last_error, d.finished_ms, e.content_type, e.data";

fn dead_letter_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        delivery: row.get(0)?,
        event_id: row.get(1)?,
        source: row.get(2)?,
        event_type: row.get(3)?,
        plugin: row.get(4)?,
        attempts: row.get(5)?,
        last_error: row.get(6)?,
        died_ms: row.get::<_, Option<i64>>(7)?.map(from_sql_ms),
    })
}

fn read_dead_letter(connection: &Connection, delivery: i64) -> rusqlite::Result<Option<DeadLetterDetail>> {
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.seq = ?1 AND d.status = 'dead'"
    );
    let found = connection
        .prepare_cached(&sql)?
        .query_row([delivery], |row| Ok((dead_letter_row(row)?, row.get::<_, String>(8)?, row.get::<_, Vec<u8>>(9)?)))
        .optional()?;
    let Some((letter, content_type, data)) = found else { return Ok(None) };
    let errors = read_errors(connection, delivery)?;
    Ok(Some(DeadLetterDetail { letter, errors, content_type, data: Bytes::from(data) }))
}

fn read_dead_letters(connection: &Connection, plugin: Option<&str>, limit: usize) -> rusqlite::Result<Vec<DeadLetter>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.status = 'dead' AND (?1 IS NULL OR d.plugin = ?1)
         ORDER BY d.finished_ms DESC, d.seq DESC LIMIT ?2"
    );
    connection.prepare_cached(&sql)?.query_map(params![plugin, limit], dead_letter_row)?.collect()
}

fn read_replay_page(connection: &Connection, since_ms: u64, after: i64) -> rusqlite::Result<Vec<(i64, String)>> {
    let limit = i64::try_from(PAGE).unwrap_or(i64::MAX);
    connection
        .prepare_cached("SELECT seq, event_type FROM events WHERE time_ms >= ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?
        .query_map(params![sql_ms(since_ms), after, limit], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    const LEASE: Duration = Duration::from_secs(60);
    const NO_WAIT: Duration = Duration::ZERO;
    const START_MS: u64 = 1_800_000_000_000;

    fn event(source: &str, id: &str) -> Event {
        Event {
            id: id.into(),
            source: source.into(),
            event_type: "github.push".into(),
            time_ms: START_MS,
            content_type: "application/json".into(),
            data: Bytes::from_static(b"{}"),
            attributes: vec![("hook-id".into(), "7".into())],
        }
    }

    fn new(source: &str, id: &str, plugins: &[&str]) -> NewEvent {
        NewEvent {
            event: event(source, id),
            plugins: plugins.iter().map(|name| (*name).to_owned()).collect(),
            dedup_window: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_take_whose_last_read_fails_still_hands_out_what_the_queues_gave() {
        let given = |id: &str, delivery| Lease {
            delivery,
            plugin: "echo".into(),
            attempt: 1,
            event: Arc::new(event("github", id)),
        };
        let failed = || Err(JournalError::Storage("disk gone".into()));
        let kept = keep_given(vec![given("a", 1), given("b", 2)], failed()).expect("the given leases stand");
        assert_eq!(kept.iter().map(|lease| lease.delivery).collect::<Vec<_>>(), [1, 2]);
        assert!(
            matches!(keep_given(Vec::new(), failed()), Err(JournalError::Storage(_))),
            "nothing to hand out: the error"
        );
        let both = keep_given(vec![given("a", 1)], Ok(vec![given("c", 3)])).expect("ok");
        assert_eq!(both.iter().map(|lease| lease.delivery).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn acceptances_operator_changes_and_readiness_wait_for_the_disk_leases_and_outcomes_do_not() {
        let accept = Write::Accept { new: new("github", "a", &["echo"]), reply: oneshot::channel().0 };
        let purge = Write::PurgeDead { selector: DeadSelector::All, reply: oneshot::channel().0 };
        let take = Write::Take { plugins: Vec::new(), max: 1, lease_ms: 1, reply: oneshot::channel().0 };
        let finish = Write::Finish {
            delivery: 1,
            attempt: 1,
            outcome: Outcome::Done,
            sha256: String::new(),
            emitted: Vec::new(),
            reply: oneshot::channel().0,
        };
        let ping = Write::Ping { reply: oneshot::channel().0 };
        assert!(accept.must_reach_disk() && purge.must_reach_disk());
        assert!(ping.must_reach_disk(), "a ping answered before the sync would report a failed disk ready");
        assert!(!take.must_reach_disk() && !finish.must_reach_disk());
    }

    #[test]
    fn a_failing_write_is_answered_with_its_error_and_the_rest_of_its_group_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut connection = Connection::open(dir.path().join(FILE_NAME)).expect("open");
        migrate(&mut connection, dir.path()).expect("schema");
        connection
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.id = 'poison'
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
            .expect("trigger");
        let tracked =
            Mutex::new(Tracked { counts: Counts::default(), leases: Leases::default(), ready: Ready::default() });
        let mut answers = Vec::new();
        let batch: Vec<Write> = ["a", "poison", "b"]
            .into_iter()
            .map(|id| {
                let (reply, answer) = oneshot::channel();
                answers.push(answer);
                Write::Accept { new: new("github", id, &["echo"]), reply }
            })
            .collect();
        let now = Now { wall_ms: START_MS, elapsed_ms: START_MS };
        commit_batch(&mut connection, batch.into_iter(), now, &tracked, &Notify::new(), None);
        let results: Vec<_> = answers.into_iter().map(|mut answer| answer.try_recv().expect("answered")).collect();
        assert!(matches!(results[0], Ok(Accepted::New)) && matches!(results[2], Ok(Accepted::New)), "{results:?}");
        assert!(results[1].as_ref().is_err_and(|err| err.to_string().contains("poisoned")), "{results:?}");
        let stored: Vec<String> = connection
            .prepare("SELECT id FROM events ORDER BY seq")
            .and_then(|mut select| select.query_map([], |row| row.get(0))?.collect())
            .expect("read");
        assert_eq!(stored, ["a", "b"]);
        let deliveries: i64 =
            connection.query_row("SELECT COUNT(*) FROM deliveries", [], |row| row.get(0)).expect("count");
        assert_eq!(deliveries, 2, "nothing of the poisoned write is left");
        assert_eq!(lock(&tracked).counts.unfinished(), 2, "only committed writes are counted");
    }

    #[test]
    fn after_a_failed_sync_of_the_log_acceptances_are_refused_before_they_are_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let mut connection = Connection::open(&path).expect("open");
        connection.pragma_update(None, "journal_mode", "WAL").expect("wal");
        migrate(&mut connection, &path).expect("schema");
        // A pipe cannot be synced: fdatasync fails with EINVAL.
        let (unsyncable, _writer) = std::io::pipe().expect("pipe");
        let syncer = syncer_of(std::fs::File::from(std::os::fd::OwnedFd::from(unsyncable))).expect("syncer");
        let database = Arc::new(std::fs::File::open(&path).expect("database file"));
        let checkpointer =
            Checkpointer::start(Connection::open(&path).expect("open"), Arc::clone(&database)).expect("checkpointer");
        let tracked = Arc::new(Mutex::new(Tracked {
            counts: Counts::default(),
            leases: Leases::default(),
            ready: Ready::default(),
        }));
        let (writes, queue) = mpsc::channel(8);
        let writer = {
            let tracked = Arc::clone(&tracked);
            std::thread::spawn(move || {
                let clock = ManualClock::at(START_MS);
                write_loop(connection, queue, &clock, Some(&syncer), &checkpointer, &tracked, &Notify::new());
            })
        };
        let accept = |id: &str| {
            let (reply, answer) = oneshot::channel();
            writes.blocking_send(Write::Accept { new: new("github", id, &["echo"]), reply }).expect("queued");
            answer.blocking_recv().expect("answered")
        };
        let first = accept("a");
        assert!(first.as_ref().is_err_and(|err| err.to_string().contains("cannot sync")), "{first:?}");
        let second = accept("b");
        assert!(second.as_ref().is_err_and(|err| err.to_string().contains("log could not be synced")), "{second:?}");
        drop(writes);
        writer.join().expect("the writer ends");
        let stored: Vec<String> = Connection::open(&path)
            .and_then(|reader| reader.prepare("SELECT id FROM events")?.query_map([], |row| row.get(0))?.collect())
            .expect("read");
        assert_eq!(stored, ["a"], "the event after the failure was never committed");
        assert_eq!(lock(&tracked).counts.unfinished(), 1, "nor queued for a plugin");
    }

    fn wants(plugins: &[&str]) -> Vec<Want> {
        plugins
            .iter()
            .map(|name| Want {
                plugin: (*name).to_owned(),
                free: 10,
                subscriptions: Arc::from([]),
                lease: LEASE,
                since_ms: 0,
            })
            .collect()
    }

    struct Fixture {
        journal: SqliteJournal,
        clock: Arc<ManualClock>,
        _dir: tempfile::TempDir,
    }

    fn open(options: Options) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::at(START_MS));
        let journal =
            SqliteJournal::open_with_clock(dir.path(), options, Arc::clone(&clock) as Arc<dyn Clock>).expect("open");
        Fixture { journal, clock, _dir: dir }
    }

    impl Fixture {
        async fn take(&self, plugins: &[&str]) -> Vec<Lease> {
            self.journal.take(&wants(plugins), 10, NO_WAIT).await.expect("take")
        }

        async fn status(&self, id: &str) -> EventRecord {
            self.journal.event(id).await.expect("read").expect("event exists")
        }
    }

    #[tokio::test]
    async fn accepted_event_is_leased_once_per_plugin_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let journal = SqliteJournal::open(dir.path(), Options::default()).expect("open");
            assert_eq!(journal.accept(new("github", "a", &["echo", "push"])).await.expect("accept"), Accepted::New);
        }
        let journal = SqliteJournal::open(dir.path(), Options::default()).expect("reopen");
        let mut leases = journal.take(&wants(&["echo", "push"]), 10, NO_WAIT).await.expect("take");
        leases.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        assert_eq!(leases.len(), 2);
        assert_eq!((leases[0].plugin.as_str(), leases[0].attempt), ("echo", 1));
        assert_eq!(*leases[1].event, event("github", "a"));
        assert!(journal.take(&wants(&["echo", "push"]), 10, NO_WAIT).await.expect("take").is_empty());
    }

    #[tokio::test]
    async fn deliveries_cut_short_by_a_crash_are_due_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let journal = SqliteJournal::open(dir.path(), Options::default()).expect("open");
            journal.accept(new("github", "a", &["echo"])).await.expect("accept");
            let leased = journal.take(&wants(&["echo"]), 10, NO_WAIT).await.expect("take");
            assert_eq!(leased.len(), 1);
        }
        let journal = SqliteJournal::open(dir.path(), Options::default()).expect("reopen");
        let again = journal.take(&wants(&["echo"]), 10, NO_WAIT).await.expect("take");
        assert_eq!((again.len(), again[0].attempt), (1, 1), "due at once, as the same attempt");
    }

    #[tokio::test]
    async fn a_released_lease_is_due_again_without_counting_the_attempt() {
        let f = open(Options::default());
        f.journal.accept(new("github", "a", &["echo"])).await.expect("accept");
        let lease = f.take(&["echo"]).await.remove(0);
        f.journal.release(&lease).await.expect("release");
        let record = f.status("a").await;
        assert_eq!((record.deliveries[0].status, record.deliveries[0].attempts), (DeliveryStatus::Pending, 0));
        assert_eq!(f.take(&["echo"]).await[0].attempt, 1, "the same first attempt");
    }

    /// The tables of schema version 2, as wasmhook 0.1 wrote them before version 3.
    const SCHEMA_V2: &str = "
        CREATE TABLE events (seq INTEGER PRIMARY KEY, source TEXT NOT NULL, id TEXT NOT NULL,
            event_type TEXT NOT NULL, time_ms INTEGER NOT NULL, content_type TEXT NOT NULL,
            data BLOB NOT NULL, attributes TEXT NOT NULL);
        CREATE INDEX events_by_id ON events (id);
        CREATE INDEX events_by_time ON events (time_ms);
        CREATE TABLE dedup (source TEXT NOT NULL, id TEXT NOT NULL, expires_ms INTEGER NOT NULL,
            PRIMARY KEY (source, id)) WITHOUT ROWID;
        CREATE INDEX dedup_by_expiry ON dedup (expires_ms);
        CREATE TABLE deliveries (seq INTEGER PRIMARY KEY, event_seq INTEGER NOT NULL REFERENCES events (seq),
            plugin TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, due_ms INTEGER,
            last_error TEXT, finished_ms INTEGER, sha256 TEXT, UNIQUE (event_seq, plugin));
        CREATE INDEX deliveries_due ON deliveries (due_ms) WHERE due_ms IS NOT NULL;
        CREATE INDEX deliveries_dead ON deliveries (plugin, finished_ms) WHERE status = 'dead';
        CREATE TABLE delivery_errors (delivery_seq INTEGER NOT NULL REFERENCES deliveries (seq),
            attempt INTEGER NOT NULL, time_ms INTEGER NOT NULL, error TEXT NOT NULL);
        CREATE INDEX delivery_errors_by_delivery ON delivery_errors (delivery_seq);";

    #[tokio::test]
    async fn a_version_1_journal_is_migrated_and_an_unversioned_one_is_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let connection = Connection::open(dir.path().join(FILE_NAME)).expect("open");
            connection.execute_batch(&SCHEMA_V2.replace(" sha256 TEXT,", "")).expect("a version 1 schema");
            connection.pragma_update(None, "user_version", 1).expect("version 1");
        }
        let journal = SqliteJournal::open(dir.path(), Options::default()).expect("migrated");
        journal.accept(new("github", "a", &["echo"])).await.expect("accept");
        let lease = journal.take(&wants(&["echo"]), 1, NO_WAIT).await.expect("take").remove(0);
        journal.finish(&lease, Outcome::Done, "v2", Vec::new()).await.expect("finish with a version");
        assert_eq!(journal.event("a").await.expect("read").expect("found").deliveries[0].sha256.as_deref(), Some("v2"));
        assert_eq!(journal.accept(new("github", "a", &["echo"])).await.expect("accept"), Accepted::Duplicate);
        drop(journal);

        let old = tempfile::tempdir().expect("tempdir");
        Connection::open(old.path().join(FILE_NAME)).expect("open").execute_batch(SCHEMA).expect("tables, no version");
        let err = SqliteJournal::open(old.path(), Options::default()).expect_err("unversioned");
        assert!(err.to_string().contains("move it away"), "{err}");
    }

    #[tokio::test]
    async fn a_version_2_journal_keeps_its_live_dedup_keys_on_the_newest_event_with_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = i64::try_from(START_MS).expect("ms");
        let (live, lapsed) = (now + 3_600_000, now - 1);
        {
            let connection = Connection::open(dir.path().join(FILE_NAME)).expect("open");
            connection.execute_batch(SCHEMA_V2).expect("a version 2 schema");
            connection.pragma_update(None, "user_version", 2).expect("version 2");
            let mut insert = connection
                .prepare(
                    "INSERT INTO events (source, id, event_type, time_ms, content_type, data, attributes)
                     VALUES (?1, ?2, 'github.push', ?3, 'application/json', '{}', '[]')",
                )
                .expect("insert");
            let events = [
                ("github", "again"),
                ("github", "live"),
                ("github", "again"),
                ("github", "lapsed"),
                ("gitlab", "live"),
            ];
            for (source, id) in events {
                insert.execute(params![source, id, now]).expect("event");
            }
            let mut key =
                connection.prepare("INSERT INTO dedup (source, id, expires_ms) VALUES (?1, ?2, ?3)").expect("key");
            for (id, expires) in [("again", live), ("live", live), ("lapsed", lapsed), ("gone", live)] {
                key.execute(params!["github", id, expires]).expect("key");
            }
        }
        let clock = Arc::new(ManualClock::at(START_MS));
        let journal = SqliteJournal::open_with_clock(dir.path(), Options::default(), clock).expect("migrated");
        let rows: Vec<(i64, String, String, i64)> = journal
            .read(|c| {
                c.prepare("SELECT seq, source, id, dedup_until_ms FROM events ORDER BY seq")?
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?
                    .collect()
            })
            .await
            .expect("rows");
        let row = |seq, source: &str, id: &str, until| (seq, source.to_owned(), id.to_owned(), until);
        assert_eq!(
            rows,
            [
                row(1, "github", "again", 0),
                row(2, "github", "live", live),
                row(3, "github", "again", live),
                row(4, "github", "lapsed", lapsed),
                row(5, "gitlab", "live", 0),
            ],
            "each key on the newest event with its source and id"
        );
        let accept = |source: &str, id: &str| journal.accept(new(source, id, &[]));
        assert_eq!(accept("github", "live").await.expect("accept"), Accepted::Duplicate);
        assert_eq!(accept("github", "again").await.expect("accept"), Accepted::Duplicate);
        assert_eq!(accept("gitlab", "live").await.expect("accept"), Accepted::New, "that event had no key");
        assert_eq!(accept("github", "lapsed").await.expect("accept"), Accepted::New);
        assert_eq!(
            accept("github", "gone").await.expect("accept"),
            Accepted::New,
            "a key without its event is forgotten"
        );
        let version: i64 =
            journal.read(|c| c.pragma_query_value(None, "user_version", |row| row.get(0))).await.expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_second_journal_on_the_same_folder_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = SqliteJournal::open(dir.path(), Options::default()).expect("open");
        let err = SqliteJournal::open(dir.path(), Options::default()).expect_err("locked");
        assert!(err.to_string().contains("another wasmhook"), "{err}");
    }

    #[tokio::test]
    async fn duplicates_are_refused_within_the_window_and_accepted_after_it() {
        let f = open(Options::default());
        assert_eq!(f.journal.accept(new("github", "a", &["echo"])).await.expect("accept"), Accepted::New);
        assert_eq!(f.journal.accept(new("github", "a", &["echo"])).await.expect("accept"), Accepted::Duplicate);
        assert_eq!(f.journal.accept(new("gitlab", "a", &["echo"])).await.expect("accept"), Accepted::New);
        f.clock.advance(60_000);
        assert_eq!(f.journal.accept(new("github", "a", &["echo"])).await.expect("accept"), Accepted::New);
    }

    #[tokio::test]
    async fn two_producers_events_with_the_same_id_are_two_events_and_each_is_deduplicated() {
        let f = open(Options::default());
        let from = |producer: &str| {
            let mut cloud = new("ce", "1", &["echo"]);
            cloud.event.attributes = vec![("subject".into(), "x".into()), ("source".into(), producer.into())];
            cloud
        };
        assert_eq!(f.journal.accept(from("/a")).await.expect("accept"), Accepted::New);
        assert_eq!(f.journal.accept(from("/b")).await.expect("accept"), Accepted::New, "another producer");
        assert_eq!(f.journal.accept(from("/a")).await.expect("accept"), Accepted::Duplicate);
        assert_eq!(f.journal.accept(from("/b")).await.expect("accept"), Accepted::Duplicate);
        assert_eq!(
            f.journal.accept(new("ce", "1", &["echo"])).await.expect("accept"),
            Accepted::New,
            "no producer is a producer of its own"
        );
        assert_eq!(f.journal.accept(new("ce", "1", &["echo"])).await.expect("accept"), Accepted::Duplicate);
        f.clock.advance(60_000);
        assert_eq!(f.journal.accept(from("/b")).await.expect("accept"), Accepted::New, "after the window");
    }
    #[tokio::test]
    async fn old_handled_events_are_purged_once_their_dedup_window_ends_but_dead_letters_stay() {
        let f = open(Options { retention: Duration::from_secs(3600), ..Options::default() });
        f.journal.accept(new("github", "done", &["echo"])).await.expect("accept");
        f.journal.accept(new("github", "dead", &["echo"])).await.expect("accept");
        f.journal.accept(new("github", "unrouted", &[])).await.expect("accept");
        let long_window = |id| NewEvent { dedup_window: Duration::from_secs(7200), ..new("github", id, &[]) };
        f.journal.accept(long_window("kept")).await.expect("accept");
        for lease in f.take(&["echo"]).await {
            let outcome = if lease.event.id == "done" { Outcome::Done } else { Outcome::Dead { error: "no".into() } };
            f.journal.finish(&lease, outcome, "v1", Vec::new()).await.expect("finish");
        }
        assert_eq!(f.journal.expire().await.expect("expire"), Expired::default(), "nothing is old yet");
        f.clock.advance(3_600_001);
        assert_eq!(f.journal.expire().await.expect("expire"), Expired { events: 2 });
        assert!(f.journal.event("done").await.expect("read").is_none());
        assert!(f.journal.event("unrouted").await.expect("read").is_none());
        assert_eq!(f.status("dead").await.status, EventStatus::Dead);
        assert_eq!(
            f.journal.accept(long_window("kept")).await.expect("accept"),
            Accepted::Duplicate,
            "an event past the retention stays while its key is within its window"
        );
        f.clock.advance(3_600_000);
        assert_eq!(f.journal.expire().await.expect("expire"), Expired { events: 1 });
        assert_eq!(f.journal.accept(long_window("kept")).await.expect("accept"), Accepted::New);
    }

    #[tokio::test]
    async fn expiry_goes_on_past_a_page_and_past_what_must_stay() {
        let f = open(Options { retention: Duration::from_secs(3600), ..Options::default() });
        f.journal.accept(new("github", "dead", &["echo"])).await.expect("accept");
        let lease = f.take(&["echo"]).await.remove(0);
        f.journal.finish(&lease, Outcome::Dead { error: "no".into() }, "v1", Vec::new()).await.expect("finish");
        // More than one round a minute used to remove (10 000), and more than one write does.
        let ids: Vec<String> = (0..PAGE * 10 + 5).map(|n| format!("old-{n}")).collect();
        for chunk in ids.chunks(500) {
            let accepts = chunk.iter().map(|id| f.journal.accept(new("github", id, &[])));
            assert!(futures_util::future::join_all(accepts).await.iter().all(|a| matches!(a, Ok(Accepted::New))));
        }
        f.clock.advance(3_600_001);
        assert_eq!(f.journal.expire().await.expect("expire"), Expired { events: ids.len() as u64 }, "every page");
        assert_eq!(f.journal.expire().await.expect("expire"), Expired::default());
        assert_eq!(f.status("dead").await.status, EventStatus::Dead, "a dead letter stays");
        assert_eq!(f.journal.stats().await.expect("stats").events, 1);
    }

    #[tokio::test]
    async fn a_retry_waits_for_its_delay_and_records_each_error() {
        let f = open(Options::default());
        f.journal.accept(new("github", "a", &["echo"])).await.expect("accept");
        let first = f.take(&["echo"]).await.remove(0);
        let retry = Outcome::Retry { error: "retry: busy".into(), delay: Duration::from_secs(30) };
        assert!(f.journal.finish(&first, retry, "v1", Vec::new()).await.expect("finish"));
        let record = f.status("a").await;
        assert_eq!(record.deliveries[0].status, DeliveryStatus::Retrying);
        assert_eq!(record.deliveries[0].next_attempt_ms, Some(START_MS + 30_000));
        assert!(f.take(&["echo"]).await.is_empty(), "not due yet");
        f.clock.advance(30_000);
        let second = f.take(&["echo"]).await.remove(0);
        assert_eq!(second.attempt, 2);
        f.journal
            .finish(&second, Outcome::Dead { error: "permanent: bad".into() }, "v1", Vec::new())
            .await
            .expect("finish");
        let record = f.status("a").await;
        let errors: Vec<_> = record.deliveries[0].errors.iter().map(|e| (e.attempt, e.error.as_str())).collect();
        assert_eq!(errors, [(1, "retry: busy"), (2, "permanent: bad")]);
        assert_eq!(record.status, EventStatus::Dead);
    }

    #[tokio::test]
    async fn a_jump_of_the_wall_clock_does_not_end_a_running_lease() {
        let f = open(Options::default());
        f.journal.accept(new("github", "a", &["echo"])).await.expect("accept");
        let first = f.take(&["echo"]).await.remove(0);
        let jump = 10 * LEASE.as_millis() as u64;
        f.clock.jump_wall(jump);
        assert!(f.take(&["echo"]).await.is_empty(), "the delivery still runs: no second lease");
        let running = &f.status("a").await.deliveries[0];
        assert_eq!(running.status, DeliveryStatus::Running);
        let lease_end = START_MS + LEASE.as_millis() as u64 + jump;
        assert_eq!(running.next_attempt_ms, Some(lease_end), "the lease's end as the wall clock now reads");
        assert!(f.journal.finish(&first, Outcome::Done, "v1", Vec::new()).await.expect("finish"), "its outcome counts");
        assert_eq!(f.status("a").await.deliveries[0].status, DeliveryStatus::Done);
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_again_and_the_stale_result_is_dropped() {
        let f = open(Options::default());
        f.journal.accept(new("github", "a", &["echo"])).await.expect("accept");
        let first = f.take(&["echo"]).await.remove(0);
        assert!(f.take(&["echo"]).await.is_empty(), "still leased");
        f.clock.advance(LEASE.as_millis() as u64);
        let second = f.take(&["echo"]).await.remove(0);
        assert_eq!(second.attempt, 2);
        let emitted = vec![new("plugin.echo", "child", &["echo"])];
        assert!(!f.journal.finish(&first, Outcome::Done, "v1", emitted).await.expect("finish"), "stale lease");
        assert!(f.journal.event("child").await.expect("read").is_none(), "a stale attempt emits nothing");
        assert_eq!(f.status("a").await.deliveries[0].status, DeliveryStatus::Running);
        assert!(f.journal.finish(&second, Outcome::Done, "v1", Vec::new()).await.expect("finish"));
        assert_eq!(f.status("a").await.status, EventStatus::Done);
    }

    #[tokio::test]
    async fn finishing_commits_emitted_events_with_their_deliveries() {
        let f = open(Options::default());
        f.journal.accept(new("github", "a", &["echo"])).await.expect("accept");
        let lease = f.take(&["echo"]).await.remove(0);
        let alert = new("wasmhook", "alert-1", &["notify"]);
        f.journal.finish(&lease, Outcome::Dead { error: "gone".into() }, "v1", vec![alert]).await.expect("finish");
        assert_eq!(f.take(&["notify"]).await[0].event.id, "alert-1");
    }

    #[tokio::test]
    async fn dead_letters_are_listed_replayed_with_a_fresh_budget_and_purged() {
        let f = open(Options::default());
        for id in ["a", "b", "c"] {
            f.journal.accept(new("github", id, &["echo", "push"])).await.expect("accept");
        }
        for lease in f.take(&["echo", "push"]).await {
            let outcome = if lease.event.id == "c" { Outcome::Done } else { Outcome::Dead { error: "x".into() } };
            f.journal.finish(&lease, outcome, "v1", Vec::new()).await.expect("finish");
        }
        assert_eq!(f.journal.dead_letters(None, 10).await.expect("list").len(), 4);
        let echo = f.journal.dead_letters(Some("echo"), 10).await.expect("list");
        assert_eq!(echo.len(), 2);
        let detail = f.journal.dead_letter(echo[0].delivery).await.expect("read").expect("dead");
        assert_eq!((detail.errors.len(), &detail.data[..]), (1, &b"{}"[..]));
        assert_eq!(f.journal.replay_dead(DeadSelector::Ids(vec![echo[0].delivery])).await.expect("replay"), 1);
        assert!(f.journal.dead_letter(echo[0].delivery).await.expect("read").is_none(), "no longer dead");
        let again = f.take(&["echo"]).await;
        assert_eq!((again.len(), again[0].attempt), (1, 1));
        assert_eq!(f.journal.replay_dead(DeadSelector::Plugin("push".into())).await.expect("replay"), 2);
        assert_eq!(f.journal.purge_dead(DeadSelector::All).await.expect("purge"), 1);
        assert!(f.journal.dead_letters(None, 10).await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn replay_delivers_stored_events_again_including_unrouted_ones() {
        let f = open(Options::default());
        f.journal.accept(new("github", "old", &[])).await.expect("accept");
        f.journal.accept(new("github", "handled", &["echo"])).await.expect("accept");
        let lease = f.take(&["echo"]).await.remove(0);
        f.journal.finish(&lease, Outcome::Done, "v1", Vec::new()).await.expect("finish");
        let route = |event_type: &str| if event_type == "github.push" { vec!["echo".to_owned()] } else { Vec::new() };
        assert_eq!(f.journal.replay(START_MS, &route).await.expect("replay"), 2);
        assert_eq!(f.take(&["echo"]).await.len(), 2);
        assert_eq!(f.journal.replay(START_MS + 1, &route).await.expect("replay"), 0, "nothing that recent");
    }

    #[tokio::test]
    async fn accept_refuses_once_unfinished_deliveries_reach_the_cap() {
        let f = open(Options { max_pending: 2, ..Options::default() });
        f.journal.accept(new("github", "a", &["echo", "push"])).await.expect("accept");
        assert!(matches!(
            f.journal.accept(new("github", "b", &["echo"])).await,
            Err(JournalError::Full { pending: 2, max: 2 })
        ));
        for lease in f.take(&["echo", "push"]).await {
            f.journal.finish(&lease, Outcome::Done, "v1", Vec::new()).await.expect("finish");
        }
        assert_eq!(f.journal.accept(new("github", "b", &["echo"])).await.expect("accept"), Accepted::New);
        let stats = f.journal.stats().await.expect("stats");
        assert_eq!((stats.events, stats.done, stats.pending, stats.max_pending), (2, 2, 1, 2));
        f.journal.ping().await.expect("writable");
    }

    /// One step of the sequences the counting property runs.
    #[derive(Debug, Clone)]
    enum Step {
        Accept { id: u8, plugins: u8 },
        Take { plugins: u8 },
        Finish { lease: usize, outcome: u8, emit: bool },
        Release { lease: usize },
        Advance { seconds: u32 },
        ReplayDead { all: bool },
        PurgeDead { all: bool },
        Replay,
        Expire,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..12_u8, 0..4_u8).prop_map(|(id, plugins)| Step::Accept { id, plugins }),
            3 => (1..4_u8).prop_map(|plugins| Step::Take { plugins }),
            3 => (0..8_usize, 0..3_u8, any::<bool>()).prop_map(|(lease, outcome, emit)| Step::Finish { lease, outcome, emit }),
            1 => (0..8_usize).prop_map(|lease| Step::Release { lease }),
            1 => prop_oneof![Just(1_u32), Just(61), Just(4000)].prop_map(|seconds| Step::Advance { seconds }),
            1 => any::<bool>().prop_map(|all| Step::ReplayDead { all }),
            1 => any::<bool>().prop_map(|all| Step::PurgeDead { all }),
            1 => Just(Step::Replay),
            1 => Just(Step::Expire),
        ]
    }

    /// Takes the `index`th lease from `held`, with any older copy of it: a lease is known by
    /// its delivery and attempt, and a replay restarts a delivery's attempts.
    fn settle(held: &mut Vec<Lease>, index: usize) -> Lease {
        let lease = held.remove(index % held.len());
        held.retain(|other| (other.delivery, other.attempt) != (lease.delivery, lease.attempt));
        lease
    }

    fn named(mask: u8) -> Vec<&'static str> {
        [(1, "a"), (2, "b")].into_iter().filter(|(bit, _)| mask & bit != 0).map(|(_, name)| name).collect()
    }

    impl Fixture {
        /// The counts the writer kept, and the same counted afresh from the tables.
        fn kept_and_recounted(&self) -> (Stats, Stats) {
            let recounted = Counts::load(&lock(&self.journal.reader)).expect("recount").stored();
            (lock(&self.journal.tracked).counts.stored(), recounted)
        }

        async fn run(&self, step: Step, held: &mut Vec<Lease>, n: &mut u32) {
            let retention = Options::default().retention;
            match step {
                Step::Accept { id, plugins } => {
                    self.journal.accept(new("github", &id.to_string(), &named(plugins))).await.expect("accept");
                }
                Step::Take { plugins } => held.extend(self.take(&named(plugins)).await),
                Step::Finish { lease, outcome, emit } if !held.is_empty() => {
                    let lease = settle(held, lease);
                    let outcome = match outcome {
                        0 => Outcome::Done,
                        1 => Outcome::Retry { error: "busy".into(), delay: Duration::from_secs(30) },
                        _ => Outcome::Dead { error: "no".into() },
                    };
                    *n += 1;
                    let emitted = if emit { vec![new("plugin.a", &format!("child-{n}"), &["b"])] } else { Vec::new() };
                    self.journal.finish(&lease, outcome, "v1", emitted).await.expect("finish");
                }
                Step::Release { lease } if !held.is_empty() => {
                    self.journal.release(&settle(held, lease)).await.expect("release");
                }
                Step::Finish { .. } | Step::Release { .. } => {}
                Step::Advance { seconds } => self.clock.advance(u64::from(seconds) * 1000),
                Step::ReplayDead { all } => {
                    let selector = if all { DeadSelector::All } else { DeadSelector::Plugin("a".into()) };
                    self.journal.replay_dead(selector).await.expect("replay dead");
                }
                Step::PurgeDead { all } => {
                    let selector = if all { DeadSelector::All } else { DeadSelector::Plugin("b".into()) };
                    self.journal.purge_dead(selector).await.expect("purge");
                }
                Step::Replay => {
                    let route = |_: &str| vec!["a".to_owned()];
                    self.journal.replay(0, &route).await.expect("replay");
                }
                Step::Expire => {
                    self.clock.advance(millis(retention));
                    self.journal.expire().await.expect("expire");
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the writes, the counts the writer keeps equal a recount of the tables.
        #[test]
        fn the_counts_kept_while_writing_equal_a_recount(steps in proptest::collection::vec(step(), 1..60)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let f = open(Options::default());
                let (mut held, mut n, mut latest) = (Vec::new(), 0, std::collections::HashMap::new());
                let mut taken_at = std::collections::HashMap::new();
                for step in steps {
                    let shown = format!("{step:?}");
                    let before = if matches!(step, Step::Take { .. }) { held.len() } else { usize::MAX };
                    f.run(step, &mut held, &mut n).await;
                    let (kept, recounted) = f.kept_and_recounted();
                    assert_eq!(kept, recounted, "after {shown}");
                    // Running: the deliveries whose newest lease the test still holds, until it runs out.
                    let now = f.clock.now_ms();
                    for (i, lease) in held.iter().enumerate().skip(before) {
                        // From the file or from the queues, never one whose lease still runs.
                        let clash = held[..i].iter().find(|other| {
                            other.delivery == lease.delivery && taken_at[&(other.delivery, other.attempt)] + millis(LEASE) > now
                        });
                        assert!(clash.is_none(), "delivery {} leased twice after {shown}", lease.delivery);
                        latest.insert(lease.delivery, lease.attempt);
                        taken_at.insert((lease.delivery, lease.attempt), now);
                    }
                    let current: std::collections::HashSet<i64> = held
                        .iter()
                        .filter(|lease| latest.get(&lease.delivery) == Some(&lease.attempt))
                        .filter(|lease| taken_at[&(lease.delivery, lease.attempt)] + millis(LEASE) > now)
                        .map(|lease| lease.delivery)
                        .collect();
                    assert_eq!(f.journal.stats().await.expect("stats").running, current.len() as u64, "running after {shown}");
                }
            });
        }
    }
}
