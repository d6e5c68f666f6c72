//! Webhook ingest: `POST /hooks/{source}` → limits → signature → parse → [`Event`]s →
//! [`Journal::accept`] → `202` once durable.
//!
//! The checks run cheapest and safest first: route, method, content type, size (while
//! reading, within a time limit), room in the journal (waiting briefly for it when full;
//! checked before verifying, so that a 503 costs no verifying), signature (before parsing
//! anything), body. A refused request is never stored. Turning a verified request into
//! events is [`verify`]'s and [`cloudevents`]' job; this module only adds HTTP around it.

pub mod cloudevents;
mod error;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, header};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use error::shown;
pub use error::{IngestError, RETRY_AFTER_SECONDS};

use crate::config::{Format, SourceConfig};
use crate::event::{Event, now_ms};
use crate::http::{self, Body};
use crate::journal::{Accepted, Journal, JournalError, NewEvent};
use crate::metrics;
use crate::registry::Registry;
use cloudevents::{CloudEvent, Mode};
use verify::Identified;

/// Path prefix of the webhook routes.
pub const HOOKS_PREFIX: &str = "/hooks/";
/// Longest event id or type accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// How long a client may take to send its whole body (slow-client protection).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most requests waiting for room in a full journal at once; beyond them a request is
/// refused at once. Bounds the bodies held and the polling.
pub const MAX_ROOM_WAITERS: usize = 256;
/// How often a request waiting for room looks at the journal again.
const ROOM_POLL: Duration = Duration::from_millis(10);

/// The webhook endpoint: sources by name, and where accepted events go.
pub struct Ingest {
    sources: BTreeMap<String, SourceConfig>,
    journal: Arc<dyn Journal>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    /// How long a request waits for room in a full journal before its `503`.
    room_wait: Duration,
    /// Places for the requests waiting for room.
    room_waiters: Semaphore,
    refusals: Refusals,
}

/// Logs a run of `503`s where it starts and where it ends, not once per request: under
/// overload a line per refused request would spend the CPU the host is short of, and flood
/// the log. `wasmhook_requests_total{status="503"}` still counts every one.
#[derive(Default)]
struct Refusals {
    /// `503`s answered since an event was last accepted.
    since_accepted: AtomicU64,
}

impl Refusals {
    fn refused(&self, path: &str, err: &IngestError) {
        if self.since_accepted.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                path = %shown(path), status = err.status().as_u16(), reason = %err,
                "request not accepted; further 503s are counted, and logged once an event is accepted again"
            );
        }
    }

    /// Whether `503`s have been answered since an event was last accepted.
    fn in_run(&self) -> bool {
        self.since_accepted.load(Ordering::Relaxed) > 0
    }

    fn accepted(&self) {
        if self.in_run() {
            let refused = self.since_accepted.swap(0, Ordering::Relaxed);
            if refused > 0 {
                tracing::info!(refused, "accepting again after answering 503");
            }
        }
    }
}

#[derive(Serialize)]
struct AcceptedBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

