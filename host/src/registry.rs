//! The plugins the host runs: loaded from the plugins folder, found by name, matched to event
//! types through their subscriptions, and replaced while the host runs.
//!
//! A plugin's name is its file name without `.wasm`: the operator's name for the deployment;
//! its version is the SHA-256 of the file. [`Registry::rescan`] brings the loaded set in line
//! with the folder: new and changed files (or manifests) are compiled off the hot path and
//! swapped in at once; a file that fails to load leaves the previous version serving; a
//! deleted file stops receiving new deliveries. Lookups take a snapshot, so a call that
//! started on one version finishes on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use globset::GlobSet;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::Env;
use crate::event::now_ms;
use crate::journal::Want;
use crate::manifest::Manifest;
use crate::metrics;
use crate::retry::RetryPolicy;
use crate::runtime::{Component, Runtime};

/// One loaded plugin version.
#[derive(Debug)]
pub struct Plugin {
    /// The file name without `.wasm`.
    pub name: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Hex SHA-256 of the file: the identity of this build.
    pub sha256: String,
    /// When it was loaded, in milliseconds since the Unix epoch.
    pub loaded_at: u64,
    /// The glob patterns it subscribes to.
    pub subscriptions: Arc<[String]>,
    /// The compiled code, ready to call.
    pub component: Component,
    /// How its failed deliveries are retried.
    pub retry: RetryPolicy,
    /// Calls of it that may run at once.
    pub concurrency: usize,
    /// The free permits of `concurrency`.
    pub calls: Arc<Semaphore>,
    /// The `http_allow` entries its manifest grants, as written.
    pub http_allow: Vec<String>,
    /// The `config` keys its manifest grants (values are not shown: some are secrets).
    pub config_keys: Vec<String>,
    /// Hex SHA-256 of its manifest's text (of nothing, without one).
    manifest_sha256: String,
    matcher: GlobSet,
}

impl Plugin {
    /// Whether this plugin subscribes to `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.matcher.is_match(event_type)
    }
}

/// What the operator sees of one plugin file, loaded or not.
#[derive(Debug, Clone)]
pub struct Status {
    /// The serving version, if one is loaded.
    pub plugin: Option<Arc<Plugin>>,
    /// The file.
    pub file: PathBuf,
    /// Why the file's current content could not be loaded (the previous version, if any,
    /// keeps serving).
    pub last_error: Option<String>,
    /// When the file was deleted, if it was.
    pub removed_at: Option<u64>,
}

/// What one rescan changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Reloaded {
    /// Plugins loaded for the first time (or back after removal).
    pub loaded: Vec<String>,
    /// Plugins whose new version replaced the old.
    pub replaced: Vec<String>,
    /// Plugins whose file is gone.
    pub removed: Vec<String>,
    /// Plugins whose file could not be loaded.
    pub failed: Vec<String>,
    /// Plugins that did not change.
    pub unchanged: usize,
}

impl Reloaded {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        !(self.loaded.is_empty() && self.replaced.is_empty() && self.removed.is_empty() && self.failed.is_empty())
    }
}

/// A file's state between rescans, beyond the loaded version.
#[derive(Debug, Clone, Default)]
struct Slot {
    file: PathBuf,
    last_error: Option<String>,
    /// The (file, manifest) hashes that failed, so the same failure is logged once.
    failed: Option<(String, String)>,
    removed_at: Option<u64>,
    /// A removed plugin's calls (and the limit they count against): calls still running
    /// count against its next version too, as on a replace.
    removed_calls: Option<(Arc<Semaphore>, usize)>,
}

