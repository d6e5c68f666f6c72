//! Property tests over every verifier and the header parsers: whatever arrives, nothing
//! panics, and nothing but a correct signature under a configured secret is accepted.

use std::time::Duration;

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use proptest::prelude::*;

use super::*;
use crate::config::{Encoding, HmacScheme, SignedContent};
use crate::ingest::cloudevents;

const NOW: u64 = 1_800_000_000;
const TOLERANCE: Duration = Duration::from_secs(300);
const HEADERS: [&str; 12] = [
    github::SIGNATURE_HEADER,
    github::SHA1_SIGNATURE_HEADER,
    stripe::SIGNATURE_HEADER,
    slack::SIGNATURE_HEADER,
    slack::TIMESTAMP_HEADER,
    standard_webhooks::ID_HEADER,
    standard_webhooks::TIMESTAMP_HEADER,
    standard_webhooks::SIGNATURE_HEADER,
    "x-signature",
    "x-timestamp",
    "ce-id",
    "ce-type",
];

fn schemes(secret: &[u8]) -> Vec<Verify> {
    let secrets = vec![Secret::new(secret)];
    let hmac = |encoding, timestamp: bool| {
        Verify::Hmac(HmacScheme {
            secrets: secrets.clone(),
            header: "x-signature".into(),
            algorithm: Algorithm::Sha256,
            encoding,
            prefix: "sha256=".into(),
            timestamp_header: timestamp.then(|| "x-timestamp".to_owned()),
            tolerance: TOLERANCE,
            signed: SignedContent::parse(if timestamp { "{timestamp}.{body}" } else { "{body}" }).expect("template"),
        })
    };
    vec![
        Verify::Github { secrets: secrets.clone() },
        Verify::Stripe { secrets: secrets.clone(), tolerance: TOLERANCE },
        Verify::Slack { secrets: secrets.clone(), tolerance: TOLERANCE },
        Verify::StandardWebhooks { keys: secrets.clone(), tolerance: TOLERANCE },
        hmac(Encoding::Hex, false),
        hmac(Encoding::Base64, true),
        Verify::Token { secrets, header: "x-signature".into() },
    ]
}

/// The headers a sender with `secret` would send for `body`, per scheme.
fn signed_headers(scheme: &Verify, secret: &[u8], body: &[u8]) -> HeaderMap {
    let outgoing = match scheme {
        Verify::Github { .. } => crate::send::github(secret, "push", "d", body.to_vec()),
        Verify::Stripe { .. } => crate::send::stripe(secret, NOW, body.to_vec()),
        Verify::Slack { .. } => crate::send::slack(secret, NOW, body.to_vec()),
        Verify::StandardWebhooks { .. } => crate::send::standard_webhooks(secret, "msg_1", NOW, body.to_vec()),
        Verify::Hmac(hmac) => crate::send::hmac(hmac, secret, NOW, body.to_vec()),
        Verify::Token { header, .. } => crate::send::token(header, &String::from_utf8_lossy(secret), body.to_vec()),
        Verify::None => crate::send::unsigned(body.to_vec()),
    };
    outgoing.header_map()
}

fn arbitrary_headers() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((0..HEADERS.len(), proptest::collection::vec(any::<u8>(), 0..120)), 0..8).prop_map(
        |pairs| {
            let mut headers = HeaderMap::new();
            for (index, bytes) in pairs {
                if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                    headers.append(HeaderName::from_static(HEADERS[index]), value);
                }
            }
            headers
        },
    )
}

proptest! {
    #[test]
    fn arbitrary_headers_never_panic_and_are_never_accepted(
        headers in arbitrary_headers(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        for scheme in schemes(b"a secret nobody guesses") {
            prop_assert!(verify(&scheme, &headers, &body, NOW).is_err(), "{scheme:?} accepted {headers:?}");
        }
    }

    #[test]
    fn a_signed_request_passes_and_any_changed_byte_or_other_secret_fails(
        secret in "[a-zA-Z0-9]{8,40}",
        other in "[a-zA-Z0-9]{8,40}",
        body in proptest::collection::vec(any::<u8>(), 1..256),
        flip in any::<prop::sample::Index>(),
    ) {
        prop_assume!(secret != other);
        for scheme in schemes(secret.as_bytes()) {
            let headers = signed_headers(&scheme, secret.as_bytes(), &body);
            prop_assert!(verify(&scheme, &headers, &body, NOW).is_ok(), "{scheme:?} refused its own signature");
            let wrong = signed_headers(&scheme, other.as_bytes(), &body);
            prop_assert!(verify(&scheme, &wrong, &body, NOW).is_err(), "{scheme:?} accepted another secret");
            if !matches!(scheme, Verify::Token { .. }) {
                let mut tampered = body.clone();
                tampered[flip.index(body.len())] ^= 0x01;
                prop_assert!(verify(&scheme, &headers, &tampered, NOW).is_err(), "{scheme:?} accepted a changed body");
            }
        }
    }

    #[test]
    fn timestamps_of_any_text_never_panic(text in ".{0,40}", now in any::<u64>()) {
        let _ = check_timestamp(&text, now, TOLERANCE, "timestamp");
    }

    #[test]
    fn cloudevents_parsers_never_panic(headers in arbitrary_headers(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = cloudevents::from_binary(&headers, bytes::Bytes::from(body.clone()));
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
            let _ = cloudevents::from_structured(&json);
            let _ = cloudevents::from_batch(&json);
        }
    }
}
