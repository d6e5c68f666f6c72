//! `wasmhook send`: signs a sample payload the way a provider would and posts it, for trying
//! a host out by hand and for tests.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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

/// Posts `outgoing` to an `http://` `url` and returns the status and the body as text.
pub async fn post(url: &str, outgoing: Outgoing) -> anyhow::Result<(StatusCode, String)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!(
            "{url:?}: only http:// URLs are supported (put TLS in front of the host, not in this tool)"
        );
    }
    let authority = uri.authority().context("the URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::post(path).header(header::HOST, authority.as_str());
    for (name, value) in &outgoing.headers {
        request = request.header(name, value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(outgoing.body)))?)
        .await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
