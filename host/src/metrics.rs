//! Prometheus metrics: the recorder, every metric's name and meaning, and the one-line
//! functions the other modules call to record. `GET /metrics` on the admin listener renders
//! them. Names are prefixed `wasmhook_`; labels are bounded (configured sources, loaded
//! plugins, status codes, fixed reasons and outcomes).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{LazyLock, OnceLock, RwLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::journal::Stats;

/// Every metric: name, kind, unit, and what it counts. The README's table is this list.
pub const CATALOGUE: [(&str, &str, &str); 21] = [
    ("wasmhook_requests_total", "counter", "webhook requests answered, by `source` and HTTP `status`"),
    (
        "wasmhook_verification_failures_total",
        "counter",
        "requests refused by signature checks, by `source` and `reason`",
    ),
    ("wasmhook_events_accepted_total", "counter", "events stored, by `source`"),
    ("wasmhook_events_duplicate_total", "counter", "repeats refused within the dedup window, by `source`"),
    (
        "wasmhook_deliveries",
        "gauge",
        "deliveries by `status` (pending, running, retrying, dead), read from the journal at each scrape",
    ),
    ("wasmhook_deliveries_done_total", "counter", "deliveries handled, by `plugin`"),
    ("wasmhook_calls_in_flight", "gauge", "plugin calls running now"),
    ("wasmhook_call_duration_seconds", "histogram", "plugin call time, by `plugin` and `outcome` (done, retry, dead)"),
    ("wasmhook_retries_total", "counter", "failed attempts scheduled for a retry, by `plugin`"),
    ("wasmhook_dead_letters_total", "counter", "deliveries given up on, by `plugin`"),
    ("wasmhook_plugin_loads_total", "counter", "plugin versions loaded, by `plugin`"),
    ("wasmhook_plugin_load_failures_total", "counter", "plugin files that failed to load, by `plugin`"),
    ("wasmhook_plugin_compile_seconds", "histogram", "time to compile and prepare a plugin version, by `plugin`"),
    ("wasmhook_journal_commit_batch_size", "histogram", "writes committed in one journal transaction"),
    ("wasmhook_journal_commit_seconds", "histogram", "time of one journal transaction, without the fsync"),
    (
        "wasmhook_journal_sync_seconds",
        "histogram",
        "time of one fsync of the journal, which every acceptance waits for (`synchronous = \"full\"`)",
    ),
    (
        "wasmhook_journal_checkpoint_seconds",
        "histogram",
        "time of one checkpoint, copying the journal's log into its database file, `by` the checkpointer thread or the writer",
    ),
    ("wasmhook_journal_max_pending", "gauge", "unfinished deliveries above which ingest answers 503"),
    (
        "wasmhook_requests_at_max_pending_total",
        "counter",
        "requests that found the journal at `max_pending`, by `outcome`: room (found within `max_pending_wait`), refused (503 after waiting: the wait ran out, the journal went away or the host began to stop), no_place (503 at once: 256 requests were waiting)",
    ),
    ("wasmhook_requests_waiting_for_room", "gauge", "requests waiting now for room in a full journal (at most 256)"),
    ("wasmhook_plugins_loaded", "gauge", "plugins serving now"),
];

const SECONDS_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
const BATCH_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once) and describes every metric.
pub fn install() -> anyhow::Result<()> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    // No `idle_timeout`: the handles kept below (`Memo`) would then record into metrics the
    // recorder no longer exports.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("wasmhook_journal_commit_batch_size".to_owned()), &BATCH_BUCKETS)?
        .install_recorder()?;
    for (name, kind, help) in CATALOGUE {
        match kind {
            "counter" => describe_counter!(name, help),
            "gauge" => describe_gauge!(name, help),
            _ if name.ends_with("_seconds") => describe_histogram!(name, Unit::Seconds, help),
            _ => describe_histogram!(name, help),
        }
    }
    let _ = HANDLE.set(handle);
    Ok(())
}

/// The Prometheus text of every metric (empty before [`install`]).
pub fn render() -> String {
    HANDLE.get().map(PrometheusHandle::render).unwrap_or_default()
}

/// The handles of one labelled metric family already registered, by a small key and a label
/// value, so that the paths run on every request and every call skip the recorder's
/// registration (copies of the labels, a hash, a lock) each time. Labels are bounded (sources,
/// plugins, status codes, outcomes), and so is this. Handles are kept only once the recorder
/// is installed: one taken before would record nowhere.
struct Memo<K, T>(LazyLock<RwLock<HashMap<K, HashMap<String, T>>>>);

impl<K: Copy + Eq + Hash, T: Clone> Memo<K, T> {
    const fn new() -> Self {
        Memo(LazyLock::new(RwLock::default))
    }

    /// The handle for `key` and `label`, registered with `register` the first time.
    fn get(&self, key: K, label: &str, register: impl FnOnce() -> T) -> T {
        let read = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(handle) = read.get(&key).and_then(|by_label| by_label.get(label)) {
            return handle.clone();
        }
        drop(read);
        let installed = HANDLE.get().is_some(); // before registering: a handle of no recorder is never kept
        let handle = register();
        if installed {
            let mut write = self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            write.entry(key).or_default().insert(label.to_owned(), handle.clone());
        }
        handle
    }
}

static REQUESTS: Memo<u16, Counter> = Memo::new();
static ACCEPTED: Memo<bool, Counter> = Memo::new();
static CALLS: Memo<&'static str, (Histogram, Counter)> = Memo::new();
static IN_FLIGHT: Memo<(), Gauge> = Memo::new();

