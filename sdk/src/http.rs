//! Outbound HTTP from a plugin, over `wasi:http/outgoing-handler`: one blocking request, the
//! whole response. The host lets a plugin reach only the hosts its manifest lists
//! (`http_allow`); any other request returns an [`HttpError`] (it never traps).
//!
//! ```no_run
//! let response = wasmhook_sdk::http::post(
//!     "https://hooks.slack.com/services/T000/B000/XXXX",
//!     &[("content-type", "application/json")],
//!     br#"{"text":"deployed"}"#,
//! )?;
//! if response.status >= 500 {
//!     // a passing failure: ask the host to retry later
//! }
//! # Ok::<(), wasmhook_sdk::http::HttpError>(())
//! ```

use wasi::http::outgoing_handler;
/// The request method, for [`send`].
pub use wasi::http::types::Method;
use wasi::http::types::{ErrorCode, Fields, IncomingBody, OutgoingBody, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

/// Bytes written per call to the request body stream.
const WRITE_CHUNK: usize = 4096;
/// Bytes asked for per read of the response body stream.
const READ_CHUNK: u64 = 64 * 1024;

/// A whole HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Why a request got no response: refused by the host, unreachable, timed out, or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError(pub String);

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// Whether the host refused the request because the host is not in the plugin's
    /// `http_allow`: retrying cannot help until the operator grants it.
    pub fn is_denied(&self) -> bool {
        self.0.starts_with(DENIED)
    }
}

/// How a refusal by the host's allowlist reads.
const DENIED: &str = "request denied: the host is not in this plugin's http_allow";

impl From<ErrorCode> for HttpError {
    fn from(code: ErrorCode) -> Self {
        HttpError(match code {
            ErrorCode::HttpRequestDenied => DENIED.to_owned(),
            ErrorCode::ConnectionTimeout => "timed out connecting".to_owned(),
            ErrorCode::HttpResponseTimeout | ErrorCode::ConnectionReadTimeout => {
                "timed out waiting for the response".to_owned()
            }
            ErrorCode::HttpResponseBodySize(_) => "the response body is over the host's limit".to_owned(),
            other => format!("{other:?}"),
        })
    }
}

/// What follows `scheme://`, split into the authority and the path with its query (`/` when
/// there is none); a fragment is never sent.
fn split_authority(rest: &str) -> (&str, String) {
    let rest = rest.split('#').next().unwrap_or_default();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    (authority, path)
}

fn fail(what: &str) -> HttpError {
    HttpError(what.to_owned())
}

/// Sends a POST with `headers` and `body` to `url` (`http://` or `https://`).
pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Response, HttpError> {
    send(Method::Post, url, headers, body)
}

/// Sends a GET to `url`.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Result<Response, HttpError> {
    send(Method::Get, url, headers, &[])
}

/// Sends one request and reads the whole response.
pub fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Response, HttpError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| HttpError(format!("{url:?} is not an absolute URL")))?;
    let scheme = match scheme {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        other => return Err(HttpError(format!("scheme {other:?} is not http or https"))),
    };
    let (authority, path) = split_authority(rest);
    if authority.contains('@') {
        return Err(HttpError(format!("{url:?}: a user or password in the URL is not sent; use a header")));
    }

    let fields = Fields::new();
    if !body.is_empty() && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length")) {
        let length = body.len().to_string().into_bytes();
        fields.append("content-length", &length).map_err(|err| HttpError(format!("content-length: {err:?}")))?;
    }
    for (name, value) in headers {
        fields.append(name, value.as_bytes()).map_err(|err| HttpError(format!("header {name}: {err:?}")))?;
    }
    let request = OutgoingRequest::new(fields);
    request.set_method(&method).map_err(|()| fail("invalid method"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| fail("invalid scheme"))?;
    request.set_authority(Some(authority)).map_err(|()| HttpError(format!("invalid authority {authority:?}")))?;
    request.set_path_with_query(Some(&path)).map_err(|()| HttpError(format!("invalid path {path:?}")))?;
    let outgoing = request.body().map_err(|()| fail("the request body is not available"))?;

    // Start the request first: the host buffers little of the body until then.
    let pending = outgoing_handler::handle(request, None)?;
    let mut sent = Ok(());
    {
        let stream = outgoing.write().map_err(|()| fail("the request body stream is not available"))?;
        for chunk in body.chunks(WRITE_CHUNK) {
            if let Err(err) = stream.blocking_write_and_flush(chunk) {
                sent = Err(HttpError(format!("sending the body: {err:?}")));
                break;
            }
        }
    }
    if sent.is_ok() {
        sent = OutgoingBody::finish(outgoing, None).map_err(HttpError::from);
    }
    // The response says why a request failed (denied, unreachable) better than the body can.
    let incoming = loop {
        match pending.get() {
            Some(result) => break result.map_err(|()| fail("the response was already taken"))??,
            None => pending.subscribe().block(),
        }
    };
    sent?;
    let status = incoming.status();
    let headers = incoming.headers().entries();
    let body = incoming.consume().map_err(|()| fail("the response body is not available"))?;
    let mut data = Vec::new();
    {
        let stream = body.stream().map_err(|()| fail("the response body stream is not available"))?;
        loop {
            match stream.blocking_read(READ_CHUNK) {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(err)) => {
                    return Err(match wasi::http::types::http_error_code(&err) {
                        Some(code) => HttpError::from(code),
                        None => HttpError(format!("reading the response: {}", err.to_debug_string())),
                    });
                }
            }
        }
    }
    if let Some(trailers) = IncomingBody::finish(body).get() {
        let _ = trailers;
    }
    Ok(Response { status, headers, body: data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_splits_into_authority_and_path_with_its_query() {
        assert_eq!(split_authority("h"), ("h", "/".to_owned()));
        assert_eq!(split_authority("h:8080/a/b?x=1"), ("h:8080", "/a/b?x=1".to_owned()));
        assert_eq!(split_authority("h?x=1"), ("h", "/?x=1".to_owned()));
        assert_eq!(split_authority("h/p#frag"), ("h", "/p".to_owned()));
    }
}