/// One event of a batch: what became of it.
#[derive(Serialize)]
struct BatchResult {
    index: usize,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A batch's own status. `200` when each item was stored, was a duplicate, or was refused for
/// good (a `4xx` that `results` names). When an item may succeed if sent again (a `503`, or
/// another `5xx`), the batch gets that status, so that a sender that reads only the status
/// sends the whole batch again: the items already stored then come back as duplicates, and
/// none is lost or run twice.
fn batch_status(results: &[BatchResult]) -> StatusCode {
    if results.iter().any(|result| result.status == StatusCode::SERVICE_UNAVAILABLE.as_u16()) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if results.iter().any(|result| result.status >= 500) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

/// What a verified request turned out to be.
enum Received {
    /// One event, accepted or a duplicate.
    One(Event, Accepted),
    /// A CloudEvents batch: each event's own result.
    Batch(Vec<BatchResult>),
    /// A handshake, answered at once.
    Answer(serde_json::Value),
}

impl Ingest {
    /// An endpoint for `sources` that stores into `journal`, routing with `registry`, waiting
    /// up to `room_wait` for room while the journal is full, and refusing new events (503)
    /// once `shutdown` fires.
    pub fn new(
        sources: BTreeMap<String, SourceConfig>,
        journal: Arc<dyn Journal>,
        registry: Arc<Registry>,
        room_wait: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Ingest {
            sources,
            journal,
            registry,
            shutdown,
            room_wait,
            room_waiters: Semaphore::new(MAX_ROOM_WAITERS),
            refusals: Refusals::default(),
        }
    }

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let response = self.respond(request, &path).await;
        // Label by configured source only, so that probing random paths cannot grow the metrics.
        let source =
            path.strip_prefix(HOOKS_PREFIX).filter(|name| self.sources.contains_key(*name)).unwrap_or("(none)");
        metrics::request(source, response.status().as_u16());
        response
    }

    async fn respond(&self, request: Request<Incoming>, path: &str) -> Response<Body> {
        match self.receive(request).await {
            Ok(Received::One(event, accepted)) => {
                self.refusals.accepted();
                let duplicate = accepted == Accepted::Duplicate;
                tracing::info!(
                    event.id = %event.id, event.type = %event.event_type, source = %event.source, duplicate,
                    "accepted"
                );
                let status = if duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
                http::json(status, &AcceptedBody { id: &event.id, event_type: &event.event_type, duplicate })
            }
            Ok(Received::Batch(results)) => {
                if results.iter().any(|result| result.status < 300) {
                    self.refusals.accepted();
                }
                let status = batch_status(&results);
                let mut response = http::json(status, &serde_json::json!({ "results": results }));
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    response.headers_mut().insert(header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
                }
                response
            }
            Ok(Received::Answer(answer)) => http::json(StatusCode::OK, &answer),
            Err(err) => {
                if matches!(err, IngestError::Internal) {
                    tracing::error!(path = %shown(path), status = err.status().as_u16(), reason = %err, "request not accepted");
                } else if err.status().is_server_error() {
                    // Backpressure or an outage the sender is told to retry: not a host fault.
                    self.refusals.refused(path, &err);
                } else {
                    tracing::info!(path = %shown(path), status = err.status().as_u16(), reason = %err, "request refused");
                }
                err.into_response()
            }
        }
    }

    async fn receive(&self, request: Request<Incoming>) -> Result<Received, IngestError> {
        let path = request.uri().path();
        let name = path.strip_prefix(HOOKS_PREFIX).ok_or_else(|| IngestError::NoRoute(shown(path)))?;
        if name.is_empty() || name.contains('/') {
            return Err(IngestError::NoRoute(shown(path)));
        }
        let name = name.to_owned();
        if request.method() != Method::POST {
            return Err(IngestError::MethodNotAllowed(shown(request.method().as_str())));
        }
        let source = self.sources.get(&name).ok_or_else(|| IngestError::UnknownSource(shown(&name)))?;
        let content_type = content_type(request.headers());
        let mode = match source.format {
            Format::Json => {
                if !is_json(&content_type) {
                    return Err(IngestError::UnsupportedMediaType(if content_type.is_empty() {
                        "(none)".to_owned()
                    } else {
                        shown(&content_type)
                    }));
                }
                None
            }
            Format::Cloudevents => Some(Mode::of(&content_type)),
        };
        let (parts, body) = request.into_parts();
        let body = tokio::time::timeout(BODY_READ_TIMEOUT, read_body(body, &parts.headers, source.max_body_bytes))
            .await
            .map_err(|_| IngestError::Timeout(BODY_READ_TIMEOUT))??;
        // A request the journal could not take now is refused before the work of verifying
        // and parsing it: under overload that work would be spent on 503s.
        self.wait_for_room().await?;

        verify::verify(&source.verify, &parts.headers, &body, now_ms() / 1000).inspect_err(|err| {
            metrics::verification_failure(&name, failure_reason(&err.to_string()));
        })?;
        match mode {
            None => match verify::identify(&source.verify, &source.identity, &name, &parts.headers, &body)? {
                Identified::Answer(answer) => Ok(Received::Answer(answer)),
                Identified::Event(identity) => {
                    let event = Event {
                        id: checked_name("event id", identity.id)?,
                        event_type: checked_name("event type", normalise_type(&identity.event_type))?,
                        source: name,
                        time_ms: now_ms(),
                        content_type,
                        data: body,
                        attributes: identity.attributes,
                    };
                    let accepted = self.accept(source, event.clone()).await?;
                    Ok(Received::One(event, accepted))
                }
            },
            Some(Mode::Binary) => {
                let event = cloud_event(&name, cloudevents::from_binary(&parts.headers, body)?)?;
                let accepted = self.accept(source, event.clone()).await?;
                Ok(Received::One(event, accepted))
            }
            Some(Mode::Structured) => {
                let event = cloud_event(&name, cloudevents::from_structured(&verify::parse_json(&body)?)?)?;
                let accepted = self.accept(source, event.clone()).await?;
                Ok(Received::One(event, accepted))
            }
            Some(Mode::Batch) => {
                // All items go to the journal at once, in order, so that they share its group
                // commits (one fsync for many) instead of waiting for one each.
                let items = cloudevents::from_batch(&verify::parse_json(&body)?)?;
                let outcomes = futures_util::future::join_all(items.into_iter().map(|parsed| async {
                    let event = parsed.and_then(|cloud| cloud_event(&name, cloud))?;
                    let accepted = self.accept(source, event.clone()).await?;
                    Ok::<_, IngestError>((event, accepted))
                }))
                .await;
                let mut results = Vec::with_capacity(outcomes.len());
                for (index, outcome) in outcomes.into_iter().enumerate() {
                    results.push(match outcome {
                        Ok((event, accepted)) => BatchResult {
                            index,
                            status: if accepted == Accepted::Duplicate { 200 } else { 202 },
                            id: Some(event.id),
                            event_type: Some(event.event_type),
                            duplicate: accepted == Accepted::Duplicate,
                            error: None,
                        },
                        Err(err) => BatchResult {
                            index,
                            status: err.status().as_u16(),
                            id: None,
                            event_type: None,
                            duplicate: false,
                            error: Some(err.to_string()),
                        },
                    });
                }
                Ok(Received::Batch(results))
            }
        }
    }

    /// Refuses (503) while the host shuts down or the journal could not take an event now.
    /// A full journal is given up to `room_wait` to make room, if one of the
    /// [`MAX_ROOM_WAITERS`] places is free: an answer a little later is better than a `503`,
    /// which some senders never retry, and a sender that retries at once spends the CPU the
    /// deliveries need to make the room. Room found here can still be taken by another
    /// request before this one reaches [`Journal::accept`], which then refuses it.
    async fn wait_for_room(&self) -> Result<(), IngestError> {
        let shutting_down = || IngestError::Unavailable("the host is shutting down".to_owned());
        if self.shutdown.is_cancelled() {
            return Err(shutting_down());
        }
        let full = match self.journal.has_room() {
            Ok(()) => return Ok(()),
            Err(full @ JournalError::Full { .. }) => full,
            Err(other) => return Err(self.refusal(other)),
        };
        let Ok(_place) = self.room_waiters.try_acquire() else {
            metrics::at_max_pending("no_place");
            return Err(self.refusal(full));
        };
        let _waiting = metrics::waiting_for_room();
        let deadline = tokio::time::Instant::now() + self.room_wait;
        let waited = loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break Err(self.refusal(full));
            }
            tokio::select! {
                () = tokio::time::sleep(ROOM_POLL.min(deadline - now)) => {}
                () = self.shutdown.cancelled() => break Err(shutting_down()),
            }
            match self.journal.has_room() {
                Ok(()) => break Ok(()),
                Err(JournalError::Full { .. }) => {}
                Err(other) => break Err(self.refusal(other)),
            }
        };
        metrics::at_max_pending(if waited.is_ok() { "room" } else { "refused" });
        waited
    }

    /// Routes the event and stores it; answers only once it is durable.
    async fn accept(&self, source: &SourceConfig, event: Event) -> Result<Accepted, IngestError> {
        let plugins = self.registry.route(&event.event_type);
        if plugins.is_empty() {
            tracing::warn!(
                event.id = %event.id, event.type = %event.event_type, source = %event.source,
                "no plugin subscribes; kept as unrouted"
            );
        }
        let source_name = event.source.clone();
        let new = NewEvent { event, plugins, dedup_window: source.dedup_window };
        let accepted = self.journal.accept(new).await.map_err(|err| self.refusal(err))?;
        metrics::accepted(&source_name, accepted == Accepted::Duplicate);
        Ok(accepted)
    }

    /// What the sender hears when the journal refuses an event.
    fn refusal(&self, err: JournalError) -> IngestError {
        match err {
            // Without the journal's figures: a refusal before the signature may go to anyone.
            JournalError::Full { .. } => IngestError::Unavailable("too many unfinished deliveries".to_owned()),
            JournalError::Unavailable(_) => {
                // The sender hears that the journal is away; what failed goes to the log, once
                // for a run of refusals like the 503s themselves.
                if !self.refusals.in_run() {
                    tracing::warn!(error = %err, "event refused: the journal cannot take it now");
                }
                IngestError::Unavailable("the journal is unreachable".to_owned())
            }
            JournalError::TooLarge { max } => IngestError::PayloadTooLarge(max),
            other => {
                tracing::error!(error = %other, "journal refused an event");
                IngestError::Internal
            }
        }
    }
}

