//! Generic schemes for any other sender. `hmac`: a MAC (SHA-256 or SHA-512, hex or base64,
//! optional prefix such as `sha256=`) of the body, or of a template such as
//! `{timestamp}.{body}` when a timestamp header is configured. `token`: a shared secret sent
//! as-is in a header (GitLab's `X-Gitlab-Token`), compared in constant time.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{check_timestamp, mac, require_match, required_header};
use crate::config::{Encoding, HmacScheme, Secret};
use crate::ingest::IngestError;

/// The header value the sender would put in `scheme.header` for `body` (and `timestamp`).
pub fn sign(scheme: &HmacScheme, secret: &[u8], timestamp: Option<u64>, body: &[u8]) -> String {
    let timestamp = timestamp.map(|t| t.to_string()).unwrap_or_default();
    let (before, after) = scheme.signed.around_body(&timestamp);
    let signature = mac(scheme.algorithm, secret, &[before.as_bytes(), body, after.as_bytes()]);
    let encoded = match scheme.encoding {
        Encoding::Hex => hex::encode(signature),
        Encoding::Base64 => STANDARD.encode(signature),
    };
    format!("{}{encoded}", scheme.prefix)
}

/// Checks the timestamp (when configured) and the MAC against each secret.
pub fn verify(scheme: &HmacScheme, headers: &HeaderMap, body: &[u8], now: u64) -> Result<(), IngestError> {
    let timestamp = match &scheme.timestamp_header {
        Some(header) => {
            let text = required_header(headers, header)?;
            check_timestamp(text, now, scheme.tolerance, header)?;
            text.trim()
        }
        None => "",
    };
    let header = &scheme.header;
    let malformed = || IngestError::Unauthorized(format!("malformed {header} header"));
    let value = required_header(headers, header)?.trim();
    let encoded = value.strip_prefix(scheme.prefix.as_str()).ok_or_else(malformed)?;
    let signature = match scheme.encoding {
        Encoding::Hex => hex::decode(encoded).map_err(|_| malformed())?,
        Encoding::Base64 => STANDARD.decode(encoded).map_err(|_| malformed())?,
    };
    let (before, after) = scheme.signed.around_body(timestamp);
    require_match(scheme.algorithm, &scheme.secrets, &[before.as_bytes(), body, after.as_bytes()], &[signature], header)
}

/// Checks that `header` holds one of the secrets. Both sides are hashed first, so the
/// comparison takes the same time whatever the lengths.
pub fn verify_token(secrets: &[Secret], header: &str, headers: &HeaderMap) -> Result<(), IngestError> {
    let given = Sha256::digest(required_header(headers, header)?.as_bytes());
    let mut found = subtle::Choice::from(0);
    for secret in secrets {
        found |= Sha256::digest(secret.expose()).ct_eq(&given);
    }
    if bool::from(found) { Ok(()) } else { Err(IngestError::Unauthorized(format!("{header} does not match"))) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Algorithm, SignedContent};

    fn scheme(algorithm: Algorithm, encoding: Encoding, prefix: &str, timestamp_header: Option<&str>) -> HmacScheme {
        let template = if timestamp_header.is_some() { "{timestamp}.{body}" } else { "{body}" };
        HmacScheme {
            secrets: vec![Secret::new("new"), Secret::new("old")],
            header: "x-signature".into(),
            algorithm,
            encoding,
            prefix: prefix.into(),
            timestamp_header: timestamp_header.map(str::to_owned),
            tolerance: Duration::from_secs(300),
            signed: SignedContent::parse(template).expect("template"),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (hyper::header::HeaderName::from_static(name), value.parse().expect("value")))
            .collect()
    }

    #[test]
    fn every_algorithm_and_encoding_round_trips_and_refuses_tampering() {
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            for encoding in [Encoding::Hex, Encoding::Base64] {
                let scheme = scheme(algorithm, encoding, "sha=", None);
                let signature = sign(&scheme, b"old", None, b"{\"a\":1}");
                assert!(signature.starts_with("sha="));
                let signed = headers(&[("x-signature", &signature)]);
                assert!(verify(&scheme, &signed, b"{\"a\":1}", 0).is_ok(), "{algorithm:?} {encoding:?}");
                assert!(verify(&scheme, &signed, b"{\"a\":2}", 0).is_err());
            }
        }
    }

    #[test]
    fn a_sha256_hex_signature_matches_a_known_value() {
        // The same construction as GitHub's documented vector.
        let mut scheme = scheme(Algorithm::Sha256, Encoding::Hex, "sha256=", None);
        scheme.secrets = vec![Secret::new("It's a Secret to Everybody")];
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify(&scheme, &headers(&[("x-signature", signature)]), b"Hello, World!", 0).is_ok());
    }

    #[test]
    fn a_timestamped_template_is_signed_and_checked_for_age() {
        let scheme = scheme(Algorithm::Sha256, Encoding::Hex, "", Some("x-timestamp"));
        let signature = sign(&scheme, b"new", Some(1000), b"{}");
        let signed = headers(&[("x-signature", &signature), ("x-timestamp", "1000")]);
        assert!(verify(&scheme, &signed, b"{}", 1100).is_ok());
        assert!(verify(&scheme, &signed, b"{}", 1301).expect_err("stale").to_string().contains("old"));
        let moved = headers(&[("x-signature", &signature), ("x-timestamp", "1001")]);
        assert!(verify(&scheme, &moved, b"{}", 1100).is_err(), "the timestamp is signed");
        assert!(verify(&scheme, &headers(&[("x-signature", &signature)]), b"{}", 1100).is_err());
    }

    #[test]
    fn missing_prefix_and_bad_encodings_are_malformed() {
        let scheme = scheme(Algorithm::Sha256, Encoding::Hex, "sha256=", None);
        for bad in ["abcd", "sha256=zz", "sha1=abcd"] {
            assert!(verify(&scheme, &headers(&[("x-signature", bad)]), b"{}", 0).is_err(), "{bad} accepted");
        }
        assert!(verify(&scheme, &HeaderMap::new(), b"{}", 0).is_err());
    }

    #[test]
    fn tokens_match_exactly_and_any_rotated_one_may() {
        let secrets = [Secret::new("t0ken"), Secret::new("old")];
        assert!(verify_token(&secrets, "x-gitlab-token", &headers(&[("x-gitlab-token", "old")])).is_ok());
        assert!(verify_token(&secrets, "x-gitlab-token", &headers(&[("x-gitlab-token", "t0ke")])).is_err());
        assert!(verify_token(&secrets, "x-gitlab-token", &headers(&[("x-gitlab-token", "t0ken ")])).is_err());
        assert!(verify_token(&secrets, "x-gitlab-token", &HeaderMap::new()).is_err());
    }
}
