//! GitHub webhooks: `X-Hub-Signature-256: sha256=<hex>`, an HMAC-SHA256 of the raw body.
//! Id from `X-GitHub-Delivery`; type `github.{X-GitHub-Event}[.{action}]`.

use hyper::HeaderMap;

use super::{Identity, header_str, id_from_body, mac, parse_json, require_match, required_header};
use crate::config::{Algorithm, Secret};
use crate::ingest::IngestError;

/// Header carrying the SHA-256 signature.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Header carrying the legacy SHA-1 signature, which is refused.
pub const SHA1_SIGNATURE_HEADER: &str = "x-hub-signature";
/// Header carrying the event name (`push`, `pull_request`, …).
pub const EVENT_HEADER: &str = "x-github-event";
/// Header carrying the unique delivery id.
pub const DELIVERY_HEADER: &str = "x-github-delivery";
/// Header carrying the webhook's id, passed on as the `hook-id` attribute.
pub const HOOK_ID_HEADER: &str = "x-github-hook-id";

const PREFIX: &str = "sha256=";

/// The `X-Hub-Signature-256` value GitHub would send for `body` signed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(mac(Algorithm::Sha256, secret, &[body])))
}

/// Checks the signature against each secret in constant time; any may match.
pub fn verify(secrets: &[Secret], headers: &HeaderMap, body: &[u8]) -> Result<(), IngestError> {
    if !headers.contains_key(SIGNATURE_HEADER) && headers.contains_key(SHA1_SIGNATURE_HEADER) {
        return Err(IngestError::Unauthorized(
            "only a SHA-1 X-Hub-Signature was sent; X-Hub-Signature-256 is required".to_owned(),
        ));
    }
    let value = required_header(headers, SIGNATURE_HEADER)?;
    let signature =
        value.strip_prefix(PREFIX).and_then(|hex_digest| hex::decode(hex_digest).ok()).ok_or_else(|| {
            IngestError::Unauthorized("malformed X-Hub-Signature-256 header; expected sha256=<hex>".to_owned())
        })?;
    require_match(Algorithm::Sha256, secrets, &[body], &[signature], "X-Hub-Signature-256")
}

/// The event's id, type and attributes from GitHub's headers and the body's `action`.
pub fn identify(headers: &HeaderMap, body: &[u8]) -> Result<Identity, IngestError> {
    let event = header_str(headers, EVENT_HEADER)?
        .filter(|event| !event.is_empty())
        .ok_or_else(|| IngestError::BadRequest("missing X-GitHub-Event header".to_owned()))?;
    let mut event_type = format!("github.{event}");
    if let Some(action) = action(body)? {
        event_type.push('.');
        event_type.push_str(&action);
    }
    let id = match header_str(headers, DELIVERY_HEADER)? {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => id_from_body(body),
    };
    let mut attributes = Vec::new();
    if let Some(hook_id) = header_str(headers, HOOK_ID_HEADER)? {
        attributes.push(("hook-id".to_owned(), hook_id.to_owned()));
    }
    Ok(Identity { id, event_type, attributes })
}

