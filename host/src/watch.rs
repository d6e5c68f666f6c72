//! The plugins-folder watcher: file events (debounced), SIGHUP, or a request through the admin
//! API all lead to one rescan of the folder by the registry. Deploying is dropping, replacing
//! or deleting files, or replacing the whole folder; nothing restarts.

use std::path::{Path, PathBuf};
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
///
/// The folder's parent is watched too, for the folder itself: renamed away, deleted, created,
/// or a link to it swapped. A watch follows the folder it was put on, so each such change
/// moves the watch to whatever folder then has the name.
pub struct FolderWatch {
    /// The folder, absolute: the path the watch and its events use.
    dir: PathBuf,
    /// The file watch; `None` when the system refused one.
    watcher: Option<notify::RecommendedWatcher>,
    wake: Arc<Notify>,
    asked: Arc<Asked>,
}

/// What the next rescan must do besides reading the folder; set by the watch's thread and by
/// SIGHUP, taken by the rescan.
#[derive(Default)]
struct Asked {
    /// SIGHUP: retry what failed before ([`Registry::reload`]), and move the watch, for an
    /// operator who replaced the folder where its parent could not be watched.
    hangup: AtomicBool,
    /// The folder itself changed: move the watch to the one now there, and say so.
    replaced: AtomicBool,
    /// Events were lost, or the reload endpoint asked: move the watch, in case the folder
    /// changed unseen.
    rewatch: AtomicBool,
}

/// Asks the watcher to move its watch to the folder now under the name and rescan, as after
/// SIGHUP; for the reload endpoint, which rescans by itself but does not own the watch.
#[derive(Clone)]
pub struct Rewatch {
    wake: Arc<Notify>,
    asked: Arc<Asked>,
}

impl Rewatch {
    /// Asks; the watcher acts after its debounce.
    pub fn ask(&self) {
        self.asked.rewatch.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

impl FolderWatch {
    /// Starts watching `dir` for changes to `.wasm` and `.toml` files, its parent for changes
    /// to `dir` itself, and listening for SIGHUP. If the system refuses a file watch, the host
    /// still reloads on SIGHUP and `POST /v1/plugins/reload`.
    pub fn start(dir: &Path) -> FolderWatch {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let wake = Arc::new(Notify::new());
        let asked = Arc::new(Asked::default());
        let watcher = {
            let (wake, asked, folder) = (Arc::clone(&wake), Arc::clone(&asked), dir.clone());
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
                Ok(event) => {
                    let flag = match change(&event, &folder) {
                        Change::None => return,
                        Change::Plugins => None,
                        Change::Folder => Some(&asked.replaced),
                        Change::Lost => Some(&asked.rewatch),
                    };
                    if let Some(flag) = flag {
                        flag.store(true, Ordering::Relaxed);
                    }
                    wake.notify_one();
                }
                Err(err) => tracing::warn!(error = %err, "plugins folder watcher error"),
            })
            .and_then(|mut watcher| watcher.watch(&dir, RecursiveMode::NonRecursive).map(|()| watcher))
        };
        let watcher = match watcher {
            Ok(mut watcher) => {
                watch_parent(&mut watcher, &dir);
                Some(watcher)
            }
            Err(err) => {
                tracing::error!(folder = %dir.display(), error = %err, "cannot watch the plugins folder; reload with SIGHUP or POST /v1/plugins/reload");
                None
            }
        };
        listen_for_sighup(Arc::clone(&wake), Arc::clone(&asked));
        FolderWatch { dir, watcher, wake, asked }
    }

    /// A handle through which others ask for the watch to be moved.
    pub fn rewatcher(&self) -> Rewatch {
        Rewatch { wake: Arc::clone(&self.wake), asked: Arc::clone(&self.asked) }
    }

