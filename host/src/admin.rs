//! The admin API on its own listener: health and readiness, Prometheus metrics, plugins,
//! events, stats, dead letters and replay. Every route but `/healthz` and `/readyz` requires `Authorization: Bearer <token>` when the
//! operator sets a token. It only reads from and asks the other modules; nothing reads from it.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::event::now_ms;
use crate::http::{self, Body};
use crate::journal::{DeadSelector, Journal, JournalError};
use crate::registry::Registry;
use crate::watch::Rewatch;

/// Largest request body the admin API reads.
const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;
/// Dead letters listed when the request does not say how many.
const DEFAULT_LIST_LIMIT: usize = 100;
/// The most dead letters one request lists.
const MAX_LIST_LIMIT: usize = 10_000;

/// The admin API's state.
pub struct Admin {
    journal: Arc<dyn Journal>,
    registry: Arc<Registry>,
    /// Moves the folder watch after a reload, as SIGHUP does.
    rewatch: Rewatch,
    token: Option<Secret>,
    shutdown: tokio_util::sync::CancellationToken,
}

/// One plugin as `/v1/plugins` shows it.
#[derive(Serialize)]
struct PluginView {
    name: String,
    /// `loaded`, `failed` (never loaded) or `removed` (file deleted).
    status: &'static str,
    file: String,
    /// The serving version's fields; absent when nothing serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    component: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loaded_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscriptions: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grants: Option<serde_json::Value>,
    /// Why the file's current content is not serving, if it is not.
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed_at: Option<u64>,
    /// Unfinished deliveries waiting for this plugin.
    pending: u64,
}

/// `{"ids": [..]}`, `{"plugin": ".."}` or `{"all": true}`: exactly one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorBody {
    ids: Option<Vec<i64>>,
    plugin: Option<String>,
    #[serde(default)]
    all: bool,
}

/// `{"type": "github.*", "since": "2026-11-25T08:00:00Z" | "1h", "plugin": ".."}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(rename = "type", default = "any_type")]
    event_type: String,
    since: String,
    plugin: Option<String>,
}

fn any_type() -> String {
    "*".to_owned()
}

/// A refused admin request: status and message.
struct Refusal(StatusCode, String);

impl From<JournalError> for Refusal {
    fn from(err: JournalError) -> Self {
        match err {
            JournalError::Unsupported(what) => Refusal(StatusCode::NOT_IMPLEMENTED, what.to_owned()),
            JournalError::Unavailable(_) => Refusal(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
            err => {
                tracing::error!(error = %err, "admin request failed in the journal");
                Refusal(StatusCode::INTERNAL_SERVER_ERROR, "the journal failed; see the host's log".to_owned())
            }
        }
    }
}

/// Whether a `Host` header names a loopback address or `localhost`, with or without a port.
fn is_loopback_name(host: &str) -> bool {
    let Ok(authority) = host.parse::<hyper::http::uri::Authority>() else { return false };
    let name = authority.host().trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.parse().is_ok_and(|ip| crate::config::is_loopback(std::net::SocketAddr::new(ip, 0)))
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, message.into())
}

impl Admin {
    /// An admin API over `journal` and `registry` (whose folder watch `rewatch` moves),
    /// guarded by `token` when there is one; it reports not ready once `shutdown` fires.
    pub fn new(
        journal: Arc<dyn Journal>,
        registry: Arc<Registry>,
        rewatch: Rewatch,
        token: Option<Secret>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Admin { journal, registry, rewatch, token, shutdown }
    }

    /// Readiness: the journal takes a write, the plugins folder reads, the host is not
    /// stopping (the listeners are bound before the admin API answers at all). Why a check
    /// fails is told in full only to a caller the token admits (anyone, without a token): a
    /// probe needs no token, and errors name paths and servers.
    async fn ready(&self, detailed: bool) -> Response<Body> {
        let journal = match self.journal.ping().await {
            Ok(()) => "ok".to_owned(),
            Err(err) if detailed => err.to_string(),
            Err(_) => "cannot write".to_owned(),
        };
        let folder = match std::fs::read_dir(self.registry.dir()) {
            Ok(_) => "ok".to_owned(),
            Err(err) if detailed => format!("cannot read {}: {err}", self.registry.dir().display()),
            Err(_) => "cannot read".to_owned(),
        };
        let listeners = if self.shutdown.is_cancelled() { "shutting down" } else { "ok" };
        let ready = journal == "ok" && folder == "ok" && listeners == "ok";
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let checks = serde_json::json!({"journal": journal, "plugins_folder": folder, "listeners": listeners});
        http::json(status, &serde_json::json!({"ready": ready, "checks": checks}))
    }

