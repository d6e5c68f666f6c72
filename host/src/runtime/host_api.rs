//! One call's state and the `host` interface plugins import: log through the host's tracing
//! (capped), config lookup, emit (buffered until the call succeeds), plus the WASI context
//! (granting nothing), captured stdout/stderr, `wasi:http` behind the plugin's allowlist, and
//! the resource limiter whose errors name the limit that was hit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::Level;
use super::bindings::wasmhook::plugin::{host, types};
use super::http::{HttpAllow, HttpGrant};

/// Log lines one call may write.
pub const MAX_LOG_LINES: usize = 100;
/// Log bytes one call may write (`log` and stdout/stderr alike).
pub const MAX_LOG_BYTES: usize = 64 * 1024;
/// Events one call may emit.
pub const MAX_EMITS: usize = 100;
/// The largest event one call may emit.
pub const MAX_EMIT_BYTES: usize = 1024 * 1024;
/// The most data all of one call's emitted events may hold together: the host keeps it until
/// the call's outcome is stored.
pub const MAX_EMIT_TOTAL_BYTES: usize = 4 * 1024 * 1024;
/// Resources (streams, HTTP requests and headers, pollables) one call may hold at once: each
/// lives in the host's memory, outside the plugin's `memory` grant.
const MAX_RESOURCES: usize = 1024;
/// The in-memory size of one set of HTTP headers a plugin builds (wasmtime does not limit the
/// headers of a response, which the host reads itself).
const MAX_HEADER_FIELDS_BYTES: usize = 32 * 1024;
/// The longest event type and content type an emitted event may have, in bytes.
const MAX_EMIT_NAME_BYTES: usize = 256;
/// How many emitted events deep a chain may go before `emit` refuses (a loop guard).
pub const MAX_CHAIN_DEPTH: u32 = 8;
/// The attribute carrying how many emits deep an event is.
pub const CHAIN_DEPTH_ATTRIBUTE: &str = "wasmhook-chain-depth";

/// How many emits deep `event` is: 0 for an event a sender sent.
pub fn chain_depth(event: &crate::event::Event) -> u32 {
    event
        .attributes
        .iter()
        .find(|(name, _)| name == CHAIN_DEPTH_ATTRIBUTE)
        .and_then(|(_, depth)| depth.parse().ok())
        .unwrap_or(0)
}

/// Instances, tables and memories one call may create, and table elements per table.
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 8;
pub(super) const MAX_TABLE_ELEMENTS: usize = 20_000;

/// A per-call limit was hit; the text names it. The call ends as a retryable failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LimitExceeded(pub String);

/// An event a plugin emitted, waiting for its call to succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The new event's id: the parent's source and id, and its position (`github:abc.1`).
    pub id: String,
    /// Its type.
    pub event_type: String,
    /// Its media type.
    pub content_type: String,
    /// Its payload.
    pub data: Vec<u8>,
    /// How many emits deep it is.
    pub depth: u32,
}

/// Everything one call's store holds. A fresh one per call, so nothing leaks between events,
/// unless the manifest's `reuse` keeps the store for the next calls ([`CallState::begin`]
/// resets all but the plugin's own memory).
pub struct CallState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_grant: HttpGrant,
    table: ResourceTable,
    pub(super) limiter: CallLimiter,
    plugin: Arc<str>,
    event: Option<CallEvent>,
    config: Arc<BTreeMap<String, String>>,
    logged_lines: usize,
    logged_bytes: usize,
    pub(super) emitted: Vec<Emitted>,
    pub(super) stdout: CappedOutput,
    pub(super) stderr: CappedOutput,
}

/// The event a call handles, as its host functions need it.
pub struct CallEvent {
    /// Its id, for the call's log lines.
    id: String,
    /// What the ids of the events the call emits start with: the event's
    /// [key](crate::event::Event::key) (source, id and any producer), so that two events with
    /// the same id never emit the same ids (a second one's would be dropped as duplicates).
    emit_prefix: String,
    /// How many emits deep it is.
    depth: u32,
}

impl CallEvent {
    /// The parts of `event` a call needs.
    pub fn of(event: &crate::event::Event) -> Self {
        CallEvent { id: event.id.clone(), emit_prefix: event.key(), depth: chain_depth(event) }
    }
}