/// The loaded plugins, by name, and what is needed to reload them.
pub struct Registry {
    plugins: RwLock<Arc<BTreeMap<String, Arc<Plugin>>>>,
    slots: Mutex<BTreeMap<String, Slot>>,
    rescanning: tokio::sync::Mutex<()>,
    runtime: Arc<Runtime>,
    dir: PathBuf,
    retry: RetryPolicy,
    env: Arc<dyn Env + Send + Sync>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry of the plugins in `dir`, loaded now. `retry` is the policy manifests may
    /// override and `env` holds the variables manifests name. Only an unreadable folder is an
    /// error; a file that cannot be loaded is logged and skipped.
    pub async fn load(
        runtime: Arc<Runtime>,
        dir: &Path,
        retry: RetryPolicy,
        env: Arc<dyn Env + Send + Sync>,
    ) -> anyhow::Result<Registry> {
        let registry = Registry {
            plugins: RwLock::default(),
            slots: Mutex::default(),
            rescanning: tokio::sync::Mutex::new(()),
            runtime,
            dir: dir.to_owned(),
            retry,
            env,
        };
        registry.rescan_with(loading_bar(), false).await?;
        if registry.snapshot().is_empty() {
            tracing::warn!(folder = %dir.display(), "no plugins loaded; events will be kept as unrouted");
        }
        Ok(registry)
    }

    /// The folder the plugins come from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Brings the loaded plugins in line with the folder and swaps the new set in at once.
    /// One rescan runs at a time.
    pub async fn rescan(&self) -> anyhow::Result<Reloaded> {
        self.rescan_with(indicatif::ProgressBar::hidden(), false).await
    }

    /// A rescan the operator asked for (SIGHUP, `POST /v1/plugins/reload`): content that
    /// failed to load before is tried again too, since its failure may have passed (a
    /// `metadata()` that ran out of time, a full pool of instances). A plain rescan skips it,
    /// so that each bad file is logged once.
    pub async fn reload(&self) -> anyhow::Result<Reloaded> {
        self.rescan_with(indicatif::ProgressBar::hidden(), true).await
    }

