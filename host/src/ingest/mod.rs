//! Webhook ingest: `POST /hooks/{source}` → limits → signature → parse → [`Event`] →
//! [`Journal::accept`] → `202` once durable.
//!
//! The checks run cheapest and safest first: route, method, content type, size (while
//! reading), signature (before parsing anything), JSON. A refused request is never stored.

mod error;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, header};
use serde::Serialize;

pub use error::{IngestError, RETRY_AFTER_SECONDS};

use crate::config::SourceConfig;
use crate::event::{Event, now_ms};
use crate::http::{self, Body};
use crate::journal::{Accepted, Journal, JournalError, NewEvent};
use crate::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Path prefix of the webhook routes.
pub const HOOKS_PREFIX: &str = "/hooks/";
/// Longest event id or type accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// The webhook endpoint: sources by name, and where accepted events go.
pub struct Ingest {
    sources: BTreeMap<String, SourceConfig>,
    journal: Arc<dyn Journal>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

#[derive(Serialize)]
struct AcceptedBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl Ingest {
    /// An endpoint for `sources` that stores into `journal`, routing with `registry`, and
    /// refusing new events (503) once `shutdown` fires.
    pub fn new(
        sources: BTreeMap<String, SourceConfig>,
        journal: Arc<dyn Journal>,
        registry: Arc<Registry>,
        shutdown: CancellationToken,
    ) -> Self {
        Ingest { sources, journal, registry, shutdown }
    }

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        match self.accept(request).await {
            Ok((event, accepted)) => {
                let duplicate = accepted == Accepted::Duplicate;
                tracing::info!(
                    event.id = %event.id, event.type = %event.event_type, source = %event.source, duplicate,
                    "accepted"
                );
                let status = if duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
                http::json(status, &AcceptedBody { id: &event.id, event_type: &event.event_type, duplicate })
            }
            Err(err) => {
                if err.status().is_server_error() {
                    tracing::error!(%path, status = err.status().as_u16(), reason = %err, "request not accepted");
                } else {
                    tracing::info!(%path, status = err.status().as_u16(), reason = %err, "request refused");
                }
                err.into_response()
            }
        }
    }

    async fn accept(&self, request: Request<Incoming>) -> Result<(Event, Accepted), IngestError> {
        let path = request.uri().path();
        let name = path.strip_prefix(HOOKS_PREFIX).ok_or_else(|| IngestError::NoRoute(path.to_owned()))?;
        if name.is_empty() || name.contains('/') {
            return Err(IngestError::NoRoute(path.to_owned()));
        }
        let name = name.to_owned();
        if request.method() != Method::POST {
            return Err(IngestError::MethodNotAllowed(request.method().to_string()));
        }
        let source = self.sources.get(&name).ok_or_else(|| IngestError::UnknownSource(name.clone()))?;
        let content_type = json_content_type(request.headers())?;
        let (parts, body) = request.into_parts();
        let body = read_body(body, &parts.headers, source.max_body_bytes).await?;

        verify::verify(&source.verify, &parts.headers, &body)?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|err| IngestError::BadRequest(format!("body is not valid JSON: {err}")))?;
        let identity = verify::identify(&source.verify, &name, &parts.headers, &body, &json)?;
        let event = Event {
            id: checked_name("event id", identity.id)?,
            event_type: checked_name("event type", identity.event_type.to_lowercase())?,
            source: name,
            time_ms: now_ms(),
            content_type,
            data: body,
            attributes: identity.attributes,
        };

        if self.shutdown.is_cancelled() {
            return Err(IngestError::Unavailable("the host is shutting down".to_owned()));
        }
        let plugins = self.registry.route(&event.event_type);
        if plugins.is_empty() {
            tracing::warn!(event.id = %event.id, event.type = %event.event_type, source = %event.source, "no plugin subscribes; kept as unrouted");
        }
        let new = NewEvent { event: event.clone(), plugins, dedup_window: source.dedup_window };
        let accepted = self.journal.accept(new).await.map_err(|err| match err {
            JournalError::Full { .. } => IngestError::Unavailable(err.to_string()),
            other => {
                tracing::error!(error = %other, "journal refused an event");
                IngestError::Internal
            }
        })?;
        Ok((event, accepted))
    }
}

/// The request's content type if it is JSON (`application/json` or any `+json` type).
fn json_content_type(headers: &HeaderMap) -> Result<String, IngestError> {
    let value = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("(not text)"));
    let Some(value) = value else {
        return Err(IngestError::UnsupportedMediaType("(none)".to_owned()));
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Ok(essence)
    } else {
        Err(IngestError::UnsupportedMediaType(value.to_owned()))
    }
}

/// Reads the body, refusing it as soon as it passes `limit` bytes (a declared length over the
/// limit is refused before reading anything).
async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize) -> Result<Bytes, IngestError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(IngestError::PayloadTooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(IngestError::PayloadTooLarge(limit))
        }
        Err(err) => Err(IngestError::BadRequest(format!("could not read the body: {err}"))),
    }
}

/// An event id or type must be non-empty, at most [`MAX_NAME_BYTES`], and free of control
/// characters and spaces.
fn checked_name(what: &str, value: String) -> Result<String, IngestError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(IngestError::BadRequest(format!(
            "{what} {value:?} must be 1 to {MAX_NAME_BYTES} bytes without spaces or control characters"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_content_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, value.parse().expect("header value"));
        headers
    }

    #[test]
    fn json_content_types_are_recognised() {
        assert_eq!(
            json_content_type(&with_content_type("application/json; charset=utf-8")).ok().as_deref(),
            Some("application/json")
        );
        assert!(json_content_type(&with_content_type("application/cloudevents+json")).is_ok());
        assert!(json_content_type(&with_content_type("text/plain")).is_err());
        assert!(json_content_type(&with_content_type("application/x-www-form-urlencoded")).is_err());
        assert!(json_content_type(&HeaderMap::new()).is_err());
    }

    #[test]
    fn names_with_spaces_or_control_characters_are_refused() {
        assert!(checked_name("event type", "github.push".into()).is_ok());
        assert!(checked_name("event type", "github push".into()).is_err());
        assert!(checked_name("event id", String::new()).is_err());
        assert!(checked_name("event id", "x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }
}
