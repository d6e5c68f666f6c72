//! Signature schemes: each checks that a request is authentic and derives the event's id,
//! type and attributes from it. Nothing here knows about HTTP routes, so other transports can
//! use the same schemes.

pub mod github;

use hyper::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::Verify;
use crate::ingest::IngestError;

/// What a verified request says about its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The sender's delivery id, or the body's SHA-256.
    pub id: String,
    /// The full event type, provider prefix included.
    pub event_type: String,
    /// Selected headers, passed to plugins.
    pub attributes: Vec<(String, String)>,
}

/// Checks the request's signature with the source's scheme. Runs before the body is parsed.
pub fn verify(scheme: &Verify, headers: &HeaderMap, body: &[u8]) -> Result<(), IngestError> {
    match scheme {
        Verify::Github { secrets } => github::verify(secrets, headers, body),
        Verify::None => Ok(()),
    }
}

/// Derives the event's identity from a verified request and its parsed body.
pub fn identify(
    scheme: &Verify,
    source: &str,
    headers: &HeaderMap,
    body: &[u8],
    json: &serde_json::Value,
) -> Result<Identity, IngestError> {
    match scheme {
        Verify::Github { .. } => github::identify(headers, body, json),
        Verify::None => Ok(identify_unsigned(source, body, json)),
    }
}

/// An unsigned source: the id is the body's SHA-256 and the type is `{source}.{type}` from the
/// body's top-level string `type`, or `{source}.event` without one.
fn identify_unsigned(source: &str, body: &[u8], json: &serde_json::Value) -> Identity {
    let kind = json.get("type").and_then(serde_json::Value::as_str).unwrap_or("event");
    Identity { id: id_from_body(body), event_type: format!("{source}.{kind}"), attributes: Vec::new() }
}

/// The id of an event whose sender gives none: the hex SHA-256 of its body, so that a
/// repeated body is still recognised as a duplicate.
pub fn id_from_body(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// A header's value as text; a value that is not visible ASCII is a bad request.
pub fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, IngestError> {
    headers
        .get(name)
        .map(|value| value.to_str().map_err(|_| IngestError::BadRequest(format!("header {name} is not visible ASCII"))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_source_types_from_the_body() {
        let json = serde_json::json!({"type": "deploy"});
        let identity = identify(&Verify::None, "ci", &HeaderMap::new(), b"x", &json).expect("identified");
        assert_eq!(identity.event_type, "ci.deploy");
        assert_eq!(identity.id.len(), 64);
        let identity =
            identify(&Verify::None, "ci", &HeaderMap::new(), b"x", &serde_json::json!([1])).expect("identified");
        assert_eq!(identity.event_type, "ci.event");
    }
}