    async fn metrics(&self) -> Result<Response<Body>, Refusal> {
        // The host's own counters are worth most while the journal is unreachable: the
        // journal's gauges keep their last values then.
        match self.journal.stats().await {
            Ok(stats) => crate::metrics::journal_stats(&stats),
            Err(err) => tracing::warn!(error = %err, "metrics without fresh journal counts"),
        }
        let mut response = Response::new(http_body_util::Full::new(Bytes::from(crate::metrics::render())));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
        Ok(response)
    }

    /// Answers one HTTP request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if let Some(refusal) = self.web_page_refusal(&request) {
            return http::error(StatusCode::FORBIDDEN, refusal);
        }
        match request.uri().path() {
            "/healthz" => return http::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            "/readyz" => return self.ready(self.authorized(&request)).await,
            _ => {}
        }
        if !self.authorized(&request) {
            let mut response = http::error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return response;
        }
        match self.route(request).await {
            Ok(response) => response,
            Err(Refusal(status, message)) => http::error(status, message),
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, Refusal> {
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or("").to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = request.method().clone();
        let expected = match segments.as_slice() {
            ["v1", "dead-letters", "replay" | "purge"] | ["v1", "replay"] | ["v1", "plugins", "reload"] => Method::POST,
            ["metrics"]
            | ["v1", "plugins"]
            | ["v1", "events", _]
            | ["v1", "stats"]
            | ["v1", "dead-letters"]
            | ["v1", "dead-letters", _] => Method::GET,
            _ => return Err(Refusal(StatusCode::NOT_FOUND, format!("no admin route {path}"))),
        };
        if method != expected {
            return Err(Refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed on {path}; use {expected}"),
            ));
        }
        let ok = |value: serde_json::Value| Ok(http::json(StatusCode::OK, &value));
        match segments.as_slice() {
            ["metrics"] => self.metrics().await,
            ["v1", "plugins"] => ok(self.plugins().await?),
            ["v1", "plugins", "reload"] => {
                // A task of its own, so that a client that gives up does not cut the rescan short.
                // Then the watch follows the folder now under the name, in case it was replaced
                // where the watcher could not see (the watcher's own rescan finds the rest).
                let (registry, rewatch) = (Arc::clone(&self.registry), self.rewatch.clone());
                let reloaded = tokio::spawn(async move {
                    let reloaded = registry.reload().await;
                    rewatch.ask();
                    reloaded
                });
                match reloaded.await {
                    Ok(Ok(reloaded)) => ok(serde_json::to_value(reloaded).unwrap_or_default()),
                    Ok(Err(err)) => Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
                    Err(err) => Err(Refusal(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())),
                }
            }
            ["v1", "stats"] => ok(serde_json::to_value(self.journal.stats().await?).unwrap_or_default()),
            ["v1", "events", id] => match self.journal.event(&percent_decoded(id)).await? {
                Some(record) => ok(serde_json::to_value(record).unwrap_or_default()),
                None => Err(Refusal(StatusCode::NOT_FOUND, format!("no event with id {id:?}"))),
            },
            ["v1", "dead-letters"] => {
                let plugin = query_value(&query, "plugin").map(percent_decoded);
                let limit = match query_value(&query, "limit") {
                    Some(limit) => limit.parse().map_err(|_| bad_request(format!("limit={limit} is not a number")))?,
                    None => DEFAULT_LIST_LIMIT,
                };
                let letters = self.journal.dead_letters(plugin.as_deref(), limit.min(MAX_LIST_LIMIT)).await?;
                ok(serde_json::json!({ "dead_letters": letters }))
            }
            ["v1", "dead-letters", "replay"] => {
                let selector = selector(&read_json::<SelectorBody>(request).await?)?;
                ok(serde_json::json!({ "replayed": self.journal.replay_dead(selector).await? }))
            }
            ["v1", "dead-letters", "purge"] => {
                let selector = selector(&read_json::<SelectorBody>(request).await?)?;
                ok(serde_json::json!({ "purged": self.journal.purge_dead(selector).await? }))
            }
            ["v1", "dead-letters", id] => {
                let delivery: i64 = id.parse().map_err(|_| bad_request(format!("{id:?} is not a dead-letter id")))?;
                match self.journal.dead_letter(delivery).await? {
                    Some(detail) => ok(serde_json::json!({
                        "dead_letter": detail.letter,
                        "errors": detail.errors,
                        "content_type": detail.content_type,
                        "data": payload_view(&detail.data),
                    })),
                    None => Err(Refusal(StatusCode::NOT_FOUND, format!("no dead letter {delivery}"))),
                }
            }
            ["v1", "replay"] => {
                let body = read_json::<ReplayBody>(request).await?;
                ok(serde_json::json!({ "replayed": self.replay(body).await? }))
            }
            _ => Err(Refusal(StatusCode::NOT_FOUND, format!("no admin route {path}"))),
        }
    }

    /// Why a request looks sent by a web page, which the admin API never serves: a browser
    /// adds `Origin` to every request a page makes across sites, and a page that rebinds its
    /// own name to 127.0.0.1 still sends that name as `Host`. Without a token, loopback is the
    /// only guard, so only requests addressed to a loopback address or `localhost` pass.
    fn web_page_refusal(&self, request: &Request<Incoming>) -> Option<String> {
        if request.headers().contains_key(header::ORIGIN) {
            return Some("requests from web pages (with an Origin header) are refused".to_owned());
        }
        if self.token.is_some() {
            return None;
        }
        let host = request.headers().get(header::HOST).map(|host| host.to_str().unwrap_or("(not text)"));
        match host {
            Some(host) if is_loopback_name(host) => None,
            _ => Some(format!(
                "without admin_token_env, only requests addressed to loopback are answered (Host: {})",
                host.unwrap_or("none")
            )),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else { return true };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Hashing both sides first makes the comparison take the same time whatever the lengths.
        use sha2::{Digest, Sha256};
        bool::from(Sha256::digest(given).ct_eq(&Sha256::digest(token.expose())))
    }

    async fn plugins(&self) -> Result<serde_json::Value, Refusal> {
        let pending = self.journal.pending_by_plugin().await?;
        let views: Vec<PluginView> = self
            .registry
            .statuses()
            .into_iter()
            .map(|(name, status)| {
                let plugin = status.plugin.as_deref();
                let metadata = plugin.map(|plugin| plugin.component.metadata());
                PluginView {
                    pending: pending.get(&name).copied().unwrap_or(0),
                    status: match (plugin, status.removed_at) {
                        (Some(_), _) => "loaded",
                        (None, Some(_)) => "removed",
                        (None, None) => "failed",
                    },
                    name,
                    file: status.file.display().to_string(),
                    component: metadata.map(|metadata| metadata.name.clone()),
                    version: metadata.map(|metadata| metadata.version.clone()),
                    sha256: plugin.map(|plugin| plugin.sha256.clone()),
                    loaded_at: plugin.map(|plugin| plugin.loaded_at),
                    subscriptions: plugin.map(|plugin| plugin.subscriptions.to_vec()),
                    grants: plugin.map(|plugin| {
                        let limits = plugin.component.limits();
                        serde_json::json!({
                            "timeout_ms": limits.timeout.as_millis() as u64,
                            "memory_bytes": limits.memory_bytes,
                            "concurrency": plugin.concurrency,
                            "http_allow": plugin.http_allow,
                            "config": plugin.config_keys,
                            "max_attempts": plugin.retry.max_attempts,
                        })
                    }),
                    last_error: status.last_error,
                    removed_at: status.removed_at,
                }
            })
            .collect();
        Ok(serde_json::json!({ "plugins": views }))
    }

    async fn replay(&self, body: ReplayBody) -> Result<u64, Refusal> {
        let since_ms = parse_since(&body.since).map_err(bad_request)?;
        let types = crate::subscription::matcher(std::slice::from_ref(&body.event_type)).map_err(bad_request)?;
        if let Some(plugin) = &body.plugin
            && self.registry.get(plugin).is_none()
        {
            return Err(bad_request(format!("no plugin named {plugin:?} is loaded")));
        }
        let registry = Arc::clone(&self.registry);
        let route = move |event_type: &str| {
            if !types.is_match(event_type) {
                return Vec::new();
            }
            let mut plugins = registry.route(event_type);
            if let Some(only) = &body.plugin {
                plugins.retain(|plugin| plugin == only);
            }
            plugins
        };
        let replayed = self.journal.replay(since_ms, &route).await?;
        tracing::info!(replayed, since_ms, "replay requested through the admin API");
        Ok(replayed)
    }
}