/// The body's top-level `action` when it is a string; the body must be JSON. The usual body,
/// an object, is read without building a tree of it; anything the one-field read cannot take
/// (another JSON value, `action` twice, not JSON) goes through the full parse, which answers
/// exactly as before and names what is wrong.
fn action(body: &[u8]) -> Result<Option<String>, IngestError> {
    #[derive(serde::Deserialize)]
    struct Top {
        #[serde(default)]
        action: Option<serde_json::Value>,
    }
    // A struct also reads from an array (`["opened"]` as `action`): only an object goes the
    // short way.
    let object = body.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{');
    let action = match serde_json::from_slice::<Top>(body) {
        Ok(top) if object => top.action,
        _ => parse_json(body)?.get_mut("action").map(serde_json::Value::take),
    };
    Ok(match action {
        Some(serde_json::Value::String(action)) => Some(action),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (hyper::header::HeaderName::from_static(name), value.parse().expect("header value")))
            .collect()
    }

    #[test]
    fn signs_like_githubs_documented_example() {
        // https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries#testing-the-webhook-payload-validation
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn valid_signature_passes_and_tampered_body_fails() {
        let secrets = [Secret::new("s3cret")];
        let signed = headers(&[(SIGNATURE_HEADER, &sign(b"s3cret", b"{\"a\":1}"))]);
        assert!(verify(&secrets, &signed, b"{\"a\":1}").is_ok());
        assert!(matches!(verify(&secrets, &signed, b"{\"a\":2}"), Err(IngestError::Unauthorized(_))));
    }

    #[test]
    fn a_signature_header_that_is_not_ascii_is_unauthorized_not_a_bad_request() {
        let mut signed = HeaderMap::new();
        let value = hyper::header::HeaderValue::from_bytes("sha256=é".as_bytes()).expect("opaque bytes");
        signed.insert(SIGNATURE_HEADER, value);
        let result = verify(&[Secret::new("s3cret")], &signed, b"{}");
        assert!(matches!(&result, Err(IngestError::Unauthorized(m)) if m.contains("not visible ASCII")), "{result:?}");
    }

    #[test]
    fn rotated_secret_is_accepted() {
        let secrets = [Secret::new("new"), Secret::new("old")];
        let signed = headers(&[(SIGNATURE_HEADER, &sign(b"old", b"{}"))]);
        assert!(verify(&secrets, &signed, b"{}").is_ok());
    }

    #[test]
    fn sha1_only_and_malformed_signatures_are_refused_with_a_reason() {
        let secrets = [Secret::new("s")];
        let sha1 = verify(&secrets, &headers(&[(SHA1_SIGNATURE_HEADER, "sha1=abcd")]), b"{}");
        assert!(matches!(sha1, Err(IngestError::Unauthorized(m)) if m.contains("SHA-1")));
        for bad in ["abcd", "sha256=zz", "sha256="] {
            let result = verify(&secrets, &headers(&[(SIGNATURE_HEADER, bad)]), b"{}");
            assert!(matches!(result, Err(IngestError::Unauthorized(_))), "{bad} accepted");
        }
    }

    #[test]
    fn type_gets_the_action_and_id_falls_back_to_the_body_hash() {
        let body = br#"{"zen": "x", "action": "opened", "n": [1, {"action": "nested"}]}"#;
        let identity = identify(&headers(&[(EVENT_HEADER, "pull_request")]), body).expect("identified");
        assert_eq!(identity.event_type, "github.pull_request.opened");
        assert_eq!(identity.id, id_from_body(body));
        let identity =
            identify(&headers(&[(EVENT_HEADER, "push"), (DELIVERY_HEADER, "d-1")]), b"{}").expect("identified");
        assert_eq!((identity.event_type.as_str(), identity.id.as_str()), ("github.push", "d-1"));
    }

    #[test]
    fn an_action_that_is_not_text_is_ignored_and_a_body_that_is_not_json_refused() {
        let push = headers(&[(EVENT_HEADER, "push")]);
        for body in [&br#"{"action": 5}"#[..], br#" [1, 2]"#, br#"["opened"]"#, b"\"text\"", br#"{"action": null}"#] {
            let identity = identify(&push, body).expect("identified");
            assert_eq!(identity.event_type, "github.push", "{}", String::from_utf8_lossy(body));
        }
        // A key given twice: the last one counts, as with any JSON tree.
        let twice = identify(&push, br#"{"action": "a", "action": "b"}"#).expect("identified");
        assert_eq!(twice.event_type, "github.push.b");
        for body in [&br#"{"action": "a""#[..], b"[1,", b"", br#"{"a": 1} x"#, b"nope"] {
            let refused = identify(&push, body);
            assert!(
                matches!(&refused, Err(IngestError::BadRequest(m)) if m.starts_with("body is not valid JSON")),
                "{}: {refused:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
