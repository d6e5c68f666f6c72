//! A minimal HTTP/1 client for the command line (`send`, `dlq`, `replay`): one request per
//! connection, plain `http://` only.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a connection may take. The answer has no limit: a replay of many events answers
/// once they are all due, and a client that left would cut it short.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one request and returns the status and the body as text.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, String)> {
    let uri: Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{url:?}: only http:// URLs are supported (put TLS in front of the host, not in this tool)");
    }
    let authority = uri.authority().context("the URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host_to_connect(&authority), port)));
    let stream = connect
        .await
        .map_err(|_| anyhow::anyhow!("no connection to {authority} within {} s", CONNECT_TIMEOUT.as_secs()))?
        .with_context(|| format!("cannot connect to {authority}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder().method(method).uri(path).header(header::HOST, authority.as_str());
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = sender.send_request(request.body(Full::new(Bytes::from(body)))?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The host an authority names, as a connection takes it: an IPv6 address is bracketed in a
/// URL (`[::1]:9090`), never in what a connection is opened to.
fn host_to_connect(authority: &hyper::http::uri::Authority) -> &str {
    authority.host().trim_start_matches('[').trim_end_matches(']')
}

/// Runs `request` on a small single-threaded runtime, for commands that are not async.
pub fn blocking_request(
    method: Method,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(request(method, url, headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_address_is_connected_to_without_its_brackets() {
        let host = |text: &str| host_to_connect(&text.parse().expect("authority")).to_owned();
        assert_eq!(host("[::1]:9090"), "::1");
        assert_eq!(host("127.0.0.1:9090"), "127.0.0.1");
        assert_eq!(host("localhost"), "localhost");
    }
}
