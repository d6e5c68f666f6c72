//! `slack-notify`: posts a message to a Slack incoming webhook for each event it receives.
//!
//! It subscribes to `wasmhook.dead_letter` alerts; list more event types in its manifest's
//! `subscriptions`. The manifest grants the webhook URL (a secret) and the host:
//!
//! ```toml
//! subscriptions = ["wasmhook.dead_letter", "github.push"]
//! http_allow = ["hooks.slack.com"]
//! [config_env]
//! webhook_url = "SLACK_WEBHOOK_URL"
//! ```
use serde::Deserialize;
use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, config, export_plugin, http, info};

/// The parts of a `wasmhook.dead_letter` alert this plugin reports.
#[derive(Deserialize)]
struct DeadLetter {
    event_id: String,
    #[serde(rename = "type")]
    event_type: String,
    plugin: String,
    attempts: u32,
    last_error: String,
}

struct SlackNotify;

impl Plugin for SlackNotify {
    fn metadata() -> Metadata {
        Metadata::new("slack-notify", env!("CARGO_PKG_VERSION"), ["wasmhook.dead_letter"])
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        let url = config("webhook_url")
            .ok_or_else(|| HandlerError::Permanent("no webhook_url: grant it in the manifest's [config_env]".into()))?;
        let text = message(&event)?;
        let body = serde_json::json!({ "text": text }).to_string();
        match http::post(&url, &[("content-type", "application/json")], body.as_bytes()) {
            Ok(response) if (200..300).contains(&response.status) => {
                info!("posted to Slack: {text}");
                Ok(())
            }
            Ok(response) if response.status == 429 || response.status >= 500 => {
                Err(HandlerError::Retry(format!("Slack answered {}", response.status)))
            }
            Ok(response) => Err(HandlerError::Permanent(format!(
                "Slack answered {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            ))),
            Err(err) if err.is_denied() => Err(HandlerError::Permanent(err.0)),
            Err(err) => Err(HandlerError::Retry(format!("cannot reach Slack: {err}"))),
        }
    }
}

fn message(event: &Event) -> Result<String, HandlerError> {
    if event.event_type == "wasmhook.dead_letter" {
        let dead: DeadLetter = event.json()?;
        return Ok(format!(
            ":rotating_light: `{}` gave up on {} `{}` after {} attempts: {}",
            dead.plugin, dead.event_type, dead.event_id, dead.attempts, dead.last_error
        ));
    }
    Ok(format!("{} `{}` from {}", event.event_type, event.id, event.source))
}

export_plugin!(SlackNotify);
