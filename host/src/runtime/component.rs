//! One compiled, pre-instantiated plugin and how it is called: a fresh store and instance per
//! call (or one kept for the next calls, when the manifest's `reuse` allows), a wall-clock
//! deadline through epoch interruption, resource caps, and every way a call can fail turned
//! into a [`CallError`] that names the reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::Linker;
use wasmtime::{Engine, PoolConcurrencyLimitError, Store, Trap, UpdateDeadline};

use super::bindings::{self, HandlerError, PluginPre};
use super::host_api::{CallEvent, CallGrants, CallState, Emitted, LimitExceeded};
use super::http::HttpAllow;
use super::{DEFAULT_MEMORY_BYTES, DEFAULT_REUSE_IDLE, DEFAULT_TIMEOUT, EPOCH_TICK, MAX_WASM_STACK_BYTES};
use crate::event::Event;

/// The longest a plugin's `metadata()` may take, whatever its manifest's `timeout`.
pub const MAX_METADATA_TIME: Duration = Duration::from_secs(10);
/// The longest error message a plugin's `retry` or `permanent` keeps; the rest is cut.
pub const MAX_ERROR_BYTES: usize = 4096;

/// What each call of a plugin may use. No `Debug`: `config` holds secrets.
#[derive(Clone)]
pub struct Limits {
    /// Wall-clock time for one call, instantiation included.
    pub timeout: Duration,
    /// Linear memory for one call.
    pub memory_bytes: usize,
    /// Values the plugin can read with `config(key)`.
    pub config: Arc<BTreeMap<String, String>>,
    /// Where the plugin's outbound HTTP may go.
    pub http_allow: Arc<HttpAllow>,
    /// Calls one instance may serve in a row (0: a fresh instance for every call).
    pub reuse: u32,
    /// How long a reused instance may wait for its next call before it is dropped.
    pub reuse_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: DEFAULT_TIMEOUT,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            config: Arc::default(),
            http_allow: Arc::default(),
            reuse: 0,
            reuse_idle: DEFAULT_REUSE_IDLE,
        }
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// The author's name for the plugin.
    pub name: String,
    /// The author's version.
    pub version: String,
    /// Glob patterns over event types.
    pub subscriptions: Vec<String>,
}

/// Why a file could not become a plugin.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a valid WebAssembly component.
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    /// A component, but not of the `wasmhook:plugin` world.
    #[error("does not implement the wasmhook:plugin world: {0}")]
    World(String),
    /// Its `metadata()` export failed.
    #[error("metadata() failed: {0}")]
    Metadata(String),
}

/// Why a call did not succeed. The text is what operators see as the delivery's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin asked to be called again later.
    #[error("retry: {0}")]
    Retry(String),
    /// The plugin says the event can never succeed.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The call ran past its deadline and was stopped.
    #[error("timeout after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The call went over a resource limit (memory, stack, log, emit, output) and was stopped.
    #[error("{0}")]
    Limit(String),
    /// The plugin trapped (a panic, an out-of-bounds access, memory over its limit, …).
    #[error("trap: {0}")]
    Trap(String),
}

/// An instance kept for reuse, with its store, how many calls it has served, and since when
/// it has waited for the next.
struct Warm {
    store: Store<CallState>,
    plugin: bindings::Plugin,
    calls: u32,
    parked: Instant,
}

/// Instances kept for reuse, oldest first: each is pushed when its call ends and the newest
/// is taken first, so those idle past a limit are always the first ones.
type WarmInstances = std::sync::Mutex<Vec<Warm>>;

/// Every plugin's instances kept for reuse in one runtime, so that a call that finds the pool
/// full can give them up.
#[derive(Default)]
pub(super) struct KeptInstances(std::sync::Mutex<Vec<std::sync::Weak<WarmInstances>>>);

impl KeptInstances {
    /// Adds a plugin's kept instances (and weeds out those of plugins since dropped).
    fn register(&self, warm: &Arc<WarmInstances>) {
        let mut all = lock(&self.0);
        all.retain(|warm| warm.strong_count() > 0);
        all.push(Arc::downgrade(warm));
    }

    /// Drops every kept instance (outside the locks); returns how many.
    fn drop_all(&self) -> usize {
        let lists: Vec<Arc<WarmInstances>> = lock(&self.0).iter().filter_map(std::sync::Weak::upgrade).collect();
        let dropped: Vec<Warm> = lists.iter().flat_map(|warm| std::mem::take(&mut *lock(warm))).collect();
        dropped.len()
    }
}

/// A plugin compiled once and pre-instantiated, ready for any number of calls.
#[derive(Clone)]
pub struct Component {
    engine: Engine,
    pre: PluginPre<CallState>,
    /// Instances kept for the next calls when `limits.reuse` allows (shared by clones).
    warm: Arc<WarmInstances>,
    /// Every plugin's kept instances, given up when a call finds the pool full.
    kept: Arc<KeptInstances>,
    name: Arc<str>,
    limits: Limits,
    metadata: Metadata,
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component").field("name", &self.name).field("metadata", &self.metadata).finish_non_exhaustive()
    }
}

