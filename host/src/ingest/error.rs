//! Every way a webhook request can be refused, and the one mapping to an HTTP status and a
//! JSON body `{"error": "…"}` that names the problem (never a secret or expected signature).

use hyper::{Response, StatusCode, header};

use crate::http::{self, Body};

/// Seconds a sender is asked to wait when the host cannot take more events right now.
pub const RETRY_AFTER_SECONDS: u32 = 5;

/// The most of a sender's own text (a path, a content type, an id) an error repeats.
const MAX_SHOWN_BYTES: usize = 64;

/// `text` as an error repeats it: cut after [`MAX_SHOWN_BYTES`], so that a request cannot
/// make its refusal, or the log line about it, as long as itself.
pub fn shown(text: &str) -> String {
    if text.len() <= MAX_SHOWN_BYTES {
        return text.to_owned();
    }
    format!("{}… ({} bytes)", &text[..text.floor_char_boundary(MAX_SHOWN_BYTES)], text.len())
}

/// Why a webhook request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The path is not `/hooks/{source}`.
    #[error("no route for {0}; webhooks are posted to /hooks/{{source}}")]
    NoRoute(String),
    /// No source of that name is configured.
    #[error("unknown source {0:?}")]
    UnknownSource(String),
    /// Only POST is accepted.
    #[error("method {0} not allowed; use POST")]
    MethodNotAllowed(String),
    /// The body is not declared as JSON.
    #[error("content type {0} is not JSON; send application/json")]
    UnsupportedMediaType(String),
    /// The body is larger than the source allows.
    #[error("body larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The signature is missing, malformed or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// The request is authentic but unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The client took too long to send its body.
    #[error("the body did not arrive within {} s", .0.as_secs())]
    Timeout(std::time::Duration),
    /// The host cannot take the event right now (journal full, shutting down).
    #[error("{0}; retry later")]
    Unavailable(String),
    /// Something failed on the host's side; details are in the host's log only.
    #[error("internal error; the event was not accepted")]
    Internal,
}

impl IngestError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::NoRoute(_) | IngestError::UnknownSource(_) => StatusCode::NOT_FOUND,
            IngestError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            IngestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The full response: status, JSON body, and `Allow` or `Retry-After` where they apply.
    pub fn into_response(self) -> Response<Body> {
        let mut response = http::error(self.status(), self.to_string());
        let headers = response.headers_mut();
        match self {
            IngestError::MethodNotAllowed(_) => {
                headers.insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            }
            IngestError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, header::HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            _ => {}
        }
        response
    }
}