/// What a call may use, and who it is for.
pub struct CallGrants {
    /// The plugin's name.
    pub plugin: Arc<str>,
    /// The event it handles (none while loading).
    pub event: Option<CallEvent>,
    /// `config(key)` values.
    pub config: Arc<BTreeMap<String, String>>,
    /// Where outbound HTTP may go.
    pub http_allow: Arc<HttpAllow>,
    /// Linear memory the call may use.
    pub memory_bytes: usize,
}

impl CallState {
    /// State for one call under `grants`.
    pub fn new(grants: CallGrants) -> Self {
        let (stdout, stderr) = (CappedOutput::default(), CappedOutput::default());
        // No environment, no preopened folders, no sockets, stdin closed; output captured.
        let wasi = WasiCtx::builder().stdout(stdout.clone()).stderr(stderr.clone()).build();
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_HEADER_FIELDS_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        CallState {
            wasi,
            http,
            http_grant: HttpGrant::new(grants.http_allow, Arc::clone(&grants.plugin)),
            table,
            limiter: CallLimiter::new(grants.memory_bytes),
            plugin: grants.plugin,
            event: grants.event,
            config: grants.config,
            logged_lines: 0,
            logged_bytes: 0,
            emitted: Vec::new(),
            stdout,
            stderr,
        }
    }

    /// Makes a reused instance's state ready for a new call: the event, and fresh counters,
    /// emitted events and captured output. (The plugin's own memory is kept: that is reuse.)
    pub(super) fn begin(&mut self, event: CallEvent) {
        self.event = Some(event);
        self.logged_lines = 0;
        self.logged_bytes = 0;
        self.emitted.clear();
        self.stdout.clear();
        self.stderr.clear();
    }

    /// Writes a line to the host's log with the plugin's name and the event's id; line breaks
    /// and other control characters are escaped, so that a plugin cannot forge log lines.
    pub(super) fn write_log(&self, level: Level, stream: &str, message: &str) {
        let message = one_line(message);
        let plugin = &*self.plugin;
        let event_id = self.event.as_ref().map_or("", |event| event.id.as_str());
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, event.id = event_id, stream, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, event.id = event_id, stream, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, event.id = event_id, stream, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, event.id = event_id, stream, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, event.id = event_id, stream, "{message}"),
        }
    }

    /// Logs what the plugin printed to stdout and stderr, one line each, at most
    /// [`MAX_LOG_LINES`] of each (then one line saying how many more were left out).
    pub(super) fn flush_output(&self) {
        for (stream, pipe, level) in [("stdout", &self.stdout, Level::Info), ("stderr", &self.stderr, Level::Warn)] {
            let contents = pipe.contents();
            let text = String::from_utf8_lossy(&contents);
            let mut lines = text.lines().filter(|line| !line.trim().is_empty());
            for line in lines.by_ref().take(MAX_LOG_LINES) {
                self.write_log(level, stream, line);
            }
            let left_out = lines.count();
            if left_out > 0 {
                self.write_log(level, stream, &format!("… {left_out} more lines not logged (at most {MAX_LOG_LINES})"));
            }
        }
    }
}

/// `message` with its control characters (tab aside) escaped, as one line.
fn one_line(message: &str) -> std::borrow::Cow<'_, str> {
    let control = |c: char| c.is_control() && c != '\t';
    if !message.contains(control) {
        return message.into();
    }
    message.chars().map(|c| if control(c) { c.escape_default().to_string() } else { c.to_string() }).collect()
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_grant }
    }
}

impl types::Host for CallState {}

