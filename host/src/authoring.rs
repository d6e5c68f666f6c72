//! Tools for plugin authors, before they deploy: run a plugin once on a sample event under
//! the server's limits, check a component against the world and show what its manifest
//! grants, and scaffold a new plugin crate that builds as is.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::ProcessEnv;
use crate::event::{Event, now_ms};
use crate::manifest::{Grants, Manifest};
use crate::retry::RetryPolicy;
use crate::runtime::{Component, Runtime};

/// Loads `file` with the manifest beside it (plus `overrides` of its config), as the server
/// would.
async fn load(file: &Path, overrides: &[(String, String)]) -> anyhow::Result<(Component, Grants, String)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let manifest_path = file.with_extension("toml");
    let manifest = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => Manifest::parse(&text).map_err(|err| anyhow::anyhow!("{}: {err}", manifest_path.display()))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
        Err(err) => bail!("cannot read {}: {err}", manifest_path.display()),
    };
    let mut grants = manifest
        .grants(&ProcessEnv, &RetryPolicy::default())
        .map_err(|problems| anyhow::anyhow!("{}: {}", manifest_path.display(), problems.join("; ")))?;
    grants.config.extend(overrides.iter().cloned());
    let limits = grants.limits();
    let name = file.file_stem().and_then(|stem| stem.to_str()).unwrap_or("plugin").to_owned();
    let runtime = Runtime::new(None)?;
    let component =
        runtime.load(&name, bytes, limits).await.map_err(|err| anyhow::anyhow!("{}: {err}", file.display()))?;
    Ok((component, grants, sha256))
}

/// Runs `file` once on the payload in `sample` as an event of `event_type`, printing its
/// outcome, duration and emitted events. Returns whether the call succeeded.
pub async fn run(file: &Path, sample: &Path, event_type: &str, overrides: &[(String, String)]) -> anyhow::Result<bool> {
    let (component, _, _) = load(file, overrides).await?;
    let data = std::fs::read(sample).with_context(|| format!("cannot read {}", sample.display()))?;
    let event = Event {
        id: format!("sample-{}", now_ms()),
        source: "cli".to_owned(),
        event_type: event_type.to_owned(),
        time_ms: now_ms(),
        content_type: "application/json".to_owned(),
        data: Bytes::from(data),
        attributes: Vec::new(),
    };
    let started = Instant::now();
    let result = component.invoke(&event, 1).await;
    let took = started.elapsed();
    match result {
        Ok(emitted) => {
            println!("outcome: done in {:.2} ms", took.as_secs_f64() * 1000.0);
            for emitted in emitted {
                println!(
                    "emitted: {} {} ({} bytes, {})",
                    emitted.event_type,
                    emitted.id,
                    emitted.data.len(),
                    emitted.content_type
                );
            }
            Ok(true)
        }
        Err(err) => {
            println!("outcome: {err} (after {:.2} ms)", took.as_secs_f64() * 1000.0);
            Ok(false)
        }
    }
}

/// Checks `file` is a component of the `wasmhook:plugin` world and prints its metadata and
/// what its manifest grants.
pub async fn check(file: &Path) -> anyhow::Result<()> {
    let (component, grants, sha256) = load(file, &[]).await?;
    let metadata = component.metadata();
    let subscriptions = grants.subscriptions.as_ref().unwrap_or(&metadata.subscriptions);
    println!("{}: a wasmhook plugin", file.display());
    println!("  component:     {} {}", metadata.name, metadata.version);
    println!("  sha256:        {sha256}");
    let from = if grants.subscriptions.is_some() { " (from the manifest)" } else { "" };
    println!("  subscriptions: {}{from}", subscriptions.join(", "));
    println!("  timeout:       {} ms", grants.timeout.as_millis());
    let memory = grants.memory_bytes;
    if memory % (1 << 20) == 0 {
        println!("  memory:        {} MiB", memory >> 20);
    } else {
        println!("  memory:        {} KiB", memory >> 10);
    }
    println!("  concurrency:   {}", grants.concurrency);
    if grants.reuse == 0 {
        println!("  instances:     a fresh one per call");
    } else {
        let idle = grants.reuse_idle.as_millis();
        println!("  instances:     each reused for up to {} calls, dropped after {idle} ms idle", grants.reuse);
    }
    println!("  retry:         {} attempts", grants.retry.max_attempts);
    let keys: Vec<&String> = grants.config.keys().collect();
    println!("  config:        {}", if keys.is_empty() { "nothing".to_owned() } else { format!("{keys:?}") });
    println!("  http_allow:    {}", if grants.http_allow.is_empty() { "nothing" } else { "see the manifest" });
    Ok(())
}

