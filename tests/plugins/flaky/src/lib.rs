//! `flaky`: a test plugin whose behaviour each test chooses. Not an example to copy.
//!
//! - manifest `[config] mode`: `ok` (default), `retry` (always asks to be retried) or
//!   `permanent` (always refuses for good);
//! - manifest `[config] slow_ms`: spins that long before answering;
//! - payload `{"fail_times": n}`: asks for a retry on attempts 1 to n, then succeeds.
//!
//! Each success logs `effect {id} attempt {n}`, an effect a test can count.
use std::time::{Duration, Instant};

use serde::Deserialize;
use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, config, export_plugin, info};

#[derive(Default, Deserialize)]
struct Script {
    #[serde(default)]
    fail_times: u32,
}

struct Flaky;

impl Plugin for Flaky {
    fn metadata() -> Metadata {
        Metadata::new("flaky", env!("CARGO_PKG_VERSION"), ["*"])
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        if let Some(ms) = config("slow_ms").and_then(|ms| ms.parse().ok()) {
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(ms) {}
        }
        match config("mode").as_deref() {
            Some("retry") => return Err(HandlerError::Retry("configured to fail".into())),
            Some("permanent") => return Err(HandlerError::Permanent("configured to refuse".into())),
            _ => {}
        }
        let script: Script = serde_json::from_slice(&event.data).unwrap_or_default();
        if event.attempt <= script.fail_times {
            return Err(HandlerError::Retry(format!("failing attempt {} of {}", event.attempt, script.fail_times)));
        }
        info!("effect {} attempt {}", event.id, event.attempt);
        Ok(())
    }
}

export_plugin!(Flaky);
