//! The dispatcher: leases due deliveries from the journal, runs each on its plugin in a
//! bounded pool of workers (and within the plugin's own concurrency), and settles it: done
//! (committing the events it emitted), retried after a backoff, or dead (with a
//! `wasmhook.dead_letter` event for anyone who subscribes). One log line per outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::event::{Event, now_ms};
use crate::journal::{DEFAULT_DEDUP_WINDOW, Journal, Lease, NewEvent, Outcome, Want};
use crate::metrics;
use crate::registry::{Plugin, Registry};
use crate::retry::RetryPolicy;
use crate::runtime::{CHAIN_DEPTH_ATTRIBUTE, CallError, Emitted, chain_depth};

/// The type of the event emitted when a delivery goes dead.
pub const DEAD_LETTER_TYPE: &str = "wasmhook.dead_letter";
/// The source of events the host itself emits.
pub const HOST_SOURCE: &str = "wasmhook";
/// How long one `take` waits for work before looking at the shutdown signal again.
const TAKE_WAIT: Duration = Duration::from_millis(200);
/// How long a `take` waits for work while some plugin is at its concurrency: the take cannot
/// see that plugin's calls end, so it looks again soon for the capacity they free.
const BUSY_TAKE_WAIT: Duration = Duration::from_millis(10);
/// Pause after the journal fails, before asking again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Deliveries between their lease and their recorded outcome, per worker. A call holds a
/// worker only while it runs, so this bounds the outcomes waiting for a slow journal (and
/// the events they keep in memory).
const RECORDING_PER_WORKER: usize = 4;

/// What one delivery holds from its lease on: a worker `slot` until its call ends, and a
/// place among the outcomes `recording` until the journal has its outcome.
struct Worker {
    slot: OwnedSemaphorePermit,
    recording: OwnedSemaphorePermit,
}

impl Worker {
    /// Waits for a place among the outcomes, then for a worker slot.
    async fn acquire(slots: &Arc<Semaphore>, recording: &Arc<Semaphore>) -> Result<Self, AcquireError> {
        let recording = Arc::clone(recording).acquire_owned().await?;
        Ok(Worker { slot: Arc::clone(slots).acquire_owned().await?, recording })
    }
}

/// Runs deliveries with at most `workers` calls at once until `shutdown`, then gives the
/// calls already running up to `grace` to finish. A call still running after that is
/// abandoned: its lease runs out and it runs again after the next start (or on another
/// host). A lease lasts the plugin's timeout plus `lease_margin`, so that a healthy call
/// always finishes inside its lease.
pub async fn run(
    journal: Arc<dyn Journal>,
    registry: Arc<Registry>,
    workers: usize,
    grace: Duration,
    lease_margin: Duration,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(workers));
    let recording = Arc::new(Semaphore::new(workers.saturating_mul(RECORDING_PER_WORKER)));
    let calls = TaskTracker::new();
    // Signalled whenever a call ends, freeing its plugin's permit.
    let call_ended = Arc::new(Notify::new());
    while !shutdown.is_cancelled() {
        // Wait for a free worker before leasing anything, so nothing sits leased but idle.
        let first = tokio::select! {
            worker = Worker::acquire(&slots, &recording) => worker,
            () = shutdown.cancelled() => break,
        };
        let Ok(first) = first else { break };
        let free = slots.available_permits().min(recording.available_permits()) + 1;
        let wants = registry.wants(lease_margin);
        let Some(wait) = take_wait(&wants) else {
            // Every plugin is at its concurrency: wait for a call to end rather than for work.
            drop(first);
            tokio::select! {
                () = call_ended.notified() => {}
                () = tokio::time::sleep(TAKE_WAIT) => {}
                () = shutdown.cancelled() => break,
            }
            continue;
        };
        // No more than the plugins can start now: the rest would only be given back.
        let free = free.min(wants.iter().map(|want| want.free).sum::<usize>().max(1));
        // A take returns within `wait` (or the backend's request timeout): no need to cut it
        // short at shutdown, which would leave its leases to run out.
        let leases = match journal.take(&wants, free, wait).await {
            Ok(leases) => leases,
            Err(err) => {
                tracing::error!(error = %err, "cannot take deliveries from the journal");
                tokio::time::sleep(ERROR_BACKOFF).await;
                continue;
            }
        };
        let mut first = Some(first);
        for lease in leases {
            let worker = match first.take() {
                Some(worker) => worker,
                None => match Worker::acquire(&slots, &recording).await {
                    Ok(worker) => worker,
                    Err(_) => break,
                },
            };
            // The plugin's permit is taken here, before the next `wants`, so that the next take
            // sees the plugin's true free capacity. A plugin that is gone, at its concurrency
            // after all, or reloaded during the take with a timeout its lease does not cover,
            // gives the lease straight back: waiting, or calling past the lease, would let the
            // lease run out and the delivery run twice.
            let Some((plugin, permit)) = registry.get(&lease.plugin).and_then(|plugin| {
                let call_lease = plugin.component.limits().timeout + lease_margin;
                if !lease_covers(&wants, &plugin.name, call_lease) {
                    return None;
                }
                let permit = Arc::clone(&plugin.calls).try_acquire_owned().ok()?;
                Some((plugin, permit))
            }) else {
                if let Err(err) = journal.release(&lease).await {
                    tracing::error!(event.id = %lease.event.id, plugin = %lease.plugin, error = %err, "cannot give a lease back");
                }
                continue;
            };
            let (journal, registry, call_ended) =
                (Arc::clone(&journal), Arc::clone(&registry), Arc::clone(&call_ended));
            calls.spawn(async move {
                deliver(journal.as_ref(), &registry, &plugin, (permit, worker.slot), &call_ended, lease).await;
                drop(worker.recording);
            });
        }
    }
    calls.close();
    if tokio::time::timeout(grace, calls.wait()).await.is_err() {
        tracing::warn!(
            running = calls.len(),
            grace_ms = grace.as_millis() as u64,
            "deliveries still running after the grace period; they will run again after the next start"
        );
    }
}

