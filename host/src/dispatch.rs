//! The dispatcher: leases due deliveries from the journal, runs each on its plugin in a
//! bounded pool of workers, and records the outcome. One log line per delivery outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::journal::{Journal, Lease, Outcome};
use crate::registry::Registry;

/// How long one `take` waits for work before looking at the shutdown signal again.
const TAKE_WAIT: Duration = Duration::from_millis(200);
/// A lease lasts the longest plugin timeout plus this, so that a healthy call always
/// finishes inside its lease.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Pause after the journal fails, before asking again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Runs deliveries with at most `workers` calls at once until `shutdown`, then waits for the
/// calls already running to finish.
pub async fn run(
    journal: Arc<dyn Journal>,
    registry: Arc<Registry>,
    workers: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(workers));
    let calls = TaskTracker::new();
    while !shutdown.is_cancelled() {
        // Wait for a free worker before leasing anything, so nothing sits leased but idle.
        let first = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot,
            () = shutdown.cancelled() => break,
        };
        let Ok(first) = first else { break };
        let free = slots.available_permits() + 1;
        let lease_time = registry.max_timeout() + LEASE_MARGIN;
        let leases = match journal
            .take(&registry.names(), free, lease_time, TAKE_WAIT)
            .await
        {
            Ok(leases) => leases,
            Err(err) => {
                tracing::error!(error = %err, "cannot take deliveries from the journal");
                tokio::time::sleep(ERROR_BACKOFF).await;
                continue;
            }
        };
        let mut first = Some(first);
        for lease in leases {
            let slot = match first.take() {
                Some(slot) => slot,
                None => match Arc::clone(&slots).acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let (journal, registry) = (Arc::clone(&journal), Arc::clone(&registry));
            calls.spawn(async move {
                deliver(journal.as_ref(), &registry, lease).await;
                drop(slot);
            });
        }
    }
    calls.close();
    calls.wait().await;
}

/// Runs one leased delivery and records how it ended.
async fn deliver(journal: &dyn Journal, registry: &Registry, lease: Lease) {
    let event = &lease.event;
    let Some(plugin) = registry.get(&lease.plugin) else {
        // Left leased: when the lease runs out the delivery is due again, for the plugin's return.
        tracing::warn!(event.id = %event.id, plugin = %lease.plugin, "plugin is not loaded; the delivery waits for it");
        return;
    };
    let started = Instant::now();
    let result = plugin.component.invoke(event, lease.attempt).await;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let outcome = match &result {
        Ok(()) => {
            tracing::info!(
                event.id = %event.id, event.type = %event.event_type, source = %event.source,
                plugin = %plugin.name, attempt = lease.attempt, duration_ms, outcome = "done", "delivered"
            );
            Outcome::Done
        }
        Err(err) => {
            tracing::warn!(
                event.id = %event.id, event.type = %event.event_type, source = %event.source,
                plugin = %plugin.name, attempt = lease.attempt, duration_ms, outcome = "dead", error = %err,
                "delivery failed"
            );
            Outcome::Dead {
                error: err.to_string(),
            }
        }
    };
    if let Err(err) = journal.finish(&lease, outcome).await {
        tracing::error!(event.id = %event.id, plugin = %plugin.name, error = %err, "cannot record the delivery's outcome");
    }
}
