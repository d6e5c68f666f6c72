//! `wasmhook send`: signs a sample payload the way a provider would, for trying a host out
//! by hand and for tests.

use crate::ingest::verify::github;

/// A webhook request ready to post.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Headers besides Host and Content-Length.
    pub headers: Vec<(String, String)>,
    /// The body, exactly as signed.
    pub body: Vec<u8>,
}

/// A GitHub delivery of `event` (such as `push`) with id `delivery`, signed with `secret`.
pub fn github(secret: &[u8], event: &str, delivery: &str, body: Vec<u8>) -> Outgoing {
    Outgoing {
        headers: vec![
            ("content-type".into(), "application/json".into()),
            (github::EVENT_HEADER.into(), event.into()),
            (github::DELIVERY_HEADER.into(), delivery.into()),
            (github::SIGNATURE_HEADER.into(), github::sign(secret, &body)),
        ],
        body,
    }
}
