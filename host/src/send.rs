//! `wasmhook send`: signs a sample payload the way each provider would, for trying a host out
//! by hand and for tests. Each function returns the headers to send with the body.

use crate::config::HmacScheme;
use crate::ingest::verify::{github, hmac, slack, standard_webhooks, stripe};

/// A webhook request ready to post.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Headers besides Host and Content-Length.
    pub headers: Vec<(String, String)>,
    /// The body, exactly as signed.
    pub body: Vec<u8>,
}

impl Outgoing {
    /// The headers as a map, as a server would receive them (for checking a signature
    /// in-process). Headers that are not valid HTTP are left out.
    pub fn header_map(&self) -> hyper::HeaderMap {
        self.headers
            .iter()
            .filter_map(|(name, value)| {
                Some((hyper::header::HeaderName::from_bytes(name.as_bytes()).ok()?, value.parse().ok()?))
            })
            .collect()
    }

    fn json(body: Vec<u8>, headers: impl IntoIterator<Item = (&'static str, String)>) -> Self {
        let mut all = vec![("content-type".to_owned(), "application/json".to_owned())];
        all.extend(headers.into_iter().map(|(name, value)| (name.to_owned(), value)));
        Outgoing { headers: all, body }
    }
}

/// A GitHub delivery of `event` (such as `push`) with id `delivery`.
pub fn github(secret: &[u8], event: &str, delivery: &str, body: Vec<u8>) -> Outgoing {
    let signature = github::sign(secret, &body);
    Outgoing::json(
        body,
        [
            (github::EVENT_HEADER, event.to_owned()),
            (github::DELIVERY_HEADER, delivery.to_owned()),
            (github::SIGNATURE_HEADER, signature),
        ],
    )
}

/// A Stripe event signed at Unix time `now` (its id and type are in the body).
pub fn stripe(secret: &[u8], now: u64, body: Vec<u8>) -> Outgoing {
    let signature = stripe::sign(secret, now, &body);
    Outgoing::json(body, [(stripe::SIGNATURE_HEADER, signature)])
}

/// A Slack request signed at Unix time `now`.
pub fn slack(secret: &[u8], now: u64, body: Vec<u8>) -> Outgoing {
    let signature = slack::sign(secret, now, &body);
    Outgoing::json(body, [(slack::TIMESTAMP_HEADER, now.to_string()), (slack::SIGNATURE_HEADER, signature)])
}

/// A Standard Webhooks message `id` signed at Unix time `now` with the decoded `key`.
pub fn standard_webhooks(key: &[u8], id: &str, now: u64, body: Vec<u8>) -> Outgoing {
    let signature = standard_webhooks::sign(key, id, now, &body);
    Outgoing::json(
        body,
        [
            (standard_webhooks::ID_HEADER, id.to_owned()),
            (standard_webhooks::TIMESTAMP_HEADER, now.to_string()),
            (standard_webhooks::SIGNATURE_HEADER, signature),
        ],
    )
}

/// A request signed as an `hmac` source with `scheme` expects (timestamped at `now` when the
/// scheme has a timestamp header).
pub fn hmac(scheme: &HmacScheme, secret: &[u8], now: u64, body: Vec<u8>) -> Outgoing {
    let timestamp = scheme.timestamp_header.as_ref().map(|_| now);
    let signature = hmac::sign(scheme, secret, timestamp, &body);
    let mut outgoing = Outgoing::json(body, []);
    outgoing.headers.push((scheme.header.clone(), signature));
    if let Some(header) = &scheme.timestamp_header {
        outgoing.headers.push((header.clone(), now.to_string()));
    }
    outgoing
}

/// A request carrying a shared `token` in `header`.
pub fn token(header: &str, token: &str, body: Vec<u8>) -> Outgoing {
    let mut outgoing = Outgoing::json(body, []);
    outgoing.headers.push((header.to_owned(), token.to_owned()));
    outgoing
}

/// An unsigned JSON request.
pub fn unsigned(body: Vec<u8>) -> Outgoing {
    Outgoing::json(body, [])
}
