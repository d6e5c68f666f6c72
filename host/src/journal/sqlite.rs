//! The embedded journal: one SQLite file in WAL mode in the data folder.
//!
//! One writer thread owns the write connection and runs every write that arrives while it is
//! busy in one transaction (group commit): an accepted event is on disk (`synchronous = FULL`)
//! before its caller hears back, yet a burst of requests shares one fsync. Reads for the admin
//! API use a second connection, which WAL lets run beside the writer.
//!
//! A delivery's `due_ms` is when it next needs attention: its first attempt, or the end of
//! its lease while it runs (a lease that runs out makes it due again). Finished deliveries
//! have no `due_ms`, which keeps the index of due work small.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{
    Accepted, DeliveryRecord, DeliveryStatus, EventRecord, EventStatus, Journal, JournalError,
    Lease, Outcome,
};
use crate::event::{Event, now_ms};

/// The journal's file name inside the data folder.
pub const FILE_NAME: &str = "journal.sqlite3";

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Writes waiting for the writer thread before callers wait to queue theirs.
const QUEUE_DEPTH: usize = 4096;
/// How often an idle `take` looks again, for leases that ran out.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long the read connection waits for a lock before failing.
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    time_ms      INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    data         BLOB    NOT NULL,
    attributes   TEXT    NOT NULL,
    UNIQUE (source, id)
);
CREATE INDEX IF NOT EXISTS events_by_id ON events (id);
CREATE TABLE IF NOT EXISTS deliveries (
    seq        INTEGER PRIMARY KEY,
    event_seq  INTEGER NOT NULL REFERENCES events (seq),
    plugin     TEXT    NOT NULL,
    status     TEXT    NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    due_ms     INTEGER,
    last_error TEXT,
    UNIQUE (event_seq, plugin)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due_ms) WHERE due_ms IS NOT NULL;
";

/// The embedded SQLite journal.
pub struct SqliteJournal {
    writes: mpsc::Sender<Write>,
    reader: Arc<Mutex<Connection>>,
    work: Notify,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SqliteJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteJournal").finish_non_exhaustive()
    }
}

type Reply<T> = oneshot::Sender<Result<T, JournalError>>;

/// A write for the writer thread, with where to send its result after the commit.
enum Write {
    Accept {
        event: Event,
        plugins: Vec<String>,
        reply: Reply<Accepted>,
    },
    Take {
        plugins: String,
        max: usize,
        lease_ms: u64,
        reply: Reply<Vec<Lease>>,
    },
    Finish {
        delivery: i64,
        attempt: u32,
        outcome: Outcome,
        reply: Reply<()>,
    },
}

/// A write's result, held until its transaction commits.
enum Done {
    Accept(Reply<Accepted>, Result<Accepted, JournalError>),
    Take(Reply<Vec<Lease>>, Result<Vec<Lease>, JournalError>),
    Finish(Reply<()>, Result<(), JournalError>),
}

impl Done {
    fn send(self, commit: &Result<(), JournalError>) {
        fn pick<T>(
            result: Result<T, JournalError>,
            commit: &Result<(), JournalError>,
        ) -> Result<T, JournalError> {
            match commit {
                Ok(()) => result,
                Err(err) => Err(JournalError::Storage(err.to_string())),
            }
        }
        // A caller that gave up waiting is no longer listening; that is fine.
        let _ = match self {
            Done::Accept(reply, result) => reply.send(pick(result, commit)).map_err(drop),
            Done::Take(reply, result) => reply.send(pick(result, commit)).map_err(drop),
            Done::Finish(reply, result) => reply.send(pick(result, commit)).map_err(drop),
        };
    }
}

/// SQLite stores integers as i64; times in ms since 1970 fit with room to spare.
fn sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn storage(err: rusqlite::Error) -> JournalError {
    JournalError::Storage(err.to_string())
}