fn selector(body: &SelectorBody) -> Result<DeadSelector, Refusal> {
    match (&body.ids, &body.plugin, body.all) {
        (Some(ids), None, false) => Ok(DeadSelector::Ids(ids.clone())),
        (None, Some(plugin), false) => Ok(DeadSelector::Plugin(plugin.clone())),
        (None, None, true) => Ok(DeadSelector::All),
        _ => Err(bad_request("give exactly one of \"ids\": [..], \"plugin\": \"..\" or \"all\": true")),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Refusal> {
    let body = http::read_limited(request.into_body(), MAX_ADMIN_BODY_BYTES).await.map_err(|err| match err {
        http::BodyError::TooLarge => {
            Refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("body is over {} KiB", MAX_ADMIN_BODY_BYTES / 1024))
        }
        http::BodyError::Read(err) => bad_request(format!("cannot read the body: {err}")),
    })?;
    serde_json::from_slice(&body).map_err(|err| bad_request(format!("body is not what this route takes: {err}")))
}

/// A query parameter's raw value, still percent-encoded.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(key, _)| *key == name).map(|(_, value)| value)
}

/// A path segment or query value with its `%XX` escapes decoded: an event id or a plugin name
/// may hold `/`, `?`, `#`, `&` or `%`, which a client sends escaped.
fn percent_decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// A payload as JSON when it is JSON, else as text.
fn payload_view(data: &Bytes) -> serde_json::Value {
    serde_json::from_slice(data)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(data).into_owned()))
}

