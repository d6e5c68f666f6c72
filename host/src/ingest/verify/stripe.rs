//! Stripe: `Stripe-Signature: t=…,v1=…[,v1=…]`, an HMAC-SHA256 (hex) of `"{t}.{body}"` keyed
//! with the endpoint secret as it is written (`whsec_…` included). Any `v1` may match; other
//! schemes (`v0`) are ignored. Id: the body's `id`; type `stripe.{type}`.

use std::time::Duration;

use hyper::HeaderMap;

use super::{Identity, body_str, check_timestamp, mac, require_match, required_header};
use crate::config::{Algorithm, Secret};
use crate::ingest::IngestError;

/// Header carrying the timestamp and signatures.
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// The `Stripe-Signature` value Stripe would send at Unix time `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let signature = mac(Algorithm::Sha256, secret, &[timestamp.to_string().as_bytes(), b".", body]);
    format!("t={timestamp},v1={}", hex::encode(signature))
}

/// Checks the timestamp (within `tolerance` of `now`) and that some `v1` matches some secret.
pub fn verify(
    secrets: &[Secret],
    tolerance: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), IngestError> {
    let value = required_header(headers, SIGNATURE_HEADER)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for (key, item) in value.split(',').filter_map(|item| item.split_once('=')) {
        match key.trim() {
            "t" => timestamp = Some(item.trim()),
            "v1" => signatures.extend(hex::decode(item.trim()).ok()),
            _ => {}
        }
    }
    let timestamp =
        timestamp.ok_or_else(|| IngestError::Unauthorized("Stripe-Signature has no t= timestamp".to_owned()))?;
    if signatures.is_empty() {
        return Err(IngestError::Unauthorized("Stripe-Signature has no v1 signature".to_owned()));
    }
    check_timestamp(timestamp, now, tolerance, "Stripe-Signature timestamp")?;
    require_match(Algorithm::Sha256, secrets, &[timestamp.as_bytes(), b".", body], &signatures, "Stripe-Signature")
}

/// The event's id and type from the body.
pub fn identify(json: &serde_json::Value) -> Result<Identity, IngestError> {
    let id = body_str(json, "/id", "id")?.to_owned();
    let kind = body_str(json, "/type", "type")?;
    Ok(Identity { id, event_type: format!("stripe.{kind}"), attributes: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_secs(300);

    /// stripe-dotnet's `EventUtilityTest` fixture (`event_test_signature.json`), with its
    /// published header `t=1533204620,v1=2220f87e…,v0=63f3a723…` and secret `webhook_secret`.
    const PUBLISHED_BODY: &str = "{\n  \"id\": \"evt_123\",\n  \"object\": \"event\",\n  \"account\": \"acct_123\",\n  \"api_version\": \"2017-05-25\",\n  \"created\": 1533204620,\n  \"data\": {\n    \"object\": {\n      \"id\": \"cus_123\",\n      \"object\": \"customer\",\n      \"created\": 123456789,\n      \"email\": \"test@stripe.com\",\n      \"livemode\": false,\n      \"metadata\": {}\n    }\n  },\n  \"livemode\": false,\n  \"pending_webhooks\": 1,\n  \"request\": {\n    \"id\": \"req_123\",\n    \"idempotency_key\": \"idempotency-key-123\"\n  },\n  \"type\": \"customer.created\"\n}\n";
    const PUBLISHED_HEADER: &str = "t=1533204620,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef";

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(SIGNATURE_HEADER, value.parse().expect("header value"));
        headers
    }

    fn secrets(values: &[&str]) -> Vec<Secret> {
        values.iter().map(|v| Secret::new(*v)).collect()
    }

    #[test]
    fn stripes_published_vector_verifies() {
        assert_eq!(PUBLISHED_BODY.len(), 484);
        let result = verify(
            &secrets(&["webhook_secret"]),
            TOLERANCE,
            &headers(PUBLISHED_HEADER),
            PUBLISHED_BODY.as_bytes(),
            1_533_204_620,
        );
        assert!(result.is_ok(), "{result:?}");
        assert!(PUBLISHED_HEADER.starts_with(&sign(b"webhook_secret", 1_533_204_620, PUBLISHED_BODY.as_bytes())));
    }

    #[test]
    fn tampered_body_wrong_secret_and_only_v0_are_refused() {
        let now = 1_533_204_620;
        let tampered = PUBLISHED_BODY.replace("evt_123", "evt_124");
        assert!(
            verify(&secrets(&["webhook_secret"]), TOLERANCE, &headers(PUBLISHED_HEADER), tampered.as_bytes(), now)
                .is_err()
        );
        assert!(
            verify(&secrets(&["other"]), TOLERANCE, &headers(PUBLISHED_HEADER), PUBLISHED_BODY.as_bytes(), now)
                .is_err()
        );
        let only_v0 = "t=1533204620,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef";
        let err = verify(&secrets(&["webhook_secret"]), TOLERANCE, &headers(only_v0), PUBLISHED_BODY.as_bytes(), now)
            .expect_err("v0 only");
        assert!(err.to_string().contains("no v1"), "{err}");
    }

    #[test]
    fn any_v1_entry_and_any_rotated_secret_may_match() {
        let body = br#"{"id":"evt_1","type":"invoice.paid"}"#;
        let signed = sign(b"old", 1000, body);
        let header = format!("t=1000,v1=deadbeef,{}", signed.trim_start_matches("t=1000,"));
        assert!(verify(&secrets(&["new", "old"]), TOLERANCE, &headers(&header), body, 1000).is_ok());
        let twice = format!("{signed},{}", signed.trim_start_matches("t=1000,"));
        assert!(verify(&secrets(&["old"]), TOLERANCE, &headers(&twice), body, 1000).is_ok(), "duplicate v1 entries");
    }

    #[test]
    fn stale_future_missing_and_malformed_headers_are_refused() {
        let body = b"{}";
        let signed = sign(b"s", 1000, body);
        assert!(
            verify(&secrets(&["s"]), TOLERANCE, &headers(&signed), body, 1301)
                .expect_err("stale")
                .to_string()
                .contains("old")
        );
        assert!(
            verify(&secrets(&["s"]), TOLERANCE, &headers(&signed), body, 600)
                .expect_err("future")
                .to_string()
                .contains("future")
        );
        assert!(verify(&secrets(&["s"]), TOLERANCE, &HeaderMap::new(), body, 1000).is_err());
        for bad in ["v1=abc", "t=1000", "t=x,v1=00", "garbage", "t=1000,v1=zz"] {
            assert!(verify(&secrets(&["s"]), TOLERANCE, &headers(bad), body, 1000).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn identity_comes_from_the_body() {
        let identity = identify(&serde_json::json!({"id": "evt_1", "type": "invoice.paid"})).expect("identified");
        assert_eq!((identity.id.as_str(), identity.event_type.as_str()), ("evt_1", "stripe.invoice.paid"));
        assert!(identify(&serde_json::json!({"type": "invoice.paid"})).is_err());
    }
}