/// How long a take for `wants` may wait for work; `None` when every plugin is at its
/// concurrency, so that only a call ending (or a plugin loaded, seen within `TAKE_WAIT`) can
/// make a take worth it.
fn take_wait(wants: &[Want]) -> Option<Duration> {
    if !wants.is_empty() && wants.iter().all(|want| want.free == 0) {
        None
    } else if wants.iter().any(|want| want.free == 0) {
        Some(BUSY_TAKE_WAIT)
    } else {
        Some(TAKE_WAIT)
    }
}

/// Whether the lease a take gave `plugin` lasts `call_lease`, what a call of the version
/// loaded now needs. A journal leases each delivery at least as long as `wants` (read before
/// the take) asked for its plugin; the embedded one leases a whole take for the longest of
/// them, so this may give back a lease that would have done, which costs only a second take.
fn lease_covers(wants: &[Want], plugin: &str, call_lease: Duration) -> bool {
    wants.iter().any(|want| want.plugin == plugin && want.lease >= call_lease)
}

/// Runs one leased delivery on `plugin` and records how it ended. The `permits` (the
/// plugin's, then the worker slot) are given back (and `call_ended` signalled) as soon as the
/// call returns: recording the outcome waits for the journal, which may hold it until the
/// running fsync ends to commit it with others, and the next call need not wait for that.
async fn deliver(
    journal: &dyn Journal,
    registry: &Registry,
    plugin: &Plugin,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    call_ended: &Notify,
    lease: Lease,
) {
    let event = &lease.event;
    let started = Instant::now();
    let in_flight = metrics::call_in_flight();
    let result = plugin.component.invoke(event, lease.attempt).await;
    drop((in_flight, permits));
    call_ended.notify_one();
    let took = started.elapsed();
    let duration_ms = crate::event::millis(took);
    let (mut outcome, mut emitted) = settle(&plugin.name, &plugin.retry, &lease, result);
    if let Some(fault) = emitted_too_large(journal, &outcome, &emitted) {
        (outcome, emitted) = settle(&plugin.name, &plugin.retry, &lease, Err(fault));
    }
    log_outcome(plugin, &lease, &outcome, duration_ms);
    let label = match outcome {
        Outcome::Done => "done",
        Outcome::Retry { .. } => "retry",
        Outcome::Dead { .. } => "dead",
    };
    metrics::call(&plugin.name, label, took);
    let emitted = emitted.into_iter().map(|event| route(registry, event)).collect();
    if let Err(err) = journal.finish(&lease, outcome, &plugin.sha256, emitted).await {
        tracing::error!(event.id = %event.id, plugin = %plugin.name, error = %err, "cannot record the delivery's outcome");
    }
}

/// What a call's result means for the delivery, and the events to commit with it: on
/// success the ones the plugin emitted; when it goes dead, an alert (unless the dead event is
/// itself an alert); otherwise another attempt after a backoff, and nothing emitted.
fn settle(
    plugin: &str,
    retry: &RetryPolicy,
    lease: &Lease,
    result: Result<Vec<Emitted>, CallError>,
) -> (Outcome, Vec<Event>) {
    let err = match result {
        Ok(emitted) => {
            return (Outcome::Done, emitted.into_iter().map(|emitted| emitted_event(plugin, emitted)).collect());
        }
        Err(err) => err,
    };
    let error = err.to_string();
    let retryable = !matches!(err, CallError::Permanent(_));
    if retryable && retry.retries_after(lease.attempt) {
        let delay = retry.delay(lease.attempt, fastrand::f64());
        return (Outcome::Retry { error, delay }, Vec::new());
    }
    let alert = (lease.event.event_type != DEAD_LETTER_TYPE).then(|| dead_letter_event(plugin, lease, &error));
    (Outcome::Dead { error }, alert.into_iter().collect())
}