/// The sdk in this source tree, for scaffolds made by a binary built from it.
fn bundled_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    sdk.join("Cargo.toml").is_file().then(|| std::path::absolute(sdk).ok()).flatten()
}

/// Creates `dir/name`, a plugin crate depending on the sdk at `sdk` (this tree's by default),
/// that builds for `wasm32-wasip2` with a plain `cargo build --release`.
pub fn scaffold(name: &str, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        bail!("plugin name {name:?} must start with a letter and hold only a-z, 0-9 and '-'");
    }
    let sdk = match sdk {
        Some(sdk) => std::path::absolute(sdk)?,
        None => bundled_sdk()
            .context("cannot find the wasmhook sdk; pass --sdk PATH (the sdk folder of a wasmhook checkout)")?,
    };
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    std::fs::create_dir_all(root.join("src"))?;
    std::fs::create_dir_all(root.join(".cargo"))?;
    let crate_name = name.replace('-', "_");
    let files = [
        (
            "Cargo.toml",
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
                 [dependencies]\nwasmhook-sdk = {{ path = {:?} }}\n\n\
                 [profile.release]\nopt-level = \"s\"\nlto = true\nstrip = true\n\n# A crate of its own, even inside another workspace.\n[workspace]\n",
                sdk.display().to_string()
            ),
        ),
        (".cargo/config.toml", "[build]\ntarget = \"wasm32-wasip2\"\n".to_owned()),
        (
            "src/lib.rs",
            format!(
                "//! `{name}`: a wasmhook plugin.\nuse wasmhook_sdk::{{Event, HandlerError, Metadata, Plugin, export_plugin, info}};\n\n\
                 struct {ty};\n\nimpl Plugin for {ty} {{\n    fn metadata() -> Metadata {{\n        \
                 Metadata::new(\"{name}\", env!(\"CARGO_PKG_VERSION\"), [\"*\"])\n    }}\n\n    \
                 fn handle(event: Event) -> Result<(), HandlerError> {{\n        \
                 info!(\"{{}} {{}} ({{}} bytes, attempt {{}})\", event.event_type, event.id, event.data.len(), event.attempt);\n        \
                 Ok(())\n    }}\n}}\n\nexport_plugin!({ty});\n",
                ty = type_name(name)
            ),
        ),
        (
            &format!("{name}.toml"),
            "# The operator's manifest: copy it beside the .wasm. Nothing is granted by default.\n\
             # subscriptions = [\"github.push\"]\n# timeout = \"5s\"\n# memory = \"64MiB\"\n# http_allow = [\"hooks.slack.com\"]\n\
             # [config]\n# greeting = \"hello\"\n"
                .to_owned(),
        ),
        (
            "README.md",
            format!(
                "# {name}\n\nA wasmhook plugin.\n\n    rustup target add wasm32-wasip2\n    cargo build --release\n    \
                 wasmhook plugin run target/wasm32-wasip2/release/{crate_name}.wasm --event sample.json --type github.push\n    \
                 cp target/wasm32-wasip2/release/{crate_name}.wasm /path/to/plugins/{name}.wasm\n"
            ),
        ),
    ];
    for (path, contents) in files {
        std::fs::write(root.join(path), contents).with_context(|| format!("cannot write {path}"))?;
    }
    Ok(root)
}

/// `my-plugin` → `MyPlugin`.
fn type_name(name: &str) -> String {
    name.split('-').filter(|part| !part.is_empty()).map(|part| part[..1].to_uppercase() + &part[1..]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaffold_names_are_checked_and_types_are_camel_case() {
        assert_eq!(type_name("slack-notify-2"), "SlackNotify2");
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in ["Bad Name", "2fa", "-x", ""] {
            assert!(scaffold(bad, dir.path(), None).is_err(), "{bad:?}");
        }
        let root = scaffold("my-plugin", dir.path(), None).expect("scaffold");
        let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
        assert!(lib.contains("struct MyPlugin;") && lib.contains("export_plugin!(MyPlugin);"), "{lib}");
        assert!(scaffold("my-plugin", dir.path(), None).expect_err("exists").to_string().contains("already exists"));
    }
}