/// An event from a CloudEvent received by source `name`; its type is kept as written.
fn cloud_event(name: &str, cloud: CloudEvent) -> Result<Event, IngestError> {
    Ok(Event {
        id: checked_name("event id", cloud.id)?,
        event_type: checked_name("event type", cloud.event_type)?,
        source: name.to_owned(),
        time_ms: now_ms(),
        content_type: cloud.content_type,
        data: cloud.data,
        attributes: cloud.attributes,
    })
}

/// A signature failure's reason as a metric label: one of a few fixed words.
fn failure_reason(message: &str) -> &'static str {
    if message.contains("SHA-1") {
        "sha1_only"
    } else if message.starts_with("missing") {
        "missing_header"
    } else if message.contains(" old;") {
        "stale"
    } else if message.contains("in the future") {
        "future"
    } else if message.contains("does not match") {
        "mismatch"
    } else {
        "malformed"
    }
}

/// The request's media type, lower-case, without parameters (empty when absent).
fn content_type(headers: &HeaderMap) -> String {
    let value = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("(not text)")).unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Whether a media type is JSON (`application/json` or any `application/…+json`).
fn is_json(essence: &str) -> bool {
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads the body, refusing it as soon as it passes `limit` bytes (a declared length over the
/// limit is refused before reading anything).
async fn read_body(body: Incoming, headers: &HeaderMap, limit: usize) -> Result<Bytes, IngestError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(IngestError::PayloadTooLarge(limit));
    }
    http::read_limited(body, limit).await.map_err(|err| match err {
        http::BodyError::TooLarge => IngestError::PayloadTooLarge(limit),
        http::BodyError::Read(err) => IngestError::BadRequest(format!("could not read the body: {err}")),
    })
}