/// The fault, if a call that succeeded emitted an event the journal cannot store: the
/// delivery then goes dead, since committing its outcome would fail on every attempt, and
/// another attempt would repeat the call's side effects for nothing.
fn emitted_too_large(journal: &dyn Journal, outcome: &Outcome, emitted: &[Event]) -> Option<CallError> {
    if !matches!(outcome, Outcome::Done) {
        return None;
    }
    emitted.iter().find_map(|event| {
        let err = journal.check_size(event).err()?;
        Some(CallError::Permanent(format!("emitted event {} of {} bytes: {err}", event.id, event.data.len())))
    })
}

/// An event a plugin emitted, as source `plugin.NAME`, carrying its chain depth.
fn emitted_event(plugin: &str, emitted: Emitted) -> Event {
    Event {
        id: emitted.id,
        source: format!("plugin.{plugin}"),
        event_type: emitted.event_type,
        time_ms: now_ms(),
        content_type: emitted.content_type,
        data: Bytes::from(emitted.data),
        attributes: vec![chain_depth_attribute(emitted.depth)],
    }
}

/// The `wasmhook.dead_letter` event: which event, which plugin, how many attempts, why. It is
/// one step deeper in a chain than the event that died, so that a plugin that emits work
/// from dead letters cannot loop past the chain depth guard through them.
fn dead_letter_event(plugin: &str, lease: &Lease, error: &str) -> Event {
    let data = serde_json::json!({
        "event_id": lease.event.id,
        "source": lease.event.source,
        "type": lease.event.event_type,
        "plugin": plugin,
        "delivery": lease.delivery,
        "attempts": lease.attempt,
        "last_error": error,
    });
    Event {
        id: uuid::Uuid::new_v4().to_string(),
        source: HOST_SOURCE.to_owned(),
        event_type: DEAD_LETTER_TYPE.to_owned(),
        time_ms: now_ms(),
        content_type: "application/json".to_owned(),
        data: Bytes::from(data.to_string()),
        attributes: vec![chain_depth_attribute(chain_depth(&lease.event) + 1)],
    }
}

/// The attribute that puts an event `depth` emits deep in a chain.
fn chain_depth_attribute(depth: u32) -> (String, String) {
    (CHAIN_DEPTH_ATTRIBUTE.to_owned(), depth.to_string())
}

fn route(registry: &Registry, event: Event) -> NewEvent {
    let plugins = registry.route(&event.event_type);
    NewEvent { event, plugins, dedup_window: DEFAULT_DEDUP_WINDOW }
}