    /// [`Self::rescan`], advancing `progress` by one for each file; with `retry_failed`, as
    /// [`Self::reload`].
    async fn rescan_with(&self, progress: indicatif::ProgressBar, retry_failed: bool) -> anyhow::Result<Reloaded> {
        let _one_at_a_time = self.rescanning.lock().await;
        if retry_failed {
            for slot in self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values_mut() {
                slot.failed = None;
            }
        }
        let dir = self.dir.clone();
        let files = tokio::task::spawn_blocking(move || wasm_files(&dir)).await??;
        progress.set_length(files.len() as u64);
        let current = self.snapshot();
        let mut next = BTreeMap::new();
        let mut fresh = Vec::new();
        let mut reloaded = Reloaded::default();
        let present: std::collections::BTreeSet<String> =
            files.iter().filter_map(|file| file.file_stem()?.to_str().map(str::to_owned)).collect();
        for file in files {
            let Some(name) = file.file_stem().and_then(|stem| stem.to_str()).map(str::to_owned) else {
                tracing::error!(file = %file.display(), "plugin skipped: the file name is not valid UTF-8");
                continue;
            };
            let existing = current.get(&name).cloned();
            let removed_calls = if existing.is_none() { self.removed_calls(&name) } else { None };
            progress.set_message(name.clone());
            let scanned = self.scan_file(&name, &file, existing.as_deref()).await;
            progress.inc(1);
            match scanned {
                Scanned::Unchanged => reloaded.unchanged += 1,
                Scanned::Loaded(plugin) => {
                    let verb = if existing.is_some() { "plugin replaced" } else { "plugin loaded" };
                    tracing::info!(
                        plugin = %plugin.name, version = %plugin.component.metadata().version,
                        subscriptions = ?plugin.subscriptions, sha256 = %plugin.sha256,
                        previous = existing.as_ref().map_or("", |old| old.sha256.as_str()), "{verb}"
                    );
                    if existing.is_some() { &mut reloaded.replaced } else { &mut reloaded.loaded }.push(name.clone());
                    fresh.push((name, plugin, removed_calls));
                    continue;
                }
                Scanned::Failed => reloaded.failed.push(name.clone()),
                Scanned::FailedBefore => {}
            }
            if let Some(existing) = existing {
                next.insert(name, existing);
            }
        }
        progress.finish_and_clear();
        // The serving versions' permits carry over only now, with nothing left to wait for
        // before the swap: a rescan abandoned midway (its caller gone) leaves them as they were.
        for (name, mut plugin, removed_calls) in fresh {
            // Calls of the old version still running count against the new one.
            if let Some(old) = current.get(&name) {
                plugin.calls = carry_calls(&old.calls, old.concurrency, plugin.concurrency);
            } else if let Some((calls, limit)) = removed_calls {
                plugin.calls = carry_calls(&calls, limit, plugin.concurrency);
            }
            next.insert(name, Arc::new(*plugin));
        }
        for (name, old) in current.iter().filter(|(name, _)| !next.contains_key(*name)) {
            tracing::info!(plugin = %name, "plugin removed: no new deliveries; pending ones wait for its return");
            self.slot(name, |slot| {
                slot.removed_at = Some(now_ms());
                slot.removed_calls = Some((Arc::clone(&old.calls), old.concurrency));
            });
            reloaded.removed.push(name.clone());
        }
        // A file that never loaded and is gone now is forgotten (a removed plugin is kept, with
        // the deliveries that wait for it).
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|name, slot| {
            if present.contains(name) || current.contains_key(name) {
                return true;
            }
            if slot.removed_calls.is_some() {
                // Served once and gone again (after a bad copy showed it failed): removed.
                slot.removed_at.get_or_insert_with(now_ms);
            }
            slot.removed_at.is_some()
        });
        metrics::plugins_loaded(next.len());
        *self.plugins.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        Ok(reloaded)
    }

    /// Loads `file` unless it and its manifest are what `existing` was loaded from.
    async fn scan_file(&self, name: &str, file: &Path, existing: Option<&Plugin>) -> Scanned {
        let path = file.to_owned();
        let read = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|err| format!("cannot read it: {err}"))?;
            let manifest = read_manifest(&path)?;
            let hashes = (hex::encode(Sha256::digest(&bytes)), hex::encode(Sha256::digest(manifest.as_bytes())));
            Ok::<_, String>((bytes, manifest, hashes))
        })
        .await
        .map_err(|err| err.to_string())
        .and_then(|read| read);
        let (bytes, manifest_text, hashes) = match read {
            Ok(read) => read,
            Err(reason) => return self.failed(name, file, (String::new(), String::new()), reason, existing.is_some()),
        };
        if existing.is_some_and(|plugin| (&plugin.sha256, &plugin.manifest_sha256) == (&hashes.0, &hashes.1)) {
            // Back to the serving version after a bad write: the old failure no longer applies.
            self.slot(name, |slot| {
                slot.last_error = None;
                slot.failed = None;
            });
            return Scanned::Unchanged;
        }
        let failed_before = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .and_then(|slot| slot.failed.clone());
        if failed_before.as_ref() == Some(&hashes) {
            return Scanned::FailedBefore;
        }
        let started = std::time::Instant::now();
        match self.load_plugin(name, file, bytes, hashes.clone(), &manifest_text).await {
            Ok(plugin) => {
                metrics::plugin_loaded(name, started.elapsed());
                self.slot(name, |slot| *slot = Slot { file: file.to_owned(), ..Slot::default() });
                Scanned::Loaded(Box::new(plugin))
            }
            Err(reason) => self.failed(name, file, hashes, reason, existing.is_some()),
        }
    }

    fn failed(&self, name: &str, file: &Path, hashes: (String, String), reason: String, serving: bool) -> Scanned {
        if serving {
            tracing::error!(file = %file.display(), %reason, "plugin not reloaded; the previous version keeps serving");
        } else {
            tracing::error!(file = %file.display(), %reason, "plugin skipped");
        }
        metrics::plugin_load_failed(name);
        self.slot(name, |slot| {
            slot.file = file.to_owned();
            slot.last_error = Some(reason);
            slot.failed = Some(hashes);
            slot.removed_at = None; // its file is back: failed, no longer removed
        });
        Scanned::Failed
    }

    /// The calls of `name` as it was when removed, if it was.
    fn removed_calls(&self, name: &str) -> Option<(Arc<Semaphore>, usize)> {
        let slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.get(name).and_then(|slot| slot.removed_calls.clone())
    }

    fn slot(&self, name: &str, change: impl FnOnce(&mut Slot)) {
        change(
            self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(name.to_owned()).or_default(),
        );
    }

    async fn load_plugin(
        &self,
        name: &str,
        file: &Path,
        bytes: Vec<u8>,
        (sha256, manifest_sha256): (String, String),
        manifest_text: &str,
    ) -> Result<Plugin, String> {
        let manifest_path = file.with_extension("toml");
        let manifest = Manifest::parse(manifest_text).map_err(|err| format!("{}: {err}", manifest_path.display()))?;
        let grants = manifest
            .grants(self.env.as_ref(), &self.retry)
            .map_err(|problems| format!("{}: {}", manifest_path.display(), problems.join("; ")))?;
        let limits = grants.limits();
        let component = self.runtime.load(name, bytes, limits).await.map_err(|err| err.to_string())?;
        let in_manifest = grants.subscriptions.is_some();
        let subscriptions = grants.subscriptions.unwrap_or_else(|| component.metadata().subscriptions.clone());
        let matcher = crate::subscription::matcher(&subscriptions)
            .map_err(|err| if in_manifest { format!("{}: {err}", manifest_path.display()) } else { err })?;
        if subscriptions.is_empty() {
            tracing::warn!(plugin = %name, "plugin subscribes to nothing");
        }
        Ok(Plugin {
            name: name.to_owned(),
            file: file.to_owned(),
            sha256,
            loaded_at: now_ms(),
            subscriptions: subscriptions.into(),
            component,
            retry: grants.retry,
            concurrency: grants.concurrency,
            calls: Arc::new(Semaphore::new(grants.concurrency)),
            http_allow: manifest.http_allow,
            config_keys: grants.config.into_keys().collect(),
            manifest_sha256,
            matcher,
        })
    }

    fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Plugin>>> {
        Arc::clone(&self.plugins.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Names of the plugins that subscribe to `event_type`, in name order.
    pub fn route(&self, event_type: &str) -> Vec<String> {
        self.snapshot()
            .values()
            .filter(|plugin| plugin.subscribes_to(event_type))
            .map(|plugin| plugin.name.clone())
            .collect()
    }

    /// The serving version of the plugin called `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.snapshot().get(name).cloned()
    }

    /// Every plugin file seen, loaded or not, in name order.
    pub fn statuses(&self) -> Vec<(String, Status)> {
        let loaded = self.snapshot();
        let slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut names: Vec<&String> = loaded.keys().chain(slots.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let slot = slots.get(name).cloned().unwrap_or_default();
                let plugin = loaded.get(name).cloned();
                let file = plugin.as_ref().map_or(slot.file.clone(), |plugin| plugin.file.clone());
                let removed_at = if plugin.is_some() { None } else { slot.removed_at };
                (name.clone(), Status { plugin, file, last_error: slot.last_error, removed_at })
            })
            .collect()
    }

    /// Every loaded plugin as the journal's `take` wants it: how many calls it can start now,
    /// and a lease of its timeout plus `lease_margin`.
    pub fn wants(&self, lease_margin: Duration) -> Vec<Want> {
        self.snapshot()
            .values()
            .map(|plugin| Want {
                plugin: plugin.name.clone(),
                free: plugin.calls.available_permits(),
                subscriptions: Arc::clone(&plugin.subscriptions),
                lease: plugin.component.limits().timeout + lease_margin,
                since_ms: plugin.loaded_at,
            })
            .collect()
    }
}