impl Component {
    pub(super) async fn prepare(
        engine: &Engine,
        linker: &Linker<CallState>,
        kept: &Arc<KeptInstances>,
        compiled: &wasmtime::component::Component,
        name: &str,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let world_error = |err: wasmtime::Error| LoadError::World(describe(&err));
        let pre = PluginPre::new(linker.instantiate_pre(compiled).map_err(world_error)?).map_err(world_error)?;
        let mut component = Component {
            engine: engine.clone(),
            pre,
            warm: Arc::default(),
            kept: Arc::clone(kept),
            name: name.into(),
            limits,
            metadata: Metadata::default_for(name),
        };
        let mut store = component.store(None);
        let metadata = async {
            let plugin = component.instantiate(&mut store, None).await?;
            plugin.call_metadata(&mut store).await
        };
        // A constant to return: however long the calls may take, loading (and so start-up and
        // every rescan) never waits long for it.
        let limit = component.limits.timeout.min(MAX_METADATA_TIME);
        let metadata = tokio::time::timeout(limit, metadata).await;
        // What it printed (a panic's message, say) goes to the log whether or not it loads.
        store.data().flush_output();
        let metadata = metadata
            .map_err(|_| LoadError::Metadata(format!("timeout after {} ms", limit.as_millis())))?
            .map_err(|err| LoadError::Metadata(describe(&err)))?;
        component.metadata =
            Metadata { name: metadata.name, version: metadata.version, subscriptions: metadata.subscriptions };
        if component.limits.reuse > 0 {
            kept.register(&component.warm);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let (warm, idle) = (Arc::downgrade(&component.warm), component.limits.reuse_idle);
                runtime.spawn(drop_idle_instances(Arc::clone(&component.name), warm, idle));
            }
        }
        Ok(component)
    }

    /// What the plugin said about itself when it was loaded.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The limits each call runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Calls the plugin's `handle` on `event`, in a fresh instance unless the plugin's `reuse`
    /// lets a warm one serve (after at most `reuse` calls, a trap or a timeout, a warm
    /// instance is dropped). On success, returns the events the plugin emitted, for the caller
    /// to commit with the outcome.
    pub async fn invoke(&self, event: &Event, attempt: u32) -> Result<Vec<Emitted>, CallError> {
        let warm = if self.limits.reuse > 0 { self.take_warm() } else { None };
        let (mut store, mut instance, calls) = match warm {
            Some(Warm { mut store, plugin, calls, .. }) => {
                store.data_mut().begin(CallEvent::of(event));
                self.arm_deadline(&mut store);
                (store, Some(plugin), calls)
            }
            None => (self.store(Some(CallEvent::of(event))), None, 0),
        };
        let input = bindings::Event {
            id: event.id.clone(),
            source: event.source.clone(),
            event_type: event.event_type.clone(),
            time_ms: event.time_ms,
            content_type: event.content_type.clone(),
            data: event.data.to_vec(),
            attributes: event.attributes.clone(),
            attempt,
        };
        let call = async {
            let plugin = match instance.take() {
                Some(plugin) => plugin,
                None => self.instantiate(&mut store, Some(event)).await?,
            };
            let result = plugin.call_handle(&mut store, &input).await;
            instance = Some(plugin);
            result
        };
        // The epoch deadline stops guest code; this outer limit also covers host calls.
        let result = tokio::time::timeout(self.limits.timeout + EPOCH_TICK, call).await;
        store.data().flush_output();
        // A handled outcome leaves the instance sound; a trap or a timeout does not.
        let sound = matches!(result, Ok(Ok(_)));
        if let (true, Some(plugin)) = (sound && calls + 1 < self.limits.reuse, instance) {
            let emitted = match &result {
                Ok(Ok(Ok(()))) => std::mem::take(&mut store.data_mut().emitted),
                _ => Vec::new(),
            };
            lock(&self.warm).push(Warm { store, plugin, calls: calls + 1, parked: Instant::now() });
            return match result {
                Ok(Ok(Ok(()))) => Ok(emitted),
                Ok(Ok(Err(HandlerError::Retry(reason)))) => Err(CallError::Retry(capped(reason))),
                Ok(Ok(Err(HandlerError::Permanent(reason)))) => Err(CallError::Permanent(capped(reason))),
                _ => unreachable!("only sound outcomes keep their instance"),
            };
        }
        match result {
            Err(_elapsed) => Err(CallError::Timeout(self.limits.timeout)),
            Ok(Ok(Ok(()))) => Ok(std::mem::take(&mut store.data_mut().emitted)),
            Ok(Ok(Err(HandlerError::Retry(reason)))) => Err(CallError::Retry(capped(reason))),
            Ok(Ok(Err(HandlerError::Permanent(reason)))) => Err(CallError::Permanent(capped(reason))),
            Ok(Err(err)) => Err(self.classify(&err)),
        }
    }

    /// Names the reason a call trapped: a limit, the deadline, or the trap itself.
    fn classify(&self, err: &wasmtime::Error) -> CallError {
        if let Some(limit) = err.downcast_ref::<LimitExceeded>() {
            return CallError::Limit(limit.0.clone());
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => return CallError::Timeout(self.limits.timeout),
            Some(Trap::StackOverflow) => {
                return CallError::Limit(format!(
                    "wasm stack limit {} KiB (stack overflow)",
                    MAX_WASM_STACK_BYTES / 1024
                ));
            }
            _ => {}
        }
        CallError::Trap(describe(err))
    }

    /// A new instance in `store`. When the pool is full, kept instances hold slots no call is
    /// using: they are given up and the instance is tried once more, in a new store for
    /// `event` (the failed one may hold part of an instance).
    async fn instantiate(
        &self,
        store: &mut Store<CallState>,
        event: Option<&Event>,
    ) -> wasmtime::Result<bindings::Plugin> {
        match self.pre.instantiate_async(&mut *store).await {
            Err(err) if err.downcast_ref::<PoolConcurrencyLimitError>().is_some() && self.make_room() => {
                *store = self.store(event.map(CallEvent::of));
                self.pre.instantiate_async(store).await
            }
            result => result,
        }
    }

    /// Drops every plugin's kept instances; returns whether there were any.
    fn make_room(&self) -> bool {
        let dropped = self.kept.drop_all();
        if dropped == 0 {
            return false;
        }
        tracing::warn!(
            plugin = %self.name,
            instances = dropped,
            "the pool of plugin instances is full: reused instances dropped to make room"
        );
        true
    }

    /// The newest instance kept for reuse, unless it waited past `reuse_idle`: then every
    /// kept instance has, and all are dropped (outside the lock).
    fn take_warm(&self) -> Option<Warm> {
        let mut warm = lock(&self.warm);
        let newest = warm.pop()?;
        if newest.parked.elapsed() < self.limits.reuse_idle {
            return Some(newest);
        }
        let idle = std::mem::take(&mut *warm);
        drop(warm);
        drop((newest, idle));
        None
    }

    /// Arms this call's wall-clock deadline: the epoch callback yields every tick and stops
    /// the guest once the deadline has passed.
    fn arm_deadline(&self, store: &mut Store<CallState>) {
        let deadline = Instant::now() + self.limits.timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
    }

    /// A fresh store for one call: limits set, and the deadline armed before instantiation
    /// (a plugin's start-up code runs then, and must already be bounded).
    fn store(&self, event: Option<CallEvent>) -> Store<CallState> {
        let state = CallState::new(CallGrants {
            plugin: Arc::clone(&self.name),
            event,
            config: Arc::clone(&self.limits.config),
            http_allow: Arc::clone(&self.limits.http_allow),
            memory_bytes: self.limits.memory_bytes,
        });
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        self.arm_deadline(&mut store);
        store
    }
}