impl SqliteJournal {
    /// Opens (creating if needed) the journal in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, JournalError> {
        std::fs::create_dir_all(data_dir).map_err(|err| {
            JournalError::Storage(format!(
                "cannot create data folder {}: {err}",
                data_dir.display()
            ))
        })?;
        let path: PathBuf = data_dir.join(FILE_NAME);
        let open_err = |err: rusqlite::Error| {
            JournalError::Storage(format!("cannot open {}: {err}", path.display()))
        };
        let writer = Connection::open(&path).map_err(open_err)?;
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| writer.pragma_update(None, "synchronous", "FULL"))
            .and_then(|()| writer.execute_batch(SCHEMA))
            .map_err(open_err)?;
        let reader = Connection::open(&path).map_err(open_err)?;
        reader.busy_timeout(READ_BUSY_TIMEOUT).map_err(open_err)?;

        let (writes, queue) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || write_loop(writer, queue))
            .map_err(|err| {
                JournalError::Storage(format!("cannot start the journal writer: {err}"))
            })?;
        Ok(SqliteJournal {
            writes,
            reader: Arc::new(Mutex::new(reader)),
            work: Notify::new(),
            writer: Some(thread),
        })
    }

    async fn call<T>(&self, write: impl FnOnce(Reply<T>) -> Write) -> Result<T, JournalError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(write(reply))
            .await
            .map_err(|_| JournalError::Closed)?;
        answer.await.map_err(|_| JournalError::Closed)?
    }
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
    async fn accept(&self, event: Event, plugins: Vec<String>) -> Result<Accepted, JournalError> {
        let routed = !plugins.is_empty();
        let accepted = self
            .call(|reply| Write::Accept {
                event,
                plugins,
                reply,
            })
            .await?;
        if routed && accepted == Accepted::New {
            self.work.notify_one();
        }
        Ok(accepted)
    }

    async fn take(
        &self,
        plugins: &[String],
        max: usize,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, JournalError> {
        let deadline = Instant::now() + wait;
        let names =
            serde_json::to_string(plugins).map_err(|err| JournalError::Storage(err.to_string()))?;
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        loop {
            if !plugins.is_empty() && max > 0 {
                let plugins = names.clone();
                let leases = self
                    .call(|reply| Write::Take {
                        plugins,
                        max,
                        lease_ms,
                        reply,
                    })
                    .await?;
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

    async fn finish(&self, lease: &Lease, outcome: Outcome) -> Result<(), JournalError> {
        let (delivery, attempt) = (lease.delivery, lease.attempt);
        self.call(|reply| Write::Finish {
            delivery,
            attempt,
            outcome,
            reply,
        })
        .await
    }

    async fn event(&self, id: &str) -> Result<Option<EventRecord>, JournalError> {
        let reader = Arc::clone(&self.reader);
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || {
            let connection = reader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            read_event(&connection, &id).map_err(storage)
        })
        .await
        .map_err(|err| JournalError::Storage(err.to_string()))?
    }
}

fn write_loop(mut connection: Connection, mut queue: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        commit_batch(&mut connection, batch.drain(..));
    }
}

/// Runs `batch` in one transaction, each write in its own savepoint so that one failing write
/// leaves no half of itself behind, then answers every caller after the commit.
fn commit_batch(connection: &mut Connection, batch: impl Iterator<Item = Write>) {
    let now = now_ms();
    let mut done = Vec::new();
    let commit = match connection.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(mut tx) => {
            for write in batch {
                done.push(match write {
                    Write::Accept {
                        event,
                        plugins,
                        reply,
                    } => Done::Accept(reply, accept(&mut tx, &event, &plugins, now)),
                    Write::Take {
                        plugins,
                        max,
                        lease_ms,
                        reply,
                    } => Done::Take(
                        reply,
                        take(&mut tx, &plugins, max, now, now.saturating_add(lease_ms)),
                    ),
                    Write::Finish {
                        delivery,
                        attempt,
                        outcome,
                        reply,
                    } => Done::Finish(reply, finish(&mut tx, delivery, attempt, &outcome)),
                });
            }
            tx.commit().map_err(storage)
        }
        Err(err) => {
            let err = storage(err);
            for write in batch {
                done.push(match write {
                    Write::Accept { reply, .. } => Done::Accept(reply, Err(JournalError::Closed)),
                    Write::Take { reply, .. } => Done::Take(reply, Ok(Vec::new())),
                    Write::Finish { reply, .. } => Done::Finish(reply, Ok(())),
                });
            }
            Err(err)
        }
    };
    if let Err(err) = &commit {
        tracing::error!(error = %err, writes = done.len(), "journal commit failed");
    }
    for reply in done {
        reply.send(&commit);
    }
}