impl host::Host for CallState {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.logged_lines += 1;
        self.logged_bytes += message.len();
        if self.logged_lines > MAX_LOG_LINES || self.logged_bytes > MAX_LOG_BYTES {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "log limit {MAX_LOG_LINES} lines or {} KiB per call",
                MAX_LOG_BYTES / 1024
            ))));
        }
        self.write_log(level, "log", &message);
        Ok(())
    }

    async fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.config.get(&key).cloned())
    }

    async fn emit(
        &mut self,
        event_type: String,
        data: Vec<u8>,
        content_type: String,
    ) -> wasmtime::Result<Result<String, String>> {
        if self.emitted.len() >= MAX_EMITS {
            return Err(wasmtime::Error::new(LimitExceeded(format!("emit limit {MAX_EMITS} events per call"))));
        }
        if data.len() > MAX_EMIT_BYTES {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "emit limit {} MiB per event (this one has {} bytes)",
                MAX_EMIT_BYTES >> 20,
                data.len()
            ))));
        }
        let emitted_bytes: usize = self.emitted.iter().map(|event| event.data.len()).sum();
        if emitted_bytes + data.len() > MAX_EMIT_TOTAL_BYTES {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "emit limit {} MiB per call in all",
                MAX_EMIT_TOTAL_BYTES >> 20
            ))));
        }
        let Some(parent) = &self.event else {
            return Ok(Err("emit works only while handling an event, not in metadata()".to_owned()));
        };
        if parent.depth >= MAX_CHAIN_DEPTH {
            return Ok(Err(format!(
                "chain depth limit {MAX_CHAIN_DEPTH}: this event was itself emitted {} deep",
                parent.depth
            )));
        }
        if event_type.is_empty()
            || event_type.len() > MAX_EMIT_NAME_BYTES
            || event_type.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Ok(Err(format!(
                "event type {event_type:?} must be 1 to {MAX_EMIT_NAME_BYTES} bytes without spaces"
            )));
        }
        if content_type.len() > MAX_EMIT_NAME_BYTES || content_type.chars().any(char::is_control) {
            return Ok(Err(format!(
                "content type must be at most {MAX_EMIT_NAME_BYTES} bytes without control characters (this one has {} bytes)",
                content_type.len()
            )));
        }
        let id = format!("{}.{}", parent.emit_prefix, self.emitted.len() + 1);
        let depth = parent.depth + 1;
        let content_type = if content_type.is_empty() { "application/json".to_owned() } else { content_type };
        self.emitted.push(Emitted { id: id.clone(), event_type, content_type, data, depth });
        Ok(Ok(id))
    }
}

/// A plugin's stdout or stderr, kept in memory for the host's log. Writing past
/// [`MAX_LOG_BYTES`] ends the call with a [`LimitExceeded`] that names the cap.
#[derive(Clone, Default)]
pub(super) struct CappedOutput {
    buffer: Arc<Mutex<BytesMut>>,
}

