//! Signature schemes: each checks that a request is authentic ([`verify`]) and derives the
//! event's id, type and attributes from it ([`identify`]). Nothing here knows about HTTP
//! routes, so other transports can use the same schemes. Every comparison of a signature or
//! token is constant-time, and no error names a secret or an expected signature.

pub mod github;
pub mod hmac;
#[cfg(test)]
mod properties;
pub mod slack;
pub mod standard_webhooks;
pub mod stripe;

use std::time::Duration;

use ::hmac::{Hmac, Mac};
use hyper::HeaderMap;
use sha2::{Digest, Sha256, Sha512};

use crate::config::{Algorithm, IdentityRules, Secret, Verify};
use crate::ingest::IngestError;

/// What a verified request says about its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The sender's delivery id, or the body's SHA-256.
    pub id: String,
    /// The full event type, provider prefix included (not yet normalised).
    pub event_type: String,
    /// Selected headers, passed to plugins.
    pub attributes: Vec<(String, String)>,
}

/// What a verified request is.
#[derive(Debug, Clone, PartialEq)]
pub enum Identified {
    /// An event to accept.
    Event(Identity),
    /// A handshake the host answers at once with this JSON (Slack's `url_verification`).
    Answer(serde_json::Value),
}

/// Checks the request's signature with the source's scheme. Runs before the body is parsed.
/// `now` is the current time in seconds since the Unix epoch.
pub fn verify(scheme: &Verify, headers: &HeaderMap, body: &[u8], now: u64) -> Result<(), IngestError> {
    match scheme {
        Verify::Github { secrets } => github::verify(secrets, headers, body),
        Verify::Stripe { secrets, tolerance } => stripe::verify(secrets, *tolerance, headers, body, now),
        Verify::Slack { secrets, tolerance } => slack::verify(secrets, *tolerance, headers, body, now),
        Verify::StandardWebhooks { keys, tolerance } => standard_webhooks::verify(keys, *tolerance, headers, body, now),
        Verify::Hmac(config) => hmac::verify(config, headers, body, now),
        Verify::Token { secrets, header } => hmac::verify_token(secrets, header, headers),
        Verify::None => Ok(()),
    }
}

/// Derives the event's identity from a verified request and its parsed body.
pub fn identify(
    scheme: &Verify,
    rules: &IdentityRules,
    source: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Identified, IngestError> {
    match scheme {
        // GitHub needs one field of the body: no tree of it is built (a fifth of ingest's CPU).
        Verify::Github { .. } => github::identify(headers, body).map(Identified::Event),
        Verify::Stripe { .. } => stripe::identify(&parse_json(body)?).map(Identified::Event),
        Verify::Slack { .. } => slack::identify(headers, body, &parse_json(body)?),
        Verify::StandardWebhooks { .. } => {
            standard_webhooks::identify(source, headers, &parse_json(body)?).map(Identified::Event)
        }
        Verify::Hmac(_) | Verify::Token { .. } | Verify::None => {
            identify_by_rules(rules, source, headers, body, &parse_json(body)?).map(Identified::Event)
        }
    }
}

/// The body as a JSON tree, or a bad request saying why it is not JSON.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, IngestError> {
    serde_json::from_slice(body).map_err(|err| IngestError::BadRequest(format!("body is not valid JSON: {err}")))
}

/// The generic schemes' identity: id from a header or a JSON pointer (else the body's hash),
/// type `{source}.{value}` from a header or a JSON pointer (`/type` by default), or
/// `{source}.event` when neither gives one.
pub fn identify_by_rules(
    rules: &IdentityRules,
    source: &str,
    headers: &HeaderMap,
    body: &[u8],
    json: &serde_json::Value,
) -> Result<Identity, IngestError> {
    let id = match (&rules.id_header, &rules.id_pointer) {
        (Some(header), _) => header_str(headers, header)?.filter(|id| !id.is_empty()).map(str::to_owned),
        (None, Some(pointer)) => json.pointer(pointer).and_then(json_text),
        (None, None) => None,
    }
    .unwrap_or_else(|| id_from_body(body));
    let kind = match (&rules.type_header, &rules.type_pointer) {
        (Some(header), _) => header_str(headers, header)?.map(str::to_owned),
        (None, pointer) => json.pointer(pointer.as_deref().unwrap_or("/type")).and_then(json_text),
    };
    let kind = kind.filter(|kind| !kind.trim().is_empty()).unwrap_or_else(|| "event".to_owned());
    Ok(Identity { id, event_type: format!("{source}.{kind}"), attributes: Vec::new() })
}

/// A JSON string or number as text.
fn json_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// A required string field of the body, or a bad request naming it.
pub fn body_str<'j>(json: &'j serde_json::Value, pointer: &str, what: &str) -> Result<&'j str, IngestError> {
    json.pointer(pointer)
        .and_then(serde_json::Value::as_str)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| IngestError::BadRequest(format!("body has no string {what}")))
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

/// A header every request of the scheme must carry to be verified, or 401 naming it: missing,
/// or not visible ASCII (no valid signature, timestamp or token is).
pub fn required_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, IngestError> {
    let value = headers.get(name).ok_or_else(|| IngestError::Unauthorized(format!("missing {name} header")))?;
    value.to_str().map_err(|_| IngestError::Unauthorized(format!("header {name} is not visible ASCII")))
}

