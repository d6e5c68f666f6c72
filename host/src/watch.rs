//! The plugins-folder watcher: file events (debounced), SIGHUP, or a request through the admin
//! API all lead to one rescan of the folder by the registry. Deploying is dropping, replacing
//! or deleting files; nothing restarts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Quiet time after the last file event before the folder is rescanned, so that a file being
/// written in pieces is read once it is whole.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A watch on the plugins folder and on SIGHUP, started before the plugins are first loaded
/// so that no change between that load and the watch is missed.
pub struct FolderWatch {
    /// Held to keep the file watch alive; `None` when the system refused one.
    _watcher: Option<notify::RecommendedWatcher>,
    wake: Arc<Notify>,
    /// Set by SIGHUP: the next rescan retries what failed before ([`Registry::reload`]).
    hangup: Arc<AtomicBool>,
}

impl FolderWatch {
    /// Starts watching `dir` for changes to `.wasm` and `.toml` files, and listening for
    /// SIGHUP. If the system refuses a file watch, the host still reloads on SIGHUP and
    /// `POST /v1/plugins/reload`.
    pub fn start(dir: &Path) -> FolderWatch {
        let wake = Arc::new(Notify::new());
        let watcher = {
            let wake = Arc::clone(&wake);
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) if changes_plugins(&event) => wake.notify_one(),
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "plugins folder watcher error"),
            })
            .and_then(|mut watcher| watcher.watch(dir, RecursiveMode::NonRecursive).map(|()| watcher))
        };
        let watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::error!(folder = %dir.display(), error = %err, "cannot watch the plugins folder; reload with SIGHUP or POST /v1/plugins/reload");
                None
            }
        };
        let hangup = Arc::new(AtomicBool::new(false));
        listen_for_sighup(Arc::clone(&wake), Arc::clone(&hangup));
        FolderWatch { _watcher: watcher, wake, hangup }
    }

    /// Rescans the registry's folder after each burst of changes, until `shutdown`.
    pub async fn run(self, registry: Arc<Registry>, shutdown: CancellationToken) {
        tracing::info!(folder = %registry.dir().display(), "watching the plugins folder");
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
            // Wait for the folder to be quiet: a copy in progress keeps sending events.
            loop {
                tokio::select! {
                    () = self.wake.notified() => continue,
                    () = tokio::time::sleep(DEBOUNCE) => break,
                    () = shutdown.cancelled() => return,
                }
            }
            // A rescan held up by a slow plugin is given up at shutdown (the plugins loaded so
            // far stay consistent).
            let asked = self.hangup.swap(false, Ordering::Relaxed);
            let rescan = async { if asked { registry.reload().await } else { registry.rescan().await } };
            let rescan = tokio::select! {
                rescan = rescan => rescan,
                () = shutdown.cancelled() => return,
            };
            match rescan {
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
}

/// Whether `event` changes a plugin or manifest file. Reads (opens, accesses) do not count:
/// the rescan itself reads every file, and must not wake the watcher again. A notice that
/// events were lost (the kernel's queue overflowed) names no file and always counts.
fn changes_plugins(event: &notify::Event) -> bool {
    use notify::EventKind;
    let changes = matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_));
    event.need_rescan() || (changes && event.paths.iter().any(|path| is_plugin_file(path) || is_swapped_link(path)))
}

/// A plugin (`.wasm`) or manifest (`.toml`) file: the only changes worth a rescan.
fn is_plugin_file(path: &std::path::Path) -> bool {
    path.extension().is_some_and(|ext| ext == "wasm" || ext == "toml")
}

/// The `..data` link of a folder that Kubernetes mounts from a ConfigMap or Secret: each
/// update renames a new `..data` into place, and every `NAME.wasm` is a link through it, so
/// that swap is the only change the folder itself sees.
fn is_swapped_link(path: &std::path::Path) -> bool {
    path.file_name().is_some_and(|name| name == "..data")
}

/// Wakes the watcher on each SIGHUP, with `asked` set. The handler is installed before this returns, so a
/// SIGHUP from then on never kills the host.
fn listen_for_sighup(wake: Arc<Notify>, asked: Arc<AtomicBool>) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: rescanning the plugins folder");
                    asked.store(true, Ordering::Relaxed);
                    wake.notify_one();
                }
            });
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGHUP; use POST /v1/plugins/reload to force a rescan")
        }
    }
    #[cfg(not(unix))]
    let _ = (wake, asked);
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
    fn events_lost_to_an_overflow_wake_the_watcher() {
        let overflow = notify::Event::new(notify::EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(changes_plugins(&overflow));
        assert!(!changes_plugins(&notify::Event::new(notify::EventKind::Other)));
    }

    #[test]
    fn only_plugins_and_manifests_wake_the_watcher() {
        assert!(is_plugin_file("plugins/echo.wasm".as_ref()));
        assert!(is_plugin_file("plugins/echo.toml".as_ref()));
        assert!(!is_plugin_file("plugins/.echo.wasm.swp".as_ref()));
        assert!(!is_plugin_file("plugins/echo.wasm.tmp".as_ref()));
    }

    #[test]
    fn a_kubernetes_volume_update_wakes_the_watcher() {
        use notify::event::{CreateKind, EventKind, ModifyKind, RenameMode};
        let renamed = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path("plugins/..data_tmp".into())
            .add_path("plugins/..data".into());
        assert!(changes_plugins(&renamed));
        let staged = notify::Event::new(EventKind::Create(CreateKind::Folder)).add_path("plugins/..2026_12_03".into());
        assert!(!changes_plugins(&staged), "the new files are not reachable until ..data is swapped");
    }
}
