//! `forward`: forwards each event to a URL, signed with Standard Webhooks (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`), so wasmhook can feed any other system. The
//! receiver can verify it with any Standard Webhooks library, and dedupe on `webhook-id`
//! (the event id, stable across retries).
//!
//! ```toml
//! subscriptions = ["github.*"]
//! http_allow = ["ingest.example.com"]
//! [config]
//! url = "https://ingest.example.com/webhooks"
//! [config_env]
//! secret = "FORWARD_SECRET"   # whsec_<base64>
//! ```
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use wasmhook_sdk::{Event, HandlerError, Metadata, Plugin, config, export_plugin, http, info};

struct Forward;

impl Plugin for Forward {
    fn metadata() -> Metadata {
        Metadata::new("forward", env!("CARGO_PKG_VERSION"), ["*"])
    }

    fn handle(event: Event) -> Result<(), HandlerError> {
        let missing = |key: &str| HandlerError::Permanent(format!("no {key}: grant it in the manifest"));
        let url = config("url").ok_or_else(|| missing("url"))?;
        let secret = config("secret").ok_or_else(|| missing("secret"))?;
        let key = STANDARD
            .decode(secret.trim().strip_prefix("whsec_").unwrap_or(secret.trim()))
            .map_err(|_| HandlerError::Permanent("secret is not whsec_ followed by base64".into()))?;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |now| now.as_secs()).to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
        mac.update(format!("{}.{timestamp}.", event.id).as_bytes());
        mac.update(&event.data);
        let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
        let headers = [
            ("content-type", event.content_type.as_str()),
            ("webhook-id", event.id.as_str()),
            ("webhook-timestamp", timestamp.as_str()),
            ("webhook-signature", signature.as_str()),
            ("wasmhook-event-type", event.event_type.as_str()),
            ("wasmhook-source", event.source.as_str()),
        ];
        match http::post(&url, &headers, &event.data) {
            Ok(response) if (200..300).contains(&response.status) => {
                info!("forwarded {} {} ({})", event.event_type, event.id, response.status);
                Ok(())
            }
            Ok(response) if response.status == 429 || response.status >= 500 => {
                Err(HandlerError::Retry(format!("the receiver answered {}", response.status)))
            }
            Ok(response) => Err(HandlerError::Permanent(format!("the receiver answered {}", response.status))),
            Err(err) if err.is_denied() => Err(HandlerError::Permanent(err.0)),
            Err(err) => Err(HandlerError::Retry(format!("cannot reach the receiver: {err}"))),
        }
    }
}

export_plugin!(Forward);