/// Parses a Unix timestamp in seconds and checks it is within `tolerance` of `now`, either
/// way: too old is a replay, too far ahead is a forgery or a broken clock.
pub fn check_timestamp(text: &str, now: u64, tolerance: Duration, what: &str) -> Result<u64, IngestError> {
    let timestamp: u64 = text
        .trim()
        .parse()
        .map_err(|_| IngestError::Unauthorized(format!("malformed {what}: expected Unix seconds")))?;
    let tolerance = tolerance.as_secs();
    if now > timestamp.saturating_add(tolerance) {
        return Err(IngestError::Unauthorized(format!(
            "{what} is {} s old; the tolerance is {tolerance} s",
            now - timestamp
        )));
    }
    if timestamp > now.saturating_add(tolerance) {
        return Err(IngestError::Unauthorized(format!(
            "{what} is {} s in the future; the tolerance is {tolerance} s",
            timestamp - now
        )));
    }
    Ok(timestamp)
}

/// The MAC of the concatenated `parts` under `key`.
pub fn mac(algorithm: Algorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    fn run<M: Mac + ::hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut mac = <M as ::hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    }
    match algorithm {
        Algorithm::Sha256 => run::<Hmac<Sha256>>(key, parts),
        Algorithm::Sha512 => run::<Hmac<Sha512>>(key, parts),
    }
}

/// Succeeds when some candidate signature is the MAC of `parts` under some key; otherwise a
/// 401 saying the signature in `header` does not match (the one wording every scheme uses).
pub fn require_match(
    algorithm: Algorithm,
    keys: &[Secret],
    parts: &[&[u8]],
    candidates: &[Vec<u8>],
    header: &str,
) -> Result<(), IngestError> {
    if any_matches(algorithm, keys, parts, candidates) {
        Ok(())
    } else {
        Err(IngestError::Unauthorized(format!("{header} does not match the body")))
    }
}

/// Whether any candidate signature is the MAC of `parts` under any of the keys, comparing
/// each in constant time.
pub fn any_matches(algorithm: Algorithm, keys: &[Secret], parts: &[&[u8]], candidates: &[Vec<u8>]) -> bool {
    use subtle::ConstantTimeEq;
    let mut found = subtle::Choice::from(0);
    for key in keys {
        let expected = mac(algorithm, key.expose(), parts);
        for candidate in candidates {
            found |= expected.ct_eq(candidate);
        }
    }
    found.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> IdentityRules {
        IdentityRules::default()
    }

    #[test]
    fn generic_sources_type_from_the_body_by_default() {
        let json = serde_json::json!({"type": "deploy"});
        let identity = identify_by_rules(&rules(), "ci", &HeaderMap::new(), b"x", &json).expect("identified");
        assert_eq!((identity.event_type.as_str(), identity.id.len()), ("ci.deploy", 64));
        let identity = identify_by_rules(&rules(), "ci", &HeaderMap::new(), b"x", &serde_json::json!([1])).expect("ok");
        assert_eq!(identity.event_type, "ci.event");
    }

    #[test]
    fn generic_sources_follow_their_header_and_pointer_rules() {
        let mut headers = HeaderMap::new();
        headers.insert("x-gitlab-event", "Push Hook".parse().expect("value"));
        let rules = IdentityRules {
            id_pointer: Some("/object/id".into()),
            type_header: Some("x-gitlab-event".into()),
            ..IdentityRules::default()
        };
        let json = serde_json::json!({"object": {"id": 42}});
        let identity = identify_by_rules(&rules, "gitlab", &headers, b"{}", &json).expect("identified");
        assert_eq!((identity.id.as_str(), identity.event_type.as_str()), ("42", "gitlab.Push Hook"));
    }

    #[test]
    fn timestamps_outside_the_tolerance_either_way_are_refused_with_the_reason() {
        let tolerance = Duration::from_secs(300);
        assert_eq!(check_timestamp("1000", 1200, tolerance, "timestamp").ok(), Some(1000));
        let stale = check_timestamp("1000", 1301, tolerance, "timestamp").expect_err("stale");
        assert!(stale.to_string().contains("301 s old"), "{stale}");
        let future = check_timestamp("2000", 1000, tolerance, "timestamp").expect_err("future");
        assert!(future.to_string().contains("in the future"), "{future}");
        assert!(check_timestamp("soon", 1000, tolerance, "timestamp").is_err());
        assert!(check_timestamp("99999999999999999999999", 1000, tolerance, "timestamp").is_err());
    }

    #[test]
    fn any_key_and_any_candidate_may_match() {
        let keys = [Secret::new("old"), Secret::new("new")];
        let good = mac(Algorithm::Sha256, b"new", &[b"body"]);
        assert!(any_matches(Algorithm::Sha256, &keys, &[b"body"], &[b"junk".to_vec(), good.clone()]));
        assert!(!any_matches(Algorithm::Sha256, &keys, &[b"other"], &[good]));
        assert!(!any_matches(Algorithm::Sha512, &keys, &[b"body"], &[]));
    }
}
