//! The `host` interface plugins import: each call's state and the functions it offers
//! (log through the host's tracing, config lookup), plus the empty WASI context every
//! `wasm32-wasip2` component needs to link.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::Level;
use super::bindings::wasmhook::plugin::{host, types};

/// Everything one call's store holds. A fresh one per call: nothing leaks between events.
pub struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: StoreLimits,
    plugin: Arc<str>,
    event_id: Option<String>,
    config: Arc<BTreeMap<String, String>>,
}

impl CallState {
    /// State for a call of `plugin` on `event_id` (none while loading), with at most
    /// `memory_bytes` of linear memory.
    pub fn new(
        plugin: Arc<str>,
        event_id: Option<String>,
        config: Arc<BTreeMap<String, String>>,
        memory_bytes: usize,
    ) -> Self {
        CallState {
            // The default context grants nothing: no environment, no preopened folders,
            // no sockets, stdin closed, stdout and stderr discarded.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(memory_bytes).trap_on_grow_failure(true).build(),
            plugin,
            event_id,
            config,
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for CallState {}

impl host::Host for CallState {
    async fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin;
        let event_id = self.event_id.as_deref().unwrap_or("");
        match level {
            Level::Trace => {
                tracing::trace!(target: "plugin", plugin, event.id = event_id, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "plugin", plugin, event.id = event_id, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "plugin", plugin, event.id = event_id, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "plugin", plugin, event.id = event_id, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "plugin", plugin, event.id = event_id, "{message}")
            }
        }
    }

    async fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}