/// `since` as an RFC 3339 time (`2026-11-25T08:00:00Z`) or an age (`90m`: that long ago),
/// in milliseconds since the Unix epoch.
pub fn parse_since(text: &str) -> Result<u64, String> {
    if let Ok(time) = humantime::parse_rfc3339_weak(text) {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        return Ok(crate::event::millis(since));
    }
    // With an offset from UTC, such as +01:00.
    if let Ok(time) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Ok(u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0));
    }
    match humantime::parse_duration(text) {
        Ok(age) => Ok(now_ms().saturating_sub(crate::event::millis(age))),
        Err(_) => Err(format!("since = {text:?} is neither a time like 2026-11-25T08:00:00Z nor an age like 2h")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_an_age() {
        assert_eq!(parse_since("2026-11-25T08:00:00Z"), Ok(1_795_593_600_000));
        assert_eq!(parse_since("2026-11-25T09:00:00+01:00"), Ok(1_795_593_600_000));
        let hour_ago = parse_since("1h").expect("an age");
        let expected = now_ms() - 3_600_000;
        assert!(hour_ago.abs_diff(expected) < 5_000, "{hour_ago} vs {expected}");
        assert!(parse_since("yesterday-ish").is_err());
    }

    #[test]
    fn a_selector_names_exactly_one_thing() {
        let body = |ids, plugin: Option<&str>, all| SelectorBody { ids, plugin: plugin.map(str::to_owned), all };
        assert_eq!(selector(&body(Some(vec![1]), None, false)).ok(), Some(DeadSelector::Ids(vec![1])));
        assert_eq!(selector(&body(None, Some("p"), false)).ok(), Some(DeadSelector::Plugin("p".into())));
        assert_eq!(selector(&body(None, None, true)).ok(), Some(DeadSelector::All));
        assert!(selector(&body(None, None, false)).is_err());
        assert!(selector(&body(Some(vec![1]), None, true)).is_err());
    }

    #[test]
    fn escaped_path_segments_are_decoded() {
        assert_eq!(percent_decoded("a%2Fb%25c%3Fd%23e"), "a/b%c?d#e");
        assert_eq!(percent_decoded("plain-id"), "plain-id");
    }

    #[test]
    fn query_values_are_found_by_name() {
        assert_eq!(query_value("plugin=echo&limit=5", "limit"), Some("5"));
        assert_eq!(query_value("plugin=echo", "limit"), None);
        let named = query_value("plugin=a%20%26%2Bb&limit=5", "plugin").map(percent_decoded);
        assert_eq!(named.as_deref(), Some("a &+b"), "what the CLI encodes comes back whole");
    }
}
