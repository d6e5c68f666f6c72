//! `wasmhook serve`: wires the modules into a running host (journal, runtime, registry,
//! listeners, dispatcher) and stops them in order when told to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::{Backend, Config, ProcessEnv, Verify, is_loopback};
use crate::ingest::Ingest;
use crate::journal::Journal;
use crate::journal::nats::NatsJournal;
use crate::journal::sqlite::SqliteJournal;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::watch::FolderWatch;
use crate::{dispatch, http};

/// The folder, inside the data folder, of compiled plugin code.
pub const COMPILE_CACHE_DIR: &str = "compiled";

/// What an event's headers, and room for its dead letter's, may take in a NATS message
/// beside its body.
const NATS_HEADER_ROOM: usize = 16 * 1024;

/// How often old handled events are removed.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(60);

/// Runs the host until `shutdown` fires, then stops taking requests, lets running plugin
/// calls finish, and returns. Everything accepted is already in the journal.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    crate::metrics::install()?;
    let journal: Arc<dyn Journal> = match &config.backend {
        Backend::Sqlite => Arc::new(SqliteJournal::open(&config.data_dir, config.journal.clone())?),
        Backend::Nats(options) => {
            let sources: Vec<String> = config.sources.keys().cloned().collect();
            let journal = NatsJournal::open(options.clone(), &sources).await?;
            tracing::info!(journal = ?options, "journal on NATS JetStream");
            if options.redis_url.is_none() {
                for warning in crate::config::short_replay_windows(&config.sources, journal.duplicate_window()) {
                    tracing::warn!("{warning}");
                }
            }
            // An event travels as one message: its body, its headers, room for its dead letter.
            let room = journal.max_payload().saturating_sub(NATS_HEADER_ROOM);
            for (name, source) in config.sources.iter().filter(|(_, source)| source.max_body_bytes > room) {
                tracing::warn!(
                    source = %name, max_body_bytes = source.max_body_bytes, nats_max_payload = journal.max_payload(),
                    "bodies near max_body_bytes exceed the NATS server's max_payload and will get 413; \
                     lower max_body_bytes or raise max_payload"
                );
            }
            journal
        }
    };
    // wasmtime's cache wants an absolute folder; a relative data folder is relative to here.
    let cache_dir = std::path::absolute(config.data_dir.join(COMPILE_CACHE_DIR))?;
    let runtime = Arc::new(Runtime::new(Some(&cache_dir)).context("cannot start the WebAssembly runtime")?);
    // Watch before the first load, so that no change in between is missed.
    let folder_watch = FolderWatch::start(&config.plugins_dir);
    let registry = Arc::new(
        Registry::load(Arc::clone(&runtime), &config.plugins_dir, config.retry.clone(), Arc::new(ProcessEnv)).await?,
    );
    warn_about_unsigned_sources(&config);

    let ingest_listener = bind(config.listen, "webhook").await?;
    let admin_listener = bind(config.admin_listen, "admin").await?;

    let ingest = Arc::new(Ingest::new(
        config.sources.clone(),
        Arc::clone(&journal),
        Arc::clone(&registry),
        config.max_pending_wait,
        shutdown.clone(),
    ));
    let admin = Arc::new(Admin::new(
        Arc::clone(&journal),
        Arc::clone(&registry),
        folder_watch.rewatcher(),
        config.admin_token.clone(),
        shutdown.clone(),
    ));
    let tasks = TaskTracker::new();
    tasks.spawn(http::serve(ingest_listener, move |request| Arc::clone(&ingest).handle(request), shutdown.clone()));
    tasks.spawn(http::serve(admin_listener, move |request| Arc::clone(&admin).handle(request), shutdown.clone()));
    tasks.spawn(housekeeping(Arc::clone(&journal), shutdown.clone()));
    tasks.spawn(folder_watch.run(Arc::clone(&registry), shutdown.clone()));
    tasks.spawn(dispatch::run(
        journal,
        registry,
        config.workers,
        config.shutdown_grace,
        config.lease_margin,
        shutdown.clone(),
    ));
    tasks.close();

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new requests; waiting for running calls");
    tasks.wait().await;
    drop(runtime);
    tracing::info!("stopped");
    Ok(())
}

/// Removes old handled events, once a period, until shutdown.
async fn housekeeping(journal: Arc<dyn Journal>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // A round may be long (a large backlog goes 1 000 events to a write): shutdown does
        // not wait for it, and each write it made stands.
        let expired = tokio::select! {
            expired = journal.expire() => expired,
            () = shutdown.cancelled() => return,
        };
        match expired {
            Ok(expired) if expired.events > 0 => {
                tracing::info!(events = expired.events, "expired old journal entries");
            }
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "journal housekeeping failed"),
        }
    }
}

async fn bind(address: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address} ({what})"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "{what} listener on http://{bound}");
    Ok(listener)
}

fn warn_about_unsigned_sources(config: &Config) {
    if is_loopback(config.listen) {
        return;
    }
    for (name, source) in &config.sources {
        if matches!(source.verify, Verify::None) {
            tracing::warn!(source = %name, listen = %config.listen, "source accepts unsigned requests beyond loopback");
        }
    }
}
