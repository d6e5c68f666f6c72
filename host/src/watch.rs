//! The plugins-folder watcher: file events (debounced), SIGHUP, or a request through the admin
//! API all lead to one rescan of the folder by the registry. Deploying is dropping, replacing
//! or deleting files; nothing restarts.

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Quiet time after the last file event before the folder is rescanned, so that a file being
/// written in pieces is read once it is whole.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Watches the registry's folder until `shutdown`, rescanning after each burst of changes to a
/// `.wasm` or `.toml` file, and on SIGHUP.
pub async fn run(registry: Arc<Registry>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    let mut watcher = {
        let wake = Arc::clone(&wake);
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if changes_plugins(&event) => wake.notify_one(),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "plugins folder watcher error"),
        })?
    };
    watcher.watch(registry.dir(), RecursiveMode::NonRecursive)?;
    tokio::spawn(wake_on_sighup(Arc::clone(&wake), shutdown.clone()));
    tracing::info!(folder = %registry.dir().display(), "watching the plugins folder");
    loop {
        tokio::select! {
            () = wake.notified() => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        // Wait for the folder to be quiet: a copy in progress keeps sending events.
        loop {
            tokio::select! {
                () = wake.notified() => continue,
                () = tokio::time::sleep(DEBOUNCE) => break,
                () = shutdown.cancelled() => return Ok(()),
            }
        }
        match registry.rescan().await {
            Ok(reloaded) if reloaded.changed() => tracing::info!(
                loaded = ?reloaded.loaded, replaced = ?reloaded.replaced, removed = ?reloaded.removed,
                failed = ?reloaded.failed, "plugins folder rescanned"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::error!(error = %err, "cannot rescan the plugins folder; the loaded plugins keep serving")
            }
        }
    }
}

/// Whether `event` changes a plugin or manifest file. Reads (opens, accesses) do not count:
/// the rescan itself reads every file, and must not wake the watcher again.
fn changes_plugins(event: &notify::Event) -> bool {
    use notify::EventKind;
    matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_))
        && event.paths.iter().any(|path| is_plugin_file(path))
}

/// A plugin (`.wasm`) or manifest (`.toml`) file: the only changes worth a rescan.
fn is_plugin_file(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|ext| ext == "wasm" || ext == "toml")
}

async fn wake_on_sighup(wake: Arc<Notify>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; use POST /v1/plugins/reload to force a rescan");
            return;
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP: rescanning the plugins folder");
                    wake.notify_one();
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (wake, shutdown);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_plugin_does_not_wake_the_watcher() {
        use notify::event::{AccessKind, CreateKind, EventKind, ModifyKind, RenameMode};
        let on = |kind| notify::Event::new(kind).add_path("plugins/echo.wasm".into());
        assert!(changes_plugins(&on(EventKind::Create(CreateKind::File))));
        assert!(changes_plugins(&on(EventKind::Modify(ModifyKind::Name(RenameMode::To)))));
        assert!(!changes_plugins(&on(EventKind::Access(AccessKind::Open(notify::event::AccessMode::Read)))));
    }

    #[test]
    fn only_plugins_and_manifests_wake_the_watcher() {
        assert!(is_plugin_file("plugins/echo.wasm".as_ref()));
        assert!(is_plugin_file("plugins/echo.toml".as_ref()));
        assert!(!is_plugin_file("plugins/.echo.wasm.swp".as_ref()));
        assert!(!is_plugin_file("plugins/echo.wasm.tmp".as_ref()));
    }
}