/// A webhook request was answered.
pub fn request(source: &str, status: u16) {
    REQUESTS
        .get(
            status,
            source,
            || counter!("wasmhook_requests_total", "source" => source.to_owned(), "status" => status.to_string()),
        )
        .increment(1);
}

/// A request failed its signature check for `reason`.
pub fn verification_failure(source: &str, reason: &'static str) {
    counter!("wasmhook_verification_failures_total", "source" => source.to_owned(), "reason" => reason).increment(1);
}

/// A request found the journal at `max_pending`: `outcome` is what became of it.
pub fn at_max_pending(outcome: &'static str) {
    counter!("wasmhook_requests_at_max_pending_total", "outcome" => outcome).increment(1);
}

/// An event was stored, or refused as a repeat.
pub fn accepted(source: &str, duplicate: bool) {
    let name = if duplicate { "wasmhook_events_duplicate_total" } else { "wasmhook_events_accepted_total" };
    ACCEPTED.get(duplicate, source, || counter!(name, "source" => source.to_owned())).increment(1);
}

/// Counts one in a gauge for as long as it lives: a running call, a request waiting for room.
pub struct Held(Gauge);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn hold(gauge: Gauge) -> Held {
    gauge.increment(1.0);
    Held(gauge)
}

/// A plugin call starts: `wasmhook_calls_in_flight` counts it until the guard drops.
pub fn call_in_flight() -> Held {
    hold(IN_FLIGHT.get((), "", || gauge!("wasmhook_calls_in_flight")))
}

/// A request starts waiting for room: `wasmhook_requests_waiting_for_room` counts it until the
/// guard drops.
pub fn waiting_for_room() -> Held {
    hold(gauge!("wasmhook_requests_waiting_for_room"))
}

/// A call of `plugin` ended with `outcome` (done, retry, dead) after `took`.
pub fn call(plugin: &str, outcome: &'static str, took: Duration) {
    let (duration, count) = CALLS.get(outcome, plugin, || {
        let name = match outcome {
            "done" => "wasmhook_deliveries_done_total",
            "retry" => "wasmhook_retries_total",
            _ => "wasmhook_dead_letters_total",
        };
        (
            histogram!("wasmhook_call_duration_seconds", "plugin" => plugin.to_owned(), "outcome" => outcome),
            counter!(name, "plugin" => plugin.to_owned()),
        )
    });
    duration.record(took.as_secs_f64());
    count.increment(1);
}

/// A plugin version loaded after `took` of compiling and preparing.
pub fn plugin_loaded(plugin: &str, took: Duration) {
    counter!("wasmhook_plugin_loads_total", "plugin" => plugin.to_owned()).increment(1);
    histogram!("wasmhook_plugin_compile_seconds", "plugin" => plugin.to_owned()).record(took.as_secs_f64());
}

/// A plugin file failed to load.
pub fn plugin_load_failed(plugin: &str) {
    counter!("wasmhook_plugin_load_failures_total", "plugin" => plugin.to_owned()).increment(1);
}

/// How many plugins serve now.
pub fn plugins_loaded(count: usize) {
    gauge!("wasmhook_plugins_loaded").set(count as f64);
}

/// One journal transaction committed `writes` writes in `took`.
pub fn journal_commit(writes: usize, took: Duration) {
    histogram!("wasmhook_journal_commit_batch_size").record(writes as f64);
    histogram!("wasmhook_journal_commit_seconds").record(took.as_secs_f64());
}

/// One fsync of the journal took `took`.
pub fn journal_sync(took: Duration) {
    histogram!("wasmhook_journal_sync_seconds").record(took.as_secs_f64());
}

/// One checkpoint of the journal, run `by` the checkpointer or the writer, took `took`.
pub fn journal_checkpoint(by: &'static str, took: Duration) {
    histogram!("wasmhook_journal_checkpoint_seconds", "by" => by).record(took.as_secs_f64());
}

/// The journal's counts, read at scrape time.
pub fn journal_stats(stats: &Stats) {
    for (status, count) in
        [("pending", stats.pending), ("running", stats.running), ("retrying", stats.retrying), ("dead", stats.dead)]
    {
        gauge!("wasmhook_deliveries", "status" => status).set(count as f64);
    }
    gauge!("wasmhook_journal_max_pending").set(stats.max_pending as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_handles_count_into_the_installed_recorder() {
        install().expect("recorder");
        for _ in 0..3 {
            request("kept-handles", 202);
        }
        request("kept-handles", 401);
        accepted("kept-handles", false);
        accepted("kept-handles", true);
        accepted("kept-handles", true);
        call("kept-handles", "done", Duration::from_millis(1));
        call("kept-handles", "done", Duration::from_millis(1));
        call("kept-handles", "retry", Duration::from_millis(1));
        let text = render();
        for line in [
            r#"wasmhook_requests_total{source="kept-handles",status="202"} 3"#,
            r#"wasmhook_requests_total{source="kept-handles",status="401"} 1"#,
            r#"wasmhook_events_accepted_total{source="kept-handles"} 1"#,
            r#"wasmhook_events_duplicate_total{source="kept-handles"} 2"#,
            r#"wasmhook_deliveries_done_total{plugin="kept-handles"} 2"#,
            r#"wasmhook_retries_total{plugin="kept-handles"} 1"#,
            r#"wasmhook_call_duration_seconds_count{plugin="kept-handles",outcome="done"} 2"#,
            r#"wasmhook_call_duration_seconds_count{plugin="kept-handles",outcome="retry"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in:\n{text}");
        }
    }
}
