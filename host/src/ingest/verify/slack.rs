//! Slack: `X-Slack-Signature: v0=<hex>`, an HMAC-SHA256 of `"v0:{X-Slack-Request-Timestamp}:{body}"`
//! with the app's signing secret, five minutes' tolerance. The `url_verification` handshake is
//! answered at once with its `challenge`. Id: the body's `event_id` (the same on Slack's
//! retries, so `X-Slack-Retry-Num` never makes a duplicate); type `slack.{event.type}`, or
//! `slack.{type}` for envelopes without an inner event.

use std::time::Duration;

use hyper::HeaderMap;

use super::{Identified, Identity, check_timestamp, header_str, id_from_body, mac, require_match, required_header};
use crate::config::{Algorithm, Secret};
use crate::ingest::IngestError;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// Header carrying the request's Unix time.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Header Slack adds when it retries, passed on as the `slack-retry-num` attribute.
pub const RETRY_NUM_HEADER: &str = "x-slack-retry-num";
/// Header saying why Slack retries, passed on as the `slack-retry-reason` attribute.
pub const RETRY_REASON_HEADER: &str = "x-slack-retry-reason";

const VERSION: &str = "v0";

/// The `X-Slack-Signature` value Slack would send at Unix time `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let signature = mac(Algorithm::Sha256, secret, &[format!("{VERSION}:{timestamp}:").as_bytes(), body]);
    format!("{VERSION}={}", hex::encode(signature))
}

/// Checks the timestamp (within `tolerance` of `now`) and the signature against each secret.
pub fn verify(
    secrets: &[Secret],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), IngestError> {
    let timestamp = required_header(headers, TIMESTAMP_HEADER)?;
    check_timestamp(timestamp, now, tolerance, "X-Slack-Request-Timestamp")?;
    let signature = required_header(headers, SIGNATURE_HEADER)?
        .strip_prefix("v0=")
        .and_then(|hex_digest| hex::decode(hex_digest).ok())
        .ok_or_else(|| IngestError::Unauthorized("malformed X-Slack-Signature header; expected v0=<hex>".to_owned()))?;
    let base = format!("{VERSION}:{}:", timestamp.trim());
    require_match(Algorithm::Sha256, secrets, &[base.as_bytes(), body], &[signature], "X-Slack-Signature")
}

/// The handshake's answer, or the event's identity.
pub fn identify(headers: &HeaderMap, body: &[u8], json: &serde_json::Value) -> Result<Identified, IngestError> {
    if json.get("type").and_then(serde_json::Value::as_str) == Some("url_verification") {
        let challenge = json
            .get("challenge")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| IngestError::BadRequest("url_verification without a challenge".to_owned()))?;
        return Ok(Identified::Answer(serde_json::json!({ "challenge": challenge })));
    }
    let id = json.get("event_id").and_then(serde_json::Value::as_str).map_or_else(|| id_from_body(body), str::to_owned);
    let kind =
        json.pointer("/event/type").or_else(|| json.get("type")).and_then(serde_json::Value::as_str).unwrap_or("event");
    let mut attributes = Vec::new();
    for (header, name) in [(RETRY_NUM_HEADER, "slack-retry-num"), (RETRY_REASON_HEADER, "slack-retry-reason")] {
        if let Some(value) = header_str(headers, header)? {
            attributes.push((name.to_owned(), value.to_owned()));
        }
    }
    Ok(Identified::Event(Identity { id, event_type: format!("slack.{kind}"), attributes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_secs(300);
    // Slack's documented example ("Verifying requests from Slack").
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const TIMESTAMP: u64 = 1_531_420_618;
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIGNATURE: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    fn headers(timestamp: &str, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, timestamp.parse().expect("value"));
        headers.insert(SIGNATURE_HEADER, signature.parse().expect("value"));
        headers
    }

    #[test]
    fn slacks_documented_example_verifies() {
        assert_eq!(sign(SECRET.as_bytes(), TIMESTAMP, BODY.as_bytes()), SIGNATURE);
        let result = verify(
            &[Secret::new(SECRET)],
            TOLERANCE,
            &headers("1531420618", SIGNATURE),
            BODY.as_bytes(),
            TIMESTAMP + 10,
        );
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn tampered_stale_future_and_malformed_requests_are_refused() {
        let secrets = [Secret::new(SECRET)];
        let good = headers("1531420618", SIGNATURE);
        assert!(verify(&secrets, TOLERANCE, &good, b"token=other", TIMESTAMP).is_err());
        assert!(verify(&[Secret::new("wrong")], TOLERANCE, &good, BODY.as_bytes(), TIMESTAMP).is_err());
        assert!(
            verify(&secrets, TOLERANCE, &good, BODY.as_bytes(), TIMESTAMP + 301)
                .expect_err("stale")
                .to_string()
                .contains("old")
        );
        assert!(
            verify(&secrets, TOLERANCE, &good, BODY.as_bytes(), TIMESTAMP - 301)
                .expect_err("future")
                .to_string()
                .contains("future")
        );
        assert!(verify(&secrets, TOLERANCE, &headers("1531420618", "a2114d57"), BODY.as_bytes(), TIMESTAMP).is_err());
        assert!(verify(&secrets, TOLERANCE, &HeaderMap::new(), BODY.as_bytes(), TIMESTAMP).is_err());
    }

    #[test]
    fn url_verification_is_answered_and_events_are_typed_by_their_inner_event() {
        let handshake = serde_json::json!({"type": "url_verification", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"});
        assert_eq!(
            identify(&HeaderMap::new(), b"", &handshake).expect("answer"),
            Identified::Answer(
                serde_json::json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
            )
        );
        let mut retried = HeaderMap::new();
        retried.insert(RETRY_NUM_HEADER, "1".parse().expect("value"));
        let callback =
            serde_json::json!({"type": "event_callback", "event_id": "Ev1", "event": {"type": "app_mention"}});
        let Identified::Event(identity) = identify(&retried, b"", &callback).expect("event") else {
            panic!("not an event")
        };
        assert_eq!((identity.id.as_str(), identity.event_type.as_str()), ("Ev1", "slack.app_mention"));
        assert_eq!(identity.attributes, [("slack-retry-num".to_owned(), "1".to_owned())]);
    }
}