fn accept(
    tx: &mut Transaction<'_>,
    event: &Event,
    plugins: &[String],
    now: u64,
) -> Result<Accepted, JournalError> {
    let savepoint = tx.savepoint().map_err(storage)?;
    let attributes = serde_json::to_string(&event.attributes)
        .map_err(|err| JournalError::Storage(err.to_string()))?;
    let inserted = savepoint
        .prepare_cached(
            "INSERT INTO events (source, id, event_type, time_ms, content_type, data, attributes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (source, id) DO NOTHING",
        )
        .and_then(|mut insert| {
            insert.execute(params![
                event.source,
                event.id,
                event.event_type,
                sql_ms(event.time_ms),
                event.content_type,
                &event.data[..],
                attributes
            ])
        })
        .map_err(storage)?;
    if inserted == 0 {
        return Ok(Accepted::Duplicate);
    }
    let event_seq = savepoint.last_insert_rowid();
    {
        let mut insert = savepoint
            .prepare_cached("INSERT INTO deliveries (event_seq, plugin, status, due_ms) VALUES (?1, ?2, 'pending', ?3)")
            .map_err(storage)?;
        for plugin in plugins {
            insert
                .execute(params![event_seq, plugin, sql_ms(now)])
                .map_err(storage)?;
        }
    }
    savepoint.commit().map_err(storage)?;
    Ok(Accepted::New)
}

fn take(
    tx: &mut Transaction<'_>,
    plugins: &str,
    max: usize,
    now: u64,
    lease_until: u64,
) -> Result<Vec<Lease>, JournalError> {
    let savepoint = tx.savepoint().map_err(storage)?;
    let mut leases = Vec::new();
    {
        let mut select = savepoint
            .prepare_cached(
                "SELECT d.seq, d.plugin, d.attempts, e.source, e.id, e.event_type, e.time_ms,
                        e.content_type, e.data, e.attributes
                 FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.due_ms <= ?1 AND d.plugin IN (SELECT value FROM json_each(?2))
                 ORDER BY d.due_ms LIMIT ?3",
            )
            .map_err(storage)?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let mut rows = select
            .query(params![sql_ms(now), plugins, limit])
            .map_err(storage)?;
        while let Some(row) = rows.next().map_err(storage)? {
            let attributes: String = row.get(9).map_err(storage)?;
            let previous_attempts: u32 = row.get(2).map_err(storage)?;
            leases.push(Lease {
                delivery: row.get(0).map_err(storage)?,
                plugin: row.get(1).map_err(storage)?,
                attempt: previous_attempts + 1,
                event: Arc::new(Event {
                    source: row.get(3).map_err(storage)?,
                    id: row.get(4).map_err(storage)?,
                    event_type: row.get(5).map_err(storage)?,
                    time_ms: u64::try_from(row.get::<_, i64>(6).map_err(storage)?).unwrap_or(0),
                    content_type: row.get(7).map_err(storage)?,
                    data: Bytes::from(row.get::<_, Vec<u8>>(8).map_err(storage)?),
                    attributes: serde_json::from_str(&attributes)
                        .map_err(|err| JournalError::Storage(err.to_string()))?,
                }),
            });
        }
    }
    {
        let mut lease = savepoint
            .prepare_cached("UPDATE deliveries SET status = 'running', attempts = attempts + 1, due_ms = ?2 WHERE seq = ?1")
            .map_err(storage)?;
        for taken in &leases {
            lease
                .execute(params![taken.delivery, sql_ms(lease_until)])
                .map_err(storage)?;
        }
    }
    savepoint.commit().map_err(storage)?;
    Ok(leases)
}