    /// Rescans the registry's folder after each burst of changes, until `shutdown`.
    pub async fn run(mut self, registry: Arc<Registry>, shutdown: CancellationToken) {
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
            let hangup = self.asked.hangup.swap(false, Ordering::Relaxed);
            let replaced = self.asked.replaced.swap(false, Ordering::Relaxed);
            let rewatch = self.asked.rewatch.swap(false, Ordering::Relaxed);
            if (hangup || replaced || rewatch) && !self.rewatch(replaced).await {
                continue; // No folder to read: the loaded plugins keep serving.
            }
            // A rescan held up by a slow plugin is given up at shutdown (the plugins loaded so
            // far stay consistent).
            let rescan = async { if hangup { registry.reload().await } else { registry.rescan().await } };
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

    /// Moves the watch to the folder that now has the name, before the rescan reads it, so
    /// that no later change is missed; says so when the folder was `replaced`. Returns whether
    /// a folder has the name: one that is gone is watched again when its parent sees it return.
    async fn rewatch(&mut self, replaced: bool) -> bool {
        let (mut watcher, dir) = (self.watcher.take(), self.dir.clone());
        // notify's calls wait for its thread, and a stat may wait for a slow file system.
        let moved = tokio::task::spawn_blocking(move || {
            let there = rewatch(watcher.as_mut(), &dir, replaced);
            (watcher, there)
        })
        .await;
        let Ok((watcher, there)) = moved else { return true };
        self.watcher = watcher;
        there
    }
}

/// [`FolderWatch::rewatch`]'s blocking part.
fn rewatch(watcher: Option<&mut notify::RecommendedWatcher>, dir: &Path, replaced: bool) -> bool {
    let watched = watcher.map(|watcher| {
        // The old folder's watch, unless the system already ended it with the folder.
        let _ = watcher.unwatch(dir);
        watcher.watch(dir, RecursiveMode::NonRecursive)
    });
    let there = dir.exists();
    let folder = dir.display();
    match watched {
        _ if !there => {
            tracing::warn!(%folder, "the plugins folder is gone; its plugins keep serving until it returns")
        }
        Some(Ok(())) if replaced => {
            tracing::info!(%folder, "the plugins folder itself changed; watching the one now there")
        }
        Some(Err(err)) => {
            tracing::error!(%folder, error = %err, "cannot watch the plugins folder; reload with SIGHUP or POST /v1/plugins/reload")
        }
        _ => {}
    }
    there
}

/// Watches `dir`'s parent for changes to `dir` itself; without it, a replaced folder is
/// watched again only after SIGHUP.
fn watch_parent(watcher: &mut notify::RecommendedWatcher, dir: &Path) {
    let Some(parent) = dir.parent() else { return };
    if let Err(err) = watcher.watch(parent, RecursiveMode::NonRecursive) {
        tracing::warn!(
            folder = %parent.display(), error = %err,
            "cannot watch the plugins folder's parent; after replacing the plugins folder itself, send SIGHUP"
        );
    }
}

/// What an event of the watch means.
#[derive(Debug, PartialEq)]
enum Change {
    /// Nothing a rescan would see.
    None,
    /// A plugin or manifest file in the folder changed.
    Plugins,
    /// The folder itself (or the link by its name) was created, removed, renamed or replaced.
    Folder,
    /// Events were lost (the kernel's queue overflowed): any of the above.
    Lost,
}

/// What `event` means for the plugins folder `dir`. Reads (opens, accesses) do not count:
/// the rescan itself reads the folder and every file, and must not wake the watcher again.
/// Neither do changes to the parent's other files, such as the host's own config, nor the
/// folder's own metadata (`chmod`, `touch`, `rsync -a`).
fn change(event: &notify::Event, dir: &Path) -> Change {
    use notify::EventKind;
    use notify::event::ModifyKind;
    let changes = matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_));
    let moved =
        matches!(event.kind, EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_));
    if event.need_rescan() {
        Change::Lost
    } else if moved && event.paths.iter().any(|path| path == dir) {
        Change::Folder
    } else if changes
        && event.paths.iter().any(|path| path.parent() == Some(dir) && (is_plugin_file(path) || is_swapped_link(path)))
    {
        Change::Plugins
    } else {
        Change::None
    }
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

/// Wakes the watcher on each SIGHUP, with `asked.hangup` set. The handler is installed before
/// this returns, so a SIGHUP from then on never kills the host.
fn listen_for_sighup(wake: Arc<Notify>, asked: Arc<Asked>) {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: rescanning the plugins folder");
                    asked.hangup.store(true, Ordering::Relaxed);
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
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode};

    fn on(kind: EventKind, path: &str) -> Change {
        change(&notify::Event::new(kind).add_path(path.into()), "/srv/plugins".as_ref())
    }

    #[test]
    fn reading_a_plugin_does_not_wake_the_watcher() {
        assert_eq!(on(EventKind::Create(CreateKind::File), "/srv/plugins/echo.wasm"), Change::Plugins);
        assert_eq!(on(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/srv/plugins/echo.wasm"), Change::Plugins);
        let read = EventKind::Access(AccessKind::Open(AccessMode::Read));
        assert_eq!(on(read, "/srv/plugins/echo.wasm"), Change::None);
        assert_eq!(on(read, "/srv/plugins"), Change::None, "the rescan opens the folder, seen from its parent");
    }

    #[test]
    fn events_lost_to_an_overflow_wake_the_watcher() {
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(change(&overflow, "/srv/plugins".as_ref()), Change::Lost);
        assert_eq!(change(&notify::Event::new(EventKind::Other), "/srv/plugins".as_ref()), Change::None);
    }

    #[test]
    fn only_plugins_and_manifests_in_the_folder_wake_the_watcher() {
        assert!(is_plugin_file("plugins/echo.wasm".as_ref()));
        assert!(is_plugin_file("plugins/echo.toml".as_ref()));
        assert!(!is_plugin_file("plugins/.echo.wasm.swp".as_ref()));
        assert!(!is_plugin_file("plugins/echo.wasm.tmp".as_ref()));
        let written = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        assert_eq!(on(written, "/srv/wasmhook.toml"), Change::None, "the parent's own files are not plugins");
    }

    #[test]
    fn the_folder_itself_changing_moves_the_watch() {
        assert_eq!(on(EventKind::Remove(RemoveKind::Folder), "/srv/plugins"), Change::Folder);
        assert_eq!(on(EventKind::Create(CreateKind::Folder), "/srv/plugins"), Change::Folder);
        assert_eq!(on(EventKind::Modify(ModifyKind::Name(RenameMode::From)), "/srv/plugins"), Change::Folder);
        // A link swapped by `mv -T`: a new link renamed over the name.
        let swapped = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path("/srv/.plugins.new".into())
            .add_path("/srv/plugins".into());
        assert_eq!(change(&swapped, "/srv/plugins".as_ref()), Change::Folder);
        assert_eq!(on(EventKind::Create(CreateKind::Folder), "/srv/plugins.new"), Change::None, "a sibling");
        let touched = EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any));
        assert_eq!(on(touched, "/srv/plugins"), Change::None, "the same folder, its times or mode changed");
    }

    #[test]
    fn a_kubernetes_volume_update_wakes_the_watcher() {
        let renamed = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path("/srv/plugins/..data_tmp".into())
            .add_path("/srv/plugins/..data".into());
        assert_eq!(change(&renamed, "/srv/plugins".as_ref()), Change::Plugins);
        let staged = EventKind::Create(CreateKind::Folder);
        assert_eq!(on(staged, "/srv/plugins/..2026_12_03"), Change::None, "unreachable until ..data is swapped");
    }
}
