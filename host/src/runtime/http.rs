//! Outbound HTTP for plugins, through `wasi:http/outgoing-handler`: only to the hosts their
//! manifest lists (`http_allow`), with connect, first-byte and between-bytes timeouts and a cap
//! on the response body. A refused request is an error value in the plugin, never a trap.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Uri;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiHttpHooks};

/// The longest a plugin's request may wait to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a plugin's request may wait for the response to start, and between its parts.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response body a plugin may read.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The hosts a plugin may call: `host`, `*.domain`, with `:port` or `:*` (no port: the
/// scheme's default port, 80 or 443).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpAllow {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    host: Host,
    port: Port,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Subdomain(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Default,
    Any,
    Number(u16),
}

impl HttpAllow {
    /// Parses `http_allow` entries; the error names the first bad one.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let rules = entries.iter().map(|entry| Rule::parse(entry)).collect::<Result<_, _>>()?;
        Ok(HttpAllow { rules })
    }

    /// Whether no host at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a request to `uri` is allowed.
    pub fn permits(&self, uri: &Uri) -> bool {
        let Some(host) = uri.host() else { return false };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let default_port = if uri.scheme_str() == Some("https") { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        self.rules.iter().any(|rule| {
            let host_ok = match &rule.host {
                Host::Exact(exact) => *exact == host,
                Host::Subdomain(suffix) => host.ends_with(suffix.as_str()),
            };
            let port_ok = match rule.port {
                Port::Any => true,
                Port::Default => port == default_port,
                Port::Number(number) => port == number,
            };
            host_ok && port_ok
        })
    }
}

impl Rule {
    fn parse(entry: &str) -> Result<Rule, String> {
        let bad = || format!("{entry:?} is not a host like \"hooks.slack.com\", \"*.example.com\" or \"127.0.0.1:*\"");
        let entry = entry.trim().to_ascii_lowercase();
        // An IPv6 address is bracketed, as in a URL; a bare colon only ever starts the port.
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            let port = if after.is_empty() { None } else { Some(after.strip_prefix(':').ok_or_else(bad)?) };
            (host.to_owned(), port)
        } else {
            match entry.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (entry.clone(), None),
            }
        };
        let port = match port {
            None => Port::Default,
            Some("*") => Port::Any,
            Some(number) => Port::Number(number.parse().map_err(|_| bad())?),
        };
        let valid = |name: &str| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        };
        let host = match host.strip_prefix("*.") {
            Some(domain) if valid(domain) => Host::Subdomain(format!(".{domain}")),
            None if valid(&host) => Host::Exact(host),
            _ => return Err(bad()),
        };
        Ok(Rule { host, port })
    }
}

/// The `wasi:http` hooks of one call: the plugin's allowlist, and the host's limits.
pub struct HttpGrant {
    allow: Arc<HttpAllow>,
    plugin: Arc<str>,
}

impl HttpGrant {
    /// Hooks for a call of `plugin`, allowed to reach `allow`.
    pub fn new(allow: Arc<HttpAllow>, plugin: Arc<str>) -> Self {
        HttpGrant { allow, plugin }
    }
}

impl WasiHttpHooks for HttpGrant {
    fn send_request(
        &mut self,
        request: hyper::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<RequestOptions>,
        _response_errors: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        if !self.allow.permits(request.uri()) {
            // Only scheme, host and port: a URL's path can be a secret (a Slack webhook's is),
            // and so can the user and password before the host.
            let uri = request.uri();
            let port = uri.port().map(|port| format!(":{port}")).unwrap_or_default();
            let target = format!("{}://{}{port}", uri.scheme_str().unwrap_or("?"), uri.host().unwrap_or("?"));
            tracing::warn!(plugin = %self.plugin, %target, "outbound HTTP refused: the host is not in http_allow");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let capped = |asked: Option<Duration>, most: Duration| Some(asked.map_or(most, |asked| asked.min(most)));
        let options = RequestOptions {
            connect_timeout: capped(options.and_then(|o| o.connect_timeout), CONNECT_TIMEOUT),
            first_byte_timeout: capped(options.and_then(|o| o.first_byte_timeout), RESPONSE_TIMEOUT),
            between_bytes_timeout: capped(options.and_then(|o| o.between_bytes_timeout), RESPONSE_TIMEOUT),
        };
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            let response = response.map(|body| {
                http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
                    .map_err(|err| match err.downcast::<HttpError>() {
                        Ok(inner) => *inner,
                        Err(_) => HttpError::HttpResponseBodySize(Some(MAX_RESPONSE_BYTES as u64)),
                    })
                    .boxed_unsync()
            });
            Ok((response, Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(entries: &[&str]) -> HttpAllow {
        HttpAllow::parse(&entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()).expect("valid entries")
    }

    fn permits(allow: &HttpAllow, url: &str) -> bool {
        allow.permits(&url.parse().expect("uri"))
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        assert!(!permits(&HttpAllow::default(), "https://hooks.slack.com/services/x"));
    }

    #[test]
    fn hosts_match_exactly_on_their_default_port() {
        let allow = allow(&["hooks.slack.com"]);
        assert!(permits(&allow, "https://hooks.slack.com/services/x"));
        assert!(permits(&allow, "http://HOOKS.slack.com/"));
        assert!(!permits(&allow, "https://hooks.slack.com:8443/"));
        assert!(!permits(&allow, "https://evil-hooks.slack.com/"));
        assert!(!permits(&allow, "https://hooks.slack.com.evil.example/"));
    }

    #[test]
    fn ports_and_subdomains_widen_a_rule() {
        let allow = allow(&["127.0.0.1:*", "*.example.com", "api.example.org:8443", "[::1]:9000"]);
        assert!(permits(&allow, "http://127.0.0.1:45678/hook"));
        assert!(!permits(&allow, "http://127.0.0.2:45678/hook"));
        assert!(permits(&allow, "https://a.b.example.com/"));
        assert!(!permits(&allow, "https://example.com/"), "*.example.com is subdomains only");
        assert!(permits(&allow, "https://api.example.org:8443/"));
        assert!(!permits(&allow, "https://api.example.org/"));
        assert!(permits(&allow, "http://[::1]:9000/"));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["", "a b", "host:port", "*.", "http://x.com", "[::1]junk", "[::1]:", "::1", "[nope]:80", "a:1:2"] {
            let err = HttpAllow::parse(&[bad.to_owned()]).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