impl CappedOutput {
    /// Forgets what was written.
    fn clear(&self) {
        self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// Everything written so far.
    pub(super) fn contents(&self) -> Bytes {
        self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone().freeze()
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASI 0.3 components ask for this; plugins are WASI 0.2, so nothing is lost.
        Box::new(tokio::io::sink())
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let mut buffer = self.buffer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buffer.len() + bytes.len() > MAX_LOG_BYTES {
            return Err(StreamError::Trap(wasmtime::Error::new(LimitExceeded(format!(
                "output limit {} KiB of stdout or stderr per call",
                MAX_LOG_BYTES / 1024
            )))));
        }
        buffer.extend_from_slice(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready: a write past the cap is what ends the call, with a named reason.
        Ok(MAX_LOG_BYTES)
    }
}

/// The store's resource limiter: memory per the plugin's grant, and fixed caps on tables and
/// instances. Going over is an error naming the limit, which ends the call.
pub(super) struct CallLimiter {
    /// The grant: linear memory of all the store's memories together (a component may hold
    /// several core modules, each with a memory of its own).
    memory_bytes: usize,
    /// What the store's memories hold together.
    memory_used: usize,
    /// The last growth allowed, given back if it then fails.
    last_growth: usize,
}

impl CallLimiter {
    pub(super) fn new(memory_bytes: usize) -> Self {
        CallLimiter { memory_bytes, memory_used: 0, last_growth: 0 }
    }
}

impl ResourceLimiter for CallLimiter {
    /// Also called when a memory is created, growing from 0.
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        let used = self.memory_used.saturating_add(growth);
        if used > self.memory_bytes {
            return Err(wasmtime::Error::new(LimitExceeded(format!(
                "memory limit {} MiB (the plugin asked for {} MiB)",
                self.memory_bytes >> 20,
                used >> 20
            ))));
        }
        (self.memory_used, self.last_growth) = (used, growth);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_used -= std::mem::take(&mut self.last_growth);
        Ok(())
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            return Err(wasmtime::Error::new(LimitExceeded(format!("table limit {MAX_TABLE_ELEMENTS} elements"))));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_memory_grant_covers_a_call_s_memories_together() {
        let mut limiter = CallLimiter::new(64 * MIB);
        assert!(limiter.memory_growing(0, 40 * MIB, None).expect("the first memory"));
        let err = limiter.memory_growing(0, 40 * MIB, None).expect_err("a second memory past the grant");
        assert!(err.to_string().contains("memory limit 64 MiB (the plugin asked for 80 MiB)"), "{err}");
        assert!(limiter.memory_growing(0, 16 * MIB, None).expect("a second memory within it"));
        assert!(limiter.memory_growing(40 * MIB, 48 * MIB, None).expect("the first grows into the rest"));
        assert!(limiter.memory_growing(48 * MIB, 49 * MIB, None).is_err(), "nothing is left");
    }

    #[test]
    fn a_growth_that_then_fails_is_given_back() {
        let mut limiter = CallLimiter::new(64 * MIB);
        assert!(limiter.memory_growing(0, 60 * MIB, None).expect("allowed"));
        limiter.memory_grow_failed(wasmtime::Error::msg("no room in the pool")).expect("noted");
        assert!(limiter.memory_growing(0, 60 * MIB, None).expect("allowed again"));
    }

    fn call(event: Option<&crate::event::Event>) -> CallState {
        CallState::new(CallGrants {
            plugin: "p".into(),
            event: event.map(CallEvent::of),
            config: Arc::default(),
            http_allow: Arc::default(),
            memory_bytes: MIB,
        })
    }

    fn event(source: &str, id: &str) -> crate::event::Event {
        crate::event::Event {
            id: id.into(),
            source: source.into(),
            event_type: "t".into(),
            time_ms: 0,
            content_type: "application/json".into(),
            data: Bytes::new(),
            attributes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn two_sources_or_producers_events_with_one_id_emit_different_ids() {
        use host::Host as _;
        let emit = |mut state: CallState| async move {
            state.emit("derived".into(), b"{}".to_vec(), String::new()).await.expect("no trap").expect("emitted")
        };
        let (a, b) = (emit(call(Some(&event("github", "42")))).await, emit(call(Some(&event("gitlab", "42")))).await);
        assert_eq!((a.as_str(), b.as_str()), ("github:42.1", "gitlab:42.1"));
        let from = |producer: &str| {
            let mut cloud = event("ce", "42");
            cloud.attributes = vec![("source".into(), producer.into())];
            cloud
        };
        let (a, b) = (emit(call(Some(&from("/a")))).await, emit(call(Some(&from("/b")))).await);
        assert_eq!((a.as_str(), b.as_str()), (r#"ce:"/a":42.1"#, r#"ce:"/b":42.1"#), "two producers");
    }

    #[tokio::test]
    async fn a_call_emits_at_most_4_mib_in_all() {
        use host::Host as _;
        let mut state = call(Some(&event("github", "1")));
        for _ in 0..4 {
            state.emit("big".into(), vec![0; MIB], String::new()).await.expect("within").expect("emitted");
        }
        let err = state.emit("big".into(), vec![0], String::new()).await.expect_err("over the total");
        assert!(err.to_string().contains("emit limit 4 MiB per call in all"), "{err}");
    }

    #[test]
    fn a_call_holds_a_bounded_number_of_host_resources() {
        let mut state = call(None);
        for _ in 0..MAX_RESOURCES {
            state.table.push(0_u8).expect("within the cap");
        }
        assert!(state.table.push(0_u8).is_err(), "past the cap");
    }

    #[test]
    fn printed_output_is_logged_as_at_most_100_lines_a_stream() {
        let logged = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let logged = Arc::clone(&logged);
            move || LogSink(Arc::clone(&logged))
        };
        let subscriber = tracing_subscriber::fmt().with_writer(writer).with_ansi(false).finish();
        let mut state = call(None);
        for line in 0..500 {
            state.stdout.write(Bytes::from(format!("line {line}\n"))).expect("within 64 KiB");
        }
        tracing::subscriber::with_default(subscriber, || {
            // Another test may have met these callsites with no subscriber, and tracing
            // remembers that interest for the whole process.
            tracing::callsite::rebuild_interest_cache();
            state.flush_output();
        });
        let text = String::from_utf8(logged.lock().expect("log").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), MAX_LOG_LINES + 1, "{text}");
        assert!(text.contains("line 99") && !text.contains("line 100\n") && !text.contains("line 100 "), "{text}");
        assert!(text.contains("400 more lines not logged"), "{text}");
    }

    struct LogSink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogSink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_message_stays_on_one_line() {
        assert_eq!(one_line("plain\ttext"), "plain\ttext");
        assert_eq!(one_line("a\n{\"level\":\"ERROR\"}\r"), "a\\n{\"level\":\"ERROR\"}\\r");
    }

    #[tokio::test]
    async fn metadata_cannot_emit() {
        use host::Host as _;
        let refused = call(None).emit("derived".into(), Vec::new(), String::new()).await.expect("no trap");
        assert!(refused.expect_err("no event").contains("metadata()"));
    }
}
