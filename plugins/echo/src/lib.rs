//! `echo`: logs one line for every event it receives. The smallest useful plugin.
use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, export_plugin, info};

struct Echo;

impl Plugin for Echo {
    fn metadata() -> Metadata {
        Metadata::new("echo", env!("CARGO_PKG_VERSION"), ["*"])
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        info!(
            "{} {} from {} ({} bytes, attempt {})",
            event.event_type,
            event.id,
            event.source,
            event.data.len(),
            event.attempt
        );
        Ok(())
    }
}

export_plugin!(Echo);