/// A progress bar for the first load, drawn only when stderr is a terminal (logs go to stdout).
fn loading_bar() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("loading plugins {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

/// What scanning one file found.
enum Scanned {
    Unchanged,
    /// A new version, whose permits are not yet carried over from the serving one.
    Loaded(Box<Plugin>),
    Failed,
    /// The same content failed before; nothing new to say.
    FailedBefore,
}

/// The permits of a plugin's new version that allows `new_limit` calls at once, from its old
/// version's `old` (which allowed `old_limit`): the same semaphore, so that the calls still
/// running on the old version hold permits of the new one too. A higher limit adds permits at
/// once; a lower one takes back the free ones now and the rest as running calls end.
fn carry_calls(old: &Arc<Semaphore>, old_limit: usize, new_limit: usize) -> Arc<Semaphore> {
    if new_limit >= old_limit {
        old.add_permits(new_limit - old_limit);
    } else {
        let surplus = old_limit - new_limit;
        let owed = surplus - old.forget_permits(surplus);
        if let Ok(owed) = u32::try_from(owed)
            && owed > 0
        {
            let old = Arc::clone(old);
            tokio::spawn(async move {
                if let Ok(permits) = old.acquire_many(owed).await {
                    permits.forget();
                }
            });
        }
    }
    Arc::clone(old)
}

/// The `*.wasm` files of `dir`, sorted.
fn wasm_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|err| anyhow::anyhow!("cannot read the plugins folder {}: {err}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path =
            entry.map_err(|err| anyhow::anyhow!("cannot list the plugins folder {}: {err}", dir.display()))?.path();
        // Only a file that is not there is gone: one that cannot be looked at now (a network
        // file system's hiccup) stays in the list, so that reading it fails and the version
        // it serves stays.
        let listed = match std::fs::metadata(&path) {
            Ok(metadata) => metadata.is_file(),
            Err(err) => err.kind() != std::io::ErrorKind::NotFound,
        };
        if listed && path.extension().is_some_and(|ext| ext == "wasm") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The manifest beside `wasm` as text; none is the empty manifest.
fn read_manifest(wasm: &Path) -> Result<String, String> {
    let path = wasm.with_extension("toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(err) => Err(format!("cannot read {}: {err}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_file_that_cannot_be_looked_at_is_listed_and_one_that_is_gone_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.wasm"), b"").expect("write");
        std::fs::write(dir.path().join("a.toml"), b"").expect("write");
        std::fs::create_dir(dir.path().join("folder.wasm")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("gone.wasm")).expect("link");
        std::os::unix::fs::symlink(dir.path().join("loop.wasm"), dir.path().join("loop.wasm")).expect("link");
        let names: Vec<_> = wasm_files(dir.path())
            .expect("listed")
            .iter()
            .map(|path| path.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.wasm", "loop.wasm"]);
    }

    #[tokio::test]
    async fn a_new_version_counts_the_calls_still_running_on_the_old_one() {
        let old = Arc::new(Semaphore::new(1));
        let running = Arc::clone(&old).try_acquire_owned().expect("one call running");
        let same = carry_calls(&old, 1, 1);
        assert_eq!(same.available_permits(), 0, "concurrency 1 stays 1 across a reload");
        drop(running);
        assert_eq!(same.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_higher_limit_frees_the_difference_at_once() {
        let old = Arc::new(Semaphore::new(2));
        let _running = Arc::clone(&old).try_acquire_owned().expect("one call running");
        assert_eq!(carry_calls(&old, 2, 5).available_permits(), 4);
    }

    #[tokio::test]
    async fn a_lower_limit_takes_back_the_free_permits_now_and_the_rest_as_calls_end() {
        let old = Arc::new(Semaphore::new(4));
        let running = Arc::clone(&old).try_acquire_many_owned(3).expect("three calls running");
        let lower = carry_calls(&old, 4, 2);
        assert_eq!(lower.available_permits(), 0, "the free one is gone, and no call may start");
        drop(running);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(lower.available_permits(), 2, "once the three calls end, the new limit holds");
    }
}