impl Metadata {
    fn default_for(name: &str) -> Self {
        Metadata { name: name.to_owned(), version: String::new(), subscriptions: Vec::new() }
    }
}

/// A plugin's error message, cut at [`MAX_ERROR_BYTES`].
fn capped(mut message: String) -> String {
    if message.len() > MAX_ERROR_BYTES {
        message.truncate(message.floor_char_boundary(MAX_ERROR_BYTES));
        message.push_str("… (cut at 4 KiB)");
    }
    message
}

/// An error's whole chain (and wasm backtrace, when there is one) on one line, cut at
/// [`MAX_ERROR_BYTES`]: a backtrace names functions as the plugin's own name section does.
pub(super) fn describe(err: &wasmtime::Error) -> String {
    capped(format!("{err:?}").lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(" | "))
}

/// Drops the instances of plugin `name` kept in `warm` once they have waited `idle` for a
/// call, so that a plugin whose traffic stopped gives back their memory and pool slots. Ends
/// once the component and its clones are gone.
async fn drop_idle_instances(name: Arc<str>, warm: std::sync::Weak<WarmInstances>, idle: Duration) {
    let mut ticks = tokio::time::interval((idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(30)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(instances) = warm.upgrade() else { return };
        let stale: Vec<Warm> = {
            let mut kept = lock(&instances);
            let count = kept.partition_point(|instance| instance.parked.elapsed() >= idle);
            kept.drain(..count).collect()
        };
        if !stale.is_empty() {
            tracing::info!(plugin = %name, instances = stale.len(), "reused instances dropped after waiting {idle:?}");
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