/// Provider event types are lower-case with `_` for spaces (`Push Hook` → `push_hook`).
fn normalise_type(event_type: &str) -> String {
    event_type.trim().to_lowercase().split_whitespace().collect::<Vec<_>>().join("_")
}

/// An event id or type must be non-empty, at most [`MAX_NAME_BYTES`], and free of control
/// characters and spaces.
fn checked_name(what: &str, value: String) -> Result<String, IngestError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(IngestError::BadRequest(format!(
            "{what} {:?} must be 1 to {MAX_NAME_BYTES} bytes without spaces or control characters",
            shown(&value)
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
    fn a_batch_with_an_item_worth_sending_again_gets_that_item_s_status() {
        let batch = |statuses: &[u16]| -> Vec<BatchResult> {
            statuses
                .iter()
                .enumerate()
                .map(|(index, &status)| BatchResult {
                    index,
                    status,
                    id: None,
                    event_type: None,
                    duplicate: status == 200,
                    error: None,
                })
                .collect()
        };
        assert_eq!(
            batch_status(&batch(&[202, 200, 400, 413])),
            StatusCode::OK,
            "stored, duplicate or refused for good"
        );
        assert_eq!(batch_status(&batch(&[])), StatusCode::OK);
        assert_eq!(batch_status(&batch(&[202, 500, 400])), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(batch_status(&batch(&[202, 500, 503])), StatusCode::SERVICE_UNAVAILABLE, "the one to retry later");
    }

    #[test]
    fn json_content_types_are_recognised() {
        assert_eq!(content_type(&with_content_type("Application/JSON; charset=utf-8")), "application/json");
        for json in ["application/json", "application/cloudevents+json", "application/vnd.github+json"] {
            assert!(is_json(json), "{json}");
        }
        for other in ["text/plain", "application/x-www-form-urlencoded", "", "text/json+xml"] {
            assert!(!is_json(other), "{other}");
        }
        assert_eq!(content_type(&HeaderMap::new()), "");
    }

    #[test]
    fn signature_failures_map_to_a_few_reasons() {
        let reason = |scheme: &crate::config::Verify, headers: &HeaderMap, body: &[u8], now: u64| {
            failure_reason(&verify::verify(scheme, headers, body, now).expect_err("refused").to_string())
        };
        let github = crate::config::Verify::Github { secrets: vec![crate::config::Secret::new("s")] };
        let stripe = crate::config::Verify::Stripe {
            secrets: vec![crate::config::Secret::new("s")],
            tolerance: std::time::Duration::from_secs(300),
        };
        let mut headers = HeaderMap::new();
        assert_eq!(reason(&github, &headers, b"{}", 0), "missing_header");
        headers.insert("x-hub-signature", "sha1=00".parse().expect("value"));
        assert_eq!(reason(&github, &headers, b"{}", 0), "sha1_only");
        headers.insert("x-hub-signature-256", "sha256=zz".parse().expect("value"));
        assert_eq!(reason(&github, &headers, b"{}", 0), "malformed");
        headers.insert("x-hub-signature-256", verify::github::sign(b"other", b"{}").parse().expect("value"));
        assert_eq!(reason(&github, &headers, b"{}", 0), "mismatch");
        let mut headers = HeaderMap::new();
        headers.insert("stripe-signature", verify::stripe::sign(b"s", 1000, b"{}").parse().expect("value"));
        assert_eq!(reason(&stripe, &headers, b"{}", 2000), "stale");
        assert_eq!(reason(&stripe, &headers, b"{}", 100), "future");
    }

    #[test]
    fn provider_types_are_lower_case_with_underscores() {
        assert_eq!(normalise_type("gitlab.Push Hook"), "gitlab.push_hook");
        assert_eq!(normalise_type("github.pull_request.opened"), "github.pull_request.opened");
    }

    #[test]
    fn names_with_spaces_or_control_characters_are_refused() {
        assert!(checked_name("event type", "github.push".into()).is_ok());
        assert!(checked_name("event type", "github push".into()).is_err());
        assert!(checked_name("event id", String::new()).is_err());
        assert!(checked_name("event id", "x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }
}
