//! `noop`: a plugin that does nothing, to measure what one call costs the host.
use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, export_plugin};

struct Noop;

impl Plugin for Noop {
    fn metadata() -> Metadata {
        Metadata::new("noop", env!("CARGO_PKG_VERSION"), ["*"])
    }

    fn handle(_event: Event) -> Result<(), HandlerError> {
        Ok(())
    }
}

export_plugin!(Noop);
