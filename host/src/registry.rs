//! The plugins the host runs: loaded from the plugins folder, found by name, and matched to
//! event types through their subscriptions.
//!
//! A plugin's name is its file name without `.wasm`: the operator's name for the deployment.
//! Lookups take a snapshot, so a caller keeps a consistent view while it works.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::Env;
use crate::manifest::Manifest;
use crate::retry::RetryPolicy;
use crate::runtime::{Component, Limits, Runtime};

/// One loaded plugin.
#[derive(Debug)]
pub struct Plugin {
    /// The file name without `.wasm`.
    pub name: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// Hex SHA-256 of the file: the identity of this build.
    pub sha256: String,
    /// The glob patterns it subscribes to.
    pub subscriptions: Vec<String>,
    /// The compiled code, ready to call.
    pub component: Component,
    /// How its failed deliveries are retried.
    pub retry: RetryPolicy,
    /// Calls of it that may run at once, as permits.
    pub calls: Arc<Semaphore>,
    /// The `http_allow` entries its manifest grants, as written.
    pub http_allow: Vec<String>,
    /// The `config` keys its manifest grants (values are not shown: some are secrets).
    pub config_keys: Vec<String>,
    matcher: GlobSet,
}

impl Plugin {
    /// Whether this plugin subscribes to `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.matcher.is_match(event_type)
    }
}

/// The loaded plugins, by name.
#[derive(Debug, Default)]
pub struct Registry {
    plugins: RwLock<Arc<BTreeMap<String, Arc<Plugin>>>>,
}

impl Registry {
    /// Loads every `*.wasm` in `dir`, with `retry` as the policy manifests may override and
    /// `env` for the variables manifests name. A file that cannot be loaded is skipped with
    /// one error line naming it and the reason; only an unreadable folder is an error.
    pub async fn load_dir(
        runtime: &Runtime,
        dir: &Path,
        retry: &RetryPolicy,
        env: &dyn Env,
    ) -> anyhow::Result<Registry> {
        let entries = std::fs::read_dir(dir)
            .map_err(|err| anyhow::anyhow!("cannot read the plugins folder {}: {err}", dir.display()))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
            .collect();
        files.sort();
        let mut plugins = BTreeMap::new();
        for file in files {
            match load_file(runtime, &file, retry, env).await {
                Ok(plugin) => {
                    tracing::info!(
                        plugin = %plugin.name, version = %plugin.component.metadata().version,
                        subscriptions = ?plugin.subscriptions, sha256 = %plugin.sha256, "plugin loaded"
                    );
                    plugins.insert(plugin.name.clone(), Arc::new(plugin));
                }
                Err(reason) => tracing::error!(file = %file.display(), %reason, "plugin skipped"),
            }
        }
        if plugins.is_empty() {
            tracing::warn!(folder = %dir.display(), "no plugins loaded; events will be kept as unrouted");
        }
        Ok(Registry { plugins: RwLock::new(Arc::new(plugins)) })
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

    /// The plugin called `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.snapshot().get(name).cloned()
    }

    /// Every loaded plugin, in name order.
    pub fn list(&self) -> Vec<Arc<Plugin>> {
        self.snapshot().values().cloned().collect()
    }

    /// Names of every loaded plugin.
    pub fn names(&self) -> Vec<String> {
        self.snapshot().keys().cloned().collect()
    }

    /// Names of the loaded plugins that can start another call now (below their concurrency).
    pub fn ready_names(&self) -> Vec<String> {
        self.snapshot()
            .values()
            .filter(|plugin| plugin.calls.available_permits() > 0)
            .map(|plugin| plugin.name.clone())
            .collect()
    }

    /// The longest call timeout among the loaded plugins.
    pub fn max_timeout(&self) -> Duration {
        self.snapshot().values().map(|plugin| plugin.component.limits().timeout).max().unwrap_or_default()
    }
}

async fn load_file(runtime: &Runtime, file: &Path, retry: &RetryPolicy, env: &dyn Env) -> Result<Plugin, String> {
    let name = file
        .file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| !stem.is_empty())
        .ok_or("the file name is not valid UTF-8")?
        .to_owned();
    let bytes = std::fs::read(file).map_err(|err| format!("cannot read it: {err}"))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let manifest = Manifest::beside(file)?;
    let grants = manifest
        .grants(env, retry)
        .map_err(|problems| format!("{}: {}", file.with_extension("toml").display(), problems.join("; ")))?;
    let limits = Limits {
        timeout: grants.timeout,
        memory_bytes: grants.memory_bytes,
        config: Arc::new(grants.config.clone()),
        http_allow: Arc::new(grants.http_allow),
    };
    let component = runtime.load(&name, bytes, limits).await.map_err(|err| err.to_string())?;
    let subscriptions = grants.subscriptions.unwrap_or_else(|| component.metadata().subscriptions.clone());
    let matcher = matcher(&subscriptions)?;
    if subscriptions.is_empty() {
        tracing::warn!(plugin = %name, "plugin subscribes to nothing");
    }
    Ok(Plugin {
        name,
        file: file.to_owned(),
        sha256,
        subscriptions,
        component,
        retry: grants.retry,
        calls: Arc::new(Semaphore::new(grants.concurrency)),
        http_allow: manifest.http_allow,
        config_keys: grants.config.into_keys().collect(),
        matcher,
    })
}

/// One matcher for a list of patterns. `*` matches any run of characters, dots included.
pub fn matcher(patterns: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(Glob::new(pattern).map_err(|err| format!("subscription {pattern:?} is not a valid pattern: {err}"))?);
    }
    set.build().map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(patterns: &[&str], event_type: &str) -> bool {
        let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        matcher(&patterns).expect("valid patterns").is_match(event_type)
    }

    #[test]
    fn star_matches_across_dots() {
        assert!(matches(&["*"], "github.pull_request.opened"));
        assert!(matches(&["github.*"], "github.pull_request.opened"));
        assert!(matches(&["stripe.invoice.*"], "stripe.invoice.paid"));
        assert!(!matches(&["stripe.invoice.*"], "stripe.charge.failed"));
        assert!(!matches(&["github.push"], "github.push.extra"));
        assert!(matches(&["github.push", "github.issues.*"], "github.issues.opened"));
        assert!(!matches(&[], "github.push"));
    }

    #[test]
    fn a_bad_pattern_is_named() {
        let err = matcher(&["github.[".to_owned()]).expect_err("unclosed class");
        assert!(err.contains("github.["), "{err}");
    }
}
