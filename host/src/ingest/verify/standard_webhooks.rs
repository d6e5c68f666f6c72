//! Standard Webhooks (the scheme Svix and others use): `webhook-id`, `webhook-timestamp` and
//! `webhook-signature` (space-separated `v1,<base64>` entries), an HMAC-SHA256 of
//! `"{id}.{timestamp}.{body}"` keyed with the base64 secret after its `whsec_` prefix; five
//! minutes' tolerance. Id: `webhook-id`; type: the body's `type`, after the source's name.
//! Svix sends the same headers named `svix-id`, `svix-timestamp` and `svix-signature`, which
//! are read first, as Svix's own libraries do.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::HeaderMap;

use super::{Identity, check_timestamp, mac, require_match, required_header};
use crate::config::{Algorithm, Secret};
use crate::ingest::IngestError;

/// Header carrying the message id.
pub const ID_HEADER: &str = "webhook-id";
/// Header carrying the Unix time of sending.
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Header carrying the signatures.
pub const SIGNATURE_HEADER: &str = "webhook-signature";

/// The header `name` (one of the three above), or its Svix name (`svix-` for `webhook-`).
fn scheme_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, IngestError> {
    let svix = name.replacen("webhook-", "svix-", 1);
    if headers.contains_key(&svix) { required_header(headers, &svix) } else { required_header(headers, name) }
}

/// The `webhook-signature` value for message `id` sent at Unix time `timestamp`.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let content = format!("{id}.{timestamp}.");
    format!("v1,{}", STANDARD.encode(mac(Algorithm::Sha256, key, &[content.as_bytes(), body])))
}

/// Checks the timestamp (within `tolerance` of `now`) and that some `v1` entry matches some key.
pub fn verify(
    keys: &[Secret],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), IngestError> {
    let id = scheme_header(headers, ID_HEADER)?;
    let timestamp = scheme_header(headers, TIMESTAMP_HEADER)?;
    check_timestamp(timestamp, now, tolerance, "webhook-timestamp")?;
    let signatures: Vec<Vec<u8>> = scheme_header(headers, SIGNATURE_HEADER)?
        .split_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, signature)| STANDARD.decode(signature).ok())
        .collect();
    if signatures.is_empty() {
        return Err(IngestError::Unauthorized("webhook-signature has no v1 signature".to_owned()));
    }
    let content = format!("{id}.{}.", timestamp.trim());
    require_match(Algorithm::Sha256, keys, &[content.as_bytes(), body], &signatures, "webhook-signature")
}

/// The event's id from `webhook-id` and its type from the body.
pub fn identify(source: &str, headers: &HeaderMap, json: &serde_json::Value) -> Result<Identity, IngestError> {
    let id = scheme_header(headers, ID_HEADER)?.to_owned();
    let kind = json.get("type").and_then(serde_json::Value::as_str).unwrap_or("event");
    Ok(Identity { id, event_type: format!("{source}.{kind}"), attributes: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_secs(300);

    fn headers(id: &str, timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ID_HEADER, id.parse().expect("value"));
        headers.insert(TIMESTAMP_HEADER, timestamp.parse().expect("value"));
        headers.insert(SIGNATURE_HEADER, signature.parse().expect("value"));
        headers
    }

    fn key(secret: &str) -> Secret {
        Secret::from_standard_webhooks(secret).expect("valid secret")
    }

    /// The reference libraries' vectors (standard-webhooks `libraries/rust` `test_sign` and
    /// `libraries/javascript` "sign function works").
    const VECTORS: [(&str, &str, u64, &str, &str); 2] = [
        (
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
    ];

    #[test]
    fn the_reference_vectors_sign_and_verify() {
        for (secret, id, timestamp, body, expected) in VECTORS {
            assert_eq!(sign(key(secret).expose(), id, timestamp, body.as_bytes()), expected);
            let result = verify(
                &[key(secret)],
                TOLERANCE,
                &headers(id, &timestamp.to_string(), expected),
                body.as_bytes(),
                timestamp,
            );
            assert!(result.is_ok(), "{id}: {result:?}");
        }
    }

    #[test]
    fn other_versions_and_bogus_entries_beside_a_good_one_still_verify() {
        let (secret, id, timestamp, body, good) = VECTORS[0];
        let header = format!("v2,abc v1,Zm9v {good} v1a,bm9wZQ==");
        assert!(
            verify(
                &[key(secret)],
                TOLERANCE,
                &headers(id, &timestamp.to_string(), &header),
                body.as_bytes(),
                timestamp
            )
            .is_ok()
        );
    }

    #[test]
    fn tampered_wrong_key_stale_future_and_malformed_are_refused() {
        let (secret, id, timestamp, body, good) = VECTORS[0];
        let ts = timestamp.to_string();
        let check = |keys: &[Secret], headers: &HeaderMap, body: &str, now: u64| {
            verify(keys, TOLERANCE, headers, body.as_bytes(), now)
        };
        assert!(check(&[key(secret)], &headers(id, &ts, good), "{}", timestamp).is_err());
        assert!(check(&[key(VECTORS[1].0)], &headers(id, &ts, good), body, timestamp).is_err());
        assert!(check(&[key(secret)], &headers("msg_other", &ts, good), body, timestamp).is_err(), "the id is signed");
        assert!(
            check(&[key(secret)], &headers(id, &ts, good), body, timestamp + 301)
                .expect_err("stale")
                .to_string()
                .contains("old")
        );
        assert!(
            check(&[key(secret)], &headers(id, &ts, good), body, timestamp - 301)
                .expect_err("future")
                .to_string()
                .contains("future")
        );
        for bad in [
            "v1",
            "v1,",
            "v2,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
            "tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ] {
            assert!(check(&[key(secret)], &headers(id, &ts, bad), body, timestamp).is_err(), "{bad} accepted");
        }
        assert!(check(&[key(secret)], &HeaderMap::new(), body, timestamp).is_err());
    }

    #[test]
    fn svix_named_headers_verify_and_identify_alike() {
        let (secret, id, timestamp, body, good) = VECTORS[0];
        let mut svix = HeaderMap::new();
        svix.insert("svix-id", id.parse().expect("value"));
        svix.insert("svix-timestamp", timestamp.to_string().parse().expect("value"));
        svix.insert("svix-signature", good.parse().expect("value"));
        verify(&[key(secret)], TOLERANCE, &svix, body.as_bytes(), timestamp).expect("svix-* verifies");
        let identity = identify("svix", &svix, &serde_json::json!({"type": "user.created"})).expect("identified");
        assert_eq!((identity.id.as_str(), identity.event_type.as_str()), (id, "svix.user.created"));
        svix.insert("svix-signature", "v1,Zm9v".parse().expect("value"));
        assert!(verify(&[key(secret)], TOLERANCE, &svix, body.as_bytes(), timestamp).is_err());
    }

    #[test]
    fn a_rotated_key_is_accepted() {
        let (secret, id, timestamp, body, good) = VECTORS[0];
        assert!(
            verify(
                &[key(VECTORS[1].0), key(secret)],
                TOLERANCE,
                &headers(id, &timestamp.to_string(), good),
                body.as_bytes(),
                timestamp
            )
            .is_ok()
        );
    }

    #[test]
    fn secrets_decode_with_or_without_their_prefix() {
        assert_eq!(key("whsec_Zm9v").expose(), b"foo");
        assert_eq!(key("Zm9v").expose(), b"foo");
        assert!(Secret::from_standard_webhooks("whsec_not base64!").is_err());
    }
}