fn finish(
    tx: &mut Transaction<'_>,
    delivery: i64,
    attempt: u32,
    outcome: &Outcome,
) -> Result<(), JournalError> {
    let (status, error) = match outcome {
        Outcome::Done => ("done", None),
        Outcome::Dead { error } => ("dead", Some(error.as_str())),
    };
    let settled = tx
        .prepare_cached(
            "UPDATE deliveries SET status = ?3, due_ms = NULL, last_error = ?4
             WHERE seq = ?1 AND attempts = ?2 AND status = 'running'",
        )
        .and_then(|mut update| update.execute(params![delivery, attempt, status, error]))
        .map_err(storage)?;
    if settled == 0 {
        tracing::warn!(
            delivery,
            attempt,
            "lease ran out before the attempt finished; its result is dropped"
        );
    }
    Ok(())
}

fn read_event(connection: &Connection, id: &str) -> rusqlite::Result<Option<EventRecord>> {
    let found = connection
        .prepare_cached("SELECT seq, source, id, event_type, time_ms FROM events WHERE id = ?1 ORDER BY seq DESC LIMIT 1")?
        .query_row([id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                EventRecord {
                    source: row.get(1)?,
                    id: row.get(2)?,
                    event_type: row.get(3)?,
                    time_ms: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
                    status: EventStatus::Unrouted,
                    deliveries: Vec::new(),
                },
            ))
        })
        .optional()?;
    let Some((seq, mut record)) = found else {
        return Ok(None);
    };
    let mut select = connection
        .prepare_cached("SELECT plugin, status, attempts, last_error FROM deliveries WHERE event_seq = ?1 ORDER BY plugin")?;
    record.deliveries = select
        .query_map([seq], |row| {
            Ok(DeliveryRecord {
                plugin: row.get(0)?,
                status: parse_status(&row.get::<_, String>(1)?),
                attempts: row.get(2)?,
                last_error: row.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    record.status = EventStatus::of(&record.deliveries);
    Ok(Some(record))
}

fn parse_status(text: &str) -> DeliveryStatus {
    match text {
        "running" => DeliveryStatus::Running,
        "done" => DeliveryStatus::Done,
        "retrying" => DeliveryStatus::Retrying,
        "dead" => DeliveryStatus::Dead,
        _ => DeliveryStatus::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source: &str, id: &str) -> Event {
        Event {
            id: id.into(),
            source: source.into(),
            event_type: "github.push".into(),
            time_ms: 1,
            content_type: "application/json".into(),
            data: Bytes::from_static(b"{}"),
            attributes: vec![("hook-id".into(), "7".into())],
        }
    }

    fn plugins(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    const LEASE: Duration = Duration::from_secs(60);
    const NO_WAIT: Duration = Duration::ZERO;

    #[tokio::test]
    async fn accepted_event_is_leased_once_per_plugin_and_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let journal = SqliteJournal::open(dir.path()).expect("open");
            assert_eq!(
                journal
                    .accept(event("github", "a"), plugins(&["echo", "push"]))
                    .await
                    .expect("accept"),
                Accepted::New
            );
        }
        let journal = SqliteJournal::open(dir.path()).expect("reopen");
        let mut leases = journal
            .take(&plugins(&["echo", "push"]), 10, LEASE, NO_WAIT)
            .await
            .expect("take");
        leases.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        assert_eq!(leases.len(), 2);
        assert_eq!((leases[0].plugin.as_str(), leases[0].attempt), ("echo", 1));
        assert_eq!(*leases[1].event, event("github", "a"));
        assert!(
            journal
                .take(&plugins(&["echo", "push"]), 10, LEASE, NO_WAIT)
                .await
                .expect("take")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn repeated_source_and_id_is_a_duplicate_but_another_source_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = SqliteJournal::open(dir.path()).expect("open");
        assert_eq!(
            journal
                .accept(event("github", "a"), plugins(&["echo"]))
                .await
                .expect("accept"),
            Accepted::New
        );
        assert_eq!(
            journal
                .accept(event("github", "a"), plugins(&["echo"]))
                .await
                .expect("accept"),
            Accepted::Duplicate
        );
        assert_eq!(
            journal
                .accept(event("gitlab", "a"), plugins(&["echo"]))
                .await
                .expect("accept"),
            Accepted::New
        );
    }

    #[tokio::test]
    async fn finish_records_the_outcome_and_the_event_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = SqliteJournal::open(dir.path()).expect("open");
        journal
            .accept(event("github", "a"), plugins(&["echo", "push"]))
            .await
            .expect("accept");
        for lease in journal
            .take(&plugins(&["echo", "push"]), 10, LEASE, NO_WAIT)
            .await
            .expect("take")
        {
            let outcome = if lease.plugin == "echo" {
                Outcome::Done
            } else {
                Outcome::Dead {
                    error: "permanent: bad".into(),
                }
            };
            journal.finish(&lease, outcome).await.expect("finish");
        }
        let record = journal.event("a").await.expect("read").expect("found");
        assert_eq!(record.status, EventStatus::Dead);
        assert_eq!(record.deliveries[0].status, DeliveryStatus::Done);
        assert_eq!(
            record.deliveries[1].last_error.as_deref(),
            Some("permanent: bad")
        );
        assert!(journal.event("missing").await.expect("read").is_none());
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_again_and_the_stale_result_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = SqliteJournal::open(dir.path()).expect("open");
        journal
            .accept(event("github", "a"), plugins(&["echo"]))
            .await
            .expect("accept");
        let first = journal
            .take(&plugins(&["echo"]), 1, Duration::ZERO, NO_WAIT)
            .await
            .expect("take")
            .remove(0);
        let second = journal
            .take(&plugins(&["echo"]), 1, LEASE, NO_WAIT)
            .await
            .expect("take")
            .remove(0);
        assert_eq!(second.attempt, 2);
        journal
            .finish(
                &first,
                Outcome::Dead {
                    error: "late".into(),
                },
            )
            .await
            .expect("finish");
        let record = journal.event("a").await.expect("read").expect("found");
        assert_eq!(record.deliveries[0].status, DeliveryStatus::Running);
        journal
            .finish(&second, Outcome::Done)
            .await
            .expect("finish");
        assert_eq!(
            journal
                .event("a")
                .await
                .expect("read")
                .expect("found")
                .status,
            EventStatus::Done
        );
    }

    #[tokio::test]
    async fn deliveries_of_unloaded_plugins_wait_and_unrouted_events_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = SqliteJournal::open(dir.path()).expect("open");
        journal
            .accept(event("github", "a"), plugins(&["gone"]))
            .await
            .expect("accept");
        journal
            .accept(event("github", "b"), Vec::new())
            .await
            .expect("accept");
        assert!(
            journal
                .take(&plugins(&["echo"]), 10, LEASE, NO_WAIT)
                .await
                .expect("take")
                .is_empty()
        );
        assert_eq!(
            journal
                .take(&plugins(&["gone"]), 10, LEASE, NO_WAIT)
                .await
                .expect("take")
                .len(),
            1
        );
        assert_eq!(
            journal
                .event("b")
                .await
                .expect("read")
                .expect("found")
                .status,
            EventStatus::Unrouted
        );
    }
}