fn log_outcome(plugin: &Plugin, lease: &Lease, outcome: &Outcome, duration_ms: u64) {
    let (event, attempt, name) = (&lease.event, lease.attempt, &plugin.name);
    match outcome {
        Outcome::Done => tracing::info!(
            event.id = %event.id, event.type = %event.event_type, source = %event.source, plugin = %name,
            attempt, duration_ms, outcome = "done", "delivered"
        ),
        Outcome::Retry { error, delay } => tracing::warn!(
            event.id = %event.id, event.type = %event.event_type, source = %event.source, plugin = %name,
            attempt, duration_ms, outcome = "retry", %error, retry_in_ms = delay.as_millis() as u64,
            "delivery failed; will retry"
        ),
        Outcome::Dead { error } => tracing::error!(
            event.id = %event.id, event.type = %event.event_type, source = %event.source, plugin = %name,
            attempt, duration_ms, outcome = "dead", %error, "delivery failed for good; kept as a dead letter"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(event_type: &str, attempt: u32) -> Lease {
        Lease {
            delivery: 7,
            plugin: "p".into(),
            attempt,
            event: Arc::new(Event {
                id: "e".into(),
                source: "github".into(),
                event_type: event_type.into(),
                time_ms: 0,
                content_type: "application/json".into(),
                data: Bytes::new(),
                attributes: Vec::new(),
            }),
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        first_delay: Duration::from_secs(10),
        multiplier: 2.0,
        max_delay: Duration::from_secs(60),
    };

    #[test]
    fn a_take_waits_for_work_only_while_it_can_lease_something() {
        let want = |free| Want {
            plugin: "p".into(),
            free,
            subscriptions: Arc::from([]),
            lease: Duration::from_secs(1),
            since_ms: 0,
        };
        assert_eq!(take_wait(&[want(0)]), None, "a plugin at its concurrency waits for a call to end");
        assert_eq!(take_wait(&[want(0), want(3)]), Some(BUSY_TAKE_WAIT), "the busy one's calls end soon");
        assert_eq!(take_wait(&[want(1), want(3)]), Some(TAKE_WAIT));
        assert_eq!(take_wait(&[]), Some(TAKE_WAIT), "no plugins: nothing to wait for but work");
    }

    #[test]
    fn a_lease_taken_before_a_reload_must_cover_the_new_version_s_calls() {
        let want = |plugin: &str, secs| Want {
            plugin: plugin.into(),
            free: 1,
            subscriptions: Arc::from([]),
            lease: Duration::from_secs(secs),
            since_ms: 0,
        };
        let wants = [want("p", 10), want("q", 60)];
        assert!(lease_covers(&wants, "p", Duration::from_secs(10)), "unchanged");
        assert!(lease_covers(&wants, "p", Duration::from_secs(5)), "timeout lowered");
        assert!(!lease_covers(&wants, "p", Duration::from_secs(11)), "timeout raised during the take");
        assert!(!lease_covers(&wants, "r", Duration::from_secs(1)), "loaded during the take");
    }

    #[test]
    fn success_is_done() {
        let emitted = Emitted {
            id: "e.1".into(),
            event_type: "audit.pushed".into(),
            content_type: "application/json".into(),
            data: b"{}".to_vec(),
            depth: 2,
        };
        let (outcome, events) = settle("p", &POLICY, &lease("x", 1), Ok(vec![emitted]));
        assert_eq!(outcome, Outcome::Done);
        assert_eq!((events[0].source.as_str(), events[0].id.as_str()), ("plugin.p", "e.1"));
        assert_eq!(events[0].attributes, [(CHAIN_DEPTH_ATTRIBUTE.to_owned(), "2".to_owned())]);
    }

    #[test]
    fn failures_retry_within_the_budget_with_a_bounded_delay() {
        for (attempt, err) in [
            (1, CallError::Retry("busy".into())),
            (2, CallError::Timeout(Duration::ZERO)),
            (2, CallError::Trap("oops".into())),
        ] {
            match settle("p", &POLICY, &lease("x", attempt), Err(err.clone())) {
                (Outcome::Retry { error, delay }, emitted) if emitted.is_empty() => {
                    assert_eq!(error, err.to_string());
                    assert!(delay <= POLICY.delay(attempt, 1.0), "{delay:?}");
                }
                other => panic!("attempt {attempt} {err}: expected a retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_last_attempt_and_permanent_errors_die_with_an_alert() {
        for (attempt, err) in [(3, CallError::Retry("busy".into())), (1, CallError::Permanent("bad".into()))] {
            let (outcome, alert) = settle("p", &POLICY, &lease("github.push", attempt), Err(err.clone()));
            assert_eq!(outcome, Outcome::Dead { error: err.to_string() });
            let alert = alert.first().expect("an alert");
            assert_eq!((alert.source.as_str(), alert.event_type.as_str()), (HOST_SOURCE, DEAD_LETTER_TYPE));
            let data: serde_json::Value = serde_json::from_slice(&alert.data).expect("json");
            assert_eq!((data["event_id"].as_str(), data["plugin"].as_str()), (Some("e"), Some("p")));
            assert_eq!((data["attempts"].as_u64(), data["delivery"].as_i64()), (Some(u64::from(attempt)), Some(7)));
        }
    }

    #[test]
    fn an_alert_is_one_step_deeper_in_a_chain_than_the_event_that_died() {
        let mut emitted = lease("audit.pushed", 1);
        Arc::get_mut(&mut emitted.event).expect("sole owner").attributes =
            vec![(CHAIN_DEPTH_ATTRIBUTE.to_owned(), "3".to_owned())];
        for (lease, depth) in [(lease("github.push", 1), "1"), (emitted, "4")] {
            let (_, alert) = settle("p", &POLICY, &lease, Err(CallError::Permanent("bad".into())));
            assert_eq!(alert[0].attributes, [(CHAIN_DEPTH_ATTRIBUTE.to_owned(), depth.to_owned())]);
        }
    }

    #[test]
    fn a_dead_alert_raises_no_alert_of_its_own() {
        let (outcome, alert) =
            settle("p", &POLICY, &lease(DEAD_LETTER_TYPE, 1), Err(CallError::Permanent("bad".into())));
        assert!(matches!(outcome, Outcome::Dead { .. }));
        assert!(alert.is_empty());
    }
}
