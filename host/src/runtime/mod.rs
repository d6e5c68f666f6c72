//! The wasmtime door: one engine for the process, compiling plugins into ready-to-call
//! [`Component`]s, and calling them under limits. Start at [`Runtime`].
//!
//! Nothing outside this module names a wasmtime type: the rest of the host sees
//! [`Component::invoke`] returning `Ok` or a [`CallError`].

mod bindings;
mod component;
mod host_api;
mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use component::KeptInstances;
pub use component::{CallError, Component, Limits, LoadError, MAX_ERROR_BYTES, Metadata};
use host_api::CallState;
pub use host_api::{
    CHAIN_DEPTH_ATTRIBUTE, Emitted, MAX_CHAIN_DEPTH, MAX_EMIT_BYTES, MAX_EMITS, MAX_LOG_BYTES, MAX_LOG_LINES,
    chain_depth,
};
pub use http::{CONNECT_TIMEOUT, HttpAllow, MAX_RESPONSE_BYTES, RESPONSE_TIMEOUT};

/// How often the epoch advances. A plugin that loops forever is stopped within its timeout
/// plus one tick, and a long call yields its thread to other tasks every tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Wall-clock time one call may take, unless the plugin's manifest says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reused instance waits for its next call before it is dropped, by default.
pub const DEFAULT_REUSE_IDLE: Duration = Duration::from_secs(60);
/// Linear memory one call may use, unless the plugin's manifest says otherwise.
pub const DEFAULT_MEMORY_BYTES: usize = 64 * 1024 * 1024;
/// The most linear memory any plugin may be granted (the size of a pooling-allocator slot).
pub const MAX_MEMORY_BYTES: usize = 1024 * 1024 * 1024;
/// Wasm stack one call may use; deeper recursion ends the call.
pub const MAX_WASM_STACK_BYTES: usize = 512 * 1024;
/// Instances that can be alive at once across all plugins: one per running call, and those
/// `reuse` keeps (given up when a call finds the pool full).
const POOL_INSTANCES: u32 = 1000;
/// Memory and stack kept mapped in a freed slot so the next call does not page-fault it in
/// again; measured to double call throughput on the development machine.
const KEEP_RESIDENT_BYTES: usize = 4 * 1024 * 1024;
/// Freed pages returned to the kernel in one batch rather than one `madvise` each.
const DECOMMIT_BATCH: usize = 32;

/// The process's one wasmtime engine and linker, and the thread that advances its epoch.
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    /// Every plugin's instances kept for reuse, so that a call that finds the pool full can
    /// make room.
    kept: Arc<KeptInstances>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine (pooling allocator, async calls, epoch interruption, a stack limit)
    /// and the linker holding WASI (granting nothing), `wasi:http` (behind each plugin's
    /// allowlist) and the `host` interface. With `cache_dir`, compiled code is kept there,
    /// keyed by the component's content and the engine's settings, so a restart or a reload
    /// of a version already seen compiles nothing.
    pub fn new(cache_dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        Self::with_pool(cache_dir, POOL_INSTANCES)
    }

    /// [`Runtime::new`] with a pool of `instances` (tests fill a small one).
    fn with_pool(cache_dir: Option<&std::path::Path>, instances: u32) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances)
            .total_memories(instances)
            .total_tables(instances)
            .total_stacks(instances)
            .total_core_instances(instances)
            .max_memory_size(MAX_MEMORY_BYTES)
            // The per-call limiter's figure, so that its error names the limit a plugin hit.
            .table_elements(host_api::MAX_TABLE_ELEMENTS)
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .async_stack_keep_resident(KEEP_RESIDENT_BYTES)
            // Without this a fresh instance's first table write faults on a zero page and
            // flushes the TLB of every core (IPIs): 8% of the host's CPU with fresh instances.
            .table_keep_resident(KEEP_RESIDENT_BYTES)
            // Zero only the pages a call dirtied (Linux 6.7+; elsewhere the whole kept part):
            // this halved the cost of a fresh instance (make bench-core).
            .pagemap_scan(wasmtime::Enabled::Auto)
            .decommit_batch_size(DECOMMIT_BATCH);
        let mut config = Config::new();
        if let Some(dir) = cache_dir {
            let mut cache = CacheConfig::new();
            cache.with_directory(dir);
            config.cache(Some(Cache::new(cache)?));
        }
        config
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK_BYTES)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        bindings::Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;

        let ticker = EpochTicker::start(engine.clone())?;
        Ok(Runtime { engine, linker: Arc::new(linker), kept: Arc::default(), _ticker: ticker })
    }

    /// Compiles `bytes` (off the async threads), checks it implements the `plugin` world,
    /// pre-instantiates it, and reads its metadata. `name` labels its log lines.
    pub async fn load(&self, name: &str, bytes: Vec<u8>, limits: Limits) -> Result<Component, LoadError> {
        let engine = self.engine.clone();
        let compiled = tokio::task::spawn_blocking(move || wasmtime::component::Component::new(&engine, &bytes))
            .await
            .map_err(|err| LoadError::Compile(err.to_string()))?
            .map_err(|err| LoadError::Compile(component::describe(&err)))?;
        Component::prepare(&self.engine, &self.linker, &self.kept, &compiled, name, limits).await
    }
}

/// A thread that advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("epoch-ticker".into()).spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compiled plugin from `make plugins`.
    fn wasm(dir: &str, name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir).join(format!("{name}.wasm"));
        std::fs::read(&path).unwrap_or_else(|err| panic!("{} ({err}): run `make plugins` first", path.display()))
    }

    fn event() -> crate::event::Event {
        crate::event::Event {
            id: "e".into(),
            source: "github".into(),
            event_type: "github.push".into(),
            time_ms: 0,
            content_type: "application/json".into(),
            data: bytes::Bytes::from_static(b"{}"),
            attributes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_call_that_finds_the_pool_full_gives_up_the_instances_kept_for_reuse() {
        let noop = wasm("target/test-plugins", "noop");
        let cache = tempfile::tempdir().expect("tempdir");
        // The smallest pool that holds one instance of the plugin.
        let mut size = 1;
        let runtime = loop {
            let runtime = Runtime::with_pool(Some(cache.path()), size).expect("runtime");
            if runtime.load("probe", noop.clone(), Limits::default()).await.is_ok() {
                break runtime;
            }
            size += 1;
            assert!(size <= 16, "noop never fit");
        };
        let kept = Limits { reuse: 100, ..Limits::default() };
        let reused = runtime.load("reused", noop.clone(), kept).await.expect("load");
        let fresh = runtime.load("fresh", noop, Limits::default()).await.expect("load");
        reused.invoke(&event(), 1).await.expect("the kept instance takes the whole pool");
        fresh.invoke(&event(), 1).await.expect("room made");
        reused.invoke(&event(), 1).await.expect("a new instance, the kept one gone");
        let again = runtime.load("again", wasm("target/test-plugins", "noop"), Limits::default()).await;
        again.expect("a load makes room too");
    }
}
